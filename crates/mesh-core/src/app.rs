//! The Marathon app definition: its JSON shape (1.4 and 1.5 request formats), validation with
//! Marathon's error paths, and the mapping from app id to service name.

use crate::runtime::{ContainerSpec, HostAccess, NetworkMode, PortMapping, Volume};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use std::fmt;

/// A validated absolute app id such as `/prod/web`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct AppId(String);

impl fmt::Display for AppId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why an id is not a valid path id.
pub const INVALID_PATH_ID: &str = "must fully match regular expression '^(([a-z0-9]|[a-z0-9][a-z0-9\\-]*[a-z0-9])\\.)*([a-z0-9]|[a-z0-9][a-z0-9\\-]*[a-z0-9])|(\\.|\\.\\.)$'";

/// Bounds of an app definition, checked (as 422s) wherever a definition comes in. They keep every
/// accepted definition launchable and the memory a request can cause proportional to a small
/// input: a few bytes of JSON per list item would otherwise become a large stored struct (kept
/// in every app version), so lists and maps have a count limit besides the body size limit.
pub mod limits {
    /// Longest app or group id in bytes. A task's sandbox is named
    /// `<id without the first '/'>.instance-<uuid>._app.1` (53 bytes more), and must fit a file
    /// name (NAME_MAX, 255 bytes).
    pub const MAX_ID_LEN: usize = 200;
    /// Largest `backoffSeconds` (a day). Marathon requires 0 or more.
    pub const MAX_BACKOFF_SECONDS: f64 = 86_400.0;
    /// Largest `backoffFactor`. Marathon requires 1.0 or more.
    pub const MAX_BACKOFF_FACTOR: f64 = 100.0;
    /// Largest `maxLaunchDelaySeconds` (a day). Marathon requires 0 or more.
    pub const MAX_LAUNCH_DELAY_SECONDS: f64 = 86_400.0;
    /// Largest `taskKillGracePeriodSeconds` (an hour, as the runtimes cap it).
    pub const MAX_KILL_GRACE_SECONDS: f64 = 3_600.0;
    /// Largest `cpus` per task: more than any single machine offers.
    pub const MAX_CPUS: f64 = 4_096.0;
    /// Largest `mem` per task in MiB (16 TiB).
    pub const MAX_MEM_MIB: f64 = 16.0 * 1024.0 * 1024.0;
    /// Largest `disk` per task in MiB (1 PiB).
    pub const MAX_DISK_MIB: f64 = 1024.0 * 1024.0 * 1024.0;
    /// Largest `gpus` per task.
    pub const MAX_GPUS: f64 = 128.0;
    /// Most `instances` of an app.
    pub const MAX_INSTANCES: f64 = 100_000.0;
    /// Most ports (`portDefinitions`, `ports`, `portMappings`) of an app: a task can use at most
    /// an agent's port range.
    pub const MAX_PORTS: usize = 1_000;
    /// Most `labels` (of the app, or of one port).
    pub const MAX_LABELS: usize = 256;
    /// Most `env` entries.
    pub const MAX_ENV: usize = 1_024;
    /// Most `constraints`.
    pub const MAX_CONSTRAINTS: usize = 64;
    /// Most `healthChecks` (and `readinessChecks`).
    pub const MAX_HEALTH_CHECKS: usize = 16;
    /// Most items of any other list (`args`, `fetch`, `dependencies`, volumes, docker parameters,
    /// networks, roles).
    pub const MAX_LIST: usize = 256;
    /// Most app definitions in one request (`PUT /v2/apps`, a group update).
    pub const MAX_APPS_PER_REQUEST: usize = 1_000;
    /// Most JSON values (numbers, strings, list items, ...) in one app definition: parts kept as
    /// given (`container`, check definitions) cannot grow past this either.
    pub const MAX_JSON_VALUES: usize = 20_000;
    /// The most memory a request body may take once parsed, estimated as it is parsed (see
    /// [`super::parse_json`]): a few bytes of JSON can take hundreds in memory (`{}` is an
    /// object), so the body size alone does not bound it.
    pub const MAX_PARSED_BYTES: usize = 32 * 1024 * 1024;
}

fn valid_label(l: &str) -> bool {
    let b = l.as_bytes();
    !b.is_empty()
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

fn valid_segment(s: &str) -> bool {
    s == "." || s == ".." || s.split('.').all(valid_label)
}

impl AppId {
    /// Parse an id relative to `/`: `web`, `/web`, `prod/web/` and `/a/../b` are accepted;
    /// segments must match Marathon's path-id pattern.
    pub fn parse(raw: &str) -> Result<AppId, String> {
        Self::parse_relative(raw, "/")
    }

    /// Parse an id relative to a base group such as `/prod`.
    pub fn parse_relative(raw: &str, base: &str) -> Result<AppId, String> {
        let raw = raw.trim();
        if raw.is_empty() {
            return Err("path id must not be empty".into());
        }
        if raw.len() > limits::MAX_ID_LEN {
            return Err(format!(
                "path id must be at most {} bytes long (task sandbox names must fit a file name)",
                limits::MAX_ID_LEN
            ));
        }
        let mut parts: Vec<&str> =
            if raw.starts_with('/') { Vec::new() } else { base.split('/').filter(|s| !s.is_empty()).collect() };
        for seg in raw.split('/').filter(|s| !s.is_empty()) {
            if !valid_segment(seg) {
                return Err(INVALID_PATH_ID.into());
            }
            match seg {
                "." => {}
                ".." => {
                    if parts.pop().is_none() {
                        return Err("path id must not go above the root".into());
                    }
                }
                s => parts.push(s),
            }
        }
        if parts.is_empty() {
            return Err("path id must not be the root group".into());
        }
        let len = parts.iter().map(|p| p.len() + 1).sum::<usize>();
        if len > limits::MAX_ID_LEN {
            return Err(format!(
                "path id must be at most {} bytes long (task sandbox names must fit a file name)",
                limits::MAX_ID_LEN
            ));
        }
        if let Some(last) = parts.last()
            && ["restart", "tasks", "versions"].contains(last)
        {
            return Err(format!("must not end with '{last}'"));
        }
        Ok(AppId(format!("/{}", parts.join("/"))))
    }

    /// The id with its leading slash, e.g. `/prod/web`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Segments, e.g. `["prod", "web"]`.
    pub fn segments(&self) -> impl DoubleEndedIterator<Item = &str> {
        self.0.split('/').filter(|s| !s.is_empty())
    }

    /// The id as used in task ids: leading `/` dropped, `/` replaced by `_` (`prod_web`).
    pub fn task_prefix(&self) -> String {
        self.0.trim_start_matches('/').replace('/', "_")
    }

    /// The default service name: segments in reverse order joined by `-` (`/prod/web` → `web-prod`).
    pub fn default_service_name(&self) -> String {
        self.segments().rev().collect::<Vec<_>>().join("-")
    }

    /// Whether this app lies in group `group` (e.g. `/prod`), at any depth.
    pub fn in_group(&self, group: &str) -> bool {
        let g = group.trim_end_matches('/');
        g.is_empty() || self.0.strip_prefix(g).is_some_and(|rest| rest.starts_with('/'))
    }
}

/// One port definition of a host-networked app.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PortDefinition {
    /// With `requirePorts` the host port; otherwise the service port (0 = assign).
    #[serde(default)]
    pub port: u32,
    /// `tcp`, `udp` or `udp,tcp`.
    #[serde(default = "default_protocol")]
    pub protocol: String,
    /// Optional name (gives `$PORT_<NAME>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

fn default_protocol() -> String {
    "tcp".into()
}

/// Marathon's `upgradeStrategy`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UpgradeStrategy {
    /// Fraction of instances that must stay healthy during an upgrade.
    #[serde(default = "one")]
    pub minimum_health_capacity: f64,
    /// Fraction of extra instances allowed during an upgrade.
    #[serde(default = "one")]
    pub maximum_over_capacity: f64,
}

