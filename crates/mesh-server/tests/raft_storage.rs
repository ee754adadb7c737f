//! The openraft storage of mesh (`mesh_server::raft`): openraft's conformance suite on a fresh
//! segment-file store per case, and durability of vote, committed id, entries and snapshot across a
//! reopen.

use mesh_core::kv::{KvError, KvOp, KvValue, SetMode};
use mesh_core::state::{ApplyError, Command};
use mesh_server::raft::TypeConfig;
use mesh_server::raft::{
    ApplyOutcome, Batch, Entry, LogId, MeshNode, MeshStateMachine, RaftStorageError, SegmentLogStore,
};
use openraft::storage::{RaftLogStorage, RaftLogStorageExt, RaftStateMachine};
use openraft::testing::{StoreBuilder, Suite};
use openraft::{CommittedLeaderId, EntryPayload, Membership, RaftLogReader, RaftSnapshotBuilder, Vote};
use std::collections::{BTreeMap, BTreeSet};
use tempfile::TempDir;

/// A fresh log store and state machine in a new temporary directory (the guard keeps it alive).
struct Builder;

impl StoreBuilder<TypeConfig, SegmentLogStore, MeshStateMachine, TempDir> for Builder {
    async fn build(&self) -> Result<(TempDir, SegmentLogStore, MeshStateMachine), RaftStorageError> {
        let dir = tempfile::tempdir().expect("temp dir");
        let log = SegmentLogStore::open(dir.path())?;
        let sm = MeshStateMachine::open(dir.path(), "dc1")?;
        Ok((dir, log, sm))
    }
}

#[test]
fn openraft_storage_suite() {
    Suite::test_all(Builder).expect("openraft storage suite");
}

/// The same suite with the storage's disk work inline on the caller, as in the deterministic
/// simulation (no log writer thread, no blocking pool): the suite runs its futures on this
/// thread.
#[test]
fn openraft_storage_suite_inline_as_in_a_simulation() {
    mesh_server::raft::runtime::simulate_on_this_thread(1);
    Suite::test_all(Builder).expect("openraft storage suite, inline");
}

fn log_id(term: u64, index: u64) -> LogId {
    LogId::new(CommittedLeaderId::new(term, 1), index)
}

fn entry(term: u64, index: u64, payload: EntryPayload<TypeConfig>) -> Entry {
    Entry { log_id: log_id(term, index), payload }
}

fn put(key: &str, value: &str) -> Batch {
    Batch::from(Command::Kv(KvOp::Set {
        key: key.into(),
        value: KvValue::from(value.as_bytes()),
        flags: 0,
        mode: SetMode::Plain,
        now: 1_000,
    }))
}

