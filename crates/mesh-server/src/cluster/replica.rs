//! An agent's read-only replica of the cluster state: a snapshot from a server, then every
//! command the server applies, applied here in the same order by the same state machine. DNS,
//! the Consul read endpoints and the Marathon lists on the agent answer from it, and keep
//! answering what they last knew while no server is reachable.

use super::Link;
use crate::control::Published;
use crate::events::batch_events;
use crate::rpc::{Item, Request};
use mesh_core::model::Clock;
use mesh_core::state::State;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::watch;
use tracing::{debug, info, warn};

/// Whether the replica hears from a server, and when it last did.
#[derive(Debug)]
pub struct ReplicaStatus {
    connected: AtomicBool,
    last_contact: AtomicU64,
    clock: Arc<dyn Clock>,
}

impl ReplicaStatus {
    /// Whether a server streams the state to this replica now.
    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }
    /// Milliseconds since the replica last heard from a server (0 while connected and fresh).
    pub fn last_contact_ms(&self) -> u64 {
        let last = self.last_contact.load(Ordering::Relaxed);
        if last == 0 { 0 } else { self.clock.now().saturating_sub(last) }
    }
    fn contact(&self) {
        self.last_contact.store(self.clock.now(), Ordering::Relaxed);
    }
}

/// How often, at most, the replica is written to disk (when it changed).
const SAVE_EVERY: Duration = Duration::from_secs(2);

/// Start the replica: it follows whichever server `link` is connected to. With a `path`, it
/// starts from the copy an earlier run kept there (so a restarted agent answers what it last
/// knew even before it reaches a server) and keeps its copy there. `clock` dates the events it
/// publishes and its last contact.
pub fn spawn(
    datacenter: &str,
    link: Link,
    path: Option<std::path::PathBuf>,
    clock: Arc<dyn Clock>,
) -> (Published, Arc<ReplicaStatus>, tokio::task::JoinHandle<()>) {
    let mut state = State::new(datacenter);
    if let Some(p) = &path
        && let Ok(bytes) = std::fs::read(p)
    {
        match mesh_core::state::decode_state(&bytes) {
            Ok(mut s) => {
                s.rebuild_indexes();
                info!(index = s.index, "replica: starting from the copy kept on disk");
                state = s;
            }
            Err(e) => warn!(error = %e, "replica: the copy on disk is unreadable; starting empty"),
        }
    }
    let (published, index_tx) = Published::new(state.clone(), clock.clone());
    let status = Arc::new(ReplicaStatus {
        connected: AtomicBool::new(false),
        last_contact: AtomicU64::new(0),
        clock: clock.clone(),
    });
    let task = tokio::spawn(follow(state, published.clone(), index_tx, status.clone(), link));
    if let Some(p) = path {
        tokio::spawn(keep_on_disk(published.clone(), p));
    }
    (published, status, task)
}

/// Write the replica to `path` whenever it changed, at most every [`SAVE_EVERY`], off the
/// async threads (a large state takes a while to encode).
async fn keep_on_disk(published: Published, path: std::path::PathBuf) {
    let mut index = published.index.clone();
    let mut saved = *index.borrow();
    loop {
        if index.changed().await.is_err() {
            return;
        }
        tokio::time::sleep(SAVE_EVERY).await;
        let state = published.state.load_full();
        if state.index == saved {
            continue;
        }
        saved = state.index;
        let p = path.clone();
        let r = tokio::task::spawn_blocking(move || -> Result<(), String> {
            let mut bytes = Vec::new();
            mesh_core::state::encode_state(&mut bytes, &state).map_err(|e| e.to_string())?;
            let tmp = p.with_extension("tmp");
            std::fs::write(&tmp, &bytes).map_err(|e| e.to_string())?;
            std::fs::rename(&tmp, &p).map_err(|e| e.to_string())
        })
        .await;
        if let Ok(Err(e)) = r {
            warn!(error = %e, "replica: cannot keep a copy on disk");
        }
    }
}

async fn follow(
    mut state: State,
    published: Published,
    index_tx: watch::Sender<u64>,
    status: Arc<ReplicaStatus>,
    mut link: Link,
) {
    loop {
        let conn = match link.wait_for(|c| c.as_ref().is_some_and(|c| !c.is_closed())).await {
            Ok(c) => c.clone().expect("checked above"),
            Err(_) => return, // the uplink is gone: the node is stopping
        };
        let mut stream = match conn.open(Request::Replicate { from: state.index + 1 }).await {
            Ok(s) => s,
            Err(e) => {
                debug!(error = %e, "replica: cannot open the state stream");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        status.connected.store(true, Ordering::Relaxed);
        status.contact();
        info!(server = %conn.peer().hello.node, from = state.index + 1, "replica: following");
        let mut snapshot: Vec<u8> = Vec::new();
        let why = loop {
            let item = match tokio::time::timeout(super::replication::HEARTBEAT * 5, stream.next()).await {
                Err(_) => break "no heartbeat from the server".to_owned(),
                Ok(None) => break "the server ended the stream".to_owned(),
                Ok(Some(Err(e))) => break e.to_string(),
                Ok(Some(Ok(item))) => item,
            };
            status.contact();
            match item {
                Item::Snapshot { index, chunk, last } => {
                    snapshot.extend_from_slice(&chunk);
                    if !last {
                        continue;
                    }
                    match mesh_core::state::decode_state(&std::mem::take(&mut snapshot)) {
                        Ok(mut s) => {
                            s.rebuild_indexes();
                            info!(index, "replica: snapshot installed");
                            state = s;
                            published.publish(&state, &index_tx);
                        }
                        Err(e) => break format!("undecodable snapshot: {e}"),
                    }
                }
                Item::Commands { first, cmds } => {
                    if first > state.index + 1 {
                        break format!("a gap in the stream: got {first}, expected {}", state.index + 1);
                    }
                    let before = state.clone();
                    let skip = (state.index + 1 - first) as usize;
                    let cmds = cmds.get(skip..).unwrap_or_default();
                    for cmd in cmds {
                        if state.apply(cmd).is_err() {
                            // Applied on the server, so it applies here unless the encoding
                            // changed: keep the indexes aligned, as a log replay does.
                            state.index += 1;
                        }
                    }
                    if !cmds.is_empty() {
                        if published.events.clients() > 0 {
                            for e in batch_events(cmds, &before, &state, status.clock.now()) {
                                published.events.publish(e);
                            }
                        }
                        published.publish(&state, &index_tx);
                    }
                }
                // A lost frame leaves no gap to see while nothing else changes: the heartbeat
                // says where the server is.
                Item::Heartbeat { index } if index > state.index => {
                    break format!("behind the server (at {}, the server at {index})", state.index);
                }
                Item::Heartbeat { .. } => {}

                Item::ToAgent(_) => break "unexpected item on the state stream".to_owned(),
            }
        };
        status.connected.store(false, Ordering::Relaxed);
        warn!(reason = %why, index = state.index, "replica: lost the server; answering from what it last knew");
        drop(stream);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
