//! An in-process cluster for tests: N `mesh server`s and M `mesh agent`s started inside the
//! test process, on loopback with real sockets, that a test can kill, restart and partition,
//! so a framework (or any client) is tested against failover in `cargo test`.
//!
//! ```no_run
//! # async fn example() {
//! use mesh_server::testing::Cluster;
//! let mut cluster = Cluster::builder().servers(3).agents(2).start().await.expect("cluster");
//! // A Mesos framework, a Marathon or Consul client is pointed at `cluster.master_url()`
//! // (an agent: it relays the scheduler API to whichever server leads).
//! let leader = cluster.leader().await.expect("a leader");
//! cluster.kill(leader).await; // like SIGKILL: no goodbye, sockets closed at once
//! let next = cluster.leader().await.expect("a new leader");
//! assert_ne!(next, leader);
//! cluster.restart(leader).await.expect("back on its data dir");
//! # }
//! ```
//!
//! # How it works
//!
//! Each node runs on its own OS thread with its own multi-thread tokio runtime, exactly what
//! the `mesh` binary runs ([`crate::node::run_server`], [`crate::node::run_agent`]):
//!
//! - **kill** drops the node's future and shuts its runtime down: every task and socket of the
//!   node ends at once and nothing is said to the others (no gossip leave, no goodbye), as
//!   with SIGKILL. The agent's task processes keep running, as they do when a `mesh agent`
//!   process is killed, and are adopted when it restarts.
//! - **restart** starts the node again with the same [`NodeConfig`] on the same data dir and
//!   addresses.
//! - **drop** stops the agents gracefully (their tasks are killed; those of agents killed
//!   and not restarted too), then kills the servers, and removes the cluster's directory.
//!
//! Node `i` listens on its own loopback address `127.a.b.(i+1)` (all of `127.0.0.0/8` is
//! loopback on Linux), so every node uses the `mesh` binary's usual ports (RPC 8300, LAN gossip
//! 8301, WAN gossip 8302, HTTP 8500; DNS on a free port) and keeps them across restarts.
//! `a.b` is chosen per cluster among addresses no other process holds. Indices: servers are
//! `0..servers`, agents follow ([`Cluster::agent`]).
//!
//! Timing is shortened for tests: gossip probes every 200 ms, Raft at a 0.3 multiplier
//! (elections in 300-600 ms), Mesos heartbeats every second and unacknowledged status updates
//! re-sent after a second. [`ClusterBuilder::configure`] changes any [`NodeConfig`] field.
//!
//! # What is shared between the nodes of one process
//!
//! A few things are process-global, so several nodes in one process share them:
//!
//! - the `tracing` subscriber: the test's (if it installs one) gets every node's events, and
//!   they do not say which node logged them;
//! - [`crate::cluster::forward::DC_METRICS`] (counters of requests to other datacenters, in
//!   `/v1/agent/metrics`): one set for all nodes;
//! - [`crate::logs`]' broadcast of log lines (`/v1/agent/monitor`): every node's monitor sees
//!   the lines of all nodes, if the subscriber writes through [`crate::logs::Tee`];
//! - the test-only environment hooks read once per process (`MESH_TEST_RPC_DELAY`,
//!   `MESH_TEST_CRASH_AFTER_FORWARDED_WRITE`) apply to every node;
//! - the partition table ([`crate::partition`]), keyed by address: clusters of one process
//!   have different addresses, so their cuts do not meet;
//! - the open-files limit, which [`ClusterBuilder::start`] raises to its hard limit as
//!   `mesh` does.
//!
//! A kill can race a task of the node in the middle of a poll: tokio then panics in that task
//! with "A Tokio 1.x context was found, but it is being shutdown" (printed from the node's
//! runtime thread, `mesh-<node>-rt`). It is harmless: the task belongs to the node being
//! killed, and the panic stays in that runtime.
//!
//! The nodes install no signal handlers (a node is stopped through a channel, not SIGTERM).
//! Tasks' stdout and stderr go straight into their sandboxes: the log rotation of the `mesh`
//! binary runs `mesh logger` processes, and the test binary is not `mesh`. Agents run the
//! process runtime only (no Docker, no Registrator, no DNS for containers).
//!
//! [`Cluster::partition`] cuts nodes off from the others (gossip and RPC, through the
//! process-wide table of [`crate::partition`]; HTTP between nodes is not cut) until
//! [`Cluster::heal`].

