//! The Marathon v2 REST API (the subset of the foundation: apps, tasks, deployments, queue,
//! info, leader), with Marathon's shapes, status codes and error bodies.

use super::{Api, ApiError, flag};
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use mesh_core::app::{App, AppId, Invalid, JsonError, limits};
use mesh_core::model::{TaskId, iso8601, parse_iso8601};
use mesh_core::proto::TaskState;
use mesh_core::scheduler::MarathonScheduler;
use mesh_core::state::{AppRecord, Command, State as Cluster, Task};
use serde_json::{Value, json};
use std::collections::HashMap;

type Params = Query<Vec<(String, String)>>;

pub(super) fn param<'a>(q: &'a [(String, String)], key: &str) -> Option<&'a String> {
    q.iter().find(|(k, _)| k == key).map(|(_, v)| v)
}

pub(super) fn params<'a>(q: &'a [(String, String)], key: &'a str) -> impl Iterator<Item = &'a String> + 'a {
    q.iter().filter(move |(k, _)| k == key || k.strip_suffix("[]") == Some(key)).map(|(_, v)| v)
}

/// Routes of the Marathon API.
pub fn routes() -> Router<Api> {
    Router::new()
        .route("/v2/apps", get(list_apps).post(create_app).put(apps_put).patch(apps_patch))
        .route("/v2/tasks/delete", axum::routing::post(tasks_delete))
        .route("/metrics", get(metrics))
        .route("/v2/apps/{*rest}", get(app_get).put(app_put).patch(app_patch).delete(app_delete).post(app_post))
        .route("/v2/tasks", get(list_tasks))
        .route("/v2/info", get(info))
        .route("/v2/leader", get(leader).delete(abdicate))
        .route("/v2/deployments", get(deployments))
        .route("/v2/queue", get(queue))
        .route("/v2/queue/{*rest}", delete(queue_delete))
        .route_layer(axum::middleware::from_fn(json_bodies_only))
}

/// Marathon takes request bodies only as JSON and answers anything else with 415, before the
/// body is read (`curl -d` without `-H 'Content-Type: application/json'` sends a form type).
/// Requests without a body need no type.
pub(super) async fn json_bodies_only(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let h = req.headers();
    let sends_body = [axum::http::Method::POST, axum::http::Method::PUT, axum::http::Method::PATCH];
    let has_body = sends_body.contains(req.method())
        && (h.contains_key(header::TRANSFER_ENCODING)
            || h.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).is_some_and(|v| v.trim() != "0"));
    let json = h.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|v| {
        let media = v.split(';').next().unwrap_or("").trim();
        media.eq_ignore_ascii_case("application/json")
    });
    if has_body && !json {
        return ApiError::MarathonUnsupportedMediaType.into_response();
    }
    next.run(req).await
}

/// Parse a request body as a JSON value, with Marathon's 400 on failure, and a 422 for a
/// duplicate key (which of the values was meant is unclear) or for a body whose parsed form
/// would take more than `limits::MAX_PARSED_BYTES`.
pub(super) fn parse_body(body: &Bytes) -> Result<Value, ApiError> {
    mesh_core::app::parse_json(body).map_err(|e| {
        let message = e.to_string();
        match e {
            JsonError::Syntax(error) => ApiError::MarathonBadJson { path: "/".into(), error },
            JsonError::DuplicateKey { path, .. } => ApiError::MarathonInvalid(Invalid::at(&path, message)),
            JsonError::TooComplex => ApiError::MarathonInvalid(Invalid::at("/", message)),
        }
    })
}

/// Turn validation results into 400 (JSON type errors) or 422 (semantic errors), as Marathon does.
pub(super) fn invalid(inv: Invalid) -> ApiError {
    if let Some(v) =
        inv.0.iter().find(|v| v.errors.iter().any(|e| e.starts_with("error.expected") || e.starts_with("invalid type")))
    {
        return ApiError::MarathonBadJson { path: v.path.clone(), error: v.errors[0].clone() };
    }
    ApiError::MarathonInvalid(inv)
}

/// Checks that depend on the node's settings rather than on the definition alone: what
/// containers may reach of the host (`prefix` places the paths, as for a bulk or group item).
pub(super) fn node_allows(api: &Api, app: &App, prefix: &str) -> Result<(), ApiError> {
    app.check_host_access(&api.info.host_access).map_err(|inv| ApiError::MarathonInvalid(inv.prefixed(prefix)))
}

pub(super) fn deployment_result(id: &str, version: u64) -> Response {
    let mut r = (StatusCode::OK, axum::Json(json!({"deploymentId": id, "version": iso8601(version)}))).into_response();
    if let Ok(v) = HeaderValue::from_str(id) {
        r.headers_mut().insert("Marathon-Deployment-Id", v);
    }
    r
}

