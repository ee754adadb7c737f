//! The same `mesh_sdk::framework::Framework` that runs over HTTP runs in-process: a control loop
//! and an agent with the process runtime, no HTTP listener, and a framework driven through
//! `mesh_server::framework::InProcess` that runs three jobs to TASK_FINISHED.

use mesh_core::model::{AgentId, PortRanges, Resources};
use mesh_core::runtime::Runtime;
use mesh_core::runtime::process::ProcessRuntime;
use mesh_core::state::{MemLog, Store};
use mesh_sdk::framework::{
    Action, DriverOptions, Framework, FrameworkInfo, Offer, TaskInfo, TaskInfoExt, TaskState, TaskStatus, View,
};
use mesh_server::agent::{self, AgentConfig, StopMode};
use mesh_server::control::{self, ControlConfig};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

#[derive(Default)]
struct Jobs {
    launched: usize,
    finished: Vec<String>,
    other: Vec<String>,
}

impl Framework for Jobs {
    fn offers(&mut self, _view: &View, offers: &[Offer]) -> Vec<Action> {
        let mut actions = Vec::new();
        for o in offers {
            let mut tasks = Vec::new();
            while self.launched < 3 {
                tasks.push(TaskInfo::command(&format!("inproc-{}", self.launched), o, "exit 0", 0.1, 16.0));
                self.launched += 1;
            }
            if !tasks.is_empty() {
                actions.push(Action::launch(o, tasks));
            }
        }
        actions
    }
    fn status(&mut self, _view: &View, s: &TaskStatus) -> Vec<Action> {
        match s.state {
            TaskState::Finished => self.finished.push(s.task_id.value.clone()),
            TaskState::Running | TaskState::Starting => {}
            other => self.other.push(format!("{}: {other:?} {:?}", s.task_id, s.message)),
        }
        Vec::new()
    }
    fn is_done(&self) -> bool {
        self.finished.len() == 3 || !self.other.is_empty()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sdk_framework_runs_in_process_against_the_control_loop() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(Box::new(MemLog::default()), "dc1").unwrap();
    let cfg = ControlConfig {
        datacenter: "dc1".into(),
        tick: Duration::from_millis(50),
        seed: 1,
        mesos: Default::default(),
        ..Default::default()
    };
    let (control, join) = control::spawn(store, cfg);
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let runtime: Arc<dyn Runtime> = Arc::new(ProcessRuntime::new(tmp.path().join("sandboxes"), tx).unwrap());
    let agent_cfg = AgentConfig {
        id: AgentId::from("n1"),
        hostname: "n1".into(),
        address: "127.0.0.1".parse().unwrap(),
        wan_address: None,
        resources: Resources { ports: PortRanges::range(47100, 47109), ..Resources::scalars(1.0, 256.0, 0.0) },
        attributes: BTreeMap::new(),
        runtimes: vec!["process".into()],
        enable_script_checks: false,
        clock: mesh_core::model::system_clock(),
    };
    let agent = agent::start(agent_cfg, runtime, rx, control.clone()).await.unwrap();

    let info = FrameworkInfo { name: "in-process".into(), ..Default::default() };
    let handle = mesh_server::framework::spawn(control.clone(), info, Jobs::default(), DriverOptions::default());
    let (jobs, res) = tokio::time::timeout(Duration::from_secs(60), handle).await.expect("framework finished").unwrap();
    let summary = res.expect("driver result");
    assert_eq!(jobs.other, Vec::<String>::new());
    let mut done = jobs.finished.clone();
    done.sort();
    assert_eq!(done, vec!["inproc-0", "inproc-1", "inproc-2"]);
    // It tore itself down: the state lists it among the completed frameworks, with its tasks.
    // The driver returns once its TEARDOWN is sent; the control loop publishes the teardown
    // after applying it, so wait (with a deadline) for the published state to show it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let state = loop {
        let state = control.state();
        if state.mesos.completed.iter().any(|f| f.id.0 == summary.framework_id.value) {
            break state;
        }
        assert!(tokio::time::Instant::now() < deadline, "the framework is not among the completed ones");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let completed = state.mesos.completed.iter().find(|f| f.id.0 == summary.framework_id.value).expect("completed");
    assert_eq!(completed.completed_tasks.len(), 3);
    assert!(state.mesos.frameworks.is_empty());
    agent.stop(StopMode::KillTasks).await;
    join.abort();
}
