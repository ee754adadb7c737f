//! The Raft log on redb: entries by index in one table, the vote, the committed log id and the
//! last purged log id in a meta table. Every write is committed with
//! [`Durability::Immediate`] before it is acknowledged, and all redb work runs on tokio's
//! blocking pool (`blocking` in the parent module).

use super::{Entry, LogId, NodeId, RaftStorageError, TypeConfig, blocking, storage_err};
use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{ErrorSubject, ErrorVerb, OptionalSend, RaftLogReader, Vote};
use redb::{Durability, ReadableDatabase, ReadableTable, TableDefinition};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Log entries: index → entry (MessagePack, structs as maps).
const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_log");
/// `vote`, `committed`, `last_purged` → JSON.
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_meta");

const VOTE: &str = "vote";
const COMMITTED: &str = "committed";
const LAST_PURGED: &str = "last_purged";

/// The file of the log inside the store's directory.
pub const LOG_FILE: &str = "raft-log.redb";

/// The Raft log of one node on a redb database. Cloning shares the database: a clone is the
/// [`RaftLogReader`] handed to replication tasks (redb serves reads concurrently with the one
/// writer).
#[derive(Clone)]
pub struct RedbLogStore {
    db: Arc<redb::Database>,
    path: PathBuf,
}

impl Debug for RedbLogStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedbLogStore").field("path", &self.path).finish()
    }
}

fn encode_entry(e: &Entry) -> Result<Vec<u8>, RaftStorageError> {
    rmp_serde::to_vec_named(e).map_err(|err| storage_err(ErrorSubject::Log(e.log_id), ErrorVerb::Write, err))
}

fn decode_entry(index: u64, bytes: &[u8]) -> Result<Entry, RaftStorageError> {
    rmp_serde::from_slice(bytes).map_err(|e| storage_err(ErrorSubject::LogIndex(index), ErrorVerb::Read, e))
}

impl RedbLogStore {
    /// Open or create the log in `dir` (file [`LOG_FILE`]; the directory is created if needed).
    pub fn open(dir: &Path) -> Result<Self, RaftStorageError> {
        let err = |e: &dyn std::fmt::Display| storage_err(ErrorSubject::Store, ErrorVerb::Write, e);
        std::fs::create_dir_all(dir).map_err(|e| err(&format!("{}: {e}", dir.display())))?;
        let path = dir.join(LOG_FILE);
        let db = redb::Database::create(&path).map_err(|e| err(&format!("{}: {e}", path.display())))?;
        let mut tx = db.begin_write().map_err(|e| err(&e))?;
        tx.set_durability(Durability::Immediate).map_err(|e| err(&e))?;
        tx.open_table(LOG).map_err(|e| err(&e))?;
        tx.open_table(META).map_err(|e| err(&e))?;
        tx.commit().map_err(|e| err(&e))?;
        Ok(Self { db: Arc::new(db), path })
    }

    /// The path of the database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Run `f` in one write transaction on the blocking pool and commit it durably.
    async fn write<F>(&self, subject: ErrorSubject<NodeId>, f: F) -> Result<(), RaftStorageError>
    where
        F: FnOnce(&redb::WriteTransaction) -> Result<(), RaftStorageError> + Send + 'static,
    {
        self.write_with(Durability::Immediate, subject, f).await
    }

    /// Run `f` in one write transaction on the blocking pool and commit it with `durability`.
    async fn write_with<F>(
        &self,
        durability: Durability,
        subject: ErrorSubject<NodeId>,
        f: F,
    ) -> Result<(), RaftStorageError>
    where
        F: FnOnce(&redb::WriteTransaction) -> Result<(), RaftStorageError> + Send + 'static,
    {
        let db = self.db.clone();
        let sub = subject.clone();
        blocking(subject, ErrorVerb::Write, move || {
            let err = |e: &dyn std::fmt::Display| storage_err(sub.clone(), ErrorVerb::Write, e);
            let mut tx = db.begin_write().map_err(|e| err(&e))?;
            tx.set_durability(durability).map_err(|e| err(&e))?;
            f(&tx)?;
            tx.commit().map_err(|e| err(&e))
        })
        .await
    }

    /// Read the meta value `key` (blocking).
    fn get_meta_blocking<T: DeserializeOwned>(
        db: &redb::Database,
        key: &str,
        subject: ErrorSubject<NodeId>,
    ) -> Result<Option<T>, RaftStorageError> {
        let err = |e: &dyn std::fmt::Display| storage_err(subject.clone(), ErrorVerb::Read, e);
        let tx = db.begin_read().map_err(|e| err(&e))?;
        let meta = tx.open_table(META).map_err(|e| err(&e))?;
        match meta.get(key).map_err(|e| err(&e))? {
            Some(v) => serde_json::from_slice(v.value()).map(Some).map_err(|e| err(&e)),
            None => Ok(None),
        }
    }

