//! Shared vocabulary: ids, resources, time.

use serde::{Deserialize, Serialize};
use std::fmt;

macro_rules! string_id {
    ($(#[$m:meta])* $name:ident) => {
        $(#[$m])*
        #[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub String);
        impl $name {
            /// The id as a string slice.
            pub fn as_str(&self) -> &str { &self.0 }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result { f.write_str(&self.0) }
        }
        impl From<&str> for $name {
            fn from(s: &str) -> Self { Self(s.to_owned()) }
        }
        impl From<String> for $name {
            fn from(s: String) -> Self { Self(s) }
        }
    };
}

string_id!(
    /// An agent (a node that runs tasks). In `mesh dev` it is the node name.
    AgentId
);
string_id!(
    /// A framework registered with the allocator (`marathon` is the stock one).
    FrameworkId
);
string_id!(
    /// One offer of one agent's resources to one framework.
    OfferId
);
string_id!(
    /// A task, e.g. `web.instance-<uuid>._app.1`.
    TaskId
);

/// Milliseconds since the Unix epoch. Every decision takes time as an input, so the cores can
/// run under virtual time in tests and the log replays deterministically.
pub type Millis = u64;

/// The current wall-clock time in [`Millis`]. Only drivers call this; cores receive `now`.
pub fn now_millis() -> Millis {
    let d = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    d.as_millis() as Millis
}

/// Time and fresh ids, injected into the control loop, the agent and the API handlers (never
/// read from the system inside them), so the same code runs on the wall clock, in one process
/// and in a seeded simulation with virtual time.
pub trait Clock: Send + Sync + std::fmt::Debug + 'static {
    /// The current time.
    fn now(&self) -> Millis;
    /// A fresh unique id (task ids, deployment ids, update ids).
    fn uuid(&self) -> uuid::Uuid;
}

/// The system's wall clock and random v4 ids.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Millis {
        now_millis()
    }
    fn uuid(&self) -> uuid::Uuid {
        uuid::Uuid::new_v4()
    }
}

/// A clock that moves only when told, with ids from a seeded counter (tests, simulation).
#[derive(Debug)]
pub struct ManualClock {
    now: std::sync::atomic::AtomicU64,
    ids: std::sync::atomic::AtomicU64,
    seed: u64,
}

