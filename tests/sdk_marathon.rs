//! mesh-sdk's typed Marathon client against a real `mesh dev`, and the autoscaler example run as
//! a real process against an app and a metric served by the test.

mod sdk_support;
mod support;

use futures_util::StreamExt;
use mesh_sdk::marathon::{AppDefinition, AppQuery, EventKind, KillResult, MarathonClient, MarathonError};
use sdk_support::ExampleProc;
use serde_json::json;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use support::*;

fn sleeper(id: &str) -> AppDefinition {
    AppDefinition::new(id).cmd("exec sleep 1000").cpus(0.1).mem(16.0).field("portDefinitions", json!([]))
}

async fn running(m: &MarathonClient, id: &str) -> usize {
    m.app_tasks(id).await.map(|ts| ts.iter().filter(|t| t.is_running()).count()).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_client_creates_scales_lists_streams_and_types_errors() {
    let node = MeshNode::start(&["--runtime", "process"]);
    let m = MarathonClient::new(&node.url("")).unwrap();
    m.ping().await.unwrap();
    let mut events = m.events(&["deployment_success", "deployment_info"]).await.unwrap();

    // create
    let app = m.create_app(&sleeper("/sdk/sleepy").instances(1).label("team", "sdk")).await.unwrap();
    assert_eq!(app.id(), "/sdk/sleepy");
    assert_eq!(app.instances(), 1);
    assert_eq!(app.definition.labels.as_ref().unwrap()["team"], "sdk");
    assert_eq!(app.deployments.len(), 1, "a new app has its deployment: {app:?}");

    // errors carry Marathon's message, typed
    match m.create_app(&sleeper("/sdk/sleepy")).await {
        Err(MarathonError::Conflict { message }) => assert!(message.contains("already exists"), "{message}"),
        other => panic!("expected Conflict, got {other:?}"),
    }
    match m.get_app("/sdk/nope").await {
        Err(e @ MarathonError::NotFound { .. }) => {
            assert_eq!(e.message(), Some("App '/sdk/nope' does not exist"));
            assert_eq!(e.status(), Some(404));
        }
        other => panic!("expected NotFound, got {other:?}"),
    }
    match m.update_app("/sdk/sleepy", &json!({"cpus": -1}), false).await {
        Err(MarathonError::Invalid { details, .. }) => {
            assert!(details.iter().any(|d| d.path == "/cpus"), "{details:?}")
        }
        other => panic!("expected Invalid, got {other:?}"),
    }
    // PUT of an unknown app would create it; `{"instances": 2}` alone is not a valid app
    assert!(matches!(m.scale_app("/sdk/nope", 2, false).await, Err(MarathonError::Invalid { .. })));

    eventually(30, "one task running", || async { (running(&m, "/sdk/sleepy").await == 1).then_some(()) }).await;

    // scale: the event stream reports the deployment
    let d = m.scale_app("/sdk/sleepy", 3, false).await.unwrap();
    let mut saw_info = false;
    let done = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(ev) = events.next().await {
            let ev = ev.expect("event");
            if ev.deployment_id() != Some(d.deployment_id.as_str()) {
                continue;
            }
            match ev.kind {
                EventKind::DeploymentInfo(step) => {
                    assert!(step.actions.iter().any(|a| a.app.as_deref() == Some("/sdk/sleepy")), "{step:?}");
                    saw_info = true;
                }
                EventKind::DeploymentSuccess { .. } => return true,
                _ => {}
            }
        }
        false
    })
    .await;
    assert_eq!(done, Ok(true), "deployment_success of {} on the event stream", d.deployment_id);
    assert!(saw_info, "deployment_info came before deployment_success");

    // list
    eventually(30, "three tasks running", || async { (running(&m, "/sdk/sleepy").await == 3).then_some(()) }).await;
    let tasks = m.app_tasks("/sdk/sleepy").await.unwrap();
    assert!(tasks.iter().all(|t| t.app_id == "/sdk/sleepy" && !t.host.is_empty() && t.staged_at.is_some()));
    let all = m.list_tasks().await.unwrap();
    assert!(tasks.iter().all(|t| all.iter().any(|a| a.id == t.id)));
    let apps = m.list_apps(&AppQuery::label("team==sdk")).await.unwrap();
    assert_eq!(
        apps.iter().map(|a| (a.id(), a.instances(), a.tasks_running)).collect::<Vec<_>>(),
        [("/sdk/sleepy", 3, 3)]
    );
    assert!(m.list_apps(&AppQuery::id("no-such")).await.unwrap().is_empty());

    // kill one and scale down; kill another, which is replaced
    match m.kill_tasks(&[tasks[0].id.as_str()], true).await.unwrap() {
        KillResult::Scaled(r) => assert!(!r.deployment_id.is_empty()),
        other => panic!("expected a scale-down deployment, got {other:?}"),
    }
    eventually(30, "scaled to 2", || async {
        let app = m.get_app("/sdk/sleepy").await.ok()?;
        (app.instances() == 2 && app.tasks.iter().all(|t| t.id != tasks[0].id)).then_some(())
    })
    .await;
    match m.kill_task("/sdk/sleepy", &tasks[1].id, false).await.unwrap() {
        KillResult::Killed(ts) => {
            assert_eq!(ts.iter().map(|t| t.id.as_str()).collect::<Vec<_>>(), [tasks[1].id.as_str()])
        }
        other => panic!("expected the killed task, got {other:?}"),
    }
    match m.kill_task("/sdk/sleepy", "sdk_sleepy.nope", false).await {
        Err(MarathonError::NotFound { message }) => assert!(message.contains("sdk_sleepy.nope"), "{message}"),
        other => panic!("expected NotFound, got {other:?}"),
    }

    // a deployment that cannot finish: listed, locks the app, cancelled
    m.create_app(&sleeper("/sdk/huge").cpus(100.0)).await.unwrap();
    let stuck = m.list_deployments().await.unwrap();
    let stuck =
        stuck.iter().find(|d| d.affected_apps.iter().any(|a| a == "/sdk/huge")).expect("deployment of /sdk/huge");
    assert!(stuck.total_steps >= 1 && !stuck.steps.is_empty(), "{stuck:?}");
    match m.scale_app("/sdk/huge", 2, false).await {
        Err(MarathonError::Locked { deployments, .. }) => assert_eq!(deployments, std::slice::from_ref(&stuck.id)),
        other => panic!("expected Locked, got {other:?}"),
    }
    assert_eq!(m.cancel_deployment(&stuck.id, true).await.unwrap(), None);
    assert!(m.list_deployments().await.unwrap().iter().all(|d| d.id != stuck.id));
    assert!(matches!(m.cancel_deployment(&stuck.id, true).await, Err(MarathonError::NotFound { .. })));

    // restart and delete
    let r = m.restart_app("/sdk/sleepy", false).await.unwrap();
    assert!(!r.deployment_id.is_empty());
    m.delete_app("/sdk/huge", true).await.unwrap();
    m.delete_app("/sdk/sleepy", true).await.unwrap();
    eventually(30, "apps gone", || async {
        matches!(m.get_app("/sdk/sleepy").await, Err(MarathonError::NotFound { .. })).then_some(())
    })
    .await;

    // an unreachable server is a transport error
    let dead = MarathonClient::new("http://127.0.0.1:9").unwrap();
    assert!(matches!(dead.list_apps(&AppQuery::default()).await, Err(MarathonError::Transport(_))));
}

