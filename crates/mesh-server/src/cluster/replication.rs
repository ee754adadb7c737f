//! The server side of state replication: the commands the store appended recently, and the
//! stream that sends a replica what it lacks (a snapshot when the recent commands do not reach
//! back far enough, then every command as it is applied).

use crate::control::Published;
use crate::rpc::{Item, Sink};
use mesh_core::state::Command;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tracing::{debug, info};

/// Commands kept for replicas that fall behind; further back, they get a snapshot.
pub const RECENT_COMMANDS: usize = 100_000;
/// Snapshot bytes per stream item.
const SNAPSHOT_CHUNK: usize = 1024 * 1024;
/// While nothing changes, a replica hears the index this often (so it knows the server lives).
pub const HEARTBEAT: Duration = Duration::from_secs(1);

struct Recent {
    batches: VecDeque<(u64, Arc<Vec<Command>>)>,
    commands: usize,
}

/// Recently appended commands, fed by the store (`Store::set_feed`).
#[derive(Clone)]
pub struct Replication {
    recent: Arc<Mutex<Recent>>,
    index: watch::Sender<u64>,
}

impl Replication {
    /// Empty, at `index` (the store's state index).
    pub fn new(index: u64) -> Replication {
        Replication {
            recent: Arc::new(Mutex::new(Recent { batches: VecDeque::new(), commands: 0 })),
            index: watch::channel(index).0,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Recent> {
        self.recent.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The store appended `cmds` at `first..`.
    pub fn appended(&self, first: u64, cmds: &[Command]) {
        let last = first + cmds.len() as u64 - 1;
        {
            let mut r = self.lock();
            r.commands += cmds.len();
            r.batches.push_back((first, Arc::new(cmds.to_vec())));
            while r.commands > RECENT_COMMANDS && r.batches.len() > 1 {
                if let Some((_, b)) = r.batches.pop_front() {
                    r.commands -= b.len();
                }
            }
        }
        self.index.send_replace(last);
    }

    /// The state was replaced at `index` (a Raft snapshot was installed): no recent command
    /// leads up to it, so replicas behind it get a snapshot.
    pub fn reset(&self, index: u64) {
        {
            let mut r = self.lock();
            r.batches.clear();
            r.commands = 0;
        }
        self.index.send_replace(index);
    }

    /// The commands from index `from` on, if the recent ones reach back to it (`Some(empty)`:
    /// nothing new yet). `None`: a snapshot is needed.
    fn since(&self, from: u64) -> Option<Vec<(u64, Arc<Vec<Command>>)>> {
        let last = *self.index.borrow();
        if from == last + 1 {
            return Some(Vec::new());
        }
        if from > last + 1 {
            return None; // the replica is ahead of this server (its data was replaced)
        }
        let r = self.lock();
        let oldest = r.batches.front().map(|(f, _)| *f)?;
        if from < oldest {
            return None;
        }
        Some(r.batches.iter().filter(|(f, b)| f + b.len() as u64 > from).cloned().collect())
    }

    /// Serve one replica from `from` until it goes away.
    pub async fn serve(&self, published: &Published, mut from: u64, peer: &str, sink: Sink) {
        let mut index = self.index.subscribe();
        let mut snapshots = 0;
        loop {
            index.borrow_and_update();
            match self.since(from) {
                Some(batches) => {
                    for (first, cmds) in batches {
                        let skip = from.saturating_sub(first) as usize;
                        let cmds: Vec<Command> = cmds[skip..].to_vec();
                        let n = cmds.len() as u64;
                        if !sink.send(Item::Commands { first: first + skip as u64, cmds }).await {
                            return;
                        }
                        from = first + skip as u64 + n;
                    }
                }
                None => {
                    // The published state may lag the recent commands, never the other way.
                    let state = published.state.load_full();
                    if snapshots > 0 && state.index + 1 < from {
                        // Not published yet: wait for it.
                        let _ = tokio::time::timeout(Duration::from_millis(50), index.changed()).await;
                        continue;
                    }
                    snapshots += 1;
                    let mut bytes = Vec::new();
                    if let Err(e) = mesh_core::state::encode_state(&mut bytes, &state) {
                        sink.end(Some(format!("cannot encode the state: {e}")));
                        return;
                    }
                    info!(peer, index = state.index, bytes = bytes.len(), "replication: sending a snapshot");
                    let chunks: Vec<&[u8]> = bytes.chunks(SNAPSHOT_CHUNK).collect();
                    let n = chunks.len().max(1);
                    for i in 0..n {
                        let chunk = chunks.get(i).map(|c| c.to_vec()).unwrap_or_default();
                        if !sink.send(Item::Snapshot { index: state.index, chunk, last: i + 1 == n }).await {
                            return;
                        }
                    }
                    from = state.index + 1;
                    continue;
                }
            }
            tokio::select! {
                r = index.changed() => if r.is_err() { return },
                () = tokio::time::sleep(HEARTBEAT) => {
                    if !sink.send(Item::Heartbeat { index: from.saturating_sub(1) }).await {
                        return;
                    }
                }
                () = sink.closed() => {
                    debug!(peer, "replication: replica went away");
                    return;
                }
            }
        }
    }
}
