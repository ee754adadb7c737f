//! A `mesh server` on Raft: the group's storage and network, how the group forms
//! (`--bootstrap-expect`), and the work that follows leadership.
//!
//! - Every server applies committed entries to its [`MeshStateMachine`], whose observer
//!   (`Feed`) publishes the state to the server's readers (HTTP, DNS, `/v2/events`) and to
//!   the agents' replication streams, before the proposer hears back.
//! - The control loop (allocator, Marathon scheduler, deployments, Mesos frameworks, agents'
//!   sessions) runs on the leader only, over a [`Store`] whose log is Raft ([`RaftLog`]). A new
//!   leader starts it once its state machine applied everything in its log, from that state.
//! - [`Route`] says where requests that only the leader answers go: here, to the leader over
//!   the internal RPC, or nowhere yet (an election).

use super::disk::DiskGuard;
use super::log::RaftLog;
use super::state_machine::ApplyObserver;
use super::{MeshNetwork, MeshNode, MeshStateMachine, NodeId, RaftHandler, RaftTiming, SegmentLogStore, TypeConfig};
use crate::cluster::forward::Route;
use crate::cluster::replication::Replication;
use crate::control::{self, ControlConfig, Inbox, Published};
use crate::events::batch_events;
use crate::gossip::{Member, MemberStatus, Role};
use crate::rpc::{Conn, Hello, NoHandler, Transport};
use mesh_core::model::Clock;
use mesh_core::state::{Command, State, Store};
use openraft::{ChangeMembers, Raft, ServerState};
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tracing::{info, warn};

/// Settings of a server's Raft.
#[derive(Clone)]
pub struct RaftServerConfig {
    /// This server's name.
    pub name: String,
    /// This server's node id (a UUID kept in its data dir); its Raft id derives from it.
    pub node_id: String,
    /// The datacenter (the group's name).
    pub datacenter: String,
    /// Where the Raft log, vote and snapshots live.
    pub dir: PathBuf,
    /// This server's advertised RPC address (where the others reach its Raft).
    pub rpc: SocketAddr,
    /// Form the group once this many servers know each other (1: alone, at once).
    pub bootstrap_expect: usize,
    /// Heartbeat and election timings.
    pub timing: RaftTiming,
    /// How long a write waits for a quorum before the caller gets an error.
    pub write_timeout: Duration,
    /// How this server reaches the others.
    pub transport: Arc<dyn Transport>,
    /// How it introduces itself.
    pub hello: Hello,
    /// The leader's control loop settings.
    pub control: ControlConfig,
    /// `--max-app-versions`, made a replicated setting by the first leader that sees it differ.
    pub max_app_versions: usize,
    /// Autopilot's "cleanup dead servers": a voter gossip declared failed (or left) for this
    /// long is removed from the group by the leader, never leaving fewer voters than a majority
    /// of the group alive. `None`: never.
    pub dead_server_cleanup: Option<Duration>,
    /// Bytes kept free beside the log (`--state-reserve-mb`) for commands that stop tasks while
    /// the disk is full.
    pub reserve_bytes: u64,
    /// When the leader and the members were last heard from (shared with the HTTP APIs).
    pub contacts: Arc<super::Contacts>,
}

/// The Raft id of a server: the first 64 bits of its node id (a UUID), so it is the same on
/// every restart and known to every member from gossip.
pub fn raft_id(node_id: &str) -> NodeId {
    match uuid::Uuid::parse_str(node_id) {
        Ok(u) => u.as_u64_pair().0,
        Err(_) => {
            // Not a UUID (hand-made data dir): a stable hash of it (FNV-1a).
            node_id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3))
        }
    }
}

/// Publishes what the state machine applies to the server's readers and to replication.
struct Feed {
    published: Published,
    index_tx: watch::Sender<u64>,
    replication: Replication,
    clock: Arc<dyn Clock>,
}

