//! DNS across datacenters (issue 14, points 4 and 5): any node answers
//! `<svc>.service.<dc>.<domain>`, `<tag>.<svc>.service.<dc>`, RFC 2782 SRV with a datacenter and
//! `<node>.node.<dc>` with the other datacenter's addresses; prepared queries fail over to the
//! nearest datacenter (`/v1/query`, `<name>.query.<domain>`); `--dns-failover nearest` makes a
//! plain `<svc>.service.<domain>` do the same. Datacenters of one server (and an agent in dc1)
//! as separate processes on loopback addresses, asked with `dig`.

mod support;

use serde_json::{Value, json};
use std::time::Duration;
use support::*;

/// The loopback network of this test: `127.<a>.<third>.<host>`, unique to this process.
fn net(third: u8) -> String {
    format!("127.{}.{third}", 20 + std::process::id() % 200)
}

/// `GET path` on `node`, as JSON (`Null` when unreachable or not JSON).
async fn json(node: &MeshNode, path: &str) -> Value {
    match node.client.get(node.url(path)).timeout(Duration::from_secs(5)).send().await {
        Ok(r) => r.json().await.unwrap_or(Value::Null),
        Err(_) => Value::Null,
    }
}

/// Registers `web` on `node` (its own address) with a TTL check, tagged `v1`.
async fn register_web(node: &MeshNode, port: u16) {
    let body = json!({
        "Name": "web", "ID": "web", "Port": port, "Tags": ["v1"],
        "Check": {"CheckID": "web-ttl", "TTL": "600s", "Status": "passing"},
    });
    let (s, v) = node.send("PUT", "/v1/agent/service/register", Some(&body.to_string())).await;
    assert_eq!(s, 200, "{v}");
}

