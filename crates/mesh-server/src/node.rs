//! Assembling a node. `mesh dev` runs everything in one process: the control side (state log,
//! allocator, Marathon scheduler), one agent with its runtime, the HTTP APIs and the DNS server.
//! Control and agent still talk only through [`mesh_core::proto`] messages.

use crate::agent::{self, AgentConfig, StopMode};
use crate::api::{self, Api, NodeInfo};
use crate::control::{self, ControlConfig, ControlHandle};
use crate::dns::{DnsServer, PublishedCatalog};
use crate::registrator;
use mesh_core::dns::DnsConfig;
use mesh_core::model::{AgentId, Clock, PortRanges, Resources};
use mesh_core::registrator::RegistratorOptions;
use mesh_core::runtime::Runtime;
use mesh_core::runtime::docker::DockerRuntime;
use mesh_core::runtime::gc::GcPolicy;
use mesh_core::runtime::logger::TaskLogs;
use mesh_core::runtime::multi::MultiRuntime;
use mesh_core::runtime::process::{ProcessOptions, ProcessRuntime};
use mesh_core::state::{Store, WalLog};
use std::collections::BTreeMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tracing::{info, warn};

/// Which runtime the agent uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RuntimeKind {
    /// Docker when an engine answers, processes otherwise.
    Auto,
    /// Plain processes.
    Process,
    /// Docker containers.
    Docker,
    /// Tasks that run nowhere ([`mesh_core::runtime::memory`]): for benchmarks at sizes real
    /// processes would not fit. Only in builds with the `memory-runtime` feature.
    #[cfg(feature = "memory-runtime")]
    Memory,
}

/// Settings of a node.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// HTTP listeners (every one serves every API).
    pub http: Vec<SocketAddr>,
    /// DNS listener (UDP and TCP on the same port).
    pub dns: SocketAddr,
    /// Data directory (state log, task sandboxes).
    pub data_dir: PathBuf,
    /// DNS domain.
    pub domain: String,
    /// Node name.
    pub node: String,
    /// Datacenter.
    pub datacenter: String,
    /// Runtime choice.
    pub runtime: RuntimeKind,
    /// Host port range of the agent.
    pub ports: (u16, u16),
    /// Address tasks and DNS answers use.
    pub advertise: IpAddr,
    /// CPUs offered.
    pub cpus: f64,
    /// Memory offered, MiB.
    pub mem: f64,
    /// Disk offered, MiB.
    pub disk: f64,
    /// Agent attributes.
    pub attributes: BTreeMap<String, String>,
    /// On SIGTERM/SIGINT, leave tasks running for the next start to re-adopt.
    pub keep_tasks_on_exit: bool,
    /// What containers may reach of the host: privileged mode, host paths, added capabilities.
    pub host_access: mesh_core::runtime::HostAccess,
    /// Register every container on the local Docker engine (Registrator) when one answers.
    pub registrator: bool,
    /// Versions kept per app.
    pub max_app_versions: usize,
    /// MiB preallocated for commands that stop tasks while the state log cannot be written.
    pub state_reserve_mb: u64,
    /// Allow Consul script checks (`Args`/`Script`), off by default as in Consul.
    pub enable_script_checks: bool,
    /// DNS settings other than the domain, datacenter and servers (which come from the fields above).
    pub dns_options: DnsConfig,
    /// Connection limits and timeouts of the HTTP listeners.
    pub http_limits: crate::serve::HttpLimits,
    /// Mesos v1 API and allocation settings (`host_access` and `hostname` are filled in
    /// from this config).
    pub mesos: crate::control::MesosConfig,
    /// Where task stdout/stderr go (rotated by a logger process, or straight into the sandbox).
    pub task_logs: TaskLogs,
    /// When sandboxes of ended tasks are removed.
    pub gc: GcPolicy,
    /// How often a task's sandbox is measured against its `disk`.
    pub container_disk_watch_interval: Duration,
    /// Internal RPC listener (servers; agents listen too, for what comes later).
    pub rpc: SocketAddr,
    /// Servers' RPC addresses an agent connects to (`--server`), tried in turn.
    pub servers: Vec<SocketAddr>,
    /// The Docker network bridge-mode containers join (`None`: Docker's `bridge`).
    pub docker_network: Option<String>,
    /// Where the node answers DNS for its containers (port 53): `Auto` is the gateway of the
    /// containers' Docker network.
    pub container_dns: ContainerDns,
    /// LAN gossip (UDP) listener of servers and agents.
    pub serf_lan: SocketAddr,
    /// Gossip addresses of members to join (`--join`), retried with backoff until one answers.
    pub join: Vec<SocketAddr>,
    /// Gossip timing (tests shorten it).
    pub gossip_timing: crate::gossip::GossipTiming,
    /// Servers: the WAN gossip (UDP) listener, the pool of every datacenter's servers.
    pub serf_wan: SocketAddr,
    /// Servers: WAN gossip addresses (servers of other datacenters) to join (`--join-wan`),
    /// retried with backoff until one answers.
    pub join_wan: Vec<SocketAddr>,
    /// Servers: the address other datacenters reach this server at (`--advertise-wan`; default
    /// the advertise address).
    pub advertise_wan: Option<std::net::IpAddr>,
    /// Servers: WAN gossip timing (Consul's WAN defaults; tests shorten it).
    pub gossip_wan_timing: crate::gossip::GossipTiming,
    /// See [`ControlConfig::agent_down_after`].
    pub agent_down_after: Duration,
    /// See [`ControlConfig::reregister_timeout`].
    pub reregister_timeout: Duration,
    /// Servers: form the Raft group once this many servers know each other (`--bootstrap-expect`).
    pub bootstrap_expect: usize,
    /// Servers: Raft timings (`--raft-multiplier`).
    pub raft_timing: crate::raft::RaftTiming,
    /// Servers: remove a server gossip declared failed for this long from the Raft group
    /// (autopilot's cleanup of dead servers; `--dead-server-cleanup-after`, `None`: never).
    pub dead_server_cleanup: Option<Duration>,
    /// The one source of time, ids and seeds of this node (control loop, agent, replica, API).
    pub clock: Arc<dyn Clock>,
}

