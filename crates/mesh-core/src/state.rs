//! Cluster state: every change is a [`Command`] applied by the pure [`State::apply`], and
//! recorded through the [`Log`] trait before it becomes visible.
//!
//! [`Store`] ties the two together: it applies a batch to a copy of the state (cheap: persistent
//! maps), appends the commands that applied to the log in one durable write (group commit), and
//! only then swaps the new state in. A command that fails validation changes nothing and is not
//! logged; a log that fails to write changes nothing either. On start, [`Store::open`] loads the
//! last snapshot and replays the log after it.
//!
//! When an append fails (a full disk, say), the store refuses ordinary commands until
//! [`Store::recover`] succeeds, while commands that stop work ([`Command::stops_work`]) go to
//! the log's reserve ([`Log::append_reserved`]), so a runaway app can still be stopped; either
//! way a command is visible (and acknowledged) only once durable.
//!
//! [`RedbLog`] is the embedded on-disk log, with a preallocated reserve file beside it. A Raft
//! log can implement the same trait later; the scheduler, catalog and APIs only see [`Store`].

use crate::app::{App, AppId};
use crate::catalog::{CatalogState, Check, Health, Node, SERF_HEALTH, ServiceInstance};
use crate::kv::{KvError, KvOp, KvState, SessionOp};
use crate::model::{AgentId, FrameworkId, Millis, Resources, TaskId, iso8601};
use crate::proto::TaskState;
use imbl::OrdMap;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;

mod requests;
mod wal;
pub use requests::{Applied, MAX_REQUEST_ID, MAX_REQUESTS, Requests, valid_request_id};
pub use wal::{SEGMENT_BYTES, WAL_DIR, WalLog};
pub use wal::{frames, put_frame};

/// Instance meta key naming the agent-side source that registered it (see [`Command::SyncServices`]).
pub const SOURCE_META: &str = "mesh-source";

/// How many versions of an app are kept by default (`--max-app-versions`).
pub const MAX_APP_VERSIONS: usize = 50;

/// The launch backoff of an app.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LaunchDelay {
    /// The current delay in milliseconds (0 = none).
    pub delay_ms: u64,
    /// No launch before this time.
    pub until: Millis,
}

/// Marathon's `lastTaskFailure`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskFailure {
    /// The failed task.
    pub task_id: TaskId,
    /// Its agent.
    pub agent_id: AgentId,
    /// Its host.
    pub host: String,
    /// Terminal state (`TASK_FAILED`, ...).
    pub state: TaskState,
    /// What happened.
    pub message: String,
    /// When.
    pub at: Millis,
    /// App version of the task.
    pub version: Millis,
}

/// An app with its history and launch state.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AppRecord {
    /// The current definition (its `version` field is set from `version`).
    pub app: App,
    /// Version (time of the last change).
    pub version: Millis,
    /// Time of the last config change (not scale).
    pub config_version: Millis,
    /// Kept versions, oldest first (bounded by [`MAX_APP_VERSIONS`]).
    pub versions: Vec<(Millis, App)>,
    /// Launch backoff.
    pub delay: LaunchDelay,
    /// The last failed task.
    pub last_failure: Option<TaskFailure>,
    /// The deployment that is bringing the app to its current definition, if any.
    pub deployment: Option<String>,
}

/// A task as the control side knows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Task {
    /// Id.
    pub id: TaskId,
    /// Framework that launched it.
    pub framework_id: FrameworkId,
    /// App (for Marathon tasks).
    pub app_id: Option<AppId>,
    /// Agent running it.
    pub agent_id: AgentId,
    /// Its host name.
    pub host: String,
    /// Host ports.
    pub ports: Vec<u16>,
    /// Service ports.
    pub service_ports: Vec<u16>,
    /// Current state.
    pub state: TaskState,
    /// When it was staged.
    pub staged_at: Millis,
    /// When it started running.
    pub started_at: Option<Millis>,
    /// App version (config version) the task runs.
    pub version: Millis,
    /// Resources it holds.
    pub resources: Resources,
    /// A kill was asked for.
    pub kill_requested: bool,
    /// Last status message.
    pub message: String,
    /// Results of the app's health checks, by check index (empty until the first report).
    #[serde(default)]
    pub health: Vec<crate::health::CheckResult>,
    /// Since when its agent is unreachable (state `TASK_UNREACHABLE`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unreachable_since: Option<Millis>,
    /// Unreachable for longer than its app's `inactiveAfterSeconds`: it no longer counts as an
    /// instance (a replacement is launched), but it is kept until expunged, and counts again if
    /// its agent comes back with it running (the surplus is then killed).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub inactive: bool,
}

impl Task {
    /// Whether it counts as one of its app's instances: not ended, not inactive.
    pub fn counts(&self) -> bool {
        !self.state.is_terminal() && !self.inactive
    }

    /// Whether every health check of the task reports it alive (false before the first result).
    pub fn checks_alive(&self, checks: usize) -> bool {
        self.health.len() >= checks && self.health.iter().take(checks).all(|r| r.alive)
    }
}

/// An agent.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Agent {
    /// Id (the node name).
    pub id: AgentId,
    /// Host name.
    pub hostname: String,
    /// Address of its tasks.
    pub address: IpAddr,
    /// Total resources.
    pub resources: Resources,
    /// Attributes.
    pub attributes: BTreeMap<String, String>,
    /// When it (re-)registered.
    pub registered_at: Millis,
    /// Runtimes it offers (`process`, `docker`).
    #[serde(default)]
    pub runtimes: Vec<String>,
    /// The address other datacenters reach it at (`--advertise-wan`): its node's
    /// `TaggedAddresses.wan`.
    #[serde(default)]
    pub wan_address: Option<IpAddr>,
}

/// One action of a deployment step.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeploymentAction {
    /// `StartApplication`, `ScaleApplication`, `RestartApplication`, `StopApplication`.
    pub action: String,
    /// The app.
    pub app: AppId,
}

/// A deployment: the steps that bring apps to a new definition.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Deployment {
    /// Id (uuid).
    pub id: String,
    /// Version (time it was created).
    pub version: Millis,
    /// Apps it touches.
    pub affected_apps: Vec<AppId>,
    /// Steps, run one after another; actions in a step run together.
    pub steps: Vec<Vec<DeploymentAction>>,
    /// 1-based index of the step in progress.
    pub current_step: usize,
    /// The definitions before the deployment (`None`: the app did not exist), for rollback.
    #[serde(default)]
    pub original: Vec<(AppId, Option<App>)>,
}

/// An explicitly created group (groups are also implied by app ids).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GroupRecord {
    /// Absolute id, e.g. `/prod`.
    pub id: String,
    /// Groups or apps this group depends on.
    pub dependencies: Vec<String>,
    /// Last change.
    pub version: Millis,
}

/// The whole cluster state. Cloning it is O(1).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct State {
    /// Index of the last applied command.
    pub index: u64,
    /// Apps by id.
    pub apps: OrdMap<AppId, AppRecord>,
    /// Live tasks by id (terminal tasks are removed).
    pub tasks: OrdMap<TaskId, Task>,
    /// Task ids by app, kept by [`State::apply`] so per-app reads do not scan every task;
    /// derived, so not stored (rebuilt after a snapshot is loaded).
    #[serde(skip)]
    pub tasks_by_app: OrdMap<AppId, imbl::OrdSet<TaskId>>,
    /// Tasks in `TASK_UNREACHABLE` (their timers are due work); derived, so not stored.
    #[serde(skip)]
    pub unreachable: imbl::OrdSet<TaskId>,
    /// Agents by id.
    pub agents: OrdMap<AgentId, Agent>,
    /// Deployments in progress.
    pub deployments: OrdMap<String, Deployment>,
    /// Explicitly created groups.
    #[serde(default)]
    pub groups: OrdMap<String, GroupRecord>,
    /// How many versions of an app are kept (0 = [`MAX_APP_VERSIONS`]); set by
    /// [`Command::SetMaxAppVersions`].
    #[serde(default)]
    pub max_versions: usize,
    /// The service catalog.
    pub catalog: CatalogState,
    /// Consul's KV store and sessions.
    #[serde(default)]
    pub kv: KvState,
    /// Frameworks of the Mesos v1 scheduler API, role weights and quota.
    #[serde(default)]
    pub mesos: crate::frameworks::MesosState,
    /// Agents being drained (`mesh node drain`): they get no new tasks and their tasks are moved
    /// elsewhere, until reactivated. Kept across their re-registrations.
    #[serde(default)]
    pub draining: imbl::OrdSet<AgentId>,
    /// Consul's autopilot configuration as last set (`PUT /v1/operator/autopilot/configuration`);
    /// `None`: never set, Consul's defaults ([`AutopilotConfig::default`]).
    #[serde(default)]
    pub autopilot: Option<AutopilotConfig>,
    /// Client request ids of the last applied [`Command::Once`]s: a repeat is refused.
    #[serde(default)]
    pub requests: Requests,
    /// Consul's prepared queries (`/v1/query`), by id.
    #[serde(default)]
    pub queries: OrdMap<String, PreparedQuery>,
}

/// A prepared query as stored: the API checks and reads the definition; the state keeps ids
/// and names unique.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreparedQuery {
    /// Its id (a UUID).
    pub id: String,
    /// Its name (may be empty: then only its id names it, unless it is a template).
    pub name: String,
    /// Whether it is a template (matched by name prefix; an empty name matches every name).
    pub template: bool,
    /// The definition as Consul's JSON (without the indexes).
    pub definition: String,
    /// State index of its creation.
    pub create_index: u64,
    /// State index of its last change.
    pub modify_index: u64,
}

/// Consul's autopilot configuration, replicated like every setting that changes what servers
/// do. Durations are in milliseconds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AutopilotConfig {
    /// Whether the leader removes servers gossip declared failed (or left) from the group.
    pub cleanup_dead_servers: bool,
    /// A server whose last contact with the leader is older than this is unhealthy.
    pub last_contact_threshold_ms: u64,
    /// A server more than this many log entries behind the leader is unhealthy.
    pub max_trailing_logs: u64,
    /// Dead servers are never removed when fewer than this many would remain (0: no floor).
    pub min_quorum: u64,
    /// How long a new server must be caught up (within `max_trailing_logs`) before it votes.
    pub server_stabilization_time_ms: u64,
    /// Shown only (an Enterprise feature of Consul).
    pub redundancy_zone_tag: String,
    /// Shown only (an Enterprise feature of Consul).
    pub disable_upgrade_migration: bool,
    /// Shown only (an Enterprise feature of Consul).
    pub upgrade_version_tag: String,
    /// State index of the first write of a configuration.
    pub create_index: u64,
    /// State index of the last write (what `?cas=` compares).
    pub modify_index: u64,
}

impl Default for AutopilotConfig {
    /// Consul's defaults; indexes 1 (what a `?cas=` against the defaults names).
    fn default() -> Self {
        AutopilotConfig {
            cleanup_dead_servers: true,
            last_contact_threshold_ms: 200,
            max_trailing_logs: 250,
            min_quorum: 0,
            server_stabilization_time_ms: 10_000,
            redundancy_zone_tag: String::new(),
            disable_upgrade_migration: false,
            upgrade_version_tag: String::new(),
            create_index: 1,
            modify_index: 1,
        }
    }
}

/// A change of cluster state. Commands carry every input they need (time included), so
/// applying the same log always gives the same state.
// `PutApp` carries a whole `App` inline. Commands are short-lived (built, applied, logged);
// boxing it would touch every constructor and match across the crates for little gain.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Command {
    /// Create an app, or replace its definition (scale or config change).
    PutApp {
        /// The new definition.
        app: App,
        /// When.
        now: Millis,
        /// The deployment this change starts.
        deployment_id: String,
        /// Fail when the app exists (POST) instead of replacing it.
        create_only: bool,
        /// Replace even when another deployment is in progress.
        force: bool,
    },
    /// Roll back to an earlier version, keeping the current scale.
    RollbackApp {
        /// Which app.
        id: AppId,
        /// Version to restore.
        version: Millis,
        /// When.
        now: Millis,
        /// The deployment.
        deployment_id: String,
        /// Even during another deployment.
        force: bool,
    },
    /// Replace every task of an app with a new one of the same definition (a new version).
    RestartApp {
        /// Which app.
        id: AppId,
        /// When.
        now: Millis,
        /// The deployment.
        deployment_id: String,
        /// Even during another deployment.
        force: bool,
    },
    /// Delete an app; its tasks are marked for killing.
    DeleteApp {
        /// Which app.
        id: AppId,
        /// When.
        now: Millis,
        /// The deployment.
        deployment_id: String,
        /// Even during another deployment.
        force: bool,
    },
    /// Drain an agent (no new tasks; its tasks are moved elsewhere), or reactivate it.
    DrainAgent {
        /// The agent.
        agent_id: AgentId,
        /// `true` drains, `false` reactivates.
        drain: bool,
    },
    /// An agent registered (or re-registered after a restart).
    RegisterAgent {
        /// The agent.
        agent: Agent,
        /// Datacenter, for the catalog node.
        datacenter: String,
    },
    /// Tasks were launched (STAGING).
    LaunchTasks {
        /// The tasks.
        tasks: Vec<Task>,
    },
    /// Mark tasks for killing; with `scale`, lower the app's instance count accordingly.
    KillTasks {
        /// Which tasks.
        ids: Vec<TaskId>,
        /// Scale the app down.
        scale: bool,
        /// When.
        now: Millis,
        /// The deployment started by a scale, if any.
        deployment_id: Option<String>,
    },
    /// A task changed state.
    TaskStatus {
        /// Which task.
        task_id: TaskId,
        /// New state.
        state: TaskState,
        /// Detail.
        message: String,
        /// When.
        at: Millis,
    },
    /// A health check of a task reported.
    TaskHealth {
        /// Which task.
        task_id: TaskId,
        /// Index of the check.
        check: usize,
        /// Its result.
        result: crate::health::CheckResult,
    },
    /// An unreachable task was away longer than its app's `inactiveAfterSeconds`: it no longer
    /// counts as an instance (see [`Task::inactive`]).
    TaskInactive {
        /// The task.
        task_id: TaskId,
    },
    /// Reset an app's launch delay (`DELETE /v2/queue/{id}/delay`).
    ResetDelay {
        /// Which app.
        id: AppId,
    },
    /// Replace the service instances that `source` on `node` provides with `instances`.
    SyncServices {
        /// The node.
        node: String,
        /// The providing source (e.g. `registrator`).
        source: String,
        /// The complete new set.
        instances: Vec<ServiceInstance>,
    },
    /// Create or change a group: create or update `apps`, stop `remove`, record the group and
    /// its subgroups, all as one deployment ordered by dependencies.
    PutGroup {
        /// The group id.
        group: String,
        /// Apps to create or update (absolute ids).
        apps: Vec<App>,
        /// Apps to stop and remove.
        remove: Vec<AppId>,
        /// Explicit groups to record (the group itself and nested ones), with dependencies.
        groups: Vec<GroupRecord>,
        /// When.
        now: Millis,
        /// The deployment.
        deployment_id: String,
        /// Fail if the group exists (POST).
        create_only: bool,
        /// Even during other deployments.
        force: bool,
    },
    /// Delete a group and everything in it.
    DeleteGroup {
        /// The group id.
        group: String,
        /// When.
        now: Millis,
        /// The deployment.
        deployment_id: String,
        /// Even during other deployments.
        force: bool,
    },
    /// Move a deployment to its next step (the apps of the current one are done).
    AdvanceDeployment {
        /// Which one.
        id: String,
        /// The new 1-based current step.
        step: usize,
    },
    /// Cancel a deployment and start a new one that brings its apps back to where they were.
    RollbackDeployment {
        /// The deployment to roll back.
        id: String,
        /// The new deployment.
        deployment_id: String,
        /// When.
        now: Millis,
    },
    /// Remove a deployment (done, or cancelled).
    EndDeployment {
        /// Which one.
        id: String,
    },
    /// Register on `node` (created or updated from `node_info` when given) a service instance
    /// and/or checks: the Consul agent API and `/v1/catalog/register`.
    Register {
        /// The node.
        node: String,
        /// Node address and meta, to create or update it.
        node_info: Option<Node>,
        /// A service instance (its `node` is set to `node`).
        instance: Option<ServiceInstance>,
        /// Checks (their `node` is set to `node`); a check naming a `service_id` must belong to an
        /// instance on the node.
        checks: Vec<Check>,
        /// Replace the instance's other checks (an agent re-registration) instead of keeping them.
        replace_checks: bool,
    },
    /// Deregister from `node` a service instance (with its checks), a check, or, with neither,
    /// the node and everything on it.
    Deregister {
        /// The node.
        node: String,
        /// A service instance id.
        service_id: Option<String>,
        /// A check id.
        check_id: Option<String>,
    },
    /// A check's status changed: an agent's result, a TTL update through the API, a TTL expiry.
    UpdateCheck {
        /// The node.
        node: String,
        /// The check id.
        id: String,
        /// New status.
        status: Health,
        /// New output.
        output: String,
        /// When.
        now: Millis,
        /// What happens to a TTL check's deadline.
        ttl: TtlUpdate,
    },
    /// A change of Consul's KV store.
    Kv(KvOp),
    /// A KV transaction: its operations in order, all applied or none.
    KvTxn(Vec<crate::kv::TxnOp>),
    /// A change of Consul's sessions.
    Session(SessionOp),
    /// A framework subscribed through the Mesos v1 API (first time, or again with its id).
    SubscribeFramework {
        /// Its id.
        id: FrameworkId,
        /// Its info.
        info: Box<crate::mesos::FrameworkInfo>,
        /// When.
        at: Millis,
    },
    /// A framework was torn down (TEARDOWN, or its failover timeout ran out).
    RemoveFramework {
        /// Its id.
        id: FrameworkId,
        /// When.
        at: Millis,
    },
    /// Tasks a framework launched (STAGING), with their names.
    LaunchFrameworkTasks {
        /// The tasks.
        tasks: Vec<Task>,
        /// Their names, in the same order.
        names: Vec<String>,
    },
    /// Set role weights (`PUT /master/weights`); other roles keep theirs.
    SetWeights {
        /// (role, weight > 0).
        weights: Vec<(String, f64)>,
    },
    /// Set (or, with an empty quota, remove) a role's quota.
    SetQuota {
        /// The role.
        role: String,
        /// Its limits.
        quota: crate::frameworks::Quota,
    },
    /// How many versions of each app are kept from now on (at least 1; `--max-app-versions`).
    /// Configuration that decides what apply does is itself a command, so every server and
    /// every replay of the log keeps the same versions.
    SetMaxAppVersions {
        /// Versions kept per app.
        keep: usize,
    },
    /// Replace Consul's autopilot configuration (its indexes are set by apply). With `cas`,
    /// only if the current configuration's `modify_index` is that (else
    /// [`ApplyError::CasMismatch`], nothing changed), as Consul's `?cas=`.
    SetAutopilot {
        /// The new configuration.
        config: AutopilotConfig,
        /// Check-and-set against this modify index.
        cas: Option<u64>,
    },
    /// Replace the whole state with a saved one (`mesh snapshot restore`, `PUT /v1/snapshot`).
    /// The datacenter stays this one's; the index goes on from the larger of the two, so
    /// blocking queries and `X-Consul-Index` never go back.
    Restore {
        /// The saved state.
        state: Box<State>,
    },
    /// Create a prepared query (`create`), or replace one that exists.
    PutQuery {
        /// The query (its indexes are set by the state).
        query: PreparedQuery,
        /// Create it: its id must be new. Otherwise it must exist.
        create: bool,
    },
    /// Delete a prepared query.
    DeleteQuery {
        /// Its id.
        id: String,
    },
    /// `cmd` on behalf of a client request: applied once per `request` id. A repeat (the same
    /// write retried after its answer was lost) is refused with [`ApplyError::Repeated`], which
    /// says what the first one returned, and changes nothing.
    Once {
        /// The request id (see [`valid_request_id`]).
        request: String,
        /// The command.
        cmd: Box<Command>,
    },
}

