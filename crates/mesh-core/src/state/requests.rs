//! Client request ids of applied commands ([`Command::Once`](super::Command::Once)): a write
//! retried after its answer was lost (a leader died between commit and reply, a client timed
//! out) carries the same id and is applied once.
//!
//! Part of the replicated state, so every server knows every id a leader applied and a new
//! leader refuses a repeat just as the old one would have. Bounded: the ids of the last
//! [`MAX_REQUESTS`] commands are kept, the oldest forgotten first (a retry comes within seconds;
//! ten thousand writes later it is no longer a retry).

use crate::kv::KvEntry;
use imbl::OrdMap;
use serde::{Deserialize, Serialize};

/// How many request ids are remembered.
pub const MAX_REQUESTS: usize = 10_000;

/// The longest request id accepted.
pub const MAX_REQUEST_ID: usize = 128;

/// What is remembered of one applied request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Applied {
    /// The state index the command applied at.
    pub index: u64,
    /// A KV transaction's results, so a repeat answers what the original would have.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub txn_results: Option<Vec<KvEntry>>,
}

/// The remembered request ids.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Requests {
    /// By id.
    by_id: OrdMap<String, Applied>,
    /// Ids by the index they applied at (the eviction order); derived, rebuilt on load.
    #[serde(skip)]
    by_index: OrdMap<u64, String>,
}

impl PartialEq for Requests {
    fn eq(&self, other: &Self) -> bool {
        self.by_id == other.by_id
    }
}

impl Requests {
    /// What the request `id` applied, if it did (and is still remembered).
    pub fn get(&self, id: &str) -> Option<&Applied> {
        self.by_id.get(id)
    }

    /// How many ids are remembered.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// Remember that `id` applied as `applied`, forgetting the oldest beyond [`MAX_REQUESTS`].
    pub(crate) fn insert(&mut self, id: String, applied: Applied) {
        self.by_index.insert(applied.index, id.clone());
        self.by_id.insert(id, applied);
        while self.by_id.len() > MAX_REQUESTS {
            let Some((index, oldest)) = self.by_index.get_min().map(|(i, id)| (*i, id.clone())) else { break };
            self.by_index.remove(&index);
            self.by_id.remove(&oldest);
        }
    }

    /// Rebuild the derived order after loading.
    pub(crate) fn rebuild(&mut self) {
        self.by_index = self.by_id.iter().map(|(id, a)| (a.index, id.clone())).collect();
    }
}

/// Whether `id` is a well-formed request id: 1 to [`MAX_REQUEST_ID`] characters of letters,
/// digits and `-._:#`.
pub fn valid_request_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_REQUEST_ID
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b':' | b'#'))
}
