//! The Mesos v1 scheduler HTTP API on the wire: calls, events and the protobuf messages they
//! carry, in the JSON form Mesos (and pymesos) use, plus the RecordIO framing of the event
//! stream. Pure types and functions: no I/O.
//!
//! JSON rules (proto3 JSON mapping as Mesos applies it): field names are the proto names
//! (snake_case), enums are strings, ids are `{"value": ...}`, `bytes` are base64, unset optional
//! fields are omitted. Every payload of a call or event sits under the lower-case field named
//! like its `type`: `{"type":"OFFERS","offers":{"offers":[...]}}`.

use crate::model::{PortRanges, Resources};
use base64::Engine;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The Mesos version mesh reports (`GET /version`). Numeric: pymesos parses it as `X.Y.Z`.
pub const MESOS_VERSION: &str = "1.11.0";

/// Default heartbeat interval of the event stream (Mesos: 15 s).
pub const DEFAULT_HEARTBEAT_SECONDS: f64 = 15.0;

/// An id in its proto form: `{"value": "..."}`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Id {
    /// The id.
    pub value: String,
}

impl Id {
    /// An id with this value.
    pub fn new(v: impl Into<String>) -> Self {
        Self { value: v.into() }
    }
}

impl std::fmt::Display for Id {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.value)
    }
}

/// `Value.Scalar`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Scalar {
    /// The number.
    pub value: f64,
}

/// `Value.Range` (inclusive).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Range {
    /// First port.
    pub begin: u64,
    /// Last port (inclusive).
    pub end: u64,
}

/// `Value.Ranges`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ranges {
    /// The ranges.
    #[serde(default)]
    pub range: Vec<Range>,
}

/// `Value.Set`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Set {
    /// The items.
    #[serde(default)]
    pub item: Vec<String>,
}

/// `Value.Text`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Text {
    /// The text.
    pub value: String,
}

/// `Value.Type`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ValueType {
    /// A number.
    #[default]
    #[serde(rename = "SCALAR")]
    Scalar,
    /// Ranges of integers.
    #[serde(rename = "RANGES")]
    Ranges,
    /// A set of strings.
    #[serde(rename = "SET")]
    Set,
    /// A string.
    #[serde(rename = "TEXT")]
    Text,
}

/// `Resource.AllocationInfo`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllocationInfo {
    /// The role the resources are allocated to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
}

/// One `Resource`: `{"name":"cpus","type":"SCALAR","scalar":{"value":1}}`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Resource {
    /// `cpus`, `mem`, `disk`, `ports`, `gpus`, ...
    pub name: String,
    /// The value's type.
    #[serde(rename = "type", default)]
    pub kind: ValueType,
    /// SCALAR value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scalar: Option<Scalar>,
    /// RANGES value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ranges: Option<Ranges>,
    /// SET value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub set: Option<Set>,
    /// Deprecated reservation role (`*` = unreserved).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// The role the resource is allocated to (offers; MULTI_ROLE frameworks echo it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocation_info: Option<AllocationInfo>,
}

impl Resource {
    /// A SCALAR resource.
    pub fn scalar(name: &str, value: f64) -> Self {
        Self { name: name.into(), kind: ValueType::Scalar, scalar: Some(Scalar { value }), ..Default::default() }
    }

    /// A RANGES resource.
    pub fn ranges(name: &str, ranges: &[(u16, u16)]) -> Self {
        let range = ranges.iter().map(|&(b, e)| Range { begin: b as u64, end: e as u64 }).collect();
        Self { name: name.into(), kind: ValueType::Ranges, ranges: Some(Ranges { range }), ..Default::default() }
    }
}

/// mesh resources as Mesos `Resource`s (cpus, mem, disk when positive, ports when any), with
/// `role` and `allocation_info` set when `role` is given (offers).
pub fn resources_to_wire(r: &Resources, role: Option<&str>) -> Vec<Resource> {
    let mut out = Vec::new();
    for (name, v) in [("cpus", r.cpus), ("mem", r.mem), ("disk", r.disk)] {
        if v > crate::model::EPSILON {
            out.push(Resource::scalar(name, round3(v)));
        }
    }
    if !r.ports.is_empty() {
        out.push(Resource::ranges("ports", r.ports.ranges()));
    }
    if let Some(role) = role {
        for res in &mut out {
            res.role = Some("*".into());
            res.allocation_info = Some(AllocationInfo { role: Some(role.to_owned()) });
        }
    }
    out
}

/// Mesos rounds scalars to three decimals; so does mesh on the wire.
fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

/// Sum Mesos `Resource`s into mesh resources. Errors name the first resource mesh cannot hold:
/// a negative or non-finite scalar, a wrong type, a port out of range, or a kind of resource
/// mesh never offers (e.g. `gpus`) asked for in a positive amount.
pub fn resources_from_wire(list: &[Resource]) -> Result<Resources, String> {
    let mut out = Resources::default();
    for r in list {
        match (r.name.as_str(), r.kind) {
            ("cpus" | "mem" | "disk", ValueType::Scalar) => {
                let v =
                    r.scalar.map(|s| s.value).ok_or_else(|| format!("Resource '{}' has no scalar value", r.name))?;
                if !v.is_finite() || v < 0.0 {
                    return Err(format!("Resource '{}' has an invalid scalar value {v}", r.name));
                }
                match r.name.as_str() {
                    "cpus" => out.cpus += v,
                    "mem" => out.mem += v,
                    _ => out.disk += v,
                }
            }
            ("ports", ValueType::Ranges) => {
                for rg in r.ranges.as_ref().map(|x| x.range.as_slice()).unwrap_or_default() {
                    if rg.begin > rg.end || rg.end > u16::MAX as u64 || rg.begin == 0 {
                        return Err(format!("Resource 'ports' has an invalid range [{}-{}]", rg.begin, rg.end));
                    }
                    out.ports.insert_range(rg.begin as u16, rg.end as u16);
                }
            }
            ("cpus" | "mem" | "disk" | "ports", t) => {
                return Err(format!("Resource '{}' has the wrong type {t:?}", r.name));
            }
            (other, ValueType::Scalar) => {
                if r.scalar.is_some_and(|s| s.value > 0.0) {
                    return Err(format!("Resource '{other}' is not offered by this cluster"));
                }
            }
            (other, _) => return Err(format!("Resource '{other}' is not offered by this cluster")),
        }
    }
    Ok(out)
}

