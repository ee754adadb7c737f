//! The Raft state machine: [`State::apply`] for every normal entry, in log order. Snapshots are
//! the state as [`encode_state`] writes it, with the last applied log id and membership; the
//! current one is kept in memory and written to `snapshot.bin` in the store's directory, from
//! which [`MeshStateMachine::open`] restores the state.

use super::{ApplyOutcome, Entry, LogId, MeshNode, NodeId, RaftStorageError, StoredMembership, TypeConfig};
use super::{blocking, storage_err};
use mesh_core::state::{Command, State, decode_state, encode_state};
use openraft::storage::{RaftStateMachine, Snapshot, SnapshotMeta};
use openraft::{EntryPayload, ErrorSubject, ErrorVerb, OptionalSend, RaftSnapshotBuilder};
use serde::{Deserialize, Serialize};
use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// The file of the current snapshot inside the store's directory.
pub const SNAPSHOT_FILE: &str = "snapshot.bin";

/// What a snapshot holds (MessagePack, structs as maps).
#[derive(Serialize, Deserialize)]
struct SnapshotBody {
    last_applied: Option<LogId>,
    last_membership: StoredMembership,
    /// The state as [`encode_state`] writes it.
    #[serde(with = "serde_bytes")]
    state: Vec<u8>,
}

/// The snapshot file: the metadata openraft hands out with it, then the body.
#[derive(Serialize, Deserialize)]
struct SnapshotFile {
    meta: SnapshotMeta<NodeId, MeshNode>,
    #[serde(with = "serde_bytes")]
    data: Vec<u8>,
}

/// The current snapshot and where it is written; shared by the state machine and its builders.
/// A snapshot's metadata and bytes.
type StoredSnapshot = (SnapshotMeta<NodeId, MeshNode>, Arc<Vec<u8>>);

#[derive(Debug)]
struct SnapshotSlot {
    current: Mutex<Option<StoredSnapshot>>,
    /// The size of the current snapshot in bytes.
    size: Arc<std::sync::atomic::AtomicU64>,
    /// `None`: in memory only.
    file: Option<PathBuf>,
}

impl SnapshotSlot {
    /// Write the snapshot to the file (atomically: temporary file, fsync, rename) and make it the
    /// current one. Blocking.
    fn store(&self, meta: SnapshotMeta<NodeId, MeshNode>, data: Vec<u8>) -> Result<(), RaftStorageError> {
        if let Some(path) = &self.file {
            let signature = Some(meta.signature());
            let err = |e: &dyn std::fmt::Display| {
                storage_err(
                    ErrorSubject::Snapshot(signature.clone()),
                    ErrorVerb::Write,
                    format!("{}: {e}", path.display()),
                )
            };
            let file = SnapshotFile { meta: meta.clone(), data };
            let bytes = rmp_serde::to_vec_named(&file).map_err(|e| err(&e))?;
            let tmp = path.with_extension("tmp");
            {
                use std::io::Write;
                let mut f = std::fs::File::create(&tmp).map_err(|e| err(&e))?;
                f.write_all(&bytes).map_err(|e| err(&e))?;
                f.sync_all().map_err(|e| err(&e))?;
            }
            std::fs::rename(&tmp, path).map_err(|e| err(&e))?;
            if let Some(dir) = path.parent() {
                // The rename itself must survive a crash.
                let _ = std::fs::File::open(dir).and_then(|d| d.sync_all());
            }
            self.set(meta, file.data);
        } else {
            self.set(meta, data);
        }
        Ok(())
    }

    fn set(&self, meta: SnapshotMeta<NodeId, MeshNode>, data: Vec<u8>) {
        self.size.store(data.len() as u64, std::sync::atomic::Ordering::Relaxed);
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = Some((meta, Arc::new(data)));
    }

    fn current(&self) -> Option<StoredSnapshot> {
        self.current.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// The state machine's state as of a log entry, as [`MeshStateMachine::subscribe`] publishes it.
#[derive(Clone, Debug)]
pub struct Applied {
    /// The last applied log entry (`None`: nothing yet).
    pub log_id: Option<LogId>,
    /// The state after it (a cheap copy: the state's maps are persistent).
    pub state: State,
}

/// Told of every change of the state machine, synchronously, before openraft answers the
/// proposer: a server publishes its readers' view (HTTP, DNS, events, agents' replication)
/// here, so a client that hears its write succeeded reads it on the same server at once.
pub trait ApplyObserver: Send + Sync + 'static {
    /// `commands` (the accepted ones, numbered `before.index + 1..=after.index`) took the
    /// state from `before` to `after`.
    fn applied(&self, before: &State, commands: &[Command], after: &State);
    /// The state was replaced (a snapshot was installed): there is no command history.
    fn replaced(&self, state: &State);
}

/// The replicated [`State`] as a Raft state machine.
pub struct MeshStateMachine {
    /// What has been applied, for readers outside Raft (the state machine itself is Raft's).
    published: tokio::sync::watch::Sender<Applied>,
    state: State,
    last_applied: Option<LogId>,
    last_membership: StoredMembership,
    snapshot: Arc<SnapshotSlot>,
    /// Snapshots built by this process, for unique snapshot ids.
    built: Arc<std::sync::atomic::AtomicU64>,
    observer: Option<Arc<dyn ApplyObserver>>,
}

impl std::fmt::Debug for MeshStateMachine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshStateMachine")
            .field("index", &self.state.index)
            .field("last_applied", &self.last_applied)
            .field("last_membership", &self.last_membership)
            .finish_non_exhaustive()
    }
}

