//! The Raft log as append-only segment files, written by a thread of its own.
//!
//! Why not redb (the first log store): a redb commit rewrites several scattered pages (the
//! table's leaf and branches, the allocator, the header) and runs on tokio's blocking pool,
//! and openraft waited for it inside its core; a write of `mesh dev` on that path cost ~0.7 ms
//! at c=1 against ~0.2 ms on the state log of issue 11. A Raft log is appended, read back
//! whole at start, cut at the tail after a conflict and dropped from the front after a
//! snapshot: it needs none of a B-tree.
//!
//! - **Records.** `raft-log/<seq, 20 digits>.seg` files hold records `[len u32][crc32 u32]
//!   [MessagePack Record]` back to back, followed by zeros: the tail segment is zero-filled
//!   ahead of the writes ([`PREALLOC_STEP`]), so an append overwrites blocks that exist and its
//!   `fdatasync` flushes data only. A record is a batch of entries, a truncation, a purge, the
//!   committed log id or the vote.
//! - **The writer thread** takes every job queued since its last write, writes them with one
//!   `pwrite` and, when any of them must be durable (entries, vote, truncation, purge), one
//!   `fdatasync`; then it tells openraft ([`LogFlushed`]) or the waiting caller. So
//!   [`RaftLogStorage::append`] returns at once, openraft's core never waits on the disk, and
//!   entries that arrive during a sync share the next one (group commit in the log).
//! - **Committed log id**: written with the next write, without a sync of its own (openraft
//!   does not need it durable; a restart finds an older one and learns the rest).
//! - **In memory**: the entries not purged, the vote, the committed and last purged log ids,
//!   so reads (replication to followers, openraft's state) never touch the disk. openraft
//!   purges what a snapshot covers, so this stays at about one snapshot interval of entries.
//! - **Segments** close after [`SEGMENT_BYTES`]; a new one starts with the vote, the committed
//!   and the last purged ids, so a closed segment is only needed for its entries and is
//!   deleted once a durable purge covers all of them.
//! - **Opening** replays every segment in order; whatever follows the last good record of the
//!   tail (a write that never completed, so was never acknowledged) is cut off. A data dir with
//!   the older `raft-log.redb` is imported at its first open (the file is kept as
//!   `raft-log.redb.pre-seg`).

use super::{Entry, LogId, NodeId, RaftStorageError, TypeConfig, storage_err};
use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{ErrorSubject, ErrorVerb, OptionalSend, RaftLogReader, Vote};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Debug;
use std::fs::{File, OpenOptions};
use std::ops::RangeBounds;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};

/// The directory of the log's segments inside the store's directory.
pub const LOG_DIR: &str = "raft-log";
/// The redb log of earlier releases, imported at the first open.
pub const REDB_FILE: &str = "raft-log.redb";
/// A segment is closed once it holds this many bytes.
pub const SEGMENT_BYTES: u64 = 32 << 20;
/// The tail segment is zero-filled this far ahead of the last record.
pub const PREALLOC_STEP: u64 = 1 << 20;
/// At most this many queued jobs go into one write.
const MAX_GROUP: usize = 4096;

/// One record of a segment.
#[derive(Serialize, Deserialize)]
enum Record {
    /// Entries, in order (they replace any entry at the same index).
    Entries(Vec<Entry>),
    /// Every entry from this index on is gone.
    Truncate(u64),
    /// Every entry up to this log id is gone (a snapshot covers it).
    Purge(LogId),
    /// The committed log id.
    Committed(Option<LogId>),
    /// The vote.
    Vote(Vote<NodeId>),
}

/// What the log holds, in memory.
#[derive(Default)]
struct Mem {
    entries: BTreeMap<u64, Entry>,
    purged: Option<LogId>,
    vote: Option<Vote<NodeId>>,
    committed: Option<LogId>,
}

