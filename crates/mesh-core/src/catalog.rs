//! The service catalog: nodes, services and service instances with health, behind [`Catalog`].
//!
//! The state machine keeps a [`CatalogState`]; after each applied batch the control side publishes
//! an immutable [`CatalogState`] (cheap to clone: persistent maps) that DNS and the HTTP reads use.

use imbl::{OrdMap, OrdSet};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::IpAddr;

use crate::model::Millis;

/// A node in the catalog.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Node {
    /// Node name (e.g. the host name).
    pub name: String,
    /// Its address.
    pub address: IpAddr,
    /// Its datacenter.
    pub datacenter: String,
    /// Node metadata.
    pub meta: BTreeMap<String, String>,
    /// Consul's node `TaggedAddresses` as registered (`lan`, `wan`, ...; the IPv4/IPv6 variants
    /// are derived when shown).
    #[serde(default)]
    pub tagged_addresses: BTreeMap<String, String>,
    /// Raft-style index at which it was created.
    pub create_index: u64,
    /// Index of its last change.
    pub modify_index: u64,
}

/// Health of an instance.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, Default)]
pub enum Health {
    /// All checks pass.
    #[default]
    Passing,
    /// Some check warns; still answered in DNS by default.
    Warning,
    /// Some check is critical; never answered in DNS.
    Critical,
}

impl Health {
    /// Parse Consul's lowercase name.
    pub fn parse(s: &str) -> Option<Health> {
        match s.to_ascii_lowercase().as_str() {
            "passing" => Some(Health::Passing),
            "warning" => Some(Health::Warning),
            "critical" => Some(Health::Critical),
            _ => None,
        }
    }

    /// Consul's lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Passing => "passing",
            Health::Warning => "warning",
            Health::Critical => "critical",
        }
    }
}

/// One instance of a service.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ServiceInstance {
    /// Unique id (for a Marathon task: the task id).
    pub id: String,
    /// Service name (`webserver`, `web-prod`).
    pub service: String,
    /// Node that runs it.
    pub node: String,
    /// Its address, if it differs from the node's.
    pub address: Option<IpAddr>,
    /// Its port.
    pub port: u16,
    /// Tags.
    pub tags: Vec<String>,
    /// Metadata.
    pub meta: BTreeMap<String, String>,
    /// Aggregated health: the worst of `source_health`, its own checks and its node's checks. When an
    /// instance is upserted, the value passed in here is taken as its source's view (`source_health`).
    pub health: Health,
    /// What the registering source says (Marathon health checks; `Passing` for agent registrations,
    /// whose health comes from their [`Check`]s).
    #[serde(default)]
    pub source_health: Health,
    /// DNS SRV weights (Consul's `Weights`).
    #[serde(default)]
    pub weights: Weights,
    /// What only the Consul API shows: `EnableTagOverride`, `TaggedAddresses`, `Kind`.
    #[serde(default)]
    pub extra: ConsulExtra,
    /// Index at which it was created.
    pub create_index: u64,
    /// Index of its last change.
    pub modify_index: u64,
}

/// Fields of a Consul service registration that mesh keeps and shows but does not act on.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsulExtra {
    /// `EnableTagOverride`.
    #[serde(default)]
    pub enable_tag_override: bool,
    /// `TaggedAddresses`: name (`lan`, `wan`, ...) to address and port.
    #[serde(default)]
    pub tagged_addresses: BTreeMap<String, TaggedAddress>,
    /// `Kind` (empty for a typical service).
    #[serde(default)]
    pub kind: String,
    /// `Proxy` (for a `connect-proxy`), as JSON text, kept as sent; empty when not given.
    #[serde(default)]
    pub proxy_json: String,
    /// `Locality` (`Region`, `Zone`), as JSON text, kept as sent; empty when not given.
    #[serde(default)]
    pub locality_json: String,
}

/// One entry of a service's `TaggedAddresses`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaggedAddress {
    /// The address (an IP or a host name, as registered).
    pub address: String,
    /// The port.
    pub port: u16,
}

/// Consul's service `Weights`: SRV weights for passing and warning instances.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Weights {
    /// Weight while passing (default 1).
    pub passing: u16,
    /// Weight while warning (default 1).
    pub warning: u16,
}

impl Default for Weights {
    fn default() -> Self {
        Self { passing: 1, warning: 1 }
    }
}

