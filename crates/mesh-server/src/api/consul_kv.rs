//! Consul's `/v1/kv` and `/v1/session` endpoints over [`mesh_core::kv`].
//!
//! Reads answer from the published state (blocking with `?index=&wait=` on the key, the prefix
//! or the sessions); writes go through the control loop as `Command::Kv` / `Command::Session`
//! and answer once durable and visible, with Consul's `true`/`false`.

use super::consul_blocking::{Blocking, blocking, check_dc, wait_for, with_index};
use super::consul_json::{CiObject, parse_body};
use super::{Api, ApiError, flag};
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use futures_util::StreamExt;
use mesh_core::kv::{
    Behavior, DEFAULT_LOCK_DELAY_NS, KvEntry, KvError, KvOp, KvValue, MAX_VALUE_SIZE, Session, SessionOp, SetMode,
    parse_lock_delay, parse_ttl,
};
use mesh_core::model::now_millis;
use mesh_core::state::{ApplyError, Command};
use serde_json::{Value, json};
use std::collections::HashMap;

use crate::control::ControlError;

/// Routes of the KV and session API.
pub fn routes() -> Router<Api> {
    Router::new()
        .route("/v1/kv/{*key}", get(kv_get).put(kv_put).delete(kv_delete))
        .route("/v1/kv/", get(kv_get_root).put(kv_put_root).delete(kv_delete_root))
        .route("/v1/kv", get(kv_get_root).put(kv_put_root).delete(kv_delete_root))
        .route("/v1/session/create", put(session_create))
        .route("/v1/session/destroy/{id}", put(session_destroy))
        .route("/v1/session/renew/{id}", put(session_renew))
        .route("/v1/session/info/{id}", get(session_info))
        .route("/v1/session/node/{node}", get(session_node))
        .route("/v1/session/list", get(session_list))
}

type Q = Query<HashMap<String, String>>;

/// The blocking topic of a KV prefix (or key).
pub fn kv_topic(prefix: &str) -> String {
    format!("kv:{prefix}")
}

/// The blocking topic of the sessions.
pub const SESSIONS_TOPIC: &str = "sessions";

fn json_indexed(body: Value, index: u64, q: &HashMap<String, String>) -> Response {
    with_index(axum::Json(body).into_response(), index, q)
}

fn not_found_indexed(index: u64, q: &HashMap<String, String>) -> Response {
    with_index(StatusCode::NOT_FOUND.into_response(), index, q)
}

fn entry_json(e: &KvEntry) -> Value {
    let mut v = json!({
        "LockIndex": e.lock_index,
        "Key": e.key,
        "Flags": e.flags,
        "Value": if e.value.as_bytes().is_empty() { Value::Null } else { Value::String(e.value.to_base64()) },
        "CreateIndex": e.create_index,
        "ModifyIndex": e.modify_index,
    });
    if let Some(s) = &e.session {
        v["Session"] = json!(s);
    }
    v
}

fn session_json(s: &Session) -> Value {
    json!({
        "ID": s.id,
        "Name": s.name,
        "Node": s.node,
        "LockDelay": s.lock_delay_ns,
        "Behavior": s.behavior.as_str(),
        "TTL": s.ttl,
        "NodeChecks": s.node_checks,
        "ServiceChecks": if s.service_checks.is_empty() {
            Value::Null
        } else {
            s.service_checks.iter().map(|id| json!({"ID": id, "Namespace": ""})).collect()
        },
        "CreateIndex": s.create_index,
        "ModifyIndex": s.modify_index,
    })
}

/// Map a refused KV/session command: `Ok(false)` when Consul answers `false`.
fn outcome(r: Result<(), ControlError>) -> Result<bool, ApiError> {
    match r {
        Ok(()) => Ok(true),
        Err(ControlError::Rejected(ApplyError::Kv(KvError::NotApplied))) => Ok(false),
        Err(e) => Err(ApiError::from_consul(e)),
    }
}

// ---- KV ----

async fn kv_get(State(api): State<Api>, Path(key): Path<String>, Query(q): Q) -> Result<Response, ApiError> {
    kv_read(api, key, q).await
}

async fn kv_get_root(State(api): State<Api>, Query(q): Q) -> Result<Response, ApiError> {
    kv_read(api, String::new(), q).await
}

