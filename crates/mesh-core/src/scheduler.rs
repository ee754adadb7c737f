//! The framework side of two-level scheduling: the [`Scheduler`] trait, and
//! [`MarathonScheduler`], the stock scheduler that keeps Marathon apps at their instance count.
//!
//! A scheduler is a level-triggered reconciler: it is given offers, status updates and periodic
//! `reconcile` calls with a view of the cluster state, and answers with [`Call`]s (the Mesos v1
//! scheduler calls). It does no I/O and reads no clock: `now` and the random source are inputs.
//!
//! [`MarathonScheduler`] is incremental: it keeps indexes (apps whose tasks or definition
//! changed, deployments to check, the launch need of apps that lack tasks, tasks that fail their
//! health checks, and a timer queue for staging timeouts, backoff ends and kill retries), fed by
//! the [`Changes`] of every applied command through [`MarathonScheduler::observe`]. A pass with
//! nothing changed and no timer due costs O(1); a change costs O(the tasks of the apps it
//! touches). When it sees a state it was not told about (a state index other than the last one
//! observed: at start, after a restart, in tests that apply commands directly), the next pass
//! rebuilds the indexes from the whole state once, so a missed notification costs time, never
//! correctness.

use crate::allocator::{Filters, Offer};
use crate::app::{App, AppId};
use crate::model::{AgentId, FrameworkId, Millis, PortRanges, Resources, TaskId, iso8601};
use crate::proto::{StatusUpdate, TaskState};
use crate::runtime::{Command as RunCommand, TaskSpec};
use crate::state::{AppRecord, Changes, Command, State, Task};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

/// A task to launch: its record for the state, and what the agent runs.
#[derive(Clone, Debug, PartialEq)]
pub struct Launch {
    /// The task as the state records it (STAGING).
    pub task: Task,
    /// What the agent's runtime starts.
    pub spec: TaskSpec,
}

/// What a scheduler asks of the master (the Mesos v1 scheduler calls mesh uses).
#[derive(Clone, Debug, PartialEq)]
pub enum Call {
    /// Use (part of) an offer to launch tasks; the rest is declined with `filters`.
    Accept {
        /// The offer.
        offer_id: crate::model::OfferId,
        /// Tasks to launch on the offer's agent.
        launches: Vec<Launch>,
        /// Filter for the unused remainder.
        filters: Filters,
    },
    /// Decline a whole offer.
    Decline {
        /// The offer.
        offer_id: crate::model::OfferId,
        /// How long not to offer this agent again.
        filters: Filters,
    },
    /// Kill a task.
    Kill {
        /// Which task.
        task_id: TaskId,
        /// Its agent.
        agent_id: AgentId,
        /// SIGTERM → SIGKILL grace.
        grace: Duration,
    },
    /// Ask for offers again (clears filters, unsuppresses).
    Revive,
    /// Stop receiving offers until `Revive`.
    Suppress,
}

/// The framework side of two-level scheduling.
pub trait Scheduler: Send {
    /// The framework id the allocator knows this scheduler by.
    fn framework_id(&self) -> &FrameworkId;
    /// The role it allocates under.
    fn role(&self) -> &str;
    /// New offers.
    fn offers(&mut self, view: &State, offers: Vec<Offer>, now: Millis) -> Vec<Call>;
    /// A task status update.
    fn status(&mut self, view: &State, update: &StatusUpdate, now: Millis) -> Vec<Call>;
    /// Periodic and on-change reconciliation: compare desired with actual, answer with calls.
    fn reconcile(&mut self, view: &State, now: Millis) -> Vec<Call>;
}

/// Why an app's tasks are not placed on an offer (shown by `/v2/queue`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Reject {
    /// Not enough CPU.
    InsufficientCpus,
    /// Not enough memory.
    InsufficientMemory,
    /// Not enough disk.
    InsufficientDisk,
    /// Not enough (or not the required) ports.
    InsufficientPorts,
    /// A constraint rules the agent out.
    UnfulfilledConstraint,
    /// The app runs in a Docker container and the agent has no Docker runtime.
    NoDockerRuntime,
}

impl Reject {
    /// Marathon's reason name.
    pub fn as_str(self) -> &'static str {
        match self {
            Reject::InsufficientCpus => "InsufficientCpus",
            Reject::InsufficientMemory => "InsufficientMemory",
            Reject::InsufficientDisk => "InsufficientDisk",
            Reject::InsufficientPorts => "InsufficientPorts",
            Reject::UnfulfilledConstraint => "UnfulfilledConstraint",
            Reject::NoDockerRuntime => "NoDockerRuntime",
        }
    }
}

/// Offer statistics per app, for `/v2/queue`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct OfferStats {
    /// Offers looked at.
    pub processed: u64,
    /// Offers declined, by reason.
    pub rejected: BTreeMap<Reject, u64>,
    /// Time of the last offer looked at.
    pub last_offer_at: Option<Millis>,
    /// The last offers this app could not use (at most [`LAST_UNUSED_OFFERS`]), newest last.
    pub last_unused: std::collections::VecDeque<UnusedOffer>,
}

/// How many unused offers are remembered per app.
pub const LAST_UNUSED_OFFERS: usize = 10;

/// An offer an app could not use, and why.
#[derive(Clone, Debug, PartialEq)]
pub struct UnusedOffer {
    /// The offer.
    pub offer_id: crate::model::OfferId,
    /// Its agent.
    pub agent_id: AgentId,
    /// Its host.
    pub hostname: String,
    /// The offered resources.
    pub resources: Resources,
    /// Why it was not used.
    pub reason: Reject,
    /// When.
    pub at: Millis,
}

/// The work the scheduler's passes did since it was created (counters only grow), so tests can
/// pin that a pass costs what changed, not the size of the state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Visited {
    /// Reconcile passes run.
    pub passes: u64,
    /// Apps whose tasks were compared with their definition.
    pub apps: u64,
    /// Tasks looked at (an app's tasks in its pass, and single tasks that changed or whose
    /// timer came due).
    pub tasks: u64,
    /// Deployments whose progress was checked.
    pub deployments: u64,
    /// Full rebuilds of the indexes (a state the scheduler was not told about).
    pub rebuilds: u64,
}

/// Something the scheduler must look at again at a given time.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Timer {
    /// An app's launch backoff ends.
    App(AppId),
    /// A task's staging timeout, or the retry of its kill.
    Task(TaskId),
}

/// Which state the scheduler's indexes reflect: its index, and its apps and tasks (persistent
/// maps: O(1) to copy, compared by pointer), so that another state with the same index (another
/// store, a test) is noticed as well.
struct Synced {
    index: u64,
    apps: imbl::OrdMap<AppId, AppRecord>,
    tasks: imbl::OrdMap<TaskId, Task>,
}

impl Synced {
    fn of(view: &State) -> Self {
        Self { index: view.index, apps: view.apps.clone(), tasks: view.tasks.clone() }
    }

    fn is(&self, view: &State) -> bool {
        self.index == view.index && self.apps.ptr_eq(&view.apps) && self.tasks.ptr_eq(&view.tasks)
    }
}

/// A bug switched on by a simulation test on its own thread, to show that the simulation's
/// invariants catch it: the scheduler wants more tasks than an app's instance count.
#[doc(hidden)]
pub mod sim_bug {
    use std::cell::Cell;

    thread_local! {
        static EXTRA: Cell<usize> = const { Cell::new(0) };
    }

    /// Take each app as wanting `n` more tasks than its instances, everywhere the scheduler
    /// counts (0: none, the default), on this thread.
    pub fn ignore_instances_by(n: usize) {
        EXTRA.with(|e| e.set(n));
    }

    pub(super) fn extra() -> usize {
        EXTRA.with(Cell::get)
    }
}

