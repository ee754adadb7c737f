//! Serving the HTTP listeners: the accept loop and each connection's limits.
//!
//! Every listener of a node shares one [`Http`]: one connection count and one per-client-IP count.
//! Connections are served by hyper's HTTP/1 connection (as `axum::serve` did), with these limits:
//!
//! - **Total connections** (`--http-max-conns`): a connection over it is answered
//!   `503 Service Unavailable` (plain text, `Connection: close`) and closed; it never reaches the
//!   router. The default leaves a quarter of the fd limit to DNS over TCP, task launches and the
//!   state log.
//! - **Per client IP** (`--http-max-conns-per-client`, Consul's `http_max_conns_per_client`, 200 by
//!   default): over it the connection is answered `429 Too Many Requests` and closed, as Consul
//!   does. Refusals are themselves bounded ([`MAX_REFUSING`] at once, each done within
//!   [`REFUSE_WITHIN`]); beyond that a connection is just closed.
//! - **Header timeout** (`--http-header-timeout`): from accept, or from the first byte of a
//!   later request, the request head must be complete within it (slowloris).
//! - **Idle timeout** (`--http-idle-timeout`): a keep-alive connection with no request for this
//!   long is closed.
//! - **Body timeout** (`--http-body-timeout`): a request body must be read completely within it
//!   (counted from the end of the head; a total deadline, so a body dripping one byte at a time
//!   is cut off too). The connection is closed.
//! - **Write timeout** (`--http-write-timeout`): a response that cannot be written for this long
//!   (the client stopped reading and the socket buffer is full) closes the connection. This is
//!   what drops an SSE client (`/v2/events`) that never reads: its stream ends and
//!   `event_stream_detached` is published.
//!
//! A request being handled is never timed out: Consul blocking queries (up to 10 min), the
//! `/v2/events` stream and Mesos `SUBSCRIBE` streams last as long as they write or wait.
//!
//! Accept errors never end the loop: out of file descriptors (EMFILE/ENFILE) or memory, it backs
//! off (up to [`MAX_ACCEPT_BACKOFF`]) and tries again. [`raise_fd_limit`] lifts the soft fd limit
//! to the hard one at start. After a spike of connections, [`Http::spawn_trimmer`] hands freed
//! heap back to the OS (glibc keeps it otherwise).

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::ConnectInfo;
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, Semaphore, watch};
use tokio::time::Instant;
use tower::ServiceExt;
use tracing::{debug, warn};

/// Refusals (429/503 answers) in progress at once; more connections over a limit are just closed.
pub const MAX_REFUSING: usize = 256;
/// Time a refused connection gets to send its request head and receive the refusal.
pub const REFUSE_WITHIN: Duration = Duration::from_secs(2);
/// First back-off after a resource error of `accept` (EMFILE, ENFILE, ENOBUFS, ENOMEM).
pub const MIN_ACCEPT_BACKOFF: Duration = Duration::from_millis(5);
/// Longest back-off after repeated resource errors of `accept`.
pub const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);
/// Consul's answer to a client over `http_max_conns_per_client`.
pub const PER_CLIENT_MESSAGE: &str =
    "Your IP is issuing too many concurrent connections, please rate limit your calls\n";
/// The answer to a connection over the total limit.
pub const TOTAL_MESSAGE: &str = "Too many open connections to this node, try again later\n";

/// Limits of the HTTP listeners (flags `--http-*` of `mesh dev`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpLimits {
    /// Connections open at once over all listeners (0 = no limit).
    pub max_conns: usize,
    /// Connections open at once from one client IP (0 = no limit).
    pub max_conns_per_client: usize,
    /// Time to receive a complete request head.
    pub header_timeout: Duration,
    /// Time a keep-alive connection may wait for its next request.
    pub idle_timeout: Duration,
    /// Time to receive a complete request body.
    pub body_timeout: Duration,
    /// Time a pending response write may stay blocked before the connection is closed.
    pub write_timeout: Duration,
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self {
            max_conns: default_max_conns(20_000),
            max_conns_per_client: 200,
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            body_timeout: Duration::from_secs(30),
            write_timeout: Duration::from_secs(30),
        }
    }
}

/// The default total for a process with `fd_limit` file descriptors: three quarters of them, so
/// DNS over TCP, task launches and the state log keep the rest.
pub fn default_max_conns(fd_limit: u64) -> usize {
    usize::try_from(fd_limit / 4 * 3).unwrap_or(usize::MAX).max(64)
}

