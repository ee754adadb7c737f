//! An agent that died after launching a task but before the task's RUNNING reached the control
//! side: the next agent re-adopts the task, and the control side must then see it RUNNING (not
//! STAGING forever, which also held its deployment open). In process, with a runtime that
//! launches without ever reporting `Started`, as if the agent had died right after the spawn.

use mesh_core::app::App;
use mesh_core::model::{AgentId, PortRanges, Resources, TaskId, now_millis};
use mesh_core::proto::TaskState;
use mesh_core::runtime::{RecoveredTask, Runtime, RuntimeError, RuntimeEvent, TaskSpec};
use mesh_core::state::{Command, MemLog, Store};
use mesh_server::agent::{self, AgentConfig, StopMode};
use mesh_server::control::{self, ControlConfig};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Launches "succeed" silently; `recover` returns what `adopt` holds.
#[derive(Default)]
struct Silent {
    launched: Mutex<Vec<TaskSpec>>,
    adopt: Vec<RecoveredTask>,
}

#[async_trait::async_trait]
impl Runtime for Silent {
    fn name(&self) -> &'static str {
        "process"
    }
    async fn launch(&self, spec: TaskSpec) -> Result<(), RuntimeError> {
        self.launched.lock().unwrap().push(spec);
        Ok(())
    }
    async fn kill(&self, _task_id: &TaskId, _grace: Duration) -> Result<(), RuntimeError> {
        Ok(())
    }
    async fn recover(&self) -> Result<Vec<RecoveredTask>, RuntimeError> {
        Ok(self.adopt.clone())
    }
    fn running(&self) -> Vec<TaskId> {
        let mut ids: Vec<TaskId> = self.launched.lock().unwrap().iter().map(|s| s.task_id.clone()).collect();
        ids.extend(self.adopt.iter().map(|r| r.task_id.clone()));
        ids
    }
    async fn kill_all(&self, _grace: Duration) {}
}

fn agent_cfg() -> AgentConfig {
    AgentConfig {
        id: AgentId::from("n1"),
        hostname: "n1".into(),
        address: "127.0.0.1".parse().unwrap(),
        wan_address: None,
        resources: Resources { ports: PortRanges::range(47200, 47209), ..Resources::scalars(1.0, 256.0, 0.0) },
        attributes: BTreeMap::new(),
        runtimes: vec!["process".into()],
        enable_script_checks: false,
        clock: mesh_core::model::system_clock(),
    }
}

async fn until<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_readopted_before_its_running_arrived_becomes_running() {
    let store = Store::open(Box::new(MemLog::default()), "dc1").unwrap();
    let cfg = ControlConfig {
        datacenter: "dc1".into(),
        tick: Duration::from_millis(50),
        seed: 1,
        mesos: Default::default(),
        ..Default::default()
    };
    let (control, join) = control::spawn(store, cfg);
    let first = Arc::new(Silent::default());
    let (_tx, rx) = tokio::sync::mpsc::channel::<RuntimeEvent>(64);
    let agent1 = agent::start(agent_cfg(), first.clone(), rx, control.clone()).await.unwrap();
    let body = serde_json::json!({"id": "/web", "cmd": "sleep 1000", "instances": 1, "cpus": 0.1, "mem": 16});
    let app = App::from_json(&body, None).unwrap();
    control
        .propose(Command::PutApp {
            app,
            now: now_millis(),
            deployment_id: "d1".into(),
            create_only: true,
            force: false,
        })
        .await
        .unwrap();
    let spec = until("the task is launched", || first.launched.lock().unwrap().first().cloned()).await;
    assert_eq!(control.state().tasks[&spec.task_id].state, TaskState::Staging);
    // The agent "dies" here: its RUNNING never reaches the control side.
    agent1.stop(StopMode::LeaveTasks).await;

    let second = Arc::new(Silent {
        adopt: vec![RecoveredTask {
            task_id: spec.task_id.clone(),
            labels: spec.labels.clone(),
            ports: spec.ports.clone(),
        }],
        ..Default::default()
    });
    let (_tx2, rx2) = tokio::sync::mpsc::channel::<RuntimeEvent>(64);
    let agent2 = agent::start(agent_cfg(), second.clone(), rx2, control.clone()).await.unwrap();
    until("the re-adopted task is RUNNING", || {
        (control.state().tasks.get(&spec.task_id).map(|t| t.state) == Some(TaskState::Running)).then_some(())
    })
    .await;
    until("the deployment is done", || control.state().deployments.is_empty().then_some(())).await;
    assert!(second.launched.lock().unwrap().is_empty(), "the task was not launched again");
    agent2.stop(StopMode::LeaveTasks).await;
    join.abort();
}
