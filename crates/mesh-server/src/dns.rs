//! The DNS server: UDP and TCP listeners over the published catalog, answering with the pure
//! [`mesh_core::dns`] (Consul's grammar and answers, the index, truncation).
//!
//! - **Index.** Queries answer from a published [`DnsIndex`] (one lock-free load), which is
//!   maintained per change: each update diffs the catalog it was built from against the new one
//!   and redoes only the entries of what changed ([`DnsIndex::update`]), so a change costs the same
//!   at 1,000 or 100,000 services. With a source that reports its publishes
//!   ([`CatalogSource::subscribe`], as the control loop's [`PublishedCatalog`] does), the index is
//!   updated by the publisher, right after it publishes the catalog and before anything it
//!   answers (a registration's HTTP reply) goes out; queries never build nor wait, and read the
//!   complete index of the catalog before until it is swapped in. A source that does not report
//!   its publishes gets the update done by the first query that sees a new catalog, under a
//!   mutex only index builders take.
//! - **Fast path.** A plain query for a service's A, AAAA or SRV records is read and answered in
//!   wire format from bytes the index prepared ([`mesh_core::dns::DnsZone::answer_fast`]); every
//!   other request (and any answer that would need cutting) goes through hickory's `Message`.
//! - **UDP** is served by a few plain threads blocking in `recv_from` on the shared socket: a query
//!   costs one receive, one lookup, one encoding and one send, with no task, channel or allocation
//!   of the async runtime in between (hickory-server's `Server` spawns a task per datagram and sends
//!   through a channel; that halved the throughput measured by `benches/dns/run.sh`). We encode
//!   responses ourselves, so the size limit and the TC bit are ours: see
//!   [`mesh_core::dns::encode_response`].
//! - **TCP** is a tokio task per connection (length-prefixed messages answered in order, closed after
//!   5 s idle), responses up to 64 KiB.
//! - **Recursion.** Names outside our domains (and reverse names we do not know) go to the
//!   configured recursors in order, each with the configured timeout, over UDP (TCP when the
//!   upstream truncates or the client asked over TCP); the first NOERROR or NXDOMAIN answer is passed
//!   through (then cut to the client's size limit); SERVFAIL if none gives one. Without recursors such
//!   names get REFUSED (reverse names NXDOMAIN). Forwarding runs on the async runtime, never on a
//!   UDP thread, at most 256 queries at once (SERVFAIL beyond).
//! - **Errors.** FORMERR for a malformed message whose header is readable, NOTIMP for other
//!   opcodes, BADVERS for EDNS versions above 0, REFUSED for classes other than IN/ANY, SERVFAIL when
//!   the catalog cannot be read (or answering panics). `aa` is always set, `ra` only with
//!   recursors, the request's EDNS is mirrored (payload at least 512).

use arc_swap::{ArcSwap, ArcSwapOption};
use hickory_proto::op::{Edns, Header, Message, MessageType, Metadata, OpCode, Query, ResponseCode};
use hickory_proto::rr::DNSClass;
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder};
use mesh_core::catalog::CatalogState;
use mesh_core::dns::{
    DnsAnswer, DnsConfig, DnsConfigError, DnsIndex, DnsZone, RemoteAsk, RemoteFound, RemoteMiss, SimpleQuery,
    SizeLimit, encode_response,
};
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tracing::{debug, warn};

/// How long an idle TCP connection is kept open.
const TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(5);
/// Most DNS TCP connections served at once; more are closed on accept, so a flood of them cannot
/// take the process's file descriptors (UDP is not affected).
pub const MAX_TCP_CONNECTIONS: usize = 1024;
/// How often an idle UDP thread looks at the stop flag.
const UDP_POLL: Duration = Duration::from_millis(200);
/// EDNS payload size we advertise to upstream servers.
const UPSTREAM_PAYLOAD: u16 = 4096;
/// Queries being forwarded at once at most; beyond, SERVFAIL at once.
const MAX_FORWARDS: usize = 256;