impl Command {
    /// The command itself, without its [`Command::Once`] wrapping.
    pub fn inner(&self) -> &Command {
        match self {
            Command::Once { cmd, .. } => cmd.inner(),
            other => other,
        }
    }

    /// Whether the command only stops or winds down work, so it may go to the log's reserve
    /// while the log cannot be written: deleting apps and groups, killing tasks, scaling an app
    /// down without changing its definition, tearing down a framework, and the task states and
    /// deployment steps that follow from those. Nothing that starts work or stores data.
    pub fn stops_work(&self, state: &State) -> bool {
        match self {
            Command::DeleteApp { .. }
            | Command::DeleteGroup { .. }
            | Command::KillTasks { .. }
            | Command::RemoveFramework { .. }
            | Command::TaskStatus { .. }
            | Command::AdvanceDeployment { .. }
            | Command::EndDeployment { .. } => true,
            Command::PutApp { app, create_only: false, .. } => {
                state.apps.get(&app.id).is_some_and(|rec| app.instances < rec.app.instances && rec.app.same_config(app))
            }
            Command::Once { cmd, .. } => cmd.stops_work(state),
            _ => false,
        }
    }
}

/// What a [`Command::UpdateCheck`] does to a TTL check's deadline.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TtlUpdate {
    /// Leave it (results of checks the agent runs).
    Keep,
    /// Restart it from `now` (pass/warn/fail/update through the API).
    Renew,
    /// The deadline `Millis` passed: apply only if it is still the check's deadline (no renewal
    /// raced with the expiry).
    Expired(Millis),
}

/// Why a command was not applied. Serializable so that a Raft proposer can hand a client the
/// exact error the state machine returned on the leader.
#[derive(Debug, Clone, PartialEq, thiserror::Error, Serialize, Deserialize)]
#[non_exhaustive]
pub enum ApplyError {
    /// The app does not exist.
    #[error("App '{0}' does not exist")]
    UnknownApp(AppId),
    /// The app exists already (create only).
    #[error("An app with id [{0}] already exists.")]
    AppExists(AppId),
    /// Another deployment holds the app.
    #[error(
        "App is locked by one or more deployments. Override with the option '?force=true'. View details at '/v2/deployments/{0}'."
    )]
    Locked(String),
    /// The task does not exist.
    #[error("Task '{0}' does not exist")]
    UnknownTask(TaskId),
    /// The version does not exist.
    #[error("App '{0}' does not exist in version {1}")]
    UnknownVersion(AppId, String),
    /// The group exists already (create only).
    #[error("Group {0} is already created. Use PUT to change this group.")]
    GroupExists(String),
    /// The group does not exist.
    #[error("Group '{0}' does not exist")]
    UnknownGroup(String),
    /// The deployment does not exist.
    #[error("DeploymentPlan {0} does not exist")]
    UnknownDeployment(String),
    /// The catalog node does not exist.
    #[error("Unknown node \"{0}\"")]
    UnknownNode(String),
    /// No service instance with this id on the node.
    #[error("Unknown service ID \"{0}\"")]
    UnknownService(String),
    /// No check with this id on the node.
    #[error("Unknown check ID \"{0}\"")]
    UnknownCheck(String),
    /// No prepared query with this id (Consul's words).
    #[error("Query not found")]
    UnknownQuery(String),
    /// A prepared query with this id exists already.
    #[error("Query ID {0} already exists")]
    QueryExists(String),
    /// Another prepared query has this name.
    #[error("name \"{0}\" aliases an existing query name")]
    QueryNameTaken(String),
    /// A KV or session command was refused.
    #[error(transparent)]
    Kv(#[from] KvError),
    /// The framework is not registered.
    #[error("Framework {0} is not registered")]
    UnknownFramework(FrameworkId),
    /// A launch of a task id that exists already (or twice in one launch). A repeated launch
    /// command (a retry, a duplicated message) is refused, never applied twice.
    #[error("Task has duplicate ID: {0}")]
    TaskExists(TaskId),
    /// A status that would take a task back (states only move forward).
    #[error("Task '{0}' is {1}: {2} would take it back")]
    StaleStatus(TaskId, String, String),
    /// A check-and-set named another index than the current one (which it carries).
    #[error("check-and-set failed: the current index is {0}")]
    CasMismatch(u64),
    /// A [`Command::Once`] whose request id applied already (at `index`): the write was not
    /// applied again. Its proposer answers as the first one did.
    #[error("request {request} applied already at index {index}")]
    Repeated {
        /// The request id.
        request: String,
        /// The index the first one applied at.
        index: u64,
        /// A KV transaction's results, as the first one returned them.
        txn_results: Option<Vec<crate::kv::KvEntry>>,
    },
    /// A request id that is not one (see [`valid_request_id`]).
    #[error("invalid request id {0:?}")]
    BadRequestId(String),
}

/// What an applied command changed (for publishing reads and events, and for the scheduler,
/// which reconciles only what changed).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Changes {
    /// Apps whose definition, tasks or deployment changed (the apps of a deployment that was
    /// removed or advanced included).
    pub apps: Vec<AppId>,
    /// Whether the catalog changed.
    pub catalog: bool,
    /// Tasks that reached a terminal state, with their last record.
    pub ended: Vec<Task>,
    /// Tasks whose record changed: launched, new status or health result, marked for killing
    /// (frameworks' tasks included; ended ones too).
    pub tasks: Vec<TaskId>,
    /// Deployments started, advanced or removed.
    pub deployments: Vec<String>,
    /// The results of a KV transaction ([`Command::KvTxn`]), for its caller: one entry per
    /// operation that has one (see [`crate::kv::KvState::apply_txn`]).
    pub txn_results: Option<Vec<crate::kv::KvEntry>>,
}

impl State {
    /// Refuses a launch whose task ids exist already or repeat within it.
    fn check_new_tasks(&self, tasks: &[Task]) -> Result<(), ApplyError> {
        let mut seen = std::collections::HashSet::new();
        match tasks.iter().find(|t| self.tasks.contains_key(&t.id) || !seen.insert(&t.id)) {
            Some(t) => Err(ApplyError::TaskExists(t.id.clone())),
            None => Ok(()),
        }
    }

    /// An empty state for `datacenter`.
    pub fn new(datacenter: &str) -> Self {
        Self { catalog: CatalogState::new(datacenter), ..Default::default() }
    }

    /// How many versions of an app are kept.
    pub fn keep_versions(&self) -> usize {
        if self.max_versions == 0 { MAX_APP_VERSIONS } else { self.max_versions }
    }

