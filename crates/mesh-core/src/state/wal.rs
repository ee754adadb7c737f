//! The state log as append-only segment files: one `pwrite` and one `fdatasync` per batch.
//!
//! Why not the redb table ([`RedbLog`]): a redb commit rewrites about seven scattered pages (the
//! log's leaf and branch, the table tree, the allocator's records, the header) before its sync,
//! which made a single write cost ~0.2 ms of disk on the build machine against ~0.12 ms for
//! one appended page, and at c=1 that is most of a KV PUT (issue 11). A command log is only
//! ever appended, read back whole at start and dropped from the front after a snapshot, so it
//! needs none of a B-tree.
//!
//! Layout of a data dir: `state.wal/<first index, 20 digits>.wal` segments, `state.snap` (the
//! snapshot, [`FileSnapshots`]) and `state.reserve` ([`Reserve`]). A segment holds records
//! `[len u32][crc32 u32][JSON {v, index, cmd}]` (the reserve's format) back to back, followed
//! by zeros: the file is zero-filled ahead of the writes in [`PREALLOC_STEP`]s, so an append
//! overwrites blocks that exist and its sync flushes data only (no size change), and a full
//! disk shows when space is allocated, before a record is half written. The log ends at the
//! first record that is empty, does not check out, or does not follow its predecessor; at open,
//! whatever follows the last good record (a write that never completed, so was never
//! acknowledged) is cut off. A segment is closed after [`SEGMENT_BYTES`] and dropped once a
//! durable snapshot covers all of it.
//!
//! A data dir written with `state.redb` moves to this layout at its first open
//! ([`WalLog::open_data_dir`]).

use super::*;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

/// A segment is closed once it holds this many bytes.
pub const SEGMENT_BYTES: u64 = 64 << 20;

/// The tail segment is zero-filled this far ahead of the last record.
pub const PREALLOC_STEP: u64 = 1 << 20;

/// The directory of segments in a data dir.
pub const WAL_DIR: &str = "state.wal";

/// One segment file: the index of its first record and its path.
#[derive(Debug, Clone)]
struct Segment {
    first: u64,
    path: PathBuf,
}

/// The state log as segment files (see the module docs).
pub struct WalLog {
    dir: PathBuf,
    segments: Vec<Segment>,
    /// The tail segment, open for writes; `None` after a failed write until [`Log::recover`].
    file: Option<File>,
    /// Bytes of the tail segment that hold acknowledged records.
    tail_len: u64,
    /// Bytes of the tail segment that exist on disk (records, then zeros).
    allocated: u64,
    /// Index of the last record durably in the log (or of the snapshot, when the log is empty).
    durable: u64,
    snapshots: Arc<FileSnapshots>,
    reserve: Option<Reserve>,
    /// Entries up to here are covered by a durable snapshot.
    compact_to: u64,
    appended: u64,
    segment_bytes: u64,
}

fn io_err(path: &Path, e: impl std::fmt::Display) -> LogError {
    LogError::Store(format!("{}: {e}", path.display()))
}

/// Append `body` to `buf` as one checked frame: its length and CRC-32 (little-endian `u32`s),
/// then the body. The framing of every append-only log here (this one, the Raft log's
/// segments): a frame whose write did not finish fails its check when read back.
pub fn put_frame(buf: &mut Vec<u8>, body: &[u8]) {
    buf.extend_from_slice(&(body.len() as u32).to_le_bytes());
    buf.extend_from_slice(&crc32fast::hash(body).to_le_bytes());
    buf.extend_from_slice(body);
}

/// The frames ([`put_frame`]) at the start of `buf` that check out, each body with the offset
/// just after it; ends at the first that is empty, incomplete or fails its check (the end of
/// the log, or a write that did not finish and was never acknowledged).
pub fn frames(buf: &[u8]) -> impl Iterator<Item = (&[u8], usize)> {
    let mut at = 0usize;
    std::iter::from_fn(move || {
        let head = buf.get(at..at + 8)?;
        let len = u32::from_le_bytes(head[..4].try_into().ok()?) as usize;
        let crc = u32::from_le_bytes(head[4..].try_into().ok()?);
        let body = buf.get(at + 8..at + 8 + len)?;
        if len == 0 || crc32fast::hash(body) != crc {
            return None;
        }
        at += 8 + len;
        Some((body, at))
    })
}

