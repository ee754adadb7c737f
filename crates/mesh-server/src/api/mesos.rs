//! The Mesos master's HTTP API: the v1 scheduler API (`POST /api/v1/scheduler`, a chunked
//! RecordIO event stream for SUBSCRIBE and 202 for every other call), the master endpoints
//! tools poll (`/version`, `/master/state` and its old alias `state.json`, `frameworks`,
//! `slaves`, `tasks`, `redirect`, `health`, `weights`, `quota`, `roles`), and the operator calls
//! for weights and quota (`POST /api/v1`). Errors are Mesos' plain-text bodies.

use super::{Api, ApiError};
use crate::control::{LiveFramework, MesosError, MesosView};
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use mesh_core::frameworks::Quota;
use mesh_core::mesos::{self, Call, CallType, resources_summary};
use mesh_core::model::{FrameworkId, Resources, iso8601};
use mesh_core::state::{Command, State as ClusterState, Task};
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;

/// Routes of the Mesos master API.
pub fn routes() -> Router<Api> {
    let mut r = Router::new()
        .route("/api/v1/scheduler", any(scheduler))
        .route("/master/api/v1/scheduler", any(scheduler))
        .route("/api/v1", any(operator))
        // pymesos' operator client posts here
        .route("/api/v1/operator", any(operator))
        .route("/master/api/v1/operator", any(operator))
        .route("/master/api/v1", any(operator))
        .route("/version", get(version));
    for (path, handler) in [
        ("state", get(state) as axum::routing::MethodRouter<Api>),
        ("state.json", get(state)),
        ("frameworks", get(frameworks)),
        ("slaves", get(slaves)),
        ("tasks", get(tasks)),
        ("tasks.json", get(tasks)),
        ("redirect", get(redirect)),
        ("health", get(health)),
        ("weights", get(get_weights).put(put_weights)),
        ("quota", get(get_quota)),
        ("roles", get(roles)),
    ] {
        r = r.route(&format!("/master/{path}"), handler.clone()).route(&format!("/{path}"), handler);
    }
    r.route("/master/redirect/{*rest}", get(redirect_sub)).route("/redirect/{*rest}", get(redirect_sub))
}

fn header_str<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

fn media_type(v: &str) -> String {
    v.split(';').next().unwrap_or("").trim().to_ascii_lowercase()
}

fn accepts_json(h: &HeaderMap) -> bool {
    let Some(accept) = header_str(h, "accept") else { return true };
    accept.split(',').map(media_type).any(|m| m == "application/json" || m == "*/*" || m == "application/*")
}

/// Parse a call body the way the Mesos master does.
fn parse_call(headers: &HeaderMap, body: &[u8]) -> Result<Call, ApiError> {
    let Some(ct) = header_str(headers, "content-type") else {
        return Err(ApiError::MesosBadRequest("Expecting 'Content-Type' to be present".into()));
    };
    match media_type(ct).as_str() {
        "application/json" => {}
        "application/x-protobuf" => {
            return Err(ApiError::MesosUnsupportedMediaType(
                "Expecting 'Content-Type' of application/json (mesh does not speak protobuf)".into(),
            ));
        }
        _ => {
            return Err(ApiError::MesosUnsupportedMediaType(
                "Expecting 'Content-Type' of application/json or application/x-protobuf".into(),
            ));
        }
    }
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::MesosBadRequest(format!("Failed to parse body into JSON: {e}")))?;
    let call: Call = serde_json::from_value(value)
        .map_err(|e| ApiError::MesosBadRequest(format!("Failed to convert JSON into Call protobuf: {e}")))?;
    call.validate().map_err(|e| ApiError::MesosBadRequest(format!("Failed to validate scheduler::Call: {e}")))?;
    Ok(call)
}

fn from_mesos(e: MesosError) -> ApiError {
    match e {
        MesosError::BadRequest(m) => ApiError::MesosBadRequest(m),
        MesosError::Forbidden(m) => ApiError::MesosForbidden(m),
        other => ApiError::MesosUnavailable(other.to_string()),
    }
}

