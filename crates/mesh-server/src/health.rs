//! The agent's health checker: probes the tasks of this node (HTTP, TCP, command) and reports
//! changes to the control side. The decisions (grace period, consecutive failures) are made by
//! [`mesh_core::health::CheckState`]; this module only owns the timers and sockets.
//!
//! HTTPS checks: mesh has no TLS client, so an HTTPS check probes that the port accepts TCP
//! connections (documented in the README).

use crate::control::{ControlHandle, ControlMsg};
use mesh_core::health::{CheckSpec, CheckState, Outcome, Probe, Protocol};
use mesh_core::model::{Millis, TaskId, now_millis};
use mesh_core::proto::ToControl;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::AbortHandle;

/// Runs the checks of the tasks on one agent.
pub struct HealthRunner {
    address: IpAddr,
    control: ControlHandle,
    running: HashMap<TaskId, Vec<AbortHandle>>,
}

impl HealthRunner {
    /// A runner probing tasks at `address` (the agent's address).
    pub fn new(address: IpAddr, control: ControlHandle) -> Self {
        Self { address, control, running: HashMap::new() }
    }

    /// Start (or restart) the checks of a task.
    pub fn watch(&mut self, task_id: TaskId, checks: Vec<CheckSpec>, started_at: Millis) {
        self.unwatch(&task_id);
        let handles = checks
            .into_iter()
            .enumerate()
            .map(|(i, spec)| {
                let control = self.control.clone();
                let task = task_id.clone();
                let address = self.address;
                tokio::spawn(run_check(task, i, spec, started_at, address, control)).abort_handle()
            })
            .collect();
        self.running.insert(task_id, handles);
    }

    /// Stop the checks of a task.
    pub fn unwatch(&mut self, task_id: &TaskId) {
        if let Some(hs) = self.running.remove(task_id) {
            for h in hs {
                h.abort();
            }
        }
    }
}

impl Drop for HealthRunner {
    fn drop(&mut self) {
        for hs in self.running.values() {
            for h in hs {
                h.abort();
            }
        }
    }
}

async fn run_check(
    task: TaskId,
    index: usize,
    spec: CheckSpec,
    started_at: Millis,
    address: IpAddr,
    control: ControlHandle,
) {
    let mut state = CheckState::new(&spec, started_at);
    if spec.protocol_name.starts_with("MESOS_") {
        tokio::time::sleep(spec.delay).await;
    }
    let mut tick = tokio::time::interval(spec.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let result = match tokio::time::timeout(spec.timeout, probe(&spec, address)).await {
            Ok(p) => p,
            Err(_) => Probe::Fail(format!("timed out after {:?}", spec.timeout)),
        };
        if state.record(result, now_millis()) == Outcome::Report {
            let msg = ToControl::Health { task_id: task.clone(), check: index, result: state.result.clone() };
            if control.send(ControlMsg::FromAgent(msg)).await.is_err() {
                return;
            }
        }
    }
}

async fn probe(spec: &CheckSpec, address: IpAddr) -> Probe {
    let target = |port: u16| SocketAddr::new(address, port);
    match spec.protocol {
        Protocol::Command => {
            let Some(cmd) = &spec.command else { return Probe::Fail("no command".into()) };
            match tokio::process::Command::new("/bin/sh").arg("-c").arg(cmd).kill_on_drop(true).status().await {
                Ok(s) if s.success() => Probe::Pass,
                Ok(s) => Probe::Fail(format!("command exited with {s}")),
                Err(e) => Probe::Fail(format!("command failed to start: {e}")),
            }
        }
        Protocol::Tcp | Protocol::Https => {
            let Some(port) = spec.port else { return Probe::Fail("no port to check".into()) };
            match tokio::net::TcpStream::connect(target(port)).await {
                Ok(_) => Probe::Pass,
                Err(e) => Probe::Fail(format!("connect to port {port}: {e}")),
            }
        }
        Protocol::Http => {
            let Some(port) = spec.port else { return Probe::Fail("no port to check".into()) };
            match http_status(target(port), &spec.path).await {
                Ok(code) if (200..400).contains(&code) => Probe::Pass,
                Ok(code) if code < 200 && spec.ignore_http1xx => Probe::Ignore,
                Ok(code) => Probe::Fail(format!("HTTP {code} from {}", spec.path)),
                Err(e) => Probe::Fail(format!("HTTP check of port {port}: {e}")),
            }
        }
    }
}

/// A minimal HTTP/1.0 GET that returns the status code.
async fn http_status(addr: SocketAddr, path: &str) -> std::io::Result<u16> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    let path = if path.starts_with('/') { path.to_owned() } else { format!("/{path}") };
    let req = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\nUser-Agent: mesh-health\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await?;
    let mut buf = [0u8; 64];
    let mut n = 0;
    while n < 12 {
        let r = s.read(&mut buf[n..]).await?;
        if r == 0 {
            break;
        }
        n += r;
    }
    let line = String::from_utf8_lossy(&buf[..n]);
    line.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, "not an HTTP response"))
}
