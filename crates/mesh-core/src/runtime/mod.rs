//! Runtimes launch, kill and observe tasks on an agent.
//!
//! A runtime reports what happens to its tasks as [`RuntimeEvent`]s on the channel it was built
//! with; the agent turns them into status updates for the control side.

use crate::model::{Millis, TaskId};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Duration;

pub mod disk;
pub mod docker;
pub mod gc;
pub mod logger;
pub mod memory;
pub mod multi;
pub mod process;

/// What to run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Command {
    /// Run through `/bin/sh -c`.
    Shell(String),
    /// Run `argv[0]` directly with the rest as arguments.
    Args(Vec<String>),
}

/// Everything a runtime needs to start one task.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskSpec {
    /// The task's id; also names its sandbox.
    pub task_id: TaskId,
    /// The command.
    pub command: Command,
    /// Environment, including the Marathon variables (`PORT0`, `MESOS_TASK_ID`, ...).
    pub env: BTreeMap<String, String>,
    /// CPU shares; enforced where the host allows.
    pub cpus: f64,
    /// Memory limit in MiB; enforced where the host allows.
    pub mem: f64,
    /// Disk limit of the sandbox in MiB (0 = none); measured and enforced where the runtime can.
    #[serde(default)]
    pub disk: f64,
    /// Host ports assigned to the task.
    pub ports: Vec<u16>,
    /// Time between SIGTERM and SIGKILL.
    pub kill_grace: Duration,
    /// Free-form labels (app id, version) kept with the task, e.g. for re-adoption.
    pub labels: BTreeMap<String, String>,
    /// A container to run the command in; `None` runs a plain process.
    #[serde(default)]
    pub container: Option<ContainerSpec>,
}

/// Container networking.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum NetworkMode {
    /// The host's network namespace (`host`).
    Host,
    /// Docker's bridge with published ports (`container/bridge`, 1.4's `BRIDGE`).
    Bridge,
    /// No network.
    None,
}

/// One published port of a bridged container.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortMapping {
    /// Port inside the container.
    pub container_port: u16,
    /// Port on the host (assigned from the agent's range; never 0 here).
    pub host_port: u16,
    /// `tcp`, `udp` or `udp,tcp`.
    pub protocol: String,
}

/// A bind mount.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Volume {
    /// Path inside the container.
    pub container_path: String,
    /// Path on the host.
    pub host_path: String,
    /// Read-only.
    pub read_only: bool,
}

/// How to run a task in a container.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ContainerSpec {
    /// Image reference.
    pub image: String,
    /// Networking.
    pub network: NetworkMode,
    /// Published ports (bridge mode).
    pub port_mappings: Vec<PortMapping>,
    /// Bind mounts.
    pub volumes: Vec<Volume>,
    /// `docker.parameters` that passed the allow-list (key, value), in order.
    pub parameters: Vec<(String, String)>,
    /// Run privileged (only when the node allows it).
    pub privileged: bool,
    /// Pull the image even when it is present.
    pub force_pull: bool,
}

/// How a task ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Exit {
    /// Exited with this code.
    Code(i32),
    /// Killed by this signal.
    Signal(i32),
    /// Ended, but its status is not known (e.g. it was adopted after a restart and was not our child).
    Unknown,
}

/// What a runtime observed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum RuntimeEvent {
    /// The task is running.
    Started {
        /// Which task.
        task_id: TaskId,
        /// When it was observed.
        at: Millis,
    },
    /// The task has ended. `killed` is true when the end was asked for through [`Runtime::kill`].
    Exited {
        /// Which task.
        task_id: TaskId,
        /// How it ended.
        exit: Exit,
        /// Whether mesh asked for it to end.
        killed: bool,
        /// A human-readable message for `lastTaskFailure`.
        message: String,
        /// When it was observed.
        at: Millis,
    },
    /// The task could not be started at all.
    Failed {
        /// Which task.
        task_id: TaskId,
        /// Why.
        message: String,
        /// When it was observed.
        at: Millis,
    },
}

/// A task found running by [`Runtime::recover`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RecoveredTask {
    /// The task's id.
    pub task_id: TaskId,
    /// The labels it was launched with.
    pub labels: BTreeMap<String, String>,
    /// Its ports.
    pub ports: Vec<u16>,
}

/// Errors of a runtime.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RuntimeError {
    /// The task is not known to this runtime.
    #[error("task {0} is not known to this runtime")]
    UnknownTask(TaskId),
    /// Starting the task failed.
    #[error("could not start task {task}: {message}")]
    Launch {
        /// Which task.
        task: TaskId,
        /// Why.
        message: String,
    },
    /// An I/O error in the runtime's own bookkeeping.
    #[error("runtime I/O: {0}")]
    Io(#[from] std::io::Error),
}

