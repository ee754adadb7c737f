//! Disk use of tasks on the agent is bounded: task stdout/stderr are rotated at
//! `--task-log-max-size` (keeping `--task-log-max-files` old files), sandboxes of ended tasks are
//! removed after `--gc-delay` while running tasks keep theirs, and a task using more than its
//! app's `disk` MiB ends `TASK_FAILED` with "disk limit of N MiB exceeded".

mod support;

use serde_json::json;
use std::path::{Path, PathBuf};
use support::*;

const MIB: u64 = 1024 * 1024;

fn sandbox(node: &MeshNode, task_id: &str) -> PathBuf {
    node.data_dir.join("sandboxes").join(task_id)
}

fn size(p: &Path) -> Option<u64> {
    std::fs::metadata(p).ok().map(|m| m.len())
}

/// The fraction of the disk holding `dir` in use, from `df` (its Use% is rounded up).
fn disk_usage(dir: &Path) -> f64 {
    let out = std::process::Command::new("df").arg("-P").arg(dir).output().expect("df");
    let text = String::from_utf8_lossy(&out.stdout);
    let pcent = text.lines().nth(1).and_then(|l| l.split_whitespace().nth(4)).expect("df output");
    pcent.trim_end_matches('%').parse::<f64>().expect("Use%") / 100.0
}

async fn one_running_task(node: &MeshNode, app: &str) -> String {
    eventually(60, &format!("a running task of {app}"), || async {
        running_tasks(node, app).await.into_iter().next().map(|(id, _)| id)
    })
    .await
}

#[tokio::test]
async fn task_output_is_rotated_at_the_configured_size() {
    let node = MeshNode::start(&["--runtime", "process", "--task-log-max-size", "1MiB", "--task-log-max-files", "2"]);
    // 64 MiB to stdout and 8 MiB to stderr, then a last line on each, then stay up.
    let cmd = "yes 0123456789abcdef | head -c 67108864; echo END; \
               yes err | head -c 8388608 >&2; echo ERREND >&2; exec sleep 1000";
    let app = json!({"id": "/chatty", "cmd": cmd, "cpus": 0.1, "mem": 32, "instances": 1});
    let (s, v) = node.send("POST", "/v2/apps", Some(&app.to_string())).await;
    assert_eq!(s, 201, "{v}");
    let task = one_running_task(&node, "/chatty").await;
    let dir = sandbox(&node, &task);
    // Every byte went through the logger: the live files end with the last lines.
    eventually(60, "stdout ends with END and stderr with ERREND", || async {
        let out = std::fs::read(dir.join("stdout")).unwrap_or_default();
        let err = std::fs::read(dir.join("stderr")).unwrap_or_default();
        (out.ends_with(b"END\n") && err.ends_with(b"ERREND\n")).then_some(())
    })
    .await;
    for name in ["stdout", "stderr"] {
        let live = size(&dir.join(name)).unwrap();
        assert!(live <= MIB, "{name} is {live} bytes, above the 1 MiB limit");
        for i in 1..=2 {
            let old = size(&dir.join(format!("{name}.{i}"))).unwrap_or_else(|| panic!("{name}.{i} missing"));
            assert!(old <= MIB && old > MIB / 2, "{name}.{i} is {old} bytes");
        }
        assert!(!dir.join(format!("{name}.3")).exists(), "only 2 old files of {name} are kept");
    }
    // The rotated file just before the live one holds the bytes that came right before it.
    let prev = std::fs::read(dir.join("stdout.1")).unwrap();
    assert!(prev.iter().all(|b| b"0123456789abcdef\n".contains(b)), "stdout.1 holds task output");
    let total: u64 =
        std::fs::read_dir(&dir).unwrap().flatten().filter_map(|e| e.metadata().ok()).map(|m| m.len()).sum();
    assert!(total <= 7 * MIB, "the sandbox holds {total} bytes after the task wrote 72 MiB");
}

#[tokio::test]
async fn ended_sandboxes_are_collected_running_ones_kept() {
    // The delay shrinks as the disk fills (delay * (1 - headroom - usage)): pick one that is
    // about 1.5 s at the disk's current usage.
    let tmp = tempfile::tempdir().unwrap();
    let usage = disk_usage(tmp.path());
    let delay_ms = (1500.0 / (1.0 - usage).max(0.01)) as u64;
    let delay = format!("{delay_ms}ms");
    let args =
        ["--runtime", "process", "--gc-delay", &delay, "--gc-disk-headroom", "0", "--disk-watch-interval", "100ms"];
    let node = MeshNode::start_on(&tmp.path().join("data"), port_range(), &args);
    for id in ["/keeper", "/goner"] {
        let app = json!({"id": id, "cmd": "echo hello; exec sleep 1000", "cpus": 0.1, "mem": 32, "instances": 1});
        let (s, v) = node.send("POST", "/v2/apps", Some(&app.to_string())).await;
        assert_eq!(s, 201, "{v}");
    }
    let keeper = one_running_task(&node, "/keeper").await;
    let goner = one_running_task(&node, "/goner").await;
    let (keep_dir, gone_dir) = (sandbox(&node, &keeper), sandbox(&node, &goner));
    assert!(gone_dir.join("stdout").exists());
    let started = std::time::Instant::now();
    let (s, v) = node.send("DELETE", "/v2/apps/goner", None).await;
    assert_eq!(s, 200, "{v}");
    eventually(30, "the ended task's sandbox is removed", || async { (!gone_dir.exists()).then_some(()) }).await;
    // Not before the delay at the fullest the disk was seen (df rounds its Use% up).
    let fullest = usage.max(disk_usage(tmp.path()));
    let least = std::time::Duration::from_millis(delay_ms).mul_f64((1.0 - fullest).max(0.0) * 0.9);
    assert!(started.elapsed() >= least, "removed after {:?}, before {least:?}", started.elapsed());
    // The running task is older than the delay and keeps its sandbox.
    assert!(keep_dir.join("stdout").exists(), "a running task's sandbox was removed");
    assert_eq!(std::fs::read_to_string(keep_dir.join("stdout")).unwrap(), "hello\n");
    assert_eq!(running_tasks(&node, "/keeper").await.len(), 1);
}