/// Why a query could not be answered normally.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    /// The catalog could not be read.
    #[error("catalog unavailable: {0}")]
    Backend(String),
    /// Bad settings.
    #[error(transparent)]
    Config(#[from] DnsConfigError),
    /// An upstream server failed.
    #[error("recursor {addr}: {reason}")]
    Upstream {
        /// The upstream.
        addr: SocketAddr,
        /// What went wrong.
        reason: String,
    },
}

/// Called after each publish of a catalog; returns false once it wants no more calls.
pub type PublishHook = Box<dyn Fn() -> bool + Send + Sync>;

/// Where DNS reads the catalog from.
pub trait CatalogSource: Send + Sync + 'static {
    /// The catalog to answer from now.
    fn current(&self) -> Result<Arc<CatalogState>, DnsError>;

    /// Calls `hook` after every publish from now on (once the new catalog is what
    /// [`CatalogSource::current`] gives), before the publisher goes on. Returns false if this
    /// source cannot (then DNS looks for a new catalog on each query).
    fn subscribe(&self, hook: PublishHook) -> bool {
        drop(hook);
        false
    }
}

impl CatalogSource for Arc<ArcSwap<CatalogState>> {
    fn current(&self) -> Result<Arc<CatalogState>, DnsError> {
        Ok(self.load_full())
    }
}

/// Who is told of each catalog publish ([`CatalogSource::subscribe`]).
#[derive(Default)]
pub struct PublishHooks {
    hooks: Mutex<Vec<PublishHook>>,
}

impl PublishHooks {
    /// Tells every hook that a new catalog is published (call after storing it).
    pub fn published(&self) {
        let mut hooks = self.hooks.lock().unwrap_or_else(|e| e.into_inner());
        hooks.retain(|hook| hook());
    }
}

/// The control loop's published catalog and its publish hooks.
#[derive(Clone)]
pub struct PublishedCatalog {
    /// The catalog cell.
    pub catalog: Arc<ArcSwap<CatalogState>>,
    /// Run after each store into `catalog`.
    pub hooks: Arc<PublishHooks>,
}

impl CatalogSource for PublishedCatalog {
    fn current(&self) -> Result<Arc<CatalogState>, DnsError> {
        Ok(self.catalog.load_full())
    }

    fn subscribe(&self, hook: PublishHook) -> bool {
        self.hooks.hooks.lock().unwrap_or_else(|e| e.into_inner()).push(hook);
        true
    }
}

/// A catalog and the index built from it.
struct Indexed {
    catalog: Arc<CatalogState>,
    index: DnsIndex,
}

/// One of the `MAX_FORWARDS` slots for a query being forwarded; freed when dropped.
pub struct ForwardSlot(Arc<AtomicUsize>);

impl Drop for ForwardSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// What to do with a request.
pub enum Reply {
    /// Send the bytes written to the output buffer.
    Send,
    /// Forward the request to the recursors ([`CatalogDns::forward`]), holding the slot until done.
    Forward(Box<Message>, ForwardSlot),
    /// Send nothing (not a query, or not even a header).
    Drop,
}

/// Looks up what a node's catalog does not hold ([`RemoteAsk`]: another datacenter's names,
/// prepared queries, failover) by asking the node's servers.
pub trait RemoteLookup: Send + Sync + 'static {
    /// What `ask` names, or why nothing.
    fn lookup(&self, ask: RemoteAsk) -> futures_util::future::BoxFuture<'static, Result<RemoteFound, RemoteMiss>>;
}

/// Where a DNS server finds its [`RemoteLookup`], set once the node's HTTP API is up (until
/// then, and on nodes without one, such names are NXDOMAIN).
pub type RemoteSlot = Arc<std::sync::OnceLock<Arc<dyn RemoteLookup>>>;

/// Answers DNS messages from the catalog a [`CatalogSource`] publishes.
pub struct CatalogDns {
    /// Lookups beyond the catalog.
    remote: RemoteSlot,
    source: Box<dyn CatalogSource>,
    zone: DnsZone,
    cache: ArcSwapOption<Indexed>,
    /// Taken only to build a new index.
    building: Mutex<()>,
    /// The source reports its publishes and the index follows them: queries only read it.
    pushed: AtomicBool,
    /// Queries being forwarded.
    forwards: Arc<AtomicUsize>,
}

