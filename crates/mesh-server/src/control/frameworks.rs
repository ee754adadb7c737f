//! Frameworks of the Mesos v1 scheduler API inside the control loop: subscriptions and their
//! event streams, calls (ACCEPT, DECLINE, KILL, RECONCILE, ...), status updates re-sent until
//! acknowledged, failover timers, heartbeats, and offers routed to every framework that is not
//! the stock Marathon scheduler. The bookkeeping itself is sans-IO in
//! [`mesh_core::frameworks`]; this module is the glue to the store, allocator and agents.

use super::{Control, ControlError, ControlHandle, ControlMsg};
use mesh_core::allocator::{self, Allocator};
use mesh_core::frameworks::{LaunchContext, Sessions, status_of, task_launch};
use mesh_core::mesos::{
    self, Call, CallType, ErrorEvent, Event, FrameworkInfo, Id, MasterInfo, Offers, Rescind, Subscribed, TaskState,
    TaskStatus, Update,
};
use mesh_core::model::{AgentId, FrameworkId, Millis, PortRanges, Resources, TaskId};
use mesh_core::proto::ToAgent;
use mesh_core::state::Command;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

/// Events a subscription may have queued before it counts as too slow and is closed.
const STREAM_BUFFER: usize = 4096;

/// Settings of the Mesos side of the control loop.
#[derive(Clone, Debug)]
pub struct MesosConfig {
    /// Outstanding offers are rescinded after this long (`None`: never), so a framework that
    /// hoards offers cannot starve the others.
    pub offer_timeout: Option<Duration>,
    /// HEARTBEAT interval of subscription streams.
    pub heartbeat: Duration,
    /// Unacknowledged status updates are re-sent after this long.
    pub update_resend: Duration,
    /// An agent is offered only when its free cpus, mem and disk are each at least these.
    pub min_allocatable: Resources,
    /// What framework tasks' containers may reach of the host.
    pub host_access: mesh_core::runtime::HostAccess,
    /// Host name reported in `master_info`.
    pub hostname: String,
}

impl Default for MesosConfig {
    fn default() -> Self {
        Self {
            offer_timeout: Some(Duration::from_secs(30)),
            heartbeat: Duration::from_secs(15),
            update_resend: Duration::from_secs(10),
            min_allocatable: Resources::scalars(0.001, 0.0, 0.0),
            host_access: Default::default(),
            hostname: "localhost".into(),
        }
    }
}

/// Why a scheduler call was refused (Mesos' HTTP answers).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MesosError {
    /// 400 Bad Request.
    #[error("{0}")]
    BadRequest(String),
    /// 403 Forbidden.
    #[error("{0}")]
    Forbidden(String),
    /// The control side is not running, or its log failed (503).
    #[error(transparent)]
    Control(#[from] ControlError),
}

/// A subscription: the framework's id, the stream id, and its events.
pub struct Subscription {
    /// The framework's id.
    pub framework_id: FrameworkId,
    /// The `Mesos-Stream-Id` of this subscription.
    pub stream_id: String,
    /// Events, SUBSCRIBED (or ERROR) first. Ends when the subscription ends.
    pub events: mpsc::Receiver<Event>,
}

/// A Mesos-API message to the control task.
pub enum MesosMsg {
    /// SUBSCRIBE (validated).
    Subscribe(Box<Call>, oneshot::Sender<Result<Subscription, MesosError>>),
    /// Any other call (validated), with the caller's `Mesos-Stream-Id`.
    Call(Box<Call>, Option<String>, oneshot::Sender<Result<(), MesosError>>),
}

/// What `/master/state` shows about frameworks beyond the state log: connections and offers.
#[derive(Clone, Debug, Default)]
pub struct MesosView {
    /// Frameworks by id (Mesos-API ones; Marathon is added by the API).
    pub frameworks: BTreeMap<FrameworkId, LiveFramework>,
    /// Outstanding offers of every framework.
    pub offers: Vec<allocator::Offer>,
    /// Effective role weights.
    pub weights: BTreeMap<String, f64>,
    /// The master id.
    pub master_id: String,
}

/// A framework's live status.
#[derive(Clone, Debug, Default)]
pub struct LiveFramework {
    /// It has a subscription stream.
    pub connected: bool,
    /// It receives offers (connected and not suppressed).
    pub active: bool,
    /// Since when it is disconnected.
    pub disconnected_at: Option<Millis>,
    /// Status updates waiting for an acknowledgement.
    pub unacknowledged: usize,
}