impl Mem {
    fn apply(&mut self, record: Record) {
        match record {
            Record::Entries(entries) => {
                for e in entries {
                    self.entries.insert(e.log_id.index, e);
                }
            }
            Record::Truncate(from) => {
                self.entries.split_off(&from);
            }
            Record::Purge(upto) => {
                self.entries = self.entries.split_off(&(upto.index + 1));
                if self.purged.is_none_or(|p| p.index < upto.index) {
                    self.purged = Some(upto);
                }
            }
            Record::Committed(c) => self.committed = c,
            Record::Vote(v) => self.vote = Some(v),
        }
    }
}

/// Work for the writer thread.
enum Job {
    /// Entries: durable, then openraft is told.
    Append(Record, LogFlushed<TypeConfig>),
    /// Durable, then the caller is told.
    Sync(Record, tokio::sync::oneshot::Sender<Result<(), String>>),
    /// Written with the next write, no sync of its own.
    Lazy(Record),
}

/// A segment file: its sequence number, path and the highest entry index written to it.
#[derive(Debug)]
struct Segment {
    seq: u64,
    path: PathBuf,
    max_index: Option<u64>,
}

fn segment_name(seq: u64) -> String {
    format!("{seq:020}.seg")
}

fn sync_dir(dir: &Path) -> Result<(), String> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| format!("{}: {e}", dir.display()))
}

fn encode(buf: &mut Vec<u8>, record: &Record) -> Result<(), String> {
    let body = rmp_serde::to_vec_named(record).map_err(|e| format!("encoding a log record: {e}"))?;
    mesh_core::state::put_frame(buf, &body);
    Ok(())
}

/// The records at the start of `buf` that check out, with the offset after the last one.
fn scan(buf: &[u8]) -> (Vec<Record>, usize) {
    let mut out = Vec::new();
    let mut end = 0usize;
    for (body, at) in mesh_core::state::frames(buf) {
        let Ok(record) = rmp_serde::from_slice::<Record>(body) else { break };
        end = at;
        out.push(record);
    }
    (out, end)
}

/// The writer thread's side: the segment files.
struct Writer {
    dir: PathBuf,
    /// Oldest first; the last is the tail.
    segments: Vec<Segment>,
    tail: File,
    /// Bytes of the tail that hold records.
    tail_len: u64,
    /// Bytes of the tail that exist on disk (records, then zeros).
    allocated: u64,
    /// What a new segment starts with.
    vote: Option<Vote<NodeId>>,
    committed: Option<LogId>,
    purged: Option<LogId>,
    /// Set on the first failed write: nothing is written after it.
    failed: Option<String>,
    /// Bytes of entries written since the log was opened (the snapshot policy reads it).
    appended: Arc<AtomicU64>,
    /// A segment is closed once it holds this many bytes.
    segment_bytes: u64,
}

impl Writer {
    fn create_segment(dir: &Path, seq: u64) -> Result<(Segment, File), String> {
        let path = dir.join(segment_name(seq));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        sync_dir(dir)?;
        Ok((Segment { seq, path, max_index: None }, file))
    }

    fn tail_path(&self) -> PathBuf {
        self.segments.last().map(|s| s.path.clone()).unwrap_or_default()
    }

    /// Zero-fill the tail so that `need` more bytes fit in blocks that exist.
    fn preallocate(&mut self, need: u64) -> Result<(), String> {
        if self.tail_len + need <= self.allocated {
            return Ok(());
        }
        let to = (self.tail_len + need).next_multiple_of(PREALLOC_STEP);
        let zeros = vec![0u8; (to - self.allocated) as usize];
        if let Err(e) = self.tail.write_all_at(&zeros, self.allocated).and_then(|()| self.tail.sync_all()) {
            let _ = self.tail.set_len(self.allocated);
            return Err(format!("{}: {e}", self.tail_path().display()));
        }
        self.allocated = to;
        Ok(())
    }