/// Errors that stop a node from starting.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The data directory is not usable.
    #[error("data dir {path}: {source}")]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The state log could not be opened.
    #[error(transparent)]
    Log(#[from] mesh_core::state::LogError),
    /// The runtime could not start.
    #[error(transparent)]
    Runtime(#[from] mesh_core::runtime::RuntimeError),
    /// A runtime that this build does not provide.
    #[error("{0}")]
    Unsupported(String),
}

/// The addresses a started node listens on.
#[derive(Clone, Debug)]
pub struct Bound {
    /// HTTP listeners.
    pub http: Vec<SocketAddr>,
    /// DNS (UDP and TCP).
    pub dns: SocketAddr,
}

async fn bind_dns(addr: SocketAddr) -> Result<(tokio::net::UdpSocket, tokio::net::TcpListener), NodeError> {
    // UDP and TCP on the same port; with port 0, retry until both get the same one.
    for _ in 0..50 {
        let udp = tokio::net::UdpSocket::bind(addr).await.map_err(|source| NodeError::Bind { addr, source })?;
        let port = udp.local_addr().map_err(|source| NodeError::Bind { addr, source })?.port();
        match tokio::net::TcpListener::bind(SocketAddr::new(addr.ip(), port)).await {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(source) if addr.port() != 0 => return Err(NodeError::Bind { addr, source }),
            Err(_) => continue,
        }
    }
    Err(NodeError::Bind { addr, source: std::io::Error::other("no port free for both UDP and TCP") })
}

/// A seed for a random source (gossip, the scheduler), drawn from the node's id source.
fn seed(clock: &dyn Clock) -> u64 {
    clock.uuid().as_u64_pair().0
}

/// The node id of a data dir (`<data dir>/node-id`): a UUID generated on first use and kept, so
/// that two nodes with the same name (on one Docker engine) never take each other's containers.
pub fn node_id(data_dir: &std::path::Path, clock: &dyn Clock) -> Result<String, NodeError> {
    let path = data_dir.join("node-id");
    let err = |source| NodeError::DataDir { path: path.clone(), source };
    match std::fs::read_to_string(&path) {
        Ok(id) if !id.trim().is_empty() => return Ok(id.trim().to_owned()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    let id = clock.uuid().to_string();
    let tmp = data_dir.join("node-id.tmp");
    std::fs::write(&tmp, format!("{id}\n")).map_err(err)?;
    std::fs::rename(&tmp, &path).map_err(err)?;
    info!(node_id = %id, "generated the node id of this data dir");
    Ok(id)
}

/// The runtimes of an agent: plain processes always; Docker when an engine answers (auto) or
/// when asked for (docker). Returns the runtime the agent uses, the runtimes it offers, and the
/// process and Docker runtimes themselves.
async fn build_runtimes(
    cfg: &NodeConfig,
    events_tx: tokio::sync::mpsc::Sender<mesh_core::runtime::RuntimeEvent>,
) -> Result<(Arc<dyn Runtime>, Vec<String>, Arc<ProcessRuntime>, Option<Arc<DockerRuntime>>), NodeError> {
    let process_options = ProcessOptions {
        logs: cfg.task_logs.clone(),
        disk_watch_interval: cfg.container_disk_watch_interval,
        ..Default::default()
    };
    let process = ProcessRuntime::with_options(cfg.data_dir.join("sandboxes"), events_tx.clone(), process_options)?;
    info!(isolation = process.isolation(), tracking = process.tracking(), "process runtime");
    let process = Arc::new(process);
    let docker_wanted = match cfg.runtime {
        RuntimeKind::Process => false,
        #[cfg(feature = "memory-runtime")]
        RuntimeKind::Memory => false,
        RuntimeKind::Docker => true,
        RuntimeKind::Auto => DockerRuntime::available().await,
    };
    let docker: Option<Arc<DockerRuntime>> = if docker_wanted {
        let node_id = node_id(&cfg.data_dir, cfg.clock.as_ref())?;
        match DockerRuntime::connect(events_tx.clone(), &cfg.node, &node_id).await {
            Ok(rt) => {
                if let TaskLogs::Rotate { rotation, .. } = &cfg.task_logs {
                    rt.set_log_rotation(Some(*rotation));
                }
                rt.set_disk_watch_interval(cfg.container_disk_watch_interval);
                Some(Arc::new(rt))
            }
            Err(e) if cfg.runtime == RuntimeKind::Docker => return Err(NodeError::Runtime(e)),
            Err(e) => {
                warn!(error = %e, "Docker is not usable; DOCKER apps will wait (NoDockerRuntime)");
                None
            }
        }
    } else {
        if cfg.runtime == RuntimeKind::Auto {
            info!("no Docker engine answers: DOCKER apps will wait (NoDockerRuntime)");
        }
        None
    };
    let multi = MultiRuntime::new(process.clone(), docker.clone().map(|d| d as Arc<dyn Runtime>));
    #[cfg(feature = "memory-runtime")]
    let (runtime, runtimes): (Arc<dyn Runtime>, Vec<String>) = if cfg.runtime == RuntimeKind::Memory {
        warn!("memory runtime: tasks run nowhere (benchmarks only)");
        let memory = mesh_core::runtime::memory::MemoryRuntime::new(events_tx.clone());
        (Arc::new(memory), vec!["process".into(), "docker".into()])
    } else {
        let runtimes = multi.runtimes();
        (Arc::new(multi), runtimes)
    };
    #[cfg(not(feature = "memory-runtime"))]
    let (runtime, runtimes): (Arc<dyn Runtime>, Vec<String>) = {
        let runtimes = multi.runtimes();
        (Arc::new(multi), runtimes)
    };
    info!(?runtimes, "runtimes");
    Ok((runtime, runtimes, process, docker))
}

/// Run a `mesh dev` node until `shutdown` resolves. `ready` is called with the bound addresses
/// once every API answers.
pub async fn run_dev(
    cfg: NodeConfig,
    ready: impl FnOnce(&Bound),
    shutdown: impl Future<Output = ()>,
) -> Result<(), NodeError> {
    let node_id = ensure_data_dir(&cfg)?;
    // The control side is a Raft group of one, on the same path as a cluster's servers: the
    // state machine publishes what it applies; the control loop runs while this node leads
    // (at once: it is the only voter). The agent talks to it as a cluster's agent talks to its
    // server: through an uplink (numbered reports in an outbox on disk, acknowledged) and the
    // server's RPC handler, here over an in-memory transport.
    let (published, index_tx) =
        control::Published::new(mesh_core::state::State::new(&cfg.datacenter), cfg.clock.clone());
    let replication = crate::cluster::replication::Replication::new(0);
    let (control, inbox) = control::handle_with_inbox(published.clone());
    let net = crate::rpc::MemTransport::default();
    let server_addr = SocketAddr::new(cfg.advertise, cfg.rpc.port());
    let hello = crate::rpc::Hello {
        node: cfg.node.clone(),
        node_id: node_id.clone(),
        datacenter: cfg.datacenter.clone(),
        role: crate::rpc::Role::Server,
        http: None,
    };
    let legacy = legacy_state(&cfg)?;
    // No gossip: nobody else ever joins this group.
    let (_members_tx, members) = tokio::sync::watch::channel(Arc::new(Vec::new()));
    let (route_tx, route) = tokio::sync::watch::channel(crate::cluster::forward::Route::NoLeader);
    let raft_cfg = raft_config(&cfg, &node_id, server_addr, Arc::new(net.at(cfg.advertise)), hello.clone(), 1);
    let raft = crate::raft::RaftServer::start(
        raft_cfg,
        published.clone(),
        index_tx,
        replication.clone(),
        inbox,
        members,
        route_tx,
    )
    .await
    .map_err(|e| NodeError::Unsupported(e.to_string()))?;
    await_leadership(route.clone()).await?;
    if let Some((state, files)) = legacy {
        adopt_legacy_state(&control, state, files).await?;
    }
    info!(
        apps = published.state.load().apps.len(),
        tasks = published.state.load().tasks.len(),
        index = published.state.load().index,
        "state loaded"
    );

    let executor = {
        let api_control = control.clone();
        let template = node_info(&cfg, &[]);
        crate::cluster::forward::Executor::new(
            Arc::new(move |node: &str| api::router(Api::new(api_control.clone(), template.clone()).for_node(node))),
            published.clone(),
        )
    };
    let handler = Arc::new(
        crate::cluster::server::ServerHandler::new(control.clone(), replication, executor)
            .with_raft(raft.handler.clone(), route.clone()),
    );
    let listener = crate::rpc::Transport::listen(&net, server_addr)
        .await
        .map_err(|source| NodeError::Bind { addr: server_addr, source })?;
    let rpc = crate::rpc::Server::start(listener, hello, handler)
        .map_err(|source| NodeError::Bind { addr: server_addr, source })?;
    let outbox_path = cfg.data_dir.join("outbox.jsonl");
    let outbox = crate::cluster::outbox::Outbox::open(&outbox_path)
        .map_err(|source| NodeError::DataDir { path: outbox_path.clone(), source })?;
    let (up_tx, up_rx) = tokio::sync::mpsc::channel(1024);
    let uplink_cfg = crate::cluster::uplink::UplinkConfig {
        agent: AgentId::from(cfg.node.as_str()),
        node_id,
        datacenter: cfg.datacenter.clone(),
        servers: Arc::new(std::sync::Mutex::new(vec![server_addr])),
        transport: Arc::new(net.at(cfg.advertise)),
    };
    let (_link, mut pending, uplink_join) = crate::cluster::uplink::spawn(uplink_cfg, outbox, up_rx);
    let agent_control = ControlHandle::from_parts(up_tx, control.published.clone());

    let (events_tx, events_rx) = tokio::sync::mpsc::channel(1024);
    let (runtime, runtimes, process, docker) = build_runtimes(&cfg, events_tx).await?;
    let agent_cfg = agent_config(&cfg, runtimes);
    let agent = agent::start(agent_cfg, runtime, events_rx, agent_control.clone()).await?;
    // Only after recovery: sandboxes of tasks the agent re-adopted are never candidates.
    let sandbox_gc = process.spawn_gc(cfg.gc);

    let registrator = start_registrator(&cfg, docker.is_some(), &agent_control).await;

    let catalog =
        PublishedCatalog { catalog: control.published.catalog.clone(), hooks: control.published.catalog_hooks.clone() };
    let (dns, dns_addr) = start_dns(&cfg, catalog.clone(), vec![cfg.node.clone()]).await?;
    let container_dns = start_container_dns(&cfg, docker.as_deref(), catalog.clone()).await;

    let loopback = api::Loopback::default();
    let dev_router = |info| api::router(Api { loopback: loopback.clone(), ..Api::new(control.clone(), info) });
    let http = start_http(&cfg, dev_router).await?;
    let http_addrs = http.addrs.clone();
    let own = dev_router(node_info(&cfg, &http_addrs));
    let _ = loopback.set(own.clone());
    set_dns_lookup(&dns_lookup(&cfg, own), [Some(&dns), container_dns.as_ref()]);

    register_own(&control, &cfg, http_addrs.first().map(|a| a.port()).unwrap_or(0)).await;

    let bound = Bound { http: http_addrs, dns: dns_addr };
    info!(http = ?bound.http, dns = %bound.dns, node = %cfg.node, dc = %cfg.datacenter, "mesh dev ready");
    ready(&bound);

    shutdown.await;
    info!("shutting down");
    // Tasks are stopped while HTTP connections drain, so a shutdown takes the longest of the
    // two, not their sum.
    let tasks_done = async {
        control.drain().await;
        let mode = if cfg.keep_tasks_on_exit { StopMode::LeaveTasks } else { StopMode::KillTasks };
        agent.stop(mode).await;
    };
    tokio::join!(http.stop(), tasks_done);
    stop_node_services(sandbox_gc, registrator, dns, container_dns).await;
    // The control loop records what the agent reported while stopping (its tasks' ends, its
    // goodbye) before it stops; what it could not take waits in the outbox for the next start.
    drop(agent_control);
    let _ = tokio::time::timeout(Duration::from_secs(5), pending.wait_for(|p| *p == 0)).await;
    uplink_join.abort();
    drop(rpc);
    raft.shutdown().await;
    drop(control);
    info!("stopped");
    Ok(())
}

/// The Raft settings of a node that serves the control side.
fn raft_config(
    cfg: &NodeConfig,
    node_id: &str,
    rpc: SocketAddr,
    transport: Arc<dyn crate::rpc::Transport>,
    hello: crate::rpc::Hello,
    bootstrap_expect: usize,
) -> crate::raft::RaftServerConfig {
    crate::raft::RaftServerConfig {
        name: cfg.node.clone(),
        node_id: node_id.to_owned(),
        datacenter: cfg.datacenter.clone(),
        dir: cfg.data_dir.join("raft"),
        rpc,
        bootstrap_expect,
        timing: cfg.raft_timing,
        write_timeout: RPC_HOLD,
        transport,
        hello,
        control: control_config(cfg),
        max_app_versions: cfg.max_app_versions,
        dead_server_cleanup: cfg.dead_server_cleanup,
        reserve_bytes: cfg.state_reserve_mb.saturating_mul(1024 * 1024),
        contacts: Arc::default(),
    }
}

/// Wait until this node's control loop runs (it leads its group).
async fn await_leadership(
    mut route: tokio::sync::watch::Receiver<crate::cluster::forward::Route>,
) -> Result<(), NodeError> {
    let leads = route.wait_for(|r| matches!(r, crate::cluster::forward::Route::Local));
    match tokio::time::timeout(Duration::from_secs(60), leads).await {
        Ok(Ok(_)) => Ok(()),
        _ => Err(NodeError::Unsupported(
            "the state store (a Raft group of one) did not start leading within 60 s".into(),
        )),
    }
}

/// The state a `mesh dev` data dir kept before the control side ran on Raft (its own log,
/// `state.wal` or the older `state.redb`), when the Raft group has none yet: the state and the
/// files to set aside once it is adopted.
fn legacy_state(cfg: &NodeConfig) -> Result<Option<(mesh_core::state::State, Vec<PathBuf>)>, NodeError> {
    let files: Vec<PathBuf> =
        [mesh_core::state::WAL_DIR, "state.redb"].iter().map(|f| cfg.data_dir.join(f)).filter(|p| p.exists()).collect();
    if files.is_empty() || cfg.data_dir.join("raft").join(crate::raft::state_machine::SNAPSHOT_FILE).exists() {
        return Ok(None);
    }
    let raft = cfg.data_dir.join("raft");
    if raft.join(crate::raft::seg_store::LOG_DIR).exists() || raft.join(crate::raft::seg_store::REDB_FILE).exists() {
        return Ok(None);
    }
    let log = WalLog::open_data_dir(&cfg.data_dir, 0)?;
    let store = Store::open(Box::new(log), &cfg.datacenter)?;
    let state = store.state().clone();
    drop(store);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&cfg.data_dir)
        .map_err(|source| NodeError::DataDir { path: cfg.data_dir.clone(), source })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("state.")))
        .collect();
    files.sort();
    Ok(Some((state, files)))
}

