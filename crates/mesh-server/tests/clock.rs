//! The control loop's clock decides every deadline: with a manual clock, a Consul session with a
//! TTL lives on however much real time passes, and is invalidated as soon as that clock passes
//! its deadline (twice the TTL, as Consul); the ids the API hands out come from the clock's id
//! source.

use mesh_core::model::{Clock, ManualClock};
use mesh_core::state::{MemLog, Store};
use mesh_server::api::{self, Api, NodeInfo};
use mesh_server::control::{self, ControlConfig};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tower::ServiceExt;

async fn call(router: &axum::Router, method: &str, uri: &str, body: &str) -> (u16, serde_json::Value) {
    let req =
        axum::http::Request::builder().method(method).uri(uri).body(axum::body::Body::from(body.to_owned())).unwrap();
    let resp = router.clone().oneshot(req).await.unwrap();
    let status = resp.status().as_u16();
    let bytes = http_body_util::BodyExt::collect(resp.into_body()).await.unwrap().to_bytes();
    (status, serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadlines_follow_the_injected_clock() {
    let clock = Arc::new(ManualClock::new(1_000_000_000, 7));
    let store = Store::open(Box::new(MemLog::default()), "dc1").unwrap();
    let cfg = ControlConfig { tick: Duration::from_millis(20), clock: clock.clone(), ..Default::default() };
    let (control, _join) = control::spawn(store, cfg);
    let info = NodeInfo {
        node: "n1".into(),
        datacenter: "dc1".into(),
        http_addr: "127.0.0.1:1".into(),
        domain: "mesh".into(),
        started_at: clock.now(),
        host_access: Default::default(),
        enable_script_checks: false,
    };
    let router = api::router(Api::new(control.clone(), info));
    // A node for the session's default serfHealth check.
    let (s, v) = call(&router, "PUT", "/v1/catalog/register", r#"{"Node": "n1", "Address": "127.0.0.1", "Check": {"CheckID": "serfHealth", "Name": "serf", "Status": "passing"}}"#).await;
    assert_eq!(s, 200, "{v}");
    let (s, v) = call(&router, "PUT", "/v1/session/create", r#"{"TTL": "10s"}"#).await;
    assert_eq!(s, 200, "{v}");
    let id = v["ID"].as_str().unwrap().to_owned();
    // Ids come from the clock's id source: the seed is the first half of the uuid.
    assert!(id.starts_with("00000000-0000-0007-"), "{id}");
    // Real time passes; the manual clock does not: the session lives.
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(300) {
        let (_, v) = call(&router, "GET", &format!("/v1/session/info/{id}"), "").await;
        assert_eq!(v.as_array().map(Vec::len), Some(1), "the session lives while the clock stands still");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The clock passes twice the TTL: the control loop invalidates it at its next tick.
    clock.advance(21_000);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, v) = call(&router, "GET", &format!("/v1/session/info/{id}"), "").await;
        if v.as_array().is_some_and(Vec::is_empty) {
            break;
        }
        assert!(Instant::now() < deadline, "the session outlived its TTL on the injected clock: {v}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
