//! The leader's [`Log`]: a [`Store`](mesh_core::state::Store) whose appends are Raft writes.
//!
//! The control loop keeps its shape: it validates a batch by applying it to a copy of the
//! state (the store does), and what applied is appended here as one [`Batch`] entry. The append
//! returns once a quorum has the entry and this server's state machine applied it; the state
//! machine reached the same state from the same commands, which [`RaftLog::append`] checks.
//!
//! Any failure (leadership lost, no quorum in time, a different outcome) poisons the log: the
//! store refuses every later write and the server drops this control loop and starts a fresh
//! one from the state machine once it leads again with everything applied (an entry whose
//! append timed out may still commit; the fresh loop sees it in the state).

use super::disk::DiskGuard;
use super::{Batch, TypeConfig};
use mesh_core::state::{Command, Log, LogError, LogFuture, SnapshotWriter, State};
use openraft::Raft;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// A [`Log`] that writes through Raft (leader only).
pub struct RaftLog {
    raft: Raft<TypeConfig>,
    /// The state to start from (the state machine's, when this leader's loop began).
    start: Option<State>,
    /// How long an append may wait for a quorum.
    timeout: Duration,
    /// Set (with the reason) on the first failure: the owner restarts the control loop.
    poisoned: watch::Sender<Option<String>>,
    /// Room on the disk: a write is refused (not attempted) when there is none.
    disk: Option<Arc<DiskGuard>>,
}

/// Snapshots are Raft's (the state machine builds them): nothing to write here.
struct RaftSnapshots;

impl SnapshotWriter for RaftSnapshots {
    fn write(&self, _state: &State) -> Result<u64, LogError> {
        Ok(0)
    }
}

impl RaftLog {
    /// A log over `raft` starting at `state` (the state machine's, fully applied); appends give
    /// up after `timeout`. The receiver says when (and why) the log was poisoned.
    pub fn new(raft: Raft<TypeConfig>, state: State, timeout: Duration) -> (RaftLog, watch::Receiver<Option<String>>) {
        let (poisoned, rx) = watch::channel(None);
        (RaftLog { raft, start: Some(state), timeout, poisoned, disk: None }, rx)
    }

    /// Refuse ordinary writes while `disk` has no room (the store then takes only commands that
    /// stop work, written after the reserve is released), instead of failing in the Raft log.
    pub fn with_disk(mut self, disk: Arc<DiskGuard>) -> Self {
        self.disk = Some(disk);
        self
    }

    /// The runtime to block on, for the blocking writes (inside `block_in_place`), which a
    /// single-threaded runtime cannot do without stopping Raft itself: the control loop awaits
    /// the `*_async` writes instead.
    fn handle(&self) -> Result<tokio::runtime::Handle, LogError> {
        let handle = tokio::runtime::Handle::try_current()
            .map_err(|_| LogError::Store("a Raft write needs the Tokio runtime".into()))?;
        if handle.runtime_flavor() != tokio::runtime::RuntimeFlavor::MultiThread {
            return Err(LogError::Store("a Raft write needs the multi-threaded Tokio runtime".into()));
        }
        Ok(handle)
    }

    fn poison(&self, why: String) -> LogError {
        tracing::warn!(reason = %why, "raft: this leader's control loop stops writing");
        self.poisoned.send_replace(Some(why.clone()));
        LogError::Unwritable(why)
    }
}

