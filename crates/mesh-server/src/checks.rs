//! The agent's Consul check runner: runs the HTTP, TCP and script checks registered on its node
//! (through `/v1/agent/check/register`, service registrations, Registrator's `SERVICE_CHECK_*`) and
//! reports status changes to the control side. Thresholds are applied by the sans-IO
//! [`CheckCounter`]; TTL checks need no runner (their expiry is a timer of the control loop).
//!
//! Result mapping follows Consul: HTTP 2xx passing, 429 warning, anything else critical; TCP
//! connect passing or critical; script exit 0 passing, 1 warning, anything else critical. Output is
//! capped at 4 KiB.
//!
//! Script checks run on the host; docker checks (Consul's `DockerContainerID`, which is what
//! Registrator's `SERVICE_CHECK_SCRIPT` and `SERVICE_CHECK_CMD` become) run their arguments inside
//! the container with `docker exec`. Both run only with `--enable-script-checks`, the flag the
//! Consul API obeys: otherwise such a check never runs and reports critical with
//! [`SCRIPTS_DISABLED`].

use crate::control::{ControlHandle, ControlMsg};
use mesh_core::catalog::{Check, CheckCounter, CheckDefinition, Health, MAX_CHECK_OUTPUT, truncate_output};
use mesh_core::model::AgentId;
use mesh_core::proto::ToControl;
use std::collections::HashMap;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::AbortHandle;

/// The output of a script or docker check that is not run because script checks are disabled.
pub const SCRIPTS_DISABLED: &str =
    "Scripts are disabled on this agent; to enable, start mesh with --enable-script-checks";

/// Default per-run timeout (Consul's).
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default and minimum interval.
const DEFAULT_INTERVAL: Duration = Duration::from_secs(10);
const MIN_INTERVAL: Duration = Duration::from_millis(100);

/// The running checks of one node.
pub struct CheckRunner {
    agent: AgentId,
    control: ControlHandle,
    scripts: Scripts,
    running: HashMap<String, Running>,
}

/// Whether and where script and docker checks may run.
#[derive(Clone, Default)]
pub struct Scripts {
    /// `--enable-script-checks`.
    pub enabled: bool,
    /// The engine docker checks are run on (`None`: none answers).
    pub docker: Option<bollard::Docker>,
}

impl Scripts {
    /// Scripts allowed or not; docker checks go to the local engine.
    pub fn new(enabled: bool) -> Self {
        let docker = if enabled { bollard::Docker::connect_with_local_defaults().ok() } else { None };
        Self { enabled, docker }
    }
}

struct Running {
    definition: CheckDefinition,
    /// The status the control side records, so a re-registration that reset it is noticed.
    recorded: tokio::sync::watch::Sender<Health>,
    task: AbortHandle,
}

impl CheckRunner {
    /// A runner for `agent`'s node.
    pub fn new(agent: AgentId, control: ControlHandle, scripts: Scripts) -> Self {
        Self { agent, control, scripts, running: HashMap::new() }
    }

    /// Run exactly `checks` from now on: start new or changed ones, stop the others.
    pub fn set(&mut self, checks: Vec<Check>) {
        let wanted: HashMap<String, Check> = checks.into_iter().map(|c| (c.id.clone(), c)).collect();
        self.running.retain(|id, r| {
            let keep = wanted.get(id).is_some_and(|c| c.definition == r.definition);
            if !keep {
                r.task.abort();
            }
            keep
        });
        for (id, check) in wanted {
            if let Some(r) = self.running.get(&id) {
                r.recorded.send_replace(check.status);
                continue;
            }
            let (recorded, rx) = tokio::sync::watch::channel(check.status);
            let definition = check.definition.clone();
            let task = tokio::spawn(run(self.agent.clone(), check, rx, self.control.clone(), self.scripts.clone()))
                .abort_handle();
            self.running.insert(id, Running { definition, recorded, task });
        }
    }
}

impl Drop for CheckRunner {
    fn drop(&mut self) {
        for (_, r) in self.running.drain() {
            r.task.abort();
        }
    }
}