/// The control loop's Mesos-side state (not logged: connections and timers).
pub(super) struct Frameworks {
    cfg: MesosConfig,
    master_id: String,
    sessions: Sessions,
    streams: BTreeMap<FrameworkId, (String, mpsc::Sender<Event>)>,
    weights: BTreeMap<String, f64>,
    quotas: BTreeMap<String, mesh_core::frameworks::Quota>,
    next_id: u64,
}

impl Frameworks {
    pub(super) fn new(cfg: MesosConfig, clock: &dyn mesh_core::model::Clock) -> Self {
        let sessions = Sessions::new(cfg.heartbeat.as_millis() as Millis, cfg.update_resend.as_millis() as Millis);
        Self {
            cfg,
            master_id: clock.uuid().to_string(),
            sessions,
            streams: BTreeMap::new(),
            weights: BTreeMap::new(),
            quotas: BTreeMap::new(),
            next_id: 0,
        }
    }

    /// The allocator configuration these settings imply.
    pub(super) fn allocator_config(cfg: &MesosConfig) -> allocator::AllocatorConfig {
        allocator::AllocatorConfig {
            offer_timeout_ms: cfg.offer_timeout.map(|d| d.as_millis() as Millis),
            min_allocatable: cfg.min_allocatable.clone(),
            fair_share_slices: true,
        }
    }
}

impl ControlHandle {
    /// SUBSCRIBE: the framework's id, stream id and event stream.
    pub async fn mesos_subscribe(&self, call: Call) -> Result<Subscription, MesosError> {
        call.validate().map_err(|e| MesosError::BadRequest(format!("Failed to validate scheduler::Call: {e}")))?;
        if call.kind != CallType::Subscribe {
            return Err(MesosError::BadRequest("Expecting a SUBSCRIBE call".into()));
        }
        let (tx, rx) = oneshot::channel();
        self.send(ControlMsg::Mesos(MesosMsg::Subscribe(Box::new(call), tx))).await?;
        rx.await.map_err(|_| MesosError::Control(ControlError::Stopped))?
    }

    /// Any call but SUBSCRIBE, on stream `stream_id`.
    pub async fn mesos_call(&self, call: Call, stream_id: Option<String>) -> Result<(), MesosError> {
        call.validate().map_err(|e| MesosError::BadRequest(format!("Failed to validate scheduler::Call: {e}")))?;
        if call.kind == CallType::Subscribe {
            return Err(MesosError::BadRequest("SUBSCRIBE opens a stream: use mesos_subscribe".into()));
        }
        let (tx, rx) = oneshot::channel();
        self.send(ControlMsg::Mesos(MesosMsg::Call(Box::new(call), stream_id, tx))).await?;
        rx.await.map_err(|_| MesosError::Control(ControlError::Stopped))?
    }
}

fn fw_id(id: &Id) -> FrameworkId {
    FrameworkId(id.value.clone())
}

/// A status update's uuid in Mesos' encoding, from the control loop's id source.
fn new_uuid(clock: &dyn mesh_core::model::Clock) -> String {
    mesos::encode_uuid(clock.uuid().into_bytes())
}

/// Mesos' role name rules (the subset that matters here).
fn role_error(role: &str) -> Option<String> {
    if role == "*" {
        return None;
    }
    let bad = role.is_empty()
        || role == "."
        || role == ".."
        || role.starts_with('-')
        || role.starts_with('/')
        || role.ends_with('/')
        || role.chars().any(|c| c.is_whitespace() || c.is_control() || c == '\\');
    bad.then(|| format!("Role '{role}' is invalid"))
}

/// The part of `want` that `have` holds: scalars capped, ports intersected.
fn part_of(have: &Resources, want: &Resources) -> Resources {
    Resources {
        cpus: have.cpus.min(want.cpus),
        mem: have.mem.min(want.mem),
        disk: have.disk.min(want.disk),
        ports: PortRanges::from_ports(want.ports.iter().filter(|p| have.ports.contains(*p))),
    }
}