/// The JSON of a task, with the fields marathon-python knows.
pub fn task_json(t: &Task, state: &Cluster) -> Value {
    serde_json::to_value(TaskView::new(t, state)).unwrap_or(Value::Null)
}

/// A task as the API shows it, serialized straight from borrowed state (list endpoints render
/// thousands of these: no intermediate JSON tree).
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct TaskView<'a> {
    id: &'a TaskId,
    app_id: String,
    host: &'a str,
    ports: &'a [u16],
    service_ports: &'a [u16],
    slave_id: &'a mesh_core::model::AgentId,
    state: &'static str,
    staged_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    started_at: Option<String>,
    version: String,
    ip_addresses: [IpAddressView; 1],
    health_check_results: Vec<Value>,
    local_volumes: [u8; 0],
}

#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct IpAddressView {
    ip_address: String,
    protocol: &'static str,
}

impl<'a> TaskView<'a> {
    pub(crate) fn new(t: &'a Task, state: &Cluster) -> Self {
        let address =
            state.agents.get(&t.agent_id).map(|a| a.address.to_string()).unwrap_or_else(|| "127.0.0.1".into());
        TaskView {
            id: &t.id,
            app_id: t.app_id.as_ref().map(|a| a.to_string()).unwrap_or_default(),
            host: &t.host,
            ports: &t.ports,
            service_ports: &t.service_ports,
            slave_id: &t.agent_id,
            state: t.state.as_str(),
            staged_at: iso8601(t.staged_at),
            started_at: t.started_at.map(iso8601),
            version: iso8601(t.version),
            ip_addresses: [IpAddressView { ip_address: address, protocol: "IPv4" }],
            health_check_results: if t.health.is_empty() { Vec::new() } else { health_results(t) },
            local_volumes: [],
        }
    }
}

fn health_results(t: &Task) -> Vec<Value> {
    let ts = |m: Option<u64>| m.map(|m| Value::from(iso8601(m))).unwrap_or(Value::Null);
    t.health
        .iter()
        .map(|r| {
            json!({
                "alive": r.alive,
                "consecutiveFailures": r.consecutive_failures,
                "firstSuccess": ts(r.first_success),
                "lastSuccess": ts(r.last_success),
                "lastFailure": ts(r.last_failure),
                "lastFailureCause": r.last_failure_cause,
                "taskId": t.id,
                "instanceId": t.id,
            })
        })
        .collect()
}

#[derive(Default, Clone, Copy)]
struct Embed {
    tasks: bool,
    failure: bool,
}

fn parse_embed(q: &[(String, String)]) -> Embed {
    let mut e = Embed::default();
    for v in params(q, "embed") {
        let suffix = v.rsplit('.').next().unwrap_or("");
        match suffix {
            "tasks" => e.tasks = true,
            "lastTaskFailure" => e.failure = true,
            "failures" => {
                e.tasks = true;
                e.failure = true;
            }
            _ => {}
        }
    }
    e
}

/// An app as the API shows it: its definition plus counts and deployments, and tasks and
/// lastTaskFailure when embedded; serialized straight from borrowed state.
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct AppView<'a> {
    #[serde(flatten)]
    app: &'a App,
    tasks_staged: usize,
    tasks_running: usize,
    tasks_healthy: usize,
    tasks_unhealthy: usize,
    deployments: Vec<DeploymentRef<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tasks: Option<Vec<TaskView<'a>>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    last_task_failure: Option<Value>,
}

#[derive(serde::Serialize)]
struct DeploymentRef<'a> {
    id: &'a str,
}

fn app_view<'a>(rec: &'a AppRecord, state: &'a Cluster, embed: Embed) -> AppView<'a> {
    let tasks: Vec<&Task> = state.app_tasks(&rec.app.id).collect();
    let count = |s: TaskState| tasks.iter().filter(|t| t.state == s).count();
    let checks = rec.app.health_checks.len();
    let (healthy, unhealthy) = if checks == 0 {
        (0, 0)
    } else {
        let running: Vec<&&Task> = tasks.iter().filter(|t| t.state == TaskState::Running).collect();
        let h = running.iter().filter(|t| t.checks_alive(checks)).count();
        let u = running.iter().filter(|t| t.health.iter().any(|r| !r.alive && r.consecutive_failures > 0)).count();
        (h, u)
    };
    let deployments = rec
        .deployment
        .iter()
        .filter(|d| state.deployments.contains_key(*d))
        .map(|d| DeploymentRef { id: d.as_str() })
        .collect();
    let last_task_failure = rec.last_failure.as_ref().filter(|_| embed.failure).map(|f| {
        json!({
            "appId": rec.app.id,
            "host": f.host,
            "message": f.message,
            "state": f.state.as_str(),
            "taskId": f.task_id,
            "timestamp": iso8601(f.at),
            "version": iso8601(f.version),
            "slaveId": f.agent_id,
        })
    });
    AppView {
        app: &rec.app,
        tasks_staged: count(TaskState::Staging) + count(TaskState::Starting),
        tasks_running: count(TaskState::Running),
        tasks_healthy: healthy,
        tasks_unhealthy: unhealthy,
        deployments,
        tasks: embed.tasks.then(|| tasks.iter().map(|t| TaskView::new(t, state)).collect()),
        last_task_failure,
    }
}

