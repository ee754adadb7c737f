//! Consul's key/value store and sessions, as a pure state machine.
//!
//! [`KvState`] lives inside [`crate::state::State`] and changes only through
//! [`crate::state::Command::Kv`] and [`crate::state::Command::Session`]. Every command carries the
//! time it was issued and every generated id (session ids are made by the caller), so replaying
//! the log gives the same store.
//!
//! Semantics follow Consul (see `consul.md`, "KV and session semantics"):
//! - a plain PUT always writes, even over a lock; `cas=0` creates only; `cas=N` needs
//!   `ModifyIndex == N`;
//! - `acquire=S` takes a free key (`LockIndex + 1`), re-writes a key S already holds, fails on a
//!   key another session holds or whose lock-delay runs, and is an error for an unknown session;
//! - `release=S` only works for the holder and keeps `LockIndex`;
//! - a session is invalidated on destroy and when its TTL runs out (after 2 × TTL, as Consul's
//!   timers); its keys are released (or deleted with `Behavior=delete`) and their lock-delay starts.
//!
//! Blocking queries watch [`KvState::prefix_index`], [`KvState::key_index`] and
//! [`KvState::sessions_index`]: each is the index of the last change to what it covers
//! (deletions included, through tombstones), so a watcher wakes for its own keys only.

use crate::model::Millis;
use imbl::{OrdMap, OrdSet};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::sync::Arc;

/// The largest value a key may hold (Consul's `kv_max_value_size`).
pub const MAX_VALUE_SIZE: usize = 512 * 1024;
/// Lock-delay when a session does not say (Consul's default).
pub const DEFAULT_LOCK_DELAY_NS: u64 = 15_000_000_000;
/// The largest lock-delay a session may ask for.
pub const MAX_LOCK_DELAY_NS: u64 = 60_000_000_000;
/// The shortest session TTL (Consul's `session_ttl_min`).
pub const MIN_TTL_MS: u64 = 10_000;
/// The longest session TTL.
pub const MAX_TTL_MS: u64 = 86_400_000;
/// A session with a TTL is invalidated when it was not renewed for this many TTLs (Consul's
/// `SessionTTLMultiplier`: clients are promised at least the TTL, not at most).
pub const TTL_MULTIPLIER: u64 = 2;
/// The blocking-query topic of the sessions (KV prefixes are `kv:<prefix>`); see
/// [`crate::state::State::topic_index`].
pub const SESSIONS_TOPIC: &str = "sessions";
/// Tombstones kept before the oldest half is folded into [`KvState::tombstone_floor`].
pub const MAX_TOMBSTONES: usize = 8192;

/// Why a KV or session command was not applied (serializable as part of
/// [`crate::state::ApplyError`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[non_exhaustive]
pub enum KvError {
    /// A condition of the write did not hold (stale `cas`, lock held by another session or still
    /// in its lock-delay, release by a non-holder): Consul answers `false`.
    #[error("the write's condition did not hold")]
    NotApplied,
    /// `acquire`/`release` without a session id.
    #[error("missing session")]
    MissingSession,
    /// `acquire` with a session that does not exist.
    #[error("invalid session {0:?}")]
    InvalidSession(String),
    /// A session id that does not exist (renew).
    #[error("Session id '{0}' not found")]
    UnknownSession(String),
    /// A session for a node the catalog does not know.
    #[error("Missing node registration")]
    MissingNode(String),
    /// A session listing a check its node does not have.
    #[error("Missing check '{0}' registration")]
    MissingCheck(String),
    /// A session listing a check that is critical.
    #[error("Check '{0}' is in critical state")]
    CriticalCheck(String),
    /// A session id that is taken already.
    #[error("Session ID '{0}' already exists")]
    DuplicateSession(String),
    /// `Behavior` is neither `release` nor `delete`.
    #[error("Invalid Behavior setting '{0}'")]
    InvalidBehavior(String),
    /// A TTL that does not parse or lies outside the bounds.
    #[error("Invalid Session TTL '{0}', must be between [10s=24h0m0s]")]
    InvalidTtl(String),
    /// A lock-delay that does not parse or is too long.
    #[error("Invalid Lock Delay '{0}', must be a duration of at most 60s")]
    InvalidLockDelay(String),
    /// An expiry for a session that was renewed (or is gone) since it was found due.
    #[error("session {0} is not due")]
    NotDue(String),
    /// Operations of a transaction failed; none of its operations was applied.
    #[error("transaction rolled back: {}", txn_errors(.0))]
    TxnFailed(Vec<TxnError>),
}

fn txn_errors(errors: &[TxnError]) -> String {
    errors.iter().map(|e| format!("op {}: {}", e.op_index, e.what)).collect::<Vec<_>>().join("; ")
}

/// Why one operation of a transaction failed (Consul's `TxnError`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxnError {
    /// The index of the operation in the transaction.
    pub op_index: usize,
    /// Why, in Consul's words.
    pub what: String,
}

/// One operation of a KV transaction (`PUT /v1/txn`): a write, a condition that must hold for
/// the transaction to be applied, or a read (answered at its place in the transaction, after
/// the operations before it).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum TxnOp {
    /// A write (set, cas, lock, unlock, delete, delete-tree, delete-cas).
    Kv(KvOp),
    /// `check-index`: the key exists with this `ModifyIndex`.
    CheckIndex {
        /// The key.
        key: String,
        /// Its expected `ModifyIndex`.
        index: u64,
    },
    /// `check-session`: the key's lock is held by this session (by none when it is empty).
    CheckSession {
        /// The key.
        key: String,
        /// The session.
        session: String,
    },
    /// `check-not-exists`: the key does not exist.
    CheckNotExists {
        /// The key.
        key: String,
    },
    /// `get`: the key's entry, value included; fails when the key does not exist.
    Get {
        /// The key.
        key: String,
    },
    /// `get-or-empty`: the key's entry, or an empty one naming the key when it does not exist.
    GetOrEmpty {
        /// The key.
        key: String,
    },
    /// `get-tree`: every entry under the prefix, values included.
    GetTree {
        /// The prefix.
        prefix: String,
    },
}

impl TxnOp {
    /// Whether the operation changes the store (a transaction without one is a read).
    pub fn is_write(&self) -> bool {
        matches!(self, TxnOp::Kv(_))
    }
}

/// A value: bytes shared between state versions (a persistent map copies entries, not values),
/// base64 in the log and in JSON, raw bytes in snapshots, shown by length in debug output.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct KvValue(pub Arc<[u8]>);

impl KvValue {
    /// The bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
    /// Parse Consul's base64 form of a value (standard alphabet, padded).
    pub fn from_base64(s: &str) -> Result<Self, String> {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.decode(s.as_bytes()).map(Self::from).map_err(|e| e.to_string())
    }

    /// Base64 (standard alphabet, padded), as Consul's JSON shows values.
    pub fn to_base64(&self) -> String {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(&self.0)
    }
}

impl From<Vec<u8>> for KvValue {
    fn from(v: Vec<u8>) -> Self {
        Self(v.into())
    }
}

impl From<&[u8]> for KvValue {
    fn from(v: &[u8]) -> Self {
        Self(v.into())
    }
}

impl fmt::Debug for KvValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KvValue({} bytes)", self.0.len())
    }
}

impl Serialize for KvValue {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        // Base64 in JSON (the log, the APIs); raw bytes in binary encodings (snapshots).
        if s.is_human_readable() { s.serialize_str(&self.to_base64()) } else { s.serialize_bytes(&self.0) }
    }
}

