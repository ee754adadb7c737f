//! The messages of the internal RPC. New fields must be optional (`#[serde(default)]`) within
//! a major version; anything else bumps [`super::PROTO_MAJOR`].

use crate::raft::{NodeId, TypeConfig};
use mesh_core::model::AgentId;
use mesh_core::proto::{ToAgent, ToControl};
use mesh_core::state::Command;
use openraft::error::{InstallSnapshotError, RaftError};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use serde::{Deserialize, Serialize};

/// A call or the opening of a stream.
// Reports carry messages inline; requests are built once and serialized.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Request {
    /// Agent → server, a stream: the agent's session. The first message is its registration
    /// (`ToControl::Register`); the server streams [`Item::ToAgent`] until either side goes.
    AgentSession {
        /// The agent's registration.
        register: ToControl,
    },
    /// Agent → server, a call: what the agent observed, from its outbox, each with its sequence
    /// number. Answered with [`Response::Ack`] once recorded.
    Report {
        /// The reporting agent.
        agent: AgentId,
        /// Its incarnation: the node id of its data dir.
        incarnation: String,
        /// `(sequence number, message)`, in order.
        items: Vec<(u64, ToControl)>,
    },
    /// A stream of the state: a snapshot when the server's recent log does not reach back to
    /// `from`, then every applied command after it.
    Replicate {
        /// The first index the caller lacks (its state's index + 1).
        from: u64,
    },
    /// A write sent to another node's HTTP API, forwarded to a server.
    Http(HttpRequest),
    /// A test call: echoed back.
    Echo(String),
    /// Server → server, a call: a Raft RPC of the replicated log (protocol 1.1). Answered with
    /// [`Response::Raft`].
    Raft(RaftRequest),
    /// Any node → any node, a call (protocol 1.2): the caller's network coordinate in one pool,
    /// answered with [`Response::Coordinate`]; the caller times the round trip. Send it only
    /// to peers whose minor version is at least 2 ([`super::Peer::minor`]).
    Coordinate(CoordinateRequest),
}

/// A coordinate exchange: who asks is the connection's peer (its node name on the LAN,
/// `<node>.<dc>` on the WAN), so a node only ever sets its own coordinate.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CoordinateRequest {
    /// The WAN pool's coordinates (servers only), else the LAN's.
    pub wan: bool,
    /// The caller's coordinate.
    pub coord: mesh_core::coordinate::Coordinate,
    /// When the caller computed it (ms since the epoch, its clock).
    pub stamp: u64,
    /// Whether the answer should carry every coordinate the peer knows in that pool.
    #[serde(default)]
    pub want_table: bool,
}

/// The answer to a [`CoordinateRequest`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CoordinateReply {
    /// The peer's own coordinate.
    pub coord: mesh_core::coordinate::Coordinate,
    /// When the peer computed it.
    pub stamp: u64,
    /// Every coordinate the peer knows in the pool, when asked for.
    #[serde(default)]
    pub table: Vec<CoordEntry>,
}

/// A node's coordinate as one node knows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CoordEntry {
    /// The node (`<node>.<dc>` on the WAN).
    pub node: String,
    /// Its coordinate.
    pub coord: mesh_core::coordinate::Coordinate,
    /// When its owner computed it: the newest stamp wins.
    pub stamp: u64,
}

/// The Raft RPCs openraft sends between the members of the group (see [`crate::raft::network`]).
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum RaftRequest {
    /// Replicate log entries (or a heartbeat, with none).
    AppendEntries(AppendEntriesRequest<TypeConfig>),
    /// A candidate asks for a vote.
    Vote(VoteRequest<NodeId>),
    /// One chunk of a snapshot for a follower that lags behind the leader's log.
    InstallSnapshot(InstallSnapshotRequest<TypeConfig>),
}

// openraft's AppendEntriesRequest has no PartialEq (its fields have).
impl PartialEq for RaftRequest {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (RaftRequest::AppendEntries(a), RaftRequest::AppendEntries(b)) => {
                a.vote == b.vote
                    && a.prev_log_id == b.prev_log_id
                    && a.entries == b.entries
                    && a.leader_commit == b.leader_commit
            }
            (RaftRequest::Vote(a), RaftRequest::Vote(b)) => a == b,
            (RaftRequest::InstallSnapshot(a), RaftRequest::InstallSnapshot(b)) => a == b,
            _ => false,
        }
    }
}