/// Put a pre-Raft data dir's state into the group (one restore command), then set its files
/// aside (`*.pre-raft`), so the next start reads only Raft's.
async fn adopt_legacy_state(
    control: &ControlHandle,
    state: mesh_core::state::State,
    files: Vec<PathBuf>,
) -> Result<(), NodeError> {
    let (apps, index) = (state.apps.len(), state.index);
    control
        .propose(mesh_core::state::Command::Restore { state: Box::new(state) })
        .await
        .map_err(|e| NodeError::Unsupported(format!("adopting the state of the old state log: {e}")))?;
    for f in files {
        let mut to = f.clone().into_os_string();
        to.push(".pre-raft");
        std::fs::rename(&f, &to).map_err(|source| NodeError::DataDir { path: f.clone(), source })?;
    }
    info!(apps, index, "the old state log's state now lives in the Raft log; its files are kept as *.pre-raft");
    Ok(())
}

fn agent_config(cfg: &NodeConfig, runtimes: Vec<String>) -> AgentConfig {
    AgentConfig {
        id: AgentId::from(cfg.node.as_str()),
        hostname: cfg.node.clone(),
        address: cfg.advertise,
        wan_address: cfg.advertise_wan,
        resources: Resources {
            cpus: cfg.cpus,
            mem: cfg.mem,
            disk: cfg.disk,
            ports: PortRanges::range(cfg.ports.0, cfg.ports.1),
        },
        attributes: cfg.attributes.clone(),
        runtimes,
        enable_script_checks: cfg.enable_script_checks,
        clock: cfg.clock.clone(),
    }
}

