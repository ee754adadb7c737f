//! Marathon groups (`/v2/groups`) and deployment cancellation (`DELETE /v2/deployments/{id}`).
//!
//! Groups are implied by app ids (`/prod/web` lies in `/prod`) and may also be created
//! explicitly, with dependencies. A group change is one deployment whose steps follow the
//! apps' `dependencies`: an app starts only once the apps it depends on are healthy.

use super::marathon::{deployment_result, invalid, param, parse_body};
use super::{Api, ApiError, flag};
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use mesh_core::app::{App, AppId, Invalid, limits};
use mesh_core::model::iso8601;
use mesh_core::runtime::HostAccess;
use mesh_core::state::{Command, GroupRecord, State as Cluster, parent_of};
use serde_json::{Value, json};
use std::collections::BTreeSet;

type Params = Query<Vec<(String, String)>>;

/// Routes of groups and deployment deletion.
pub fn routes() -> Router<Api> {
    Router::new()
        .route("/v2/groups", get(get_root).post(create_group).put(put_root).delete(delete_root))
        .route("/v2/groups/{*rest}", get(get_group).put(put_group).delete(delete_group).post(create_in_group))
        .route("/v2/deployments/{id}", delete(delete_deployment))
        .route_layer(axum::middleware::from_fn(super::marathon::json_bodies_only))
}

fn with_status(mut r: Response, status: StatusCode) -> Response {
    *r.status_mut() = status;
    r
}

fn normalize_group(raw: &str, base: &str) -> Result<String, ApiError> {
    let raw = raw.trim();
    if raw.is_empty() || raw == "/" {
        return Ok("/".into());
    }
    AppId::parse_relative(raw, base)
        .map(|id| id.to_string())
        .map_err(|e| ApiError::MarathonInvalid(Invalid::at("/id", e)))
}

/// Every group id that exists: explicit ones and the ancestors of every app.
fn all_groups(state: &Cluster) -> BTreeSet<String> {
    let mut out: BTreeSet<String> = BTreeSet::new();
    out.insert("/".into());
    let mut add_with_parents = |g: &str| {
        let mut cur = g.to_owned();
        while cur != "/" && !cur.is_empty() {
            out.insert(cur.clone());
            cur = match cur.rsplit_once('/') {
                Some(("", _)) | None => "/".into(),
                Some((p, _)) => p.to_owned(),
            };
        }
    };
    for g in state.groups.keys() {
        add_with_parents(g);
    }
    for a in state.apps.keys() {
        add_with_parents(&parent_of(a));
    }
    out
}

fn group_parent(g: &str) -> String {
    match g.rsplit_once('/') {
        Some(("", _)) | None => "/".into(),
        Some((p, _)) => p.to_owned(),
    }
}

fn group_json(state: &Cluster, g: &str, groups: &BTreeSet<String>) -> Value {
    let apps: Vec<Value> = state
        .apps
        .values()
        .filter(|r| parent_of(&r.app.id) == g)
        .map(|r| serde_json::to_value(&r.app).unwrap_or(Value::Null))
        .collect();
    let subgroups: Vec<Value> = groups
        .iter()
        .filter(|c| c.as_str() != "/" && group_parent(c) == g)
        .map(|c| group_json(state, c, groups))
        .collect();
    let rec = state.groups.get(g);
    let version = rec
        .map(|r| r.version)
        .into_iter()
        .chain(state.apps.values().filter(|r| r.app.id.in_group(g)).map(|r| r.version))
        .max()
        .unwrap_or(0);
    json!({
        "id": g,
        "apps": apps,
        "groups": subgroups,
        "pods": [],
        "dependencies": rec.map(|r| r.dependencies.clone()).unwrap_or_default(),
        "version": iso8601(version),
    })
}

async fn get_root(State(api): State<Api>) -> Response {
    let state = api.control.state();
    let groups = all_groups(&state);
    axum::Json(group_json(&state, "/", &groups)).into_response()
}