impl ApplyObserver for Feed {
    fn applied(&self, before: &State, commands: &[Command], after: &State) {
        if commands.iter().any(|c| matches!(c.inner(), Command::Restore { .. })) {
            // A whole new state (whose index may jump): replicas start again from it.
            return self.replaced(after);
        }
        self.replication.appended(before.index + 1, commands);
        if self.published.events.clients() > 0 {
            for e in batch_events(commands, before, after, self.clock.now()) {
                self.published.events.publish(e);
            }
        }
        self.published.publish(after, &self.index_tx);
    }

    fn replaced(&self, state: &State) {
        self.replication.reset(state.index);
        self.published.publish(state, &self.index_tx);
    }
}

/// A running server's Raft.
pub struct RaftServer {
    /// The Raft node.
    pub raft: Raft<TypeConfig>,
    /// Its id.
    pub id: NodeId,
    /// Serves the Raft RPCs (hand it to the RPC handler).
    pub handler: RaftHandler,
    /// Where requests only the leader answers go.
    pub route: watch::Receiver<Route>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// Errors starting a server's Raft.
#[derive(Debug, thiserror::Error)]
pub enum RaftServerError {
    /// The log or the state machine could not be opened.
    #[error("raft storage in {dir}: {why}")]
    Storage {
        /// The directory.
        dir: PathBuf,
        /// Why.
        why: String,
    },
    /// openraft refused the configuration or could not start.
    #[error("raft: {0}")]
    Start(String),
}

impl RaftServer {
    /// Open the storage in `cfg.dir`, start Raft, publish what it applies into `published` and
    /// `replication`, and run the control loop on `inbox` whenever this server leads.
    /// `members` is LAN gossip's view (servers that form or join the group).
    pub async fn start(
        cfg: RaftServerConfig,
        published: Published,
        index_tx: watch::Sender<u64>,
        replication: Replication,
        inbox: Inbox,
        members: watch::Receiver<Arc<Vec<Member>>>,
        route_tx: watch::Sender<Route>,
    ) -> Result<RaftServer, RaftServerError> {
        let storage = |e: &dyn std::fmt::Display| RaftServerError::Storage { dir: cfg.dir.clone(), why: e.to_string() };
        let id = raft_id(&cfg.node_id);
        let (log, sm) = {
            let (dir, dc) = (cfg.dir.clone(), cfg.datacenter.clone());
            super::blocking(openraft::ErrorSubject::Store, openraft::ErrorVerb::Read, move || {
                Ok((SegmentLogStore::open(&dir)?, MeshStateMachine::open(&dir, &dc)?))
            })
            .await
            .map_err(|e| storage(&e))?
        };
        let disk = {
            let (dir, bytes) = (cfg.dir.clone(), cfg.reserve_bytes);
            Arc::new(
                super::blocking(openraft::ErrorSubject::Store, openraft::ErrorVerb::Read, move || {
                    Ok(DiskGuard::open(&dir, bytes))
                })
                .await
                .map_err(|e| storage(&e))?,
            )
        };
        let mut sm = sm;
        let applied = sm.subscribe();
        let sizes = SnapshotSizes { log: log.appended_bytes(), snapshot: sm.snapshot_size() };
        sm.set_observer(Arc::new(Feed {
            published: published.clone(),
            index_tx,
            replication,
            clock: cfg.control.clock.clone(),
        }));
        let config = cfg.timing.config(&cfg.datacenter).map_err(|e| RaftServerError::Start(e.to_string()))?;
        let net = MeshNetwork::new(id, cfg.transport.clone(), cfg.hello.clone(), &cfg.timing)
            .with_contacts(cfg.contacts.clone());
        let raft =
            Raft::new(id, Arc::new(config), net, log, sm).await.map_err(|e| RaftServerError::Start(e.to_string()))?;
        let sm_applied = applied.clone();
        let handler = RaftHandler::new(raft.clone()).with_contacts(cfg.contacts.clone());
        let route = route_tx.subscribe();
        let sole_voter = {
            let m = raft.metrics().borrow().clone();
            m.membership_config.membership().voter_ids().eq([id])
        };
        if sole_voter {
            // Alone in its group (`mesh dev`, one server): nobody to wait for, so no election
            // timeout before it leads again after a restart.
            let _ = raft.trigger().elect().await;
        }
        info!(raft_id = id, bootstrap_expect = cfg.bootstrap_expect, "raft started");
        let tasks = vec![
            tokio::spawn(bootstrap(raft.clone(), id, cfg.clone(), members.clone())),
            tokio::spawn(follow_leadership(
                raft.clone(),
                id,
                cfg.clone(),
                LeaderParts { published: published.clone(), inbox, disk },
                applied,
                route_tx,
            )),
            tokio::spawn(snapshot_policy(raft.clone(), sizes, sm_applied)),
            tokio::spawn(add_servers(raft.clone(), id, cfg, members, published)),
        ];
        Ok(RaftServer { raft, id, handler, route, tasks })
    }