async fn scheduler(
    State(api): State<Api>,
    method: Method,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    if method != Method::POST {
        return Err(ApiError::MesosMethodNotAllowed(format!("Expecting one of {{ 'POST' }}, but received '{method}'")));
    }
    let call = parse_call(&headers, &body)?;
    if call.kind == CallType::Subscribe {
        if !accepts_json(&headers) {
            return Err(ApiError::MesosNotAcceptable(
                "Expecting 'Accept' to allow 'application/x-protobuf' or 'application/json'".into(),
            ));
        }
        if headers.contains_key("mesos-stream-id") {
            return Err(ApiError::MesosBadRequest(
                "Subscribe calls should not include the 'Mesos-Stream-Id' header".into(),
            ));
        }
        let sub = api.control.mesos_subscribe(call).await.map_err(from_mesos)?;
        let stream = futures_util::stream::unfold(sub.events, |mut rx| async move {
            rx.recv().await.map(|ev| (Ok::<_, Infallible>(Bytes::from(ev.to_record())), rx))
        });
        let mut resp = Response::new(Body::from_stream(stream));
        let h = resp.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        if let Ok(v) = HeaderValue::from_str(&sub.stream_id) {
            h.insert("Mesos-Stream-Id", v);
        }
        return Ok(resp);
    }
    let stream = header_str(&headers, "mesos-stream-id").map(str::to_owned);
    let kind = call.kind;
    api.control.mesos_call(call, stream).await.map_err(from_mesos)?;
    let status = if kind == CallType::UpdateFramework { StatusCode::OK } else { StatusCode::ACCEPTED };
    Ok(status.into_response())
}

/// `?jsonp=callback` wraps the JSON, as the Mesos master does.
fn json_or_jsonp(body: Value, q: &HashMap<String, String>) -> Response {
    match q
        .get("jsonp")
        .filter(|c| !c.is_empty() && c.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.'))
    {
        Some(cb) => ([(header::CONTENT_TYPE, "text/javascript")], format!("{cb}({body});")).into_response(),
        None => axum::Json(body).into_response(),
    }
}

async fn version(State(api): State<Api>) -> Response {
    axum::Json(json!({
        "version": mesos::MESOS_VERSION,
        "build_date": iso8601(api.info.started_at),
        "build_time": api.info.started_at as f64 / 1000.0,
        "build_user": "mesh",
        "git_tag": format!("mesh-{}", env!("CARGO_PKG_VERSION")),
    }))
    .into_response()
}

fn secs(ms: u64) -> f64 {
    ms as f64 / 1000.0
}

fn pid(api: &Api) -> String {
    format!("master@{}", api.info.http_addr)
}

/// A resource summary of a sum of resources.
fn sum<'a>(it: impl Iterator<Item = &'a Resources>) -> Resources {
    let mut r = Resources::default();
    for x in it {
        r.add(x);
    }
    r
}

fn task_json(t: &Task, name: &str, role: &str) -> Value {
    let mut statuses = vec![json!({"state": "TASK_STAGING", "timestamp": secs(t.staged_at)})];
    if let Some(s) = t.started_at {
        statuses.push(json!({"state": "TASK_RUNNING", "timestamp": secs(s)}));
    }
    let st: mesos::TaskState = t.state.into();
    if st != mesos::TaskState::Staging && st != mesos::TaskState::Running {
        statuses.push(json!({"state": st.as_str(), "timestamp": secs(t.started_at.unwrap_or(t.staged_at))}));
    }
    json!({
        "id": t.id,
        "name": name,
        "framework_id": t.framework_id,
        "executor_id": "",
        "slave_id": t.agent_id,
        "agent_id": t.agent_id,
        "state": st.as_str(),
        "resources": resources_summary(&t.resources),
        "role": role,
        "statuses": statuses,
        "discovery": null,
    })
}

