//! An agent's connection to the servers. It stands in for the control task on the agent: the
//! agent loop, health checks, Consul checks and the Registrator watcher send it the same
//! [`ControlMsg`]s they would send the control task in `mesh dev`, and it
//! - keeps one connection to a server, trying the known servers in turn with backoff;
//! - opens the agent's session on it (after asking the agent loop to register afresh, so the
//!   server reconciles against what runs now) and hands the server's messages to the agent loop;
//! - numbers every report, keeps it in the [`Outbox`] until the server acknowledges it, and
//!   sends it again after a reconnect.

use super::outbox::Outbox;
use crate::control::ControlMsg;
use crate::rpc::{Conn, Hello, Item, NoHandler, Request, Response, Role, RpcError, Transport};
use mesh_core::model::AgentId;
use mesh_core::proto::{ToAgent, ToControl};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

/// Settings of an uplink.
#[derive(Clone)]
pub struct UplinkConfig {
    /// The agent's id (its node name).
    pub agent: AgentId,
    /// The node id of its data dir: its incarnation.
    pub node_id: String,
    /// Datacenter.
    pub datacenter: String,
    /// Servers' RPC addresses to try, in order.
    pub servers: Arc<std::sync::Mutex<Vec<SocketAddr>>>,
    /// How to reach them.
    pub transport: Arc<dyn Transport>,
}

/// Reports per call.
const REPORT_BATCH: usize = 512;
/// Time a server has to acknowledge a report.
const REPORT_TIMEOUT: Duration = Duration::from_secs(3);
/// Reconnect backoff: first and longest wait.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(5));

enum Event {
    Connected(Conn),
    Acked(Result<u64, RpcError>),
    /// The connection of this generation ended.
    SessionEnded(u64, String),
    /// The server of this generation took the session (it leads): the connection is shown to
    /// the replica and the HTTP forwarder.
    SessionUp(u64),
}

/// Start the uplink. `rx` receives what the agent's components send to "control". Returns the
/// connection watch (the replica and the HTTP forwarder use the same connection).
pub fn spawn(
    cfg: UplinkConfig,
    mut outbox: Outbox,
    rx: mpsc::Receiver<ControlMsg>,
) -> (super::Link, Pending, tokio::task::JoinHandle<()>) {
    // The agent is back: a goodbye its last run did not deliver no longer holds.
    outbox.forget(|m| matches!(m, ToControl::Goodbye { .. }));

    let (link_tx, link) = watch::channel(None);
    let (pending_tx, pending) = watch::channel(outbox.len());
    let up = Uplink {
        pending: pending_tx,
        cfg,
        outbox,
        link: link_tx,
        conn: None,
        session: false,
        to_agent: None,
        register: None,
        reporting: false,
        connecting: false,
        generation: 0,
        backoff: BACKOFF.0,
        hint: None,
    };
    (link, pending, tokio::spawn(up.run(rx)))
}

/// How many reports wait for a server's acknowledgement.
pub type Pending = watch::Receiver<usize>;

struct Uplink {
    pending: watch::Sender<usize>,
    cfg: UplinkConfig,
    outbox: Outbox,
    link: watch::Sender<Option<Conn>>,
    conn: Option<Conn>,
    /// Whether the session is open on `conn`.
    session: bool,
    to_agent: Option<mpsc::Sender<ToAgent>>,
    /// The agent's registration, once it sent one on the current connection.
    register: Option<ToControl>,
    /// A report call is in flight.
    reporting: bool,
    connecting: bool,
    /// Counts connections, so the end of an old one is not taken for the current one's.
    generation: u64,
    backoff: Duration,
    /// The leader a server that does not lead named: tried first on the next connect.
    hint: Option<std::net::SocketAddr>,
}

/// The leader's RPC address in a server's refusal (`... leader at ADDR`).
fn leader_hint(why: &str) -> Option<std::net::SocketAddr> {
    let (_, rest) = why.split_once("leader at ")?;
    rest.split(|c: char| c.is_whitespace() || c == ')' || c == ',').next()?.parse().ok()
}

