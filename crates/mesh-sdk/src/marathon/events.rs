//! Marathon's event stream (`GET /v2/events`, server-sent events), parsed into typed events.

use super::MarathonError;
use super::types::DeploymentAction;
use serde::Deserialize;
use serde_json::Value;

/// One event of the stream.
///
/// `kind` holds the typed payload of the event types the SDK knows; the others are
/// [`EventKind::Other`]. `raw` is the whole JSON object in any case.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Event {
    /// The event type, e.g. `deployment_success`.
    pub event_type: String,
    /// When the event happened (ISO-8601), if it says.
    pub timestamp: Option<String>,
    /// The typed payload.
    pub kind: EventKind,
    /// The event's JSON.
    pub raw: Value,
}

/// The typed payload of an [`Event`].
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum EventKind {
    /// `event_stream_attached`: the first event of every stream.
    StreamAttached {
        /// The subscriber's address as the server saw it.
        remote_address: String,
    },
    /// `status_update_event`: a task changed state.
    StatusUpdate(StatusUpdate),
    /// `deployment_info`: a deployment started or moved to a new step.
    DeploymentInfo(DeploymentStepEvent),
    /// `deployment_step_success`.
    DeploymentStepSuccess(DeploymentStepEvent),
    /// `deployment_step_failure`.
    DeploymentStepFailure(DeploymentStepEvent),
    /// `deployment_success`: a deployment finished.
    DeploymentSuccess {
        /// Deployment id.
        id: String,
    },
    /// `deployment_failed`: a deployment was cancelled or failed.
    DeploymentFailed {
        /// Deployment id.
        id: String,
    },
    /// `api_post_event`: an app was created or changed through the API.
    ApiPost {
        /// The request URI.
        uri: String,
        /// The app definition after the change.
        app_definition: Value,
    },
    /// `app_terminated_event`: an app was deleted.
    AppTerminated {
        /// The app.
        app_id: String,
    },
    /// `health_status_changed_event`.
    HealthStatusChanged {
        /// The app.
        app_id: String,
        /// The task or instance.
        instance_id: String,
        /// Whether it is alive now.
        alive: bool,
    },
    /// Any other event type; `raw` has its fields.
    Other,
}

/// The payload of `status_update_event`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
#[non_exhaustive]
pub struct StatusUpdate {
    /// The app.
    #[serde(default)]
    pub app_id: String,
    /// The task.
    pub task_id: String,
    /// The new Mesos task state, e.g. `TASK_RUNNING`.
    pub task_status: String,
    /// Host.
    #[serde(default)]
    pub host: String,
    /// Host ports.
    #[serde(default)]
    pub ports: Vec<u16>,
    /// App version of the task.
    #[serde(default)]
    pub version: Option<String>,
    /// Message, e.g. why it failed.
    #[serde(default)]
    pub message: Option<String>,
}

/// The payload of `deployment_info` and `deployment_step_*`.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct DeploymentStepEvent {
    /// Deployment id.
    pub id: String,
    /// The actions of the step concerned.
    pub actions: Vec<DeploymentAction>,
}

impl Event {
    /// Decode an event from its SSE `event:` name and `data:` JSON.
    pub fn parse(event_name: &str, data: &str) -> Result<Event, MarathonError> {
        let raw: Value = serde_json::from_str(data)
            .map_err(|e| MarathonError::Decode { what: format!("event {event_name}"), source: e })?;
        let event_type = raw.get("eventType").and_then(Value::as_str).unwrap_or(event_name).to_owned();
        let timestamp = raw.get("timestamp").and_then(Value::as_str).map(str::to_owned);
        let s = |k: &str| raw.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
        let decode = |e: serde_json::Error| MarathonError::Decode { what: format!("event {event_type}"), source: e };
        let step = || -> Result<DeploymentStepEvent, MarathonError> {
            let id = raw.pointer("/plan/id").and_then(Value::as_str).unwrap_or("").to_owned();
            let actions = match raw.pointer("/currentStep/actions") {
                Some(a) => serde_json::from_value(a.clone()).map_err(decode)?,
                None => Vec::new(),
            };
            Ok(DeploymentStepEvent { id, actions })
        };
        let kind = match event_type.as_str() {
            "event_stream_attached" => EventKind::StreamAttached { remote_address: s("remoteAddress") },
            "status_update_event" => EventKind::StatusUpdate(serde_json::from_value(raw.clone()).map_err(decode)?),
            "deployment_info" => EventKind::DeploymentInfo(step()?),
            "deployment_step_success" => EventKind::DeploymentStepSuccess(step()?),
            "deployment_step_failure" => EventKind::DeploymentStepFailure(step()?),
            "deployment_success" => EventKind::DeploymentSuccess { id: s("id") },
            "deployment_failed" => EventKind::DeploymentFailed { id: s("id") },
            "api_post_event" => EventKind::ApiPost {
                uri: s("uri"),
                app_definition: raw.get("appDefinition").cloned().unwrap_or(Value::Null),
            },
            "app_terminated_event" => EventKind::AppTerminated { app_id: s("appId") },
            "health_status_changed_event" => EventKind::HealthStatusChanged {
                app_id: s("appId"),
                instance_id: if s("instanceId").is_empty() { s("taskId") } else { s("instanceId") },
                alive: raw.get("alive").and_then(Value::as_bool).unwrap_or(false),
            },
            _ => EventKind::Other,
        };
        Ok(Event { event_type, timestamp, kind, raw })
    }

