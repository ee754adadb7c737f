//! The `mesh` binary. `mesh dev` runs a complete single-node mesh.

mod app_cmd;
mod hollow;

use clap::{Parser, Subcommand};
use mesh_core::dns::{DnsConfig, DnsZone, ServiceTtls};
use mesh_core::runtime::gc::GcPolicy;
use mesh_core::runtime::logger::{self, LogRotation, TaskLogs};
use mesh_server::node::{NodeConfig, RuntimeKind, run_dev};
use std::collections::BTreeMap;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "mesh",
    version,
    about = "Deploy long-running services and find them: Marathon, Consul and Mesos APIs in one binary."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// One process that is control node, agent, HTTP API and DNS server.
    Dev(Box<DevArgs>),
    /// A control node: state, scheduler, allocator, every API and DNS, and the internal RPC
    /// that agents connect to (--rpc).
    Server(Box<DevArgs>),
    /// A compute node: runs tasks for the servers it connects to (--server), answers DNS and
    /// API reads from its replica of the state, and forwards writes. On SIGTERM its tasks keep
    /// running, to be re-adopted when it starts again on the same data dir.
    Agent(Box<DevArgs>),
    /// The members of the LAN gossip pool, as the node at --http-addr sees them (Consul's
    /// `consul members`); with `--wan` (or `-wan`), the WAN pool: the servers of every
    /// datacenter, as a server sees them.
    Members(MembersArgs),
    /// Deploy an app: `deploy [--dc dc1,dc2] APP.json` creates or replaces it (in each
    /// datacenter named) and shows each deployment's progress until every instance runs.
    App(app_cmd::AppArgs),
    /// Operate on a node: `drain NODE` (no new tasks; its tasks move elsewhere) or
    /// `reactivate NODE`.
    Node(NodeArgs),
    /// Save or restore a datacenter's whole state (apps, tasks, services, KV, sessions):
    /// `save FILE` or `restore FILE` (Consul's `consul snapshot`).
    Snapshot(SnapshotArgs),
    /// Operate the servers' Raft group: `raft list-peers`, `raft remove-peer --id ID` or
    /// `--address IP:PORT` (Consul's `consul operator raft`).
    Operator(OperatorArgs),
    /// Internal: a task's stdout/stderr logger, started by the agent per stream. Copies stdin
    /// to FILE, rotating it at --max-size bytes and keeping --max-files old files.
    #[command(hide = true)]
    Logger(LoggerArgs),
    /// Internal, for the scale benchmark (benches/hollow): many agents in one process with
    /// the in-memory runtime (tasks run nowhere), connected to real servers over TCP.
    #[command(hide = true)]
    HollowAgents(hollow::HollowArgs),
}

#[derive(Parser)]
struct ClientArgs {
    /// HTTP address of any node (a server or an agent).
    #[arg(long, default_value = "127.0.0.1:8500", env = "MESH_HTTP_ADDR")]
    http_addr: String,
}

#[derive(Parser)]
struct MembersArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// The WAN pool (servers of every datacenter) instead of the LAN pool.
    #[arg(long)]
    wan: bool,
}

#[derive(Parser)]
struct NodeArgs {
    /// `drain` or `reactivate`.
    #[arg(value_parser = ["drain", "reactivate"])]
    action: String,
    /// The node (agent) name.
    node: String,
    #[command(flatten)]
    client: ClientArgs,
}

#[derive(Parser)]
struct SnapshotArgs {
    /// `save` or `restore`.
    #[arg(value_parser = ["save", "restore"])]
    action: String,
    /// The snapshot file.
    file: PathBuf,
    #[command(flatten)]
    client: ClientArgs,
}

#[derive(Parser)]
struct OperatorArgs {
    /// `raft`.
    #[arg(value_parser = ["raft"])]
    area: String,
    /// `list-peers` or `remove-peer`.
    #[arg(value_parser = ["list-peers", "remove-peer"])]
    action: String,
    /// The server to remove, by its Raft id (as `list-peers` shows it).
    #[arg(long)]
    id: Option<String>,
    /// The server to remove, by its RPC address.
    #[arg(long)]
    address: Option<String>,
    #[command(flatten)]
    client: ClientArgs,
}

