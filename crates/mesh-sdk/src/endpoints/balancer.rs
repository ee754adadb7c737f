//! The pure load-balancing core of [`Endpoints`](super::Endpoints): round robin or
//! power-of-two-choices over in-flight requests, and passive ejection with backoff. No I/O:
//! time (`now`) and randomness come in as arguments.

use super::Instance;
use rand::Rng;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// How [`Endpoints::pick`](super::Endpoints::pick) chooses among healthy instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Balance {
    /// Each instance in turn.
    RoundRobin,
    /// Two instances at random, the one with fewer requests in flight (ties: the first drawn).
    #[default]
    PowerOfTwoChoices,
}

/// Passive ejection: instances whose calls fail are left out for a while.
///
/// After `consecutive_failures` failures in a row an instance is ejected for `base`, doubled for
/// each earlier ejection, at most `max`. A success resets the failure count; the ejection count
/// (so the backoff) is forgotten after a success at least `max` after the last ejection ended.
/// When every candidate is ejected, they are all used anyway (better a suspect instance than
/// none).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Ejection {
    /// Failures in a row that eject an instance (0 turns ejection off).
    pub consecutive_failures: u32,
    /// Length of the first ejection.
    pub base: Duration,
    /// Longest ejection.
    pub max: Duration,
}

impl Default for Ejection {
    fn default() -> Self {
        Ejection { consecutive_failures: 3, base: Duration::from_secs(5), max: Duration::from_secs(120) }
    }
}

impl Ejection {
    /// Eject after `consecutive_failures` failures for `base`, backing off up to `max`.
    pub fn new(consecutive_failures: u32, base: Duration, max: Duration) -> Self {
        Ejection { consecutive_failures, base, max }
    }
    /// No ejection.
    pub fn disabled() -> Self {
        Ejection { consecutive_failures: 0, ..Default::default() }
    }
    fn duration(&self, earlier_ejections: u32) -> Duration {
        let factor = 1u32.checked_shl(earlier_ejections.min(31)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.max)
    }
}

#[derive(Debug)]
struct Slot {
    instance: Instance,
    inflight: Arc<AtomicUsize>,
    failures: u32,
    ejections: u32,
    ejected_until: Option<Instant>,
}

impl Slot {
    fn ejected(&self, now: Instant) -> bool {
        self.ejected_until.is_some_and(|t| t > now)
    }
}

/// The balancer's state over the current set of instances.
#[derive(Debug)]
pub(crate) struct Balancer {
    slots: Vec<Slot>,
    next: usize,
    balance: Balance,
    ejection: Ejection,
}

/// What [`Balancer::pick`] hands out: the instance and its in-flight counter (already counted).
pub(crate) type Picked = (Instance, Arc<AtomicUsize>);

impl Balancer {
    pub(crate) fn new(balance: Balance, ejection: Ejection) -> Self {
        Balancer { slots: Vec::new(), next: 0, balance, ejection }
    }

    /// Replace the set of instances; instances that stay keep their counters and ejection.
    pub(crate) fn set_instances(&mut self, list: Vec<Instance>) {
        let mut old = std::mem::take(&mut self.slots);
        self.slots = list
            .into_iter()
            .map(|instance| match old.iter().position(|s| s.instance.key() == instance.key()) {
                Some(i) => {
                    let mut s = old.swap_remove(i);
                    s.instance = instance;
                    s
                }
                None => Slot {
                    instance,
                    inflight: Arc::new(AtomicUsize::new(0)),
                    failures: 0,
                    ejections: 0,
                    ejected_until: None,
                },
            })
            .collect();
        if self.next >= self.slots.len() {
            self.next = 0;
        }
    }

    pub(crate) fn instances(&self) -> impl Iterator<Item = &Instance> {
        self.slots.iter().map(|s| &s.instance)
    }

    /// Whether the instance with `key` is ejected at `now`.
    #[cfg(test)]
    pub(crate) fn is_ejected(&self, key: (&str, &str), now: Instant) -> bool {
        self.slots.iter().any(|s| s.instance.key() == key && s.ejected(now))
    }