use crate::node::{Bound, ContainerDns, NodeConfig, RuntimeKind};
use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// RPC port of every node (Consul's server RPC port).
pub const RPC_PORT: u16 = 8300;
/// LAN gossip port of every node.
pub const SERF_LAN_PORT: u16 = 8301;
/// WAN gossip port of every server.
pub const SERF_WAN_PORT: u16 = 8302;
/// HTTP port of every node (Consul's; every listener serves every API).
pub const HTTP_PORT: u16 = 8500;

/// How long [`ClusterBuilder::start`], [`Cluster::restart`] and [`Cluster::leader`] wait.
const WAIT: Duration = Duration::from_secs(60);

/// Why the cluster or a node could not start, or what a wait did not see in time.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// A node failed to start.
    #[error("node {node}: {why}")]
    Node {
        /// The node's name.
        node: String,
        /// Why.
        why: String,
    },
    /// Something awaited did not happen in time.
    #[error("timed out after {0:?} waiting for {1}")]
    Timeout(Duration, String),
    /// The cluster's directory or addresses.
    #[error("{0}")]
    Setup(String),
}

/// Change a node's configuration before it first starts (its name says which node).
pub type Configure = Arc<dyn Fn(&mut NodeConfig) + Send + Sync>;

/// Settings of a [`Cluster`]; [`ClusterBuilder::start`] starts it.
#[derive(Clone)]
pub struct ClusterBuilder {
    servers: usize,
    agents: usize,
    datacenter: String,
    dir: Option<PathBuf>,
    agent_cpus: f64,
    agent_mem: f64,
    configure: Option<Configure>,
}

impl Default for ClusterBuilder {
    fn default() -> Self {
        Self {
            servers: 3,
            agents: 1,
            datacenter: "dc1".into(),
            dir: None,
            agent_cpus: 2.0,
            agent_mem: 2048.0,
            configure: None,
        }
    }
}

impl ClusterBuilder {
    /// How many servers (3 by default). They form one Raft group (`--bootstrap-expect`).
    pub fn servers(mut self, n: usize) -> Self {
        self.servers = n.max(1);
        self
    }

    /// How many agents (1 by default).
    pub fn agents(mut self, n: usize) -> Self {
        self.agents = n;
        self
    }

    /// The datacenter (`dc1` by default).
    pub fn datacenter(mut self, dc: &str) -> Self {
        self.datacenter = dc.to_owned();
        self
    }