fn run_snapshot(a: SnapshotArgs) -> ExitCode {
    let addr = &a.client.http_addr;
    let result = if a.action == "save" {
        http_bytes(addr, "GET", "/v1/snapshot", &[]).and_then(|(status, body)| {
            if status != 200 {
                return Err(format!("{status}: {}", String::from_utf8_lossy(&body).trim()));
            }
            std::fs::write(&a.file, &body).map_err(|e| format!("{}: {e}", a.file.display()))?;
            Ok(format!("Saved snapshot to {} ({} bytes)", a.file.display(), body.len()))
        })
    } else {
        std::fs::read(&a.file).map_err(|e| format!("{}: {e}", a.file.display())).and_then(|bytes| {
            let (status, body) = http_bytes(addr, "PUT", "/v1/snapshot", &bytes)?;
            if status != 200 {
                return Err(format!("{status}: {}", String::from_utf8_lossy(&body).trim()));
            }
            Ok(format!("Restored snapshot from {}", a.file.display()))
        })
    };
    match result {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("mesh: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run_operator(a: OperatorArgs) -> ExitCode {
    let addr = &a.client.http_addr;
    if a.action == "list-peers" {
        return client_call(addr, "GET", "/v1/operator/raft/configuration", None, |body| {
            let v: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
            println!("{:<20} {:<18} {:<22} {:<10} Voter", "Node", "ID", "Address", "State");
            for s in v["Servers"].as_array().into_iter().flatten() {
                let state = if s["Leader"] == true { "leader" } else { "follower" };
                println!(
                    "{:<20} {:<18} {:<22} {:<10} {}",
                    s["Node"].as_str().unwrap_or(""),
                    s["ID"].as_str().unwrap_or(""),
                    s["Address"].as_str().unwrap_or(""),
                    state,
                    s["Voter"]
                );
            }
        });
    }
    let query = match (&a.id, &a.address) {
        (Some(id), _) => format!("id={id}"),
        (None, Some(address)) => format!("address={address}"),
        (None, None) => {
            eprintln!("mesh: remove-peer needs --id ID or --address IP:PORT");
            return ExitCode::FAILURE;
        }
    };
    client_call(addr, "DELETE", &format!("/v1/operator/raft/peer?{query}"), None, |_| {
        println!("Removed peer with {query}");
    })
}

/// One HTTP/1.1 request with `Connection: close` and a binary body: (status, body).
fn http_bytes(addr: &str, method: &str, path: &str, body: &[u8]) -> Result<(u16, Vec<u8>), String> {
    http_call(addr, method, path, body, "application/octet-stream")
}

/// One HTTP/1.1 request with `Connection: close`: (status, body).
fn http_call(addr: &str, method: &str, path: &str, body: &[u8], content_type: &str) -> Result<(u16, Vec<u8>), String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).map_err(|e| format!("cannot connect to {addr}: {e}"))?;
    let _ = s.set_read_timeout(Some(Duration::from_secs(120)));
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).and_then(|()| s.write_all(body)).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).map_err(|e| e.to_string())?;
    let split = out.windows(4).position(|w| w == b"\r\n\r\n").ok_or("no HTTP response")?;
    let head = String::from_utf8_lossy(&out[..split]).to_ascii_lowercase();
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).ok_or("no HTTP status")?;
    let mut rest = &out[split + 4..];
    if !head.contains("transfer-encoding: chunked") {
        return Ok((status, rest.to_vec()));
    }
    let mut b = Vec::new();
    while let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") {
        let n = usize::from_str_radix(String::from_utf8_lossy(&rest[..eol]).trim(), 16).unwrap_or(0);
        let tail = &rest[eol + 2..];
        if n == 0 || tail.len() < n {
            break;
        }
        b.extend_from_slice(&tail[..n]);
        rest = tail[n..].strip_prefix(b"\r\n").unwrap_or(&tail[n..]);
    }
    Ok((status, b))
}

