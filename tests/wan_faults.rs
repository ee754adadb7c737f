//! A WAN partition and a dead datacenter (issue 14, must-show): two datacenters of a server and
//! an agent each, processes on loopback addresses. With iptables dropping everything between
//! the two datacenters' addresses (rules in a chain of this test's own, removed when the guard
//! drops, panics included), each datacenter keeps serving its own names and writes, and
//! cross-datacenter requests (`?dc=`, DNS names of the other datacenter) fail fast with the
//! documented errors, never hang; once healed, they work again with no restart. The servers
//! count cross-datacenter requests by outcome in `/v1/agent/metrics`.

mod support;

use serde_json::json;
use std::time::{Duration, Instant};
use support::*;

fn net() -> String {
    format!("127.{}.93", 20 + std::process::id() % 200)
}

/// iptables rules in a chain of this test's own, jumped to from INPUT; removed when dropped.
struct Partition {
    chain: String,
}

impl Partition {
    fn iptables(args: &[&str]) -> bool {
        std::process::Command::new("iptables").args(args).output().is_ok_and(|o| o.status.success())
    }

    /// Drops everything between each of `a` and each of `b`, both ways.
    fn cut(a: &[String], b: &[String]) -> Option<Partition> {
        let chain = format!("MESH-WAN-{}", std::process::id());
        if !Self::iptables(&["-N", &chain]) {
            return None;
        }
        let p = Partition { chain };
        for x in a {
            for y in b {
                assert!(Self::iptables(&["-A", &p.chain, "-s", x, "-d", y, "-j", "DROP"]));
                assert!(Self::iptables(&["-A", &p.chain, "-s", y, "-d", x, "-j", "DROP"]));
            }
        }
        assert!(Self::iptables(&["-I", "INPUT", "-j", &p.chain]));
        Some(p)
    }
}

impl Drop for Partition {
    fn drop(&mut self) {
        Self::iptables(&["-D", "INPUT", "-j", &self.chain]);
        Self::iptables(&["-F", &self.chain]);
        Self::iptables(&["-X", &self.chain]);
    }
}

/// `GET path` on `node`: status and body, within 30 s.
async fn get(node: &MeshNode, path: &str) -> (u16, String) {
    match node.client.get(node.url(path)).timeout(Duration::from_secs(30)).send().await {
        Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
        Err(e) => (0, e.to_string()),
    }
}

async fn put_kv(node: &MeshNode, key: &str, value: &str) -> String {
    let r = node.client.put(node.url(&format!("/v1/kv/{key}"))).body(value.to_owned()).send().await.unwrap();
    r.text().await.unwrap().trim().to_owned()
}

async fn register_web(node: &MeshNode, port: u16) {
    let body = json!({"Name": "web", "Port": port});
    eventually(30, "web registered", || async {
        (node.send("PUT", "/v1/agent/service/register", Some(&body.to_string())).await.0 == 200).then_some(())
    })
    .await;
}

/// The status gossip gives `name` in `node`'s WAN view.
async fn wan_status(node: &MeshNode, name: &str) -> Option<u64> {
    let (_, v) = node.get("/v1/agent/members?wan=1").await;
    v.as_array()?.iter().find(|m| m["Name"] == name)?["Status"].as_u64()
}

