//! The control task: the one writer of cluster state.
//!
//! It owns the [`Store`] (state machine + log), the allocator and the Marathon scheduler, and
//! is driven by messages (API commands, agent reports) and a periodic tick. After every batch it
//! publishes immutable snapshots that every reader (HTTP, DNS) loads without locking.
//!
//! When the store cannot write its log, the loop publishes the failure (health endpoints report
//! it), retries [`Store::recover`] with backoff, and keeps what agents report meanwhile to
//! record it after the recovery.

use crate::events::{Event, EventBus, batch_events};
use arc_swap::ArcSwap;
use mesh_core::allocator::{Allocator, DrfAllocator};
use mesh_core::app::AppId;
use mesh_core::catalog::CatalogState;
use mesh_core::model::{AgentId, FrameworkId, Millis, Resources};
use mesh_core::proto::{StatusUpdate, TaskState, ToAgent, ToControl};
use mesh_core::scheduler::{Call, MarathonScheduler, OfferStats, Scheduler};
use mesh_core::state::{Agent, ApplyError, Changes, Command, LogError, State, Store};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, info, warn};

mod frameworks;
pub use frameworks::{LiveFramework, MesosConfig, MesosError, MesosMsg, MesosView, Subscription};

/// Errors the control side reports to API callers.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The command was rejected by the state machine.
    #[error(transparent)]
    Rejected(#[from] ApplyError),
    /// The log could not be written; nothing changed. Holds the store's message (which names
    /// the state store once).
    #[error("{0}")]
    Log(String),
    /// The control task is gone (shutting down).
    #[error("the control loop is not running")]
    Stopped,
}

/// A message to the control task.
// `Propose` carries a `Command` inline (see `state::Command`); messages only move through the
// control channel, so boxing would add an allocation per write for nothing.
#[allow(clippy::large_enum_variant)]
pub enum ControlMsg {
    /// Apply a command and report the result.
    Propose(Command, oneshot::Sender<Result<Changes, ControlError>>),
    /// An agent connected; this is its transport.
    AgentConnected(AgentId, mpsc::Sender<ToAgent>),
    /// An agent's connection ended (the transport it was given with [`ControlMsg::AgentConnected`];
    /// ignored when the agent has connected again since).
    AgentGone(AgentId, mpsc::Sender<ToAgent>),
    /// A message from an agent.
    FromAgent(ToControl),
    /// Messages from an agent's outbox; the reply comes once they are recorded durably (never,
    /// while the state store cannot be written: the agent sends them again).
    Reports(Vec<ToControl>, oneshot::Sender<()>),
    /// Stop launching (shutdown in progress); reply when applied.
    Drain(oneshot::Sender<()>),
    /// A Mesos v1 scheduler API subscription or call.
    Mesos(MesosMsg),
    /// What LAN gossip says of the members now.
    Members(Arc<Vec<crate::gossip::Member>>),
}

/// What readers see: published after every batch.
#[derive(Clone)]
pub struct Published {
    /// The cluster state.
    pub state: Arc<ArcSwap<State>>,
    /// The catalog (its own cell, so DNS only reloads when it changed).
    pub catalog: Arc<ArcSwap<CatalogState>>,
    /// Run after each store of a new catalog, before the publish goes on (DNS updates its index).
    pub catalog_hooks: Arc<crate::dns::PublishHooks>,
    /// Offer statistics of the Marathon scheduler, for `/v2/queue`.
    pub offer_stats: Arc<ArcSwap<imbl::OrdMap<AppId, OfferStats>>>,
    /// The state index; changes wake waiters.
    pub index: watch::Receiver<u64>,
    /// Marathon events (`/v2/events`).
    pub events: EventBus,
    /// Blocking-query waiters, woken by topic after each publish.
    pub watches: Arc<crate::watch::WatchHub>,
    /// Mesos-API frameworks' connections and outstanding offers (`/master/state`).
    pub mesos: Arc<ArcSwap<MesosView>>,
    /// Why the state store cannot be written, while it cannot: health endpoints report it.
    pub store_failure: Arc<arc_swap::ArcSwapOption<String>>,
    /// The node's clock and id source (the control loop's; readers date what they write with it).
    pub clock: Arc<dyn mesh_core::model::Clock>,
}

impl Published {
    /// What readers of `state` see before anything else happened.
    pub fn new(state: State, clock: Arc<dyn mesh_core::model::Clock>) -> (Published, watch::Sender<u64>) {
        let (index_tx, index) = watch::channel(state.index);
        let published = Published {
            catalog: Arc::new(ArcSwap::from_pointee(state.catalog.clone())),
            catalog_hooks: Arc::default(),
            state: Arc::new(ArcSwap::from_pointee(state)),
            offer_stats: Arc::new(ArcSwap::from_pointee(imbl::OrdMap::new())),
            index,
            events: EventBus::new(),
            watches: Arc::new(crate::watch::WatchHub::default()),
            mesos: Arc::new(ArcSwap::from_pointee(MesosView::default())),
            store_failure: Arc::new(arc_swap::ArcSwapOption::empty()),
            clock,
        };
        (published, index_tx)
    }

    /// Show `state` to readers: the catalog (when it moved), the state, the index (waking its
    /// waiters) and blocking queries. Returns the state it replaced.
    pub fn publish(&self, state: &State, index_tx: &watch::Sender<u64>) -> Arc<State> {
        if self.catalog.load().index != state.catalog.index {
            self.catalog.store(Arc::new(state.catalog.clone()));
            self.catalog_hooks.published();
        }
        let previous = self.state.swap(Arc::new(state.clone()));
        let _ = index_tx.send(state.index);
        self.watches.notify_changes(&previous, state);
        previous
    }
}

/// The client request an HTTP handler serves (`X-Mesh-Request-Id`), while it does: see
/// [`with_request`].
struct RequestScope {
    id: String,
    /// Commands proposed so far (the k-th is applied once as `<id>#<k>`).
    proposals: std::cell::Cell<u32>,
    /// Ids made so far (the k-th is derived from `<id>` and k).
    uuids: std::cell::Cell<u32>,
}

tokio::task_local! {
    static REQUEST: RequestScope;
}

/// Run `f` (an HTTP handler) on behalf of the client request `id`: every command it proposes
/// is applied once per request ([`Command::Once`], the k-th proposal as `<id>#<k>`), and every
/// id it makes ([`ControlHandle::uuid`]) is derived from `id`, so the same request sent again
/// (a retry after its answer was lost) applies nothing twice and is answered with the same ids
/// (a Marathon deployment, a Consul session) as the first time.
pub async fn with_request<F: std::future::Future>(id: String, f: F) -> F::Output {
    REQUEST.scope(RequestScope { id, proposals: Default::default(), uuids: Default::default() }, f).await
}

