//! The framework side of two-level scheduling: the [`Scheduler`] trait, and
//! [`MarathonScheduler`], the stock scheduler that keeps Marathon apps at their instance count.
//!
//! A scheduler is a level-triggered reconciler: it is given offers, status updates and periodic
//! `reconcile` calls with a view of the cluster state, and answers with [`Call`]s (the Mesos v1
//! scheduler calls). It does no I/O and reads no clock: `now` and the random source are inputs.

use crate::allocator::{Filters, Offer};
use crate::app::{App, AppId};
use crate::model::{AgentId, FrameworkId, Millis, PortRanges, Resources, TaskId, iso8601};
use crate::proto::{StatusUpdate, TaskState};
use crate::runtime::{Command as RunCommand, TaskSpec};
use crate::state::{AppRecord, Command, State, Task};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, HashMap};
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

/// The stock scheduler: keeps every Marathon app at `instances` running tasks of its current
/// version, with launch backoff, rolling replacement on config changes and kill selection.
pub struct MarathonScheduler {
    id: FrameworkId,
    role: String,
    rng: StdRng,
    kills_sent: HashMap<TaskId, Millis>,
    last_demand: BTreeMap<AppId, usize>,
    suppressed: bool,
    stats: BTreeMap<AppId, OfferStats>,
    kill_tokens: f64,
    tokens_at: Millis,
    last_offers_at: Millis,
    /// Tasks killed for failing health checks since the last call of [`Self::take_health_kills`].
    health_kills: Vec<TaskId>,
    /// How long an unused offer is declined for (a new demand revives offers at once).
    pub decline_seconds: f64,
}

/// How long an agent is filtered after an offer that left demand unmet.
pub const UNMET_DEMAND_REFUSE_SECONDS: f64 = 1.0;

/// Unmet demand that saw no offer for this long revives offers.
pub const REVIVE_EVERY_MS: Millis = 2_000;

/// Re-send a kill after this long without the task ending.
const KILL_RETRY_MS: Millis = 5_000;

/// A task still STAGING after this long is killed and replaced (Marathon's `task_launch_timeout`).
pub const TASK_LAUNCH_TIMEOUT_MS: Millis = 300_000;

/// At most this many tasks are launched on one offer (Marathon's `max_instances_per_offer`), so
/// an app with a huge instance count and tiny resources cannot flood one cycle.
pub const MAX_INSTANCES_PER_OFFER: usize = 100;

