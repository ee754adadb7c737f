//! Failover across three datacenters at different distances (issue 14, must-show): dc1 has three
//! servers (one Raft group) and an agent, dc2 and dc3 a server each, processes on loopback
//! addresses; dc1's servers see dc3 at +20 ms and dc2 at +60 ms (the test-only in-transport
//! delay `MESH_TEST_RPC_DELAY`; the nearer one is not the first by name, so only measured
//! distances give the order). dc1 orders the datacenters by distance; with dc1's instance
//! critical, a NearestN query and `--dns-failover nearest` answer the nearer dc3; with dc3's
//! server killed, dc2 — while dc1 keeps serving its own writes and names; and dc1's own again
//! once it recovers.

mod support;

use serde_json::{Value, json};
use std::path::Path;
use std::time::{Duration, Instant};
use support::*;

fn net() -> String {
    format!("127.{}.98", 20 + std::process::id() % 200)
}

fn server(net: &str, dir: &Path, i: u8, dc: &str, extra: &[&str], env: &[(&str, &str)]) -> MeshNode {
    let ip = format!("{net}.{i}");
    let rpc = format!("{ip}:8300");
    let wan = format!("{net}.1:8302");
    let mut args = vec![
        "--bind",
        &ip,
        "--rpc",
        &rpc,
        "--dc",
        dc,
        "--gossip-probe-period",
        "200ms",
        "--gossip-wan-probe-period",
        "200ms",
        "--join-wan",
        &wan,
    ];
    args.extend(extra);
    MeshNode::start_role_env("server", &ip, dir, port_range(), &format!("server{i}"), &args, env)
}

fn dig(node: &MeshNode, name: &str) -> (String, Vec<String>) {
    let out = std::process::Command::new("dig")
        .args([
            &format!("@{}", node.dns.ip()),
            "-p",
            &node.dns.port().to_string(),
            name,
            "A",
            "+noall",
            "+comments",
            "+answer",
            "+time=8",
            "+tries=1",
        ])
        .output()
        .expect("dig (bind9-dnsutils) must be installed");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let status = text.split("status: ").nth(1).and_then(|s| s.split(',').next()).unwrap_or("no answer").to_owned();
    let mut answers: Vec<String> = text
        .lines()
        .filter(|l| !l.starts_with(';') && !l.trim().is_empty())
        .filter_map(|l| l.split_whitespace().nth(4).map(str::to_owned))
        .collect();
    answers.sort();
    (status, answers)
}

async fn json(node: &MeshNode, path: &str) -> Value {
    match node.client.get(node.url(path)).timeout(Duration::from_secs(10)).send().await {
        Ok(r) => r.json().await.unwrap_or(Value::Null),
        Err(_) => Value::Null,
    }
}