fn unix_time() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The EDNS of our response: the request's payload size (at least 512), version 0.
fn response_edns(request: &Message) -> Option<Edns> {
    request.edns.as_ref().map(|req| {
        let mut edns = Edns::new();
        edns.set_max_payload(req.max_payload().max(512));
        edns.set_version(0);
        edns
    })
}

impl CatalogDns {
    /// A handler reading `source`, answering as `config` says.
    pub fn new(source: impl CatalogSource, config: DnsConfig) -> Result<Self, DnsConfigError> {
        Ok(Self {
            remote: RemoteSlot::default(),
            source: Box::new(source),
            zone: DnsZone::new(config)?,
            cache: ArcSwapOption::empty(),
            building: Mutex::new(()),
            pushed: AtomicBool::new(false),
            forwards: Arc::new(AtomicUsize::new(0)),
        })
    }

    /// Runs `f` on the published index. Unless the source reports its publishes, the index is
    /// first brought up to the current catalog if that changed.
    fn with_index<R>(&self, f: impl FnOnce(&DnsIndex) -> R) -> Result<R, DnsError> {
        if self.pushed.load(Ordering::Acquire)
            && let Some(c) = self.cache.load().as_ref()
        {
            return Ok(f(&c.index));
        }
        let catalog = self.source.current()?;
        {
            let cached = self.cache.load();
            if let Some(c) = cached.as_ref()
                && Arc::ptr_eq(&c.catalog, &catalog)
            {
                return Ok(f(&c.index));
            }
        }
        let indexed = self.refresh()?;
        Ok(f(&indexed.index))
    }

    /// Brings the index up to the source's current catalog (an update of the previous index by
    /// what changed), unless it is there already; returns it.
    fn refresh(&self) -> Result<Arc<Indexed>, DnsError> {
        let _building = self.building.lock().unwrap_or_else(|e| e.into_inner());
        // Read under the lock: whoever builds, builds from the newest catalog.
        let catalog = self.source.current()?;
        let previous = self.cache.load_full();
        if let Some(c) = previous
            && Arc::ptr_eq(&c.catalog, &catalog)
        {
            return Ok(c);
        }
        let (index, stats) = match self.cache.load().as_ref() {
            Some(p) => p.index.update(&catalog, &self.zone),
            None => DnsIndex::default().update(&catalog, &self.zone),
        };
        debug!(
            catalog_index = catalog.index,
            services = index.service_count(),
            rebuilt = stats.services_rebuilt,
            "DNS index updated"
        );
        let indexed = Arc::new(Indexed { catalog, index });
        self.cache.store(Some(indexed.clone()));
        Ok(indexed)
    }

    /// The publish hook: the index follows the catalog. A failure keeps the index of the catalog
    /// before (the next publish tries again).
    fn follow(&self) {
        match std::panic::catch_unwind(AssertUnwindSafe(|| self.refresh())) {
            Ok(Ok(_)) => {}
            Ok(Err(error)) => warn!(%error, "DNS index not updated"),
            Err(_) => warn!("DNS index update panicked"),
        }
    }

    /// The answer to one question; SERVFAIL if the catalog cannot be read or answering panics.
    fn answer(&self, query: &Query) -> DnsAnswer {
        let now = unix_time();
        let build = || {
            self.with_index(|index| self.zone.answer(index, query.name(), query.query_type(), now, &mut rand::rng()))
        };
        match std::panic::catch_unwind(AssertUnwindSafe(build)) {
            Ok(Ok(answer)) => answer,
            Ok(Err(error)) => {
                warn!(%error, name = %query.name(), "DNS query failed");
                DnsAnswer::new(ResponseCode::ServFail)
            }
            Err(_) => {
                warn!(name = %query.name(), qtype = %query.query_type(), "DNS answer building panicked");
                DnsAnswer::new(ResponseCode::ServFail)
            }
        }
    }

