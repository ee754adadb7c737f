//! The identity a node gossips as, and the custom broadcast that tells a graceful leave from a failure.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use super::Role;

/// What foca knows a member by. Its `Addr` is the gossip address: two identities with the same address are
/// the same node, and the one with the higher generation wins (a restart or a rejoin after being declared
/// down). Kept small: every packet carries two of them (source and destination).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub(crate) struct NodeIdentity {
    pub(crate) name: String,
    pub(crate) node_id: String,
    pub(crate) dc: String,
    pub(crate) role: Role,
    pub(crate) gossip: SocketAddr,
    pub(crate) rpc: SocketAddr,
    pub(crate) generation: u64,
}

impl NodeIdentity {
    /// A stand-in for a node known only by its gossip address, to announce to (foca accepts an announce whose
    /// destination has the receiver's address).
    pub(crate) fn placeholder(gossip: SocketAddr) -> Self {
        Self {
            name: String::new(),
            node_id: String::new(),
            dc: String::new(),
            role: Role::Agent,
            gossip,
            rpc: gossip,
            generation: 0,
        }
    }
}

impl fmt::Debug for NodeIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}#{}@{}", self.name, self.generation, self.gossip)
    }
}

impl foca::Identity for NodeIdentity {
    type Addr = SocketAddr;

    fn renew(&self) -> Option<Self> {
        Some(Self { generation: self.generation.wrapping_add(1), ..self.clone() })
    }

    fn addr(&self) -> SocketAddr {
        self.gossip
    }

    fn win_addr_conflict(&self, adversary: &Self) -> bool {
        (self.generation, &self.node_id) > (adversary.generation, &adversary.node_id)
    }
}

/// The nodes known to have left gracefully: node id → the generation that left. Shared between the foca
/// broadcast handler (which learns of leaves) and the driver (which turns a Down member into Left or Failed).
#[derive(Default, Clone)]
pub(crate) struct LeftNodes(Arc<Mutex<LeftInner>>);

#[derive(Default)]
struct LeftInner {
    by_node: BTreeMap<String, u64>,
    changed: bool,
}

impl LeftNodes {
    /// Whether `node_id` at `generation` (or a later one) has left.
    pub(crate) fn has_left(&self, node_id: &str, generation: u64) -> bool {
        let inner = self.0.lock().unwrap_or_else(|e| e.into_inner());
        inner.by_node.get(node_id).is_some_and(|g| *g >= generation)
    }

    /// Records a leave; true when it is news.
    fn record(&self, node_id: &str, generation: u64) -> bool {
        let mut inner = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if inner.by_node.get(node_id).is_some_and(|g| *g >= generation) {
            return false;
        }
        inner.by_node.insert(node_id.to_owned(), generation);
        inner.changed = true;
        true
    }

    /// Whether a leave was recorded since the last call.
    pub(crate) fn take_changed(&self) -> bool {
        let mut inner = self.0.lock().unwrap_or_else(|e| e.into_inner());
        std::mem::take(&mut inner.changed)
    }
}

/// Kind byte of a leave notice (the only custom broadcast so far).
const LEAVE_NOTICE: u8 = 1;

/// Encodes "node `node_id` at `generation` left gracefully": `[1][generation u64 BE][node id bytes]`.
pub(crate) fn encode_leave(node_id: &str, generation: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(9 + node_id.len());
    out.push(LEAVE_NOTICE);
    out.extend_from_slice(&generation.to_be_bytes());
    out.extend_from_slice(node_id.as_bytes());
    out
}

/// The dissemination key of a leave notice: a later generation of the same node replaces an earlier one.
#[derive(Debug)]
pub(crate) struct LeaveKey {
    node_id: String,
    generation: u64,
}

impl foca::Invalidates for LeaveKey {
    fn invalidates(&self, other: &Self) -> bool {
        self.node_id == other.node_id && self.generation >= other.generation
    }
}

/// A custom broadcast that could not be decoded.
#[derive(Debug, thiserror::Error)]
#[error("malformed custom broadcast ({len} bytes)")]
pub(crate) struct BadBroadcast {
    len: usize,
}

/// Foca's broadcast handler: learns of graceful leaves and keeps disseminating only news.
pub(crate) struct LeaveHandler(pub(crate) LeftNodes);

impl foca::BroadcastHandler<NodeIdentity> for LeaveHandler {
    type Key = LeaveKey;
    type Error = BadBroadcast;

    fn receive_item(&mut self, data: &[u8], _sender: Option<&NodeIdentity>) -> Result<Option<LeaveKey>, BadBroadcast> {
        let bad = || BadBroadcast { len: data.len() };
        let [LEAVE_NOTICE, rest @ ..] = data else {
            return Err(bad());
        };
        if rest.len() < 8 {
            return Err(bad());
        }
        let (generation, node_id) = rest.split_at(8);
        let generation = u64::from_be_bytes(generation.try_into().map_err(|_| bad())?);
        let node_id = std::str::from_utf8(node_id).map_err(|_| bad())?;
        if node_id.is_empty() {
            return Err(bad());
        }
        // Stale news must return None, or foca would disseminate it forever.
        Ok(self.0.record(node_id, generation).then(|| LeaveKey { node_id: node_id.to_owned(), generation }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use foca::{BroadcastHandler, Identity};

    #[test]
    fn renew_bumps_generation_and_wins() {
        let id = NodeIdentity {
            name: "n1".into(),
            node_id: "6f1c".into(),
            dc: "dc1".into(),
            role: Role::Server,
            gossip: "127.0.0.2:8301".parse().unwrap(),
            rpc: "127.0.0.2:8300".parse().unwrap(),
            generation: 7,
        };
        let renewed = id.renew().unwrap();
        assert_eq!(renewed.generation, 8);
        assert!(renewed.win_addr_conflict(&id));
        assert!(!id.win_addr_conflict(&renewed));
        assert_eq!(renewed.addr(), id.addr());
    }

    #[test]
    fn leave_notices_are_news_once() {
        let left = LeftNodes::default();
        let mut handler = LeaveHandler(left.clone());
        let notice = encode_leave("abc", 3);
        assert!(handler.receive_item(&notice, None).unwrap().is_some());
        assert!(left.take_changed());
        assert!(handler.receive_item(&notice, None).unwrap().is_none());
        assert!(handler.receive_item(&encode_leave("abc", 2), None).unwrap().is_none());
        assert!(!left.take_changed());
        assert!(left.has_left("abc", 3));
        assert!(!left.has_left("abc", 4));
        assert!(handler.receive_item(b"", None).is_err());
        assert!(handler.receive_item(b"\x01short", None).is_err());
        assert!(handler.receive_item(b"\x02\0\0\0\0\0\0\0\x01x", None).is_err());
    }
}
