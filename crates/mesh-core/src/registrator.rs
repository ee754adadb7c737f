//! Registrator: service instances for containers started by hand, following gliderlabs
//! Registrator's (v7) conventions. Pure functions, no IO: the driver in `mesh-server` reads the
//! Docker engine, turns each container into a [`ContainerView`] and sends the union of
//! [`services_for`] over all containers as the complete set of the [`SOURCE`] source.
//!
//! What a container yields (see `shared/reference/consul.md` §5):
//!
//! - Nothing unless it runs, nothing for mesh's own task containers (label [`MESH_TASK_LABEL`];
//!   mesh registers those itself), nothing when `SERVICE_IGNORE` is set to a non-empty value.
//! - One instance per **published** port (the first binding of each `<port>/<proto>`; a port
//!   bound to host port 0 counts as unpublished). With host networking every exposed port counts
//!   as published on the same number. With [`RegistratorOptions::internal`] every exposed or
//!   published port is registered instead, with the container's own IP and port.
//! - Service name: the image's base name without registry, path, tag or digest
//!   (`docker.io/library/redis:7` → `redis`), or `SERVICE_NAME` (no name at all: not
//!   registered); when the container has more than one selected port, `-<container port>` is
//!   appended (`nginx-80`, `nginx-443`) unless the port's own `SERVICE_<port>_NAME` set the name.
//! - Id: `<node>:<container name>:<container port>`, plus `:udp` for UDP ports; `SERVICE_ID` or
//!   `SERVICE_<port>_ID` replaces it.
//! - Tags: `SERVICE_TAGS` (comma separated, `\,` escapes a comma; blanks trimmed, empty ones
//!   dropped), then [`RegistratorOptions::tags`], then `udp` for UDP ports.
//! - Address: [`RegistratorOptions::host_ip`] when set; else the binding's host IP when it is a
//!   specific address; else none (the node's address). Port: the host port.
//! - Meta: every other `SERVICE_<KEY>` / `SERVICE_<port>_<KEY>` with `<KEY>` lowercased
//!   (`SERVICE_REGION=us2` → `region: us2`), the `check_*` keys included. Health checks are parsed
//!   into a [`CheckSpec`] and written back into the meta under the well-known keys
//!   (`check_http`, `check_interval`, ...), so the health-check subsystem reads them with
//!   [`CheckSpec::from_meta`].
//! - Values come from the environment and the labels together; labels are read after the
//!   environment so a label wins over the same env key, and a per-port key
//!   (`SERVICE_80_NAME`) wins over the plain one (`SERVICE_NAME`), wherever each comes from.
//! - Health: passing.

use crate::catalog::{Health, ServiceInstance};
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::Duration;

/// The source name under which the registrator's instances are synced
/// (`ToControl::Services { source, .. }`).
pub const SOURCE: &str = "registrator";

/// Containers with this label are mesh's own task containers; the registrator skips them.
pub const MESH_TASK_LABEL: &str = "mesh.task";

/// Transport protocol of a container port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    /// TCP (also the default when Docker gives no protocol).
    Tcp,
    /// UDP: the instance gets the tag `udp` and the id suffix `:udp`.
    Udp,
    /// SCTP (treated like TCP, as Registrator does).
    Sctp,
}

impl Protocol {
    /// Reads Docker's protocol name (`tcp`, `udp`, `sctp`; case-insensitive, empty = tcp).
    pub fn parse(s: &str) -> Option<Protocol> {
        match s.to_ascii_lowercase().as_str() {
            "" | "tcp" => Some(Protocol::Tcp),
            "udp" => Some(Protocol::Udp),
            "sctp" => Some(Protocol::Sctp),
            _ => None,
        }
    }

    /// Docker's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        }
    }
}

/// Splits Docker's port key (`80/tcp`, `53/udp`, `8080`) into port and protocol.
pub fn parse_port_key(key: &str) -> Option<(u16, Protocol)> {
    let (port, proto) = key.split_once('/').unwrap_or((key, "tcp"));
    Some((port.trim().parse().ok()?, Protocol::parse(proto.trim())?))
}

/// One binding of a container port on the host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublishedPort {
    /// Port inside the container.
    pub container_port: u16,
    /// Its protocol.
    pub protocol: Protocol,
    /// The host address it is bound to; `None` or an unspecified address (`0.0.0.0`, `::`) means
    /// every address of the host.
    pub host_ip: Option<IpAddr>,
    /// The port on the host (0 = not actually published).
    pub host_port: u16,
}

/// A port the container exposes without publishing it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExposedPort {
    /// Port inside the container.
    pub container_port: u16,
    /// Its protocol.
    pub protocol: Protocol,
}

/// What the registrator needs to know about one container: a plain value the driver fills in
/// from `docker inspect`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ContainerView {
    /// Container id.
    pub id: String,
    /// Container name, with or without Docker's leading `/`.
    pub name: String,
    /// The image as the container was created from it (`Config.Image`).
    pub image: String,
    /// Environment variables, in order (entries without `=` left out).
    pub env: Vec<(String, String)>,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Published ports: one entry per host binding, in Docker's order (a port published on both
    /// `0.0.0.0` and `::` appears twice; the first binding is used).
    pub published: Vec<PublishedPort>,
    /// Ports exposed but not published (with host networking: every exposed port).
    pub exposed: Vec<ExposedPort>,
    /// Whether the container runs (paused or stopped containers yield nothing).
    pub running: bool,
    /// Whether it uses the host's network namespace: exposed ports then count as published on
    /// the same port number.
    pub host_network: bool,
    /// The container's own IP address (used with [`RegistratorOptions::internal`]).
    pub ip: Option<IpAddr>,
}

/// How the registrator registers containers (Registrator's command-line flags).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RegistratorOptions {
    /// The node (catalog node of every instance; also the first part of default ids).
    pub node: String,
    /// Register exposed ports too (published or not), with the container's IP and port
    /// (`-internal`).
    pub internal: bool,
    /// Force this address onto every instance (`-ip`); `None` uses the node's address unless a
    /// port is bound to a specific host IP.
    pub host_ip: Option<IpAddr>,
    /// Tags added to every instance (`-tags`).
    pub tags: Vec<String>,
    /// Only register containers that set a service name (`-explicit`).
    pub explicit: bool,
}

impl RegistratorOptions {
    /// Defaults for `node`: published ports only, no forced address or tags.
    pub fn new(node: impl Into<String>) -> Self {
        Self { node: node.into(), ..Self::default() }
    }
}

