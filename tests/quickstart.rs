//! The Marathon quick-start, end to end against a real `mesh dev`: deploy 3 instances of a
//! small HTTP server, reach them at the ports the API and DNS (UDP and TCP) give, kill one,
//! scale down, delete. Plus the crash-looping app's growing launch delay.

mod support;

use serde_json::json;
use std::collections::BTreeSet;
use support::*;

fn web_app(id: &str, tag: &str, instances: u32) -> String {
    json!({
        "id": id,
        "cmd": "exec python3 -m http.server $PORT0 --bind 127.0.0.1",
        "instances": instances,
        "cpus": 0.1,
        "mem": 64,
        "env": {"MESH_TEST_TAG": tag},
        "labels": {"SERVICE_TAGS": "http,v1"},
    })
    .to_string()
}

async fn wait_running(node: &MeshNode, app: &str, n: usize, what: &str) -> Vec<(String, u16)> {
    eventually(60, what, || async {
        let t = running_tasks(node, app).await;
        if t.len() != n {
            return None;
        }
        for (_, port) in &t {
            if !http_ok(*port).await {
                return None;
            }
        }
        Some(t)
    })
    .await
}

async fn dns_ports(node: &MeshNode, name: &str, tcp: bool) -> Option<BTreeSet<u16>> {
    let r = node.resolver(tcp);
    srv(&r, name).await.ok().map(|v| v.into_iter().map(|(_, p)| p).collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quickstart_deploy_reach_kill_scale_delete() {
    let node = MeshNode::start(&["--runtime", "process"]);
    let tag = uuid::Uuid::new_v4().to_string();
    let (status, body) = node.send("POST", "/v2/apps", Some(&web_app("/webserver", &tag, 3))).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["id"], "/webserver");
    assert_eq!(body["instances"], 3);

    // All three answer HTTP at the host ports the API lists.
    let tasks = wait_running(&node, "/webserver", 3, "3 tasks running and answering").await;
    let api_ports: BTreeSet<u16> = tasks.iter().map(|(_, p)| *p).collect();
    assert_eq!(api_ports.len(), 3);
    for p in &api_ports {
        assert!((node.ports.0..=node.ports.1).contains(p), "port {p} from the agent's range");
    }

    // DNS SRV over UDP and TCP gives the same ports, targets resolve.
    for tcp in [false, true] {
        let ports = eventually(10, "SRV answers match the tasks", || async {
            dns_ports(&node, "webserver.service.mesh.", tcp).await.filter(|p| *p == api_ports)
        })
        .await;
        assert_eq!(ports, api_ports);
        let r = node.resolver(tcp);
        let answers = srv(&r, "WebServer.Service.MESH.").await.expect("case-insensitive SRV");
        let (target, _) = &answers[0];
        assert_eq!(*target, format!("{}.node.dc1.mesh.", node.name));
        let a = r.lookup_ip(target.as_str()).await.expect("A of the SRV target");
        assert_eq!(a.iter().next().unwrap().to_string(), "127.0.0.1");
        // tag filter
        let tagged = srv(&r, "http.webserver.service.mesh.").await.expect("tag query");
        assert_eq!(tagged.len(), 3);
    }
    // Consul's read API agrees.
    let (s, v) = node.get("/v1/health/service/webserver?passing").await;
    assert_eq!(s, 200);
    let consul_ports: BTreeSet<u16> =
        v.as_array().unwrap().iter().map(|e| e["Service"]["Port"].as_u64().unwrap() as u16).collect();
    assert_eq!(consul_ports, api_ports);
    let (_, v) = node.get("/v1/catalog/services").await;
    assert_eq!(v["webserver"], json!(["http", "v1"]));

    // Kill one task: a replacement comes, DNS follows.
    let (victim, victim_port) = tasks[0].clone();
    let (s, v) = node.send("DELETE", &format!("/v2/apps/webserver/tasks/{victim}"), None).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["task"]["id"], victim.as_str());
    let after = eventually(60, "a replacement for the killed task", || async {
        let t = running_tasks(&node, "/webserver").await;
        let ok = t.len() == 3 && t.iter().all(|(id, _)| *id != victim);
        let mut all_up = ok;
        for (_, p) in &t {
            all_up &= http_ok(*p).await;
        }
        all_up.then_some(t)
    })
    .await;
    let new_ports: BTreeSet<u16> = after.iter().map(|(_, p)| *p).collect();
    eventually(10, "DNS follows the replacement", || async {
        dns_ports(&node, "webserver.service.mesh.", false).await.filter(|p| *p == new_ports)
    })
    .await;
    if !new_ports.contains(&victim_port) {
        assert!(!http_ok(victim_port).await, "the killed task no longer answers");
    }

    // Scale to 1 with PUT.
    let (s, v) = node.send("PUT", "/v2/apps/webserver", Some(r#"{"instances": 1}"#)).await;
    assert_eq!(s, 200, "{v}");
    assert!(v["deploymentId"].is_string());
    eventually(60, "one task left, one process, one SRV answer", || async {
        let t = running_tasks(&node, "/webserver").await;
        let (_, all) = node.get("/v2/apps/webserver/tasks").await;
        let total = all["tasks"].as_array().map(|a| a.len()).unwrap_or(99);
        let pids = tagged_pids(&tag, "python3");
        let dns = dns_ports(&node, "webserver.service.mesh.", true).await.unwrap_or_default();
        (t.len() == 1 && total == 1 && pids.len() == 1 && dns.len() == 1).then_some(())
    })
    .await;

    // DELETE stops everything; DNS answers NXDOMAIN.
    let (s, v) = node.send("DELETE", "/v2/apps/webserver", None).await;
    assert_eq!(s, 200, "{v}");
    eventually(60, "no process left after DELETE", || async { tagged_pids(&tag, "python3").is_empty().then_some(()) })
        .await;
    for tcp in [false, true] {
        let r = node.resolver(tcp);
        let err =
            eventually(10, "NXDOMAIN after delete", || async { srv(&r, "webserver.service.mesh.").await.err() }).await;
        assert!(err.is_nx_domain(), "expected NXDOMAIN, got {err}");
    }
    let (s, v) = node.get("/v2/apps/webserver").await;
    assert_eq!(s, 404);
    assert_eq!(v["message"], "App '/webserver' does not exist");
    // Deployments all ended.
    eventually(20, "no deployments left", || async {
        let (_, d) = node.get("/v2/deployments").await;
        (d.as_array().map(|a| a.is_empty()) == Some(true)).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_looping_app_backs_off_with_last_task_failure() {
    let node = MeshNode::start(&["--runtime", "process"]);
    let app = json!({
        "id": "/crash", "cmd": "echo boom >&2; exit 1", "instances": 1, "cpus": 0.1, "mem": 32,
        "backoffSeconds": 1, "backoffFactor": 2, "maxLaunchDelaySeconds": 60,
    });
    let (s, v) = node.send("POST", "/v2/apps", Some(&app.to_string())).await;
    assert_eq!(s, 201, "{v}");
    // Watch the launch delay grow through the queue, and lastTaskFailure on the app.
    let seen_failures = std::sync::Mutex::new(BTreeSet::new());
    let max_delay = eventually(60, "launch delay grows past 3 s", || {
        let node = &node;
        let seen = &seen_failures;
        async move {
            let (_, a) = node.get("/v2/apps/crash").await;
            let f = &a["app"]["lastTaskFailure"];
            if f.is_object() {
                assert_eq!(f["state"], "TASK_FAILED");
                assert_eq!(f["appId"], "/crash");
                assert!(f["message"].as_str().unwrap().contains("status 1"), "{f}");
                seen.lock().unwrap().insert(f["taskId"].as_str().unwrap().to_owned());
            }
            let (_, q) = node.get("/v2/queue").await;
            let item = q["queue"].as_array()?.iter().find(|i| i["app"]["id"] == "/crash")?.clone();
            let left = item["delay"]["timeLeftSeconds"].as_u64()?;
            (left >= 3).then_some(left)
        }
    })
    .await;
    assert!(max_delay >= 3);
    let seen_failures = seen_failures.into_inner().unwrap();
    assert!(seen_failures.len() >= 2, "several failed tasks were recorded: {seen_failures:?}");
    // Resetting the delay is accepted.
    let (s, _) = node.send("DELETE", "/v2/queue/crash/delay", None).await;
    assert_eq!(s, 204);
    // Never more than `instances` tasks alive.
    let (_, t) = node.get("/v2/apps/crash/tasks").await;
    assert!(t["tasks"].as_array().unwrap().len() <= 1);
}
