//! Mesos-style resource offers, ordered by weighted DRF, with filters and suppress/revive.
//!
//! The allocator decides *which framework* is offered an agent's free resources; the framework
//! decides what to run (two-level scheduling). It is sans-IO: no clock reads, no tasks, no
//! sockets. Time always comes in as `now: Millis`, and a driver calls [`Allocator::allocate`]
//! on its own schedule (every allocation interval and after events).
//!
//! # Policy
//!
//! - An agent's free resources are `total - allocated (to tasks) - offered`. An agent takes part
//!   in a cycle when its free resources are non-empty and hold at least
//!   [`AllocatorConfig::min_allocatable`] (cpus, mem and disk all at least that).
//! - All free resources of an agent go into **one** offer, to the not-suppressed, not-filtered
//!   framework of the role with the lowest **weighted** dominant share, then the framework with
//!   the lowest dominant share within that role. Ties break by role name, then framework id.
//! - A framework's dominant share is the largest of `(allocated + offered) / cluster total` over
//!   cpus, mem and disk (ports do not count). A role's share is the dominant share of the sum of
//!   its frameworks, divided by the role's weight (default 1).
//! - Shares are updated after each offer, so one cycle spreads agents across frameworks.
//! - Agents are visited in [`AgentId`] order, frameworks and roles are kept in ordered sets:
//!   the same calls produce the same offers. A cycle costs O(agents × log frameworks) plus the
//!   frameworks skipped because they filter or are suppressed.
//! - A decline, or the unused part of an accept, installs a filter on the (framework, agent)
//!   pair for [`Filters::refuse_seconds`]: until it expires, the agent is not offered to that
//!   framework while its free resources lie within the refused ones (Mesos' refused-offer
//!   filter); resources freed since make it eligible again. [`Allocator::revive`] clears a
//!   framework's filters.
//! - Offers count as allocated until accepted, declined, rescinded or expired
//!   ([`AllocatorConfig::offer_timeout_ms`], unset by default = offers never expire).
//! - **Fair-share slices** ([`AllocatorConfig::fair_share_slices`], what `mesh` runs with): while
//!   several frameworks want offers, a framework is offered only the part of an agent that
//!   brings it up to its fair share: its role's weight over the summed weights of the roles with
//!   a not-suppressed framework, split evenly among the role's frameworks. What nobody below its
//!   fair share takes goes, whole, to the framework that *uses* the least (tasks, weighted;
//!   outstanding offers not counted, as they may hold more than will be used), so an agent is
//!   never left idle. This makes a single saturated node shared by weight within one
//!   cycle, which whole-agent offers cannot do; in a large cluster it only splits the few agents
//!   at a framework's boundary. With one framework, offers are whole agents as before.
//! - **Quota** ([`DrfAllocator::set_quota`]): a role's allocated plus offered scalars never exceed
//!   its limits (Mesos' quota `limits`; guarantees are not implemented).
//! - **Per-framework minimum** ([`DrfAllocator::set_min_allocatable`]): offers smaller than all of
//!   a framework's `min_allocatable_resources` alternatives are not made to it.

use crate::model::{AgentId, EPSILON, FrameworkId, Millis, OfferId, PortRanges, Resources};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};

/// One offer of (all of) an agent's free resources to one framework.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Offer {
    /// Unique id; may be used in exactly one accept or decline.
    pub id: OfferId,
    /// The framework the offer is made to.
    pub framework_id: FrameworkId,
    /// The agent whose resources are offered.
    pub agent_id: AgentId,
    /// The agent's hostname.
    pub hostname: String,
    /// The offered resources (scalars and ports).
    pub resources: Resources,
    /// The agent's attributes (e.g. `rack`, `zone`).
    pub attributes: BTreeMap<String, String>,
}

/// Mesos `Filters`: how long the refused part of an offer is not offered again to the same
/// framework on the same agent.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Filters {
    /// Seconds to refuse. Negative (or NaN) means the default, 5 s; capped at 365 days.
    pub refuse_seconds: f64,
}

impl Filters {
    /// Mesos' default `refuse_seconds`.
    pub const DEFAULT_REFUSE_SECONDS: f64 = 5.0;
    /// The cap on `refuse_seconds`: 365 days.
    pub const MAX_REFUSE_SECONDS: f64 = 365.0 * 24.0 * 3600.0;

    /// Filters refusing for `refuse_seconds`.
    pub fn refuse(refuse_seconds: f64) -> Self {
        Self { refuse_seconds }
    }

    /// The effective refusal in milliseconds (default for negative/NaN, capped at 365 days).
    pub fn refuse_ms(&self) -> Millis {
        let s = self.refuse_seconds;
        let s = if s.is_nan() || s < 0.0 { Self::DEFAULT_REFUSE_SECONDS } else { s };
        let s = s.min(Self::MAX_REFUSE_SECONDS);
        (s * 1000.0).round() as Millis
    }
}

impl Default for Filters {
    fn default() -> Self {
        Self { refuse_seconds: Self::DEFAULT_REFUSE_SECONDS }
    }
}

/// Why an allocator call was refused. A refused call changes nothing.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AllocatorError {
    /// The offer does not exist: never made, already accepted or declined, rescinded or expired.
    #[error("unknown offer {0}")]
    UnknownOffer(OfferId),
    /// An accept asked for resources the offer does not hold.
    #[error("resources {requested} exceed offer {offer} ({offered})")]
    ResourcesExceedOffer {
        /// The offer.
        offer: OfferId,
        /// What the accept asked for.
        requested: Resources,
        /// What the offer holds.
        offered: Resources,
    },
    /// The framework is not registered.
    #[error("unknown framework {0}")]
    UnknownFramework(FrameworkId),
    /// The agent is not registered.
    #[error("unknown agent {0}")]
    UnknownAgent(AgentId),
}

/// The allocator: agents and frameworks come and go, offers go out, accepts/declines come back.
pub trait Allocator {
    /// Register an agent (or update an existing one's hostname, total and attributes, keeping
    /// its allocations and offers).
    fn add_agent(&mut self, id: AgentId, hostname: String, total: Resources, attributes: BTreeMap<String, String>);
    /// Forget an agent and everything allocated on it; returns its rescinded outstanding offers.
    fn remove_agent(&mut self, id: &AgentId) -> Vec<Offer>;
    /// Register a framework in `role` (or move an existing one to `role`). Resources already
    /// tracked for it with [`Allocator::track_used`] count towards its share.
    fn add_framework(&mut self, id: FrameworkId, role: String);
    /// Forget a framework: rescinds (and returns) its offers, frees its allocations.
    fn remove_framework(&mut self, id: &FrameworkId) -> Vec<Offer>;
    /// Set a role's weight (> 0 and finite; other values are ignored). The default is 1.
    fn set_weight(&mut self, role: &str, weight: f64);
    /// The weights set explicitly with [`Allocator::set_weight`].
    fn weights(&self) -> BTreeMap<String, f64>;
    /// Account resources of tasks that already run (e.g. recovered after a restart) as
    /// allocated to `framework` on `agent`. Unknown agents are ignored; the framework need not
    /// be registered yet.
    fn track_used(&mut self, agent: &AgentId, framework: &FrameworkId, used: &Resources);
    /// Run one allocation cycle; returns the new offers.
    fn allocate(&mut self, now: Millis) -> Vec<Offer>;
    /// Use `used` (which must be contained in the offer) of an offer. The rest goes back to the
    /// pool with a (framework, agent) filter for `filters.refuse_seconds`, unless it is empty.
    /// The offer id is consumed. On error nothing changes.
    fn accept(
        &mut self,
        offer: &OfferId,
        used: &Resources,
        filters: Filters,
        now: Millis,
    ) -> Result<(), AllocatorError>;
    /// Refuse a whole offer: its resources go back to the pool with a (framework, agent) filter.
    fn decline(&mut self, offer: &OfferId, filters: Filters, now: Millis) -> Result<(), AllocatorError>;
    /// A task ended: give its resources on `agent` back from `framework` to the pool.
    fn recover(&mut self, agent: &AgentId, framework: &FrameworkId, resources: &Resources);
    /// Stop offering to `framework` until [`Allocator::revive`]. Outstanding offers stay.
    fn suppress(&mut self, framework: &FrameworkId);
    /// Clear the framework's filters and unsuppress it.
    fn revive(&mut self, framework: &FrameworkId);
    /// Rescind (and return) offers older than the offer timeout; their resources go back to the
    /// pool without a filter.
    fn expire_offers(&mut self, now: Millis) -> Vec<Offer>;
    /// Outstanding offers, oldest first.
    fn outstanding(&self) -> Vec<&Offer>;
    /// Free resources of an agent: total - allocated - offered. `None` for unknown agents.
    fn agent_free(&self, agent: &AgentId) -> Option<Resources>;
    /// The outstanding offer with this id (e.g. to check that an accepting framework owns it).
    fn offer(&self, id: &OfferId) -> Option<&Offer> {
        self.outstanding().into_iter().find(|o| &o.id == id)
    }
}

/// Configuration of [`DrfAllocator`].
#[derive(Clone, Debug, PartialEq)]
pub struct AllocatorConfig {
    /// Offers older than this are rescinded by [`Allocator::expire_offers`]; `None` = never.
    pub offer_timeout_ms: Option<Millis>,
    /// An agent is offered only when its free cpus, mem and disk are each at least these
    /// (ports are ignored). Default: 0.01 cpus, 32 MiB mem, 0 disk.
    pub min_allocatable: Resources,
    /// Offer a framework only the part of an agent that brings it up to its fair share while
    /// other frameworks want offers too (see the module docs). Off by default: then every
    /// offer holds all of an agent's free resources, as in Mesos.
    pub fair_share_slices: bool,
}

