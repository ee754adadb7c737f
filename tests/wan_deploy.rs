//! Deploying across datacenters (issue 14, points 3 and 6): Marathon's and the Mesos master's
//! endpoints take `?dc=` as Consul's do, so one address deploys into and inspects any
//! datacenter (marathon-python deploys into dc2 through dc1's agent); `?dc=dc1,dc2` on
//! Marathon's `/v2/` runs a request in each datacenter, and `mesh app deploy --dc dc1,dc2`
//! follows each one's deployment; with every server of dc2 killed, dc1 deploys and dc2 is
//! reported unreachable, fast. Two datacenters of a server and an agent each, as processes on
//! loopback addresses.

mod support;

use serde_json::{Value, json};
use std::process::Command;
use std::time::{Duration, Instant};
use support::*;

fn net() -> String {
    format!("127.{}.92", 20 + std::process::id() % 200)
}

/// `GET path` on `node`: status, JSON body (`Null` when unreachable) and the fan-out header.
async fn get(node: &MeshNode, path: &str) -> (u16, Value, String) {
    match node.client.get(node.url(path)).timeout(Duration::from_secs(20)).send().await {
        Ok(r) => {
            let status = r.status().as_u16();
            let header =
                r.headers().get("x-mesh-datacenters").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
            (status, r.json().await.unwrap_or(Value::Null), header)
        }
        Err(_) => (0, Value::Null, String::new()),
    }
}