async fn register_web(node: &MeshNode, port: u16) {
    let body = json!({"Name": "web", "ID": "web", "Port": port,
                      "Check": {"CheckID": "web-ttl", "TTL": "600s", "Status": "passing"}});
    eventually(30, "web registered", || async {
        let (s, _) = node.send("PUT", "/v1/agent/service/register", Some(&body.to_string())).await;
        (s == 200).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_datacenters_fail_over_to_the_nearest_healthy_one() {
    let net = net();
    let tmp = tempfile::tempdir().expect("tempdir");
    let (ip2, ip3) = (format!("{net}.21"), format!("{net}.31"));
    let delay = format!("{ip3}=20ms,{ip2}=60ms");
    let env = [("MESH_TEST_RPC_DELAY", delay.as_str())];
    let lan = [format!("{net}.1:8301"), format!("{net}.2:8301")];
    let dc1_args = ["--bootstrap-expect", "3", "--join", &lan[0], "--join", &lan[1]];
    let dc1: Vec<MeshNode> =
        (1..=3).map(|i| server(&net, &tmp.path().join(format!("s{i}")), i, "dc1", &dc1_args, &env)).collect();
    let dc2 = server(&net, &tmp.path().join("s21"), 21, "dc2", &[], &[]);
    let dc3 = server(&net, &tmp.path().join("s31"), 31, "dc3", &[], &[]);
    let a1_ip = format!("{net}.10");
    let a1 = MeshNode::start_role(
        "agent",
        &a1_ip,
        &tmp.path().join("a1"),
        port_range(),
        "agent10",
        &[
            "--bind",
            &a1_ip,
            "--rpc",
            &format!("{a1_ip}:8300"),
            "--join",
            &lan[0],
            "--gossip-probe-period",
            "200ms",
            "--runtime",
            "process",
            "--no-registrator",
            "--dns-failover",
            "nearest",
        ],
    );

    // dc1 orders the others by distance: dc3 (+20 ms) before dc2 (+60 ms), on every node.
    for node in dc1.iter().chain([&a1]) {
        eventually(90, "dc1 orders datacenters by distance", || async {
            (json(node, "/v1/catalog/datacenters").await == json!(["dc1", "dc3", "dc2"])).then_some(())
        })
        .await;
    }
    register_web(&a1, 7001).await;
    register_web(&dc2, 7002).await;
    register_web(&dc3, 7003).await;
    let body = json!({"Name": "web", "Service": {"Service": "web", "Failover": {"NearestN": 2}}});
    let (s, v) = a1.send("POST", "/v1/query", Some(&body.to_string())).await;
    assert_eq!(s, 200, "{v}");

    let home = ("NOERROR".to_owned(), vec![a1_ip.clone()]);
    eventually(30, "web.query.mesh answers dc1's own", || async { (dig(&a1, "web.query.mesh") == home).then_some(()) })
        .await;

    // dc1's instance critical: the nearer dc3 answers.
    let (s, v) = a1.send("PUT", "/v1/agent/check/fail/web-ttl", None).await;
    assert_eq!(s, 200, "{v}");
    let near_answer = ("NOERROR".to_owned(), vec![ip3.clone()]);
    eventually(30, "web.query.mesh fails over to dc3, the nearer", || async {
        (dig(&a1, "web.query.mesh") == near_answer).then_some(())
    })
    .await;
    assert_eq!(dig(&a1, "web.service.mesh"), near_answer, "--dns-failover nearest");
    let v = json(&a1, "/v1/query/web/execute").await;
    assert_eq!((v["Datacenter"].as_str(), v["Failovers"].as_u64()), (Some("dc3"), Some(1)), "{v}");

    // dc3's only server killed: dc2 answers, and dc1 keeps its own writes and names.
    let mut dc3 = dc3;
    dc3.stop_with("KILL");
    let far_answer = ("NOERROR".to_owned(), vec![ip2.clone()]);
    eventually(30, "web.query.mesh fails over to dc2", || async {
        (dig(&a1, "web.query.mesh") == far_answer).then_some(())
    })
    .await;
    let started = Instant::now();
    assert_eq!(dig(&a1, "web.service.mesh"), far_answer);
    assert!(started.elapsed() < Duration::from_secs(6), "failover past a dead datacenter took {:?}", started.elapsed());
    // Failovers counts the datacenters asked: dc3 first while it still counts as nearer, or
    // dc2 alone once dc3's dead server has no measured distance (listed last).
    let order = json(&a1, "/v1/catalog/datacenters").await;
    let asked = order.as_array().unwrap().iter().position(|d| d == "dc2").unwrap() as u64;
    let v = json(&a1, "/v1/query/web/execute").await;
    assert_eq!((v["Datacenter"].as_str(), v["Failovers"].as_u64()), (Some("dc2"), Some(asked)), "{v} {order}");
    let r = a1.client.put(a1.url("/v1/kv/still")).body("here").send().await.unwrap();
    assert_eq!(r.text().await.unwrap().trim(), "true", "dc1 writes");
    assert_eq!(dig(&a1, &format!("{}.node.mesh", "agent10")), ("NOERROR".to_owned(), vec![a1_ip.clone()]));

    // dc1 recovers: its own again.
    let (s, v) = a1.send("PUT", "/v1/agent/check/pass/web-ttl", None).await;
    assert_eq!(s, 200, "{v}");
    eventually(30, "back home", || async { (dig(&a1, "web.query.mesh") == home).then_some(()) }).await;
    assert_eq!(dig(&a1, "web.service.mesh"), home);
}
