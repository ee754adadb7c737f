//! The whole cluster under simulation (issue 15): three servers as `mesh server` composes them
//! (mesh's Raft, the leader's control loop with the allocator and the Marathon scheduler, the
//! RPC handler agents and forwarded HTTP requests reach, the HTTP API behind the leader layer),
//! three agents as `mesh agent` composes its control side (the real agent loop and uplink, on
//! the in-memory runtime) and a client deploying and scaling Marathon apps through the servers'
//! HTTP API, as turmoil hosts on virtual time. Every node has its own clock (the virtual time
//! plus an offset a fault moves: clock jumps) and its own seeded ids.
//!
//! Faults come from the seed as in the replicated log's simulation (partitions full and
//! one-way, held links, message loss, crashes and restarts of servers with their data dir kept
//! and of agents, which lose their tasks as a machine that rebooted), plus clock jumps.
//!
//! After every step ([`check_step`]): at most one leader per leader id and no vote going back;
//! no agent's tasks use more than it has (the allocator's bound, read from the leader's state);
//! no task id runs twice (on two agents, or again after it ended); no task goes back from a
//! terminal state in any server's state; DNS (the real zone over a server's catalog) never
//! answers an instance whose health is critical or whose node is down. After the faults stop
//! ([`healed`]): every app has exactly its instance count running, every live agent is
//! registered, the catalog holds exactly the running tasks with ports, and no agent runs a
//! task the cluster does not know of (no orphan).

use super::{Outcome, SimTransport};
use mesh_core::dns::{DnsConfig, DnsIndex, DnsZone};
use mesh_core::model::{AgentId, Clock, Millis, PortRanges, Resources, TaskId};
use mesh_core::proto::TaskState;
use mesh_core::runtime::Runtime;
use mesh_core::runtime::memory::MemoryRuntime;
use mesh_core::state::State;
use mesh_server::agent::{self, AgentConfig};
use mesh_server::cluster::forward::{Executor, LeaderRoute, Route};
use mesh_server::cluster::outbox::Outbox;
use mesh_server::cluster::replication::Replication;
use mesh_server::cluster::server::ServerHandler;
use mesh_server::cluster::uplink;
use mesh_server::control::{self, ControlConfig, ControlHandle, Published};
use mesh_server::gossip::{Datagrams, Gossip, GossipConfig, GossipTiming, MemberStatus, Role as GossipRole};
use mesh_server::raft::{RaftServer, RaftServerConfig, RaftTiming};
use mesh_server::rpc::msg::HttpRequest;
use mesh_server::rpc::{Conn, Hello, NoHandler, Request, Response, Role, Server, Transport};
use rand::{Rng, SeedableRng, rngs::StdRng};
use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::hash::{Hash, Hasher};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::rc::Rc;
use std::str::FromStr;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Raft timing of the simulation: heartbeat 100 ms, elections 200–400 ms (virtual).
const TIMING: RaftTiming = RaftTiming { multiplier: 0.2 };
/// The RPC port of every node.
const PORT: u16 = 8300;
/// Virtual time per step.
const TICK: Duration = Duration::from_millis(10);
/// The simulation's epoch (virtual time zero), in Unix milliseconds.
const EPOCH: Millis = 1_800_000_000_000;
/// Agents' ports.
const PORTS: (u16, u16) = (31000, 31099);

/// What a run is made of.
#[derive(Clone, Debug)]
pub struct Plan {
    /// The seed of everything.
    pub seed: u64,
    /// How long faults go on (virtual).
    pub faults_for: Duration,
    /// How long the healing phase may take before the run counts as not live.
    pub heal_within: Duration,
    /// Agents.
    pub agents: usize,
    /// Test-only bug: the scheduler wants this many tasks more than each app's instances.
    pub bug_extra_instances: usize,
    /// Whether nodes crash (and restart).
    pub crashes: bool,
    /// Whether clocks jump.
    pub clock_jumps: bool,
}

impl Plan {
    /// A short run (CI's seeds).
    pub fn short(seed: u64) -> Plan {
        Plan {
            seed,
            faults_for: Duration::from_secs(20),
            heal_within: Duration::from_secs(60),
            agents: 3,
            bug_extra_instances: 0,
            crashes: true,
            clock_jumps: true,
        }
    }
}

/// A node's clock: the virtual time plus an offset that clock jumps move, and ids from a
/// generator seeded per node and incarnation.
#[derive(Debug)]
struct SimClock {
    offset: Arc<AtomicI64>,
    ids: Mutex<StdRng>,
}

impl Clock for SimClock {
    fn now(&self) -> Millis {
        let virt = turmoil::sim_elapsed().unwrap_or_default().as_millis() as i64;
        (EPOCH as i64 + virt + self.offset.load(Ordering::SeqCst)).max(0) as Millis
    }
    fn uuid(&self) -> uuid::Uuid {
        let bits: u128 = self.ids.lock().expect("ids").random();
        uuid::Builder::from_random_bytes(bits.to_le_bytes()).into_uuid()
    }
}