impl Default for UpgradeStrategy {
    fn default() -> Self {
        Self { minimum_health_capacity: 1.0, maximum_over_capacity: 1.0 }
    }
}

fn one() -> f64 {
    1.0
}

/// An app definition as stored and as returned by the API (only fields that marathon-python
/// 0.13 knows are emitted). Unknown request fields are ignored.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct App {
    /// The absolute id.
    pub id: AppId,
    /// Shell command.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmd: Option<String>,
    /// Argument vector.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args: Option<Vec<String>>,
    /// User to run as (informational for the process runtime).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Environment; values are strings or `{"secret": ...}` references.
    #[serde(default)]
    pub env: BTreeMap<String, Value>,
    /// Desired number of instances.
    pub instances: u32,
    /// CPU shares.
    pub cpus: f64,
    /// Memory in MiB.
    pub mem: f64,
    /// Disk in MiB.
    pub disk: f64,
    /// GPUs (always 0 here).
    pub gpus: f64,
    /// Executor (`""` or `//cmd`).
    pub executor: String,
    /// Placement constraints `[field, OP(, value)]`.
    #[serde(default)]
    pub constraints: Vec<Vec<String>>,
    /// Fetch URIs.
    #[serde(default)]
    pub fetch: Vec<Value>,
    /// Legacy store URLs.
    #[serde(default)]
    pub store_urls: Vec<String>,
    /// Launch backoff start, seconds.
    pub backoff_seconds: f64,
    /// Launch backoff multiplier (≥ 1).
    pub backoff_factor: f64,
    /// Launch backoff cap, seconds.
    pub max_launch_delay_seconds: f64,
    /// Container definition (Docker or Mesos), kept as given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<Value>,
    /// Health checks, kept as given.
    #[serde(default)]
    pub health_checks: Vec<Value>,
    /// Readiness checks, kept as given.
    #[serde(default)]
    pub readiness_checks: Vec<Value>,
    /// Apps this one depends on.
    #[serde(default)]
    pub dependencies: Vec<String>,
    /// Upgrade strategy.
    #[serde(default)]
    pub upgrade_strategy: UpgradeStrategy,
    /// Labels (`SERVICE_NAME`, `SERVICE_TAGS` are read by the catalog).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Accepted resource roles.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accepted_resource_roles: Option<Vec<String>>,
    /// Host ports (requirePorts) or service ports.
    #[serde(default)]
    pub port_definitions: Vec<PortDefinition>,
    /// Whether `portDefinitions[].port` are required host ports.
    pub require_ports: bool,
    /// Time between SIGTERM and SIGKILL, seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_kill_grace_period_seconds: Option<f64>,
    /// `YOUNGEST_FIRST` or `OLDEST_FIRST`.
    pub kill_selection: String,
    /// Networks (1.5 format).
    #[serde(default)]
    pub networks: Vec<Value>,
    /// Unreachable strategy, kept as given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unreachable_strategy: Option<Value>,
    /// The version: time of the last change, as a Marathon timestamp.
    #[serde(default)]
    pub version: String,
    /// When the config and the scale last changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version_info: Option<VersionInfo>,
}

/// `versionInfo` of an app.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VersionInfo {
    /// Last change of any kind (scale included).
    pub last_scaling_at: String,
    /// Last change of the config (not scale).
    pub last_config_change_at: String,
}

/// One validation problem, at a JSON path such as `/instances`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Violation {
    /// JSON pointer of the offending field (`/` for the whole object).
    pub path: String,
    /// What is wrong.
    pub errors: Vec<String>,
}

/// The validation errors of a definition (Marathon answers them as 422).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("Object is not valid")]
pub struct Invalid(pub Vec<Violation>);

impl Invalid {
    /// A single violation.
    pub fn at(path: &str, error: impl Into<String>) -> Self {
        Invalid(vec![Violation { path: path.into(), errors: vec![error.into()] }])
    }

    /// The same violations, for a definition nested at `prefix` (e.g. `/0` in a bulk update or
    /// `/apps(1)` in a group).
    pub fn prefixed(self, prefix: &str) -> Self {
        Invalid(
            self.0
                .into_iter()
                .map(|mut v| {
                    v.path = format!("{prefix}{}", v.path.trim_end_matches('/'));
                    v
                })
                .collect(),
        )
    }
}

struct Violations(Vec<Violation>);

impl Violations {
    fn add(&mut self, path: &str, e: impl Into<String>) {
        let e = e.into();
        if let Some(v) = self.0.iter_mut().find(|v| v.path == path) {
            v.errors.push(e);
        } else {
            self.0.push(Violation { path: path.into(), errors: vec![e] });
        }
    }
}

fn get_f64(v: &Value, path: &str, bad: &mut Violations) -> Option<f64> {
    match v {
        Value::Null => None,
        Value::Number(n) => n.as_f64(),
        _ => {
            bad.add(path, "error.expected.jsnumber");
            None
        }
    }
}

/// How many JSON values `v` holds (itself included), counting no further than `stop`.
pub fn json_values(v: &Value, stop: usize) -> usize {
    let mut n = 1;
    let children: Box<dyn Iterator<Item = &Value>> = match v {
        Value::Array(a) => Box::new(a.iter()),
        Value::Object(o) => Box::new(o.values()),
        _ => return 1,
    };
    for c in children {
        if n > stop {
            break;
        }
        n += json_values(c, stop - n);
    }
    n
}

/// The size limits of [`limits`] on a definition as given (before anything is converted).
fn check_sizes(obj: &serde_json::Map<String, Value>, bad: &mut Violations) {
    use limits::*;
    let len = |v: Option<&Value>| match v {
        Some(Value::Array(a)) => a.len(),
        Some(Value::Object(o)) => o.len(),
        _ => 0,
    };
    let mut at_most = |path: &str, v: Option<&Value>, max: usize, what: &str| {
        let n = len(v);
        if n > max {
            bad.add(path, format!("{n} {what} given; at most {max} are allowed"));
        }
    };
    for (key, max, what) in [
        ("portDefinitions", MAX_PORTS, "port definitions"),
        ("ports", MAX_PORTS, "ports"),
        ("labels", MAX_LABELS, "labels"),
        ("env", MAX_ENV, "environment variables"),
        ("constraints", MAX_CONSTRAINTS, "constraints"),
        ("healthChecks", MAX_HEALTH_CHECKS, "health checks"),
        ("readinessChecks", MAX_HEALTH_CHECKS, "readiness checks"),
        ("args", MAX_LIST, "arguments"),
        ("fetch", MAX_LIST, "fetch URIs"),
        ("uris", MAX_LIST, "URIs"),
        ("storeUrls", MAX_LIST, "store URLs"),
        ("dependencies", MAX_LIST, "dependencies"),
        ("networks", MAX_LIST, "networks"),
        ("acceptedResourceRoles", MAX_LIST, "roles"),
    ] {
        at_most(&format!("/{key}"), obj.get(key), max, what);
    }
    let container = obj.get("container");
    let docker = container.and_then(|c| c.get("docker"));
    at_most("/container/portMappings", container.and_then(|c| c.get("portMappings")), MAX_PORTS, "port mappings");
    at_most("/container/docker/portMappings", docker.and_then(|d| d.get("portMappings")), MAX_PORTS, "port mappings");
    at_most("/container/volumes", container.and_then(|c| c.get("volumes")), MAX_LIST, "volumes");
    at_most("/container/docker/parameters", docker.and_then(|d| d.get("parameters")), MAX_LIST, "parameters");
    for (path, list) in [
        ("/portDefinitions", obj.get("portDefinitions")),
        ("/container/portMappings", container.and_then(|c| c.get("portMappings"))),
    ] {
        for (i, p) in list.and_then(Value::as_array).map(Vec::as_slice).unwrap_or(&[]).iter().enumerate() {
            at_most(&format!("{path}({i})/labels"), p.get("labels"), MAX_LABELS, "labels");
        }
    }
    for (i, c) in obj.get("constraints").and_then(Value::as_array).map(Vec::as_slice).unwrap_or(&[]).iter().enumerate()
    {
        at_most(&format!("/constraints({i})"), Some(c), 3, "constraint fields");
    }
    if bad.0.is_empty() {
        let n: usize = obj.values().map(|v| json_values(v, MAX_JSON_VALUES)).sum();
        if n > MAX_JSON_VALUES {
            bad.add("/", format!("the definition holds more than {MAX_JSON_VALUES} JSON values"));
        }
    }
}

