//! The Marathon read API over a large state (issue 4; performance row f).
//!
//! State: 100 simulated agents, 1,000 apps × 10 RUNNING tasks (10,000 tasks, every one a
//! catalog instance), built in-process through the [`Store`] (no runtime, no agent connection).
//! The control task runs on it with a long tick; no agent ever connects, so the allocator has
//! nothing to offer and the state stays as built.
//!
//! - `api_apps/in_process/<route>`: the request through the axum router (`tower::ServiceExt::oneshot`),
//!   body collected. No socket, no HTTP parsing.
//! - `api_apps/loopback/<route>`: the same request over a real 127.0.0.1 socket (`axum::serve`)
//!   with a keep-alive reqwest client, body read to the end.
//! - `control_tick/reconcile`: one `MarathonScheduler::reconcile` over the same state with
//!   nothing changed (what the control loop runs every tick, 200 ms in `mesh dev`, and after
//!   every batch of writes), for comparison.
//! - `control_tick/reconcile_rebuild`: the first pass of a fresh scheduler, which builds its
//!   indexes from the whole state (once, at start; before the incremental reconcile every pass
//!   cost this).
//! - `control_write/kv_put`: `PUT /v1/kv/<key>` in-process: one write through the control loop
//!   (propose to the in-memory log, the loop's step, publish), on the same state. Every write
//!   paid a whole-state reconcile before it was incremental.
//!
//! Routes: `GET /v2/apps?embed=apps.tasks` (target: under 100 ms), `GET /v2/apps`, `GET /v2/tasks`.
//! Throughput is the response body size, so criterion prints bytes/s; the sizes are printed once.
//!
//! Run: `cargo bench -p mesh-server --bench api_apps`; smoke: `... --bench api_apps -- --test`.

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use mesh_core::app::App;
use mesh_core::model::{AgentId, FrameworkId, Resources, TaskId};
use mesh_core::proto::TaskState;
use mesh_core::scheduler::{MarathonScheduler, Scheduler};
use mesh_core::state::{Agent, Command, MemLog, State, Store, Task};
use mesh_server::api::{Api, NodeInfo, router};
use mesh_server::control::{ControlConfig, ControlHandle, spawn};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;
use tower::ServiceExt;

const AGENTS: usize = 100;
const APPS: usize = 1_000;
const TASKS_PER_APP: usize = 10;
/// A fixed "now" so the state is the same on every run.
const T0: u64 = 1_780_000_000_000;

const ROUTES: [(&str, &str); 3] =
    [("apps_embed_tasks", "/v2/apps?embed=apps.tasks"), ("apps", "/v2/apps"), ("tasks", "/v2/tasks")];

fn agent_id(a: usize) -> AgentId {
    AgentId::from(format!("agent-{a:03}").as_str())
}

/// The commands that build the bench state, in the order the control side would apply them.
fn commands() -> Vec<Vec<Command>> {
    let agents = (0..AGENTS)
        .map(|a| Command::RegisterAgent {
            agent: Agent {
                id: agent_id(a),
                hostname: format!("host-{a:03}.bench"),
                address: IpAddr::V4(Ipv4Addr::new(10, 0, (a / 256) as u8, (a % 256) as u8)),
                resources: Resources::scalars(8.0, 16384.0, 100_000.0),
                attributes: BTreeMap::from([("rack".to_owned(), format!("rack-{}", a % 10))]),
                registered_at: T0,
                runtimes: vec!["process".into()],
                wan_address: None,
            },
            datacenter: "dc1".into(),
        })
        .collect();
    let apps: Vec<App> = (0..APPS)
        .map(|i| {
            App::from_json(
                &json!({"id": format!("/bench/app-{i:04}"), "cmd": "sleep 1", "instances": TASKS_PER_APP, "cpus": 0.01, "mem": 16}),
                None,
            )
            .expect("valid app")
        })
        .collect();
    let puts = apps
        .iter()
        .enumerate()
        .map(|(i, app)| Command::PutApp {
            app: app.clone(),
            now: T0,
            deployment_id: format!("deploy-{i:04}"),
            create_only: true,
            force: false,
        })
        .collect();
    let mut launches = Vec::new();
    let mut running = Vec::new();
    for (i, app) in apps.iter().enumerate() {
        let tasks: Vec<Task> = (0..TASKS_PER_APP)
            .map(|j| {
                let n = i * TASKS_PER_APP + j;
                let agent = n % AGENTS;
                // The scheduler's id shape: <prefix>.instance-<uuid>._app.1
                let uuid = uuid::Uuid::from_u128(0x6d65_7368_0000_4000_8000_0000_0000_0000 | n as u128);
                Task {
                    id: TaskId::from(format!("{}.instance-{uuid}._app.1", app.id.task_prefix()).as_str()),
                    framework_id: FrameworkId::from("marathon"),
                    app_id: Some(app.id.clone()),
                    agent_id: agent_id(agent),
                    host: format!("host-{agent:03}.bench"),
                    ports: vec![31_000 + (n / AGENTS) as u16],
                    service_ports: vec![10_000 + i as u16],
                    state: TaskState::Staging,
                    staged_at: T0 + 1,
                    started_at: None,
                    version: T0,
                    resources: Resources::scalars(0.01, 16.0, 0.0),
                    kill_requested: false,
                    message: String::new(),
                    health: Vec::new(),
                    unreachable_since: None,
                    inactive: false,
                }
            })
            .collect();
        running.extend(tasks.iter().map(|t| Command::TaskStatus {
            task_id: t.id.clone(),
            state: TaskState::Running,
            message: "running".into(),
            at: T0 + 2,
        }));
        launches.push(Command::LaunchTasks { tasks });
    }
    let ends = (0..APPS).map(|i| Command::EndDeployment { id: format!("deploy-{i:04}") }).collect();
    vec![agents, puts, launches, running, ends]
}

