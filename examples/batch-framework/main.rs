//! A custom framework on the Mesos v1 scheduler API: run N one-off command jobs to completion
//! (TASK_FINISHED), retrying failed ones, then tear down, print a summary and exit 0 (1 when a
//! job failed for good).
//!
//! ```text
//! mesh dev &
//! cargo run -p mesh-sdk --example batch-framework -- --master http://127.0.0.1:8080 --jobs 5
//! ```
//!
//! It is a [`Framework`]: it decides, the SDK's [`Driver`] talks to the master (subscribe,
//! heartbeats, re-subscribe, acknowledgements, declines of unused offers).

use clap::Parser;
use mesh_sdk::framework::{
    Action, Driver, DriverOptions, Framework, FrameworkInfo, HttpTransport, Id, Offer, TaskInfo, TaskInfoExt,
    TaskState, TaskStatus, View, offered,
};
use std::collections::{BTreeMap, VecDeque};
use std::process::ExitCode;
use std::time::{Duration, Instant};

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

/// The jobs and where they stand.
struct Batch {
    args: Args,
    pending: VecDeque<usize>,
    /// task id → (job, attempt)
    running: BTreeMap<String, (usize, u32)>,
    attempts: BTreeMap<usize, u32>,
    finished: usize,
    failed: Vec<(usize, String)>,
    retried: usize,
    suppressed: bool,
}

impl Batch {
    fn new(args: Args) -> Self {
        let pending = (0..args.jobs).collect();
        Self {
            args,
            pending,
            running: BTreeMap::new(),
            attempts: BTreeMap::new(),
            finished: 0,
            failed: Vec::new(),
            retried: 0,
            suppressed: false,
        }
    }

    fn task(&mut self, job: usize, offer: &Offer) -> TaskInfo {
        let attempt = self.attempts.entry(job).or_insert(0);
        *attempt += 1;
        let id = format!("{}-job-{job}-try-{attempt}", self.args.name);
        self.running.insert(id.clone(), (job, *attempt));
        let mut t = TaskInfo::command(&id, offer, &self.args.cmd, self.args.cpus, self.args.mem);
        t.name = format!("{} job {job}", self.args.name);
        if let Some(c) = t.command.as_mut() {
            let var =
                mesh_sdk::framework::wire::Variable { name: "JOB".into(), kind: None, value: Some(job.to_string()) };
            c.environment = Some(mesh_sdk::framework::wire::Environment { variables: vec![var] });
        }
        t
    }
}

impl Framework for Batch {
    fn subscribed(&mut self, view: &View) -> Vec<Action> {
        eprintln!("batch-framework: subscribed as {}", view.framework_id.clone().unwrap_or_default());
        self.suppressed = false;
        vec![Action::Revive]
    }

    fn offers(&mut self, _view: &View, offers: &[Offer]) -> Vec<Action> {
        let mut actions = Vec::new();
        for offer in offers {
            let (mut cpus, mut mem) = (offered(offer, "cpus"), offered(offer, "mem"));
            let mut tasks = Vec::new();
            while cpus + 1e-9 >= self.args.cpus && mem + 1e-9 >= self.args.mem {
                let Some(job) = self.pending.pop_front() else { break };
                tasks.push(self.task(job, offer));
                cpus -= self.args.cpus;
                mem -= self.args.mem;
            }
            if tasks.is_empty() {
                actions.push(Action::decline(offer, if self.pending.is_empty() { 60.0 } else { 1.0 }));
            } else {
                actions.push(Action::launch(offer, tasks));
            }
        }
        if self.pending.is_empty() && !self.suppressed {
            self.suppressed = true;
            actions.push(Action::Suppress);
        }
        actions
    }

    fn status(&mut self, _view: &View, status: &TaskStatus) -> Vec<Action> {
        let Some(&(job, attempt)) = self.running.get(&status.task_id.value) else { return Vec::new() };
        if !status.state.is_terminal() {
            return Vec::new();
        }
        self.running.remove(&status.task_id.value);
        if status.state == TaskState::Finished {
            self.finished += 1;
            return Vec::new();
        }
        let why = format!("{} {}", status.state.as_str(), status.message.clone().unwrap_or_default());
        if attempt <= self.args.retries {
            eprintln!("batch-framework: job {job} attempt {attempt} ended {why}; retrying");
            self.retried += 1;
            self.pending.push_back(job);
            if self.suppressed {
                self.suppressed = false;
                return vec![Action::Revive];
            }
        } else {
            eprintln!("batch-framework: job {job} failed for good: {why}");
            self.failed.push((job, why));
        }
        Vec::new()
    }

    fn reconcile(&mut self, view: &View) -> Vec<Action> {
        // Level-triggered: ask about launched jobs the master has not reported on yet (an
        // unknown one comes back TASK_LOST and is retried), and want offers while jobs wait.
        let silent: Vec<Id> = self.running.keys().filter(|id| !view.tasks.contains_key(*id)).map(Id::new).collect();
        let mut actions = Vec::new();
        if !silent.is_empty() {
            actions.push(Action::Reconcile(silent));
        }
        if !self.pending.is_empty() && self.suppressed {
            self.suppressed = false;
            actions.push(Action::Revive);
        }
        actions
    }

    fn error(&mut self, message: &str) {
        eprintln!("batch-framework: master error: {message}");
    }

    fn is_done(&self) -> bool {
        self.finished + self.failed.len() == self.args.jobs
    }
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
    let transport = match HttpTransport::new(&args.master) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("batch-framework: {e}");
            return ExitCode::from(2);
        }
    };
    let info = FrameworkInfo {
        name: args.name.clone(),
        roles: vec![args.role.clone()],
        capabilities: vec![mesh_sdk::framework::wire::Capability { kind: "MULTI_ROLE".into() }],
        failover_timeout: Some(args.failover_timeout),
        hostname: Some("batch-framework".into()),
        ..Default::default()
    };
    let jobs = args.jobs;
    let started = Instant::now();
    let mut batch = Batch::new(args);
    let opts = DriverOptions::default().reconcile_interval(Duration::from_secs(10)).decline_seconds(1.0);
    let res = Driver::new(transport, info).with_options(opts).run(&mut batch).await;
    let secs = started.elapsed().as_secs_f64();
    match res {
        Ok(summary) => {
            println!(
                "batch-framework: {jobs} jobs, {} finished, {} failed, {} retried, framework {}, {secs:.1} s",
                batch.finished,
                batch.failed.len(),
                batch.retried,
                summary.framework_id
            );
            if batch.failed.is_empty() { ExitCode::SUCCESS } else { ExitCode::FAILURE }
        }
        Err(e) => {
            eprintln!("batch-framework: {e} ({} of {jobs} jobs finished)", batch.finished);
            ExitCode::FAILURE
        }
    }
}
