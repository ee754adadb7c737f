//! Write your own framework: receive resource offers and launch tasks on a mesh (or Mesos)
//! master through the Mesos v1 scheduler API, without the stock Marathon scheduler.
//!
//! A [`Framework`] is a level-triggered reconciler: it is handed offers, task status updates and
//! a periodic [`Framework::reconcile`] call with its [`View`] of its tasks, and answers each with
//! [`Action`]s. It does no I/O. The [`Driver`] does the rest over a [`Transport`]:
//!
//! - subscribes (and re-subscribes with the same framework id, with backoff, after the stream
//!   breaks or [`DriverOptions::heartbeat_misses`] heartbeats are missed),
//! - acknowledges every status update that carries a uuid, after the framework has seen it,
//! - declines the offers a framework's actions leave untouched,
//! - asks the master for the latest state of every task (implicit reconciliation) every
//!   [`DriverOptions::reconcile_interval`] and then calls [`Framework::reconcile`],
//! - tears the framework down when [`Framework::is_done`] turns true.
//!
//! [`HttpTransport`] speaks HTTP to `POST /api/v1/scheduler` (chunked RecordIO events). A mesh
//! node can also run the same framework in-process: `mesh_server::framework::InProcess` is a
//! [`Transport`] over the node's control loop.
//!
//! # Example
//!
//! Run three `echo` jobs and stop:
//!
//! ```no_run
//! use mesh_sdk::framework::{
//!     Action, Driver, Framework, FrameworkInfo, HttpTransport, Offer, TaskInfo, TaskInfoExt, TaskStatus, View,
//! };
//!
//! struct Echo { launched: usize, finished: usize }
//!
//! impl Framework for Echo {
//!     fn offers(&mut self, _view: &View, offers: &[Offer]) -> Vec<Action> {
//!         let mut actions = Vec::new();
//!         for offer in offers {
//!             if self.launched < 3 {
//!                 let id = format!("echo-{}", self.launched);
//!                 self.launched += 1;
//!                 let task = TaskInfo::command(&id, offer, "echo hello", 0.1, 32.0);
//!                 actions.push(Action::launch(offer, vec![task]));
//!             }
//!         }
//!         actions
//!     }
//!     fn status(&mut self, _view: &View, status: &TaskStatus) -> Vec<Action> {
//!         if status.state == mesh_sdk::framework::TaskState::Finished {
//!             self.finished += 1;
//!         }
//!         Vec::new()
//!     }
//!     fn is_done(&self) -> bool { self.finished == 3 }
//! }
//!
//! # async fn run() -> Result<(), mesh_sdk::framework::FrameworkError> {
//! let transport = HttpTransport::new("http://127.0.0.1:8080")?;
//! let info = FrameworkInfo { name: "echo".into(), ..Default::default() };
//! let mut echo = Echo { launched: 0, finished: 0 };
//! Driver::new(transport, info).run(&mut echo).await?;
//! # Ok(()) }
//! ```

use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use mesh_core::mesos::{self, RecordIoDecoder};
pub use mesh_core::mesos::{
    Call, CallType, CommandInfo, ContainerInfo, DockerInfo, Event, Filters, FrameworkInfo, Id, Offer, Resource,
    TaskInfo, TaskState, TaskStatus,
};

/// Every Mesos wire type (resources, container settings, calls, events).
pub use mesh_core::mesos as wire;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;
use tokio::time::Instant;
use tracing::{debug, info, warn};

/// Errors of the driver and its transports.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FrameworkError {
    /// The master could not be reached, or the connection broke.
    #[error("cannot reach the master: {0}")]
    Connect(String),
    /// The master refused a request (Mesos answers with a status and a plain-text reason).
    #[error("the master answered {status}: {message}")]
    Rejected {
        /// HTTP status (400, 403, 415, ...).
        status: u16,
        /// The master's reason.
        message: String,
    },
    /// The event stream is not valid RecordIO.
    #[error("malformed event stream: {0}")]
    RecordIo(#[from] mesos::RecordIoError),
    /// An event is not valid JSON of a known event.
    #[error("malformed event: {0}")]
    Decode(String),
    /// The subscription was answered with an ERROR event.
    #[error("the master refused the subscription: {0}")]
    Refused(String),
    /// The framework was torn down (by TEARDOWN or after its failover timeout) and may not come back.
    #[error("the framework has been removed: {0}")]
    Removed(String),
    /// Another scheduler subscribed with this framework's id and took over.
    #[error("another scheduler took over the framework: {0}")]
    FailedOver(String),
    /// No subscription could be made for [`DriverOptions::give_up_after`].
    #[error("no subscription for {0:?}; giving up")]
    GaveUp(Duration),
    /// A configuration or argument error.
    #[error("{0}")]
    Invalid(String),
}