fn build_store() -> Store {
    let mut store = Store::open(Box::new(MemLog::default()), "dc1").expect("open");
    for batch in commands() {
        let n = batch.len();
        let results = store.propose(batch).expect("log write");
        assert_eq!(results.iter().filter(|r| r.is_ok()).count(), n, "every setup command applies");
    }
    let s = store.state();
    assert_eq!(s.agents.len(), AGENTS);
    assert_eq!(s.apps.len(), APPS);
    assert_eq!(s.tasks.len(), APPS * TASKS_PER_APP);
    assert!(s.deployments.is_empty(), "no deployment left");
    assert!(s.tasks.values().all(|t| t.state == TaskState::Running));
    let instances: usize = s.catalog.services.values().map(|i| i.len()).sum();
    assert_eq!(instances, APPS * TASKS_PER_APP, "every running task is a catalog instance");
    store
}

struct Fixture {
    rt: tokio::runtime::Runtime,
    control: ControlHandle,
    router: Router,
    base: String,
    client: reqwest::Client,
}

fn fixture() -> Fixture {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let store = build_store();
    let index = store.state().index;
    let (control, router, base) = rt.block_on(async {
        // A long tick: the first one runs at once (reconcile, allocate: nothing to do), then none.
        let cfg = ControlConfig {
            datacenter: "dc1".into(),
            tick: Duration::from_secs(3600),
            seed: 4,
            mesos: Default::default(),
            ..Default::default()
        };
        let (control, _join) = spawn(store, cfg);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let info = NodeInfo {
            node: "bench".into(),
            datacenter: "dc1".into(),
            http_addr: addr.to_string(),
            domain: "mesh".into(),
            started_at: T0,
            host_access: Default::default(),
            enable_script_checks: false,
        };
        let router = router(Api::new(control.clone(), info));
        let served = router.clone();
        tokio::spawn(async move { axum::serve(listener, served).await.expect("serve") });
        (control, router, format!("http://{addr}"))
    });
    // The first control tick runs at once and scans the whole state (see `control_tick`): let it
    // finish, so it does not run during the measurements.
    wait_idle();
    assert_eq!(control.state().index, index, "the control loop changed nothing (no offers, no kills)");
    let client = reqwest::Client::builder().pool_max_idle_per_host(1).build().expect("client");
    Fixture { rt, control, router, base, client }
}

/// CPU time of this process (user + system) in clock ticks, from /proc/self/stat.
fn cpu_ticks() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// Wait until the process uses (almost) no CPU: the control task has finished its first tick.
fn wait_idle() {
    let start = std::time::Instant::now();
    let Some(mut before) = cpu_ticks() else {
        std::thread::sleep(Duration::from_secs(2));
        return;
    };
    loop {
        std::thread::sleep(Duration::from_millis(300));
        let now = cpu_ticks().unwrap_or(before);
        // Under 5 % of one core over the interval (ticks are usually 10 ms).
        if now.saturating_sub(before) <= 1 || start.elapsed() > Duration::from_secs(300) {
            break;
        }
        before = now;
    }
    eprintln!("setup: control loop idle after {:.1} s", start.elapsed().as_secs_f64());
}