/// Registrator: every container on this engine with published ports is a service instance.
async fn start_registrator(
    cfg: &NodeConfig,
    have_docker: bool,
    control: &ControlHandle,
) -> Option<registrator::Registrator> {
    if !cfg.registrator || !(have_docker || DockerRuntime::available().await) {
        return None;
    }
    match bollard::Docker::connect_with_local_defaults() {
        Ok(d) => {
            let opts = RegistratorOptions { node: cfg.node.clone(), ..Default::default() };
            Some(registrator::spawn(d, AgentId::from(cfg.node.as_str()), control.clone(), opts))
        }
        Err(e) => {
            warn!(error = %e, "registrator not started");
            None
        }
    }
}

async fn start_dns(
    cfg: &NodeConfig,
    catalog: PublishedCatalog,
    servers: Vec<String>,
) -> Result<(DnsServer, SocketAddr), NodeError> {
    let (udp, tcp) = bind_dns(cfg.dns).await?;
    let dns_addr = udp.local_addr().map_err(|source| NodeError::Bind { addr: cfg.dns, source })?;
    let dns_cfg = DnsConfig {
        domain: cfg.domain.clone(),
        datacenter: cfg.datacenter.clone(),
        servers,
        ..cfg.dns_options.clone()
    };
    let dns = DnsServer::start(udp, tcp, catalog, dns_cfg)
        .await
        .map_err(|source| NodeError::Bind { addr: cfg.dns, source })?;
    Ok((dns, dns_addr))
}

/// The HTTP listeners of a node.
struct HttpListeners {
    addrs: Vec<SocketAddr>,
    stop: tokio::sync::watch::Sender<bool>,
    servers: Vec<tokio::task::JoinHandle<()>>,
    trimmer: tokio::task::JoinHandle<()>,
}

impl HttpListeners {
    /// Stop accepting and wait (at most 5 s) for the connections to end.
    async fn stop(self) {
        let _ = self.stop.send(true);
        // One deadline for all listeners: they share the connections they wait for.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        for s in self.servers {
            let _ = tokio::time::timeout_at(deadline, s).await;
        }
        self.trimmer.abort();
    }
}

/// The HTTP address this node gives out (a Mesos redirect's `Location`, the leader Marathon
/// names, the master's `pid`): of the listeners `bound` for `configured`, the first configured
/// with a fixed port, since one bound to port 0 gets another port when the node restarts and a
/// client sent there (a Mesos framework keeps the leader's address and only retries it) could
/// never reach the node again; an unspecified bind address (`0.0.0.0`) reads as `advertise`.
fn advertised_http(configured: &[SocketAddr], bound: &[SocketAddr], advertise: IpAddr) -> Option<SocketAddr> {
    let fixed = configured.iter().position(|a| a.port() != 0).unwrap_or(0);
    let mut addr = *bound.get(fixed).or(bound.first())?;
    if addr.ip().is_unspecified() && !advertise.is_unspecified() {
        addr.set_ip(advertise);
    }
    Some(addr)
}

/// Bind every HTTP listener and serve `router(node info)` on them.
async fn start_http(
    cfg: &NodeConfig,
    router: impl FnOnce(NodeInfo) -> axum::Router,
) -> Result<HttpListeners, NodeError> {
    let mut listeners = Vec::new();
    for addr in &cfg.http {
        let l = tokio::net::TcpListener::bind(addr).await.map_err(|source| NodeError::Bind { addr: *addr, source })?;
        listeners.push(l);
    }
    let addrs: Vec<SocketAddr> = listeners.iter().filter_map(|l| l.local_addr().ok()).collect();
    let router = router(node_info(cfg, &addrs));
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let http = crate::serve::Http::new(cfg.http_limits.clone());
    let trimmer = http.spawn_trimmer();
    let mut servers = Vec::new();
    for l in listeners {
        servers.push(tokio::spawn(crate::serve::serve(l, router.clone(), http.clone(), stop_rx.clone())));
    }
    Ok(HttpListeners { addrs, stop, servers, trimmer })
}

fn node_info(cfg: &NodeConfig, http_addrs: &[SocketAddr]) -> NodeInfo {
    NodeInfo {
        node: cfg.node.clone(),
        datacenter: cfg.datacenter.clone(),
        http_addr: advertised_http(&cfg.http, http_addrs, cfg.advertise).map(|a| a.to_string()).unwrap_or_default(),
        domain: cfg.domain.clone(),
        started_at: cfg.clock.now(),
        host_access: cfg.host_access.clone(),
        enable_script_checks: cfg.enable_script_checks,
    }
}

