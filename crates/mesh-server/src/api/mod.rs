//! One HTTP listener serves every API: Marathon `/v2` (and `/ping`), Consul `/v1`, and the Mesos
//! master (`/api/v1/scheduler`, `/master/*`).
//!
//! Errors of every API are values of [`ApiError`], turned into HTTP in exactly one place (its
//! `IntoResponse`), in the API's own format: Marathon's JSON bodies, Consul's plain text.

use crate::control::{ControlError, ControlHandle};
use axum::Router;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use mesh_core::app::Invalid;
use mesh_core::state::ApplyError;
use serde_json::json;

pub mod consul;
pub mod consul_coordinate;
pub mod consul_event;
pub mod consul_filter;
pub mod consul_kv;
pub mod consul_operator;
pub mod consul_query;
pub mod consul_txn;
pub mod events;
pub mod groups;
pub mod marathon;
pub mod mesos;

/// Shared state of the HTTP handlers.
#[derive(Clone)]
pub struct Api {
    /// The control side.
    pub control: ControlHandle,
    /// Node settings shown by the APIs.
    pub info: NodeInfo,
    /// Cluster membership (join, leave, force-leave) for Consul's `/v1/agent/join|leave|
    /// force-leave`; `None` in `mesh dev`, a single node with no cluster to join.
    pub cluster: Option<std::sync::Arc<dyn ClusterOps>>,
    /// Consul user events this node received (`/v1/event`).
    pub user_events: std::sync::Arc<consul_event::UserEvents>,
    /// Consul network coordinates set through `/v1/coordinate/update`.
    pub coordinates: std::sync::Arc<consul_coordinate::Coordinates>,
    /// A server's Raft group (leader, peers, configuration); `None` in `mesh dev` and on agents.
    pub raft: Option<RaftView>,
    /// This node's own API with every layer (forwarding to servers and other datacenters), set
    /// once it is built: what a handler calls to ask another datacenter as a client would
    /// (prepared queries' failover).
    pub loopback: Loopback,
}

/// See [`Api::loopback`].
pub type Loopback = std::sync::Arc<std::sync::OnceLock<axum::Router>>;

/// `GET uri` through `router` in process (a node's own API, its forwarding layers included):
/// the status and the body (64 MiB at most); `None` if the body cannot be read.
pub async fn get_in_process(router: &axum::Router, uri: &str) -> Option<(StatusCode, axum::body::Bytes)> {
    use tower::ServiceExt;
    let req = axum::http::Request::get(uri).body(axum::body::Body::empty()).ok()?;
    let Ok(resp) = router.clone().oneshot(req).await;
    let status = resp.status();
    let body = axum::body::to_bytes(resp.into_body(), 64 << 20).await.ok()?;
    Some((status, body))
}

/// Percent-encodes a path segment or query value.
pub fn enc(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// What the APIs show of a server's Raft group.
#[derive(Clone, Default)]
pub struct RaftView {
    /// The Raft node, once started (the HTTP listeners start first).
    pub raft: std::sync::Arc<std::sync::OnceLock<openraft::Raft<crate::raft::TypeConfig>>>,
    /// Where the leader is.
    pub route: Option<tokio::sync::watch::Receiver<crate::cluster::forward::Route>>,
    /// When the leader and the members were last heard from (autopilot, `LastContact`).
    pub contacts: std::sync::Arc<crate::raft::Contacts>,
}

/// One member of the Raft group as the APIs show it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RaftPeer {
    /// Raft id.
    pub id: u64,
    /// Node name.
    pub name: String,
    /// RPC address.
    pub rpc: String,
    /// Whether it leads.
    pub leader: bool,
    /// Whether it votes (else a learner).
    pub voter: bool,
}

