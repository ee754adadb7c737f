//! The registrator against a real Docker engine and a real `mesh dev` process: containers
//! started by hand (`docker run -p ...`) appear in DNS with the host port Docker assigned, within
//! 2 s of `docker run` returning, and disappear within 2 s of `docker rm -f`; Registrator's
//! conventions (`SERVICE_NAME`, `SERVICE_IGNORE`, `<name>-<port>` for several ports) hold; a
//! restart of the node resyncs (containers started before it are registered, containers removed
//! while it was down are gone).
//!
//! Needs a Docker engine; without one every test prints `SKIP: no Docker engine answers` and
//! passes, unless `MESH_REQUIRE_DOCKER=1`, which makes them fail instead. The test image
//! `mesh-test/busybox:latest` is built by `scripts/build-test-images.sh` (idempotent).

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::{RData, RecordType};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The visibility requirement: a change is in DNS within this time of the docker command returning.
const VISIBLE_WITHIN: Duration = Duration::from_secs(2);
/// Deadline for polls that are not the visibility requirement (startup, HTTP server up).
const SETTLES_WITHIN: Duration = Duration::from_secs(20);
const IMAGE: &str = "mesh-test/busybox:latest";

/// Whether the Docker tests can run: Docker answers and the test image exists (built if needed).
/// Without an engine: skip, or fail when `MESH_REQUIRE_DOCKER=1`.
fn docker_ready() -> bool {
    static READY: OnceLock<bool> = OnceLock::new();
    *READY.get_or_init(|| {
        let answers = Command::new("docker")
            .args(["version", "--format", "{{.Server.Version}}"])
            .output()
            .is_ok_and(|o| o.status.success());
        if !answers {
            if std::env::var("MESH_REQUIRE_DOCKER").is_ok_and(|v| v == "1") {
                panic!("MESH_REQUIRE_DOCKER=1 but no Docker engine answers");
            }
            return false;
        }
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/build-test-images.sh");
        let out = Command::new("bash").arg(script).output().expect("run build-test-images.sh");
        assert!(
            out.status.success(),
            "{script} failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        true
    })
}

macro_rules! require_docker {
    () => {
        if !docker_ready() {
            println!("SKIP: no Docker engine answers");
            return;
        }
    };
}

/// Every node of this test binary gets its own host port range.
static NEXT_RANGE: AtomicU16 = AtomicU16::new(0);

fn port_range() -> (u16, u16) {
    let base = 40000 + (std::process::id() % 100) as u16 * 100;
    let lo = base + NEXT_RANGE.fetch_add(1, Ordering::SeqCst) * 10;
    (lo, lo + 9)
}

/// A `mesh dev` process (node `testnode`, process runtime) on ephemeral HTTP and DNS ports.
struct Node {
    child: Option<Child>,
    http: SocketAddr,
    dns: SocketAddr,
    log: PathBuf,
    client: reqwest::Client,
}

impl Node {
    /// Start a node on `data_dir` (which may hold the state of an earlier node).
    fn start_on(data_dir: &Path, ports: (u16, u16)) -> Node {
        let log = data_dir.with_extension("log");
        let log_file = std::fs::OpenOptions::new().create(true).append(true).open(&log).expect("log file");
        let mut child = Command::new(env!("CARGO_BIN_EXE_mesh"))
            .args(["dev", "--http", "127.0.0.1:0", "--dns", "127.0.0.1:0", "--node", "testnode"])
            .args(["--runtime", "process", "--cpus", "4", "--mem", "4096"])
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--ports")
            .arg(format!("{}-{}", ports.0, ports.1))
            .env("RUST_LOG", "info,mesh_server=debug")
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log_file))
            .spawn()
            .expect("spawn mesh");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("mesh dev did not become ready; log:\n{}", tail(&log)));
        let rest = line.strip_prefix("mesh dev ready: ").unwrap_or_else(|| panic!("unexpected first line {line:?}"));
        let (mut http, mut dns) = (None, None);
        for part in rest.split_whitespace() {
            if let Some(v) = part.strip_prefix("http=") {
                http = v.split(',').next().and_then(|s| s.parse().ok());
            }
            if let Some(v) = part.strip_prefix("dns=") {
                dns = v.parse().ok();
            }
        }
        Node {
            child: Some(child),
            http: http.expect("http addr"),
            dns: dns.expect("dns addr"),
            log,
            client: reqwest::Client::builder().timeout(Duration::from_secs(10)).build().expect("client"),
        }
    }

    /// GET a path of the HTTP API: status and JSON body.
    async fn get(&self, path: &str) -> (u16, serde_json::Value) {
        let r = self.client.get(format!("http://{}{path}", self.http)).send().await.expect("GET");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(serde_json::Value::Null))
    }

    /// Send `signal` to the node and wait for it to exit.
    fn stop_with(&mut self, signal: &str) {
        let Some(mut child) = self.child.take() else { return };
        let _ = Command::new("kill").args([&format!("-{signal}"), &child.id().to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(60);
        while !matches!(child.try_wait(), Ok(Some(_))) {
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("mesh did not exit after SIG{signal}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A resolver that asks only this node, over UDP, without caching.
    fn resolver(&self) -> TokioResolver {
        let mut conn = ConnectionConfig::udp();
        conn.port = self.dns.port();
        let ns = NameServerConfig::new(self.dns.ip(), true, vec![conn]);
        let mut b = TokioResolver::builder_with_config(
            ResolverConfig::from_name_servers(vec![ns]),
            TokioRuntimeProvider::default(),
        );
        b.options_mut().cache_size = 0;
        b.options_mut().timeout = Duration::from_secs(1);
        b.options_mut().attempts = 2;
        b.build().expect("resolver")
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- mesh log ({}) ----\n{}", self.log.display(), tail(&self.log));
        }
        self.stop_with("TERM");
    }
}

fn tail(path: &Path) -> String {
    let s = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(80)..].join("\n")
}

/// SRV answers for `name`: (target, port), or the resolver error (e.g. NXDOMAIN).
async fn srv(resolver: &TokioResolver, name: &str) -> Result<Vec<(String, u16)>, hickory_resolver::net::NetError> {
    let l = resolver.lookup(name, RecordType::SRV).await?;
    Ok(l.answers()
        .iter()
        .filter_map(|r| match &r.data {
            RData::SRV(s) => Some((s.target.to_string(), s.port)),
            _ => None,
        })
        .collect())
}

/// Whether an HTTP GET to 127.0.0.1:port answers 2xx.
async fn http_ok(port: u16) -> bool {
    let c = reqwest::Client::builder().timeout(Duration::from_secs(2)).build().expect("client");
    matches!(c.get(format!("http://127.0.0.1:{port}/")).send().await, Ok(r) if r.status().is_success())
}

/// A fresh node on a temporary data dir (kept alive by the returned guard).
fn start_node() -> (Node, tempfile::TempDir) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let node = Node::start_on(&tmp.path().join("data"), port_range());
    (node, tmp)
}

/// Runs the docker CLI; panics with its output when it fails.
fn docker(args: &[&str]) -> String {
    let out = Command::new("docker").args(args).output().expect("run docker");
    assert!(out.status.success(), "docker {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Removes the containers it was given when dropped, also when a test fails.
#[derive(Default)]
struct Containers(Mutex<Vec<String>>);

impl Containers {
    /// `docker run -d --name <name> <args...>`; returns the container id.
    fn run(&self, name: &str, args: &[&str]) -> String {
        let mut all = vec!["run", "-d", "--name", name];
        all.extend_from_slice(args);
        self.0.lock().unwrap().push(name.to_owned());
        docker(&all)
    }

    fn remove(&self, name: &str) {
        docker(&["rm", "-f", name]);
    }
}

impl Drop for Containers {
    fn drop(&mut self) {
        let names = std::mem::take(&mut *self.0.lock().unwrap());
        if !names.is_empty() {
            let _ = Command::new("docker").args(["rm", "-f"]).args(&names).output();
        }
    }
}

fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", &uuid::Uuid::new_v4().simple().to_string()[..10])
}

/// The host port Docker bound for `port` (`8080/tcp`) of a container.
fn host_port(container: &str, port: &str) -> u16 {
    let out = docker(&["port", container, port]);
    let first = out.lines().next().unwrap_or_default();
    first.rsplit(':').next().and_then(|p| p.trim().parse().ok()).unwrap_or_else(|| panic!("docker port said {out:?}"))
}

/// Polls `f` every 20 ms until it returns Some; panics once `limit` has passed since `since`.
async fn within<T, F, Fut>(since: Instant, limit: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(since.elapsed() <= limit, "not within {limit:?}: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn fqdn(service: &str) -> String {
    format!("{service}.service.mesh.")
}

/// SRV ports of `service`, once it resolves.
async fn resolves(node: &Node, service: &str) -> Option<Vec<u16>> {
    let r = node.resolver();
    srv(&r, &fqdn(service)).await.ok().map(|v| v.into_iter().map(|(_, p)| p).collect())
}

/// Whether `service` is NXDOMAIN (other errors, e.g. a timeout, are not).
async fn nxdomain(node: &Node, service: &str) -> bool {
    let r = node.resolver();
    matches!(srv(&r, &fqdn(service)).await, Err(e) if e.is_nx_domain())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_started_container_resolves_within_2s_and_a_removed_one_is_gone_within_2s() {
    require_docker!();
    let (node, _tmp) = start_node();
    let containers = Containers::default();
    let name = unique("reg-ext");
    let service = unique("ext");
    let env = format!("SERVICE_NAME={service}");
    containers.run(&name, &["-p", "8080", "-e", &env, IMAGE, "httpd", "-f", "-p", "8080", "-h", "/www"]);
    let started = Instant::now();
    let ports =
        within(started, VISIBLE_WITHIN, &format!("{service} in DNS after docker run"), || resolves(&node, &service))
            .await;
    eprintln!("{service} resolved {:?} after docker run returned", started.elapsed());
    let port = host_port(&name, "8080/tcp");
    assert_eq!(ports, [port], "the SRV port is the host port Docker assigned");

    // The catalog entry follows Registrator's conventions.
    let (status, body) = node.get(&format!("/v1/catalog/service/{service}")).await;
    assert_eq!(status, 200);
    let entry = &body[0];
    assert_eq!(entry["ServiceID"], format!("testnode:{name}:8080"), "{body}");
    assert_eq!(entry["Node"], "testnode");
    assert_eq!(entry["ServicePort"], port);

    // The instance answers HTTP through that port.
    within(Instant::now(), SETTLES_WITHIN, "the container answers HTTP on its host port", || async {
        http_ok(port).await.then_some(())
    })
    .await;

    containers.remove(&name);
    let removed = Instant::now();
    within(removed, VISIBLE_WITHIN, &format!("{service} NXDOMAIN after docker rm -f"), || async {
        nxdomain(&node, &service).await.then_some(())
    })
    .await;
    eprintln!("{service} NXDOMAIN {:?} after docker rm -f returned", removed.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ignored_and_mesh_task_containers_never_appear() {
    require_docker!();
    let (node, _tmp) = start_node();
    let containers = Containers::default();
    let ignored = unique("ign");
    let task_like = unique("task");
    let sentinel = unique("sent");
    let (e1, e2, e3) =
        (format!("SERVICE_NAME={ignored}"), format!("SERVICE_NAME={task_like}"), format!("SERVICE_NAME={sentinel}"));
    let sleep = ["sleep", "300"];
    let mut args = vec!["-p", "8080", "-e", &e1, "-e", "SERVICE_IGNORE=true", IMAGE];
    args.extend(sleep);
    containers.run(&unique("reg-ign"), &args);
    let mut args = vec!["-p", "8080", "-e", &e2, "--label", "mesh.task=not-really-a-task", IMAGE];
    args.extend(sleep);
    containers.run(&unique("reg-task"), &args);
    // Started last: once it resolves, the registrator has seen the two before it.
    let mut args = vec!["-p", "8080", "-e", &e3, IMAGE];
    args.extend(sleep);
    containers.run(&unique("reg-sent"), &args);
    let started = Instant::now();
    within(started, VISIBLE_WITHIN, "the sentinel container in DNS", || resolves(&node, &sentinel)).await;
    assert!(nxdomain(&node, &ignored).await, "SERVICE_IGNORE container was registered");
    assert!(nxdomain(&node, &task_like).await, "a mesh.task container was registered by the registrator");
    let (_, services) = node.get("/v1/catalog/services").await;
    let obj = services.as_object().expect("services object");
    assert!(!obj.contains_key(&ignored) && !obj.contains_key(&task_like), "{services}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_published_ports_give_name_dash_port_services() {
    require_docker!();
    let (node, _tmp) = start_node();
    let containers = Containers::default();
    let name = unique("reg-multi");
    let service = unique("multi");
    let env = format!("SERVICE_NAME={service}");
    containers.run(
        &name,
        &[
            "-p",
            "8080",
            "-p",
            "8081",
            "-e",
            &env,
            "-e",
            "SERVICE_TAGS=web,v1",
            IMAGE,
            "httpd",
            "-f",
            "-p",
            "8080",
            "-h",
            "/www",
        ],
    );
    let started = Instant::now();
    let s8080 = format!("{service}-8080");
    let s8081 = format!("{service}-8081");
    let p8080 = within(started, VISIBLE_WITHIN, "<name>-8080", || resolves(&node, &s8080)).await;
    let p8081 = within(started, VISIBLE_WITHIN, "<name>-8081", || resolves(&node, &s8081)).await;
    assert_eq!(p8080, [host_port(&name, "8080/tcp")]);
    assert_eq!(p8081, [host_port(&name, "8081/tcp")]);
    assert!(nxdomain(&node, &service).await, "no plain <name> service when two ports are published");
    // Tags from SERVICE_TAGS are queryable as <tag>.<service>.service.mesh.
    let r = node.resolver();
    let tagged = srv(&r, &format!("web.{s8080}.service.mesh.")).await.expect("tag lookup");
    assert_eq!(tagged.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_registers_earlier_containers_and_forgets_removed_ones() {
    require_docker!();
    let containers = Containers::default();
    let keep = unique("keep");
    let gone = unique("gone");
    let gone_container = unique("reg-gone");
    let (ek, eg) = (format!("SERVICE_NAME={keep}"), format!("SERVICE_NAME={gone}"));
    containers.run(&unique("reg-keep"), &["-p", "8080", "-e", &ek, IMAGE, "sleep", "300"]);
    containers.run(&gone_container, &["-p", "8080", "-e", &eg, IMAGE, "sleep", "300"]);

    // Started after the containers: the startup resync registers them.
    let tmp = tempfile::tempdir().expect("tempdir");
    let data_dir = tmp.path().join("data");
    let ports = port_range();
    let mut node = Node::start_on(&data_dir, ports);
    within(Instant::now(), SETTLES_WITHIN, "containers started before the node are registered", || async {
        (resolves(&node, &keep).await.is_some() && resolves(&node, &gone).await.is_some()).then_some(())
    })
    .await;

    // Kill the node hard, remove a container while it is down, start it again on the same state.
    node.stop_with("KILL");
    containers.remove(&gone_container);
    let node = Node::start_on(&data_dir, ports);
    within(Instant::now(), SETTLES_WITHIN, "the container removed while the node was down is gone", || async {
        nxdomain(&node, &gone).await.then_some(())
    })
    .await;
    assert!(resolves(&node, &keep).await.is_some(), "the container that still runs must stay registered");
}

/// `SERVICE_CHECK_*` attributes become Consul checks run by the agent: an HTTP check on a
/// container that serves passes, one on a container that does not serve stays critical and keeps
/// that instance out of DNS. (A TCP check would pass there: Docker's proxy accepts on the host
/// port whatever runs inside, as it does for Consul.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_check_attributes_become_checks_that_gate_dns() {
    require_docker!();
    let (node, _tmp) = start_node();
    let containers = Containers::default();
    let (good, bad) = (unique("reg-chk-ok"), unique("reg-chk-bad"));
    let (svc_ok, svc_bad) = (unique("chkok"), unique("chkbad"));
    let (e_ok, e_bad) = (format!("SERVICE_NAME={svc_ok}"), format!("SERVICE_NAME={svc_bad}"));
    containers.run(
        &good,
        &[
            "-p",
            "8080",
            "-e",
            &e_ok,
            "-e",
            "SERVICE_CHECK_HTTP=/",
            "-e",
            "SERVICE_CHECK_INTERVAL=1s",
            IMAGE,
            "httpd",
            "-f",
            "-p",
            "8080",
            "-h",
            "/www",
        ],
    );
    containers.run(
        &bad,
        &[
            "-p",
            "8080",
            "-e",
            &e_bad,
            "-e",
            "SERVICE_CHECK_HTTP=/",
            "-e",
            "SERVICE_CHECK_INTERVAL=1s",
            IMAGE,
            "sleep",
            "600",
        ],
    );
    let started = Instant::now();
    let limit = Duration::from_secs(30);
    let check = within(started, limit, "the HTTP check to pass", || async {
        let (_, v) = node.get(&format!("/v1/health/checks/{svc_ok}")).await;
        v.as_array()?.iter().find(|c| c["Type"] == "http" && c["Status"] == "passing").cloned()
    })
    .await;
    assert!(check["CheckID"].as_str().unwrap().starts_with("service:"), "{check}");
    assert_eq!(resolves(&node, &svc_ok).await.map(|p| p.len()), Some(1));
    // The other container is registered on its own engine event: wait for its check too, and
    // for it to have run at least once (its output says how it failed).
    let chk = within(started, limit, "the failing container's check to have run", || async {
        let (_, v) = node.get(&format!("/v1/health/checks/{svc_bad}")).await;
        v.as_array()?.first().filter(|c| !c["Output"].as_str().unwrap_or_default().is_empty()).cloned()
    })
    .await;
    assert_eq!((chk["Type"].as_str(), chk["Status"].as_str()), (Some("http"), Some("critical")), "{chk}");
    assert!(nxdomain(&node, &svc_bad).await, "a critical instance is not answered");
}
