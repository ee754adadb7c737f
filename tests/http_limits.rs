//! HTTP connection limits and timeouts of a real `mesh dev` (crates/mesh-server/src/serve.rs):
//! total and per-client-IP connection limits, header (slowloris), idle and body timeouts, slow
//! SSE readers dropped with `event_stream_detached`, and long-polls that outlive every timeout.
//! Loopback addresses 127.0.0.x stand for different clients.

mod support;

use hickory_resolver::proto::rr::RecordType;
use serde_json::Value;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

fn ip(last: u8) -> IpAddr {
    IpAddr::from([127, 0, 0, last])
}

/// A TCP connection to `to` from the loopback address `from`.
async fn connect_from(from: IpAddr, to: SocketAddr) -> TcpStream {
    let s = TcpSocket::new_v4().expect("socket");
    s.bind(SocketAddr::new(from, 0)).expect("bind");
    s.connect(to).await.expect("connect")
}

/// Read one response (head and a Content-Length body): (status, body). `None` if the server
/// closed the connection first.
async fn read_response(s: &mut TcpStream) -> Option<(u16, String)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        match tokio::time::timeout(Duration::from_secs(20), s.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return None,
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Err(_) => panic!("no response within 20s"),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let status = head.split(' ').nth(1)?.parse().ok()?;
    let len: usize = head
        .lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().unwrap_or(0)))
        .unwrap_or(0);
    while buf.len() < head_end + len {
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    Some((status, String::from_utf8_lossy(&buf[head_end..]).to_string()))
}

async fn get(s: &mut TcpStream, path: &str) -> Option<(u16, String)> {
    let req = format!("GET {path} HTTP/1.1\r\nHost: mesh\r\n\r\n");
    s.write_all(req.as_bytes()).await.ok()?;
    read_response(s).await
}

/// How long until the server closes `s` (reads and discards anything it sends), at most `limit`.
async fn closed_within(s: &mut TcpStream, limit: Duration) -> Option<Duration> {
    let start = Instant::now();
    let mut chunk = [0u8; 4096];
    loop {
        let left = limit.checked_sub(start.elapsed())?;
        match tokio::time::timeout(left, s.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Some(start.elapsed()),
            Ok(Ok(_)) => {}
            Err(_) => return None,
        }
    }
}

/// Send a byte every 200 ms until the server closes `s`: how long that took (`None` if not
/// within `limit`).
async fn drip_until_closed(s: &mut TcpStream, limit: Duration) -> Option<Duration> {
    let start = Instant::now();
    let mut chunk = [0u8; 1024];
    while start.elapsed() < limit {
        if s.write_all(b"x").await.is_err() {
            return Some(start.elapsed());
        }
        match tokio::time::timeout(Duration::from_millis(200), s.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Some(start.elapsed()),
            _ => {}
        }
    }
    None
}