/// Launch, kill and observe tasks.
#[async_trait::async_trait]
pub trait Runtime: Send + Sync + 'static {
    /// A short name (`process`, `docker`).
    fn name(&self) -> &'static str;
    /// Start a task. Returns once it has been started (or failed to start); its end is reported
    /// later as [`RuntimeEvent::Exited`].
    async fn launch(&self, spec: TaskSpec) -> Result<(), RuntimeError>;
    /// Stop a task: SIGTERM (or the runtime's equivalent), SIGKILL after `grace`. Returns at once;
    /// the end is reported as [`RuntimeEvent::Exited`] with `killed: true`. Killing a task that
    /// already ended is not an error.
    async fn kill(&self, task_id: &TaskId, grace: Duration) -> Result<(), RuntimeError>;
    /// After a restart: find the tasks of a previous run that still run, and watch them again.
    /// Tasks whose process is gone are cleaned up and not returned.
    async fn recover(&self) -> Result<Vec<RecoveredTask>, RuntimeError>;
    /// The tasks this runtime currently watches.
    fn running(&self) -> Vec<TaskId>;
    /// Whether this runtime watches `task_id` (what `running().contains(..)` says, without
    /// listing every task: the agent asks on every message).
    fn is_running(&self, task_id: &TaskId) -> bool {
        self.running().contains(task_id)
    }
    /// Stop every task at once (used on a clean shutdown that should leave nothing behind): each
    /// gets its own grace period, at most `grace`, so the wait is the longest of them plus a
    /// small margin, however many tasks there are.
    async fn kill_all(&self, grace: Duration);
}

/// What containers may reach of the host, as the operator allows it (`--allow-privileged`,
/// `--allowed-host-path`, `--allowed-cap-add`). Nothing by default: a bind mount of `/` or an
/// added `SYS_ADMIN` is a way out of the container, so an API client cannot ask for one unless
/// the operator listed it. Checked where definitions come in (Marathon's 422, Mesos' TASK_ERROR).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HostAccess {
    /// Whether containers may run privileged (this also allows every `cap-add`).
    pub allow_privileged: bool,
    /// Absolute host paths under which volumes may be mounted (the path itself included).
    pub host_paths: Vec<std::path::PathBuf>,
    /// Capabilities that may be added (`NET_ADMIN`, without `CAP_`); `ALL` allows any.
    pub cap_add: Vec<String>,
}

/// A capability name as Docker takes it: upper case, without the `CAP_` prefix.
pub fn capability_name(cap: &str) -> String {
    let up = cap.trim().to_ascii_uppercase();
    up.strip_prefix("CAP_").map(str::to_owned).unwrap_or(up)
}

impl HostAccess {
    /// Whether a volume may mount `host_path`: it must be absolute, have no `..` components
    /// (which could climb out of a prefix), and lie under an allowed prefix.
    pub fn check_host_path(&self, host_path: &str) -> Result<(), String> {
        use std::path::{Component, Path};
        let p = Path::new(host_path);
        if !p.is_absolute() {
            return Err(format!("hostPath '{host_path}' must be an absolute path"));
        }
        if p.components().any(|c| c == Component::ParentDir) {
            return Err(format!("hostPath '{host_path}' must not contain '..' components"));
        }
        if self.host_paths.iter().any(|prefix| p.starts_with(prefix)) {
            return Ok(());
        }
        if self.host_paths.is_empty() {
            Err(format!(
                "host path '{host_path}' is not allowed: this node allows no host paths (start it with --allowed-host-path)"
            ))
        } else {
            let list: Vec<String> = self.host_paths.iter().map(|p| p.display().to_string()).collect();
            Err(format!(
                "host path '{host_path}' is not allowed: it must lie under one of {} (--allowed-host-path)",
                list.join(", ")
            ))
        }
    }

    /// Whether the capability `cap` may be added (`cap-add`).
    pub fn check_cap_add(&self, cap: &str) -> Result<(), String> {
        let name = capability_name(cap);
        if self.allow_privileged || self.cap_add.iter().any(|c| c == "ALL" || *c == name) {
            return Ok(());
        }
        Err(format!("adding capability '{name}' is not allowed on this node (start it with --allowed-cap-add {name})"))
    }
}

#[cfg(test)]
mod host_access_tests {
    use super::HostAccess;

    #[test]
    fn host_paths_need_a_listed_prefix_and_no_dot_components() {
        let none = HostAccess::default();
        assert!(none.check_host_path("/").is_err());
        assert!(none.check_host_path("/srv/data").is_err());
        let some = HostAccess { host_paths: vec!["/srv/data".into()], ..Default::default() };
        assert!(some.check_host_path("/srv/data").is_ok());
        assert!(some.check_host_path("/srv/data/x/y").is_ok());
        assert!(some.check_host_path("/srv/data/").is_ok());
        assert!(some.check_host_path("/srv/data/./x").is_ok());
        for bad in ["/srv/data/../../etc", "/srv/data/x/..", "/srv/database", "/srv", "/", "srv/data", ""] {
            assert!(some.check_host_path(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn cap_add_needs_a_listed_capability() {
        assert!(HostAccess::default().check_cap_add("NET_ADMIN").is_err());
        let some = HostAccess { cap_add: vec!["NET_ADMIN".into()], ..Default::default() };
        assert!(some.check_cap_add("net_admin").is_ok());
        assert!(some.check_cap_add("CAP_NET_ADMIN").is_ok());
        assert!(some.check_cap_add("SYS_ADMIN").is_err());
        assert!(some.check_cap_add("ALL").is_err());
        assert!(HostAccess { cap_add: vec!["ALL".into()], ..Default::default() }.check_cap_add("SYS_ADMIN").is_ok());
        assert!(HostAccess { allow_privileged: true, ..Default::default() }.check_cap_add("ALL").is_ok());
    }
}
