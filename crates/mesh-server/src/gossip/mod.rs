//! LAN membership by SWIM gossip (foca), like Consul's serf LAN pool.
//!
//! Every node (server or agent) of a datacenter runs one [`Gossip`]: a task that owns a UDP socket and a
//! [`foca`] instance, probes members, disseminates who joined, failed or left, and publishes the member list
//! ([`Gossip::members`], [`Gossip::subscribe`]). Each member's identity carries its name, node id, datacenter,
//! role, gossip address, internal-RPC address and a generation, so agents find servers through gossip.
//!
//! - Packets carry the [`envelope`] (`MSHG`, version, datacenter) in front of foca's bytes; garbage, an
//!   unknown major version or another datacenter's packet is dropped before foca sees it, logged at most once
//!   per peer per 10 s, and counted ([`Gossip::dropped`]).
//! - A graceful [`Gossip::leave`] is told apart from a failure by a custom broadcast, so members see `Left`,
//!   not `Failed`.
//! - A node declared down while alive (a partition, a pause) renews its identity (generation + 1) and rejoins.
//! - `join` addresses are retried with exponential backoff until one answers (Consul's `retry_join`).
//! - No encryption yet.

#![warn(missing_docs)]

mod driver;
pub mod envelope;
mod identity;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use identity::NodeIdentity;

/// The longest node name or node id accepted (identities must stay small: two ride in every packet).
pub const MAX_NAME_LEN: usize = 128;

/// The envelope's pool name of the WAN pool (servers of every datacenter). A datacenter name
/// is a DNS label, so it never names this pool.
pub const WAN_POOL: &str = "~wan";

/// What a node is in the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A server: Raft member, answers internal RPC.
    Server,
    /// An agent (Consul's client): runs tasks, forwards RPC to servers.
    Agent,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Server => "server",
            Role::Agent => "agent",
        })
    }
}

/// Timing of the failure detector and of `retry_join`.
///
/// The default is foca's `Config::new_lan` (memberlist's LAN defaults): probe every 1 s, 500 ms for a direct
/// ack, suspicion for `4 × max(1, log10(n)) × probe period` (about 5 s to declare a member of a 10-node pool
/// down), gossip every 200 ms. The cluster size `n` is re-applied as membership changes. Tests shorten it.
#[derive(Debug, Clone, PartialEq)]
pub struct GossipTiming {
    /// How often a random member is probed.
    pub probe_period: Duration,
    /// How long to wait for a direct ack before asking others to probe indirectly (< `probe_period`).
    pub probe_rtt: Duration,
    /// Suspicion lasts `suspicion_multiplier × max(1, log10(n)) × probe_period` before a member is failed.
    pub suspicion_multiplier: f64,
    /// How often updates are gossiped to a few members besides the probe cycle.
    pub gossip_interval: Duration,
    /// First wait of `retry_join` for an answer before announcing again; doubled each time.
    pub retry_join_initial: Duration,
    /// Longest wait between two `retry_join` announces.
    pub retry_join_max: Duration,
    /// Start from foca's WAN configuration (`Config::new_wan`) rather than its LAN one; the
    /// periods above apply either way.
    pub wan: bool,
}

impl Default for GossipTiming {
    fn default() -> Self {
        Self {
            probe_period: Duration::from_secs(1),
            probe_rtt: Duration::from_millis(500),
            suspicion_multiplier: 4.0,
            gossip_interval: Duration::from_millis(200),
            retry_join_initial: Duration::from_secs(1),
            retry_join_max: Duration::from_secs(30),
            wan: false,
        }
    }
}

impl GossipTiming {
    /// Consul's WAN timing (memberlist's WAN defaults, foca's `Config::new_wan`): probe every
    /// 5 s, 3 s for a direct ack, suspicion `6 × max(1, log10(n))` probe periods, gossip every
    /// 500 ms.
    pub fn wan() -> Self {
        Self {
            probe_period: Duration::from_secs(5),
            probe_rtt: Duration::from_secs(3),
            suspicion_multiplier: 6.0,
            gossip_interval: Duration::from_millis(500),
            wan: true,
            ..Self::default()
        }
    }

    /// A fast failure detector for tests on loopback: probe every 200 ms, ack within 80 ms, suspicion
    /// `2 × probe period` (0.4 s at n ≤ 10), gossip every 50 ms, `retry_join` from 250 ms up to 2 s.
    pub fn fast() -> Self {
        Self {
            probe_period: Duration::from_millis(200),
            probe_rtt: Duration::from_millis(80),
            suspicion_multiplier: 2.0,
            gossip_interval: Duration::from_millis(50),
            retry_join_initial: Duration::from_millis(250),
            retry_join_max: Duration::from_secs(2),
            wan: false,
        }
    }

