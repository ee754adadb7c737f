//! HTTP requests sent to an agent that a server must answer: writes (every method but GET and
//! HEAD) and the few reads that only the control loop knows (`/v2/queue`, the Mesos master's
//! state). The agent carries them to its server over the internal RPC; the server runs them
//! through its own router as if they had been sent to it, except that Consul's `/v1/agent/*`
//! endpoints act for the agent's node. The agent then waits until its replica has the write,
//! so a client reads what it wrote from the same agent.

use crate::control::Published;
use crate::rpc::msg::{HttpRequest, HttpResponse};
use crate::rpc::{Request, Response};
use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderName, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::IntoResponse;
use http_body_util::BodyExt;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tracing::debug;

/// The longest a forwarded request may take (long-polls are answered locally, not forwarded).
pub const FORWARD_TIMEOUT: Duration = Duration::from_secs(60);
/// The longest an agent waits for its replica to catch up with a forwarded write.
const CATCH_UP: Duration = Duration::from_secs(5);
/// How long a request waits for a server (an agent) or a leader (a server): Consul's
/// `rpc_hold_timeout`.
pub const HOLD: Duration = Duration::from_secs(7);
/// Largest forwarded body, either way.
const MAX_BODY: usize = 64 * 1024 * 1024;
/// Routers kept per node (one per agent that forwards).
const MAX_ROUTERS: usize = 4096;

type MakeRouter = Arc<dyn Fn(&str) -> Router + Send + Sync>;

/// Runs forwarded requests on a server.
#[derive(Clone)]
pub struct Executor {
    make: MakeRouter,
    routers: Arc<Mutex<HashMap<String, Router>>>,
    published: Published,
}

impl Executor {
    /// `make(node)` builds the server's router acting for `node` (its `/v1/agent/*` endpoints).
    pub fn new(make: MakeRouter, published: Published) -> Executor {
        Executor { make, routers: Arc::default(), published }
    }

    fn router(&self, node: &str) -> Router {
        let mut routers = self.routers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(r) = routers.get(node) {
            return r.clone();
        }
        if routers.len() >= MAX_ROUTERS {
            routers.clear();
        }
        let r = (self.make)(node);
        routers.insert(node.to_owned(), r.clone());
        r
    }

    /// Run one forwarded request.
    pub async fn serve(&self, r: HttpRequest) -> HttpResponse {
        let index = || self.published.state.load().index;
        let mut b = axum::http::Request::builder().method(r.method.as_str()).uri(r.uri.as_str());
        for (k, v) in &r.headers {
            b = b.header(k.as_str(), v.as_str());
        }
        let req = match b.body(Body::from(r.body)) {
            Ok(req) => req,
            Err(e) => {
                return HttpResponse {
                    status: 400,
                    headers: vec![("content-type".into(), "text/plain; charset=utf-8".into())],
                    body: format!("bad forwarded request: {e}").into_bytes(),
                    index: index(),
                };
            }
        };
        let resp = match tower::ServiceExt::oneshot(self.router(&r.node), req).await {
            Ok(resp) => resp,
            Err(never) => match never {},
        };
        let status = resp.status().as_u16();
        let headers = resp
            .headers()
            .iter()
            .filter_map(|(k, v)| Some((k.as_str().to_owned(), v.to_str().ok()?.to_owned())))
            .collect();
        let body = match tokio::time::timeout(
            FORWARD_TIMEOUT,
            http_body_util::Limited::new(resp.into_body(), MAX_BODY).collect(),
        )
        .await
        {
            Ok(Ok(b)) => b.to_bytes().to_vec(),
            Ok(Err(e)) => format!("response body: {e}").into_bytes(),
            Err(_) => b"the response did not end in time".to_vec(),
        };
        crash_after_forwarded_write(&r.method, &r.uri, status);
        HttpResponse { status, headers, body, index: index() }
    }
}

/// A fault for tests (`MESH_TEST_CRASH_AFTER_FORWARDED_WRITE=<file>`): while `<file>` exists
/// and holds a path prefix, the first node to serve a forwarded write under that prefix that
/// succeeded removes `<file>` and dies on the spot, after the write is committed and before
/// its answer leaves: the moment a leader's death leaves a client not knowing whether its write
/// happened. SIGKILL, as the tests' other kills (no core file, no cleanup).
fn crash_after_forwarded_write(method: &str, uri: &str, status: u16) {
    static MARKER: std::sync::OnceLock<Option<std::path::PathBuf>> = std::sync::OnceLock::new();
    let marker = MARKER.get_or_init(|| std::env::var_os("MESH_TEST_CRASH_AFTER_FORWARDED_WRITE").map(Into::into));
    let Some(marker) = marker else { return };
    if method == "GET" || method == "HEAD" || !(200..300).contains(&status) {
        return;
    }
    let armed = std::fs::read_to_string(marker).is_ok_and(|prefix| uri.starts_with(prefix.trim()));
    if armed && std::fs::remove_file(marker).is_ok() {
        tracing::warn!(uri, "test fault: dying after a forwarded write, before its answer");
        let _ = rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::KILL);
        std::process::abort();
    }
}

/// What an agent's HTTP layer needs to forward.
#[derive(Clone)]
pub struct Forwarder {
    /// The connection to a server.
    pub link: super::Link,
    /// This node's name (the server acts for it on `/v1/agent/*`).
    pub node: String,
    /// The replica (to wait for a forwarded write to arrive).
    pub published: Published,
    /// Whether the replica hears from a server.
    pub status: Arc<super::replica::ReplicaStatus>,
    /// The agent's own registrations (Consul's anti-entropy).
    pub registrations: Arc<super::antientropy::Registrations>,
}

/// Whether a request goes to a server.
pub fn forwarded(method: &Method, path: &str) -> bool {
    if method == Method::GET || method == Method::HEAD {
        return path.starts_with("/v2/queue")
            || path.starts_with("/v2/leader")
            || path.starts_with("/master/")
            || path.starts_with("/api/v1")
            || path.starts_with("/v1/status/")
            || path == "/v1/catalog/datacenters"
            || path == "/v1/coordinate/datacenters"
            || path.starts_with("/metrics");
    }
    true
}

