//! A deterministic simulation of mesh's replicated log (issue 15, first part): three servers,
//! each mesh's Raft (openraft over mesh's RPC, its segment log store and state machine on a
//! data dir that survives restarts), a client writing keys of its own and three clients on
//! shared registers, as turmoil hosts on virtual time. One seed derives everything: turmoil's
//! network (latency, message order, links failing at random), the faults (partitions full and
//! one-way, held links, crashes and restarts with the data dir kept), the clients' choices,
//! openraft's election timeouts ([`mesh_server::raft::runtime`]) and tokio's own random choices
//! (turmoil seeds them when built with `--cfg tokio_unstable`, which `.cargo/config.toml` sets).
//!
//! After every step the invariants hold or the run fails with its seed: no server's vote goes
//! back (across restarts too), a new leader holds every earlier acknowledged write, and servers
//! that applied the same log entry hold the same state (see [`check_step`] on openraft's
//! leaders per term). After the faults stop
//! (the healing phase), within a bounded virtual time every server applies the same last entry
//! and every write acknowledged to the client is in every server's state (none lost). The run's
//! trace (leaders, faults, acknowledgements, the final state) hashes to one number: the same
//! seed gives the same hash.

// The Jepsen tests' checker; the registers here only read and write (no CAS).
#[allow(dead_code)]
#[path = "../../../../tests/support/linearizability.rs"]
mod linearizability;

use linearizability::{Input, Op, Output};

pub mod cluster;

use mesh_core::kv::{KvOp, KvValue, SetMode};
use mesh_core::state::Command;
use mesh_server::raft::{Applied, Batch, MeshNetwork, MeshNode, MeshStateMachine, NodeId, RaftHandler, TypeConfig};
use mesh_server::raft::{RaftTiming, SegmentLogStore};
use mesh_server::rpc::{BoxIo, Hello, Listener, Role, Server, Transport};
use openraft::Raft;
use openraft::error::{ClientWriteError, RaftError};
use rand::{Rng, SeedableRng, rngs::StdRng};
use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::hash::{Hash, Hasher};
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

/// mesh's RPC over turmoil's simulated TCP.
struct SimTransport;

struct SimListener(turmoil::net::TcpListener);

#[async_trait::async_trait]
impl Listener for SimListener {
    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.0.local_addr()
    }
    async fn accept(&mut self) -> io::Result<(BoxIo, SocketAddr)> {
        let (s, a) = self.0.accept().await?;
        Ok((Box::new(s), a))
    }
}

#[async_trait::async_trait]
impl Transport for SimTransport {
    async fn connect(&self, addr: SocketAddr) -> io::Result<BoxIo> {
        Ok(Box::new(turmoil::net::TcpStream::connect(addr).await?))
    }
    async fn listen(&self, addr: SocketAddr) -> io::Result<Box<dyn Listener>> {
        Ok(Box::new(SimListener(turmoil::net::TcpListener::bind(addr).await?)))
    }
}

/// Raft timing of the simulation: heartbeat 100 ms, elections 200–400 ms (virtual).
const TIMING: RaftTiming = RaftTiming { multiplier: 0.2 };
/// The RPC port of every server.
const PORT: u16 = 8300;
/// Virtual time per step.
const TICK: Duration = Duration::from_millis(10);

/// What a run is made of.
#[derive(Clone, Debug)]
pub struct Plan {
    /// The seed of everything.
    pub seed: u64,
    /// How long faults go on (virtual).
    pub faults_for: Duration,
    /// How long the healing phase may take before the run counts as not live.
    pub heal_within: Duration,
    /// How many writes the client makes.
    pub writes: usize,
    /// Test-only bug: the state machines drop the commands of every entry whose index is a
    /// multiple of this (0: none).
    pub bug_drop_every: u64,
    /// Clients reading and writing shared registers (checked for linearizability).
    pub register_clients: usize,
    /// Operations of each.
    pub register_ops: usize,
    /// Register reads from whichever server is asked, without a quorum check (what `?stale`
    /// does): not linearizable under partitions, which the checker must see.
    pub stale_reads: bool,
    /// A slow disk: each log write waits up to this long (virtual), and a crash loses what was
    /// not written yet.
    pub slow_disk: Duration,
    /// Whether servers crash (and restart).
    pub crashes: bool,
}