/// Encode commands `first..` as reserve-format records.
pub(super) fn encode_records(first: u64, cmds: &[Command]) -> Result<Vec<u8>, LogError> {
    let mut bytes = Vec::new();
    for (i, cmd) in cmds.iter().enumerate() {
        let body = serde_json::to_vec(&Envelope {
            v: FORMAT_VERSION,
            body: ReservedBody { index: first + i as u64, cmd: cmd.clone() },
        })?;
        put_frame(&mut bytes, &body);
    }
    Ok(bytes)
}

/// The records at the start of `buf` that check out and follow each other (the first one at
/// `expect_first` when given), with the offset after each. Stops at the first that does not.
pub(super) fn scan_records(buf: &[u8], expect_first: Option<u64>) -> Result<Vec<(u64, Command, usize)>, LogError> {
    let mut out: Vec<(u64, Command, usize)> = Vec::new();
    for (body, at) in frames(buf) {
        let Ok(env) = serde_json::from_slice::<Envelope<ReservedBody>>(body) else { break };
        if env.v > FORMAT_VERSION {
            return Err(LogError::Version(env.v));
        }
        let expected = out.last().map(|(i, _, _)| i + 1).or(expect_first);
        if expected.is_some_and(|e| e != env.body.index) {
            break;
        }
        out.push((env.body.index, env.body.cmd, at));
    }
    Ok(out)
}

fn segment_name(first: u64) -> String {
    format!("{first:020}.wal")
}

fn sync_dir(dir: &Path) -> Result<(), LogError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| io_err(dir, e))
}

/// The segments in `dir`, oldest first.
fn list_segments(dir: &Path) -> Result<Vec<Segment>, LogError> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).map_err(|e| io_err(dir, e))? {
        let e = e.map_err(|e| io_err(dir, e))?;
        let name = e.file_name();
        let Some(first) = name.to_str().and_then(|n| n.strip_suffix(".wal")).and_then(|n| n.parse::<u64>().ok()) else {
            continue;
        };
        out.push(Segment { first, path: e.path() });
    }
    out.sort_by_key(|s| s.first);
    Ok(out)
}

impl WalLog {
    /// Open the state log of a data dir with a reserve of `reserve_bytes` (0: none), moving a
    /// `state.redb` log (an older data dir) into segments first.
    pub fn open_data_dir(data_dir: &Path, reserve_bytes: u64) -> Result<Self, LogError> {
        let wal = data_dir.join(WAL_DIR);
        let redb_path = data_dir.join("state.redb");
        if !wal.exists() && redb_path.exists() {
            Self::migrate(&redb_path, &wal)?;
        } else if redb_path.exists() {
            // Moved already; only its removal did not happen.
            std::fs::remove_file(&redb_path).map_err(|e| io_err(&redb_path, e))?;
        }
        Self::open(&wal, reserve_bytes)
    }

    /// Copy the redb log (after its snapshot) into segments under a temporary name, then put
    /// them in place and remove the database: a crash at any point leaves one complete log.
    fn migrate(redb_path: &Path, wal: &Path) -> Result<(), LogError> {
        let (snap, cmds) = {
            // Its reserve is moved into the database on open (and is the same file as ours).
            let mut old = RedbLog::open_with_reserve(redb_path, 0)?;
            old.load()?
        };
        let snapshots = FileSnapshots::new(&wal.with_extension("snap"));
        let from = match &snap {
            Some(s) => {
                // A JSON snapshot in the database (format 1) becomes a snapshot file.
                if snapshots.index()?.unwrap_or(0) < s.index {
                    snapshots.write(s)?;
                }
                s.index + 1
            }
            None => 1,
        };
        let tmp = wal.with_extension("wal.tmp");
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(|e| io_err(&tmp, e))?;
        let seg = tmp.join(segment_name(from));
        let bytes = encode_records(from, &cmds)?;
        std::fs::write(&seg, &bytes).map_err(|e| io_err(&seg, e))?;
        File::open(&seg).and_then(|f| f.sync_all()).map_err(|e| io_err(&seg, e))?;
        sync_dir(&tmp)?;
        std::fs::rename(&tmp, wal).map_err(|e| io_err(wal, e))?;
        if let Some(parent) = wal.parent().filter(|p| !p.as_os_str().is_empty()) {
            sync_dir(parent)?;
        }
        std::fs::remove_file(redb_path).map_err(|e| io_err(redb_path, e))?;
        tracing::info!(commands = cmds.len(), from, "state log moved from state.redb to state.wal segments");
        Ok(())
    }

