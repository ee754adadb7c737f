//! Temporary: serve a synthetic catalog over DNS for measurements.
use arc_swap::ArcSwap;
use mesh_core::catalog::{CatalogState, Health, Node, ServiceInstance};
use mesh_core::dns::DnsConfig;
use mesh_server::dns::DnsServer;
use std::collections::BTreeMap;
use std::sync::Arc;

#[tokio::main]
async fn main() {
    let port: u16 = std::env::args().nth(1).map(|s| s.parse().unwrap()).unwrap_or(8653);
    let mut c = CatalogState::new("dc1");
    c.upsert_node(
        Node {
            name: "n1".into(),
            address: "127.0.0.1".parse().unwrap(),
            datacenter: "dc1".into(),
            meta: BTreeMap::new(),
            create_index: 0,
            modify_index: 0,
        },
        1,
    );
    let mut idx = 2;
    for i in 0..1000u32 {
        for j in 1..=3u32 {
            let ip = std::net::Ipv4Addr::new(10, (i >> 8) as u8, (i & 255) as u8, j as u8);
            c.upsert_instance(
                ServiceInstance {
                    id: format!("svc-{i}-{j}"),
                    service: format!("svc-{i}"),
                    node: "n1".into(),
                    address: Some(ip.into()),
                    port: 8080,
                    tags: vec![],
                    meta: BTreeMap::new(),
                    health: Health::Passing,
                    create_index: 0,
                    modify_index: 0,
                },
                idx,
            );
            idx += 1;
        }
    }
    let udp = tokio::net::UdpSocket::bind(("127.0.0.1", port)).await.unwrap();
    let tcp = tokio::net::TcpListener::bind(("127.0.0.1", port)).await.unwrap();
    let _s = DnsServer::start(udp, tcp, Arc::new(ArcSwap::from_pointee(c)), DnsConfig::default()).await.unwrap();
    println!("ready");
    tokio::signal::ctrl_c().await.unwrap();
}
