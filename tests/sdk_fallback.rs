//! `endpoints` datacenter fallback over the wire, against a Consul double (the same against real
//! datacenters is `tests/sdk_fallback_wan.rs`). A single `mesh dev` is one datacenter, so this
//! test serves `/v1/health/service/<name>` from a small in-test Consul double that answers per
//! `?dc=` and holds blocking queries (`?index=`) until its data changes, like Consul.

use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::IntoResponse;
use mesh_sdk::consul::ConsulClient;
use mesh_sdk::endpoints::{Endpoints, EndpointsOptions};
use serde_json::{Value, json};
use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

#[derive(Default)]
struct Fake {
    /// dc → (index, instance ids)
    data: Mutex<HashMap<String, (u64, Vec<String>)>>,
    changed: Notify,
    queries: Mutex<Vec<String>>,
}

impl Fake {
    fn set(&self, dc: &str, ids: &[&str]) {
        let mut d = self.data.lock().unwrap();
        let e = d.entry(dc.to_owned()).or_insert((1, vec![]));
        e.0 += 1;
        e.1 = ids.iter().map(|s| s.to_string()).collect();
        drop(d);
        self.changed.notify_waiters();
    }
}

async fn health(State(fake): State<Arc<Fake>>, Query(q): Query<HashMap<String, String>>) -> axum::response::Response {
    let dc = q.get("dc").cloned().unwrap_or_else(|| "dc1".into());
    fake.queries.lock().unwrap().push(format!("dc={dc} index={}", q.get("index").map(String::as_str).unwrap_or("-")));
    let index: u64 = q.get("index").and_then(|i| i.parse().ok()).unwrap_or(0);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let notified = fake.changed.notified();
        let current = fake.data.lock().unwrap().get(&dc).cloned();
        let Some((idx, ids)) = current else {
            return (axum::http::StatusCode::INTERNAL_SERVER_ERROR, "No path to datacenter").into_response();
        };
        if idx > index || tokio::time::Instant::now() >= deadline {
            let body: Vec<Value> = ids
                .iter()
                .map(|id| {
                    json!({
                        "Node": {"Node": format!("{dc}-node"), "Address": "127.0.0.1", "Datacenter": dc},
                        "Service": {"ID": id, "Service": "web", "Tags": [], "Address": "", "Port": 80, "Meta": {}},
                        "Checks": [{"CheckID": "serfHealth", "Status": "passing"}],
                    })
                })
                .collect();
            let mut h = HeaderMap::new();
            h.insert("X-Consul-Index", idx.into());
            return (h, axum::Json(body)).into_response();
        }
        let _ = tokio::time::timeout_at(deadline, notified).await;
    }
}

fn ids(e: &Endpoints) -> BTreeSet<String> {
    e.instances().into_iter().map(|i| i.id).collect()
}

async fn until(e: &Endpoints, want: &[&str], dc: &str) {
    let want: BTreeSet<String> = want.iter().map(|s| s.to_string()).collect();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut rx = e.subscribe();
    while ids(e) != want || e.datacenter().as_deref() != Some(dc) {
        let left = deadline.saturating_duration_since(Instant::now());
        if tokio::time::timeout(left, rx.changed()).await.is_err() {
            panic!("still {:?} from {:?}, want {want:?} from {dc}", ids(e), e.datacenter());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn falls_back_to_named_datacenters_in_order_and_comes_back() {
    let fake = Arc::new(Fake::default());
    fake.set("dc1", &["local-1"]);
    fake.set("dc2", &[]);
    fake.set("dc3", &["far-1"]);
    let app =
        axum::Router::new().route("/v1/health/service/{name}", axum::routing::get(health)).with_state(fake.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.ok() });

    let consul = ConsulClient::new(&addr.to_string()).unwrap();
    let web =
        Endpoints::watch(&consul, "web", EndpointsOptions::default().fallback("dc2").fallback("dc3")).await.unwrap();
    until(&web, &["local-1"], "").await;
    // Local empties: dc2 has none either, so dc3 serves.
    fake.set("dc1", &[]);
    until(&web, &["far-1"], "dc3").await;
    let lease = web.pick().unwrap();
    assert_eq!(lease.instance().datacenter, "dc3");
    drop(lease);
    // dc2 gets an instance: it comes before dc3.
    fake.set("dc2", &["near-1"]);
    until(&web, &["near-1"], "dc2").await;
    // Local is back: local first again.
    fake.set("dc1", &["local-2"]);
    until(&web, &["local-2"], "").await;

    let q = fake.queries.lock().unwrap().clone();
    for dc in ["dc2", "dc3"] {
        assert!(q.iter().any(|l| l.starts_with(&format!("dc={dc} index="))), "{dc} asked with ?dc=: {q:?}");
    }
    // Every query after the first of each datacenter is a blocking one.
    assert_eq!(q.iter().filter(|l| l.ends_with("index=-")).count(), 3, "{q:?}");
}