/// The names of fields the definition may carry; anything else is ignored.
const ONLY_ON_CREATE_DEFAULTS: &[(&str, f64)] = &[("cpus", 1.0), ("mem", 128.0), ("disk", 0.0), ("gpus", 0.0)];

impl App {
    /// Build an app from a JSON object (create or full replace), applying Marathon's defaults.
    /// `base` resolves relative ids; `id_override` is used when the id comes from the URL.
    pub fn from_json(body: &Value, id_override: Option<&AppId>) -> Result<App, Invalid> {
        Self::merge_json(None, body, id_override)
    }

    /// Apply a JSON object onto `current` (a partial update); with `current == None` it is a
    /// create. Only fields present in `body` change.
    pub fn merge_json(current: Option<&App>, body: &Value, id_override: Option<&AppId>) -> Result<App, Invalid> {
        let Some(obj) = body.as_object() else {
            return Err(Invalid::at("/", "error.expected.jsobject"));
        };
        let mut bad = Violations(Vec::new());
        // Start from the current app (as JSON) or from defaults.
        let mut merged = match current {
            Some(app) => serde_json::to_value(app).unwrap_or(Value::Null),
            None => {
                let mut m = serde_json::Map::new();
                for (k, v) in ONLY_ON_CREATE_DEFAULTS {
                    m.insert((*k).into(), Value::from(*v));
                }
                m.insert("instances".into(), Value::from(1));
                m.insert("backoffSeconds".into(), Value::from(1.0));
                m.insert("backoffFactor".into(), Value::from(1.15));
                m.insert("maxLaunchDelaySeconds".into(), Value::from(300.0));
                m.insert("executor".into(), Value::from(""));
                m.insert("requirePorts".into(), Value::from(false));
                m.insert("killSelection".into(), Value::from("YOUNGEST_FIRST"));
                Value::Object(m)
            }
        };
        let m = merged.as_object_mut().expect("object");

        // id
        let id = match (id_override, obj.get("id")) {
            (Some(id), _) => Some(id.clone()),
            (None, Some(Value::String(s))) => match AppId::parse(s) {
                Ok(id) => Some(id),
                Err(e) => {
                    bad.add("/id", e);
                    None
                }
            },
            (None, Some(_)) => {
                bad.add("/id", "error.expected.jsstring");
                None
            }
            (None, None) => match current {
                Some(app) => Some(app.id.clone()),
                None => {
                    bad.add("/id", "error.path.missing");
                    None
                }
            },
        };

        // Sizes first: an oversized list is refused before it is copied or converted.
        check_sizes(obj, &mut bad);
        if !bad.0.is_empty() {
            return Err(Invalid(bad.0));
        }
        // numbers that must be checked for sign/range before serde sees them
        use limits::*;
        for (key, min, max) in [
            ("cpus", 0.0, MAX_CPUS),
            ("mem", 0.0, MAX_MEM_MIB),
            ("disk", 0.0, MAX_DISK_MIB),
            ("gpus", 0.0, MAX_GPUS),
            ("instances", 0.0, MAX_INSTANCES),
            ("backoffSeconds", 0.0, MAX_BACKOFF_SECONDS),
            ("backoffFactor", 1.0, MAX_BACKOFF_FACTOR),
            ("maxLaunchDelaySeconds", 0.0, MAX_LAUNCH_DELAY_SECONDS),
            ("taskKillGracePeriodSeconds", 0.0, MAX_KILL_GRACE_SECONDS),
        ] {
            if let Some(v) = obj.get(key) {
                let path = format!("/{key}");
                if let Some(x) = get_f64(v, &path, &mut bad) {
                    if x < min || !x.is_finite() {
                        bad.add(&path, format!("got {v}, expected {min:?} or more"));
                    } else if x > max {
                        bad.add(&path, format!("got {v}, expected at most {max}"));
                    } else if key == "instances" && x.fract() != 0.0 {
                        bad.add(&path, "error.expected.jsnumber");
                    }
                }
            }
        }
        for (k, v) in obj {
            if k == "id" {
                continue;
            }
            m.insert(k.clone(), v.clone());
        }
        if let Some(id) = &id {
            m.insert("id".into(), Value::from(id.as_str()));
        }
        // Deprecated `ports` → portDefinitions (only when given).
        if obj.contains_key("ports") && obj.contains_key("portDefinitions") {
            bad.add("/", "You cannot specify both ports and port definitions");
        }
        if let Some(ports) = obj.get("ports") {
            match ports {
                Value::Array(list) => {
                    let defs: Vec<Value> =
                        list.iter().map(|p| serde_json::json!({"port": p, "protocol": "tcp"})).collect();
                    m.insert("portDefinitions".into(), Value::Array(defs));
                }
                Value::Null => {}
                _ => bad.add("/ports", "error.expected.jsarray"),
            }
        }
        m.remove("ports");
        normalize_networking(m, obj, &mut bad);
        if current.is_none()
            && matches!(m.get("portDefinitions"), None | Some(Value::Null))
            && !obj.contains_key("ports")
        {
            let host_mode = network_of(m) == NetworkMode::Host;
            if host_mode {
                m.insert(
                    "portDefinitions".into(),
                    serde_json::json!([{"port": 0, "protocol": "tcp", "name": "default"}]),
                );
            }
        }
        for k in ["env", "labels"] {
            if matches!(m.get(k), Some(Value::Null)) {
                m.insert(k.into(), serde_json::json!({}));
            }
        }
        for k in [
            "constraints",
            "fetch",
            "storeUrls",
            "healthChecks",
            "readinessChecks",
            "dependencies",
            "portDefinitions",
            "networks",
        ] {
            if matches!(m.get(k), Some(Value::Null)) {
                m.insert(k.into(), serde_json::json!([]));
            }
        }
        for k in [
            "version",
            "versionInfo",
            "tasks",
            "deployments",
            "tasksRunning",
            "tasksStaged",
            "tasksHealthy",
            "tasksUnhealthy",
            "lastTaskFailure",
            "uris",
        ] {
            m.remove(k);
        }
        if !bad.0.is_empty() {
            return Err(Invalid(bad.0));
        }
        let app: App = match serde_json::from_value(merged) {
            Ok(a) => a,
            Err(e) => return Err(Invalid::at("/", e.to_string())),
        };
        app.validate()?;
        Ok(app)
    }