/// How a check is run by the agent that owns it. All-default means "not run by an agent" (a TTL of
/// 0 and no target): serfHealth, maintenance and catalog-only checks.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckDefinition {
    /// HTTP(S) URL to probe (2xx passing, 429 warning, anything else critical).
    #[serde(default)]
    pub http: String,
    /// HTTP method (default GET).
    #[serde(default)]
    pub method: String,
    /// HTTP request headers.
    #[serde(default)]
    pub header: BTreeMap<String, Vec<String>>,
    /// Skip TLS verification for HTTPS.
    #[serde(default)]
    pub tls_skip_verify: bool,
    /// `host:port` to connect to.
    #[serde(default)]
    pub tcp: String,
    /// Script check: the command and its arguments.
    #[serde(default)]
    pub args: Vec<String>,
    /// Docker check (Consul's `DockerContainerID`): `args` run inside this container
    /// (`docker exec`), not on the host.
    #[serde(default)]
    pub docker_container_id: String,
    /// gRPC check: `host:port` or `host:port/service`, asked `grpc.health.v1.Health/Check`.
    #[serde(default)]
    pub grpc: String,
    /// gRPC over TLS.
    #[serde(default)]
    pub grpc_use_tls: bool,
    /// TTL check: time without an update after which it turns critical.
    #[serde(default)]
    pub ttl_ms: u64,
    /// How often the agent runs it.
    #[serde(default)]
    pub interval_ms: u64,
    /// Per-run timeout.
    #[serde(default)]
    pub timeout_ms: u64,
    /// Consecutive successes needed to turn passing (0 = the latest result applies).
    #[serde(default)]
    pub success_before_passing: u32,
    /// Consecutive failures needed to turn critical (0 = the latest result applies).
    #[serde(default)]
    pub failures_before_critical: u32,
    /// Remove the service once this check has been critical this long (0 = never).
    #[serde(default)]
    pub deregister_critical_after_ms: u64,
}

impl CheckDefinition {
    /// The check's type, as Consul names it.
    pub fn kind(&self) -> &'static str {
        if !self.http.is_empty() {
            "http"
        } else if !self.tcp.is_empty() {
            "tcp"
        } else if !self.grpc.is_empty() {
            "grpc"
        } else if !self.args.is_empty() && !self.docker_container_id.is_empty() {
            "docker"
        } else if !self.args.is_empty() {
            "script"
        } else if self.ttl_ms > 0 {
            "ttl"
        } else {
            ""
        }
    }

    /// Whether an agent runs it periodically (HTTP, TCP, gRPC, script, docker).
    pub fn is_active(&self) -> bool {
        matches!(self.kind(), "http" | "tcp" | "grpc" | "script" | "docker")
    }
}

/// A health check (Consul's `HealthCheck`), of a node (`service_id` empty) or of a service instance.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Check {
    /// The node it belongs to.
    pub node: String,
    /// Its id, unique on the node (`service:web1`, `serfHealth`).
    pub id: String,
    /// Its name.
    pub name: String,
    /// Current status.
    pub status: Health,
    /// Human notes.
    #[serde(default)]
    pub notes: String,
    /// Output of the last run.
    #[serde(default)]
    pub output: String,
    /// The service instance it belongs to; empty for node checks.
    #[serde(default)]
    pub service_id: String,
    /// That service's name.
    #[serde(default)]
    pub service_name: String,
    /// How it is run.
    #[serde(default)]
    pub definition: CheckDefinition,
    /// TTL checks: when it expires unless updated.
    #[serde(default)]
    pub ttl_deadline: Option<Millis>,
    /// Since when it has been critical.
    #[serde(default)]
    pub critical_since: Option<Millis>,
    /// Index at which it was created.
    #[serde(default)]
    pub create_index: u64,
    /// Index of its last change.
    #[serde(default)]
    pub modify_index: u64,
}

impl Check {
    /// A check as registered: `status` initial, ids filled in by the caller.
    pub fn new(node: &str, id: &str, name: &str, status: Health) -> Self {
        Self {
            node: node.to_owned(),
            id: id.to_owned(),
            name: name.to_owned(),
            status,
            notes: String::new(),
            output: String::new(),
            service_id: String::new(),
            service_name: String::new(),
            definition: CheckDefinition::default(),
            ttl_deadline: None,
            critical_since: None,
            create_index: 0,
            modify_index: 0,
        }
    }

    /// Consul's `Type` field.
    pub fn kind(&self) -> &'static str {
        self.definition.kind()
    }
}