    async fn get_meta<T: DeserializeOwned + Send + 'static>(
        &self,
        key: &'static str,
        subject: ErrorSubject<NodeId>,
    ) -> Result<Option<T>, RaftStorageError> {
        let db = self.db.clone();
        let sub = subject.clone();
        blocking(subject, ErrorVerb::Read, move || Self::get_meta_blocking(&db, key, sub)).await
    }

    async fn put_meta<T: Serialize>(
        &self,
        key: &'static str,
        value: &T,
        subject: ErrorSubject<NodeId>,
        durability: Durability,
    ) -> Result<(), RaftStorageError> {
        let bytes = serde_json::to_vec(value).map_err(|e| storage_err(subject.clone(), ErrorVerb::Write, e))?;
        let sub = subject.clone();
        self.write_with(durability, subject, move |tx| {
            let mut meta = tx.open_table(META).map_err(|e| storage_err(sub.clone(), ErrorVerb::Write, e))?;
            meta.insert(key, bytes.as_slice()).map_err(|e| storage_err(sub, ErrorVerb::Write, e))?;
            Ok(())
        })
        .await
    }
}

impl RaftLogReader<TypeConfig> for RedbLogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, RaftStorageError> {
        let bounds: (Bound<u64>, Bound<u64>) = (range.start_bound().cloned(), range.end_bound().cloned());
        let db = self.db.clone();
        blocking(ErrorSubject::Logs, ErrorVerb::Read, move || {
            let err = |e: &dyn std::fmt::Display| storage_err(ErrorSubject::Logs, ErrorVerb::Read, e);
            let tx = db.begin_read().map_err(|e| err(&e))?;
            let log = tx.open_table(LOG).map_err(|e| err(&e))?;
            let mut out = Vec::new();
            for item in log.range::<u64>(bounds).map_err(|e| err(&e))? {
                let (k, v) = item.map_err(|e| err(&e))?;
                out.push(decode_entry(k.value(), v.value())?);
            }
            Ok(out)
        })
        .await
    }
}

impl RaftLogStorage<TypeConfig> for RedbLogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, RaftStorageError> {
        let db = self.db.clone();
        blocking(ErrorSubject::Logs, ErrorVerb::Read, move || {
            let err = |e: &dyn std::fmt::Display| storage_err(ErrorSubject::Logs, ErrorVerb::Read, e);
            let last_purged_log_id: Option<LogId> = Self::get_meta_blocking(&db, LAST_PURGED, ErrorSubject::Logs)?;
            let tx = db.begin_read().map_err(|e| err(&e))?;
            let log = tx.open_table(LOG).map_err(|e| err(&e))?;
            let last = match log.last().map_err(|e| err(&e))? {
                Some((k, v)) => Some(decode_entry(k.value(), v.value())?.log_id),
                None => None,
            };
            Ok(LogState { last_purged_log_id, last_log_id: last.or(last_purged_log_id) })
        })
        .await
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), RaftStorageError> {
        self.put_meta(VOTE, vote, ErrorSubject::Vote, Durability::Immediate).await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, RaftStorageError> {
        self.get_meta(VOTE, ErrorSubject::Vote).await
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), RaftStorageError> {
        // openraft does not need the committed id durable (a restart may find an older one and
        // learns the rest from the log and the leader): written without a sync of its own, it
        // becomes durable with the next log append, so a write costs one fsync, not two.
        self.put_meta(COMMITTED, &committed, ErrorSubject::Store, Durability::None).await
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, RaftStorageError> {
        Ok(self.get_meta::<Option<LogId>>(COMMITTED, ErrorSubject::Store).await?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), RaftStorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let rows = entries
            .into_iter()
            .map(|e| Ok((e.log_id.index, encode_entry(&e)?)))
            .collect::<Result<Vec<_>, RaftStorageError>>()?;
        let res = self
            .write(ErrorSubject::Logs, move |tx| {
                let err = |e: &dyn std::fmt::Display| storage_err(ErrorSubject::Logs, ErrorVerb::Write, e);
                let mut log = tx.open_table(LOG).map_err(|e| err(&e))?;
                for (index, bytes) in &rows {
                    log.insert(*index, bytes.as_slice()).map_err(|e| err(&e))?;
                }
                Ok(())
            })
            .await;
        // Committed durably (or failed): only now may openraft count these entries as persisted.
        match &res {
            Ok(()) => callback.log_io_completed(Ok(())),
            Err(e) => callback.log_io_completed(Err(std::io::Error::other(e.to_string()))),
        }
        res
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), RaftStorageError> {
        // Entries from `log_id.index` on, inclusive: dropping the tail leaves no hole.
        self.write(ErrorSubject::Log(log_id), move |tx| {
            let err = |e: &dyn std::fmt::Display| storage_err(ErrorSubject::Log(log_id), ErrorVerb::Delete, e);
            let mut log = tx.open_table(LOG).map_err(|e| err(&e))?;
            log.retain_in(log_id.index.., |_, _| false).map_err(|e| err(&e))?;
            Ok(())
        })
        .await
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), RaftStorageError> {
        // Entries up to `log_id.index`, inclusive, and the new last purged id in one transaction.
        let purged =
            serde_json::to_vec(&log_id).map_err(|e| storage_err(ErrorSubject::Log(log_id), ErrorVerb::Delete, e))?;
        self.write(ErrorSubject::Log(log_id), move |tx| {
            let err = |e: &dyn std::fmt::Display| storage_err(ErrorSubject::Log(log_id), ErrorVerb::Delete, e);
            let mut meta = tx.open_table(META).map_err(|e| err(&e))?;
            meta.insert(LAST_PURGED, purged.as_slice()).map_err(|e| err(&e))?;
            let mut log = tx.open_table(LOG).map_err(|e| err(&e))?;
            log.retain_in(..=log_id.index, |_, _| false).map_err(|e| err(&e))?;
            Ok(())
        })
        .await
    }
}