fn clock(offset: &Arc<AtomicI64>, seed: u64) -> Arc<dyn Clock> {
    Arc::new(SimClock { offset: offset.clone(), ids: Mutex::new(StdRng::seed_from_u64(seed)) })
}

/// An app the client wants, and how many instances it last asked for (and was told applied).
#[derive(Clone, Debug, Default)]
struct Wanted {
    instances: BTreeMap<String, u32>,
}

/// What the hosts share with the driver (all on the simulation's one thread).
#[derive(Default)]
struct World {
    /// Running servers: their Raft and the state they publish.
    servers: BTreeMap<usize, (openraft::Raft<mesh_server::raft::TypeConfig>, Published)>,
    /// Running agents' runtimes.
    agents: BTreeMap<usize, Arc<MemoryRuntime>>,
    /// Events, in order.
    trace: Vec<String>,
    /// Each server's last seen role (traced when it changes).
    roles: BTreeMap<usize, String>,
    /// Each server's highest vote, across restarts.
    votes: BTreeMap<usize, (u64, u64)>,
    /// Every task id seen running, and where.
    ran: BTreeMap<TaskId, usize>,
    /// Task ids seen running that later stopped running (they must never run again).
    ended: BTreeSet<TaskId>,
    /// Per server: the terminal tasks seen in its state.
    terminal: BTreeMap<usize, BTreeSet<TaskId>>,
    /// The client's wishes (acknowledged).
    wanted: Wanted,
    /// Whether the client is done.
    client_done: bool,
    /// Incarnations started, per host (seeds the next one's ids).
    incarnations: BTreeMap<String, u64>,
    /// Running hosts' gossip, by host name.
    gossip: BTreeMap<String, Gossip>,
    /// Per (server, agent): since when (virtual) the server's gossip has held the agent down.
    down_since: BTreeMap<(usize, String), Duration>,
    /// Per server: since when (virtual) it leads.
    leading_since: BTreeMap<usize, Duration>,
}

type Shared = Rc<RefCell<World>>;

fn server_name(i: usize) -> String {
    format!("s{i}")
}

fn agent_name(i: usize) -> String {
    format!("a{i}")
}

fn node_id(i: usize) -> String {
    format!("{i:08x}-0000-4000-8000-000000000000")
}

fn rpc_addr(host: &str) -> SocketAddr {
    SocketAddr::new(turmoil::lookup(host), PORT)
}

/// The next start of `host`: its number (1, 2, ...) and a seed for its ids.
fn next_incarnation(world: &Shared, host: &str, seed: u64) -> (u64, u64) {
    let mut w = world.borrow_mut();
    let n = w.incarnations.entry(host.to_owned()).or_default();
    *n += 1;
    let mut h = std::hash::DefaultHasher::new();
    (seed, host, *n).hash(&mut h);
    (*n, h.finish())
}

/// The gossip port of every node.
const GOSSIP_PORT: u16 = 8301;

/// Gossip's datagrams over turmoil's simulated UDP.
struct SimUdp(turmoil::net::UdpSocket);

#[async_trait::async_trait]
impl Datagrams for SimUdp {
    async fn recv_from(&self, buf: &mut [u8]) -> std::io::Result<(usize, SocketAddr)> {
        self.0.recv_from(buf).await
    }
    async fn send_to(&self, buf: &[u8], to: SocketAddr) -> std::io::Result<usize> {
        self.0.send_to(buf, to).await
    }
    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.0.local_addr()
    }
}

/// This host's LAN gossip (SWIM, foca, with the production LAN timing), joining the servers.
async fn start_gossip(
    name: &str,
    node_id: String,
    role: GossipRole,
    servers: usize,
    (generation, seed): (u64, u64),
) -> Result<Gossip, Box<dyn std::error::Error>> {
    let bind = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), GOSSIP_PORT);
    let socket = turmoil::net::UdpSocket::bind(bind).await?;
    let me = SocketAddr::new(turmoil::lookup(name), GOSSIP_PORT);
    let config = GossipConfig {
        node: name.to_owned(),
        node_id,
        datacenter: "dc1".into(),
        pool: None,
        role,
        bind,
        advertise: me,
        rpc: rpc_addr(name),
        join: (1..=servers).map(|s| SocketAddr::new(turmoil::lookup(server_name(s).as_str()), GOSSIP_PORT)).collect(),
        timing: GossipTiming::default(),
        seed,
        generation: Some(generation),
    };
    Ok(Gossip::start_on(config, Box::new(SimUdp(socket))).await?)
}