/// The control plane's own service, as Consul servers register `consul` (clients look for it).
async fn register_own(control: &ControlHandle, cfg: &NodeConfig, http_port: u16) {
    let own = mesh_core::catalog::ServiceInstance {
        id: "consul".into(),
        service: "consul".into(),
        node: cfg.node.clone(),
        address: None,
        port: http_port,
        tags: Vec::new(),
        meta: BTreeMap::new(),
        health: mesh_core::catalog::Health::Passing,
        source_health: mesh_core::catalog::Health::Passing,
        weights: Default::default(),
        create_index: 0,
        modify_index: 0,
        extra: Default::default(),
    };
    let node_info = mesh_core::catalog::Node {
        name: cfg.node.clone(),
        address: cfg.advertise,
        datacenter: cfg.datacenter.clone(),
        meta: BTreeMap::new(),
        create_index: 0,
        modify_index: 0,
        tagged_addresses: cfg
            .advertise_wan
            .map(|wan| {
                BTreeMap::from([("lan".to_owned(), cfg.advertise.to_string()), ("wan".to_owned(), wan.to_string())])
            })
            .unwrap_or_default(),
    };
    let register_own = mesh_core::state::Command::Register {
        node: cfg.node.clone(),
        node_info: Some(node_info),
        instance: Some(own),
        checks: Vec::new(),
        replace_checks: false,
    };
    if let Err(e) = control.propose(register_own).await {
        warn!(error = %e, "could not register the consul service");
    }
}

/// The node id of the data dir, created if needed.
fn ensure_data_dir(cfg: &NodeConfig) -> Result<String, NodeError> {
    std::fs::create_dir_all(&cfg.data_dir)
        .map_err(|source| NodeError::DataDir { path: cfg.data_dir.clone(), source })?;
    node_id(&cfg.data_dir, cfg.clock.as_ref())
}

/// How long a request that needs the leader waits for one during an election (Consul's
/// `rpc_hold_timeout`), and how long a write waits for a quorum.
pub const RPC_HOLD: Duration = crate::cluster::forward::HOLD;

/// Run a `mesh server` (a control node) until `shutdown` resolves: a member of the
/// datacenter's Raft group (formed with `--bootstrap-expect` servers), every HTTP API, DNS, and
/// the internal RPC listener that agents, replicas and the other servers use. The leader runs
/// the control loop; the others answer reads from their state machine and send the rest to it.
pub async fn run_server(
    cfg: NodeConfig,
    ready: impl FnOnce(&Bound),
    shutdown: impl Future<Output = ()>,
) -> Result<(), NodeError> {
    let node_id = ensure_data_dir(&cfg)?;
    // The read side, fed by the Raft state machine on every server.
    let (published, index_tx) =
        control::Published::new(mesh_core::state::State::new(&cfg.datacenter), cfg.clock.clone());
    let replication = crate::cluster::replication::Replication::new(0);
    let (control, inbox) = control::handle_with_inbox(published.clone());
    let catalog = PublishedCatalog { catalog: published.catalog.clone(), hooks: published.catalog_hooks.clone() };
    let (dns, dns_addr) = start_dns(&cfg, catalog, vec![cfg.node.clone()]).await?;
    let transport = Arc::new(crate::rpc::TcpTransport { bind: Some(cfg.advertise) });
    let listener = crate::rpc::Transport::listen(transport.as_ref(), cfg.rpc)
        .await
        .map_err(|source| NodeError::Bind { addr: cfg.rpc, source })?;
    let rpc_port = listener.local_addr().map_err(|source| NodeError::Bind { addr: cfg.rpc, source })?.port();
    let rpc_advertised = SocketAddr::new(cfg.advertise, rpc_port);
    let gossip = start_gossip(&cfg, &node_id, crate::gossip::Role::Server, rpc_advertised).await?;
    let wan = start_wan_gossip(&cfg, &node_id, rpc_advertised).await?;
    let members_task = report_members(&gossip, control.clone());
    let (route_tx, route) = tokio::sync::watch::channel(crate::cluster::forward::Route::NoLeader);
    let contacts = Arc::new(crate::raft::Contacts::default());
    let raft_view =
        crate::api::RaftView { raft: Arc::default(), route: Some(route.clone()), contacts: contacts.clone() };
    let leader_route = crate::cluster::forward::LeaderRoute {
        route: route.clone(),
        node: cfg.node.clone(),
        published: published.clone(),
        hold: RPC_HOLD,
        raft: raft_view.raft.clone(),
        contacts: contacts.clone(),
    };
    // One set of API state (and membership) for this node's listeners and for the requests
    // agents forward, which act for their own node.
    let coords =
        Arc::new(crate::api::consul_coordinate::Coordinates::new(&cfg.node, &cfg.datacenter, seed(cfg.clock.as_ref())));
    let base = Api {
        cluster: Some(Arc::new(crate::cluster::ops::GossipOps { gossip: gossip.clone(), wan: Some(wan.clone()) })),
        raft: Some(raft_view.clone()),
        coordinates: coords.clone(),
        ..Api::new(control.clone(), node_info(&cfg, &[]))
    };
    let dc_route = crate::cluster::forward::DcRoute {
        datacenter: cfg.datacenter.clone(),
        node: cfg.node.clone(),
        wan: wan.clone(),
        transport: transport.clone(),
        hello: crate::rpc::Hello {
            node: cfg.node.clone(),
            node_id: node_id.clone(),
            datacenter: cfg.datacenter.clone(),
            role: crate::rpc::Role::Server,
            http: None,
        },
        published: published.clone(),
        conns: Arc::default(),
    };
    let layer = {
        let l = leader_route.clone();
        move |r: axum::Router| {
            r.layer(axum::middleware::from_fn_with_state(l.clone(), crate::cluster::forward::leader_layer))
                .layer(axum::middleware::from_fn_with_state(dc_route.clone(), crate::cluster::forward::dc_layer))
        }
    };
    let http = start_http(&cfg, |info| layer(api::router(Api { info, ..base.clone() }))).await?;
    let http_addrs = http.addrs.clone();
    let template = Api { info: node_info(&cfg, &http_addrs), ..base };
    let own = layer(api::router(template.clone()));
    let _ = template.loopback.set(own.clone());
    set_dns_lookup(&dns_lookup(&cfg, own), [Some(&dns)]);
    let executor = {
        let layer = layer.clone();
        crate::cluster::forward::Executor::new(
            Arc::new(move |node: &str| layer(api::router(template.for_node(node)))),
            published.clone(),
        )
    };
    let hello = crate::rpc::Hello {
        node: cfg.node.clone(),
        node_id: node_id.clone(),
        datacenter: cfg.datacenter.clone(),
        role: crate::rpc::Role::Server,
        http: advertised_http(&cfg.http, &http_addrs, cfg.advertise).map(|a| a.to_string()),
    };
    let raft_cfg = crate::raft::RaftServerConfig {
        contacts,
        ..raft_config(&cfg, &node_id, rpc_advertised, transport.clone(), hello.clone(), cfg.bootstrap_expect)
    };
    let raft = crate::raft::RaftServer::start(
        raft_cfg,
        published.clone(),
        index_tx,
        replication.clone(),
        inbox,
        gossip.subscribe(),
        route_tx,
    )
    .await
    .map_err(|e| NodeError::Unsupported(e.to_string()))?;
    let _ = raft_view.raft.set(raft.raft.clone());
    let handler = Arc::new(
        crate::cluster::server::ServerHandler::new(control.clone(), replication, executor.clone())
            .with_raft(raft.handler.clone(), route.clone())
            .with_coords(coords.clone()),
    );
    let rpc = crate::rpc::Server::start(listener, hello.clone(), handler)
        .map_err(|source| NodeError::Bind { addr: cfg.rpc, source })?;
    let probers = [
        spawn_prober(&cfg, false, &gossip, &coords, transport.clone(), hello.clone()),
        spawn_prober(&cfg, true, &wan, &coords, transport.clone(), hello),
    ];

    let own =
        tokio::spawn(register_own_through(executor, cfg.clone(), http_addrs.first().map(|a| a.port()).unwrap_or(0)));
    let bound = Bound { http: http_addrs, dns: dns_addr };
    info!(http = ?bound.http, dns = %bound.dns, rpc = %rpc.local_addr(), node = %cfg.node, dc = %cfg.datacenter, "mesh server ready");
    ready(&bound);

    shutdown.await;
    info!("shutting down");
    own.abort();
    members_task.abort();
    probers.iter().for_each(|p| p.abort());
    gossip.shutdown().await;
    wan.shutdown().await;
    http.stop().await;
    raft.shutdown().await;
    drop(rpc);
    dns.shutdown().await;
    drop(control);
    info!("stopped");
    Ok(())
}

