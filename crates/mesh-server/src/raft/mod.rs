//! Raft storage for the replicated cluster state (issue 13, step 1): the types openraft 0.9 is
//! instantiated with, a durable log on redb ([`RedbLogStore`]) and the state machine that applies
//! [`Command`]s to a [`State`](mesh_core::state::State) ([`MeshStateMachine`]).
//!
//! The Raft RPCs travel over mesh's internal RPC ([`network`]: [`MeshNetwork`] calls, a
//! [`RaftHandler`] serves); timings are Consul-like ([`RaftTiming`]).
//!
//! Nothing here is wired into the running server yet: the control loop still writes its own log.
//! The storage passes openraft's conformance suite (`tests/raft_storage.rs`); a three-node group
//! elects, replicates and fails over in `tests/raft_group.rs`.

// openraft's storage traits fix the error type (`StorageError`, ~224 bytes); the helpers here
// return it as the trait methods must, so boxing it would only add conversions.
#![allow(clippy::result_large_err)]

use mesh_core::state::{ApplyError, Command};
use openraft::{AnyError, ErrorSubject, ErrorVerb, StorageError, StorageIOError};
use serde::{Deserialize, Serialize};
use std::io::Cursor;

pub mod log_store;
pub mod network;
pub mod state_machine;

pub use log_store::RedbLogStore;
pub use network::{MeshNetwork, MeshNetworkClient, RaftHandler, RaftTiming};
pub use state_machine::{Applied, MeshSnapshotBuilder, MeshStateMachine};

openraft::declare_raft_types!(
    /// The openraft type configuration of mesh: log entries carry [`Command`]s, applying one
    /// answers an [`ApplyOutcome`], members are [`MeshNode`]s.
    pub TypeConfig:
        D = Command,
        R = ApplyOutcome,
        NodeId = u64,
        Node = MeshNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
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

/// What applying one log entry did: the state index after it, and whether
/// [`State::apply`](mesh_core::state::State::apply) accepted the command. A rejected command
/// leaves the state unchanged; the proposer hands the client the same [`ApplyError`] a
/// single-node server would. Blank and membership entries are always accepted.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ApplyOutcome {
    /// The state's index after the entry (unchanged when the command was rejected).
    pub index: u64,
    /// `Ok` when the command was applied, else why not.
    pub result: Result<(), ApplyError>,
}

impl ApplyOutcome {
    /// Whether the command was applied.
    pub fn is_accepted(&self) -> bool {
        self.result.is_ok()
    }
}

/// A redb or I/O failure as an openraft storage error about `subject`.
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
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r,
        Err(e) => Err(storage_err(subject, verb, e)),
    }
}
