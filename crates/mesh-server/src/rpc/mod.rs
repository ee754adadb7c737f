//! Internal RPC: the one connection between two nodes that carries everything they say to each
//! other (agent sessions, status reports, the state stream, forwarded requests).
//!
//! On the wire:
//! - a preamble each way, `b"MESH"` + major + minor version (u16, big endian). A peer whose major
//!   version differs is refused at once, with a log line on both sides (the refusing side sends
//!   its own preamble first, so the other side can say which versions met);
//! - then length-delimited frames, `[u32 length, big endian][MessagePack of a `Frame`]`, at most
//!   [`MAX_FRAME`] bytes. The first frame each way is a hello that names the node and its
//!   datacenter; a node of another datacenter is refused.
//!
//! One connection multiplexes any number of calls (request → one response, each with a timeout)
//! and streams (request → items until either side ends it). Every queue has a bound: frames to
//! send wait in a queue of [`SEND_QUEUE`] frames, and a stream's items in one of its own; the
//! reader waits for a slow stream consumer, which pushes back through TCP to the sender, whose
//! own code decides what to do when its queue is full (the control loop never waits: see
//! [`Sink::try_send`]).
//!
//! The byte stream comes from a [`Transport`], so TLS can wrap it and a simulated network or an
//! in-memory pipe ([`MemTransport`], which `mesh dev` and tests use) can replace TCP without
//! touching message code.

pub mod msg;
mod transport;

pub use msg::{Item, RaftRequest, RaftResponse, Request, Response};
pub use transport::{BoxIo, Listener, MemTransport, TcpTransport, Transport};

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, BufWriter, ReadHalf, WriteHalf};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

/// Major version of the protocol: a peer with another one is refused.
pub const PROTO_MAJOR: u16 = 1;
/// Minor version: peers with different minors talk (new fields are optional).
/// 1: [`Request::Raft`] and its responses. 2: [`Request::Coordinate`]; a call this node cannot
/// decode (a request of a later minor version) is answered `NotServed` instead of closing
/// the connection.
pub const PROTO_MINOR: u16 = 2;
const MAGIC: &[u8; 4] = b"MESH";
/// Largest frame accepted (a state snapshot travels in chunks well below it).
pub const MAX_FRAME: usize = 16 * 1024 * 1024;
/// Frames waiting to be written on one connection.
pub const SEND_QUEUE: usize = 4096;
/// Items of one stream waiting for their consumer.
pub const STREAM_QUEUE: usize = 1024;
/// Time allowed for the preamble and hellos.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// A connection with nothing received for this long is closed (pings go every third of it).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(15);

/// What a node is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    /// A control node (`mesh server`).
    Server,
    /// A compute node (`mesh agent`).
    Agent,
    /// A client that is neither (tools, tests).
    Client,
}

/// Who is at the other end, as its hello said.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Node name.
    pub node: String,
    /// The node id of its data dir (a new one after the data dir was wiped).
    pub node_id: String,
    /// Datacenter.
    pub datacenter: String,
    /// Role.
    pub role: Role,
    /// Its HTTP API (`host:port`), where clients are redirected (Mesos `/master/redirect`).
    #[serde(default)]
    pub http: Option<String>,
}

/// A connected peer.
#[derive(Clone, Debug)]
pub struct Peer {
    /// Its hello.
    pub hello: Hello,
    /// Its address (as the transport sees it).
    pub addr: SocketAddr,
    /// The minor protocol version of its preamble: requests added later than it must not be
    /// sent to it (a peer before 1.2 closes the connection on a call it cannot decode).
    pub minor: u16,
}

/// Errors of the RPC layer.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RpcError {
    /// Could not connect or the connection broke.
    #[error("{0}")]
    Io(String),
    /// The peer refused us (version, datacenter) or we refused it.
    #[error("refused: {0}")]
    Refused(String),
    /// No answer in time.
    #[error("no answer from {0} within {1:?}")]
    Timeout(SocketAddr, Duration),
    /// The connection is closed.
    #[error("connection to {0} closed")]
    Closed(SocketAddr),
    /// The peer sent something that is not this protocol.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The peer's handler answered with an error.
    #[error("{0}")]
    Remote(RemoteError),
}