/// One HTTP/1.1 request with `Connection: close` and a JSON body: (status, body).
fn http_request(addr: &str, method: &str, path: &str, body: Option<&str>) -> Result<(u16, String), String> {
    let (status, body) = http_call(addr, method, path, body.unwrap_or("").as_bytes(), "application/json")?;
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// Run a client request: `on_ok` prints a 200/202 answer; anything else is an error line.
fn client_call(addr: &str, method: &str, path: &str, body: Option<&str>, on_ok: impl FnOnce(&str)) -> ExitCode {
    match http_request(addr, method, path, body) {
        Ok((200 | 202, body)) => {
            on_ok(&body);
            ExitCode::SUCCESS
        }
        Ok((status, body)) => {
            eprintln!("mesh: {status}: {}", body.trim());
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("mesh: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run_members(a: MembersArgs) -> ExitCode {
    let path = if a.wan { "/v1/agent/members?wan=1" } else { "/v1/agent/members" };
    client_call(&a.client.http_addr, "GET", path, None, |body| {
        let members: Vec<serde_json::Value> = serde_json::from_str(body).unwrap_or_default();
        println!("{:<24} {:<22} {:<8} {:<7} DC", "Node", "Address", "Status", "Type");
        for m in members {
            let status = match m["Status"].as_u64() {
                Some(1) => "alive",
                Some(2) => "leaving",
                Some(3) => "left",
                Some(4) => "failed",
                _ => "none",
            };
            let kind = if m["Tags"]["role"] == "consul" { "server" } else { "agent" };
            let addr = format!("{}:{}", m["Addr"].as_str().unwrap_or(""), m["Port"]);
            let (name, dc) = (m["Name"].as_str().unwrap_or(""), m["Tags"]["dc"].as_str().unwrap_or(""));
            println!("{name:<24} {addr:<22} {status:<8} {kind:<7} {dc}");
        }
    })
}

fn run_node(a: NodeArgs) -> ExitCode {
    let (kind, key) =
        if a.action == "drain" { ("DRAIN_AGENT", "drain_agent") } else { ("REACTIVATE_AGENT", "reactivate_agent") };
    let call = serde_json::json!({"type": kind, key: {"agent_id": {"value": a.node}}});
    client_call(&a.client.http_addr, "POST", "/api/v1", Some(&call.to_string()), |_| {
        println!("{} {}", if a.action == "drain" { "draining" } else { "reactivated" }, a.node);
    })
}

#[derive(Parser)]
struct LoggerArgs {
    #[arg(long)]
    file: PathBuf,
    #[arg(long)]
    max_size: u64,
    #[arg(long)]
    max_files: u32,
}

#[derive(Parser)]
struct DevArgs {
    /// HTTP listener; may repeat. Every listener serves every API. By default Marathon's,
    /// Consul's and the Mesos master's usual ports, so clients work with their defaults.
    #[arg(long, default_values = ["127.0.0.1:8080", "127.0.0.1:8500", "127.0.0.1:5050"])]
    http: Vec<SocketAddr>,
    /// DNS listener (UDP and TCP).
    #[arg(long, default_value = "127.0.0.1:8600")]
    dns: SocketAddr,
    /// Internal RPC listener (server and agent).
    #[arg(long, default_value = "127.0.0.1:8300")]
    rpc: SocketAddr,
    /// The address every listener binds to unless given in full (--http, --dns, --rpc).
    #[arg(long)]
    bind: Option<IpAddr>,
    /// A server's RPC address (IP, IP:PORT or HOST:PORT; port 8300 by default) that an agent
    /// connects to; may repeat, tried in turn until one answers, with backoff.
    #[arg(long = "server", value_parser = parse_server)]
    servers: Vec<SocketAddr>,
    /// The Docker network that containers in BRIDGE mode join (default: Docker's `bridge`).
    #[arg(long)]
    docker_network: Option<String>,
    /// Where this node answers DNS for its containers, on port 53: `auto` (the gateway of their
    /// Docker network), an IP, or `off`. Containers get it as their resolver with the search
    /// domain `service.<domain>`, so `web.service.mesh` and plain `web` resolve inside them.
    #[arg(long, default_value = "auto", value_parser = parse_container_dns)]
    container_dns: mesh_server::node::ContainerDns,
    /// LAN gossip listener (UDP), server and agent.
    #[arg(long, default_value = "127.0.0.1:8301")]
    serf_lan: SocketAddr,
    /// (server) WAN gossip listener (UDP): the pool of every datacenter's servers.
    #[arg(long, default_value = "127.0.0.1:8302")]
    serf_wan: SocketAddr,
    /// (server) A server of another datacenter to join in the WAN pool (IP, IP:PORT or
    /// HOST:PORT; port 8302 by default); may repeat. Retried with backoff until one answers
    /// (Consul's retry_join_wan).
    #[arg(long = "join-wan", value_parser = parse_join_wan)]
    join_wan: Vec<SocketAddr>,
    /// The address other datacenters reach this node at (default: --advertise): a server's WAN
    /// gossip address, and every node's `TaggedAddresses.wan` (what `--translate-wan-addrs`
    /// answers to other datacenters).
    #[arg(long)]
    advertise_wan: Option<std::net::IpAddr>,
    /// WAN gossip probe period (default 5 s, as Consul's WAN pool); for tests on one machine.
    #[arg(long, value_parser = parse_duration, hide = true)]
    gossip_wan_probe_period: Option<Duration>,
    /// A member's gossip address to join (IP, IP:PORT or HOST:PORT; port 8301 by default); may
    /// repeat. Retried with backoff until one answers (Consul's retry_join). An agent finds the
    /// servers through gossip.
    #[arg(long = "join", value_parser = parse_join)]
    join: Vec<SocketAddr>,
    /// Gossip probe period (default 1 s, as Consul's LAN pool); for tests on one machine.
    #[arg(long, value_parser = parse_duration, hide = true)]
    gossip_probe_period: Option<Duration>,
    /// (server) An agent whose connection broke is lost after this long without coming back:
    /// its services leave DNS and its tasks become TASK_UNREACHABLE.
    #[arg(long, default_value = "5s", value_parser = parse_span)]
    agent_down_after: std::time::Duration,
    /// (server) An agent that stopped saying it will be back (SIGTERM) keeps its tasks as they
    /// are for this long (Mesos' agent_reregister_timeout).
    #[arg(long, default_value = "10mins", value_parser = parse_span)]
    agent_reregister_timeout: std::time::Duration,
    /// (server) Form the Raft group once this many servers found each other through gossip
    /// (Consul's bootstrap_expect; 1: this server alone, at once). Later servers join it.
    #[arg(long, default_value_t = 1)]
    bootstrap_expect: usize,
    /// (server) Scales every Raft timing (Consul's raft_multiplier): heartbeat 500 ms and
    /// election timeout 1-2 s at 1; larger tolerates slower machines, smaller fails over faster.
    #[arg(long, default_value_t = 1.0)]
    raft_multiplier: f64,
    /// (server) Autopilot's cleanup of dead servers: a server gossip declared failed or left
    /// for this long leaves the Raft group, never leaving it without a quorum ("0s": never).
    #[arg(long, default_value = "1min", value_parser = parse_span)]
    dead_server_cleanup_after: std::time::Duration,
    /// Where state and task sandboxes live.
    #[arg(long, default_value = "./mesh-data")]
    data_dir: PathBuf,
    /// DNS domain.
    #[arg(long, default_value = "mesh")]
    domain: String,
    /// Node name (default: the host name).
    #[arg(long)]
    node: Option<String>,
    /// Datacenter name.
    #[arg(long, default_value = "dc1")]
    dc: String,
    /// Task runtime: auto, process or docker.
    #[arg(long, default_value = "auto", value_parser = parse_runtime)]
    runtime: RuntimeKind,
    /// Host port range handed to tasks, LOW-HIGH.
    #[arg(long, default_value = "31000-32000", value_parser = parse_ports)]
    ports: (u16, u16),
    /// Address of this node's tasks in DNS and the APIs.
    #[arg(long, default_value = "127.0.0.1")]
    advertise: IpAddr,
    /// CPUs offered to tasks (default: the host's).
    #[arg(long)]
    cpus: Option<f64>,
    /// Memory offered to tasks in MiB (default: the host's).
    #[arg(long)]
    mem: Option<f64>,
    /// Disk offered to tasks in MiB.
    #[arg(long, default_value_t = 10240.0)]
    disk: f64,
    /// Agent attribute key:value for constraints; may repeat.
    #[arg(long = "attr", value_parser = parse_attr)]
    attrs: Vec<(String, String)>,
    /// On SIGTERM/SIGINT leave tasks running; the next start on the same data dir adopts them.
    #[arg(long)]
    keep_tasks_on_exit: bool,
    /// Allow apps to run privileged containers (`container.docker.privileged`); this also
    /// allows every `cap-add`.
    #[arg(long)]
    allow_privileged: bool,
    /// A host path under which container volumes (`hostPath`) may be mounted; may repeat. None
    /// by default: a volume of `/` is a way out of the container.
    #[arg(long = "allowed-host-path", value_parser = parse_host_path)]
    allowed_host_paths: Vec<PathBuf>,
    /// A capability containers may add (docker parameter `cap-add`), e.g. NET_ADMIN; may
    /// repeat; ALL allows any. None by default.
    #[arg(long = "allowed-cap-add", value_parser = parse_capability)]
    allowed_cap_add: Vec<String>,
    /// Do not register the containers of the local Docker engine in the catalog.
    #[arg(long)]
    no_registrator: bool,
    /// Allow Consul script checks (`Args`/`Script` in check definitions). Off by default, as in
    /// Consul: a script check runs any command the HTTP API is given.
    #[arg(long)]
    enable_script_checks: bool,
    /// How many versions of each app are kept (older ones are dropped).
    #[arg(long, default_value_t = mesh_core::state::MAX_APP_VERSIONS)]
    max_app_versions: usize,
    /// MiB preallocated next to the state log for commands that stop tasks (delete, kill, scale
    /// down) while the log cannot be written, e.g. on a full disk. 0: none.
    #[arg(long, default_value_t = 1)]
    state_reserve_mb: u64,
    /// A second DNS domain answered like --domain (answers use the domain of the query).
    #[arg(long)]
    alt_domain: Option<String>,
    /// TTL (seconds) of DNS node answers, and of .addr, NS and PTR answers.
    #[arg(long, default_value = "0", value_parser = parse_secs)]
    dns_node_ttl: u32,
    /// TTL of a service's DNS answers, NAME=SECS; may repeat. An exact name wins, else the longest
    /// `prefix*` entry; `*` alone is the default (otherwise 0).
    #[arg(long = "dns-service-ttl", value_parser = parse_service_ttl)]
    dns_service_ttl: Vec<String>,
    /// Negative-caching TTL (seconds): the SOA minimum, also the SOA record's own TTL.
    #[arg(long, default_value = "0", value_parser = parse_secs)]
    dns_soa_min_ttl: u32,
    /// Answer only passing instances in DNS (by default instances in warning are answered too).
    #[arg(long)]
    dns_only_passing: bool,
    /// Consul's DNS truncation: UDP answers without EDNS are cut to 3 records and TC is never set
    /// (by default answers are cut only to what fits, with TC set so clients retry over TCP).
    #[arg(long)]
    dns_consul_truncation: bool,
    /// Upstream DNS server (IP or IP:PORT) for names outside the domain; may repeat, tried in order.
    /// Without one such names are REFUSED.
    #[arg(long = "dns-recursor", value_parser = parse_recursor)]
    dns_recursors: Vec<SocketAddr>,
    /// How long each recursor gets, e.g. 2s or 500ms.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    dns_recursor_timeout: Duration,
    /// `nearest`: a plain `<svc>.service.<domain>` lookup with no healthy instance in this
    /// datacenter is answered from the nearest datacenter that has one (by WAN round-trip time;
    /// at most 3 tried). `none` (the default, as Consul): no failover without a prepared query.
    #[arg(long, default_value = "none", value_parser = ["none", "nearest"])]
    dns_failover: String,
    /// Names of other datacenters (DNS, and lookups for them) answer their nodes' and services'
    /// WAN addresses (`TaggedAddresses.wan`, from `--advertise-wan`) where they have one.
    #[arg(long)]
    translate_wan_addrs: bool,
    /// Outstanding offers are rescinded after this long (e.g. 30s, 500ms; 0 = never), so a
    /// framework that hoards offers cannot starve the others.
    #[arg(long, default_value = "30s", value_parser = parse_span)]
    offer_timeout: std::time::Duration,
    /// HEARTBEAT interval of Mesos v1 scheduler API streams.
    #[arg(long, default_value = "15s", value_parser = parse_span)]
    mesos_heartbeat: std::time::Duration,
    /// Unacknowledged status updates to Mesos-API frameworks are re-sent after this long.
    #[arg(long, default_value = "10s", value_parser = parse_span)]
    status_update_resend: std::time::Duration,
    /// Most HTTP connections open at once over all listeners; more are answered 503 and closed
    /// (default: three quarters of the open-files limit, which is raised to its hard limit).
    #[arg(long)]
    http_max_conns: Option<usize>,
    /// Most HTTP connections open at once from one client IP, as Consul's
    /// `http_max_conns_per_client`; more are answered 429 and closed (0 = no limit).
    #[arg(long, default_value_t = 200)]
    http_max_conns_per_client: usize,
    /// Time a client has to send a complete request head, from connecting or from the first byte
    /// of a later request.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    http_header_timeout: Duration,
    /// A keep-alive HTTP connection without a request for this long is closed.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    http_idle_timeout: Duration,
    /// Time a client has to send a complete request body.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    http_body_timeout: Duration,
    /// A response the client does not read for this long closes the connection (this drops
    /// `/v2/events` clients that stopped reading). Long-polls that wait are not affected.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    http_write_timeout: Duration,
    /// Smallest offer worth making, Mesos' form `cpus:0.1;mem:32` (cpus, mem, disk).
    #[arg(long, default_value = "cpus:0.001", value_parser = parse_min_allocatable)]
    min_allocatable_resources: mesh_core::model::Resources,
    /// Task stdout/stderr are rotated before they grow past this size (e.g. 10MiB, 512KiB;
    /// 0 = no rotation: straight into the sandbox files, unbounded).
    #[arg(long, default_value = "10MiB", value_parser = parse_size)]
    task_log_max_size: u64,
    /// Rotated files kept per stream (stdout.1 ... stdout.N) besides the live one.
    #[arg(long, default_value_t = 2)]
    task_log_max_files: u32,
    /// Sandboxes of ended tasks are removed after this long while the disk has room (Mesos'
    /// --gc_delay); the delay shrinks as the disk fills.
    #[arg(long, default_value = "1weeks", value_parser = parse_span)]
    gc_delay: std::time::Duration,
    /// Fraction of the disk to keep free: the GC delay is gc-delay * (1 - headroom - disk usage).
    #[arg(long, default_value = "0.1", value_parser = parse_fraction)]
    gc_disk_headroom: f64,
    /// How often the disk usage is checked and ended sandboxes are collected.
    #[arg(long, default_value = "1mins", value_parser = parse_span)]
    disk_watch_interval: std::time::Duration,
    /// How often the sandbox of a task with a `disk` limit is measured; above the limit the task
    /// is killed and fails.
    #[arg(long, default_value = "15secs", value_parser = parse_span)]
    container_disk_watch_interval: std::time::Duration,
}

/// `10MiB`, `512KiB`, `1GiB`, `100KB`, `2MB` or plain bytes.
fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let v: f64 = num.parse().map_err(|_| format!("bad size {s:?} (e.g. 10MiB, 512KiB, 1048576)"))?;
    let mult = match unit.trim() {
        "" | "B" => 1.0,
        "KiB" | "K" | "k" => 1024.0,
        "MiB" | "M" | "m" => 1024.0 * 1024.0,
        "GiB" | "G" | "g" => 1024.0 * 1024.0 * 1024.0,
        "KB" | "kB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        u => return Err(format!("unknown size unit {u:?} (B, KiB, MiB, GiB, KB, MB, GB)")),
    };
    let bytes = v * mult;
    if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
        return Err(format!("bad size {s:?}"));
    }
    Ok(bytes as u64)
}

fn parse_fraction(s: &str) -> Result<f64, String> {
    s.trim()
        .parse::<f64>()
        .ok()
        .filter(|v| (0.0..=1.0).contains(v))
        .ok_or_else(|| format!("expected 0.0 to 1.0, not {s:?}"))
}

fn parse_secs(s: &str) -> Result<u32, String> {
    s.strip_suffix('s').unwrap_or(s).parse().map_err(|_| format!("expected seconds, e.g. 30 or 30s, not {s:?}"))
}

fn parse_service_ttl(s: &str) -> Result<String, String> {
    ServiceTtls::default().add(s).map_err(|e| e.to_string())?;
    Ok(s.to_owned())
}

fn parse_container_dns(s: &str) -> Result<mesh_server::node::ContainerDns, String> {
    use mesh_server::node::ContainerDns;
    match s {
        "auto" => Ok(ContainerDns::Auto),
        "off" => Ok(ContainerDns::Off),
        ip => ip.parse().map(ContainerDns::At).map_err(|_| format!("expected auto, off or an IP address, not {s:?}")),
    }
}

fn parse_join(s: &str) -> Result<SocketAddr, String> {
    parse_addr(s, 8301)
}

/// Gossip timing for tests on one machine: probe every `period` (the hidden
/// `--gossip-probe-period` and `--gossip-wan-probe-period`), the rest scaled from it.
fn test_timing(period: Duration, wan: bool) -> mesh_server::gossip::GossipTiming {
    mesh_server::gossip::GossipTiming {
        probe_period: period,
        probe_rtt: period * 2 / 5,
        gossip_interval: period / 4,
        wan,
        ..mesh_server::gossip::GossipTiming::fast()
    }
}

fn parse_join_wan(s: &str) -> Result<SocketAddr, String> {
    parse_addr(s, 8302)
}

fn parse_server(s: &str) -> Result<SocketAddr, String> {
    parse_addr(s, 8300)
}

fn parse_addr(s: &str, port: u16) -> Result<SocketAddr, String> {
    use std::net::ToSocketAddrs;
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, port));
    }
    s.to_socket_addrs()
        .map_err(|e| format!("cannot resolve {s:?}: {e}"))?
        .next()
        .ok_or_else(|| format!("{s:?} has no address"))
}

