//! Consul-compatible DNS against real `mesh dev` processes and Marathon apps, asked with
//! hickory-resolver, raw hickory messages and `dig`: tags, SRV with glue, nodes, NXDOMAIN and NODATA
//! with the SOA, a critical instance left out, truncation with TC over UDP and everything over TCP,
//! Consul's truncation mode, recursors and REFUSED, PTR, the alternative domain, TTLs, and (through
//! the Consul API) `--dns-only-passing`, node meta TXT records and service-address PTR.
//!
//! `dig` comes from Debian's bind9-dnsutils (`.ci/run` installs it). Without it the dig halves print
//! `SKIP: dig not installed` and pass, unless `MESH_REQUIRE_DIG=1` or `MESH_REQUIRE_DOCKER=1` (as in
//! CI), where they fail.

mod support;

use hickory_resolver::proto::op::{Edns, Message, Query, ResponseCode};
use hickory_resolver::proto::rr::{Name, RData, Record, RecordType};
use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

/// Guards one exchange against a hang; never measured.
const DEADLINE: Duration = Duration::from_secs(10);

fn name(s: &str) -> Name {
    Name::from_ascii(s).unwrap()
}

/// A process app sleeping with one port; `labels` name its service and tags.
fn sleeper(id: &str, instances: u32, labels: Value) -> Value {
    json!({"id": id, "cmd": "exec sleep 600", "instances": instances, "cpus": 0.05, "mem": 16, "labels": labels})
}

async fn deploy(node: &MeshNode, app: Value) {
    let (s, v) = node.send("POST", "/v2/apps", Some(&app.to_string())).await;
    assert_eq!(s, 201, "{v}");
}

/// Waits until `app` runs `n` tasks; their ports.
async fn ports_of(node: &MeshNode, app: &str, n: usize) -> BTreeSet<u16> {
    eventually(60, &format!("{n} tasks of {app} running"), || async {
        let t = running_tasks(node, app).await;
        (t.len() == n).then(|| t.into_iter().map(|(_, p)| p).collect())
    })
    .await
}

fn query(qname: &str, qtype: RecordType, edns: Option<u16>) -> Message {
    let mut m = Message::query();
    m.metadata.id = rand_id();
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(name(qname), qtype));
    if let Some(payload) = edns {
        let mut e = Edns::new();
        e.set_max_payload(payload);
        m.set_edns(e);
    }
    m
}

/// hickory-resolver asking only `node`'s DNS (UDP only or TCP only; no cache, no hosts file).
fn resolver(node: &MeshNode, tcp: bool) -> hickory_resolver::TokioResolver {
    use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolveHosts, ResolverConfig};
    let mut conn = if tcp { ConnectionConfig::tcp() } else { ConnectionConfig::udp() };
    conn.port = node.dns.port();
    let ns = NameServerConfig::new(node.dns.ip(), true, vec![conn]);
    let mut b = hickory_resolver::TokioResolver::builder_with_config(
        ResolverConfig::from_name_servers(vec![ns]),
        hickory_resolver::net::runtime::TokioRuntimeProvider::default(),
    );
    let o = b.options_mut();
    (o.cache_size, o.timeout, o.attempts, o.use_hosts_file) = (0, Duration::from_secs(3), 2, ResolveHosts::Never);
    b.build().expect("resolver")
}

fn rand_id() -> u16 {
    (uuid::Uuid::new_v4().as_u128() & 0xffff) as u16
}

/// One raw exchange over UDP or TCP with `server`.
async fn exchange(server: SocketAddr, msg: &Message, tcp: bool) -> Message {
    let bytes = msg.to_vec().unwrap();
    let resp = if tcp {
        let mut stream = TcpStream::connect(server).await.unwrap();
        let mut framed = u16::try_from(bytes.len()).unwrap().to_be_bytes().to_vec();
        framed.extend_from_slice(&bytes);
        stream.write_all(&framed).await.unwrap();
        let read = async {
            let mut len = [0u8; 2];
            stream.read_exact(&mut len).await.unwrap();
            let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
            stream.read_exact(&mut buf).await.unwrap();
            Message::from_vec(&buf).unwrap()
        };
        tokio::time::timeout(DEADLINE, read).await.expect("no TCP answer")
    } else {
        let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        sock.send_to(&bytes, server).await.unwrap();
        let mut buf = vec![0u8; 65535];
        loop {
            let (n, _) =
                tokio::time::timeout(DEADLINE, sock.recv_from(&mut buf)).await.expect("no UDP answer").unwrap();
            assert!(n <= 512 || msg.edns.is_some(), "a {n}-byte UDP answer to a query without EDNS");
            let resp = Message::from_vec(&buf[..n]).unwrap();
            if resp.metadata.id == msg.metadata.id {
                break resp;
            }
        }
    };
    assert_eq!(resp.metadata.id, msg.metadata.id);
    resp
}