/// The stock scheduler: keeps every Marathon app at `instances` running tasks of its current
/// version, with launch backoff, rolling replacement on config changes and kill selection.
pub struct MarathonScheduler {
    id: FrameworkId,
    role: String,
    rng: StdRng,
    /// When a kill was last sent, for tasks that have not ended.
    kills_sent: HashMap<TaskId, Millis>,
    suppressed: bool,
    /// Offer statistics (persistent map: publishing a copy is O(1)).
    stats: imbl::OrdMap<AppId, OfferStats>,
    kill_tokens: f64,
    tokens_at: Millis,
    last_offers_at: Millis,
    /// Tasks killed for failing health checks since the last call of [`Self::take_health_kills`].
    health_kills: Vec<TaskId>,
    /// How long an unused offer is declined for (a new demand revives offers at once).
    pub decline_seconds: f64,
    /// The state the indexes below reflect; any other state seen means a rebuild.
    synced: Option<Synced>,
    /// Apps to compare with their definition in the next reconcile pass.
    dirty_apps: BTreeSet<AppId>,
    /// Apps whose launch need must be computed again.
    dirty_demand: BTreeSet<AppId>,
    /// Tasks to look at on their own (kill requested, staging, health, orphaned).
    dirty_tasks: BTreeSet<TaskId>,
    /// Look at every task of the state in the next pass (after a rebuild).
    all_tasks_dirty: bool,
    /// Deployments whose progress must be checked.
    dirty_deployments: BTreeSet<String>,
    /// Deployments by app (every app named in one of its steps), and their apps.
    deployments_of: HashMap<AppId, BTreeSet<String>>,
    deployment_apps: HashMap<String, Vec<AppId>>,
    /// Launch need of each app that lacks tasks (no entry: none).
    demand: BTreeMap<AppId, usize>,
    /// Some app's need grew since the last reconcile pass (revives offers).
    demand_grew: bool,
    /// Tasks that failed their health checks often enough, oldest start first.
    sick: BTreeSet<(Option<Millis>, TaskId)>,
    sick_since: HashMap<TaskId, Option<Millis>>,
    /// The configuration version of each app last looked at (its health checks decide `sick`).
    app_versions: HashMap<AppId, Millis>,
    /// What to look at again when: staging timeouts, backoff ends, kill retries. Entries may be
    /// stale; a due one only makes its app or task be looked at again.
    timers: BTreeSet<(Millis, Timer)>,
    visited: Visited,
}

/// How long an agent is filtered after an offer that left demand unmet although the
/// scheduler placed all it could on it (resources, ports or constraints ran out). An offer
/// that ends because of [`MAX_INSTANCES_PER_OFFER`] leaves no filter: its remainder is offered
/// again on the next allocation.
pub const UNMET_DEMAND_REFUSE_SECONDS: f64 = 1.0;

/// Unmet demand that saw no offer for this long revives offers.
pub const REVIVE_EVERY_MS: Millis = 2_000;

/// Re-send a kill after this long without the task ending.
const KILL_RETRY_MS: Millis = 5_000;

/// A task still STAGING after this long is killed and replaced (Marathon's `task_launch_timeout`).
pub const TASK_LAUNCH_TIMEOUT_MS: Millis = 300_000;

/// At most this many tasks are launched on one offer (Marathon's `max_instances_per_offer`), so
/// one control-loop turn (the launch specs, one log append) stays short and other writes do not
/// wait long behind a huge scale-up. The remainder of a capped offer is not filtered: the next
/// allocation offers it again at once, so this bounds a turn, not the launch rate.
pub const MAX_INSTANCES_PER_OFFER: usize = 1_000;

impl MarathonScheduler {
    /// A scheduler with framework id `marathon`, role `*`, and a seeded random source (for task
    /// ids and port choice).
    pub fn new(seed: u64) -> Self {
        Self {
            id: FrameworkId::from("marathon"),
            role: "*".into(),
            rng: StdRng::seed_from_u64(seed),
            kills_sent: HashMap::new(),
            suppressed: false,
            stats: imbl::OrdMap::new(),
            kill_tokens: HEALTH_KILL_BURST,
            tokens_at: 0,
            last_offers_at: 0,
            health_kills: Vec::new(),
            decline_seconds: 120.0,
            synced: None,
            dirty_apps: BTreeSet::new(),
            dirty_demand: BTreeSet::new(),
            dirty_tasks: BTreeSet::new(),
            all_tasks_dirty: false,
            dirty_deployments: BTreeSet::new(),
            deployments_of: HashMap::new(),
            deployment_apps: HashMap::new(),
            demand: BTreeMap::new(),
            demand_grew: false,
            sick: BTreeSet::new(),
            sick_since: HashMap::new(),
            app_versions: HashMap::new(),
            timers: BTreeSet::new(),
            visited: Visited::default(),
        }
    }