impl ManualClock {
    /// Starting at `now`, ids derived from `seed`.
    pub fn new(now: Millis, seed: u64) -> ManualClock {
        ManualClock { now: now.into(), ids: 0.into(), seed }
    }
    /// Move time forward by `ms`.
    pub fn advance(&self, ms: u64) {
        self.now.fetch_add(ms, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Millis {
        self.now.load(std::sync::atomic::Ordering::SeqCst)
    }
    fn uuid(&self) -> uuid::Uuid {
        let n = self.ids.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        uuid::Uuid::from_u64_pair(self.seed, n)
    }
}

/// The clock everything shares unless told otherwise: the system's.
pub fn system_clock() -> std::sync::Arc<dyn Clock> {
    std::sync::Arc::new(SystemClock)
}

/// Marathon's timestamp format: ISO-8601 UTC with milliseconds and `Z`.
///
/// Formatted by hand (civil-from-days): read APIs format three timestamps per task, and
/// chrono's format string is parsed again at every call.
pub fn iso8601(ms: Millis) -> String {
    use std::fmt::Write;
    let secs = (ms / 1000) as i64;
    let (days, sod) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's days_from_civil inverse.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let mut out = String::with_capacity(24);
    let _ = write!(
        out,
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        sod / 3600,
        sod % 3600 / 60,
        sod % 60,
        ms % 1000
    );
    out
}

/// Parse a Marathon timestamp (as produced by [`iso8601`]; any RFC 3339 form is accepted).
pub fn parse_iso8601(s: &str) -> Option<Millis> {
    chrono::DateTime::parse_from_rfc3339(s).ok().map(|d| d.timestamp_millis().max(0) as Millis)
}

/// A set of TCP/UDP ports as sorted, non-overlapping, inclusive ranges.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortRanges(Vec<(u16, u16)>);

impl PortRanges {
    /// The empty set.
    pub fn new() -> Self {
        Self(Vec::new())
    }
    /// One inclusive range `lo..=hi` (empty when `lo > hi`).
    pub fn range(lo: u16, hi: u16) -> Self {
        if lo > hi { Self::new() } else { Self(vec![(lo, hi)]) }
    }
    /// The set holding exactly these ports.
    pub fn from_ports(ports: impl IntoIterator<Item = u16>) -> Self {
        let mut v: Vec<u16> = ports.into_iter().collect();
        v.sort_unstable();
        let mut out: Vec<(u16, u16)> = Vec::new();
        for p in v {
            match out.last_mut() {
                Some(last) if last.1 as u32 + 1 >= p as u32 => last.1 = last.1.max(p),
                _ => out.push((p, p)),
            }
        }
        Self(out)
    }
    /// The ranges, sorted and disjoint.
    pub fn ranges(&self) -> &[(u16, u16)] {
        &self.0
    }
    /// True when no port is in the set.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    /// How many ports the set holds.
    pub fn len(&self) -> usize {
        self.0.iter().map(|(a, b)| (*b as usize) - (*a as usize) + 1).sum()
    }
    /// Whether `port` is in the set.
    pub fn contains(&self, port: u16) -> bool {
        // ranges are sorted: binary search on the start
        match self.0.binary_search_by(|(lo, _)| lo.cmp(&port)) {
            Ok(_) => true,
            Err(0) => false,
            Err(i) => self.0[i - 1].1 >= port,
        }
    }
    /// Whether every port of `other` is in `self` (a binary search per range of `other`).
    pub fn contains_all(&self, other: &PortRanges) -> bool {
        other.0.iter().all(|&(lo, hi)| match self.0.binary_search_by(|(a, _)| a.cmp(&lo)) {
            Ok(i) => self.0[i].1 >= hi,
            Err(0) => false,
            Err(i) => self.0[i - 1].1 >= hi,
        })
    }
    /// Add `lo..=hi`, merging neighbours.
    pub fn insert_range(&mut self, lo: u16, hi: u16) {
        if lo <= hi {
            self.add(&PortRanges(vec![(lo, hi)]));
        }
    }
    /// Union with `other`: one merge of the two sorted lists, O(n + m).
    pub fn add(&mut self, other: &PortRanges) {
        if other.0.is_empty() {
            return;
        }
        let (mine, theirs) = (&self.0, &other.0);
        let mut out: Vec<(u16, u16)> = Vec::with_capacity(mine.len() + theirs.len());
        let (mut i, mut j) = (0, 0);
        loop {
            let next = match (mine.get(i), theirs.get(j)) {
                (Some(&a), Some(&b)) if a.0 <= b.0 => {
                    i += 1;
                    a
                }
                (_, Some(&b)) => {
                    j += 1;
                    b
                }
                (Some(&a), None) => {
                    i += 1;
                    a
                }
                (None, None) => break,
            };
            match out.last_mut() {
                Some(last) if last.1 as u32 + 1 >= next.0 as u32 => last.1 = last.1.max(next.1),
                _ => out.push(next),
            }
        }
        self.0 = out;
    }
    /// Remove every port of `other` from `self`: one pass over both sorted lists, O(n + m).
    pub fn subtract(&mut self, other: &PortRanges) {
        if other.0.is_empty() || self.0.is_empty() {
            return;
        }
        let o = &other.0;
        let mut out = Vec::with_capacity(self.0.len() + 1);
        let mut j = 0;
        for &(a, b) in &self.0 {
            let (mut lo, b) = (a as u32, b as u32);
            // Ranges of `other` wholly below this one remove nothing from it or any later one.
            while j < o.len() && (o[j].1 as u32) < lo {
                j += 1;
            }
            let mut k = j;
            loop {
                match o.get(k) {
                    Some(&(olo, ohi)) if olo as u32 <= b => {
                        if olo as u32 > lo {
                            out.push((lo as u16, olo - 1));
                        }
                        lo = lo.max(ohi as u32 + 1);
                        if lo > b {
                            break;
                        }
                        k += 1;
                    }
                    _ => {
                        out.push((lo as u16, b as u16));
                        break;
                    }
                }
            }
        }
        self.0 = out;
    }
    /// The ports in ascending order.
    pub fn iter(&self) -> impl Iterator<Item = u16> + '_ {
        self.0.iter().flat_map(|&(a, b)| a..=b)
    }
}

impl fmt::Display for PortRanges {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[")?;
        for (i, (a, b)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{a}-{b}")?;
        }
        f.write_str("]")
    }
}

/// Resources of an agent, an offer or a task.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Resources {
    /// CPU shares (1.0 = one core).
    pub cpus: f64,
    /// Memory in MiB.
    pub mem: f64,
    /// Disk in MiB.
    pub disk: f64,
    /// Host ports.
    pub ports: PortRanges,
}

/// Tolerance for float comparisons of scalar resources.
pub const EPSILON: f64 = 1e-9;