/// Consul's thresholds as a small state machine: the agent feeds it each run's raw result and
/// reports the status it returns. `SuccessBeforePassing` consecutive passes are needed to turn
/// passing, `FailuresBeforeCritical` consecutive failures to turn warning/critical (0 or 1 = at once).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckCounter {
    successes: u32,
    failures: u32,
    status: Health,
}

impl CheckCounter {
    /// A counter starting from the check's current status.
    pub fn new(status: Health) -> Self {
        Self { successes: 0, failures: 0, status }
    }

    /// The current status.
    pub fn status(&self) -> Health {
        self.status
    }

    /// Record one run's result; returns the (possibly unchanged) status.
    pub fn observe(&mut self, result: Health, def: &CheckDefinition) -> Health {
        if result == Health::Passing {
            self.successes = self.successes.saturating_add(1);
            self.failures = 0;
            if self.successes >= def.success_before_passing {
                self.status = Health::Passing;
            }
        } else {
            self.failures = self.failures.saturating_add(1);
            self.successes = 0;
            if self.failures >= def.failures_before_critical {
                self.status = result;
            }
        }
        self.status
    }
}

/// The watch topic of a service's instances and health (`svc:<lowercased name>`).
pub fn svc_topic(service: &str) -> String {
    format!("svc:{}", service.to_ascii_lowercase())
}

/// The watch topic of a node, its instances and its checks (`node:<lowercased name>`).
pub fn node_topic(node: &str) -> String {
    format!("node:{}", node.to_ascii_lowercase())
}

/// The most of a check's output that is kept, in bytes.
pub const MAX_CHECK_OUTPUT: usize = 4096;

/// Cut `output` to [`MAX_CHECK_OUTPUT`] bytes at a character boundary; returns whether it was cut.
pub fn truncate_output(output: &mut String) -> bool {
    if output.len() <= MAX_CHECK_OUTPUT {
        return false;
    }
    let mut end = MAX_CHECK_OUTPUT;
    while !output.is_char_boundary(end) {
        end -= 1;
    }
    output.truncate(end);
    true
}

/// The id of every node's liveness check (Consul's `serfHealth`).
pub const SERF_HEALTH: &str = "serfHealth";
/// The id of a node's maintenance check.
pub const NODE_MAINTENANCE: &str = "_node_maintenance";
/// The id prefix of a service's maintenance check.
pub const SERVICE_MAINTENANCE_PREFIX: &str = "_service_maintenance:";

/// The key of an instance in [`CatalogState::services`]: its node and id. Consul's service ids
/// are per node, so `s1` on `n1` and `s1` on `n2` are two instances. Sorts by node, then id.
pub fn instance_key(node: &str, id: &str) -> String {
    format!("{node}\u{1f}{id}")
}

/// The catalog's data: a value, cheap to clone.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct CatalogState {
    /// The index of the last change to anything in the catalog; only grows.
    pub index: u64,
    /// Nodes by name.
    pub nodes: OrdMap<String, Node>,
    /// Instances by service name, then [`instance_key`] (node and instance id: as in Consul,
    /// service ids are unique per node, not in the whole catalog).
    pub services: OrdMap<String, OrdMap<String, ServiceInstance>>,
    /// The datacenter this catalog belongs to.
    pub datacenter: String,
    /// Health checks by node, then check id.
    #[serde(default)]
    pub checks: OrdMap<String, OrdMap<String, Check>>,
    /// The index of the last change of each watchable topic (`services`, `nodes`, `checks`,
    /// `svc:<name>`, `node:<name>`, lowercased names), so that a blocking query wakes only for the
    /// data it reads. Entries outlive what they describe (a deletion is a change too).
    #[serde(default)]
    pub topics: OrdMap<String, u64>,
    /// `(instance id, service)` of the instances on each node: finding a node's instances (or
    /// one by id) costs what is on the node, not a walk of every service. Derived, so not
    /// stored: rebuilt by [`CatalogState::rebuild_index`] after loading.
    #[serde(skip)]
    on_node: OrdMap<String, OrdSet<(String, String)>>,
}

/// Read access to the catalog.
pub trait Catalog {
    /// The change index (only grows; blocking queries wait on it).
    fn index(&self) -> u64;
    /// All nodes, by name.
    fn nodes(&self) -> Vec<&Node>;
    /// One node.
    fn node(&self, name: &str) -> Option<&Node>;
    /// Service names with the union of their instances' tags.
    fn services(&self) -> BTreeMap<String, Vec<String>>;
    /// Instances of a service; with `passing_only`, only those whose health is passing. An optional
    /// tag filter keeps instances carrying that tag (case-insensitive).
    fn instances(&self, service: &str, tag: Option<&str>, passing_only: bool) -> Vec<&ServiceInstance>;
}

