//! Frameworks registered through the Mesos v1 scheduler API: what the state log records about
//! them ([`MesosState`], part of [`crate::state::State`]), and the sans-IO bookkeeping the
//! control loop keeps for their subscriptions ([`Sessions`]): connection and failover timers,
//! heartbeats, and the per-task streams of status updates that are re-sent until acknowledged.

use crate::mesos::{FrameworkInfo, TaskStatus};
use crate::model::{FrameworkId, Millis, Resources, TaskId};
use crate::state::Task;
use imbl::OrdMap;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, VecDeque};

/// How many torn-down frameworks `/master/state` keeps listing.
pub const MAX_COMPLETED_FRAMEWORKS: usize = 50;
/// How many ended tasks are kept per framework.
pub const MAX_COMPLETED_TASKS: usize = 200;

/// A framework as the state log records it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FrameworkRecord {
    /// Its id.
    pub id: FrameworkId,
    /// Its latest `FrameworkInfo` (with `id` set).
    pub info: FrameworkInfo,
    /// First subscription.
    pub registered_at: Millis,
    /// Latest re-subscription.
    #[serde(default)]
    pub reregistered_at: Option<Millis>,
    /// When it was torn down (completed frameworks only).
    #[serde(default)]
    pub removed_at: Option<Millis>,
    /// Its ended tasks, oldest first (at most [`MAX_COMPLETED_TASKS`]).
    #[serde(default)]
    pub completed_tasks: VecDeque<CompletedTask>,
}

/// A task that ended.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CompletedTask {
    /// Its last record (terminal state).
    pub task: Task,
    /// Its name.
    pub name: String,
    /// When it ended.
    pub ended_at: Millis,
}

/// Quota of a role: upper limits on scalar resources (Mesos' `QuotaConfig.limits`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Quota {
    /// Limits; a resource absent (or `None`) is unlimited.
    pub cpus: Option<f64>,
    /// Memory limit, MiB.
    pub mem: Option<f64>,
    /// Disk limit, MiB.
    pub disk: Option<f64>,
}

impl Quota {
    /// Whether no limit is set.
    pub fn is_empty(&self) -> bool {
        self.cpus.is_none() && self.mem.is_none() && self.disk.is_none()
    }
}

/// Everything the log records about Mesos-API frameworks, weights and quota.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MesosState {
    /// Registered frameworks (connected or within their failover timeout).
    #[serde(default)]
    pub frameworks: OrdMap<FrameworkId, FrameworkRecord>,
    /// Torn-down frameworks, oldest first (at most [`MAX_COMPLETED_FRAMEWORKS`]).
    #[serde(default)]
    pub completed: VecDeque<FrameworkRecord>,
    /// Role weights set through `/master/weights`.
    #[serde(default)]
    pub weights: BTreeMap<String, f64>,
    /// Role quotas.
    #[serde(default)]
    pub quotas: BTreeMap<String, Quota>,
    /// Names of live framework tasks.
    #[serde(default)]
    pub task_names: OrdMap<TaskId, String>,
}

impl MesosState {
    /// Whether `id` was torn down (it may not subscribe again).
    pub fn is_removed(&self, id: &FrameworkId) -> bool {
        self.completed.iter().any(|f| &f.id == id)
    }

    /// A framework (re-)subscribed.
    pub fn subscribe(&mut self, id: &FrameworkId, info: &FrameworkInfo, at: Millis) {
        let mut info = info.clone();
        info.id = Some(crate::mesos::Id::new(id.0.clone()));
        match self.frameworks.get_mut(id) {
            Some(f) => {
                f.info = info;
                f.reregistered_at = Some(at);
            }
            None => {
                self.frameworks.insert(
                    id.clone(),
                    FrameworkRecord {
                        id: id.clone(),
                        info,
                        registered_at: at,
                        reregistered_at: None,
                        removed_at: None,
                        completed_tasks: VecDeque::new(),
                    },
                );
            }
        }
    }

    /// A framework was torn down: it moves to the completed list.
    pub fn remove(&mut self, id: &FrameworkId, at: Millis) -> bool {
        let Some(mut f) = self.frameworks.remove(id) else { return false };
        f.removed_at = Some(at);
        self.completed.push_back(f);
        while self.completed.len() > MAX_COMPLETED_FRAMEWORKS {
            self.completed.pop_front();
        }
        true
    }