async fn kv_read(api: Api, key: String, q: HashMap<String, String>) -> Result<Response, ApiError> {
    check_dc(&api, &q)?;
    let b: Option<Blocking> = blocking(&q)?;
    if flag(q.get("keys"), false) {
        let sep = q.get("separator").or_else(|| q.get("seperator")).cloned().unwrap_or_default();
        let state = wait_for(&api, b, &kv_topic(&key), |s| s.kv.prefix_index(&key)).await;
        let index = state.kv.prefix_index(&key);
        let keys = state.kv.keys(&key, &sep);
        if keys.is_empty() && !key.is_empty() {
            return Ok(not_found_indexed(index, &q));
        }
        return Ok(json_indexed(json!(keys), index, &q));
    }
    if flag(q.get("recurse"), false) {
        let state = wait_for(&api, b, &kv_topic(&key), |s| s.kv.prefix_index(&key)).await;
        let index = state.kv.prefix_index(&key);
        let list: Vec<Value> = state.kv.list(&key).map(entry_json).collect();
        if list.is_empty() {
            return Ok(not_found_indexed(index, &q));
        }
        return Ok(json_indexed(Value::Array(list), index, &q));
    }
    if key.is_empty() {
        return Err(ApiError::ConsulBadRequest("Missing key name".into()));
    }
    // A single key watches exactly that key (the topic covers the prefix; the check is exact).
    let state = wait_for(&api, b, &kv_topic(&key), |s| s.kv.key_index(&key)).await;
    let index = state.kv.key_index(&key);
    let Some(e) = state.kv.get(&key) else { return Ok(not_found_indexed(index, &q)) };
    if flag(q.get("raw"), false) {
        let mut r = Bytes::copy_from_slice(e.value.as_bytes()).into_response();
        let h = r.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        h.insert("X-Content-Type-Options", HeaderValue::from_static("nosniff"));
        h.insert("Content-Security-Policy", HeaderValue::from_static("sandbox"));
        return Ok(with_index(r, index, &q));
    }
    Ok(json_indexed(json!([entry_json(e)]), index, &q))
}

/// 400 when more than one of `flags` is present (Consul's "Conflicting flags").
fn conflicting(q: &HashMap<String, String>, raw: &Option<String>, flags: &[&str]) -> Result<(), ApiError> {
    if flags.iter().filter(|f| q.contains_key(**f)).count() > 1 {
        return Err(ApiError::ConsulBadRequest(format!("Conflicting flags: {}", raw.as_deref().unwrap_or(""))));
    }
    Ok(())
}

fn parse_u64(q: &HashMap<String, String>, name: &str) -> Result<Option<u64>, ApiError> {
    match q.get(name) {
        None => Ok(None),
        Some(v) => v
            .trim()
            .parse::<u64>()
            .map(Some)
            .map_err(|_| ApiError::ConsulBadRequest(format!("Invalid {name}: {v:?} is not an unsigned integer"))),
    }
}