/// Per-framework summaries for `/master/state` and `/master/frameworks`.
fn frameworks_json(api: &Api, state: &ClusterState, view: &MesosView) -> (Vec<Value>, Vec<Value>) {
    let offers_of = |fid: &FrameworkId| -> (Vec<Value>, Resources) {
        let mine: Vec<&mesh_core::allocator::Offer> = view.offers.iter().filter(|o| &o.framework_id == fid).collect();
        let json = mine
            .iter()
            .map(|o| {
                json!({"id": o.id, "framework_id": o.framework_id, "slave_id": o.agent_id, "agent_id": o.agent_id,
                       "resources": resources_summary(&o.resources)})
            })
            .collect();
        (json, sum(mine.iter().map(|o| &o.resources)))
    };
    let tasks_of = |fid: &FrameworkId, role: &str| -> (Vec<Value>, Resources) {
        let mine: Vec<&Task> = state.tasks.values().filter(|t| &t.framework_id == fid).collect();
        let json = mine
            .iter()
            .map(|t| {
                let name = state.mesos.task_names.get(&t.id).cloned().unwrap_or_else(|| t.id.0.clone());
                task_json(t, &name, role)
            })
            .collect();
        (json, sum(mine.iter().map(|t| &t.resources)))
    };
    let mut active = Vec::new();
    // The stock Marathon scheduler is a framework like any other.
    let marathon = FrameworkId::from("marathon");
    let (tasks, used) = tasks_of(&marathon, "*");
    let (offers, offered) = offers_of(&marathon);
    let mut total = used.clone();
    total.add(&offered);
    active.push(json!({
        "id": "marathon", "name": "marathon", "user": "root", "role": "*", "roles": ["*"],
        "hostname": api.info.node, "webui_url": format!("http://{}", api.info.http_addr),
        "failover_timeout": 604800.0, "checkpoint": true, "active": true, "connected": true, "recovered": false,
        "registered_time": secs(api.info.started_at), "unregistered_time": 0, "capabilities": [],
        "used_resources": resources_summary(&used), "offered_resources": resources_summary(&offered),
        "allocated_resources": resources_summary(&used), "resources": resources_summary(&total),
        "tasks": tasks, "unreachable_tasks": [], "completed_tasks": [], "offers": offers, "executors": [],
    }));
    for (id, f) in state.mesos.frameworks.iter() {
        let live = view.frameworks.get(id).cloned().unwrap_or(LiveFramework::default());
        let role = f.info.effective_role();
        let (tasks, used) = tasks_of(id, &role);
        let (offers, offered) = offers_of(id);
        let mut total = used.clone();
        total.add(&offered);
        let completed: Vec<Value> = f.completed_tasks.iter().map(|c| task_json(&c.task, &c.name, &role)).collect();
        active.push(json!({
            "id": id, "name": f.info.name, "user": f.info.user, "role": role, "roles": [role],
            "principal": f.info.principal, "hostname": f.info.hostname.clone().unwrap_or_default(),
            "webui_url": f.info.webui_url.clone().unwrap_or_default(),
            "failover_timeout": f.info.failover_timeout.unwrap_or(0.0), "checkpoint": f.info.checkpoint.unwrap_or(false),
            "capabilities": f.info.capabilities.iter().map(|c| c.kind.clone()).collect::<Vec<_>>(),
            "active": live.active, "connected": live.connected, "recovered": false,
            "registered_time": secs(f.registered_at),
            "reregistered_time": f.reregistered_at.map(secs),
            "unregistered_time": live.disconnected_at.map(secs).unwrap_or(0.0),
            "used_resources": resources_summary(&used), "offered_resources": resources_summary(&offered),
            "allocated_resources": resources_summary(&used), "resources": resources_summary(&total),
            "tasks": tasks, "unreachable_tasks": [], "completed_tasks": completed, "offers": offers, "executors": [],
            "unacknowledged_updates": live.unacknowledged,
        }));
    }
    let completed = state
        .mesos
        .completed
        .iter()
        .rev()
        .map(|f| {
            let role = f.info.effective_role();
            json!({
                "id": f.id, "name": f.info.name, "user": f.info.user, "role": role, "roles": [role],
                "active": false, "connected": false, "recovered": false,
                "registered_time": secs(f.registered_at), "unregistered_time": f.removed_at.map(secs).unwrap_or(0.0),
                "failover_timeout": f.info.failover_timeout.unwrap_or(0.0),
                "used_resources": resources_summary(&Resources::default()),
                "offered_resources": resources_summary(&Resources::default()),
                "tasks": [], "unreachable_tasks": [], "offers": [], "executors": [],
                "completed_tasks": f.completed_tasks.iter().map(|c| task_json(&c.task, &c.name, &role)).collect::<Vec<_>>(),
            })
        })
        .collect();
    (active, completed)
}

