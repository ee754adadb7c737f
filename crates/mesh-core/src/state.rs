//! Cluster state: every change is a [`Command`] applied by the pure [`State::apply`], and
//! recorded through the [`Log`] trait before it becomes visible.
//!
//! [`Store`] ties the two together: it applies a batch to a copy of the state (cheap: persistent
//! maps), appends the commands that applied to the log in one durable write (group commit), and
//! only then swaps the new state in. A command that fails validation changes nothing and is not
//! logged; a log that fails to write changes nothing either. On start, [`Store::open`] loads the
//! last snapshot and replays the log after it.
//!
//! [`RedbLog`] is the embedded on-disk log. A Raft log can implement the same trait later; the
//! scheduler, catalog and APIs only see [`Store`].

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
}

impl Task {
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
    /// Agents by id.
    pub agents: OrdMap<AgentId, Agent>,
    /// Deployments in progress.
    pub deployments: OrdMap<String, Deployment>,
    /// Explicitly created groups.
    #[serde(default)]
    pub groups: OrdMap<String, GroupRecord>,
    /// How many versions of an app are kept (0 = [`MAX_APP_VERSIONS`]); node configuration,
    /// set by [`Store::set_max_versions`].
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
}

/// A change of cluster state. Commands carry every input they need (time included), so
/// applying the same log always gives the same state.
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

/// Why a command was not applied.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
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
    /// A KV or session command was refused.
    #[error(transparent)]
    Kv(#[from] KvError),
    /// The framework is not registered.
    #[error("Framework {0} is not registered")]
    UnknownFramework(FrameworkId),
}

/// What an applied command changed (for publishing reads and events).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Changes {
    /// Apps whose definition or tasks changed.
    pub apps: Vec<AppId>,
    /// Whether the catalog changed.
    pub catalog: bool,
    /// Tasks that reached a terminal state, with their last record.
    pub ended: Vec<Task>,
}

impl State {
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
        self.tasks_by_app = OrdMap::new();
        for t in self.tasks.values() {
            if let Some(app) = &t.app_id {
                self.tasks_by_app.entry(app.clone()).or_default().insert(t.id.clone());
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
            self.deployments.remove(&old);
        }
        self.start_deployment_fresh(id, app, action, now, original, changes);
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
    }