    /// How long a suspect member of an `n`-node pool has to refute before it is declared failed.
    pub fn suspicion(&self, cluster_size: u32) -> Duration {
        let scale = f64::max(1.0, f64::from(cluster_size.max(1)).log10());
        let secs = scale * self.suspicion_multiplier * self.probe_period.as_secs_f64();
        Duration::try_from_secs_f64(secs).unwrap_or(Duration::from_secs(3600))
    }

    fn validate(&self) -> Result<(), GossipError> {
        let bad = |what: &str| Err(GossipError::InvalidConfig(format!("gossip timing: {what}")));
        if self.probe_rtt.is_zero() || self.probe_period <= self.probe_rtt {
            return bad("probe_rtt must be > 0 and < probe_period");
        }
        if !(self.suspicion_multiplier.is_finite() && self.suspicion_multiplier > 0.0) {
            return bad("suspicion_multiplier must be > 0");
        }
        if self.gossip_interval.is_zero() || self.retry_join_initial.is_zero() {
            return bad("gossip_interval and retry_join_initial must be > 0");
        }
        Ok(())
    }

    /// foca's configuration for an `n`-node pool and packets of at most `max_packet` foca bytes.
    fn foca_config(&self, cluster_size: u32, max_packet: usize) -> foca::Config {
        let n = std::num::NonZeroU32::new(cluster_size.max(1)).unwrap_or(std::num::NonZeroU32::MIN);
        let mut config = if self.wan { foca::Config::new_wan(n) } else { foca::Config::new_lan(n) };
        config.probe_period = self.probe_period;
        config.probe_rtt = self.probe_rtt;
        config.suspect_to_down_after = self.suspicion(cluster_size);
        // memberlist's retransmit limit, 4 × ceil(log10(n + 1)): foca's 4 × log10(n + 1) sends an update
        // only twice in a 4-node pool, too few for a suspected member to hear of it and refute.
        let retransmit = (4.0 * f64::from(cluster_size.saturating_add(1)).log10().ceil()).clamp(4.0, 255.0) as u8;
        config.max_transmissions =
            config.max_transmissions.max(std::num::NonZeroU8::new(retransmit).unwrap_or(config.max_transmissions));
        config.max_packet_size = std::num::NonZeroUsize::new(max_packet).unwrap_or(config.max_packet_size);
        if let Some(gossip) = config.periodic_gossip.as_mut() {
            gossip.frequency = self.gossip_interval;
        }
        config
    }
}

/// How to run one node's gossip.
#[derive(Debug, Clone)]
pub struct GossipConfig {
    /// The node's name (unique in the datacenter), at most [`MAX_NAME_LEN`] bytes.
    pub node: String,
    /// The node's id (a uuid kept in its data dir): a restart with the same id is the same node.
    pub node_id: String,
    /// The datacenter (carried in this node's identity).
    pub datacenter: String,
    /// The pool: only packets of this pool are accepted. `None`: the datacenter's LAN pool;
    /// [`WAN_POOL`] for the servers of every datacenter.
    pub pool: Option<String>,
    /// Server or agent.
    pub role: Role,
    /// The UDP address to bind (port 0: any free port, see [`Gossip::local_addr`]).
    pub bind: SocketAddr,
    /// The gossip address other members use to reach this node; port 0 means the bound port.
    pub advertise: SocketAddr,
    /// This node's advertised internal-RPC address, carried in its identity so agents find servers.
    pub rpc: SocketAddr,
    /// Gossip addresses to join, retried in the background with exponential backoff until one answers.
    pub join: Vec<SocketAddr>,
    /// Failure-detector timing.
    pub timing: GossipTiming,
    /// Seed of foca's random choices (which member to probe, whom to gossip to).
    pub seed: u64,
    /// The identity's generation (`None`: the time now in milliseconds, which grows across
    /// restarts; a simulation gives its own).
    pub generation: Option<u64>,
}

/// A member's state as this node sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MemberStatus {
    /// Answering probes.
    Alive,
    /// Missed a probe; failed unless it refutes within the suspicion timeout.
    Suspect,
    /// Declared down without having left (crash, partition).
    Failed,
    /// Left gracefully.
    Left,
}

