//! Docker apps through a real `mesh dev` and the real Docker engine, with locally built images
//! (scripts/build-test-images.sh). Without an engine the tests are skipped with a message,
//! unless MESH_REQUIRE_DOCKER=1 (as in CI), where they fail.

mod support;

use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::process::Command;
use support::*;

const IMAGE: &str = "mesh-test/busybox:latest";

fn docker_ready() -> bool {
    let ok = Command::new("docker")
        .args(["version", "--format", "{{.Server.Version}}"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        if std::env::var("MESH_REQUIRE_DOCKER").as_deref() == Ok("1") {
            panic!("MESH_REQUIRE_DOCKER=1 but no Docker engine answers");
        }
        eprintln!("SKIP: no Docker engine answers");
        return false;
    }
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/build-test-images.sh");
    let out = Command::new("bash").arg(script).output().expect("run build-test-images.sh");
    assert!(out.status.success(), "building test images failed: {}", String::from_utf8_lossy(&out.stderr));
    true
}

fn docker(args: &[&str]) -> String {
    let out = Command::new("docker").args(args).output().expect("docker");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Container ids of a task (by the mesh.task label).
fn containers_of(task: &str) -> Vec<String> {
    let f = format!("label=mesh.task={task}");
    docker(&["ps", "-q", "--no-trunc", "--filter", &f]).lines().map(str::to_owned).collect()
}

/// Running containers carrying a test tag in their env.
fn tagged_containers(tag: &str) -> BTreeSet<String> {
    let ids = docker(&["ps", "-q", "--no-trunc", "--filter", "label=mesh.task"]);
    ids.lines()
        .filter(|id| docker(&["inspect", "-f", "{{json .Config.Env}}", id]).contains(&format!("MESH_TEST_TAG={tag}")))
        .map(str::to_owned)
        .collect()
}

async fn tasks(node: &MeshNode, app: &str) -> Vec<Value> {
    let (_, v) = node.get(&format!("/v2/apps{app}/tasks")).await;
    v["tasks"].as_array().cloned().unwrap_or_default()
}

async fn running(node: &MeshNode, app: &str, n: usize) -> Vec<Value> {
    eventually(90, &format!("{n} running tasks of {app}"), || async {
        let t = tasks(node, app).await;
        (t.len() == n && t.iter().all(|t| t["state"] == "TASK_RUNNING")).then_some(t)
    })
    .await
}

fn quickstart_app(tag: &str) -> String {
    // The original quick-start request (Marathon 1.4 format), with the image swapped.
    json!({
        "id": "/dockerweb",
        "cmd": "httpd -f -p 8080 -h /www",
        "container": {
            "type": "DOCKER",
            "docker": {
                "image": IMAGE,
                "network": "BRIDGE",
                "portMappings": [{"containerPort": 8080, "hostPort": 0, "servicePort": 9000, "protocol": "tcp"}]
            }
        },
        "instances": 1,
        "cpus": 0.5,
        "mem": 64,
        "env": {"MESH_TEST_TAG": tag},
        "taskKillGracePeriodSeconds": 2
    })
    .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quickstart_in_docker_bridge_with_limits_and_grace() {
    if !docker_ready() {
        return;
    }
    let node = MeshNode::start(&["--runtime", "docker"]);
    let tag = uuid::Uuid::new_v4().to_string();
    let (s, v) = node.send("POST", "/v2/apps", Some(&quickstart_app(&tag))).await;
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["networks"], json!([{"mode": "container/bridge"}]), "answered in the 1.5 form");
    let t = running(&node, "/dockerweb", 1).await;
    let host_port = t[0]["ports"][0].as_u64().unwrap() as u16;
    assert!((node.ports.0..=node.ports.1).contains(&host_port));
    assert_eq!(t[0]["servicePorts"], json!([9000]));
    // DNS gives the same port, and HTTP answers through it.
    let r = node.resolver(false);
    let srv_ports = eventually(10, "SRV for dockerweb", || async {
        srv(&r, "dockerweb.service.mesh.").await.ok().filter(|v| !v.is_empty())
    })
    .await;
    assert_eq!(srv_ports[0].1, host_port);
    eventually(20, "httpd answers through the mapped port", || async { http_ok(host_port).await.then_some(()) }).await;
    // Limits and grace as docker sees them.
    let task_id = t[0]["id"].as_str().unwrap().to_owned();
    let ids = containers_of(&task_id);
    assert_eq!(ids.len(), 1, "one container per task");
    let mem = docker(&["inspect", "-f", "{{.HostConfig.Memory}}", &ids[0]]);
    assert_eq!(mem, (64u64 * 1024 * 1024).to_string());
    let cpu = docker(&["inspect", "-f", "{{.HostConfig.NanoCpus}} {{.HostConfig.CpuQuota}}", &ids[0]]);
    assert!(cpu.contains("500000000") || cpu.contains("50000"), "cpus 0.5 as a CPU limit: {cpu}");
    let stop_timeout = docker(&["inspect", "-f", "{{.Config.StopTimeout}}", &ids[0]]);
    assert_eq!(stop_timeout, "2");

    // Replace it with one that ignores SIGTERM: the kill is SIGTERM, then SIGKILL after the grace.
    let since = docker(&["system", "info", "--format", "{{.SystemTime}}"]);
    let stubborn = json!({"cmd": "trap '' TERM; while true; do sleep 1; done", "container": {"type": "DOCKER", "docker": {"image": IMAGE}}, "networks": [{"mode": "host"}], "portDefinitions": []});
    let (s, v) = node.send("PUT", "/v2/apps/dockerweb?force=true", Some(&stubborn.to_string())).await;
    assert_eq!(s, 200, "{v}");
    let t2 = eventually(90, "the new version runs alone", || async {
        let t = tasks(&node, "/dockerweb").await;
        (t.len() == 1 && t[0]["id"] != task_id.as_str() && t[0]["state"] == "TASK_RUNNING").then_some(t)
    })
    .await;
    let stubborn_id = t2[0]["id"].as_str().unwrap().to_owned();
    let (s, _) = node.send("DELETE", "/v2/apps/dockerweb", None).await;
    assert_eq!(s, 200);
    eventually(60, "the stubborn container is gone", || async { containers_of(&stubborn_id).is_empty().then_some(()) })
        .await;
    let until = docker(&["system", "info", "--format", "{{.SystemTime}}"]);
    let events = docker(&[
        "events",
        "--since",
        &since,
        "--until",
        &until,
        "--filter",
        &format!("label=mesh.task={stubborn_id}"),
        "--format",
        "{{.Action}} {{index .Actor.Attributes \"signal\"}}{{index .Actor.Attributes \"exitCode\"}}",
    ]);
    let kills: Vec<&str> = events.lines().filter(|l| l.starts_with("kill") || l.starts_with("die")).collect();
    let term = kills.iter().position(|l| *l == "kill 15");
    let kill = kills.iter().position(|l| *l == "kill 9");
    assert!(term.is_some() && kill.is_some() && term < kill, "SIGTERM then SIGKILL: {events}");
    assert!(kills.contains(&"die 137"), "ended by SIGKILL after the grace period: {events}");
    assert!(tagged_containers(&tag).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_network_app_serves_on_its_host_port() {
    if !docker_ready() {
        return;
    }
    let node = MeshNode::start(&["--runtime", "docker"]);
    let app = json!({
        "id": "/hostweb", "cmd": "httpd -f -p $PORT0 -h /www", "cpus": 0.2, "mem": 32, "instances": 2,
        "networks": [{"mode": "host"}],
        "container": {"type": "DOCKER", "docker": {"image": IMAGE}},
    });
    let (s, v) = node.send("POST", "/v2/apps", Some(&app.to_string())).await;
    assert_eq!(s, 201, "{v}");
    let t = running(&node, "/hostweb", 2).await;
    for task in &t {
        let p = task["ports"][0].as_u64().unwrap() as u16;
        eventually(20, "host-network httpd answers", || async { http_ok(p).await.then_some(()) }).await;
        let ids = containers_of(task["id"].as_str().unwrap());
        assert_eq!(docker(&["inspect", "-f", "{{.HostConfig.NetworkMode}}", &ids[0]]), "host");
    }
    let (s, _) = node.send("DELETE", "/v2/apps/hostweb", None).await;
    assert_eq!(s, 200);
    for task in &t {
        let id = task["id"].as_str().unwrap().to_owned();
        eventually(30, "containers removed", || async { containers_of(&id).is_empty().then_some(()) }).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_restart_readopts_containers_and_replaces_removed_ones() {
    if !docker_ready() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let ports = port_range();
    let tag = uuid::Uuid::new_v4().to_string();
    let mut node = MeshNode::start_on(&data, ports, &["--runtime", "docker"]);
    let app = json!({
        "id": "/sticky", "cmd": "httpd -f -p 8080 -h /www", "cpus": 0.1, "mem": 32, "instances": 2,
        "env": {"MESH_TEST_TAG": tag},
        "networks": [{"mode": "container/bridge"}],
        "container": {"type": "DOCKER", "docker": {"image": IMAGE}, "portMappings": [{"containerPort": 8080}]},
    });
    let (s, v) = node.send("POST", "/v2/apps", Some(&app.to_string())).await;
    assert_eq!(s, 201, "{v}");
    running(&node, "/sticky", 2).await;
    let before = tagged_containers(&tag);
    assert_eq!(before.len(), 2);

    // SIGKILL: the containers keep running, and the next agent adopts the same ones.
    node.stop_with("KILL");
    assert_eq!(tagged_containers(&tag), before, "containers outlive the agent");
    let mut node = MeshNode::start_on(&data, ports, &["--runtime", "docker"]);
    running(&node, "/sticky", 2).await;
    assert_eq!(tagged_containers(&tag), before, "the same containers, no duplicates");

    // A container removed while the agent is down is replaced after it restarts.
    node.stop_with("KILL");
    let victim = before.iter().next().unwrap().clone();
    docker(&["rm", "-f", &victim]);
    let node = MeshNode::start_on(&data, ports, &["--runtime", "docker"]);
    let after = eventually(90, "the removed container is replaced", || async {
        let t = tasks(&node, "/sticky").await;
        let c = tagged_containers(&tag);
        (t.len() == 2 && t.iter().all(|t| t["state"] == "TASK_RUNNING") && c.len() == 2).then_some(c)
    })
    .await;
    assert!(!after.contains(&victim));
    assert_eq!(after.intersection(&before).count(), 1, "the other one was adopted");
    let (s, _) = node.send("DELETE", "/v2/apps/sticky", None).await;
    assert_eq!(s, 200);
    eventually(60, "no container left", || async { tagged_containers(&tag).is_empty().then_some(()) }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_image_fails_clearly_backs_off_and_blocks_nothing() {
    if !docker_ready() {
        return;
    }
    let node = MeshNode::start(&["--runtime", "docker"]);
    // A registry reference on loopback: the pull fails at once, and no traffic leaves the machine.
    let bad = json!({
        "id": "/ghost", "cmd": "true", "cpus": 0.1, "mem": 16,
        "container": {"type": "DOCKER", "docker": {"image": "127.0.0.1:5999/mesh-test/does-not-exist:1"}},
        "backoffSeconds": 2, "backoffFactor": 2,
    });
    let (s, v) = node.send("POST", "/v2/apps", Some(&bad.to_string())).await;
    assert_eq!(s, 201, "{v}");
    let good = json!({"id": "/fine", "cmd": "httpd -f -p 8080 -h /www", "cpus": 0.1, "mem": 16,
        "networks": [{"mode": "container/bridge"}],
        "container": {"type": "DOCKER", "docker": {"image": IMAGE}, "portMappings": [{"containerPort": 8080}]}});
    let (s, v) = node.send("POST", "/v2/apps", Some(&good.to_string())).await;
    assert_eq!(s, 201, "{v}");
    let failure = eventually(60, "lastTaskFailure of the missing image", || async {
        let (_, a) = node.get("/v2/apps/ghost").await;
        let f = a["app"]["lastTaskFailure"].clone();
        f.is_object().then_some(f)
    })
    .await;
    let msg = failure["message"].as_str().unwrap();
    assert!(
        msg.starts_with(
            "image 127.0.0.1:5999/mesh-test/does-not-exist:1 is not on this node and could not be pulled: "
        ),
        "{msg}"
    );
    assert_eq!(failure["state"], "TASK_FAILED");
    // It backs off (a launch delay shows in the queue) ...
    eventually(30, "a launch delay for the failing app", || async {
        let (_, q) = node.get("/v2/queue").await;
        let item = q["queue"].as_array()?.iter().find(|i| i["app"]["id"] == "/ghost")?.clone();
        (item["delay"]["timeLeftSeconds"].as_u64()? >= 1).then_some(())
    })
    .await;
    // ... and the other app runs meanwhile.
    running(&node, "/fine", 1).await;
    for app in ["/ghost", "/fine"] {
        let (s, _) = node.send("DELETE", &format!("/v2/apps{app}"), None).await;
        assert_eq!(s, 200);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_apps_wait_with_a_reason_on_a_node_without_docker() {
    // No engine needed: a process-only node keeps DOCKER apps waiting and says why.
    let node = MeshNode::start(&["--runtime", "process"]);
    let app = json!({"id": "/needs-docker", "cmd": "true", "cpus": 0.1, "mem": 16,
        "container": {"type": "DOCKER", "docker": {"image": IMAGE}}});
    let (s, v) = node.send("POST", "/v2/apps", Some(&app.to_string())).await;
    assert_eq!(s, 201, "{v}");
    eventually(20, "NoDockerRuntime in the queue", || async {
        let (_, q) = node.get("/v2/queue").await;
        let item = q["queue"].as_array()?.iter().find(|i| i["app"]["id"] == "/needs-docker")?.clone();
        let reasons = item["processedOffersSummary"]["rejectSummaryLastOffers"].as_array()?.clone();
        reasons.iter().any(|r| r["reason"] == "NoDockerRuntime" && r["declined"].as_u64() > Some(0)).then_some(())
    })
    .await;
    let (_, t) = node.get("/v2/apps/needs-docker/tasks").await;
    assert_eq!(t["tasks"], json!([]));
    // privileged is refused unless the node allows it
    let p = json!({"id": "/priv", "cmd": "true", "container": {"type": "DOCKER", "docker": {"image": IMAGE, "privileged": true}}});
    let (s, v) = node.send("POST", "/v2/apps", Some(&p.to_string())).await;
    assert_eq!(s, 422, "{v}");
    assert_eq!(v["details"][0]["path"], "/container/docker/privileged");
}

/// Issue 10, item 10: two nodes with the same name on one engine (the default name is the host
/// name) must neither adopt nor kill each other's containers, and the second one warns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_with_one_name_leave_each_others_containers_alone() {
    if !docker_ready() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let name = node_name(&tmp.path().join("shared-name"));
    let _cleanup = Cleanup(name.clone());
    let tag = uuid::Uuid::new_v4().to_string();
    let a = MeshNode::start_named(&tmp.path().join("a"), port_range(), &name, &["--runtime", "docker"]);
    let (s, v) = a.send("POST", "/v2/apps", Some(&host_app("/twin", &tag))).await;
    assert_eq!(s, 201, "{v}");
    let before = running(&a, "/twin", 1).await;
    let containers = tagged_containers(&tag);
    assert_eq!(containers.len(), 1);

    let mut b = MeshNode::start_named(&tmp.path().join("b"), port_range(), &name, &["--runtime", "docker"]);
    eventually(30, "the second node warns about the name clash", || async {
        b.log().contains("is already used by another mesh node").then_some(())
    })
    .await;
    let log = b.log();
    let starting = log.lines().find(|l| l.contains("agent starting")).expect("agent log line");
    assert!(starting.contains("recovered=0"), "b adopted a's container: {starting}");
    let (s, v) = b.get("/v2/apps").await;
    assert_eq!((s, v["apps"].as_array().map(Vec::len)), (200, Some(0)), "{v}");
    // A clean SIGTERM kills every task b runs: none of them is a's.
    b.stop_with("TERM");
    assert_eq!(tagged_containers(&tag), containers, "a's container survives b's start, reconcile and stop");
    let after = running(&a, "/twin", 1).await;
    assert_eq!(after[0]["id"], before[0]["id"], "a's task was never replaced");
    let (s, _) = a.send("DELETE", "/v2/apps/twin", None).await;
    assert_eq!(s, 200);
    eventually(30, "a's container is gone after DELETE", || async { tagged_containers(&tag).is_empty().then_some(()) })
        .await;
}

/// Removes every container of a node name when dropped, even after a failed assertion.
struct Cleanup(String);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let ids = docker(&["ps", "-aq", "--filter", &format!("label=mesh.node={}", self.0)]);
        let ids: Vec<&str> = ids.split_whitespace().collect();
        if !ids.is_empty() {
            let _ = Command::new("docker").args(["rm", "-f"]).args(&ids).output();
        }
    }
}

fn host_app(id: &str, tag: &str) -> String {
    json!({
        "id": id, "cmd": "exec sleep 1000", "instances": 1, "cpus": 0.1, "mem": 32,
        "env": {"MESH_TEST_TAG": tag},
        "container": {"type": "DOCKER", "docker": {"image": IMAGE, "network": "HOST"}},
    })
    .to_string()
}

/// Host paths and added capabilities reach the host: refused unless the operator lists them
/// (`--allowed-host-path`, `--allowed-cap-add`), and then they work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_paths_and_cap_add_need_operator_flags() {
    if !docker_ready() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let shared = tmp.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    let shared = shared.to_str().unwrap().to_owned();
    let app = |host_path: &str, cap: &str| {
        json!({"id": "/hostly", "cmd": "grep CapEff /proc/self/status > /shared/caps; exec sleep 1000",
            "cpus": 0.1, "mem": 32,
            "container": {"type": "DOCKER",
                "docker": {"image": IMAGE, "parameters": [{"key": "cap-add", "value": cap}]},
                "volumes": [{"containerPath": "/shared", "hostPath": host_path, "mode": "RW"}]}})
        .to_string()
    };

    // Without the flags: both refused, each at its own path.
    let plain = MeshNode::start(&["--runtime", "docker", "--no-registrator"]);
    let (s, v) = plain.send("POST", "/v2/apps", Some(&app(&shared, "NET_ADMIN"))).await;
    assert_eq!(s, 422, "{v}");
    let paths: Vec<&str> = v["details"].as_array().unwrap().iter().filter_map(|d| d["path"].as_str()).collect();
    assert!(paths.contains(&"/container/volumes(0)/hostPath"), "{v}");
    assert!(paths.contains(&"/container/docker/parameters(0)/value"), "{v}");
    let (_, apps) = plain.get("/v2/apps").await;
    assert_eq!(apps["apps"], json!([]));
    drop(plain);

    // With them: only what is listed, and no way out of a prefix with `..`.
    let node = MeshNode::start(&[
        "--runtime",
        "docker",
        "--no-registrator",
        "--allowed-host-path",
        tmp.path().to_str().unwrap(),
        "--allowed-cap-add",
        "NET_ADMIN",
    ]);
    for (host_path, cap, at) in [
        ("/etc", "NET_ADMIN", "/container/volumes(0)/hostPath"),
        (&format!("{shared}/../../.."), "NET_ADMIN", "/container/volumes(0)/hostPath"),
        (&format!("{}-other", tmp.path().display()), "NET_ADMIN", "/container/volumes(0)/hostPath"),
        (&shared, "SYS_ADMIN", "/container/docker/parameters(0)/value"),
        (&shared, "ALL", "/container/docker/parameters(0)/value"),
    ] {
        let (s, v) = node.send("POST", "/v2/apps", Some(&app(host_path, cap))).await;
        assert_eq!(s, 422, "{host_path} {cap}: {v}");
        assert_eq!(v["details"][0]["path"], at, "{v}");
    }
    let (s, v) = node.send("POST", "/v2/apps", Some(&app(&shared, "NET_ADMIN"))).await;
    assert_eq!(s, 201, "{v}");
    running(&node, "/hostly", 1).await;
    let caps = eventually(60, "the container writes through the host volume", || async {
        std::fs::read_to_string(format!("{shared}/caps")).ok().filter(|c| c.ends_with('\n'))
    })
    .await;
    let hex = caps.trim().strip_prefix("CapEff:").expect("CapEff line").trim();
    let eff = u64::from_str_radix(hex, 16).expect("hex capabilities");
    const CAP_NET_ADMIN: u64 = 12;
    const CAP_SYS_ADMIN: u64 = 21;
    assert!(eff & (1 << CAP_NET_ADMIN) != 0, "NET_ADMIN was added: {caps}");
    assert!(eff & (1 << CAP_SYS_ADMIN) == 0, "SYS_ADMIN was not: {caps}");
    let (s, _) = node.send("DELETE", "/v2/apps/hostly", None).await;
    assert_eq!(s, 200);
    eventually(60, "the container is gone", || async { tasks(&node, "/hostly").await.is_empty().then_some(()) }).await;
}

/// A container started by mesh resolves services through its node: the node answers DNS on
/// port 53 of the gateway of the containers' Docker network (one this test creates), and every
/// container gets it as resolver with the search domain `service.mesh`, so busybox's `nslookup`
/// and `wget` inside reach `web.service.mesh` and plain `web`.
#[tokio::test]
async fn containers_resolve_services_through_the_node() {
    if !docker_ready() {
        return;
    }
    struct Network(String);
    impl Drop for Network {
        fn drop(&mut self) {
            docker(&["network", "rm", &self.0]);
        }
    }
    let net = Network(format!("mesh-dns-{}", std::process::id()));
    docker(&["network", "rm", &net.0]);
    let created = Command::new("docker").args(["network", "create", &net.0]).output().expect("docker network create");
    assert!(created.status.success(), "{}", String::from_utf8_lossy(&created.stderr));
    let gw = docker(&["network", "inspect", "-f", "{{range .IPAM.Config}}{{.Gateway}}{{end}}", &net.0]);
    assert!(gw.parse::<std::net::Ipv4Addr>().is_ok(), "gateway of {}: {gw:?}", net.0);
    // Tasks are published on the gateway address, which the containers reach.
    let node = MeshNode::start(&["--runtime", "docker", "--docker-network", &net.0, "--advertise", &gw]);
    assert!(node.log().contains("DNS for containers"), "{}", node.log());
    let tag = uuid::Uuid::new_v4().to_string();
    let web = json!({
        "id": "/web", "cmd": "httpd -f -p 8080 -h /www", "cpus": 0.1, "mem": 32, "instances": 1,
        "env": {"MESH_TEST_TAG": tag},
        "container": {"type": "DOCKER", "docker": {"image": IMAGE, "network": "BRIDGE",
            "portMappings": [{"containerPort": 8080, "hostPort": 0}]}},
    });
    let (s, v) = node.send("POST", "/v2/apps", Some(&web.to_string())).await;
    assert_eq!(s, 201, "{v}");
    let t = running(&node, "/web", 1).await;
    let port = t[0]["ports"][0].as_u64().expect("host port");
    // The client looks the service up by its full and its short name and fetches the page.
    let script = format!(
        "while true; do nslookup web.service.mesh; nslookup web; wget -q -O - http://web:{port}/ && echo FETCHED-BY-SHORT-NAME; sleep 1; done"
    );
    let client = json!({
        "id": "/client", "cmd": script, "cpus": 0.1, "mem": 32, "instances": 1,
        "env": {"MESH_TEST_TAG": tag},
        "container": {"type": "DOCKER", "docker": {"image": IMAGE, "network": "BRIDGE"}},
    });
    let (s, v) = node.send("POST", "/v2/apps", Some(&client.to_string())).await;
    assert_eq!(s, 201, "{v}");
    let c = running(&node, "/client", 1).await;
    let id = c[0]["id"].as_str().unwrap().to_owned();
    let container = containers_of(&id).pop().expect("the client's container");
    // On a network of its own, Docker's embedded resolver (127.0.0.11) answers the container
    // and forwards to the DNS servers the container was given: the node's.
    let dns = docker(&["inspect", "-f", "{{json .HostConfig.Dns}} {{json .HostConfig.DnsSearch}}", &container]);
    assert_eq!(dns, format!("[\"{gw}\"] [\"service.mesh\"]"));
    let resolv = docker(&["exec", &container, "cat", "/etc/resolv.conf"]);
    assert!(resolv.contains("search service.mesh"), "{resolv}");

    let logs = eventually(60, "the client resolved web and fetched its page", || async {
        let out = Command::new("docker").args(["logs", &container]).output().ok()?;
        let all = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        all.contains("FETCHED-BY-SHORT-NAME").then_some(all)
    })
    .await;
    assert!(logs.contains("web.service.mesh") && logs.contains(&gw), "nslookup answered the node's address: {logs}");
}
