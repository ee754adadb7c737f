//! The batch-framework example (`examples/batch-framework`) against an in-process cluster
//! (`mesh_server::testing::Cluster`: three servers and two agents in this test process, on
//! loopback): the leader is killed while the jobs run; the framework re-subscribes through the
//! agent it was given, and every job still ends TASK_FINISHED.

// The report's other fields are for the example's summary line.
#[allow(dead_code)]
#[path = "../examples/batch-framework/batch.rs"]
mod batch;

use mesh_server::testing::{Cluster, http_get, poll};
use serde_json::Value;
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

const JOBS: usize = 6;

/// The framework's tasks as the node at `http` reports them: (task id, state).
async fn batch_tasks(http: SocketAddr) -> Option<Vec<(String, String)>> {
    let (status, body) = http_get(http, "/master/tasks?limit=1000").await.ok()?;
    let v: Value = serde_json::from_str(&body).ok()?;
    if status != 200 {
        return None;
    }
    let tasks = v["tasks"].as_array()?;
    Some(
        tasks
            .iter()
            .filter_map(|t| Some((t["id"].as_str()?.to_owned(), t["state"].as_str()?.to_owned())))
            .filter(|(id, _)| id.starts_with("batch-job-"))
            .collect(),
    )
}

/// Every task of framework `fid`, running or completed, whether the framework is still active
/// or was torn down, as the node at `http` reports them (`/master/frameworks`): (id, state).
async fn framework_tasks(http: SocketAddr, fid: &str) -> Option<Vec<(String, String)>> {
    let (status, body) = http_get(http, "/master/frameworks").await.ok()?;
    let v: Value = serde_json::from_str(&body).ok()?;
    if status != 200 {
        return None;
    }
    let mut out = Vec::new();
    for list in ["frameworks", "completed_frameworks"] {
        for f in v[list].as_array()?.iter().filter(|f| f["id"] == fid) {
            for t in ["tasks", "completed_tasks"].iter().filter_map(|k| f[*k].as_array()).flatten() {
                out.push((t["id"].as_str()?.to_owned(), t["state"].as_str()?.to_owned()));
            }
        }
    }
    Some(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_jobs_finish_though_the_leader_is_killed_mid_run() {
    let mut cluster = Cluster::builder().servers(3).agents(2).start().await.expect("the cluster starts");
    let leader = cluster.leader().await.expect("a leader");

    let cfg = batch::Config {
        jobs: JOBS,
        // Long enough that the leader dies while they run.
        cmd: "sleep 5; echo job $JOB done".into(),
        reconcile_interval: Duration::from_secs(2),
        ..Default::default()
    };
    let master = cluster.master_url();
    let framework = tokio::spawn(async move { batch::run(&master, cfg).await });

    // Kill the leader once jobs run (and before any finished).
    let agent = cluster.http_addr(cluster.agent(0));
    let running = poll(Duration::from_secs(60), "the batch jobs to run", || async {
        let tasks = batch_tasks(agent).await?;
        let running = tasks.iter().filter(|(_, s)| s == "TASK_RUNNING").count();
        (running > 0).then_some(tasks)
    })
    .await
    .expect("jobs run");
    assert!(
        running.iter().all(|(_, s)| s != "TASK_FINISHED") && !framework.is_finished(),
        "the leader must die mid-run: {running:?}"
    );
    eprintln!("killing leader {} with {running:?}", cluster.name(leader));
    cluster.kill(leader).await;
    let next = cluster.leader().await.expect("a new leader");
    assert_ne!(next, leader, "another server leads");

    let report = tokio::time::timeout(Duration::from_secs(120), framework)
        .await
        .expect("the framework ends within 120 s")
        .expect("the framework's task")
        .expect("the framework starts");
    eprintln!("{report:?}");
    assert_eq!(report.error, None, "the driver did not give up");
    assert_eq!(report.finished, JOBS, "every job finished: {report:?}");
    assert!(report.failed.is_empty(), "no job failed: {report:?}");
    assert_eq!(report.exit_code(), 0);
    assert!(report.subscriptions >= 2, "the framework re-subscribed after the kill: {report:?}");

    // The new leader's view agrees: the torn-down framework's completed tasks include a
    // TASK_FINISHED attempt of every job.
    let new_leader = cluster.http_addr(next);
    let fid = report.framework_id.clone();
    let finished = poll(Duration::from_secs(30), "the leader to report every job finished", || async {
        let tasks = framework_tasks(new_leader, &fid).await?;
        let jobs: BTreeSet<String> = tasks
            .iter()
            .filter(|(_, s)| s == "TASK_FINISHED")
            .filter_map(|(id, _)| Some(id.strip_prefix("batch-job-")?.split('-').next()?.to_owned()))
            .collect();
        (jobs.len() == JOBS).then_some(tasks)
    })
    .await
    .expect("the master's view");
    eprintln!("the framework's tasks at the new leader: {finished:?}");

    // The killed server comes back on its data dir and the three agree on a leader again.
    cluster.restart(leader).await.expect("the killed server restarts");
    let after = cluster.leader().await.expect("a leader all three name");
    assert!(cluster.is_running(after));
}