    /// Stop: no more Raft RPCs served, the control loop and Raft stopped.
    pub async fn shutdown(self) {
        self.handler.stop();
        for t in &self.tasks {
            t.abort();
        }
        for t in self.tasks {
            let _ = t.await;
        }
        let _ = self.raft.shutdown().await;
    }
}

/// This server as a member of the group.
fn me(cfg: &RaftServerConfig) -> MeshNode {
    MeshNode { name: cfg.name.clone(), rpc: cfg.rpc.to_string() }
}

/// The alive servers of this datacenter that gossip knows, with their Raft ids.
fn alive_servers(members: &[Member], dc: &str) -> BTreeMap<NodeId, MeshNode> {
    members
        .iter()
        .filter(|m| m.role == Role::Server && m.status == MemberStatus::Alive && m.datacenter == dc)
        .map(|m| (raft_id(&m.node_id), MeshNode { name: m.name.clone(), rpc: m.rpc.to_string() }))
        .collect()
}

/// Consul's `bootstrap_expect`: once `n` servers know each other, the one with the lowest Raft
/// id among the lowest `n` initializes the group with them (the same choice on every server,
/// so exactly one does it). A server whose storage already holds a group does nothing.
async fn bootstrap(
    raft: Raft<TypeConfig>,
    id: NodeId,
    cfg: RaftServerConfig,
    mut members: watch::Receiver<Arc<Vec<Member>>>,
) {
    if raft.is_initialized().await.unwrap_or(true) {
        return;
    }
    let expect = cfg.bootstrap_expect.max(1);
    loop {
        let mut servers = alive_servers(&members.borrow_and_update(), &cfg.datacenter);
        servers.insert(id, me(&cfg));
        if raft.metrics().borrow().current_leader.is_some() || raft.is_initialized().await.unwrap_or(true) {
            return;
        }
        if servers.len() >= expect {
            let chosen: BTreeMap<NodeId, MeshNode> = servers.into_iter().take(expect).collect();
            if chosen.keys().next() == Some(&id) {
                info!(members = ?chosen.values().map(|n| &n.name).collect::<Vec<_>>(), "raft: forming the group (bootstrap-expect {expect})");
                match raft.initialize(chosen).await {
                    Ok(()) => return,
                    Err(e) => warn!(error = %e, "raft: cannot initialize the group"),
                }
            } else if !chosen.contains_key(&id) {
                info!("raft: the group forms without this server; it joins when the leader adds it");
                return;
            }
        }
        tokio::select! {
            r = members.changed() => if r.is_err() { return },
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// On the leader: servers gossip knows that are not members join, as learners first (they
/// catch up), then as voters once they have stayed within `MaxTrailingLogs` of the leader for
/// `ServerStabilizationTime`; voters gossip has declared failed (or left) for
/// `dead_server_cleanup` are removed (autopilot), while the replicated autopilot configuration
/// says `CleanupDeadServers`, as long as the voters left alive are a majority of the group
/// without them and at least `MinQuorum` servers remain. Each round also dates the members' health changes (autopilot's
/// `StableSince`).
async fn add_servers(
    raft: Raft<TypeConfig>,
    id: NodeId,
    cfg: RaftServerConfig,
    mut members: watch::Receiver<Arc<Vec<Member>>>,
    published: Published,
) {
    let clock = cfg.control.clock.clone();
    // Voters and when gossip first said they were gone.
    let mut gone_since: BTreeMap<NodeId, u64> = BTreeMap::new();
    // Dead servers kept because CleanupDeadServers is off or MinQuorum forbids it (logged once each).
    let mut kept: BTreeSet<NodeId> = BTreeSet::new();
    // Learners and since when they have been caught up (autopilot's ServerStabilizationTime).
    let mut stable_since: BTreeMap<NodeId, u64> = BTreeMap::new();
    loop {
        let leading = {
            let m = raft.metrics().borrow().clone();
            m.state == ServerState::Leader && m.current_leader == Some(id)
        };
        let list = members.borrow_and_update().clone();
        if leading {
            let autopilot = published.state.load().autopilot.clone().unwrap_or_default();
            let metrics = raft.metrics().borrow().clone();
            let _ = super::autopilot::group_health(
                &metrics,
                &cfg.contacts,
                &list,
                &cfg.datacenter,
                &autopilot,
                cfg.timing.heartbeat(),
                clock.now(),
            );
            let servers = alive_servers(&list, &cfg.datacenter);
            let membership = metrics.membership_config.clone();
            let voters: BTreeSet<NodeId> = membership.membership().voter_ids().collect();
            let learners: BTreeSet<NodeId> = membership.membership().learner_ids().collect();
            let now = clock.now();
            stable_since.retain(|sid, _| learners.contains(sid));
            for (sid, node) in &servers {
                if voters.contains(sid) {
                    continue;
                }
                if !learners.contains(sid) {
                    info!(server = %node.name, raft_id = sid, "raft: adding a server (as a learner until it caught up)");
                    if let Err(e) = raft.add_learner(*sid, node.clone(), true).await {
                        warn!(server = %node.name, error = %e, "raft: cannot add the server as a learner");
                    }
                    continue;
                }
                // Autopilot: a learner votes once it has been caught up (within MaxTrailingLogs
                // of the leader's log) for ServerStabilizationTime.
                let last = metrics.last_log_index.unwrap_or(0);
                let matched =
                    metrics.replication.as_ref().and_then(|r| r.get(sid).copied().flatten()).map_or(0, |l| l.index);
                if last.saturating_sub(matched) > autopilot.max_trailing_logs {
                    stable_since.remove(sid);
                    continue;
                }
                let since = *stable_since.entry(*sid).or_insert(now);
                if now.saturating_sub(since) < autopilot.server_stabilization_time_ms {
                    continue;
                }
                match raft.change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([*sid])), false).await {
                    Ok(_) => info!(server = %node.name, "raft: the server is a voter"),
                    Err(e) => warn!(server = %node.name, error = %e, "raft: cannot make the server a voter"),
                }
            }
            if let Some(after) = cfg.dead_server_cleanup {
                let gone: BTreeSet<NodeId> = list
                    .iter()
                    .filter(|m| m.role == Role::Server && m.datacenter == cfg.datacenter)
                    .filter(|m| matches!(m.status, MemberStatus::Failed | MemberStatus::Left))
                    .map(|m| raft_id(&m.node_id))
                    .filter(|sid| voters.contains(sid) && *sid != id && !servers.contains_key(sid))
                    .collect();
                gone_since.retain(|sid, _| gone.contains(sid));
                for sid in &gone {
                    gone_since.entry(*sid).or_insert(now);
                }
                let alive = voters.iter().filter(|v| servers.contains_key(v) || **v == id).count();
                let due: Vec<NodeId> = gone_since
                    .iter()
                    .filter(|(_, since)| now.saturating_sub(**since) >= after.as_millis() as u64)
                    .map(|(sid, _)| *sid)
                    .collect();
                kept.retain(|sid| gone_since.contains_key(sid));
                for sid in due {
                    if !autopilot.cleanup_dead_servers {
                        if kept.insert(sid) {
                            info!(raft_id = sid, "autopilot: CleanupDeadServers is off; keeping a dead server");
                        }
                        continue;
                    }
                    let remaining = voters.len() - 1;
                    if (remaining as u64) < autopilot.min_quorum {
                        if kept.insert(sid) {
                            info!(
                                raft_id = sid,
                                voters = voters.len(),
                                min_quorum = autopilot.min_quorum,
                                "autopilot: keeping a dead server: removing it would leave fewer servers than MinQuorum"
                            );
                        }
                        continue;
                    }
                    if alive <= remaining / 2 {
                        warn!(
                            raft_id = sid,
                            alive,
                            voters = voters.len(),
                            "autopilot: not removing a dead server: the rest would not be a quorum"
                        );
                        continue;
                    }
                    let name = membership.membership().get_node(&sid).map(|n| n.name.clone()).unwrap_or_default();
                    match raft.change_membership(ChangeMembers::RemoveVoters(BTreeSet::from([sid])), false).await {
                        Ok(_) => {
                            info!(server = %name, "autopilot: removed a dead server from the group");
                            gone_since.remove(&sid);
                        }
                        Err(e) => warn!(server = %name, error = %e, "autopilot: cannot remove a dead server"),
                    }
                    break; // one change at a time; the rest on the next round
                }
            }
        } else {
            gone_since.clear();
        }
        tokio::select! {
            r = members.changed() => if r.is_err() { return },
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// What the snapshot policy reads: bytes of entries the log wrote, and the last snapshot's size.
struct SnapshotSizes {
    log: Arc<std::sync::atomic::AtomicU64>,
    snapshot: Arc<std::sync::atomic::AtomicU64>,
}

/// Start a Raft snapshot (openraft then purges the log it covers) by the state log's policy
/// ([`mesh_core::state::SnapshotPolicy`]): once `every` commands were applied since the last one
/// and the log since then holds at least `1/ratio` of the last snapshot's size, or the log
/// since then reached `max_log_bytes`. So the work of snapshots follows the change, not the
/// state's size: a state of a million keys is not encoded again after every few thousand
/// writes. Every server runs it for its own log.
async fn snapshot_policy(raft: Raft<TypeConfig>, sizes: SnapshotSizes, mut applied: watch::Receiver<super::Applied>) {
    use std::sync::atomic::Ordering::Relaxed;
    let p = mesh_core::state::SnapshotPolicy::default();
    let mut last = (applied.borrow().state.index, sizes.log.load(Relaxed));
    while applied.changed().await.is_ok() {
        let index = applied.borrow_and_update().state.index;
        let commands = index.saturating_sub(last.0);
        let log_bytes = sizes.log.load(Relaxed).saturating_sub(last.1);
        let due = (commands >= p.every && log_bytes.saturating_mul(p.ratio.max(1)) >= sizes.snapshot.load(Relaxed))
            || (commands > 0 && log_bytes >= p.max_log_bytes);
        if due {
            // Counted from the start, so a snapshot that fails is tried again only after as much.
            last = (index, sizes.log.load(Relaxed));
            if raft.trigger().snapshot().await.is_err() {
                return; // Raft stopped
            }
        }
    }
}

/// What a leader's control loop is built from.
struct LeaderParts {
    /// Where it publishes its soft state.
    published: Published,
    /// Its messages, kept across leaderships.
    inbox: Inbox,
    /// Room on the disk for its writes.
    disk: Arc<DiskGuard>,
}

/// Keep [`Route`] and the control loop in step with leadership.
async fn follow_leadership(
    raft: Raft<TypeConfig>,
    id: NodeId,
    cfg: RaftServerConfig,
    parts: LeaderParts,
    mut applied: watch::Receiver<super::Applied>,
    route: watch::Sender<Route>,
) {
    let LeaderParts { published, inbox, disk } = parts;
    let mut metrics = raft.metrics();
    // This server's control loop while it leads, and what says its log failed.
    let mut leading: Option<(tokio::task::JoinHandle<()>, watch::Receiver<Option<String>>)> = None;
    let mut follower: Option<(NodeId, Conn)> = None;
    // A leader that has not heard from a quorum for the longest election timeout steps down
    // (as Consul's does after its leader lease): it stops its heartbeats, so the others stop
    // naming it, their elections reach it, and it becomes a follower. Until then nothing it
    // leads could commit anyway.
    let lease = cfg.timing.election_timeout().1.as_millis() as u64;
    let mut heartbeats = true;
    loop {
        let m = metrics.borrow_and_update().clone();
        let is_leader = m.state == ServerState::Leader && m.current_leader == Some(id);
        let quorum_lost = is_leader && m.millis_since_quorum_ack.is_some_and(|ms| ms > lease);
        if quorum_lost {
            if heartbeats {
                warn!(ms = m.millis_since_quorum_ack, "raft: no quorum acknowledged this leader; stepping down");
                raft.runtime_config().heartbeat(false);
                heartbeats = false;
            }
            if let Some((join, _)) = leading.take() {
                join.abort();
            }
            route.send_replace(Route::NoLeader);
        } else if !heartbeats && (!is_leader || m.millis_since_quorum_ack.is_some_and(|ms| ms <= lease)) {
            raft.runtime_config().heartbeat(true);
            heartbeats = true;
        }
        if !quorum_lost && is_leader {
            follower = None;
            let failed =
                leading.as_ref().is_some_and(|(join, poisoned)| join.is_finished() || poisoned.borrow().is_some());
            if failed && let Some((join, _)) = leading.take() {
                route.send_replace(Route::NoLeader);
                join.abort();
                let _ = join.await;
                info!("raft: restarting the leader's control loop from the replicated state");
            }
            if leading.is_none() {
                // Everything in the log (the previous terms' entries, this term's first) is
                // applied: the state machine's state is the whole committed state.
                let a = applied.borrow_and_update().clone();
                let caught_up = m.last_log_index.is_some_and(|last| a.log_id.is_some_and(|l| l.index >= last));
                if caught_up {
                    let (log, poisoned) = RaftLog::new(raft.clone(), a.state.clone(), cfg.write_timeout);
                    match Store::open(Box::new(log.with_disk(disk.clone())), &cfg.datacenter) {
                        Ok(mut store) => {
                            if let Err(e) = store.set_max_versions_async(cfg.max_app_versions).await {
                                warn!(error = %e, "raft: cannot record max-app-versions");
                            }
                            let join =
                                control::spawn_leader(store, cfg.control.clone(), published.clone(), inbox.clone());
                            info!(
                                term = m.current_term,
                                index = a.state.index,
                                "raft: this server leads; control loop started"
                            );
                            leading = Some((join, poisoned));
                            route.send_replace(Route::Local);
                        }
                        Err(e) => warn!(error = %e, "raft: cannot start the control loop"),
                    }
                }
            }
        } else if !quorum_lost {
            if let Some((join, _)) = leading.take() {
                info!(term = m.current_term, leader = ?m.current_leader, "raft: this server no longer leads; control loop stopped");
                join.abort();
            }
            match m.current_leader {
                Some(l) if l != id => {
                    let fresh = follower.as_ref().is_some_and(|(fl, c)| *fl == l && !c.is_closed());
                    if !fresh {
                        follower = None;
                        route.send_replace(Route::NoLeader);
                        if let Some(node) = m.membership_config.membership().get_node(&l)
                            && let Ok(addr) = node.rpc.parse::<SocketAddr>()
                        {
                            match Conn::connect(cfg.transport.as_ref(), addr, cfg.hello.clone(), Arc::new(NoHandler))
                                .await
                            {
                                Ok(c) => {
                                    info!(leader = %node.name, "raft: following");
                                    follower = Some((l, c.clone()));
                                    route.send_replace(Route::Remote(c));
                                }
                                Err(e) => warn!(leader = %node.name, error = %e, "raft: cannot reach the leader"),
                            }
                        }
                    }
                }
                _ => {
                    follower = None;
                    route.send_replace(Route::NoLeader);
                }
            }
        }
        let poisoned = async {
            match &mut leading {
                Some((_, p)) => {
                    let _ = p.wait_for(|p| p.is_some()).await;
                }
                None => std::future::pending().await,
            }
        };
        let conn_closed = async {
            match &follower {
                Some((_, c)) => c.closed().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = metrics.changed() => if r.is_err() { break },
            _ = applied.changed() => {}
            () = poisoned => {}
            () = conn_closed => {}
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
    if let Some((join, _)) = leading.take() {
        join.abort();
    }
    route.send_replace(Route::NoLeader);
}
