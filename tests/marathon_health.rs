//! Health checks on the agent, health-aware rolling upgrades, and the event stream.

mod support;

use serde_json::{Value, json};
use support::*;

fn checked_app(id: &str, instances: u32, version: &str) -> Value {
    json!({
        "id": id,
        "cmd": "touch healthy && exec python3 -m http.server $PORT0 --bind 127.0.0.1",
        "instances": instances, "cpus": 0.1, "mem": 64,
        "env": {"APP_VERSION": version},
        "healthChecks": [{"protocol": "HTTP", "path": "/healthy", "portIndex": 0,
                          "gracePeriodSeconds": 10, "intervalSeconds": 1, "timeoutSeconds": 0.5,
                          "maxConsecutiveFailures": 2}],
    })
}

async fn healthy_tasks(node: &MeshNode, app: &str) -> Vec<Value> {
    let (_, v) = node.get(&format!("/v2/apps{app}/tasks")).await;
    v["tasks"]
        .as_array()
        .map(|ts| {
            ts.iter()
                .filter(|t| {
                    t["state"] == "TASK_RUNNING"
                        && t["healthCheckResults"]
                            .as_array()
                            .is_some_and(|r| !r.is_empty() && r.iter().all(|h| h["alive"] == true))
                })
                .cloned()
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_health_check_kills_and_replaces_the_task_with_events() {
    let node = MeshNode::start(&["--runtime", "process"]);
    let mut events = EventStream::open(
        &node,
        "?event_type=failed_health_check_event&event_type=health_status_changed_event&event_type=unhealthy_task_kill_event&event_type=event_stream_attached",
    );
    events.wait_for("event_stream_attached", 10, |_| true);
    let (s, v) = node.send("POST", "/v2/apps", Some(&checked_app("/checked", 1, "1").to_string())).await;
    assert_eq!(s, 201, "{v}");
    let t =
        eventually(30, "a healthy task", || async { healthy_tasks(&node, "/checked").await.into_iter().next() }).await;
    let task_id = t["id"].as_str().unwrap().to_owned();
    events.wait_for("health_status_changed_event", 20, |e| e["taskId"] == task_id.as_str() && e["alive"] == true);
    let (_, a) = node.get("/v2/apps/checked").await;
    assert_eq!(a["app"]["tasksHealthy"], 1);
    // It answers DNS while healthy.
    let r = node.resolver(false);
    eventually(10, "healthy instance in DNS", || async {
        srv(&r, "checked.service.mesh.").await.ok().filter(|v| v.len() == 1)
    })
    .await;

    // Make it sick: its health endpoint starts answering 404.
    let marker = node.data_dir.join("sandboxes").join(&task_id).join("healthy");
    std::fs::remove_file(&marker).expect("remove the health marker");
    events.wait_for("failed_health_check_event", 20, |e| e["taskId"] == task_id.as_str());
    events.wait_for("health_status_changed_event", 20, |e| e["taskId"] == task_id.as_str() && e["alive"] == false);
    events.wait_for("unhealthy_task_kill_event", 20, |e| e["taskId"] == task_id.as_str());
    // Replaced by a new healthy task.
    eventually(60, "a healthy replacement", || async {
        healthy_tasks(&node, "/checked").await.into_iter().find(|t| t["id"] != task_id.as_str())
    })
    .await;
    eventually(10, "DNS shows only the replacement", || async {
        let (_, tasks) = node.get("/v2/apps/checked/tasks").await;
        let port =
            tasks["tasks"].as_array()?.iter().find(|t| t["id"] != task_id.as_str())?["ports"][0].as_u64()? as u16;
        srv(&r, "checked.service.mesh.").await.ok().filter(|v| v.len() == 1 && v[0].1 == port)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_upgrade_keeps_half_healthy() {
    let node = MeshNode::start(&["--runtime", "process"]);
    let mut app = checked_app("/rolling", 4, "1");
    app["upgradeStrategy"] = json!({"minimumHealthCapacity": 0.5, "maximumOverCapacity": 0.0});
    let (s, v) = node.send("POST", "/v2/apps", Some(&app.to_string())).await;
    assert_eq!(s, 201, "{v}");
    eventually(60, "4 healthy tasks of version 1", || async {
        (healthy_tasks(&node, "/rolling").await.len() == 4).then_some(())
    })
    .await;
    eventually(20, "the first deployment ends", || async {
        let (_, d) = node.get("/v2/deployments").await;
        d.as_array().is_some_and(|a| a.is_empty()).then_some(())
    })
    .await;

    app["env"] = json!({"APP_VERSION": "2"});
    let (s, v) = node.send("PUT", "/v2/apps/rolling", Some(&app.to_string())).await;
    assert_eq!(s, 200, "{v}");
    let deployment = v["deploymentId"].as_str().unwrap().to_owned();
    let (_, a) = node.get("/v2/apps/rolling").await;
    let new_version = a["app"]["versionInfo"]["lastConfigChangeAt"].as_str().unwrap().to_owned();
    // Sample the healthy count all through the deployment.
    let min_healthy = std::cell::Cell::new(usize::MAX);
    let samples = std::cell::Cell::new(0);
    let trace = std::cell::RefCell::new(Vec::new());
    let watched = tokio::time::timeout(
        std::time::Duration::from_secs(120),
        eventually(125, "the upgrade deployment ends", || {
            let node = &node;
            let deployment = deployment.clone();
            let (min, n, trace) = (&min_healthy, &samples, &trace);
            async move {
                let h = healthy_tasks(node, "/rolling").await.len();
                let (_, all) = node.get("/v2/apps/rolling/tasks").await;
                let states: Vec<String> = all["tasks"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .map(|t| {
                                format!(
                                    "{}:{}:{}",
                                    &t["version"].as_str().unwrap_or("")[17..23],
                                    t["state"].as_str().unwrap_or("").trim_start_matches("TASK_"),
                                    t["healthCheckResults"]
                                        .as_array()
                                        .map(|r| r.iter().map(|h| h["alive"].to_string()).collect::<Vec<_>>().join(""))
                                        .unwrap_or_default()
                                )
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                trace.borrow_mut().push(format!("{h} {states:?}"));
                min.set(min.get().min(h));
                n.set(n.get() + 1);
                let (_, d) = node.get("/v2/deployments").await;
                d.as_array().is_some_and(|a| a.iter().all(|x| x["id"] != deployment.as_str())).then_some(())
            }
        }),
    )
    .await;
    if watched.is_err() {
        let (_, q) = node.get("/v2/queue").await;
        let (_, a) = node.get("/v2/apps/rolling").await;
        eprintln!("queue: {q}\napp: {a}");
        let t = trace.borrow();
        panic!("the upgrade deployment did not end; last samples:\n{}", t[t.len().saturating_sub(15)..].join("\n"));
    }
    let (samples, min_healthy) = (samples.get(), min_healthy.get());
    assert!(samples > 5, "sampled throughout ({samples} samples)");
    assert!(min_healthy >= 2, "healthy count dropped to {min_healthy}:\n{}", trace.borrow().join("\n"));
    let healthy = healthy_tasks(&node, "/rolling").await;
    assert_eq!(healthy.len(), 4);
    assert!(healthy.iter().all(|t| t["version"] == new_version.as_str()), "all tasks run the new version");
    let (_, all) = node.get("/v2/apps/rolling/tasks").await;
    assert_eq!(all["tasks"].as_array().unwrap().len(), 4, "no old task left");
}