/// Raise the soft limit of open files to the hard limit (as Consul and most servers do); returns
/// the limit now in force.
#[allow(unsafe_code)]
pub fn raise_fd_limit() -> std::io::Result<u64> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed by pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit { rlim_cur: lim.rlim_max, rlim_max: lim.rlim_max };
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        lim.rlim_cur = lim.rlim_max;
    }
    Ok(lim.rlim_cur)
}

/// Give freed heap back to the OS (glibc keeps freed arenas mapped otherwise).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn trim_heap() {
    // SAFETY: malloc_trim has no preconditions; it only releases free memory.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim_heap() {}

/// Connection accounting shared by all listeners of a node.
pub struct Http {
    limits: HttpLimits,
    counts: Mutex<Counts>,
    /// Open connections (for shutdown and the trimmer).
    open: watch::Sender<usize>,
    refusing: Arc<Semaphore>,
}

#[derive(Default)]
struct Counts {
    total: usize,
    per_ip: HashMap<IpAddr, usize>,
    /// Most connections open since the heap was last trimmed.
    peak: usize,
}

enum Admission {
    Admitted(Slot),
    OverTotal,
    OverPerClient,
}

/// One admitted connection; gives its place back when dropped.
struct Slot {
    http: Arc<Http>,
    ip: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut c = self.http.counts.lock().unwrap_or_else(|e| e.into_inner());
        c.total -= 1;
        if let Some(n) = c.per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                c.per_ip.remove(&self.ip);
            }
        }
        self.http.open.send_replace(c.total);
    }
}

impl Http {
    /// Accounting for listeners with `limits`.
    pub fn new(limits: HttpLimits) -> Arc<Self> {
        Arc::new(Self {
            limits,
            counts: Mutex::new(Counts::default()),
            open: watch::channel(0).0,
            refusing: Arc::new(Semaphore::new(MAX_REFUSING)),
        })
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        *self.open.borrow()
    }

    fn admit(self: &Arc<Self>, ip: IpAddr) -> Admission {
        let mut c = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if self.limits.max_conns > 0 && c.total >= self.limits.max_conns {
            return Admission::OverTotal;
        }
        let n = c.per_ip.get(&ip).copied().unwrap_or(0);
        if self.limits.max_conns_per_client > 0 && n >= self.limits.max_conns_per_client {
            return Admission::OverPerClient;
        }
        c.per_ip.insert(ip, n + 1);
        c.total += 1;
        c.peak = c.peak.max(c.total);
        self.open.send_replace(c.total);
        Admission::Admitted(Slot { http: self.clone(), ip })
    }

    /// Wait until every connection is closed.
    pub async fn drained(&self) {
        let mut rx = self.open.subscribe();
        let _ = rx.wait_for(|n| *n == 0).await;
    }

    /// Every 5 s: when at least 256 connections closed since the peak, return the freed heap to
    /// the OS, so a spike of connections does not leave the process's RSS at its peak.
    pub fn spawn_trimmer(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let http = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(http) = http.upgrade() else { return };
                let trim = {
                    let mut c = http.counts.lock().unwrap_or_else(|e| e.into_inner());
                    let trim = c.peak >= c.total + 256;
                    if trim {
                        c.peak = c.total;
                    }
                    trim
                };
                if trim {
                    tokio::task::spawn_blocking(trim_heap);
                    debug!("HTTP: connections dropped from a peak; heap trimmed");
                }
            }
        })
    }
}

/// Serve `router` on `listener` until `stop` turns true; then stop accepting, let each
/// connection finish its request (graceful shutdown) and return once all are closed.
pub async fn serve(listener: TcpListener, router: Router, http: Arc<Http>, mut stop: watch::Receiver<bool>) {
    let mut backoff = MIN_ACCEPT_BACKOFF;
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.wait_for(|v| *v) => break,
        };
        let (stream, peer) = match accepted {
            Ok(a) => {
                backoff = MIN_ACCEPT_BACKOFF;
                a
            }
            Err(e) if is_resource_error(&e) => {
                // Out of fds or memory: closing connections frees them; keep the listener.
                warn!(error = %e, retry_in = ?backoff, "HTTP accept: out of resources; backing off");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_ACCEPT_BACKOFF);
                continue;
            }
            Err(e) => {
                // A connection that failed before we took it (ECONNABORTED and the like).
                debug!(error = %e, "HTTP accept");
                continue;
            }
        };
        match http.admit(peer.ip()) {
            Admission::Admitted(slot) => {
                tokio::spawn(connection(stream, peer, slot, router.clone(), http.limits.clone(), stop.clone()));
            }
            Admission::OverTotal => refuse(&http, stream, peer, 503, TOTAL_MESSAGE),
            Admission::OverPerClient => refuse(&http, stream, peer, 429, PER_CLIENT_MESSAGE),
        }
    }
    drop(listener);
    http.drained().await;
}

