//! Restarting `mesh dev` on the same data dir keeps every app and ends with exactly
//! `instances` tasks per app: after SIGKILL (and after SIGTERM with --keep-tasks-on-exit) it
//! re-adopts the processes that still run and replaces the ones that died; after a plain
//! SIGTERM it has stopped its tasks and starts new ones. Never orphans, never duplicates.

mod support;

use serde_json::json;
use std::collections::BTreeSet;
use support::*;

fn app(tag: &str) -> String {
    json!({
        "id": "/svc/keep", "cmd": "exec python3 -m http.server $PORT0 --bind 127.0.0.1", "instances": 2,
        "cpus": 0.1, "mem": 64, "env": {"MESH_TEST_TAG": tag},
    })
    .to_string()
}

async fn settle(node: &MeshNode, tag: &str, n: usize) -> (BTreeSet<String>, Vec<u32>) {
    eventually(60, "exactly n running tasks, n processes, deployments done", || async {
        let t = running_tasks(node, "/svc/keep").await;
        let (_, all) = node.get("/v2/apps/svc/keep/tasks").await;
        let total = all["tasks"].as_array().map(|a| a.len()).unwrap_or(99);
        let (_, d) = node.get("/v2/deployments").await;
        let pids = tagged_pids(tag, "python3");
        let mut up = true;
        for (_, p) in &t {
            up &= http_ok(*p).await;
        }
        (up && t.len() == n && total == n && pids.len() == n && d.as_array().is_some_and(|a| a.is_empty()))
            .then(|| (t.into_iter().map(|(id, _)| id).collect(), pids))
    })
    .await
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "))
}

