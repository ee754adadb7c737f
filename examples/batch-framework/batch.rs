//! The batch framework itself, apart from its command line: [`run`] runs `jobs` one-off
//! command jobs to completion against a master and reports how they ended. `main.rs` is the
//! command line around it; `tests/batch_framework.rs` runs it against an in-process cluster
//! whose leader is killed while the jobs run.

use mesh_sdk::framework::{
    Action, Driver, DriverOptions, Framework, FrameworkError, FrameworkInfo, HttpTransport, Id, Offer, TaskInfo,
    TaskInfoExt, TaskState, TaskStatus, View, offered,
};
use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

/// What to run, and how.
#[derive(Clone, Debug)]
pub struct Config {
    /// How many jobs.
    pub jobs: usize,
    /// The shell command of every job (`$MESOS_TASK_ID` and `$JOB` are set).
    pub cmd: String,
    /// CPUs per job.
    pub cpus: f64,
    /// Memory per job, MiB.
    pub mem: f64,
    /// Framework name (also the prefix of task ids).
    pub name: String,
    /// Role to allocate under.
    pub role: String,
    /// Seconds the master keeps the jobs after the framework disconnects.
    pub failover_timeout: f64,
    /// Attempts of a failing job after the first.
    pub retries: u32,
    /// How often the framework reconciles its tasks with the master.
    pub reconcile_interval: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            jobs: 5,
            cmd: "echo job $JOB done".into(),
            cpus: 0.1,
            mem: 32.0,
            name: "batch".into(),
            role: "batch".into(),
            failover_timeout: 60.0,
            retries: 2,
            reconcile_interval: Duration::from_secs(10),
        }
    }
}

/// How a run ended.
#[derive(Clone, Debug)]
pub struct Report {
    /// Jobs that ended TASK_FINISHED.
    pub finished: usize,
    /// Jobs that failed for good, with why.
    pub failed: Vec<(usize, String)>,
    /// Attempts that were retried.
    pub retried: usize,
    /// The framework id (empty if it never subscribed).
    pub framework_id: String,
    /// How many times the framework subscribed (1 + re-subscriptions).
    pub subscriptions: u32,
    /// Why the driver gave up, if it did (the run did not get to the end).
    pub error: Option<String>,
    /// How long it took.
    pub elapsed: Duration,
}

impl Report {
    /// The process's exit code: 0 when every job finished, 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        if self.error.is_none() && self.failed.is_empty() { 0 } else { 1 }
    }
}

/// The jobs and where they stand.
struct Batch {
    cfg: Config,
    pending: VecDeque<usize>,
    /// task id → (job, attempt)
    running: BTreeMap<String, (usize, u32)>,
    attempts: BTreeMap<usize, u32>,
    finished: usize,
    failed: Vec<(usize, String)>,
    retried: usize,
    suppressed: bool,
    framework_id: String,
}

impl Batch {
    fn new(cfg: Config) -> Self {
        let pending = (0..cfg.jobs).collect();
        Self {
            cfg,
            pending,
            running: BTreeMap::new(),
            attempts: BTreeMap::new(),
            finished: 0,
            failed: Vec::new(),
            retried: 0,
            suppressed: false,
            framework_id: String::new(),
        }
    }

    fn task(&mut self, job: usize, offer: &Offer) -> TaskInfo {
        let attempt = self.attempts.entry(job).or_insert(0);
        *attempt += 1;
        let id = format!("{}-job-{job}-try-{attempt}", self.cfg.name);
        self.running.insert(id.clone(), (job, *attempt));
        let mut t = TaskInfo::command(&id, offer, &self.cfg.cmd, self.cfg.cpus, self.cfg.mem);
        t.name = format!("{} job {job}", self.cfg.name);
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
        self.framework_id = view.framework_id.clone().map(|i| i.value).unwrap_or_default();
        eprintln!("batch-framework: subscribed as {}", self.framework_id);
        self.suppressed = false;
        vec![Action::Revive]
    }

    fn offers(&mut self, _view: &View, offers: &[Offer]) -> Vec<Action> {
        let mut actions = Vec::new();
        for offer in offers {
            let (mut cpus, mut mem) = (offered(offer, "cpus"), offered(offer, "mem"));
            let mut tasks = Vec::new();
            while cpus + 1e-9 >= self.cfg.cpus && mem + 1e-9 >= self.cfg.mem {
                let Some(job) = self.pending.pop_front() else { break };
                tasks.push(self.task(job, offer));
                cpus -= self.cfg.cpus;
                mem -= self.cfg.mem;
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
        if attempt <= self.cfg.retries {
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
        self.finished + self.failed.len() == self.cfg.jobs
    }
}

/// Run the jobs against `master` (`http://host:port`) until each finished or failed for good;
/// the driver re-subscribes (same framework id) whenever the master's stream breaks.
pub async fn run(master: &str, cfg: Config) -> Result<Report, FrameworkError> {
    let transport = HttpTransport::new(master)?;
    let info = FrameworkInfo {
        name: cfg.name.clone(),
        roles: vec![cfg.role.clone()],
        capabilities: vec![mesh_sdk::framework::wire::Capability { kind: "MULTI_ROLE".into() }],
        failover_timeout: Some(cfg.failover_timeout),
        hostname: Some("batch-framework".into()),
        ..Default::default()
    };
    let started = Instant::now();
    let opts = DriverOptions::default().reconcile_interval(cfg.reconcile_interval).decline_seconds(1.0);
    let mut batch = Batch::new(cfg);
    let res = Driver::new(transport, info).with_options(opts).run(&mut batch).await;
    let (framework_id, subscriptions, error) = match res {
        Ok(summary) => (summary.framework_id.value, summary.subscriptions, None),
        Err(e) => (batch.framework_id.clone(), 0, Some(e.to_string())),
    };
    Ok(Report {
        finished: batch.finished,
        failed: batch.failed,
        retried: batch.retried,
        framework_id,
        subscriptions,
        error,
        elapsed: started.elapsed(),
    })
}