impl Plan {
    /// A short run (CI's seeds).
    pub fn short(seed: u64) -> Plan {
        Plan {
            seed,
            faults_for: Duration::from_secs(20),
            heal_within: Duration::from_secs(30),
            writes: 60,
            bug_drop_every: 0,
            register_clients: 3,
            register_ops: 40,
            stale_reads: false,
            crashes: true,
            slow_disk: Duration::from_millis(if seed.is_multiple_of(2) { 30 } else { 0 }),
        }
    }
}

/// The outcome of a run.
#[derive(Debug)]
pub struct Outcome {
    /// Every event, in order (virtual milliseconds first).
    pub trace: Vec<String>,
    /// The trace's hash.
    pub hash: u64,
    /// The first invariant broken, if any.
    pub failure: Option<String>,
}

impl Outcome {
    /// The outcome of a run that traced `trace` (hashed) and broke `failure`, if anything.
    fn of(trace: Vec<String>, failure: Option<String>) -> Outcome {
        let mut h = std::hash::DefaultHasher::new();
        trace.hash(&mut h);
        Outcome { hash: h.finish(), trace, failure }
    }
}

/// The faults whose time is up at `now`, taken out of `faults` in order.
fn faults_over<F>(faults: &mut Vec<(F, Duration)>, now: Duration) -> Vec<F> {
    let (over, rest): (Vec<_>, Vec<_>) = std::mem::take(faults).into_iter().partition(|(_, until)| *until <= now);
    *faults = rest;
    over.into_iter().map(|(f, _)| f).collect()
}

/// A run's data dirs: in memory where there is a tmpfs (the log store syncs every write).
fn data_dirs() -> tempfile::TempDir {
    let shm = std::path::Path::new("/dev/shm");
    if shm.is_dir() { tempfile::tempdir_in(shm) } else { tempfile::tempdir() }.expect("tempdir")
}

/// What the hosts share with the driver (all on the simulation's one thread).
#[derive(Default)]
struct World {
    /// The running servers' Raft handles and applied states.
    rafts: BTreeMap<NodeId, (Raft<TypeConfig>, tokio::sync::watch::Receiver<Applied>)>,
    /// Writes the client was told succeeded: key → value.
    acked: BTreeMap<String, String>,
    /// Events, in order.
    trace: Vec<String>,
    /// Whether the client is done.
    client_done: bool,
    /// Each server's last seen term, role and leader (traced when they change).
    roles: BTreeMap<NodeId, String>,
    /// The log entries of acknowledged writes: (leader id as (term, node), index).
    acked_at: Vec<((u64, NodeId), u64)>,
    /// Each server's highest vote seen, across its restarts.
    votes: BTreeMap<NodeId, (u64, NodeId)>,
    /// Every leader id seen leading.
    leaders: BTreeSet<(u64, NodeId)>,
    /// The registers' histories (reads and writes of `r0`..): key → operations.
    history: BTreeMap<String, Vec<Op>>,
    /// Register clients still running.
    registers_running: usize,
}

type Shared = Rc<RefCell<World>>;

fn name(id: NodeId) -> String {
    format!("s{id}")
}

fn put(key: &str, value: &str) -> Batch {
    Batch::from(Command::Kv(KvOp::Set {
        key: key.into(),
        value: KvValue::from(value.as_bytes()),
        flags: 0,
        mode: SetMode::Plain,
        now: 1_000,
    }))
}

/// One server: its Raft on the data dir `dir` (kept across restarts), its RPC served on the
/// simulated network. Runs until the host crashes.
async fn server(id: NodeId, dir: PathBuf, ids: Vec<NodeId>, world: Shared) -> turmoil::Result {
    let log = SegmentLogStore::open(&dir)?;
    let sm = MeshStateMachine::open(&dir, "dc1")?;
    let applied = sm.subscribe();
    let transport: Arc<dyn Transport> = Arc::new(SimTransport);
    let listener = transport.listen(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), PORT)).await?;
    let hello =
        Hello { node: name(id), node_id: format!("id-{id}"), datacenter: "dc1".into(), role: Role::Server, http: None };
    let config = Arc::new(TIMING.config("mesh-sim")?);
    let net = MeshNetwork::new(id, transport, hello.clone(), &TIMING);
    let raft = Raft::new(id, config, net, log, sm).await?;
    let handler = RaftHandler::new(raft.clone());
    let _server = Server::start(listener, hello, Arc::new(handler))?;
    if id == ids[0] && !raft.is_initialized().await? {
        let members: BTreeMap<NodeId, MeshNode> = ids
            .iter()
            .map(|&i| {
                let addr = SocketAddr::new(turmoil::lookup(name(i)), PORT);
                (i, MeshNode { name: name(i), rpc: addr.to_string() })
            })
            .collect();
        raft.initialize(members).await?;
    }
    world.borrow_mut().rafts.insert(id, (raft, applied));
    std::future::pending::<()>().await;
    Ok(())
}