/// Register this server's `consul` service (and its node) as Consul servers do, through the
/// server's own API so that it reaches the leader whichever server that is; retried until it
/// is recorded.
async fn register_own_through(executor: crate::cluster::forward::Executor, cfg: NodeConfig, http_port: u16) {
    let body = serde_json::json!({
        "Node": cfg.node,
        "Address": cfg.advertise.to_string(),
        "Datacenter": cfg.datacenter,
        "Service": { "ID": "consul", "Service": "consul", "Port": http_port },
    });
    let mut wait = Duration::from_millis(100);
    loop {
        let req = crate::rpc::msg::HttpRequest {
            method: "PUT".into(),
            uri: "/v1/catalog/register".into(),
            headers: vec![("content-type".into(), "application/json".into())],
            body: body.to_string().into_bytes(),
            node: cfg.node.clone(),
        };
        let r = executor.serve(req).await;
        if r.status == 200 {
            return;
        }
        tracing::debug!(status = r.status, body = %String::from_utf8_lossy(&r.body), "consul service not registered yet");
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_secs(5));
    }
}

/// Run a `mesh agent` (a compute node) until `shutdown` resolves: the runtimes and the agent
/// loop, connected to a server through an uplink; a replica of the state for DNS and the read
/// APIs; HTTP that answers reads locally and forwards writes. On shutdown tasks keep running
/// (unless `keep_tasks_on_exit` is off), to be re-adopted by the next start on the data dir.
pub async fn run_agent(
    cfg: NodeConfig,
    ready: impl FnOnce(&Bound),
    shutdown: impl Future<Output = ()>,
) -> Result<(), NodeError> {
    let node_id = ensure_data_dir(&cfg)?;
    let rpc_advertised = SocketAddr::new(cfg.advertise, cfg.rpc.port());
    let gossip = start_gossip(&cfg, &node_id, crate::gossip::Role::Agent, rpc_advertised).await?;
    let coords =
        Arc::new(crate::api::consul_coordinate::Coordinates::new(&cfg.node, &cfg.datacenter, seed(cfg.clock.as_ref())));
    let (agent_rpc, prober) = start_agent_coordinates(&cfg, &node_id, &gossip, &coords).await;
    let outbox_path = cfg.data_dir.join("outbox.jsonl");
    let outbox = crate::cluster::outbox::Outbox::open(&outbox_path)
        .map_err(|source| NodeError::DataDir { path: outbox_path.clone(), source })?;
    let (up_tx, up_rx) = tokio::sync::mpsc::channel(1024);
    let uplink_cfg = crate::cluster::uplink::UplinkConfig {
        agent: AgentId::from(cfg.node.as_str()),
        node_id,
        datacenter: cfg.datacenter.clone(),
        servers: Arc::new(std::sync::Mutex::new(cfg.servers.clone())),
        transport: Arc::new(crate::rpc::TcpTransport { bind: Some(cfg.advertise) }),
    };
    let servers_task = follow_servers(&gossip, cfg.servers.clone(), uplink_cfg.servers.clone());
    let (link, mut pending, uplink_join) = crate::cluster::uplink::spawn(uplink_cfg, outbox, up_rx);
    let (published, status, replica_join) = crate::cluster::replica::spawn(
        &cfg.datacenter,
        link.clone(),
        Some(cfg.data_dir.join("replica.snap")),
        cfg.clock.clone(),
    );
    let control = ControlHandle::from_parts(up_tx, published.clone());

    let (events_tx, events_rx) = tokio::sync::mpsc::channel(1024);
    let (runtime, runtimes, process, docker) = build_runtimes(&cfg, events_tx).await?;
    let agent = agent::start(agent_config(&cfg, runtimes), runtime, events_rx, control.clone()).await?;
    let sandbox_gc = process.spawn_gc(cfg.gc);
    let registrator = start_registrator(&cfg, docker.is_some(), &control).await;

    let catalog = PublishedCatalog { catalog: published.catalog.clone(), hooks: published.catalog_hooks.clone() };
    let (dns, dns_addr) = start_dns(&cfg, catalog.clone(), vec![cfg.node.clone()]).await?;
    let container_dns = start_container_dns(&cfg, docker.as_deref(), catalog.clone()).await;
    let registrations =
        Arc::new(crate::cluster::antientropy::Registrations::open(cfg.data_dir.join("agent-registrations.json")));
    let antientropy = crate::cluster::antientropy::spawn(
        registrations.clone(),
        cfg.node.clone(),
        published.clone(),
        link.clone(),
        status.clone(),
    );
    let forwarder = crate::cluster::forward::Forwarder {
        link,
        node: cfg.node.clone(),
        published: published.clone(),
        status,
        registrations,
    };
    let loopback = api::Loopback::default();
    let agent_router = |info| {
        let cluster: Arc<dyn crate::api::ClusterOps> =
            Arc::new(crate::cluster::ops::GossipOps { gossip: gossip.clone(), wan: None });
        api::router(Api {
            cluster: Some(cluster),
            loopback: loopback.clone(),
            coordinates: coords.clone(),
            ..Api::new(control.clone(), info)
        })
        .layer(axum::middleware::from_fn_with_state(forwarder.clone(), crate::cluster::forward::layer))
    };
    let http = start_http(&cfg, agent_router).await?;
    let own = agent_router(node_info(&cfg, &http.addrs));
    let _ = loopback.set(own.clone());
    set_dns_lookup(&dns_lookup(&cfg, own), [Some(&dns), container_dns.as_ref()]);
    let bound = Bound { http: http.addrs.clone(), dns: dns_addr };
    info!(http = ?bound.http, dns = %bound.dns, servers = ?cfg.servers, node = %cfg.node, dc = %cfg.datacenter, "mesh agent ready");
    ready(&bound);

    shutdown.await;
    info!("shutting down");
    let tasks_done = async {
        let mode = if cfg.keep_tasks_on_exit { StopMode::LeaveTasks } else { StopMode::KillTasks };
        agent.stop(mode).await;
    };
    tokio::join!(http.stop(), tasks_done);
    stop_node_services(sandbox_gc, registrator, dns, container_dns).await;
    // What the agent reported while stopping (its goodbye last) reaches the server, if one is
    // there to take it (bounded); the rest waits in the outbox for the next start.
    drop(control);
    let _ = tokio::time::timeout(Duration::from_secs(3), pending.wait_for(|p| *p == 0)).await;
    uplink_join.abort();
    replica_join.abort();
    servers_task.abort();
    antientropy.abort();
    prober.abort();
    drop(agent_rpc);

    if !cfg.keep_tasks_on_exit {
        // It stopped its tasks: a graceful leave (the others see it left, not failed).
        let _ = gossip.leave().await;
    }
    gossip.shutdown().await;
    info!("stopped");

    Ok(())
}