impl Default for AllocatorConfig {
    fn default() -> Self {
        Self { offer_timeout_ms: None, min_allocatable: Resources::scalars(0.01, 32.0, 0.0), fair_share_slices: false }
    }
}

/// Scalar part of resources, the part that counts for shares.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct Scalars {
    cpus: f64,
    mem: f64,
    disk: f64,
}

impl Scalars {
    fn of(r: &Resources) -> Self {
        Self { cpus: r.cpus, mem: r.mem, disk: r.disk }
    }
    fn add(&mut self, o: Scalars) {
        self.cpus += o.cpus;
        self.mem += o.mem;
        self.disk += o.disk;
    }
    fn sub(&mut self, o: Scalars) {
        fn s(a: f64, b: f64) -> f64 {
            let v = a - b;
            if v < EPSILON { 0.0 } else { v }
        }
        self.cpus = s(self.cpus, o.cpus);
        self.mem = s(self.mem, o.mem);
        self.disk = s(self.disk, o.disk);
    }
    /// Every component multiplied by `k` (zero components stay zero: no share of nothing).
    fn times(&self, k: f64) -> Scalars {
        let m = |x: f64| if x > EPSILON { x * k } else { f64::INFINITY };
        Scalars { cpus: m(self.cpus), mem: m(self.mem), disk: m(self.disk) }
    }
    /// The part of `want` that `self` holds (component-wise minimum).
    fn min(self, want: Scalars) -> Scalars {
        Scalars { cpus: self.cpus.min(want.cpus), mem: self.mem.min(want.mem), disk: self.disk.min(want.disk) }
    }
    /// Dominant share of `self` in `total` (resources with a zero total are skipped).
    fn dominant_share(&self, total: &Scalars) -> f64 {
        let mut s: f64 = 0.0;
        for (a, t) in [(self.cpus, total.cpus), (self.mem, total.mem), (self.disk, total.disk)] {
            if t > EPSILON {
                s = s.max(a / t);
            }
        }
        s.max(0.0)
    }
}

/// Sort key of a non-negative finite share: the IEEE bits order like the numbers.
fn share_key(share: f64) -> u64 {
    if share.is_finite() && share > 0.0 { share.to_bits() } else { 0 }
}

#[derive(Clone, Debug)]
struct AgentState {
    /// Unique per registration; filters are keyed by it.
    uid: u64,
    hostname: String,
    total: Resources,
    attributes: BTreeMap<String, String>,
    /// Resources used by tasks, per framework.
    allocated: BTreeMap<FrameworkId, Resources>,
    /// Sequence numbers of outstanding offers of this agent.
    offers: Vec<u64>,
    /// total - allocated - offered.
    free: Resources,
}

#[derive(Clone, Debug)]
struct FrameworkState {
    role: String,
    suppressed: bool,
    /// Agent uid → filters: (expiry, refused resources). Like Mesos' refused-offer filters, one
    /// holds while `now < expiry` and the agent's free resources are within what was refused:
    /// resources freed since are offered again at once.
    filters: HashMap<u64, Vec<(Millis, Resources)>>,
    /// Scalars allocated (tasks) plus offered to it on registered agents.
    alloc: Scalars,
    /// The smallest offers it wants (any one of them); empty = the global minimum only.
    min_alloc: Vec<Resources>,
}

impl FrameworkState {
    /// Whether an offer of `r` is worth making to this framework.
    fn wants(&self, r: &Resources) -> bool {
        self.min_alloc.is_empty()
            || self
                .min_alloc
                .iter()
                .any(|m| r.cpus + EPSILON >= m.cpus && r.mem + EPSILON >= m.mem && r.disk + EPSILON >= m.disk)
    }
}

/// How much more of each resource `alloc` may grow by before reaching `limit` (never negative;
/// infinite where the limit is).
fn headroom(alloc: &Scalars, limit: &Scalars) -> Scalars {
    let h = |a: f64, l: f64| if l.is_finite() { (l - a).max(0.0) } else { f64::INFINITY };
    Scalars { cpus: h(alloc.cpus, limit.cpus), mem: h(alloc.mem, limit.mem), disk: h(alloc.disk, limit.disk) }
}

/// `room` of the scalars of `r` (capped at what `r` holds), and ports in proportion to the
/// largest fraction taken of any scalar (rounded up, lowest first).
fn take(r: &Resources, room: &Scalars) -> Resources {
    let (cpus, mem, disk) = (r.cpus.min(room.cpus), r.mem.min(room.mem), r.disk.min(room.disk));
    let frac = |part: f64, whole: f64| if whole > EPSILON { part / whole } else { 0.0 };
    let fraction = frac(cpus, r.cpus).max(frac(mem, r.mem)).max(frac(disk, r.disk)).clamp(0.0, 1.0);
    let n = (r.ports.len() as f64 * fraction).ceil() as usize;
    Resources { cpus, mem, disk, ports: PortRanges::from_ports(r.ports.iter().take(n)) }
}

#[derive(Clone, Debug)]
struct OfferEntry {
    offer: Offer,
    created: Millis,
}

static NEXT_ALLOCATOR: AtomicU64 = AtomicU64::new(1);

/// The weighted-DRF allocator (the Mesos default hierarchical DRF, one level of roles).
#[derive(Clone, Debug)]
pub struct DrfAllocator {
    config: AllocatorConfig,
    /// Offer ids are `<prefix>O-<n>`.
    prefix: String,
    next_offer: u64,
    next_agent_uid: u64,
    agents: BTreeMap<AgentId, AgentState>,
    frameworks: BTreeMap<FrameworkId, FrameworkState>,
    weights: BTreeMap<String, f64>,
    /// Quota limits per role (infinite where unlimited).
    quotas: BTreeMap<String, Scalars>,
    offers: BTreeMap<u64, OfferEntry>,
    offer_index: HashMap<OfferId, u64>,
}

impl DrfAllocator {
    /// A new allocator. Offer ids are `a<k>-O-<n>` where `k` numbers the allocators created in
    /// this process, so two allocators never hand out the same id. Use
    /// [`DrfAllocator::with_offer_prefix`] for ids that are fully reproducible or unique
    /// across processes.
    pub fn new(config: AllocatorConfig) -> Self {
        let k = NEXT_ALLOCATOR.fetch_add(1, Ordering::Relaxed);
        Self::with_offer_prefix(config, format!("a{k}-"))
    }

