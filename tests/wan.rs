//! Datacenters joined by a WAN pool (the first step of issue 14): the servers of every
//! datacenter gossip in one pool of their own (`--serf-wan`, `--join-wan`, members named
//! `<node>.<dc>`), apart from each datacenter's LAN pool. Two datacenters of one server each
//! and an agent in dc1, as separate processes on loopback addresses: every node lists both
//! datacenters (its own first), a server lists the WAN members, an agent none, `mesh members
//! -wan` prints them; Consul requests with `?dc=dc2` sent to dc1's server or agent (curl-like
//! and py-consul's `Consul(dc="dc2")`) are answered by dc2, reads and writes; an unknown
//! datacenter and an unreachable one get Consul's two errors; a dc2 server killed is failed in
//! dc1's view and alive again when it comes back; a datacenter name that is no DNS label is
//! refused.

mod support;

use serde_json::Value;
use std::time::Duration;
use support::*;

/// The loopback network of this test: `127.<a>.90.<host>`, unique to this process.
fn net() -> String {
    format!("127.{}.90", 20 + std::process::id() % 200)
}

/// `GET path` on `node`, as JSON (`Null` when unreachable or not JSON).
async fn json(node: &MeshNode, path: &str) -> Value {
    match node.client.get(node.url(path)).timeout(std::time::Duration::from_secs(3)).send().await {
        Ok(r) => r.json().await.unwrap_or(Value::Null),
        Err(_) => Value::Null,
    }
}