/// The server a client asks: `target` (the leader a refusal named) while it runs, else one the
/// seed picks among the running ones; its Raft and applied state.
fn pick(
    world: &Shared,
    target: Option<NodeId>,
    rng: &mut StdRng,
) -> Option<(NodeId, Raft<TypeConfig>, tokio::sync::watch::Receiver<Applied>)> {
    let w = world.borrow();
    let ids: Vec<NodeId> = w.rafts.keys().copied().collect();
    let id = target
        .filter(|t| w.rafts.contains_key(t))
        .or_else(|| (!ids.is_empty()).then(|| ids[rng.random_range(0..ids.len())]))?;
    w.rafts.get(&id).map(|(r, a)| (id, r.clone(), a.clone()))
}

/// The client: `writes` writes of unique keys, each to a server the seed picks, following a
/// refusal to the leader it names; a write is acknowledged when the leader says it applied it.
async fn client(writes: usize, seed: u64, world: Shared) -> turmoil::Result {
    let mut rng = StdRng::seed_from_u64(seed ^ 0xC11E);
    for i in 0..writes {
        let (key, value) = (format!("k{i}"), format!("v{i}-{seed}"));
        let mut target: Option<NodeId> = None;
        for _attempt in 0..20 {
            let Some((id, raft, _)) = pick(&world, target, &mut rng) else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            match tokio::time::timeout(Duration::from_secs(2), raft.client_write(put(&key, &value))).await {
                Ok(Ok(r)) if r.data.results.iter().all(|x| x.is_ok()) => {
                    let mut w = world.borrow_mut();
                    w.trace.push(format!(
                        "{} ack {key} at {} by s{id}",
                        turmoil::elapsed().as_millis(),
                        r.log_id.index
                    ));
                    w.acked.insert(key.clone(), value.clone());
                    w.acked_at.push(((r.log_id.leader_id.term, r.log_id.leader_id.node_id), r.log_id.index));
                    break;
                }
                Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))) => {
                    target = f.leader_id;
                    if target.is_none() {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
                // Refused, timed out or the server died: whether it happened is unknown; the
                // next attempt writes the same value again (a set is idempotent).
                _ => {
                    target = None;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..100))).await;
    }
    world.borrow_mut().client_done = true;
    let at = turmoil::elapsed().as_millis();
    world.borrow_mut().trace.push(format!("{at} client done"));
    Ok(())
}

/// Registers the register clients read and write.
const REGISTERS: u64 = 3;

/// Virtual nanoseconds since the simulation started (one clock for every host).
fn sim_now() -> u64 {
    turmoil::sim_elapsed().unwrap_or_default().as_nanos() as u64
}