fn unavailable(path: &str, why: &str) -> axum::response::Response {
    if path.starts_with("/v1/") {
        // Consul's answer when no server can be reached.
        (StatusCode::INTERNAL_SERVER_ERROR, format!("No cluster leader ({why})")).into_response()
    } else if path.starts_with("/v2/") {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(serde_json::json!({ "message": format!("no server reachable: {why}") })),
        )
            .into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, format!("no server reachable: {why}")).into_response()
    }
}

/// Header on an answer that did nothing because the server no longer leads: the sender may
/// send the request again (to the next leader).
const NOT_LEADER_HEADER: &str = "x-mesh-not-leader";

/// How long a sender waits before sending a request again after losing its answer (unless a
/// new leader or connection shows up sooner).
const RETRY_PAUSE: Duration = Duration::from_millis(200);

/// The answer of a server that was sent a request to run as the leader and does not lead.
fn not_leader(path: &str) -> axum::response::Response {
    let mut r = unavailable(path, "this server does not lead");
    r.headers_mut().insert(NOT_LEADER_HEADER, HeaderValue::from_static("1"));
    r
}

/// The agent's HTTP layer: forwards what a server must answer, answers the rest locally from
/// the replica (saying, on Consul endpoints, when it has lost the server).
pub async fn layer(State(f): State<Forwarder>, req: axum::extract::Request, next: Next) -> axum::response::Response {
    let path = req.uri().path().to_owned();
    // Consul's `consistent` reads are the leader's to answer (it confirms it leads first), and
    // a server sends what names another datacenter there.
    let foreign = match dc_target(&req, &f.published.state.load().catalog.datacenter) {
        Some(Err(e)) => return e.into_response(),
        target => target.is_some(),
    };
    if !forwarded(req.method(), &path) && !query_has(&req, "consistent") && !foreign {
        let mut resp = next.run(req).await;
        if !f.status.connected() && resp.headers().contains_key("X-Consul-KnownLeader") {
            let h = resp.headers_mut();
            h.insert("X-Consul-KnownLeader", HeaderValue::from_static("false"));
            if let Ok(v) = HeaderValue::from_str(&f.status.last_contact_ms().to_string()) {
                h.insert("X-Consul-LastContact", v);
            }
        }
        return resp;
    }
    // No server yet (starting, or between servers): wait for one, as long as a server waits
    // for a leader.
    let mut link = f.link.clone();
    let deadline = tokio::time::Instant::now() + HOLD;
    let Some(conn) = open_link(&mut link, deadline).await else {
        return unavailable(&path, "this agent has no connection to a server");
    };
    if path == "/api/v1/scheduler" {
        // A framework given this agent's address keeps it: the agent relays its subscription
        // and calls to the leader, so when a leader dies the framework reconnects here and is
        // relayed to the next one (a 307 would pin it to a leader that may never come back).
        return match conn.peer().hello.http.clone() {
            Some(server) => relay_scheduler(server, req).await,
            None => unavailable(&path, "the server gave no HTTP address"),
        };
    }
    if let Some(r) = mesos_redirect(&conn, &path) {
        return r;
    }

    let observe = |fpath: &str, method: &str, body: &[u8], status: Option<u16>| {
        // A deregistration through the agent ends its claim first, so anti-entropy never races
        // it; a registration is claimed once the server took it.
        let deregister = fpath.contains("/deregister/");
        if (status.is_none() && deregister) || (status == Some(200) && !deregister) {
            f.registrations.observe(method, fpath, body);
        }
    };
    let out = match Outgoing::read(req, false, &f.published).await {
        Ok(out) => out,
        Err(resp) => return resp,
    };
    observe(&out.path, &out.method, &out.body, None);
    let mut conn = conn;
    loop {
        match send(&conn, &f.node, Some(&f.published), &out).await {
            Sent::Answer(status, resp) => {
                observe(&out.path, &out.method, &out.body, Some(status));
                return resp;
            }
            // The answer was lost (the server died or lost its leader): the same request, with
            // the same id, goes again through the next connection, within the hold time.
            Sent::Lost(why) => {
                if !out.retryable() || tokio::time::Instant::now() >= deadline {
                    return unavailable(&path, &why);
                }
                debug!(path = %path, reason = %why, "forward: no answer; sending again");
                let pause = (tokio::time::Instant::now() + RETRY_PAUSE).min(deadline);
                let _ = tokio::time::timeout_at(pause, link.changed()).await;
                match open_link(&mut link, deadline).await {
                    Some(c) => conn = c,
                    None => return unavailable(&path, &why),
                }
            }
        }
    }
}

/// The agent's open connection to a server, waiting for one (a reconnection) until `deadline`.
async fn open_link(link: &mut super::Link, deadline: tokio::time::Instant) -> Option<crate::rpc::Conn> {
    loop {
        if let Some(c) = link.borrow_and_update().clone().filter(|c| !c.is_closed()) {
            return Some(c);
        }
        if !matches!(tokio::time::timeout_at(deadline, link.changed()).await, Ok(Ok(()))) {
            return None;
        }
    }
}

/// How many redirects (follower to leader) a relayed scheduler request follows.
const RELAY_REDIRECTS: usize = 3;

