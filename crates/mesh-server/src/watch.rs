//! Blocking-query wake-ups by topic.
//!
//! A blocking request waits on one topic (`svc:web`, `kv:app/`, `nodes`, ...). After each publish
//! the control loop calls [`WatchHub::notify_changes`] with the previous and the new state. Catalog
//! topics are found by diffing the two states' topic-index maps (persistent maps that share
//! structure, so the diff visits only what changed): a publish costs O(changed topics), whatever
//! the number of watchers or watched topics, and a change elsewhere wakes nobody. KV prefixes
//! (`kv:<prefix>`) are found the same way from the changed keys, and `sessions` from the sessions'
//! index; any other topic is re-indexed on each publish. Thousands of watchers cost memory (a
//! receiver and a parked future each), not CPU.

use mesh_core::kv::SESSIONS_TOPIC;
use mesh_core::state::State;
use std::collections::HashMap;
use std::sync::Mutex;
use tokio::sync::watch;

/// Topic → the index its waiters last heard.
#[derive(Default)]
pub struct WatchHub {
    topics: Mutex<HashMap<String, watch::Sender<u64>>>,
    /// Watched topics that are not catalog topics (re-indexed on every publish).
    others: Mutex<HashMap<String, watch::Sender<u64>>>,
    notifies: std::sync::atomic::AtomicU64,
}

/// Whether `topic` is one of the catalog's (tracked in `CatalogState::topics`).
fn is_catalog_topic(topic: &str) -> bool {
    matches!(topic, "services" | "nodes" | "checks") || topic.starts_with("svc:") || topic.starts_with("node:")
}

impl WatchHub {
    /// Start waiting on `topic`, whose index the caller just read as `current`.
    pub fn subscribe(&self, topic: &str, current: u64) -> watch::Receiver<u64> {
        let map = if is_catalog_topic(topic) { &self.topics } else { &self.others };
        let mut topics = map.lock().unwrap_or_else(|e| e.into_inner());
        match topics.get(topic) {
            Some(tx) => tx.subscribe(),
            None => {
                let (tx, rx) = watch::channel(current);
                topics.insert(topic.to_owned(), tx);
                rx
            }
        }
    }

    /// Wake the waiters of the topics that changed between `old` and `new`.
    pub fn notify_changes(&self, old: &State, new: &State) {
        {
            let topics = self.topics.lock().unwrap_or_else(|e| e.into_inner());
            if !topics.is_empty() {
                for item in old.catalog.topics.diff(&new.catalog.topics) {
                    let (topic, index) = match item {
                        imbl::ordmap::DiffItem::Add(k, v) => (k, *v),
                        imbl::ordmap::DiffItem::Update { new: (k, v), .. } => (k, *v),
                        imbl::ordmap::DiffItem::Remove(..) => continue,
                    };
                    if let Some(tx) = topics.get(topic)
                        && index > *tx.borrow()
                    {
                        tx.send_replace(index);
                    }
                }
            }
        }
        self.notify_others(old, new);
        // Forget topics nobody waits on any more, now and then (a sweep is O(topics)).
        let n = self.notifies.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if n.is_multiple_of(256) {
            self.topics.lock().unwrap_or_else(|e| e.into_inner()).retain(|_, tx| tx.receiver_count() > 0);
            self.others.lock().unwrap_or_else(|e| e.into_inner()).retain(|_, tx| tx.receiver_count() > 0);
        }
    }

    /// The non-catalog topics. KV prefixes (`kv:<prefix>`) and `sessions` are woken only when a
    /// change touches them: the keys that changed (found by diffing the persistent maps, which
    /// visits only what changed) are walked prefix by prefix and looked up, so a publish costs
    /// O(changed keys × key length), not O(watched prefixes). Any other topic is re-indexed.
    fn notify_others(&self, old: &State, new: &State) {
        let others = self.others.lock().unwrap_or_else(|e| e.into_inner());
        if others.is_empty() {
            return;
        }
        let wake = |topic: &str| {
            if let Some(tx) = others.get(topic) {
                let i = new.topic_index(topic);
                if i > *tx.borrow() {
                    tx.send_replace(i);
                }
            }
        };
        let (ok, nk) = (&old.kv, &new.kv);
        if ok.sessions_index != nk.sessions_index {
            wake(SESSIONS_TOPIC);
        }
        if ok.tombstone_floor != nk.tombstone_floor {
            // Old tombstones were folded into the floor, which every prefix's index includes.
            others.keys().filter(|t| t.starts_with("kv:")).for_each(|t| wake(t));
        } else if ok.index != nk.index {
            use imbl::ordmap::DiffItem;
            let changed_entries = ok.entries.diff(&nk.entries).map(|d| match d {
                DiffItem::Add(k, _) | DiffItem::Remove(k, _) | DiffItem::Update { new: (k, _), .. } => &**k,
            });
            let changed_tombstones = ok.tombstones.diff(&nk.tombstones).map(|d| match d {
                DiffItem::Add(k, _) | DiffItem::Remove(k, _) | DiffItem::Update { new: (k, _), .. } => k.as_str(),
            });
            for key in changed_entries.chain(changed_tombstones) {
                let mut topic = String::with_capacity(3 + key.len());
                topic.push_str("kv:");
                for c in key.chars() {
                    wake(&topic);
                    topic.push(c);
                }
                wake(&topic);
            }
        }
        for (topic, tx) in others.iter().filter(|(t, _)| !t.starts_with("kv:") && t.as_str() != SESSIONS_TOPIC) {
            let i = new.topic_index(topic);
            if i > *tx.borrow() {
                tx.send_replace(i);
            }
        }
    }

