//! A real cluster on one machine: one `mesh server` and three `mesh agent`s as separate
//! processes, each on its own loopback address (every address in 127.0.0.0/8 reaches this
//! machine on Linux), talking over the internal RPC.

mod support;

use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};
use support::*;

/// The loopback network of one test: `127.<a>.<b>.<host>`, unique to this process and test.
fn net(test: u8) -> String {
    format!("127.{}.{test}", 20 + std::process::id() % 200)
}

struct Cluster {
    net: String,
    tmp: tempfile::TempDir,
    server: MeshNode,
    agents: Vec<MeshNode>,
}

impl Cluster {
    fn ip(&self, host: u8) -> String {
        format!("{}.{host}", self.net)
    }

    fn start(test: u8, agents: u8) -> Cluster {
        let net = net(test);
        let tmp = tempfile::tempdir().expect("tempdir");
        let server = start_server(&net, &tmp.path().join("server"));
        let agents = (0..agents).map(|i| start_agent(&net, &tmp.path().join(format!("agent{i}")), i)).collect();
        Cluster { net, tmp, server, agents }
    }

    fn agent_dir(&self, i: u8) -> PathBuf {
        self.tmp.path().join(format!("agent{i}"))
    }

    /// Every node: the server, then the agents.
    fn nodes(&self) -> impl Iterator<Item = &MeshNode> {
        std::iter::once(&self.server).chain(self.agents.iter())
    }
}

fn start_server(net: &str, dir: &std::path::Path) -> MeshNode {
    let ip = format!("{net}.1");
    let rpc = format!("{ip}:8300");
    MeshNode::start_role(
        "server",
        &ip,
        dir,
        port_range(),
        "server1",
        &["--bind", &ip, "--rpc", &rpc, "--agent-down-after", "2s", "--gossip-probe-period", "200ms"],
    )
}

fn start_agent(net: &str, dir: &std::path::Path, i: u8) -> MeshNode {
    let ip = format!("{net}.{}", 10 + i);
    // Agents find the server through gossip: agent0 joins the server, the others join agent0
    // (any member will do).
    let join = if i == 0 { format!("{net}.1:8301") } else { format!("{net}.10:8301") };
    let rpc = format!("{ip}:8300");
    let ports = port_range();
    MeshNode::start_role(
        "agent",
        &ip,
        dir,
        ports,
        &format!("agent{i}"),
        &[
            "--bind",
            &ip,
            "--rpc",
            &rpc,
            "--join",
            &join,
            "--gossip-probe-period",
            "200ms",
            "--runtime",
            "process",
            "--no-registrator",
        ],
    )
}