/// A server as `run_server` composes one, without gossip, DNS listeners and HTTP sockets.
async fn server(
    i: usize,
    servers: usize,
    dir: PathBuf,
    offset: Arc<AtomicI64>,
    seed: u64,
    world: Shared,
) -> turmoil::Result {
    let name = server_name(i);
    let (generation, incarnation) = next_incarnation(&world, &name, seed);
    let clock = clock(&offset, incarnation);
    let gossip = start_gossip(&name, node_id(i), GossipRole::Server, servers, (generation, incarnation)).await?;
    let (published, index_tx) = Published::new(State::new("dc1"), clock.clone());
    let replication = Replication::new(0);
    let (control, inbox) = control::handle_with_inbox(published.clone());
    let transport: Arc<dyn Transport> = Arc::new(SimTransport);
    let listener = transport.listen(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), PORT)).await?;
    let (route_tx, route) = tokio::sync::watch::channel(Route::NoLeader);
    let contacts = Arc::new(mesh_server::raft::Contacts::default());
    let raft_cell = Arc::new(std::sync::OnceLock::new());
    let leader_route = LeaderRoute {
        route: route.clone(),
        node: name.clone(),
        published: published.clone(),
        hold: Duration::from_secs(2),
        raft: raft_cell.clone(),
        contacts: contacts.clone(),
    };
    let info = mesh_server::api::NodeInfo {
        node: name.clone(),
        datacenter: "dc1".into(),
        http_addr: format!("{}:8500", turmoil::lookup(name.as_str())),
        domain: "mesh".into(),
        started_at: clock.now(),
        host_access: Default::default(),
        enable_script_checks: false,
    };
    let api = mesh_server::api::Api {
        raft: Some(mesh_server::api::RaftView {
            raft: raft_cell.clone(),
            route: Some(route.clone()),
            contacts: contacts.clone(),
        }),
        ..mesh_server::api::Api::new(control.clone(), info)
    };
    let executor = Executor::new(
        Arc::new(move |node: &str| {
            mesh_server::api::router(api.for_node(node)).layer(axum::middleware::from_fn_with_state(
                leader_route.clone(),
                mesh_server::cluster::forward::leader_layer,
            ))
        }),
        published.clone(),
    );
    let hello =
        Hello { node: name.clone(), node_id: node_id(i), datacenter: "dc1".into(), role: Role::Server, http: None };
    let cfg = RaftServerConfig {
        name: name.clone(),
        node_id: node_id(i),
        datacenter: "dc1".into(),
        dir,
        rpc: rpc_addr(&name),
        bootstrap_expect: servers,
        timing: TIMING,
        write_timeout: Duration::from_secs(3),
        transport: transport.clone(),
        hello: hello.clone(),
        control: ControlConfig {
            clock: clock.clone(),
            seed: incarnation,
            agent_down_after: Duration::from_secs(5),
            reregister_timeout: Duration::from_secs(10),
            reconcile_interval: Duration::from_secs(5),
            ..ControlConfig::default()
        },
        max_app_versions: 10,
        dead_server_cleanup: None,
        reserve_bytes: 0,
        contacts,
    };
    // As run_server's report_members: the control loop hears of every change of membership.
    let (mut members, reporter) = (gossip.subscribe(), control.clone());
    tokio::spawn(async move {
        loop {
            let list = members.borrow_and_update().clone();
            if reporter.send(control::ControlMsg::Members(list)).await.is_err() || members.changed().await.is_err() {
                return;
            }
        }
    });
    let raft =
        RaftServer::start(cfg, published.clone(), index_tx, replication.clone(), inbox, gossip.subscribe(), route_tx)
            .await
            .map_err(|e| e.to_string())?;
    let _ = raft_cell.set(raft.raft.clone());
    let handler = Arc::new(ServerHandler::new(control, replication, executor).with_raft(raft.handler.clone(), route));
    let _rpc = Server::start(listener, hello, handler)?;
    world.borrow_mut().servers.insert(i, (raft.raft.clone(), published));
    world.borrow_mut().gossip.insert(name, gossip);
    std::future::pending::<()>().await;
    Ok(())
}