/// Flat resource summary as `/master/state` shows it: `{"cpus":2.0,"mem":1024.0,"disk":0.0,"gpus":0.0,"ports":"[31000-32000]"}`.
pub fn resources_summary(r: &Resources) -> serde_json::Value {
    let mut m = serde_json::Map::new();
    m.insert("cpus".into(), serde_json::json!(round3(r.cpus)));
    m.insert("mem".into(), serde_json::json!(round3(r.mem)));
    m.insert("disk".into(), serde_json::json!(round3(r.disk)));
    m.insert("gpus".into(), serde_json::json!(0.0));
    if !r.ports.is_empty() {
        let s: Vec<String> = r.ports.ranges().iter().map(|(a, b)| format!("{a}-{b}")).collect();
        m.insert("ports".into(), serde_json::json!(format!("[{}]", s.join(", "))));
    }
    serde_json::Value::Object(m)
}

/// An agent attribute: `{"name":"rack","type":"TEXT","text":{"value":"r1"}}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Attribute {
    /// Name.
    pub name: String,
    /// Type (mesh sends TEXT).
    #[serde(rename = "type")]
    pub kind: ValueType,
    /// TEXT value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<Text>,
    /// SCALAR value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scalar: Option<Scalar>,
}

/// `Offer`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Offer {
    /// Offer id (use it in exactly one ACCEPT or DECLINE).
    pub id: Id,
    /// The framework it is made to.
    pub framework_id: Id,
    /// The agent.
    pub agent_id: Id,
    /// The agent's host name.
    pub hostname: String,
    /// What is offered.
    #[serde(default)]
    pub resources: Vec<Resource>,
    /// The agent's attributes.
    #[serde(default)]
    pub attributes: Vec<Attribute>,
    /// Executors running on the agent (mesh runs none).
    #[serde(default)]
    pub executor_ids: Vec<Id>,
    /// The role the offer is allocated to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocation_info: Option<AllocationInfo>,
}

impl Offer {
    /// The offered resources in mesh's form (unknown kinds are ignored).
    pub fn mesh_resources(&self) -> Resources {
        let known: Vec<Resource> = self
            .resources
            .iter()
            .filter(|r| matches!(r.name.as_str(), "cpus" | "mem" | "disk" | "ports"))
            .cloned()
            .collect();
        resources_from_wire(&known).unwrap_or_default()
    }

    /// Build the wire offer of an allocator offer.
    pub fn from_allocation(o: &crate::allocator::Offer, role: &str) -> Self {
        Self {
            id: Id::new(o.id.0.clone()),
            framework_id: Id::new(o.framework_id.0.clone()),
            agent_id: Id::new(o.agent_id.0.clone()),
            hostname: o.hostname.clone(),
            resources: resources_to_wire(&o.resources, Some(role)),
            attributes: o
                .attributes
                .iter()
                .map(|(k, v)| Attribute {
                    name: k.clone(),
                    kind: ValueType::Text,
                    text: Some(Text { value: v.clone() }),
                    scalar: None,
                })
                .collect(),
            executor_ids: Vec::new(),
            allocation_info: Some(AllocationInfo { role: Some(role.to_owned()) }),
        }
    }
}

/// `FrameworkInfo.Capability`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capability {
    /// e.g. `PARTITION_AWARE`, `MULTI_ROLE`, `GPU_RESOURCES`.
    #[serde(rename = "type")]
    pub kind: String,
}

/// `Labels`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Labels {
    /// The labels.
    #[serde(default)]
    pub labels: Vec<Label>,
}

/// `Label`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Label {
    /// Key.
    pub key: String,
    /// Value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
}

/// `Value.Scalar` quantities by resource name.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ResourceQuantities {
    /// Name → amount.
    #[serde(default)]
    pub quantities: BTreeMap<String, Scalar>,
}

/// `OfferFilters.MinAllocatableResources`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MinAllocatableResources {
    /// Alternatives: an offer qualifies if it holds any one of them.
    #[serde(default)]
    pub quantities: Vec<ResourceQuantities>,
}

/// `OfferFilters`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct OfferFilters {
    /// The smallest offer worth receiving.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_allocatable_resources: Option<MinAllocatableResources>,
}

/// `FrameworkInfo`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct FrameworkInfo {
    /// The Unix user tasks run as by default (mesh runs them as itself).
    #[serde(default)]
    pub user: String,
    /// Name.
    #[serde(default)]
    pub name: String,
    /// Set when re-subscribing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<Id>,
    /// Seconds the master keeps the framework's tasks after it disconnects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failover_timeout: Option<f64>,
    /// Checkpointing (accepted; mesh always records tasks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<bool>,
    /// Deprecated single role.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// Roles (MULTI_ROLE). mesh allocates a framework under its first role.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub roles: Vec<String>,
    /// Host name of the scheduler.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// Principal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub principal: Option<String>,
    /// Web UI.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webui_url: Option<String>,
    /// Capabilities.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub capabilities: Vec<Capability>,
    /// Labels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<Labels>,
    /// Per-role offer filters.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub offer_filters: BTreeMap<String, OfferFilters>,
}