    /// A task ended: keep it in its framework's completed list.
    pub fn task_ended(&mut self, task: &Task, at: Millis) {
        let name = self.task_names.remove(&task.id);
        let rec = match self.frameworks.get_mut(&task.framework_id) {
            Some(f) => f,
            None => match self.completed.iter_mut().find(|f| f.id == task.framework_id) {
                Some(f) => f,
                None => return,
            },
        };
        rec.completed_tasks.push_back(CompletedTask {
            task: task.clone(),
            name: name.unwrap_or_else(|| task.id.0.clone()),
            ended_at: at,
        });
        while rec.completed_tasks.len() > MAX_COMPLETED_TASKS {
            rec.completed_tasks.pop_front();
        }
    }

    /// The quota limits of `role` as resources (`f64::INFINITY` where unlimited), if any.
    pub fn quota_limits(&self, role: &str) -> Option<Resources> {
        let q = self.quotas.get(role)?;
        Some(Resources::scalars(
            q.cpus.unwrap_or(f64::INFINITY),
            q.mem.unwrap_or(f64::INFINITY),
            q.disk.unwrap_or(f64::INFINITY),
        ))
    }
}

/// A status update waiting for its acknowledgement.
#[derive(Clone, Debug, PartialEq)]
struct Pending {
    status: TaskStatus,
    last_sent: Option<Millis>,
}

/// A framework's subscription as the control loop tracks it.
#[derive(Clone, Debug, PartialEq)]
pub struct Session {
    /// The current stream (`None` while disconnected).
    pub stream_id: Option<String>,
    /// Since when it is disconnected.
    pub disconnected_at: Option<Millis>,
    /// Its failover timeout.
    pub failover_ms: Millis,
    /// When the last event (or heartbeat) was sent.
    pub last_sent: Millis,
    /// Per-task streams of unacknowledged updates; only the head of each is sent.
    streams: BTreeMap<TaskId, VecDeque<Pending>>,
}

impl Session {
    /// How many updates wait for an acknowledgement.
    pub fn unacknowledged(&self) -> usize {
        self.streams.values().map(VecDeque::len).sum()
    }
}

/// Why an acknowledgement was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AckError {
    /// No update with that uuid waits for the task (already acknowledged, or never sent).
    #[error("no pending status update of task {0} with that uuid")]
    Unknown(TaskId),
}

/// What [`Sessions::tick`] found due.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Due {
    /// Frameworks whose failover timeout ran out: tear them down.
    pub expired: Vec<FrameworkId>,
    /// Updates to send again (still unacknowledged after the resend interval).
    pub resend: Vec<(FrameworkId, TaskStatus)>,
    /// Connected frameworks that need a HEARTBEAT.
    pub heartbeat: Vec<FrameworkId>,
}

/// All subscriptions; pure bookkeeping driven by `now`.
#[derive(Clone, Debug)]
pub struct Sessions {
    map: BTreeMap<FrameworkId, Session>,
    /// Re-send an unacknowledged update after this long.
    pub resend_ms: Millis,
    /// Send a HEARTBEAT after this long without any event.
    pub heartbeat_ms: Millis,
}

impl Sessions {
    /// No sessions.
    pub fn new(heartbeat_ms: Millis, resend_ms: Millis) -> Self {
        Self { map: BTreeMap::new(), resend_ms, heartbeat_ms }
    }

    /// A session, if the framework is known.
    pub fn get(&self, id: &FrameworkId) -> Option<&Session> {
        self.map.get(id)
    }

    /// Every session.
    pub fn iter(&self) -> impl Iterator<Item = (&FrameworkId, &Session)> {
        self.map.iter()
    }

    /// A framework recovered from the log after a restart: known but disconnected since `now`.
    pub fn recover(&mut self, id: FrameworkId, failover_ms: Millis, now: Millis) {
        self.map.entry(id).or_insert(Session {
            stream_id: None,
            disconnected_at: Some(now),
            failover_ms,
            last_sent: now,
            streams: BTreeMap::new(),
        });
    }

    /// A (re-)subscription on stream `stream_id`. Returns the updates to send at once: the head
    /// of every task's stream (updates kept while it was away).
    pub fn connect(
        &mut self,
        id: &FrameworkId,
        stream_id: String,
        failover_ms: Millis,
        now: Millis,
    ) -> Vec<TaskStatus> {
        let s = self.map.entry(id.clone()).or_insert(Session {
            stream_id: None,
            disconnected_at: None,
            failover_ms,
            last_sent: now,
            streams: BTreeMap::new(),
        });
        s.stream_id = Some(stream_id);
        s.disconnected_at = None;
        s.failover_ms = failover_ms;
        s.last_sent = now;
        let mut out = Vec::new();
        for q in s.streams.values_mut() {
            if let Some(head) = q.front_mut() {
                head.last_sent = Some(now);
                out.push(head.status.clone());
            }
        }
        out
    }