    /// Choose an instance among those `filter` accepts, and count a request in flight on it.
    pub(crate) fn pick<R: Rng + ?Sized>(
        &mut self,
        now: Instant,
        rng: &mut R,
        filter: &dyn Fn(&Instance) -> bool,
    ) -> Option<Picked> {
        let mut candidates: Vec<usize> =
            (0..self.slots.len()).filter(|&i| filter(&self.slots[i].instance) && !self.slots[i].ejected(now)).collect();
        if candidates.is_empty() {
            // All ejected: use them anyway.
            candidates = (0..self.slots.len()).filter(|&i| filter(&self.slots[i].instance)).collect();
        }
        let chosen = match (candidates.len(), self.balance) {
            (0, _) => return None,
            (1, _) => candidates[0],
            // The first candidate at or after `next`, cyclically.
            (_, Balance::RoundRobin) => candidates.iter().copied().find(|&i| i >= self.next).unwrap_or(candidates[0]),
            (n, Balance::PowerOfTwoChoices) => {
                let a = rng.random_range(0..n);
                let mut b = rng.random_range(0..n - 1);
                if b >= a {
                    b += 1;
                }
                let (a, b) = (candidates[a], candidates[b]);
                let load = |i: usize| self.slots[i].inflight.load(Ordering::Relaxed);
                if load(b) < load(a) { b } else { a }
            }
        };
        self.next = chosen + 1;
        let s = &self.slots[chosen];
        s.inflight.fetch_add(1, Ordering::Relaxed);
        Some((s.instance.clone(), s.inflight.clone()))
    }

