//! Consul's operator endpoints as they are on a single server with no gossip encryption, which
//! is what a `mesh dev` node is: `raft/configuration` lists this node as the leader and only
//! voter; removing a peer or transferring leadership has no other server to act on (500, as
//! Consul); the keyring answers 500 (no gossip encryption); `usage` counts the catalog.
//!
//! On a `mesh server` the Raft endpoints show the real group, and autopilot's (`health`,
//! `state`) every member as the leader sees it; autopilot's configuration is replicated state
//! (a command in the log), on `mesh dev` too.

use super::consul::{Params, check_dc, indexed, reply};
use super::{Api, ApiError};
use crate::control::ControlError;
use crate::raft::autopilot::{GroupHealth, ServerFacts, ServerHealth, go_duration};
use axum::Router;
use axum::extract::{RawQuery, State};
use axum::response::Response;
use axum::routing::get;
use mesh_core::state::{ApplyError, AutopilotConfig, Command};
use serde_json::json;

/// Routes of the operator API.
pub fn routes() -> Router<Api> {
    Router::new()
        .route("/v1/operator/raft/configuration", get(raft_configuration))
        .route("/v1/operator/raft/peer", axum::routing::delete(raft_remove_peer))
        .route("/v1/operator/raft/transfer-leader", axum::routing::post(raft_transfer_leader))
        .route("/v1/operator/autopilot/health", get(autopilot_health))
        .route("/v1/operator/autopilot/state", get(autopilot_state))
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

/// The fields of Consul's `AutopilotConfiguration` a PUT takes (it replaces the whole
/// configuration, as Consul's does: a field left out takes its zero value).
const AUTOPILOT_FIELDS: &[&str] = &[
    "CleanupDeadServers",
    "LastContactThreshold",
    "MaxTrailingLogs",
    "MinQuorum",
    "ServerStabilizationTime",
    "RedundancyZoneTag",
    "DisableUpgradeMigration",
    "UpgradeVersionTag",
];

/// The configuration as Consul shows it.
fn autopilot_json(c: &AutopilotConfig) -> serde_json::Value {
    let d = |ms: u64| go_duration(std::time::Duration::from_millis(ms));
    json!({
        "CleanupDeadServers": c.cleanup_dead_servers,
        "LastContactThreshold": d(c.last_contact_threshold_ms),
        "MaxTrailingLogs": c.max_trailing_logs,
        "MinQuorum": c.min_quorum,
        "ServerStabilizationTime": d(c.server_stabilization_time_ms),
        "RedundancyZoneTag": c.redundancy_zone_tag,
        "DisableUpgradeMigration": c.disable_upgrade_migration,
        "UpgradeVersionTag": c.upgrade_version_tag,
        "CreateIndex": c.create_index,
        "ModifyIndex": c.modify_index,
    })
}

/// A PUT body as a configuration (indexes are the state's to set), or Consul's 400 message.
fn autopilot_from_body(body: &[u8]) -> Result<AutopilotConfig, ApiError> {
    let m = super::consul::json_body(body)?;
    let b = super::consul::Ci(&m);
    let bad =
        |name: &str, why: &str| ApiError::ConsulBadRequest(format!("Error parsing autopilot config: {name}: {why}"));
    let boolean = |name: &str| match b.get(name) {
        None | Some(serde_json::Value::Null) => Ok(false),
        Some(serde_json::Value::Bool(v)) => Ok(*v),
        Some(_) => Err(bad(name, "must be a boolean")),
    };
    let count = |name: &str| match b.get(name) {
        None | Some(serde_json::Value::Null) => Ok(0),
        Some(v) => v.as_u64().ok_or_else(|| bad(name, "must be a whole number, 0 or more")),
    };
    let text = |name: &str| match b.get(name) {
        None | Some(serde_json::Value::Null) => Ok(String::new()),
        Some(serde_json::Value::String(v)) => Ok(v.clone()),
        Some(_) => Err(bad(name, "must be a string")),
    };
    let duration = |name: &str| match b.get(name) {
        None | Some(serde_json::Value::Null) => Ok(0),
        Some(serde_json::Value::String(v)) => mesh_core::registrator::parse_go_duration(v)
            .map(|d| d.as_millis() as u64)
            .map_err(|e| bad(name, &format!("time: invalid duration {v:?} ({e})"))),
        Some(v) if v.as_u64() == Some(0) => Ok(0),
        Some(_) => Err(bad(name, "must be a duration such as \"200ms\"")),
    };
    if let Some(unknown) = m.keys().find(|k| !AUTOPILOT_FIELDS.iter().any(|f| f.eq_ignore_ascii_case(k))) {
        // Consul ignores what it does not know, and so does mesh, except the indexes it sets.
        tracing::debug!(field = %unknown, "autopilot configuration: field ignored");
    }
    Ok(AutopilotConfig {
        cleanup_dead_servers: boolean("CleanupDeadServers")?,
        last_contact_threshold_ms: duration("LastContactThreshold")?,
        max_trailing_logs: count("MaxTrailingLogs")?,
        min_quorum: count("MinQuorum")?,
        server_stabilization_time_ms: duration("ServerStabilizationTime")?,
        redundancy_zone_tag: text("RedundancyZoneTag")?,
        disable_upgrade_migration: boolean("DisableUpgradeMigration")?,
        upgrade_version_tag: text("UpgradeVersionTag")?,
        create_index: 0,
        modify_index: 0,
    })
}

/// `GET /v1/operator/autopilot/configuration`: the replicated configuration (Consul's
/// defaults until a PUT).
async fn autopilot_get(State(api): State<Api>, RawQuery(raw): RawQuery) -> Result<Response, ApiError> {
    let q = Params::parse(raw.as_deref());
    check_dc(&api, &q)?;
    let state = api.control.published.state.load();
    Ok(reply(&autopilot_json(&state.autopilot.clone().unwrap_or_default()), &q))
}

/// `PUT /v1/operator/autopilot/configuration[?cas=N]`: replace the configuration, a command
/// in the replicated log (so every server acts on it); `true`, or `false` when `cas` is not
/// the current `ModifyIndex`.
async fn autopilot_put(
    State(api): State<Api>,
    RawQuery(raw): RawQuery,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let q = Params::parse(raw.as_deref());
    check_dc(&api, &q)?;
    let config = autopilot_from_body(&body)?;
    let cas = match q.get("cas") {
        None => None,
        Some(c) => Some(c.parse::<u64>().map_err(|_| {
            ApiError::ConsulBadRequest(format!(
                "Error parsing cas value: strconv.ParseUint: parsing {c:?}: invalid syntax"
            ))
        })?),
    };
    match api.control.propose(Command::SetAutopilot { config, cas }).await {
        Ok(()) => Ok(reply(&json!(true), &q)),
        Err(ControlError::Rejected(ApplyError::CasMismatch(_))) => Ok(reply(&json!(false), &q)),
        Err(e) => Err(ApiError::from_consul(e)),
    }
}

/// The group's health as autopilot sees it, from this server, which must lead (requests
/// for it go to the leader); `None` without Raft (`mesh dev`).
fn group_health(api: &Api) -> Option<Result<GroupHealth, ApiError>> {
    let view = api.raft.as_ref()?;
    let raft = view.raft.get()?;
    let m = raft.metrics().borrow().clone();
    if m.state != openraft::ServerState::Leader {
        return Some(Err(ApiError::ConsulStatus(500, "No cluster leader".into())));
    }
    let members = api.cluster.as_ref().map(|c| c.members()).unwrap_or_default();
    let config = api.control.published.state.load().autopilot.clone().unwrap_or_default();
    let heartbeat = std::time::Duration::from_millis(raft.config().heartbeat_interval);
    let g = crate::raft::autopilot::group_health(
        &m,
        &view.contacts,
        &members,
        &api.info.datacenter,
        &config,
        heartbeat,
        api.control.now(),
    );
    Some(Ok(g))
}

fn rfc3339(ms: u64) -> String {
    chrono::DateTime::from_timestamp_millis(ms as i64).map(|t| t.to_rfc3339()).unwrap_or_default()
}

fn last_contact(s: &ServerHealth) -> serde_json::Value {
    s.facts.last_contact.map(|d| json!(go_duration(d))).unwrap_or(serde_json::Value::Null)
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

/// `GET /v1/operator/autopilot/health`: every server of the group, as the leader sees it;
/// 429 while the group is not healthy, as Consul.
async fn autopilot_health(State(api): State<Api>, RawQuery(raw): RawQuery) -> Result<Response, ApiError> {
    let q = Params::parse(raw.as_deref());
    check_dc(&api, &q)?;
    let (g, lone) = autopilot_view(&api)?;
    let servers: Vec<serde_json::Value> = g
        .servers
        .iter()
        .map(|s| {
            let mut v = server_json(&id_text(&lone, s), s);
            v.insert("SerfStatus".into(), json!(s.serf));
            v.insert("Leader".into(), json!(s.leader));
            v.insert("Voter".into(), json!(s.voter));
            serde_json::Value::Object(v)
        })
        .collect();
    let body = json!({"Healthy": g.healthy, "FailureTolerance": g.failure_tolerance, "Servers": servers});
    let mut r = reply(&body, &q);
    if !g.healthy {
        *r.status_mut() = axum::http::StatusCode::TOO_MANY_REQUESTS;
    }
    Ok(r)
}

/// `GET /v1/operator/autopilot/state`: Consul's fuller view (servers by ID, the leader, the
/// voters), from the same facts as the health.
async fn autopilot_state(State(api): State<Api>, RawQuery(raw): RawQuery) -> Result<Response, ApiError> {
    let q = Params::parse(raw.as_deref());
    check_dc(&api, &q)?;
    let (g, lone) = autopilot_view(&api)?;
    let mut servers = serde_json::Map::new();
    for s in &g.servers {
        let id = id_text(&lone, s);
        let status = if s.leader {
            "leader"
        } else if s.voter {
            "voter"
        } else {
            "non-voter"
        };
        let mut v = server_json(&id, s);
        v.insert("NodeStatus".into(), json!(s.serf));
        v.insert("ReadReplica".into(), json!(false));
        v.insert("Status".into(), json!(status));
        v.insert("Meta".into(), json!({}));
        v.insert("NodeType".into(), json!("voter"));
        servers.insert(id, serde_json::Value::Object(v));
    }
    let leader = g.servers.iter().find(|s| s.leader).map(|s| id_text(&lone, s)).unwrap_or_default();
    let voters: Vec<String> = g.servers.iter().filter(|s| s.voter).map(|s| id_text(&lone, s)).collect();
    Ok(reply(
        &json!({
            "Healthy": g.healthy, "FailureTolerance": g.failure_tolerance, "Servers": servers,
            "Leader": leader, "Voters": voters,
        }),
        &q,
    ))
}

/// The group as autopilot's endpoints show it: the Raft group as its leader sees it, or, with
/// no Raft group (`mesh dev`), this node alone, leading itself; then also its `ID` text.
fn autopilot_view(api: &Api) -> Result<(GroupHealth, Option<String>), ApiError> {
    if let Some(g) = group_health(api) {
        return Ok((g?, None));
    }
    let healthy = api.control.store_failure().is_none();
    let facts = ServerFacts {
        alive: true,
        last_contact: Some(std::time::Duration::ZERO),
        last_term: 1,
        last_index: api.control.published.state.load().index,
    };
    let server = ServerHealth {
        id: 0,
        name: api.info.node.clone(),
        address: raft_address(api),
        serf: "alive",
        leader: true,
        voter: true,
        facts,
        healthy,
        stable_since_ms: api.info.started_at,
    };
    Ok((GroupHealth { servers: vec![server], healthy, failure_tolerance: 0 }, Some(server_id(api))))
}

/// A server's `ID`: its Raft id, or the lone node's id.
fn id_text(lone: &Option<String>, s: &ServerHealth) -> String {
    lone.clone().unwrap_or_else(|| format!("{:016x}", s.id))
}

/// The fields autopilot's health and state share for one server.
fn server_json(id: &str, s: &ServerHealth) -> serde_json::Map<String, serde_json::Value> {
    let v = json!({
        "ID": id, "Name": s.name, "Address": s.address, "Version": super::consul::CONSUL_API_VERSION,
        "LastContact": last_contact(s), "LastTerm": s.facts.last_term, "LastIndex": s.facts.last_index,
        "Healthy": s.healthy, "StableSince": rfc3339(s.stable_since_ms),
    });
    match v {
        serde_json::Value::Object(m) => m,
        _ => serde_json::Map::new(),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A PUT body replaces the whole configuration (zero values for what it leaves out);
    /// wrong types and bad durations are Consul's 400, named after the field.
    #[test]
    fn autopilot_bodies_parse_as_consul_reads_them() {
        let c = autopilot_from_body(br#"{"CleanupDeadServers": false, "LastContactThreshold": "1.5s"}"#).unwrap();
        assert!(!c.cleanup_dead_servers);
        assert_eq!(c.last_contact_threshold_ms, 1500);
        assert_eq!((c.max_trailing_logs, c.server_stabilization_time_ms), (0, 0));
        let full = autopilot_json(&AutopilotConfig::default());
        let back = autopilot_from_body(full.to_string().as_bytes()).unwrap();
        assert_eq!(back, AutopilotConfig { create_index: 0, modify_index: 0, ..AutopilotConfig::default() });
        assert_eq!(full["LastContactThreshold"], "200ms");
        assert_eq!(full["ServerStabilizationTime"], "10s");
        for bad in [
            r#"{"MaxTrailingLogs": -1}"#,
            r#"{"MaxTrailingLogs": "many"}"#,
            r#"{"CleanupDeadServers": "yes"}"#,
            r#"{"LastContactThreshold": "soon"}"#,
            r#"{"LastContactThreshold": 200}"#,
            r#"[1]"#,
        ] {
            match autopilot_from_body(bad.as_bytes()) {
                Err(ApiError::ConsulBadRequest(m)) => assert!(!m.is_empty(), "{bad}"),
                other => panic!("{bad}: {other:?}"),
            }
        }
    }
}