#[test]
fn vote_committed_entries_and_state_survive_a_reopen() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let node = MeshNode { name: "n1".into(), rpc: "127.0.0.1:7100".into() };
    let membership = Membership::new(vec![BTreeSet::from([1])], BTreeMap::from([(1, node)]));
    let entries = vec![
        entry(1, 1, EntryPayload::Blank),
        entry(1, 2, EntryPayload::Membership(membership.clone())),
        entry(1, 3, EntryPayload::Normal(put("a", "1"))),
        entry(1, 4, EntryPayload::Normal(put("b", "2"))),
        // Only if `a` does not exist: rejected, the state is unchanged.
        entry(
            2,
            5,
            EntryPayload::Normal(Batch::from(Command::Kv(KvOp::Set {
                key: "a".into(),
                value: KvValue::from(&b"x"[..]),
                flags: 0,
                mode: SetMode::Cas(0),
                now: 1_000,
            }))),
        ),
        entry(2, 6, EntryPayload::Normal(put("a", "3"))),
    ];
    let vote = Vote::new_committed(2, 1);

    let state = rt.block_on(async {
        let mut log = SegmentLogStore::open(dir.path()).unwrap();
        let mut sm = MeshStateMachine::open(dir.path(), "dc1").unwrap();
        log.save_vote(&vote).await.unwrap();
        log.blocking_append(entries.clone()).await.unwrap();
        log.save_committed(Some(log_id(2, 6))).await.unwrap();

        let outcomes = sm.apply(entries.clone()).await.unwrap();
        let no_commands = ApplyOutcome { index: 0, results: vec![] };
        assert_eq!(outcomes[0], no_commands);
        assert_eq!(outcomes[1], no_commands);
        assert_eq!(outcomes[2], ApplyOutcome { index: 1, results: vec![Ok(())] });
        assert_eq!(outcomes[3], ApplyOutcome { index: 2, results: vec![Ok(())] });
        assert_eq!(outcomes[4], ApplyOutcome { index: 2, results: vec![Err(ApplyError::Kv(KvError::NotApplied))] });
        assert_eq!(outcomes[5], ApplyOutcome { index: 3, results: vec![Ok(())] });
        // The proposer can hand the exact error on (responses travel between nodes).
        let wire = rmp_serde::to_vec_named(&outcomes[4]).unwrap();
        assert_eq!(rmp_serde::from_slice::<ApplyOutcome>(&wire).unwrap(), outcomes[4]);
        assert_eq!(sm.state().kv.get("a").unwrap().value.as_bytes(), b"3");

        // A snapshot, then the log up to it purged: the state comes back from the file.
        let snap = sm.get_snapshot_builder().await.build_snapshot().await.unwrap();
        assert_eq!(snap.meta.last_log_id, Some(log_id(2, 6)));
        log.purge(log_id(1, 2)).await.unwrap();
        sm.state().clone()
    });

    let mut log = SegmentLogStore::open(dir.path()).unwrap();
    let mut sm = MeshStateMachine::open(dir.path(), "dc1").unwrap();
    rt.block_on(async {
        assert_eq!(log.read_vote().await.unwrap(), Some(vote));
        assert_eq!(log.read_committed().await.unwrap(), Some(log_id(2, 6)));
        let ls = log.get_log_state().await.unwrap();
        assert_eq!(ls.last_purged_log_id, Some(log_id(1, 2)));
        assert_eq!(ls.last_log_id, Some(log_id(2, 6)));
        assert_eq!(log.try_get_log_entries(..).await.unwrap(), entries[2..].to_vec());

        let (applied, mem) = sm.applied_state().await.unwrap();
        assert_eq!(applied, Some(log_id(2, 6)));
        assert_eq!(mem.log_id(), &Some(log_id(1, 2)));
        assert_eq!(mem.membership(), &membership);
        assert_eq!(sm.state(), &state);
        assert_eq!(sm.state().kv.get("b").unwrap().value.as_bytes(), b"2");
        let current = sm.get_current_snapshot().await.unwrap().expect("snapshot after reopen");
        assert_eq!(current.meta.last_log_id, Some(log_id(2, 6)));

        // A truncated tail stays truncated.
        log.truncate(log_id(2, 5)).await.unwrap();
    });
    drop((log, sm));
    let mut log = SegmentLogStore::open(dir.path()).unwrap();
    rt.block_on(async {
        assert_eq!(log.get_log_state().await.unwrap().last_log_id, Some(log_id(1, 4)));
        assert_eq!(log.try_get_log_entries(..).await.unwrap(), entries[2..4].to_vec());
    });
}

/// The segment files of a store in `dir`, oldest first.
fn segments(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out: Vec<_> = std::fs::read_dir(dir.join(mesh_server::raft::seg_store::LOG_DIR))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .collect();
    out.sort();
    out
}

/// Where the records of a segment end (frames `[len u32][crc u32][body]` up to a zero length).
fn records_end(bytes: &[u8]) -> usize {
    let mut at = 0;
    while at + 8 <= bytes.len() {
        let len = u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
        if len == 0 {
            break;
        }
        at += 8 + len;
    }
    at
}

#[test]
fn an_unfinished_write_at_the_tail_is_cut_off_and_the_log_goes_on() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let entries: Vec<Entry> = (1..=4).map(|i| entry(1, i, EntryPayload::Normal(put(&format!("k{i}"), "v")))).collect();
    let vote = Vote::new_committed(1, 1);
    rt.block_on(async {
        let mut log = SegmentLogStore::open(dir.path()).unwrap();
        log.save_vote(&vote).await.unwrap();
        log.blocking_append(entries[..3].to_vec()).await.unwrap();
    });
    // A crash in the middle of the next write: a frame header and part of its body.
    let tail = segments(dir.path()).pop().unwrap();
    let mut bytes = std::fs::read(&tail).unwrap();
    let end = records_end(&bytes);
    assert!(end > 0 && bytes[end..].iter().all(|b| *b == 0), "records, then the zero-filled rest");
    bytes[end..end + 4].copy_from_slice(&200u32.to_le_bytes());
    bytes[end + 4..end + 8].copy_from_slice(&7u32.to_le_bytes());
    bytes[end + 8..end + 40].fill(0xab);
    std::fs::write(&tail, &bytes).unwrap();

    rt.block_on(async {
        let mut log = SegmentLogStore::open(dir.path()).unwrap();
        assert_eq!(log.read_vote().await.unwrap(), Some(vote));
        assert_eq!(log.try_get_log_entries(..).await.unwrap(), entries[..3].to_vec());
        assert_eq!(std::fs::metadata(&tail).unwrap().len(), end as u64, "the unfinished write is cut off");
        log.blocking_append(entries[3..].to_vec()).await.unwrap();
    });
    rt.block_on(async {
        let mut log = SegmentLogStore::open(dir.path()).unwrap();
        assert_eq!(log.try_get_log_entries(..).await.unwrap(), entries);
        assert_eq!(log.get_log_state().await.unwrap().last_log_id, Some(log_id(1, 4)));
    });
}