impl RaftLog {
    /// Write `cmds` (indexes `first..`) through Raft and check the state machine's outcome.
    async fn write(&mut self, first: u64, cmds: &[Command]) -> Result<(), LogError> {
        if let Some(why) = self.poisoned.borrow().clone() {
            return Err(LogError::Unwritable(why));
        }
        let batch = Batch { commands: cmds.to_vec() };
        let timeout = self.timeout;
        let resp = match tokio::time::timeout(timeout, self.raft.client_write(batch)).await {
            Err(_) => {
                return Err(self.poison(format!("No cluster leader: no quorum confirmed the write within {timeout:?}")));
            }
            Ok(Err(e)) => return Err(self.poison(format!("No cluster leader: {e}"))),
            Ok(Ok(resp)) => resp,
        };
        let last = first + cmds.len() as u64 - 1;
        // A restore moves the index on to the saved state's when that is larger.
        let restored = cmds.iter().any(|c| matches!(c.inner(), Command::Restore { .. }));
        if !resp.data.is_accepted() || (resp.data.index != last && !restored) {
            return Err(self.poison(format!(
                "the replicated state machine disagrees with the leader's (index {} for {first}..={last}: {:?})",
                resp.data.index,
                resp.data.results.iter().filter_map(|r| r.as_ref().err()).next()
            )));
        }
        if restored {
            // The control loop's soft state (agents, offers, deployments in flight) belongs to
            // the state it replaced: it starts again from the restored one.
            self.poisoned.send_replace(Some("the state was restored; the control loop starts again from it".into()));
        }
        Ok(())
    }

    /// [`Log::append`]'s checks, then the write.
    async fn append_checked(&mut self, first: u64, cmds: &[Command]) -> Result<(), LogError> {
        if let Some(disk) = &self.disk {
            // Nothing is written: the store refuses ordinary commands until `recover`.
            disk.check()?;
        }
        self.write(first, cmds).await
    }

    /// [`Log::append_reserved`]: the reserve is released, then the write.
    async fn append_reserve(&mut self, first: u64, cmds: &[Command]) -> Result<(), LogError> {
        match &self.disk {
            Some(disk) => {
                disk.release();
                self.write(first, cmds).await
            }
            None => Err(LogError::Store("no reserve".into())),
        }
    }

    /// Every entry this leader committed went through this store, so its state is the whole
    /// committed state as long as no other leader was elected: a quorum confirming this
    /// leadership now makes the rejections just computed true at this point.
    async fn confirm_leading(&mut self) -> Result<(), LogError> {
        if let Some(why) = self.poisoned.borrow().clone() {
            return Err(LogError::Unwritable(why));
        }
        let timeout = self.timeout;
        match tokio::time::timeout(timeout, self.raft.ensure_linearizable()).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(self.poison(format!("No cluster leader: {e}"))),
            Err(_) => {
                Err(self.poison(format!("No cluster leader: no quorum confirmed this leader within {timeout:?}")))
            }
        }
    }
}

impl Log for RaftLog {
    fn append(&mut self, first: u64, cmds: &[Command]) -> Result<(), LogError> {
        self.handle()?.block_on(self.append_checked(first, cmds))
    }

    fn append_reserved(&mut self, first: u64, cmds: &[Command]) -> Result<(), LogError> {
        self.handle()?.block_on(self.append_reserve(first, cmds))
    }

    fn confirm(&mut self) -> Result<(), LogError> {
        self.handle()?.block_on(self.confirm_leading())
    }

    fn writes_async(&self) -> bool {
        true
    }

    fn append_async<'a>(&'a mut self, first: u64, cmds: &'a [Command]) -> LogFuture<'a> {
        Box::pin(self.append_checked(first, cmds))
    }

    fn append_reserved_async<'a>(&'a mut self, first: u64, cmds: &'a [Command]) -> LogFuture<'a> {
        Box::pin(self.append_reserve(first, cmds))
    }

    fn confirm_async(&mut self) -> LogFuture<'_> {
        Box::pin(self.confirm_leading())
    }

    fn load(&mut self) -> Result<(Option<State>, Vec<Command>), LogError> {
        Ok((self.start.take(), Vec::new()))
    }

    fn snapshots(&self) -> Arc<dyn SnapshotWriter> {
        Arc::new(RaftSnapshots)
    }

    fn compact(&mut self, _index: u64) -> Result<(), LogError> {
        Ok(())
    }

    fn recover(&mut self, _acknowledged: u64) -> Result<(), LogError> {
        // A poisoned log never recovers: the server replaces the whole control loop.
        if let Some(why) = self.poisoned.borrow().clone() {
            return Err(LogError::Unwritable(why));
        }
        // A refusal for want of room wrote nothing (and what the reserve took is committed).
        match &self.disk {
            Some(disk) => disk.recover(),
            None => Ok(()),
        }
    }
}
