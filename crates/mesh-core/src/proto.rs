//! Messages between the control side (allocator, scheduler, catalog) and agents (runtime).
//!
//! They are plain serializable values: `mesh dev` passes them over an in-memory channel, a
//! cluster sends the same messages over the network. Every message is idempotent: a status
//! update carries an id, a launch of a task the agent already runs is ignored, and agents
//! reconcile their actual tasks against the control side's view.

use crate::model::{AgentId, Millis, Resources, TaskId};
use crate::runtime::TaskSpec;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

/// Mesos task states (the subset mesh uses).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum TaskState {
    /// Accepted by the scheduler, sent to the agent.
    #[serde(rename = "TASK_STAGING")]
    Staging,
    /// The agent is starting it.
    #[serde(rename = "TASK_STARTING")]
    Starting,
    /// Running.
    #[serde(rename = "TASK_RUNNING")]
    Running,
    /// Being killed.
    #[serde(rename = "TASK_KILLING")]
    Killing,
    /// Exited with status 0.
    #[serde(rename = "TASK_FINISHED")]
    Finished,
    /// Exited non-zero, or could not start.
    #[serde(rename = "TASK_FAILED")]
    Failed,
    /// Killed on request.
    #[serde(rename = "TASK_KILLED")]
    Killed,
    /// Lost (e.g. gone while the agent was down).
    #[serde(rename = "TASK_LOST")]
    Lost,
    /// Invalid task description.
    #[serde(rename = "TASK_ERROR")]
    Error,
    /// Its agent is unreachable: it may still run. Not terminal: it runs again when the agent
    /// comes back, or is replaced (and later expunged) by its app's `unreachableStrategy`.
    #[serde(rename = "TASK_UNREACHABLE")]
    Unreachable,
}

impl TaskState {
    /// Whether the task has ended for good.
    pub fn is_terminal(self) -> bool {
        matches!(self, TaskState::Finished | TaskState::Failed | TaskState::Killed | TaskState::Lost | TaskState::Error)
    }
    /// The Mesos name, e.g. `TASK_RUNNING`.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Staging => "TASK_STAGING",
            TaskState::Starting => "TASK_STARTING",
            TaskState::Running => "TASK_RUNNING",
            TaskState::Killing => "TASK_KILLING",
            TaskState::Finished => "TASK_FINISHED",
            TaskState::Failed => "TASK_FAILED",
            TaskState::Killed => "TASK_KILLED",
            TaskState::Lost => "TASK_LOST",
            TaskState::Error => "TASK_ERROR",
            TaskState::Unreachable => "TASK_UNREACHABLE",
        }
    }

    /// Whether a task may go from this state to `next`: states only move forward (a re-sent or
    /// late update never takes a task back), except that a task whose agent was unreachable
    /// runs again when it comes back. Terminal states are final.
    pub fn can_become(self, next: TaskState) -> bool {
        use TaskState::*;
        let rank = |s: TaskState| match s {
            Staging => 0,
            Starting => 1,
            Running | Unreachable => 2,
            Killing => 3,
            _ => 4,
        };
        if self.is_terminal() {
            return false;
        }
        match (self, next) {
            (Unreachable, Running | Killing) => true,
            (Killing, Unreachable) => true,
            (_, Unreachable) => true,
            (a, b) => rank(b) >= rank(a),
        }
    }
}

/// Control → agent.
// `Launch` carries a whole `TaskSpec` inline: messages are built once and moved through a
// channel or serialized, so the enum's size costs nothing worth a box at every match.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ToAgent {
    /// Start this task (ignored when the agent already runs it).
    Launch(TaskSpec),
    /// Stop this task (SIGTERM, then SIGKILL after `grace`).
    Kill {
        /// Which task.
        task_id: TaskId,
        /// Time between SIGTERM and SIGKILL.
        grace: Duration,
    },
    /// Health checks to run for a task (sent after its launch, and again when an agent
    /// re-registers with the task still running).
    Checks {
        /// Which task.
        task_id: TaskId,
        /// The checks, ports resolved.
        checks: Vec<crate::health::CheckSpec>,
        /// When the task started (grace periods count from here).
        started_at: Millis,
    },
    /// The complete set of Consul checks the agent must run for its node (HTTP, TCP, script), with
    /// their current status. Level-triggered: checks not listed stop.
    NodeChecks {
        /// The checks.
        checks: Vec<crate::catalog::Check>,
    },
    /// The tasks the control side believes run on this agent. The agent kills any other task it
    /// runs, and reports `TASK_LOST` for listed tasks it does not run.
    Reconcile {
        /// Tasks the control side expects.
        expected: Vec<TaskId>,
    },
    /// Register again (`ToControl::Register` with the tasks running now): sent when the agent's
    /// connection to a server is new, so the server reconciles with what really runs.
    Reregister,
}