/// Mesos' role name rules (`roles::validate`): `*`, or `/`-separated components, none of them
/// empty (no leading, trailing or double `/`), `.`, `..` or `*`, none starting with `-`, and no
/// whitespace, control characters or backslashes anywhere.
pub fn validate_role(role: &str) -> Result<(), String> {
    if role == "*" {
        return Ok(());
    }
    if role.is_empty() {
        return Err("Empty role name is invalid".into());
    }
    if role.starts_with('/') {
        return Err(format!("Role '{role}' cannot start with a slash"));
    }
    if role.ends_with('/') {
        return Err(format!("Role '{role}' cannot end with a slash"));
    }
    if role.contains("//") {
        return Err(format!("Role '{role}' cannot contain two adjacent slashes"));
    }
    for c in role.split('/') {
        if c == "." || c == ".." || c == "*" {
            return Err(format!("Role '{role}' cannot contain '{c}' as a path component"));
        }
        if c.starts_with('-') {
            return Err(format!("Role component '{c}' is invalid because it starts with a dash"));
        }
        if c.chars().any(|ch| ch.is_whitespace() || ch.is_control() || ch == '\\') {
            return Err(format!(
                "Role component '{c}' is invalid because it contains backslash, whitespace or control characters"
            ));
        }
    }
    Ok(())
}

impl FrameworkInfo {
    /// The role mesh allocates the framework under: `roles[0]`, else `role`, else `*`.
    pub fn effective_role(&self) -> String {
        self.roles.first().cloned().or_else(|| self.role.clone()).unwrap_or_else(|| "*".into())
    }

    /// Whether the framework declared a capability.
    pub fn has_capability(&self, c: &str) -> bool {
        self.capabilities.iter().any(|x| x.kind == c)
    }

    /// The failover timeout in milliseconds (0 when unset, negative or not finite).
    pub fn failover_timeout_ms(&self) -> u64 {
        match self.failover_timeout {
            Some(s) if s.is_finite() && s > 0.0 => (s.min(1e9) * 1000.0) as u64,
            _ => 0,
        }
    }

    /// The `min_allocatable_resources` alternatives of its role, as mesh resources.
    pub fn min_allocatable(&self) -> Vec<Resources> {
        let role = self.effective_role();
        let Some(f) = self.offer_filters.get(&role) else { return Vec::new() };
        let Some(m) = &f.min_allocatable_resources else { return Vec::new() };
        m.quantities
            .iter()
            .map(|q| {
                let get = |n: &str| q.quantities.get(n).map(|s| s.value).unwrap_or(0.0);
                Resources::scalars(get("cpus"), get("mem"), get("disk"))
            })
            .collect()
    }
}

/// `Filters`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Filters {
    /// Seconds not to offer the refused resources again (default 5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refuse_seconds: Option<f64>,
}

impl Filters {
    /// Filters refusing for `s` seconds.
    pub fn refuse(s: f64) -> Self {
        Self { refuse_seconds: Some(s) }
    }

    /// The allocator's filters (default 5 s).
    pub fn to_allocator(self) -> crate::allocator::Filters {
        crate::allocator::Filters {
            refuse_seconds: self.refuse_seconds.unwrap_or(crate::allocator::Filters::DEFAULT_REFUSE_SECONDS),
        }
    }
}

/// `Environment.Variable`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Variable {
    /// Name.
    pub name: String,
    /// `VALUE` (default) or `SECRET` (not supported).
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// Value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
}

/// `Environment`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Environment {
    /// Variables.
    #[serde(default)]
    pub variables: Vec<Variable>,
}

/// `CommandInfo`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CommandInfo {
    /// URIs to fetch (not supported by mesh: tasks with URIs fail with TASK_ERROR).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub uris: Vec<serde_json::Value>,
    /// Environment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub environment: Option<Environment>,
    /// Run `value` through `/bin/sh -c` (default true); otherwise exec `value` with `arguments`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shell: Option<bool>,
    /// The command (shell) or executable (non-shell).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// argv (argv\[0\] included) when not a shell command.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub arguments: Vec<String>,
    /// User (mesh runs tasks as itself).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

impl CommandInfo {
    /// A shell command.
    pub fn shell(cmd: impl Into<String>) -> Self {
        Self { shell: Some(true), value: Some(cmd.into()), ..Default::default() }
    }
}

/// `ContainerInfo.DockerInfo.PortMapping`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DockerPortMapping {
    /// Host port (must be among the task's `ports` resources).
    pub host_port: u32,
    /// Container port.
    pub container_port: u32,
    /// `tcp` (default) or `udp`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
}

/// `Parameter`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Parameter {
    /// Key (a `docker run` long option without dashes).
    pub key: String,
    /// Value.
    pub value: String,
}

/// `ContainerInfo.DockerInfo`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DockerInfo {
    /// Image.
    pub image: String,
    /// `HOST` (default), `BRIDGE`, `NONE` (`USER` is not supported).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    /// Published ports (BRIDGE).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub port_mappings: Vec<DockerPortMapping>,
    /// Privileged (only where the node allows it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub privileged: Option<bool>,
    /// Extra `docker run` parameters (allow-listed).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub parameters: Vec<Parameter>,
    /// Pull even when present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub force_pull_image: Option<bool>,
}

/// `Volume`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeInfo {
    /// Path in the container.
    pub container_path: String,
    /// Path on the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_path: Option<String>,
    /// `RW` (default) or `RO`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
}

/// `ContainerInfo`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ContainerInfo {
    /// `DOCKER` or `MESOS`.
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// Docker settings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub docker: Option<DockerInfo>,
    /// Mesos containerizer settings (an image there is not supported).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mesos: Option<serde_json::Value>,
    /// Bind mounts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<VolumeInfo>,
}

/// `DurationInfo`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DurationInfo {
    /// Nanoseconds.
    pub nanoseconds: i64,
}