/// One port selected for registration.
struct Selected {
    container_port: u16,
    protocol: Protocol,
    host_ip: Option<IpAddr>,
    host_port: Option<u16>,
}

/// The service instances a container provides (see the module docs for the conventions).
/// Instances come sorted by container port, then protocol; their indexes are 0.
pub fn services_for(container: &ContainerView, opts: &RegistratorOptions) -> Vec<ServiceInstance> {
    if !container.running || container.labels.contains_key(MESH_TASK_LABEL) {
        return Vec::new();
    }
    let ports = select_ports(container, opts.internal);
    let is_group = ports.len() > 1;
    let default_name = image_base_name(&container.image);
    let container_name = container.name.strip_prefix('/').unwrap_or(&container.name);
    let mut out = Vec::new();
    for p in ports {
        let (mut meta, from_port) = service_metadata(container, p.container_port);
        if meta.get("ignore").is_some_and(|v| !v.is_empty()) {
            continue;
        }
        let mut service = match meta.get("name").filter(|v| !v.is_empty()) {
            Some(n) => n.clone(),
            None if opts.explicit => continue,
            None => default_name.clone(),
        };
        if service.is_empty() {
            continue; // no image name to go by (never seen with a real engine)
        }
        if is_group && !from_port.contains("name") {
            service = format!("{service}-{}", p.container_port);
        }
        let mut id = format!("{}:{}:{}", opts.node, container_name, p.container_port);
        let mut tags = parse_tags(meta.get("tags").map(String::as_str).unwrap_or(""));
        tags.extend(opts.tags.iter().filter(|t| !t.is_empty()).cloned());
        if p.protocol == Protocol::Udp {
            tags.push("udp".to_owned());
            id.push_str(":udp");
        }
        if let Some(custom) = meta.get("id").filter(|v| !v.is_empty()) {
            id = custom.clone();
        }
        let (address, port) = if opts.internal {
            (container.ip, p.container_port)
        } else {
            let bound = p.host_ip.filter(|ip| !ip.is_unspecified());
            (opts.host_ip.or(bound), p.host_port.unwrap_or(p.container_port))
        };
        meta.remove("id");
        meta.remove("tags");
        meta.remove("name");
        // Which container a command or script check runs in is never taken from the attributes.
        meta.remove(CHECK_CONTAINER);
        if let Ok(Some(check)) = CheckSpec::from_meta(&meta) {
            check.write_meta(&mut meta);
            if matches!(check.kind, CheckKind::Cmd(_) | CheckKind::Script(_)) {
                meta.insert(CHECK_CONTAINER.to_owned(), container.id.clone());
            }
        }
        out.push(ServiceInstance {
            id,
            service,
            node: opts.node.clone(),
            address,
            port,
            tags,
            meta,
            health: Health::Passing,
            source_health: Default::default(),
            weights: Default::default(),
            create_index: 0,
            modify_index: 0,
            extra: Default::default(),
        });
    }
    out
}

/// The ports to register, sorted: published ones (first binding per port) and, with host
/// networking, exposed ones on the same number; with `internal` also the unpublished ones.
fn select_ports(c: &ContainerView, internal: bool) -> Vec<Selected> {
    let mut ports: BTreeMap<(u16, Protocol), Selected> = BTreeMap::new();
    for e in &c.exposed {
        let host_port = c.host_network.then_some(e.container_port).filter(|p| *p != 0);
        ports.insert(
            (e.container_port, e.protocol),
            Selected { container_port: e.container_port, protocol: e.protocol, host_ip: None, host_port },
        );
    }
    let mut seen = BTreeSet::new();
    for b in &c.published {
        let key = (b.container_port, b.protocol);
        if !seen.insert(key) {
            continue; // the first binding of a port wins (Registrator takes published[0])
        }
        let host_port = (b.host_port != 0).then_some(b.host_port);
        let entry = Selected { container_port: b.container_port, protocol: b.protocol, host_ip: b.host_ip, host_port };
        match ports.get(&key) {
            // An unpublished binding never hides the host-network publication of the same port.
            Some(old) if old.host_port.is_some() && host_port.is_none() => {}
            _ => {
                ports.insert(key, entry);
            }
        }
    }
    ports.into_values().filter(|p| p.container_port != 0 && (internal || p.host_port.is_some())).collect()
}

/// The image's base name: registry, path, tag and digest stripped
/// (`registry:5000/team/app:1.2@sha256:..` → `app`).
pub fn image_base_name(image: &str) -> String {
    let no_digest = image.split('@').next().unwrap_or(image);
    let base = no_digest.rsplit('/').next().unwrap_or(no_digest);
    let name = base.split(':').next().unwrap_or(base);
    name.to_owned()
}

