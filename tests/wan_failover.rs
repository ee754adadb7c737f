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
use std::time::{Duration, Instant};
use support::*;

fn net() -> String {
    format!("127.{}.98", 20 + std::process::id() % 200)
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
    let wan = format!("{net}.1:8302");
    let lan = [format!("{net}.1:8301"), format!("{net}.2:8301")];
    let dc1_args = ["--bootstrap-expect", "3", "--join", &lan[0], "--join", &lan[1]];
    let dc1: Vec<MeshNode> = (1..=3)
        .map(|i| wan_server(&net, &tmp.path().join(format!("s{i}")), i, "dc1", Some(&wan), &dc1_args, &env))
        .collect();
    let dc2 = wan_server(&net, &tmp.path().join("s21"), 21, "dc2", Some(&wan), &[], &[]);
    let dc3 = wan_server(&net, &tmp.path().join("s31"), 31, "dc3", Some(&wan), &[], &[]);
    let a1_ip = format!("{net}.10");
    let a1 = wan_agent(&net, &tmp.path().join("a1"), 10, "dc1", 1, &["--dns-failover", "nearest"]);

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
    eventually(30, "web.query.mesh answers dc1's own", || async {
        (dig(&a1, "web.query.mesh", "A") == home).then_some(())
    })
    .await;

    // dc1's instance critical: the nearer dc3 answers.
    let (s, v) = a1.send("PUT", "/v1/agent/check/fail/web-ttl", None).await;
    assert_eq!(s, 200, "{v}");
    let near_answer = ("NOERROR".to_owned(), vec![ip3.clone()]);
    eventually(30, "web.query.mesh fails over to dc3, the nearer", || async {
        (dig(&a1, "web.query.mesh", "A") == near_answer).then_some(())
    })
    .await;
    assert_eq!(dig(&a1, "web.service.mesh", "A"), near_answer, "--dns-failover nearest");
    let v = json(&a1, "/v1/query/web/execute").await;
    assert_eq!((v["Datacenter"].as_str(), v["Failovers"].as_u64()), (Some("dc3"), Some(1)), "{v}");

    // dc3's only server killed: dc2 answers, and dc1 keeps its own writes and names.
    let mut dc3 = dc3;
    dc3.stop_with("KILL");
    let far_answer = ("NOERROR".to_owned(), vec![ip2.clone()]);
    eventually(30, "web.query.mesh fails over to dc2", || async {
        (dig(&a1, "web.query.mesh", "A") == far_answer).then_some(())
    })
    .await;
    let started = Instant::now();
    assert_eq!(dig(&a1, "web.service.mesh", "A"), far_answer);
    assert!(started.elapsed() < Duration::from_secs(6), "failover past a dead datacenter took {:?}", started.elapsed());
    // Failovers counts the datacenters asked: dc3 first while it still counts as nearer, or
    // dc2 alone once dc3's dead server has no measured distance (listed last).
    let order = json(&a1, "/v1/catalog/datacenters").await;
    let asked = order.as_array().unwrap().iter().position(|d| d == "dc2").unwrap() as u64;
    let v = json(&a1, "/v1/query/web/execute").await;
    assert_eq!((v["Datacenter"].as_str(), v["Failovers"].as_u64()), (Some("dc2"), Some(asked)), "{v} {order}");
    let r = a1.client.put(a1.url("/v1/kv/still")).body("here").send().await.unwrap();
    assert_eq!(r.text().await.unwrap().trim(), "true", "dc1 writes");
    assert_eq!(dig(&a1, &format!("{}.node.mesh", "agent10"), "A"), ("NOERROR".to_owned(), vec![a1_ip.clone()]));

    // dc1 recovers: its own again.
    let (s, v) = a1.send("PUT", "/v1/agent/check/pass/web-ttl", None).await;
    assert_eq!(s, 200, "{v}");
    eventually(30, "back home", || async { (dig(&a1, "web.query.mesh", "A") == home).then_some(()) }).await;
    assert_eq!(dig(&a1, "web.service.mesh", "A"), home);

    // dc1's servers die one by one: `?dc=dc1` from dc2 tries another of them when one fails,
    // before and after gossip notices (a `stale` read: any live server of dc1 answers it).
    let mut dc1 = dc1;
    for (i, server) in dc1.iter_mut().take(2).enumerate() {
        server.stop_with("KILL");
        for _ in 0..3 {
            let r = dc2.client.get(dc2.url("/v1/kv/still?dc=dc1&stale&raw")).send().await.unwrap();
            let status = r.status().as_u16();
            assert_eq!((status, r.text().await.unwrap()), (200, "here".to_owned()), "{} killed", i + 1);
        }
    }
}