/// The JSON of an app (see [`AppView`]).
fn app_json(rec: &AppRecord, state: &Cluster, embed: Embed) -> Value {
    serde_json::to_value(app_view(rec, state, embed)).unwrap_or(Value::Null)
}

fn label_selector_matches(sel: &str, labels: &std::collections::BTreeMap<String, String>) -> bool {
    // comma = AND; forms: k, k==v, k!=v, k in (a,b), k notin (a,b)
    let mut parts = Vec::new();
    let mut depth = 0;
    let mut cur = String::new();
    for c in sel.chars() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(std::mem::take(&mut cur));
                continue;
            }
            _ => {}
        }
        cur.push(c);
    }
    parts.push(cur);
    parts.iter().map(|p| p.trim()).filter(|p| !p.is_empty()).all(|p| {
        let set = |rest: &str| -> Vec<String> {
            rest.trim().trim_start_matches('(').trim_end_matches(')').split(',').map(|s| s.trim().to_owned()).collect()
        };
        if let Some((k, v)) = p.split_once("!=") {
            labels.get(k.trim()).map(String::as_str) != Some(v.trim())
        } else if let Some((k, v)) = p.split_once("==") {
            labels.get(k.trim()).map(String::as_str) == Some(v.trim())
        } else if let Some((k, rest)) = p.split_once(" notin ") {
            labels.get(k.trim()).is_none_or(|v| !set(rest).contains(v))
        } else if let Some((k, rest)) = p.split_once(" in ") {
            labels.get(k.trim()).is_some_and(|v| set(rest).contains(v))
        } else {
            labels.contains_key(p)
        }
    })
}

async fn list_apps(State(api): State<Api>, Query(q): Params) -> Response {
    let state = api.control.state();
    let embed = parse_embed(&q);
    let cmd = param(&q, "cmd");
    let id = param(&q, "id");
    let label = param(&q, "label");
    let apps: Vec<AppView> = state
        .apps
        .values()
        .filter(|r| cmd.is_none_or(|c| r.app.cmd.as_deref().is_some_and(|x| x.contains(c.as_str()))))
        .filter(|r| id.is_none_or(|i| r.app.id.as_str().contains(i.as_str())))
        .filter(|r| label.is_none_or(|l| label_selector_matches(l, &r.app.labels)))
        .map(|r| app_view(r, &state, embed))
        .collect();
    #[derive(serde::Serialize)]
    struct Apps<'a> {
        apps: Vec<AppView<'a>>,
    }
    axum::Json(Apps { apps }).into_response()
}

async fn create_app(State(api): State<Api>, Query(q): Params, body: Bytes) -> Result<Response, ApiError> {
    let body = parse_body(&body)?;
    let app = App::from_json(&body, None).map_err(invalid)?;
    node_allows(&api, &app, "")?;
    let id = app.id.clone();
    let deployment_id = api.control.uuid().to_string();
    let force = flag(param(&q, "force"), false);
    api.control
        .propose(Command::PutApp {
            app,
            now: api.control.now(),
            deployment_id: deployment_id.clone(),
            create_only: true,
            force,
        })
        .await
        .map_err(ApiError::from_control)?;
    let state = api.control.state();
    let rec = state.apps.get(&id).ok_or_else(|| ApiError::MarathonNotFound(format!("App '{id}' does not exist")))?;
    let mut r = (StatusCode::CREATED, axum::Json(app_json(rec, &state, Embed::default()))).into_response();
    let h = r.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&format!("/v2/apps{id}")) {
        h.insert(header::LOCATION, v);
    }
    if let Ok(v) = HeaderValue::from_str(&deployment_id) {
        h.insert("Marathon-Deployment-Id", v);
    }
    Ok(r)
}

/// What a path under `/v2/apps/` addresses.
enum Target {
    App(AppId),
    Group(String),
    Tasks(AppId),
    Task(AppId, TaskId),
    Versions(AppId),
    Version(AppId, String),
    Restart(AppId),
}

