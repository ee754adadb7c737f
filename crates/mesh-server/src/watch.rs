//! Blocking-query wake-ups by topic.
//!
//! A blocking request waits on one topic (`svc:web`, `kv:app/`, `nodes`, ...). After each publish
//! the control loop calls [`WatchHub::notify`], which computes the index of each topic that has
//! live waiters and wakes a topic's waiters only when its index grew. Waking costs one index lookup
//! per distinct watched topic, not per waiter, and a change elsewhere wakes nobody: thousands of
//! watchers cost memory (a receiver and a parked future each), not CPU.

use std::collections::HashMap;
use std::sync::Mutex;
use tokio::sync::watch;

/// Topic → the index its waiters last heard.
#[derive(Default)]
pub struct WatchHub {
    topics: Mutex<HashMap<String, watch::Sender<u64>>>,
}

impl WatchHub {
    /// Start waiting on `topic`, whose index the caller just read as `current`.
    pub fn subscribe(&self, topic: &str, current: u64) -> watch::Receiver<u64> {
        let mut topics = self.topics.lock().unwrap_or_else(|e| e.into_inner());
        match topics.get(topic) {
            Some(tx) => tx.subscribe(),
            None => {
                let (tx, rx) = watch::channel(current);
                topics.insert(topic.to_owned(), tx);
                rx
            }
        }
    }

    /// Wake the waiters of every topic whose index (by `index_of`) grew; forget topics nobody
    /// waits on any more.
    pub fn notify(&self, index_of: impl Fn(&str) -> u64) {
        let mut topics = self.topics.lock().unwrap_or_else(|e| e.into_inner());
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
}