fn slaves_json(api: &Api, state: &ClusterState, view: &MesosView) -> Vec<Value> {
    state
        .agents
        .values()
        .map(|a| {
            let used = sum(state.tasks.values().filter(|t| t.agent_id == a.id).map(|t| &t.resources));
            let offered = sum(view.offers.iter().filter(|o| o.agent_id == a.id).map(|o| &o.resources));
            json!({
                "id": a.id, "hostname": a.hostname, "port": 5051,
                "pid": format!("slave(1)@{}:5051", a.address),
                "attributes": a.attributes, "registered_time": secs(a.registered_at),
                "resources": resources_summary(&a.resources), "unreserved_resources": resources_summary(&a.resources),
                "used_resources": resources_summary(&used), "offered_resources": resources_summary(&offered),
                "reserved_resources": {}, "active": true, "version": mesos::MESOS_VERSION,
                "capabilities": ["MULTI_ROLE", "TASK_LABELS_ANNOTATION"],
                "runtimes": a.runtimes, "master": pid(api),
            })
        })
        .collect()
}

async fn state(State(api): State<Api>, Query(q): Query<HashMap<String, String>>) -> Response {
    let s = api.control.state();
    let view = api.control.published.mesos.load_full();
    let (frameworks, completed) = frameworks_json(&api, &s, &view);
    let slaves = slaves_json(&api, &s, &view);
    let host = api.info.http_addr.rsplit_once(':').map(|(h, _)| h.to_owned()).unwrap_or_default();
    let port: u64 = api.info.http_addr.rsplit_once(':').and_then(|(_, p)| p.parse().ok()).unwrap_or(0);
    let body = json!({
        "version": mesos::MESOS_VERSION,
        "build_date": iso8601(api.info.started_at),
        "build_time": secs(api.info.started_at),
        "build_user": "mesh",
        "start_time": secs(api.info.started_at),
        "elected_time": secs(api.info.started_at),
        "id": view.master_id,
        "pid": pid(&api),
        "hostname": api.info.node,
        "capabilities": ["AGENT_UPDATE", "AGENT_DRAINING", "QUOTA_V2"],
        "activated_slaves": slaves.len(),
        "deactivated_slaves": 0,
        "unreachable_slaves": 0,
        "leader": pid(&api),
        "leader_info": {"id": view.master_id, "pid": pid(&api), "port": port, "hostname": host, "version": mesos::MESOS_VERSION},
        "cluster": api.info.datacenter,
        "flags": {"offer_timeout": "", "allocation_interval": "200ms", "roles": "", "weights": ""},
        "slaves": slaves,
        "recovered_slaves": [],
        "frameworks": frameworks,
        "completed_frameworks": completed,
        "orphan_tasks": [],
        "unregistered_frameworks": [],
    });
    json_or_jsonp(body, &q)
}

async fn frameworks(State(api): State<Api>, Query(q): Query<HashMap<String, String>>) -> Response {
    let s = api.control.state();
    let view = api.control.published.mesos.load_full();
    let (mut frameworks, completed) = frameworks_json(&api, &s, &view);
    if let Some(id) = q.get("framework_id") {
        frameworks.retain(|f| f["id"] == json!(id));
    }
    json_or_jsonp(
        json!({"frameworks": frameworks, "completed_frameworks": completed, "unregistered_frameworks": []}),
        &q,
    )
}

async fn slaves(State(api): State<Api>, Query(q): Query<HashMap<String, String>>) -> Response {
    let s = api.control.state();
    let view = api.control.published.mesos.load_full();
    json_or_jsonp(json!({"slaves": slaves_json(&api, &s, &view), "recovered_slaves": []}), &q)
}

async fn tasks(State(api): State<Api>, Query(q): Query<HashMap<String, String>>) -> Response {
    let s = api.control.state();
    let limit: usize = q.get("limit").and_then(|v| v.parse().ok()).unwrap_or(100);
    let offset: usize = q.get("offset").and_then(|v| v.parse().ok()).unwrap_or(0);
    let role_of =
        |fid: &FrameworkId| s.mesos.frameworks.get(fid).map(|f| f.info.effective_role()).unwrap_or("*".into());
    let mut out: Vec<Value> = s
        .tasks
        .values()
        .filter(|t| q.get("framework_id").is_none_or(|f| f == &t.framework_id.0))
        .map(|t| {
            let name = s.mesos.task_names.get(&t.id).cloned().unwrap_or_else(|| t.id.0.clone());
            task_json(t, &name, &role_of(&t.framework_id))
        })
        .collect();
    if q.get("order").map(String::as_str) == Some("asc") {
        out.reverse();
    }
    let page: Vec<Value> = out.into_iter().skip(offset).take(limit).collect();
    json_or_jsonp(json!({"tasks": page}), &q)
}

