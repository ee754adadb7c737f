//! mesh-sdk's registry and endpoints against a real `mesh dev` (its Consul agent API and blocking
//! health queries), and the echo-service example run as real processes.

mod sdk_support;
mod support;

use mesh_sdk::consul::{Check, CheckStatus, ConsulClient, ConsulError, ServiceRegistration};
use mesh_sdk::endpoints::{Balance, Ejection, Endpoints, EndpointsOptions};
use mesh_sdk::registry::Registration;
use sdk_support::ExampleProc;
use serde_json::Value;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use support::*;

fn ids(e: &Endpoints) -> BTreeSet<String> {
    e.instances().into_iter().map(|i| i.id).collect()
}

fn set(ids: &[&str]) -> BTreeSet<String> {
    ids.iter().map(|s| s.to_string()).collect()
}

/// Which instances 40 picks land on.
fn picked(e: &Endpoints) -> BTreeSet<String> {
    (0..40).filter_map(|_| e.pick().map(|l| l.instance().id.clone())).collect()
}

/// Wait for the watch to show `want`; returns how long it took.
async fn until_instances(e: &Endpoints, want: &BTreeSet<String>, secs: u64, what: &str) -> Duration {
    let t0 = Instant::now();
    let mut rx = e.subscribe();
    let deadline = t0 + Duration::from_secs(secs);
    while &ids(e) != want {
        let left = deadline.saturating_duration_since(Instant::now());
        if tokio::time::timeout(left, rx.changed()).await.is_err() {
            panic!("{what}: instances still {:?} after {secs}s, want {want:?}", ids(e));
        }
    }
    t0.elapsed()
}