fn parse_target(rest: &str) -> Result<Target, ApiError> {
    let segs: Vec<&str> = rest.split('/').filter(|s| !s.is_empty()).collect();
    let id = |n: usize| -> Result<AppId, ApiError> {
        let raw = segs[..n].join("/");
        AppId::parse(&raw).map_err(|e| ApiError::MarathonInvalid(Invalid::at("/id", e)))
    };
    let n = segs.len();
    if n == 0 {
        return Err(ApiError::MarathonNotFound("URI not found".into()));
    }
    if segs[n - 1] == "*" {
        return Ok(Target::Group(format!("/{}", segs[..n - 1].join("/"))));
    }
    if n >= 2 && segs[n - 1] == "tasks" {
        return Ok(Target::Tasks(id(n - 1)?));
    }
    if n >= 3 && segs[n - 2] == "tasks" {
        return Ok(Target::Task(id(n - 2)?, TaskId::from(segs[n - 1])));
    }
    if n >= 2 && segs[n - 1] == "versions" {
        return Ok(Target::Versions(id(n - 1)?));
    }
    if n >= 3 && segs[n - 2] == "versions" {
        return Ok(Target::Version(id(n - 2)?, segs[n - 1].to_owned()));
    }
    if n >= 2 && segs[n - 1] == "restart" {
        return Ok(Target::Restart(id(n - 1)?));
    }
    Ok(Target::App(id(n)?))
}

fn no_app(id: &AppId) -> ApiError {
    ApiError::MarathonNotFound(format!("App '{id}' does not exist"))
}

async fn app_get(State(api): State<Api>, Path(rest): Path<String>, Query(q): Params) -> Result<Response, ApiError> {
    let state = api.control.state();
    match parse_target(&rest)? {
        Target::App(id) => {
            let rec = state.apps.get(&id).ok_or_else(|| no_app(&id))?;
            let mut embed = parse_embed(&q);
            embed.tasks = true;
            embed.failure = true;
            Ok(axum::Json(json!({"app": app_json(rec, &state, embed)})).into_response())
        }
        Target::Group(g) => {
            let embed = parse_embed(&q);
            let apps: Vec<Value> =
                state.apps.values().filter(|r| r.app.id.in_group(&g)).map(|r| app_json(r, &state, embed)).collect();
            Ok(axum::Json(json!({"*": apps})).into_response())
        }
        Target::Tasks(id) => {
            if !state.apps.contains_key(&id) {
                return Err(no_app(&id));
            }
            let tasks: Vec<Value> = state.app_tasks(&id).map(|t| task_json(t, &state)).collect();
            Ok(axum::Json(json!({"tasks": tasks})).into_response())
        }
        Target::Task(id, task) => {
            let t = state.tasks.get(&task).filter(|t| t.app_id.as_ref() == Some(&id));
            let t = t.ok_or_else(|| ApiError::MarathonNotFound(format!("Task '{task}' does not exist")))?;
            Ok(axum::Json(json!({"task": task_json(t, &state)})).into_response())
        }
        Target::Versions(id) => {
            let rec = state.apps.get(&id).ok_or_else(|| no_app(&id))?;
            let versions: Vec<String> = rec.versions.iter().rev().map(|(v, _)| iso8601(*v)).collect();
            Ok(axum::Json(json!({"versions": versions})).into_response())
        }
        Target::Version(id, v) => {
            let rec = state.apps.get(&id).ok_or_else(|| no_app(&id))?;
            let want = parse_iso8601(&v)
                .ok_or_else(|| ApiError::MarathonNotFound(format!("App '{id}' does not exist in version {v}")))?;
            let app = rec
                .versions
                .iter()
                .find(|(ts, _)| *ts == want)
                .map(|(_, a)| a)
                .ok_or_else(|| ApiError::MarathonNotFound(format!("App '{id}' does not exist in version {v}")))?;
            Ok(axum::Json(serde_json::to_value(app).unwrap_or(Value::Null)).into_response())
        }
        Target::Restart(_) => Err(ApiError::MarathonNotFound("URI not found".into())),
    }
}

async fn app_post(State(api): State<Api>, Path(rest): Path<String>, Query(q): Params) -> Result<Response, ApiError> {
    let Target::Restart(id) = parse_target(&rest)? else {
        return Err(ApiError::MarathonNotFound("URI not found".into()));
    };
    if !api.control.state().apps.contains_key(&id) {
        return Err(no_app(&id));
    }
    let now = api.control.now();
    let deployment_id = api.control.uuid().to_string();
    let force = flag(param(&q, "force"), false);
    api.control
        .propose(Command::RestartApp { id, now, deployment_id: deployment_id.clone(), force })
        .await
        .map_err(ApiError::from_control)?;
    Ok(deployment_result(&deployment_id, now))
}

async fn app_patch(
    State(api): State<Api>,
    Path(rest): Path<String>,
    Query(q): Params,
    body: Bytes,
) -> Result<Response, ApiError> {
    update_app(api, rest, q, body, true).await
}