/// A register client: `ops` linearizable reads (`ensure_linearizable`, then the server's
/// applied state) and writes of unique values on keys `r0`.., each to a server the seed picks,
/// recorded with their virtual call and return times for the linearizability checker. A write
/// refused by a follower took no effect (not recorded) and goes to the leader it names; one that
/// timed out or failed may or may not have happened (recorded without an answer).
async fn register_client(client: usize, ops: usize, seed: u64, stale: bool, world: Shared) -> turmoil::Result {
    let mut rng = StdRng::seed_from_u64(seed ^ (0xBEEF + client as u64));
    let mut target: Option<NodeId> = None;
    let mut written = 0u64;
    for _ in 0..ops {
        let key = format!("r{}", rng.random_range(0..REGISTERS));
        let Some((_, raft, applied)) = pick(&world, target, &mut rng) else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let call = sim_now();
        let (input, output) = if rng.random_bool(0.5) {
            let r = match stale {
                true => Ok(Ok(None)),
                false => tokio::time::timeout(Duration::from_secs(2), raft.ensure_linearizable()).await,
            };
            match r {
                Ok(Ok(_)) => {
                    let state = applied.borrow().state.clone();
                    let v = state
                        .kv
                        .get(key.as_str())
                        .and_then(|e| std::str::from_utf8(e.value.as_bytes()).ok().and_then(|s| s.parse().ok()));
                    (Input::Read, Some(Output::Value(v)))
                }
                Ok(Err(RaftError::APIError(openraft::error::CheckIsLeaderError::ForwardToLeader(f)))) => {
                    target = f.leader_id;
                    continue;
                }
                // Not answered: a read that never returned changes nothing.
                _ => {
                    target = None;
                    continue;
                }
            }
        } else {
            written += 1;
            let value = ((client as u64) << 32) | written;
            let r =
                tokio::time::timeout(Duration::from_secs(2), raft.client_write(put(&key, &value.to_string()))).await;
            match r {
                Ok(Ok(r)) if r.data.results.iter().all(|x| x.is_ok()) => {
                    (Input::Write(value), Some(Output::Done(true)))
                }
                Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))) => {
                    target = f.leader_id;
                    continue;
                }
                _ => {
                    target = None;
                    (Input::Write(value), None)
                }
            }
        };
        let ret = output.as_ref().map(|_| sim_now());
        world.borrow_mut().history.entry(key).or_default().push(Op { client, call, ret, input, output });
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..150))).await;
    }
    world.borrow_mut().registers_running -= 1;
    Ok(())
}

/// A fault the driver injects.
#[derive(Debug)]
enum Fault {
    Partition(NodeId, NodeId),
    OneWay(NodeId, NodeId),
    Hold(NodeId, NodeId),
    Crash(NodeId),
}