fn srv_ports(records: &[Record]) -> BTreeSet<u16> {
    records
        .iter()
        .filter_map(|r| match &r.data {
            RData::SRV(s) => Some(s.port),
            _ => None,
        })
        .collect()
}

fn srv_targets(records: &[Record]) -> BTreeSet<Name> {
    records
        .iter()
        .filter_map(|r| match &r.data {
            RData::SRV(s) => Some(s.target.clone()),
            _ => None,
        })
        .collect()
}

/// (owner, address) of the A records.
fn a_records(records: &[Record]) -> BTreeSet<(Name, String)> {
    records
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some((r.name.clone(), a.0.to_string())),
            _ => None,
        })
        .collect()
}

/// The SOA of a negative answer: (owner, mname, minimum, ttl).
fn soa(m: &Message) -> (Name, Name, u32, u32) {
    match &m.authorities[..] {
        [r] => match &r.data {
            RData::SOA(s) => (r.name.clone(), s.mname.clone(), s.minimum, r.ttl),
            other => panic!("not an SOA: {other:?}"),
        },
        other => panic!("authority: {other:?}"),
    }
}

/// Whether the dig halves run: dig is installed, or it is missing and not required (then skip).
fn have_dig() -> bool {
    if std::process::Command::new("dig").arg("-v").output().is_ok() {
        return true;
    }
    let required = ["MESH_REQUIRE_DIG", "MESH_REQUIRE_DOCKER"].iter().any(|v| std::env::var(v).as_deref() == Ok("1"));
    assert!(
        !required,
        "dig is required here (MESH_REQUIRE_DIG/MESH_REQUIRE_DOCKER=1) but not installed: apt-get install bind9-dnsutils"
    );
    eprintln!("SKIP: dig not installed");
    false
}

/// What dig printed, by section.
#[derive(Debug, Default)]
struct Dig {
    text: String,
    status: String,
    flags: BTreeSet<String>,
    /// (name, ttl, type, data) per section.
    answer: Vec<(String, u32, String, String)>,
    authority: Vec<(String, u32, String, String)>,
    additional: Vec<(String, u32, String, String)>,
}

impl Dig {
    fn types(&self, section: &[(String, u32, String, String)], t: &str) -> Vec<String> {
        section.iter().filter(|r| r.2 == t).map(|r| r.3.clone()).collect()
    }
}

async fn dig(server: SocketAddr, args: &[&str]) -> Dig {
    let out = tokio::process::Command::new("dig")
        .arg(format!("@{}", server.ip()))
        .args(["-p", &server.port().to_string(), "+time=3", "+tries=2"])
        .args(args)
        .output()
        .await
        .expect("run dig");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut d = Dig { text: text.clone(), ..Dig::default() };
    let mut section = "";
    for line in text.lines() {
        if let Some(rest) = line.split("status: ").nth(1) {
            d.status = rest.split(',').next().unwrap_or("").to_owned();
        }
        if let Some(rest) = line.strip_prefix(";; flags: ") {
            d.flags = rest.split(';').next().unwrap_or("").split_whitespace().map(str::to_owned).collect();
        }
        if line.starts_with(";; ") && line.ends_with(" SECTION:") {
            section = line.trim_start_matches(";; ").trim_end_matches(" SECTION:");
            continue;
        }
        if line.is_empty() {
            section = "";
            continue;
        }
        if line.starts_with(';') {
            continue;
        }
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 5 {
            continue;
        }
        let rec = (f[0].to_owned(), f[1].parse().unwrap_or(u32::MAX), f[3].to_owned(), f[4..].join(" "));
        match section {
            "ANSWER" => d.answer.push(rec),
            "AUTHORITY" => d.authority.push(rec),
            "ADDITIONAL" => d.additional.push(rec),
            _ => {}
        }
    }
    assert!(!d.status.is_empty(), "dig {args:?} got no answer:\n{text}");
    d
}

