//! The Raft network over mesh's internal RPC (issue 13, step 2): openraft's RPCs travel as
//! [`Request::Raft`] calls on the one RPC connection between two nodes, not on a port of their
//! own.
//!
//! - [`MeshNetwork`] is the [`RaftNetworkFactory`]: one [`Conn`] per target, opened lazily
//!   through the node's [`Transport`] and opened again once closed. Its clients
//!   ([`MeshNetworkClient`]) bound every call by openraft's [`RPCOption`] and map failures to
//!   what openraft expects: a peer that cannot be reached is [`RPCError::Unreachable`] (openraft
//!   backs off), no answer in time is [`RPCError::Timeout`], a broken connection is
//!   [`RPCError::Network`] (retried at once, on a new connection).
//! - [`RaftHandler`] is the serving side: it answers [`Request::Raft`] by handing the request to
//!   the local [`Raft`]. It implements [`Handler`] on its own (tests, a Raft-only node); the
//!   server's handler delegates to [`RaftHandler::handle`].
//! - [`RaftTiming`] sets Consul-like timings (heartbeat 500 ms, election timeout 1–2 s), scaled
//!   by one multiplier as Consul's `raft_multiplier`.

use super::{MeshNode, NodeId, TypeConfig};
use crate::rpc::{
    Conn, Handler, Hello, NoHandler, Peer, RaftRequest, RaftResponse, RemoteError, Request, Response, RpcError,
};
use crate::rpc::{Sink, Transport};
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError as RaftRemoteError, Timeout, Unreachable,
};
use openraft::network::{Backoff, RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use openraft::{Config, ConfigError, RPCTypes, Raft};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tracing::debug;

/// Raft timings: Consul's defaults (heartbeat 500 ms, election timeout between 1,000 and
/// 2,000 ms) times [`multiplier`](Self::multiplier), like Consul's `raft_multiplier`. A larger
/// multiplier tolerates slower machines and networks at the cost of slower failover; tests use
/// a smaller one.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RaftTiming {
    /// Scales every timing (1.0: the defaults).
    pub multiplier: f64,
}

impl Default for RaftTiming {
    fn default() -> Self {
        RaftTiming { multiplier: 1.0 }
    }
}

impl RaftTiming {
    /// Leader heartbeat interval at multiplier 1, in milliseconds.
    pub const HEARTBEAT_MS: u64 = 500;
    /// Shortest election timeout at multiplier 1, in milliseconds.
    pub const ELECTION_MIN_MS: u64 = 1_000;
    /// Longest election timeout at multiplier 1, in milliseconds.
    pub const ELECTION_MAX_MS: u64 = 2_000;
    /// Time for sending and installing one snapshot chunk at multiplier 1, in milliseconds.
    pub const INSTALL_SNAPSHOT_MS: u64 = 10_000;
    /// Largest snapshot chunk: its MessagePack encoding (up to twice its size, bytes as an
    /// array) stays well below [`crate::rpc::MAX_FRAME`].
    pub const SNAPSHOT_CHUNK: u64 = 1024 * 1024;

    /// Timings scaled by `multiplier`.
    pub fn new(multiplier: f64) -> Self {
        RaftTiming { multiplier }
    }

    fn scale(&self, ms: u64) -> u64 {
        let m = if self.multiplier.is_finite() && self.multiplier > 0.0 { self.multiplier } else { 1.0 };
        ((ms as f64 * m).round() as u64).max(1)
    }

    /// The leader's heartbeat interval.
    pub fn heartbeat(&self) -> Duration {
        Duration::from_millis(self.scale(Self::HEARTBEAT_MS))
    }

    /// The range of election timeouts (a random one per term).
    pub fn election_timeout(&self) -> (Duration, Duration) {
        (
            Duration::from_millis(self.scale(Self::ELECTION_MIN_MS)),
            Duration::from_millis(self.scale(Self::ELECTION_MAX_MS)),
        )
    }

    /// How long to wait before calling an unreachable peer again: one heartbeat interval.
    pub fn backoff(&self) -> Duration {
        self.heartbeat()
    }

    /// The openraft configuration with these timings, validated.
    pub fn config(&self, cluster_name: &str) -> Result<Config, ConfigError> {
        let (min, max) = self.election_timeout();
        Config {
            cluster_name: cluster_name.to_owned(),
            heartbeat_interval: self.heartbeat().as_millis() as u64,
            election_timeout_min: min.as_millis() as u64,
            // A range of at least two values: openraft wants min < max.
            election_timeout_max: (max.as_millis() as u64).max(min.as_millis() as u64 + 1),
            install_snapshot_timeout: self.scale(Self::INSTALL_SNAPSHOT_MS),
            snapshot_max_chunk_size: Self::SNAPSHOT_CHUNK,
            // Snapshots follow mesh's own policy (`raft::server`'s `snapshot_policy`: by the
            // log's bytes against the last snapshot's size, as the state log's), not a count
            // of entries whatever the state's size.
            snapshot_policy: openraft::SnapshotPolicy::Never,
            ..Config::default()
        }
        .validate()
    }
}