    /// Close the tail (cut to its records, synced) and start the next segment with the vote,
    /// committed and purged ids, so no closed segment is needed for them.
    fn rotate(&mut self) -> Result<(), String> {
        let path = self.tail_path();
        self.tail
            .set_len(self.tail_len)
            .and_then(|()| self.tail.sync_all())
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let seq = self.segments.last().map_or(1, |s| s.seq + 1);
        let (segment, file) = Self::create_segment(&self.dir, seq)?;
        self.segments.push(segment);
        self.tail = file;
        self.tail_len = 0;
        self.allocated = 0;
        let mut header = Vec::new();
        if let Some(v) = self.vote {
            encode(&mut header, &Record::Vote(v))?;
        }
        encode(&mut header, &Record::Committed(self.committed))?;
        if let Some(p) = self.purged {
            encode(&mut header, &Record::Purge(p))?;
        }
        self.write_at_tail(&header, true)
    }

    fn write_at_tail(&mut self, bytes: &[u8], sync: bool) -> Result<(), String> {
        self.preallocate(bytes.len() as u64)?;
        let path = self.tail_path();
        self.tail
            .write_all_at(bytes, self.tail_len)
            .and_then(|()| if sync { self.tail.sync_data() } else { Ok(()) })
            .map_err(|e| format!("{}: {e}", path.display()))?;
        self.tail_len += bytes.len() as u64;
        Ok(())
    }

    /// Write a group of jobs: one write, at most one sync.
    fn write_group(&mut self, jobs: &[Job]) -> Result<(), String> {
        if let Some(why) = &self.failed {
            return Err(why.clone());
        }
        let mut buf = Vec::new();
        let mut sync = false;
        let mut max_index = None;
        let mut entry_bytes = 0u64;
        for job in jobs {
            let record = match job {
                Job::Append(r, _) | Job::Sync(r, _) => {
                    sync = true;
                    r
                }
                Job::Lazy(r) => r,
            };
            let before = buf.len();
            encode(&mut buf, record)?;
            if let Record::Entries(es) = record {
                max_index = max_index.max(es.last().map(|e| e.log_id.index));
                entry_bytes += (buf.len() - before) as u64;
            }
        }
        let result = (|| {
            if self.tail_len > 0 && self.tail_len + buf.len() as u64 > self.segment_bytes {
                self.rotate()?;
            }
            self.write_at_tail(&buf, sync)
        })();
        if let Err(why) = &result {
            self.failed = Some(why.clone());
            return result;
        }
        for job in jobs {
            let (Job::Append(r, _) | Job::Sync(r, _) | Job::Lazy(r)) = job;
            match r {
                Record::Vote(v) => self.vote = Some(*v),
                Record::Committed(c) => self.committed = *c,
                Record::Purge(p) => self.purged = Some(*p),
                Record::Entries(_) | Record::Truncate(_) => {}
            }
        }
        if let Some(tail) = self.segments.last_mut() {
            tail.max_index = tail.max_index.max(max_index);
        }
        self.appended.fetch_add(entry_bytes, Ordering::Relaxed);
        Ok(())
    }

    /// Delete the closed segments whose entries a durable purge covers.
    fn delete_purged(&mut self) {
        let Some(purged) = self.purged else { return };
        let mut removed = false;
        while self.segments.len() > 1 && self.segments[0].max_index.is_none_or(|m| m <= purged.index) {
            let s = self.segments.remove(0);
            if let Err(e) = std::fs::remove_file(&s.path) {
                tracing::warn!(segment = %s.path.display(), error = %e, "raft log: cannot delete a purged segment");
            }
            removed = true;
        }
        if removed {
            let _ = sync_dir(&self.dir);
        }
    }

    fn run(mut self, rx: mpsc::Receiver<Job>) {
        while let Ok(first) = rx.recv() {
            let mut jobs = vec![first];
            while jobs.len() < MAX_GROUP {
                match rx.try_recv() {
                    Ok(j) => jobs.push(j),
                    Err(_) => break,
                }
            }
            self.process(jobs);
        }
    }