    /// Keep the nodes' data dirs under `dir` (kept after the cluster is dropped) instead of a
    /// fresh directory under the system's temporary directory (removed on drop).
    pub fn dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.dir = Some(dir.into());
        self
    }

    /// CPUs and memory (MiB) each agent offers (2 and 2048 by default).
    pub fn agent_resources(mut self, cpus: f64, mem: f64) -> Self {
        self.agent_cpus = cpus;
        self.agent_mem = mem;
        self
    }

    /// Change each node's [`NodeConfig`] before its first start (`cfg.node` names it:
    /// `server<i>` or `agent<j>`).
    pub fn configure(mut self, f: impl Fn(&mut NodeConfig) + Send + Sync + 'static) -> Self {
        self.configure = Some(Arc::new(f));
        self
    }

    /// Start the servers, then the agents; return once every server names the same leader and
    /// the leader knows every agent.
    pub async fn start(self) -> Result<Cluster, ClusterError> {
        let _ = crate::serve::raise_fd_limit();
        let (dir, remove_dir) = match &self.dir {
            Some(d) => (d.clone(), false),
            None => {
                let d = std::env::temp_dir().join(format!(
                    "mesh-testing-{}-{}",
                    std::process::id(),
                    CLUSTERS.fetch_add(1, Ordering::Relaxed)
                ));
                (d, true)
            }
        };
        std::fs::create_dir_all(&dir).map_err(|e| ClusterError::Setup(format!("{}: {e}", dir.display())))?;
        let total = self.servers + self.agents;
        let net = free_net(total)?;
        let ports = port_block(self.agents);
        let mut nodes = Vec::with_capacity(total);
        for i in 0..total {
            let server = i < self.servers;
            let name = if server { format!("server{i}") } else { format!("agent{}", i - self.servers) };
            let ip = IpAddr::V4(Ipv4Addr::new(127, net.0, net.1, (i + 1) as u8));
            let agent_ports = (!server).then(|| {
                let j = (i - self.servers) as u16;
                (ports.0 + j * PORTS_PER_AGENT, ports.0 + j * PORTS_PER_AGENT + PORTS_PER_AGENT - 1)
            });
            let mut cfg = node_config(&self, &name, ip, &dir, server, net, agent_ports);
            if let Some(f) = &self.configure {
                f(&mut cfg);
            }
            nodes.push(Node { server, cfg, running: None, bound: None });
        }
        let mut cluster = Cluster { nodes, dir, remove_dir, servers: self.servers };
        for i in 0..total {
            cluster.start_node(i).await?;
        }
        let leader = cluster.leader().await?;
        let agents: Vec<String> = cluster.nodes.iter().filter(|n| !n.server).map(|n| n.cfg.node.clone()).collect();
        let leader_addr = cluster.http_addr(leader);
        poll(WAIT, "the leader to know every agent", || async {
            let (status, body) = http_get(leader_addr, "/master/slaves").await.ok()?;
            let v: serde_json::Value = serde_json::from_str(&body).ok()?;
            let known: BTreeSet<&str> = v["slaves"].as_array()?.iter().filter_map(|s| s["hostname"].as_str()).collect();
            (status == 200 && agents.iter().all(|a| known.contains(a.as_str()))).then_some(())
        })
        .await?;
        Ok(cluster)
    }
}

/// Host ports each agent hands to its tasks.
const PORTS_PER_AGENT: u16 = 20;

static CLUSTERS: AtomicU32 = AtomicU32::new(0);
static PORT_BLOCKS: AtomicU32 = AtomicU32::new(0);

/// The first of `agents * PORTS_PER_AGENT` host ports for tasks, apart from other clusters of
/// this process and (by process id) of other test processes, below Linux's ephemeral ports
/// (32768 and up) so that no outgoing connection holds one.
fn port_block(agents: usize) -> (u16, u16) {
    let n = (agents.max(1) as u32) * PORTS_PER_AGENT as u32;
    let offset = PORT_BLOCKS.fetch_add(n, Ordering::Relaxed) % 1000;
    let base = 10000 + (std::process::id() % 10) * 1000;
    let lo = (base + offset) as u16;
    (lo, lo + n as u16 - 1)
}

/// `(a, b)` of a loopback network `127.a.b.0/24` whose first `nodes` addresses have the
/// cluster's ports free (other clusters of this process, other test processes).
fn free_net(nodes: usize) -> Result<(u8, u8), ClusterError> {
    let a = 220 + (std::process::id() % 30) as u8;
    let start = CLUSTERS.fetch_add(1, Ordering::Relaxed);
    for k in 0..256u32 {
        let b = ((start + k) % 256) as u8;
        let free = (1..=nodes).all(|h| {
            let ip = IpAddr::V4(Ipv4Addr::new(127, a, b, h as u8));
            [RPC_PORT, HTTP_PORT].iter().all(|p| std::net::TcpListener::bind(SocketAddr::new(ip, *p)).is_ok())
                && [SERF_LAN_PORT, SERF_WAN_PORT]
                    .iter()
                    .all(|p| std::net::UdpSocket::bind(SocketAddr::new(ip, *p)).is_ok())
        });
        if free {
            return Ok((a, b));
        }
    }
    Err(ClusterError::Setup(format!("no free loopback network 127.{a}.*.0/24")))
}