async fn redirect(State(api): State<Api>) -> Response {
    let loc = format!("//{}", api.info.http_addr);
    let mut r = StatusCode::TEMPORARY_REDIRECT.into_response();
    if let Ok(v) = HeaderValue::from_str(&loc) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r
}

async fn redirect_sub() -> Response {
    StatusCode::NOT_FOUND.into_response()
}

/// 200, or 503 while the state store cannot be written.
async fn health(State(api): State<Api>) -> Response {
    match api.control.store_failure() {
        None => StatusCode::OK.into_response(),
        Some(_) => StatusCode::SERVICE_UNAVAILABLE.into_response(),
    }
}

fn weights_json(s: &ClusterState) -> Value {
    Value::Array(s.mesos.weights.iter().map(|(r, w)| json!({"role": r, "weight": w})).collect())
}

async fn get_weights(State(api): State<Api>, Query(q): Query<HashMap<String, String>>) -> Response {
    json_or_jsonp(weights_json(&api.control.state()), &q)
}

/// Validate `[{"role": "r", "weight": 2.0}]` (Mesos' `WeightInfo`s).
fn parse_weights(v: &Value) -> Result<Vec<(String, f64)>, ApiError> {
    let bad = |m: String| ApiError::MesosBadRequest(m);
    let arr =
        v.as_array().ok_or_else(|| bad("Failed to parse update weights request JSON: expected an array".into()))?;
    let mut out = Vec::new();
    for w in arr {
        let role = w.get("role").and_then(Value::as_str).ok_or_else(|| {
            bad(format!("Failed to convert weights JSON array into WeightInfo: missing 'role' in {w}"))
        })?;
        let weight = w.get("weight").and_then(Value::as_f64).ok_or_else(|| {
            bad(format!("Failed to convert weights JSON array into WeightInfo: missing 'weight' in {w}"))
        })?;
        mesh_core::mesos::validate_role(role).map_err(|e| bad(format!("Invalid role: {e}")))?;
        if !weight.is_finite() || weight <= 0.0 {
            return Err(bad(format!("Invalid weight '{weight}' for role '{role}': Weights must be positive")));
        }
        out.push((role.to_owned(), weight));
    }
    Ok(out)
}

async fn put_weights(State(api): State<Api>, body: Bytes) -> Result<Response, ApiError> {
    let v: Value = serde_json::from_slice(&body)
        .map_err(|e| ApiError::MesosBadRequest(format!("Failed to parse update weights request JSON: {e}")))?;
    let weights = parse_weights(&v)?;
    api.control
        .propose(Command::SetWeights { weights })
        .await
        .map_err(|e| ApiError::MesosUnavailable(e.to_string()))?;
    Ok(StatusCode::OK.into_response())
}

fn quota_configs(s: &ClusterState) -> Vec<Value> {
    s.mesos
        .quotas
        .iter()
        .map(|(role, q)| {
            let mut limits = serde_json::Map::new();
            for (n, v) in [("cpus", q.cpus), ("mem", q.mem), ("disk", q.disk)] {
                if let Some(v) = v {
                    limits.insert(n.into(), json!({"value": v}));
                }
            }
            json!({"role": role, "limits": limits})
        })
        .collect()
}

async fn get_quota(State(api): State<Api>, Query(q): Query<HashMap<String, String>>) -> Response {
    json_or_jsonp(json!({"infos": [], "configs": quota_configs(&api.control.state())}), &q)
}