    /// Write a group of jobs, then tell each one's waiter.
    fn process(&mut self, jobs: Vec<Job>) {
        let result = self.write_group(&jobs);
        if let Err(why) = &result {
            tracing::error!(error = %why, "raft log: a write failed; the log takes no more writes");
        }
        for job in jobs {
            match job {
                Job::Append(_, done) => done.log_io_completed(result.clone().map_err(std::io::Error::other)),
                Job::Sync(_, ack) => {
                    let _ = ack.send(result.clone());
                }
                Job::Lazy(_) => {}
            }
        }
        if result.is_ok() {
            self.delete_purged();
        }
    }
}

/// Open the segments in `dir` (created if needed), replaying them into memory.
fn open_dir(dir: &Path) -> Result<(Writer, Mem), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut segments = Vec::new();
    for e in std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))? {
        let e = e.map_err(|e| format!("{}: {e}", dir.display()))?;
        let name = e.file_name();
        if let Some(seq) = name.to_str().and_then(|n| n.strip_suffix(".seg")).and_then(|n| n.parse::<u64>().ok()) {
            segments.push(Segment { seq, path: e.path(), max_index: None });
        }
    }
    segments.sort_by_key(|s| s.seq);
    let mut mem = Mem::default();
    let mut tail: Option<(File, u64, u64)> = None;
    let count = segments.len();
    for (i, s) in segments.iter_mut().enumerate() {
        let bytes = std::fs::read(&s.path).map_err(|e| format!("{}: {e}", s.path.display()))?;
        let (records, end) = scan(&bytes);
        let rest_is_zero = bytes[end..].iter().all(|b| *b == 0);
        for r in records {
            if let Record::Entries(es) = &r {
                s.max_index = s.max_index.max(es.last().map(|e| e.log_id.index));
            }
            mem.apply(r);
        }
        if i + 1 < count {
            if !rest_is_zero {
                return Err(format!("{}: a damaged record at byte {end} of a closed segment", s.path.display()));
            }
            continue;
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&s.path)
            .map_err(|e| format!("{}: {e}", s.path.display()))?;
        if !rest_is_zero {
            // A write that never completed (so was never acknowledged): cut it off, so no later
            // scan reads its bytes as records after the ones that follow.
            tracing::info!(segment = %s.path.display(), at = end, "raft log: cutting off an incomplete write");
            file.set_len(end as u64)
                .and_then(|()| file.sync_all())
                .map_err(|e| format!("{}: {e}", s.path.display()))?;
        }
        let allocated = file.metadata().map_err(|e| format!("{}: {e}", s.path.display()))?.len();
        tail = Some((file, end as u64, allocated));
    }
    let (tail, tail_len, allocated) = match tail {
        Some(t) => t,
        None => {
            let (segment, file) = Writer::create_segment(dir, 1)?;
            segments.push(segment);
            (file, 0, 0)
        }
    };
    let writer = Writer {
        dir: dir.to_path_buf(),
        segments,
        tail,
        tail_len,
        allocated,
        vote: mem.vote,
        committed: mem.committed,
        purged: mem.purged,
        failed: None,
        appended: Arc::default(),
        segment_bytes: SEGMENT_BYTES,
    };
    Ok((writer, mem))
}

/// The log, vote, committed and purged ids of a redb log of an earlier release.
fn import_redb(path: &Path) -> Result<Vec<Record>, String> {
    use redb::{ReadableDatabase, ReadableTable, TableDefinition};
    const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_log");
    const META: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_meta");
    let err = |e: &dyn std::fmt::Display| format!("{}: {e}", path.display());
    let db = redb::Database::open(path).map_err(|e| err(&e))?;
    let tx = db.begin_read().map_err(|e| err(&e))?;
    let mut records = Vec::new();
    if let Ok(meta) = tx.open_table(META) {
        let get = |key: &str| -> Result<Option<Vec<u8>>, String> {
            Ok(meta.get(key).map_err(|e| err(&e))?.map(|v| v.value().to_vec()))
        };
        if let Some(v) = get("vote")? {
            records.push(Record::Vote(serde_json::from_slice(&v).map_err(|e| err(&e))?));
        }
        if let Some(p) = get("last_purged")? {
            records.push(Record::Purge(serde_json::from_slice(&p).map_err(|e| err(&e))?));
        }
        if let Some(c) = get("committed")? {
            records.push(Record::Committed(serde_json::from_slice(&c).map_err(|e| err(&e))?));
        }
    }
    if let Ok(log) = tx.open_table(LOG) {
        let mut entries = Vec::new();
        for item in log.iter().map_err(|e| err(&e))? {
            let (_, v) = item.map_err(|e| err(&e))?;
            entries.push(rmp_serde::from_slice::<Entry>(v.value()).map_err(|e| err(&e))?);
        }
        if !entries.is_empty() {
            records.push(Record::Entries(entries));
        }
    }
    Ok(records)
}