async fn run(
    agent: AgentId,
    check: Check,
    mut recorded: tokio::sync::watch::Receiver<Health>,
    control: ControlHandle,
    scripts: Scripts,
) {
    let def = check.definition;
    let interval = match def.interval_ms {
        0 => DEFAULT_INTERVAL,
        ms => Duration::from_millis(ms).max(MIN_INTERVAL),
    };
    let timeout = match def.timeout_ms {
        0 => DEFAULT_TIMEOUT.min(interval.max(Duration::from_secs(1))),
        ms => Duration::from_millis(ms),
    };
    let mut counter = CheckCounter::new(check.status);
    let mut last_output = check.output;
    // What the control side records as this check's status, as far as we know.
    let mut believed = check.status;
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let (raw, output) = match tokio::time::timeout(timeout, probe(&def, &scripts)).await {
            Ok(r) => r,
            Err(_) => (Health::Critical, format!("Timeout exceeded ({} ms)", timeout.as_millis())),
        };
        let status = counter.observe(raw, &def);
        let output = cap(output);
        if recorded.has_changed().unwrap_or(false) {
            believed = *recorded.borrow_and_update();
        }
        // Report when the recorded status differs (a change, or a re-registration that reset it)
        // or the output changed.
        if status != believed || output != last_output {
            believed = status;
            last_output = output.clone();
            let msg =
                ToControl::CheckResults { agent_id: agent.clone(), results: vec![(check.id.clone(), status, output)] };
            if control.send(ControlMsg::FromAgent(msg)).await.is_err() {
                return;
            }
        }
    }
}

fn cap(mut s: String) -> String {
    if truncate_output(&mut s) {
        s.push_str(" ...");
    }
    s
}

/// Exit code to status, as Consul maps script checks.
fn exit_status(code: Option<i64>) -> Health {
    match code {
        Some(0) => Health::Passing,
        Some(1) => Health::Warning,
        _ => Health::Critical,
    }
}

/// Run a check once: its raw status and output.
pub async fn probe(def: &CheckDefinition, scripts: &Scripts) -> (Health, String) {
    let kind = def.kind();
    if matches!(kind, "script" | "docker") && !scripts.enabled {
        return (Health::Critical, SCRIPTS_DISABLED.to_owned());
    }
    match kind {
        "http" => http(def).await,
        "grpc" => grpc(def).await,
        "tcp" => match tokio::net::lookup_host(def.tcp.as_str()).await.map(|mut a| a.next()) {
            Ok(Some(addr)) => match tokio::net::TcpStream::connect(addr).await {
                Ok(_) => (Health::Passing, format!("TCP connect {}: Success", def.tcp)),
                Err(e) => (Health::Critical, format!("dial tcp {}: {e}", def.tcp)),
            },
            Ok(None) => (Health::Critical, format!("dial tcp {}: no address", def.tcp)),
            Err(e) => (Health::Critical, format!("dial tcp {}: {e}", def.tcp)),
        },
        "script" => {
            let mut cmd = tokio::process::Command::new(&def.args[0]);
            cmd.args(&def.args[1..]).kill_on_drop(true).stdin(std::process::Stdio::null());
            match cmd.output().await {
                Ok(out) => {
                    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
                    text.push_str(&String::from_utf8_lossy(&out.stderr));
                    (exit_status(out.status.code().map(i64::from)), text)
                }
                Err(e) => (Health::Critical, format!("failed to run {:?}: {e}", def.args[0])),
            }
        }
        "docker" => match &scripts.docker {
            Some(docker) => docker_exec(docker, &def.docker_container_id, &def.args).await,
            None => (Health::Critical, "no Docker engine answers".to_owned()),
        },
        other => (Health::Critical, format!("check type {other:?} is not run by the agent")),
    }
}

