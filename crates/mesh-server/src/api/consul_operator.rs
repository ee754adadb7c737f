//! Consul's operator endpoints as they are on a single server with no gossip encryption, which
//! is what a `mesh dev` node is: `raft/configuration` lists this node as the leader and only
//! voter; removing a peer or transferring leadership has no other server to act on (500, as
//! Consul); the keyring answers 500 (no gossip encryption); `autopilot/health` reports this node;
//! `usage` counts the catalog.

use super::consul::{Params, check_dc, indexed, reply};
use super::{Api, ApiError};
use axum::Router;
use axum::extract::{RawQuery, State};
use axum::response::Response;
use axum::routing::get;
use serde_json::json;

/// Routes of the operator API.
pub fn routes() -> Router<Api> {
    Router::new()
        .route("/v1/operator/raft/configuration", get(raft_configuration))
        .route("/v1/operator/raft/peer", axum::routing::delete(raft_remove_peer))
        .route("/v1/operator/raft/transfer-leader", axum::routing::post(raft_transfer_leader))
        .route("/v1/operator/autopilot/health", get(autopilot_health))
        .route("/v1/operator/autopilot/configuration", get(autopilot_get).put(autopilot_put))
        .route("/v1/operator/keyring", get(keyring).post(keyring).put(keyring).delete(keyring))
        .route("/v1/operator/usage", get(usage))
        .route(
            "/v1/snapshot",
            get(snapshot_save).put(snapshot_restore).layer(axum::extract::DefaultBodyLimit::max(SNAPSHOT_MAX_BYTES)),
        )
}

/// Largest snapshot `PUT /v1/snapshot` takes (what a forwarded request may carry).
const SNAPSHOT_MAX_BYTES: usize = 64 * 1024 * 1024;

/// `GET /v1/snapshot`: the whole state of the datacenter (apps, tasks, catalog, KV, sessions,
/// frameworks) in mesh's snapshot format, as `mesh snapshot save` writes it. Answered by the
/// leader, like every default-mode read.
async fn snapshot_save(State(api): State<Api>, RawQuery(raw): RawQuery) -> Result<Response, ApiError> {
    let q = Params::parse(raw.as_deref());
    check_dc(&api, &q)?;
    let state = api.control.state();
    let bytes = mesh_core::state::snapshot_bytes(&state).map_err(|e| ApiError::ConsulStatus(500, e.to_string()))?;
    let mut r = axum::response::IntoResponse::into_response(bytes);
    let h = r.headers_mut();
    h.insert(axum::http::header::CONTENT_TYPE, axum::http::HeaderValue::from_static("application/octet-stream"));
    if let Ok(v) = axum::http::HeaderValue::from_str(&state.index.to_string()) {
        h.insert("X-Consul-Index", v);
    }
    Ok(r)
}

/// `PUT /v1/snapshot`: replace the datacenter's state with a saved one (replicated like any
/// write; the leader's control loop then starts again from it).
async fn snapshot_restore(
    State(api): State<Api>,
    RawQuery(raw): RawQuery,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let q = Params::parse(raw.as_deref());
    check_dc(&api, &q)?;
    let state = mesh_core::state::state_from_snapshot(&body, "the request body")
        .map_err(|e| ApiError::ConsulBadRequest(format!("Invalid snapshot: {e}")))?;
    api.control
        .propose(mesh_core::state::Command::Restore { state: Box::new(state) })
        .await
        .map_err(ApiError::from_consul)?;
    Ok(reply(&serde_json::Value::Null, &q))
}

/// Autopilot's configuration: kept (in memory) and shown; mesh's single server has nothing for
/// autopilot to act on.
#[derive(Debug)]
pub struct Autopilot {
    inner: std::sync::Mutex<(serde_json::Map<String, serde_json::Value>, u64)>,
}

/// The fields of Consul's `AutopilotConfiguration` with their zero values (a PUT replaces the
/// whole configuration, as Consul's does).
type ZeroValue = fn() -> serde_json::Value;

const AUTOPILOT_FIELDS: &[(&str, ZeroValue)] = &[
    ("CleanupDeadServers", || json!(false)),
    ("LastContactThreshold", || json!("0s")),
    ("MaxTrailingLogs", || json!(0)),
    ("MinQuorum", || json!(0)),
    ("ServerStabilizationTime", || json!("0s")),
    ("RedundancyZoneTag", || json!("")),
    ("DisableUpgradeMigration", || json!(false)),
    ("UpgradeVersionTag", || json!("")),
];