/// `KillPolicy`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KillPolicy {
    /// Time between SIGTERM and SIGKILL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grace_period: Option<DurationInfo>,
}

/// `TaskInfo`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TaskInfo {
    /// Name.
    pub name: String,
    /// Id, unique among the framework's tasks.
    pub task_id: Id,
    /// The agent of the offer.
    pub agent_id: Id,
    /// Resources it uses (must fit in the offers).
    #[serde(default)]
    pub resources: Vec<Resource>,
    /// The command (the built-in command executor runs it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<CommandInfo>,
    /// A container to run it in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<ContainerInfo>,
    /// A custom executor (not supported: TASK_ERROR).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub executor: Option<serde_json::Value>,
    /// Kill policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kill_policy: Option<KillPolicy>,
    /// Labels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<Labels>,
    /// Opaque data (base64).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
}

/// Mesos task states, as the wire names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[allow(missing_docs)]
pub enum TaskState {
    #[serde(rename = "TASK_STAGING")]
    Staging,
    #[serde(rename = "TASK_STARTING")]
    Starting,
    #[serde(rename = "TASK_RUNNING")]
    Running,
    #[serde(rename = "TASK_KILLING")]
    Killing,
    #[serde(rename = "TASK_FINISHED")]
    Finished,
    #[serde(rename = "TASK_FAILED")]
    Failed,
    #[serde(rename = "TASK_KILLED")]
    Killed,
    #[serde(rename = "TASK_ERROR")]
    Error,
    #[serde(rename = "TASK_LOST")]
    Lost,
    #[serde(rename = "TASK_DROPPED")]
    Dropped,
    #[serde(rename = "TASK_UNREACHABLE")]
    Unreachable,
    #[serde(rename = "TASK_GONE")]
    Gone,
    #[serde(rename = "TASK_GONE_BY_OPERATOR")]
    GoneByOperator,
    #[serde(rename = "TASK_UNKNOWN")]
    Unknown,
}

impl TaskState {
    /// Whether the state is terminal (LOST counts as terminal here, as mesh removes the task).
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            TaskState::Finished
                | TaskState::Failed
                | TaskState::Killed
                | TaskState::Error
                | TaskState::Lost
                | TaskState::Dropped
                | TaskState::Gone
        )
    }

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Staging => "TASK_STAGING",
            TaskState::Starting => "TASK_STARTING",
            TaskState::Running => "TASK_RUNNING",
            TaskState::Killing => "TASK_KILLING",
            TaskState::Finished => "TASK_FINISHED",
            TaskState::Failed => "TASK_FAILED",
            TaskState::Killed => "TASK_KILLED",
            TaskState::Error => "TASK_ERROR",
            TaskState::Lost => "TASK_LOST",
            TaskState::Dropped => "TASK_DROPPED",
            TaskState::Unreachable => "TASK_UNREACHABLE",
            TaskState::Gone => "TASK_GONE",
            TaskState::GoneByOperator => "TASK_GONE_BY_OPERATOR",
            TaskState::Unknown => "TASK_UNKNOWN",
        }
    }
}

impl From<crate::proto::TaskState> for TaskState {
    fn from(s: crate::proto::TaskState) -> Self {
        use crate::proto::TaskState as P;
        match s {
            P::Staging => TaskState::Staging,
            P::Starting => TaskState::Starting,
            P::Running => TaskState::Running,
            P::Killing => TaskState::Killing,
            P::Finished => TaskState::Finished,
            P::Failed => TaskState::Failed,
            P::Killed => TaskState::Killed,
            P::Lost => TaskState::Lost,
            P::Error => TaskState::Error,
            P::Unreachable => TaskState::Unreachable,
        }
    }
}

/// `TaskStatus`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskStatus {
    /// The task.
    pub task_id: Id,
    /// Its state.
    pub state: TaskState,
    /// Detail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// `SOURCE_MASTER`, `SOURCE_AGENT` or `SOURCE_EXECUTOR`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// e.g. `REASON_RECONCILIATION`, `REASON_INVALID_OFFERS`, `REASON_TASK_INVALID`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Its agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_id: Option<Id>,
    /// Its executor (the command executor's id is the task id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub executor_id: Option<Id>,
    /// Seconds since the epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<f64>,
    /// base64 of 16 bytes; present on updates that must be acknowledged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
    /// Health (tasks with health checks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthy: Option<bool>,
}

/// `MasterInfo` (as sent in SUBSCRIBED).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MasterInfo {
    /// Master id.
    pub id: String,
    /// IPv4 address as a number (network order), 0 when not IPv4.
    #[serde(default)]
    pub ip: u32,
    /// Port.
    #[serde(default)]
    pub port: u32,
    /// Host name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// Mesos version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
}

// ----- calls -----

/// The type of a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
#[allow(missing_docs)]
pub enum CallType {
    Unknown,
    Subscribe,
    Teardown,
    Accept,
    Decline,
    AcceptInverseOffers,
    DeclineInverseOffers,
    Revive,
    Suppress,
    Kill,
    Shutdown,
    Acknowledge,
    AcknowledgeOperationStatus,
    Reconcile,
    ReconcileOperations,
    Message,
    Request,
    UpdateFramework,
}

/// `Call.Subscribe`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Subscribe {
    /// Who subscribes.
    pub framework_info: FrameworkInfo,
    /// Roles to start suppressed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub suppressed_roles: Vec<String>,
}

/// `Offer.Operation.Launch`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Launch {
    /// Tasks to launch.
    #[serde(default)]
    pub task_infos: Vec<TaskInfo>,
}

/// `Offer.Operation`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Operation {
    /// `LAUNCH` (the only type mesh carries out).
    #[serde(rename = "type")]
    pub kind: String,
    /// LAUNCH payload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub launch: Option<Launch>,
    /// LAUNCH_GROUP payload (not supported: its tasks get TASK_ERROR).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub launch_group: Option<serde_json::Value>,
}