    /// Open or create the segments in `dir`, with the snapshot and reserve files beside it
    /// (`<dir>.snap`, `<dir>.reserve`).
    pub fn open(dir: &Path, reserve_bytes: u64) -> Result<Self, LogError> {
        Self::open_with(dir, reserve_bytes, SEGMENT_BYTES)
    }

    fn open_with(dir: &Path, reserve_bytes: u64, segment_bytes: u64) -> Result<Self, LogError> {
        std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
        let snapshots = Arc::new(FileSnapshots::new(&dir.with_extension("snap")));
        let snap_index = snapshots.index()?.unwrap_or(0);
        let reserve_path = dir.with_extension("reserve");
        let reserve = match reserve_bytes {
            0 if !reserve_path.exists() => None,
            n => Reserve::open(&reserve_path, n)?,
        };
        let mut log = Self {
            dir: dir.to_path_buf(),
            segments: Vec::new(),
            file: None,
            tail_len: 0,
            allocated: 0,
            durable: snap_index,
            snapshots,
            reserve,
            compact_to: snap_index,
            appended: 0,
            segment_bytes,
        };
        log.reopen()?;
        log.drain_reserve(None)?;
        if reserve_bytes == 0 && log.reserve.take().is_some() {
            std::fs::remove_file(&reserve_path).map_err(|e| io_err(&reserve_path, e))?;
        }
        Ok(log)
    }

    /// Find the end of the log (cutting off a record that never completed), and open the tail
    /// segment for writes.
    fn reopen(&mut self) -> Result<(), LogError> {
        self.file = None;
        self.segments = list_segments(&self.dir)?;
        let snap_index = self.snapshots.index()?.unwrap_or(0);
        let Some(tail) = self.segments.last().cloned() else {
            self.durable = snap_index;
            return self.start_segment(snap_index + 1);
        };
        let bytes = std::fs::read(&tail.path).map_err(|e| io_err(&tail.path, e))?;
        let records = scan_records(&bytes, Some(tail.first))?;
        let end = records.last().map_or(0, |r| r.2);
        // An empty tail segment continues from where the one before it (or the snapshot) ends.
        self.durable = records.last().map_or(tail.first - 1, |r| r.0).max(snap_index);
        let file = OpenOptions::new().read(true).write(true).open(&tail.path).map_err(|e| io_err(&tail.path, e))?;
        if (end as u64) < bytes.len() as u64 && bytes[end..].iter().any(|b| *b != 0) {
            // Bytes of a write that did not complete: zero them, so no later scan reads them
            // as records after the ones that follow.
            tracing::info!(segment = %tail.path.display(), at = end, "cutting off an incomplete write at the end of the state log");
            file.set_len(end as u64).map_err(|e| io_err(&tail.path, e))?;
            file.sync_all().map_err(|e| io_err(&tail.path, e))?;
        }
        self.allocated = file.metadata().map_err(|e| io_err(&tail.path, e))?.len();
        self.tail_len = end as u64;
        self.file = Some(file);
        Ok(())
    }

    /// Create the segment whose first record will be `first` and make it the tail.
    fn start_segment(&mut self, first: u64) -> Result<(), LogError> {
        let path = self.dir.join(segment_name(first));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(|e| io_err(&path, e))?;
        sync_dir(&self.dir)?;
        self.segments.push(Segment { first, path });
        self.file = Some(file);
        self.tail_len = 0;
        self.allocated = 0;
        Ok(())
    }

    /// Zero-fill the tail segment so that `need` more bytes fit in blocks that exist.
    fn preallocate(&mut self, need: u64) -> Result<(), LogError> {
        if self.tail_len + need <= self.allocated {
            return Ok(());
        }
        let path = self.segments.last().map(|s| s.path.clone()).unwrap_or_default();
        let file = self.file.as_ref().ok_or_else(|| store_err("not open after an earlier failure"))?;
        let to = (self.tail_len + need).next_multiple_of(PREALLOC_STEP);
        let zeros = vec![0u8; (to - self.allocated) as usize];
        let result = file.write_all_at(&zeros, self.allocated).and_then(|()| file.sync_all());
        if let Err(e) = result {
            // Keep the file as it was: a half-extended tail is cut back at the next open.
            let _ = file.set_len(self.allocated);
            return Err(io_err(&path, e));
        }
        self.allocated = to;
        Ok(())
    }