impl FrameworkError {
    /// Whether re-subscribing may help (the master is away or the stream broke), as opposed to
    /// an answer that will not change.
    pub fn is_retryable(&self) -> bool {
        match self {
            FrameworkError::Connect(_) | FrameworkError::RecordIo(_) | FrameworkError::Decode(_) => true,
            FrameworkError::Rejected { status, .. } => *status >= 500 || *status == 307,
            _ => false,
        }
    }
}

/// What a framework asks the master to do.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum Action {
    /// Launch tasks on (all of one agent's) offers; what the tasks leave is declined with `filters`.
    Launch {
        /// The offers.
        offer_ids: Vec<Id>,
        /// The tasks.
        tasks: Vec<TaskInfo>,
        /// Filter for the unused rest.
        filters: Filters,
    },
    /// Decline offers.
    Decline {
        /// The offers.
        offer_ids: Vec<Id>,
        /// How long not to be offered those agents again.
        filters: Filters,
    },
    /// Kill a task.
    Kill {
        /// The task.
        task_id: Id,
        /// Its agent, when known.
        agent_id: Option<Id>,
    },
    /// Ask for offers again (clears filters).
    Revive,
    /// Stop receiving offers until [`Action::Revive`].
    Suppress,
    /// Ask for the latest status of these tasks (empty: of every task of the framework).
    Reconcile(Vec<Id>),
}

impl Action {
    /// Launch `tasks` on one offer (the rest is declined for 1 s).
    pub fn launch(offer: &Offer, tasks: Vec<TaskInfo>) -> Self {
        Action::Launch { offer_ids: vec![offer.id.clone()], tasks, filters: Filters::refuse(1.0) }
    }

    /// Decline an offer for `seconds`.
    pub fn decline(offer: &Offer, seconds: f64) -> Self {
        Action::Decline { offer_ids: vec![offer.id.clone()], filters: Filters::refuse(seconds) }
    }

    /// Kill a task.
    pub fn kill(task_id: &str) -> Self {
        Action::Kill { task_id: Id::new(task_id), agent_id: None }
    }
}

/// Helpers to build a task.
pub trait TaskInfoExt {
    /// A shell command task on `offer`'s agent using `cpus` and `mem` (MiB).
    fn command(id: &str, offer: &Offer, cmd: &str, cpus: f64, mem: f64) -> TaskInfo;
}

impl TaskInfoExt for TaskInfo {
    fn command(id: &str, offer: &Offer, cmd: &str, cpus: f64, mem: f64) -> TaskInfo {
        TaskInfo {
            name: id.to_owned(),
            task_id: Id::new(id),
            agent_id: offer.agent_id.clone(),
            resources: vec![Resource::scalar("cpus", cpus), Resource::scalar("mem", mem)],
            command: Some(CommandInfo::shell(cmd)),
            ..Default::default()
        }
    }
}

/// Scalar amount of a resource in an offer (e.g. `"cpus"`).
pub fn offered(offer: &Offer, name: &str) -> f64 {
    offer.resources.iter().filter(|r| r.name == name).filter_map(|r| r.scalar.map(|s| s.value)).sum()
}

/// The framework's view of its tasks, kept by the driver from status updates.
#[derive(Clone, Debug, Default, PartialEq)]
#[non_exhaustive]
pub struct View {
    /// The framework's id (once subscribed).
    pub framework_id: Option<Id>,
    /// Latest status of every task that has not ended, by task id.
    pub tasks: BTreeMap<String, TaskStatus>,
    /// Outstanding offers (given to [`Framework::offers`] and not yet used, declined or rescinded).
    pub offers: BTreeSet<String>,
}

/// A framework: the decisions, no I/O. Every callback answers with [`Action`]s.
pub trait Framework: Send {
    /// The framework (re-)subscribed; `view.framework_id` is set.
    fn subscribed(&mut self, view: &View) -> Vec<Action> {
        let _ = view;
        Vec::new()
    }
    /// New offers. Offers no action mentions are declined by the driver.
    fn offers(&mut self, view: &View, offers: &[Offer]) -> Vec<Action>;
    /// A task status update (the view already holds it; ended tasks leave the view after this).
    fn status(&mut self, view: &View, status: &TaskStatus) -> Vec<Action> {
        let _ = (view, status);
        Vec::new()
    }
    /// Periodic reconciliation: compare what should run with `view.tasks`.
    fn reconcile(&mut self, view: &View) -> Vec<Action> {
        let _ = view;
        Vec::new()
    }
    /// An offer was withdrawn.
    fn rescinded(&mut self, view: &View, offer_id: &Id) -> Vec<Action> {
        let _ = (view, offer_id);
        Vec::new()
    }
    /// The master reported an error.
    fn error(&mut self, message: &str) {
        let _ = message;
    }
    /// When true, the driver tears the framework down and returns.
    fn is_done(&self) -> bool {
        false
    }
}