    /// Marathon's semantic checks (the 422 cases).
    pub fn validate(&self) -> Result<(), Invalid> {
        let mut bad = Violations(Vec::new());
        let has_cmd = self.cmd.is_some();
        let has_args = self.args.is_some();
        if (has_cmd && has_args) || (!has_cmd && !has_args && self.container.is_none()) {
            bad.add("/", "AppDefinition must either contain one of 'cmd' or 'args', and/or a 'container'.");
        }
        if self.cmd.as_deref().is_some_and(|c| c.trim().is_empty()) {
            bad.add("/cmd", "must not be empty");
        }
        if self.args.as_ref().is_some_and(|a| a.is_empty() || a[0].is_empty()) && !has_cmd && self.container.is_none() {
            bad.add("/args", "must not be empty");
        }
        if !(0.0..=1.0).contains(&self.upgrade_strategy.minimum_health_capacity) {
            bad.add("/upgradeStrategy/minimumHealthCapacity", "is not between 0 and 1");
        }
        if !(0.0..=1.0).contains(&self.upgrade_strategy.maximum_over_capacity) {
            bad.add("/upgradeStrategy/maximumOverCapacity", "is not between 0 and 1");
        }
        if !["YOUNGEST_FIRST", "OLDEST_FIRST"].contains(&self.kill_selection.as_str()) {
            bad.add("/killSelection", "must be one of YOUNGEST_FIRST, OLDEST_FIRST");
        }
        let mut names = std::collections::BTreeSet::new();
        for (i, p) in self.port_definitions.iter().enumerate() {
            if p.port > 65535 {
                bad.add(&format!("/portDefinitions({i})/port"), "got a port above 65535");
            }
            if let Some(n) = &p.name
                && !names.insert(n.clone())
            {
                bad.add("/portDefinitions", "Port names must be unique.");
            }
            if !["tcp", "udp", "udp,tcp", "tcp,udp"].contains(&p.protocol.as_str()) {
                bad.add(&format!("/portDefinitions({i})/protocol"), "must be one of tcp, udp, udp,tcp");
            }
        }
        if self.require_ports && self.port_definitions.iter().any(|p| p.port == 0) {
            bad.add("/portDefinitions", "requirePorts needs every port to be set (non-zero)");
        }
        let mut seen = std::collections::BTreeSet::new();
        for p in &self.port_definitions {
            if p.port != 0 && !seen.insert(p.port) {
                bad.add("/portDefinitions", "Ports must be unique.");
            }
        }
        for (k, v) in &self.env {
            let ok = v.is_string() || v.get("secret").is_some_and(Value::is_string);
            if !ok {
                bad.add(&format!("/env({k})"), "must be a string or a secret reference");
            }
        }
        if self.cpus < 0.001 && self.container.is_none() && self.cmd.is_some() && self.instances > 0 && self.cpus != 0.0
        {
            bad.add("/cpus", format!("got {}, expected 0.001 or more", self.cpus));
        }
        for (i, c) in self.constraints.iter().enumerate() {
            if c.len() < 2 || c.len() > 3 {
                bad.add(&format!("/constraints({i})"), "Each constraint must have either 2 or 3 fields");
                continue;
            }
            let op = c[1].as_str();
            if !["UNIQUE", "CLUSTER", "GROUP_BY", "LIKE", "UNLIKE", "MAX_PER", "IS"].contains(&op) {
                bad.add(&format!("/constraints({i})"), format!("unknown constraint operator {op}"));
            }
            if (op == "LIKE" || op == "UNLIKE")
                && c.get(2).is_none_or(|re| regex::Regex::new(&format!("^(?:{re})$")).is_err())
            {
                bad.add(&format!("/constraints({i})"), "Invalid regular expression");
            }
        }
        self.validate_container(&mut bad);
        for (path, e) in crate::health::validate(&self.health_checks) {
            bad.add(&path, e);
        }
        if bad.0.is_empty() { Ok(()) } else { Err(Invalid(bad.0)) }
    }

    fn validate_container(&self, bad: &mut Violations) {
        for (i, n) in self.networks.iter().enumerate() {
            let mode = n.get("mode").and_then(Value::as_str).unwrap_or("");
            if !["host", "container/bridge", "container"].contains(&mode) {
                bad.add(&format!("/networks({i})/mode"), "must be one of host, container/bridge, container");
            }
        }
        let net = self.network_mode();
        let Some(c) = self.container.as_ref() else {
            if net != NetworkMode::Host {
                bad.add("/networks", "container networking needs a container");
            }
            return;
        };
        let Some(c) = c.as_object() else {
            bad.add("/container", "error.expected.jsobject");
            return;
        };
        let ty = c.get("type").and_then(Value::as_str).unwrap_or("DOCKER");
        if ty != "DOCKER" && ty != "MESOS" {
            bad.add("/container/type", "must be DOCKER or MESOS");
        }
        let docker = c.get("docker");
        let image = docker.and_then(|d| d.get("image")).and_then(Value::as_str).unwrap_or("");
        if ty == "DOCKER" && image.trim().is_empty() {
            bad.add("/container/docker/image", "must not be empty");
        }
        if let Some(params) = docker.and_then(|d| d.get("parameters")) {
            match params.as_array() {
                Some(list) => {
                    for (i, p) in list.iter().enumerate() {
                        let key = p.get("key").and_then(Value::as_str).unwrap_or("");
                        if p.get("value").and_then(Value::as_str).is_none() {
                            bad.add(&format!("/container/docker/parameters({i})/value"), "must be a string");
                        }
                        if !crate::runtime::docker::ALLOWED_PARAMETERS.contains(&key) {
                            bad.add(
                                &format!("/container/docker/parameters({i})/key"),
                                format!(
                                    "docker parameter '{key}' is not allowed; allowed: {}",
                                    crate::runtime::docker::ALLOWED_PARAMETERS.join(", ")
                                ),
                            );
                        }
                    }
                }
                None => bad.add("/container/docker/parameters", "error.expected.jsarray"),
            }
        }
        if let Some(vols) = c.get("volumes").filter(|v| !v.is_null()) {
            for (i, v) in vols.as_array().map(|a| a.as_slice()).unwrap_or(&[]).iter().enumerate() {
                let cp = v.get("containerPath").and_then(Value::as_str).unwrap_or("");
                let hp = v.get("hostPath").and_then(Value::as_str).unwrap_or("");
                let mode = v.get("mode").and_then(Value::as_str).unwrap_or("RW");
                if cp.is_empty() {
                    bad.add(&format!("/container/volumes({i})/containerPath"), "must not be empty");
                }
                if hp.is_empty() {
                    bad.add(
                        &format!("/container/volumes({i})/hostPath"),
                        "only host volumes are supported: hostPath must be set",
                    );
                }
                if mode != "RO" && mode != "RW" {
                    bad.add(&format!("/container/volumes({i})/mode"), "must be RO or RW");
                }
            }
        }
        let mappings = self.port_mappings_json();
        if net != NetworkMode::Bridge && !mappings.is_empty() {
            bad.add("/container/portMappings", "port mappings are only allowed with bridge networking");
        }
        if net == NetworkMode::Bridge && !self.port_definitions.is_empty() {
            bad.add("/portDefinitions", "port definitions are not allowed with container networking; use portMappings");
        }
        let mut names = std::collections::BTreeSet::new();
        for (i, pm) in mappings.iter().enumerate() {
            for key in ["containerPort", "hostPort", "servicePort"] {
                if let Some(v) = pm.get(key)
                    && v.as_u64().is_none_or(|p| p > 65535)
                {
                    bad.add(&format!("/container/portMappings({i})/{key}"), "must be a port between 0 and 65535");
                }
            }
            let proto = pm.get("protocol").and_then(Value::as_str).unwrap_or("tcp");
            if !["tcp", "udp", "udp,tcp", "tcp,udp"].contains(&proto) {
                bad.add(&format!("/container/portMappings({i})/protocol"), "must be one of tcp, udp, udp,tcp");
            }
            if let Some(n) = pm.get("name").and_then(Value::as_str)
                && !names.insert(n.to_owned())
            {
                bad.add("/container/portMappings", "Port names must be unique.");
            }
        }
    }

