//! Consul's read conventions shared by the `/v1` endpoints: blocking-query parameters
//! (`?index=&wait=`), the `X-Consul-*` response headers, consistency modes and the `dc` check.
//!
//! A blocking read names the data it watches by a topic (`kv:<prefix>`, `sessions`) and how to
//! compute that data's index from a state; [`wait_for`] returns the first state whose index
//! exceeds the client's, or the current one when the wait runs out.

use super::{Api, ApiError};
use axum::http::HeaderValue;
use axum::response::Response;
use mesh_core::state::State;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// How long a blocking query waits when the client does not say.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(5 * 60);
/// The longest a blocking query waits (before jitter).
pub const MAX_WAIT: Duration = Duration::from_secs(10 * 60);

/// A blocking query: wait until the index exceeds `index`, at most `wait`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Blocking {
    /// The index the client has seen.
    pub index: u64,
    /// How long to wait at most (capped, jitter included).
    pub wait: Duration,
}

/// Parse a `wait` value: a Go duration (`10s`, `100ms`, `5m`, `1m30s`), capped at
/// [`MAX_WAIT`]; `None` gives [`DEFAULT_WAIT`].
pub fn parse_wait(wait: Option<&str>) -> Result<Duration, ApiError> {
    let Some(w) = wait.map(str::trim).filter(|w| !w.is_empty()) else { return Ok(DEFAULT_WAIT) };
    let d = mesh_core::registrator::parse_go_duration(w)
        .map_err(|e| ApiError::ConsulBadRequest(format!("Invalid wait time: {w:?}: {e}")))?;
    Ok(d.min(MAX_WAIT))
}

/// The blocking parameters of a query, or `None` for a plain read (no `index`, or `index=0`).
/// Adds up to `wait/16` of random jitter, as Consul does, so watchers spread out.
pub fn blocking(q: &HashMap<String, String>) -> Result<Option<Blocking>, ApiError> {
    let index = match q.get("index").map(|s| s.trim()).filter(|s| !s.is_empty()) {
        None => return Ok(None),
        Some(s) => s.parse::<u64>().map_err(|_| ApiError::ConsulBadRequest(format!("Invalid index: {s:?}")))?,
    };
    let wait = parse_wait(q.get("wait").map(String::as_str))?;
    if index == 0 {
        return Ok(None);
    }
    let jitter_ms = (wait.as_millis() as u64) / 16;
    let jitter = if jitter_ms > 0 { Duration::from_millis(rand::random_range(0..=jitter_ms)) } else { Duration::ZERO };
    Ok(Some(Blocking { index, wait: wait + jitter }))
}

/// Consul's consistency mode of a read: `stale`, `consistent` or the default `leader`.
pub fn consistency(q: &HashMap<String, String>) -> &'static str {
    if q.contains_key("stale") {
        "stale"
    } else if q.contains_key("consistent") {
        "consistent"
    } else {
        "leader"
    }
}

/// 500 `No path to datacenter` for any `dc` other than this node's.
pub fn check_dc(api: &Api, q: &HashMap<String, String>) -> Result<(), ApiError> {
    match q.get("dc") {
        Some(dc) if !dc.is_empty() && dc != &api.info.datacenter => Err(ApiError::ConsulNoPathToDc),
        _ => Ok(()),
    }
}

/// Add the headers of a blocking endpoint: `X-Consul-Index` (at least 1), `X-Consul-KnownLeader`,
/// `X-Consul-LastContact` and `X-Consul-Effective-Consistency`.
pub fn with_index(mut r: Response, index: u64, q: &HashMap<String, String>) -> Response {
    let h = r.headers_mut();
    h.insert("X-Consul-Index", HeaderValue::from(index.max(1)));
    h.insert("X-Consul-KnownLeader", HeaderValue::from_static("true"));
    h.insert("X-Consul-LastContact", HeaderValue::from_static("0"));
    h.insert("X-Consul-Effective-Consistency", HeaderValue::from_static(consistency(q)));
    r
}

/// The state to answer a read from: at once without `blocking`; otherwise the first published
/// state in which `index_of` exceeds the client's index, or the latest when the wait runs out.
///
/// `topic` names the watched data (`kv:<prefix>`, `sessions`). Until the control loop notifies
/// per topic, this wakes on every published change and checks `index_of` again, so unrelated
/// changes cost a check but never end the wait.
pub async fn wait_for(
    api: &Api,
    blocking: Option<Blocking>,
    _topic: &str,
    index_of: impl Fn(&State) -> u64,
) -> Arc<State> {
    let Some(b) = blocking else { return api.control.state() };
    let deadline = tokio::time::Instant::now() + b.wait;
    let mut rx = api.control.published.index.clone();
    loop {
        rx.borrow_and_update();
        let state = api.control.state();
        if index_of(&state) > b.index {
            return state;
        }
        tokio::select! {
            changed = rx.changed() => if changed.is_err() { return api.control.state() },
            _ = tokio::time::sleep_until(deadline) => return api.control.state(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn waits_default_cap_and_jitter() {
        assert_eq!(parse_wait(None).unwrap(), DEFAULT_WAIT);
        assert_eq!(parse_wait(Some("100ms")).unwrap(), Duration::from_millis(100));
        assert_eq!(parse_wait(Some("10s")).unwrap(), Duration::from_secs(10));
        assert_eq!(parse_wait(Some("1h")).unwrap(), MAX_WAIT);
        assert!(parse_wait(Some("soon")).is_err());
        assert_eq!(blocking(&q(&[("wait", "5s")])).unwrap(), None, "no index: not blocking");
        assert_eq!(blocking(&q(&[("index", "0")])).unwrap(), None);
        assert!(blocking(&q(&[("index", "x")])).is_err());
        let b = blocking(&q(&[("index", "7"), ("wait", "16s")])).unwrap().unwrap();
        assert_eq!(b.index, 7);
        assert!(b.wait >= Duration::from_secs(16) && b.wait <= Duration::from_secs(17), "{b:?}");
        let b = blocking(&q(&[("index", "7"), ("wait", "30m")])).unwrap().unwrap();
        assert!(b.wait >= MAX_WAIT && b.wait <= MAX_WAIT + MAX_WAIT / 16, "{b:?}");
        assert_eq!(consistency(&q(&[("stale", "")])), "stale");
        assert_eq!(consistency(&q(&[])), "leader");
    }
}
