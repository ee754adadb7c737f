//! The scale benchmark (issue 11): how the costs of a node grow with its size.
//!
//! Run `bash benches/scale/run.sh` (it installs etcd 3.4 from Debian and builds mesh with the
//! `memory-runtime` feature), or `cargo bench -p mesh-server --features memory-runtime --bench scale`.
//! Prints tables in Markdown:
//!
//! 1. In-memory tasks (`mesh dev --runtime memory`: tasks "run" without processes) at 1k, 10k and
//!    100k tasks (apps of 1,000 instances without ports, so not in the catalog), then 50 apps of
//!    one task with a port (`probe<i>`, in the catalog and DNS): idle CPU of the node, `POST /v2/apps`, KV PUT, `GET /v2/apps` and
//!    `/v1/health/service` latency (p50/p99), DNS queries/s (UDP, one client core), RSS and RSS per
//!    task, the state's size on disk and the last snapshot's time (from the node's log), and the
//!    restart time (SIGTERM to exit, start to ready on the same data dir).
//! 2. Placement: 1 x 10,000 in-memory tasks, from the POST to all in the catalog (DNS's source).
//! 3. Real processes (`sleep`): 1 x 1,000 and 100 x 10 instances from the POSTs to all in the
//!    catalog; shutdown (SIGTERM to exit) with 10,000 running tasks.
//! 4. KV writes against etcd 3.4 in the same run: both filled to 1,000,000 keys (100-byte values)
//!    at c=64; at 100, 10k, 100k and 1M keys, 2 s windows of PUTs of new keys at c=1, 16 and 64:
//!    writes/s, p50, p99 and the longest write (stall).
//!
//! Environment: `SCALE_SIZES` (default `1000,10000,100000`), `SCALE_KV_KEYS` (default 1,000,000),
//! `SCALE_REAL` (`0` skips the real-process part), `SCALE_REAL_SHUTDOWN` (tasks for the shutdown
//! run, default 10,000), `SCALE_REAL_DIR` (where that node's data dir and sandboxes go; default the
//! bench's temp dir), `ETCD` (the etcd binary; default `etcd` on PATH, skipped when missing).

use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// p-th percentile of `v` in ms (sorts it).
fn pct(v: &mut [Duration], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort();
    ms(v[((v.len() as f64 * p / 100.0) as usize).min(v.len() - 1)])
}

fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// utime + stime of a process, in clock ticks (100 per second on Linux).
fn cpu_ticks(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = s.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
}

fn dir_size(p: &Path) -> u64 {
    walk(p).into_iter().sum()
}

fn walk(p: &Path) -> Vec<u64> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(p) {
        for e in rd.flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => out.extend(walk(&e.path())),
                Ok(m) => out.push(m.len()),
                Err(_) => {}
            }
        }
    }
    out
}

struct Node {
    child: Child,
    pid: u32,
    http: SocketAddr,
    dns: SocketAddr,
    log: PathBuf,
    client: reqwest::Client,
}