/// Equal when the content is (the derived per-node index follows from it).
impl PartialEq for CatalogState {
    fn eq(&self, other: &Self) -> bool {
        self.index == other.index
            && self.nodes == other.nodes
            && self.services == other.services
            && self.datacenter == other.datacenter
            && self.checks == other.checks
            && self.topics == other.topics
    }
}

impl CatalogState {
    /// An empty catalog for `datacenter`.
    pub fn new(datacenter: &str) -> Self {
        Self { datacenter: datacenter.to_owned(), ..Default::default() }
    }

    /// Add or replace a node; returns whether anything changed.
    pub fn upsert_node(&mut self, mut node: Node, index: u64) -> bool {
        if let Some(old) = self.nodes.get(&node.name) {
            if old.address == node.address
                && old.meta == node.meta
                && old.datacenter == node.datacenter
                && old.tagged_addresses == node.tagged_addresses
            {
                return false;
            }
            node.create_index = old.create_index;
        } else {
            node.create_index = index;
        }
        node.modify_index = index;
        self.touch("nodes", index);
        self.touch(&node_topic(&node.name), index);
        let services: Vec<String> = self.instances_on(&node.name).map(|i| i.service.clone()).collect();
        for svc in services {
            self.touch(&svc_topic(&svc), index);
        }
        self.nodes.insert(node.name.clone(), node);
        self.index = index;
        true
    }

    /// Record that `topic` changed at `index`.
    pub fn touch(&mut self, topic: &str, index: u64) {
        self.topics.insert(topic.to_owned(), index);
    }

    /// The index of the last change of `topic` (never 0).
    pub fn topic_index(&self, topic: &str) -> u64 {
        self.topics.get(topic).copied().unwrap_or(0).max(1)
    }