impl Operation {
    /// A LAUNCH of `tasks`.
    pub fn launch(tasks: Vec<TaskInfo>) -> Self {
        Self { kind: "LAUNCH".into(), launch: Some(Launch { task_infos: tasks }), launch_group: None }
    }
}

/// `Call.Accept`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Accept {
    /// Offers (all of one agent).
    #[serde(default)]
    pub offer_ids: Vec<Id>,
    /// What to do with them.
    #[serde(default)]
    pub operations: Vec<Operation>,
    /// Filter for the unused rest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filters: Option<Filters>,
}

/// `Call.Decline`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Decline {
    /// Offers.
    #[serde(default)]
    pub offer_ids: Vec<Id>,
    /// Filter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filters: Option<Filters>,
}

/// `Call.Revive` / `Call.Suppress`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Roles {
    /// Roles (empty = all of the framework's).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub roles: Vec<String>,
}

/// `Call.Kill`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Kill {
    /// The task.
    pub task_id: Id,
    /// Its agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_id: Option<Id>,
    /// Overrides the task's kill policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kill_policy: Option<KillPolicy>,
}

/// `Call.Shutdown`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Shutdown {
    /// Executor (the command executor's id is its task id).
    pub executor_id: Id,
    /// Agent.
    pub agent_id: Id,
}

/// `Call.Acknowledge`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Acknowledge {
    /// Agent of the update.
    pub agent_id: Id,
    /// Task of the update.
    pub task_id: Id,
    /// The update's uuid (base64).
    pub uuid: String,
}

/// `Call.Reconcile.Task`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ReconcileTask {
    /// Task.
    pub task_id: Id,
    /// Agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_id: Option<Id>,
}

/// `Call.Reconcile`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Reconcile {
    /// Tasks to report (empty = implicit: every task of the framework).
    #[serde(default)]
    pub tasks: Vec<ReconcileTask>,
}

/// `Call.Message` / `Event.Message`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Message {
    /// Agent.
    pub agent_id: Id,
    /// Executor.
    pub executor_id: Id,
    /// base64 data.
    #[serde(default)]
    pub data: String,
}

/// `Call.UpdateFramework`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct UpdateFramework {
    /// The new info (its id must be the framework's).
    pub framework_info: FrameworkInfo,
    /// Roles to suppress.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub suppressed_roles: Vec<String>,
}

/// A scheduler call (`POST /api/v1/scheduler`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct Call {
    /// Which call.
    #[serde(rename = "type")]
    pub kind: CallType,
    /// The calling framework (every call but SUBSCRIBE).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub framework_id: Option<Id>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subscribe: Option<Subscribe>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accept: Option<Accept>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decline: Option<Decline>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accept_inverse_offers: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decline_inverse_offers: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revive: Option<Roles>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suppress: Option<Roles>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kill: Option<Kill>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shutdown: Option<Shutdown>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acknowledge: Option<Acknowledge>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acknowledge_operation_status: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reconcile: Option<Reconcile>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reconcile_operations: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<Message>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub update_framework: Option<UpdateFramework>,
}

impl Call {
    /// A call of `kind` by `framework_id` with no payload.
    pub fn new(kind: CallType, framework_id: Option<Id>) -> Self {
        Self {
            kind,
            framework_id,
            subscribe: None,
            accept: None,
            decline: None,
            accept_inverse_offers: None,
            decline_inverse_offers: None,
            revive: None,
            suppress: None,
            kill: None,
            shutdown: None,
            acknowledge: None,
            acknowledge_operation_status: None,
            reconcile: None,
            reconcile_operations: None,
            message: None,
            request: None,
            update_framework: None,
        }
    }

    /// SUBSCRIBE with `info` (re-subscribe when `info.id` is set).
    pub fn subscribe(info: FrameworkInfo) -> Self {
        let mut c = Self::new(CallType::Subscribe, info.id.clone());
        c.subscribe = Some(Subscribe { framework_info: info, suppressed_roles: Vec::new() });
        c
    }

    /// Check that the payload the type needs is there (Mesos' `validation::scheduler::call`).
    /// The message is Mesos': `Expecting 'accept' to be present`, ...
    pub fn validate(&self) -> Result<(), String> {
        let need = |present: bool, field: &str| {
            if present { Ok(()) } else { Err(format!("Expecting '{field}' to be present")) }
        };
        if self.kind == CallType::Subscribe {
            let s = self.subscribe.as_ref().ok_or("Expecting 'subscribe' to be present")?;
            if let (Some(top), Some(inner)) = (&self.framework_id, &s.framework_info.id)
                && top != inner
            {
                return Err("'framework_id' differs from 'subscribe.framework_info.id'".into());
            }
            for role in s.framework_info.roles.iter().chain(&s.framework_info.role) {
                validate_role(role)?;
            }
            return Ok(());
        }
        need(self.framework_id.is_some(), "framework_id")?;
        match self.kind {
            CallType::Accept => need(self.accept.is_some(), "accept"),
            CallType::Decline => need(self.decline.is_some(), "decline"),
            CallType::AcceptInverseOffers => need(self.accept_inverse_offers.is_some(), "accept_inverse_offers"),
            CallType::DeclineInverseOffers => need(self.decline_inverse_offers.is_some(), "decline_inverse_offers"),
            CallType::Kill => need(self.kill.is_some(), "kill"),
            CallType::Shutdown => need(self.shutdown.is_some(), "shutdown"),
            CallType::Acknowledge => {
                let a = self.acknowledge.as_ref().ok_or("Expecting 'acknowledge' to be present")?;
                decode_uuid(&a.uuid).map(|_| ())
            }
            CallType::AcknowledgeOperationStatus => {
                need(self.acknowledge_operation_status.is_some(), "acknowledge_operation_status")
            }
            CallType::Reconcile => need(self.reconcile.is_some(), "reconcile"),
            CallType::ReconcileOperations => need(self.reconcile_operations.is_some(), "reconcile_operations"),
            CallType::Message => need(self.message.is_some(), "message"),
            CallType::Request => need(self.request.is_some(), "request"),
            CallType::UpdateFramework => need(self.update_framework.is_some(), "update_framework"),
            CallType::Unknown => Err("Received 'UNKNOWN' call".into()),
            CallType::Subscribe | CallType::Teardown | CallType::Revive | CallType::Suppress => Ok(()),
        }
    }
}