/// Serve `value` as a plain-text number at `http://127.0.0.1:<port>/queue-length`.
async fn metric_server(value: Arc<AtomicU64>) -> u16 {
    let app = axum::Router::new().route(
        "/queue-length",
        axum::routing::get(move || {
            let value = value.clone();
            async move { value.load(Ordering::SeqCst).to_string() }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await.ok() });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn autoscaler_example_follows_the_metric_within_bounds() {
    let node = MeshNode::start(&["--runtime", "process"]);
    let m = MarathonClient::new(&node.url("")).unwrap();
    m.create_app(&sleeper("/work/consumer").instances(1)).await.unwrap();
    eventually(30, "one consumer", || async { (running(&m, "/work/consumer").await == 1).then_some(()) }).await;

    let queue = Arc::new(AtomicU64::new(0));
    let port = metric_server(queue.clone()).await;
    let args: Vec<String> =
        ["--app", "/work/consumer", "--per-instance", "10", "--min", "1", "--max", "4", "--interval", "0.3"]
            .iter()
            .map(|s| s.to_string())
            .collect();
    let scaler = ExampleProc::spawn(
        "autoscaler",
        &args,
        &[("MARATHON_URL", node.url("")), ("METRIC_URL", format!("http://127.0.0.1:{port}/queue-length"))],
    );
    scaler.wait_line("metric=0 instances=1", 20).await;

    let instances = |want: u32| {
        let m = m.clone();
        async move {
            let app = m.get_app("/work/consumer").await.ok()?;
            let running = app.tasks.iter().filter(|t| t.is_running()).count();
            (app.instances() == want && running == want as usize).then_some(())
        }
    };
    // 25 queued at 10 per instance: 3 consumers
    queue.store(25, Ordering::SeqCst);
    eventually(40, "scaled up to 3", || instances(3)).await;
    // far more than 4 can take: capped at --max
    queue.store(1000, Ordering::SeqCst);
    eventually(40, "scaled up to the max, 4", || instances(4)).await;
    scaler.wait_line("from 3 to 4", 10).await;
    // drained: back to --min
    queue.store(0, Ordering::SeqCst);
    eventually(40, "scaled down to the min, 1", || instances(1)).await;
    let line = scaler.wait_line("from 4 to 1", 10).await;
    // and it saw that deployment end on the event stream
    let id = line.rsplit("(deployment ").next().unwrap().trim_end_matches(')');
    scaler.wait_line(&format!("deployment {id} done"), 10).await;
}