impl Node {
    /// Starts `mesh dev` on `data` and waits for its ready line; returns it and the time it took.
    async fn start(data: &Path, runtime: &str, extra: &[&str]) -> (Node, Duration) {
        let log = data.with_extension("log");
        let logf = std::fs::OpenOptions::new().create(true).append(true).open(&log).unwrap();
        let started = Instant::now();
        let mut child = Command::new(env!("CARGO_BIN_EXE_mesh"))
            .args(["dev", "--http", "127.0.0.1:0", "--dns", "127.0.0.1:0", "--no-registrator"])
            .args(["--runtime", runtime, "--node", "scale", "--cpus", "100000", "--mem", "100000000"])
            .args(["--ports", "10000-60000"])
            .args(extra)
            .arg("--data-dir")
            .arg(data)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::from(logf))
            .kill_on_drop(true)
            .spawn()
            .expect("start mesh dev");
        let pid = child.id().unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let ready = loop {
            let l = lines.next_line().await.unwrap().expect("mesh dev exited before it was ready");
            if let Some(r) = l.strip_prefix("mesh dev ready: ") {
                break r.to_owned();
            }
        };
        let took = started.elapsed();
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let mut parts = ready.split_whitespace();
        let http = parts.next().unwrap()["http=".len()..].split(',').next().unwrap().parse().unwrap();
        let dns = parts.next().unwrap()["dns=".len()..].parse().unwrap();
        let client = reqwest::Client::builder().pool_max_idle_per_host(256).build().unwrap();
        (Node { child, pid, http, dns, log, client }, took)
    }

    /// SIGTERM and the time until the process has exited.
    async fn stop(mut self) -> Duration {
        let t = Instant::now();
        send_signal(self.pid, "TERM");
        let _ = tokio::time::timeout(Duration::from_secs(600), self.child.wait()).await;
        t.elapsed()
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.http, path)
    }

    async fn request(&self, method: reqwest::Method, path: &str, body: Option<String>) -> (u16, String) {
        let mut r = self.client.request(method, self.url(path));
        if let Some(b) = body {
            r = r.header("Content-Type", "application/json").body(b);
        }
        match r.send().await {
            Ok(resp) => {
                let s = resp.status().as_u16();
                (s, resp.text().await.unwrap_or_default())
            }
            Err(e) => (0, e.to_string()),
        }
    }

    async fn get_json(&self, path: &str) -> serde_json::Value {
        let (_, body) = self.request(reqwest::Method::GET, path, None).await;
        serde_json::from_str(&body).unwrap_or(serde_json::Value::Null)
    }

    /// Creates an app; with `port`, each task gets a host port (and so is in the catalog and
    /// DNS), without, it has none (the fill of the in-memory sizes: 100,000 tasks would not fit
    /// in the port range).
    async fn post_app(&self, id: &str, instances: usize, port: bool) -> Duration {
        let ports = if port { serde_json::json!([{"port": 0}]) } else { serde_json::json!([]) };
        let body = serde_json::json!({
            "id": id, "cmd": "sleep 100000", "cpus": 0.01, "mem": 8, "instances": instances,
            "portDefinitions": ports,
        });
        let t = Instant::now();
        let (s, text) = self.request(reqwest::Method::POST, "/v2/apps", Some(body.to_string())).await;
        assert!(s == 201 || s == 200, "POST /v2/apps {id}: {s} {text}");
        t.elapsed()
    }

    /// Running tasks over all apps.
    async fn running(&self) -> u64 {
        let v = self.get_json("/v2/apps").await;
        v["apps"].as_array().map(|a| a.iter().map(|x| x["tasksRunning"].as_u64().unwrap_or(0)).sum()).unwrap_or(0)
    }

    /// Instances of `service` in the catalog.
    async fn in_catalog(&self, service: &str) -> usize {
        self.get_json(&format!("/v1/catalog/service/{service}")).await.as_array().map_or(0, Vec::len)
    }

    /// Polls until `f` holds (every 20 ms, up to `limit`); the time it took, or None.
    async fn until<F, Fut>(&self, limit: Duration, mut f: F) -> Option<Duration>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let t = Instant::now();
        while t.elapsed() < limit {
            if f().await {
                return Some(t.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }

    /// The node's CPU use over `window`, in % of one core.
    async fn idle_cpu(&self, window: Duration) -> f64 {
        let (c0, t0) = (cpu_ticks(self.pid), Instant::now());
        tokio::time::sleep(window).await;
        (cpu_ticks(self.pid) - c0) as f64 / 100.0 / t0.elapsed().as_secs_f64() * 100.0
    }

    /// p50 and p99 (ms) of 300 sequential KV PUTs and of 200 sequential `POST /v2/apps` (one-task
    /// apps `/probe<i>` with a port).
    async fn write_latencies(&self) -> ((f64, f64), (f64, f64)) {
        let mut kv = sequential(300, |i| async move {
            self.request(reqwest::Method::PUT, &format!("/v1/kv/probe/{i}"), Some("x".repeat(100))).await;
        })
        .await;
        let mut post = sequential(200, |i| async move {
            self.post_app(&format!("/probe{i}"), 1, true).await;
        })
        .await;
        ((pct(&mut kv, 50.0), pct(&mut kv, 99.0)), (pct(&mut post, 50.0), pct(&mut post, 99.0)))
    }

    /// The last "snapshot" line of the node's log that carries a duration, as written.
    fn last_snapshot_line(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        text.lines()
            .rev()
            .find(|l| l.contains("snapshot") && (l.contains("ms") || l.contains("bytes")))
            .map(|l| l.split_once("snapshot").map(|(_, r)| format!("snapshot{r}")).unwrap_or_default())
            .unwrap_or_else(|| "-".into())
    }
}

/// `kill -SIG pid` through the kill(1) command (no unsafe code in the bench).
fn send_signal(pid: u32, sig: &str) {
    let _ = std::process::Command::new("kill").args([&format!("-{sig}"), &pid.to_string()]).status();
}

/// Latencies of `n` sequential requests made by `f(i)`.
async fn sequential<F, Fut>(n: usize, mut f: F) -> Vec<Duration>
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut v = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        f(i).await;
        v.push(t.elapsed());
    }
    v
}

