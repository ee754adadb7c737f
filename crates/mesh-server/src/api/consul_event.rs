//! Consul user events: `PUT /v1/event/fire/:name` and `GET /v1/event/list`.
//!
//! As a Consul agent, the node keeps the last [`BUFFER`] events it received in memory (events are
//! not persisted; a restart forgets them, as Consul's agent does). An event whose node, service or
//! tag filter (regular expressions) does not match this node is not kept, as an agent outside the
//! filter ignores it. `GET /v1/event/list` blocks on `?index=` (the last event's LTime).

use super::consul::{Params, check_dc, indexed, wait_param};
use super::{Api, ApiError};
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::response::Response;
use axum::routing::{get, put};
use regex::Regex;
use serde_json::{Value, json};
use std::collections::VecDeque;
use std::sync::Mutex;

/// How many events are kept (Consul's agent buffer).
pub const BUFFER: usize = 256;

/// The events this node received.
#[derive(Debug)]
pub struct UserEvents {
    buf: Mutex<VecDeque<Value>>,
    ltime: tokio::sync::watch::Sender<u64>,
}

impl Default for UserEvents {
    fn default() -> Self {
        Self { buf: Mutex::new(VecDeque::new()), ltime: tokio::sync::watch::channel(0).0 }
    }
}

/// Routes of the event API.
pub fn routes() -> Router<Api> {
    Router::new().route("/v1/event/fire/{name}", put(fire)).route("/v1/event/list", get(list))
}

fn bad(m: String) -> ApiError {
    ApiError::ConsulBadRequest(m)
}

fn regex(q: &Params, name: &str) -> Result<Option<Regex>, ApiError> {
    match q.get(name).filter(|v| !v.is_empty()) {
        None => Ok(None),
        Some(v) => Regex::new(v).map(Some).map_err(|e| bad(format!("Invalid {name} filter {v:?}: {e}"))),
    }
}

async fn fire(
    State(api): State<Api>,
    Path(name): Path<String>,
    RawQuery(raw): RawQuery,
    body: Bytes,
) -> Result<Response, ApiError> {
    let q = Params::parse(raw.as_deref());
    check_dc(&api, &q)?;
    if name.is_empty() {
        return Err(bad("User event name must be non-empty".into()));
    }
    let (node_re, service_re, tag_re) = (regex(&q, "node")?, regex(&q, "service")?, regex(&q, "tag")?);
    if tag_re.is_some() && service_re.is_none() {
        return Err(bad("Cannot provide tag filter without service filter".into()));
    }
    let payload = if body.is_empty() {
        Value::Null
    } else {
        Value::String(mesh_core::kv::KvValue::from(body.to_vec()).to_base64())
    };
    // Whether this node is one the event is for.
    let state = api.control.published.state.load();
    let node_ok = node_re.as_ref().is_none_or(|r| r.is_match(&api.info.node));
    let service_ok = service_re.as_ref().is_none_or(|s| {
        state
            .catalog
            .instances_on(&api.info.node)
            .any(|i| s.is_match(&i.service) && tag_re.as_ref().is_none_or(|t| i.tags.iter().any(|x| t.is_match(x))))
    });
    let mut event = json!({
        "ID": api.control.uuid().to_string(),
        "Name": name,
        "Payload": payload,
        "NodeFilter": q.get("node").cloned().unwrap_or_default(),
        "ServiceFilter": q.get("service").cloned().unwrap_or_default(),
        "TagFilter": q.get("tag").cloned().unwrap_or_default(),
        "Version": 1,
        "LTime": 0,
    });
    let events = &api.user_events;
    if node_ok && service_ok {
        let mut buf = events.buf.lock().unwrap_or_else(|e| e.into_inner());
        let ltime = *events.ltime.borrow() + 1;
        event["LTime"] = json!(ltime);
        buf.push_back(event.clone());
        while buf.len() > BUFFER {
            buf.pop_front();
        }
        events.ltime.send_replace(ltime);
    }
    Ok(super::consul::reply(&event, &q))
}

async fn list(State(api): State<Api>, RawQuery(raw): RawQuery) -> Result<Response, ApiError> {
    let q = Params::parse(raw.as_deref());
    check_dc(&api, &q)?;
    let events = &api.user_events;
    let min = match q.get("index").map(|v| v.trim()).filter(|v| !v.is_empty()) {
        None => 0,
        Some(v) => v.parse::<u64>().map_err(|_| bad(format!("Invalid index: {v:?}")))?,
    };
    if min > 0 {
        let wait = wait_param(&q)?;
        let mut rx = events.ltime.subscribe();
        let _ = tokio::time::timeout(wait, rx.wait_for(|l| *l > min)).await;
    }
    let name = q.get("name").filter(|n| !n.is_empty());
    let ltime = *events.ltime.borrow();
    let list: Vec<Value> = events
        .buf
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .filter(|e| name.is_none_or(|n| e["Name"] == n.as_str()))
        .cloned()
        .collect();
    Ok(indexed(&Value::Array(list), ltime, &q))
}