impl Control {
    /// Register frameworks recovered from the log: known, disconnected, their failover timers
    /// running from now, not offered anything until they subscribe again.
    pub(super) fn mesos_recover(&mut self, now: Millis) {
        let state = self.store.state().clone();
        for (id, f) in state.mesos.frameworks.iter() {
            self.allocator.add_framework(id.clone(), f.info.effective_role());
            self.allocator.suppress(id);
            self.mesos.sessions.recover(id.clone(), f.info.failover_timeout_ms(), now);
            info!(framework = %id, "framework recovered from the log; waiting for it to re-subscribe");
        }
    }

    pub(super) async fn mesos_msg(&mut self, msg: MesosMsg, now: Millis) {
        match msg {
            MesosMsg::Subscribe(call, reply) => {
                let res = self.mesos_subscribe(*call, now).await;
                let _ = reply.send(res);
            }
            MesosMsg::Call(call, stream, reply) => {
                let res = self.mesos_call(*call, stream, now).await;
                let _ = reply.send(res);
            }
        }
    }

    async fn mesos_subscribe(&mut self, call: Call, now: Millis) -> Result<Subscription, MesosError> {
        let Some(sub) = call.subscribe else { return Err(MesosError::BadRequest("Expecting 'subscribe'".into())) };
        let mut info: FrameworkInfo = sub.framework_info;
        let stream_id = self.cfg.clock.uuid().to_string();
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let id = match &info.id {
            Some(i) if !i.value.is_empty() => fw_id(i),
            _ => {
                self.mesos.next_id += 1;
                FrameworkId(format!("{}-{:04}", self.mesos.master_id, self.mesos.next_id - 1))
            }
        };
        let refusal = if id.0 == "marathon" {
            Some("Framework id 'marathon' belongs to the stock Marathon scheduler".to_owned())
        } else if self.store.state().mesos.is_removed(&id) {
            Some("Framework has been removed".to_owned())
        } else {
            role_error(&info.effective_role())
        };
        if let Some(message) = refusal {
            let _ = tx.try_send(Event::Error(ErrorEvent { message }));
            return Ok(Subscription { framework_id: id, stream_id, events: rx });
        }
        let role = info.effective_role();
        info.id = Some(Id::new(id.0.clone()));
        // A new subscription replaces the old one: it hears why, and its stream ends.
        if let Some((_, old)) = self.mesos.streams.remove(&id) {
            let _ = old.try_send(Event::Error(ErrorEvent { message: "Framework failed over".into() }));
        }
        let res = self
            .apply(vec![Command::SubscribeFramework { id: id.clone(), info: Box::new(info.clone()), at: now }])
            .await;
        if !res.first().is_some_and(|r| r.is_ok()) {
            return Err(MesosError::Control(ControlError::Stopped));
        }
        self.allocator.add_framework(id.clone(), role.clone());
        self.allocator.set_min_allocatable(&id, info.min_allocatable());
        if sub.suppressed_roles.contains(&role) {
            self.allocator.suppress(&id);
        } else {
            self.allocator.revive(&id);
        }
        let heartbeat = self.mesos.cfg.heartbeat.as_secs_f64();
        let subscribed = Event::Subscribed(Subscribed {
            framework_id: Id::new(id.0.clone()),
            heartbeat_interval_seconds: Some(heartbeat),
            master_info: Some(MasterInfo {
                id: self.mesos.master_id.clone(),
                ip: 0,
                port: 0,
                hostname: Some(self.mesos.cfg.hostname.clone()),
                version: Some(mesos::MESOS_VERSION.into()),
            }),
        });
        let _ = tx.try_send(subscribed);
        let pending = self.mesos.sessions.connect(&id, stream_id.clone(), info.failover_timeout_ms(), now);
        for status in pending {
            let _ = tx.try_send(Event::Update(Update { status }));
        }
        info!(framework = %id, name = %info.name, %role, "framework subscribed");
        self.mesos.streams.insert(id.clone(), (stream_id.clone(), tx));
        Ok(Subscription { framework_id: id, stream_id, events: rx })
    }