    /// Every instance on `node` (by instance id, then service).
    pub fn instances_on<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a ServiceInstance> + 'a {
        self.on_node
            .get(node)
            .into_iter()
            .flat_map(|set| set.iter())
            .filter_map(move |(id, svc)| self.services.get(svc)?.get(&instance_key(node, id)))
    }

    /// The instance with `id` on `node`.
    pub fn instance<'a>(&'a self, node: &'a str, id: &'a str) -> Option<&'a ServiceInstance> {
        self.instances_with_id(node, id).next()
    }

    /// The instances with `id` on `node` (one, unless services share an instance id), found
    /// through the per-node index in O(log n).
    pub fn instances_with_id<'a>(
        &'a self,
        node: &'a str,
        id: &'a str,
    ) -> impl Iterator<Item = &'a ServiceInstance> + 'a {
        let from = (id.to_owned(), String::new());
        self.on_node
            .get(node)
            .into_iter()
            .flat_map(move |set| set.range(from.clone()..))
            .take_while(move |(i, _)| i == id)
            .filter_map(move |(_, svc)| self.services.get(svc)?.get(&instance_key(node, id)))
    }

    /// The instance `id` of `service` on `node`.
    pub fn get_instance(&self, service: &str, node: &str, id: &str) -> Option<&ServiceInstance> {
        self.services.get(service)?.get(&instance_key(node, id))
    }

    /// Rebuild the derived per-node index (after the catalog was deserialized). Instances stored
    /// under another key (snapshots from before ids were per node were keyed by id alone) are
    /// re-keyed by [`instance_key`].
    pub fn rebuild_index(&mut self) {
        let mut on_node: OrdMap<String, OrdSet<(String, String)>> = OrdMap::new();
        let mut services = OrdMap::new();
        for (svc, m) in &self.services {
            let mut rekeyed = OrdMap::new();
            for inst in m.values() {
                on_node.entry(inst.node.clone()).or_default().insert((inst.id.clone(), svc.clone()));
                rekeyed.insert(instance_key(&inst.node, &inst.id), inst.clone());
            }
            services.insert(svc.clone(), rekeyed);
        }
        if services != self.services {
            self.services = services;
        }
        self.on_node = on_node;
    }

    fn index_add(&mut self, node: &str, id: &str, service: &str) {
        let mut set = self.on_node.get(node).cloned().unwrap_or_default();
        if set.insert((id.to_owned(), service.to_owned())).is_none() {
            self.on_node.insert(node.to_owned(), set);
        }
    }

    fn index_remove(&mut self, node: &str, id: &str, service: &str) {
        let Some(mut set) = self.on_node.get(node).cloned() else { return };
        if set.remove(&(id.to_owned(), service.to_owned())).is_some() {
            if set.is_empty() {
                self.on_node.remove(node);
            } else {
                self.on_node.insert(node.to_owned(), set);
            }
        }
    }

    /// The checks of `node`.
    pub fn node_checks(&self, node: &str) -> impl Iterator<Item = &Check> {
        self.checks.get(node).into_iter().flat_map(|m| m.values())
    }

    /// The health an instance has given its source, its own checks and its node's checks.
    fn aggregate(&self, inst: &ServiceInstance) -> Health {
        self.node_checks(&inst.node)
            .filter(|c| c.service_id.is_empty() || c.service_id == inst.id)
            .map(|c| c.status)
            .fold(inst.source_health, Ord::max)
    }

    /// Recompute the aggregated health of the instances on `node` (all, or only `service_id`).
    fn refresh(&mut self, node: &str, service_id: Option<&str>, index: u64) {
        let targets: Vec<(String, String)> = match service_id {
            Some(sid) => {
                self.instances_with_id(node, sid).map(|i| (i.service.clone(), instance_key(node, &i.id))).collect()
            }
            None => self.instances_on(node).map(|i| (i.service.clone(), instance_key(node, &i.id))).collect(),
        };
        for (svc, id) in targets {
            let Some(inst) = self.services.get(&svc).and_then(|m| m.get(&id)) else { continue };
            let h = self.aggregate(inst);
            if h != inst.health {
                let mut inst = inst.clone();
                inst.health = h;
                inst.modify_index = index;
                let mut m = self.services[&svc].clone();
                m.insert(id, inst);
                self.services.insert(svc.clone(), m);
                self.touch(&svc_topic(&svc), index);
                self.index = index;
            }
        }
    }

    /// Add or replace a check. A check re-registered with the same definition keeps its status,
    /// output and timers (unless `reset`), so a periodic re-sync does not flap it. Returns whether
    /// anything changed.
    pub fn upsert_check(&mut self, mut check: Check, index: u64, reset: bool) -> bool {
        let node_checks = self.checks.get(&check.node).cloned().unwrap_or_default();
        if let Some(old) = node_checks.get(&check.id) {
            if !reset && old.definition == check.definition {
                check.status = old.status;
                check.output = old.output.clone();
                check.ttl_deadline = old.ttl_deadline;
                check.critical_since = old.critical_since;
            }
            check.create_index = old.create_index;
            let mut cmp = check.clone();
            cmp.modify_index = old.modify_index;
            if &cmp == old {
                return false;
            }
        } else {
            check.create_index = index;
        }
        check.modify_index = index;
        let (node, service_id) = (check.node.clone(), check.service_id.clone());
        let mut node_checks = node_checks;
        node_checks.insert(check.id.clone(), check);
        self.checks.insert(node.clone(), node_checks);
        self.check_changed(&node, &service_id, index);
        true
    }

    /// Change a check's status and output (`at` starts its critical timer). Returns whether anything
    /// changed; `None` if there is no such check.
    pub fn set_check_status(
        &mut self,
        node: &str,
        id: &str,
        status: Health,
        output: &str,
        at: Millis,
        index: u64,
    ) -> Option<bool> {
        let mut check = self.checks.get(node)?.get(id)?.clone();
        if check.status == status && check.output == output {
            return Some(false);
        }
        if status == Health::Critical && check.status != Health::Critical {
            check.critical_since = Some(at);
        } else if status != Health::Critical {
            check.critical_since = None;
        }
        check.status = status;
        check.output = output.to_owned();
        check.modify_index = index;
        let service_id = check.service_id.clone();
        let mut m = self.checks[node].clone();
        m.insert(id.to_owned(), check);
        self.checks.insert(node.to_owned(), m);
        self.check_changed(node, &service_id, index);
        Some(true)
    }

    /// Set a TTL check's deadline (no index change on its own; used with a status update).
    pub fn set_ttl_deadline(&mut self, node: &str, id: &str, deadline: Option<Millis>) {
        if let Some(mut m) = self.checks.get(node).cloned()
            && let Some(c) = m.get_mut(id)
        {
            c.ttl_deadline = deadline;
            self.checks.insert(node.to_owned(), m);
        }
    }

    /// Remove a check; returns whether it existed.
    pub fn remove_check(&mut self, node: &str, id: &str, index: u64) -> bool {
        let Some(mut m) = self.checks.get(node).cloned() else { return false };
        let Some(old) = m.remove(id) else { return false };
        if m.is_empty() {
            self.checks.remove(node);
        } else {
            self.checks.insert(node.to_owned(), m);
        }
        self.check_changed(node, &old.service_id, index);
        true
    }

    fn check_changed(&mut self, node: &str, service_id: &str, index: u64) {
        self.touch("checks", index);
        self.touch(&node_topic(node), index);
        let services: Vec<String> = match self.instance(node, service_id) {
            Some(inst) => vec![svc_topic(&inst.service)],
            None if service_id.is_empty() => self.instances_on(node).map(|i| svc_topic(&i.service)).collect(),
            None => Vec::new(),
        };
        for topic in services {
            self.touch(&topic, index);
        }
        self.index = index;
        self.refresh(node, (!service_id.is_empty()).then_some(service_id), index);
    }

    /// Remove a node with its instances and checks; returns whether it existed.
    pub fn remove_node(&mut self, node: &str, index: u64) -> bool {
        if self.nodes.remove(node).is_none() {
            return false;
        }
        let ids: Vec<(String, String)> = self.instances_on(node).map(|i| (i.service.clone(), i.id.clone())).collect();
        for (svc, id) in ids {
            self.remove_instance(&svc, node, &id, index);
        }
        self.checks.remove(node);
        self.touch("nodes", index);
        self.touch("checks", index);
        self.touch(&node_topic(node), index);
        self.index = index;
        true
    }

    /// Add or replace an instance; returns whether anything changed.
    pub fn upsert_instance(&mut self, mut inst: ServiceInstance, index: u64) -> bool {
        inst.source_health = inst.health;
        inst.health = self.aggregate(&inst);
        let svc = self.services.get(&inst.service).cloned().unwrap_or_default();
        let key = instance_key(&inst.node, &inst.id);
        let mut tags_changed = true;
        if let Some(old) = svc.get(&key) {
            let mut cmp = inst.clone();
            cmp.create_index = old.create_index;
            cmp.modify_index = old.modify_index;
            if &cmp == old {
                return false;
            }
            tags_changed = old.tags != inst.tags;
            inst.create_index = old.create_index;
        } else {
            inst.create_index = index;
        }
        inst.modify_index = index;
        let mut svc = svc;
        svc.insert(key, inst.clone());
        self.index_add(&inst.node, &inst.id, &inst.service);
        if tags_changed {
            self.touch("services", index);
        }
        self.touch(&svc_topic(&inst.service), index);
        self.touch(&node_topic(&inst.node), index);
        self.services.insert(inst.service.clone(), svc);
        self.index = index;
        true
    }

    /// Remove an instance by service, node and id; returns whether it existed.
    pub fn remove_instance(&mut self, service: &str, node: &str, id: &str, index: u64) -> bool {
        let Some(mut svc) = self.services.get(service).cloned() else { return false };
        let Some(old) = svc.remove(&instance_key(node, id)) else {
            return false;
        };
        self.index_remove(&old.node, &old.id, &old.service);
        // Its checks go with it.
        if let Some(mut m) = self.checks.get(&old.node).cloned() {
            let gone: Vec<String> = m.values().filter(|c| c.service_id == id).map(|c| c.id.clone()).collect();
            for c in &gone {
                m.remove(c);
            }
            if !gone.is_empty() {
                self.touch("checks", index);
                if m.is_empty() {
                    self.checks.remove(&old.node);
                } else {
                    self.checks.insert(old.node.clone(), m);
                }
            }
        }
        self.touch("services", index);
        self.touch(&svc_topic(service), index);
        self.touch(&node_topic(&old.node), index);
        if svc.is_empty() {
            self.services.remove(service);
        } else {
            self.services.insert(service.to_owned(), svc);
        }
        self.index = index;
        true
    }
}