impl Default for Autopilot {
    /// Consul's defaults.
    fn default() -> Self {
        let v = json!({
            "CleanupDeadServers": true, "LastContactThreshold": "200ms", "MaxTrailingLogs": 250,
            "MinQuorum": 0, "ServerStabilizationTime": "10s", "RedundancyZoneTag": "",
            "DisableUpgradeMigration": false, "UpgradeVersionTag": "",
        });
        Self { inner: std::sync::Mutex::new((v.as_object().cloned().unwrap_or_default(), 1)) }
    }
}

async fn autopilot_get(State(api): State<Api>, RawQuery(raw): RawQuery) -> Result<Response, ApiError> {
    let q = Params::parse(raw.as_deref());
    check_dc(&api, &q)?;
    let g = api.autopilot.inner.lock().unwrap_or_else(|e| e.into_inner());
    let mut v = g.0.clone();
    v.insert("CreateIndex".into(), json!(1));
    v.insert("ModifyIndex".into(), json!(g.1));
    Ok(reply(&serde_json::Value::Object(v), &q))
}

async fn autopilot_put(
    State(api): State<Api>,
    RawQuery(raw): RawQuery,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let q = Params::parse(raw.as_deref());
    check_dc(&api, &q)?;
    let m = super::consul::json_body(&body)?;
    let b = super::consul::Ci(&m);
    let mut next = serde_json::Map::new();
    for (name, zero) in AUTOPILOT_FIELDS {
        let z = zero();
        let v = match b.get(name) {
            None => z,
            Some(v) if std::mem::discriminant(v) == std::mem::discriminant(&z) => v.clone(),
            Some(_) => {
                return Err(ApiError::ConsulBadRequest(format!(
                    "Error parsing autopilot config: {name} has the wrong type"
                )));
            }
        };
        next.insert((*name).to_owned(), v);
    }
    let cas = match q.get("cas").filter(|c| !c.is_empty()) {
        None => None,
        Some(c) => {
            Some(c.parse::<u64>().map_err(|_| ApiError::ConsulBadRequest(format!("Error parsing cas value: {c:?}")))?)
        }
    };
    let mut g = api.autopilot.inner.lock().unwrap_or_else(|e| e.into_inner());
    if cas.is_some_and(|c| c != g.1) {
        return Ok(reply(&json!(false), &q));
    }
    g.0 = next;
    g.1 += 1;
    Ok(reply(&json!(true), &q))
}

fn server_id(api: &Api) -> String {
    // A stable id per node name (FNV-1a), shaped like Consul's node ids.
    let fnv = |salt: u8| {
        api.info
            .node
            .bytes()
            .chain([salt])
            .fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3))
    };
    uuid::Uuid::from_u64_pair(fnv(1), fnv(2)).to_string()
}

fn raft_address(api: &Api) -> String {
    api.info.http_addr.clone()
}

async fn raft_configuration(State(api): State<Api>, RawQuery(raw): RawQuery) -> Result<Response, ApiError> {
    let q = Params::parse(raw.as_deref());
    check_dc(&api, &q)?;
    if let Some((peers, index)) = api.raft.as_ref().and_then(|r| r.peers()) {
        let servers: Vec<serde_json::Value> = peers
            .iter()
            .map(|p| {
                json!({
                    "ID": format!("{:016x}", p.id), "Node": p.name, "Address": p.rpc,
                    "Leader": p.leader, "Voter": p.voter, "ProtocolVersion": "3",
                })
            })
            .collect();
        return Ok(reply(&json!({ "Servers": servers, "Index": index }), &q));
    }
    Ok(reply(
        &json!({
            "Servers": [{
                "ID": server_id(&api), "Node": api.info.node, "Address": raft_address(&api),
                "Leader": true, "Voter": true, "ProtocolVersion": "3",
            }],
            "Index": 0,
        }),
        &q,
    ))
}