impl MeshStateMachine {
    /// An empty state machine for `datacenter` that keeps its snapshots in memory only.
    pub fn in_memory(datacenter: &str) -> Self {
        Self::with_slot(datacenter, SnapshotSlot { current: Mutex::new(None), size: Arc::default(), file: None })
    }

    /// A state machine for `datacenter` whose snapshots are written to [`SNAPSHOT_FILE`] in
    /// `dir` (created if needed); the state, last applied log id and membership are restored
    /// from that file when there is one. Blocking.
    pub fn open(dir: &Path, datacenter: &str) -> Result<Self, RaftStorageError> {
        let err = |e: &dyn std::fmt::Display| storage_err(ErrorSubject::Snapshot(None), ErrorVerb::Read, e);
        std::fs::create_dir_all(dir).map_err(|e| err(&format!("{}: {e}", dir.display())))?;
        let path = dir.join(SNAPSHOT_FILE);
        let mut sm = Self::with_slot(
            datacenter,
            SnapshotSlot { current: Mutex::new(None), size: Arc::default(), file: Some(path.clone()) },
        );
        match std::fs::read(&path) {
            Ok(bytes) => {
                let file: SnapshotFile =
                    rmp_serde::from_slice(&bytes).map_err(|e| err(&format!("{}: {e}", path.display())))?;
                sm.restore(&file.data)?;
                sm.snapshot.set(file.meta, file.data);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(err(&format!("{}: {e}", path.display()))),
        }
        Ok(sm)
    }

    fn with_slot(datacenter: &str, slot: SnapshotSlot) -> Self {
        let state = State::new(datacenter);
        Self {
            published: tokio::sync::watch::Sender::new(Applied { log_id: None, state: state.clone() }),
            state,
            last_applied: None,
            last_membership: StoredMembership::default(),
            snapshot: Arc::new(slot),
            built: Arc::default(),
            observer: None,
        }
    }

    /// Tell `observer` of every change from now on (it is first told of the current state).
    pub fn set_observer(&mut self, observer: Arc<dyn ApplyObserver>) {
        observer.replaced(&self.state);
        self.observer = Some(observer);
    }

    /// The size in bytes of the current snapshot, as it changes (0: none yet).
    pub fn snapshot_size(&self) -> Arc<std::sync::atomic::AtomicU64> {
        self.snapshot.size.clone()
    }

    /// The state as applied so far.
    pub fn state(&self) -> &State {
        &self.state
    }

    /// The id of the last applied log entry.
    pub fn last_applied(&self) -> Option<LogId> {
        self.last_applied
    }

    /// The state as applied, now and after every batch of entries or installed snapshot (for
    /// readers once the state machine belongs to a [`Raft`](openraft::Raft)).
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<Applied> {
        self.published.subscribe()
    }

    fn publish(&self) {
        self.published.send_replace(Applied { log_id: self.last_applied, state: self.state.clone() });
    }

    /// Replace state, last applied id and membership with a snapshot body.
    fn restore(&mut self, data: &[u8]) -> Result<(), RaftStorageError> {
        let err = |e: &dyn std::fmt::Display| storage_err(ErrorSubject::Snapshot(None), ErrorVerb::Read, e);
        let body: SnapshotBody = rmp_serde::from_slice(data).map_err(|e| err(&e))?;
        let mut state = decode_state(&body.state).map_err(|e| err(&e))?;
        state.rebuild_indexes();
        self.state = state;
        self.last_applied = body.last_applied;
        self.last_membership = body.last_membership;
        self.publish();
        if let Some(o) = &self.observer {
            o.replaced(&self.state);
        }
        Ok(())
    }
}

/// Builds a snapshot from a copy of the state taken when the builder was made (the state's maps
/// are persistent, so the copy is cheap and the state machine keeps applying meanwhile).
#[derive(Debug)]
pub struct MeshSnapshotBuilder {
    state: State,
    last_applied: Option<LogId>,
    last_membership: StoredMembership,
    snapshot: Arc<SnapshotSlot>,
    built: Arc<std::sync::atomic::AtomicU64>,
}

impl RaftSnapshotBuilder<TypeConfig> for MeshSnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, RaftStorageError> {
        let n = self.built.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        let snapshot_id = match self.last_applied {
            Some(l) => format!("{}-{}-{n}", l.leader_id, l.index),
            None => format!("--{n}"),
        };
        let meta =
            SnapshotMeta { last_log_id: self.last_applied, last_membership: self.last_membership.clone(), snapshot_id };
        let state = self.state.clone();
        let (last_applied, last_membership) = (self.last_applied, self.last_membership.clone());
        let slot = self.snapshot.clone();
        let sig = Some(meta.signature());
        let m = meta.clone();
        let data = blocking(ErrorSubject::Snapshot(sig.clone()), ErrorVerb::Write, move || {
            let err = |e: &dyn std::fmt::Display| storage_err(ErrorSubject::Snapshot(sig.clone()), ErrorVerb::Write, e);
            let mut encoded = Vec::new();
            encode_state(&mut encoded, &state).map_err(|e| err(&e))?;
            let body = SnapshotBody { last_applied, last_membership, state: encoded };
            let data = rmp_serde::to_vec_named(&body).map_err(|e| err(&e))?;
            slot.store(m, data.clone())?;
            Ok(data)
        })
        .await?;
        Ok(Snapshot { meta, snapshot: Box::new(Cursor::new(data)) })
    }
}