impl Catalog for CatalogState {
    fn index(&self) -> u64 {
        self.index.max(1)
    }
    fn nodes(&self) -> Vec<&Node> {
        self.nodes.values().collect()
    }
    fn node(&self, name: &str) -> Option<&Node> {
        self.nodes.get(name).or_else(|| self.nodes.values().find(|n| n.name.eq_ignore_ascii_case(name)))
    }
    fn services(&self) -> BTreeMap<String, Vec<String>> {
        self.services
            .iter()
            .map(|(name, insts)| {
                let mut tags: Vec<String> = insts.values().flat_map(|i| i.tags.iter().cloned()).collect();
                tags.sort();
                tags.dedup();
                (name.clone(), tags)
            })
            .collect()
    }
    fn instances(&self, service: &str, tag: Option<&str>, passing_only: bool) -> Vec<&ServiceInstance> {
        let svc = match self.services.get(service) {
            Some(s) => Some(s),
            None => self.services.iter().find(|(k, _)| k.eq_ignore_ascii_case(service)).map(|(_, v)| v),
        };
        let Some(svc) = svc else { return Vec::new() };
        svc.values()
            .filter(|i| !passing_only || i.health == Health::Passing)
            .filter(|i| tag.is_none_or(|t| i.tags.iter().any(|x| x.eq_ignore_ascii_case(t))))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inst(id: &str, svc: &str, tags: &[&str], health: Health) -> ServiceInstance {
        ServiceInstance {
            id: id.into(),
            service: svc.into(),
            node: "n1".into(),
            address: None,
            port: 31000,
            tags: tags.iter().map(|t| t.to_string()).collect(),
            meta: BTreeMap::new(),
            health,
            source_health: health,
            weights: Weights::default(),
            create_index: 0,
            modify_index: 0,
            extra: Default::default(),
        }
    }

    #[test]
    fn the_per_node_index_agrees_with_a_walk_of_every_service() {
        use rand::{Rng, SeedableRng};
        let walk_on = |c: &CatalogState, node: &str| -> Vec<(String, String)> {
            let mut v: Vec<(String, String)> = c
                .services
                .values()
                .flat_map(|m| m.values())
                .filter(|i| i.node == node)
                .map(|i| (i.id.clone(), i.service.clone()))
                .collect();
            v.sort();
            v
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut c = CatalogState::new("dc1");
        for index in 1..3_000u64 {
            let id = format!("i{}", rng.random_range(0..40));
            let svc = format!("s{}", rng.random_range(0..6));
            let node = format!("n{}", rng.random_range(0..4));
            match rng.random_range(0..4) {
                0 => {
                    c.remove_instance(&svc, &node, &id, index);
                }
                1 => {
                    c.remove_node(&node, index);
                }
                _ => {
                    // Instances move between nodes and services share ids, as registrations do.
                    let mut i = inst(&id, &svc, &[], Health::Passing);
                    i.node = node.clone();
                    c.upsert_instance(i, index);
                }
            }
            for n in ["n0", "n1", "n2", "n3"] {
                let mut got: Vec<(String, String)> =
                    c.instances_on(n).map(|i| (i.id.clone(), i.service.clone())).collect();
                got.sort();
                assert_eq!(got, walk_on(&c, n), "instances on {n} after change {index}");
                for (id, _) in walk_on(&c, n) {
                    assert!(c.instance(n, &id).is_some_and(|i| i.node == n && i.id == id));
                }
            }
        }
        // Not stored: rebuilt after loading.
        let mut loaded: CatalogState = serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
        loaded.rebuild_index();
        assert_eq!(loaded, c);
        for n in ["n0", "n1", "n2", "n3"] {
            assert_eq!(loaded.instances_on(n).count(), c.instances_on(n).count());
        }
    }

    #[test]
    fn thresholds_need_consecutive_results() {
        let def = CheckDefinition { success_before_passing: 2, failures_before_critical: 3, ..Default::default() };
        let mut c = CheckCounter::new(Health::Critical);
        assert_eq!(c.observe(Health::Passing, &def), Health::Critical);
        assert_eq!(c.observe(Health::Passing, &def), Health::Passing);
        assert_eq!(c.observe(Health::Critical, &def), Health::Passing);
        assert_eq!(c.observe(Health::Critical, &def), Health::Passing);
        assert_eq!(c.observe(Health::Passing, &def), Health::Passing, "a pass resets the failure count");
        for _ in 0..2 {
            assert_eq!(c.observe(Health::Warning, &def), Health::Passing);
        }
        assert_eq!(c.observe(Health::Warning, &def), Health::Warning);
        let now = CheckDefinition::default();
        let mut c = CheckCounter::new(Health::Critical);
        assert_eq!(c.observe(Health::Passing, &now), Health::Passing, "no threshold: at once");
        assert_eq!(c.observe(Health::Critical, &now), Health::Critical);
    }

    #[test]
    fn checks_aggregate_into_instance_health_and_touch_only_their_topics() {
        let mut c = CatalogState::new("dc1");
        c.upsert_instance(inst("a", "web", &[], Health::Passing), 1);
        c.upsert_instance(inst("b", "db", &[], Health::Passing), 2);
        let mut chk = Check::new("n1", "service:a", "web check", Health::Critical);
        chk.service_id = "a".into();
        assert!(c.upsert_check(chk.clone(), 3, false));
        assert_eq!(c.get_instance("web", "n1", "a").unwrap().health, Health::Critical);
        assert_eq!(c.get_instance("db", "n1", "b").unwrap().health, Health::Passing);
        assert_eq!(c.topic_index("svc:web"), 3);
        assert_eq!(c.topic_index("svc:db"), 2, "another service's watchers do not wake");
        assert_eq!(c.set_check_status("n1", "service:a", Health::Warning, "slow", 10, 4), Some(true));
        assert_eq!(c.get_instance("web", "n1", "a").unwrap().health, Health::Warning);
        // Re-registering the same definition keeps the status.
        assert!(!c.upsert_check(chk, 5, false));
        assert_eq!(c.checks["n1"]["service:a"].status, Health::Warning);
        // A node check takes every instance on the node with it.
        let serf = Check::new("n1", SERF_HEALTH, "Serf Health Status", Health::Critical);
        c.upsert_check(serf, 6, false);
        assert_eq!(c.get_instance("db", "n1", "b").unwrap().health, Health::Critical);
        assert_eq!(c.topic_index("svc:db"), 6);
        // Removing the instance removes its checks.
        assert!(c.remove_instance("web", "n1", "a", 7));
        assert!(!c.checks["n1"].contains_key("service:a"));
    }

    #[test]
    fn service_ids_are_per_node() {
        let mut c = CatalogState::new("dc1");
        let mut on_n2 = inst("s1", "web", &[], Health::Passing);
        on_n2.node = "n2".into();
        c.upsert_instance(inst("s1", "web", &[], Health::Passing), 1);
        assert!(c.upsert_instance(on_n2, 2));
        assert_eq!(c.instances("web", None, false).len(), 2, "s1 on n2 does not replace s1 on n1");
        assert!(c.instance("n1", "s1").is_some() && c.instance("n2", "s1").is_some());
        assert!(c.remove_instance("web", "n2", "s1", 3));
        assert_eq!(c.instance("n1", "s1").map(|i| i.node.as_str()), Some("n1"), "only n2's s1 went");
        // A snapshot keyed by id alone (before ids were per node) is re-keyed on load.
        let mut old = c.clone();
        let svc = old.services["web"].values().map(|i| (i.id.clone(), i.clone())).collect();
        old.services.insert("web".into(), svc);
        old.rebuild_index();
        assert_eq!(old, c);
        assert!(old.instance("n1", "s1").is_some());
    }

    #[test]
    fn index_only_grows_and_tracks_changes() {
        let mut c = CatalogState::new("dc1");
        assert_eq!(c.index(), 1, "never 0");
        assert!(c.upsert_instance(inst("a", "web", &["v1"], Health::Passing), 5));
        assert!(!c.upsert_instance(inst("a", "web", &["v1"], Health::Passing), 6), "no-op upsert");
        assert_eq!(c.index(), 5);
        assert!(c.upsert_instance(inst("a", "web", &["v2"], Health::Passing), 7));
        let a = &c.get_instance("web", "n1", "a").unwrap();
        assert_eq!((a.create_index, a.modify_index), (5, 7));
        assert!(c.remove_instance("web", "n1", "a", 8));
        assert!(!c.remove_instance("web", "n1", "a", 9));
        assert!(c.services.get("web").is_none());
        assert_eq!(c.index(), 8);
    }

    #[test]
    fn instance_queries_filter_by_tag_and_health() {
        let mut c = CatalogState::new("dc1");
        c.upsert_instance(inst("a", "web", &["http", "v1"], Health::Passing), 1);
        c.upsert_instance(inst("b", "web", &["http"], Health::Warning), 2);
        c.upsert_instance(inst("c", "web", &["v1"], Health::Critical), 3);
        assert_eq!(c.instances("web", None, false).len(), 3);
        assert_eq!(c.instances("WEB", None, true).len(), 1, "case-insensitive, passing only");
        assert_eq!(c.instances("web", Some("HTTP"), false).len(), 2);
        assert!(c.instances("db", None, false).is_empty());
        assert_eq!(c.services()["web"], vec!["http", "v1"]);
    }
}