/// The `SERVICE_*` attributes of a container for one port, as Registrator's `serviceMetaData`:
/// keys lowercased without the prefix; `SERVICE_<port>_<KEY>` applies to that port only and wins
/// over `SERVICE_<KEY>`; labels are read after the environment. Returns the attributes and the
/// keys that came from a per-port attribute.
fn service_metadata(c: &ContainerView, port: u16) -> (BTreeMap<String, String>, BTreeSet<String>) {
    let port = port.to_string();
    let mut meta = BTreeMap::new();
    let mut from_port = BTreeSet::new();
    let pairs = c.env.iter().map(|(k, v)| (k.as_str(), v.as_str()));
    let pairs = pairs.chain(c.labels.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    for (k, v) in pairs {
        let Some(rest) = k.strip_prefix("SERVICE_") else { continue };
        let key = rest.to_lowercase();
        if from_port.contains(&key) {
            continue;
        }
        match key.split_once('_') {
            Some((p, sub)) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => {
                if p == port {
                    meta.insert(sub.to_owned(), v.to_owned());
                    from_port.insert(sub.to_owned());
                }
            }
            _ => {
                meta.insert(key, v.to_owned());
            }
        }
    }
    (meta, from_port)
}

/// Splits `SERVICE_TAGS`: commas separate tags, `\,` is a literal comma; tags are trimmed and
/// empty ones dropped.
pub fn parse_tags(s: &str) -> Vec<String> {
    let mut tags = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars().peekable();
    while let Some(ch) = chars.next() {
        match ch {
            '\\' if chars.peek() == Some(&',') => {
                cur.push(',');
                chars.next();
            }
            ',' => tags.push(std::mem::take(&mut cur)),
            _ => cur.push(ch),
        }
    }
    tags.push(cur);
    tags.into_iter().map(|t| t.trim().to_owned()).filter(|t| !t.is_empty()).collect()
}

/// Well-known meta key: HTTP check path (`SERVICE_CHECK_HTTP=/health`).
pub const CHECK_HTTP: &str = "check_http";
/// Well-known meta key: HTTPS check path.
pub const CHECK_HTTPS: &str = "check_https";
/// Well-known meta key: method of an HTTP check.
pub const CHECK_HTTP_METHOD: &str = "check_http_method";
/// Well-known meta key: method of an HTTPS check.
pub const CHECK_HTTPS_METHOD: &str = "check_https_method";
/// Well-known meta key: command run inside the container.
pub const CHECK_CMD: &str = "check_cmd";
/// Well-known meta key: script run inside the container (`docker exec`).
pub const CHECK_SCRIPT: &str = "check_script";
/// Meta key set by the registrator (never from attributes): the id of the container a command or
/// script check runs in.
pub const CHECK_CONTAINER: &str = "check_container";
/// Well-known meta key: TTL of a TTL check (`30s`).
pub const CHECK_TTL: &str = "check_ttl";
/// Well-known meta key: TCP check (any non-empty value).
pub const CHECK_TCP: &str = "check_tcp";
/// Well-known meta key: gRPC check (any non-empty value).
pub const CHECK_GRPC: &str = "check_grpc";
/// Well-known meta key: gRPC over TLS.
pub const CHECK_GRPC_USE_TLS: &str = "check_grpc_use_tls";
/// Well-known meta key: check interval (default 10s for every kind but TTL).
pub const CHECK_INTERVAL: &str = "check_interval";
/// Well-known meta key: check timeout.
pub const CHECK_TIMEOUT: &str = "check_timeout";
/// Well-known meta key: initial status (`passing`, `warning`, `critical`).
pub const CHECK_INITIAL_STATUS: &str = "check_initial_status";
/// Well-known meta key: deregister after being critical this long.
pub const CHECK_DEREGISTER_AFTER: &str = "check_deregister_after";

/// Registrator's default check interval.
pub const DEFAULT_CHECK_INTERVAL: Duration = Duration::from_secs(10);

/// What a health check probes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CheckKind {
    /// `GET` (or `method`) `http[s]://<address>:<port><path>`: 2xx passes, 429 warns.
    Http {
        /// Request path, e.g. `/health`.
        path: String,
        /// Whether to use HTTPS.
        tls: bool,
        /// HTTP method, when not `GET`.
        method: Option<String>,
    },
    /// A command run inside the container (`SERVICE_CHECK_CMD`).
    Cmd(String),
    /// A script run inside the container, never on the host (`SERVICE_CHECK_SCRIPT`; `$SERVICE_IP`,
    /// `$SERVICE_PORT` substituted). Like `Cmd`, it runs only when script checks are enabled.
    Script(String),
    /// A TTL check: passing only while refreshed within this time.
    Ttl(Duration),
    /// A TCP connect to `<address>:<port>`.
    Tcp,
    /// A gRPC health check on `<address>:<port>`.
    Grpc {
        /// Whether to use TLS.
        tls: bool,
    },
}

/// A health check declared through `SERVICE[_<port>]_CHECK_*` attributes (one per instance). When
/// several kinds are set, Registrator's order decides: HTTP, HTTPS, cmd, script, TTL, TCP, gRPC.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckSpec {
    /// What to probe.
    pub kind: CheckKind,
    /// Time between probes (`None` for TTL checks).
    pub interval: Option<Duration>,
    /// Probe timeout (HTTP, HTTPS, TCP, cmd and script; `None` = the checker's default).
    pub timeout: Option<Duration>,
    /// Status before the first result (`None` = the checker's default).
    pub initial_status: Option<Health>,
    /// Deregister the instance after it has been critical this long.
    pub deregister_after: Option<Duration>,
}

/// A check attribute that cannot be read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid {key} {value:?}: {reason}")]
pub struct CheckError {
    /// The meta key.
    pub key: String,
    /// Its value.
    pub value: String,
    /// Why.
    pub reason: String,
}

fn get<'a>(meta: &'a BTreeMap<String, String>, key: &str) -> Option<&'a str> {
    meta.get(key).map(String::as_str).filter(|v| !v.is_empty())
}

fn duration_at(meta: &BTreeMap<String, String>, key: &str) -> Result<Option<Duration>, CheckError> {
    get(meta, key)
        .map(|v| parse_go_duration(v).map_err(|reason| CheckError { key: key.to_owned(), value: v.to_owned(), reason }))
        .transpose()
}

impl CheckSpec {
    /// Reads the check from an instance's meta (the lowercased `check_*` keys). `Ok(None)` when no
    /// check is declared; an error when a declared value cannot be read.
    pub fn from_meta(meta: &BTreeMap<String, String>) -> Result<Option<CheckSpec>, CheckError> {
        let kind = if let Some(path) = get(meta, CHECK_HTTP) {
            CheckKind::Http {
                path: path.to_owned(),
                tls: false,
                method: get(meta, CHECK_HTTP_METHOD).map(str::to_owned),
            }
        } else if let Some(path) = get(meta, CHECK_HTTPS) {
            CheckKind::Http {
                path: path.to_owned(),
                tls: true,
                method: get(meta, CHECK_HTTPS_METHOD).map(str::to_owned),
            }
        } else if let Some(cmd) = get(meta, CHECK_CMD) {
            CheckKind::Cmd(cmd.to_owned())
        } else if let Some(script) = get(meta, CHECK_SCRIPT) {
            CheckKind::Script(script.to_owned())
        } else if get(meta, CHECK_TTL).is_some() {
            CheckKind::Ttl(duration_at(meta, CHECK_TTL)?.unwrap_or_default())
        } else if get(meta, CHECK_TCP).is_some() {
            CheckKind::Tcp
        } else if get(meta, CHECK_GRPC).is_some() {
            let tls = get(meta, CHECK_GRPC_USE_TLS)
                .is_some_and(|v| !matches!(v.to_ascii_lowercase().as_str(), "false" | "0"));
            CheckKind::Grpc { tls }
        } else {
            return Ok(None);
        };
        let interval = match kind {
            CheckKind::Ttl(_) => None,
            _ => Some(duration_at(meta, CHECK_INTERVAL)?.unwrap_or(DEFAULT_CHECK_INTERVAL)),
        };
        let timeout = match kind {
            CheckKind::Http { .. } | CheckKind::Tcp | CheckKind::Cmd(_) | CheckKind::Script(_) => {
                duration_at(meta, CHECK_TIMEOUT)?
            }
            _ => None,
        };
        let initial_status = get(meta, CHECK_INITIAL_STATUS)
            .map(|v| match v.to_ascii_lowercase().as_str() {
                "passing" => Ok(Health::Passing),
                "warning" => Ok(Health::Warning),
                "critical" => Ok(Health::Critical),
                _ => Err(CheckError {
                    key: CHECK_INITIAL_STATUS.to_owned(),
                    value: v.to_owned(),
                    reason: "expected passing, warning or critical".to_owned(),
                }),
            })
            .transpose()?;
        let deregister_after = duration_at(meta, CHECK_DEREGISTER_AFTER)?;
        Ok(Some(CheckSpec { kind, interval, timeout, initial_status, deregister_after }))
    }