/// A DNS A query for `name` with id `id`.
fn dns_query(id: u16, name: &str) -> Vec<u8> {
    let mut q = id.to_be_bytes().to_vec();
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.trim_end_matches('.').split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

/// DNS queries/s over UDP for `secs`, 16 queries in flight from one thread.
fn dns_rate(server: SocketAddr, name: &str, secs: f64) -> f64 {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.connect(server).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let mut buf = [0u8; 4096];
    let queries: Vec<Vec<u8>> = (0..16u16).map(|i| dns_query(i, name)).collect();
    for q in &queries {
        sock.send(q).unwrap();
    }
    let (t, mut answered) = (Instant::now(), 0u64);
    while t.elapsed().as_secs_f64() < secs {
        match sock.recv(&mut buf) {
            Ok(n) if n >= 2 => {
                answered += 1;
                let id = u16::from_be_bytes([buf[0], buf[1]]) as usize % 16;
                let _ = sock.send(&queries[id]);
            }
            _ => {
                for q in &queries {
                    let _ = sock.send(q);
                }
            }
        }
    }
    answered as f64 / t.elapsed().as_secs_f64()
}

/// One row set of the in-memory table.
struct SizeRow {
    tasks: usize,
    deploy: Duration,
    idle_cpu: f64,
    post_app: (f64, f64),
    kv_put: (f64, f64),
    get_apps: (f64, f64),
    health: (f64, f64),
    dns_qps: f64,
    rss_mib: f64,
    rss_per_task_kib: f64,
    state_mib: f64,
    snapshot: String,
    stop: Duration,
    restart: Duration,
}

async fn size_row(root: &Path, tasks: usize, base_rss: u64) -> SizeRow {
    let data = root.join(format!("mem-{tasks}"));
    let (node, _) = Node::start(&data, "memory", &[]).await;
    let apps = tasks.div_ceil(1000);
    for a in 0..apps {
        node.post_app(&format!("/fill{a}"), tasks / apps, false).await;
    }
    let deploy = node
        .until(Duration::from_secs(900), || async { node.running().await >= tasks as u64 })
        .await
        .expect("tasks running");
    // Let deployments end and the loop settle, then measure a quiet node.
    let _ = node
        .until(Duration::from_secs(60), || async { node.get_json("/v2/deployments").await == serde_json::json!([]) })
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle_cpu = node.idle_cpu(Duration::from_secs(10)).await;
    let (kv, post) = node.write_latencies().await;
    node.until(Duration::from_secs(60), || async { node.in_catalog("probe0").await == 1 })
        .await
        .expect("the probe app is in the catalog");
    let mut apps_get = sequential(20, |_| {
        let node = &node;
        async move {
            node.request(reqwest::Method::GET, "/v2/apps", None).await;
        }
    })
    .await;
    let mut health = sequential(200, |_| {
        let node = &node;
        async move {
            node.request(reqwest::Method::GET, "/v1/health/service/probe0", None).await;
        }
    })
    .await;
    let dns = node.dns;
    let dns_qps = tokio::task::spawn_blocking(move || dns_rate(dns, "probe0.service.mesh", 3.0)).await.unwrap();
    let rss = rss_kib(node.pid);
    let snapshot = node.last_snapshot_line();
    let state_mib = dir_size(&data) as f64 / 1048576.0 - dir_size(&data.join("sandboxes")) as f64 / 1048576.0;
    let stop = node.stop().await;
    let (node, restart) = Node::start(&data, "memory", &[]).await;
    let _ = node.stop().await;
    SizeRow {
        tasks,
        deploy,
        idle_cpu,
        post_app: post,
        kv_put: kv,
        get_apps: (pct(&mut apps_get, 50.0), pct(&mut apps_get, 99.0)),
        health: (pct(&mut health, 50.0), pct(&mut health, 99.0)),
        dns_qps,
        rss_mib: rss as f64 / 1024.0,
        rss_per_task_kib: rss.saturating_sub(base_rss) as f64 / tasks as f64,
        state_mib,
        snapshot,
        stop,
        restart,
    }
}

/// An empty node's RSS, and its POST / PUT latency (the baseline of the targets).
async fn empty_row(root: &Path) -> (u64, (f64, f64), (f64, f64), f64) {
    let (node, _) = Node::start(&root.join("empty"), "memory", &[]).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let base = rss_kib(node.pid);
    let idle = node.idle_cpu(Duration::from_secs(5)).await;
    let (kv, post) = node.write_latencies().await;
    node.stop().await;
    (base, post, kv, idle)
}

/// Deploys `apps` apps of `instances` each at once; the time until all are in the catalog.
async fn deploy_to_catalog(node: &Node, prefix: &str, apps: usize, instances: usize) -> Option<Duration> {
    let t = Instant::now();
    let names: Vec<String> = (0..apps).map(|a| format!("{prefix}{a}")).collect();
    let ids: Vec<String> = names.iter().map(|n| format!("/{n}")).collect();
    futures_util::future::join_all(ids.iter().map(|id| node.post_app(id, instances, true))).await;
    let left = Duration::from_secs(600);
    node.until(left, || async {
        // The Marathon view first (cheap), the catalog to confirm.
        if node.running().await < (apps * instances) as u64 {
            return false;
        }
        for n in &names {
            if node.in_catalog(n).await < instances {
                return false;
            }
        }
        true
    })
    .await?;
    Some(t.elapsed())
}

/// A KV server under test: mesh's Consul KV or etcd's v3 JSON gateway.
#[derive(Clone)]
struct Kv {
    name: &'static str,
    addr: SocketAddr,
    etcd: bool,
}

/// One keep-alive HTTP/1.1 connection written and read by hand, so the bench's own client costs
/// next to nothing and the servers are what is measured (through reqwest the client's share of
/// a c=1 write was about a third, and pulled both servers' rates toward the client's).
struct RawConn {
    stream: tokio::io::BufStream<tokio::net::TcpStream>,
    line: String,
}

impl RawConn {
    async fn open(addr: SocketAddr) -> std::io::Result<Self> {
        let s = tokio::net::TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        Ok(Self { stream: tokio::io::BufStream::new(s), line: String::new() })
    }

    /// Sends one request and reads the whole response; its status.
    async fn request(&mut self, method: &str, path: &str, body: &[u8]) -> std::io::Result<u16> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        self.stream.write_all(head.as_bytes()).await?;
        self.stream.write_all(body).await?;
        self.stream.flush().await?;
        let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned());
        self.line.clear();
        self.stream.read_line(&mut self.line).await?;
        let status: u16 =
            self.line.split_whitespace().nth(1).and_then(|s| s.parse().ok()).ok_or_else(|| bad("status"))?;
        let (mut length, mut chunked) = (0usize, false);
        loop {
            self.line.clear();
            if self.stream.read_line(&mut self.line).await? == 0 {
                return Err(bad("closed in the head"));
            }
            let l = self.line.trim_end();
            if l.is_empty() {
                break;
            }
            let (name, value) = l.split_once(':').unwrap_or((l, ""));
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse().map_err(|_| bad("content-length"))?;
            } else if name.eq_ignore_ascii_case("transfer-encoding") && value.to_ascii_lowercase().contains("chunked") {
                chunked = true;
            }
        }
        let mut sink = vec![0u8; length];
        if !chunked {
            self.stream.read_exact(&mut sink).await?;
            return Ok(status);
        }
        loop {
            self.line.clear();
            self.stream.read_line(&mut self.line).await?;
            let n = usize::from_str_radix(self.line.trim().split(';').next().unwrap_or(""), 16)
                .map_err(|_| bad("chunk"))?;
            sink.resize(n + 2, 0);
            self.stream.read_exact(&mut sink).await?;
            if n == 0 {
                return Ok(status);
            }
        }
    }
}