    /// Wake the waiters of every topic whose index (by `index_of`) grew; forget topics nobody
    /// waits on any more.
    pub fn notify(&self, index_of: impl Fn(&str) -> u64) {
        Self::reindex(&self.topics, &index_of);
        Self::reindex(&self.others, &index_of);
    }

    fn reindex(map: &Mutex<HashMap<String, watch::Sender<u64>>>, index_of: impl Fn(&str) -> u64) {
        let mut topics = map.lock().unwrap_or_else(|e| e.into_inner());
        topics.retain(|topic, tx| {
            if tx.receiver_count() == 0 {
                return false;
            }
            let i = index_of(topic);
            if i > *tx.borrow() {
                tx.send_replace(i);
            }
            true
        });
    }

    /// How many topics have waiters (for metrics and tests).
    pub fn topics(&self) -> usize {
        self.topics.lock().unwrap_or_else(|e| e.into_inner()).len()
            + self.others.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn only_the_changed_topic_wakes() {
        let hub = WatchHub::default();
        let mut web = hub.subscribe("svc:web", 5);
        let mut db = hub.subscribe("svc:db", 5);
        hub.notify(|t| if t == "svc:web" { 6 } else { 5 });
        assert!(web.has_changed().unwrap());
        assert!(!db.has_changed().unwrap());
        web.mark_unchanged();
        drop(web);
        hub.notify(|_| 7);
        assert!(db.has_changed().unwrap());
        assert_eq!(hub.topics(), 1, "a topic without waiters is forgotten");
        db.changed().await.unwrap();
    }

    #[tokio::test]
    async fn state_diffs_wake_only_changed_catalog_topics() {
        use mesh_core::catalog::{Health, ServiceInstance};
        let inst = |id: &str, svc: &str| ServiceInstance {
            id: id.into(),
            service: svc.into(),
            node: "n1".into(),
            address: None,
            port: 1,
            tags: vec![],
            meta: Default::default(),
            health: Health::Passing,
            source_health: Health::Passing,
            weights: Default::default(),
            create_index: 0,
            modify_index: 0,
            extra: Default::default(),
        };
        let mut old = State::new("dc1");
        old.catalog.upsert_instance(inst("a", "web"), 1);
        old.catalog.upsert_instance(inst("b", "db"), 2);
        let hub = WatchHub::default();
        let mut web = hub.subscribe("svc:web", old.topic_index("svc:web"));
        let db = hub.subscribe("svc:db", old.topic_index("svc:db"));
        let mut new = old.clone();
        new.catalog.upsert_instance(inst("c", "web"), 3);
        hub.notify_changes(&old, &new);
        assert!(web.has_changed().unwrap());
        assert_eq!(*web.borrow_and_update(), 3);
        assert!(!db.has_changed().unwrap(), "db did not change");
    }

    #[tokio::test]
    async fn kv_changes_wake_only_the_prefixes_of_changed_keys() {
        use mesh_core::kv::{KvOp, KvValue, SetMode};
        let set = |s: &mut State, idx: u64, key: &str| {
            let op = KvOp::Set {
                key: key.into(),
                value: KvValue::from(format!("v{idx}").into_bytes()),
                flags: 0,
                mode: SetMode::Plain,
                now: 0,
            };
            s.kv.apply_kv(&op, idx).unwrap();
        };
        let mut old = State::new("dc1");
        set(&mut old, 1, "app/a");
        set(&mut old, 2, "other/b");
        let hub = WatchHub::default();
        let sub = |t: &str| hub.subscribe(t, old.topic_index(t));
        let (mut app, mut exact, mut all, other, sessions) =
            (sub("kv:app/"), sub("kv:app/a"), sub("kv:"), sub("kv:other/"), sub("sessions"));
        let mut new = old.clone();
        set(&mut new, 3, "app/a");
        hub.notify_changes(&old, &new);
        for (name, rx) in [("kv:app/", &mut app), ("kv:app/a", &mut exact), ("kv:", &mut all)] {
            assert!(rx.has_changed().unwrap(), "{name} covers app/a");
            assert_eq!(*rx.borrow_and_update(), 3);
        }
        assert!(!other.has_changed().unwrap(), "other/ did not change");
        assert!(!sessions.has_changed().unwrap());
        // a delete wakes its prefixes too
        let old = new.clone();
        new.kv.apply_kv(&KvOp::Delete { key: "app/a".into(), recurse: false, cas: None, now: 0 }, 4).unwrap();
        hub.notify_changes(&old, &new);
        assert_eq!(*app.borrow_and_update(), 4);
        assert!(!other.has_changed().unwrap());
    }
}
