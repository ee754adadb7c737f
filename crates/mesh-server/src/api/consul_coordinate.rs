//! Consul's network coordinates (`/v1/coordinate`) and what reads them (`?near=`, the nearest-first
//! datacenter list).
//!
//! Every node of a cluster estimates its own Vivaldi coordinate ([`mesh_core::coordinate`]) from
//! round trips it measures itself ([`crate::cluster::coords`]): in its datacenter's LAN (every
//! node) and, for servers, in the WAN pool. This module's [`Coordinates`] holds the node's own
//! two clients and every coordinate it has heard of, each with the time its owner computed it;
//! the newest wins. Coordinates spread by the exchanges themselves: each carries the caller's
//! coordinate, and every few seconds a node asks every server for its whole table, so each
//! server (and each agent) knows every node of its datacenter within seconds, and each server
//! every server of the WAN. They are soft state, as Consul treats them (it refreshes them
//! every few seconds too): not in the replicated log, rebuilt within seconds after a restart,
//! readable on every node, and untouched by a leader change. `PUT /v1/coordinate/update` sets
//! a node's LAN coordinate on the node that takes it (the leader, where writes go).

use super::consul::{Params, check_dc, indexed, json_body, reply};
use super::{Api, ApiError};
use crate::rpc::msg::CoordEntry;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use mesh_core::coordinate::{Client, Config, Coordinate};
use rand::SeedableRng;
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Duration;

/// One pool's coordinates: this node's client and what it knows of the others.
#[derive(Debug)]
struct Pool {
    /// This node's name in the pool (`<node>.<dc>` on the WAN).
    me: String,
    client: Client,
    /// When this node's coordinate last changed (ms since the epoch).
    stamp: u64,
    /// Other nodes' coordinates with their owners' stamps.
    known: HashMap<String, (Coordinate, u64)>,
}

impl Pool {
    fn new(me: String) -> Pool {
        Pool { me, client: Client::new(Config::default()), stamp: 0, known: HashMap::new() }
    }

    /// Keeps `coord` for `node` if it is newer than what is known; `false` if not kept.
    fn learn(&mut self, node: &str, coord: Coordinate, stamp: u64) -> bool {
        if node == self.me || node.is_empty() || !valid(&coord) {
            return false;
        }
        match self.known.get(node) {
            Some((_, s)) if *s >= stamp => false,
            _ => {
                self.known.insert(node.to_owned(), (coord, stamp));
                true
            }
        }
    }

    fn coordinate_of(&self, node: &str) -> Option<Coordinate> {
        if node == self.me {
            return Some(self.client.coordinate().clone());
        }
        self.known.get(node).map(|(c, _)| c.clone())
    }
}

/// Whether a coordinate from elsewhere may be used: Consul's 8 dimensions, all finite.
fn valid(c: &Coordinate) -> bool {
    c.vec.len() == Config::default().dimensionality && c.is_valid()
}

#[derive(Debug)]
struct Inner {
    lan: Pool,
    wan: Pool,
    rng: rand::rngs::StdRng,
    index: u64,
}

/// This node's coordinates and those it knows, LAN and WAN.
#[derive(Debug)]
pub struct Coordinates {
    inner: Mutex<Inner>,
}

impl Default for Coordinates {
    /// A node that measures nothing (`mesh dev`): itself at the origin, under no name.
    fn default() -> Self {
        Coordinates::new("", "", 0)
    }
}