impl Kv {
    /// PUT of `k/<key>`; true on a 2xx.
    async fn put(&self, conn: &mut RawConn, key: u64, value: &str) -> bool {
        let r = if self.etcd {
            use base64::Engine;
            let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
            let body = format!(r#"{{"key":"{}","value":"{}"}}"#, b64(&format!("k/{key:08}")), b64(value));
            conn.request("POST", "/v3/kv/put", body.as_bytes()).await
        } else {
            conn.request("PUT", &format!("/v1/kv/k/{key:08}"), value.as_bytes()).await
        };
        matches!(r, Ok(s) if (200..300).contains(&s))
    }
}

/// PUTs of new keys from `next` at concurrency `c` (one connection each), until `until_key`
/// (fill) or for `secs`. Returns (writes/s, latencies).
async fn kv_load(kv: &Kv, next: &Arc<AtomicU64>, c: usize, until_key: Option<u64>, secs: f64) -> (f64, Vec<Duration>) {
    let value = "v".repeat(100);
    let stop = Arc::new(AtomicBool::new(false));
    let mut conns = Vec::with_capacity(c);
    for _ in 0..c {
        conns.push(RawConn::open(kv.addr).await.unwrap_or_else(|e| panic!("{}: connect: {e}", kv.name)));
    }
    let t = Instant::now();
    let mut workers = Vec::new();
    for mut conn in conns {
        let (kv, next, stop, value) = (kv.clone(), next.clone(), stop.clone(), value.clone());
        workers.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            loop {
                if stop.load(Ordering::Relaxed) || (until_key.is_none() && t.elapsed().as_secs_f64() >= secs) {
                    break;
                }
                let k = next.fetch_add(1, Ordering::Relaxed);
                if until_key.is_some_and(|u| k >= u) {
                    break;
                }
                let s = Instant::now();
                if !kv.put(&mut conn, k, &value).await {
                    stop.store(true, Ordering::Relaxed);
                    eprintln!("{}: a PUT failed at key {k}", kv.name);
                }
                lat.push(s.elapsed());
            }
            lat
        }));
    }
    let mut all = Vec::new();
    for w in workers {
        all.extend(w.await.unwrap());
    }
    (all.len() as f64 / t.elapsed().as_secs_f64(), all)
}

