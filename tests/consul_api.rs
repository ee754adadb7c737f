//! The Consul v1 agent/catalog/health API against a real `mesh dev`, with reqwest and DNS:
//! agent authority (visible in DNS before the reply), checks and their effect on DNS, node-level
//! checks, maintenance, DeregisterCriticalServiceAfter, script checks behind their flag, and bad
//! requests that change nothing.

mod support;

use serde_json::{Value, json};
use support::{MeshNode, eventually, srv};

fn ids(v: &Value) -> Vec<String> {
    let mut out: Vec<String> =
        v.as_array().into_iter().flatten().filter_map(|e| e["Service"]["ID"].as_str().map(str::to_owned)).collect();
    out.sort();
    out
}

async fn check_status(node: &MeshNode, service: &str, check: &str) -> Option<String> {
    let (_, checks) = node.get(&format!("/v1/health/checks/{service}")).await;
    checks.as_array()?.iter().find(|c| c["CheckID"] == check).and_then(|c| c["Status"].as_str()).map(str::to_owned)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_registration_is_in_dns_before_the_reply() {
    let node = MeshNode::start(&["--runtime", "process", "--no-registrator"]);
    let resolver = node.resolver(false);
    for i in 0..5 {
        let body = json!({"Name": "api", "ID": format!("api{i}"), "Port": 9000 + i, "Tags": ["blue"]});
        let (code, _) = node.send("PUT", "/v1/agent/service/register", Some(&body.to_string())).await;
        assert_eq!(code, 200);
        // No polling: the registration is applied and published before the reply.
        let answers = srv(&resolver, "api.service.mesh.").await.expect("SRV right after the reply");
        assert_eq!(answers.len(), i as usize + 1, "{answers:?}");
        let (_, health) = node.get("/v1/health/service/api").await;
        assert_eq!(ids(&health).len(), i as usize + 1);
    }
    let tagged = srv(&resolver, "blue.api.service.mesh.").await.expect("tag filter");
    assert_eq!(tagged.len(), 5);
    let (code, _) = node.send("PUT", "/v1/agent/service/deregister/api3", None).await;
    assert_eq!(code, 200);
    assert_eq!(srv(&resolver, "api.service.mesh.").await.expect("SRV").len(), 4);
    let (_, services) = node.get("/v1/agent/services").await;
    assert!(services.get("api3").is_none() && services.get("api2").is_some(), "{services}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn critical_checks_node_checks_and_maintenance_take_instances_out_of_dns() {
    let node = MeshNode::start(&["--runtime", "process", "--no-registrator"]);
    let resolver = node.resolver(false);
    // Distinct ports: SRV answers with the same node, address and port are one answer.
    let reg = |id: &str, port: u16, status: &str| {
        json!({"name": "pay", "id": id, "port": port, "check": {"ttl": "60s", "status": status}}).to_string()
    };
    for (id, port, status) in [("pay1", 7001, "passing"), ("pay2", 7002, "warning"), ("pay3", 7003, "critical")] {
        assert_eq!(node.send("PUT", "/v1/agent/service/register", Some(&reg(id, port, status))).await.0, 200);
    }
    // Warning instances are answered, critical ones are not (Consul's default).
    assert_eq!(srv(&resolver, "pay.service.mesh.").await.expect("SRV").len(), 2);
    let (_, passing) = node.get("/v1/health/service/pay?passing").await;
    assert_eq!(ids(&passing), vec!["pay1"]);

    // Service maintenance: a critical check on that instance only.
    let (code, _) = node.send("PUT", "/v1/agent/service/maintenance/pay1?enable=true&reason=upgrade", None).await;
    assert_eq!(code, 200);
    assert_eq!(srv(&resolver, "pay.service.mesh.").await.expect("SRV").len(), 1);
    let (_, checks) = node.get("/v1/agent/checks").await;
    assert_eq!(checks["_service_maintenance:pay1"]["Notes"], "upgrade");
    assert_eq!(node.send("PUT", "/v1/agent/service/maintenance/pay1?enable=false", None).await.0, 200);
    assert_eq!(srv(&resolver, "pay.service.mesh.").await.expect("SRV").len(), 2);

    // Node maintenance: a node-level critical check takes every service of the node out.
    assert_eq!(node.send("PUT", "/v1/agent/maintenance?enable=true", None).await.0, 200);
    assert!(srv(&resolver, "pay.service.mesh.").await.is_err(), "NXDOMAIN while the node is in maintenance");
    assert_eq!(node.send("PUT", "/v1/agent/maintenance?enable=false", None).await.0, 200);
    assert_eq!(srv(&resolver, "pay.service.mesh.").await.expect("SRV").len(), 2);

    // A node whose serfHealth is critical (registered through the catalog, as a failed agent
    // would be marked) has none of its services in DNS, whatever their own checks say.
    let ext = json!({
        "Node": "ext1", "Address": "10.9.0.1",
        "Service": {"Service": "pay", "ID": "pay-ext", "Port": 7001},
        "Checks": [{"CheckID": "serfHealth", "Name": "Serf Health Status", "Status": "critical"}],
    });
    assert_eq!(node.send("PUT", "/v1/catalog/register", Some(&ext.to_string())).await.0, 200);
    let answers = srv(&resolver, "pay.service.mesh.").await.expect("SRV");
    assert_eq!(answers.len(), 2, "{answers:?}");
    let ok = json!({"Node": "ext1", "Address": "10.9.0.1", "Check": {"CheckID": "serfHealth", "Name": "Serf Health Status", "Status": "passing"}});
    assert_eq!(node.send("PUT", "/v1/catalog/register", Some(&ok.to_string())).await.0, 200);
    assert_eq!(srv(&resolver, "pay.service.mesh.").await.expect("SRV").len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_and_tcp_checks_run_on_the_agent_with_thresholds() {
    let node = MeshNode::start(&["--runtime", "process", "--no-registrator"]);
    // A TCP listener we can close, and an HTTP port nobody listens on.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let dead = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap().port();
    let body = json!({
        "name": "tcpsvc", "id": "tcp1", "port": port,
        "checks": [
            {"tcp": format!("127.0.0.1:{port}"), "interval": "1s", "SuccessBeforePassing": 2},
            {"http": format!("http://127.0.0.1:{dead}/health"), "interval": "1s", "timeout": "500ms"},
        ],
    });
    assert_eq!(node.send("PUT", "/v1/agent/service/register", Some(&body.to_string())).await.0, 200);
    eventually(15, "TCP check passing after 2 successes", || async {
        (check_status(&node, "tcpsvc", "service:tcp1:1").await.as_deref() == Some("passing")).then_some(())
    })
    .await;
    let (_, checks) = node.get("/v1/health/checks/tcpsvc").await;
    let http = checks.as_array().unwrap().iter().find(|c| c["CheckID"] == "service:tcp1:2").unwrap().clone();
    assert_eq!(http["Status"], "critical", "{http}");
    assert_eq!(http["Type"], "http");
    drop(listener);
    eventually(15, "TCP check critical once the port closes", || async {
        (check_status(&node, "tcpsvc", "service:tcp1:1").await.as_deref() == Some("critical")).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deregister_critical_service_after_removes_the_service() {
    let node = MeshNode::start(&["--runtime", "process", "--no-registrator"]);
    let body = json!({"Name": "flaky", "ID": "flaky1", "Port": 1,
        "Check": {"TTL": "1s", "DeregisterCriticalServiceAfter": "2s", "Status": "passing"}});
    assert_eq!(node.send("PUT", "/v1/agent/service/register", Some(&body.to_string())).await.0, 200);
    let (_, services) = node.get("/v1/agent/services").await;
    assert!(services.get("flaky1").is_some());
    // TTL expires after 1 s, then 2 s of critical remove it.
    eventually(20, "the critical service to be reaped", || async {
        let (_, services) = node.get("/v1/agent/services").await;
        services.get("flaky1").is_none().then_some(())
    })
    .await;
    let (_, checks) = node.get("/v1/agent/checks").await;
    assert!(checks.get("service:flaky1").is_none(), "its checks go with it: {checks}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn script_checks_need_their_flag() {
    let off = MeshNode::start(&["--runtime", "process", "--no-registrator"]);
    let body = json!({"name": "s", "check": {"args": ["/bin/sh", "-c", "exit 1"], "interval": "1s"}}).to_string();
    let (code, msg) = off.send("PUT", "/v1/agent/service/register", Some(&body)).await;
    assert_eq!(code, 400);
    assert!(msg.as_str().unwrap_or_default().contains("Scripts are disabled"), "{msg}");
    let (_, services) = off.get("/v1/agent/services").await;
    assert!(services.get("s").is_none());
    drop(off);

    let on = MeshNode::start(&["--runtime", "process", "--no-registrator", "--enable-script-checks"]);
    assert_eq!(on.send("PUT", "/v1/agent/service/register", Some(&body)).await.0, 200);
    eventually(15, "exit 1 = warning", || async {
        (check_status(&on, "s", "service:s").await.as_deref() == Some("warning")).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_clear_errors_and_change_nothing() {
    let node = MeshNode::start(&["--runtime", "process", "--no-registrator"]);
    // The node's own registration (its serfHealth check and its consul service) lands once the
    // agent's session is up, which may be just after ready: compare against that state.
    eventually(30, "the node's own registration", || async {
        let (_, checks) = node.get("/v1/health/state/any").await;
        let (_, services) = node.get("/v1/catalog/services").await;
        let serf = checks.as_array()?.iter().any(|c| c["CheckID"] == "serfHealth");
        (serf && services.get("consul").is_some()).then_some(())
    })
    .await;
    let (_, before_services) = node.get("/v1/catalog/services").await;
    let (_, before_checks) = node.get("/v1/health/state/any").await;
    let cases: Vec<(&str, &str, &str, u16, &str)> = vec![
        ("PUT", "/v1/agent/service/register", "{not json", 400, "Request decode failed"),
        ("PUT", "/v1/agent/service/register", "[1,2]", 400, "expected a JSON object"),
        ("PUT", "/v1/agent/service/register", r#"{"Port": 80}"#, 400, "Missing service name"),
        ("PUT", "/v1/agent/service/register", r#"{"Name": "x", "Port": 70000}"#, 400, "Invalid service port"),
        ("PUT", "/v1/agent/service/register", r#"{"Name": "x", "Port": "80"}"#, 400, "Port must be"),
        (
            "PUT",
            "/v1/agent/service/register",
            r#"{"Name": "x", "Check": {"H2PING": "127.0.0.1:1", "Interval": "1s"}}"#,
            400,
            "not supported",
        ),
        (
            "PUT",
            "/v1/agent/service/register",
            r#"{"Name": "x", "Check": {"Interval": "1s"}}"#,
            400,
            "unknown or missing check type",
        ),
        (
            "PUT",
            "/v1/agent/service/register",
            r#"{"Name": "x", "Check": {"HTTP": "http://127.0.0.1:1/"}}"#,
            400,
            "Interval must be > 0",
        ),
        ("PUT", "/v1/agent/service/register", r#"{"Name": "x", "Check": {"TTL": "soon"}}"#, 400, "TTL"),
        (
            "PUT",
            "/v1/agent/service/register",
            r#"{"Name": "x", "Check": {"TTL": "10s", "Status": "great"}}"#,
            400,
            "Invalid check status",
        ),
        (
            "PUT",
            "/v1/agent/check/register",
            r#"{"Name": "c", "TTL": "10s", "ServiceID": "nope"}"#,
            404,
            "ServiceID \"nope\" does not exist",
        ),
        ("PUT", "/v1/agent/check/pass/nope", "", 404, "Unknown check ID"),
        ("PUT", "/v1/agent/check/update/serfHealth", r#"{"Status": "passing"}"#, 500, "does not have associated TTL"),
        ("PUT", "/v1/agent/service/deregister/nope", "", 404, "Unknown service ID"),
        ("PUT", "/v1/agent/service/maintenance/nope?enable=true", "", 404, "Unknown service ID"),
        ("PUT", "/v1/agent/maintenance", "", 400, "Missing value for enable"),
        ("PUT", "/v1/catalog/register", r#"{"Address": "10.0.0.1"}"#, 400, "Must supply node"),
        ("PUT", "/v1/catalog/register", r#"{"Node": "n9"}"#, 400, "Must supply address"),
        (
            "PUT",
            "/v1/catalog/register",
            r#"{"Node": "n9", "Address": "10.0.0.1", "Datacenter": "dc9"}"#,
            500,
            "No path to datacenter",
        ),
        ("GET", "/v1/health/state/sad", "", 400, "Invalid state"),
        ("GET", "/v1/health/service/web?index=1&wait=forever", "", 400, "Invalid wait"),
        ("GET", "/v1/catalog/nodes?dc=elsewhere", "", 500, "No path to datacenter"),
        ("GET", "/v1/catalog/nodes?filter=not%20a%20valid%20expression((", "", 400, "boolean expression"),
        ("GET", "/v1/health/service/web?filter=Service.Tags%20contains", "", 400, "expected a value"),
        ("GET", "/v1/agent/services?filter=Service%20%3D%20x", "", 400, "expected \"==\" or \"!=\""),
        ("PUT", "/v1/agent/service/deregister/consul", "", 404, "Unknown service ID"),
        ("PUT", "/v1/agent/join/127.0.0.1:1", "", 500, "Failed to join 127.0.0.1:1"),
        ("PUT", "/v1/agent/force-leave/nonexistent-node?prune", "", 500, "No node found with name"),
    ];
    for (method, path, body, want, text) in cases {
        let (code, msg) = node.send(method, path, (!body.is_empty()).then_some(body)).await;
        let msg = msg.as_str().map(str::to_owned).unwrap_or_else(|| msg.to_string());
        assert_eq!(code, want, "{method} {path} {body}: {msg}");
        assert!(msg.contains(text), "{method} {path} {body}: expected {text:?} in {msg:?}");
    }
    let (_, after_services) = node.get("/v1/catalog/services").await;
    let (_, after_checks) = node.get("/v1/health/state/any").await;
    assert_eq!(before_services, after_services);
    assert_eq!(before_checks, after_checks);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn marathon_tasks_show_their_health_as_a_check() {
    let node = MeshNode::start(&["--runtime", "process", "--no-registrator"]);
    let app = json!({"id": "/hc", "cmd": "sleep 600", "cpus": 0.01, "mem": 16, "instances": 1,
        "portDefinitions": [{"port": 0}],
        "healthChecks": [{"protocol": "COMMAND", "command": {"value": "true"}, "intervalSeconds": 1, "gracePeriodSeconds": 1}]});
    let (code, _) = node.send("POST", "/v2/apps", Some(&app.to_string())).await;
    assert_eq!(code, 201);
    let check = eventually(30, "a passing marathon check on the hc instance", || async {
        let (_, v) = node.get("/v1/health/checks/hc").await;
        v.as_array()?.iter().find(|c| c["Type"] == "marathon" && c["Status"] == "passing").cloned()
    })
    .await;
    assert!(check["CheckID"].as_str().unwrap().starts_with("marathon:"), "{check}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_dies_with_its_checks_and_releases_its_locks() {
    let node = MeshNode::start(&["--runtime", "process", "--no-registrator"]);
    let reg = json!({"Name": "leader", "ID": "leader1", "Port": 1, "Check": {"TTL": "60s", "Status": "passing"}});
    assert_eq!(node.send("PUT", "/v1/agent/service/register", Some(&reg.to_string())).await.0, 200);
    // A missing or critical check refuses the session, as Consul does.
    let (code, msg) = node.send("PUT", "/v1/session/create", Some(r#"{"ServiceChecks": ["nope"]}"#)).await;
    assert_eq!(code, 500, "{msg}");
    assert!(msg.as_str().unwrap_or_default().contains("Missing check 'nope' registration"), "{msg}");
    let (code, s) = node
        .send(
            "PUT",
            "/v1/session/create",
            Some(r#"{"Name": "lock", "ServiceChecks": ["service:leader1"], "LockDelay": "0s"}"#),
        )
        .await;
    assert_eq!(code, 200, "{s}");
    let id = s["ID"].as_str().unwrap().to_owned();
    let (code, took) = node.send("PUT", &format!("/v1/kv/service/leader?acquire={id}"), Some("me")).await;
    assert_eq!((code, took), (200, json!(true)));
    // The service's check goes critical: the session is invalidated and its lock released.
    assert_eq!(node.send("PUT", "/v1/agent/check/fail/service:leader1", None).await.0, 200);
    eventually(10, "the session to be invalidated", || async {
        let (_, info) = node.get(&format!("/v1/session/info/{id}")).await;
        (info == json!([])).then_some(())
    })
    .await;
    let (_, entry) = node.get("/v1/kv/service/leader").await;
    assert!(entry[0].get("Session").is_none_or(|s| s.is_null()), "the lock is released: {entry}");
    let (code, msg) = node.send("PUT", "/v1/session/create", Some(r#"{"ServiceChecks": ["service:leader1"]}"#)).await;
    assert_eq!(code, 500);
    assert!(msg.as_str().unwrap_or_default().contains("critical state"), "{msg}");
}

/// What a Consul user sees: per-node service ids, only agent registrations under /v1/agent,
/// registrations kept as sent, ?filter= on every listing, check intervals raised to 1 s, and
/// Consul's `/` and `/ui/`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consul_fidelity_ids_agent_views_filters_and_http_root() {
    let node = MeshNode::start(&["--runtime", "process", "--no-registrator", "--enable-script-checks"]);
    // The same service id on two nodes is two instances.
    for (n, addr) in [("n1", "10.1.10.11"), ("n2", "10.1.10.12")] {
        let body = json!({"Node": n, "Address": addr, "Service": {"Service": "s1", "Tags": [n]},
            "TaggedAddresses": {"lan": addr, "wan": "192.0.2.1"}});
        assert_eq!(node.send("PUT", "/v1/catalog/register", Some(&body.to_string())).await.0, 200);
    }
    let (_, list) = node.get("/v1/catalog/service/s1").await;
    let nodes: Vec<&str> = list.as_array().unwrap().iter().map(|e| e["Node"].as_str().unwrap()).collect();
    assert_eq!(nodes, ["n1", "n2"], "{list}");
    let (_, n1) = node.get("/v1/catalog/node/n1").await;
    assert_eq!(n1["Node"]["TaggedAddresses"], json!({"lan": "10.1.10.11", "wan": "192.0.2.1"}), "as sent");
    let (_, one) = node.get("/v1/catalog/service/s1?filter=%22n2%22%20in%20ServiceTags").await;
    assert_eq!(one.as_array().unwrap().len(), 1);
    assert_eq!(one[0]["Node"], "n2");
    let (_, nodes) = node.get("/v1/catalog/nodes?filter=Node%20matches%20%22%5En%5B12%5D%24%22").await;
    assert_eq!(nodes.as_array().unwrap().len(), 2, "{nodes}");
    let (_, ns) = node.get("/v1/catalog/node-services/n1?filter=Service%20%3D%3D%20s1").await;
    assert_eq!(ns["Services"].as_array().map(Vec::len), Some(1), "{ns}");
    let (_, svcs) = node.get("/v1/catalog/services?filter=%22n1%22%20in%20ServiceTags").await;
    assert_eq!(svcs, json!({"s1": ["n1"]}));

    // The node's own consul service stays, whoever asks.
    let me = node.get("/v1/agent/self").await.1["Config"]["NodeName"].as_str().unwrap().to_owned();
    let dereg = json!({"Node": me, "ServiceID": "consul"}).to_string();
    assert_eq!(node.send("PUT", "/v1/catalog/deregister", Some(&dereg)).await.0, 400);
    assert_eq!(node.send("PUT", "/v1/agent/service/deregister/consul", None).await.0, 404);
    assert_eq!(node.get("/v1/catalog/service/consul").await.1.as_array().map(Vec::len), Some(1));

    // Agent views: only what was registered through the agent.
    let (_, services) = node.get("/v1/agent/services").await;
    assert_eq!(services, json!({}), "no `consul` service: {services}");
    let (_, checks) = node.get("/v1/agent/checks").await;
    assert_eq!(checks, json!({}), "no serfHealth: {checks}");
    let reg = json!({"Name": "web", "ID": "web1", "Tags": ["keep"], "EnableTagOverride": true,
        "TaggedAddresses": {"lan": {"Address": "10.10.10.1", "Port": 8080}},
        // 10 ns, as py-consul sends an integer interval: raised to Consul's 1 s minimum.
        "Check": {"Args": ["/bin/true"], "Interval": 10}});
    assert_eq!(node.send("PUT", "/v1/agent/service/register", Some(&reg.to_string())).await.0, 200);
    let other = json!({"Name": "web", "ID": "web2", "Tags": ["skip"]});
    assert_eq!(node.send("PUT", "/v1/agent/service/register", Some(&other.to_string())).await.0, 200);
    let (_, services) = node.get("/v1/agent/services").await;
    let web1 = &services["web1"];
    assert_eq!(web1["EnableTagOverride"], true);
    assert_eq!(web1["TaggedAddresses"], json!({"lan": {"Address": "10.10.10.1", "Port": 8080}}));
    assert!(web1.get("Kind").is_none(), "no empty Kind: {web1}");
    let proxy = json!({"Name": "web-sidecar-proxy", "Port": 21000, "Kind": "connect-proxy",
        "Proxy": {"DestinationServiceName": "web", "LocalServicePort": 8080},
        "Locality": {"Region": "us-west-1", "Zone": "us-west-1a"}});
    assert_eq!(node.send("PUT", "/v1/agent/service/register", Some(&proxy.to_string())).await.0, 200);
    let (_, svc) = node.get("/v1/agent/service/web-sidecar-proxy").await;
    assert_eq!(svc["Kind"], "connect-proxy");
    assert_eq!(svc["Proxy"], proxy["Proxy"]);
    assert_eq!(svc["Locality"], proxy["Locality"]);
    let bad = json!({"Name": "x", "Proxy": "nope"}).to_string();
    assert_eq!(node.send("PUT", "/v1/agent/service/register", Some(&bad)).await.0, 400);
    assert_eq!(node.send("PUT", "/v1/agent/service/deregister/web-sidecar-proxy", None).await.0, 200);
    let (_, kept) = node.get("/v1/agent/services?filter=%22keep%22%20in%20Tags").await;
    assert_eq!(kept.as_object().unwrap().keys().collect::<Vec<_>>(), ["web1"]);
    let (_, checks) = node.get("/v1/agent/checks").await;
    assert_eq!(checks["service:web1"]["Interval"], "1s", "{checks}");
    let (_, none) = node.get("/v1/health/service/web?filter=Service.ID%20%3D%3D%20%60nope%60").await;
    assert_eq!(none, json!([]));
    let (_, hs) =
        node.get("/v1/health/service/web?filter=Service.ID%20%3D%3D%20web2%20or%20Service.ID%20%3D%3D%20web1").await;
    assert_eq!(hs.as_array().unwrap().len(), 2);
    let (_, hc) = node.get("/v1/health/checks/web?filter=CheckID%20%3D%3D%20%22service%3Aweb1%22").await;
    assert_eq!(hc.as_array().unwrap().len(), 1, "{hc}");
    let (_, st) = node.get("/v1/health/state/any?filter=ServiceID%20is%20empty").await;
    assert!(st.as_array().unwrap().iter().all(|c| c["ServiceID"] == ""), "{st}");

    // Consul's HTTP root and UI; reload and leave answer 200 in dev.
    let no_redirect = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    let r = no_redirect.get(node.url("/")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 301);
    assert_eq!(r.headers()["location"], "/ui/");
    let r = no_redirect.get(node.url("/ui/")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert!(r.text().await.unwrap().contains("mesh"));
    assert_eq!(node.send("PUT", "/v1/agent/reload", None).await.0, 200);
    assert_eq!(node.send("PUT", "/v1/agent/leave", None).await.0, 200);
}

/// A minimal gRPC health server over h2c: every Check answers `status` (1 SERVING, 2 NOT_SERVING).
async fn grpc_health_server(status: u8) -> std::net::SocketAddr {
    use http_body_util::StreamBody;
    use hyper::body::Frame;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| async move {
                assert_eq!(req.uri().path(), "/grpc.health.v1.Health/Check");
                let mut trailers = hyper::HeaderMap::new();
                trailers.insert("grpc-status", "0".parse().unwrap());
                let frames: Vec<Result<Frame<axum::body::Bytes>, std::convert::Infallible>> = vec![
                    Ok(Frame::data(axum::body::Bytes::from(vec![0, 0, 0, 0, 2, 0x08, status]))),
                    Ok(Frame::trailers(trailers)),
                ];
                let body = StreamBody::new(futures_util::stream::iter(frames));
                Ok::<_, std::convert::Infallible>(
                    hyper::Response::builder().header("content-type", "application/grpc").body(body).unwrap(),
                )
            });
            tokio::spawn(
                hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc),
            );
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_checks_ask_the_grpc_health_service() {
    let node = MeshNode::start(&["--runtime", "process", "--no-registrator"]);
    let serving = grpc_health_server(1).await;
    let not_serving = grpc_health_server(2).await;
    let dead = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
    let body = json!({"name": "g", "id": "g1", "port": serving.port(), "checks": [
        {"grpc": serving.to_string(), "interval": "1s"},
        {"grpc": format!("{not_serving}/my.Service"), "interval": "1s"},
        // below Consul's 1 s minimum: raised to it, not rejected
        {"grpc": dead.to_string(), "interval": "100ms"},
    ]});
    let (code, msg) = node.send("PUT", "/v1/agent/service/register", Some(&body.to_string())).await;
    assert_eq!(code, 200, "{msg}");
    eventually(15, "the SERVING server's check passing", || async {
        (check_status(&node, "g", "service:g1:1").await.as_deref() == Some("passing")).then_some(())
    })
    .await;
    let (_, checks) = node.get("/v1/health/checks/g").await;
    let by_id = |id: &str| checks.as_array().unwrap().iter().find(|c| c["CheckID"] == id).unwrap().clone();
    assert_eq!(by_id("service:g1:1")["Type"], "grpc");
    let ns = by_id("service:g1:2");
    assert_eq!(ns["Status"], "critical", "{ns}");
    let dead_check = by_id("service:g1:3");
    assert_eq!(dead_check["Status"], "critical");
    assert_eq!(dead_check["Interval"], "1s");
    // The NOT_SERVING verdict is the server's, not a connection failure.
    eventually(15, "NOT_SERVING in the output", || async {
        let (_, checks) = node.get("/v1/health/checks/g").await;
        checks
            .as_array()?
            .iter()
            .any(|c| c["CheckID"] == "service:g1:2" && c["Output"].as_str().is_some_and(|o| o.contains("NOT_SERVING")))
            .then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_events_metrics_and_peers() {
    let node = MeshNode::start(&["--runtime", "process", "--no-registrator"]);
    // An event for this node is kept; one for another node is not.
    let (code, ev) = node.send("PUT", "/v1/event/fire/deploy", Some("v42")).await;
    assert_eq!(code, 200, "{ev}");
    assert_eq!(ev["Name"], "deploy");
    assert_eq!(ev["Payload"], "djQy", "base64 of the body");
    assert_eq!(node.send("PUT", "/v1/event/fire/other?node=%5Eelsewhere%24", None).await.0, 200);
    assert_eq!(node.send("PUT", "/v1/event/fire/x?node=(", None).await.0, 400, "a bad regex is a 400");
    assert_eq!(node.send("PUT", "/v1/event/fire/x?tag=a", None).await.0, 400, "tag needs service");
    let r = node.client.get(node.url("/v1/event/list")).send().await.unwrap();
    let index: u64 = r.headers()["X-Consul-Index"].to_str().unwrap().parse().unwrap();
    let list: Value = r.json().await.unwrap();
    let names: Vec<&str> = list.as_array().unwrap().iter().map(|e| e["Name"].as_str().unwrap()).collect();
    assert_eq!(names, ["deploy"], "{list}");
    let (_, none) = node.get("/v1/event/list?name=nothing").await;
    assert_eq!(none, json!([]));
    // A blocking list returns when the next event arrives.
    let waiter = {
        let url = node.url(&format!("/v1/event/list?name=later&index={index}&wait=20s"));
        let client = node.client.clone();
        tokio::spawn(async move { client.get(url).send().await.unwrap().json::<Value>().await.unwrap() })
    };
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert!(!waiter.is_finished(), "the blocking list waits for a new event");
    assert_eq!(node.send("PUT", "/v1/event/fire/later", None).await.0, 200);
    let got = tokio::time::timeout(std::time::Duration::from_secs(10), waiter).await.unwrap().unwrap();
    assert_eq!(got[0]["Name"], "later");

    let (code, m) = node.get("/v1/agent/metrics").await;
    assert_eq!(code, 200);
    assert!(m["Timestamp"].is_string() && m["Gauges"].is_array(), "{m}");
    let (code, _) = node.get("/v1/agent/metrics?format=prometheus").await;
    assert_eq!(code, 200);

    // Coordinates: every node starts at Consul's initial coordinate; an update is kept.
    let (_, dcs) = node.get("/v1/coordinate/datacenters").await;
    let me = dcs[0]["Coordinates"][0]["Node"].as_str().unwrap().to_owned();
    assert_eq!(dcs[0]["Datacenter"], "dc1");
    assert_eq!(dcs[0]["Coordinates"][0]["Coord"]["Error"], 1.5);
    let coord = json!({"Vec": [0.5, 0, 0, 0, 0, 0, 0, 0], "Error": 0.25, "Adjustment": 0, "Height": 0.001});
    let upd = json!({"Node": me, "Coord": coord}).to_string();
    assert_eq!(node.send("PUT", "/v1/coordinate/update", Some(&upd)).await.0, 200);
    let (_, mine) = node.get(&format!("/v1/coordinate/node/{me}")).await;
    assert_eq!(mine[0]["Coord"]["Vec"][0], 0.5, "{mine}");
    assert_eq!(mine[0]["Coord"]["Error"], 0.25);
    assert_eq!(node.get("/v1/coordinate/node/nowhere").await.0, 404);
    let short = json!({"Node": me, "Coord": {"Vec": [1, 2]}}).to_string();
    assert_eq!(node.send("PUT", "/v1/coordinate/update", Some(&short)).await.0, 400);
    let (_, all) = node.get("/v1/coordinate/nodes").await;
    assert_eq!(all.as_array().map(Vec::len), Some(1), "{all}");

    // No peerings: a peer has no services.
    let reg = json!({"Name": "p", "ID": "p1"}).to_string();
    assert_eq!(node.send("PUT", "/v1/agent/service/register", Some(&reg)).await.0, 200);
    assert_eq!(node.get("/v1/health/service/p").await.1.as_array().map(Vec::len), Some(1));
    assert_eq!(node.get("/v1/health/service/p?peer=nobody").await.1, json!([]));
    assert_eq!(node.get("/v1/catalog/service/p?peer=nobody").await.1, json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_monitor_streams_log_lines() {
    use futures_util::StreamExt;
    let node = MeshNode::start(&["--runtime", "process", "--no-registrator"]);
    let (code, msg) = node.get("/v1/agent/monitor?loglevel=loud").await;
    assert_eq!(code, 400);
    assert!(msg.as_str().unwrap_or_default().contains("Unknown log level: loud"), "{msg}");
    let r = node.client.get(node.url("/v1/agent/monitor?loglevel=debug")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let mut body = r.bytes_stream();
    // Something that logs: an app whose task starts (the node runs with mesh_server=debug).
    let app = json!({"id": "/mon", "cmd": "sleep 600", "cpus": 0.01, "mem": 16, "instances": 1});
    assert_eq!(node.send("POST", "/v2/apps", Some(&app.to_string())).await.0, 201);
    let chunk = tokio::time::timeout(std::time::Duration::from_secs(20), body.next())
        .await
        .expect("a log line within 20 s")
        .expect("the stream stays open")
        .unwrap();
    let text = String::from_utf8_lossy(&chunk);
    assert!(["DEBUG", "INFO", "WARN", "ERROR"].iter().any(|l| text.contains(l)), "{text}");
    assert!(!text.contains('\u{1b}'), "no colour codes: {text:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_endpoints_describe_a_single_server() {
    let node = MeshNode::start(&["--runtime", "process", "--no-registrator"]);
    let me = node.get("/v1/agent/self").await.1["Config"]["NodeName"].as_str().unwrap().to_owned();
    let (code, raft) = node.get("/v1/operator/raft/configuration").await;
    assert_eq!(code, 200);
    let servers = raft["Servers"].as_array().unwrap();
    assert_eq!(servers.len(), 1, "{raft}");
    assert_eq!(
        (servers[0]["Node"].as_str(), &servers[0]["Leader"], &servers[0]["Voter"]),
        (Some(me.as_str()), &json!(true), &json!(true))
    );
    let id = servers[0]["ID"].as_str().unwrap().to_owned();
    let (code, msg) = node.send("DELETE", "/v1/operator/raft/peer?address=10.255.255.1:8300", None).await;
    assert_eq!(code, 500);
    assert!(msg.as_str().unwrap().contains("was not found in the Raft configuration"), "{msg}");
    let (code, msg) = node.send("DELETE", &format!("/v1/operator/raft/peer?id={id}"), None).await;
    assert_eq!(code, 500, "the only server is not removed");
    assert!(msg.as_str().unwrap().contains("only server"), "{msg}");
    assert_eq!(node.send("DELETE", "/v1/operator/raft/peer", None).await.0, 400);
    assert_eq!(node.send("POST", "/v1/operator/raft/transfer-leader", None).await.0, 500);
    let (code, health) = node.get("/v1/operator/autopilot/health").await;
    assert_eq!(code, 200);
    assert_eq!(health["Healthy"], true);
    assert_eq!(health["Servers"][0]["ID"], id.as_str());
    assert_eq!(node.get("/v1/operator/keyring").await.0, 500);
    // Autopilot configuration: Consul's defaults; a PUT replaces it, with an optional cas.
    let (_, ap) = node.get("/v1/operator/autopilot/configuration").await;
    assert_eq!(ap["CleanupDeadServers"], true);
    let idx = ap["ModifyIndex"].as_u64().unwrap();
    let off = json!({"CleanupDeadServers": false}).to_string();
    let stale = format!("/v1/operator/autopilot/configuration?cas={}", idx + 1000);
    assert_eq!(node.send("PUT", &stale, Some(&off)).await.1, json!(false));
    assert_eq!(node.get("/v1/operator/autopilot/configuration").await.1["CleanupDeadServers"], true);
    let right = format!("/v1/operator/autopilot/configuration?cas={idx}");
    assert_eq!(node.send("PUT", &right, Some(&off)).await.1, json!(true));
    let (_, ap) = node.get("/v1/operator/autopilot/configuration").await;
    assert_eq!(
        (ap["CleanupDeadServers"].clone(), ap["MaxTrailingLogs"].clone()),
        (json!(false), json!(0)),
        "replaced: {ap}"
    );
    let wrong = json!({"MaxTrailingLogs": "many"}).to_string();
    assert_eq!(node.send("PUT", "/v1/operator/autopilot/configuration", Some(&wrong)).await.0, 400);
    let reg = json!({"Name": "u", "ID": "u1"}).to_string();
    assert_eq!(node.send("PUT", "/v1/agent/service/register", Some(&reg)).await.0, 200);
    let (_, usage) = node.get("/v1/operator/usage").await;
    assert_eq!(usage["Usage"]["dc1"]["Nodes"], 1);
    assert_eq!(usage["Usage"]["dc1"]["Services"], 2, "consul and u: {usage}");
}