    async fn mesos_call(&mut self, call: Call, stream: Option<String>, now: Millis) -> Result<(), MesosError> {
        let Some(fid) = call.framework_id.as_ref().map(fw_id) else {
            return Err(MesosError::BadRequest("Expecting 'framework_id' to be present".into()));
        };
        let Some(record) = self.store.state().mesos.frameworks.get(&fid).cloned() else {
            return Err(MesosError::BadRequest("Framework cannot be found".into()));
        };
        let connected = self.mesos.sessions.get(&fid).and_then(|s| s.stream_id.clone());
        let Some(current) = connected else {
            return Err(MesosError::Forbidden("Framework is not subscribed".into()));
        };
        let Some(stream) = stream else {
            return Err(MesosError::BadRequest(
                "All non-subscribe calls should include the 'Mesos-Stream-Id' header".into(),
            ));
        };
        if stream != current {
            return Err(MesosError::BadRequest(format!(
                "The stream ID '{stream}' included in this request didn't match the stream ID currently associated with framework ID {fid}"
            )));
        }
        let partition_aware = record.info.has_capability("PARTITION_AWARE");
        match call.kind {
            CallType::Teardown => {
                info!(framework = %fid, "TEARDOWN");
                self.mesos_teardown(&fid, now).await;
            }
            CallType::Accept => {
                if let Some(a) = call.accept {
                    self.mesos_accept(&fid, a, partition_aware, now).await;
                }
            }
            CallType::Decline => {
                if let Some(d) = call.decline {
                    let filters = d.filters.unwrap_or_default().to_allocator();
                    for oid in d.offer_ids {
                        let oid = mesh_core::model::OfferId(oid.value);
                        if self.allocator.offer(&oid).is_some_and(|o| o.framework_id == fid) {
                            debug!(framework = %fid, offer = %oid, refuse_seconds = filters.refuse_seconds, "declined");
                            let _ = self.allocator.decline(&oid, filters, now);
                        } else {
                            debug!(framework = %fid, offer = %oid, "DECLINE of an offer that is no longer valid: ignored");
                        }
                    }
                }
            }
            CallType::Revive => self.allocator.revive(&fid),
            CallType::Suppress => self.allocator.suppress(&fid),
            CallType::Kill => {
                if let Some(k) = call.kill {
                    let grace = k
                        .kill_policy
                        .and_then(|p| p.grace_period)
                        .map(|g| Duration::from_nanos(g.nanoseconds.clamp(0, 3_600_000_000_000) as u64));
                    self.mesos_kill(&fid, &TaskId(k.task_id.value), grace, partition_aware, now).await;
                }
            }
            CallType::Shutdown => {
                // The command executor's id is its task's id: shutting it down kills the task.
                if let Some(s) = call.shutdown {
                    let task = TaskId(s.executor_id.value);
                    if self.store.state().tasks.get(&task).is_some_and(|t| t.framework_id == fid) {
                        self.mesos_kill(&fid, &task, None, partition_aware, now).await;
                    }
                }
            }
            CallType::Acknowledge => {
                if let Some(a) = call.acknowledge {
                    let task = TaskId(a.task_id.value);
                    match self.mesos.sessions.acknowledge(&fid, &task, &a.uuid, now) {
                        Ok(Some(next)) => self.mesos_send(&fid, Event::Update(Update { status: next })),
                        Ok(None) => {}
                        Err(e) => debug!(framework = %fid, error = %e, "acknowledgement ignored"),
                    }
                }
            }
            CallType::Reconcile => {
                let tasks = call.reconcile.map(|r| r.tasks).unwrap_or_default();
                self.mesos_reconcile(&fid, tasks, partition_aware, now);
            }
            CallType::UpdateFramework => {
                if let Some(u) = call.update_framework {
                    let mut info = u.framework_info;
                    if info.id.as_ref().map(fw_id) != Some(fid.clone()) {
                        return Err(MesosError::BadRequest(
                            "Failed to validate scheduler::Call: 'framework_info.id' differs from 'framework_id'"
                                .into(),
                        ));
                    }
                    let role = info.effective_role();
                    if let Some(e) = role_error(&role) {
                        return Err(MesosError::BadRequest(e));
                    }
                    info.id = Some(Id::new(fid.0.clone()));
                    self.apply(vec![Command::SubscribeFramework {
                        id: fid.clone(),
                        info: Box::new(info.clone()),
                        at: now,
                    }])
                    .await;
                    self.allocator.add_framework(fid.clone(), role.clone());
                    self.allocator.set_min_allocatable(&fid, info.min_allocatable());
                    if u.suppressed_roles.contains(&role) {
                        self.allocator.suppress(&fid);
                    }
                }
            }
            CallType::Message => debug!(framework = %fid, "MESSAGE dropped: mesh runs no custom executors"),
            CallType::Request => debug!(framework = %fid, "REQUEST ignored (as by Mesos' allocator)"),
            CallType::AcceptInverseOffers
            | CallType::DeclineInverseOffers
            | CallType::AcknowledgeOperationStatus
            | CallType::ReconcileOperations => {
                debug!(framework = %fid, call = ?call.kind, "ignored: mesh sends no inverse offers or operation feedback")
            }
            CallType::Subscribe | CallType::Unknown => {
                return Err(MesosError::BadRequest(format!("Unexpected call {:?}", call.kind)));
            }
        }
        Ok(())
    }

