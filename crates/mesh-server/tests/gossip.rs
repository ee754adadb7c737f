//! LAN gossip (mesh_server::gossip) between real nodes on distinct loopback addresses, with real UDP sockets.
//! Every test uses its own 127.0.N.x range so tests can run in parallel.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use mesh_server::gossip::{Gossip, GossipConfig, GossipTiming, MemberStatus, Role, envelope};

const DEADLINE: Duration = Duration::from_secs(15);

fn init_tracing() {
    let _ = tracing_subscriber::fmt().with_test_writer().with_env_filter("mesh_server::gossip=info").try_init();
}

fn addr(net: u8, host: u8, port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, net, host)), port)
}

fn config(name: &str, net: u8, host: u8, port: u16, dc: &str, join: Vec<SocketAddr>) -> GossipConfig {
    GossipConfig {
        node: name.to_owned(),
        node_id: format!("00000000-0000-4000-8000-{net:04}{host:08}"),
        datacenter: dc.to_owned(),
        pool: None,
        role: if host == 2 { Role::Server } else { Role::Agent },
        bind: addr(net, host, port),
        advertise: addr(net, host, port),
        rpc: addr(net, host, 8300),
        join,
        timing: GossipTiming::fast(),
        seed: u64::from(net) << 8 | u64::from(host),
        generation: None,
    }
}

/// Polls `cond` every 20 ms until it holds; panics after [`DEADLINE`]. Returns how long it took.
async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < DEADLINE, "timed out after {DEADLINE:?} waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    start.elapsed()
}

