//! A server's RPC handler: agents' sessions and reports, the state stream, forwarded requests.

use super::forward::Executor;
use super::replication::Replication;
use crate::control::{ControlHandle, ControlMsg};
use crate::rpc::{Handler, Item, Peer, RemoteError, Request, Response, Role, Sink};
use mesh_core::model::AgentId;
use mesh_core::proto::{ToAgent, ToControl};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

/// Messages queued for one agent's session (the control loop never waits on it: when full,
/// they wait in the control loop's own per-agent queue).
const SESSION_QUEUE: usize = 1024;
/// How long the control loop has to record a report before the agent is told to retry.
const RECORD_TIMEOUT: Duration = Duration::from_secs(8);

/// Serves agents and replicas on a server.
pub struct ServerHandler {
    control: ControlHandle,
    replication: Replication,
    /// Per agent: its incarnation and the highest report number recorded.
    acked: Mutex<HashMap<AgentId, (String, u64)>>,
    http: Executor,
    /// With Raft: the Raft RPCs, and where the leader is (only the leader's control loop takes
    /// agents' sessions and reports; the others send agents to it).
    raft: Option<(crate::raft::RaftHandler, tokio::sync::watch::Receiver<super::forward::Route>)>,
    /// The node's network coordinates, for the coordinate exchange (`None`: not served).
    coords: Option<std::sync::Arc<crate::api::consul_coordinate::Coordinates>>,
}

impl ServerHandler {
    /// A handler over this server's control loop.
    pub fn new(control: ControlHandle, replication: Replication, http: Executor) -> ServerHandler {
        ServerHandler { control, replication, acked: Mutex::new(HashMap::new()), http, raft: None, coords: None }
    }

    /// Serve Raft's RPCs through `handler`, and take agents only while `route` says this
    /// server leads.
    pub fn with_raft(
        mut self,
        handler: crate::raft::RaftHandler,
        route: tokio::sync::watch::Receiver<super::forward::Route>,
    ) -> ServerHandler {
        self.raft = Some((handler, route));
        self
    }

    /// Answer the coordinate exchange with `coords`.
    pub fn with_coords(mut self, coords: std::sync::Arc<crate::api::consul_coordinate::Coordinates>) -> ServerHandler {
        self.coords = Some(coords);
        self
    }

    /// `Err(why)` when agents must go elsewhere: this server does not lead (the reason names
    /// the leader's RPC address, as `leader at ADDR`, for the agent to go there).
    fn not_leading(&self) -> Result<(), String> {
        let Some((_, route)) = &self.raft else { return Ok(()) };
        match &*route.borrow() {
            super::forward::Route::Local => Ok(()),
            super::forward::Route::Remote(conn) => Err(format!("not the leader; leader at {}", conn.peer().addr)),
            super::forward::Route::NoLeader => Err("not the leader; no cluster leader yet".into()),
        }
    }

    /// Record reports with numbers above what was recorded; the highest number recorded.
    async fn report(
        &self,
        peer: &Peer,
        agent: AgentId,
        incarnation: String,
        items: Vec<(u64, ToControl)>,
    ) -> Result<u64, RemoteError> {
        if peer.hello.role != Role::Agent || peer.hello.node != agent.0 || peer.hello.node_id != incarnation {
            warn!(peer = %peer.addr, node = %peer.hello.node, claimed = %agent, "reports for another agent: refused");
            return Err(RemoteError::Refused(format!("node {} cannot report for agent {agent}", peer.hello.node)));
        }
        self.not_leading().map_err(RemoteError::Unavailable)?;
        let upto = {
            let mut acked = self.acked.lock().unwrap_or_else(|e| e.into_inner());
            let e = acked.entry(agent.clone()).or_insert_with(|| (incarnation.clone(), 0));
            if e.0 != incarnation {
                *e = (incarnation.clone(), 0);
            }
            e.1
        };
        let last = items.last().map(|(s, _)| *s).unwrap_or(upto);
        let fresh: Vec<ToControl> =
            items.into_iter().filter(|(seq, _)| *seq > upto).map(|(_, m)| m).filter(|m| owned_by(m, &agent)).collect();
        if !fresh.is_empty() {
            let (tx, rx) = oneshot::channel();
            self.control
                .send(ControlMsg::Reports(fresh, tx))
                .await
                .map_err(|_| RemoteError::Unavailable("the server is stopping".into()))?;
            match tokio::time::timeout(RECORD_TIMEOUT, rx).await {
                Ok(Ok(())) => {}
                _ => return Err(RemoteError::Unavailable("the reports could not be recorded yet".into())),
            }
        }
        let mut acked = self.acked.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = acked.get_mut(&agent)
            && e.0 == incarnation
        {
            e.1 = e.1.max(last);
        }
        Ok(last.max(upto))
    }