// ----- events -----

/// `Event.Subscribed`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Subscribed {
    /// The framework's id (new, or the one it re-subscribed with).
    pub framework_id: Id,
    /// Seconds between HEARTBEATs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heartbeat_interval_seconds: Option<f64>,
    /// The master.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub master_info: Option<MasterInfo>,
}

/// `Event.Offers`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Offers {
    /// The offers.
    #[serde(default)]
    pub offers: Vec<Offer>,
}

/// `Event.Rescind`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Rescind {
    /// The offer that is no longer valid.
    pub offer_id: Id,
}

/// `Event.Update`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Update {
    /// The status.
    pub status: TaskStatus,
}

/// `Event.Failure`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Failure {
    /// The lost agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_id: Option<Id>,
    /// The lost executor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub executor_id: Option<Id>,
    /// The executor's exit status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<i32>,
}

/// `Event.Error`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ErrorEvent {
    /// What went wrong; the stream closes after it.
    pub message: String,
}

/// An event on the subscription stream.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "RawEvent", into = "RawEvent")]
pub enum Event {
    /// First event of a stream.
    Subscribed(Subscribed),
    /// New offers.
    Offers(Offers),
    /// An offer was withdrawn.
    Rescind(Rescind),
    /// A task status update.
    Update(Update),
    /// A message from an executor.
    Message(Message),
    /// An agent or executor was lost.
    Failure(Failure),
    /// An error; the stream ends after it.
    Error(ErrorEvent),
    /// Keep-alive.
    Heartbeat,
}

impl Event {
    /// The wire type name.
    pub fn type_name(&self) -> &'static str {
        match self {
            Event::Subscribed(_) => "SUBSCRIBED",
            Event::Offers(_) => "OFFERS",
            Event::Rescind(_) => "RESCIND",
            Event::Update(_) => "UPDATE",
            Event::Message(_) => "MESSAGE",
            Event::Failure(_) => "FAILURE",
            Event::Error(_) => "ERROR",
            Event::Heartbeat => "HEARTBEAT",
        }
    }

    /// The event as one RecordIO record of its JSON.
    pub fn to_record(&self) -> Vec<u8> {
        let json = serde_json::to_vec(self).unwrap_or_else(|_| b"{\"type\":\"HEARTBEAT\"}".to_vec());
        encode_record(&json)
    }
}

/// The proto-faithful JSON shape of an event.
#[derive(Serialize, Deserialize)]
struct RawEvent {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    subscribed: Option<Subscribed>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    offers: Option<Offers>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    rescind: Option<Rescind>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    update: Option<Update>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    message: Option<Message>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    failure: Option<Failure>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<ErrorEvent>,
}

impl From<Event> for RawEvent {
    fn from(e: Event) -> Self {
        let mut r = RawEvent {
            kind: e.type_name().into(),
            subscribed: None,
            offers: None,
            rescind: None,
            update: None,
            message: None,
            failure: None,
            error: None,
        };
        match e {
            Event::Subscribed(x) => r.subscribed = Some(x),
            Event::Offers(x) => r.offers = Some(x),
            Event::Rescind(x) => r.rescind = Some(x),
            Event::Update(x) => r.update = Some(x),
            Event::Message(x) => r.message = Some(x),
            Event::Failure(x) => r.failure = Some(x),
            Event::Error(x) => r.error = Some(x),
            Event::Heartbeat => {}
        }
        r
    }
}

impl TryFrom<RawEvent> for Event {
    type Error = String;
    fn try_from(r: RawEvent) -> Result<Self, String> {
        let missing = |f: &str| format!("event of type {} lacks its '{f}' field", r.kind);
        Ok(match r.kind.as_str() {
            "SUBSCRIBED" => Event::Subscribed(r.subscribed.ok_or_else(|| missing("subscribed"))?),
            "OFFERS" => Event::Offers(r.offers.ok_or_else(|| missing("offers"))?),
            "RESCIND" => Event::Rescind(r.rescind.ok_or_else(|| missing("rescind"))?),
            "UPDATE" => Event::Update(r.update.ok_or_else(|| missing("update"))?),
            "MESSAGE" => Event::Message(r.message.ok_or_else(|| missing("message"))?),
            "FAILURE" => Event::Failure(r.failure.ok_or_else(|| missing("failure"))?),
            "ERROR" => Event::Error(r.error.ok_or_else(|| missing("error"))?),
            "HEARTBEAT" => Event::Heartbeat,
            other => return Err(format!("unknown event type {other}")),
        })
    }
}

// ----- uuids -----

/// A fresh status-update uuid: base64 of 16 bytes.
pub fn encode_uuid(bytes: [u8; 16]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Decode a status-update uuid (base64 of 16 bytes); the error is Mesos' wording.
pub fn decode_uuid(s: &str) -> Result<[u8; 16], String> {
    let b = base64::engine::general_purpose::STANDARD.decode(s.trim()).map_err(|_| "Not a valid UUID".to_owned())?;
    b.try_into().map_err(|_| "Not a valid UUID".to_owned())
}

/// base64 of arbitrary bytes (`bytes` fields).
pub fn encode_bytes(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}

// ----- RecordIO -----

/// The largest record the decoder accepts (64 MiB).
pub const MAX_RECORD: usize = 64 * 1024 * 1024;

/// Frame one record: `<decimal length>\n<bytes>`.
pub fn encode_record(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 12);
    out.extend_from_slice(payload.len().to_string().as_bytes());
    out.push(b'\n');
    out.extend_from_slice(payload);
    out
}