/// Read a KV value, refusing anything over [`MAX_VALUE_SIZE`] before it is all in memory.
async fn read_value(headers: &HeaderMap, body: Body) -> Result<Vec<u8>, ApiError> {
    let too_large = |n: Option<u64>| {
        let size = n.map(|n| format!("({n} bytes) ")).unwrap_or_default();
        ApiError::ConsulTooLarge(format!(
            "Request body{size}too large, max size: {MAX_VALUE_SIZE} bytes. KV values are limited to 512 KiB."
        ))
    };
    let declared = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok());
    if declared.is_some_and(|n: u64| n > MAX_VALUE_SIZE as u64) {
        return Err(too_large(declared));
    }
    let mut out = Vec::new();
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| ApiError::ConsulBadRequest(format!("Request body read failed: {e}")))?;
        if out.len() + chunk.len() > MAX_VALUE_SIZE {
            return Err(too_large(None));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

async fn kv_put(
    State(api): State<Api>,
    Path(key): Path<String>,
    Query(q): Q,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    kv_write(api, key, q, raw, headers, body).await
}

async fn kv_put_root(
    State(api): State<Api>,
    Query(q): Q,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    kv_write(api, String::new(), q, raw, headers, body).await
}

async fn kv_write(
    api: Api,
    key: String,
    q: HashMap<String, String>,
    raw: Option<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    check_dc(&api, &q)?;
    if key.is_empty() {
        return Err(ApiError::ConsulBadRequest("Missing key name".into()));
    }
    conflicting(&q, &raw, &["cas", "acquire", "release"])?;
    let flags = parse_u64(&q, "flags")?.unwrap_or(0);
    let mode = if let Some(s) = q.get("release") {
        SetMode::Release(s.clone())
    } else if let Some(s) = q.get("acquire") {
        SetMode::Acquire(s.clone())
    } else if let Some(cas) = parse_u64(&q, "cas")? {
        SetMode::Cas(cas)
    } else {
        SetMode::Plain
    };
    let value = KvValue::from(read_value(&headers, body).await?);
    let cmd = Command::Kv(KvOp::Set { key, value, flags, mode, now: now_millis() });
    let ok = outcome(api.control.propose(cmd).await)?;
    Ok(axum::Json(json!(ok)).into_response())
}

async fn kv_delete(
    State(api): State<Api>,
    Path(key): Path<String>,
    Query(q): Q,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    kv_remove(api, key, q, raw).await
}

async fn kv_delete_root(State(api): State<Api>, Query(q): Q, RawQuery(raw): RawQuery) -> Result<Response, ApiError> {
    kv_remove(api, String::new(), q, raw).await
}

async fn kv_remove(
    api: Api,
    key: String,
    q: HashMap<String, String>,
    raw: Option<String>,
) -> Result<Response, ApiError> {
    check_dc(&api, &q)?;
    conflicting(&q, &raw, &["recurse", "cas"])?;
    let recurse = flag(q.get("recurse"), false);
    if !recurse && key.is_empty() {
        return Err(ApiError::ConsulBadRequest("Missing key name".into()));
    }
    let cas = parse_u64(&q, "cas")?;
    let cmd = Command::Kv(KvOp::Delete { key, recurse, cas, now: now_millis() });
    let ok = outcome(api.control.propose(cmd).await)?;
    Ok(axum::Json(json!(ok)).into_response())
}

// ---- sessions ----

/// Build a session from a `session/create` body (fields in any case, snake_case too).
fn session_from_body(body: &[u8], default_node: &str) -> Result<Session, ApiError> {
    let bad = |e: super::consul_json::DecodeError| ApiError::ConsulBadRequest(e.to_string());
    let v = parse_body(body).map_err(bad)?;
    let o = CiObject::new(&v).map_err(bad)?;
    let kv_bad = |e: KvError| ApiError::ConsulBadRequest(e.to_string());
    let behavior = Behavior::parse(o.str("Behavior").map_err(bad)?.unwrap_or("")).map_err(kv_bad)?;
    let (ttl, ttl_ms) = parse_ttl(o.str("TTL").map_err(bad)?.unwrap_or("")).map_err(kv_bad)?;
    let lock_delay_ns = match o.get("LockDelay") {
        None => DEFAULT_LOCK_DELAY_NS,
        Some(v) => parse_lock_delay(v).map_err(kv_bad)?,
    };
    // `Checks` is the pre-1.7 name of `NodeChecks` (py-consul still sends it).
    let node_checks = match o.strings("NodeChecks").map_err(bad)? {
        Some(c) => c,
        None => o.strings("Checks").map_err(bad)?.unwrap_or_else(|| vec!["serfHealth".to_owned()]),
    };
    let service_checks = match o.array("ServiceChecks").map_err(bad)? {
        None => Vec::new(),
        Some(items) => items
            .iter()
            .map(|item| match item {
                Value::String(s) => Ok(s.clone()),
                other => {
                    CiObject::from_value(other, "ServiceChecks").and_then(|c| c.string("ID")).map_err(bad)?.ok_or_else(
                        || ApiError::ConsulBadRequest("Request decode failed: ServiceChecks: missing ID".into()),
                    )
                }
            })
            .collect::<Result<Vec<_>, _>>()?,
    };
    Ok(Session {
        id: uuid::Uuid::new_v4().to_string(),
        name: o.string("Name").map_err(bad)?.unwrap_or_default(),
        node: o.string("Node").map_err(bad)?.filter(|n| !n.is_empty()).unwrap_or_else(|| default_node.to_owned()),
        lock_delay_ns,
        behavior,
        ttl,
        ttl_ms,
        node_checks,
        service_checks,
        create_index: 0,
        modify_index: 0,
        expires_at: None,
    })
}

async fn session_create(State(api): State<Api>, Query(q): Q, body: Bytes) -> Result<Response, ApiError> {
    check_dc(&api, &q)?;
    let session = session_from_body(&body, &api.info.node)?;
    let id = session.id.clone();
    let cmd = Command::Session(SessionOp::Create { session, now: now_millis() });
    api.control.propose(cmd).await.map_err(ApiError::from_consul)?;
    Ok(axum::Json(json!({"ID": id})).into_response())
}

async fn session_destroy(State(api): State<Api>, Path(id): Path<String>, Query(q): Q) -> Result<Response, ApiError> {
    check_dc(&api, &q)?;
    let cmd = Command::Session(SessionOp::Destroy { id, now: now_millis() });
    api.control.propose(cmd).await.map_err(ApiError::from_consul)?;
    Ok(axum::Json(json!(true)).into_response())
}

async fn session_renew(State(api): State<Api>, Path(id): Path<String>, Query(q): Q) -> Result<Response, ApiError> {
    check_dc(&api, &q)?;
    let cmd = Command::Session(SessionOp::Renew { id: id.clone(), now: now_millis() });
    api.control.propose(cmd).await.map_err(ApiError::from_consul)?;
    let state = api.control.state();
    let list: Vec<Value> = state.kv.sessions.get(&id).map(session_json).into_iter().collect();
    if list.is_empty() {
        // invalidated between the renewal and this read
        return Err(ApiError::ConsulNotFound(format!("Session id '{id}' not found")));
    }
    Ok(json_indexed(Value::Array(list), state.kv.sessions_index(), &q))
}

async fn session_info(State(api): State<Api>, Path(id): Path<String>, Query(q): Q) -> Result<Response, ApiError> {
    check_dc(&api, &q)?;
    let state = wait_for(&api, blocking(&q)?, SESSIONS_TOPIC, |s| s.kv.sessions_index()).await;
    let list: Vec<Value> = state.kv.sessions.get(&id).map(session_json).into_iter().collect();
    Ok(json_indexed(Value::Array(list), state.kv.sessions_index(), &q))
}

async fn session_node(State(api): State<Api>, Path(node): Path<String>, Query(q): Q) -> Result<Response, ApiError> {
    check_dc(&api, &q)?;
    let state = wait_for(&api, blocking(&q)?, SESSIONS_TOPIC, |s| s.kv.sessions_index()).await;
    let list: Vec<Value> = state.kv.node_sessions(&node).map(session_json).collect();
    Ok(json_indexed(Value::Array(list), state.kv.sessions_index(), &q))
}

async fn session_list(State(api): State<Api>, Query(q): Q) -> Result<Response, ApiError> {
    check_dc(&api, &q)?;
    let state = wait_for(&api, blocking(&q)?, SESSIONS_TOPIC, |s| s.kv.sessions_index()).await;
    let list: Vec<Value> = state.kv.sessions.values().map(session_json).collect();
    Ok(json_indexed(Value::Array(list), state.kv.sessions_index(), &q))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_bodies_decode_in_any_case() {
        let s = session_from_body(
            br#"{"name":"my","node":"n9","lockdelay":"2s","behavior":"delete","ttl":"20s","checks":["serfHealth","c2"]}"#,
            "n1",
        )
        .unwrap();
        assert_eq!((s.name.as_str(), s.node.as_str(), s.lock_delay_ns), ("my", "n9", 2_000_000_000));
        assert_eq!((s.behavior, s.ttl.as_str(), s.ttl_ms), (Behavior::Delete, "20s", 20_000));
        assert_eq!(s.node_checks, vec!["serfHealth", "c2"]);
        let s = session_from_body(br#"{"LockDelay": 15000000000, "ServiceChecks": [{"ID": "svc:1"}]}"#, "n1").unwrap();
        assert_eq!((s.node.as_str(), s.lock_delay_ns, s.ttl_ms), ("n1", 15_000_000_000, 0));
        assert_eq!(s.service_checks, vec!["svc:1"]);
        assert_eq!(s.node_checks, vec!["serfHealth"]);
        let s = session_from_body(b"", "n1").unwrap();
        assert_eq!((s.lock_delay_ns, s.behavior), (DEFAULT_LOCK_DELAY_NS, Behavior::Release));
        for bad in [&br#"{"ttl": "5s"}"#[..], br#"{"behavior": "keep"}"#, br#"{"name": 3}"#, b"{nope", b"[1]"] {
            assert!(
                matches!(session_from_body(bad, "n1"), Err(ApiError::ConsulBadRequest(_))),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
