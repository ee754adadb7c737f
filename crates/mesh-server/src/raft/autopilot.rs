//! What Consul's autopilot shows and decides about the servers of a Raft group: when each was
//! last heard from ([`Contacts`], fed by the Raft RPCs), whether each is healthy
//! ([`server_healthy`]), how many may fail ([`failure_tolerance`]), and since when each has been
//! as it is now ([`Contacts::stable_since`]).
//!
//! - A follower records when it last accepted an AppendEntries (a heartbeat included) or a
//!   snapshot chunk from the leader: Consul's `X-Consul-LastContact` on the reads it answers.
//! - A leader records when each member last answered its AppendEntries: the `LastContact` of
//!   `/v1/operator/autopilot/health`.

use super::NodeId;
use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
// tokio's, so a simulation's virtual time drives it (the system's otherwise).
use tokio::time::Instant;

/// When this server last heard from the leader, and (while it leads) from each member.
#[derive(Debug)]
pub struct Contacts {
    epoch: Instant,
    /// Milliseconds after `epoch` of the leader's last accepted message, plus one (0: never).
    leader: AtomicU64,
    peers: Mutex<HashMap<NodeId, Instant>>,
    /// Per member: its health as last computed, and since when (Unix milliseconds).
    stable: Mutex<HashMap<NodeId, (bool, u64)>>,
}

impl Default for Contacts {
    fn default() -> Self {
        Contacts { epoch: Instant::now(), leader: AtomicU64::new(0), peers: Mutex::default(), stable: Mutex::default() }
    }
}

impl Contacts {
    /// The leader's AppendEntries (or snapshot) was accepted just now.
    pub fn heard_from_leader(&self) {
        let ms = self.epoch.elapsed().as_millis() as u64 + 1;
        self.leader.store(ms, Ordering::Relaxed);
    }

    /// How long ago this server last heard from a leader (since it started, if never).
    pub fn since_leader(&self) -> Duration {
        let now = self.epoch.elapsed();
        match self.leader.load(Ordering::Relaxed) {
            0 => now,
            ms => now.saturating_sub(Duration::from_millis(ms - 1)),
        }
    }

    /// `peer` answered this server's AppendEntries (or snapshot) just now.
    pub fn acked(&self, peer: NodeId) {
        self.peers.lock().unwrap_or_else(|p| p.into_inner()).insert(peer, Instant::now());
    }

    /// How long ago `peer` last answered this server; `None`: never.
    pub fn since_ack(&self, peer: NodeId) -> Option<Duration> {
        self.peers.lock().unwrap_or_else(|p| p.into_inner()).get(&peer).map(Instant::elapsed)
    }

    /// Record `healthy` for `peer` at `now_ms` (Unix milliseconds): since when it has been so.
    pub fn stable_since(&self, peer: NodeId, healthy: bool, now_ms: u64) -> u64 {
        let mut s = self.stable.lock().unwrap_or_else(|p| p.into_inner());
        let e = s.entry(peer).or_insert((healthy, now_ms));
        if e.0 != healthy {
            *e = (healthy, now_ms);
        }
        e.1
    }
}

/// What the leader knows of one member, as autopilot judges it.
#[derive(Clone, Debug, PartialEq)]
pub struct ServerFacts {
    /// Gossip says it is alive.
    pub alive: bool,
    /// Since it last answered the leader (zero for the leader itself); `None`: never.
    pub last_contact: Option<Duration>,
    /// Term of the last log entry the leader knows it holds.
    pub last_term: u64,
    /// Index of that entry.
    pub last_index: u64,
}

/// Autopilot's limits, from its replicated configuration and the group's heartbeat.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Limits {
    /// `LastContactThreshold`.
    pub last_contact_threshold: Duration,
    /// The leader's heartbeat interval: a member is heard from once per interval, so its last
    /// contact may be this old on a healthy group, plus the threshold.
    pub heartbeat: Duration,
    /// `MaxTrailingLogs`.
    pub max_trailing_logs: u64,
}

/// Consul's health rule for one server: alive in gossip, heard from within the threshold (past
/// the heartbeat interval), on the leader's term, and not more than `MaxTrailingLogs` entries
/// behind it.
pub fn server_healthy(s: &ServerFacts, leader_term: u64, leader_index: u64, limits: &Limits) -> bool {
    let Some(contact) = s.last_contact else { return false };
    s.alive
        && contact <= limits.heartbeat + limits.last_contact_threshold
        && s.last_term == leader_term
        && s.last_index.saturating_add(limits.max_trailing_logs) >= leader_index
}

