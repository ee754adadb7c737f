//! A custom framework on the Mesos v1 scheduler API: run N one-off command jobs to completion
//! (TASK_FINISHED), retrying failed ones, then tear down, print a summary and exit 0 (1 when a
//! job failed for good).
//!
//! ```text
//! mesh dev &
//! cargo run -p mesh-sdk --example batch-framework -- --master http://127.0.0.1:8080 --jobs 5
//! ```
//!
//! The framework is in `batch.rs`, a [`mesh_sdk::framework::Framework`]: it decides, the SDK's
//! [`mesh_sdk::framework::Driver`] talks to the master (subscribe, heartbeats, re-subscribe,
//! acknowledgements, declines of unused offers). `tests/batch_framework.rs` runs it against an
//! in-process cluster (`mesh_server::testing::Cluster`) whose leader is killed mid-run.

mod batch;

use clap::Parser;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(name = "batch-framework", about = "Run N one-off jobs on a mesh (or Mesos) master")]
struct Args {
    /// The master: http://host:port.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    master: String,
    /// How many jobs.
    #[arg(long, default_value_t = 5)]
    jobs: usize,
    /// The shell command of every job ($MESOS_TASK_ID and $JOB are set).
    #[arg(long, default_value = "echo job $JOB done")]
    cmd: String,
    /// CPUs per job.
    #[arg(long, default_value_t = 0.1)]
    cpus: f64,
    /// Memory per job, MiB.
    #[arg(long, default_value_t = 32.0)]
    mem: f64,
    /// Framework name (also the prefix of task ids).
    #[arg(long, default_value = "batch")]
    name: String,
    /// Role to allocate under.
    #[arg(long, default_value = "batch")]
    role: String,
    /// Seconds the master keeps the jobs after the framework disconnects.
    #[arg(long, default_value_t = 60.0)]
    failover_timeout: f64,
    /// Attempts of a failing job after the first.
    #[arg(long, default_value_t = 2)]
    retries: u32,
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn,mesh_sdk=info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args = Args::parse();
    let cfg = batch::Config {
        jobs: args.jobs,
        cmd: args.cmd,
        cpus: args.cpus,
        mem: args.mem,
        name: args.name,
        role: args.role,
        failover_timeout: args.failover_timeout,
        retries: args.retries,
        reconcile_interval: Duration::from_secs(10),
    };
    let jobs = cfg.jobs;
    let report = match batch::run(&args.master, cfg).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("batch-framework: {e}");
            return ExitCode::from(2);
        }
    };
    match &report.error {
        None => println!(
            "batch-framework: {jobs} jobs, {} finished, {} failed, {} retried, framework {}, subscribed {}x, {:.1} s",
            report.finished,
            report.failed.len(),
            report.retried,
            report.framework_id,
            report.subscriptions,
            report.elapsed.as_secs_f64()
        ),
        Some(e) => eprintln!("batch-framework: {e} ({} of {jobs} jobs finished)", report.finished),
    }
    ExitCode::from(report.exit_code())
}
