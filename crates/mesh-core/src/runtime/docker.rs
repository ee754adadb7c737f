//! The Docker runtime: every task is one container of the local Docker engine, driven through
//! its HTTP API ([`bollard`]).
//!
//! # Naming and labels
//!
//! A task's container is named `mesh-<task id>` ([`container_name`]; characters Docker does
//! not allow in names become `-`, and then a short hash of the real id is appended so two ids
//! never share a name). Every container carries the labels
//!
//! - `mesh.task=<task id>`, `mesh.node=<node name>` and `mesh.node-id=<node id>`: the node id
//!   is generated once per data dir (`<data dir>/node-id`, a UUID) and is what this runtime
//!   adopts, watches and kills by: only containers with its own node id, so several nodes can
//!   share one engine even under the same name (the name defaults to the host name). When
//!   [`DockerRuntime::connect`] finds running containers with its name but another node id (or
//!   none: made by a mesh without node ids) it logs a warning naming them and leaves them alone;
//!   they are never adopted or removed by this node (remove them by hand if they are leftovers);
//! - `mesh.ports=<p1,p2,...>`: the host ports the scheduler assigned (for [`Runtime::recover`]);
//! - `mesh.labels=<JSON object>`: the spec's labels exactly as launched (for `recover`);
//! - every entry of `spec.labels` (`mesh.app`, `mesh.app_version`, ...) and of the `label`
//!   parameters, so `docker ps --filter label=mesh.app=/web` works.
//!
//! # Launching
//!
//! [`Runtime::launch`] pulls the image when it is missing (or `force_pull` is set; with
//! `force_pull` and a local copy, a failed pull falls back to the local copy). A pull is bounded
//! by [`PULL_TIMEOUT`]; when it fails the task fails at once with the message
//! `image <image> is not on this node and could not be pulled: <error>`. The container is then
//! created and started:
//!
//! - `Command::Shell(s)` runs as entrypoint `["/bin/sh", "-c"]`, cmd `[s]`; `Command::Args(v)`
//!   becomes the cmd and keeps the image's entrypoint (an empty `v` keeps the image's cmd).
//! - `NetworkMode::Bridge` publishes every port mapping as `<container port>/<proto>` on
//!   `0.0.0.0:<host port>` (`udp,tcp` publishes both); `Host` shares the host's network; `None`
//!   has none.
//! - `mem` is the memory limit (and the memory+swap limit, so no swap), `cpus` becomes
//!   `NanoCpus`, the kill grace becomes the container's stop timeout, volumes become binds
//!   (`host:container[:ro]`), `privileged` is passed through.
//! - `parameters` (Marathon's `docker.parameters`, the `docker run` long options) are applied;
//!   the supported keys are exactly [`ALLOWED_PARAMETERS`]: `label` (`k=v`), `env` (`K=V`),
//!   `hostname`, `user`, `workdir`, `add-host` (`host:ip`), `dns` (an address), `ulimit`
//!   (`name=soft[:hard]`), `cap-add`, `cap-drop`, `read-only` and `init` (`true`/`false`, empty
//!   means true). Any other key, or a malformed value, fails the launch.
//!
//! A name left over from an earlier container of the same task id that no longer runs is
//! removed and the create retried; a running one fails the launch.
//!
//! # Watching: events plus periodic listing
//!
//! One background task follows the engine's event stream filtered to this node's mesh
//! containers (`die`, `oom`, `destroy`); after a stream error it reconnects with `since` set to
//! the time of the last event seen, so nothing is missed across a reconnect. Because events can
//! still be lost (daemon restarts, an undecodable event), a second background task lists this
//! node's mesh containers every [`RECONCILE_EVERY`] and ends every watched task whose container
//! is gone or not running. Either path ends a task through the same code, which claims it
//! first, so each task reports [`RuntimeEvent::Exited`] exactly once:
//!
//! - the container is inspected: `Exit::Code(State.ExitCode)` with the message
//!   `exited with status N`, or, when `State.OOMKilled` is set or an `oom` event was seen,
//!   `memory limit of N MiB exceeded (OOM killed)`. The engine can learn of an OOM kill late or
//!   never (under load), so for a task with a memory limit the runtime also registers for the
//!   kernel's OOM notification of the container's memory cgroup (cgroup v1, as root; see
//!   `memcg`), which decides a 137 that mesh did not cause; without it such a 137 waits up to
//!   5 s for the engine. A container that vanished (removed behind
//!   the runtime's back) ends with the exit code of its `die` event if one was seen, else
//!   [`Exit::Unknown`];
//! - the container is removed (forced), so its name can be reused, and then `Exited` is sent.
//!
//! `Started` is always sent before `Exited`, even for a container that dies at once.
//!
//! # Logs and disk
//!
//! With [`DockerRuntime::set_log_rotation`] a container logs through the `json-file` driver
//! with `max-size`/`max-file` set, the same bound as the process runtime's logger (the engine
//! rotates; `docker logs` shows the kept part). A task with `disk > 0` carries the label
//! `mesh.disk` and its container's writable layer (`SizeRw` of an inspect with `size=true`,
//! what `docker ps -s` shows) is measured every [`DockerRuntime::set_disk_watch_interval`];
//! above the limit the container is SIGKILLed and the task ends with `killed: false` and the
//! message `disk limit of N MiB exceeded (used M MiB); exited with status 137`. Not counted:
//! bind-mounted volumes (host paths, not the container's) and the engine's log files (bounded
//! by rotation instead).
//!
//! # Killing and recovery
//!
//! [`Runtime::kill`] marks the task killed and asks Docker to stop the container with
//! `t = grace` (rounded up to whole seconds): SIGTERM to its PID 1, SIGKILL after the grace
//! (exit code 137). It returns at once; the end is reported by the watchers as
//! `Exited { killed: true }`. Killing again does not send a second SIGTERM, but a shorter grace
//! brings the SIGKILL forward. Unknown or ended tasks are `Ok(())`. The stop request runs on a
//! client whose per-request timeout is longer than the grace (bollard's default would cut a
//! long stop short).
//!
//! A container's labels are written by the engine atomically with the container itself, so
//! there is no window in which a container exists without the record a restart needs: a
//! container created but not started when the agent died is found by the next `recover` (not
//! running: removed), one started but not yet reported is adopted (and killed by the control
//! side if the state does not know its task).
//!
//! Dropping a [`DockerRuntime`] stops watching and leaves the containers running. A new runtime
//! with the same node id adopts them with [`Runtime::recover`]: running containers labelled with
//! its node are watched again and returned (their labels from `mesh.labels`, ports from
//! `mesh.ports`, else from the port bindings); containers of the node that no longer run are
//! removed and not returned. Recovery sends no `Started` events.
//!
//! # Daemon quirks
//!
//! bollard 0.21.1 sends unversioned request paths, so the engine answers with its own API
//! version (1.41 for Docker 20.10, the engine this was written against); the request bodies it
//! serialises only set fields 1.41 knows.

use super::logger::LogRotation;
use super::{Command, ContainerSpec, Exit, NetworkMode, RecoveredTask, Runtime, RuntimeError, RuntimeEvent, TaskSpec};
use crate::model::{TaskId, now_millis};
use bollard::Docker;
use bollard::errors::Error as DockerError;
use bollard::models::{
    ContainerCreateBody, ContainerSummaryStateEnum, EventMessage, HostConfig, HostConfigLogConfig, PortBinding,
    ResourcesUlimits,
};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, CreateImageOptionsBuilder, EventsOptionsBuilder, InspectContainerOptions,
    InspectContainerOptionsBuilder, KillContainerOptionsBuilder, ListContainersOptionsBuilder,
    RemoveContainerOptionsBuilder, StartContainerOptions, StopContainerOptionsBuilder,
};
use futures_util::StreamExt;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, watch};
use tokio::task::AbortHandle;

mod memcg;

/// The `docker.parameters` keys this runtime implements (see the [module docs](self)); the API
/// layer rejects the others.
pub const ALLOWED_PARAMETERS: &[&str] = &[
    "label",
    "env",
    "hostname",
    "user",
    "workdir",
    "add-host",
    "dns",
    "ulimit",
    "cap-add",
    "cap-drop",
    "read-only",
    "init",
];

/// The task id label.
pub const LABEL_TASK: &str = "mesh.task";
/// The node label (the node's name, for people and `docker ps --filter`).
pub const LABEL_NODE: &str = "mesh.node";
/// The node id label: what a runtime adopts, watches and kills by (see the [module docs](self)).
pub const LABEL_NODE_ID: &str = "mesh.node-id";
/// The host ports label (comma separated).
pub const LABEL_PORTS: &str = "mesh.ports";
/// The spec's labels as a JSON object.
pub const LABEL_LABELS: &str = "mesh.labels";
/// The task's disk limit in MiB, when it has one (so an adopted container is still measured).
pub const LABEL_DISK: &str = "mesh.disk";

/// How long [`DockerRuntime::connect`] and [`DockerRuntime::available`] wait for the engine.
pub const PING_TIMEOUT: Duration = Duration::from_secs(2);
/// The longest an image pull may take before the launch fails.
pub const PULL_TIMEOUT: Duration = Duration::from_secs(60);
/// How often the watched tasks are checked against the engine's container list.
pub const RECONCILE_EVERY: Duration = Duration::from_secs(3);
/// bollard's per-request timeout (until the response headers) for ordinary requests.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Added to the grace for the stop request's timeout.
const STOP_MARGIN: Duration = Duration::from_secs(30);
/// The grace of a re-adopted container whose stop timeout cannot be read.
const DEFAULT_RECOVERED_GRACE: Duration = Duration::from_secs(3);
/// How long an unexplained 137 (with a memory limit) waits for the engine to report an OOM
/// kill, when the runtime has no memory cgroup notification of its own.
const ENGINE_OOM_WAIT: Duration = Duration::from_secs(5);
/// How long an exited container's memory cgroup notification waits for the kernel's removal
/// notification when it cannot tell one OOM from the removal alone (see [`memcg`]).
const MEMCG_REMOVAL_WAIT: Duration = Duration::from_secs(2);
/// How often a starting container's memory cgroup is looked for.
const MEMCG_POLL: Duration = Duration::from_millis(2);

/// How long `kill_all` waits beyond the grace period.
const KILL_ALL_MARGIN: Duration = Duration::from_secs(10);
/// Pause before reconnecting the event stream.
const EVENTS_RETRY: Duration = Duration::from_secs(1);
const MIB: f64 = 1024.0 * 1024.0;

/// Runs tasks as Docker containers; see the [module docs](self).
pub struct DockerRuntime {
    inner: Arc<Inner>,
    background: Vec<AbortHandle>,
    /// Node ids (or `"none"`) of other nodes with this node's name that run containers here.
    name_clashes: Vec<String>,
}

struct Inner {
    docker: Docker,
    node: String,
    node_id: String,
    events: mpsc::Sender<RuntimeEvent>,
    tasks: Mutex<HashMap<TaskId, Arc<Watched>>>,
    /// Task ids between the start of `launch` and their entry in `tasks` (or failure).
    launching: Mutex<HashSet<TaskId>>,
    /// Rotation of container logs (`json-file` `max-size`/`max-file`); `None` keeps the engine's default.
    log_rotation: Mutex<Option<LogRotation>>,
    /// How often the writable layer of a container with a `disk` limit is measured.
    disk_watch_interval: Mutex<Duration>,
    /// Where containers run and resolve names (see [`DockerRuntime::set_network`]).
    network: Mutex<ContainerNetwork>,
}

/// The Docker network of bridge-mode containers and the DNS server every container is given.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ContainerNetwork {
    /// The network bridge-mode containers join (`None`: Docker's `bridge`).
    pub network: Option<String>,
    /// The node's DNS server for containers (`--dns`), unless a task sets its own `dns`.
    pub dns: Option<std::net::IpAddr>,
    /// Search domains for containers (`--dns-search`), e.g. `service.mesh`, so a short name
    /// such as `web` resolves.
    pub dns_search: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Created, `Started` not sent yet.
    Starting,
    /// `Started` sent (or adopted by `recover`).
    Running,
    /// The launch failed; `launch` reports it, the watchers stay silent.
    Failed,
}

