//! Python clients against a real `mesh dev`: runs the pytest suites in `tests/python`, which
//! start their own node from `$MESH_BIN` (this build's binary).
//! - marathon-python 0.13.0: every client method that touches apps, groups, tasks, deployments,
//!   queue, info, leader, ping, metrics and the event stream (`test_marathon_client.py` and
//!   every other file but the Consul ones);
//! - py-consul 1.8.0: the `test_consul*.py` files (KV, CAS, sessions, locks, lock-delay,
//!   transactions);
//! - pymesos 0.3.15: a framework over the Mesos v1 scheduler API (`test_pymesos.py`).
//!
//! Needs `tests/python/install.sh` (pip; pymesos without its unbuildable C dependency). Without it
//! the test prints `SKIP: ...` and passes, unless `MESH_REQUIRE_PYTHON=1` (CI sets it), which
//! makes it fail.

use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The whole suite takes seconds; this only guards against a hang.
const SUITE_DEADLINE: Duration = Duration::from_secs(600);

fn python_ready(imports: &str) -> Result<(), String> {
    match Command::new("python3").args(["-c", &format!("import {imports}")]).output() {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => Err(String::from_utf8_lossy(&o.stderr).trim().to_owned()),
        Err(e) => Err(format!("python3: {e}")),
    }
}

fn drain(mut r: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    })
}

/// Run pytest in `tests/python` with `args` (files or options), needing `imports`; the node's
/// agent gets the host ports `ports` (distinct per suite, as the suites run in parallel).
fn run_suite(what: &str, imports: &str, ports: &str, args: &[String]) {
    if let Err(why) = python_ready(imports) {
        if std::env::var("MESH_REQUIRE_PYTHON").as_deref() == Ok("1") {
            panic!(
                "MESH_REQUIRE_PYTHON=1 but {what} is not importable ({why}); \
                 run: bash tests/python/install.sh"
            );
        }
        println!("SKIP: {what} not installed ({why})");
        return;
    }
    let suite = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/python");
    let mut child = Command::new("python3")
        .args(["-m", "pytest", "-q", "-rsxX", "-p", "no:cacheprovider"])
        .args(args)
        .current_dir(&suite)
        .env("MESH_BIN", env!("CARGO_BIN_EXE_mesh"))
        .env("MESH_PY_PORTS", ports)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn python3 -m pytest");
    let out = drain(child.stdout.take().expect("stdout"));
    let err = drain(child.stderr.take().expect("stderr"));

    let started = Instant::now();
    let mut interrupted_at: Option<Instant> = None;
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait for pytest") {
            break s;
        }
        match interrupted_at {
            None if started.elapsed() > SUITE_DEADLINE => {
                // SIGINT lets pytest run its fixture teardown, which stops the mesh node.
                let _ = Command::new("kill").args(["-INT", &child.id().to_string()]).status();
                interrupted_at = Some(Instant::now());
            }
            Some(t) if t.elapsed() > Duration::from_secs(60) => {
                let _ = child.kill();
            }
            _ => {}
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let stdout = out.join().unwrap_or_default();
    let stderr = err.join().unwrap_or_default();
    println!("{stdout}");
    if !stderr.trim().is_empty() {
        println!("--- pytest stderr ---\n{stderr}");
    }
    assert!(interrupted_at.is_none(), "the Python suite did not finish within {SUITE_DEADLINE:?}");
    assert!(status.success(), "the {what} suite failed ({status}); output above");
}

#[test]
fn marathon_python_suite_passes() {
    let args = [".".into(), "--ignore-glob=*test_consul*".into()];
    run_suite("marathon-python and pymesos", "marathon, pytest, pymesos, http_parser.http", "45000-45099", &args);
}

#[test]
fn py_consul_suite_passes() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/python");
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .expect("tests/python")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with("test_consul") && n.ends_with(".py"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no test_consul*.py in {}", dir.display());
    // conftest.py imports marathon too
    run_suite("py-consul", "consul, marathon, pytest", "45100-45149", &files);
}
