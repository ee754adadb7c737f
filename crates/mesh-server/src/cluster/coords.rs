//! Measuring network coordinates: every node times a small RPC, the coordinate exchange
//! ([`Request::Coordinate`]), to a random alive member of its LAN pool every probe period, and
//! a server does the same in the WAN pool, each pool moving its own Vivaldi coordinate
//! ([`crate::api::consul_coordinate::Coordinates`]), as Consul does from its gossip probes.
//! Each exchange carries the caller's coordinate, the answer the callee's; every
//! [`TABLE_EVERY`] rounds a node also exchanges with every alive server of the pool and asks
//! for the coordinates it knows, so every server knows every node (and every agent the rest of
//! its datacenter) within seconds.

use crate::api::consul_coordinate::Coordinates;
use crate::gossip::{Member, MemberStatus, Role};
use crate::rpc::msg::{CoordinateReply, CoordinateRequest};
use crate::rpc::{Conn, Handler, Hello, NoHandler, Peer, RemoteError, Request, Response, Sink, Transport};
use mesh_core::model::Clock;
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tracing::debug;

/// Every this many rounds a node exchanges with every alive server and takes its table.
pub const TABLE_EVERY: u64 = 5;
/// How long one exchange may take (a WAN round trip, test delays included).
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(5);
/// The first minor protocol version that knows [`Request::Coordinate`].
const MINOR_COORDINATE: u16 = 2;

/// Answers a coordinate exchange: keeps the caller's coordinate (under the connection's node
/// name, `<node>.<dc>` on the WAN, so a node sets only its own) and answers with this node's.
pub fn serve(coords: &Coordinates, peer: &Peer, req: CoordinateRequest) -> Result<Response, RemoteError> {
    if req.coord.vec.len() != mesh_core::coordinate::Config::default().dimensionality || !req.coord.is_valid() {
        return Err(RemoteError::Refused("a coordinate of 8 finite dimensions is expected".into()));
    }
    let name = if req.wan { format!("{}.{}", peer.hello.node, peer.hello.datacenter) } else { peer.hello.node.clone() };
    coords.learn(req.wan, &name, req.coord, req.stamp);
    let (coord, stamp) = coords.own(req.wan);
    let table = if req.want_table { coords.table(req.wan) } else { Vec::new() };
    Ok(Response::Coordinate(CoordinateReply { coord, stamp, table }))
}

/// An agent's RPC handler: it serves only the LAN coordinate exchange (and echo).
pub struct AgentHandler {
    /// The agent's coordinates.
    pub coords: Arc<Coordinates>,
    /// Its datacenter: peers of another one are refused by the RPC layer already.
    pub datacenter: String,
}

#[async_trait::async_trait]
impl Handler for AgentHandler {
    async fn call(&self, peer: &Peer, req: Request) -> Result<Response, RemoteError> {
        match req {
            Request::Coordinate(r) if !r.wan && peer.hello.datacenter == self.datacenter => {
                serve(&self.coords, peer, r)
            }
            Request::Echo(s) => Ok(Response::Echo(s)),
            other => Err(RemoteError::NotServed(other.name().into())),
        }
    }
    async fn open(&self, _peer: Peer, req: Request, sink: Sink) {
        sink.end(Some(format!("not served here: {}", req.name())));
    }
}

/// What a prober needs.
pub struct ProberConfig {
    /// The WAN pool (else the LAN).
    pub wan: bool,
    /// This node's name in the pool (`<node>.<dc>` on the WAN).
    pub me: String,
    /// Where the coordinates go.
    pub coords: Arc<Coordinates>,
    /// The pool's members.
    pub members: watch::Receiver<Arc<Vec<Member>>>,
    /// How to reach them.
    pub transport: Arc<dyn Transport>,
    /// This node's hello.
    pub hello: Hello,
    /// Time between rounds.
    pub period: Duration,
    /// Stamps of this node's coordinates.
    pub clock: Arc<dyn Clock>,
    /// Seed of the choice of peers.
    pub seed: u64,
}