/// One watched task.
struct Watched {
    task_id: TaskId,
    /// The container id (full).
    container: String,
    /// The container name (for messages).
    name: String,
    mem: f64,
    /// The task's own grace period (`kill_all` gives each task its own).
    grace: Duration,
    phase: watch::Sender<Phase>,
    /// Set once `kill` was asked for.
    killed: AtomicBool,
    /// The shortest grace asked for so far, in ms (`u64::MAX`: no kill yet).
    kill_grace_ms: AtomicU64,
    /// An `oom` event was seen.
    oom: AtomicBool,
    /// The kernel's OOM notifications for the container's memory cgroup, when they can be had
    /// (see [`memcg`]); registered as the container starts ([`watch_memcg`]).
    memcg: OnceLock<memcg::OomWatch>,
    /// The exit code of a `die` event, if one was seen.
    die_code: Mutex<Option<i32>>,
    /// Set by whoever ends the task first (events, reconcile): the end is reported once.
    claimed: AtomicBool,
    /// Becomes true once `Exited` was sent.
    done: watch::Sender<bool>,
    /// Set when the runtime killed the container for using more than its `disk`: the start of
    /// the `Exited` message, and the end is a failure, not a kill that was asked for.
    limit_exceeded: Mutex<Option<String>>,
}

impl Watched {
    fn new(task_id: TaskId, container: String, name: String, mem: f64, grace: Duration, phase: Phase) -> Arc<Self> {
        Arc::new(Self {
            task_id,
            container,
            name,
            mem,
            grace,
            phase: watch::channel(phase).0,
            killed: AtomicBool::new(false),
            kill_grace_ms: AtomicU64::new(u64::MAX),
            oom: AtomicBool::new(false),
            memcg: OnceLock::new(),
            die_code: Mutex::new(None),
            claimed: AtomicBool::new(false),
            done: watch::channel(false).0,
            limit_exceeded: Mutex::new(None),
        })
    }

    /// Waits until the launch is over; false when it failed.
    async fn launched(&self) -> bool {
        let mut rx = self.phase.subscribe();
        let phase = match rx.wait_for(|p| *p != Phase::Starting).await {
            Ok(p) => *p,
            Err(_) => Phase::Failed,
        };
        phase == Phase::Running
    }
}

/// The container name of a task: `mesh-<task id>`, with characters Docker does not allow in a
/// name replaced by `-` and, if any were, a hash of the id appended.
pub fn container_name(task_id: &TaskId) -> String {
    let id = task_id.as_str();
    let clean: String =
        id.chars().map(|c| if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-') { c } else { '-' }).collect();
    if clean == id && !id.is_empty() {
        format!("mesh-{id}")
    } else {
        format!("mesh-{clean}-{:08x}", fnv1a(id.as_bytes()) as u32)
    }
}

/// Connects to the engine (`DOCKER_HOST` if set, else the local socket).
fn client() -> Result<Docker, DockerError> {
    let docker = match std::env::var("DOCKER_HOST") {
        Ok(h) if !h.is_empty() => Docker::connect_with_defaults()?,
        _ => Docker::connect_with_local_defaults()?,
    };
    Ok(docker.with_timeout(REQUEST_TIMEOUT))
}

/// Pings with [`PING_TIMEOUT`].
async fn ping(docker: &Docker) -> Result<(), String> {
    match tokio::time::timeout(PING_TIMEOUT, docker.ping()).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {PING_TIMEOUT:?}")),
    }
}

fn io_error(kind: io::ErrorKind, message: String) -> RuntimeError {
    RuntimeError::Io(io::Error::new(kind, message))
}

impl DockerRuntime {
    /// Connects to the local engine (honouring `DOCKER_HOST`) and checks that it answers a ping
    /// within 2 s; tasks of this runtime are labelled `mesh.node=<node>` and
    /// `mesh.node-id=<node_id>`, and only containers with this `node_id` are adopted, watched or
    /// killed. Warns when containers of another node id with the same name run on the engine.
    /// Starts the watchers (event stream and periodic listing); must be called inside a tokio
    /// runtime.
    pub async fn connect(events: mpsc::Sender<RuntimeEvent>, node: &str, node_id: &str) -> Result<Self, RuntimeError> {
        Self::connect_with(events, node, node_id, Watchers::Both).await
    }

    async fn connect_with(
        events: mpsc::Sender<RuntimeEvent>,
        node: &str,
        node_id: &str,
        watchers: Watchers,
    ) -> Result<Self, RuntimeError> {
        let docker = client()
            .map_err(|e| io_error(io::ErrorKind::NotConnected, format!("cannot connect to the Docker engine: {e}")))?;
        ping(&docker)
            .await
            .map_err(|e| io_error(io::ErrorKind::NotConnected, format!("no Docker engine answers: {e}")))?;
        let inner = Arc::new(Inner {
            docker,
            node: node.to_owned(),
            node_id: node_id.to_owned(),
            events,
            tasks: Mutex::new(HashMap::new()),
            launching: Mutex::new(HashSet::new()),
            log_rotation: Mutex::new(None),
            disk_watch_interval: Mutex::new(Duration::from_secs(15)),
            network: Mutex::new(ContainerNetwork::default()),
        });
        let mut background = Vec::new();
        if watchers != Watchers::EventsOnly {
            background.push(tokio::spawn(reconcile_loop(inner.clone())).abort_handle());
        }
        if watchers != Watchers::ListingOnly {
            background.push(tokio::spawn(event_loop(inner.clone())).abort_handle());
        }
        let name_clashes = inner.name_clashes().await;
        Ok(Self { inner, background, name_clashes })
    }

    /// Other nodes with this node's name that had running containers on the engine when this
    /// runtime connected: their node ids (`"none"` for containers of a mesh without node ids).
    pub fn name_clashes(&self) -> &[String] {
        &self.name_clashes
    }

    /// Rotates the logs of containers launched from now on: the `json-file` driver with
    /// `max-size` = `max_size` bytes and `max-file` = `max_files + 1` (Docker counts the live
    /// file), the same bound as the process runtime's logger. `None` leaves the engine's default.
    pub fn set_log_rotation(&self, rotation: Option<LogRotation>) {
        *self.inner.log_rotation.lock().unwrap_or_else(|e| e.into_inner()) = rotation;
    }

    /// The network bridge-mode containers join and the DNS server containers resolve names with
    /// (the original platform ran Docker with `--dns <host ip> --dns-search service.consul`).
    pub fn set_network(&self, network: ContainerNetwork) {
        *self.inner.network.lock().unwrap_or_else(|e| e.into_inner()) = network;
    }

    /// The gateway address of a Docker network (`bridge` when `None`): the host's address on it,
    /// which its containers reach.
    pub async fn network_gateway(&self, network: Option<&str>) -> Result<std::net::IpAddr, RuntimeError> {
        let name = network.unwrap_or("bridge");
        let n = self
            .inner
            .docker
            .inspect_network(name, None::<bollard::query_parameters::InspectNetworkOptions>)
            .await
            .map_err(|e| io_error(io::ErrorKind::NotFound, format!("Docker network {name}: {e}")))?;
        // The gateway as configured, or (Docker's default bridge lists only its subnet) the
        // subnet's first address, which Docker gives the bridge.
        let first_of = |subnet: &str| -> Option<std::net::IpAddr> {
            let (net, len) = subnet.split_once('/')?;
            let net: std::net::Ipv4Addr = net.parse().ok()?;
            let len: u32 = len.parse().ok().filter(|l| *l < 31)?;
            let mask = u32::MAX.checked_shl(32 - len).unwrap_or(0);
            Some(std::net::IpAddr::V4(std::net::Ipv4Addr::from((u32::from(net) & mask) + 1)))
        };
        n.ipam
            .and_then(|i| i.config)
            .into_iter()
            .flatten()
            .find_map(|c| match c.gateway.as_deref().and_then(|g| g.parse::<std::net::IpAddr>().ok()) {
                Some(ip) if ip.is_ipv4() => Some(ip),
                _ => c.subnet.as_deref().and_then(first_of),
            })
            .ok_or_else(|| io_error(io::ErrorKind::NotFound, format!("Docker network {name} has no IPv4 gateway")))
    }

    /// How often the writable layer of a container whose task has a `disk` limit is measured
    /// (default 15 s); see the module docs' "Disk".
    pub fn set_disk_watch_interval(&self, interval: Duration) {
        *self.inner.disk_watch_interval.lock().unwrap_or_else(|e| e.into_inner()) = interval;
    }

    /// Whether a Docker engine answers a ping (within 2 s); for `--runtime auto`.
    pub async fn available() -> bool {
        match client() {
            Ok(docker) => ping(&docker).await.is_ok(),
            Err(_) => false,
        }
    }

    /// The node whose containers this runtime runs and recovers.
    pub fn node(&self) -> &str {
        &self.inner.node
    }

    /// The node id whose containers this runtime runs and recovers.
    pub fn node_id(&self) -> &str {
        &self.inner.node_id
    }
}

impl Drop for DockerRuntime {
    /// Stops the watchers; the containers keep running so that a later runtime can recover them.
    fn drop(&mut self) {
        for handle in &self.background {
            handle.abort();
        }
    }
}

/// Which watchers run; tests turn one off to exercise the other alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Watchers {
    Both,
    #[cfg_attr(not(test), allow(dead_code))]
    EventsOnly,
    #[cfg_attr(not(test), allow(dead_code))]
    ListingOnly,
}

/// Removes a task id from `launching` when the launch is over.
struct LaunchGuard<'a> {
    inner: &'a Inner,
    task_id: TaskId,
}

impl Drop for LaunchGuard<'_> {
    fn drop(&mut self) {
        self.inner.launching.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.task_id);
    }
}