    /// A new allocator whose offer ids are `<prefix>O-<n>`, `n` counting from 1.
    pub fn with_offer_prefix(config: AllocatorConfig, prefix: impl Into<String>) -> Self {
        Self {
            config,
            prefix: prefix.into(),
            next_offer: 1,
            next_agent_uid: 1,
            agents: BTreeMap::new(),
            frameworks: BTreeMap::new(),
            weights: BTreeMap::new(),
            quotas: BTreeMap::new(),
            offers: BTreeMap::new(),
            offer_index: HashMap::new(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &AllocatorConfig {
        &self.config
    }

    /// Resources used by tasks on an agent, per framework (`None` for unknown agents).
    pub fn agent_allocated(&self, agent: &AgentId) -> Option<&BTreeMap<FrameworkId, Resources>> {
        self.agents.get(agent).map(|a| &a.allocated)
    }

    /// A framework's dominant share (allocated + offered over the cluster total), unweighted.
    pub fn framework_share(&self, framework: &FrameworkId) -> Option<f64> {
        let total = self.cluster_total();
        self.frameworks.get(framework).map(|f| f.alloc.dominant_share(&total))
    }

    /// Limit what `role` holds (allocated plus offered) to `limits` (Mesos quota limits; infinite
    /// components are unlimited). `None` removes the role's quota.
    pub fn set_quota(&mut self, role: &str, limits: Option<&Resources>) {
        match limits {
            Some(l) => {
                self.quotas.insert(role.to_owned(), Scalars::of(l));
            }
            None => {
                self.quotas.remove(role);
            }
        }
    }

    /// The roles with a quota and their limits.
    pub fn quotas(&self) -> BTreeMap<String, Resources> {
        self.quotas.iter().map(|(r, s)| (r.clone(), Resources::scalars(s.cpus, s.mem, s.disk))).collect()
    }

    /// Offers to `framework` must hold at least one of `mins` (Mesos'
    /// `offer_filters.min_allocatable_resources`); empty = only the global minimum applies.
    pub fn set_min_allocatable(&mut self, framework: &FrameworkId, mins: Vec<Resources>) {
        if let Some(f) = self.frameworks.get_mut(framework) {
            f.min_alloc = mins;
        }
    }

    /// Scalars allocated to `framework` (tasks) plus offered to it.
    pub fn framework_allocation(&self, framework: &FrameworkId) -> Option<Resources> {
        self.frameworks.get(framework).map(|f| Resources::scalars(f.alloc.cpus, f.alloc.mem, f.alloc.disk))
    }

    /// Whether the framework is registered and suppressed.
    pub fn is_suppressed(&self, framework: &FrameworkId) -> bool {
        self.frameworks.get(framework).is_some_and(|f| f.suppressed)
    }

    fn cluster_total(&self) -> Scalars {
        let mut t = Scalars::default();
        for a in self.agents.values() {
            t.add(Scalars::of(&a.total));
        }
        t
    }

    fn weight(weights: &BTreeMap<String, f64>, role: &str) -> f64 {
        weights.get(role).copied().unwrap_or(1.0)
    }

    /// Recompute `free = total - allocated - offered` of one agent.
    fn refresh_free(agent: &mut AgentState, offers: &BTreeMap<u64, OfferEntry>) {
        let mut free = agent.total.clone();
        for r in agent.allocated.values() {
            free.subtract(r);
        }
        for seq in &agent.offers {
            if let Some(e) = offers.get(seq) {
                free.subtract(&e.offer.resources);
            }
        }
        agent.free = free;
    }

    /// Remove an outstanding offer, un-count it from its framework and agent (the agent's free
    /// resources are NOT refreshed). Returns the offer.
    fn take_offer(&mut self, seq: u64) -> Option<Offer> {
        let entry = self.offers.remove(&seq)?;
        let offer = entry.offer;
        self.offer_index.remove(&offer.id);
        if let Some(a) = self.agents.get_mut(&offer.agent_id) {
            a.offers.retain(|s| *s != seq);
        }
        if let Some(f) = self.frameworks.get_mut(&offer.framework_id) {
            f.alloc.sub(Scalars::of(&offer.resources));
        }
        Some(offer)
    }

    fn refresh_agent(&mut self, agent: &AgentId) {
        if let Some(a) = self.agents.get_mut(agent) {
            Self::refresh_free(a, &self.offers);
        }
    }

    fn add_filter(
        &mut self,
        framework: &FrameworkId,
        agent: &AgentId,
        refused: Resources,
        filters: Filters,
        now: Millis,
    ) {
        let ms = filters.refuse_ms();
        if ms == 0 {
            return;
        }
        let Some(uid) = self.agents.get(agent).map(|a| a.uid) else { return };
        if let Some(f) = self.frameworks.get_mut(framework) {
            let until = now.saturating_add(ms);
            f.filters.entry(uid).or_default().push((until, refused));
        }
    }
}

impl Default for DrfAllocator {
    fn default() -> Self {
        Self::new(AllocatorConfig::default())
    }
}

impl Allocator for DrfAllocator {
    fn add_agent(&mut self, id: AgentId, hostname: String, total: Resources, attributes: BTreeMap<String, String>) {
        if let Some(a) = self.agents.get_mut(&id) {
            a.hostname = hostname;
            a.total = total;
            a.attributes = attributes;
            Self::refresh_free(a, &self.offers);
            return;
        }
        let uid = self.next_agent_uid;
        self.next_agent_uid += 1;
        let free = total.clone();
        self.agents.insert(
            id,
            AgentState { uid, hostname, total, attributes, allocated: BTreeMap::new(), offers: Vec::new(), free },
        );
    }

    fn remove_agent(&mut self, id: &AgentId) -> Vec<Offer> {
        let Some(seqs) = self.agents.get(id).map(|a| a.offers.clone()) else { return Vec::new() };
        let rescinded: Vec<Offer> = seqs.into_iter().filter_map(|s| self.take_offer(s)).collect();
        if let Some(agent) = self.agents.remove(id) {
            for (fw, r) in &agent.allocated {
                if let Some(f) = self.frameworks.get_mut(fw) {
                    f.alloc.sub(Scalars::of(r));
                }
            }
            for f in self.frameworks.values_mut() {
                f.filters.remove(&agent.uid);
            }
        }
        rescinded
    }

    fn add_framework(&mut self, id: FrameworkId, role: String) {
        if let Some(f) = self.frameworks.get_mut(&id) {
            f.role = role;
            return;
        }
        let mut alloc = Scalars::default();
        for a in self.agents.values() {
            if let Some(r) = a.allocated.get(&id) {
                alloc.add(Scalars::of(r));
            }
        }
        self.frameworks.insert(
            id,
            FrameworkState { role, suppressed: false, filters: HashMap::new(), alloc, min_alloc: Vec::new() },
        );
    }

    fn remove_framework(&mut self, id: &FrameworkId) -> Vec<Offer> {
        let seqs: Vec<u64> = self.offers.iter().filter(|(_, e)| &e.offer.framework_id == id).map(|(s, _)| *s).collect();
        let rescinded: Vec<Offer> = seqs.into_iter().filter_map(|s| self.take_offer(s)).collect();
        self.frameworks.remove(id);
        let offers = &self.offers;
        for a in self.agents.values_mut() {
            if a.allocated.remove(id).is_some() {
                Self::refresh_free(a, offers);
            }
        }
        for o in &rescinded {
            if let Some(a) = self.agents.get_mut(&o.agent_id) {
                Self::refresh_free(a, offers);
            }
        }
        rescinded
    }

    fn set_weight(&mut self, role: &str, weight: f64) {
        if weight.is_finite() && weight > 0.0 {
            self.weights.insert(role.to_owned(), weight);
        }
    }

    fn weights(&self) -> BTreeMap<String, f64> {
        self.weights.clone()
    }

    fn track_used(&mut self, agent: &AgentId, framework: &FrameworkId, used: &Resources) {
        let Some(a) = self.agents.get_mut(agent) else {
            tracing::warn!(%agent, %framework, "track_used on an unknown agent ignored");
            return;
        };
        a.allocated.entry(framework.clone()).or_default().add(used);
        Self::refresh_free(a, &self.offers);
        if let Some(f) = self.frameworks.get_mut(framework) {
            f.alloc.add(Scalars::of(used));
        }
    }

    fn allocate(&mut self, now: Millis) -> Vec<Offer> {
        let total = self.cluster_total();
        for f in self.frameworks.values_mut() {
            if !f.filters.is_empty() {
                f.filters.retain(|_, list| {
                    list.retain(|(until, _)| *until > now);
                    !list.is_empty()
                });
            }
        }
        let min = self.config.min_allocatable.clone();
        let allocatable = |free: &Resources| {
            !free.is_empty()
                && free.cpus + EPSILON >= min.cpus
                && free.mem + EPSILON >= min.mem
                && free.disk + EPSILON >= min.disk
        };
        let passes: &[bool] = if self.config.fair_share_slices { &[true, false] } else { &[false] };
        let Self { prefix, next_offer, agents, frameworks, weights, quotas, offers, offer_index, .. } = self;

        // Dense views of frameworks (in id order) and roles (in name order).
        let fws: Vec<(&FrameworkId, &FrameworkState)> = frameworks.iter().collect();
        let mut role_index: BTreeMap<&str, usize> = BTreeMap::new();
        for (_, f) in &fws {
            role_index.entry(f.role.as_str()).or_insert(0);
        }
        for (i, v) in role_index.values_mut().enumerate() {
            *v = i;
        }
        let nroles = role_index.len();
        let mut role_weight = vec![1.0; nroles];
        let mut role_limit: Vec<Option<Scalars>> = vec![None; nroles];
        for (name, &i) in &role_index {
            role_weight[i] = Self::weight(weights, name);
            role_limit[i] = quotas.get(*name).copied();
        }
        let fw_role: Vec<usize> = fws.iter().map(|(_, f)| role_index[f.role.as_str()]).collect();
        let mut fw_alloc: Vec<Scalars> = fws.iter().map(|(_, f)| f.alloc).collect();
        let mut role_alloc = vec![Scalars::default(); nroles];
        for (i, a) in fw_alloc.iter().enumerate() {
            role_alloc[fw_role[i]].add(*a);
        }
        let role_key = |alloc: &Scalars, r: usize, w: &[f64]| share_key(alloc.dominant_share(&total) / w[r]);

        let mut role_sets: Vec<BTreeSet<(u64, usize)>> = vec![BTreeSet::new(); nroles];
        for (i, (_, f)) in fws.iter().enumerate() {
            if !f.suppressed {
                role_sets[fw_role[i]].insert((share_key(fw_alloc[i].dominant_share(&total)), i));
            }
        }
        let mut role_order: BTreeSet<(u64, usize)> = BTreeSet::new();
        for r in 0..nroles {
            if !role_sets[r].is_empty() {
                role_order.insert((role_key(&role_alloc[r], r, &role_weight), r));
            }
        }
        let mut out = Vec::new();
        if role_order.is_empty() {
            return out;
        }
        // Fair shares among the frameworks that want offers: a role gets weight / (sum of the
        // weights of roles with a not-suppressed framework), split evenly among its frameworks.
        let active_weight: f64 = role_order.iter().map(|&(_, r)| role_weight[r]).sum();
        let role_fair: Vec<f64> = (0..nroles).map(|r| role_weight[r] / active_weight).collect();
        let fair_key = 1.0 / active_weight;
        // The order of the work-conserving pass with fair-share slices: by weighted dominant
        // share of what frameworks use (allocated minus outstanding offers), then role, then id.
        let fair = passes.len() > 1;
        let leftover_order: Vec<usize> = if fair {
            let index: HashMap<&FrameworkId, usize> = fws.iter().enumerate().map(|(i, (id, _))| (*id, i)).collect();
            let mut used = fw_alloc.clone();
            for e in offers.values() {
                if let Some(&i) = index.get(&e.offer.framework_id) {
                    used[i].sub(Scalars::of(&e.offer.resources));
                }
            }
            let mut order: Vec<usize> = (0..fws.len()).filter(|&i| !fws[i].1.suppressed).collect();
            let key = |i: usize| used[i].dominant_share(&total) / role_weight[fw_role[i]];
            order.sort_by(|&a, &b| key(a).total_cmp(&key(b)).then(fw_role[a].cmp(&fw_role[b])).then(a.cmp(&b)));
            order
        } else {
            Vec::new()
        };
        let fw_fair: Vec<f64> =
            (0..fws.len()).map(|i| role_fair[fw_role[i]] / role_sets[fw_role[i]].len().max(1) as f64).collect();

        for (agent_id, agent) in agents.iter_mut() {
            let uid = agent.uid;
            // Frameworks offered this agent in this cycle: (framework, index in `out`).
            let mut served: Vec<(usize, usize)> = Vec::new();
            // Frameworks that took all they may of this agent (quota or work-conserving pass).
            let mut exhausted: Vec<usize> = Vec::new();
            loop {
                if !allocatable(&agent.free) {
                    break;
                }
                let free = Scalars::of(&agent.free);
                // Pass 1: the framework furthest below its share that is also below its fair
                // share gets the part of the agent that brings it up to that share.
                // Pass 2 (work-conserving): nobody below its fair share wants this agent; the
                // furthest below gets what its quota allows.
                // What framework `f` (of role `r`) would be offered of this agent, if anything.
                let consider = |r: usize, f: usize, capped: bool| -> Option<Resources> {
                    let filters = &fws[f].1.filters;
                    if !filters.is_empty()
                        && filters.get(&uid).is_some_and(|list| {
                            list.iter().any(|(until, refused)| *until > now && refused.contains(&agent.free))
                        })
                    {
                        return None;
                    }
                    if exhausted.contains(&f) || (capped && served.iter().any(|(s, _)| *s == f)) {
                        return None;
                    }
                    // What it may take of each resource: up to its role's quota and, in the
                    // capped pass, up to its and its role's fair share.
                    let quota_room = role_limit[r].as_ref().map(|l| free.min(headroom(&role_alloc[r], l)));
                    let mut room = quota_room.unwrap_or(free);
                    if capped {
                        room = room
                            .min(headroom(&fw_alloc[f], &total.times(fw_fair[f])))
                            .min(headroom(&role_alloc[r], &total.times(role_fair[r])));
                    }
                    let slice = if room == free {
                        agent.free.clone()
                    } else {
                        let s = take(&agent.free, &room);
                        // Do not leave crumbs nobody can use: all or the slice.
                        let mut rest = agent.free.clone();
                        rest.subtract(&s);
                        let quota_allows_all = quota_room.is_none_or(|q| q == free);
                        if !allocatable(&rest) && quota_allows_all { agent.free.clone() } else { s }
                    };
                    (allocatable(&slice) && fws[f].1.wants(&slice)).then_some(slice)
                };
                let mut chosen = None;
                'passes: for &capped in passes {
                    if !capped && fair {
                        // Work-conserving leftovers go to the framework that *uses* the least
                        // (tasks only): outstanding offers may hold more than they will use.
                        for &f in &leftover_order {
                            let r = fw_role[f];
                            if let Some(slice) = consider(r, f, false) {
                                let rk = role_key(&role_alloc[r], r, &role_weight);
                                let fk = share_key(fw_alloc[f].dominant_share(&total));
                                chosen = Some((rk, r, fk, f, slice, false));
                                break 'passes;
                            }
                        }
                        continue;
                    }
                    for &(rk, r) in role_order.iter() {
                        // Roles are in weighted-share order and a role is at its fair share when
                        // its weighted share reaches 1 / (active weight): the rest are too.
                        if capped && f64::from_bits(rk) >= fair_key - 1e-12 {
                            break;
                        }
                        for &(fk, f) in &role_sets[r] {
                            // Likewise frameworks within a role, in share order.
                            if capped && f64::from_bits(fk) >= fw_fair[f] - 1e-12 {
                                break;
                            }
                            if let Some(slice) = consider(r, f, capped) {
                                chosen = Some((rk, r, fk, f, slice, capped));
                                break 'passes;
                            }
                        }
                    }
                }
                let Some((rk, r, fk, f, resources, capped)) = chosen else { break };
                if !capped {
                    exhausted.push(f);
                }
                agent.free.subtract(&resources);
                let sc = Scalars::of(&resources);
                role_sets[r].remove(&(fk, f));
                fw_alloc[f].add(sc);
                role_sets[r].insert((share_key(fw_alloc[f].dominant_share(&total)), f));
                role_order.remove(&(rk, r));
                role_alloc[r].add(sc);
                role_order.insert((role_key(&role_alloc[r], r, &role_weight), r));

                if let Some(&(_, idx)) = served.iter().find(|(s, _)| *s == f) {
                    // One offer per framework and agent: the work-conserving rest joins it.
                    let o: &mut Offer = &mut out[idx];
                    o.resources.add(&resources);
                    if let Some(seq) = offer_index.get(&o.id)
                        && let Some(e) = offers.get_mut(seq)
                    {
                        e.offer.resources = o.resources.clone();
                    }
                    continue;
                }
                let seq = *next_offer;
                *next_offer += 1;
                let offer = Offer {
                    id: OfferId(format!("{prefix}O-{seq}")),
                    framework_id: fws[f].0.clone(),
                    agent_id: agent_id.clone(),
                    hostname: agent.hostname.clone(),
                    resources,
                    attributes: agent.attributes.clone(),
                };
                agent.offers.push(seq);
                offer_index.insert(offer.id.clone(), seq);
                offers.insert(seq, OfferEntry { offer: offer.clone(), created: now });
                served.push((f, out.len()));
                out.push(offer);
            }
        }
        drop(fws);
        for (f, a) in frameworks.values_mut().zip(fw_alloc) {
            f.alloc = a;
        }
        out
    }

    fn accept(
        &mut self,
        offer: &OfferId,
        used: &Resources,
        filters: Filters,
        now: Millis,
    ) -> Result<(), AllocatorError> {
        let seq = *self.offer_index.get(offer).ok_or_else(|| AllocatorError::UnknownOffer(offer.clone()))?;
        let offered = &self.offers[&seq].offer.resources;
        if !offered.contains(used) {
            return Err(AllocatorError::ResourcesExceedOffer {
                offer: offer.clone(),
                requested: used.clone(),
                offered: offered.clone(),
            });
        }
        let Some(o) = self.take_offer(seq) else { return Err(AllocatorError::UnknownOffer(offer.clone())) };
        let mut remainder = o.resources.clone();
        remainder.subtract(used);
        if !used.is_empty() {
            if let Some(a) = self.agents.get_mut(&o.agent_id) {
                a.allocated.entry(o.framework_id.clone()).or_default().add(used);
            }
            if let Some(f) = self.frameworks.get_mut(&o.framework_id) {
                f.alloc.add(Scalars::of(used));
            }
        }
        if !remainder.is_empty() {
            self.add_filter(&o.framework_id, &o.agent_id, remainder, filters, now);
        }
        self.refresh_agent(&o.agent_id);
        Ok(())
    }

    fn decline(&mut self, offer: &OfferId, filters: Filters, now: Millis) -> Result<(), AllocatorError> {
        let seq = *self.offer_index.get(offer).ok_or_else(|| AllocatorError::UnknownOffer(offer.clone()))?;
        let Some(o) = self.take_offer(seq) else { return Err(AllocatorError::UnknownOffer(offer.clone())) };
        if !o.resources.is_empty() {
            let refused = o.resources.clone();
            self.add_filter(&o.framework_id, &o.agent_id, refused, filters, now);
        }
        self.refresh_agent(&o.agent_id);
        Ok(())
    }

    fn recover(&mut self, agent: &AgentId, framework: &FrameworkId, resources: &Resources) {
        let Some(a) = self.agents.get_mut(agent) else { return };
        let Some(alloc) = a.allocated.get_mut(framework) else { return };
        let removed = Scalars::of(alloc).min(Scalars::of(resources));
        alloc.subtract(resources);
        if alloc.is_empty() {
            a.allocated.remove(framework);
        }
        Self::refresh_free(a, &self.offers);
        if let Some(f) = self.frameworks.get_mut(framework) {
            f.alloc.sub(removed);
        }
    }

    fn suppress(&mut self, framework: &FrameworkId) {
        if let Some(f) = self.frameworks.get_mut(framework) {
            f.suppressed = true;
        }
    }

    fn revive(&mut self, framework: &FrameworkId) {
        if let Some(f) = self.frameworks.get_mut(framework) {
            f.suppressed = false;
            f.filters.clear();
        }
    }

    fn expire_offers(&mut self, now: Millis) -> Vec<Offer> {
        let Some(timeout) = self.config.offer_timeout_ms else { return Vec::new() };
        let seqs: Vec<u64> =
            self.offers.iter().filter(|(_, e)| e.created.saturating_add(timeout) <= now).map(|(s, _)| *s).collect();
        let expired: Vec<Offer> = seqs.into_iter().filter_map(|s| self.take_offer(s)).collect();
        for o in &expired {
            self.refresh_agent(&o.agent_id);
        }
        expired
    }

    fn outstanding(&self) -> Vec<&Offer> {
        self.offers.values().map(|e| &e.offer).collect()
    }

    fn agent_free(&self, agent: &AgentId) -> Option<Resources> {
        self.agents.get(agent).map(|a| a.free.clone())
    }

    fn offer(&self, id: &OfferId) -> Option<&Offer> {
        self.offer_index.get(id).and_then(|s| self.offers.get(s)).map(|e| &e.offer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alloc() -> DrfAllocator {
        DrfAllocator::with_offer_prefix(
            AllocatorConfig {
                offer_timeout_ms: None,
                min_allocatable: Resources::scalars(0.01, 1.0, 0.0),
                ..AllocatorConfig::default()
            },
            "t-",
        )
    }

    fn agent(a: &mut DrfAllocator, id: &str, cpus: f64, mem: f64) {
        a.add_agent(
            id.into(),
            format!("{id}.host"),
            Resources { cpus, mem, disk: 0.0, ports: PortRanges::range(31000, 31009) },
            BTreeMap::from([("rack".to_owned(), "r1".to_owned())]),
        );
    }

    fn fw(id: &str) -> FrameworkId {
        id.into()
    }

    fn ag(id: &str) -> AgentId {
        id.into()
    }

    fn by_agent(offers: &[Offer]) -> BTreeMap<String, String> {
        offers.iter().map(|o| (o.agent_id.0.clone(), o.framework_id.0.clone())).collect()
    }

    #[test]
    fn lower_dominant_share_gets_the_next_agent() {
        let mut a = alloc();
        for i in 0..4 {
            agent(&mut a, &format!("n{i}"), 4.0, 4096.0);
        }
        a.add_framework(fw("a"), "*".into());
        a.add_framework(fw("b"), "*".into());
        // "a" already runs 2 cpus (share 2/16) on n0; "b" has nothing.
        a.track_used(&ag("n0"), &fw("a"), &Resources::scalars(2.0, 0.0, 0.0));
        let offers = a.allocate(0);
        let m = by_agent(&offers);
        // n0 (2 cpus free) → b (share 0 < 2/16); b now at 2/16 = a's, tie by id → a gets n1;
        // a at 6/16 vs b 2/16 → b gets n2; b at 6/16 = a's → a gets n3.
        assert_eq!(m["n0"], "b");
        assert_eq!(m["n1"], "a");
        assert_eq!(m["n2"], "b");
        assert_eq!(m["n3"], "a");
        assert_eq!(offers.len(), 4);
        assert_eq!(offers[0].resources.cpus, 2.0);
        assert_eq!(offers[0].hostname, "n0.host");
        assert_eq!(offers[0].attributes["rack"], "r1");
        // the dominant resource counts: "a" uses little cpu but much memory (share .45), "b"
        // much cpu (share .40): b has the lower dominant share and gets n1.
        let mut a = alloc();
        agent(&mut a, "n0", 10.0, 1000.0);
        agent(&mut a, "n1", 10.0, 1000.0);
        a.add_framework(fw("a"), "*".into());
        a.add_framework(fw("b"), "*".into());
        a.track_used(&ag("n0"), &fw("a"), &Resources::scalars(1.0, 900.0, 0.0));
        a.track_used(&ag("n0"), &fw("b"), &Resources::scalars(8.0, 100.0, 0.0));
        let m = by_agent(&a.allocate(0));
        assert_eq!(m.len(), 1, "n0 has no memory left");
        assert_eq!(m["n1"], "b");
    }

    #[test]
    fn weights_shift_shares() {
        let mut a = alloc();
        for i in 0..300 {
            agent(&mut a, &format!("n{i:03}"), 1.0, 1024.0);
        }
        a.add_framework(fw("heavy"), "big".into());
        a.add_framework(fw("light"), "small".into());
        a.set_weight("big", 2.0);
        assert_eq!(a.weights(), BTreeMap::from([("big".to_owned(), 2.0)]));
        a.set_weight("small", 0.0); // ignored
        a.set_weight("small", f64::NAN); // ignored
        assert_eq!(a.weights().len(), 1);
        let offers = a.allocate(0);
        assert_eq!(offers.len(), 300);
        let heavy = offers.iter().filter(|o| o.framework_id.0 == "heavy").count();
        let light = offers.len() - heavy;
        assert!((199..=201).contains(&heavy), "heavy got {heavy}");
        assert!((99..=101).contains(&light), "light got {light}");
        // equal weights → equal split
        let mut a = alloc();
        for i in 0..300 {
            agent(&mut a, &format!("n{i:03}"), 1.0, 1024.0);
        }
        a.add_framework(fw("heavy"), "big".into());
        a.add_framework(fw("light"), "small".into());
        let heavy = a.allocate(0).iter().filter(|o| o.framework_id.0 == "heavy").count();
        assert_eq!(heavy, 150);
    }

    #[test]
    fn frameworks_within_a_role_share_the_role() {
        // role r1 has two frameworks, role r2 one: r2's framework gets half the agents.
        let mut a = alloc();
        for i in 0..100 {
            agent(&mut a, &format!("n{i:03}"), 1.0, 1024.0);
        }
        a.add_framework(fw("x1"), "r1".into());
        a.add_framework(fw("x2"), "r1".into());
        a.add_framework(fw("y"), "r2".into());
        let offers = a.allocate(0);
        let count = |f: &str| offers.iter().filter(|o| o.framework_id.0 == f).count();
        assert_eq!(count("y"), 50);
        assert_eq!(count("x1"), 25);
        assert_eq!(count("x2"), 25);
    }

    #[test]
    fn decline_filter_blocks_that_pair_until_expiry_and_revive_clears_it() {
        let mut a = alloc();
        agent(&mut a, "n0", 4.0, 4096.0);
        a.add_framework(fw("a"), "*".into());
        let o = a.allocate(1_000).pop().unwrap();
        assert_eq!(o.framework_id, fw("a"));
        a.decline(&o.id, Filters::refuse(10.0), 1_000).unwrap();
        assert!(a.allocate(1_000).is_empty());
        assert!(a.allocate(10_999).is_empty());
        // another framework does get it meanwhile
        a.add_framework(fw("b"), "*".into());
        let o2 = a.allocate(5_000).pop().unwrap();
        assert_eq!(o2.framework_id, fw("b"));
        a.decline(&o2.id, Filters::refuse(0.0), 5_000).unwrap();
        a.remove_framework(&fw("b"));
        // at now + 10 s the filter has expired
        let o3 = a.allocate(11_000).pop().unwrap();
        assert_eq!(o3.framework_id, fw("a"));
        // revive clears filters
        a.decline(&o3.id, Filters::refuse(3600.0), 11_000).unwrap();
        assert!(a.allocate(12_000).is_empty());
        a.revive(&fw("a"));
        assert_eq!(a.allocate(12_000).len(), 1);
    }

    #[test]
    fn filters_defaults_and_caps() {
        assert_eq!(Filters::default().refuse_ms(), 5_000);
        assert_eq!(Filters::refuse(-1.0).refuse_ms(), 5_000);
        assert_eq!(Filters::refuse(f64::NAN).refuse_ms(), 5_000);
        assert_eq!(Filters::refuse(0.25).refuse_ms(), 250);
        assert_eq!(Filters::refuse(1e12).refuse_ms(), 365 * 24 * 3600 * 1000);
        assert_eq!(Filters::refuse(f64::INFINITY).refuse_ms(), 365 * 24 * 3600 * 1000);
        // the default filter applies when declining with Filters::default()
        let mut a = alloc();
        agent(&mut a, "n0", 1.0, 1024.0);
        a.add_framework(fw("a"), "*".into());
        let o = a.allocate(0).pop().unwrap();
        a.decline(&o.id, Filters::refuse(-3.0), 0).unwrap();
        assert!(a.allocate(4_999).is_empty());
        assert_eq!(a.allocate(5_000).len(), 1);
    }

    #[test]
    fn suppress_stops_offers_until_revive() {
        let mut a = alloc();
        agent(&mut a, "n0", 1.0, 1024.0);
        agent(&mut a, "n1", 1.0, 1024.0);
        a.add_framework(fw("a"), "*".into());
        a.add_framework(fw("b"), "*".into());
        a.suppress(&fw("a"));
        assert!(a.is_suppressed(&fw("a")));
        let offers = a.allocate(0);
        assert_eq!(offers.len(), 2);
        assert!(offers.iter().all(|o| o.framework_id == fw("b")));
        a.suppress(&fw("b"));
        for o in offers {
            a.decline(&o.id, Filters::refuse(0.0), 0).unwrap();
        }
        assert!(a.allocate(0).is_empty());
        a.revive(&fw("a"));
        let offers = a.allocate(0);
        assert_eq!(offers.len(), 2);
        assert!(offers.iter().all(|o| o.framework_id == fw("a")));
    }

    #[test]
    fn accept_of_unknown_or_used_offer_is_an_error() {
        let mut a = alloc();
        agent(&mut a, "n0", 1.0, 1024.0);
        a.add_framework(fw("a"), "*".into());
        let err = a.accept(&"nope".into(), &Resources::default(), Filters::default(), 0).unwrap_err();
        assert!(matches!(err, AllocatorError::UnknownOffer(ref id) if id.as_str() == "nope"));
        let o = a.allocate(0).pop().unwrap();
        assert_eq!(a.offer(&o.id), Some(&o));
        a.accept(&o.id, &Resources::scalars(0.5, 512.0, 0.0), Filters::default(), 0).unwrap();
        assert_eq!(a.offer(&o.id), None);
        let err = a.accept(&o.id, &Resources::scalars(0.1, 1.0, 0.0), Filters::default(), 0).unwrap_err();
        assert!(matches!(err, AllocatorError::UnknownOffer(_)));
        assert!(matches!(a.decline(&o.id, Filters::default(), 0), Err(AllocatorError::UnknownOffer(_))));
        assert!(err.to_string().contains(o.id.as_str()));
    }

    #[test]
    fn accept_exceeding_the_offer_is_an_error_and_changes_nothing() {
        let mut a = alloc();
        agent(&mut a, "n0", 1.0, 1024.0);
        a.add_framework(fw("a"), "*".into());
        let o = a.allocate(0).pop().unwrap();
        let before_out: Vec<Offer> = a.outstanding().into_iter().cloned().collect();
        let before_free = a.agent_free(&ag("n0"));
        let too_much = Resources::scalars(2.0, 10.0, 0.0);
        let err = a.accept(&o.id, &too_much, Filters::default(), 0).unwrap_err();
        assert!(matches!(err, AllocatorError::ResourcesExceedOffer { .. }));
        let foreign_port = Resources { ports: PortRanges::from_ports([80]), ..Resources::scalars(0.1, 1.0, 0.0) };
        assert!(a.accept(&o.id, &foreign_port, Filters::default(), 0).is_err());
        let after_out: Vec<Offer> = a.outstanding().into_iter().cloned().collect();
        assert_eq!(before_out, after_out);
        assert_eq!(before_free, a.agent_free(&ag("n0")));
        assert_eq!(a.framework_share(&fw("a")), Some(1.0));
        // the offer is still usable
        a.accept(&o.id, &Resources::scalars(1.0, 1024.0, 0.0), Filters::default(), 0).unwrap();
    }

    #[test]
    fn accept_remainder_returns_to_the_pool_with_a_filter() {
        let mut a = alloc();
        agent(&mut a, "n0", 4.0, 4096.0);
        a.add_framework(fw("a"), "*".into());
        let o = a.allocate(0).pop().unwrap();
        assert_eq!(a.agent_free(&ag("n0")).unwrap(), Resources::default());
        let used = Resources { ports: PortRanges::from_ports([31000]), ..Resources::scalars(1.0, 1024.0, 0.0) };
        a.accept(&o.id, &used, Filters::refuse(10.0), 0).unwrap();
        let free = a.agent_free(&ag("n0")).unwrap();
        assert_eq!(free, Resources { ports: PortRanges::range(31001, 31009), ..Resources::scalars(3.0, 3072.0, 0.0) });
        assert!(a.outstanding().is_empty());
        // the remainder is filtered for "a" ...
        assert!(a.allocate(1).is_empty());
        // ... but another framework gets it
        a.add_framework(fw("b"), "*".into());
        let o2 = a.allocate(1).pop().unwrap();
        assert_eq!(o2.framework_id, fw("b"));
        assert_eq!(o2.resources, free);
        // accepting everything installs no filter (nothing refused)
        a.accept(&o2.id, &o2.resources, Filters::refuse(100.0), 1).unwrap();
        a.recover(&ag("n0"), &fw("b"), &o2.resources);
        a.remove_framework(&fw("b"));
        assert!(a.allocate(9_999).is_empty()); // a's filter still holds
        assert_eq!(a.allocate(10_000).len(), 1);
    }

    #[test]
    fn accept_of_everything_with_no_remainder_installs_no_filter() {
        let mut a = alloc();
        agent(&mut a, "n0", 4.0, 4096.0);
        a.add_framework(fw("a"), "*".into());
        let o = a.allocate(0).pop().unwrap();
        a.accept(&o.id, &o.resources, Filters::refuse(1000.0), 0).unwrap();
        assert!(a.allocate(0).is_empty()); // nothing free
        a.recover(&ag("n0"), &fw("a"), &Resources::scalars(1.0, 1024.0, 0.0));
        let o = a.allocate(1).pop().expect("no filter for a full accept");
        assert_eq!(o.resources, Resources::scalars(1.0, 1024.0, 0.0));
    }

    #[test]
    fn recover_returns_resources() {
        let mut a = alloc();
        agent(&mut a, "n0", 2.0, 2048.0);
        a.add_framework(fw("a"), "*".into());
        let o = a.allocate(0).pop().unwrap();
        let task = Resources { ports: PortRanges::from_ports([31005]), ..Resources::scalars(2.0, 2048.0, 0.0) };
        a.accept(&o.id, &task, Filters::refuse(0.0), 0).unwrap();
        assert_eq!(a.agent_free(&ag("n0")).unwrap().cpus, 0.0);
        assert_eq!(a.framework_share(&fw("a")), Some(1.0));
        // recovering for the wrong framework or agent changes nothing
        a.recover(&ag("n0"), &fw("zzz"), &task);
        a.recover(&ag("nope"), &fw("a"), &task);
        assert_eq!(a.agent_free(&ag("n0")).unwrap().cpus, 0.0);
        a.recover(&ag("n0"), &fw("a"), &Resources::scalars(0.5, 512.0, 0.0));
        let free = a.agent_free(&ag("n0")).unwrap();
        assert_eq!((free.cpus, free.mem), (0.5, 512.0));
        assert_eq!(a.framework_share(&fw("a")), Some(0.75));
        a.recover(&ag("n0"), &fw("a"), &task); // more than is left: clamps
        assert_eq!(a.agent_free(&ag("n0")).unwrap(), a.agents[&ag("n0")].total);
        assert_eq!(a.framework_share(&fw("a")), Some(0.0));
        assert!(a.agent_allocated(&ag("n0")).unwrap().is_empty());
        let o = a.allocate(0).pop().unwrap();
        assert_eq!(o.resources.cpus, 2.0);
    }

    #[test]
    fn remove_agent_rescinds_its_offers() {
        let mut a = alloc();
        agent(&mut a, "n0", 1.0, 1024.0);
        agent(&mut a, "n1", 1.0, 1024.0);
        a.add_framework(fw("a"), "*".into());
        let offers = a.allocate(0);
        assert_eq!(offers.len(), 2);
        let n0 = offers.iter().find(|o| o.agent_id == ag("n0")).unwrap().clone();
        let rescinded = a.remove_agent(&ag("n0"));
        assert_eq!(rescinded, vec![n0.clone()]);
        assert_eq!(a.outstanding().len(), 1);
        assert!(a.agent_free(&ag("n0")).is_none());
        assert!(matches!(
            a.accept(&n0.id, &Resources::default(), Filters::default(), 0),
            Err(AllocatorError::UnknownOffer(_))
        ));
        // share now against the smaller cluster: the n1 offer is everything
        assert_eq!(a.framework_share(&fw("a")), Some(1.0));
        assert!(a.remove_agent(&ag("n0")).is_empty());
    }

    #[test]
    fn remove_framework_rescinds_offers_and_frees_allocations() {
        let mut a = alloc();
        agent(&mut a, "n0", 2.0, 2048.0);
        agent(&mut a, "n1", 2.0, 2048.0);
        a.add_framework(fw("a"), "*".into());
        let offers = a.allocate(0);
        let n0 = offers.iter().find(|o| o.agent_id == ag("n0")).unwrap();
        a.accept(&n0.id, &Resources::scalars(2.0, 2048.0, 0.0), Filters::default(), 0).unwrap();
        let rescinded = a.remove_framework(&fw("a"));
        assert_eq!(rescinded.len(), 1);
        assert_eq!(rescinded[0].agent_id, ag("n1"));
        assert!(a.outstanding().is_empty());
        assert_eq!(a.agent_free(&ag("n0")).unwrap().cpus, 2.0);
        assert_eq!(a.agent_free(&ag("n1")).unwrap().cpus, 2.0);
        a.add_framework(fw("b"), "*".into());
        assert_eq!(a.allocate(0).len(), 2);
    }

    #[test]
    fn expire_offers_rescinds_old_offers() {
        let mut a = DrfAllocator::with_offer_prefix(
            AllocatorConfig { offer_timeout_ms: Some(1_000), ..AllocatorConfig::default() },
            "x-",
        );
        agent(&mut a, "n0", 1.0, 1024.0);
        a.add_framework(fw("a"), "*".into());
        let o = a.allocate(0).pop().unwrap();
        agent(&mut a, "n1", 1.0, 1024.0);
        let o1 = a.allocate(500).pop().unwrap();
        assert!(a.expire_offers(999).is_empty());
        assert_eq!(a.expire_offers(1_000), vec![o.clone()]);
        assert_eq!(a.outstanding(), vec![&o1]);
        assert_eq!(a.agent_free(&ag("n0")).unwrap().cpus, 1.0);
        assert!(a.decline(&o.id, Filters::default(), 1_000).is_err());
        // no filter after expiry: re-offered at once
        let again = a.allocate(1_000);
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].agent_id, ag("n0"));
        assert_ne!(again[0].id, o.id);
        // without a timeout nothing expires
        let mut b = alloc();
        agent(&mut b, "n0", 1.0, 1024.0);
        b.add_framework(fw("a"), "*".into());
        b.allocate(0);
        assert!(b.expire_offers(u64::MAX).is_empty());
    }

    #[test]
    fn used_ports_are_not_offered_again_until_recovered() {
        let mut a = alloc();
        agent(&mut a, "n0", 4.0, 4096.0);
        a.add_framework(fw("a"), "*".into());
        a.add_framework(fw("b"), "*".into());
        let o = a.allocate(0).pop().unwrap();
        let mine = PortRanges::from_ports([31000, 31003]);
        let task = Resources { ports: mine.clone(), ..Resources::scalars(1.0, 1024.0, 0.0) };
        let owner = o.framework_id.clone();
        a.accept(&o.id, &task, Filters::refuse(0.0), 0).unwrap();
        for _ in 0..3 {
            for o in a.allocate(0) {
                assert!(mine.iter().all(|p| !o.resources.ports.contains(p)), "{}", o.resources);
                assert_eq!(o.resources.ports.len(), 8);
                a.decline(&o.id, Filters::refuse(0.0), 0).unwrap();
            }
        }
        assert!(!a.agent_free(&ag("n0")).unwrap().ports.contains(31003));
        a.recover(&ag("n0"), &owner, &task);
        assert_eq!(a.agent_free(&ag("n0")).unwrap().ports, PortRanges::range(31000, 31009));
        let o = a.allocate(0).pop().unwrap();
        assert!(o.resources.ports.contains(31000) && o.resources.ports.contains(31003));
    }

    #[test]
    fn track_used_counts_for_free_and_shares_even_before_the_framework_registers() {
        let mut a = alloc();
        agent(&mut a, "n0", 4.0, 4096.0);
        agent(&mut a, "n1", 4.0, 4096.0);
        let t = Resources { ports: PortRanges::from_ports([31001]), ..Resources::scalars(3.0, 1024.0, 0.0) };
        a.track_used(&ag("n0"), &fw("late"), &t);
        a.track_used(&ag("ghost"), &fw("late"), &t); // ignored
        let free = a.agent_free(&ag("n0")).unwrap();
        assert_eq!((free.cpus, free.mem, free.ports.len()), (1.0, 3072.0, 9));
        a.add_framework(fw("late"), "*".into());
        a.add_framework(fw("new"), "*".into());
        assert_eq!(a.framework_share(&fw("late")), Some(3.0 / 8.0));
        let m = by_agent(&a.allocate(0));
        assert_eq!(m["n0"], "new"); // late already holds 3/8
        assert_eq!(m["n1"], "late"); // new at 3/8 (mem 3072/8192), late at 3/8, tie → "late" < "new"
    }

    #[test]
    fn min_allocatable_skips_nearly_full_agents() {
        let mut a = DrfAllocator::with_offer_prefix(
            AllocatorConfig {
                offer_timeout_ms: None,
                min_allocatable: Resources::scalars(0.5, 256.0, 0.0),
                ..AllocatorConfig::default()
            },
            "m-",
        );
        agent(&mut a, "n0", 1.0, 1024.0);
        a.add_framework(fw("a"), "*".into());
        a.track_used(&ag("n0"), &fw("a"), &Resources::scalars(0.6, 0.0, 0.0));
        assert!(a.allocate(0).is_empty());
        a.recover(&ag("n0"), &fw("a"), &Resources::scalars(0.1, 0.0, 0.0));
        assert_eq!(a.allocate(0).len(), 1);
        // a fully used agent is never offered, even with a zero minimum
        let mut b = DrfAllocator::with_offer_prefix(
            AllocatorConfig {
                offer_timeout_ms: None,
                min_allocatable: Resources::default(),
                ..AllocatorConfig::default()
            },
            "m-",
        );
        b.add_agent(ag("n0"), "h".into(), Resources::scalars(1.0, 1.0, 0.0), BTreeMap::new());
        b.add_framework(fw("a"), "*".into());
        b.track_used(&ag("n0"), &fw("a"), &Resources::scalars(1.0, 1.0, 0.0));
        assert!(b.allocate(0).is_empty());
    }

    #[test]
    fn offer_ids_are_unique_within_and_across_allocators() {
        let mut a = DrfAllocator::new(AllocatorConfig::default());
        let mut b = DrfAllocator::new(AllocatorConfig::default());
        let mut seen = BTreeSet::new();
        for x in [&mut a, &mut b] {
            agent(x, "n0", 1.0, 1024.0);
            x.add_framework(fw("a"), "*".into());
            for t in 0..5 {
                let o = x.allocate(t).pop().unwrap();
                assert!(seen.insert(o.id.clone()), "duplicate {}", o.id);
                x.decline(&o.id, Filters::refuse(0.0), t).unwrap();
            }
        }
        assert_eq!(seen.len(), 10);
    }

    /// A tiny deterministic generator for the scenario tests.
    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self, n: u64) -> u64 {
            self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (self.0 >> 33) % n
        }
    }