/// Run `plan`.
pub fn run(plan: &Plan) -> Outcome {
    mesh_server::raft::runtime::simulate_on_this_thread(plan.seed);
    mesh_server::raft::runtime::simulate_slow_disk(plan.slow_disk);
    mesh_server::raft::state_machine::sim_bug::drop_every(plan.bug_drop_every);
    let tmp = data_dirs();
    let world: Shared = Rc::default();
    let ids: Vec<NodeId> = vec![1, 2, 3];
    let mut sim = turmoil::Builder::new()
        .rng_seed(plan.seed)
        .tick_duration(TICK)
        .simulation_duration(plan.faults_for + plan.heal_within + Duration::from_secs(60))
        .min_message_latency(Duration::from_millis(1))
        .max_message_latency(Duration::from_millis(40))
        .tcp_capacity(65536)
        // Message loss: links fail at random (and come back) on top of the faults below.
        .fail_rate(0.002)
        .repair_rate(0.05)
        .enable_random_order()
        .build();
    for &id in &ids {
        let (dir, ids, world) = (tmp.path().join(name(id)), ids.clone(), world.clone());
        std::fs::create_dir_all(&dir).expect("data dir");
        sim.host(name(id), move || server(id, dir.clone(), ids.clone(), world.clone()));
    }
    {
        let (writes, seed, world) = (plan.writes, plan.seed, world.clone());
        sim.client("client", client(writes, seed, world));
    }
    world.borrow_mut().registers_running = plan.register_clients;
    for c in 0..plan.register_clients {
        let (ops, seed, stale, world) = (plan.register_ops, plan.seed, plan.stale_reads, world.clone());
        sim.client(format!("reg{c}"), register_client(c, ops, seed, stale, world));
    }

    let mut rng = StdRng::seed_from_u64(plan.seed ^ 0xFA17);
    let mut failure: Option<String> = None;
    let mut faults: Vec<(Fault, Duration)> = Vec::new();
    let mut down: BTreeSet<NodeId> = BTreeSet::new();
    let mut healing_since: Option<Duration> = None;
    let trace = |world: &Shared, at: Duration, e: String| {
        world.borrow_mut().trace.push(format!("{} {e}", at.as_millis()));
    };

    loop {
        if let Err(e) = sim.step() {
            failure = Some(format!("a host failed: {e}"));
            break;
        }
        let now = sim.elapsed();
        // Crashed hosts leave the shared view at once.
        for id in &down {
            world.borrow_mut().rafts.remove(id);
        }
        // Invariants after every step.
        if let Some(why) = check_step(&world, now) {
            failure = Some(why);
            break;
        }
        if now < plan.faults_for {
            // A new fault every second or so, each lasting up to 3 s.
            if rng.random_bool(TICK.as_secs_f64()) {
                let a = ids[rng.random_range(0..ids.len())];
                let b = ids[(ids.iter().position(|x| *x == a).unwrap() + rng.random_range(1..ids.len())) % ids.len()];
                let fault = match rng.random_range(0..4) {
                    0 => {
                        sim.partition(name(a), name(b));
                        Fault::Partition(a, b)
                    }
                    1 => {
                        sim.partition_oneway(name(a), name(b));
                        Fault::OneWay(a, b)
                    }
                    2 => {
                        sim.hold(name(a), name(b));
                        Fault::Hold(a, b)
                    }
                    _ if plan.crashes && !down.contains(&a) && down.is_empty() => {
                        let hosts: Vec<String> = ids
                            .iter()
                            .map(|&i| name(i))
                            .chain(["client".to_owned()])
                            .chain((0..plan.register_clients).map(|c| format!("reg{c}")))
                            .collect();
                        crash_cut_off(&mut sim, &name(a), &hosts);
                        for (f, _) in &faults {
                            redo(&mut sim, f);
                        }
                        down.insert(a);
                        world.borrow_mut().rafts.remove(&a);
                        Fault::Crash(a)
                    }
                    _ => {
                        sim.partition(name(a), "client");
                        Fault::Partition(a, 0)
                    }
                };
                trace(&world, now, format!("fault {fault:?}"));
                let until = now + Duration::from_millis(rng.random_range(200..3000));
                faults.push((fault, until));
            }
        } else if healing_since.is_none() {
            healing_since = Some(now);
            trace(&world, now, "healing".into());
            sim.set_fail_rate(0.0);
            for (f, _) in faults.drain(..) {
                undo(&mut sim, &f, &mut down);
            }
        }
        for f in faults_over(&mut faults, now) {
            trace(&world, now, format!("end {f:?}"));
            undo(&mut sim, &f, &mut down);
        }
        if let Some(since) = healing_since {
            match healed(&world, ids.len()) {
                Ok(()) => break,
                Err(why) if now >= since + plan.heal_within => {
                    failure =
                        Some(format!("not healed {:?} after the faults stopped (at {now:?}): {why}", plan.heal_within));
                    break;
                }
                Err(_) => {}
            }
        }
    }

    // Every register's history must be linearizable.
    if failure.is_none() {
        for (key, ops) in &world.borrow().history {
            if let Err(why) = linearizability::check(ops) {
                failure = Some(format!("register {key} is not linearizable: {why}"));
                break;
            }
        }
    }
    // The final state joins the trace.
    let mut w = world.borrow_mut();
    let ops: usize = w.history.values().map(Vec::len).sum();
    w.trace.push(format!("register operations {ops}"));
    if let Some((_, applied)) = w.rafts.values().next() {
        let a = applied.borrow().clone();
        let mut h = std::hash::DefaultHasher::new();
        serde_json::to_string(&a.state.kv).unwrap_or_default().hash(&mut h);
        w.trace.push(format!("final {:?} kv hash {:x}", a.log_id, h.finish()));
    }
    Outcome::of(std::mem::take(&mut w.trace), failure)
}

/// Crash `host` as a machine that loses its power: cut off from `hosts` first, so that nothing
/// its sockets send while turmoil drops its tasks gets out, then crashed, then its links
/// repaired (the caller puts back the faults that were on them). Turmoil drops a crashed host's
/// tasks in an order that depends on tokio's task ids, which are process-wide: with other
/// simulations on other threads, the messages they sent (connections closing) took the link's
/// random draws in another order, and the same seed replayed another trace.
pub(crate) fn crash_cut_off(sim: &mut turmoil::Sim, host: &str, hosts: &[String]) {
    for other in hosts.iter().filter(|h| *h != host) {
        sim.partition(host, other.as_str());
    }
    sim.crash(host);
    for other in hosts.iter().filter(|h| *h != host) {
        sim.repair(host, other.as_str());
    }
}

/// Put a link fault in place again (after [`crash_cut_off`] repaired its links).
fn redo(sim: &mut turmoil::Sim, f: &Fault) {
    match *f {
        Fault::Partition(a, 0) => sim.partition(name(a), "client"),
        Fault::Partition(a, b) => sim.partition(name(a), name(b)),
        Fault::OneWay(a, b) => sim.partition_oneway(name(a), name(b)),
        Fault::Hold(a, b) => sim.hold(name(a), name(b)),
        Fault::Crash(_) => {}
    }
}

