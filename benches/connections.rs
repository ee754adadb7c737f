//! A connection flood against a release `mesh dev` (issue 10, item 7): 20,000 TCP connection
//! attempts to the HTTP port, from 100 loopback addresses (127.0.1.1-100, 200 each: Consul's
//! default per-client limit), each opened and left idle. Meanwhile a client that was connected
//! before asks `GET /v2/apps` and a DNS A query (UDP and TCP) every 20 ms.
//!
//! Prints: connections held at once by the node (its open fds, sampled every 50 ms), attempts
//! refused, `GET /v2/apps` and DNS p50/p99 during the flood, and the node's RSS before, at its peak
//! and after the connections were closed (by the header timeout) and the heap trimmed.
//!
//! Run: `cargo bench -p mesh-server --bench connections` (~1 min; raise the fd limit to 20,000+ if
//! needed: the bench raises its own soft limit to the hard one). `CONN_ATTEMPTS=n` changes 20,000.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpSocket, TcpStream, UdpSocket};

fn rss_mib(pid: u32) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

fn dns_query(id: u16) -> Vec<u8> {
    let mut q = id.to_be_bytes().to_vec();
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in ["consul", "service", "mesh"] {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

fn pct(v: &mut [Duration], p: usize) -> String {
    if v.is_empty() {
        return "-".into();
    }
    v.sort();
    format!("{:.2} ms", v[(v.len() * p / 100).min(v.len() - 1)].as_secs_f64() * 1000.0)
}

#[derive(Default)]
struct Probes {
    http: Vec<Duration>,
    udp: Vec<Duration>,
    tcp: Vec<Duration>,
    failures: usize,
}

async fn probe_loop(http: SocketAddr, dns: SocketAddr, stop: Arc<AtomicBool>) -> Probes {
    let mut p = Probes::default();
    let client = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();
    let url = format!("http://{http}/v2/apps");
    // Connected before the flood, as a running client is.
    client.get(&url).send().await.unwrap().bytes().await.unwrap();
    let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    udp.connect(dns).await.unwrap();
    let mut tcp = TcpStream::connect(dns).await.unwrap();
    let mut id = 0u16;
    while !stop.load(Ordering::Relaxed) {
        id = id.wrapping_add(1);
        let t = Instant::now();
        let ok = match client.get(&url).send().await {
            Ok(r) => r.status().is_success() && r.bytes().await.is_ok(),
            Err(_) => false,
        };
        if ok {
            p.http.push(t.elapsed())
        } else {
            p.failures += 1
        }
        let t = Instant::now();
        let mut buf = [0u8; 1500];
        let ok = udp.send(&dns_query(id)).await.is_ok()
            && matches!(tokio::time::timeout(Duration::from_secs(2), udp.recv(&mut buf)).await, Ok(Ok(n)) if n > 12);
        if ok {
            p.udp.push(t.elapsed())
        } else {
            p.failures += 1
        }
        let t = Instant::now();
        let q = dns_query(id);
        let mut framed = (q.len() as u16).to_be_bytes().to_vec();
        framed.extend_from_slice(&q);
        let ok = async {
            tcp.write_all(&framed).await.ok()?;
            let mut len = [0u8; 2];
            tcp.read_exact(&mut len).await.ok()?;
            let mut body = vec![0u8; u16::from_be_bytes(len) as usize];
            tcp.read_exact(&mut body).await.ok()
        };
        match tokio::time::timeout(Duration::from_secs(2), ok).await {
            Ok(Some(_)) => p.tcp.push(t.elapsed()),
            _ => {
                p.failures += 1;
                // The DNS TCP idle timeout (5 s) may have closed it: reconnect.
                if let Ok(s) = TcpStream::connect(dns).await {
                    tcp = s;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    p
}

fn main() {
    let fd_limit = mesh_server::serve::raise_fd_limit().unwrap_or(1024);
    let attempts: usize = std::env::var("CONN_ATTEMPTS").ok().and_then(|v| v.parse().ok()).unwrap_or(20_000);
    let tmp = tempfile::tempdir().unwrap();
    let node = format!("bench-conns-{}", std::process::id());
    let mut child = Command::new(env!("CARGO_BIN_EXE_mesh"))
        .args(["dev", "--http", "127.0.0.1:0", "--dns", "127.0.0.1:0", "--runtime", "process", "--no-registrator"])
        .args(["--node", &node, "--data-dir"])
        .arg(tmp.path().join("data"))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start mesh dev");
    let pid = child.id();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async move {
        let mut lines = BufReader::new(tokio::process::ChildStdout::from_std(child.stdout.take().unwrap()).unwrap()).lines();
        let ready = loop {
            let l = lines.next_line().await.unwrap().expect("mesh dev exited");
            if let Some(r) = l.strip_prefix("mesh dev ready: ") {
                break r.to_owned();
            }
        };
        let http: SocketAddr = ready.split_whitespace().next().unwrap()["http=".len()..].split(',').next().unwrap().parse().unwrap();
        let dns: SocketAddr = ready.split_whitespace().nth(1).unwrap()["dns=".len()..].parse().unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let rss_before = rss_mib(pid);
        let fds_before = open_fds(pid);
        println!("bench fd limit {fd_limit}; node pid {pid}: {fds_before} fds, RSS {rss_before:.1} MiB before");

        let stop = Arc::new(AtomicBool::new(false));
        let probes = tokio::spawn(probe_loop(http, dns, stop.clone()));
        tokio::time::sleep(Duration::from_millis(500)).await;

        // Sampler: the node's open fds and RSS.
        let sampling = Arc::new(AtomicBool::new(true));
        let sampler = {
            let sampling = sampling.clone();
            tokio::spawn(async move {
                let (mut peak_fds, mut peak_rss) = (0usize, 0f64);
                while sampling.load(Ordering::Relaxed) {
                    peak_fds = peak_fds.max(open_fds(pid));
                    peak_rss = peak_rss.max(rss_mib(pid));
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                (peak_fds, peak_rss)
            })
        };

        // The flood: idle connections, at most ~fd_limit - 500 of ours open at once.
        let budget = Arc::new(tokio::sync::Semaphore::new((fd_limit as usize).saturating_sub(500).min(attempts)));
        let (held, refused, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let flood_start = Instant::now();
        let mut tasks = Vec::with_capacity(attempts);
        for i in 0..attempts {
            let permit = budget.clone().acquire_owned().await.unwrap();
            let src = IpAddr::V4(Ipv4Addr::new(127, 0, 1, (i % 100) as u8 + 1));
            let (held, refused, failed) = (held.clone(), refused.clone(), failed.clone());
            tasks.push(tokio::spawn(async move {
                let _permit = permit;
                let s = TcpSocket::new_v4().unwrap();
                if s.bind(SocketAddr::new(src, 0)).is_err() {
                    failed.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                let Ok(mut s) = s.connect(http).await else {
                    failed.fetch_add(1, Ordering::Relaxed);
                    return;
                };
                // Idle until the node closes it: at once or after REFUSE_WITHIN when refused,
                // after the header timeout when held.
                let t = Instant::now();
                let mut buf = [0u8; 256];
                let closed = tokio::time::timeout(Duration::from_secs(30), s.read(&mut buf)).await.is_ok();
                if !closed {
                    // Never accepted: the kernel's accept queue was full when the handshake ended.
                    failed.fetch_add(1, Ordering::Relaxed);
                } else if t.elapsed() >= Duration::from_secs(5) {
                    held.fetch_add(1, Ordering::Relaxed);
                } else {
                    refused.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
        let flood_secs = flood_start.elapsed().as_secs_f64();
        for t in tasks {
            let _ = t.await;
        }
        let all_closed = flood_start.elapsed().as_secs_f64();
        stop.store(true, Ordering::Relaxed);
        let mut p = probes.await.unwrap();
        sampling.store(false, Ordering::Relaxed);
        let (peak_fds, peak_rss) = sampler.await.unwrap();
        // Let the node's trimmer (every 5 s) run.
        tokio::time::sleep(Duration::from_secs(7)).await;
        let rss_after = rss_mib(pid);
        println!(
            "{attempts} attempts in {flood_secs:.1} s; held idle, then closed by the node's header timeout: {}; refused (503/429 or closed): {}; never accepted (accept queue full) or connect failed: {}; done after {all_closed:.1} s",
            held.load(Ordering::Relaxed),
            refused.load(Ordering::Relaxed),
            failed.load(Ordering::Relaxed)
        );
        println!("node peak open fds: {peak_fds} (before {fds_before}; after {})", open_fds(pid));
        println!(
            "during the flood: GET /v2/apps p50 {} p99 {} ({} probes); DNS UDP p50 {} p99 {}; DNS TCP p50 {} p99 {}; probe failures {}",
            pct(&mut p.http, 50),
            pct(&mut p.http, 99),
            p.http.len(),
            pct(&mut p.udp, 50),
            pct(&mut p.udp, 99),
            pct(&mut p.tcp, 50),
            pct(&mut p.tcp, 99),
            p.failures
        );
        println!("node RSS: before {rss_before:.1} MiB, peak {peak_rss:.1} MiB, after {rss_after:.1} MiB");
        let _ = Command::new("kill").arg(pid.to_string()).status();
        let _ = child.wait();
    });
}
