//! The load generator of `benches/raft/run.sh`: replicated KV writes against `mesh server`
//! (`PUT /v1/kv/bench/<n>`) or etcd's v3 JSON gateway (`POST /v3/kv/put`, base64 key and value),
//! the same client for both. One keep-alive HTTP/1.1 connection per worker, written and read by
//! hand on a single-threaded tokio runtime, so the client costs little and at most one core.
//!
//!   raft_loadgen mesh|etcd ADDR CONCURRENCY WARMUP_S DURATION_S [KEYS]
//!
//! Keys cycle over `KEYS` (default 100) names, values are 100 bytes. Prints `measuring` on stdout
//! when the warm-up ends (the driver samples CPU times then), and at the end one JSON line:
//! writes, errors, seconds, writes/s, p50/p99/max latency in ms of the measured writes.
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufStream};
use tokio::net::TcpStream;

struct Conn {
    addr: SocketAddr,
    stream: Option<BufStream<TcpStream>>,
    line: String,
    sink: Vec<u8>,
}

fn bad(what: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned())
}

impl Conn {
    /// Sends one prepared request (head and body) and reads the whole response; its status.
    /// Reconnects once the connection broke (the failed request counts as an error).
    async fn request(&mut self, req: &[u8]) -> std::io::Result<u16> {
        if self.stream.is_none() {
            let s = TcpStream::connect(self.addr).await?;
            s.set_nodelay(true)?;
            self.stream = Some(BufStream::new(s));
        }
        let r = self.exchange(req).await;
        if r.is_err() {
            self.stream = None;
        }
        r
    }

    async fn exchange(&mut self, req: &[u8]) -> std::io::Result<u16> {
        let Some(stream) = self.stream.as_mut() else { return Err(bad("not connected")) };
        stream.write_all(req).await?;
        stream.flush().await?;
        self.line.clear();
        if stream.read_line(&mut self.line).await? == 0 {
            return Err(bad("closed"));
        }
        let status: u16 =
            self.line.split_whitespace().nth(1).and_then(|s| s.parse().ok()).ok_or_else(|| bad("status"))?;
        let (mut length, mut chunked, mut close) = (0usize, false, false);
        loop {
            self.line.clear();
            if stream.read_line(&mut self.line).await? == 0 {
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
            } else if name.eq_ignore_ascii_case("connection") && value.trim().eq_ignore_ascii_case("close") {
                close = true;
            }
        }
        if !chunked {
            self.sink.resize(length, 0);
            stream.read_exact(&mut self.sink).await?;
        } else {
            loop {
                self.line.clear();
                stream.read_line(&mut self.line).await?;
                let n = usize::from_str_radix(self.line.trim().split(';').next().unwrap_or(""), 16)
                    .map_err(|_| bad("chunk"))?;
                self.sink.resize(n + 2, 0);
                stream.read_exact(&mut self.sink).await?;
                if n == 0 {
                    break;
                }
            }
        }
        if close {
            self.stream = None;
        }
        Ok(status)
    }
}

/// The complete request for each key.
fn requests(etcd: bool, keys: usize) -> Vec<Vec<u8>> {
    use base64::Engine;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    let value = "v".repeat(100);
    (0..keys)
        .map(|n| {
            let (method, path, body) = if etcd {
                let body = format!(r#"{{"key":"{}","value":"{}"}}"#, b64(&format!("bench/{n}")), b64(&value));
                ("POST", "/v3/kv/put".to_owned(), body)
            } else {
                ("PUT", format!("/v1/kv/bench/{n}"), value.clone())
            };
            let mut r = format!(
                "{method} {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                body.len()
            )
            .into_bytes();
            r.extend_from_slice(body.as_bytes());
            r
        })
        .collect()
}

fn usage() -> ! {
    eprintln!("usage: raft_loadgen mesh|etcd ADDR CONCURRENCY WARMUP_S DURATION_S [KEYS]");
    std::process::exit(2)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 5 {
        usage();
    }
    let etcd = match args[0].as_str() {
        "mesh" => false,
        "etcd" => true,
        _ => usage(),
    };
    let addr: SocketAddr = args[1].parse().unwrap_or_else(|_| usage());
    let c: usize = args[2].parse().unwrap_or_else(|_| usage());
    let warmup: f64 = args[3].parse().unwrap_or_else(|_| usage());
    let duration: f64 = args[4].parse().unwrap_or_else(|_| usage());
    let keys: usize = args.get(5).map(|k| k.parse().unwrap_or_else(|_| usage())).unwrap_or(100).max(1);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, run(etcd, addr, c, warmup, duration, keys));
}

async fn run(etcd: bool, addr: SocketAddr, c: usize, warmup: f64, duration: f64, keys: usize) {
    let reqs = Rc::new(requests(etcd, keys));
    let next = Rc::new(AtomicU64::new(0));
    let errors = Rc::new(AtomicU64::new(0));
    let t0 = Instant::now();
    let measure_from = t0 + Duration::from_secs_f64(warmup);
    let end = measure_from + Duration::from_secs_f64(duration);
    let mut workers = Vec::with_capacity(c);
    for _ in 0..c {
        let (reqs, next, errors) = (reqs.clone(), next.clone(), errors.clone());
        workers.push(tokio::task::spawn_local(async move {
            let mut conn = Conn { addr, stream: None, line: String::new(), sink: Vec::new() };
            // Latencies in microseconds of the writes that started inside the measured window.
            let mut lat: Vec<u32> = Vec::new();
            loop {
                let start = Instant::now();
                if start >= end {
                    break;
                }
                let k = next.fetch_add(1, Ordering::Relaxed) as usize % reqs.len();
                let ok = matches!(conn.request(&reqs[k]).await, Ok(s) if (200..300).contains(&s));
                if start < measure_from {
                    continue;
                }
                if ok {
                    lat.push(start.elapsed().as_micros().min(u32::MAX as u128) as u32);
                } else {
                    errors.fetch_add(1, Ordering::Relaxed);
                    // A refused or broken write: do not spin on it.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
            lat
        }));
    }
    tokio::time::sleep_until(measure_from.into()).await;
    println!("measuring");
    let mut all: Vec<u32> = Vec::new();
    for w in workers {
        all.extend(w.await.expect("worker"));
    }
    // Writes still in flight at `end` finish a little later; they are counted, and so is the
    // time they took.
    let secs = measure_from.elapsed().as_secs_f64();
    all.sort_unstable();
    let pct = |p: f64| {
        if all.is_empty() {
            return 0.0;
        }
        let i = ((all.len() as f64 * p).ceil() as usize).clamp(1, all.len()) - 1;
        all[i] as f64 / 1000.0
    };
    println!(
        r#"{{"writes":{},"errors":{},"secs":{:.3},"rate":{:.1},"p50_ms":{:.3},"p99_ms":{:.3},"max_ms":{:.3}}}"#,
        all.len(),
        errors.load(Ordering::Relaxed),
        secs,
        all.len() as f64 / secs,
        pct(0.50),
        pct(0.99),
        all.last().map_or(0.0, |&m| m as f64 / 1000.0)
    );
}