/// Consul's failure tolerance: healthy voters beyond a quorum of the voters (never negative).
pub fn failure_tolerance(voters: usize, healthy_voters: usize) -> usize {
    if voters == 0 {
        return 0;
    }
    healthy_voters.saturating_sub(voters / 2 + 1)
}

/// Go's `time.Duration` text (`0s`, `12.5ms`, `1.5s`, `1m30s`, `1h0m0s`, `500µs`), as Consul's
/// APIs show durations.
pub fn go_duration(d: Duration) -> String {
    let ns = d.as_nanos();
    if ns == 0 {
        return "0s".into();
    }
    // Whole units and the fraction below them, without trailing zeros.
    let frac = |v: u128, unit: u128| -> String {
        let (whole, rest) = (v / unit, v % unit);
        if rest == 0 {
            return whole.to_string();
        }
        let width = unit.ilog10() as usize;
        let digits = format!("{rest:0width$}");
        format!("{whole}.{}", digits.trim_end_matches('0'))
    };
    if ns < 1_000 {
        return format!("{ns}ns");
    }
    if ns < 1_000_000 {
        return format!("{}µs", frac(ns, 1_000));
    }
    if ns < 1_000_000_000 {
        return format!("{}ms", frac(ns, 1_000_000));
    }
    let secs = ns / 1_000_000_000;
    let sub = ns % 1_000_000_000;
    let (h, m, s) = (secs / 3600, (secs / 60) % 60, secs % 60);
    let s = frac(s * 1_000_000_000 + sub, 1_000_000_000);
    if h > 0 {
        format!("{h}h{m}m{s}s")
    } else if m > 0 {
        format!("{m}m{s}s")
    } else {
        format!("{s}s")
    }
}

/// One member of the group as autopilot sees it.
#[derive(Clone, Debug)]
pub struct ServerHealth {
    /// Raft id.
    pub id: NodeId,
    /// Node name.
    pub name: String,
    /// RPC address.
    pub address: String,
    /// Its gossip status as Serf names it: `alive`, `failed`, `left`, or `none` (unknown).
    pub serf: &'static str,
    /// Whether it leads.
    pub leader: bool,
    /// Whether it votes.
    pub voter: bool,
    /// What the leader knows of it.
    pub facts: ServerFacts,
    /// Consul's health rule.
    pub healthy: bool,
    /// Since when (Unix milliseconds) it has been as healthy (or not) as it is now.
    pub stable_since_ms: u64,
}

/// The whole group as autopilot sees it from the leader.
#[derive(Clone, Debug)]
pub struct GroupHealth {
    /// Every member, voters first, by name.
    pub servers: Vec<ServerHealth>,
    /// Every member is healthy.
    pub healthy: bool,
    /// See [`failure_tolerance`].
    pub failure_tolerance: usize,
}

