//! The registrator driver: keeps the catalog in step with the containers started by hand on this
//! node's Docker engine, as gliderlabs Registrator does for Consul.
//!
//! The conventions (names, ids, tags, meta, checks) live in [`mesh_core::registrator`]; this task
//! only reads Docker and reports. It is level-triggered: after every change it sends the
//! **complete** set of instances (`ToControl::Services { source: "registrator", .. }`), which
//! replaces the previous set, so nothing stale can survive a resync.
//!
//! - **Start:** a full resync (list the running containers, inspect each), then the set is sent,
//!   even when empty, so instances left from an earlier run of the node go away.
//! - **Events:** the engine's container events (start, die, stop, kill, destroy, pause, unpause,
//!   update, rename, restart) are followed as they come: the named container is inspected again
//!   (gone = no instances) and the set is sent at once. Events that arrived meanwhile are drained
//!   first, so a burst gives one send.
//! - **Periodic resync** every [`RESYNC_EVERY`], so a lost event cannot leave an instance behind.
//! - **Errors:** a broken event stream is re-opened with backoff and followed by a resync; a
//!   container that vanished between an event and its inspection counts as gone; no container
//!   shape stops the task. Until a first resync succeeds nothing is sent (the previous set stays,
//!   as with Registrator when it cannot reach Docker).
//! - **Stop:** [`Registrator::shutdown`]; the instances stay in the catalog until the next start's
//!   resync (Registrator has no cleanup at exit either).

use crate::control::{ControlHandle, ControlMsg};
use bollard::Docker;
use bollard::errors::Error as DockerError;
use bollard::models::{ContainerInspectResponse, EventMessage, EventMessageTypeEnum};
use bollard::query_parameters::{EventsOptions, InspectContainerOptions, ListContainersOptions};
use futures_util::{FutureExt, Stream, StreamExt};
use mesh_core::catalog::ServiceInstance;
use mesh_core::model::AgentId;
use mesh_core::proto::ToControl;
use mesh_core::registrator::{
    ContainerView, ExposedPort, MESH_TASK_LABEL, PublishedPort, RegistratorOptions, SOURCE, parse_port_key,
    services_for,
};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::pin::Pin;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::watch;
use tracing::{debug, info, warn};

/// Time between full resyncs.
pub const RESYNC_EVERY: Duration = Duration::from_secs(10);
/// First delay before re-opening a broken event stream; doubles up to [`MAX_BACKOFF`].
pub const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// Longest delay between reconnection attempts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Timeout of one Docker request (list, inspect).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Containers inspected at once during a resync.
const INSPECT_CONCURRENCY: usize = 8;
/// Most events handled in one batch (the rest go in the next one).
const MAX_BATCH: usize = 1024;
/// The container events that can change what a container provides.
pub const EVENTS: &[&str] =
    &["start", "restart", "die", "stop", "kill", "destroy", "pause", "unpause", "update", "rename"];

/// A running registrator task.
pub struct Registrator {
    stop: watch::Sender<bool>,
    join: Option<tokio::task::JoinHandle<()>>,
}

impl Registrator {
    /// Stop the task and wait for it. The instances stay registered until the next start.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        if let Some(join) = self.join.take() {
            let _ = join.await;
        }
    }
}

impl Drop for Registrator {
    fn drop(&mut self) {
        if let Some(join) = self.join.take() {
            join.abort();
        }
    }
}

/// Start the registrator for agent `node`: its instances are reported as `node`'s (and
/// `opts.node` is set to it). Returns at once; the first resync runs in the task.
pub fn spawn(docker: Docker, node: AgentId, control: ControlHandle, mut opts: RegistratorOptions) -> Registrator {
    opts.node = node.0.clone();
    let (stop, stop_rx) = watch::channel(false);
    let driver = Driver { docker, node, control, opts, containers: HashMap::new(), last_sent: None };
    let join = tokio::spawn(driver.run(stop_rx));
    Registrator { stop, join: Some(join) }
}

type Events = Pin<Box<dyn Stream<Item = Result<EventMessage, DockerError>> + Send>>;