    /// Encodes `answer` to `request` into `out` (SERVFAIL if that fails).
    fn encode(&self, request: &Message, mut answer: DnsAnswer, authoritative: bool, tcp: bool, out: &mut Vec<u8>) {
        let mut meta = Metadata::response_from_request(&request.metadata);
        meta.authoritative = authoritative;
        meta.recursion_available = self.zone.recursion_available();
        let edns = response_edns(request);
        let payload = request.edns.as_ref().map(Edns::max_payload);
        let limit = SizeLimit::for_request(tcp, payload, self.zone.config().consul_truncation);
        let query = request.queries.first().filter(|_| request.queries.len() == 1);
        if let Err(error) = encode_response(&meta, query, &mut answer, edns.as_ref(), limit, out) {
            warn!(%error, "cannot encode a DNS response");
            let mut failed = DnsAnswer::new(ResponseCode::ServFail);
            let _ = encode_response(&meta, None, &mut failed, None, limit, out);
        }
    }

    /// Answers the request in `bytes` (received over TCP if `tcp`), writing the response into `out`.
    pub fn respond(&self, bytes: &[u8], tcp: bool, out: &mut Vec<u8>) -> Reply {
        // The common case straight from and into wire format; the rest the general way.
        if let Some(q) = SimpleQuery::read(bytes) {
            let limit = SizeLimit::for_request(tcp, q.edns_payload, self.zone.config().consul_truncation);
            let fast = || self.with_index(|index| self.zone.answer_fast(index, &q, limit, &mut rand::rng(), out));
            if let Ok(Ok(true)) = std::panic::catch_unwind(AssertUnwindSafe(fast)) {
                debug!(qtype = %q.qtype(), tcp, bytes = out.len(), "DNS query answered by the fast path");
                return Reply::Send;
            }
        }
        let request = match Message::from_vec(bytes) {
            Ok(m) => m,
            Err(error) => {
                // FORMERR if the header can be read and is a query's.
                let Ok(header) = Header::read(&mut BinDecoder::new(bytes)) else { return Reply::Drop };
                if header.metadata.message_type == MessageType::Response {
                    return Reply::Drop;
                }
                debug!(%error, id = header.metadata.id, "malformed DNS request");
                let mut meta = Metadata::response_from_request(&header.metadata);
                meta.recursion_available = self.zone.recursion_available();
                let limit = SizeLimit::for_request(tcp, None, false);
                let mut answer = DnsAnswer::new(ResponseCode::FormErr);
                let _ = encode_response(&meta, None, &mut answer, None, limit, out);
                return Reply::Send;
            }
        };
        if request.metadata.message_type == MessageType::Response {
            return Reply::Drop;
        }
        let refuse = |code: ResponseCode, out: &mut Vec<u8>| {
            self.encode(&request, DnsAnswer::new(code), true, tcp, out);
            Reply::Send
        };
        if request.edns.as_ref().is_some_and(|e| e.version() > 0) {
            return refuse(ResponseCode::BADVERS, out);
        }
        if request.metadata.op_code != OpCode::Query {
            return refuse(ResponseCode::NotImp, out);
        }
        let [query] = &request.queries[..] else { return refuse(ResponseCode::FormErr, out) };
        if !matches!(query.query_class(), DNSClass::IN | DNSClass::ANY) {
            return refuse(ResponseCode::Refused, out);
        }
        let answer = self.answer(query);
        debug!(
            name = %query.name(), qtype = %query.query_type(), rcode = %answer.response_code,
            answers = answer.answers.len(), tcp, "DNS query"
        );
        let remote = answer.remote.is_some() && self.remote.get().is_some();
        if remote || (answer.recurse && self.zone.recursion_available()) {
            if self.forwards.fetch_add(1, Ordering::SeqCst) < MAX_FORWARDS {
                return Reply::Forward(Box::new(request), ForwardSlot(self.forwards.clone()));
            }
            self.forwards.fetch_sub(1, Ordering::SeqCst);
            warn!(name = %query.name(), "too many queries being forwarded: SERVFAIL");
            self.encode(&request, DnsAnswer::new(ResponseCode::ServFail), true, tcp, out);
            return Reply::Send;
        }
        self.encode(&request, answer, true, tcp, out);
        Reply::Send
    }

