//! The service catalog: nodes, services and service instances with health, behind [`Catalog`].
//!
//! The state machine keeps a [`CatalogState`]; after each applied batch the control side publishes
//! an immutable [`CatalogState`] (cheap to clone: persistent maps) that DNS and the HTTP reads use.

use imbl::OrdMap;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::IpAddr;

/// A node in the catalog.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Node {
    /// Node name (e.g. the host name).
    pub name: String,
    /// Its address.
    pub address: IpAddr,
    /// Its datacenter.
    pub datacenter: String,
    /// Node metadata.
    pub meta: BTreeMap<String, String>,
    /// Raft-style index at which it was created.
    pub create_index: u64,
    /// Index of its last change.
    pub modify_index: u64,
}

/// Health of an instance.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Health {
    /// All checks pass.
    Passing,
    /// Some check warns; still answered in DNS by default.
    Warning,
    /// Some check is critical; never answered in DNS.
    Critical,
}

impl Health {
    /// Consul's lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Passing => "passing",
            Health::Warning => "warning",
            Health::Critical => "critical",
        }
    }
}

/// One instance of a service.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ServiceInstance {
    /// Unique id (for a Marathon task: the task id).
    pub id: String,
    /// Service name (`webserver`, `web-prod`).
    pub service: String,
    /// Node that runs it.
    pub node: String,
    /// Its address, if it differs from the node's.
    pub address: Option<IpAddr>,
    /// Its port.
    pub port: u16,
    /// Tags.
    pub tags: Vec<String>,
    /// Metadata.
    pub meta: BTreeMap<String, String>,
    /// Aggregated health.
    pub health: Health,
    /// Index at which it was created.
    pub create_index: u64,
    /// Index of its last change.
    pub modify_index: u64,
}

/// The catalog's data: a value, cheap to clone.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CatalogState {
    /// The index of the last change to anything in the catalog; only grows.
    pub index: u64,
    /// Nodes by name.
    pub nodes: OrdMap<String, Node>,
    /// Instances by service name, then instance id.
    pub services: OrdMap<String, OrdMap<String, ServiceInstance>>,
    /// The datacenter this catalog belongs to.
    pub datacenter: String,
}

/// Read access to the catalog.
pub trait Catalog {
    /// The change index (only grows; blocking queries wait on it).
    fn index(&self) -> u64;
    /// All nodes, by name.
    fn nodes(&self) -> Vec<&Node>;
    /// One node.
    fn node(&self, name: &str) -> Option<&Node>;
    /// Service names with the union of their instances' tags.
    fn services(&self) -> BTreeMap<String, Vec<String>>;
    /// Instances of a service; with `passing_only`, only those whose health is passing. An optional
    /// tag filter keeps instances carrying that tag (case-insensitive).
    fn instances(&self, service: &str, tag: Option<&str>, passing_only: bool) -> Vec<&ServiceInstance>;
}

impl CatalogState {
    /// An empty catalog for `datacenter`.
    pub fn new(datacenter: &str) -> Self {
        Self { datacenter: datacenter.to_owned(), ..Default::default() }
    }

    /// Add or replace a node; returns whether anything changed.
    pub fn upsert_node(&mut self, mut node: Node, index: u64) -> bool {
        if let Some(old) = self.nodes.get(&node.name) {
            if old.address == node.address && old.meta == node.meta && old.datacenter == node.datacenter {
                return false;
            }
            node.create_index = old.create_index;
        } else {
            node.create_index = index;
        }
        node.modify_index = index;
        self.nodes.insert(node.name.clone(), node);
        self.index = index;
        true
    }

    /// Add or replace an instance; returns whether anything changed.
    pub fn upsert_instance(&mut self, mut inst: ServiceInstance, index: u64) -> bool {
        let svc = self.services.get(&inst.service).cloned().unwrap_or_default();
        if let Some(old) = svc.get(&inst.id) {
            let mut cmp = inst.clone();
            cmp.create_index = old.create_index;
            cmp.modify_index = old.modify_index;
            if &cmp == old {
                return false;
            }
            inst.create_index = old.create_index;
        } else {
            inst.create_index = index;
        }
        inst.modify_index = index;
        let mut svc = svc;
        svc.insert(inst.id.clone(), inst.clone());
        self.services.insert(inst.service.clone(), svc);
        self.index = index;
        true
    }

