//! The agent: runs tasks through a [`Runtime`] on behalf of the control side and reports what
//! happens to them. It speaks only [`ToAgent`] / [`ToControl`] messages, so the same loop works
//! in-process (`mesh dev`) and over the network.

use crate::control::{ControlHandle, ControlMsg};
use crate::health::HealthRunner;
use mesh_core::model::{AgentId, Resources, TaskId};
use mesh_core::proto::{StatusUpdate, TaskState, ToAgent, ToControl};
use mesh_core::runtime::{Exit, Runtime, RuntimeError, RuntimeEvent, TaskSpec};
use std::collections::{BTreeMap, VecDeque};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tracing::{info, warn};

/// Settings of an agent.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// Agent id (node name).
    pub id: AgentId,
    /// Host name reported to frameworks (`HOST`).
    pub hostname: String,
    /// Address tasks are reached on.
    pub address: IpAddr,
    /// The address other datacenters reach it at, if it differs (`--advertise-wan`).
    pub wan_address: Option<IpAddr>,
    /// Resources offered.
    pub resources: Resources,
    /// Attributes for constraints.
    pub attributes: BTreeMap<String, String>,
    /// Runtimes offered (`process`, `docker`).
    pub runtimes: Vec<String>,
    /// Whether Consul script and docker checks may run (`--enable-script-checks`).
    pub enable_script_checks: bool,
    /// The agent's clock and id source (its timestamps are data for the server, which decides
    /// every deadline by its own clock).
    pub clock: std::sync::Arc<dyn mesh_core::model::Clock>,
}

/// A running agent.
pub struct AgentHandle {
    stop: tokio::sync::oneshot::Sender<StopMode>,
    join: tokio::task::JoinHandle<()>,
}

/// How an agent stops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopMode {
    /// Kill every task (reported to the control side as KILLED) and wait for them.
    KillTasks,
    /// Leave tasks running, to be re-adopted by the next agent on the same data dir.
    LeaveTasks,
}

impl AgentHandle {
    /// Stop the agent.
    pub async fn stop(self, mode: StopMode) {
        let _ = self.stop.send(mode);
        let _ = self.join.await;
    }
}

fn update(
    clock: &dyn mesh_core::model::Clock,
    agent: &AgentId,
    task_id: TaskId,
    state: TaskState,
    message: String,
    at: u64,
) -> ToControl {
    ToControl::Status(StatusUpdate {
        uuid: clock.uuid().to_string(),
        task_id,
        agent_id: agent.clone(),
        state,
        message,
        at,
    })
}

fn event_to_update(clock: &dyn mesh_core::model::Clock, agent: &AgentId, ev: RuntimeEvent) -> ToControl {
    match ev {
        RuntimeEvent::Started { task_id, at } => update(clock, agent, task_id, TaskState::Running, String::new(), at),
        RuntimeEvent::Exited { task_id, exit, killed, message, at } => {
            let state = if killed {
                TaskState::Killed
            } else {
                match exit {
                    Exit::Code(0) => TaskState::Finished,
                    Exit::Unknown => TaskState::Failed,
                    _ => TaskState::Failed,
                }
            };
            update(clock, agent, task_id, state, message, at)
        }
        RuntimeEvent::Failed { task_id, message, at } => update(clock, agent, task_id, TaskState::Failed, message, at),
    }
}

fn register(cfg: &AgentConfig, running: Vec<TaskId>) -> ToControl {
    ToControl::Register {
        agent_id: cfg.id.clone(),
        hostname: cfg.hostname.clone(),
        address: cfg.address,
        resources: cfg.resources.clone(),
        attributes: cfg.attributes.clone(),
        running,
        runtimes: cfg.runtimes.clone(),
        wan_address: cfg.wan_address,
    }
}