    /// Build a random scenario and run a few cycles, returning the (agent, framework) pairs.
    fn scenario(seed: u64) -> Vec<Vec<(String, String)>> {
        let mut rng = Lcg(seed);
        let mut a = DrfAllocator::with_offer_prefix(AllocatorConfig::default(), "s-");
        for i in 0..40 {
            let c = (1 + rng.next(8)) as f64;
            a.add_agent(ag(&format!("n{i:02}")), "h".into(), Resources::scalars(c, c * 1024.0, 0.0), BTreeMap::new());
        }
        for r in 0..3 {
            a.set_weight(&format!("r{r}"), (1 + r) as f64);
        }
        for f in 0..7 {
            a.add_framework(fw(&format!("f{f}")), format!("r{}", rng.next(3)));
        }
        let mut cycles = Vec::new();
        for t in 0..6u64 {
            let now = t * 1000;
            let offers = a.allocate(now);
            cycles.push(offers.iter().map(|o| (o.agent_id.0.clone(), o.framework_id.0.clone())).collect());
            for o in offers {
                match rng.next(3) {
                    0 => a.decline(&o.id, Filters::refuse(rng.next(3) as f64), now).unwrap(),
                    _ => {
                        let used = Resources::scalars(o.resources.cpus / 2.0, o.resources.mem / 2.0, 0.0);
                        a.accept(&o.id, &used, Filters::refuse(1.0), now).unwrap();
                    }
                }
            }
        }
        cycles
    }