    /// Tasks of an app that are alive and not being killed.
    pub fn active_tasks<'a>(&'a self, app: &'a AppId) -> impl Iterator<Item = &'a Task> + 'a {
        self.app_tasks(app).filter(|t| !t.kill_requested && !t.state.is_terminal())
    }

    /// All live tasks of an app (being killed included).
    pub fn app_tasks<'a>(&'a self, app: &'a AppId) -> impl Iterator<Item = &'a Task> + 'a {
        self.tasks_by_app.get(app).into_iter().flat_map(move |ids| ids.iter().filter_map(move |id| self.tasks.get(id)))
    }

    /// Rebuild the derived indexes (after a snapshot is loaded).
    pub fn rebuild_indexes(&mut self) {
        self.kv.rebuild();
        self.requests.rebuild();
        self.catalog.rebuild_index();
        self.tasks_by_app = OrdMap::new();
        self.unreachable = imbl::OrdSet::new();
        for t in self.tasks.values() {
            if let Some(app) = &t.app_id {
                self.tasks_by_app.entry(app.clone()).or_default().insert(t.id.clone());
            }
            if t.state == TaskState::Unreachable {
                self.unreachable.insert(t.id.clone());
            }
        }
    }

    fn lock_check(&self, app: &AppId, force: bool) -> Result<(), ApplyError> {
        if force {
            return Ok(());
        }
        match self.apps.get(app).and_then(|r| r.deployment.clone()) {
            Some(d) if self.deployments.contains_key(&d) => Err(ApplyError::Locked(d)),
            _ => Ok(()),
        }
    }

    fn start_deployment(&mut self, id: &str, app: &AppId, action: &str, now: Millis, changes: &mut Changes) {
        // A forced change cancels the deployment that held the app.
        let original = self.apps.get(app).map(|r| r.app.clone());
        if let Some(old) = self.apps.get(app).and_then(|r| r.deployment.clone()) {
            self.drop_deployment(&old, changes);
        }
        self.start_deployment_fresh(id, app, action, now, original, changes);
    }

    /// Remove a deployment; its apps count as changed (they may no longer wait for a step).
    fn drop_deployment(&mut self, id: &str, ch: &mut Changes) -> Option<Deployment> {
        let d = self.deployments.remove(id)?;
        ch.deployments.push(id.to_owned());
        ch.apps.extend(d.affected_apps.iter().cloned());
        Some(d)
    }

    fn start_deployment_fresh(
        &mut self,
        id: &str,
        app: &AppId,
        action: &str,
        now: Millis,
        original: Option<App>,
        changes: &mut Changes,
    ) {
        let mut steps = vec![vec![DeploymentAction { action: action.into(), app: app.clone() }]];
        if action == "StartApplication" {
            steps.push(vec![DeploymentAction { action: "ScaleApplication".into(), app: app.clone() }]);
        }
        self.deployments.insert(
            id.to_owned(),
            Deployment {
                id: id.to_owned(),
                version: now,
                affected_apps: vec![app.clone()],
                steps,
                current_step: 1,
                original: vec![(app.clone(), original)],
            },
        );
        if let Some(rec) = self.apps.get_mut(app) {
            rec.deployment = Some(id.to_owned());
        }
        changes.apps.push(app.clone());
        changes.deployments.push(id.to_owned());
    }

    /// Create or replace an app's definition (no deployment, no lock check); returns the
    /// deployment action it implies.
    fn put_app(&mut self, app: &App, now: Millis, ch: &mut Changes) -> &'static str {
        let existing = self.apps.get(&app.id).cloned();
        let mut app = app.clone();
        let (config_version, mut versions, delay, last_failure, action) = match &existing {
            Some(rec) => {
                let config_changed = !rec.app.same_config(&app);
                let cv = if config_changed { now } else { rec.config_version };
                let action = if config_changed { "RestartApplication" } else { "ScaleApplication" };
                // a new config resets the launch backoff, as Marathon does
                let delay = if config_changed { LaunchDelay::default() } else { rec.delay.clone() };
                (cv, rec.versions.clone(), delay, rec.last_failure.clone(), action)
            }
            None => (now, Vec::new(), LaunchDelay::default(), None, "StartApplication"),
        };
        app.version = iso8601(now);
        app.version_info = Some(crate::app::VersionInfo {
            last_scaling_at: iso8601(now),
            last_config_change_at: iso8601(config_version),
        });
        versions.push((now, app.clone()));
        if versions.len() > self.keep_versions() {
            let drop = versions.len() - self.keep_versions();
            versions.drain(..drop);
        }
        if let Some(old) = existing.as_ref().and_then(|r| r.deployment.clone()) {
            self.drop_deployment(&old, ch);
        }
        let id = app.id.clone();
        self.apps.insert(
            id,
            AppRecord { app, version: now, config_version, versions, delay, last_failure, deployment: None },
        );
        action
    }

    /// Remove an app and mark its tasks for killing.
    fn remove_app(&mut self, id: &AppId, ch: &mut Changes) {
        if let Some(old) = self.apps.get(id).and_then(|r| r.deployment.clone()) {
            self.drop_deployment(&old, ch);
        }
        self.apps.remove(id);
        let ids: Vec<TaskId> = self.app_tasks(id).map(|t| t.id.clone()).collect();
        for t in ids {
            self.mark_kill(&t, ch);
        }
    }

    /// Whether a group exists (explicitly, or implied by an app under it).
    pub fn group_exists(&self, group: &str) -> bool {
        let g = group.trim_end_matches('/');
        g.is_empty()
            || self.groups.contains_key(g)
            || self.apps.keys().any(|a| a.in_group(g))
            || self.groups.keys().any(|k| k.starts_with(&format!("{g}/")))
    }

    /// Apply a multi-app change as one deployment whose steps follow the apps' dependencies.
    fn group_change(&mut self, put: &[App], remove: &[AppId], deployment_id: &str, now: Millis, ch: &mut Changes) {
        let mut original = Vec::new();
        let mut stop = Vec::new();
        for id in remove {
            if let Some(rec) = self.apps.get(id) {
                original.push((id.clone(), Some(rec.app.clone())));
                stop.push(DeploymentAction { action: "StopApplication".into(), app: id.clone() });
                self.remove_app(id, ch);
                ch.apps.push(id.clone());
            }
        }
        // Dependency levels among the apps of this change: an app runs in the step after the
        // apps it depends on.
        let ids: Vec<AppId> = put.iter().map(|a| a.id.clone()).collect();
        let deps_of = |a: &App| -> Vec<AppId> {
            a.dependencies
                .iter()
                .filter_map(|d| AppId::parse_relative(d, &parent_of(&a.id)).ok())
                .flat_map(|d| {
                    ids.iter().filter(move |x| **x == d || x.in_group(d.as_str())).cloned().collect::<Vec<_>>()
                })
                .filter(|d| *d != a.id)
                .collect()
        };
        let mut level: BTreeMap<AppId, usize> = BTreeMap::new();
        for _ in 0..=put.len() {
            for a in put {
                let l = deps_of(a).iter().map(|d| level.get(d).copied().unwrap_or(0) + 1).max().unwrap_or(0);
                level.insert(a.id.clone(), l);
            }
        }
        let mut steps: Vec<Vec<DeploymentAction>> = Vec::new();
        if !stop.is_empty() {
            steps.push(stop);
        }
        let max_level = level.values().copied().max().unwrap_or(0);
        for l in 0..=max_level {
            let mut step = Vec::new();
            for a in put.iter().filter(|a| level.get(&a.id) == Some(&l)) {
                original.push((a.id.clone(), self.apps.get(&a.id).map(|r| r.app.clone())));
                let action = self.put_app(a, now, ch);
                step.push(DeploymentAction { action: action.into(), app: a.id.clone() });
                ch.apps.push(a.id.clone());
            }
            if !step.is_empty() {
                steps.push(step);
            }
        }
        let affected: Vec<AppId> = original.iter().map(|(a, _)| a.clone()).collect();
        if steps.is_empty() {
            return;
        }
        for a in &affected {
            if let Some(rec) = self.apps.get_mut(a) {
                rec.deployment = Some(deployment_id.to_owned());
            }
        }
        ch.deployments.push(deployment_id.to_owned());
        self.deployments.insert(
            deployment_id.to_owned(),
            Deployment {
                id: deployment_id.to_owned(),
                version: now,
                affected_apps: affected,
                steps,
                current_step: 1,
                original,
            },
        );
    }

    /// Apply one command. On error the state is unchanged.
    pub fn apply(&mut self, cmd: &Command) -> Result<Changes, ApplyError> {
        let mut ch = Changes::default();
        match cmd {
            Command::PutApp { app, now, deployment_id, create_only, force } => {
                let existing = self.apps.get(&app.id).cloned();
                if existing.is_some() && *create_only {
                    return Err(ApplyError::AppExists(app.id.clone()));
                }
                self.lock_check(&app.id, *force)?;
                let action = self.put_app(app, *now, &mut ch);
                self.start_deployment_fresh(deployment_id, &app.id, action, *now, existing.map(|r| r.app), &mut ch);
            }
            Command::RollbackApp { id, version, now, deployment_id, force } => {
                let rec = self.apps.get(id).ok_or_else(|| ApplyError::UnknownApp(id.clone()))?;
                let old = rec
                    .versions
                    .iter()
                    .find(|(v, _)| v == version)
                    .map(|(_, a)| a.clone())
                    .ok_or_else(|| ApplyError::UnknownVersion(id.clone(), iso8601(*version)))?;
                // The whole definition of that version comes back, instance count included.
                let app = old;
                return self.apply(&Command::PutApp {
                    app,
                    now: *now,
                    deployment_id: deployment_id.clone(),
                    create_only: false,
                    force: *force,
                });
            }
            Command::RestartApp { id, now, deployment_id, force } => {
                let mut rec = self.apps.get(id).cloned().ok_or_else(|| ApplyError::UnknownApp(id.clone()))?;
                self.lock_check(id, *force)?;
                if let Some(old) = rec.deployment.take() {
                    self.drop_deployment(&old, &mut ch);
                }
                rec.version = *now;
                rec.config_version = *now;
                rec.delay = LaunchDelay::default();
                rec.app.version = iso8601(*now);
                rec.app.version_info = Some(crate::app::VersionInfo {
                    last_scaling_at: iso8601(*now),
                    last_config_change_at: iso8601(*now),
                });
                rec.versions.push((*now, rec.app.clone()));
                if rec.versions.len() > self.keep_versions() {
                    rec.versions.remove(0);
                }
                self.apps.insert(id.clone(), rec);
                let original = self.apps.get(id).map(|r| r.app.clone());
                self.start_deployment_fresh(deployment_id, id, "RestartApplication", *now, original, &mut ch);
            }
            Command::DeleteApp { id, now, deployment_id, force } => {
                if !self.apps.contains_key(id) {
                    return Err(ApplyError::UnknownApp(id.clone()));
                }
                self.lock_check(id, *force)?;
                self.start_deployment(deployment_id, id, "StopApplication", *now, &mut ch);
                self.apps.remove(id);
                let ids: Vec<TaskId> = self.app_tasks(id).map(|t| t.id.clone()).collect();
                for t in ids {
                    self.mark_kill(&t, &mut ch);
                }
            }
            Command::PutQuery { query, create } => {
                let existing = self.queries.get(&query.id);
                match (existing, create) {
                    (Some(_), true) => return Err(ApplyError::QueryExists(query.id.clone())),
                    (None, false) => return Err(ApplyError::UnknownQuery(query.id.clone())),
                    _ => {}
                }
                let named = !query.name.is_empty() || query.template;
                if named
                    && self.queries.values().any(|q| {
                        q.id != query.id
                            && q.name.eq_ignore_ascii_case(&query.name)
                            && (!query.name.is_empty() || q.template)
                    })
                {
                    return Err(ApplyError::QueryNameTaken(query.name.clone()));
                }
                let create_index = existing.map_or(self.index + 1, |q| q.create_index);
                self.queries.insert(
                    query.id.clone(),
                    PreparedQuery { create_index, modify_index: self.index + 1, ..query.clone() },
                );
            }
            Command::DeleteQuery { id } => {
                if self.queries.remove(id).is_none() {
                    return Err(ApplyError::UnknownQuery(id.clone()));
                }
            }
            Command::SetMaxAppVersions { keep } => {
                // Apps keep what they have; each is trimmed at its next version.
                self.max_versions = (*keep).max(1);
            }
            Command::SetAutopilot { config, cas } => {
                let current = self.autopilot.clone().unwrap_or_default();
                if let Some(c) = cas
                    && *c != current.modify_index
                {
                    return Err(ApplyError::CasMismatch(current.modify_index));
                }
                let create_index = if self.autopilot.is_some() { current.create_index } else { self.index + 1 };
                self.autopilot = Some(AutopilotConfig { create_index, modify_index: self.index + 1, ..config.clone() });
            }
            Command::Restore { state } => {
                let mut next = (**state).clone();
                next.rebuild_indexes();
                next.catalog.datacenter = self.catalog.datacenter.clone();
                next.index = self.index.max(next.index);
                *self = next;
                ch.catalog = true;
            }
            Command::Once { request, cmd } => {
                if !valid_request_id(request) {
                    return Err(ApplyError::BadRequestId(request.clone()));
                }
                if let Some(first) = self.requests.get(request) {
                    return Err(ApplyError::Repeated {
                        request: request.clone(),
                        index: first.index,
                        txn_results: first.txn_results.clone(),
                    });
                }
                // The command moves the index itself (once).
                let ch = self.apply(cmd)?;
                let applied = Applied { index: self.index, txn_results: ch.txn_results.clone() };
                self.requests.insert(request.clone(), applied);
                return Ok(ch);
            }
            Command::DrainAgent { agent_id, drain } => {
                if !self.agents.contains_key(agent_id) {
                    return Err(ApplyError::UnknownNode(agent_id.0.clone()));
                }
                if *drain {
                    self.draining.insert(agent_id.clone());
                } else {
                    self.draining.remove(agent_id);
                }
                // Its tasks' apps are looked at again (the scheduler moves them).
                for t in self.tasks.values().filter(|t| t.agent_id == *agent_id) {
                    if let Some(app) = &t.app_id {
                        ch.apps.push(app.clone());
                    }
                }
            }
            Command::RegisterAgent { agent, datacenter } => {
                self.agents.insert(agent.id.clone(), agent.clone());
                let node = Node {
                    name: agent.id.0.clone(),
                    address: agent.address,
                    datacenter: datacenter.clone(),
                    meta: BTreeMap::new(),
                    create_index: 0,
                    modify_index: 0,
                    tagged_addresses: agent
                        .wan_address
                        .map(|wan| {
                            BTreeMap::from([
                                ("lan".to_owned(), agent.address.to_string()),
                                ("wan".to_owned(), wan.to_string()),
                            ])
                        })
                        .unwrap_or_default(),
                };
                ch.catalog |= self.catalog.upsert_node(node, self.index + 1);
                let mut serf = Check::new(&agent.id.0, SERF_HEALTH, "Serf Health Status", Health::Passing);
                serf.output = "Agent alive and reachable".into();
                ch.catalog |= self.catalog.upsert_check(serf, self.index + 1, true);
            }
            Command::LaunchTasks { tasks } => {
                self.check_new_tasks(tasks)?;
                for t in tasks {
                    if let Some(app) = &t.app_id {
                        ch.apps.push(app.clone());
                    }
                    ch.tasks.push(t.id.clone());
                    self.tasks.insert(t.id.clone(), t.clone());
                    if let Some(app) = &t.app_id {
                        self.tasks_by_app.entry(app.clone()).or_default().insert(t.id.clone());
                    }
                }
            }
            Command::KillTasks { ids, scale, now, deployment_id } => {
                for id in ids {
                    if !self.tasks.contains_key(id) {
                        return Err(ApplyError::UnknownTask(id.clone()));
                    }
                }
                let mut scaled: BTreeMap<AppId, u32> = BTreeMap::new();
                for id in ids {
                    let t = &self.tasks[id];
                    if *scale
                        && !t.kill_requested
                        && !t.state.is_terminal()
                        && let Some(app) = &t.app_id
                    {
                        *scaled.entry(app.clone()).or_default() += 1;
                    }
                    self.mark_kill(id, &mut ch);
                }
                for (app_id, n) in scaled {
                    if let Some(mut rec) = self.apps.get(&app_id).cloned() {
                        rec.app.instances = rec.app.instances.saturating_sub(n);
                        rec.app.version = iso8601(*now);
                        rec.version = *now;
                        if let Some(vi) = rec.app.version_info.as_mut() {
                            vi.last_scaling_at = iso8601(*now);
                        }
                        rec.versions.push((*now, rec.app.clone()));
                        if rec.versions.len() > self.keep_versions() {
                            rec.versions.remove(0);
                        }
                        self.apps.insert(app_id.clone(), rec);
                        if let Some(d) = deployment_id {
                            self.start_deployment(d, &app_id, "ScaleApplication", *now, &mut ch);
                        }
                    }
                }
            }
            Command::TaskStatus { task_id, state, message, at } => {
                let Some(mut task) = self.tasks.get(task_id).cloned() else {
                    return Err(ApplyError::UnknownTask(task_id.clone()));
                };
                if !task.state.can_become(*state) {
                    return Err(ApplyError::StaleStatus(
                        task_id.clone(),
                        task.state.as_str().into(),
                        state.as_str().into(),
                    ));
                }
                if *state == TaskState::Unreachable {
                    task.unreachable_since.get_or_insert(*at);
                    self.unreachable.insert(task_id.clone());
                    // Its instance leaves DNS until it is back.
                    ch.catalog |= self.deregister_task(&task);
                } else {
                    task.unreachable_since = None;
                    task.inactive = false;
                    self.unreachable.remove(task_id);
                }
                task.state = *state;
                task.message = message.clone();
                if *state == TaskState::Running && task.started_at.is_none() {
                    task.started_at = Some(*at);
                }
                if let Some(app) = &task.app_id {
                    ch.apps.push(app.clone());
                }
                ch.tasks.push(task_id.clone());
                if state.is_terminal() {
                    self.tasks.remove(task_id);
                    if let Some(app) = &task.app_id
                        && let Some(ids) = self.tasks_by_app.get_mut(app)
                    {
                        ids.remove(task_id);
                        if ids.is_empty() {
                            self.tasks_by_app.remove(app);
                        }
                    }
                    ch.catalog |= self.deregister_task(&task);
                    self.record_failure(&task, *at);
                    self.mesos.task_ended(&task, *at);
                    ch.ended.push(task);
                } else {
                    if *state == TaskState::Running && !task.kill_requested {
                        ch.catalog |= self.register_task(&task);
                    }
                    self.tasks.insert(task_id.clone(), task);
                }
            }
            Command::TaskHealth { task_id, check, result } => {
                let Some(mut task) = self.tasks.get(task_id).cloned() else {
                    return Err(ApplyError::UnknownTask(task_id.clone()));
                };
                if *check >= 64 {
                    return Err(ApplyError::UnknownTask(task_id.clone()));
                }
                if task.health.len() <= *check {
                    task.health.resize(*check + 1, crate::health::CheckResult::default());
                }
                task.health[*check] = result.clone();
                if let Some(app) = &task.app_id {
                    ch.apps.push(app.clone());
                }
                ch.tasks.push(task_id.clone());
                self.tasks.insert(task_id.clone(), task.clone());
                if task.state == TaskState::Running && !task.kill_requested {
                    ch.catalog |= self.register_task(&task);
                }
            }
            Command::TaskInactive { task_id } => {
                let Some(mut task) = self.tasks.get(task_id).cloned() else {
                    return Err(ApplyError::UnknownTask(task_id.clone()));
                };
                if task.state != TaskState::Unreachable {
                    return Err(ApplyError::StaleStatus(
                        task_id.clone(),
                        task.state.as_str().into(),
                        "inactive".into(),
                    ));
                }
                task.inactive = true;
                if let Some(app) = &task.app_id {
                    ch.apps.push(app.clone());
                }
                ch.tasks.push(task_id.clone());
                self.tasks.insert(task_id.clone(), task);
            }
            Command::ResetDelay { id } => {
                let rec = self.apps.get_mut(id).ok_or_else(|| ApplyError::UnknownApp(id.clone()))?;
                rec.delay = LaunchDelay::default();
                ch.apps.push(id.clone());
            }
            Command::SyncServices { node, source, instances } => {
                let index = self.index + 1;
                let mut keep = std::collections::BTreeSet::new();
                for inst in instances {
                    let mut inst = inst.clone();
                    inst.node = node.clone();
                    inst.meta.insert(SOURCE_META.into(), source.clone());
                    keep.insert((inst.service.clone(), inst.id.clone()));
                    let check = self.registrator_check(&inst);
                    ch.catalog |= self.catalog.upsert_instance(inst, index);
                    if let Some(check) = check {
                        ch.catalog |= self.catalog.upsert_check(check, index, false);
                    }
                }
                let stale: Vec<(String, String)> = self
                    .catalog
                    .instances_on(node)
                    .filter(|i| i.meta.get(SOURCE_META) == Some(source))
                    .map(|i| (i.service.clone(), i.id.clone()))
                    .filter(|k| !keep.contains(k))
                    .collect();
                for (svc, id) in stale {
                    ch.catalog |= self.catalog.remove_instance(&svc, node, &id, index);
                }
            }
            Command::PutGroup { group, apps, remove, groups, now, deployment_id, create_only, force } => {
                if *create_only && self.group_exists(group) {
                    return Err(ApplyError::GroupExists(group.clone()));
                }
                if !force {
                    for id in apps.iter().map(|a| &a.id).chain(remove.iter()) {
                        self.lock_check(id, false)?;
                    }
                }
                for g in groups {
                    self.groups.insert(g.id.clone(), g.clone());
                }
                self.group_change(apps, remove, deployment_id, *now, &mut ch);
            }
            Command::DeleteGroup { group, now, deployment_id, force } => {
                if !self.group_exists(group) {
                    return Err(ApplyError::UnknownGroup(group.clone()));
                }
                let g = group.trim_end_matches('/').to_owned();
                let remove: Vec<AppId> = self.apps.keys().filter(|a| a.in_group(&g)).cloned().collect();
                if !force {
                    for id in &remove {
                        self.lock_check(id, false)?;
                    }
                }
                let gone: Vec<String> = self
                    .groups
                    .keys()
                    .filter(|k| g.is_empty() || **k == g || k.starts_with(&format!("{g}/")))
                    .cloned()
                    .collect();
                for k in gone {
                    self.groups.remove(&k);
                }
                self.group_change(&[], &remove, deployment_id, *now, &mut ch);
            }
            Command::AdvanceDeployment { id, step } => {
                let d = self.deployments.get_mut(id).ok_or_else(|| ApplyError::UnknownDeployment(id.clone()))?;
                d.current_step = (*step).clamp(1, d.steps.len().max(1));
                for a in d.affected_apps.clone() {
                    ch.apps.push(a);
                }
                ch.deployments.push(id.clone());
            }
            Command::RollbackDeployment { id, deployment_id, now } => {
                let d = self.deployments.get(id).cloned().ok_or_else(|| ApplyError::UnknownDeployment(id.clone()))?;
                self.drop_deployment(id, &mut ch);
                let mut put = Vec::new();
                let mut remove = Vec::new();
                for (app, before) in &d.original {
                    match before {
                        Some(a) => put.push(a.clone()),
                        None => remove.push(app.clone()),
                    }
                }
                self.group_change(&put, &remove, deployment_id, *now, &mut ch);
            }
            Command::Register { node, node_info, instance, checks, replace_checks } => {
                let index = self.index + 1;
                if !self.catalog.nodes.contains_key(node) && node_info.is_none() {
                    return Err(ApplyError::UnknownNode(node.clone()));
                }
                for c in checks {
                    let own = instance.as_ref().is_some_and(|i| i.id == c.service_id);
                    if !c.service_id.is_empty() && !own && self.catalog.instance(node, &c.service_id).is_none() {
                        return Err(ApplyError::UnknownService(c.service_id.clone()));
                    }
                }
                if let Some(n) = node_info {
                    let mut n = n.clone();
                    n.name = node.clone();
                    ch.catalog |= self.catalog.upsert_node(n, index);
                }
                if let Some(inst) = instance {
                    let mut inst = inst.clone();
                    inst.node = node.clone();
                    // Another service may hold this id on the node: ids are unique per node.
                    if let Some(old) = self.catalog.instance(node, &inst.id).cloned()
                        && old.service != inst.service
                    {
                        ch.catalog |= self.catalog.remove_instance(&old.service, node, &old.id, index);
                    }
                    if *replace_checks {
                        let keep: std::collections::BTreeSet<&str> = checks.iter().map(|c| c.id.as_str()).collect();
                        let stale: Vec<String> = self
                            .catalog
                            .node_checks(node)
                            .filter(|c| c.service_id == inst.id && !keep.contains(c.id.as_str()))
                            .filter(|c| !c.id.starts_with(crate::catalog::SERVICE_MAINTENANCE_PREFIX))
                            .map(|c| c.id.clone())
                            .collect();
                        for id in stale {
                            ch.catalog |= self.catalog.remove_check(node, &id, index);
                        }
                    }
                    ch.catalog |= self.catalog.upsert_instance(inst, index);
                }
                for c in checks {
                    let mut c = c.clone();
                    c.node = node.clone();
                    if let Some(i) = self.catalog.instance(node, &c.service_id) {
                        c.service_name = i.service.clone();
                    }
                    // A registration states the check's status (or Consul's initial critical).
                    ch.catalog |= self.catalog.upsert_check(c, index, true);
                }
            }
            Command::Deregister { node, service_id, check_id } => {
                let index = self.index + 1;
                if !self.catalog.nodes.contains_key(node) {
                    return Err(ApplyError::UnknownNode(node.clone()));
                }
                match (service_id, check_id) {
                    (Some(sid), _) => {
                        let Some(inst) = self.catalog.instance(node, sid).cloned() else {
                            return Err(ApplyError::UnknownService(sid.clone()));
                        };
                        ch.catalog |= self.catalog.remove_instance(&inst.service, node, sid, index);
                        let maint = format!("{}{sid}", crate::catalog::SERVICE_MAINTENANCE_PREFIX);
                        ch.catalog |= self.catalog.remove_check(node, &maint, index);
                    }
                    (None, Some(cid)) => {
                        if !self.catalog.remove_check(node, cid, index) {
                            return Err(ApplyError::UnknownCheck(cid.clone()));
                        }
                        ch.catalog = true;
                    }
                    (None, None) => {
                        ch.catalog |= self.catalog.remove_node(node, index);
                    }
                }
            }
            Command::UpdateCheck { node, id, status, output, now, ttl } => {
                let index = self.index + 1;
                let Some(check) = self.catalog.checks.get(node).and_then(|m| m.get(id)).cloned() else {
                    return Err(ApplyError::UnknownCheck(id.clone()));
                };
                match ttl {
                    TtlUpdate::Expired(d) if check.ttl_deadline != Some(*d) => {
                        return Err(ApplyError::UnknownCheck(id.clone()));
                    }
                    TtlUpdate::Expired(_) => self.catalog.set_ttl_deadline(node, id, None),
                    TtlUpdate::Renew if check.definition.ttl_ms > 0 => {
                        self.catalog.set_ttl_deadline(node, id, Some(now + check.definition.ttl_ms))
                    }
                    _ => {}
                }
                ch.catalog |= self.catalog.set_check_status(node, id, *status, output, *now, index).unwrap_or(false);
            }
            Command::Kv(op) => self.kv.apply_kv(op, self.index + 1)?,
            Command::KvTxn(ops) => ch.txn_results = Some(self.kv.apply_txn(ops, self.index + 1)?),
            Command::Session(op) => {
                if let SessionOp::Create { session, .. } = op {
                    if !self.catalog.nodes.contains_key(&session.node) {
                        return Err(KvError::MissingNode(session.node.clone()).into());
                    }
                    // As Consul: every listed check must exist on the node and not be critical.
                    for id in session.node_checks.iter().chain(&session.service_checks) {
                        match self.catalog.checks.get(&session.node).and_then(|m| m.get(id)) {
                            None => return Err(KvError::MissingCheck(id.clone()).into()),
                            Some(c) if c.status == Health::Critical => {
                                return Err(KvError::CriticalCheck(id.clone()).into());
                            }
                            Some(_) => {}
                        }
                    }
                }
                self.kv.apply_session(op, self.index + 1)?
            }
            Command::SubscribeFramework { id, info, at } => self.mesos.subscribe(id, info, *at),
            Command::RemoveFramework { id, at } => {
                if !self.mesos.remove(id, *at) {
                    return Err(ApplyError::UnknownFramework(id.clone()));
                }
            }
            Command::LaunchFrameworkTasks { tasks, names } => {
                self.check_new_tasks(tasks)?;
                for (t, name) in tasks.iter().zip(names) {
                    ch.tasks.push(t.id.clone());
                    self.tasks.insert(t.id.clone(), t.clone());
                    self.mesos.task_names.insert(t.id.clone(), name.clone());
                }
            }
            Command::SetWeights { weights } => {
                for (role, w) in weights {
                    self.mesos.weights.insert(role.clone(), *w);
                }
            }
            Command::SetQuota { role, quota } => {
                if quota.is_empty() {
                    self.mesos.quotas.remove(role);
                } else {
                    self.mesos.quotas.insert(role.clone(), quota.clone());
                }
            }
            Command::EndDeployment { id } => {
                if let Some(d) = self.deployments.remove(id) {
                    ch.deployments.push(id.clone());
                    for app in d.affected_apps {
                        if let Some(rec) = self.apps.get_mut(&app)
                            && rec.deployment.as_deref() == Some(id)
                        {
                            rec.deployment = None;
                        }
                        ch.apps.push(app);
                    }
                }
            }
        }
        self.index += 1;
        if ch.catalog {
            self.catalog.index = self.index;
        }
        Ok(ch)
    }

    fn mark_kill(&mut self, id: &TaskId, ch: &mut Changes) {
        if let Some(mut t) = self.tasks.get(id).cloned() {
            t.kill_requested = true;
            if !t.state.is_terminal() && t.state != TaskState::Staging {
                t.state = TaskState::Killing;
            }
            // A task being killed leaves DNS at once.
            ch.catalog |= self.deregister_task(&t);
            if let Some(app) = &t.app_id {
                ch.apps.push(app.clone());
            }
            ch.tasks.push(id.clone());
            self.tasks.insert(id.clone(), t);
        }
    }

    fn record_failure(&mut self, task: &Task, at: Millis) {
        let Some(app_id) = &task.app_id else { return };
        let Some(rec) = self.apps.get_mut(app_id) else { return };
        let failed = matches!(task.state, TaskState::Failed | TaskState::Lost | TaskState::Error)
            || (task.state == TaskState::Finished && !task.kill_requested);
        if !failed || task.kill_requested {
            return;
        }
        rec.last_failure = Some(TaskFailure {
            task_id: task.id.clone(),
            agent_id: task.agent_id.clone(),
            host: task.host.clone(),
            state: task.state,
            message: task.message.clone(),
            at,
            version: task.version,
        });
        // Launch backoff: the delay grows with every failure, up to the cap. The API bounds the
        // fields (app::limits), and every step here saturates besides, so no value can wrap the
        // delay around to "already due": float-to-int `as` saturates (NaN gives 0), the delay
        // never shrinks between failures, and the deadline is a saturating sum.
        let app = &rec.app;
        let base = (app.backoff_seconds * 1000.0) as u64;
        let cap = (app.max_launch_delay_seconds * 1000.0) as u64;
        let current = rec.delay.delay_ms;
        let next = if current == 0 { base } else { ((current as f64) * app.backoff_factor) as u64 }.max(current);
        rec.delay.delay_ms = next.min(cap);
        rec.delay.until = at.saturating_add(rec.delay.delay_ms);
    }

    /// The Consul check a Registrator instance declares through its `check_*` meta.
    fn registrator_check(&self, inst: &ServiceInstance) -> Option<Check> {
        let spec = crate::registrator::CheckSpec::from_meta(&inst.meta).ok().flatten()?;
        let ip = inst.address.or_else(|| self.catalog.nodes.get(&inst.node).map(|n| n.address))?;
        let container = inst.meta.get(crate::registrator::CHECK_CONTAINER).map(String::as_str);
        let def = spec.to_definition(ip, inst.port, container)?;
        let id = format!("service:{}", inst.id);
        let mut c = Check::new(&inst.node, &id, &format!("Service '{}' check", inst.service), Health::Critical);
        c.status = spec.initial_status.unwrap_or(Health::Critical);
        c.service_id = inst.id.clone();
        c.service_name = inst.service.clone();
        c.definition = def;
        Some(c)
    }

    /// Commands that time makes due at `now`: TTL checks that expired, services whose check has
    /// been critical past its `DeregisterCriticalServiceAfter`.
    pub fn due(&self, now: Millis) -> Vec<Command> {
        // Consul sessions whose TTL ran out, or one of whose checks is critical (or gone).
        let mut out = self.kv.due(now);
        for sess in self.kv.sessions.values() {
            let failed = sess.node_checks.iter().chain(&sess.service_checks).any(|id| {
                self.catalog.checks.get(&sess.node).and_then(|m| m.get(id)).is_none_or(|c| c.status == Health::Critical)
            });
            if failed {
                out.push(Command::Session(SessionOp::Destroy { id: sess.id.clone(), now }));
            }
        }
        for id in &self.unreachable {
            let Some(t) = self.tasks.get(id) else { continue };
            let Some((inactive_at, expunge_at)) = self.unreachable_deadlines(t) else { continue };
            if expunge_at <= now {
                out.push(Command::TaskStatus {
                    task_id: id.clone(),
                    state: TaskState::Lost,
                    message: "expunged: unreachable for longer than its app's expungeAfterSeconds".into(),
                    at: now,
                });
            } else if !t.inactive && inactive_at <= now {
                out.push(Command::TaskInactive { task_id: id.clone() });
            }
        }
        let mut reaped = std::collections::BTreeSet::new();
        for c in self.catalog.checks.values().flat_map(|m| m.values()) {
            if let Some(d) = c.ttl_deadline.filter(|d| *d <= now) {
                out.push(Command::UpdateCheck {
                    node: c.node.clone(),
                    id: c.id.clone(),
                    status: Health::Critical,
                    output: "TTL expired".into(),
                    now,
                    ttl: TtlUpdate::Expired(d),
                });
            }
            let after = c.definition.deregister_critical_after_ms;
            if after > 0
                && !c.service_id.is_empty()
                && c.critical_since.is_some_and(|t| t + after <= now)
                && reaped.insert((c.node.clone(), c.service_id.clone()))
            {
                out.push(Command::Deregister {
                    node: c.node.clone(),
                    service_id: Some(c.service_id.clone()),
                    check_id: None,
                });
            }
        }
        out
    }

    /// The earliest time at which [`State::due`] will have something to do.
    pub fn next_deadline(&self) -> Option<Millis> {
        self.catalog
            .checks
            .values()
            .flat_map(|m| m.values())
            .flat_map(|c| {
                let after = c.definition.deregister_critical_after_ms;
                let reap = c.critical_since.filter(|_| after > 0 && !c.service_id.is_empty()).map(|t| t + after);
                [c.ttl_deadline, reap]
            })
            .flatten()
            .chain(self.kv.next_deadline())
            .chain(self.unreachable.iter().filter_map(|id| {
                let t = self.tasks.get(id)?;
                let (inactive_at, expunge_at) = self.unreachable_deadlines(t)?;
                Some(if t.inactive { expunge_at } else { inactive_at.min(expunge_at) })
            }))
            .min()
    }

    /// When an unreachable task becomes inactive and when it is expunged, by its app's
    /// `unreachableStrategy` (Marathon's defaults: 300 s and 600 s); `None` when disabled (it
    /// waits for its agent forever) or not unreachable.
    fn unreachable_deadlines(&self, t: &Task) -> Option<(Millis, Millis)> {
        let since = t.unreachable_since?;
        let strategy = match t.app_id.as_ref().and_then(|a| self.apps.get(a)) {
            Some(rec) => crate::app::UnreachableStrategy::of(&rec.app)?,
            None => crate::app::UnreachableStrategy::default(),
        };
        Some((since.saturating_add(strategy.inactive_after_ms), since.saturating_add(strategy.expunge_after_ms)))
    }

    /// The index of the last change to a watchable topic (see [`CatalogState::topics`]; `kv:` and
    /// `sessions` topics belong to the KV store). Never 0.
    pub fn topic_index(&self, topic: &str) -> u64 {
        if let Some(prefix) = topic.strip_prefix("kv:") {
            return self.kv.prefix_index(prefix);
        }
        if topic == crate::kv::SESSIONS_TOPIC {
            return self.kv.sessions_index();
        }
        self.catalog.topic_index(topic)
    }

    fn instance_for(&self, task: &Task) -> Option<ServiceInstance> {
        let app = &self.apps.get(task.app_id.as_ref()?)?.app;
        let port = *task.ports.first()?;
        // With health checks, an instance is answered only once every check passes.
        let checks = app.health_checks.len();
        let health = if checks == 0 || task.checks_alive(checks) { Health::Passing } else { Health::Critical };
        let mut meta = BTreeMap::new();
        meta.insert("marathon-app-id".to_owned(), app.id.to_string());
        Some(ServiceInstance {
            id: task.id.0.clone(),
            service: app.service_name(),
            node: task.agent_id.0.clone(),
            address: None,
            port,
            tags: app.service_tags(),
            meta,
            health,
            source_health: Default::default(),
            weights: Default::default(),
            create_index: 0,
            modify_index: 0,
            extra: Default::default(),
        })
    }

    fn register_task(&mut self, task: &Task) -> bool {
        match self.instance_for(task) {
            Some(inst) => self.catalog.upsert_instance(inst, self.index + 1),
            None => false,
        }
    }

    fn deregister_task(&mut self, task: &Task) -> bool {
        // The service name may have changed since registration: search by id, on the task's node
        // (where it was registered; see `instance_for`).
        let services: Vec<String> =
            self.catalog.instances_with_id(&task.agent_id.0, task.id.as_str()).map(|i| i.service.clone()).collect();
        let mut changed = false;
        for s in services {
            changed |= self.catalog.remove_instance(&s, &task.agent_id.0, task.id.as_str(), self.index + 1);
        }
        changed
    }
}