    /// Drop every record from index `from` on (never acknowledged: see [`Log::recover`]).
    fn truncate_from(&mut self, from: u64) -> Result<(), LogError> {
        while self.segments.len() > 1 && self.segments.last().is_some_and(|s| s.first >= from) {
            let s = self.segments.pop().expect("checked");
            std::fs::remove_file(&s.path).map_err(|e| io_err(&s.path, e))?;
        }
        sync_dir(&self.dir)?;
        self.reopen()?;
        let tail = self.segments.last().cloned().expect("reopen leaves a tail segment");
        let bytes = std::fs::read(&tail.path).map_err(|e| io_err(&tail.path, e))?;
        let keep = scan_records(&bytes, Some(tail.first))?.into_iter().take_while(|r| r.0 < from).last();
        let end = keep.as_ref().map_or(0, |r| r.2) as u64;
        let file = self.file.as_ref().ok_or_else(|| store_err("not open"))?;
        file.set_len(end).map_err(|e| io_err(&tail.path, e))?;
        file.sync_all().map_err(|e| io_err(&tail.path, e))?;
        self.tail_len = end;
        self.allocated = end;
        self.durable = keep.map_or(tail.first - 1, |r| r.0).max(self.snapshots.index()?.unwrap_or(0));
        Ok(())
    }

    /// Move the reserved commands into the log, replacing whatever the log holds from the
    /// first reserved index on (see [`RedbLog`]'s `drain_reserve`), then empty the reserve.
    fn drain_reserve(&mut self, expect: Option<u64>) -> Result<(), LogError> {
        let Some((from, run)) = Reserve::pending(&mut self.reserve, expect)? else { return Ok(()) };
        if self.durable >= from {
            self.truncate_from(from)?;
        }
        if run.is_empty() {
            return Ok(());
        }
        let cmds: Vec<Command> = run.iter().map(|(_, c)| c.clone()).collect();
        self.write(from, &cmds)?;
        tracing::info!(commands = run.len(), "reserved commands moved into the state log");
        if let Some(r) = &mut self.reserve {
            r.clear()?;
        }
        Ok(())
    }

    /// Append records durably at the tail (a new segment first when the tail is full).
    fn write(&mut self, first: u64, cmds: &[Command]) -> Result<(), LogError> {
        if first != self.durable + 1 {
            return Err(store_err(format!("append at index {first}, but the log ends at {}", self.durable)));
        }
        if self.file.is_none() {
            return Err(store_err("not open after an earlier failure"));
        }
        if self.tail_len >= self.segment_bytes {
            // The closed segment ends at its last record (its zeros go).
            if let Some(f) = &self.file {
                let _ = f.set_len(self.tail_len);
            }
            self.start_segment(first)?;
        }
        let bytes = encode_records(first, cmds)?;
        let failed = |log: &mut Self, e: LogError| {
            // Nothing is appended after a write that failed: the tail may hold part of it.
            log.file = None;
            e
        };
        if let Err(e) = self.preallocate(bytes.len() as u64) {
            return Err(failed(self, e));
        }
        let path = self.segments.last().map(|s| s.path.clone()).unwrap_or_default();
        let file = self.file.as_ref().expect("checked");
        if let Err(e) = file.write_all_at(&bytes, self.tail_len).and_then(|()| file.sync_data()) {
            return Err(failed(self, io_err(&path, e)));
        }
        self.tail_len += bytes.len() as u64;
        self.durable = first + cmds.len() as u64 - 1;
        self.appended += bytes.len() as u64;
        Ok(())
    }

    /// Remove the segments a durable snapshot covers whole (never the tail).
    fn purge(&mut self) -> Result<(), LogError> {
        let mut removed = false;
        while self.segments.len() > 1 && self.segments[1].first <= self.compact_to + 1 {
            let s = self.segments.remove(0);
            std::fs::remove_file(&s.path).map_err(|e| io_err(&s.path, e))?;
            removed = true;
        }
        if removed {
            sync_dir(&self.dir)?;
        }
        Ok(())
    }
}

impl Log for WalLog {
    fn append(&mut self, first: u64, cmds: &[Command]) -> Result<(), LogError> {
        if cmds.is_empty() {
            return Ok(());
        }
        self.write(first, cmds)
    }