    /// The app's network mode (from `networks`; host by default).
    pub fn network_mode(&self) -> NetworkMode {
        match self.networks.first().and_then(|n| n.get("mode")).and_then(Value::as_str) {
            Some("container/bridge") => NetworkMode::Bridge,
            Some("container") => NetworkMode::None,
            _ => NetworkMode::Host,
        }
    }

    fn port_mappings_json(&self) -> Vec<Value> {
        self.container
            .as_ref()
            .and_then(|c| c.get("portMappings"))
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
    }

    /// The Docker image, when the app runs in a container.
    pub fn docker_image(&self) -> Option<&str> {
        self.container.as_ref()?.get("docker")?.get("image")?.as_str().filter(|s| !s.trim().is_empty())
    }

    /// Whether the app asks for a privileged container.
    pub fn privileged(&self) -> bool {
        self.container
            .as_ref()
            .and_then(|c| c.get("docker"))
            .and_then(|d| d.get("privileged"))
            .and_then(Value::as_bool)
            .unwrap_or(false)
    }

    /// The host ports a task needs, in order: `Some(p)` for a fixed port, `None` for any port
    /// from the agent's range. Bridge networking: one per port mapping (`hostPort` 0 = any);
    /// host networking: one per port definition (fixed with `requirePorts`).
    pub fn host_port_requests(&self) -> Vec<Option<u16>> {
        if self.network_mode() == NetworkMode::Bridge {
            return self
                .port_mappings_json()
                .iter()
                .map(|pm| pm.get("hostPort").and_then(Value::as_u64).filter(|p| *p > 0).map(|p| p as u16))
                .collect();
        }
        self.port_definitions.iter().map(|d| (self.require_ports && d.port > 0).then_some(d.port as u16)).collect()
    }

    /// Service ports, in the order of the host ports.
    pub fn service_ports(&self) -> Vec<u16> {
        if self.network_mode() == NetworkMode::Bridge {
            return self
                .port_mappings_json()
                .iter()
                .map(|pm| pm.get("servicePort").and_then(Value::as_u64).unwrap_or(0) as u16)
                .collect();
        }
        self.port_definitions.iter().map(|p| p.port as u16).collect()
    }

    /// Port names, in the order of the host ports.
    pub fn port_names(&self) -> Vec<Option<String>> {
        if self.network_mode() == NetworkMode::Bridge {
            return self
                .port_mappings_json()
                .iter()
                .map(|pm| pm.get("name").and_then(Value::as_str).map(str::to_owned))
                .collect();
        }
        self.port_definitions.iter().map(|p| p.name.clone()).collect()
    }

    /// The container to run a task in, given the host ports assigned to it.
    pub fn container_spec(&self, host_ports: &[u16]) -> Option<ContainerSpec> {
        let c = self.container.as_ref()?;
        let image = self.docker_image()?.to_owned();
        let docker = c.get("docker");
        let network = self.network_mode();
        let port_mappings = if network == NetworkMode::Bridge {
            self.port_mappings_json()
                .iter()
                .zip(host_ports)
                .map(|(pm, host)| {
                    let cp = pm.get("containerPort").and_then(Value::as_u64).unwrap_or(0) as u16;
                    PortMapping {
                        container_port: if cp == 0 { *host } else { cp },
                        host_port: *host,
                        protocol: pm.get("protocol").and_then(Value::as_str).unwrap_or("tcp").to_owned(),
                    }
                })
                .collect()
        } else {
            Vec::new()
        };
        let volumes = c
            .get("volumes")
            .and_then(Value::as_array)
            .map(|vs| {
                vs.iter()
                    .map(|v| Volume {
                        container_path: v.get("containerPath").and_then(Value::as_str).unwrap_or("").to_owned(),
                        host_path: v.get("hostPath").and_then(Value::as_str).unwrap_or("").to_owned(),
                        read_only: v.get("mode").and_then(Value::as_str) == Some("RO"),
                    })
                    .collect()
            })
            .unwrap_or_default();
        let parameters = docker
            .and_then(|d| d.get("parameters"))
            .and_then(Value::as_array)
            .map(|ps| {
                ps.iter()
                    .filter_map(|p| Some((p.get("key")?.as_str()?.to_owned(), p.get("value")?.as_str()?.to_owned())))
                    .collect()
            })
            .unwrap_or_default();
        Some(ContainerSpec {
            image,
            network,
            port_mappings,
            volumes,
            parameters,
            privileged: self.privileged(),
            force_pull: docker.and_then(|d| d.get("forcePullImage")).and_then(Value::as_bool).unwrap_or(false),
        })
    }

    /// The service name in the catalog: label `SERVICE_NAME`, else the reversed id segments.
    pub fn service_name(&self) -> String {
        match self.labels.get("SERVICE_NAME").map(|s| s.trim()) {
            Some(n) if !n.is_empty() => n.to_owned(),
            _ => self.id.default_service_name(),
        }
    }

    /// Tags from the label `SERVICE_TAGS` (comma separated).
    pub fn service_tags(&self) -> Vec<String> {
        self.labels
            .get("SERVICE_TAGS")
            .map(|t| t.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned).collect())
            .unwrap_or_default()
    }

    /// How many host ports a task of this app needs.
    pub fn host_port_count(&self) -> usize {
        self.host_port_requests().len()
    }

    /// The environment as plain strings (secret references are left out).
    pub fn plain_env(&self) -> BTreeMap<String, String> {
        self.env.iter().filter_map(|(k, v)| v.as_str().map(|s| (k.clone(), s.to_owned()))).collect()
    }

    /// Kill grace period (default 3 s, as Mesos' default).
    pub fn kill_grace(&self) -> std::time::Duration {
        std::time::Duration::from_secs_f64(self.task_kill_grace_period_seconds.unwrap_or(3.0).clamp(0.0, 3600.0))
    }

    /// True when this app has the same configuration as `other`, ignoring scale and version.
    pub fn same_config(&self, other: &App) -> bool {
        let mut a = self.clone();
        let mut b = other.clone();
        a.instances = 0;
        b.instances = 0;
        a.version.clear();
        b.version.clear();
        a.version_info = None;
        b.version_info = None;
        a == b
    }
}

impl App {
    /// The checks that depend on what the node lets containers reach of the host
    /// ([`HostAccess`]): privileged mode, host paths of volumes, added capabilities.
    pub fn check_host_access(&self, access: &HostAccess) -> Result<(), Invalid> {
        let mut bad = Violations(Vec::new());
        if self.privileged() && !access.allow_privileged {
            bad.add(
                "/container/docker/privileged",
                "privileged containers are not allowed on this node (start it with --allow-privileged)",
            );
        }
        let c = self.container.as_ref();
        let list = |v: Option<&Value>| v.and_then(Value::as_array).cloned().unwrap_or_default();
        for (i, v) in list(c.and_then(|c| c.get("volumes"))).iter().enumerate() {
            if let Some(hp) = v.get("hostPath").and_then(Value::as_str).filter(|h| !h.is_empty())
                && let Err(e) = access.check_host_path(hp)
            {
                bad.add(&format!("/container/volumes({i})/hostPath"), e);
            }
        }
        let params = list(c.and_then(|c| c.get("docker")).and_then(|d| d.get("parameters")));
        for (i, p) in params.iter().enumerate() {
            if p.get("key").and_then(Value::as_str) != Some("cap-add") {
                continue;
            }
            for cap in p.get("value").and_then(Value::as_str).unwrap_or("").split(',') {
                if let Err(e) = access.check_cap_add(cap) {
                    bad.add(&format!("/container/docker/parameters({i})/value"), e);
                }
            }
        }
        if bad.0.is_empty() { Ok(()) } else { Err(Invalid(bad.0)) }
    }
}