    /// Writes the check into `meta` under the well-known keys, in canonical form (durations as
    /// `10s` / `1500ms`, the default interval filled in). Other keys are left alone, so
    /// [`CheckSpec::from_meta`] on the result gives this check back.
    pub fn write_meta(&self, meta: &mut BTreeMap<String, String>) {
        match &self.kind {
            CheckKind::Http { path, tls, method } => {
                let (key, mkey) =
                    if *tls { (CHECK_HTTPS, CHECK_HTTPS_METHOD) } else { (CHECK_HTTP, CHECK_HTTP_METHOD) };
                meta.insert(key.to_owned(), path.clone());
                if let Some(m) = method {
                    meta.insert(mkey.to_owned(), m.clone());
                }
            }
            CheckKind::Cmd(c) => {
                meta.insert(CHECK_CMD.to_owned(), c.clone());
            }
            CheckKind::Script(s) => {
                meta.insert(CHECK_SCRIPT.to_owned(), s.clone());
            }
            CheckKind::Ttl(d) => {
                meta.insert(CHECK_TTL.to_owned(), format_duration(*d));
            }
            CheckKind::Tcp => {
                meta.insert(CHECK_TCP.to_owned(), "true".to_owned());
            }
            CheckKind::Grpc { tls } => {
                meta.insert(CHECK_GRPC.to_owned(), "true".to_owned());
                if *tls {
                    meta.insert(CHECK_GRPC_USE_TLS.to_owned(), "true".to_owned());
                }
            }
        }
        let durations = [
            (CHECK_INTERVAL, self.interval),
            (CHECK_TIMEOUT, self.timeout),
            (CHECK_DEREGISTER_AFTER, self.deregister_after),
        ];
        for (key, d) in durations {
            if let Some(d) = d {
                meta.insert(key.to_owned(), format_duration(d));
            }
        }
        if let Some(h) = self.initial_status {
            meta.insert(CHECK_INITIAL_STATUS.to_owned(), h.as_str().to_owned());
        }
    }
}

impl CheckSpec {
    /// The Consul check this declares for an instance reached at `ip:port`, as Registrator would
    /// register it. Commands and scripts become Consul docker checks (`/bin/sh -c` run by
    /// `docker exec` in `container`); without a container they are `None`, as is gRPC, which the
    /// agent cannot run.
    pub fn to_definition(
        &self,
        ip: std::net::IpAddr,
        port: u16,
        container: Option<&str>,
    ) -> Option<crate::catalog::CheckDefinition> {
        use crate::catalog::CheckDefinition;
        let host = match ip {
            std::net::IpAddr::V6(v6) => format!("[{v6}]"),
            v4 => v4.to_string(),
        };
        let ms = |d: Option<Duration>| d.map(|d| d.as_millis() as u64).unwrap_or(0);
        let mut def = CheckDefinition {
            interval_ms: ms(self.interval),
            timeout_ms: ms(self.timeout),
            deregister_critical_after_ms: ms(self.deregister_after),
            ..Default::default()
        };
        match &self.kind {
            CheckKind::Http { path, tls, method } => {
                let scheme = if *tls { "https" } else { "http" };
                let path = if path.starts_with('/') { path.clone() } else { format!("/{path}") };
                def.http = format!("{scheme}://{host}:{port}{path}");
                def.method = method.clone().unwrap_or_default();
                def.tls_skip_verify = *tls;
            }
            CheckKind::Tcp => def.tcp = format!("{host}:{port}"),
            CheckKind::Ttl(d) => def.ttl_ms = d.as_millis() as u64,
            CheckKind::Script(script) => {
                let script = script.replace("$SERVICE_IP", &ip.to_string()).replace("$SERVICE_PORT", &port.to_string());
                def.docker_container_id = container.filter(|c| !c.is_empty())?.to_owned();
                def.args = vec!["/bin/sh".into(), "-c".into(), script];
            }
            CheckKind::Cmd(cmd) => {
                def.docker_container_id = container.filter(|c| !c.is_empty())?.to_owned();
                def.args = vec!["/bin/sh".into(), "-c".into(), cmd.clone()];
            }
            CheckKind::Grpc { .. } => return None,
        }
        Some(def)
    }
}

/// Parses a Go duration (`10s`, `1m30s`, `500ms`, `1.5h`, `0`), as Registrator passes them on.
pub fn parse_go_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    if s.is_empty() {
        return Err("empty duration".to_owned());
    }
    let mut total = 0f64;
    let mut rest = s;
    while !rest.is_empty() {
        let num_len = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(rest.len());
        let (num, after) = rest.split_at(num_len);
        let value: f64 = num.parse().map_err(|_| format!("expected a number at {rest:?}"))?;
        let unit_len = after.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(after.len());
        let (unit, next) = after.split_at(unit_len);
        let scale = match unit {
            "ns" => 1e-9,
            "us" | "µs" | "μs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            "" => return Err("missing unit (ns, us, ms, s, m, h)".to_owned()),
            other => return Err(format!("unknown unit {other:?}")),
        };
        total += value * scale;
        rest = next;
    }
    Duration::try_from_secs_f64(total).map_err(|e| e.to_string())
}

