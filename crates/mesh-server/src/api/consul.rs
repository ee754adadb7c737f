//! The Consul v1 API: agent, catalog, health and status, with Consul's wire rules.
//!
//! - Request bodies are decoded case-insensitively, snake_case accepted ([`Ci`]): py-consul sends
//!   `{"name","id","check":{"http","interval"}}`, Registrator's Go client PascalCase.
//! - Responses use Consul's PascalCase; `?pretty` indents them.
//! - Every blocking endpoint sends `X-Consul-Index` (never 0), `X-Consul-KnownLeader` and
//!   `X-Consul-LastContact`, and honours `?index=&wait=` through [`block`]: the request waits on the
//!   topic of the data it reads (`svc:<name>`, `node:<name>`, `services`, `nodes`, `checks`), so a
//!   change to another service does not wake it.
//! - The agent is authoritative for its node: an agent registration is applied (durable, and
//!   visible to catalog, health and DNS readers) before the reply.
//! - An unknown `dc` is a 500 `No path to datacenter`.

use super::consul_filter::Filter;
use super::{Api, ApiError, flag};
use axum::Router;
use axum::body::Bytes as Body;
use axum::extract::{Path, RawQuery, State};
use axum::http::HeaderValue;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use mesh_core::catalog::{
    Catalog, CatalogState, Check, CheckDefinition, Health, NODE_MAINTENANCE, Node, SERVICE_MAINTENANCE_PREFIX,
    ServiceInstance, Weights, node_topic, svc_topic, truncate_output,
};
use mesh_core::registrator::parse_go_duration;
use mesh_core::state::{Command, SOURCE_META, State as ClusterState, TtlUpdate};
use serde_json::{Map, Value, json};
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

/// The Consul version whose API mesh follows (reported by `/v1/agent/self`).
pub const CONSUL_API_VERSION: &str = "1.22.0";
/// Longest blocking wait (Consul's cap).
const MAX_WAIT: Duration = Duration::from_secs(600);
/// Default blocking wait.
const DEFAULT_WAIT: Duration = Duration::from_secs(300);
/// Shortest interval of an agent-run check (Consul raises lower ones to this).
const MIN_CHECK_INTERVAL_MS: u64 = 1000;

/// Routes of the Consul API.
pub fn routes() -> Router<Api> {
    Router::new()
        .route("/v1/agent/self", get(agent_self))
        .route("/v1/agent/members", get(agent_members))
        .route("/v1/agent/services", get(agent_services))
        .route("/v1/agent/service/{id}", get(agent_service))
        .route("/v1/agent/service/register", put(agent_service_register))
        .route("/v1/agent/service/deregister/{id}", put(agent_service_deregister))
        .route("/v1/agent/service/maintenance/{id}", put(agent_service_maintenance))
        .route("/v1/agent/maintenance", put(agent_maintenance))
        .route("/v1/agent/checks", get(agent_checks))
        .route("/v1/agent/check/register", put(agent_check_register))
        .route("/v1/agent/check/deregister/{id}", put(agent_check_deregister))
        .route("/v1/agent/check/{verb}/{id}", put(check_ttl))
        .route("/v1/agent/check/update/{id}", put(check_update))
        .route("/v1/catalog/register", put(catalog_register))
        .route("/v1/catalog/deregister", put(catalog_deregister))
        .route("/v1/catalog/datacenters", get(datacenters))
        .route("/v1/catalog/nodes", get(catalog_nodes))
        .route("/v1/catalog/services", get(catalog_services))
        .route("/v1/catalog/service/{name}", get(catalog_service))
        .route("/v1/catalog/node/{node}", get(catalog_node))
        .route("/v1/catalog/node-services/{node}", get(catalog_node_services))
        .route("/v1/health/service/{name}", get(health_service))
        .route("/v1/health/checks/{service}", get(health_checks))
        .route("/v1/health/node/{node}", get(health_node))
        .route("/v1/health/state/{state}", get(health_state))
        .route("/v1/status/leader", get(leader))
        .route("/v1/status/peers", get(peers))
        .route("/v1/catalog/connect/{name}", get(no_connect))
        .route("/v1/catalog/gateway-services/{name}", get(no_connect))
        .route("/v1/health/connect/{name}", get(no_connect))
        .route("/v1/health/ingress/{name}", get(no_connect))
        .route("/v1/agent/metrics", get(agent_metrics))
        .route("/v1/agent/monitor", get(agent_monitor))
        .route("/v1/agent/leave", put(agent_leave))
        .route("/v1/agent/force-leave/{node}", put(agent_force_leave))
        .route("/v1/agent/reload", put(agent_reload))
        .route("/v1/agent/join/{addr}", put(agent_join))
        .route("/", get(root))
        .route("/ui", get(ui))
        .route("/ui/", get(ui))
}

/// The `?filter=` of a request; a malformed expression is a 400.
fn filter_param(q: &Params) -> Result<Option<Filter>, ApiError> {
    Filter::from_param(q.get("filter")).map_err(|e| bad(e.to_string()))
}

/// Keep the elements of a list that match the filter.
/// `list` filtered (`?filter=`) and sorted by distance (`?near=`) from the node each entry's
/// `node_of` names.
fn near_list(
    api: &Api,
    q: &Params,
    list: Vec<Value>,
    f: &Option<Filter>,
    node_of: impl Fn(&Value) -> Option<&str>,
) -> Value {
    let mut list = filter_list(list, f);
    super::consul_coordinate::sort_near(api, q, &mut list, node_of);
    Value::Array(list)
}

fn filter_list(list: Vec<Value>, f: &Option<Filter>) -> Vec<Value> {
    match f {
        None => list,
        Some(f) => list.into_iter().filter(|v| f.matches(v)).collect(),
    }
}

/// Keep the values of a map that match the filter.
fn filter_map(map: Map<String, Value>, f: &Option<Filter>) -> Map<String, Value> {
    match f {
        None => map,
        Some(f) => map.into_iter().filter(|(_, v)| f.matches(v)).collect(),
    }
}

/// Connect (service mesh) endpoints: mesh registers no Connect-capable services, proxies or
/// gateways, so these lists are empty (the parameters are still checked).
async fn no_connect(State(api): State<Api>, RawQuery(raw): RawQuery) -> Result<Response, ApiError> {
    let q = Params::parse(raw.as_deref());
    check_dc(&api, &q)?;
    filter_param(&q)?;
    let state = block(&api, &q, "services").await?;
    Ok(indexed(&json!([]), state.topic_index("services"), &q))
}

/// `?peer=NAME`: services imported from a cluster peer. mesh has no peerings, so such a peer
/// has no services (Consul answers an empty list for a peer it does not know, too).
fn has_peer(q: &Params) -> bool {
    q.get("peer").is_some_and(|p| !p.is_empty())
}

/// Whether an instance is the node's own `consul` service (registered by the node itself, not
/// through the agent API: not listed, not deregistrable by clients).
fn is_own_consul(api: &Api, i: &ServiceInstance) -> bool {
    i.node == api.info.node && i.id == "consul" && i.service == "consul"
}

// ---------------------------------------------------------------------------------------------
// Wire helpers

/// Query parameters, repeatable ones kept (`?tag=a&tag=b`), percent-decoded.
#[derive(Debug, Default)]
pub struct Params(Vec<(String, String)>);

impl Params {
    /// Parse a raw query string.
    pub fn parse(raw: Option<&str>) -> Self {
        let mut out = Vec::new();
        for pair in raw.unwrap_or_default().split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            out.push((decode(k), decode(v)));
        }
        Params(out)
    }

    /// The first value of `key`.
    pub fn get(&self, key: &str) -> Option<&String> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// Every value of `key`.
    pub fn all(&self, key: &str) -> Vec<&str> {
        self.0.iter().filter(|(k, _)| k == key).map(|(_, v)| v.as_str()).collect()
    }

    /// A boolean flag (present and empty means true).
    pub fn flag(&self, key: &str) -> bool {
        flag(self.get(key), false)
    }
}