async fn get_group(State(api): State<Api>, Path(rest): Path<String>) -> Result<Response, ApiError> {
    let state = api.control.state();
    let groups = all_groups(&state);
    if let Some(g) = rest.strip_suffix("/versions") {
        let g = normalize_group(g, "/")?;
        if !groups.contains(&g) {
            return Err(ApiError::MarathonNotFound(format!("Group '{g}' does not exist")));
        }
        let v = group_json(&state, &g, &groups)["version"].clone();
        return Ok(axum::Json(json!([v])).into_response());
    }
    let g = normalize_group(&rest, "/")?;
    if !groups.contains(&g) {
        return Err(ApiError::MarathonNotFound(format!("Group '{g}' does not exist")));
    }
    Ok(axum::Json(group_json(&state, &g, &groups)).into_response())
}

/// A group update flattened into apps to put, explicit groups to record, and the set of app
/// ids the update covers (for removing apps it no longer lists).
struct Flat {
    apps: Vec<App>,
    groups: Vec<GroupRecord>,
    /// Groups whose `apps` list was given: apps under them that are not listed are removed.
    listed: Vec<(String, BTreeSet<AppId>)>,
}

/// Limits of one group update, besides those of each app definition.
fn too_many(path: String, n: usize, what: &str) -> ApiError {
    ApiError::MarathonInvalid(Invalid::at(
        &path,
        format!("{n} {what} given; at most {} are allowed in one request", limits::MAX_APPS_PER_REQUEST),
    ))
}

fn flatten(
    body: &Value,
    group: &str,
    cx: (&Cluster, &HostAccess),
    now: u64,
    path: &str,
    out: &mut Flat,
) -> Result<(), ApiError> {
    let (state, access) = cx;
    let Some(obj) = body.as_object() else {
        return Err(ApiError::MarathonBadJson { path: path.into(), error: "error.expected.jsobject".into() });
    };
    if let Some(d) = obj.get("dependencies").and_then(Value::as_array)
        && d.len() > limits::MAX_LIST
    {
        return Err(ApiError::MarathonInvalid(Invalid::at(
            &format!("{path}dependencies"),
            format!("{} dependencies given; at most {} are allowed", d.len(), limits::MAX_LIST),
        )));
    }
    let deps: Vec<String> = obj
        .get("dependencies")
        .and_then(Value::as_array)
        .map(|d| d.iter().filter_map(Value::as_str).map(str::to_owned).collect())
        .unwrap_or_default();
    if group != "/" {
        out.groups.push(GroupRecord { id: group.to_owned(), dependencies: deps.clone(), version: now });
    }
    if let Some(apps) = obj.get("apps").filter(|v| !v.is_null()) {
        let Some(list) = apps.as_array() else {
            return Err(ApiError::MarathonBadJson {
                path: format!("{path}apps"),
                error: "error.expected.jsarray".into(),
            });
        };
        if out.apps.len() + list.len() > limits::MAX_APPS_PER_REQUEST {
            return Err(too_many(format!("{path}apps"), out.apps.len() + list.len(), "apps"));
        }
        let mut ids = BTreeSet::new();
        for (i, a) in list.iter().enumerate() {
            let raw = a.get("id").and_then(Value::as_str).unwrap_or("");
            let id = AppId::parse_relative(raw, group)
                .map_err(|e| ApiError::MarathonInvalid(Invalid::at(&format!("{path}apps({i})/id"), e)))?;
            if !id.in_group(group) {
                return Err(ApiError::MarathonInvalid(Invalid::at(
                    &format!("{path}apps({i})/id"),
                    format!("identifier {id} is not child of {group}. Hint: use relative paths."),
                )));
            }
            let mut a = a.clone();
            // Group-level dependencies apply to every app of the group.
            if !deps.is_empty() {
                let mut d: Vec<Value> = a.get("dependencies").and_then(Value::as_array).cloned().unwrap_or_default();
                d.extend(deps.iter().map(|x| Value::from(x.as_str())));
                a["dependencies"] = Value::Array(d);
            }
            let app = match state.apps.get(&id) {
                Some(rec) => App::merge_json(Some(&rec.app), &a, Some(&id)),
                None => App::from_json(&a, Some(&id)),
            }
            .map_err(|inv| invalid(inv.prefixed(&format!("{path}apps({i})"))))?;
            app.check_host_access(access)
                .map_err(|inv| ApiError::MarathonInvalid(inv.prefixed(&format!("{path}apps({i})"))))?;
            ids.insert(id);
            out.apps.push(app);
        }
        out.listed.push((group.to_owned(), ids));
    }
    if let Some(groups) = obj.get("groups").filter(|v| !v.is_null()) {
        let Some(list) = groups.as_array() else {
            return Err(ApiError::MarathonBadJson {
                path: format!("{path}groups"),
                error: "error.expected.jsarray".into(),
            });
        };
        if out.groups.len() + list.len() > limits::MAX_APPS_PER_REQUEST {
            return Err(too_many(format!("{path}groups"), out.groups.len() + list.len(), "groups"));
        }
        for (i, g) in list.iter().enumerate() {
            let raw = g.get("id").and_then(Value::as_str).unwrap_or("");
            let child = normalize_group(raw, group)?;
            if child == group || !AppId::parse(&child).is_ok_and(|c| c.in_group(group)) {
                return Err(ApiError::MarathonInvalid(Invalid::at(
                    &format!("{path}groups({i})/id"),
                    format!("identifier {child} is not child of {group}. Hint: use relative paths."),
                )));
            }
            flatten(g, &child, cx, now, &format!("{path}groups({i})/"), out)?;
        }
    }
    Ok(())
}