/// Why a RecordIO stream is malformed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RecordIoError {
    /// The length header is not a decimal number followed by a newline.
    #[error("malformed RecordIO length header {0:?}")]
    BadHeader(String),
    /// A record is longer than [`MAX_RECORD`].
    #[error("RecordIO record of {0} bytes exceeds the limit of {MAX_RECORD}")]
    TooLarge(usize),
}

/// Incremental RecordIO decoder: feed bytes as they arrive, take whole records out.
#[derive(Debug, Default)]
pub struct RecordIoDecoder {
    buf: Vec<u8>,
    failed: bool,
}

impl RecordIoDecoder {
    /// A new decoder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Append received bytes.
    pub fn feed(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The next complete record, `None` when more bytes are needed. After an error the stream
    /// is unusable and every later call returns the error again.
    pub fn next_record(&mut self) -> Result<Option<Vec<u8>>, RecordIoError> {
        if self.failed {
            return Err(RecordIoError::BadHeader("(after an earlier error)".into()));
        }
        let nl = match self.buf.iter().position(|b| *b == b'\n') {
            Some(i) => i,
            None => {
                // 20 digits hold any usize; more than that without a newline is garbage.
                if self.buf.len() > 20 || self.buf.iter().any(|b| !b.is_ascii_digit()) {
                    return Err(self.fail());
                }
                return Ok(None);
            }
        };
        let header = &self.buf[..nl];
        if header.is_empty() || header.len() > 20 || !header.iter().all(|b| b.is_ascii_digit()) {
            return Err(self.fail());
        }
        let len: usize = std::str::from_utf8(header).ok().and_then(|s| s.parse().ok()).ok_or_else(|| self.fail())?;
        if len > MAX_RECORD {
            self.failed = true;
            return Err(RecordIoError::TooLarge(len));
        }
        if self.buf.len() < nl + 1 + len {
            return Ok(None);
        }
        let record = self.buf[nl + 1..nl + 1 + len].to_vec();
        self.buf.drain(..nl + 1 + len);
        Ok(Some(record))
    }

    /// Bytes received but not yet part of a whole record.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    fn fail(&mut self) -> RecordIoError {
        self.failed = true;
        let shown: String = String::from_utf8_lossy(&self.buf[..self.buf.len().min(24)]).into_owned();
        RecordIoError::BadHeader(shown)
    }
}

