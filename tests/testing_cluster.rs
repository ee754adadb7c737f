//! `mesh_server::testing::Cluster` itself: a killed node stops answering at once, an agent
//! killed and restarted adopts the tasks that outlived it (as a `mesh agent` process killed
//! with SIGKILL does), dropping the cluster stops its agents' tasks, and two clusters run side
//! by side in one process (the tests of this file run in parallel), and a leader cut off by a
//! partition is replaced and catches up once healed.

mod support;

use mesh_server::testing::{Cluster, http_get, http_request, poll};
use serde_json::Value;
use std::net::SocketAddr;
use std::time::Duration;
use support::tagged_pids;

/// The ids of `app`'s running tasks, as the node at `http` reports them.
async fn running(http: SocketAddr, app: &str) -> Option<Vec<String>> {
    let (status, body) = http_get(http, &format!("/v2/apps/{app}/tasks")).await.ok()?;
    let v: Value = serde_json::from_str(&body).ok()?;
    if status != 200 {
        return None;
    }
    let mut ids: Vec<String> = v["tasks"]
        .as_array()?
        .iter()
        .filter(|t| t["state"] == "TASK_RUNNING")
        .filter_map(|t| t["id"].as_str().map(str::to_owned))
        .collect();
    ids.sort();
    Some(ids)
}

// The default (current-thread) test runtime: the cluster's nodes run on their own runtimes.
#[tokio::test]
async fn an_agent_killed_and_restarted_adopts_the_tasks_that_outlived_it() {
    let mut cluster = Cluster::builder().servers(1).agents(1).start().await.expect("the cluster starts");
    let server = cluster.http_addr(0);
    let tag = format!("testing-cluster-{}", std::process::id());
    let app = serde_json::json!({
        "id": "/sleeper", "cmd": "sleep 600", "instances": 2, "cpus": 0.1, "mem": 16,
        "env": {"MESH_TEST_TAG": tag},
    });
    let (status, body) = http_request(server, "POST", "/v2/apps", Some(&app.to_string())).await.expect("POST");
    assert_eq!(status, 201, "{body}");
    let tasks = poll(Duration::from_secs(60), "2 tasks running", || async {
        running(server, "sleeper").await.filter(|t| t.len() == 2)
    })
    .await
    .expect("the app runs");
    let pids = poll(Duration::from_secs(10), "2 task processes", || async {
        Some(tagged_pids(&tag, "sleep")).filter(|p| p.len() == 2)
    })
    .await
    .expect("its processes");

    let agent = cluster.agent(0);
    cluster.kill(agent).await;
    assert!(!cluster.is_running(agent));
    assert!(http_get(cluster.http_addr(agent), "/v1/agent/self").await.is_err(), "a killed node answers nothing");
    assert_eq!(tagged_pids(&tag, "sleep"), pids, "tasks outlive a killed agent");

    cluster.restart(agent).await.expect("the agent restarts");
    let (status, _) = http_get(cluster.http_addr(agent), "/v1/agent/self").await.expect("the agent answers again");
    assert_eq!(status, 200);
    // Adopted, not replaced: the same tasks, the same processes.
    poll(Duration::from_secs(30), "the same 2 tasks running after the restart", || async {
        (running(server, "sleeper").await? == tasks).then_some(())
    })
    .await
    .expect("the tasks are adopted");
    assert_eq!(tagged_pids(&tag, "sleep"), pids, "no task was restarted");

    // A graceful stop ends its tasks (the cluster's agents do not keep them on exit); they
    // are launched again once it is back.
    cluster.stop(agent).await;
    poll(Duration::from_secs(30), "the task processes to end", || async {
        tagged_pids(&tag, "sleep").is_empty().then_some(())
    })
    .await
    .expect("a stopped agent's tasks end");
    cluster.restart(agent).await.expect("the agent restarts");
    let pids = poll(Duration::from_secs(60), "2 new task processes", || async {
        Some(tagged_pids(&tag, "sleep")).filter(|p| p.len() == 2)
    })
    .await
    .expect("the app runs again");

    // Killed again and never restarted: its tasks outlive it, but not the cluster.
    cluster.kill(agent).await;
    assert_eq!(tagged_pids(&tag, "sleep"), pids);
    drop(cluster);
    poll(Duration::from_secs(30), "the task processes to end", || async {
        tagged_pids(&tag, "sleep").is_empty().then_some(())
    })
    .await
    .expect("no task outlives the cluster");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_survives_losing_its_leader_twice_and_a_stopped_server_comes_back() {
    let mut cluster = Cluster::builder().servers(3).agents(0).start().await.expect("the cluster starts");
    let first = cluster.leader().await.expect("a leader");
    cluster.kill(first).await;
    assert!(http_get(cluster.http_addr(first), "/v1/status/leader").await.is_err(), "the killed server is gone");
    let second = cluster.leader().await.expect("a second leader");
    assert_ne!(second, first);
    // A write through the remaining two.
    let put = |addr: SocketAddr, v: &'static str| async move {
        http_request(addr, "PUT", "/v1/kv/probe", Some(v)).await.ok().filter(|(s, b)| *s == 200 && b.trim() == "true")
    };
    poll(Duration::from_secs(30), "a write accepted", || put(cluster.http_addr(second), "one"))
        .await
        .expect("writes with 2 of 3");
    cluster.restart(first).await.expect("the first leader comes back");
    // Gracefully stopped this time; the other two still elect a leader.
    let leader = cluster.leader().await.expect("a leader of three");
    cluster.stop(leader).await;
    let third = cluster.leader().await.expect("a leader after a graceful stop");
    assert_ne!(third, leader);
    poll(Duration::from_secs(30), "a write accepted", || put(cluster.http_addr(third), "two"))
        .await
        .expect("writes again");
    let (_, body) = http_get(cluster.http_addr(third), "/v1/kv/probe?raw").await.expect("GET");
    assert_eq!(body, "two");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_cut_off_from_the_others_is_replaced_and_catches_up_when_healed() {
    let cluster = Cluster::builder().servers(3).agents(1).start().await.expect("the cluster starts");
    let put = |addr: SocketAddr, v: &'static str| async move {
        http_request(addr, "PUT", "/v1/kv/cut", Some(v)).await.ok().filter(|(s, b)| *s == 200 && b.trim() == "true")
    };
    let old = cluster.leader().await.expect("a leader");
    let others: Vec<usize> = cluster.servers().filter(|i| *i != old).collect();
    cluster.partition(&[old]);
    let new = cluster.leader_among(&others).await.expect("the other two elect a leader");
    assert_ne!(new, old);
    // The agent (on the majority's side) loses its link if it led to the old leader, and
    // finds the new one: a write through it is accepted.
    poll(Duration::from_secs(30), "a write through the agent", || put(cluster.http_addr(cluster.agent(0)), "cut"))
        .await
        .expect("writes go on without the old leader");
    // The old leader hears nothing of it.
    let stale = |i: usize| {
        let addr = cluster.http_addr(i);
        async move { http_get(addr, "/v1/kv/cut?raw&stale").await.ok().map(|(_, b)| b) }
    };
    assert_ne!(stale(old).await.as_deref(), Some("cut"), "the cut-off server saw the write");

    cluster.heal();
    cluster.leader().await.expect("all three name one leader again");
    poll(Duration::from_secs(30), "the old leader to catch up", || async {
        (stale(old).await.as_deref() == Some("cut")).then_some(())
    })
    .await
    .expect("the healed server has the write made while it was cut off");
}