/// An agent as `run_agent` composes its control side: the agent loop on the in-memory
/// runtime, its uplink to the servers. A restart is a new machine's boot: no tasks, a new
/// incarnation.
async fn agent_host(i: usize, servers: usize, offset: Arc<AtomicI64>, seed: u64, world: Shared) -> turmoil::Result {
    let name = agent_name(i);
    let (generation, incarnation) = next_incarnation(&world, &name, seed);
    let clock = clock(&offset, incarnation);
    let gossip =
        start_gossip(&name, format!("{name}-{incarnation:x}"), GossipRole::Agent, servers, (generation, incarnation))
            .await?;
    let (events_tx, events_rx) = tokio::sync::mpsc::channel(1024);
    let runtime = Arc::new(MemoryRuntime::with_clock(events_tx, clock.clone()));
    let (up_tx, up_rx) = tokio::sync::mpsc::channel(1024);
    let ucfg = uplink::UplinkConfig {
        agent: AgentId::from(name.as_str()),
        node_id: format!("{name}-{incarnation:x}"),
        datacenter: "dc1".into(),
        servers: Arc::new(Mutex::new((1..=servers).map(|s| rpc_addr(&server_name(s))).collect())),
        transport: Arc::new(SimTransport),
    };
    let (_link, _pending, _uplink) = uplink::spawn(ucfg, Outbox::in_memory(), up_rx);
    let (published, _index) = Published::new(State::default(), clock.clone());
    let handle = ControlHandle::from_parts(up_tx, published);
    let cfg = AgentConfig {
        id: AgentId::from(name.as_str()),
        hostname: name.clone(),
        address: turmoil::lookup(name.as_str()),
        wan_address: None,
        resources: Resources { ports: PortRanges::range(PORTS.0, PORTS.1), ..Resources::scalars(2.0, 1024.0, 0.0) },
        attributes: BTreeMap::new(),
        runtimes: vec!["process".into()],
        enable_script_checks: false,
        clock,
    };
    let _agent = agent::start(cfg, runtime.clone(), events_rx, handle).await?;
    world.borrow_mut().agents.insert(i, runtime);
    world.borrow_mut().gossip.insert(name, gossip);
    std::future::pending::<()>().await;
    Ok(())
}

/// One HTTP request through a server's RPC (as an agent forwards one); the status and body.
async fn http(conn: &Conn, method: &str, uri: &str, body: serde_json::Value) -> Option<(u16, serde_json::Value)> {
    let req = HttpRequest {
        method: method.into(),
        uri: uri.into(),
        headers: vec![("content-type".into(), "application/json".into())],
        body: if body.is_null() { Vec::new() } else { body.to_string().into_bytes() },
        node: "client".into(),
    };
    match tokio::time::timeout(Duration::from_secs(5), conn.call(Request::Http(req), Duration::from_secs(5))).await {
        Ok(Ok(Response::Http(r))) => Some((r.status, serde_json::from_slice(&r.body).unwrap_or_default())),
        _ => None,
    }
}