/// An HTTP server answering `GET /health` with 200 or 500 as `healthy` says.
async fn flip_server(healthy: Arc<AtomicBool>) -> u16 {
    let app = axum::Router::new().route(
        "/health",
        axum::routing::get(move || {
            let healthy = healthy.clone();
            async move {
                if healthy.load(Ordering::SeqCst) {
                    (axum::http::StatusCode::OK, "ok")
                } else {
                    (axum::http::StatusCode::INTERNAL_SERVER_ERROR, "down")
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await.ok() });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_follow_ttl_checks_at_once_and_move_traffic() {
    let node = MeshNode::start(&["--runtime", "process"]);
    let consul = ConsulClient::new(&node.url("")).unwrap();
    // Two instances with long TTL checks that the test drives with check/fail and check/pass.
    for (id, port) in [("web-a", 7101), ("web-b", 7102)] {
        let reg = ServiceRegistration::new("web", port)
            .id(id)
            .address("127.0.0.1")
            .tag("v1")
            .check(Check::ttl(Duration::from_secs(60)).status(CheckStatus::Passing));
        consul.register_service(&reg).await.unwrap();
    }
    // A third without the tag.
    let other = ServiceRegistration::new("web", 7103)
        .id("web-untagged")
        .address("127.0.0.1")
        .check(Check::ttl(Duration::from_secs(60)).status(CheckStatus::Passing));
    consul.register_service(&other).await.unwrap();

    let web = Endpoints::watch(&consul, "web", EndpointsOptions::default().tag("v1").balance(Balance::RoundRobin))
        .await
        .unwrap();
    assert_eq!(ids(&web), set(&["web-a", "web-b"]), "tag filter");
    assert_eq!(picked(&web), set(&["web-a", "web-b"]));
    // The watch blocks instead of polling: while nothing changes it sends no query (the first
    // query answered, the second is waiting on the server), whatever else changes in the catalog.
    eventually(5, "the first blocking query is sent", || async { (web.stats().queries == 2).then_some(()) }).await;
    let before = web.stats();
    let noise = ServiceRegistration::new("other", 1).id("other-1").check(Check::ttl(Duration::from_secs(60)));
    let until = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < until {
        consul.register_service(&noise).await.unwrap();
        consul.update_ttl("service:other-1", CheckStatus::Passing, None).await.unwrap();
        consul.update_ttl("service:other-1", CheckStatus::Critical, None).await.unwrap();
    }
    assert_eq!(web.stats().queries, before.queries, "no query while web is unchanged: {:?}", web.stats());
    assert_eq!((before.queries, before.errors), (2, 0), "the first answer, then one blocking query");
    let lease = web.pick().unwrap();
    assert_eq!((lease.address(), lease.authority().ends_with(&lease.port().to_string())), ("127.0.0.1", true));
    drop(lease);

    // web-a turns critical: traffic moves off it as soon as the server says so (the blocking
    // query returns on the change; no polling interval to wait out).
    consul.update_ttl("service:web-a", CheckStatus::Critical, Some("test says down")).await.unwrap();
    let took = until_instances(&web, &set(&["web-b"]), 2, "web-a critical").await;
    eprintln!("endpoints dropped a critical instance {took:?} after check/fail");
    assert_eq!(picked(&web), set(&["web-b"]));
    // ... and back when it recovers.
    consul.update_ttl("service:web-a", CheckStatus::Passing, None).await.unwrap();
    let took = until_instances(&web, &set(&["web-a", "web-b"]), 2, "web-a passing again").await;
    eprintln!("endpoints took back a recovered instance {took:?} after check/pass");
    assert_eq!(picked(&web), set(&["web-a", "web-b"]));
    // A warning instance is not passing either.
    consul.update_ttl("service:web-b", CheckStatus::Warning, None).await.unwrap();
    until_instances(&web, &set(&["web-a"]), 2, "web-b warning").await;
    consul.update_ttl("service:web-b", CheckStatus::Passing, None).await.unwrap();
    until_instances(&web, &set(&["web-a", "web-b"]), 2, "web-b passing").await;

    // Passive ejection: failures reported by callers take web-b out of rotation for a while,
    // although its check passes.
    let web = Endpoints::watch(
        &consul,
        "web",
        EndpointsOptions::default().tag("v1").ejection(Ejection::new(
            2,
            Duration::from_secs(60),
            Duration::from_secs(60),
        )),
    )
    .await
    .unwrap();
    for _ in 0..2 {
        let l = web.pick_where(|i| i.id == "web-b").unwrap();
        l.failure();
    }
    assert_eq!(picked(&web), set(&["web-a"]));
    // Held leases count as in flight: power-of-two-choices spreads them evenly over the two.
    let web = Endpoints::watch(&consul, "web", EndpointsOptions::default().tag("v1")).await.unwrap();
    let held: Vec<_> = (0..10).map(|_| web.pick().unwrap()).collect();
    assert_eq!(held.iter().filter(|l| l.instance().id == "web-a").count(), 5);

    // Deregistration removes an instance from the watch.
    consul.deregister_service("web-b").await.unwrap();
    until_instances(&web, &set(&["web-a"]), 2, "web-b deregistered").await;

    // Asking an unknown datacenter is Consul's error; a fallback that is unknown does not stop
    // the local instances from being served.
    match Endpoints::watch(&consul, "web", EndpointsOptions::default().datacenter("nowhere")).await {
        Err(ConsulError::Status { status: 500, message }) => {
            assert!(message.contains("No path to datacenter"), "{message}")
        }
        other => panic!("expected 500 No path to datacenter, got {other:?}"),
    }
    let web =
        Endpoints::watch(&consul, "web", EndpointsOptions::default().tag("v1").fallback("nowhere")).await.unwrap();
    assert_eq!((ids(&web), web.datacenter()), (set(&["web-a"]), Some(String::new())));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_drop_an_http_checked_instance_within_one_interval_and_take_it_back() {
    let node = MeshNode::start(&["--runtime", "process"]);
    let consul = ConsulClient::new(&node.url("")).unwrap();
    let interval = Duration::from_secs(1);
    let mut flags = Vec::new();
    for id in ["api-1", "api-2"] {
        let healthy = Arc::new(AtomicBool::new(true));
        let port = flip_server(healthy.clone()).await;
        let reg = ServiceRegistration::new("api", port).id(id).address("127.0.0.1").check(
            Check::http(format!("http://127.0.0.1:{port}/health"), interval).timeout(Duration::from_millis(500)),
        );
        consul.register_service(&reg).await.unwrap();
        flags.push(healthy);
    }
    let api = Endpoints::watch(&consul, "api", EndpointsOptions::default()).await.unwrap();
    // HTTP checks start critical and pass at their first run.
    until_instances(&api, &set(&["api-1", "api-2"]), 10, "both pass their first check").await;

    // api-1 starts failing: it turns critical at its next check (within one interval) and the
    // watch drops it at once, so within about one interval of the flip no call goes there.
    flags[0].store(false, Ordering::SeqCst);
    let took = until_instances(&api, &set(&["api-2"]), 3 * interval.as_secs(), "api-1 failing").await;
    eprintln!("api-1 left the endpoints {took:?} after its health endpoint started failing (interval {interval:?})");
    assert_eq!(picked(&api), set(&["api-2"]));
    flags[0].store(true, Ordering::SeqCst);
    let took = until_instances(&api, &set(&["api-1", "api-2"]), 3 * interval.as_secs(), "api-1 recovered").await;
    eprintln!("api-1 came back {took:?} after its health endpoint recovered");
    assert_eq!(picked(&api), set(&["api-1", "api-2"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_keeps_ttl_alive_and_deregisters_on_shutdown_and_drop() {
    let node = MeshNode::start(&["--runtime", "process"]);
    let consul = ConsulClient::new(&node.url("")).unwrap();
    let passing = |name: &'static str| {
        let node = &node;
        async move {
            let (_, v) = node.get(&format!("/v1/health/service/{name}?passing=1")).await;
            v.as_array()
                .map(|a| {
                    a.iter().filter_map(|e| e["Service"]["ID"].as_str().map(str::to_owned)).collect::<BTreeSet<_>>()
                })
                .unwrap_or_default()
        }
    };
    let ttl = Duration::from_millis(600);
    let reg = Registration::register(
        &consul,
        ServiceRegistration::new("worker", 9001).id("worker-1").address("127.0.0.1").check(Check::ttl(ttl)),
    )
    .await
    .unwrap();
    assert_eq!(reg.ttl_check_ids(), ["service:worker-1"]);
    assert_eq!(passing("worker").await, set(&["worker-1"]), "passing as soon as registered");
    // Over several TTLs the heartbeat keeps it passing.
    let until = Instant::now() + ttl * 5;
    while Instant::now() < until {
        assert_eq!(passing("worker").await, set(&["worker-1"]), "kept alive");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, checks) = node.get("/v1/agent/checks").await;
    assert_eq!(checks["service:worker-1"]["Status"], "passing", "{checks}");
    // The process reports itself critical (e.g. draining): it leaves the healthy set.
    reg.set_status(CheckStatus::Critical, Some("draining")).await.unwrap();
    eventually(5, "worker-1 critical", || async { passing("worker").await.is_empty().then_some(()) }).await;
    let (_, checks) = node.get("/v1/agent/checks").await;
    assert_eq!(checks["service:worker-1"]["Output"], "draining", "{checks}");
    reg.shutdown().await.unwrap();
    let (_, services) = node.get("/v1/agent/services").await;
    assert!(services.get("worker-1").is_none(), "deregistered by shutdown: {services}");

    // Several checks get service:<id>:<n>; dropping the registration deregisters it.
    let reg = Registration::register(
        &consul,
        ServiceRegistration::new("worker", 9002)
            .id("worker-2")
            .address("127.0.0.1")
            .check(Check::ttl(ttl))
            .check(Check::tcp(node.http.to_string(), Duration::from_secs(1))),
    )
    .await
    .unwrap();
    assert_eq!(reg.ttl_check_ids(), ["service:worker-2:1"]);
    let (_, checks) = node.get("/v1/agent/checks").await;
    assert!(checks.get("service:worker-2:1").is_some() && checks.get("service:worker-2:2").is_some(), "{checks}");
    eventually(10, "worker-2 passing (TTL kept, TCP check ran)", || async {
        (passing("worker").await == set(&["worker-2"])).then_some(())
    })
    .await;
    drop(reg);
    eventually(5, "worker-2 deregistered on drop", || async {
        let (_, services) = node.get("/v1/agent/services").await;
        services.get("worker-2").is_none().then_some(())
    })
    .await;

    // If the agent forgets the instance, the heartbeat registers it again.
    let reg = Registration::register(
        &consul,
        ServiceRegistration::new("worker", 9003).id("worker-3").address("127.0.0.1").check(Check::ttl(ttl)),
    )
    .await
    .unwrap();
    consul.deregister_service("worker-3").await.unwrap();
    eventually(5, "worker-3 registered again by its heartbeat", || async {
        (passing("worker").await == set(&["worker-3"])).then_some(())
    })
    .await;
    reg.shutdown().await.unwrap();
}

/// The port an echo-service prints it listens on.
async fn echo_port(p: &ExampleProc) -> u16 {
    let line = p.wait_line("listening on", 20).await;
    line.rsplit(':').next().and_then(|s| s.trim().parse().ok()).unwrap_or_else(|| panic!("no port in {line:?}"))
}

async fn get_json(url: &str) -> Option<(u16, Value)> {
    let c = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().ok()?;
    let r = c.get(url).send().await.ok()?;
    let status = r.status().as_u16();
    Some((status, r.json().await.ok()?))
}

async fn known(port: u16) -> BTreeSet<String> {
    match get_json(&format!("http://127.0.0.1:{port}/peers/known")).await {
        Some((200, v)) => v["instances"]
            .as_array()
            .map(|a| a.iter().filter_map(|i| i["id"].as_str().map(str::to_owned)).collect())
            .unwrap_or_default(),
        _ => BTreeSet::new(),
    }
}

fn echo(node: &MeshNode, id: &str) -> ExampleProc {
    let args: Vec<String> =
        ["--consul", &node.url(""), "--name", "echo", "--id", id, "--ttl", "1"].iter().map(|s| s.to_string()).collect();
    ExampleProc::spawn("echo-service", &args, &[])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_services_call_each_other_and_a_dead_one_drops_out() {
    let node = MeshNode::start(&["--runtime", "process"]);
    let a = echo(&node, "echo-a");
    let mut b = echo(&node, "echo-b");
    let (pa, pb) = (echo_port(&a).await, echo_port(&b).await);
    a.wait_line("registered echo-a as echo with TTL check service:echo-a", 20).await;

    // Each reaches the other through endpoints (never itself).
    for (port, me, peer) in [(pa, "echo-a", "echo-b"), (pb, "echo-b", "echo-a")] {
        let v = eventually(20, &format!("{me} reaches {peer}"), || async move {
            match get_json(&format!("http://127.0.0.1:{port}/peers")).await {
                Some((200, v)) => Some(v),
                _ => None,
            }
        })
        .await;
        assert_eq!((v["from"].as_str(), v["peer"].as_str()), (Some(me), Some(peer)), "{v}");
        assert_eq!(v["reply"]["id"], peer, "{v}");
        assert_eq!(v["reply"]["msg"], format!("hello from {me}"), "{v}");
    }
    // Their TTL heartbeats keep both passing well past the TTL (1 s).
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        assert_eq!(known(pa).await, set(&["echo-a", "echo-b"]));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // echo-b dies without deregistering (SIGKILL): its TTL expires, and echo-a's endpoints drop it.
    b.kill();
    let t0 = Instant::now();
    eventually(10, "echo-a no longer sees echo-b", || async { (known(pa).await == set(&["echo-a"])).then_some(()) })
        .await;
    eprintln!("echo-b left echo-a's endpoints {:?} after SIGKILL (TTL 1s)", t0.elapsed());
    let (status, v) = get_json(&format!("http://127.0.0.1:{pa}/peers")).await.unwrap();
    assert_eq!((status, v["error"].as_str()), (503, Some("no healthy peer")), "{v}");
    let (_, checks) = node.get("/v1/agent/checks").await;
    assert_eq!(checks["service:echo-b"]["Status"], "critical", "{checks}");

    // A third instance comes, and leaves cleanly with SIGTERM: deregistered at once.
    let mut c = echo(&node, "echo-c");
    let pc = echo_port(&c).await;
    eventually(20, "echo-a sees echo-c", || async { known(pa).await.contains("echo-c").then_some(()) }).await;
    let (status, v) = get_json(&format!("http://127.0.0.1:{pc}/peers")).await.unwrap();
    assert_eq!((status, v["peer"].as_str()), (200, Some("echo-a")), "{v}");
    c.terminate();
    c.wait_line("echo-c deregistered", 5).await;
    let (_, services) = node.get("/v1/agent/services").await;
    assert!(services.get("echo-c").is_none(), "{services}");
    eventually(5, "echo-a drops echo-c", || async { (!known(pa).await.contains("echo-c")).then_some(()) }).await;
}