/// Start an agent: recover tasks of a previous run, register with the control side, then
/// serve launch/kill messages and forward runtime events as status updates.
pub async fn start(
    cfg: AgentConfig,
    runtime: Arc<dyn Runtime>,
    mut events: mpsc::Receiver<RuntimeEvent>,
    control: ControlHandle,
) -> Result<AgentHandle, mesh_core::runtime::RuntimeError> {
    let recovered = runtime.recover().await?;
    info!(agent = %cfg.id, runtime = runtime.name(), recovered = recovered.len(), "agent starting");
    let (to_agent_tx, mut to_agent) = mpsc::channel::<ToAgent>(1024);
    let _ = control.send(ControlMsg::AgentConnected(cfg.id.clone(), to_agent_tx)).await;
    let _ = control
        .send(ControlMsg::FromAgent(register(&cfg, recovered.iter().map(|r| r.task_id.clone()).collect())))
        .await;
    // The agent may have died before a task's RUNNING reached the control side (it would stay
    // STAGING forever, and its deployment with it): say again that every re-adopted task runs,
    // as a Mesos agent re-sends its tasks' latest status when it re-registers.
    for r in &recovered {
        let msg = "running (re-adopted after an agent restart)".to_owned();
        let up = update(cfg.clock.as_ref(), &cfg.id, r.task_id.clone(), TaskState::Running, msg, cfg.clock.now());
        let _ = control.send(ControlMsg::FromAgent(up)).await;
    }
    let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<StopMode>();
    let health = HealthRunner::new(cfg.address, control.clone(), cfg.clock.clone());
    let consul_checks = crate::checks::CheckRunner::new(
        cfg.id.clone(),
        control.clone(),
        crate::checks::Scripts::new(cfg.enable_script_checks),
    );
    let mut agent = AgentLoop {
        cfg: cfg.clone(),
        id: cfg.id.clone(),
        runtime,
        control,
        health,
        consul_checks,
        inflight: tokio::task::JoinSet::new(),
        launching: BTreeMap::new(),
        queued: VecDeque::new(),
    };
    let join = tokio::spawn(async move {
        let mode = loop {
            tokio::select! {
                mode = &mut stop_rx => break mode.unwrap_or(StopMode::LeaveTasks),
                msg = to_agent.recv() => match msg {
                    Some(msg) => agent.on_message(msg).await,
                    None => break StopMode::LeaveTasks,
                },
                Some(done) = agent.inflight.join_next(), if !agent.inflight.is_empty() => {
                    if let Ok((task_id, result)) = done {
                        agent.launched(task_id, result).await;
                    }
                }
                ev = events.recv() => match ev {
                    Some(ev) => agent.on_event(ev).await,
                    None => break StopMode::LeaveTasks,
                },
            }
        };
        agent.stop(mode, &mut events).await;
    });
    Ok(AgentHandle { stop: stop_tx, join })
}

/// At most this many launches run at once: a deploy of 1,000 instances starts them as fast as
/// the runtime allows (Docker creates overlap; process spawns use both cores), without 1,000
/// forks or Docker requests at the same instant.
const LAUNCH_PARALLELISM: usize = 32;

/// The longest grace a shutdown gives a task (Marathon's `taskKillGracePeriodSeconds` is capped
/// at the same value); each task gets its own.
const MAX_SHUTDOWN_GRACE: Duration = Duration::from_secs(3600);

/// What arrived for a task while its launch was under way; done once the launch returns.
enum Deferred {
    Kill(Duration),
    Checks(Vec<mesh_core::health::CheckSpec>, u64),
}

/// The agent's message loop and what it keeps between messages.
struct AgentLoop {
    cfg: AgentConfig,
    id: AgentId,
    runtime: Arc<dyn Runtime>,
    control: ControlHandle,
    health: HealthRunner,
    consul_checks: crate::checks::CheckRunner,
    /// Launches under way (at most [`LAUNCH_PARALLELISM`]).
    inflight: tokio::task::JoinSet<(TaskId, Result<(), RuntimeError>)>,
    /// Tasks being launched (in flight or queued), with what must happen once they are.
    launching: BTreeMap<TaskId, Vec<Deferred>>,
    /// Launches waiting for a free slot, in the order they came.
    queued: VecDeque<TaskSpec>,
}

impl AgentLoop {
    /// A status update of `task_id`, dated and numbered by the agent's clock.
    fn status(&self, task_id: TaskId, state: TaskState, message: String) -> ToControl {
        update(self.cfg.clock.as_ref(), &self.id, task_id, state, message, self.cfg.clock.now())
    }

    async fn report(&self, msg: ToControl) {
        let _ = self.control.send(ControlMsg::FromAgent(msg)).await;
    }

