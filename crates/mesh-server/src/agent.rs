//! The agent: runs tasks through a [`Runtime`] on behalf of the control side and reports what
//! happens to them. It speaks only [`ToAgent`] / [`ToControl`] messages, so the same loop works
//! in-process (`mesh dev`) and over the network.

use crate::control::{ControlHandle, ControlMsg};
use crate::health::HealthRunner;
use mesh_core::model::{AgentId, Resources, TaskId, now_millis};
use mesh_core::proto::{StatusUpdate, TaskState, ToAgent, ToControl};
use mesh_core::runtime::{Exit, Runtime, RuntimeError, RuntimeEvent};
use std::collections::BTreeMap;
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
    /// Resources offered.
    pub resources: Resources,
    /// Attributes for constraints.
    pub attributes: BTreeMap<String, String>,
    /// Runtimes offered (`process`, `docker`).
    pub runtimes: Vec<String>,
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

fn update(agent: &AgentId, task_id: TaskId, state: TaskState, message: String, at: u64) -> ToControl {
    ToControl::Status(StatusUpdate {
        uuid: uuid::Uuid::new_v4().to_string(),
        task_id,
        agent_id: agent.clone(),
        state,
        message,
        at,
    })
}

fn event_to_update(agent: &AgentId, ev: RuntimeEvent) -> ToControl {
    match ev {
        RuntimeEvent::Started { task_id, at } => update(agent, task_id, TaskState::Running, String::new(), at),
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
            update(agent, task_id, state, message, at)
        }
        RuntimeEvent::Failed { task_id, message, at } => update(agent, task_id, TaskState::Failed, message, at),
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
        .send(ControlMsg::FromAgent(ToControl::Register {
            agent_id: cfg.id.clone(),
            hostname: cfg.hostname.clone(),
            address: cfg.address,
            resources: cfg.resources.clone(),
            attributes: cfg.attributes.clone(),
            running: recovered.iter().map(|r| r.task_id.clone()).collect(),
            runtimes: cfg.runtimes.clone(),
        }))
        .await;
    // The agent may have died before a task's RUNNING reached the control side (it would stay
    // STAGING forever, and its deployment with it): say again that every re-adopted task runs,
    // as a Mesos agent re-sends its tasks' latest status when it re-registers.
    for r in &recovered {
        let msg = "running (re-adopted after an agent restart)".to_owned();
        let up = update(&cfg.id, r.task_id.clone(), TaskState::Running, msg, now_millis());
        let _ = control.send(ControlMsg::FromAgent(up)).await;
    }
    let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<StopMode>();
    let agent_id = cfg.id.clone();
    let mut health = HealthRunner::new(cfg.address, control.clone());
    let mut consul_checks = crate::checks::CheckRunner::new(cfg.id.clone(), control.clone());
    let join = tokio::spawn(async move {
        let mode = loop {
            tokio::select! {
                            mode = &mut stop_rx => break mode.unwrap_or(StopMode::LeaveTasks),
                            msg = to_agent.recv() => match msg {
                                Some(ToAgent::Launch(spec)) => {
                                    if runtime.running().contains(&spec.task_id) {
                                        continue; // a re-sent launch
                                    }
                                    let task_id = spec.task_id.clone();
            if let Err(e) = runtime.launch(spec).await {
                                        warn!(task = %task_id, error = %e, "launch failed");
                                        // The runtime may also report Failed; make sure the control side hears
                                        // it, with the runtime's own words (a repeat is ignored).
                                        let message = match e {
                                            RuntimeError::Launch { message, .. } => message,
                                            e => e.to_string(),
                                        };
                                        let _ = control.send(ControlMsg::FromAgent(update(&agent_id, task_id, TaskState::Failed, message, now_millis()))).await;
                                    }
                                }
                                Some(ToAgent::Kill { task_id, grace }) => {
                                    if !runtime.running().contains(&task_id) {
                                        // Nothing to kill: say so, so the control side does not wait forever.
                                        let msg = "task is not running on this agent".to_owned();
                                        let _ = control.send(ControlMsg::FromAgent(update(&agent_id, task_id, TaskState::Killed, msg, now_millis()))).await;
                                        continue;
                                    }
                                    if let Err(e) = runtime.kill(&task_id, grace).await {
                                        warn!(task = %task_id, error = %e, "kill failed");
                                    }
                                }
                                Some(ToAgent::Checks { task_id, checks, started_at }) => {
                                    if runtime.running().contains(&task_id) {
                                        health.watch(task_id, checks, started_at);
                                    }
                                }
                                Some(ToAgent::NodeChecks { checks }) => consul_checks.set(checks),
                                Some(ToAgent::Reconcile { expected }) => {
                                    let running = runtime.running();
                                    for t in running.iter().filter(|t| !expected.contains(t)) {
                                        let _ = runtime.kill(t, Duration::from_secs(3)).await;
                                    }
                                    for t in expected.into_iter().filter(|t| !running.contains(t)) {
                                        let _ = control.send(ControlMsg::FromAgent(update(&agent_id, t, TaskState::Lost, "not running on its agent".into(), now_millis()))).await;
                                    }
                                }
                                None => break StopMode::LeaveTasks,
                            },
                            ev = events.recv() => match ev {
                                Some(ev) => {
                                    if let RuntimeEvent::Exited { task_id, .. } | RuntimeEvent::Failed { task_id, .. } = &ev {
                                        health.unwatch(task_id);
                                    }
                                    let _ = control.send(ControlMsg::FromAgent(event_to_update(&agent_id, ev))).await;
                                }
                                None => break StopMode::LeaveTasks,
                            },
                        }
        };
        if mode == StopMode::KillTasks {
            let running = runtime.running().len();
            info!(tasks = running, "stopping tasks");
            let kill = runtime.kill_all(Duration::from_secs(10));
            tokio::pin!(kill);
            // Forward the exits while waiting, so the state records them as KILLED.
            loop {
                tokio::select! {
                    _ = &mut kill => break,
                    Some(ev) = events.recv() => { let _ = control.send(ControlMsg::FromAgent(event_to_update(&agent_id, ev))).await; }
                }
            }
            while let Ok(ev) = events.try_recv() {
                let _ = control.send(ControlMsg::FromAgent(event_to_update(&agent_id, ev))).await;
            }
        }
    });
    Ok(AgentHandle { stop: stop_tx, join })
}