struct KvRow {
    keys: u64,
    c: usize,
    rate: [f64; 2],
    p50: [f64; 2],
    p99: [f64; 2],
    max: [f64; 2],
}

async fn kv_compare(root: &Path, max_keys: u64) -> Vec<KvRow> {
    let etcd_bin = std::env::var("ETCD").unwrap_or_else(|_| "etcd".into());
    let mut systems: Vec<(Kv, Option<Child>, Option<Node>)> = Vec::new();
    let (node, _) = Node::start(&root.join("kv"), "memory", &[]).await;
    let mesh = Kv { name: "mesh", addr: node.http, etcd: false };
    systems.push((mesh, None, Some(node)));
    let etcd_dir = root.join("etcd");
    let etcd = Command::new(&etcd_bin)
        .args(["--name", "bench", "--listen-client-urls", "http://127.0.0.1:23790"])
        .args(["--advertise-client-urls", "http://127.0.0.1:23790", "--listen-peer-urls", "http://127.0.0.1:23800"])
        .args(["--initial-advertise-peer-urls", "http://127.0.0.1:23800"])
        .args(["--initial-cluster", "bench=http://127.0.0.1:23800", "--quota-backend-bytes", "8589934592"])
        .arg("--data-dir")
        .arg(&etcd_dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn();
    match etcd {
        Ok(child) => {
            let kv = Kv { name: "etcd", addr: "127.0.0.1:23790".parse().unwrap(), etcd: true };
            let t = Instant::now();
            while !match RawConn::open(kv.addr).await {
                Ok(mut conn) => kv.put(&mut conn, u64::MAX, "ping").await,
                Err(_) => false,
            } {
                assert!(t.elapsed() < Duration::from_secs(30), "etcd did not start");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            systems.push((kv, Some(child), None));
        }
        Err(e) => eprintln!("etcd not run ({etcd_bin}: {e}); mesh only"),
    }
    let checkpoints: Vec<u64> = [100, 10_000, 100_000, 1_000_000].into_iter().filter(|k| *k <= max_keys).collect();
    let mut rows: Vec<KvRow> = Vec::new();
    // Fill keys: 0.. (the fill), measured windows write keys from 10^9 up (new keys each time).
    let window_keys = Arc::new(AtomicU64::new(1_000_000_000));
    let mut filled = vec![Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0))];
    for &cp in &checkpoints {
        for (i, (kv, _, _)) in systems.iter().enumerate() {
            let t = Instant::now();
            let (rate, _) = kv_load(kv, &filled[i], 64, Some(cp), 0.0).await;
            eprintln!("{}: filled to {cp} keys in {:.1} s ({rate:.0}/s)", kv.name, t.elapsed().as_secs_f64());
        }
        for c in [1usize, 16, 64] {
            let mut row =
                KvRow { keys: cp, c, rate: [f64::NAN; 2], p50: [f64::NAN; 2], p99: [f64::NAN; 2], max: [f64::NAN; 2] };
            for (i, (kv, _, _)) in systems.iter().enumerate() {
                let (rate, mut lat) = kv_load(kv, &window_keys, c, None, 2.0).await;
                row.rate[i] = rate;
                row.p50[i] = pct(&mut lat, 50.0);
                row.p99[i] = pct(&mut lat, 99.0);
                row.max[i] = pct(&mut lat, 100.0);
            }
            rows.push(row);
        }
    }
    filled.clear();
    for (_, child, node) in systems {
        if let Some(mut c) = child {
            let _ = c.kill().await;
        }
        if let Some(n) = node {
            n.stop().await;
        }
    }
    rows
}

