//! The task that owns the UDP socket and foca: packets in, timers, inputs from the handle; packets out,
//! timers scheduled, the member list published.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use foca::{AccumulatingRuntime, Foca, OwnedNotification, PostcardCodec, State, Timer};
use rand_foca::SeedableRng;
use rand_foca::rngs::SmallRng;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use super::envelope::{self, EnvelopeError};
use super::identity::{LeaveHandler, LeftNodes, NodeIdentity, encode_leave};
use super::{DropCounters, GossipConfig, GossipError, GossipTiming, Input, Member, MemberStatus};

/// UDP packets stay below this (envelope included), as foca's LAN default.
const MAX_DATAGRAM: usize = 1400;
/// A dropped-packet warning per peer and reason at most this often.
const LOG_EVERY: Duration = Duration::from_secs(10);
/// Forget rate-limit entries beyond this many peers (spoofed sources must not grow memory).
const MAX_LOG_ENTRIES: usize = 4096;
/// At most this many addresses announced to per rejoin attempt.
const MAX_REJOIN_TARGETS: usize = 8;
/// Without notifications, the member list is recomputed at most this often (to show Suspect members).
const REPUBLISH_EVERY: Duration = Duration::from_millis(100);

type Swim = Foca<NodeIdentity, PostcardCodec, SmallRng, LeaveHandler>;

/// Why a packet was dropped, for counters and the rate limiter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Drop {
    Garbage,
    Version,
    Datacenter,
    Invalid,
}

pub(crate) struct Driver {
    foca: Swim,
    runtime: AccumulatingRuntime<NodeIdentity>,
    socket: Box<dyn super::Datagrams>,
    inputs: mpsc::Receiver<Input>,
    members_tx: watch::Sender<Arc<Vec<Member>>>,
    dropped: Arc<DropCounters>,
    left: LeftNodes,
    dc: String,
    timing: GossipTiming,
    max_foca_packet: usize,
    /// The cluster size foca's config was last computed for.
    configured_size: u32,
    join: Vec<SocketAddr>,
    timers: BinaryHeap<Reverse<(Instant, Timer<NodeIdentity>, u64)>>,
    timer_seq: u64,
    pending_joins: Vec<(Vec<SocketAddr>, oneshot::Sender<SocketAddr>)>,
    leaving: bool,
    /// While no other member is live (foca idle, its own timers stopped): when to announce again and the
    /// current backoff.
    rejoin: Option<(Instant, Duration)>,
    last_publish: Instant,
    /// Members seen Suspect: (identity, incarnation) → since when. foca only times out suspicions it raised
    /// itself; a suspicion learnt by gossip from a node that then vanished (or renewed) would stay forever.
    suspects: BTreeMap<(NodeIdentity, foca::Incarnation), Instant>,
    log_limits: LogLimiter<(SocketAddr, Drop)>,
    send_buf: Vec<u8>,
}

impl Driver {
    pub(crate) fn new(
        identity: NodeIdentity,
        config: &GossipConfig,
        socket: Box<dyn super::Datagrams>,
        inputs: mpsc::Receiver<Input>,
        members_tx: watch::Sender<Arc<Vec<Member>>>,
        dropped: Arc<DropCounters>,
    ) -> Result<Self, GossipError> {
        let pool = config.pool.clone().unwrap_or_else(|| config.datacenter.clone());
        let max_foca_packet = MAX_DATAGRAM - envelope::header_len(&pool);
        // Two identities ride in every header; leave most of the packet for updates.
        let id_len = postcard_len(&identity)?;
        if id_len > max_foca_packet / 4 {
            return Err(GossipError::InvalidConfig(format!("gossip identity is {id_len} bytes, too big for a packet")));
        }
        let left = LeftNodes::default();
        let foca = Foca::with_custom_broadcast(
            identity,
            config.timing.foca_config(1, max_foca_packet),
            SmallRng::seed_from_u64(config.seed),
            PostcardCodec,
            LeaveHandler(left.clone()),
        );
        let mut driver = Self {
            foca,
            runtime: AccumulatingRuntime::new(),
            socket,
            inputs,
            members_tx,
            dropped,
            left,
            dc: pool,
            timing: config.timing.clone(),
            max_foca_packet,
            configured_size: 1,
            join: config.join.clone(),
            timers: BinaryHeap::new(),
            timer_seq: 0,
            pending_joins: Vec::new(),
            leaving: false,
            rejoin: None,
            last_publish: Instant::now(),
            suspects: BTreeMap::new(),
            log_limits: LogLimiter::default(),
            send_buf: Vec::with_capacity(MAX_DATAGRAM),
        };
        driver.publish();
        Ok(driver)
    }