/// Relay a Mesos scheduler API request (a SUBSCRIBE stream or a call) to the leader over HTTP,
/// starting at `server` (`host:port`) and following its 307 to the leader; the response,
/// a subscription's RecordIO stream included, is passed on as it arrives. The stream ends when
/// the leader's does (it died or stepped down): the framework subscribes again here.
async fn relay_scheduler(server: String, req: axum::extract::Request) -> axum::response::Response {
    let path = req.uri().path().to_owned();
    let (parts, body) = req.into_parts();
    let body = match http_body_util::Limited::new(body, MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return (StatusCode::PAYLOAD_TOO_LARGE, format!("request body: {e}")).into_response(),
    };
    let uri = parts.uri.path_and_query().map_or(path.clone(), |p| p.as_str().to_owned());
    let mut target = server;
    for _ in 0..=RELAY_REDIRECTS {
        let stream = match tokio::time::timeout(HOLD, tokio::net::TcpStream::connect(&target)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return unavailable(&path, &format!("{target}: {e}")),
            Err(_) => return unavailable(&path, &format!("{target}: no connection within {HOLD:?}")),
        };
        let _ = stream.set_nodelay(true);
        let (mut sender, connection) = match hyper::client::conn::http1::handshake::<
            _,
            http_body_util::Full<axum::body::Bytes>,
        >(hyper_util::rt::TokioIo::new(stream))
        .await
        {
            Ok(h) => h,
            Err(e) => return unavailable(&path, &format!("{target}: {e}")),
        };
        // Drives the connection until the response (a stream, for SUBSCRIBE) ends.
        tokio::spawn(async move {
            let _ = connection.await;
        });
        let mut b = axum::http::Request::builder().method(parts.method.clone()).uri(uri.as_str());
        for (k, v) in &parts.headers {
            if k != axum::http::header::HOST && k != axum::http::header::CONNECTION {
                b = b.header(k, v);
            }
        }
        let Ok(request) =
            b.header(axum::http::header::HOST, target.as_str()).body(http_body_util::Full::new(body.clone()))
        else {
            return unavailable(&path, "cannot build the relayed request");
        };
        let resp = match sender.send_request(request).await {
            Ok(r) => r,
            Err(e) => return unavailable(&path, &format!("{target}: {e}")),
        };
        if resp.status() == StatusCode::TEMPORARY_REDIRECT
            && let Some(next) = resp
                .headers()
                .get(axum::http::header::LOCATION)
                .and_then(|l| l.to_str().ok())
                .and_then(|l| l.trim_start_matches("http://").trim_start_matches("//").split('/').next())
                .filter(|h| !h.is_empty())
        {
            target = next.to_owned();
            continue;
        }
        let (mut head, incoming) = resp.into_parts();
        head.headers.remove(axum::http::header::CONNECTION);
        head.headers.remove(axum::http::header::TRANSFER_ENCODING);
        return axum::response::Response::from_parts(head, Body::new(incoming));
    }
    unavailable(&path, "too many redirects on the way to the leader")
}

/// Mesos framework streams live on the leader: send the client there, as a Mesos master that is
/// not the leader does (307 with a scheme-relative Location).
fn mesos_redirect(leader: &crate::rpc::Conn, path: &str) -> Option<axum::response::Response> {
    if path != "/api/v1/scheduler" && path != "/master/redirect" && path != "/redirect" {
        return None;
    }
    let http = leader.peer().hello.http.clone()?;
    let target = if path == "/api/v1/scheduler" { path } else { "" };
    let mut resp = StatusCode::TEMPORARY_REDIRECT.into_response();
    if let Ok(v) = HeaderValue::from_str(&format!("//{http}{target}")) {
        resp.headers_mut().insert(axum::http::header::LOCATION, v);
    }
    Some(resp)
}

/// Header on a request a node forwarded: the receiver answers it itself or refuses it, never
/// forwards it again (no request goes round between two nodes that each think the other leads).
pub const FORWARDED_HEADER: &str = "x-mesh-forwarded";

/// A request on its way to another node, its body read so that it can be sent again.
#[derive(Clone)]
struct Outgoing {
    method: String,
    /// Path and query.
    uri: String,
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// What the router put on the request (the matched route's path parameters): kept for
    /// running it here again.
    extensions: axum::http::Extensions,
    /// How long the receiver may hold it as a blocking query (`?index=` with `?wait=`).
    blocking: Duration,
}

impl Outgoing {
    /// Read `req` (its body bounded). A write gets a request id unless the client gave one:
    /// whichever node runs it applies it once, however often it is sent. `mark`: say that a
    /// node forwarded it ([`FORWARDED_HEADER`]).
    async fn read(
        req: axum::extract::Request,
        mark: bool,
        published: &Published,
    ) -> Result<Outgoing, axum::response::Response> {
        let path = req.uri().path().to_owned();
        let blocking = blocking_wait(&req);
        let (parts, body) = req.into_parts();
        let body = match http_body_util::Limited::new(body, MAX_BODY).collect().await {
            Ok(b) => b.to_bytes().to_vec(),
            Err(e) => return Err((StatusCode::PAYLOAD_TOO_LARGE, format!("request body: {e}")).into_response()),
        };
        let mut headers: Vec<(String, String)> = parts
            .headers
            .iter()
            .filter(|(k, _)| *k != axum::http::header::HOST && *k != axum::http::header::CONNECTION)
            .filter_map(|(k, v)| Some((k.as_str().to_owned(), v.to_str().ok()?.to_owned())))
            .collect();
        if mark {
            headers.push((FORWARDED_HEADER.to_owned(), "1".to_owned()));
        }
        let write = parts.method != Method::GET && parts.method != Method::HEAD;
        if write && !parts.headers.contains_key(crate::api::REQUEST_ID_HEADER) {
            headers.push((crate::api::REQUEST_ID_HEADER.to_owned(), published.clock.uuid().to_string()));
        }
        Ok(Outgoing {
            method: parts.method.to_string(),
            uri: parts.uri.path_and_query().map(|p| p.as_str().to_owned()).unwrap_or(path.clone()),
            path,
            headers,
            body,
            extensions: parts.extensions,
            blocking,
        })
    }

    /// Whether sending it again cannot do anything twice: a read, or a write with a request id.
    fn retryable(&self) -> bool {
        self.method == "GET"
            || self.method == "HEAD"
            || self.headers.iter().any(|(k, _)| k.eq_ignore_ascii_case(crate::api::REQUEST_ID_HEADER))
    }

    /// The same request with `?dc=` naming `dc` alone (one datacenter's part of a fan-out).
    fn for_dc(&self, dc: &str) -> Outgoing {
        let (path, query) = self.uri.split_once('?').unwrap_or((self.uri.as_str(), ""));
        let query: Vec<String> =
            query
                .split('&')
                .filter(|kv| !kv.is_empty())
                .map(|kv| {
                    if kv.split('=').next() == Some("dc") {
                        format!("dc={}", crate::api::enc(dc))
                    } else {
                        kv.to_owned()
                    }
                })
                .collect();
        Outgoing { uri: format!("{path}?{}", query.join("&")), ..self.clone() }
    }

    /// The request again, to run here (the leader changed to this node meanwhile).
    fn to_request(&self) -> Result<axum::extract::Request, String> {
        let mut b = axum::http::Request::builder().method(self.method.as_str()).uri(self.uri.as_str());
        for (k, v) in self.headers.iter().filter(|(k, _)| k != FORWARDED_HEADER) {
            b = b.header(k.as_str(), v.as_str());
        }
        let mut req = b.body(Body::from(self.body.clone())).map_err(|e| e.to_string())?;
        *req.extensions_mut() = self.extensions.clone();
        Ok(req)
    }
}