/// What a proposal that repeated an applied request answers: what the first one changed, as
/// far as a handler uses it (a transaction's results).
fn repeated(e: ControlError) -> Result<Changes, ControlError> {
    match e {
        ControlError::Rejected(ApplyError::Repeated { request, index, txn_results }) => {
            debug!(%request, index, "a repeated request: answered as the first one");
            Ok(Changes { txn_results, ..Changes::default() })
        }
        other => Err(other),
    }
}

/// A handle to the control task.
#[derive(Clone)]
pub struct ControlHandle {
    tx: mpsc::Sender<ControlMsg>,
    /// Published snapshots.
    pub published: Published,
}

impl ControlHandle {
    /// A handle whose messages go to `tx` and whose reads come from `published`: an agent's
    /// uplink and catalog replica stand in for the control task this way.
    pub fn from_parts(tx: mpsc::Sender<ControlMsg>, published: Published) -> ControlHandle {
        ControlHandle { tx, published }
    }

    /// Apply a command; returns once it is durable and visible to readers.
    pub async fn propose(&self, cmd: Command) -> Result<(), ControlError> {
        self.propose_changes(cmd).await.map(|_| ())
    }

    /// Apply a command and return what it changed, as the state machine computed it when it
    /// applied the command (e.g. a KV transaction's results: the published state may already
    /// hold later writes by the time the caller reads it).
    ///
    /// Inside [`with_request`] the command is applied once per request: a repeat is answered
    /// as the first one was (`Ok`, with a transaction's first results).
    pub async fn propose_changes(&self, cmd: Command) -> Result<Changes, ControlError> {
        let once = REQUEST
            .try_with(|r| {
                let k = r.proposals.get();
                r.proposals.set(k + 1);
                format!("{}#{k}", r.id)
            })
            .ok();
        let cmd = match &once {
            Some(request) => Command::Once { request: request.clone(), cmd: Box::new(cmd) },
            None => cmd,
        };
        let (tx, rx) = oneshot::channel();
        self.tx.send(ControlMsg::Propose(cmd, tx)).await.map_err(|_| ControlError::Stopped)?;
        match rx.await.map_err(|_| ControlError::Stopped)? {
            Err(e) if once.is_some() => repeated(e),
            other => other,
        }
    }

    /// Send a raw message (agents use this).
    pub async fn send(&self, msg: ControlMsg) -> Result<(), ControlError> {
        self.tx.send(msg).await.map_err(|_| ControlError::Stopped)
    }

    /// The time, by the node's clock (every deadline is computed from it, never from the
    /// system's clock directly).
    pub fn now(&self) -> Millis {
        self.published.clock.now()
    }

    /// A fresh unique id, from the node's id source; inside [`with_request`], the k-th id is
    /// derived from the request id (a name-based UUID), so a repeated request makes the same ids.
    pub fn uuid(&self) -> uuid::Uuid {
        REQUEST
            .try_with(|r| {
                let k = r.uuids.get();
                r.uuids.set(k + 1);
                uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, format!("mesh-request:{}/{k}", r.id).as_bytes())
            })
            .unwrap_or_else(|_| self.published.clock.uuid())
    }

    /// The current state snapshot.
    pub fn state(&self) -> Arc<State> {
        self.published.state.load_full()
    }

    /// Why the state store cannot be written, while it cannot (health endpoints say so).
    pub fn store_failure(&self) -> Option<Arc<String>> {
        self.published.store_failure.load_full()
    }

    /// Stop launching new tasks.
    pub async fn drain(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(ControlMsg::Drain(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }
}

/// Settings of the control task.
#[derive(Clone, Debug)]
pub struct ControlConfig {
    /// Datacenter name.
    pub datacenter: String,
    /// Period of the reconcile/allocation tick.
    pub tick: Duration,
    /// Seed for the scheduler's random choices.
    pub seed: u64,
    /// The Mesos v1 scheduler API and allocation settings.
    pub mesos: MesosConfig,
    /// An agent whose connection broke (it did not say goodbye) is lost after this long without
    /// reconnecting: its node's serfHealth goes critical and its tasks become unreachable.
    pub agent_down_after: Duration,
    /// An agent that said it restarts (SIGTERM, upgrade) keeps its tasks as they are for this
    /// long (Mesos' `agent_reregister_timeout`); later it is lost.
    pub reregister_timeout: Duration,
    /// The clock and id source of the control loop (the system's by default; a simulation
    /// gives its own).
    pub clock: Arc<dyn mesh_core::model::Clock>,
    /// How often every connected agent is told which tasks it should run (it kills others and
    /// reports the missing ones lost), besides at every (re-)registration: what a lost message
    /// left wrong is put right within this period.
    pub reconcile_interval: Duration,
}

impl Default for ControlConfig {
    fn default() -> Self {
        ControlConfig {
            datacenter: "dc1".into(),
            tick: Duration::from_millis(200),
            seed: 0,
            mesos: MesosConfig::default(),
            agent_down_after: AGENT_DOWN_AFTER,
            reregister_timeout: REREGISTER_TIMEOUT,
            reconcile_interval: RECONCILE_INTERVAL,
            clock: mesh_core::model::system_clock(),
        }
    }
}

/// Default of [`ControlConfig::reconcile_interval`].
pub const RECONCILE_INTERVAL: Duration = Duration::from_secs(60);

/// Default of [`ControlConfig::agent_down_after`].
pub const AGENT_DOWN_AFTER: Duration = Duration::from_secs(5);
/// Default of [`ControlConfig::reregister_timeout`] (Mesos' default).
pub const REREGISTER_TIMEOUT: Duration = Duration::from_secs(600);

struct Control {
    cfg: ControlConfig,
    store: Store,
    allocator: DrfAllocator,
    marathon: MarathonScheduler,
    agents: BTreeMap<AgentId, mpsc::Sender<ToAgent>>,
    outbox: VecDeque<(AgentId, ToAgent)>,
    published: Published,
    /// `Some`: this loop publishes the state it writes (`mesh dev`). `None`: the Raft state
    /// machine publishes every committed state (and its events) on every server, this leader's
    /// included; the loop publishes only its own soft state.
    index_tx: Option<watch::Sender<u64>>,
    /// The state index of the last [`Control::publish`].
    published_index: u64,
    draining: bool,
    /// Uuids of the last [`SEEN_UPDATES`] status updates, in arrival order and as a set.
    seen_updates: (VecDeque<String>, BTreeSet<String>),
    /// The catalog index when node checks were last sent (none sent since: nothing to check).
    checks_sent_at: Option<u64>,
    /// The index of each agent's node topic when its Consul checks were last sent: any change of
    /// a check on the node (status included) moves it, and only then is the set sent again.
    sent_checks: BTreeMap<AgentId, u64>,
    /// `(state index, State::next_deadline)`: deadlines only move when the state does, so the
    /// scan runs once per change, not once per loop turn.
    deadline: (u64, Option<Millis>),
    /// The state index at which `State::due` last ran.
    due_checked: u64,
    mesos: frameworks::Frameworks,
    /// While the store is failed: when to try recovering next, and the current backoff.
    recovery: (Millis, u64),
    /// Facts agents reported while the store could not record them (check results, service
    /// sets, registrations), in order; proposed again once it recovers.
    deferred: VecDeque<Command>,
    /// Agents without a connection: when they count as lost unless they reconnect.
    down: BTreeMap<AgentId, Millis>,
    /// Agents that said goodbye keeping their tasks (a restart): when they did.
    restarting: BTreeMap<AgentId, Millis>,
    /// When connected agents are next told which tasks they should run.
    next_reconcile: Millis,
    /// Agents gossip declared failed or left (handled once per such change).
    lost: BTreeSet<AgentId>,
    /// The drained agents the allocator and scheduler have acted on.
    drained: imbl::OrdSet<AgentId>,
}

/// How many status update uuids are remembered to drop re-sent updates.
const SEEN_UPDATES: usize = 4096;

/// How soon messages that did not fit into an agent's channel are offered again.
const OUTBOX_RETRY: Duration = Duration::from_millis(2);

/// At most this many deferred facts are kept (the oldest go first).
const MAX_DEFERRED: usize = 10_000;

/// First and longest wait between attempts to recover a failed state store.
const RECOVERY_BACKOFF_MS: (u64, u64) = (100, 5_000);

/// `Store::propose` waits for the disk (a sync per batch, milliseconds). On a multi-threaded
/// runtime the worker hands its queued tasks to another thread meanwhile: otherwise the HTTP
/// handlers the previous batch answered, woken onto this worker, wait behind the sync (at c=16
/// that put KV PUT p99 at ~5x the median).
fn propose_off_worker(
    store: &mut Store,
    cmds: Vec<Command>,
) -> Result<Vec<Result<mesh_core::state::Changes, ApplyError>>, mesh_core::state::LogError> {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(|| store.propose(cmds)),
        _ => store.propose(cmds),
    }
}

