//! The JSON objects of the Marathon v2 API, typed.
//!
//! Every object keeps the fields it does not name in `extra`, so a definition read from the
//! server can be changed and sent back without losing anything.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::BTreeMap;

/// An app definition: what `POST /v2/apps` and `PUT /v2/apps/{id}` take.
///
/// Only `id` is required; every `None` field is left out of the request, so Marathon's defaults
/// apply (1 instance, 1 CPU, 128 MiB).
///
/// ```
/// use mesh_sdk::marathon::AppDefinition;
/// let app = AppDefinition::new("/queue/worker").cmd("./worker --queue jobs").instances(2).cpus(0.1).mem(64.0);
/// assert_eq!(serde_json::to_value(&app).unwrap()["instances"], 2);
/// ```
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[non_exhaustive]
pub struct AppDefinition {
    /// The app id, e.g. `/web` or `/team/web`.
    #[serde(default)]
    pub id: String,
    /// Shell command (`/bin/sh -c`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmd: Option<String>,
    /// Argument vector (instead of `cmd`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args: Option<Vec<String>>,
    /// Desired number of instances.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instances: Option<u32>,
    /// CPU shares per instance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<f64>,
    /// Memory per instance, MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem: Option<f64>,
    /// Disk per instance, MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<f64>,
    /// Environment: values are strings, or `{"secret": name}` references.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<BTreeMap<String, Value>>,
    /// Labels (`SERVICE_NAME`, `SERVICE_TAGS` name the app's service in the catalog).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<BTreeMap<String, String>>,
    /// Container (Docker or Mesos), as Marathon's JSON.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<Value>,
    /// Host-mode ports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port_definitions: Option<Vec<PortDefinition>>,
    /// Health checks, as Marathon's JSON.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_checks: Option<Vec<Value>>,
    /// Placement constraints `[field, OP(, value)]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub constraints: Option<Vec<Vec<String>>>,
    /// Apps this one depends on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dependencies: Option<Vec<String>>,
    /// `{minimumHealthCapacity, maximumOverCapacity}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upgrade_strategy: Option<Value>,
    /// Every other field, kept as JSON.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl AppDefinition {
    /// A definition with just an id.
    pub fn new(id: impl Into<String>) -> Self {
        AppDefinition { id: id.into(), ..Default::default() }
    }
    /// Set the shell command.
    pub fn cmd(mut self, cmd: impl Into<String>) -> Self {
        self.cmd = Some(cmd.into());
        self
    }
    /// Set the argument vector.
    pub fn args<I: IntoIterator<Item = S>, S: Into<String>>(mut self, args: I) -> Self {
        self.args = Some(args.into_iter().map(Into::into).collect());
        self
    }
    /// Set the number of instances.
    pub fn instances(mut self, n: u32) -> Self {
        self.instances = Some(n);
        self
    }
    /// Set CPU shares per instance.
    pub fn cpus(mut self, cpus: f64) -> Self {
        self.cpus = Some(cpus);
        self
    }
    /// Set memory per instance (MiB).
    pub fn mem(mut self, mem: f64) -> Self {
        self.mem = Some(mem);
        self
    }
    /// Add an environment variable.
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.get_or_insert_with(BTreeMap::new).insert(key.into(), Value::String(value.into()));
        self
    }
    /// Add a label.
    pub fn label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.labels.get_or_insert_with(BTreeMap::new).insert(key.into(), value.into());
        self
    }
    /// Ask for `n` host ports (dynamic, `$PORT0..`), named `port0..`.
    pub fn ports(mut self, n: usize) -> Self {
        self.port_definitions = Some(
            (0..n).map(|i| PortDefinition { port: 0, name: Some(format!("port{i}")), ..Default::default() }).collect(),
        );
        self
    }
    /// Set any other field by its JSON name.
    pub fn field(mut self, key: impl Into<String>, value: Value) -> Self {
        self.extra.insert(key.into(), value);
        self
    }
}

