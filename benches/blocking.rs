//! Blocking queries at scale (issue 5, item 3): thousands of parked watchers cost memory, not CPU.
//!
//! An in-process node (control loop on a memory log, the whole router on a loopback socket)
//! takes a stream of agent registrations of one service, `churn`, first with no watcher parked,
//! then with N watchers parked on `?index=` queries of N *other* services. For each run it prints
//! the registration latency (p50, p99) and the process CPU time per registration, and the ratio of
//! the parked run against the reference run measured in the same process. Then one change to a
//! watched service must wake exactly its watcher.
//!
//! Run: `cargo bench -p mesh-server --bench blocking` (N = 5,000; `BLOCKING_WATCHERS=n` to change).

use mesh_core::catalog::Node;
use mesh_core::state::{Command, MemLog, Store};
use mesh_server::api::{Api, NodeInfo, router};
use mesh_server::control::{ControlConfig, spawn};
use serde_json::json;
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

const CHANGES: usize = 400;

fn cpu_time() -> Duration {
    // utime + stime of this process, from /proc (clock ticks of 10 ms on Linux).
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or_default();
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = fields.get(11).and_then(|u| u.parse().ok()).unwrap_or(0)
        + fields.get(12).and_then(|s| s.parse().ok()).unwrap_or(0);
    Duration::from_millis(ticks * 10)
}

struct Run {
    p50: Duration,
    p99: Duration,
    cpu_per_change: Duration,
}

async fn churn(client: &reqwest::Client, base: &str, tag: &str) -> Run {
    let mut lat = Vec::with_capacity(CHANGES);
    let cpu0 = cpu_time();
    for i in 0..CHANGES {
        let body = json!({"Name": "churn", "ID": format!("churn-{tag}-{i}"), "Port": 1000 + (i % 50000)});
        let t = Instant::now();
        let r = client.put(format!("{base}/v1/agent/service/register")).body(body.to_string()).send().await.unwrap();
        assert_eq!(r.status(), 200);
        lat.push(t.elapsed());
    }
    let cpu = cpu_time() - cpu0;
    lat.sort();
    Run { p50: lat[lat.len() / 2], p99: lat[lat.len() * 99 / 100], cpu_per_change: cpu / CHANGES as u32 }
}

fn main() {
    let watchers: usize = std::env::var("BLOCKING_WATCHERS").ok().and_then(|v| v.parse().ok()).unwrap_or(5_000);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async move {
        let store = Store::open(Box::new(MemLog::default()), "dc1").unwrap();
        let (control, _join) = spawn(
            store,
            ControlConfig {
                datacenter: "dc1".into(),
                tick: Duration::from_secs(3600),
                seed: 1,
                mesos: Default::default(),
                ..Default::default()
            },
        );
        let node = Node {
            name: "bench".into(),
            address: IpAddr::V4(Ipv4Addr::LOCALHOST),
            datacenter: "dc1".into(),
            meta: BTreeMap::new(),
            create_index: 0,
            modify_index: 0,
            tagged_addresses: Default::default(),
        };
        let cmd = Command::Register {
            node: "bench".into(),
            node_info: Some(node),
            instance: None,
            checks: vec![],
            replace_checks: false,
        };
        control.propose(cmd).await.unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let info = NodeInfo {
            node: "bench".into(),
            datacenter: "dc1".into(),
            http_addr: addr.to_string(),
            domain: "mesh".into(),
            started_at: 0,
            host_access: Default::default(),
            enable_script_checks: false,
        };
        let app = router(Api::new(control.clone(), info));
        tokio::spawn(async move { axum::serve(listener, app).await });
        let base = format!("http://{addr}");
        let client = reqwest::Client::builder().pool_max_idle_per_host(4).build().unwrap();

        let reference = churn(&client, &base, "ref").await;

        // Park the watchers: one connection each, waiting on a service of its own.
        let woke = Arc::new(AtomicUsize::new(0));
        let watch_client = reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();
        let mut handles = Vec::with_capacity(watchers);
        for i in 0..watchers {
            let (c, b, woke) = (watch_client.clone(), base.clone(), woke.clone());
            handles.push(tokio::spawn(async move {
                let r = c.get(format!("{b}/v1/health/service/w-{i}?index=1&wait=10m")).send().await;
                if r.is_ok() {
                    woke.fetch_add(1, Ordering::SeqCst);
                }
            }));
        }
        let parked = Instant::now();
        while control.published.watches.topics() < watchers {
            assert!(parked.elapsed() < Duration::from_secs(120), "watchers did not park");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let rss = std::fs::read_to_string("/proc/self/status")
            .unwrap_or_default()
            .lines()
            .find(|l| l.starts_with("VmRSS"))
            .map(|l| l.split_whitespace().nth(1).unwrap_or("0").to_owned())
            .unwrap_or_default();

        let loaded = churn(&client, &base, "load").await;
        let spurious = woke.load(Ordering::SeqCst);

        // One change to a watched service wakes exactly its watcher.
        let body = json!({"Name": "w-17", "ID": "w-17", "Port": 1});
        client.put(format!("{base}/v1/agent/service/register")).body(body.to_string()).send().await.unwrap();
        let t = Instant::now();
        while woke.load(Ordering::SeqCst) < 1 && t.elapsed() < Duration::from_secs(10) {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let wake_latency = t.elapsed();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let woken_by_one = woke.load(Ordering::SeqCst);

        let ms = |d: Duration| format!("{:.3}", d.as_secs_f64() * 1000.0);
        println!("\nblocking queries: {CHANGES} registrations of `churn`, watchers parked on other services");
        println!("| run | watchers | p50 ms | p99 ms | CPU per change ms |");
        println!("|---|---|---|---|---|");
        println!(
            "| reference | 0 | {} | {} | {} |",
            ms(reference.p50),
            ms(reference.p99),
            ms(reference.cpu_per_change)
        );
        println!("| parked | {watchers} | {} | {} | {} |", ms(loaded.p50), ms(loaded.p99), ms(loaded.cpu_per_change));
        let ratio = |a: Duration, b: Duration| a.as_secs_f64() / b.as_secs_f64().max(1e-9);
        println!(
            "| ratio parked/reference | | {:.2} | {:.2} | {:.2} |",
            ratio(loaded.p50, reference.p50),
            ratio(loaded.p99, reference.p99),
            ratio(loaded.cpu_per_change, reference.cpu_per_change)
        );
        println!("process RSS with {watchers} parked watchers: {rss} kB");
        println!("watchers woken by the {CHANGES} unrelated changes: {spurious}");
        println!("watchers woken by one change to w-17: {woken_by_one} (after {} ms)", ms(wake_latency));
        assert_eq!(spurious, 0, "an unrelated change woke a watcher");
        assert_eq!(woken_by_one, 1, "one change must wake exactly its watcher");
        for h in handles {
            h.abort();
        }
    });
}