/// The callers of proposals in flight. When the control loop stops before answering them (a
/// server that lost its leadership aborts its loop while the Raft write is awaited) they hear
/// that no leader took the write, as they would from a write that timed out, not that the
/// loop is gone: whether it commits is as unknown as after a timeout.
#[derive(Default)]
struct Replies(Vec<oneshot::Sender<Result<Changes, ControlError>>>);

impl Replies {
    fn take(&mut self) -> Vec<oneshot::Sender<Result<Changes, ControlError>>> {
        std::mem::take(&mut self.0)
    }
}

impl Drop for Replies {
    fn drop(&mut self) {
        for reply in self.0.drain(..) {
            let why = "No cluster leader: this server stopped leading with the write in flight";
            let _ = reply.send(Err(ControlError::Log(why.into())));
        }
    }
}

/// Start the control task on `store`. Returns its handle and join handle.
pub fn spawn(store: Store, cfg: ControlConfig) -> (ControlHandle, tokio::task::JoinHandle<()>) {
    let (tx, mut rx) = mpsc::channel(1024);
    let (published, index_tx) = Published::new(store.state().clone(), cfg.clock.clone());
    let control = Control::new(store, cfg, published.clone(), Some(index_tx));
    let join = tokio::spawn(async move { control.run(&mut rx).await });
    (ControlHandle { tx, published }, join)
}

/// The control loop's inbox on a server: kept across the loops of successive leaderships, so a
/// message sent while one loop stops and the next starts waits for the next.
pub type Inbox = Arc<tokio::sync::Mutex<mpsc::Receiver<ControlMsg>>>;

/// A handle whose reads come from `published` and whose messages wait in the returned inbox
/// for the leader's control loop ([`spawn_leader`]).
pub fn handle_with_inbox(published: Published) -> (ControlHandle, Inbox) {
    let (tx, rx) = mpsc::channel(1024);
    (ControlHandle { tx, published }, Arc::new(tokio::sync::Mutex::new(rx)))
}

/// Start the control loop of a Raft leader on `store` (whose log is Raft), reading `inbox`.
/// The Raft state machine publishes the state into `published`; the loop adds its soft state
/// (offer statistics, Mesos connections, the store's health). Abort the task when leadership
/// ends.
pub fn spawn_leader(
    store: Store,
    cfg: ControlConfig,
    published: Published,
    inbox: Inbox,
) -> tokio::task::JoinHandle<()> {
    let control = Control::new(store, cfg, published, None);
    tokio::spawn(async move {
        let mut rx = inbox.lock_owned().await;
        control.run(&mut rx).await
    })
}

impl Control {
    fn new(store: Store, cfg: ControlConfig, published: Published, index_tx: Option<watch::Sender<u64>>) -> Control {
        let mut allocator = DrfAllocator::new(frameworks::Frameworks::allocator_config(&cfg.mesos));
        // Seeded anew for every loop: a server that leads again must not draw the task ids of
        // its earlier leadership again (the simulation found a task id run twice that way).
        let marathon = MarathonScheduler::new(cfg.seed ^ cfg.clock.uuid().as_u64_pair().0);
        allocator.add_framework(marathon.framework_id().clone(), marathon.role().to_owned());
        let mesos = frameworks::Frameworks::new(cfg.mesos.clone(), cfg.clock.as_ref());
        let published_index = store.state().index;
        let mut control = Control {
            cfg,
            store,
            allocator,
            marathon,
            agents: BTreeMap::new(),
            outbox: VecDeque::new(),
            published,
            index_tx,
            published_index,
            draining: false,
            seen_updates: (VecDeque::new(), BTreeSet::new()),
            checks_sent_at: None,
            sent_checks: BTreeMap::new(),
            deadline: (u64::MAX, None),
            due_checked: u64::MAX,
            mesos,
            recovery: (0, RECOVERY_BACKOFF_MS.0),
            deferred: VecDeque::new(),
            down: BTreeMap::new(),
            restarting: BTreeMap::new(),
            next_reconcile: 0,
            lost: BTreeSet::new(),
            drained: imbl::OrdSet::new(),
        };
        control.mesos_recover(control.cfg.clock.now());
        // After a restart of the server (or a new leader), agents have their re-register
        // timeout to come back (as Mesos agents after a master failover); one that does not is
        // lost.
        let deadline = control.cfg.clock.now().saturating_add(control.cfg.reregister_timeout.as_millis() as u64);
        let known: Vec<AgentId> = control.store.state().agents.keys().cloned().collect();
        for a in known {
            control.down.insert(a, deadline);
        }
        control
    }
}

