//! autoscaler: keep a Marathon app's instance count in line with a metric the app exposes.
//!
//! Every `--interval` it reads a number from `--metric-url` (a plain-text number, or a JSON
//! document and `--metric-pointer` to the number in it, e.g. a queue length), computes
//! `desired = ceil(metric / per-instance)` clamped to `[--min, --max]`, and when that differs from
//! the app's `instances` it scales the app through the typed Marathon client
//! ([`mesh_sdk::marathon`]). It does not scale while a deployment of the app is in progress, and
//! waits `--cooldown` after each scaling before the next one. Deployment events are printed as
//! they arrive from the event stream.
//!
//! ```text
//! cargo run -p mesh-sdk --example autoscaler -- \
//!     --marathon http://127.0.0.1:8080 --app /worker \
//!     --metric-url http://127.0.0.1:9000/queue-length --per-instance 10 --min 1 --max 5
//! ```
//!
//! Every flag can also be given as an environment variable (`AUTOSCALER_APP`, `METRIC_URL`, ...).

use clap::Parser;
use futures_util::StreamExt;
use mesh_sdk::marathon::{EventKind, MarathonClient, MarathonError};
use serde_json::Value;
use std::time::{Duration, Instant};

#[derive(Parser, Debug)]
#[command(about = "Scale a Marathon app by a metric it exposes over HTTP")]
struct Args {
    /// Marathon (or mesh) base URL.
    #[arg(long, env = "MARATHON_URL", default_value = "http://127.0.0.1:8080")]
    marathon: String,
    /// The app to scale, e.g. /worker.
    #[arg(long, env = "AUTOSCALER_APP")]
    app: String,
    /// URL that answers the metric: a number, or JSON (see --metric-pointer).
    #[arg(long, env = "METRIC_URL")]
    metric_url: String,
    /// JSON pointer to the number in the metric document, e.g. /queue/length.
    #[arg(long, env = "METRIC_POINTER")]
    metric_pointer: Option<String>,
    /// How much of the metric one instance handles.
    #[arg(long, env = "AUTOSCALER_PER_INSTANCE", default_value_t = 10.0)]
    per_instance: f64,
    /// Fewest instances.
    #[arg(long, env = "AUTOSCALER_MIN", default_value_t = 1)]
    min: u32,
    /// Most instances.
    #[arg(long, env = "AUTOSCALER_MAX", default_value_t = 10)]
    max: u32,
    /// Seconds between metric reads.
    #[arg(long, env = "AUTOSCALER_INTERVAL", default_value_t = 5.0)]
    interval: f64,
    /// Seconds to wait after a scaling before the next one.
    #[arg(long, env = "AUTOSCALER_COOLDOWN", default_value_t = 0.0)]
    cooldown: f64,
}

/// The instance count for `metric`: enough instances at `per_instance` each, within bounds.
fn desired(metric: f64, per_instance: f64, min: u32, max: u32) -> u32 {
    let want = if per_instance > 0.0 && metric.is_finite() { (metric / per_instance).ceil().max(0.0) } else { 0.0 };
    (want.min(u32::MAX as f64) as u32).clamp(min, max.max(min))
}

async fn read_metric(http: &reqwest::Client, args: &Args) -> Result<f64, String> {
    let resp = http.get(&args.metric_url).send().await.map_err(|e| e.to_string())?;
    if !resp.status().is_success() {
        return Err(format!("metric URL answered {}", resp.status()));
    }
    let text = resp.text().await.map_err(|e| e.to_string())?;
    match &args.metric_pointer {
        None => text.trim().parse::<f64>().map_err(|e| format!("metric {:?} is not a number: {e}", text.trim())),
        Some(p) => {
            let v: Value = serde_json::from_str(&text).map_err(|e| format!("metric is not JSON: {e}"))?;
            v.pointer(p).and_then(Value::as_f64).ok_or_else(|| format!("no number at {p} in the metric document"))
        }
    }
}

