//! A three-node Raft group in one process, its RPCs over mesh's internal RPC
//! (`mesh_server::raft::network`): election, replication of KV writes to every state machine,
//! failover when the leader stops, and a follower refusing a write with the leader's name. Over
//! the in-memory transport, and over TCP on loopback addresses.

use mesh_core::kv::{KvOp, KvValue, SetMode};
use mesh_core::state::Command;
use mesh_server::raft::{Applied, MeshNetwork, MeshNode, MeshStateMachine, RaftHandler, RaftTiming, SegmentLogStore};
use mesh_server::raft::{Batch, NodeId, TypeConfig};
use mesh_server::rpc::{Hello, MemTransport, Role, Server, TcpTransport, Transport};
use openraft::error::{ClientWriteError, RPCError, RaftError};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::VoteRequest;
use openraft::{Config, Raft, Vote};
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tempfile::TempDir;
use tokio::sync::watch;
use tokio::time::Instant;

/// Timings for tests: heartbeat 100 ms, election timeout 200–400 ms.
const TIMING: RaftTiming = RaftTiming { multiplier: 0.2 };
/// How long anything may take (a loaded 2-core machine).
const DEADLINE: Duration = Duration::from_secs(30);

struct Node {
    id: NodeId,
    addr: SocketAddr,
    raft: Raft<TypeConfig>,
    handler: RaftHandler,
    server: Option<Server>,
    applied: watch::Receiver<Applied>,
    _dir: TempDir,
}

impl Node {
    /// Stop the node: its RPC answers nothing more and its Raft shuts down.
    async fn stop(&mut self) {
        self.handler.stop();
        self.server = None;
        self.raft.shutdown().await.expect("raft shutdown");
    }
}

/// Start node `id`: a listener at `listen` through `transport`, a Raft on a segment-file log and a state
/// machine in a fresh directory, its RPCs served on the listener.
async fn start_node(id: NodeId, transport: Arc<dyn Transport>, listen: SocketAddr) -> Node {
    start_node_with(id, transport, listen, TIMING.config("mesh-test").unwrap()).await
}

/// [`start_node`] with an openraft configuration of its own.
async fn start_node_with(id: NodeId, transport: Arc<dyn Transport>, listen: SocketAddr, config: Config) -> Node {
    let dir = tempfile::tempdir().unwrap();
    let log = SegmentLogStore::open(dir.path()).unwrap();
    let sm = MeshStateMachine::open(dir.path(), "dc1").unwrap();
    let applied = sm.subscribe();
    let listener = transport.listen(listen).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hello = Hello {
        node: format!("n{id}"),
        node_id: format!("id-n{id}"),
        datacenter: "dc1".into(),
        role: Role::Server,
        http: None,
    };
    let config = Arc::new(config);
    let net = MeshNetwork::new(id, transport, hello.clone(), &TIMING);
    let raft = Raft::new(id, config, net, log, sm).await.unwrap();
    let handler = RaftHandler::new(raft.clone());
    let server = Server::start(listener, hello, Arc::new(handler.clone())).unwrap();
    Node { id, addr, raft, handler, server: Some(server), applied, _dir: dir }
}

fn put(key: &str, value: &str) -> Batch {
    Batch::from(Command::Kv(KvOp::Set {
        key: key.into(),
        value: KvValue::from(value.as_bytes()),
        flags: 0,
        mode: SetMode::Plain,
        now: 1_000,
    }))
}

/// Initialize the group with every node as a voter.
async fn initialize(nodes: &[Node]) {
    let members: BTreeMap<NodeId, MeshNode> =
        nodes.iter().map(|n| (n.id, MeshNode { name: format!("n{}", n.id), rpc: n.addr.to_string() })).collect();
    nodes[0].raft.initialize(members).await.expect("initialize");
}