/// What became of a request sent to another node.
enum Sent {
    /// Its answer (and status).
    Answer(u16, axum::response::Response),
    /// No answer (the connection broke, or the node no longer leads): whether it ran is
    /// unknown, unless the node said it does not lead.
    Lost(String),
}

/// Carry `out` to the node at the other end of `conn` (as [`HttpRequest`] over the RPC), then
/// wait (bounded) until `published` holds what it answered from, so a client reads what it
/// wrote from the node it asked.
async fn send(conn: &crate::rpc::Conn, node: &str, published: Option<&Published>, out: &Outgoing) -> Sent {
    let fwd = HttpRequest {
        method: out.method.clone(),
        uri: out.uri.clone(),
        headers: out.headers.clone(),
        body: out.body.clone(),
        node: node.to_owned(),
    };
    // A blocking query (another datacenter's, or a `consistent` one) may be held its `wait`.
    let r = match conn.call(Request::Http(fwd), FORWARD_TIMEOUT + out.blocking).await {
        Ok(Response::Http(r)) => r,
        Ok(other) => return Sent::Answer(503, unavailable(&out.path, &format!("unexpected answer {other:?}"))),
        Err(e @ crate::rpc::RpcError::Timeout(..)) => return Sent::Answer(503, unavailable(&out.path, &e.to_string())),
        Err(e) => return Sent::Lost(e.to_string()),
    };
    if r.headers.iter().any(|(k, _)| k.eq_ignore_ascii_case(NOT_LEADER_HEADER)) {
        return Sent::Lost(format!("{} no longer leads", conn.peer().hello.node));
    }

    // Read-your-writes: wait (bounded) for the replica to hold what the server answered from.
    if let Some(published) = published {
        let mut index = published.index.clone();
        if tokio::time::timeout(CATCH_UP, index.wait_for(|i| *i >= r.index)).await.is_err() {
            debug!(want = r.index, have = *index.borrow(), "forward: the replica did not catch up in time");
        }
    }
    let status = r.status;
    let mut resp = axum::response::Response::new(Body::from(r.body));
    *resp.status_mut() = StatusCode::from_u16(r.status).unwrap_or(StatusCode::BAD_GATEWAY);
    for (k, v) in r.headers {
        if let (Ok(k), Ok(v)) = (HeaderName::try_from(k), HeaderValue::from_str(&v)) {
            if k == axum::http::header::TRANSFER_ENCODING || k == axum::http::header::CONNECTION {
                continue;
            }
            resp.headers_mut().append(k, v);
        }
    }
    Sent::Answer(status, resp)
}

/// Where a server sends what only the leader answers, as [`crate::raft::server`] keeps it.
#[derive(Clone, Default)]
pub enum Route {
    /// No leader is known (an election, or no quorum).
    #[default]
    NoLeader,
    /// This server leads and its control loop runs.
    Local,
    /// Another server leads; the connection to it.
    Remote(crate::rpc::Conn),
}

/// What a server's HTTP layer needs to send requests to the leader.
#[derive(Clone)]
pub struct LeaderRoute {
    /// Where the leader is.
    pub route: tokio::sync::watch::Receiver<Route>,
    /// This server's name.
    pub node: String,
    /// This server's view (fed by its Raft state machine).
    pub published: Published,
    /// How long a request waits for a leader (Consul's `rpc_hold_timeout`).
    pub hold: Duration,
    /// The server's Raft, once started: `?consistent` reads confirm leadership with a quorum.
    pub raft: Arc<std::sync::OnceLock<openraft::Raft<crate::raft::TypeConfig>>>,
    /// When this server last heard from the leader (`X-Consul-LastContact`, `?max_stale=`).
    pub contacts: Arc<crate::raft::Contacts>,
}

/// Whether a server answers `req` only as the leader: what an agent forwards, Consul reads
/// in the default or `consistent` mode, and autopilot's view of the group (only the leader
/// knows the members' last answers). `stale` reads and blocking queries are answered by every
/// server from its own state (Consul's followers answer `stale` ones), as are the node-local
/// `/v1/agent/*` endpoints, unless `?max_stale=` is older than `since_leader` (Consul's
/// `max_stale`: the read goes to the leader). A `max_stale` that is no duration is an error.
fn needs_leader(req: &axum::extract::Request, since_leader: Option<Duration>) -> Result<bool, String> {
    let path = req.uri().path();
    if forwarded(req.method(), path) {
        return Ok(true);
    }
    if req.method() != Method::GET || !path.starts_with("/v1/") || path.starts_with("/v1/agent/") {
        return Ok(false);
    }
    if path == "/v1/operator/autopilot/health" || path == "/v1/operator/autopilot/state" {
        return Ok(true);
    }
    let max_stale = match query_value(req, "max_stale").filter(|v| !v.is_empty()) {
        None => None,
        Some(v) => {
            Some(mesh_core::registrator::parse_go_duration(&v).map_err(|_| format!("Invalid max_stale value {v:?}"))?)
        }
    };
    if let (Some(max), Some(since)) = (max_stale, since_leader)
        && since > max
    {
        return Ok(true);
    }
    let stale = query_has(req, "stale") || max_stale.is_some_and(|d| !d.is_zero());
    Ok(!stale && !query_has(req, "index"))
}

/// The (percent-decoded) value of `key` in the query string, if it is there.
fn query_value(req: &axum::extract::Request, key: &str) -> Option<String> {
    crate::api::consul::Params::parse(req.uri().query()).get(key).cloned()
}

/// Whether the query string names `key` (with or without a value).
fn query_has(req: &axum::extract::Request, key: &str) -> bool {
    req.uri().query().unwrap_or("").split('&').any(|kv| kv.split('=').next() == Some(key))
}