    /// Create or replace an app's definition (no deployment, no lock check); returns the
    /// deployment action it implies.
    fn put_app(&mut self, app: &App, now: Millis) -> &'static str {
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
            self.deployments.remove(&old);
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
            self.deployments.remove(&old);
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
                let action = self.put_app(a, now);
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
                let action = self.put_app(app, *now);
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
                    self.deployments.remove(&old);
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
            Command::RegisterAgent { agent, datacenter } => {
                self.agents.insert(agent.id.clone(), agent.clone());
                let node = Node {
                    name: agent.id.0.clone(),
                    address: agent.address,
                    datacenter: datacenter.clone(),
                    meta: BTreeMap::new(),
                    create_index: 0,
                    modify_index: 0,
                };
                ch.catalog |= self.catalog.upsert_node(node, self.index + 1);
                let mut serf = Check::new(&agent.id.0, SERF_HEALTH, "Serf Health Status", Health::Passing);
                serf.output = "Agent alive and reachable".into();
                ch.catalog |= self.catalog.upsert_check(serf, self.index + 1, true);
            }
            Command::LaunchTasks { tasks } => {
                for t in tasks {
                    if let Some(app) = &t.app_id {
                        ch.apps.push(app.clone());
                    }
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
                task.state = *state;
                task.message = message.clone();
                if *state == TaskState::Running && task.started_at.is_none() {
                    task.started_at = Some(*at);
                }
                if let Some(app) = &task.app_id {
                    ch.apps.push(app.clone());
                }
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
                self.tasks.insert(task_id.clone(), task.clone());
                if task.state == TaskState::Running && !task.kill_requested {
                    ch.catalog |= self.register_task(&task);
                }
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
                    .services
                    .iter()
                    .flat_map(|(svc, insts)| {
                        insts
                            .values()
                            .filter(|i| &i.node == node && i.meta.get(SOURCE_META) == Some(source))
                            .map(move |i| (svc.clone(), i.id.clone()))
                    })
                    .filter(|k| !keep.contains(k))
                    .collect();
                for (svc, id) in stale {
                    ch.catalog |= self.catalog.remove_instance(&svc, &id, index);
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
            }
            Command::RollbackDeployment { id, deployment_id, now } => {
                let d = self.deployments.get(id).cloned().ok_or_else(|| ApplyError::UnknownDeployment(id.clone()))?;
                self.deployments.remove(id);
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
                        ch.catalog |= self.catalog.remove_instance(&old.service, &old.id, index);
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
                        ch.catalog |= self.catalog.remove_instance(&inst.service, sid, index);
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
                for (t, name) in tasks.iter().zip(names) {
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
        let def = spec.to_definition(ip, inst.port)?;
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
            .min()
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
        })
    }

    fn register_task(&mut self, task: &Task) -> bool {
        match self.instance_for(task) {
            Some(inst) => self.catalog.upsert_instance(inst, self.index + 1),
            None => false,
        }
    }

    fn deregister_task(&mut self, task: &Task) -> bool {
        // The service name may have changed since registration: search by id.
        let services: Vec<String> = self
            .catalog
            .services
            .iter()
            .filter(|(_, insts)| insts.contains_key(task.id.as_str()))
            .map(|(s, _)| s.clone())
            .collect();
        let mut changed = false;
        for s in services {
            changed |= self.catalog.remove_instance(&s, task.id.as_str(), self.index + 1);
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
}

/// The on-disk format version of log entries and snapshots.
pub const FORMAT_VERSION: u32 = 1;

/// A durable, ordered log of commands with snapshots.
pub trait Log: Send {
    /// Append commands (indexes `first..first+len`) durably, in one write.
    fn append(&mut self, first: u64, cmds: &[Command]) -> Result<(), LogError>;
    /// The last snapshot (if any) and every command after it, in order.
    fn load(&mut self) -> Result<(Option<State>, Vec<Command>), LogError>;
    /// Store a snapshot of `state` and drop the log entries it covers.
    fn snapshot(&mut self, state: &State) -> Result<(), LogError>;
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

const LOG_TABLE: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("log");
const META_TABLE: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("meta");

/// The embedded log: a redb database with a `log` table (index → command) and a snapshot.
pub struct RedbLog {
    db: redb::Database,
}

fn store_err(e: impl std::fmt::Display) -> LogError {
    LogError::Store(e.to_string())
}

impl RedbLog {
    /// Open or create the log at `path`.
    pub fn open(path: &Path) -> Result<Self, LogError> {
        let db = redb::Database::create(path).map_err(store_err)?;
        let tx = db.begin_write().map_err(store_err)?;
        {
            tx.open_table(LOG_TABLE).map_err(store_err)?;
            tx.open_table(META_TABLE).map_err(store_err)?;
        }
        tx.commit().map_err(store_err)?;
        Ok(Self { db })
    }
}

impl Log for RedbLog {
    fn append(&mut self, first: u64, cmds: &[Command]) -> Result<(), LogError> {
        let tx = self.db.begin_write().map_err(store_err)?;
        {
            let mut t = tx.open_table(LOG_TABLE).map_err(store_err)?;
            for (i, cmd) in cmds.iter().enumerate() {
                let bytes = serde_json::to_vec(&Envelope { v: FORMAT_VERSION, body: CmdBody { cmd: cmd.clone() } })?;
                t.insert(first + i as u64, bytes.as_slice()).map_err(store_err)?;
            }
        }
        tx.commit().map_err(store_err)
    }

    fn load(&mut self) -> Result<(Option<State>, Vec<Command>), LogError> {
        use redb::ReadableDatabase;
        let tx = self.db.begin_read().map_err(store_err)?;
        let meta = tx.open_table(META_TABLE).map_err(store_err)?;
        let snap = match meta.get("snapshot").map_err(store_err)? {
            Some(v) => {
                let env: Envelope<SnapBody> = serde_json::from_slice(v.value())?;
                if env.v > FORMAT_VERSION {
                    return Err(LogError::Version(env.v));
                }
                Some(env.body.state)
            }
            None => None,
        };
        let from = snap.as_ref().map(|s| s.index + 1).unwrap_or(1);
        let log = tx.open_table(LOG_TABLE).map_err(store_err)?;
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

    fn snapshot(&mut self, state: &State) -> Result<(), LogError> {
        let bytes = serde_json::to_vec(&Envelope { v: FORMAT_VERSION, body: SnapBody { state: state.clone() } })?;
        let tx = self.db.begin_write().map_err(store_err)?;
        {
            let mut meta = tx.open_table(META_TABLE).map_err(store_err)?;
            meta.insert("snapshot", bytes.as_slice()).map_err(store_err)?;
            let mut log = tx.open_table(LOG_TABLE).map_err(store_err)?;
            log.retain_in(..=state.index, |_, _| false).map_err(store_err)?;
        }
        tx.commit().map_err(store_err)
    }
}

/// An in-memory log (for tests and simulations).
#[derive(Default)]
pub struct MemLog {
    snap: Option<State>,
    cmds: Vec<(u64, Command)>,
}

impl Log for MemLog {
    fn append(&mut self, first: u64, cmds: &[Command]) -> Result<(), LogError> {
        for (i, c) in cmds.iter().enumerate() {
            self.cmds.push((first + i as u64, c.clone()));
        }
        Ok(())
    }
    fn load(&mut self) -> Result<(Option<State>, Vec<Command>), LogError> {
        let from = self.snap.as_ref().map(|s| s.index).unwrap_or(0);
        Ok((self.snap.clone(), self.cmds.iter().filter(|(i, _)| *i > from).map(|(_, c)| c.clone()).collect()))
    }
    fn snapshot(&mut self, state: &State) -> Result<(), LogError> {
        self.cmds.retain(|(i, _)| *i > state.index);
        self.snap = Some(state.clone());
        Ok(())
    }
}

/// Commands between snapshots.
pub const SNAPSHOT_EVERY: u64 = 1000;

/// The state plus the log that makes it durable.
pub struct Store {
    log: Box<dyn Log>,
    state: State,
    last_snapshot: u64,
}

impl Store {
    /// Open: load the snapshot and replay the log after it.
    pub fn open(mut log: Box<dyn Log>, datacenter: &str) -> Result<Self, LogError> {
        let (snap, cmds) = log.load()?;
        let mut state = snap.unwrap_or_else(|| State::new(datacenter));
        state.rebuild_indexes();
        let last_snapshot = state.index;
        for cmd in &cmds {
            if state.apply(cmd).is_err() {
                // A logged command applied once; replaying it cannot fail unless the
                // encoding changed. Count it so indexes stay aligned with the log.
                state.index += 1;
            }
        }
        Ok(Self { log, state, last_snapshot })
    }

    /// Keep at most `n` versions of each app from now on (at least 1).
    pub fn set_max_versions(&mut self, n: usize) {
        self.state.max_versions = n.max(1);
    }

    /// The current state.
    pub fn state(&self) -> &State {
        &self.state
    }

    /// Apply a batch: each command either applies (and is logged) or is rejected with its
    /// error. Everything that applied is written in one durable append before it is visible.
    pub fn propose(&mut self, cmds: Vec<Command>) -> Result<Vec<Result<Changes, ApplyError>>, LogError> {
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
        if !applied.is_empty() {
            self.log.append(first, &applied)?;
            self.state = next;
            if self.state.index - self.last_snapshot >= SNAPSHOT_EVERY {
                if let Err(e) = self.log.snapshot(&self.state) {
                    tracing::warn!(error = %e, "snapshot failed; the log keeps growing until the next try");
                } else {
                    self.last_snapshot = self.state.index;
                }
            }
        }
        Ok(results)
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
        assert_eq!(s.catalog.services["web-prod"]["t1"].port, 31000);
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
        };
        let sync = |v: Vec<ServiceInstance>| Command::SyncServices {
            node: "n1".into(),
            source: "registrator".into(),
            instances: v,
        };
        s.apply(&sync(vec![inst("c1:80", "ext"), inst("c2:80", "ext")])).unwrap();
        assert_eq!(s.catalog.services["ext"].len(), 2);
        assert_eq!(s.catalog.services["ext"]["c1:80"].node, "n1");
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
}
