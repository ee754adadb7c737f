//! Intelligent endpoints: a service's healthy instances, kept current by a blocking-query watch,
//! with client-side load balancing, passive ejection and datacenter fallback.
//!
//! [`Endpoints::watch`] resolves a service through `GET /v1/health/service/<name>?passing=1`
//! (with `tag=` filters) and keeps the answer current with Consul blocking queries
//! (`?index=<X-Consul-Index>&wait=...`): the server answers as soon as the service's health
//! changes, so an instance whose check turns critical stops being picked right away — no
//! polling. The watch loop follows Consul's client rules: the index resets when it goes
//! backwards and is never below 1, the loop is rate-limited (a token bucket of burst 2), and
//! errors back off exponentially while the last known instances stay in use.
//!
//! [`Endpoints::pick`] chooses an instance ([`Balance`]: power-of-two-choices on requests in
//! flight by default, or round robin) and returns a [`Lease`]: its address and port, and a
//! guard that counts the request in flight until dropped. Report how the call went with
//! [`Lease::success`] / [`Lease::failure`]; instances that keep failing are ejected for a while
//! ([`Ejection`]).
//!
//! Other datacenters (`?dc=` on the same API, watched the same way) serve when the local one
//! has no healthy instance: by default the [`NEAREST_FALLBACKS`] nearest ones, in the order of
//! `/v1/catalog/datacenters` (nearest first by WAN round-trip time), the rule of mesh's
//! `--dns-failover nearest`; with [`EndpointsOptions::fallback`], the ones given, in the order
//! given; with [`EndpointsOptions::no_fallback`], none.
//!
//! ```no_run
//! # async fn f() -> Result<(), Box<dyn std::error::Error>> {
//! use mesh_sdk::consul::ConsulClient;
//! use mesh_sdk::endpoints::{Endpoints, EndpointsOptions};
//!
//! let consul = ConsulClient::new("127.0.0.1:8500")?;
//! let web = Endpoints::watch(&consul, "web", EndpointsOptions::default().tag("v2").fallback("dc2")).await?;
//! if let Some(lease) = web.pick() {
//!     let url = format!("http://{}/", lease.authority());
//!     match reqwest::get(&url).await {
//!         Ok(r) if r.status().is_success() => lease.success(),
//!         _ => lease.failure(),
//!     }
//! }
//! # Ok(()) }
//! ```

mod balancer;

pub use balancer::{Balance, Ejection};

use crate::consul::{CheckStatus, ConsulClient, ConsulError, HealthQuery, ServiceEntry};
use balancer::Balancer;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// A healthy instance of a service.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Instance {
    /// Instance (service) id.
    pub id: String,
    /// Service name.
    pub service: String,
    /// Node it runs on.
    pub node: String,
    /// Address to connect to (the service's, else its node's).
    pub address: String,
    /// Port.
    pub port: u16,
    /// Tags.
    pub tags: Vec<String>,
    /// Metadata.
    pub meta: BTreeMap<String, String>,
    /// Datacenter it was found in.
    pub datacenter: String,
}

impl Instance {
    /// `address:port` (IPv6 addresses in brackets), for URLs.
    pub fn authority(&self) -> String {
        if self.address.contains(':') && !self.address.starts_with('[') {
            format!("[{}]:{}", self.address, self.port)
        } else {
            format!("{}:{}", self.address, self.port)
        }
    }

    fn key(&self) -> (&str, &str) {
        (&self.datacenter, &self.id)
    }

    fn from_entry(e: &ServiceEntry, dc: &str) -> Instance {
        Instance {
            id: e.service.id.clone(),
            service: e.service.service.clone(),
            node: e.node.node.clone(),
            address: e.address().to_owned(),
            port: e.service.port,
            tags: e.service.tags.clone(),
            meta: e.service.meta.clone(),
            datacenter: if e.node.datacenter.is_empty() { dc.to_owned() } else { e.node.datacenter.clone() },
        }
    }
}

/// How many other datacenters serve as fallbacks by default, nearest first.
pub const NEAREST_FALLBACKS: usize = 3;

