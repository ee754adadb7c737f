//! The Consul v1 read API of the foundation: catalog services, service instances, nodes, health,
//! and the leader, with Consul's PascalCase JSON and `X-Consul-Index` headers.

use super::{Api, ApiError, flag};
use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::HeaderValue;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use mesh_core::catalog::{Catalog, CatalogState, Node, ServiceInstance};
use serde_json::{Value, json};
use std::collections::HashMap;

/// Routes of the Consul API.
pub fn routes() -> Router<Api> {
    Router::new()
        .route("/v1/catalog/services", get(catalog_services))
        .route("/v1/catalog/service/{name}", get(catalog_service))
        .route("/v1/catalog/nodes", get(catalog_nodes))
        .route("/v1/catalog/datacenters", get(datacenters))
        .route("/v1/health/service/{name}", get(health_service))
        .route("/v1/status/leader", get(leader))
        .route("/v1/status/peers", get(peers))
}

type Q = Query<HashMap<String, String>>;

fn check_dc(api: &Api, q: &HashMap<String, String>) -> Result<(), ApiError> {
    match q.get("dc") {
        Some(dc) if !dc.is_empty() && dc != &api.info.datacenter => Err(ApiError::ConsulNoPathToDc),
        _ => Ok(()),
    }
}

fn indexed(body: Value, cat: &CatalogState) -> Response {
    let mut r = axum::Json(body).into_response();
    let h = r.headers_mut();
    h.insert("X-Consul-Index", HeaderValue::from(cat.index()));
    h.insert("X-Consul-KnownLeader", HeaderValue::from_static("true"));
    h.insert("X-Consul-LastContact", HeaderValue::from_static("0"));
    r
}

fn node_json(n: &Node) -> Value {
    json!({
        "ID": "",
        "Node": n.name,
        "Address": n.address.to_string(),
        "Datacenter": n.datacenter,
        "TaggedAddresses": {"lan": n.address.to_string(), "wan": n.address.to_string()},
        "Meta": n.meta,
        "CreateIndex": n.create_index,
        "ModifyIndex": n.modify_index,
    })
}

fn service_json(i: &ServiceInstance, node: Option<&Node>) -> Value {
    let addr = i.address.map(|a| a.to_string()).unwrap_or_default();
    let effective = i.address.or(node.map(|n| n.address)).map(|a| a.to_string()).unwrap_or_default();
    json!({
        "ID": i.id,
        "Service": i.service,
        "Tags": i.tags,
        "Address": addr,
        "Port": i.port,
        "Meta": i.meta,
        "TaggedAddresses": {"lan_ipv4": {"Address": effective, "Port": i.port}},
        "Weights": {"Passing": 1, "Warning": 1},
        "EnableTagOverride": false,
        "CreateIndex": i.create_index,
        "ModifyIndex": i.modify_index,
    })
}

async fn catalog_services(State(api): State<Api>, Query(q): Q) -> Result<Response, ApiError> {
    check_dc(&api, &q)?;
    let cat = api.control.published.catalog.load();
    Ok(indexed(serde_json::to_value(cat.services()).unwrap_or(Value::Null), &cat))
}

async fn catalog_service(State(api): State<Api>, Path(name): Path<String>, Query(q): Q) -> Result<Response, ApiError> {
    check_dc(&api, &q)?;
    let cat = api.control.published.catalog.load();
    let list: Vec<Value> = cat
        .instances(&name, q.get("tag").map(String::as_str), false)
        .into_iter()
        .map(|i| {
            let node = cat.node(&i.node);
            let addr = node.map(|n| n.address.to_string()).unwrap_or_default();
            json!({
                "ID": "",
                "Node": i.node,
                "Address": addr,
                "Datacenter": cat.datacenter,
                "TaggedAddresses": {"lan": addr, "wan": addr},
                "NodeMeta": node.map(|n| n.meta.clone()).unwrap_or_default(),
                "ServiceKind": "",
                "ServiceID": i.id,
                "ServiceName": i.service,
                "ServiceTags": i.tags,
                "ServiceAddress": i.address.map(|a| a.to_string()).unwrap_or_default(),
                "ServicePort": i.port,
                "ServiceMeta": i.meta,
                "ServiceWeights": {"Passing": 1, "Warning": 1},
                "ServiceEnableTagOverride": false,
                "CreateIndex": i.create_index,
                "ModifyIndex": i.modify_index,
            })
        })
        .collect();
    Ok(indexed(Value::Array(list), &cat))
}

async fn catalog_nodes(State(api): State<Api>, Query(q): Q) -> Result<Response, ApiError> {
    check_dc(&api, &q)?;
    let cat = api.control.published.catalog.load();
    let list: Vec<Value> = cat.nodes().into_iter().map(node_json).collect();
    Ok(indexed(Value::Array(list), &cat))
}

async fn datacenters(State(api): State<Api>) -> Response {
    axum::Json(json!([api.info.datacenter])).into_response()
}

async fn health_service(State(api): State<Api>, Path(name): Path<String>, Query(q): Q) -> Result<Response, ApiError> {
    check_dc(&api, &q)?;
    let passing = flag(q.get("passing"), false);
    let cat = api.control.published.catalog.load();
    let list: Vec<Value> = cat
        .instances(&name, q.get("tag").map(String::as_str), passing)
        .into_iter()
        .map(|i| {
            let node = cat.node(&i.node);
            let status = i.health.as_str();
            json!({
                "Node": node.map(node_json).unwrap_or(Value::Null),
                "Service": service_json(i, node),
                "Checks": [
                    {
                        "Node": i.node, "CheckID": "serfHealth", "Name": "Serf Health Status",
                        "Status": "passing", "Notes": "", "Output": "Agent alive and reachable",
                        "ServiceID": "", "ServiceName": "", "ServiceTags": [], "Type": "",
                        "CreateIndex": node.map(|n| n.create_index).unwrap_or(0),
                        "ModifyIndex": node.map(|n| n.modify_index).unwrap_or(0),
                    },
                    {
                        "Node": i.node, "CheckID": format!("service:{}", i.id), "Name": format!("Service '{}' check", i.service),
                        "Status": status, "Notes": "", "Output": "task is running",
                        "ServiceID": i.id, "ServiceName": i.service, "ServiceTags": i.tags, "Type": "mesh-task",
                        "CreateIndex": i.create_index, "ModifyIndex": i.modify_index,
                    }
                ],
            })
        })
        .collect();
    Ok(indexed(Value::Array(list), &cat))
}

async fn leader(State(api): State<Api>) -> Response {
    axum::Json(json!(api.info.http_addr)).into_response()
}

async fn peers(State(api): State<Api>) -> Response {
    axum::Json(json!([api.info.http_addr])).into_response()
}