    async fn session(&self, peer: Peer, register: ToControl, sink: Sink) {
        let ToControl::Register { agent_id, .. } = &register else {
            return sink.end(Some("a session starts with a registration".into()));
        };
        if peer.hello.role != Role::Agent || peer.hello.node != agent_id.0 {
            warn!(peer = %peer.addr, node = %peer.hello.node, claimed = %agent_id, "agent session for another node: refused");
            return sink.end(Some(format!("node {} cannot register as {agent_id}", peer.hello.node)));
        }
        if let Err(why) = self.not_leading() {
            return sink.end(Some(why));
        }
        let agent = agent_id.clone();
        info!(%agent, addr = %peer.addr, incarnation = %peer.hello.node_id, "agent session opened");
        let (tx, mut rx) = mpsc::channel::<ToAgent>(SESSION_QUEUE);
        if self.control.send(ControlMsg::AgentConnected(agent.clone(), tx.clone())).await.is_err()
            || self.control.send(ControlMsg::FromAgent(register)).await.is_err()
        {
            return sink.end(Some("the server is stopping".into()));
        }
        // A heartbeat while nothing else goes: the agent knows its session lives (and opens a
        // new one when heartbeats stop, e.g. after a lost frame).
        let mut beat = tokio::time::interval(super::replication::HEARTBEAT);
        beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // With Raft, the session ends with this server's leadership (the agent finds the next
        // leader; the next loop here would not know this session).
        let mut route = self.raft.as_ref().map(|(_, r)| r.clone());
        let leading_ends = async move {
            match &mut route {
                Some(r) => {
                    let _ = r.wait_for(|r| !matches!(r, super::forward::Route::Local)).await;
                }
                None => std::future::pending().await,
            }
        };
        tokio::pin!(leading_ends);
        loop {
            tokio::select! {
                m = rx.recv() => match m {
                    Some(m) => if !sink.send(Item::ToAgent(m)).await { break },
                    None => break,
                },
                () = &mut leading_ends => {
                    info!(%agent, "this server no longer leads: the agent's session ends");
                    break;
                }
                _ = beat.tick() => if !sink.send(Item::Heartbeat { index: 0 }).await { break },
                () = sink.closed() => break,
            }
        }
        info!(%agent, "agent session closed");
        let _ = self.control.send(ControlMsg::AgentGone(agent, tx)).await;
    }
}

/// Whether a report is about the reporting agent's own node (check results and service sets
/// name their node; task updates are checked against the task's owner by the control loop).
fn owned_by(m: &ToControl, agent: &AgentId) -> bool {
    let ok = match m {
        ToControl::Register { agent_id, .. }
        | ToControl::CheckResults { agent_id, .. }
        | ToControl::Services { agent_id, .. }
        | ToControl::Goodbye { agent_id, .. } => agent_id == agent,
        ToControl::Status(u) => &u.agent_id == agent,
        ToControl::Health { .. } => true,
    };
    if !ok {
        warn!(%agent, "a report about another node: refused");
    }
    ok
}

impl ServerHandler {
    /// Whether `peer` is a server of another datacenter (it may send only `?dc=` requests).
    fn foreign(&self, peer: &Peer) -> bool {
        peer.hello.datacenter != self.control.published.state.load().catalog.datacenter
    }
}

#[async_trait::async_trait]
impl Handler for ServerHandler {
    async fn call(&self, peer: &Peer, req: Request) -> Result<Response, RemoteError> {
        let wan_exchange = matches!(&req, Request::Coordinate(r) if r.wan);
        if self.foreign(peer) && !matches!(req, Request::Http(_) | Request::Echo(_)) && !wan_exchange {
            // A server of another datacenter sends only what a client sent it with `?dc=`, and
            // the WAN coordinate exchange.
            return Err(RemoteError::Refused(format!("{} from datacenter {}", req.name(), peer.hello.datacenter)));
        }
        match req {
            Request::Report { agent, incarnation, items } => {
                self.report(peer, agent, incarnation, items).await.map(|upto| Response::Ack { upto })
            }
            Request::Http(r) => Ok(Response::Http(self.http.serve(r).await)),
            Request::Echo(s) => Ok(Response::Echo(s)),
            Request::Coordinate(r) => match &self.coords {
                // The WAN pool is the servers'.
                Some(_) if r.wan && peer.hello.role != Role::Server => {
                    Err(RemoteError::Refused("the WAN coordinates are exchanged between servers".into()))
                }
                Some(c) => super::coords::serve(c, peer, r),
                None => Err(RemoteError::NotServed("Coordinate".into())),
            },
            Request::Raft(r) => match &self.raft {
                Some((raft, _)) => raft.handle(r).await,
                None => Err(RemoteError::NotServed(r.name().into())),
            },
            other => Err(RemoteError::NotServed(format!("{} is a stream", other.name()))),
        }
    }

    async fn open(&self, peer: Peer, req: Request, sink: Sink) {
        if self.foreign(&peer) {
            return sink.end(Some(format!("{} from datacenter {}", req.name(), peer.hello.datacenter)));
        }
        match req {
            Request::AgentSession { register } => self.session(peer, register, sink).await,
            Request::Replicate { from } => {
                self.replication.serve(&self.control.published, from, &peer.hello.node, sink).await
            }
            other => sink.end(Some(format!("{} is not a stream", other.name()))),
        }
    }
}