/// Why a request body is not an acceptable JSON document.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum JsonError {
    /// Not JSON at all.
    #[error("{0}")]
    Syntax(String),
    /// The parsed body would take more than [`limits::MAX_PARSED_BYTES`]; parsing stopped there.
    #[error(
        "the request body holds too many JSON values to take in: parsed it would need more than {} MiB",
        limits::MAX_PARSED_BYTES / (1024 * 1024)
    )]
    TooComplex,
    /// An object gives a key twice: which value was meant is unclear, so neither is taken.
    #[error("duplicate key '{key}': each field may be given once")]
    DuplicateKey {
        /// Where, in the error paths of [`Invalid`] (`/container/docker/image`, `/0/id`,
        /// `/apps(1)/cmd`).
        path: String,
        /// The key.
        key: String,
    },
}

/// Parse a request body as JSON like `serde_json::from_slice::<Value>`, except that an object
/// with a duplicate key is an error (serde_json keeps the last value silently), and that parsing
/// stops once the result would take more than [`limits::MAX_PARSED_BYTES`] of memory.
pub fn parse_json(bytes: &[u8]) -> Result<Value, JsonError> {
    use serde::de::DeserializeSeed;
    let dup = std::cell::RefCell::new(None);
    let budget = std::cell::Cell::new(Some(limits::MAX_PARSED_BYTES));
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let parsed =
        StrictValue { depth: 0, dup: &dup, budget: &budget }.deserialize(&mut de).and_then(|v| de.end().map(|()| v));
    match (parsed, dup.into_inner(), budget.get()) {
        (_, Some((path, key)), _) => Err(JsonError::DuplicateKey { path, key }),
        (_, None, None) => Err(JsonError::TooComplex),
        (Ok(v), None, _) => Ok(v),
        (Err(e), None, _) => Err(JsonError::Syntax(e.to_string())),
    }
}

/// Estimated heap cost of parsed JSON, in bytes: a value slot (in its array or map), an object
/// (a B-tree node), and the bytes of a string or key plus its header.
const VALUE_COST: usize = 48;
const OBJECT_COST: usize = 640;
const STRING_COST: usize = 24;

/// A JSON value visitor that records the first duplicate key (path, key) and fails, and charges
/// every value to the budget (`None` once it ran out).
struct StrictValue<'a> {
    depth: usize,
    dup: &'a std::cell::RefCell<Option<(String, String)>>,
    budget: &'a std::cell::Cell<Option<usize>>,
}

impl StrictValue<'_> {
    fn child(&self) -> Self {
        StrictValue { depth: self.depth + 1, dup: self.dup, budget: self.budget }
    }

    fn charge<E: serde::de::Error>(&self, bytes: usize) -> Result<(), E> {
        match self.budget.get().and_then(|b| b.checked_sub(bytes)) {
            Some(left) => {
                self.budget.set(Some(left));
                Ok(())
            }
            None => {
                self.budget.set(None);
                Err(E::custom("too complex"))
            }
        }
    }

    /// On the way out of a failed child: put its segment in front of the recorded path.
    fn prepend(&self, segment: String) {
        if let Some((path, _)) = self.dup.borrow_mut().as_mut() {
            path.insert_str(0, &segment);
        }
    }
}

impl<'de> serde::de::DeserializeSeed<'de> for StrictValue<'_> {
    type Value = Value;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for StrictValue<'_> {
    type Value = Value;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<Value, E> {
        self.charge(VALUE_COST)?;
        Ok(Value::Bool(v))
    }
    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Value, E> {
        self.charge(VALUE_COST)?;
        Ok(Value::from(v))
    }
    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Value, E> {
        self.charge(VALUE_COST)?;
        Ok(Value::from(v))
    }
    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Value, E> {
        self.charge(VALUE_COST)?;
        Ok(Value::from(v))
    }
    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Value, E> {
        self.charge(VALUE_COST + STRING_COST + v.len())?;
        Ok(Value::String(v.to_owned()))
    }
    fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Value, E> {
        self.charge(VALUE_COST + STRING_COST + v.len())?;
        Ok(Value::String(v))
    }
    fn visit_unit<E: serde::de::Error>(self) -> Result<Value, E> {
        self.charge(VALUE_COST)?;
        Ok(Value::Null)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        self.charge::<A::Error>(VALUE_COST)?;
        let mut out = Vec::new();
        loop {
            match seq.next_element_seed(self.child()) {
                Ok(Some(v)) => out.push(v),
                Ok(None) => return Ok(Value::Array(out)),
                Err(e) => {
                    // A bulk body's items are `/0`, nested list items `(0)` (Marathon's paths).
                    let i = out.len();
                    self.prepend(if self.depth == 0 { format!("/{i}") } else { format!("({i})") });
                    return Err(e);
                }
            }
        }
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        self.charge::<A::Error>(VALUE_COST + OBJECT_COST)?;
        let mut out = serde_json::Map::new();
        while let Some(key) = map.next_key::<String>()? {
            self.charge::<A::Error>(STRING_COST + key.len())?;
            let v = match map.next_value_seed(self.child()) {
                Ok(v) => v,
                Err(e) => {
                    self.prepend(format!("/{key}"));
                    return Err(e);
                }
            };
            if out.contains_key(&key) {
                *self.dup.borrow_mut() = Some((format!("/{key}"), key));
                return Err(serde::de::Error::custom("duplicate key"));
            }
            out.insert(key, v);
        }
        Ok(Value::Object(out))
    }
}

/// The network mode a (normalized) app JSON asks for.
fn network_of(m: &serde_json::Map<String, Value>) -> NetworkMode {
    let first = m.get("networks").and_then(Value::as_array).and_then(|a| a.first());
    match first.and_then(|n| n.get("mode")).and_then(Value::as_str) {
        Some("container/bridge") => NetworkMode::Bridge,
        Some("container") => NetworkMode::None,
        _ => NetworkMode::Host,
    }
}