/// `PUT /v2/apps` (create or update many) and `PATCH /v2/apps` (update many that exist):
/// every definition is validated first, then all changes go in as one deployment.
async fn bulk(api: &Api, q: &[(String, String)], body: &Bytes, must_exist: bool) -> Result<Response, ApiError> {
    let body = parse_body(body)?;
    let Some(list) = body.as_array() else {
        return Err(ApiError::MarathonBadJson { path: "/".into(), error: "error.expected.jsarray".into() });
    };
    if list.len() > limits::MAX_APPS_PER_REQUEST {
        return Err(ApiError::MarathonInvalid(Invalid::at(
            "/",
            format!("{} apps given; at most {} are allowed in one request", list.len(), limits::MAX_APPS_PER_REQUEST),
        )));
    }
    let partial = flag(param(q, "partialUpdate"), true);
    let force = flag(param(q, "force"), false);
    let state = api.control.state();
    let mut apps = Vec::new();
    for (i, item) in list.iter().enumerate() {
        let raw_id = item.get("id").and_then(Value::as_str).unwrap_or("");
        let id = AppId::parse(raw_id).map_err(|e| ApiError::MarathonInvalid(Invalid::at(&format!("/{i}/id"), e)))?;
        let existing = state.apps.get(&id);
        if must_exist && existing.is_none() {
            return Err(no_app(&id));
        }
        let app = match existing {
            Some(rec) if partial || must_exist => App::merge_json(Some(&rec.app), item, Some(&id)),
            _ => App::from_json(item, Some(&id)),
        }
        .map_err(|inv| invalid(inv.prefixed(&format!("/{i}"))))?;
        node_allows(api, &app, &format!("/{i}"))?;
        apps.push(app);
    }
    let now = api.control.now();
    let deployment_id = api.control.uuid().to_string();
    for app in apps {
        api.control
            .propose(Command::PutApp { app, now, deployment_id: deployment_id.clone(), create_only: false, force })
            .await
            .map_err(ApiError::from_control)?;
    }
    Ok(deployment_result(&deployment_id, now))
}

async fn apps_put(State(api): State<Api>, Query(q): Params, body: Bytes) -> Result<Response, ApiError> {
    bulk(&api, &q, &body, false).await
}

async fn apps_patch(State(api): State<Api>, Query(q): Params, body: Bytes) -> Result<Response, ApiError> {
    bulk(&api, &q, &body, true).await
}

/// `POST /v2/tasks/delete` with `{"ids": [...]}`: 400 on an unknown or invalid id, nothing killed.
async fn tasks_delete(State(api): State<Api>, Query(q): Params, body: Bytes) -> Result<Response, ApiError> {
    let body = parse_body(&body)?;
    let Some(ids) = body.get("ids").and_then(Value::as_array) else {
        return Err(ApiError::MarathonBadJson { path: "/ids".into(), error: "error.path.missing".into() });
    };
    let state = api.control.state();
    let mut tasks = Vec::new();
    for id in ids {
        let Some(id) = id.as_str() else {
            return Err(ApiError::MarathonBadJson { path: "/ids".into(), error: "error.expected.jsstring".into() });
        };
        match state.tasks.get(&TaskId::from(id)) {
            Some(t) => tasks.push(t),
            None => return Err(ApiError::MarathonBadRequest(format!("Task '{id}' does not exist"))),
        }
    }
    let scale = flag(param(&q, "scale"), false);
    kill_tasks(&api, &state, tasks, scale, api.control.now()).await
}

/// Dropwizard-shaped metrics.
async fn metrics(State(api): State<Api>) -> Response {
    let state = api.control.state();
    let running = state.tasks.values().filter(|t| t.state == TaskState::Running).count();
    let gauge = |v: usize| json!({"value": v});
    axum::Json(json!({
        "version": "4.0.0",
        "gauges": {
            "marathon.apps.active.gauge": gauge(state.apps.len()),
            "marathon.tasks.running.gauge": gauge(running),
            "marathon.tasks.staged.gauge": gauge(state.tasks.len() - running),
            "marathon.deployments.active.gauge": gauge(state.deployments.len()),
            "mesh.state.index.gauge": json!({"value": state.index}),
            "mesh.catalog.index.gauge": json!({"value": state.catalog.index}),
        },
        "counters": {},
        "histograms": {},
        "meters": {},
        "timers": {},
    }))
    .into_response()
}

async fn app_put(
    State(api): State<Api>,
    Path(rest): Path<String>,
    Query(q): Params,
    body: Bytes,
) -> Result<Response, ApiError> {
    update_app(api, rest, q, body, false).await
}