    /// Tell the scheduler what commands changed: `from` is the state index before them, `view`
    /// the state after them, `changes` what each applied command reported. Only what they name
    /// is looked at in the next passes. If the scheduler did not know the state at `from`, or
    /// is not told of some change at all, its next pass notices the index it was not told
    /// about and rebuilds its indexes from the whole state.
    pub fn observe<'a>(&mut self, from: u64, view: &State, changes: impl IntoIterator<Item = &'a Changes>) {
        if self.synced.as_ref().is_none_or(|s| s.index != from) {
            self.synced = None;
            return;
        }
        for ch in changes {
            for d in &ch.deployments {
                self.index_deployment(view, d);
            }
            for app in &ch.apps {
                self.touch_app(app);
            }
            for t in &ch.tasks {
                self.dirty_tasks.insert(t.clone());
            }
            for t in &ch.ended {
                self.forget_task(&t.id);
            }
        }
        self.synced = Some(Synced::of(view));
    }

    /// The work done by this scheduler's passes so far.
    pub fn visited(&self) -> Visited {
        self.visited
    }

    /// Mark an app (and the deployments it is part of) to be looked at again.
    fn touch_app(&mut self, app: &AppId) {
        if !self.dirty_apps.contains(app) {
            self.dirty_apps.insert(app.clone());
        }
        if !self.dirty_demand.contains(app) {
            self.dirty_demand.insert(app.clone());
        }
        if let Some(ds) = self.deployments_of.get(app) {
            self.dirty_deployments.extend(ds.iter().cloned());
        }
    }

    /// Keep the app → deployments index of deployment `id` as the state has it.
    fn index_deployment(&mut self, view: &State, id: &str) {
        if let Some(apps) = self.deployment_apps.remove(id) {
            for a in apps {
                if let Some(ds) = self.deployments_of.get_mut(&a) {
                    ds.remove(id);
                    if ds.is_empty() {
                        self.deployments_of.remove(&a);
                    }
                }
            }
        }
        if let Some(d) = view.deployments.get(id) {
            let mut apps: Vec<AppId> = d.steps.iter().flatten().map(|a| a.app.clone()).collect();
            apps.sort();
            apps.dedup();
            for a in &apps {
                self.deployments_of.entry(a.clone()).or_default().insert(id.to_owned());
            }
            self.deployment_apps.insert(id.to_owned(), apps);
            self.dirty_deployments.insert(id.to_owned());
        }
    }

    /// A task ended: drop what the indexes hold of it.
    fn forget_task(&mut self, id: &TaskId) {
        self.kills_sent.remove(id);
        if let Some(since) = self.sick_since.remove(id) {
            self.sick.remove(&(since, id.clone()));
        }
    }

    /// Bring the indexes up to `view`: rebuild them if it is a state the scheduler was not told
    /// about, then move due timers into the dirty sets.
    fn sync(&mut self, view: &State, now: Millis) {
        if !self.synced.as_ref().is_some_and(|s| s.is(view)) {
            self.rebuild(view);
        }
        while let Some((at, _)) = self.timers.first() {
            if *at > now {
                break;
            }
            let (_, timer) = self.timers.pop_first().expect("non-empty");
            match timer {
                Timer::App(app) => self.touch_app(&app),
                Timer::Task(t) => {
                    self.dirty_tasks.insert(t);
                }
            }
        }
    }

    /// Look at everything once: every app, task and deployment is dirty.
    fn rebuild(&mut self, view: &State) {
        self.visited.rebuilds += 1;
        tracing::debug!(
            index = view.index,
            rebuilds = self.visited.rebuilds,
            "scheduler indexes rebuilt from the whole state"
        );
        self.deployments_of.clear();
        self.deployment_apps.clear();
        self.sick.clear();
        self.sick_since.clear();
        // Every task is looked at anyway: no app pass needs to send its tasks back.
        self.app_versions = view.apps.iter().map(|(id, r)| (id.clone(), r.config_version)).collect();
        self.kills_sent.retain(|id, _| view.tasks.contains_key(id));
        let ids: Vec<String> = view.deployments.keys().cloned().collect();
        for d in ids {
            self.index_deployment(view, &d);
        }
        // Apps that are gone still need their demand and statistics dropped.
        let gone: Vec<AppId> = self.demand.keys().chain(self.stats.keys()).cloned().collect();
        for app in view.apps.keys().chain(gone.iter()).chain(view.tasks_by_app.keys()) {
            self.touch_app(app);
        }
        self.all_tasks_dirty = true;
        self.synced = Some(Synced::of(view));
    }

    /// Deployments whose apps reached their goal, as commands that end or advance them; only
    /// deployments whose apps changed since the last call are looked at (see
    /// [`Self::finished_deployments`] for the same over all deployments).
    pub fn deployment_steps(&mut self, view: &State, now: Millis) -> Vec<Command> {
        self.sync(view, now);
        let mut out = Vec::new();
        for id in std::mem::take(&mut self.dirty_deployments) {
            let Some(d) = view.deployments.get(&id) else { continue };
            self.visited.deployments += 1;
            if let Some(cmd) = Self::deployment_step(view, &id, d) {
                out.push(cmd);
            }
        }
        out
    }

    /// Tasks that were killed because they failed their health checks (for events), since the
    /// last call.
    pub fn take_health_kills(&mut self) -> Vec<TaskId> {
        std::mem::take(&mut self.health_kills)
    }

    /// Offer statistics of an app.
    pub fn offer_stats(&self, app: &AppId) -> Option<&OfferStats> {
        self.stats.get(app)
    }

    /// Offer statistics of every app that saw offers (cloning it is O(1)).
    pub fn all_offer_stats(&self) -> &imbl::OrdMap<AppId, OfferStats> {
        &self.stats
    }

    /// How many tasks of `rec`'s app may be launched now (0 while in backoff).
    pub fn launch_need(view: &State, rec: &AppRecord, now: Millis) -> usize {
        if now < rec.delay.until || Self::gated(view, rec) {
            return 0;
        }
        Self::wanted(view, rec)
    }

    /// How many tasks the app lacks, ignoring backoff.
    pub fn wanted(view: &State, rec: &AppRecord) -> usize {
        let (mut new, mut total) = (0usize, 0usize);
        for t in view.app_tasks(&rec.app.id).filter(|t| t.counts()) {
            total += 1;
            if !t.kill_requested && t.version == rec.config_version {
                new += 1;
            }
        }
        Self::wanted_of(rec, new, total)
    }

    /// How many tasks the app lacks with `new` live tasks of its current version not being
    /// killed, out of `total` live tasks.
    fn wanted_of(rec: &AppRecord, new: usize, total: usize) -> usize {
        let app = &rec.app;
        let instances = app.instances as usize + sim_bug::extra();
        let over = (instances as f64 * app.upgrade_strategy.maximum_over_capacity).floor() as usize;
        let room = (instances + over).saturating_sub(total);
        instances.saturating_sub(new).min(room)
    }

    /// Deployments whose apps reached their goal, as commands that end them (over all
    /// deployments; the control loop uses [`Self::deployment_steps`]).
    pub fn finished_deployments(view: &State) -> Vec<Command> {
        view.deployments.iter().filter_map(|(id, d)| Self::deployment_step(view, id, d)).collect()
    }

    /// The command that moves deployment `d` past the steps whose apps are all done, if any.
    fn deployment_step(view: &State, id: &str, d: &crate::state::Deployment) -> Option<Command> {
        let app_done = |app_id: &AppId| match view.apps.get(app_id) {
            None => view.app_tasks(app_id).next().is_none(),
            Some(rec) => {
                let instances = rec.app.instances as usize + sim_bug::extra();
                let mut n = 0;
                view.app_tasks(app_id).filter(|t| t.counts()).all(|t| {
                    n += 1;
                    n <= instances && healthy(t, &rec.app) && t.version == rec.config_version
                }) && n == instances
            }
        };
        // Steps run in order: move past every step whose apps are all done.
        let mut step = d.current_step.max(1);
        while step <= d.steps.len() && d.steps[step - 1].iter().all(|a| app_done(&a.app)) {
            step += 1;
        }
        if step > d.steps.len() {
            Some(Command::EndDeployment { id: id.to_owned() })
        } else if step != d.current_step {
            Some(Command::AdvanceDeployment { id: id.to_owned(), step })
        } else {
            None
        }
    }

    /// Whether an app waits for an earlier step of its deployment (its dependencies).
    pub fn gated(view: &State, rec: &AppRecord) -> bool {
        let Some(d) = rec.deployment.as_ref().and_then(|d| view.deployments.get(d)) else { return false };
        match d.steps.iter().position(|s| s.iter().any(|a| a.app == rec.app.id)) {
            Some(i) => i + 1 > d.current_step,
            None => false,
        }
    }

    fn new_task_id(&mut self, app: &App) -> TaskId {
        let bytes: [u8; 16] = self.rng.random();
        let uuid = uuid::Builder::from_random_bytes(bytes).into_uuid();
        TaskId(format!("{}.instance-{}._app.1", app.id.task_prefix(), uuid))
    }

    /// Try to fit one task of `app` into `free` on `offer`'s agent.
    fn fit(
        &mut self,
        app: &App,
        free: &Resources,
        offer: &Offer,
        view: &State,
        placed: &[Task],
    ) -> Result<Vec<u16>, Reject> {
        if app.docker_image().is_some()
            && !view.agents.get(&offer.agent_id).is_some_and(|a| a.runtimes.iter().any(|r| r == "docker"))
        {
            return Err(Reject::NoDockerRuntime);
        }
        if free.cpus + crate::model::EPSILON < app.cpus {
            return Err(Reject::InsufficientCpus);
        }
        if free.mem + crate::model::EPSILON < app.mem {
            return Err(Reject::InsufficientMemory);
        }
        if free.disk + crate::model::EPSILON < app.disk {
            return Err(Reject::InsufficientDisk);
        }
        if !constraints_allow(app, offer, view, placed) {
            return Err(Reject::UnfulfilledConstraint);
        }
        let requests = app.host_port_requests();
        let mut avail = free.ports.clone();
        // Fixed ports first: each must be free.
        for p in requests.iter().flatten() {
            if !avail.contains(*p) {
                return Err(Reject::InsufficientPorts);
            }
            avail.subtract(&PortRanges::from_ports([*p]));
        }
        let dynamic = requests.iter().filter(|r| r.is_none()).count();
        if avail.len() < dynamic {
            return Err(Reject::InsufficientPorts);
        }
        // Random ports from the free set, so a port freed a moment ago is unlikely to be reused.
        let mut chosen = Vec::with_capacity(requests.len());
        for r in &requests {
            let p = match r {
                Some(p) => *p,
                None => {
                    let k = self.rng.random_range(0..avail.len());
                    let p = avail.iter().nth(k).expect("k < len");
                    avail.subtract(&PortRanges::from_ports([p]));
                    p
                }
            };
            chosen.push(p);
        }
        Ok(chosen)
    }

    fn build_launch(&mut self, rec: &AppRecord, offer: &Offer, ports: Vec<u16>, now: Millis) -> Launch {
        let app = &rec.app;
        let task_id = self.new_task_id(app);
        let mut env = app.plain_env();
        let names = app.port_names();
        for (i, p) in ports.iter().enumerate() {
            env.insert(format!("PORT{i}"), p.to_string());
            if let Some(name) = names.get(i).and_then(|n| n.as_ref()) {
                env.insert(format!("PORT_{}", name.to_uppercase().replace('-', "_")), p.to_string());
            }
        }
        if let Some(p) = ports.first() {
            env.insert("PORT".into(), p.to_string());
        }
        env.insert("PORTS".into(), ports.iter().map(u16::to_string).collect::<Vec<_>>().join(","));
        env.insert("HOST".into(), offer.hostname.clone());
        env.insert("MESOS_TASK_ID".into(), task_id.0.clone());
        env.insert("MARATHON_APP_ID".into(), app.id.to_string());
        env.insert("MARATHON_APP_VERSION".into(), iso8601(rec.config_version));
        env.insert("MARATHON_APP_RESOURCE_CPUS".into(), app.cpus.to_string());
        env.insert("MARATHON_APP_RESOURCE_MEM".into(), app.mem.to_string());
        env.insert("MARATHON_APP_RESOURCE_DISK".into(), app.disk.to_string());
        let mut labels: BTreeMap<String, String> = app.labels.clone();
        labels.insert("mesh.app".into(), app.id.to_string());
        labels.insert("mesh.app_version".into(), rec.config_version.to_string());
        let command = match (&app.cmd, &app.args) {
            (Some(c), _) => RunCommand::Shell(c.clone()),
            (None, Some(a)) => RunCommand::Args(a.clone()),
            (None, None) => RunCommand::Args(Vec::new()),
        };
        let resources = Resources {
            cpus: app.cpus,
            mem: app.mem,
            disk: app.disk,
            ports: PortRanges::from_ports(ports.iter().copied()),
        };
        let task = Task {
            id: task_id.clone(),
            framework_id: self.id.clone(),
            app_id: Some(app.id.clone()),
            agent_id: offer.agent_id.clone(),
            host: offer.hostname.clone(),
            ports: ports.clone(),
            service_ports: app.service_ports(),
            state: TaskState::Staging,
            staged_at: now,
            started_at: None,
            version: rec.config_version,
            resources,
            kill_requested: false,
            message: String::new(),
            health: Vec::new(),
            unreachable_since: None,
            inactive: false,
        };
        let container = app.container_spec(&ports);
        let spec = TaskSpec {
            task_id,
            command,
            env,
            cpus: app.cpus,
            mem: app.mem,
            disk: app.disk,
            ports,
            kill_grace: app.kill_grace(),
            labels,
            container,
        };
        Launch { task, spec }
    }
}