async fn run(signal: &str, keep: bool, kill_one_while_down: bool) {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let ports = port_range();
    let extra: Vec<&str> =
        if keep { vec!["--runtime", "process", "--keep-tasks-on-exit"] } else { vec!["--runtime", "process"] };
    let tag = uuid::Uuid::new_v4().to_string();
    let mut node = MeshNode::start_on(&data, ports, &extra);
    let (s, v) = node.send("POST", "/v2/apps", Some(&app(&tag))).await;
    assert_eq!(s, 201, "{v}");
    let (ids, pids) = settle(&node, &tag, 2).await;

    node.stop_with(signal);
    let adopt = signal == "KILL" || keep;
    if adopt {
        assert!(pids.iter().all(|p| alive(*p)), "tasks outlive the node");
    } else {
        assert!(tagged_pids(&tag, "python3").is_empty(), "a clean stop leaves no task process");
    }
    let mut victim = None;
    if kill_one_while_down {
        let p = pids[0];
        let _ = std::process::Command::new("kill").args(["-KILL", &p.to_string()]).status();
        eventually(10, "victim gone", || async { (!alive(p)).then_some(()) }).await;
        victim = Some(p);
    }

    let node = MeshNode::start_on(&data, ports, &extra);
    let (s, v) = node.get("/v2/apps/svc/keep").await;
    assert_eq!(s, 200, "the app survives the restart: {v}");
    assert_eq!(v["app"]["instances"], 2);
    let (ids2, pids2) = settle(&node, &tag, 2).await;
    match (adopt, victim) {
        (true, None) => {
            assert_eq!(ids2, ids, "the same tasks are re-adopted");
            assert_eq!(pids2, pids, "the same processes are re-adopted");
        }
        (true, Some(v)) => {
            assert_eq!(ids2.intersection(&ids).count(), 1, "one task adopted, one replaced");
            assert!(!pids2.contains(&v));
            let (_, a) = node.get("/v2/apps/svc/keep").await;
            assert!(a["app"]["lastTaskFailure"]["message"].as_str().is_some(), "the lost task is recorded: {a}");
        }
        (false, _) => assert!(ids2.is_disjoint(&ids), "new tasks after a clean stop"),
    }
    // Still exactly two after a few more reconcile rounds.
    for _ in 0..5 {
        let (_, _) = node.get("/v2/apps").await;
        assert_eq!(tagged_pids(&tag, "python3").len(), 2, "no duplicates");
    }
    let (s, _) = node.send("DELETE", "/v2/apps/svc/keep", None).await;
    assert_eq!(s, 200);
    eventually(30, "no orphan left after delete", || async { tagged_pids(&tag, "python3").is_empty().then_some(()) })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_readopts_running_tasks() {
    run("KILL", false, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_replaces_a_task_that_died_while_down() {
    run("KILL", false, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_tasks_and_restart_replaces_them() {
    run("TERM", false, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_keep_tasks_readopts() {
    run("TERM", true, false).await;
}

/// Issue 10, item 2: processes that leave the task's process group (`setsid`, a double fork,
/// SIGTERM ignored) die with their task, on DELETE of the app and on SIGTERM of `mesh dev`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_that_leave_the_group_die_on_delete_and_on_sigterm() {
    let escape = concat!(
        "setsid sleep 1000 & ",
        "sh -c '(setsid sleep 1000 &) &'; ",
        "(setsid sh -c 'trap \"\" TERM; exec sleep 1000' &); ",
        "exec sleep 1000"
    );
    let mut node = MeshNode::start(&["--runtime", "process"]);
    let (tag1, tag2) = (uuid::Uuid::new_v4().to_string(), uuid::Uuid::new_v4().to_string());
    for (id, tag) in [("/esc/one", &tag1), ("/esc/two", &tag2)] {
        let app =
            json!({"id": id, "cmd": escape, "instances": 1, "cpus": 0.1, "mem": 32, "env": {"MESH_TEST_TAG": tag}});
        let (s, v) = node.send("POST", "/v2/apps", Some(&app.to_string())).await;
        assert_eq!(s, 201, "{v}");
    }
    for tag in [&tag1, &tag2] {
        eventually(30, "four sleeps per task", || async { (tagged_pids(tag, "sleep").len() == 4).then_some(()) }).await;
    }
    let (s, _) = node.send("DELETE", "/v2/apps/esc/one", None).await;
    assert_eq!(s, 200);
    eventually(30, "no process of the deleted app is left", || async {
        tagged_pids(&tag1, "sleep").is_empty().then_some(())
    })
    .await;
    node.stop_with("TERM");
    assert_eq!(tagged_pids(&tag2, "sleep"), Vec::<u32>::new(), "SIGTERM of mesh dev left processes of its tasks");
}

/// A data dir written before `mesh dev` ran on Raft (its own state log, `state.wal`) is
/// adopted on the first start: every app and KV key is there, the old files are set aside, and
/// the next start reads only the Raft log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_dir_from_the_state_log_is_adopted_into_raft() {
    use mesh_core::kv::{KvOp, KvValue, SetMode};
    use mesh_core::state::{Command, Store, WalLog};
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    {
        let log = WalLog::open_data_dir(&data, 0).unwrap();
        let mut store = Store::open(Box::new(log), "dc1").unwrap();
        let app = mesh_core::app::App::from_json(
            &json!({"id": "/old/app", "cmd": "exec sleep 1000", "instances": 0, "cpus": 0.01, "mem": 8}),
            None,
        )
        .unwrap();
        let put = Command::PutApp { app, now: 1, deployment_id: "d1".into(), create_only: true, force: false };
        let kv = Command::Kv(KvOp::Set {
            key: "old/key".into(),
            value: KvValue(b"kept".to_vec().into()),
            flags: 7,
            mode: SetMode::Plain,
            now: 1,
        });
        for r in store.propose(vec![put, kv]).unwrap() {
            r.unwrap();
        }
    }
    assert!(data.join(mesh_core::state::WAL_DIR).exists());
    let ports = port_range();
    let mut node = MeshNode::start_on(&data, ports, &["--runtime", "process"]);
    async fn check(node: &MeshNode) {
        let (s, v) = node.get("/v2/apps/old/app").await;
        assert_eq!((s, &v["app"]["id"]), (200, &json!("/old/app")), "{v}");
        let (s, v) = node.get("/v1/kv/old/key").await;
        assert_eq!(s, 200, "{v}");
        assert_eq!(v[0]["Flags"], 7, "{v}");
    }
    check(&node).await;
    assert!(!data.join(mesh_core::state::WAL_DIR).exists(), "the old log is set aside");
    assert!(data.join(format!("{}.pre-raft", mesh_core::state::WAL_DIR)).exists());
    // Written after the adoption, and kept with it across a restart on Raft alone.
    let (s, v) = node.send("PUT", "/v1/kv/new/key", Some("x")).await;
    assert_eq!(s, 200, "{v}");
    node.stop_with("TERM");
    let node = MeshNode::start_on(&data, ports, &["--runtime", "process"]);
    check(&node).await;
    let (s, _) = node.get("/v1/kv/new/key").await;
    assert_eq!(s, 200);
}