async fn in_process(router: &Router, uri: &str) -> axum::body::Bytes {
    let req = Request::get(uri).body(Body::empty()).expect("request");
    let resp = router.clone().oneshot(req).await.expect("infallible");
    assert_eq!(resp.status(), StatusCode::OK);
    axum::body::to_bytes(resp.into_body(), usize::MAX).await.expect("body")
}

async fn loopback(client: &reqwest::Client, base: &str, uri: &str) -> axum::body::Bytes {
    let resp = client.get(format!("{base}{uri}")).send().await.expect("send");
    assert_eq!(resp.status().as_u16(), 200);
    resp.bytes().await.expect("body")
}

/// Check once that the responses hold what the bench claims, and return their sizes.
fn verify(f: &Fixture) -> BTreeMap<&'static str, usize> {
    let mut sizes = BTreeMap::new();
    for (name, uri) in ROUTES {
        let a = f.rt.block_on(in_process(&f.router, uri));
        let b = f.rt.block_on(loopback(&f.client, &f.base, uri));
        assert_eq!(a.len(), b.len(), "{uri}: same body in-process and over the socket");
        let v: Value = serde_json::from_slice(&a).expect("json");
        match name {
            "apps_embed_tasks" | "apps" => {
                let apps = v["apps"].as_array().expect("apps");
                assert_eq!(apps.len(), APPS);
                for app in apps {
                    assert_eq!(app["tasksRunning"], TASKS_PER_APP);
                    if name == "apps_embed_tasks" {
                        let tasks = app["tasks"].as_array().expect("embedded tasks");
                        assert_eq!(tasks.len(), TASKS_PER_APP);
                        assert!(tasks.iter().all(|t| t["state"] == "TASK_RUNNING" && t["appId"] == app["id"]));
                    } else {
                        assert!(app.get("tasks").is_none());
                    }
                }
            }
            _ => {
                let tasks = v["tasks"].as_array().expect("tasks");
                assert_eq!(tasks.len(), APPS * TASKS_PER_APP);
            }
        }
        eprintln!("{uri}: {} bytes ({:.2} MiB)", a.len(), a.len() as f64 / (1024.0 * 1024.0));
        sizes.insert(name, a.len());
    }
    sizes
}

fn bench_api(c: &mut Criterion) {
    let f = fixture();
    let sizes = verify(&f);
    let mut g = c.benchmark_group("api_apps");
    g.sample_size(10).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(5));
    for (name, uri) in ROUTES {
        g.throughput(Throughput::Bytes(sizes[name] as u64));
        g.bench_function(BenchmarkId::new("in_process", name), |b| {
            b.iter(|| black_box(f.rt.block_on(in_process(&f.router, uri))).len())
        });
        g.bench_function(BenchmarkId::new("loopback", name), |b| {
            b.iter(|| black_box(f.rt.block_on(loopback(&f.client, &f.base, uri))).len())
        });
    }
    g.finish();

    // What the control loop does every tick over the same state (no calls expected).
    let view: State = (*f.control.state()).clone();
    let mut g = c.benchmark_group("control_tick");
    g.sample_size(10).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(5));
    g.throughput(Throughput::Elements((APPS * TASKS_PER_APP) as u64));
    g.bench_function("reconcile", |b| {
        // Checked here, not before the group, so a filtered-out run does not pay for it.
        let mut sched = MarathonScheduler::new(4);
        let calls = sched.reconcile(&view, T0 + 10);
        assert!(calls.iter().all(|c| !matches!(c, mesh_core::scheduler::Call::Kill { .. })), "nothing to kill");
        b.iter(|| black_box(sched.reconcile(&view, T0 + 10)).len())
    });
    g.bench_function("reconcile_rebuild", |b| {
        b.iter(|| black_box(MarathonScheduler::new(4).reconcile(&view, T0 + 10)).len())
    });
    g.finish();
    assert_eq!(f.control.state().index, view.index, "the state did not change while measuring");

    // One write through the control loop over the same state.
    let mut g = c.benchmark_group("control_write");
    g.sample_size(20).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(5));
    let mut n = 0u64;
    g.bench_function("kv_put", |b| {
        b.iter(|| {
            n += 1;
            f.rt.block_on(kv_put(&f.router, n))
        })
    });
    g.finish();
    assert!(f.control.state().index > view.index, "the writes went through");
}

async fn kv_put(router: &Router, n: u64) {
    let req = Request::put(format!("/v1/kv/bench/key-{}", n % 100)).body(Body::from(n.to_string())).expect("request");
    let resp = router.clone().oneshot(req).await.expect("infallible");
    assert_eq!(resp.status(), StatusCode::OK);
}

criterion_group!(benches, bench_api);
criterion_main!(benches);