/// The WAN members `node` lists: `(name, status, dc)`, sorted.
async fn wan_members(node: &MeshNode) -> Vec<(String, u64, String)> {
    let v = json(node, "/v1/agent/members?wan=1").await;
    let mut out: Vec<(String, u64, String)> = v
        .as_array()
        .map(|ms| {
            ms.iter()
                .map(|m| {
                    (
                        m["Name"].as_str().unwrap_or_default().to_owned(),
                        m["Status"].as_u64().unwrap_or(0),
                        m["Tags"]["dc"].as_str().unwrap_or_default().to_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_datacenters_know_each_other_through_the_wan_pool() {
    let net = net();
    let tmp = tempfile::tempdir().expect("tempdir");
    let dc1 = wan_server(&net, &tmp.path().join("server1"), 1, "dc1", None, &[], &[]);
    let wan1 = format!("{net}.1:8302");
    let mut dc2 = wan_server(&net, &tmp.path().join("server2"), 2, "dc2", Some(&wan1), &[], &[]);
    let agent_ip = format!("{net}.10");
    let agent = MeshNode::start_role(
        "agent",
        &agent_ip,
        &tmp.path().join("agent"),
        port_range(),
        "agent1",
        &[
            "--bind",
            &agent_ip,
            "--rpc",
            &format!("{agent_ip}:8300"),
            "--dc",
            "dc1",
            "--join",
            &format!("{net}.1:8301"),
            "--gossip-probe-period",
            "200ms",
            "--runtime",
            "process",
            "--no-registrator",
        ],
    );

    // Every node knows both datacenters, its own first.
    let both = |own: &str, other: &str| serde_json::json!([own, other]);
    eventually(30, "dc1 lists dc2", || async {
        (json(&dc1, "/v1/catalog/datacenters").await == both("dc1", "dc2")).then_some(())
    })
    .await;
    eventually(30, "dc2 lists dc1", || async {
        (json(&dc2, "/v1/catalog/datacenters").await == both("dc2", "dc1")).then_some(())
    })
    .await;
    eventually(30, "the agent lists both", || async {
        (json(&agent, "/v1/catalog/datacenters").await == both("dc1", "dc2")).then_some(())
    })
    .await;

    // The WAN pool holds the servers, named <node>.<dc>; the LAN pools stay apart.
    let want = vec![("server1.dc1".to_owned(), 1, "dc1".to_owned()), ("server2.dc2".to_owned(), 1, "dc2".to_owned())];
    eventually(30, "both servers alive in both views", || async {
        (wan_members(&dc1).await == want && wan_members(&dc2).await == want).then_some(())
    })
    .await;
    let v = json(&dc1, "/v1/agent/members?wan=1").await;
    let me = v.as_array().unwrap().iter().find(|m| m["Name"] == "server1.dc1").unwrap().clone();
    assert_eq!(me["Port"], 8302, "{me}");
    assert_eq!(me["Tags"]["role"], "consul", "{me}");
    let lan: Vec<String> = json(&dc1, "/v1/agent/members")
        .await
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["Name"].as_str().unwrap().to_owned())
        .collect();
    assert!(lan.contains(&"agent1".to_owned()) && !lan.iter().any(|n| n.starts_with("server2")), "{lan:?}");
    assert_eq!(json(&agent, "/v1/agent/members?wan=1").await, serde_json::json!([]), "an agent is in no WAN pool");
    let self_ = json(&dc1, "/v1/agent/self").await;
    assert_eq!(self_["Stats"]["consul"]["known_datacenters"], "2", "{self_}");

    // `mesh members -wan`, as `consul members -wan`.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mesh"))
        .args(["members", "-wan", "--http-addr", &dc1.http.to_string()])
        .output()
        .expect("mesh members");
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{printed} {}", String::from_utf8_lossy(&out.stderr));
    assert!(
        printed.lines().any(|l| l.starts_with("server2.dc2") && l.contains("alive") && l.ends_with("dc2")),
        "{printed}"
    );

    // `?dc=dc2` through dc1 (its server, and its agent through the server) is answered by dc2.
    let (s, v) = dc2.send("PUT", "/v1/agent/service/register", Some(r#"{"Name":"web","Port":8080}"#)).await;
    assert_eq!(s, 200, "{v}");
    for node in [&dc1, &agent] {
        eventually(30, "web of dc2 read through dc1", || async {
            let v = json(node, "/v1/catalog/service/web?dc=dc2").await;
            let one = v.as_array()?.first()?.clone();
            (one["Datacenter"] == "dc2" && one["Node"] == "server2" && one["ServicePort"] == 8080).then_some(())
        })
        .await;
    }
    assert_eq!(json(&dc1, "/v1/catalog/service/web").await, serde_json::json!([]), "dc1 has none of its own");
    let r = agent.client.put(agent.url("/v1/kv/cross?dc=dc2")).body("written-in-dc2").send().await.unwrap();
    assert_eq!(r.text().await.unwrap().trim(), "true");
    let r = dc2.client.get(dc2.url("/v1/kv/cross?raw")).send().await.unwrap();
    assert_eq!(r.text().await.unwrap(), "written-in-dc2", "the write went to dc2");
    assert_eq!(dc1.get("/v1/kv/cross").await.0, 404, "and not to dc1");
    // A blocking query on another datacenter (a py-consul watch with `dc=`) is held there and
    // answers when dc2 changes, through dc1's agent.
    let r = agent.client.get(agent.url("/v1/kv/cross?dc=dc2")).send().await.unwrap();
    let index: u64 = r.headers()["x-consul-index"].to_str().unwrap().parse().unwrap();
    let watch = {
        let (client, url) =
            (agent.client.clone(), agent.url(&format!("/v1/kv/cross?dc=dc2&raw&index={index}&wait=60s")));
        tokio::spawn(async move {
            let r = client.get(url).timeout(Duration::from_secs(90)).send().await.unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        })
    };
    let r = dc2.client.put(dc2.url("/v1/kv/cross")).body("changed-in-dc2").send().await.unwrap();
    assert_eq!(r.text().await.unwrap().trim(), "true");
    assert_eq!(watch.await.unwrap(), (200, "changed-in-dc2".to_owned()), "the watch woke up");
    let r = dc2.client.put(dc2.url("/v1/kv/cross")).body("written-in-dc2").send().await.unwrap();
    assert_eq!(r.text().await.unwrap().trim(), "true");
    // py-consul with dc="dc2", given dc1's server and dc1's agent.
    for node in [&dc1, &agent].into_iter().filter(|_| have_py_consul()) {
        let out = std::process::Command::new("python3")
            .args([
                "-c",
                "import sys, consul; c = consul.Consul(host=sys.argv[1], port=int(sys.argv[2]), dc='dc2'); \
                 print(c.kv.get('cross')[1]['Value'].decode(), c.catalog.datacenters())",
                &node.http.ip().to_string(),
                &node.http.port().to_string(),
            ])
            .output()
            .expect("python3");
        let printed = String::from_utf8_lossy(&out.stdout);
        assert_eq!(printed.trim(), "written-in-dc2 ['dc1', 'dc2']", "{}", String::from_utf8_lossy(&out.stderr));
    }
    // An unknown datacenter, as Consul answers it.
    let r = dc1.client.get(dc1.url("/v1/kv/cross?dc=dc9")).send().await.unwrap();
    assert_eq!(r.status(), 500);
    assert_eq!(r.text().await.unwrap(), "No path to datacenter");

    // dc2's server dies: failed in dc1's view (dc2 is still a known datacenter, as in Consul),
    // `?dc=dc2` is Consul's error for a datacenter with no server reachable, and all is back
    // once the server is.
    dc2.stop_with("KILL");
    eventually(30, "server2.dc2 failed in dc1's view", || async {
        wan_members(&dc1).await.iter().any(|(n, s, _)| n == "server2.dc2" && *s == 4).then_some(())
    })
    .await;
    assert_eq!(json(&dc1, "/v1/catalog/datacenters").await, both("dc1", "dc2"));
    for node in [&dc1, &agent] {
        let r = node.client.get(node.url("/v1/kv/cross?dc=dc2")).send().await.unwrap();
        assert_eq!(r.status(), 500);
        assert_eq!(r.text().await.unwrap(), "Remote DC has no server currently reachable");
    }
    let dc2 = restart_server(&dc2);
    eventually(30, "server2.dc2 alive again", || async {
        (wan_members(&dc1).await == want && wan_members(&dc2).await == want).then_some(())
    })
    .await;
    eventually(30, "?dc=dc2 answered again", || async {
        let r = dc1.client.get(dc1.url("/v1/kv/cross?dc=dc2&raw")).send().await.ok()?;
        (r.text().await.ok()? == "written-in-dc2").then_some(())
    })
    .await;

    // A datacenter name must be a DNS label (it is one in `web.service.dc2.mesh`).
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mesh"))
        .args(["server", "--dc", "bad.dc", "--data-dir"])
        .arg(tmp.path().join("bad"))
        .output()
        .expect("mesh server");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a valid datacenter name"));
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

/// Start `old` again on its data dir with its arguments.
fn restart_server(old: &MeshNode) -> MeshNode {
    let args: Vec<&str> = old.extra.iter().map(String::as_str).collect();
    MeshNode::start_role("server", &old.http.ip().to_string(), &old.data_dir, old.ports, &old.name, &args)
}