fn undo(sim: &mut turmoil::Sim, f: &Fault, down: &mut BTreeSet<NodeId>) {
    match *f {
        Fault::Partition(a, 0) => sim.repair(name(a), "client"),
        Fault::Partition(a, b) => sim.repair(name(a), name(b)),
        Fault::OneWay(a, b) => sim.repair_oneway(name(a), name(b)),
        Fault::Hold(a, b) => sim.release(name(a), name(b)),
        Fault::Crash(a) => {
            if down.remove(&a) {
                sim.bounce(name(a));
            }
        }
    }
}

/// The invariants of every step:
/// - a server's vote never goes back, not even across a restart (its vote is durable);
/// - a leader holds every acknowledged write of an earlier leader (leader completeness);
/// - servers that applied the same entry hold the same state.
///
/// openraft's default leader id is `(term, node)` and may elect several leaders in one term,
/// each with its own id ordered after the last (its docs: "multiple leaders in one term");
/// Raft's "one leader per term" is, here, one leader per leader id, which the vote order gives.
fn check_step(world: &Shared, now: Duration) -> Option<String> {
    let mut w = world.borrow_mut();
    let mut events = Vec::new();
    let mut roles = Vec::new();
    let mut votes = Vec::new();
    let mut leaders = Vec::new();
    for (&id, (raft, _)) in &w.rafts {
        let m = raft.metrics().borrow().clone();
        let role = format!("term {} {:?} leader {:?}", m.current_term, m.state, m.current_leader);
        if w.roles.get(&id) != Some(&role) {
            events.push(format!("{} s{id} {role}", now.as_millis()));
            roles.push((id, role));
        }
        let vote = (m.vote.leader_id.term, m.vote.leader_id.node_id);
        if let Some(&before) = w.votes.get(&id)
            && vote < before
        {
            return Some(format!("s{id}'s vote went back from {before:?} to {vote:?}"));
        }
        votes.push((id, vote));
        if m.state.is_leader() && !w.leaders.contains(&vote) {
            let last = m.last_log_index.unwrap_or(0);
            if let Some((by, index)) = w.acked_at.iter().find(|(by, index)| *by < vote && last < *index) {
                return Some(format!(
                    "s{id} leads {vote:?} without the acknowledged entry {index} of leader {by:?} (its log ends at {last})"
                ));
            }
            events.push(format!("{} s{id} leads {vote:?}", now.as_millis()));
            leaders.push(vote);
        }
    }
    // By applied entry (term, leader, index): the first server seen there and its state.
    type Entry = Option<(u64, NodeId, u64)>;
    let mut by_entry: BTreeMap<Entry, (NodeId, Applied)> = BTreeMap::new();
    for (&id, (_, applied)) in &w.rafts {
        let a = applied.borrow().clone();
        let key = a.log_id.map(|l| (l.leader_id.term, l.leader_id.node_id, l.index));
        match by_entry.get(&key) {
            Some((other, b)) if b.state != a.state => {
                return Some(format!("s{other} and s{id} applied {:?} and hold different states", a.log_id));
            }
            Some(_) => {}
            None => {
                by_entry.insert(key, (id, a));
            }
        }
    }
    w.trace.extend(events);
    w.roles.extend(roles);
    w.votes.extend(votes);
    w.leaders.extend(leaders);
    None
}

/// Whether the cluster healed: every server up, all at the same last entry, the client done,
/// and every acknowledged write in every state.
fn healed(world: &Shared, servers: usize) -> Result<(), String> {
    let w = world.borrow();
    if !w.client_done || w.registers_running > 0 {
        return Err("clients are still running".into());
    }
    if w.rafts.len() < servers {
        return Err(format!("{} of {servers} servers up", w.rafts.len()));
    }
    let applied: Vec<Applied> = w.rafts.values().map(|(_, a)| a.borrow().clone()).collect();
    let last = applied[0].log_id;
    if applied.iter().any(|a| a.log_id != last) {
        return Err(format!("applied {:?}", applied.iter().map(|a| a.log_id).collect::<Vec<_>>()));
    }
    for (key, value) in &w.acked {
        for a in &applied {
            let got = a.state.kv.get(key.as_str()).map(|e| e.value.as_bytes().to_vec());
            if got.as_deref() != Some(value.as_bytes()) {
                return Err(format!("acknowledged write {key}={value} lost (the state has {got:?})"));
            }
        }
    }
    Ok(())
}