/// Build a mesh [`PortRanges`] from Mesos ranges (invalid ranges are skipped).
pub fn port_ranges(r: &Ranges) -> PortRanges {
    let mut p = PortRanges::new();
    for x in &r.range {
        if x.begin >= 1 && x.begin <= x.end && x.end <= u16::MAX as u64 {
            p.insert_range(x.begin as u16, x.end as u16);
        }
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn recordio_round_trips_and_splits_anywhere() {
        let records: Vec<Vec<u8>> = vec![b"{}".to_vec(), Vec::new(), "{\"a\":\"\u{e9}\"}".as_bytes().to_vec()];
        let mut stream = Vec::new();
        for r in &records {
            stream.extend(encode_record(r));
        }
        assert_eq!(&stream[..3], b"2\n{");
        for chunk in 1..stream.len() {
            let mut d = RecordIoDecoder::new();
            let mut got = Vec::new();
            for part in stream.chunks(chunk) {
                d.feed(part);
                while let Some(r) = d.next_record().unwrap() {
                    got.push(r);
                }
            }
            assert_eq!(got, records, "chunk size {chunk}");
            assert_eq!(d.pending(), 0);
        }
    }

    #[test]
    fn recordio_rejects_malformed_headers() {
        for bad in [&b"abc\n{}"[..], b"-1\n", b"\n{}", b"12x\n", b"123456789012345678901234"] {
            let mut d = RecordIoDecoder::new();
            d.feed(bad);
            assert!(matches!(d.next_record(), Err(RecordIoError::BadHeader(_))), "{:?}", String::from_utf8_lossy(bad));
            assert!(d.next_record().is_err(), "errors are sticky");
        }
        let mut d = RecordIoDecoder::new();
        d.feed(b"99999999999\n");
        assert_eq!(d.next_record(), Err(RecordIoError::TooLarge(99_999_999_999)));
        // a partial header is not an error yet
        let mut d = RecordIoDecoder::new();
        d.feed(b"12");
        assert_eq!(d.next_record(), Ok(None));
    }

    #[test]
    fn events_use_the_nested_proto_shape() {
        let e = Event::Offers(Offers { offers: vec![] });
        assert_eq!(serde_json::to_value(&e).unwrap(), json!({"type":"OFFERS","offers":{"offers":[]}}));
        let e = Event::Error(ErrorEvent { message: "Framework failed over".into() });
        assert_eq!(
            serde_json::to_value(&e).unwrap(),
            json!({"type":"ERROR","error":{"message":"Framework failed over"}})
        );
        assert_eq!(serde_json::to_value(Event::Heartbeat).unwrap(), json!({"type":"HEARTBEAT"}));
        let rec = Event::Heartbeat.to_record();
        assert_eq!(rec, b"20\n{\"type\":\"HEARTBEAT\"}".to_vec());
        let back: Event =
            serde_json::from_value(json!({"type":"RESCIND","rescind":{"offer_id":{"value":"o1"}}})).unwrap();
        assert_eq!(back, Event::Rescind(Rescind { offer_id: Id::new("o1") }));
        assert!(serde_json::from_value::<Event>(json!({"type":"OFFERS"})).is_err());
    }

    #[test]
    fn resources_convert_both_ways() {
        let r = Resources { ports: PortRanges::range(31000, 31004), ..Resources::scalars(1.5, 256.0, 0.0) };
        let wire = resources_to_wire(&r, Some("batch"));
        let v = serde_json::to_value(&wire).unwrap();
        assert_eq!(
            v[0],
            json!({"name":"cpus","type":"SCALAR","scalar":{"value":1.5},"role":"*","allocation_info":{"role":"batch"}})
        );
        assert_eq!(v[2]["ranges"], json!({"range":[{"begin":31000,"end":31004}]}));
        assert_eq!(v.as_array().unwrap().len(), 3, "zero disk is left out");
        assert_eq!(resources_from_wire(&wire).unwrap(), r);
        let task: Vec<Resource> = serde_json::from_value(json!([
            {"name":"cpus","type":"SCALAR","scalar":{"value":0.5}},
            {"name":"cpus","type":"SCALAR","scalar":{"value":0.25}},
            {"name":"mem","type":"SCALAR","scalar":{"value":32}},
            {"name":"gpus","type":"SCALAR","scalar":{"value":0}}
        ]))
        .unwrap();
        let m = resources_from_wire(&task).unwrap();
        assert_eq!((m.cpus, m.mem), (0.75, 32.0));
        for bad in [
            json!([{"name":"gpus","type":"SCALAR","scalar":{"value":1}}]),
            json!([{"name":"cpus","type":"SCALAR","scalar":{"value":-1}}]),
            json!([{"name":"cpus","type":"RANGES","ranges":{"range":[]}}]),
            json!([{"name":"ports","type":"RANGES","ranges":{"range":[{"begin":5,"end":2}]}}]),
            json!([{"name":"ports","type":"RANGES","ranges":{"range":[{"begin":1,"end":70000}]}}]),
        ] {
            let list: Vec<Resource> = serde_json::from_value(bad.clone()).unwrap();
            assert!(resources_from_wire(&list).is_err(), "{bad}");
        }
        assert_eq!(resources_summary(&r)["ports"], json!("[31000-31004]"));
    }

    #[test]
    fn calls_parse_as_pymesos_sends_them_and_validate() {
        let c: Call = serde_json::from_value(json!({
            "type": "SUBSCRIBE",
            "subscribe": {"framework_info": {"user": "", "name": "py", "failover_timeout": 100, "capabilities": [{"type": "GPU_RESOURCES"}]}}
        }))
        .unwrap();
        assert!(c.validate().is_ok());
        let fi = &c.subscribe.as_ref().unwrap().framework_info;
        assert_eq!((fi.effective_role().as_str(), fi.failover_timeout_ms()), ("*", 100_000));
        let c: Call = serde_json::from_value(json!({
            "type": "ACCEPT", "framework_id": {"value": "f"},
            "accept": {"offer_ids": [{"value": "o"}], "operations": [{"type": "LAUNCH", "launch": {"task_infos": [
                {"name": "t", "task_id": {"value": "t1"}, "agent_id": {"value": "a"},
                 "resources": [{"name": "cpus", "type": "SCALAR", "scalar": {"value": 0.1}}],
                 "command": {"value": "echo hi"}}
            ]}}], "filters": {"refuse_seconds": 1}}
        }))
        .unwrap();
        assert!(c.validate().is_ok());
        let t = &c.accept.as_ref().unwrap().operations[0].launch.as_ref().unwrap().task_infos[0];
        assert_eq!(t.command.as_ref().unwrap().value.as_deref(), Some("echo hi"));
        let bad = Call::new(CallType::Accept, Some(Id::new("f")));
        assert_eq!(bad.validate(), Err("Expecting 'accept' to be present".into()));
        let bad = Call::new(CallType::Revive, None);
        assert_eq!(bad.validate(), Err("Expecting 'framework_id' to be present".into()));
        let mut ack = Call::new(CallType::Acknowledge, Some(Id::new("f")));
        ack.acknowledge = Some(Acknowledge { agent_id: Id::new("a"), task_id: Id::new("t"), uuid: "bm9wZQ==".into() });
        assert_eq!(ack.validate(), Err("Not a valid UUID".into()));
        ack.acknowledge.as_mut().unwrap().uuid = encode_uuid([7; 16]);
        assert!(ack.validate().is_ok());
        assert!(serde_json::from_value::<Call>(json!({"type": "NOPE"})).is_err());
        let mut sub = Call::subscribe(FrameworkInfo { id: Some(Id::new("a")), ..Default::default() });
        sub.framework_id = Some(Id::new("b"));
        assert!(sub.validate().is_err());
    }

    #[test]
    fn uuids_are_base64_of_16_bytes() {
        let u = encode_uuid([1; 16]);
        assert_eq!(decode_uuid(&u).unwrap(), [1; 16]);
        assert!(decode_uuid("AAAA").is_err());
    }

    #[test]
    fn role_names_follow_mesos_rules() {
        for ok in ["*", "eng", "eng/web", "a.b", "a-b", "a/b/c"] {
            assert!(validate_role(ok).is_ok(), "{ok}");
        }
        for bad in
            ["", "..", ".", "../..", "a/../b", "a/./b", "/a", "a/", "a//b", "-a", "a/-b", "a b", "a\\b", "a\tb", "a/*"]
        {
            assert!(validate_role(bad).is_err(), "{bad}");
        }
        let sub = |roles: &[&str]| {
            let info = FrameworkInfo { roles: roles.iter().map(|r| r.to_string()).collect(), ..Default::default() };
            Call::subscribe(info)
        };
        assert!(sub(&["eng/web"]).validate().is_ok());
        assert!(sub(&["eng", "../.."]).validate().is_err());
    }
}
