//! A highly available control plane: three `mesh server`s that form one Raft group by
//! themselves (`--bootstrap-expect 3`, through gossip) and one `mesh agent`, as separate
//! processes on loopback addresses. Writes go through followers and the agent; the leader is
//! SIGKILLed several times and restarted; nothing acknowledged is lost, the app keeps its
//! tasks (none doubled), and every server names the same leader.

mod support;

use serde_json::Value;
use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};
use support::*;

/// The loopback network of this test: `127.<a>.<b>.<host>`, unique to this process.
fn net() -> String {
    format!("127.{}.60", 20 + std::process::id() % 200)
}

/// Raft timings scaled for tests on a loaded machine: heartbeat 150 ms, elections 300-600 ms.
const RAFT_MULTIPLIER: &str = "0.3";

fn start_server(net: &str, dir: &Path, i: u8) -> MeshNode {
    start_server_of(net, dir, i, 3)
}

/// Server `i` of a group that forms once `expect` servers found each other.
fn start_server_of(net: &str, dir: &Path, i: u8, expect: u8) -> MeshNode {
    start_server_with(net, dir, i, expect, &[])
}

/// [`start_server_of`] with more flags.
fn start_server_with(net: &str, dir: &Path, i: u8, expect: u8, more: &[&str]) -> MeshNode {
    start_server_env(net, dir, i, expect, more, &[])
}

/// [`start_server_with`] with environment variables (test faults).
fn start_server_env(net: &str, dir: &Path, i: u8, expect: u8, more: &[&str], env: &[(&str, &str)]) -> MeshNode {
    let ip = format!("{net}.{i}");
    let expect = expect.to_string();
    let rpc = format!("{ip}:8300");
    let (j1, j2) = (format!("{net}.1:8301"), format!("{net}.2:8301"));
    MeshNode::start_role_env(
        "server",
        &ip,
        dir,
        port_range(),
        &format!("server{i}"),
        &[
            "--bind",
            &ip,
            "--rpc",
            &rpc,
            "--join",
            &j1,
            "--join",
            &j2,
            "--bootstrap-expect",
            &expect,
            "--raft-multiplier",
            RAFT_MULTIPLIER,
            "--gossip-probe-period",
            "200ms",
        ]
        .into_iter()
        .chain(more.iter().copied())
        .collect::<Vec<_>>(),
        env,
    )
}