impl<'de> Deserialize<'de> for KvValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = KvValue;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("base64 text or bytes")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<KvValue, E> {
                use base64::Engine;
                let v = base64::engine::general_purpose::STANDARD.decode(s.as_bytes()).map_err(E::custom)?;
                Ok(KvValue::from(v))
            }
            fn visit_bytes<E: serde::de::Error>(self, b: &[u8]) -> Result<KvValue, E> {
                Ok(KvValue::from(b))
            }
        }
        if d.is_human_readable() { d.deserialize_str(Visit) } else { d.deserialize_bytes(Visit) }
    }
}

/// One key.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KvEntry {
    /// The key.
    pub key: String,
    /// Its value (may be empty).
    pub value: KvValue,
    /// Opaque flags of the client.
    pub flags: u64,
    /// Index at which the key was created.
    pub create_index: u64,
    /// Index of its last change.
    pub modify_index: u64,
    /// How many times it was acquired.
    pub lock_index: u64,
    /// The session holding its lock.
    pub session: Option<String>,
}

/// What happens to the keys a session holds when it is invalidated.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Behavior {
    /// The locks are released; the keys stay.
    #[default]
    Release,
    /// The keys are deleted.
    Delete,
}

impl Behavior {
    /// Consul's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Behavior::Release => "release",
            Behavior::Delete => "delete",
        }
    }

    /// Parse Consul's name (case-insensitive; empty means release).
    pub fn parse(s: &str) -> Result<Self, KvError> {
        match s.to_ascii_lowercase().as_str() {
            "" | "release" => Ok(Behavior::Release),
            "delete" => Ok(Behavior::Delete),
            _ => Err(KvError::InvalidBehavior(s.to_owned())),
        }
    }
}

/// A session.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Session {
    /// Id (a UUID, made by whoever builds the create command).
    pub id: String,
    /// Human-readable name.
    pub name: String,
    /// The node it is tied to.
    pub node: String,
    /// Lock-delay in nanoseconds.
    pub lock_delay_ns: u64,
    /// Release or delete held keys on invalidation.
    pub behavior: Behavior,
    /// The TTL as the client gave it (`""`: none).
    pub ttl: String,
    /// The TTL in milliseconds (0: none).
    pub ttl_ms: u64,
    /// Node checks the session depends on.
    pub node_checks: Vec<String>,
    /// Service checks the session depends on.
    pub service_checks: Vec<String>,
    /// Index at which it was created.
    pub create_index: u64,
    /// Index of its last change.
    pub modify_index: u64,
    /// When it is invalidated unless renewed (sessions with a TTL).
    pub expires_at: Option<Millis>,
}

/// How a PUT writes a key.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum SetMode {
    /// Always write (an existing lock is kept).
    Plain,
    /// Write only if `ModifyIndex` equals this (0: only if the key does not exist).
    Cas(u64),
    /// Take the key's lock for this session.
    Acquire(String),
    /// Give the key's lock up (only its holder can).
    Release(String),
}

/// A change of the KV store.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum KvOp {
    /// PUT.
    Set {
        /// The key.
        key: String,
        /// The new value.
        value: KvValue,
        /// The new flags.
        flags: u64,
        /// Plain, CAS, acquire or release.
        mode: SetMode,
        /// When (lock-delays are checked against it).
        now: Millis,
    },
    /// DELETE.
    Delete {
        /// The key, or the prefix with `recurse`.
        key: String,
        /// Delete every key with this prefix.
        recurse: bool,
        /// Delete only if `ModifyIndex` equals this.
        cas: Option<u64>,
        /// When.
        now: Millis,
    },
}

/// A change of the sessions.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum SessionOp {
    /// Create a session (indexes and expiry are set on apply).
    Create {
        /// The session.
        session: Session,
        /// When.
        now: Millis,
    },
    /// Destroy a session (a no-op if it does not exist).
    Destroy {
        /// Which.
        id: String,
        /// When (lock-delays start now).
        now: Millis,
    },
    /// Renew a session's TTL.
    Renew {
        /// Which.
        id: String,
        /// When.
        now: Millis,
    },
    /// Invalidate a session whose TTL ran out (rejected if it was renewed meanwhile).
    Expire {
        /// Which.
        id: String,
        /// When.
        now: Millis,
    },
}

/// The KV store and the sessions. Cloning is O(1).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct KvState {
    /// Keys, with keys and entries as shared pointers, so that a write's copy of the B-tree nodes on its
    /// path (imbl nodes hold up to 64 entries, and inner nodes hold entries too) bumps reference
    /// counts instead of copying two strings per entry: at 1,000,000 keys that was ~10 % of a
    /// write.
    pub entries: OrdMap<Arc<str>, Arc<KvEntry>>,
    /// Deleted keys with the index of their deletion, so a prefix's index never goes back.
    pub tombstones: OrdMap<String, u64>,
    /// The highest index of the tombstones dropped to bound memory: every prefix's index is at
    /// least this (a watcher may wake once for nothing, never miss a change).
    pub tombstone_floor: u64,
    /// Sessions by id.
    pub sessions: OrdMap<String, Session>,
    /// Keys in lock-delay, with the time the delay ends.
    pub lock_delays: OrdMap<String, Millis>,
    /// Index of the last change to any key.
    pub index: u64,
    /// Index of the last session created or invalidated (renewals do not count, as in Consul).
    pub sessions_index: u64,
    /// Sessions by expiry time (derived from `sessions`; rebuilt after a snapshot is loaded).
    #[serde(skip)]
    deadlines: OrdSet<(Millis, String)>,
    /// The keys each session holds (derived from `entries`; rebuilt after a snapshot is
    /// loaded), so invalidating a session costs what it holds, not a walk of every key.
    #[serde(skip)]
    held: OrdSet<(String, Arc<str>)>,
}

impl KvState {
    /// Rebuild the derived indexes (after deserializing).
    pub fn rebuild(&mut self) {
        self.deadlines =
            self.sessions.values().filter_map(|s| s.expires_at.map(|t| (t, s.id.clone()))).collect::<OrdSet<_>>();
        self.held = self.entries.iter().filter_map(|(k, e)| e.session.clone().map(|s| (s, k.clone()))).collect();
    }

    /// One key.
    pub fn get(&self, key: &str) -> Option<&KvEntry> {
        self.entries.get(key).map(|e| &**e)
    }