/// Whether a task counts as healthy: running, not being killed, and every health check of its
/// app reports it alive (apps without checks: running is enough).
pub fn healthy(t: &Task, app: &App) -> bool {
    t.state == TaskState::Running && !t.kill_requested && t.checks_alive(app.health_checks.len())
}

/// Whether a task failed its health checks often enough to be killed.
pub fn should_kill_unhealthy(t: &Task, app: &App) -> bool {
    let specs = crate::health::resolve(&app.health_checks, &t.ports);
    t.state == TaskState::Running
        && !t.kill_requested
        && specs.iter().zip(&t.health).any(|(spec, r)| {
            spec.max_consecutive_failures > 0 && r.consecutive_failures >= spec.max_consecutive_failures
        })
}

/// Cluster-wide limit on health kills: a token bucket, so a sick node or a bad check cannot
/// kill a whole app at once.
pub const HEALTH_KILL_BURST: f64 = 3.0;
/// Tokens per second added back to the health-kill bucket.
pub const HEALTH_KILLS_PER_SECOND: f64 = 0.5;

/// Whether `app`'s constraints allow one more task on `offer`'s agent, given the tasks already
/// in `view` and those `placed` in this round.
pub fn constraints_allow(app: &App, offer: &Offer, view: &State, placed: &[Task]) -> bool {
    if app.constraints.is_empty() {
        return true;
    }
    let attr = |agent: &AgentId, host: &str, field: &str| -> Option<String> {
        match field {
            "hostname" | "@hostname" => Some(host.to_owned()),
            f => view.agents.get(agent).and_then(|a| a.attributes.get(f.trim_start_matches('@')).cloned()).or_else(
                || {
                    if *agent == offer.agent_id {
                        offer.attributes.get(f.trim_start_matches('@')).cloned()
                    } else {
                        None
                    }
                },
            ),
        }
    };
    let peers: Vec<(&AgentId, &str)> = view
        .app_tasks(&app.id)
        .filter(|t| !t.kill_requested && t.counts())
        .chain(placed.iter().filter(|t| t.app_id.as_ref() == Some(&app.id)))
        .map(|t| (&t.agent_id, t.host.as_str()))
        .collect();
    app.constraints.iter().all(|c| {
        let field = c[0].as_str();
        let op = c.get(1).map(String::as_str).unwrap_or("");
        let value = c.get(2).map(String::as_str);
        let mine = attr(&offer.agent_id, &offer.hostname, field);
        let peer_values: Vec<Option<String>> = peers.iter().map(|(a, h)| attr(a, h, field)).collect();
        match op {
            "UNIQUE" => mine.is_some() && !peer_values.contains(&mine),
            "CLUSTER" => match (value, &mine) {
                (Some(v), Some(m)) => v == m,
                (None, Some(_)) => peer_values.iter().all(|p| *p == mine),
                _ => false,
            },
            "LIKE" | "UNLIKE" => {
                let re = regex::Regex::new(&format!("^(?:{})$", value.unwrap_or(""))).ok();
                let hit = matches!((&re, &mine), (Some(r), Some(m)) if r.is_match(m));
                if op == "LIKE" { hit } else { !hit }
            }
            "IS" => mine.as_deref() == value && mine.is_some(),
            "MAX_PER" => {
                let max: usize = value.and_then(|v| v.parse().ok()).unwrap_or(0);
                mine.is_some() && peer_values.iter().filter(|p| **p == mine).count() < max
            }
            "GROUP_BY" => {
                let Some(m) = &mine else { return false };
                let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
                for p in peer_values.iter().flatten() {
                    *counts.entry(p.as_str()).or_default() += 1;
                }
                let groups: usize = value.and_then(|v| v.parse().ok()).unwrap_or(counts.len().max(1));
                let mine_count = counts.get(m.as_str()).copied().unwrap_or(0);
                let min = if counts.len() < groups { 0 } else { counts.values().copied().min().unwrap_or(0) };
                mine_count <= min
            }
            _ => false,
        }
    })
}

/// The live tasks of an app, borrowed from the state only.
fn tasks_of<'v>(view: &'v State, app: &AppId) -> impl Iterator<Item = &'v Task> + use<'v> {
    view.tasks_by_app.get(app).into_iter().flat_map(move |ids| ids.iter().filter_map(move |id| view.tasks.get(id)))
}