impl RaftView {
    /// The members, voters first; `None` before Raft started.
    pub fn peers(&self) -> Option<(Vec<RaftPeer>, u64)> {
        let raft = self.raft.get()?;
        let m = raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        let voters: std::collections::BTreeSet<u64> = membership.voter_ids().collect();
        let mut peers: Vec<RaftPeer> = membership
            .nodes()
            .map(|(id, n)| RaftPeer {
                id: *id,
                name: n.name.clone(),
                rpc: n.rpc.clone(),
                leader: m.current_leader == Some(*id),
                voter: voters.contains(id),
            })
            .collect();
        peers.sort_by_key(|p| (!p.voter, p.name.clone()));
        let index = m.membership_config.log_id().map(|l| l.index).unwrap_or(0);
        Some((peers, index))
    }

    /// The leader's RPC address, if one is known.
    pub fn leader_rpc(&self) -> Option<String> {
        let (peers, _) = self.peers()?;
        peers.into_iter().find(|p| p.leader).map(|p| p.rpc)
    }

    /// The leader's HTTP address: `own` when this server leads, the leader's as it said when
    /// this server connected to it otherwise.
    pub fn leader_http(&self, own: &str) -> Option<String> {
        match &*self.route.as_ref()?.borrow() {
            crate::cluster::forward::Route::Local => Some(own.to_owned()),
            crate::cluster::forward::Route::Remote(c) => c.peer().hello.http.clone(),
            crate::cluster::forward::Route::NoLeader => None,
        }
    }
}

impl Api {
    /// The APIs of a node over `control`, with fresh in-memory Consul extras (events,
    /// coordinates) and no cluster membership.
    pub fn new(control: ControlHandle, info: NodeInfo) -> Api {
        Api {
            control,
            info,
            cluster: None,
            user_events: Default::default(),
            coordinates: Default::default(),
            raft: None,
            loopback: Default::default(),
        }
    }

    /// The same APIs acting for another node (its `/v1/agent/*` endpoints): requests an agent
    /// forwarded to a server.
    pub fn for_node(&self, node: &str) -> Api {
        Api { info: NodeInfo { node: node.to_owned(), ..self.info.clone() }, ..self.clone() }
    }
}

/// A failed cluster membership operation.
#[derive(Debug, thiserror::Error)]
pub enum ClusterOpError {
    /// No member has that name (force-leave).
    #[error("No node found with name '{0}'")]
    UnknownNode(String),
    /// The operation failed (e.g. nothing answered at the join address).
    #[error("{0}")]
    Failed(String),
}

/// Cluster membership as the Consul agent endpoints need it; implemented by the membership
/// layer of a clustered node.
#[async_trait::async_trait]
pub trait ClusterOps: Send + Sync {
    /// Join the cluster through the member at `addr` (`host:port`).
    async fn join(&self, addr: &str) -> Result<(), ClusterOpError>;
    /// Leave the cluster gracefully.
    async fn leave(&self) -> Result<(), ClusterOpError>;
    /// Mark the failed member `node` as left (`prune`: forget it at once).
    async fn force_leave(&self, node: &str, prune: bool) -> Result<(), ClusterOpError>;
    /// The members of the LAN pool as this node sees them.
    fn members(&self) -> Vec<crate::gossip::Member>;
    /// The members of the WAN pool (the servers of every datacenter) as this server sees them;
    /// `None` on a node that is not in it (an agent).
    fn wan_members(&self) -> Option<Vec<crate::gossip::Member>> {
        None
    }
}

/// Facts about the node that the APIs report.
#[derive(Clone, Debug)]
pub struct NodeInfo {
    /// Node name.
    pub node: String,
    /// Datacenter.
    pub datacenter: String,
    /// The address (host:port) of the first HTTP listener.
    pub http_addr: String,
    /// DNS domain.
    pub domain: String,
    /// Start time.
    pub started_at: u64,
    /// What containers may reach of the host (privileged mode, host paths, capabilities).
    pub host_access: mesh_core::runtime::HostAccess,
    /// Whether Consul script checks may be registered.
    pub enable_script_checks: bool,
}