/// Options of [`Endpoints::watch`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct EndpointsOptions {
    /// Only instances with all these tags.
    pub tags: Vec<String>,
    /// The datacenter to ask first (default: the agent's own).
    pub datacenter: Option<String>,
    /// Other datacenters to use, in order, when the first has no healthy instance. Empty: the
    /// nearest ones ([`NEAREST_FALLBACKS`] at most), unless `no_fallback`.
    pub fallback: Vec<String>,
    /// Never fall back to another datacenter.
    pub no_fallback: bool,
    /// How to choose among instances.
    pub balance: Balance,
    /// Passive ejection of failing instances.
    pub ejection: Ejection,
    /// How long one blocking query may wait (`?wait=`). Default 5 minutes.
    pub wait: Duration,
    /// Rate limit of the watch loop: at most a burst of 2 queries, then one per this period.
    pub min_interval: Duration,
    /// First delay after a failed query; doubled per failure in a row.
    pub error_backoff: Duration,
    /// Longest delay after failed queries.
    pub max_error_backoff: Duration,
}

impl Default for EndpointsOptions {
    fn default() -> Self {
        EndpointsOptions {
            tags: Vec::new(),
            datacenter: None,
            fallback: Vec::new(),
            no_fallback: false,
            balance: Balance::default(),
            ejection: Ejection::default(),
            wait: Duration::from_secs(300),
            min_interval: Duration::from_millis(50),
            error_backoff: Duration::from_millis(200),
            max_error_backoff: Duration::from_secs(30),
        }
    }
}

impl EndpointsOptions {
    /// Only instances with `tag` (repeat for several; all must match).
    pub fn tag(mut self, tag: impl Into<String>) -> Self {
        self.tags.push(tag.into());
        self
    }
    /// Fall back to datacenter `dc` (after any added before) when the local one has none.
    pub fn fallback(mut self, dc: impl Into<String>) -> Self {
        self.fallback.push(dc.into());
        self
    }
    /// Never fall back to another datacenter (by default the nearest ones serve when the
    /// first has no healthy instance).
    pub fn no_fallback(mut self) -> Self {
        self.no_fallback = true;
        self
    }

    /// Ask datacenter `dc` first instead of the agent's.
    pub fn datacenter(mut self, dc: impl Into<String>) -> Self {
        self.datacenter = Some(dc.into());
        self
    }
    /// Choose instances this way.
    pub fn balance(mut self, balance: Balance) -> Self {
        self.balance = balance;
        self
    }
    /// Eject failing instances this way.
    pub fn ejection(mut self, ejection: Ejection) -> Self {
        self.ejection = ejection;
        self
    }
    /// Let one blocking query wait at most this long.
    pub fn wait(mut self, wait: Duration) -> Self {
        self.wait = wait;
        self
    }
}

struct Shared {
    service: String,
    queries: std::sync::atomic::AtomicU64,
    errors: std::sync::atomic::AtomicU64,
    tags: Vec<String>,
    state: Mutex<State>,
    version: watch::Sender<u64>,
}

struct State {
    /// The latest instances per datacenter: the first, then the fallbacks; `None` until known.
    per_dc: Vec<Option<Vec<Instance>>>,
    dc_names: Vec<String>,
    active: Option<usize>,
    balancer: Balancer,
    rng: StdRng,
}

impl State {
    /// Store the instances of datacenter `i`; returns whether anything changed.
    fn set(&mut self, i: usize, list: Vec<Instance>) -> bool {
        if self.per_dc[i].as_ref() == Some(&list) {
            return false;
        }
        self.per_dc[i] = Some(list);
        let active = self.per_dc.iter().position(|l| l.as_ref().is_some_and(|l| !l.is_empty()));
        if active != self.active {
            match active {
                Some(a) if a > 0 => tracing::info!(dc = self.dc_names[a], "no healthy local instance: falling back"),
                Some(_) if self.active.is_some() => tracing::info!("local instances are back"),
                _ => {}
            }
        }
        self.active = active;
        let current = active.and_then(|a| self.per_dc[a].clone()).unwrap_or_default();
        self.balancer.set_instances(current);
        true
    }
}