/// The group an app id lies in (`/prod/web` → `/prod`, `/web` → `/`).
pub fn parent_of(id: &AppId) -> String {
    match id.as_str().rsplit_once('/') {
        Some(("", _)) | None => "/".into(),
        Some((p, _)) => p.to_owned(),
    }
}

/// Errors of a log.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LogError {
    /// The embedded store failed.
    #[error("state store: {0}")]
    Store(String),
    /// A record could not be encoded or decoded.
    #[error("state encoding: {0}")]
    Codec(#[from] serde_json::Error),
    /// The on-disk format is newer than this binary understands.
    #[error("state format version {0} is not supported by this binary")]
    Version(u32),
    /// A snapshot file could not be encoded, or is not a valid snapshot.
    #[error("state snapshot: {0}")]
    Snapshot(String),
    /// A write failed earlier and the store has not recovered yet: only commands that stop work
    /// are accepted meanwhile (into the reserve). Holds the cause.
    #[error("state store cannot be written ({0}); only commands that stop tasks are accepted until it recovers")]
    Unwritable(String),
    /// After a reopen, the durable log does not end where the acknowledged state does.
    #[error("state store: the durable log ends at index {durable}, but {acknowledged} commands were acknowledged")]
    Diverged {
        /// Last index on disk.
        durable: u64,
        /// Last index acknowledged to callers.
        acknowledged: u64,
    },
}

impl LogError {
    /// The error without the "state store" prefix, to be wrapped in another message.
    pub fn cause(&self) -> String {
        match self {
            LogError::Store(s) | LogError::Unwritable(s) => s.clone(),
            LogError::Diverged { durable, acknowledged } => {
                format!("durable log ends at {durable}, {acknowledged} acknowledged")
            }
            e => e.to_string(),
        }
    }
}

/// The on-disk format version of log entries and of the JSON snapshot in the database (which
/// since [`SNAPSHOT_FORMAT`] only points at the snapshot file).
pub const FORMAT_VERSION: u32 = 1;

/// A durable, ordered log of commands with snapshots.
///
/// Snapshots are taken off the writer's path: [`Store`] hands a copy of the state (O(1)) to
/// the log's [`Log::snapshots`] writer on another thread, keeps appending meanwhile, and calls
/// [`Log::compact`] once the snapshot is durable. A Raft log can keep the same split: building
/// (or installing) a snapshot runs beside the log, and only the compaction touches it.
pub trait Log: Send {
    /// Append commands (indexes `first..first+len`) durably, in one write.
    fn append(&mut self, first: u64, cmds: &[Command]) -> Result<(), LogError>;
    /// The last snapshot (if any) and every command after it, in order.
    fn load(&mut self) -> Result<(Option<State>, Vec<Command>), LogError>;
    /// The writer of this log's snapshots; it may run on another thread while appends go on.
    fn snapshots(&self) -> Arc<dyn SnapshotWriter>;
    /// A snapshot up to `index` written by [`Log::snapshots`] is durable: the entries it covers
    /// may go. May be deferred (a database log drops them with its next appends).
    fn compact(&mut self, index: u64) -> Result<(), LogError>;
    /// Bytes appended since the log was opened (the size bound between snapshots). Default: 0.
    fn appended_bytes(&self) -> u64 {
        0
    }
    /// Store a snapshot of `state` and drop the log entries it covers, synchronously.
    fn snapshot(&mut self, state: &State) -> Result<(), LogError> {
        self.snapshots().write(state)?;
        self.compact(state.index)
    }
    /// Append commands durably to the reserve: space set aside in advance, used for commands
    /// that stop work while [`Log::append`] fails (e.g. the disk is full). Default: no reserve.
    fn append_reserved(&mut self, _first: u64, _cmds: &[Command]) -> Result<(), LogError> {
        Err(LogError::Store("no reserve".into()))
    }
    /// After a failed write: reopen the log, drop entries past the last acknowledged append (a
    /// commit that reported failure may still have landed), move the reserved commands into the
    /// log, and check that the durable log ends at `acknowledged`. Default: nothing to do.
    fn recover(&mut self, _acknowledged: u64) -> Result<(), LogError> {
        Ok(())
    }
    /// Confirm that rejections computed from the state as it is are still true: nothing was
    /// written elsewhere since (a replicated log confirms this node still leads). Called when a
    /// batch appended nothing but rejected something. Default: nothing to confirm (the only
    /// writer is this store).
    fn confirm(&mut self) -> Result<(), LogError> {
        Ok(())
    }
    /// Whether this log's `*_async` writes wait without blocking the thread (a replicated log
    /// awaiting a quorum). [`Store::propose_async`] then awaits them; otherwise the store's
    /// driver may run [`Store::propose`] where blocking is allowed. Default: no.
    fn writes_async(&self) -> bool {
        false
    }
    /// [`Log::append`], awaited. Default: the blocking write, done before the future is made.
    fn append_async<'a>(&'a mut self, first: u64, cmds: &'a [Command]) -> LogFuture<'a> {
        Box::pin(std::future::ready(self.append(first, cmds)))
    }
    /// [`Log::append_reserved`], awaited. Default: the blocking write.
    fn append_reserved_async<'a>(&'a mut self, first: u64, cmds: &'a [Command]) -> LogFuture<'a> {
        Box::pin(std::future::ready(self.append_reserved(first, cmds)))
    }
    /// [`Log::confirm`], awaited. Default: the blocking confirmation.
    fn confirm_async(&mut self) -> LogFuture<'_> {
        Box::pin(std::future::ready(self.confirm()))
    }
}

/// A write of a [`Log`] in progress.
pub type LogFuture<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), LogError>> + Send + 'a>>;

/// Writes snapshots durably; shared with the thread that writes them.
pub trait SnapshotWriter: Send + Sync {
    /// Write a snapshot of `state` (at `state.index`) durably, replacing the previous one.
    /// Returns its size in bytes.
    fn write(&self, state: &State) -> Result<u64, LogError>;
}

/// Version of the snapshot file format: `[magic "MESHSNAP"][version u32][index u64][length
/// u64][crc32 u32]` (little endian), then the state in MessagePack (structs as maps, so fields
/// may be added or skipped as in JSON).
pub const SNAPSHOT_FORMAT: u32 = 2;
const SNAPSHOT_MAGIC: &[u8; 8] = b"MESHSNAP";
const SNAPSHOT_HEADER: usize = 32;

/// `(index, body length, crc)` from a snapshot header.
fn snapshot_header(h: &[u8], what: &str) -> Result<(u64, u64, u32), LogError> {
    let word = |r: std::ops::Range<usize>| h.get(r).unwrap_or_default();
    if word(0..8) != SNAPSHOT_MAGIC {
        return Err(LogError::Snapshot(format!("{what}: not a snapshot file")));
    }
    let version = u32::from_le_bytes(word(8..12).try_into().unwrap_or_default());
    if version > SNAPSHOT_FORMAT {
        return Err(LogError::Version(version));
    }
    let index = u64::from_le_bytes(word(12..20).try_into().unwrap_or_default());
    let len = u64::from_le_bytes(word(20..28).try_into().unwrap_or_default());
    let crc = u32::from_le_bytes(word(28..32).try_into().unwrap_or_default());
    Ok((index, len, crc))
}

/// `state` in the snapshot file format (header, then the body [`encode_state`] writes): what
/// `mesh snapshot save` and `GET /v1/snapshot` give.
pub fn snapshot_bytes(state: &State) -> Result<Vec<u8>, LogError> {
    let mut body = Vec::new();
    encode_state(&mut body, state)?;
    let mut out = Vec::with_capacity(SNAPSHOT_HEADER + body.len());
    out.extend_from_slice(SNAPSHOT_MAGIC);
    out.extend_from_slice(&SNAPSHOT_FORMAT.to_le_bytes());
    out.extend_from_slice(&state.index.to_le_bytes());
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

/// The state in `bytes` (the snapshot file format), checked: magic, version, length, checksum
/// and index. `what` names the source in errors.
pub fn state_from_snapshot(bytes: &[u8], what: &str) -> Result<State, LogError> {
    let (index, len, crc) = snapshot_header(bytes, what)?;
    let body = &bytes[SNAPSHOT_HEADER.min(bytes.len())..];
    if body.len() as u64 != len || crc32fast::hash(body) != crc {
        return Err(LogError::Snapshot(format!("{what}: length or checksum does not match")));
    }
    let state = decode_state(body)?;
    if state.index != index {
        return Err(LogError::Snapshot(format!("{what}: header and state disagree on the index")));
    }
    Ok(state)
}

/// Encode `state` as a snapshot file body (no header): MessagePack, structs as maps.
pub fn encode_state(w: &mut impl std::io::Write, state: &State) -> Result<(), LogError> {
    state.serialize(&mut rmp_serde::Serializer::new(w).with_struct_map()).map_err(|e| LogError::Snapshot(e.to_string()))
}

/// Decode a snapshot body written by [`encode_state`]; derived indexes are not rebuilt.
pub fn decode_state(bytes: &[u8]) -> Result<State, LogError> {
    rmp_serde::from_slice(bytes).map_err(|e| LogError::Snapshot(e.to_string()))
}

/// A writer that counts and checksums what goes through it.
struct Summing<W> {
    inner: W,
    crc: crc32fast::Hasher,
    len: u64,
}

impl<W: std::io::Write> std::io::Write for Summing<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.crc.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Writes to a file, syncing every [`SYNC_EVERY`] bytes: a snapshot's hundreds of megabytes
/// then reach the disk as they are written, instead of all at its final sync, which would
/// hold up the log's own syncs meanwhile.
struct Trickle<'a> {
    file: &'a std::fs::File,
    unsynced: u64,
}

/// See [`Trickle`].
const SYNC_EVERY: u64 = 8 << 20;

impl std::io::Write for Trickle<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = std::io::Write::write(&mut self.file, buf)?;
        self.unsynced += n as u64;
        if self.unsynced >= SYNC_EVERY {
            self.file.sync_data()?;
            self.unsynced = 0;
        }
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Snapshots in a file (`state.snap` beside `state.redb`): written to a temporary file, synced
/// and renamed over the previous one, so the file is always a whole snapshot.
pub struct FileSnapshots {
    path: std::path::PathBuf,
}

impl FileSnapshots {
    /// Snapshots at `path`.
    pub fn new(path: &Path) -> Self {
        Self { path: path.to_path_buf() }
    }

    fn err(&self, e: impl std::fmt::Display) -> LogError {
        LogError::Store(format!("{}: {e}", self.path.display()))
    }

    /// The index of the snapshot in the file, if there is one (reads the header only).
    fn index(&self) -> Result<Option<u64>, LogError> {
        use std::io::Read;
        let mut header = [0u8; SNAPSHOT_HEADER];
        match std::fs::File::open(&self.path) {
            Ok(mut f) => f.read_exact(&mut header).map_err(|e| self.err(e))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(self.err(e)),
        }
        Ok(Some(self.check_header(&header)?.0))
    }

    /// `(index, body length, crc)` from a header.
    fn check_header(&self, h: &[u8]) -> Result<(u64, u64, u32), LogError> {
        snapshot_header(h, &self.path.display().to_string())
    }

    /// The snapshot in the file, if there is one.
    pub fn read(&self) -> Result<Option<State>, LogError> {
        let bytes = match std::fs::read(&self.path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(self.err(e)),
        };
        state_from_snapshot(&bytes, &self.path.display().to_string()).map(Some)
    }
}