#[test]
fn segments_close_and_a_purge_deletes_the_ones_it_covers() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let vote = Vote::new_committed(3, 1);
    let entries: Vec<Entry> =
        (1..=300).map(|i| entry(3, i, EntryPayload::Normal(put(&format!("key-{i}"), &"x".repeat(40))))).collect();
    rt.block_on(async {
        let mut log = SegmentLogStore::open_with(dir.path(), 4096).unwrap();
        log.save_vote(&vote).await.unwrap();
        for e in &entries {
            log.blocking_append(vec![e.clone()]).await.unwrap();
        }
        log.save_committed(Some(log_id(3, 300))).await.unwrap();
        let before = segments(dir.path());
        assert!(before.len() >= 5, "4 KiB segments: {} of them", before.len());
        log.purge(log_id(3, 250)).await.unwrap();
        let after = segments(dir.path());
        assert!(after.len() < before.len() && !after.is_empty(), "{} segments, then {}", before.len(), after.len());
        // The first segment left holds entries past the purge (or is the tail).
        assert_eq!(after.last(), before.last());
        assert_eq!(log.try_get_log_entries(..).await.unwrap(), entries[250..].to_vec());
    });
    rt.block_on(async {
        // The vote was written in the first segment, which is gone: the later ones carry it.
        let mut log = SegmentLogStore::open_with(dir.path(), 4096).unwrap();
        assert_eq!(log.read_vote().await.unwrap(), Some(vote));
        let state = log.get_log_state().await.unwrap();
        assert_eq!(state.last_purged_log_id, Some(log_id(3, 250)));
        assert_eq!(state.last_log_id, Some(log_id(3, 300)));
        assert_eq!(log.try_get_log_entries(..).await.unwrap(), entries[250..].to_vec());
        // Cut at 280 (a new leader's log disagrees), then go on from there.
        log.truncate(log_id(3, 281)).await.unwrap();
        log.blocking_append(vec![entry(4, 281, EntryPayload::Blank)]).await.unwrap();
    });
    let mut log = SegmentLogStore::open_with(dir.path(), 4096).unwrap();
    rt.block_on(async {
        let got = log.try_get_log_entries(..).await.unwrap();
        assert_eq!(got.len(), 31);
        assert_eq!(got.last().unwrap().log_id, log_id(4, 281));
        assert_eq!(got[..30], entries[250..280]);
    });
}

#[test]
fn a_redb_log_of_an_earlier_release_is_imported() {
    use redb::TableDefinition;
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let entries: Vec<Entry> = (5..=8).map(|i| entry(2, i, EntryPayload::Normal(put(&format!("k{i}"), "v")))).collect();
    let vote = Vote::new_committed(2, 1);
    {
        // The layout of the redb log store this replaces.
        const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_log");
        const META: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_meta");
        let db = redb::Database::create(dir.path().join(mesh_server::raft::seg_store::REDB_FILE)).unwrap();
        let tx = db.begin_write().unwrap();
        {
            let mut log = tx.open_table(LOG).unwrap();
            for e in &entries {
                log.insert(e.log_id.index, rmp_serde::to_vec_named(e).unwrap().as_slice()).unwrap();
            }
            let mut meta = tx.open_table(META).unwrap();
            meta.insert("vote", serde_json::to_vec(&vote).unwrap().as_slice()).unwrap();
            meta.insert("committed", serde_json::to_vec(&Some(log_id(2, 7))).unwrap().as_slice()).unwrap();
            meta.insert("last_purged", serde_json::to_vec(&log_id(1, 4)).unwrap().as_slice()).unwrap();
        }
        tx.commit().unwrap();
    }
    for _ in 0..2 {
        // Imported at the first open; the second finds the same in the segments.
        let mut log = SegmentLogStore::open(dir.path()).unwrap();
        rt.block_on(async {
            assert_eq!(log.read_vote().await.unwrap(), Some(vote));
            assert_eq!(log.read_committed().await.unwrap(), Some(log_id(2, 7)));
            let state = log.get_log_state().await.unwrap();
            assert_eq!(state.last_purged_log_id, Some(log_id(1, 4)));
            assert_eq!(state.last_log_id, Some(log_id(2, 8)));
            assert_eq!(log.try_get_log_entries(..).await.unwrap(), entries);
        });
        assert!(!dir.path().join("raft-log.redb").exists());
        assert!(dir.path().join("raft-log.redb.pre-seg").exists());
    }
}