/// A watched service: its healthy instances and a load balancer over them.
///
/// Dropping it stops the watch.
pub struct Endpoints {
    shared: Arc<Shared>,
    tasks: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Endpoints {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoints").field("service", &self.shared.service).finish_non_exhaustive()
    }
}

impl Drop for Endpoints {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Endpoints {
    /// Resolve `service` and keep watching it. Returns once the first answer of the first
    /// datacenter is in (an error if that query fails); the fallbacks are asked at the same
    /// time, and their errors only delay them.
    ///
    /// Without fallbacks named (and without `no_fallback`), the fallbacks are the nearest other
    /// datacenters when the watch starts (none if the agent cannot list them).
    pub async fn watch(consul: &ConsulClient, service: &str, opts: EndpointsOptions) -> Result<Endpoints, ConsulError> {
        let mut dcs: Vec<Option<String>> = vec![opts.datacenter.clone()];
        dcs.extend(opts.fallback.iter().cloned().map(Some));
        if opts.fallback.is_empty() && !opts.no_fallback {
            match consul.datacenters().await {
                Ok(all) => {
                    // The first datacenter is the agent's own (nearest), or the one asked for.
                    let first = opts.datacenter.clone().or_else(|| all.first().cloned());
                    dcs.extend(
                        all.into_iter().filter(|dc| Some(dc) != first.as_ref()).take(NEAREST_FALLBACKS).map(Some),
                    );
                }
                Err(e) => tracing::debug!(error = %e, "no datacenter list: no fallback"),
            }
        }
        let (version, _) = watch::channel(0);
        let shared = Arc::new(Shared {
            service: service.to_owned(),
            queries: Default::default(),
            errors: Default::default(),
            tags: opts.tags.clone(),
            state: Mutex::new(State {
                per_dc: vec![None; dcs.len()],
                dc_names: dcs.iter().map(|d| d.clone().unwrap_or_default()).collect(),
                active: None,
                balancer: Balancer::new(opts.balance, opts.ejection),
                rng: StdRng::from_rng(&mut rand::rng()),
            }),
            version,
        });
        let opts = Arc::new(opts);
        let firsts =
            futures_util::future::join_all(dcs.iter().map(|dc| query(consul, &shared, &opts, dc.as_deref(), None)))
                .await;
        let mut tasks = Vec::new();
        for (i, (dc, first)) in dcs.into_iter().zip(firsts).enumerate() {
            let index = match first {
                Ok((list, index)) => {
                    shared.apply(i, list);
                    next_index(0, index)
                }
                Err(e) if i == 0 => return Err(e),
                Err(e) => {
                    tracing::warn!(dc = dc.as_deref().unwrap_or(""), error = %e, "fallback datacenter not available yet");
                    0
                }
            };
            tasks.push(tokio::spawn(watch_loop(consul.clone(), Arc::downgrade(&shared), opts.clone(), i, dc, index)));
        }
        Ok(Endpoints { shared, tasks })
    }

    /// The service name.
    pub fn service(&self) -> &str {
        &self.shared.service
    }

    /// Choose an instance to call; `None` when no datacenter has a healthy one.
    pub fn pick(&self) -> Option<Lease> {
        self.pick_where(|_| true)
    }

    /// Choose among the instances `filter` accepts (e.g. every instance but this process).
    pub fn pick_where(&self, filter: impl Fn(&Instance) -> bool) -> Option<Lease> {
        let mut st = self.shared.state.lock().unwrap_or_else(|p| p.into_inner());
        let State { balancer, rng, .. } = &mut *st;
        let (instance, inflight) = balancer.pick(Instant::now(), rng, &filter)?;
        Some(Lease { instance, inflight, shared: Arc::downgrade(&self.shared) })
    }

    /// The instances being balanced over (of the datacenter in use).
    pub fn instances(&self) -> Vec<Instance> {
        let st = self.shared.state.lock().unwrap_or_else(|p| p.into_inner());
        st.balancer.instances().cloned().collect()
    }

    /// The datacenter the instances come from: `Some("")` for the agent's own, the name for
    /// others; `None` when none has a healthy instance.
    pub fn datacenter(&self) -> Option<String> {
        let st = self.shared.state.lock().unwrap_or_else(|p| p.into_inner());
        st.active.map(|a| st.dc_names[a].clone())
    }