/// `PUT /v2/apps/{id}` (create, merge or replace; `{"version": v}` alone rolls back) and
/// `PATCH /v2/apps/{id}` (`patch`: the app must exist and the body is always merged).
async fn update_app(
    api: Api,
    rest: String,
    q: Vec<(String, String)>,
    body: Bytes,
    patch: bool,
) -> Result<Response, ApiError> {
    let Target::App(id) = parse_target(&rest)? else {
        return Err(ApiError::MarathonNotFound("URI not found".into()));
    };
    let body = parse_body(&body)?;
    let force = flag(param(&q, "force"), false);
    let partial = patch || flag(param(&q, "partialUpdate"), true);
    let now = api.control.now();
    let deployment_id = api.control.uuid().to_string();
    let state = api.control.state();
    let existing = state.apps.get(&id);
    if patch && existing.is_none() {
        return Err(no_app(&id));
    }
    // {"version": ts} alone is a rollback.
    if let Some(obj) = body.as_object()
        && obj.len() == 1
        && let Some(v) = obj.get("version").and_then(Value::as_str)
    {
        existing.ok_or_else(|| no_app(&id))?;
        let version = parse_iso8601(v)
            .ok_or_else(|| ApiError::MarathonNotFound(format!("App '{id}' does not exist in version {v}")))?;
        api.control
            .propose(Command::RollbackApp { id: id.clone(), version, now, deployment_id: deployment_id.clone(), force })
            .await
            .map_err(ApiError::from_control)?;
        return Ok(deployment_result(&deployment_id, now));
    }
    let app = match existing {
        Some(rec) if partial => App::merge_json(Some(&rec.app), &body, Some(&id)),
        _ => App::from_json(&body, Some(&id)),
    }
    .map_err(invalid)?;
    node_allows(&api, &app, "")?;
    let created = existing.is_none();
    api.control
        .propose(Command::PutApp { app, now, deployment_id: deployment_id.clone(), create_only: false, force })
        .await
        .map_err(ApiError::from_control)?;
    let mut r = deployment_result(&deployment_id, now);
    if created {
        *r.status_mut() = StatusCode::CREATED;
    }
    Ok(r)
}

async fn app_delete(State(api): State<Api>, Path(rest): Path<String>, Query(q): Params) -> Result<Response, ApiError> {
    let now = api.control.now();
    let state = api.control.state();
    match parse_target(&rest)? {
        Target::App(id) => {
            if !state.apps.contains_key(&id) {
                return Err(no_app(&id));
            }
            let deployment_id = api.control.uuid().to_string();
            let force = flag(param(&q, "force"), true);
            api.control
                .propose(Command::DeleteApp { id, now, deployment_id: deployment_id.clone(), force })
                .await
                .map_err(ApiError::from_control)?;
            Ok(deployment_result(&deployment_id, now))
        }
        Target::Tasks(id) => {
            if !state.apps.contains_key(&id) {
                return Err(no_app(&id));
            }
            let scale = flag(param(&q, "scale"), false);
            let wipe = flag(param(&q, "wipe"), false);
            if scale && wipe {
                return Err(ApiError::MarathonBadRequest("You cannot use scale and wipe at the same time.".into()));
            }
            let host = param(&q, "host");
            let tasks: Vec<&Task> = state.active_tasks(&id).filter(|t| host.is_none_or(|h| &t.host == h)).collect();
            kill_tasks(&api, &state, tasks, scale, now).await
        }
        Target::Task(id, task) => {
            let t = state.tasks.get(&task).filter(|t| t.app_id.as_ref() == Some(&id));
            let t = t.ok_or_else(|| ApiError::MarathonNotFound(format!("Task '{task}' does not exist")))?;
            let scale = flag(param(&q, "scale"), false);
            let wipe = flag(param(&q, "wipe"), false);
            if scale && wipe {
                return Err(ApiError::MarathonBadRequest("You cannot use scale and wipe at the same time.".into()));
            }
            let r = kill_tasks(&api, &state, vec![t], scale, now).await?;
            if scale {
                return Ok(r);
            }
            Ok(axum::Json(json!({"task": task_json(t, &state)})).into_response())
        }
        _ => Err(ApiError::MarathonNotFound("URI not found".into())),
    }
}

async fn kill_tasks(
    api: &Api,
    state: &Cluster,
    tasks: Vec<&Task>,
    scale: bool,
    now: u64,
) -> Result<Response, ApiError> {
    let ids: Vec<TaskId> = tasks.iter().map(|t| t.id.clone()).collect();
    let deployment_id = scale.then(|| api.control.uuid().to_string());
    if !ids.is_empty() {
        api.control
            .propose(Command::KillTasks { ids, scale, now, deployment_id: deployment_id.clone() })
            .await
            .map_err(ApiError::from_control)?;
    }
    match deployment_id {
        Some(d) => Ok(deployment_result(&d, now)),
        None => {
            Ok(axum::Json(json!({"tasks": tasks.iter().map(|t| task_json(t, state)).collect::<Vec<_>>()}))
                .into_response())
        }
    }
}