/// Connections kept to the peers probed, by RPC address.
type Conns = Arc<Mutex<HashMap<SocketAddr, Conn>>>;

/// Starts probing: a round every `period` until the task is aborted.
pub fn spawn(cfg: ProberConfig) -> tokio::task::JoinHandle<()> {
    let cfg = Arc::new(cfg);
    tokio::spawn(async move {
        let conns: Conns = Arc::default();
        let mut rng = rand::rngs::StdRng::seed_from_u64(cfg.seed);
        let mut tick = tokio::time::interval(cfg.period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut round: u64 = 0;
        let mut known: Vec<String> = Vec::new();
        loop {
            tick.tick().await;
            round += 1;
            let members: Vec<Member> = cfg.members.borrow().iter().filter(|m| m.name != cfg.me).cloned().collect();
            // Members that left or failed: their samples and coordinates go.
            let alive: Vec<&Member> = members.iter().filter(|m| m.status == MemberStatus::Alive).collect();
            for gone in members.iter().filter(|m| matches!(m.status, MemberStatus::Left)) {
                if known.contains(&gone.name) {
                    cfg.coords.forget(cfg.wan, &gone.name);
                }
            }
            known = alive.iter().map(|m| m.name.clone()).collect();
            // Connections to nodes no longer alive close.
            conns.lock().unwrap_or_else(|e| e.into_inner()).retain(|addr, _| alive.iter().any(|m| m.rpc == *addr));
            if alive.is_empty() {
                continue;
            }
            let pick = alive[rng.random_range(0..alive.len())];
            let mut targets: Vec<(Member, bool)> = vec![(pick.clone(), false)];
            if round % TABLE_EVERY == 1 {
                for m in alive.iter().filter(|m| m.role == Role::Server) {
                    if m.name == pick.name {
                        targets[0].1 = true;
                    } else {
                        targets.push(((*m).clone(), true));
                    }
                }
            }
            for (m, want_table) in targets {
                let (cfg, conns) = (cfg.clone(), conns.clone());
                tokio::spawn(async move { exchange(&cfg, &conns, &m, want_table).await });
            }
        }
    })
}

/// One exchange with `m`: its coordinate and the round trip move this node's.
async fn exchange(cfg: &ProberConfig, conns: &Conns, m: &Member, want_table: bool) {
    let cached = conns.lock().unwrap_or_else(|e| e.into_inner()).get(&m.rpc).filter(|c| !c.is_closed()).cloned();
    let conn = match cached {
        Some(c) => c,
        None => {
            let c = match tokio::time::timeout(
                EXCHANGE_TIMEOUT,
                Conn::connect(cfg.transport.as_ref(), m.rpc, cfg.hello.clone(), Arc::new(NoHandler)),
            )
            .await
            {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => return debug!(peer = %m.name, error = %e, "coordinates: cannot connect"),
                Err(_) => return debug!(peer = %m.name, "coordinates: no connection in time"),
            };
            conns.lock().unwrap_or_else(|e| e.into_inner()).insert(m.rpc, c.clone());
            c
        }
    };
    if conn.peer().minor < MINOR_COORDINATE {
        // A node of an earlier version: it would close the connection on this request.
        return;
    }
    let (coord, stamp) = cfg.coords.own(cfg.wan);
    let req = Request::Coordinate(CoordinateRequest { wan: cfg.wan, coord, stamp, want_table });
    let started = tokio::time::Instant::now();
    match conn.call(req, EXCHANGE_TIMEOUT).await {
        Ok(Response::Coordinate(r)) => {
            let rtt = started.elapsed();
            cfg.coords.observe(cfg.wan, &m.name, r.coord, r.stamp, rtt, cfg.clock.now());
            for e in r.table {
                cfg.coords.learn(cfg.wan, &e.node, e.coord, e.stamp);
            }
        }
        Ok(other) => debug!(peer = %m.name, answer = ?other, "coordinates: unexpected answer"),
        Err(e) => {
            debug!(peer = %m.name, error = %e, "coordinates: exchange failed");
            conns.lock().unwrap_or_else(|e| e.into_inner()).remove(&m.rpc);
        }
    }
}