    /// Counters of the watch: health queries sent (every datacenter, the first ones included)
    /// and how many of them failed. A quiet service costs one query per `wait` per datacenter.
    pub fn stats(&self) -> WatchStats {
        WatchStats {
            queries: self.shared.queries.load(Ordering::Relaxed),
            errors: self.shared.errors.load(Ordering::Relaxed),
        }
    }

    /// A receiver of the version of the instance set, bumped on every change: `changed().await`
    /// on it waits for the next change after the last one it saw.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.shared.version.subscribe()
    }
}

impl Shared {
    fn apply(&self, i: usize, entries: Vec<ServiceEntry>) {
        let dc_name = {
            let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            st.dc_names[i].clone()
        };
        let mut list: Vec<Instance> = entries
            .iter()
            // `passing=1` should leave only passing instances; check anyway, and the tags.
            .filter(|e| e.status() == CheckStatus::Passing)
            .filter(|e| self.tags.iter().all(|t| e.service.tags.contains(t)))
            .map(|e| Instance::from_entry(e, &dc_name))
            .collect();
        list.sort_by(|a, b| a.id.cmp(&b.id));
        let changed = self.state.lock().unwrap_or_else(|p| p.into_inner()).set(i, list);
        if changed {
            self.version.send_modify(|v| *v += 1);
        }
    }
}

async fn query(
    consul: &ConsulClient,
    shared: &Shared,
    opts: &EndpointsOptions,
    dc: Option<&str>,
    index: Option<u64>,
) -> Result<(Vec<ServiceEntry>, u64), ConsulError> {
    let q = HealthQuery {
        passing: true,
        tags: shared.tags.clone(),
        datacenter: dc.map(str::to_owned),
        index,
        wait: Some(opts.wait),
    };
    shared.queries.fetch_add(1, Ordering::Relaxed);
    let r = consul.health_service(&shared.service, &q).await;
    if r.is_err() {
        shared.errors.fetch_add(1, Ordering::Relaxed);
    }
    r
}

/// The index for the next blocking query after an answer with `answered`, per Consul's client
/// rules: never below 1, and back to 0 (one non-blocking query) when it went backwards.
pub(crate) fn next_index(previous: u64, answered: u64) -> u64 {
    let answered = answered.max(1);
    if answered < previous { 0 } else { answered }
}

/// A token bucket: a burst of `capacity` takes, then one per `period`.
struct TokenBucket {
    capacity: f64,
    tokens: f64,
    period: Duration,
    last: tokio::time::Instant,
}

impl TokenBucket {
    fn new(capacity: u32, period: Duration) -> Self {
        TokenBucket { capacity: capacity as f64, tokens: capacity as f64, period, last: tokio::time::Instant::now() }
    }

    async fn take(&mut self) {
        let now = tokio::time::Instant::now();
        if !self.period.is_zero() {
            self.tokens =
                (self.tokens + (now - self.last).as_secs_f64() / self.period.as_secs_f64()).min(self.capacity);
        } else {
            self.tokens = self.capacity;
        }
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return;
        }
        let wait = self.period.mul_f64(1.0 - self.tokens);
        tokio::time::sleep(wait).await;
        self.last = tokio::time::Instant::now();
        self.tokens = 0.0;
    }
}

async fn watch_loop(
    consul: ConsulClient,
    shared: Weak<Shared>,
    opts: Arc<EndpointsOptions>,
    i: usize,
    dc: Option<String>,
    mut index: u64,
) {
    let mut bucket = TokenBucket::new(2, opts.min_interval);
    let mut errors: u32 = 0;
    loop {
        bucket.take().await;
        let Some(sh) = shared.upgrade() else { return };
        let r = query(&consul, &sh, &opts, dc.as_deref(), (index > 0).then_some(index)).await;
        match r {
            Ok((entries, answered)) => {
                errors = 0;
                let next = next_index(index, answered);
                if next == 0 {
                    tracing::debug!(service = sh.service, index, answered, "index went backwards: resetting");
                }
                index = next;
                sh.apply(i, entries);
            }
            Err(e) => {
                errors = errors.saturating_add(1);
                let backoff =
                    opts.error_backoff.saturating_mul(1u32 << (errors - 1).min(16)).min(opts.max_error_backoff);
                let jitter = backoff.mul_f64(rand::rng().random_range(0.0..0.25));
                tracing::warn!(service = sh.service, dc = dc.as_deref().unwrap_or(""), error = %e, ?backoff, "watch query failed");
                drop(sh);
                tokio::time::sleep(backoff + jitter).await;
            }
        }
    }
}