#[tokio::main]
async fn main() {
    let mut args = Args::parse();
    if !args.app.starts_with('/') {
        args.app.insert(0, '/');
    }
    if args.min > args.max {
        eprintln!("autoscaler: --min {} is above --max {}", args.min, args.max);
        std::process::exit(2);
    }
    let marathon = match MarathonClient::new(&args.marathon) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("autoscaler: {e}");
            std::process::exit(2);
        }
    };
    let http = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().expect("HTTP client");
    println!(
        "autoscaler: app {} on {}, metric {} ({} per instance, {}..={} instances, every {}s)",
        args.app, args.marathon, args.metric_url, args.per_instance, args.min, args.max, args.interval
    );

    // Print how deployments of our app end, from the event stream (reopened if it closes).
    {
        let marathon = marathon.clone();
        let app = args.app.clone();
        tokio::spawn(async move {
            loop {
                match marathon.events(&["deployment_success", "deployment_failed"]).await {
                    Ok(mut events) => {
                        while let Some(ev) = events.next().await {
                            let Ok(ev) = ev else { break };
                            let ours = ev.raw.pointer("/plan/steps").and_then(Value::as_array).is_some_and(|steps| {
                                steps
                                    .iter()
                                    .any(|s| s["actions"].as_array().is_some_and(|a| a.iter().any(|a| a["app"] == app)))
                            });
                            match ev.kind {
                                EventKind::DeploymentSuccess { id } if ours => {
                                    println!("autoscaler: deployment {id} done")
                                }
                                EventKind::DeploymentFailed { id } if ours => {
                                    println!("autoscaler: deployment {id} failed")
                                }
                                _ => {}
                            }
                        }
                    }
                    Err(e) => eprintln!("autoscaler: event stream: {e}"),
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
    }

    let interval = Duration::from_secs_f64(args.interval.max(0.05));
    let cooldown = Duration::from_secs_f64(args.cooldown.max(0.0));
    let mut last_scale: Option<Instant> = None;
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_line = String::new();
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = tokio::signal::ctrl_c() => {
                println!("autoscaler: stopping");
                return;
            }
        }
        let metric = match read_metric(&http, &args).await {
            Ok(m) => m,
            Err(e) => {
                eprintln!("autoscaler: cannot read the metric: {e}");
                continue;
            }
        };
        let app = match marathon.get_app(&args.app).await {
            Ok(app) => app,
            Err(e @ MarathonError::NotFound { .. }) => {
                eprintln!("autoscaler: {e}; waiting for it to exist");
                continue;
            }
            Err(e) => {
                eprintln!("autoscaler: cannot read the app: {e}");
                continue;
            }
        };
        let current = app.instances();
        let want = desired(metric, args.per_instance, args.min, args.max);
        let line = format!("metric={metric} instances={current} running={} desired={want}", app.tasks_running);
        if line != last_line {
            println!("autoscaler: {line}");
            last_line = line;
        }
        if want == current {
            continue;
        }
        if !app.deployments.is_empty() {
            continue; // let the running deployment finish first
        }
        if last_scale.is_some_and(|t| t.elapsed() < cooldown) {
            continue;
        }
        match marathon.scale_app(&args.app, want, false).await {
            Ok(d) => {
                println!("autoscaler: scaling {} from {current} to {want} (deployment {})", args.app, d.deployment_id);
                last_scale = Some(Instant::now());
            }
            Err(MarathonError::Locked { deployments, .. }) => {
                println!("autoscaler: {} is locked by {deployments:?}; retrying later", args.app)
            }
            Err(e) => eprintln!("autoscaler: scaling failed: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::desired;

    #[test]
    fn desired_is_clamped() {
        assert_eq!(desired(0.0, 10.0, 1, 5), 1);
        assert_eq!(desired(11.0, 10.0, 1, 5), 2);
        assert_eq!(desired(1000.0, 10.0, 1, 5), 5);
        assert_eq!(desired(f64::NAN, 10.0, 2, 5), 2);
    }
}