#[async_trait::async_trait]
impl Runtime for DockerRuntime {
    fn name(&self) -> &'static str {
        "docker"
    }

    async fn launch(&self, spec: TaskSpec) -> Result<(), RuntimeError> {
        let Some(container) = spec.container.clone() else {
            return Err(RuntimeError::Launch {
                task: spec.task_id,
                message: "the docker runtime runs container tasks only (the spec has no container)".into(),
            });
        };
        let busy = self.inner.lock().contains_key(&spec.task_id)
            || !self.inner.launching.lock().unwrap_or_else(|e| e.into_inner()).insert(spec.task_id.clone());
        if busy {
            return Err(RuntimeError::Launch {
                task: spec.task_id,
                message: "a task with this id is already running".into(),
            });
        }
        let _guard = LaunchGuard { inner: &self.inner, task_id: spec.task_id.clone() };
        match self.inner.start(&spec, &container).await {
            Ok(()) => Ok(()),
            Err(message) => {
                tracing::warn!("docker: task {} failed to launch: {message}", spec.task_id);
                let _ = self
                    .inner
                    .events
                    .send(RuntimeEvent::Failed {
                        task_id: spec.task_id.clone(),
                        message: message.clone(),
                        at: now_millis(),
                    })
                    .await;
                Err(RuntimeError::Launch { task: spec.task_id, message })
            }
        }
    }

    async fn kill(&self, task_id: &TaskId, grace: Duration) -> Result<(), RuntimeError> {
        let Some(w) = self.inner.lock().get(task_id).cloned() else {
            return Ok(());
        };
        self.inner.start_kill(w, grace);
        Ok(())
    }

    async fn recover(&self) -> Result<Vec<RecoveredTask>, RuntimeError> {
        let list = self
            .inner
            .list_mesh_containers()
            .await
            .map_err(|e| io_error(io::ErrorKind::Other, format!("cannot list containers: {e}")))?;
        let mut found = Vec::new();
        for summary in list {
            let (Some(id), Some(labels)) = (summary.id, summary.labels) else { continue };
            let Some(task_id) = labels.get(LABEL_TASK).map(|t| TaskId::from(t.as_str())) else { continue };
            // A task this runtime already watches (or is launching) is left alone.
            let known = self.inner.lock().contains_key(&task_id)
                || self.inner.launching.lock().unwrap_or_else(|e| e.into_inner()).contains(&task_id);
            if known {
                continue;
            }
            let running = matches!(
                summary.state,
                Some(
                    ContainerSummaryStateEnum::RUNNING
                        | ContainerSummaryStateEnum::PAUSED
                        | ContainerSummaryStateEnum::RESTARTING
                )
            );
            let name = summary
                .names
                .and_then(|n| n.into_iter().next())
                .map(|n| n.trim_start_matches('/').to_owned())
                .unwrap_or_else(|| container_name(&task_id));
            if !running {
                tracing::info!("docker recover: container {name} of task {task_id} no longer runs; removing it");
                self.inner.remove(&id).await;
                continue;
            }
            let info = self.inner.docker.inspect_container(&id, None::<InspectContainerOptions>).await.ok();
            let host_config = info.as_ref().and_then(|i| i.host_config.clone());
            let mem =
                host_config.as_ref().and_then(|h| h.memory).filter(|m| *m > 0).map(|m| m as f64 / MIB).unwrap_or(0.0);
            let ports = match labels.get(LABEL_PORTS) {
                Some(p) => p.split(',').filter_map(|s| s.trim().parse::<u16>().ok()).collect(),
                None => bound_host_ports(host_config.as_ref()),
            };
            let spec_labels: BTreeMap<String, String> =
                labels.get(LABEL_LABELS).and_then(|j| serde_json::from_str(j).ok()).unwrap_or_else(|| {
                    labels
                        .iter()
                        .filter(|(k, _)| {
                            ![LABEL_TASK, LABEL_NODE, LABEL_NODE_ID, LABEL_PORTS, LABEL_LABELS, LABEL_DISK]
                                .contains(&k.as_str())
                        })
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect()
                });
            // The grace it was created with is its stop timeout.
            let grace = info
                .as_ref()
                .and_then(|i| i.config.as_ref())
                .and_then(|c| c.stop_timeout)
                .and_then(|t| u64::try_from(t).ok())
                .map_or(DEFAULT_RECOVERED_GRACE, Duration::from_secs);
            let w = Watched::new(task_id.clone(), id, name.clone(), mem, grace, Phase::Running);
            if mem > 0.0
                && let Some(m) = memcg::OomWatch::register(&w.container)
            {
                let _ = w.memcg.set(m);
            }
            self.inner.lock().insert(task_id.clone(), w.clone());
            let disk = labels.get(LABEL_DISK).and_then(|d| d.parse::<f64>().ok()).filter(|d| *d > 0.0);
            if let Some(disk) = disk {
                let interval = *self.inner.disk_watch_interval.lock().unwrap_or_else(|e| e.into_inner());
                tokio::spawn(self.inner.clone().watch_disk(w, disk, interval));
            }
            tracing::info!("docker recover: adopted task {task_id} (container {name})");
            found.push(RecoveredTask { task_id, labels: spec_labels, ports });
        }
        Ok(found)
    }

    fn running(&self) -> Vec<TaskId> {
        let mut ids: Vec<TaskId> = self.inner.lock().keys().cloned().collect();
        ids.sort();
        ids
    }

    fn is_running(&self, task_id: &TaskId) -> bool {
        self.inner.lock().contains_key(task_id)
    }

    async fn kill_all(&self, grace: Duration) {
        let all: Vec<Arc<Watched>> = self.inner.lock().values().cloned().collect();
        let mut waits = Vec::with_capacity(all.len());
        // Every task gets its own grace (at most `grace`), all at once.
        let mut longest = Duration::ZERO;
        for w in all {
            waits.push(w.done.subscribe());
            let own = w.grace.min(grace);
            longest = longest.max(own);
            self.inner.start_kill(w, own);
        }
        let grace = longest;
        let wait_all = async {
            for mut done in waits {
                let _ = done.wait_for(|d| *d).await;
            }
        };
        if tokio::time::timeout(grace + KILL_ALL_MARGIN, wait_all).await.is_err() {
            tracing::warn!("docker kill_all: not every task ended within {:?}", grace + KILL_ALL_MARGIN);
        }
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, HashMap<TaskId, Arc<Watched>>> {
        self.tasks.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Pulls if needed, creates and starts the container, sends `Started`. The error is the
    /// message for `Failed`.
    async fn start(self: &Arc<Self>, spec: &TaskSpec, c: &ContainerSpec) -> Result<(), String> {
        let mut body = create_body(spec, c, &self.node, &self.node_id)?;
        if let Some(r) = *self.log_rotation.lock().unwrap_or_else(|e| e.into_inner()) {
            body.host_config.get_or_insert_with(HostConfig::default).log_config = Some(log_config(r));
        }
        let net = self.network.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let host = body.host_config.get_or_insert_with(HostConfig::default);
        if let Some(name) = &net.network
            && host.network_mode.as_deref() == Some("bridge")
        {
            host.network_mode = Some(name.clone());
        }
        // The node's DNS, unless the task chose its own (`dns` parameter) or has no network.
        if let Some(dns) = net.dns
            && host.dns.is_none()
            && host.network_mode.as_deref() != Some("none")
        {
            host.dns = Some(vec![dns.to_string()]);
            if host.dns_search.is_none() && !net.dns_search.is_empty() {
                host.dns_search = Some(net.dns_search.clone());
            }
        }

        self.ensure_image(&c.image, c.force_pull).await?;
        let name = container_name(&spec.task_id);
        let id = match self.create(&name, body.clone()).await {
            Ok(id) => id,
            Err(DockerError::DockerResponseServerError { status_code: 409, .. }) => {
                self.clear_stale(&name).await?;
                self.create(&name, body).await.map_err(|e| format!("cannot create container {name}: {e}"))?
            }
            Err(e) => return Err(format!("cannot create container {name}: {e}")),
        };
        let w =
            Watched::new(spec.task_id.clone(), id.clone(), name.clone(), spec.mem, spec.kill_grace, Phase::Starting);
        self.lock().insert(spec.task_id.clone(), w.clone());
        if spec.mem > 0.0 {
            tokio::spawn(watch_memcg(w.clone()));
        }
        if let Err(e) = self.docker.start_container(&id, None::<StartContainerOptions>).await {
            w.phase.send_replace(Phase::Failed);
            {
                let mut tasks = self.lock();
                if tasks.get(&spec.task_id).is_some_and(|x| Arc::ptr_eq(x, &w)) {
                    tasks.remove(&spec.task_id);
                }
            }
            self.remove(&id).await;
            return Err(format!("cannot start container {name}: {e}"));
        }
        let _ = self.events.send(RuntimeEvent::Started { task_id: spec.task_id.clone(), at: now_millis() }).await;
        w.phase.send_replace(Phase::Running);
        tracing::info!("docker: task {} runs in container {name}", spec.task_id);
        if spec.disk > 0.0 {
            let interval = *self.disk_watch_interval.lock().unwrap_or_else(|e| e.into_inner());
            tokio::spawn(self.clone().watch_disk(w, spec.disk, interval));
        }
        Ok(())
    }

    /// Measures the container's writable layer (`SizeRw`) every `interval` until the task ends;
    /// above `limit_mib` the container is SIGKILLed and the task fails.
    async fn watch_disk(self: Arc<Self>, w: Arc<Watched>, limit_mib: f64, interval: Duration) {
        let mut done = w.done.subscribe();
        let opts = InspectContainerOptionsBuilder::new().size(true).build();
        loop {
            tokio::select! {
                _ = done.wait_for(|d| *d) => return,
                () = tokio::time::sleep(interval) => {}
            }
            let used = match self.docker.inspect_container(&w.container, Some(opts.clone())).await {
                Ok(info) => info.size_rw.unwrap_or(0).max(0) as u64,
                Err(_) => continue,
            };
            if used as f64 > limit_mib * 1024.0 * 1024.0 && !*w.done.borrow() {
                let message = super::disk::exceeded_message(limit_mib, used);
                tracing::info!("docker: task {}: {message}; killing it", w.task_id);
                *w.limit_exceeded.lock().unwrap_or_else(|e| e.into_inner()) = Some(message);
                self.sigkill(&w).await;
                return;
            }
        }
    }

    async fn create(&self, name: &str, body: ContainerCreateBody) -> Result<String, DockerError> {
        let opts = CreateContainerOptionsBuilder::new().name(name).build();
        Ok(self.docker.create_container(Some(opts), body).await?.id)
    }

    /// Removes a container that holds `name` but does not run; fails for a running one.
    async fn clear_stale(&self, name: &str) -> Result<(), String> {
        match self.docker.inspect_container(name, None::<InspectContainerOptions>).await {
            Ok(info) if info.state.as_ref().and_then(|s| s.running) == Some(true) => {
                Err(format!("a running container named {name} already exists"))
            }
            Ok(info) => {
                tracing::info!("docker: removing the stale container {name} before launching again");
                self.remove(info.id.as_deref().unwrap_or(name)).await;
                Ok(())
            }
            Err(DockerError::DockerResponseServerError { status_code: 404, .. }) => Ok(()),
            Err(e) => Err(format!("cannot inspect the existing container {name}: {e}")),
        }
    }

    /// Makes sure the image is present, pulling it when missing or when `force` is set.
    async fn ensure_image(&self, image: &str, force: bool) -> Result<(), String> {
        let present = match self.docker.inspect_image(image).await {
            Ok(_) => true,
            Err(DockerError::DockerResponseServerError { status_code: 404, .. }) => false,
            Err(e) => return Err(format!("cannot inspect image {image}: {e}")),
        };
        if present && !force {
            return Ok(());
        }
        let pulled = match tokio::time::timeout(PULL_TIMEOUT, self.pull(image)).await {
            Ok(r) => r,
            Err(_) => Err(format!("the pull did not finish within {PULL_TIMEOUT:?}")),
        };
        match pulled {
            Ok(()) => Ok(()),
            Err(e) if present => {
                tracing::warn!("docker: force-pulling {image} failed ({e}); using the local copy");
                Ok(())
            }
            Err(e) => Err(format!("image {image} is not on this node and could not be pulled: {e}")),
        }
    }

    async fn pull(&self, image: &str) -> Result<(), String> {
        let (repo, tag) = split_reference(image);
        let mut opts = CreateImageOptionsBuilder::new().from_image(repo);
        if let Some(tag) = tag {
            opts = opts.tag(tag);
        }
        let mut stream = self.docker.create_image(Some(opts.build()), None, None);
        while let Some(item) = stream.next().await {
            let info = item.map_err(|e| e.to_string())?;
            if let Some(err) = info.error_detail.and_then(|d| d.message) {
                return Err(err);
            }
        }
        Ok(())
    }

    /// Force-removes a container; a missing one is fine.
    async fn remove(&self, id: &str) {
        let opts = RemoveContainerOptionsBuilder::new().force(true).build();
        match self.docker.remove_container(id, Some(opts)).await {
            Ok(()) | Err(DockerError::DockerResponseServerError { status_code: 404, .. }) => {}
            // 409: removal already in progress.
            Err(DockerError::DockerResponseServerError { status_code: 409, .. }) => {}
            Err(e) => tracing::warn!("docker: cannot remove container {id}: {e}"),
        }
    }

    /// All containers (running or not) labelled `mesh.task` and `mesh.node-id=<node id>`.
    async fn list_mesh_containers(&self) -> Result<Vec<bollard::models::ContainerSummary>, DockerError> {
        let filters = HashMap::from([("label", self.own_labels())]);
        let opts = ListContainersOptionsBuilder::new().all(true).filters(&filters).build();
        self.docker.list_containers(Some(opts)).await
    }

    /// The label filter of this node's task containers.
    fn own_labels(&self) -> Vec<String> {
        vec![LABEL_TASK.to_owned(), format!("{LABEL_NODE_ID}={}", self.node_id)]
    }

    /// Node ids of the running mesh containers with this node's name but another node id; warns
    /// about each (a listing error is only logged).
    async fn name_clashes(&self) -> Vec<String> {
        let filters = HashMap::from([("label", vec![LABEL_TASK.to_owned(), format!("{LABEL_NODE}={}", self.node)])]);
        let opts = ListContainersOptionsBuilder::new().filters(&filters).build();
        let list = match self.docker.list_containers(Some(opts)).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!("docker: cannot list containers to check the node name: {e}");
                return Vec::new();
            }
        };
        let mut others: BTreeMap<String, usize> = BTreeMap::new();
        for c in list {
            let id = c.labels.as_ref().and_then(|l| l.get(LABEL_NODE_ID)).cloned().unwrap_or_else(|| "none".into());
            if id != self.node_id {
                *others.entry(id).or_default() += 1;
            }
        }
        for (id, n) in &others {
            tracing::warn!(
                "docker: the node name {:?} is already used by another mesh node on this Docker engine \
                 (node id {id}, {n} running container(s)); this node (id {}) neither adopts nor kills them. \
                 Give every node sharing an engine its own --node (the default is the host name).",
                self.node,
                self.node_id
            );
        }
        others.into_keys().collect()
    }

    /// Stop the container: SIGTERM, SIGKILL after `grace` (see the module docs).
    fn start_kill(self: &Arc<Self>, w: Arc<Watched>, grace: Duration) {
        if *w.done.borrow() {
            return;
        }
        w.killed.store(true, Ordering::SeqCst);
        let ms = u64::try_from(grace.as_millis()).unwrap_or(u64::MAX - 1);
        let before = w.kill_grace_ms.fetch_min(ms, Ordering::SeqCst);
        if before != u64::MAX && ms >= before {
            return;
        }
        let first = before == u64::MAX;
        let inner = self.clone();
        tokio::spawn(async move {
            if !w.launched().await {
                return;
            }
            if first {
                inner.stop(&w, grace).await;
            } else {
                // An earlier, longer stop is under way: bring the SIGKILL forward.
                let mut done = w.done.subscribe();
                let ended = async move {
                    let _ = done.wait_for(|d| *d).await;
                };
                tokio::select! {
                    () = ended => {}
                    () = tokio::time::sleep(grace) => inner.sigkill(&w).await,
                }
            }
        });
    }

    async fn stop(&self, w: &Watched, grace: Duration) {
        let secs = grace.as_secs() + u64::from(grace.subsec_nanos() > 0);
        let t = i32::try_from(secs).unwrap_or(i32::MAX);
        let client = self.docker.clone().with_timeout(Duration::from_secs(secs) + STOP_MARGIN);
        let opts = StopContainerOptionsBuilder::new().t(t).build();
        match client.stop_container(&w.container, Some(opts)).await {
            Ok(()) | Err(DockerError::DockerResponseServerError { status_code: 304 | 404, .. }) => {}
            Err(e) => {
                tracing::warn!("docker: stopping {} failed ({e}); sending SIGKILL", w.name);
                self.sigkill(w).await;
            }
        }
    }

    async fn sigkill(&self, w: &Watched) {
        let opts = KillContainerOptionsBuilder::new().signal("KILL").build();
        match self.docker.kill_container(&w.container, Some(opts)).await {
            Ok(()) | Err(DockerError::DockerResponseServerError { status_code: 404 | 409, .. }) => {}
            Err(e) => tracing::warn!("docker: cannot SIGKILL {}: {e}", w.name),
        }
    }

    /// Ends a task once, whoever noticed first.
    fn end(self: &Arc<Self>, w: Arc<Watched>) {
        if w.claimed.swap(true, Ordering::SeqCst) {
            return;
        }
        tokio::spawn(self.clone().finish(w));
    }

    async fn finish(self: Arc<Self>, w: Arc<Watched>) {
        if !w.launched().await {
            // `launch` failed and reports it.
            return;
        }
        let (exit, message) = match self.docker.inspect_container(&w.container, None::<InspectContainerOptions>).await {
            Ok(info) => {
                let state = info.state.unwrap_or_default();
                let code =
                    state.exit_code.map(|c| c as i32).or_else(|| *w.die_code.lock().unwrap_or_else(|e| e.into_inner()));
                let mut oom = state.oom_killed == Some(true) || w.oom.load(Ordering::SeqCst);
                // A SIGKILL (137) that mesh did not send, with a memory limit, and the engine has
                // not (yet) said OOM: the engine can report `die` before it learns of the OOM kill,
                // or never learn of it (see `memcg`). The kernel's own notification decides when
                // the runtime has it; otherwise the engine gets a bounded while (up to 5 s: 2 s
                // was seen to be too short on a loaded machine).
                if code == Some(137) && !oom && !w.killed.load(Ordering::SeqCst) && w.mem > 0.0 {
                    oom = match w.memcg.get() {
                        Some(m) => m.oom_killed(MEMCG_REMOVAL_WAIT).await || self.engine_says_oom(&w).await,
                        None => {
                            let deadline = tokio::time::Instant::now() + ENGINE_OOM_WAIT;
                            loop {
                                if self.engine_says_oom(&w).await {
                                    break true;
                                }
                                if tokio::time::Instant::now() >= deadline {
                                    break false;
                                }
                                tokio::time::sleep(Duration::from_millis(100)).await;
                            }
                        }
                    };
                }
                describe(code, oom, w.mem)
            }
            Err(e) => {
                let code = *w.die_code.lock().unwrap_or_else(|e| e.into_inner());
                match (code, e) {
                    (Some(_), _) => describe(code, w.oom.load(Ordering::SeqCst), w.mem),
                    (None, DockerError::DockerResponseServerError { status_code: 404, .. }) => {
                        (Exit::Unknown, format!("container {} was removed outside mesh (exit status unknown)", w.name))
                    }
                    (None, e) => (Exit::Unknown, format!("container {} ended; its state is unknown: {e}", w.name)),
                }
            }
        };
        let limit = w.limit_exceeded.lock().unwrap_or_else(|e| e.into_inner()).take();
        let killed = limit.is_none() && w.killed.load(Ordering::SeqCst);
        let message = match limit {
            Some(limit) => format!("{limit}; {message}"),
            None => message,
        };
        self.remove(&w.container).await;
        {
            let mut tasks = self.lock();
            if tasks.get(&w.task_id).is_some_and(|x| Arc::ptr_eq(x, &w)) {
                tasks.remove(&w.task_id);
            }
        }
        tracing::info!("docker: task {} ended: {message}", w.task_id);
        let _ = self
            .events
            .send(RuntimeEvent::Exited { task_id: w.task_id.clone(), exit, killed, message, at: now_millis() })
            .await;
        w.done.send_replace(true);
    }

    /// Whether the engine has reported an OOM kill of the container (`oom` event or
    /// `State.OOMKilled`).
    async fn engine_says_oom(&self, w: &Watched) -> bool {
        w.oom.load(Ordering::SeqCst)
            || self
                .docker
                .inspect_container(&w.container, None::<InspectContainerOptions>)
                .await
                .ok()
                .and_then(|i| i.state)
                .and_then(|s| s.oom_killed)
                == Some(true)
    }

    /// One engine event about a mesh container.
    fn on_event(self: &Arc<Self>, ev: &EventMessage) {
        let Some(actor) = &ev.actor else { return };
        let Some(task) = actor.attributes.as_ref().and_then(|a| a.get(LABEL_TASK)) else { return };
        let Some(w) = self.lock().get(&TaskId::from(task.as_str())).cloned() else { return };
        if actor.id.as_deref() != Some(w.container.as_str()) {
            return;
        }
        match ev.action.as_deref() {
            Some("oom") => w.oom.store(true, Ordering::SeqCst),
            Some("die") => {
                let code = actor.attributes.as_ref().and_then(|a| a.get("exitCode")).and_then(|c| c.parse().ok());
                *w.die_code.lock().unwrap_or_else(|e| e.into_inner()) = code;
                self.end(w);
            }
            Some("destroy") => self.end(w),
            _ => {}
        }
    }

    /// Ends every watched, running task whose container is gone or not running.
    async fn reconcile(self: &Arc<Self>) {
        // Snapshot first: a task launched after the listing is not judged by it.
        let watched: Vec<Arc<Watched>> = self
            .lock()
            .values()
            .filter(|w| *w.phase.borrow() == Phase::Running && !w.claimed.load(Ordering::SeqCst))
            .cloned()
            .collect();
        if watched.is_empty() {
            return;
        }
        let list = match self.list_mesh_containers().await {
            Ok(l) => l,
            Err(e) => {
                tracing::debug!("docker reconcile: cannot list containers: {e}");
                return;
            }
        };
        let states: HashMap<String, Option<ContainerSummaryStateEnum>> =
            list.into_iter().filter_map(|c| Some((c.id?, c.state))).collect();
        for w in watched {
            let alive = matches!(
                states.get(&w.container),
                Some(Some(
                    ContainerSummaryStateEnum::RUNNING
                        | ContainerSummaryStateEnum::PAUSED
                        | ContainerSummaryStateEnum::RESTARTING
                ))
            );
            if !alive {
                tracing::debug!("docker reconcile: container {} of task {} is not running", w.name, w.task_id);
                self.end(w);
            }
        }
    }
}