impl Resources {
    /// Scalars only, no ports.
    pub fn scalars(cpus: f64, mem: f64, disk: f64) -> Self {
        Self { cpus, mem, disk, ports: PortRanges::new() }
    }
    /// Whether `self` holds at least `other` (scalars and every port).
    pub fn contains(&self, other: &Resources) -> bool {
        self.cpus + EPSILON >= other.cpus
            && self.mem + EPSILON >= other.mem
            && self.disk + EPSILON >= other.disk
            && self.ports.contains_all(&other.ports)
    }
    /// Add `other` to `self`.
    pub fn add(&mut self, other: &Resources) {
        self.cpus += other.cpus;
        self.mem += other.mem;
        self.disk += other.disk;
        self.ports.add(&other.ports);
    }
    /// Take `other` away from `self`; scalars never go below zero.
    pub fn subtract(&mut self, other: &Resources) {
        self.cpus = (self.cpus - other.cpus).max(0.0);
        self.mem = (self.mem - other.mem).max(0.0);
        self.disk = (self.disk - other.disk).max(0.0);
        self.ports.subtract(&other.ports);
        if self.cpus < EPSILON {
            self.cpus = 0.0;
        }
        if self.mem < EPSILON {
            self.mem = 0.0;
        }
        if self.disk < EPSILON {
            self.disk = 0.0;
        }
    }
    /// True when nothing is left.
    pub fn is_empty(&self) -> bool {
        self.cpus < EPSILON && self.mem < EPSILON && self.disk < EPSILON && self.ports.is_empty()
    }
}

impl fmt::Display for Resources {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cpus:{}; mem:{}; disk:{}; ports:{}", self.cpus, self.mem, self.disk, self.ports)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_ranges_merge_and_subtract() {
        let mut p = PortRanges::range(31000, 31010);
        p.subtract(&PortRanges::from_ports([31000, 31005, 31010]));
        assert_eq!(p.ranges(), &[(31001, 31004), (31006, 31009)]);
        assert_eq!(p.len(), 8);
        assert!(p.contains(31004) && !p.contains(31005) && !p.contains(31000));
        p.add(&PortRanges::from_ports([31005]));
        assert_eq!(p.ranges(), &[(31001, 31009)]);
        assert!(p.contains_all(&PortRanges::range(31002, 31008)));
        assert!(!p.contains_all(&PortRanges::range(31002, 31010)));
        p.insert_range(31011, 31011);
        assert_eq!(p.ranges(), &[(31001, 31009), (31011, 31011)]);
        p.insert_range(31010, 31010);
        assert_eq!(p.ranges(), &[(31001, 31011)]);
        assert_eq!(p.to_string(), "[31001-31011]");
    }

    /// The linear merges agree with a set of ports on random inputs (edges 0 and 65535 included).
    #[test]
    fn port_ranges_match_a_set_of_ports() {
        use rand::{Rng, SeedableRng};
        use std::collections::BTreeSet;
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let random = |rng: &mut rand::rngs::StdRng| -> BTreeSet<u16> {
            let base: u16 = if rng.random_bool(0.2) { 65_500 } else { rng.random_range(0..40) };
            (0..rng.random_range(0..30)).map(|_| base.saturating_add(rng.random_range(0..36))).collect()
        };
        let ranges_of = |set: &BTreeSet<u16>| PortRanges::from_ports(set.iter().copied());
        for _ in 0..5_000 {
            let (a, b) = (random(&mut rng), random(&mut rng));
            let mut sum = ranges_of(&a);
            sum.add(&ranges_of(&b));
            assert_eq!(sum, ranges_of(&a.union(&b).copied().collect()), "{a:?} + {b:?}");
            let mut diff = ranges_of(&a);
            diff.subtract(&ranges_of(&b));
            assert_eq!(diff, ranges_of(&a.difference(&b).copied().collect()), "{a:?} - {b:?}");
            assert_eq!(ranges_of(&a).contains_all(&ranges_of(&b)), b.is_subset(&a), "{a:?} ⊇ {b:?}");
            let mut one = ranges_of(&a);
            if let Some(&p) = b.iter().next() {
                one.insert_range(p, p.saturating_add(3));
                let want: BTreeSet<u16> = a.iter().copied().chain(p..=p.saturating_add(3)).collect();
                assert_eq!(one, ranges_of(&want));
            }
            assert_eq!(ranges_of(&a).len(), a.len());
        }
    }

    #[test]
    fn resources_arithmetic() {
        let mut r = Resources { cpus: 2.0, mem: 1024.0, disk: 0.0, ports: PortRanges::range(1, 10) };
        let t = Resources { cpus: 0.5, mem: 128.0, disk: 0.0, ports: PortRanges::from_ports([3]) };
        assert!(r.contains(&t));
        r.subtract(&t);
        assert!(!r.contains(&t));
        assert!(r.contains(&Resources::scalars(1.5, 896.0, 0.0)));
        r.add(&t);
        assert!(r.contains(&t));
    }

    #[test]
    fn timestamps_match_chrono() {
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for _ in 0..10_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let ms = x % 8_000_000_000_000; // up to year ~2223
            let dt = chrono::DateTime::<chrono::Utc>::from_timestamp_millis(ms as i64).unwrap();
            assert_eq!(iso8601(ms), dt.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string(), "{ms}");
        }
        assert_eq!(iso8601(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(iso8601(951_782_400_000), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn timestamps_have_millis_and_z() {
        assert_eq!(iso8601(1_443_194_028_343), "2015-09-25T15:13:48.343Z");
        assert_eq!(parse_iso8601("2015-09-25T15:13:48.343Z"), Some(1_443_194_028_343));
    }
}
