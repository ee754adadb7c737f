//! Test support: start a real `mesh dev` process on ephemeral ports with a temporary data dir,
//! talk to it over HTTP (reqwest) and DNS (hickory-resolver), and poll with deadlines.
#![allow(dead_code)]

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::{RData, RecordType};
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

/// Every node in this test binary gets its own host port range, so parallel tests never collide.
static NEXT_RANGE: AtomicU16 = AtomicU16::new(0);

pub fn port_range() -> (u16, u16) {
    // Spread test binaries apart by process id too.
    let base = 20000 + (std::process::id() % 50) as u16 * 400;
    let i = NEXT_RANGE.fetch_add(1, Ordering::SeqCst);
    let lo = base + i * 40;
    (lo, lo + 39)
}

pub struct MeshNode {
    pub child: Option<Child>,
    pub name: String,
    pub http: SocketAddr,
    pub dns: SocketAddr,
    pub data_dir: PathBuf,
    pub ports: (u16, u16),
    pub extra: Vec<String>,
    _tmp: Option<tempfile::TempDir>,
    pub client: reqwest::Client,
}

impl MeshNode {
    /// Start a node on a fresh data dir.
    pub fn start(extra: &[&str]) -> MeshNode {
        let tmp = tempfile::tempdir().expect("tempdir");
        let data_dir = tmp.path().join("data");
        let mut n = Self::start_on(&data_dir, port_range(), extra);
        n._tmp = Some(tmp);
        n
    }

    /// Start a node on `data_dir` (which may hold state from an earlier node).
    pub fn start_on(data_dir: &Path, ports: (u16, u16), extra: &[&str]) -> MeshNode {
        Self::start_named(data_dir, ports, &node_name(data_dir), extra)
    }

    /// Start a node on `data_dir` with the node name `name` (tests of name clashes).
    pub fn start_named(data_dir: &Path, ports: (u16, u16), name: &str, extra: &[&str]) -> MeshNode {
        Self::start_role("dev", "127.0.0.1", data_dir, ports, name, extra)
    }

    /// Start a `mesh <role>` (dev, server, agent) whose HTTP and DNS listen on `ip`, port 0.
    pub fn start_role(
        role: &str,
        ip: &str,
        data_dir: &Path,
        ports: (u16, u16),
        name: &str,
        extra: &[&str],
    ) -> MeshNode {
        Self::start_role_env(role, ip, data_dir, ports, name, extra, &[])
    }

    /// [`MeshNode::start_role`] with more environment variables (test faults).
    pub fn start_role_env(
        role: &str,
        ip: &str,
        data_dir: &Path,
        ports: (u16, u16),
        name: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> MeshNode {
        let name = name.to_owned();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(data_dir.with_extension("log"))
            .expect("log file");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_mesh"));
        cmd.args([role, "--http", &format!("{ip}:0"), "--dns", &format!("{ip}:0"), "--node", &name])
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--ports")
            .arg(format!("{}-{}", ports.0, ports.1))
            .args(["--cpus", "4", "--mem", "4096"])
            .args(extra)
            .env("RUST_LOG", "info,mesh_server=debug")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log));
        let mut child = cmd.spawn().expect("spawn mesh");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let line = rx.recv_timeout(Duration::from_secs(60)).unwrap_or_else(|_| {
            panic!("mesh {role} did not become ready; log:\n{}", tail(&data_dir.with_extension("log")))
        });
        let rest = line
            .strip_prefix(&format!("mesh {role} ready: "))
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"));
        let mut http = None;
        let mut dns = None;
        for part in rest.split_whitespace() {
            if let Some(v) = part.strip_prefix("http=") {
                http = v.split(',').next().and_then(|s| s.parse().ok());
            }
            if let Some(v) = part.strip_prefix("dns=") {
                dns = v.parse().ok();
            }
        }
        MeshNode {
            child: Some(child),
            name,
            http: http.expect("http addr"),
            dns: dns.expect("dns addr"),
            data_dir: data_dir.to_path_buf(),
            ports,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            _tmp: None,
            client: reqwest::Client::builder().timeout(Duration::from_secs(10)).build().expect("client"),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.http, path)
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        let r = self.client.get(self.url(path)).send().await.expect("GET");
        let status = r.status().as_u16();
        let text = r.text().await.unwrap_or_default();
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    pub async fn send(&self, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
        let m = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
        let mut req = self.client.request(m, self.url(path)).header("Content-Type", "application/json");
        if let Some(b) = body {
            req = req.body(b.to_owned());
        }
        let r = req.send().await.expect("request");
        let status = r.status().as_u16();
        let text = r.text().await.unwrap_or_default();
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    /// Send a signal to the node process and wait for it to exit.
    pub fn stop_with(&mut self, signal: &str) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill").args([&format!("-{signal}"), &child.id().to_string()]).status();
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("mesh did not exit after SIG{signal}");
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    pub fn log(&self) -> String {
        tail(&self.data_dir.with_extension("log"))
    }

    pub fn resolver(&self, tcp: bool) -> TokioResolver {
        let mut conn = if tcp { ConnectionConfig::tcp() } else { ConnectionConfig::udp() };
        conn.port = self.dns.port();
        let ns = NameServerConfig::new(self.dns.ip(), true, vec![conn]);
        let mut b = TokioResolver::builder_with_config(
            ResolverConfig::from_name_servers(vec![ns]),
            TokioRuntimeProvider::default(),
        );
        b.options_mut().cache_size = 0;
        b.options_mut().timeout = Duration::from_secs(2);
        b.options_mut().attempts = 2;
        b.build().expect("resolver")
    }
}

impl Drop for MeshNode {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- mesh log ({}) ----\n{}", self.data_dir.display(), self.log());
        }
        self.stop_with("TERM");
    }
}