impl Control {
    async fn run(mut self, rx: &mut mpsc::Receiver<ControlMsg>) {
        let mut tick = tokio::time::interval(self.cfg.tick);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let mut batch = Vec::new();
            // TTL expiries and reaping happen on time, not on the next tick.
            let timer = self.next_deadline().map(|d| Duration::from_millis(d.saturating_sub(self.cfg.clock.now())));
            tokio::select! {
                msg = rx.recv() => match msg {
                    Some(m) => batch.push(m),
                    None => break,
                },
                _ = tick.tick() => {}
                _ = tokio::time::sleep(timer.unwrap_or(Duration::from_secs(3600))), if timer.is_some() => {}
                // Messages an agent had no room for yet (see `flush`).
                _ = tokio::time::sleep(OUTBOX_RETRY), if !self.outbox.is_empty() => {}
            }
            while batch.len() < 256 {
                match rx.try_recv() {
                    Ok(m) => batch.push(m),
                    Err(_) => break,
                }
            }
            let now = self.cfg.clock.now();
            self.recover_store(now).await;
            self.handle_batch(batch, now).await;
            self.step(now).await;
            self.publish_store_health();
            self.flush().await;
        }
        debug!("control loop stopped");
    }

    async fn handle_batch(&mut self, batch: Vec<ControlMsg>, now: Millis) {
        let mut proposals = Vec::new();
        let mut replies = Replies::default();
        // Consecutive status updates are recorded together: one log write for a burst of
        // 1,000 RUNNING (or KILLED, at shutdown) instead of 1,000.
        let mut updates = Vec::new();
        let mut acks = Vec::new();
        for msg in batch {
            if let ControlMsg::FromAgent(ToControl::Status(update)) = msg {
                updates.push(update);
                continue;
            }
            if !updates.is_empty() {
                self.status_updates(std::mem::take(&mut updates), now).await;
            }
            match msg {
                ControlMsg::Propose(cmd, reply) => {
                    // Its caller gave up (e.g. it waited in a server's inbox through an
                    // election): it was answered with an error, so it must not apply later.
                    if reply.is_closed() {
                        continue;
                    }
                    proposals.push(cmd);
                    replies.0.push(reply);
                }
                ControlMsg::AgentConnected(id, tx) => {
                    self.sent_checks.remove(&id);
                    self.checks_sent_at = None;
                    self.agents.insert(id, tx);
                }
                ControlMsg::AgentGone(id, tx) => {
                    if self.agents.get(&id).is_some_and(|t| t.same_channel(&tx)) {
                        self.agent_gone(&id, now);
                    }
                }
                ControlMsg::FromAgent(m) => self.on_agent_msg(m, now).await,
                ControlMsg::Reports(msgs, reply) => {
                    for m in msgs {
                        if let ToControl::Status(update) = m {
                            updates.push(update);
                            continue;
                        }
                        if !updates.is_empty() {
                            self.status_updates(std::mem::take(&mut updates), now).await;
                        }
                        self.on_agent_msg(m, now).await;
                    }
                    acks.push(reply);
                }
                ControlMsg::Drain(reply) => {
                    self.draining = true;
                    let _ = reply.send(());
                }
                ControlMsg::Mesos(m) => self.mesos_msg(m, now).await,
                ControlMsg::Members(m) => self.members(&m, now).await,
            }
        }
        if !updates.is_empty() {
            self.status_updates(updates, now).await;
        }
        if !proposals.is_empty() {
            self.propose_and_reply(proposals, replies, now).await;
        }
        // Recorded durably: the agents may drop them from their outboxes. While the store is
        // failed they were only kept in memory: no ack, so they come again.
        if self.store.failure().is_none() && self.deferred.is_empty() {
            for a in acks {
                let _ = a.send(());
            }
        }
    }

    /// Propose commands from the APIs as one batch and answer each caller.
    async fn propose_and_reply(&mut self, proposals: Vec<Command>, mut replies: Replies, now: Millis) {
        let before = self.store.state().clone();
        let outcome = self.propose(proposals.clone()).await;
        // Health shows a failure before any caller hears of it.
        self.publish_store_health();
        match outcome {
            Ok(results) => {
                let applied: Vec<Command> =
                    proposals.into_iter().zip(&results).filter(|(_, r)| r.is_ok()).map(|(c, _)| c).collect();
                self.emit(&applied, &before, now);
                // Visible to readers before the caller hears back.
                self.publish();
                for (res, reply) in results.into_iter().zip(replies.take()) {
                    let _ = reply.send(res.map_err(ControlError::from));
                }
            }
            Err(e) if proposals.len() > 1 => {
                // One refused command must not take the others with it: while the store is
                // failed, commands that stop work still go through (to the reserve) one by one.
                debug!(error = %e, "batch refused by the state store; proposing its commands one by one");
                for (cmd, reply) in proposals.into_iter().zip(replies.take()) {
                    Box::pin(self.propose_and_reply(vec![cmd], Replies(vec![reply]), now)).await;
                }
            }
            Err(e) => {
                warn!(error = %e, "state log write failed; the batch was not applied");
                for reply in replies.take() {
                    let _ = reply.send(Err(ControlError::Log(e.to_string())));
                }
            }
        }
    }

    /// While the store is failed, try to recover it (reopen the log, move reserved commands
    /// in) with backoff: 100 ms doubling to 5 s, back to 100 ms after 30 s of health.
    async fn recover_store(&mut self, now: Millis) {
        if self.store.failure().is_none() {
            // The backoff is kept until the store has stayed healthy a while, so a disk that
            // keeps filling up is not reopened in a tight loop.
            if self.recovery.1 != RECOVERY_BACKOFF_MS.0 && now >= self.recovery.0 + 30_000 {
                self.recovery = (0, RECOVERY_BACKOFF_MS.0);
            }
            return;
        }
        if now < self.recovery.0 {
            return;
        }
        match self.store.recover() {
            Ok(()) => {
                info!(deferred = self.deferred.len(), "state store writable again");
                self.recovery.0 = now;
                let deferred: Vec<Command> = self.deferred.drain(..).collect();
                self.apply(deferred).await;
            }
            Err(e) => {
                let wait = self.recovery.1;
                debug!(error = %e, retry_ms = wait, "state store not recovered yet");
                self.recovery = (now + wait, (wait * 2).min(RECOVERY_BACKOFF_MS.1));
            }
        }
        self.publish_store_health();
    }

    /// Show the store's failure (or its end) to the health endpoints.
    fn publish_store_health(&self) {
        let now = self.store.failure();
        let shown = self.published.store_failure.load();
        if shown.as_deref().map(String::as_str) != now {
            self.published.store_failure.store(now.map(|s| Arc::new(s.to_owned())));
        }
    }

    /// Propose commands to the store and tell the Marathon scheduler what they changed, so it
    /// looks only at that. Every write of the control loop goes through here.
    async fn propose(&mut self, cmds: Vec<Command>) -> Result<Vec<Result<Changes, ApplyError>>, LogError> {
        let from = self.store.state().index;
        // A replicated log is awaited (Raft runs meanwhile, on this thread too when there is
        // only one); a local log's sync is done off this worker.
        let out = if self.store.writes_async() {
            self.store.propose_async(cmds).await?
        } else {
            propose_off_worker(&mut self.store, cmds)?
        };
        self.marathon.observe(from, self.store.state(), out.iter().filter_map(|r| r.as_ref().ok()));
        Ok(out)
    }

    /// Apply commands the control side itself decided on.
    async fn apply(&mut self, cmds: Vec<Command>) -> Vec<Result<(), ApplyError>> {
        if cmds.is_empty() {
            return Vec::new();
        }
        let before = self.store.state().clone();
        match self.propose(cmds.clone()).await {
            Ok(r) => {
                let applied: Vec<Command> =
                    cmds.into_iter().zip(&r).filter(|(_, r)| r.is_ok()).map(|(c, _)| c).collect();
                let now = self.cfg.clock.now();
                self.emit(&applied, &before, now);
                self.mesos_applied(&applied, &before, now);
                r.into_iter().map(|r| r.map(|_| ())).collect()
            }
            Err(e) => {
                // The store logged the failure when it began; this repeats every tick meanwhile.
                debug!(error = %e, "state log write failed");
                // What agents observed is not recomputed later: keep it for after recovery.
                // Decisions of the control side (launches, kills, timers) are made again.
                for cmd in cmds {
                    if matches!(
                        cmd,
                        Command::RegisterAgent { .. }
                            | Command::TaskStatus { .. }
                            | Command::TaskHealth { .. }
                            | Command::UpdateCheck { .. }
                            | Command::SyncServices { .. }
                    ) {
                        if self.deferred.len() >= MAX_DEFERRED {
                            self.deferred.pop_front();
                        }
                        self.deferred.push_back(cmd);
                    }
                }
                vec![]
            }
        }
    }

    async fn on_agent_msg(&mut self, msg: ToControl, now: Millis) {
        match msg {
            ToControl::Register {
                agent_id,
                hostname,
                address,
                resources,
                attributes,
                running,
                runtimes,
                wan_address,
            } => {
                info!(agent = %agent_id, %resources, recovered = running.len(), "agent registered");
                self.down.remove(&agent_id);
                self.restarting.remove(&agent_id);
                self.lost.remove(&agent_id);

                let agent = Agent {
                    id: agent_id.clone(),
                    hostname: hostname.clone(),
                    address,
                    resources: resources.clone(),
                    attributes: attributes.clone(),
                    registered_at: now,
                    runtimes,
                    wan_address,
                };
                let datacenter = self.cfg.datacenter.clone();
                self.apply(vec![Command::RegisterAgent { agent, datacenter }]).await;
                // Re-registration: rescind its offers, then account for the tasks it runs.
                self.allocator.remove_agent(&agent_id);
                if !self.store.state().draining.contains(&agent_id) {
                    self.allocator.add_agent(agent_id.clone(), hostname, resources, attributes);
                }

                let state = self.store.state().clone();
                let mut lost = Vec::new();
                for t in state.tasks.values().filter(|t| t.agent_id == agent_id) {
                    if running.contains(&t.id) {
                        if !self.store.state().draining.contains(&agent_id) {
                            self.allocator.track_used(&agent_id, &t.framework_id, &t.resources);
                        }

                        if t.state == TaskState::Unreachable {
                            // Back: it counts again (a surplus over the app's instances is killed).
                            lost.push(Command::TaskStatus {
                                task_id: t.id.clone(),
                                state: TaskState::Running,
                                message: "running again: its agent is back".into(),
                                at: now,
                            });
                        }
                        let checks = self.checks_of(t);
                        if !checks.is_empty() {
                            let started_at = t.started_at.unwrap_or(now);
                            let msg = ToAgent::Checks { task_id: t.id.clone(), checks, started_at };
                            self.outbox.push_back((agent_id.clone(), msg));
                        }
                    } else {
                        lost.push(Command::TaskStatus {
                            task_id: t.id.clone(),
                            state: TaskState::Lost,
                            message: "task was not running when its agent (re-)registered".into(),
                            at: now,
                        });
                    }
                }
                for id in &running {
                    let known = state.tasks.get(id).is_some_and(|t| t.agent_id == agent_id);
                    if !known {
                        info!(task = %id, "agent runs a task the state does not know: killing it");
                        self.outbox.push_back((
                            agent_id.clone(),
                            ToAgent::Kill { task_id: id.clone(), grace: Duration::from_secs(3) },
                        ));
                    }
                }
                self.apply(lost).await;
            }
            ToControl::Status(update) => self.status_updates(vec![update], now).await,
            ToControl::Goodbye { agent_id, keep_tasks } => {
                if keep_tasks {
                    info!(agent = %agent_id, timeout = ?self.cfg.reregister_timeout, "agent restarting; its tasks are kept meanwhile");
                    self.restarting.insert(agent_id, now);
                } else {
                    // It stopped its tasks and leaves (Consul's graceful leave).
                    self.down.remove(&agent_id);
                    self.restarting.remove(&agent_id);
                    if let Some(tx) = self.agents.remove(&agent_id) {
                        drop(tx);
                        self.allocator.remove_agent(&agent_id);
                    }
                    self.agent_lost(&agent_id, "Agent left the cluster", now).await;
                }
            }
            // Its events (failed_health_check_event, health_status_changed_event) come from the
            // applied command, on the server and on every replica alike.
            ToControl::Health { task_id, check, result } => {
                self.apply(vec![Command::TaskHealth { task_id, check, result }]).await;
            }
            ToControl::CheckResults { agent_id, results } => {
                let cmds = results
                    .into_iter()
                    .map(|(id, status, output)| Command::UpdateCheck {
                        node: agent_id.0.clone(),
                        id,
                        status,
                        output,
                        now,
                        ttl: mesh_core::state::TtlUpdate::Keep,
                    })
                    .collect();
                self.apply(cmds).await;
            }
            ToControl::Services { agent_id, source, instances } => {
                self.apply(vec![Command::SyncServices { node: agent_id.0, source, instances }]).await;
            }
        }
    }

    /// Records status updates (re-sent ones are ignored) in one log write, then lets the
    /// allocator and the scheduler see each.
    /// The server's clock dates them (`now`): an agent's timestamps are data only, so a skewed
    /// agent clock never moves a deadline (launch backoff, unreachable timers).
    async fn status_updates(&mut self, updates: Vec<StatusUpdate>, now: Millis) {
        let mut known = Vec::with_capacity(updates.len());
        for update in updates {
            let (order, seen) = &mut self.seen_updates;
            if !seen.insert(update.uuid.clone()) {
                continue; // a re-sent update
            }
            order.push_back(update.uuid.clone());
            if order.len() > SEEN_UPDATES
                && let Some(old) = order.pop_front()
            {
                seen.remove(&old);
            }
            let Some(task) = self.store.state().tasks.get(&update.task_id).cloned() else {
                if update.state.is_terminal() {
                    self.published.events.publish(Event::new(
                        "unknown_instance_terminated_event",
                        serde_json::json!({"instanceId": update.task_id, "runSpecId": "", "condition": update.state.as_str()}),
                        update.at,
                    ));
                } else {
                    // A task nobody wants: stop it.
                    self.outbox.push_back((
                        update.agent_id.clone(),
                        ToAgent::Kill { task_id: update.task_id.clone(), grace: Duration::from_secs(3) },
                    ));
                }
                continue;
            };
            if task.agent_id != update.agent_id {
                warn!(task = %update.task_id, owner = %task.agent_id, from = %update.agent_id, state = update.state.as_str(), "status update from an agent that does not run the task: refused");
                continue;
            }
            known.push((update, task));
        }
        if known.is_empty() {
            return;
        }
        let cmds = known
            .iter()
            .map(|(u, _)| Command::TaskStatus {
                task_id: u.task_id.clone(),
                state: u.state,
                message: u.message.clone(),
                at: now,
            })
            .collect();
        let res = self.apply(cmds).await;
        for (i, (update, task)) in known.into_iter().enumerate() {
            // No result: the store could not record it (the update is deferred); the task is
            // gone all the same, so its resources are free.
            if res.get(i).is_none_or(|r| r.is_ok()) && update.state.is_terminal() {
                self.allocator.recover(&task.agent_id, &task.framework_id, &task.resources);
            }
            let view = self.store.state().clone();
            let calls = self.marathon.status(&view, &update, now);
            self.handle_calls(calls, now).await;
        }
    }

    async fn step(&mut self, now: Millis) {
        self.lost_agents(now).await;
        self.follow_drains(now).await;
        if now >= self.next_reconcile {
            self.next_reconcile = now.saturating_add(self.cfg.reconcile_interval.as_millis() as u64);
            self.reconcile_agents();
        }
        self.mesos_step(now).await;
        // Only deployments whose apps changed are looked at.
        let ends = self.marathon.deployment_steps(self.store.state(), now);
        self.apply(ends).await;
        // Due work appears only with a state change or when a deadline passes.
        let index = self.store.state().index;
        if index != self.due_checked || self.next_deadline().is_some_and(|d| d <= now) {
            self.due_checked = index;
            let due = self.store.state().due(now);
            self.apply(due).await;
        }
        if !self.draining {
            let view = self.store.state().clone();
            let calls = self.marathon.reconcile(&view, now);
            for id in self.marathon.take_health_kills() {
                if let Some(t) = view.tasks.get(&id) {
                    let app = t.app_id.as_ref().map(|a| a.to_string()).unwrap_or_default();
                    let body = serde_json::json!({"appId": app, "taskId": id, "instanceId": id, "version": mesh_core::model::iso8601(t.version), "reason": "health check failures", "host": t.host, "slaveId": t.agent_id});
                    self.published.events.publish(Event::new("unhealthy_task_kill_event", body.clone(), now));
                    self.published.events.publish(Event::new("unhealthy_instance_kill_event", body, now));
                }
            }
            self.handle_calls(calls, now).await;
            let expired = self.allocator.expire_offers(now);
            self.mesos_rescinded(expired);
            let offers = self.allocator.allocate(now);
            if !offers.is_empty() {
                let mut mine = Vec::new();
                let mut others = Vec::new();
                for o in offers {
                    if &o.framework_id == self.marathon.framework_id() {
                        mine.push(o);
                    } else {
                        others.push(o);
                    }
                }
                self.mesos_offers(others, now);
                if !mine.is_empty() {
                    let view = self.store.state().clone();
                    let calls = self.marathon.offers(&view, mine, now);
                    self.handle_calls(calls, now).await;
                    // A persistent map: the copy is O(1); it holds only apps that exist.
                    self.published.offer_stats.store(Arc::new(self.marathon.all_offer_stats().clone()));
                }
            }
        }
        self.publish();
    }

    async fn handle_calls(&mut self, calls: Vec<Call>, now: Millis) {
        for call in calls {
            match call {
                Call::Accept { offer_id, launches, filters } => {
                    let mut used = Resources::default();
                    for l in &launches {
                        used.add(&l.task.resources);
                    }
                    if let Err(e) = self.allocator.accept(&offer_id, &used, filters, now) {
                        warn!(error = %e, "accept refused by the allocator");
                        continue;
                    }
                    let tasks = launches.iter().map(|l| l.task.clone()).collect();
                    let res = self.apply(vec![Command::LaunchTasks { tasks }]).await;
                    if res.first().is_some_and(|r| r.is_ok()) {
                        for l in launches {
                            let checks = self.checks_of(&l.task);
                            self.outbox.push_back((l.task.agent_id.clone(), ToAgent::Launch(l.spec)));
                            if !checks.is_empty() {
                                let msg = ToAgent::Checks { task_id: l.task.id.clone(), checks, started_at: now };
                                self.outbox.push_back((l.task.agent_id.clone(), msg));
                            }
                        }
                    } else {
                        // Not recorded: give the resources back rather than run untracked tasks.
                        if let Some(l) = launches.first() {
                            self.allocator.recover(&l.task.agent_id, &FrameworkId::from("marathon"), &used);
                        }
                    }
                }
                Call::Decline { offer_id, filters } => {
                    let _ = self.allocator.decline(&offer_id, filters, now);
                }
                Call::Kill { task_id, agent_id, grace } => {
                    if self.store.state().tasks.get(&task_id).is_some_and(|t| t.state == TaskState::Unreachable) {
                        // Nothing can reach it: it is gone for the state now (Marathon expunges
                        // an unreachable instance it kills); if its agent comes back running it,
                        // the agent is told to kill it.
                        self.apply(vec![Command::TaskStatus {
                            task_id,
                            state: TaskState::Killed,
                            message: "killed while its agent was unreachable".into(),
                            at: now,
                        }])
                        .await;
                        continue;
                    }
                    let needs_mark = self.store.state().tasks.get(&task_id).is_some_and(|t| !t.kill_requested);
                    if needs_mark {
                        self.apply(vec![Command::KillTasks {
                            ids: vec![task_id.clone()],
                            scale: false,
                            now,
                            deployment_id: None,
                        }])
                        .await;
                    }
                    self.outbox.push_back((agent_id, ToAgent::Kill { task_id, grace }));
                }
                Call::Revive => self.allocator.revive(&FrameworkId::from("marathon")),
                Call::Suppress => self.allocator.suppress(&FrameworkId::from("marathon")),
            }
        }
    }

    /// The resolved health checks of a task's app.
    fn checks_of(&self, t: &mesh_core::state::Task) -> Vec<mesh_core::health::CheckSpec> {
        t.app_id
            .as_ref()
            .and_then(|a| self.store.state().apps.get(a))
            .map(|r| mesh_core::health::resolve(&r.app.health_checks, &t.ports))
            .unwrap_or_default()
    }

    fn emit(&self, applied: &[Command], before: &State, now: Millis) {
        // With Raft the state machine emits the events of what it applies.
        if applied.is_empty() || self.published.events.clients() == 0 || self.index_tx.is_none() {
            return;
        }
        for e in batch_events(applied, before, self.store.state(), now) {
            self.published.events.publish(e);
        }
    }

    fn publish(&mut self) {
        let state = self.store.state();
        if state.index == self.published_index {
            return;
        }
        self.published_index = state.index;
        if let Some(index_tx) = &self.index_tx {
            self.published.publish(state, index_tx);
        }
        self.send_node_checks();
    }

    /// Tell each agent the Consul checks it must run, when that set changed.
    fn send_node_checks(&mut self) {
        let state = self.store.state();
        // Nothing in the catalog moved since the last round (and no agent connected since):
        // every agent has its set.
        if self.checks_sent_at == Some(state.catalog.index) {
            return;
        }
        self.checks_sent_at = Some(state.catalog.index);
        let ids: Vec<AgentId> = self.agents.keys().cloned().collect();
        for agent in ids {
            // The statuses go with the definitions: the runner learns what is recorded (a
            // re-registration resets it), and reports only when its result differs.
            let index = state.catalog.topic_index(&mesh_core::catalog::node_topic(&agent.0));
            if self.sent_checks.get(&agent) == Some(&index) {
                continue;
            }
            self.sent_checks.insert(agent.clone(), index);
            let checks: Vec<mesh_core::catalog::Check> =
                state.catalog.node_checks(&agent.0).filter(|c| c.definition.is_active()).cloned().collect();
            self.outbox.push_back((agent, ToAgent::NodeChecks { checks }));
        }
    }

    /// The earliest timer of the state (TTL expiry, reaping, session TTLs), recomputed only when
    /// the state changed.
    fn next_deadline(&mut self) -> Option<Millis> {
        let state = self.store.state();
        if self.deadline.0 != state.index {
            self.deadline = (state.index, state.next_deadline());
        }
        self.deadline.1
    }

    /// Hands queued messages to their agents, in order per agent, without waiting: when an
    /// agent's channel is full its messages stay queued for the next loop turn (see `run`) and
    /// the other agents' go on. The control loop never waits for an agent, which may itself be
    /// waiting to send its reports to this loop, or be slow or gone.
    async fn flush(&mut self) {
        let mut full: BTreeSet<AgentId> = BTreeSet::new();
        let mut gone: Vec<AgentId> = Vec::new();
        let mut kept = VecDeque::new();
        while let Some((agent, msg)) = self.outbox.pop_front() {
            if full.contains(&agent) {
                kept.push_back((agent, msg));
                continue;
            }
            match self.agents.get(&agent) {
                Some(tx) => match tx.try_send(msg) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Full(msg)) => {
                        full.insert(agent.clone());
                        kept.push_back((agent, msg));
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => {
                        warn!(%agent, "agent channel closed");
                        gone.push(agent);
                    }
                },
                None => debug!(%agent, "no connection to agent; message dropped (reconciled on register)"),
            }
        }
        self.outbox = kept;
        let now = self.cfg.clock.now();

        for agent in gone {
            self.agent_gone(&agent, now);
        }
    }

    /// An agent's connection is gone. It gets no offers meanwhile; unless it reconnects within
    /// [`ControlConfig::agent_down_after`] (or its re-register timeout, when it said it
    /// restarts), it is lost (see [`Control::agent_lost`]).
    fn agent_gone(&mut self, agent: &AgentId, now: Millis) {
        if self.agents.remove(agent).is_none() {
            return;
        }
        self.sent_checks.remove(agent);
        let rescinded = self.allocator.remove_agent(agent);
        self.mesos_rescinded(rescinded);
        let deadline = match self.restarting.get(agent) {
            Some(at) => at.saturating_add(self.cfg.reregister_timeout.as_millis() as u64),
            None => now.saturating_add(self.cfg.agent_down_after.as_millis() as u64),
        };
        info!(%agent, lost_in_ms = deadline.saturating_sub(now), "agent disconnected");
        self.down.insert(agent.clone(), deadline);
    }

    /// Tell every connected agent which tasks it should run (see
    /// [`ControlConfig::reconcile_interval`]).
    fn reconcile_agents(&mut self) {
        let state = self.store.state();
        let mut expected: BTreeMap<&AgentId, Vec<mesh_core::model::TaskId>> =
            self.agents.keys().map(|a| (a, Vec::new())).collect();
        for t in state.tasks.values() {
            if let Some(list) = expected.get_mut(&t.agent_id)
                && !t.state.is_terminal()
            {
                list.push(t.id.clone());
            }
        }
        let msgs: Vec<(AgentId, ToAgent)> =
            expected.into_iter().map(|(a, expected)| (a.clone(), ToAgent::Reconcile { expected })).collect();
        self.outbox.extend(msgs);
    }

    /// Gossip's view of the members: an agent it declares failed is lost at once (unless it said
    /// it restarts: it has its re-register timeout), one that left is gone; one alive again
    /// whose session never broke re-registers, which puts its node and tasks back.
    async fn members(&mut self, members: &[crate::gossip::Member], now: Millis) {
        use crate::gossip::{MemberStatus, Role};
        // One status per node name: a node whose data dir was wiped is a new member beside its
        // failed old self, and the live one speaks for the name.
        let rank = |s: MemberStatus| match s {
            MemberStatus::Alive => 3,
            MemberStatus::Suspect => 2,
            MemberStatus::Left => 1,
            MemberStatus::Failed => 0,
        };
        let mut by_name: std::collections::BTreeMap<&str, MemberStatus> = std::collections::BTreeMap::new();
        for m in members.iter().filter(|m| m.role == Role::Agent) {
            let e = by_name.entry(m.name.as_str()).or_insert(m.status);
            if rank(m.status) > rank(*e) {
                *e = m.status;
            }
        }
        for (name, status) in by_name {
            let agent = AgentId::from(name);
            let known = self.store.state().agents.contains_key(&agent);
            match status {
                MemberStatus::Failed | MemberStatus::Left
                    if known && !self.restarting.contains_key(&agent) && self.lost.insert(agent.clone()) =>
                {
                    let why = if status == MemberStatus::Left {
                        "Agent left the cluster"
                    } else {
                        "Agent not live or unreachable"
                    };
                    // Its session may still look open: it gets no offers either way, and
                    // re-registers if gossip sees it alive again.
                    let rescinded = self.allocator.remove_agent(&agent);
                    self.mesos_rescinded(rescinded);
                    self.down.remove(&agent);
                    self.agent_lost(&agent, why, now).await;
                }
                MemberStatus::Alive if self.lost.remove(&agent) && self.agents.contains_key(&agent) => {
                    self.outbox.push_back((agent, ToAgent::Reregister));
                }
                _ => {}
            }
        }
    }

    /// Act on drains and reactivations recorded in the state: a drained agent gets no offers and
    /// its tasks are killed (their apps launch replacements on other agents); a reactivated one
    /// is offered again.
    async fn follow_drains(&mut self, now: Millis) {
        let wanted = self.store.state().draining.clone();
        if wanted == self.drained {
            return;
        }
        let drained: Vec<AgentId> = wanted.iter().filter(|a| !self.drained.contains(*a)).cloned().collect();
        let reactivated: Vec<AgentId> = self.drained.iter().filter(|a| !wanted.contains(*a)).cloned().collect();
        self.drained = wanted;
        for agent in drained {
            info!(%agent, "draining: no new tasks, its tasks move elsewhere");
            let rescinded = self.allocator.remove_agent(&agent);
            self.mesos_rescinded(rescinded);
            let state = self.store.state().clone();
            let calls: Vec<Call> = state
                .tasks
                .values()
                .filter(|t| t.agent_id == agent && !t.state.is_terminal() && !t.kill_requested)
                .map(|t| {
                    let grace = t
                        .app_id
                        .as_ref()
                        .and_then(|a| state.apps.get(a))
                        .map(|r| r.app.kill_grace())
                        .unwrap_or(Duration::from_secs(3));
                    Call::Kill { task_id: t.id.clone(), agent_id: agent.clone(), grace }
                })
                .collect();
            self.handle_calls(calls, now).await;
        }
        for agent in reactivated {
            info!(%agent, "reactivated: offered again");
            let state = self.store.state().clone();
            if let (Some(a), true) = (state.agents.get(&agent), self.agents.contains_key(&agent)) {
                self.allocator.add_agent(agent.clone(), a.hostname.clone(), a.resources.clone(), a.attributes.clone());
                for t in state.tasks.values().filter(|t| t.agent_id == agent && !t.state.is_terminal()) {
                    self.allocator.track_used(&agent, &t.framework_id, &t.resources);
                }
            }
        }
    }

    /// Agents whose time to come back ran out.
    async fn lost_agents(&mut self, now: Millis) {
        let due: Vec<AgentId> = self.down.iter().filter(|(_, d)| **d <= now).map(|(a, _)| a.clone()).collect();
        for agent in due {
            self.down.remove(&agent);
            self.restarting.remove(&agent);
            self.agent_lost(&agent, "Agent not live or unreachable", now).await;
        }
    }

    /// An agent is lost (or left): like Consul's serfHealth when gossip marks a node failed, its
    /// services leave DNS; frameworks hear of it; its tasks become unreachable, to be replaced
    /// by their apps' `unreachableStrategy` unless it comes back.
    async fn agent_lost(&mut self, agent: &AgentId, why: &str, now: Millis) {
        warn!(%agent, reason = why, "agent lost");
        self.apply(vec![Command::UpdateCheck {
            node: agent.0.clone(),
            id: mesh_core::catalog::SERF_HEALTH.into(),
            status: mesh_core::catalog::Health::Critical,
            output: why.into(),
            now,
            ttl: mesh_core::state::TtlUpdate::Keep,
        }])
        .await;
        let unreachable: Vec<Command> = self
            .store
            .state()
            .tasks
            .values()
            .filter(|t| t.agent_id == *agent && !t.state.is_terminal() && t.state != TaskState::Unreachable)
            .map(|t| Command::TaskStatus {
                task_id: t.id.clone(),
                state: TaskState::Unreachable,
                message: format!("agent {agent} is unreachable"),
                at: now,
            })
            .collect();
        self.apply(unreachable).await;
        self.publish();
        self.mesos_agent_lost(agent);
    }
}