    fn load(&mut self) -> Result<(Option<State>, Vec<Command>), LogError> {
        let snap = self.snapshots.read()?;
        let from = snap.as_ref().map_or(1, |s| s.index + 1);
        let mut cmds = Vec::new();
        let mut next = from;
        let count = self.segments.len();
        for (i, seg) in self.segments.iter().enumerate() {
            // Segments a snapshot covers whole (left by a purge a crash interrupted).
            if self.segments.get(i + 1).is_some_and(|n| n.first <= from) {
                continue;
            }
            let bytes = std::fs::read(&seg.path).map_err(|e| io_err(&seg.path, e))?;
            let records = scan_records(&bytes, Some(seg.first))?;
            let end = records.last().map_or(0, |r| r.2);
            if i + 1 < count && bytes[end..].iter().any(|b| *b != 0) {
                return Err(LogError::Store(format!(
                    "{}: a record at byte {end} does not check out (the log continues in a later segment)",
                    seg.path.display()
                )));
            }
            for (index, cmd, _) in records {
                if index < next {
                    continue;
                }
                if index > next {
                    return Err(store_err(format!(
                        "the log jumps from index {} to {index} in {}: entries are missing",
                        next - 1,
                        seg.path.display()
                    )));
                }
                cmds.push(cmd);
                next += 1;
            }
        }
        Ok((snap, cmds))
    }

    fn snapshots(&self) -> Arc<dyn SnapshotWriter> {
        self.snapshots.clone()
    }

    fn compact(&mut self, index: u64) -> Result<(), LogError> {
        self.compact_to = self.compact_to.max(index);
        self.purge()
    }

    fn appended_bytes(&self) -> u64 {
        self.appended
    }

    fn append_reserved(&mut self, first: u64, cmds: &[Command]) -> Result<(), LogError> {
        Reserve::append_to(&mut self.reserve, first, cmds)
    }