/// An error a handler sends back to the caller.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, thiserror::Error)]
pub enum RemoteError {
    /// The request is not served by this node (e.g. sent to an agent instead of a server).
    #[error("not served here: {0}")]
    NotServed(String),
    /// The request was refused (bad input, not owned, ...).
    #[error("{0}")]
    Refused(String),
    /// The node cannot do it now (its store failed, it is stopping); try again later.
    #[error("unavailable: {0}")]
    Unavailable(String),
}

#[derive(Clone, Serialize, Deserialize)]
enum Frame {
    Hello(Hello),
    Refused(String),
    Call { id: u64, timeout_ms: u64, req: Request },
    Reply { id: u64, res: Result<Response, RemoteError> },
    Open { id: u64, req: Request },
    Item { id: u64, item: Item },
    End { id: u64, reason: Option<String> },
    Cancel { id: u64 },
    Ping,
    Pong,
}

/// Faults injected into the frames a connection sends, for tests of the protocols above: after
/// the handshake each frame is dropped, sent twice, held back (so later frames overtake it), or
/// the connection is cut, with these probabilities, from a seeded random source.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Faults {
    /// Seed (each connection derives its own from it).
    pub seed: u64,
    /// Probability that a frame is dropped.
    pub drop: f64,
    /// Probability that a frame is sent twice.
    pub duplicate: f64,
    /// Probability that a frame is held back up to `max_delay`.
    pub delay: f64,
    /// Longest hold.
    pub max_delay: Duration,
    /// Probability that the connection is cut instead of sending a frame.
    pub disconnect: f64,
}

struct FaultState {
    f: Faults,
    rng: rand::rngs::StdRng,
}

enum Fault {
    None,
    Drop,
    Duplicate,
    Delay(Duration),
    Cut,
}

impl FaultState {
    fn new(f: Faults) -> FaultState {
        use rand::SeedableRng;
        static CONNS: AtomicU64 = AtomicU64::new(0);
        let n = CONNS.fetch_add(1, Ordering::Relaxed);
        FaultState { f, rng: rand::rngs::StdRng::seed_from_u64(f.seed ^ n.wrapping_mul(0x9e37_79b9_7f4a_7c15)) }
    }

    fn next(&mut self) -> Fault {
        use rand::Rng;
        let r: f64 = self.rng.random();
        let f = &self.f;
        if r < f.disconnect {
            Fault::Cut
        } else if r < f.disconnect + f.drop {
            Fault::Drop
        } else if r < f.disconnect + f.drop + f.duplicate {
            Fault::Duplicate
        } else if r < f.disconnect + f.drop + f.duplicate + f.delay {
            let ms = self.rng.random_range(0..=f.max_delay.as_millis().max(1) as u64);
            Fault::Delay(Duration::from_millis(ms))
        } else {
            Fault::None
        }
    }
}

/// TEST ONLY: the environment variable that adds latency to the RPC of this process, for tests
/// that need datacenters at different distances on one machine (network coordinates, nearest
/// datacenter). `MESH_TEST_RPC_DELAY="127.0.0.3=40ms,127.0.0.4=80ms"`: every frame this node
/// sends to a peer at one of those addresses leaves that much later (in order, without
/// throttling), so the round trip between this node and that peer grows by it, whichever of
/// the two measures it. Never set it in production; a malformed entry is ignored with a
/// warning.
pub const TEST_DELAY_ENV: &str = "MESH_TEST_RPC_DELAY";

/// The test delay ([`TEST_DELAY_ENV`]) towards `ip`, if any.
fn test_delay(ip: std::net::IpAddr) -> Option<Duration> {
    static DELAYS: std::sync::OnceLock<HashMap<std::net::IpAddr, Duration>> = std::sync::OnceLock::new();
    DELAYS
        .get_or_init(|| match std::env::var(TEST_DELAY_ENV) {
            Ok(v) => parse_test_delays(&v),
            Err(_) => HashMap::new(),
        })
        .get(&ip)
        .copied()
}