/// A subscription: its stream id and events.
pub struct Subscription {
    /// `Mesos-Stream-Id`.
    pub stream_id: String,
    /// Events, SUBSCRIBED (or ERROR) first.
    pub events: BoxStream<'static, Result<Event, FrameworkError>>,
}

/// How the driver reaches a master.
#[async_trait::async_trait]
pub trait Transport: Send + Sync {
    /// Send SUBSCRIBE and open the event stream.
    async fn subscribe(&self, call: Call) -> Result<Subscription, FrameworkError>;
    /// Send any other call on stream `stream_id`.
    async fn call(&self, stream_id: &str, call: Call) -> Result<(), FrameworkError>;
}

/// The Mesos v1 scheduler API over HTTP: `POST {master}/api/v1/scheduler`.
#[derive(Clone, Debug)]
pub struct HttpTransport {
    url: String,
    client: reqwest::Client,
}

impl HttpTransport {
    /// A transport to `master` (`http://host:port` or `host:port`).
    pub fn new(master: &str) -> Result<Self, FrameworkError> {
        let base = if master.contains("://") { master.to_owned() } else { format!("http://{master}") };
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| FrameworkError::Invalid(format!("HTTP client: {e}")))?;
        Ok(Self { url: format!("{}/api/v1/scheduler", base.trim_end_matches('/')), client })
    }

    async fn rejected(resp: reqwest::Response) -> FrameworkError {
        let status = resp.status().as_u16();
        let message = resp.text().await.unwrap_or_default();
        FrameworkError::Rejected { status, message }
    }
}

/// Decode a RecordIO byte stream into events.
pub fn decode_events<S, E>(bytes: S) -> BoxStream<'static, Result<Event, FrameworkError>>
where
    S: futures_util::Stream<Item = Result<bytes::Bytes, E>> + Send + 'static,
    E: std::fmt::Display + Send + 'static,
{
    let state = (Box::pin(bytes), RecordIoDecoder::new(), false);
    futures_util::stream::unfold(state, |(mut bytes, mut dec, mut failed)| async move {
        if failed {
            return None;
        }
        loop {
            match dec.next_record() {
                Ok(Some(rec)) => {
                    let ev = serde_json::from_slice::<Event>(&rec).map_err(|e| FrameworkError::Decode(e.to_string()));
                    failed = ev.is_err();
                    return Some((ev, (bytes, dec, failed)));
                }
                Ok(None) => {}
                Err(e) => return Some((Err(FrameworkError::RecordIo(e)), (bytes, dec, true))),
            }
            match bytes.next().await {
                Some(Ok(chunk)) => dec.feed(&chunk),
                Some(Err(e)) => return Some((Err(FrameworkError::Connect(e.to_string())), (bytes, dec, true))),
                None => return None,
            }
        }
    })
    .boxed()
}

