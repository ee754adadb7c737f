//! 3,000 launches at once (three times what the channels between them hold), in process with the memory runtime (tasks RUNNING at once): the
//! control loop and the agent each send the other more than their channels hold (launches one
//! way, RUNNING reports the other). Before the control loop stopped waiting for agents, both
//! sides blocked on each other's full channel and the deploy froze at ~1,500 RUNNING. Also:
//! every task ends KILLED when the agent stops with `KillTasks`.

use mesh_core::app::App;
use mesh_core::model::{AgentId, PortRanges, Resources, now_millis};
use mesh_core::proto::TaskState;
use mesh_core::runtime::memory::MemoryRuntime;
use mesh_core::runtime::{Runtime, RuntimeEvent};
use mesh_core::state::{Command, MemLog, Store};
use mesh_server::agent::{self, AgentConfig, StopMode};
use mesh_server::control::{self, ControlConfig};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

const TASKS: usize = 3_000;

async fn until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_launches_at_once_all_run_and_all_stop() {
    let store = Store::open(Box::new(MemLog::default()), "dc1").unwrap();
    let cfg = ControlConfig {
        datacenter: "dc1".into(),
        tick: Duration::from_millis(50),
        seed: 1,
        mesos: Default::default(),
        ..Default::default()
    };
    let (control, join) = control::spawn(store, cfg);
    let (tx, rx) = tokio::sync::mpsc::channel::<RuntimeEvent>(1024);
    let runtime = Arc::new(MemoryRuntime::new(tx));
    let agent_cfg = AgentConfig {
        id: AgentId::from("n1"),
        hostname: "n1".into(),
        address: "127.0.0.1".parse().unwrap(),
        wan_address: None,
        resources: Resources { ports: PortRanges::range(20000, 40000), ..Resources::scalars(1000.0, 1e9, 0.0) },
        attributes: BTreeMap::new(),
        runtimes: vec!["process".into()],
        enable_script_checks: false,
        clock: mesh_core::model::system_clock(),
    };
    let agent = agent::start(agent_cfg, runtime.clone(), rx, control.clone()).await.unwrap();
    let body = serde_json::json!({"id": "/many", "cmd": "sleep 1000", "instances": TASKS, "cpus": 0.01, "mem": 1,
        "portDefinitions": [{"port": 0}]});
    let app = App::from_json(&body, None).unwrap();
    let put = Command::PutApp { app, now: now_millis(), deployment_id: "d1".into(), create_only: true, force: false };
    control.propose(put).await.unwrap();
    let running = || control.state().tasks.values().filter(|t| t.state == TaskState::Running).count();
    until("every task RUNNING", || running() == TASKS).await;
    until("every task in the catalog", || {
        control.published.catalog.load().services.get("many").map_or(0, |m| m.len()) == TASKS
    })
    .await;
    assert_eq!(runtime.running().len(), TASKS, "each task launched exactly once");
    control.drain().await;
    agent.stop(StopMode::KillTasks).await;
    until("every task KILLED", || {
        control.state().tasks.values().all(|t| t.state == TaskState::Killed) || control.state().tasks.is_empty()
    })
    .await;
    assert!(runtime.running().is_empty());
    join.abort();
}
