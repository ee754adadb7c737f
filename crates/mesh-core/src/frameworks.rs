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
}