    /// Every key starting with `prefix`, in key order.
    pub fn list<'a>(&'a self, prefix: &'a str) -> impl Iterator<Item = &'a KvEntry> + 'a {
        use std::ops::Bound;
        self.entries
            .range::<_, str>((Bound::Included(prefix), Bound::Unbounded))
            .take_while(move |(k, _)| k.starts_with(prefix))
            .map(|(_, e)| &**e)
    }

    /// Keys starting with `prefix`; with a separator, each key is cut after the first separator
    /// past the prefix and repeats are dropped (`base/` + `/` → `base/base/`, `base/foo`).
    pub fn keys(&self, prefix: &str, separator: &str) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for e in self.list(prefix) {
            let key = match separator {
                "" => e.key.clone(),
                sep => match e.key[prefix.len()..].find(sep) {
                    Some(i) => e.key[..prefix.len() + i + sep.len()].to_owned(),
                    None => e.key.clone(),
                },
            };
            if out.last() != Some(&key) {
                out.push(key);
            }
        }
        out
    }

    /// The index of the last change (write or delete) to any key starting with `prefix`; `""`
    /// covers the whole store. Never 0.
    pub fn prefix_index(&self, prefix: &str) -> u64 {
        if prefix.is_empty() {
            return self.index.max(self.tombstone_floor).max(1);
        }
        let live = self.list(prefix).map(|e| e.modify_index).max().unwrap_or(0);
        let dead = self
            .tombstones
            .range(prefix.to_owned()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(_, i)| *i)
            .max()
            .unwrap_or(0);
        live.max(dead).max(self.tombstone_floor).max(1)
    }

    /// The index of the last change to exactly `key`. Never 0.
    pub fn key_index(&self, key: &str) -> u64 {
        let i = match self.entries.get(key) {
            Some(e) => e.modify_index,
            None => self.tombstones.get(key).copied().unwrap_or(0),
        };
        i.max(self.tombstone_floor).max(1)
    }

    /// The index of the last session created or invalidated. Never 0.
    pub fn sessions_index(&self) -> u64 {
        self.sessions_index.max(1)
    }

    /// Sessions of a node.
    pub fn node_sessions<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a Session> + 'a {
        self.sessions.values().filter(move |s| s.node == node)
    }

    /// When `key` leaves its lock-delay, if it is in one at `now`.
    pub fn lock_delay_until(&self, key: &str, now: Millis) -> Option<Millis> {
        self.lock_delays.get(key).copied().filter(|t| *t > now)
    }

    /// Commands for what is due at `now`: sessions whose TTL ran out.
    pub fn due(&self, now: Millis) -> Vec<crate::state::Command> {
        self.deadlines
            .iter()
            .take_while(|(t, _)| *t <= now)
            .map(|(_, id)| crate::state::Command::Session(SessionOp::Expire { id: id.clone(), now }))
            .collect()
    }

    /// The earliest time something becomes due.
    pub fn next_deadline(&self) -> Option<Millis> {
        self.deadlines.get_min().map(|(t, _)| *t)
    }

    /// Apply a KV change at index `idx`. On error nothing changed.
    pub fn apply_kv(&mut self, op: &KvOp, idx: u64) -> Result<(), KvError> {
        match op {
            KvOp::Set { key, value, flags, mode, now } => {
                self.set(key, value, *flags, mode, *now, idx)?;
                self.expire_lock_delays(*now);
            }
            KvOp::Delete { key, recurse, cas, now } => {
                if *recurse {
                    let keys: Vec<String> = self.list(key).map(|e| e.key.clone()).collect();
                    for k in keys {
                        self.remove(&k, idx);
                    }
                } else {
                    if let Some(cas) = cas {
                        // Consul: a CAS delete of a missing key "succeeds"; of a changed one fails.
                        if self.entries.get(key.as_str()).is_some_and(|e| e.modify_index != *cas) {
                            return Err(KvError::NotApplied);
                        }
                    }
                    self.remove(key, idx);
                }
                self.expire_lock_delays(*now);
            }
        }
        Ok(())
    }

    /// Apply a transaction at index `idx`: every operation in order, each seeing the changes
    /// of those before it, all or none. Returns one result per operation that has one, as
    /// Consul's `Results` (writes and checks: the key's entry without its value; `get`,
    /// `get-or-empty`, `get-tree`: with it; deletes and `check-not-exists`: none). As Consul,
    /// every operation is tried, so the error lists each that failed; on error nothing changed.
    /// Deterministic: it reads only the state and the operations (whose writes carry `now`).
    pub fn apply_txn(&mut self, ops: &[TxnOp], idx: u64) -> Result<Vec<KvEntry>, KvError> {
        let mut next = self.clone();
        let mut results = Vec::new();
        let mut errors = Vec::new();
        let without_value = |e: &KvEntry| KvEntry { value: KvValue::default(), ..e.clone() };
        for (op_index, t) in ops.iter().enumerate() {
            match next.txn_op(t, idx) {
                Ok(found) => results.extend(found.into_iter().map(
                    |(e, with_value)| {
                        if with_value { e } else { without_value(&e) }
                    },
                )),
                Err(what) => errors.push(TxnError { op_index, what }),
            }
        }
        if !errors.is_empty() {
            return Err(KvError::TxnFailed(errors));
        }
        *self = next;
        Ok(results)
    }

    /// One operation of a transaction: its result entries (and whether with their values), or
    /// why it failed (Consul's message). On error nothing changed.
    fn txn_op(&mut self, t: &TxnOp, idx: u64) -> Result<Vec<(KvEntry, bool)>, String> {
        let entry = |kv: &Self, key: &str| kv.entries.get(key).map(|e| KvEntry::clone(e));
        match t {
            TxnOp::Kv(op @ KvOp::Set { key, mode, now, .. }) => {
                if matches!(mode, SetMode::Acquire(_)) && self.lock_delay_until(key, *now).is_some() {
                    return Err(format!("failed to lock key {key:?} due to lock delay"));
                }
                self.apply_kv(op, idx).map_err(|e| match (e, mode) {
                    (KvError::NotApplied, SetMode::Cas(_)) => format!("failed to set key {key:?}, index is stale"),
                    (KvError::NotApplied, SetMode::Acquire(_)) => {
                        format!("failed to lock key {key:?}, lock is already held")
                    }
                    (KvError::NotApplied, SetMode::Release(_)) => {
                        format!("failed to unlock key {key:?}, lock isn't held, or is held by another session")
                    }
                    (e, _) => e.to_string(),
                })?;
                Ok(entry(self, key).map(|e| (e, false)).into_iter().collect())
            }
            TxnOp::Kv(op @ KvOp::Delete { key, .. }) => {
                self.apply_kv(op, idx).map_err(|e| match e {
                    KvError::NotApplied => format!("failed to delete key {key:?}, index is stale"),
                    e => e.to_string(),
                })?;
                Ok(Vec::new())
            }
            TxnOp::CheckIndex { key, index } => match entry(self, key) {
                Some(e) if e.modify_index == *index => Ok(vec![(e, false)]),
                Some(e) => Err(format!(
                    "failed index check for key {key:?}, current modify index {} != {index}",
                    e.modify_index
                )),
                None => Err(format!("failed to check index, key {key:?} doesn't exist")),
            },
            TxnOp::CheckSession { key, session } => match entry(self, key) {
                Some(e) if e.session.as_deref().unwrap_or_default() == session => Ok(vec![(e, false)]),
                Some(e) => Err(format!(
                    "failed session check for key {key:?}, current session {:?} != {session:?}",
                    e.session.as_deref().unwrap_or_default()
                )),
                None => Err(format!("failed to check session, key {key:?} doesn't exist")),
            },
            TxnOp::CheckNotExists { key } => match self.entries.contains_key(key.as_str()) {
                true => Err(format!("key {key:?} exists")),
                false => Ok(Vec::new()),
            },
            TxnOp::Get { key } => match entry(self, key) {
                Some(e) => Ok(vec![(e, true)]),
                None => Err(format!("key {key:?} doesn't exist")),
            },
            TxnOp::GetOrEmpty { key } => {
                let empty = || KvEntry {
                    key: key.clone(),
                    value: KvValue::default(),
                    flags: 0,
                    create_index: 0,
                    modify_index: 0,
                    lock_index: 0,
                    session: None,
                };
                Ok(vec![(entry(self, key).unwrap_or_else(empty), true)])
            }
            TxnOp::GetTree { prefix } => Ok(self.list(prefix).map(|e| (e.clone(), true)).collect()),
        }
    }

    /// Apply a session change at index `idx`. On error nothing changed. (Whether the session's
    /// node exists is checked by [`crate::state::State::apply`], which knows the catalog.)
    pub fn apply_session(&mut self, op: &SessionOp, idx: u64) -> Result<(), KvError> {
        match op {
            SessionOp::Create { session, now } => {
                if self.sessions.contains_key(&session.id) {
                    return Err(KvError::DuplicateSession(session.id.clone()));
                }
                let mut s = session.clone();
                s.create_index = idx;
                s.modify_index = idx;
                s.expires_at = (s.ttl_ms > 0).then(|| now + s.ttl_ms * TTL_MULTIPLIER);
                if let Some(t) = s.expires_at {
                    self.deadlines.insert((t, s.id.clone()));
                }
                self.sessions.insert(s.id.clone(), s);
                self.sessions_index = idx;
                self.expire_lock_delays(*now);
            }
            SessionOp::Destroy { id, now } => {
                self.invalidate(id, *now, idx);
                self.expire_lock_delays(*now);
            }
            SessionOp::Renew { id, now } => {
                let Some(s) = self.sessions.get_mut(id) else {
                    return Err(KvError::UnknownSession(id.clone()));
                };
                if s.ttl_ms > 0 {
                    let old = s.expires_at;
                    let new = now + s.ttl_ms * TTL_MULTIPLIER;
                    s.expires_at = Some(new);
                    if let Some(t) = old {
                        self.deadlines.remove(&(t, id.clone()));
                    }
                    self.deadlines.insert((new, id.clone()));
                }
            }
            SessionOp::Expire { id, now } => {
                match self.sessions.get(id).and_then(|s| s.expires_at) {
                    Some(t) if t <= *now => {}
                    _ => return Err(KvError::NotDue(id.clone())),
                }
                self.invalidate(id, *now, idx);
                self.expire_lock_delays(*now);
            }
        }
        Ok(())
    }

    fn set(
        &mut self,
        key: &str,
        value: &KvValue,
        flags: u64,
        mode: &SetMode,
        now: Millis,
        idx: u64,
    ) -> Result<(), KvError> {
        let existing = self.entries.get(key);
        let held_before = existing.and_then(|e| e.session.clone());
        let mut session = held_before.clone();
        let mut lock_index = existing.map_or(0, |e| e.lock_index);
        match mode {
            SetMode::Plain => {}
            SetMode::Cas(0) => {
                if existing.is_some() {
                    return Err(KvError::NotApplied);
                }
            }
            SetMode::Cas(n) => {
                if existing.map(|e| e.modify_index) != Some(*n) {
                    return Err(KvError::NotApplied);
                }
            }
            SetMode::Acquire(s) => {
                // As Consul: the lock-delay is checked before the session.
                if self.lock_delay_until(key, now).is_some() {
                    return Err(KvError::NotApplied);
                }
                if s.is_empty() {
                    return Err(KvError::MissingSession);
                }
                if !self.sessions.contains_key(s) {
                    return Err(KvError::InvalidSession(s.clone()));
                }
                match &session {
                    Some(holder) if holder == s => {}
                    Some(_) => return Err(KvError::NotApplied),
                    None => {
                        lock_index += 1;
                        session = Some(s.clone());
                    }
                }
            }
            SetMode::Release(s) => {
                if s.is_empty() {
                    return Err(KvError::MissingSession);
                }
                if session.as_deref() != Some(s.as_str()) {
                    return Err(KvError::NotApplied);
                }
                session = None;
            }
        }
        if let Some(e) = existing
            && e.value == *value
            && e.flags == flags
            && e.session == session
            && e.lock_index == lock_index
        {
            return Ok(()); // nothing changes: the index stays (Consul skips the write too)
        }
        let entry = KvEntry {
            key: key.to_owned(),
            value: value.clone(),
            flags,
            create_index: existing.map_or(idx, |e| e.create_index),
            modify_index: idx,
            lock_index,
            session,
        };
        let key: Arc<str> = Arc::from(key);
        if held_before != entry.session {
            if let Some(s) = held_before {
                self.held.remove(&(s, key.clone()));
            }
            if let Some(s) = &entry.session {
                self.held.insert((s.clone(), key.clone()));
            }
        }
        self.entries.insert(key.clone(), Arc::new(entry));
        self.tombstones.remove(&*key);
        self.index = idx;
        Ok(())
    }

    fn remove(&mut self, key: &str, idx: u64) {
        if let Some((k, e)) = self.entries.remove_with_key(key) {
            if let Some(s) = &e.session {
                self.held.remove(&(s.clone(), k));
            }
            self.tombstones.insert(key.to_owned(), idx);
            self.index = idx;
            self.prune_tombstones();
        }
    }

    /// Drop the older half of the tombstones once there are too many; the floor keeps every
    /// prefix's index from going back.
    fn prune_tombstones(&mut self) {
        if self.tombstones.len() <= MAX_TOMBSTONES {
            return;
        }
        let mut idx: Vec<u64> = self.tombstones.values().copied().collect();
        idx.sort_unstable();
        let cut = idx[idx.len() / 2];
        let old: Vec<String> = self.tombstones.iter().filter(|(_, i)| **i <= cut).map(|(k, _)| k.clone()).collect();
        for k in old {
            self.tombstones.remove(&k);
        }
        self.tombstone_floor = self.tombstone_floor.max(cut);
    }

    /// Remove a session: release or delete its keys and start their lock-delay.
    fn invalidate(&mut self, id: &str, now: Millis, idx: u64) {
        let Some(s) = self.sessions.remove(id) else { return };
        if let Some(t) = s.expires_at {
            self.deadlines.remove(&(t, id.to_owned()));
        }
        self.sessions_index = idx;
        let held: Vec<Arc<str>> = self
            .held
            .range((id.to_owned(), Arc::from(""))..)
            .take_while(|(s, _)| s == id)
            .map(|(_, k)| k.clone())
            .collect();
        let delay_ms = s.lock_delay_ns / 1_000_000;
        for key in held {
            match s.behavior {
                Behavior::Delete => self.remove(&key, idx),
                Behavior::Release => {
                    if let Some(e) = self.entries.get_mut(&*key) {
                        let e = Arc::make_mut(e);
                        e.session = None;
                        e.modify_index = idx;
                        self.index = idx;
                    }
                    self.held.remove(&(id.to_owned(), key.clone()));
                }
            }
            if delay_ms > 0 {
                self.lock_delays.insert(key.to_string(), now + delay_ms);
            }
        }
    }

    fn expire_lock_delays(&mut self, now: Millis) {
        if self.lock_delays.values().all(|t| *t > now) {
            return;
        }
        let done: Vec<String> = self.lock_delays.iter().filter(|(_, t)| **t <= now).map(|(k, _)| k.clone()).collect();
        for k in done {
            self.lock_delays.remove(&k);
        }
    }
}