/// An API error, in the format of the API it came from.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Marathon 400: the body is not JSON, or a field has the wrong JSON type.
    #[error("Invalid JSON")]
    MarathonBadJson {
        /// JSON path of the problem.
        path: String,
        /// What was expected.
        error: String,
    },
    /// Marathon 400 with a message.
    #[error("{0}")]
    MarathonBadRequest(String),
    /// Marathon 422: the definition is not valid.
    #[error("Object is not valid")]
    MarathonInvalid(Invalid),
    /// Marathon 404.
    #[error("{0}")]
    MarathonNotFound(String),
    /// Marathon 409 (duplicate).
    #[error("{0}")]
    MarathonConflict(String),
    /// Marathon 409 (locked by a deployment).
    #[error("locked by {0}")]
    MarathonLocked(String),
    /// Marathon 413: a request body over the limit.
    #[error("{0}")]
    MarathonTooLarge(String),
    /// Marathon 415: a request body that is not declared as JSON.
    #[error("Unsupported Media Type")]
    MarathonUnsupportedMediaType,
    /// Consul 400.
    #[error("{0}")]
    ConsulBadRequest(String),
    /// Consul 404.
    #[error("{0}")]
    ConsulNotFound(String),
    /// Consul: another status with a plain-text message.
    #[error("{1}")]
    ConsulStatus(u16, String),
    /// Consul 500 for an unknown datacenter.
    #[error("No path to datacenter")]
    ConsulNoPathToDc,
    /// Consul 413: a request body over the limit (KV values).
    #[error("{0}")]
    ConsulTooLarge(String),
    /// `?dc=` names a datacenter the WAN pool does not know: Consul's 500 `No path to
    /// datacenter`; 400 on Marathon's and the Mesos master's endpoints (a mesh extension).
    #[error("No path to datacenter {dc:?}")]
    DcUnknown {
        /// Whose format the answer takes.
        api: ApiKind,
        /// The datacenter asked for.
        dc: String,
    },
    /// `?dc=` names a known datacenter none of whose servers answered in time: Consul's 500
    /// `Remote DC has no server currently reachable`; 503 on Marathon's and the Mesos master's.
    #[error("Remote DC has no server currently reachable")]
    DcUnreachable {
        /// Whose format the answer takes.
        api: ApiKind,
        /// The datacenter asked for.
        dc: String,
    },
    /// 400: a request `?dc=` cannot carry to another datacenter (a stream), or a list of
    /// datacenters where one is taken.
    #[error("{message}")]
    DcRefused {
        /// Whose format the answer takes.
        api: ApiKind,
        /// Why.
        message: String,
    },
    /// 503: the control side is not running or could not write its log.
    #[error("{0}")]
    Unavailable(String),
    /// Mesos 400 (plain text, as every Mesos error).
    #[error("{0}")]
    MesosBadRequest(String),
    /// Mesos 403 (e.g. a call of a framework that is not subscribed).
    #[error("{0}")]
    MesosForbidden(String),
    /// Mesos 405.
    #[error("{0}")]
    MesosMethodNotAllowed(String),
    /// Mesos 406.
    #[error("{0}")]
    MesosNotAcceptable(String),
    /// Mesos 415.
    #[error("{0}")]
    MesosUnsupportedMediaType(String),
    /// Mesos 413: a request body over the limit.
    #[error("{0}")]
    MesosTooLarge(String),
    /// Mesos 501.
    #[error("{0}")]
    MesosNotImplemented(String),
    /// Mesos 503.
    #[error("{0}")]
    MesosUnavailable(String),
}

impl ApiError {
    /// Map a control-side error for the Marathon API.
    pub fn from_control(e: ControlError) -> Self {
        match e {
            ControlError::Rejected(ApplyError::Locked(d)) => ApiError::MarathonLocked(d),
            ControlError::Rejected(e @ (ApplyError::AppExists(_) | ApplyError::GroupExists(_))) => {
                ApiError::MarathonConflict(e.to_string())
            }
            ControlError::Rejected(
                e @ (ApplyError::UnknownApp(_)
                | ApplyError::UnknownGroup(_)
                | ApplyError::UnknownDeployment(_)
                | ApplyError::UnknownTask(_)
                | ApplyError::UnknownVersion(..)),
            ) => ApiError::MarathonNotFound(e.to_string()),
            ControlError::Rejected(e) => ApiError::MarathonBadRequest(e.to_string()),
            e @ (ControlError::Log(_) | ControlError::Stopped) => ApiError::Unavailable(e.to_string()),
        }
    }
}

