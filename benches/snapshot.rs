//! State snapshots at scale (issue 11: "costs that grow with change, not with size").
//!
//! State: `KEYS` Consul KV keys (`app/<i>/config`, 100-byte values) and `TASKS` tasks; pass
//! sizes as arguments to change them (`-- 100000 10000`).
//!
//! 1. Encoding: the whole state as JSON (what the snapshot was before) and as the snapshot
//!    file's MessagePack, with sizes; decoding both; writing a snapshot file (encode + fsync).
//! 2. Writes while snapshots run: `WRITES` KV PUTs through `Store::propose` on a `WalLog` (the log `mesh dev` uses), in
//!    batches of 16 (as the control loop batches 16 concurrent clients), once on an empty store
//!    and once on the big state; per-batch latency p50 / p99 / max and the snapshots taken. A
//!    synchronous snapshot shows as a max near the encoding time (third row: the same snapshots,
//!    waited for by the writer as before); in the background it does not.
//!
//! Run: `cargo bench -p mesh-core --bench snapshot` (~1 min at the default sizes).

use mesh_core::app::AppId;
use mesh_core::kv::{KvOp, KvValue, SetMode};
use mesh_core::model::{AgentId, FrameworkId, Resources, TaskId};
use mesh_core::proto::TaskState;
use mesh_core::state::{Command, FileSnapshots, SnapshotWriter, State, Store, Task, WalLog};
use std::time::{Duration, Instant};

const KEYS: usize = 1_000_000;
const TASKS: usize = 100_000;
const WRITES: usize = 20_000;
const BATCH: usize = 16;

fn set(key: String, i: u64) -> KvOp {
    KvOp::Set { key, value: KvValue::from(vec![b'a' + (i % 26) as u8; 100]), flags: 0, mode: SetMode::Plain, now: 0 }
}

fn task(i: usize) -> Task {
    Task {
        id: TaskId::from(format!("app{}.{i:08x}-0000-4000-8000-000000000000", i % 1000).as_str()),
        framework_id: FrameworkId::from("marathon"),
        app_id: Some(AppId::parse(&format!("/app{}", i % 1000)).unwrap()),
        agent_id: AgentId::from(format!("node{}", i % 100).as_str()),
        host: format!("node{}", i % 100),
        ports: vec![31000 + (i % 1000) as u16],
        service_ports: vec![10000],
        state: TaskState::Running,
        staged_at: 1_700_000_000_000,
        started_at: Some(1_700_000_001_000),
        version: 1_700_000_000_000,
        resources: Resources::scalars(0.1, 64.0, 0.0),
        kill_requested: false,
        message: String::new(),
        health: vec![],
        unreachable_since: None,
        inactive: false,
    }
}

fn build(keys: usize, tasks: usize) -> State {
    let mut s = State::new("dc1");
    for i in 0..keys {
        s.kv.apply_kv(&set(format!("app/{i}/config"), i as u64), i as u64 + 1).unwrap();
    }
    for i in 0..tasks {
        let t = task(i);
        s.tasks.insert(t.id.clone(), t);
    }
    s.index = keys as u64;
    s.rebuild_indexes();
    s
}

fn time<T>(f: impl FnOnce() -> T) -> (T, Duration) {
    let t = Instant::now();
    let v = f();
    (v, t.elapsed())
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

fn mb(n: usize) -> String {
    format!("{:.1} MB", n as f64 / 1e6)
}

fn writes(state: Option<State>, label: &str, wait: bool) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.wal");
    if let Some(s) = &state {
        // Start from a durable snapshot of the big state, as a node restarted on it would.
        FileSnapshots::new(&path.with_extension("snap")).write(s).unwrap();
    }
    let log = WalLog::open(&path, 0).unwrap();
    let mut store = Store::open(Box::new(log), "dc1").unwrap();
    let base = store.state().index;
    let mut lat = Vec::with_capacity(WRITES / BATCH);
    let all = Instant::now();
    for b in 0..WRITES / BATCH {
        let cmds: Vec<Command> = (0..BATCH)
            .map(|j| {
                let i = (b * BATCH + j) as u64;
                Command::Kv(set(format!("app/{}/config", (i * 7919) % 1_000_000), i))
            })
            .collect();
        let t = Instant::now();
        store.propose(cmds).unwrap();
        if wait {
            store.wait_snapshot();
        }
        lat.push(t.elapsed());
    }
    let total = all.elapsed();
    store.wait_snapshot();
    lat.sort();
    let q = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
    println!(
        "| {label} | {:.0}/s | {} | {} | {} | {} |",
        WRITES as f64 / total.as_secs_f64(),
        ms(q(0.5)),
        ms(q(0.99)),
        ms(*lat.last().unwrap()),
        store.snapshots_written(),
    );
    assert_eq!(store.state().index, base + WRITES as u64);
}

fn main() {
    let args: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let keys = args.first().copied().unwrap_or(KEYS);
    let tasks = args.get(1).copied().unwrap_or(TASKS);
    let (state, built) = time(|| build(keys, tasks));
    println!("state: {keys} KV keys of 100 bytes, {tasks} tasks (built in {})\n", ms(built));

    let (json, json_enc) = time(|| serde_json::to_vec(&state).unwrap());
    let (bin, bin_enc) = time(|| {
        let mut v = Vec::new();
        mesh_core::state::encode_state(&mut v, &state).unwrap();
        v
    });
    let (_, json_dec) = time(|| serde_json::from_slice::<State>(&json).unwrap());
    let (_, bin_dec) = time(|| mesh_core::state::decode_state(&bin).unwrap());
    let dir = tempfile::tempdir().unwrap();
    let snaps = FileSnapshots::new(&dir.path().join("state.snap"));
    let (_, file) = time(|| snaps.write(&state).unwrap());
    let (_, read) = time(|| snaps.read().unwrap().unwrap());
    println!("| encoding | size | encode | decode |");
    println!("|---|---:|---:|---:|");
    println!("| JSON (before) | {} | {} | {} |", mb(json.len()), ms(json_enc), ms(json_dec));
    println!("| MessagePack (snapshot file) | {} | {} | {} |", mb(bin.len()), ms(bin_enc), ms(bin_dec));
    println!("| snapshot file: write + fsync / read + check | | {} | {} |\n", ms(file), ms(read));
    drop((json, bin));

    println!("{WRITES} KV PUTs through Store::propose + WalLog, batches of {BATCH}:\n");
    println!("| store | writes/s | batch p50 | batch p99 | batch max | snapshots |");
    println!("|---|---:|---:|---:|---:|---:|");
    writes(None, "empty", false);
    writes(Some(state.clone()), &format!("{keys} keys + {tasks} tasks"), false);
    writes(Some(state), "the same, each snapshot waited for (synchronous, as before)", true);
}
