//! A typed async client of the Marathon v2 REST API (mesh serves it; so does Marathon).
//!
//! Apps (list, get, create, update, scale, restart, delete), deployments (list, cancel), tasks
//! (list, kill, kill and scale down) and the event stream (`GET /v2/events` as a [`Stream`] of
//! typed [`Event`]s, filtered by event type). Errors are [`MarathonError`]s that carry
//! Marathon's own message.
//!
//! ```no_run
//! # async fn f() -> Result<(), mesh_sdk::marathon::MarathonError> {
//! use futures_util::StreamExt;
//! use mesh_sdk::marathon::{AppDefinition, EventKind, MarathonClient};
//!
//! let marathon = MarathonClient::new("http://127.0.0.1:8080")?;
//! let mut events = marathon.events(&["deployment_success"]).await?;
//! let app = marathon.create_app(&AppDefinition::new("/sleepy").cmd("sleep 600").cpus(0.1).mem(32.0)).await?;
//! let deployment = marathon.scale_app(app.id(), 3, false).await?;
//! while let Some(event) = events.next().await {
//!     if event?.deployment_id() == Some(&deployment.deployment_id) {
//!         break; // scaled
//!     }
//! }
//! println!("{} tasks", marathon.app_tasks("/sleepy").await?.len());
//! # Ok(()) }
//! ```
//!
//! [`Stream`]: futures_util::Stream

mod events;
mod types;

pub use events::{DeploymentStepEvent, Event, EventKind, StatusUpdate};
pub use types::{
    App, AppDefinition, AppQuery, Deployment, DeploymentAction, DeploymentRef, DeploymentResult, DeploymentStep,
    HealthCheckResult, IpAddress, KillResult, PortDefinition, Task,
};

use futures_util::Stream;
use reqwest::{Method, RequestBuilder, StatusCode, header};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

/// What went wrong talking to Marathon. The API variants carry Marathon's `message`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MarathonError {
    /// 404: no such app, task, deployment (or route).
    #[error("not found: {message}")]
    NotFound {
        /// Marathon's message, e.g. `App '/x' does not exist`.
        message: String,
    },
    /// 409: the app is locked by a deployment (retry with `force`, or wait).
    #[error("locked by deployment(s) {deployments:?}: {message}")]
    Locked {
        /// Marathon's message.
        message: String,
        /// The deployments holding the lock.
        deployments: Vec<String>,
    },
    /// 409: it exists already.
    #[error("conflict: {message}")]
    Conflict {
        /// Marathon's message.
        message: String,
    },
    /// 400: malformed request.
    #[error("bad request: {message}{}", fmt_details(details))]
    BadRequest {
        /// Marathon's message.
        message: String,
        /// Per-path errors, when given.
        details: Vec<ErrorDetail>,
    },
    /// 422: the definition is not valid.
    #[error("invalid: {message}{}", fmt_details(details))]
    Invalid {
        /// Marathon's message (`Object is not valid`).
        message: String,
        /// Per-path errors.
        details: Vec<ErrorDetail>,
    },
    /// 503: no leader, or the server cannot write.
    #[error("unavailable: {message}")]
    Unavailable {
        /// Marathon's message.
        message: String,
    },
    /// Any other error status.
    #[error("HTTP {status}: {message}")]
    Status {
        /// The status code.
        status: u16,
        /// Marathon's message, or the body.
        message: String,
    },
    /// The request did not get an answer (connection refused, timeout, ...).
    #[error("cannot reach Marathon: {0}")]
    Transport(#[from] reqwest::Error),
    /// An answer that is not what the API promises.
    #[error("cannot decode {what}: {source}")]
    Decode {
        /// What was being decoded.
        what: String,
        /// The JSON error.
        source: serde_json::Error,
    },
    /// The base URL is not a valid `http://` URL.
    #[error("invalid Marathon URL {0:?}")]
    Url(String),
}

impl MarathonError {
    /// The HTTP status of an API error.
    pub fn status(&self) -> Option<u16> {
        Some(match self {
            MarathonError::NotFound { .. } => 404,
            MarathonError::Locked { .. } | MarathonError::Conflict { .. } => 409,
            MarathonError::BadRequest { .. } => 400,
            MarathonError::Invalid { .. } => 422,
            MarathonError::Unavailable { .. } => 503,
            MarathonError::Status { status, .. } => *status,
            _ => return None,
        })
    }

    /// Marathon's message, for API errors.
    pub fn message(&self) -> Option<&str> {
        match self {
            MarathonError::NotFound { message }
            | MarathonError::Locked { message, .. }
            | MarathonError::Conflict { message }
            | MarathonError::BadRequest { message, .. }
            | MarathonError::Invalid { message, .. }
            | MarathonError::Unavailable { message }
            | MarathonError::Status { message, .. } => Some(message),
            _ => None,
        }
    }