/// Formats a duration for the meta: whole seconds as `10s`, otherwise milliseconds (`1500ms`).
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms.is_multiple_of(1000) { format!("{}s", ms / 1000) } else { format!("{ms}ms") }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn opts() -> RegistratorOptions {
        RegistratorOptions::new("node1")
    }

    fn pub_port(container_port: u16, protocol: Protocol, host_port: u16) -> PublishedPort {
        PublishedPort { container_port, protocol, host_ip: Some(IpAddr::V4(Ipv4Addr::UNSPECIFIED)), host_port }
    }

    fn container(image: &str, published: Vec<PublishedPort>) -> ContainerView {
        ContainerView {
            id: "abc123".into(),
            name: "/web1".into(),
            image: image.into(),
            published,
            running: true,
            ip: Some("172.17.0.5".parse().unwrap()),
            ..ContainerView::default()
        }
    }

    fn with_env(mut c: ContainerView, env: &[(&str, &str)]) -> ContainerView {
        c.env.extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        c
    }

    fn with_labels(mut c: ContainerView, labels: &[(&str, &str)]) -> ContainerView {
        c.labels.extend(labels.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        c
    }

    fn names(v: &[ServiceInstance]) -> Vec<&str> {
        v.iter().map(|i| i.service.as_str()).collect()
    }

    #[test]
    fn one_published_port_gives_one_instance_named_after_the_image() {
        let c = container("docker.io/library/redis:7", vec![pub_port(6379, Protocol::Tcp, 32768)]);
        let v = services_for(&c, &opts());
        assert_eq!(v.len(), 1);
        let i = &v[0];
        assert_eq!(i.service, "redis");
        assert_eq!(i.id, "node1:web1:6379");
        assert_eq!(i.node, "node1");
        assert_eq!(i.port, 32768);
        assert_eq!(i.address, None, "bound to 0.0.0.0: the node's address");
        assert!(i.tags.is_empty());
        assert!(i.meta.is_empty());
        assert_eq!(i.health, Health::Passing);
    }

    #[test]
    fn image_base_name_strips_registry_path_tag_and_digest() {
        for (image, want) in [
            ("redis", "redis"),
            ("redis:7", "redis"),
            ("library/redis", "redis"),
            ("docker.io/library/redis:7", "redis"),
            ("gliderlabs/foo:1", "foo"),
            ("localhost:5000/team/app", "app"),
            ("localhost:5000/team/app:1.2", "app"),
            ("ghcr.io/org/app@sha256:0123abcd", "app"),
            ("ghcr.io/org/app:1@sha256:0123abcd", "app"),
            ("mesh-test/busybox:latest", "busybox"),
        ] {
            assert_eq!(image_base_name(image), want, "{image}");
        }
    }

    #[test]
    fn several_published_ports_append_the_container_port() {
        let c = container("nginx", vec![pub_port(443, Protocol::Tcp, 32001), pub_port(80, Protocol::Tcp, 32000)]);
        let v = services_for(&c, &opts());
        assert_eq!(names(&v), ["nginx-80", "nginx-443"], "sorted by container port");
        assert_eq!(v[0].port, 32000);
        assert_eq!(v[1].port, 32001);
        assert_eq!(v[0].id, "node1:web1:80");
        assert_eq!(v[1].id, "node1:web1:443");
        // A plain SERVICE_NAME keeps the suffix ...
        let c2 = with_env(c.clone(), &[("SERVICE_NAME", "front")]);
        assert_eq!(names(&services_for(&c2, &opts())), ["front-80", "front-443"]);
        // ... a per-port one drops it for that port only.
        let c3 = with_env(c, &[("SERVICE_NAME", "front"), ("SERVICE_443_NAME", "tls")]);
        assert_eq!(names(&services_for(&c3, &opts())), ["front-80", "tls"]);
    }

    #[test]
    fn service_name_from_env() {
        let c =
            with_env(container("busybox", vec![pub_port(8080, Protocol::Tcp, 32000)]), &[("SERVICE_NAME", "ext-1")]);
        let v = services_for(&c, &opts());
        assert_eq!(names(&v), ["ext-1"]);
        assert!(v[0].meta.is_empty(), "name is not meta: {:?}", v[0].meta);
    }

    #[test]
    fn empty_service_name_falls_back_to_the_image() {
        let c = with_env(container("busybox", vec![pub_port(8080, Protocol::Tcp, 32000)]), &[("SERVICE_NAME", "")]);
        assert_eq!(names(&services_for(&c, &opts())), ["busybox"]);
    }

    #[test]
    fn tags_are_comma_separated_with_escapes() {
        let c = with_env(
            container("web", vec![pub_port(80, Protocol::Tcp, 32000)]),
            &[("SERVICE_TAGS", "primary, v1,,a\\,b")],
        );
        let v = services_for(&c, &opts());
        assert_eq!(v[0].tags, ["primary", "v1", "a,b"]);
        assert!(v[0].meta.is_empty());
        assert_eq!(parse_tags(""), Vec::<String>::new());
        assert_eq!(parse_tags("x"), ["x"]);
    }

    #[test]
    fn per_port_tags_win_over_plain_tags() {
        let c = with_env(
            container("web", vec![pub_port(80, Protocol::Tcp, 32000), pub_port(81, Protocol::Tcp, 32001)]),
            &[("SERVICE_80_TAGS", "http"), ("SERVICE_TAGS", "common")],
        );
        let v = services_for(&c, &opts());
        assert_eq!(v[0].tags, ["http"], "the per-port key wins, whatever the order");
        assert_eq!(v[1].tags, ["common"]);
    }

    #[test]
    fn forced_tags_are_added_after_the_containers_own() {
        let c = with_env(container("web", vec![pub_port(80, Protocol::Tcp, 32000)]), &[("SERVICE_TAGS", "a")]);
        let o = RegistratorOptions { tags: vec!["dc-east".into()], ..opts() };
        assert_eq!(services_for(&c, &o)[0].tags, ["a", "dc-east"]);
    }

    #[test]
    fn udp_ports_get_the_udp_tag_and_id_suffix() {
        let c = with_env(
            container("dns", vec![pub_port(53, Protocol::Udp, 32053), pub_port(53, Protocol::Tcp, 32054)]),
            &[("SERVICE_TAGS", "resolver")],
        );
        let v = services_for(&c, &opts());
        assert_eq!(names(&v), ["dns-53", "dns-53"], "two ports: both get the suffix");
        let tcp = v.iter().find(|i| i.port == 32054).unwrap();
        let udp = v.iter().find(|i| i.port == 32053).unwrap();
        assert_eq!(tcp.id, "node1:web1:53");
        assert_eq!(tcp.tags, ["resolver"]);
        assert_eq!(udp.id, "node1:web1:53:udp");
        assert_eq!(udp.tags, ["resolver", "udp"]);
    }

    #[test]
    fn service_id_overrides_and_per_port_id() {
        let c = with_env(
            container("web", vec![pub_port(80, Protocol::Tcp, 32000), pub_port(81, Protocol::Udp, 32001)]),
            &[("SERVICE_ID", "custom"), ("SERVICE_80_ID", "custom-80")],
        );
        let v = services_for(&c, &opts());
        assert_eq!(v[0].id, "custom-80");
        assert_eq!(v[1].id, "custom", "SERVICE_ID replaces the whole id, :udp included");
        assert!(v.iter().all(|i| i.meta.is_empty()));
    }

    #[test]
    fn service_ignore_skips_the_container_and_per_port_ignore_one_port() {
        let base = container("web", vec![pub_port(80, Protocol::Tcp, 32000), pub_port(81, Protocol::Tcp, 32001)]);
        assert!(services_for(&with_env(base.clone(), &[("SERVICE_IGNORE", "true")]), &opts()).is_empty());
        assert!(services_for(&with_env(base.clone(), &[("SERVICE_IGNORE", "false")]), &opts()).is_empty(), "any value");
        assert!(services_for(&with_labels(base.clone(), &[("SERVICE_IGNORE", "1")]), &opts()).is_empty());
        let v = services_for(&with_env(base.clone(), &[("SERVICE_81_IGNORE", "yes")]), &opts());
        assert_eq!(names(&v), ["web-80"], "the ignored port still counts for the suffix (Registrator)");
        let v = services_for(&with_env(base, &[("SERVICE_IGNORE", "")]), &opts());
        assert_eq!(v.len(), 2, "an empty value is no value (Registrator's mapDefault)");
    }

    #[test]
    fn other_service_keys_become_lowercased_meta() {
        let c = with_env(
            container("web", vec![pub_port(80, Protocol::Tcp, 32000), pub_port(81, Protocol::Tcp, 32001)]),
            &[
                ("SERVICE_REGION", "us2"),
                ("SERVICE_Owner_Team", "infra"),
                ("SERVICE_80_REGION", "eu1"),
                ("SERVICE_81_VERSION", "2"),
                ("SERVICE_99_VERSION", "9"),
                ("NOT_SERVICE_X", "no"),
                ("service_lower", "no"),
                ("PATH", "/bin"),
            ],
        );
        let v = services_for(&c, &opts());
        let m80 = &v[0].meta;
        let m81 = &v[1].meta;
        assert_eq!(m80.get("region").map(String::as_str), Some("eu1"));
        assert_eq!(m80.get("owner_team").map(String::as_str), Some("infra"));
        assert_eq!(m80.get("version"), None, "other ports' keys do not leak");
        assert_eq!(m81.get("region").map(String::as_str), Some("us2"));
        assert_eq!(m81.get("version").map(String::as_str), Some("2"));
        assert_eq!(m80.len(), 2, "{m80:?}");
        assert_eq!(m81.len(), 3, "{m81:?}");
    }

    #[test]
    fn labels_are_read_after_env_and_per_port_keys_win() {
        let base = container("web", vec![pub_port(80, Protocol::Tcp, 32000)]);
        let c = with_labels(with_env(base.clone(), &[("SERVICE_NAME", "from-env")]), &[("SERVICE_NAME", "from-label")]);
        assert_eq!(names(&services_for(&c, &opts())), ["from-label"]);
        let c =
            with_labels(with_env(base.clone(), &[("SERVICE_80_NAME", "env-port")]), &[("SERVICE_NAME", "label-plain")]);
        assert_eq!(names(&services_for(&c, &opts())), ["env-port"], "per-port env beats plain label");
        let c = with_labels(base, &[("SERVICE_NAME", "lbl"), ("SERVICE_TAGS", "t1,t2"), ("SERVICE_ZONE", "z")]);
        let v = services_for(&c, &opts());
        assert_eq!(v[0].service, "lbl");
        assert_eq!(v[0].tags, ["t1", "t2"]);
        assert_eq!(v[0].meta.get("zone").map(String::as_str), Some("z"));
    }

    #[test]
    fn mesh_task_containers_and_stopped_containers_give_nothing() {
        let c = container("web", vec![pub_port(80, Protocol::Tcp, 32000)]);
        assert!(services_for(&with_labels(c.clone(), &[(MESH_TASK_LABEL, "web.instance-1")]), &opts()).is_empty());
        let stopped = ContainerView { running: false, ..c };
        assert!(services_for(&stopped, &opts()).is_empty());
    }

    #[test]
    fn containers_without_published_ports_give_nothing_by_default() {
        let mut c = container("worker", vec![]);
        assert!(services_for(&c, &opts()).is_empty());
        c.exposed.push(ExposedPort { container_port: 9000, protocol: Protocol::Tcp });
        assert!(services_for(&c, &opts()).is_empty(), "exposed only");
        c.published.push(pub_port(9001, Protocol::Tcp, 0));
        assert!(services_for(&c, &opts()).is_empty(), "host port 0 = not published");
    }

    #[test]
    fn internal_registers_exposed_ports_with_the_container_address() {
        let mut c = container("web", vec![pub_port(80, Protocol::Tcp, 32000)]);
        c.exposed.push(ExposedPort { container_port: 9000, protocol: Protocol::Tcp });
        let o = RegistratorOptions { internal: true, ..opts() };
        let v = services_for(&c, &o);
        assert_eq!(names(&v), ["web-80", "web-9000"]);
        let ip: IpAddr = "172.17.0.5".parse().unwrap();
        assert_eq!((v[0].address, v[0].port), (Some(ip), 80), "container ip and port");
        assert_eq!((v[1].address, v[1].port), (Some(ip), 9000));
        // Without a container IP (host networking, none): the node's address.
        c.ip = None;
        assert_eq!(services_for(&c, &o)[0].address, None);
    }

    #[test]
    fn host_network_exposed_ports_count_as_published() {
        let mut c = container("web", vec![]);
        c.host_network = true;
        c.ip = None;
        c.exposed.push(ExposedPort { container_port: 8080, protocol: Protocol::Tcp });
        let v = services_for(&c, &opts());
        assert_eq!(names(&v), ["web"]);
        assert_eq!((v[0].port, v[0].address), (8080, None));
    }

    #[test]
    fn address_follows_the_binding_or_the_forced_ip() {
        let mut c = container("web", vec![]);
        c.published.push(PublishedPort {
            container_port: 80,
            protocol: Protocol::Tcp,
            host_ip: Some("127.0.0.2".parse().unwrap()),
            host_port: 32000,
        });
        assert_eq!(services_for(&c, &opts())[0].address, Some("127.0.0.2".parse().unwrap()));
        let forced: IpAddr = "10.1.2.3".parse().unwrap();
        let o = RegistratorOptions { host_ip: Some(forced), ..opts() };
        assert_eq!(services_for(&c, &o)[0].address, Some(forced), "-ip wins");
        c.published[0].host_ip = Some("::".parse().unwrap());
        assert_eq!(services_for(&c, &opts())[0].address, None, ":: is every address");
        c.published[0].host_ip = None;
        assert_eq!(services_for(&c, &opts())[0].address, None);
    }

    #[test]
    fn the_first_binding_of_a_port_is_used() {
        let mut c = container("web", vec![pub_port(80, Protocol::Tcp, 32000)]);
        c.published.push(PublishedPort {
            container_port: 80,
            protocol: Protocol::Tcp,
            host_ip: Some("::".parse().unwrap()),
            host_port: 32000,
        });
        c.published.push(pub_port(80, Protocol::Tcp, 32999));
        let v = services_for(&c, &opts());
        assert_eq!(v.len(), 1, "dual-stack bindings are one port");
        assert_eq!(names(&v), ["web"], "and do not make a group");
        assert_eq!(v[0].port, 32000);
    }

    #[test]
    fn explicit_only_registers_named_containers() {
        let o = RegistratorOptions { explicit: true, ..opts() };
        let c = container("web", vec![pub_port(80, Protocol::Tcp, 32000), pub_port(81, Protocol::Tcp, 32001)]);
        assert!(services_for(&c, &o).is_empty());
        let v = services_for(&with_env(c, &[("SERVICE_81_NAME", "admin")]), &o);
        assert_eq!(names(&v), ["admin"]);
    }

    #[test]
    fn odd_names_and_images_do_not_break_anything() {
        let mut c = container("", vec![pub_port(80, Protocol::Tcp, 32000)]);
        c.name = String::new();
        assert!(services_for(&c, &opts()).is_empty(), "no name to register under");
        let v = services_for(&with_env(c.clone(), &[("SERVICE_NAME", "named")]), &opts());
        assert_eq!(v[0].id, "node1::80");
        assert_eq!(v[0].service, "named");
        c.name = "no-slash".into();
        c.image = "sha256:0123456789abcdef".into();
        let v = services_for(&c, &opts());
        assert_eq!(v[0].id, "node1:no-slash:80");
        assert_eq!(v[0].service, "sha256");
    }

    #[test]
    fn checks_are_parsed_and_written_back_under_well_known_keys() {
        let c = with_env(
            container("web", vec![pub_port(80, Protocol::Tcp, 32000)]),
            &[
                ("SERVICE_CHECK_HTTP", "/health"),
                ("SERVICE_CHECK_TIMEOUT", "2s"),
                ("SERVICE_CHECK_INITIAL_STATUS", "passing"),
            ],
        );
        let meta = &services_for(&c, &opts())[0].meta;
        assert_eq!(meta.get(CHECK_HTTP).map(String::as_str), Some("/health"));
        assert_eq!(meta.get(CHECK_INTERVAL).map(String::as_str), Some("10s"), "default interval filled in");
        assert_eq!(meta.get(CHECK_TIMEOUT).map(String::as_str), Some("2s"));
        assert_eq!(meta.get(CHECK_INITIAL_STATUS).map(String::as_str), Some("passing"));
        let spec = CheckSpec::from_meta(meta).unwrap().unwrap();
        assert_eq!(
            spec,
            CheckSpec {
                kind: CheckKind::Http { path: "/health".into(), tls: false, method: None },
                interval: Some(Duration::from_secs(10)),
                timeout: Some(Duration::from_secs(2)),
                initial_status: Some(Health::Passing),
                deregister_after: None,
            }
        );
    }

    #[test]
    fn per_port_checks_apply_to_their_port() {
        let c = with_env(
            container("web", vec![pub_port(80, Protocol::Tcp, 32000), pub_port(9000, Protocol::Tcp, 32001)]),
            &[
                ("SERVICE_80_CHECK_HTTP", "/"),
                ("SERVICE_80_CHECK_INTERVAL", "1m30s"),
                ("SERVICE_9000_CHECK_TCP", "true"),
                ("SERVICE_CHECK_TIMEOUT", "500ms"),
            ],
        );
        let v = services_for(&c, &opts());
        let s80 = CheckSpec::from_meta(&v[0].meta).unwrap().unwrap();
        let s9000 = CheckSpec::from_meta(&v[1].meta).unwrap().unwrap();
        assert!(matches!(s80.kind, CheckKind::Http { .. }));
        assert_eq!(s80.interval, Some(Duration::from_secs(90)));
        assert_eq!(v[0].meta.get(CHECK_INTERVAL).map(String::as_str), Some("90s"));
        assert_eq!(s80.timeout, Some(Duration::from_millis(500)));
        assert_eq!(s9000.kind, CheckKind::Tcp);
        assert_eq!(s9000.interval, Some(DEFAULT_CHECK_INTERVAL));
        assert_eq!(v[1].meta.get(CHECK_TIMEOUT).map(String::as_str), Some("500ms"));
        assert!(!v[1].meta.contains_key(CHECK_HTTP));
    }

    #[test]
    fn ttl_checks_have_no_interval_and_keep_their_ttl() {
        let c = with_env(
            container("web", vec![pub_port(80, Protocol::Tcp, 32000)]),
            &[("SERVICE_CHECK_TTL", "30s"), ("SERVICE_CHECK_DEREGISTER_AFTER", "10m")],
        );
        let meta = &services_for(&c, &opts())[0].meta;
        let spec = CheckSpec::from_meta(meta).unwrap().unwrap();
        assert_eq!(spec.kind, CheckKind::Ttl(Duration::from_secs(30)));
        assert_eq!(spec.interval, None);
        assert_eq!(spec.deregister_after, Some(Duration::from_secs(600)));
        assert!(!meta.contains_key(CHECK_INTERVAL));
        assert_eq!(meta.get(CHECK_DEREGISTER_AFTER).map(String::as_str), Some("600s"));
    }

    #[test]
    fn check_kinds_follow_registrators_priority() {
        let m = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
        };
        let kind = |pairs: &[(&str, &str)]| CheckSpec::from_meta(&m(pairs)).unwrap().map(|s| s.kind);
        assert_eq!(kind(&[]), None);
        assert_eq!(kind(&[("region", "x")]), None);
        assert_eq!(kind(&[(CHECK_TCP, "true"), (CHECK_TTL, "5s")]), Some(CheckKind::Ttl(Duration::from_secs(5))));
        assert_eq!(
            kind(&[(CHECK_TCP, "true"), (CHECK_HTTPS, "/s"), (CHECK_HTTPS_METHOD, "HEAD")]),
            Some(CheckKind::Http { path: "/s".into(), tls: true, method: Some("HEAD".into()) })
        );
        assert_eq!(
            kind(&[(CHECK_HTTP, "/h"), (CHECK_HTTPS, "/s")]).map(|k| matches!(k, CheckKind::Http { tls: false, .. })),
            Some(true)
        );
        assert_eq!(
            kind(&[(CHECK_SCRIPT, "check $SERVICE_IP"), (CHECK_TTL, "5s")]),
            Some(CheckKind::Script("check $SERVICE_IP".into()))
        );
        assert_eq!(
            kind(&[(CHECK_CMD, "/bin/health"), (CHECK_SCRIPT, "x")]),
            Some(CheckKind::Cmd("/bin/health".into()))
        );
        assert_eq!(kind(&[(CHECK_GRPC, "true"), (CHECK_GRPC_USE_TLS, "true")]), Some(CheckKind::Grpc { tls: true }));
        assert_eq!(kind(&[(CHECK_TCP, "")]), None, "empty values declare nothing");
    }

    #[test]
    fn script_and_cmd_checks_run_in_their_own_container_never_on_the_host() {
        let c = with_labels(
            with_env(container("busybox", vec![pub_port(80, Protocol::Tcp, 32000)]), &[("SERVICE_CHECK_SCRIPT", "id")]),
            // An attribute cannot point the check at another container.
            &[("SERVICE_CHECK_CONTAINER", "someone-else")],
        );
        let inst = &services_for(&c, &opts())[0];
        assert_eq!(inst.meta.get(CHECK_CONTAINER).map(String::as_str), Some("abc123"));
        let spec = CheckSpec::from_meta(&inst.meta).unwrap().unwrap();
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let def = spec.to_definition(ip, 32000, Some("abc123")).expect("a docker check");
        assert_eq!(def.kind(), "docker");
        assert_eq!(def.docker_container_id, "abc123");
        assert_eq!(def.args, ["/bin/sh", "-c", "id"]);
        assert_eq!(spec.to_definition(ip, 32000, None), None, "no container, no check: never on the host");
        let cmd = CheckSpec { kind: CheckKind::Cmd("/bin/health".into()), ..spec };
        assert_eq!(
            cmd.to_definition(ip, 32000, Some("abc123")).map(|d| d.args),
            Some(vec!["/bin/sh".to_owned(), "-c".to_owned(), "/bin/health".to_owned()])
        );
        // Other kinds carry no container.
        let http =
            with_env(container("busybox", vec![pub_port(80, Protocol::Tcp, 32000)]), &[("SERVICE_CHECK_HTTP", "/")]);
        assert!(!services_for(&http, &opts())[0].meta.contains_key(CHECK_CONTAINER));
    }

    #[test]
    fn invalid_check_values_leave_the_raw_meta_and_register_anyway() {
        let c = with_env(
            container("web", vec![pub_port(80, Protocol::Tcp, 32000)]),
            &[("SERVICE_CHECK_TCP", "true"), ("SERVICE_CHECK_INTERVAL", "soon")],
        );
        let v = services_for(&c, &opts());
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].meta.get(CHECK_INTERVAL).map(String::as_str), Some("soon"));
        let err = CheckSpec::from_meta(&v[0].meta).unwrap_err();
        assert_eq!(err.key, CHECK_INTERVAL);
        let bad_status = m_of(&[(CHECK_TTL, "5s"), (CHECK_INITIAL_STATUS, "green")]);
        assert!(CheckSpec::from_meta(&bad_status).is_err());
    }

    fn m_of(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn check_specs_round_trip_through_meta() {
        let specs = [
            CheckSpec {
                kind: CheckKind::Http { path: "/x".into(), tls: true, method: Some("POST".into()) },
                interval: Some(Duration::from_millis(1500)),
                timeout: Some(Duration::from_secs(1)),
                initial_status: Some(Health::Warning),
                deregister_after: Some(Duration::from_secs(60)),
            },
            CheckSpec {
                kind: CheckKind::Tcp,
                interval: Some(DEFAULT_CHECK_INTERVAL),
                timeout: None,
                initial_status: None,
                deregister_after: None,
            },
            CheckSpec {
                kind: CheckKind::Ttl(Duration::from_secs(30)),
                interval: None,
                timeout: None,
                initial_status: Some(Health::Critical),
                deregister_after: None,
            },
            CheckSpec {
                kind: CheckKind::Grpc { tls: false },
                interval: Some(DEFAULT_CHECK_INTERVAL),
                timeout: None,
                initial_status: None,
                deregister_after: None,
            },
        ];
        for spec in specs {
            let mut meta = BTreeMap::new();
            spec.write_meta(&mut meta);
            assert_eq!(CheckSpec::from_meta(&meta).unwrap().as_ref(), Some(&spec), "{meta:?}");
        }
    }

    #[test]
    fn go_durations() {
        assert_eq!(parse_go_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_go_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_go_duration("1.5h"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_go_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_go_duration("0"), Ok(Duration::ZERO));
        assert!(parse_go_duration("10").is_err());
        assert!(parse_go_duration("s").is_err());
        assert!(parse_go_duration("3d").is_err());
        assert!(parse_go_duration("").is_err());
        assert_eq!(format_duration(Duration::from_secs(10)), "10s");
        assert_eq!(format_duration(Duration::from_millis(1500)), "1500ms");
    }

    #[test]
    fn port_keys() {
        assert_eq!(parse_port_key("80/tcp"), Some((80, Protocol::Tcp)));
        assert_eq!(parse_port_key("53/udp"), Some((53, Protocol::Udp)));
        assert_eq!(parse_port_key("8080"), Some((8080, Protocol::Tcp)));
        assert_eq!(parse_port_key("x/tcp"), None);
        assert_eq!(parse_port_key("80/quic"), None);
    }

    #[test]
    fn numeric_looking_plain_keys_stay_plain_and_foreign_port_keys_are_dropped() {
        let c = with_env(
            container("web", vec![pub_port(80, Protocol::Tcp, 32000)]),
            &[("SERVICE_080_NAME", "zero-padded"), ("SERVICE_80", "bare")],
        );
        let v = services_for(&c, &opts());
        assert_eq!(v[0].service, "web", "080 is not port 80 (string match, as Registrator)");
        assert_eq!(v[0].meta.get("80").map(String::as_str), Some("bare"));
        assert!(!v[0].meta.contains_key("name"));
    }
}