    /// Forwards `request` (one question, from [`Reply::Forward`]) to the recursors and writes the
    /// response for the client into `out`.
    pub async fn forward(&self, request: &Message, tcp: bool, out: &mut Vec<u8>) {
        if let Some(query) = request.queries.first()
            && let Some(ask) = self.answer(query).remote
            && let Some(remote) = self.remote.get()
        {
            let found = remote.lookup(ask.clone()).await;
            let answer = self.zone.answer_remote(
                query.name(),
                query.query_type(),
                &ask,
                found.as_ref().map_err(|m| *m),
                unix_time(),
                &mut rand::rng(),
            );
            debug!(name = %query.name(), ?ask, rcode = %answer.response_code, answers = answer.answers.len(), "DNS: looked up beyond the catalog");
            self.encode(request, answer, true, tcp, out);
            return;
        }
        let cfg = self.zone.config();
        let mut answer = DnsAnswer::new(ResponseCode::ServFail);
        let mut authoritative = false;
        if let Some(query) = request.queries.first() {
            for &addr in &cfg.recursors {
                match exchange(addr, query, tcp, cfg.recursor_timeout).await {
                    Ok(m) if matches!(m.metadata.response_code, ResponseCode::NoError | ResponseCode::NXDomain) => {
                        debug!(%addr, name = %query.name(), rcode = %m.metadata.response_code, "forwarded");
                        authoritative = m.metadata.authoritative;
                        answer = DnsAnswer {
                            response_code: m.metadata.response_code,
                            answers: m.answers,
                            authorities: m.authorities,
                            additionals: m.additionals,
                            recurse: false,
                            remote: None,
                        };
                        break;
                    }
                    Ok(m) => debug!(%addr, rcode = %m.metadata.response_code, "recursor answered with an error"),
                    Err(error) => debug!(%error, "recursor failed"),
                }
            }
        }
        if answer.response_code == ResponseCode::ServFail {
            warn!(name = ?request.queries.first().map(|q| q.name().to_string()), "every recursor failed");
        }
        self.encode(request, answer, authoritative, tcp, out);
    }
}

/// Asks `addr` the question `query` (recursion desired), over UDP unless `tcp` or the UDP answer is
/// truncated, within `timeout` in all.
async fn exchange(addr: SocketAddr, query: &Query, tcp: bool, timeout: Duration) -> Result<Message, DnsError> {
    let fail = |reason: String| DnsError::Upstream { addr, reason };
    let mut msg = Message::query();
    msg.metadata.id = rand::random();
    msg.metadata.recursion_desired = true;
    msg.add_query(query.clone());
    let mut edns = Edns::new();
    edns.set_max_payload(UPSTREAM_PAYLOAD);
    msg.set_edns(edns);
    let bytes = msg.to_vec().map_err(|e| fail(e.to_string()))?;
    let matches = |m: &Message| {
        m.metadata.id == msg.metadata.id && m.metadata.message_type == MessageType::Response && m.queries == msg.queries
    };
    let ask = async {
        if !tcp {
            let local: SocketAddr =
                if addr.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { (std::net::Ipv6Addr::UNSPECIFIED, 0).into() };
            let sock = UdpSocket::bind(local).await.map_err(|e| fail(e.to_string()))?;
            sock.connect(addr).await.map_err(|e| fail(e.to_string()))?;
            sock.send(&bytes).await.map_err(|e| fail(e.to_string()))?;
            let mut buf = vec![0u8; 65535];
            loop {
                let n = sock.recv(&mut buf).await.map_err(|e| fail(e.to_string()))?;
                let Ok(resp) = Message::from_vec(&buf[..n]) else { continue };
                if !matches(&resp) {
                    continue;
                }
                if !resp.metadata.truncation {
                    return Ok(resp);
                }
                debug!(%addr, "upstream truncated the answer: asking over TCP");
                break;
            }
        }
        let mut stream = TcpStream::connect(addr).await.map_err(|e| fail(e.to_string()))?;
        let len = u16::try_from(bytes.len()).map_err(|e| fail(e.to_string()))?;
        let mut framed = len.to_be_bytes().to_vec();
        framed.extend_from_slice(&bytes);
        stream.write_all(&framed).await.map_err(|e| fail(e.to_string()))?;
        loop {
            let mut len = [0u8; 2];
            stream.read_exact(&mut len).await.map_err(|e| fail(e.to_string()))?;
            let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
            stream.read_exact(&mut buf).await.map_err(|e| fail(e.to_string()))?;
            let resp = Message::from_vec(&buf).map_err(|e| fail(e.to_string()))?;
            if matches(&resp) {
                return Ok(resp);
            }
        }
    };
    tokio::time::timeout(timeout, ask).await.map_err(|_| fail(format!("no answer within {timeout:?}")))?
}