/// `t` + a hash of the data dir: a valid DNS label. A node name unique to the data dir (stable
/// across restarts on it), so nodes of tests running in parallel never share a name.
pub fn node_name(data_dir: &Path) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    data_dir.hash(&mut h);
    format!("t{:x}", h.finish() & 0xffff_ffff)
}

pub fn tail(path: &Path) -> String {
    let s = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(80)..].join("\n")
}

/// SRV answers for `name`: (target, port), or the resolver error (e.g. NXDOMAIN).
pub async fn srv(resolver: &TokioResolver, name: &str) -> Result<Vec<(String, u16)>, hickory_resolver::net::NetError> {
    let l = resolver.lookup(name, RecordType::SRV).await?;
    Ok(l.answers()
        .iter()
        .filter_map(|r| match &r.data {
            RData::SRV(s) => Some((s.target.to_string(), s.port)),
            _ => None,
        })
        .collect())
}

/// Poll `f` until it returns Some, or panic with `what` after `secs` seconds.
pub async fn eventually<T, F, Fut>(secs: u64, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {secs}s waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Pids of processes whose environment holds `MESH_TEST_TAG=<tag>` and whose command is `comm`.
pub fn tagged_pids(tag: &str, comm: &str) -> Vec<u32> {
    let needle = format!("MESH_TEST_TAG={tag}");
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else { return out };
    for e in rd.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) else { continue };
        if !env.split(|b| *b == 0).any(|kv| kv == needle.as_bytes()) {
            continue;
        }
        let c = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        // zombies have an environment of zero length, so they are not counted
        if c.trim() == comm {
            out.push(pid);
        }
    }
    out.sort();
    out
}

/// Whether an HTTP GET to 127.0.0.1:port answers 200.
pub async fn http_ok(port: u16) -> bool {
    let c = reqwest::Client::builder().timeout(Duration::from_secs(2)).build().expect("client");
    matches!(c.get(format!("http://127.0.0.1:{port}/")).send().await, Ok(r) if r.status().is_success())
}

/// Running tasks of an app: (id, first port).
pub async fn running_tasks(node: &MeshNode, app: &str) -> Vec<(String, u16)> {
    let (status, v) = node.get(&format!("/v2/apps{app}/tasks")).await;
    if status != 200 {
        return Vec::new();
    }
    let mut out: Vec<(String, u16)> = v["tasks"]
        .as_array()
        .map(|ts| {
            ts.iter()
                .filter(|t| t["state"] == "TASK_RUNNING")
                .map(|t| (t["id"].as_str().unwrap_or("").to_owned(), t["ports"][0].as_u64().unwrap_or(0) as u16))
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// A subscriber to `GET /v2/events`: collects (event type, data JSON) in the background.
pub struct EventStream {
    rx: std::sync::mpsc::Receiver<(String, Value)>,
    pub seen: Vec<(String, Value)>,
}

impl EventStream {
    pub fn open(node: &MeshNode, query: &str) -> EventStream {
        use std::io::Write;
        let mut s = std::net::TcpStream::connect(node.http).expect("connect for SSE");
        write!(s, "GET /v2/events{query} HTTP/1.1\r\nHost: {}\r\nAccept: text/event-stream\r\n\r\n", node.http)
            .expect("send SSE request");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut ty = String::new();
            for line in BufReader::new(s).lines().map_while(Result::ok) {
                if let Some(t) = line.strip_prefix("event:") {
                    ty = t.trim().to_owned();
                } else if let Some(d) = line.strip_prefix("data:") {
                    let v: Value = serde_json::from_str(d.trim()).unwrap_or(Value::Null);
                    if tx.send((ty.clone(), v)).is_err() {
                        return;
                    }
                }
            }
        });
        EventStream { rx, seen: Vec::new() }
    }

    /// Wait (with a deadline) for an event of `ty` matching `pred`.
    pub fn wait_for(&mut self, ty: &str, secs: u64, pred: impl Fn(&Value) -> bool) -> Value {
        if let Some((_, v)) = self.seen.iter().find(|(t, v)| t == ty && pred(v)) {
            return v.clone();
        }
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok((t, v)) => {
                    self.seen.push((t.clone(), v.clone()));
                    if t == ty && pred(&v) {
                        return v;
                    }
                }
                Err(_) => panic!(
                    "no {ty} event within {secs}s; saw {:?}",
                    self.seen.iter().map(|(t, _)| t).collect::<Vec<_>>()
                ),
            }
        }
    }
}