/// Like [`wait_until`] over a pool, printing every node's view when it times out.
async fn wait_for_pool(nodes: &[Gossip], what: &str, mut cond: impl FnMut(&[Gossip]) -> bool) -> Duration {
    let start = Instant::now();
    while !cond(nodes) {
        if start.elapsed() >= DEADLINE {
            for g in nodes {
                let view: Vec<String> =
                    g.members().iter().map(|m| format!("{}#{}:{:?}", m.name, m.generation, m.status)).collect();
                eprintln!("view of {}: {view:?}", g.advertise_addr());
            }
            panic!("timed out after {DEADLINE:?} waiting until {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    start.elapsed()
}

fn status_of(g: &Gossip, name: &str) -> Option<MemberStatus> {
    g.members().into_iter().find(|m| m.name == name).map(|m| m.status)
}

fn all_alive(g: &Gossip, n: usize) -> bool {
    let members = g.members();
    members.len() == n && members.iter().all(|m| m.status == MemberStatus::Alive)
}

/// A seed plus `n - 1` nodes that join through it, all seeing `n` alive members.
async fn cluster(net: u8, n: u8) -> Vec<Gossip> {
    let seed = Gossip::start(config("n2", net, 2, 0, "dc1", vec![])).await.unwrap();
    let seed_addr = seed.advertise_addr();
    let mut nodes = vec![seed];
    for host in 3..(2 + n) {
        nodes.push(Gossip::start(config(&format!("n{host}"), net, host, 0, "dc1", vec![seed_addr])).await.unwrap());
    }
    let took = wait_until("every node sees every node alive", || nodes.iter().all(|g| all_alive(g, n.into()))).await;
    eprintln!("{n} nodes converged in {took:?}");
    nodes
}

#[tokio::test]
async fn four_nodes_join_through_one_seed() {
    init_tracing();
    let nodes = cluster(1, 4).await;
    let members = nodes[3].members();
    let names: Vec<&str> = members.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, ["n2", "n3", "n4", "n5"]);
    let seed = &members[0];
    assert_eq!(seed.role, Role::Server);
    assert_eq!(seed.rpc, addr(1, 2, 8300), "the rpc address travels in the identity");
    assert_eq!(seed.datacenter, "dc1");
    assert_eq!(seed.addr, nodes[0].advertise_addr());
    for g in &nodes {
        assert_eq!(g.dropped(), Default::default(), "no packet dropped in a healthy pool");
        g.shutdown().await;
    }
}

#[tokio::test]
async fn crashed_node_is_failed_then_rejoins_with_higher_generation() {
    init_tracing();
    let mut nodes = cluster(2, 4).await;
    let victim = nodes.pop().unwrap();
    let victim_addr = victim.advertise_addr();
    let old_generation = victim.members().iter().find(|m| m.name == "n5").unwrap().generation;

    // A crash: the socket closes, nobody is told.
    victim.shutdown().await;
    let took = wait_until("the others mark n5 failed", || {
        nodes.iter().all(|g| status_of(g, "n5") == Some(MemberStatus::Failed))
    })
    .await;
    let timing = GossipTiming::fast();
    eprintln!(
        "crash of n5 detected everywhere in {took:?} (probe {:?}, suspicion {:?})",
        timing.probe_period,
        timing.suspicion(4)
    );
    assert!(took < Duration::from_secs(5), "detection took {took:?}");

    // Restart with the same node id on the same address.
    let mut cfg = config("n5", 2, 5, victim_addr.port(), "dc1", vec![nodes[0].advertise_addr()]);
    cfg.seed = 99;
    let restarted = Gossip::start(cfg).await.unwrap();
    nodes.push(restarted);
    wait_until("n5 is alive again everywhere", || nodes.iter().all(|g| all_alive(g, 4))).await;
    for g in &nodes {
        let n5 = g.members().into_iter().find(|m| m.name == "n5").unwrap();
        assert!(n5.generation > old_generation, "{} > {old_generation}", n5.generation);
        g.shutdown().await;
    }
}

#[tokio::test]
async fn graceful_leave_is_left_not_failed() {
    init_tracing();
    let nodes = cluster(3, 3).await;
    let leaver = &nodes[2];
    leaver.leave().await.unwrap();
    assert_eq!(status_of(leaver, "n4"), Some(MemberStatus::Left), "the leaver sees itself left");
    wait_until("the others mark n4 left", || nodes[..2].iter().all(|g| status_of(g, "n4") == Some(MemberStatus::Left)))
        .await;
    leaver.shutdown().await;
    // Not a synchronisation: a state that must NOT change is checked after several probe periods and
    // suspicion timeouts, so a left node that turned into a failed one would be caught.
    tokio::time::sleep(GossipTiming::fast().suspicion(3) * 3).await;
    for g in &nodes[..2] {
        assert_eq!(status_of(g, "n4"), Some(MemberStatus::Left));
        assert_eq!(g.members().iter().filter(|m| m.status == MemberStatus::Alive).count(), 2);
        g.shutdown().await;
    }
}

#[tokio::test]
async fn foreign_packets_are_dropped_and_counted() {
    init_tracing();
    let a = Gossip::start(config("n2", 4, 2, 0, "dc1", vec![])).await.unwrap();
    let target = a.advertise_addr();
    let raw = tokio::net::UdpSocket::bind(addr(4, 9, 0)).await.unwrap();

    raw.send_to(b"\xde\xad\xbe\xef garbage", target).await.unwrap();
    wait_until("garbage is counted", || a.dropped().garbage == 1).await;

    let mut future = b"MSHG".to_vec();
    future.extend_from_slice(&[99, 0, 3]);
    future.extend_from_slice(b"dc1 whatever version 99 carries");
    raw.send_to(&future, target).await.unwrap();
    wait_until("major version 99 is counted", || a.dropped().version == 1).await;

    // A right envelope around bytes foca cannot decode.
    let mut bad_foca = Vec::new();
    envelope::encode("dc1", &[0xff; 40], &mut bad_foca);
    raw.send_to(&bad_foca, target).await.unwrap();
    wait_until("an undecodable payload is counted", || a.dropped().invalid == 1).await;

    // A flood from one peer: all counted (the log line is rate-limited, not the counter).
    for _ in 0..50 {
        raw.send_to(b"junk", target).await.unwrap();
    }
    wait_until("the flood is counted", || a.dropped().garbage == 51).await;

    // A node of datacenter dc2 tries to join the dc1 node.
    let dc2 = Gossip::start(config("other-dc", 4, 10, 0, "dc2", vec![])).await.unwrap();
    let err = dc2.join(&[target], Duration::from_millis(600)).await.unwrap_err();
    assert!(err.to_string().contains("no answer"), "{err}");
    assert!(a.dropped().datacenter >= 1, "{:?}", a.dropped());

    // Still healthy: a dc1 node joins, and the dc1 pool never lists the dc2 node.
    let b = Gossip::start(config("n3", 4, 3, 0, "dc1", vec![])).await.unwrap();
    b.join(&[target], Duration::from_secs(5)).await.unwrap();
    wait_until("the dc1 pool has two alive members", || all_alive(&a, 2) && all_alive(&b, 2)).await;
    for g in [&a, &b] {
        assert!(g.members().iter().all(|m| m.datacenter == "dc1" && m.name != "other-dc"));
    }
    assert_eq!(dc2.members().len(), 1, "the dc2 node is alone");
    for g in [a, b, dc2] {
        g.shutdown().await;
    }
}

#[tokio::test]
async fn retry_join_waits_for_the_seed_to_come_up() {
    init_tracing();
    // A free port for the seed that is not up yet.
    let port = std::net::UdpSocket::bind(addr(5, 2, 0)).unwrap().local_addr().unwrap().port();
    let seed_addr = addr(5, 2, port);
    let started = Instant::now();
    let b = Gossip::start(config("n3", 5, 3, 0, "dc1", vec![seed_addr])).await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await; // the seed comes up 2 s later, by design of the test
    assert_eq!(b.members().len(), 1, "nobody to join yet");
    let seed = Gossip::start(config("n2", 5, 2, port, "dc1", vec![])).await.unwrap();
    let took = wait_until("the retrying node joins the late seed", || all_alive(&b, 2) && all_alive(&seed, 2)).await;
    eprintln!("joined {:?} after the seed came up ({:?} after start)", took, started.elapsed());
    // Backoff from 250 ms doubling up to 2 s: the next announce comes at most 2 s after the seed is up.
    assert!(took < Duration::from_secs(4), "{took:?}");
    for g in [b, seed] {
        g.shutdown().await;
    }
}

#[tokio::test]
async fn bad_configs_are_refused() {
    let mut cfg = config("n2", 6, 2, 0, "dc1", vec![]);
    cfg.datacenter = String::new();
    assert!(Gossip::start(cfg).await.is_err());
    let mut cfg = config("n2", 6, 2, 0, "dc1", vec![]);
    cfg.node = "x".repeat(500);
    assert!(Gossip::start(cfg).await.is_err());
    let mut cfg = config("n2", 6, 2, 0, "dc1", vec![]);
    cfg.timing.probe_rtt = cfg.timing.probe_period;
    assert!(Gossip::start(cfg).await.is_err());
}

#[tokio::test]
async fn node_cut_off_and_declared_failed_rejoins_by_itself() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    init_tracing();
    let mut nodes = cluster(7, 3).await;
    // n5 binds 127.0.7.5 but is advertised through a relay on 127.0.7.6 that the test can cut: the others'
    // packets to n5 are lost while n5 itself keeps running (a one-way partition).
    let relay = Arc::new(tokio::net::UdpSocket::bind(addr(7, 6, 0)).await.unwrap());
    let mut cfg = config("n5", 7, 5, 0, "dc1", vec![nodes[0].advertise_addr()]);
    cfg.advertise = relay.local_addr().unwrap();
    let cut_off = Gossip::start(cfg).await.unwrap();
    let cut = Arc::new(AtomicBool::new(false));
    let relay_task = tokio::spawn({
        let (relay, cut, target) = (relay.clone(), cut.clone(), cut_off.local_addr());
        async move {
            let mut buf = vec![0u8; 65536];
            while let Ok((len, _)) = relay.recv_from(&mut buf).await {
                if !cut.load(Ordering::SeqCst) {
                    let _ = relay.send_to(&buf[..len], target).await;
                }
            }
        }
    });
    nodes.push(cut_off);
    wait_until("n5 is alive everywhere", || nodes.iter().all(|g| all_alive(g, 4))).await;
    let generation = nodes[0].members().into_iter().find(|m| m.name == "n5").unwrap().generation;

    cut.store(true, Ordering::SeqCst);
    let took = wait_until("the others mark n5 failed", || {
        nodes[..3].iter().all(|g| status_of(g, "n5") == Some(MemberStatus::Failed))
    })
    .await;
    eprintln!("cut-off n5 declared failed in {took:?}");

    cut.store(false, Ordering::SeqCst);
    let took = wait_for_pool(&nodes, "n5 rejoins by itself with a new generation", |nodes| {
        nodes.iter().all(|g| all_alive(g, 4) && g.members().iter().any(|m| m.name == "n5" && m.generation > generation))
    })
    .await;
    eprintln!("n5 back in the pool {took:?} after the partition healed");
    relay_task.abort();
    for g in &nodes {
        g.shutdown().await;
    }
}

#[tokio::test]
async fn restart_on_another_port_replaces_the_old_entry() {
    init_tracing();
    let mut nodes = cluster(8, 3).await;
    let old = nodes.pop().unwrap();
    let old_addr = old.advertise_addr();
    old.shutdown().await;
    wait_until("n4 is failed", || nodes.iter().all(|g| status_of(g, "n4") == Some(MemberStatus::Failed))).await;
    // Same node id, new port (port 0 again): one entry per node id, the new generation, alive.
    let restarted = Gossip::start(config("n4", 8, 4, 0, "dc1", vec![nodes[0].advertise_addr()])).await.unwrap();
    assert_ne!(restarted.advertise_addr(), old_addr);
    nodes.push(restarted);
    wait_for_pool(&nodes, "n4 is listed once, alive, at its new address", |nodes| {
        nodes.iter().all(|g| {
            all_alive(g, 3) && g.members().iter().any(|m| m.name == "n4" && m.addr == nodes[2].advertise_addr())
        })
    })
    .await;
    for g in &nodes {
        g.shutdown().await;
    }
}