fn node_config(
    b: &ClusterBuilder,
    name: &str,
    ip: IpAddr,
    dir: &Path,
    server: bool,
    net: (u8, u8),
    ports: Option<(u16, u16)>,
) -> NodeConfig {
    let first = IpAddr::V4(Ipv4Addr::new(127, net.0, net.1, 1));
    let servers: Vec<SocketAddr> = (0..b.servers)
        .map(|i| SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, net.0, net.1, (i + 1) as u8)), RPC_PORT))
        .collect();
    // Servers join the first two (any member would do); agents join the first server.
    let join: Vec<SocketAddr> = (0..b.servers.min(2))
        .map(|i| SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, net.0, net.1, (i + 1) as u8)), SERF_LAN_PORT))
        .filter(|a| server || a.ip() == first)
        .collect();
    let fast = crate::gossip::GossipTiming::fast();
    NodeConfig {
        http: vec![SocketAddr::new(ip, HTTP_PORT)],
        dns: SocketAddr::new(ip, 0),
        data_dir: dir.join(name),
        domain: "mesh".into(),
        node: name.to_owned(),
        datacenter: b.datacenter.clone(),
        runtime: RuntimeKind::Process,
        ports: ports.unwrap_or((31000, 31099)),
        advertise: ip,
        cpus: if server { 0.0 } else { b.agent_cpus },
        mem: if server { 0.0 } else { b.agent_mem },
        disk: 10240.0,
        attributes: Default::default(),
        keep_tasks_on_exit: false,
        host_access: Default::default(),
        registrator: false,
        max_app_versions: mesh_core::state::MAX_APP_VERSIONS,
        state_reserve_mb: 1,
        enable_script_checks: false,
        dns_options: Default::default(),
        http_limits: Default::default(),
        mesos: crate::control::MesosConfig {
            heartbeat: Duration::from_secs(1),
            update_resend: Duration::from_secs(1),
            ..Default::default()
        },
        task_logs: mesh_core::runtime::logger::TaskLogs::Sandbox,
        gc: Default::default(),
        container_disk_watch_interval: Duration::from_secs(15),
        rpc: SocketAddr::new(ip, RPC_PORT),
        servers: if server { Vec::new() } else { servers },
        docker_network: None,
        container_dns: ContainerDns::Off,
        serf_lan: SocketAddr::new(ip, SERF_LAN_PORT),
        join,
        gossip_timing: fast.clone(),
        serf_wan: SocketAddr::new(ip, SERF_WAN_PORT),
        join_wan: Vec::new(),
        advertise_wan: None,
        gossip_wan_timing: crate::gossip::GossipTiming { wan: true, ..fast },
        agent_down_after: Duration::from_secs(5),
        reregister_timeout: Duration::from_secs(600),
        bootstrap_expect: b.servers,
        raft_timing: crate::raft::RaftTiming::new(0.3),
        dead_server_cleanup: None,
        clock: mesh_core::model::system_clock(),
    }
}

/// How a running node is stopped.
enum Stop {
    /// Drop everything at once (SIGKILL).
    Kill,
    /// Its shutdown path (SIGTERM): an agent stops its tasks.
    Graceful,
}

/// A node's thread.
struct Running {
    stop: tokio::sync::oneshot::Sender<Stop>,
    thread: std::thread::JoinHandle<()>,
}

struct Node {
    server: bool,
    cfg: NodeConfig,
    running: Option<Running>,
    bound: Option<Bound>,
}

/// Servers and agents running in this process; see the [module docs](self).
pub struct Cluster {
    nodes: Vec<Node>,
    dir: PathBuf,
    remove_dir: bool,
    servers: usize,
}

impl Cluster {
    /// A builder: 3 servers and 1 agent unless told otherwise.
    pub fn builder() -> ClusterBuilder {
        ClusterBuilder::default()
    }

    /// How many nodes (servers and agents).
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether it has no node (never: a cluster has at least one server).
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The indices of the servers.
    pub fn servers(&self) -> std::ops::Range<usize> {
        0..self.servers
    }

    /// The index of agent `j` (agents come after the servers).
    pub fn agent(&self, j: usize) -> usize {
        self.servers + j
    }

    /// Whether node `i` is a server.
    pub fn is_server(&self, i: usize) -> bool {
        self.nodes[i].server
    }

    /// Whether node `i` runs (was not killed).
    pub fn is_running(&self, i: usize) -> bool {
        self.nodes[i].running.is_some()
    }

    /// Node `i`'s name (`server<i>`, `agent<j>`).
    pub fn name(&self, i: usize) -> &str {
        &self.nodes[i].cfg.node
    }