    fn recover(&mut self, acknowledged: u64) -> Result<(), LogError> {
        Reserve::wait_for_room(&self.dir, &self.reserve)?;
        let acknowledged_len = self.tail_len;
        let acknowledged_durable = self.durable;
        self.reopen()?;
        // A write that reported failure may still have landed: it was never acknowledged.
        if self.durable > acknowledged_durable || self.tail_len > acknowledged_len {
            self.truncate_from(acknowledged_durable + 1)?;
        }
        self.drain_reserve(Some(self.durable + 1))?;
        // A real write and sync, so a store that still cannot write is not reported healthy.
        self.preallocate(PREALLOC_STEP)?;
        if self.durable != acknowledged {
            return Err(LogError::Diverged { durable: self.durable, acknowledged });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::{KvOp, KvValue, SetMode};

    fn set(i: u64, len: usize) -> Command {
        Command::Kv(KvOp::Set {
            key: format!("k{i}"),
            value: KvValue::from(vec![7u8; len]),
            flags: 0,
            mode: SetMode::Plain,
            now: i,
        })
    }

    fn replay(cmds: &[Command]) -> State {
        let mut s = State::new("dc1");
        for c in cmds {
            s.apply(c).unwrap();
        }
        s.rebuild_indexes();
        s
    }

    #[test]
    fn survives_reopen_and_replays_after_the_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let wal = dir.path().join(WAL_DIR);
        let cmds: Vec<Command> = (1..=20).map(|i| set(i, 10)).collect();
        {
            let mut store = Store::open(Box::new(WalLog::open(&wal, 0).unwrap()), "dc1").unwrap();
            for c in &cmds[..10] {
                store.propose(vec![c.clone()]).unwrap()[0].as_ref().unwrap();
            }
        }
        let mut log = WalLog::open(&wal, 0).unwrap();
        assert_eq!(log.load().unwrap().1, cmds[..10].to_vec());
        let state = replay(&cmds[..10]);
        log.snapshot(&state).unwrap();
        log.append(11, &cmds[10..]).unwrap();
        drop(log);
        let store = Store::open(Box::new(WalLog::open(&wal, 0).unwrap()), "dc1").unwrap();
        assert_eq!(store.state(), &replay(&cmds));
        let mut log = WalLog::open(&wal, 0).unwrap();
        let (snap, tail) = log.load().unwrap();
        assert_eq!(snap.map(|s| s.index), Some(10));
        assert_eq!(tail, cmds[10..].to_vec(), "only what follows the snapshot is replayed");
    }

    #[test]
    fn an_incomplete_write_at_the_end_is_cut_off_and_writes_go_on() {
        let dir = tempfile::tempdir().unwrap();
        let wal = dir.path().join(WAL_DIR);
        let cmds: Vec<Command> = (1..=5).map(|i| set(i, 10)).collect();
        {
            let mut log = WalLog::open(&wal, 0).unwrap();
            log.append(1, &cmds[..3]).unwrap();
        }
        // A crash in the middle of the next write: half of its record reached the disk.
        let seg = wal.join(segment_name(1));
        let good = scan_records(&std::fs::read(&seg).unwrap(), Some(1)).unwrap().last().unwrap().2;
        let torn = encode_records(4, &cmds[3..4]).unwrap();
        let f = OpenOptions::new().write(true).open(&seg).unwrap();
        f.write_all_at(&torn[..torn.len() / 2], good as u64).unwrap();
        drop(f);
        let mut log = WalLog::open(&wal, 0).unwrap();
        assert_eq!(log.load().unwrap().1, cmds[..3].to_vec());
        assert_eq!(std::fs::metadata(&seg).unwrap().len(), good as u64, "the torn bytes are gone");
        log.append(4, &cmds[3..]).unwrap();
        assert!(log.append(9, &cmds[..1]).is_err(), "appends follow the log's end");
        drop(log);
        assert_eq!(WalLog::open(&wal, 0).unwrap().load().unwrap().1, cmds);
    }

    #[test]
    fn segments_roll_and_snapshots_drop_the_ones_they_cover() {
        let dir = tempfile::tempdir().unwrap();
        let wal = dir.path().join(WAL_DIR);
        let mut store = Store::open(Box::new(WalLog::open_with(&wal, 0, 1024).unwrap()), "dc1").unwrap();
        store.set_snapshot_policy(SnapshotPolicy { every: 100, ratio: 1, max_log_bytes: u64::MAX });
        let cmds: Vec<Command> = (1..=250).map(|i| set(i % 40, 100)).collect();
        let mut most = 0;
        for c in &cmds {
            store.propose(vec![c.clone()]).unwrap()[0].as_ref().unwrap();
            store.wait_snapshot();
            most = most.max(list_segments(&wal).unwrap().len());
        }
        let state = store.state().clone();
        drop(store);
        let segs = list_segments(&wal).unwrap();
        assert!(most > 10, "1 KiB segments rolled: {most}");
        assert!(segs.len() < most, "covered segments were removed: {} left, {most} at most", segs.len());
        assert!(
            segs[0].first > 190,
            "the oldest left holds the last snapshot's index (200) or later: {}",
            segs[0].first
        );
        let reopened = Store::open(Box::new(WalLog::open_with(&wal, 0, 1024).unwrap()), "dc1").unwrap();
        assert_eq!(reopened.state(), &state);
        assert_eq!(reopened.state(), &replay(&cmds));
    }

    #[test]
    fn a_bad_record_inside_the_log_is_an_error_not_a_shorter_state() {
        let dir = tempfile::tempdir().unwrap();
        let wal = dir.path().join(WAL_DIR);
        {
            let mut log = WalLog::open_with(&wal, 0, 512).unwrap();
            for i in 1..=10 {
                log.append(i, &[set(i, 100)]).unwrap();
            }
        }
        let first = list_segments(&wal).unwrap()[0].path.clone();
        let mut bytes = std::fs::read(&first).unwrap();
        bytes[20] ^= 1;
        std::fs::write(&first, bytes).unwrap();
        let e = WalLog::open_with(&wal, 0, 512).unwrap().load().unwrap_err();
        assert!(e.to_string().contains("does not check out"), "{e}");
    }

    #[test]
    fn reserved_commands_replace_unacknowledged_entries_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let wal = dir.path().join(WAL_DIR);
        let reset = |a: &str| Command::ResetDelay { id: AppId::parse(a).unwrap() };
        {
            let mut log = WalLog::open(&wal, DEFAULT_RESERVE_BYTES).unwrap();
            log.append(1, &[set(1, 1), set(2, 1)]).unwrap();
            // A write that reported failure but landed (never acknowledged) ...
            log.append(3, &[reset("/a"), reset("/a")]).unwrap();
            // ... then the acknowledged commands at those indexes went to the reserve; a crash.
            log.append_reserved(3, &[reset("/b")]).unwrap();
        }
        let mut log = WalLog::open(&wal, DEFAULT_RESERVE_BYTES).unwrap();
        assert_eq!(log.load().unwrap().1, vec![set(1, 1), set(2, 1), reset("/b")]);
        log.append(4, &[reset("/a")]).unwrap();
        log.append_reserved(5, &[reset("/b")]).unwrap();
        drop(log);
        // Reserved commands are not lost when the next run wants no reserve.
        let mut log = WalLog::open(&wal, 0).unwrap();
        assert_eq!(log.load().unwrap().1, vec![set(1, 1), set(2, 1), reset("/b"), reset("/a"), reset("/b")]);
        assert!(!wal.with_extension("reserve").exists());
        assert!(log.append_reserved(6, &[reset("/a")]).is_err(), "no reserve");
    }