/// The answer to a [`RaftRequest`] of the same name: openraft's response, or its error (the
/// receiving Raft has stopped; for a snapshot chunk also a mismatch, after which the leader
/// starts the snapshot over).
#[derive(Debug, PartialEq, Serialize, Deserialize)]
pub enum RaftResponse {
    /// To [`RaftRequest::AppendEntries`].
    AppendEntries(Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>),
    /// To [`RaftRequest::Vote`].
    Vote(Result<VoteResponse<NodeId>, RaftError<NodeId>>),
    /// To [`RaftRequest::InstallSnapshot`].
    InstallSnapshot(Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>>),
}

// openraft's AppendEntriesResponse and InstallSnapshotResponse are not Clone (frames are).
impl Clone for RaftResponse {
    fn clone(&self) -> Self {
        match self {
            RaftResponse::AppendEntries(r) => RaftResponse::AppendEntries(match r {
                Ok(AppendEntriesResponse::Success) => Ok(AppendEntriesResponse::Success),
                Ok(AppendEntriesResponse::PartialSuccess(l)) => Ok(AppendEntriesResponse::PartialSuccess(*l)),
                Ok(AppendEntriesResponse::Conflict) => Ok(AppendEntriesResponse::Conflict),
                Ok(AppendEntriesResponse::HigherVote(v)) => Ok(AppendEntriesResponse::HigherVote(*v)),
                Err(e) => Err(e.clone()),
            }),
            RaftResponse::Vote(r) => RaftResponse::Vote(r.clone()),
            RaftResponse::InstallSnapshot(r) => RaftResponse::InstallSnapshot(match r {
                Ok(i) => Ok(InstallSnapshotResponse { vote: i.vote }),
                Err(e) => Err(e.clone()),
            }),
        }
    }
}

impl RaftRequest {
    /// The request's name, for logs.
    pub fn name(&self) -> &'static str {
        match self {
            RaftRequest::AppendEntries(_) => "Raft.AppendEntries",
            RaftRequest::Vote(_) => "Raft.Vote",
            RaftRequest::InstallSnapshot(_) => "Raft.InstallSnapshot",
        }
    }
}

impl Request {
    /// The request's name, for logs.
    pub fn name(&self) -> &'static str {
        match self {
            Request::AgentSession { .. } => "AgentSession",
            Request::Report { .. } => "Report",
            Request::Replicate { .. } => "Replicate",
            Request::Http(_) => "Http",
            Request::Echo(_) => "Echo",
            Request::Raft(r) => r.name(),
            Request::Coordinate(_) => "Coordinate",
        }
    }
}

/// An answer to a call.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Response {
    /// Every report up to this sequence number is recorded.
    Ack {
        /// The highest sequence number recorded.
        upto: u64,
    },
    /// The forwarded request's response.
    Http(HttpResponse),
    /// The echo.
    Echo(String),
    /// The answer to a [`Request::Raft`].
    Raft(RaftResponse),
    /// The answer to a [`Request::Coordinate`].
    Coordinate(CoordinateReply),
}

/// One item of a stream.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Item {
    /// Server → agent: a message of its session.
    ToAgent(ToAgent),
    /// Part of a state snapshot (MessagePack of the state, `mesh_core::state::encode_state`).
    Snapshot {
        /// The state's index.
        index: u64,
        /// These bytes.
        #[serde(with = "serde_bytes")]
        chunk: Vec<u8>,
        /// Whether this is the last part.
        last: bool,
    },
    /// Commands applied on the server, indexes `first..first + cmds.len()`.
    Commands {
        /// Index of the first.
        first: u64,
        /// The commands.
        cmds: Vec<Command>,
    },
    /// Nothing new; the server's state index (sent while idle, so replicas know it is alive).
    Heartbeat {
        /// The server's index.
        index: u64,
    },
}

/// An HTTP request as forwarded between nodes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HttpRequest {
    /// Method.
    pub method: String,
    /// Path and query.
    pub uri: String,
    /// Headers (name, value).
    pub headers: Vec<(String, String)>,
    /// Body.
    #[serde(with = "serde_bytes")]
    pub body: Vec<u8>,
    /// The node the request was sent to: `/v1/agent/*` writes act for it.
    pub node: String,
}

/// An HTTP response as forwarded between nodes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HttpResponse {
    /// Status code.
    pub status: u16,
    /// Headers (name, value).
    pub headers: Vec<(String, String)>,
    /// Body.
    #[serde(with = "serde_bytes")]
    pub body: Vec<u8>,
    /// The server's state index after the request: the forwarding node waits for its replica
    /// to reach it, so a client reads its own write.
    pub index: u64,
}