/// One UDP serving thread: receive, answer, send, until `stop`.
fn udp_loop(socket: Arc<std::net::UdpSocket>, dns: Arc<CatalogDns>, rt: tokio::runtime::Handle, stop: Arc<AtomicBool>) {
    let mut buf = vec![0u8; 65535];
    let mut out = Vec::with_capacity(4096);
    while !stop.load(Ordering::Relaxed) {
        let (n, src) = match socket.recv_from(&mut buf) {
            Ok(r) => r,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut | std::io::ErrorKind::Interrupted
                ) =>
            {
                continue;
            }
            Err(error) => {
                // ICMP errors from earlier sends surface here (ECONNREFUSED): not fatal.
                debug!(%error, "DNS UDP receive");
                continue;
            }
        };
        if src.port() == 0 {
            continue;
        }
        match dns.respond(&buf[..n], false, &mut out) {
            Reply::Send => {
                if let Err(error) = socket.send_to(&out, src) {
                    debug!(%error, %src, "DNS UDP send");
                }
            }
            Reply::Forward(request, slot) => {
                let (dns, socket) = (dns.clone(), socket.clone());
                rt.spawn(async move {
                    let _slot = slot;
                    let mut out = Vec::new();
                    dns.forward(&request, false, &mut out).await;
                    if let Err(error) = socket.send_to(&out, src) {
                        debug!(%error, %src, "DNS UDP send");
                    }
                });
            }
            Reply::Drop => {}
        }
    }
}

/// One TCP connection: length-prefixed requests answered in order until idle or closed.
async fn tcp_connection(mut stream: TcpStream, dns: Arc<CatalogDns>) {
    let mut out = Vec::with_capacity(4096);
    let mut framed = Vec::with_capacity(4098);
    loop {
        let mut len = [0u8; 2];
        match tokio::time::timeout(TCP_IDLE_TIMEOUT, stream.read_exact(&mut len)).await {
            Ok(Ok(_)) => {}
            _ => return,
        }
        let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
        match tokio::time::timeout(TCP_IDLE_TIMEOUT, stream.read_exact(&mut buf)).await {
            Ok(Ok(_)) => {}
            _ => return,
        }
        match dns.respond(&buf, true, &mut out) {
            Reply::Send => {}
            Reply::Forward(request, _slot) => dns.forward(&request, true, &mut out).await,
            Reply::Drop => continue,
        }
        let Ok(n) = u16::try_from(out.len()) else { return };
        framed.clear();
        framed.extend_from_slice(&n.to_be_bytes());
        framed.extend_from_slice(&out);
        // A client that does not read its answers does not keep the connection.
        match tokio::time::timeout(TCP_IDLE_TIMEOUT, stream.write_all(&framed)).await {
            Ok(Ok(())) => {}
            _ => return,
        }
    }
}

async fn tcp_loop(listener: TcpListener, dns: Arc<CatalogDns>, mut stop: tokio::sync::watch::Receiver<bool>) {
    let mut connections = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    while connections.try_join_next().is_some() {}
                    if connections.len() >= MAX_TCP_CONNECTIONS {
                        // Over the limit: closed at once, so the fds stay with the others.
                        debug!(%peer, "DNS TCP connection over the limit closed");
                        continue;
                    }
                    let _ = stream.set_nodelay(true);
                    connections.spawn(tcp_connection(stream, dns.clone()));
                }
                Err(error) => {
                    // e.g. EMFILE: back off instead of spinning; the listener stays.
                    debug!(%error, "DNS TCP accept");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
            _ = stop.changed() => break,
        }
        while connections.try_join_next().is_some() {}
    }
    connections.shutdown().await;
}

