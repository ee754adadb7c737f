//! A table of bad requests: each gets Marathon's (or Consul's) status code and error body, and
//! leaves the state exactly as it was.

mod support;

use serde_json::{Value, json};
use support::*;

async fn snapshot(node: &MeshNode) -> (Value, Value) {
    let (_, apps) = node.get("/v2/apps").await;
    let (_, deps) = node.get("/v2/deployments").await;
    let ids: Vec<Value> = deps.as_array().unwrap().iter().map(|d| d["id"].clone()).collect();
    (apps, Value::Array(ids))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_marathon_errors_and_change_nothing() {
    let node = MeshNode::start(&["--runtime", "process"]);
    // An app that can never be placed keeps its deployment (and its lock) open.
    let (s, v) = node
        .send("POST", "/v2/apps", Some(r#"{"id": "/stuck", "cmd": "sleep 1000", "cpus": 100, "instances": 1}"#))
        .await;
    assert_eq!(s, 201, "{v}");
    let stuck_deployment = v["deployments"][0]["id"].as_str().expect("deployment id").to_owned();
    let (s, _) = node.send("POST", "/v2/apps", Some(r#"{"id": "/idle", "cmd": "sleep 1000", "instances": 0}"#)).await;
    assert_eq!(s, 201);
    eventually(20, "the idle app's deployment ends", || async {
        let (_, d) = node.get("/v2/deployments").await;
        (d.as_array().unwrap().len() == 1).then_some(())
    })
    .await;

    // (method, path, body, status, check of the body)
    type Check = fn(&Value) -> bool;
    let invalid_at = |path: &'static str| {
        move |v: &Value| {
            v["message"] == "Object is not valid" && v["details"].as_array().unwrap().iter().any(|d| d["path"] == path)
        }
    };
    let cases: Vec<(&str, &str, Option<&str>, u16, Box<dyn Fn(&Value) -> bool>)> = vec![
        ("POST", "/v2/apps", Some("{not json"), 400, Box::new(|v: &Value| v["message"] == "Invalid JSON")),
        ("POST", "/v2/apps", Some(r#"[1,2]"#), 400, Box::new(|v: &Value| v["message"] == "Invalid JSON")),
        ("POST", "/v2/apps", Some(r#"{"id": "/a", "cmd": "x", "args": ["y"]}"#), 422, Box::new(invalid_at("/"))),
        ("POST", "/v2/apps", Some(r#"{"id": "/a"}"#), 422, Box::new(invalid_at("/"))),
        ("POST", "/v2/apps", Some(r#"{"cmd": "x"}"#), 422, Box::new(invalid_at("/id"))),
        ("POST", "/v2/apps", Some(r#"{"id": "/Bad_Id", "cmd": "x"}"#), 422, Box::new(invalid_at("/id"))),
        ("POST", "/v2/apps", Some(r#"{"id": "/a/tasks", "cmd": "x"}"#), 422, Box::new(invalid_at("/id"))),
        (
            "POST",
            "/v2/apps",
            Some(r#"{"id": "/a", "cmd": "x", "instances": -1}"#),
            422,
            Box::new(invalid_at("/instances")),
        ),
        ("POST", "/v2/apps", Some(r#"{"id": "/a", "cmd": "x", "cpus": -0.5}"#), 422, Box::new(invalid_at("/cpus"))),
        ("POST", "/v2/apps", Some(r#"{"id": "/a", "cmd": ""}"#), 422, Box::new(invalid_at("/cmd"))),
        (
            "POST",
            "/v2/apps",
            Some(r#"{"id": "/a", "cmd": "x", "backoffFactor": 0.2}"#),
            422,
            Box::new(invalid_at("/backoffFactor")),
        ),
        (
            "POST",
            "/v2/apps",
            Some(r#"{"id": "/a", "cmd": "x", "ports": [1], "portDefinitions": []}"#),
            422,
            Box::new(invalid_at("/")),
        ),
        (
            "POST",
            "/v2/apps",
            Some(r#"{"id": "/a", "cmd": "x", "constraints": [["hostname", "SOMETIMES"]]}"#),
            422,
            Box::new(invalid_at("/constraints(0)")),
        ),
        (
            "POST",
            "/v2/apps",
            Some(r#"{"id": "/a", "cmd": "x", "instances": "three"}"#),
            400,
            Box::new(|v: &Value| v["message"] == "Invalid JSON" && v["details"][0]["path"] == "/instances"),
        ),
        (
            "POST",
            "/v2/apps",
            Some(r#"{"id": "/idle", "cmd": "sleep 1"}"#),
            409,
            Box::new(|v: &Value| v["message"] == "An app with id [/idle] already exists."),
        ),
        ("GET", "/v2/apps/nope", None, 404, Box::new(|v: &Value| v["message"] == "App '/nope' does not exist")),
        ("GET", "/v2/apps/nope/tasks", None, 404, Box::new(|v: &Value| v["message"] == "App '/nope' does not exist")),
        ("PUT", "/v2/apps/idle", Some(r#"{"instances": -3}"#), 422, Box::new(invalid_at("/instances"))),
        ("PUT", "/v2/apps/idle", Some("nope"), 400, Box::new(|v: &Value| v["message"] == "Invalid JSON")),
        (
            "PUT",
            "/v2/apps/stuck",
            Some(r#"{"instances": 2}"#),
            409,
            Box::new(|v: &Value| {
                v["message"].as_str().unwrap_or("").starts_with("App is locked by one or more deployments")
                    && v["deployments"][0]["id"].is_string()
            }),
        ),
        ("DELETE", "/v2/apps/nope", None, 404, Box::new(|v: &Value| v["message"] == "App '/nope' does not exist")),
        (
            "DELETE",
            "/v2/apps/idle/tasks/idle.instance-0000._app.1",
            None,
            404,
            Box::new(|v: &Value| v["message"] == "Task 'idle.instance-0000._app.1' does not exist"),
        ),
        (
            "DELETE",
            "/v2/apps/idle/tasks?scale=true&wipe=true",
            None,
            400,
            Box::new(|v: &Value| v["message"].is_string()),
        ),
        ("GET", "/v2/no-such-route", None, 404, Box::new(|v: &Value| v["message"] == "URI not found")),
        ("GET", "/v1/catalog/services?dc=elsewhere", None, 500, Box::new(|v: &Value| v == "No path to datacenter")),
    ];
    let _: Option<Check> = None;
    for (method, path, body, status, check) in cases {
        let before = snapshot(&node).await;
        let (s, v) = node.send(method, path, body).await;
        assert_eq!(s, status, "{method} {path} {body:?} → {v}");
        assert!(check(&v), "{method} {path} {body:?}: unexpected body {v}");
        let after = snapshot(&node).await;
        assert_eq!(before, after, "{method} {path} changed the state");
    }

    // force=True (as Python sends it) overrides the lock, and the old deployment is gone.
    let (s, v) = node.send("PUT", "/v2/apps/stuck?force=True", Some(r#"{"instances": 0}"#)).await;
    assert_eq!(s, 200, "{v}");
    let (_, d) = node.get("/v2/deployments").await;
    assert!(d.as_array().unwrap().iter().all(|x| x["id"] != stuck_deployment.as_str()), "{d}");
    let _ = json!(null);
}