    /// Node `i`'s configuration.
    pub fn config(&self, i: usize) -> &NodeConfig {
        &self.nodes[i].cfg
    }

    /// Where the nodes' data dirs are.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Node `i`'s HTTP address (the same across restarts).
    pub fn http_addr(&self, i: usize) -> SocketAddr {
        self.nodes[i].cfg.http[0]
    }

    /// Node `i`'s HTTP base URL, `http://ip:port` (every API: Marathon, Consul, Mesos).
    pub fn http_url(&self, i: usize) -> String {
        format!("http://{}", self.http_addr(i))
    }

    /// Node `i`'s DNS address (UDP and TCP) since it last started.
    pub fn dns_addr(&self, i: usize) -> Option<SocketAddr> {
        self.nodes[i].bound.as_ref().map(|b| b.dns)
    }

    /// The address to give a Mesos framework (or any client) that should survive server kills:
    /// the first agent's HTTP URL (it relays the scheduler API to whichever server leads, and
    /// forwards writes), or the first server's without agents.
    pub fn master_url(&self) -> String {
        let i = if self.nodes.len() > self.servers { self.servers } else { 0 };
        self.http_url(i)
    }

    /// Wait (up to 60 s) until every running server names the same leader, a running one;
    /// its index.
    pub async fn leader(&self) -> Result<usize, ClusterError> {
        let live: Vec<usize> = self.servers().filter(|i| self.is_running(*i)).collect();
        self.leader_among(&live).await
    }

    /// Wait (up to 60 s) until the servers `among` (running ones) all name the same leader,
    /// one of them; its index. During a [`Cluster::partition`], the leader of one side.
    pub async fn leader_among(&self, among: &[usize]) -> Result<usize, ClusterError> {
        let live: Vec<(usize, SocketAddr)> = among
            .iter()
            .copied()
            .filter(|i| self.is_server(*i) && self.is_running(*i))
            .map(|i| (i, self.http_addr(i)))
            .collect();
        let rpc: Vec<(usize, SocketAddr)> = self.servers().map(|i| (i, self.nodes[i].cfg.rpc)).collect();
        poll(WAIT, "the servers to name the same leader", || async {
            let mut named = BTreeSet::new();
            for (_, http) in &live {
                let (status, body) = http_get(*http, "/v1/status/leader").await.ok()?;
                let leader: String = serde_json::from_str(&body).ok()?;
                if status != 200 || leader.is_empty() {
                    return None;
                }
                named.insert(leader);
            }
            let [one]: [String; 1] = named.into_iter().collect::<Vec<_>>().try_into().ok()?;
            let addr: SocketAddr = one.parse().ok()?;
            let i = rpc.iter().find(|(_, a)| *a == addr)?.0;
            live.iter().any(|(l, _)| *l == i).then_some(i)
        })
        .await
    }

    /// Cut the network between the nodes of `side` and all others of this cluster (both
    /// ways): gossip packets between them are dropped, RPC connections between them refused
    /// and the open ones fail (Raft, agents' links to servers). HTTP between nodes is not cut
    /// (see [`crate::partition`]). Cuts add up; [`Cluster::heal`] removes them all.
    pub fn partition(&self, side: &[usize]) {
        for a in side {
            for b in (0..self.nodes.len()).filter(|b| !side.contains(b)) {
                crate::partition::cut(self.nodes[*a].cfg.advertise, self.nodes[b].cfg.advertise);
            }
        }
    }

    /// Remove every cut between this cluster's nodes.
    pub fn heal(&self) {
        let ips: Vec<IpAddr> = self.nodes.iter().map(|n| n.cfg.advertise).collect();
        crate::partition::heal(&ips);
    }

    /// Kill node `i` as SIGKILL would: its runtime is shut down, so every task and socket of
    /// the node ends at once without telling anyone. Returns once the node is gone (its
    /// sockets closed and its data dir no longer written). A node not running is left alone.
    pub async fn kill(&mut self, i: usize) {
        self.stop_node(i, Stop::Kill).await;
    }

