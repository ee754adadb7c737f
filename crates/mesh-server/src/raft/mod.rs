//! Raft storage for the replicated cluster state (issue 13, step 1): the types openraft 0.9 is
//! instantiated with, a durable log of segment files ([`SegmentLogStore`]) and the state machine that applies
//! [`Command`]s to a [`State`](mesh_core::state::State) ([`MeshStateMachine`]).
//!
//! The Raft RPCs travel over mesh's internal RPC ([`network`]: [`MeshNetwork`] calls, a
//! [`RaftHandler`] serves); timings are Consul-like ([`RaftTiming`]).
//!
//! A `mesh server` runs on it ([`server`]): the leader's control loop writes through
//! [`RaftLog`], every server's state machine publishes what it applies. The storage passes
//! openraft's conformance suite (`tests/raft_storage.rs`); a three-node group elects,
//! replicates and fails over in `tests/raft_group.rs`; `tests/ha.rs` runs three server
//! processes.

// openraft's storage traits fix the error type (`StorageError`, ~224 bytes); the helpers here
// return it as the trait methods must, so boxing it would only add conversions.
#![allow(clippy::result_large_err)]

use mesh_core::state::{ApplyError, Command};
use openraft::{AnyError, ErrorSubject, ErrorVerb, StorageError, StorageIOError};
use serde::{Deserialize, Serialize};
use std::io::Cursor;

pub mod autopilot;
pub mod disk;
pub mod log;
pub mod network;
pub mod runtime;
pub mod seg_store;
pub mod server;
pub mod state_machine;

pub use autopilot::Contacts;
pub use disk::DiskGuard;
pub use log::RaftLog;
pub use network::{MeshNetwork, MeshNetworkClient, RaftHandler, RaftTiming};
pub use seg_store::SegmentLogStore;
pub use server::{RaftServer, RaftServerConfig, raft_id};
pub use state_machine::{Applied, ApplyObserver, MeshSnapshotBuilder, MeshStateMachine};

openraft::declare_raft_types!(
    /// The openraft type configuration of mesh: log entries carry [`Batch`]es of commands,
    /// applying one answers an [`ApplyOutcome`], members are [`MeshNode`]s.
    pub TypeConfig:
        D = Batch,
        R = ApplyOutcome,
        NodeId = u64,
        Node = MeshNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = runtime::MeshRuntime,
);

/// A Raft node id.
pub type NodeId = u64;
/// A log id (term, leader and index) of [`TypeConfig`].
pub type LogId = openraft::LogId<NodeId>;
/// A log entry of [`TypeConfig`].
pub type Entry = openraft::Entry<TypeConfig>;
/// The membership as last applied, with the id of the log entry that set it.
pub type StoredMembership = openraft::StoredMembership<NodeId, MeshNode>;
/// A storage error of [`TypeConfig`].
pub type RaftStorageError = StorageError<NodeId>;

/// A member of the Raft group: its name and the address of its Raft RPC endpoint.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeshNode {
    /// The node's name (as in gossip and the catalog).
    pub name: String,
    /// `host:port` of the node's Raft RPC endpoint.
    pub rpc: String,
}

/// One log entry's commands: the leader writes what its control loop proposed in one turn as one
/// entry (group commit), so a burst of writes costs one replication round, not one per write.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Batch {
    /// The commands, applied in order.
    pub commands: Vec<Command>,
}

impl From<Vec<Command>> for Batch {
    fn from(commands: Vec<Command>) -> Self {
        Batch { commands }
    }
}

impl From<Command> for Batch {
    fn from(command: Command) -> Self {
        Batch { commands: vec![command] }
    }
}

/// What applying one log entry did: the state index after it, and for each command of its
/// [`Batch`] whether [`State::apply`](mesh_core::state::State::apply) accepted it. A rejected
/// command leaves the state unchanged; the proposer hands the client the same [`ApplyError`] a
/// single-node server would. Blank and membership entries have no commands.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ApplyOutcome {
    /// The state's index after the entry.
    pub index: u64,
    /// Per command: `Ok` when it was applied, else why not.
    pub results: Vec<Result<(), ApplyError>>,
}

impl ApplyOutcome {
    /// Whether every command was applied.
    pub fn is_accepted(&self) -> bool {
        self.results.iter().all(Result::is_ok)
    }
}

/// A storage or I/O failure as an openraft storage error about `subject`.
pub(crate) fn storage_err(
    subject: ErrorSubject<NodeId>,
    verb: ErrorVerb,
    e: impl std::fmt::Display,
) -> RaftStorageError {
    StorageIOError::new(subject, verb, AnyError::error(e.to_string())).into()
}

/// Run blocking storage work off the async worker threads so that it never stalls the Raft core
/// (or anything else scheduled on the runtime).
pub(crate) async fn blocking<T, F>(subject: ErrorSubject<NodeId>, verb: ErrorVerb, f: F) -> Result<T, RaftStorageError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, RaftStorageError> + Send + 'static,
{
    if runtime::simulated() {
        return f();
    }
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r,
        Err(e) => Err(storage_err(subject, verb, e)),
    }
}
