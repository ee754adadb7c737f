//! The Rust batch framework (`examples/batch-framework`, a separate process speaking the Mesos v1
//! scheduler API over HTTP) and the stock Marathon scheduler share one saturated node by
//! weighted DRF: with equal weights each holds half of the node's CPUs; after
//! `PUT /master/weights` gives Marathon's role weight 3, Marathon grows to three quarters as
//! the batch jobs finish (no preemption: shares shift as resources free up). Shares are read
//! from `/master/frameworks` (used resources), polling with deadlines.
//!
//! Also: the example runs N jobs to completion and exits 0 with a summary.

mod support;

use serde_json::{Value, json};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use support::*;

/// The example binary `cargo test` builds next to the test binaries' `mesh`.
fn batch_framework() -> PathBuf {
    let mesh = PathBuf::from(env!("CARGO_BIN_EXE_mesh"));
    let path = mesh.parent().expect("target dir").join("examples").join("batch-framework");
    assert!(
        path.exists(),
        "the batch-framework example is not built at {}: run `cargo test --workspace` (which builds \
         examples) or `cargo build -p mesh-sdk --example batch-framework` first",
        path.display()
    );
    path
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// CPUs in use by the framework named `name` (tasks), from `/master/frameworks`.
async fn used_cpus(node: &MeshNode, name: &str) -> Option<f64> {
    let (_, v) = node.get("/master/frameworks").await;
    v["frameworks"].as_array()?.iter().find(|f| f["name"] == json!(name))?["used_resources"]["cpus"].as_f64()
}

async fn shares(node: &MeshNode) -> (f64, f64) {
    (used_cpus(node, "marathon").await.unwrap_or(-1.0), used_cpus(node, "drf-batch").await.unwrap_or(-1.0))
}

/// Wait until Marathon holds `want` CPUs and the batch framework at most `4 - want`, then check
/// over a few more seconds (batch jobs keep finishing and starting) that Marathon never holds
/// more and the batch framework gets its share back.
async fn converge(node: &MeshNode, want: f64, what: &str) -> Duration {
    let t0 = Instant::now();
    let mut last = (0.0, 0.0);
    loop {
        let (m, b) = shares(node).await;
        if (m - want).abs() < 1e-6 && b <= 4.0 - want + 1e-6 {
            break;
        }
        last = (m, b);
        if t0.elapsed() > Duration::from_secs(60) {
            let (_, state) = node.get("/master/state").await;
            panic!("timed out after 60 s waiting for: {what}; last (marathon, batch) CPUs {last:?}; state: {state}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = last;
    let took = t0.elapsed();
    let mut batch_max: f64 = 0.0;
    let until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < until {
        let (m, b) = shares(node).await;
        assert!((m - want).abs() < 1e-6, "{what}: Marathon left its share: {m} CPUs");
        assert!(b <= 4.0 - want + 1e-6, "{what}: batch over its share: {b} CPUs");
        assert!(m + b <= 4.0 + 1e-6, "never more than the node: {m} + {b}");
        batch_max = batch_max.max(b);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(batch_max >= 4.0 - want - 0.5 - 1e-6, "{what}: batch did not get its share back (max {batch_max} CPUs)");
    took
}

#[tokio::test]
async fn batch_framework_and_marathon_share_a_saturated_node_by_weight() {
    let bin = batch_framework();
    let node = MeshNode::start(&["--runtime", "process", "--mesos-heartbeat", "1s"]);
    // 400 one-second jobs of half a CPU: far more than the node holds at once.
    let batch = Command::new(&bin)
        .args(["--master", &node.url(""), "--jobs", "400", "--cmd", "sleep 1", "--cpus", "0.5", "--mem", "64"])
        .args(["--name", "drf-batch", "--role", "batch"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn batch-framework");
    let _batch = Killed(batch);
    eventually(30, "the batch framework fills the node", || async {
        (used_cpus(&node, "drf-batch").await? >= 3.5 - 1e-6).then_some(())
    })
    .await;

    // Marathon wants the whole node too: 8 long tasks of half a CPU.
    let app = json!({"id": "/drf/web", "cmd": "sleep 3600", "cpus": 0.5, "mem": 64, "instances": 8});
    let (s, v) = node.send("POST", "/v2/apps", Some(&app.to_string())).await;
    assert_eq!(s, 201, "{v}");
    let equal = converge(&node, 2.0, "equal weights: half the CPUs each").await;
    println!("equal weights: Marathon reached its half {equal:?} after the app was created");

    // Weight 3 for Marathon's role: three quarters.
    let (s, _) = node.send("PUT", "/master/weights", Some(r#"[{"role":"*","weight":3}]"#)).await;
    assert_eq!(s, 200);
    let weighted = converge(&node, 3.0, "weight 3 for '*': three quarters for Marathon").await;
    println!("weight 3: Marathon reached three quarters {weighted:?} after PUT /master/weights");
    let (_, v) = node.get("/master/roles").await;
    let star: &Value = v["roles"].as_array().unwrap().iter().find(|r| r["name"] == "*").unwrap();
    assert_eq!(star["weight"], json!(3.0));
}

#[tokio::test]
async fn batch_framework_runs_its_jobs_to_completion_and_exits_0() {
    let bin = batch_framework();
    let node = MeshNode::start(&["--runtime", "process"]);
    let out = tokio::task::spawn_blocking({
        let url = node.url("");
        move || {
            Command::new(&bin)
                .args(["--master", &url, "--jobs", "6", "--cmd", "echo job $JOB; test -n \"$MESOS_TASK_ID\""])
                .args(["--name", "six-jobs"])
                .output()
                .expect("run batch-framework")
        }
    });
    let out = tokio::time::timeout(Duration::from_secs(120), out).await.expect("finished in time").unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "exit {:?}\nstdout: {stdout}\nstderr: {stderr}", out.status);
    assert!(stdout.contains("6 jobs, 6 finished, 0 failed"), "{stdout}");
    // It tore down: a completed framework whose six tasks all finished.
    let (_, v) = node.get("/master/frameworks").await;
    let f = v["completed_frameworks"].as_array().unwrap().iter().find(|f| f["name"] == "six-jobs").cloned();
    let f = f.unwrap_or_else(|| panic!("six-jobs is not a completed framework: {v}"));
    let states: Vec<&Value> = f["completed_tasks"].as_array().unwrap().iter().map(|t| &t["state"]).collect();
    assert_eq!(states.len(), 6, "{f}");
    assert!(states.iter().all(|s| **s == json!("TASK_FINISHED")), "{f}");
}