fn parse_recursor(s: &str) -> Result<SocketAddr, String> {
    s.parse::<SocketAddr>()
        .or_else(|_| s.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, 53)))
        .map_err(|_| format!("expected IP or IP:PORT, not {s:?}"))
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("expected a duration like 2s or 500ms, not {s:?}");
    let d = if let Some(ms) = s.strip_suffix("ms") {
        Duration::from_millis(ms.parse().map_err(|_| bad())?)
    } else {
        Duration::from_secs_f64(
            s.strip_suffix('s').unwrap_or(s).parse::<f64>().ok().filter(|v| *v >= 0.0).ok_or_else(bad)?,
        )
    };
    if d.is_zero() { Err(bad()) } else { Ok(d) }
}

/// `30s`, `30secs`, `500ms`, `2mins`, `1hrs` or plain seconds.
fn parse_span(s: &str) -> Result<std::time::Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let v: f64 = num.parse().map_err(|_| format!("bad duration {s:?} (e.g. 30s, 500ms)"))?;
    let secs = match unit.trim() {
        "" | "s" | "sec" | "secs" => v,
        "ms" => v / 1000.0,
        "m" | "min" | "mins" => v * 60.0,
        "h" | "hr" | "hrs" => v * 3600.0,
        "d" | "day" | "days" => v * 86400.0,
        "w" | "week" | "weeks" => v * 7.0 * 86400.0,
        u => return Err(format!("unknown duration unit {u:?} (ms, s, mins, hrs, days, weeks)")),
    };
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!("bad duration {s:?}"));
    }
    Ok(std::time::Duration::from_secs_f64(secs))
}