/// Run `args` inside `container` (`docker exec`): status from the exit code, stdout and stderr as
/// output. A run cut short by the check's timeout leaves the process to the container.
async fn docker_exec(docker: &bollard::Docker, container: &str, args: &[String]) -> (Health, String) {
    use bollard::exec::StartExecResults;
    use futures_util::StreamExt;
    let config = bollard::models::ExecConfig {
        cmd: Some(args.to_vec()),
        attach_stdout: Some(true),
        attach_stderr: Some(true),
        ..Default::default()
    };
    let exec = match docker.create_exec(container, config).await {
        Ok(e) => e,
        Err(e) => return (Health::Critical, format!("docker exec in {container}: {e}")),
    };
    let mut text = String::new();
    match docker.start_exec(&exec.id, None).await {
        Ok(StartExecResults::Attached { mut output, .. }) => {
            while let Some(chunk) = output.next().await {
                match chunk {
                    Ok(out) => {
                        if text.len() <= MAX_CHECK_OUTPUT {
                            text.push_str(&String::from_utf8_lossy(&out.into_bytes()));
                        }
                    }
                    Err(e) => return (Health::Critical, format!("docker exec in {container}: {e}")),
                }
            }
        }
        Ok(StartExecResults::Detached) => {}
        Err(e) => return (Health::Critical, format!("docker exec in {container}: {e}")),
    }
    match docker.inspect_exec(&exec.id).await {
        Ok(i) => (exit_status(i.exit_code), text),
        Err(e) => (Health::Critical, format!("docker exec in {container}: {e}")),
    }
}

/// One HTTP(S) request: 2xx passing, 429 warning, anything else critical.
async fn http(def: &CheckDefinition) -> (Health, String) {
    let method = if def.method.is_empty() { "GET" } else { def.method.as_str() };
    let url = &def.http;
    match http_request(url, method, &def.header).await {
        Ok((code, reason, body)) => {
            let status = match code {
                200..=299 => Health::Passing,
                429 => Health::Warning,
                _ => Health::Critical,
            };
            (status, format!("HTTP {method} {url}: {code} {reason} Output: {body}"))
        }
        Err(e) => (Health::Critical, format!("{method} {url}: {e}")),
    }
}

/// A minimal HTTP/1.1 client for checks: status code, reason and the first bytes of the body.
pub async fn http_request(
    url: &str,
    method: &str,
    headers: &std::collections::BTreeMap<String, Vec<String>>,
) -> std::io::Result<(u16, String, String)> {
    let bad = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidInput, m.to_owned());
    let (tls, rest) = if let Some(r) = url.strip_prefix("http://") {
        (false, r)
    } else if let Some(r) = url.strip_prefix("https://") {
        (true, r)
    } else {
        return Err(bad("URL must start with http:// or https://"));
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let has_port = if authority.starts_with('[') { authority.contains("]:") } else { authority.contains(':') };
    let with_port = if has_port { authority.to_owned() } else { format!("{authority}:{}", if tls { 443 } else { 80 }) };
    let addr = tokio::net::lookup_host(with_port.as_str()).await?.next().ok_or_else(|| bad("no address"))?;
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: mesh-check\r\nAccept: text/plain, text/*, */*\r\nConnection: close\r\n"
    );
    for (k, vs) in headers {
        for v in vs {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
    }
    req.push_str("\r\n");
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let raw = if tls {
        let mut s = crate::health::tls_connect(addr, tcp).await?;
        exchange(&mut s, req.as_bytes()).await?
    } else {
        let mut s = tcp;
        exchange(&mut s, req.as_bytes()).await?
    };
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status_line = head.lines().next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let _version = parts.next();
    let code = parts.next().and_then(|c| c.parse().ok()).ok_or_else(|| bad("not an HTTP response"))?;
    let reason = parts.next().unwrap_or_default().to_owned();
    Ok((code, reason, body.to_owned()))
}

async fn exchange<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    s: &mut S,
    req: &[u8],
) -> std::io::Result<Vec<u8>> {
    s.write_all(req).await?;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    while buf.len() < MAX_CHECK_OUTPUT + 2048 {
        match s.read(&mut chunk).await {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if !buf.is_empty() && e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(e),
        }
    }
    Ok(buf)
}