/// A counter of `/v1/agent/metrics`.
async fn counter(node: &MeshNode, name: &str) -> u64 {
    let (_, v) = node.get("/v1/agent/metrics").await;
    v["Counters"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["Name"] == name))
        .map_or(0, |c| c["Count"].as_u64().unwrap_or(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wan_partition_keeps_each_datacenter_whole_and_fails_cross_datacenter_requests_fast() {
    let net = net();
    let tmp = tempfile::tempdir().expect("tempdir");
    let s1 = wan_server(&net, &tmp.path().join("s1"), 1, "dc1", None, &[], &[]);
    let wan = format!("{net}.1:8302");
    let s2 = wan_server(&net, &tmp.path().join("s2"), 2, "dc2", Some(&wan), &[], &[]);
    let a1 = wan_agent(&net, &tmp.path().join("a1"), 10, "dc1", 1, &[]);
    let a2 = wan_agent(&net, &tmp.path().join("a2"), 20, "dc2", 2, &[]);
    eventually(60, "the WAN pool formed", || async { (wan_status(&s1, "server2.dc2").await == Some(1)).then_some(()) })
        .await;
    register_web(&a1, 8001).await;
    register_web(&a2, 8002).await;
    assert_eq!(put_kv(&a2, "where", "dc2").await, "true");
    eventually(30, "dc2 read through dc1's agent", || async {
        (get(&a1, "/v1/kv/where?dc=dc2&raw").await == (200, "dc2".to_owned())).then_some(())
    })
    .await;
    assert_eq!(dig(&a1, "web.service.dc2.mesh", "A"), ("NOERROR".to_owned(), vec![a2.http.ip().to_string()]));
    let forwarded_before = counter(&s1, "consul.rpc.cross-dc").await;
    assert!(forwarded_before > 0, "cross-datacenter requests are counted");

    // Cut the two datacenters apart.
    let dc1: Vec<String> = [&s1, &a1].iter().map(|n| n.http.ip().to_string()).collect();
    let dc2: Vec<String> = [&s2, &a2].iter().map(|n| n.http.ip().to_string()).collect();
    let partition = Partition::cut(&dc1, &dc2);
    let Some(partition) = partition else {
        assert!(std::env::var("CI").is_err(), "iptables is needed here (CI runs as root)");
        eprintln!("skipped: no iptables (not root)");
        return;
    };

    // Each keeps serving its own names and writes.
    for (agent, own_ip) in [(&a1, a1.http.ip().to_string()), (&a2, a2.http.ip().to_string())] {
        assert_eq!(dig(agent, "web.service.mesh", "A"), ("NOERROR".to_owned(), vec![own_ip]));
        assert_eq!(put_kv(agent, "during", "partition").await, "true");
    }
    // Cross-datacenter requests fail fast with Consul's error, every time.
    for _ in 0..2 {
        let started = Instant::now();
        let (status, body) = get(&a1, "/v1/kv/where?dc=dc2&raw").await;
        assert_eq!((status, body.as_str()), (500, "Remote DC has no server currently reachable"));
        assert!(started.elapsed() < Duration::from_secs(10), "took {:?}", started.elapsed());
        eprintln!("?dc=dc2 during the partition: the error after {:?}", started.elapsed());
    }
    // So do Marathon's: 503, distinct from an unknown datacenter's 400.
    let started = Instant::now();
    let (status, body) = get(&a1, "/v2/apps?dc=dc2").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("Remote DC has no server currently reachable"), "{body}");
    assert!(started.elapsed() < Duration::from_secs(10), "took {:?}", started.elapsed());
    let started = Instant::now();
    assert_eq!(dig(&a1, "web.service.dc2.mesh", "A").0, "SERVFAIL");
    assert!(started.elapsed() < Duration::from_secs(10), "DNS took {:?}", started.elapsed());
    eprintln!("web.service.dc2.mesh during the partition: SERVFAIL after {:?}", started.elapsed());
    eventually(60, "dc2's server failed in dc1's view", || async {
        (wan_status(&s1, "server2.dc2").await == Some(4)).then_some(())
    })
    .await;
    assert!(counter(&s1, "mesh.dc.unreachable").await >= 3, "failures are counted apart");
    let (status, body) = get(&a1, "/v1/kv/where?dc=dc9").await;
    assert_eq!((status, body.as_str()), (500, "No path to datacenter"));
    assert!(counter(&s1, "mesh.dc.no_path").await >= 1);

    // Healed: the same nodes, no restart, work across again.
    drop(partition);
    eventually(60, "?dc=dc2 answered again", || async {
        (get(&a1, "/v1/kv/where?dc=dc2&raw").await == (200, "dc2".to_owned())).then_some(())
    })
    .await;
    eventually(60, "dc2's name resolves again", || async {
        (dig(&a1, "web.service.dc2.mesh", "A") == ("NOERROR".to_owned(), vec![a2.http.ip().to_string()])).then_some(())
    })
    .await;
    eventually(60, "alive again in the WAN view", || async {
        (wan_status(&s1, "server2.dc2").await == Some(1)).then_some(())
    })
    .await;
    let (status, v) = get(&a2, "/v1/kv/during?raw").await;
    assert_eq!((status, v.as_str()), (200, "partition"), "dc2's write made during the partition is there");
    assert!(counter(&s1, "consul.rpc.cross-dc").await > forwarded_before);
}