fn parse_min_allocatable(s: &str) -> Result<mesh_core::model::Resources, String> {
    let mut r = mesh_core::model::Resources::default();
    for part in s.split(';').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = part.split_once(':').ok_or_else(|| format!("expected name:value, got {part:?}"))?;
        let v: f64 = v.trim().parse().map_err(|_| format!("bad amount in {part:?}"))?;
        if !v.is_finite() || v < 0.0 {
            return Err(format!("bad amount in {part:?}"));
        }
        match k.trim() {
            "cpus" => r.cpus = v,
            "mem" => r.mem = v,
            "disk" => r.disk = v,
            other => return Err(format!("unknown resource {other:?} (cpus, mem, disk)")),
        }
    }
    Ok(r)
}

fn parse_runtime(s: &str) -> Result<RuntimeKind, String> {
    match s {
        "auto" => Ok(RuntimeKind::Auto),
        "process" => Ok(RuntimeKind::Process),
        "docker" => Ok(RuntimeKind::Docker),
        #[cfg(feature = "memory-runtime")]
        "memory" => Ok(RuntimeKind::Memory),
        _ => Err("expected auto, process or docker".into()),
    }
}

fn parse_host_path(s: &str) -> Result<PathBuf, String> {
    let p = PathBuf::from(s);
    if !p.is_absolute() || p.components().any(|c| c == std::path::Component::ParentDir) {
        return Err(format!("expected an absolute path without '..', not {s:?}"));
    }
    Ok(p)
}