/// One entry of `portDefinitions`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[non_exhaustive]
pub struct PortDefinition {
    /// Service port (0: assigned).
    #[serde(default)]
    pub port: u16,
    /// `tcp`, `udp` or `udp,tcp`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    /// Name (`$PORT_<NAME>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Labels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<BTreeMap<String, String>>,
}

/// An app as Marathon reports it: the definition plus its counts, deployments and (when
/// embedded) tasks.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
#[non_exhaustive]
pub struct App {
    /// The definition (with `extra` holding what it does not name).
    #[serde(flatten)]
    pub definition: AppDefinition,
    /// Version: the time of the last change.
    #[serde(default)]
    pub version: Option<String>,
    /// Tasks staging or starting.
    #[serde(default)]
    pub tasks_staged: u32,
    /// Tasks running.
    #[serde(default)]
    pub tasks_running: u32,
    /// Running tasks whose health checks pass.
    #[serde(default)]
    pub tasks_healthy: u32,
    /// Running tasks whose health checks fail.
    #[serde(default)]
    pub tasks_unhealthy: u32,
    /// Deployments in progress that touch the app.
    #[serde(default)]
    pub deployments: Vec<DeploymentRef>,
    /// Tasks, when embedded (always for `get_app`).
    #[serde(default)]
    pub tasks: Vec<Task>,
    /// The last failed task, when embedded.
    #[serde(default)]
    pub last_task_failure: Option<Value>,
}

impl App {
    /// The app id.
    pub fn id(&self) -> &str {
        &self.definition.id
    }
    /// The desired number of instances.
    pub fn instances(&self) -> u32 {
        self.definition.instances.unwrap_or(1)
    }
}

/// A reference to a deployment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct DeploymentRef {
    /// Deployment id.
    pub id: String,
}

/// The answer of a call that starts a deployment.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
#[non_exhaustive]
pub struct DeploymentResult {
    /// The new deployment's id.
    pub deployment_id: String,
    /// The new version.
    pub version: String,
}

/// A deployment in progress (`GET /v2/deployments`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
#[non_exhaustive]
pub struct Deployment {
    /// Deployment id.
    pub id: String,
    /// Target version.
    #[serde(default)]
    pub version: String,
    /// Apps it changes.
    #[serde(default)]
    pub affected_apps: Vec<String>,
    /// Steps, run one after another.
    #[serde(default)]
    pub steps: Vec<DeploymentStep>,
    /// Actions of the current step.
    #[serde(default)]
    pub current_actions: Vec<DeploymentAction>,
    /// 1-based index of the current step.
    #[serde(default)]
    pub current_step: u32,
    /// Number of steps.
    #[serde(default)]
    pub total_steps: u32,
}

/// One step of a deployment: actions that run together.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[non_exhaustive]
pub struct DeploymentStep {
    /// The actions.
    #[serde(default)]
    pub actions: Vec<DeploymentAction>,
}

/// One action of a deployment step.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[non_exhaustive]
pub struct DeploymentAction {
    /// `StartApplication`, `ScaleApplication`, `StopApplication`, `RestartApplication`, ...
    pub action: String,
    /// The app.
    #[serde(default)]
    pub app: Option<String>,
}

/// A task (`/v2/tasks`, `/v2/apps/{id}/tasks`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
#[non_exhaustive]
pub struct Task {
    /// Task id.
    pub id: String,
    /// The app.
    #[serde(default)]
    pub app_id: String,
    /// Host it runs on.
    #[serde(default)]
    pub host: String,
    /// Host ports.
    #[serde(default)]
    pub ports: Vec<u16>,
    /// Service ports.
    #[serde(default)]
    pub service_ports: Vec<u16>,
    /// Agent id.
    #[serde(default)]
    pub slave_id: String,
    /// Mesos task state, e.g. `TASK_RUNNING`.
    #[serde(default)]
    pub state: String,
    /// When it was staged.
    #[serde(default)]
    pub staged_at: Option<String>,
    /// When it started running.
    #[serde(default)]
    pub started_at: Option<String>,
    /// The app version it runs.
    #[serde(default)]
    pub version: Option<String>,
    /// Addresses.
    #[serde(default)]
    pub ip_addresses: Vec<IpAddress>,
    /// Results of the app's health checks.
    #[serde(default)]
    pub health_check_results: Vec<HealthCheckResult>,
    /// Every other field.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Task {
    /// Whether the task is `TASK_RUNNING`.
    pub fn is_running(&self) -> bool {
        self.state == "TASK_RUNNING"
    }
    /// Whether the task has health results and all of them are alive.
    pub fn is_healthy(&self) -> bool {
        !self.health_check_results.is_empty() && self.health_check_results.iter().all(|h| h.alive)
    }
}