/// One member of the pool (this node included).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// Node name.
    pub name: String,
    /// Node id (uuid).
    pub node_id: String,
    /// Datacenter.
    pub datacenter: String,
    /// Server or agent.
    pub role: Role,
    /// Gossip address.
    pub addr: SocketAddr,
    /// Internal-RPC address.
    pub rpc: SocketAddr,
    /// Identity generation: raised on every restart and every rejoin after being declared down.
    pub generation: u64,
    /// Alive, suspect, failed or left.
    pub status: MemberStatus,
}

impl Member {
    fn from_identity(id: &NodeIdentity, status: MemberStatus) -> Self {
        Self {
            name: id.name.clone(),
            node_id: id.node_id.clone(),
            datacenter: id.dc.clone(),
            role: id.role,
            addr: id.gossip,
            rpc: id.rpc,
            generation: id.generation,
            status,
        }
    }
}

/// Packets dropped before or by foca, by reason.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DroppedCounts {
    /// Not a mesh gossip packet (no `MSHG` header, truncated).
    pub garbage: u64,
    /// An unknown major protocol version.
    pub version: u64,
    /// Another datacenter's pool.
    pub datacenter: u64,
    /// Refused by foca: undecodable, malformed, too big, or claiming to come from this node.
    pub invalid: u64,
}

#[derive(Default)]
pub(crate) struct DropCounters {
    garbage: AtomicU64,
    version: AtomicU64,
    datacenter: AtomicU64,
    invalid: AtomicU64,
}

impl DropCounters {
    fn snapshot(&self) -> DroppedCounts {
        DroppedCounts {
            garbage: self.garbage.load(Ordering::Relaxed),
            version: self.version.load(Ordering::Relaxed),
            datacenter: self.datacenter.load(Ordering::Relaxed),
            invalid: self.invalid.load(Ordering::Relaxed),
        }
    }
}

/// Errors of the gossip layer.
#[derive(Debug, thiserror::Error)]
pub enum GossipError {
    /// The configuration cannot work (bad name, datacenter, timing, identity too big).
    #[error("invalid gossip configuration: {0}")]
    InvalidConfig(String),
    /// The UDP socket could not be bound.
    #[error("gossip: cannot bind UDP {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// No join address answered in time.
    #[error("gossip: no answer from {addrs:?} within {timeout:?}")]
    JoinTimeout {
        /// The addresses announced to.
        addrs: Vec<SocketAddr>,
        /// How long we waited.
        timeout: Duration,
    },
    /// The gossip task has stopped ([`Gossip::shutdown`]).
    #[error("gossip: stopped")]
    Stopped,
}

pub(crate) enum Input {
    /// Announce to these addresses; answer with the first that is heard from.
    Join { addrs: Vec<SocketAddr>, answered: oneshot::Sender<SocketAddr> },
    /// Leave gracefully, then answer.
    Leave(oneshot::Sender<()>),
    /// Stop the task.
    Shutdown,
}

/// A running node's gossip: a cheap handle (clone it) on the task that owns the socket and foca.
#[derive(Clone)]
pub struct Gossip {
    inner: Arc<Inner>,
}

struct Inner {
    tx: mpsc::Sender<Input>,
    members: watch::Receiver<Arc<Vec<Member>>>,
    dropped: Arc<DropCounters>,
    local_addr: SocketAddr,
    advertise: SocketAddr,
    task: std::sync::Mutex<Option<JoinHandle<()>>>,
    retry_join: std::sync::Mutex<Option<JoinHandle<()>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(task) = self.retry_join.get_mut().ok().and_then(|t| t.take()) {
            task.abort();
        }
    }
}

/// What gossip sends and receives its datagrams through: tokio's UDP socket, or a simulated
/// network's ([`Gossip::start_on`]).
#[async_trait::async_trait]
pub trait Datagrams: Send + Sync + 'static {
    /// Receive one datagram into `buf`: its length and sender.
    async fn recv_from(&self, buf: &mut [u8]) -> std::io::Result<(usize, SocketAddr)>;
    /// Send `buf` as one datagram to `to`.
    async fn send_to(&self, buf: &[u8], to: SocketAddr) -> std::io::Result<usize>;
    /// The address the socket is bound to.
    fn local_addr(&self) -> std::io::Result<SocketAddr>;
}

#[async_trait::async_trait]
impl Datagrams for tokio::net::UdpSocket {
    async fn recv_from(&self, buf: &mut [u8]) -> std::io::Result<(usize, SocketAddr)> {
        tokio::net::UdpSocket::recv_from(self, buf).await
    }
    async fn send_to(&self, buf: &[u8], to: SocketAddr) -> std::io::Result<usize> {
        tokio::net::UdpSocket::send_to(self, buf, to).await
    }
    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        tokio::net::UdpSocket::local_addr(self)
    }
}

