//! The DNS server over loopback UDP and TCP: hickory-resolver, raw `Message` exchanges and `dig`
//! against a catalog in an `ArcSwap`, in process; plus SERVFAIL from a failing catalog source and
//! forwarding to an in-process upstream that truncates. `dig` is skipped when missing unless
//! `MESH_REQUIRE_DIG=1` or `MESH_REQUIRE_DOCKER=1` (CI), where its absence fails.

use arc_swap::ArcSwap;
use hickory_resolver::config::{NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::op::{Edns, Message, Query, ResponseCode};
use hickory_resolver::proto::rr::{Name, RData, Record, RecordType};
use hickory_resolver::{Resolver, TokioResolver};
use mesh_core::catalog::{CatalogState, Health, Node, ServiceInstance};
use mesh_core::dns::DnsConfig;
use mesh_server::dns::{CatalogSource, DnsError, DnsServer};
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

/// Deadline for one exchange: only guards against a hang, never measured.
const DEADLINE: Duration = Duration::from_secs(10);

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn name(s: &str) -> Name {
    Name::from_ascii(s).unwrap()
}

fn instance(id: &str, address: Option<&str>, port: u16, health: Health) -> ServiceInstance {
    ServiceInstance {
        id: id.into(),
        service: "web".into(),
        node: "host-1".into(),
        address: address.map(ip),
        port,
        tags: vec!["primary".into()],
        meta: BTreeMap::new(),
        health,
        source_health: Default::default(),
        weights: Default::default(),
        create_index: 0,
        modify_index: 0,
        extra: Default::default(),
    }
}

/// Node `host-1` (10.0.0.1) and service `web`: web-1 on the node's address (passing), web-2 at
/// 10.0.0.2 (warning), web-3 at 10.0.0.3 (critical, never answered).
fn catalog() -> CatalogState {
    let mut c = CatalogState::new("dc1");
    let node = Node {
        name: "host-1".into(),
        address: ip("10.0.0.1"),
        datacenter: "dc1".into(),
        meta: BTreeMap::new(),
        create_index: 0,
        modify_index: 0,
        tagged_addresses: Default::default(),
    };
    c.upsert_node(node, 1);
    c.upsert_instance(instance("web-1", None, 31001, Health::Passing), 2);
    c.upsert_instance(instance("web-2", Some("10.0.0.2"), 31002, Health::Warning), 3);
    c.upsert_instance(instance("web-3", Some("10.0.0.3"), 31003, Health::Critical), 4);
    c
}

/// UDP and TCP bound to the same free loopback port.
async fn bind() -> (UdpSocket, TcpListener) {
    for _ in 0..20 {
        let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let port = udp.local_addr().unwrap().port();
        if let Ok(tcp) = TcpListener::bind(("127.0.0.1", port)).await {
            return (udp, tcp);
        }
    }
    panic!("no port free for both UDP and TCP");
}

async fn start(catalog: Arc<ArcSwap<CatalogState>>) -> (DnsServer, SocketAddr) {
    start_with(catalog, DnsConfig::default()).await
}

async fn start_with(catalog: impl CatalogSource, config: DnsConfig) -> (DnsServer, SocketAddr) {
    let (udp, tcp) = bind().await;
    let server = DnsServer::start(udp, tcp, catalog, config).await.unwrap();
    assert_eq!(server.udp_addr(), server.tcp_addr());
    let addr = server.udp_addr();
    (server, addr)
}

/// A resolver talking to `addr` over UDP only or TCP only, without a cache.
fn resolver(addr: SocketAddr, tcp: bool) -> TokioResolver {
    let ip = addr.ip();
    let mut ns = if tcp { NameServerConfig::tcp(ip) } else { NameServerConfig::udp(ip) };
    for c in &mut ns.connections {
        c.port = addr.port();
    }
    let config = ResolverConfig::from_name_servers(vec![ns]);
    let mut b = Resolver::builder_with_config(config, TokioRuntimeProvider::default());
    let opts = b.options_mut();
    opts.cache_size = 0;
    opts.timeout = Duration::from_secs(2);
    opts.attempts = 3;
    b.build().unwrap()
}

fn a_ips(records: &[Record]) -> BTreeSet<IpAddr> {
    records
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            RData::AAAA(a) => Some(IpAddr::V6(a.0)),
            _ => None,
        })
        .collect()
}

fn srvs(records: &[Record]) -> BTreeSet<(u16, u16, u16, Name)> {
    records
        .iter()
        .filter_map(|r| match &r.data {
            RData::SRV(s) => Some((s.priority, s.weight, s.port, s.target.clone())),
            _ => None,
        })
        .collect()
}