/// An address of a task.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
#[non_exhaustive]
pub struct IpAddress {
    /// The address.
    pub ip_address: String,
    /// `IPv4` or `IPv6`.
    #[serde(default)]
    pub protocol: String,
}

/// The result of one health check of a task.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
#[non_exhaustive]
pub struct HealthCheckResult {
    /// Whether the last check passed.
    #[serde(default)]
    pub alive: bool,
    /// Failures in a row.
    #[serde(default)]
    pub consecutive_failures: u32,
    /// Why the last check failed.
    #[serde(default)]
    pub last_failure_cause: Option<String>,
}

/// The answer of killing tasks: the tasks killed, or a deployment when the app was scaled down.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum KillResult {
    /// Without `scale`: the tasks that were killed (Marathon starts replacements).
    Killed(Vec<Task>),
    /// With `scale`: the deployment that lowers `instances`.
    Scaled(DeploymentResult),
}

/// Filters of `GET /v2/apps`.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct AppQuery {
    /// Apps whose id contains this.
    pub id: Option<String>,
    /// Apps whose cmd contains this.
    pub cmd: Option<String>,
    /// A label selector: `k`, `k==v`, `k!=v`, `k in (a,b)`; comma means AND.
    pub label: Option<String>,
    /// Embed the tasks of every app.
    pub embed_tasks: bool,
}

impl AppQuery {
    /// Apps whose id contains `id`.
    pub fn id(id: impl Into<String>) -> Self {
        AppQuery { id: Some(id.into()), ..Default::default() }
    }
    /// Apps matching a label selector.
    pub fn label(selector: impl Into<String>) -> Self {
        AppQuery { label: Some(selector.into()), ..Default::default() }
    }
    /// Also embed the tasks.
    pub fn with_tasks(mut self) -> Self {
        self.embed_tasks = true;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn app_keeps_unknown_fields_and_reads_counts() {
        let v = json!({
            "id": "/web", "cmd": "sleep 1", "instances": 3, "cpus": 0.1, "mem": 32.0, "disk": 0.0,
            "backoffFactor": 1.15, "executor": "", "tasksRunning": 2, "tasksStaged": 1,
            "deployments": [{"id": "d1"}], "version": "2024-01-01T00:00:00.000Z",
        });
        let app: App = serde_json::from_value(v).unwrap();
        assert_eq!(app.id(), "/web");
        assert_eq!(app.instances(), 3);
        assert_eq!(app.tasks_running, 2);
        assert_eq!(app.deployments, vec![DeploymentRef { id: "d1".into() }]);
        assert_eq!(app.definition.extra.get("backoffFactor"), Some(&json!(1.15)));
        // The response-only fields stay out of the definition.
        assert!(!app.definition.extra.contains_key("tasksRunning"));
        let back = serde_json::to_value(&app.definition).unwrap();
        assert_eq!(back["executor"], "");
        assert!(back.get("version").is_none());
    }

    #[test]
    fn definition_leaves_out_unset_fields() {
        let v = serde_json::to_value(AppDefinition::new("/a").cmd("x").env("A", "1").ports(1)).unwrap();
        assert_eq!(
            v,
            json!({"id": "/a", "cmd": "x", "env": {"A": "1"}, "portDefinitions": [{"port": 0, "name": "port0"}]})
        );
    }
}