impl Gossip {
    /// Binds the socket, starts the gossip task and, when `config.join` is not empty, `retry_join` in the
    /// background. Must be called inside a tokio runtime.
    pub async fn start(config: GossipConfig) -> Result<Gossip, GossipError> {
        Self::check(&config)?;
        let socket = tokio::net::UdpSocket::bind(config.bind)
            .await
            .map_err(|source| GossipError::Bind { addr: config.bind, source })?;
        Self::start_on(config, Box::new(socket)).await
    }

    /// [`Gossip::start`] over `socket`, already bound (a simulation's datagrams).
    pub async fn start_on(config: GossipConfig, socket: Box<dyn Datagrams>) -> Result<Gossip, GossipError> {
        Self::check(&config)?;
        let local_addr = socket.local_addr().map_err(|source| GossipError::Bind { addr: config.bind, source })?;
        let mut advertise = config.advertise;
        if advertise.port() == 0 {
            advertise.set_port(local_addr.port());
        }
        if advertise.ip().is_unspecified() {
            return Err(GossipError::InvalidConfig(format!("advertise address {advertise} is unspecified")));
        }
        let identity = NodeIdentity {
            name: config.node.clone(),
            node_id: config.node_id.clone(),
            dc: config.datacenter.clone(),
            role: config.role,
            gossip: advertise,
            rpc: config.rpc,
            generation: config.generation.unwrap_or_else(initial_generation),
        };
        let dropped = Arc::new(DropCounters::default());
        let (tx, rx) = mpsc::channel(64);
        let (members_tx, members) = watch::channel(Arc::new(Vec::new()));
        let driver = driver::Driver::new(identity, &config, socket, rx, members_tx, dropped.clone())?;
        let task = tokio::spawn(driver.run());
        let inner = Inner {
            tx,
            members,
            dropped,
            local_addr,
            advertise,
            task: std::sync::Mutex::new(Some(task)),
            retry_join: std::sync::Mutex::new(None),
        };
        let gossip = Gossip { inner: Arc::new(inner) };
        let join: Vec<SocketAddr> = config.join.iter().copied().filter(|a| *a != advertise).collect();
        if !join.is_empty() {
            let task = tokio::spawn(retry_join(gossip.inner.tx.downgrade(), join, config.timing.clone()));
            *gossip.inner.retry_join.lock().unwrap_or_else(|e| e.into_inner()) = Some(task);
        }
        Ok(gossip)
    }

    /// Refuse a configuration gossip cannot run with.
    fn check(config: &GossipConfig) -> Result<(), GossipError> {
        config.timing.validate()?;
        for (what, value) in [("node name", &config.node), ("node id", &config.node_id)] {
            if value.is_empty() || value.len() > MAX_NAME_LEN {
                return Err(GossipError::InvalidConfig(format!("{what} must be 1..={MAX_NAME_LEN} bytes")));
            }
        }
        if config.datacenter.is_empty() || config.datacenter.len() > 64 {
            return Err(GossipError::InvalidConfig("datacenter must be 1..=64 bytes".into()));
        }
        Ok(())
    }

    /// The bound UDP address (the real port when `bind` had port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.inner.local_addr
    }

    /// The gossip address other members know this node by.
    pub fn advertise_addr(&self) -> SocketAddr {
        self.inner.advertise
    }

    /// The members as this node sees them, itself included, sorted by name (one entry per node id: its
    /// latest generation).
    pub fn members(&self) -> Vec<Member> {
        self.inner.members.borrow().as_ref().clone()
    }

    /// A receiver of the member list, updated on every change (join, suspect, fail, leave, rejoin).
    pub fn subscribe(&self) -> watch::Receiver<Arc<Vec<Member>>> {
        self.inner.members.clone()
    }

    /// Packets dropped so far, by reason.
    pub fn dropped(&self) -> DroppedCounts {
        self.inner.dropped.snapshot()
    }

    /// Announces to `addrs` and waits up to `timeout` for one of them to answer; returns the one that did.
    /// Membership then arrives through [`Gossip::subscribe`].
    pub async fn join(&self, addrs: &[SocketAddr], timeout: Duration) -> Result<SocketAddr, GossipError> {
        let (answered, rx) = oneshot::channel();
        let addrs: Vec<SocketAddr> = addrs.to_vec();
        self.inner.tx.send(Input::Join { addrs: addrs.clone(), answered }).await.map_err(|_| GossipError::Stopped)?;
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(addr)) => Ok(addr),
            Ok(Err(_)) => Err(GossipError::Stopped),
            Err(_) => Err(GossipError::JoinTimeout { addrs, timeout }),
        }
    }

    /// Leaves the pool gracefully: the others mark this node `Left` (not `Failed`). The task keeps running
    /// (it no longer takes part) until [`Gossip::shutdown`]; to come back, start a new [`Gossip`] (a new
    /// generation).
    pub async fn leave(&self) -> Result<(), GossipError> {
        if let Some(task) = self.inner.retry_join.lock().unwrap_or_else(|e| e.into_inner()).take() {
            task.abort();
        }
        let (done, rx) = oneshot::channel();
        self.inner.tx.send(Input::Leave(done)).await.map_err(|_| GossipError::Stopped)?;
        rx.await.map_err(|_| GossipError::Stopped)
    }

    /// Stops the task and closes the socket, without telling anyone (to the others it is a crash unless
    /// [`Gossip::leave`] came first). Returns once the socket is closed.
    pub async fn shutdown(&self) {
        if let Some(task) = self.inner.retry_join.lock().unwrap_or_else(|e| e.into_inner()).take() {
            task.abort();
        }
        let _ = self.inner.tx.send(Input::Shutdown).await;
        let task = self.inner.task.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(task) = task {
            let _ = task.await;
        }
    }
}