/// Sets `web`'s TTL check on `node` to `status` (`pass` or `fail`).
async fn set_web(node: &MeshNode, status: &str) {
    let (s, v) = node.send("PUT", &format!("/v1/agent/check/{status}/web-ttl"), None).await;
    assert_eq!(s, 200, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_of_another_datacenter_resolve_from_any_node() {
    let net = net(95);
    let tmp = tempfile::tempdir().expect("tempdir");
    let dc1 = wan_server(&net, &tmp.path().join("s1"), 1, "dc1", None, &[], &[]);
    let wan1 = format!("{net}.1:8302");
    let dc2 = wan_server(&net, &tmp.path().join("s2"), 2, "dc2", Some(&wan1), &[], &[]);
    // dc1's agent answers other datacenters' WAN addresses; dc2's agent has one.
    let a1 = wan_agent(&net, &tmp.path().join("a1"), 10, "dc1", 1, &["--translate-wan-addrs"]);
    let wan_ip = format!("{net}.120");
    let a2 = wan_agent(&net, &tmp.path().join("a2"), 20, "dc2", 2, &["--advertise-wan", &wan_ip]);
    eventually(60, "both datacenters known to dc1's agent", || async {
        (json(&a1, "/v1/catalog/datacenters").await == json!(["dc1", "dc2"])).then_some(())
    })
    .await;
    // `web` runs in dc2 only, on its agent.
    register_web(&a2, 8080).await;
    let (s, v) = dc2.get("/v1/catalog/node/agent20").await;
    assert_eq!((s, &v["Node"]["TaggedAddresses"]["wan"]), (200, &json!(wan_ip)), "{v}");

    for node in [&a1, &dc1] {
        // With --translate-wan-addrs (dc1's agent) dc2's WAN address; its LAN one otherwise.
        let a2_ip = if node.http.ip() == a1.http.ip() { wan_ip.clone() } else { a2.http.ip().to_string() };
        let (status, a) = eventually(30, "web.service.dc2.mesh from dc1", || async {
            let r = dig(node, "web.service.dc2.mesh", "A");
            (r.0 == "NOERROR").then_some(r)
        })
        .await;
        assert_eq!((status.as_str(), a), ("NOERROR", vec![a2_ip.clone()]));
        let (_, srv) = dig(node, "web.service.dc2.mesh", "SRV");
        assert_eq!(srv, vec!["1 1 8080 agent20.node.dc2.mesh.".to_owned()]);
        let (_, srv) = dig(node, "_web._v1.dc2.mesh", "SRV");
        assert_eq!(srv, vec!["1 1 8080 agent20.node.dc2.mesh.".to_owned()], "RFC 2782 with a datacenter");
        let (_, tagged) = dig(node, "v1.web.service.dc2.mesh", "A");
        assert_eq!(tagged, vec![a2_ip.clone()]);
        let (status, _) = dig(node, "v2.web.service.dc2.mesh", "A");
        assert_eq!(status, "NXDOMAIN", "no instance has tag v2");
        let (_, n) = dig(node, "agent20.node.dc2.mesh", "A");
        assert_eq!(n, vec![a2_ip.clone()], "a node of dc2");
        let (status, _) = dig(node, "nosuch.service.dc2.mesh", "A");
        assert_eq!(status, "NXDOMAIN");
        let (status, _) = dig(node, "web.service.dc9.mesh", "A");
        assert_eq!(status, "NXDOMAIN", "an unknown datacenter");
        let (status, _) = dig(node, "web.service.mesh", "A");
        assert_eq!(status, "NXDOMAIN", "dc1 has no web of its own, and plain names never fail over by default");
    }

    // A critical instance is never answered, across datacenters too.
    set_web(&a2, "fail").await;
    eventually(30, "dc2's critical web leaves dc1's answers", || async {
        (dig(&a1, "web.service.dc2.mesh", "A").0 == "NXDOMAIN").then_some(())
    })
    .await;
    set_web(&a2, "pass").await;

    // dc2's server gone: SERVFAIL within the lookup bound, never a hang; back when it is.
    let mut dc2 = dc2;
    dc2.stop_with("KILL");
    let started = std::time::Instant::now();
    let (status, _) = dig(&a1, "web.service.dc2.mesh", "A");
    assert_eq!(status, "SERVFAIL", "dc2 unreachable");
    assert!(started.elapsed() < Duration::from_secs(7), "{:?}", started.elapsed());
    drop(dc1);
}

/// Runs python `code` with `sys.argv[1:] = args`; its stdout, trimmed.
fn python(code: &str, args: &[&str]) -> String {
    let out = std::process::Command::new("python3").arg("-c").arg(code).args(args).output().expect("python3");
    assert!(out.status.success(), "python failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Whether py-consul can be imported (it must be with `MESH_REQUIRE_PYTHON=1`, as in CI).
fn have_py_consul() -> bool {
    let ok =
        std::process::Command::new("python3").args(["-c", "import consul"]).output().is_ok_and(|o| o.status.success());
    assert!(
        ok || std::env::var("MESH_REQUIRE_PYTHON").as_deref() != Ok("1"),
        "MESH_REQUIRE_PYTHON=1 but py-consul is missing"
    );
    ok
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_queries_and_dns_failover_answer_the_nearest_healthy_datacenter() {
    let net = net(96);
    let tmp = tempfile::tempdir().expect("tempdir");
    let dc1 = wan_server(&net, &tmp.path().join("s1"), 1, "dc1", None, &[], &[]);
    let wan1 = format!("{net}.1:8302");
    let _dc2 = wan_server(&net, &tmp.path().join("s2"), 2, "dc2", Some(&wan1), &[], &[]);
    // dc1's agent fails plain names over; its server does not (Consul's default).
    let a1 = wan_agent(&net, &tmp.path().join("a1"), 10, "dc1", 1, &["--dns-failover", "nearest"]);
    let a2 = wan_agent(&net, &tmp.path().join("a2"), 20, "dc2", 2, &[]);
    eventually(60, "both datacenters known to dc1's agent", || async {
        (json(&a1, "/v1/catalog/datacenters").await == json!(["dc1", "dc2"])).then_some(())
    })
    .await;
    register_web(&a1, 8081).await;
    register_web(&a2, 8082).await;
    let (a1_ip, a2_ip) = (a1.http.ip().to_string(), a2.http.ip().to_string());

    // A NearestN query, created with py-consul where it is installed (curl's JSON otherwise).
    let id = if have_py_consul() {
        python(
            "import sys, consul; c = consul.Consul(host=sys.argv[1], port=int(sys.argv[2])); \
             print(c.query.create('web', name='web', nearestn=1, ttl='10s')['ID'])",
            &[&a1.http.ip().to_string(), &a1.http.port().to_string()],
        )
    } else {
        let body =
            json!({"Name": "web", "Service": {"Service": "web", "Failover": {"NearestN": 1}}, "DNS": {"TTL": "10s"}});
        let (s, v) = a1.send("POST", "/v1/query", Some(&body.to_string())).await;
        assert_eq!(s, 200, "{v}");
        v["ID"].as_str().unwrap().to_owned()
    };
    let (s, v) = dc1.get(&format!("/v1/query/{id}")).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v[0]["Name"], "web");
    assert_eq!(v[0]["Service"]["Failover"]["NearestN"], 1);

    // Healthy at home: dc1's own instance, with the query's TTL.
    let exec = |node: &MeshNode| {
        let c = node.client.clone();
        let url = node.url("/v1/query/web/execute");
        async move { c.get(url).send().await.ok()?.json::<Value>().await.ok() }
    };
    let v = exec(&a1).await.unwrap();
    assert_eq!((v["Datacenter"].as_str(), v["Failovers"].as_u64()), (Some("dc1"), Some(0)), "{v}");
    assert_eq!(v["Nodes"][0]["Node"]["Node"], "agent10", "{v}");
    assert_eq!(dig(&a1, "web.query.mesh", "A"), ("NOERROR".to_owned(), vec![a1_ip.clone()]));
    assert_eq!(dig(&a1, "web.service.mesh", "A"), ("NOERROR".to_owned(), vec![a1_ip.clone()]));
    let ttl_of = |node: &MeshNode, name: &str| -> Option<u32> {
        let out = std::process::Command::new("dig")
            .args([&format!("@{}", node.dns.ip()), "-p", &node.dns.port().to_string(), name, "A", "+noall", "+answer"])
            .output()
            .ok()?;
        String::from_utf8_lossy(&out.stdout).split_whitespace().nth(1)?.parse().ok()
    };
    assert_eq!(ttl_of(&a1, "web.query.mesh"), Some(10), "DNS.TTL");

    // dc1's only instance critical: the query, and the plain name on the node with the option,
    // answer dc2's; the server without it says NXDOMAIN.
    set_web(&a1, "fail").await;
    eventually(30, "web.query.mesh fails over to dc2", || async {
        (dig(&a1, "web.query.mesh", "A") == ("NOERROR".to_owned(), vec![a2_ip.clone()])).then_some(())
    })
    .await;
    let v = exec(&a1).await.unwrap();
    assert_eq!((v["Datacenter"].as_str(), v["Failovers"].as_u64()), (Some("dc2"), Some(1)), "{v}");
    assert_eq!(dig(&a1, "web.service.mesh", "A"), ("NOERROR".to_owned(), vec![a2_ip.clone()]), "--dns-failover");
    assert_eq!(dig(&dc1, "web.service.mesh", "A").0, "NXDOMAIN", "no failover without the option");
    assert_eq!(dig(&dc1, "web.query.mesh", "A"), ("NOERROR".to_owned(), vec![a2_ip.clone()]), "from the server too");
    let (_, srv) = dig(&a1, "_web._tcp.query.mesh", "SRV");
    assert_eq!(srv, vec!["1 1 8082 agent20.node.dc2.mesh.".to_owned()]);

    // dc1 recovers: its own again.
    set_web(&a1, "pass").await;
    eventually(30, "web.query.mesh back home", || async {
        (dig(&a1, "web.query.mesh", "A") == ("NOERROR".to_owned(), vec![a1_ip.clone()])).then_some(())
    })
    .await;
    assert_eq!(dig(&a1, "web.service.mesh", "A"), ("NOERROR".to_owned(), vec![a1_ip.clone()]));

    // Templates: a catch-all that fails every service over.
    let body = json!({"Name": "", "Template": {"Type": "name_prefix_match"},
                      "Service": {"Service": "${name.full}", "Failover": {"Datacenters": ["dc2"]}}});
    let (s, v) = dc1.send("POST", "/v1/query", Some(&body.to_string())).await;
    assert_eq!(s, 200, "{v}");
    let (s, v) = dc1.send("PUT", "/v1/agent/service/register", Some(r#"{"Name":"api","Port":9000}"#)).await;
    assert_eq!(s, 200, "{v}");
    eventually(30, "api.query.mesh through the catch-all template", || async {
        (dig(&a1, "api.query.mesh", "A") == ("NOERROR".to_owned(), vec![dc1.http.ip().to_string()])).then_some(())
    })
    .await;
    let (s, v) = dc1.get("/v1/query/api/explain").await;
    assert_eq!((s, &v["Query"]["Service"]["Service"]), (200, &json!("api")), "{v}");

    // Bad input: Consul's errors, nothing stored.
    let before = dc1.get("/v1/query").await.1.as_array().map(Vec::len);
    let (s, _) = dc1.send("POST", "/v1/query", Some(r#"{"Name":"x","Service":{}}"#)).await;
    assert_eq!(s, 400);
    let (s, _) = dc1.send("POST", "/v1/query", Some(r#"{"Name":"web","Service":{"Service":"web"}}"#)).await;
    assert_eq!(s, 400, "the name is taken");
    assert_eq!(dc1.get("/v1/query").await.1.as_array().map(Vec::len), before);
    assert_eq!(dc1.get("/v1/query/nosuch").await.0, 404, "no query has that id");
    // The catch-all template answers every name: an empty result, NXDOMAIN in DNS.
    let (s, v) = dc1.get("/v1/query/nosuch/execute").await;
    assert_eq!((s, &v["Nodes"]), (200, &json!([])), "{v}");
    assert_eq!(dig(&a1, "nosuch.query.mesh", "A").0, "NXDOMAIN");
    let (s, _) = dc1.send("DELETE", &format!("/v1/query/{id}"), None).await;
    assert_eq!(s, 200);
    assert_eq!(dc1.get(&format!("/v1/query/{id}")).await.0, 404);
}
