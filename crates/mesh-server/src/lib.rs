//! mesh-server: assembles the cores of mesh-core into a deployable node.
//!
//! - [`node`]: builds a node from a [`node::NodeConfig`] (`mesh dev` = control + agent + APIs + DNS).
//! - [`control`]: the single writer of cluster state (log, allocator, Marathon scheduler).
//! - [`agent`]: runs tasks through a runtime and reports their status.
//! - [`api`]: one HTTP router for Marathon `/v2` and Consul `/v1`; errors mapped in one place.
//! - [`serve`]: the HTTP accept loop with connection limits and timeouts.
//! - [`dns`]: the hickory-server handler over the published catalog.
//! - [`rpc`]: the internal RPC between nodes (versioned frames over a [`rpc::Transport`]).
//! - [`framework`]: run a mesh-sdk `Framework` in-process against the control loop.
//! - [`gossip`]: LAN membership and failure detection by SWIM gossip (foca).
//! - [`raft`]: openraft storage (redb log, state machine over [`mesh_core::state::State`]); not wired in yet.
//! - [`testing`]: an in-process cluster (servers and agents on loopback) for tests of frameworks
//!   and clients against failover.

pub mod agent;
pub mod api;
pub mod checks;
pub mod cluster;
pub mod control;
pub mod dns;
pub mod dns_remote;
pub mod events;
pub mod framework;
pub mod gossip;
pub mod health;
pub mod logs;
pub mod node;
pub mod partition;
pub mod raft;
pub mod registrator;
pub mod rpc;
pub mod serve;
pub mod testing;
pub mod watch;