/// A running DNS server (UDP and TCP) over the published catalog.
pub struct DnsServer {
    udp_addr: SocketAddr,
    tcp_addr: SocketAddr,
    stop: Arc<AtomicBool>,
    stop_tcp: tokio::sync::watch::Sender<bool>,
    udp_threads: Vec<std::thread::JoinHandle<()>>,
    tcp_task: Option<tokio::task::JoinHandle<()>>,
    remote: RemoteSlot,
}

impl DnsServer {
    /// Serves DNS on the already-bound `udp` socket and `tcp` listener (normally the same port),
    /// answering from whatever catalog `catalog` gives at the time of each query. Must be called
    /// within a tokio runtime (TCP and forwarding run on it).
    pub async fn start(
        udp: UdpSocket,
        tcp: TcpListener,
        catalog: impl CatalogSource,
        config: DnsConfig,
    ) -> std::io::Result<DnsServer> {
        let udp_addr = udp.local_addr()?;
        let tcp_addr = tcp.local_addr()?;
        let dns = Arc::new(
            CatalogDns::new(catalog, config)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string()))?,
        );
        let socket = udp.into_std()?;
        socket.set_nonblocking(false)?;
        socket.set_read_timeout(Some(UDP_POLL))?;
        let socket = Arc::new(socket);
        // The index follows the source's publishes if it reports them: built once here, then
        // updated by each publish.
        let weak = Arc::downgrade(&dns);
        let follows = dns.source.subscribe(Box::new(move || match weak.upgrade() {
            Some(dns) => {
                dns.follow();
                true
            }
            None => false,
        }));
        if follows {
            let built = dns.clone();
            tokio::task::spawn_blocking(move || built.refresh())
                .await
                .map_err(std::io::Error::other)?
                .map_err(std::io::Error::other)?;
            dns.pushed.store(true, Ordering::Release);
        }
        let remote = dns.remote.clone();
        let stop = Arc::new(AtomicBool::new(false));
        let rt = tokio::runtime::Handle::current();
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, 4);
        let mut udp_threads = Vec::with_capacity(threads);
        for i in 0..threads {
            let (socket, dns, rt, stop) = (socket.clone(), dns.clone(), rt.clone(), stop.clone());
            let t = std::thread::Builder::new()
                .name(format!("dns-udp-{i}"))
                .spawn(move || udp_loop(socket, dns, rt, stop))?;
            udp_threads.push(t);
        }
        let (stop_tcp, stop_rx) = tokio::sync::watch::channel(false);
        let tcp_task = Some(tokio::spawn(tcp_loop(tcp, dns, stop_rx)));
        debug!(%udp_addr, %tcp_addr, threads, "DNS server started");
        Ok(DnsServer { udp_addr, tcp_addr, stop, stop_tcp, udp_threads, tcp_task, remote })
    }

    /// From now on, names beyond the catalog (other datacenters, prepared queries, failover) are
    /// looked up with `remote`. Only the first call counts.
    pub fn set_remote(&self, remote: Arc<dyn RemoteLookup>) {
        let _ = self.remote.set(remote);
    }

    /// The UDP address served.
    pub fn udp_addr(&self) -> SocketAddr {
        self.udp_addr
    }

    /// The TCP address served.
    pub fn tcp_addr(&self) -> SocketAddr {
        self.tcp_addr
    }

    /// Stops serving and waits for the listeners to finish.
    pub async fn shutdown(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.stop_tcp.send(true);
        if let Some(t) = self.tcp_task.take() {
            let _ = t.await;
        }
        let threads = std::mem::take(&mut self.udp_threads);
        let joined = tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
        });
        let _ = joined.await;
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.stop_tcp.send(true);
    }
}