impl ApiError {
    /// Map a control-side error for the Consul API (plain-text bodies, Consul's statuses).
    pub fn from_consul(e: ControlError) -> Self {
        use mesh_core::kv::KvError;
        match e {
            ControlError::Rejected(ApplyError::Kv(e @ KvError::UnknownSession(_))) => {
                ApiError::ConsulNotFound(e.to_string())
            }
            ControlError::Rejected(ApplyError::Kv(
                e @ (KvError::InvalidBehavior(_) | KvError::InvalidTtl(_) | KvError::InvalidLockDelay(_)),
            )) => ApiError::ConsulBadRequest(e.to_string()),
            // Consul's answer when no leader could take the write.
            ControlError::Log(m) if m.contains("No cluster leader") => {
                ApiError::ConsulStatus(500, "No cluster leader".into())
            }
            e @ (ControlError::Log(_) | ControlError::Stopped) => ApiError::ConsulStatus(503, e.to_string()),
            // e.g. `invalid session "x"`, `Missing node registration`: Consul's 500s
            e => ApiError::ConsulStatus(500, e.to_string()),
        }
    }
}

/// Marks a response as an [`ApiError`] answer (see [`body_limit_errors`]).
#[derive(Clone, Copy)]
struct ApiErrorAnswer;

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = self.answer();
        r.extensions_mut().insert(ApiErrorAnswer);
        r
    }
}

/// The rest of the body is not read: tell the client not to reuse the connection.
fn closing(mut r: Response) -> Response {
    r.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
    r
}

impl ApiError {
    fn answer(self) -> Response {
        let json_resp = |status: StatusCode, body: serde_json::Value| (status, axum::Json(body)).into_response();
        match self {
            ApiError::MarathonBadJson { path, error } => json_resp(
                StatusCode::BAD_REQUEST,
                json!({"message": "Invalid JSON", "details": [{"path": path, "errors": [error]}]}),
            ),
            ApiError::MarathonBadRequest(m) => json_resp(StatusCode::BAD_REQUEST, json!({"message": m})),
            ApiError::MarathonInvalid(inv) => {
                json_resp(StatusCode::UNPROCESSABLE_ENTITY, json!({"message": "Object is not valid", "details": inv.0}))
            }
            ApiError::MarathonNotFound(m) => json_resp(StatusCode::NOT_FOUND, json!({"message": m})),
            ApiError::MarathonConflict(m) => json_resp(StatusCode::CONFLICT, json!({"message": m})),
            ApiError::MarathonLocked(d) => json_resp(
                StatusCode::CONFLICT,
                json!({
                    "message": format!("App is locked by one or more deployments. Override with the option '?force=true'. View details at '/v2/deployments/{d}'."),
                    "deployments": [{"id": d}],
                }),
            ),
            ApiError::ConsulBadRequest(m) => text(StatusCode::BAD_REQUEST, m),
            ApiError::ConsulNotFound(m) => text(StatusCode::NOT_FOUND, m),
            ApiError::ConsulStatus(code, m) => {
                text(StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR), m)
            }
            ApiError::ConsulNoPathToDc | ApiError::DcUnknown { api: ApiKind::Consul, .. } => {
                text(StatusCode::INTERNAL_SERVER_ERROR, "No path to datacenter".into())
            }
            ApiError::DcUnreachable { api: ApiKind::Consul, .. } => {
                text(StatusCode::INTERNAL_SERVER_ERROR, "Remote DC has no server currently reachable".into())
            }
            ApiError::DcUnknown { api, dc } => {
                let m = format!("No path to datacenter {dc:?}: the WAN pool knows no such datacenter");
                in_format(api, StatusCode::BAD_REQUEST, m)
            }
            ApiError::DcUnreachable { api, dc } => {
                let m = format!("Remote DC has no server currently reachable: {dc}");
                in_format(api, StatusCode::SERVICE_UNAVAILABLE, m)
            }
            ApiError::DcRefused { api, message } => in_format(api, StatusCode::BAD_REQUEST, message),
            ApiError::MarathonTooLarge(m) => closing(json_resp(StatusCode::PAYLOAD_TOO_LARGE, json!({"message": m}))),
            ApiError::MarathonUnsupportedMediaType => {
                closing(json_resp(StatusCode::UNSUPPORTED_MEDIA_TYPE, json!({"message": "Unsupported Media Type"})))
            }
            ApiError::ConsulTooLarge(m) => closing(text(StatusCode::PAYLOAD_TOO_LARGE, m)),
            ApiError::MesosTooLarge(m) => closing(text(StatusCode::PAYLOAD_TOO_LARGE, m)),
            ApiError::Unavailable(m) => json_resp(StatusCode::SERVICE_UNAVAILABLE, json!({"message": m})),
            ApiError::MesosBadRequest(m) => text(StatusCode::BAD_REQUEST, m),
            ApiError::MesosForbidden(m) => text(StatusCode::FORBIDDEN, m),
            ApiError::MesosMethodNotAllowed(m) => {
                let mut r = text(StatusCode::METHOD_NOT_ALLOWED, m);
                r.headers_mut().insert(header::ALLOW, HeaderValue::from_static("POST"));
                r
            }
            ApiError::MesosNotAcceptable(m) => text(StatusCode::NOT_ACCEPTABLE, m),
            ApiError::MesosUnsupportedMediaType(m) => text(StatusCode::UNSUPPORTED_MEDIA_TYPE, m),
            ApiError::MesosNotImplemented(m) => text(StatusCode::NOT_IMPLEMENTED, m),
            ApiError::MesosUnavailable(m) => text(StatusCode::SERVICE_UNAVAILABLE, m),
        }
    }
}

