//! Crash loop (issue 10): 20 times, `mesh dev` is SIGKILLed while apps are being created and
//! scaled and KV writes are in flight, then restarted on the same data dir. After every restart,
//! once deployments have settled:
//!
//! - every app has exactly `instances` task processes (found by the tag in their environment),
//!   each in the sandbox of one of the app's running tasks: no orphan, no duplicate;
//! - every acknowledged write is there: each KV PUT that got 200, each app that got 201, and the
//!   instance count of each scale that got 200 (or of a later one whose answer was lost).
//!
//! Some apps start a process that leaves their process group (`setsid`), so escaped processes
//! are checked as well. At the end a clean SIGTERM leaves no task process at all.

mod support;

use serde_json::json;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::*;

const CYCLES: usize = 20;
const MAX_APPS: usize = 10;

/// What the load got acknowledged, and what it sent without an answer.
#[derive(Default)]
struct Ledger {
    keys: BTreeSet<String>,
    apps: BTreeSet<String>,
    /// Per app: the last acknowledged instance count.
    instances: BTreeMap<String, u64>,
    /// Per app: instance counts sent after that without an answer (they may have been applied).
    maybe: BTreeMap<String, BTreeSet<u64>>,
}

struct Load {
    /// The node's base URL while it is up.
    base: Mutex<Option<String>>,
    active: AtomicBool,
    /// Held by a loader during each request, so `pause` can wait for the ones in flight.
    gate: tokio::sync::Mutex<()>,
    ledger: Mutex<Ledger>,
    tag: String,
}

impl Load {
    async fn pause(&self) {
        self.active.store(false, Ordering::SeqCst);
        drop(self.gate.lock().await);
    }

    fn resume(&self, base: String) {
        *self.base.lock().unwrap() = Some(base);
        self.active.store(true, Ordering::SeqCst);
    }

    fn app_json(&self, id: &str, instances: u64) -> String {
        // Every third app leaves a process outside its process group.
        let escapes = id.trim_start_matches("/crash/a").parse::<usize>().unwrap_or(0) % 3 == 0;
        let cmd = if escapes { "setsid sleep 1000 & exec sleep 1000" } else { "exec sleep 1000" };
        json!({"id": id, "cmd": cmd, "instances": instances, "cpus": 0.01, "mem": 16,
               "env": {"MESH_TEST_TAG": self.tag}})
        .to_string()
    }
}

/// Writes KV keys and creates or scales apps, one request at a time each, while active.
async fn run_load(load: Arc<Load>, kv: bool) {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert("Content-Type", "application/json".parse().unwrap());
    let client = reqwest::Client::builder().timeout(Duration::from_secs(3)).default_headers(headers).build().unwrap();
    let mut n: u64 = 0;
    loop {
        if !load.active.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(5)).await;
            continue;
        }
        let _g = load.gate.lock().await;
        let Some(base) = load.base.lock().unwrap().clone() else { continue };
        if !load.active.load(Ordering::SeqCst) {
            continue;
        }
        n += 1;
        if kv {
            let key = format!("crash/k{n}");
            let r = client.put(format!("{base}/v1/kv/{key}")).body(format!("v{n}")).send().await;
            if r.is_ok_and(|r| r.status() == 200) {
                load.ledger.lock().unwrap().keys.insert(key);
            }
            continue;
        }
        let apps = load.ledger.lock().unwrap().apps.len();
        if apps < MAX_APPS && n % 2 == 1 {
            let id = format!("/crash/a{apps}");
            let r = client.post(format!("{base}/v2/apps")).body(load.app_json(&id, 1)).send().await;
            let status = r.map(|r| r.status().as_u16()).unwrap_or(0);
            let mut l = load.ledger.lock().unwrap();
            match status {
                201 => {
                    l.apps.insert(id.clone());
                    l.instances.insert(id, 1);
                }
                // Created by a request whose answer was lost: known now.
                409 => {
                    l.apps.insert(id.clone());
                    l.maybe.entry(id).or_default().insert(1);
                }
                _ => {}
            }
        } else if apps > 0 {
            let id = format!("/crash/a{}", n as usize % apps);
            let want = n % 3 + 1;
            load.ledger.lock().unwrap().maybe.entry(id.clone()).or_default().insert(want);
            let body = json!({"instances": want}).to_string();
            let r = client.put(format!("{base}/v2/apps{id}?force=true")).body(body).send().await;
            if r.is_ok_and(|r| r.status() == 200) {
                let mut l = load.ledger.lock().unwrap();
                l.instances.insert(id.clone(), want);
                l.maybe.remove(&id);
            }
        }
    }
}