/// A server's HTTP layer: what only the leader answers runs here when this server leads, goes
/// to the leader otherwise, and during an election waits up to the hold time for one (then the
/// API's own "no leader" error).
pub async fn leader_layer(
    State(l): State<LeaderRoute>,
    req: axum::extract::Request,
    next: Next,
) -> axum::response::Response {
    // Consul's X-Consul-LastContact: 0 on the leader, else since this server last heard from it.
    let since_leader = (!matches!(&*l.route.borrow(), Route::Local)).then(|| l.contacts.since_leader());
    let local = match needs_leader(&req, since_leader) {
        Ok(needs) => !needs,
        Err(e) => return (StatusCode::BAD_REQUEST, e).into_response(),
    };
    if local {
        let mut resp = next.run(req).await;
        // A server answering from its own state says whether it knows a leader, and since
        // when it has not heard from it.
        if resp.headers().contains_key("X-Consul-KnownLeader") {
            if matches!(&*l.route.borrow(), Route::NoLeader) {
                resp.headers_mut().insert("X-Consul-KnownLeader", HeaderValue::from_static("false"));
            }
            if let Some(since) = since_leader {
                resp.headers_mut().insert("X-Consul-LastContact", HeaderValue::from(since.as_millis() as u64));
            }
        }
        return resp;
    }
    let path = req.uri().path().to_owned();
    let hop = req.headers().contains_key(FORWARDED_HEADER);
    let mut route = l.route.clone();
    let deadline = tokio::time::Instant::now() + l.hold;
    // The request as it came, until it is read to be sent to the leader (then it can be sent
    // again, or run here if this server becomes the leader meanwhile).
    let mut req = Some(req);
    let mut out: Option<Outgoing> = None;
    let mut lost: Option<String> = None;
    loop {
        let now = route.borrow_and_update().clone();
        match now {
            Route::Local => {
                let req = match (req.take(), &out) {
                    (Some(req), _) => req,
                    (None, Some(out)) => match out.to_request() {
                        Ok(req) => req,
                        Err(e) => return unavailable(&path, &e),
                    },
                    (None, None) => return unavailable(&path, "the request is gone"),
                };
                if req.method() == Method::GET && query_has(&req, "consistent") {
                    // Consul's `consistent` mode: a quorum confirms this server still leads,
                    // and the state holds everything committed before the read.
                    let Some(raft) = l.raft.get() else { return unavailable(&path, "raft not started") };
                    if let Err(e) = raft.ensure_linearizable().await {
                        return unavailable(&path, &e.to_string());
                    }
                }
                return next.run(req).await;
            }
            Route::Remote(conn) if !hop && !conn.is_closed() => {
                if let Some(r) = mesos_redirect(&conn, &path) {
                    return r;
                }
                if let Some(req) = req.take() {
                    out = match Outgoing::read(req, true, &l.published).await {
                        Ok(o) => Some(o),
                        Err(resp) => return resp,
                    };
                }
                let Some(o) = &out else { return unavailable(&path, "the request is gone") };
                match send(&conn, &l.node, Some(&l.published), o).await {
                    Sent::Answer(_, resp) => return resp,
                    // The leader died or stepped down before answering: the same request (the
                    // same id) goes to the next leader, within the hold time.
                    Sent::Lost(why) if o.retryable() => {
                        debug!(path = %path, reason = %why, "forward: no answer from the leader; sending again");
                        lost = Some(why);
                        let pause = (tokio::time::Instant::now() + RETRY_PAUSE).min(deadline);
                        if let Ok(Err(_)) = tokio::time::timeout_at(pause, route.changed()).await {
                            return unavailable(&path, "shutting down");
                        }
                        if tokio::time::Instant::now() >= deadline {
                            return unavailable(&path, lost.as_deref().unwrap_or("no leader in time"));
                        }
                        continue;
                    }
                    Sent::Lost(why) => return unavailable(&path, &why),
                }
            }
            _ => {}
        }
        if hop {
            return not_leader(&path);
        }
        if !matches!(tokio::time::timeout_at(deadline, route.changed()).await, Ok(Ok(()))) {
            return unavailable(&path, lost.as_deref().unwrap_or("none elected in time"));
        }
    }
}

/// What a server needs to send a request for another datacenter (Consul's `?dc=`) to one of
/// its servers.
#[derive(Clone)]
pub struct DcRoute {
    /// This server's datacenter.
    pub datacenter: String,
    /// This server's name (the receiver acts for it on `/v1/agent/*`, never forwarded).
    pub node: String,
    /// The WAN pool: which servers each datacenter has, and which are alive.
    pub wan: crate::gossip::Gossip,
    /// How to reach them.
    pub transport: Arc<dyn crate::rpc::Transport>,
    /// This server's hello on those connections.
    pub hello: crate::rpc::Hello,
    /// This server's view (the ids of forwarded writes come from its clock).
    pub published: Published,
    /// Open connections, by address.
    pub conns: Arc<tokio::sync::Mutex<HashMap<std::net::SocketAddr, crate::rpc::Conn>>>,
}

/// How long a server waits for a server of another datacenter to connect before it tries the
/// next one: a datacenter that cannot be reached is an error within seconds, never a hang.
const DC_CONNECT: Duration = Duration::from_secs(2);
/// How long a server of another datacenter gets to answer a request that does not block (a
/// blocking query gets its `wait` on top) before the next one is tried: a connection cut by a
/// partition (no reset, nothing answers) is given up within seconds, not after the RPC layer's
/// idle timeout.
const DC_CALL: Duration = Duration::from_secs(4);

/// Cross-datacenter requests (`?dc=`) by outcome, for `/v1/agent/metrics`: answered by the
/// other datacenter, refused for an unknown one (`No path to datacenter`, which users saw
/// intermittently in Consul during flaps), and failed with no server of it reachable.
#[derive(Debug, Default)]
pub struct DcMetrics {
    /// Answered by a server of the other datacenter.
    pub forwarded: std::sync::atomic::AtomicU64,
    /// The WAN pool knows no such datacenter.
    pub no_path: std::sync::atomic::AtomicU64,
    /// No server of the datacenter answered in time.
    pub unreachable: std::sync::atomic::AtomicU64,
}

/// This process's [`DcMetrics`] (one node per process).
pub static DC_METRICS: DcMetrics = DcMetrics {
    forwarded: std::sync::atomic::AtomicU64::new(0),
    no_path: std::sync::atomic::AtomicU64::new(0),
    unreachable: std::sync::atomic::AtomicU64::new(0),
};

/// How long a blocking query (`?index=` with `?wait=`, 5 minutes by default and at most 10, as
/// Consul) may take on top of [`DC_CALL`].
fn blocking_wait(req: &axum::extract::Request) -> Duration {
    if query_value(req, "index").is_none() {
        return Duration::ZERO;
    }
    let wait = query_value(req, "wait")
        .and_then(|w| mesh_core::registrator::parse_go_duration(&w).ok())
        .unwrap_or(Duration::from_secs(300))
        .min(Duration::from_secs(600));
    wait + wait / 16
}