struct Inner {
    dir: PathBuf,
    appended: Arc<AtomicU64>,
    mem: Mutex<Mem>,
    tx: Option<mpsc::Sender<Job>>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// In a simulation ([`super::runtime::simulated`]): the writer, run inline by each caller.
    inline: Option<Mutex<Writer>>,
    /// In a simulation with a slow disk: the queue of a task that writes after a delay.
    slow: Option<tokio::sync::mpsc::UnboundedSender<Job>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The writer finishes what was queued, then ends: a reopen never races its writes.
        drop(self.tx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The Raft log of one node as segment files (see the module docs). Cloning shares it: a clone
/// is the [`RaftLogReader`] handed to replication tasks.
#[derive(Clone)]
pub struct SegmentLogStore {
    inner: Arc<Inner>,
}

impl Debug for SegmentLogStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SegmentLogStore").field("dir", &self.inner.dir).finish()
    }
}

impl SegmentLogStore {
    /// Open or create the log in `dir` (its segments in [`LOG_DIR`] there), importing the redb
    /// log of an earlier release when there is one. Blocking.
    pub fn open(dir: &Path) -> Result<Self, RaftStorageError> {
        Self::open_with(dir, SEGMENT_BYTES)
    }

    /// [`SegmentLogStore::open`] with segments closed after `segment_bytes` (tests use small
    /// ones to see segments come and go).
    #[doc(hidden)]
    pub fn open_with(dir: &Path, segment_bytes: u64) -> Result<Self, RaftStorageError> {
        let err = |e: String| storage_err(ErrorSubject::Store, ErrorVerb::Read, e);
        let log_dir = dir.join(LOG_DIR);
        let redb = dir.join(REDB_FILE);
        let fresh = !log_dir.exists();
        let (mut writer, mut mem) = open_dir(&log_dir).map_err(err)?;
        writer.segment_bytes = segment_bytes;
        if fresh && redb.exists() {
            let records = import_redb(&redb).map_err(err)?;
            let mut buf = Vec::new();
            for r in &records {
                encode(&mut buf, r).map_err(err)?;
            }
            writer.write_at_tail(&buf, true).map_err(err)?;
            for r in records {
                match &r {
                    Record::Vote(v) => writer.vote = Some(*v),
                    Record::Committed(c) => writer.committed = *c,
                    Record::Purge(p) => writer.purged = Some(*p),
                    Record::Entries(es) => writer.segments[0].max_index = es.last().map(|e| e.log_id.index),
                    Record::Truncate(_) => {}
                }
                mem.apply(r);
            }
            let kept = dir.join(format!("{REDB_FILE}.pre-seg"));
            std::fs::rename(&redb, &kept).map_err(|e| err(format!("{}: {e}", redb.display())))?;
            sync_dir(dir).map_err(err)?;
            tracing::info!(from = %redb.display(), "raft log: imported the redb log into segment files");
        }
        let appended = writer.appended.clone();
        if super::runtime::simulated() {
            let max = super::runtime::slow_disk();
            let (inline, slow) = if max.is_zero() {
                (Some(Mutex::new(writer)), None)
            } else {
                let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Job>();
                tokio::spawn(async move {
                    while let Some(job) = rx.recv().await {
                        tokio::time::sleep(super::runtime::disk_delay(max)).await;
                        writer.process(vec![job]);
                    }
                });
                (None, Some(tx))
            };
            return Ok(Self {
                inner: Arc::new(Inner {
                    dir: log_dir,
                    appended,
                    mem: Mutex::new(mem),
                    tx: None,
                    thread: None,
                    inline,
                    slow,
                }),
            });
        }
        let (tx, rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("raft-log".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| err(format!("cannot start the log writer: {e}")))?;
        Ok(Self {
            inner: Arc::new(Inner {
                dir: log_dir,
                appended,
                mem: Mutex::new(mem),
                tx: Some(tx),
                thread: Some(thread),
                inline: None,
                slow: None,
            }),
        })
    }

    /// The directory of the segments.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Bytes of entries durably written since the log was opened (grows only).
    pub fn appended_bytes(&self) -> Arc<AtomicU64> {
        self.inner.appended.clone()
    }

    fn mem(&self) -> std::sync::MutexGuard<'_, Mem> {
        self.inner.mem.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn send(&self, job: Job, subject: ErrorSubject<NodeId>) -> Result<(), RaftStorageError> {
        if let Some(w) = &self.inner.inline {
            w.lock().unwrap_or_else(|p| p.into_inner()).process(vec![job]);
            return Ok(());
        }
        if let Some(slow) = &self.inner.slow {
            return slow.send(job).map_err(|_| storage_err(subject, ErrorVerb::Write, "the log writer stopped"));
        }
        match &self.inner.tx {
            Some(tx) => tx.send(job).map_err(|_| storage_err(subject, ErrorVerb::Write, "the log writer stopped")),
            None => Err(storage_err(subject, ErrorVerb::Write, "the log is closed")),
        }
    }

    /// Write `record` durably before returning.
    async fn sync(&self, record: Record, subject: ErrorSubject<NodeId>) -> Result<(), RaftStorageError> {
        let (ack, done) = tokio::sync::oneshot::channel();
        self.send(Job::Sync(record, ack), subject.clone())?;
        match done.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(why)) => Err(storage_err(subject, ErrorVerb::Write, why)),
            Err(_) => Err(storage_err(subject, ErrorVerb::Write, "the log writer stopped")),
        }
    }
}