fn start_agent(net: &str, dir: &Path) -> MeshNode {
    let ip = format!("{net}.10");
    let rpc = format!("{ip}:8300");
    let join = format!("{net}.1:8301");
    MeshNode::start_role(
        "agent",
        &ip,
        dir,
        port_range(),
        "agent0",
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

/// The same loopback network with another third byte (a second test in this process).
fn net_of(third: u8) -> String {
    format!("127.{}.{third}", 20 + std::process::id() % 200)
}

/// What `node` says the leader is (`/v1/status/leader`, the leader's RPC address), if any.
async fn leader_of(node: &MeshNode) -> Option<String> {
    let r = node.client.get(node.url("/v1/status/leader")).timeout(Duration::from_secs(2)).send().await.ok()?;
    let v: Value = r.json().await.ok()?;
    v.as_str().filter(|s| !s.is_empty()).map(str::to_owned)
}

/// Wait until every server in `live` names the same leader, one of them; its index in `servers`.
async fn agreed_leader(servers: &[Option<MeshNode>], net: &str) -> usize {
    eventually(60, "every live server names the same leader", || async {
        let mut seen = BTreeSet::new();
        for s in servers.iter().flatten() {
            seen.insert(leader_of(s).await?);
        }
        let leader = seen.into_iter().collect::<Vec<_>>();
        let [one] = leader.as_slice() else { return None };
        let ip = one.split(':').next()?;
        let i = ip.strip_prefix(&format!("{net}."))?.parse::<usize>().ok()? - 1;
        servers.get(i)?.as_ref().map(|_| i)
    })
    .await
}

/// PUT a key through `node` until the answer is `true`; how long that took.
async fn put_until_accepted(node: &MeshNode, key: &str, value: &str) -> Duration {
    let start = Instant::now();
    eventually(60, &format!("PUT {key} accepted through {}", node.name), || async {
        let r = node
            .client
            .put(node.url(&format!("/v1/kv/{key}")))
            .body(value.to_owned())
            .timeout(Duration::from_secs(15))
            .send()
            .await
            .ok()?;
        let ok = r.status() == 200 && r.text().await.ok()?.trim() == "true";
        ok.then_some(())
    })
    .await;
    start.elapsed()
}

/// The raw value of `key` read through `node` (`query` adds e.g. `&stale`).
async fn read(node: &MeshNode, key: &str, query: &str) -> Option<String> {
    let r = node.client.get(node.url(&format!("/v1/kv/{key}?raw{query}"))).send().await.ok()?;
    if r.status() != 200 {
        return None;
    }
    r.text().await.ok()
}

/// The ids of the app's tasks (every state), as `node` sees them.
async fn task_ids(node: &MeshNode, app: &str) -> Vec<(String, String)> {
    let (_, v) = node.get(&format!("/v2/apps/{app}/tasks")).await;
    let mut out: Vec<(String, String)> = v["tasks"]
        .as_array()
        .map(|ts| {
            ts.iter()
                .map(|t| {
                    (
                        t["id"].as_str().unwrap_or_default().to_owned(),
                        t["state"].as_str().unwrap_or_default().to_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_servers_keep_every_acknowledged_write_through_leader_kills() {
    let net = net();
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = |name: &str| tmp.path().join(name);
    let mut servers: Vec<Option<MeshNode>> =
        (1..=3u8).map(|i| Some(start_server(&net, &dir(&format!("server{i}")), i))).collect();
    let agent = start_agent(&net, &dir("agent0"));

    // The group forms by itself: one leader, three voters, the same view everywhere.
    let leader = agreed_leader(&servers, &net).await;
    for s in servers.iter().flatten() {
        let (status, peers) = s.get("/v1/status/peers").await;
        assert_eq!(status, 200);
        assert_eq!(peers.as_array().map(Vec::len), Some(3), "{peers}");
        let (_, conf) = s.get("/v1/operator/raft/configuration").await;
        let list = conf["Servers"].as_array().expect("Servers");
        assert_eq!(list.len(), 3, "{conf}");
        assert_eq!(list.iter().filter(|m| m["Leader"] == true).count(), 1, "{conf}");
        assert!(list.iter().all(|m| m["Voter"] == true), "{conf}");
    }
    let leader_http = servers[leader].as_ref().unwrap().http.to_string();
    for s in servers.iter().flatten() {
        let (_, v) = s.get("/v2/leader").await;
        assert_eq!(v["leader"].as_str(), Some(leader_http.as_str()), "/v2/leader on {}", s.name);
    }

    // A write through a follower is forwarded; the follower then reads it at once, even stale.
    let follower = (leader + 1) % 3;
    let f = servers[follower].as_ref().unwrap();
    put_until_accepted(f, "k0", "v0").await;
    assert_eq!(read(f, "k0", "").await.as_deref(), Some("v0"));
    assert_eq!(read(f, "k0", "&stale").await.as_deref(), Some("v0"));
    // And a CAS that must fail does, with Consul's answer.
    let r = f.client.put(f.url("/v1/kv/k0?cas=1")).body("no").send().await.expect("cas");
    assert_eq!(r.text().await.unwrap().trim(), "false");

    // A follower's /v2/events carries what its state machine applies.
    let mut events = EventStream::open(
        f,
        "?event_type=status_update_event&event_type=deployment_success&event_type=event_stream_attached",
    );
    events.wait_for("event_stream_attached", 10, |_| true);

    // An app deployed through the agent (forwarded to the leader) runs on it.
    let tag = format!("ha-{}", std::process::id());
    let app = serde_json::json!({
        "id": "/web", "cmd": "exec python3 -m http.server $PORT0 --bind 0.0.0.0", "instances": 2,
        "cpus": 0.1, "mem": 32, "env": {"MESH_TEST_TAG": tag},
    });
    let (s, v) = agent.send("POST", "/v2/apps", Some(&app.to_string())).await;
    assert_eq!(s, 201, "{v}");
    let running = eventually(60, "2 tasks running", || async {
        let ts = task_ids(f, "web").await;
        (ts.len() == 2 && ts.iter().all(|(_, s)| s == "TASK_RUNNING")).then_some(ts)
    })
    .await;
    events.wait_for("status_update_event", 30, |e| e["appId"] == "/web" && e["taskStatus"] == "TASK_RUNNING");
    events.wait_for("deployment_success", 30, |_| true);
    let pids = eventually(30, "2 task processes", || async {
        let p = tagged_pids(&tag, "python3");
        (p.len() == 2).then_some(p)
    })
    .await;

    // Kill the leader three times; each time a new one takes writes, nothing acknowledged is
    // lost, and the killed server comes back and catches up.
    let mut written = vec![("k0".to_owned(), "v0".to_owned())];
    let mut took = Vec::new();
    let mut leader = leader;
    for round in 1..=3 {
        let mut old = servers[leader].take().expect("leader");
        old.stop_with("KILL");
        let other = servers.iter().flatten().next().expect("a live server");
        let (key, value) = (format!("k{round}"), format!("v{round}"));
        took.push(put_until_accepted(other, &key, &value).await);
        written.push((key, value));
        let next = agreed_leader(&servers, &net).await;
        assert_ne!(next, leader, "a new leader");
        for s in servers.iter().flatten() {
            for (k, v) in &written {
                assert_eq!(
                    read(s, k, "").await.as_deref(),
                    Some(v.as_str()),
                    "{k} through {} after kill {round}",
                    s.name
                );
            }
        }
        // The app keeps its two tasks: none lost, none doubled, the same processes.
        assert_eq!(
            task_ids(servers[next].as_ref().unwrap(), "web").await,
            running,
            "the app's tasks after kill {round}"
        );
        assert_eq!(tagged_pids(&tag, "python3"), pids, "no task restarted after kill {round}");
        // The killed server comes back on its data and catches up.
        let back = MeshNode::start_role("server", &old.http.ip().to_string(), &old.data_dir, old.ports, &old.name, &{
            let e: Vec<&str> = old.extra.iter().map(String::as_str).collect();
            e
        });
        servers[leader] = Some(back);
        let back = servers[leader].as_ref().unwrap();
        let (k, v) = written.last().unwrap();
        eventually(60, "the restarted server caught up", || async {
            (read(back, k, "&stale").await.as_deref() == Some(v.as_str())).then_some(())
        })
        .await;
        leader = agreed_leader(&servers, &net).await;
    }
    eprintln!("first accepted write after a leader SIGKILL: {took:?}");

    // The agent follows the leader: scaling through it reaches the new leader's control loop.
    let (s, v) = agent.send("PUT", "/v2/apps/web", Some(r#"{"instances": 3}"#)).await;
    assert_eq!(s, 200, "{v}");
    let l = servers[leader].as_ref().unwrap();
    let three = eventually(60, "3 tasks running", || async {
        let ts = task_ids(l, "web").await;
        (ts.len() == 3 && ts.iter().all(|(_, s)| s == "TASK_RUNNING")).then_some(ts)
    })
    .await;
    let ids: BTreeSet<&String> = three.iter().map(|(id, _)| id).collect();
    assert_eq!(ids.len(), 3, "no task id twice: {three:?}");
    assert!(running.iter().all(|t| three.contains(t)), "the first two tasks still run");

    let (s, v) = l.send("DELETE", "/v2/apps/web", None).await;
    assert_eq!(s, 200, "{v}");
    eventually(60, "no task process left", || async { tagged_pids(&tag, "python3").is_empty().then_some(()) }).await;
}

/// Restart a server killed earlier on its data dir, with the same flags.
fn restart(old: &MeshNode) -> MeshNode {
    let args: Vec<&str> = old.extra.iter().map(String::as_str).collect();
    MeshNode::start_role("server", &old.http.ip().to_string(), &old.data_dir, old.ports, &old.name, &args)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_servers_write_without_two_and_stop_writing_without_three() {
    let net = net_of(61);
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut servers: Vec<Option<MeshNode>> =
        (1..=5u8).map(|i| Some(start_server_of(&net, &tmp.path().join(format!("server{i}")), i, 5))).collect();
    let leader = agreed_leader(&servers, &net).await;
    let (_, peers) = servers[0].as_ref().unwrap().get("/v1/status/peers").await;
    assert_eq!(peers.as_array().map(Vec::len), Some(5), "{peers}");
    let first = servers[(leader + 1) % 5].as_ref().unwrap();
    put_until_accepted(first, "before", "5").await;

    // Two lost (the leader among them): the other three elect a leader and take writes.
    let mut killed = Vec::new();
    for i in [leader, (leader + 1) % 5] {
        let mut s = servers[i].take().unwrap();
        s.stop_with("KILL");
        killed.push((i, s));
    }
    let three = agreed_leader(&servers, &net).await;
    let took = put_until_accepted(servers[three].as_ref().unwrap(), "with-three", "3").await;
    eprintln!("five servers, two killed: the first write accepted after {took:?}");

    // A third lost: no quorum. Writes get the API's own error (after the hold), reads with
    // `stale` and DNS still answer from each server's state, saying no leader is known.
    let third = (0..5).find(|i| servers[*i].is_some()).unwrap();
    let mut s = servers[third].take().unwrap();
    s.stop_with("KILL");
    killed.push((third, s));
    let survivor = servers.iter().flatten().next().unwrap();
    let start = Instant::now();
    let r = survivor
        .client
        .put(survivor.url("/v1/kv/without-quorum"))
        .body("x")
        .timeout(Duration::from_secs(40))
        .send()
        .await;
    let r = r.expect("an answer, not a hang");
    let status = r.status().as_u16();
    let body = r.text().await.unwrap();
    assert_eq!(status, 500, "Consul's answer without a leader: {body}");
    assert!(body.contains("No cluster leader"), "{body}");
    eprintln!("five servers, three killed: a write was refused after {:?}", start.elapsed());
    let (s2, v) = survivor.send("POST", "/v2/apps", Some(r#"{"id": "/nope", "cmd": "sleep 1"}"#)).await;
    assert_eq!(s2, 503, "Marathon's answer without a leader: {v}");
    for s in servers.iter().flatten() {
        let r = s.client.get(s.url("/v1/kv/with-three?stale&raw")).send().await.expect("stale read");
        assert_eq!(r.headers().get("X-Consul-KnownLeader").and_then(|v| v.to_str().ok()), Some("false"));
        assert_eq!(r.text().await.unwrap(), "3", "a stale read on {}", s.name);
        let records = srv(&s.resolver(false), "consul.service.mesh").await.expect("DNS answers without a leader");
        assert!(!records.is_empty(), "consul.service.mesh on {}", s.name);
    }

    // They come back: a leader again, writes again, nothing acknowledged lost.
    for (i, s) in killed {
        servers[i] = Some(restart(&s));
    }
    let back = agreed_leader(&servers, &net).await;
    put_until_accepted(servers[back].as_ref().unwrap(), "after", "5").await;
    for s in servers.iter().flatten() {
        for (k, v) in [("before", "5"), ("with-three", "3"), ("after", "5")] {
            let got = eventually(30, &format!("{k} on {}", s.name), || async {
                let r = read(s, k, "&stale").await?;
                (r == v).then_some(r)
            })
            .await;
            assert_eq!(got, v);
        }
    }
}

/// Run the `mesh` CLI; its stdout (it must succeed).
fn mesh_cli(args: &[&str]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mesh")).args(args).output().expect("mesh");
    assert!(out.status.success(), "mesh {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_restores_into_a_fresh_group_and_the_group_changes_by_itself() {
    // A one-server datacenter with an app, a service, KV keys and a session holding a lock.
    let net_a = net_of(62);
    let tmp = tempfile::tempdir().expect("tempdir");
    let a = start_server_of(&net_a, &tmp.path().join("a1"), 1, 1);
    let leader_a = eventually(30, "server a1 leads", || async { leader_of(&a).await }).await;
    assert!(leader_a.starts_with(&format!("{net_a}.1:")), "{leader_a}");
    let (s, v) = a
        .send(
            "POST",
            "/v2/apps",
            Some(r#"{"id": "/snap/web", "cmd": "sleep 1000", "instances": 2, "cpus": 0.1, "mem": 16}"#),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    let (s, v) = a
        .send(
            "PUT",
            "/v1/catalog/register",
            Some(r#"{"Node": "ext1", "Address": "10.9.9.9", "Service": {"Service": "db", "Port": 5432}}"#),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    put_until_accepted(&a, "config/a", "1").await;
    put_until_accepted(&a, "config/b", "2").await;
    let (s, v) = a.send("PUT", "/v1/session/create", Some(r#"{"Name": "snap", "Checks": []}"#)).await;
    assert_eq!(s, 200, "{v}");
    let sid = v["ID"].as_str().expect("session id").to_owned();
    let (s, v) = a.send("PUT", &format!("/v1/kv/locks/snap?acquire={sid}"), Some("held")).await;
    assert_eq!((s, v), (200, Value::Bool(true)));
    let file = tmp.path().join("dc.snap");
    let out = mesh_cli(&["snapshot", "save", file.to_str().unwrap(), "--http-addr", &a.http.to_string()]);
    assert!(out.contains("Saved snapshot"), "{out}");
    drop(a);

    // A fresh three-server group takes it through a follower; every server has it all.
    let net_b = net_of(63);
    let cleanup = ["--dead-server-cleanup-after", "2s"];
    let mut servers: Vec<Option<MeshNode>> =
        (1..=3u8).map(|i| Some(start_server_with(&net_b, &tmp.path().join(format!("b{i}")), i, 3, &cleanup))).collect();
    let leader = agreed_leader(&servers, &net_b).await;
    let follower = (leader + 1) % 3;
    let via = servers[follower].as_ref().unwrap().http.to_string();
    let out = mesh_cli(&["snapshot", "restore", file.to_str().unwrap(), "--http-addr", &via]);
    assert!(out.contains("Restored snapshot"), "{out}");
    for s in servers.iter().flatten() {
        eventually(30, &format!("the restored state on {}", s.name), || async {
            let (_, app) = s.get("/v2/apps/snap/web").await;
            let (_, db) = s.get("/v1/catalog/service/db?stale").await;
            let (_, sessions) = s.get("/v1/session/list?stale").await;
            let (_, lock) = s.get("/v1/kv/locks/snap?stale").await;
            let ok = app["app"]["instances"] == 2
                && db.as_array().is_some_and(|d| d.len() == 1 && d[0]["Address"] == "10.9.9.9")
                && read(s, "config/a", "&stale").await.as_deref() == Some("1")
                && read(s, "config/b", "&stale").await.as_deref() == Some("2")
                && sessions.as_array().is_some_and(|l| l.iter().any(|x| x["ID"] == sid.as_str()))
                && lock[0]["Session"] == sid.as_str();
            ok.then_some(())
        })
        .await;
    }
    // Writes go on after the restore (the leader's control loop starts again from it).
    put_until_accepted(servers[leader].as_ref().unwrap(), "after-restore", "yes").await;
    let peers = mesh_cli(&["operator", "raft", "list-peers", "--http-addr", &via]);
    assert_eq!(peers.lines().filter(|l| l.contains("leader")).count(), 1, "{peers}");
    assert_eq!(peers.lines().filter(|l| l.contains("follower")).count(), 2, "{peers}");

    // Autopilot's MinQuorum 3: a dead server of three is kept (the cleanup after 2 s would
    // leave two); its ServerStabilizationTime 3 s: a new server votes only after 3 s caught up.
    let autopilot = |min_quorum: u64| {
        serde_json::json!({
            "CleanupDeadServers": true, "LastContactThreshold": "200ms", "MaxTrailingLogs": 250,
            "MinQuorum": min_quorum, "ServerStabilizationTime": "3s",
        })
        .to_string()
    };
    let (s, v) = servers[leader]
        .as_ref()
        .unwrap()
        .send("PUT", "/v1/operator/autopilot/configuration", Some(&autopilot(3)))
        .await;
    assert_eq!((s, &v), (200, &Value::Bool(true)));
    let dead = (leader + 2) % 3;
    servers[dead].take().unwrap().stop_with("KILL");
    let l = servers[leader].as_ref().unwrap();
    let watched = Instant::now();
    while watched.elapsed() < Duration::from_secs(6) {
        let (_, p) = l.get("/v1/status/peers").await;
        assert_eq!(p.as_array().map(Vec::len), Some(3), "MinQuorum 3 keeps the dead server: {p}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // A server lost for good leaves the group by itself (autopilot), and writes go on.
    let (s, _) = l.send("PUT", "/v1/operator/autopilot/configuration", Some(&autopilot(0))).await;
    assert_eq!(s, 200);
    eventually(60, "the dead server removed from the group", || async {
        let (_, p) = l.get("/v1/status/peers").await;
        (p.as_array()?.len() == 2).then_some(())
    })
    .await;
    put_until_accepted(l, "with-two", "yes").await;

    // A new server joins: a learner until it caught up and stayed so for the stabilization time,
    // then a voter.
    let fresh = start_server_with(&net_b, &tmp.path().join("b4"), 4, 3, &cleanup);
    eventually(60, "the new server is a learner", || async {
        let (_, c) = l.get("/v1/operator/raft/configuration").await;
        c["Servers"].as_array()?.iter().any(|m| m["Node"] == "server4" && m["Voter"] == false).then_some(())
    })
    .await;
    let learner = Instant::now();
    eventually(60, "the new server is a voter", || async {
        let (_, c) = l.get("/v1/operator/raft/configuration").await;
        let list = c["Servers"].as_array()?.clone();
        let ok = list.len() == 3 && list.iter().any(|m| m["Node"] == "server4" && m["Voter"] == true);
        ok.then_some(())
    })
    .await;
    assert!(
        learner.elapsed() >= Duration::from_secs(2),
        "promoted {:?} after it was seen as a learner, before the 3 s stabilization time",
        learner.elapsed()
    );
    eventually(30, "the new server has the data", || async {
        (read(&fresh, "with-two", "&stale").await.as_deref() == Some("yes")).then_some(())
    })
    .await;
    // And an operator removes it again.
    let addr = format!("{net_b}.4:8300");
    let out = mesh_cli(&["operator", "raft", "remove-peer", "--address", &addr, "--http-addr", &via]);
    assert!(out.contains("Removed peer"), "{out}");
    eventually(30, "the removed server is gone from the configuration", || async {
        let (_, p) = l.get("/v1/status/peers").await;
        (p.as_array()?.len() == 2).then_some(())
    })
    .await;
}

/// Whether marathon-python and py-consul can be used (CI requires them).
fn have_python_clients() -> bool {
    let ok = std::process::Command::new("python3")
        .args(["-c", "import consul, marathon"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok && std::env::var("MESH_REQUIRE_PYTHON").as_deref() == Ok("1") {
        panic!("MESH_REQUIRE_PYTHON=1 but py-consul or marathon-python is not importable");
    }
    ok
}

/// A child process killed when dropped: a failing test leaves no client behind (the scripts
/// only stop when the test writes their stop file).
struct Reaped(Option<std::process::Child>);

impl Reaped {
    fn wait_with_output(mut self) -> std::process::Output {
        self.0.take().expect("child").wait_with_output().expect("wait")
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        if let Some(c) = &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// What tests/python/ha_framework.py last wrote to `path`.
fn framework_status(path: &Path) -> Option<Value> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_leader_kills_under_marathon_python_and_py_consul_load() {
    if !have_python_clients() {
        eprintln!("SKIP: py-consul / marathon-python not installed (tests/python/install.sh)");
        return;
    }
    let net = net_of(64);
    let tmp = tempfile::tempdir().expect("tempdir");
    // A fixed HTTP port beside the test's own (port 0) listener: the clients' list of servers
    // stays right across restarts.
    let fixed: Vec<String> = (1..=3).map(|i| format!("{net}.{i}:8500")).collect();
    let mut servers: Vec<Option<MeshNode>> = (1..=3u8)
        .map(|i| {
            let http = fixed[i as usize - 1].clone();
            Some(start_server_with(&net, &tmp.path().join(format!("server{i}")), i, 3, &["--http", &http]))
        })
        .collect();
    let agent = start_agent(&net, &tmp.path().join("agent0"));
    let mut leader = agreed_leader(&servers, &net).await;
    let stop = tmp.path().join("stop");
    // A pymesos framework given the agent's address, as a framework on any machine of the
    // cluster would be: the agent relays its stream and calls to the leader (no 307 pins it to a
    // server), and after a kill it reconnects to the agent and is relayed to the next leader. It
    // launches long-running tasks before the first kill.
    let fw_status = tmp.path().join("framework.json");
    let fw_tag = format!("ha-pymesos-{}", std::process::id());
    let framework = Reaped(Some(
        std::process::Command::new("python3")
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/python/ha_framework.py"))
            .arg(agent.http.to_string())
            .args([&fw_status, &stop])
            .arg(&fw_tag)
            .stdout(std::process::Stdio::piped())
            .stderr(
                std::fs::File::create(tmp.path().join("framework.log"))
                    .map_or(std::process::Stdio::inherit(), Into::into),
            )
            .spawn()
            .expect("python3"),
    ));
    let fw_tasks: BTreeSet<String> = (0..3).map(|i| format!("ha-fw-{i}")).collect();
    let fid = eventually(60, "the pymesos framework runs its tasks", || async {
        let s = framework_status(&fw_status)?;
        let running = s["states"].as_object()?.iter().filter(|(_, v)| *v == "TASK_RUNNING").count();
        (running == fw_tasks.len()).then(|| s["framework_id"].as_str().map(str::to_owned))?
    })
    .await;
    let fw_pids = eventually(30, "the framework's 3 task processes", || async {
        let p = tagged_pids(&fw_tag, "sleep");
        (p.len() == fw_tasks.len()).then_some(p)
    })
    .await;
    let urls: Vec<String> = fixed.iter().map(|a| format!("http://{a}")).collect();
    let load = Reaped(Some(
        std::process::Command::new("python3")
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/python/ha_load.py"))
            .args([urls.join(","), stop.to_string_lossy().into_owned()])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("python3"),
    ));

    let kills: usize = std::env::var("MESH_HA_KILLS").ok().and_then(|s| s.parse().ok()).unwrap_or(20);
    let mut took = Vec::new();
    for round in 0..kills {
        let mut old = servers[leader].take().expect("leader");
        old.stop_with("KILL");
        let other = servers.iter().flatten().next().unwrap();
        took.push(put_until_accepted(other, &format!("probe/{round}"), "x").await);
        servers[leader] = Some(restart(&old));
        leader = agreed_leader(&servers, &net).await;
    }
    // The framework follows: subscribed to the current leader with the same id, its three
    // tasks running there (none lost, none doubled), and it saw itself re-registered and
    // reconciled its tasks as running.
    let l = servers[leader].as_ref().unwrap();
    let agent_addr = agent.http.to_string();
    let followed = Instant::now();
    let seen = eventually(120, "the pymesos framework subscribed to the current leader with its tasks", || async {
        let (_, v) = l.get("/master/frameworks").await;
        let f = v["frameworks"].as_array()?.iter().find(|f| f["id"] == fid.as_str())?.clone();
        let running: Vec<&str> = f["tasks"]
            .as_array()?
            .iter()
            .filter(|t| t["state"] == "TASK_RUNNING")
            .filter_map(|t| t["id"].as_str())
            .collect();
        let ids: BTreeSet<String> = running.iter().map(|s| s.to_string()).collect();
        let ok = f["active"] == true && f["connected"] == true && running.len() == ids.len() && ids == fw_tasks;
        let s = framework_status(&fw_status)?;
        // It never left the agent's address (pymesos names the address it is connected to).
        let at_leader = s["masters"].as_array()?.iter().all(|m| m.as_str() == Some(agent_addr.as_str()));
        let reconciled =
            s["reconciled"].as_object()?.values().filter(|v| *v == "TASK_RUNNING").count() == fw_tasks.len();
        // Offers come again after the failover (the framework declines them for 2 s at a time).
        let offered = s["offers_since_reregistered"].as_u64()? >= 1;
        (ok && at_leader && reconciled && offered && s["states"].as_object()?.values().all(|v| v == "TASK_RUNNING"))
            .then_some(s)
    })
    .await;
    let waited = followed.elapsed();
    assert_eq!(seen["framework_id"].as_str(), Some(fid.as_str()));
    assert_eq!(seen["registered"], 1, "registered once, re-registered after that: {seen}");
    let rereg = seen["reregistrations"].as_array().cloned().unwrap_or_default();
    assert!(!rereg.is_empty(), "the framework re-subscribed: {seen}");
    assert!(seen["error_events"].as_array().is_some_and(Vec::is_empty), "no ERROR event: {seen}");
    assert_eq!(seen["launched"].as_array().map(Vec::len), Some(fw_tasks.len()), "no task launched twice: {seen}");
    let mut after: Vec<f64> = rereg.iter().filter_map(|r| r["after_s"].as_f64()).collect();
    after.sort_by(f64::total_cmp);
    eprintln!(
        "pymesos: {} re-subscriptions after {} broken streams; stream broken to re-registered: median {:.1}s, max {:.1}s ({after:?}); {} offers ({} since the last re-registration); {} redirects followed; {} calls failed during failovers; subscribed to the last leader {:.1}s after the last kill's new leader was agreed; masters {}, redirects {}",
        rereg.len(),
        seen["disconnects"],
        after.get(after.len() / 2).copied().unwrap_or(f64::NAN),
        after.last().copied().unwrap_or(f64::NAN),
        seen["offers"],
        seen["offers_since_reregistered"],
        seen["redirects"].as_array().map_or(0, Vec::len),
        seen["call_errors"].as_array().map_or(0, Vec::len),
        waited.as_secs_f64(),
        seen["masters"],
        seen["redirects"],
    );

    assert_eq!(tagged_pids(&fw_tag, "sleep"), fw_pids, "the framework's tasks ran on, none restarted");

    std::fs::write(&stop, b"").unwrap();
    // The framework tears itself down on stop: completed on the leader, its tasks killed.
    let out = framework.wait_with_output();
    assert!(
        out.status.success(),
        "framework: {}",
        std::fs::read_to_string(tmp.path().join("framework.log")).unwrap_or_default()
    );
    eventually(60, "the torn-down framework completed, its tasks ended", || async {
        let (_, v) = l.get("/master/frameworks").await;
        let done = v["completed_frameworks"].as_array()?.iter().find(|f| f["id"] == fid.as_str())?.clone();
        let ended = done["completed_tasks"]
            .as_array()?
            .iter()
            .filter(|t| t["id"].as_str().is_some_and(|id| fw_tasks.contains(id)))
            .count();
        (ended == fw_tasks.len() && v["frameworks"].as_array()?.iter().all(|f| f["id"] != fid.as_str())).then_some(())
    })
    .await;
    eventually(60, "the framework's task processes ended", || async {
        tagged_pids(&fw_tag, "sleep").is_empty().then_some(())
    })
    .await;
    let out = load.wait_with_output();
    assert!(out.status.success(), "load: {}", String::from_utf8_lossy(&out.stderr));
    let summary: Value = serde_json::from_slice(&out.stdout).expect("summary");
    took.sort();
    let median = took[took.len() / 2];
    let max = took[took.len() - 1];
    eprintln!(
        "{kills} leader SIGKILLs under load: first accepted write after median {median:?}, max {max:?}; {} apps and {} keys acknowledged, {} app and {} KV calls failed",
        summary["apps"].as_array().map_or(0, Vec::len),
        summary["keys"].as_array().map_or(0, Vec::len),
        summary["app_errors"],
        summary["kv_errors"],
    );

    // Nothing acknowledged is lost; every app runs exactly its one instance, no task twice.
    let acked_apps: Vec<String> = serde_json::from_value(summary["apps"].clone()).unwrap();
    assert!(!acked_apps.is_empty(), "marathon-python created apps");
    assert!(summary["keys"].as_array().is_some_and(|k| !k.is_empty()), "py-consul wrote keys");
    for key in summary["keys"].as_array().unwrap() {
        let k = key.as_str().unwrap();
        assert!(read(l, k, "").await.is_some(), "acknowledged key {k} lost");
    }
    eventually(120, "every app runs its one instance, no task twice", || async {
        let (_, v) = l.get("/v2/apps?embed=apps.tasks").await;
        let apps = v["apps"].as_array()?.clone();
        let ids: BTreeSet<&str> = apps.iter().filter_map(|a| a["id"].as_str()).collect();
        let all_there = acked_apps.iter().all(|a| ids.contains(a.as_str()));
        let mut tasks = Vec::new();
        let mut right = true;
        for a in apps.iter().filter(|a| a["id"].as_str().is_some_and(|i| i.starts_with("/load/"))) {
            let running: Vec<&str> = a["tasks"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|t| t["state"] == "TASK_RUNNING")
                .filter_map(|t| t["id"].as_str())
                .collect();
            right &= running.len() as u64 == a["instances"].as_u64().unwrap_or(0);
            tasks.extend(running);
        }
        let unique: BTreeSet<&&str> = tasks.iter().collect();
        (all_there && right && unique.len() == tasks.len()).then_some(())
    })
    .await;
    let (s, v) = l.send("DELETE", "/v2/groups/load?force=true", None).await;
    assert!(s == 200 || s == 202, "{v}");
}

/// SUBSCRIBE `framework_id` (a new framework when `None`) at `addr`'s Mesos scheduler API,
/// not following redirects: the status, the Location, and the open response.
async fn subscribe(client: &reqwest::Client, addr: &str, framework_id: Option<&str>) -> reqwest::Response {
    let mut call = serde_json::json!({
        "type": "SUBSCRIBE",
        "subscribe": {"framework_info": {"user": "", "name": "deposed", "failover_timeout": 100}},
    });
    if let Some(id) = framework_id {
        call["framework_id"] = serde_json::json!({"value": id});
        call["subscribe"]["framework_info"]["id"] = serde_json::json!({"value": id});
    }
    client
        .post(format!("http://{addr}/api/v1/scheduler"))
        .header("Content-Type", "application/json")
        .header("Accept", "application/json")
        .body(call.to_string())
        .send()
        .await
        .expect("SUBSCRIBE")
}

/// Read a RecordIO event stream until an event of type `kind`; that event.
async fn next_event(resp: &mut reqwest::Response, buf: &mut Vec<u8>, kind: &str) -> Value {
    loop {
        // Records are `<length>\n<json>`.
        while let Some(nl) = buf.iter().position(|b| *b == b'\n') {
            let len: usize = std::str::from_utf8(&buf[..nl]).unwrap().trim().parse().unwrap();
            if buf.len() < nl + 1 + len {
                break;
            }
            let ev: Value = serde_json::from_slice(&buf[nl + 1..nl + 1 + len]).unwrap();
            buf.drain(..nl + 1 + len);
            if ev["type"] == kind {
                return ev;
            }
        }
        let chunk = tokio::time::timeout(Duration::from_secs(30), resp.chunk())
            .await
            .unwrap_or_else(|_| panic!("no {kind} event in 30 s"))
            .expect("stream")
            .unwrap_or_else(|| panic!("the stream ended before a {kind} event"));
        buf.extend_from_slice(&chunk);
    }
}

/// A framework's stream lives on the leader's control loop. A leader that loses its quorum
/// steps down, and its framework streams must end then: pymesos (like most schedulers) has no
/// heartbeat timeout and only reconnects when its stream ends, so a stream left open would hold
/// it on a server that no longer leads. Reconnecting to the same address, it is sent on to the
/// leader and re-subscribes with its framework id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_that_steps_down_ends_its_framework_streams() {
    let net = net_of(65);
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut servers: Vec<Option<MeshNode>> =
        (1..=3u8).map(|i| Some(start_server(&net, &tmp.path().join(format!("server{i}")), i))).collect();
    let leader = agreed_leader(&servers, &net).await;
    let addr = servers[leader].as_ref().unwrap().http.to_string();
    let client = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    let mut stream = subscribe(&client, &addr, None).await;
    assert_eq!(stream.status(), 200);
    let mut buf = Vec::new();
    let ev = next_event(&mut stream, &mut buf, "SUBSCRIBED").await;
    let fid = ev["subscribed"]["framework_id"]["value"].as_str().expect("framework id").to_owned();

    // Both followers die: the leader hears no quorum, steps down, and the stream ends.
    let mut killed = Vec::new();
    for i in (0..3).filter(|i| *i != leader) {
        let mut s = servers[i].take().unwrap();
        s.stop_with("KILL");
        killed.push((i, s));
    }
    let start = Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(30), async {
        // Heartbeats until it ends (or the connection closes).
        while let Ok(Some(_)) = stream.chunk().await {}
    })
    .await;
    assert!(ended.is_ok(), "the framework stream was still open 30 s after the leader lost its quorum");
    eprintln!("the deposed leader ended the framework stream {:?} after its followers died", start.elapsed());

    // The followers come back; the framework reconnects to the address it had and ends up
    // subscribed to the leader with its id (sent there by a 307 if another server leads).
    for (i, s) in killed {
        servers[i] = Some(restart(&s));
    }
    let now = agreed_leader(&servers, &net).await;
    let leader_addr = servers[now].as_ref().unwrap().http.to_string();
    // Where the framework connects next: the address it had, then wherever a 307 sends it.
    let at = std::sync::Mutex::new(addr.clone());
    let mut resp = eventually(60, "a re-subscription accepted", || async {
        let here = at.lock().unwrap().clone();
        let r = subscribe(&client, &here, Some(&fid)).await;
        if r.status() == 307 {
            let loc = r.headers().get("location")?.to_str().ok()?;
            *at.lock().unwrap() = loc.trim_start_matches("//").split('/').next()?.to_owned();
            return None;
        }
        (r.status() == 200).then_some(r)
    })
    .await;
    let at = at.into_inner().unwrap();
    assert_eq!(at, leader_addr, "re-subscribed at the leader");
    assert_resubscribed(&mut resp, servers[now].as_ref().unwrap(), &fid).await;
}

/// A framework given an agent's address is relayed by the agent to the leader (no 307 that
/// would pin it to one server): when the leader dies for good, its stream ends, and subscribing
/// again at the same agent reaches the new leader with the same framework id. pymesos (without
/// ZooKeeper) keeps whatever address it was last redirected to, so this is what lets it outlive
/// a leader that never returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_framework_at_an_agent_outlives_a_leader_that_never_returns() {
    let net = net_of(71);
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut servers: Vec<Option<MeshNode>> =
        (1..=3u8).map(|i| Some(start_server(&net, &tmp.path().join(format!("server{i}")), i))).collect();
    let agent = start_agent(&net, &tmp.path().join("agent0"));
    let leader = agreed_leader(&servers, &net).await;
    let at = agent.http.to_string();
    let client = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    let mut stream = eventually(60, "a subscription through the agent", || async {
        let r = subscribe(&client, &at, None).await;
        assert_ne!(r.status(), 307, "the agent relays, it does not redirect");
        (r.status() == 200).then_some(r)
    })
    .await;
    let stream_id =
        stream.headers().get("mesos-stream-id").and_then(|v| v.to_str().ok()).expect("stream id").to_owned();
    let mut buf = Vec::new();
    let ev = next_event(&mut stream, &mut buf, "SUBSCRIBED").await;
    let fid = ev["subscribed"]["framework_id"]["value"].as_str().expect("framework id").to_owned();
    // Calls go the same way (to the leader that holds the stream).
    let reconcile =
        serde_json::json!({"type": "RECONCILE", "framework_id": {"value": fid}, "reconcile": {"tasks": []}});
    let r = client
        .post(format!("http://{at}/api/v1/scheduler"))
        .header("Content-Type", "application/json")
        .header("Mesos-Stream-Id", &stream_id)
        .body(reconcile.to_string())
        .send()
        .await
        .expect("RECONCILE");
    assert_eq!(r.status(), 202, "{:?}", r.text().await);

    // The leader dies and stays dead.
    let mut dead = servers[leader].take().unwrap();
    dead.stop_with("KILL");
    let ended =
        tokio::time::timeout(Duration::from_secs(30), async { while let Ok(Some(_)) = stream.chunk().await {} }).await;
    assert!(ended.is_ok(), "the relayed stream was still open 30 s after the leader died");
    let now = agreed_leader(&servers, &net).await;
    assert_ne!(now, leader);
    let mut resp = eventually(60, "a re-subscription at the same agent", || async {
        let r = subscribe(&client, &at, Some(&fid)).await;
        assert_ne!(r.status(), 307, "the agent relays, it does not redirect");
        (r.status() == 200).then_some(r)
    })
    .await;
    assert_resubscribed(&mut resp, servers[now].as_ref().unwrap(), &fid).await;
}

/// The subscription `resp` is answered SUBSCRIBED with the framework id `fid`, and the leader
/// lists that framework as connected and active.
async fn assert_resubscribed(resp: &mut reqwest::Response, leader: &MeshNode, fid: &str) {
    let ev = next_event(resp, &mut Vec::new(), "SUBSCRIBED").await;
    assert_eq!(ev["subscribed"]["framework_id"]["value"].as_str(), Some(fid));
    let (_, v) = leader.get("/master/frameworks").await;
    let f = v["frameworks"].as_array().and_then(|a| a.iter().find(|f| f["id"] == fid)).cloned();
    assert!(f.as_ref().is_some_and(|f| f["connected"] == true && f["active"] == true), "{v}");
}

/// GET `path` on `node` with a client that follows no redirect: status, headers, body as JSON
/// (`Null` when it is not JSON); `None` when the server does not answer within `secs`.
async fn get_raw(node: &MeshNode, path: &str, secs: u64) -> Option<(u16, reqwest::header::HeaderMap, Value)> {
    let client = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().ok()?;
    let r = client.get(node.url(path)).timeout(Duration::from_secs(secs)).send().await.ok()?;
    let (status, headers) = (r.status().as_u16(), r.headers().clone());
    let text = r.text().await.ok()?;
    Some((status, headers, serde_json::from_str(&text).unwrap_or(Value::Null)))
}

/// `X-Consul-LastContact` and `X-Consul-KnownLeader` of a `?stale` read through `node`.
async fn stale_contact(node: &MeshNode) -> Option<(u64, String)> {
    let (status, h, _) = get_raw(node, "/v1/kv/ap-probe?stale", 5).await?;
    if status != 200 {
        return None;
    }
    let contact = h.get("X-Consul-LastContact")?.to_str().ok()?.parse().ok()?;
    Some((contact, h.get("X-Consul-KnownLeader")?.to_str().ok()?.to_owned()))
}

/// Send `signal` to a running server without waiting for it to exit (SIGSTOP, SIGCONT).
fn signal(node: &MeshNode, signal: &str) {
    let pid = node.child.as_ref().expect("running").id().to_string();
    let ok = std::process::Command::new("kill").args([&format!("-{signal}"), &pid]).status().expect("kill");
    assert!(ok.success(), "kill -{signal} {pid}");
}

/// Autopilot's health with every server of the group that `want` accepts, asked through `node`.
async fn autopilot_health(node: &MeshNode, want: impl Fn(u16, &Value) -> bool) -> Option<Value> {
    let (status, _, h) = get_raw(node, "/v1/operator/autopilot/health", 5).await?;
    want(status, &h).then_some(h)
}

/// The operator views tell the truth about the Raft group: autopilot's health and failure
/// tolerance follow a SIGKILLed follower and its restart, autopilot's configuration is
/// replicated (a PUT on one server is read on another) and `CleanupDeadServers=false` keeps a
/// dead server in the group, a follower's `X-Consul-LastContact` is small and grows while it
/// hears from no leader (`?max_stale` then goes to the leader), and the Mesos master's
/// `leader`, `/master/redirect` and `/v2/leader` name the Raft leader on every server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_views_show_the_real_raft_group() {
    let net = net_of(67);
    let tmp = tempfile::tempdir().expect("tempdir");
    let more = ["--dead-server-cleanup-after", "1s"];
    let mut servers: Vec<Option<MeshNode>> =
        (1..=3u8).map(|i| Some(start_server_with(&net, &tmp.path().join(format!("server{i}")), i, 3, &more))).collect();
    let leader = agreed_leader(&servers, &net).await;
    let (_, conf) = servers[leader].as_ref().unwrap().get("/v1/operator/raft/configuration").await;
    let leader_id = conf["Servers"].as_array().unwrap().iter().find(|s| s["Leader"] == true).unwrap()["ID"].clone();

    // Every server (asking the leader) reports three healthy voters, one leader, tolerance 1.
    let all_healthy = |status: u16, h: &Value| {
        let list = h["Servers"].as_array().cloned().unwrap_or_default();
        status == 200
            && h["Healthy"] == true
            && h["FailureTolerance"] == 1
            && list.len() == 3
            && list.iter().filter(|s| s["Leader"] == true).count() == 1
            && list.iter().all(|s| s["Healthy"] == true && s["SerfStatus"] == "alive" && s["Voter"] == true)
    };
    for s in servers.iter().flatten() {
        let h = eventually(30, "autopilot: 3 healthy servers", || autopilot_health(s, all_healthy)).await;
        for m in h["Servers"].as_array().unwrap() {
            for field in ["ID", "Name", "Address", "Version", "LastContact", "StableSince"] {
                assert!(m[field].as_str().is_some_and(|v| !v.is_empty()), "{field} in {m}");
            }
            assert!(m["LastTerm"].as_u64().unwrap() > 0 && m["LastIndex"].as_u64().unwrap() > 0, "{m}");
            if m["Leader"] == true {
                assert_eq!(m["LastContact"], "0s", "{m}");
                assert_eq!(m["ID"], leader_id, "{h}");
            }
        }
    }

    // The Mesos master, Marathon and Consul name the Raft leader on every server.
    let leader_http = servers[leader].as_ref().unwrap().http.to_string();
    for s in servers.iter().flatten() {
        let (_, st) = s.get("/master/state").await;
        assert_eq!(st["leader"].as_str(), Some(format!("master@{leader_http}").as_str()), "on {}", s.name);
        assert_eq!(st["leader_info"]["pid"], st["leader"], "on {}", s.name);
        let (status, h, _) = get_raw(s, "/master/redirect", 10).await.expect("redirect");
        assert_eq!(status, 307, "on {}", s.name);
        let loc = h.get("location").and_then(|v| v.to_str().ok()).map(str::to_owned);
        assert_eq!(loc, Some(format!("//{leader_http}")), "on {}", s.name);
        assert_eq!(s.get("/v2/leader").await.1["leader"].as_str(), Some(leader_http.as_str()), "on {}", s.name);
    }

    // A follower's stale read: it knows the leader, and heard from it a heartbeat or so ago.
    let (fa, fb) = ((leader + 1) % 3, (leader + 2) % 3);
    put_until_accepted(servers[leader].as_ref().unwrap(), "ap-probe", "x").await;
    let (contact, known) =
        eventually(30, "a stale read on a follower", || stale_contact(servers[fa].as_ref().unwrap())).await;
    assert_eq!(known, "true");
    assert!(contact < 2000, "X-Consul-LastContact {contact} ms on a follower with a live leader");
    eprintln!("X-Consul-LastContact on a follower with a live leader: {contact} ms");

    // Autopilot's configuration: a PUT through one server (CAS on the index it read), read back
    // through another, also with py-consul.
    let s0 = servers[leader].as_ref().unwrap();
    let (_, before) = s0.get("/v1/operator/autopilot/configuration").await;
    assert_eq!(before["CleanupDeadServers"], true, "{before}");
    assert_eq!(before["LastContactThreshold"], "200ms", "{before}");
    let mut next = before.clone();
    next["CleanupDeadServers"] = Value::Bool(false);
    let idx = before["ModifyIndex"].as_u64().unwrap();
    let body = next.to_string();
    let f = servers[fa].as_ref().unwrap();
    let stale = format!("/v1/operator/autopilot/configuration?cas={}", idx + 1000);
    assert_eq!(f.send("PUT", &stale, Some(&body)).await.1, Value::Bool(false), "a stale CAS");
    let (code, _) = f.send("PUT", "/v1/operator/autopilot/configuration", Some(r#"{"MaxTrailingLogs": -1}"#)).await;
    assert_eq!(code, 400, "bad input");
    let (code, _) = f.send("PUT", "/v1/operator/autopilot/configuration?cas=x", Some(&body)).await;
    assert_eq!(code, 400, "bad cas");
    let right = format!("/v1/operator/autopilot/configuration?cas={idx}");
    assert_eq!(f.send("PUT", &right, Some(&body)).await.1, Value::Bool(true));
    let other = servers[fb].as_ref().unwrap();
    // Through the other server: its default read is the leader's; its `?stale` read is its own
    // state machine, which applies the command from the log.
    let (_, after) = other.get("/v1/operator/autopilot/configuration").await;
    assert_eq!(after["CleanupDeadServers"], false, "read through another server: {after}");
    let after = eventually(30, "the other server applied the configuration", || async {
        let (_, v) = other.get("/v1/operator/autopilot/configuration?stale").await;
        (v["CleanupDeadServers"] == false).then_some(v)
    })
    .await;
    assert_eq!(after["MaxTrailingLogs"], 250, "{after}");
    assert!(after["ModifyIndex"].as_u64().unwrap() > idx, "{after}");
    if have_python_clients() {
        let script = "import consul, json, sys\n\
            c = consul.Consul(host=sys.argv[1], port=int(sys.argv[2]))\n\
            print(json.dumps({'config': c.operator.autopilot_configuration(), 'health': c.operator.autopilot_health()}))";
        let out = std::process::Command::new("python3")
            .args(["-c", script, &other.http.ip().to_string(), &other.http.port().to_string()])
            .output()
            .expect("python3");
        assert!(out.status.success(), "py-consul: {}", String::from_utf8_lossy(&out.stderr));
        let v: Value = serde_json::from_slice(&out.stdout).expect("py-consul's JSON");
        assert_eq!(v["config"]["CleanupDeadServers"], false, "{v}");
        assert_eq!(v["health"]["Servers"].as_array().map(Vec::len), Some(3), "{v}");
    }

    // SIGKILL a follower: autopilot says so (429, that server unhealthy, tolerance 0), and with
    // CleanupDeadServers off the leader keeps it in the group past --dead-server-cleanup-after.
    let mut victim = servers[fa].take().unwrap();
    victim.stop_with("KILL");
    let l = servers[leader].as_ref().unwrap();
    let victim_name = victim.name.clone();
    let h = eventually(30, "autopilot: the killed server unhealthy", || {
        autopilot_health(l, |status, h| {
            let list = h["Servers"].as_array().cloned().unwrap_or_default();
            let dead = list.iter().find(|s| s["Name"] == victim_name.as_str());
            status == 429
                && h["Healthy"] == false
                && h["FailureTolerance"] == 0
                && list.len() == 3
                && dead.is_some_and(|d| d["Healthy"] == false && d["SerfStatus"] == "failed")
                && list.iter().filter(|s| s["Healthy"] == true).count() == 2
        })
    })
    .await;
    eprintln!("autopilot health with a follower killed: {h}");
    eventually(30, "the leader keeps the dead server (CleanupDeadServers off)", || async {
        l.log().contains("CleanupDeadServers is off; keeping a dead server").then_some(())
    })
    .await;
    let (_, conf) = l.get("/v1/operator/raft/configuration").await;
    assert_eq!(conf["Servers"].as_array().map(Vec::len), Some(3), "still 3 members: {conf}");

    // It comes back: healthy again, tolerance 1.
    servers[fa] = Some(restart(&victim));
    drop(victim);
    let l = servers[leader].as_ref().unwrap();
    eventually(60, "autopilot: healthy again after the restart", || autopilot_health(l, all_healthy)).await;

    // The follower hears from no leader (the leader and the other follower stopped): its
    // X-Consul-LastContact grows, it says it knows no leader, and a `?max_stale` read below
    // that age goes to the (absent) leader instead of being answered locally.
    let f = servers[fa].as_ref().unwrap();
    eventually(30, "the restarted follower hears from the leader", || async {
        stale_contact(f).await.filter(|(c, k)| *c < 2000 && k == "true")
    })
    .await;
    signal(servers[leader].as_ref().unwrap(), "STOP");
    signal(servers[fb].as_ref().unwrap(), "STOP");
    let seen = std::sync::Mutex::new(Vec::new());
    eventually(30, "X-Consul-LastContact grows past 3 s", || async {
        let (c, known) = stale_contact(f).await?;
        seen.lock().unwrap().push(c);
        (c > 3000 && known == "false").then_some(())
    })
    .await;
    let seen = seen.into_inner().unwrap();
    assert!(seen.windows(2).all(|w| w[1] >= w[0]), "LastContact only grows: {seen:?}");
    eprintln!("X-Consul-LastContact while no leader is heard: {seen:?}");
    let (status, _, _) = get_raw(f, "/v1/kv/ap-probe?max_stale=1s", 20).await.expect("max_stale read");
    assert_eq!(status, 500, "a max_stale read older than allowed goes to the leader (none)");
    let (status, _, _) = get_raw(f, "/v1/kv/ap-probe?max_stale=10m", 20).await.expect("max_stale read");
    assert_eq!(status, 200, "a max_stale read within the allowed age is answered here");
    let (status, _, _) = get_raw(f, "/v1/kv/ap-probe?max_stale=soon", 20).await.expect("max_stale read");
    assert_eq!(status, 400, "max_stale must be a duration");
    signal(servers[leader].as_ref().unwrap(), "CONT");
    signal(servers[fb].as_ref().unwrap(), "CONT");

    // After that, every server names one leader again and the views follow it.
    let leader = agreed_leader(&servers, &net).await;
    let leader_http = servers[leader].as_ref().unwrap().http.to_string();
    for s in servers.iter().flatten() {
        eventually(30, "/master/state names the Raft leader", || async {
            let (_, _, st) = get_raw(s, "/master/state", 10).await?;
            (st["leader"].as_str() == Some(format!("master@{leader_http}").as_str())).then_some(())
        })
        .await;
        eventually(30, "autopilot: healthy after the pause", || autopilot_health(s, all_healthy)).await;
    }
}

/// A write whose answer is lost because the leader died between committing it and answering
/// is applied once: the follower or agent that forwarded it sends it again, with the same
/// request id, to the next leader, which answers as the first one would have. A Marathon app
/// create (create-only: a second apply would be 409) and a Consul CAS create (a second apply
/// would be `false`), each with the leader killed at exactly that moment
/// (`MESH_TEST_CRASH_AFTER_FORWARDED_WRITE`); then a client's own retry with its
/// `X-Mesh-Request-Id`, and a malformed id refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_whose_answer_died_with_the_leader_is_applied_once() {
    let net = net_of(72);
    let tmp = tempfile::tempdir().expect("tempdir");
    // The fault: while this file names a path, the leader dies after a forwarded write there.
    let marker = tmp.path().join("crash-after");
    let marker_s = marker.to_str().unwrap().to_owned();
    let env = [("MESH_TEST_CRASH_AFTER_FORWARDED_WRITE", marker_s.as_str())];
    let start = |i: u8| start_server_env(&net, &tmp.path().join(format!("server{i}")), i, 3, &[], &env);
    let mut servers: Vec<Option<MeshNode>> = (1..=3u8).map(|i| Some(start(i))).collect();
    let agent = start_agent(&net, &tmp.path().join("agent0"));
    let leader = agreed_leader(&servers, &net).await;
    let follower = (leader + 1) % 3;

    // 1. An app created through a follower; the leader dies after committing it.
    std::fs::write(&marker, "/v2/apps").unwrap();
    let app = r#"{"id":"/once","cmd":"sleep 1000","instances":1,"cpus":0.1,"mem":16}"#;
    let r = servers[follower]
        .as_ref()
        .unwrap()
        .client
        .post(servers[follower].as_ref().unwrap().url("/v2/apps"))
        .header("Content-Type", "application/json")
        .body(app)
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .expect("POST /v2/apps");
    let status = r.status().as_u16();
    let deployment = r.headers().get("marathon-deployment-id").and_then(|v| v.to_str().ok()).map(str::to_owned);
    let body = r.text().await.unwrap_or_default();
    assert!(!marker.exists(), "the fault fired: the leader died after the write");
    assert_eq!(status, 201, "the retried create is answered as the first one, not 409: {body}");
    assert!(deployment.is_some(), "a deployment id");
    let mut dead = servers[leader].take().unwrap();
    let gone_by = Instant::now() + Duration::from_secs(30);
    while dead.child.as_mut().is_some_and(|c| c.try_wait().ok().flatten().is_none()) {
        assert!(Instant::now() < gone_by, "the leader did not die");
        tokio::time::sleep(Duration::from_millis(50)).await; // polling a child's exit
    }
    let now = agreed_leader(&servers, &net).await;
    assert_ne!(now, leader);
    let (s, v) = servers[now].as_ref().unwrap().get("/v2/apps/once/versions").await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["versions"].as_array().map(Vec::len), Some(1), "created once: {v}");
    eventually(60, "the app has its one task", || async {
        let t = task_ids(servers[now].as_ref().unwrap(), "once").await;
        (t.len() == 1 && t[0].1 == "TASK_RUNNING").then_some(())
    })
    .await;

    // 2. The dead server comes back; a CAS create through the agent; the next leader dies.
    servers[leader] = Some(start(leader as u8 + 1));
    drop(dead);
    eventually(60, "three voters again", || async {
        let (_, v) = servers[now].as_ref().unwrap().get("/v1/status/peers").await;
        (v.as_array()?.len() == 3).then_some(())
    })
    .await;
    let leader = agreed_leader(&servers, &net).await;
    std::fs::write(&marker, "/v1/kv/once").unwrap();
    let r = agent
        .client
        .put(agent.url("/v1/kv/once?cas=0"))
        .body("1")
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .expect("PUT");
    let (status, body) = (r.status().as_u16(), r.text().await.unwrap_or_default());
    assert!(!marker.exists(), "the fault fired again");
    assert_eq!((status, body.trim()), (200, "true"), "the retried CAS create is answered true");
    let mut dead = servers[leader].take().unwrap();
    dead.stop_with("KILL");
    let now = agreed_leader(&servers, &net).await;
    let (s, v) = servers[now].as_ref().unwrap().get("/v1/kv/once").await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v[0]["CreateIndex"], v[0]["ModifyIndex"], "written once: {v}");

    // 3. A client's own retry: the same X-Mesh-Request-Id through two servers is one session,
    // answered with the same ID both times.
    let others: Vec<&MeshNode> = servers.iter().flatten().collect();
    let mut ids = Vec::new();
    for s in &others {
        let r = s
            .client
            .put(s.url("/v1/session/create"))
            .header("X-Mesh-Request-Id", "client-retry-1")
            .body(r#"{"Name":"once","Node":"agent0"}"#)
            .send()
            .await
            .expect("session create");
        let status = r.status();
        let text = r.text().await.unwrap();
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{status}: {e}: {text}"));
        assert_eq!(status, 200, "{v}");
        ids.push(v["ID"].as_str().unwrap().to_owned());
    }
    assert_eq!(ids[0], ids[1], "the retry is answered with the first one's session");
    let (_, list) = others[0].get("/v1/session/list").await;
    let named = list.as_array().unwrap().iter().filter(|s| s["Name"] == "once").count();
    assert_eq!(named, 1, "one session: {list}");

    // 4. A malformed id is refused, in the API's own format, and nothing is written.
    let r = others[0]
        .client
        .put(others[0].url("/v1/kv/bad"))
        .header("X-Mesh-Request-Id", "not an id")
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(r.text().await.unwrap().contains("Invalid X-Mesh-Request-Id"));
    let r = others[1]
        .client
        .post(others[1].url("/v2/apps"))
        .header("X-Mesh-Request-Id", "x".repeat(200))
        .header("Content-Type", "application/json")
        .body(r#"{"id":"/bad","cmd":"sleep 1"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert!(v["message"].as_str().is_some_and(|m| m.contains("Invalid X-Mesh-Request-Id")), "{v}");
    assert_eq!(others[0].get("/v1/kv/bad").await.0, 404);
    assert_eq!(others[0].get("/v2/apps/bad").await.0, 404);
}
