//! The cluster: what servers and agents say to each other over [`crate::rpc`].
//!
//! - [`server`]: a server's RPC handler (agent sessions, reports, the state stream, forwarded
//!   requests).
//! - [`uplink`]: an agent's connection to a server: its session, its outbox of reports (kept
//!   on disk until acknowledged), reconnection.
//! - [`replica`]: an agent's read-only copy of the state, for DNS and the read APIs.
//! - [`replication`]: the server side of that copy.
//! - [`forward`]: HTTP writes sent to an agent, carried to a server.
//! - [`coords`]: measuring network coordinates (LAN and WAN) by timed exchanges.

pub mod antientropy;
pub mod coords;
pub mod forward;
pub mod ops;
pub mod outbox;
pub mod replica;
pub mod replication;
pub mod server;
pub mod uplink;

/// The connection an agent has to a server, if any (`None` while it has none).
pub type Link = tokio::sync::watch::Receiver<Option<crate::rpc::Conn>>;