fn parse_capability(s: &str) -> Result<String, String> {
    let name = mesh_core::runtime::capability_name(s);
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_') {
        return Err(format!("expected a capability name such as NET_ADMIN, or ALL, not {s:?}"));
    }
    Ok(name)
}

fn parse_ports(s: &str) -> Result<(u16, u16), String> {
    let (a, b) = s.split_once('-').ok_or("expected LOW-HIGH, e.g. 31000-32000")?;
    let lo: u16 = a.trim().parse().map_err(|_| format!("bad port {a}"))?;
    let hi: u16 = b.trim().parse().map_err(|_| format!("bad port {b}"))?;
    if lo == 0 || lo > hi {
        return Err("LOW must be at least 1 and not above HIGH".into());
    }
    Ok((lo, hi))
}

fn parse_attr(s: &str) -> Result<(String, String), String> {
    let (k, v) = s.split_once(':').ok_or("expected key:value")?;
    Ok((k.trim().to_owned(), v.trim().to_owned()))
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_lowercase())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

fn host_mem_mib() -> f64 {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map(|kb| (kb / 1024.0).floor())
        .unwrap_or(1024.0)
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// `mesh logger`: stdin to the rotated file until the task's side of the pipe is closed.
fn run_logger(l: LoggerArgs) -> ExitCode {
    use std::os::fd::AsFd;
    let stdin = match std::io::stdin().as_fd().try_clone_to_owned() {
        Ok(fd) => std::fs::File::from(fd),
        Err(_) => return ExitCode::FAILURE,
    };
    let rotation = LogRotation { max_size: l.max_size, max_files: l.max_files };
    match logger::run(stdin, &l.file, rotation) {
        Ok(_) => ExitCode::SUCCESS,
        Err(_) => ExitCode::FAILURE,
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    Dev,
    Server,
    Agent,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                // openraft logs every failed heartbeat to an unreachable member (several a
                // second); mesh's Raft network says once that a member cannot be reached.
                "info,hickory_server=warn,openraft=warn,openraft::replication=off,openraft::engine::handler::replication_handler=error"
                    .into()
            }),
        )
        .with_writer(mesh_server::logs::Tee)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    // Consul spells it `consul members -wan`: take the single-dash form too.
    let args = std::env::args_os().map(|a| if a == "-wan" { "--wan".into() } else { a });
    let matches = <Cli as clap::CommandFactory>::command().get_matches_from(args);
    let cli = match <Cli as clap::FromArgMatches>::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    let (role, mut a) = match cli.cmd {
        Cmd::Dev(a) => (Role::Dev, *a),
        Cmd::Server(a) => (Role::Server, *a),
        Cmd::Agent(a) => (Role::Agent, *a),
        Cmd::Logger(l) => return run_logger(l),
        Cmd::Members(a) => return run_members(a),
        Cmd::Node(a) => return run_node(a),
        Cmd::App(a) => return app_cmd::run(a),
        Cmd::Snapshot(a) => return run_snapshot(a),
        Cmd::Operator(a) => return run_operator(a),
        Cmd::HollowAgents(a) => return hollow::run(a),
    };
    // --bind moves every listener that was not given in full.
    if let (Some(ip), Some((_, sub))) = (a.bind, matches.subcommand()) {
        let defaulted = |id: &str| sub.value_source(id) == Some(clap::parser::ValueSource::DefaultValue);
        if defaulted("http") {
            a.http.iter_mut().for_each(|h| h.set_ip(ip));
        }
        if defaulted("dns") {
            a.dns.set_ip(ip);
        }
        if defaulted("rpc") {
            a.rpc.set_ip(ip);
        }
        if defaulted("serf_lan") {
            a.serf_lan.set_ip(ip);
        }
        if defaulted("serf_wan") {
            a.serf_wan.set_ip(ip);
        }
        if sub.value_source("advertise") == Some(clap::parser::ValueSource::DefaultValue) && !ip.is_unspecified() {
            a.advertise = ip;
        }
    }
    if role == Role::Agent && a.servers.is_empty() && a.join.is_empty() {
        eprintln!(
            "mesh: an agent needs --join ADDR (any member's gossip address) or --server ADDR (a server's RPC address)"
        );
        return ExitCode::from(2);
    }

    let task_logs = match a.task_log_max_size {
        0 => TaskLogs::Sandbox,
        max_size => match std::env::current_exe() {
            Ok(program) => {
                TaskLogs::Rotate { program, rotation: LogRotation { max_size, max_files: a.task_log_max_files } }
            }
            Err(e) => {
                eprintln!("mesh: cannot find the mesh executable to run task loggers: {e}");
                return ExitCode::FAILURE;
            }
        },
    };
    let fd_limit = mesh_server::serve::raise_fd_limit().unwrap_or_else(|e| {
        tracing::warn!(error = %e, "cannot read or raise the open-files limit");
        1024
    });
    let node = a.node.unwrap_or_else(host_name);
    if let Err(e) = mesh_core::app::AppId::parse(&node) {
        eprintln!("mesh: --node {node:?} is not a valid DNS label: {e}");
        return ExitCode::from(2);
    }
    // A datacenter is a label of DNS names (`web.service.dc2.mesh`) and names a gossip pool.
    if a.dc.contains(['.', '/']) || mesh_core::app::AppId::parse(&a.dc).is_err() || a.dc.len() > 63 {
        eprintln!("mesh: --dc {:?} is not a valid datacenter name (a DNS label: letters, digits and -)", a.dc);
        return ExitCode::from(2);
    }
    let dns_options = DnsConfig {
        alt_domain: a.alt_domain.map(|d| d.trim_matches('.').to_lowercase()),
        node_ttl: a.dns_node_ttl,
        service_ttl: ServiceTtls::parse(a.dns_service_ttl.iter().map(String::as_str)).unwrap_or_default(),
        soa_min_ttl: a.dns_soa_min_ttl,
        only_passing: a.dns_only_passing,
        consul_truncation: a.dns_consul_truncation,
        recursors: a.dns_recursors,
        recursor_timeout: a.dns_recursor_timeout,
        failover_nearest: a.dns_failover == "nearest",
        translate_wan_addrs: a.translate_wan_addrs,
        ..DnsConfig::default()
    };
    let domain = a.domain.trim_matches('.').to_lowercase();
    let zone = DnsConfig { domain: domain.clone(), datacenter: a.dc.clone(), ..dns_options.clone() };
    if let Err(e) = DnsZone::new(zone) {
        eprintln!("mesh: {e}");
        return ExitCode::from(2);
    }
    let cfg = NodeConfig {
        http: a.http,
        dns: a.dns,
        data_dir: a.data_dir,
        domain,
        node,
        datacenter: a.dc,
        runtime: a.runtime,
        ports: a.ports,
        advertise: a.advertise,
        cpus: a.cpus.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get() as f64).unwrap_or(1.0)),
        mem: a.mem.unwrap_or_else(host_mem_mib),
        disk: a.disk,
        attributes: a.attrs.into_iter().collect::<BTreeMap<_, _>>(),
        // An agent's tasks outlive it (Mesos agents recover theirs); draining is explicit.
        keep_tasks_on_exit: a.keep_tasks_on_exit || role == Role::Agent,
        host_access: mesh_core::runtime::HostAccess {
            allow_privileged: a.allow_privileged,
            host_paths: a.allowed_host_paths,
            cap_add: a.allowed_cap_add,
        },
        registrator: !a.no_registrator,
        enable_script_checks: a.enable_script_checks,
        max_app_versions: a.max_app_versions,
        state_reserve_mb: a.state_reserve_mb,
        dns_options,
        http_limits: mesh_server::serve::HttpLimits {
            max_conns: a.http_max_conns.unwrap_or_else(|| mesh_server::serve::default_max_conns(fd_limit)),
            max_conns_per_client: a.http_max_conns_per_client,
            header_timeout: a.http_header_timeout,
            idle_timeout: a.http_idle_timeout,
            body_timeout: a.http_body_timeout,
            write_timeout: a.http_write_timeout,
        },
        mesos: mesh_server::control::MesosConfig {
            offer_timeout: Some(a.offer_timeout).filter(|d| !d.is_zero()),
            heartbeat: a.mesos_heartbeat.max(std::time::Duration::from_millis(100)),
            update_resend: a.status_update_resend.max(std::time::Duration::from_millis(100)),
            min_allocatable: a.min_allocatable_resources,
            ..Default::default()
        },
        task_logs,
        gc: GcPolicy { delay: a.gc_delay, headroom: a.gc_disk_headroom, interval: a.disk_watch_interval },
        container_disk_watch_interval: a.container_disk_watch_interval.max(std::time::Duration::from_millis(10)),
        rpc: a.rpc,
        servers: a.servers,
        docker_network: a.docker_network,
        container_dns: a.container_dns,
        serf_lan: a.serf_lan,
        join: a.join,
        serf_wan: a.serf_wan,
        join_wan: a.join_wan,
        advertise_wan: a.advertise_wan,
        gossip_wan_timing: a
            .gossip_wan_probe_period
            .map_or_else(mesh_server::gossip::GossipTiming::wan, |p| test_timing(p, true)),
        gossip_timing: a
            .gossip_probe_period
            .map_or_else(mesh_server::gossip::GossipTiming::default, |p| test_timing(p, false)),
        agent_down_after: a.agent_down_after,
        reregister_timeout: a.agent_reregister_timeout,
        bootstrap_expect: a.bootstrap_expect.max(1),
        raft_timing: mesh_server::raft::RaftTiming::new(a.raft_multiplier),
        dead_server_cleanup: Some(a.dead_server_cleanup_after).filter(|d| !d.is_zero()),
        clock: mesh_core::model::system_clock(),
    };
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("mesh: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let name = match role {
        Role::Dev => "dev",
        Role::Server => "server",
        Role::Agent => "agent",
    };
    let ready = |b: &mesh_server::node::Bound| {
        let http: Vec<String> = b.http.iter().map(|a| a.to_string()).collect();
        // A machine-readable line for scripts and tests.
        println!("mesh {name} ready: http={} dns={}", http.join(","), b.dns);
        let _ = std::io::stdout().flush();
    };
    let res = match role {
        Role::Dev => rt.block_on(run_dev(cfg, ready, shutdown_signal())),
        Role::Server => rt.block_on(mesh_server::node::run_server(cfg, ready, shutdown_signal())),
        Role::Agent => rt.block_on(mesh_server::node::run_agent(cfg, ready, shutdown_signal())),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mesh: {e}");
            ExitCode::FAILURE
        }
    }
}