impl MarathonScheduler {
    /// Compare an app's tasks with its definition: tasks of an old version to replace (rolling,
    /// within the health floor), tasks beyond the instance count (kill selection), and every
    /// task of an app that is gone.
    fn check_app<'v>(&mut self, view: &'v State, app_id: &AppId, to_kill: &mut Vec<&'v Task>) {
        self.visited.apps += 1;
        let Some(rec) = view.apps.get(app_id) else {
            self.stats.remove(app_id);
            self.app_versions.remove(app_id);
            // Tasks of an app that vanished without the state marking them (defensive).
            for t in tasks_of(view, app_id) {
                self.visited.tasks += 1;
                if !t.state.is_terminal() && !t.kill_requested {
                    to_kill.push(t);
                }
            }
            return;
        };
        // A new configuration may bring other health checks: each task's health is judged again.
        if self.app_versions.insert(app_id.clone(), rec.config_version) != Some(rec.config_version) {
            self.dirty_tasks.extend(tasks_of(view, app_id).map(|t| t.id.clone()));
        }
        let app = &rec.app;
        let instances = app.instances as usize + sim_bug::extra();
        let (mut old, mut new): (Vec<&Task>, Vec<&Task>) = (Vec::new(), Vec::new());
        let (mut live, mut killing) = (0usize, false);
        for t in tasks_of(view, app_id) {
            self.visited.tasks += 1;
            if !t.counts() {
                continue;
            }
            live += 1;
            if t.kill_requested {
                killing = true;
            } else if t.version != rec.config_version {
                old.push(t);
            } else {
                new.push(t);
            }
        }
        if old.is_empty() && new.len() <= instances {
            return; // nothing to replace, nothing in excess
        }
        let running = |ts: &[&Task]| ts.iter().filter(|t| healthy(t, app)).count();
        // oldest first for old tasks; kill selection for scale-down
        old.sort_by_key(|t| t.staged_at);
        let min_healthy = (instances as f64 * app.upgrade_strategy.minimum_health_capacity).ceil() as usize;
        let mut can_kill_old = (running(&old) + running(&new)).saturating_sub(min_healthy);
        // No room to start a new task, none starting, and no old one may go without dropping
        // below the healthy floor (e.g. minimumHealthCapacity 1 with maximumOverCapacity 0):
        // make room for one, or the upgrade never moves.
        let in_flight = new.iter().any(|t| !healthy(t, app)) || killing;
        if can_kill_old == 0 && !in_flight && Self::wanted_of(rec, new.len(), live) == 0 && new.len() < instances {
            can_kill_old = 1;
        }
        // old tasks that are not running count as nothing: stop them first
        let (old_idle, old_running): (Vec<&Task>, Vec<&Task>) = old.iter().partition(|t| !healthy(t, app));
        to_kill.extend(old_idle);
        to_kill.extend(old_running.into_iter().take(can_kill_old));
        if new.len() > instances {
            match app.kill_selection.as_str() {
                "OLDEST_FIRST" => new.sort_by_key(|t| t.staged_at),
                _ => new.sort_by_key(|t| std::cmp::Reverse(t.staged_at)),
            }
            // prefer killing tasks that do not run yet
            new.sort_by_key(|t| t.state == TaskState::Running);
            let excess = new.len() - instances;
            to_kill.extend(new.into_iter().take(excess));
        }
    }

    /// Look at one task on its own: a kill asked for (sent, and re-sent every
    /// [`KILL_RETRY_MS`]), its staging timeout, its health, its app being gone.
    fn check_task<'v>(&mut self, view: &'v State, id: &TaskId, now: Millis, to_kill: &mut Vec<&'v Task>) {
        self.visited.tasks += 1;
        let Some(t) = view.tasks.get(id) else {
            self.forget_task(id);
            return;
        };
        if t.state.is_terminal() {
            return;
        }
        if t.kill_requested {
            to_kill.push(t);
        } else if self.kills_sent.contains_key(id)
            && let Some(app) = &t.app_id
        {
            // We asked for its kill but the state never marked it: its app decides again.
            self.touch_app(app);
        }
        if t.state == TaskState::Staging {
            let deadline = t.staged_at.saturating_add(TASK_LAUNCH_TIMEOUT_MS);
            if now > deadline {
                to_kill.push(t);
            } else {
                self.timers.insert((deadline + 1, Timer::Task(id.clone())));
            }
        }
        let rec = t.app_id.as_ref().and_then(|a| view.apps.get(a));
        if t.app_id.is_some() && rec.is_none() && !t.kill_requested {
            to_kill.push(t); // its app vanished without the state marking it (defensive)
        }
        let sick = rec.is_some_and(|r| should_kill_unhealthy(t, &r.app));
        let was = self.sick_since.get(id).copied();
        match (sick, was) {
            (true, Some(since)) if since == t.started_at => {}
            (true, _) => {
                if let Some(since) = was {
                    self.sick.remove(&(since, id.clone()));
                }
                self.sick.insert((t.started_at, id.clone()));
                self.sick_since.insert(id.clone(), t.started_at);
            }
            (false, Some(since)) => {
                self.sick.remove(&(since, id.clone()));
                self.sick_since.remove(id);
            }
            (false, None) => {}
        }
    }

    /// Compute again the launch need of the apps that changed (or whose backoff ended).
    fn refresh_demand(&mut self, view: &State, now: Millis) {
        for app_id in std::mem::take(&mut self.dirty_demand) {
            let need = match view.apps.get(&app_id) {
                None => 0,
                Some(rec) if Self::gated(view, rec) => 0,
                Some(rec) => {
                    self.visited.tasks += view.tasks_by_app.get(&app_id).map_or(0, |ids| ids.len()) as u64;
                    let wanted = Self::wanted(view, rec);
                    if wanted > 0 && now < rec.delay.until {
                        // In backoff: look again when it ends.
                        self.timers.insert((rec.delay.until, Timer::App(app_id.clone())));
                        0
                    } else {
                        wanted
                    }
                }
            };
            let before = self.demand.get(&app_id).copied().unwrap_or(0);
            if need > before {
                self.demand_grew = true;
            }
            if need > 0 {
                self.demand.insert(app_id, need);
            } else if before > 0 {
                self.demand.remove(&app_id);
            }
        }
    }
}

impl Scheduler for MarathonScheduler {
    fn framework_id(&self) -> &FrameworkId {
        &self.id
    }

    fn role(&self) -> &str {
        &self.role
    }

    fn offers(&mut self, view: &State, offers: Vec<Offer>, now: Millis) -> Vec<Call> {
        self.last_offers_at = now;
        self.sync(view, now);
        self.refresh_demand(view, now);
        let mut calls = Vec::new();
        let mut need: BTreeMap<AppId, usize> = self.demand.clone();
        let mut placed: Vec<Task> = Vec::new();
        for offer in offers {
            let mut free = offer.resources.clone();
            let mut launches = Vec::new();
            let ids: Vec<AppId> = need.keys().cloned().collect();
            for app_id in ids {
                let Some(rec) = view.apps.get(&app_id) else { continue };
                let stats = self.stats.entry(app_id.clone()).or_default();
                stats.processed += 1;
                stats.last_offer_at = Some(now);
                while need.get(&app_id).copied().unwrap_or(0) > 0 && launches.len() < MAX_INSTANCES_PER_OFFER {
                    match self.fit(&rec.app, &free, &offer, view, &placed) {
                        Ok(ports) => {
                            let launch = self.build_launch(rec, &offer, ports, now);
                            free.subtract(&launch.task.resources);
                            placed.push(launch.task.clone());
                            launches.push(launch);
                            *need.get_mut(&app_id).expect("present") -= 1;
                        }
                        Err(reason) => {
                            let st = self.stats.entry(app_id.clone()).or_default();
                            *st.rejected.entry(reason).or_default() += 1;
                            st.last_unused.push_back(UnusedOffer {
                                offer_id: offer.id.clone(),
                                agent_id: offer.agent_id.clone(),
                                hostname: offer.hostname.clone(),
                                resources: free.clone(),
                                reason,
                                at: now,
                            });
                            if st.last_unused.len() > LAST_UNUSED_OFFERS {
                                st.last_unused.pop_front();
                            }
                            break;
                        }
                    }
                }
            }
            // With demand left unmet, come back soon; with none, stay away long (a new demand
            // revives offers at once). An offer that only ran into the per-offer cap is not
            // filtered at all: the next allocation offers its remainder again.
            let unmet = need.values().any(|n| *n > 0);
            let capped = launches.len() >= MAX_INSTANCES_PER_OFFER;
            let refuse_seconds = match (unmet, capped) {
                (true, true) => 0.0,
                (true, false) => UNMET_DEMAND_REFUSE_SECONDS,
                (false, _) => self.decline_seconds,
            };
            let filters = Filters { refuse_seconds };
            if launches.is_empty() {
                calls.push(Call::Decline { offer_id: offer.id, filters });
            } else {
                calls.push(Call::Accept { offer_id: offer.id, launches, filters });
            }
        }
        calls
    }

    fn status(&mut self, _view: &State, update: &StatusUpdate, _now: Millis) -> Vec<Call> {
        if update.state.is_terminal() {
            self.kills_sent.remove(&update.task_id);
        }
        Vec::new()
    }