impl SnapshotWriter for FileSnapshots {
    fn write(&self, state: &State) -> Result<u64, LogError> {
        use std::io::Write;
        use std::os::unix::fs::FileExt;
        let tmp = self.path.with_extension("snap.tmp");
        let file = std::fs::File::create(&tmp).map_err(|e| self.err(e))?;
        let result = (|| {
            let mut w = Summing {
                inner: std::io::BufWriter::with_capacity(1 << 20, Trickle { file: &file, unsynced: 0 }),
                crc: Default::default(),
                len: 0,
            };
            w.inner.write_all(&[0u8; SNAPSHOT_HEADER]).map_err(|e| self.err(e))?;
            encode_state(&mut w, state)?;
            w.flush().map_err(|e| self.err(e))?;
            let (len, crc) = (w.len, w.crc.finalize());
            let mut header = Vec::with_capacity(SNAPSHOT_HEADER);
            header.extend_from_slice(SNAPSHOT_MAGIC);
            header.extend_from_slice(&SNAPSHOT_FORMAT.to_le_bytes());
            header.extend_from_slice(&state.index.to_le_bytes());
            header.extend_from_slice(&len.to_le_bytes());
            header.extend_from_slice(&crc.to_le_bytes());
            file.write_all_at(&header, 0).map_err(|e| self.err(e))?;
            file.sync_all().map_err(|e| self.err(e))?;
            std::fs::rename(&tmp, &self.path).map_err(|e| self.err(e))?;
            if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(|e| self.err(e))?;
            }
            Ok(SNAPSHOT_HEADER as u64 + len)
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }
}

#[derive(Serialize, Deserialize)]
struct Envelope<T> {
    v: u32,
    #[serde(flatten)]
    body: T,
}

#[derive(Serialize, Deserialize)]
struct CmdBody {
    cmd: Command,
}

#[derive(Serialize, Deserialize)]
struct SnapBody {
    state: State,
}

/// The `snapshot` key of the database: a whole state in JSON (format 1, before snapshot files),
/// or since [`SNAPSHOT_FORMAT`] the index of the snapshot in the file (a binary of format 1
/// refuses to open it rather than replay a log whose start is gone).
#[derive(Serialize, Deserialize)]
struct MetaSnapshot {
    v: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    state: Option<State>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    index: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    file: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct ReservedBody {
    index: u64,
    cmd: Command,
}

const LOG_TABLE: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("log");
const META_TABLE: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("meta");

/// Free space a failed log waits for before it reopens (or the reserve's size, if larger).
pub const MIN_FREE_TO_RECOVER: u64 = 1024 * 1024;

/// Default size of the reserve file (`--state-reserve-mb`).
pub const DEFAULT_RESERVE_BYTES: u64 = 1024 * 1024;

/// At most this many covered log entries are dropped with one append (so dropping what a
/// snapshot covers never makes one write slow).
const PURGE_CHUNK: u64 = 4096;

/// The embedded log: a redb database with a `log` table (index → command), snapshots in a file
/// beside it ([`FileSnapshots`], `<path>.snap`), and a preallocated reserve file for commands
/// that stop work while the database cannot be written.
pub struct RedbLog {
    path: std::path::PathBuf,
    /// `None` after a failed reopen (until the next [`Log::recover`]).
    db: Option<redb::Database>,
    reserve: Option<Reserve>,
    /// Index of the last command durably in the database (log tail, or the snapshot).
    durable: u64,
    snapshots: Arc<FileSnapshots>,
    /// Entries up to here are covered by a durable snapshot and may be dropped.
    compact_to: u64,
    /// Entries up to here are dropped already.
    purged_to: u64,
    /// The snapshot index the database's `meta` table names.
    meta_index: u64,
    /// Bytes appended since open.
    appended: u64,
}

fn store_err(e: impl std::fmt::Display) -> LogError {
    LogError::Store(e.to_string())
}

fn open_db(path: &Path) -> Result<redb::Database, LogError> {
    let db = redb::Database::create(path).map_err(store_err)?;
    let tx = db.begin_write().map_err(store_err)?;
    {
        tx.open_table(LOG_TABLE).map_err(store_err)?;
        tx.open_table(META_TABLE).map_err(store_err)?;
    }
    tx.commit().map_err(store_err)?;
    Ok(db)
}

/// The snapshot index the database's `meta` table names (0: none).
fn meta_snapshot_index(db: &redb::Database) -> Result<u64, LogError> {
    use redb::ReadableDatabase;
    let tx = db.begin_read().map_err(store_err)?;
    let meta = tx.open_table(META_TABLE).map_err(store_err)?;
    if let Some(v) = meta.get("snapshot_index").map_err(store_err)? {
        let b: [u8; 8] = v.value().try_into().map_err(|_| store_err("bad snapshot_index"))?;
        return Ok(u64::from_le_bytes(b));
    }
    match meta.get("snapshot").map_err(store_err)? {
        Some(v) => Ok(serde_json::from_slice::<Envelope<SnapBody>>(v.value())?.body.state.index),
        None => Ok(0),
    }
}

/// The first and last keys of the log table.
fn log_bounds(db: &redb::Database) -> Result<Option<(u64, u64)>, LogError> {
    use redb::{ReadableDatabase, ReadableTable};
    let tx = db.begin_read().map_err(store_err)?;
    let log = tx.open_table(LOG_TABLE).map_err(store_err)?;
    let first = log.first().map_err(store_err)?.map(|(k, _)| k.value());
    let last = log.last().map_err(store_err)?.map(|(k, _)| k.value());
    Ok(first.zip(last))
}

/// The index of the last command in `db`: the log's last key, or the snapshot's index (the
/// database's or the file's, whichever is newer).
fn last_index(db: &redb::Database, snapshots: &FileSnapshots) -> Result<u64, LogError> {
    if let Some((_, last)) = log_bounds(db)? {
        return Ok(last);
    }
    Ok(meta_snapshot_index(db)?.max(snapshots.index()?.unwrap_or(0)))
}

impl RedbLog {
    /// Open or create the log at `path`, with a reserve of [`DEFAULT_RESERVE_BYTES`].
    pub fn open(path: &Path) -> Result<Self, LogError> {
        Self::open_with_reserve(path, DEFAULT_RESERVE_BYTES)
    }

    /// Open or create the log at `path` with a reserve file of `reserve_bytes` next to it
    /// (`<path>.reserve`; 0: none). Commands a previous run put in the reserve move into the log.
    pub fn open_with_reserve(path: &Path, reserve_bytes: u64) -> Result<Self, LogError> {
        let db = open_db(path)?;
        let snapshots = Arc::new(FileSnapshots::new(&path.with_extension("snap")));
        let durable = last_index(&db, &snapshots)?;
        let meta_index = meta_snapshot_index(&db)?;
        // A snapshot written just before a crash may not have been recorded yet: its entries
        // are dropped with the next appends.
        let compact_to = snapshots.index()?.unwrap_or(0).max(meta_index);
        let purged_to = log_bounds(&db)?.map_or(durable, |(first, _)| first - 1);
        let reserve_path = path.with_extension("reserve");
        // A reserve left by an earlier run is drained even when none is wanted any more.
        let reserve = match reserve_bytes {
            0 if !reserve_path.exists() => None,
            n => Reserve::open(&reserve_path, n)?,
        };
        let mut log = Self {
            path: path.to_path_buf(),
            db: Some(db),
            reserve,
            durable,
            snapshots,
            compact_to,
            purged_to,
            meta_index,
            appended: 0,
        };
        log.drain_reserve(None)?;
        if reserve_bytes == 0 && log.reserve.take().is_some() {
            std::fs::remove_file(&reserve_path).map_err(|e| store_err(format!("{}: {e}", reserve_path.display())))?;
        }
        Ok(log)
    }

    fn db(&self) -> Result<&redb::Database, LogError> {
        self.db.as_ref().ok_or_else(|| store_err("not open after an earlier failure"))
    }

    /// Move the reserved commands into the log, in one write that first drops every entry from
    /// the first reserved index on: the reserve is only written after an append at that index
    /// failed, so whatever the log holds there was never acknowledged (or, after a drain whose
    /// reserve could not be emptied, is the same commands). Then empty the reserve.
    ///
    /// `expect`: after a failure in this process, the index the reserve must start at (the one
    /// after the last acknowledged append); entries past it that the log holds are dropped even
    /// when the reserve is empty. `None` at open, where that is not known.
    fn drain_reserve(&mut self, expect: Option<u64>) -> Result<(), LogError> {
        let Some((from, run)) = Reserve::pending(&mut self.reserve, expect)? else { return Ok(()) };
        let tx = self.db()?.begin_write().map_err(store_err)?;
        {
            let mut t = tx.open_table(LOG_TABLE).map_err(store_err)?;
            t.retain_in(from.., |_, _| false).map_err(store_err)?;
            for (i, cmd) in &run {
                let bytes = serde_json::to_vec(&Envelope { v: FORMAT_VERSION, body: CmdBody { cmd: cmd.clone() } })?;
                t.insert(*i, bytes.as_slice()).map_err(store_err)?;
            }
        }
        tx.commit().map_err(store_err)?;
        self.durable = run.last().map_or(from - 1, |l| l.0);
        if !run.is_empty() {
            tracing::info!(commands = run.len(), "reserved commands moved into the state log");
            if let Some(r) = &mut self.reserve {
                r.clear()?;
            }
        }
        Ok(())
    }
}

impl Log for RedbLog {
    fn append(&mut self, first: u64, cmds: &[Command]) -> Result<(), LogError> {
        let tx = self.db()?.begin_write().map_err(store_err)?;
        let mut bytes_written = 0;
        // Entries a durable snapshot covers go with this write, a bounded number at a time.
        let purge = (self.purged_to < self.compact_to).then(|| self.compact_to.min(self.purged_to + PURGE_CHUNK));
        {
            let mut t = tx.open_table(LOG_TABLE).map_err(store_err)?;
            for (i, cmd) in cmds.iter().enumerate() {
                let bytes = serde_json::to_vec(&Envelope { v: FORMAT_VERSION, body: CmdBody { cmd: cmd.clone() } })?;
                bytes_written += bytes.len() as u64;
                t.insert(first + i as u64, bytes.as_slice()).map_err(store_err)?;
            }
            if let Some(to) = purge {
                t.retain_in(..=to, |_, _| false).map_err(store_err)?;
            }
            if self.meta_index < self.compact_to {
                let mut meta = tx.open_table(META_TABLE).map_err(store_err)?;
                let pointer = MetaSnapshot {
                    v: SNAPSHOT_FORMAT,
                    state: None,
                    index: Some(self.compact_to),
                    file: self.snapshots.path.file_name().map(|f| f.to_string_lossy().into_owned()),
                };
                meta.insert("snapshot", serde_json::to_vec(&pointer)?.as_slice()).map_err(store_err)?;
                meta.insert("snapshot_index", self.compact_to.to_le_bytes().as_slice()).map_err(store_err)?;
            }
        }
        tx.commit().map_err(store_err)?;
        self.durable = first + cmds.len() as u64 - 1;
        self.appended += bytes_written;
        self.meta_index = self.compact_to;
        if let Some(to) = purge {
            self.purged_to = to;
        }
        Ok(())
    }

    fn load(&mut self) -> Result<(Option<State>, Vec<Command>), LogError> {
        use redb::{ReadableDatabase, ReadableTable};
        let tx = self.db()?.begin_read().map_err(store_err)?;
        let meta = tx.open_table(META_TABLE).map_err(store_err)?;
        let (legacy, named) = match meta.get("snapshot").map_err(store_err)? {
            Some(v) => {
                let m: MetaSnapshot = serde_json::from_slice(v.value())?;
                if m.v > SNAPSHOT_FORMAT {
                    return Err(LogError::Version(m.v));
                }
                (m.state, m.index.unwrap_or(0))
            }
            None => (None, 0),
        };
        // The file's snapshot is the newest: it is written before the database names it, and
        // after the JSON one of format 1.
        let file = self.snapshots.read()?;
        if file.as_ref().map_or(0, |s| s.index) < named {
            return Err(LogError::Snapshot(format!(
                "the state log starts after index {named}, but {} holds no snapshot that far",
                self.snapshots.path.display()
            )));
        }
        let snap = match (file, legacy) {
            (Some(f), Some(l)) if l.index > f.index => Some(l),
            (Some(f), _) => Some(f),
            (None, l) => l,
        };
        let from = snap.as_ref().map(|s| s.index + 1).unwrap_or(1);
        let log = tx.open_table(LOG_TABLE).map_err(store_err)?;
        if let Some((first, _)) = log.first().map_err(store_err)? {
            let first = first.value();
            if first > from {
                return Err(store_err(format!(
                    "the log starts at index {first}, the state at {from}: entries are missing"
                )));
            }
        }
        let mut cmds = Vec::new();
        for item in log.range(from..).map_err(store_err)? {
            let (_, v) = item.map_err(store_err)?;
            let env: Envelope<CmdBody> = serde_json::from_slice(v.value())?;
            if env.v > FORMAT_VERSION {
                return Err(LogError::Version(env.v));
            }
            cmds.push(env.body.cmd);
        }
        Ok((snap, cmds))
    }

    fn snapshots(&self) -> Arc<dyn SnapshotWriter> {
        self.snapshots.clone()
    }

    fn compact(&mut self, index: u64) -> Result<(), LogError> {
        self.compact_to = self.compact_to.max(index);
        Ok(())
    }

    fn appended_bytes(&self) -> u64 {
        self.appended
    }

    fn append_reserved(&mut self, first: u64, cmds: &[Command]) -> Result<(), LogError> {
        Reserve::append_to(&mut self.reserve, first, cmds)
    }

    fn recover(&mut self, acknowledged: u64) -> Result<(), LogError> {
        Reserve::wait_for_room(&self.path, &self.reserve)?;
        // redb refuses every write after an I/O error until the database is opened again; the
        // open checks the file and repairs it when needed.
        self.db = None;
        self.db = Some(open_db(&self.path)?);
        let expect = self.durable + 1;
        self.drain_reserve(Some(expect))?;
        // A real commit, so a store that is still failing is not reported healthy.
        let tx = self.db()?.begin_write().map_err(store_err)?;
        {
            let mut meta = tx.open_table(META_TABLE).map_err(store_err)?;
            meta.insert("recovered_at_index", acknowledged.to_le_bytes().as_slice()).map_err(store_err)?;
        }
        tx.commit().map_err(store_err)?;
        let durable = last_index(self.db()?, &self.snapshots)?;
        if durable != acknowledged {
            return Err(LogError::Diverged { durable, acknowledged });
        }
        Ok(())
    }
}

/// A preallocated file of records `[len u32][crc32 u32][JSON {v, index, cmd}]`, zero-filled
/// after the last one. Writing into space allocated in advance needs no new blocks, so it works
/// on a full disk (on file systems that overwrite in place; on copy-on-write ones it may fail,
/// and the command is then refused like any other).
struct Reserve {
    file: std::fs::File,
    capacity: u64,
    used: u64,
    /// Emptying it failed after its commands were moved into the log: refuse appends (they
    /// would follow stale records) until [`Reserve::clear`] succeeds.
    dirty: bool,
}

/// The first index a reserve replaces the log from, and its commands with their indexes.
type ReservedRun = (u64, Vec<(u64, Command)>);

impl Reserve {
    /// Append to `reserve`, if there is one.
    fn append_to(reserve: &mut Option<Reserve>, first: u64, cmds: &[Command]) -> Result<(), LogError> {
        match reserve {
            Some(r) => r.append(first, cmds),
            None => Err(store_err("no reserve (--state-reserve-mb 0)")),
        }
    }

    /// Reopening a log works on a full disk too, and its next write would fail at once: wait
    /// until the file system of `log_path` has room (as much as the reserve holds, at least
    /// [`MIN_FREE_TO_RECOVER`]).
    fn wait_for_room(log_path: &Path, reserve: &Option<Reserve>) -> Result<(), LogError> {
        let dir = log_path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let need = reserve.as_ref().map_or(0, |r| r.capacity).max(MIN_FREE_TO_RECOVER);
        let vfs = rustix::fs::statvfs(dir).map_err(|e| store_err(format!("{}: {e}", dir.display())))?;
        let free = vfs.f_bavail.saturating_mul(vfs.f_frsize);
        if free < need {
            return Err(store_err(format!("{free} bytes free in {}, waiting for {need}", dir.display())));
        }
        Ok(())
    }

    /// What a log must do to take the reserve in: `None` when nothing (an empty reserve and
    /// nothing expected, or a reserve whose commands were moved already and that is now
    /// emptied); else the index from which the log is to be replaced and the reserved commands
    /// that replace it (none: only drop the log from there). `expect`: after a failure in this
    /// process, the index the reserve must start at (else [`LogError::Diverged`]).
    fn pending(reserve: &mut Option<Reserve>, expect: Option<u64>) -> Result<Option<ReservedRun>, LogError> {
        if let Some(r) = reserve
            && r.dirty
        {
            // Its commands were moved already; only emptying it failed.
            r.clear()?;
            return Ok(None);
        }
        let run = match reserve {
            Some(r) => r.read()?,
            None => Vec::new(),
        };
        let from = match (run.first(), expect) {
            (Some((f, _)), Some(e)) if *f != e => {
                return Err(LogError::Diverged { durable: e - 1, acknowledged: run.last().map_or(*f, |l| l.0) });
            }
            (Some((f, _)), _) => *f,
            (None, Some(e)) => e,
            (None, None) => return Ok(None),
        };
        Ok(Some((from, run)))
    }

    /// Open the reserve at `path`, growing it to `capacity`. When the disk has no room for that
    /// (a start on a full disk), it keeps what it has, or `None` when that is nothing: the node
    /// still starts, without a reserve.
    fn open(path: &Path, capacity: u64) -> Result<Option<Self>, LogError> {
        let err = |e: std::io::Error| store_err(format!("reserve {}: {e}", path.display()));
        let mut file =
            std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path).map_err(err)?;
        let len = file.metadata().map_err(err)?.len();
        let mut capacity = len.max(capacity);
        if len < capacity
            && let Err(e) = Self::preallocate(&mut file, path, len, capacity)
        {
            let _ = file.set_len(len);
            tracing::warn!(error = %e, bytes = len, "no room to preallocate the state reserve; running with what it has");
            if len == 0 {
                drop(file);
                let _ = std::fs::remove_file(path);
                return Ok(None);
            }
            capacity = len;
        }
        let mut r = Self { file, capacity, used: 0, dirty: false };
        r.used = r.scan()?.1;
        Ok(Some(r))
    }

    /// Write real zeros from `from` to `to` (not a sparse hole or an fallocate'd range: the
    /// blocks must exist now) and make them durable.
    fn preallocate(file: &mut std::fs::File, path: &Path, from: u64, to: u64) -> std::io::Result<()> {
        use std::io::{Seek, SeekFrom, Write};
        file.seek(SeekFrom::Start(from))?;
        let zeros = vec![0u8; 64 * 1024];
        let mut left = to - from;
        while left > 0 {
            let n = left.min(zeros.len() as u64) as usize;
            file.write_all(&zeros[..n])?;
            left -= n as u64;
        }
        file.sync_all()?;
        if let Some(dir) = path.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    }

    /// The valid records and the offset after the last one.
    fn scan(&self) -> Result<(Vec<(u64, Command)>, u64), LogError> {
        use std::os::unix::fs::FileExt;
        let mut buf = vec![0u8; self.capacity as usize];
        self.file.read_exact_at(&mut buf, 0).map_err(store_err)?;
        let records = wal::scan_records(&buf, None)?;
        let end = records.last().map_or(0, |r| r.2) as u64;
        Ok((records.into_iter().map(|(i, c, _)| (i, c)).collect(), end))
    }

    fn read(&self) -> Result<Vec<(u64, Command)>, LogError> {
        Ok(self.scan()?.0)
    }

    fn append(&mut self, first: u64, cmds: &[Command]) -> Result<(), LogError> {
        use std::os::unix::fs::FileExt;
        let bytes = wal::encode_records(first, cmds)?;
        if self.dirty {
            return Err(store_err("reserve not emptied yet"));
        }
        if self.used + bytes.len() as u64 + 8 > self.capacity {
            return Err(store_err(format!("reserve full ({} bytes)", self.capacity)));
        }
        self.file.write_all_at(&bytes, self.used).map_err(|e| store_err(format!("reserve: {e}")))?;
        self.file.sync_data().map_err(|e| store_err(format!("reserve: {e}")))?;
        self.used += bytes.len() as u64;
        Ok(())
    }

    /// Empty it by zeroing the first record's header: 8 bytes in one sector, so a crash leaves
    /// either all records or none. Records after it are stale and end the next scan (their
    /// indexes do not follow the new ones).
    fn clear(&mut self) -> Result<(), LogError> {
        use std::os::unix::fs::FileExt;
        self.dirty = true;
        let err = |e: std::io::Error| store_err(format!("reserve: {e}"));
        self.file.write_all_at(&[0u8; 8], 0).map_err(err)?;
        self.file.sync_data().map_err(err)?;
        self.used = 0;
        self.dirty = false;
        Ok(())
    }
}

/// An in-memory log (for tests and simulations).
#[derive(Default)]
pub struct MemLog {
    snap: Arc<MemSnapshot>,
    cmds: Vec<(u64, Command)>,
}

/// The snapshot of a [`MemLog`].
#[derive(Default)]
struct MemSnapshot(std::sync::Mutex<Option<State>>);

impl SnapshotWriter for MemSnapshot {
    fn write(&self, state: &State) -> Result<u64, LogError> {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(state.clone());
        Ok(0)
    }
}

impl Log for MemLog {
    fn append(&mut self, first: u64, cmds: &[Command]) -> Result<(), LogError> {
        for (i, c) in cmds.iter().enumerate() {
            self.cmds.push((first + i as u64, c.clone()));
        }
        Ok(())
    }
    fn load(&mut self) -> Result<(Option<State>, Vec<Command>), LogError> {
        let snap = self.snap.0.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let from = snap.as_ref().map(|s| s.index).unwrap_or(0);
        Ok((snap, self.cmds.iter().filter(|(i, _)| *i > from).map(|(_, c)| c.clone()).collect()))
    }
    fn snapshots(&self) -> Arc<dyn SnapshotWriter> {
        self.snap.clone()
    }
    fn compact(&mut self, index: u64) -> Result<(), LogError> {
        self.cmds.retain(|(i, _)| *i > index);
        Ok(())
    }
}

/// Commands between snapshots (at least; see [`SnapshotPolicy`]).
pub const SNAPSHOT_EVERY: u64 = 1000;

/// Log bytes after which a snapshot starts whatever the other bounds say.
pub const SNAPSHOT_LOG_BYTES: u64 = 64 * 1024 * 1024;

/// When [`Store`] starts a snapshot: once the log since the last one holds `every` commands
/// *and* at least `1/ratio` of the last snapshot's size in bytes, or `max_log_bytes` whatever
/// the count. The ratio keeps the work of snapshots proportional to the change, not to the
/// state's size (a 150 MB state is not written again after every 1,000 small writes); the two
/// bounds keep the log, and so a restart's replay, short.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SnapshotPolicy {
    /// Commands since the last snapshot.
    pub every: u64,
    /// The log since the last snapshot must hold at least this fraction (1/ratio) of its size.
    pub ratio: u64,
    /// Log bytes that start a snapshot regardless.
    pub max_log_bytes: u64,
}