/// Registers the kernel's OOM notification for a starting container's memory cgroup (see
/// [`memcg`]). Runs from before the start: runc creates the cgroup before the task's command
/// runs, and a container that OOMs at once can be gone (cgroup and all) before `start` even
/// returns, so the cgroup is looked for every [`MEMCG_POLL`] while the start is under way, and
/// once more after it.
async fn watch_memcg(w: Arc<Watched>) {
    loop {
        let starting = *w.phase.borrow() == Phase::Starting;
        if let Some(m) = memcg::OomWatch::register(&w.container) {
            let _ = w.memcg.set(m);
            return;
        }
        if !starting {
            tracing::debug!("docker: no memory cgroup OOM notification for {}; relying on the engine's", w.name);
            return;
        }
        tokio::time::sleep(MEMCG_POLL).await;
    }
}

/// Follows the engine's events for this node's mesh containers; reconnects after errors.
async fn event_loop(inner: Arc<Inner>) {
    let filters = HashMap::from([
        ("type", vec!["container".to_owned()]),
        ("event", vec!["die".to_owned(), "oom".to_owned(), "destroy".to_owned()]),
        ("label", inner.own_labels()),
    ]);
    let mut since: Option<String> = None;
    loop {
        let opened = unix_now();
        let mut opts = EventsOptionsBuilder::new().filters(&filters);
        if let Some(s) = &since {
            opts = opts.since(s);
        }
        let mut stream = inner.docker.events(Some(opts.build()));
        let mut seen = 0usize;
        let mut failed = false;
        while let Some(item) = stream.next().await {
            match item {
                Ok(ev) => {
                    seen += 1;
                    if let Some(t) = event_time(&ev) {
                        since = Some(t);
                    }
                    inner.on_event(&ev);
                }
                Err(e) => {
                    tracing::warn!("docker: event stream failed ({e}); reconnecting");
                    failed = true;
                    break;
                }
            }
        }
        if since.is_none() || (failed && seen == 0) {
            // Nothing seen on this stream (or an event it cannot get past): resume from when it
            // was opened; the periodic listing covers the rest.
            since = Some(opened);
        }
        tokio::time::sleep(EVENTS_RETRY).await;
    }
}

/// Calls [`Inner::reconcile`] every [`RECONCILE_EVERY`].
async fn reconcile_loop(inner: Arc<Inner>) {
    let mut tick = tokio::time::interval(RECONCILE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        inner.reconcile().await;
    }
}

/// `secs.nanos` of an event, for `since`.
fn event_time(ev: &EventMessage) -> Option<String> {
    match (ev.time_nano, ev.time) {
        (Some(n), _) if n > 0 => Some(format!("{}.{:09}", n / 1_000_000_000, n % 1_000_000_000)),
        (_, Some(s)) => Some(s.to_string()),
        _ => None,
    }
}

fn unix_now() -> String {
    let d = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    format!("{}.{:09}", d.as_secs(), d.subsec_nanos())
}

/// Exit and message from an exit code and the OOM flag.
fn describe(code: Option<i32>, oom: bool, mem: f64) -> (Exit, String) {
    let exit = code.map_or(Exit::Unknown, Exit::Code);
    let message = if oom {
        format!("memory limit of {mem} MiB exceeded (OOM killed)")
    } else if let Some(c) = code {
        format!("exited with status {c}")
    } else {
        "ended (exit status unknown)".to_owned()
    };
    (exit, message)
}

/// Host ports of a container's port bindings.
fn bound_host_ports(host_config: Option<&HostConfig>) -> Vec<u16> {
    let mut ports: Vec<u16> = host_config
        .and_then(|h| h.port_bindings.as_ref())
        .map(|m| m.values().flatten().flatten().filter_map(|b| b.host_port.as_deref()?.parse().ok()).collect())
        .unwrap_or_default();
    ports.sort_unstable();
    ports.dedup();
    ports
}

/// `(repository, tag)` for a pull: the tag is `latest` when the reference has neither a tag nor
/// a digest (an empty tag would make the engine pull every tag).
fn split_reference(image: &str) -> (&str, Option<&str>) {
    if image.contains('@') {
        return (image, None);
    }
    let last = image.rsplit('/').next().unwrap_or(image);
    if last.contains(':') { (image, None) } else { (image, Some("latest")) }
}

fn parse_bool(key: &str, value: &str) -> Result<bool, String> {
    match value.trim().to_ascii_lowercase().as_str() {
        "" | "true" | "1" | "yes" => Ok(true),
        "false" | "0" | "no" => Ok(false),
        _ => Err(format!("parameter {key}={value:?}: expected true or false")),
    }
}