/// Percent-decoding (`+` is a space, as in forms).
pub fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                match u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("zz"), 16) {
                    Ok(v) => {
                        out.push(v);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A JSON object read case-insensitively, `_` ignored: `Name`, `name`, `NAME` and `na_me` match.
#[derive(Clone, Copy)]
pub struct Ci<'a>(pub &'a Map<String, Value>);

fn norm(k: &str) -> String {
    k.chars().filter(|c| *c != '_' && *c != '-').flat_map(char::to_lowercase).collect()
}

impl<'a> Ci<'a> {
    /// The value of a field, by any spelling.
    pub fn get(&self, name: &str) -> Option<&'a Value> {
        let want = norm(name);
        self.0.iter().find(|(k, _)| norm(k) == want).map(|(_, v)| v).filter(|v| !v.is_null())
    }

    /// A string field; a wrong type is a 400.
    pub fn str(&self, name: &str) -> Result<Option<&'a str>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.as_str())),
            Some(_) => Err(bad(format!("Request decode failed: {name} must be a string"))),
        }
    }

    /// A non-negative integer field.
    pub fn u64(&self, name: &str) -> Result<Option<u64>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .or_else(|| v.as_f64().filter(|f| *f >= 0.0 && f.fract() == 0.0).map(|f| f as u64))
                .map(Some)
                .ok_or_else(|| bad(format!("Request decode failed: {name} must be a non-negative integer"))),
        }
    }

    /// A boolean field.
    pub fn bool(&self, name: &str) -> Result<bool, ApiError> {
        match self.get(name) {
            None => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(_) => Err(bad(format!("Request decode failed: {name} must be a boolean"))),
        }
    }

    /// A nested object.
    pub fn obj(&self, name: &str) -> Result<Option<Ci<'a>>, ApiError> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Object(m)) => Ok(Some(Ci(m))),
            Some(_) => Err(bad(format!("Request decode failed: {name} must be an object"))),
        }
    }

    /// A list of strings.
    pub fn strings(&self, name: &str) -> Result<Vec<String>, ApiError> {
        match self.get(name) {
            None => Ok(Vec::new()),
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| v.as_str().map(str::to_owned))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| bad(format!("Request decode failed: {name} must be a list of strings"))),
            Some(_) => Err(bad(format!("Request decode failed: {name} must be a list of strings"))),
        }
    }

    /// A string → string map.
    pub fn string_map(&self, name: &str) -> Result<BTreeMap<String, String>, ApiError> {
        match self.get(name) {
            None => Ok(BTreeMap::new()),
            Some(Value::Object(m)) => m
                .iter()
                .map(|(k, v)| v.as_str().map(|s| (k.clone(), s.to_owned())))
                .collect::<Option<_>>()
                .ok_or_else(|| bad(format!("Request decode failed: {name} values must be strings"))),
            Some(_) => Err(bad(format!("Request decode failed: {name} must be an object"))),
        }
    }

    /// A duration: a Go duration string (`"10s"`, `"1m30s"`) or nanoseconds.
    pub fn duration_ms(&self, name: &str) -> Result<u64, ApiError> {
        match self.get(name) {
            None => Ok(0),
            Some(Value::String(s)) if s.is_empty() => Ok(0),
            Some(Value::String(s)) => parse_go_duration(s)
                .map(|d| d.as_millis() as u64)
                .map_err(|e| bad(format!("Request decode failed: {name}: {e}"))),
            // Nanoseconds, as Go's time.Duration marshals (py-consul sends `interval=10` for
            // 10 ns); a part of a millisecond counts as one, so a tiny value is not read as
            // "none" (an interval is then raised to the minimum).
            Some(v) => v
                .as_u64()
                .map(|ns| ns.div_ceil(1_000_000))
                .ok_or_else(|| bad(format!("Request decode failed: {name} must be a duration"))),
        }
    }
}

fn bad(m: impl Into<String>) -> ApiError {
    ApiError::ConsulBadRequest(m.into())
}

/// Parse a JSON object body (an empty body is an empty object).
pub fn json_body(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Map::new());
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(bad("Request decode failed: expected a JSON object")),
        Err(e) => Err(bad(format!("Request decode failed: {e}"))),
    }
}

/// 500 `No path to datacenter` for a datacenter other than ours.
pub fn check_dc(api: &Api, q: &Params) -> Result<(), ApiError> {
    match q.get("dc") {
        Some(dc) if !dc.is_empty() && !dc.eq_ignore_ascii_case(&api.info.datacenter) => Err(ApiError::ConsulNoPathToDc),
        _ => Ok(()),
    }
}

/// A JSON reply (indented with `?pretty`).
pub fn reply(body: &Value, q: &Params) -> Response {
    let text = if q.get("pretty").is_some() {
        serde_json::to_string_pretty(body).unwrap_or_default()
    } else {
        serde_json::to_string(body).unwrap_or_default()
    };
    ([(axum::http::header::CONTENT_TYPE, "application/json")], text).into_response()
}

/// A JSON reply with the blocking-query headers.
pub fn indexed(body: &Value, index: u64, q: &Params) -> Response {
    let mut r = reply(body, q);
    add_index_headers(&mut r, index, q);
    r
}

/// `X-Consul-Index` (never 0), `X-Consul-KnownLeader`, `X-Consul-LastContact` and the effective
/// consistency mode.
pub fn add_index_headers(r: &mut Response, index: u64, q: &Params) {
    let h = r.headers_mut();
    h.insert("X-Consul-Index", HeaderValue::from(index.max(1)));
    h.insert("X-Consul-KnownLeader", HeaderValue::from_static("true"));
    h.insert("X-Consul-LastContact", HeaderValue::from_static("0"));
    let mode = if q.get("stale").is_some() {
        "stale"
    } else if q.get("consistent").is_some() {
        "consistent"
    } else {
        "leader"
    };
    h.insert("X-Consul-Effective-Consistency", HeaderValue::from_static(mode));
}

/// A Go-style duration query parameter (`wait=10s`).
pub fn wait_param(q: &Params) -> Result<Duration, ApiError> {
    match q.get("wait").filter(|w| !w.is_empty()) {
        None => Ok(DEFAULT_WAIT),
        Some(w) => {
            let d = parse_go_duration(w)
                .or_else(|_| w.parse::<u64>().map(Duration::from_secs).map_err(|e| e.to_string()))
                .map_err(|e| bad(format!("Invalid wait time: {e}")))?;
            Ok(d.min(MAX_WAIT))
        }
    }
}

/// A blocking query: with `?index=N`, wait until `topic`'s index exceeds N or the wait (default
/// 5 min, capped at 10, plus up to 1/16 random jitter) runs out. Returns the current state to read
/// the answer from.
pub async fn block(api: &Api, q: &Params, topic: &str) -> Result<std::sync::Arc<ClusterState>, ApiError> {
    block_until(api, q, topic, |s| s.topic_index(topic)).await
}

/// [`block`] with a finer condition than the topic's index: the hub wakes on `topic` (e.g. the
/// KV prefix `kv:foo`), and the wait goes on until `index_of` (e.g. the index of exactly the key
/// `foo`) exceeds N, so a change to `foo2` does not end it.
pub async fn block_until(
    api: &Api,
    q: &Params,
    topic: &str,
    index_of: impl Fn(&ClusterState) -> u64,
) -> Result<std::sync::Arc<ClusterState>, ApiError> {
    let published = &api.control.published;
    let min = match q.get("index").map(|v| v.trim()).filter(|v| !v.is_empty()) {
        None => 0,
        Some(v) => v.parse::<u64>().map_err(|_| bad(format!("Invalid index: {v:?}")))?,
    };
    if min == 0 {
        return Ok(published.state.load_full());
    }
    let wait = wait_param(q)?;
    let jitter = Duration::from_millis(rand::random_range(0..=(wait.as_millis() as u64 / 16).max(1)));
    let deadline = tokio::time::Instant::now() + wait + jitter;
    let current = || index_of(&published.state.load());
    if current() > min {
        return Ok(published.state.load_full());
    }
    let mut rx = published.watches.subscribe(topic, published.state.load().topic_index(topic));
    // A publish between the first read and the subscription would not have woken us.
    while current() <= min {
        tokio::select! {
            r = rx.changed() => if r.is_err() { break },
            _ = tokio::time::sleep_until(deadline) => break,
        }
    }
    Ok(published.state.load_full())
}

fn control_err(e: crate::control::ControlError) -> ApiError {
    use crate::control::ControlError;
    use mesh_core::state::ApplyError;
    match e {
        ControlError::Rejected(
            e @ (ApplyError::UnknownNode(_) | ApplyError::UnknownService(_) | ApplyError::UnknownCheck(_)),
        ) => ApiError::ConsulNotFound(e.to_string()),
        ControlError::Rejected(e) => ApiError::ConsulBadRequest(e.to_string()),
        e => ApiError::ConsulStatus(503, e.to_string()),
    }
}

async fn propose(api: &Api, cmd: Command) -> Result<(), ApiError> {
    api.control.propose(cmd).await.map_err(control_err)
}

// ---------------------------------------------------------------------------------------------
// JSON shapes

/// A node's `TaggedAddresses`: as registered; otherwise `lan` and `wan` are its address, with
/// the `_ipv4` (or `_ipv6`) variants for the address's family, as a Consul agent fills them in.
fn node_tagged_addresses(n: &Node) -> Value {
    if !n.tagged_addresses.is_empty() {
        return json!(n.tagged_addresses);
    }
    let addr = n.address.to_string();
    let fam = if n.address.is_ipv4() { "ipv4" } else { "ipv6" };
    json!({"lan": addr, format!("lan_{fam}"): addr, "wan": addr, format!("wan_{fam}"): addr})
}

fn node_json(n: &Node) -> Value {
    let addr = n.address.to_string();
    json!({
        "ID": "",
        "Node": n.name,
        "Address": addr,
        "Datacenter": n.datacenter,
        "TaggedAddresses": node_tagged_addresses(n),
        "Meta": n.meta,
        "CreateIndex": n.create_index,
        "ModifyIndex": n.modify_index,
    })
}