async fn raft_remove_peer(State(api): State<Api>, RawQuery(raw): RawQuery) -> Result<Response, ApiError> {
    let q = Params::parse(raw.as_deref());
    check_dc(&api, &q)?;
    let (what, value) = match (q.get("id"), q.get("address")) {
        (Some(id), _) if !id.is_empty() => ("id", id.clone()),
        (_, Some(a)) if !a.is_empty() => ("address", a.clone()),
        _ => {
            return Err(ApiError::ConsulBadRequest(
                "Must specify either ?id with the server's ID or ?address with IP:port of peer to remove".into(),
            ));
        }
    };
    if let Some(view) = &api.raft
        && let (Some(raft), Some((peers, _))) = (view.raft.get(), view.peers())
    {
        let found =
            peers.iter().find(|p| if what == "id" { format!("{:016x}", p.id) == value } else { p.rpc == value });
        let Some(peer) = found else {
            return Err(ApiError::ConsulStatus(
                500,
                format!("{what} {value:?} was not found in the Raft configuration"),
            ));
        };
        let voters = peers.iter().filter(|p| p.voter).count();
        if peer.voter && voters <= 1 {
            return Err(ApiError::ConsulStatus(500, format!("cannot remove {}: it is the only voter", peer.name)));
        }
        let change = openraft::ChangeMembers::RemoveVoters(std::collections::BTreeSet::from([peer.id]));
        raft.change_membership(change, false).await.map_err(|e| ApiError::ConsulStatus(500, e.to_string()))?;
        tracing::info!(server = %peer.name, "raft: removed from the group (operator)");
        return Ok(reply(&serde_json::Value::Null, &q));
    }
    let own = if what == "id" { server_id(&api) } else { raft_address(&api) };
    let msg = if value == own {
        format!("cannot remove {what} {value:?}: it is this node, the only server")
    } else {
        format!("{what} {value:?} was not found in the Raft configuration")
    };
    Err(ApiError::ConsulStatus(500, msg))
}

async fn raft_transfer_leader(State(api): State<Api>, RawQuery(raw): RawQuery) -> Result<Response, ApiError> {
    let q = Params::parse(raw.as_deref());
    check_dc(&api, &q)?;
    Err(ApiError::ConsulStatus(500, "cannot transfer leadership: this node is the only voter".into()))
}

async fn autopilot_health(State(api): State<Api>, RawQuery(raw): RawQuery) -> Result<Response, ApiError> {
    let q = Params::parse(raw.as_deref());
    check_dc(&api, &q)?;
    let healthy = api.control.store_failure().is_none();
    let state = api.control.published.state.load();
    let body = json!({
        "Healthy": healthy,
        "FailureTolerance": 0,
        "Servers": [{
            "ID": server_id(&api), "Name": api.info.node, "Address": raft_address(&api),
            "SerfStatus": "alive", "Version": super::consul::CONSUL_API_VERSION, "Leader": true,
            "LastContact": "0s", "LastTerm": 1, "LastIndex": state.catalog.index,
            "Healthy": healthy, "Voter": true, "StableSince": chrono::DateTime::from_timestamp_millis(api.info.started_at as i64)
                .map(|t| t.to_rfc3339()).unwrap_or_default(),
        }],
    });
    let mut r = reply(&body, &q);
    if !healthy {
        *r.status_mut() = axum::http::StatusCode::TOO_MANY_REQUESTS;
    }
    Ok(r)
}

/// (The body, `{"Key": ...}`, is read before answering: an error sent while the request's
/// body is unread can reach the client as a connection reset instead of the answer.)
async fn keyring(_body: axum::body::Bytes) -> Result<Response, ApiError> {
    Err(ApiError::ConsulStatus(
        500,
        "Gossip encryption is not enabled on this node (mesh has no gossip keyring)".into(),
    ))
}

async fn usage(State(api): State<Api>, RawQuery(raw): RawQuery) -> Result<Response, ApiError> {
    let q = Params::parse(raw.as_deref());
    check_dc(&api, &q)?;
    let state = api.control.published.state.load();
    let cat = &state.catalog;
    let instances: usize = cat.services.values().map(|m| m.len()).sum();
    let body = json!({
        "Usage": {api.info.datacenter.clone(): {
            "Services": cat.services.len(),
            "ServiceInstances": instances,
            "ConnectServiceInstances": {"api-gateway": 0, "connect-native": 0, "connect-proxy": 0,
                "ingress-gateway": 0, "mesh-gateway": 0, "terminating-gateway": 0},
            "BillableServiceInstances": instances,
            "Nodes": cat.nodes.len(),
        }},
        // Consul embeds its query metadata in this answer.
        "Index": state.topic_index("services"), "LastContact": 0, "KnownLeader": api.control.store_failure().is_none(),
        "ConsistencyLevel": "leader", "NotModified": false, "ResultsFilteredByACLs": false,
    });
    Ok(indexed(&body, state.topic_index("services"), &q))
}