    /// The stream broke: the failover timer starts. Pending updates are kept.
    pub fn disconnect(&mut self, id: &FrameworkId, now: Millis) {
        if let Some(s) = self.map.get_mut(id)
            && (s.stream_id.take().is_some() || s.disconnected_at.is_none())
        {
            s.disconnected_at = Some(now);
        }
    }

    /// Forget a framework (torn down).
    pub fn remove(&mut self, id: &FrameworkId) -> Option<Session> {
        self.map.remove(id)
    }

    /// Whether the framework is connected on `stream_id`.
    pub fn is_stream(&self, id: &FrameworkId, stream_id: &str) -> bool {
        self.map.get(id).and_then(|s| s.stream_id.as_deref()) == Some(stream_id)
    }

    /// Queue an update that must be acknowledged (it carries a uuid). Returns it when it is to be
    /// sent now: the framework is connected and no earlier update of the task waits.
    pub fn enqueue(&mut self, id: &FrameworkId, status: TaskStatus, now: Millis) -> Option<TaskStatus> {
        let s = self.map.get_mut(id)?;
        let connected = s.stream_id.is_some();
        let q = s.streams.entry(TaskId(status.task_id.value.clone())).or_default();
        let send = connected && q.is_empty();
        q.push_back(Pending { status: status.clone(), last_sent: send.then_some(now) });
        if send {
            s.last_sent = now;
            Some(status)
        } else {
            None
        }
    }

    /// An acknowledgement. Returns the task's next update to send, if any.
    pub fn acknowledge(
        &mut self,
        id: &FrameworkId,
        task: &TaskId,
        uuid: &str,
        now: Millis,
    ) -> Result<Option<TaskStatus>, AckError> {
        let s = self.map.get_mut(id).ok_or_else(|| AckError::Unknown(task.clone()))?;
        let q = s.streams.get_mut(task).ok_or_else(|| AckError::Unknown(task.clone()))?;
        if q.front().and_then(|p| p.status.uuid.as_deref()) != Some(uuid) {
            return Err(AckError::Unknown(task.clone()));
        }
        q.pop_front();
        let connected = s.stream_id.is_some();
        let next = match q.front_mut() {
            Some(p) if connected => {
                p.last_sent = Some(now);
                s.last_sent = now;
                Some(p.status.clone())
            }
            _ => None,
        };
        if q.is_empty() {
            s.streams.remove(task);
        }
        Ok(next)
    }

    /// Timers: expired failover timeouts, updates to re-send, heartbeats due.
    pub fn tick(&mut self, now: Millis) -> Due {
        let mut due = Due::default();
        for (id, s) in self.map.iter_mut() {
            match (s.stream_id.is_some(), s.disconnected_at) {
                (false, Some(since)) => {
                    if now >= since.saturating_add(s.failover_ms) {
                        due.expired.push(id.clone());
                    }
                }
                (true, _) => {
                    for q in s.streams.values_mut() {
                        if let Some(head) = q.front_mut()
                            && head.last_sent.is_none_or(|t| now >= t.saturating_add(self.resend_ms))
                        {
                            head.last_sent = Some(now);
                            s.last_sent = now;
                            due.resend.push((id.clone(), head.status.clone()));
                        }
                    }
                    if now >= s.last_sent.saturating_add(self.heartbeat_ms) {
                        s.last_sent = now;
                        due.heartbeat.push(id.clone());
                    }
                }
                (false, None) => {}
            }
        }
        due
    }
}

/// What a framework's `TaskInfo` becomes: the task record, what the agent runs, and its name.
#[derive(Clone, Debug, PartialEq)]
pub struct TaskLaunch {
    /// The record (STAGING).
    pub task: Task,
    /// What the agent's runtime starts.
    pub spec: crate::runtime::TaskSpec,
    /// The task's name.
    pub name: String,
}

/// Where a task is to run and what is left of the offers it uses.
#[derive(Clone, Debug)]
pub struct LaunchContext<'a> {
    /// The launching framework.
    pub framework: &'a FrameworkId,
    /// The offers' agent.
    pub agent: &'a crate::model::AgentId,
    /// Its host name.
    pub hostname: &'a str,
    /// What the offers still hold.
    pub remaining: &'a Resources,
    /// What the node lets containers reach of the host.
    pub host_access: &'a crate::runtime::HostAccess,
    /// When.
    pub now: Millis,
}