fn visible_meta(i: &ServiceInstance) -> BTreeMap<String, String> {
    let mut m = i.meta.clone();
    m.remove(SOURCE_META);
    m
}

/// A service's `TaggedAddresses`: as registered, plus, when the service has an address of its
/// own, `lan_ipv4`/`wan_ipv4` (or `_ipv6`) for it, as a Consul agent adds them. `None` when empty
/// (Consul then leaves the field out).
fn service_tagged_addresses(i: &ServiceInstance) -> Option<Value> {
    let mut m: Map<String, Value> = i
        .extra
        .tagged_addresses
        .iter()
        .map(|(k, t)| (k.clone(), json!({"Address": t.address, "Port": t.port})))
        .collect();
    if let Some(a) = i.address {
        let fam = if a.is_ipv4() { "ipv4" } else { "ipv6" };
        for k in [format!("lan_{fam}"), format!("wan_{fam}")] {
            m.entry(k).or_insert_with(|| json!({"Address": a.to_string(), "Port": i.port}));
        }
    }
    (!m.is_empty()).then_some(Value::Object(m))
}

fn service_json(i: &ServiceInstance, _node: Option<&Node>, dc: &str) -> Value {
    let addr = i.address.map(|a| a.to_string()).unwrap_or_default();
    let mut v = json!({
        "ID": i.id,
        "Service": i.service,
        "Tags": i.tags,
        "Address": addr,
        "Port": i.port,
        "Meta": visible_meta(i),
        "Weights": {"Passing": i.weights.passing, "Warning": i.weights.warning},
        "EnableTagOverride": i.extra.enable_tag_override,
        "Datacenter": dc,
        "CreateIndex": i.create_index,
        "ModifyIndex": i.modify_index,
    });
    if let Some(o) = v.as_object_mut() {
        if let Some(t) = service_tagged_addresses(i) {
            o.insert("TaggedAddresses".into(), t);
        }
        if !i.extra.kind.is_empty() {
            o.insert("Kind".into(), json!(i.extra.kind));
        }
        for (name, text) in [("Proxy", &i.extra.proxy_json), ("Locality", &i.extra.locality_json)] {
            if let Ok(v) = serde_json::from_str::<Value>(text) {
                o.insert(name.into(), v);
            }
        }
    }
    v
}

fn ms_str(ms: u64) -> String {
    if ms == 0 {
        String::new()
    } else if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

fn check_json(c: &Check, tags: &[String]) -> Value {
    let d = &c.definition;
    json!({
        "Node": c.node,
        "CheckID": c.id,
        "Name": c.name,
        "Status": c.status.as_str(),
        "Notes": c.notes,
        "Output": c.output,
        "ServiceID": c.service_id,
        "ServiceName": c.service_name,
        "ServiceTags": tags,
        "Type": c.kind(),
        "Interval": ms_str(d.interval_ms),
        "Timeout": ms_str(d.timeout_ms),
        "ExposedPort": 0,
        "Definition": {
            "HTTP": d.http, "Method": d.method, "Header": d.header, "TLSSkipVerify": d.tls_skip_verify,
            "TCP": d.tcp, "GRPC": d.grpc, "GRPCUseTLS": d.grpc_use_tls, "ScriptArgs": d.args, "DockerContainerID": d.docker_container_id, "TTL": ms_str(d.ttl_ms),
            "Interval": ms_str(d.interval_ms), "Timeout": ms_str(d.timeout_ms),
            "DeregisterCriticalServiceAfter": ms_str(d.deregister_critical_after_ms),
        },
        "CreateIndex": c.create_index,
        "ModifyIndex": c.modify_index,
    })
}

/// The checks shown for an instance: its own Consul checks, plus, for Marathon tasks, one check
/// carrying the Marathon health-check verdict.
fn instance_checks(cat: &CatalogState, i: &ServiceInstance) -> Vec<Value> {
    let mut out: Vec<Value> =
        cat.node_checks(&i.node).filter(|c| c.service_id == i.id).map(|c| check_json(c, &i.tags)).collect();
    if i.meta.contains_key("marathon-app-id") {
        let mut c = Check::new(&i.node, &format!("marathon:{}", i.id), "Marathon health checks", i.source_health);
        c.service_id = i.id.clone();
        c.service_name = i.service.clone();
        c.output = match i.source_health {
            Health::Passing => "task running; Marathon health checks pass".into(),
            _ => "Marathon health checks do not pass".into(),
        };
        c.create_index = i.create_index;
        c.modify_index = i.modify_index;
        let mut v = check_json(&c, &i.tags);
        v["Type"] = json!("marathon");
        out.push(v);
    }
    out
}

fn node_level_checks(cat: &CatalogState, node: &str) -> Vec<Value> {
    cat.node_checks(node).filter(|c| c.service_id.is_empty()).map(|c| check_json(c, &[])).collect()
}

/// Every check of a node: its node-level checks, then its instances' checks by instance id.
fn all_node_checks(cat: &CatalogState, node: &str) -> Vec<Value> {
    let mut list = node_level_checks(cat, node);
    let mut insts: Vec<&ServiceInstance> = cat.instances_on(node).collect();
    insts.sort_by(|a, b| a.id.cmp(&b.id));
    for i in insts {
        list.extend(instance_checks(cat, i));
    }
    list
}

fn tags_match(i: &ServiceInstance, tags: &[&str]) -> bool {
    tags.iter().all(|t| i.tags.iter().any(|x| x.eq_ignore_ascii_case(t)))
}

/// Instances of `name` carrying every tag in `tags`, ordered by node then id.
fn matching<'a>(cat: &'a CatalogState, name: &str, tags: &[&str]) -> Vec<&'a ServiceInstance> {
    let mut v: Vec<&ServiceInstance> =
        cat.instances(name, None, false).into_iter().filter(|i| tags_match(i, tags)).collect();
    v.sort_by(|a, b| (&a.node, &a.id).cmp(&(&b.node, &b.id)));
    v
}

// ---------------------------------------------------------------------------------------------
// Decoding registrations

/// A check definition from a request (agent `Check`/`Checks`/`check/register`, catalog `Check`).
fn parse_check(api: &Api, c: Ci<'_>, node: &str, agent_run: bool) -> Result<Check, ApiError> {
    let id = c.str("CheckID")?.or(c.str("ID")?).unwrap_or_default().to_owned();
    let name = c.str("Name")?.unwrap_or_default().to_owned();
    let status = match c.str("Status")? {
        None | Some("") => Health::Critical,
        Some(s) => Health::parse(s).ok_or_else(|| bad(format!("Invalid check status: \"{s}\"")))?,
    };
    let defn = c.obj("Definition")?;
    let src = defn.unwrap_or(c);
    let mut d = CheckDefinition {
        http: src.str("HTTP")?.unwrap_or_default().to_owned(),
        method: src.str("Method")?.unwrap_or_default().to_ascii_uppercase(),
        tls_skip_verify: src.bool("TLSSkipVerify")?,
        tcp: src.str("TCP")?.unwrap_or_default().to_owned(),
        grpc: src.str("GRPC")?.unwrap_or_default().to_owned(),
        grpc_use_tls: src.bool("GRPCUseTLS")?,
        args: src.strings("Args")?,
        docker_container_id: src.str("DockerContainerID")?.unwrap_or_default().to_owned(),
        ttl_ms: src.duration_ms("TTL")?,
        interval_ms: src.duration_ms("Interval")?,
        timeout_ms: src.duration_ms("Timeout")?,
        success_before_passing: src.u64("SuccessBeforePassing")?.unwrap_or(0).min(u32::MAX as u64) as u32,
        failures_before_critical: src.u64("FailuresBeforeCritical")?.unwrap_or(0).min(u32::MAX as u64) as u32,
        deregister_critical_after_ms: src.duration_ms("DeregisterCriticalServiceAfter")?,
        ..Default::default()
    };
    if d.args.is_empty() {
        d.args = src.strings("ScriptArgs")?;
    }
    if d.args.is_empty()
        && let Some(script) = src.str("Script")?.filter(|s| !s.is_empty())
    {
        d.args = vec!["/bin/sh".into(), "-c".into(), script.to_owned()];
    }
    if let Some(h) = src.obj("Header")? {
        for (k, v) in h.0 {
            let vals = match v {
                Value::Array(a) => a.iter().filter_map(|x| x.as_str().map(str::to_owned)).collect(),
                Value::String(s) => vec![s.clone()],
                _ => return Err(bad("Request decode failed: Header values must be lists of strings")),
            };
            d.header.insert(k.clone(), vals);
        }
    }
    for unsupported in ["DockerContainerID", "H2PING", "AliasService", "AliasNode", "OSService", "UDP"] {
        if src.str(unsupported).ok().flatten().is_some_and(|s| !s.is_empty()) {
            return Err(bad(format!("Invalid check: {unsupported} checks are not supported by mesh")));
        }
    }
    let kinds = [!d.http.is_empty(), !d.tcp.is_empty(), !d.grpc.is_empty(), !d.args.is_empty(), d.ttl_ms > 0];
    if kinds.iter().filter(|k| **k).count() > 1 {
        return Err(bad("Invalid check: only one of HTTP, TCP, GRPC, Args/Script and TTL may be set"));
    }
    if agent_run {
        if kinds.iter().all(|k| !k) {
            return Err(bad(
                "Invalid check: must provide TTL or HTTP/TCP/Args + Interval (unknown or missing check type)",
            ));
        }
        if d.is_active() && d.interval_ms == 0 {
            return Err(bad("Invalid check: Interval must be > 0 for Script, HTTP, TCP or GRPC checks"));
        }
        if d.is_active() {
            d.interval_ms = d.interval_ms.max(MIN_CHECK_INTERVAL_MS);
        }
        if !d.args.is_empty() && !api.info.enable_script_checks {
            return Err(bad("Scripts are disabled on this agent; to enable, start mesh with --enable-script-checks"));
        }
        if !(d.http.is_empty() || d.http.starts_with("http://") || d.http.starts_with("https://")) {
            return Err(bad(format!("Invalid check: HTTP must be an http:// or https:// URL, not {:?}", d.http)));
        }
    } else {
        // Catalog registrations only record data; nothing runs them, nothing reaps them.
        d = CheckDefinition {
            method: d.method,
            header: d.header,
            tls_skip_verify: d.tls_skip_verify,
            timeout_ms: d.timeout_ms,
            success_before_passing: d.success_before_passing,
            failures_before_critical: d.failures_before_critical,
            ..Default::default()
        };
    }
    let mut check = Check::new(node, &id, &name, status);
    check.notes = c.str("Notes")?.unwrap_or_default().to_owned();
    check.output = c.str("Output")?.unwrap_or_default().to_owned();
    check.service_id = c.str("ServiceID")?.unwrap_or_default().to_owned();
    check.definition = d;
    if check.definition.ttl_ms > 0 && agent_run {
        // A TTL check must be updated within its TTL from registration on.
        check.ttl_deadline = Some(api.control.now() + check.definition.ttl_ms);
    }
    Ok(check)
}

