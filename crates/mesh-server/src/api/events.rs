//! `GET /v2/events`: Marathon's server-sent event stream, with the `event_type` filter.
//! Each client reads from its own bounded buffer; one that falls behind is disconnected. A client
//! that stops reading altogether is closed by the connection's write timeout
//! ([`crate::serve`]); either way its stream ends and `event_stream_detached` is published.

use super::Api;
use crate::events::Event;
use axum::Router;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::json;
use std::collections::HashSet;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::broadcast::error::RecvError;

/// Publishes `event_stream_detached` when a client's stream ends (it left, or was dropped for
/// falling behind).
struct Detach {
    bus: crate::events::EventBus,
    remote: String,
    clock: Arc<dyn mesh_core::model::Clock>,
}

impl Drop for Detach {
    fn drop(&mut self) {
        self.bus.publish(Event::new("event_stream_detached", json!({"remoteAddress": self.remote}), self.clock.now()));
    }
}

/// Routes of the event stream.
pub fn routes() -> Router<Api> {
    Router::new().route("/v2/events", get(events))
}

fn frame(e: &Event) -> SseEvent {
    SseEvent::default().event(e.event_type.clone()).data(e.data.clone())
}

async fn events(
    State(api): State<Api>,
    headers: HeaderMap,
    extensions: axum::http::Extensions,
    Query(q): Query<Vec<(String, String)>>,
) -> Response {
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()).unwrap_or("*/*");
    if !accept.contains("text/event-stream") && !accept.contains("*/*") {
        return (StatusCode::METHOD_NOT_ALLOWED, axum::Json(json!({"message": "HTTP 405 Method Not Allowed"})))
            .into_response();
    }
    let filter: HashSet<String> =
        q.iter().filter(|(k, _)| k == "event_type" || k == "event_type[]").map(|(_, v)| v.clone()).collect();
    // Marathon's `remoteAddress`: the client's address (a proxy's `X-Forwarded-For` wins).
    let peer = extensions.get::<axum::extract::ConnectInfo<std::net::SocketAddr>>().map(|c| c.0.ip().to_string());
    let remote =
        headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()).map(str::to_owned).or(peer).unwrap_or_default();
    let attached = Event::new("event_stream_attached", json!({"remoteAddress": remote}), api.control.now());
    let rx = api.control.published.events.subscribe();
    let detach = Detach {
        bus: api.control.published.events.clone(),
        remote: remote.clone(),
        clock: api.control.published.clock.clone(),
    };
    let wanted = move |e: &Event| filter.is_empty() || filter.contains(&e.event_type);
    let first = wanted(&attached).then(|| frame(&attached));
    let stream =
        futures_util::stream::unfold((rx, first, wanted, detach), |(mut rx, mut first, wanted, detach)| async move {
            if let Some(f) = first.take() {
                return Some((Ok::<_, Infallible>(f), (rx, None, wanted, detach)));
            }
            loop {
                match rx.recv().await {
                    Ok(e) => {
                        let e: Arc<Event> = e;
                        if wanted(&e) {
                            return Some((Ok(frame(&e)), (rx, None, wanted, detach)));
                        }
                    }
                    // Too slow: drop this client rather than hold events (or the server) back.
                    Err(RecvError::Lagged(_)) | Err(RecvError::Closed) => return None,
                }
            }
        });
    Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))).into_response()
}