fn parse_ulimit(value: &str) -> Result<ResourcesUlimits, String> {
    let err = || format!("parameter ulimit={value:?}: expected name=soft[:hard]");
    let (name, limits) = value.split_once('=').ok_or_else(err)?;
    let (soft, hard) = match limits.split_once(':') {
        Some((s, h)) => (s, h),
        None => (limits, limits),
    };
    let parse = |s: &str| if s.trim() == "unlimited" { Ok(-1) } else { s.trim().parse::<i64>().map_err(|_| err()) };
    let name = name.trim();
    if name.is_empty() {
        return Err(err());
    }
    Ok(ResourcesUlimits { name: Some(name.to_owned()), soft: Some(parse(soft)?), hard: Some(parse(hard)?) })
}

/// The log driver settings that rotate a container's logs like the process runtime's logger.
fn log_config(r: LogRotation) -> HostConfigLogConfig {
    let config = HashMap::from([
        ("max-size".to_owned(), r.max_size.max(1).to_string()),
        ("max-file".to_owned(), (u64::from(r.max_files) + 1).to_string()),
    ]);
    HostConfigLogConfig { typ: Some("json-file".to_owned()), config: Some(config) }
}

/// The container create body of a task (pure; the error is the message for `Failed`).
fn create_body(spec: &TaskSpec, c: &ContainerSpec, node: &str, node_id: &str) -> Result<ContainerCreateBody, String> {
    let mut labels: HashMap<String, String> = HashMap::new();
    let mut env: Vec<String> = spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let mut body = ContainerCreateBody { image: Some(c.image.clone()), ..Default::default() };
    let mut host = HostConfig::default();

    for (key, value) in &c.parameters {
        let need_kv = |sep: char| {
            value
                .split_once(sep)
                .filter(|(k, _)| !k.trim().is_empty())
                .ok_or_else(|| format!("parameter {key}={value:?}: expected a value of the form a{sep}b"))
        };
        match key.as_str() {
            "label" => {
                let (k, v) = need_kv('=')?;
                labels.insert(k.to_owned(), v.to_owned());
            }
            "env" => {
                need_kv('=')?;
                env.push(value.clone());
            }
            "hostname" => body.hostname = Some(value.clone()),
            "user" => body.user = Some(value.clone()),
            "workdir" => body.working_dir = Some(value.clone()),
            "add-host" => {
                need_kv(':')?;
                host.extra_hosts.get_or_insert_with(Vec::new).push(value.clone());
            }
            "dns" => host.dns.get_or_insert_with(Vec::new).push(value.clone()),
            "ulimit" => host.ulimits.get_or_insert_with(Vec::new).push(parse_ulimit(value)?),
            "cap-add" => host.cap_add.get_or_insert_with(Vec::new).push(value.clone()),
            "cap-drop" => host.cap_drop.get_or_insert_with(Vec::new).push(value.clone()),
            "read-only" => host.readonly_rootfs = Some(parse_bool(key, value)?),
            "init" => host.init = Some(parse_bool(key, value)?),
            other => {
                return Err(format!(
                    "docker parameter {other:?} is not supported (supported: {})",
                    ALLOWED_PARAMETERS.join(", ")
                ));
            }
        }
    }
    labels.extend(spec.labels.iter().map(|(k, v)| (k.clone(), v.clone())));
    labels.insert(LABEL_TASK.to_owned(), spec.task_id.to_string());
    labels.insert(LABEL_NODE.to_owned(), node.to_owned());
    labels.insert(LABEL_NODE_ID.to_owned(), node_id.to_owned());
    labels.insert(LABEL_PORTS.to_owned(), spec.ports.iter().map(u16::to_string).collect::<Vec<_>>().join(","));
    labels.insert(LABEL_LABELS.to_owned(), serde_json::to_string(&spec.labels).map_err(|e| e.to_string())?);
    if spec.disk > 0.0 {
        labels.insert(LABEL_DISK.to_owned(), spec.disk.to_string());
    }

    match &spec.command {
        Command::Shell(s) => {
            body.entrypoint = Some(vec!["/bin/sh".to_owned(), "-c".to_owned()]);
            body.cmd = Some(vec![s.clone()]);
        }
        Command::Args(v) if v.is_empty() => {}
        Command::Args(v) => body.cmd = Some(v.clone()),
    }

    match c.network {
        NetworkMode::Bridge => {
            host.network_mode = Some("bridge".to_owned());
            let mut bindings: HashMap<String, Option<Vec<PortBinding>>> = HashMap::new();
            let mut exposed: Vec<String> = Vec::new();
            for m in &c.port_mappings {
                if m.host_port == 0 {
                    return Err(format!("port mapping for container port {} has no host port", m.container_port));
                }
                let protocols: Vec<String> =
                    m.protocol.split(',').map(|p| p.trim().to_ascii_lowercase()).filter(|p| !p.is_empty()).collect();
                let protocols = if protocols.is_empty() { vec!["tcp".to_owned()] } else { protocols };
                for proto in protocols {
                    if !matches!(proto.as_str(), "tcp" | "udp" | "sctp") {
                        return Err(format!("unknown port protocol {proto:?}"));
                    }
                    let key = format!("{}/{proto}", m.container_port);
                    if !exposed.contains(&key) {
                        exposed.push(key.clone());
                    }
                    bindings.entry(key).or_insert_with(|| Some(Vec::new())).get_or_insert_with(Vec::new).push(
                        PortBinding { host_ip: Some("0.0.0.0".to_owned()), host_port: Some(m.host_port.to_string()) },
                    );
                }
            }
            if !exposed.is_empty() {
                body.exposed_ports = Some(exposed);
                host.port_bindings = Some(bindings);
            }
        }
        NetworkMode::Host => host.network_mode = Some("host".to_owned()),
        NetworkMode::None => host.network_mode = Some("none".to_owned()),
    }

    host.binds = (!c.volumes.is_empty()).then(|| {
        c.volumes
            .iter()
            .map(|v| format!("{}:{}{}", v.host_path, v.container_path, if v.read_only { ":ro" } else { "" }))
            .collect()
    });
    if spec.mem > 0.0 {
        let bytes = (spec.mem * MIB) as i64;
        host.memory = Some(bytes);
        host.memory_swap = Some(bytes);
    }
    if spec.cpus > 0.0 {
        host.nano_cpus = Some((spec.cpus * 1e9).round() as i64);
    }
    host.privileged = Some(c.privileged);
    let grace = spec.kill_grace;
    body.stop_timeout = Some(i64::try_from(grace.as_secs() + u64::from(grace.subsec_nanos() > 0)).unwrap_or(i64::MAX));
    body.env = Some(env);
    body.labels = Some(labels);
    body.host_config = Some(host);
    Ok(body)
}

/// FNV-1a, a stable hash for container name suffixes.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
}

#[cfg(test)]
mod tests {
    use super::super::{PortMapping, Volume};
    use super::*;
    use std::fs;
    use std::path::{Path, PathBuf};
    use std::sync::OnceLock;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::time::timeout;

    /// How long a test waits for any one event; never a measured duration.
    const DEADLINE: Duration = Duration::from_secs(90);
    const IMAGE: &str = "mesh-test/busybox:latest";

    // --- pure parts (no engine needed) -------------------------------------------------------

    fn spec(id: &str, command: Command, network: NetworkMode) -> TaskSpec {
        TaskSpec {
            task_id: TaskId::from(id),
            command,
            env: BTreeMap::new(),
            cpus: 0.1,
            mem: 64.0,
            disk: 0.0,
            ports: vec![],
            kill_grace: Duration::from_secs(5),
            labels: BTreeMap::from([
                ("mesh.app".to_owned(), "/docker-test".to_owned()),
                ("mesh.app_version".to_owned(), "v1".to_owned()),
            ]),
            container: Some(ContainerSpec {
                image: IMAGE.to_owned(),
                network,
                port_mappings: vec![],
                volumes: vec![],
                parameters: vec![],
                privileged: false,
                force_pull: false,
            }),
        }
    }

    fn shell(id: &str, s: &str) -> TaskSpec {
        spec(id, Command::Shell(s.to_owned()), NetworkMode::None)
    }