    #[test]
    fn same_inputs_give_the_same_offers() {
        assert_eq!(scenario(7), scenario(7));
        assert_ne!(scenario(7), scenario(8));
    }

    /// The incremental ordered sets agree with a naive full recomputation per agent.
    #[test]
    fn cycle_matches_a_naive_reference() {
        for seed in 0..20u64 {
            let mut rng = Lcg(seed);
            let mut a = DrfAllocator::with_offer_prefix(AllocatorConfig::default(), "r-");
            let nagents = 30;
            for i in 0..nagents {
                // powers of two keep the float sums exact, so ties are real ties in both
                let c = (1u64 << rng.next(4)) as f64;
                a.add_agent(
                    ag(&format!("n{i:02}")),
                    "h".into(),
                    Resources::scalars(c, 1024.0 * (1u64 << rng.next(3)) as f64, 0.0),
                    BTreeMap::new(),
                );
            }
            let nfw = 6;
            let mut roles = BTreeMap::new();
            for f in 0..nfw {
                let role = format!("r{}", rng.next(3));
                roles.insert(format!("f{f}"), role.clone());
                a.add_framework(fw(&format!("f{f}")), role);
            }
            a.set_weight("r1", 2.0);
            a.set_weight("r2", 4.0);
            let mut suppressed = BTreeSet::new();
            if rng.next(2) == 0 {
                a.suppress(&fw("f0"));
                suppressed.insert("f0".to_owned());
            }
            // some pre-existing allocations and filters
            let mut alloc: BTreeMap<String, Scalars> = BTreeMap::new();
            let mut filtered = BTreeSet::new();
            for i in 0..nagents {
                let f = format!("f{}", rng.next(nfw));
                let r = Resources::scalars(0.5, 256.0, 0.0);
                if rng.next(3) == 0 {
                    a.track_used(&ag(&format!("n{i:02}")), &fw(&f), &r);
                    alloc.entry(f.clone()).or_default().add(Scalars::of(&r));
                }
                if rng.next(4) == 0 {
                    let n = ag(&format!("n{i:02}"));
                    let uid = a.agents[&n].uid;
                    let total = a.agents[&n].total.clone();
                    a.frameworks.get_mut(&fw(&f)).unwrap().filters.insert(uid, vec![(10, total)]);
                    filtered.insert((n.0.clone(), f.clone()));
                }
            }
            let total = a.cluster_total();
            let weights = a.weights();
            let mut expect = Vec::new();
            for (id, ag_state) in &a.agents {
                let share = |f: &str, alloc: &BTreeMap<String, Scalars>| {
                    alloc.get(f).copied().unwrap_or_default().dominant_share(&total)
                };
                let role_share = |r: &str, alloc: &BTreeMap<String, Scalars>| {
                    let mut s = Scalars::default();
                    for (f, fr) in &roles {
                        if fr == r {
                            s.add(alloc.get(f).copied().unwrap_or_default());
                        }
                    }
                    s.dominant_share(&total) / weights.get(r).copied().unwrap_or(1.0)
                };
                let best = roles
                    .iter()
                    .filter(|(f, _)| !suppressed.contains(*f) && !filtered.contains(&(id.0.clone(), (*f).clone())))
                    .min_by(|(f1, r1), (f2, r2)| {
                        role_share(r1, &alloc)
                            .total_cmp(&role_share(r2, &alloc))
                            .then(r1.cmp(r2))
                            .then(share(f1, &alloc).total_cmp(&share(f2, &alloc)))
                            .then(f1.cmp(f2))
                    })
                    .map(|(f, _)| f.clone());
                if let Some(f) = best {
                    alloc.entry(f.clone()).or_default().add(Scalars::of(&ag_state.free));
                    expect.push((id.0.clone(), f));
                }
            }
            let got: Vec<(String, String)> =
                a.allocate(0).iter().map(|o| (o.agent_id.0.clone(), o.framework_id.0.clone())).collect();
            assert_eq!(got, expect, "seed {seed}");
        }
    }

