//! DNS names beyond a node's catalog ([`RemoteAsk`]): another datacenter's services and nodes,
//! prepared queries, and `--dns-failover nearest`. They are looked up through the node's own
//! HTTP API, in process: the same requests a client would send (`/v1/health/service/<s>?dc=`,
//! `/v1/catalog/node/<n>?dc=`, `/v1/query/<q>/execute`), so an agent asks its servers and a
//! server asks the other datacenter's over the WAN exactly as for `?dc=`, with the same
//! fail-fast errors. What they answer becomes a small catalog of that datacenter, and the DNS
//! zone answers from it as that datacenter's own DNS would.

use crate::api::enc;
use crate::dns::RemoteLookup;
use futures_util::future::BoxFuture;
use mesh_core::catalog::{CatalogState, Health, Node, ServiceInstance, Weights};
use mesh_core::dns::{RemoteAsk, RemoteFound, RemoteMiss};
use serde_json::Value;
use std::net::IpAddr;
use std::time::Duration;
use tracing::debug;

/// The longest one lookup may take (each `?dc=` attempt is bounded further down).
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);
/// `--dns-failover nearest` tries at most this many other datacenters, nearest first.
pub const FAILOVER_DATACENTERS: usize = 3;

/// Looks names up through a node's HTTP API (its router, called in process).
#[derive(Clone)]
pub struct HttpLookup {
    /// The node's API, with the layers that forward to servers and other datacenters.
    pub router: axum::Router,
    /// This node's datacenter.
    pub datacenter: String,
    /// Answer only passing instances (`--dns-only-passing`): what failover counts as answerable.
    pub only_passing: bool,
    /// `--translate-wan-addrs`: other datacenters' nodes and instances by their WAN addresses.
    pub translate_wan: bool,
}

impl RemoteLookup for HttpLookup {
    fn lookup(&self, ask: RemoteAsk) -> BoxFuture<'static, Result<RemoteFound, RemoteMiss>> {
        let this = self.clone();
        Box::pin(async move {
            match tokio::time::timeout(LOOKUP_TIMEOUT, this.run(&ask)).await {
                Ok(r) => r,
                Err(_) => {
                    debug!(?ask, "DNS lookup beyond the catalog timed out");
                    Err(RemoteMiss::Unavailable)
                }
            }
        })
    }
}

impl HttpLookup {
    async fn run(&self, ask: &RemoteAsk) -> Result<RemoteFound, RemoteMiss> {
        match ask {
            RemoteAsk::Service { dc, service, tag } => self.service(dc, service, tag.as_deref()).await,
            RemoteAsk::Node { dc, node } => {
                let v = self.get(&format!("/v1/catalog/node/{}?dc={}", enc(node), enc(dc))).await?;
                let n = v.get("Node").filter(|n| n.is_object()).ok_or(RemoteMiss::NoSuchName)?;
                let mut catalog = CatalogState::new(dc);
                let node = self.node(dc, n).ok_or(RemoteMiss::NoSuchName)?;
                catalog.upsert_node(node, 1);
                Ok(RemoteFound { datacenter: dc.clone(), service: String::new(), catalog, ttl: None })
            }
            RemoteAsk::Query { name, dc } => {
                let mut uri = format!("/v1/query/{}/execute", enc(name));
                if let Some(dc) = dc {
                    uri.push_str(&format!("?dc={}", enc(dc)));
                }
                let v = self.get(&uri).await?;
                let datacenter = v["Datacenter"].as_str().unwrap_or(&self.datacenter).to_ascii_lowercase();
                let service = v["Service"].as_str().ok_or(RemoteMiss::NoSuchName)?.to_owned();
                let entries = v["Nodes"].as_array().cloned().unwrap_or_default();
                if entries.is_empty() {
                    return Err(RemoteMiss::NoSuchName);
                }
                let ttl = v["DNS"]["TTL"].as_str().and_then(parse_ttl);
                let catalog = self.entries(&datacenter, &entries);
                Ok(RemoteFound { datacenter, service, catalog, ttl })
            }
            RemoteAsk::Failover { service, tag } => {
                let dcs = self.get("/v1/catalog/datacenters").await?;
                let others = dcs
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                    .filter(|dc| !dc.eq_ignore_ascii_case(&self.datacenter))
                    .take(FAILOVER_DATACENTERS)
                    .map(str::to_ascii_lowercase)
                    .collect::<Vec<_>>();
                for dc in others {
                    match self.service(&dc, service, tag.as_deref()).await {
                        Ok(found) if self.answerable(&found) => return Ok(found),
                        Ok(_) | Err(_) => continue,
                    }
                }
                Err(RemoteMiss::NoSuchName)
            }
        }
    }