/// `message` with `status` in `api`'s error format: Marathon's JSON `{"message": ...}`, plain
/// text for Consul and Mesos.
fn in_format(api: ApiKind, status: StatusCode, message: String) -> Response {
    match api {
        ApiKind::Marathon => (status, axum::Json(json!({ "message": message }))).into_response(),
        ApiKind::Consul | ApiKind::Mesos => text(status, message),
    }
}

fn text(status: StatusCode, body: String) -> Response {
    let mut r = (status, body).into_response();
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    r
}

/// Parse a boolean query flag the way clients send it: `true`, `True`, `1`, or present and empty.
pub fn flag(v: Option<&String>, default: bool) -> bool {
    match v.map(|s| s.trim().to_ascii_lowercase()) {
        None => default,
        Some(s) => matches!(s.as_str(), "" | "true" | "1" | "yes"),
    }
}

/// `pong`, or 503 with the reason while the state store cannot be written.
async fn ping(axum::extract::State(api): axum::extract::State<Api>) -> Response {
    match api.control.store_failure() {
        None => ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], "pong").into_response(),
        Some(cause) => text(StatusCode::SERVICE_UNAVAILABLE, format!("state store cannot be written: {cause}")),
    }
}

async fn not_found() -> Response {
    // Marathon answers unknown routes with this body (and, oddly, 500; 404 is what clients expect).
    (StatusCode::NOT_FOUND, axum::Json(json!({"message": "URI not found"}))).into_response()
}

/// The largest request body any API reads (Consul KV values have their own, smaller limit).
pub const MAX_BODY_BYTES: usize = 2 * 1024 * 1024;

/// A body over [`MAX_BODY_BYTES`] is refused by the extractors with axum's plain-text 413;
/// answer it in the format of the API the request was for instead.
async fn body_limit_errors(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let path = req.uri().path().to_owned();
    let r = next.run(req).await;
    if r.status() != StatusCode::PAYLOAD_TOO_LARGE || r.extensions().get::<ApiErrorAnswer>().is_some() {
        return r;
    }
    let m = format!("Request body too large, max size: {MAX_BODY_BYTES} bytes.");
    let e = match api_of(&path) {
        ApiKind::Consul => ApiError::ConsulTooLarge(m),
        ApiKind::Mesos => ApiError::MesosTooLarge(m),
        ApiKind::Marathon => ApiError::MarathonTooLarge(m),
    };
    e.into_response()
}