    #[test]
    fn offered_resources_count_as_allocated() {
        let mut a = alloc();
        agent(&mut a, "n0", 1.0, 1024.0);
        a.add_framework(fw("a"), "*".into());
        let o = a.allocate(0).pop().unwrap();
        assert_eq!(a.framework_share(&fw("a")), Some(1.0));
        assert!(a.allocate(0).is_empty(), "an offered agent is not offered twice");
        a.decline(&o.id, Filters::refuse(0.0), 0).unwrap();
        assert_eq!(a.framework_share(&fw("a")), Some(0.0));
    }

    fn fair() -> DrfAllocator {
        DrfAllocator::with_offer_prefix(
            AllocatorConfig {
                offer_timeout_ms: None,
                min_allocatable: Resources::scalars(0.01, 1.0, 0.0),
                fair_share_slices: true,
            },
            "f-",
        )
    }

    /// Scalars offered per framework in one cycle.
    fn offered(offers: &[Offer]) -> BTreeMap<String, (f64, f64, usize)> {
        let mut m: BTreeMap<String, (f64, f64, usize)> = BTreeMap::new();
        for o in offers {
            let e = m.entry(o.framework_id.0.clone()).or_default();
            e.0 += o.resources.cpus;
            e.1 += o.resources.mem;
            e.2 += o.resources.ports.len();
        }
        m
    }