/// One target's connection, shared by every client openraft makes for it.
type Slot = Arc<tokio::sync::Mutex<Option<(SocketAddr, Conn)>>>;

/// openraft's network factory over mesh's RPC: the connections of one Raft node to the other
/// members. Cheap to clone (clones share the connections).
#[derive(Clone)]
pub struct MeshNetwork {
    id: NodeId,
    transport: Arc<dyn Transport>,
    hello: Hello,
    handler: Arc<dyn Handler>,
    backoff: Duration,
    conns: Arc<Mutex<BTreeMap<NodeId, Slot>>>,
    /// Members that could not be reached since they last could (logged once per outage).
    unreachable: Arc<Mutex<std::collections::HashSet<NodeId>>>,
    /// When each member last answered (autopilot's `LastContact`).
    contacts: Arc<super::Contacts>,
}

impl MeshNetwork {
    /// The network of Raft node `id`: it connects through `transport` and introduces itself
    /// with `hello` (its datacenter must be the peers'). Peers' calls on these connections are
    /// not served (see [`with_handler`](Self::with_handler)).
    pub fn new(id: NodeId, transport: Arc<dyn Transport>, hello: Hello, timing: &RaftTiming) -> Self {
        MeshNetwork {
            id,
            transport,
            hello,
            handler: Arc::new(NoHandler),
            backoff: timing.backoff(),
            conns: Arc::default(),
            unreachable: Arc::default(),
            contacts: Arc::default(),
        }
    }

    /// Record in `contacts` when each member last answered an AppendEntries or a snapshot.
    pub fn with_contacts(mut self, contacts: Arc<super::Contacts>) -> Self {
        self.contacts = contacts;
        self
    }

    /// Serve what peers ask on the connections this node opens through `handler` (the RPC is
    /// symmetric; by default nothing is served on them).
    pub fn with_handler(mut self, handler: Arc<dyn Handler>) -> Self {
        self.handler = handler;
        self
    }

    /// Close every connection (they are opened again when needed).
    pub fn close_all(&self) {
        let slots: Vec<Slot> = self.conns.lock().unwrap_or_else(|p| p.into_inner()).values().cloned().collect();
        for slot in slots {
            if let Ok(mut s) = slot.try_lock()
                && let Some((_, c)) = s.take()
            {
                c.close();
            }
        }
    }

    fn slot(&self, target: NodeId) -> Slot {
        self.conns.lock().unwrap_or_else(|p| p.into_inner()).entry(target).or_default().clone()
    }
}

impl RaftNetworkFactory<TypeConfig> for MeshNetwork {
    type Network = MeshNetworkClient;

    async fn new_client(&mut self, target: NodeId, node: &MeshNode) -> MeshNetworkClient {
        MeshNetworkClient { net: self.clone(), target, node: node.clone(), slot: self.slot(target) }
    }
}

/// The RPCs of one Raft node to one target, on the connection its [`MeshNetwork`] keeps.
pub struct MeshNetworkClient {
    net: MeshNetwork,
    target: NodeId,
    node: MeshNode,
    slot: Slot,
}

/// Why a call failed, before it becomes an openraft error of the right type.
#[derive(Debug)]
enum Failure {
    /// Could not connect, or the peer does not serve Raft now: back off.
    Unreachable(RpcError),
    /// No answer within this time.
    Timeout(Duration),
    /// The connection broke or the answer made no sense: retry (on a new connection).
    Network(RpcError),
}

impl Failure {
    fn into_rpc<E: std::error::Error>(
        self,
        net: &MeshNetwork,
        target: NodeId,
        action: RPCTypes,
    ) -> RPCError<NodeId, MeshNode, E> {
        match self {
            Failure::Unreachable(e) => RPCError::Unreachable(Unreachable::new(&e)),
            Failure::Timeout(timeout) => RPCError::Timeout(Timeout { action, id: net.id, target, timeout }),
            Failure::Network(e) => RPCError::Network(NetworkError::new(&e)),
        }
    }
}

impl MeshNetworkClient {
    /// The target's address as its membership entry names it.
    async fn addr(&self) -> Result<SocketAddr, RpcError> {
        if let Ok(a) = self.node.rpc.parse() {
            return Ok(a);
        }
        let bad = |why: String| RpcError::Io(format!("raft node {} at {:?}: {why}", self.target, self.node.rpc));
        tokio::net::lookup_host(&self.node.rpc)
            .await
            .map_err(|e| bad(e.to_string()))?
            .next()
            .ok_or_else(|| bad("no address".into()))
    }