impl Uplink {
    async fn run(mut self, mut rx: mpsc::Receiver<ControlMsg>) {
        let (ev_tx, mut ev) = mpsc::channel::<Event>(16);
        self.connect(&ev_tx);
        loop {
            tokio::select! {
                msg = rx.recv() => {
                    let Some(msg) = msg else { break };
                    let mut batch = vec![msg];
                    while batch.len() < 1024 {
                        match rx.try_recv() {
                            Ok(m) => batch.push(m),
                            Err(_) => break,
                        }
                    }
                    self.messages(batch, &ev_tx).await;
                }
                Some(e) = ev.recv() => self.event(e, &ev_tx).await,
            }
            self.report(&ev_tx);
            self.pending.send_if_modified(|p| std::mem::replace(p, self.outbox.len()) != self.outbox.len());
        }
        debug!("uplink stopped");
    }

    async fn messages(&mut self, batch: Vec<ControlMsg>, ev_tx: &mpsc::Sender<Event>) {
        let mut reports = Vec::new();
        for msg in batch {
            match msg {
                ControlMsg::AgentConnected(_, tx) => self.to_agent = Some(tx),
                ControlMsg::FromAgent(reg @ ToControl::Register { .. }) => {
                    self.register = Some(reg);
                    self.open_session(ev_tx);
                }
                ControlMsg::FromAgent(m) => reports.push(m),
                ControlMsg::Reports(ms, reply) => {
                    reports.extend(ms);
                    let _ = reply.send(());
                }
                ControlMsg::Drain(reply) => {
                    let _ = reply.send(());
                }
                // Writes reach a server as HTTP requests (see `forward`); nothing proposes here.
                ControlMsg::Propose(_, reply) => {
                    let _ = reply.send(Err(crate::control::ControlError::Log(
                        "an agent does not write the state; send writes to a server".into(),
                    )));
                }
                ControlMsg::AgentGone(..) | ControlMsg::Mesos(_) | ControlMsg::Members(_) => {}
            }
        }
        if !reports.is_empty() {
            let n = reports.len();
            if let Err(e) = self.outbox.push(reports) {
                warn!(error = %e, "outbox: cannot write reports to disk; they are kept in memory");
            }
            if !self.session {
                info!(
                    new = n,
                    pending = self.outbox.len(),
                    "uplink: no server; reports kept until one acknowledges them"
                );
            }
        }
    }