    /// Send an event on a framework's stream; a closed or full stream ends the subscription.
    fn mesos_send(&mut self, fid: &FrameworkId, ev: Event) {
        let Some((_, tx)) = self.mesos.streams.get(fid) else { return };
        if let Err(e) = tx.try_send(ev) {
            let why = match e {
                mpsc::error::TrySendError::Full(_) => "too slow: its event buffer is full",
                mpsc::error::TrySendError::Closed(_) => "its stream is closed",
            };
            warn!(framework = %fid, why, "framework disconnected");
            self.mesos_disconnected(fid, self.cfg.clock.now());
        }
    }

    fn mesos_disconnected(&mut self, fid: &FrameworkId, now: Millis) {
        self.mesos.streams.remove(fid);
        self.mesos.sessions.disconnect(fid, now);
        // Its offers go back; it gets none while away.
        let mine: Vec<mesh_core::model::OfferId> =
            self.allocator.outstanding().into_iter().filter(|o| &o.framework_id == fid).map(|o| o.id.clone()).collect();
        for o in mine {
            let _ = self.allocator.decline(&o, allocator::Filters::refuse(0.0), now);
        }
        self.allocator.suppress(fid);
    }

    async fn mesos_teardown(&mut self, fid: &FrameworkId, now: Millis) {
        let state = self.store.state().clone();
        let tasks: Vec<(TaskId, AgentId)> = state
            .tasks
            .values()
            .filter(|t| &t.framework_id == fid)
            .map(|t| (t.id.clone(), t.agent_id.clone()))
            .collect();
        if !tasks.is_empty() {
            let ids = tasks.iter().map(|(t, _)| t.clone()).collect();
            self.apply(vec![Command::KillTasks { ids, scale: false, now, deployment_id: None }]).await;
            for (task_id, agent) in tasks {
                self.outbox.push_back((agent, ToAgent::Kill { task_id, grace: Duration::from_secs(3) }));
            }
        }
        self.allocator.remove_framework(fid);
        self.mesos.sessions.remove(fid);
        self.mesos.streams.remove(fid);
        self.apply(vec![Command::RemoveFramework { id: fid.clone(), at: now }]).await;
    }

    fn mesos_update(&mut self, fid: &FrameworkId, status: TaskStatus) {
        self.mesos_send(fid, Event::Update(Update { status }));
    }

    async fn mesos_kill(
        &mut self,
        fid: &FrameworkId,
        task_id: &TaskId,
        grace: Option<Duration>,
        partition_aware: bool,
        now: Millis,
    ) {
        let task = self.store.state().tasks.get(task_id).filter(|t| &t.framework_id == fid).cloned();
        let Some(t) = task else {
            info!(framework = %fid, task = %task_id, "cannot kill task: it is unknown; performing reconciliation");
            let reconcile = vec![mesos::ReconcileTask { task_id: Id::new(task_id.0.clone()), agent_id: None }];
            self.mesos_reconcile(fid, reconcile, partition_aware, now);
            return;
        };
        if !t.kill_requested {
            self.apply(vec![Command::KillTasks { ids: vec![t.id.clone()], scale: false, now, deployment_id: None }])
                .await;
        }
        let grace = grace.unwrap_or(Duration::from_secs(3));
        self.outbox.push_back((t.agent_id.clone(), ToAgent::Kill { task_id: t.id.clone(), grace }));
    }