    /// Build the error for an error answer.
    fn from_response(status: StatusCode, body: &[u8]) -> MarathonError {
        let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
        let message = v
            .get("message")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .unwrap_or_else(|| String::from_utf8_lossy(body).trim().to_owned());
        let details = match v.get("details") {
            Some(Value::Array(list)) => list
                .iter()
                .map(|d| ErrorDetail {
                    path: d.get("path").and_then(Value::as_str).unwrap_or("").to_owned(),
                    errors: d
                        .get("errors")
                        .and_then(Value::as_array)
                        .map(|es| es.iter().map(|e| e.as_str().map(str::to_owned).unwrap_or(e.to_string())).collect())
                        .unwrap_or_default(),
                })
                .collect(),
            Some(Value::String(s)) => vec![ErrorDetail { path: String::new(), errors: vec![s.clone()] }],
            _ => Vec::new(),
        };
        match status.as_u16() {
            404 => MarathonError::NotFound { message },
            409 => match v.get("deployments").and_then(Value::as_array) {
                Some(ds) => MarathonError::Locked {
                    message,
                    deployments: ds.iter().filter_map(|d| d.get("id")?.as_str().map(str::to_owned)).collect(),
                },
                None => MarathonError::Conflict { message },
            },
            400 => MarathonError::BadRequest { message, details },
            422 => MarathonError::Invalid { message, details },
            503 => MarathonError::Unavailable { message },
            s => MarathonError::Status { status: s, message },
        }
    }
}

/// One entry of the `details` of a 400 or 422 answer.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ErrorDetail {
    /// JSON path of the problem, e.g. `/instances`.
    pub path: String,
    /// What is wrong there.
    pub errors: Vec<String>,
}

fn fmt_details(details: &[ErrorDetail]) -> String {
    details.iter().map(|d| format!(" [{}: {}]", d.path, d.errors.join(", "))).collect()
}

/// A Marathon v2 client. Cheap to clone (it shares one connection pool).
#[derive(Debug, Clone)]
pub struct MarathonClient {
    http: reqwest::Client,
    base: String,
    timeout: Duration,
}

impl MarathonClient {
    /// A client of the Marathon at `base_url`, e.g. `http://127.0.0.1:8080`.
    pub fn new(base_url: &str) -> Result<Self, MarathonError> {
        let http = reqwest::Client::builder().connect_timeout(Duration::from_secs(10)).build()?;
        Self::with_http_client(base_url, http)
    }

    /// A client that sends its requests through `http`.
    pub fn with_http_client(base_url: &str, http: reqwest::Client) -> Result<Self, MarathonError> {
        let base = base_url.trim_end_matches('/').to_owned();
        match reqwest::Url::parse(&base) {
            Ok(u) if u.scheme() == "http" || u.scheme() == "https" => {}
            _ => return Err(MarathonError::Url(base_url.to_owned())),
        }
        Ok(MarathonClient { http, base, timeout: Duration::from_secs(30) })
    }

    /// Set the time limit of each request (not of the event stream). Default 30 s.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The base URL.
    pub fn base_url(&self) -> &str {
        &self.base
    }

    fn request(&self, method: Method, path: &str) -> RequestBuilder {
        self.http
            .request(method, format!("{}{}", self.base, path))
            .header(header::ACCEPT, "application/json")
            .timeout(self.timeout)
    }

    async fn call<T: DeserializeOwned>(&self, req: RequestBuilder, what: &str) -> Result<T, MarathonError> {
        let body = self.call_raw(req).await?.1;
        serde_json::from_slice(&body).map_err(|source| MarathonError::Decode { what: what.to_owned(), source })
    }

    async fn call_raw(&self, req: RequestBuilder) -> Result<(StatusCode, Vec<u8>), MarathonError> {
        let resp = req.send().await?;
        let status = resp.status();
        let body = resp.bytes().await?.to_vec();
        if !status.is_success() {
            return Err(MarathonError::from_response(status, &body));
        }
        Ok((status, body))
    }

    /// `GET /ping`: whether the server answers.
    pub async fn ping(&self) -> Result<(), MarathonError> {
        self.call_raw(self.request(Method::GET, "/ping")).await.map(|_| ())
    }

    /// `GET /v2/apps`: the apps matching `query` (with counts and deployments).
    pub async fn list_apps(&self, query: &AppQuery) -> Result<Vec<App>, MarathonError> {
        let mut q: Vec<(&str, &str)> = Vec::new();
        if let Some(id) = &query.id {
            q.push(("id", id));
        }
        if let Some(cmd) = &query.cmd {
            q.push(("cmd", cmd));
        }
        if let Some(label) = &query.label {
            q.push(("label", label));
        }
        if query.embed_tasks {
            q.push(("embed", "apps.tasks"));
        }
        #[derive(serde::Deserialize)]
        struct Apps {
            apps: Vec<App>,
        }
        let r: Apps = self.call(self.request(Method::GET, "/v2/apps").query(&q), "app list").await?;
        Ok(r.apps)
    }

