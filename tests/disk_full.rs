//! A full disk under the data dir (a small tmpfs, filled with a file): writes fail with a clear
//! 503 in each API's format and the health endpoints say so; stopping tasks (delete, scale down)
//! still works and is durable; once the filler is removed, writes succeed again without a restart;
//! and everything acknowledged is there after a restart.

mod support;

use serde_json::{Value, json};
use std::io::Write;
use std::path::{Path, PathBuf};
use support::*;

/// A tmpfs mounted on a directory for the life of the value.
struct Tmpfs(PathBuf);

impl Tmpfs {
    /// Mount, or `None` (the test prints SKIP) when that is not allowed (not root), unless
    /// `MESH_REQUIRE_TMPFS=1`.
    fn mount(dir: &Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(dir).unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            assert!(std::env::var("MESH_REQUIRE_TMPFS").is_err(), "cannot mount a tmpfs on {}", dir.display());
            eprintln!("SKIP: cannot mount a tmpfs (needs root)");
            return None;
        }
        Some(Tmpfs(dir.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Write `path` until the file system is full.
fn fill(path: &Path) {
    let mut f = std::fs::File::create(path).unwrap();
    let chunk = vec![0xa5u8; 64 * 1024];
    loop {
        if f.write_all(&chunk).is_err() {
            break;
        }
    }
    // Whatever is left (less than a chunk) goes too.
    let small = [0u8; 512];
    while f.write_all(&small).is_ok() {}
    let _ = f.sync_all();
}

fn app(id: &str, n: u32, tag: &str) -> String {
    json!({"id": id, "cmd": "exec sleep 1000", "instances": n, "cpus": 0.01, "mem": 8,
           "env": {"MESH_TEST_TAG": tag}})
    .to_string()
}

fn store_mentions_once(body: &str) {
    assert_eq!(body.matches("state store").count(), 1, "the error names the state store once: {body:?}");
}

async fn raw(node: &MeshNode, method: &str, path: &str, body: &str) -> (u16, reqwest::header::HeaderMap, String) {
    let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let r = node.client.request(m, node.url(path)).body(body.to_owned()).send().await.unwrap();
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    (status, headers, r.text().await.unwrap())
}

async fn settled(node: &MeshNode, tag: &str, n: usize) {
    eventually(60, "task processes running", || async {
        let (_, d) = node.get("/v2/deployments").await;
        (tagged_pids(tag, "sleep").len() == n && d.as_array().is_some_and(|a| a.is_empty())).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_disk_fails_writes_clearly_stops_tasks_and_recovers_without_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let Some(_fs) = Tmpfs::mount(&data, "24m") else { return };
    let ports = port_range();
    let extra = ["--runtime", "process"];
    let tag_del = uuid::Uuid::new_v4().to_string();
    let tag_scale = uuid::Uuid::new_v4().to_string();
    let mut node = MeshNode::start_on(&data, ports, &extra);

    // Acknowledged before the disk fills.
    let (s, v) = node.send("POST", "/v2/apps", Some(&app("/victim", 2, &tag_del))).await;
    assert_eq!(s, 201, "{v}");
    let (s, v) = node.send("POST", "/v2/apps", Some(&app("/shrink", 3, &tag_scale))).await;
    assert_eq!(s, 201, "{v}");
    settled(&node, &tag_del, 2).await;
    settled(&node, &tag_scale, 3).await;
    let mut acked: Vec<String> = Vec::new();
    let (s, _, b) = raw(&node, "PUT", "/v1/kv/before", "1").await;
    assert_eq!((s, b.trim()), (200, "true"));
    acked.push("before".into());

    // Fill the disk; keep writing KV entries until the store refuses one.
    let filler = data.join("filler");
    fill(&filler);
    let big = "x".repeat(32 * 1024);
    let mut refused = None;
    for i in 0..400 {
        let key = format!("k{i}");
        let (s, _, b) = raw(&node, "PUT", &format!("/v1/kv/{key}"), &big).await;
        match s {
            200 => acked.push(key),
            _ => {
                refused = Some((s, b));
                break;
            }
        }
    }
    let (s, body) = refused.expect("a write fails once the disk is full");
    assert_eq!(s, 503, "Consul: {body}");
    assert!(!body.trim_start().starts_with('{'), "Consul errors are plain text: {body}");
    store_mentions_once(&body);

    // Marathon: JSON message, 503, names the state store once.
    let (s, v) = node.send("POST", "/v2/apps", Some(&app("/new", 1, "none"))).await;
    assert_eq!(s, 503, "{v}");
    store_mentions_once(v["message"].as_str().unwrap_or_else(|| panic!("Marathon JSON message: {v}")));
    // Mesos: plain text 503.
    let (s, _, b) = raw(&node, "PUT", "/master/weights", r#"[{"role":"r1","weight":2.0}]"#).await;
    assert_eq!(s, 503, "Mesos: {b}");
    store_mentions_once(&b);

    // Health says so while it lasts.
    let (s, _, b) = raw(&node, "GET", "/ping", "").await;
    assert_eq!(s, 503, "/ping while the store fails: {b}");
    let (s, _, _) = raw(&node, "GET", "/master/health", "").await;
    assert_eq!(s, 503, "/master/health while the store fails");
    let (s, h, b) = raw(&node, "GET", "/v1/status/leader", "").await;
    assert_eq!((s, b.trim()), (200, r#""""#), "no leader while the store fails");
    assert_eq!(h.get("X-Consul-KnownLeader").and_then(|v| v.to_str().ok()), Some("false"));
    // Reads still answer, from the last state, without a known leader.
    let (s, h, _) = raw(&node, "GET", "/v1/kv/before", "").await;
    assert_eq!(s, 200);
    assert_eq!(h.get("X-Consul-KnownLeader").and_then(|v| v.to_str().ok()), Some("false"));

    // Stopping tasks works: kill a task, delete one app, scale the other down; the processes go.
    let (_, v) = node.get("/v2/apps/shrink/tasks").await;
    let task = v["tasks"][0]["id"].as_str().expect("a task of /shrink").to_owned();
    let (s, v) = node.send("DELETE", &format!("/v2/apps/shrink/tasks/{task}"), None).await;
    assert_eq!(s, 200, "kill a task while the disk is full: {v}");
    eventually(30, "the killed task's process is gone (no replacement can launch)", || async {
        (tagged_pids(&tag_scale, "sleep").len() == 2).then_some(())
    })
    .await;
    let (s, v) = node.send("DELETE", "/v2/apps/victim", None).await;
    assert_eq!(s, 200, "delete while the disk is full: {v}");
    let (s, v) = node.send("PUT", "/v2/apps/shrink", Some(r#"{"instances": 1}"#)).await;
    assert_eq!(s, 200, "scale down while the disk is full: {v}");
    eventually(30, "the deleted app's processes are gone", || async {
        tagged_pids(&tag_del, "sleep").is_empty().then_some(())
    })
    .await;
    eventually(30, "the scaled app runs one process", || async {
        (tagged_pids(&tag_scale, "sleep").len() == 1).then_some(())
    })
    .await;
    let (s, _) = node.get("/v2/apps/victim").await;
    assert_eq!(s, 404);
    // The scale-down's deployment ends too (its steps go to the reserve); until it has, a
    // scale-up would meet its lock (409) instead of the store.
    eventually(30, "the scale-down deployment has ended", || async {
        let (_, v) = node.get("/v2/deployments").await;
        v.as_array().is_some_and(|d| d.is_empty()).then_some(())
    })
    .await;
    // Scaling up is not a stop: refused while the disk is full.
    let (s, v) = node.send("PUT", "/v2/apps/shrink", Some(r#"{"instances": 5}"#)).await;
    assert_eq!(s, 503, "{v}");

    // Still unhealthy: the stops went to the reserve, the log itself still cannot be written.
    let (s, _, b) = raw(&node, "GET", "/ping", "").await;
    assert_eq!(s, 503, "/ping while the disk is still full: {b}");
    store_mentions_once(&b);
    let (_, v) = node.get("/v2/info").await;
    assert_eq!(v["elected"], false, "{v}");

    // Space comes back: writes succeed again without a restart, health recovers.
    std::fs::remove_file(&filler).unwrap();
    eventually(30, "a write succeeds again", || async {
        let (s, _, b) = raw(&node, "PUT", "/v1/kv/after", "2").await;
        (s == 200 && b.trim() == "true").then_some(())
    })
    .await;
    acked.push("after".into());
    let (s, _, _) = raw(&node, "GET", "/ping", "").await;
    assert_eq!(s, 200);
    let (s, _, _) = raw(&node, "GET", "/master/health", "").await;
    assert_eq!(s, 200);
    let (s, h, b) = raw(&node, "GET", "/v1/status/leader", "").await;
    assert_eq!(s, 200);
    assert_ne!(b.trim(), r#""""#);
    assert_eq!(h.get("X-Consul-KnownLeader").and_then(|v| v.to_str().ok()), Some("true"));
    let (s, v) = node.send("POST", "/v2/apps", Some(&app("/later", 1, "none2"))).await;
    assert_eq!(s, 201, "{v}");

    // Everything acknowledged survives a restart.
    node.stop_with("TERM");
    let node = MeshNode::start_on(&data, ports, &extra);
    for key in &acked {
        let (s, _, _) = raw(&node, "GET", &format!("/v1/kv/{key}"), "").await;
        assert_eq!(s, 200, "acknowledged key {key} survives the restart");
    }
    let (s, _) = node.get("/v2/apps/victim").await;
    assert_eq!(s, 404, "the delete made while the disk was full is durable");
    let (s, v) = node.get("/v2/apps/shrink").await;
    assert_eq!((s, &v["app"]["instances"]), (200, &Value::from(1)), "the scale-down is durable: {v}");
    let (s, _) = node.get("/v2/apps/later").await;
    assert_eq!(s, 200);
    settled(&node, &tag_scale, 1).await;
}

/// The realistic case: an app fills the disk itself. It can still be deleted (its processes
/// stop at once); the node reports the failure until space is freed (mesh keeps sandboxes), then
/// recovers by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_filling_the_disk_can_be_deleted_and_the_node_recovers_once_space_is_freed() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let Some(_fs) = Tmpfs::mount(&data, "16m") else { return };
    let ports = port_range();
    let extra = ["--runtime", "process"];
    let tag = uuid::Uuid::new_v4().to_string();
    let mut node = MeshNode::start_on(&data, ports, &extra);
    let (s, _, b) = raw(&node, "PUT", "/v1/kv/before", "1").await;
    assert_eq!((s, b.trim()), (200, "true"));
    let hog = json!({"id": "/hog", "cmd": "exec sh -c 'while :; do cat /dev/zero >> fill; sleep 0.2; done'",
                     "instances": 1, "cpus": 0.01, "mem": 8, "env": {"MESH_TEST_TAG": tag}});
    let (s, v) = node.send("POST", "/v2/apps", Some(&hog.to_string())).await;
    assert_eq!(s, 201, "{v}");

    // The disk fills up: writes are refused and health says so. (The state log's tail is
    // zero-filled up to 1 MiB ahead, so writes go on into that space first: the probe is big.)
    let probe = "x".repeat(32 * 1024);
    eventually(60, "a write refused by the full disk", || async {
        let (s, _, b) = raw(&node, "PUT", "/v1/kv/probe", &probe).await;
        (s == 503).then(|| store_mentions_once(&b))
    })
    .await;
    let (s, _, _) = raw(&node, "GET", "/ping", "").await;
    assert_eq!(s, 503);

    // The app can be deleted; every process of it goes.
    let (s, v) = node.send("DELETE", "/v2/apps/hog", None).await;
    assert_eq!(s, 200, "delete the app that fills the disk: {v}");
    eventually(30, "the hog's processes are gone", || async {
        ["sh", "cat", "sleep"].iter().all(|c| tagged_pids(&tag, c).is_empty()).then_some(())
    })
    .await;
    let (s, _) = node.get("/v2/apps/hog").await;
    assert_eq!(s, 404);
    // Its sandbox is kept, so the disk stays full and the node keeps saying so.
    let (s, _, _) = raw(&node, "GET", "/master/health", "").await;
    assert_eq!(s, 503);

    // The operator frees the space: the node recovers without a restart.
    let sandboxes = data.join("sandboxes");
    let mut freed = 0;
    for e in std::fs::read_dir(&sandboxes).unwrap().flatten() {
        if std::fs::remove_file(e.path().join("fill")).is_ok() {
            freed += 1;
        }
    }
    assert_eq!(freed, 1, "the hog's fill file in its sandbox");
    eventually(30, "writes work again", || async {
        let (s, _, _) = raw(&node, "PUT", "/v1/kv/after", "2").await;
        (s == 200).then_some(())
    })
    .await;
    let (s, _, _) = raw(&node, "GET", "/master/health", "").await;
    assert_eq!(s, 200);

    node.stop_with("TERM");
    let node = MeshNode::start_on(&data, ports, &extra);
    let (s, _) = node.get("/v2/apps/hog").await;
    assert_eq!(s, 404, "the delete made on the full disk is durable");
    for key in ["before", "after"] {
        let (s, _, _) = raw(&node, "GET", &format!("/v1/kv/{key}"), "").await;
        assert_eq!(s, 200, "{key}");
    }
}

/// An HTTP server answering 200 or 500 as told, counting the 200s it gave.
async fn toggled_server(
    ok: std::sync::Arc<std::sync::atomic::AtomicBool>,
    oks: std::sync::Arc<std::sync::atomic::AtomicUsize>,
) -> u16 {
    use std::sync::atomic::Ordering;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut c, _)) = l.accept().await {
            let (ok, oks) = (ok.clone(), oks.clone());
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let _ = c.read(&mut buf).await;
                let good = ok.load(Ordering::SeqCst);
                let status = if good { "200 OK" } else { "500 Internal Server Error" };
                let _ = c
                    .write_all(
                        format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").as_bytes(),
                    )
                    .await;
                if good {
                    oks.fetch_add(1, Ordering::SeqCst);
                }
            });
        }
    });
    port
}

/// What the agent observes while the store cannot record it (here a Consul check turning
/// passing) is recorded once the store recovers, not dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_results_reported_during_the_failure_are_recorded_after_recovery() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let Some(_fs) = Tmpfs::mount(&data, "16m") else { return };
    let node = MeshNode::start_on(&data, port_range(), &["--runtime", "process"]);
    let ok = std::sync::Arc::new(AtomicBool::new(false));
    let oks = std::sync::Arc::new(AtomicUsize::new(0));
    let port = toggled_server(ok.clone(), oks.clone()).await;
    let reg =
        json!({"Name": "flip", "Port": port, "Check": {"HTTP": format!("http://127.0.0.1:{port}/"), "Interval": "1s"}});
    let (s, _, b) = raw(&node, "PUT", "/v1/agent/service/register", &reg.to_string()).await;
    assert_eq!(s, 200, "{b}");
    let status = || async {
        let (_, v) = node.get("/v1/health/checks/flip").await;
        v[0]["Status"].as_str().unwrap_or("").to_owned()
    };
    eventually(30, "the check is critical", || async { (status().await == "critical").then_some(()) }).await;

    let filler = data.join("filler");
    fill(&filler);
    let big = "x".repeat(32 * 1024);
    eventually(30, "a write refused", || async {
        let (s, _, _) = raw(&node, "PUT", "/v1/kv/k", &big).await;
        (s == 503).then_some(())
    })
    .await;
    // The service comes up; the agent's check sees it twice (so its first report went out).
    ok.store(true, Ordering::SeqCst);
    eventually(30, "two passing check runs", || async { (oks.load(Ordering::SeqCst) >= 2).then_some(()) }).await;
    assert_eq!(status().await, "critical", "not recorded while the store fails");

    std::fs::remove_file(&filler).unwrap();
    eventually(30, "the passing result recorded after the recovery", || async {
        (status().await == "passing").then_some(())
    })
    .await;
}

/// A `mesh server` (a Raft group of one) on a full disk: ordinary writes are refused with a
/// clear 503 before they reach the Raft log (which would stop the node), a delete still goes
/// through the reserve, and once space returns writes succeed again without a restart; what
/// was acknowledged survives a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raft_server_on_a_full_disk_refuses_writes_deletes_and_recovers() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("server");
    let Some(_fs) = Tmpfs::mount(&data, "24m") else { return };
    let ports = port_range();
    let start = || {
        MeshNode::start_role(
            "server",
            "127.0.0.1",
            &data,
            ports,
            "diskfull",
            &["--rpc", "127.0.0.1:0", "--serf-lan", "127.0.0.1:0", "--serf-wan", "127.0.0.1:0"],
        )
    };
    let mut node = start();
    let app = json!({"id": "/doomed", "cmd": "exec sleep 1000", "instances": 0, "cpus": 0.01, "mem": 8}).to_string();
    eventually(30, "the server takes writes", || async {
        let (s, _, b) = raw(&node, "PUT", "/v1/kv/before", "1").await;
        (s == 200 && b.trim() == "true").then_some(())
    })
    .await;
    let (s, v) = node.send("POST", "/v2/apps", Some(&app)).await;
    assert_eq!(s, 201, "{v}");

    let filler = data.join("filler");
    fill(&filler);
    let (s, _, b) = raw(&node, "PUT", "/v1/kv/refused", "x").await;
    assert_eq!(s, 503, "a write on a full disk: {b}");
    store_mentions_once(&b);
    assert!(b.contains("no space left on device"), "{b}");
    let (s, _, b) = raw(&node, "GET", "/ping", "").await;
    assert_eq!(s, 503, "/ping while the disk is full: {b}");
    let (s, v) = node.send("DELETE", "/v2/apps/doomed?force=true", None).await;
    assert_eq!(s, 200, "a delete while the disk is full: {v}");
    let (s, _) = node.get("/v2/apps/doomed").await;
    assert_eq!(s, 404);

    std::fs::remove_file(&filler).unwrap();
    eventually(30, "a write succeeds again, without a restart", || async {
        let (s, _, b) = raw(&node, "PUT", "/v1/kv/after", "2").await;
        (s == 200 && b.trim() == "true").then_some(())
    })
    .await;
    let (s, _, _) = raw(&node, "GET", "/ping", "").await;
    assert_eq!(s, 200);

    node.stop_with("TERM");
    let node = start();
    eventually(30, "acknowledged writes survive the restart", || async {
        let (a, _, _) = raw(&node, "GET", "/v1/kv/before", "").await;
        let (b, _, _) = raw(&node, "GET", "/v1/kv/after", "").await;
        let (c, _, _) = raw(&node, "GET", "/v1/kv/refused", "").await;
        let (d, _) = node.get("/v2/apps/doomed").await;
        (a == 200 && b == 200 && c == 404 && d == 404).then_some(())
    })
    .await;
}