    /// Record the outcome of a call to the instance with `key`.
    pub(crate) fn report(&mut self, key: (&str, &str), ok: bool, now: Instant) {
        let ej = self.ejection;
        let Some(s) = self.slots.iter_mut().find(|s| s.instance.key() == key) else { return };
        if ok {
            s.failures = 0;
            if s.ejected_until.is_some_and(|end| now >= end + ej.max) {
                s.ejections = 0;
                s.ejected_until = None;
            }
            return;
        }
        if ej.consecutive_failures == 0 || s.ejected(now) {
            return;
        }
        s.failures += 1;
        if s.failures >= ej.consecutive_failures {
            let d = ej.duration(s.ejections);
            tracing::debug!(instance = s.instance.id, ?d, "ejecting after failures");
            s.ejected_until = Some(now + d);
            s.ejections += 1;
            s.failures = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    fn inst(id: &str) -> Instance {
        Instance {
            id: id.into(),
            service: "web".into(),
            node: "n".into(),
            address: "127.0.0.1".into(),
            port: 80,
            tags: vec![],
            meta: Default::default(),
            datacenter: "dc1".into(),
        }
    }

    fn all(_: &Instance) -> bool {
        true
    }

    fn balancer(balance: Balance, ids: &[&str]) -> Balancer {
        let mut b = Balancer::new(balance, Ejection::new(2, Duration::from_secs(10), Duration::from_secs(35)));
        b.set_instances(ids.iter().map(|i| inst(i)).collect());
        b
    }

    fn pick_id(b: &mut Balancer, now: Instant, rng: &mut StdRng) -> String {
        let (i, inflight) = b.pick(now, rng, &all).expect("a pick");
        inflight.fetch_sub(1, Ordering::Relaxed); // released at once
        i.id
    }

    #[test]
    fn round_robin_cycles_and_survives_updates() {
        let (now, mut rng) = (Instant::now(), StdRng::seed_from_u64(1));
        let mut b = balancer(Balance::RoundRobin, &["a", "b", "c"]);
        let seq: Vec<String> = (0..6).map(|_| pick_id(&mut b, now, &mut rng)).collect();
        assert_eq!(seq, ["a", "b", "c", "a", "b", "c"]);
        // b goes away: a and c alternate
        b.set_instances(vec![inst("a"), inst("c")]);
        let seq: Vec<String> = (0..4).map(|_| pick_id(&mut b, now, &mut rng)).collect();
        assert_eq!(seq, ["a", "c", "a", "c"]);
        // a filter narrows the choice
        let (i, _) = b.pick(now, &mut rng, &|i: &Instance| i.id != "a").unwrap();
        assert_eq!(i.id, "c");
        b.set_instances(vec![]);
        assert!(b.pick(now, &mut rng, &all).is_none());
    }

    #[test]
    fn p2c_picks_the_less_loaded() {
        let (now, mut rng) = (Instant::now(), StdRng::seed_from_u64(7));
        let mut b = balancer(Balance::PowerOfTwoChoices, &["a", "b"]);
        // Hold 5 requests on a.
        let (_, a_load) = b.pick(now, &mut rng, &|i: &Instance| i.id == "a").unwrap();
        a_load.fetch_add(4, Ordering::Relaxed);
        for _ in 0..50 {
            assert_eq!(pick_id(&mut b, now, &mut rng), "b");
        }
        // With three instances of loads 5, 0 and 2, the busiest is never chosen and the idle one
        // wins every draw it is in (two thirds of them).
        b.set_instances(vec![inst("a"), inst("b"), inst("c")]);
        let (_, c_load) = b.pick(now, &mut rng, &|i: &Instance| i.id == "c").unwrap();
        c_load.fetch_add(1, Ordering::Relaxed);
        let picks: Vec<String> = (0..300).map(|_| pick_id(&mut b, now, &mut rng)).collect();
        assert!(!picks.iter().any(|p| p == "a"));
        let idle = picks.iter().filter(|p| *p == "b").count();
        assert!((170..=230).contains(&idle), "b chosen {idle} of 300");
        // Requests that are held pile onto the less loaded until they even out.
        let mut b = balancer(Balance::PowerOfTwoChoices, &["x", "y"]);
        let held: Vec<Picked> = (0..10).map(|_| b.pick(now, &mut rng, &all).unwrap()).collect();
        let on_x = held.iter().filter(|(i, _)| i.id == "x").count();
        assert_eq!(on_x, 5, "10 held requests split 5/5");
    }

    #[test]
    fn failures_eject_with_backoff_and_success_forgets() {
        let (t0, mut rng) = (Instant::now(), StdRng::seed_from_u64(3));
        let mut b = balancer(Balance::RoundRobin, &["a", "b"]);
        let a = ("dc1", "a");
        // One failure is not enough (threshold 2), and a success resets the count.
        b.report(a, false, t0);
        b.report(a, true, t0);
        b.report(a, false, t0);
        assert!(!b.is_ejected(a, t0));
        b.report(a, false, t0);
        assert!(b.is_ejected(a, t0));
        // Ejected for 10 s: only b is picked.
        let t = t0 + Duration::from_secs(9);
        assert!((0..4).all(|_| pick_id(&mut b, t, &mut rng) == "b"));
        // Back after 10 s.
        let t1 = t0 + Duration::from_secs(10);
        assert!((0..4).any(|_| pick_id(&mut b, t1, &mut rng) == "a"));
        // Second ejection: 20 s; third: 40 s capped at 35 s.
        b.report(a, false, t1);
        b.report(a, false, t1);
        assert!(b.is_ejected(a, t1 + Duration::from_secs(19)));
        assert!(!b.is_ejected(a, t1 + Duration::from_secs(20)));
        let t2 = t1 + Duration::from_secs(20);
        b.report(a, false, t2);
        b.report(a, false, t2);
        assert!(b.is_ejected(a, t2 + Duration::from_millis(34_999)));
        assert!(!b.is_ejected(a, t2 + Duration::from_secs(35)));
        // A success long (>= max) after the last ejection ended forgets the backoff.
        let t3 = t2 + Duration::from_secs(35 + 35);
        b.report(a, true, t3);
        b.report(a, false, t3);
        b.report(a, false, t3);
        assert!(b.is_ejected(a, t3 + Duration::from_secs(9)));
        assert!(!b.is_ejected(a, t3 + Duration::from_secs(10)));
        // Failures reported while ejected do not extend it.
        b.report(a, false, t3 + Duration::from_secs(5));
        b.report(a, false, t3 + Duration::from_secs(5));
        assert!(!b.is_ejected(a, t3 + Duration::from_secs(10)));
    }

    #[test]
    fn all_ejected_still_picks_and_state_survives_updates() {
        let (now, mut rng) = (Instant::now(), StdRng::seed_from_u64(5));
        let mut b = balancer(Balance::PowerOfTwoChoices, &["a", "b"]);
        for k in [("dc1", "a"), ("dc1", "b")] {
            b.report(k, false, now);
            b.report(k, false, now);
        }
        assert!(b.pick(now, &mut rng, &all).is_some(), "every instance ejected: still pick one");
        // Ejection and load survive a catalog update that keeps the instance.
        b.set_instances(vec![inst("a"), inst("c")]);
        assert!(b.is_ejected(("dc1", "a"), now));
        assert!((0..20).all(|_| pick_id(&mut b, now, &mut rng) == "c"));
        // An instance that left and came back starts afresh.
        b.set_instances(vec![inst("c")]);
        b.set_instances(vec![inst("a"), inst("c")]);
        assert!(!b.is_ejected(("dc1", "a"), now));
        // Disabled ejection never ejects.
        let mut b = Balancer::new(Balance::RoundRobin, Ejection::disabled());
        b.set_instances(vec![inst("a")]);
        for _ in 0..10 {
            b.report(("dc1", "a"), false, now);
        }
        assert!(!b.is_ejected(("dc1", "a"), now));
    }
}
