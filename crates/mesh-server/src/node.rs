//! Assembling a node. `mesh dev` runs everything in one process: the control side (state log,
//! allocator, Marathon scheduler), one agent with its runtime, the HTTP APIs and the DNS server.
//! Control and agent still talk only through [`mesh_core::proto`] messages.

use crate::agent::{self, AgentConfig, StopMode};
use crate::api::{self, Api, NodeInfo};
use crate::control::{self, ControlConfig};
use crate::dns::{DnsServer, PublishedCatalog};
use crate::registrator;
use mesh_core::dns::DnsConfig;
use mesh_core::model::{AgentId, PortRanges, Resources, now_millis};
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

/// The node id of a data dir (`<data dir>/node-id`): a UUID generated on first use and kept, so
/// that two nodes with the same name (on one Docker engine) never take each other's containers.
pub fn node_id(data_dir: &std::path::Path) -> Result<String, NodeError> {
    let path = data_dir.join("node-id");
    let err = |source| NodeError::DataDir { path: path.clone(), source };
    match std::fs::read_to_string(&path) {
        Ok(id) if !id.trim().is_empty() => return Ok(id.trim().to_owned()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    let id = uuid::Uuid::new_v4().to_string();
    let tmp = data_dir.join("node-id.tmp");
    std::fs::write(&tmp, format!("{id}\n")).map_err(err)?;
    std::fs::rename(&tmp, &path).map_err(err)?;
    info!(node_id = %id, "generated the node id of this data dir");
    Ok(id)
}

/// Run a `mesh dev` node until `shutdown` resolves. `ready` is called with the bound addresses
/// once every API answers.
pub async fn run_dev(
    cfg: NodeConfig,
    ready: impl FnOnce(&Bound),
    shutdown: impl Future<Output = ()>,
) -> Result<(), NodeError> {
    std::fs::create_dir_all(&cfg.data_dir)
        .map_err(|source| NodeError::DataDir { path: cfg.data_dir.clone(), source })?;
    let log = WalLog::open_data_dir(&cfg.data_dir, cfg.state_reserve_mb.saturating_mul(1024 * 1024))?;
    let mut store = Store::open(Box::new(log), &cfg.datacenter)?;
    store.set_max_versions(cfg.max_app_versions);
    info!(
        apps = store.state().apps.len(),
        tasks = store.state().tasks.len(),
        index = store.state().index,
        "state loaded"
    );
    let (control, control_join) = control::spawn(
        store,
        ControlConfig {
            datacenter: cfg.datacenter.clone(),
            tick: Duration::from_millis(200),
            seed: now_millis(),
            mesos: crate::control::MesosConfig {
                host_access: cfg.host_access.clone(),
                hostname: cfg.node.clone(),
                ..cfg.mesos.clone()
            },
        },
    );

    // Runtimes and agent: plain processes always; Docker when an engine answers (auto) or
    // when asked for (docker).
    let (events_tx, events_rx) = tokio::sync::mpsc::channel(1024);
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
    let docker: Option<Arc<dyn Runtime>> = if docker_wanted {
        let node_id = node_id(&cfg.data_dir)?;
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
    let multi = MultiRuntime::new(process.clone(), docker.clone());
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
    let agent_cfg = AgentConfig {
        id: AgentId::from(cfg.node.as_str()),
        hostname: cfg.node.clone(),
        address: cfg.advertise,
        resources: Resources {
            cpus: cfg.cpus,
            mem: cfg.mem,
            disk: cfg.disk,
            ports: PortRanges::range(cfg.ports.0, cfg.ports.1),
        },
        attributes: cfg.attributes.clone(),
        runtimes,
        enable_script_checks: cfg.enable_script_checks,
    };
    let agent = agent::start(agent_cfg, runtime, events_rx, control.clone()).await?;
    // Only after recovery: sandboxes of tasks the agent re-adopted are never candidates.
    let sandbox_gc = process.spawn_gc(cfg.gc);

    // Registrator: every container on this engine with published ports is a service instance.
    let registrator = match (cfg.registrator, docker.is_some() || DockerRuntime::available().await) {
        (true, true) => match bollard::Docker::connect_with_local_defaults() {
            Ok(d) => {
                let opts = RegistratorOptions { node: cfg.node.clone(), ..Default::default() };
                Some(registrator::spawn(d, AgentId::from(cfg.node.as_str()), control.clone(), opts))
            }
            Err(e) => {
                warn!(error = %e, "registrator not started");
                None
            }
        },
        _ => None,
    };

    // DNS.
    let (udp, tcp) = bind_dns(cfg.dns).await?;
    let dns_addr = udp.local_addr().map_err(|source| NodeError::Bind { addr: cfg.dns, source })?;
    let dns_cfg = DnsConfig {
        domain: cfg.domain.clone(),
        datacenter: cfg.datacenter.clone(),
        servers: vec![cfg.node.clone()],
        ..cfg.dns_options.clone()
    };
    let catalog =
        PublishedCatalog { catalog: control.published.catalog.clone(), hooks: control.published.catalog_hooks.clone() };
    let dns = DnsServer::start(udp, tcp, catalog, dns_cfg)
        .await
        .map_err(|source| NodeError::Bind { addr: cfg.dns, source })?;

    // HTTP.
    let mut listeners = Vec::new();
    for addr in &cfg.http {
        let l = tokio::net::TcpListener::bind(addr).await.map_err(|source| NodeError::Bind { addr: *addr, source })?;
        listeners.push(l);
    }
    let http_addrs: Vec<SocketAddr> = listeners.iter().filter_map(|l| l.local_addr().ok()).collect();
    let info = NodeInfo {
        node: cfg.node.clone(),
        datacenter: cfg.datacenter.clone(),
        http_addr: http_addrs.first().map(|a| a.to_string()).unwrap_or_default(),
        domain: cfg.domain.clone(),
        started_at: now_millis(),
        host_access: cfg.host_access.clone(),
        enable_script_checks: cfg.enable_script_checks,
    };
    let router = api::router(Api {
        control: control.clone(),
        info,
        cluster: None,
        user_events: Default::default(),
        coordinates: Default::default(),
        autopilot: Default::default(),
    });
    let (stop_http_tx, stop_http_rx) = tokio::sync::watch::channel(false);
    let http = crate::serve::Http::new(cfg.http_limits.clone());
    let trimmer = http.spawn_trimmer();
    let mut servers = Vec::new();
    for l in listeners {
        servers.push(tokio::spawn(crate::serve::serve(l, router.clone(), http.clone(), stop_http_rx.clone())));
    }
    // The control plane's own service, as Consul servers register `consul` (clients look for it).
    let own = mesh_core::catalog::ServiceInstance {
        id: "consul".into(),
        service: "consul".into(),
        node: cfg.node.clone(),
        address: None,
        port: http_addrs.first().map(|a| a.port()).unwrap_or(0),
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
        tagged_addresses: Default::default(),
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
    let bound = Bound { http: http_addrs, dns: dns_addr };
    info!(http = ?bound.http, dns = %bound.dns, node = %cfg.node, dc = %cfg.datacenter, "mesh dev ready");
    ready(&bound);

    shutdown.await;
    info!("shutting down");
    let _ = stop_http_tx.send(true);
    // One deadline for all listeners: they share the connections they wait for. Tasks are
    // stopped meanwhile, so a shutdown takes the longest of the two, not their sum.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let http_done = async {
        for s in servers {
            let _ = tokio::time::timeout_at(deadline, s).await;
        }
    };
    let tasks_done = async {
        control.drain().await;
        let mode = if cfg.keep_tasks_on_exit { StopMode::LeaveTasks } else { StopMode::KillTasks };
        agent.stop(mode).await;
    };
    tokio::join!(http_done, tasks_done);
    trimmer.abort();
    sandbox_gc.abort();
    if let Some(r) = registrator {
        r.shutdown().await;
    }
    dns.shutdown().await;
    // Let the control loop apply the last status updates, then stop it.
    drop(control);
    control_join.abort();
    let _ = control_join.await;
    info!("stopped");
    Ok(())
}