    /// Stop node `i` as SIGTERM would: an agent stops its tasks and says goodbye, a server
    /// leaves gossip. Bounded (about 20 s), then killed.
    pub async fn stop(&mut self, i: usize) {
        self.stop_node(i, Stop::Graceful).await;
    }

    /// Start node `i` again (after [`Cluster::kill`] or [`Cluster::stop`]) on its data dir,
    /// with its configuration and addresses; returns once its APIs answer. A running node is
    /// killed first.
    pub async fn restart(&mut self, i: usize) -> Result<(), ClusterError> {
        self.kill(i).await;
        self.start_node(i).await
    }

    async fn stop_node(&mut self, i: usize, how: Stop) {
        let Some(r) = self.nodes[i].running.take() else { return };
        let _ = r.stop.send(how);
        let _ = tokio::task::spawn_blocking(move || r.thread.join()).await;
    }

    /// Start node `i` on its own thread and runtime; wait until it is ready.
    async fn start_node(&mut self, i: usize) -> Result<(), ClusterError> {
        let node = &mut self.nodes[i];
        let cfg = node.cfg.clone();
        let name = cfg.node.clone();
        let server = node.server;
        let (ready_tx, mut ready_rx) = tokio::sync::mpsc::unbounded_channel::<Result<Bound, String>>();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<Stop>();
        let thread = std::thread::Builder::new()
            .name(format!("mesh-{name}"))
            .spawn(move || run_node(server, cfg, ready_tx, stop_rx))
            .map_err(|e| ClusterError::Node { node: name.clone(), why: format!("cannot start its thread: {e}") })?;
        node.running = Some(Running { stop: stop_tx, thread });
        let got = tokio::time::timeout(WAIT, ready_rx.recv()).await;
        let err = |why: String| ClusterError::Node { node: name.clone(), why };
        let result = match got {
            Ok(Some(Ok(bound))) => {
                self.nodes[i].bound = Some(bound);
                return Ok(());
            }
            Ok(Some(Err(why))) => err(why),
            Ok(None) => err("its thread ended before it was ready".into()),
            Err(_) => ClusterError::Timeout(WAIT, format!("{name} to be ready")),
        };
        self.kill(i).await;
        Err(result)
    }
}

/// The body of a node's thread: its runtime runs the node until it is stopped, then is shut
/// down (every task dropped, blocking work given 5 s).
fn run_node(
    server: bool,
    cfg: NodeConfig,
    ready_tx: tokio::sync::mpsc::UnboundedSender<Result<Bound, String>>,
    stop_rx: tokio::sync::oneshot::Receiver<Stop>,
) {
    let name = cfg.node.clone();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(format!("mesh-{name}-rt"))
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let _ = ready_tx.send(Err(format!("cannot start its runtime: {e}")));
            return;
        }
    };
    rt.block_on(async move {
        let (term_tx, term_rx) = tokio::sync::oneshot::channel::<()>();
        let shutdown = async move {
            let _ = term_rx.await;
        };
        let ready = {
            let tx = ready_tx.clone();
            move |b: &Bound| {
                let _ = tx.send(Ok(b.clone()));
            }
        };
        let node: std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), crate::node::NodeError>> + Send>> =
            if server {
                Box::pin(crate::node::run_server(cfg, ready, shutdown))
            } else {
                Box::pin(crate::node::run_agent(cfg, ready, shutdown))
            };
        let mut node = node;
        tokio::select! {
            res = &mut node => {
                let why = match res {
                    Ok(()) => "it stopped by itself".to_owned(),
                    Err(e) => e.to_string(),
                };
                tracing::warn!(node = %name, %why, "in-process node ended");
                let _ = ready_tx.send(Err(why));
            }
            how = stop_rx => {
                if let Ok(Stop::Graceful) = how {
                    let _ = term_tx.send(());
                    let _ = tokio::time::timeout(Duration::from_secs(20), &mut node).await;
                }
            }
        }
    });
    rt.shutdown_timeout(Duration::from_secs(5));
}