    #[test]
    fn one_agent_is_shared_by_weight_within_one_cycle() {
        let mut a = fair();
        agent(&mut a, "n0", 4.0, 4096.0);
        a.add_framework(fw("marathon"), "*".into());
        a.add_framework(fw("batch"), "batch".into());
        let offers = a.allocate(0);
        let m = offered(&offers);
        assert_eq!(m["marathon"], (2.0, 2048.0, 5));
        assert_eq!(m["batch"], (2.0, 2048.0, 5));
        assert_eq!(offers.len(), 2, "one offer per framework");
        assert!(a.agent_free(&ag("n0")).unwrap().is_empty());
        // ports of the two offers do not overlap
        assert!(offers[0].resources.ports.iter().all(|p| !offers[1].resources.ports.contains(p)));
        for o in offers {
            a.decline(&o.id, Filters::refuse(0.0), 0).unwrap();
        }
        // weight 3 for batch: 3/4 of the node
        a.set_weight("batch", 3.0);
        let m = offered(&a.allocate(1));
        assert_eq!((m["batch"].0, m["marathon"].0), (3.0, 1.0));
    }

    #[test]
    fn fair_slices_respect_what_frameworks_already_hold() {
        let mut a = fair();
        agent(&mut a, "n0", 4.0, 4096.0);
        a.add_framework(fw("a"), "*".into());
        a.add_framework(fw("b"), "*".into());
        a.track_used(&ag("n0"), &fw("a"), &Resources::scalars(3.0, 1024.0, 0.0));
        // a holds 3/4 (above its half): b gets the whole rest (it stays below its half)
        let m = offered(&a.allocate(0));
        assert_eq!(m.len(), 1);
        assert_eq!(m["b"].0, 1.0);
    }

