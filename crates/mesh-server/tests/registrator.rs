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

use std::process::Command;
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

#[path = "../../../tests/support/mod.rs"]
mod support;

use support::{MeshNode, http_ok, port_range, srv};

/// The flags of every node here: the process runtime (containers come from `docker run`).
const NODE_FLAGS: &[&str] = &["--runtime", "process"];

/// A fresh node on a temporary data dir (kept alive by the returned guard).
fn start_node() -> (MeshNode, tempfile::TempDir) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let node = MeshNode::start_on(&tmp.path().join("data"), port_range(), NODE_FLAGS);
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
async fn resolves(node: &MeshNode, service: &str) -> Option<Vec<u16>> {
    let r = node.resolver(false);
    srv(&r, &fqdn(service)).await.ok().map(|v| v.into_iter().map(|(_, p)| p).collect())
}

/// Whether `service` is NXDOMAIN (other errors, e.g. a timeout, are not).
async fn nxdomain(node: &MeshNode, service: &str) -> bool {
    let r = node.resolver(false);
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
    assert_eq!(entry["ServiceID"], format!("{}:{name}:8080", node.name), "{body}");
    assert_eq!(entry["Node"], node.name.as_str());
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
    let r = node.resolver(false);
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
    let mut node = MeshNode::start_on(&data_dir, ports, NODE_FLAGS);
    within(Instant::now(), SETTLES_WITHIN, "containers started before the node are registered", || async {
        (resolves(&node, &keep).await.is_some() && resolves(&node, &gone).await.is_some()).then_some(())
    })
    .await;

    // Kill the node hard, remove a container while it is down, start it again on the same state.
    node.stop_with("KILL");
    containers.remove(&gone_container);
    let node = MeshNode::start_on(&data_dir, ports, NODE_FLAGS);
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

/// `SERVICE_CHECK_SCRIPT` obeys `--enable-script-checks` as the Consul API does. Without the flag
/// the script never runs: the check is registered critical and says why, and the host file the
/// script would write never appears. (The script only writes when its parent is this test's
/// node, so other nodes on the same engine cannot make the test pass or fail.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn script_checks_do_not_run_without_enable_script_checks() {
    require_docker!();
    let (node, tmp) = start_node();
    let containers = Containers::default();
    let (name, svc) = (unique("reg-script-off"), unique("scriptoff"));
    let marker = tmp.path().join("host-marker");
    let script = format!(
        "tr '\\0' ' ' < /proc/$PPID/cmdline | grep -q -- '{}' && id > {}; echo ran",
        node.name,
        marker.display()
    );
    let (e_name, l_script) = (format!("SERVICE_NAME={svc}"), format!("SERVICE_CHECK_SCRIPT={script}"));
    containers.run(
        &name,
        &["-p", "8080", "-e", &e_name, "-l", &l_script, "-l", "SERVICE_CHECK_INTERVAL=1s", IMAGE, "sleep", "600"],
    );
    let started = Instant::now();
    let check = within(started, Duration::from_secs(30), "the script check to report", || async {
        let (_, v) = node.get(&format!("/v1/health/checks/{svc}")).await;
        v.as_array()?.first().filter(|c| !c["Output"].as_str().unwrap_or_default().is_empty()).cloned()
    })
    .await;
    assert_eq!(check["Status"], "critical", "{check}");
    assert!(check["Output"].as_str().unwrap().contains("--enable-script-checks"), "{check}");
    // Several intervals later the script has still not run on the host.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (_, v) = node.get(&format!("/v1/health/checks/{svc}")).await;
    assert!(v[0]["Output"].as_str().unwrap().contains("--enable-script-checks"), "{v}");
    assert!(!marker.exists(), "the script ran on the host: {:?}", std::fs::read_to_string(&marker));
}

/// With `--enable-script-checks`, a `SERVICE_CHECK_SCRIPT` runs inside its container
/// (`docker exec`), as Registrator's convention has it: its `hostname` is the container's, a file
/// it writes is in the container, and exit code 1 means warning.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowed_script_checks_run_inside_the_container() {
    require_docker!();
    let tmp = tempfile::tempdir().expect("tempdir");
    let node =
        MeshNode::start_on(&tmp.path().join("data"), port_range(), &["--runtime", "process", "--enable-script-checks"]);
    let containers = Containers::default();
    let (name, svc) = (unique("reg-script-on"), unique("scripton"));
    let inside = format!("/tmp/{}", unique("inside"));
    let script = format!("touch {inside}; hostname; exit 1");
    let (e_name, l_script) = (format!("SERVICE_NAME={svc}"), format!("SERVICE_CHECK_SCRIPT={script}"));
    let id = containers.run(
        &name,
        &["-p", "8080", "-e", &e_name, "-l", &l_script, "-l", "SERVICE_CHECK_INTERVAL=1s", IMAGE, "sleep", "600"],
    );
    let check = within(Instant::now(), Duration::from_secs(30), "the script check to report", || async {
        let (_, v) = node.get(&format!("/v1/health/checks/{svc}")).await;
        v.as_array()?.first().filter(|c| !c["Output"].as_str().unwrap_or_default().is_empty()).cloned()
    })
    .await;
    assert_eq!(check["Output"].as_str().unwrap().trim(), &id[..12], "the script's hostname: {check}");
    assert_eq!(check["Status"], "warning", "exit 1 is warning: {check}");
    docker(&["exec", &name, "test", "-f", &inside]);
}
