//! Network coordinates and the nearest-first datacenter list (issue 14, point 2). Three
//! datacenters of one server each, and an agent in dc1, as processes on loopback addresses;
//! the test-only RPC delay (`MESH_TEST_RPC_DELAY`) puts them on a line, dc1 — 10 ms — dc2 —
//! 30 ms — dc3 (each process delays what it sends to the farther ones, so every round trip is
//! the same whichever side measures it). dc1 then lists `[dc1, dc2, dc3]` and dc3
//! `[dc3, dc2, dc1]`; with the distances swapped (a second set of nodes, dc1 — 10 ms — dc3 —
//! 30 ms — dc2) dc1 lists `[dc1, dc3, dc2]`. `/v1/coordinate/datacenters` shows every server's
//! 8-dimensional WAN coordinate, `/v1/coordinate/nodes` both dc1 nodes away from the origin,
//! and `?near=` puts the named node (`_agent`: the node asked) first.

mod support;

use serde_json::Value;
use std::path::Path;
use support::*;

/// The loopback network of this test: `127.<a>.91.<host>`, unique to this process.
fn net() -> String {
    format!("127.{}.91", 20 + std::process::id() % 200)
}

/// `GET path` on `node`, as JSON (`Null` when unreachable or not JSON).
async fn json(node: &MeshNode, path: &str) -> Value {
    match node.client.get(node.url(path)).timeout(std::time::Duration::from_secs(3)).send().await {
        Ok(r) => r.json().await.unwrap_or(Value::Null),
        Err(_) => Value::Null,
    }
}