/// `ip=40ms,ip=1s,...` (ms or s); malformed entries are left out with a warning.
fn parse_test_delays(v: &str) -> HashMap<std::net::IpAddr, Duration> {
    let mut out = HashMap::new();
    for part in v.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let parsed = part.split_once('=').and_then(|(ip, d)| {
            let ip = ip.trim().parse().ok()?;
            let d = d.trim();
            let d = match d.strip_suffix("ms") {
                Some(ms) => Duration::from_millis(ms.parse().ok()?),
                None => Duration::from_secs(d.strip_suffix('s')?.parse().ok()?),
            };
            Some((ip, d))
        });
        match parsed {
            Some((ip, d)) => {
                warn!(%ip, delay = ?d, "{TEST_DELAY_ENV}: TEST ONLY, frames to this peer are delayed");
                out.insert(ip, d);
            }
            None => warn!(entry = part, "{TEST_DELAY_ENV}: not `ip=<n>ms`; ignored"),
        }
    }
    out
}

/// Frames from `rx`, each released `delay` after it was queued, in order (tests only).
fn delay_line(mut rx: mpsc::Receiver<Frame>, delay: Duration) -> mpsc::Receiver<Frame> {
    let (stamped_tx, mut stamped_rx) = mpsc::channel::<(tokio::time::Instant, Frame)>(SEND_QUEUE);
    let (out_tx, out_rx) = mpsc::channel(SEND_QUEUE);
    tokio::spawn(async move {
        while let Some(f) = rx.recv().await {
            if stamped_tx.send((tokio::time::Instant::now() + delay, f)).await.is_err() {
                return;
            }
        }
    });
    tokio::spawn(async move {
        while let Some((due, f)) = stamped_rx.recv().await {
            tokio::time::sleep_until(due).await;
            if out_tx.send(f).await.is_err() {
                return;
            }
        }
    });
    out_rx
}

/// Serves what peers ask of this node.
#[async_trait::async_trait]
pub trait Handler: Send + Sync + 'static {
    /// Answer one call.
    async fn call(&self, peer: &Peer, req: Request) -> Result<Response, RemoteError>;
    /// Serve a stream: send items through `sink` until done (returning ends the stream) or the
    /// peer goes away ([`Sink::closed`]).
    async fn open(&self, peer: Peer, req: Request, sink: Sink);
    /// The connection to `peer` ended.
    fn disconnected(&self, _peer: &Peer) {}
}

/// Whether two nodes may talk: of one datacenter, or two servers (the WAN: a server serves a
/// server of another datacenter only the requests sent there with `?dc=`, see
/// [`crate::cluster::server`]).
fn same_pool(theirs: &Hello, ours: &Hello) -> bool {
    theirs.datacenter == ours.datacenter || (theirs.role == Role::Server && ours.role == Role::Server)
}

/// A handler that serves nothing (a node that only calls out).
pub struct NoHandler;

#[async_trait::async_trait]
impl Handler for NoHandler {
    async fn call(&self, _peer: &Peer, req: Request) -> Result<Response, RemoteError> {
        Err(RemoteError::NotServed(req.name().into()))
    }
    async fn open(&self, _peer: Peer, req: Request, sink: Sink) {
        sink.end(Some(format!("not served here: {}", req.name())));
    }
}

/// The sending end of a stream this node serves.
pub struct Sink {
    id: u64,
    tx: mpsc::Sender<Frame>,
    cancelled: tokio::sync::watch::Receiver<bool>,
    ended: bool,
}

impl Sink {
    /// Queue an item; waits while the connection's send queue is full. `false`: the connection
    /// or the stream is gone.
    pub async fn send(&self, item: Item) -> bool {
        !*self.cancelled.borrow() && self.tx.send(Frame::Item { id: self.id, item }).await.is_ok()
    }

    /// Queue an item without waiting. `Err(item)` when the send queue is full (the peer is slow)
    /// or the stream is gone: the caller decides (keep it for later, or drop the stream).
    #[allow(clippy::result_large_err)] // the item goes back to the caller, unboxed as it came
    pub fn try_send(&self, item: Item) -> Result<(), Item> {
        if *self.cancelled.borrow() {
            return Err(item);
        }
        self.tx.try_send(Frame::Item { id: self.id, item }).map_err(|e| match e.into_inner() {
            Frame::Item { item, .. } => item,
            _ => unreachable!("only items are sent here"),
        })
    }

    /// Resolves when the peer cancelled the stream or the connection closed.
    pub async fn closed(&self) {
        let mut c = self.cancelled.clone();
        tokio::select! {
            _ = c.wait_for(|c| *c) => {}
            () = self.tx.closed() => {}
        }
    }