    fn mesos_reconcile(
        &mut self,
        fid: &FrameworkId,
        tasks: Vec<mesos::ReconcileTask>,
        partition_aware: bool,
        now: Millis,
    ) {
        let state = self.store.state().clone();
        let mut out = Vec::new();
        let known = |t: &mesh_core::state::Task| {
            let mut s = status_of(&t.id, Some(&t.agent_id), t.state.into(), now);
            s.source = Some("SOURCE_MASTER".into());
            s.reason = Some("REASON_RECONCILIATION".into());
            s.message = Some("Reconciliation: Latest task state".into());
            s
        };
        if tasks.is_empty() {
            out.extend(state.tasks.values().filter(|t| &t.framework_id == fid).map(known));
        } else {
            for r in tasks {
                let id = TaskId(r.task_id.value.clone());
                match state.tasks.get(&id).filter(|t| &t.framework_id == fid) {
                    Some(t) => out.push(known(t)),
                    None => {
                        let st = if partition_aware { TaskState::Unknown } else { TaskState::Lost };
                        let agent = r.agent_id.as_ref().map(|a| AgentId(a.value.clone()));
                        let mut s = status_of(&id, agent.as_ref(), st, now);
                        s.source = Some("SOURCE_MASTER".into());
                        s.reason = Some("REASON_RECONCILIATION".into());
                        s.message = Some("Reconciliation: Task is unknown".into());
                        out.push(s);
                    }
                }
            }
        }
        for s in out {
            self.mesos_update(fid, s);
        }
    }

    async fn mesos_accept(&mut self, fid: &FrameworkId, accept: mesos::Accept, partition_aware: bool, now: Millis) {
        let filters = accept.filters.unwrap_or_default().to_allocator();
        let mut infos = Vec::new();
        let mut unsupported = Vec::new();
        for op in accept.operations {
            match (op.kind.as_str(), op.launch) {
                ("LAUNCH", Some(l)) => infos.extend(l.task_infos),
                (kind, _) => {
                    warn!(framework = %fid, kind, "offer operation not supported: only LAUNCH is");
                    if kind == "LAUNCH_GROUP" {
                        let tasks = op
                            .launch_group
                            .as_ref()
                            .and_then(|g| g.pointer("/task_group/tasks"))
                            .and_then(|t| serde_json::from_value::<Vec<mesos::TaskInfo>>(t.clone()).ok())
                            .unwrap_or_default();
                        unsupported.extend(tasks);
                    }
                }
            }
        }
        for t in unsupported {
            let mut s = status_of(&TaskId(t.task_id.value.clone()), None, TaskState::Error, now);
            s.source = Some("SOURCE_MASTER".into());
            s.reason = Some("REASON_TASK_INVALID".into());
            s.message = Some("LAUNCH_GROUP is not supported by mesh: use LAUNCH".into());
            self.mesos_update(fid, s);
        }
        // The offers: each must be outstanding, this framework's, all of one agent.
        let mut error = None;
        let mut agent: Option<(AgentId, String)> = None;
        let mut valid: Vec<allocator::Offer> = Vec::new();
        if accept.offer_ids.is_empty() {
            error = Some("No offers specified".to_owned());
        }
        for oid in &accept.offer_ids {
            let id = mesh_core::model::OfferId(oid.value.clone());
            if valid.iter().any(|o| o.id == id) {
                error.get_or_insert(format!("Duplicate offer {id} in ACCEPT"));
                continue;
            }
            match self.allocator.offer(&id) {
                None => {
                    error.get_or_insert(format!("Offer {id} is no longer valid"));
                }
                Some(o) if &o.framework_id != fid => {
                    error.get_or_insert(format!(
                        "Offer {id} has invalid framework {} while framework {fid} is expected",
                        o.framework_id
                    ));
                }
                Some(o) => {
                    match &agent {
                        Some((a, _)) if *a != o.agent_id => {
                            error.get_or_insert(format!(
                                "Aggregated offers must belong to one single agent. Offer {id} uses agent {} and offer {} uses agent {a}",
                                o.agent_id, valid[0].id
                            ));
                        }
                        _ => agent = Some((o.agent_id.clone(), o.hostname.clone())),
                    }
                    valid.push(o.clone());
                }
            }
        }
        if let Some(err) = error {
            warn!(framework = %fid, error = %err, "ACCEPT with invalid offers");
            for o in &valid {
                let _ = self.allocator.decline(&o.id, allocator::Filters::refuse(0.0), now);
            }
            for t in infos {
                let st = if partition_aware { TaskState::Dropped } else { TaskState::Lost };
                let agent = AgentId(t.agent_id.value.clone());
                let mut s = status_of(&TaskId(t.task_id.value.clone()), Some(&agent), st, now);
                s.source = Some("SOURCE_MASTER".into());
                s.reason = Some("REASON_INVALID_OFFERS".into());
                s.message = Some(format!("Task launched with invalid offers: {err}"));
                self.mesos_update(fid, s);
            }
            return;
        }
        let Some((agent, hostname)) = agent else { return };
        let mut total = Resources::default();
        for o in &valid {
            total.add(&o.resources);
        }
        let mut remaining = total.clone();
        let mut launches: Vec<mesh_core::frameworks::TaskLaunch> = Vec::new();
        let state = self.store.state().clone();
        for info in &infos {
            let cx = LaunchContext {
                framework: fid,
                agent: &agent,
                hostname: &hostname,
                remaining: &remaining,
                host_access: &self.mesos.cfg.host_access,
                now,
            };
            let id = TaskId(info.task_id.value.clone());
            let res = if state.tasks.contains_key(&id) || launches.iter().any(|l| l.task.id == id) {
                Err(format!("Task has duplicate ID: {id}"))
            } else {
                task_launch(info, &cx)
            };
            match res {
                Ok(l) => {
                    remaining.subtract(&l.task.resources);
                    launches.push(l);
                }
                Err(msg) => {
                    info!(framework = %fid, task = %id, error = %msg, "task refused");
                    let mut s = status_of(&id, Some(&agent), TaskState::Error, now);
                    s.source = Some("SOURCE_MASTER".into());
                    s.reason = Some("REASON_TASK_INVALID".into());
                    s.message = Some(msg);
                    self.mesos_update(fid, s);
                }
            }
        }
        // Consume the offers: each gives what it holds of the tasks' resources; the rest is
        // declined with the accept's filters.
        let mut used = Resources::default();
        for l in &launches {
            used.add(&l.task.resources);
        }
        for o in &valid {
            let part = part_of(&o.resources, &used);
            if let Err(e) = self.allocator.accept(&o.id, &part, filters, now) {
                warn!(error = %e, "accept refused by the allocator");
            }
            used.subtract(&part);
        }
        if launches.is_empty() {
            return;
        }
        let names = launches.iter().map(|l| l.name.clone()).collect();
        let tasks = launches.iter().map(|l| l.task.clone()).collect();
        let res = self.apply(vec![Command::LaunchFrameworkTasks { tasks, names }]).await;
        if res.first().is_some_and(|r| r.is_ok()) {
            for l in launches {
                info!(framework = %fid, task = %l.task.id, name = %l.name, "launching");
                self.outbox.push_back((agent.clone(), ToAgent::Launch(l.spec)));
            }
        } else {
            for l in launches {
                self.allocator.recover(&agent, fid, &l.task.resources);
                let st = if partition_aware { TaskState::Dropped } else { TaskState::Lost };
                let mut s = status_of(&l.task.id, Some(&agent), st, now);
                s.source = Some("SOURCE_MASTER".into());
                s.message = Some("the launch could not be recorded".into());
                self.mesos_update(fid, s);
            }
        }
    }