/// Which API a path belongs to (whose error format its answers use).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ApiKind {
    /// Consul's `/v1/`.
    Consul,
    /// The Mesos master's `/master/`, `/api/v1`, `/weights`, `/quota`.
    Mesos,
    /// Marathon's `/v2/` (and everything else).
    Marathon,
}

pub fn api_of(path: &str) -> ApiKind {
    if path.starts_with("/v1/") {
        ApiKind::Consul
    } else if ["/master/", "/api/v1", "/weights", "/quota"].iter().any(|p| path.starts_with(p)) {
        ApiKind::Mesos
    } else {
        ApiKind::Marathon
    }
}

/// The header that names a client request: a write sent again with the same id (a retry after
/// its answer was lost) is applied once and answered as the first one was. Forwarding nodes
/// give every write they forward one, so their own retries after a leader change are safe.
pub const REQUEST_ID_HEADER: &str = "x-mesh-request-id";

/// The longest `X-Mesh-Request-Id` (the state's limit less room for the `#<k>` of the k-th
/// command a request proposes).
pub const MAX_CLIENT_REQUEST_ID: usize = mesh_core::state::MAX_REQUEST_ID - 16;

/// Runs the handler on behalf of the request's `X-Mesh-Request-Id` ([`crate::control::with_request`]);
/// a malformed id is refused (400, in the API's own format) before anything is done.
async fn request_scope(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let Some(v) = req.headers().get(REQUEST_ID_HEADER) else { return next.run(req).await };
    let id = v
        .to_str()
        .ok()
        .filter(|id| id.len() <= MAX_CLIENT_REQUEST_ID && mesh_core::state::valid_request_id(id))
        .map(str::to_owned);
    let Some(id) = id else {
        let m =
            format!("Invalid X-Mesh-Request-Id: 1 to {MAX_CLIENT_REQUEST_ID} characters of letters, digits and -._:#");
        let e = match api_of(req.uri().path()) {
            ApiKind::Consul => ApiError::ConsulBadRequest(m),
            ApiKind::Mesos => ApiError::MesosBadRequest(m),
            ApiKind::Marathon => ApiError::MarathonBadRequest(m),
        };
        return e.into_response();
    };
    crate::control::with_request(id, next.run(req)).await
}

/// A request whose `?dc=` names another datacenter that reached this node's handlers (a
/// `mesh dev`, which has no WAN pool; a server sends such requests on before they get here):
/// refused in the API's own format, never run as if it were for this datacenter.
async fn dc_guard(
    axum::extract::State(api): axum::extract::State<Api>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    match crate::cluster::forward::dc_target(&req, &api.info.datacenter) {
        None => next.run(req).await,
        Some(Err(e)) => e.into_response(),
        Some(Ok(target)) => {
            let dc = target.foreign(&api.info.datacenter).unwrap_or_default().to_owned();
            ApiError::DcUnknown { api: api_of(req.uri().path()), dc }.into_response()
        }
    }
}

/// The router of every API.
pub fn router(api: Api) -> Router {
    Router::new()
        .route("/ping", axum::routing::get(ping))
        .merge(marathon::routes())
        .merge(consul::routes())
        .merge(consul_kv::routes())
        .merge(consul_event::routes())
        .merge(consul_coordinate::routes())
        .merge(consul_txn::routes())
        .merge(consul_operator::routes())
        .merge(consul_query::routes())
        .merge(events::routes())
        .merge(groups::routes())
        .merge(mesos::routes())
        .fallback(not_found)
        .layer(axum::middleware::from_fn(request_scope))
        .layer(axum::middleware::from_fn_with_state(api.clone(), dc_guard))
        .layer(axum::middleware::map_response_with_state(api.clone(), consul::known_leader))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn(body_limit_errors))
        .with_state(api)
}