/// The group's health from the leader's metrics `m`, the members' last answers (`contacts`)
/// and gossip (`members`, the servers of datacenter `dc`), under `config`; `now_ms` (Unix
/// milliseconds) dates health changes.
pub fn group_health(
    m: &openraft::RaftMetrics<NodeId, super::MeshNode>,
    contacts: &Contacts,
    members: &[crate::gossip::Member],
    dc: &str,
    config: &mesh_core::state::AutopilotConfig,
    heartbeat: Duration,
    now_ms: u64,
) -> GroupHealth {
    use crate::gossip::{MemberStatus, Role};
    let limits = Limits {
        last_contact_threshold: Duration::from_millis(config.last_contact_threshold_ms),
        heartbeat,
        max_trailing_logs: config.max_trailing_logs,
    };
    let leader_index = m.last_log_index.unwrap_or(0);
    let membership = m.membership_config.membership();
    let voters: std::collections::BTreeSet<NodeId> = membership.voter_ids().collect();
    let mut servers: Vec<ServerHealth> = membership
        .nodes()
        .map(|(id, node)| {
            let gossip = members
                .iter()
                .find(|g| g.role == Role::Server && g.datacenter == dc && super::raft_id(&g.node_id) == *id);
            let serf = match gossip.map(|g| g.status) {
                Some(MemberStatus::Alive | MemberStatus::Suspect) => "alive",
                Some(MemberStatus::Failed) => "failed",
                Some(MemberStatus::Left) => "left",
                None => "none",
            };
            let leader = *id == m.id;
            let facts = if leader {
                ServerFacts {
                    alive: serf == "alive",
                    last_contact: Some(Duration::ZERO),
                    last_term: m.current_term,
                    last_index: leader_index,
                }
            } else {
                let matched = m.replication.as_ref().and_then(|r| r.get(id).copied().flatten());
                ServerFacts {
                    alive: serf == "alive",
                    last_contact: contacts.since_ack(*id),
                    last_term: matched.map(|l| l.leader_id.term).unwrap_or(0),
                    last_index: matched.map(|l| l.index).unwrap_or(0),
                }
            };
            let healthy = server_healthy(&facts, m.current_term, leader_index, &limits);
            ServerHealth {
                id: *id,
                name: node.name.clone(),
                address: node.rpc.clone(),
                serf,
                leader,
                voter: voters.contains(id),
                stable_since_ms: contacts.stable_since(*id, healthy, now_ms),
                facts,
                healthy,
            }
        })
        .collect();
    servers.sort_by(|a, b| (!a.voter, &a.name).cmp(&(!b.voter, &b.name)));
    let healthy_voters = servers.iter().filter(|s| s.voter && s.healthy).count();
    GroupHealth {
        healthy: servers.iter().all(|s| s.healthy),
        failure_tolerance: failure_tolerance(voters.len(), healthy_voters),
        servers,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        last_contact_threshold: Duration::from_millis(200),
        heartbeat: Duration::from_millis(150),
        max_trailing_logs: 250,
    };

    fn facts(alive: bool, contact_ms: Option<u64>, term: u64, index: u64) -> ServerFacts {
        ServerFacts { alive, last_contact: contact_ms.map(Duration::from_millis), last_term: term, last_index: index }
    }

    #[test]
    fn health_follows_consuls_rules() {
        assert!(server_healthy(&facts(true, Some(0), 3, 1000), 3, 1000, &LIMITS), "the leader itself");
        assert!(server_healthy(&facts(true, Some(340), 3, 800), 3, 1000, &LIMITS), "within heartbeat + threshold");
        assert!(!server_healthy(&facts(true, Some(351), 3, 1000), 3, 1000, &LIMITS), "heard from too long ago");
        assert!(!server_healthy(&facts(true, None, 3, 1000), 3, 1000, &LIMITS), "never heard from");
        assert!(!server_healthy(&facts(false, Some(10), 3, 1000), 3, 1000, &LIMITS), "gossip says failed");
        assert!(!server_healthy(&facts(true, Some(10), 2, 1000), 3, 1000, &LIMITS), "an older term");
        assert!(!server_healthy(&facts(true, Some(10), 3, 749), 3, 1000, &LIMITS), "too far behind");
        assert!(server_healthy(&facts(true, Some(10), 3, 750), 3, 1000, &LIMITS), "just within MaxTrailingLogs");
    }

    #[test]
    fn failure_tolerance_is_healthy_voters_beyond_a_quorum() {
        assert_eq!(failure_tolerance(3, 3), 1);
        assert_eq!(failure_tolerance(3, 2), 0);
        assert_eq!(failure_tolerance(3, 1), 0);
        assert_eq!(failure_tolerance(5, 5), 2);
        assert_eq!(failure_tolerance(5, 4), 1);
        assert_eq!(failure_tolerance(1, 1), 0);
        assert_eq!(failure_tolerance(0, 0), 0);
    }

    #[test]
    fn durations_read_as_go_prints_them() {
        let ms = Duration::from_millis;
        assert_eq!(go_duration(Duration::ZERO), "0s");
        assert_eq!(go_duration(Duration::from_micros(12_500)), "12.5ms");
        assert_eq!(go_duration(ms(200)), "200ms");
        assert_eq!(go_duration(ms(1500)), "1.5s");
        assert_eq!(go_duration(ms(10_000)), "10s");
        assert_eq!(go_duration(ms(90_000)), "1m30s");
        assert_eq!(go_duration(ms(3_600_000)), "1h0m0s");
        assert_eq!(go_duration(Duration::from_micros(500)), "500µs");
        assert_eq!(go_duration(Duration::from_nanos(7)), "7ns");
        assert_eq!(go_duration(Duration::from_nanos(1_000_000_001)), "1.000000001s");
    }

    #[test]
    fn contacts_track_the_leader_members_and_stability() {
        let c = Contacts::default();
        assert!(c.since_ack(7).is_none());
        c.acked(7);
        assert!(c.since_ack(7).unwrap() < Duration::from_secs(5));
        c.heard_from_leader();
        assert!(c.since_leader() < Duration::from_secs(5));
        assert_eq!(c.stable_since(7, true, 100), 100);
        assert_eq!(c.stable_since(7, true, 200), 100, "unchanged health keeps its start");
        assert_eq!(c.stable_since(7, false, 300), 300, "a change starts again");
        assert_eq!(c.stable_since(7, true, 400), 400);
    }
}