fn main() {
    let _ = mesh_server::serve::raise_fd_limit();
    let sizes: Vec<usize> = std::env::var("SCALE_SIZES")
        .unwrap_or_else(|_| "1000,10000,100000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let kv_keys: u64 = env_or("SCALE_KV_KEYS", 1_000_000);
    let real = env_or("SCALE_REAL", 1) != 0;
    let shutdown_tasks: usize = env_or("SCALE_REAL_SHUTDOWN", 10_000);
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_owned();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    rt.block_on(async move {
        let (base_rss, base_post, base_kv, base_idle) = empty_row(&root).await;
        let mut rows = Vec::new();
        for &n in &sizes {
            eprintln!("in-memory tasks: {n}");
            rows.push(size_row(&root, n, base_rss).await);
        }
        println!("\n### In-memory tasks (`--runtime memory`)\n");
        let mut header = "| | empty |".to_owned();
        let mut rule = "|---|---:|".to_owned();
        for r in &rows {
            header += &format!(" {} tasks |", r.tasks);
            rule += "---:|";
        }
        println!("{header}\n{rule}");
        let line = |name: &str, empty: String, f: &dyn Fn(&SizeRow) -> String| {
            let mut l = format!("| {name} | {empty} |");
            for r in &rows {
                l += &format!(" {} |", f(r));
            }
            println!("{l}");
        };
        line("deploy: from the last POST to all running", "".into(), &|r| format!("{:.1} s", r.deploy.as_secs_f64()));
        line("idle CPU (% of a core)", format!("{base_idle:.2}"), &|r| format!("{:.2}", r.idle_cpu));
        line("`POST /v2/apps` p50 / p99 ms", format!("{:.2} / {:.2}", base_post.0, base_post.1), &|r| {
            format!("{:.2} / {:.2}", r.post_app.0, r.post_app.1)
        });
        line("KV PUT p50 / p99 ms", format!("{:.2} / {:.2}", base_kv.0, base_kv.1), &|r| {
            format!("{:.2} / {:.2}", r.kv_put.0, r.kv_put.1)
        });
        line("`GET /v2/apps` p50 / p99 ms", "".into(), &|r| format!("{:.1} / {:.1}", r.get_apps.0, r.get_apps.1));
        line("`GET /v1/health/service/x` p50 / p99 ms", "".into(), &|r| format!("{:.2} / {:.2}", r.health.0, r.health.1));
        line("DNS queries/s (one client thread)", "".into(), &|r| format!("{:.0}", r.dns_qps));
        line("RSS MiB", format!("{:.1}", base_rss as f64 / 1024.0), &|r| format!("{:.1}", r.rss_mib));
        line("RSS per task KiB", "".into(), &|r| format!("{:.1}", r.rss_per_task_kib));
        line("state on disk MiB", "".into(), &|r| format!("{:.1}", r.state_mib));
        line("stop (SIGTERM to exit)", "".into(), &|r| format!("{:.2} s", r.stop.as_secs_f64()));
        line("restart (start to ready)", "".into(), &|r| format!("{:.2} s", r.restart.as_secs_f64()));
        for r in &rows {
            println!("\nlast snapshot log line at {} tasks: {}", r.tasks, r.snapshot);
        }

        // Placement of one big in-memory app.
        let (node, _) = Node::start(&root.join("big"), "memory", &[]).await;
        let big = deploy_to_catalog(&node, "big", 1, 10_000).await;
        node.stop().await;
        println!("\n### Placement\n\n| case | POST to all in the catalog | target |\n|---|---:|---:|");
        println!("| 1 x 10,000 in-memory tasks | {} | ≤ 3 s |", big.map_or("timeout".into(), |d| format!("{:.2} s", d.as_secs_f64())));

        if real {
            // `SCALE_REAL_DIR`: where the real tasks' data dir (and sandboxes) go; the temp dir by default.
            let real_root = std::env::var("SCALE_REAL_DIR").map(PathBuf::from).unwrap_or_else(|_| root.clone());
            println!("| (real processes: data dir under {}) | | |", real_root.display());
            let (node, _) = Node::start(&real_root.join("real"), "process", &["--task-log-max-size", "0"]).await;
            let one = deploy_to_catalog(&node, "onek", 1, 1_000).await;
            println!("| 1 x 1,000 processes | {} | ≤ 2 s |", one.map_or("timeout".into(), |d| format!("{:.2} s", d.as_secs_f64())));
            for a in 0..1 {
                node.request(reqwest::Method::DELETE, &format!("/v2/apps/onek{a}"), None).await;
            }
            let _ = node.until(Duration::from_secs(300), || async { node.running().await == 0 }).await;
            let hundred = deploy_to_catalog(&node, "ten", 100, 10).await;
            println!("| 100 x 10 processes | {} | |", hundred.map_or("timeout".into(), |d| format!("{:.2} s", d.as_secs_f64())));
            let apps = shutdown_tasks.div_ceil(1000);
            for a in 0..100 {
                node.request(reqwest::Method::DELETE, &format!("/v2/apps/ten{a}"), None).await;
            }
            let _ = node.until(Duration::from_secs(300), || async { node.running().await == 0 }).await;
            for a in 0..apps {
                node.post_app(&format!("/many{a}"), shutdown_tasks / apps, false).await;
            }
            let up = node.until(Duration::from_secs(1200), || async { node.running().await >= shutdown_tasks as u64 }).await;
            let rss = rss_kib(node.pid);
            let stop = node.stop().await;
            println!(
                "\n| {shutdown_tasks} processes | started in | node RSS | shutdown (SIGTERM to exit, grace 3 s) | target |\n|---|---:|---:|---:|---:|"
            );
            println!(
                "| | {} | {:.0} MiB | {:.2} s | ≤ 8 s |",
                up.map_or("timeout".into(), |d| format!("{:.1} s", d.as_secs_f64())),
                rss as f64 / 1024.0,
                stop.as_secs_f64()
            );
        }

        if kv_keys > 0 {
            let rows = kv_compare(&root, kv_keys).await;
            println!("\n### KV writes, mesh against etcd 3.4 (100-byte values, new keys)\n");
            println!("| keys | c | mesh writes/s | etcd writes/s | mesh/etcd | p50 ms mesh / etcd | p99 ms mesh / etcd | longest ms mesh / etcd |");
            println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
            for r in rows {
                println!(
                    "| {} | {} | {:.0} | {:.0} | {:.2} | {:.2} / {:.2} | {:.2} / {:.2} | {:.1} / {:.1} |",
                    r.keys, r.c, r.rate[0], r.rate[1], r.rate[0] / r.rate[1], r.p50[0], r.p50[1], r.p99[0], r.p99[1], r.max[0], r.max[1]
                );
            }
        }
    });
}