fn parse_addr(s: &str, what: &str) -> Result<Option<IpAddr>, ApiError> {
    if s.is_empty() {
        return Ok(None);
    }
    if s.eq_ignore_ascii_case("localhost") {
        return Ok(Some(IpAddr::from([127, 0, 0, 1])));
    }
    s.parse()
        .map(Some)
        .map_err(|_| bad(format!("Invalid {what} {s:?}: mesh needs an IP address (host names are not resolved)")))
}

/// A service definition (agent register, catalog `Service`).
fn parse_service(s: Ci<'_>, node: &str) -> Result<ServiceInstance, ApiError> {
    let name = s.str("Name")?.or(s.str("Service")?).unwrap_or_default().to_owned();
    if name.is_empty() {
        return Err(bad("Missing service name"));
    }
    let id = s.str("ID")?.filter(|i| !i.is_empty()).unwrap_or(&name).to_owned();
    let port = s.u64("Port")?.unwrap_or(0);
    if port > u16::MAX as u64 {
        return Err(bad(format!("Invalid service port {port}")));
    }
    let address = parse_addr(s.str("Address")?.unwrap_or_default(), "service address")?;
    let meta = s.string_map("Meta")?;
    if meta.len() > 64 {
        return Err(bad("Invalid service meta: at most 64 keys"));
    }
    if meta.contains_key(SOURCE_META) {
        return Err(bad(format!("Invalid service meta: {SOURCE_META} is reserved")));
    }
    let mut weights = Weights::default();
    if let Some(w) = s.obj("Weights")? {
        weights.passing = w.u64("Passing")?.unwrap_or(1).clamp(1, 65535) as u16;
        weights.warning = w.u64("Warning")?.unwrap_or(1).min(65535) as u16;
    }
    let mut extra = mesh_core::catalog::ConsulExtra {
        enable_tag_override: s.bool("EnableTagOverride")?,
        kind: s.str("Kind")?.unwrap_or_default().to_owned(),
        ..Default::default()
    };
    for (name, slot) in [("Proxy", &mut extra.proxy_json), ("Locality", &mut extra.locality_json)] {
        match s.get(name) {
            None => {}
            Some(v @ Value::Object(_)) => *slot = v.to_string(),
            Some(_) => return Err(bad(format!("Request decode failed: {name} must be an object"))),
        }
    }
    if let Some(t) = s.obj("TaggedAddresses")? {
        for (k, v) in t.0 {
            let Value::Object(m) = v else {
                return Err(bad(format!("Request decode failed: TaggedAddresses.{k} must be an object")));
            };
            let m = Ci(m);
            let port = m.u64("Port")?.unwrap_or(0);
            if port > u16::MAX as u64 {
                return Err(bad(format!("Invalid port {port} in TaggedAddresses.{k}")));
            }
            let address = m.str("Address")?.unwrap_or_default().to_owned();
            extra.tagged_addresses.insert(k.clone(), mesh_core::catalog::TaggedAddress { address, port: port as u16 });
        }
    }
    Ok(ServiceInstance {
        extra,
        id,
        service: name,
        node: node.to_owned(),
        address,
        port: port as u16,
        tags: s.strings("Tags")?,
        meta,
        health: Health::Passing,
        source_health: Health::Passing,
        weights,
        create_index: 0,
        modify_index: 0,
    })
}