    async fn on_message(&mut self, msg: ToAgent) {
        match msg {
            ToAgent::Launch(spec) => {
                if self.launching.contains_key(&spec.task_id) || self.runtime.is_running(&spec.task_id) {
                    return; // a re-sent launch
                }
                self.launching.insert(spec.task_id.clone(), Vec::new());
                self.queued.push_back(spec);
                self.start_queued();
            }
            ToAgent::Kill { task_id, grace } => {
                if let Some(deferred) = self.launching.get_mut(&task_id) {
                    if let Some(i) = self.queued.iter().position(|s| s.task_id == task_id) {
                        // Not started yet: it never will be.
                        self.queued.remove(i);
                        self.launching.remove(&task_id);
                        let msg = "killed before it was launched".to_owned();
                        self.report(self.status(task_id, TaskState::Killed, msg)).await;
                    } else {
                        deferred.push(Deferred::Kill(grace));
                    }
                    return;
                }
                if !self.runtime.is_running(&task_id) {
                    // Nothing to kill: say so, so the control side does not wait forever.
                    let msg = "task is not running on this agent".to_owned();
                    self.report(self.status(task_id, TaskState::Killed, msg)).await;
                    return;
                }
                if let Err(e) = self.runtime.kill(&task_id, grace).await {
                    warn!(task = %task_id, error = %e, "kill failed");
                }
            }
            ToAgent::Checks { task_id, checks, started_at } => {
                if let Some(deferred) = self.launching.get_mut(&task_id) {
                    deferred.push(Deferred::Checks(checks, started_at));
                } else if self.runtime.is_running(&task_id) {
                    self.health.watch(task_id, checks, started_at);
                }
            }
            ToAgent::NodeChecks { checks } => self.consul_checks.set(checks),
            ToAgent::Reregister => {
                // Tasks being launched count as running: their RUNNING (or FAILED) follows.
                let mut running = self.runtime.running();
                running.extend(self.launching.keys().filter(|t| !running.contains(t)).cloned().collect::<Vec<_>>());
                self.report(register(&self.cfg, running)).await;
            }
            ToAgent::Reconcile { expected } => {
                let running = self.runtime.running();
                for t in running.iter().filter(|t| !expected.contains(t)) {
                    let _ = self.runtime.kill(t, Duration::from_secs(3)).await;
                }
                let missing: Vec<TaskId> =
                    expected.into_iter().filter(|t| !running.contains(t) && !self.launching.contains_key(t)).collect();
                for t in missing {
                    let msg = "not running on its agent".to_owned();
                    self.report(self.status(t, TaskState::Lost, msg)).await;
                }
            }
        }
    }

    /// Starts queued launches while there is a free slot.
    fn start_queued(&mut self) {
        while self.inflight.len() < LAUNCH_PARALLELISM {
            let Some(spec) = self.queued.pop_front() else { break };
            let runtime = self.runtime.clone();
            self.inflight.spawn(async move {
                let task_id = spec.task_id.clone();
                let result = runtime.launch(spec).await;
                (task_id, result)
            });
        }
    }

    /// A launch returned: report a failure, then do what waited for it.
    async fn launched(&mut self, task_id: TaskId, result: Result<(), RuntimeError>) {
        let deferred = self.launching.remove(&task_id).unwrap_or_default();
        self.start_queued();
        if let Err(e) = result {
            warn!(task = %task_id, error = %e, "launch failed");
            // The runtime may also report Failed; make sure the control side hears it, with the
            // runtime's own words (a repeat is ignored).
            let message = match e {
                RuntimeError::Launch { message, .. } => message,
                e => e.to_string(),
            };
            self.report(self.status(task_id, TaskState::Failed, message)).await;
            return;
        }
        for d in deferred {
            match d {
                Deferred::Kill(grace) => {
                    if let Err(e) = self.runtime.kill(&task_id, grace).await {
                        warn!(task = %task_id, error = %e, "kill failed");
                    }
                }
                Deferred::Checks(checks, started_at) => {
                    if self.runtime.is_running(&task_id) {
                        self.health.watch(task_id.clone(), checks, started_at);
                    }
                }
            }
        }
    }

    async fn on_event(&mut self, ev: RuntimeEvent) {
        if let RuntimeEvent::Exited { task_id, .. } | RuntimeEvent::Failed { task_id, .. } = &ev {
            self.health.unwatch(task_id);
        }
        self.report(event_to_update(self.cfg.clock.as_ref(), &self.id, ev)).await;
    }

    /// Stops the agent: with [`StopMode::KillTasks`], every task at once, each with its own
    /// grace, forwarding their ends so the state records them as KILLED.
    async fn stop(mut self, mode: StopMode, events: &mut mpsc::Receiver<RuntimeEvent>) {
        // Launches not started are dropped; those under way finish first, so none is left
        // running untracked.
        self.queued.clear();
        while let Some(done) = self.inflight.join_next().await {
            if let Ok((task_id, result)) = done {
                self.launched(task_id, result).await;
            }
        }
        if mode != StopMode::KillTasks {
            // Back soon (a restart or an upgrade): the server keeps the tasks as they are.
            self.report(ToControl::Goodbye { agent_id: self.id.clone(), keep_tasks: true }).await;
            return;
        }
        let running = self.runtime.running().len();
        info!(tasks = running, "stopping tasks");
        let runtime = self.runtime.clone();
        let kill = runtime.kill_all(MAX_SHUTDOWN_GRACE);
        tokio::pin!(kill);
        loop {
            tokio::select! {
                _ = &mut kill => break,
                Some(ev) = events.recv() => self.report(event_to_update(self.cfg.clock.as_ref(), &self.id, ev)).await,
            }
        }
        while let Ok(ev) = events.try_recv() {
            self.report(event_to_update(self.cfg.clock.as_ref(), &self.id, ev)).await;
        }
        self.report(ToControl::Goodbye { agent_id: self.id.clone(), keep_tasks: false }).await;
    }
}
