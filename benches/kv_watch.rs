//! Consul KV writes and blocking-query wake-ups at scale (issue 5: "thousands of watchers cost
//! memory, not CPU").
//!
//! State: 100,000 keys (`app/<i>/config`), each 64 bytes, built through `KvState::apply_kv`.
//!
//! - `kv/set_one_key`: what a PUT costs the control loop: clone the state (O(1), persistent maps)
//!   and apply one `KvOp::Set`.
//! - `kv/watchers_10k/notify_changes`: one key changed, 10,000 blocking queries parked on 10,000
//!   distinct keys; the hub finds the topics the change touches from the diff of the two states.
//! - `kv/watchers_10k/reindex_all`: the same change handled by re-indexing every watched topic
//!   (`WatchHub::notify`), for comparison: what a publish would cost without the diff.
//! - `kv/prefix_index/<n>`: the index of a prefix holding n keys (a blocking recursive read checks
//!   it on each wake-up).
//!
//! Run: `cargo bench -p mesh-server --bench kv_watch`; smoke: `... --bench kv_watch -- --test`.

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use mesh_core::kv::{KvOp, KvValue, SetMode};
use mesh_core::state::State;
use mesh_server::watch::WatchHub;
use std::hint::black_box;

const KEYS: usize = 100_000;
const WATCHERS: usize = 10_000;

fn set(key: String, i: u64) -> KvOp {
    KvOp::Set { key, value: KvValue::from(vec![(i % 251) as u8; 64]), flags: 0, mode: SetMode::Plain, now: 0 }
}

fn state() -> State {
    let mut s = State::new("dc1");
    for i in 0..KEYS {
        s.kv.apply_kv(&set(format!("app/{i}/config"), i as u64), i as u64 + 1).unwrap();
        s.index = i as u64 + 1;
    }
    s
}

fn bench(c: &mut Criterion) {
    let base = state();
    let mut g = c.benchmark_group("kv");

    let mut n = base.index;
    g.bench_function("set_one_key", |b| {
        b.iter(|| {
            n += 1;
            let mut next = base.clone();
            next.kv.apply_kv(&set("app/777/config".into(), n), n).unwrap();
            black_box(next.kv.index)
        })
    });

    let hub = WatchHub::default();
    let receivers: Vec<_> = (0..WATCHERS)
        .map(|i| {
            let topic = format!("kv:app/{}/config", i * (KEYS / WATCHERS));
            hub.subscribe(&topic, base.topic_index(&topic))
        })
        .collect();
    let mut changed = base.clone();
    changed.kv.apply_kv(&set("app/10/config".into(), 1_000_000), base.index + 1).unwrap();
    g.bench_function(BenchmarkId::new("watchers_10k", "notify_changes"), |b| {
        b.iter(|| hub.notify_changes(black_box(&base), black_box(&changed)))
    });
    g.bench_function(BenchmarkId::new("watchers_10k", "reindex_all"), |b| {
        b.iter(|| hub.notify(|t| black_box(&changed).topic_index(t)))
    });
    drop(receivers);

    for (prefix, keys) in [("app/7/", 1), ("app/7", 11_111), ("app/", KEYS)] {
        g.bench_function(BenchmarkId::new("prefix_index", keys), |b| {
            b.iter(|| black_box(base.kv.prefix_index(black_box(prefix))))
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