/// Counters of an [`Endpoints`] watch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct WatchStats {
    /// Health queries sent.
    pub queries: u64,
    /// Health queries that failed.
    pub errors: u64,
}

/// A chosen instance, counted in flight until dropped. Report the outcome with
/// [`success`](Self::success) or [`failure`](Self::failure) (dropping it reports nothing).
#[derive(Debug)]
pub struct Lease {
    instance: Instance,
    inflight: Arc<AtomicUsize>,
    shared: Weak<Shared>,
}

impl Lease {
    /// The instance.
    pub fn instance(&self) -> &Instance {
        &self.instance
    }
    /// Its address.
    pub fn address(&self) -> &str {
        &self.instance.address
    }
    /// Its port.
    pub fn port(&self) -> u16 {
        self.instance.port
    }
    /// `address:port`, for URLs.
    pub fn authority(&self) -> String {
        self.instance.authority()
    }
    /// The call succeeded.
    pub fn success(self) {
        self.report(true);
    }
    /// The call failed: counts toward ejecting the instance.
    pub fn failure(self) {
        self.report(false);
    }
    fn report(&self, ok: bool) {
        if let Some(sh) = self.shared.upgrade() {
            let mut st = sh.state.lock().unwrap_or_else(|p| p.into_inner());
            st.balancer.report(self.instance.key(), ok, Instant::now());
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.inflight.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_rules() {
        assert_eq!(next_index(0, 5), 5);
        assert_eq!(next_index(5, 9), 9);
        assert_eq!(next_index(9, 9), 9);
        // backwards (snapshot restore): reset, one non-blocking query
        assert_eq!(next_index(9, 3), 0);
        // never below 1
        assert_eq!(next_index(0, 0), 1);
    }

    fn inst(id: &str, dc: &str) -> Instance {
        Instance {
            id: id.into(),
            service: "web".into(),
            node: "n".into(),
            address: "::1".into(),
            port: 80,
            tags: vec![],
            meta: Default::default(),
            datacenter: dc.into(),
        }
    }

    #[test]
    fn fallback_order() {
        let mut st = State {
            per_dc: vec![None, None, None],
            dc_names: vec!["".into(), "dc2".into(), "dc3".into()],
            active: None,
            balancer: Balancer::new(Balance::RoundRobin, Ejection::default()),
            rng: StdRng::seed_from_u64(1),
        };
        assert!(st.set(2, vec![inst("c", "dc3")]));
        assert_eq!(st.active, Some(2));
        assert!(st.set(1, vec![inst("b", "dc2")]));
        assert_eq!(st.active, Some(1), "dc2 comes before dc3");
        assert!(st.set(0, vec![inst("a", "dc1")]));
        assert_eq!(st.active, Some(0), "local first");
        assert!(!st.set(0, vec![inst("a", "dc1")]), "same list: no change");
        assert!(st.set(0, vec![]));
        assert_eq!(st.active, Some(1));
        assert_eq!(st.balancer.instances().map(|i| i.id.as_str()).collect::<Vec<_>>(), ["b"]);
        assert_eq!(inst("b", "dc2").authority(), "[::1]:80");
    }

    #[tokio::test]
    async fn token_bucket_allows_a_burst_of_two_then_one_per_period() {
        let period = Duration::from_millis(100);
        let mut b = TokenBucket::new(2, period);
        b.take().await;
        b.take().await;
        let t0 = tokio::time::Instant::now();
        b.take().await;
        assert!(t0.elapsed() >= period.mul_f64(0.99));
        b.take().await;
        assert!(t0.elapsed() >= period.mul_f64(1.99));
    }
}
