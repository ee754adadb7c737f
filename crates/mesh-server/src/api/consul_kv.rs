//! Consul's `/v1/kv` and `/v1/session` endpoints over [`mesh_core::kv`].
//!
//! Reads answer from the published state (blocking with `?index=&wait=` on the key, the prefix
//! or the sessions); writes go through the control loop as `Command::Kv` / `Command::Session`
//! and answer once durable and visible, with Consul's `true`/`false`.

use super::consul::{Ci, Params, add_index_headers, block_until, check_dc, indexed, json_body};
use super::{Api, ApiError};
use crate::control::ControlError;
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use futures_util::StreamExt;
use mesh_core::kv::{
    Behavior, DEFAULT_LOCK_DELAY_NS, KvEntry, KvError, KvOp, KvValue, MAX_VALUE_SIZE, SESSIONS_TOPIC, Session,
    SessionOp, SetMode, parse_lock_delay, parse_ttl,
};
use mesh_core::state::{ApplyError, Command};
use serde_json::{Value, json};

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

/// The blocking topic of a KV prefix (or key).
pub fn kv_topic(prefix: &str) -> String {
    format!("kv:{prefix}")
}

fn not_found_indexed(index: u64, q: &Params) -> Response {
    let mut r = StatusCode::NOT_FOUND.into_response();
    add_index_headers(&mut r, index, q);
    r
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

async fn kv_get(
    State(api): State<Api>,
    Path(key): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    kv_read(api, key, Params::parse(raw.as_deref())).await
}

async fn kv_get_root(State(api): State<Api>, RawQuery(raw): RawQuery) -> Result<Response, ApiError> {
    kv_read(api, String::new(), Params::parse(raw.as_deref())).await
}

async fn kv_read(api: Api, key: String, q: Params) -> Result<Response, ApiError> {
    check_dc(&api, &q)?;
    let topic = kv_topic(&key);
    if q.flag("keys") {
        let sep = q.get("separator").or_else(|| q.get("seperator")).cloned().unwrap_or_default();
        let state = block_until(&api, &q, &topic, |s| s.kv.prefix_index(&key)).await?;
        let index = state.kv.prefix_index(&key);
        let keys = state.kv.keys(&key, &sep);
        if keys.is_empty() && !key.is_empty() {
            return Ok(not_found_indexed(index, &q));
        }
        return Ok(indexed(&json!(keys), index, &q));
    }
    if q.flag("recurse") {
        let state = block_until(&api, &q, &topic, |s| s.kv.prefix_index(&key)).await?;
        let index = state.kv.prefix_index(&key);
        let list: Vec<Value> = state.kv.list(&key).map(entry_json).collect();
        if list.is_empty() {
            return Ok(not_found_indexed(index, &q));
        }
        return Ok(indexed(&Value::Array(list), index, &q));
    }
    if key.is_empty() {
        return Err(ApiError::ConsulBadRequest("Missing key name".into()));
    }
    // A single key watches exactly that key: the hub wakes on the prefix `kv:<key>`, the wait
    // goes on until the key itself changed.
    let state = block_until(&api, &q, &topic, |s| s.kv.key_index(&key)).await?;
    let index = state.kv.key_index(&key);
    let Some(e) = state.kv.get(&key) else { return Ok(not_found_indexed(index, &q)) };
    if q.flag("raw") {
        let mut r = Bytes::copy_from_slice(e.value.as_bytes()).into_response();
        let h = r.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        h.insert("X-Content-Type-Options", HeaderValue::from_static("nosniff"));
        h.insert("Content-Security-Policy", HeaderValue::from_static("sandbox"));
        add_index_headers(&mut r, index, &q);
        return Ok(r);
    }
    Ok(indexed(&json!([entry_json(e)]), index, &q))
}

/// 400 when more than one of `flags` is present (Consul's "Conflicting flags").
fn conflicting(q: &Params, raw: &Option<String>, flags: &[&str]) -> Result<(), ApiError> {
    if flags.iter().filter(|f| q.get(f).is_some()).count() > 1 {
        return Err(ApiError::ConsulBadRequest(format!("Conflicting flags: {}", raw.as_deref().unwrap_or(""))));
    }
    Ok(())
}

fn parse_u64(q: &Params, name: &str) -> Result<Option<u64>, ApiError> {
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
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    kv_write(api, key, raw, headers, body).await
}

async fn kv_put_root(
    State(api): State<Api>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    kv_write(api, String::new(), raw, headers, body).await
}

async fn kv_write(
    api: Api,
    key: String,
    raw: Option<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let q = Params::parse(raw.as_deref());
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
    let cmd = Command::Kv(KvOp::Set { key, value, flags, mode, now: api.control.now() });
    let ok = outcome(api.control.propose(cmd).await)?;
    Ok(axum::Json(json!(ok)).into_response())
}

async fn kv_delete(
    State(api): State<Api>,
    Path(key): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    kv_remove(api, key, raw).await
}

async fn kv_delete_root(State(api): State<Api>, RawQuery(raw): RawQuery) -> Result<Response, ApiError> {
    kv_remove(api, String::new(), raw).await
}

async fn kv_remove(api: Api, key: String, raw: Option<String>) -> Result<Response, ApiError> {
    let q = Params::parse(raw.as_deref());
    check_dc(&api, &q)?;
    conflicting(&q, &raw, &["recurse", "cas"])?;
    let recurse = q.flag("recurse");
    if !recurse && key.is_empty() {
        return Err(ApiError::ConsulBadRequest("Missing key name".into()));
    }
    let cas = parse_u64(&q, "cas")?;
    let cmd = Command::Kv(KvOp::Delete { key, recurse, cas, now: api.control.now() });
    let ok = outcome(api.control.propose(cmd).await)?;
    Ok(axum::Json(json!(ok)).into_response())
}

// ---- sessions ----

/// Build a session from a `session/create` body (fields in any case, snake_case too).
fn session_from_body(body: &[u8], default_node: &str, id: String) -> Result<Session, ApiError> {
    let map = json_body(body)?;
    let o = Ci(&map);
    let kv_bad = |e: KvError| ApiError::ConsulBadRequest(e.to_string());
    let behavior = Behavior::parse(o.str("Behavior")?.unwrap_or("")).map_err(kv_bad)?;
    let (ttl, ttl_ms) = parse_ttl(o.str("TTL")?.unwrap_or("")).map_err(kv_bad)?;
    let lock_delay_ns = match o.get("LockDelay") {
        None => DEFAULT_LOCK_DELAY_NS,
        Some(v) => parse_lock_delay(v).map_err(kv_bad)?,
    };
    // `Checks` is the pre-1.7 name of `NodeChecks` (py-consul still sends it).
    let node_checks = if o.get("NodeChecks").is_some() {
        o.strings("NodeChecks")?
    } else if o.get("Checks").is_some() {
        o.strings("Checks")?
    } else {
        vec!["serfHealth".to_owned()]
    };
    let service_checks = match o.get("ServiceChecks") {
        None => Vec::new(),
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| match item {
                Value::String(s) => Ok(s.clone()),
                Value::Object(m) => Ci(m).str("ID")?.map(str::to_owned).ok_or_else(|| {
                    ApiError::ConsulBadRequest("Request decode failed: ServiceChecks: missing ID".into())
                }),
                _ => Err(ApiError::ConsulBadRequest(
                    "Request decode failed: ServiceChecks must be a list of objects".into(),
                )),
            })
            .collect::<Result<Vec<_>, _>>()?,
        Some(_) => {
            return Err(ApiError::ConsulBadRequest("Request decode failed: ServiceChecks must be a list".into()));
        }
    };
    Ok(Session {
        id,
        name: o.str("Name")?.unwrap_or_default().to_owned(),
        node: o.str("Node")?.filter(|n| !n.is_empty()).unwrap_or(default_node).to_owned(),
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

async fn session_create(State(api): State<Api>, RawQuery(raw): RawQuery, body: Bytes) -> Result<Response, ApiError> {
    let q = Params::parse(raw.as_deref());
    check_dc(&api, &q)?;
    let session = session_from_body(&body, &api.info.node, api.control.uuid().to_string())?;
    let id = session.id.clone();
    let cmd = Command::Session(SessionOp::Create { session, now: api.control.now() });
    api.control.propose(cmd).await.map_err(ApiError::from_consul)?;
    Ok(axum::Json(json!({"ID": id})).into_response())
}

async fn session_destroy(
    State(api): State<Api>,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    check_dc(&api, &Params::parse(raw.as_deref()))?;
    let cmd = Command::Session(SessionOp::Destroy { id, now: api.control.now() });
    api.control.propose(cmd).await.map_err(ApiError::from_consul)?;
    Ok(axum::Json(json!(true)).into_response())
}

async fn session_renew(
    State(api): State<Api>,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let q = Params::parse(raw.as_deref());
    check_dc(&api, &q)?;
    let cmd = Command::Session(SessionOp::Renew { id: id.clone(), now: api.control.now() });
    api.control.propose(cmd).await.map_err(ApiError::from_consul)?;
    let state = api.control.state();
    let list: Vec<Value> = state.kv.sessions.get(&id).map(session_json).into_iter().collect();
    if list.is_empty() {
        // invalidated between the renewal and this read
        return Err(ApiError::ConsulNotFound(format!("Session id '{id}' not found")));
    }
    Ok(indexed(&Value::Array(list), state.kv.sessions_index(), &q))
}

/// A blocking read of the sessions, answered with `pick`.
async fn sessions_read(
    api: Api,
    raw: Option<String>,
    pick: impl Fn(&mesh_core::kv::KvState) -> Vec<Value>,
) -> Result<Response, ApiError> {
    let q = Params::parse(raw.as_deref());
    check_dc(&api, &q)?;
    let state = block_until(&api, &q, SESSIONS_TOPIC, |s| s.kv.sessions_index()).await?;
    Ok(indexed(&Value::Array(pick(&state.kv)), state.kv.sessions_index(), &q))
}

async fn session_info(
    State(api): State<Api>,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    sessions_read(api, raw, |kv| kv.sessions.get(&id).map(session_json).into_iter().collect()).await
}

async fn session_node(
    State(api): State<Api>,
    Path(node): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    sessions_read(api, raw, |kv| kv.node_sessions(&node).map(session_json).collect()).await
}

async fn session_list(State(api): State<Api>, RawQuery(raw): RawQuery) -> Result<Response, ApiError> {
    sessions_read(api, raw, |kv| kv.sessions.values().map(session_json).collect()).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_bodies_decode_in_any_case() {
        let s = session_from_body(
            br#"{"name":"my","node":"n9","lockdelay":"2s","behavior":"delete","ttl":"20s","checks":["serfHealth","c2"]}"#,
            "n1",
            "s1".into(),
        )
        .unwrap();
        assert_eq!((s.name.as_str(), s.node.as_str(), s.lock_delay_ns), ("my", "n9", 2_000_000_000));
        assert_eq!((s.behavior, s.ttl.as_str(), s.ttl_ms), (Behavior::Delete, "20s", 20_000));
        assert_eq!(s.node_checks, vec!["serfHealth", "c2"]);
        let s =
            session_from_body(br#"{"LockDelay": 15000000000, "ServiceChecks": [{"ID": "svc:1"}]}"#, "n1", "s1".into())
                .unwrap();
        assert_eq!((s.node.as_str(), s.lock_delay_ns, s.ttl_ms), ("n1", 15_000_000_000, 0));
        assert_eq!(s.service_checks, vec!["svc:1"]);
        assert_eq!(s.node_checks, vec!["serfHealth"]);
        let s = session_from_body(b"", "n1", "s1".into()).unwrap();
        assert_eq!((s.lock_delay_ns, s.behavior), (DEFAULT_LOCK_DELAY_NS, Behavior::Release));
        for bad in [&br#"{"ttl": "5s"}"#[..], br#"{"behavior": "keep"}"#, br#"{"name": 3}"#, b"{nope", b"[1]"] {
            assert!(
                matches!(session_from_body(bad, "n1", "s1".into()), Err(ApiError::ConsulBadRequest(_))),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