/// Wait until every node in `live` names the same leader, one of them; return its id.
async fn wait_for_leader(nodes: &[Node], live: &[NodeId]) -> NodeId {
    let start = Instant::now();
    loop {
        let leaders: Vec<Option<NodeId>> = nodes
            .iter()
            .filter(|n| live.contains(&n.id))
            .map(|n| {
                let m = n.raft.metrics().borrow().clone();
                // Only a leader that knows it leads counts (the others follow it).
                m.current_leader
            })
            .collect();
        if let Some(Some(l)) = leaders.first()
            && leaders.iter().all(|x| *x == Some(*l))
            && live.contains(l)
            && nodes.iter().find(|n| n.id == *l).is_some_and(|n| n.raft.metrics().borrow().state.is_leader())
        {
            return *l;
        }
        assert!(start.elapsed() < DEADLINE, "no agreed leader among {live:?} after {DEADLINE:?}: {leaders:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn node(nodes: &[Node], id: NodeId) -> &Node {
    nodes.iter().find(|n| n.id == id).unwrap()
}

/// Wait until every node in `live` has applied up to `index` and all have applied the same last
/// entry (a membership or blank entry may follow `index` on some nodes first); return their
/// state, checked equal.
async fn wait_applied(nodes: &[Node], live: &[NodeId], index: u64) -> Applied {
    let start = std::time::Instant::now();
    loop {
        let seen: Vec<(NodeId, Applied)> =
            nodes.iter().filter(|n| live.contains(&n.id)).map(|n| (n.id, n.applied.borrow().clone())).collect();
        let first = seen[0].1.clone();
        let agreed =
            first.log_id.is_some_and(|l| l.index >= index) && seen.iter().all(|(_, a)| a.log_id == first.log_id);
        if agreed {
            for (n, a) in &seen {
                assert_eq!(a.state, first.state, "node {n} has another state at {:?}", a.log_id);
            }
            return first;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "the nodes did not all apply index {index}: {:?}",
            seen.iter().map(|(n, a)| (n, a.log_id)).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn kv(a: &Applied, key: &str) -> Option<Vec<u8>> {
    a.state.kv.get(key).map(|e| e.value.as_bytes().to_vec())
}

/// The scenario, whatever the transport: elect, replicate, fail over, forward.
async fn group_elects_replicates_and_fails_over(mut nodes: Vec<Node>) {
    initialize(&nodes).await;
    let all: Vec<NodeId> = nodes.iter().map(|n| n.id).collect();
    let leader = wait_for_leader(&nodes, &all).await;

    let mut last = 0;
    for i in 0..5 {
        let r = node(&nodes, leader).raft.client_write(put(&format!("k{i}"), &format!("v{i}"))).await.expect("write");
        assert!(r.data.is_accepted(), "{:?}", r.data);
        last = r.log_id.index;
    }
    let applied = wait_applied(&nodes, &all, last).await;
    assert_eq!(applied.log_id.map(|l| l.index), Some(last));
    for i in 0..5 {
        assert_eq!(kv(&applied, &format!("k{i}")), Some(format!("v{i}").into_bytes()));
    }

    // The leader stops: the other two elect one of them, which takes writes.
    let old = leader;
    nodes.iter_mut().find(|n| n.id == old).unwrap().stop().await;
    let live: Vec<NodeId> = all.iter().copied().filter(|id| *id != old).collect();
    let leader = wait_for_leader(&nodes, &live).await;
    assert_ne!(leader, old);
    let r = node(&nodes, leader).raft.client_write(put("after", "failover")).await.expect("write after failover");
    assert!(r.data.is_accepted());
    let applied = wait_applied(&nodes, &live, r.log_id.index).await;
    assert_eq!(kv(&applied, "after"), Some(b"failover".to_vec()));
    assert_eq!(kv(&applied, "k4"), Some(b"v4".to_vec()));

    // A write to the follower is refused with the leader's id and address.
    let follower = *live.iter().find(|id| **id != leader).unwrap();
    match node(&nodes, follower).raft.client_write(put("x", "y")).await {
        Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
            assert_eq!(f.leader_id, Some(leader));
            let n = f.leader_node.expect("leader node");
            assert_eq!(n.rpc, node(&nodes, leader).addr.to_string());
            assert_eq!(n.name, format!("n{leader}"));
        }
        other => panic!("expected ForwardToLeader, got {other:?}"),
    }

    for n in nodes.iter_mut().filter(|n| n.id != old) {
        n.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_over_memory_transport() {
    let net = MemTransport::default();
    let mut nodes = Vec::new();
    for id in 1..=3u64 {
        let ip = IpAddr::from([10, 0, 0, id as u8]);
        nodes.push(start_node(id, Arc::new(net.at(ip)), SocketAddr::new(ip, 8300)).await);
    }
    group_elects_replicates_and_fails_over(nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_over_tcp_loopback() {
    let mut nodes = Vec::new();
    for id in 1..=3u64 {
        let ip = IpAddr::from([127, 0, 0, 20 + id as u8]);
        nodes.push(start_node(id, Arc::new(TcpTransport { bind: Some(ip) }), SocketAddr::new(ip, 0)).await);
    }
    group_elects_replicates_and_fails_over(nodes).await;
}

/// A follower that lags behind the leader's purged log catches up from a snapshot, sent in
/// chunks as `Raft.InstallSnapshot` calls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_learner_catches_up_from_a_snapshot() {
    let net = MemTransport::default();
    // Keep no log once it is in a snapshot; chunks far smaller than the snapshot.
    let config = Config { max_in_snapshot_log_to_keep: 0, ..TIMING.config("mesh-test").unwrap() };
    let config = Config { snapshot_max_chunk_size: 64, ..config };
    let at = |id: u64| IpAddr::from([10, 0, 1, id as u8]);
    let mut nodes = Vec::new();
    for id in 1..=3u64 {
        nodes.push(start_node_with(id, Arc::new(net.at(at(id))), SocketAddr::new(at(id), 8300), config.clone()).await);
    }
    initialize(&nodes).await;
    let all: Vec<NodeId> = nodes.iter().map(|n| n.id).collect();
    let leader = wait_for_leader(&nodes, &all).await;
    let l = node(&nodes, leader);
    let mut last = None;
    for i in 0..20 {
        let r = l.raft.client_write(put(&format!("k{i}"), &format!("value {i}"))).await.expect("write");
        last = Some(r.log_id);
    }
    let last = last.unwrap();
    l.raft.trigger().snapshot().await.unwrap();
    l.raft.wait(Some(DEADLINE)).snapshot(last, "snapshot").await.expect("snapshot built");
    l.raft.trigger().purge_log(last.index).await.unwrap();
    l.raft.wait(Some(DEADLINE)).purged(Some(last), "purged").await.expect("log purged");

    let new = start_node_with(4, Arc::new(net.at(at(4))), SocketAddr::new(at(4), 8300), config.clone()).await;
    let member = MeshNode { name: "n4".into(), rpc: new.addr.to_string() };
    nodes.push(new);
    let l = node(&nodes, leader);
    tokio::time::timeout(DEADLINE, l.raft.add_learner(4, member, true)).await.expect("in time").expect("learner added");
    let index = l.raft.metrics().borrow().last_applied.unwrap().index;
    let applied = wait_applied(&nodes, &[1, 2, 3, 4], index).await;
    assert_eq!(kv(&applied, "k19"), Some(b"value 19".to_vec()));
    let m4 = node(&nodes, 4).raft.metrics().borrow().clone();
    assert!(m4.snapshot.is_some_and(|s| s.index >= last.index), "node 4 has no snapshot: {:?}", m4.snapshot);
    for n in nodes.iter_mut() {
        n.stop().await;
    }
}

/// Failures reach openraft as it expects: nothing listening, or a node whose Raft RPC stopped,
/// is unreachable (openraft backs off); a connection is opened again after the peer comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_and_stopped_peers_map_to_unreachable() {
    let net = MemTransport::default();
    let hello =
        Hello { node: "c".into(), node_id: "id-c".into(), datacenter: "dc1".into(), role: Role::Server, http: None };
    let mut factory = MeshNetwork::new(9, Arc::new(net.at(IpAddr::from([10, 0, 2, 9]))), hello, &TIMING);
    let addr = SocketAddr::new(IpAddr::from([10, 0, 2, 1]), 8300);
    let target = MeshNode { name: "n1".into(), rpc: addr.to_string() };
    let mut client = factory.new_client(1, &target).await;
    let vote = || VoteRequest { vote: Vote::new(1, 9), last_log_id: None };
    let opt = RPCOption::new(Duration::from_secs(5));
    match client.vote(vote(), opt.clone()).await {
        Err(RPCError::Unreachable(_)) => {}
        other => panic!("expected Unreachable, got {other:?}"),
    }
    // The node appears (uninitialized): the same client connects and gets an answer.
    let mut n1 = start_node(1, Arc::new(net.at(addr.ip())), addr).await;
    let r = client.vote(vote(), opt.clone()).await.expect("vote answered");
    assert_eq!(r.vote, Vote::new(1, 9));
    // Its Raft RPC stops; the open connection answers "unavailable": unreachable.
    n1.stop().await;
    match client.vote(vote(), opt).await {
        Err(RPCError::Unreachable(_)) => {}
        other => panic!("expected Unreachable, got {other:?}"),
    }
}