/// The client: creates apps and scales them, each request to a server the seed picks; what a
/// server acknowledged (2xx) is what the cluster must reach.
async fn client(servers: usize, seed: u64, world: Shared) -> turmoil::Result {
    let mut rng = StdRng::seed_from_u64(seed ^ 0xC11E);
    let hello =
        Hello { node: "client".into(), node_id: node_id(99), datacenter: "dc1".into(), role: Role::Client, http: None };
    let mut conns: BTreeMap<usize, Conn> = BTreeMap::new();
    let apps = ["web", "api", "db"];
    let mut steps: Vec<(String, u32)> = apps.iter().map(|a| ((*a).to_owned(), rng.random_range(1..=3))).collect();
    for _ in 0..6 {
        let app = apps[rng.random_range(0..apps.len())];
        steps.push((app.to_owned(), rng.random_range(0..=4)));
    }
    for (app, n) in steps {
        let body = serde_json::json!({
            "id": format!("/{app}"), "cmd": command(&app), "instances": n,
            "cpus": 0.25, "mem": 64, "portDefinitions": [{"port": 0}],
        });
        for _attempt in 0..30 {
            let s = rng.random_range(1..=servers);
            if conns.get(&s).is_none_or(|c| c.is_closed()) {
                let addr = rpc_addr(&server_name(s));
                match Conn::connect(&SimTransport, addr, hello.clone(), Arc::new(NoHandler)).await {
                    Ok(c) => {
                        conns.insert(s, c);
                    }
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                }
            }
            let conn = conns.get(&s).expect("connected");
            let uri = format!("/v2/apps/{app}?force=true");
            match http(conn, "PUT", &uri, body.clone()).await {
                Some((status, _)) if (200..300).contains(&status) => {
                    let mut w = world.borrow_mut();
                    let at = turmoil::sim_elapsed().unwrap_or_default().as_millis();
                    w.trace.push(format!("{at} client /{app} instances {n} ({status} from s{s})"));
                    w.wanted.instances.insert(format!("/{app}"), n);
                    break;
                }
                Some((status, body)) => {
                    let at = turmoil::sim_elapsed().unwrap_or_default().as_millis();
                    world.borrow_mut().trace.push(format!("{at} client /{app} refused {status} {body} by s{s}"));
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
                None => {
                    conns.remove(&s);
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(500..2500))).await;
    }
    world.borrow_mut().client_done = true;
    Ok(())
}

/// What an app's tasks run, as the in-memory runtime reads it: `api`'s ignore SIGTERM, so a
/// scale-down or a replacement kills them only when the grace period ends.
fn command(app: &str) -> &'static str {
    match app {
        "api" => "trap '' TERM; sleep 100000",
        _ => "sleep 100000",
    }
}

/// A fault the driver injects.
enum Fault {
    Partition(String, String),
    OneWay(String, String),
    Hold(String, String),
    Crash(String),
    ClockJump(String, i64),
    /// A running task on the agent exits by itself with this code.
    TaskFails(String, i32),
    /// The agent's next launch fails (its runtime cannot start the task).
    LaunchFails(String),
}

/// Run `plan`.
pub fn run(plan: &Plan) -> Outcome {
    mesh_server::raft::runtime::simulate_on_this_thread(plan.seed);
    mesh_server::raft::runtime::simulate_slow_disk(Duration::ZERO);
    mesh_server::raft::state_machine::sim_bug::drop_every(0);
    mesh_core::scheduler::sim_bug::ignore_instances_by(plan.bug_extra_instances);
    let tmp = super::data_dirs();
    let world: Shared = Rc::default();
    let servers = 3;
    let mut sim = turmoil::Builder::new()
        .rng_seed(plan.seed)
        .tick_duration(TICK)
        .simulation_duration(plan.faults_for + plan.heal_within + Duration::from_secs(60))
        .min_message_latency(Duration::from_millis(1))
        .max_message_latency(Duration::from_millis(30))
        .tcp_capacity(1 << 20)
        .fail_rate(0.001)
        .repair_rate(0.05)
        .enable_random_order()
        .build();
    let mut offsets: BTreeMap<String, Arc<AtomicI64>> = BTreeMap::new();
    for i in 1..=servers {
        let name = server_name(i);
        let dir = tmp.path().join(&name);
        std::fs::create_dir_all(&dir).expect("data dir");
        let offset = offsets.entry(name.clone()).or_default().clone();
        let (world, seed) = (world.clone(), plan.seed);
        sim.host(name, move || server(i, servers, dir.clone(), offset.clone(), seed, world.clone()));
    }
    for i in 1..=plan.agents {
        let name = agent_name(i);
        let offset = offsets.entry(name.clone()).or_default().clone();
        let (world, seed) = (world.clone(), plan.seed);
        sim.host(name, move || agent_host(i, servers, offset.clone(), seed, world.clone()));
    }
    sim.client("client", client(servers, plan.seed, world.clone()));

    let hosts: Vec<String> = (1..=servers).map(server_name).chain((1..=plan.agents).map(agent_name)).collect();
    let mut rng = StdRng::seed_from_u64(plan.seed ^ 0xFA17);
    let mut failure: Option<String> = None;
    let mut faults: Vec<(Fault, Duration)> = Vec::new();
    let mut down: BTreeSet<String> = BTreeSet::new();
    let mut healing_since: Option<Duration> = None;
    let zone = DnsZone::new(DnsConfig::default()).expect("zone");
    let trace = |world: &Shared, at: Duration, e: String| {
        world.borrow_mut().trace.push(format!("{} {e}", at.as_millis()));
    };
    loop {
        if let Err(e) = sim.step() {
            failure = Some(format!("a host failed: {e}"));
            break;
        }
        let now = sim.elapsed();
        if let Some(why) = check_step(&world, &zone, now) {
            failure = Some(why);
            break;
        }
        if now < plan.faults_for {
            if rng.random_bool(TICK.as_secs_f64()) {
                let a = hosts[rng.random_range(0..hosts.len())].clone();
                let b = loop {
                    let b = hosts[rng.random_range(0..hosts.len())].clone();
                    if b != a {
                        break b;
                    }
                };
                let fault = match rng.random_range(0..8) {
                    6 | 7 if a.starts_with('a') => {
                        let i: usize = a[1..].parse().expect("agent number");
                        let rt = world.borrow().agents.get(&i).cloned();
                        match rt {
                            Some(rt) if rng.random_bool(0.7) => {
                                let running = rt.running();
                                if running.is_empty() {
                                    continue;
                                }
                                let t = running[rng.random_range(0..running.len())].clone();
                                rt.fail(&t, 137);
                                Fault::TaskFails(short(&t), 137)
                            }
                            Some(rt) => {
                                rt.fail_launches(1);
                                Fault::LaunchFails(a)
                            }
                            None => continue,
                        }
                    }
                    0 => {
                        sim.partition(a.as_str(), b.as_str());
                        Fault::Partition(a, b)
                    }
                    1 => {
                        sim.partition_oneway(a.as_str(), b.as_str());
                        Fault::OneWay(a, b)
                    }
                    2 => {
                        sim.hold(a.as_str(), b.as_str());
                        Fault::Hold(a, b)
                    }
                    3 if plan.clock_jumps => {
                        let by = rng.random_range(-30_000..60_000i64);
                        offsets[&a].fetch_add(by, Ordering::SeqCst);
                        Fault::ClockJump(a, by)
                    }
                    4 if plan.crashes && down.is_empty() => {
                        let all: Vec<String> = hosts.iter().cloned().chain(["client".to_owned()]).collect();
                        super::crash_cut_off(&mut sim, &a, &all);
                        for (f, _) in &faults {
                            redo(&mut sim, f);
                        }
                        let mut w = world.borrow_mut();
                        w.gossip.remove(&a);
                        if let Some(i) = a.strip_prefix('s').and_then(|i| i.parse().ok()) {
                            w.servers.remove(&i);
                        } else if let Some(i) = a.strip_prefix('a').and_then(|i| i.parse().ok()) {
                            w.agents.remove(&i);
                        }
                        down.insert(a.clone());
                        Fault::Crash(a)
                    }
                    _ => {
                        sim.partition(a.as_str(), "client");
                        Fault::Partition(a, "client".into())
                    }
                };
                trace(&world, now, format!("fault {}", fault.describe()));
                // Crashes last long enough, at times, for gossip to declare the node down.
                let longest = if matches!(fault, Fault::Crash(_)) { 15_000 } else { 4_000 };
                let until = now + Duration::from_millis(rng.random_range(200..longest));
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
        for f in super::faults_over(&mut faults, now) {
            trace(&world, now, format!("end {}", f.describe()));
            undo(&mut sim, &f, &mut down);
        }
        if let Some(since) = healing_since {
            match healed(&world, servers, plan.agents) {
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
    let mut w = world.borrow_mut();
    if let Some((_, p)) = w.servers.values().next() {
        let s = p.state.load();
        let running = s.tasks.values().filter(|t| t.state == TaskState::Running).count();
        w.trace.push(format!("final index {} running {running}", s.index));
    }
    let views: Vec<String> = w
        .gossip
        .iter()
        .filter(|(h, _)| h.starts_with('s'))
        .map(|(h, g)| {
            let alive = g.members().iter().filter(|m| m.status == MemberStatus::Alive).count();
            format!("{h} {alive}/{}", g.members().len())
        })
        .collect();
    w.trace.push(format!("final gossip views (alive/all): {}", views.join(", ")));
    Outcome::of(std::mem::take(&mut w.trace), failure)
}

impl Fault {
    fn describe(&self) -> String {
        match self {
            Fault::Partition(a, b) => format!("partition {a} {b}"),
            Fault::OneWay(a, b) => format!("one-way {a} -> {b} cut"),
            Fault::Hold(a, b) => format!("hold {a} {b}"),
            Fault::Crash(a) => format!("crash {a}"),
            Fault::ClockJump(a, by) => format!("clock of {a} jumps {by} ms"),
            Fault::TaskFails(t, code) => format!("task {t} fails with {code}"),
            Fault::LaunchFails(a) => format!("next launch on {a} fails"),
        }
    }
}

/// Put a link fault in place again (after a crash repaired the crashed host's links).
fn redo(sim: &mut turmoil::Sim, f: &Fault) {
    match f {
        Fault::Partition(a, b) => sim.partition(a.as_str(), b.as_str()),
        Fault::OneWay(a, b) => sim.partition_oneway(a.as_str(), b.as_str()),
        Fault::Hold(a, b) => sim.hold(a.as_str(), b.as_str()),
        Fault::ClockJump(..) | Fault::Crash(_) | Fault::TaskFails(..) | Fault::LaunchFails(_) => {}
    }
}

fn undo(sim: &mut turmoil::Sim, f: &Fault, down: &mut BTreeSet<String>) {
    match f {
        Fault::Partition(a, b) => sim.repair(a.as_str(), b.as_str()),
        Fault::OneWay(a, b) => sim.repair_oneway(a.as_str(), b.as_str()),
        Fault::Hold(a, b) => sim.release(a.as_str(), b.as_str()),
        // A clock that jumped stays where it jumped (as after an NTP step); what failed is over.
        Fault::ClockJump(..) | Fault::TaskFails(..) | Fault::LaunchFails(_) => {}
        Fault::Crash(a) => {
            if down.remove(a) {
                sim.bounce(a.as_str());
            }
        }
    }
}

/// The leader's published state, if one server leads.
fn leader_state(w: &World) -> Option<Arc<State>> {
    w.servers.values().find(|(r, _)| r.metrics().borrow().state.is_leader()).map(|(_, p)| p.state.load_full())
}

/// The invariants of every step (see the module documentation).
fn check_step(world: &Shared, zone: &DnsZone, now: Duration) -> Option<String> {
    let mut w = world.borrow_mut();
    let at = now.as_millis();
    // Raft: votes only go forward; a leader id leads once.
    let mut events = Vec::new();
    for (&i, (raft, _)) in &w.servers {
        let m = raft.metrics().borrow().clone();
        let vote = (m.vote.leader_id.term, m.vote.leader_id.node_id);
        if let Some(&before) = w.votes.get(&i)
            && vote < before
        {
            return Some(format!("s{i}'s vote went back from {before:?} to {vote:?}"));
        }
        let role = format!("term {} {:?}", m.current_term, m.state);
        if w.roles.get(&i) != Some(&role) {
            events.push((i, role, vote));
        }
    }
    let leaders: Vec<(u64, u64)> = w
        .servers
        .values()
        .map(|(r, _)| r.metrics().borrow().clone())
        .filter(|m| m.state.is_leader())
        .map(|m| (m.vote.leader_id.term, m.vote.leader_id.node_id))
        .collect();
    if leaders.iter().collect::<BTreeSet<_>>().len() < leaders.len() {
        return Some(format!("two servers lead with one leader id: {leaders:?}"));
    }
    for (i, role, vote) in events {
        w.trace.push(format!("{at} s{i} {role}"));
        w.roles.insert(i, role);
        w.votes.insert(i, vote);
    }

    // Gossip: since when each server leads (with a quorum), and since when its gossip has held
    // each agent down (failed or left; one status per name, the liveliest, as the control
    // loop reads it).
    let leading: Vec<usize> = w
        .servers
        .iter()
        .filter(|(_, (r, _))| {
            let m = r.metrics().borrow().clone();
            m.state.is_leader() && m.millis_since_quorum_ack.is_some_and(|ms| ms < 500)
        })
        .map(|(&i, _)| i)
        .collect();
    let servers: Vec<usize> = w.servers.keys().copied().collect();
    for i in servers {
        if leading.contains(&i) {
            w.leading_since.entry(i).or_insert(now);
        } else {
            w.leading_since.remove(&i);
        }
    }
    let mut down_now: BTreeSet<(usize, String)> = BTreeSet::new();
    let mut seen: BTreeSet<(usize, String)> = BTreeSet::new();
    for (host, g) in &w.gossip {
        let Some(i) = host.strip_prefix('s').and_then(|i| i.parse::<usize>().ok()) else { continue };
        let mut best: BTreeMap<String, bool> = BTreeMap::new();
        for m in g.members().iter().filter(|m| m.role == GossipRole::Agent) {
            let alive = matches!(m.status, MemberStatus::Alive | MemberStatus::Suspect);
            *best.entry(m.name.clone()).or_insert(alive) |= alive;
        }
        for (name, alive) in best {
            seen.insert((i, name.clone()));
            if !alive {
                down_now.insert((i, name));
            }
        }
    }
    w.down_since.retain(|k, _| down_now.contains(k));
    for k in &down_now {
        if !w.down_since.contains_key(k) {
            w.trace.push(format!("{at} s{} holds {} down", k.0, k.1));
            w.down_since.insert(k.clone(), now);
        }
    }
    let _ = seen;

    // Tasks: no id runs on two agents, none runs again after it stopped.
    let mut running_now: BTreeMap<TaskId, usize> = BTreeMap::new();
    for (&a, rt) in &w.agents {
        for t in rt.running() {
            if let Some(other) = running_now.insert(t.clone(), a) {
                return Some(format!("task {t} runs on a{other} and a{a} at once"));
            }
        }
    }
    let gone: Vec<TaskId> = w.ran.keys().filter(|t| !running_now.contains_key(*t)).cloned().collect();
    for t in gone {
        w.ran.remove(&t);
        w.ended.insert(t);
    }
    for (t, a) in running_now {
        if w.ended.contains(&t) {
            return Some(format!("task {t} runs again (on a{a}) after it stopped"));
        }
        if !w.ran.contains_key(&t) {
            w.trace.push(format!("{at} a{a} runs {}", short(&t)));
            w.ran.insert(t, a);
        }
    }

    // Every server's state: no task back from a terminal state; no agent over its resources;
    // DNS answers only healthy instances on live nodes.
    let states: Vec<(usize, Arc<State>)> = w.servers.iter().map(|(&i, (_, p))| (i, p.state.load_full())).collect();
    for (i, s) in states {
        let seen = w.terminal.entry(i).or_default();
        for (id, t) in &s.tasks {
            if t.state.is_terminal() {
                seen.insert(id.clone());
            } else if seen.contains(id) {
                return Some(format!("s{i}: task {id} went back from a terminal state to {:?}", t.state));
            }
        }
        let mut used: BTreeMap<&AgentId, Resources> = BTreeMap::new();
        for t in s.tasks.values().filter(|t| !t.state.is_terminal()) {
            used.entry(&t.agent_id).or_default().add(&t.resources);
        }
        for (agent, u) in &used {
            if let Some(a) = s.agents.get(*agent)
                && !a.resources.contains(u)
            {
                return Some(format!("s{i}: agent {agent}'s tasks use {u}, more than its {}", a.resources));
            }
        }
        // What this server's gossip has held down for a detection period, while it led with a
        // quorum all that time: DNS must not answer it any more.
        let down: BTreeSet<String> = match w.leading_since.get(&i) {
            Some(&since) if now >= since + DETECTION => w
                .down_since
                .iter()
                .filter(|((server, _), at)| *server == i && now >= **at + DETECTION)
                .map(|((_, node), _)| node.clone())
                .collect(),
            _ => BTreeSet::new(),
        };
        if let Some(why) = check_dns(zone, &s, &down) {
            return Some(format!("s{i}: {why}"));
        }
    }
    None
}

fn short(t: &TaskId) -> String {
    t.to_string().chars().take(24).collect()
}

/// How long a leader may take to act on gossip declaring an agent down (the control loop's
/// tick, a Raft write) before DNS must stop answering the agent's instances.
const DETECTION: Duration = Duration::from_secs(3);

/// DNS over `state`'s catalog: every SRV answer for every service is an instance that is not
/// critical, on a node that is not down (serfHealth), and not on a node in `down`.
fn check_dns(zone: &DnsZone, state: &State, down: &BTreeSet<String>) -> Option<String> {
    let catalog = &state.catalog;
    if catalog.services.is_empty() {
        return None;
    }
    let index = DnsIndex::build(catalog, zone, None);
    let mut rng = StdRng::seed_from_u64(0);
    for service in catalog.services.keys() {
        let name = hickory_proto::rr::Name::from_str(&format!("{service}.service.mesh.")).ok()?;
        let answer = zone.answer(&index, &name, hickory_proto::rr::RecordType::SRV, 0, &mut rng);
        for rec in &answer.answers {
            let hickory_proto::rr::RData::SRV(srv) = &rec.data else { continue };
            let node = srv.target.to_utf8();
            let node = node.split('.').next().unwrap_or_default().to_owned();
            let port = srv.port;
            let Some(inst) =
                catalog.services.get(service).and_then(|m| m.values().find(|x| x.node == node && x.port == port))
            else {
                return Some(format!("DNS answers {service} on {node}:{port}, which the catalog does not hold"));
            };
            if down.contains(&node) {
                return Some(format!(
                    "DNS answers {service} on {node}:{port}, which gossip has held down for more than {DETECTION:?}"
                ));
            }
            let checks = catalog.checks.get(&node);
            let critical = checks.into_iter().flat_map(|c| c.values()).any(|c| {
                c.status == mesh_core::catalog::Health::Critical && (c.service_id.is_empty() || c.service_id == inst.id)
            });
            if critical {
                return Some(format!("DNS answers {service} on {node}:{port}, which is critical or on a node down"));
            }
        }
    }
    None
}

/// Whether the cluster healed (see the module documentation).
fn healed(world: &Shared, servers: usize, agents: usize) -> Result<(), String> {
    let w = world.borrow();
    if !w.client_done {
        return Err("the client is still running".into());
    }
    if w.servers.len() < servers || w.agents.len() < agents {
        return Err(format!("{} servers, {} agents up", w.servers.len(), w.agents.len()));
    }
    let s = leader_state(&w).ok_or("no leader")?;
    for (app, &n) in &w.wanted.instances {
        let running = s
            .tasks
            .values()
            .filter(|t| t.app_id.as_ref().is_some_and(|a| a.to_string() == *app) && t.state == TaskState::Running)
            .count();
        if running != n as usize {
            return Err(format!("{app} has {running} running, {n} wanted"));
        }
    }
    for i in 1..=agents {
        if !s.agents.contains_key(&AgentId::from(agent_name(i).as_str())) {
            return Err(format!("a{i} not registered"));
        }
    }
    // Every live agent is a member, alive, in every server's view.
    for (host, g) in w.gossip.iter().filter(|(h, _)| h.starts_with('s')) {
        for i in 1..=agents {
            let name = agent_name(i);
            let alive = g.members().iter().any(|m| m.name == name && m.status == MemberStatus::Alive);
            if !alive {
                return Err(format!("{host}'s gossip does not hold {name} alive"));
            }
        }
    }
    let running: BTreeSet<(String, u16)> = s
        .tasks
        .values()
        .filter(|t| t.state == TaskState::Running)
        .flat_map(|t| t.ports.iter().map(move |p| (t.agent_id.to_string(), *p)))
        .collect();
    let catalog: BTreeSet<(String, u16)> =
        s.catalog.services.values().flat_map(|m| m.values()).map(|i| (i.node.clone(), i.port)).collect();
    if running != catalog {
        return Err(format!("the catalog {catalog:?} is not the running tasks' ports {running:?}"));
    }
    for (&a, rt) in &w.agents {
        for t in rt.running() {
            match s.tasks.get(&t) {
                Some(task) if !task.state.is_terminal() && task.agent_id.to_string() == agent_name(a) => {}
                _ => return Err(format!("a{a} runs {t}, which the cluster does not know there (an orphan)")),
            }
        }
    }
    Ok(())
}