#[async_trait::async_trait]
impl Transport for HttpTransport {
    async fn subscribe(&self, call: Call) -> Result<Subscription, FrameworkError> {
        let resp = self
            .client
            .post(&self.url)
            .header("Content-Type", "application/json")
            .header("Accept", "application/json")
            .json(&call)
            .send()
            .await
            .map_err(|e| FrameworkError::Connect(e.to_string()))?;
        if resp.status().as_u16() != 200 {
            return Err(Self::rejected(resp).await);
        }
        let stream_id = resp
            .headers()
            .get("Mesos-Stream-Id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
            .ok_or_else(|| FrameworkError::Decode("SUBSCRIBE answer has no Mesos-Stream-Id".into()))?;
        Ok(Subscription { stream_id, events: decode_events(resp.bytes_stream()) })
    }

    async fn call(&self, stream_id: &str, call: Call) -> Result<(), FrameworkError> {
        let resp = self
            .client
            .post(&self.url)
            .header("Content-Type", "application/json")
            .header("Mesos-Stream-Id", stream_id)
            .timeout(Duration::from_secs(30))
            .json(&call)
            .send()
            .await
            .map_err(|e| FrameworkError::Connect(e.to_string()))?;
        if resp.status().is_success() { Ok(()) } else { Err(Self::rejected(resp).await) }
    }
}

/// Settings of the [`Driver`].
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct DriverOptions {
    /// Re-subscribe after this many heartbeat intervals without any event (Mesos' advice: 5).
    pub heartbeat_misses: u32,
    /// First re-subscription delay; doubles (with jitter) up to `backoff_max`.
    pub backoff_min: Duration,
    /// Longest re-subscription delay (Mesos' advice: at most about 15 s).
    pub backoff_max: Duration,
    /// Give up after this long without a subscription.
    pub give_up_after: Duration,
    /// How often to reconcile (implicit RECONCILE call, then [`Framework::reconcile`]).
    pub reconcile_interval: Duration,
    /// Offers the framework leaves untouched are declined for this long.
    pub decline_seconds: f64,
}

impl Default for DriverOptions {
    fn default() -> Self {
        Self {
            heartbeat_misses: 5,
            backoff_min: Duration::from_millis(500),
            backoff_max: Duration::from_secs(15),
            give_up_after: Duration::from_secs(300),
            reconcile_interval: Duration::from_secs(30),
            decline_seconds: 5.0,
        }
    }
}

impl DriverOptions {
    /// Set `heartbeat_misses`.
    pub fn heartbeat_misses(mut self, n: u32) -> Self {
        self.heartbeat_misses = n.max(1);
        self
    }
    /// Set the backoff bounds.
    pub fn backoff(mut self, min: Duration, max: Duration) -> Self {
        self.backoff_min = min;
        self.backoff_max = max.max(min);
        self
    }
    /// Set `give_up_after`.
    pub fn give_up_after(mut self, d: Duration) -> Self {
        self.give_up_after = d;
        self
    }
    /// Set `reconcile_interval`.
    pub fn reconcile_interval(mut self, d: Duration) -> Self {
        self.reconcile_interval = d;
        self
    }
    /// Set `decline_seconds`.
    pub fn decline_seconds(mut self, s: f64) -> Self {
        self.decline_seconds = s;
        self
    }
}

/// What a finished [`Driver::run`] reports.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct RunSummary {
    /// The framework's id.
    pub framework_id: Id,
    /// How many times it subscribed (1 + re-subscriptions).
    pub subscriptions: u32,
}

/// Runs a [`Framework`] against a master.
pub struct Driver<T: Transport> {
    transport: T,
    info: FrameworkInfo,
    opts: DriverOptions,
}

/// Why a subscription ended.
enum StreamEnd {
    /// The framework is done (torn down).
    Done,
    /// Re-subscribe.
    Lost(String),
}

impl<T: Transport> Driver<T> {
    /// A driver for a framework described by `info` (set `info.id` to fail over to an existing
    /// framework id).
    pub fn new(transport: T, info: FrameworkInfo) -> Self {
        Self { transport, info, opts: DriverOptions::default() }
    }

    /// Replace the options.
    pub fn with_options(mut self, opts: DriverOptions) -> Self {
        self.opts = opts;
        self
    }