    fn reconcile(&mut self, view: &State, now: Millis) -> Vec<Call> {
        self.sync(view, now);
        self.visited.passes += 1;
        let mut calls = Vec::new();
        // 1. Tasks to stop: of deleted apps, beyond the instance count, or of an old version
        //    once enough new ones run (rolling replacement); asked to be killed; staging too
        //    long. Only apps and tasks that changed, or whose timer is due, are looked at.
        let mut to_kill: Vec<&Task> = Vec::new();
        // A task may send its app back (a kill we asked for was not recorded), an app its tasks
        // (a new configuration): a few rounds settle it.
        if std::mem::take(&mut self.all_tasks_dirty) {
            for id in view.tasks.keys() {
                self.check_task(view, id, now, &mut to_kill);
            }
        }
        for _ in 0..3 {
            if self.dirty_tasks.is_empty() && self.dirty_apps.is_empty() {
                break;
            }
            for id in std::mem::take(&mut self.dirty_tasks) {
                self.check_task(view, &id, now, &mut to_kill);
            }
            for app_id in std::mem::take(&mut self.dirty_apps) {
                self.check_app(view, &app_id, &mut to_kill);
            }
        }
        // Tasks that failed their health checks too often, under the cluster-wide kill limit.
        if !self.sick.is_empty() {
            let elapsed = now.saturating_sub(self.tokens_at) as f64 / 1000.0;
            self.kill_tokens = (self.kill_tokens + elapsed * HEALTH_KILLS_PER_SECOND).min(HEALTH_KILL_BURST);
            self.tokens_at = now;
            while self.kill_tokens >= 1.0
                && let Some((_, id)) = self.sick.pop_first()
            {
                self.sick_since.remove(&id);
                let Some(t) = view.tasks.get(&id) else { continue };
                self.kill_tokens -= 1.0;
                self.health_kills.push(t.id.clone());
                to_kill.push(t);
            }
        }
        to_kill.sort_by(|a, b| a.id.cmp(&b.id));
        to_kill.dedup_by(|a, b| a.id == b.id);
        for t in to_kill {
            let due = self.kills_sent.get(&t.id).is_none_or(|at| now.saturating_sub(*at) >= KILL_RETRY_MS);
            if due {
                self.kills_sent.insert(t.id.clone(), now);
                // Sent again if it has not ended by then.
                self.timers.insert((now.saturating_add(KILL_RETRY_MS), Timer::Task(t.id.clone())));
                let grace = t
                    .app_id
                    .as_ref()
                    .and_then(|a| view.apps.get(a))
                    .map(|r| r.app.kill_grace())
                    .unwrap_or(Duration::from_secs(3));
                calls.push(Call::Kill { task_id: t.id.clone(), agent_id: t.agent_id.clone(), grace });
            }
        }
        // 2. Offers: revive when demand appears or grows, suppress when there is none.
        self.refresh_demand(view, now);
        let grew = std::mem::take(&mut self.demand_grew);
        // Demand that waits without offers (e.g. the agent is filtered after an offer that met
        // the demand of that moment) asks again, at most every REVIVE_EVERY_MS.
        let starved = !self.demand.is_empty() && now.saturating_sub(self.last_offers_at) >= REVIVE_EVERY_MS;
        if grew || starved {
            self.last_offers_at = now;
            calls.push(Call::Revive);
            self.suppressed = false;
        } else if self.demand.is_empty() && !self.suppressed {
            calls.push(Call::Suppress);
            self.suppressed = true;
        }
        calls
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::OfferId;
    use crate::state::Agent;
    use serde_json::json;

    fn state_with(app: serde_json::Value) -> State {
        let mut s = State::new("dc1");
        s.apply(&Command::RegisterAgent {
            agent: Agent {
                id: AgentId::from("n1"),
                hostname: "n1".into(),
                address: "127.0.0.1".parse().unwrap(),
                resources: Resources { cpus: 4.0, mem: 4096.0, disk: 0.0, ports: PortRanges::range(31000, 31009) },
                attributes: BTreeMap::new(),
                registered_at: 0,
                runtimes: vec!["process".into()],
                wan_address: None,
            },
            datacenter: "dc1".into(),
        })
        .unwrap();
        let app = App::from_json(&app, None).unwrap();
        s.apply(&Command::PutApp { app, now: 1, deployment_id: "d".into(), create_only: true, force: false }).unwrap();
        s
    }

    fn offer(cpus: f64, ports: PortRanges) -> Offer {
        Offer {
            id: OfferId::from("o1"),
            framework_id: FrameworkId::from("marathon"),
            agent_id: AgentId::from("n1"),
            hostname: "n1".into(),
            resources: Resources { cpus, mem: 4096.0, disk: 0.0, ports },
            attributes: BTreeMap::new(),
        }
    }

    fn launches(calls: &[Call]) -> Vec<Launch> {
        calls
            .iter()
            .flat_map(|c| if let Call::Accept { launches, .. } = c { launches.clone() } else { vec![] })
            .collect()
    }

    #[test]
    fn launches_up_to_instances_with_marathon_env() {
        let s = state_with(json!({"id": "/prod/web", "cmd": "x", "instances": 3, "cpus": 1, "mem": 64}));
        let mut m = MarathonScheduler::new(7);
        let calls = m.offers(&s, vec![offer(4.0, PortRanges::range(31000, 31009))], 10);
        let l = launches(&calls);
        assert_eq!(l.len(), 3);
        let env = &l[0].spec.env;
        assert_eq!(env["MARATHON_APP_ID"], "/prod/web");
        assert_eq!(env["PORT"], env["PORT0"]);
        assert_eq!(env["PORTS"], env["PORT0"]);
        assert_eq!(env["HOST"], "n1");
        assert!(l[0].task.id.as_str().starts_with("prod_web.instance-"));
        let mut ports: Vec<u16> = l.iter().map(|x| x.task.ports[0]).collect();
        ports.dedup();
        assert_eq!(ports.len(), 3, "distinct ports");
    }

    #[test]
    fn rejects_with_reasons() {
        let s = state_with(json!({"id": "/big", "cmd": "x", "cpus": 8}));
        let mut m = MarathonScheduler::new(1);
        let calls = m.offers(&s, vec![offer(4.0, PortRanges::range(31000, 31009))], 10);
        assert!(matches!(calls[0], Call::Decline { .. }));
        let st = m.offer_stats(&AppId::parse("/big").unwrap()).unwrap();
        assert_eq!(st.rejected.get(&Reject::InsufficientCpus), Some(&1));

        let s = state_with(json!({"id": "/p", "cmd": "x", "cpus": 0.1, "portDefinitions": [{"port": 0}, {"port": 0}]}));
        let calls = m.offers(&s, vec![offer(4.0, PortRanges::from_ports([31000]))], 10);
        assert!(matches!(calls[0], Call::Decline { .. }));

        let s = state_with(
            json!({"id": "/r", "cmd": "x", "cpus": 0.1, "requirePorts": true, "portDefinitions": [{"port": 31005}]}),
        );
        let l = launches(&m.offers(&s, vec![offer(4.0, PortRanges::range(31000, 31009))], 10));
        assert_eq!(l[0].task.ports, vec![31005]);
    }

    #[test]
    fn docker_apps_wait_on_agents_without_docker() {
        let s = state_with(json!({"id": "/d", "cpus": 0.1, "container": {"docker": {"image": "mesh-test/busybox"}}}));
        let mut m = MarathonScheduler::new(1);
        let calls = m.offers(&s, vec![offer(4.0, PortRanges::range(31000, 31009))], 10);
        assert!(matches!(calls[0], Call::Decline { .. }));
        let st = m.offer_stats(&AppId::parse("/d").unwrap()).unwrap();
        assert_eq!(st.rejected.get(&Reject::NoDockerRuntime), Some(&1));
    }

    #[test]
    fn bridge_tasks_get_container_specs_with_host_ports() {
        let mut s = state_with(json!({"id": "/b", "cpus": 0.1, "cmd": "httpd -f -p 8080",
            "networks": [{"mode": "container/bridge"}],
            "container": {"docker": {"image": "mesh-test/busybox"},
                          "portMappings": [{"containerPort": 8080, "hostPort": 0, "servicePort": 9000}, {"containerPort": 53, "hostPort": 31007, "protocol": "udp"}]}}));
        s.agents.get_mut(&AgentId::from("n1")).unwrap().runtimes.push("docker".into());
        let mut m = MarathonScheduler::new(1);
        let l = launches(&m.offers(&s, vec![offer(4.0, PortRanges::range(31000, 31009))], 10));
        assert_eq!(l.len(), 1);
        let c = l[0].spec.container.as_ref().unwrap();
        assert_eq!(c.port_mappings.len(), 2);
        assert_eq!(c.port_mappings[0].container_port, 8080);
        assert_eq!(c.port_mappings[0].host_port, l[0].task.ports[0]);
        assert_eq!(c.port_mappings[1].host_port, 31007);
        assert_eq!(l[0].task.service_ports, vec![9000, 0]);
        assert_eq!(l[0].spec.env["PORT0"], l[0].task.ports[0].to_string());
    }

    #[test]
    fn unique_hostname_places_one_per_agent() {
        let s = state_with(
            json!({"id": "/u", "cmd": "x", "cpus": 0.1, "instances": 2, "constraints": [["hostname", "UNIQUE"]]}),
        );
        let mut m = MarathonScheduler::new(1);
        let l = launches(&m.offers(&s, vec![offer(4.0, PortRanges::range(31000, 31009))], 10));
        assert_eq!(l.len(), 1);
        assert_eq!(
            m.offer_stats(&AppId::parse("/u").unwrap()).unwrap().rejected.get(&Reject::UnfulfilledConstraint),
            Some(&1)
        );
    }

    #[test]
    fn backoff_blocks_launches_until_the_delay_ends() {
        let mut s = state_with(json!({"id": "/c", "cmd": "x", "cpus": 0.1}));
        let id = AppId::parse("/c").unwrap();
        let rec = s.apps.get_mut(&id).unwrap();
        rec.delay.until = 5_000;
        let mut m = MarathonScheduler::new(1);
        assert!(launches(&m.offers(&s, vec![offer(4.0, PortRanges::range(31000, 31009))], 4_999)).is_empty());
        assert_eq!(launches(&m.offers(&s, vec![offer(4.0, PortRanges::range(31000, 31009))], 5_000)).len(), 1);
    }

    #[test]
    fn scale_down_kills_youngest_and_deployments_finish() {
        let mut s = state_with(json!({"id": "/w", "cmd": "x", "cpus": 0.1, "instances": 3}));
        let mut m = MarathonScheduler::new(3);
        let mut l = launches(&m.offers(&s, vec![offer(4.0, PortRanges::range(31000, 31009))], 10));
        for (i, x) in l.iter_mut().enumerate() {
            x.task.staged_at = 10 + i as u64;
        }
        s.apply(&Command::LaunchTasks { tasks: l.iter().map(|x| x.task.clone()).collect() }).unwrap();
        for x in &l {
            s.apply(&Command::TaskStatus {
                task_id: x.task.id.clone(),
                state: TaskState::Running,
                message: String::new(),
                at: 20,
            })
            .unwrap();
        }
        let ends = MarathonScheduler::finished_deployments(&s);
        assert_eq!(ends, vec![Command::EndDeployment { id: "d".into() }]);
        s.apply(&ends[0]).unwrap();
        let mut app = s.apps[&AppId::parse("/w").unwrap()].app.clone();
        app.instances = 1;
        s.apply(&Command::PutApp { app, now: 30, deployment_id: "d2".into(), create_only: false, force: false })
            .unwrap();
        let kills: Vec<TaskId> = m
            .reconcile(&s, 31)
            .into_iter()
            .filter_map(|c| if let Call::Kill { task_id, .. } = c { Some(task_id) } else { None })
            .collect();
        assert_eq!(kills.len(), 2);
        assert!(!kills.contains(&l[0].task.id), "the oldest stays");
        // kills are not re-sent at once, but are after the retry period
        assert!(m.reconcile(&s, 32).iter().all(|c| !matches!(c, Call::Kill { .. })));
        assert!(m.reconcile(&s, 31 + KILL_RETRY_MS).iter().any(|c| matches!(c, Call::Kill { .. })));
    }

    /// Apply commands as the control loop does: through the state, telling the scheduler what
    /// each changed.
    fn apply_observed(s: &mut State, m: &mut MarathonScheduler, cmds: Vec<Command>) {
        for c in cmds {
            let from = s.index;
            let ch = s.apply(&c).unwrap();
            m.observe(from, s, [&ch]);
        }
    }

    fn running_task(app: &AppId, i: usize, version: Millis) -> Task {
        Task {
            id: TaskId(format!("{}.instance-{i:06}._app.1", app.task_prefix())),
            framework_id: FrameworkId::from("marathon"),
            app_id: Some(app.clone()),
            agent_id: AgentId::from("n1"),
            host: "n1".into(),
            ports: vec![],
            service_ports: vec![],
            state: TaskState::Staging,
            staged_at: 5,
            started_at: None,
            version,
            resources: Resources::scalars(0.001, 1.0, 0.0),
            kill_requested: false,
            message: String::new(),
            health: Vec::new(),
            unreachable_since: None,
            inactive: false,
        }
    }

    /// `apps` apps of `per_app` RUNNING tasks each, at their goal, deployments ended.
    fn idle_state(apps: usize, per_app: usize, m: &mut MarathonScheduler) -> (State, Vec<AppId>) {
        let mut s = state_with(json!({"id": "/seed", "cmd": "x", "cpus": 0.001, "mem": 1, "instances": 0}));
        m.reconcile(&s, 1);
        let mut ids = Vec::new();
        for a in 0..apps {
            let id = format!("/idle/app-{a:04}");
            let app = App::from_json(
                &json!({"id": id, "cmd": "x", "cpus": 0.001, "mem": 1, "instances": per_app, "portDefinitions": []}),
                None,
            )
            .unwrap();
            let id = app.id.clone();
            apply_observed(
                &mut s,
                m,
                vec![Command::PutApp { app, now: 2, deployment_id: format!("d{a}"), create_only: true, force: false }],
            );
            let tasks: Vec<Task> = (0..per_app).map(|i| running_task(&id, i, 2)).collect();
            let mut cmds = vec![Command::LaunchTasks { tasks: tasks.clone() }];
            cmds.extend(tasks.iter().map(|t| Command::TaskStatus {
                task_id: t.id.clone(),
                state: TaskState::Running,
                message: String::new(),
                at: 6,
            }));
            apply_observed(&mut s, m, cmds);
            ids.push(id);
        }
        // The control loop ends the deployments, then reconciles until nothing is left to do.
        let ends = m.deployment_steps(&s, 7);
        assert_eq!(ends.len(), apps + 1, "every deployment reached its goal");
        apply_observed(&mut s, m, ends);
        m.reconcile(&s, 8);
        (s, ids)
    }

    /// The work of one reconcile pass (and of the deployment check before it) at `now`.
    fn pass(m: &mut MarathonScheduler, s: &State, now: Millis) -> (Visited, Vec<Call>) {
        let before = m.visited();
        let ends = m.deployment_steps(s, now);
        assert!(ends.is_empty());
        let calls = m.reconcile(s, now);
        let after = m.visited();
        let delta = Visited {
            passes: after.passes - before.passes,
            apps: after.apps - before.apps,
            tasks: after.tasks - before.tasks,
            deployments: after.deployments - before.deployments,
            rebuilds: after.rebuilds - before.rebuilds,
        };
        (delta, calls)
    }

    #[test]
    fn an_idle_pass_costs_the_same_at_1k_and_100k_tasks() {
        let mut work = Vec::new();
        for per_app in [100, 10_000] {
            let mut m = MarathonScheduler::new(1);
            let (s, _) = idle_state(10, per_app, &mut m);
            assert_eq!(s.tasks.len(), 10 * per_app);
            assert_eq!(m.visited().rebuilds, 1, "built incrementally: one rebuild, at the first pass");
            // Idle ticks, seconds apart (no timer is due: the tasks run, no kill is pending).
            let mut calls = Vec::new();
            let mut total = Visited::default();
            for k in 1..=5 {
                let (v, c) = pass(&mut m, &s, 1_000 * k);
                total.apps += v.apps;
                total.tasks += v.tasks;
                total.deployments += v.deployments;
                total.rebuilds += v.rebuilds;
                calls.extend(c);
            }
            assert!(calls.iter().all(|c| matches!(c, Call::Suppress)), "nothing to do: {calls:?}");
            work.push(total);
        }
        assert_eq!(work[0], work[1], "idle work does not grow with the number of tasks");
        assert_eq!(work[0], Visited::default(), "an idle pass visits no app, task or deployment");
    }

    #[test]
    fn a_change_visits_only_the_apps_it_touches() {
        let mut m = MarathonScheduler::new(1);
        let (mut s, ids) = idle_state(3, 3_000, &mut m);
        // One task of the first app ends: its app is compared with its definition again (and
        // its need computed), no other app and no other task.
        let victim = s.app_tasks(&ids[0]).next().unwrap().id.clone();
        let msg = "killed".to_owned();
        let cmd = Command::TaskStatus { task_id: victim, state: TaskState::Killed, message: msg, at: 9_000 };
        apply_observed(&mut s, &mut m, vec![cmd]);
        let (v, calls) = pass(&mut m, &s, 9_001);
        assert_eq!(v.apps, 1);
        assert_eq!(v.rebuilds, 0);
        // the app's 2,999 tasks in its pass and in its need, and the task that ended
        assert_eq!(v.tasks, 2 * 2_999 + 1);
        assert_eq!(v.deployments, 0, "no deployment runs");
        assert!(calls.contains(&Call::Revive), "a replacement is wanted: {calls:?}");
        // A scale-down of the second app kills its youngest tasks; the others are untouched.
        let mut app = s.apps[&ids[1]].app.clone();
        app.instances = 2_990;
        apply_observed(
            &mut s,
            &mut m,
            vec![Command::PutApp { app, now: 9_100, deployment_id: "down".into(), create_only: false, force: false }],
        );
        let before = m.visited();
        let ends = m.deployment_steps(&s, 9_101);
        assert!(ends.is_empty(), "10 tasks too many");
        let kills: Vec<Call> = m.reconcile(&s, 9_101).into_iter().filter(|c| matches!(c, Call::Kill { .. })).collect();
        assert_eq!(kills.len(), 10);
        let v = m.visited();
        assert_eq!((v.apps - before.apps, v.deployments - before.deployments), (1, 1));
        assert_eq!(v.tasks - before.tasks, 2 * 3_000, "only the second app's tasks, in its pass and its need");
    }

    #[test]
    fn timers_bring_back_staging_timeouts_and_kill_retries_without_a_rebuild() {
        let mut m = MarathonScheduler::new(1);
        let (mut s, ids) = idle_state(1, 10, &mut m);
        let mut stuck = running_task(&ids[0], 99, 2);
        stuck.staged_at = 10_000;
        stuck.id = TaskId::from("idle_app-0000.instance-stuck._app.1");
        apply_observed(&mut s, &mut m, vec![Command::LaunchTasks { tasks: vec![stuck.clone()] }]);
        let kills = |calls: &[Call]| calls.iter().filter(|c| matches!(c, Call::Kill { .. })).count();
        // One task in excess (11 of 10): the youngest, the stuck one, goes.
        let (_, calls) = pass(&mut m, &s, 10_001);
        assert_eq!(kills(&calls), 1);
        // Not marked killed (say the write failed): asked again after the retry period, by a
        // timer, with nothing else changing.
        let (v, calls) = pass(&mut m, &s, 10_002);
        assert_eq!((kills(&calls), v.tasks, v.apps), (0, 0, 0));
        let (v, calls) = pass(&mut m, &s, 10_001 + KILL_RETRY_MS);
        assert_eq!(kills(&calls), 1);
        assert_eq!(v.rebuilds, 0);
        // A task that stays STAGING past the launch timeout is killed by its timer.
        let mut m = MarathonScheduler::new(1);
        let (mut s, ids) = idle_state(1, 10, &mut m);
        let mut app = s.apps[&ids[0]].app.clone();
        app.instances = 11;
        let put = Command::PutApp { app, now: 10, deployment_id: "up".into(), create_only: false, force: false };
        apply_observed(&mut s, &mut m, vec![put]);
        apply_observed(&mut s, &mut m, vec![Command::LaunchTasks { tasks: vec![stuck] }]);
        let (_, calls) = pass(&mut m, &s, 10_001);
        assert_eq!(kills(&calls), 0);
        let (_, calls) = pass(&mut m, &s, 10_000 + TASK_LAUNCH_TIMEOUT_MS);
        assert_eq!(kills(&calls), 0);
        let (v, calls) = pass(&mut m, &s, 10_001 + TASK_LAUNCH_TIMEOUT_MS);
        assert_eq!(kills(&calls), 1);
        assert_eq!((v.tasks, v.rebuilds), (1, 0), "the timer brings back that task alone");
    }

    #[test]
    fn the_end_of_a_backoff_revives_offers() {
        let mut m = MarathonScheduler::new(1);
        let (mut s, ids) = idle_state(1, 2, &mut m);
        let victim = s.app_tasks(&ids[0]).next().unwrap().id.clone();
        let msg = "exited".to_owned();
        let cmd = Command::TaskStatus { task_id: victim, state: TaskState::Failed, message: msg, at: 10_000 };
        apply_observed(&mut s, &mut m, vec![cmd]);
        let until = s.apps[&ids[0]].delay.until;
        assert!(until > 10_000, "the failure starts a backoff");
        let (_, calls) = pass(&mut m, &s, 10_001);
        assert!(!calls.contains(&Call::Revive), "in backoff: no demand yet");
        let (_, calls) = pass(&mut m, &s, until);
        assert!(calls.contains(&Call::Revive), "the backoff ended: {calls:?}");
    }

    #[test]
    fn one_offer_with_room_for_a_thousand_launches_them_all() {
        let s = state_with(
            json!({"id": "/many", "cmd": "x", "cpus": 0.001, "mem": 1, "instances": 1_000, "portDefinitions": []}),
        );
        let mut m = MarathonScheduler::new(1);
        let calls = m.offers(&s, vec![offer(4.0, PortRanges::range(31000, 31009))], 10);
        assert_eq!(launches(&calls).len(), 1_000);
        let Call::Accept { filters, .. } = &calls[0] else { panic!("accepted") };
        assert_eq!(filters.refuse_seconds, m.decline_seconds, "all demand met");
    }

    #[test]
    fn a_capped_offer_is_offered_again_at_once() {
        use crate::allocator::{Allocator, DrfAllocator};
        let n = 2 * MAX_INSTANCES_PER_OFFER + MAX_INSTANCES_PER_OFFER / 2;
        let mut s = state_with(
            json!({"id": "/many", "cmd": "x", "cpus": 0.001, "mem": 1, "instances": n, "portDefinitions": []}),
        );
        let mut m = MarathonScheduler::new(1);
        let mut alloc = DrfAllocator::default();
        alloc.add_framework(FrameworkId::from("marathon"), "*".into());
        let agent = &s.agents[&AgentId::from("n1")];
        alloc.add_agent(agent.id.clone(), agent.hostname.clone(), agent.resources.clone(), BTreeMap::new());
        // No time passes: every allocation right after the last accept gets the rest.
        let mut rounds = 0;
        while s.tasks.len() < n {
            rounds += 1;
            assert!(rounds <= 3, "placed in three rounds of the cap");
            let offers = alloc.allocate(100);
            assert_eq!(offers.len(), 1, "the remainder is offered again at once (round {rounds})");
            for call in m.offers(&s, offers, 100) {
                let Call::Accept { offer_id, launches, filters } = call else { panic!("accepted: {call:?}") };
                let mut used = Resources::default();
                launches.iter().for_each(|l| used.add(&l.task.resources));
                alloc.accept(&offer_id, &used, filters, 100).unwrap();
                let from = s.index;
                let ch =
                    s.apply(&Command::LaunchTasks { tasks: launches.into_iter().map(|l| l.task).collect() }).unwrap();
                m.observe(from, &s, [&ch]);
            }
        }
        assert_eq!(s.tasks.len(), n);
    }
}
