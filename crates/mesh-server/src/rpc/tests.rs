use super::*;
use tokio::io::AsyncWriteExt;

struct Echo;

#[async_trait::async_trait]
impl Handler for Echo {
    async fn call(&self, peer: &Peer, req: Request) -> Result<Response, RemoteError> {
        match req {
            Request::Echo(s) if s == "slow" => {
                tokio::time::sleep(Duration::from_secs(30)).await;
                Ok(Response::Echo(s))
            }
            Request::Echo(s) => Ok(Response::Echo(format!("{}:{s}", peer.hello.node))),
            other => Err(RemoteError::NotServed(other.name().into())),
        }
    }
    async fn open(&self, _peer: Peer, req: Request, sink: Sink) {
        let Request::Replicate { from } = req else { return sink.end(Some("no".into())) };
        for i in from.. {
            if !sink.send(Item::Heartbeat { index: i }).await {
                return;
            }
            if i == from + 9 {
                return;
            }
        }
    }
}

fn hello(node: &str, dc: &str) -> Hello {
    Hello { node: node.into(), node_id: format!("id-{node}"), datacenter: dc.into(), role: Role::Agent, http: None }
}

async fn tcp_server(dc: &str) -> Server {
    let t = TcpTransport::default();
    let l = t.listen("127.0.0.1:0".parse().unwrap()).await.unwrap();
    Server::start(l, hello("srv", dc), Arc::new(Echo)).unwrap()
}

#[tokio::test]
async fn calls_and_streams_share_one_tcp_connection() {
    let srv = tcp_server("dc1").await;
    let t = TcpTransport { bind: Some("127.0.0.2".parse().unwrap()) };
    let conn = Conn::connect(&t, srv.local_addr(), hello("a1", "dc1"), Arc::new(NoHandler)).await.unwrap();
    assert_eq!(conn.peer().hello.node, "srv");
    // Concurrent calls, answered out of order with the slow one in flight.
    let slow = conn.call(Request::Echo("slow".into()), Duration::from_millis(300));
    let mut fast = Vec::new();
    for i in 0..50 {
        fast.push(conn.call(Request::Echo(format!("{i}")), Duration::from_secs(5)));
    }
    let (slow, fast) = tokio::join!(slow, futures_util::future::join_all(fast));
    assert!(matches!(slow, Err(RpcError::Timeout(..))), "{slow:?}");
    for (i, r) in fast.into_iter().enumerate() {
        assert_eq!(r.unwrap(), Response::Echo(format!("a1:{i}")));
    }
    let mut s = conn.open(Request::Replicate { from: 5 }).await.unwrap();
    let mut got = Vec::new();
    while let Some(item) = s.next().await {
        got.push(item.unwrap());
    }
    assert_eq!(got, (5..15).map(|index| Item::Heartbeat { index }).collect::<Vec<_>>());
    // A request the peer does not serve is a clear error, not a hang.
    let r = conn.call(Request::Replicate { from: 0 }, Duration::from_secs(5)).await;
    assert_eq!(r, Err(RpcError::Remote(RemoteError::NotServed("Replicate".into()))));
}

#[tokio::test]
async fn memory_transport_carries_the_same_protocol() {
    let net = MemTransport::default();
    let addr: SocketAddr = "10.0.0.1:8300".parse().unwrap();
    let l = net.listen(addr).await.unwrap();
    let _srv = Server::start(l, hello("srv", "dc1"), Arc::new(Echo)).unwrap();
    let conn = Conn::connect(&net.at("10.0.0.2".parse().unwrap()), addr, hello("a2", "dc1"), Arc::new(NoHandler))
        .await
        .unwrap();
    assert_eq!(
        conn.call(Request::Echo("x".into()), Duration::from_secs(5)).await.unwrap(),
        Response::Echo("a2:x".into())
    );
    assert!(net.listen(addr).await.is_err(), "an address in use is refused");
}

#[tokio::test]
async fn another_datacenter_is_refused_on_both_sides() {
    let srv = tcp_server("dc1").await;
    let r = Conn::connect(&TcpTransport::default(), srv.local_addr(), hello("x", "dc2"), Arc::new(NoHandler)).await;
    match r {
        Err(RpcError::Refused(why)) => assert!(why.contains("datacenter dc2") && why.contains("dc1"), "{why}"),
        other => panic!("expected a refusal, got {:?}", other.map(|_| ())),
    }
}