impl Coordinates {
    /// The coordinates of node `node` in datacenter `dc`; `seed` feeds the random directions
    /// Vivaldi takes when two coordinates coincide.
    pub fn new(node: &str, dc: &str, seed: u64) -> Coordinates {
        Coordinates {
            inner: Mutex::new(Inner {
                lan: Pool::new(node.to_owned()),
                wan: Pool::new(format!("{node}.{dc}")),
                rng: rand::rngs::StdRng::seed_from_u64(seed),
                index: 1,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// This node's coordinate in a pool and when it last changed.
    pub fn own(&self, wan: bool) -> (Coordinate, u64) {
        let g = self.lock();
        let p = if wan { &g.wan } else { &g.lan };
        (p.client.coordinate().clone(), p.stamp)
    }

    /// A measured round trip to `node`, whose coordinate (stamped by it) came with the answer:
    /// moves this node's coordinate. `now`: ms since the epoch.
    pub fn observe(&self, wan: bool, node: &str, coord: Coordinate, stamp: u64, rtt: Duration, now: u64) {
        let mut g = self.lock();
        let Inner { lan, wan: w, rng, index } = &mut *g;
        let p = if wan { w } else { lan };
        if !valid(&coord) {
            return;
        }
        if p.client.update(rng, node, &coord, rtt).is_ok() {
            p.stamp = now.max(p.stamp + 1);
            p.learn(node, coord, stamp);
            *index += 1;
        }
    }

    /// A coordinate heard of (an exchange's caller, a table); `false` if it was not newer.
    pub fn learn(&self, wan: bool, node: &str, coord: Coordinate, stamp: u64) -> bool {
        let mut g = self.lock();
        let p = if wan { &mut g.wan } else { &mut g.lan };
        let kept = p.learn(node, coord, stamp);
        if kept {
            g.index += 1;
        }
        kept
    }

    /// Every coordinate known in a pool, this node's included.
    pub fn table(&self, wan: bool) -> Vec<CoordEntry> {
        let g = self.lock();
        let p = if wan { &g.wan } else { &g.lan };
        let mut out: Vec<CoordEntry> =
            p.known.iter().map(|(n, (c, s))| CoordEntry { node: n.clone(), coord: c.clone(), stamp: *s }).collect();
        if !p.me.is_empty() {
            out.push(CoordEntry { node: p.me.clone(), coord: p.client.coordinate().clone(), stamp: p.stamp });
        }
        out
    }

    /// `node`'s coordinate in a pool, if known.
    pub fn coordinate_of(&self, wan: bool, node: &str) -> Option<Coordinate> {
        let g = self.lock();
        if wan { g.wan.coordinate_of(node) } else { g.lan.coordinate_of(node) }
    }

    /// Sets a node's LAN coordinate (`PUT /v1/coordinate/update`), this node's own included,
    /// stamped `now`.
    pub fn set_lan(&self, node: &str, coord: Coordinate, now: u64) {
        let mut g = self.lock();
        if node == g.lan.me {
            if g.lan.client.set_coordinate(coord).is_ok() {
                g.lan.stamp = now.max(g.lan.stamp + 1);
                g.index += 1;
            }
        } else if g.lan.learn(node, coord, now) {
            g.index += 1;
        }
    }

    /// Forget a node's round-trip samples and coordinate (it left).
    pub fn forget(&self, wan: bool, node: &str) {
        let mut g = self.lock();
        let p = if wan { &mut g.wan } else { &mut g.lan };
        p.client.forget_node(node);
        p.known.remove(node);
    }

    /// Changes so far (the index of the coordinate endpoints' blocking queries).
    pub fn index(&self) -> u64 {
        self.lock().index
    }
}

/// Routes of the coordinate API.
pub fn routes() -> Router<Api> {
    Router::new()
        .route("/v1/coordinate/datacenters", get(datacenters))
        .route("/v1/coordinate/nodes", get(nodes))
        .route("/v1/coordinate/node/{node}", get(node))
        .route("/v1/coordinate/update", put(update))
}

/// Consul's initial coordinate (`coordinate.NewCoordinate` with the default config): a node
/// nothing was heard of yet.
fn origin() -> Coordinate {
    Coordinate::new(&Config::default())
}

/// Every catalog node with its LAN coordinate, and the index to report.
fn all(api: &Api) -> (Vec<Value>, u64) {
    let state = api.control.published.state.load();
    let list = state
        .catalog
        .nodes
        .keys()
        .map(|n| {
            let c = api.coordinates.coordinate_of(false, n).unwrap_or_else(origin);
            json!({"Node": n, "Segment": "", "Coord": c})
        })
        .collect();
    (list, api.coordinates.index().max(state.topic_index("nodes")))
}

/// The WAN pool's servers by datacenter (not left), each with its coordinate if known: this
/// server's own first in its datacenter.
pub(crate) fn wan_servers(api: &Api) -> BTreeMap<String, Vec<(String, Option<Coordinate>)>> {
    let mut out: BTreeMap<String, Vec<(String, Option<Coordinate>)>> = BTreeMap::new();
    let Some(members) = api.cluster.as_ref().and_then(|c| c.wan_members()) else { return out };
    for m in members.into_iter().filter(|m| m.status != crate::gossip::MemberStatus::Left) {
        let c = api.coordinates.coordinate_of(true, &m.name);
        out.entry(m.datacenter).or_default().push((m.name, c));
    }
    for servers in out.values_mut() {
        servers.sort_by(|a, b| a.0.cmp(&b.0));
    }
    out
}

/// Sorts `list` by the estimated LAN round trip from the node `?near=` names (`_agent`: the
/// node the request came to) to each entry's node (`node_of`); entries whose node has no
/// coordinate go last, in their order. Without `?near=`, or when the source node has no
/// coordinate, the list is left as it is (as Consul).
pub fn sort_near(api: &Api, q: &Params, list: &mut [Value], node_of: impl Fn(&Value) -> Option<&str>) {
    let Some(near) = q.get("near").filter(|n| !n.is_empty()) else { return };
    let source = if near == "_agent" { api.info.node.as_str() } else { near.as_str() };
    let Some(from) = api.coordinates.coordinate_of(false, source) else { return };
    let dist = |v: &Value| -> Option<f64> {
        let n = node_of(v)?;
        if n == source {
            return Some(0.0);
        }
        from.distance_to(&api.coordinates.coordinate_of(false, n)?)
    };
    let mut keyed: Vec<(Option<f64>, Value)> = list.iter_mut().map(|v| (dist(v), v.take())).collect();
    keyed.sort_by(|a, b| match (a.0, b.0) {
        (Some(x), Some(y)) => x.total_cmp(&y),
        (Some(_), None) => std::cmp::Ordering::Less,
        (None, Some(_)) => std::cmp::Ordering::Greater,
        (None, None) => std::cmp::Ordering::Equal,
    });
    for (slot, (_, v)) in list.iter_mut().zip(keyed) {
        *slot = v;
    }
}

async fn datacenters(State(api): State<Api>, RawQuery(raw): RawQuery) -> Response {
    let q = Params::parse(raw.as_deref());
    let mut by_dc = wan_servers(&api);
    // A node in no WAN pool (`mesh dev`) lists itself, as a Consul dev agent.
    let own = by_dc.entry(api.info.datacenter.clone()).or_default();
    if own.is_empty() && api.cluster.as_ref().and_then(|c| c.wan_members()).is_none() {
        own.push((api.info.node.clone(), Some(api.coordinates.own(true).0)));
    }
    // Nearest first, as Consul's list (which sorts by the same median).
    let order = super::consul::datacenter_distances(&api);
    let body: Vec<Value> = order
        .iter()
        .filter_map(|(dc, _)| by_dc.get(dc).map(|s| (dc, s)))
        .map(|(dc, servers)| {
            // Consul shows a server's short name (its WAN member name without `.<dc>`), the
            // name its own datacenter knows it by (py-consul's suite updates it with that).
            let suffix = format!(".{dc}");
            let coords: Vec<Value> = servers
                .iter()
                .filter_map(|(name, c)| {
                    let short = name.strip_suffix(&suffix).unwrap_or(name);
                    c.as_ref().map(|c| json!({"Node": short, "Coord": c}))
                })
                .collect();
            json!({"Datacenter": dc, "AreaID": "wan", "Coordinates": coords})
        })
        .collect();
    reply(&Value::Array(body), &q)
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
    let coord = Coordinate { vec, error: num("Error")?, adjustment: num("Adjustment")?, height: num("Height")? };
    let state = api.control.published.state.load();
    // As Consul's state store: updates for nodes the catalog does not know are ignored.
    if state.catalog.nodes.contains_key(&node) {
        let now = api.control.published.clock.now();
        api.coordinates.set_lan(&node, coord, now);
    }
    Ok(reply(&json!(true), &q))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(x: f64) -> Coordinate {
        let mut c = origin();
        c.vec[0] = x;
        c
    }

    #[test]
    fn the_newest_coordinate_wins_and_bad_ones_are_not_kept() {
        let c = Coordinates::new("n1", "dc1", 1);
        assert!(c.learn(false, "n2", at(0.5), 10));
        assert!(!c.learn(false, "n2", at(0.9), 9), "an older stamp");
        assert_eq!(c.coordinate_of(false, "n2"), Some(at(0.5)));
        assert!(c.learn(false, "n2", at(0.7), 11));
        assert_eq!(c.coordinate_of(false, "n2"), Some(at(0.7)));
        // This node's own coordinate is its own to compute.
        assert!(!c.learn(false, "n1", at(3.0), 99));
        let mut nan = at(0.1);
        nan.height = f64::NAN;
        assert!(!c.learn(false, "n3", nan, 1));
        let short = Coordinate { vec: vec![0.0; 2], ..origin() };
        assert!(!c.learn(false, "n3", short, 1));
        assert_eq!(c.coordinate_of(false, "n3"), None);
        // The pools are apart; the WAN names this node `<node>.<dc>`.
        assert_eq!(c.coordinate_of(true, "n2"), None);
        assert_eq!(c.coordinate_of(true, "n1.dc1"), Some(origin()));
        let names: Vec<String> = c.table(false).into_iter().map(|e| e.node).collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }

    #[test]
    fn observations_move_this_node_and_keep_the_peer() {
        let c = Coordinates::new("n1", "dc1", 1);
        for i in 0..30 {
            c.observe(true, "n2.dc2", at(0.0), i, Duration::from_millis(50), 1000 + i);
        }
        let (me, stamp) = c.own(true);
        let d = me.distance_to(&at(0.0)).unwrap();
        assert!((d - 0.05).abs() < 0.01, "{d}");
        assert!(stamp >= 1000);
        assert_eq!(c.coordinate_of(true, "n2.dc2"), Some(at(0.0)));
        assert_eq!(c.own(false).0, origin(), "the LAN coordinate did not move");
        c.forget(true, "n2.dc2");
        assert_eq!(c.coordinate_of(true, "n2.dc2"), None);
    }
}