/// Rewrite Marathon 1.4 networking (`container.docker.network`, `container.docker.portMappings`)
/// into the 1.5 form (`networks`, `container.portMappings`), as Marathon 1.5+ does; both at once
/// is an error.
fn normalize_networking(
    m: &mut serde_json::Map<String, Value>,
    obj: &serde_json::Map<String, Value>,
    bad: &mut Violations,
) {
    let given_networks = obj.get("networks").is_some_and(|v| !v.is_null());
    if let Some(Value::Object(c)) = m.get_mut("container") {
        if !c.contains_key("type") {
            c.insert("type".into(), Value::from("DOCKER"));
        }
        let mut old_mappings = None;
        let mut old_network = None;
        if let Some(Value::Object(d)) = c.get_mut("docker") {
            old_network = d.remove("network");
            old_mappings = d.remove("portMappings");
        }
        if let Some(net) = old_network.filter(|v| !v.is_null()) {
            if given_networks {
                bad.add("/networks", "cannot be combined with container.docker.network");
            }
            let mode = match net.as_str().unwrap_or("") {
                "BRIDGE" => serde_json::json!([{"mode": "container/bridge"}]),
                "HOST" => serde_json::json!([{"mode": "host"}]),
                "NONE" => serde_json::json!([{"mode": "container", "name": "none"}]),
                "USER" => {
                    bad.add("/container/docker/network", "USER networks are not supported; use BRIDGE or HOST");
                    serde_json::json!([{"mode": "host"}])
                }
                other => {
                    bad.add(
                        "/container/docker/network",
                        format!("unknown network {other}; expected BRIDGE, HOST or NONE"),
                    );
                    serde_json::json!([{"mode": "host"}])
                }
            };
            m.insert("networks".into(), mode);
        }
        if let Some(Value::Object(c)) = m.get_mut("container")
            && let Some(pm) = old_mappings.filter(|v| !v.is_null())
        {
            if c.get("portMappings").is_some_and(|v| !v.is_null()) {
                bad.add("/container/portMappings", "cannot be combined with container.docker.portMappings");
            }
            c.insert("portMappings".into(), pm);
        }
    }
    if m.get("networks").is_none_or(|v| v.as_array().is_none_or(|a| a.is_empty())) {
        m.insert("networks".into(), serde_json::json!([{"mode": "host"}]));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn app_id_validation() {
        for ok in ["web", "/web", "/prod/web", "prod/web/", "a.b-c/x9", "/a/../b"] {
            assert!(AppId::parse(ok).is_ok(), "{ok}");
        }
        assert_eq!(AppId::parse("/a/../b").unwrap().as_str(), "/b");
        assert_eq!(AppId::parse("web").unwrap().as_str(), "/web");
        for bad in ["", "/", "Web", "-web", "web-", "we_b", "/a/tasks", "/a/restart", "..", "/a b", "w!"] {
            assert!(AppId::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(AppId::parse_relative("web", "/prod").unwrap().as_str(), "/prod/web");
        assert_eq!(AppId::parse_relative("../web", "/prod/x").unwrap().as_str(), "/prod/web");
    }

    #[test]
    fn service_name_mapping() {
        let mk = |id: &str, labels: serde_json::Value| {
            App::from_json(&json!({"id": id, "cmd": "x", "labels": labels}), None).unwrap()
        };
        assert_eq!(mk("/webserver", json!({})).service_name(), "webserver");
        assert_eq!(mk("/prod/web", json!({})).service_name(), "web-prod");
        assert_eq!(mk("/a/b/c", json!({})).service_name(), "c-b-a");
        let app = mk("/prod/web", json!({"SERVICE_NAME": "frontend", "SERVICE_TAGS": "http, v2,,"}));
        assert_eq!(app.service_name(), "frontend");
        assert_eq!(app.service_tags(), vec!["http", "v2"]);
        assert_eq!(AppId::parse("/prod/web").unwrap().task_prefix(), "prod_web");
    }

    #[test]
    fn defaults_and_ports() {
        let app = App::from_json(&json!({"id": "w", "cmd": "x"}), None).unwrap();
        assert_eq!((app.cpus, app.mem, app.instances), (1.0, 128.0, 1));
        assert_eq!(app.port_definitions.len(), 1);
        let app = App::from_json(&json!({"id": "w", "cmd": "x", "portDefinitions": []}), None).unwrap();
        assert!(app.port_definitions.is_empty());
        let app = App::from_json(&json!({"id": "w", "cmd": "x", "ports": [0, 0]}), None).unwrap();
        assert_eq!(app.port_definitions.len(), 2);
        let v = serde_json::to_value(&app).unwrap();
        assert!(v.get("ports").is_none() && v.get("portDefinitions").is_some());
    }

    #[test]
    fn invalid_definitions() {
        let cases = [
            (json!({"id": "w", "cmd": "x", "args": ["y"]}), "/"),
            (json!({"id": "w"}), "/"),
            (json!({"id": "W", "cmd": "x"}), "/id"),
            (json!({"cmd": "x"}), "/id"),
            (json!({"id": "w", "cmd": "x", "instances": -1}), "/instances"),
            (json!({"id": "w", "cmd": "x", "cpus": -1}), "/cpus"),
            (json!({"id": "w", "cmd": "x", "backoffFactor": 0.5}), "/backoffFactor"),
            (json!({"id": "w", "cmd": "x", "ports": [1], "portDefinitions": []}), "/"),
            (json!({"id": "w", "cmd": ""}), "/cmd"),
            (json!({"id": "w", "cmd": "x", "constraints": [["hostname", "NOPE"]]}), "/constraints(0)"),
            (
                json!({"id": "w", "cmd": "x", "upgradeStrategy": {"minimumHealthCapacity": 2}}),
                "/upgradeStrategy/minimumHealthCapacity",
            ),
        ];
        for (body, path) in cases {
            let err = App::from_json(&body, None).expect_err(&body.to_string());
            assert!(err.0.iter().any(|v| v.path == path), "{body}: {err:?}");
        }
    }

    #[test]
    fn docker_formats_1_4_and_1_5_normalize_to_1_5() {
        let v14 = json!({"id": "web", "cmd": "httpd -f -p 8080", "cpus": 0.5, "mem": 64, "container": {
            "type": "DOCKER",
            "docker": {"image": "mesh-test/busybox", "network": "BRIDGE",
                       "portMappings": [{"containerPort": 8080, "hostPort": 0, "servicePort": 9000, "protocol": "tcp"}]}}});
        let v15 = json!({"id": "web", "cmd": "httpd -f -p 8080", "cpus": 0.5, "mem": 64,
            "networks": [{"mode": "container/bridge"}],
            "container": {"type": "DOCKER", "docker": {"image": "mesh-test/busybox"},
                          "portMappings": [{"containerPort": 8080, "hostPort": 0, "servicePort": 9000, "protocol": "tcp"}]}});
        let a = App::from_json(&v14, None).unwrap();
        let b = App::from_json(&v15, None).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.network_mode(), NetworkMode::Bridge);
        assert!(a.port_definitions.is_empty(), "no default port definition in bridge mode");
        assert_eq!(a.host_port_requests(), vec![None]);
        assert_eq!(a.service_ports(), vec![9000]);
        let spec = a.container_spec(&[31005]).unwrap();
        assert_eq!(
            spec.port_mappings,
            vec![PortMapping { container_port: 8080, host_port: 31005, protocol: "tcp".into() }]
        );
        assert_eq!(spec.image, "mesh-test/busybox");
        let out = serde_json::to_value(&a).unwrap();
        assert!(out["container"]["docker"].get("network").is_none(), "responses use the 1.5 form: {out}");
        // containerPort 0 means the host port
        let z = App::from_json(
            &json!({"id": "z", "networks": [{"mode": "container/bridge"}],
            "container": {"docker": {"image": "i"}, "portMappings": [{"containerPort": 0}]}}),
            None,
        )
        .unwrap();
        assert_eq!(z.container_spec(&[31000]).unwrap().port_mappings[0].container_port, 31000);
        // host networking keeps port definitions
        let h = App::from_json(&json!({"id": "h", "container": {"docker": {"image": "i", "network": "HOST"}}}), None)
            .unwrap();
        assert_eq!(h.network_mode(), NetworkMode::Host);
        assert_eq!(h.host_port_requests(), vec![None]);
    }

    #[test]
    fn invalid_container_definitions() {
        let cases = [
            (json!({"id": "w", "container": {"docker": {"image": ""}}}), "/container/docker/image"),
            (
                json!({"id": "w", "container": {"docker": {"image": "i", "network": "BRIDGE"}}, "networks": [{"mode": "host"}]}),
                "/networks",
            ),
            (
                json!({"id": "w", "container": {"docker": {"image": "i", "network": "USER"}}}),
                "/container/docker/network",
            ),
            (
                json!({"id": "w", "container": {"docker": {"image": "i", "parameters": [{"key": "pid", "value": "host"}]}}}),
                "/container/docker/parameters(0)/key",
            ),
            (
                json!({"id": "w", "container": {"docker": {"image": "i"}, "portMappings": [{"containerPort": 80}]}}),
                "/container/portMappings",
            ),
            (
                json!({"id": "w", "networks": [{"mode": "container/bridge"}], "portDefinitions": [{"port": 0}], "container": {"docker": {"image": "i"}}}),
                "/portDefinitions",
            ),
            (
                json!({"id": "w", "container": {"docker": {"image": "i"}, "volumes": [{"containerPath": "/d", "mode": "RW"}]}}),
                "/container/volumes(0)/hostPath",
            ),
        ];
        for (body, path) in cases {
            let err = App::from_json(&body, None).expect_err(&body.to_string());
            assert!(err.0.iter().any(|v| v.path == path), "{body}: {err:?}");
        }
    }

    #[test]
    fn duplicate_keys_are_refused_with_their_path() {
        assert_eq!(parse_json(br#"{"a": [1, {"b": 2}], "c": null}"#).unwrap(), json!({"a": [1, {"b": 2}], "c": null}));
        let dup = |body: &str| match parse_json(body.as_bytes()) {
            Err(JsonError::DuplicateKey { path, .. }) => path,
            other => panic!("{body}: {other:?}"),
        };
        assert_eq!(dup(r#"{"cmd": "a", "cmd": "b"}"#), "/cmd");
        assert_eq!(dup(r#"{"container": {"docker": {"image": "i", "image": "j"}}}"#), "/container/docker/image");
        assert_eq!(dup(r#"[{"id": "a"}, {"id": "b", "id": "c"}]"#), "/1/id");
        assert_eq!(dup(r#"{"apps": [{"x": 1}, {"y": 1, "y": 2}]}"#), "/apps(1)/y");
        assert!(matches!(parse_json(b"{not json"), Err(JsonError::Syntax(_))));
        // 1.3 MB of small objects would take ~70 MB parsed: refused part way.
        let many = format!("[{}{{}}]", "{},".repeat(200_000));
        assert_eq!(parse_json(many.as_bytes()), Err(JsonError::TooComplex));
        let fine = format!("[{}0]", "0,".repeat(200_000));
        assert!(parse_json(fine.as_bytes()).is_ok());
        assert!(matches!(parse_json(b"{} x"), Err(JsonError::Syntax(_))));
    }

    #[test]
    fn limits_are_422s_at_the_field() {
        let many = |n: usize| serde_json::Value::Array((0..n).map(|_| json!({"port": 0})).collect());
        let cases = [
            (json!({"id": "w", "cmd": "x", "backoffSeconds": 1e300}), "/backoffSeconds"),
            (json!({"id": "w", "cmd": "x", "backoffFactor": 1e300}), "/backoffFactor"),
            (json!({"id": "w", "cmd": "x", "maxLaunchDelaySeconds": 86401}), "/maxLaunchDelaySeconds"),
            (json!({"id": "w", "cmd": "x", "mem": 1e308}), "/mem"),
            (json!({"id": "w", "cmd": "x", "portDefinitions": many(limits::MAX_PORTS + 1)}), "/portDefinitions"),
            (json!({"id": "w", "cmd": "x", "constraints": [["a", "LIKE", "b", "c", "d"]]}), "/constraints(0)"),
            (json!({"id": "w", "container": {"docker": {"image": "i"}, "extra": many(limits::MAX_JSON_VALUES)}}), "/"),
        ];
        for (body, path) in cases {
            let err = App::from_json(&body, None).expect_err(&body.to_string()[..80.min(body.to_string().len())]);
            assert!(err.0.iter().any(|v| v.path == path), "{path}: {err:?}");
        }
        // the limits themselves are fine
        let ok = json!({"id": "w", "cmd": "x", "backoffSeconds": 86400, "backoffFactor": 100,
            "maxLaunchDelaySeconds": 86400, "portDefinitions": many(limits::MAX_PORTS)});
        App::from_json(&ok, None).unwrap();
        let longest = format!("/{}", "a".repeat(limits::MAX_ID_LEN - 1));
        let app = App::from_json(&json!({"id": longest, "cmd": "x"}), None).unwrap();
        assert!(format!("{}.instance-{}._app.1", app.id.task_prefix(), uuid::Uuid::nil()).len() <= 255);
        assert!(AppId::parse(&format!("{longest}a")).is_err());
        assert!(AppId::parse(&format!("/{}/{}", "a".repeat(150), "b".repeat(60))).is_err());
    }

    #[test]
    fn host_access_is_checked_per_volume_and_capability() {
        let app = App::from_json(
            &json!({"id": "w", "container": {"docker": {"image": "i", "privileged": true,
                "parameters": [{"key": "cap-drop", "value": "ALL"}, {"key": "cap-add", "value": "NET_ADMIN,SYS_ADMIN"}]},
                "volumes": [{"containerPath": "/a", "hostPath": "/srv/a", "mode": "RO"},
                            {"containerPath": "/b", "hostPath": "/", "mode": "RW"}]}}),
            None,
        )
        .unwrap();
        let paths = |access: &HostAccess| -> Vec<String> {
            app.check_host_access(access).err().map(|e| e.0.into_iter().map(|v| v.path).collect()).unwrap_or_default()
        };
        assert_eq!(
            paths(&HostAccess::default()),
            [
                "/container/docker/privileged",
                "/container/volumes(0)/hostPath",
                "/container/volumes(1)/hostPath",
                "/container/docker/parameters(1)/value"
            ]
        );
        let some =
            HostAccess { host_paths: vec!["/srv".into()], cap_add: vec!["NET_ADMIN".into()], ..Default::default() };
        assert_eq!(
            paths(&some),
            ["/container/docker/privileged", "/container/volumes(1)/hostPath", "/container/docker/parameters(1)/value"]
        );
        let all = HostAccess { allow_privileged: true, host_paths: vec!["/".into()], cap_add: vec![] };
        assert!(paths(&all).is_empty());
    }

    #[test]
    fn partial_update_merges() {
        let app = App::from_json(&json!({"id": "w", "cmd": "x", "instances": 3, "env": {"A": "1"}}), None).unwrap();
        let next = App::merge_json(Some(&app), &json!({"instances": 1}), None).unwrap();
        assert_eq!(next.instances, 1);
        assert_eq!(next.cmd.as_deref(), Some("x"));
        assert!(next.same_config(&app));
        let next = App::merge_json(Some(&app), &json!({"cmd": "y"}), None).unwrap();
        assert!(!next.same_config(&app));
    }
}

/// An app's `unreachableStrategy`: when an unreachable instance is replaced and when it is
/// forgotten.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnreachableStrategy {
    /// Unreachable this long, the instance is inactive and a replacement launches.
    pub inactive_after_ms: u64,
    /// Unreachable this long, the instance is expunged.
    pub expunge_after_ms: u64,
}

impl Default for UnreachableStrategy {
    /// Marathon's defaults for an app without local volumes: 300 s and 600 s.
    fn default() -> Self {
        UnreachableStrategy { inactive_after_ms: 300_000, expunge_after_ms: 600_000 }
    }
}

impl UnreachableStrategy {
    /// The app's strategy; `None` for `"disabled"` (unreachable instances are never replaced).
    pub fn of(app: &App) -> Option<UnreachableStrategy> {
        let d = UnreachableStrategy::default();
        match &app.unreachable_strategy {
            None => Some(d),
            Some(Value::String(s)) if s == "disabled" => None,
            Some(Value::Object(o)) => {
                let secs = |k: &str, dflt: u64| {
                    o.get(k).and_then(Value::as_f64).map(|v| (v.max(0.0) * 1000.0) as u64).unwrap_or(dflt)
                };
                Some(UnreachableStrategy {
                    inactive_after_ms: secs("inactiveAfterSeconds", d.inactive_after_ms),
                    expunge_after_ms: secs("expungeAfterSeconds", d.expunge_after_ms),
                })
            }
            Some(_) => Some(d),
        }
    }
}