fn is_resource_error(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM))
}

/// Answer a connection over a limit with `status` and close it, within [`REFUSE_WITHIN`].
fn refuse(http: &Http, stream: TcpStream, peer: SocketAddr, status: u16, message: &'static str) {
    debug!(%peer, status, "HTTP connection over the limit refused");
    let Ok(permit) = http.refusing.clone().try_acquire_owned() else {
        return; // too many refusals at once: just close
    };
    tokio::spawn(async move {
        let _permit = permit;
        let svc = hyper::service::service_fn(move |_req| async move {
            let mut r = hyper::Response::new(http_body_util::Full::new(Bytes::from_static(message.as_bytes())));
            *r.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::SERVICE_UNAVAILABLE);
            let h = r.headers_mut();
            h.insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"));
            h.insert(hyper::header::CONNECTION, hyper::header::HeaderValue::from_static("close"));
            Ok::<_, std::convert::Infallible>(r)
        });
        let conn = http1::Builder::new()
            .keep_alive(false)
            .timer(TokioTimer::new())
            .header_read_timeout(REFUSE_WITHIN)
            .serve_connection(TokioIo::new(stream), svc);
        let _ = tokio::time::timeout(REFUSE_WITHIN, conn).await;
    });
}

/// Where a connection is in its request cycle, for its timeouts.
#[derive(Clone, Copy, Debug)]
enum Phase {
    /// Waiting for the rest of a request head since this instant.
    Head(Instant),
    /// Between requests since this instant.
    Idle(Instant),
    /// A request is being handled (never timed out as such).
    Busy,
}

struct ConnInner {
    phase: Phase,
    /// Since when a write has been waiting for the socket.
    write_blocked: Option<Instant>,
    /// Close now, for this reason.
    kill: Option<&'static str>,
}

/// State shared by a connection's socket wrapper, its service and its watchdog.
struct ConnState {
    inner: Mutex<ConnInner>,
    changed: Notify,
}

