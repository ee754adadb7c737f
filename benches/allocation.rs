//! Allocation and placement over simulated agents (performance row a5).
//!
//! - `allocation_cycle/<agents>x<frameworks>`: one full DRF allocation cycle in which every
//!   agent has free resources, so every agent becomes one offer. Throughput = offers/s.
//!   `allocation_cycle/fair_slices/...`: the same with fair-share slices on (as `mesh` runs).
//!   Target (performance.md a5): ≤ 50 ms @ 2k/200, ≤ 500 ms @ 10k/200.
//! - `placement/<variant>/<agents>`: a greedy framework loop that takes offers and launches many
//!   small tasks (0.1 cpu, 64 MiB, 1 port) until the cluster is full, with allocation cycles in
//!   between. Throughput = placements (tasks)/s.
//!   - `fill`: each offer is packed with as many tasks as fit.
//!   - `max5`: at most 5 tasks per offer (like Marathon's per-offer launch limit); the rest goes
//!     back to the pool and is re-offered next cycle, so this runs many cycles.
//!
//! Smoke run: `cargo bench -p mesh-core --bench allocation -- --test`.

use criterion::{BatchSize, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use mesh_core::allocator::{Allocator, AllocatorConfig, DrfAllocator, Filters};
use mesh_core::model::{FrameworkId, Millis, PortRanges, Resources};
use std::collections::{BTreeMap, HashMap};
use std::hint::black_box;
use std::time::Duration;

const TASK_CPUS: f64 = 0.1;
const TASK_MEM: f64 = 64.0;

/// `agents` heterogeneous agents (2/4/8 cpus, 10 racks, 3 zones, 1,000 ports each) and
/// `frameworks` frameworks spread over 10 roles (role-0 has weight 2).
fn cluster(agents: usize, frameworks: usize, min_allocatable: Resources) -> DrfAllocator {
    cluster_with(
        agents,
        frameworks,
        AllocatorConfig { offer_timeout_ms: None, min_allocatable, ..AllocatorConfig::default() },
    )
}

/// [`cluster`] with any allocator configuration.
fn cluster_with(agents: usize, frameworks: usize, config: AllocatorConfig) -> DrfAllocator {
    let mut a = DrfAllocator::with_offer_prefix(config, "bench-");
    for i in 0..agents {
        let size = [2.0, 4.0, 8.0][i % 3];
        let attrs = BTreeMap::from([
            ("rack".to_owned(), format!("rack-{}", i % 10)),
            ("zone".to_owned(), format!("zone-{}", i % 3)),
        ]);
        a.add_agent(
            format!("agent-{i:05}").into(),
            format!("host-{i:05}.example"),
            Resources { cpus: size, mem: size * 2048.0, disk: 100_000.0, ports: PortRanges::range(31000, 31999) },
            attrs,
        );
    }
    for f in 0..frameworks {
        a.add_framework(format!("fw-{f:04}").into(), format!("role-{}", f % 10));
    }
    a.set_weight("role-0", 2.0);
    a
}

fn bench_cycle(c: &mut Criterion) {
    let mut g = c.benchmark_group("allocation_cycle");
    g.sample_size(10).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    for (agents, frameworks) in [(1_000, 200), (2_000, 200), (10_000, 200), (2_000, 2_000)] {
        let base = cluster(agents, frameworks, AllocatorConfig::default().min_allocatable);
        let offers = base.clone().allocate(0).len();
        assert_eq!(offers, agents, "every agent is offered once");
        g.throughput(Throughput::Elements(offers as u64));
        g.bench_with_input(BenchmarkId::from_parameter(format!("{agents}x{frameworks}")), &base, |b, base| {
            b.iter_batched(
                || base.clone(),
                |mut a| {
                    let offers = a.allocate(black_box(0));
                    (a, offers)
                },
                BatchSize::PerIteration,
            )
        });
    }
    // Fair-share slices (what `mesh` runs with): agents at a framework's fair-share boundary
    // are split, so a cycle makes a few more offers than there are agents.
    for (agents, frameworks) in [(2_000, 200), (10_000, 200)] {
        let cfg = AllocatorConfig { fair_share_slices: true, ..AllocatorConfig::default() };
        let base = cluster_with(agents, frameworks, cfg);
        let offers = base.clone().allocate(0).len();
        assert!(offers >= agents, "every agent is offered");
        g.throughput(Throughput::Elements(offers as u64));
        g.bench_with_input(BenchmarkId::new("fair_slices", format!("{agents}x{frameworks}")), &base, |b, base| {
            b.iter_batched(
                || base.clone(),
                |mut a| {
                    let offers = a.allocate(black_box(0));
                    (a, offers)
                },
                BatchSize::PerIteration,
            )
        });
    }
    g.finish();
}

/// Place tasks until the cluster is full or every framework is done; returns the placements.
fn place_all(a: &mut DrfAllocator, frameworks: usize, per_framework: u64, max_per_offer: u64) -> u64 {
    let mut pending: HashMap<FrameworkId, u64> =
        (0..frameworks).map(|f| (FrameworkId(format!("fw-{f:04}")), per_framework)).collect();
    let mut placed = 0;
    let mut now: Millis = 0;
    loop {
        let offers = a.allocate(now);
        if offers.is_empty() {
            return placed;
        }
        for o in offers {
            let left = pending.get_mut(&o.framework_id).expect("known framework");
            let r = &o.resources;
            let fit = ((r.cpus / TASK_CPUS + 1e-6).floor() as u64)
                .min((r.mem / TASK_MEM + 1e-6).floor() as u64)
                .min(r.ports.len() as u64)
                .min(max_per_offer)
                .min(*left);
            if fit == 0 {
                a.decline(&o.id, Filters::refuse(3600.0), now).expect("decline");
                continue;
            }
            let used = Resources {
                cpus: fit as f64 * TASK_CPUS,
                mem: fit as f64 * TASK_MEM,
                disk: 0.0,
                ports: PortRanges::from_ports(r.ports.iter().take(fit as usize)),
            };
            a.accept(&o.id, &used, Filters::refuse(0.0), now).expect("accept");
            placed += fit;
            *left -= fit;
            if *left == 0 {
                a.suppress(&o.framework_id);
            }
        }
        now += 1_000;
    }
}

fn bench_placement(c: &mut Criterion) {
    let mut g = c.benchmark_group("placement");
    g.sample_size(10).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(4));
    let frameworks = 200;
    // leftovers smaller than one task are not offered
    let min = Resources::scalars(TASK_CPUS, TASK_MEM, 0.0);
    for (variant, max_per_offer) in [("fill", u64::MAX), ("max5", 5)] {
        for agents in [1_000usize, 10_000] {
            let base = cluster(agents, frameworks, min.clone());
            // capacity: 20/40/80 tasks per agent by cpus; ask for 20 % more than fits
            let capacity: u64 = (0..agents).map(|i| [20u64, 40, 80][i % 3]).sum();
            let per_framework = capacity * 6 / 5 / frameworks as u64;
            let placed = place_all(&mut base.clone(), frameworks, per_framework, max_per_offer);
            assert_eq!(placed, capacity, "the cluster fills up");
            g.throughput(Throughput::Elements(placed));
            g.bench_with_input(BenchmarkId::new(variant, agents), &base, |b, base| {
                b.iter_batched(
                    || base.clone(),
                    |mut a| {
                        let n = place_all(&mut a, frameworks, per_framework, max_per_offer);
                        (a, n)
                    },
                    BatchSize::PerIteration,
                )
            });
        }
    }
    g.finish();
}

criterion_group!(benches, bench_cycle, bench_placement);
criterion_main!(benches);