impl MarathonScheduler {
    /// A scheduler with framework id `marathon`, role `*`, and a seeded random source (for task
    /// ids and port choice).
    pub fn new(seed: u64) -> Self {
        Self {
            id: FrameworkId::from("marathon"),
            role: "*".into(),
            rng: StdRng::seed_from_u64(seed),
            kills_sent: HashMap::new(),
            last_demand: BTreeMap::new(),
            suppressed: false,
            stats: BTreeMap::new(),
            kill_tokens: HEALTH_KILL_BURST,
            tokens_at: 0,
            last_offers_at: 0,
            health_kills: Vec::new(),
            decline_seconds: 120.0,
        }
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

    /// How many tasks of `rec`'s app may be launched now (0 while in backoff).
    pub fn launch_need(view: &State, rec: &AppRecord, now: Millis) -> usize {
        if now < rec.delay.until || Self::gated(view, rec) {
            return 0;
        }
        Self::wanted(view, rec)
    }

    /// How many tasks the app lacks, ignoring backoff.
    pub fn wanted(view: &State, rec: &AppRecord) -> usize {
        let app = &rec.app;
        let instances = app.instances as usize;
        let (mut new, mut total) = (0usize, 0usize);
        for t in view.app_tasks(&app.id).filter(|t| !t.state.is_terminal()) {
            total += 1;
            if !t.kill_requested && t.version == rec.config_version {
                new += 1;
            }
        }
        let over = (instances as f64 * app.upgrade_strategy.maximum_over_capacity).floor() as usize;
        let room = (instances + over).saturating_sub(total);
        instances.saturating_sub(new).min(room)
    }

    /// Deployments whose apps reached their goal, as commands that end them.
    pub fn finished_deployments(view: &State) -> Vec<Command> {
        let app_done = |app_id: &AppId| match view.apps.get(app_id) {
            None => view.app_tasks(app_id).next().is_none(),
            Some(rec) => {
                let tasks: Vec<&Task> = view.app_tasks(app_id).collect();
                tasks.len() == rec.app.instances as usize
                    && tasks.iter().all(|t| healthy(t, &rec.app) && t.version == rec.config_version)
            }
        };
        let mut out = Vec::new();
        for (id, d) in view.deployments.iter() {
            // Steps run in order: move past every step whose apps are all done.
            let mut step = d.current_step.max(1);
            while step <= d.steps.len() && d.steps[step - 1].iter().all(|a| app_done(&a.app)) {
                step += 1;
            }
            if step > d.steps.len() {
                out.push(Command::EndDeployment { id: id.clone() });
            } else if step != d.current_step {
                out.push(Command::AdvanceDeployment { id: id.clone(), step });
            }
        }
        out
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
        .filter(|t| !t.kill_requested && !t.state.is_terminal())
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

impl Scheduler for MarathonScheduler {
    fn framework_id(&self) -> &FrameworkId {
        &self.id
    }

    fn role(&self) -> &str {
        &self.role
    }

    fn offers(&mut self, view: &State, offers: Vec<Offer>, now: Millis) -> Vec<Call> {
        self.last_offers_at = now;
        let mut calls = Vec::new();
        let mut need: BTreeMap<AppId, usize> = view
            .apps
            .iter()
            .map(|(id, rec)| (id.clone(), Self::launch_need(view, rec, now)))
            .filter(|(_, n)| *n > 0)
            .collect();
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
            // revives offers at once).
            let unmet = need.values().any(|n| *n > 0);
            let refuse_seconds = if unmet { UNMET_DEMAND_REFUSE_SECONDS } else { self.decline_seconds };
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
        let mut calls = Vec::new();
        // 1. Tasks to stop: of deleted apps, beyond the instance count, or of an old version
        //    once enough new ones run (rolling replacement).
        let mut to_kill: Vec<&Task> = view
            .tasks
            .values()
            .filter(|t| {
                (t.kill_requested && !t.state.is_terminal())
                    || (t.state == TaskState::Staging && now.saturating_sub(t.staged_at) > TASK_LAUNCH_TIMEOUT_MS)
            })
            .collect();
        for (app_id, rec) in view.apps.iter() {
            let app = &rec.app;
            let instances = app.instances as usize;
            let active: Vec<&Task> = view.active_tasks(app_id).collect();
            let (mut old, mut new): (Vec<&Task>, Vec<&Task>) =
                active.iter().partition(|t| t.version != rec.config_version);
            let running = |ts: &[&Task]| ts.iter().filter(|t| healthy(t, app)).count();
            // oldest first for old tasks; kill selection for scale-down
            old.sort_by_key(|t| t.staged_at);
            let min_healthy = (instances as f64 * app.upgrade_strategy.minimum_health_capacity).ceil() as usize;
            let mut can_kill_old = (running(&old) + running(&new)).saturating_sub(min_healthy);
            // No room to start a new task, none starting, and no old one may go without dropping
            // below the healthy floor (e.g. minimumHealthCapacity 1 with maximumOverCapacity 0):
            // make room for one, or the upgrade never moves.
            let in_flight = new.iter().any(|t| !healthy(t, app))
                || view.app_tasks(app_id).any(|t| t.kill_requested && !t.state.is_terminal());
            if can_kill_old == 0 && !in_flight && Self::wanted(view, rec) == 0 && new.len() < instances {
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
        // Tasks that failed their health checks too often, under the cluster-wide kill limit.
        let elapsed = now.saturating_sub(self.tokens_at) as f64 / 1000.0;
        self.kill_tokens = (self.kill_tokens + elapsed * HEALTH_KILLS_PER_SECOND).min(HEALTH_KILL_BURST);
        self.tokens_at = now;
        let mut sick: Vec<&Task> = view
            .tasks
            .values()
            .filter(|t| {
                t.app_id.as_ref().and_then(|a| view.apps.get(a)).is_some_and(|r| should_kill_unhealthy(t, &r.app))
            })
            .collect();
        sick.sort_by_key(|t| t.started_at);
        for t in sick {
            if self.kill_tokens < 1.0 {
                break;
            }
            self.kill_tokens -= 1.0;
            self.health_kills.push(t.id.clone());
            to_kill.push(t);
        }
        // Tasks of frameworks' apps that vanished without the state knowing (defensive).
        for t in view.tasks.values() {
            if t.app_id.as_ref().is_some_and(|a| !view.apps.contains_key(a))
                && !t.state.is_terminal()
                && !t.kill_requested
            {
                to_kill.push(t);
            }
        }
        to_kill.sort_by(|a, b| a.id.cmp(&b.id));
        to_kill.dedup_by(|a, b| a.id == b.id);
        for t in to_kill {
            let due = self.kills_sent.get(&t.id).is_none_or(|at| now.saturating_sub(*at) >= KILL_RETRY_MS);
            if due {
                self.kills_sent.insert(t.id.clone(), now);
                let grace = t
                    .app_id
                    .as_ref()
                    .and_then(|a| view.apps.get(a))
                    .map(|r| r.app.kill_grace())
                    .unwrap_or(Duration::from_secs(3));
                calls.push(Call::Kill { task_id: t.id.clone(), agent_id: t.agent_id.clone(), grace });
            }
        }
        self.kills_sent.retain(|id, _| view.tasks.contains_key(id));
        // 2. Offers: revive when demand appears or grows, suppress when there is none.
        let demand: BTreeMap<AppId, usize> = view
            .apps
            .iter()
            .map(|(id, rec)| (id.clone(), Self::launch_need(view, rec, now)))
            .filter(|(_, n)| *n > 0)
            .collect();
        let grew = demand.iter().any(|(id, n)| self.last_demand.get(id).is_none_or(|old| n > old));
        // Demand that waits without offers (e.g. the agent is filtered after an offer that met
        // the demand of that moment) asks again, at most every REVIVE_EVERY_MS.
        let starved = !demand.is_empty() && now.saturating_sub(self.last_offers_at) >= REVIVE_EVERY_MS;
        if grew || starved {
            self.last_offers_at = now;
            calls.push(Call::Revive);
            self.suppressed = false;
        } else if demand.is_empty() && !self.suppressed {
            calls.push(Call::Suppress);
            self.suppressed = true;
        }
        self.last_demand = demand;
        self.stats.retain(|id, _| view.apps.contains_key(id));
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
}
