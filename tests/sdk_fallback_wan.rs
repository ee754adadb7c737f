//! mesh-sdk's `Endpoints` datacenter fallback against real datacenters (issue 14): mesh
//! servers and agents of two and three datacenters as processes on loopback addresses, joined
//! by the WAN pool. By default the nearest other datacenter serves when the local one has no
//! healthy instance, and the local one again when it recovers; named fallbacks are used in the
//! order given. (`tests/sdk_fallback.rs` checks the watch's blocking-query rules against a
//! Consul double.)

mod support;

use mesh_sdk::consul::ConsulClient;
use mesh_sdk::endpoints::{Endpoints, EndpointsOptions};
use serde_json::json;
use support::*;

fn net() -> String {
    format!("127.{}.97", 20 + std::process::id() % 200)
}

/// Registers `web` on `node` with a passing TTL check `web-ttl` (once the node is in its
/// catalog).
async fn register_web(node: &MeshNode, port: u16) {
    let body = json!({"Name": "web", "ID": "web", "Port": port,
                      "Check": {"CheckID": "web-ttl", "TTL": "600s", "Status": "passing"}});
    eventually(30, "web registered", || async {
        let (s, _) = node.send("PUT", "/v1/agent/service/register", Some(&body.to_string())).await;
        (s == 200).then_some(())
    })
    .await;
}

async fn set_web(node: &MeshNode, status: &str) {
    let (s, v) = node.send("PUT", &format!("/v1/agent/check/{status}/web-ttl"), None).await;
    assert_eq!(s, 200, "{v}");
}

/// Waits until `e` balances over one instance of `web` at `port`, from datacenter `dc` (`""`
/// for the agent's own).
async fn until(e: &Endpoints, port: u16, dc: &str) {
    eventually(30, &format!("web:{port} from {dc:?}"), || async {
        let ports: Vec<u16> = e.instances().iter().map(|i| i.port).collect();
        (ports == vec![port] && e.datacenter().as_deref() == Some(dc)).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_fall_back_to_another_real_datacenter_and_come_back() {
    let net = net();
    let tmp = tempfile::tempdir().expect("tempdir");
    let s1 = wan_server(&net, &tmp.path().join("s1"), 1, "dc1", None, &[], &[]);
    let wan = format!("{net}.1:8302");
    let s2 = wan_server(&net, &tmp.path().join("s2"), 2, "dc2", Some(&wan), &[], &[]);
    let a1 = wan_agent(&net, &tmp.path().join("a1"), 10, "dc1", 1, &[]);
    let a2 = wan_agent(&net, &tmp.path().join("a2"), 20, "dc2", 2, &[]);
    eventually(60, "dc1's agent knows both datacenters", || async {
        let (_, v) = a1.get("/v1/catalog/datacenters").await;
        (v == json!(["dc1", "dc2"])).then_some(())
    })
    .await;
    register_web(&a1, 7001).await;
    register_web(&a2, 7002).await;

    // No fallback named: the nearest other datacenter (here the only one) is the fallback.
    let consul = ConsulClient::new(&a1.http.to_string()).unwrap();
    let web = Endpoints::watch(&consul, "web", EndpointsOptions::default()).await.unwrap();
    until(&web, 7001, "").await;
    set_web(&a1, "fail").await;
    until(&web, 7002, "dc2").await;
    let lease = web.pick().expect("an instance of dc2");
    assert_eq!((lease.instance().datacenter.as_str(), lease.address()), ("dc2", a2.http.ip().to_string().as_str()));
    drop(lease);
    set_web(&a1, "pass").await;
    until(&web, 7001, "").await;
    // Opting out: no fallback.
    let local = Endpoints::watch(&consul, "web", EndpointsOptions::default().no_fallback()).await.unwrap();
    set_web(&a1, "fail").await;
    eventually(30, "no instance without fallback", || async { local.instances().is_empty().then_some(()) }).await;
    until(&web, 7002, "dc2").await;

    // A third datacenter named first: used before dc2 while it has an instance.
    let s3 = wan_server(&net, &tmp.path().join("s3"), 3, "dc3", Some(&wan), &[], &[]);
    eventually(60, "dc1 knows dc3", || async {
        let (_, v) = s1.get("/v1/catalog/datacenters").await;
        v.as_array().is_some_and(|a| a.len() == 3).then_some(())
    })
    .await;
    register_web(&s3, 7003).await;
    let named =
        Endpoints::watch(&consul, "web", EndpointsOptions::default().fallback("dc3").fallback("dc2")).await.unwrap();
    until(&named, 7003, "dc3").await;
    let (s, v) = s3.send("PUT", "/v1/agent/service/deregister/web", None).await;
    assert_eq!(s, 200, "{v}");
    until(&named, 7002, "dc2").await;
    set_web(&a1, "pass").await;
    until(&named, 7001, "").await;
    until(&web, 7001, "").await;
    drop((s2, s3));
}