impl Default for SnapshotPolicy {
    fn default() -> Self {
        Self { every: SNAPSHOT_EVERY, ratio: 4, max_log_bytes: SNAPSHOT_LOG_BYTES }
    }
}

/// A snapshot being written on its own thread.
struct Snapshotting {
    index: u64,
    /// The snapshot's size in bytes, and how long writing it took.
    handle: std::thread::JoinHandle<Result<(u64, std::time::Duration), LogError>>,
}

/// The state plus the log that makes it durable.
///
/// When an append fails (say the disk is full) the store enters a failed mode, shown by
/// [`Store::failure`]: ordinary commands are refused with [`LogError::Unwritable`], while
/// commands that stop work ([`Command::stops_work`]) are written to the log's reserve and
/// applied, so a runaway app can still be stopped. [`Store::recover`] (the driver retries it
/// with backoff) reopens the log and moves the reserved commands into it; nothing acknowledged
/// is lost, and nothing refused was applied.
pub struct Store {
    log: Box<dyn Log>,
    state: State,
    failure: Option<String>,
    policy: SnapshotPolicy,
    /// `(index, log bytes)` when the last snapshot was started.
    last_snapshot: (u64, u64),
    /// Size of the last snapshot written.
    snapshot_size: u64,
    /// The snapshot being written, if any.
    snapshotting: Option<Snapshotting>,
    /// Snapshots written since open.
    snapshots_written: u64,
    /// Told of every durable append (replicas stream the commands).
    feed: Option<Feed>,
}

/// Called with `(first index, commands)` after each durable append, in order.
pub type Feed = Box<dyn FnMut(u64, &[Command]) + Send>;

impl Store {
    /// Open: load the snapshot and replay the log after it.
    pub fn open(mut log: Box<dyn Log>, datacenter: &str) -> Result<Self, LogError> {
        let (snap, cmds) = log.load()?;
        let mut state = snap.unwrap_or_else(|| State::new(datacenter));
        state.rebuild_indexes();
        let last_snapshot = (state.index, log.appended_bytes());
        for cmd in &cmds {
            if state.apply(cmd).is_err() {
                // A logged command applied once; replaying it cannot fail unless the
                // encoding changed. Count it so indexes stay aligned with the log.
                state.index += 1;
            }
        }
        Ok(Self {
            log,
            state,
            failure: None,
            policy: SnapshotPolicy::default(),
            last_snapshot,
            snapshot_size: 0,
            snapshotting: None,
            snapshots_written: 0,
            feed: None,
        })
    }

    /// Tell `feed` of every command appended from now on, after it is durable and before the
    /// state moves past it (replicas apply the same commands in the same order).
    pub fn set_feed(&mut self, feed: Feed) {
        self.feed = Some(feed);
    }

    /// When to snapshot from now on.
    pub fn set_snapshot_policy(&mut self, policy: SnapshotPolicy) {
        self.policy = policy;
    }

    /// Snapshots written (durable, log compacted) since open.
    pub fn snapshots_written(&self) -> u64 {
        self.snapshots_written
    }

    /// Whether a snapshot is being written.
    pub fn snapshot_in_progress(&self) -> bool {
        self.snapshotting.is_some()
    }

    /// Wait for the snapshot being written, if any, and compact the log after it.
    pub fn wait_snapshot(&mut self) {
        if let Some(s) = self.snapshotting.take() {
            self.snapshot_done(s);
        }
    }

    /// Keep at most `n` versions of each app from now on (at least 1): a logged
    /// [`Command::SetMaxAppVersions`] when the state keeps another number, nothing otherwise.
    pub fn set_max_versions(&mut self, n: usize) -> Result<(), LogError> {
        let Some(cmd) = self.max_versions_command(n) else {
            return Ok(());
        };
        self.propose(vec![cmd])?.remove(0).map(|_| ()).map_err(|e| LogError::Store(e.to_string()))
    }

    /// The current state.
    pub fn state(&self) -> &State {
        &self.state
    }

    /// Why the log cannot be written, while it cannot (until [`Store::recover`] succeeds).
    pub fn failure(&self) -> Option<&str> {
        self.failure.as_deref()
    }

    /// Apply a batch: each command either applies (and is logged) or is rejected with its
    /// error. Everything that applied is written in one durable append before it is visible.
    /// While the log fails, a batch applies only if every command in it stops work and fits in
    /// the reserve; otherwise nothing of it applies.
    pub fn propose(&mut self, cmds: Vec<Command>) -> Result<Vec<Result<Changes, ApplyError>>, LogError> {
        // The blocking writes make the future ready at its first poll.
        futures_util::FutureExt::now_or_never(self.propose_with(cmds, false))
            .unwrap_or_else(|| Err(LogError::Store("a blocking write did not complete".into())))
    }

    /// Whether [`Store::propose_async`] waits without blocking ([`Log::writes_async`]).
    pub fn writes_async(&self) -> bool {
        self.log.writes_async()
    }

    /// [`Store::propose`], awaiting the log's write instead of blocking on it: a replicated
    /// log's driver goes on with other work (or, in a simulation on one thread, lets the
    /// replication run) until a quorum has the batch.
    pub async fn propose_async(&mut self, cmds: Vec<Command>) -> Result<Vec<Result<Changes, ApplyError>>, LogError> {
        self.propose_with(cmds, true).await
    }

    /// [`Store::set_max_versions`], awaiting the log's write ([`Store::propose_async`]).
    pub async fn set_max_versions_async(&mut self, n: usize) -> Result<(), LogError> {
        let Some(cmd) = self.max_versions_command(n) else {
            return Ok(());
        };
        self.propose_async(vec![cmd]).await?.remove(0).map(|_| ()).map_err(|e| LogError::Store(e.to_string()))
    }

    /// The command that keeps at most `n` versions of each app, if the state keeps another
    /// number (see [`Store::set_max_versions`]).
    fn max_versions_command(&self, n: usize) -> Option<Command> {
        let same = self.state.keep_versions() == n.max(1) && self.state.max_versions != 0;
        (!same).then_some(Command::SetMaxAppVersions { keep: n })
    }

    async fn propose_with(
        &mut self,
        cmds: Vec<Command>,
        wait: bool,
    ) -> Result<Vec<Result<Changes, ApplyError>>, LogError> {
        if self.snapshotting.as_ref().is_some_and(|s| s.handle.is_finished()) {
            self.wait_snapshot();
        }
        let mut next = self.state.clone();
        let first = next.index + 1;
        let mut applied = Vec::new();
        let mut results = Vec::with_capacity(cmds.len());
        for cmd in cmds {
            match next.apply(&cmd) {
                Ok(ch) => {
                    applied.push(cmd);
                    results.push(Ok(ch));
                }
                Err(e) => results.push(Err(e)),
            }
        }
        if applied.is_empty() {
            // A rejection (e.g. a CAS on an old index) is only true if no other writer moved
            // the state meanwhile: with a replicated log, if this node still leads.
            if !results.is_empty() && self.failure.is_none() {
                if wait { self.log.confirm_async().await? } else { self.log.confirm()? }
            }
            return Ok(results);
        }
        if self.failure.is_none() {
            let written =
                if wait { self.log.append_async(first, &applied).await } else { self.log.append(first, &applied) };
            match written {
                Ok(()) => {
                    self.state = next;
                    if let Some(f) = &mut self.feed {
                        f(first, &applied);
                    }
                    self.maybe_snapshot();
                    return Ok(results);
                }
                Err(e) => {
                    tracing::error!(error = %e, "state log write failed; only commands that stop tasks are accepted until it recovers");
                    self.failure = Some(e.cause());
                }
            }
        }
        let cause = self.failure.clone().unwrap_or_default();
        if !applied.iter().all(|c| c.stops_work(&self.state)) {
            return Err(LogError::Unwritable(cause));
        }
        let reserved = if wait {
            self.log.append_reserved_async(first, &applied).await
        } else {
            self.log.append_reserved(first, &applied)
        };
        match reserved {
            Ok(()) => {
                self.state = next;
                if let Some(f) = &mut self.feed {
                    f(first, &applied);
                }
                Ok(results)
            }
            Err(e) => Err(LogError::Unwritable(format!("{cause}; {}", e.cause()))),
        }
    }

    /// Start a snapshot on its own thread when the log since the last one is long enough (see
    /// [`SnapshotPolicy`]). The state is a persistent map, so the copy it writes costs O(1) and
    /// appends go on meanwhile; the log entries it covers are dropped once it is durable.
    fn maybe_snapshot(&mut self) {
        if self.snapshotting.is_some() {
            return;
        }
        let (index, bytes) = self.last_snapshot;
        let commands = self.state.index - index;
        let log_bytes = self.log.appended_bytes().saturating_sub(bytes);
        let p = self.policy;
        let due = (commands >= p.every && log_bytes.saturating_mul(p.ratio.max(1)) >= self.snapshot_size)
            || (commands > 0 && log_bytes >= p.max_log_bytes);
        if !due {
            return;
        }
        // Counted from the start, so a failing snapshot is tried again only after as much log.
        self.last_snapshot = (self.state.index, self.log.appended_bytes());
        let writer = self.log.snapshots();
        let state = self.state.clone();
        let index = state.index;
        let spawned = std::thread::Builder::new().name("mesh-snapshot".into()).spawn(move || {
            let started = std::time::Instant::now();
            writer.write(&state).map(|size| (size, started.elapsed()))
        });
        match spawned {
            Ok(handle) => self.snapshotting = Some(Snapshotting { index, handle }),
            Err(e) => {
                tracing::warn!(error = %e, "cannot start a snapshot thread; the log keeps growing until the next try")
            }
        }
    }

    /// A snapshot thread ended: on success the log may drop what it covers.
    fn snapshot_done(&mut self, s: Snapshotting) {
        let result = s.handle.join().unwrap_or_else(|_| Err(LogError::Snapshot("the snapshot thread panicked".into())));
        match result.and_then(|written| self.log.compact(s.index).map(|()| written)) {
            Ok((size, took)) => {
                tracing::info!(index = s.index, bytes = size, ms = took.as_millis() as u64, "snapshot written");
                self.snapshot_size = size;
                self.snapshots_written += 1;
            }
            // The log is untouched: it keeps growing until a later snapshot succeeds.
            Err(e) => tracing::warn!(error = %e, "snapshot failed; the log keeps growing until the next try"),
        }
    }

    /// After a failure: reopen the log, move the reserved commands into it and check that it
    /// holds exactly what was acknowledged. On success the store accepts every command again;
    /// on error it stays failed (call again later).
    pub fn recover(&mut self) -> Result<(), LogError> {
        if self.failure.is_none() {
            return Ok(());
        }
        self.log.recover(self.state.index)?;
        tracing::info!(index = self.state.index, "state log recovered");
        self.failure = None;
        Ok(())
    }
}

impl Drop for Store {
    /// A snapshot being written is finished, so a store opened next on the same files never
    /// meets a writer of the old one.
    fn drop(&mut self) {
        self.wait_snapshot();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn app(id: &str, n: u32) -> App {
        App::from_json(&json!({"id": id, "cmd": "sleep 100", "instances": n}), None).unwrap()
    }

    fn put(a: App, now: Millis, dep: &str) -> Command {
        Command::PutApp { app: a, now, deployment_id: dep.into(), create_only: true, force: false }
    }

    fn task(id: &str, app: &str) -> Task {
        Task {
            id: TaskId::from(id),
            framework_id: FrameworkId::from("marathon"),
            app_id: Some(AppId::parse(app).unwrap()),
            agent_id: AgentId::from("n1"),
            host: "n1".into(),
            ports: vec![31000],
            service_ports: vec![],
            state: TaskState::Staging,
            staged_at: 1,
            started_at: None,
            version: 1,
            resources: Resources::scalars(0.1, 32.0, 0.0),
            kill_requested: false,
            message: String::new(),
            health: Vec::new(),
            unreachable_since: None,
            inactive: false,
        }
    }

    #[test]
    fn rejected_commands_change_nothing_and_are_not_logged() {
        let mut store = Store::open(Box::new(MemLog::default()), "dc1").unwrap();
        let r = store.propose(vec![put(app("/a", 1), 10, "d1")]).unwrap();
        assert!(r[0].is_ok());
        let before = store.state().clone();
        let r = store.propose(vec![put(app("/a", 2), 11, "d2")]).unwrap();
        assert_eq!(r[0], Err(ApplyError::AppExists(AppId::parse("/a").unwrap())));
        assert_eq!(store.state(), &before);
        // locked by d1 until it ends
        let r = store
            .propose(vec![Command::PutApp {
                app: app("/a", 2),
                now: 12,
                deployment_id: "d3".into(),
                create_only: false,
                force: false,
            }])
            .unwrap();
        assert!(matches!(r[0], Err(ApplyError::Locked(ref d)) if d == "d1"));
        let r = store
            .propose(vec![Command::PutApp {
                app: app("/a", 2),
                now: 12,
                deployment_id: "d3".into(),
                create_only: false,
                force: true,
            }])
            .unwrap();
        assert!(r[0].is_ok());
        assert!(!store.state().deployments.contains_key("d1"));
    }

    /// Even a definition that bypassed validation (or a very late failure time) cannot make the
    /// delay wrap around to "already due": the arithmetic saturates.
    #[test]
    fn launch_delay_arithmetic_saturates() {
        for (backoff, factor, max) in [(1e300, 1.15, 1e300), (1.0, 1e300, 1e300), (f64::MAX, f64::MAX, f64::MAX)] {
            let mut s = State::new("dc1");
            let mut a = app("/crash", 1);
            a.backoff_seconds = backoff;
            a.backoff_factor = factor;
            a.max_launch_delay_seconds = max;
            s.apply(&put(a, 0, "d")).unwrap();
            let mut last = 0;
            for i in 0..4u64 {
                let id = format!("t{i}");
                s.apply(&Command::LaunchTasks { tasks: vec![task(&id, "/crash")] }).unwrap();
                let at = 1_000_000 + i;
                s.apply(&Command::TaskStatus {
                    task_id: TaskId::from(id.as_str()),
                    state: TaskState::Failed,
                    message: "exited with status 1".into(),
                    at,
                })
                .unwrap();
                let rec = &s.apps[&AppId::parse("/crash").unwrap()];
                assert!(rec.delay.delay_ms >= last, "{backoff} {factor} {max}: the delay never shrinks");
                assert!(rec.delay.until > at, "{backoff} {factor} {max}: launch after {at} is still delayed");
                last = rec.delay.delay_ms;
            }
        }
    }

    #[test]
    fn failures_grow_the_launch_delay_and_record_last_failure() {
        let mut s = State::new("dc1");
        let mut a = app("/crash", 1);
        a.backoff_seconds = 1.0;
        a.backoff_factor = 2.0;
        s.apply(&put(a, 0, "d")).unwrap();
        let mut delays = Vec::new();
        for i in 0..4 {
            let id = format!("t{i}");
            s.apply(&Command::LaunchTasks { tasks: vec![task(&id, "/crash")] }).unwrap();
            s.apply(&Command::TaskStatus {
                task_id: TaskId::from(id.as_str()),
                state: TaskState::Failed,
                message: "exited with status 1".into(),
                at: 1000 * i,
            })
            .unwrap();
            delays.push(s.apps[&AppId::parse("/crash").unwrap()].delay.delay_ms);
        }
        assert_eq!(delays, vec![1000, 2000, 4000, 8000]);
        let rec = &s.apps[&AppId::parse("/crash").unwrap()];
        assert_eq!(rec.last_failure.as_ref().unwrap().message, "exited with status 1");
        assert_eq!(rec.delay.until, 3000 + 8000);
        assert!(s.tasks.is_empty());
    }

    #[test]
    fn running_tasks_enter_and_leave_the_catalog() {
        let mut s = State::new("dc1");
        s.apply(&put(app("/prod/web", 1), 0, "d")).unwrap();
        s.apply(&Command::LaunchTasks { tasks: vec![task("t1", "/prod/web")] }).unwrap();
        let ch = s
            .apply(&Command::TaskStatus {
                task_id: "t1".into(),
                state: TaskState::Running,
                message: String::new(),
                at: 5,
            })
            .unwrap();
        assert!(ch.catalog);
        assert_eq!(s.catalog.services["web-prod"].values().find(|i| i.id == "t1").unwrap().port, 31000);
        let idx = s.catalog.index;
        s.apply(&Command::KillTasks { ids: vec!["t1".into()], scale: false, now: 6, deployment_id: None }).unwrap();
        assert!(s.catalog.services.get("web-prod").is_none());
        assert!(s.catalog.index > idx);
    }

    #[test]
    fn synced_services_replace_their_source_only() {
        let mut s = State::new("dc1");
        s.apply(&put(app("/web", 1), 0, "d")).unwrap();
        s.apply(&Command::LaunchTasks { tasks: vec![task("t1", "/web")] }).unwrap();
        s.apply(&Command::TaskStatus {
            task_id: "t1".into(),
            state: TaskState::Running,
            message: String::new(),
            at: 5,
        })
        .unwrap();
        let inst = |id: &str, svc: &str| ServiceInstance {
            id: id.into(),
            service: svc.into(),
            node: String::new(),
            address: None,
            port: 32768,
            tags: vec![],
            meta: BTreeMap::new(),
            health: Health::Passing,
            source_health: Default::default(),
            weights: Default::default(),
            create_index: 0,
            modify_index: 0,
            extra: Default::default(),
        };
        let sync = |v: Vec<ServiceInstance>| Command::SyncServices {
            node: "n1".into(),
            source: "registrator".into(),
            instances: v,
        };
        s.apply(&sync(vec![inst("c1:80", "ext"), inst("c2:80", "ext")])).unwrap();
        assert_eq!(s.catalog.services["ext"].len(), 2);
        assert_eq!(s.catalog.services["ext"].values().find(|i| i.id == "c1:80").unwrap().node, "n1");
        let idx = s.catalog.index;
        let ch = s.apply(&sync(vec![inst("c1:80", "ext"), inst("c2:80", "ext")])).unwrap();
        assert!(!ch.catalog, "the same set again changes nothing");
        assert_eq!(s.catalog.index, idx);
        s.apply(&sync(vec![inst("c2:80", "ext")])).unwrap();
        assert_eq!(s.catalog.services["ext"].len(), 1);
        s.apply(&sync(vec![])).unwrap();
        assert!(s.catalog.services.get("ext").is_none());
        assert_eq!(s.catalog.services["web"].len(), 1, "task instances are not touched");
    }

    #[test]
    fn redb_log_survives_reopen_and_snapshots() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        {
            let mut store = Store::open(Box::new(RedbLog::open(&path).unwrap()), "dc1").unwrap();
            store.propose(vec![put(app("/a", 1), 1, "d1"), put(app("/b", 2), 2, "d2")]).unwrap();
            let mut log = RedbLog::open(&dir.path().join("other.redb")).unwrap();
            log.snapshot(store.state()).unwrap();
        }
        let store = Store::open(Box::new(RedbLog::open(&path).unwrap()), "dc1").unwrap();
        assert_eq!(store.state().apps.len(), 2);
        assert_eq!(store.state().index, 2);
        let state = store.state().clone();
        drop(store);
        // snapshot + tail replay
        let mut log = RedbLog::open(&path).unwrap();
        log.snapshot(&state).unwrap();
        log.append(3, &[Command::ResetDelay { id: AppId::parse("/a").unwrap() }]).unwrap();
        let store = Store::open(Box::new(log), "dc1").unwrap();
        assert_eq!(store.state().index, 3);
    }