async fn list_tasks(State(api): State<Api>, Query(q): Params) -> Response {
    let state = api.control.state();
    let wanted: Vec<String> = params(&q, "status").map(|s| s.to_ascii_lowercase()).collect();
    let tasks: Vec<TaskView> = state
        .tasks
        .values()
        .filter(|t| t.app_id.is_some())
        .filter(|t| {
            wanted.is_empty()
                || wanted.iter().any(|w| match w.as_str() {
                    "running" => t.state == TaskState::Running,
                    "staging" => matches!(t.state, TaskState::Staging | TaskState::Starting),
                    _ => false,
                })
        })
        .map(|t| TaskView::new(t, &state))
        .collect();
    #[derive(serde::Serialize)]
    struct Tasks<'a> {
        tasks: Vec<TaskView<'a>>,
    }
    axum::Json(Tasks { tasks }).into_response()
}

async fn info(State(api): State<Api>) -> Response {
    let i = &api.info;
    let port: u16 = i.http_addr.rsplit(':').next().and_then(|p| p.parse().ok()).unwrap_or(8080);
    // Not elected while the state store cannot be written (as a Marathon without a leader).
    let elected = api.control.store_failure().is_none();
    axum::Json(json!({
        "name": "mesh",
        "version": "1.10.0",
        "buildref": env!("CARGO_PKG_VERSION"),
        "elected": elected,
        "leader": elected.then_some(i.http_addr.as_str()),
        "frameworkId": "marathon",
        "marathon_config": {
            "checkpoint": true,
            "executor": "//cmd",
            "failover_timeout": 604800,
            "framework_name": "marathon",
            "ha": false,
            "hostname": i.node,
            "local_port_min": 10000,
            "local_port_max": 20000,
            "master": format!("local://{}", i.node),
            "mesos_role": "*",
            "mesos_user": "root",
            "task_launch_timeout": 300000,
            "features": [],
            "decline_offer_duration": 120000,
            "env_vars_prefix": "",
            "revive_offers_for_new_apps": true,
        },
        "zookeeper_config": {
            "zk": "",
            "zk_hosts": "",
            "zk_path": "",
            "zk_timeout": 10000,
            "zk_session_timeout": 10000,
            "zk_max_versions": api.control.state().keep_versions(),
        },
        "http_config": {
            "http_port": port,
            "https_port": 0,
            "assets_path": null,
        },
    }))
    .into_response()
}

/// `DELETE /v2/leader`. A single control node abdicates and is at once elected again: the
/// answer is Marathon's, and nothing else changes.
async fn abdicate() -> Response {
    axum::Json(json!({"message": "Leadership abdicated"})).into_response()
}

async fn leader(State(api): State<Api>) -> Response {
    match &api.raft {
        Some(raft) => match raft.leader_http(&api.info.http_addr) {
            Some(l) => axum::Json(json!({"leader": l})).into_response(),
            // Marathon's answer while no leader is elected.
            None => (axum::http::StatusCode::NOT_FOUND, axum::Json(json!({"message": "There is no leader"})))
                .into_response(),
        },
        None => axum::Json(json!({"leader": api.info.http_addr})).into_response(),
    }
}

/// Why an app of a deployment step has not reached its goal yet (for `?embed=reasons`).
fn waiting_reason(
    state: &Cluster,
    stats: &imbl::OrdMap<AppId, mesh_core::scheduler::OfferStats>,
    app: &AppId,
    now: mesh_core::model::Millis,
) -> String {
    let Some(rec) = state.apps.get(app) else {
        let left = state.app_tasks(app).count();
        return if left == 0 { "done".into() } else { format!("waiting for {left} task(s) to stop") };
    };
    if MarathonScheduler::gated(state, rec) {
        return "waiting for its dependencies (an earlier step)".into();
    }
    if rec.delay.until > now {
        return format!("launch delayed for {} s after failures (backoff)", (rec.delay.until - now).div_ceil(1000));
    }
    let wanted = MarathonScheduler::wanted(state, rec);
    if wanted > 0 {
        let top =
            stats.get(app).and_then(|s| s.rejected.iter().max_by_key(|(_, n)| **n).map(|(r, n)| (r.as_str(), *n)));
        return match top {
            Some((r, n)) => format!("{wanted} task(s) waiting for offers: {r} ({n} offers declined)"),
            None => format!("{wanted} task(s) waiting for offers"),
        };
    }
    let tasks: Vec<&Task> = state.app_tasks(app).collect();
    let healthy =
        tasks.iter().filter(|t| mesh_core::scheduler::healthy(t, &rec.app) && t.version == rec.config_version).count();
    format!(
        "{healthy} of {} task(s) of the new version running and healthy; {} task(s) in total",
        rec.app.instances,
        tasks.len()
    )
}