fn query(qname: &str, qtype: RecordType, edns: Option<u16>) -> Message {
    let mut m = Message::query();
    m.add_query(Query::query(name(qname), qtype));
    if let Some(payload) = edns {
        let mut e = Edns::new();
        e.set_max_payload(payload);
        m.set_edns(e);
    }
    m
}

/// One raw exchange over UDP (from a fresh socket); the reply with the query's id.
async fn udp_exchange(server: SocketAddr, msg: &Message) -> Message {
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    sock.send_to(&msg.to_vec().unwrap(), server).await.unwrap();
    let mut buf = vec![0u8; 65535];
    loop {
        let (n, _) = tokio::time::timeout(DEADLINE, sock.recv_from(&mut buf)).await.expect("no UDP answer").unwrap();
        let resp = Message::from_vec(&buf[..n]).unwrap();
        if resp.metadata.id == msg.metadata.id {
            return resp;
        }
    }
}

async fn tcp_send(stream: &mut TcpStream, bytes: &[u8]) {
    let len = u16::try_from(bytes.len()).unwrap().to_be_bytes();
    stream.write_all(&len).await.unwrap();
    stream.write_all(bytes).await.unwrap();
}

async fn tcp_recv(stream: &mut TcpStream) -> Message {
    let read = async {
        let mut len = [0u8; 2];
        stream.read_exact(&mut len).await.unwrap();
        let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
        stream.read_exact(&mut buf).await.unwrap();
        Message::from_vec(&buf).unwrap()
    };
    tokio::time::timeout(DEADLINE, read).await.expect("no TCP answer")
}

/// One raw exchange over a fresh TCP connection.
async fn tcp_exchange(server: SocketAddr, msg: &Message) -> Message {
    let mut stream = TcpStream::connect(server).await.unwrap();
    tcp_send(&mut stream, &msg.to_vec().unwrap()).await;
    let resp = tcp_recv(&mut stream).await;
    assert_eq!(resp.metadata.id, msg.metadata.id);
    resp
}

