//! The openraft storage of mesh (`mesh_server::raft`): openraft's conformance suite on a fresh
//! redb store per case, and durability of vote, committed id, entries and snapshot across a
//! reopen.

use mesh_core::kv::{KvError, KvOp, KvValue, SetMode};
use mesh_core::state::{ApplyError, Command};
use mesh_server::raft::TypeConfig;
use mesh_server::raft::{
    ApplyOutcome, Batch, Entry, LogId, MeshNode, MeshStateMachine, RaftStorageError, RedbLogStore,
};
use openraft::storage::{RaftLogStorage, RaftLogStorageExt, RaftStateMachine};
use openraft::testing::{StoreBuilder, Suite};
use openraft::{CommittedLeaderId, EntryPayload, Membership, RaftLogReader, RaftSnapshotBuilder, Vote};
use std::collections::{BTreeMap, BTreeSet};
use tempfile::TempDir;

/// A fresh log store and state machine in a new temporary directory (the guard keeps it alive).
struct Builder;

impl StoreBuilder<TypeConfig, RedbLogStore, MeshStateMachine, TempDir> for Builder {
    async fn build(&self) -> Result<(TempDir, RedbLogStore, MeshStateMachine), RaftStorageError> {
        let dir = tempfile::tempdir().expect("temp dir");
        let log = RedbLogStore::open(dir.path())?;
        let sm = MeshStateMachine::open(dir.path(), "dc1")?;
        Ok((dir, log, sm))
    }
}

#[test]
fn openraft_storage_suite() {
    Suite::test_all(Builder).expect("openraft storage suite");
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
        let mut log = RedbLogStore::open(dir.path()).unwrap();
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

    let mut log = RedbLogStore::open(dir.path()).unwrap();
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
    let mut log = RedbLogStore::open(dir.path()).unwrap();
    rt.block_on(async {
        assert_eq!(log.get_log_state().await.unwrap().last_log_id, Some(log_id(1, 4)));
        assert_eq!(log.try_get_log_entries(..).await.unwrap(), entries[2..4].to_vec());
    });
}