/// A `mesh server` of datacenter `dc` on `<net>.<i>` (node `server<i>`, RPC on port 8300, 200 ms
/// LAN and WAN probes), joining the WAN pool at `join_wan`, with `extra` arguments and `env`.
pub fn wan_server(
    net: &str,
    dir: &Path,
    i: u8,
    dc: &str,
    join_wan: Option<&str>,
    extra: &[&str],
    env: &[(&str, &str)],
) -> MeshNode {
    let (ip, rpc) = wan_addrs(net, i);
    let mut args = wan_args(&ip, &rpc, dc);
    args.extend(["--gossip-wan-probe-period", "200ms"]);
    if let Some(j) = join_wan {
        args.extend(["--join-wan", j]);
    }
    args.extend(extra);
    MeshNode::start_role_env("server", &ip, dir, port_range(), &format!("server{i}"), &args, env)
}

/// `<net>.<i>` and its RPC address (port 8300).
fn wan_addrs(net: &str, i: u8) -> (String, String) {
    let ip = format!("{net}.{i}");
    let rpc = format!("{ip}:8300");
    (ip, rpc)
}

/// The arguments every node of [`wan_server`] and [`wan_agent`] takes: its address, RPC
/// address, datacenter and 200 ms LAN probes.
fn wan_args<'a>(ip: &'a str, rpc: &'a str, dc: &'a str) -> Vec<&'a str> {
    vec!["--bind", ip, "--rpc", rpc, "--dc", dc, "--gossip-probe-period", "200ms"]
}

/// A `mesh agent` of datacenter `dc` on `<net>.<i>` (node `agent<i>`, the process runtime, no
/// registrator), joining the server at `<net>.<server>`, with `extra` arguments.
pub fn wan_agent(net: &str, dir: &Path, i: u8, dc: &str, server: u8, extra: &[&str]) -> MeshNode {
    let (ip, rpc) = wan_addrs(net, i);
    let join = format!("{net}.{server}:8301");
    let mut args = wan_args(&ip, &rpc, dc);
    args.extend(["--join", &join, "--runtime", "process", "--no-registrator"]);
    args.extend(extra);
    MeshNode::start_role("agent", &ip, dir, port_range(), &format!("agent{i}"), &args)
}

/// `dig` at `node`'s DNS server for `name`/`qtype` (one try, 10 s): the status (`NOERROR`,
/// `NXDOMAIN`, `SERVFAIL`, or `no answer`) and the answer records' data of that type, sorted.
pub fn dig(node: &MeshNode, name: &str, qtype: &str) -> (String, Vec<String>) {
    let out = Command::new("dig")
        .args([
            &format!("@{}", node.dns.ip()),
            "-p",
            &node.dns.port().to_string(),
            name,
            qtype,
            "+noall",
            "+comments",
            "+answer",
            "+time=10",
            "+tries=1",
        ])
        .output()
        .expect("dig (bind9-dnsutils) must be installed");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let status = text.split("status: ").nth(1).and_then(|s| s.split(',').next()).unwrap_or("no answer").to_owned();
    let mut answers: Vec<String> = text
        .lines()
        .filter(|l| !l.starts_with(';') && !l.trim().is_empty())
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 5 && f[3] == qtype).then(|| f[4..].join(" "))
        })
        .collect();
    answers.sort();
    (status, answers)
}