/// A task status change, as reported by an agent.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StatusUpdate {
    /// Unique id of this update, so a re-send is harmless.
    pub uuid: String,
    /// Which task.
    pub task_id: TaskId,
    /// Reporting agent.
    pub agent_id: AgentId,
    /// New state.
    pub state: TaskState,
    /// Human-readable detail (exit status, error).
    pub message: String,
    /// When it happened.
    pub at: Millis,
}

/// Agent → control.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ToControl {
    /// The agent is up and offers these resources.
    Register {
        /// Agent id (its node name).
        agent_id: AgentId,
        /// Host name.
        hostname: String,
        /// Address the agent's tasks are reached on.
        address: IpAddr,
        /// Total resources for tasks.
        resources: Resources,
        /// Attributes, for constraints.
        attributes: BTreeMap<String, String>,
        /// Tasks the agent found running after a restart.
        running: Vec<TaskId>,
        /// Runtimes the agent offers (`process`, `docker`).
        #[serde(default)]
        runtimes: Vec<String>,
        /// The address other datacenters reach it at (`--advertise-wan`), if it differs.
        #[serde(default)]
        wan_address: Option<IpAddr>,
    },
    /// A task changed state.
    Status(StatusUpdate),
    /// The agent is stopping. `keep_tasks`: its tasks keep running and it will be back (a
    /// restart or upgrade): the server keeps them as they are for its re-register timeout.
    /// Otherwise it stopped its tasks and leaves the cluster.
    Goodbye {
        /// The agent.
        agent_id: AgentId,
        /// Whether its tasks keep running.
        keep_tasks: bool,
    },
    /// The result of one health check of a task changed (or a counted failure happened).
    Health {
        /// Which task.
        task_id: TaskId,
        /// Index of the check in the app's `healthChecks`.
        check: usize,
        /// The check's result.
        result: crate::health::CheckResult,
    },
    /// Results of Consul checks the agent runs whose status (after thresholds) or output changed.
    CheckResults {
        /// Reporting agent (the checks' node).
        agent_id: AgentId,
        /// `(check id, status, output)`.
        results: Vec<(String, crate::catalog::Health, String)>,
    },
    /// The complete set of service instances that one source on an agent (e.g. `registrator`)
    /// currently provides. Level-triggered: it replaces that source's previous set, so a lost or
    /// repeated message is harmless and a resync leaves nothing stale.
    Services {
        /// Reporting agent (the catalog node of the instances).
        agent_id: AgentId,
        /// Which part of the agent provides them.
        source: String,
        /// The instances (their `node` is set to the agent).
        instances: Vec<crate::catalog::ServiceInstance>,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::Command;

    #[test]
    fn messages_survive_a_round_trip_through_json() {
        let spec = TaskSpec {
            task_id: TaskId::from("web.instance-1._app.1"),
            command: Command::Shell("python3 -m http.server $PORT0".into()),
            env: BTreeMap::from([("PORT0".into(), "31000".into())]),
            cpus: 0.1,
            mem: 64.0,
            disk: 0.0,
            ports: vec![31000],
            kill_grace: Duration::from_secs(3),
            labels: BTreeMap::new(),
            container: None,
        };
        let msgs = vec![
            ToAgent::Launch(spec),
            ToAgent::Kill { task_id: TaskId::from("t"), grace: Duration::from_millis(1500) },
            ToAgent::Reconcile { expected: vec![TaskId::from("t")] },
        ];
        for m in msgs {
            let back: ToAgent = serde_json::from_str(&serde_json::to_string(&m).unwrap()).unwrap();
            assert_eq!(back, m);
        }
        let up = ToControl::Status(StatusUpdate {
            uuid: "u".into(),
            task_id: TaskId::from("t"),
            agent_id: AgentId::from("n1"),
            state: TaskState::Running,
            message: String::new(),
            at: 1,
        });
        let json = serde_json::to_string(&up).unwrap();
        assert!(json.contains("TASK_RUNNING"), "{json}");
        assert_eq!(serde_json::from_str::<ToControl>(&json).unwrap(), up);
    }
}
