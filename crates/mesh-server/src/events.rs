//! The event bus behind `GET /v2/events` (Marathon's server-sent events).
//!
//! Events are derived from applied commands by a pure function ([`batch_events`]) and published
//! on a bounded broadcast channel. Publishing never waits: a client that falls more than
//! [`CLIENT_BUFFER`] events behind is dropped (its stream ends with an
//! `event_stream_detached`-style close), so a slow consumer can never slow the control loop.

use mesh_core::model::{Millis, TaskId, iso8601};
use mesh_core::state::{Command, Deployment, State};
use serde_json::{Value, json};
use std::sync::Arc;
use tokio::sync::broadcast;

/// How many events a client may lag behind before it is dropped.
pub const CLIENT_BUFFER: usize = 4096;

/// One event: its type and its JSON body (with `eventType` and `timestamp`).
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    /// Marathon's event type, e.g. `status_update_event`.
    pub event_type: String,
    /// The serialized body.
    pub data: String,
}

impl Event {
    /// Build an event; `eventType` and `timestamp` are added to `body`.
    pub fn new(event_type: &str, mut body: Value, now: Millis) -> Self {
        if let Some(o) = body.as_object_mut() {
            o.insert("eventType".into(), Value::from(event_type));
            o.insert("timestamp".into(), Value::from(iso8601(now)));
        }
        Event { event_type: event_type.to_owned(), data: body.to_string() }
    }
}

/// The bus: cheap to clone, publishing never blocks.
#[derive(Clone)]
pub struct EventBus {
    tx: broadcast::Sender<Arc<Event>>,
}

impl Default for EventBus {
    fn default() -> Self {
        Self::new()
    }
}

impl EventBus {
    /// A bus with the default client buffer.
    pub fn new() -> Self {
        let (tx, _) = broadcast::channel(CLIENT_BUFFER);
        Self { tx }
    }

    /// Publish (no subscriber is fine).
    pub fn publish(&self, e: Event) {
        let _ = self.tx.send(Arc::new(e));
    }

    /// A new subscription.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Event>> {
        self.tx.subscribe()
    }

    /// How many clients are attached.
    pub fn clients(&self) -> usize {
        self.tx.receiver_count()
    }
}

fn empty_group(version: Millis) -> Value {
    json!({"id": "/", "apps": [], "groups": [], "pods": [], "dependencies": [], "version": iso8601(version)})
}

/// The plan of a deployment, in the shape events carry (with the `original` and `target`
/// groups that marathon-python requires).
pub fn plan_json(d: &Deployment) -> Value {
    let steps: Vec<Value> = d
        .steps
        .iter()
        .map(|s| json!({"actions": s.iter().map(|a| json!({"action": a.action, "app": a.app})).collect::<Vec<_>>()}))
        .collect();
    json!({
        "id": d.id,
        "version": iso8601(d.version),
        "steps": steps,
        "original": empty_group(d.version),
        "target": empty_group(d.version),
    })
}

/// The events a batch of applied commands produces. `before` and `after` are the states around
/// the batch.
pub fn batch_events(cmds: &[Command], before: &State, after: &State, now: Millis) -> Vec<Event> {
    let mut out = Vec::new();
    // Deployments that started or ended with this command.
    for (id, d) in after.deployments.iter() {
        if !before.deployments.contains_key(id) {
            let current = d.steps.first().cloned().unwrap_or_default();
            out.push(Event::new(
                "deployment_info",
                json!({"plan": plan_json(d), "currentStep": {"actions": current.iter().map(|a| json!({"action": a.action, "app": a.app})).collect::<Vec<_>>()}}),
                now,
            ));
        }
    }
    for (id, d) in before.deployments.iter() {
        if !after.deployments.contains_key(id) {
            let finished = cmds.iter().any(|c| matches!(c.inner(), Command::EndDeployment { id: e } if e == id));
            if finished {
                for step in d.steps.iter().skip(d.current_step.saturating_sub(1)) {
                    out.push(Event::new(
                        "deployment_step_success",
                        json!({"plan": plan_json(d), "currentStep": {"actions": step.iter().map(|a| json!({"action": a.action, "app": a.app})).collect::<Vec<_>>()}}),
                        now,
                    ));
                }
                out.push(Event::new("deployment_success", json!({"id": id, "plan": plan_json(d)}), now));
            } else {
                let step = d.steps.get(d.current_step.saturating_sub(1)).cloned().unwrap_or_default();
                out.push(Event::new(
                    "deployment_step_failure",
                    json!({"plan": plan_json(d), "currentStep": {"actions": step.iter().map(|a| json!({"action": a.action, "app": a.app})).collect::<Vec<_>>()}}),
                    now,
                ));
                out.push(Event::new(
                    "deployment_failed",
                    json!({"id": id, "plan": plan_json(d), "reason": "cancelled"}),
                    now,
                ));
            }
        }
    }
    // A check's previous result within this batch (a check may report twice in one batch).
    let mut alive: std::collections::HashMap<(&TaskId, usize), bool> = std::collections::HashMap::new();
    for cmd in cmds {
        if let Command::TaskHealth { task_id, check, result } = cmd.inner() {
            let was = alive
                .insert((task_id, *check), result.alive)
                .or_else(|| before.tasks.get(task_id).and_then(|t| t.health.get(*check)).map(|r| r.alive));
            health_events(task_id, *check, was, result.alive, after, now, &mut out);
        }
        command_events(cmd.inner(), before, after, now, &mut out);
    }
    out
}