    /// The open connection to the target, connecting (within `budget`) if there is none.
    async fn conn(&self, budget: Duration) -> Result<Conn, Failure> {
        let addr = self.addr().await.map_err(Failure::Unreachable)?;
        let mut slot = tokio::time::timeout(budget, self.slot.lock()).await.map_err(|_| Failure::Timeout(budget))?;
        if let Some((a, c)) = slot.as_ref()
            && *a == addr
            && !c.is_closed()
        {
            return Ok(c.clone());
        }
        if let Some((_, old)) = slot.take() {
            old.close();
        }
        let connect =
            Conn::connect(self.net.transport.as_ref(), addr, self.net.hello.clone(), self.net.handler.clone());
        let conn = match tokio::time::timeout(budget, connect).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                if self.net.unreachable.lock().unwrap_or_else(|p| p.into_inner()).insert(self.target) {
                    tracing::warn!(member = %self.node.name, %addr, error = %e, "raft: cannot reach a member; retrying");
                } else {
                    debug!(target = self.target, %addr, error = %e, "raft: cannot connect");
                }
                return Err(Failure::Unreachable(e));
            }
            Err(_) => return Err(Failure::Unreachable(RpcError::Timeout(addr, budget))),
        };
        if self.net.unreachable.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.target) {
            tracing::info!(member = %self.node.name, %addr, "raft: reached the member again");
        }
        debug!(target = self.target, %addr, node = %conn.peer().hello.node, "raft: connected");
        *slot = Some((addr, conn.clone()));
        Ok(conn)
    }

    /// Send `req`, answer within `ttl` (connecting included).
    async fn call(&self, req: RaftRequest, ttl: Duration) -> Result<Response, Failure> {
        let start = tokio::time::Instant::now();
        let conn = self.conn(ttl).await?;
        let left = ttl.saturating_sub(start.elapsed());
        if left.is_zero() {
            return Err(Failure::Timeout(ttl));
        }
        match conn.call(Request::Raft(req), left).await {
            Ok(r) => Ok(r),
            Err(RpcError::Timeout(..)) => Err(Failure::Timeout(ttl)),
            // The peer is up but does not serve Raft (stopping, not a server): back off.
            Err(e @ RpcError::Remote(RemoteError::Unavailable(_) | RemoteError::NotServed(_))) => {
                Err(Failure::Unreachable(e))
            }
            Err(e) => {
                if matches!(e, RpcError::Protocol(_)) {
                    conn.close();
                }
                Err(Failure::Network(e))
            }
        }
    }

    fn unexpected(&self, r: &Response) -> Failure {
        Failure::Network(RpcError::Protocol(format!("raft node {} answered with {r:?}", self.target)))
    }

    /// A remote Raft error: a stopped Raft is as good as unreachable; an API error goes back
    /// to openraft as the target's.
    fn remote<E: std::error::Error>(
        &self,
        e: RaftError<NodeId, E>,
        action: RPCTypes,
    ) -> RPCError<NodeId, MeshNode, RaftError<NodeId, E>> {
        match e {
            RaftError::Fatal(f) => RPCError::Unreachable(Unreachable::new(&f)),
            api => RPCError::RemoteError(RaftRemoteError::new_with_node(self.target, self.node.clone(), api)),
        }
        .tap_debug(self.target, action)
    }
}

/// Log an RPC error once, at debug level.
trait TapDebug {
    fn tap_debug(self, target: NodeId, action: RPCTypes) -> Self;
}

impl<E: std::error::Error> TapDebug for RPCError<NodeId, MeshNode, E> {
    fn tap_debug(self, target: NodeId, action: RPCTypes) -> Self {
        debug!(target, %action, error = %self, "raft: rpc failed");
        self
    }
}

/// The timeout openraft wants honoured: the call ends by the soft limit, so openraft sees a
/// [`RPCError::Timeout`] before it drops the call at the hard one.
fn ttl(option: &RPCOption) -> Duration {
    option.soft_ttl().max(Duration::from_millis(1))
}

