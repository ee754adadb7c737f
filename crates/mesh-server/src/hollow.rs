//! `mesh hollow-agents` (hidden): many agents in one process, for the scale benchmark
//! (benches/hollow), Kubernetes' kubemark idea. Each is the real agent loop (`agent::start`)
//! with the real uplink speaking the agent↔server protocol over TCP to real `mesh server`s,
//! but with the in-memory runtime: a launched task is RUNNING at once and runs nowhere.
//!
//! What a hollow agent leaves out, to fit thousands in one process: no replica of the state
//! (the server streams none to it), no gossip, no DNS or HTTP of its own. Each has its own
//! loopback address (`127.100.0.0/16` and up, by index), used as its task address and as the
//! source address of its connection to the servers.

use clap::Parser;
use mesh_core::model::{AgentId, PortRanges, Resources};
use mesh_core::runtime::memory::MemoryRuntime;
use mesh_core::state::State;
use mesh_server::agent::{self, AgentConfig};
use mesh_server::cluster::{outbox::Outbox, uplink};
use mesh_server::control::{ControlHandle, Published};
use mesh_server::rpc::TcpTransport;
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Parser)]
pub struct HollowArgs {
    /// A server's RPC address (repeat for several servers).
    #[arg(long = "server", required = true, value_parser = super::parse_server)]
    servers: Vec<SocketAddr>,
    /// How many agents this process runs.
    #[arg(long, default_value_t = 100)]
    count: u32,
    /// Index of the first agent: agents are `<prefix>-<index>`, at `127.(100+i/65536).(i/256%256).(i%256)`.
    #[arg(long, default_value_t = 0)]
    first_index: u32,
    /// Node name prefix.
    #[arg(long, default_value = "hollow")]
    prefix: String,
    /// Datacenter.
    #[arg(long, default_value = "dc1")]
    dc: String,
    /// CPUs each agent offers.
    #[arg(long, default_value_t = 16.0)]
    cpus: f64,
    /// Memory (MB) each agent offers.
    #[arg(long, default_value_t = 32768.0)]
    mem: f64,
    /// Port range each agent offers.
    #[arg(long, default_value = "31000-32000", value_parser = super::parse_ports)]
    ports: (u16, u16),
    /// Agents started per second (so that the servers are not hit by every registration at once).
    #[arg(long, default_value_t = 200.0)]
    rate: f64,
    /// Attribute `rack` is `r<index % racks>` (for constraints).
    #[arg(long, default_value_t = 10)]
    racks: u32,
}

/// Agent `i`'s loopback address.
fn address(i: u32) -> IpAddr {
    let i = i + 1; // never x.y.z.0
    IpAddr::V4(Ipv4Addr::new(127, 100 + (i >> 16) as u8, (i >> 8) as u8, i as u8))
}

pub fn run(a: HollowArgs) -> ExitCode {
    if a.first_index.saturating_add(a.count) > 150 << 16 {
        eprintln!("at most {} agents", 150u32 << 16);
        return ExitCode::FAILURE;
    }
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
        let servers = Arc::new(std::sync::Mutex::new(a.servers.clone()));
        let clock = mesh_core::model::system_clock();
        let started = Instant::now();
        let mut agents = Vec::with_capacity(a.count as usize);
        let pace = Duration::from_secs_f64(1.0 / a.rate.max(0.001));
        for i in a.first_index..a.first_index + a.count {
            let ip = address(i);
            let name = format!("{}-{i:05}", a.prefix);
            let id = AgentId::from(name.as_str());
            let (events_tx, events_rx) = tokio::sync::mpsc::channel(1024);
            let runtime = Arc::new(MemoryRuntime::new(events_tx));
            let (up_tx, up_rx) = tokio::sync::mpsc::channel(1024);
            let ucfg = uplink::UplinkConfig {
                agent: id.clone(),
                node_id: format!("{name}-{}", mesh_core::model::now_millis()),
                datacenter: a.dc.clone(),
                servers: servers.clone(),
                transport: Arc::new(TcpTransport { bind: Some(ip) }),
            };
            let (_link, _pending, uplink_join) = uplink::spawn(ucfg, Outbox::in_memory(), up_rx);
            // No replica: nothing on a hollow agent reads the state.
            let (published, index) = Published::new(State::default(), clock.clone());
            let handle = ControlHandle::from_parts(up_tx, published);
            let cfg = AgentConfig {
                id,
                hostname: name.clone(),
                address: ip,
                wan_address: None,
                resources: Resources {
                    ports: PortRanges::range(a.ports.0, a.ports.1),
                    ..Resources::scalars(a.cpus, a.mem, 0.0)
                },
                attributes: BTreeMap::from([("rack".to_owned(), format!("r{}", i % a.racks.max(1)))]),
                runtimes: vec!["process".into()],
                enable_script_checks: false,
                clock: clock.clone(),
            };
            match agent::start(cfg, runtime, events_rx, handle).await {
                Ok(h) => agents.push((h, uplink_join, index)),
                Err(e) => {
                    eprintln!("{name}: {e}");
                    return ExitCode::FAILURE;
                }
            }
            tokio::time::sleep(pace).await;
        }
        eprintln!("{} hollow agents started in {:.1}s", agents.len(), started.elapsed().as_secs_f64());
        let _ = tokio::signal::ctrl_c().await;
        ExitCode::SUCCESS
    })
}