    /// Whether DNS would answer any instance of `found`.
    fn answerable(&self, found: &RemoteFound) -> bool {
        found
            .catalog
            .services
            .values()
            .flat_map(|m| m.values())
            .any(|i| if self.only_passing { i.health == Health::Passing } else { i.health != Health::Critical })
    }

    async fn service(&self, dc: &str, service: &str, tag: Option<&str>) -> Result<RemoteFound, RemoteMiss> {
        let mut uri = format!("/v1/health/service/{}?dc={}", enc(service), enc(dc));
        if let Some(t) = tag {
            uri.push_str(&format!("&tag={}", enc(t)));
        }
        let v = self.get(&uri).await?;
        let entries = v.as_array().cloned().unwrap_or_default();
        if entries.is_empty() {
            return Err(RemoteMiss::NoSuchName);
        }
        Ok(RemoteFound {
            datacenter: dc.to_owned(),
            service: service.to_owned(),
            catalog: self.entries(dc, &entries),
            ttl: None,
        })
    }

    /// `GET uri` on the node's API: the JSON of a 200; a 404 or Consul's "No path to
    /// datacenter" is no such name; anything else is unavailable.
    async fn get(&self, uri: &str) -> Result<Value, RemoteMiss> {
        let (status, body) = crate::api::get_in_process(&self.router, uri).await.ok_or(RemoteMiss::Unavailable)?;
        if status.is_success() {
            return serde_json::from_slice(&body).map_err(|_| RemoteMiss::Unavailable);
        }
        let text = String::from_utf8_lossy(&body);
        debug!(%uri, %status, body = %text, "DNS lookup beyond the catalog: no answer");
        if status == axum::http::StatusCode::NOT_FOUND || text.contains("No path to datacenter") {
            Err(RemoteMiss::NoSuchName)
        } else {
            Err(RemoteMiss::Unavailable)
        }
    }

    /// A catalog node from its Consul JSON (its WAN address with `translate_wan`).
    fn node(&self, dc: &str, n: &Value) -> Option<Node> {
        let wan = self.translate_wan.then(|| n["TaggedAddresses"]["wan"].as_str()).flatten();
        let address: IpAddr = wan.or(n["Address"].as_str())?.parse().ok()?;
        let meta = n["Meta"]
            .as_object()
            .map(|m| m.iter().filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned()))).collect())
            .unwrap_or_default();
        Some(Node {
            name: n["Node"].as_str()?.to_owned(),
            address,
            datacenter: dc.to_owned(),
            meta,
            tagged_addresses: Default::default(),
            create_index: 0,
            modify_index: 0,
        })
    }

    /// A catalog of datacenter `dc` from `/v1/health/service` entries: each instance's health is
    /// the worst of its checks'.
    fn entries(&self, dc: &str, entries: &[Value]) -> CatalogState {
        let mut catalog = CatalogState::new(dc);
        for (i, e) in entries.iter().enumerate() {
            let Some(node) = self.node(dc, &e["Node"]) else { continue };
            let s = &e["Service"];
            let wan = self.translate_wan.then(|| s["TaggedAddresses"]["wan"]["Address"].as_str()).flatten();
            let address = wan.or(s["Address"].as_str()).and_then(|a| a.parse::<IpAddr>().ok());
            let health = e["Checks"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|c| match c["Status"].as_str() {
                    Some("critical") => Health::Critical,
                    Some("warning") => Health::Warning,
                    _ => Health::Passing,
                })
                .max()
                .unwrap_or(Health::Passing);
            let weight = |k: &str| s["Weights"][k].as_u64().and_then(|w| u16::try_from(w).ok()).unwrap_or(1);
            let Some(port) = s["Port"].as_u64().and_then(|p| u16::try_from(p).ok()) else { continue };
            let inst = ServiceInstance {
                id: s["ID"].as_str().unwrap_or_default().to_owned(),
                service: s["Service"].as_str().unwrap_or_default().to_owned(),
                node: node.name.clone(),
                address: address.filter(|a| *a != node.address),
                port,
                tags: s["Tags"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|t| t.as_str().map(str::to_owned))
                    .collect(),
                meta: Default::default(),
                health,
                source_health: health,
                weights: Weights { passing: weight("Passing"), warning: weight("Warning") },
                extra: Default::default(),
                create_index: 0,
                modify_index: 0,
            };
            let index = i as u64 + 1;
            catalog.upsert_node(node, index);
            catalog.upsert_instance(inst, index);
        }
        catalog
    }
}

/// A prepared query's `DNS.TTL` (`"10s"`, `"1m"`, a Go duration) in whole seconds.
fn parse_ttl(s: &str) -> Option<u32> {
    if s.is_empty() {
        return None;
    }
    let d = mesh_core::registrator::parse_go_duration(s).ok()?;
    u32::try_from(d.as_secs()).ok()
}