/// Run the `mesh` binary as a client (e.g. `members`); its stdout.
fn mesh_cli(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_mesh")).args(args).output().expect("mesh");
    assert!(out.status.success(), "mesh {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Whether marathon-python can be used (CI requires it; elsewhere plain HTTP stands in).
fn have_marathon_python() -> bool {
    let ok = Command::new("python3").args(["-c", "import marathon"]).output().is_ok_and(|o| o.status.success());
    if !ok && std::env::var("MESH_REQUIRE_PYTHON").as_deref() == Ok("1") {
        panic!("MESH_REQUIRE_PYTHON=1 but marathon-python is not importable");
    }
    ok
}

/// Deploy the app through marathon-python (or plain HTTP without it).
async fn deploy(via: &MeshNode, app: &Value) {
    if have_marathon_python() {
        let script = r#"
import collections, collections.abc, json, sys
for n in ("Iterable", "Mapping", "MutableMapping", "Sequence", "MutableSequence", "Callable"):
    if not hasattr(collections, n):
        setattr(collections, n, getattr(collections.abc, n))
import marathon
from marathon.models import MarathonApp, MarathonConstraint
spec = json.loads(sys.argv[2])
c = marathon.MarathonClient(sys.argv[1])
app = MarathonApp.from_json(spec)
created = c.create_app(spec["id"], app)
print(created.id, created.instances, [c.json_repr() for c in created.constraints])
"#;
        let out =
            Command::new("python3").args(["-c", script, &via.url(""), &app.to_string()]).output().expect("python3");
        assert!(out.status.success(), "marathon-python failed: {}", String::from_utf8_lossy(&out.stderr));
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(said.contains("MAX_PER"), "marathon-python saw the constraint: {said}");
    } else {
        eprintln!("SKIP marathon-python (not installed): deploying over plain HTTP");
        let (s, v) = via.send("POST", "/v2/apps", Some(&app.to_string())).await;
        assert_eq!(s, 201, "{v}");
    }
}

/// `(task id, host, port)` of the app's running tasks, as the server sees them.
async fn tasks(server: &MeshNode, app: &str) -> Vec<(String, String, u16)> {
    let (_, v) = server.get(&format!("/v2/apps/{app}/tasks")).await;
    let mut out: Vec<_> = v["tasks"]
        .as_array()
        .map(|ts| {
            ts.iter()
                .filter(|t| t["state"] == "TASK_RUNNING")
                .map(|t| {
                    (
                        t["id"].as_str().unwrap_or_default().to_owned(),
                        t["host"].as_str().unwrap_or_default().to_owned(),
                        t["ports"][0].as_u64().unwrap_or(0) as u16,
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// SRV answers of `name` from `node`, with each target resolved to its address through the
/// same node: `(address, port)`.
async fn srv_addrs(node: &MeshNode, name: &str) -> Option<BTreeSet<(String, u16)>> {
    let r = node.resolver(false);
    let records = srv(&r, name).await.ok()?;
    let mut out = BTreeSet::new();
    for (target, port) in records {
        let ip = r.lookup_ip(target.as_str()).await.ok()?.iter().next()?.to_string();
        out.insert((ip, port));
    }
    Some(out)
}

fn app(id: &str, tag: &str, instances: u32) -> Value {
    serde_json::json!({
        "id": id,
        "cmd": "exec python3 -m http.server $PORT0 --bind 0.0.0.0",
        "instances": instances,
        "cpus": 0.1,
        "mem": 32,
        "constraints": [["hostname", "MAX_PER", "2"]],
        "unreachableStrategy": {"inactiveAfterSeconds": 1, "expungeAfterSeconds": 300},
        "env": {"MESH_TEST_TAG": tag},
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_and_three_agents_spread_an_app_serve_dns_everywhere_and_survive_restarts() {
    let mut c = Cluster::start(1, 3);
    let server_ip = c.ip(1);
    let agent_ip: BTreeMap<String, String> = (0..3u8).map(|i| (format!("agent{i}"), c.ip(10 + i))).collect();
    // Every agent registered (the server's catalog lists it with its own address).
    eventually(30, "3 agents in the catalog", || async {
        let (_, v) = c.server.get("/v1/catalog/nodes").await;
        let nodes: BTreeMap<String, String> = v
            .as_array()?
            .iter()
            .map(|n| (n["Node"].as_str().unwrap_or("").to_owned(), n["Address"].as_str().unwrap_or("").to_owned()))
            .collect();
        agent_ip.iter().all(|(n, ip)| nodes.get(n) == Some(ip)).then_some(())
    })
    .await;
    assert_eq!(c.server.http.ip().to_string(), server_ip);

    // marathon-python deploys 6 instances, at most 2 per host, through the server.
    let tag = format!("cluster-{}", std::process::id());
    deploy(&c.server, &app("/web", &tag, 6)).await;
    let running = eventually(60, "6 running tasks", || async {
        let t = tasks(&c.server, "web").await;
        (t.len() == 6).then_some(t)
    })
    .await;
    let mut per_host: BTreeMap<&str, usize> = BTreeMap::new();
    for (_, host, _) in &running {
        *per_host.entry(host.as_str()).or_default() += 1;
    }
    assert_eq!(per_host.values().copied().collect::<Vec<_>>(), vec![2, 2, 2], "spread over the 3 agents: {per_host:?}");

    // Every node answers SRV with all 6, each at its own node's address; each answers HTTP.
    let want: BTreeSet<(String, u16)> = running.iter().map(|(_, h, p)| (agent_ip[h].clone(), *p)).collect();
    for node in c.nodes() {
        let got = eventually(20, &format!("all 6 instances in DNS of {}", node.name), || async {
            let got = srv_addrs(node, "web.service.mesh").await?;
            (got == want).then_some(got)
        })
        .await;
        assert_eq!(got.len(), 6);
    }
    let http = reqwest::Client::builder().timeout(Duration::from_secs(3)).build().unwrap();
    for (ip, port) in &want {
        // RUNNING means started; the server binds its port a moment later.
        eventually(20, &format!("the task at {ip}:{port} answers HTTP"), || async {
            let r = http.get(format!("http://{ip}:{port}/")).send().await.ok()?;
            r.status().is_success().then_some(())
        })
        .await;
    }
    // `mesh members` (through an agent) lists the pool: the server and the three agents, alive.
    let members = mesh_cli(&["members", "--http-addr", &c.agents[1].http.to_string()]);
    for (name, kind) in [("server1", "server"), ("agent0", "agent"), ("agent1", "agent"), ("agent2", "agent")] {
        assert!(
            members.lines().any(|l| l.starts_with(name) && l.contains(" alive ") && l.contains(kind)),
            "{name} alive as {kind} in:\n{members}"
        );
    }
    // An agent's /v2/events carries what its replica applies, health results included: a
    // command check of a new app turns its task healthy there.
    let mut events =
        EventStream::open(&c.agents[1], "?event_type=health_status_changed_event&event_type=event_stream_attached");
    events.wait_for("event_stream_attached", 10, |_| true);
    let checked = serde_json::json!({"id": "/checked", "cmd": "sleep 1000", "instances": 1, "cpus": 0.01, "mem": 8,
        "healthChecks": [{"protocol": "COMMAND", "command": {"value": "true"}, "intervalSeconds": 1}]});
    let (s, v) = c.server.send("POST", "/v2/apps", Some(&checked.to_string())).await;
    assert_eq!(s, 201, "{v}");
    events.wait_for("health_status_changed_event", 30, |e| e["appId"] == "/checked" && e["alive"] == true);
    let (s, v) = c.server.send("DELETE", "/v2/apps/checked", None).await;
    assert_eq!(s, 200, "{v}");

    // An app that cannot be placed: /v2/queue says why, naming the nodes whose offers it declined.

    let (s, v) = c
        .server
        .send(
            "POST",
            "/v2/apps",
            Some(
                &serde_json::json!({"id": "/wide", "cmd": "sleep 1000", "instances": 4, "cpus": 0.01, "mem": 8,
                "constraints": [["hostname", "UNIQUE"]]})
                .to_string(),
            ),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    let hosts = eventually(30, "the queue names the agents whose offers /wide declined", || async {
        let (_, q) = c.server.get("/v2/queue?embed=lastUnusedOffers").await;
        let item = q["queue"].as_array()?.iter().find(|i| i["app"]["id"] == "/wide")?.clone();
        let hosts: BTreeSet<String> = item["lastUnusedOffers"]
            .as_array()?
            .iter()
            .filter(|o| o["reason"][0] == "UnfulfilledConstraint")
            .filter_map(|o| o["offer"]["hostname"].as_str().map(str::to_owned))
            .collect();
        (hosts.len() == 3).then_some(hosts)
    })
    .await;
    assert_eq!(hosts, agent_ip.keys().cloned().collect::<BTreeSet<_>>());
    let (s, _) = c.server.send("DELETE", "/v2/apps/wide", None).await;
    assert_eq!(s, 200);
    // The agents' HTTP API: reads from their replica, writes forwarded to the server.

    let a0 = &c.agents[0];
    let (s, v) = a0.get("/v2/apps/web").await;
    assert_eq!((s, v["app"]["instances"].as_u64()), (200, Some(6)), "{v}");
    let (s, _) = a0.send("PUT", "/v1/kv/cluster/hello", Some("from-agent0")).await;
    assert_eq!(s, 200);
    let (s, v) = c.agents[2].get("/v1/kv/cluster/hello?raw").await;
    assert_eq!((s, v.as_str()), (200, Some("from-agent0")), "a write through one agent is read on another");

    // A service registered through an agent belongs to it (Consul's anti-entropy): removed
    // through the catalog, the agent registers it again; deregistered through the agent, it goes.
    let a2 = &c.agents[2];
    let reg = r#"{"ID": "cache1", "Name": "cache", "Port": 6379, "Tags": ["v1"]}"#;
    let (s, v) = a2.send("PUT", "/v1/agent/service/register", Some(reg)).await;
    assert_eq!(s, 200, "{v}");
    let on_agent2 =
        |v: &Value| v.as_array().is_some_and(|a| a.iter().any(|e| e["Node"] == "agent2" && e["ServiceID"] == "cache1"));
    let (_, v) = a2.get("/v1/catalog/service/cache").await;
    assert!(on_agent2(&v), "read from the agent's replica right after the write: {v}");
    let (s, v) =
        c.server.send("PUT", "/v1/catalog/deregister", Some(r#"{"Node": "agent2", "ServiceID": "cache1"}"#)).await;
    assert_eq!(s, 200, "{v}");
    eventually(30, "agent2 registered cache1 again", || async {
        let (_, v) = c.server.get("/v1/catalog/service/cache").await;
        on_agent2(&v).then_some(())
    })
    .await;
    let (s, _) = a2.send("PUT", "/v1/agent/service/deregister/cache1", None).await;
    assert_eq!(s, 200);
    let (_, v) = c.server.get("/v1/catalog/service/cache").await;
    assert!(!on_agent2(&v), "deregistered through its agent: {v}");

    // SIGTERM agent1 and start it again: same task ids, same processes, no replacement, and DNS
    // answered by the other nodes throughout.
    let pids = tagged_pids(&tag, "python3");
    assert_eq!(pids.len(), 6, "one process per task: {pids:?}");
    let ids: BTreeSet<String> = running.iter().map(|(id, _, _)| id.clone()).collect();
    c.agents[1].stop_with("TERM");
    let down = Instant::now();
    let restarted = {
        let net = c.net.clone();
        let dir = c.agent_dir(1);
        tokio::task::spawn_blocking(move || {
            std::thread::sleep(Duration::from_millis(500)); // a restart takes a moment
            start_agent(&net, &dir, 1)
        })
    };
    let mut answered = 0;
    while !restarted.is_finished() {
        let got = srv_addrs(&c.agents[0], "web.service.mesh").await.unwrap_or_default();
        assert!(!got.is_empty(), "DNS answered while agent1 restarted");
        answered += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    c.agents[1] = restarted.await.unwrap();
    eprintln!("agent1 was down for {:?}; DNS answered {answered} times meanwhile", down.elapsed());
    eventually(30, "agent1 re-registered with its tasks", || async {
        let (_, v) = c.server.get("/v1/health/node/agent1").await;
        let serf = v.as_array()?.iter().find(|ch| ch["CheckID"] == "serfHealth")?.clone();
        (serf["Status"] == "passing").then_some(())
    })
    .await;
    let after = tasks(&c.server, "web").await;
    assert_eq!(after.iter().map(|(id, _, _)| id.clone()).collect::<BTreeSet<_>>(), ids, "same task ids, none replaced");
    assert_eq!(tagged_pids(&tag, "python3"), pids, "no task process restarted");
    eventually(20, "agent1's replica current again", || async {
        (srv_addrs(&c.agents[1], "web.service.mesh").await? == want).then_some(())
    })
    .await;

    // SIGKILL the server: every agent keeps answering DNS (stale) and tasks keep serving; a task
    // that exits meanwhile is reported once the server is back; nothing lost or duplicated.
    c.server.stop_with("KILL");
    for a in &c.agents {
        let got = match srv_addrs(a, "web.service.mesh").await {
            Some(got) => got,
            None => panic!(
                "DNS without the server from {}: {:?}",
                a.name,
                srv(&a.resolver(false), "web.service.mesh").await
            ),
        };

        assert_eq!(got, want, "{} answers what it last knew", a.name);
        let r = reqwest::get(format!("http://{}/v1/health/service/web", a.http)).await.unwrap();
        assert_eq!(r.headers()["X-Consul-KnownLeader"], "false");
    }
    // One task on agent2 exits while the server is down.
    let (victim, _, vport) = after.iter().find(|(_, h, _)| h == "agent2").cloned().unwrap();
    let victim_pid = pids
        .iter()
        .copied()
        .find(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&vport.to_string()))
        })
        .expect("the victim's process");
    let kept = |n: &MeshNode| {
        std::fs::read_to_string(n.data_dir.with_extension("log"))
            .unwrap_or_default()
            .matches("reports kept until one acknowledges them")
            .count()
    };
    let kept_before = kept(&c.agents[2]);
    Command::new("kill").args(["-KILL", &victim_pid.to_string()]).status().unwrap();
    // The agent saw it and kept the report (no server to tell).
    eventually(20, "agent2 kept the report of the exit", || async { (kept(&c.agents[2]) > kept_before).then_some(()) })
        .await;
    c.server = {
        let net = c.net.clone();
        let dir = c.tmp.path().join("server");
        tokio::task::spawn_blocking(move || start_server(&net, &dir)).await.unwrap()
    };
    let healed = eventually(60, "the exited task replaced, 6 running again", || async {
        let t = tasks(&c.server, "web").await;
        (t.len() == 6 && !t.iter().any(|(id, _, _)| *id == victim)).then_some(t)
    })
    .await;
    let (_, v) = c.server.get("/v2/apps/web").await;
    assert_eq!(v["app"]["tasksRunning"], 6, "no task lost or duplicated: {v}");
    let survivors: BTreeSet<String> = healed.iter().map(|(id, _, _)| id.clone()).collect();
    assert_eq!(survivors.intersection(&ids).count(), 5, "the other five kept running");
    eventually(30, "6 task processes", || async { (tagged_pids(&tag, "python3").len() == 6).then_some(()) }).await;
    let (_, last) = c.server.get("/v2/apps/web?embed=app.lastTaskFailure").await;
    assert_eq!(last["app"]["lastTaskFailure"]["taskId"], victim.as_str(), "the update sent during the outage arrived");

    // A fourth agent joins; then agent0 is SIGKILLed: its instances leave DNS on every other
    // node, its tasks become unreachable and are replaced elsewhere (MAX_PER 2 leaves room only
    // on the new agent).
    let (c3, c0_dir) = (start_agent(&c.net, &c.agent_dir(3), 3), c.agent_dir(0));
    c.agents.push(c3);
    let agent_ip: BTreeMap<String, String> = (0..4u8).map(|i| (format!("agent{i}"), c.ip(10 + i))).collect();
    let before_kill = tasks(&c.server, "web").await;
    let on0: BTreeSet<String> =
        before_kill.iter().filter(|(_, h, _)| h == "agent0").map(|(id, _, _)| id.clone()).collect();
    assert_eq!(on0.len(), 2);
    let a0_ip = agent_ip["agent0"].clone();
    c.agents[0].stop_with("KILL");
    let killed = Instant::now();
    let mut left_dns = BTreeMap::new();
    let mut unreachable_after = None;
    let mut replaced_after = None;
    let deadline = Instant::now() + Duration::from_secs(60);
    while left_dns.len() < 3 || unreachable_after.is_none() || replaced_after.is_none() {
        assert!(
            Instant::now() < deadline,
            "agent0's loss not handled: dns {left_dns:?} unreachable {unreachable_after:?} replaced {replaced_after:?}"
        );
        for (i, node) in c.agents.iter().enumerate().skip(1).chain(std::iter::once((9, &c.server))) {
            if left_dns.contains_key(&i) {
                continue;
            }
            if let Some(got) = srv_addrs(node, "web.service.mesh").await
                && !got.iter().any(|(ip, _)| *ip == a0_ip)
                && !got.is_empty()
            {
                left_dns.insert(i, killed.elapsed());
            }
        }
        if unreachable_after.is_none() {
            let (_, v) = c.server.get("/v2/apps/web/tasks").await;
            let states: Vec<&str> = v["tasks"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|t| on0.contains(t["id"].as_str().unwrap_or("")))
                .filter_map(|t| t["state"].as_str())
                .collect();
            if states == ["TASK_UNREACHABLE", "TASK_UNREACHABLE"] {
                unreachable_after = Some(killed.elapsed());
            }
        }
        if replaced_after.is_none() {
            let t = tasks(&c.server, "web").await;
            if t.len() == 6 && t.iter().filter(|(_, h, _)| h == "agent3").count() == 2 {
                replaced_after = Some(killed.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "agent0 SIGKILLed: out of DNS on every other node after {:?}; tasks unreachable after {:?}; replaced after {:?}",
        left_dns.values().max().unwrap(),
        unreachable_after.unwrap(),
        replaced_after.unwrap()
    );
    // agent0 comes back: its two tasks (still running) count again, the surplus is killed, and
    // the app has exactly 6.
    c.agents[0] = tokio::task::spawn_blocking(move || start_agent(&net(1), &c0_dir, 0)).await.unwrap();
    let settled = eventually(60, "exactly 6 instances after agent0 is back", || async {
        let (_, v) = c.server.get("/v2/apps/web/tasks").await;
        let all: Vec<&Value> = v["tasks"].as_array()?.iter().collect();
        let running = all.iter().filter(|t| t["state"] == "TASK_RUNNING").count();
        (all.len() == 6 && running == 6).then(|| tasks(&c.server, "web"))
    })
    .await
    .await;
    let mut per_host: BTreeMap<String, usize> = BTreeMap::new();
    for (_, h, _) in &settled {
        *per_host.entry(h.clone()).or_default() += 1;
    }
    assert!(per_host.values().all(|n| *n <= 2), "MAX_PER 2 holds: {per_host:?}");
    eventually(30, "6 task processes after the surplus was killed", || async {
        (tagged_pids(&tag, "python3").len() == 6).then_some(())
    })
    .await;

    // Draining agent3 moves its tasks elsewhere and it takes no new ones.
    let said = mesh_cli(&["node", "drain", "agent3", "--http-addr", &c.server.http.to_string()]);
    assert!(said.contains("draining agent3"), "{said}");
    eventually(60, "agent3 drained: 6 running elsewhere", || async {
        let t = tasks(&c.server, "web").await;
        let (_, all) = c.server.get("/v2/apps/web/tasks").await;
        let total = all["tasks"].as_array()?.len();
        (t.len() == 6 && total == 6 && !t.iter().any(|(_, h, _)| h == "agent3")).then_some(())
    })
    .await;
    let (s, v) = c
        .server
        .send("POST", "/api/v1", Some(r#"{"type":"DRAIN_AGENT","drain_agent":{"agent_id":{"value":"nobody"}}}"#))
        .await;
    assert_eq!(s, 400, "an unknown agent: {v}");
    let said = mesh_cli(&["node", "reactivate", "agent3", "--http-addr", &c.server.http.to_string()]);
    assert!(said.contains("reactivated agent3"), "{said}");

    // A Mesos framework that subscribes at an agent is relayed to the leader: the agent answers
    // the subscription itself (no redirect that would pin the framework to one server), and the
    // stream's first event is SUBSCRIBED with a framework id the leader knows.
    let mut r = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
        .post(format!("http://{}/api/v1/scheduler", c.agents[1].http))
        .header("Content-Type", "application/json")
        .body(r#"{"type":"SUBSCRIBE","subscribe":{"framework_info":{"user":"u","name":"f"}}}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert!(r.headers().contains_key("mesos-stream-id"), "{:?}", r.headers());
    let mut first = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !first.contains("SUBSCRIBED") {
        let chunk = tokio::time::timeout_at(deadline, r.chunk()).await.expect("SUBSCRIBED in time").unwrap();
        first.push_str(&String::from_utf8_lossy(&chunk.expect("the stream stays open")));
    }
    assert!(first.contains("framework_id"), "{first}");
    drop(r);

    // agent2's machine is wiped (its processes and its data dir gone) and it comes back under
    // the same name: a new incarnation, which never inherits the tasks it does not run; they are
    // replaced and the app is back at exactly 6.
    let before: BTreeSet<String> =
        tasks(&c.server, "web").await.into_iter().filter(|(_, h, _)| h == "agent2").map(|(id, _, _)| id).collect();
    assert!(!before.is_empty());
    let ports2: Vec<u16> =
        tasks(&c.server, "web").await.into_iter().filter(|(_, h, _)| h == "agent2").map(|(_, _, p)| p).collect();
    c.agents[2].stop_with("KILL");
    for pid in tagged_pids(&tag, "python3") {
        let cmd =
            String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default()).into_owned();
        if ports2.iter().any(|p| cmd.contains(&p.to_string())) {
            Command::new("kill").args(["-KILL", &pid.to_string()]).status().unwrap();
        }
    }
    let dir2 = c.agent_dir(2);
    std::fs::remove_dir_all(&dir2).unwrap();
    let net1 = c.net.clone();
    c.agents[2] = tokio::task::spawn_blocking(move || start_agent(&net1, &dir2, 2)).await.unwrap();
    eventually(60, "agent2's old tasks replaced, exactly 6 running", || async {
        let t = tasks(&c.server, "web").await;
        let (_, all) = c.server.get("/v2/apps/web/tasks").await;
        let total = all["tasks"].as_array()?.len();
        (t.len() == 6 && total == 6 && !t.iter().any(|(id, _, _)| before.contains(id))).then_some(())
    })
    .await;
    eventually(30, "6 task processes", || async { (tagged_pids(&tag, "python3").len() == 6).then_some(()) }).await;

    // Deleting the app stops its processes on every agent (a stopped agent leaves its tasks
    // running for its next start, so this is also what leaves nothing behind the test).
    let (s, v) = c.server.send("DELETE", "/v2/apps/web", None).await;
    assert_eq!(s, 200, "{v}");
    eventually(60, "no task process left", || async { tagged_pids(&tag, "python3").is_empty().then_some(()) }).await;
}

/// Bad peers against a real server: garbage and an unknown protocol version on its RPC port,
/// garbage and a foreign envelope on its gossip port, and an agent of another datacenter trying
/// to join its LAN pool. Each is refused with a clear log line; the server keeps serving and a
/// proper agent still joins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_peers_are_refused_with_a_log_line_and_nothing_crashes() {
    use std::io::{Read, Write};
    let net = net(2);
    let tmp = tempfile::tempdir().unwrap();
    let server = start_server(&net, &tmp.path().join("server"));
    let rpc = format!("{net}.1:8300");
    let gossip = format!("{net}.1:8301");
    // RPC: HTTP instead of the preamble; then a peer that speaks protocol version 9.
    for bytes in [&b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..], b"MESH\x00\x09\x00\x00"] {
        let mut s = std::net::TcpStream::connect(&rpc).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(bytes).unwrap();
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
        assert!(buf.len() <= 8, "refused after at most its own preamble: {buf:?}");
    }
    // Gossip: random bytes, and a packet of a future major version.
    let udp = std::net::UdpSocket::bind(format!("{net}.9:0")).unwrap();
    udp.send_to(b"\x00\x01garbage that is not gossip", &gossip).unwrap();
    udp.send_to(b"MSHG\x09\x00\x03dc1whatever", &gossip).unwrap();
    // An agent of datacenter dc2 joins the dc1 pool (and points its RPC at the dc1 server).
    let dir = tmp.path().join("foreign");
    let ip = format!("{net}.20");
    let foreign = MeshNode::start_role(
        "agent",
        &ip,
        &dir,
        port_range(),
        "foreign",
        &[
            "--dc",
            "dc2",
            "--bind",
            &ip,
            "--join",
            &gossip,
            "--server",
            &rpc,
            "--gossip-probe-period",
            "200ms",
            "--runtime",
            "process",
            "--no-registrator",
        ],
    );
    let log = |n: &MeshNode| std::fs::read_to_string(n.data_dir.with_extension("log")).unwrap_or_default();
    eventually(30, "every refusal logged by the server", || async {
        let l = log(&server);
        let want = [
            "does not speak mesh RPC",
            "protocol version 9.0, this node 1.",
            "gossip: dropped packet",
            "datacenter dc2, this pool is dc1",
            "is in datacenter dc2, this node in dc1",
        ];
        want.iter().all(|w| l.contains(w)).then_some(())
    })
    .await;
    assert!(log(&foreign).contains("refused"), "the foreign agent hears why: {}", log(&foreign));
    // The server never lists it, and still works: a proper agent joins and registers.
    let good = start_agent(&net, &tmp.path().join("good"), 0);
    eventually(30, "the dc1 agent registered, the dc2 one not", || async {
        let (_, v) = server.get("/v1/catalog/nodes").await;
        let names: Vec<&str> = v.as_array()?.iter().filter_map(|n| n["Node"].as_str()).collect();
        (names.contains(&"agent0") && !names.contains(&"foreign")).then_some(())
    })
    .await;
    drop(good);
    drop(foreign);
}
