//! Consul's network coordinates (`/v1/coordinate`). mesh does not estimate round-trip times, so
//! every node starts at Consul's initial coordinate (the origin, `Error` 1.5, `Height` 1e-5),
//! which is also what a fresh Consul agent reports; `PUT /v1/coordinate/update` sets a node's
//! coordinate (kept in memory; updates for nodes the catalog does not know are ignored, as
//! Consul's state store does).

use super::consul::{Params, check_dc, indexed, json_body, reply};
use super::{Api, ApiError};
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::Mutex;

/// Coordinates set through `/v1/coordinate/update`, by node, with the index of the last update.
#[derive(Debug, Default)]
pub struct Coordinates {
    inner: Mutex<(BTreeMap<String, Value>, u64)>,
}

/// Routes of the coordinate API.
pub fn routes() -> Router<Api> {
    Router::new()
        .route("/v1/coordinate/datacenters", get(datacenters))
        .route("/v1/coordinate/nodes", get(nodes))
        .route("/v1/coordinate/node/{node}", get(node))
        .route("/v1/coordinate/update", put(update))
}

/// Consul's initial coordinate (`coordinate.NewCoordinate` with the default config).
fn origin() -> Value {
    json!({"Vec": vec![0.0; 8], "Error": 1.5, "Adjustment": 0.0, "Height": 1e-5})
}

/// Every catalog node with its coordinate, and the index to report.
fn all(api: &Api) -> (Vec<Value>, u64) {
    let state = api.control.published.state.load();
    let guard = api.coordinates.inner.lock().unwrap_or_else(|e| e.into_inner());
    let list = state
        .catalog
        .nodes
        .keys()
        .map(|n| json!({"Node": n, "Segment": "", "Coord": guard.0.get(n).cloned().unwrap_or_else(origin)}))
        .collect();
    (list, guard.1.max(state.topic_index("nodes")))
}

async fn datacenters(State(api): State<Api>, RawQuery(raw): RawQuery) -> Response {
    let q = Params::parse(raw.as_deref());
    let own = all(&api).0.into_iter().filter(|c| c["Node"] == api.info.node.as_str()).collect::<Vec<_>>();
    reply(&json!([{"Datacenter": api.info.datacenter, "AreaID": "wan", "Coordinates": own}]), &q)
}

async fn nodes(State(api): State<Api>, RawQuery(raw): RawQuery) -> Result<Response, ApiError> {
    let q = Params::parse(raw.as_deref());
    check_dc(&api, &q)?;
    let (list, index) = all(&api);
    Ok(indexed(&Value::Array(list), index, &q))
}

async fn node(State(api): State<Api>, Path(name): Path<String>, RawQuery(raw): RawQuery) -> Result<Response, ApiError> {
    let q = Params::parse(raw.as_deref());
    check_dc(&api, &q)?;
    let (list, index) = all(&api);
    let mine: Vec<Value> = list.into_iter().filter(|c| c["Node"] == name.as_str()).collect();
    if mine.is_empty() {
        let mut r = axum::http::StatusCode::NOT_FOUND.into_response();
        super::consul::add_index_headers(&mut r, index, &q);
        return Ok(r);
    }
    Ok(indexed(&Value::Array(mine), index, &q))
}

async fn update(State(api): State<Api>, RawQuery(raw): RawQuery, body: Bytes) -> Result<Response, ApiError> {
    let q = Params::parse(raw.as_deref());
    check_dc(&api, &q)?;
    let m = json_body(&body)?;
    let b = super::consul::Ci(&m);
    let node = b.str("Node")?.unwrap_or_default().to_owned();
    if node.is_empty() {
        return Err(ApiError::ConsulBadRequest("Missing node name".into()));
    }
    let Some(c) = b.obj("Coord")? else {
        return Err(ApiError::ConsulBadRequest("Missing coordinate".into()));
    };
    let num = |name: &str| -> Result<f64, ApiError> {
        match c.get(name) {
            None => Ok(0.0),
            Some(v) => v
                .as_f64()
                .filter(|f| f.is_finite())
                .ok_or_else(|| ApiError::ConsulBadRequest(format!("Invalid coordinate: {name} must be a number"))),
        }
    };
    let vec: Vec<f64> = match c.get("Vec") {
        Some(Value::Array(a)) => a.iter().filter_map(|x| x.as_f64().filter(|f| f.is_finite())).collect(),
        _ => Vec::new(),
    };
    if vec.len() != 8 || c.get("Vec").and_then(Value::as_array).map(Vec::len) != Some(8) {
        return Err(ApiError::ConsulBadRequest(
            "Invalid coordinate: dimensions aren't compatible (Vec must have 8 numbers)".into(),
        ));
    }
    let coord = json!({"Vec": vec, "Error": num("Error")?, "Adjustment": num("Adjustment")?, "Height": num("Height")?});
    let state = api.control.published.state.load();
    if state.catalog.nodes.contains_key(&node) {
        let mut g = api.coordinates.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.0.insert(node, coord);
        g.1 = g.1.max(state.topic_index("nodes")) + 1;
    }
    Ok(reply(&json!(true), &q))
}