/// Serf's distance between two coordinates (JSON), seconds.
fn distance(a: &Value, b: &Value) -> f64 {
    let f = |v: &Value, k: &str| v[k].as_f64().unwrap_or(0.0);
    let va: Vec<f64> = a["Vec"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
    let vb: Vec<f64> = b["Vec"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
    let raw = va.iter().zip(&vb).map(|(x, y)| (x - y).powi(2)).sum::<f64>().sqrt() + f(a, "Height") + f(b, "Height");
    let adj = raw + f(a, "Adjustment") + f(b, "Adjustment");
    if adj > 0.0 { adj } else { raw }
}

/// The WAN coordinate of each datacenter's server as `node` lists them.
async fn wan_coords(node: &MeshNode) -> Vec<(String, Value)> {
    let v = json(node, "/v1/coordinate/datacenters").await;
    v.as_array()
        .map(|dcs| {
            dcs.iter()
                .filter_map(|d| {
                    let c = d["Coordinates"].as_array()?.first()?.clone();
                    Some((d["Datacenter"].as_str()?.to_owned(), c))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Three datacenters, `far` being the one 40 ms from dc1 and `near` 10 ms from it, started on
/// `<net>.<base+1..3>`; returns them as (dc1, dc2, dc3).
fn three_datacenters(net: &str, dir: &Path, base: u8, near: &str) -> (MeshNode, MeshNode, MeshNode) {
    let ip = |i: u8| format!("{net}.{}", base + i);
    let (near_i, far_i) = if near == "dc2" { (2, 3) } else { (3, 2) };
    // dc1 sends 10 ms late to the near one and 40 ms late to the far one; the near one 30 ms
    // late to the far one: a line.
    let d1 = format!("{}=10ms,{}=40ms", ip(near_i), ip(far_i));
    let d_near = format!("{}=30ms", ip(far_i));
    let delay = |i: u8| {
        if i == 1 {
            d1.clone()
        } else if i == near_i {
            d_near.clone()
        } else {
            String::new()
        }
    };
    let wan1 = format!("{}:8302", ip(1));
    let dc1 = wan_server(net, &dir.join("s1"), base + 1, "dc1", None, &[], &[("MESH_TEST_RPC_DELAY", &delay(1))]);
    let dc2 =
        wan_server(net, &dir.join("s2"), base + 2, "dc2", Some(&wan1), &[], &[("MESH_TEST_RPC_DELAY", &delay(2))]);
    let dc3 =
        wan_server(net, &dir.join("s3"), base + 3, "dc3", Some(&wan1), &[], &[("MESH_TEST_RPC_DELAY", &delay(3))]);
    (dc1, dc2, dc3)
}

async fn order(node: &MeshNode) -> Vec<String> {
    serde_json::from_value(json(node, "/v1/catalog/datacenters").await).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn datacenters_nearest_first_and_coordinates() {
    let net = net();
    let tmp = tempfile::tempdir().expect("tempdir");
    let (dc1, _dc2, dc3) = three_datacenters(&net, tmp.path(), 0, "dc2");
    let agent_ip = format!("{net}.10");
    let agent = MeshNode::start_role(
        "agent",
        &agent_ip,
        &tmp.path().join("agent"),
        port_range(),
        "agent10",
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

    // Before any measurement the unknown distances sort by name, which is this order too: the
    // order counts once every datacenter has a coordinate.
    let want: Vec<String> = ["dc1", "dc2", "dc3"].map(String::from).to_vec();
    let started = std::time::Instant::now();
    eventually(40, "dc1 lists [dc1, dc2, dc3] with every coordinate known", || async {
        (wan_coords(&dc1).await.len() == 3 && order(&dc1).await == want).then_some(())
    })
    .await;
    eprintln!("dc1 ordered its datacenters by distance after {:?}", started.elapsed());
    let back: Vec<String> = ["dc3", "dc2", "dc1"].map(String::from).to_vec();
    eventually(30, "dc3 lists [dc3, dc2, dc1]", || async { (order(&dc3).await == back).then_some(()) }).await;
    // The agent asks its server.
    eventually(10, "the agent lists [dc1, dc2, dc3]", || async { (order(&agent).await == want).then_some(()) }).await;

    // /v1/coordinate/datacenters: every datacenter, nearest first, its server's 8 dimensions;
    // the estimated round trips converge to the injected ones.
    let coords = wan_coords(&dc1).await;
    let dcs: Vec<&str> = coords.iter().map(|(d, _)| d.as_str()).collect();
    assert_eq!(dcs, ["dc1", "dc2", "dc3"], "{coords:?}");
    for (dc, c) in &coords {
        assert_eq!(c["Node"], format!("server{}", &dc[2..]), "{c}");
        assert_eq!(c["Coord"]["Vec"].as_array().map(Vec::len), Some(8), "{c}");
    }
    let (d12, d13, d23) = eventually(40, "estimates within 25% of the injected round trips", || async {
        let c = wan_coords(&dc1).await;
        if c.len() != 3 {
            return None;
        }
        let d = |i: usize, j: usize| distance(&c[i].1["Coord"], &c[j].1["Coord"]);
        let (d12, d13, d23) = (d(0, 1), d(0, 2), d(1, 2));
        let close = |est: f64, want: f64| (est - want).abs() / want < 0.25;
        (close(d12, 0.010) && close(d13, 0.040) && close(d23, 0.030)).then_some((d12, d13, d23))
    })
    .await;
    eprintln!(
        "estimated WAN round trips after {:?}: dc1-dc2 {d12:.4}s dc1-dc3 {d13:.4}s dc2-dc3 {d23:.4}s (injected 0.010, 0.040, 0.030)",
        started.elapsed()
    );

    // /v1/coordinate/nodes on dc1: both dc1 nodes, measured (not at the origin).
    eventually(20, "both dc1 nodes have measured LAN coordinates", || async {
        let v = json(&dc1, "/v1/coordinate/nodes").await;
        let list = v.as_array()?;
        let moved = |n: &str| {
            list.iter().any(|c| {
                c["Node"] == n
                    && c["Coord"]["Vec"]
                        .as_array()
                        .is_some_and(|v| v.len() == 8 && v.iter().any(|x| x.as_f64() != Some(0.0)))
            })
        };
        (moved("server1") && moved("agent10")).then_some(())
    })
    .await;
    let one = json(&dc1, "/v1/coordinate/node/agent10").await;
    assert_eq!(one[0]["Node"], "agent10", "{one}");
    // The agent knows the same nodes' coordinates (from its server's table).
    eventually(10, "the agent lists both coordinates", || async {
        let v = json(&agent, "/v1/coordinate/nodes").await;
        let n = v
            .as_array()?
            .iter()
            .filter(|c| c["Coord"]["Vec"].as_array().is_some_and(|v| v.iter().any(|x| x != 0.0)))
            .count();
        (n == 2).then_some(())
    })
    .await;

    // An agent asks its server for the datacenters' coordinates.
    let via_agent: Vec<String> = wan_coords(&agent).await.into_iter().map(|(d, _)| d).collect();
    assert_eq!(via_agent, want, "the agent's /v1/coordinate/datacenters");

    // ?near=: the requesting node (_agent) or the named one first. A service on both nodes
    // (by name, agent10 would come first).
    let web = |node: &str| serde_json::json!({"Name": "web", "ID": format!("web-{node}"), "Port": 80}).to_string();
    assert_eq!(agent.send("PUT", "/v1/agent/service/register", Some(&web("a"))).await.0, 200);
    assert_eq!(dc1.send("PUT", "/v1/agent/service/register", Some(&web("s"))).await.0, 200);
    eventually(20, "web on both nodes, seen by both", || async {
        let n = |v: Value| v.as_array().map(Vec::len);
        (n(json(&dc1, "/v1/catalog/service/web").await) == Some(2)
            && n(json(&agent, "/v1/catalog/service/web").await) == Some(2))
        .then_some(())
    })
    .await;
    for (node, path, first) in [
        (&agent, "/v1/catalog/nodes?near=_agent", "agent10"),
        (&dc1, "/v1/catalog/nodes?near=_agent", "server1"),
        (&dc1, "/v1/catalog/nodes?near=agent10", "agent10"),
        (&agent, "/v1/catalog/service/web?near=_agent", "agent10"),
        (&dc1, "/v1/catalog/service/web?near=_agent", "server1"),
        (&agent, "/v1/catalog/service/web?near=server1", "server1"),
        (&dc1, "/v1/health/service/web?near=_agent", "server1"),
        (&dc1, "/v1/health/service/web?near=agent10", "agent10"),
    ] {
        let v = json(node, path).await;
        let got = v[0]["Node"].as_str().or_else(|| v[0]["Node"]["Node"].as_str());
        assert_eq!(got, Some(first), "{path} on {}: {v}", node.name);
    }
    let v = json(&dc1, "/v1/catalog/nodes?near=agent10").await;
    assert_eq!(v.as_array().map(Vec::len), Some(2), "{v}");

    // PUT /v1/coordinate/update still sets a coordinate; a bad one is refused and changes nothing.
    let c = serde_json::json!({"Node": "agent10", "Coord": {"Vec": [1,0,0,0,0,0,0,0], "Error": 0.2, "Adjustment": 0, "Height": 0.0001}});
    let (status, _) = dc1.send("PUT", "/v1/coordinate/update", Some(&c.to_string())).await;
    assert_eq!(status, 200);
    let (status, body) =
        dc1.send("PUT", "/v1/coordinate/update", Some(r#"{"Node":"agent10","Coord":{"Vec":[1,2]}}"#)).await;
    assert_eq!(status, 400, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swapped_distances_swap_the_order() {
    let net = net();
    let tmp = tempfile::tempdir().expect("tempdir");
    let (dc1, dc2, _dc3) = three_datacenters(&net, tmp.path(), 20, "dc3");
    let want: Vec<String> = ["dc1", "dc3", "dc2"].map(String::from).to_vec();
    eventually(40, "dc1 lists [dc1, dc3, dc2]", || async { (order(&dc1).await == want).then_some(()) }).await;
    let back: Vec<String> = ["dc2", "dc3", "dc1"].map(String::from).to_vec();
    eventually(30, "dc2 lists [dc2, dc3, dc1]", || async { (order(&dc2).await == back).then_some(()) }).await;
}