impl Drop for Cluster {
    /// Agents are stopped gracefully (their tasks killed) while the servers still run, then
    /// the servers are killed; the directory is removed unless it was given
    /// ([`ClusterBuilder::dir`]).
    fn drop(&mut self) {
        let stop_all = |nodes: &mut Vec<Node>, server: bool, how: fn() -> Stop| {
            let threads: Vec<_> = nodes
                .iter_mut()
                .filter(|n| n.server == server)
                .filter_map(|n| n.running.take())
                .map(|r| {
                    let _ = r.stop.send(how());
                    r.thread
                })
                .collect();
            for t in threads {
                let _ = t.join();
            }
        };
        self.heal();
        // Agents killed and not restarted left their tasks running, as a killed `mesh agent`
        // does: nothing would end them now.
        let killed: Vec<PathBuf> =
            self.nodes.iter().filter(|n| !n.server && n.running.is_none()).map(|n| n.cfg.data_dir.clone()).collect();
        stop_all(&mut self.nodes, false, || Stop::Graceful);
        for dir in killed {
            kill_left_tasks(&dir);
        }
        stop_all(&mut self.nodes, true, || Stop::Kill);
        if self.remove_dir {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Kill the task processes an agent on `data_dir` left running (it was killed): a process
/// runtime on its sandboxes adopts them, then kills them. On a thread of its own, as the
/// caller may be inside a runtime.
fn kill_left_tasks(data_dir: &Path) {
    use mesh_core::runtime::Runtime;
    let sandboxes = data_dir.join("sandboxes");
    if !sandboxes.exists() {
        return;
    }
    let reaper = std::thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
        rt.block_on(async move {
            let (tx, mut rx) = tokio::sync::mpsc::channel(1024);
            let drain = tokio::spawn(async move { while rx.recv().await.is_some() {} });
            if let Ok(runtime) = mesh_core::runtime::process::ProcessRuntime::new(sandboxes, tx) {
                let _ = runtime.recover().await;
                runtime.kill_all(Duration::from_secs(2)).await;
            }
            drain.abort();
        });
    });
    let _ = reaper.join();
}

/// Call `f` until it returns `Some` or `limit` passes (then a [`ClusterError::Timeout`] naming
/// `what`), pausing 100 ms between calls.
pub async fn poll<T, F, Fut>(limit: Duration, what: &str, mut f: F) -> Result<T, ClusterError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f().await {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            return Err(ClusterError::Timeout(limit, what.to_owned()));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `GET path` from a node's HTTP API (one connection, 5 s at most): status and body.
pub async fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    http_request(addr, "GET", path, None).await
}

/// One request to a node's HTTP API (one connection, 5 s at most; a body is sent as JSON):
/// status and body.
pub async fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> std::io::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let body = body.unwrap_or("");
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes()).await?;
        s.write_all(body.as_bytes()).await?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).await?;
        Ok::<_, std::io::Error>(out)
    };
    let what = format!("{method} {path} at {addr}");
    let out = tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, what.clone()))??;
    parse_response(&out).ok_or_else(|| std::io::Error::other(format!("{what}: not an HTTP answer")))
}

/// Status and body of an HTTP/1.1 response read to its end (chunked or not).
fn parse_response(out: &[u8]) -> Option<(u16, String)> {
    let split = out.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&out[..split]).to_ascii_lowercase();
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    let mut rest = &out[split + 4..];
    if !head.contains("transfer-encoding: chunked") {
        return Some((status, String::from_utf8_lossy(rest).into_owned()));
    }
    let mut body = Vec::new();
    while let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") {
        let n = usize::from_str_radix(String::from_utf8_lossy(&rest[..eol]).trim(), 16).ok()?;
        let tail = &rest[eol + 2..];
        if n == 0 || tail.len() < n {
            break;
        }
        body.extend_from_slice(&tail[..n]);
        rest = tail[n..].strip_prefix(b"\r\n").unwrap_or(&tail[n..]);
    }
    Some((status, String::from_utf8_lossy(&body).into_owned()))
}

#[cfg(test)]
mod tests {
    use super::parse_response;

    #[test]
    fn responses_are_read_plain_and_chunked() {
        let plain = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
        assert_eq!(parse_response(plain), Some((200, "ok".into())));
        let chunked = b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
        assert_eq!(parse_response(chunked), Some((404, "abcde".into())));
        assert_eq!(parse_response(b"garbage"), None);
    }
}