    /// Whether the stream is still open.
    pub fn is_open(&self) -> bool {
        !*self.cancelled.borrow() && !self.tx.is_closed()
    }

    /// End the stream, with a reason for the other side's log.
    pub fn end(mut self, reason: Option<String>) {
        self.ended = true;
        let _ = self.tx.try_send(Frame::End { id: self.id, reason });
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        if !self.ended {
            let _ = self.tx.try_send(Frame::End { id: self.id, reason: None });
        }
    }
}

/// The receiving end of a stream this node opened. Dropping it cancels the stream.
pub struct Stream {
    id: u64,
    rx: mpsc::Receiver<Result<Item, RpcError>>,
    conn: Conn,
}

impl Stream {
    /// The next item; `None` when the stream ended normally.
    pub async fn next(&mut self) -> Option<Result<Item, RpcError>> {
        self.rx.recv().await
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        let mut shared = self.conn.shared.lock();
        if shared.streams.remove(&self.id).is_some() {
            let _ = self.conn.tx.try_send(Frame::Cancel { id: self.id });
        }
    }
}

#[derive(Default)]
struct SharedState {
    calls: BTreeMap<u64, oneshot::Sender<Result<Response, RemoteError>>>,
    streams: BTreeMap<u64, mpsc::Sender<Result<Item, RpcError>>>,
    /// Streams this side serves: the flag that cancels each.
    serving: BTreeMap<u64, tokio::sync::watch::Sender<bool>>,
    closed: Option<String>,
}

struct Shared(Mutex<SharedState>);

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, SharedState> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One connection to a peer. Cheap to clone; the connection closes when every clone is gone
/// (or the peer closes it).
#[derive(Clone)]
pub struct Conn {
    tx: mpsc::Sender<Frame>,
    shared: Arc<Shared>,
    next_id: Arc<AtomicU64>,
    peer: Arc<Peer>,
    closed: tokio::sync::watch::Receiver<bool>,
    /// On outgoing connections: closes the connection when the last handle is dropped.
    _guard: Option<Arc<CloseGuard>>,
}

/// Closes a connection when dropped.
struct CloseGuard(tokio::sync::watch::Sender<bool>);

impl Drop for CloseGuard {
    fn drop(&mut self) {
        let _ = self.0.send(true);
    }
}

impl Conn {
    /// Connect to `addr`, exchange hellos, and serve what the peer asks through `handler`.
    pub async fn connect(
        transport: &dyn Transport,
        addr: SocketAddr,
        hello: Hello,
        handler: Arc<dyn Handler>,
    ) -> Result<Conn, RpcError> {
        let io = tokio::time::timeout(HANDSHAKE_TIMEOUT, transport.connect(addr))
            .await
            .map_err(|_| RpcError::Timeout(addr, HANDSHAKE_TIMEOUT))?
            .map_err(|e| RpcError::Io(format!("cannot connect to {addr}: {e}")))?;
        let (mut r, mut w) = tokio::io::split(io);
        let hs = async {
            write_preamble(&mut w).await?;
            let minor = check_preamble(&mut r, addr).await?;
            write_frame(&mut w, &Frame::Hello(hello.clone())).await?;
            match read_frame(&mut r).await? {
                Frame::Hello(h) => Ok((h, minor)),
                Frame::Refused(why) => Err(RpcError::Refused(why)),
                _ => Err(RpcError::Protocol("expected a hello".into())),
            }
        };
        let theirs = tokio::time::timeout(HANDSHAKE_TIMEOUT, hs)
            .await
            .map_err(|_| RpcError::Timeout(addr, HANDSHAKE_TIMEOUT))?;
        let (theirs, minor) = match theirs {
            Ok(h) => h,
            Err(e) => {
                warn!(peer = %addr, error = %e, "rpc: handshake failed");
                return Err(e);
            }
        };
        if !same_pool(&theirs, &hello) {
            let why = format!("{addr} is in datacenter {}, this node in {}", theirs.datacenter, hello.datacenter);
            warn!("rpc: refused: {why}");
            return Err(RpcError::Refused(why));
        }
        Ok(Conn::start(r, w, Peer { hello: theirs, addr, minor }, handler, true, transport.faults()))
    }