async fn dns_answers(node: &MeshNode) -> bool {
    let r = node.resolver(true);
    matches!(r.lookup("consul.service.mesh.", RecordType::A).await, Ok(l) if !l.answers().is_empty())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_per_client_and_total_limits_are_refused_while_the_others_answer() {
    let node = MeshNode::start(&[
        "--runtime",
        "process",
        "--no-registrator",
        "--http-max-conns",
        "5",
        "--http-max-conns-per-client",
        "3",
    ]);
    let to = node.http;
    // Three connections from 127.0.0.2: its whole share.
    let mut mine = Vec::new();
    for _ in 0..3 {
        mine.push(connect_from(ip(2), to).await);
    }
    // A fourth from the same client is refused with Consul's 429 ...
    let mut extra = connect_from(ip(2), to).await;
    let (status, body) = get(&mut extra, "/v2/apps").await.expect("an answer to the extra connection");
    assert_eq!(status, 429, "{body}");
    assert!(body.contains("too many concurrent connections"), "{body}");
    assert!(closed_within(&mut extra, Duration::from_secs(5)).await.is_some(), "the refused connection is closed");
    // ... while the client's admitted connections and other clients are answered.
    let (status, _) = get(&mut mine[0], "/v2/apps").await.expect("answer on an admitted connection");
    assert_eq!(status, 200);
    let mut other = connect_from(ip(3), to).await;
    assert_eq!(get(&mut other, "/v2/apps").await.expect("another client").0, 200);
    // Now 4 are open; a fifth (127.0.0.4) fills the node; a sixth (127.0.0.5) is over the total.
    let mut fifth = connect_from(ip(4), to).await;
    assert_eq!(get(&mut fifth, "/ping").await.expect("fifth").0, 200);
    let mut sixth = connect_from(ip(5), to).await;
    let (status, body) = get(&mut sixth, "/v2/apps").await.expect("an answer over the total");
    assert_eq!(status, 503, "{body}");
    // At the limit, the open connections still answer, and so does DNS over TCP.
    assert_eq!(get(&mut mine[1], "/v2/apps").await.expect("held connection").0, 200);
    assert_eq!(get(&mut other, "/v1/catalog/services").await.expect("held connection").0, 200);
    assert!(dns_answers(&node).await, "DNS over TCP answers while HTTP is at its limit");
    // Once connections close, new ones are admitted again.
    drop(mine);
    let mut again = eventually(10, "a new connection is admitted after others closed", || async {
        let mut s = connect_from(ip(2), to).await;
        matches!(get(&mut s, "/v2/apps").await, Some((200, _))).then_some(s)
    })
    .await;
    assert_eq!(get(&mut again, "/ping").await.expect("ping").0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_idle_and_slow_body_connections_are_closed() {
    let node = MeshNode::start(&[
        "--runtime",
        "process",
        "--no-registrator",
        "--http-header-timeout",
        "1s",
        "--http-idle-timeout",
        "3s",
        "--http-body-timeout",
        "1s",
    ]);
    let to = node.http;
    // Slowloris: half a request head, then a byte every 200 ms. Closed after the header timeout.
    let mut slow = connect_from(ip(1), to).await;
    slow.write_all(b"GET /v2/apps HTTP/1.1\r\nHost: mesh\r\nX-Slow: ").await.unwrap();
    let t = drip_until_closed(&mut slow, Duration::from_secs(8)).await.expect("a slowloris connection is closed");
    assert!(t < Duration::from_secs(3), "closed after {t:?}");

    // A connection that sends nothing at all: closed after the header timeout too.
    let mut silent = connect_from(ip(1), to).await;
    let t = closed_within(&mut silent, Duration::from_secs(6)).await.expect("a silent connection is closed");
    assert!(t < Duration::from_secs(4), "closed after {t:?}");

    // Keep-alive: idle longer than the header timeout is fine, up to the idle timeout.
    let mut keep = connect_from(ip(1), to).await;
    assert_eq!(get(&mut keep, "/v2/apps").await.expect("first request").0, 200);
    tokio::time::sleep(Duration::from_millis(1800)).await;
    assert_eq!(get(&mut keep, "/v2/apps").await.expect("a request after 1.8 s idle").0, 200);
    let t = closed_within(&mut keep, Duration::from_secs(8)).await.expect("an idle connection is closed");
    assert!(t >= Duration::from_millis(2500) && t < Duration::from_secs(6), "idle connection closed after {t:?}");

    // A body that is promised but arrives too slowly is cut off, and nothing is written.
    let mut body = connect_from(ip(1), to).await;
    body.write_all(b"PUT /v1/kv/slow HTTP/1.1\r\nHost: mesh\r\nContent-Length: 100\r\n\r\n0123456789").await.unwrap();
    let cut = drip_until_closed(&mut body, Duration::from_secs(8)).await.expect("a slow body is cut off");
    assert!(cut < Duration::from_secs(3), "cut off after {cut:?}");
    let client = reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();
    let r = client.get(node.url("/v1/kv/slow")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 404, "the slow body wrote nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocking_queries_and_event_streams_outlive_the_timeouts() {
    let node = MeshNode::start(&[
        "--runtime",
        "process",
        "--no-registrator",
        "--http-header-timeout",
        "1s",
        "--http-idle-timeout",
        "1s",
        "--http-body-timeout",
        "1s",
        "--http-write-timeout",
        "1s",
    ]);
    let to = node.http;
    let mut s = connect_from(ip(1), to).await;
    let (status, _) = get(&mut s, "/v1/kv/?recurse").await.expect("index");
    assert!(status == 200 || status == 404);
    let index = {
        let r = reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();
        let r = r.get(node.url("/v1/kv/?recurse")).send().await.unwrap();
        r.headers()["x-consul-index"].to_str().unwrap().to_owned()
    };
    let mut events = EventStream::open(&node, "");
    let started = Instant::now();
    let (status, _) = get(&mut s, &format!("/v1/kv/?recurse&index={index}&wait=4s")).await.expect("blocking query");
    assert!(status == 200 || status == 404, "{status}");
    assert!(started.elapsed() >= Duration::from_millis(3500), "the blocking query waited ({:?})", started.elapsed());
    // The event stream, silent all this time, is still attached: it sees a new event.
    let (status, _) = node.send("PUT", "/v2/apps/after-wait", Some(r#"{"cmd": "sleep 100", "instances": 0}"#)).await;
    assert!(status == 200 || status == 201, "{status}");
    events.wait_for("api_post_event", 10, |v| v["uri"] == "/v2/apps/after-wait");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_stream_client_that_never_reads_is_dropped_with_event_stream_detached() {
    let node = MeshNode::start(&["--runtime", "process", "--no-registrator", "--http-write-timeout", "1s"]);
    let mut watcher = EventStream::open(&node, "?event_type=event_stream_detached");
    // The stuck client: a tiny receive buffer, subscribes and never reads.
    let sock = TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(2048).unwrap();
    sock.bind(SocketAddr::new(ip(7), 0)).unwrap();
    let mut stuck = sock.connect(node.http).await.unwrap();
    stuck.write_all(b"GET /v2/events HTTP/1.1\r\nHost: mesh\r\nAccept: text/event-stream\r\n\r\n").await.unwrap();
    // Many large events: each app update carries the app definition (~32 KiB of labels).
    let labels: serde_json::Map<String, Value> =
        (0..32).map(|i| (format!("l{i}"), Value::String("x".repeat(1000)))).collect();
    let url = node.url("/v2/apps/big?force=true");
    let producer = tokio::spawn(async move {
        let client = reqwest::Client::new();
        for i in 0.. {
            let body = serde_json::json!({"cmd": format!("sleep {}", 100 + i), "instances": 0, "labels": labels});
            let _ = client.put(&url).json(&body).send().await;
        }
    });
    let detached = tokio::task::spawn_blocking(move || {
        watcher.wait_for("event_stream_detached", 90, |v| v["remoteAddress"] == "127.0.0.7")
    })
    .await
    .unwrap();
    producer.abort();
    assert_eq!(detached["eventType"], "event_stream_detached");
    drop(stuck);
}

/// Out of file descriptors, the node backs off instead of spinning, keeps its listener, and
/// answers again once connections close. It starts by raising its fd soft limit to the hard one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_fds_the_listener_backs_off_and_recovers() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let name = node_name(&data);
    // Soft limit 64, hard 160: the node must raise it to 160, then run out with ~150 connections
    // (the connection limit is set above what the fds allow).
    let mut child = std::process::Command::new("sh")
        .arg("-c")
        .arg(r#"ulimit -Sn 64 && ulimit -Hn 160 && exec "$@""#)
        .arg("sh")
        .arg(env!("CARGO_BIN_EXE_mesh"))
        .args(["dev", "--http", "127.0.0.1:0", "--dns", "127.0.0.1:0", "--node", &name, "--runtime", "process"])
        .args(["--no-registrator", "--http-max-conns", "10000", "--http-max-conns-per-client", "0", "--data-dir"])
        .arg(&data)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let child = Kill(child);
    let pid = child.0.id();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    let http: SocketAddr = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("http="))
        .and_then(|a| a.split(',').next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no ready line: {line:?}"));
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let files = limits.lines().find(|l| l.starts_with("Max open files")).unwrap().to_owned();
    assert_eq!(files.split_whitespace().nth(3), Some("160"), "soft limit raised to the hard one: {files}");

    // 200 idle connections: more than the node has fds for.
    let mut held = Vec::new();
    for _ in 0..200 {
        held.push(connect_from(ip(1), http).await);
    }
    let fds = || std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0);
    eventually(10, "the node to run out of fds", || async { (fds() >= 155).then_some(()) }).await;
    // It backs off rather than spinning on EMFILE: little CPU while out of fds.
    let cpu = || {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let f: Vec<u64> =
            stat.rsplit(')').next().unwrap().split_whitespace().skip(11).take(2).map(|v| v.parse().unwrap()).collect();
        f[0] + f[1]
    };
    let before = cpu();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let ticks = cpu() - before;
    assert!(ticks < 50, "{ticks} CPU ticks (of 200) in 2 s while out of fds");
    // Once connections close, the same listener answers again.
    drop(held);
    eventually(20, "the node to answer again", || async {
        let mut s = connect_from(ip(2), http).await;
        matches!(get(&mut s, "/v2/apps").await, Some((200, _))).then_some(())
    })
    .await;
    drop(child);
}
