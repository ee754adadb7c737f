//! Agent↔server messages over a transport that drops, duplicates, delays (reorders) frames and
//! cuts connections, from a seed: an in-process server and three agents (tasks that run
//! nowhere), apps deployed and scaled while the faults go on. Every seeded run must converge to
//! the same correct state: every app at its instance count, each agent running exactly the
//! tasks the state gives it (no orphan, no task id twice), the catalog holding exactly the
//! running tasks, and every agent's replica equal to the server's state.
//!
//! `MESH_FAULT_SEEDS=N` runs N seeds (default 12); `MESH_FAULT_SEED=S` replays one.

use mesh_core::app::App;
use mesh_core::model::{AgentId, PortRanges, Resources, now_millis};
use mesh_core::proto::TaskState;
use mesh_core::runtime::Runtime;
use mesh_core::runtime::memory::MemoryRuntime;
use mesh_core::state::{Command, MemLog, Store};
use mesh_server::agent::{self, AgentConfig};
use mesh_server::api::{self, Api, NodeInfo};
use mesh_server::cluster::{forward::Executor, outbox::Outbox, replica, replication::Replication, server, uplink};
use mesh_server::control::{self, ControlConfig, ControlHandle, Published};
use mesh_server::rpc::{self, Faults, Hello, MemTransport, Role, Transport};
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

struct AgentNode {
    id: AgentId,
    runtime: Arc<MemoryRuntime>,
    replica: Published,
}

fn faults(seed: u64) -> Faults {
    Faults { seed, drop: 0.03, duplicate: 0.03, delay: 0.08, max_delay: Duration::from_millis(150), disconnect: 0.002 }
}

fn app(id: &str, instances: u32, unique: bool) -> App {
    let mut body = serde_json::json!({"id": id, "cmd": "sleep 1000", "instances": instances, "cpus": 0.1, "mem": 16,
        "portDefinitions": [{"port": 0}], "unreachableStrategy": {"inactiveAfterSeconds": 1, "expungeAfterSeconds": 5}});
    if unique {
        body["constraints"] = serde_json::json!([["hostname", "UNIQUE"]]);
    }
    App::from_json(&body, None).unwrap()
}

async fn put(control: &ControlHandle, app: App, create: bool, n: u32) {
    let put =
        Command::PutApp { app, now: now_millis(), deployment_id: format!("d{n}"), create_only: create, force: true };
    control.propose(put).await.unwrap();
}

/// What is wrong with the cluster now (`None`: converged).
fn wrong(control: &ControlHandle, agents: &[AgentNode], want: &BTreeMap<&str, usize>) -> Option<String> {
    let state = control.state();
    for (app, n) in want {
        let id = mesh_core::app::AppId::parse(app).unwrap();
        let tasks: Vec<_> = state.app_tasks(&id).collect();
        let running = tasks.iter().filter(|t| t.state == TaskState::Running && !t.kill_requested).count();
        if running != *n || tasks.len() != *n {
            let others: Vec<String> = tasks
                .iter()
                .filter(|t| t.state != TaskState::Running || t.kill_requested)
                .map(|t| format!("{} {:?} on {} kill_requested={}", t.id, t.state, t.agent_id, t.kill_requested))
                .collect();
            return Some(format!("{app}: {running} running of {} live tasks, want {n}: {others:?}", tasks.len()));
        }
    }
    let mut seen = BTreeSet::new();
    for a in agents {
        let mut on_runtime: Vec<_> = a.runtime.running();
        on_runtime.sort();
        let mut in_state: Vec<_> = state
            .tasks
            .values()
            .filter(|t| t.agent_id == a.id && !t.state.is_terminal())
            .map(|t| t.id.clone())
            .collect();
        in_state.sort();
        if on_runtime != in_state {
            return Some(format!("{}: runs {on_runtime:?}, the state says {in_state:?}", a.id));
        }
        for t in on_runtime {
            if !seen.insert(t.clone()) {
                return Some(format!("task {t} runs twice"));
            }
        }
        if a.replica.state.load().index != state.index {
            return Some(format!(
                "{}'s replica at {}, the server at {}",
                a.id,
                a.replica.state.load().index,
                state.index
            ));
        }
        if a.replica.catalog.load().services != state.catalog.services {
            return Some(format!("{}'s replicated catalog differs", a.id));
        }
    }
    let instances: usize = state.catalog.services.values().map(|m| m.len()).sum();
    let running = state.tasks.values().filter(|t| t.state == TaskState::Running).count();
    if instances != running {
        return Some(format!("{instances} instances in the catalog, {running} running tasks"));
    }
    None
}