async fn deployments(State(api): State<Api>, Query(q): Params) -> Response {
    let with_reasons = params(&q, "embed").any(|e| e == "reasons");
    let stats = api.control.published.offer_stats.load();
    let state = api.control.state();
    let list: Vec<Value> = state
        .deployments
        .values()
        .map(|d| {
            let steps: Vec<Value> = d
                .steps
                .iter()
                .map(|s| json!({"actions": s.iter().map(|a| json!({"action": a.action, "app": a.app})).collect::<Vec<_>>()}))
                .collect();
            let current: Vec<Value> = d
                .steps
                .get(d.current_step.saturating_sub(1))
                .map(|s| {
                    s.iter()
                        .map(|a| {
                            let mut v = json!({"action": a.action, "app": a.app, "readinessCheckResults": []});
                            // Only on request: marathon-python rejects fields it does not know.
                            if with_reasons {
                                v["reason"] = Value::from(waiting_reason(&state, &stats, &a.app, api.control.now()));
                            }
                            v
                        })
                        .collect()
                })
                .unwrap_or_default();
            json!({
                "id": d.id,
                "version": iso8601(d.version),
                "affectedApps": d.affected_apps,
                "affectedPods": [],
                "steps": steps,
                "currentActions": current,
                "currentStep": d.current_step,
                "totalSteps": d.steps.len(),
            })
        })
        .collect();
    axum::Json(Value::Array(list)).into_response()
}

async fn queue(State(api): State<Api>, Query(q): Params) -> Response {
    let with_offers = params(&q, "embed").any(|e| e == "lastUnusedOffers");
    let state = api.control.state();
    let stats = api.control.published.offer_stats.load();
    let now = api.control.now();
    let mut items = Vec::new();
    for (id, rec) in state.apps.iter() {
        let count = MarathonScheduler::wanted(&state, rec);
        if count == 0 {
            continue;
        }
        let left_ms = rec.delay.until.saturating_sub(now);
        let st = stats.get(id);
        let mut reasons: HashMap<&str, u64> = HashMap::new();
        let processed = st.map(|s| s.processed).unwrap_or(0);
        if let Some(s) = st {
            for (r, n) in &s.rejected {
                reasons.insert(r.as_str(), *n);
            }
        }
        let summary: Vec<Value> = [
            "UnfulfilledRole",
            "UnfulfilledConstraint",
            "NoCorrespondingReservationFound",
            "AgentMaintenance",
            "InsufficientCpus",
            "InsufficientMemory",
            "InsufficientDisk",
            "InsufficientGpus",
            "InsufficientPorts",
            "DeclinedScarceResources",
            "NoDockerRuntime",
        ]
        .iter()
        .map(|r| json!({"reason": r, "declined": reasons.get(r).copied().unwrap_or(0), "processed": processed}))
        .collect();
        let declined: u64 = reasons.values().sum();
        let mut offers = json!({
            "processedOffersCount": processed,
            "unusedOffersCount": declined,
            "rejectSummaryLastOffers": summary.clone(),
            "rejectSummaryLaunchAttempt": summary,
        });
        if let Some(at) = st.and_then(|s| s.last_offer_at) {
            offers["lastUnusedOfferAt"] = Value::from(iso8601(at));
        }
        let mut extra = serde_json::Map::new();
        if with_offers {
            let offers: Vec<Value> = st
                .map(|s| {
                    s.last_unused
                        .iter()
                        .map(|u| {
                            json!({
                                "offer": {
                                    "id": u.offer_id, "agentId": u.agent_id, "hostname": u.hostname,
                                    "resources": [
                                        {"name": "cpus", "scalar": u.resources.cpus, "role": "*"},
                                        {"name": "mem", "scalar": u.resources.mem, "role": "*"},
                                        {"name": "disk", "scalar": u.resources.disk, "role": "*"},
                                        {"name": "ports", "ranges": u.resources.ports.ranges().iter().map(|(b, e)| json!({"begin": b, "end": e})).collect::<Vec<_>>(), "role": "*"},
                                    ],
                                    "attributes": [],
                                },
                                "timestamp": iso8601(u.at),
                                "reason": [u.reason.as_str()],
                            })
                        })
                        .collect()
                })
                .unwrap_or_default();
            extra.insert("lastUnusedOffers".into(), Value::Array(offers));
        }
        items.push(json!({
            "app": app_json(rec, &state, Embed::default()),
            "count": count,
            "delay": {"timeLeftSeconds": left_ms / 1000, "overdue": left_ms == 0},
            "since": iso8601(rec.version),
            "processedOffersSummary": offers,
        }));
        if let Some(Value::Object(item)) = items.last_mut() {
            item.extend(extra);
        }
    }
    axum::Json(json!({"queue": items})).into_response()
}

async fn queue_delete(State(api): State<Api>, Path(rest): Path<String>) -> Result<Response, ApiError> {
    let Some(app) = rest.strip_suffix("/delay") else {
        return Err(ApiError::MarathonNotFound("URI not found".into()));
    };
    let id = AppId::parse(app).map_err(|e| ApiError::MarathonInvalid(Invalid::at("/id", e)))?;
    api.control.propose(Command::ResetDelay { id }).await.map_err(ApiError::from_control)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}