    pub(crate) async fn run(mut self) {
        let mut recv_buf = vec![0u8; 65536];
        // Serf's reconnect: now and then announce to failed members and the join addresses even
        // when not alone, so two parts of a pool that each still have members (e.g. agents
        // around a server that restarted with a new identity) find each other again.
        let reconnect_every = self.timing.retry_join_max.max(self.timing.retry_join_initial);
        let mut next_reconnect = Instant::now() + reconnect_every;
        loop {
            let next_timer = self.timers.peek().map(|Reverse((at, _, _))| *at);
            let next_rejoin = self.rejoin.map(|(at, _)| at);
            tokio::select! {
                biased;
                input = self.inputs.recv() => match input {
                    None | Some(Input::Shutdown) => break,
                    Some(input) => self.handle_input(input),
                },
                received = self.socket.recv_from(&mut recv_buf) => match received {
                    Ok((len, src)) => {
                        // A test's partition (crate::partition): the packet never arrived.
                        if !(crate::partition::active()
                            && self.socket.local_addr().is_ok_and(|l| crate::partition::blocked(l.ip(), src.ip())))
                        {
                            self.handle_packet(&recv_buf[..len], src);
                        }
                    }
                    // ICMP errors surface here on some systems; the socket stays usable. A pause keeps a
                    // persistent error from spinning the task.
                    Err(err) => {
                        tracing::debug!("gossip: receive error: {err}");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                },
                () = sleep_until(next_timer), if next_timer.is_some() => self.fire_timers(),
                () = sleep_until(next_rejoin), if next_rejoin.is_some() => self.rejoin_attempt(),
                () = tokio::time::sleep_until(next_reconnect) => {
                    next_reconnect = Instant::now() + reconnect_every;
                    if !self.leaving {
                        self.announce_to_join();
                    }
                }
            }

            self.drain().await;
        }
        tracing::debug!("gossip: task stopped");
    }

    fn handle_input(&mut self, input: Input) {
        match input {
            Input::Join { addrs, answered } => {
                let own = self.foca.identity().gossip;
                for addr in addrs.iter().copied().filter(|a| *a != own) {
                    if let Err(err) = self.foca.announce(NodeIdentity::placeholder(addr), &mut self.runtime) {
                        tracing::debug!("gossip: announce to {addr} failed: {err}");
                    }
                }
                self.pending_joins.push((addrs, answered));
            }
            Input::Leave(done) => {
                self.leave();
                let _ = done.send(());
            }
            Input::Shutdown => {}
        }
    }

    fn leave(&mut self) {
        if self.leaving {
            return;
        }
        self.leaving = true;
        let me = self.foca.identity().clone();
        // The leave notice rides along foca's own "down" update, so the others tell a leave from a failure.
        if let Err(err) = self.foca.add_broadcast(&encode_leave(&me.node_id, me.generation)) {
            tracing::warn!("gossip: cannot queue the leave notice: {err}");
        }
        match self.foca.leave_cluster(&mut self.runtime) {
            Ok(()) => tracing::info!("gossip: {} left the pool", me.name),
            Err(err) => tracing::warn!("gossip: leave failed: {err}"),
        }
    }

    fn handle_packet(&mut self, packet: &[u8], src: SocketAddr) {
        let payload = match envelope::decode(packet, &self.dc) {
            Ok(payload) => payload,
            Err(err) => {
                let reason = match err {
                    EnvelopeError::Garbage { .. } => Drop::Garbage,
                    EnvelopeError::Version { .. } => Drop::Version,
                    EnvelopeError::Datacenter { .. } => Drop::Datacenter,
                };
                self.dropped_packet(src, reason, &err);
                return;
            }
        };
        if payload.len() > self.max_foca_packet {
            self.dropped_packet(src, Drop::Invalid, &format!("{} bytes, larger than a gossip packet", payload.len()));
            return;
        }
        match self.foca.handle_data(payload, &mut self.runtime) {
            Ok(()) => self.answered(src),
            Err(
                err @ (foca::Error::Decode(_)
                | foca::Error::MalformedPacket
                | foca::Error::DataTooBig
                | foca::Error::CustomBroadcast(_)),
            ) => self.dropped_packet(src, Drop::Invalid, &format!("invalid gossip payload: {err}")),
            Err(foca::Error::DataFromOurselves) => self.dropped_packet(
                src,
                Drop::Invalid,
                &"it claims to come from this node (two nodes advertising the same address?)",
            ),
            Err(err) => tracing::debug!("gossip: packet from {src}: {err}"),
        }
    }

    /// Counts a dropped packet and warns, at most once per peer and reason every [`LOG_EVERY`].
    fn dropped_packet(&mut self, src: SocketAddr, reason: Drop, why: &dyn std::fmt::Display) {
        let counter = match reason {
            Drop::Garbage => &self.dropped.garbage,
            Drop::Version => &self.dropped.version,
            Drop::Datacenter => &self.dropped.datacenter,
            Drop::Invalid => &self.dropped.invalid,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        if let Some(suppressed) = self.log_limits.allow((src, reason), Instant::now()) {
            let more = if suppressed > 0 {
                format!(" ({suppressed} more from this peer since the last report)")
            } else {
                String::new()
            };
            tracing::warn!("gossip: dropped packet from {src}: {why}{more}");
        }
    }

    fn fire_timers(&mut self) {
        let now = Instant::now();
        while let Some(Reverse((at, _, _))) = self.timers.peek() {
            if *at > now {
                break;
            }
            let Some(Reverse((_, timer, _))) = self.timers.pop() else { break };
            if let Err(err) = self.foca.handle_timer(timer, &mut self.runtime) {
                tracing::debug!("gossip: timer: {err}");
            }
        }
    }

    /// Sends what foca queued, schedules its timers, reacts to its notifications, publishes the members.
    async fn drain(&mut self) {
        let mut changed = false;
        self.expire_suspects();
        loop {
            while let Some((dst, data)) = self.runtime.to_send() {
                self.send_buf.clear();
                envelope::encode(&self.dc, &data, &mut self.send_buf);
                if crate::partition::active()
                    && self.socket.local_addr().is_ok_and(|l| crate::partition::blocked(l.ip(), dst.gossip.ip()))
                {
                    continue;
                }
                if let Err(err) = self.socket.send_to(&self.send_buf, dst.gossip).await {
                    tracing::debug!("gossip: send to {} failed: {err}", dst.gossip);
                }
            }
            let now = Instant::now();
            while let Some((after, timer)) = self.runtime.to_schedule() {
                self.timer_seq += 1;
                self.timers.push(Reverse((now + after, timer, self.timer_seq)));
            }
            let mut more = false;
            while let Some(notification) = self.runtime.to_notify() {
                changed = true;
                more |= self.notified(notification);
            }
            if !more && self.runtime.backlog() == 0 {
                break;
            }
        }
        changed |= self.left.take_changed();
        if changed {
            self.resize();
        }
        // Suspicion comes without a notification: republish now and then even when nothing was notified.
        if changed || self.last_publish.elapsed() >= REPUBLISH_EVERY {
            self.publish();
        }
        self.check_pending_joins();
    }

    /// Declares failed the members that stayed Suspect (same incarnation) for twice the suspicion timeout
    /// without refuting: whoever suspected them should have done it after one timeout.
    fn expire_suspects(&mut self) {
        if self.suspects.is_empty() || self.leaving {
            return;
        }
        let size = u32::try_from(self.foca.num_members() + 1).unwrap_or(u32::MAX);
        let limit = self.timing.suspicion(size) * 2 + self.timing.probe_period;
        let expired: Vec<(NodeIdentity, foca::Incarnation)> =
            self.suspects.iter().filter(|(_, since)| since.elapsed() >= limit).map(|(k, _)| k.clone()).collect();
        for (id, incarnation) in expired {
            self.suspects.remove(&(id.clone(), incarnation));
            tracing::warn!("gossip: {id:?} stayed suspect for {limit:?} without refuting; declaring it failed");
            let down = foca::Member::new(id, incarnation, State::Down);
            if let Err(err) = self.foca.apply_many(std::iter::once(down), true, &mut self.runtime) {
                tracing::debug!("gossip: cannot declare a suspect failed: {err}");
            }
        }
    }

    /// Reacts to one notification; true when it queued more work for foca's runtime.
    fn notified(&mut self, notification: OwnedNotification<NodeIdentity>) -> bool {
        match notification {
            OwnedNotification::MemberUp(id) => tracing::info!("gossip: member up: {id:?} ({})", id.role),
            OwnedNotification::MemberDown(id) => tracing::info!("gossip: member down: {id:?}"),
            OwnedNotification::Rename(old, new) => tracing::info!("gossip: member {old:?} is now {new:?}"),
            OwnedNotification::Active => {
                tracing::info!("gossip: connected to the pool");
                self.rejoin = None;
            }
            OwnedNotification::Idle => {
                tracing::info!("gossip: no other live member");
                if !self.leaving {
                    let wait = self.timing.retry_join_initial;
                    self.rejoin = Some((Instant::now() + wait, wait));
                }
            }
            OwnedNotification::Rejoin(id) => {
                tracing::warn!("gossip: the pool declared this node down; rejoined as {id:?}");
                self.announce_to_join();
                return true;
            }
            OwnedNotification::Defunct if self.leaving => {}
            OwnedNotification::Defunct => {
                // foca renews the identity itself (Identity::renew) before going defunct; if it still did, do
                // it here and announce, so a live node never stays out of the pool.
                let renewed = foca::Identity::renew(self.foca.identity());
                if let Some(renewed) = renewed {
                    tracing::warn!("gossip: declared down by the pool; rejoining as {renewed:?}");
                    if let Err(err) = self.foca.change_identity(renewed, &mut self.runtime) {
                        tracing::warn!("gossip: rejoin failed: {err}");
                    }
                    self.announce_to_join();
                    return true;
                }
            }
        }
        false
    }

    fn announce_to_join(&mut self) {
        for addr in self.rejoin_targets() {
            let _ = self.foca.announce(NodeIdentity::placeholder(addr), &mut self.runtime);
        }
    }

    /// The join addresses, and the members last seen (now down): whom to announce to when alone.
    fn rejoin_targets(&self) -> Vec<SocketAddr> {
        let own = self.foca.identity().gossip;
        let mut targets: Vec<SocketAddr> = self.join.iter().copied().filter(|a| *a != own).collect();
        let down = self
            .foca
            .iter_membership_state()
            .filter(|m| m.state() == State::Down && !self.left.has_left(&m.id().node_id, m.id().generation))
            .map(|m| m.id().gossip);
        for addr in down {
            if targets.len() >= MAX_REJOIN_TARGETS {
                break;
            }
            if addr != own && !targets.contains(&addr) {
                targets.push(addr);
            }
        }
        targets
    }

    /// Alone (foca idle): announce to the join addresses and the failed members again, with backoff, so a
    /// node cut off by a partition comes back by itself once it heals (foca stops its own timers when idle).
    fn rejoin_attempt(&mut self) {
        let Some((_, wait)) = self.rejoin else { return };
        if self.leaving || self.foca.num_members() > 0 {
            self.rejoin = None;
            return;
        }
        let targets = self.rejoin_targets();
        if targets.is_empty() {
            self.rejoin = None;
            return;
        }
        let next = (wait * 2).min(self.timing.retry_join_max.max(self.timing.retry_join_initial));
        tracing::warn!("gossip: no live member; announcing to {targets:?}, again in {next:?} if alone");
        self.announce_to_join();
        self.rejoin = Some((Instant::now() + next, next));
    }

    /// Re-applies foca's config for the current pool size (suspicion and transmissions grow with it).
    fn resize(&mut self) {
        let size = u32::try_from(self.foca.num_members() + 1).unwrap_or(u32::MAX);
        if size != self.configured_size {
            match self.foca.set_config(self.timing.foca_config(size, self.max_foca_packet)) {
                Ok(()) => self.configured_size = size,
                Err(err) => tracing::warn!("gossip: cannot resize the config to {size} members: {err}"),
            }
        }
    }

    /// A packet from `src` was accepted: answer the joins waiting for it.
    fn answered(&mut self, src: SocketAddr) {
        let mut i = 0;
        while i < self.pending_joins.len() {
            if self.pending_joins[i].0.contains(&src) {
                let (_, tx) = self.pending_joins.swap_remove(i);
                let _ = tx.send(src);
            } else {
                i += 1;
            }
        }
    }

    /// Answers joins whose address is now a live member (it may answer from another source address), and
    /// forgets joins nobody waits for any more.
    fn check_pending_joins(&mut self) {
        if self.pending_joins.is_empty() {
            return;
        }
        let live: Vec<SocketAddr> = self.foca.iter_members().map(|m| m.id().gossip).collect();
        let pending = std::mem::take(&mut self.pending_joins);
        for (addrs, tx) in pending {
            if tx.is_closed() {
                continue;
            }
            match addrs.iter().find(|a| live.contains(a)) {
                Some(addr) => {
                    let _ = tx.send(*addr);
                }
                None => self.pending_joins.push((addrs, tx)),
            }
        }
    }

    fn publish(&mut self) {
        self.last_publish = Instant::now();
        let me = self.foca.identity();
        let own = Member::from_identity(me, if self.leaving { MemberStatus::Left } else { MemberStatus::Alive });
        let mut by_node: BTreeMap<String, Member> = BTreeMap::new();
        let now = Instant::now();
        let mut suspects = BTreeMap::new();
        for m in self.foca.iter_membership_state() {
            let id = m.id();
            if m.state() == State::Suspect {
                let key = (id.clone(), m.incarnation());
                let since = self.suspects.get(&key).copied().unwrap_or(now);
                suspects.insert(key, since);
            }
            if id.node_id == me.node_id || id.node_id.is_empty() {
                continue;
            }
            let status = match m.state() {
                State::Alive => MemberStatus::Alive,
                State::Suspect => MemberStatus::Suspect,
                State::Down if self.left.has_left(&id.node_id, id.generation) => MemberStatus::Left,
                State::Down => MemberStatus::Failed,
            };
            let member = Member::from_identity(id, status);
            match by_node.get(&id.node_id) {
                Some(existing) if existing.generation >= member.generation => {}
                _ => {
                    by_node.insert(id.node_id.clone(), member);
                }
            }
        }
        self.suspects = suspects;
        let mut members: Vec<Member> = by_node.into_values().chain(std::iter::once(own)).collect();
        members.sort_by(|a, b| a.name.cmp(&b.name).then(a.node_id.cmp(&b.node_id)));
        self.members_tx.send_if_modified(|current| {
            if current.as_slice() == members.as_slice() {
                false
            } else {
                *current = Arc::new(members);
                true
            }
        });
    }
}

/// At most one log line per key every [`LOG_EVERY`], counting what it holds back.
struct LogLimiter<K> {
    entries: BTreeMap<K, (Instant, u64)>,
}

impl<K> Default for LogLimiter<K> {
    fn default() -> Self {
        Self { entries: BTreeMap::new() }
    }
}

impl<K: Ord> LogLimiter<K> {
    /// `Some(held back since the last line)` when a line for `key` may be logged at `now`, else `None`.
    fn allow(&mut self, key: K, now: Instant) -> Option<u64> {
        if self.entries.len() >= MAX_LOG_ENTRIES {
            self.entries.retain(|_, (at, _)| now.duration_since(*at) < LOG_EVERY);
        }
        match self.entries.get_mut(&key) {
            Some((at, held)) if now.duration_since(*at) < LOG_EVERY => {
                *held += 1;
                None
            }
            entry => {
                let held = entry.map(|(_, held)| *held).unwrap_or(0);
                self.entries.insert(key, (now, 0));
                Some(held)
            }
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The encoded size of an identity (postcard, as foca's codec writes it).
fn postcard_len(identity: &NodeIdentity) -> Result<usize, GossipError> {
    use foca::Codec;
    let mut buf = Vec::new();
    let member = foca::Member::alive(identity.clone());
    PostcardCodec
        .encode_member(&member, &mut buf)
        .map_err(|err| GossipError::InvalidConfig(format!("gossip identity cannot be encoded: {err}")))?;
    Ok(buf.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_limiter_reports_once_per_peer_per_period_with_a_count() {
        let mut limiter = LogLimiter::default();
        let t0 = Instant::now();
        assert_eq!(limiter.allow("a", t0), Some(0));
        for _ in 0..5 {
            assert_eq!(limiter.allow("a", t0 + Duration::from_secs(1)), None);
        }
        assert_eq!(limiter.allow("b", t0 + Duration::from_secs(1)), Some(0), "another peer has its own line");
        assert_eq!(limiter.allow("a", t0 + LOG_EVERY), Some(5));
        assert_eq!(limiter.allow("a", t0 + LOG_EVERY), None);
    }

    #[test]
    fn log_limiter_memory_is_bounded() {
        let mut limiter = LogLimiter::default();
        let t0 = Instant::now();
        for i in 0..MAX_LOG_ENTRIES {
            limiter.allow(i, t0);
        }
        limiter.allow(usize::MAX, t0 + LOG_EVERY);
        assert_eq!(limiter.entries.len(), 1);
    }
}