    /// `GET /v2/apps/{id}`: one app, with its tasks.
    pub async fn get_app(&self, id: &str) -> Result<App, MarathonError> {
        #[derive(serde::Deserialize)]
        struct One {
            app: App,
        }
        let r: One = self.call(self.request(Method::GET, &app_path(id, "")), "app").await?;
        Ok(r.app)
    }

    /// `POST /v2/apps`: create an app; answers the app as created.
    pub async fn create_app(&self, app: &AppDefinition) -> Result<App, MarathonError> {
        self.call(self.request(Method::POST, "/v2/apps").json(app), "created app").await
    }

    /// `PUT /v2/apps/{id}`: change an app (the fields in `changes` are merged into it; `changes`
    /// may be an [`AppDefinition`] or any JSON object), or create it if it does not exist.
    pub async fn update_app<T: Serialize + ?Sized>(
        &self,
        id: &str,
        changes: &T,
        force: bool,
    ) -> Result<DeploymentResult, MarathonError> {
        let req = self.request(Method::PUT, &app_path(id, "")).query(&[("force", force)]).json(changes);
        self.call(req, "deployment result").await
    }

    /// Set an app's number of instances.
    pub async fn scale_app(&self, id: &str, instances: u32, force: bool) -> Result<DeploymentResult, MarathonError> {
        self.update_app(id, &json!({ "instances": instances }), force).await
    }

    /// `POST /v2/apps/{id}/restart`: replace every task (rolling, per the upgrade strategy).
    pub async fn restart_app(&self, id: &str, force: bool) -> Result<DeploymentResult, MarathonError> {
        let req = self.request(Method::POST, &app_path(id, "/restart")).query(&[("force", force)]);
        self.call(req, "deployment result").await
    }

    /// `DELETE /v2/apps/{id}`: stop and remove an app.
    pub async fn delete_app(&self, id: &str, force: bool) -> Result<DeploymentResult, MarathonError> {
        let req = self.request(Method::DELETE, &app_path(id, "")).query(&[("force", force)]);
        self.call(req, "deployment result").await
    }

    /// `GET /v2/deployments`: deployments in progress.
    pub async fn list_deployments(&self) -> Result<Vec<Deployment>, MarathonError> {
        self.call(self.request(Method::GET, "/v2/deployments"), "deployment list").await
    }

    /// `DELETE /v2/deployments/{id}`: cancel a deployment. Without `force` Marathon rolls it back
    /// with a new deployment (returned); with `force` it just stops it (`None`).
    pub async fn cancel_deployment(&self, id: &str, force: bool) -> Result<Option<DeploymentResult>, MarathonError> {
        let req = self.request(Method::DELETE, &format!("/v2/deployments/{id}")).query(&[("force", force)]);
        let (status, body) = self.call_raw(req).await?;
        if status == StatusCode::ACCEPTED || body.iter().all(u8::is_ascii_whitespace) {
            return Ok(None);
        }
        serde_json::from_slice(&body)
            .map(Some)
            .map_err(|source| MarathonError::Decode { what: "deployment result".into(), source })
    }

    /// `GET /v2/tasks`: the tasks of every app.
    pub async fn list_tasks(&self) -> Result<Vec<Task>, MarathonError> {
        #[derive(serde::Deserialize)]
        struct Tasks {
            tasks: Vec<Task>,
        }
        let r: Tasks = self.call(self.request(Method::GET, "/v2/tasks"), "task list").await?;
        Ok(r.tasks)
    }

    /// `GET /v2/apps/{id}/tasks`: the tasks of one app.
    pub async fn app_tasks(&self, id: &str) -> Result<Vec<Task>, MarathonError> {
        #[derive(serde::Deserialize)]
        struct Tasks {
            tasks: Vec<Task>,
        }
        let r: Tasks = self.call(self.request(Method::GET, &app_path(id, "/tasks")), "task list").await?;
        Ok(r.tasks)
    }

    /// `POST /v2/tasks/delete`: kill tasks by id. With `scale`, the apps' `instances` go down
    /// accordingly (a deployment); otherwise Marathon replaces them.
    pub async fn kill_tasks(&self, ids: &[&str], scale: bool) -> Result<KillResult, MarathonError> {
        let req =
            self.request(Method::POST, "/v2/tasks/delete").query(&[("scale", scale)]).json(&json!({ "ids": ids }));
        kill_result(self.call(req, "kill result").await?)
    }