async fn change_group(
    api: &Api,
    group: String,
    body: Value,
    q: &[(String, String)],
    create: bool,
) -> Result<Response, ApiError> {
    let state = api.control.state();
    let now = api.control.now();
    let force = flag(param(q, "force"), false);
    let deployment_id = api.control.uuid().to_string();
    // {"scaleBy": f}: scale every app of the group.
    if let Some(f) = body.get("scaleBy").filter(|_| !create) {
        let f = f
            .as_f64()
            .filter(|f| *f >= 0.0 && f.is_finite())
            .ok_or_else(|| ApiError::MarathonInvalid(Invalid::at("/scaleBy", "must be a number, 0 or more")))?;
        if !state.group_exists(&group) {
            return Err(ApiError::MarathonNotFound(format!("Group '{group}' does not exist")));
        }
        let mut apps = Vec::new();
        for r in state.apps.values().filter(|r| r.app.id.in_group(&group) || group == "/") {
            let n = (r.app.instances as f64 * f).ceil();
            if n > limits::MAX_INSTANCES {
                return Err(ApiError::MarathonInvalid(Invalid::at(
                    "/scaleBy",
                    format!("would scale {} to {n} instances; at most {} are allowed", r.app.id, limits::MAX_INSTANCES),
                )));
            }
            let mut a = r.app.clone();
            a.instances = n as u32;
            apps.push(a);
        }
        let cmd = Command::PutGroup {
            group,
            apps,
            remove: vec![],
            groups: vec![],
            now,
            deployment_id: deployment_id.clone(),
            create_only: false,
            force,
        };
        api.control.propose(cmd).await.map_err(ApiError::from_control)?;
        return Ok(deployment_result(&deployment_id, now));
    }
    if body.get("version").is_some() && body.as_object().is_some_and(|o| o.len() == 1) {
        return Err(ApiError::MarathonInvalid(Invalid::at(
            "/version",
            "rolling back a whole group is not supported; roll back its apps",
        )));
    }
    let mut flat = Flat { apps: Vec::new(), groups: Vec::new(), listed: Vec::new() };
    flatten(&body, &group, (&state, &api.info.host_access), now, "/", &mut flat)?;
    let mut remove = Vec::new();
    if !create {
        for (g, ids) in &flat.listed {
            for id in state.apps.keys().filter(|a| parent_of(a) == *g && !ids.contains(a)) {
                remove.push(id.clone());
            }
        }
    }
    let existed = state.group_exists(&group);
    let group_id = group.clone();
    let cmd = Command::PutGroup {
        group,
        apps: flat.apps,
        remove,
        groups: flat.groups,
        now,
        deployment_id: deployment_id.clone(),
        create_only: create,
        force,
    };
    if let Err(e) = api.control.propose(cmd).await {
        let reason = e.to_string();
        let body = json!({"groupId": group_id, "version": iso8601(now), "reason": reason});
        api.control.published.events.publish(crate::events::Event::new("group_change_failed", body, now));
        return Err(ApiError::from_control(e));
    }
    let status = if create || !existed { StatusCode::CREATED } else { StatusCode::OK };
    Ok(with_status(deployment_result(&deployment_id, now), status))
}