/// What a request's `?dc=` asks beyond this datacenter.
#[derive(Debug, PartialEq, Eq)]
pub enum DcTarget {
    /// Another datacenter answers it.
    One(String),
    /// Each of these datacenters runs it (Marathon's `/v2/` endpoints: a mesh extension), this
    /// one perhaps among them.
    Many(Vec<String>),
}

impl DcTarget {
    /// The first datacenter named other than `own`.
    pub fn foreign(&self, own: &str) -> Option<&str> {
        match self {
            DcTarget::One(dc) => Some(dc),
            DcTarget::Many(dcs) => dcs.iter().find(|d| !d.eq_ignore_ascii_case(own)).map(String::as_str),
        }
    }
}

/// The API whose endpoints take `?dc=` that `path` belongs to: Consul's (but its node-local
/// `/v1/agent/*`), Marathon's `/v2/` and the Mesos master's (mesh extensions).
fn dc_api(path: &str) -> Option<crate::api::ApiKind> {
    use crate::api::ApiKind;
    let kind = crate::api::api_of(path);
    match kind {
        ApiKind::Consul if !path.starts_with("/v1/agent/") => Some(kind),
        ApiKind::Mesos => Some(kind),
        ApiKind::Marathon if path.starts_with("/v2/") || path == "/v2" => Some(kind),
        _ => None,
    }
}

/// What `req`'s `?dc=` asks beyond `own`, if anything: `None` when it names no datacenter or
/// only this one. Consul takes one datacenter (a list is an unknown name, as in Consul);
/// Marathon's `/v2/` a comma-separated list. Streams (the Mesos scheduler API's subscription,
/// Marathon's event stream) are not carried across datacenters: a client connects to the
/// other datacenter's servers for those.
pub fn dc_target(req: &axum::extract::Request, own: &str) -> Option<Result<DcTarget, crate::api::ApiError>> {
    use crate::api::{ApiError, ApiKind};
    let path = req.uri().path();
    let api = dc_api(path)?;
    let raw = query_value(req, "dc")?;
    let raw = raw.trim();
    if raw.is_empty() {
        return None;
    }
    if api == ApiKind::Consul {
        return (!raw.eq_ignore_ascii_case(own)).then(|| Ok(DcTarget::One(raw.to_owned())));
    }
    let mut dcs: Vec<String> = Vec::new();
    for dc in raw.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        if !dcs.iter().any(|d| d.eq_ignore_ascii_case(dc)) {
            dcs.push(dc.to_owned());
        }
    }
    if dcs.iter().all(|d| d.eq_ignore_ascii_case(own)) {
        return None;
    }
    if path == "/api/v1/scheduler" || path.starts_with("/v2/events") {
        let message = format!(
            "{path} is a stream and is not carried to another datacenter: connect to a server of {} for it",
            dcs.join(", ")
        );
        return Some(Err(ApiError::DcRefused { api, message }));
    }
    if dcs.len() == 1 {
        return dcs.pop().map(|dc| Ok(DcTarget::One(dc)));
    }
    if api != ApiKind::Marathon {
        let message = "a list of datacenters in ?dc= is taken by Marathon's /v2 endpoints only".to_owned();
        return Some(Err(ApiError::DcRefused { api, message }));
    }
    Some(Ok(DcTarget::Many(dcs)))
}

/// Why no server of another datacenter answered.
enum DcFail {
    /// The WAN pool knows no such datacenter.
    NoPath,
    /// None of its servers answered in time.
    Unreachable,
}

impl DcFail {
    fn error(self, api: crate::api::ApiKind, dc: &str) -> crate::api::ApiError {
        let dc = dc.to_owned();
        match self {
            DcFail::NoPath => crate::api::ApiError::DcUnknown { api, dc },
            DcFail::Unreachable => crate::api::ApiError::DcUnreachable { api, dc },
        }
    }
}

impl DcRoute {
    /// Whether the WAN pool knows datacenter `dc` (this one included).
    fn knows(&self, dc: &str) -> bool {
        dc.eq_ignore_ascii_case(&self.datacenter)
            || self.wan.members().iter().any(|m| m.datacenter == dc && m.status != crate::gossip::MemberStatus::Left)
    }

    /// Send `out` to a server of datacenter `dc` over the WAN (alive ones first, the next when
    /// one fails), each given `call` to answer; its answer comes back unchanged.
    async fn call(&self, dc: &str, out: &Outgoing, call: Duration) -> Result<axum::response::Response, DcFail> {
        let mut servers: Vec<crate::gossip::Member> = self
            .wan
            .members()
            .into_iter()
            .filter(|m| m.datacenter == dc && m.status != crate::gossip::MemberStatus::Left)
            .collect();
        if servers.is_empty() {
            DC_METRICS.no_path.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Err(DcFail::NoPath);
        }
        // Alive first, then suspect, then failed (gossip may lag behind a recovery).
        servers.sort_by_key(|m| match m.status {
            crate::gossip::MemberStatus::Alive => 0,
            crate::gossip::MemberStatus::Suspect => 1,
            _ => 2,
        });
        let mut why = String::new();
        for m in servers {
            let cached = self.conns.lock().await.get(&m.rpc).filter(|c| !c.is_closed()).cloned();
            let conn = match cached {
                Some(c) => c,
                None => {
                    let connect = crate::rpc::Conn::connect(
                        self.transport.as_ref(),
                        m.rpc,
                        self.hello.clone(),
                        Arc::new(crate::rpc::NoHandler),
                    );
                    match tokio::time::timeout(DC_CONNECT, connect).await {
                        Ok(Ok(c)) => {
                            self.conns.lock().await.insert(m.rpc, c.clone());
                            c
                        }
                        Ok(Err(e)) => {
                            why = e.to_string();
                            continue;
                        }
                        Err(_) => {
                            why = format!("{}: no connection within {DC_CONNECT:?}", m.rpc);
                            continue;
                        }
                    }
                }
            };
            // The other datacenter's index says nothing of this one's replica: no catch-up wait.
            match tokio::time::timeout(call, send(&conn, &self.node, None, out)).await {
                Ok(Sent::Answer(_, resp)) => {
                    DC_METRICS.forwarded.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    return Ok(resp);
                }
                Ok(Sent::Lost(e)) => why = e,
                Err(_) => {
                    // Cut off (a partition): this connection is not used again.
                    why = format!("{}: no answer within {call:?}", m.rpc);
                    self.conns.lock().await.remove(&m.rpc);
                }
            }
        }
        DC_METRICS.unreachable.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        debug!(%dc, reason = %why, "?dc=: no server of the datacenter answered");
        Err(DcFail::Unreachable)
    }
}