    async fn event(&mut self, e: Event, ev_tx: &mpsc::Sender<Event>) {
        match e {
            Event::Connected(conn) => {
                self.connecting = false;
                self.backoff = BACKOFF.0;
                info!(server = %conn.peer().hello.node, addr = %conn.peer().addr, "uplink: connected");
                self.conn = Some(conn.clone());
                self.generation += 1;
                let generation = self.generation;
                self.session = false;
                self.register = None;
                // A fresh registration, with what runs now, opens the session.
                if let Some(tx) = &self.to_agent {
                    let _ = tx.send(ToAgent::Reregister).await;
                }
                let ev = ev_tx.clone();
                tokio::spawn(async move {
                    conn.closed().await;
                    let _ = ev.send(Event::SessionEnded(generation, "connection closed".into())).await;
                });
            }
            Event::SessionUp(generation) => {
                if generation == self.generation
                    && let Some(conn) = &self.conn
                {
                    let _ = self.link.send(Some(conn.clone()));
                }
            }
            Event::Acked(Ok(upto)) => {
                self.reporting = false;
                self.outbox.ack(upto);
            }
            Event::Acked(Err(e)) => {
                self.reporting = false;
                debug!(error = %e, pending = self.outbox.len(), "uplink: reports not acknowledged; sent again later");
                if matches!(e, RpcError::Timeout(..)) {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
            Event::SessionEnded(generation, why) => {
                if generation != self.generation {
                    return;
                }
                if let Some(conn) = self.conn.take() {
                    warn!(reason = %why, "uplink: lost the server; reconnecting");
                    conn.close();
                }
                self.session = false;
                let _ = self.link.send(None);
                self.hint = leader_hint(&why);
                if self.hint.is_none() && why.contains("not the leader") {
                    // An election: no one to go to yet.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                self.connect(ev_tx);
            }
        }
    }

    /// Connect in the background: each known server in turn, with backoff between rounds.
    fn connect(&mut self, ev_tx: &mpsc::Sender<Event>) {
        if self.connecting || self.conn.is_some() {
            return;
        }
        self.connecting = true;
        let cfg = self.cfg.clone();
        let ev = ev_tx.clone();
        let mut backoff = self.backoff;
        let hint = self.hint.take();
        tokio::spawn(async move {
            let hello = Hello {
                node: cfg.agent.0.clone(),
                node_id: cfg.node_id.clone(),
                datacenter: cfg.datacenter.clone(),
                role: Role::Agent,
                http: None,
            };
            let mut round = 0u32;
            loop {
                let mut servers = cfg.servers.lock().unwrap_or_else(|e| e.into_inner()).clone();
                if round == 0
                    && let Some(h) = hint
                {
                    servers.retain(|a| *a != h);
                    servers.insert(0, h);
                } else if !servers.is_empty() {
                    // Not always the same first server: one that keeps refusing sessions (it
                    // does not lead) does not starve the others.
                    let n = servers.len();
                    servers.rotate_left(round as usize % n);
                }
                for addr in &servers {
                    match Conn::connect(cfg.transport.as_ref(), *addr, hello.clone(), Arc::new(NoHandler)).await {
                        Ok(conn) => {
                            let _ = ev.send(Event::Connected(conn)).await;
                            return;
                        }
                        Err(e) => {
                            if round.is_power_of_two() {
                                warn!(server = %addr, error = %e, "uplink: cannot reach a server; retrying");
                            }
                        }
                    }
                }
                round += 1;
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF.1);
                if ev.is_closed() {
                    return;
                }
            }
        });
    }

    /// Open the session once connected and registered.
    fn open_session(&mut self, ev_tx: &mpsc::Sender<Event>) {
        let (Some(conn), Some(register), Some(to_agent)) =
            (self.conn.clone(), self.register.clone(), self.to_agent.clone())
        else {
            return;
        };
        if self.session {
            return;
        }
        self.session = true;
        let ev = ev_tx.clone();
        let generation = self.generation;
        tokio::spawn(async move {
            let mut up = false;
            let why = match conn.open(Request::AgentSession { register }).await {
                Err(e) => e.to_string(),
                Ok(mut stream) => loop {
                    let next = tokio::time::timeout(super::replication::HEARTBEAT * 5, stream.next());
                    let Ok(next) = next.await else { break "no heartbeat from the server".to_owned() };
                    if !up && matches!(next, Some(Ok(_))) {
                        // The server answers on the session (a refusal ends it at once instead).
                        up = true;
                        let _ = ev.send(Event::SessionUp(generation)).await;
                    }
                    match next {
                        Some(Ok(Item::Heartbeat { .. })) => {}
                        Some(Ok(Item::ToAgent(m))) => {
                            // A stopping agent reads no more; its reports still go out on this
                            // connection, so the session stays.
                            let _ = to_agent.send(m).await;
                        }

                        Some(Ok(other)) => debug!(?other, "uplink: unexpected item on the session"),
                        Some(Err(e)) => break e.to_string(),
                        None => break "the server ended the session".to_owned(),
                    }
                },
            };
            // The connection goes too: the next one starts a fresh session.
            conn.close();
            let _ = ev.send(Event::SessionEnded(generation, why)).await;
        });
    }

    /// Send the oldest pending reports, one call at a time.
    fn report(&mut self, ev_tx: &mpsc::Sender<Event>) {
        if self.reporting || !self.session || self.outbox.is_empty() {
            return;
        }
        let Some(conn) = self.conn.clone() else { return };
        self.reporting = true;
        let items = self.outbox.batch(REPORT_BATCH);
        let req = Request::Report { agent: self.cfg.agent.clone(), incarnation: self.cfg.node_id.clone(), items };
        let ev = ev_tx.clone();
        tokio::spawn(async move {
            let r = match conn.call(req, REPORT_TIMEOUT).await {
                Ok(Response::Ack { upto }) => Ok(upto),
                Ok(other) => Err(RpcError::Protocol(format!("unexpected answer to a report: {other:?}"))),
                Err(e) => Err(e),
            };
            let _ = ev.send(Event::Acked(r)).await;
        });
    }
}