/// Marathon's events for one health check result: `failed_health_check_event` for a failure,
/// and `instance_health_changed_event` plus `health_status_changed_event` when the task's
/// health changed (or is first known).
fn health_events(
    task_id: &TaskId,
    check: usize,
    was: Option<bool>,
    alive: bool,
    after: &State,
    now: Millis,
    out: &mut Vec<Event>,
) {
    let Some(t) = after.tasks.get(task_id) else { return };
    let app = t.app_id.as_ref().map(|a| a.to_string()).unwrap_or_default();
    if !alive {
        let hc = t
            .app_id
            .as_ref()
            .and_then(|a| after.apps.get(a))
            .and_then(|r| r.app.health_checks.get(check).cloned())
            .unwrap_or_default();
        out.push(Event::new(
            "failed_health_check_event",
            json!({"appId": app, "taskId": task_id, "instanceId": task_id, "healthCheck": hc}),
            now,
        ));
    }
    if was != Some(alive) {
        let version = iso8601(t.version);
        out.push(Event::new(
            "instance_health_changed_event",
            json!({"instanceId": task_id, "runSpecId": app, "runSpecVersion": version, "healthy": alive}),
            now,
        ));
        out.push(Event::new(
            "health_status_changed_event",
            json!({"appId": app, "taskId": task_id, "instanceId": task_id, "version": version, "alive": alive}),
            now,
        ));
    }
}

fn command_events(cmd: &Command, before: &State, after: &State, now: Millis, out: &mut Vec<Event>) {
    match cmd {
        Command::PutApp { app, .. } => {
            let old_checks = before.apps.get(&app.id).map(|r| r.app.health_checks.clone()).unwrap_or_default();
            let version = iso8601(now);
            for hc in app.health_checks.iter().filter(|h| !old_checks.contains(h)) {
                out.push(Event::new(
                    "add_health_check_event",
                    json!({"appId": app.id, "healthCheck": hc, "version": version}),
                    now,
                ));
            }
            for hc in old_checks.iter().filter(|h| !app.health_checks.contains(h)) {
                out.push(Event::new(
                    "remove_health_check_event",
                    json!({"appId": app.id, "healthCheck": hc, "version": version}),
                    now,
                ));
            }
            let body = serde_json::to_value(after.apps.get(&app.id).map(|r| &r.app)).unwrap_or(Value::Null);
            out.push(Event::new(
                "api_post_event",
                json!({"clientIp": "", "uri": format!("/v2/apps{}", app.id), "appDefinition": body}),
                now,
            ));
            out.push(Event::new("group_change_success", json!({"groupId": "/", "version": iso8601(now)}), now));
        }
        Command::RestartApp { id, .. } | Command::RollbackApp { id, .. } => {
            let body = serde_json::to_value(after.apps.get(id).map(|r| &r.app)).unwrap_or(Value::Null);
            out.push(Event::new(
                "api_post_event",
                json!({"clientIp": "", "uri": format!("/v2/apps{id}"), "appDefinition": body}),
                now,
            ));
        }
        Command::PutGroup { group, .. } | Command::DeleteGroup { group, .. } => {
            out.push(Event::new("group_change_success", json!({"groupId": group, "version": iso8601(now)}), now));
        }
        Command::DeleteApp { id, .. } => {
            out.push(Event::new("app_terminated_event", json!({"appId": id}), now));
            out.push(Event::new("group_change_success", json!({"groupId": "/", "version": iso8601(now)}), now));
        }
        Command::LaunchTasks { tasks } => {
            for t in tasks {
                out.extend(task_events(t, t.state.as_str(), "", now, after));
            }
        }
        Command::TaskStatus { task_id, state, message, .. } => {
            if let Some(t) = before.tasks.get(task_id).or_else(|| after.tasks.get(task_id)) {
                out.extend(task_events(t, state.as_str(), message, now, after));
            }
        }
        _ => {}
    }
}

fn task_events(t: &mesh_core::state::Task, state: &str, message: &str, now: Millis, view: &State) -> [Event; 2] {
    let address = view.agents.get(&t.agent_id).map(|a| a.address.to_string()).unwrap_or_default();
    let app = t.app_id.as_ref().map(|a| a.to_string()).unwrap_or_default();
    let version = iso8601(t.version);
    let instance = Event::new(
        "instance_changed_event",
        json!({"instanceId": t.id, "condition": state, "runSpecId": app, "agentId": t.agent_id, "host": t.host, "runSpecVersion": version}),
        now,
    );
    let status = Event::new(
        "status_update_event",
        json!({
            "slaveId": t.agent_id,
            "taskId": t.id,
            "taskStatus": state,
            "message": message,
            "appId": app,
            "host": t.host,
            "ports": t.ports,
            "ipAddresses": [{"ipAddress": address, "protocol": "IPv4"}],
            "version": version,
        }),
        now,
    );
    [status, instance]
}