/// Parse a session TTL as Consul does: a Go duration within 10s..=24h, or `""`/`0` for none.
/// Returns the TTL as given (trimmed) and in milliseconds.
pub fn parse_ttl(s: &str) -> Result<(String, u64), KvError> {
    let s = s.trim();
    if matches!(s, "" | "0" | "0s" | "0m" | "0h") {
        return Ok((String::new(), 0));
    }
    let d = crate::registrator::parse_go_duration(s).map_err(|_| KvError::InvalidTtl(s.to_owned()))?;
    let ms = d.as_millis() as u64;
    if !(MIN_TTL_MS..=MAX_TTL_MS).contains(&ms) {
        return Err(KvError::InvalidTtl(s.to_owned()));
    }
    Ok((s.to_owned(), ms))
}

/// Parse a lock-delay the way Consul's session/create does: a Go duration string or a number
/// of nanoseconds, where anything under 1000 (ns) is taken as seconds (`"15s"`, `15`, and
/// `15000000000` all mean 15 s). At most 60 s.
pub fn parse_lock_delay(v: &serde_json::Value) -> Result<u64, KvError> {
    let bad = || KvError::InvalidLockDelay(v.to_string());
    let ns: u64 = match v {
        serde_json::Value::String(s) => {
            let d = crate::registrator::parse_go_duration(s).map_err(|_| bad())?;
            u64::try_from(d.as_nanos()).map_err(|_| bad())?
        }
        serde_json::Value::Number(n) => match (n.as_u64(), n.as_f64()) {
            (Some(u), _) => u,
            (None, Some(f)) if f >= 0.0 && f.is_finite() => f as u64,
            _ => return Err(bad()),
        },
        _ => return Err(bad()),
    };
    let ns = if ns < 1000 { ns * 1_000_000_000 } else { ns };
    if ns > MAX_LOCK_DELAY_NS {
        return Err(bad());
    }
    Ok(ns)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn put(kv: &mut KvState, idx: u64, key: &str, v: &str, mode: SetMode, now: Millis) -> Result<(), KvError> {
        let op = KvOp::Set { key: key.into(), value: KvValue::from(v.as_bytes()), flags: 0, mode, now };
        kv.apply_kv(&op, idx)
    }

    fn del(kv: &mut KvState, idx: u64, key: &str, recurse: bool, cas: Option<u64>) -> Result<(), KvError> {
        kv.apply_kv(&KvOp::Delete { key: key.into(), recurse, cas, now: 0 }, idx)
    }

    fn tset(k: &str, v: &str, mode: SetMode, now: Millis) -> TxnOp {
        TxnOp::Kv(KvOp::Set { key: k.into(), value: KvValue::from(v.as_bytes()), flags: 0, mode, now })
    }

    fn failed(r: Result<Vec<KvEntry>, KvError>) -> Vec<(usize, String)> {
        match r {
            Err(KvError::TxnFailed(errors)) => errors.into_iter().map(|e| (e.op_index, e.what)).collect(),
            other => panic!("expected a failed transaction: {other:?}"),
        }
    }

    #[test]
    fn a_transaction_applies_all_or_nothing() {
        let mut kv = KvState::default();
        put(&mut kv, 1, "a", "1", SetMode::Plain, 0).unwrap();
        // The third and fourth operations fail: neither earlier write is kept, and every
        // failure is named (as Consul, which tries every operation).
        let failing = [
            tset("b", "2", SetMode::Plain, 0),
            TxnOp::CheckIndex { key: "a".into(), index: 1 },
            TxnOp::CheckNotExists { key: "a".into() },
            TxnOp::CheckIndex { key: "b".into(), index: 9 },
        ];
        let before = kv.clone();
        assert_eq!(
            failed(kv.apply_txn(&failing, 2)),
            vec![
                (2, r#"key "a" exists"#.to_string()),
                (3, r#"failed index check for key "b", current modify index 2 != 9"#.to_string()),
            ],
            "the check on b sees the set before it"
        );
        assert_eq!(kv, before, "nothing applied");
        let stale = [tset("a", "x", SetMode::Cas(7), 0), TxnOp::Get { key: "nope".into() }];
        assert_eq!(
            failed(kv.apply_txn(&stale, 2)),
            vec![
                (0, r#"failed to set key "a", index is stale"#.to_string()),
                (1, r#"key "nope" doesn't exist"#.to_string()),
            ]
        );
        let missing = [TxnOp::CheckIndex { key: "zz".into(), index: 1 }];
        assert_eq!(failed(kv.apply_txn(&missing, 2))[0].1, r#"failed to check index, key "zz" doesn't exist"#);
        assert_eq!(kv, before, "nothing applied");

        // All hold: every write at the transaction's index; reads see the writes before them.
        let ok = [
            TxnOp::CheckIndex { key: "a".into(), index: 1 },
            tset("b", "2", SetMode::Plain, 0),
            tset("a", "3", SetMode::Cas(1), 0),
            TxnOp::Get { key: "a".into() },
            TxnOp::Kv(KvOp::Delete { key: "zz".into(), recurse: false, cas: None, now: 0 }),
            TxnOp::CheckNotExists { key: "zz".into() },
            TxnOp::CheckSession { key: "a".into(), session: String::new() },
            TxnOp::GetTree { prefix: String::new() },
            TxnOp::GetOrEmpty { key: "none".into() },
        ];
        let results = kv.apply_txn(&ok, 3).unwrap();
        assert_eq!(kv.entries["a"].value.as_bytes(), b"3");
        assert_eq!((kv.entries["a"].modify_index, kv.entries["b"].modify_index), (3, 3));
        let shown: Vec<(&str, &[u8], u64)> =
            results.iter().map(|e| (e.key.as_str(), e.value.as_bytes(), e.modify_index)).collect();
        assert_eq!(
            shown,
            vec![
                ("a", &b""[..], 1), // check-index: the entry, no value
                ("b", b"", 3),      // set: no value
                ("a", b"", 3),      // cas
                ("a", b"3", 3),     // get: with its value
                // delete and check-not-exists: no result
                ("a", b"", 3), // check-session
                ("a", b"3", 3),
                ("b", b"2", 3), // get-tree: values
                ("none", b"", 0),
            ]
        );
        assert_eq!(KvValue::from_base64("MQ==").unwrap().as_bytes(), b"1");
        assert!(KvValue::from_base64("not base64!").is_err());

        // A transaction of reads changes nothing, whatever its index.
        let before = kv.clone();
        kv.apply_txn(&[TxnOp::GetTree { prefix: "a".into() }], 99).unwrap();
        assert_eq!(kv, before);
    }

    #[test]
    fn transaction_locks_follow_the_acquire_rules() {
        let mut kv = KvState::default();
        create(&mut kv, 1, session("s1", Behavior::Release, 1000, 0), 0);
        create(&mut kv, 2, session("s2", Behavior::Release, 0, 0), 0);
        let lock = |s: &str, now| tset("l", "v", SetMode::Acquire(s.into()), now);
        let unlock = |s: &str| tset("l", "v", SetMode::Release(s.into()), 0);
        let r = kv.apply_txn(&[lock("s1", 10), TxnOp::CheckSession { key: "l".into(), session: "s1".into() }], 3);
        let r = r.unwrap();
        assert_eq!((r[0].lock_index, r[0].session.as_deref(), r[0].modify_index), (1, Some("s1"), 3));
        assert_eq!(r[1].session.as_deref(), Some("s1"));
        // The holder locks again: nothing changes; another session is refused.
        kv.apply_txn(&[lock("s1", 10)], 4).unwrap();
        assert_eq!((kv.entries["l"].lock_index, kv.entries["l"].modify_index), (1, 3));
        let before = kv.clone();
        assert_eq!(
            failed(kv.apply_txn(&[unlock("s2"), lock("s2", 10), lock("", 10), lock("nope", 10)], 5)),
            vec![
                (0, r#"failed to unlock key "l", lock isn't held, or is held by another session"#.into()),
                (1, r#"failed to lock key "l", lock is already held"#.into()),
                (2, "missing session".into()),
                (3, r#"invalid session "nope""#.into()),
            ]
        );
        assert_eq!(
            failed(kv.apply_txn(&[TxnOp::CheckSession { key: "l".into(), session: "s2".into() }], 5))[0].1,
            r#"failed session check for key "l", current session "s1" != "s2""#
        );
        assert_eq!(kv, before);
        // Unlocked, then locked by another session in the same transaction: LockIndex 2.
        let r = kv.apply_txn(&[unlock("s1"), lock("s2", 20)], 5).unwrap();
        assert_eq!((r[0].lock_index, r[0].session.as_deref()), (1, None));
        assert_eq!((r[1].lock_index, r[1].session.as_deref(), r[1].create_index), (2, Some("s2"), 3));
        assert!(kv.held.contains(&("s2".to_string(), Arc::from("l"))));
        // s1's lock-delay: destroying it while it holds a key delays the key's next lock.
        kv.apply_txn(&[unlock("s2"), lock("s1", 30)], 6).unwrap();
        kv.apply_session(&SessionOp::Destroy { id: "s1".into(), now: 100 }, 7).unwrap();
        assert_eq!(
            failed(kv.apply_txn(&[lock("s2", 500)], 8)),
            vec![(0, r#"failed to lock key "l" due to lock delay"#.into())]
        );
        kv.apply_txn(&[lock("s2", 1100)], 8).unwrap();
        assert_eq!(kv.entries["l"].lock_index, 4);
    }

    fn session(id: &str, behavior: Behavior, lock_delay_ms: u64, ttl_ms: u64) -> Session {
        Session {
            id: id.into(),
            name: String::new(),
            node: "n1".into(),
            lock_delay_ns: lock_delay_ms * 1_000_000,
            behavior,
            ttl: if ttl_ms > 0 { format!("{}s", ttl_ms / 1000) } else { String::new() },
            ttl_ms,
            node_checks: vec!["serfHealth".into()],
            service_checks: vec![],
            create_index: 0,
            modify_index: 0,
            expires_at: None,
        }
    }

    fn create(kv: &mut KvState, idx: u64, s: Session, now: Millis) {
        kv.apply_session(&SessionOp::Create { session: s, now }, idx).unwrap();
    }

    #[test]
    fn cas_creates_only_when_absent_and_needs_the_current_index() {
        let mut kv = KvState::default();
        assert_eq!(put(&mut kv, 1, "foo", "bar", SetMode::Cas(50), 0), Err(KvError::NotApplied));
        assert_eq!(put(&mut kv, 2, "foo", "bar", SetMode::Cas(0), 0), Ok(()));
        assert_eq!(put(&mut kv, 3, "foo", "again", SetMode::Cas(0), 0), Err(KvError::NotApplied));
        assert_eq!(put(&mut kv, 4, "foo", "bar2", SetMode::Cas(1), 0), Err(KvError::NotApplied));
        assert_eq!(put(&mut kv, 5, "foo", "bar2", SetMode::Cas(2), 0), Ok(()));
        let e = kv.get("foo").unwrap();
        assert_eq!((e.value.as_bytes(), e.create_index, e.modify_index), (&b"bar2"[..], 2, 5));
        // delete with a stale cas fails and changes nothing; with the current one it deletes
        assert_eq!(del(&mut kv, 6, "foo", false, Some(4)), Err(KvError::NotApplied));
        assert_eq!(del(&mut kv, 6, "foo", false, Some(0)), Err(KvError::NotApplied), "cas=0 never deletes");
        assert!(kv.get("foo").is_some());
        assert_eq!(del(&mut kv, 7, "foo", false, Some(5)), Ok(()));
        assert!(kv.get("foo").is_none());
    }

    #[test]
    fn an_unchanged_write_keeps_the_index() {
        let mut kv = KvState::default();
        put(&mut kv, 3, "a", "1", SetMode::Plain, 0).unwrap();
        put(&mut kv, 4, "a", "1", SetMode::Plain, 0).unwrap();
        assert_eq!(kv.get("a").unwrap().modify_index, 3);
        assert_eq!(kv.index, 3);
    }

    #[test]
    fn keys_with_a_separator_stop_at_the_next_level() {
        let mut kv = KvState::default();
        for (i, k) in ["bar", "base/foo", "base/base/foo", "base/base/zed"].iter().enumerate() {
            put(&mut kv, i as u64 + 1, k, "x", SetMode::Plain, 0).unwrap();
        }
        assert_eq!(kv.keys("base/", "/"), vec!["base/base/", "base/foo"]);
        assert_eq!(kv.keys("base/", ""), vec!["base/base/foo", "base/base/zed", "base/foo"]);
        assert_eq!(kv.keys("", "/"), vec!["bar", "base/"]);
        assert!(kv.keys("nope", "/").is_empty());
    }

    #[test]
    fn prefix_and_key_indexes_move_only_for_their_keys_and_see_deletes() {
        let mut kv = KvState::default();
        assert_eq!(kv.prefix_index(""), 1, "never 0");
        assert_eq!(kv.key_index("x"), 1);
        put(&mut kv, 5, "app/a", "1", SetMode::Plain, 0).unwrap();
        put(&mut kv, 6, "other/b", "1", SetMode::Plain, 0).unwrap();
        assert_eq!(kv.prefix_index("app/"), 5);
        assert_eq!(kv.prefix_index("other/"), 6);
        assert_eq!(kv.prefix_index(""), 6);
        del(&mut kv, 9, "app/a", false, None).unwrap();
        assert_eq!(kv.prefix_index("app/"), 9, "a delete moves the prefix's index");
        assert_eq!(kv.key_index("app/a"), 9);
        assert_eq!(kv.prefix_index("other/"), 6);
        del(&mut kv, 10, "missing", false, None).unwrap();
        assert_eq!(kv.prefix_index(""), 9, "deleting nothing changes nothing");
        put(&mut kv, 11, "app/a", "2", SetMode::Plain, 0).unwrap();
        assert!(kv.tombstones.is_empty());
        assert_eq!(kv.key_index("app/a"), 11);
    }

    #[test]
    fn pruned_tombstones_never_let_an_index_go_back() {
        let mut kv = KvState::default();
        let n = MAX_TOMBSTONES as u64 + 1;
        for i in 0..n {
            put(&mut kv, 2 * i + 1, &format!("k/{i:05}"), "x", SetMode::Plain, 0).unwrap();
        }
        let mut last = 0;
        for i in 0..n {
            del(&mut kv, 2 * n + i, &format!("k/{i:05}"), false, None).unwrap();
            let pi = kv.prefix_index("k/00000");
            assert!(pi >= last, "index went back: {pi} < {last}");
            last = pi;
        }
        assert!(kv.tombstones.len() <= MAX_TOMBSTONES);
        assert!(kv.tombstone_floor >= 2 * n);
        assert!(kv.prefix_index("k/00000") >= 2 * n, "the first tombstone was pruned; the floor covers it");
    }

    #[test]
    fn recursive_delete_takes_the_prefix_only() {
        let mut kv = KvState::default();
        for (i, k) in ["foo1", "foo2", "foo3", "fo", "zap"].iter().enumerate() {
            put(&mut kv, i as u64 + 1, k, "x", SetMode::Plain, 0).unwrap();
        }
        del(&mut kv, 10, "foo", true, None).unwrap();
        let left: Vec<&str> = kv.entries.keys().map(|k| &**k).collect();
        assert_eq!(left, vec!["fo", "zap"]);
        assert_eq!(kv.prefix_index("foo"), 10);
    }

    #[test]
    fn acquire_and_release_follow_consul() {
        let mut kv = KvState::default();
        assert_eq!(
            put(&mut kv, 1, "foo", "bar", SetMode::Acquire("foo".into()), 0),
            Err(KvError::InvalidSession("foo".into()))
        );
        assert_eq!(put(&mut kv, 1, "foo", "bar", SetMode::Acquire(String::new()), 0), Err(KvError::MissingSession));
        assert!(kv.entries.is_empty(), "failed writes change nothing");
        create(&mut kv, 2, session("s1", Behavior::Release, 0, 0), 0);
        create(&mut kv, 3, session("s2", Behavior::Release, 0, 0), 0);
        assert_eq!(put(&mut kv, 4, "foo", "1", SetMode::Acquire("s1".into()), 0), Ok(()));
        assert_eq!(kv.get("foo").unwrap().lock_index, 1);
        assert_eq!(put(&mut kv, 5, "foo", "2", SetMode::Acquire("s2".into()), 0), Err(KvError::NotApplied));
        assert_eq!(put(&mut kv, 6, "foo", "3", SetMode::Acquire("s1".into()), 0), Ok(()), "the holder re-writes");
        let e = kv.get("foo").unwrap();
        assert_eq!((e.value.as_bytes(), e.lock_index, e.session.as_deref()), (&b"3"[..], 1, Some("s1")));
        assert_eq!(put(&mut kv, 7, "foo", "x", SetMode::Release("foo".into()), 0), Err(KvError::NotApplied));
        assert_eq!(put(&mut kv, 7, "foo", "x", SetMode::Release("s2".into()), 0), Err(KvError::NotApplied));
        assert_eq!(put(&mut kv, 8, "foo", "plain", SetMode::Plain, 0), Ok(()), "plain writes ignore locks");
        assert_eq!(kv.get("foo").unwrap().session.as_deref(), Some("s1"), "and keep the lock");
        assert_eq!(put(&mut kv, 9, "foo", "4", SetMode::Release("s1".into()), 0), Ok(()));
        let e = kv.get("foo").unwrap();
        assert_eq!((e.lock_index, e.session.as_deref()), (1, None), "release keeps LockIndex");
        assert_eq!(put(&mut kv, 10, "foo", "5", SetMode::Acquire("s2".into()), 0), Ok(()));
        assert_eq!(kv.get("foo").unwrap().lock_index, 2);
        assert_eq!(put(&mut kv, 11, "nokey", "5", SetMode::Release("s2".into()), 0), Err(KvError::NotApplied));
    }

    #[test]
    fn destroy_releases_and_starts_the_lock_delay() {
        let mut kv = KvState::default();
        create(&mut kv, 1, session("s1", Behavior::Release, 1000, 0), 0);
        create(&mut kv, 2, session("s2", Behavior::Release, 0, 0), 0);
        put(&mut kv, 3, "lock", "me", SetMode::Acquire("s1".into()), 100).unwrap();
        put(&mut kv, 4, "other", "x", SetMode::Plain, 100).unwrap();
        kv.apply_session(&SessionOp::Destroy { id: "s1".into(), now: 1000 }, 5).unwrap();
        assert!(!kv.sessions.contains_key("s1"));
        assert_eq!(kv.sessions_index(), 5);
        let e = kv.get("lock").unwrap();
        assert_eq!((e.session.as_deref(), e.modify_index, e.value.as_bytes()), (None, 5, &b"me"[..]));
        assert_eq!(kv.lock_delay_until("lock", 1000), Some(2000));
        assert_eq!(put(&mut kv, 6, "lock", "s2", SetMode::Acquire("s2".into()), 1999), Err(KvError::NotApplied));
        assert_eq!(put(&mut kv, 6, "lock", "s2", SetMode::Acquire("s3".into()), 1999), Err(KvError::NotApplied));
        assert_eq!(put(&mut kv, 6, "lock", "s2", SetMode::Plain, 1999), Ok(()), "plain writes are not delayed");
        assert_eq!(put(&mut kv, 7, "lock", "s2", SetMode::Acquire("s2".into()), 2000), Ok(()));
        assert!(kv.lock_delays.is_empty(), "an ended delay is forgotten");
        // destroying an unknown session is a no-op
        let before = kv.clone();
        kv.apply_session(&SessionOp::Destroy { id: "nope".into(), now: 3000 }, 8).unwrap();
        assert_eq!(kv, before);
    }

    #[test]
    fn delete_behavior_deletes_held_keys() {
        let mut kv = KvState::default();
        create(&mut kv, 1, session("s1", Behavior::Delete, 0, 0), 0);
        put(&mut kv, 2, "eph", "1", SetMode::Acquire("s1".into()), 0).unwrap();
        put(&mut kv, 3, "keep", "1", SetMode::Plain, 0).unwrap();
        kv.apply_session(&SessionOp::Destroy { id: "s1".into(), now: 10 }, 4).unwrap();
        assert!(kv.get("eph").is_none());
        assert!(kv.get("keep").is_some());
        assert_eq!(kv.key_index("eph"), 4);
        assert!(kv.lock_delays.is_empty(), "lock-delay 0 records nothing");
    }

    #[test]
    fn ttl_sessions_come_due_after_twice_the_ttl_and_renew_pushes_it_back() {
        let mut kv = KvState::default();
        create(&mut kv, 1, session("s1", Behavior::Release, 0, 10_000), 1_000);
        create(&mut kv, 2, session("s2", Behavior::Release, 0, 0), 1_000);
        assert_eq!(kv.next_deadline(), Some(21_000));
        assert!(kv.due(20_999).is_empty());
        kv.apply_session(&SessionOp::Renew { id: "s1".into(), now: 15_000 }, 3).unwrap();
        assert_eq!(kv.sessions_index(), 2, "renewals do not wake session watchers");
        assert_eq!(kv.next_deadline(), Some(35_000));
        assert!(kv.due(21_000).is_empty());
        // an expiry found due before a renewal landed is rejected
        let stale = SessionOp::Expire { id: "s1".into(), now: 21_000 };
        assert_eq!(kv.apply_session(&stale, 4), Err(KvError::NotDue("s1".into())));
        let due = kv.due(35_000);
        assert_eq!(due.len(), 1);
        let crate::state::Command::Session(op) = &due[0] else { panic!("{due:?}") };
        kv.apply_session(op, 5).unwrap();
        assert_eq!(kv.sessions.keys().collect::<Vec<_>>(), vec!["s2"]);
        assert_eq!(kv.next_deadline(), None);
        assert_eq!(
            kv.apply_session(&SessionOp::Renew { id: "s1".into(), now: 0 }, 6),
            Err(KvError::UnknownSession("s1".into()))
        );
    }

    /// The index of the keys each session holds stays equal to a walk of every key through
    /// random acquires, releases, writes, deletes and session invalidations (both behaviors),
    /// and an invalidation frees exactly the keys the walk finds.
    #[test]
    fn held_keys_index_matches_a_walk_of_every_key() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let mut kv = KvState::default();
        let walk = |kv: &KvState| -> OrdSet<(String, Arc<str>)> {
            kv.entries.iter().filter_map(|(k, e)| e.session.clone().map(|s| (s, k.clone()))).collect()
        };
        let (mut idx, mut most) = (0, 0);
        for _ in 0..3_000 {
            idx += 1;
            let key = format!("k/{}", rng.random_range(0..40));
            let sid = format!("s{}", rng.random_range(0..5));
            let _ = match rng.random_range(0..7) {
                0 => put(&mut kv, idx, &key, "v", SetMode::Acquire(sid.clone()), idx),
                1 => put(&mut kv, idx, &key, "v", SetMode::Release(sid.clone()), idx),
                2 => put(&mut kv, idx, &key, "w", SetMode::Plain, idx),
                3 => del(&mut kv, idx, &key, rng.random_bool(0.2), None),
                4 if !kv.sessions.contains_key(&sid) => {
                    let behavior = if rng.random_bool(0.5) { Behavior::Release } else { Behavior::Delete };
                    kv.apply_session(&SessionOp::Create { session: session(&sid, behavior, 0, 0), now: idx }, idx)
                }
                _ => {
                    let freed: Vec<Arc<str>> =
                        walk(&kv).into_iter().filter(|(s, _)| *s == sid).map(|(_, k)| k).collect();
                    let r = kv.apply_session(&SessionOp::Destroy { id: sid.clone(), now: idx }, idx);
                    for k in freed {
                        assert!(kv.get(&k).is_none_or(|e| e.session.is_none()), "{k} freed");
                    }
                    r
                }
            };
            assert_eq!(kv.held, walk(&kv), "after op {idx}");
            most = most.max(kv.held.len());
        }
        assert!(most >= 5, "keys were held along the way: at most {most}");
    }

    #[test]
    fn deadlines_are_rebuilt_after_a_round_trip() {
        let mut kv = KvState::default();
        create(&mut kv, 1, session("s1", Behavior::Release, 0, 10_000), 0);
        put(&mut kv, 2, "bin", "\u{0}\u{ff}", SetMode::Plain, 0).unwrap();
        put(&mut kv, 3, "lock", "x", SetMode::Acquire("s1".into()), 0).unwrap();
        let mut back: KvState = serde_json::from_str(&serde_json::to_string(&kv).unwrap()).unwrap();
        assert_eq!(back.next_deadline(), None);
        back.rebuild();
        assert_eq!(back, kv, "the derived indexes (deadlines, held keys) come back");
        assert_eq!(back.held.len(), 1);
        assert_eq!(back.next_deadline(), Some(20_000));
    }

    #[test]
    fn ttl_and_lock_delay_parse_like_consul() {
        assert_eq!(parse_ttl("20s"), Ok(("20s".into(), 20_000)));
        assert_eq!(parse_ttl(""), Ok((String::new(), 0)));
        assert_eq!(parse_ttl("0s"), Ok((String::new(), 0)));
        assert_eq!(parse_ttl("24h"), Ok(("24h".into(), 86_400_000)));
        assert!(parse_ttl("9s").is_err());
        assert!(parse_ttl("25h").is_err());
        assert!(parse_ttl("ten").is_err());
        assert!(parse_ttl("10").is_err());
        assert_eq!(parse_lock_delay(&json!("15s")), Ok(15_000_000_000));
        assert_eq!(parse_lock_delay(&json!("1ms")), Ok(1_000_000));
        assert_eq!(parse_lock_delay(&json!(15)), Ok(15_000_000_000), "small numbers are seconds");
        assert_eq!(parse_lock_delay(&json!(2_000_000_000u64)), Ok(2_000_000_000), "large ones nanoseconds");
        assert_eq!(parse_lock_delay(&json!(0)), Ok(0));
        assert!(parse_lock_delay(&json!("61s")).is_err());
        assert!(parse_lock_delay(&json!(-1)).is_err());
        assert!(parse_lock_delay(&json!(true)).is_err());
        assert_eq!(Behavior::parse("Delete"), Ok(Behavior::Delete));
        assert!(Behavior::parse("keep").is_err());
    }
}

#[cfg(test)]
mod store_tests {
    use super::*;
    use crate::model::{AgentId, Resources};
    use crate::state::{Agent, ApplyError, Command, RedbLog, State, Store};

    fn session(node: &str) -> Session {
        Session {
            id: "s1".into(),
            name: "n".into(),
            node: node.into(),
            lock_delay_ns: 0,
            behavior: Behavior::Release,
            ttl: "10s".into(),
            ttl_ms: 10_000,
            node_checks: vec![],
            service_checks: vec![],
            create_index: 0,
            modify_index: 0,
            expires_at: None,
        }
    }

    #[test]
    fn sessions_need_a_known_node_and_the_log_replays_to_the_same_store() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        let mut store = Store::open(Box::new(RedbLog::open(&path).unwrap()), "dc1").unwrap();
        let r = store.propose(vec![Command::Session(SessionOp::Create { session: session("n1"), now: 5 })]).unwrap();
        assert_eq!(r[0], Err(ApplyError::Kv(KvError::MissingNode("n1".into()))));
        assert!(store.state().kv.sessions.is_empty());
        assert_eq!(store.state().index, 0, "a refused command is not logged");
        let agent = Agent {
            id: AgentId::from("n1"),
            hostname: "n1".into(),
            address: "127.0.0.1".parse().unwrap(),
            resources: Resources::scalars(1.0, 1.0, 1.0),
            attributes: Default::default(),
            registered_at: 0,
            runtimes: vec![],
            wan_address: None,
        };
        let set = |key: &str, mode: SetMode| {
            Command::Kv(KvOp::Set { key: key.into(), value: KvValue::from(&b"v"[..]), flags: 7, mode, now: 6 })
        };
        let r = store
            .propose(vec![
                Command::RegisterAgent { agent, datacenter: "dc1".into() },
                Command::Session(SessionOp::Create { session: session("n1"), now: 5 }),
                set("lock", SetMode::Acquire("s1".into())),
                set("lock", SetMode::Acquire("s2".into())),
                set("plain", SetMode::Plain),
            ])
            .unwrap();
        assert!(r[..3].iter().all(Result::is_ok), "{r:?}");
        assert_eq!(r[3], Err(ApplyError::Kv(KvError::InvalidSession("s2".into()))));
        let before = store.state().clone();
        drop(store);
        let store = Store::open(Box::new(RedbLog::open(&path).unwrap()), "dc1").unwrap();
        assert_eq!(store.state(), &before);
        assert_eq!(store.state().kv.next_deadline(), Some(20_005), "TTL deadlines come back");
        assert_eq!(store.state().kv.get("lock").unwrap().session.as_deref(), Some("s1"));
    }

    fn tset(k: &str, v: &str, mode: SetMode, now: Millis) -> TxnOp {
        TxnOp::Kv(KvOp::Set { key: k.into(), value: KvValue::from(v.as_bytes()), flags: 0, mode, now })
    }

    #[test]
    fn a_transaction_is_one_logged_command_and_replays_to_the_same_store() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        let mut store = Store::open(Box::new(RedbLog::open(&path).unwrap()), "dc1").unwrap();
        let r = store.propose(vec![Command::Kv(KvOp::Set {
            key: "a".into(),
            value: KvValue::from(&b"1"[..]),
            flags: 0,
            mode: SetMode::Plain,
            now: 1,
        })]);
        assert!(r.unwrap()[0].is_ok());
        let index = store.state().index;
        let txn = |check: u64| {
            Command::KvTxn(vec![
                tset("b", "2", SetMode::Plain, 2),
                TxnOp::CheckIndex { key: "a".into(), index: check },
                TxnOp::Get { key: "b".into() },
            ])
        };
        // A failing check: refused, not logged, nothing changed.
        let before = store.state().clone();
        let r = store.propose(vec![txn(index + 5)]).unwrap();
        match &r[0] {
            Err(ApplyError::Kv(KvError::TxnFailed(errors))) => assert_eq!(errors[0].op_index, 1),
            other => panic!("{other:?}"),
        }
        assert_eq!(store.state(), &before, "a failed transaction changes nothing");
        // It holds: one index, and the results come back with the changes.
        let r = store.propose(vec![txn(index)]).unwrap();
        let results = r[0].as_ref().unwrap().txn_results.clone().unwrap();
        assert_eq!(results.len(), 3);
        assert_eq!((results[2].value.as_bytes(), results[2].modify_index), (&b"2"[..], index + 1));
        assert_eq!(store.state().index, index + 1);
        // The same commands on a fresh state give the same state (the log is deterministic).
        let mut replay = State::new("dc1");
        for cmd in [
            Command::Kv(KvOp::Set {
                key: "a".into(),
                value: KvValue::from(&b"1"[..]),
                flags: 0,
                mode: SetMode::Plain,
                now: 1,
            }),
            txn(index),
        ] {
            replay.apply(&cmd).unwrap();
        }
        assert_eq!(replay.kv, store.state().kv);
        let after = store.state().clone();
        drop(store);
        let store = Store::open(Box::new(RedbLog::open(&path).unwrap()), "dc1").unwrap();
        assert_eq!(store.state(), &after);
    }
}