    /// Subscribe and run `framework` until it is done ([`Framework::is_done`]), then tear it
    /// down. Re-subscribes with the same framework id when the stream breaks or heartbeats stop.
    pub async fn run<F: Framework + ?Sized>(mut self, framework: &mut F) -> Result<RunSummary, FrameworkError> {
        let mut view = View { framework_id: self.info.id.clone(), ..Default::default() };
        let mut subscriptions = 0u32;
        let mut attempt = 0u32;
        let mut last_ok = Instant::now();
        loop {
            self.info.id = view.framework_id.clone();
            let call = Call::subscribe(self.info.clone());
            let sub = match self.transport.subscribe(call).await {
                Ok(s) => s,
                Err(e) if e.is_retryable() => {
                    if last_ok.elapsed() >= self.opts.give_up_after {
                        return Err(FrameworkError::GaveUp(self.opts.give_up_after));
                    }
                    let delay = self.backoff(attempt);
                    warn!(error = %e, ?delay, "subscription failed; retrying");
                    attempt += 1;
                    tokio::time::sleep(delay).await;
                    continue;
                }
                Err(e) => return Err(e),
            };
            match self.serve(framework, &mut view, sub, &mut subscriptions, &mut attempt, &mut last_ok).await? {
                StreamEnd::Done => {
                    let framework_id = view.framework_id.clone().unwrap_or_default();
                    return Ok(RunSummary { framework_id, subscriptions });
                }
                StreamEnd::Lost(why) => {
                    if last_ok.elapsed() >= self.opts.give_up_after {
                        return Err(FrameworkError::GaveUp(self.opts.give_up_after));
                    }
                    let delay = self.backoff(attempt);
                    warn!(%why, ?delay, "subscription lost; re-subscribing with the same framework id");
                    attempt += 1;
                    view.offers.clear();
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    fn backoff(&self, attempt: u32) -> Duration {
        let base = self.opts.backoff_min.saturating_mul(1u32 << attempt.min(16)).min(self.opts.backoff_max);
        // Jitter of up to a quarter, from the clock: reconnecting frameworks do not stampede.
        let nanos =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
        let jitter = base.mul_f64((nanos % 1000) as f64 / 4000.0);
        base.saturating_sub(jitter)
    }

    async fn serve<F: Framework + ?Sized>(
        &self,
        framework: &mut F,
        view: &mut View,
        sub: Subscription,
        subscriptions: &mut u32,
        attempt: &mut u32,
        last_ok: &mut Instant,
    ) -> Result<StreamEnd, FrameworkError> {
        let Subscription { stream_id, mut events } = sub;
        // The first event says whether we are in.
        let first = match tokio::time::timeout(Duration::from_secs(30), events.next()).await {
            Ok(Some(Ok(ev))) => ev,
            Ok(Some(Err(e))) if e.is_retryable() => return Ok(StreamEnd::Lost(e.to_string())),
            Ok(Some(Err(e))) => return Err(e),
            Ok(None) => return Ok(StreamEnd::Lost("the stream ended before SUBSCRIBED".into())),
            Err(_) => return Ok(StreamEnd::Lost("no SUBSCRIBED within 30 s".into())),
        };
        let heartbeat = match first {
            Event::Subscribed(s) => {
                view.framework_id = Some(s.framework_id.clone());
                s.heartbeat_interval_seconds.unwrap_or(mesos::DEFAULT_HEARTBEAT_SECONDS)
            }
            Event::Error(e) if e.message.contains("removed") => return Err(FrameworkError::Removed(e.message)),
            Event::Error(e) => return Err(FrameworkError::Refused(e.message)),
            other => {
                return Err(FrameworkError::Decode(format!("expected SUBSCRIBED first, got {}", other.type_name())));
            }
        };
        *subscriptions += 1;
        *attempt = 0;
        *last_ok = Instant::now();
        info!(framework_id = %view.framework_id.clone().unwrap_or_default(), "subscribed");
        let silence = Duration::from_secs_f64(heartbeat.max(0.05) * self.opts.heartbeat_misses as f64);
        let fid = view.framework_id.clone();
        let actions = framework.subscribed(view);
        self.execute(&stream_id, &fid, view, actions).await?;
        // Ask for the latest state of every task at once (after a failover especially).
        self.send(&stream_id, reconcile_call(&fid, &[])).await?;
        let mut next_reconcile = Instant::now() + self.opts.reconcile_interval;
        let mut last_event = Instant::now();
        loop {
            if framework.is_done() {
                info!("framework done: tearing down");
                let _ = self.send(&stream_id, Call::new(CallType::Teardown, fid.clone())).await;
                return Ok(StreamEnd::Done);
            }
            let deadline = (last_event + silence).min(next_reconcile);
            let ev = match tokio::time::timeout_at(deadline, events.next()).await {
                Ok(Some(Ok(ev))) => ev,
                Ok(Some(Err(e))) if e.is_retryable() => return Ok(StreamEnd::Lost(e.to_string())),
                Ok(Some(Err(e))) => return Err(e),
                Ok(None) => return Ok(StreamEnd::Lost("the event stream ended".into())),
                Err(_) if Instant::now() >= last_event + silence => {
                    let misses = self.opts.heartbeat_misses;
                    return Ok(StreamEnd::Lost(format!("no event for {silence:?} ({misses} heartbeats)")));
                }
                Err(_) => {
                    next_reconcile = Instant::now() + self.opts.reconcile_interval;
                    self.send(&stream_id, reconcile_call(&fid, &[])).await?;
                    let actions = framework.reconcile(view);
                    self.execute(&stream_id, &fid, view, actions).await?;
                    continue;
                }
            };
            last_event = Instant::now();
            *last_ok = Instant::now();
            let actions = match ev {
                Event::Heartbeat | Event::Subscribed(_) => Vec::new(),
                Event::Offers(o) => {
                    for offer in &o.offers {
                        view.offers.insert(offer.id.value.clone());
                    }
                    let mut actions = framework.offers(view, &o.offers);
                    // Offers nobody used or declined go back now, not at the offer timeout.
                    let touched: BTreeSet<&str> = actions
                        .iter()
                        .flat_map(|a| match a {
                            Action::Launch { offer_ids, .. } | Action::Decline { offer_ids, .. } => {
                                offer_ids.as_slice()
                            }
                            _ => &[],
                        })
                        .map(|i| i.value.as_str())
                        .collect();
                    let untouched: Vec<Id> = o
                        .offers
                        .iter()
                        .filter(|x| !touched.contains(x.id.value.as_str()))
                        .map(|x| x.id.clone())
                        .collect();
                    if !untouched.is_empty() {
                        actions.push(Action::Decline {
                            offer_ids: untouched,
                            filters: Filters::refuse(self.opts.decline_seconds),
                        });
                    }
                    actions
                }
                Event::Rescind(r) => {
                    view.offers.remove(&r.offer_id.value);
                    framework.rescinded(view, &r.offer_id)
                }
                Event::Update(u) => {
                    let status = u.status;
                    let key = status.task_id.value.clone();
                    view.tasks.insert(key.clone(), status.clone());
                    let actions = framework.status(view, &status);
                    if status.state.is_terminal() {
                        view.tasks.remove(&key);
                    }
                    if let (Some(uuid), Some(agent)) = (&status.uuid, &status.agent_id) {
                        let mut ack = Call::new(CallType::Acknowledge, fid.clone());
                        ack.acknowledge = Some(mesos::Acknowledge {
                            agent_id: agent.clone(),
                            task_id: status.task_id.clone(),
                            uuid: uuid.clone(),
                        });
                        self.send(&stream_id, ack).await?;
                    }
                    actions
                }
                Event::Message(m) => {
                    debug!(agent = %m.agent_id, executor = %m.executor_id, "executor message ignored");
                    Vec::new()
                }
                Event::Failure(f) => {
                    warn!(agent = ?f.agent_id, "agent or executor lost");
                    Vec::new()
                }
                Event::Error(e) => {
                    framework.error(&e.message);
                    if e.message.contains("removed") {
                        return Err(FrameworkError::Removed(e.message));
                    }
                    if e.message.contains("failed over") {
                        // Re-subscribing would take the framework back from its new scheduler.
                        return Err(FrameworkError::FailedOver(e.message));
                    }
                    return Ok(StreamEnd::Lost(format!("ERROR event: {}", e.message)));
                }
            };
            self.execute(&stream_id, &fid, view, actions).await?;
        }
    }

    async fn execute(
        &self,
        stream_id: &str,
        fid: &Option<Id>,
        view: &mut View,
        actions: Vec<Action>,
    ) -> Result<(), FrameworkError> {
        for a in actions {
            let call = match a {
                Action::Launch { offer_ids, tasks, filters } => {
                    for o in &offer_ids {
                        view.offers.remove(&o.value);
                    }
                    let mut c = Call::new(CallType::Accept, fid.clone());
                    c.accept = Some(mesos::Accept {
                        offer_ids,
                        operations: vec![mesos::Operation::launch(tasks)],
                        filters: Some(filters),
                    });
                    c
                }
                Action::Decline { offer_ids, filters } => {
                    for o in &offer_ids {
                        view.offers.remove(&o.value);
                    }
                    let mut c = Call::new(CallType::Decline, fid.clone());
                    c.decline = Some(mesos::Decline { offer_ids, filters: Some(filters) });
                    c
                }
                Action::Kill { task_id, agent_id } => {
                    let mut c = Call::new(CallType::Kill, fid.clone());
                    c.kill = Some(mesos::Kill { task_id, agent_id, kill_policy: None });
                    c
                }
                Action::Revive => Call::new(CallType::Revive, fid.clone()),
                Action::Suppress => Call::new(CallType::Suppress, fid.clone()),
                Action::Reconcile(ids) => reconcile_call(fid, &ids),
            };
            self.send(stream_id, call).await?;
        }
        Ok(())
    }

    /// Send a call; a refusal that means the subscription is gone surfaces as a lost stream on
    /// the next event (the stream ends), so only unexpected refusals are logged here.
    async fn send(&self, stream_id: &str, call: Call) -> Result<(), FrameworkError> {
        match self.transport.call(stream_id, call).await {
            Ok(()) => Ok(()),
            Err(FrameworkError::Rejected { status, message }) => {
                warn!(status, %message, "call refused");
                Ok(())
            }
            Err(e) if e.is_retryable() => {
                warn!(error = %e, "call failed");
                Ok(())
            }
            Err(e) => Err(e),
        }
    }
}

fn reconcile_call(fid: &Option<Id>, ids: &[Id]) -> Call {
    let mut c = Call::new(CallType::Reconcile, fid.clone());
    c.reconcile = Some(mesos::Reconcile {
        tasks: ids.iter().map(|i| mesos::ReconcileTask { task_id: i.clone(), agent_id: None }).collect(),
    });
    c
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_core::mesos::{ErrorEvent, Offers, Subscribed, Update};
    use std::sync::{Arc, Mutex};
    use tokio::sync::mpsc;

    type Script = mpsc::UnboundedReceiver<Result<Event, FrameworkError>>;

    /// A master in memory: each subscribe hands out the next scripted event channel.
    #[derive(Clone, Default)]
    struct Fake {
        streams: Arc<Mutex<Vec<Script>>>,
        subscribes: Arc<Mutex<Vec<Call>>>,
        calls: Arc<Mutex<Vec<(String, Call)>>>,
    }

    impl Fake {
        fn stream(&self) -> mpsc::UnboundedSender<Result<Event, FrameworkError>> {
            let (tx, rx) = mpsc::unbounded_channel();
            self.streams.lock().unwrap().push(rx);
            tx
        }
        fn calls_of(&self, kind: CallType) -> Vec<Call> {
            self.calls.lock().unwrap().iter().filter(|(_, c)| c.kind == kind).map(|(_, c)| c.clone()).collect()
        }
    }

    #[async_trait::async_trait]
    impl Transport for Fake {
        async fn subscribe(&self, call: Call) -> Result<Subscription, FrameworkError> {
            self.subscribes.lock().unwrap().push(call);
            let mut s = self.streams.lock().unwrap();
            if s.is_empty() {
                return Err(FrameworkError::Connect("no master".into()));
            }
            let rx = s.remove(0);
            let n = self.subscribes.lock().unwrap().len();
            let events = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|e| (e, rx)) });
            Ok(Subscription { stream_id: format!("s{n}"), events: events.boxed() })
        }
        async fn call(&self, stream_id: &str, call: Call) -> Result<(), FrameworkError> {
            self.calls.lock().unwrap().push((stream_id.to_owned(), call));
            Ok(())
        }
    }

    fn subscribed(id: &str, hb: f64) -> Result<Event, FrameworkError> {
        Ok(Event::Subscribed(Subscribed {
            framework_id: Id::new(id),
            heartbeat_interval_seconds: Some(hb),
            master_info: None,
        }))
    }

    fn offer(id: &str) -> Offer {
        Offer {
            id: Id::new(id),
            framework_id: Id::new("fw"),
            agent_id: Id::new("a1"),
            hostname: "h".into(),
            resources: vec![Resource::scalar("cpus", 1.0), Resource::scalar("mem", 128.0)],
            attributes: vec![],
            executor_ids: vec![],
            allocation_info: None,
        }
    }

    fn update(task: &str, state: TaskState, uuid: Option<&str>) -> Result<Event, FrameworkError> {
        Ok(Event::Update(Update {
            status: TaskStatus {
                task_id: Id::new(task),
                state,
                message: None,
                source: None,
                reason: None,
                agent_id: Some(Id::new("a1")),
                executor_id: None,
                timestamp: None,
                uuid: uuid.map(str::to_owned),
                healthy: None,
            },
        }))
    }

    /// Launches one task on the first offer, done when it finished.
    #[derive(Default)]
    struct One {
        launched: bool,
        finished: bool,
        seen: Vec<String>,
    }

    impl Framework for One {
        fn offers(&mut self, _v: &View, offers: &[Offer]) -> Vec<Action> {
            if self.launched {
                return Vec::new();
            }
            self.launched = true;
            vec![Action::launch(&offers[0], vec![TaskInfo::command("t1", &offers[0], "true", 0.1, 32.0)])]
        }
        fn status(&mut self, v: &View, s: &TaskStatus) -> Vec<Action> {
            assert!(v.tasks.contains_key(&s.task_id.value), "the view holds the update");
            self.seen.push(s.state.as_str().to_owned());
            self.finished |= s.state == TaskState::Finished;
            Vec::new()
        }
        fn is_done(&self) -> bool {
            self.finished
        }
    }

    #[tokio::test(start_paused = true)]
    async fn launches_acknowledges_declines_the_rest_and_tears_down() {
        let fake = Fake::default();
        let tx = fake.stream();
        tx.send(subscribed("fw", 15.0)).unwrap();
        tx.send(Ok(Event::Offers(Offers { offers: vec![offer("o1"), offer("o2")] }))).unwrap();
        tx.send(update("t1", TaskState::Running, Some("u1"))).unwrap();
        tx.send(update("t1", TaskState::Finished, Some("u2"))).unwrap();
        let mut fw = One::default();
        let summary = Driver::new(fake.clone(), FrameworkInfo::default()).run(&mut fw).await.unwrap();
        assert_eq!(summary, RunSummary { framework_id: Id::new("fw"), subscriptions: 1 });
        assert_eq!(fw.seen, vec!["TASK_RUNNING", "TASK_FINISHED"]);
        let accept = &fake.calls_of(CallType::Accept)[0];
        assert_eq!(accept.accept.as_ref().unwrap().offer_ids, vec![Id::new("o1")]);
        let decline = &fake.calls_of(CallType::Decline)[0];
        assert_eq!(decline.decline.as_ref().unwrap().offer_ids, vec![Id::new("o2")], "the untouched offer");
        let acks: Vec<String> =
            fake.calls_of(CallType::Acknowledge).iter().map(|c| c.acknowledge.as_ref().unwrap().uuid.clone()).collect();
        assert_eq!(acks, vec!["u1", "u2"]);
        assert_eq!(fake.calls_of(CallType::Teardown).len(), 1);
        assert!(fake.calls.lock().unwrap().iter().all(|(s, _)| s == "s1"), "calls carry the stream id");
    }

    #[tokio::test(start_paused = true)]
    async fn missed_heartbeats_resubscribe_with_the_same_framework_id() {
        let fake = Fake::default();
        let first = fake.stream();
        first.send(subscribed("fw-7", 1.0)).unwrap();
        // ... then silence: no heartbeat for 5 intervals.
        let second = fake.stream();
        second.send(subscribed("fw-7", 1.0)).unwrap();
        second.send(Ok(Event::Offers(Offers { offers: vec![offer("o1")] }))).unwrap();
        second.send(update("t1", TaskState::Finished, None)).unwrap();
        let started = Instant::now();
        let mut fw = One::default();
        let opts =
            DriverOptions::default().heartbeat_misses(5).backoff(Duration::from_millis(100), Duration::from_secs(1));
        let summary =
            Driver::new(fake.clone(), FrameworkInfo::default()).with_options(opts).run(&mut fw).await.unwrap();
        assert_eq!(summary.subscriptions, 2);
        let elapsed = started.elapsed();
        assert!(elapsed >= Duration::from_secs(5) && elapsed < Duration::from_secs(7), "{elapsed:?}");
        let subs = fake.subscribes.lock().unwrap().clone();
        assert_eq!(subs[0].framework_id, None);
        assert_eq!(subs[1].subscribe.as_ref().unwrap().framework_info.id, Some(Id::new("fw-7")));
        assert_eq!(subs[1].framework_id, Some(Id::new("fw-7")));
        drop(first);
    }

    #[tokio::test(start_paused = true)]
    async fn a_broken_stream_retries_with_backoff_and_a_removed_framework_is_an_error() {
        let fake = Fake::default();
        let s1 = fake.stream();
        s1.send(subscribed("fw", 15.0)).unwrap();
        s1.send(Err(FrameworkError::RecordIo(mesos::RecordIoError::BadHeader("x".into())))).unwrap();
        let s2 = fake.stream();
        s2.send(Ok(Event::Error(ErrorEvent { message: "Framework has been removed".into() }))).unwrap();
        let mut fw = One::default();
        let err = Driver::new(fake.clone(), FrameworkInfo::default()).run(&mut fw).await.unwrap_err();
        assert!(matches!(err, FrameworkError::Removed(_)), "{err}");
        assert_eq!(fake.subscribes.lock().unwrap().len(), 2);
        // no master at all: retries with backoff, then gives up
        let none = Fake::default();
        let opts = DriverOptions::default().give_up_after(Duration::from_secs(20));
        let started = Instant::now();
        let err =
            Driver::new(none.clone(), FrameworkInfo::default()).with_options(opts).run(&mut fw).await.unwrap_err();
        assert!(matches!(err, FrameworkError::GaveUp(_)), "{err}");
        let tries = none.subscribes.lock().unwrap().len();
        assert!((4..=12).contains(&tries), "backoff grows: {tries} tries in {:?}", started.elapsed());
    }

    #[tokio::test]
    async fn recordio_bytes_decode_into_events_and_garbage_is_an_error() {
        let mut bytes = Event::Heartbeat.to_record();
        bytes.extend(Event::Offers(Offers { offers: vec![offer("o1")] }).to_record());
        let chunks: Vec<Result<bytes::Bytes, std::io::Error>> =
            bytes.chunks(7).map(|c| Ok(bytes::Bytes::copy_from_slice(c))).collect();
        let evs: Vec<_> = decode_events(futures_util::stream::iter(chunks)).collect().await;
        assert_eq!(evs.len(), 2);
        assert!(matches!(evs[0], Ok(Event::Heartbeat)));
        let bad: Vec<Result<bytes::Bytes, std::io::Error>> = vec![Ok(bytes::Bytes::from_static(b"zz\n{}"))];
        let evs: Vec<_> = decode_events(futures_util::stream::iter(bad)).collect().await;
        assert!(matches!(evs.as_slice(), [Err(FrameworkError::RecordIo(_))]));
        let bad_json: Vec<Result<bytes::Bytes, std::io::Error>> = vec![Ok(bytes::Bytes::from_static(b"2\n{}"))];
        let evs: Vec<_> = decode_events(futures_util::stream::iter(bad_json)).collect().await;
        assert!(matches!(evs.as_slice(), [Err(FrameworkError::Decode(_))]));
    }
}