    fn params(spec: &mut TaskSpec, kv: &[(&str, &str)]) {
        let c = spec.container.as_mut().unwrap();
        c.parameters.extend(kv.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
    }

    #[test]
    fn container_names_are_valid_and_distinct() {
        assert_eq!(container_name(&"web.1234-abcd_x".into()), "mesh-web.1234-abcd_x");
        let a = container_name(&"prod/web:1".into());
        let b = container_name(&"prod-web-1".into());
        assert!(a.starts_with("mesh-prod-web-1-"), "{a}");
        assert_ne!(a, b);
        assert!(a.chars().all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c)));
        assert_ne!(container_name(&"".into()), "mesh-");
    }

    #[test]
    fn references_get_a_tag_for_pulls() {
        assert_eq!(split_reference("busybox"), ("busybox", Some("latest")));
        assert_eq!(split_reference("mesh-test/x:1"), ("mesh-test/x:1", None));
        assert_eq!(split_reference("localhost:5000/x"), ("localhost:5000/x", Some("latest")));
        assert_eq!(split_reference("x@sha256:abc"), ("x@sha256:abc", None));
    }

    #[test]
    fn create_body_maps_the_spec() {
        let mut s = spec("body1", Command::Shell("echo hi".into()), NetworkMode::Bridge);
        s.env.insert("PORT0".into(), "31000".into());
        s.cpus = 0.5;
        s.mem = 128.0;
        s.ports = vec![31000, 31001];
        s.kill_grace = Duration::from_millis(2500);
        let c = s.container.as_mut().unwrap();
        c.port_mappings = vec![
            PortMapping { container_port: 80, host_port: 31000, protocol: "tcp".into() },
            PortMapping { container_port: 53, host_port: 31001, protocol: "udp,tcp".into() },
        ];
        c.volumes = vec![
            Volume { container_path: "/data".into(), host_path: "/srv/data".into(), read_only: false },
            Volume { container_path: "/etc/x".into(), host_path: "/x".into(), read_only: true },
        ];
        c.privileged = true;
        params(
            &mut s,
            &[
                ("label", "team=infra"),
                ("env", "EXTRA=1"),
                ("hostname", "h1"),
                ("user", "1000"),
                ("workdir", "/data"),
                ("add-host", "db:10.1.2.3"),
                ("dns", "10.0.0.53"),
                ("ulimit", "nofile=1024:2048"),
                ("ulimit", "nproc=unlimited"),
                ("cap-add", "SYS_TIME"),
                ("cap-drop", "NET_RAW"),
                ("read-only", "true"),
                ("init", ""),
            ],
        );
        let c = s.container.clone().unwrap();
        let b = create_body(&s, &c, "n1", "id1").unwrap();
        assert_eq!(b.image.as_deref(), Some(IMAGE));
        assert_eq!(b.entrypoint, Some(vec!["/bin/sh".to_owned(), "-c".to_owned()]));
        assert_eq!(b.cmd, Some(vec!["echo hi".to_owned()]));
        let env = b.env.unwrap();
        assert!(env.contains(&"PORT0=31000".to_owned()) && env.contains(&"EXTRA=1".to_owned()), "{env:?}");
        let labels = b.labels.unwrap();
        assert_eq!(labels[LABEL_TASK], "body1");
        assert_eq!(labels[LABEL_NODE], "n1");
        assert_eq!(labels[LABEL_NODE_ID], "id1");
        assert_eq!(labels[LABEL_PORTS], "31000,31001");
        assert_eq!(labels["mesh.app"], "/docker-test");
        assert_eq!(labels["team"], "infra");
        let back: BTreeMap<String, String> = serde_json::from_str(&labels[LABEL_LABELS]).unwrap();
        assert_eq!(back, s.labels);
        assert_eq!(
            (b.hostname.as_deref(), b.user.as_deref(), b.working_dir.as_deref()),
            (Some("h1"), Some("1000"), Some("/data"))
        );
        assert_eq!(b.stop_timeout, Some(3), "grace rounds up");
        let mut exposed = b.exposed_ports.unwrap();
        exposed.sort();
        assert_eq!(exposed, vec!["53/tcp", "53/udp", "80/tcp"]);
        let h = b.host_config.unwrap();
        assert_eq!(h.network_mode.as_deref(), Some("bridge"));
        let pb = h.port_bindings.as_ref().unwrap();
        let host_port = |k: &str| pb[k].as_ref().unwrap()[0].host_port.clone().unwrap();
        assert_eq!(host_port("80/tcp"), "31000");
        assert_eq!(host_port("53/udp"), "31001");
        assert_eq!(host_port("53/tcp"), "31001");
        assert_eq!(pb["80/tcp"].as_ref().unwrap()[0].host_ip.as_deref(), Some("0.0.0.0"));
        assert_eq!(bound_host_ports(Some(&h)), vec![31000, 31001]);
        assert_eq!(h.memory, Some(128 * 1024 * 1024));
        assert_eq!(h.memory_swap, Some(128 * 1024 * 1024));
        assert_eq!(h.nano_cpus, Some(500_000_000));
        assert_eq!(h.privileged, Some(true));
        assert_eq!(h.binds, Some(vec!["/srv/data:/data".to_owned(), "/x:/etc/x:ro".to_owned()]));
        assert_eq!(h.extra_hosts, Some(vec!["db:10.1.2.3".to_owned()]));
        assert_eq!(h.dns, Some(vec!["10.0.0.53".to_owned()]));
        let ul = h.ulimits.unwrap();
        assert_eq!((ul[0].name.as_deref(), ul[0].soft, ul[0].hard), (Some("nofile"), Some(1024), Some(2048)));
        assert_eq!((ul[1].soft, ul[1].hard), (Some(-1), Some(-1)));
        assert_eq!(h.cap_add, Some(vec!["SYS_TIME".to_owned()]));
        assert_eq!(h.cap_drop, Some(vec!["NET_RAW".to_owned()]));
        assert_eq!((h.readonly_rootfs, h.init), (Some(true), Some(true)));
    }

    #[test]
    fn create_body_network_modes_commands_and_bad_parameters() {
        let s = spec("b2", Command::Args(vec![]), NetworkMode::Host);
        let b = create_body(&s, s.container.as_ref().unwrap(), "n", "id").unwrap();
        assert_eq!(b.host_config.as_ref().unwrap().network_mode.as_deref(), Some("host"));
        assert_eq!((b.cmd, b.entrypoint), (None, None), "empty args keep the image's command");
        let s = spec("b3", Command::Args(vec!["httpd".into(), "-f".into()]), NetworkMode::None);
        let b = create_body(&s, s.container.as_ref().unwrap(), "n", "id").unwrap();
        assert_eq!(b.host_config.as_ref().unwrap().network_mode.as_deref(), Some("none"));
        assert_eq!((b.cmd, b.entrypoint), (Some(vec!["httpd".to_owned(), "-f".to_owned()]), None));
        for bad in
            [("label", "novalue"), ("env", "=x"), ("ulimit", "nofile=abc"), ("init", "maybe"), ("privileged", "true")]
        {
            let mut s = shell("b4", "true");
            params(&mut s, &[bad]);
            let err = create_body(&s, s.container.as_ref().unwrap(), "n", "id").unwrap_err();
            assert!(err.contains(bad.0), "{bad:?}: {err}");
        }
        // Every allowed key has an implementation.
        for key in ALLOWED_PARAMETERS {
            let value = match *key {
                "label" | "env" => "A=b",
                "add-host" => "h:1.2.3.4",
                "ulimit" => "nofile=1",
                "read-only" | "init" => "true",
                _ => "x",
            };
            let mut s = shell("b5", "true");
            params(&mut s, &[(key, value)]);
            create_body(&s, s.container.as_ref().unwrap(), "n", "id").unwrap_or_else(|e| panic!("{key}: {e}"));
        }
        // mesh's own labels cannot be overridden by parameters.
        let mut s = shell("b6", "true");
        params(&mut s, &[("label", "mesh.task=other")]);
        let b = create_body(&s, s.container.as_ref().unwrap(), "n", "id").unwrap();
        assert_eq!(b.labels.unwrap()[LABEL_TASK], "b6");
    }

    #[test]
    fn describe_messages() {
        assert_eq!(describe(Some(3), false, 64.0), (Exit::Code(3), "exited with status 3".to_owned()));
        assert_eq!(
            describe(Some(137), true, 16.0),
            (Exit::Code(137), "memory limit of 16 MiB exceeded (OOM killed)".to_owned())
        );
        assert_eq!(describe(None, false, 1.0).0, Exit::Unknown);
    }

    // --- against a real engine ---------------------------------------------------------------

    /// `Some(())` when an engine answers (after building the test images); `None` (skip) when
    /// none does, unless `MESH_REQUIRE_DOCKER=1`, which turns that into a failure.
    async fn engine() -> Option<()> {
        if !DockerRuntime::available().await {
            if std::env::var("MESH_REQUIRE_DOCKER").as_deref() == Ok("1") {
                panic!("MESH_REQUIRE_DOCKER=1 but no Docker engine answers");
            }
            println!("SKIP: no Docker engine answers");
            return None;
        }
        static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
        let built = tokio::task::spawn_blocking(|| {
            BUILT
                .get_or_init(|| {
                    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/build-test-images.sh");
                    let out = std::process::Command::new("bash").arg(&script).output().map_err(|e| e.to_string())?;
                    print!("{}", String::from_utf8_lossy(&out.stdout));
                    if out.status.success() {
                        Ok(())
                    } else {
                        Err(format!("{} failed: {}", script.display(), String::from_utf8_lossy(&out.stderr)))
                    }
                })
                .clone()
        })
        .await
        .unwrap();
        built.expect("building the test images failed");
        Some(())
    }

    /// A unique name for this process and test.
    fn unique(name: &str) -> String {
        format!("{name}-{}", std::process::id())
    }

    /// A host port that is free now, at or above `base`.
    fn free_port(base: u16) -> u16 {
        (base..base + 500)
            .find(|p| std::net::TcpListener::bind(("0.0.0.0", *p)).is_ok())
            .expect("no free port in range")
    }

    /// Removes every container of a test node when dropped, even after a failed assertion.
    struct Cleanup(String);

    impl Drop for Cleanup {
        fn drop(&mut self) {
            let filter = format!("label={LABEL_NODE}={}", self.0);
            if let Ok(out) = std::process::Command::new("docker").args(["ps", "-aq", "--filter", &filter]).output() {
                let ids: Vec<String> =
                    String::from_utf8_lossy(&out.stdout).split_whitespace().map(String::from).collect();
                if !ids.is_empty() {
                    let _ = std::process::Command::new("docker").args(["rm", "-f"]).args(&ids).output();
                }
            }
        }
    }

    struct Fixture {
        rt: DockerRuntime,
        ev: Events,
        docker: Docker,
        node: String,
        _cleanup: Cleanup,
    }

    async fn fixture(test: &str) -> Option<Fixture> {
        fixture_with(test, Watchers::Both).await
    }

    async fn fixture_with(test: &str, watchers: Watchers) -> Option<Fixture> {
        engine().await?;
        let node = unique(&format!("test-{test}"));
        let (tx, rx) = mpsc::channel(64);
        let rt = DockerRuntime::connect_with(tx, &node, &format!("id-{node}"), watchers).await.unwrap();
        Some(Fixture { rt, ev: Events::new(rx), docker: client().unwrap(), _cleanup: Cleanup(node.clone()), node })
    }

    /// The runtime's event channel, with events about other tasks kept for later.
    struct Events {
        rx: mpsc::Receiver<RuntimeEvent>,
        stash: Vec<RuntimeEvent>,
    }

    impl Events {
        fn new(rx: mpsc::Receiver<RuntimeEvent>) -> Self {
            Self { rx, stash: Vec::new() }
        }

        async fn next_for(&mut self, id: &str) -> RuntimeEvent {
            fn about(ev: &RuntimeEvent) -> &str {
                match ev {
                    RuntimeEvent::Started { task_id, .. }
                    | RuntimeEvent::Exited { task_id, .. }
                    | RuntimeEvent::Failed { task_id, .. } => task_id.as_str(),
                }
            }
            if let Some(i) = self.stash.iter().position(|ev| about(ev) == id) {
                return self.stash.remove(i);
            }
            let (rx, stash) = (&mut self.rx, &mut self.stash);
            timeout(DEADLINE, async {
                loop {
                    let ev = rx.recv().await.expect("event channel closed");
                    if about(&ev) == id {
                        return ev;
                    }
                    stash.push(ev);
                }
            })
            .await
            .unwrap_or_else(|_| panic!("no event about {id} before the deadline"))
        }

        async fn started(&mut self, id: &str) {
            match self.next_for(id).await {
                RuntimeEvent::Started { .. } => {}
                other => panic!("expected Started, got {other:?}"),
            }
        }

        async fn exited(&mut self, id: &str) -> (Exit, bool, String) {
            match self.next_for(id).await {
                RuntimeEvent::Exited { exit, killed, message, .. } => (exit, killed, message),
                other => panic!("expected Exited, got {other:?}"),
            }
        }

        /// True when no further event about `id` is queued right now.
        fn none_for(&mut self, id: &str) -> bool {
            while let Ok(ev) = self.rx.try_recv() {
                self.stash.push(ev);
            }
            !self.stash.iter().any(|ev| match ev {
                RuntimeEvent::Started { task_id, .. }
                | RuntimeEvent::Exited { task_id, .. }
                | RuntimeEvent::Failed { task_id, .. } => task_id.as_str() == id,
            })
        }
    }

    /// GETs `/` on 127.0.0.1:`port` until a 200 arrives (the server may still be starting);
    /// returns the response.
    async fn get_200(port: u16) -> String {
        timeout(DEADLINE, async {
            loop {
                let got = async {
                    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok()?;
                    s.write_all(b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n").await.ok()?;
                    let mut buf = Vec::new();
                    s.read_to_end(&mut buf).await.ok()?;
                    let text = String::from_utf8_lossy(&buf).into_owned();
                    text.lines().next().is_some_and(|l| l.contains(" 200")).then_some(text)
                }
                .await;
                if let Some(text) = got {
                    return text;
                }
                // A retry pause while the server comes up, not a synchronisation by sleeping.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("no HTTP 200 from 127.0.0.1:{port} before the deadline"))
    }

    async fn inspect(docker: &Docker, name: &str) -> Option<bollard::models::ContainerInspectResponse> {
        match docker.inspect_container(name, None::<InspectContainerOptions>).await {
            Ok(i) => Some(i),
            Err(DockerError::DockerResponseServerError { status_code: 404, .. }) => None,
            Err(e) => panic!("inspect {name}: {e}"),
        }
    }

    fn mkfifo(path: &Path) {
        let st = std::process::Command::new("mkfifo").arg(path).status().unwrap();
        assert!(st.success());
    }

    /// Reads a FIFO until its writer closes it.
    async fn read_fifo(path: &Path) -> String {
        let path = path.to_owned();
        timeout(DEADLINE, tokio::task::spawn_blocking(move || std::fs::read_to_string(path).unwrap()))
            .await
            .expect("nothing written to the fifo before the deadline")
            .unwrap()
    }

    /// A host directory bind-mounted at `/sync` holding the FIFO `/sync/ready`.
    fn sync_dir(s: &mut TaskSpec) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("ready");
        mkfifo(&fifo);
        s.container.as_mut().unwrap().volumes.push(Volume {
            container_path: "/sync".into(),
            host_path: dir.path().to_str().unwrap().into(),
            read_only: false,
        });
        (dir, fifo)
    }

    #[tokio::test]
    async fn bridge_ports_are_published() {
        let Some(mut f) = fixture("bridge").await else { return };
        let id = unique("bridge");
        let port = free_port(33000);
        let mut s = spec(&id, Command::Shell("httpd -f -p 8080 -h /www".into()), NetworkMode::Bridge);
        s.ports = vec![port];
        s.container.as_mut().unwrap().port_mappings =
            vec![PortMapping { container_port: 8080, host_port: port, protocol: "tcp".into() }];
        params(&mut s, &[("init", "true")]);
        f.rt.launch(s).await.unwrap();
        f.ev.started(&id).await;
        assert_eq!(f.rt.running(), vec![TaskId::from(id.as_str())]);
        let page = get_200(port).await;
        assert!(page.contains("mesh test image"), "{page}");
        let info = inspect(&f.docker, &container_name(&id.as_str().into())).await.expect("container exists");
        let labels = info.config.unwrap().labels.unwrap();
        assert_eq!(labels[LABEL_TASK], id);
        assert_eq!(labels[LABEL_NODE], f.node);
        assert_eq!(labels["mesh.app"], "/docker-test");
        assert_eq!(labels[LABEL_PORTS], port.to_string());
        f.rt.kill(&id.as_str().into(), Duration::from_secs(10)).await.unwrap();
        let (_, killed, _) = f.ev.exited(&id).await;
        assert!(killed);
        assert!(f.rt.running().is_empty());
        assert!(inspect(&f.docker, &container_name(&id.as_str().into())).await.is_none(), "container removed");
    }

    #[tokio::test]
    async fn host_network_shares_the_host_ports() {
        let Some(mut f) = fixture("host").await else { return };
        let id = unique("hostnet");
        let port = free_port(33100);
        let mut s = spec(&id, Command::Shell(format!("httpd -f -p {port} -h /www")), NetworkMode::Host);
        s.ports = vec![port];
        s.env.insert("PORT0".into(), port.to_string());
        params(&mut s, &[("init", "true")]);
        f.rt.launch(s).await.unwrap();
        f.ev.started(&id).await;
        assert!(get_200(port).await.contains("mesh test image"));
        f.rt.kill(&id.as_str().into(), Duration::from_secs(10)).await.unwrap();
        assert!(f.ev.exited(&id).await.1);
    }

    #[tokio::test]
    async fn limits_and_parameters_reach_the_container() {
        let Some(mut f) = fixture("limits").await else { return };
        let id = unique("limits");
        let mut s = shell(&id, "exec sleep 1000");
        s.mem = 64.0;
        s.cpus = 0.5;
        s.kill_grace = Duration::from_secs(7);
        params(
            &mut s,
            &[
                ("label", "team=infra"),
                ("ulimit", "nofile=1024:2048"),
                ("read-only", "true"),
                ("init", "true"),
                ("cap-drop", "NET_RAW"),
                ("add-host", "db:10.1.2.3"),
            ],
        );
        f.rt.launch(s).await.unwrap();
        f.ev.started(&id).await;
        let info = inspect(&f.docker, &container_name(&id.as_str().into())).await.expect("container exists");
        let h = info.host_config.unwrap();
        println!("HostConfig.MemorySwap = {:?}", h.memory_swap);
        assert_eq!(h.memory, Some(64 * 1024 * 1024));
        assert_eq!(h.nano_cpus, Some(500_000_000));
        assert_eq!(h.readonly_rootfs, Some(true));
        assert_eq!(h.init, Some(true));
        assert_eq!(h.network_mode.as_deref(), Some("none"));
        assert_eq!(h.cap_drop, Some(vec!["NET_RAW".to_owned()]));
        assert_eq!(h.extra_hosts, Some(vec!["db:10.1.2.3".to_owned()]));
        let ul = h.ulimits.unwrap();
        assert_eq!((ul[0].name.as_deref(), ul[0].soft, ul[0].hard), (Some("nofile"), Some(1024), Some(2048)));
        let config = info.config.unwrap();
        assert_eq!(config.labels.unwrap()["team"], "infra");
        assert_eq!(config.stop_timeout, Some(7));
        assert_eq!(info.state.unwrap().running, Some(true));
        f.rt.kill(&id.as_str().into(), Duration::from_secs(10)).await.unwrap();
        assert!(f.ev.exited(&id).await.1);

        // What the process inside sees.
        let id2 = unique("inside");
        let mut s = shell(
            &id2,
            "test \"$(hostname)\" = box1 || exit 11; test \"$(pwd)\" = /www || exit 12; \
             test \"$(id -u)\" = 1234 || exit 13; test \"$FOO\" = 'bar baz' || exit 14; \
             test \"$EXTRA\" = 1 || exit 15; grep -q db /etc/hosts || exit 16; \
             test \"$(ulimit -n)\" = 1024 || exit 17; touch /x 2>/dev/null && exit 18; exit 0",
        );
        s.env.insert("FOO".into(), "bar baz".into());
        params(
            &mut s,
            &[
                ("hostname", "box1"),
                ("workdir", "/www"),
                ("user", "1234"),
                ("env", "EXTRA=1"),
                ("add-host", "db:10.1.2.3"),
                ("ulimit", "nofile=1024:2048"),
                ("read-only", "true"),
            ],
        );
        f.rt.launch(s).await.unwrap();
        f.ev.started(&id2).await;
        assert_eq!(f.ev.exited(&id2).await, (Exit::Code(0), false, "exited with status 0".to_owned()));
    }

    #[tokio::test]
    async fn exit_codes_are_reported_and_containers_removed() {
        let Some(mut f) = fixture("exit").await else { return };
        let id = unique("exit3");
        f.rt.launch(shell(&id, "echo bye; exit 3")).await.unwrap();
        f.ev.started(&id).await;
        assert_eq!(f.ev.exited(&id).await, (Exit::Code(3), false, "exited with status 3".to_owned()));
        assert!(inspect(&f.docker, &container_name(&id.as_str().into())).await.is_none());
        assert!(f.rt.running().is_empty());

        // Args keep the image's entrypoint; env reaches the process.
        let id2 = unique("exit5");
        let mut s = spec(&id2, Command::Args(vec!["sh".into(), "-c".into(), "exit $CODE".into()]), NetworkMode::None);
        s.env.insert("CODE".into(), "5".into());
        f.rt.launch(s).await.unwrap();
        f.ev.started(&id2).await;
        assert_eq!(f.ev.exited(&id2).await.0, Exit::Code(5));

        // The same task id can run again once it has ended (the name was freed).
        f.rt.launch(shell(&id, "exit 0")).await.unwrap();
        f.ev.started(&id).await;
        assert_eq!(f.ev.exited(&id).await.0, Exit::Code(0));
        assert!(f.ev.none_for(&id), "each run reports Exited once");
    }

    #[tokio::test]
    async fn container_logs_are_rotated() {
        let Some(mut f) = fixture("logs").await else { return };
        f.rt.set_log_rotation(Some(LogRotation { max_size: 64 * 1024, max_files: 1 }));
        let id = unique("logs");
        f.rt.launch(shell(&id, "yes 0123456789abcdef | head -c 8388608; echo END; exec sleep 1000")).await.unwrap();
        f.ev.started(&id).await;
        let i = inspect(&f.docker, &container_name(&id.as_str().into())).await.expect("container");
        let lc = i.host_config.and_then(|h| h.log_config).expect("log config");
        assert_eq!(lc.typ.as_deref(), Some("json-file"));
        let cfg = lc.config.unwrap_or_default();
        assert_eq!((cfg["max-size"].as_str(), cfg["max-file"].as_str()), ("65536", "2"));
        // Where the engine's files are readable (same host, root): 8 MiB of output left two
        // bounded files.
        let log = PathBuf::from(i.log_path.unwrap_or_default());
        if fs::metadata(&log).is_ok() {
            let deadline = std::time::Instant::now() + DEADLINE;
            while !fs::read_to_string(&log).unwrap_or_default().contains("END") {
                assert!(std::time::Instant::now() < deadline, "END never reached {}", log.display());
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let len = |p: &Path| fs::metadata(p).map(|m| m.len()).unwrap_or(0);
            let old = PathBuf::from(format!("{}.1", log.display()));
            assert!(len(&log) <= 80 * 1024 && len(&old) <= 80 * 1024, "{} / {}", len(&log), len(&old));
            assert!(!Path::new(&format!("{}.2", log.display())).exists());
        } else {
            println!("{} is not readable here; checked the log config only", log.display());
        }
        f.rt.kill(&id.as_str().into(), Duration::ZERO).await.unwrap();
        f.ev.exited(&id).await;
    }

    #[tokio::test]
    async fn container_over_its_disk_fails() {
        let Some(mut f) = fixture("disk").await else { return };
        f.rt.set_disk_watch_interval(Duration::from_millis(200));
        let id = unique("disk");
        let mut s = shell(&id, "head -c 12582912 /dev/zero > /blob && exec sleep 1000");
        s.disk = 5.0;
        f.rt.launch(s).await.unwrap();
        f.ev.started(&id).await;
        let (exit, killed, msg) = f.ev.exited(&id).await;
        assert!(!killed, "a limit kill is a failure, not a requested kill");
        assert_eq!(exit, Exit::Code(137));
        assert!(msg.starts_with("disk limit of 5 MiB exceeded (used "), "{msg}");
        // Without a limit the same container keeps running.
        let free = unique("nodisk");
        f.rt.launch(shell(&free, "head -c 12582912 /dev/zero > /blob && exec sleep 1000")).await.unwrap();
        f.ev.started(&free).await;
        // Once the 12 MiB are written, three measurements later it still runs.
        let opts = InspectContainerOptionsBuilder::new().size(true).build();
        let name = container_name(&free.as_str().into());
        timeout(DEADLINE, async {
            while f.docker.inspect_container(&name, Some(opts.clone())).await.unwrap().size_rw.unwrap_or(0) < 12 << 20 {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
        .expect("the blob was never written");
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(f.rt.running(), vec![TaskId::from(free.as_str())]);
        f.rt.kill(&free.as_str().into(), Duration::ZERO).await.unwrap();
        f.ev.exited(&free).await;
    }

    #[tokio::test]
    async fn oom_kill_is_reported() {
        let Some(mut f) = fixture("oom").await else { return };
        let id = unique("oom");
        let mut s = shell(&id, "dd if=/dev/zero of=/dev/null bs=64M count=1");
        s.mem = 16.0;
        f.rt.launch(s).await.unwrap();
        f.ev.started(&id).await;
        let (exit, killed, msg) = f.ev.exited(&id).await;
        assert_eq!(exit, Exit::Code(137));
        assert!(!killed);
        assert_eq!(msg, "memory limit of 16 MiB exceeded (OOM killed)");
    }

    /// The kernel's notification (`memcg`), which does not depend on the engine learning of
    /// the kill in time, tells an OOM kill from another SIGKILL.
    #[tokio::test]
    async fn memcg_notification_tells_oom_from_other_sigkills() {
        let Some(mut f) = fixture("memcg").await else { return };
        // Where the host's cgroup v1 memory hierarchy is visible and this is root, the
        // notification must be available (as on the CI machine).
        let root = std::os::unix::fs::MetadataExt::uid(&fs::metadata("/proc/self").unwrap()) == 0;
        let expected = Path::new("/sys/fs/cgroup/memory/docker").is_dir() && root;
        let register = |info: bollard::models::ContainerInspectResponse| memcg::OomWatch::register(&info.id.unwrap());

        // OOM: the container waits for the FIFO so the watch is registered before it.
        let id = unique("memcgoom");
        let mut s = shell(&id, "");
        let (_dir, fifo) = sync_dir(&mut s);
        s.command = Command::Shell("cat /sync/ready > /dev/null; dd if=/dev/zero of=/dev/null bs=64M count=1".into());
        s.mem = 16.0;
        f.rt.launch(s).await.unwrap();
        f.ev.started(&id).await;
        let name = container_name(&id.as_str().into());
        let Some(watch) = register(inspect(&f.docker, &name).await.unwrap()) else {
            assert!(!expected, "no memory cgroup OOM notification although cgroup v1 is mounted and this is root");
            println!("SKIP: no cgroup v1 memory hierarchy (or not root)");
            return;
        };
        let task = TaskId::from(id.as_str());
        timeout(DEADLINE, async {
            while f.rt.inner.lock().get(&task).is_none_or(|w| w.memcg.get().is_none()) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("the runtime registered its own at launch");
        timeout(DEADLINE, tokio::task::spawn_blocking(move || std::fs::write(fifo, "go\n").unwrap()))
            .await
            .expect("the container never read the FIFO")
            .unwrap();
        let (exit, killed, msg) = f.ev.exited(&id).await;
        assert_eq!(
            (exit, killed, msg.as_str()),
            (Exit::Code(137), false, "memory limit of 16 MiB exceeded (OOM killed)")
        );
        assert!(timeout(DEADLINE, watch.oom_killed(MEMCG_REMOVAL_WAIT)).await.unwrap());

        // A SIGKILL from outside mesh: 137 too, but no OOM.
        let id = unique("memcgkill");
        let mut s = shell(&id, "exec sleep 1000");
        s.mem = 16.0;
        f.rt.launch(s).await.unwrap();
        f.ev.started(&id).await;
        let name = container_name(&id.as_str().into());
        let watch = register(inspect(&f.docker, &name).await.unwrap()).expect("registered above, so here too");
        f.docker.kill_container(&name, Some(KillContainerOptionsBuilder::new().signal("KILL").build())).await.unwrap();
        let (exit, killed, msg) = f.ev.exited(&id).await;
        assert_eq!((exit, killed, msg.as_str()), (Exit::Code(137), false, "exited with status 137"));
        assert!(!timeout(DEADLINE, watch.oom_killed(MEMCG_REMOVAL_WAIT)).await.unwrap());
    }

    #[tokio::test]
    async fn kill_escalates_to_sigkill_after_grace() {
        let Some(mut f) = fixture("sigkill").await else { return };
        let id = unique("stubborn");
        let mut s = shell(&id, "");
        let (_dir, fifo) = sync_dir(&mut s);
        s.command = Command::Shell("trap '' TERM; echo ready > /sync/ready; sleep 1000".into());
        f.rt.launch(s).await.unwrap();
        f.ev.started(&id).await;
        assert_eq!(read_fifo(&fifo).await, "ready\n");
        f.rt.kill(&id.as_str().into(), Duration::from_secs(2)).await.unwrap();
        // Idempotent.
        f.rt.kill(&id.as_str().into(), Duration::from_secs(2)).await.unwrap();
        let (exit, killed, msg) = f.ev.exited(&id).await;
        assert_eq!(exit, Exit::Code(137), "SIGTERM was ignored, so SIGKILL ended it ({msg})");
        assert!(killed);
        f.rt.kill(&id.as_str().into(), Duration::ZERO).await.unwrap();
        f.rt.kill(&"nope".into(), Duration::ZERO).await.unwrap();
    }

    #[tokio::test]
    async fn kill_sends_sigterm_first() {
        let Some(mut f) = fixture("sigterm").await else { return };
        let id = unique("term");
        let mut s = shell(&id, "");
        let (_dir, fifo) = sync_dir(&mut s);
        s.command = Command::Shell("trap 'exit 0' TERM; echo ready > /sync/ready; sleep 1000 & wait".into());
        f.rt.launch(s).await.unwrap();
        f.ev.started(&id).await;
        read_fifo(&fifo).await;
        f.rt.kill(&id.as_str().into(), Duration::from_secs(60)).await.unwrap();
        let (exit, killed, _) = f.ev.exited(&id).await;
        assert_eq!(exit, Exit::Code(0), "the TERM trap ran and exited normally");
        assert!(killed);
    }

    #[tokio::test]
    async fn missing_image_fails_fast() {
        let Some(mut f) = fixture("noimage").await else { return };
        let id = unique("noimage");
        let mut s = shell(&id, "true");
        s.container.as_mut().unwrap().image = "127.0.0.1:5999/mesh-test/does-not-exist:1".into();
        let err = timeout(DEADLINE, f.rt.launch(s)).await.expect("launch hung").unwrap_err();
        assert!(matches!(err, RuntimeError::Launch { .. }), "{err}");
        match f.ev.next_for(&id).await {
            RuntimeEvent::Failed { message, .. } => {
                let prefix =
                    "image 127.0.0.1:5999/mesh-test/does-not-exist:1 is not on this node and could not be pulled: ";
                println!("Failed: {message}");
                assert!(message.starts_with(prefix), "{message}");
            }
            other => panic!("expected Failed, got {other:?}"),
        }
        assert!(f.rt.running().is_empty());
        // No container is left behind, and other launch errors are reported too.
        assert!(inspect(&f.docker, &container_name(&id.as_str().into())).await.is_none());
        let mut s = shell(&id, "true");
        params(&mut s, &[("privileged", "true")]);
        assert!(f.rt.launch(s).await.is_err());
        assert!(matches!(f.ev.next_for(&id).await, RuntimeEvent::Failed { .. }));
        let mut s = shell(&id, "true");
        s.container = None;
        assert!(f.rt.launch(s).await.is_err());
    }

    #[tokio::test]
    async fn recover_adopts_running_containers() {
        if engine().await.is_none() {
            return;
        }
        let node = unique("test-recover");
        let _cleanup = Cleanup(node.clone());
        let docker = client().unwrap();
        let id = unique("adopt");
        let port = free_port(33200);
        let (tx_a, rx_a) = mpsc::channel(64);
        let mut ev_a = Events::new(rx_a);
        let a = DockerRuntime::connect(tx_a, &node, "id-recover").await.unwrap();
        let mut s = spec(&id, Command::Shell("httpd -f -p 8080 -h /www".into()), NetworkMode::Bridge);
        s.ports = vec![port];
        s.container.as_mut().unwrap().port_mappings =
            vec![PortMapping { container_port: 8080, host_port: port, protocol: "tcp".into() }];
        params(&mut s, &[("init", "true")]);
        let labels = s.labels.clone();
        a.launch(s).await.unwrap();
        ev_a.started(&id).await;
        drop(a);
        let name = container_name(&id.as_str().into());
        let state = inspect(&docker, &name).await.expect("container kept").state.unwrap();
        assert_eq!(state.running, Some(true), "dropping the runtime must not stop containers");
        get_200(port).await;

        // An ended container of the same node: removed by recover, not returned.
        let dead = format!("mesh-{}", unique("dead"));
        let st = std::process::Command::new("docker")
            .args(["run", "--name", &dead, "--label", &format!("{LABEL_TASK}=dead"), "--label"])
            .arg(format!("{LABEL_NODE}={node}"))
            .args(["--label", &format!("{LABEL_NODE_ID}=id-recover")])
            .args([IMAGE, "true"])
            .output()
            .unwrap();
        assert!(st.status.success(), "{}", String::from_utf8_lossy(&st.stderr));
        // A container created but never started (the agent died between create and start): its
        // labels are its record, so recover finds it and removes it too.
        let created = format!("mesh-{}", unique("created"));
        let st = std::process::Command::new("docker")
            .args(["create", "--name", &created, "--label", &format!("{LABEL_TASK}=created"), "--label"])
            .arg(format!("{LABEL_NODE}={node}"))
            .args(["--label", &format!("{LABEL_NODE_ID}=id-recover")])
            .args([IMAGE, "sleep", "1000"])
            .output()
            .unwrap();
        assert!(st.status.success(), "{}", String::from_utf8_lossy(&st.stderr));

        let (tx_b, rx_b) = mpsc::channel(64);
        let mut ev_b = Events::new(rx_b);
        let b = DockerRuntime::connect(tx_b, &node, "id-recover").await.unwrap();
        let found = b.recover().await.unwrap();
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].task_id, TaskId::from(id.as_str()));
        assert_eq!(found[0].labels, labels);
        assert_eq!(found[0].ports, vec![port]);
        assert_eq!(b.running(), vec![TaskId::from(id.as_str())]);
        assert!(inspect(&docker, &dead).await.is_none(), "the ended container was removed");
        assert!(inspect(&docker, &created).await.is_none(), "the never started container was removed");
        assert!(b.recover().await.unwrap().is_empty(), "no double adoption");

        b.kill(&id.as_str().into(), Duration::from_secs(10)).await.unwrap();
        let (_, killed, _) = ev_b.exited(&id).await;
        assert!(killed);
        assert!(b.running().is_empty());
        assert!(inspect(&docker, &name).await.is_none());
    }

    /// Issue 10, item 10: a runtime with the same node name but another node id (a second node
    /// on the engine) neither adopts, watches nor kills the first one's containers, and says so.
    #[tokio::test]
    async fn same_name_other_node_id_is_left_alone() {
        if engine().await.is_none() {
            return;
        }
        let node = unique("test-twins");
        let _cleanup = Cleanup(node.clone());
        let docker = client().unwrap();
        let id = unique("twin");
        let (tx_a, rx_a) = mpsc::channel(64);
        let mut ev_a = Events::new(rx_a);
        let a = DockerRuntime::connect(tx_a, &node, "id-a").await.unwrap();
        assert!(a.name_clashes().is_empty());
        a.launch(shell(&id, "exec sleep 1000")).await.unwrap();
        ev_a.started(&id).await;

        let (tx_b, rx_b) = mpsc::channel(64);
        let mut ev_b = Events::new(rx_b);
        let b = DockerRuntime::connect(tx_b, &node, "id-b").await.unwrap();
        assert_eq!(b.name_clashes(), ["id-a".to_owned()]);
        assert!(b.recover().await.unwrap().is_empty(), "b adopted a's container");
        assert!(b.running().is_empty());
        b.kill_all(Duration::from_secs(1)).await;
        drop(b);
        assert!(ev_b.none_for(&id));
        let name = container_name(&id.as_str().into());
        let state = inspect(&docker, &name).await.expect("a's container exists").state.unwrap();
        assert_eq!(state.running, Some(true), "b stopped a's container");

        a.kill(&id.as_str().into(), Duration::from_secs(1)).await.unwrap();
        let (_, killed, _) = ev_a.exited(&id).await;
        assert!(killed);
    }

    #[tokio::test]
    async fn reconcile_reports_containers_removed_behind_its_back() {
        // No event stream: only the periodic listing can notice.
        let Some(mut f) = fixture_with("reconcile", Watchers::ListingOnly).await else { return };
        let id = unique("vanish");
        f.rt.launch(shell(&id, "exec sleep 1000")).await.unwrap();
        f.ev.started(&id).await;
        let name = container_name(&id.as_str().into());
        f.docker.remove_container(&name, Some(RemoveContainerOptionsBuilder::new().force(true).build())).await.unwrap();
        let (exit, killed, msg) = f.ev.exited(&id).await;
        assert_eq!(exit, Exit::Unknown);
        assert!(!killed);
        assert!(msg.contains("removed outside mesh"), "{msg}");
        assert!(f.rt.running().is_empty());

        // A container that dies is noticed by the listing too, with its exit code.
        let id2 = unique("dies");
        f.rt.launch(shell(&id2, "exit 4")).await.unwrap();
        f.ev.started(&id2).await;
        assert_eq!(f.ev.exited(&id2).await.0, Exit::Code(4));
    }

    #[tokio::test]
    async fn events_alone_report_exits_and_ooms() {
        // No periodic listing: only the engine's event stream can notice.
        let Some(mut f) = fixture_with("events", Watchers::EventsOnly).await else { return };
        let id = unique("evexit");
        f.rt.launch(shell(&id, "exit 6")).await.unwrap();
        f.ev.started(&id).await;
        assert_eq!(f.ev.exited(&id).await, (Exit::Code(6), false, "exited with status 6".to_owned()));
        let id2 = unique("evoom");
        let mut s = shell(&id2, "dd if=/dev/zero of=/dev/null bs=64M count=1");
        s.mem = 16.0;
        f.rt.launch(s).await.unwrap();
        f.ev.started(&id2).await;
        assert_eq!(f.ev.exited(&id2).await.2, "memory limit of 16 MiB exceeded (OOM killed)");
        let id3 = unique("evrm");
        f.rt.launch(shell(&id3, "exec sleep 1000")).await.unwrap();
        f.ev.started(&id3).await;
        let name = container_name(&id3.as_str().into());
        f.docker.remove_container(&name, Some(RemoveContainerOptionsBuilder::new().force(true).build())).await.unwrap();
        let (exit, killed, _) = f.ev.exited(&id3).await;
        assert_eq!((exit, killed), (Exit::Code(137), false), "the die event carried the exit code");
    }

    #[tokio::test]
    async fn kill_all_ends_everything() {
        let Some(mut f) = fixture("killall").await else { return };
        let ids = [unique("all1"), unique("all2")];
        for id in &ids {
            let mut s = shell(id, "exec sleep 1000");
            params(&mut s, &[("init", "true")]);
            // kill_all gives each task its own grace: a generous one (see below).
            s.kill_grace = Duration::from_secs(30);
            f.rt.launch(s).await.unwrap();
            f.ev.started(id).await;
            // "started" is the container's start, not docker-init's: a SIGTERM that arrives before
            // init has spawned its child (and set up forwarding) is ignored by PID 1. Wait for
            // `sleep` to run, so the test measures forwarding, not that race.
            let name = container_name(&id.as_str().into());
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            loop {
                let top = f.docker.top_processes(&name, None).await.ok().and_then(|t| t.processes).unwrap_or_default();
                // The CMD column of `sleep` itself: docker-init's own command line
                // (`/sbin/docker-init -- sh -c exec sleep 1000`) also holds "sleep 1000", and
                // matching it let the SIGTERM in before init had a child to forward it to.
                if top.iter().flatten().any(|col| col.starts_with("sleep 1000")) {
                    break;
                }
                assert!(std::time::Instant::now() < deadline, "sleep never ran in {name}: {top:?}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        assert_eq!(f.rt.running().len(), 2);
        // A generous grace (the tasks' own, capped here): under load the engine can take seconds to
        // deliver the stop, and the test is about SIGTERM reaching `sleep` (143), not about how fast.
        f.rt.kill_all(Duration::from_secs(60)).await;
        assert!(f.rt.running().is_empty());
        for id in &ids {
            let (exit, killed, _) = f.ev.exited(id).await;
            assert_eq!(exit, Exit::Code(143), "docker-init passed SIGTERM on to sleep");
            assert!(killed);
        }
        assert_eq!(f.rt.name(), "docker");
    }
}