    /// The deployment this event is about, for the deployment events.
    pub fn deployment_id(&self) -> Option<&str> {
        match &self.kind {
            EventKind::DeploymentSuccess { id } | EventKind::DeploymentFailed { id } => Some(id),
            EventKind::DeploymentInfo(s)
            | EventKind::DeploymentStepSuccess(s)
            | EventKind::DeploymentStepFailure(s) => Some(&s.id),
            _ => None,
        }
    }
}

/// Incremental parser of a `text/event-stream` body: feed it bytes as they come, get whole
/// `(event name, data)` frames out. Comments (`:` lines, used as keep-alives) are skipped.
#[derive(Debug, Default)]
pub(crate) struct SseParser {
    buf: Vec<u8>,
    event: String,
    data: Vec<String>,
}

impl SseParser {
    pub(crate) fn push(&mut self, bytes: &[u8]) -> Vec<(String, String)> {
        self.buf.extend_from_slice(bytes);
        let mut out = Vec::new();
        while let Some(nl) = self.buf.iter().position(|b| *b == b'\n') {
            let mut line: Vec<u8> = self.buf.drain(..=nl).collect();
            line.pop();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            let line = String::from_utf8_lossy(&line);
            if line.is_empty() {
                if !self.data.is_empty() {
                    let name =
                        if self.event.is_empty() { "message".to_owned() } else { std::mem::take(&mut self.event) };
                    out.push((name, self.data.join("\n")));
                }
                self.event.clear();
                self.data.clear();
                continue;
            }
            if line.starts_with(':') {
                continue;
            }
            let (field, value) = match line.split_once(':') {
                Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
                None => (line.as_ref(), ""),
            };
            match field {
                "event" => self.event = value.to_owned(),
                "data" => self.data.push(value.to_owned()),
                _ => {}
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_frames_across_chunks_crlf_and_keepalives() {
        let mut p = SseParser::default();
        assert!(p.push(b"event: deployment_success\r\ndata: {\"id\":").is_empty());
        let out = p.push(b"\"d1\",\"eventType\":\"deployment_success\"}\r\n\r\n:\n\ndata: x\ndata: y\n\n");
        assert_eq!(
            out,
            vec![
                ("deployment_success".to_owned(), r#"{"id":"d1","eventType":"deployment_success"}"#.to_owned()),
                ("message".to_owned(), "x\ny".to_owned())
            ]
        );
    }

    #[test]
    fn typed_events() {
        let e = Event::parse(
            "deployment_info",
            r#"{"eventType":"deployment_info","timestamp":"t","plan":{"id":"d9"},"currentStep":{"actions":[{"action":"ScaleApplication","app":"/a"}]}}"#,
        )
        .unwrap();
        assert_eq!(e.deployment_id(), Some("d9"));
        match e.kind {
            EventKind::DeploymentInfo(s) => assert_eq!(s.actions[0].action, "ScaleApplication"),
            k => panic!("{k:?}"),
        }
        let e = Event::parse(
            "status_update_event",
            r#"{"eventType":"status_update_event","taskId":"a.1","taskStatus":"TASK_RUNNING","appId":"/a"}"#,
        )
        .unwrap();
        assert!(matches!(e.kind, EventKind::StatusUpdate(ref s) if s.task_status == "TASK_RUNNING"));
        let e = Event::parse("x", r#"{"eventType":"pod_created_event"}"#).unwrap();
        assert_eq!((e.event_type.as_str(), &e.kind), ("pod_created_event", &EventKind::Other));
        assert!(matches!(Event::parse("x", "{"), Err(MarathonError::Decode { .. })));
    }
}