impl ConnState {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            inner: Mutex::new(ConnInner { phase: Phase::Head(Instant::now()), write_blocked: None, kill: None }),
            changed: Notify::new(),
        })
    }

    fn with<R>(&self, f: impl FnOnce(&mut ConnInner) -> R) -> R {
        f(&mut self.inner.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn read_some(&self) {
        let started = self.with(|s| {
            let idle = matches!(s.phase, Phase::Idle(_));
            if idle {
                s.phase = Phase::Head(Instant::now());
            }
            idle
        });
        if started {
            self.changed.notify_one();
        }
    }

    fn request_started(&self) {
        self.with(|s| s.phase = Phase::Busy);
    }

    fn request_done(&self) {
        self.with(|s| s.phase = Phase::Idle(Instant::now()));
        self.changed.notify_one();
    }

    fn write_pending(&self) {
        let first = self.with(|s| s.write_blocked.is_none().then(|| s.write_blocked = Some(Instant::now())).is_some());
        if first {
            self.changed.notify_one();
        }
    }

    fn write_done(&self) {
        self.with(|s| s.write_blocked = None);
    }

    fn kill(&self, why: &'static str) {
        self.with(|s| s.kill = Some(why));
        self.changed.notify_one();
    }

    /// The next instant a limit may be exceeded, and which one; `None` = no deadline now.
    fn deadline(&self, l: &HttpLimits) -> Option<(Instant, &'static str)> {
        self.with(|s| {
            if let Some(why) = s.kill {
                return Some((Instant::now(), why));
            }
            let phase = match s.phase {
                Phase::Head(t) => Some((t + l.header_timeout, "request head not received in time")),
                Phase::Idle(t) => Some((t + l.idle_timeout, "idle")),
                Phase::Busy => None,
            };
            let write = s.write_blocked.map(|t| (t + l.write_timeout, "client not reading"));
            match (phase, write) {
                (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
                (a, b) => a.or(b),
            }
        })
    }
}

/// Resolves with the reason once a limit of the connection is exceeded.
async fn watchdog(state: &ConnState, limits: &HttpLimits) -> &'static str {
    loop {
        let changed = state.changed.notified();
        match state.deadline(limits) {
            Some((at, why)) if at <= Instant::now() => return why,
            Some((at, _)) => {
                tokio::select! {
                    _ = tokio::time::sleep_until(at) => {}
                    _ = changed => {}
                }
            }
            None => changed.await,
        }
    }
}

async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    slot: Slot,
    router: Router,
    limits: HttpLimits,
    mut stop: watch::Receiver<bool>,
) {
    let _slot = slot;
    let _ = stream.set_nodelay(true);
    let state = ConnState::new();
    let io = TokioIo::new(Watched { inner: stream, state: state.clone() });
    let svc_state = state.clone();
    let body_timeout = limits.body_timeout;
    let svc = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
        svc_state.request_started();
        let done = RequestDone(svc_state.clone());
        let deadline = Instant::now() + body_timeout;
        let state = svc_state.clone();
        let mut req = req.map(|b| {
            Body::new(DeadlineBody { inner: b, deadline: Box::pin(tokio::time::sleep_until(deadline)), state })
        });
        req.extensions_mut().insert(ConnectInfo(peer));
        let router = router.clone();
        async move {
            let resp = router.oneshot(req).await?;
            Ok::<_, std::convert::Infallible>(resp.map(|b| Body::new(TrackedBody { inner: b, _done: done })))
        }
    });
    // The header timeout is ours (the watchdog): hyper's would also count the idle time between
    // requests, so idle and header timeouts could not differ.
    let conn = http1::Builder::new().keep_alive(true).header_read_timeout(None).serve_connection(io, svc);
    let mut conn = std::pin::pin!(conn);
    let mut stopping = false;
    loop {
        tokio::select! {
            res = conn.as_mut() => {
                if let Err(e) = res {
                    debug!(%peer, error = %e, "HTTP connection ended");
                }
                return;
            }
            why = watchdog(&state, &limits) => {
                debug!(%peer, why, "HTTP connection closed");
                return;
            }
            _ = stop.wait_for(|v| *v), if !stopping => {
                stopping = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}

/// Marks the request finished when the response body is done (or dropped).
struct RequestDone(Arc<ConnState>);

impl Drop for RequestDone {
    fn drop(&mut self) {
        self.0.request_done();
    }
}

/// A response body that marks its request finished once written.
struct TrackedBody {
    inner: Body,
    _done: RequestDone,
}

impl http_body::Body for TrackedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A request body with a total deadline; past it, the read fails and the connection is closed.
///
/// tower-http's `RequestBodyTimeout` restarts its timer with every frame, so a body dripping a
/// byte at a time would never time out; this one counts from the end of the request head.
struct DeadlineBody {
    inner: Incoming,
    deadline: Pin<Box<tokio::time::Sleep>>,
    state: Arc<ConnState>,
}

/// The error of a request body not received within the body timeout.
#[derive(Debug, thiserror::Error)]
#[error("request body not received within the body timeout")]
pub struct BodyTimeout;

impl http_body::Body for DeadlineBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(f) => Poll::Ready(f.map(|r| r.map_err(Into::into))),
            Poll::Pending => {
                if self.deadline.as_mut().poll(cx).is_ready() {
                    self.state.kill("request body not received in time");
                    return Poll::Ready(Some(Err(Box::new(BodyTimeout))));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The socket, reporting reads and blocked writes to the connection's state.
struct Watched {
    inner: TcpStream,
    state: Arc<ConnState>,
}

impl Watched {
    fn wrote<T>(&self, r: Poll<std::io::Result<T>>) -> Poll<std::io::Result<T>> {
        match &r {
            Poll::Pending => self.state.write_pending(),
            Poll::Ready(_) => self.state.write_done(),
        }
        r
    }
}

impl AsyncRead for Watched {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.state.read_some();
        }
        r
    }
}

impl AsyncWrite for Watched {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.wrote(r)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.wrote(r)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_flush(cx);
        self.wrote(r)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