    #[test]
    fn what_nobody_below_its_share_takes_goes_to_the_others() {
        let mut a = fair();
        agent(&mut a, "n0", 4.0, 4096.0);
        a.add_framework(fw("a"), "*".into());
        a.add_framework(fw("b"), "*".into());
        let offers = a.allocate(0);
        let ob = offers.iter().find(|o| o.framework_id == fw("b")).unwrap().clone();
        // b declines for a long time: the half it refused goes to a (work conserving)
        a.decline(&ob.id, Filters::refuse(60.0), 0).unwrap();
        let m = offered(&a.allocate(1));
        assert_eq!(m.len(), 1);
        assert_eq!(m["a"].0, 2.0);
        assert_eq!(a.framework_share(&fw("a")), Some(1.0));
        // a suppressed framework does not count: the other gets the whole agent at once
        let mut c = fair();
        agent(&mut c, "n0", 4.0, 4096.0);
        c.add_framework(fw("a"), "*".into());
        c.add_framework(fw("b"), "*".into());
        c.suppress(&fw("b"));
        let m = offered(&c.allocate(0));
        assert_eq!(m["a"].0, 4.0);
        assert!(!m.contains_key("b"));
    }

    #[test]
    fn quota_limits_what_a_role_holds() {
        let mut a = fair();
        agent(&mut a, "n0", 4.0, 4096.0);
        agent(&mut a, "n1", 4.0, 4096.0);
        a.add_framework(fw("greedy"), "capped".into());
        a.set_quota("capped", Some(&Resources::scalars(1.5, f64::INFINITY, f64::INFINITY)));
        let m = offered(&a.allocate(0));
        assert!((m["greedy"].0 - 1.5).abs() < 1e-9, "{m:?}");
        // used resources count too: after accepting 1 cpu, only 0.5 more is offered
        let offers: Vec<Offer> = a.outstanding().into_iter().cloned().collect();
        let o = &offers[0];
        a.accept(&o.id, &Resources::scalars(1.0, 10.0, 0.0), Filters::refuse(0.0), 0).unwrap();
        for o in offers.iter().skip(1) {
            a.decline(&o.id, Filters::refuse(0.0), 0).unwrap();
        }
        let half = a.allocate(1);
        let m = offered(&half);
        assert!((m["greedy"].0 - 0.5).abs() < 1e-9, "{m:?}");
        assert_eq!(m["greedy"].1, 4096.0 - 10.0, "memory is not limited: all of it comes along");
        assert_eq!(a.quotas()["capped"].cpus, 1.5);
        // removing the quota: the rest of the cluster is offered
        a.decline(&half[0].id, Filters::refuse(0.0), 1).unwrap();
        a.set_quota("capped", None);
        let m = offered(&a.allocate(2));
        assert!((m["greedy"].0 - 7.0).abs() < 1e-9, "{m:?}");
        // quota applies without fair slices too
        let mut b = alloc();
        agent(&mut b, "n0", 4.0, 4096.0);
        b.add_framework(fw("x"), "r".into());
        b.set_quota("r", Some(&Resources::scalars(f64::INFINITY, 1024.0, f64::INFINITY)));
        let m = offered(&b.allocate(0));
        assert_eq!((m["x"].0, m["x"].1), (4.0, 1024.0), "only mem is limited");
    }

    #[test]
    fn per_framework_min_allocatable_skips_small_offers() {
        let mut a = fair();
        agent(&mut a, "n0", 4.0, 4096.0);
        a.add_framework(fw("big"), "*".into());
        a.add_framework(fw("small"), "*".into());
        a.set_min_allocatable(&fw("big"), vec![Resources::scalars(3.0, 0.0, 0.0)]);
        // big's fair half (2 cpus) is below its minimum: small gets its half, then the rest
        // (work conserving) goes to whoever wants it: big still does not (2 < 3), small does.
        let m = offered(&a.allocate(0));
        assert!(!m.contains_key("big"), "{m:?}");
        assert_eq!(m["small"].0, 4.0);
        for o in a.outstanding().into_iter().cloned().collect::<Vec<_>>() {
            a.decline(&o.id, Filters::refuse(60.0), 0).unwrap();
        }
        // with small filtered, big gets the whole agent (it holds its minimum)
        let m = offered(&a.allocate(1));
        assert_eq!(m["big"].0, 4.0);
    }

    #[test]
    fn a_filter_covers_only_the_refused_resources() {
        let mut a = alloc();
        agent(&mut a, "n0", 4.0, 4096.0);
        a.add_framework(fw("a"), "*".into());
        let o = a.allocate(0).pop().unwrap();
        // use 3 cpus, refuse the rest for a minute
        a.accept(&o.id, &Resources::scalars(3.0, 1024.0, 0.0), Filters::refuse(60.0), 0).unwrap();
        assert!(a.allocate(1_000).is_empty(), "only the refused rest is free");
        // a task ends: the freed cpus are offered at once, with the refused rest
        a.recover(&ag("n0"), &fw("a"), &Resources::scalars(1.0, 0.0, 0.0));
        let o = a.allocate(2_000).pop().expect("freed resources are not filtered");
        assert_eq!(o.resources.cpus, 2.0);
        a.decline(&o.id, Filters::refuse(60.0), 2_000).unwrap();
        assert!(a.allocate(3_000).is_empty(), "declined whole: filtered");
    }

    #[test]
    fn fair_slices_cap_each_resource_not_the_whole_agent_proportionally() {
        // Tasks use much CPU and little memory: the slice is bounded by CPU, memory comes along.
        let mut a = fair();
        agent(&mut a, "n0", 4.0, 4096.0);
        a.add_framework(fw("a"), "*".into());
        a.add_framework(fw("b"), "b".into());
        a.track_used(&ag("n0"), &fw("a"), &Resources::scalars(2.0, 128.0, 0.0));
        a.track_used(&ag("n0"), &fw("b"), &Resources::scalars(1.5, 192.0, 0.0));
        let m = offered(&a.allocate(0));
        // b may grow to 2 cpus and 2048 MiB: it gets the free 0.5 cpus and memory up to its half
        assert_eq!(m["b"].0, 0.5, "{m:?}");
        assert!(!m.contains_key("a"), "a holds its half of the cpus: {m:?}");
    }

    #[test]
    fn leftovers_go_to_the_framework_that_uses_least_not_to_one_with_a_long_task() {
        // a runs long tasks at its fair half; b runs short ones and holds an outstanding offer
        // whose memory makes its dominant share look high. A cpu freed meanwhile must go to b
        // (which uses less), or a would keep more than its half for as long as its tasks run.
        let mut a = fair();
        agent(&mut a, "n0", 4.0, 4096.0);
        a.add_framework(fw("a"), "*".into());
        a.add_framework(fw("b"), "b".into());
        a.track_used(&ag("n0"), &fw("a"), &Resources::scalars(2.0, 128.0, 0.0));
        a.track_used(&ag("n0"), &fw("b"), &Resources::scalars(1.5, 192.0, 0.0));
        let o = a.allocate(0).pop().unwrap();
        assert_eq!((o.framework_id.0.as_str(), o.resources.cpus), ("b", 0.5));
        assert!(o.resources.mem > 2048.0, "the unusable rest of the memory came along");
        // one of b's tasks ends while the offer is outstanding
        a.recover(&ag("n0"), &fw("b"), &Resources::scalars(0.5, 64.0, 0.0));
        let next = a.allocate(1);
        assert_eq!(next.len(), 1);
        assert_eq!((next[0].framework_id.0.as_str(), next[0].resources.cpus), ("b", 0.5), "{next:?}");
    }
}