    /// A real full disk: the log on a small tmpfs, filled up, then freed. Needs root (mount);
    /// skipped without it (the full test run requires it: MESH_REQUIRE_TMPFS).
    #[test]
    fn recovers_after_enospc_without_losing_acknowledged_commands() {
        let dir = tempfile::tempdir().unwrap();
        let mnt = dir.path().join("fs");
        let Some(_guard) = crate::state::tests::small_tmpfs(&mnt) else { return };
        let wal = mnt.join(WAL_DIR);
        let mut store = Store::open(Box::new(WalLog::open(&wal, DEFAULT_RESERVE_BYTES).unwrap()), "dc1").unwrap();
        store.propose(vec![set(0, 10)]).unwrap();
        let filler = mnt.join("filler");
        {
            use std::io::Write;
            let mut f = File::create(&filler).unwrap();
            let chunk = vec![1u8; 64 * 1024];
            while f.write_all(&chunk).is_ok() {}
            while f.write_all(&[1u8; 512]).is_ok() {}
        }
        let mut refused = None;
        for i in 1..100_000u64 {
            if let Err(e) = store.propose(vec![set(i, 16 * 1024)]) {
                refused = Some(e);
                break;
            }
        }
        let e = refused.expect("the full disk refuses a write");
        assert!(e.to_string().contains("No space left"), "{e}");
        let acked = store.state().clone();
        // Stopping work goes to the reserve; the rest is refused and changes nothing.
        let del =
            Command::DeleteApp { id: AppId::parse("/a").unwrap(), now: 1, deployment_id: "x".into(), force: true };
        assert!(store.propose(vec![set(1, 10)]).is_err());
        assert_eq!(store.state(), &acked);
        store.propose(vec![del]).unwrap();
        assert!(store.recover().is_err(), "no recovery while the disk is full");
        std::fs::remove_file(&filler).unwrap();
        store.recover().unwrap();
        store.propose(vec![set(999_999, 10)]).unwrap()[0].as_ref().unwrap();
        let state = store.state().clone();
        drop(store);
        let reopened = Store::open(Box::new(WalLog::open(&wal, DEFAULT_RESERVE_BYTES).unwrap()), "dc1").unwrap();
        assert_eq!(reopened.state(), &state, "acknowledged commands survive, in order");
    }

    #[test]
    fn a_redb_data_dir_moves_to_segments_with_its_snapshot_and_reserve() {
        let dir = tempfile::tempdir().unwrap();
        let redb_path = dir.path().join("state.redb");
        let cmds: Vec<Command> = (1..=30).map(|i| set(i % 7, 10)).collect();
        {
            let mut old = RedbLog::open(&redb_path).unwrap();
            old.append(1, &cmds[..20]).unwrap();
            old.snapshot(&replay(&cmds[..12])).unwrap();
            old.append(21, &cmds[20..29]).unwrap();
            old.append_reserved(30, &cmds[29..]).unwrap();
        }
        let store =
            Store::open(Box::new(WalLog::open_data_dir(dir.path(), DEFAULT_RESERVE_BYTES).unwrap()), "dc1").unwrap();
        assert_eq!(store.state(), &replay(&cmds));
        drop(store);
        assert!(!redb_path.exists(), "the database is gone once its log is in segments");
        assert!(dir.path().join(WAL_DIR).is_dir());
        let mut log = WalLog::open_data_dir(dir.path(), DEFAULT_RESERVE_BYTES).unwrap();
        let (snap, tail) = log.load().unwrap();
        assert_eq!(snap.map(|s| s.index), Some(12));
        assert_eq!(tail, cmds[12..].to_vec());
        log.append(31, &[set(1, 1)]).unwrap();
    }
}