/// `mesh app deploy` with `args` against `node`: exit code, standard output and error.
fn mesh_app_deploy(node: &MeshNode, args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_mesh"))
        .args(["app", "deploy", "--http-addr", &node.http.to_string(), "--timeout", "120s"])
        .args(args)
        .output()
        .expect("mesh app deploy");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Running tasks of `app` as its datacenter's own server sees them, and their hosts.
async fn running(server: &MeshNode, app: &str) -> (u64, Vec<String>) {
    let (_, v, _) = get(server, &format!("/v2/apps/{app}/tasks")).await;
    let mut hosts: Vec<String> = v["tasks"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|t| t["state"] == "TASK_RUNNING")
        .filter_map(|t| t["host"].as_str().map(str::to_owned))
        .collect();
    hosts.sort();
    (hosts.len() as u64, hosts)
}

/// Whether marathon-python can be imported (it must be with `MESH_REQUIRE_PYTHON=1`, as in CI).
fn have_marathon_python() -> bool {
    let ok = Command::new("python3")
        .args([
            "-c",
            "import collections, collections.abc; collections.Iterable = collections.abc.Iterable; import marathon",
        ])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok || std::env::var("MESH_REQUIRE_PYTHON").as_deref() != Ok("1"),
        "MESH_REQUIRE_PYTHON=1 but marathon-python is missing"
    );
    ok
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apps_deploy_into_other_datacenters_and_into_several_at_once() {
    let net = net();
    let tmp = tempfile::tempdir().expect("tempdir");
    let s1 = wan_server(&net, &tmp.path().join("s1"), 1, "dc1", None, &[], &[]);
    let wan = format!("{net}.1:8302");
    let mut s2 = wan_server(&net, &tmp.path().join("s21"), 21, "dc2", Some(&wan), &[], &[]);
    let a1 = wan_agent(&net, &tmp.path().join("a1"), 10, "dc1", 1, &[]);
    let a2 = wan_agent(&net, &tmp.path().join("a2"), 20, "dc2", 21, &[]);
    eventually(60, "both datacenters known to dc1's agent", || async {
        (get(&a1, "/v1/catalog/datacenters").await.1 == json!(["dc1", "dc2"])).then_some(())
    })
    .await;
    // Each datacenter's Mesos master has its own agent; dc1's agent shows dc2's with ?dc=dc2.
    let agents = |v: &Value| -> Vec<String> {
        v["slaves"].as_array().into_iter().flatten().filter_map(|s| s["hostname"].as_str().map(str::to_owned)).collect()
    };
    let dc2_agents = eventually(60, "dc2's agent registered in dc2", || async {
        let own = agents(&get(&s2, "/master/state").await.1);
        let remote = agents(&get(&a1, "/master/state?dc=dc2").await.1);
        (own.len() == 1 && remote == own).then_some(own)
    })
    .await;
    eventually(60, "dc1's agent registered in dc1", || async {
        let own = agents(&get(&a1, "/master/state").await.1);
        (own.len() == 1 && own != dc2_agents).then_some(())
    })
    .await;

    // Unknown datacenters, in each API's own format, and nothing is created.
    let (s, v) = a1.send("POST", "/v2/apps?dc=dc9", Some(r#"{"id":"/nowhere","cmd":"sleep 1"}"#)).await;
    assert_eq!(s, 400, "{v}");
    assert!(v["message"].as_str().unwrap_or("").contains("No path to datacenter"), "{v}");
    let (s, v) = a1.send("POST", "/v2/apps?dc=dc1,dc9", Some(r#"{"id":"/nowhere","cmd":"sleep 1"}"#)).await;
    assert_eq!(s, 400, "{v}");
    assert_eq!(get(&a1, "/v2/apps/nowhere").await.0, 404, "nothing created in dc1");
    let r = a1.client.get(a1.url("/master/state?dc=dc9")).send().await.unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().starts_with("No path to datacenter"));
    // Streams stay in their datacenter.
    let (s, v) = a1.send("POST", "/api/v1/scheduler?dc=dc2", Some("{}")).await;
    assert_eq!(s, 400, "{v}");

    // marathon-python deploys into dc2 through dc1's agent (`?dc=dc2` on every request).
    if have_marathon_python() {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/python/wan_deploy.py");
        let out = Command::new("python3").args([script, &a1.url(""), "dc2", "/py-web", "2"]).output().expect("python3");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
        let printed: Value = serde_json::from_str(stdout.trim()).expect("the script's JSON line");
        let (n, hosts) = running(&s2, "py-web").await;
        assert_eq!(n, 2, "dc2 runs the instances");
        assert_eq!(printed, json!({"running": 2, "hosts": hosts}), "the client read dc2's tasks");
        assert_eq!(get(&s1, "/v2/apps/py-web").await.0, 404, "dc1 has no such app");
        assert_eq!(get(&a1, "/v2/apps/py-web").await.0, 404, "dc1's agent neither");
    }

    // One request, two datacenters: `mesh app deploy --dc dc1,dc2` follows each.
    let app = tmp.path().join("multi.json");
    let def = |n: u64| json!({"id": "/multi", "cmd": "sleep 600", "cpus": 0.1, "mem": 16, "instances": n});
    std::fs::write(&app, def(2).to_string()).unwrap();
    let (code, out, err) = mesh_app_deploy(&a1, &["--dc", "dc1,dc2", app.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    for dc in ["dc1", "dc2"] {
        assert!(out.contains(&format!("{dc}: /multi: deployment ")), "{out}");
        assert!(out.contains(&format!("{dc}: /multi: 2/2 running, deployed")), "{out}");
    }
    assert_eq!(running(&s1, "multi").await.0, 2, "dc1");
    assert_eq!(running(&s2, "multi").await.0, 2, "dc2");
    // Each datacenter's status from either: the app, and the deployments (none left).
    for node in [&a1, &s2] {
        let (s, v, header) = get(node, "/v2/apps/multi?dc=dc1,dc2").await;
        assert_eq!((s, header.as_str()), (200, "dc1=200, dc2=200"), "{v}");
        for dc in ["dc1", "dc2"] {
            assert_eq!(v["datacenters"][dc]["body"]["app"]["tasksRunning"], 2, "{dc}: {v}");
        }
        let (s, v, header) = get(node, "/v2/deployments?dc=dc1,dc2").await;
        assert_eq!((s, v, header.as_str()), (200, json!([]), "dc1=200, dc2=200"));
    }

    // Every server of dc2 killed: dc1 deploys, dc2 is reported unreachable, and fast.
    s2.stop_with("KILL");
    std::fs::write(&app, def(3).to_string()).unwrap();
    let started = Instant::now();
    let (code, out, err) = mesh_app_deploy(&a1, &["--dc", "dc1,dc2", "--detach", app.to_str().unwrap()]);
    let took = started.elapsed();
    assert_eq!(code, Some(1), "{out}\n{err}");
    assert!(out.contains("dc1: /multi: deployment "), "{out}");
    assert!(out.contains("dc2: /multi: not deployed: 503 Remote DC has no server currently reachable"), "{out}");
    assert!(err.contains("not deployed in dc2"), "{err}");
    assert!(took < Duration::from_secs(20), "an unreachable datacenter took {took:?} to report");
    eventually(60, "dc1 scaled to 3 on its own", || async { (running(&s1, "multi").await.0 == 3).then_some(()) }).await;
    // Following the deployment says the same: dc1 done, dc2 not deployed.
    let (code, out, err) = mesh_app_deploy(&a1, &["--dc", "dc1,dc2", app.to_str().unwrap()]);
    assert_eq!(code, Some(1), "{out}\n{err}");
    assert!(out.contains("dc1: /multi: 3/3 running, deployed"), "{out}");
    assert!(out.contains("dc2: /multi: not deployed: 503"), "{out}");
    // Reads of dc2 fail the same way, and dc1 serves its own.
    let (s, v, header) = get(&a1, "/v2/apps/multi?dc=dc1,dc2").await;
    assert_eq!((s, header.as_str()), (200, "dc1=200, dc2=503"), "{v}");
    assert_eq!(v["app"]["instances"], 3, "{v}");
    let (s, v, _) = get(&a1, "/v2/apps/multi?dc=dc2").await;
    assert_eq!(s, 503, "{v}");
    let r = a1.client.put(a1.url("/v1/kv/still")).body("here").send().await.unwrap();
    assert_eq!(r.text().await.unwrap().trim(), "true", "dc1 writes");
    drop(a2);
}
