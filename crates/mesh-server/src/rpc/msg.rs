//! The messages of the internal RPC. New fields must be optional (`#[serde(default)]`) within
//! a major version; anything else bumps [`super::PROTO_MAJOR`].

use mesh_core::model::AgentId;
use mesh_core::proto::{ToAgent, ToControl};
use mesh_core::state::Command;
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