    /// A log that fails on demand, with a reserve of `reserve_cap` commands; its contents are
    /// shared so a test can open a new store on what was durably written.
    /// The durable log and the reserve of a [`FlakyLog`].
    type Shared = std::sync::Arc<std::sync::Mutex<(MemLog, Vec<(u64, Command)>)>>;

    #[derive(Clone, Default)]
    struct FlakyLog {
        inner: Shared,
        failing: std::sync::Arc<std::sync::atomic::AtomicBool>,
        reserve_cap: usize,
    }

    impl Log for FlakyLog {
        fn append(&mut self, first: u64, cmds: &[Command]) -> Result<(), LogError> {
            if self.failing.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(LogError::Store("I/O error: No space left on device (os error 28)".into()));
            }
            self.inner.lock().unwrap().0.append(first, cmds)
        }
        fn load(&mut self) -> Result<(Option<State>, Vec<Command>), LogError> {
            self.inner.lock().unwrap().0.load()
        }
        fn snapshots(&self) -> Arc<dyn SnapshotWriter> {
            self.inner.lock().unwrap().0.snapshots()
        }
        fn compact(&mut self, index: u64) -> Result<(), LogError> {
            self.inner.lock().unwrap().0.compact(index)
        }
        fn append_reserved(&mut self, first: u64, cmds: &[Command]) -> Result<(), LogError> {
            let mut g = self.inner.lock().unwrap();
            if g.1.len() + cmds.len() > self.reserve_cap {
                return Err(LogError::Store("reserve full".into()));
            }
            g.1.extend(cmds.iter().enumerate().map(|(i, c)| (first + i as u64, c.clone())));
            Ok(())
        }
        fn recover(&mut self, acknowledged: u64) -> Result<(), LogError> {
            if self.failing.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(LogError::Store("I/O error: No space left on device (os error 28)".into()));
            }
            let mut g = self.inner.lock().unwrap();
            let reserved = std::mem::take(&mut g.1);
            for (i, c) in reserved {
                g.0.append(i, &[c])?;
            }
            let last = g.0.cmds.last().map(|(i, _)| *i).unwrap_or(0);
            if last != acknowledged {
                return Err(LogError::Diverged { durable: last, acknowledged });
            }
            Ok(())
        }
    }

    #[test]
    fn a_failing_log_refuses_work_takes_stops_and_recovers_without_losing_anything() {
        let log = FlakyLog { reserve_cap: 2, ..Default::default() };
        let mut store = Store::open(Box::new(log.clone()), "dc1").unwrap();
        store.propose(vec![put(app("/a", 3), 1, "d1"), put(app("/b", 1), 2, "d2")]).unwrap();
        store.propose(vec![Command::EndDeployment { id: "d1".into() }]).unwrap();
        assert!(store.failure().is_none());

        log.failing.store(true, std::sync::atomic::Ordering::SeqCst);
        let before = store.state().clone();
        let e = store.propose(vec![put(app("/c", 1), 3, "d3")]).unwrap_err();
        assert!(matches!(e, LogError::Unwritable(_)), "{e}");
        assert_eq!(e.to_string().matches("state store").count(), 1, "{e}");
        assert_eq!(store.state(), &before, "a refused write changes nothing");
        assert!(store.failure().unwrap().contains("No space left"));
        // scaling up is refused, scaling down (same definition) goes to the reserve
        let scale = |n| Command::PutApp {
            app: app("/a", n),
            now: 4,
            deployment_id: format!("s{n}"),
            create_only: false,
            force: true,
        };
        assert!(store.propose(vec![scale(5)]).is_err());
        store.propose(vec![scale(1)]).unwrap()[0].as_ref().unwrap();
        assert_eq!(store.state().apps[&AppId::parse("/a").unwrap()].app.instances, 1);
        let del =
            Command::DeleteApp { id: AppId::parse("/b").unwrap(), now: 5, deployment_id: "x".into(), force: true };
        store.propose(vec![del]).unwrap()[0].as_ref().unwrap();
        assert!(!store.state().apps.contains_key(&AppId::parse("/b").unwrap()));
        // the reserve is full now
        let kill = Command::KillTasks { ids: vec![], scale: false, now: 6, deployment_id: None };
        assert!(store.propose(vec![kill]).is_err());
        assert!(store.recover().is_err(), "no recovery while writes still fail");
        assert!(store.failure().is_some());

        log.failing.store(false, std::sync::atomic::Ordering::SeqCst);
        store.recover().unwrap();
        assert!(store.failure().is_none());
        store.propose(vec![put(app("/c", 1), 7, "d3")]).unwrap()[0].as_ref().unwrap();
        let reopened = Store::open(Box::new(log.clone()), "dc1").unwrap();
        assert_eq!(reopened.state(), store.state(), "everything acknowledged is durable, nothing else");
    }

    /// A mounted tmpfs, unmounted when dropped.
    pub(super) struct Tmpfs(std::path::PathBuf);

    impl Drop for Tmpfs {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }

    /// An 8 MiB tmpfs at `mnt` (a full disk within reach). `None` (the test is skipped) where it
    /// cannot be mounted (not root), unless `MESH_REQUIRE_TMPFS` is set (CI), then it fails.
    pub(super) fn small_tmpfs(mnt: &Path) -> Option<Tmpfs> {
        std::fs::create_dir_all(mnt).unwrap();
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=8m", "tmpfs"])
            .arg(mnt)
            .status()
            .is_ok_and(|s| s.success());
        if !mounted {
            assert!(std::env::var_os("MESH_REQUIRE_TMPFS").is_none(), "cannot mount a tmpfs");
            eprintln!("skipped: cannot mount a tmpfs (not root?)");
            return None;
        }
        Some(Tmpfs(mnt.to_path_buf()))
    }

    /// A real full disk: redb on a small tmpfs, filled up, then freed. Needs root (mount);
    /// skipped without it.
    #[test]
    fn redb_log_recovers_after_enospc_without_losing_acknowledged_commands() {
        let dir = tempfile::tempdir().unwrap();
        let mnt = dir.path().join("fs");
        let Some(_guard) = small_tmpfs(&mnt) else { return };
        let path = mnt.join("state.redb");
        let mut store = Store::open(Box::new(RedbLog::open(&path).unwrap()), "dc1").unwrap();
        store.propose(vec![put(app("/a", 2), 1, "d1")]).unwrap();
        // fill the disk
        let filler = mnt.join("filler");
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&filler).unwrap();
            let chunk = vec![1u8; 64 * 1024];
            while f.write_all(&chunk).is_ok() {}
            while f.write_all(&[1u8; 512]).is_ok() {}
        }
        let mut acked = 1;
        let mut refused = None;
        for i in 0..2000u64 {
            let mut a = app(&format!("/big{i}"), 1);
            a.env.insert("PAD".into(), serde_json::Value::from("x".repeat(16 * 1024)));
            match store.propose(vec![put(a, 10 + i, &format!("b{i}"))]) {
                Ok(_) => acked += 1,
                Err(e) => {
                    refused = Some(e);
                    break;
                }
            }
        }
        let e = refused.expect("the full disk refuses a write");
        // A reserve cannot be set up on the full disk: none, rather than a node that cannot start.
        let other = mnt.join("other.reserve");
        assert!(Reserve::open(&other, DEFAULT_RESERVE_BYTES).unwrap().is_none());
        assert!(!other.exists());
        assert!(e.to_string().contains("No space left"), "{e}");
        assert_eq!(store.state().index, acked);
        // stopping work goes to the reserve
        let del =
            Command::DeleteApp { id: AppId::parse("/a").unwrap(), now: 9999, deployment_id: "x".into(), force: true };
        store.propose(vec![del]).unwrap()[0].as_ref().unwrap();
        std::fs::remove_file(&filler).unwrap();
        store.recover().unwrap();
        store.propose(vec![put(app("/after", 1), 99999, "z")]).unwrap()[0].as_ref().unwrap();
        let state = store.state().clone();
        drop(store);
        let reopened = Store::open(Box::new(RedbLog::open(&path).unwrap()), "dc1").unwrap();
        assert_eq!(reopened.state(), &state, "acknowledged commands survive, in order");
        assert!(!state.apps.contains_key(&AppId::parse("/a").unwrap()));
    }

    #[test]
    fn reserved_commands_replace_unacknowledged_log_entries_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        let reset = |a: &str| Command::ResetDelay { id: AppId::parse(a).unwrap() };
        {
            let mut log = RedbLog::open(&path).unwrap();
            log.append(1, &[put(app("/a", 1), 1, "d1"), put(app("/b", 1), 2, "d2")]).unwrap();
            // A commit that reported failure but landed (never acknowledged) ...
            log.append(3, &[reset("/a"), reset("/a")]).unwrap();
            // ... then the acknowledged commands at those indexes went to the reserve; a crash.
            log.append_reserved(3, &[reset("/b")]).unwrap();
        }
        let mut log = RedbLog::open(&path).unwrap();
        let (_, cmds) = log.load().unwrap();
        assert_eq!(cmds.len(), 3, "the reserve replaces the unacknowledged tail: {cmds:?}");
        assert_eq!(cmds[2], reset("/b"));
        // The reserve is empty now: opening again changes nothing, and it is usable again.
        log.append(4, &[reset("/a")]).unwrap();
        log.append_reserved(5, &[reset("/b")]).unwrap();
        drop(log);
        let mut log = RedbLog::open(&path).unwrap();
        assert_eq!(
            log.load().unwrap().1,
            vec![cmds[0].clone(), cmds[1].clone(), reset("/b"), reset("/a"), reset("/b")]
        );
        drop(log);
        assert_eq!(RedbLog::open(&path).unwrap().load().unwrap().1.len(), 5);
        // Reserved commands are not lost when the next run wants no reserve.
        let mut log = RedbLog::open(&path).unwrap();
        log.append_reserved(6, &[reset("/a")]).unwrap();
        drop(log);
        let mut log = RedbLog::open_with_reserve(&path, 0).unwrap();
        assert_eq!(log.load().unwrap().1.len(), 6);
        assert!(!path.with_extension("reserve").exists());
        assert!(log.append_reserved(7, &[reset("/a")]).is_err(), "no reserve");
    }

    /// A state with a bit of everything: apps (with JSON env values), tasks, an agent (an IP
    /// address), catalog instances and checks, KV keys with binary values and a session.
    fn varied_commands(n: u64) -> Vec<Command> {
        use crate::kv::{KvOp, KvValue, SetMode};
        let mut out = vec![Command::RegisterAgent {
            agent: Agent {
                id: AgentId::from("n1"),
                hostname: "n1".into(),
                address: "10.1.2.3".parse().unwrap(),
                resources: Resources::scalars(4.0, 4096.0, 10_000.0),
                attributes: [("rack".to_owned(), "r1".to_owned())].into_iter().collect(),
                registered_at: 1,
                runtimes: vec!["process".into()],
                wan_address: None,
            },
            datacenter: "dc1".into(),
        }];
        for i in 0..n {
            match i % 4 {
                0 => {
                    let mut a = app(&format!("/app{i}"), 1);
                    a.env.insert("N".into(), serde_json::Value::from(i));
                    out.push(put(a, i, &format!("d{i}")));
                }
                1 => out.push(Command::LaunchTasks { tasks: vec![task(&format!("t{i}"), &format!("/app{}", i - 1))] }),
                _ => out.push(Command::Kv(KvOp::Set {
                    key: format!("k/{}", i % 50),
                    value: KvValue::from(vec![0u8, 255, (i % 256) as u8, b'"']),
                    flags: i,
                    mode: SetMode::Plain,
                    now: i,
                })),
            }
        }
        out
    }

    /// A log in memory that a test can reopen (the store owns its log).
    #[derive(Clone, Default)]
    struct SharedLog(std::sync::Arc<std::sync::Mutex<MemLog>>);

    impl Log for SharedLog {
        fn append(&mut self, first: u64, cmds: &[Command]) -> Result<(), LogError> {
            self.0.lock().unwrap().append(first, cmds)
        }
        fn load(&mut self) -> Result<(Option<State>, Vec<Command>), LogError> {
            self.0.lock().unwrap().load()
        }
        fn snapshots(&self) -> Arc<dyn SnapshotWriter> {
            self.0.lock().unwrap().snapshots()
        }
        fn compact(&mut self, index: u64) -> Result<(), LogError> {
            self.0.lock().unwrap().compact(index)
        }
    }

    /// A random command (a quarter of them on behalf of one of 6 client request ids, so
    /// repeats are refused as often as they apply).
    fn random_command(rng: &mut rand::rngs::StdRng, now: Millis) -> Command {
        use rand::Rng;
        let cmd = random_plain_command(rng, now);
        if rng.random_bool(0.25) {
            Command::Once { request: format!("r{}", rng.random_range(0..6)), cmd: Box::new(cmd) }
        } else {
            cmd
        }
    }

    /// A random command over a small world (3 apps, 8 tasks, 2 agents, 3 keys, 2 sessions,
    /// 2 services), so that commands often meet each other's effects, and often are rejected.
    fn random_plain_command(rng: &mut rand::rngs::StdRng, now: Millis) -> Command {
        use crate::kv::{KvOp, KvValue, SessionOp, SetMode};
        use rand::Rng;
        let app_id = |rng: &mut rand::rngs::StdRng| format!("/a{}", rng.random_range(0..3));
        let task_id = |rng: &mut rand::rngs::StdRng| format!("t{}", rng.random_range(0..8));
        let agent = |rng: &mut rand::rngs::StdRng| format!("n{}", rng.random_range(1..3));
        let dep = |rng: &mut rand::rngs::StdRng| format!("d{}", rng.random_range(0..4));
        let key = |rng: &mut rand::rngs::StdRng| format!("k/{}", rng.random_range(0..3));
        let session = |rng: &mut rand::rngs::StdRng| format!("s{}", rng.random_range(0..2));
        match rng.random_range(0..20) {
            0 | 1 => {
                let mut a = app(&app_id(rng), rng.random_range(0..4));
                a.env.insert("V".into(), serde_json::Value::from(rng.random_range(0..3)));
                Command::PutApp {
                    app: a,
                    now,
                    deployment_id: dep(rng),
                    create_only: rng.random_bool(0.5),
                    force: rng.random_bool(0.5),
                }
            }
            2 => Command::DeleteApp {
                id: AppId::parse(&app_id(rng)).unwrap(),
                now,
                deployment_id: dep(rng),
                force: rng.random_bool(0.5),
            },
            3 => Command::RegisterAgent {
                agent: Agent {
                    id: AgentId::from(agent(rng).as_str()),
                    hostname: "h".into(),
                    address: "10.0.0.1".parse().unwrap(),
                    resources: Resources::scalars(4.0, 4096.0, 0.0),
                    attributes: Default::default(),
                    registered_at: now,
                    runtimes: vec!["process".into()],
                    wan_address: None,
                },
                datacenter: "dc1".into(),
            },
            4 => Command::DrainAgent { agent_id: AgentId::from(agent(rng).as_str()), drain: rng.random_bool(0.5) },
            5 | 6 => {
                let mut t = task(&task_id(rng), &app_id(rng));
                t.agent_id = AgentId::from(agent(rng).as_str());
                t.staged_at = now;
                Command::LaunchTasks { tasks: vec![t] }
            }
            7 | 8 => {
                let states = [TaskState::Running, TaskState::Finished, TaskState::Failed, TaskState::Killed];
                Command::TaskStatus {
                    task_id: TaskId::from(task_id(rng).as_str()),
                    state: states[rng.random_range(0..states.len())],
                    message: String::new(),
                    at: now,
                }
            }
            9 => Command::TaskHealth {
                task_id: TaskId::from(task_id(rng).as_str()),
                check: rng.random_range(0..2),
                result: crate::health::CheckResult { alive: rng.random_bool(0.5), ..Default::default() },
            },
            10 => Command::KillTasks {
                ids: vec![TaskId::from(task_id(rng).as_str())],
                scale: rng.random_bool(0.5),
                now,
                deployment_id: Some(dep(rng)).filter(|_| rng.random_bool(0.3)),
            },
            11 => Command::EndDeployment { id: dep(rng) },
            12 => {
                if rng.random_bool(0.5) {
                    Command::SetMaxAppVersions { keep: rng.random_range(0..4) }
                } else {
                    let config =
                        AutopilotConfig { cleanup_dead_servers: rng.random_bool(0.5), ..AutopilotConfig::default() };
                    Command::SetAutopilot {
                        config,
                        cas: Some(rng.random_range(0..40)).filter(|_| rng.random_bool(0.5)),
                    }
                }
            }
            13 | 14 => {
                let mode = match rng.random_range(0..4) {
                    0 | 1 => SetMode::Plain,
                    2 => SetMode::Cas(rng.random_range(0..40)),
                    _ => SetMode::Acquire(session(rng)),
                };
                let value = KvValue::from(vec![rng.random_range(0..255u8)]);
                Command::Kv(KvOp::Set { key: key(rng), value, flags: 0, mode, now })
            }
            15 => Command::Kv(KvOp::Delete {
                key: key(rng),
                recurse: rng.random_bool(0.2),
                cas: Some(rng.random_range(0..40)).filter(|_| rng.random_bool(0.5)),
                now,
            }),
            16 => {
                let id = session(rng);
                if rng.random_bool(0.5) {
                    let s = crate::kv::Session {
                        id,
                        name: String::new(),
                        node: agent(rng),
                        lock_delay_ns: 0,
                        behavior: Default::default(),
                        ttl: String::new(),
                        ttl_ms: 0,
                        node_checks: Vec::new(),
                        service_checks: Vec::new(),
                        create_index: 0,
                        modify_index: 0,
                        expires_at: None,
                    };
                    Command::Session(SessionOp::Create { session: s, now })
                } else {
                    Command::Session(SessionOp::Destroy { id, now })
                }
            }
            17 => {
                let node = agent(rng);
                let inst = ServiceInstance {
                    id: format!("svc{}", rng.random_range(0..2)),
                    service: "svc".into(),
                    node: node.clone(),
                    address: None,
                    port: rng.random_range(1..4),
                    tags: Vec::new(),
                    meta: Default::default(),
                    health: Health::Passing,
                    source_health: Health::Passing,
                    weights: Default::default(),
                    extra: Default::default(),
                    create_index: 0,
                    modify_index: 0,
                };
                Command::Register {
                    node,
                    node_info: None,
                    instance: Some(inst),
                    checks: Vec::new(),
                    replace_checks: false,
                }
            }
            18 => Command::Deregister {
                node: agent(rng),
                service_id: Some(format!("svc{}", rng.random_range(0..2))),
                check_id: None,
            },
            _ => Command::TaskInactive { task_id: TaskId::from(task_id(rng).as_str()) },
        }
    }

    /// Replaying the log gives the state live apply gave, rejections included: for random
    /// command sequences (proposed in random batches, snapshots taken along the way), applying
    /// every command in order to a fresh state (as a Raft follower applies committed entries,
    /// rejected ones included) gives the same results and the same state, a rejected command
    /// changes nothing, and reopening the log (snapshot + tail) gives the same state again.
    /// `MESH_REPLAY_CASES` sets the number of sequences (default 300); a failure names its seed.
    #[test]
    fn replay_equals_live_apply_for_random_command_sequences() {
        use rand::{Rng, SeedableRng};
        let cases: u64 = std::env::var("MESH_REPLAY_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(300);
        let mut rejected = 0usize;
        let mut total = 0usize;
        for seed in 0..cases {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let log = SharedLog::default();
            let mut store = Store::open(Box::new(log.clone()), "dc1").unwrap();
            store.set_snapshot_policy(SnapshotPolicy { every: 7, ratio: 1, max_log_bytes: u64::MAX });
            let mut all = Vec::new();
            let mut live = Vec::new();
            let mut now = 1_000;
            for _ in 0..rng.random_range(1..12) {
                let batch: Vec<Command> = (0..rng.random_range(1..8))
                    .map(|_| {
                        now += rng.random_range(0..2_000);
                        random_command(&mut rng, now)
                    })
                    .collect();
                all.extend(batch.clone());
                live.extend(store.propose(batch).unwrap());
                if rng.random_bool(0.3) {
                    store.wait_snapshot();
                }
            }
            store.wait_snapshot();
            // Every command applied in order to a fresh state, one at a time.
            let mut replay = State::new("dc1");
            for (i, cmd) in all.iter().enumerate() {
                let before = replay.clone();
                let r = replay.apply(cmd);
                assert_eq!(r, live[i], "seed {seed}: command {i} ({cmd:?}) gave another result on replay");
                if r.is_err() {
                    rejected += 1;
                    assert_eq!(replay, before, "seed {seed}: rejected command {i} ({cmd:?}) changed the state");
                }
            }
            total += all.len();
            assert_eq!(&replay, store.state(), "seed {seed}: replay differs from live apply");
            drop(store);
            let reopened = Store::open(Box::new(log), "dc1").unwrap();
            assert_eq!(reopened.state(), &replay, "seed {seed}: the reopened log differs");
        }
        assert!(rejected * 10 > total, "the sequences exercise rejections: {rejected} of {total}");
    }

    /// A command on behalf of a client request applies once: the repeat is refused with the
    /// first one's index (and a transaction's results), changes nothing, and is refused the
    /// same way after a snapshot round trip; a rejected first try does not count; the ids
    /// kept are bounded, oldest forgotten first.
    #[test]
    fn once_applies_a_request_id_once() {
        use crate::kv::{KvOp, KvValue, SetMode, TxnOp};
        let put = |key: &str, mode: SetMode| {
            Command::Kv(KvOp::Set { key: key.into(), value: KvValue::from(b"v".to_vec()), flags: 0, mode, now: 1 })
        };
        let once = |id: &str, cmd: Command| Command::Once { request: id.into(), cmd: Box::new(cmd) };
        let mut s = State::new("dc1");
        // A CAS that creates the key: the retry must not turn into a `false`.
        s.apply(&once("a", put("k", SetMode::Cas(0)))).unwrap();
        let index = s.index;
        let before = s.clone();
        assert_eq!(
            s.apply(&once("a", put("k", SetMode::Cas(0)))),
            Err(ApplyError::Repeated { request: "a".into(), index, txn_results: None })
        );
        assert_eq!(s, before, "a repeat changes nothing");
        // A first try that was rejected is not remembered: the next try applies.
        assert!(matches!(s.apply(&once("b", put("k", SetMode::Cas(0)))), Err(ApplyError::Kv(_))));
        s.apply(&once("b", put("k", SetMode::Cas(index)))).unwrap();
        // A transaction's repeat carries the first one's results.
        let txn = Command::KvTxn(vec![TxnOp::Get { key: "k".into() }]);
        let results = s.apply(&once("c", txn.clone())).unwrap().txn_results;
        assert!(results.as_ref().is_some_and(|r| r.len() == 1));
        match s.apply(&once("c", txn)) {
            Err(ApplyError::Repeated { txn_results, .. }) => assert_eq!(txn_results, results),
            other => panic!("{other:?}"),
        }
        // Ids are part of the saved state.
        let mut loaded: State = serde_json::from_slice(&serde_json::to_vec(&s).unwrap()).unwrap();
        loaded.rebuild_indexes();
        assert_eq!(loaded, s);
        assert!(matches!(loaded.apply(&once("a", put("k", SetMode::Plain))), Err(ApplyError::Repeated { .. })));
        assert!(matches!(loaded.apply(&once("", put("k", SetMode::Plain))), Err(ApplyError::BadRequestId(_))));
        assert!(matches!(loaded.apply(&once("x y", put("k", SetMode::Plain))), Err(ApplyError::BadRequestId(_))));
        // Bounded: after MAX_REQUESTS more, the first id is forgotten (and applies again).
        for i in 0..MAX_REQUESTS {
            loaded.apply(&once(&format!("n{i}"), put("other", SetMode::Plain))).unwrap();
        }
        assert_eq!(loaded.requests.len(), MAX_REQUESTS);
        assert!(loaded.requests.get("a").is_none() && loaded.requests.get("n0").is_some());
        loaded.apply(&once("a", put("k", SetMode::Plain))).unwrap();
        assert!(loaded.requests.get("n0").is_none(), "the oldest goes first");
    }

    /// Autopilot's configuration is a command: its indexes come from the state, `?cas=` is
    /// checked against the current modify index in apply (so every server decides the same),
    /// and a failed CAS changes nothing.
    #[test]
    fn autopilot_configuration_is_a_command_with_cas() {
        let mut s = State::new("dc1");
        assert_eq!(s.autopilot, None);
        let off = AutopilotConfig { cleanup_dead_servers: false, ..AutopilotConfig::default() };
        // The defaults have modify index 1: a CAS against anything else fails.
        let before = s.clone();
        assert_eq!(
            s.apply(&Command::SetAutopilot { config: off.clone(), cas: Some(7) }),
            Err(ApplyError::CasMismatch(1))
        );
        assert_eq!(s, before, "a failed CAS changes nothing");
        s.apply(&Command::SetAutopilot { config: off.clone(), cas: Some(1) }).unwrap();
        let set = s.autopilot.clone().unwrap();
        assert!(!set.cleanup_dead_servers);
        assert_eq!((set.create_index, set.modify_index), (s.index, s.index));
        s.apply(&Command::SetAutopilot { config: AutopilotConfig::default(), cas: None }).unwrap();
        let again = s.autopilot.clone().unwrap();
        assert_eq!((again.create_index, again.modify_index), (set.create_index, s.index));
        assert!(again.cleanup_dead_servers);
        assert_eq!(
            s.apply(&Command::SetAutopilot { config: off, cas: Some(set.modify_index) }),
            Err(ApplyError::CasMismatch(s.index))
        );
    }

    /// `--max-app-versions` is a logged command, so replay and every replica trim versions as
    /// the live state did; setting the same number again logs nothing.
    #[test]
    fn max_app_versions_is_a_logged_command() {
        let log = SharedLog::default();
        let mut store = Store::open(Box::new(log.clone()), "dc1").unwrap();
        store.set_max_versions(2).unwrap();
        let index = store.state().index;
        store.set_max_versions(2).unwrap();
        assert_eq!(store.state().index, index, "the same setting again logs nothing");
        for (i, n) in [1, 2, 3, 4].into_iter().enumerate() {
            let cmd = Command::PutApp {
                app: app("/a", n),
                now: 10 + i as Millis,
                deployment_id: format!("d{i}"),
                create_only: false,
                force: true,
            };
            store.propose(vec![cmd]).unwrap()[0].as_ref().unwrap();
        }
        let id = AppId::parse("/a").unwrap();
        assert_eq!(store.state().apps[&id].versions.len(), 2);
        let live = store.state().clone();
        drop(store);
        // A node started without the setting replays the log to the same versions.
        let reopened = Store::open(Box::new(log), "dc1").unwrap();
        assert_eq!(reopened.state(), &live);
        assert_eq!(reopened.state().keep_versions(), 2);
    }

    fn log_keys(path: &Path) -> Vec<u64> {
        use redb::{ReadableDatabase, ReadableTable};
        let db = redb::Database::create(path).unwrap();
        let tx = db.begin_read().unwrap();
        let t = tx.open_table(LOG_TABLE).unwrap();
        t.iter().unwrap().map(|e| e.unwrap().0.value()).collect()
    }

    #[test]
    fn a_restart_after_a_background_snapshot_replays_to_exactly_the_same_state() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        let mut store = Store::open(Box::new(RedbLog::open(&path).unwrap()), "dc1").unwrap();
        store.set_snapshot_policy(SnapshotPolicy { every: 100, ratio: 1, max_log_bytes: u64::MAX });
        for cmd in varied_commands(350) {
            store.propose(vec![cmd]).unwrap()[0].as_ref().unwrap();
            // Now and then, let the snapshot thread finish so the next write compacts the log.
            if store.state().index.is_multiple_of(150) {
                store.wait_snapshot();
            }
        }
        store.wait_snapshot();
        let written = store.snapshots_written();
        assert!(written >= 2, "snapshots were taken: {written}");
        let state = store.state().clone();
        drop(store);
        let keys = log_keys(&path);
        assert!(keys.len() < 351 && keys.first() > Some(&1), "the log was compacted: {keys:?}");
        let snap = FileSnapshots::new(&path.with_extension("snap")).read().unwrap().unwrap();
        assert!(snap.index > 1 && snap.index < state.index, "a snapshot and a tail to replay");
        let reopened = Store::open(Box::new(RedbLog::open(&path).unwrap()), "dc1").unwrap();
        assert_eq!(reopened.state(), &state, "snapshot + replay = the state before the restart");
        // The binary snapshot holds exactly what JSON would.
        let mut bytes = Vec::new();
        encode_state(&mut bytes, &state).unwrap();
        let mut decoded = decode_state(&bytes).unwrap();
        decoded.rebuild_indexes();
        assert_eq!(decoded, state);
    }

    /// A log whose snapshot writer waits at a gate until the test opens it.
    #[derive(Clone, Default)]
    struct GatedLog {
        inner: std::sync::Arc<std::sync::Mutex<MemLog>>,
        gate: std::sync::Arc<Gate>,
    }

    #[derive(Default)]
    struct Gate {
        open: std::sync::Mutex<bool>,
        cv: std::sync::Condvar,
        waiting: std::sync::atomic::AtomicUsize,
        inner: std::sync::Mutex<Option<Arc<dyn SnapshotWriter>>>,
    }

    impl Gate {
        fn release(&self) {
            *self.open.lock().unwrap() = true;
            self.cv.notify_all();
        }
    }

    impl SnapshotWriter for Gate {
        fn write(&self, state: &State) -> Result<u64, LogError> {
            self.waiting.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let mut open = self.open.lock().unwrap();
            while !*open {
                open = self.cv.wait(open).unwrap();
            }
            drop(open);
            let inner = self.inner.lock().unwrap().clone().unwrap();
            inner.write(state)
        }
    }

    impl Log for GatedLog {
        fn append(&mut self, first: u64, cmds: &[Command]) -> Result<(), LogError> {
            self.inner.lock().unwrap().append(first, cmds)
        }
        fn load(&mut self) -> Result<(Option<State>, Vec<Command>), LogError> {
            self.inner.lock().unwrap().load()
        }
        fn snapshots(&self) -> Arc<dyn SnapshotWriter> {
            *self.gate.inner.lock().unwrap() = Some(self.inner.lock().unwrap().snapshots());
            self.gate.clone()
        }
        fn compact(&mut self, index: u64) -> Result<(), LogError> {
            self.inner.lock().unwrap().compact(index)
        }
    }

    #[test]
    fn writes_issued_during_a_snapshot_complete_without_waiting_for_it() {
        let log = GatedLog::default();
        let mut store = Store::open(Box::new(log.clone()), "dc1").unwrap();
        store.set_snapshot_policy(SnapshotPolicy { every: 10, ratio: 1, max_log_bytes: u64::MAX });
        let cmds = varied_commands(200);
        for cmd in &cmds[..10] {
            store.propose(vec![cmd.clone()]).unwrap();
        }
        assert!(store.snapshot_in_progress(), "the 10th command started a snapshot");
        // The snapshot is stuck at the gate; every write still completes.
        for cmd in &cmds[10..] {
            store.propose(vec![cmd.clone()]).unwrap()[0].as_ref().unwrap();
        }
        assert_eq!(store.state().index, 201);
        assert!(store.snapshot_in_progress());
        assert_eq!(store.snapshots_written(), 0);
        assert_eq!(log.inner.lock().unwrap().cmds.len(), 201, "nothing compacted before the snapshot is durable");
        log.gate.release();
        store.wait_snapshot();
        assert_eq!(store.snapshots_written(), 1);
        assert_eq!(log.gate.waiting.load(std::sync::atomic::Ordering::SeqCst), 1, "one snapshot at a time");
        assert_eq!(log.inner.lock().unwrap().cmds.first().map(|c| c.0), Some(11), "entries 1..=10 compacted");
        let state = store.state().clone();
        drop(store);
        let reopened = Store::open(Box::new(log.clone()), "dc1").unwrap();
        assert_eq!(reopened.state(), &state);
    }

    #[test]
    fn a_crash_between_the_snapshot_and_the_compaction_recovers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        let cmds = varied_commands(40);
        let state = {
            let mut log = RedbLog::open(&path).unwrap();
            log.append(1, &cmds[..30]).unwrap();
            let mut s = State::new("dc1");
            for c in &cmds[..30] {
                s.apply(c).unwrap();
            }
            // The snapshot file is durable; the process dies before the log hears of it, and
            // leaves a half-written next snapshot behind.
            log.snapshots().write(&s).unwrap();
            std::fs::write(path.with_extension("snap.tmp"), b"MESHSNAP garbage").unwrap();
            s
        };
        assert_eq!(log_keys(&path).len(), 30);
        let mut store = Store::open(Box::new(RedbLog::open(&path).unwrap()), "dc1").unwrap();
        assert_eq!(store.state().index, 30);
        let mut expect = state.clone();
        expect.rebuild_indexes();
        assert_eq!(store.state(), &expect);
        // The next write drops what the snapshot covers.
        store.propose(cmds[30..].to_vec()).unwrap();
        let after = store.state().clone();
        drop(store);
        assert_eq!(log_keys(&path), (31..=41).collect::<Vec<_>>());
        let reopened = Store::open(Box::new(RedbLog::open(&path).unwrap()), "dc1").unwrap();
        assert_eq!(reopened.state(), &after);
        drop(reopened);
        // A snapshot file that does not check out is an error, not a silently shorter state.
        let snap = path.with_extension("snap");
        let mut bytes = std::fs::read(&snap).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&snap, bytes).unwrap();
        let e = RedbLog::open(&path).unwrap().load().unwrap_err();
        assert!(e.to_string().contains("checksum"), "{e}");
    }

    #[test]
    fn a_data_dir_with_a_json_snapshot_still_opens_and_moves_to_snapshot_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        let cmds = varied_commands(30);
        {
            // What the previous release wrote: a JSON snapshot in `meta`, the log after it.
            let mut s = State::new("dc1");
            for c in &cmds[..20] {
                s.apply(c).unwrap();
            }
            let db = open_db(&path).unwrap();
            let tx = db.begin_write().unwrap();
            {
                let mut meta = tx.open_table(META_TABLE).unwrap();
                let json = serde_json::to_vec(&Envelope { v: 1, body: SnapBody { state: s } }).unwrap();
                meta.insert("snapshot", json.as_slice()).unwrap();
                meta.insert("snapshot_index", 20u64.to_le_bytes().as_slice()).unwrap();
                let mut log = tx.open_table(LOG_TABLE).unwrap();
                for (i, c) in cmds.iter().enumerate().skip(20) {
                    let b = serde_json::to_vec(&Envelope { v: 1, body: CmdBody { cmd: c.clone() } }).unwrap();
                    log.insert(i as u64 + 1, b.as_slice()).unwrap();
                }
            }
            tx.commit().unwrap();
        }
        let mut full = State::new("dc1");
        for c in &cmds {
            full.apply(c).unwrap();
        }
        full.rebuild_indexes();
        let mut store = Store::open(Box::new(RedbLog::open(&path).unwrap()), "dc1").unwrap();
        assert_eq!(store.state(), &full);
        store.set_snapshot_policy(SnapshotPolicy { every: 5, ratio: 1, max_log_bytes: u64::MAX });
        store.propose(vec![Command::ResetDelay { id: AppId::parse("/app0").unwrap() }]).unwrap();
        assert!(store.snapshot_in_progress(), "12 commands since the JSON snapshot");
        store.wait_snapshot();
        store.propose(vec![Command::ResetDelay { id: AppId::parse("/app0").unwrap() }]).unwrap();
        let state = store.state().clone();
        drop(store);
        assert_eq!(log_keys(&path), vec![33], "the JSON snapshot's log is gone with it");
        let db = redb::Database::create(&path).unwrap();
        let meta = {
            use redb::ReadableDatabase;
            let tx = db.begin_read().unwrap();
            let t = tx.open_table(META_TABLE).unwrap();
            t.get("snapshot").unwrap().unwrap().value().to_vec()
        };
        drop(db);
        let m: serde_json::Value = serde_json::from_slice(&meta).unwrap();
        assert_eq!(m, json!({"v": SNAPSHOT_FORMAT, "index": 32, "file": "state.snap"}), "a pointer, not a state");
        let reopened = Store::open(Box::new(RedbLog::open(&path).unwrap()), "dc1").unwrap();
        assert_eq!(reopened.state(), &state);
    }

    #[test]
    fn the_log_size_bounds_the_time_between_snapshots() {
        use crate::kv::{KvOp, KvValue, SetMode};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        let mut store = Store::open(Box::new(RedbLog::open(&path).unwrap()), "dc1").unwrap();
        let set = |i: u64, len: usize| {
            Command::Kv(KvOp::Set {
                key: format!("k{i}"),
                value: KvValue::from(vec![7u8; len]),
                flags: 0,
                mode: SetMode::Plain,
                now: 0,
            })
        };
        // By size: far fewer commands than `every`, but 100 KB of log.
        store.set_snapshot_policy(SnapshotPolicy { every: 1_000_000, ratio: 4, max_log_bytes: 100_000 });
        let mut i = 0;
        while store.snapshots_written() == 0 && i < 100 {
            i += 1;
            store.propose(vec![set(i, 10_000)]).unwrap();
            store.wait_snapshot();
        }
        assert_eq!(store.snapshots_written(), 1);
        assert!((7..=12).contains(&i), "snapshot after ~100 KB of log (10 KB values, base64 in JSON): {i}");
        // By count, in proportion to the state: the last snapshot holds ~100 KB, so 10 small
        // commands do not start another; once the log holds a quarter of it, one starts.
        store.set_snapshot_policy(SnapshotPolicy { every: 10, ratio: 4, max_log_bytes: u64::MAX });
        let mut small = 0;
        while store.snapshots_written() == 1 && small < 10_000 {
            small += 1;
            store.propose(vec![set(1000 + small, 10)]).unwrap();
            store.wait_snapshot();
        }
        assert_eq!(store.snapshots_written(), 2);
        assert!(small > 100, "small commands until the log is a quarter of the snapshot: {small}");
    }
}