/// How this node's DNS looks up names beyond its catalog (other datacenters, prepared queries,
/// failover): through `router`, its own HTTP API.
fn dns_lookup(cfg: &NodeConfig, router: axum::Router) -> Arc<dyn crate::dns::RemoteLookup> {
    Arc::new(crate::dns_remote::HttpLookup {
        router,
        datacenter: cfg.datacenter.clone(),
        only_passing: cfg.dns_options.only_passing,
        translate_wan: cfg.dns_options.translate_wan_addrs,
    })
}

/// Gives `lookup` to each of this node's DNS servers.
fn set_dns_lookup<'a>(
    lookup: &Arc<dyn crate::dns::RemoteLookup>,
    servers: impl IntoIterator<Item = Option<&'a DnsServer>>,
) {
    for dns in servers.into_iter().flatten() {
        dns.set_remote(lookup.clone());
    }
}

/// Measure this node's network coordinate in a pool (`wan`: the WAN pool of servers, every
/// second at most; the LAN: every gossip probe period, as Consul's LAN coordinates come with
/// its gossip probes).
fn spawn_prober(
    cfg: &NodeConfig,
    wan: bool,
    pool: &crate::gossip::Gossip,
    coords: &Arc<crate::api::consul_coordinate::Coordinates>,
    transport: Arc<dyn crate::rpc::Transport>,
    hello: crate::rpc::Hello,
) -> tokio::task::JoinHandle<()> {
    let (me, period) = if wan {
        (format!("{}.{}", cfg.node, cfg.datacenter), cfg.gossip_wan_timing.probe_period.min(Duration::from_secs(1)))
    } else {
        (cfg.node.clone(), cfg.gossip_timing.probe_period)
    };
    crate::cluster::coords::spawn(crate::cluster::coords::ProberConfig {
        wan,
        me,
        coords: coords.clone(),
        members: pool.subscribe(),
        transport,
        hello,
        period,
        clock: cfg.clock.clone(),
        seed: seed(cfg.clock.as_ref()),
    })
}

/// An agent's network coordinate: its RPC listener, which serves the LAN coordinate exchange
/// (best effort: when the address is taken, as by a server on the same address, the agent
/// still measures its own coordinate but is not measured by others), and its prober.
async fn start_agent_coordinates(
    cfg: &NodeConfig,
    node_id: &str,
    gossip: &crate::gossip::Gossip,
    coords: &Arc<crate::api::consul_coordinate::Coordinates>,
) -> (Option<crate::rpc::Server>, tokio::task::JoinHandle<()>) {
    let transport = Arc::new(crate::rpc::TcpTransport { bind: Some(cfg.advertise) });
    let hello = crate::rpc::Hello {
        node: cfg.node.clone(),
        node_id: node_id.to_owned(),
        datacenter: cfg.datacenter.clone(),
        role: crate::rpc::Role::Agent,
        http: None,
    };
    let handler =
        Arc::new(crate::cluster::coords::AgentHandler { coords: coords.clone(), datacenter: cfg.datacenter.clone() });
    let server = match crate::rpc::Transport::listen(transport.as_ref(), cfg.rpc).await {
        Ok(l) => match crate::rpc::Server::start(l, hello.clone(), handler) {
            Ok(s) => Some(s),
            Err(e) => {
                warn!(addr = %cfg.rpc, error = %e, "no RPC listener: other nodes cannot measure their distance to this one");
                None
            }
        },
        Err(e) => {
            warn!(addr = %cfg.rpc, error = %e, "no RPC listener: other nodes cannot measure their distance to this one");
            None
        }
    };
    (server, spawn_prober(cfg, false, gossip, coords, transport, hello))
}

/// Join the datacenter's LAN gossip pool.
async fn start_gossip(
    cfg: &NodeConfig,
    node_id: &str,
    role: crate::gossip::Role,
    rpc: SocketAddr,
) -> Result<crate::gossip::Gossip, NodeError> {
    start_pool(lan_pool(cfg, node_id, role, rpc), "gossip").await
}

/// This node's place in its datacenter's LAN pool.
fn lan_pool(
    cfg: &NodeConfig,
    node_id: &str,
    role: crate::gossip::Role,
    rpc: SocketAddr,
) -> crate::gossip::GossipConfig {
    crate::gossip::GossipConfig {
        node: cfg.node.clone(),
        node_id: node_id.to_owned(),
        datacenter: cfg.datacenter.clone(),
        pool: None,
        role,
        bind: cfg.serf_lan,
        advertise: SocketAddr::new(cfg.advertise, cfg.serf_lan.port()),
        rpc,
        join: cfg.join.clone(),
        timing: cfg.gossip_timing.clone(),
        seed: seed(cfg.clock.as_ref()),
        generation: None,
    }
}

/// Join the WAN pool: the servers of every datacenter, as `<node>.<datacenter>`, with WAN
/// timing (Consul's `serf_wan`). Nothing is replicated through it: it tells each datacenter
/// which others exist and which of their servers are alive.
async fn start_wan_gossip(
    cfg: &NodeConfig,
    node_id: &str,
    rpc: SocketAddr,
) -> Result<crate::gossip::Gossip, NodeError> {
    let gc = crate::gossip::GossipConfig {
        node: format!("{}.{}", cfg.node, cfg.datacenter),
        pool: Some(crate::gossip::WAN_POOL.to_owned()),
        bind: cfg.serf_wan,
        advertise: SocketAddr::new(cfg.advertise_wan.unwrap_or(cfg.advertise), cfg.serf_wan.port()),
        join: cfg.join_wan.clone(),
        timing: cfg.gossip_wan_timing.clone(),
        ..lan_pool(cfg, node_id, crate::gossip::Role::Server, rpc)
    };
    start_pool(gc, "WAN gossip").await
}