async fn create_group(State(api): State<Api>, Query(q): Params, body: Bytes) -> Result<Response, ApiError> {
    let body = parse_body(&body)?;
    let raw = body.get("id").and_then(Value::as_str).unwrap_or("");
    if raw.is_empty() {
        return Err(ApiError::MarathonInvalid(Invalid::at("/id", "error.path.missing")));
    }
    let group = normalize_group(raw, "/")?;
    change_group(&api, group, body, &q, true).await
}

async fn create_in_group(
    State(api): State<Api>,
    Path(rest): Path<String>,
    Query(q): Params,
    body: Bytes,
) -> Result<Response, ApiError> {
    let body = parse_body(&body)?;
    let base = normalize_group(&rest, "/")?;
    let raw = body.get("id").and_then(Value::as_str).unwrap_or("");
    let group = normalize_group(raw, &base)?;
    change_group(&api, group, body, &q, true).await
}

async fn put_root(State(api): State<Api>, Query(q): Params, body: Bytes) -> Result<Response, ApiError> {
    let body = parse_body(&body)?;
    change_group(&api, "/".into(), body, &q, false).await
}

async fn put_group(
    State(api): State<Api>,
    Path(rest): Path<String>,
    Query(q): Params,
    body: Bytes,
) -> Result<Response, ApiError> {
    let body = parse_body(&body)?;
    let group = normalize_group(&rest, "/")?;
    change_group(&api, group, body, &q, false).await
}

async fn remove_group(api: &Api, group: String, q: &[(String, String)]) -> Result<Response, ApiError> {
    let now = api.control.now();
    let deployment_id = api.control.uuid().to_string();
    let force = flag(param(q, "force"), false);
    let cmd = Command::DeleteGroup { group, now, deployment_id: deployment_id.clone(), force };
    api.control.propose(cmd).await.map_err(ApiError::from_control)?;
    Ok(deployment_result(&deployment_id, now))
}

async fn delete_root(State(api): State<Api>, Query(q): Params) -> Result<Response, ApiError> {
    remove_group(&api, "/".into(), &q).await
}

async fn delete_group(
    State(api): State<Api>,
    Path(rest): Path<String>,
    Query(q): Params,
) -> Result<Response, ApiError> {
    let group = normalize_group(&rest, "/")?;
    remove_group(&api, group, &q).await
}

/// `DELETE /v2/deployments/{id}`: roll back (a new deployment restores the apps as they were),
/// or with `force=true` just stop it (202, empty body).
async fn delete_deployment(
    State(api): State<Api>,
    Path(id): Path<String>,
    Query(q): Params,
) -> Result<Response, ApiError> {
    if !api.control.state().deployments.contains_key(&id) {
        return Err(ApiError::MarathonNotFound(format!("DeploymentPlan {id} does not exist")));
    }
    if flag(param(&q, "force"), false) {
        api.control.propose(Command::EndDeployment { id }).await.map_err(ApiError::from_control)?;
        return Ok(StatusCode::ACCEPTED.into_response());
    }
    let now = api.control.now();
    let deployment_id = api.control.uuid().to_string();
    api.control
        .propose(Command::RollbackDeployment { id, deployment_id: deployment_id.clone(), now })
        .await
        .map_err(ApiError::from_control)?;
    Ok(deployment_result(&deployment_id, now))
}
