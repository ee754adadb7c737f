//! `mesh app deploy [--dc dc1,dc2] APP.json`: create or replace a Marathon app, in several
//! datacenters at once with `--dc`, and follow its deployment in each until every instance
//! runs. A datacenter that cannot be reached is reported and the others go on; the exit code
//! says whether every datacenter got the app.

use crate::{ClientArgs, http_request};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// `mesh app ...`.
#[derive(clap::Parser)]
pub struct AppArgs {
    #[command(subcommand)]
    action: AppAction,
}

#[derive(clap::Subcommand)]
enum AppAction {
    /// Create or replace the app defined in FILE (Marathon's app JSON; `-` reads standard
    /// input) with `PUT /v2/apps/<id>`, then show each datacenter's deployment until every
    /// instance runs.
    Deploy(DeployArgs),
}

#[derive(clap::Parser)]
struct DeployArgs {
    /// The app definition (JSON with an `id`), or `-` for standard input.
    file: PathBuf,
    /// The datacenters to deploy into, comma-separated (`--dc dc1,dc2`); by default the one of
    /// the node at --http-addr.
    #[arg(long, value_delimiter = ',')]
    dc: Vec<String>,
    /// How long to follow the deployments (they go on after it): a Go duration.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    timeout: Duration,
    /// Start the deployments and return without following them.
    #[arg(long)]
    detach: bool,
    #[command(flatten)]
    client: ClientArgs,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    mesh_core::registrator::parse_go_duration(s).map_err(|e| e.to_string())
}

/// Run `mesh app ...`.
pub fn run(a: AppArgs) -> ExitCode {
    match a.action {
        AppAction::Deploy(d) => deploy(d),
    }
}

/// How often a deployment's progress is read.
const POLL: Duration = Duration::from_millis(500);

fn deploy(a: DeployArgs) -> ExitCode {
    let text = if a.file.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin())
    } else {
        std::fs::read_to_string(&a.file)
    };
    let text = match text {
        Ok(t) => t,
        Err(e) => return fail(&format!("{}: {e}", a.file.display())),
    };
    let id = match serde_json::from_str::<Value>(&text) {
        Ok(v) => match v["id"].as_str().map(|s| s.trim_matches('/')).filter(|s| !s.is_empty()) {
            Some(id) => id.to_owned(),
            None => return fail(&format!("{}: the app definition has no \"id\"", a.file.display())),
        },
        Err(e) => return fail(&format!("{}: not JSON: {e}", a.file.display())),
    };
    let addr = &a.client.http_addr;
    let dcs: Vec<String> = a.dc.iter().map(|d| d.trim().to_owned()).filter(|d| !d.is_empty()).collect();
    let dc_query = if dcs.is_empty() { String::new() } else { format!("&dc={}", dcs.join(",")) };
    let path = format!("/v2/apps/{id}?partialUpdate=false{dc_query}");
    let (status, body) = match http_request(addr, "PUT", &path, Some(&text)) {
        Ok(r) => r,
        Err(e) => return fail(&e),
    };
    let answer: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    // Each datacenter's answer: a fan-out's `datacenters`, or the one answer.
    let answers: Vec<(String, u16, Value)> = match answer["datacenters"].as_object() {
        Some(per_dc) if dcs.len() > 1 => dcs
            .iter()
            .map(|dc| {
                let r = &per_dc[dc.as_str()];
                (dc.clone(), r["status"].as_u64().unwrap_or(0) as u16, r["body"].clone())
            })
            .collect(),
        _ => vec![(dcs.first().cloned().unwrap_or_default(), status, answer)],
    };
    let label = |dc: &str| if dc.is_empty() { "local".to_owned() } else { dc.to_owned() };
    let mut following = Vec::new();
    let mut failed = Vec::new();
    for (dc, status, body) in answers {
        if (200..300).contains(&status) {
            let deployment = body["deploymentId"].as_str().unwrap_or("-");
            println!("{}: /{id}: deployment {deployment} started", label(&dc));
            following.push(dc);
        } else {
            let why = body["message"].as_str().map_or_else(|| body.to_string(), str::to_owned);
            println!("{}: /{id}: not deployed: {status} {why}", label(&dc));
            failed.push(dc);
        }
    }
    if a.detach {
        following.clear();
    }
    // Follow each datacenter until its deployment is over and every instance runs.
    let deadline = Instant::now() + a.timeout;
    let mut last: BTreeMap<String, String> = BTreeMap::new();
    while !following.is_empty() {
        let mut still = Vec::new();
        for dc in following {
            let q = if dc.is_empty() { String::new() } else { format!("?dc={dc}") };
            let (line, done) = match http_request(addr, "GET", &format!("/v2/apps/{id}{q}"), None) {
                Ok((200, body)) => progress(&serde_json::from_str(&body).unwrap_or(Value::Null)),
                Ok((status, body)) => (format!("cannot read the app: {status} {}", body.trim()), false),
                Err(e) => (format!("cannot read the app: {e}"), false),
            };
            if last.get(&dc) != Some(&line) {
                println!("{}: /{id}: {line}", label(&dc));
                last.insert(dc.clone(), line);
            }
            if !done {
                still.push(dc);
            }
        }
        following = still;
        if following.is_empty() {
            break;
        }
        if Instant::now() >= deadline {
            for dc in &following {
                println!("{}: /{id}: still deploying after {:?}", label(dc), a.timeout);
            }
            failed.extend(following);
            break;
        }
        std::thread::sleep(POLL);
    }
    if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        let names: Vec<String> = failed.iter().map(|d| label(d)).collect();
        fail(&format!("/{id} is not deployed in {}", names.join(", ")))
    }
}

/// One line of an app's progress (`GET /v2/apps/<id>`) and whether its deployment is over with
/// every instance running.
fn progress(v: &Value) -> (String, bool) {
    let app = &v["app"];
    let n = |k: &str| app[k].as_u64().unwrap_or(0);
    let (want, running, healthy) = (n("instances"), n("tasksRunning"), n("tasksHealthy"));
    let deploying = app["deployments"].as_array().is_some_and(|d| !d.is_empty());
    let checked = app["healthChecks"].as_array().is_some_and(|h| !h.is_empty());
    let mut line = format!("{running}/{want} running");
    if checked {
        line.push_str(&format!(", {healthy} healthy"));
    }
    let done = !deploying && running >= want && (!checked || healthy >= want);
    line.push_str(if done {
        ", deployed"
    } else if deploying {
        ", deploying"
    } else {
        ", waiting"
    });
    (line, done)
}

fn fail(m: &str) -> ExitCode {
    eprintln!("mesh: {m}");
    ExitCode::FAILURE
}