async fn roles(State(api): State<Api>, Query(q): Query<HashMap<String, String>>) -> Response {
    let s = api.control.state();
    let view = api.control.published.mesos.load_full();
    let mut roles: BTreeMap<String, (Vec<String>, Resources)> = BTreeMap::new();
    let marathon_used = sum(s.tasks.values().filter(|t| t.framework_id.0 == "marathon").map(|t| &t.resources));
    roles.insert("*".into(), (vec!["marathon".into()], marathon_used));
    for (id, f) in s.mesos.frameworks.iter() {
        let used = sum(s.tasks.values().filter(|t| &t.framework_id == id).map(|t| &t.resources));
        let e = roles.entry(f.info.effective_role()).or_default();
        e.0.push(id.0.clone());
        e.1.add(&used);
    }
    for r in s.mesos.weights.keys().chain(s.mesos.quotas.keys()) {
        roles.entry(r.clone()).or_default();
    }
    let out: Vec<Value> = roles
        .into_iter()
        .map(|(name, (fws, used))| {
            let weight = view.weights.get(&name).copied().unwrap_or(1.0);
            json!({"name": name, "weight": weight, "frameworks": fws, "resources": resources_summary(&used),
                   "allocated": resources_summary(&used)})
        })
        .collect();
    json_or_jsonp(json!({"roles": out}), &q)
}

/// `QuotaConfig.limits` (`{"cpus":{"value":2}}`) as a [`Quota`].
fn parse_quota_config(c: &Value) -> Result<(String, Quota), ApiError> {
    let bad = |m: String| ApiError::MesosBadRequest(m);
    let role = c.get("role").and_then(Value::as_str).ok_or_else(|| bad("Quota config lacks 'role'".into()))?;
    if role == "*" {
        return Err(bad(format!("Invalid role '{role}' for quota")));
    }
    mesh_core::mesos::validate_role(role).map_err(|e| bad(format!("Invalid role for quota: {e}")))?;
    if c.get("guarantees").and_then(Value::as_object).is_some_and(|g| !g.is_empty()) {
        return Err(bad("Quota guarantees are not supported by mesh; set 'limits'".into()));
    }
    let mut q = Quota::default();
    if let Some(limits) = c.get("limits").and_then(Value::as_object) {
        for (name, v) in limits {
            let x = v
                .get("value")
                .and_then(Value::as_f64)
                .ok_or_else(|| bad(format!("Quota limit '{name}' lacks a value")))?;
            if !x.is_finite() || x < 0.0 {
                return Err(bad(format!("Quota limit '{name}' must be a non-negative number")));
            }
            match name.as_str() {
                "cpus" => q.cpus = Some(x),
                "mem" => q.mem = Some(x),
                "disk" => q.disk = Some(x),
                other => return Err(bad(format!("Quota on '{other}' is not supported (cpus, mem, disk)"))),
            }
        }
    }
    Ok((role.to_owned(), q))
}

/// A v0 resource summary (`{"cpus":1,"mem":128,"disk":0,"ports":"[...]"}`) as v1 `Resource`s.
fn v1_resources(summary: &Value) -> Value {
    let mut out = Vec::new();
    for name in ["cpus", "mem", "disk", "gpus"] {
        if let Some(v) = summary.get(name).and_then(Value::as_f64).filter(|v| *v > 0.0) {
            out.push(json!({"name": name, "type": "SCALAR", "scalar": {"value": v}, "role": "*"}));
        }
    }
    Value::Array(out)
}

fn v1_id(v: &Value) -> Value {
    json!({"value": v.as_str().unwrap_or_default()})
}

fn v1_time(secs: &Value) -> Value {
    json!({"nanoseconds": (secs.as_f64().unwrap_or(0.0) * 1e9) as i64})
}

/// A v0 task (`task_json`) as a v1 `Task`.
fn v1_task(t: &Value) -> Value {
    let statuses: Vec<Value> = t["statuses"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|st| {
            json!({"task_id": v1_id(&t["id"]), "agent_id": v1_id(&t["agent_id"]), "state": st["state"],
                          "source": "SOURCE_MASTER", "timestamp": st["timestamp"]})
        })
        .collect();
    json!({
        "name": t["name"], "task_id": v1_id(&t["id"]), "framework_id": v1_id(&t["framework_id"]),
        "agent_id": v1_id(&t["agent_id"]), "state": t["state"], "resources": v1_resources(&t["resources"]),
        "statuses": statuses,
    })
}