#[tokio::test]
async fn an_unknown_major_version_and_garbage_are_refused_and_the_server_keeps_serving() {
    let srv = tcp_server("dc1").await;
    // A peer speaking version 2.0: it gets our preamble (so it can say which versions met) and
    // the connection ends.
    let mut s = tokio::net::TcpStream::connect(srv.local_addr()).await.unwrap();
    s.write_all(b"MESH\x00\x02\x00\x00").await.unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await.unwrap();
    assert_eq!(&buf[..8], b"MESH\x00\x01\x00\x02");
    assert_eq!(buf.len(), 8, "nothing after the preamble: refused");
    // The client side names the versions too.
    let err = check_preamble(&mut &b"MESH\x00\x02\x00\x01"[..], srv.local_addr()).await.unwrap_err();
    assert!(err.to_string().contains("version 2.1, this node 1.2"), "{err}");
    // Garbage instead of a preamble; then a good preamble and a frame of garbage; then a frame
    // that claims 4 GiB.
    for bytes in [
        &b"GET / HTTP/1.1\r\n\r\n"[..],
        b"MESH\x00\x01\x00\x00\x00\x00\x00\x03abc",
        b"MESH\x00\x01\x00\x00\xff\xff\xff\xff",
    ] {
        let mut s = tokio::net::TcpStream::connect(srv.local_addr()).await.unwrap();
        s.write_all(bytes).await.unwrap();
        let mut buf = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await.unwrap();
    }
    // Still serving.
    let conn = Conn::connect(&TcpTransport::default(), srv.local_addr(), hello("ok", "dc1"), Arc::new(NoHandler))
        .await
        .unwrap();
    assert_eq!(
        conn.call(Request::Echo("y".into()), Duration::from_secs(5)).await.unwrap(),
        Response::Echo("ok:y".into())
    );
}

#[tokio::test]
async fn dropping_the_last_handle_closes_the_connection_and_cancels_streams() {
    let srv = tcp_server("dc1").await;
    let conn = Conn::connect(&TcpTransport::default(), srv.local_addr(), hello("c", "dc1"), Arc::new(NoHandler))
        .await
        .unwrap();
    let watcher = conn.closed.clone();
    drop(conn);
    let mut w = watcher;
    tokio::time::timeout(Duration::from_secs(5), w.wait_for(|c| *c)).await.unwrap().unwrap();
    // A call on a closed connection fails at once.
    let conn = Conn::connect(&TcpTransport::default(), srv.local_addr(), hello("d", "dc1"), Arc::new(NoHandler))
        .await
        .unwrap();
    drop(srv);
    let r = conn.call(Request::Echo("z".into()), Duration::from_secs(5)).await;
    // The listener is gone but the accepted connection lives on until either side closes it.
    assert!(r.is_ok(), "{r:?}");
}

/// A frame of a later minor version: a call with a request this node does not know.
#[derive(Serialize)]
enum FutureFrame {
    Call { id: u64, timeout_ms: u64, req: FutureRequest },
}

#[derive(Serialize)]
enum FutureRequest {
    Teleport { to: String },
}

#[tokio::test]
async fn an_unknown_request_is_refused_and_the_connection_kept() {
    let srv = tcp_server("dc1").await;
    let s = tokio::net::TcpStream::connect(srv.local_addr()).await.unwrap();
    let (mut r, mut w) = tokio::io::split(s);
    write_preamble(&mut w).await.unwrap();
    assert_eq!(check_preamble(&mut r, srv.local_addr()).await.unwrap(), PROTO_MINOR);
    write_frame(&mut w, &Frame::Hello(hello("future", "dc1"))).await.unwrap();
    assert!(matches!(read_frame(&mut r).await.unwrap(), Frame::Hello(_)));
    let body = rmp_serde::to_vec_named(&FutureFrame::Call {
        id: 7,
        timeout_ms: 5000,
        req: FutureRequest::Teleport { to: "mars".into() },
    })
    .unwrap();
    w.write_all(&(body.len() as u32).to_be_bytes()).await.unwrap();
    w.write_all(&body).await.unwrap();
    write_frame(&mut w, &Frame::Call { id: 8, timeout_ms: 5000, req: Request::Echo("x".into()) }).await.unwrap();
    let mut answers = Vec::new();
    while answers.len() < 2 {
        match tokio::time::timeout(Duration::from_secs(5), read_frame(&mut r)).await.unwrap().unwrap() {
            Frame::Reply { id, res } => answers.push((id, res)),
            Frame::Ping => {}
            _ => panic!("unexpected frame"),
        }
    }
    assert!(matches!(&answers[0], (7, Err(RemoteError::NotServed(_)))), "{:?}", answers[0]);
    assert_eq!(answers[1], (8, Ok(Response::Echo("future:x".into()))));
}

#[test]
fn test_delays_parse_and_skip_bad_entries() {
    let d = parse_test_delays("127.0.0.3=40ms, 127.0.0.4=1s,bad,127.0.0.5=fast,=3ms");
    assert_eq!(d.len(), 2, "{d:?}");
    assert_eq!(d[&"127.0.0.3".parse::<std::net::IpAddr>().unwrap()], Duration::from_millis(40));
    assert_eq!(d[&"127.0.0.4".parse::<std::net::IpAddr>().unwrap()], Duration::from_secs(1));
}

#[tokio::test]
async fn a_delay_line_keeps_order_and_adds_the_delay() {
    let (tx, rx) = mpsc::channel(16);
    let mut out = delay_line(rx, Duration::from_millis(50));
    let started = tokio::time::Instant::now();
    for i in 0..5 {
        tx.send(Frame::Cancel { id: i }).await.unwrap();
    }
    for i in 0..5 {
        match out.recv().await.unwrap() {
            Frame::Cancel { id } => assert_eq!(id, i),
            _ => panic!("unexpected frame"),
        }
    }
    let took = started.elapsed();
    // Each waits its own 50 ms from when it was queued, not one after the other.
    assert!(took >= Duration::from_millis(50) && took < Duration::from_millis(200), "{took:?}");
}