impl RaftNetwork<TypeConfig> for MeshNetworkClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, MeshNode, RaftError<NodeId>>> {
        let action = RPCTypes::AppendEntries;
        let e = match self.call(RaftRequest::AppendEntries(rpc), ttl(&option)).await {
            Ok(Response::Raft(RaftResponse::AppendEntries(Ok(r)))) => {
                if !matches!(r, AppendEntriesResponse::HigherVote(_)) {
                    self.net.contacts.acked(self.target);
                }
                return Ok(r);
            }
            Ok(Response::Raft(RaftResponse::AppendEntries(Err(e)))) => return Err(self.remote(e, action)),
            Ok(other) => self.unexpected(&other),
            Err(f) => f,
        };
        Err(e.into_rpc(&self.net, self.target, action).tap_debug(self.target, action))
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, MeshNode, RaftError<NodeId>>> {
        let action = RPCTypes::Vote;
        let e = match self.call(RaftRequest::Vote(rpc), ttl(&option)).await {
            Ok(Response::Raft(RaftResponse::Vote(Ok(r)))) => return Ok(r),
            Ok(Response::Raft(RaftResponse::Vote(Err(e)))) => return Err(self.remote(e, action)),
            Ok(other) => self.unexpected(&other),
            Err(f) => f,
        };
        Err(e.into_rpc(&self.net, self.target, action).tap_debug(self.target, action))
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RPCError<NodeId, MeshNode, RaftError<NodeId, InstallSnapshotError>>>
    {
        let action = RPCTypes::InstallSnapshot;
        let e = match self.call(RaftRequest::InstallSnapshot(rpc), ttl(&option)).await {
            Ok(Response::Raft(RaftResponse::InstallSnapshot(Ok(r)))) => {
                self.net.contacts.acked(self.target);
                return Ok(r);
            }
            Ok(Response::Raft(RaftResponse::InstallSnapshot(Err(e)))) => return Err(self.remote(e, action)),
            Ok(other) => self.unexpected(&other),
            Err(f) => f,
        };
        Err(e.into_rpc(&self.net, self.target, action).tap_debug(self.target, action))
    }

    fn backoff(&self) -> Backoff {
        Backoff::new(std::iter::repeat(self.net.backoff))
    }
}

/// Serves the Raft RPCs peers send to this node by handing them to its [`Raft`]. Cheap to
/// clone.
#[derive(Clone)]
pub struct RaftHandler {
    raft: Raft<TypeConfig>,
    stopped: Arc<AtomicBool>,
    contacts: Arc<super::Contacts>,
}

impl RaftHandler {
    /// Serve `raft`.
    pub fn new(raft: Raft<TypeConfig>) -> Self {
        RaftHandler { raft, stopped: Arc::default(), contacts: Arc::default() }
    }

    /// Record in `contacts` when this node last accepted the leader's AppendEntries (a
    /// heartbeat included) or snapshot: Consul's `X-Consul-LastContact` on a follower.
    pub fn with_contacts(mut self, contacts: Arc<super::Contacts>) -> Self {
        self.contacts = contacts;
        self
    }

    /// The Raft it serves.
    pub fn raft(&self) -> &Raft<TypeConfig> {
        &self.raft
    }

    /// Stop serving: every Raft request is answered [`RemoteError::Unavailable`] from now on
    /// (the callers back off), also on connections already open.
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::Relaxed);
    }

    /// Whether [`stop`](Self::stop) was called.
    pub fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::Relaxed)
    }

    /// Answer one Raft request. A request the local Raft cannot take (it has shut down) is
    /// answered with openraft's error, which the caller treats as unreachable.
    pub async fn handle(&self, req: RaftRequest) -> Result<Response, RemoteError> {
        if self.is_stopped() {
            return Err(RemoteError::Unavailable("raft stopped".into()));
        }
        Ok(match req {
            RaftRequest::AppendEntries(r) => {
                let answer = self.raft.append_entries(r).await;
                // Accepted (or a log to reconcile): it came from the leader of this term.
                if answer.as_ref().is_ok_and(|a| !matches!(a, AppendEntriesResponse::HigherVote(_))) {
                    self.contacts.heard_from_leader();
                }
                Response::Raft(RaftResponse::AppendEntries(answer))
            }
            RaftRequest::Vote(r) => Response::Raft(RaftResponse::Vote(self.raft.vote(r).await)),
            RaftRequest::InstallSnapshot(r) => {
                let answer = self.raft.install_snapshot(r).await;
                if answer.is_ok() {
                    self.contacts.heard_from_leader();
                }
                Response::Raft(RaftResponse::InstallSnapshot(answer))
            }
        })
    }
}

#[async_trait::async_trait]
impl Handler for RaftHandler {
    async fn call(&self, _peer: &Peer, req: Request) -> Result<Response, RemoteError> {
        match req {
            Request::Raft(r) => self.handle(r).await,
            other => Err(RemoteError::NotServed(other.name().into())),
        }
    }

    async fn open(&self, _peer: Peer, req: Request, sink: Sink) {
        sink.end(Some(format!("not served here: {}", req.name())));
    }
}