    fn start(
        r: ReadHalf<BoxIo>,
        w: WriteHalf<BoxIo>,
        peer: Peer,
        handler: Arc<dyn Handler>,
        outgoing: bool,
        faults: Option<Faults>,
    ) -> Conn {
        let (tx, rx) = mpsc::channel(SEND_QUEUE);
        let rx = match test_delay(peer.addr.ip()) {
            Some(d) => delay_line(rx, d),
            None => rx,
        };
        let (closed_tx, closed) = tokio::sync::watch::channel(false);
        let (close_tx, mut close_rx) = tokio::sync::watch::channel(false);
        let conn = Conn {
            tx,
            shared: Arc::new(Shared(Mutex::new(SharedState::default()))),
            next_id: Arc::new(AtomicU64::new(1)),
            peer: Arc::new(peer),
            closed,
            _guard: outgoing.then(|| Arc::new(CloseGuard(close_tx))),
        };
        let writer = tokio::spawn(write_loop(w, rx, faults.map(FaultState::new), conn.tx.downgrade()));
        let weak = conn.downgrade();
        tokio::spawn(async move {
            let why = tokio::select! {
                why = read_loop(r, &weak, handler.clone()) => why,
                // Accepted connections have no guard: its sender is gone, and only the peer
                // or an error closes them.
                Ok(_) = close_rx.wait_for(|c| *c) => "closed by this node".to_owned(),
            };
            let peer = weak.peer.clone();
            debug!(peer = %peer.addr, node = %peer.hello.node, reason = %why, "rpc: connection closed");
            weak.close(&why);
            writer.abort();
            let _ = closed_tx.send(true);
            handler.disconnected(&peer);
        });
        conn
    }

    fn downgrade(&self) -> WeakConn {
        WeakConn { shared: self.shared.clone(), peer: self.peer.clone(), strong_for_replies: self.tx.clone() }
    }

    /// Close an outgoing connection now (every handle sees it closed).
    pub fn close(&self) {
        if let Some(g) = &self._guard {
            let _ = g.0.send(true);
        }
    }

    /// Who is at the other end.
    pub fn peer(&self) -> &Peer {
        &self.peer
    }

    /// Whether the connection is closed.
    pub fn is_closed(&self) -> bool {
        *self.closed.borrow()
    }

    /// Resolves when the connection closes.
    pub async fn closed(&self) {
        let mut c = self.closed.clone();
        let _ = c.wait_for(|c| *c).await;
    }

    /// Call the peer and wait for its answer, at most `timeout`.
    pub async fn call(&self, req: Request, timeout: Duration) -> Result<Response, RpcError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut s = self.shared.lock();
            if s.closed.is_some() {
                return Err(RpcError::Closed(self.peer.addr));
            }
            s.calls.insert(id, tx);
        }
        let timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        let addr = self.peer.addr;
        let result = tokio::time::timeout(timeout, async {
            self.tx.send(Frame::Call { id, timeout_ms, req }).await.map_err(|_| RpcError::Closed(addr))?;
            match rx.await {
                Ok(Ok(r)) => Ok(r),
                Ok(Err(e)) => Err(RpcError::Remote(e)),
                Err(_) => Err(RpcError::Closed(addr)),
            }
        })
        .await
        .unwrap_or(Err(RpcError::Timeout(addr, timeout)));
        self.shared.lock().calls.remove(&id);
        result
    }

    /// Open a stream: the peer sends items until it ends it; drop the [`Stream`] to cancel.
    pub async fn open(&self, req: Request) -> Result<Stream, RpcError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(STREAM_QUEUE);
        {
            let mut s = self.shared.lock();
            if s.closed.is_some() {
                return Err(RpcError::Closed(self.peer.addr));
            }
            s.streams.insert(id, tx);
        }
        let stream = Stream { id, rx, conn: self.clone() };
        self.tx.send(Frame::Open { id, req }).await.map_err(|_| RpcError::Closed(self.peer.addr))?;
        Ok(stream)
    }
}

/// What the reader task holds: it must not keep the connection alive by itself.
struct WeakConn {
    shared: Arc<Shared>,
    peer: Arc<Peer>,
    /// Replies and stream items of this side's handlers: held by the reader, so they can
    /// answer even after every [`Conn`] clone is gone (an accepted connection has none).
    strong_for_replies: mpsc::Sender<Frame>,
}