/// The checks of a service registration, with Consul's generated ids and names.
fn service_checks(api: &Api, s: Ci<'_>, inst: &ServiceInstance, agent_run: bool) -> Result<Vec<Check>, ApiError> {
    let mut defs = Vec::new();
    if let Some(c) = s.obj("Check")? {
        defs.push(c);
    }
    match s.get("Checks") {
        None => {}
        Some(Value::Array(a)) => {
            for v in a {
                match v {
                    Value::Object(m) => defs.push(Ci(m)),
                    _ => return Err(bad("Request decode failed: Checks must be a list of objects")),
                }
            }
        }
        Some(_) => return Err(bad("Request decode failed: Checks must be a list of objects")),
    }
    let n = defs.len();
    let mut out = Vec::new();
    for (i, c) in defs.into_iter().enumerate() {
        let mut check = parse_check(api, c, &inst.node, agent_run)?;
        if check.id.is_empty() {
            check.id = if n == 1 { format!("service:{}", inst.id) } else { format!("service:{}:{}", inst.id, i + 1) };
        }
        if check.name.is_empty() {
            check.name = format!("Service '{}' check", inst.service);
        }
        check.service_id = inst.id.clone();
        check.service_name = inst.service.clone();
        out.push(check);
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Agent

async fn agent_self(State(api): State<Api>, RawQuery(raw): RawQuery) -> Result<Response, ApiError> {
    let q = Params::parse(raw.as_deref());
    let state = api.control.published.state.load();
    let node = state.catalog.nodes.get(&api.info.node);
    let addr = node.map(|n| n.address.to_string()).unwrap_or_default();
    let member = member_json(&api, &addr, false);
    Ok(reply(
        &json!({
            "Config": {
                "Datacenter": api.info.datacenter, "PrimaryDatacenter": api.info.datacenter,
                "NodeName": api.info.node, "NodeID": "", "Server": true,
                "Version": CONSUL_API_VERSION, "Revision": "mesh", "BuildDate": "",
            },
            "DebugConfig": {"DNSDomain": api.info.domain, "EnableScriptChecks": api.info.enable_script_checks},
            "Coord": {"Vec": [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], "Error": 1.5, "Adjustment": 0.0, "Height": 1e-5},
            "Member": member,
            "Stats": {
                "consul": {"leader": "true", "leader_addr": api.info.http_addr, "server": "true", "known_datacenters": known_datacenters(&api).len().to_string(), "bootstrap": "true"},
                "agent": {"checks": state.catalog.node_checks(&api.info.node).count().to_string(), "services": state.catalog.instances_on(&api.info.node).count().to_string()},
                "raft": {"state": "Leader"},
            },
            "Meta": {},
            "xDS": Value::Null,
        }),
        &q,
    ))
}

fn member_json(api: &Api, addr: &str, wan: bool) -> Value {
    let name = if wan { format!("{}.{}", api.info.node, api.info.datacenter) } else { api.info.node.clone() };
    json!({
        "Name": name, "Addr": addr, "Port": if wan { 8302 } else { 8301 },
        "Tags": {"dc": api.info.datacenter, "role": "consul", "port": "8300", "build": format!("{CONSUL_API_VERSION}:mesh"), "vsn": "2"},
        "Status": 1, "ProtocolMin": 1, "ProtocolMax": 5, "ProtocolCur": 2,
        "DelegateMin": 2, "DelegateMax": 5, "DelegateCur": 4,
    })
}

async fn agent_members(State(api): State<Api>, RawQuery(raw): RawQuery) -> Result<Response, ApiError> {
    let q = Params::parse(raw.as_deref());
    let state = api.control.published.state.load();
    let wan = q.flag("wan");
    let pool = api.cluster.as_ref().map(|c| if wan { c.wan_members().unwrap_or_default() } else { c.members() });
    let members: Vec<Value> = if let Some(mut ms) = pool {
        // A gossip pool as this node sees it (Serf's statuses: 1 alive, 3 left, 4 failed; a
        // suspect member is still alive to Serf). An agent is in no WAN pool: none, as a
        // Consul client answers.
        use crate::gossip::{MemberStatus, Role};
        ms.sort_by(|a, b| a.name.cmp(&b.name));
        ms.iter()
            .map(|m| {
                let mut v = member_json(&api, &m.addr.ip().to_string(), wan);
                v["Name"] = json!(m.name);
                v["Port"] = json!(m.addr.port());
                v["Status"] = json!(match m.status {
                    MemberStatus::Alive | MemberStatus::Suspect => 1,
                    MemberStatus::Left => 3,
                    MemberStatus::Failed => 4,
                });
                v["Tags"]["dc"] = json!(m.datacenter);
                v["Tags"]["id"] = json!(m.node_id);
                v["Tags"]["port"] = json!(m.rpc.port().to_string());
                v["Tags"]["role"] = json!(if m.role == Role::Server { "consul" } else { "node" });
                v
            })
            .collect()
    } else if wan {
        let addr = state.catalog.nodes.get(&api.info.node).map(|n| n.address.to_string()).unwrap_or_default();
        vec![member_json(&api, &addr, true)]
    } else {
        state
            .catalog
            .nodes
            .values()
            .filter(|n| state.agents.keys().any(|a| a.0 == n.name))
            .map(|n| {
                let mut m = member_json(&api, &n.address.to_string(), false);
                m["Name"] = json!(n.name);
                let alive = state
                    .catalog
                    .node_checks(&n.name)
                    .any(|c| c.id == mesh_core::catalog::SERF_HEALTH && c.status == Health::Passing);
                m["Status"] = json!(if alive { 1 } else { 4 });
                m
            })
            .collect()
    };
    Ok(reply(&Value::Array(members), &q))
}

fn agent_service_json(i: &ServiceInstance, dc: &str) -> Value {
    let mut v = service_json(i, None, dc);
    if let Some(o) = v.as_object_mut() {
        o.remove("CreateIndex");
        o.remove("ModifyIndex");
    }
    v
}

async fn agent_services(State(api): State<Api>, RawQuery(raw): RawQuery) -> Result<Response, ApiError> {
    let q = Params::parse(raw.as_deref());
    let filter = filter_param(&q)?;
    let state = api.control.published.state.load();
    let map: Map<String, Value> = state
        .catalog
        .instances_on(&api.info.node)
        .filter(|i| !is_own_consul(&api, i))
        .map(|i| (i.id.clone(), agent_service_json(i, &api.info.datacenter)))
        .collect();
    Ok(reply(&Value::Object(filter_map(map, &filter)), &q))
}

async fn agent_service(
    State(api): State<Api>,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let q = Params::parse(raw.as_deref());
    let state = api.control.published.state.load();
    match state.catalog.instance(&api.info.node, &id).filter(|i| !is_own_consul(&api, i)) {
        Some(i) => Ok(reply(&agent_service_json(i, &api.info.datacenter), &q)),
        None => Err(ApiError::ConsulNotFound(format!("unknown service ID: {id}"))),
    }
}

async fn agent_service_register(
    State(api): State<Api>,
    RawQuery(raw): RawQuery,
    body: Body,
) -> Result<Response, ApiError> {
    let q = Params::parse(raw.as_deref());
    let m = json_body(&body)?;
    let s = Ci(&m);
    let inst = parse_service(s, &api.info.node)?;
    let checks = service_checks(&api, s, &inst, true)?;
    let replace = q.flag("replace-existing-checks");
    propose(
        &api,
        Command::Register {
            node: api.info.node.clone(),
            node_info: None,
            instance: Some(inst),
            checks,
            replace_checks: replace,
        },
    )
    .await?;
    // Consul answers agent writes with 200 and an empty body.
    Ok(axum::http::StatusCode::OK.into_response())
}

async fn agent_service_deregister(
    State(api): State<Api>,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let q = Params::parse(raw.as_deref());
    check_dc(&api, &q)?;
    let state = api.control.published.state.load();
    if state.catalog.instance(&api.info.node, &id).is_none_or(|i| is_own_consul(&api, i)) {
        return Err(ApiError::ConsulNotFound(format!(
            "Unknown service ID {id:?}. Ensure that the service ID is passed, not the service name."
        )));
    }
    let cmd = Command::Deregister { node: api.info.node.clone(), service_id: Some(id), check_id: None };
    propose(&api, cmd).await?;
    Ok(axum::http::StatusCode::OK.into_response())
}

async fn agent_service_maintenance(
    State(api): State<Api>,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let q = Params::parse(raw.as_deref());
    let enable = match q.get("enable") {
        None => return Err(bad("Missing value for enable")),
        Some(v) => flag(Some(v), false),
    };
    let state = api.control.published.state.load();
    let Some(inst) = state.catalog.instance(&api.info.node, &id).cloned() else {
        return Err(ApiError::ConsulNotFound(format!("Unknown service ID \"{id}\"")));
    };
    let check_id = format!("{SERVICE_MAINTENANCE_PREFIX}{id}");
    maintenance(&api, &q, check_id, "Service Maintenance Mode", Some(&inst), enable).await
}

async fn agent_maintenance(State(api): State<Api>, RawQuery(raw): RawQuery) -> Result<Response, ApiError> {
    let q = Params::parse(raw.as_deref());
    let enable = match q.get("enable") {
        None => return Err(bad("Missing value for enable")),
        Some(v) => flag(Some(v), false),
    };
    maintenance(&api, &q, NODE_MAINTENANCE.into(), "Node Maintenance Mode", None, enable).await
}

async fn maintenance(
    api: &Api,
    q: &Params,
    check_id: String,
    name: &str,
    inst: Option<&ServiceInstance>,
    enable: bool,
) -> Result<Response, ApiError> {
    let node = api.info.node.clone();
    if enable {
        let mut c = Check::new(&node, &check_id, name, Health::Critical);
        c.notes = q.get("reason").cloned().filter(|r| !r.is_empty()).unwrap_or_else(|| {
            "Maintenance mode is enabled for this node or service. Applications may be unavailable.".into()
        });
        if let Some(i) = inst {
            c.service_id = i.id.clone();
            c.service_name = i.service.clone();
        }
        propose(
            api,
            Command::Register { node, node_info: None, instance: None, checks: vec![c], replace_checks: false },
        )
        .await?;
    } else {
        let exists = api.control.published.state.load().catalog.node_checks(&node).any(|c| c.id == check_id);
        if exists {
            propose(api, Command::Deregister { node, service_id: None, check_id: Some(check_id) }).await?;
        }
    }
    Ok(axum::http::StatusCode::OK.into_response())
}

async fn agent_checks(State(api): State<Api>, RawQuery(raw): RawQuery) -> Result<Response, ApiError> {
    let q = Params::parse(raw.as_deref());
    let filter = filter_param(&q)?;
    let state = api.control.published.state.load();
    let cat = &state.catalog;
    let mut map = Map::new();
    // serfHealth belongs to the cluster, not to the agent's registrations.
    for c in cat.node_checks(&api.info.node).filter(|c| c.id != mesh_core::catalog::SERF_HEALTH) {
        let tags = cat.instance(&c.node, &c.service_id).map(|i| i.tags.clone()).unwrap_or_default();
        map.insert(c.id.clone(), check_json(c, &tags));
    }
    for i in cat.instances_on(&api.info.node) {
        for v in instance_checks(cat, i) {
            if let Some(id) = v["CheckID"].as_str().filter(|id| id.starts_with("marathon:")) {
                map.insert(id.to_owned(), v.clone());
            }
        }
    }
    Ok(reply(&Value::Object(filter_map(map, &filter)), &q))
}

async fn agent_check_register(
    State(api): State<Api>,
    RawQuery(raw): RawQuery,
    body: Body,
) -> Result<Response, ApiError> {
    let q = Params::parse(raw.as_deref());
    let _ = &q;
    let m = json_body(&body)?;
    let mut check = parse_check(&api, Ci(&m), &api.info.node, true)?;
    if check.name.is_empty() {
        return Err(bad("Missing check name"));
    }
    if check.id.is_empty() {
        check.id = check.name.clone();
    }
    if !check.service_id.is_empty() {
        let state = api.control.published.state.load();
        match state.catalog.instance(&api.info.node, &check.service_id) {
            Some(i) => check.service_name = i.service.clone(),
            None => {
                return Err(ApiError::ConsulNotFound(format!("ServiceID \"{}\" does not exist", check.service_id)));
            }
        }
    }
    let node = api.info.node.clone();
    propose(
        &api,
        Command::Register { node, node_info: None, instance: None, checks: vec![check], replace_checks: false },
    )
    .await?;
    Ok(axum::http::StatusCode::OK.into_response())
}

async fn agent_check_deregister(State(api): State<Api>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let cmd = Command::Deregister { node: api.info.node.clone(), service_id: None, check_id: Some(id) };
    propose(&api, cmd).await?;
    Ok(axum::http::StatusCode::OK.into_response())
}

async fn ttl_update(api: &Api, id: String, status: Health, output: String) -> Result<Response, ApiError> {
    let state = api.control.published.state.load();
    let Some(check) = state.catalog.node_checks(&api.info.node).find(|c| c.id == id) else {
        return Err(ApiError::ConsulNotFound(format!("Unknown check ID \"{id}\"")));
    };
    if check.definition.ttl_ms == 0 {
        return Err(ApiError::ConsulStatus(500, format!("CheckID \"{id}\" does not have associated TTL")));
    }
    let mut output = output;
    truncate_output(&mut output);
    let cmd = Command::UpdateCheck {
        node: api.info.node.clone(),
        id,
        status,
        output,
        now: api.control.now(),
        ttl: TtlUpdate::Renew,
    };
    propose(api, cmd).await?;
    Ok(axum::http::StatusCode::OK.into_response())
}

/// `PUT /v1/agent/check/{pass,warn,fail}/:id?note=`.
async fn check_ttl(
    State(api): State<Api>,
    Path((verb, id)): Path<(String, String)>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let q = Params::parse(raw.as_deref());
    let status = match verb.as_str() {
        "pass" => Health::Passing,
        "warn" => Health::Warning,
        "fail" => Health::Critical,
        _ => return Err(ApiError::ConsulNotFound(format!("no such endpoint: /v1/agent/check/{verb}"))),
    };
    ttl_update(&api, id, status, q.get("note").cloned().unwrap_or_default()).await
}

async fn check_update(State(api): State<Api>, Path(id): Path<String>, body: Body) -> Result<Response, ApiError> {
    let m = json_body(&body)?;
    let c = Ci(&m);
    let status = match c.str("Status")? {
        Some(s) => Health::parse(s).ok_or_else(|| bad(format!("Invalid check status: \"{s}\"")))?,
        None => return Err(bad("Missing Status")),
    };
    ttl_update(&api, id, status, c.str("Output")?.unwrap_or_default().to_owned()).await
}

// ---------------------------------------------------------------------------------------------
// Catalog

async fn catalog_register(State(api): State<Api>, RawQuery(raw): RawQuery, body: Body) -> Result<Response, ApiError> {
    let q = Params::parse(raw.as_deref());
    check_dc(&api, &q)?;
    let m = json_body(&body)?;
    let b = Ci(&m);
    if let Some(dc) = b.str("Datacenter")?.filter(|d| !d.is_empty() && !d.eq_ignore_ascii_case(&api.info.datacenter)) {
        let _ = dc;
        return Err(ApiError::ConsulNoPathToDc);
    }
    let node = b.str("Node")?.unwrap_or_default().to_owned();
    if node.is_empty() {
        return Err(bad("Must supply node"));
    }
    let state = api.control.published.state.load();
    let exists = state.catalog.nodes.contains_key(&node);
    let skip = b.bool("SkipNodeUpdate")? && exists;
    let address = b.str("Address")?.unwrap_or_default();
    let node_info = if skip {
        None
    } else {
        let Some(address) = parse_addr(address, "node address")? else {
            return Err(bad("Must supply address"));
        };
        Some(Node {
            name: node.clone(),
            address,
            datacenter: api.info.datacenter.clone(),
            meta: b.string_map("NodeMeta")?,
            tagged_addresses: b.string_map("TaggedAddresses")?,
            create_index: 0,
            modify_index: 0,
        })
    };
    let instance = match b.obj("Service")? {
        Some(s) => Some(parse_service(s, &node)?),
        None => None,
    };
    let mut checks = Vec::new();
    let mut defs = Vec::new();
    if let Some(c) = b.obj("Check")? {
        defs.push(c);
    }
    if let Some(Value::Array(a)) = b.get("Checks") {
        for v in a {
            match v {
                Value::Object(m) => defs.push(Ci(m)),
                _ => return Err(bad("Request decode failed: Checks must be a list of objects")),
            }
        }
    }
    for c in defs {
        let mut check = parse_check(&api, c, &node, false)?;
        if check.id.is_empty() {
            check.id = check.name.clone();
        }
        if check.id.is_empty() {
            return Err(bad("Missing check ID"));
        }
        if check.name.is_empty() {
            check.name = check.id.clone();
        }
        checks.push(check);
    }
    propose(&api, Command::Register { node, node_info, instance, checks, replace_checks: false }).await?;
    Ok(reply(&json!(true), &q))
}

async fn catalog_deregister(State(api): State<Api>, RawQuery(raw): RawQuery, body: Body) -> Result<Response, ApiError> {
    let q = Params::parse(raw.as_deref());
    check_dc(&api, &q)?;
    let m = json_body(&body)?;
    let b = Ci(&m);
    if b.str("Datacenter")?.is_some_and(|d| !d.is_empty() && !d.eq_ignore_ascii_case(&api.info.datacenter)) {
        return Err(ApiError::ConsulNoPathToDc);
    }
    let node = b.str("Node")?.unwrap_or_default().to_owned();
    if node.is_empty() {
        return Err(bad("Must supply node"));
    }
    let service_id = b.str("ServiceID")?.filter(|s| !s.is_empty()).map(str::to_owned);
    let check_id = b.str("CheckID")?.filter(|s| !s.is_empty()).map(str::to_owned);
    // The node's own `consul` service is the server's, as Consul's leader keeps registering it.
    if node == api.info.node && service_id.as_deref() == Some("consul") && check_id.is_none() {
        return Err(bad("The consul service of this node is registered by the node itself and cannot be deregistered"));
    }
    match api.control.propose(Command::Deregister { node, service_id, check_id }).await {
        Ok(()) => {}
        // Deregistering what is not there is not an error (idempotent, as Consul).
        Err(crate::control::ControlError::Rejected(
            mesh_core::state::ApplyError::UnknownNode(_)
            | mesh_core::state::ApplyError::UnknownService(_)
            | mesh_core::state::ApplyError::UnknownCheck(_),
        )) => {}
        Err(e) => return Err(control_err(e)),
    }
    Ok(reply(&json!(true), &q))
}

/// Every datacenter the WAN pool knows (a datacenter whose servers all left is gone), this
/// one first, then by name.
async fn datacenters(State(api): State<Api>, RawQuery(raw): RawQuery) -> Response {
    let q = Params::parse(raw.as_deref());
    reply(&json!(known_datacenters(&api)), &q)
}

/// The datacenters a server knows through the WAN pool, nearest first: its own, then by the
/// median estimated round trip to their servers ([`datacenter_distances`]), those with no
/// estimate yet last by name.
pub fn known_datacenters(api: &Api) -> Vec<String> {
    datacenter_distances(api).into_iter().map(|(dc, _)| dc).collect()
}

/// Each datacenter this server knows (through the WAN pool, servers not left) with the median
/// estimated round trip in seconds from this server to its servers, by WAN network coordinates:
/// its own first with `Some(0.0)`, then nearest first, those with no coordinate yet (`None`)
/// last by name. On a node outside the WAN pool (an agent): its own datacenter only.
pub fn datacenter_distances(api: &Api) -> Vec<(String, Option<f64>)> {
    let me = api.coordinates.own(true).0;
    let mut others: Vec<(String, Option<f64>)> = super::consul_coordinate::wan_servers(api)
        .into_iter()
        .filter(|(dc, _)| *dc != api.info.datacenter)
        .map(|(dc, servers)| {
            let mut d: Vec<f64> = servers.iter().filter_map(|(_, c)| me.distance_to(c.as_ref()?)).collect();
            (dc, mesh_core::coordinate::median(&mut d))
        })
        .collect();
    others.sort_by(|a, b| match (a.1, b.1) {
        (Some(x), Some(y)) => x.total_cmp(&y).then_with(|| a.0.cmp(&b.0)),
        (Some(_), None) => std::cmp::Ordering::Less,
        (None, Some(_)) => std::cmp::Ordering::Greater,
        (None, None) => a.0.cmp(&b.0),
    });
    std::iter::once((api.info.datacenter.clone(), Some(0.0))).chain(others).collect()
}

async fn catalog_nodes(State(api): State<Api>, RawQuery(raw): RawQuery) -> Result<Response, ApiError> {
    let q = Params::parse(raw.as_deref());
    check_dc(&api, &q)?;
    let filter = filter_param(&q)?;
    let state = block(&api, &q, "nodes").await?;
    let list: Vec<Value> = state.catalog.nodes().into_iter().map(node_json).collect();
    let body = near_list(&api, &q, list, &filter, |v| v["Node"].as_str());
    Ok(indexed(&body, state.topic_index("nodes"), &q))
}

async fn catalog_services(State(api): State<Api>, RawQuery(raw): RawQuery) -> Result<Response, ApiError> {
    let q = Params::parse(raw.as_deref());
    check_dc(&api, &q)?;
    let filter = filter_param(&q)?;
    let state = block(&api, &q, "services").await?;
    let body = match &filter {
        None => serde_json::to_value(state.catalog.services()).unwrap_or(Value::Null),
        // As Consul: the filter applies to each instance (a catalog/service entry); a service
        // is listed with the tags of its matching instances.
        Some(f) => {
            let cat = &state.catalog;
            let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
            for (name, insts) in &cat.services {
                for i in insts.values() {
                    if f.matches(&catalog_service_entry(cat, i)) {
                        let tags = out.entry(name.clone()).or_default();
                        tags.extend(i.tags.iter().cloned());
                        tags.sort();
                        tags.dedup();
                    }
                }
            }
            serde_json::to_value(out).unwrap_or(Value::Null)
        }
    };
    Ok(indexed(&body, state.topic_index("services"), &q))
}

async fn catalog_service(
    State(api): State<Api>,
    Path(name): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let q = Params::parse(raw.as_deref());
    check_dc(&api, &q)?;
    let filter = filter_param(&q)?;
    let topic = svc_topic(&name);
    let state = block(&api, &q, &topic).await?;
    let cat = &state.catalog;
    let list: Vec<Value> = if has_peer(&q) {
        Vec::new()
    } else {
        matching(cat, &name, &q.all("tag")).into_iter().map(|i| catalog_service_entry(cat, i)).collect()
    };
    let body = near_list(&api, &q, list, &filter, |v| v["Node"].as_str());
    Ok(indexed(&body, state.topic_index(&topic), &q))
}

/// One entry of `/v1/catalog/service/:name` (Consul's `ServiceNode`).
fn catalog_service_entry(cat: &CatalogState, i: &ServiceInstance) -> Value {
    let node = cat.node(&i.node);
    let addr = node.map(|n| n.address.to_string()).unwrap_or_default();
    let svc = service_json(i, node, &cat.datacenter);
    json!({
        "ID": "",
        "Node": i.node,
        "Address": addr,
        "Datacenter": cat.datacenter,
        "TaggedAddresses": node.map(node_tagged_addresses).unwrap_or(Value::Null),
        "NodeMeta": node.map(|n| n.meta.clone()).unwrap_or_default(),
        "ServiceKind": i.extra.kind,
        "ServiceID": i.id,
        "ServiceName": i.service,
        "ServiceTags": i.tags,
        "ServiceAddress": svc["Address"],
        "ServicePort": i.port,
        "ServiceMeta": svc["Meta"],
        "ServiceTaggedAddresses": svc.get("TaggedAddresses").cloned().unwrap_or(Value::Null),
        "ServiceWeights": svc["Weights"],
        "ServiceEnableTagOverride": i.extra.enable_tag_override,
        "CreateIndex": i.create_index,
        "ModifyIndex": i.modify_index,
    })
}

async fn catalog_node(
    State(api): State<Api>,
    Path(name): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let q = Params::parse(raw.as_deref());
    check_dc(&api, &q)?;
    let filter = filter_param(&q)?;
    let topic = node_topic(&name);
    let state = block(&api, &q, &topic).await?;
    let cat = &state.catalog;
    let body = match cat.node(&name) {
        None => Value::Null,
        Some(n) => {
            let services: Map<String, Value> =
                cat.instances_on(&n.name).map(|i| (i.id.clone(), service_json(i, Some(n), &cat.datacenter))).collect();
            json!({"Node": node_json(n), "Services": filter_map(services, &filter)})
        }
    };
    Ok(indexed(&body, state.topic_index(&topic), &q))
}

/// `GET /v1/catalog/node-services/:node`: the node and its services as a list (`null` for an
/// unknown node).
async fn catalog_node_services(
    State(api): State<Api>,
    Path(name): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let q = Params::parse(raw.as_deref());
    check_dc(&api, &q)?;
    let filter = filter_param(&q)?;
    let topic = node_topic(&name);
    let state = block(&api, &q, &topic).await?;
    let cat = &state.catalog;
    let body = match cat.node(&name) {
        None => Value::Null,
        Some(n) => {
            let mut insts: Vec<&ServiceInstance> = cat.instances_on(&n.name).collect();
            insts.sort_by(|a, b| a.id.cmp(&b.id));
            let services: Vec<Value> = insts.into_iter().map(|i| service_json(i, Some(n), &cat.datacenter)).collect();
            json!({"Node": node_json(n), "Services": filter_list(services, &filter)})
        }
    };
    Ok(indexed(&body, state.topic_index(&topic), &q))
}

// ---------------------------------------------------------------------------------------------
// Health

async fn health_service(
    State(api): State<Api>,
    Path(name): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let q = Params::parse(raw.as_deref());
    check_dc(&api, &q)?;
    let topic = svc_topic(&name);
    let state = block(&api, &q, &topic).await?;
    let cat = &state.catalog;
    let passing = q.flag("passing");
    let filter = filter_param(&q)?;
    let list: Vec<Value> = matching(cat, &name, &q.all("tag"))
        .into_iter()
        .filter(|_| !has_peer(&q))
        .filter(|i| !passing || i.health == Health::Passing)
        .map(|i| health_entry(cat, i))
        .collect();
    let body = near_list(&api, &q, list, &filter, |v| v["Node"]["Node"].as_str());
    Ok(indexed(&body, state.topic_index(&topic), &q))
}

/// An instance as `/v1/health/service` shows it: its node, itself and every check on either.
pub(crate) fn health_entry(cat: &CatalogState, i: &ServiceInstance) -> Value {
    let node = cat.node(&i.node);
    let mut checks = node_level_checks(cat, &i.node);
    checks.extend(instance_checks(cat, i));
    json!({
        "Node": node.map(node_json).unwrap_or(Value::Null),
        "Service": service_json(i, node, &cat.datacenter),
        "Checks": checks,
    })
}

async fn health_checks(
    State(api): State<Api>,
    Path(name): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let q = Params::parse(raw.as_deref());
    check_dc(&api, &q)?;
    let topic = svc_topic(&name);
    let state = block(&api, &q, &topic).await?;
    let cat = &state.catalog;
    let filter = filter_param(&q)?;
    let list: Vec<Value> = matching(cat, &name, &[]).into_iter().flat_map(|i| instance_checks(cat, i)).collect();
    let body = near_list(&api, &q, list, &filter, |v| v["Node"].as_str());
    Ok(indexed(&body, state.topic_index(&topic), &q))
}

async fn health_node(
    State(api): State<Api>,
    Path(name): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let q = Params::parse(raw.as_deref());
    check_dc(&api, &q)?;
    let topic = node_topic(&name);
    let state = block(&api, &q, &topic).await?;
    let cat = &state.catalog;
    let filter = filter_param(&q)?;
    let node = cat.node(&name).map(|n| n.name.clone()).unwrap_or(name);
    let list = all_node_checks(cat, &node);
    Ok(indexed(&Value::Array(filter_list(list, &filter)), state.topic_index(&topic), &q))
}

async fn health_state(
    State(api): State<Api>,
    Path(wanted): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let q = Params::parse(raw.as_deref());
    check_dc(&api, &q)?;
    let filter = match wanted.as_str() {
        "any" => None,
        s => Some(Health::parse(s).ok_or_else(|| bad(format!("Invalid state: \"{s}\"")))?),
    };
    let expr = filter_param(&q)?;
    let state = block(&api, &q, "checks").await?;
    let cat = &state.catalog;
    let mut list: Vec<Value> = cat.nodes.keys().flat_map(|n| all_node_checks(cat, n)).collect();
    if let Some(f) = filter {
        list.retain(|c| c["Status"] == f.as_str());
    }
    let body = near_list(&api, &q, list, &expr, |v| v["Node"].as_str());
    Ok(indexed(&body, state.topic_index("checks"), &q))
}

// ---------------------------------------------------------------------------------------------
// Membership: through the cluster layer when there is one (`Api::cluster`); `mesh dev` is one
// node with no cluster, and answers as a Consul agent that cannot reach anyone would.

fn cluster_err(e: super::ClusterOpError) -> ApiError {
    ApiError::ConsulStatus(500, e.to_string())
}

/// `PUT /v1/agent/join/:addr` (`?wan` is not supported: one datacenter).
async fn agent_join(State(api): State<Api>, Path(addr): Path<String>) -> Result<Response, ApiError> {
    match &api.cluster {
        Some(c) => c.join(&addr).await.map_err(cluster_err)?,
        None => {
            return Err(ApiError::ConsulStatus(
                500,
                format!(
                    "1 error occurred:\n\t* Failed to join {addr}: this mesh node runs without a cluster (mesh dev)\n\n"
                ),
            ));
        }
    }
    Ok(axum::http::StatusCode::OK.into_response())
}

/// `PUT /v1/agent/leave`. Without a cluster (`mesh dev`) the node's serfHealth turns critical,
/// as other members would see a node that left; the process keeps running.
async fn agent_leave(State(api): State<Api>) -> Result<Response, ApiError> {
    match &api.cluster {
        Some(c) => c.leave().await.map_err(cluster_err)?,
        None => {
            let cmd = Command::UpdateCheck {
                node: api.info.node.clone(),
                id: mesh_core::catalog::SERF_HEALTH.into(),
                status: Health::Critical,
                output: "Agent left the cluster (PUT /v1/agent/leave)".into(),
                now: api.control.now(),
                ttl: TtlUpdate::Keep,
            };
            match api.control.propose(cmd).await {
                // A node without a serfHealth check has nothing to mark.
                Ok(()) | Err(crate::control::ControlError::Rejected(mesh_core::state::ApplyError::UnknownCheck(_))) => {
                }
                Err(e) => return Err(control_err(e)),
            }
        }
    }
    Ok(axum::http::StatusCode::OK.into_response())
}

/// `PUT /v1/agent/force-leave/:node[?prune]`.
async fn agent_force_leave(
    State(api): State<Api>,
    Path(node): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let q = Params::parse(raw.as_deref());
    match &api.cluster {
        Some(c) => c.force_leave(&node, q.flag("prune")).await.map_err(cluster_err)?,
        // The only member is this node, which is alive: force-leave of it is a no-op, as for
        // any alive member in Consul; every other name is unknown.
        None if node == api.info.node => {}
        None => return Err(cluster_err(super::ClusterOpError::UnknownNode(node))),
    }
    Ok(axum::http::StatusCode::OK.into_response())
}

/// `GET /v1/agent/metrics`: the go-metrics JSON shape with a few gauges of this node's catalog and
/// KV store (mesh has no telemetry sink). `?format=prometheus` answers 200 with an empty body,
/// as Consul does when Prometheus retention is not configured.
/// Cross-datacenter requests this node sent (`?dc=`, DNS names of other datacenters, prepared
/// query failover), in go-metrics' counter shape: `consul.rpc.cross-dc` answered, and the two
/// failures kept apart (`mesh.dc.no_path`: unknown datacenter, `mesh.dc.unreachable`: no server
/// of it answered). Totals since the node started.
fn dc_counters() -> Value {
    use std::sync::atomic::Ordering::Relaxed;
    let m = &crate::cluster::forward::DC_METRICS;
    let counter = |name: &str, n: u64| {
        let v = n as f64;
        json!({"Name": name, "Count": n, "Rate": v / 10.0, "Sum": v, "Min": 1.0, "Max": 1.0, "Mean": 1.0, "Stddev": 0.0, "Labels": {}})
    };
    json!([
        counter("consul.rpc.cross-dc", m.forwarded.load(Relaxed)),
        counter("mesh.dc.no_path", m.no_path.load(Relaxed)),
        counter("mesh.dc.unreachable", m.unreachable.load(Relaxed)),
    ])
}

async fn agent_metrics(State(api): State<Api>, RawQuery(raw): RawQuery) -> Response {
    let q = Params::parse(raw.as_deref());
    if q.get("format").is_some_and(|f| f == "prometheus") {
        let mut r = axum::http::StatusCode::OK.into_response();
        r.headers_mut().insert(
            "X-Consul-Reason",
            HeaderValue::from_static("Prometheus is not enabled since its retention time is not positive"),
        );
        return r;
    }
    let state = api.control.published.state.load();
    let cat = &state.catalog;
    let gauge = |name: &str, value: usize| json!({"Name": name, "Value": value as f64, "Labels": {}});
    let now = chrono::Utc::now();
    // go-metrics reports the start of the current 10 s interval.
    let start = now.timestamp() - now.timestamp() % 10;
    let ts = chrono::DateTime::from_timestamp(start, 0).unwrap_or(now).format("%Y-%m-%d %H:%M:%S %z").to_string();
    reply(
        &json!({
            "Timestamp": ts,
            "Gauges": [
                gauge("consul.catalog.services", cat.services.len()),
                gauge("consul.catalog.nodes", cat.nodes.len()),
                gauge("consul.kv.entries", state.kv.entries.len()),
                gauge("consul.session_ttl.active", state.kv.sessions.len()),
            ],
            "Points": [],
            "Counters": dc_counters(),
            "Samples": [],
        }),
        &q,
    )
}

/// `GET /v1/agent/monitor?loglevel=`: this process's log lines at that level or above, streamed
/// as they are written (plain text, colour codes removed). Lines below the process's own log
/// filter (`RUST_LOG`, default info) are never written, so never streamed.
async fn agent_monitor(RawQuery(raw): RawQuery) -> Result<Response, ApiError> {
    let q = Params::parse(raw.as_deref());
    let level = q.get("loglevel").map(String::as_str).filter(|l| !l.is_empty()).unwrap_or("info");
    let Some(min) = crate::logs::level_rank(level) else {
        return Err(bad(format!("Unknown log level: {level}")));
    };
    let rx = crate::logs::subscribe();
    let lines = futures_util::stream::unfold(rx, move |mut rx| async move {
        loop {
            match rx.recv().await {
                Ok(line) if crate::logs::line_level(&line).is_none_or(|l| l >= min) => {
                    let text = crate::logs::strip_ansi(&line);
                    return Some((Ok::<_, std::convert::Infallible>(axum::body::Bytes::from(text)), rx));
                }
                Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
            }
        }
    });
    Ok(([(axum::http::header::CONTENT_TYPE, "text/plain; charset=utf-8")], axum::body::Body::from_stream(lines))
        .into_response())
}

/// `PUT /v1/agent/reload`: mesh has no configuration files to re-read.
async fn agent_reload() -> Response {
    axum::http::StatusCode::OK.into_response()
}

/// `GET /`: as Consul's HTTP server, a redirect to the UI.
async fn root() -> Response {
    (axum::http::StatusCode::MOVED_PERMANENTLY, [(axum::http::header::LOCATION, "/ui/")]).into_response()
}

/// `GET /ui/`: a short page in place of Consul's web UI.
async fn ui(State(api): State<Api>) -> Response {
    let page = format!(
        "<!doctype html><html><head><title>mesh</title></head><body><h1>mesh</h1>\
         <p>Node {} in datacenter {}. mesh has no web UI; its APIs are Marathon <code>/v2</code>, \
         Consul <code>/v1</code> and Mesos <code>/api/v1</code>.</p></body></html>\n",
        html_escape(&api.info.node),
        html_escape(&api.info.datacenter)
    );
    ([(axum::http::header::CONTENT_TYPE, "text/html; charset=utf-8")], page).into_response()
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

// ---------------------------------------------------------------------------------------------
// Status

async fn leader(State(api): State<Api>, RawQuery(raw): RawQuery) -> Result<Response, ApiError> {
    let q = Params::parse(raw.as_deref());
    check_dc(&api, &q)?;
    // While the state store cannot be written there is no leader to commit writes: Consul's
    // answer then is an empty string.
    let leader = match &api.raft {
        // Consul answers the leader's RPC address, or "" while there is none.
        Some(raft) => raft.leader_rpc().unwrap_or_default(),
        None if api.control.store_failure().is_some() => String::new(),
        None => api.info.http_addr.clone(),
    };
    let mut r = reply(&json!(leader), &q);
    r.headers_mut().insert("X-Consul-KnownLeader", HeaderValue::from_static("true"));
    Ok(r)
}

/// Response layer: while the state store cannot be written, every `X-Consul-KnownLeader` says
/// `false` (reads still answer, from the last state).
pub async fn known_leader(State(api): State<Api>, mut r: Response) -> Response {
    if api.control.store_failure().is_some() && r.headers().contains_key("X-Consul-KnownLeader") {
        r.headers_mut().insert("X-Consul-KnownLeader", HeaderValue::from_static("false"));
    }
    r
}

async fn peers(State(api): State<Api>, RawQuery(raw): RawQuery) -> Result<Response, ApiError> {
    let q = Params::parse(raw.as_deref());
    check_dc(&api, &q)?;
    let peers: Vec<String> = match &api.raft {
        Some(raft) => {
            raft.peers().map(|(p, _)| p.into_iter().filter(|p| p.voter).map(|p| p.rpc).collect()).unwrap_or_default()
        }
        None => vec![api.info.http_addr.clone()],
    };
    Ok(reply(&json!(peers), &q))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_match_in_any_case_and_snake_case() {
        let v = json!({"name": "web", "tagged_addresses": {}, "DeregisterCriticalServiceAfter": "90m", "check": {"HTTP": "x"}});
        let c = Ci(v.as_object().unwrap());
        assert_eq!(c.str("Name").unwrap(), Some("web"));
        assert!(c.get("TaggedAddresses").is_some());
        assert_eq!(c.duration_ms("deregister_critical_service_after").unwrap(), 90 * 60 * 1000);
        assert_eq!(c.obj("Check").unwrap().unwrap().str("http").unwrap(), Some("x"));
        assert!(c.u64("Name").is_err(), "a wrong type is an error, not a default");
    }

    #[test]
    fn query_strings_keep_repeats_and_decode() {
        let q = Params::parse(Some("tag=a&tag=b%20c&passing&dc=dc1&x=1+2"));
        assert_eq!(q.all("tag"), vec!["a", "b c"]);
        assert!(q.flag("passing"));
        assert_eq!(q.get("x").unwrap(), "1 2");
        assert_eq!(decode("100%"), "100%");
        assert_eq!(decode("%2Fa%2f"), "/a/");
    }
}