impl RaftStateMachine<TypeConfig> for MeshStateMachine {
    type SnapshotBuilder = MeshSnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), RaftStorageError> {
        Ok((self.last_applied, self.last_membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<ApplyOutcome>, RaftStorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        // State::apply is pure and in memory: deterministic on every member, no I/O to offload.
        let entries = entries.into_iter();
        let mut out = Vec::with_capacity(entries.size_hint().0);
        let before = self.observer.as_ref().map(|_| self.state.clone());
        let mut accepted = Vec::new();
        for entry in entries {
            self.last_applied = Some(entry.log_id);
            let results = match entry.payload {
                EntryPayload::Blank => Vec::new(),
                EntryPayload::Normal(batch) => {
                    let mut results = Vec::with_capacity(batch.commands.len());
                    for cmd in batch.commands {
                        if sim_bug::drops(entry.log_id.index) {
                            results.push(Ok(()));
                            continue;
                        }
                        let r = self.state.apply(&cmd).map(drop);
                        if r.is_ok() && before.is_some() {
                            accepted.push(cmd);
                        }
                        results.push(r);
                    }
                    results
                }
                EntryPayload::Membership(m) => {
                    self.last_membership = StoredMembership::new(Some(entry.log_id), m);
                    Vec::new()
                }
            };
            out.push(ApplyOutcome { index: self.state.index, results });
        }
        self.publish();
        if let (Some(o), Some(before)) = (&self.observer, before)
            && !accepted.is_empty()
        {
            o.applied(&before, &accepted, &self.state);
        }
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        MeshSnapshotBuilder {
            state: self.state.clone(),
            last_applied: self.last_applied,
            last_membership: self.last_membership.clone(),
            snapshot: self.snapshot.clone(),
            built: self.built.clone(),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, RaftStorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, MeshNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), RaftStorageError> {
        let data = snapshot.into_inner();
        let sig = Some(meta.signature());
        // Decoding a large state and writing the file are blocking work.
        let (machine, data) = {
            let datacenter = self.state.catalog.datacenter.clone();
            blocking(ErrorSubject::Snapshot(sig), ErrorVerb::Read, move || {
                let mut m = MeshStateMachine::in_memory(&datacenter);
                m.restore(&data)?;
                Ok((m, data))
            })
            .await?
        };
        self.state = machine.state;
        // The metadata is authoritative for what the snapshot covers.
        self.last_applied = meta.last_log_id;
        self.last_membership = meta.last_membership.clone();
        self.publish();
        if let Some(o) = &self.observer {
            o.replaced(&self.state);
        }
        let slot = self.snapshot.clone();
        let m = meta.clone();
        blocking(ErrorSubject::Snapshot(Some(meta.signature())), ErrorVerb::Write, move || slot.store(m, data)).await
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, RaftStorageError> {
        Ok(self
            .snapshot
            .current()
            .map(|(meta, data)| Snapshot { meta, snapshot: Box::new(Cursor::new(data.as_ref().clone())) }))
    }
}

/// A bug switched on by a simulation test on its own thread, to show that the simulation's
/// invariants catch it: the state machine answers a committed write as applied and drops it.
#[doc(hidden)]
pub mod sim_bug {
    use std::cell::Cell;

    thread_local! {
        static DROP_EVERY: Cell<u64> = const { Cell::new(0) };
    }

    /// Drop the commands of every log entry whose index is a multiple of `n` (0: none, the
    /// default), on this thread.
    pub fn drop_every(n: u64) {
        DROP_EVERY.with(|d| d.set(n));
    }

    pub(super) fn drops(index: u64) -> bool {
        let n = DROP_EVERY.with(Cell::get);
        n != 0 && index.is_multiple_of(n)
    }
}