/// Validate a `TaskInfo` of a LAUNCH and turn it into a [`TaskLaunch`]. The error is the
/// message of the TASK_ERROR the framework gets (`REASON_TASK_INVALID`). Uniqueness of the id
/// is the caller's to check (it knows the other tasks).
pub fn task_launch(info: &crate::mesos::TaskInfo, cx: &LaunchContext<'_>) -> Result<TaskLaunch, String> {
    use crate::runtime::{Command as Run, ContainerSpec, NetworkMode, PortMapping, TaskSpec, Volume};
    let id = info.task_id.value.as_str();
    if id.is_empty()
        || id == "."
        || id == ".."
        || id.len() > 255
        || id.chars().any(|c| c == '/' || c == '\\' || c.is_whitespace() || c.is_control())
    {
        return Err(format!("TaskID '{id}' contains invalid characters"));
    }
    if info.agent_id.value != cx.agent.0 {
        return Err(format!("Task uses invalid agent: {}", info.agent_id.value));
    }
    if info.executor.is_some() {
        return Err("Custom executors are not supported by mesh: give the task a 'command' instead".into());
    }
    let resources = crate::mesos::resources_from_wire(&info.resources)?;
    if resources.cpus <= crate::model::EPSILON && resources.mem <= crate::model::EPSILON {
        return Err("Task uses no resources (it needs cpus or mem)".into());
    }
    if !cx.remaining.contains(&resources) {
        return Err(format!("Task uses more resources {resources} than available {}", cx.remaining));
    }
    let ports: Vec<u16> = resources.ports.iter().collect();
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    let command = match &info.command {
        Some(c) => {
            if !c.uris.is_empty() {
                return Err("Fetching URIs (command.uris) is not supported by mesh".into());
            }
            for v in c.environment.iter().flat_map(|e| &e.variables) {
                if v.kind.as_deref().is_some_and(|k| k != "VALUE") {
                    return Err(format!("Environment variable '{}': only VALUE variables are supported", v.name));
                }
                env.insert(v.name.clone(), v.value.clone().unwrap_or_default());
            }
            match (c.shell.unwrap_or(true), &c.value) {
                (true, Some(v)) if !v.trim().is_empty() => Some(Run::Shell(v.clone())),
                (true, _) => return Err("Shell command of task has no 'value'".into()),
                (false, Some(v)) => {
                    let mut argv = vec![v.clone()];
                    argv.extend(c.arguments.iter().skip(1).cloned());
                    Some(Run::Args(argv))
                }
                (false, None) if !c.arguments.is_empty() => Some(Run::Args(c.arguments.clone())),
                (false, None) => None,
            }
        }
        None => None,
    };
    let container = match &info.container {
        None => None,
        Some(ci) => match (ci.kind.as_deref().unwrap_or("MESOS"), &ci.docker) {
            ("DOCKER", Some(d)) => {
                if d.image.trim().is_empty() {
                    return Err("Docker container of task has no image".into());
                }
                let network = match d.network.as_deref().unwrap_or("HOST") {
                    "HOST" => NetworkMode::Host,
                    "BRIDGE" => NetworkMode::Bridge,
                    "NONE" => NetworkMode::None,
                    other => return Err(format!("Docker network mode {other} is not supported (HOST, BRIDGE, NONE)")),
                };
                let mut port_mappings = Vec::new();
                for pm in &d.port_mappings {
                    let host = u16::try_from(pm.host_port).ok().filter(|p| resources.ports.contains(*p));
                    let Some(host) = host else {
                        return Err(format!(
                            "Port mapping host port {} is not among the task's port resources",
                            pm.host_port
                        ));
                    };
                    let cport = u16::try_from(pm.container_port)
                        .ok()
                        .filter(|p| *p != 0)
                        .ok_or_else(|| format!("Port mapping container port {} is invalid", pm.container_port))?;
                    port_mappings.push(PortMapping {
                        container_port: cport,
                        host_port: host,
                        protocol: pm.protocol.clone().unwrap_or_else(|| "tcp".into()),
                    });
                }
                let privileged = d.privileged.unwrap_or(false);
                if privileged && !cx.host_access.allow_privileged {
                    return Err("Privileged containers are not allowed on this node (--allow-privileged)".into());
                }
                let mut parameters = Vec::new();
                for p in &d.parameters {
                    if !crate::runtime::docker::ALLOWED_PARAMETERS.contains(&p.key.as_str()) {
                        return Err(format!(
                            "Docker parameter '{}' is not supported; supported: {}",
                            p.key,
                            crate::runtime::docker::ALLOWED_PARAMETERS.join(", ")
                        ));
                    }
                    if p.key == "cap-add" {
                        for cap in p.value.split(',') {
                            cx.host_access.check_cap_add(cap)?;
                        }
                    }
                    parameters.push((p.key.clone(), p.value.clone()));
                }
                let mut volumes = Vec::new();
                for v in &ci.volumes {
                    let Some(host) = v.host_path.clone().filter(|h| h.starts_with('/')) else {
                        return Err(format!("Volume '{}' needs an absolute host_path", v.container_path));
                    };
                    cx.host_access.check_host_path(&host)?;
                    volumes.push(Volume {
                        container_path: v.container_path.clone(),
                        host_path: host,
                        read_only: v.mode.as_deref() == Some("RO"),
                    });
                }
                Some(ContainerSpec {
                    image: d.image.clone(),
                    network,
                    port_mappings,
                    volumes,
                    parameters,
                    privileged,
                    force_pull: d.force_pull_image.unwrap_or(false),
                })
            }
            ("DOCKER", None) => return Err("DOCKER container of task has no 'docker' settings".into()),
            ("MESOS", _) => {
                if ci.mesos.as_ref().is_some_and(|m| m.get("image").is_some()) {
                    return Err("Images in MESOS containers are not supported: use a DOCKER container".into());
                }
                if !ci.volumes.is_empty() {
                    return Err("Volumes need a DOCKER container".into());
                }
                None
            }
            (other, _) => return Err(format!("Container type {other} is not supported")),
        },
    };
    let command = match (command, &container) {
        (Some(c), _) => c,
        (None, Some(_)) => Run::Args(Vec::new()), // the image's entrypoint
        (None, None) => return Err("Task has neither a command nor a container to run".into()),
    };
    let grace = info
        .kill_policy
        .and_then(|k| k.grace_period)
        .map(|g| std::time::Duration::from_nanos(g.nanoseconds.clamp(0, 3_600_000_000_000) as u64))
        .unwrap_or(std::time::Duration::from_secs(3));
    env.insert("MESOS_TASK_ID".into(), id.to_owned());
    env.insert("MESOS_FRAMEWORK_ID".into(), cx.framework.0.clone());
    env.insert("MESOS_AGENT_ID".into(), cx.agent.0.clone());
    env.insert("HOST".into(), cx.hostname.to_owned());
    if !ports.is_empty() {
        env.insert("PORTS".into(), ports.iter().map(u16::to_string).collect::<Vec<_>>().join(","));
    }
    let mut labels: BTreeMap<String, String> = info
        .labels
        .iter()
        .flat_map(|l| &l.labels)
        .map(|l| (l.key.clone(), l.value.clone().unwrap_or_default()))
        .collect();
    labels.insert("mesh.framework".into(), cx.framework.0.clone());
    let task_id = TaskId(id.to_owned());
    let task = Task {
        id: task_id.clone(),
        framework_id: cx.framework.clone(),
        app_id: None,
        agent_id: cx.agent.clone(),
        host: cx.hostname.to_owned(),
        ports: ports.clone(),
        service_ports: Vec::new(),
        state: crate::proto::TaskState::Staging,
        staged_at: cx.now,
        started_at: None,
        version: cx.now,
        resources: resources.clone(),
        kill_requested: false,
        message: String::new(),
        health: Vec::new(),
        unreachable_since: None,
        inactive: false,
    };
    let spec = TaskSpec {
        task_id,
        command,
        env,
        cpus: resources.cpus,
        mem: resources.mem,
        disk: resources.disk,
        ports,
        kill_grace: grace,
        labels,
        container,
    };
    let name = if info.name.is_empty() { id.to_owned() } else { info.name.clone() };
    Ok(TaskLaunch { task, spec, name })
}