    /// `DELETE /v2/apps/{app}/tasks/{task}`: kill one task of an app, optionally scaling down.
    pub async fn kill_task(&self, app_id: &str, task_id: &str, scale: bool) -> Result<KillResult, MarathonError> {
        let req =
            self.request(Method::DELETE, &app_path(app_id, &format!("/tasks/{task_id}"))).query(&[("scale", scale)]);
        kill_result(self.call(req, "kill result").await?)
    }

    /// `GET /v2/events`: the event stream, only of `event_types` (all when empty).
    ///
    /// The stream ends when the server closes it (or drops a subscriber that reads too slowly);
    /// open a new one then. The first event is `event_stream_attached` (if not filtered out).
    pub async fn events(&self, event_types: &[&str]) -> Result<EventStream, MarathonError> {
        let q: Vec<(&str, &str)> = event_types.iter().map(|t| ("event_type", *t)).collect();
        let resp = self
            .http
            .get(format!("{}/v2/events", self.base))
            .header(header::ACCEPT, "text/event-stream")
            .query(&q)
            .send()
            .await?;
        let status = resp.status();
        if !status.is_success() {
            let body = resp.bytes().await?;
            return Err(MarathonError::from_response(status, &body));
        }
        let pending: std::collections::VecDeque<(String, String)> = std::collections::VecDeque::new();
        let state = (resp, events::SseParser::default(), pending, false);
        let s = futures_util::stream::unfold(state, |(mut resp, mut parser, mut pending, done)| async move {
            loop {
                if let Some((name, data)) = pending.pop_front() {
                    let item = Event::parse(&name, &data);
                    return Some((item, (resp, parser, pending, done)));
                }
                if done {
                    return None;
                }
                match resp.chunk().await {
                    Ok(Some(bytes)) => pending.extend(parser.push(&bytes)),
                    Ok(None) => return None,
                    Err(e) => return Some((Err(MarathonError::Transport(e)), (resp, parser, pending, true))),
                }
            }
        });
        Ok(EventStream { inner: Box::pin(s) })
    }
}

/// The event stream of [`MarathonClient::events`]: a [`Stream`] of typed events.
pub struct EventStream {
    inner: Pin<Box<dyn Stream<Item = Result<Event, MarathonError>> + Send>>,
}

impl std::fmt::Debug for EventStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EventStream")
    }
}

impl Stream for EventStream {
    type Item = Result<Event, MarathonError>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.inner.as_mut().poll_next(cx)
    }
}

fn app_path(id: &str, suffix: &str) -> String {
    format!("/v2/apps/{}{suffix}", id.trim_start_matches('/'))
}

fn kill_result(v: Value) -> Result<KillResult, MarathonError> {
    let decode = |source| MarathonError::Decode { what: "kill result".into(), source };
    if v.get("deploymentId").is_some() {
        return serde_json::from_value(v).map(KillResult::Scaled).map_err(decode);
    }
    let tasks = match (v.get("tasks"), v.get("task")) {
        (Some(ts), _) => serde_json::from_value(ts.clone()).map_err(decode)?,
        (None, Some(t)) => vec![serde_json::from_value(t.clone()).map_err(decode)?],
        _ => Vec::new(),
    };
    Ok(KillResult::Killed(tasks))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_carry_marathon_messages() {
        let e = MarathonError::from_response(
            StatusCode::CONFLICT,
            br#"{"message":"App is locked by one or more deployments.","deployments":[{"id":"d1"}]}"#,
        );
        assert!(matches!(&e, MarathonError::Locked { deployments, .. } if deployments == &["d1"]));
        let e = MarathonError::from_response(
            StatusCode::UNPROCESSABLE_ENTITY,
            br#"{"message":"Object is not valid","details":[{"path":"/instances","errors":["must be >= 0"]}]}"#,
        );
        assert_eq!(e.to_string(), "invalid: Object is not valid [/instances: must be >= 0]");
        assert_eq!(e.status(), Some(422));
        let e = MarathonError::from_response(StatusCode::NOT_FOUND, br#"{"message":"App '/x' does not exist"}"#);
        assert_eq!(e.message(), Some("App '/x' does not exist"));
        let e = MarathonError::from_response(StatusCode::BAD_GATEWAY, b"upstream down\n");
        assert!(matches!(e, MarathonError::Status { status: 502, ref message } if message == "upstream down"));
    }

    #[test]
    fn bad_base_url() {
        assert!(matches!(MarathonClient::new("localhost:8080"), Err(MarathonError::Url(_))));
        assert_eq!(MarathonClient::new("http://h:1/").unwrap().base_url(), "http://h:1");
    }
}