impl WeakConn {
    fn close(&self, why: &str) {
        let mut s = self.shared.lock();
        s.closed = Some(why.to_owned());
        s.calls.clear();
        for (_, tx) in std::mem::take(&mut s.streams) {
            let _ = tx.try_send(Err(RpcError::Io(why.to_owned())));
        }
        for (_, c) in std::mem::take(&mut s.serving) {
            let _ = c.send(true);
        }
    }
}

async fn write_preamble(w: &mut (impl AsyncWriteExt + Unpin)) -> Result<(), RpcError> {
    let mut p = [0u8; 8];
    p[..4].copy_from_slice(MAGIC);
    p[4..6].copy_from_slice(&PROTO_MAJOR.to_be_bytes());
    p[6..8].copy_from_slice(&PROTO_MINOR.to_be_bytes());
    w.write_all(&p).await.map_err(|e| RpcError::Io(e.to_string()))?;
    w.flush().await.map_err(|e| RpcError::Io(e.to_string()))
}

/// Reads the peer's preamble: its minor version, or an error that names what was wrong (not
/// this protocol, or its version).
async fn check_preamble(r: &mut (impl AsyncReadExt + Unpin), addr: SocketAddr) -> Result<u16, RpcError> {
    let mut p = [0u8; 8];
    r.read_exact(&mut p).await.map_err(|e| RpcError::Io(format!("{addr} closed before its preamble: {e}")))?;
    if &p[..4] != MAGIC {
        return Err(RpcError::Protocol(format!("{addr} does not speak mesh RPC (first bytes {:02x?})", &p[..4])));
    }
    let major = u16::from_be_bytes([p[4], p[5]]);
    let minor = u16::from_be_bytes([p[6], p[7]]);
    if major != PROTO_MAJOR {
        return Err(RpcError::Refused(format!(
            "{addr} speaks protocol version {major}.{minor}, this node {PROTO_MAJOR}.{PROTO_MINOR}"
        )));
    }
    Ok(minor)
}

async fn write_frame(w: &mut (impl AsyncWriteExt + Unpin), f: &Frame) -> Result<(), RpcError> {
    let body = rmp_serde::to_vec_named(f).map_err(|e| RpcError::Protocol(format!("cannot encode a frame: {e}")))?;
    if body.len() > MAX_FRAME {
        return Err(RpcError::Protocol(format!("frame of {} bytes over the limit of {MAX_FRAME}", body.len())));
    }
    let len = u32::try_from(body.len()).unwrap_or(u32::MAX);
    w.write_all(&len.to_be_bytes()).await.map_err(|e| RpcError::Io(e.to_string()))?;
    w.write_all(&body).await.map_err(|e| RpcError::Io(e.to_string()))?;
    w.flush().await.map_err(|e| RpcError::Io(e.to_string()))
}

async fn read_frame(r: &mut (impl AsyncReadExt + Unpin)) -> Result<Frame, RpcError> {
    let body = read_body(r).await?;
    rmp_serde::from_slice(&body).map_err(|e| RpcError::Protocol(format!("undecodable frame: {e}")))
}

/// A call or stream this node cannot decode, most likely a request of a later minor version:
/// only its id is read, to answer it.
#[derive(Deserialize)]
enum UnknownFrame {
    Call { id: u64 },
    Open { id: u64 },
}

/// One frame's bytes.
async fn read_body(r: &mut (impl AsyncReadExt + Unpin)) -> Result<Vec<u8>, RpcError> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len).await.map_err(|e| RpcError::Io(e.to_string()))?;
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(RpcError::Protocol(format!("frame of {len} bytes over the limit of {MAX_FRAME}")));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await.map_err(|e| RpcError::Io(e.to_string()))?;
    Ok(body)
}