fn v1_tasks(frameworks: &[Value], completed_frameworks: &[Value]) -> Value {
    let collect = |fs: &[Value], key: &str| -> Vec<Value> {
        fs.iter().flat_map(|f| f[key].as_array().cloned().unwrap_or_default()).map(|t| v1_task(&t)).collect()
    };
    let mut completed = collect(frameworks, "completed_tasks");
    completed.extend(collect(completed_frameworks, "completed_tasks"));
    json!({"tasks": collect(frameworks, "tasks"), "completed_tasks": completed, "orphan_tasks": [], "unreachable_tasks": []})
}

fn v1_framework(f: &Value) -> Value {
    json!({
        "framework_info": {
            "id": v1_id(&f["id"]), "name": f["name"], "user": f["user"], "role": f["role"], "roles": f["roles"],
            "hostname": f.get("hostname").cloned().unwrap_or(json!("")),
            "webui_url": f.get("webui_url").cloned().unwrap_or(json!("")),
            "failover_timeout": f["failover_timeout"], "checkpoint": f.get("checkpoint").cloned().unwrap_or(json!(false)),
            "capabilities": f.get("capabilities").and_then(Value::as_array).into_iter().flatten()
                .map(|c| json!({"type": c})).collect::<Vec<_>>(),
        },
        "active": f["active"], "connected": f["connected"], "recovered": f["recovered"],
        "registered_time": v1_time(&f["registered_time"]),
        "allocated_resources": v1_resources(&f["used_resources"]),
        "offered_resources": v1_resources(&f["offered_resources"]),
    })
}

fn v1_frameworks(frameworks: &[Value], completed: &[Value]) -> Value {
    json!({
        "frameworks": frameworks.iter().map(v1_framework).collect::<Vec<_>>(),
        "completed_frameworks": completed.iter().map(v1_framework).collect::<Vec<_>>(),
    })
}

fn v1_agents(slaves: &[Value]) -> Value {
    let agents: Vec<Value> = slaves
        .iter()
        .map(|a| {
            json!({
                "agent_info": {"id": v1_id(&a["id"]), "hostname": a["hostname"], "port": a["port"],
                               "resources": v1_resources(&a["resources"])},
                "active": a["active"], "version": a["version"], "pid": a["pid"],
                "registered_time": v1_time(&a["registered_time"]),
                "total_resources": v1_resources(&a["resources"]),
                "allocated_resources": v1_resources(&a["used_resources"]),
                "offered_resources": v1_resources(&a["offered_resources"]),
                "capabilities": a["capabilities"].as_array().into_iter().flatten()
                    .map(|c| json!({"type": c})).collect::<Vec<_>>(),
            })
        })
        .collect();
    json!({"agents": agents, "recovered_agents": []})
}