async fn exchange(server: SocketAddr, msg: &Message, tcp: bool) -> Message {
    if tcp { tcp_exchange(server, msg).await } else { udp_exchange(server, msg).await }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resolver_over_udp_and_tcp() {
    let published = Arc::new(ArcSwap::from_pointee(catalog()));
    let (server, addr) = start(published.clone()).await;

    for tcp in [false, true] {
        let r = resolver(addr, tcp);
        let a = r.lookup("web.service.mesh.", RecordType::A).await.unwrap();
        assert_eq!(a_ips(a.answers()), [ip("10.0.0.1"), ip("10.0.0.2")].into(), "tcp={tcp}");

        // Case-insensitive.
        let a = r.lookup("WEB.Service.MeSh.", RecordType::A).await.unwrap();
        assert_eq!(a_ips(a.answers()), [ip("10.0.0.1"), ip("10.0.0.2")].into(), "tcp={tcp}");

        let srv = r.srv_lookup("_web._tcp.service.mesh.").await.unwrap();
        let ports: BTreeSet<u16> = srvs(srv.answers()).into_iter().map(|s| s.2).collect();
        assert_eq!(ports, [31001, 31002].into(), "tcp={tcp}");

        let node = r.lookup("host-1.node.dc1.mesh.", RecordType::A).await.unwrap();
        assert_eq!(a_ips(node.answers()), [ip("10.0.0.1")].into());

        let err = r.lookup("nope.service.mesh.", RecordType::A).await.unwrap_err();
        assert!(err.is_nx_domain(), "tcp={tcp}: {err:?}");
        let err = r.lookup("web.service.dc9.mesh.", RecordType::A).await.unwrap_err();
        assert!(err.is_nx_domain(), "tcp={tcp}: {err:?}");
    }

    // A new catalog is seen by the very next query.
    let mut next = catalog();
    next.upsert_instance(instance("web-4", Some("10.0.0.4"), 31004, Health::Passing), 10);
    next.upsert_instance(instance("web-2", Some("10.0.0.2"), 31002, Health::Critical), 11);
    published.store(Arc::new(next));
    for tcp in [false, true] {
        let a = resolver(addr, tcp).lookup("web.service.mesh.", RecordType::A).await.unwrap();
        assert_eq!(a_ips(a.answers()), [ip("10.0.0.1"), ip("10.0.0.4")].into(), "tcp={tcp}");
    }

    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_answers_have_consul_layout() {
    let published = Arc::new(ArcSwap::from_pointee(catalog()));
    let (server, addr) = start(published.clone()).await;

    for tcp in [false, true] {
        // SRV: ports, targets and the glue in Additional; authoritative; no EDNS asked, none sent.
        let resp = exchange(addr, &query("_Web._TCP.service.mesh.", RecordType::SRV, None), tcp).await;
        assert_eq!(resp.metadata.response_code, ResponseCode::NoError);
        assert!(resp.metadata.authoritative && !resp.metadata.truncation);
        assert!(resp.edns.is_none());
        assert_eq!(
            srvs(&resp.answers),
            [(1, 1, 31001, name("host-1.node.dc1.mesh.")), (1, 1, 31002, name("0a000002.addr.dc1.mesh."))].into()
        );
        let glue: BTreeSet<(Name, IpAddr)> = resp
            .additionals
            .iter()
            .filter_map(|r| a_ips(std::slice::from_ref(r)).into_iter().next().map(|ip| (r.name.clone(), ip)))
            .collect();
        assert_eq!(
            glue,
            [(name("host-1.node.dc1.mesh."), ip("10.0.0.1")), (name("0a000002.addr.dc1.mesh."), ip("10.0.0.2"))].into()
        );
        assert!(resp.answers.iter().chain(&resp.additionals).all(|r| r.ttl == 0));

        // NXDOMAIN with the SOA in Authority; EDNS mirrored.
        let resp = exchange(addr, &query("nope.service.mesh.", RecordType::A, Some(1232)), tcp).await;
        assert_eq!(resp.metadata.response_code, ResponseCode::NXDomain);
        assert!(resp.metadata.authoritative && resp.answers.is_empty());
        assert!(resp.edns.is_some(), "EDNS not mirrored");
        let [soa] = &resp.authorities[..] else { panic!("authority: {:?}", resp.authorities) };
        let RData::SOA(soa) = &soa.data else { panic!("not an SOA: {soa:?}") };
        assert_eq!((&soa.mname, &soa.rname), (&name("ns.mesh."), &name("hostmaster.mesh.")));
        assert_eq!((soa.refresh, soa.retry, soa.expire, soa.minimum), (3600, 600, 86400, 0));

        // NODATA: the name exists, not with that type.
        let resp = exchange(addr, &query("web.service.mesh.", RecordType::AAAA, None), tcp).await;
        assert_eq!(resp.metadata.response_code, ResponseCode::NoError);
        assert!(resp.answers.is_empty() && resp.authorities.len() == 1);

        // The apex SOA.
        let resp = exchange(addr, &query("mesh.", RecordType::SOA, None), tcp).await;
        assert!(matches!(&resp.answers[..], [r] if matches!(r.data, RData::SOA(_))));

        // Outside the domain: refused.
        let resp = exchange(addr, &query("example.com.", RecordType::A, None), tcp).await;
        assert_eq!(resp.metadata.response_code, ResponseCode::Refused);
        assert!(resp.answers.is_empty());
    }

    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edns_clients_get_large_udp_answers() {
    let mut c = catalog();
    for i in 0..60u16 {
        let addr = format!("10.1.{}.{}", i / 200, i % 200 + 1);
        c.upsert_instance(instance(&format!("big-{i}"), Some(&addr), 40000 + i, Health::Passing), 100 + u64::from(i));
    }
    let (server, addr) = start(Arc::new(ArcSwap::from_pointee(c))).await;

    // 62 A records do not fit 512 bytes: truncated, TC set, so clients retry over TCP.
    let plain = udp_exchange(addr, &query("web.service.mesh.", RecordType::A, None)).await;
    assert!(plain.metadata.truncation);
    assert!(plain.answers.len() < 62);
    // With EDNS they fit in one UDP answer.
    let edns = udp_exchange(addr, &query("web.service.mesh.", RecordType::A, Some(4096))).await;
    assert!(!edns.metadata.truncation);
    assert_eq!(edns.answers.len(), 62);
    assert_eq!(edns.edns.as_ref().map(Edns::max_payload), Some(4096));
    // TCP has no such limit.
    let tcp = tcp_exchange(addr, &query("web.service.mesh.", RecordType::A, None)).await;
    assert_eq!(tcp.answers.len(), 62);
    // And the resolver gets them all (EDNS or a TCP retry).
    let a = resolver(addr, false).lookup("web.service.mesh.", RecordType::A).await.unwrap();
    assert_eq!(a.answers().len(), 62);

    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_does_not_break_the_server() {
    let (server, addr) = start(Arc::new(ArcSwap::from_pointee(catalog()))).await;
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();

    // Too short for a header, random bytes, a query with a truncated question, a huge qdcount.
    sock.send_to(b"\x01\x02\x03", addr).await.unwrap();
    sock.send_to(&[0xffu8; 200], addr).await.unwrap();
    let bad_question = [0xbe, 0xef, 0x01, 0x00, 0x00, 0x01, 0, 0, 0, 0, 0, 0, 0x05, b'a', b'b'];
    sock.send_to(&bad_question, addr).await.unwrap();
    let many = [0xca, 0xfe, 0x01, 0x00, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0];
    sock.send_to(&many, addr).await.unwrap();
    // Two questions: FORMERR from our handler.
    let mut two = query("web.service.mesh.", RecordType::A, None);
    two.add_query(Query::query(name("host-1.node.mesh."), RecordType::A));
    two.metadata.id = 0x1234;
    sock.send_to(&two.to_vec().unwrap(), addr).await.unwrap();

    // The malformed messages with a readable header get FORMERR (in any order; the random 200 bytes
    // may get one too).
    let want: BTreeSet<u16> = [0xbeef, 0xcafe, 0x1234].into();
    let mut formerr = BTreeSet::new();
    let mut buf = vec![0u8; 65535];
    while !formerr.is_superset(&want) {
        let (n, _) = tokio::time::timeout(DEADLINE, sock.recv_from(&mut buf)).await.expect("no FORMERR").unwrap();
        if let Ok(resp) = Message::from_vec(&buf[..n])
            && resp.metadata.response_code == ResponseCode::FormErr
        {
            formerr.insert(resp.metadata.id);
        }
    }

    // A garbage TCP frame, then a fresh connection still works.
    let mut stream = TcpStream::connect(addr).await.unwrap();
    tcp_send(&mut stream, &[0xffu8; 40]).await;
    drop(stream);

    for tcp in [false, true] {
        let resp = exchange(addr, &query("web.service.mesh.", RecordType::A, None), tcp).await;
        assert_eq!(resp.metadata.response_code, ResponseCode::NoError);
        assert_eq!(a_ips(&resp.answers), [ip("10.0.0.1"), ip("10.0.0.2")].into());
    }

    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dig_answers() {
    let Ok(version) = tokio::process::Command::new("dig").arg("-v").output().await else {
        let required =
            ["MESH_REQUIRE_DIG", "MESH_REQUIRE_DOCKER"].iter().any(|v| std::env::var(v).as_deref() == Ok("1"));
        assert!(!required, "dig is required here (MESH_REQUIRE_DIG/MESH_REQUIRE_DOCKER=1) but not installed");
        eprintln!("SKIP: dig not installed");
        return;
    };
    eprintln!("dig: {}", String::from_utf8_lossy(&version.stderr).trim());
    let (server, addr) = start(Arc::new(ArcSwap::from_pointee(catalog()))).await;
    let dig = |args: &[&str]| {
        let mut cmd = tokio::process::Command::new("dig");
        cmd.arg(format!("@{}", addr.ip())).arg("-p").arg(addr.port().to_string());
        cmd.args(["+time=5", "+tries=2", "+norecurse"]).args(args);
        cmd
    };
    for transport in ["+notcp", "+tcp"] {
        let out = dig(&[transport, "+short", "web.service.mesh", "A"]).output().await.unwrap();
        let ips: BTreeSet<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with(';'))
            .map(str::to_owned)
            .collect();
        assert_eq!(ips, ["10.0.0.1".to_owned(), "10.0.0.2".to_owned()].into(), "{transport}");

        let out = dig(&[transport, "_web._tcp.service.mesh", "SRV"]).output().await.unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("status: NOERROR") && text.contains(" aa"), "{text}");
        assert!(text.contains("1 1 31001 host-1.node.dc1.mesh."), "{text}");
        assert!(text.contains("ADDITIONAL SECTION"), "{text}");

        let out = dig(&[transport, "nope.service.mesh", "A"]).output().await.unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("status: NXDOMAIN") && text.contains("hostmaster.mesh."), "{text}");
    }
    server.shutdown().await;
}

/// A catalog source that fails while `down` is set.
struct Flaky {
    catalog: Arc<ArcSwap<CatalogState>>,
    down: Arc<std::sync::atomic::AtomicBool>,
}

impl CatalogSource for Flaky {
    fn current(&self) -> Result<Arc<CatalogState>, DnsError> {
        if self.down.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(DnsError::Backend("no leader".into()));
        }
        Ok(self.catalog.load_full())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servfail_while_the_catalog_cannot_be_read() {
    let down = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let source = Flaky { catalog: Arc::new(ArcSwap::from_pointee(catalog())), down: down.clone() };
    let (server, addr) = start_with(source, DnsConfig::default()).await;
    for tcp in [false, true] {
        let resp = exchange(addr, &query("web.service.mesh.", RecordType::A, None), tcp).await;
        assert_eq!(resp.metadata.response_code, ResponseCode::ServFail, "tcp={tcp}");
        assert!(resp.answers.is_empty());
    }
    down.store(false, std::sync::atomic::Ordering::SeqCst);
    for tcp in [false, true] {
        let resp = exchange(addr, &query("web.service.mesh.", RecordType::A, None), tcp).await;
        assert_eq!(resp.metadata.response_code, ResponseCode::NoError, "tcp={tcp}");
        assert_eq!(a_ips(&resp.answers), [ip("10.0.0.1"), ip("10.0.0.2")].into());
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_retries_over_tcp_when_the_upstream_truncates() {
    // The upstream answers for `big.`: 300 SRV records, far more than a 4096-byte UDP answer holds.
    let mut c = CatalogState::new("dc1");
    for i in 0..300u16 {
        let addr = format!("10.2.{}.{}", i / 200, i % 200 + 1);
        c.upsert_instance(instance(&format!("big-{i}"), Some(&addr), 40000 + i, Health::Passing), u64::from(i) + 1);
    }
    let up_cfg = DnsConfig { domain: "big".into(), ..DnsConfig::default() };
    let (upstream, up_addr) = start_with(Arc::new(ArcSwap::from_pointee(c)), up_cfg).await;
    // Its own UDP answer to an EDNS 4096 query is truncated.
    let direct = udp_exchange(up_addr, &query("web.service.big.", RecordType::SRV, Some(4096))).await;
    assert!(direct.metadata.truncation && direct.answers.len() < 300);

    let cfg = DnsConfig { recursors: vec![up_addr], ..DnsConfig::default() };
    let (server, addr) = start_with(Arc::new(ArcSwap::from_pointee(catalog())), cfg).await;
    // A client with room for everything gets all 300, so we re-asked over TCP.
    let resp = udp_exchange(addr, &query("web.service.big.", RecordType::SRV, Some(65000))).await;
    assert_eq!(resp.metadata.response_code, ResponseCode::NoError);
    assert!(!resp.metadata.truncation && resp.metadata.recursion_available);
    assert_eq!(srvs(&resp.answers).len(), 300);
    assert_eq!(resp.additionals.len(), 300);
    let tcp = tcp_exchange(addr, &query("web.service.big.", RecordType::SRV, None)).await;
    assert_eq!(srvs(&tcp.answers).len(), 300);
    // Cut to the client's size, with TC and the glue re-synced.
    let small = udp_exchange(addr, &query("web.service.big.", RecordType::SRV, None)).await;
    assert!(small.metadata.truncation && !small.answers.is_empty() && small.answers.len() < 20);
    assert_eq!(small.additionals.len(), small.answers.len());
    let resolved = resolver(addr, true).srv_lookup("web.service.big.").await.unwrap();
    assert_eq!(resolved.answers().len(), 300);

    server.shutdown().await;
    upstream.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_skips_dead_recursors_and_fails_with_servfail() {
    let up_cfg = DnsConfig { domain: "up".into(), ..DnsConfig::default() };
    let (upstream, up_addr) = start_with(Arc::new(ArcSwap::from_pointee(catalog())), up_cfg).await;
    // One that never answers, one where nothing listens (refused), then the real one.
    let silent = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let closed = UdpSocket::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
    let cfg = DnsConfig {
        recursors: vec![silent.local_addr().unwrap(), closed, up_addr],
        recursor_timeout: Duration::from_millis(300),
        ..DnsConfig::default()
    };
    let (server, addr) = start_with(Arc::new(ArcSwap::from_pointee(catalog())), cfg).await;
    for tcp in [false, true] {
        let resp = exchange(addr, &query("host-1.node.up.", RecordType::A, None), tcp).await;
        assert_eq!(resp.metadata.response_code, ResponseCode::NoError, "tcp={tcp}");
        assert_eq!(a_ips(&resp.answers), [ip("10.0.0.1")].into());
        let resp = exchange(addr, &query("nope.service.up.", RecordType::A, None), tcp).await;
        assert_eq!(resp.metadata.response_code, ResponseCode::NXDomain, "tcp={tcp}");
        // Refused by the upstream, and nobody else answers: SERVFAIL.
        let resp = exchange(addr, &query("example.org.", RecordType::A, None), tcp).await;
        assert_eq!(resp.metadata.response_code, ResponseCode::ServFail, "tcp={tcp}");
        assert!(resp.metadata.recursion_available);
    }
    server.shutdown().await;
    upstream.shutdown().await;
}