async fn write_loop(
    w: WriteHalf<BoxIo>,
    mut rx: mpsc::Receiver<Frame>,
    mut faults: Option<FaultState>,
    again: mpsc::WeakSender<Frame>,
) {
    let mut w = BufWriter::with_capacity(64 * 1024, w);
    let mut ping = tokio::time::interval(IDLE_TIMEOUT / 3);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Sends one frame, through the fault plan if there is one; `false`: stop.
    let mut send = async |w: &mut BufWriter<WriteHalf<BoxIo>>, f: Frame| -> bool {
        let Some(fs) = faults.as_mut() else { return write_buffered(w, &f).await.is_ok() };
        match fs.next() {
            Fault::None => write_buffered(w, &f).await.is_ok(),
            Fault::Drop => true,
            Fault::Duplicate => write_buffered(w, &f).await.is_ok() && write_buffered(w, &f).await.is_ok(),
            Fault::Delay(d) => {
                if let Some(tx) = again.upgrade() {
                    tokio::spawn(async move {
                        tokio::time::sleep(d).await;
                        let _ = tx.send(f).await;
                    });
                }
                true
            }
            Fault::Cut => false,
        }
    };
    loop {
        let frame = tokio::select! {
            f = rx.recv() => match f { Some(f) => f, None => break },
            _ = ping.tick() => Frame::Ping,
        };
        if !send(&mut w, frame).await {
            return;
        }
        // Everything queued goes out in one flush.
        while let Ok(f) = rx.try_recv() {
            if !send(&mut w, f).await {
                return;
            }
        }
        if w.flush().await.is_err() {
            return;
        }
    }
    let _ = w.shutdown().await;
}

async fn write_buffered(w: &mut BufWriter<WriteHalf<BoxIo>>, f: &Frame) -> Result<(), ()> {
    let body = match rmp_serde::to_vec_named(f) {
        Ok(b) if b.len() <= MAX_FRAME => b,
        Ok(b) => {
            warn!(bytes = b.len(), "rpc: a frame over the limit was not sent");
            return Ok(());
        }
        Err(e) => {
            warn!(error = %e, "rpc: cannot encode a frame");
            return Ok(());
        }
    };
    let len = u32::try_from(body.len()).unwrap_or(u32::MAX);
    w.write_all(&len.to_be_bytes()).await.map_err(|_| ())?;
    w.write_all(&body).await.map_err(|_| ())
}

/// Reads frames until the connection ends; returns why it ended.
async fn read_loop(r: ReadHalf<BoxIo>, conn: &WeakConn, handler: Arc<dyn Handler>) -> String {
    let mut r = BufReader::with_capacity(64 * 1024, r);
    let replies = conn.strong_for_replies.clone();
    loop {
        let body = match tokio::time::timeout(IDLE_TIMEOUT, read_body(&mut r)).await {
            Err(_) => return format!("nothing received for {IDLE_TIMEOUT:?}"),
            Ok(Err(RpcError::Protocol(e))) => {
                warn!(peer = %conn.peer.addr, node = %conn.peer.hello.node, "rpc: {e}; closing the connection");
                return e;
            }
            Ok(Err(e)) => return e.to_string(),
            Ok(Ok(b)) => b,
        };
        let frame = match rmp_serde::from_slice::<Frame>(&body) {
            Ok(f) => f,
            Err(e) => match rmp_serde::from_slice::<UnknownFrame>(&body) {
                // A request of a later version: refused, the connection kept.
                Ok(UnknownFrame::Call { id }) => {
                    debug!(peer = %conn.peer.addr, error = %e, "rpc: a call this node cannot decode");
                    let res = Err(RemoteError::NotServed(format!("a request this node cannot decode ({e})")));
                    let _ = replies.try_send(Frame::Reply { id, res });
                    continue;
                }
                Ok(UnknownFrame::Open { id }) => {
                    let reason = Some(format!("not served here: a request this node cannot decode ({e})"));
                    let _ = replies.try_send(Frame::End { id, reason });
                    continue;
                }
                Err(_) => {
                    let e = format!("undecodable frame: {e}");
                    warn!(peer = %conn.peer.addr, node = %conn.peer.hello.node, "rpc: {e}; closing the connection");
                    return e;
                }
            },
        };
        match frame {
            Frame::Ping => {
                let _ = replies.try_send(Frame::Pong);
            }
            Frame::Pong => {}
            Frame::Hello(_) | Frame::Refused(_) => {
                warn!(peer = %conn.peer.addr, "rpc: a second hello; closing the connection");
                return "protocol error: a second hello".into();
            }
            Frame::Reply { id, res } => {
                if let Some(tx) = conn.shared.lock().calls.remove(&id) {
                    let _ = tx.send(res);
                }
            }
            Frame::Item { id, item } => {
                let tx = conn.shared.lock().streams.get(&id).cloned();
                if let Some(tx) = tx {
                    // Waiting here pushes back on the peer through TCP.
                    if tx.send(Ok(item)).await.is_err() {
                        conn.shared.lock().streams.remove(&id);
                    }
                }
            }
            Frame::End { id, reason } => {
                if let Some(tx) = conn.shared.lock().streams.remove(&id)
                    && let Some(reason) = reason
                {
                    let _ = tx.try_send(Err(RpcError::Io(reason)));
                }
            }
            Frame::Cancel { id } => {
                if let Some(c) = conn.shared.lock().serving.remove(&id) {
                    let _ = c.send(true);
                }
            }
            Frame::Call { id, timeout_ms, req } => {
                let handler = handler.clone();
                let peer = conn.peer.clone();
                let replies = replies.clone();
                let timeout = Duration::from_millis(timeout_ms.min(3_600_000));
                tokio::spawn(async move {
                    let res = match tokio::time::timeout(timeout, handler.call(&peer, req)).await {
                        Ok(r) => r,
                        Err(_) => return, // the caller gave up already
                    };
                    let _ = replies.send(Frame::Reply { id, res }).await;
                });
            }
            Frame::Open { id, req } => {
                let (cancel_tx, cancelled) = tokio::sync::watch::channel(false);
                conn.shared.lock().serving.insert(id, cancel_tx);
                let sink = Sink { id, tx: replies.clone(), cancelled, ended: false };
                let handler = handler.clone();
                let peer = (*conn.peer).clone();
                let shared = conn.shared.clone();
                tokio::spawn(async move {
                    handler.open(peer, req, sink).await;
                    shared.lock().serving.remove(&id);
                });
            }
        }
    }
}

