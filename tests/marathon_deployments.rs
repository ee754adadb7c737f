//! Deployments: locks and force, rollback by deleting a deployment, constraints that make a
//! deployment wait (and say why), and groups whose dependencies order the steps.

mod support;

use serde_json::{Value, json};
use support::*;

fn sleeper(id: &str, instances: u32) -> Value {
    json!({"id": id, "cmd": "exec sleep 1000", "instances": instances, "cpus": 0.1, "mem": 16, "portDefinitions": []})
}

async fn deployments(node: &MeshNode) -> Vec<Value> {
    let (_, d) = node.get("/v2/deployments").await;
    d.as_array().cloned().unwrap_or_default()
}

async fn running(node: &MeshNode, app: &str) -> usize {
    let (_, v) = node.get(&format!("/v2/apps{app}/tasks")).await;
    v["tasks"].as_array().map(|a| a.iter().filter(|t| t["state"] == "TASK_RUNNING").count()).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unique_hostname_waits_with_a_reason_until_scaled_down() {
    let node = MeshNode::start(&["--runtime", "process"]);
    let mut app = sleeper("/uniq", 2);
    app["constraints"] = json!([["hostname", "UNIQUE"]]);
    let (s, v) = node.send("POST", "/v2/apps", Some(&app.to_string())).await;
    assert_eq!(s, 201, "{v}");
    eventually(30, "one instance runs", || async { (running(&node, "/uniq").await == 1).then_some(()) }).await;
    // The other waits: the queue says why ...
    eventually(20, "UnfulfilledConstraint in the queue", || async {
        let (_, q) = node.get("/v2/queue").await;
        let item = q["queue"].as_array()?.iter().find(|i| i["app"]["id"] == "/uniq")?.clone();
        let r = item["processedOffersSummary"]["rejectSummaryLastOffers"].as_array()?.clone();
        (item["count"] == 1
            && r.iter().any(|x| x["reason"] == "UnfulfilledConstraint" && x["declined"].as_u64() > Some(0)))
        .then_some(())
    })
    .await;
    // ... and so does the deployment, when asked for its reasons.
    let d = deployments(&node).await;
    assert_eq!(d.len(), 1, "the deployment waits: {d:?}");
    let (_, detailed) = node.get("/v2/deployments?embed=reasons").await;
    let reason = detailed[0]["currentActions"][0]["reason"].as_str().unwrap_or("").to_owned();
    assert!(reason.contains("UnfulfilledConstraint"), "{detailed}");
    assert_eq!(running(&node, "/uniq").await, 1, "never two on one host");
    // Scaling to 1 completes it.
    let (s, v) = node.send("PUT", "/v2/apps/uniq?force=true", Some(r#"{"instances": 1}"#)).await;
    assert_eq!(s, 200, "{v}");
    eventually(20, "the deployment completes", || async { deployments(&node).await.is_empty().then_some(()) }).await;
    assert_eq!(running(&node, "/uniq").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locks_force_and_rollback_by_deleting_a_deployment() {
    let node = MeshNode::start(&["--runtime", "process"]);
    let (s, _) = node.send("POST", "/v2/apps", Some(&sleeper("/locked", 1).to_string())).await;
    assert_eq!(s, 201);
    eventually(30, "v1 runs and its deployment ends", || async {
        (running(&node, "/locked").await == 1 && deployments(&node).await.is_empty()).then_some(())
    })
    .await;
    let (_, a) = node.get("/v2/apps/locked").await;
    let v1_cmd = a["app"]["cmd"].clone();
    // A change that cannot finish (too big) holds the lock ...
    let (s, v) = node.send("PUT", "/v2/apps/locked", Some(r#"{"cmd": "exec sleep 2000", "cpus": 100}"#)).await;
    assert_eq!(s, 200, "{v}");
    let stuck = v["deploymentId"].as_str().unwrap().to_owned();
    // ... so another change gets 409 with Marathon's body,
    let (s, v) = node.send("PUT", "/v2/apps/locked", Some(r#"{"instances": 2}"#)).await;
    assert_eq!(s, 409, "{v}");
    assert_eq!(v["deployments"][0]["id"], stuck.as_str());
    // and deleting the deployment rolls back to the definition before it.
    let (s, v) = node.send("DELETE", &format!("/v2/deployments/{stuck}"), None).await;
    assert_eq!(s, 200, "{v}");
    assert!(v["deploymentId"].is_string());
    let (_, a) = node.get("/v2/apps/locked").await;
    assert_eq!(a["app"]["cmd"], v1_cmd, "rolled back");
    assert_eq!(a["app"]["cpus"], 0.1);
    eventually(30, "the rollback deployment ends with v1 running", || async {
        (running(&node, "/locked").await == 1 && deployments(&node).await.is_empty()).then_some(())
    })
    .await;
    // force=true goes through a lock; DELETE ?force=true only stops (202, empty body).
    let (s, v) = node.send("PUT", "/v2/apps/locked", Some(r#"{"cpus": 100}"#)).await;
    assert_eq!(s, 200, "{v}");
    let stuck2 = v["deploymentId"].as_str().unwrap().to_owned();
    let (s, v) = node.send("PUT", "/v2/apps/locked?force=true", Some(r#"{"cpus": 0.1, "instances": 2}"#)).await;
    assert_eq!(s, 200, "{v}");
    let d = deployments(&node).await;
    assert!(d.iter().all(|x| x["id"] != stuck2.as_str()), "the forced change replaced the stuck deployment");
    let (s, v) = node.send("PUT", "/v2/apps/locked?force=true", Some(r#"{"cpus": 100}"#)).await;
    assert_eq!(s, 200);
    let stuck3 = v["deploymentId"].as_str().unwrap().to_owned();
    let (s, v) = node.send("DELETE", &format!("/v2/deployments/{stuck3}?force=true"), None).await;
    assert_eq!(s, 202, "{v}");
    assert!(deployments(&node).await.iter().all(|x| x["id"] != stuck3.as_str()));
    let (s, v) = node.send("DELETE", "/v2/deployments/nope", None).await;
    assert_eq!(s, 404);
    assert_eq!(v["message"], "DeploymentPlan nope does not exist");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_with_dependencies_start_in_order() {
    let node = MeshNode::start(&["--runtime", "process"]);
    let group = json!({
        "id": "/shop",
        "apps": [
            {"id": "db", "cmd": "exec sleep 1000", "cpus": 0.1, "mem": 16, "portDefinitions": []},
            {"id": "web", "cmd": "exec sleep 1000", "cpus": 0.1, "mem": 16, "instances": 2, "portDefinitions": [], "dependencies": ["/shop/db"]},
        ],
        "groups": [{"id": "tools", "apps": [{"id": "cron", "cmd": "exec sleep 1000", "cpus": 0.1, "mem": 16, "portDefinitions": []}]}],
    });
    let (s, v) = node.send("POST", "/v2/groups", Some(&group.to_string())).await;
    assert_eq!(s, 201, "{v}");
    let (s, v) = node.send("POST", "/v2/groups", Some(&group.to_string())).await;
    assert_eq!(s, 409, "{v}");
    assert_eq!(v["message"], "Group /shop is already created. Use PUT to change this group.");
    // The plan: db (and cron) first, web after.
    let d = deployments(&node).await;
    let steps: Vec<Vec<String>> = d[0]["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["actions"].as_array().unwrap().iter().map(|a| a["app"].as_str().unwrap().to_owned()).collect())
        .collect();
    let pos = |app: &str| steps.iter().position(|s| s.iter().any(|a| a == app)).unwrap();
    assert!(pos("/shop/db") < pos("/shop/web"), "{steps:?}");
    eventually(60, "everything runs", || async {
        (running(&node, "/shop/web").await == 2
            && running(&node, "/shop/db").await == 1
            && running(&node, "/shop/tools/cron").await == 1)
            .then_some(())
    })
    .await;
    // web started after db ran
    let (_, db) = node.get("/v2/apps/shop/db/tasks").await;
    let (_, web) = node.get("/v2/apps/shop/web/tasks").await;
    let db_started = db["tasks"][0]["startedAt"].as_str().unwrap().to_owned();
    for t in web["tasks"].as_array().unwrap() {
        assert!(t["stagedAt"].as_str().unwrap() >= db_started.as_str(), "web staged before db ran");
    }
    // Read back, nested.
    let (s, g) = node.get("/v2/groups/shop").await;
    assert_eq!(s, 200);
    assert_eq!(g["apps"].as_array().unwrap().len(), 2);
    assert_eq!(g["groups"][0]["id"], "/shop/tools");
    let (_, root) = node.get("/v2/groups").await;
    assert!(root["groups"].as_array().unwrap().iter().any(|x| x["id"] == "/shop"));
    let (_, star) = node.get("/v2/apps/shop/*").await;
    assert_eq!(star["*"].as_array().unwrap().len(), 3);
    // scaleBy
    let (s, v) = node.send("PUT", "/v2/groups/shop?force=true", Some(r#"{"scaleBy": 2}"#)).await;
    assert_eq!(s, 200, "{v}");
    let (_, web) = node.get("/v2/apps/shop/web").await;
    assert_eq!(web["app"]["instances"], 4);
    // Delete the group: everything stops.
    let (s, v) = node.send("DELETE", "/v2/groups/shop?force=true", None).await;
    assert_eq!(s, 200, "{v}");
    eventually(30, "the group is gone", || async {
        let (s, _) = node.get("/v2/groups/shop").await;
        let (_, t) = node.get("/v2/tasks").await;
        (s == 404 && t["tasks"].as_array().is_some_and(|a| a.is_empty())).then_some(())
    })
    .await;
}