    /// Remove an instance by service and id; returns whether it existed.
    pub fn remove_instance(&mut self, service: &str, id: &str, index: u64) -> bool {
        let Some(mut svc) = self.services.get(service).cloned() else { return false };
        if svc.remove(id).is_none() {
            return false;
        }
        if svc.is_empty() {
            self.services.remove(service);
        } else {
            self.services.insert(service.to_owned(), svc);
        }
        self.index = index;
        true
    }
}

impl Catalog for CatalogState {
    fn index(&self) -> u64 {
        self.index.max(1)
    }
    fn nodes(&self) -> Vec<&Node> {
        self.nodes.values().collect()
    }
    fn node(&self, name: &str) -> Option<&Node> {
        self.nodes.get(name).or_else(|| self.nodes.values().find(|n| n.name.eq_ignore_ascii_case(name)))
    }
    fn services(&self) -> BTreeMap<String, Vec<String>> {
        self.services
            .iter()
            .map(|(name, insts)| {
                let mut tags: Vec<String> = insts.values().flat_map(|i| i.tags.iter().cloned()).collect();
                tags.sort();
                tags.dedup();
                (name.clone(), tags)
            })
            .collect()
    }
    fn instances(&self, service: &str, tag: Option<&str>, passing_only: bool) -> Vec<&ServiceInstance> {
        let svc = match self.services.get(service) {
            Some(s) => Some(s),
            None => self.services.iter().find(|(k, _)| k.eq_ignore_ascii_case(service)).map(|(_, v)| v),
        };
        let Some(svc) = svc else { return Vec::new() };
        svc.values()
            .filter(|i| !passing_only || i.health == Health::Passing)
            .filter(|i| tag.is_none_or(|t| i.tags.iter().any(|x| x.eq_ignore_ascii_case(t))))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inst(id: &str, svc: &str, tags: &[&str], health: Health) -> ServiceInstance {
        ServiceInstance {
            id: id.into(),
            service: svc.into(),
            node: "n1".into(),
            address: None,
            port: 31000,
            tags: tags.iter().map(|t| t.to_string()).collect(),
            meta: BTreeMap::new(),
            health,
            create_index: 0,
            modify_index: 0,
        }
    }

    #[test]
    fn index_only_grows_and_tracks_changes() {
        let mut c = CatalogState::new("dc1");
        assert_eq!(c.index(), 1, "never 0");
        assert!(c.upsert_instance(inst("a", "web", &["v1"], Health::Passing), 5));
        assert!(!c.upsert_instance(inst("a", "web", &["v1"], Health::Passing), 6), "no-op upsert");
        assert_eq!(c.index(), 5);
        assert!(c.upsert_instance(inst("a", "web", &["v2"], Health::Passing), 7));
        let a = &c.services["web"]["a"];
        assert_eq!((a.create_index, a.modify_index), (5, 7));
        assert!(c.remove_instance("web", "a", 8));
        assert!(!c.remove_instance("web", "a", 9));
        assert!(c.services.get("web").is_none());
        assert_eq!(c.index(), 8);
    }

    #[test]
    fn instance_queries_filter_by_tag_and_health() {
        let mut c = CatalogState::new("dc1");
        c.upsert_instance(inst("a", "web", &["http", "v1"], Health::Passing), 1);
        c.upsert_instance(inst("b", "web", &["http"], Health::Warning), 2);
        c.upsert_instance(inst("c", "web", &["v1"], Health::Critical), 3);
        assert_eq!(c.instances("web", None, false).len(), 3);
        assert_eq!(c.instances("WEB", None, true).len(), 1, "case-insensitive, passing only");
        assert_eq!(c.instances("web", Some("HTTP"), false).len(), 2);
        assert!(c.instances("db", None, false).is_empty());
        assert_eq!(c.services()["web"], vec!["http", "v1"]);
    }
}