/// A status of a task for its framework (no message, source, reason or uuid yet).
pub fn status_of(
    task_id: &TaskId,
    agent: Option<&crate::model::AgentId>,
    state: crate::mesos::TaskState,
    now: Millis,
) -> TaskStatus {
    TaskStatus {
        task_id: crate::mesos::Id::new(task_id.0.clone()),
        state,
        message: None,
        source: None,
        reason: None,
        agent_id: agent.map(|a| crate::mesos::Id::new(a.0.clone())),
        executor_id: None,
        timestamp: Some(now as f64 / 1000.0),
        uuid: None,
        healthy: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mesos::{Id, TaskState};

    fn st(task: &str, state: TaskState, uuid: &str) -> TaskStatus {
        TaskStatus {
            task_id: Id::new(task),
            state,
            message: None,
            source: None,
            reason: None,
            agent_id: None,
            executor_id: None,
            timestamp: None,
            uuid: Some(uuid.into()),
            healthy: None,
        }
    }

    fn fw(s: &str) -> FrameworkId {
        FrameworkId::from(s)
    }

    #[test]
    fn failover_timer_tears_down_only_after_the_timeout() {
        let mut s = Sessions::new(15_000, 10_000);
        s.connect(&fw("f"), "s1".into(), 5_000, 0);
        assert!(s.tick(100_000).expired.is_empty(), "a connected framework never expires");
        s.disconnect(&fw("f"), 100_000);
        assert!(s.tick(104_999).expired.is_empty());
        // re-subscribing within the timeout stops the timer
        s.connect(&fw("f"), "s2".into(), 5_000, 104_000);
        assert!(s.tick(200_000).expired.is_empty());
        assert!(s.is_stream(&fw("f"), "s2") && !s.is_stream(&fw("f"), "s1"));
        s.disconnect(&fw("f"), 200_000);
        s.disconnect(&fw("f"), 203_000); // a second disconnect does not restart the timer
        assert_eq!(s.tick(205_000).expired, vec![fw("f")]);
        // a zero timeout expires at once
        s.connect(&fw("g"), "x".into(), 0, 0);
        s.disconnect(&fw("g"), 7);
        assert!(s.tick(7).expired.contains(&fw("g")));
        // recovered after a restart: the timer starts at recovery
        s.recover(fw("r"), 1_000, 50);
        assert!(!s.tick(1_049).expired.contains(&fw("r")));
        assert!(s.tick(1_050).expired.contains(&fw("r")));
    }

    #[test]
    fn updates_of_a_task_go_out_in_order_one_at_a_time() {
        let mut s = Sessions::new(15_000, 10_000);
        s.connect(&fw("f"), "s".into(), 0, 0);
        let t = TaskId::from("t");
        assert_eq!(s.enqueue(&fw("f"), st("t", TaskState::Running, "u1"), 1), Some(st("t", TaskState::Running, "u1")));
        assert_eq!(s.enqueue(&fw("f"), st("t", TaskState::Finished, "u2"), 2), None, "waits for the ack of u1");
        assert_eq!(
            s.enqueue(&fw("f"), st("other", TaskState::Running, "u3"), 2).map(|x| x.uuid),
            Some(Some("u3".into()))
        );
        assert_eq!(s.acknowledge(&fw("f"), &t, "u2", 3), Err(AckError::Unknown(t.clone())), "not the head");
        assert_eq!(s.acknowledge(&fw("f"), &t, "u1", 3).unwrap().unwrap().uuid.as_deref(), Some("u2"));
        assert_eq!(s.acknowledge(&fw("f"), &t, "u1", 4), Err(AckError::Unknown(t.clone())), "acked twice");
        assert_eq!(s.acknowledge(&fw("f"), &t, "u2", 4), Ok(None));
        assert_eq!(s.get(&fw("f")).unwrap().unacknowledged(), 1);
    }

    #[test]
    fn unacknowledged_updates_are_resent_and_kept_across_reconnects() {
        let mut s = Sessions::new(1_000, 10_000);
        s.connect(&fw("f"), "s".into(), 60_000, 0);
        s.enqueue(&fw("f"), st("t", TaskState::Running, "u1"), 0);
        let due = s.tick(999);
        assert!(due.resend.is_empty() && due.heartbeat.is_empty(), "the update counts as activity");
        assert_eq!(s.tick(1_000).heartbeat, vec![fw("f")]);
        assert!(s.tick(9_999).resend.is_empty());
        let due = s.tick(10_000);
        assert_eq!(due.resend.len(), 1);
        assert!(due.heartbeat.is_empty(), "the resend just went out");
        assert_eq!(s.tick(11_000).heartbeat, vec![fw("f")]);
        // while away, updates queue; the heads go out on re-subscribe
        s.disconnect(&fw("f"), 12_000);
        assert_eq!(s.enqueue(&fw("f"), st("t2", TaskState::Running, "u9"), 12_500), None);
        assert!(s.tick(30_000).resend.is_empty(), "nothing is sent while disconnected");
        let mut again = s.connect(&fw("f"), "s2".into(), 60_000, 31_000);
        again.sort_by(|a, b| a.task_id.cmp(&b.task_id));
        let uuids: Vec<_> = again.iter().map(|x| x.uuid.clone().unwrap()).collect();
        assert_eq!(uuids, vec!["u1", "u9"]);
    }

    #[test]
    fn the_state_keeps_frameworks_and_their_completed_tasks() {
        let mut m = MesosState::default();
        let info = FrameworkInfo { name: "batch".into(), ..Default::default() };
        m.subscribe(&fw("f1"), &info, 10);
        m.subscribe(&fw("f1"), &info, 20);
        let rec = &m.frameworks[&fw("f1")];
        assert_eq!((rec.registered_at, rec.reregistered_at), (10, Some(20)));
        assert_eq!(rec.info.id.as_ref().unwrap().value, "f1");
        assert!(m.remove(&fw("f1"), 30));
        assert!(!m.remove(&fw("f1"), 31));
        assert!(m.is_removed(&fw("f1")));
        for i in 0..(MAX_COMPLETED_FRAMEWORKS + 5) {
            m.subscribe(&fw(&format!("x{i}")), &info, 1);
            m.remove(&fw(&format!("x{i}")), 2);
        }
        assert_eq!(m.completed.len(), MAX_COMPLETED_FRAMEWORKS);
        assert!(!m.is_removed(&fw("f1")), "the oldest are forgotten");
        m.quotas.insert("r".into(), Quota { cpus: Some(2.0), ..Default::default() });
        let l = m.quota_limits("r").unwrap();
        assert_eq!(l.cpus, 2.0);
        assert!(l.mem.is_infinite());
        assert!(m.quota_limits("other").is_none());
    }

    fn launch(info: serde_json::Value, remaining: &Resources) -> Result<TaskLaunch, String> {
        launch_with(info, remaining, &crate::runtime::HostAccess::default())
    }

    fn launch_with(
        info: serde_json::Value,
        remaining: &Resources,
        host_access: &crate::runtime::HostAccess,
    ) -> Result<TaskLaunch, String> {
        let info: crate::mesos::TaskInfo = serde_json::from_value(info).unwrap();
        let cx = LaunchContext {
            framework: &fw("f1"),
            agent: &crate::model::AgentId::from("a1"),
            hostname: "h1",
            remaining,
            host_access,
            now: 5,
        };
        task_launch(&info, &cx)
    }

    #[test]
    fn host_paths_and_cap_add_need_the_operator_s_leave() {
        let r = Resources::scalars(1.0, 128.0, 0.0);
        let info = |host_path: &str, cap: &str| {
            serde_json::json!({"name": "t", "task_id": {"value": "t1"}, "agent_id": {"value": "a1"},
                "resources": [{"name": "cpus", "type": "SCALAR", "scalar": {"value": 0.1}}],
                "container": {"type": "DOCKER", "docker": {"image": "i", "parameters": [{"key": "cap-add", "value": cap}]},
                    "volumes": [{"container_path": "/h", "host_path": host_path, "mode": "RW"}]}})
        };
        let e = launch(info("/", "CHOWN"), &r).unwrap_err();
        assert!(e.contains("--allowed-cap-add"), "{e}");
        let caps = crate::runtime::HostAccess { cap_add: vec!["ALL".into()], ..Default::default() };
        let e = launch_with(info("/", "CHOWN"), &r, &caps).unwrap_err();
        assert!(e.contains("--allowed-host-path"), "{e}");
        let access = crate::runtime::HostAccess { host_paths: vec!["/srv".into()], ..Default::default() };
        let e = launch_with(info("/srv/x", "SYS_ADMIN"), &r, &access).unwrap_err();
        assert!(e.contains("--allowed-cap-add"), "{e}");
        let access = crate::runtime::HostAccess { cap_add: vec!["SYS_ADMIN".into()], ..access };
        assert!(launch_with(info("/srv/../etc", "SYS_ADMIN"), &r, &access).is_err());
        assert!(launch_with(info("/srv/x", "SYS_ADMIN"), &r, &access).is_ok());
    }

    #[test]
    fn task_infos_become_tasks_and_specs() {
        use crate::model::PortRanges;
        use crate::runtime::Command as Run;
        use serde_json::json;
        let offer = Resources { ports: PortRanges::range(31000, 31009), ..Resources::scalars(2.0, 1024.0, 0.0) };
        let res = json!([{"name":"cpus","type":"SCALAR","scalar":{"value":0.5}},{"name":"mem","type":"SCALAR","scalar":{"value":64}},
                         {"name":"ports","type":"RANGES","ranges":{"range":[{"begin":31002,"end":31003}]}}]);
        let l = launch(
            json!({"name":"job-1","task_id":{"value":"job-1"},"agent_id":{"value":"a1"},"resources":res,
                   "command":{"value":"echo $X","environment":{"variables":[{"name":"X","value":"1"}]}},
                   "kill_policy":{"grace_period":{"nanoseconds":2000000000}},"labels":{"labels":[{"key":"k","value":"v"}]}}),
            &offer,
        )
        .unwrap();
        assert_eq!(l.name, "job-1");
        assert_eq!(l.spec.command, Run::Shell("echo $X".into()));
        assert_eq!(l.spec.env["X"], "1");
        assert_eq!(l.spec.env["MESOS_TASK_ID"], "job-1");
        assert_eq!(l.spec.ports, vec![31002, 31003]);
        assert_eq!(l.spec.kill_grace, std::time::Duration::from_secs(2));
        assert_eq!(l.spec.labels["k"], "v");
        assert_eq!((l.task.resources.cpus, l.task.framework_id.0.as_str()), (0.5, "f1"));
        // non-shell: value is the executable, arguments are argv (argv[0] included)
        let l = launch(
            json!({"name":"n","task_id":{"value":"t2"},"agent_id":{"value":"a1"},"resources":res,
                   "command":{"shell":false,"value":"/bin/echo","arguments":["echo","a","b"]}}),
            &offer,
        )
        .unwrap();
        assert_eq!(l.spec.command, Run::Args(vec!["/bin/echo".into(), "a".into(), "b".into()]));
        // docker, bridge, mapped port among the task's ports
        let l = launch(
            json!({"name":"d","task_id":{"value":"t3"},"agent_id":{"value":"a1"},"resources":res,
                   "container":{"type":"DOCKER","docker":{"image":"busybox","network":"BRIDGE",
                   "port_mappings":[{"host_port":31002,"container_port":80}]}}}),
            &offer,
        )
        .unwrap();
        let c = l.spec.container.unwrap();
        assert_eq!(
            (c.image.as_str(), c.port_mappings[0].host_port, c.port_mappings[0].container_port),
            ("busybox", 31002, 80)
        );
        assert_eq!(l.spec.command, Run::Args(vec![]));
    }

    #[test]
    fn invalid_task_infos_are_refused_with_mesos_messages() {
        use serde_json::json;
        let offer = Resources::scalars(1.0, 128.0, 0.0);
        let res = json!([{"name":"cpus","type":"SCALAR","scalar":{"value":0.5}}]);
        let base = |extra: serde_json::Value| {
            let mut v = json!({"name":"n","task_id":{"value":"t"},"agent_id":{"value":"a1"},"resources":res,"command":{"value":"true"}});
            for (k, x) in extra.as_object().unwrap() {
                v[k] = x.clone();
            }
            v
        };
        let cases = [
            (
                base(json!({"resources":[{"name":"cpus","type":"SCALAR","scalar":{"value":2}}]})),
                "Task uses more resources",
            ),
            (base(json!({"task_id":{"value":"a/b"}})), "contains invalid characters"),
            (base(json!({"agent_id":{"value":"other"}})), "Task uses invalid agent"),
            (base(json!({"executor":{"executor_id":{"value":"e"}}})), "Custom executors"),
            (base(json!({"command":{"value":"x","uris":[{"value":"http://x"}]}})), "command.uris"),
            (base(json!({"command":null})), "neither a command nor a container"),
            (base(json!({"resources":[]})), "uses no resources"),
            (base(json!({"resources":[{"name":"gpus","type":"SCALAR","scalar":{"value":1}}]})), "not offered"),
            (base(json!({"container":{"type":"DOCKER","docker":{"image":"x","privileged":true}}})), "Privileged"),
            (
                base(
                    json!({"container":{"type":"DOCKER","docker":{"image":"x","network":"BRIDGE","port_mappings":[{"host_port":31000,"container_port":80}]}}}),
                ),
                "not among the task's port resources",
            ),
            (
                base(
                    json!({"container":{"type":"DOCKER","docker":{"image":"x","parameters":[{"key":"pid","value":"host"}]}}}),
                ),
                "not supported",
            ),
        ];
        for (info, want) in cases {
            let err = launch(info.clone(), &offer).unwrap_err();
            assert!(err.contains(want), "{info}: {err}");
        }
    }
}