/// Start a gossip pool; `what` names it in errors.
async fn start_pool(gc: crate::gossip::GossipConfig, what: &str) -> Result<crate::gossip::Gossip, NodeError> {
    crate::gossip::Gossip::start(gc).await.map_err(|e| match e {
        crate::gossip::GossipError::Bind { addr, source } => NodeError::Bind { addr, source },
        other => NodeError::Unsupported(format!("{what}: {other}")),
    })
}

/// The servers' RPC addresses gossip knows (alive ones), kept in `servers` beside the static
/// ones (`--server`), for the agent's uplink.
fn follow_servers(
    gossip: &crate::gossip::Gossip,
    fixed: Vec<SocketAddr>,
    servers: Arc<std::sync::Mutex<Vec<SocketAddr>>>,
) -> tokio::task::JoinHandle<()> {
    let mut members = gossip.subscribe();
    tokio::spawn(async move {
        loop {
            let mut list = fixed.clone();
            for m in members.borrow_and_update().iter() {
                if m.role == crate::gossip::Role::Server
                    && m.status == crate::gossip::MemberStatus::Alive
                    && !list.contains(&m.rpc)
                {
                    list.push(m.rpc);
                }
            }
            *servers.lock().unwrap_or_else(|e| e.into_inner()) = list;
            if members.changed().await.is_err() {
                return;
            }
        }
    })
}

/// Tell the control loop what gossip says of the members (failed agents are lost at once).
fn report_members(gossip: &crate::gossip::Gossip, control: ControlHandle) -> tokio::task::JoinHandle<()> {
    let mut members = gossip.subscribe();
    tokio::spawn(async move {
        loop {
            let list = members.borrow_and_update().clone();
            if control.send(crate::control::ControlMsg::Members(list)).await.is_err() {
                return;
            }
            if members.changed().await.is_err() {
                return;
            }
        }
    })
}

/// Where a node answers DNS for its containers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ContainerDns {
    /// On port 53 of the gateway of the containers' Docker network.
    Auto,
    /// On port 53 of this address.
    At(IpAddr),
    /// Not at all: containers keep Docker's resolver.
    Off,
}

/// Answer DNS for containers on port 53 of an address they reach, and give every container
/// started from now on that resolver with the search domain `service.<domain>`, so a process in
/// a container reaches `web.service.<domain>` or just `web`. Best effort: without it (no
/// Docker, the port taken, not root) containers keep Docker's resolver and the node says so.
async fn start_container_dns(
    cfg: &NodeConfig,
    docker: Option<&DockerRuntime>,
    catalog: PublishedCatalog,
) -> Option<DnsServer> {
    let docker = docker?;
    let mut net = mesh_core::runtime::docker::ContainerNetwork {
        network: cfg.docker_network.clone(),
        dns: None,
        dns_search: vec![format!("service.{}", cfg.domain)],
    };
    let ip = match cfg.container_dns {
        ContainerDns::Off => None,
        ContainerDns::At(ip) => Some(ip),
        ContainerDns::Auto => match docker.network_gateway(cfg.docker_network.as_deref()).await {
            Ok(ip) => Some(ip),
            Err(e) => {
                warn!(error = %e, "no DNS for containers: cannot find their network's gateway");
                None
            }
        },
    };
    let server = match ip {
        None => None,
        Some(ip) => {
            let addr = SocketAddr::new(ip, 53);
            let servers = vec![cfg.node.clone()];
            match start_dns(&NodeConfig { dns: addr, ..cfg.clone() }, catalog, servers).await {
                Ok((dns, _)) => {
                    info!(%addr, search = ?net.dns_search, "DNS for containers");
                    net.dns = Some(ip);
                    Some(dns)
                }
                Err(e) => {
                    warn!(error = %e, "no DNS for containers (they keep Docker's resolver)");
                    None
                }
            }
        }
    };
    docker.set_network(net);
    server
}

/// The control loop's settings from a node's.
fn control_config(cfg: &NodeConfig) -> ControlConfig {
    ControlConfig {
        datacenter: cfg.datacenter.clone(),
        tick: Duration::from_millis(200),
        seed: seed(cfg.clock.as_ref()),
        mesos: crate::control::MesosConfig {
            host_access: cfg.host_access.clone(),
            hostname: cfg.node.clone(),
            ..cfg.mesos.clone()
        },
        agent_down_after: cfg.agent_down_after,
        reregister_timeout: cfg.reregister_timeout,
        clock: cfg.clock.clone(),
        ..Default::default()
    }
}

/// Stop what a node that runs tasks has beside its agent: the sandbox GC, the Registrator
/// watcher, and its DNS listeners.
async fn stop_node_services(
    sandbox_gc: tokio::task::AbortHandle,
    registrator: Option<registrator::Registrator>,
    dns: DnsServer,
    container_dns: Option<DnsServer>,
) {
    sandbox_gc.abort();
    if let Some(r) = registrator {
        r.shutdown().await;
    }
    dns.shutdown().await;
    if let Some(d) = container_dns {
        d.shutdown().await;
    }
}

#[cfg(test)]
mod advertised_http_tests {
    use super::advertised_http;
    use std::net::{IpAddr, SocketAddr};

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_fixed_port_listener_is_given_out_before_a_port_zero_one() {
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        // Bound to port 0 first, then a fixed port: the fixed one survives a restart.
        let got =
            advertised_http(&[a("10.0.0.1:0"), a("10.0.0.1:8500")], &[a("10.0.0.1:41234"), a("10.0.0.1:8500")], ip);
        assert_eq!(got, Some(a("10.0.0.1:8500")));
        // Only port 0: the port it got.
        assert_eq!(advertised_http(&[a("10.0.0.1:0")], &[a("10.0.0.1:41234")], ip), Some(a("10.0.0.1:41234")));
        // Several fixed ports: the first, as before.
        let got =
            advertised_http(&[a("10.0.0.1:8080"), a("10.0.0.1:8500")], &[a("10.0.0.1:8080"), a("10.0.0.1:8500")], ip);
        assert_eq!(got, Some(a("10.0.0.1:8080")));
        assert_eq!(advertised_http(&[], &[], ip), None);
    }

    #[test]
    fn a_wildcard_listener_is_given_out_as_the_advertised_address() {
        let ip: IpAddr = "10.0.0.7".parse().unwrap();
        assert_eq!(advertised_http(&[a("0.0.0.0:8500")], &[a("0.0.0.0:8500")], ip), Some(a("10.0.0.7:8500")));
        let any: IpAddr = "0.0.0.0".parse().unwrap();
        assert_eq!(advertised_http(&[a("0.0.0.0:8500")], &[a("0.0.0.0:8500")], any), Some(a("0.0.0.0:8500")));
    }
}