/// A server's outermost HTTP layer: a request for another datacenter (`?dc=`) is sent to a
/// server of that datacenter over the WAN, which answers it as its own; the answer comes back
/// unchanged. A datacenter the WAN pool does not know is Consul's `500 No path to datacenter`
/// (400 on Marathon's and the Mesos master's endpoints); one whose servers cannot be reached is
/// Consul's `500 Remote DC has no server currently reachable` (503 on the others), within
/// seconds. Marathon requests naming several datacenters run in each, answered as
/// [`merge_fan_out`] says.
pub async fn dc_layer(State(d): State<DcRoute>, req: axum::extract::Request, next: Next) -> axum::response::Response {
    let target = match dc_target(&req, &d.datacenter) {
        None => return next.run(req).await,
        Some(Err(e)) => return e.into_response(),
        Some(Ok(target)) => target,
    };
    let api = crate::api::api_of(req.uri().path());
    let dc = match target {
        DcTarget::One(dc) => dc,
        DcTarget::Many(dcs) => return fan_out(d, dcs, req, next).await,
    };
    let out = match Outgoing::read(req, false, &d.published).await {
        Ok(out) => out,
        Err(resp) => return resp,
    };
    match d.call(&dc, &out, DC_CALL + out.blocking).await {
        Ok(resp) => resp,
        Err(fail) => fail.error(api, &dc).into_response(),
    }
}

/// The header on a fan-out's answer with each datacenter's status: `dc1=201, dc2=503`.
pub const DATACENTERS_HEADER: &str = "x-mesh-datacenters";

/// Run a Marathon request in each of `dcs` at once (this datacenter through `next`, the others
/// over the WAN, each with `?dc=` naming only itself) and answer with [`merge_fan_out`]. Every
/// datacenter named must be known, or nothing runs anywhere (400); one that cannot be reached
/// is reported in the answer while the others go on.
async fn fan_out(d: DcRoute, dcs: Vec<String>, req: axum::extract::Request, next: Next) -> axum::response::Response {
    use crate::api::{ApiError, ApiKind};
    if let Some(dc) = dcs.iter().find(|dc| !d.knows(dc)) {
        DC_METRICS.no_path.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        return ApiError::DcUnknown { api: ApiKind::Marathon, dc: dc.clone() }.into_response();
    }
    let out = match Outgoing::read(req, false, &d.published).await {
        Ok(out) => out,
        Err(resp) => return resp,
    };
    let own = dcs.iter().find(|dc| dc.eq_ignore_ascii_case(&d.datacenter)).map(|dc| out.for_dc(dc));
    let remote =
        futures_util::future::join_all(dcs.iter().filter(|dc| !dc.eq_ignore_ascii_case(&d.datacenter)).map(|dc| {
            let (d, o) = (&d, out.for_dc(dc));
            async move {
                match d.call(dc, &o, DC_CALL).await {
                    Ok(resp) => (dc.clone(), resp),
                    Err(fail) => (dc.clone(), fail.error(ApiKind::Marathon, dc).into_response()),
                }
            }
        }));
    let local = async {
        match own.map(|o| o.to_request()) {
            None => None,
            Some(Ok(req)) => Some(next.run(req).await),
            Some(Err(e)) => Some(unavailable(&out.path, &e)),
        }
    };
    let (local, remote) = tokio::join!(local, remote);
    let mut answers: Vec<(String, axum::response::Response)> = remote;
    if let Some(resp) = local {
        answers.push((d.datacenter.clone(), resp));
    }
    let mut results = Vec::with_capacity(dcs.len());
    for dc in &dcs {
        let Some(i) = answers.iter().position(|(d, _)| d.eq_ignore_ascii_case(dc)) else { continue };
        let (_, resp) = answers.swap_remove(i);
        let status = resp.status().as_u16();
        let body = match http_body_util::Limited::new(resp.into_body(), MAX_BODY).collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => axum::body::Bytes::from(format!("response body: {e}")),
        };
        let value = serde_json::from_slice(&body)
            .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(&body).into_owned()));
        results.push((dc.clone(), status, value));
    }
    let (status, body) = merge_fan_out(&results);
    let summary: Vec<String> = results.iter().map(|(dc, s, _)| format!("{dc}={s}")).collect();
    let mut resp = (StatusCode::from_u16(status).unwrap_or(StatusCode::OK), axum::Json(body)).into_response();
    if let Ok(v) = HeaderValue::from_str(&summary.join(", ")) {
        resp.headers_mut().insert(DATACENTERS_HEADER, v);
    }
    resp
}