struct Driver {
    docker: Docker,
    node: AgentId,
    control: ControlHandle,
    opts: RegistratorOptions,
    /// Instances by container id (only containers that provide some).
    containers: HashMap<String, Vec<ServiceInstance>>,
    /// The set last handed to the control side.
    last_sent: Option<Vec<ServiceInstance>>,
}

/// What inspecting one container gave.
enum Seen {
    /// It exists; these are its instances (maybe none).
    Instances(Vec<ServiceInstance>),
    /// It does not exist (any more).
    Gone,
}

fn now_secs() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

impl Driver {
    async fn run(mut self, mut stop: watch::Receiver<bool>) {
        info!(node = %self.node, "registrator started");
        let mut backoff = MIN_BACKOFF;
        'connect: loop {
            // The stream is opened lazily, after the resync below; asking for the events since
            // just before the resync means nothing that happens in between is missed (anything
            // earlier is covered by the resync). A replayed event only costs an inspect.
            let mut events = self.subscribe(now_secs() - 1);
            if let Err(e) = self.resync().await {
                warn!(error = %e, retry_in = ?backoff, "registrator: resync failed");
                if sleep_or_stop(&mut stop, backoff).await {
                    break 'connect;
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
            self.publish().await;
            let mut resync = tokio::time::interval_at(tokio::time::Instant::now() + RESYNC_EVERY, RESYNC_EVERY);
            resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = stop.changed() => break 'connect,
                    ev = events.next() => {
                        let Some(first) = ev else {
                            warn!(retry_in = ?backoff, "registrator: the Docker event stream ended; reconnecting");
                            break;
                        };
                        let mut batch = vec![first];
                        // Coalesce a burst: take whatever is already there before acting.
                        while batch.len() < MAX_BATCH {
                            match events.next().now_or_never() {
                                Some(Some(ev)) => batch.push(ev),
                                _ => break,
                            }
                        }
                        let mut ids = BTreeSet::new();
                        let mut broken = None;
                        for ev in batch {
                            match ev {
                                Ok(ev) => {
                                    if let Some(id) = relevant(&ev) {
                                        ids.insert(id);
                                    }
                                }
                                Err(e) => broken = Some(e),
                            }
                        }
                        if !ids.is_empty() {
                            backoff = MIN_BACKOFF;
                            for id in ids {
                                self.refresh(&id).await;
                            }
                            self.publish().await;
                        }
                        if let Some(e) = broken {
                            warn!(error = %e, retry_in = ?backoff, "registrator: Docker event stream failed; reconnecting");
                            break;
                        }
                    }
                    _ = resync.tick() => {
                        match self.resync().await {
                            Ok(()) => {
                                backoff = MIN_BACKOFF; // up and answering for a while
                                self.publish().await;
                            }
                            Err(e) => {
                                warn!(error = %e, "registrator: periodic resync failed; reconnecting");
                                break;
                            }
                        }
                    }
                }
            }
            if sleep_or_stop(&mut stop, backoff).await {
                break 'connect;
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
        debug!("registrator stopped");
    }

    fn subscribe(&self, since: i64) -> Events {
        let filters = HashMap::from([
            ("type".to_owned(), vec!["container".to_owned()]),
            ("event".to_owned(), EVENTS.iter().map(|e| e.to_string()).collect()),
        ]);
        let opts = EventsOptions { since: Some(since.to_string()), until: None, filters: Some(filters) };
        Box::pin(self.docker.events(Some(opts)))
    }

    /// Replace the whole map from the engine's list of running containers.
    async fn resync(&mut self) -> Result<(), DockerError> {
        let opts = ListContainersOptions { all: false, ..Default::default() };
        let list = match tokio::time::timeout(REQUEST_TIMEOUT, self.docker.list_containers(Some(opts))).await {
            Ok(r) => r?,
            Err(_) => return Err(DockerError::RequestTimeoutError),
        };
        let ids: Vec<String> = list
            .into_iter()
            .filter(|c| !c.labels.as_ref().is_some_and(|l| l.contains_key(MESH_TASK_LABEL)))
            .filter_map(|c| c.id)
            .collect();
        let docker = &self.docker;
        let opts = &self.opts;
        let seen: Vec<(String, Result<Seen, DockerError>)> = futures_util::stream::iter(ids)
            .map(|id| async move {
                let r = inspect(docker, &id, opts).await;
                (id, r)
            })
            .buffer_unordered(INSPECT_CONCURRENCY)
            .collect()
            .await;
        let mut next = HashMap::new();
        for (id, r) in seen {
            match r {
                Ok(Seen::Instances(v)) if !v.is_empty() => {
                    next.insert(id, v);
                }
                Ok(_) => {}
                Err(e) => {
                    // Keep what we knew about this one; the next event or resync settles it.
                    debug!(container = %id, error = %e, "registrator: inspect failed during resync");
                    if let Some(v) = self.containers.get(&id) {
                        next.insert(id, v.clone());
                    }
                }
            }
        }
        self.containers = next;
        Ok(())
    }

    /// Inspect one container again after an event.
    async fn refresh(&mut self, id: &str) {
        match inspect(&self.docker, id, &self.opts).await {
            Ok(Seen::Instances(v)) if !v.is_empty() => {
                self.containers.insert(id.to_owned(), v);
            }
            Ok(_) => {
                self.containers.remove(id);
            }
            Err(e) => debug!(container = %id, error = %e, "registrator: inspect failed; the next resync settles it"),
        }
    }

    /// Send the complete set if it differs from the last one sent.
    async fn publish(&mut self) {
        let mut all: Vec<ServiceInstance> = self.containers.values().flatten().cloned().collect();
        all.sort_by(|a, b| (&a.service, &a.id).cmp(&(&b.service, &b.id)));
        if self.last_sent.as_ref() == Some(&all) {
            return;
        }
        debug!(instances = all.len(), "registrator: sending the service set");
        let msg =
            ToControl::Services { agent_id: self.node.clone(), source: SOURCE.to_owned(), instances: all.clone() };
        match self.control.send(ControlMsg::FromAgent(msg)).await {
            Ok(()) => self.last_sent = Some(all),
            Err(e) => {
                warn!(error = %e, "registrator: the control side did not take the service set");
                self.last_sent = None;
            }
        }
    }
}

/// The container an event is about, when it is one that can change the instance set.
fn relevant(ev: &EventMessage) -> Option<String> {
    if ev.typ.is_some_and(|t| t != EventMessageTypeEnum::CONTAINER) {
        return None;
    }
    let action = ev.action.as_deref()?;
    // Actions may carry a suffix (`health_status: healthy`); only the verb matters.
    let verb = action.split(':').next().unwrap_or(action).trim();
    if !EVENTS.contains(&verb) {
        return None;
    }
    ev.actor.as_ref()?.id.clone().filter(|id| !id.is_empty())
}

/// Waits `d` unless stopped first; returns whether to stop.
async fn sleep_or_stop(stop: &mut watch::Receiver<bool>, d: Duration) -> bool {
    if *stop.borrow() {
        return true;
    }
    tokio::select! {
        _ = stop.changed() => true,
        _ = tokio::time::sleep(d) => false,
    }
}

async fn inspect(docker: &Docker, id: &str, opts: &RegistratorOptions) -> Result<Seen, DockerError> {
    let r = tokio::time::timeout(REQUEST_TIMEOUT, docker.inspect_container(id, None::<InspectContainerOptions>)).await;
    match r {
        Err(_) => Err(DockerError::RequestTimeoutError),
        Ok(Err(DockerError::DockerResponseServerError { status_code: 404, .. })) => Ok(Seen::Gone),
        Ok(Err(e)) => Err(e),
        Ok(Ok(c)) => Ok(Seen::Instances(services_for(&view(&c), opts))),
    }
}

/// The registrator's view of an inspected container. Anything missing or malformed is left out
/// rather than failing.
pub fn view(c: &ContainerInspectResponse) -> ContainerView {
    let config = c.config.as_ref();
    let state = c.state.as_ref();
    let running = state.and_then(|s| s.running).unwrap_or(false) && !state.and_then(|s| s.paused).unwrap_or(false);
    let env = config
        .and_then(|cfg| cfg.env.as_ref())
        .map(|env| env.iter().filter_map(|kv| kv.split_once('=')).map(|(k, v)| (k.to_owned(), v.to_owned())).collect())
        .unwrap_or_default();
    let labels: BTreeMap<String, String> = config
        .and_then(|cfg| cfg.labels.as_ref())
        .map(|l| l.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
        .unwrap_or_default();
    let network_mode = c.host_config.as_ref().and_then(|h| h.network_mode.as_deref()).unwrap_or("");
    let host_network = network_mode == "host";
    let settings = c.network_settings.as_ref();
    let mut published = Vec::new();
    let mut ports: Vec<_> = settings.and_then(|n| n.ports.as_ref()).map(|p| p.iter().collect()).unwrap_or_default();
    ports.sort_by(|a, b| a.0.cmp(b.0));
    for (key, bindings) in ports {
        let Some((container_port, protocol)) = parse_port_key(key) else { continue };
        for b in bindings.iter().flatten() {
            let Some(host_port) = b.host_port.as_deref().and_then(|p| p.trim().parse::<u16>().ok()) else { continue };
            let host_ip = b.host_ip.as_deref().and_then(|ip| ip.trim().parse::<IpAddr>().ok());
            published.push(PublishedPort { container_port, protocol, host_ip, host_port });
        }
    }
    let mut exposed = Vec::new();
    for key in config.and_then(|cfg| cfg.exposed_ports.as_ref()).into_iter().flatten() {
        let Some((container_port, protocol)) = parse_port_key(key) else { continue };
        // With bridge networking every exposed port is listed under NetworkSettings.Ports (with
        // no binding when unpublished); with host networking none are, and the core treats the
        // exposed ones as published on the same number.
        if !published.iter().any(|p: &PublishedPort| (p.container_port, p.protocol) == (container_port, protocol)) {
            exposed.push(ExposedPort { container_port, protocol });
        }
    }
    let ip = settings.and_then(|n| n.networks.as_ref()).and_then(|nets| {
        let mut nets: Vec<_> = nets.iter().collect();
        nets.sort_by(|a, b| a.0.cmp(b.0));
        nets.into_iter().find_map(|(_, ep)| ep.ip_address.as_deref().and_then(|ip| ip.parse::<IpAddr>().ok()))
    });
    ContainerView {
        id: c.id.clone().unwrap_or_default(),
        name: c.name.clone().unwrap_or_default(),
        image: config.and_then(|cfg| cfg.image.clone()).or_else(|| c.image.clone()).unwrap_or_default(),
        env,
        labels,
        published,
        exposed,
        running,
        host_network,
        ip,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bollard::models::{ContainerConfig, ContainerState, EventActor, HostConfig, NetworkSettings, PortBinding};

    fn inspected(json: serde_json::Value) -> ContainerInspectResponse {
        serde_json::from_value(json).expect("inspect json")
    }

    #[test]
    fn view_reads_an_engine_1_41_inspect_answer() {
        let c = inspected(serde_json::json!({
            "Id": "f00d",
            "Name": "/web1",
            "Image": "sha256:abc",
            "State": {"Running": true, "Paused": false},
            "Config": {
                "Image": "mesh-test/busybox:latest",
                "Env": ["PATH=/bin", "SERVICE_NAME=ext", "NOVALUE"],
                "Labels": {"SERVICE_TAGS": "a,b"},
                "ExposedPorts": {"8080/tcp": {}, "9000/tcp": {}, "53/udp": {}}
            },
            "HostConfig": {"NetworkMode": "default"},
            "NetworkSettings": {
                "IPAddress": "172.17.0.2",
                "Ports": {
                    "8080/tcp": [{"HostIp": "0.0.0.0", "HostPort": "49153"}, {"HostIp": "::", "HostPort": "49153"}],
                    "9000/tcp": null,
                    "53/udp": [{"HostIp": "127.0.0.1", "HostPort": "49154"}]
                },
                "Networks": {"bridge": {"IPAddress": "172.17.0.2"}}
            }
        }));
        let v = view(&c);
        assert_eq!(v.name, "/web1");
        assert_eq!(v.image, "mesh-test/busybox:latest");
        assert!(v.running && !v.host_network);
        assert_eq!(v.env, [("PATH".to_string(), "/bin".to_string()), ("SERVICE_NAME".into(), "ext".into())]);
        assert_eq!(v.labels.get("SERVICE_TAGS").map(String::as_str), Some("a,b"));
        assert_eq!(v.published.len(), 3, "{:?}", v.published);
        assert_eq!(v.exposed.len(), 1);
        assert_eq!(v.exposed[0].container_port, 9000);
        assert_eq!(v.ip, Some("172.17.0.2".parse().unwrap()));
        let inst = services_for(&v, &RegistratorOptions::new("n1"));
        let got: Vec<(&str, u16, Option<IpAddr>)> =
            inst.iter().map(|i| (i.service.as_str(), i.port, i.address)).collect();
        assert_eq!(got, [("ext-53", 49154, Some("127.0.0.1".parse().unwrap())), ("ext-8080", 49153, None)]);
    }

    #[test]
    fn view_of_odd_containers_never_fails() {
        let v = view(&ContainerInspectResponse::default());
        assert!(!v.running);
        assert!(services_for(&v, &RegistratorOptions::new("n1")).is_empty());
        // Paused: nothing. Malformed ports: skipped.
        let c = ContainerInspectResponse {
            state: Some(ContainerState { running: Some(true), paused: Some(true), ..Default::default() }),
            config: Some(ContainerConfig { image: Some("x".into()), ..Default::default() }),
            network_settings: Some(NetworkSettings {
                ports: Some(HashMap::from([
                    ("bogus".to_owned(), Some(vec![PortBinding { host_ip: None, host_port: Some("1".into()) }])),
                    (
                        "80/tcp".to_owned(),
                        Some(vec![PortBinding { host_ip: Some("nope".into()), host_port: Some("x".into()) }]),
                    ),
                ])),
                ..Default::default()
            }),
            ..Default::default()
        };
        let v = view(&c);
        assert!(!v.running, "paused counts as not running");
        assert!(v.published.is_empty());
    }

    #[test]
    fn host_network_containers_publish_their_exposed_ports() {
        let c = ContainerInspectResponse {
            name: Some("/h".into()),
            state: Some(ContainerState { running: Some(true), ..Default::default() }),
            config: Some(ContainerConfig {
                image: Some("app:1".into()),
                exposed_ports: Some(vec!["7000/tcp".into()]),
                ..Default::default()
            }),
            host_config: Some(HostConfig { network_mode: Some("host".into()), ..Default::default() }),
            ..Default::default()
        };
        let inst = services_for(&view(&c), &RegistratorOptions::new("n1"));
        assert_eq!(inst.len(), 1);
        assert_eq!((inst[0].service.as_str(), inst[0].port), ("app", 7000));
    }

    #[test]
    fn only_state_changing_container_events_are_relevant() {
        let ev = |typ: Option<EventMessageTypeEnum>, action: &str, id: Option<&str>| EventMessage {
            typ,
            action: Some(action.into()),
            actor: Some(EventActor { id: id.map(str::to_owned), attributes: None }),
            ..Default::default()
        };
        let c = Some(EventMessageTypeEnum::CONTAINER);
        assert_eq!(relevant(&ev(c, "start", Some("a"))), Some("a".into()));
        assert_eq!(relevant(&ev(c, "destroy", Some("a"))), Some("a".into()));
        assert_eq!(relevant(&ev(None, "die", Some("a"))), Some("a".into()));
        assert_eq!(relevant(&ev(c, "exec_start: sh", Some("a"))), None);
        assert_eq!(relevant(&ev(c, "create", Some("a"))), None);
        assert_eq!(relevant(&ev(Some(EventMessageTypeEnum::IMAGE), "start", Some("a"))), None);
        assert_eq!(relevant(&ev(c, "start", None)), None);
        assert_eq!(relevant(&ev(c, "start", Some(""))), None);
    }
}