/// The operator API calls mesh implements: GET_HEALTH, GET_VERSION, GET_STATE, GET_FRAMEWORKS,
/// GET_AGENTS, GET_TASKS (Mesos' v1 JSON), GET_WEIGHTS, UPDATE_WEIGHTS, GET_QUOTA, UPDATE_QUOTA.
async fn operator(
    State(api): State<Api>,
    method: Method,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    if method != Method::POST {
        return Err(ApiError::MesosMethodNotAllowed(format!("Expecting one of {{ 'POST' }}, but received '{method}'")));
    }
    match header_str(&headers, "content-type").map(media_type) {
        None => return Err(ApiError::MesosBadRequest("Expecting 'Content-Type' to be present".into())),
        Some(m) if m == "application/json" => {}
        Some(_) => {
            return Err(ApiError::MesosUnsupportedMediaType("Expecting 'Content-Type' of application/json".into()));
        }
    }
    let v: Value = serde_json::from_slice(&body)
        .map_err(|e| ApiError::MesosBadRequest(format!("Failed to parse body into JSON: {e}")))?;
    let kind = v.get("type").and_then(Value::as_str).unwrap_or("");
    let s = api.control.state();
    let unavailable = |e: crate::control::ControlError| ApiError::MesosUnavailable(e.to_string());
    let view = || api.control.published.mesos.load_full();
    Ok(match kind {
        "GET_STATE" => {
            let v = view();
            let (fw, done) = frameworks_json(&api, &s, &v);
            let slaves = slaves_json(&api, &s, &v);
            axum::Json(json!({"type": "GET_STATE", "get_state": {
                "get_tasks": v1_tasks(&fw, &done), "get_executors": {"executors": []},
                "get_frameworks": v1_frameworks(&fw, &done), "get_agents": v1_agents(&slaves)}}))
            .into_response()
        }
        "GET_FRAMEWORKS" => {
            let (fw, done) = frameworks_json(&api, &s, &view());
            axum::Json(json!({"type": "GET_FRAMEWORKS", "get_frameworks": v1_frameworks(&fw, &done)})).into_response()
        }
        "GET_AGENTS" => {
            let slaves = slaves_json(&api, &s, &view());
            axum::Json(json!({"type": "GET_AGENTS", "get_agents": v1_agents(&slaves)})).into_response()
        }
        "GET_TASKS" => {
            let (fw, done) = frameworks_json(&api, &s, &view());
            axum::Json(json!({"type": "GET_TASKS", "get_tasks": v1_tasks(&fw, &done)})).into_response()
        }
        "GET_HEALTH" => {
            let healthy = api.control.store_failure().is_none();
            axum::Json(json!({"type": "GET_HEALTH", "get_health": {"healthy": healthy}})).into_response()
        }
        "GET_VERSION" => axum::Json(json!({"type": "GET_VERSION", "get_version": {"version_info": {
            "version": mesos::MESOS_VERSION, "build_user": "mesh", "build_time": secs(api.info.started_at)}}}))
        .into_response(),
        "GET_WEIGHTS" => axum::Json(json!({"type": "GET_WEIGHTS", "get_weights": {"weight_infos": weights_json(&s)}}))
            .into_response(),
        "UPDATE_WEIGHTS" => {
            let infos = v.pointer("/update_weights/weight_infos").cloned().unwrap_or(Value::Null);
            let weights = parse_weights(&infos)?;
            api.control.propose(Command::SetWeights { weights }).await.map_err(unavailable)?;
            StatusCode::OK.into_response()
        }
        "GET_QUOTA" => {
            axum::Json(json!({"type": "GET_QUOTA", "get_quota": {"status": {"configs": quota_configs(&s)}}}))
                .into_response()
        }
        "UPDATE_QUOTA" => {
            let configs =
                v.pointer("/update_quota/quota_configs").and_then(Value::as_array).cloned().unwrap_or_default();
            // All or nothing: every config is checked before any is applied.
            let parsed = configs.iter().map(parse_quota_config).collect::<Result<Vec<_>, _>>()?;
            for (role, quota) in parsed {
                api.control.propose(Command::SetQuota { role, quota }).await.map_err(unavailable)?;
            }
            StatusCode::OK.into_response()
        }
        "DRAIN_AGENT" | "REACTIVATE_AGENT" => {
            // Mesos 1.9's agent draining: no new tasks on it; its tasks are killed and their
            // frameworks (Marathon here) launch replacements elsewhere.
            let drain = kind == "DRAIN_AGENT";
            let key = if drain { "/drain_agent/agent_id/value" } else { "/reactivate_agent/agent_id/value" };
            let Some(agent) = v.pointer(key).and_then(Value::as_str) else {
                return Err(ApiError::MesosBadRequest(format!(
                    "Failed to validate master::Call: Expecting '{}' to be present",
                    key.trim_start_matches('/').replace('/', ".")
                )));
            };
            let agent_id = mesh_core::model::AgentId::from(agent);
            if !s.agents.contains_key(&agent_id) {
                return Err(ApiError::MesosBadRequest(format!("Unknown agent {agent}")));
            }
            api.control.propose(Command::DrainAgent { agent_id, drain }).await.map_err(unavailable)?;
            StatusCode::OK.into_response()
        }
        "" => {
            return Err(ApiError::MesosBadRequest(
                "Failed to validate master::Call: Expecting 'type' to be present".into(),
            ));
        }

        other => {
            return Err(ApiError::MesosNotImplemented(format!(
                "Operator call '{other}' is not implemented by mesh (GET_HEALTH, GET_VERSION, GET_STATE, GET_FRAMEWORKS, GET_AGENTS, GET_TASKS, GET_WEIGHTS, UPDATE_WEIGHTS, GET_QUOTA, UPDATE_QUOTA, DRAIN_AGENT, REACTIVATE_AGENT are)"
            )));
        }
    })
}