async fn run(seed: u64) -> Result<Duration, String> {
    let net = MemTransport::default();
    let store = {
        let mut s = Store::open(Box::new(MemLog::default()), "dc1").unwrap();
        let replication = Replication::new(0);
        let feed = replication.clone();
        s.set_feed(Box::new(move |first, cmds| feed.appended(first, cmds)));
        (s, replication)
    };
    let (store, replication) = store;
    let cfg = ControlConfig {
        tick: Duration::from_millis(50),
        seed,
        reconcile_interval: Duration::from_secs(1),
        agent_down_after: Duration::from_secs(3),
        ..Default::default()
    };
    let (control, control_join) = control::spawn(store, cfg);
    let info = NodeInfo {
        node: "server".into(),
        datacenter: "dc1".into(),
        http_addr: "10.0.0.1:8080".into(),
        domain: "mesh".into(),
        started_at: now_millis(),
        host_access: Default::default(),
        enable_script_checks: false,
    };
    let c2 = control.clone();
    let executor = Executor::new(
        Arc::new(move |n: &str| api::router(Api::new(c2.clone(), info.clone()).for_node(n))),
        control.published.clone(),
    );
    let handler = Arc::new(server::ServerHandler::new(control.clone(), replication, executor));
    let server_addr: SocketAddr = "10.0.0.1:8300".parse().unwrap();
    let listener = net.with_faults(faults(seed)).listen(server_addr).await.unwrap();
    let hello = Hello {
        node: "server".into(),
        node_id: "server-id".into(),
        datacenter: "dc1".into(),
        role: Role::Server,
        http: None,
    };
    let rpc_server = rpc::Server::start(listener, hello, handler).unwrap();

    let mut agents = Vec::new();
    let mut keep = Vec::new();
    for i in 0..3u8 {
        let ip: std::net::IpAddr = format!("10.0.0.{}", 10 + i).parse().unwrap();
        let id = AgentId::from(format!("a{i}").as_str());
        let (events_tx, events_rx) = tokio::sync::mpsc::channel(1024);
        let runtime = Arc::new(MemoryRuntime::new(events_tx));
        let (up_tx, up_rx) = tokio::sync::mpsc::channel(1024);
        let ucfg = uplink::UplinkConfig {
            agent: id.clone(),
            node_id: format!("id-{seed}-{i}"),
            datacenter: "dc1".into(),
            servers: Arc::new(std::sync::Mutex::new(vec![server_addr])),
            transport: Arc::new(net.at(ip).with_faults(faults(seed.wrapping_add(u64::from(i) + 1)))),
        };
        let (link, _pending, uj) = uplink::spawn(ucfg, Outbox::in_memory(), up_rx);
        let (replica, _status, rj) = replica::spawn("dc1", link, None, mesh_core::model::system_clock());
        let handle = ControlHandle::from_parts(up_tx, replica.clone());
        let acfg = AgentConfig {
            id: id.clone(),
            hostname: id.0.clone(),
            address: ip,
            wan_address: None,
            resources: Resources { ports: PortRanges::range(31000, 32000), ..Resources::scalars(8.0, 4096.0, 0.0) },
            attributes: BTreeMap::new(),
            runtimes: vec!["process".into()],
            enable_script_checks: false,
            clock: mesh_core::model::system_clock(),
        };
        let a = agent::start(acfg, runtime.clone(), events_rx, handle).await.unwrap();
        keep.push((a, uj, rj));
        agents.push(AgentNode { id, runtime, replica });
    }

    // Deploy, then scale while the faults go on.
    put(&control, app("/web", 5, false), true, 1).await;
    put(&control, app("/one-each", 3, true), true, 2).await;
    put(&control, app("/batch", 4, false), true, 3).await;
    tokio::time::sleep(Duration::from_millis(700)).await; // let the deployments get under way
    put(&control, app("/web", 8, false), false, 4).await;
    put(&control, app("/batch", 2, false), false, 5).await;
    let want = BTreeMap::from([("/web", 8usize), ("/one-each", 3), ("/batch", 2)]);

    let started = Instant::now();
    // Generous: on a 2-core machine busy with builds, one seed took over a minute.
    let deadline = started + Duration::from_secs(120);
    let result = loop {
        match wrong(&control, &agents, &want) {
            None => break Ok(started.elapsed()),
            Some(why) if Instant::now() > deadline => break Err(why),
            Some(why) => {
                if std::env::var("MESH_FAULT_TRACE").is_ok() {
                    eprintln!("{:?}: {why}", started.elapsed());
                }
                tokio::time::sleep(Duration::from_millis(50)).await
            }
        }
    };
    for (a, uj, rj) in keep {
        drop(a);
        uj.abort();
        rj.abort();
    }
    drop(rpc_server);
    control_join.abort();
    result
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_seeded_run_converges_to_the_same_correct_state() {
    let seeds: Vec<u64> = match std::env::var("MESH_FAULT_SEED") {
        Ok(s) => vec![s.parse().expect("MESH_FAULT_SEED is a number")],
        Err(_) => {
            let n: u64 = std::env::var("MESH_FAULT_SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(12);
            (1..=n).collect()
        }
    };
    // Four clusters at a time (each is its own in-memory network): the waits are timers, so
    // they overlap well.
    for chunk in seeds.chunks(4) {
        let runs = chunk.iter().map(|&seed| async move { (seed, run(seed).await) });
        for (seed, r) in futures_util::future::join_all(runs).await {
            match r {
                Ok(took) => eprintln!("seed {seed}: converged {took:?} after the last change"),
                Err(why) => panic!(
                    "seed {seed} did not converge: {why}\nreplay: MESH_FAULT_SEED={seed} cargo test -p mesh-server --test cluster_faults"
                ),
            }
        }
    }
}