/// A generation that grows across restarts without being stored: milliseconds since the epoch (a rejoin
/// adds 1, so it stays ahead of the previous run unless that run rejoined more often than once per ms).
fn initial_generation() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Consul's `retry_join`: announce to `addrs`, wait for an answer, back off exponentially, until one answers
/// or the gossip task stops.
async fn retry_join(tx: mpsc::WeakSender<Input>, addrs: Vec<SocketAddr>, timing: GossipTiming) {
    let mut wait = timing.retry_join_initial;
    let mut attempt: u32 = 1;
    loop {
        let Some(tx) = tx.upgrade() else { return };
        let (answered, rx) = oneshot::channel();
        if tx.send(Input::Join { addrs: addrs.clone(), answered }).await.is_err() {
            return;
        }
        drop(tx);
        match tokio::time::timeout(wait, rx).await {
            Ok(Ok(addr)) => {
                tracing::info!("gossip: joined the pool through {addr} (attempt {attempt})");
                return;
            }
            Ok(Err(_)) => return,
            Err(_) => {
                tracing::warn!(
                    "gossip: join attempt {attempt}: no answer from {addrs:?} within {wait:?}, retrying with backoff"
                );
            }
        }
        attempt += 1;
        wait = (wait * 2).min(timing.retry_join_max.max(timing.retry_join_initial));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_timing_is_foca_lan() {
        let timing = GossipTiming::default();
        assert_eq!(timing.suspicion(1), Duration::from_secs(4));
        assert_eq!(timing.suspicion(10), Duration::from_secs(4));
        assert_eq!(timing.suspicion(100), Duration::from_secs(8));
        let lan = foca::Config::new_lan(std::num::NonZeroU32::new(100).unwrap());
        let ours = timing.foca_config(100, 1400);
        assert_eq!(ours.probe_period, lan.probe_period);
        assert_eq!(ours.probe_rtt, lan.probe_rtt);
        assert_eq!(ours.suspect_to_down_after, lan.suspect_to_down_after);
        assert_eq!(ours.max_transmissions.get(), 12, "4 x ceil(log10(101))");
        assert_eq!(timing.foca_config(4, 1400).max_transmissions.get(), 4);
    }

    #[test]
    fn config_can_be_reapplied_as_the_pool_grows() {
        use rand_foca::SeedableRng;
        let timing = GossipTiming::fast();
        let id = NodeIdentity::placeholder("127.0.0.2:1".parse().unwrap());
        let mut foca = foca::Foca::new(
            id,
            timing.foca_config(1, 1390),
            rand_foca::rngs::SmallRng::seed_from_u64(1),
            foca::PostcardCodec,
        );
        for n in [2, 5, 50, 5000, 3] {
            foca.set_config(timing.foca_config(n, 1390)).unwrap();
        }
    }

    #[test]
    fn bad_timing_is_refused() {
        let mut timing = GossipTiming::fast();
        timing.suspicion_multiplier = f64::NAN;
        assert!(timing.validate().is_err());
        let mut timing = GossipTiming::fast();
        timing.probe_rtt = Duration::ZERO;
        assert!(timing.validate().is_err());
        assert!(GossipTiming::default().validate().is_ok());
    }
}