/// A gRPC health check (`grpc.health.v1.Health/Check` over HTTP/2 without TLS): passing when
/// the server answers SERVING, critical otherwise, as Consul's. `target` is `host:port` or
/// `host:port/service`.
async fn grpc(def: &CheckDefinition) -> (Health, String) {
    let target = def.grpc.as_str();
    if def.grpc_use_tls {
        return (Health::Critical, format!("gRPC check {target}: GRPCUseTLS is not supported by mesh's agent"));
    }
    match grpc_health(target).await {
        Ok(1) => (Health::Passing, format!("gRPC check {target}: success")),
        Ok(status) => {
            let name = match status {
                2 => "NOT_SERVING",
                3 => "SERVICE_UNKNOWN",
                _ => "UNKNOWN",
            };
            (Health::Critical, format!("gRPC check {target}: failed, service status: {name}"))
        }
        Err(e) => (Health::Critical, format!("gRPC check {target}: failed, {e}")),
    }
}

/// Ask `target` for `grpc.health.v1.Health/Check`; the `ServingStatus` number it answers.
pub async fn grpc_health(target: &str) -> Result<u64, String> {
    use http_body_util::BodyExt;
    let (authority, service) = target.split_once('/').unwrap_or((target, ""));
    let addr = tokio::net::lookup_host(authority)
        .await
        .map_err(|e| format!("dial tcp {authority}: {e}"))?
        .next()
        .ok_or_else(|| format!("dial tcp {authority}: no address"))?;
    let tcp = tokio::net::TcpStream::connect(addr).await.map_err(|e| format!("dial tcp {authority}: {e}"))?;
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), hyper_util::rt::TokioIo::new(tcp))
            .await
            .map_err(|e| format!("HTTP/2 handshake with {authority}: {e}"))?;
    let driver = tokio::spawn(conn);
    // HealthCheckRequest { string service = 1; } in a gRPC frame (uncompressed, length-prefixed).
    let mut msg = Vec::new();
    if !service.is_empty() {
        msg.push(0x0a);
        put_varint(&mut msg, service.len() as u64);
        msg.extend_from_slice(service.as_bytes());
    }
    let mut frame = vec![0u8];
    frame.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    frame.extend_from_slice(&msg);
    let req = hyper::Request::post(format!("http://{authority}/grpc.health.v1.Health/Check"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("user-agent", "mesh-check")
        .body(http_body_util::Full::new(axum::body::Bytes::from(frame)))
        .map_err(|e| e.to_string())?;
    let result = async {
        let resp = sender.send_request(req).await.map_err(|e| format!("request: {e}"))?;
        let head_status = resp.headers().get("grpc-status").and_then(|v| v.to_str().ok()).map(str::to_owned);
        let collected = resp.into_body().collect().await.map_err(|e| format!("response: {e}"))?;
        let trailer_status =
            collected.trailers().and_then(|t| t.get("grpc-status")).and_then(|v| v.to_str().ok()).map(str::to_owned);
        match trailer_status.or(head_status).as_deref() {
            Some("0") => {}
            Some(code) => return Err(format!("rpc error: code = {code}")),
            None => return Err("no grpc-status in the response".to_owned()),
        }
        let body = collected.to_bytes();
        let msg = body.get(5..).ok_or("short gRPC response")?;
        Ok(serving_status(msg))
    }
    .await;
    driver.abort();
    result
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Field 1 (varint) of a HealthCheckResponse; 0 (UNKNOWN) when absent.
fn serving_status(msg: &[u8]) -> u64 {
    let mut i = 0;
    while i < msg.len() {
        let (key, n) = varint(&msg[i..]);
        i += n;
        if n == 0 {
            break;
        }
        match key & 7 {
            0 => {
                let (v, n) = varint(&msg[i..]);
                if n == 0 {
                    break;
                }
                i += n;
                if key >> 3 == 1 {
                    return v;
                }
            }
            2 => {
                let (len, n) = varint(&msg[i..]);
                if n == 0 {
                    break;
                }
                i += n + len as usize;
            }
            _ => break,
        }
    }
    0
}

/// A protobuf varint: value and bytes used (0 when malformed).
fn varint(b: &[u8]) -> (u64, usize) {
    let mut v = 0u64;
    for (i, byte) in b.iter().enumerate().take(10) {
        v |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return (v, i + 1);
        }
    }
    (0, 0)
}