impl RaftLogReader<TypeConfig> for SegmentLogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, RaftStorageError> {
        Ok(self.mem().entries.range(range).map(|(_, e)| e.clone()).collect())
    }
}

impl RaftLogStorage<TypeConfig> for SegmentLogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, RaftStorageError> {
        let mem = self.mem();
        let last = mem.entries.last_key_value().map(|(_, e)| e.log_id);
        Ok(LogState { last_purged_log_id: mem.purged, last_log_id: last.or(mem.purged) })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), RaftStorageError> {
        self.sync(Record::Vote(*vote), ErrorSubject::Vote).await?;
        self.mem().vote = Some(*vote);
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, RaftStorageError> {
        Ok(self.mem().vote)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), RaftStorageError> {
        self.mem().committed = committed;
        self.send(Job::Lazy(Record::Committed(committed)), ErrorSubject::Store)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, RaftStorageError> {
        Ok(self.mem().committed)
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), RaftStorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        if entries.is_empty() {
            callback.log_io_completed(Ok(()));
            return Ok(());
        }
        {
            // Readable at once (replication may send them before they are durable here);
            // counted as persisted only when the writer says so.
            let mut mem = self.mem();
            for e in &entries {
                mem.entries.insert(e.log_id.index, e.clone());
            }
        }
        self.send(Job::Append(Record::Entries(entries), callback), ErrorSubject::Logs)
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), RaftStorageError> {
        self.mem().entries.split_off(&log_id.index);
        self.sync(Record::Truncate(log_id.index), ErrorSubject::Log(log_id)).await
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), RaftStorageError> {
        self.mem().apply(Record::Purge(log_id));
        self.sync(Record::Purge(log_id), ErrorSubject::Log(log_id)).await
    }
}