/// Live `sleep` processes carrying the tag: (pid, MARATHON_APP_ID, MESOS_SANDBOX).
fn task_processes(tag: &str) -> Vec<(u32, String, PathBuf)> {
    let needle = format!("MESH_TEST_TAG={tag}");
    let mut out = Vec::new();
    for pid in tagged_pids(tag, "sleep") {
        let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) else { continue };
        let vars: BTreeMap<String, String> = env
            .split(|b| *b == 0)
            .filter_map(|kv| String::from_utf8_lossy(kv).split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())))
            .collect();
        if !env.split(|b| *b == 0).any(|kv| kv == needle.as_bytes()) {
            continue;
        }
        out.push((
            pid,
            vars.get("MARATHON_APP_ID").cloned().unwrap_or_default(),
            PathBuf::from(vars.get("MESOS_SANDBOX").cloned().unwrap_or_default()),
        ));
    }
    out
}

/// One settled check of the node against the ledger; `Err` says what is not (yet) right.
async fn check(node: &MeshNode, load: &Load, sandboxes: &Path) -> Result<BTreeMap<String, u64>, String> {
    let (s, d) = node.get("/v2/deployments").await;
    if s != 200 || !d.as_array().is_some_and(|a| a.is_empty()) {
        return Err(format!("deployments not settled: {d}"));
    }
    let (_, apps) = node.get("/v2/apps").await;
    let apps: BTreeMap<String, (u64, String)> = apps["apps"]
        .as_array()
        .ok_or("no app list")?
        .iter()
        .map(|a| {
            let id = a["id"].as_str().unwrap_or_default().to_owned();
            (id, (a["instances"].as_u64().unwrap_or(0), a["cmd"].as_str().unwrap_or_default().to_owned()))
        })
        .collect();
    let (keys, instances, maybe) = {
        let l = load.ledger.lock().unwrap();
        (l.keys.clone(), l.instances.clone(), l.maybe.clone())
    };
    for id in &load.ledger.lock().unwrap().apps {
        if !apps.contains_key(id) {
            return Err(format!("acknowledged app {id} is missing"));
        }
    }
    for (id, (n, _)) in &apps {
        let acked = instances.get(id);
        if acked.is_none() && !maybe.contains_key(id) {
            continue; // created by a request whose answer was lost: any count it was given
        }
        let possible = maybe.get(id).is_some_and(|m| m.contains(n));
        if !(acked == Some(n) || possible) {
            return Err(format!("app {id} has {n} instances; acknowledged {acked:?}, maybe {:?}", maybe.get(id)));
        }
    }
    let procs = task_processes(&load.tag);
    for (id, (n, cmd)) in &apps {
        let (_, t) = node.get(&format!("/v2/apps{id}/tasks")).await;
        let tasks: BTreeSet<String> = t["tasks"]
            .as_array()
            .map(|ts| {
                ts.iter()
                    .filter(|t| t["state"] == "TASK_RUNNING")
                    .filter_map(|t| t["id"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        let all = t["tasks"].as_array().map(Vec::len).unwrap_or(0);
        if tasks.len() as u64 != *n || all as u64 != *n {
            return Err(format!("app {id}: {} running of {all} tasks, {n} instances", tasks.len()));
        }
        let per_task = if cmd.starts_with("setsid") { 2 } else { 1 };
        let mine: Vec<_> = procs.iter().filter(|(_, app, _)| app == id).collect();
        if mine.len() as u64 != n * per_task {
            return Err(format!("app {id}: {} processes for {n} instances x {per_task}: {mine:?}", mine.len()));
        }
        for (pid, _, sandbox) in mine {
            let task = sandbox.file_name().and_then(|f| f.to_str()).unwrap_or_default();
            if sandbox.parent() != Some(sandboxes) || !tasks.contains(task) {
                return Err(format!("process {pid} of {id} runs in {sandbox:?}, no running task's sandbox"));
            }
        }
    }
    if let Some((pid, app, _)) = procs.iter().find(|(_, app, _)| !apps.contains_key(app)) {
        return Err(format!("process {pid} belongs to no app ({app:?})"));
    }
    let (_, listed) = node.get("/v1/kv/crash/?keys").await;
    let listed: BTreeSet<String> =
        listed.as_array().map(|a| a.iter().filter_map(|k| k.as_str().map(str::to_owned)).collect()).unwrap_or_default();
    if let Some(k) = keys.iter().find(|k| !listed.contains(*k)) {
        return Err(format!("acknowledged KV key {k} is missing ({} acknowledged)", keys.len()));
    }
    Ok(apps.into_iter().map(|(id, (n, _))| (id, n)).collect())
}

async fn settle(node: &MeshNode, load: &Load, sandboxes: &Path, cycle: usize) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        match check(node, load, sandboxes).await {
            Ok(apps) => {
                // What the node now says is the truth to check against next time.
                let mut l = load.ledger.lock().unwrap();
                l.instances = apps;
                l.maybe.clear();
                return;
            }
            Err(e) if std::time::Instant::now() > deadline => {
                let (_, apps) = node.get("/v2/apps?embed=apps.tasks").await;
                let (_, queue) = node.get("/v2/queue").await;
                let procs = task_processes(&load.tag);
                panic!("cycle {cycle}: not settled after 60 s: {e}\napps: {apps}\nqueue: {queue}\nprocesses: {procs:?}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_under_load_never_orphans_duplicates_or_loses_acknowledged_writes() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let ports = port_range();
    let extra = ["--runtime", "process"];
    let load = Arc::new(Load {
        base: Mutex::new(None),
        active: AtomicBool::new(false),
        gate: tokio::sync::Mutex::new(()),
        ledger: Mutex::new(Ledger::default()),
        tag: uuid::Uuid::new_v4().to_string(),
    });
    let loaders = [tokio::spawn(run_load(load.clone(), true)), tokio::spawn(run_load(load.clone(), false))];
    let started = std::time::Instant::now();
    let mut node = MeshNode::start_on(&data, ports, &extra);
    let sandboxes = std::fs::canonicalize(data.join("sandboxes")).unwrap();
    for cycle in 0..CYCLES {
        load.resume(node.url(""));
        // Crash at a different moment of the load each time (100 to 700 ms after the restart).
        let ms = 100 + (cycle as u64 * 137) % 600;
        tokio::time::sleep(Duration::from_millis(ms)).await;
        node.stop_with("KILL");
        load.pause().await;
        node = MeshNode::start_on(&data, ports, &extra);
        settle(&node, &load, &sandboxes, cycle).await;
    }
    let (keys, apps) = {
        let l = load.ledger.lock().unwrap();
        (l.keys.len(), l.apps.len())
    };
    println!("{CYCLES} cycles in {:?}: {keys} acknowledged KV writes, {apps} apps", started.elapsed());
    assert!(keys > 0 && apps > 0, "the load did something");
    for l in loaders {
        l.abort();
    }
    node.stop_with("TERM");
    eventually(30, "no task process after a clean stop", || async {
        task_processes(&load.tag).is_empty().then_some(())
    })
    .await;
}