#[tokio::test]
async fn task_over_its_disk_fails_with_a_message() {
    let node = MeshNode::start(&["--runtime", "process", "--container-disk-watch-interval", "200ms"]);
    let tag = uuid::Uuid::new_v4().to_string();
    // 5 MiB allowed; writes 12 MiB into its sandbox and stays up.
    let cmd = "head -c 12582912 /dev/zero > blob && exec sleep 1000";
    let hog = json!({"id": "/hog", "cmd": cmd, "cpus": 0.1, "mem": 32, "disk": 5, "instances": 1,
                     "env": {"MESH_TEST_TAG": tag}, "backoffSeconds": 3600});
    // The same program with disk 0 (Marathon's default: no limit) keeps running.
    let free = json!({"id": "/free", "cmd": cmd, "cpus": 0.1, "mem": 32, "instances": 1});
    for app in [&hog, &free] {
        let (s, v) = node.send("POST", "/v2/apps", Some(&app.to_string())).await;
        assert_eq!(s, 201, "{v}");
    }
    let failure = eventually(60, "lastTaskFailure of /hog", || async {
        let (_, v) = node.get("/v2/apps/hog").await;
        let f = v["app"]["lastTaskFailure"].clone();
        f.is_object().then_some(f)
    })
    .await;
    assert_eq!(failure["state"], "TASK_FAILED", "{failure}");
    let msg = failure["message"].as_str().unwrap_or_default();
    assert!(msg.starts_with("disk limit of 5 MiB exceeded (used "), "{msg}");
    assert!(tagged_pids(&tag, "sleep").is_empty(), "the task's process was killed");
    let free_task = one_running_task(&node, "/free").await;
    let (_, v) = node.get("/v2/apps/free").await;
    assert!(v["app"]["lastTaskFailure"].is_null(), "disk 0 means no limit: {v}");
    assert!(size(&sandbox(&node, &free_task).join("blob")).is_some());
}

/// Pids of `mesh logger` processes writing into `dir`.
fn logger_pids(dir: &Path) -> Vec<u32> {
    let needle = dir.join("std").to_string_lossy().into_owned();
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else { continue };
        let args: Vec<String> = cmd.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
        if args.get(1).is_some_and(|a| a == "logger") && args.iter().any(|a| a.starts_with(&needle)) {
            out.push(pid);
        }
    }
    out
}

/// (stdout, stdout.1) contents.
fn outputs(dir: &Path) -> (Vec<u8>, Vec<u8>) {
    (std::fs::read(dir.join("stdout")).unwrap_or_default(), std::fs::read(dir.join("stdout.1")).unwrap_or_default())
}

#[tokio::test]
async fn loggers_outlive_a_killed_agent_and_the_task_keeps_logging() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let ports = port_range();
    let args = ["--runtime", "process", "--task-log-max-size", "64KiB", "--task-log-max-files", "1"];
    let mut node = MeshNode::start_on(&data, ports, &args);
    let tag = uuid::Uuid::new_v4().to_string();
    let app = json!({"id": "/ticker", "cmd": "while :; do seq 1 2000; sleep 0.05; done", "cpus": 0.1, "mem": 32,
                     "instances": 1, "env": {"MESH_TEST_TAG": tag}});
    let (s, v) = node.send("POST", "/v2/apps", Some(&app.to_string())).await;
    assert_eq!(s, 201, "{v}");
    let task = one_running_task(&node, "/ticker").await;
    let dir = node.data_dir.join("sandboxes").join(&task);
    eventually(30, "stdout rotated once", || async { dir.join("stdout.1").exists().then_some(()) }).await;
    assert_eq!(logger_pids(&dir).len(), 2, "one logger per stream");

    node.stop_with("KILL");
    // With no mesh running, the task is not hit by SIGPIPE and its output is still rotated.
    let before = outputs(&dir);
    eventually(30, "output moves on while mesh is down", || async { (outputs(&dir) != before).then_some(()) }).await;
    assert_eq!(tagged_pids(&tag, "sh").len(), 1, "the task still runs");
    assert_eq!(logger_pids(&dir).len(), 2, "the loggers still run");

    let node = MeshNode::start_on(&data, ports, &args);
    eventually(60, "the task is re-adopted", || async {
        running_tasks(&node, "/ticker").await.iter().any(|(id, _)| *id == task).then_some(())
    })
    .await;
    let before = outputs(&dir);
    eventually(30, "output moves on after the restart", || async { (outputs(&dir) != before).then_some(()) }).await;
    for name in ["stdout", "stdout.1", "stderr"] {
        let len = size(&dir.join(name)).unwrap_or(0);
        assert!(len <= 64 * 1024, "{name} is {len} bytes");
    }
    assert!(!dir.join("stdout.2").exists());

    // When the task ends its loggers end too.
    let (s, v) = node.send("DELETE", "/v2/apps/ticker", None).await;
    assert_eq!(s, 200, "{v}");
    eventually(30, "the loggers exit with the task", || async { logger_pids(&dir).is_empty().then_some(()) }).await;
    assert!(tagged_pids(&tag, "sh").is_empty());
}
