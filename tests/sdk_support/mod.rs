//! Support for the mesh-sdk tests: run the SDK's examples as real processes.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The path of a built example of mesh-sdk (`target/<profile>/examples/<name>`), next to the
/// `mesh` binary. Panics with what to do when it has not been built.
pub fn example_bin(name: &str) -> PathBuf {
    let mesh = PathBuf::from(env!("CARGO_BIN_EXE_mesh"));
    let path = mesh.parent().expect("dir of the mesh binary").join("examples").join(name);
    assert!(
        path.is_file(),
        "example {name} is not built at {}: run `cargo build -p mesh-sdk --examples` (cargo test --workspace builds it)",
        path.display()
    );
    path
}

/// A running example process; its output lines are collected, and it is killed on drop.
pub struct ExampleProc {
    pub name: String,
    pub child: Option<Child>,
    lines: Arc<Mutex<Vec<String>>>,
}

impl ExampleProc {
    pub fn spawn(name: &str, args: &[String], env: &[(&str, String)]) -> ExampleProc {
        let mut cmd = Command::new(example_bin(name));
        cmd.args(args).stdout(Stdio::piped()).stderr(Stdio::piped()).stdin(Stdio::null());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn example {name}: {e}"));
        let lines = Arc::new(Mutex::new(Vec::new()));
        for out in [
            child.stdout.take().map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
            child.stderr.take().map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let lines = lines.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    lines.lock().unwrap().push(line);
                }
            });
        }
        ExampleProc { name: name.to_owned(), child: Some(child), lines }
    }

    /// Everything it printed so far.
    pub fn output(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    /// Wait (with a deadline) for a printed line containing `needle`; returns the line.
    pub async fn wait_line(&self, needle: &str, secs: u64) -> String {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(l) = self.lines.lock().unwrap().iter().find(|l| l.contains(needle)) {
                return l.clone();
            }
            if Instant::now() > deadline {
                panic!("{} printed no line with {needle:?} within {secs}s; output:\n{}", self.name, self.output());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Kill it (SIGKILL) and reap it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stop it with SIGTERM and wait for it to exit (killing it after 20 s).
    pub fn terminate(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill").args(["-TERM", &c.id().to_string()]).status();
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for ExampleProc {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- {} output ----\n{}", self.name, self.output());
        }
        self.kill();
    }
}