/// A node's RPC listener: accepts connections, refuses peers of another protocol version or
/// datacenter with a log line, and serves the rest through `handler`.
pub struct Server {
    local: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    /// Start serving on `listener`.
    pub fn start(mut listener: Box<dyn Listener>, hello: Hello, handler: Arc<dyn Handler>) -> std::io::Result<Server> {
        let local = listener.local_addr()?;
        let faults = listener.faults();
        let task = tokio::spawn(async move {
            loop {
                let (io, addr) = match listener.accept().await {
                    Ok(x) => x,
                    Err(e) => {
                        warn!(error = %e, "rpc: accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let hello = hello.clone();
                let handler = handler.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, accept(io, addr, hello, handler, faults)).await {
                        Ok(Ok(conn)) => {
                            debug!(peer = %addr, node = %conn.peer().hello.node, "rpc: peer connected");
                            // The reader task keeps the connection; this handle is not needed.
                        }
                        Ok(Err(e)) => warn!(peer = %addr, "rpc: refused a connection: {e}"),
                        Err(_) => {
                            warn!(peer = %addr, "rpc: refused a connection: no handshake within {HANDSHAKE_TIMEOUT:?}")
                        }
                    }
                });
            }
        });
        Ok(Server { local, task })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn accept(
    io: BoxIo,
    addr: SocketAddr,
    hello: Hello,
    handler: Arc<dyn Handler>,
    faults: Option<Faults>,
) -> Result<Conn, RpcError> {
    let (mut r, mut w) = tokio::io::split(io);
    // Our preamble first: a peer of another version learns which one it met.
    write_preamble(&mut w).await?;
    let minor = check_preamble(&mut r, addr).await?;
    let theirs = match read_frame(&mut r).await? {
        Frame::Hello(h) => h,
        _ => return Err(RpcError::Protocol(format!("{addr} sent no hello"))),
    };
    if !same_pool(&theirs, &hello) {
        let why = format!(
            "node {} ({addr}) is in datacenter {}, this node in {}",
            theirs.node, theirs.datacenter, hello.datacenter
        );
        let _ = write_frame(&mut w, &Frame::Refused(why.clone())).await;
        return Err(RpcError::Refused(why));
    }
    write_frame(&mut w, &Frame::Hello(hello)).await?;
    info!(peer = %addr, node = %theirs.node, role = ?theirs.role, "rpc: connected");
    Ok(Conn::start(r, w, Peer { hello: theirs, addr, minor }, handler, false, faults))
}

#[cfg(test)]
mod tests;