/// Ports of dig's SRV answers.
fn dig_srv_ports(d: &Dig) -> BTreeSet<u16> {
    d.types(&d.answer, "SRV").iter().map(|s| s.split_whitespace().nth(2).unwrap().parse().unwrap()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consul_answers_from_marathon_apps() {
    let node = MeshNode::start(&[
        "--runtime",
        "process",
        // Not a loopback address: resolvers answer PTR queries for 127/8 themselves (localhost).
        // Nothing connects to it (the tasks only sleep).
        "--advertise",
        "192.0.2.10",
        "--alt-domain",
        "Alt.Example.",
        "--dns-service-ttl",
        "web=30",
        "--dns-service-ttl",
        "mix*=7",
        "--dns-service-ttl",
        "*=5",
        "--dns-node-ttl",
        "11",
        "--dns-soa-min-ttl",
        "13",
    ]);
    deploy(&node, sleeper("/web-a", 1, json!({"SERVICE_NAME": "web", "SERVICE_TAGS": "primary"}))).await;
    deploy(&node, sleeper("/web-b", 2, json!({"SERVICE_NAME": "web", "SERVICE_TAGS": "backup,v2"}))).await;
    deploy(&node, sleeper("/mixed-ok", 1, json!({"SERVICE_NAME": "mixed"}))).await;
    // Critical for ever: its check always fails, and maxConsecutiveFailures 0 never kills it.
    let mut bad = sleeper("/mixed-bad", 1, json!({"SERVICE_NAME": "mixed"}));
    bad["healthChecks"] = json!([{"protocol": "COMMAND", "command": {"value": "exit 1"}, "gracePeriodSeconds": 0,
                                  "intervalSeconds": 1, "timeoutSeconds": 1, "maxConsecutiveFailures": 0}]);
    deploy(&node, bad).await;
    deploy(&node, sleeper("/other", 1, json!({}))).await;

    let primary = ports_of(&node, "/web-a", 1).await;
    let backup = ports_of(&node, "/web-b", 2).await;
    let web: BTreeSet<u16> = primary.union(&backup).copied().collect();
    let ok = ports_of(&node, "/mixed-ok", 1).await;
    let bad_port = ports_of(&node, "/mixed-bad", 1).await;
    // The bad task runs and has failed its check (more than once), yet is still running.
    eventually(30, "the bad task failed its health check twice", || async {
        let (_, v) = node.get("/v2/apps/mixed-bad/tasks").await;
        let t = &v["tasks"][0];
        let failed = t["healthCheckResults"][0]["consecutiveFailures"].as_u64().unwrap_or(0) >= 2;
        (t["state"] == "TASK_RUNNING" && t["healthCheckResults"][0]["alive"] == false && failed).then_some(())
    })
    .await;
    assert_eq!(ports_of(&node, "/mixed-bad", 1).await, bad_port, "never killed");
    let target = name(&format!("{}.node.dc1.mesh.", node.name));
    eventually(20, "every service in DNS", || async {
        let m = exchange(node.dns, &query("web.service.mesh.", RecordType::SRV, None), false).await;
        let o = exchange(node.dns, &query("other.service.mesh.", RecordType::SRV, None), false).await;
        (srv_ports(&m.answers) == web && o.answers.len() == 1).then_some(())
    })
    .await;

    // hickory-resolver, over UDP and TCP.
    for tcp in [false, true] {
        let r = resolver(&node, tcp);
        let ports = |v: Vec<(String, u16)>| v.into_iter().map(|(_, p)| p).collect::<BTreeSet<u16>>();
        assert_eq!(ports(srv(&r, "web.service.mesh.").await.unwrap()), web, "tcp={tcp}");
        assert_eq!(ports(srv(&r, "primary.web.service.mesh.").await.unwrap()), primary, "tcp={tcp}");
        assert_eq!(ports(srv(&r, "_web._backup.service.mesh.").await.unwrap()), backup, "tcp={tcp}");
        assert_eq!(ports(srv(&r, "V2.Web.Service.Dc1.Mesh.").await.unwrap()), backup, "tcp={tcp}");
        assert_eq!(ports(srv(&r, "_web._tcp.service.mesh.").await.unwrap()), web, "tcp={tcp}");
        assert_eq!(ports(srv(&r, "mixed.service.mesh.").await.unwrap()), ok, "critical left out, tcp={tcp}");
        assert!(srv(&r, "nope.web.service.mesh.").await.unwrap_err().is_nx_domain(), "tcp={tcp}");
        let a = r.lookup(format!("{}.node.mesh.", node.name), RecordType::A).await.unwrap();
        assert_eq!(a_records(a.answers()).into_iter().map(|(_, ip)| ip).collect::<Vec<_>>(), ["192.0.2.10"]);
        assert!(r.lookup("web.service.dc2.mesh.", RecordType::A).await.unwrap_err().is_nx_domain());
        assert!(r.lookup("nope.service.mesh.", RecordType::A).await.unwrap_err().is_nx_domain());
        let nodata = r.lookup("web.service.mesh.", RecordType::AAAA).await.unwrap_err();
        assert!(nodata.is_no_records_found() && !nodata.is_nx_domain(), "NODATA: {nodata:?}");
        let ptr = r.lookup("10.2.0.192.in-addr.arpa.", RecordType::PTR).await.unwrap();
        assert!(
            matches!(ptr.answers(), [rec] if rec.data == RData::PTR(hickory_resolver::proto::rr::rdata::PTR(target.clone()))),
            "{:?}",
            ptr.answers()
        );
        let alt = srv(&r, "web.service.alt.example.").await.unwrap();
        assert!(alt.iter().all(|(t, _)| *t == format!("{}.node.dc1.alt.example.", node.name)), "{alt:?}");
    }

    // The sections, over UDP and TCP.
    for tcp in [false, true] {
        let m = exchange(node.dns, &query("web.service.mesh.", RecordType::SRV, None), tcp).await;
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert!(m.metadata.authoritative && !m.metadata.recursion_available && !m.metadata.truncation);
        assert_eq!(srv_targets(&m.answers), [target.clone()].into());
        assert_eq!(a_records(&m.additionals), [(target.clone(), "192.0.2.10".to_owned())].into(), "glue");
        assert!(m.answers.iter().chain(&m.additionals).all(|r| r.ttl == 30), "web=30");
        let m = exchange(node.dns, &query("mixed.service.mesh.", RecordType::A, None), tcp).await;
        assert!(m.answers.len() == 1 && m.answers[0].ttl == 7, "mix*=7: {:?}", m.answers);
        let m = exchange(node.dns, &query("other.service.mesh.", RecordType::SRV, None), tcp).await;
        assert_eq!(m.answers[0].ttl, 5, "*=5");
        let m = exchange(node.dns, &query(&format!("{}.node.dc1.dc.mesh.", node.name), RecordType::A, None), tcp).await;
        assert_eq!((m.answers.len(), m.answers[0].ttl), (1, 11), "node TTL");

        // NXDOMAIN and NODATA, both with the SOA (TTL and minimum 13).
        for q in ["nope.service.mesh.", "web.service.dc2.mesh.", "ghost.node.mesh.", "mixed-bad.service.mesh."] {
            let m = exchange(node.dns, &query(q, RecordType::A, None), tcp).await;
            assert_eq!(m.metadata.response_code, ResponseCode::NXDomain, "{q}");
            assert!(m.metadata.authoritative && m.answers.is_empty(), "{q}");
            assert_eq!(soa(&m), (name("mesh."), name("ns.mesh."), 13, 13), "{q}");
        }
        for (q, t) in
            [("web.service.mesh.", RecordType::AAAA), ("web.service.mesh.", RecordType::TXT), ("mesh.", RecordType::A)]
        {
            let m = exchange(node.dns, &query(q, t, None), tcp).await;
            assert_eq!(m.metadata.response_code, ResponseCode::NoError, "{q} {t}");
            assert!(m.answers.is_empty(), "{q} {t}");
            assert_eq!(soa(&m).1, name("ns.mesh."), "{q} {t}");
        }

        // The apex: SOA, and NS naming this node with glue.
        let m = exchange(node.dns, &query("mesh.", RecordType::NS, None), tcp).await;
        assert!(
            matches!(&m.answers[..], [r] if r.data == RData::NS(hickory_resolver::proto::rr::rdata::NS(target.clone())))
        );
        assert_eq!(a_records(&m.additionals), [(target.clone(), "192.0.2.10".to_owned())].into());
        let m = exchange(node.dns, &query("MESH.", RecordType::SOA, None), tcp).await;
        assert!(matches!(&m.answers[..], [r] if matches!(&r.data, RData::SOA(s) if s.minimum == 13)));

        // The alternative domain: answers and SOA in it; PTR in the primary one.
        let m = exchange(node.dns, &query("web.service.alt.example.", RecordType::SRV, None), tcp).await;
        let alt_target = name(&format!("{}.node.dc1.alt.example.", node.name));
        assert_eq!(srv_targets(&m.answers), [alt_target.clone()].into());
        assert_eq!(a_records(&m.additionals), [(alt_target, "192.0.2.10".to_owned())].into());
        let m = exchange(node.dns, &query("nope.service.alt.example.", RecordType::A, None), tcp).await;
        assert_eq!(soa(&m).1, name("ns.alt.example."));
        let m = exchange(node.dns, &query("10.2.0.192.in-addr.arpa.", RecordType::PTR, None), tcp).await;
        assert!(
            matches!(&m.answers[..], [r] if r.ttl == 11 && r.data == RData::PTR(hickory_resolver::proto::rr::rdata::PTR(target.clone())))
        );
        // Unknown reverse names without a recursor: NXDOMAIN; other names: REFUSED.
        let m = exchange(node.dns, &query("9.9.9.9.in-addr.arpa.", RecordType::PTR, None), tcp).await;
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
        let m = exchange(node.dns, &query("example.com.", RecordType::A, None), tcp).await;
        assert_eq!(m.metadata.response_code, ResponseCode::Refused);
        assert!(!m.metadata.recursion_available);
    }

    if !have_dig() {
        return;
    }
    for transport in ["+notcp", "+tcp"] {
        let d = dig(node.dns, &[transport, "web.service.mesh", "SRV"]).await;
        assert!(d.status == "NOERROR" && d.flags.contains("aa") && !d.flags.contains("ra"), "{}", d.text);
        assert_eq!(dig_srv_ports(&d), web, "{}", d.text);
        assert_eq!(d.types(&d.additional, "A"), ["192.0.2.10"], "{}", d.text);
        assert!(d.answer.iter().all(|r| r.1 == 30 && r.3.ends_with(&format!(" {target}"))), "{}", d.text);
        let d = dig(node.dns, &[transport, "primary.web.service.mesh", "SRV"]).await;
        assert_eq!(dig_srv_ports(&d), primary, "{}", d.text);
        let d = dig(node.dns, &[transport, "_web._backup.service.mesh", "SRV"]).await;
        assert_eq!(dig_srv_ports(&d), backup, "{}", d.text);
        let d = dig(node.dns, &[transport, "mixed.service.mesh", "SRV"]).await;
        assert_eq!(dig_srv_ports(&d), ok, "critical left out: {}", d.text);
        let d = dig(node.dns, &[transport, &format!("{}.node.mesh", node.name), "A"]).await;
        assert_eq!(
            d.answer.iter().map(|r| (r.1, r.3.as_str())).collect::<Vec<_>>(),
            [(11, "192.0.2.10")],
            "{}",
            d.text
        );
        let d = dig(node.dns, &[transport, "nope.service.mesh", "A"]).await;
        assert_eq!(d.status, "NXDOMAIN", "{}", d.text);
        assert!(d.answer.is_empty() && d.types(&d.authority, "SOA").len() == 1, "{}", d.text);
        assert!(
            d.authority[0].3.starts_with("ns.mesh. hostmaster.mesh. ") && d.authority[0].3.ends_with(" 13"),
            "{}",
            d.text
        );
        let d = dig(node.dns, &[transport, "web.service.mesh", "AAAA"]).await;
        assert!(d.status == "NOERROR" && d.answer.is_empty() && d.types(&d.authority, "SOA").len() == 1, "{}", d.text);
        let d = dig(node.dns, &[transport, "-x", "192.0.2.10"]).await;
        assert_eq!(d.types(&d.answer, "PTR"), [target.to_string()], "{}", d.text);
        let d = dig(node.dns, &[transport, "web.service.alt.example", "SRV"]).await;
        assert!(d.answer.iter().all(|r| r.3.ends_with(".node.dc1.alt.example.")), "{}", d.text);
        let d = dig(node.dns, &[transport, "example.com", "A"]).await;
        assert_eq!(d.status, "REFUSED", "{}", d.text);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consul_registrations_only_passing_ptr_and_node_meta() {
    let node = MeshNode::start(&["--runtime", "process", "--no-registrator", "--dns-only-passing"]);
    let reg = |id: &str, port: u16, status: &str| {
        json!({"name": "pay", "id": id, "port": port, "check": {"ttl": "60s", "status": status}}).to_string()
    };
    for (id, port, status) in [("pay1", 7001, "passing"), ("pay2", 7002, "warning"), ("pay3", 7003, "critical")] {
        assert_eq!(node.send("PUT", "/v1/agent/service/register", Some(&reg(id, port, status))).await.0, 200);
    }
    let ext = json!({
        "Node": "ext1", "Address": "10.9.0.1", "NodeMeta": {"rack": "r1", "rfc1035-x": "bare"},
        "Service": {"Service": "db", "ID": "db1", "Address": "10.9.0.7", "Port": 5432},
    });
    assert_eq!(node.send("PUT", "/v1/catalog/register", Some(&ext.to_string())).await.0, 200);
    let ext_name = name("ext1.node.dc1.mesh.");
    let db_target = name("0a090007.addr.dc1.mesh.");

    for tcp in [false, true] {
        // Only passing instances: the one in warning is left out too.
        let m = exchange(node.dns, &query("pay.service.mesh.", RecordType::SRV, None), tcp).await;
        assert_eq!(srv_ports(&m.answers), [7001].into(), "tcp={tcp}");
        // An instance with its own address: an `.addr` target with the address as glue.
        let m = exchange(node.dns, &query("db.service.mesh.", RecordType::SRV, None), tcp).await;
        assert_eq!(srv_targets(&m.answers), [db_target.clone()].into());
        assert_eq!(a_records(&m.additionals), [(db_target.clone(), "10.9.0.7".to_owned())].into());
        // Node meta as RFC 1464 TXT: in Answer for TXT, in Additional for A.
        let txt = |records: &[Record]| -> BTreeSet<String> {
            records
                .iter()
                .filter_map(|r| match &r.data {
                    RData::TXT(t) => Some(t.to_string()),
                    _ => None,
                })
                .collect()
        };
        let meta: BTreeSet<String> = ["bare".to_owned(), "rack=r1".to_owned()].into();
        let m = exchange(node.dns, &query("ext1.node.mesh.", RecordType::TXT, None), tcp).await;
        assert_eq!(txt(&m.answers), meta, "tcp={tcp}");
        let m = exchange(node.dns, &query("ext1.node.mesh.", RecordType::A, None), tcp).await;
        assert_eq!(a_records(&m.answers), [(name("ext1.node.mesh."), "10.9.0.1".to_owned())].into());
        assert_eq!(txt(&m.additionals), meta, "tcp={tcp}");
        // PTR: the node's address names the node, the instance's address names the service.
        let m = exchange(node.dns, &query("1.0.9.10.in-addr.arpa.", RecordType::PTR, None), tcp).await;
        assert!(
            matches!(&m.answers[..], [r] if r.data == RData::PTR(hickory_resolver::proto::rr::rdata::PTR(ext_name.clone())))
        );
        let m = exchange(node.dns, &query("7.0.9.10.in-addr.arpa.", RecordType::PTR, None), tcp).await;
        let db = name("db.service.dc1.mesh.");
        assert!(
            matches!(&m.answers[..], [r] if r.data == RData::PTR(hickory_resolver::proto::rr::rdata::PTR(db.clone())))
        );
    }
    for tcp in [false, true] {
        let r = resolver(&node, tcp);
        let ptr = r.lookup("7.0.9.10.in-addr.arpa.", RecordType::PTR).await.unwrap();
        assert_eq!(ptr.answers().len(), 1);
        assert_eq!(srv(&r, "pay.service.mesh.").await.unwrap().len(), 1);
    }

    if !have_dig() {
        return;
    }
    for transport in ["+notcp", "+tcp"] {
        let d = dig(node.dns, &[transport, "pay.service.mesh", "SRV"]).await;
        assert_eq!(dig_srv_ports(&d), [7001].into(), "{}", d.text);
        let d = dig(node.dns, &[transport, "-x", "10.9.0.7"]).await;
        assert_eq!(d.types(&d.answer, "PTR"), ["db.service.dc1.mesh."], "{}", d.text);
        let d = dig(node.dns, &[transport, "-x", "10.9.0.1"]).await;
        assert_eq!(d.types(&d.answer, "PTR"), ["ext1.node.dc1.mesh."], "{}", d.text);
        let d = dig(node.dns, &[transport, "ext1.node.mesh", "TXT"]).await;
        let mut txt = d.types(&d.answer, "TXT");
        txt.sort();
        assert_eq!(txt, ["\"bare\"", "\"rack=r1\""], "{}", d.text);
        let d = dig(node.dns, &[transport, "ext1.node.mesh", "A"]).await;
        assert_eq!(d.types(&d.additional, "TXT").len(), 2, "{}", d.text);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_instances_truncated_over_udp_whole_over_tcp() {
    let node = MeshNode::start(&["--runtime", "process"]);
    let consul = MeshNode::start(&["--runtime", "process", "--dns-consul-truncation"]);
    deploy(&node, sleeper("/many", 20, json!({}))).await;
    deploy(&consul, sleeper("/few", 5, json!({}))).await;
    let ports = ports_of(&node, "/many", 20).await;
    let few = ports_of(&consul, "/few", 5).await;
    let target = name(&format!("{}.node.dc1.mesh.", node.name));
    eventually(20, "20 SRV records over TCP", || async {
        let m = exchange(node.dns, &query("many.service.mesh.", RecordType::SRV, None), true).await;
        (srv_ports(&m.answers) == ports).then_some(())
    })
    .await;
    eventually(20, "5 SRV records over TCP", || async {
        let m = exchange(consul.dns, &query("few.service.mesh.", RecordType::SRV, None), true).await;
        (srv_ports(&m.answers) == few).then_some(())
    })
    .await;

    // UDP without EDNS: what fits in 512 bytes, TC set, glue for the targets kept.
    let m = exchange(node.dns, &query("many.service.mesh.", RecordType::SRV, None), false).await;
    assert!(m.metadata.truncation && m.metadata.authoritative);
    assert!(!m.answers.is_empty() && m.answers.len() < 20, "{}", m.answers.len());
    assert_eq!(a_records(&m.additionals), [(target.clone(), "127.0.0.1".to_owned())].into());
    // TCP: all 20, with the glue.
    let m = exchange(node.dns, &query("many.service.mesh.", RecordType::SRV, None), true).await;
    assert!(!m.metadata.truncation);
    assert_eq!((srv_ports(&m.answers), m.answers.len()), (ports.clone(), 20));
    assert_eq!(a_records(&m.additionals), [(target.clone(), "127.0.0.1".to_owned())].into());
    // EDNS with room for everything: no truncation over UDP.
    let m = exchange(node.dns, &query("many.service.mesh.", RecordType::SRV, Some(4096)), false).await;
    assert!(!m.metadata.truncation && m.answers.len() == 20);
    // A resolver sees TC and retries over TCP: all 20.
    let all = srv(&resolver(&node, false), "many.service.mesh.").await.unwrap();
    assert_eq!(all.len(), 20);
    // Consul's mode: 3 answers, no TC.
    let m = exchange(consul.dns, &query("few.service.mesh.", RecordType::SRV, None), false).await;
    assert!(!m.metadata.truncation && m.answers.len() == 3, "{:?}", m.metadata);
    assert_eq!(m.additionals.len(), 1);

    if !have_dig() {
        return;
    }
    let d = dig(node.dns, &["+noedns", "+ignore", "many.service.mesh", "SRV"]).await;
    assert!(d.flags.contains("tc") && d.flags.contains("aa"), "{}", d.text);
    let kept = dig_srv_ports(&d);
    assert!(!kept.is_empty() && kept.len() < 20 && kept.is_subset(&ports), "{}", d.text);
    assert_eq!(d.types(&d.additional, "A"), ["127.0.0.1"], "{}", d.text);
    let d = dig(node.dns, &["+tcp", "many.service.mesh", "SRV"]).await;
    assert!(!d.flags.contains("tc"), "{}", d.text);
    assert_eq!((dig_srv_ports(&d), d.answer.len()), (ports.clone(), 20), "{}", d.text);
    assert_eq!(d.additional.iter().filter(|r| r.2 == "A" && r.0 == target.to_string()).count(), 1, "{}", d.text);
    // Without +ignore dig itself retries over TCP on TC.
    let d = dig(node.dns, &["+noedns", "many.service.mesh", "SRV"]).await;
    assert_eq!(d.answer.len(), 20, "{}", d.text);
    let d = dig(consul.dns, &["+noedns", "+ignore", "few.service.mesh", "SRV"]).await;
    assert!(!d.flags.contains("tc") && d.answer.len() == 3, "{}", d.text);
    let d = dig(consul.dns, &["+tcp", "few.service.mesh", "SRV"]).await;
    assert_eq!(dig_srv_ports(&d), few, "{}", d.text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recursors_forward_in_order_and_refuse_without() {
    // The upstream: another mesh with its own domain (and no recursor of its own).
    let upstream = MeshNode::start(&["--runtime", "process", "--domain", "up.example"]);
    // A recursor that never answers (a bound socket nobody reads), tried first.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let silent_addr = silent.local_addr().unwrap().to_string();
    let up_addr = upstream.dns.to_string();
    let node = MeshNode::start(&[
        "--runtime",
        "process",
        "--dns-recursor",
        &silent_addr,
        "--dns-recursor",
        &up_addr,
        "--dns-recursor-timeout",
        "300ms",
    ]);
    let up_node = format!("{}.node.up.example.", upstream.name);

    for tcp in [false, true] {
        // Forwarded: the upstream's answer, with `ra`.
        let m = exchange(node.dns, &query(&up_node, RecordType::A, None), tcp).await;
        assert_eq!(m.metadata.response_code, ResponseCode::NoError, "tcp={tcp}");
        assert!(m.metadata.recursion_available, "tcp={tcp}");
        assert_eq!(a_records(&m.answers), [(name(&up_node), "127.0.0.1".to_owned())].into(), "tcp={tcp}");
        // The upstream's NXDOMAIN is passed through, with its SOA.
        let m = exchange(node.dns, &query("nope.service.up.example.", RecordType::A, None), tcp).await;
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain, "tcp={tcp}");
        assert_eq!(soa(&m).1, name("ns.up.example."), "tcp={tcp}");
        // Reverse names we do not know are forwarded too (the upstream says NXDOMAIN).
        let m = exchange(node.dns, &query("9.9.9.9.in-addr.arpa.", RecordType::PTR, None), tcp).await;
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain, "tcp={tcp}");
        assert!(m.metadata.recursion_available);
        // Our own names are still ours, now with `ra`.
        let m = exchange(node.dns, &query(&format!("{}.node.mesh.", node.name), RecordType::A, None), tcp).await;
        assert!(m.metadata.authoritative && m.metadata.recursion_available && m.answers.len() == 1);
        // Every recursor fails (the upstream refuses names outside its domain): SERVFAIL.
        let m = exchange(node.dns, &query("example.com.", RecordType::A, None), tcp).await;
        assert_eq!(m.metadata.response_code, ResponseCode::ServFail, "tcp={tcp}");
        // The upstream itself has no recursor: REFUSED.
        let m = exchange(upstream.dns, &query("example.com.", RecordType::A, None), tcp).await;
        assert_eq!(m.metadata.response_code, ResponseCode::Refused, "tcp={tcp}");
        assert!(!m.metadata.recursion_available);
    }
    // hickory-resolver through the forwarding node.
    for tcp in [false, true] {
        let r = resolver(&node, tcp);
        let a = r.lookup(up_node.as_str(), RecordType::A).await.unwrap();
        assert_eq!(a_records(a.answers()).len(), 1);
        assert!(r.lookup("nope.node.up.example.", RecordType::A).await.unwrap_err().is_nx_domain());
    }
    drop(silent);

    if !have_dig() {
        return;
    }
    for transport in ["+notcp", "+tcp"] {
        let d = dig(node.dns, &[transport, &up_node, "A"]).await;
        assert!(d.status == "NOERROR" && d.flags.contains("ra"), "{}", d.text);
        assert_eq!(d.types(&d.answer, "A"), ["127.0.0.1"], "{}", d.text);
        let d = dig(node.dns, &[transport, "nope.service.up.example", "A"]).await;
        assert_eq!(d.status, "NXDOMAIN", "{}", d.text);
        let d = dig(node.dns, &[transport, "example.com", "A"]).await;
        assert_eq!(d.status, "SERVFAIL", "{}", d.text);
        let d = dig(upstream.dns, &[transport, "example.com", "A"]).await;
        assert!(d.status == "REFUSED" && !d.flags.contains("ra"), "{}", d.text);
    }
}