    /// Commands that applied: forward status changes of framework tasks (with a uuid, re-sent
    /// until acknowledged).
    pub(super) fn mesos_applied(&mut self, applied: &[Command], before: &mesh_core::state::State, now: Millis) {
        for cmd in applied {
            let Command::TaskStatus { task_id, state, message, at } = cmd else { continue };
            let Some(t) = before.tasks.get(task_id) else { continue };
            if !self.store.state().mesos.frameworks.contains_key(&t.framework_id) {
                continue;
            }
            let mut s = status_of(task_id, Some(&t.agent_id), (*state).into(), *at);
            s.source = Some("SOURCE_EXECUTOR".into());
            s.message = Some(message.clone()).filter(|m| !m.is_empty());
            s.executor_id = Some(Id::new(task_id.0.clone()));
            if *state == mesh_core::proto::TaskState::Lost {
                s.source = Some("SOURCE_MASTER".into());
                s.reason = Some("REASON_AGENT_RESTARTED".into());
            }
            s.uuid = Some(new_uuid(self.cfg.clock.as_ref()));
            let fid = t.framework_id.clone();
            if let Some(send) = self.mesos.sessions.enqueue(&fid, s, now) {
                self.mesos_update(&fid, send);
            }
        }
    }

    /// Offers made to frameworks other than Marathon.
    pub(super) fn mesos_offers(&mut self, offers: Vec<allocator::Offer>, now: Millis) {
        let mut by_fw: BTreeMap<FrameworkId, Vec<allocator::Offer>> = BTreeMap::new();
        for o in offers {
            by_fw.entry(o.framework_id.clone()).or_default().push(o);
        }
        for (fid, list) in by_fw {
            let role = self.store.state().mesos.frameworks.get(&fid).map(|f| f.info.effective_role());
            match (role, self.mesos.streams.contains_key(&fid)) {
                (Some(role), true) => {
                    for o in &list {
                        debug!(framework = %fid, offer = %o.id, resources = %o.resources, "offer");
                    }
                    let offers = list.iter().map(|o| mesos::Offer::from_allocation(o, &role)).collect();
                    self.mesos_send(&fid, Event::Offers(Offers { offers }));
                }
                _ => {
                    for o in list {
                        let _ = self.allocator.decline(&o.id, allocator::Filters::refuse(0.0), now);
                    }
                }
            }
        }
    }