/// One answer for a request run in several datacenters, from each one's `(datacenter, status,
/// body)` in the order they were named:
/// - lists (`GET /v2/deployments`, `/v2/tasks`' arrays): the datacenters' lists one after the
///   other, each object given a `"datacenter"` field (the statuses are in
///   [`DATACENTERS_HEADER`]);
/// - objects (an app, a deployment's start, a list of apps): the first datacenter that
///   succeeded answers, with a `"datacenters"` field holding every datacenter's
///   `{"status", "body"}`. When none succeeded the status is the first one's, or 503 when
///   every datacenter was unreachable.
pub fn merge_fan_out(results: &[(String, u16, serde_json::Value)]) -> (u16, serde_json::Value) {
    use serde_json::{Map, Value, json};
    let ok = |s: u16| (200..300).contains(&s);
    let first_ok = results.iter().find(|(_, s, _)| ok(*s));
    if let Some((_, status, Value::Array(_))) = first_ok {
        let mut all = Vec::new();
        for (dc, _, v) in results.iter().filter(|(_, s, _)| ok(*s)) {
            for item in v.as_array().into_iter().flatten() {
                let mut item = item.clone();
                if let Some(o) = item.as_object_mut() {
                    o.insert("datacenter".into(), json!(dc));
                }
                all.push(item);
            }
        }
        return (*status, Value::Array(all));
    }
    let per_dc: Map<String, Value> =
        results.iter().map(|(dc, s, v)| (dc.clone(), json!({"status": s, "body": v}))).collect();
    let (status, mut top) = match first_ok {
        Some((_, s, Value::Object(o))) => (*s, o.clone()),
        Some((_, s, _)) => (*s, Map::new()),
        None => {
            let status = match results.first() {
                _ if results.iter().all(|(_, s, _)| *s == 503) => 503,
                Some((_, s, _)) => *s,
                None => 503,
            };
            let mut m = Map::new();
            m.insert("message".into(), json!("the request failed in every datacenter"));
            (status, m)
        }
    };
    top.insert("datacenters".into(), Value::Object(per_dc));
    (status, Value::Object(top))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(uri: &str) -> axum::extract::Request {
        axum::http::Request::builder().method("GET").uri(uri).body(Body::empty()).unwrap()
    }

    /// What `?dc=` asks: one datacenter for Consul (a list is a name it does not know), a list
    /// for Marathon's `/v2/`, nothing for this datacenter or the node-local endpoints, and a
    /// refusal for streams and for lists where one datacenter is taken.
    #[test]
    fn dc_targets() {
        let t = |uri: &str| dc_target(&get(uri), "dc1").map(|r| r.map_err(|e| e.to_string()));
        assert_eq!(t("/v1/kv/a?dc=dc2"), Some(Ok(DcTarget::One("dc2".into()))));
        assert_eq!(t("/v1/kv/a?dc=DC1"), None);
        assert_eq!(t("/v1/kv/a?dc=dc1,dc2"), Some(Ok(DcTarget::One("dc1,dc2".into()))));
        assert_eq!(t("/v1/agent/self?dc=dc2"), None);
        assert_eq!(t("/v2/apps?dc=dc2"), Some(Ok(DcTarget::One("dc2".into()))));
        assert_eq!(t("/v2/apps?dc=dc1,%20dc2,dc1"), Some(Ok(DcTarget::Many(vec!["dc1".into(), "dc2".into()]))));
        assert_eq!(t("/v2/apps?dc=dc1,dc1"), None);
        assert_eq!(t("/v2/apps?dc="), None);
        assert_eq!(t("/master/state?dc=dc2"), Some(Ok(DcTarget::One("dc2".into()))));
        assert!(matches!(t("/master/state?dc=dc2,dc3"), Some(Err(_))));
        assert!(matches!(t("/api/v1/scheduler?dc=dc2"), Some(Err(_))));
        assert!(matches!(t("/v2/events?dc=dc2"), Some(Err(_))));
        assert_eq!(t("/v2/events?dc=dc1"), None);
        assert_eq!(t("/ping?dc=dc2"), None);
    }

    /// Each datacenter's part of a fan-out names only itself, the rest of the query kept.
    #[test]
    fn a_fan_out_part_names_one_datacenter() {
        let out = Outgoing {
            method: "PUT".into(),
            uri: "/v2/apps/web?force=true&dc=dc1,dc2&x=1".into(),
            path: "/v2/apps/web".into(),
            headers: vec![],
            body: vec![],
            extensions: Default::default(),
            blocking: Duration::ZERO,
        };
        assert_eq!(out.for_dc("dc2").uri, "/v2/apps/web?force=true&dc=dc2&x=1");
    }

    /// Objects: the first that succeeded, with every datacenter's status and body; lists: one
    /// list, each item saying its datacenter; none succeeded: the first status, 503 when every
    /// datacenter was unreachable.
    #[test]
    fn fan_out_answers_merge() {
        use serde_json::json;
        let (s, v) = merge_fan_out(&[
            ("dc1".into(), 201, json!({"id": "/web", "deployments": [{"id": "d1"}]})),
            ("dc2".into(), 503, json!({"message": "unreachable"})),
        ]);
        assert_eq!(s, 201);
        assert_eq!(v["id"], "/web");
        assert_eq!(v["datacenters"]["dc1"]["status"], 201);
        assert_eq!(v["datacenters"]["dc2"], json!({"status": 503, "body": {"message": "unreachable"}}));
        let (s, v) = merge_fan_out(&[
            ("dc1".into(), 503, json!({"message": "unreachable"})),
            ("dc2".into(), 200, json!([{"id": "d2"}])),
        ]);
        assert_eq!((s, v), (200, json!([{"id": "d2", "datacenter": "dc2"}])));
        let (s, v) = merge_fan_out(&[("dc1".into(), 422, json!({})), ("dc2".into(), 503, json!({}))]);
        assert_eq!(s, 422);
        assert_eq!(v["datacenters"]["dc2"]["status"], 503);
        let (s, _) = merge_fan_out(&[("dc1".into(), 503, json!({})), ("dc2".into(), 503, json!({}))]);
        assert_eq!(s, 503);
    }

    /// Which reads a follower answers itself: `stale`, blocking and `max_stale` within this
    /// server's last contact; autopilot's view and `max_stale` older than it go to the leader.
    #[test]
    fn a_follower_answers_stale_reads_within_max_stale() {
        let since = Some(Duration::from_millis(1500));
        let needs = |uri: &str| needs_leader(&get(uri), since);
        assert_eq!(needs("/v1/kv/a"), Ok(true));
        assert_eq!(needs("/v1/kv/a?stale"), Ok(false));
        assert_eq!(needs("/v1/kv/a?index=3"), Ok(false));
        assert_eq!(needs("/v1/kv/a?max_stale=10s"), Ok(false), "max_stale alone allows stale");
        assert_eq!(needs("/v1/kv/a?stale&max_stale=1s"), Ok(true), "older than max_stale");
        assert_eq!(needs("/v1/kv/a?max_stale=1s"), Ok(true));
        assert!(needs("/v1/kv/a?max_stale=soon").is_err());
        assert_eq!(needs("/v1/operator/autopilot/health?stale"), Ok(true));
        assert_eq!(needs("/v1/operator/autopilot/configuration?stale"), Ok(false));
        assert_eq!(needs("/v1/agent/self"), Ok(false));
        // On the leader (no last contact to compare) max_stale never forwards.
        assert_eq!(needs_leader(&get("/v1/kv/a?max_stale=1ms"), None), Ok(false));
    }
}