    /// Offers that were withdrawn (expired, or their agent went away).
    pub(super) fn mesos_rescinded(&mut self, offers: Vec<allocator::Offer>) {
        for o in offers {
            if o.framework_id.0 == "marathon" {
                continue;
            }
            debug!(framework = %o.framework_id, offer = %o.id, "offer rescinded");
            self.mesos_send(&o.framework_id, Event::Rescind(Rescind { offer_id: Id::new(o.id.0.clone()) }));
        }
    }

    /// An agent went away: its offers are rescinded and every framework hears of it.
    pub(super) fn mesos_agent_lost(&mut self, agent: &AgentId) {
        let rescinded = self.allocator.remove_agent(agent);
        self.mesos_rescinded(rescinded);
        let fids: Vec<FrameworkId> = self.mesos.streams.keys().cloned().collect();
        for fid in fids {
            let failure = mesos::Failure { agent_id: Some(Id::new(agent.0.clone())), executor_id: None, status: None };
            self.mesos_send(&fid, Event::Failure(failure));
        }
    }

    /// Timers: broken streams, failover timeouts, re-sends, heartbeats; weights and quota from
    /// the state; the published view.
    pub(super) async fn mesos_step(&mut self, now: Millis) {
        let closed: Vec<FrameworkId> =
            self.mesos.streams.iter().filter(|(_, (_, tx))| tx.is_closed()).map(|(id, _)| id.clone()).collect();
        for fid in closed {
            info!(framework = %fid, "framework disconnected; its failover timeout starts");
            self.mesos_disconnected(&fid, now);
        }
        let due = self.mesos.sessions.tick(now);
        for fid in due.expired {
            info!(framework = %fid, "failover timeout ran out: tearing the framework down");
            self.mesos_teardown(&fid, now).await;
        }
        for (fid, status) in due.resend {
            self.mesos_update(&fid, status);
        }
        for fid in due.heartbeat {
            self.mesos_send(&fid, Event::Heartbeat);
        }
        let state = self.store.state().clone();
        if state.mesos.weights != self.mesos.weights {
            for (role, w) in &state.mesos.weights {
                self.allocator.set_weight(role, *w);
            }
            self.mesos.weights = state.mesos.weights.clone();
        }
        if state.mesos.quotas != self.mesos.quotas {
            for role in self.mesos.quotas.keys() {
                if !state.mesos.quotas.contains_key(role) {
                    self.allocator.set_quota(role, None);
                }
            }
            for role in state.mesos.quotas.keys() {
                self.allocator.set_quota(role, state.mesos.quota_limits(role).as_ref());
            }
            self.mesos.quotas = state.mesos.quotas.clone();
        }
        let mut view = MesosView {
            offers: self.allocator.outstanding().into_iter().cloned().collect(),
            weights: self.allocator.weights(),
            master_id: self.mesos.master_id.clone(),
            ..Default::default()
        };
        for (id, s) in self.mesos.sessions.iter() {
            let connected = s.stream_id.is_some();
            view.frameworks.insert(
                id.clone(),
                LiveFramework {
                    connected,
                    active: connected && !self.allocator.is_suppressed(id),
                    disconnected_at: s.disconnected_at,
                    unacknowledged: s.unacknowledged(),
                },
            );
        }
        self.published.mesos.store(Arc::new(view));
    }
}
