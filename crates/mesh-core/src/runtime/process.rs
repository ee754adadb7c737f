//! The process runtime: tasks are plain host processes, one process group each.
//!
//! # Layout
//!
//! Every task gets a sandbox `work_dir/<task_id>/` that is its working directory and holds
//! `stdout`, `stderr` and `task.json` (pid, pgid, process start time, labels, ports, grace,
//! cgroups). `MESOS_SANDBOX` points at the sandbox. The environment is cleared except `PATH`,
//! `HOME` and `LANG` of the agent, then the spec's env is added, then `MESOS_SANDBOX` and
//! [`MARKER_ENV`] (`MESH_TASK_MARKER=<hash of work_dir>/<task id>`, see below), which the spec
//! cannot override. A `Command::Shell` runs as
//! `/bin/sh -c <s>`, a `Command::Args` runs `argv[0]` directly (looked up on `PATH`). A
//! `Command::Shell` that is a simple command (plain words, the first one a program found on the
//! task's `PATH` and not a shell builtin or keyword, see `direct_exec`) is run directly
//! instead, with the `PWD` dash would add, as `bash -c` does: the same argv, environment and
//! exit status, but one process instead of two (dash forks even for the last command). Should
//! that exec fail, `/bin/sh -c` runs it after all. Each task
//! leads its own process group, so a kill reaches its children and grandchildren too.
//!
//! # Disk: logs, limits, garbage collection
//!
//! - `stdout`/`stderr` are written as [`ProcessOptions::logs`] says ([`logger`]): straight
//!   into the files, or through a pipe to a rotating logger process per stream that outlives
//!   the agent. A task's end (`Exited`) waits up to 2 s for its loggers to write the last bytes.
//! - A task whose spec has `disk > 0` has its sandbox measured every
//!   [`ProcessOptions::disk_watch_interval`] ([`disk`]); above the limit its group is SIGKILLed
//!   and it ends with `killed: false` and the message `disk limit of N MiB exceeded (used M MiB);
//!   killed by signal 9 (SIGKILL)`. `task.json` keeps `disk`, so an adopted task is measured too.
//! - [`ProcessRuntime::spawn_gc`] removes the sandboxes of ended tasks ([`gc`]).
//!
//! # Isolation: which mode is used when
//!
//! [`ProcessRuntime::new`] probes the host once; [`ProcessRuntime::isolation`] reports the result.
//!
//! - `"cgroup-v2"` when `/sys/fs/cgroup` is a cgroup v2 mount (it has `cgroup.controllers`)
//!   offering both `memory` and `cpu`, and both can be enabled in the `cgroup.subtree_control`
//!   of the agent's own cgroup (from `/proc/self/cgroup`) and of a runtime cgroup
//!   `<own cgroup>/mesh-<hash of work_dir>/` created below it. That fails with `EBUSY` when the
//!   agent's own cgroup is not the root and holds processes ("no internal processes" rule), e.g.
//!   in most containers and systemd services without an extra level of delegation. Each task
//!   gets a child cgroup `mesh-<hash>/<task_id>` with `memory.max = mem MiB`, `memory.swap.max = 0`,
//!   `memory.oom.group = 1` and `cpu.max = "<cpus*100000> 100000"`. The task's first process (a
//!   `/bin/sh`) joins it before anything of the task runs (`echo 0 > cgroup.procs`, then the
//!   command runs in it or is `exec`ed by it; see `join_prelude`), so nothing of the task escapes
//!   the limit. The spawn itself is a `posix_spawn` (vfork): a hook in a forked child (as
//!   before) made every launch copy the agent's page tables, a cost that grew with its size. A kernel OOM kill is read from `memory.events`
//!   (`oom_kill`) and reported in the `Exited` message ("memory limit of N MiB exceeded").
//! - `"rlimit"` otherwise: `RLIMIT_DATA = mem + 32 MiB` (`ulimit -d` in the same prelude). Since
//!   Linux 4.7 `RLIMIT_DATA` counts private writable mappings (heap and anonymous `mmap`), not
//!   shared libraries or `PROT_NONE` reservations, so it does not break Python, unlike a tight
//!   `RLIMIT_AS`; the 32 MiB slack covers thread stacks and allocator slack. An over-allocation
//!   makes `malloc` fail (Python exits 1 with `MemoryError`); it is reported as a plain exit and
//!   cannot be told apart from other failures. The limit is per process, not per task, and
//!   `cpus` is not enforced in this mode.
//!
//! On the machine this runtime was written on (kernel 6.18, a container) `/sys/fs/cgroup` is a
//! hybrid layout: a tmpfs with cgroup v1 hierarchies for `memory`, `cpu`, ... and a cgroup v2
//! mount at `/sys/fs/cgroup/unified` that only carries `hugetlb`. So the mode there is `"rlimit"`.
//!
//! # Tracking: finding every process of a task
//!
//! A process can leave its task's process group (`setsid`, a double fork) and ignore SIGTERM;
//! it must still die with the task. [`ProcessRuntime::tracking`] says how processes are found:
//!
//! - `"cgroup-v2"` (with the `"cgroup-v2"` isolation): the task's cgroup; killed by writing
//!   `cgroup.kill` (SIGKILL to every pid listed on kernels without it), until it is empty.
//! - `"cgroup-v1-freezer"` otherwise, when a cgroup v1 hierarchy with the `freezer` controller is
//!   mounted (found in `/proc/self/mountinfo`) and a runtime cgroup
//!   `<freezer mount>/<own freezer cgroup>/mesh-<hash of work_dir>` can be created (root on the
//!   machine this was written on). Each task gets `mesh-<hash>/<task_id>`, joined before the
//!   task runs like the v2 cgroup. It is killed the way Mesos's Linux launcher destroys a container:
//!   write `FROZEN` to `freezer.state` (so nothing forks meanwhile), SIGKILL every pid in
//!   `cgroup.procs`, write `THAWED` (the kills are delivered), repeat until empty.
//! - `"environ"` otherwise (or when asked for with [`TaskTracking::Environ`]): only the scan below.
//!
//! In every mode, `/proc/*/environ` is also scanned for the task's [`MARKER_ENV`] (the scan
//! also finds processes that left a cgroup); each one found is killed through a pidfd opened
//! before its marker is read again, so a pid reused in between is never hit; scans repeat until
//! one finds nothing. A process that both leaves the cgroup (needs the privileges to write
//! `cgroup.procs`) and drops its environment (`env -i`, `execve` with a new one) escapes; in
//! `"environ"` mode dropping the environment suffices, and a process forking faster than the
//! bounded kill rounds can outrun them.
//!
//! Everything of a task is killed when its leader ends, and by [`Runtime::recover`] for tasks it
//! does not adopt. The scans and cgroup writes block, so they run on tokio's blocking pool.
//!
//! # Crash safety: the record comes first
//!
//! `start` writes `task.json` with `launching: true` and no pid (the intent) *before* the
//! spawn, and completes it (pid, pgid, start time, `launching: false`) right after, so no task
//! process can exist without a record that a restart finds. A restart that finds an intent
//! (the agent died between the spawn and the completion) does not adopt the task (its leader
//! is not known for sure) but kills everything it started, found by cgroup and marker.
//! Recovery then sweeps: every process carrying this runtime's marker, and every task cgroup
//! below the runtime's cgroups, that belongs to no adopted (or launching) task is killed, and
//! the empty cgroups are removed.
//!
//! The intent goes into a new `task.json` and the complete record is written over it in place
//! (one `pwrite` at offset 0 of the still open file): one new inode per launch instead of two
//! temporary files and two renames, which profiles showed slow on an ext4 after many deletes.
//! (A `task.json` already there is still replaced with a temporary file and a rename.) A record
//! is normally far below a page, so a dying agent leaves the intent or the complete record
//! (no power loss safety is claimed: nothing is fsynced); were a write ever cut short, the file
//! holds a prefix of the complete record followed by the rest of the intent: `launching` is the
//! last field and the complete record is longer, so it either does not parse (not adopted, and
//! the sweep kills the task), still says `launching: true` (killed), or holds the complete
//! record's pid, pgid and start time (adopted correctly).
//!
//! # Ending, killing, re-adoption
//!
//! A watcher task per task sends [`RuntimeEvent::Started`] and waits for the process; when the
//! group leader ends, whatever is left of the task (process group, cgroups, marked processes) is
//! SIGKILLed, as Mesos destroys a container, `task.json` is renamed to `task.done.json` (so a reused pid is never
//! adopted) and [`RuntimeEvent::Exited`] is sent.
//!
//! [`Runtime::kill`] sends SIGTERM to the group and SIGKILL after the grace period; killing an
//! unknown or already ended task is `Ok(())` (idempotent). Killing a task that is already being
//! killed does not send a second SIGTERM, but a shorter grace still brings the SIGKILL forward.
//!
//! Dropping a [`ProcessRuntime`] stops watching but leaves the tasks running (no
//! `kill_on_drop`), like an agent restart; a new runtime on the same `work_dir` adopts them with
//! [`Runtime::recover`]: a `task.json` is adopted only if its pid is alive and its start time
//! (field 22 of `/proc/<pid>/stat`) matches. An adopted task is watched with a pidfd (polling
//! `/proc` where `pidfd_open` is unavailable); its exit status is not ours to collect, so it ends
//! with [`Exit::Unknown`]. Recovery sends no `Started` event: the returned list says what runs.
//! `task.json` files of dead tasks are renamed to `task.done.json` (after what is left of them
//! has been killed: processes that left the group of a leader that died meanwhile); sandboxes
//! are kept.
//!
//! Launching a task id that this runtime already watches fails with [`RuntimeError::Launch`]
//! without a `Failed` event (the running task is fine); every other launch failure both returns
//! the error and sends [`RuntimeEvent::Failed`].

use super::gc::{self, GcPolicy};
use super::logger::{self, Loggers, TaskLogs};
use super::{Command, Exit, RecoveredTask, Runtime, RuntimeError, RuntimeEvent, TaskSpec, disk};
use crate::model::{Millis, TaskId, now_millis};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, SystemTime};
use tokio::sync::{mpsc, watch};
use tokio::task::AbortHandle;

/// The live record of a task in its sandbox.
const TASK_FILE: &str = "task.json";
/// What [`TASK_FILE`] is renamed to once the task has ended.
const DONE_FILE: &str = "task.done.json";
/// What an unreadable [`TASK_FILE`] is renamed to by `recover`.
const INVALID_FILE: &str = "task.invalid.json";
/// How long `kill_all` waits beyond the grace period.
const KILL_ALL_MARGIN: Duration = Duration::from_secs(5);
/// Slack added to `mem` for `RLIMIT_DATA`.
const RLIMIT_SLACK_MIB: f64 = 32.0;
/// How often `/proc` is polled for adopted tasks when pidfds are not available.
const PROC_POLL: Duration = Duration::from_millis(250);
const MIB: f64 = 1024.0 * 1024.0;
const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// How long a task's end waits for its loggers to write the last output.
const LOG_DRAIN: Duration = Duration::from_secs(2);
/// The environment variable every task process carries: `<runtime key>/<task id>`, where the
/// runtime key is a hash of the work dir (see [`ProcessRuntime::marker`]).
pub const MARKER_ENV: &str = "MESH_TASK_MARKER";
/// How many scan-and-kill rounds `destroy` makes before it gives up on a task's processes.
const DESTROY_ROUNDS: usize = 50;
/// Pause between two scan-and-kill rounds.
const DESTROY_PAUSE: Duration = Duration::from_millis(10);
/// Used when the agent itself has no `PATH`.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Runs tasks as host processes; see the [module docs](self).
pub struct ProcessRuntime {
    inner: Arc<Inner>,
}

struct Inner {
    work_dir: PathBuf,
    events: mpsc::Sender<RuntimeEvent>,
    isolation: Isolation,
    tracking: Tracking,
    /// The runtime key: a hash of `work_dir`, the first half of every task's [`MARKER_ENV`].
    key: String,
    tasks: Mutex<HashMap<TaskId, Entry>>,
    /// Task ids between the start of `start` and their entry in `tasks` (or failure): `recover`
    /// leaves their processes alone.
    launching: Mutex<HashSet<TaskId>>,
    /// The marker scans of ending tasks, shared (one `/proc` scan serves every task ending at
    /// the same time).
    sweeper: Arc<MarkerSweeper>,
    /// Test hook: `start` returns right after the spawn, as if the agent died there.
    #[cfg(test)]
    halt_after_spawn: AtomicBool,
    options: ProcessOptions,
}

/// Settings of a [`ProcessRuntime`] beyond its directory and channel.
#[derive(Clone, Debug)]
pub struct ProcessOptions {
    /// Where task stdout/stderr go ([`logger`]); by default straight into the sandbox files.
    pub logs: TaskLogs,
    /// How often the sandbox of a task with a `disk` limit is measured ([`disk`]).
    pub disk_watch_interval: Duration,
    /// How every process of a task is found ([`TaskTracking`]).
    pub tracking: TaskTracking,
}

impl Default for ProcessOptions {
    /// Unrotated logs; disk measured every 15 s (Mesos' `--container_disk_watch_interval`).
    fn default() -> Self {
        Self { logs: TaskLogs::Sandbox, disk_watch_interval: Duration::from_secs(15), tracking: TaskTracking::Auto }
    }
}

/// How [`ProcessRuntime`] finds every process of a task (see the [module docs](self)).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TaskTracking {
    /// The best the host offers: cgroup v2, else the cgroup v1 freezer, else the environment scan.
    #[default]
    Auto,
    /// Only the environment-marker scan of `/proc` (what a host without usable cgroups gets).
    Environ,
}

enum Isolation {
    /// The runtime's cgroup (`<own cgroup>/mesh-<hash>`), with `memory` and `cpu` enabled for children.
    Cgroup(PathBuf),
    Rlimit,
}

/// How every process of a task is found (and killed), beyond its process group.
enum Tracking {
    /// The task's cgroup v2 (the limits cgroup of [`Isolation::Cgroup`]).
    CgroupV2,
    /// A cgroup v1 freezer hierarchy: the runtime's cgroup there (`<own>/mesh-<key>`).
    Freezer(PathBuf),
    /// Only the [`MARKER_ENV`] scan of `/proc`.
    Environ,
}

struct Entry {
    shared: Arc<TaskShared>,
    watcher: AbortHandle,
}

/// What the watcher, `kill` and `kill_all` share about one task.
struct TaskShared {
    pgid: i32,
    cgroup: Option<PathBuf>,
    /// The task's cgroup in the v1 freezer hierarchy.
    freezer: Option<PathBuf>,
    mem: f64,
    /// The task's own grace period (`kill_all` gives each task its own).
    grace: Duration,
    /// Set once `kill` was asked for.
    killed: AtomicBool,
    /// Becomes true once the task has ended and its `Exited` event was sent.
    done: watch::Sender<bool>,
    /// Set when the runtime killed the task for exceeding a limit: the `Exited` message, and
    /// the end counts as a failure, not as a kill that was asked for.
    limit_exceeded: Mutex<Option<String>>,
    /// The task's logger processes (none for an adopted task).
    loggers: Loggers,
}

/// `task.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct TaskRecord {
    task_id: TaskId,
    pid: i32,
    pgid: i32,
    /// Field 22 of `/proc/<pid>/stat` (clock ticks since boot), the pid-reuse guard.
    start_time: u64,
    labels: BTreeMap<String, String>,
    ports: Vec<u16>,
    grace_ms: u64,
    #[serde(default)]
    mem: f64,
    #[serde(default)]
    disk: f64,
    #[serde(default)]
    cgroup: Option<PathBuf>,
    /// The task's v1 freezer cgroup.
    #[serde(default)]
    freezer: Option<PathBuf>,
    launched_at: Millis,
    /// True in the record written before the spawn (no pid yet); a restart that finds it kills
    /// whatever the task started instead of adopting it.
    #[serde(default)]
    launching: bool,
}

impl ProcessRuntime {
    /// A runtime keeping its sandboxes under `work_dir` (created if missing) and reporting on
    /// `events`. Probes the host's isolation (cgroup v2 or rlimits) once.
    pub fn new(work_dir: PathBuf, events: mpsc::Sender<RuntimeEvent>) -> Result<Self, RuntimeError> {
        Self::with_options(work_dir, events, ProcessOptions::default())
    }

    /// Like [`new`](Self::new), with a choice of how task processes are tracked.
    pub fn with_tracking(
        work_dir: PathBuf,
        events: mpsc::Sender<RuntimeEvent>,
        tracking: TaskTracking,
    ) -> Result<Self, RuntimeError> {
        Self::with_options(work_dir, events, ProcessOptions { tracking, ..ProcessOptions::default() })
    }

    /// [`ProcessRuntime::new`] with [`ProcessOptions`].
    pub fn with_options(
        work_dir: PathBuf,
        events: mpsc::Sender<RuntimeEvent>,
        options: ProcessOptions,
    ) -> Result<Self, RuntimeError> {
        fs::create_dir_all(&work_dir)?;
        let work_dir = fs::canonicalize(&work_dir)?;
        let isolation = match probe_cgroup(&work_dir) {
            Ok(dir) => Isolation::Cgroup(dir),
            Err(why) => {
                tracing::info!("process runtime: cgroup v2 not usable ({why}); using rlimits");
                Isolation::Rlimit
            }
        };
        let key = format!("{:016x}", fnv1a(work_dir.as_os_str().as_encoded_bytes()));
        let tracking = match (&isolation, options.tracking) {
            (_, TaskTracking::Environ) => Tracking::Environ,
            (Isolation::Cgroup(_), TaskTracking::Auto) => Tracking::CgroupV2,
            (Isolation::Rlimit, TaskTracking::Auto) => match probe_freezer(&key) {
                Ok(dir) => Tracking::Freezer(dir),
                Err(why) => {
                    tracing::info!("process runtime: no cgroup v1 freezer ({why}); tracking tasks by environment");
                    Tracking::Environ
                }
            },
        };
        Ok(Self {
            inner: Arc::new(Inner {
                work_dir,
                events,
                isolation,
                tracking,
                sweeper: Arc::new(MarkerSweeper::new(key.clone())),
                key,
                tasks: Mutex::new(HashMap::new()),
                launching: Mutex::new(HashSet::new()),
                options,
                #[cfg(test)]
                halt_after_spawn: AtomicBool::new(false),
            }),
        })
    }

    /// How limits are enforced on this host: `"cgroup-v2"` or `"rlimit"`.
    pub fn isolation(&self) -> &'static str {
        match self.inner.isolation {
            Isolation::Cgroup(_) => "cgroup-v2",
            Isolation::Rlimit => "rlimit",
        }
    }

    /// The (canonical) directory holding the sandboxes.
    pub fn work_dir(&self) -> &Path {
        &self.inner.work_dir
    }

    /// How the processes of a task are found: `"cgroup-v2"`, `"cgroup-v1-freezer"` or `"environ"`.
    pub fn tracking(&self) -> &'static str {
        match self.inner.tracking {
            Tracking::CgroupV2 => "cgroup-v2",
            Tracking::Freezer(_) => "cgroup-v1-freezer",
            Tracking::Environ => "environ",
        }
    }

    /// The [`MARKER_ENV`] value the processes of `task_id` carry.
    pub fn marker(&self, task_id: &TaskId) -> String {
        self.inner.marker(task_id)
    }

    /// The sandbox directory of a task (whether or not it exists).
    pub fn sandbox(&self, task_id: &TaskId) -> PathBuf {
        self.inner.sandbox(task_id)
    }

    /// Starts removing the sandboxes of ended tasks under `policy` ([`gc`]) until the returned
    /// handle is aborted (once this runtime is dropped it removes nothing more). A sandbox counts as ended when
    /// its task is not watched by this runtime and it holds no `task.json` (so a task that a
    /// later runtime may still adopt keeps it); it has been left alone since the directory last
    /// changed (the rename to `task.done.json` changes it). Must be called inside a tokio runtime.
    pub fn spawn_gc(&self, policy: GcPolicy) -> AbortHandle {
        let inner: Weak<Inner> = Arc::downgrade(&self.inner);
        gc::spawn(self.inner.work_dir.clone(), policy, move |dir: &Path| -> Option<SystemTime> {
            let inner = inner.upgrade()?;
            let id = TaskId::from(dir.file_name()?.to_str()?);
            if inner.lock().contains_key(&id) || dir.join(TASK_FILE).exists() {
                return None;
            }
            gc::dir_changed(dir)
        })
    }
}

impl Drop for ProcessRuntime {
    /// Stops the watchers; the tasks keep running so that a later runtime can recover them.
    fn drop(&mut self) {
        for entry in self.inner.lock().values() {
            entry.watcher.abort();
        }
        // The runtime's own cgroup goes once no task cgroup is left in it (rmdir fails otherwise).
        if let Tracking::Freezer(root) = &self.inner.tracking {
            let _ = fs::remove_dir(root);
        }
    }
}

#[async_trait::async_trait]
impl Runtime for ProcessRuntime {
    fn name(&self) -> &'static str {
        "process"
    }

    async fn launch(&self, spec: TaskSpec) -> Result<(), RuntimeError> {
        if spec.container.is_some() {
            return Err(RuntimeError::Launch {
                task: spec.task_id,
                message: "the process runtime cannot run container tasks".into(),
            });
        }
        if self.inner.lock().contains_key(&spec.task_id) {
            return Err(RuntimeError::Launch {
                task: spec.task_id,
                message: "a task with this id is already running".into(),
            });
        }
        match self.inner.start(&spec) {
            Ok(()) => Ok(()),
            Err(message) => {
                let _ = self
                    .inner
                    .events
                    .send(RuntimeEvent::Failed {
                        task_id: spec.task_id.clone(),
                        message: message.clone(),
                        at: now_millis(),
                    })
                    .await;
                Err(RuntimeError::Launch { task: spec.task_id, message })
            }
        }
    }

    async fn kill(&self, task_id: &TaskId, grace: Duration) -> Result<(), RuntimeError> {
        let Some(shared) = self.inner.lock().get(task_id).map(|e| e.shared.clone()) else {
            return Ok(());
        };
        start_kill(shared, grace);
        Ok(())
    }

    async fn recover(&self) -> Result<Vec<RecoveredTask>, RuntimeError> {
        let mut found = Vec::new();
        // What is left of tasks that are not adopted; destroyed off the async threads below.
        let mut doomed: Vec<Remains> = Vec::new();
        for dirent in fs::read_dir(&self.inner.work_dir)? {
            let dir = dirent?.path();
            // A task being launched meanwhile may not have a whole record yet: it is not ours.
            if dir.file_name().is_some_and(|n| self.inner.wanted(&TaskId::from(n.to_string_lossy().as_ref()))) {
                continue;
            }
            let file = dir.join(TASK_FILE);
            let text = match fs::read_to_string(&file) {
                Ok(t) => t,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) if e.kind() == io::ErrorKind::NotADirectory => continue,
                Err(e) => return Err(e.into()),
            };
            let record: TaskRecord = match serde_json::from_str(&text) {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!("recover: {} is unreadable ({e}); not adopting", file.display());
                    let _ = fs::rename(&file, dir.join(INVALID_FILE));
                    continue;
                }
            };
            if self.inner.lock().contains_key(&record.task_id) {
                continue;
            }
            if record.launching {
                // The agent stopped between writing the intent and completing the record: the
                // process may run, but nobody knows it. Kill everything it started.
                tracing::info!("recover: task {} was being launched; killing what it started", record.task_id);
                doomed.push(self.inner.remains(&record.task_id, None, record.cgroup, record.freezer));
                mark_done(&dir);
                continue;
            }
            let adoptable = record.pid > 1
                && record.pgid == record.pid
                && dir.file_name().is_some_and(|n| n == record.task_id.as_str())
                && is_alive(record.pid, record.start_time);
            if !adoptable {
                tracing::info!("recover: task {} is gone; not adopting", record.task_id);
                // Its group leader is gone (the pid may be someone else's now: not signalled),
                // but processes that left the group may still run.
                doomed.push(self.inner.remains(&record.task_id, None, record.cgroup, record.freezer));
                mark_done(&dir);
                continue;
            }
            let shared = Arc::new(TaskShared {
                pgid: record.pgid,
                cgroup: record.cgroup.clone(),
                freezer: record.freezer.clone(),
                mem: record.mem,
                grace: Duration::from_millis(record.grace_ms),
                killed: AtomicBool::new(false),
                done: watch::channel(false).0,
                limit_exceeded: Mutex::new(None),
                loggers: Loggers::default(),
            });
            self.inner.watch_disk(dir.clone(), record.disk, &shared);
            {
                let mut tasks = self.inner.lock();
                let watcher = tokio::spawn(watch_adopted(
                    self.inner.clone(),
                    record.task_id.clone(),
                    shared.clone(),
                    record.pid,
                    record.start_time,
                ))
                .abort_handle();
                tasks.insert(record.task_id.clone(), Entry { shared, watcher });
            }
            tracing::info!("recover: adopted task {} (pid {})", record.task_id, record.pid);
            found.push(RecoveredTask { task_id: record.task_id, labels: record.labels, ports: record.ports });
        }
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            for r in &doomed {
                r.destroy();
                r.remove_cgroups();
            }
            inner.sweep();
        })
        .await
        .map_err(|e| RuntimeError::Io(io::Error::other(e)))?;
        Ok(found)
    }

    fn running(&self) -> Vec<TaskId> {
        let mut ids: Vec<TaskId> = self.inner.lock().keys().cloned().collect();
        ids.sort();
        ids
    }

    fn is_running(&self, task_id: &TaskId) -> bool {
        self.inner.lock().contains_key(task_id)
    }

    async fn kill_all(&self, grace: Duration) {
        let all: Vec<Arc<TaskShared>> = self.inner.lock().values().map(|e| e.shared.clone()).collect();
        let mut waits = Vec::with_capacity(all.len());
        // Every task gets its own grace (at most `grace`), all at once: the wait is the longest
        // grace, not their sum.
        let mut longest = Duration::ZERO;
        for shared in all {
            waits.push(shared.done.subscribe());
            let own = shared.grace.min(grace);
            longest = longest.max(own);
            start_kill(shared, own);
        }
        let grace = longest;
        let wait_all = async {
            for mut done in waits {
                let _ = done.wait_for(|d| *d).await;
            }
        };
        if tokio::time::timeout(grace + KILL_ALL_MARGIN, wait_all).await.is_err() {
            tracing::warn!("kill_all: not every task ended within {:?}", grace + KILL_ALL_MARGIN);
        }
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, HashMap<TaskId, Entry>> {
        self.tasks.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn launching(&self) -> MutexGuard<'_, HashSet<TaskId>> {
        self.launching.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn sandbox(&self, task_id: &TaskId) -> PathBuf {
        self.work_dir.join(task_id.as_str())
    }

    fn marker(&self, task_id: &TaskId) -> String {
        format!("{}/{}", self.key, task_id)
    }

    /// Whether `recover` must leave the processes of a task alone: watched or being launched.
    fn wanted(&self, task_id: &TaskId) -> bool {
        self.lock().contains_key(task_id) || self.launching().contains(task_id)
    }

    fn remains(
        &self,
        task_id: &TaskId,
        pgid: Option<i32>,
        cgroup: Option<PathBuf>,
        freezer: Option<PathBuf>,
    ) -> Remains {
        Remains { task_id: task_id.clone(), pgid, cgroup, freezer, sweeper: self.sweeper.clone() }
    }

    /// Kills every task process of this runtime that belongs to no watched or launching task:
    /// whatever is in the runtime's task cgroups, and whatever carries its marker (blocking).
    fn sweep(&self) {
        let root = match (&self.tracking, &self.isolation) {
            (Tracking::CgroupV2, Isolation::Cgroup(root)) | (Tracking::Freezer(root), _) => Some(root),
            _ => None,
        };
        if let Some(root) = root {
            let dirs = fs::read_dir(root).into_iter().flatten().flatten().filter(|d| d.path().is_dir());
            for d in dirs {
                let task_id = TaskId::from(d.file_name().to_string_lossy().as_ref());
                if self.wanted(&task_id) {
                    continue;
                }
                let (cgroup, freezer) = match self.tracking {
                    Tracking::Freezer(_) => (None, Some(d.path())),
                    _ => (Some(d.path()), None),
                };
                let r = self.remains(&task_id, None, cgroup, freezer);
                if r.count() > 0 {
                    tracing::warn!("recover: killing the processes of unknown task {task_id} (its cgroup)");
                }
                r.destroy();
                r.remove_cgroups();
            }
        }
        let (strays, _) = kill_marked(&self.key, |id| !self.wanted(&TaskId::from(id)));
        if strays > 0 {
            tracing::warn!("recover: killed {strays} task process(es) that no watched task owns");
        }
    }

    /// Spawns the task and its watcher. The error is the message for `Failed`.
    ///
    /// Order (see the module docs): intent record, spawn, complete record, watcher.
    fn start(self: &Arc<Self>, spec: &TaskSpec) -> Result<(), String> {
        let id = spec.task_id.as_str();
        if id.is_empty() || id == "." || id == ".." || id.contains('/') || id.contains('\0') {
            return Err(format!("task id {id:?} cannot name a sandbox directory"));
        }
        self.launching().insert(spec.task_id.clone());
        let _launching = LaunchingGuard { inner: self, task_id: &spec.task_id };
        let sandbox = self.sandbox(&spec.task_id);
        fs::create_dir_all(&sandbox).map_err(|e| format!("cannot create sandbox {}: {e}", sandbox.display()))?;
        let (stdout, stderr, loggers) = logger::open(&self.options.logs, &sandbox)?;

        // The PATH the child gets: the spec's, else the agent's.
        let path = spec.env.get("PATH").map(OsString::from).or_else(|| std::env::var_os("PATH"));
        let path = path.unwrap_or_else(|| DEFAULT_PATH.into());
        let marker = self.marker(&spec.task_id);
        // Everything but the program and its arguments.
        let configure = |cmd: &mut tokio::process::Command, stdout: Stdio, stderr: Stdio| {
            cmd.env_clear();
            cmd.env("PATH", &path);
            for key in ["HOME", "LANG"] {
                if let Some(v) = std::env::var_os(key) {
                    cmd.env(key, v);
                }
            }
            cmd.envs(&spec.env)
                .env("MESOS_SANDBOX", &sandbox)
                .env(MARKER_ENV, &marker)
                .current_dir(&sandbox)
                .stdin(Stdio::null())
                .stdout(stdout)
                .stderr(stderr)
                .process_group(0)
                .kill_on_drop(false);
        };
        let (cgroup, data_limit) = match &self.isolation {
            Isolation::Cgroup(root) => (Some(prepare_task_cgroup(root, spec)?), None),
            Isolation::Rlimit if spec.mem > 0.0 => (None, Some(((spec.mem + RLIMIT_SLACK_MIB) * MIB) as u64)),
            Isolation::Rlimit => (None, None),
        };
        let freezer = match &self.tracking {
            Tracking::Freezer(root) => match prepare_freezer(root, &spec.task_id) {
                Ok(f) => Some(f),
                Err(e) => {
                    self.remains(&spec.task_id, None, cgroup, None).remove_cgroups();
                    return Err(e);
                }
            },
            _ => None,
        };
        let mut record = TaskRecord {
            task_id: spec.task_id.clone(),
            pid: 0,
            pgid: 0,
            start_time: 0,
            labels: spec.labels.clone(),
            ports: spec.ports.clone(),
            grace_ms: spec.kill_grace.as_millis() as u64,
            mem: spec.mem,
            disk: spec.disk,
            cgroup: cgroup.clone(),
            freezer: freezer.clone(),
            launched_at: now_millis(),
            launching: true,
        };
        let cleanup =
            |inner: &Inner| inner.remains(&spec.task_id, None, cgroup.clone(), freezer.clone()).remove_cgroups();
        // The intent: no process of this task can exist without a record that a restart finds.
        let intent = match write_intent(&sandbox, &record) {
            Ok(f) => f,
            Err(e) => {
                cleanup(self);
                return Err(format!("cannot write {TASK_FILE} in {}: {e}", sandbox.display()));
            }
        };
        // Joining the task's cgroups and setting its data limit happen in the task's first
        // process before anything of the task runs: shell builtins ahead of the command (see
        // `join_prelude`). With no hook to run in a forked child, the spawn is a `posix_spawn`
        // (vfork): forking this process copied its page tables, a cost that grew with its size.
        let prelude = join_prelude([cgroup.as_deref(), freezer.as_deref()], data_limit);
        // A simple shell command runs without the shell when nothing has to happen first: one
        // process instead of `sh` and the command (dash forks for the last command too), as
        // `bash -c` does; with a prelude the shell `exec`s it, one process all the same.
        let direct = match (&spec.command, &prelude) {
            (Command::Shell(s), None) => direct_exec(s, &path, &spec.env),
            _ => None,
        };
        let built = (|| -> Result<_, String> {
            // The shell that runs `Command::Shell` when the direct exec fails, and its stdio.
            let mut fallback = None;
            let (cmd, program) = match (&spec.command, direct, &prelude) {
                (Command::Shell(s), Some((file, words)), _) => {
                    let dup = |fd: &OwnedFd| fd.try_clone().map_err(|e| format!("cannot duplicate a log fd: {e}"));
                    let mut c = tokio::process::Command::new(file);
                    c.arg0(words[0]).args(&words[1..]);
                    configure(&mut c, dup(&stdout)?.into(), dup(&stderr)?.into());
                    // What dash adds to the environment it passes on (the sandbox is a physical path).
                    c.env("PWD", &sandbox);
                    fallback = Some((s, stdout, stderr));
                    (c, words[0].to_owned())
                }
                (Command::Shell(s), None, p) => {
                    let script = match p {
                        None => s.clone(),
                        Some(p) if simple_command(s).is_some() => format!("{p}exec {s}"),
                        Some(p) => format!("{p}{s}"),
                    };
                    let mut c = shell_command(&script);
                    configure(&mut c, stdout.into(), stderr.into());
                    (c, "/bin/sh".to_owned())
                }
                (Command::Args(argv), _, Some(p)) => {
                    let first = argv.first().ok_or("empty argument list")?;
                    // What the spawn reported before the shell stood in front (the shell would
                    // only say it with exit status 127).
                    if !program_found(first, &path, &sandbox) {
                        return Err(format!("cannot run {first}: not found or not executable"));
                    }
                    // `sh -c '<prelude>exec "$@"' sh argv...`: the arguments reach exec untouched.
                    let mut c = shell_command(&format!("{p}exec \"$@\""));
                    c.arg("sh").args(argv);
                    configure(&mut c, stdout.into(), stderr.into());
                    (c, "/bin/sh".to_owned())
                }
                (Command::Args(argv), _, None) => {
                    let (first, rest) = argv.split_first().ok_or("empty argument list")?;
                    let mut c = tokio::process::Command::new(first);
                    c.args(rest);
                    configure(&mut c, stdout.into(), stderr.into());
                    (c, first.clone())
                }
            };
            Ok((cmd, program, fallback))
        })();
        let (mut cmd, mut program, fallback) = match built {
            Ok(b) => b,
            Err(e) => {
                cleanup(self);
                mark_done(&sandbox);
                return Err(e);
            }
        };
        let open_procs = |cg: &Option<PathBuf>| -> Result<Option<File>, String> {
            cg.as_ref()
                .map(|cg| {
                    OpenOptions::new()
                        .write(true)
                        .open(cg.join("cgroup.procs"))
                        .map_err(|e| format!("cannot open {}/cgroup.procs: {e}", cg.display()))
                })
                .transpose()
        };
        let procs = match (open_procs(&cgroup), open_procs(&freezer)) {
            (Ok(a), Ok(b)) => [a, b],
            (Err(e), _) | (_, Err(e)) => {
                cleanup(self);
                mark_done(&sandbox);
                return Err(e);
            }
        };
        // Opened only to fail the launch with a clear message when the cgroups cannot be joined.
        drop(procs);
        let mut spawned = cmd.spawn();
        if let (Err(e), Some((s, stdout, stderr))) = (&spawned, fallback) {
            // The shell reports what went wrong (not found: 127, not executable: 126) or runs
            // what the kernel would not (a script without `#!`). No prelude here (see above).
            tracing::debug!("task {}: cannot exec {program} directly ({e}); using /bin/sh", spec.task_id);
            let mut c = shell_command(s);
            configure(&mut c, stdout.into(), stderr.into());
            spawned = c.spawn();
            program = "/bin/sh".to_owned();
        }
        let child = match spawned {
            Ok(c) => c,
            Err(e) => {
                cleanup(self);
                mark_done(&sandbox);
                return Err(format!("cannot run {program}: {e}"));
            }
        };
        #[cfg(test)]
        if self.halt_after_spawn.load(Ordering::SeqCst) {
            return Ok(());
        }
        // Not reaped until the watcher waits, so the pid is ours and /proc/<pid> exists.
        let pid = child.id().map(|p| p as i32).ok_or("the spawned process has no pid")?;
        record.pid = pid;
        record.pgid = pid;
        record.start_time = proc_stat(pid).map(|s| s.start_time).unwrap_or(0);
        record.launching = false;
        if let Err(e) = complete_record(intent, &sandbox, &record) {
            // The task runs and is watched; a restart finds the intent and kills it.
            tracing::warn!("task {}: cannot complete {TASK_FILE}: {e}", spec.task_id);
        }
        let shared = Arc::new(TaskShared {
            pgid: pid,
            cgroup,
            freezer,
            mem: spec.mem,
            grace: spec.kill_grace,
            killed: AtomicBool::new(false),
            done: watch::channel(false).0,
            limit_exceeded: Mutex::new(None),
            loggers,
        });
        self.watch_disk(sandbox, spec.disk, &shared);
        let mut tasks = self.lock();
        let watcher =
            tokio::spawn(watch_child(self.clone(), spec.task_id.clone(), shared.clone(), child)).abort_handle();
        tasks.insert(spec.task_id.clone(), Entry { shared, watcher });
        Ok(())
    }

    /// With a `disk` limit: measures the sandbox until the task ends, and kills the task (as a
    /// failure) once it is above the limit.
    fn watch_disk(&self, sandbox: PathBuf, limit_mib: f64, shared: &Arc<TaskShared>) {
        if limit_mib <= 0.0 {
            return;
        }
        let (shared, interval) = (shared.clone(), self.options.disk_watch_interval);
        tokio::spawn(async move {
            if let Some(message) = disk::watch(sandbox, limit_mib, interval, shared.done.subscribe()).await {
                tracing::info!("{message}; killing the task");
                *shared.limit_exceeded.lock().unwrap_or_else(|e| e.into_inner()) = Some(message);
                kill_now(&shared);
            }
        });
    }

    /// Common end of a task: kill whatever is left of it (group, cgroups, marker), mark
    /// `task.json` done, forget the task, send `Exited`, then wake `kill_all`.
    async fn finish(&self, task_id: TaskId, shared: Arc<TaskShared>, exit: Exit, message: String) {
        let mut message = message;
        if let Some(cg) = &shared.cgroup
            && cgroup_oom_kills(cg) > 0
        {
            message = format!("memory limit of {} MiB exceeded (OOM killed); {message}", shared.mem);
        }
        // Whatever the leader left behind goes with it, as when Mesos destroys a container.
        let remains = self.remains(&task_id, Some(shared.pgid), shared.cgroup.clone(), shared.freezer.clone());
        let _ = tokio::task::spawn_blocking(move || {
            remains.destroy();
            remains.remove_cgroups();
        })
        .await;
        // The last output is written before anyone is told the task has ended.
        shared.loggers.drained(LOG_DRAIN).await;
        let limit = shared.limit_exceeded.lock().unwrap_or_else(|e| e.into_inner()).take();
        let killed = limit.is_none() && shared.killed.load(Ordering::SeqCst);
        if let Some(limit) = limit {
            message = format!("{limit}; {message}");
        }
        mark_done(&self.sandbox(&task_id));
        {
            let mut tasks = self.lock();
            if tasks.get(&task_id).is_some_and(|e| Arc::ptr_eq(&e.shared, &shared)) {
                tasks.remove(&task_id);
            }
        }
        let _ = self.events.send(RuntimeEvent::Exited { task_id, exit, killed, message, at: now_millis() }).await;
        shared.done.send_replace(true);
    }
}

/// Removes a task id from `launching` when `start` is over (the task is then in `tasks`, or failed).
struct LaunchingGuard<'a> {
    inner: &'a Inner,
    task_id: &'a TaskId,
}

impl Drop for LaunchingGuard<'_> {
    fn drop(&mut self) {
        self.inner.launching().remove(self.task_id);
    }
}

/// Everything that may still hold processes of a task: its process group, its cgroups and its
/// marker. The methods block (they poll `/proc` and cgroup files); call them off the async threads.
struct Remains {
    task_id: TaskId,
    /// Signalled only when it is known to still be the task's group (not after a restart).
    pgid: Option<i32>,
    cgroup: Option<PathBuf>,
    freezer: Option<PathBuf>,
    sweeper: Arc<MarkerSweeper>,
}

impl Remains {
    /// How many processes of the task are known to be left.
    fn count(&self) -> usize {
        let in_cgroups: usize =
            [&self.cgroup, &self.freezer].into_iter().flatten().map(|cg| cgroup_pids(cg).len()).sum();
        in_cgroups + marked_processes(&self.sweeper.key).iter().filter(|(_, id)| id == self.task_id.as_str()).count()
    }

    /// SIGKILLs every process of the task; true when none is left.
    fn destroy(&self) -> bool {
        if let Some(pgid) = self.pgid {
            let _ = signal_group(pgid, libc::SIGKILL);
        }
        let mut clean = true;
        if let Some(cg) = &self.cgroup {
            clean &= kill_cgroup_v2(cg);
        }
        if let Some(cg) = &self.freezer {
            clean &= kill_freezer(cg);
        }
        // Its last scan found none left, or it gave up: no second scan of /proc to tell.
        clean &= self.sweeper.sweep(self.task_id.as_str());
        if !clean {
            tracing::warn!("task {}: some of its processes survived {DESTROY_ROUNDS} kill rounds", self.task_id);
        }
        clean
    }

    /// Removes the task's cgroups (retrying while their last processes exit).
    fn remove_cgroups(&self) {
        for cg in [&self.cgroup, &self.freezer].into_iter().flatten() {
            let mut removed = false;
            for _ in 0..DESTROY_ROUNDS {
                match fs::remove_dir(cg) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => std::thread::sleep(DESTROY_PAUSE * 2),
                    _ => {
                        removed = true;
                        break;
                    }
                }
            }
            if !removed {
                tracing::warn!("cannot remove cgroup {}", cg.display());
            }
        }
    }
}

/// Watches a task this runtime spawned.
async fn watch_child(inner: Arc<Inner>, task_id: TaskId, shared: Arc<TaskShared>, mut child: tokio::process::Child) {
    let _ = inner.events.send(RuntimeEvent::Started { task_id: task_id.clone(), at: now_millis() }).await;
    let (exit, message) = match child.wait().await {
        Ok(status) => describe(status),
        Err(e) => (Exit::Unknown, format!("could not wait for the task: {e}")),
    };
    inner.finish(task_id, shared, exit, message).await;
}

/// Watches a task adopted by `recover`.
async fn watch_adopted(inner: Arc<Inner>, task_id: TaskId, shared: Arc<TaskShared>, pid: i32, start_time: u64) {
    wait_pid_exit(pid, start_time).await;
    let message = "ended (exit status unknown: the task was adopted after a restart)".to_owned();
    inner.finish(task_id, shared, Exit::Unknown, message).await;
}

/// SIGTERM now (SIGKILL when `grace` is zero), SIGKILL after `grace` unless the task has ended.
fn start_kill(shared: Arc<TaskShared>, grace: Duration) {
    if *shared.done.borrow() {
        return;
    }
    let first = !shared.killed.swap(true, Ordering::SeqCst);
    if grace.is_zero() {
        kill_now(&shared);
        return;
    }
    if first {
        let _ = signal_group(shared.pgid, libc::SIGTERM);
    }
    let mut done = shared.done.subscribe();
    tokio::spawn(async move {
        tokio::select! {
            _ = done.wait_for(|d| *d) => {}
            () = tokio::time::sleep(grace) => {
                if !*shared.done.borrow() {
                    kill_now(&shared);
                }
            }
        }
    });
}

fn kill_now(shared: &TaskShared) {
    let _ = signal_group(shared.pgid, libc::SIGKILL);
    if let Some(cg) = &shared.cgroup {
        let _ = fs::write(cg.join("cgroup.kill"), "1");
    }
}

/// Exit and message for a status of our own child.
fn describe(status: ExitStatus) -> (Exit, String) {
    if let Some(code) = status.code() {
        (Exit::Code(code), format!("exited with status {code}"))
    } else if let Some(sig) = status.signal() {
        let name = signal_name(sig).map(|n| format!(" ({n})")).unwrap_or_default();
        (Exit::Signal(sig), format!("killed by signal {sig}{name}"))
    } else {
        (Exit::Unknown, format!("ended with {status}"))
    }
}

fn signal_name(sig: i32) -> Option<&'static str> {
    Some(match sig {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGALRM => "SIGALRM",
        libc::SIGTERM => "SIGTERM",
        libc::SIGXCPU => "SIGXCPU",
        _ => return None,
    })
}

/// `/bin/sh -c <s>`.
fn shell_command(s: &str) -> tokio::process::Command {
    let mut c = tokio::process::Command::new("/bin/sh");
    c.arg("-c").arg(s);
    c
}

/// Names the shell itself runs (POSIX and dash builtins, reserved words, and bash's builtins
/// for a `/bin/sh` that is bash): a command starting with one always goes through the shell.
const SHELL_WORDS: &[&str] = &[
    ".",
    ":",
    "[",
    "alias",
    "bg",
    "break",
    "cd",
    "chdir",
    "command",
    "continue",
    "echo",
    "eval",
    "exec",
    "exit",
    "export",
    "false",
    "fg",
    "getopts",
    "hash",
    "jobs",
    "kill",
    "local",
    "printf",
    "pwd",
    "read",
    "readonly",
    "return",
    "set",
    "shift",
    "test",
    "times",
    "trap",
    "true",
    "type",
    "ulimit",
    "umask",
    "unalias",
    "unset",
    "wait",
    "if",
    "then",
    "else",
    "elif",
    "fi",
    "case",
    "esac",
    "for",
    "while",
    "until",
    "do",
    "done",
    "in",
    "function",
    "select",
    "time",
    "source",
    "let",
    "declare",
    "typeset",
    "builtin",
    "enable",
    "caller",
    "compgen",
    "complete",
    "compopt",
    "dirs",
    "disown",
    "fc",
    "help",
    "history",
    "logout",
    "mapfile",
    "popd",
    "pushd",
    "readarray",
    "shopt",
    "suspend",
    "bind",
    "coproc",
    "login",
    "newgrp",
];

/// The words of a shell command that means the same with or without a shell: words of
/// characters without shell meaning (letters, digits, `-_./,:+%@=`) separated by spaces or
/// tabs, no `=` in the first word (an assignment), and a first word the shell does not run
/// itself ([`SHELL_WORDS`]). `None` for everything else (quotes, `$`, redirects, pipes, lists,
/// globs, `~`, comments, newlines, ...), which the shell must run.
fn simple_command(s: &str) -> Option<Vec<&str>> {
    let plain = |c: char| c.is_ascii_alphanumeric() || "-_./,:+%@=".contains(c);
    let words: Vec<&str> = s.split([' ', '\t']).filter(|w| !w.is_empty()).collect();
    let first = *words.first()?;
    let ok = words.iter().all(|w| w.chars().all(plain)) && !first.contains('=') && !SHELL_WORDS.contains(&first);
    ok.then_some(words)
}

/// The executable a `Command::Shell` can be run as directly (see [`simple_command`]), and its
/// words: the first word is an absolute path, or a name without `/` found on `path` (the
/// child's `PATH`) the way the shell searches it (the first executable regular file). `None`
/// when the shell must run it: not simple, not found, a relative or empty `PATH` entry on the
/// way (the shell would look in the sandbox), or a `PWD` in `env` (the shell may replace it).
fn direct_exec<'a>(s: &'a str, path: &OsStr, env: &BTreeMap<String, String>) -> Option<(PathBuf, Vec<&'a str>)> {
    let words = simple_command(s)?;
    if env.contains_key("PWD") {
        return None;
    }
    let first = words[0];
    if first.starts_with('/') {
        return executable(Path::new(first)).then(|| (PathBuf::from(first), words));
    }
    if first.contains('/') {
        return None;
    }
    for dir in std::env::split_paths(path) {
        if !dir.is_absolute() {
            return None;
        }
        let file = dir.join(first);
        if executable(&file) {
            return Some((file, words));
        }
    }
    None
}

/// Whether `file` is a regular file this process may execute.
fn executable(file: &Path) -> bool {
    file.metadata().is_ok_and(|m| m.is_file())
        && rustix::fs::accessat(rustix::fs::CWD, file, rustix::fs::Access::EXEC_OK, rustix::fs::AtFlags::EACCESS)
            .is_ok()
}

/// Whether `program` (a `Command::Args` `argv[0]`) can be executed by the child: a path (relative
/// ones from the sandbox), or a name found on `path` as `execvp` searches it.
fn program_found(program: &str, path: &OsStr, sandbox: &Path) -> bool {
    if program.contains('/') {
        return executable(&sandbox.join(program));
    }
    std::env::split_paths(path).any(|dir| executable(&sandbox.join(dir).join(program)))
}

fn write_record(sandbox: &Path, record: &TaskRecord) -> io::Result<()> {
    let tmp = sandbox.join("task.json.tmp");
    fs::write(&tmp, serde_json::to_vec_pretty(record).map_err(io::Error::other)?)?;
    fs::rename(tmp, sandbox.join(TASK_FILE))
}

/// Writes the intent record of a launch into a new `task.json` and keeps it open for
/// [`complete_record`], which writes over it in place: one new inode per launch, no temporary
/// file and no rename (see "Crash safety" in the module docs). Where a `task.json` is already
/// there (a task id launched again before a recovery), both go through [`write_record`] (`None`).
fn write_intent(sandbox: &Path, record: &TaskRecord) -> io::Result<Option<(File, usize)>> {
    let file = sandbox.join(TASK_FILE);
    let mut f = match OpenOptions::new().write(true).create_new(true).open(&file) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return write_record(sandbox, record).map(|()| None),
        Err(e) => return Err(e),
    };
    let bytes = serde_json::to_vec_pretty(record).map_err(io::Error::other)?;
    if let Err(e) = f.write_all(&bytes) {
        // No process runs yet: a half-written intent is just removed.
        let _ = fs::remove_file(&file);
        return Err(e);
    }
    Ok(Some((f, bytes.len())))
}

/// Writes the complete record over the intent that [`write_intent`] left open, in one
/// `pwrite` at offset 0 (padded with spaces, which JSON ignores, should it be shorter, so
/// nothing of the intent is left after it).
fn complete_record(intent: Option<(File, usize)>, sandbox: &Path, record: &TaskRecord) -> io::Result<()> {
    let Some((file, intent_len)) = intent else {
        return write_record(sandbox, record);
    };
    let mut bytes = serde_json::to_vec_pretty(record).map_err(io::Error::other)?;
    if bytes.len() < intent_len {
        bytes.resize(intent_len, b' ');
    }
    file.write_all_at(&bytes, 0)
}

/// Renames `task.json` to `task.done.json` so it is never adopted again.
fn mark_done(sandbox: &Path) {
    match fs::rename(sandbox.join(TASK_FILE), sandbox.join(DONE_FILE)) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            tracing::warn!("cannot mark {} done: {e}", sandbox.display());
        }
        _ => {}
    }
}

/// The fields of `/proc/<pid>/stat` this runtime needs.
#[derive(Debug)]
struct ProcStat {
    /// Field 3.
    state: char,
    /// Field 22: start time in clock ticks since boot.
    start_time: u64,
}

fn proc_stat(pid: i32) -> Option<ProcStat> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces and parentheses.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Some(ProcStat { state: fields.first()?.chars().next()?, start_time: fields.get(22 - 3)?.parse().ok()? })
}

/// Whether `pid` is a live (not zombie) process that started at `start_time`.
fn is_alive(pid: i32, start_time: u64) -> bool {
    proc_stat(pid).is_some_and(|s| s.start_time == start_time && !matches!(s.state, 'Z' | 'X' | 'x'))
}

/// Waits until the process `pid` that started at `start_time` has ended.
async fn wait_pid_exit(pid: i32, start_time: u64) {
    if let Ok(afd) = async_pidfd(pid) {
        // The pidfd pins the process: if it is still the one we mean now, it is the one we watch.
        if !is_alive(pid, start_time) {
            return;
        }
        // A pidfd becomes readable once the process has exited, and then stays readable.
        if afd.readable().await.is_ok() {
            return;
        }
    }
    let mut tick = tokio::time::interval(PROC_POLL);
    while is_alive(pid, start_time) {
        tick.tick().await;
    }
}

// ---------------------------------------------------------------------------------------------
// cgroup v2
// ---------------------------------------------------------------------------------------------

/// Finds or sets up the runtime's cgroup; the error says why cgroup v2 is not usable.
fn probe_cgroup(work_dir: &Path) -> Result<PathBuf, String> {
    let root = Path::new(CGROUP_ROOT);
    let available = fs::read_to_string(root.join("cgroup.controllers"))
        .map_err(|e| format!("{CGROUP_ROOT} is not a cgroup v2 mount: {e}"))?;
    let has = |list: &str, c: &str| list.split_whitespace().any(|w| w == c);
    if !(has(&available, "memory") && has(&available, "cpu")) {
        return Err(format!("cgroup v2 controllers are {available:?}, memory and cpu needed"));
    }
    let own = fs::read_to_string("/proc/self/cgroup").map_err(|e| e.to_string())?;
    let own = own.lines().find_map(|l| l.strip_prefix("0::")).ok_or("no cgroup v2 entry in /proc/self/cgroup")?;
    let parent = root.join(own.trim().trim_start_matches('/'));
    let enable = |dir: &Path| -> Result<(), String> {
        let ctl = dir.join("cgroup.subtree_control");
        let current = fs::read_to_string(&ctl).map_err(|e| format!("{}: {e}", ctl.display()))?;
        if has(&current, "memory") && has(&current, "cpu") {
            return Ok(());
        }
        fs::write(&ctl, "+memory +cpu").map_err(|e| format!("enabling memory, cpu in {}: {e}", ctl.display()))
    };
    enable(&parent)?;
    let mine = parent.join(format!("mesh-{:016x}", fnv1a(work_dir.as_os_str().as_encoded_bytes())));
    match fs::create_dir(&mine) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => {
            return Err(format!("creating {}: {e}", mine.display()));
        }
        _ => {}
    }
    if let Err(e) = enable(&mine) {
        let _ = fs::remove_dir(&mine);
        return Err(e);
    }
    Ok(mine)
}

/// Creates a task's cgroup and writes its limits.
fn prepare_task_cgroup(root: &Path, spec: &TaskSpec) -> Result<PathBuf, String> {
    let cg = root.join(spec.task_id.as_str());
    match fs::create_dir(&cg) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => {
            return Err(format!("cannot create cgroup {}: {e}", cg.display()));
        }
        _ => {}
    }
    let write = |file: &str, value: String| {
        fs::write(cg.join(file), &value).map_err(|e| format!("cannot write {value:?} to {}/{file}: {e}", cg.display()))
    };
    let result = (|| {
        if spec.mem > 0.0 {
            write("memory.max", ((spec.mem * MIB) as u64).to_string())?;
            // Optional knobs: absent without swap accounting / on old kernels.
            let _ = write("memory.swap.max", "0".into());
            let _ = write("memory.oom.group", "1".into());
        }
        if spec.cpus > 0.0 {
            let quota = ((spec.cpus * 100_000.0).round() as u64).max(1000);
            write("cpu.max", format!("{quota} 100000"))?;
        }
        Ok(())
    })();
    match result {
        Ok(()) => Ok(cg),
        Err(e) => {
            let _ = fs::remove_dir(&cg);
            Err(e)
        }
    }
}

/// The `oom_kill` count of a cgroup's `memory.events` (0 when unreadable).
fn cgroup_oom_kills(cg: &Path) -> u64 {
    fs::read_to_string(cg.join("memory.events"))
        .ok()
        .and_then(|t| t.lines().find_map(|l| l.strip_prefix("oom_kill ")).and_then(|n| n.trim().parse().ok()))
        .unwrap_or(0)
}

/// FNV-1a, a stable hash (unlike std's) to name the runtime's cgroup after its work dir.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
}

// ---------------------------------------------------------------------------------------------
// Finding and killing every process of a task
// ---------------------------------------------------------------------------------------------

/// The pids listed in a cgroup's `cgroup.procs` (none when it is unreadable or gone).
fn cgroup_pids(cg: &Path) -> Vec<i32> {
    fs::read_to_string(cg.join("cgroup.procs"))
        .map(|t| t.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}

/// Kills everything in a cgroup v2: `cgroup.kill` (Linux 5.14+), else SIGKILL to every listed
/// pid, until it is empty; true when it is.
fn kill_cgroup_v2(cg: &Path) -> bool {
    for _ in 0..DESTROY_ROUNDS {
        let pids = cgroup_pids(cg);
        if pids.is_empty() {
            return true;
        }
        if fs::write(cg.join("cgroup.kill"), "1").is_err() {
            for pid in pids {
                let _ = signal_pid(pid, libc::SIGKILL);
            }
        }
        std::thread::sleep(DESTROY_PAUSE);
    }
    cgroup_pids(cg).is_empty()
}

/// Kills everything in a cgroup v1 freezer cgroup the way Mesos's Linux launcher does: freeze
/// (so nothing can fork while it is being killed), SIGKILL every pid in `cgroup.procs`, thaw (the
/// kills are delivered), and again until it is empty; true when it is.
fn kill_freezer(cg: &Path) -> bool {
    let state = cg.join("freezer.state");
    for _ in 0..DESTROY_ROUNDS {
        if cgroup_pids(cg).is_empty() {
            return true;
        }
        if fs::write(&state, "FROZEN").is_ok() {
            // FREEZING until every task is frozen; bounded, a task in D state may take a while.
            for _ in 0..DESTROY_ROUNDS {
                if fs::read_to_string(&state).is_ok_and(|s| s.trim() == "FROZEN") {
                    break;
                }
                std::thread::sleep(DESTROY_PAUSE);
            }
        }
        for pid in cgroup_pids(cg) {
            let _ = signal_pid(pid, libc::SIGKILL);
        }
        let _ = fs::write(&state, "THAWED");
        std::thread::sleep(DESTROY_PAUSE);
    }
    cgroup_pids(cg).is_empty()
}

/// Finds (and creates) the runtime's cgroup in the cgroup v1 freezer hierarchy:
/// `<freezer mount>/<own freezer cgroup>/mesh-<key>`; the error says why there is none.
fn probe_freezer(key: &str) -> Result<PathBuf, String> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").map_err(|e| format!("/proc/self/mountinfo: {e}"))?;
    // `<id> <parent> <maj:min> <root> <mount point> <options> [optional...] - <type> <source> <super options>`
    let (root, mount) = mountinfo
        .lines()
        .find_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let mut r = right.split_whitespace();
            let (fstype, _source, opts) = (r.next()?, r.next()?, r.next()?);
            if fstype != "cgroup" || !opts.split(',').any(|o| o == "freezer") {
                return None;
            }
            let f: Vec<&str> = left.split_whitespace().collect();
            Some((f.get(3)?.to_string(), f.get(4)?.to_string()))
        })
        .ok_or("no cgroup v1 freezer hierarchy is mounted")?;
    let own = fs::read_to_string("/proc/self/cgroup").map_err(|e| format!("/proc/self/cgroup: {e}"))?;
    let own = own
        .lines()
        .find_map(|l| {
            let mut parts = l.splitn(3, ':');
            let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
            controllers.split(',').any(|c| c == "freezer").then(|| path.to_owned())
        })
        .ok_or("this process is in no freezer cgroup")?;
    let rel = own.strip_prefix(root.as_str()).unwrap_or(&own);
    let dir = Path::new(&mount).join(rel.trim_start_matches('/')).join(format!("mesh-{key}"));
    match fs::create_dir(&dir) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(format!("creating {}: {e}", dir.display())),
        _ => {}
    }
    if !dir.join("freezer.state").exists() || !dir.join("cgroup.procs").exists() {
        return Err(format!("{} has no freezer.state", dir.display()));
    }
    Ok(dir)
}

/// Creates a task's freezer cgroup.
fn prepare_freezer(root: &Path, task_id: &TaskId) -> Result<PathBuf, String> {
    let cg = root.join(task_id.as_str());
    match fs::create_dir(&cg) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => {
            Err(format!("cannot create freezer cgroup {}: {e}", cg.display()))
        }
        _ => Ok(cg),
    }
}

/// The task id of `pid` if its environment carries this runtime's marker (`<key>/<task id>`).
fn marker_of(pid: i32, key: &str) -> Option<String> {
    let env = fs::read(format!("/proc/{pid}/environ")).ok()?;
    let prefix = format!("{MARKER_ENV}={key}/");
    env.split(|b| *b == 0)
        .find_map(|kv| kv.strip_prefix(prefix.as_bytes()))
        .map(|id| String::from_utf8_lossy(id).into_owned())
}

/// Live processes carrying this runtime's marker: (pid, task id). Zombies have an empty
/// environment and are not listed; neither is this process.
fn marked_processes(key: &str) -> Vec<(i32, String)> {
    let me = std::process::id() as i32;
    let Ok(dir) = fs::read_dir("/proc") else { return Vec::new() };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| *pid != me)
        .filter_map(|pid| Some((pid, marker_of(pid, key)?)))
        .collect()
}

/// The marker scans of ending tasks, coalesced: a task that ends while a scan runs joins the
/// next one, and one scan of `/proc` (reading every process's environment) serves every task
/// that ended meanwhile. Without it, 10,000 tasks ending together (a shutdown) cost 10,000
/// scans of 10,000 processes each.
struct MarkerSweeper {
    key: String,
    state: Mutex<SweepState>,
    wake: std::sync::Condvar,
}

#[derive(Default)]
struct SweepState {
    /// Task ids waiting for the next scan.
    pending: HashSet<String>,
    /// Results of finished scans not collected yet: whether the scan ended with none left.
    results: HashMap<String, bool>,
    /// Whether a caller is scanning now.
    busy: bool,
}

impl MarkerSweeper {
    fn new(key: String) -> Self {
        Self { key, state: Mutex::new(SweepState::default()), wake: std::sync::Condvar::new() }
    }

    fn lock(&self) -> MutexGuard<'_, SweepState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// SIGKILLs every process marked with `task_id` (blocking), together with whatever other
    /// tasks are waiting; true when the scan found none left.
    fn sweep(&self, task_id: &str) -> bool {
        let mut st = self.lock();
        st.pending.insert(task_id.to_owned());
        loop {
            if let Some(clean) = st.results.remove(task_id) {
                return clean;
            }
            if !st.busy && !st.pending.is_empty() {
                st.busy = true;
                let batch = std::mem::take(&mut st.pending);
                drop(st);
                let (_, clean) = kill_marked(&self.key, |t| batch.contains(t));
                st = self.lock();
                st.results.extend(batch.into_iter().map(|id| (id, clean)));
                st.busy = false;
                self.wake.notify_all();
                continue;
            }
            st = self.wake.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// SIGKILLs every process with this runtime's marker whose task id satisfies `doomed`, scanning
/// again until a scan finds none (at most [`DESTROY_ROUNDS`]). Each kill goes through a pidfd
/// opened before the marker is checked again, so a pid reused in between is never hit.
/// Returns how many processes were killed, and whether the last scan found none left (false:
/// it gave up after [`DESTROY_ROUNDS`]).
fn kill_marked(key: &str, doomed: impl Fn(&str) -> bool) -> (usize, bool) {
    let mut killed = 0;
    for _ in 0..DESTROY_ROUNDS {
        let victims: Vec<i32> =
            marked_processes(key).into_iter().filter(|(_, id)| doomed(id)).map(|(pid, _)| pid).collect();
        if victims.is_empty() {
            return (killed, true);
        }
        for pid in victims {
            let still = || marker_of(pid, key).is_some_and(|id| doomed(&id));
            match pidfd_open(pid) {
                Ok(fd) => {
                    if still() && pidfd_kill(&fd).is_ok() {
                        killed += 1;
                    }
                }
                // No pidfds (Linux < 5.3): a plain kill right after the check.
                Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => {
                    if still() && signal_pid(pid, libc::SIGKILL).is_ok() {
                        killed += 1;
                    }
                }
                Err(_) => {}
            }
        }
        std::thread::sleep(DESTROY_PAUSE);
    }
    (killed, false)
}

// ---------------------------------------------------------------------------------------------
// The only unsafe code of this runtime: thin syscall wrappers.
// ---------------------------------------------------------------------------------------------

/// Shell builtins that put the shell in the task's cgroups (`echo 0 > .../cgroup.procs`: `0` is
/// the writing process) and set its `RLIMIT_DATA` (`ulimit -d`, KiB, soft and hard), before the
/// task's command runs in the same shell or is `exec`ed by it; any failure exits 126 before
/// anything of the task runs. `None` when there is nothing to do. Children inherit all of it.
fn join_prelude(cgroups: [Option<&Path>; 2], data_limit: Option<u64>) -> Option<String> {
    let quote = |p: &Path| format!("'{}'", p.to_string_lossy().replace('\'', r"'\''"));
    let mut steps: Vec<String> =
        cgroups.into_iter().flatten().map(|cg| format!("echo 0 >{}", quote(&cg.join("cgroup.procs")))).collect();
    if let Some(bytes) = data_limit {
        steps.push(format!("ulimit -d {}", bytes.div_ceil(1024)));
    }
    (!steps.is_empty()).then(|| format!("{} || exit 126; ", steps.join(" && ")))
}

/// `killpg(pgid, sig)`; a group that no longer exists is not an error.
#[allow(unsafe_code)]
fn signal_group(pgid: i32, sig: i32) -> io::Result<()> {
    // Never 0 (our own group), negative, or init.
    if pgid <= 1 {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    // SAFETY: killpg takes two integers and touches no memory of ours.
    let rc = unsafe { libc::killpg(pgid, sig) };
    if rc == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::ESRCH) { Ok(()) } else { Err(err) }
}

/// `kill(pid, sig)`; a process that no longer exists is not an error.
#[allow(unsafe_code)]
fn signal_pid(pid: i32, sig: i32) -> io::Result<()> {
    // Never 0 (our own group), negative (groups), or init.
    if pid <= 1 {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    // SAFETY: kill takes two integers and touches no memory of ours.
    let rc = unsafe { libc::kill(pid, sig) };
    if rc == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::ESRCH) { Ok(()) } else { Err(err) }
}

/// `pidfd_open(pid, 0)` (Linux 5.3+).
#[allow(unsafe_code)]
fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: pidfd_open takes two integers and touches no memory of ours.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: on success the syscall returned a new file descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// SIGKILL through a pidfd: reaches exactly the process the pidfd was opened for.
#[allow(unsafe_code)]
fn pidfd_kill(fd: &OwnedFd) -> io::Result<()> {
    // SAFETY: pidfd_send_signal takes a descriptor we own, a signal number, a null siginfo
    // pointer (allowed: the kernel fills in a default) and flags 0.
    let rc =
        unsafe { libc::syscall(libc::SYS_pidfd_send_signal, fd.as_raw_fd(), libc::SIGKILL, std::ptr::null::<u8>(), 0) };
    if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

/// `pidfd_open(pid, 0)` (Linux 5.3+), registered with the tokio reactor for readability.
#[allow(unsafe_code)]
fn async_pidfd(pid: i32) -> io::Result<tokio::io::unix::AsyncFd<OwnedFd>> {
    let fd = pidfd_open(pid)?;
    // SAFETY: an `OwnedFd` keeps its descriptor open and unchanged until it is dropped, which
    // happens only when the `AsyncFd` owning it is dropped.
    let afd = unsafe { tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) };
    Ok(afd?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::timeout;

    const DEADLINE: Duration = Duration::from_secs(30);

    struct Fixture {
        _dir: tempfile::TempDir,
        root: PathBuf,
        work: PathBuf,
        rt: ProcessRuntime,
        ev: Events,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let root = fs::canonicalize(dir.path()).unwrap();
        let work = root.join("work");
        let (tx, rx) = mpsc::channel(64);
        let rt = ProcessRuntime::new(work.clone(), tx).unwrap();
        Fixture { _dir: dir, root, work, rt, ev: Events::new(rx) }
    }

    fn spec(id: &str, command: Command) -> TaskSpec {
        TaskSpec {
            task_id: TaskId::from(id),
            command,
            env: BTreeMap::new(),
            cpus: 0.1,
            mem: 64.0,
            disk: 0.0,
            ports: vec![],
            kill_grace: Duration::from_secs(5),
            labels: BTreeMap::new(),
            container: None,
        }
    }

    fn shell(id: &str, s: &str) -> TaskSpec {
        spec(id, Command::Shell(s.into()))
    }

    /// The runtime's event channel, with events about other tasks kept for later.
    struct Events {
        rx: mpsc::Receiver<RuntimeEvent>,
        stash: Vec<RuntimeEvent>,
    }

    impl Events {
        fn new(rx: mpsc::Receiver<RuntimeEvent>) -> Self {
            Self { rx, stash: Vec::new() }
        }

        /// The next event about `id`; panics at the deadline.
        async fn next_for(&mut self, id: &str) -> RuntimeEvent {
            fn about(ev: &RuntimeEvent) -> &str {
                match ev {
                    RuntimeEvent::Started { task_id, .. }
                    | RuntimeEvent::Exited { task_id, .. }
                    | RuntimeEvent::Failed { task_id, .. } => task_id.as_str(),
                }
            }
            if let Some(i) = self.stash.iter().position(|ev| about(ev) == id) {
                return self.stash.remove(i);
            }
            let (rx, stash) = (&mut self.rx, &mut self.stash);
            timeout(DEADLINE, async {
                loop {
                    let ev = rx.recv().await.expect("event channel closed");
                    if about(&ev) == id {
                        return ev;
                    }
                    stash.push(ev);
                }
            })
            .await
            .expect("no event before the deadline")
        }

        async fn started(&mut self, id: &str) {
            match self.next_for(id).await {
                RuntimeEvent::Started { .. } => {}
                other => panic!("expected Started, got {other:?}"),
            }
        }

        /// (exit, killed, message) of the next event about `id`, which must be `Exited`.
        async fn exited(&mut self, id: &str) -> (Exit, bool, String) {
            match self.next_for(id).await {
                RuntimeEvent::Exited { exit, killed, message, .. } => (exit, killed, message),
                other => panic!("expected Exited, got {other:?}"),
            }
        }

        fn is_empty(&mut self) -> bool {
            self.stash.is_empty() && self.rx.try_recv().is_err()
        }
    }

    fn mkfifo(path: &Path) {
        let st = std::process::Command::new("mkfifo").arg(path).status().unwrap();
        assert!(st.success());
    }

    /// Reads a FIFO until its writer closes it (blocking open: waits for the writer).
    async fn read_fifo(path: &Path) -> String {
        let path = path.to_owned();
        timeout(DEADLINE, tokio::task::spawn_blocking(move || fs::read_to_string(path).unwrap()))
            .await
            .expect("nothing written to the fifo before the deadline")
            .unwrap()
    }

    #[tokio::test]
    async fn env_ports_and_sandbox_are_visible() {
        let mut f = fixture();
        let mut s = shell("envtask", "env > env.txt");
        s.env.insert("PORT0".into(), "31000".into());
        s.env.insert("PORT".into(), "31000".into());
        s.env.insert("MESOS_TASK_ID".into(), "envtask".into());
        s.env.insert("FOO".into(), "bar baz".into());
        s.ports = vec![31000];
        f.rt.launch(s).await.unwrap();
        f.ev.started("envtask").await;
        let (exit, killed, msg) = f.ev.exited("envtask").await;
        assert_eq!((exit, killed, msg.as_str()), (Exit::Code(0), false, "exited with status 0"));
        let sandbox = f.work.join("envtask");
        assert_eq!(f.rt.sandbox(&"envtask".into()), sandbox);
        let env = fs::read_to_string(sandbox.join("env.txt")).unwrap();
        let vars: BTreeMap<&str, &str> = env.lines().filter_map(|l| l.split_once('=')).collect();
        assert_eq!(vars.get("PORT0"), Some(&"31000"));
        assert_eq!(vars.get("PORT"), Some(&"31000"));
        assert_eq!(vars.get("FOO"), Some(&"bar baz"));
        assert_eq!(vars.get("MESOS_TASK_ID"), Some(&"envtask"));
        assert_eq!(vars.get("MESOS_SANDBOX"), Some(&sandbox.to_str().unwrap()));
        assert_eq!(vars.get("PWD"), Some(&sandbox.to_str().unwrap()));
        assert_eq!(vars.get(MARKER_ENV).copied(), Some(f.rt.marker(&"envtask".into()).as_str()));
        assert!(vars.contains_key("PATH"));
        let allowed = [
            "PATH",
            "HOME",
            "LANG",
            "PORT0",
            "PORT",
            "FOO",
            "MESOS_TASK_ID",
            "MESOS_SANDBOX",
            MARKER_ENV,
            // added by the shell itself
            "PWD",
            "OLDPWD",
            "SHLVL",
            "_",
        ];
        for k in vars.keys() {
            assert!(allowed.contains(k), "unexpected variable {k} leaked into the task env");
        }
        // Ended tasks are marked done and forgotten.
        assert!(sandbox.join(DONE_FILE).exists());
        assert!(!sandbox.join(TASK_FILE).exists());
        assert!(f.rt.running().is_empty());
        let done: TaskRecord = serde_json::from_str(&fs::read_to_string(sandbox.join(DONE_FILE)).unwrap()).unwrap();
        assert_eq!(done.ports, vec![31000]);
        assert_eq!(done.pid, done.pgid);
    }

    #[tokio::test]
    async fn shell_command_exit_code_and_logs() {
        let mut f = fixture();
        f.rt.launch(shell("sh1", "echo $((1+2)); echo oops >&2; exit 3")).await.unwrap();
        f.ev.started("sh1").await;
        let (exit, killed, msg) = f.ev.exited("sh1").await;
        assert_eq!(exit, Exit::Code(3));
        assert!(!killed);
        assert_eq!(msg, "exited with status 3");
        let sandbox = f.work.join("sh1");
        assert_eq!(fs::read_to_string(sandbox.join("stdout")).unwrap(), "3\n");
        assert_eq!(fs::read_to_string(sandbox.join("stderr")).unwrap(), "oops\n");
    }

    #[tokio::test]
    async fn args_command_runs_without_a_shell() {
        let mut f = fixture();
        let argv = ["printf", "%s|", "a b", "$HOME", "*"].map(String::from).to_vec();
        f.rt.launch(spec("args1", Command::Args(argv))).await.unwrap();
        f.ev.started("args1").await;
        assert_eq!(f.ev.exited("args1").await.0, Exit::Code(0));
        let out = fs::read_to_string(f.work.join("args1").join("stdout")).unwrap();
        assert_eq!(out, "a b|$HOME|*|");
    }

    #[tokio::test]
    async fn spawn_failure_returns_err_and_sends_failed() {
        let mut f = fixture();
        let argv = vec!["/nonexistent/mesh-no-such-binary".to_owned()];
        let err = f.rt.launch(spec("bad1", Command::Args(argv))).await.unwrap_err();
        assert!(matches!(err, RuntimeError::Launch { .. }), "{err}");
        match f.ev.next_for("bad1").await {
            RuntimeEvent::Failed { message, .. } => {
                assert!(message.contains("mesh-no-such-binary"), "{message}")
            }
            other => panic!("expected Failed, got {other:?}"),
        }
        assert!(f.rt.launch(spec("bad2", Command::Args(vec![]))).await.is_err());
        assert!(f.rt.launch(shell("../escape", "true")).await.is_err());
        assert!(f.rt.running().is_empty());
    }

    #[tokio::test]
    async fn kill_sends_sigterm_first() {
        let mut f = fixture();
        let fifo = f.root.join("ready.fifo");
        mkfifo(&fifo);
        let script = format!(
            "trap 'echo term > term.marker; exit 0' TERM; echo ready > '{}'; sleep 1000 & wait",
            fifo.display()
        );
        f.rt.launch(shell("term1", &script)).await.unwrap();
        f.ev.started("term1").await;
        assert_eq!(read_fifo(&fifo).await, "ready\n");
        assert_eq!(f.rt.running(), vec![TaskId::from("term1")]);
        f.rt.kill(&"term1".into(), Duration::from_secs(60)).await.unwrap();
        // Idempotent: a second kill neither fails nor sends another SIGTERM.
        f.rt.kill(&"term1".into(), Duration::from_secs(60)).await.unwrap();
        let (exit, killed, _) = f.ev.exited("term1").await;
        assert_eq!(exit, Exit::Code(0), "the TERM trap ran and exited normally");
        assert!(killed);
        let marker = fs::read_to_string(f.work.join("term1").join("term.marker")).unwrap();
        assert_eq!(marker, "term\n");
        // Killing an ended or unknown task is fine.
        f.rt.kill(&"term1".into(), Duration::ZERO).await.unwrap();
        f.rt.kill(&"nope".into(), Duration::ZERO).await.unwrap();
    }

    #[tokio::test]
    async fn kill_escalates_to_sigkill_after_grace() {
        let mut f = fixture();
        let fifo = f.root.join("ready.fifo");
        mkfifo(&fifo);
        let script = format!("trap '' TERM; echo ready > '{}'; while :; do sleep 1000; done", fifo.display());
        f.rt.launch(shell("stubborn", &script)).await.unwrap();
        f.ev.started("stubborn").await;
        read_fifo(&fifo).await;
        f.rt.kill(&"stubborn".into(), Duration::from_millis(300)).await.unwrap();
        let (exit, killed, msg) = f.ev.exited("stubborn").await;
        assert_eq!(exit, Exit::Signal(9));
        assert!(killed);
        assert_eq!(msg, "killed by signal 9 (SIGKILL)");
    }

    #[tokio::test]
    async fn kill_reaches_the_whole_process_group() {
        let mut f = fixture();
        let fifo = f.root.join("gc.fifo");
        mkfifo(&fifo);
        // task sh -> child sh -> grandchild sleep
        let script = format!("sh -c 'sleep 1000 & echo $! > \"{}\"; wait' & wait", fifo.display());
        f.rt.launch(shell("group1", &script)).await.unwrap();
        f.ev.started("group1").await;
        let gc: i32 = read_fifo(&fifo).await.trim().parse().unwrap();
        let gc_start = proc_stat(gc).expect("grandchild runs").start_time;
        assert!(is_alive(gc, gc_start));
        f.rt.kill(&"group1".into(), Duration::from_secs(5)).await.unwrap();
        let (_, killed, _) = f.ev.exited("group1").await;
        assert!(killed);
        timeout(DEADLINE, wait_pid_exit(gc, gc_start)).await.expect("grandchild sleep survived the kill");
        assert!(!is_alive(gc, gc_start));
    }

    #[tokio::test]
    async fn kill_all_ends_everything() {
        let mut f = fixture();
        for id in ["all1", "all2"] {
            f.rt.launch(spec(id, Command::Args(vec!["sleep".into(), "1000".into()]))).await.unwrap();
            f.ev.started(id).await;
        }
        assert_eq!(f.rt.running().len(), 2);
        f.rt.kill_all(Duration::from_secs(5)).await;
        assert!(f.rt.running().is_empty());
        for id in ["all1", "all2"] {
            let (exit, killed, _) = f.ev.exited(id).await;
            assert_eq!(exit, Exit::Signal(libc::SIGTERM));
            assert!(killed);
        }
    }

    #[tokio::test]
    async fn kill_all_gives_every_task_its_own_grace_at_once() {
        // Tasks that ignore SIGTERM end only at their SIGKILL, after their own grace (1 s), not
        // after kill_all's cap (an hour): the waits overlap, so 12 of them end in about one
        // grace, where one after another would take 12.
        let mut f = fixture();
        let ids: Vec<String> = (0..12).map(|i| format!("stubborn{i}")).collect();
        for id in &ids {
            let mut s = shell(id, "trap '' TERM; echo ready > ready; while :; do sleep 1; done");
            s.kill_grace = Duration::from_secs(1);
            f.rt.launch(s).await.unwrap();
            f.ev.started(id).await;
        }
        for id in &ids {
            let ready = f.work.join(id).join("ready");
            until("the TERM trap is set", || ready.exists()).await;
        }
        let started = std::time::Instant::now();
        timeout(Duration::from_secs(8), f.rt.kill_all(Duration::from_secs(3600)))
            .await
            .expect("kill_all waits for the tasks' own grace, in parallel");
        assert!(started.elapsed() >= Duration::from_secs(1), "SIGKILL came before the grace ended");
        for id in &ids {
            let (exit, killed, _) = f.ev.exited(id).await;
            assert_eq!(exit, Exit::Signal(libc::SIGKILL), "{id} ignored SIGTERM");
            assert!(killed);
        }
    }

    #[tokio::test]
    async fn recover_adopts_live_tasks_and_kills_them() {
        let dir = tempfile::tempdir().unwrap();
        let work = dir.path().join("work");
        let (tx_a, rx_a) = mpsc::channel(64);
        let mut rx_a = Events::new(rx_a);
        let a = ProcessRuntime::new(work.clone(), tx_a).unwrap();
        let mut s = spec("adopt1", Command::Args(vec!["sleep".into(), "1000".into()]));
        s.labels.insert("app".into(), "/web".into());
        s.ports = vec![31001, 31002];
        a.launch(s).await.unwrap();
        rx_a.started("adopt1").await;
        let record: TaskRecord =
            serde_json::from_str(&fs::read_to_string(a.sandbox(&"adopt1".into()).join(TASK_FILE)).unwrap()).unwrap();
        drop(a);
        assert!(is_alive(record.pid, record.start_time), "dropping the runtime must not kill");

        let (tx_b, rx_b) = mpsc::channel(64);
        let mut rx_b = Events::new(rx_b);
        let b = ProcessRuntime::new(work.clone(), tx_b).unwrap();
        let found = b.recover().await.unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].task_id, TaskId::from("adopt1"));
        assert_eq!(found[0].labels.get("app").map(String::as_str), Some("/web"));
        assert_eq!(found[0].ports, vec![31001, 31002]);
        assert_eq!(b.running(), vec![TaskId::from("adopt1")]);
        // A second recover does not adopt twice.
        assert!(b.recover().await.unwrap().is_empty());

        b.kill(&"adopt1".into(), Duration::from_secs(5)).await.unwrap();
        let (exit, killed, _) = rx_b.exited("adopt1").await;
        assert_eq!(exit, Exit::Unknown);
        assert!(killed);
        assert!(!is_alive(record.pid, record.start_time));
        assert!(b.running().is_empty());
        assert!(work.join("adopt1").join(DONE_FILE).exists());

        // A third runtime finds nothing to adopt.
        let (tx_c, _rx_c) = mpsc::channel(64);
        let c = ProcessRuntime::new(work, tx_c).unwrap();
        assert!(c.recover().await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn recover_rejects_a_wrong_start_time() {
        let dir = tempfile::tempdir().unwrap();
        let work = dir.path().join("work");
        let (tx_a, rx_a) = mpsc::channel(64);
        let mut rx_a = Events::new(rx_a);
        let a = ProcessRuntime::new(work.clone(), tx_a).unwrap();
        a.launch(spec("reused1", Command::Args(vec!["sleep".into(), "1000".into()]))).await.unwrap();
        rx_a.started("reused1").await;
        let file = a.sandbox(&"reused1".into()).join(TASK_FILE);
        a.kill_all(Duration::ZERO).await;
        drop(a);
        // The record is live again, but its pid now belongs to someone else (a process that is
        // no task of this runtime), which started at another time.
        let mut foreign = std::process::Command::new("sleep").arg("1000").spawn().unwrap();
        let pid = foreign.id() as i32;
        let foreign_start = proc_stat(pid).unwrap().start_time;
        fs::rename(work.join("reused1").join(DONE_FILE), &file).unwrap();
        let mut record: TaskRecord = serde_json::from_str(&fs::read_to_string(&file).unwrap()).unwrap();
        (record.pid, record.pgid, record.start_time) = (pid, pid, foreign_start + 1);
        fs::write(&file, serde_json::to_vec(&record).unwrap()).unwrap();

        let (tx_b, _rx_b) = mpsc::channel(64);
        let b = ProcessRuntime::new(work.clone(), tx_b).unwrap();
        assert!(b.recover().await.unwrap().is_empty());
        assert!(b.running().is_empty());
        assert!(!file.exists());
        assert!(work.join("reused1").join(DONE_FILE).exists());

        // The foreign process is untouched: clean it up.
        assert!(is_alive(pid, foreign_start));
        foreign.kill().unwrap();
        foreign.wait().unwrap();
    }

    #[tokio::test]
    async fn recover_skips_garbage() {
        let mut f = fixture();
        fs::create_dir_all(f.work.join("junk")).unwrap();
        fs::write(f.work.join("junk").join(TASK_FILE), "not json").unwrap();
        fs::write(f.work.join("stray-file"), "x").unwrap();
        assert!(f.rt.recover().await.unwrap().is_empty());
        assert!(f.work.join("junk").join(INVALID_FILE).exists());
        assert!(f.ev.is_empty());
    }

    #[tokio::test]
    async fn memory_limit_is_enforced() {
        let mut f = fixture();
        let Some(python) = ["/usr/bin/python3", "/usr/local/bin/python3"].into_iter().find(|p| Path::new(p).exists())
        else {
            println!("skipping memory_limit_is_enforced: no python3 found");
            return;
        };
        println!("isolation mode: {}", f.rt.isolation());
        let mut s =
            spec("hog1", Command::Args(vec![python.into(), "-c".into(), "x = bytearray(500 * 1024 * 1024)".into()]));
        s.mem = 64.0;
        f.rt.launch(s).await.unwrap();
        f.ev.started("hog1").await;
        let (exit, killed, msg) = f.ev.exited("hog1").await;
        assert!(!killed);
        assert_ne!(exit, Exit::Code(0), "a 500 MiB allocation succeeded under mem=64 ({msg})");
        if f.rt.isolation() == "cgroup-v2" {
            assert!(msg.contains("memory limit"), "{msg}");
        } else {
            let err = fs::read_to_string(f.work.join("hog1").join("stderr")).unwrap();
            assert!(err.contains("MemoryError"), "{err}");
        }

        // The same program fits when the limit allows it.
        let mut s =
            spec("fits1", Command::Args(vec![python.into(), "-c".into(), "x = bytearray(8 * 1024 * 1024)".into()]));
        s.mem = 64.0;
        f.rt.launch(s).await.unwrap();
        f.ev.started("fits1").await;
        assert_eq!(f.ev.exited("fits1").await.0, Exit::Code(0));
    }

    #[tokio::test]
    async fn a_task_over_its_disk_is_killed_as_a_failure() {
        let dir = tempfile::tempdir().unwrap();
        let (tx, rx) = mpsc::channel(64);
        let mut ev = Events::new(rx);
        let options = ProcessOptions { disk_watch_interval: Duration::from_millis(50), ..Default::default() };
        let rt = ProcessRuntime::with_options(dir.path().join("work"), tx, options).unwrap();
        let mut s = shell("fat1", "head -c 3145728 /dev/zero > blob && exec sleep 1000");
        s.disk = 1.0;
        rt.launch(s).await.unwrap();
        ev.started("fat1").await;
        let (exit, killed, msg) = ev.exited("fat1").await;
        assert_eq!((exit, killed), (Exit::Signal(9), false), "{msg}");
        assert!(msg.starts_with("disk limit of 1 MiB exceeded (used "), "{msg}");
        assert!(msg.ends_with("; killed by signal 9 (SIGKILL)"), "{msg}");
        let done: TaskRecord =
            serde_json::from_str(&fs::read_to_string(rt.sandbox(&"fat1".into()).join(DONE_FILE)).unwrap()).unwrap();
        assert_eq!(done.disk, 1.0, "the limit is recorded for re-adoption");
    }

    #[tokio::test]
    async fn gc_removes_ended_sandboxes_and_keeps_running_ones() {
        let mut f = fixture();
        f.rt.launch(spec("live1", Command::Args(vec!["sleep".into(), "1000".into()]))).await.unwrap();
        f.ev.started("live1").await;
        f.rt.launch(shell("ended1", "echo bye")).await.unwrap();
        f.ev.started("ended1").await;
        f.ev.exited("ended1").await;
        // A sandbox of an earlier run whose task may still be adopted (task.json) is kept too.
        fs::create_dir_all(f.work.join("adoptable")).unwrap();
        fs::write(f.work.join("adoptable").join(TASK_FILE), "{}").unwrap();
        let policy = GcPolicy { delay: Duration::ZERO, headroom: 0.0, interval: Duration::from_millis(20) };
        let gc = f.rt.spawn_gc(policy);
        timeout(DEADLINE, async {
            while f.work.join("ended1").exists() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("the ended task's sandbox was never removed");
        gc.abort();
        assert!(f.work.join("live1").join("stdout").exists());
        assert!(f.work.join("adoptable").join(TASK_FILE).exists());
        f.rt.kill(&"live1".into(), Duration::ZERO).await.unwrap();
        f.ev.exited("live1").await;
    }

    #[test]
    fn isolation_mode_matches_the_host() {
        let dir = tempfile::tempdir().unwrap();
        let (tx, _rx) = mpsc::channel(1);
        let rt = ProcessRuntime::new(dir.path().join("w"), tx).unwrap();
        let v2 = Path::new(CGROUP_ROOT).join("cgroup.controllers").exists();
        if !v2 {
            assert_eq!(rt.isolation(), "rlimit");
        }
        assert!(matches!(rt.isolation(), "cgroup-v2" | "rlimit"));
        // Where cgroup v2 is not usable but a v1 freezer hierarchy is writable (the machine this
        // was written on), tasks are tracked with the freezer.
        let freezer = Path::new("/sys/fs/cgroup/freezer");
        let probe = freezer.join(format!("mesh-probe-{}", std::process::id()));
        if rt.isolation() == "rlimit" && fs::create_dir(&probe).is_ok() {
            fs::remove_dir(&probe).unwrap();
            assert_eq!(rt.tracking(), "cgroup-v1-freezer");
        }
        let (tx, _rx) = mpsc::channel(1);
        let forced = ProcessRuntime::with_tracking(dir.path().join("w2"), tx, TaskTracking::Environ).unwrap();
        assert_eq!(forced.tracking(), "environ");
        assert_eq!(rt.name(), "process");
    }

    /// Live (non-zombie) processes whose environment holds `MESH_TEST_TAG=<tag>`.
    fn tagged(tag: &str) -> Vec<i32> {
        let needle = format!("MESH_TEST_TAG={tag}");
        let mut out = Vec::new();
        for e in fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
            let Ok(env) = fs::read(format!("/proc/{pid}/environ")) else { continue };
            if env.split(|b| *b == 0).any(|kv| kv == needle.as_bytes()) {
                out.push(pid);
            }
        }
        out
    }

    /// Polls until `f` holds, or panics with `what` at the deadline.
    async fn until(what: &str, mut f: impl FnMut() -> bool) {
        let end = tokio::time::Instant::now() + DEADLINE;
        while !f() {
            assert!(tokio::time::Instant::now() < end, "timed out waiting for: {what}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn tagged_shell(id: &str, s: &str, tag: &str) -> TaskSpec {
        let mut spec = shell(id, s);
        spec.env.insert("MESH_TEST_TAG".into(), tag.into());
        spec
    }

    /// Issue 10, item 1: an agent that dies between the spawn and the record must not leave a
    /// process that no restart knows.
    #[tokio::test]
    async fn a_crash_between_spawn_and_record_leaves_no_orphan() {
        let dir = tempfile::tempdir().unwrap();
        let work = dir.path().join("work");
        let tag = uuid::Uuid::new_v4().to_string();
        let (tx_a, _rx_a) = mpsc::channel(64);
        let a = ProcessRuntime::new(work.clone(), tx_a).unwrap();
        a.inner.halt_after_spawn.store(true, Ordering::SeqCst);
        a.launch(tagged_shell("crash1", "sleep 1000", &tag)).await.unwrap();
        until("the task process runs", || !tagged(&tag).is_empty()).await;
        drop(a);

        let (tx_b, _rx_b) = mpsc::channel(64);
        let b = ProcessRuntime::new(work.clone(), tx_b).unwrap();
        assert!(b.recover().await.unwrap().is_empty(), "a half-launched task is not adopted");
        until("the half-launched task's process is killed by recover", || tagged(&tag).is_empty()).await;
        assert!(!work.join("crash1").join(TASK_FILE).exists());
    }

    /// Issue 10, item 2: processes that leave the task's process group (setsid, double fork,
    /// ignoring SIGTERM) are killed with the task, in every tracking mode.
    async fn escaped_processes_die_with_the_task(tracking: TaskTracking) {
        let scripts = [
            "setsid sleep 1000 & sleep 1000",
            "sh -c '(setsid sleep 1000 &) &'; sleep 1000",
            "(setsid sh -c 'trap \"\" TERM; exec sleep 1000' &); sleep 1000",
        ];
        let dir = tempfile::tempdir().unwrap();
        let (tx, rx) = mpsc::channel(64);
        let rt = ProcessRuntime::with_tracking(dir.path().join("work"), tx, tracking).unwrap();
        let mut ev = Events::new(rx);
        for (i, script) in scripts.iter().enumerate() {
            let tag = uuid::Uuid::new_v4().to_string();
            let id = format!("esc{i}");
            rt.launch(tagged_shell(&id, script, &tag)).await.unwrap();
            ev.started(&id).await;
            // sh + two sleeps
            until("both sleeps run", || tagged(&tag).len() >= 3).await;
            rt.kill(&TaskId::from(id.as_str()), Duration::from_secs(5)).await.unwrap();
            let (_, killed, _) = ev.exited(&id).await;
            assert!(killed);
            until(&format!("every process of {script:?} is gone ({:?})", rt.tracking()), || tagged(&tag).is_empty())
                .await;
        }
        // The same when the task ends on its own and when a restarted runtime adopts the task.
        let tag = uuid::Uuid::new_v4().to_string();
        rt.launch(tagged_shell("esc-end", "setsid sleep 1000 & sleep 0.2", &tag)).await.unwrap();
        ev.started("esc-end").await;
        assert_eq!(ev.exited("esc-end").await.0, Exit::Code(0));
        until("the escaped sleep of an ended task is gone", || tagged(&tag).is_empty()).await;
    }

    #[tokio::test]
    async fn escaped_processes_die_with_the_task_auto() {
        escaped_processes_die_with_the_task(TaskTracking::Auto).await;
    }

    #[tokio::test]
    async fn escaped_processes_die_with_the_task_environ() {
        escaped_processes_die_with_the_task(TaskTracking::Environ).await;
    }

    /// After a restart, the escaped processes of a task whose leader died while the agent was
    /// down are killed by `recover`; those of an adopted task die with it.
    async fn recover_kills_escaped_processes(tracking: TaskTracking) {
        let dir = tempfile::tempdir().unwrap();
        let work = dir.path().join("work");
        let (tag1, tag2) = (uuid::Uuid::new_v4().to_string(), uuid::Uuid::new_v4().to_string());
        let (tx_a, rx_a) = mpsc::channel(64);
        let mut ev_a = Events::new(rx_a);
        let a = ProcessRuntime::with_tracking(work.clone(), tx_a, tracking).unwrap();
        a.launch(tagged_shell("dead1", "setsid sleep 1000 & sleep 1000", &tag1)).await.unwrap();
        a.launch(tagged_shell("live1", "setsid sleep 1000 & sleep 1000", &tag2)).await.unwrap();
        ev_a.started("dead1").await;
        ev_a.started("live1").await;
        until("all sleeps run", || tagged(&tag1).len() >= 3 && tagged(&tag2).len() >= 3).await;
        let file = a.sandbox(&"dead1".into()).join(TASK_FILE);
        drop(a);
        let record: TaskRecord = serde_json::from_str(&fs::read_to_string(&file).unwrap()).unwrap();
        signal_group(record.pgid, libc::SIGKILL).unwrap();
        until("the leader's group is gone", || !is_alive(record.pid, record.start_time)).await;
        assert!(!tagged(&tag1).is_empty(), "the escaped sleep outlives its group");

        let (tx_b, rx_b) = mpsc::channel(64);
        let mut ev_b = Events::new(rx_b);
        let b = ProcessRuntime::with_tracking(work, tx_b, tracking).unwrap();
        let found = b.recover().await.unwrap();
        assert_eq!(found.iter().map(|r| r.task_id.as_str()).collect::<Vec<_>>(), vec!["live1"]);
        until("recover kills what is left of the dead task", || tagged(&tag1).is_empty()).await;
        assert!(tagged(&tag2).len() >= 3, "the adopted task keeps running");
        b.kill_all(Duration::from_secs(5)).await;
        ev_b.exited("live1").await;
        until("kill_all kills the adopted task's escaped process", || tagged(&tag2).is_empty()).await;
    }

    #[tokio::test]
    async fn recover_kills_escaped_processes_auto() {
        recover_kills_escaped_processes(TaskTracking::Auto).await;
    }

    #[tokio::test]
    async fn recover_kills_escaped_processes_environ() {
        recover_kills_escaped_processes(TaskTracking::Environ).await;
    }

    #[test]
    fn proc_stat_parses_own_process() {
        let me = proc_stat(std::process::id() as i32).unwrap();
        assert!(matches!(me.state, 'R' | 'S'));
        assert!(is_alive(std::process::id() as i32, me.start_time));
        assert!(!is_alive(std::process::id() as i32, me.start_time + 1));
    }

    #[test]
    fn simple_commands_are_classified() {
        let direct: &[(&str, &[&str])] = &[
            ("sleep 100000", &["sleep", "100000"]),
            ("  sleep\t 5  ", &["sleep", "5"]),
            ("/bin/sleep 5", &["/bin/sleep", "5"]),
            (
                "python3 -m http.server --bind=127.0.0.1 8080",
                &["python3", "-m", "http.server", "--bind=127.0.0.1", "8080"],
            ),
            ("nc -l 10.0.0.1:80 a,b +x 50% user@host", &["nc", "-l", "10.0.0.1:80", "a,b", "+x", "50%", "user@host"]),
        ];
        for (cmd, words) in direct {
            assert_eq!(simple_command(cmd).as_deref(), Some(*words), "{cmd:?}");
        }
        let shell = [
            "",
            "   ",
            "sleep $PORT0",
            "sleep ${PORT0}",
            "VAR=x sleep 1",
            "sleep 1 | cat",
            "sleep 1 > out",
            "sleep 1 < in",
            "sleep 1 2>&1",
            "cd x && sleep 1",
            "sleep 1 || true",
            "sleep 1; sleep 2",
            "sleep 1 &",
            "(sleep 1)",
            "{ sleep 1; }",
            "sleep 'a b'",
            "sleep \"1\"",
            "sleep \\1",
            "ls *",
            "ls file?",
            "ls [ab]",
            "ls ~",
            "sleep 1 # comment",
            "! sleep 1",
            "echo `id`",
            "sleep 1\nsleep 2",
            "echo hi",
            "exit 3",
            "true",
            "test -f x",
            "[ -f x ]",
            ". ./env",
            ": nothing",
            "exec sleep 1",
            "kill 1",
            "printf x",
            "if",
            "time sleep 1",
            "while",
            "café 1",
        ];
        for cmd in shell {
            assert_eq!(simple_command(cmd), None, "{cmd:?}");
        }

        let path = OsStr::new("/usr/bin:/bin");
        let env = BTreeMap::new();
        let (file, words) = direct_exec("sleep 100000", path, &env).expect("sleep is on the PATH");
        assert!(file.is_absolute() && file.ends_with("sleep"), "{}", file.display());
        assert_eq!(words, ["sleep", "100000"]);
        assert!(direct_exec("/bin/sleep 1", path, &env).is_some());
        for not_direct in ["./x", "bin/sleep 1", "/no/such/program", "mesh-no-such-binary 1", "/etc/passwd", "/tmp"] {
            assert!(direct_exec(not_direct, path, &env).is_none(), "{not_direct:?}");
        }
        // An empty or relative PATH entry before the program: the shell would look in the sandbox.
        assert!(direct_exec("sleep 1", OsStr::new(":/usr/bin:/bin"), &env).is_none());
        assert!(direct_exec("sleep 1", OsStr::new("bin:/usr/bin:/bin"), &env).is_none());
        assert!(direct_exec("sleep 1", OsStr::new("/nonexistent"), &env).is_none());
        // The shell may rewrite a PWD of the spec.
        let pwd = BTreeMap::from([("PWD".to_owned(), "/".to_owned())]);
        assert!(direct_exec("sleep 1", path, &pwd).is_none());
    }

    /// The pids of the live processes in process group `pgid`.
    fn group_members(pgid: i32) -> Vec<i32> {
        let mut out = Vec::new();
        for e in fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else { continue };
            let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
            let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else { continue };
            let fields: Vec<&str> = rest.split_whitespace().collect();
            // Field 3 is the state, field 5 the process group.
            if fields.get(2).and_then(|g| g.parse::<i32>().ok()) == Some(pgid) && !matches!(fields[0], "Z" | "X") {
                out.push(pid);
            }
        }
        out
    }

    fn comm(pid: i32) -> String {
        fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default().trim().to_owned()
    }

    /// The process's command once it is `want` (a task's shell prelude `exec`s the command a
    /// moment after the spawn), or what it is after 10 s.
    async fn comm_becomes(pid: i32, want: &str) -> String {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let c = comm(pid);
            if c == want || std::time::Instant::now() > deadline {
                return c;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn record_of(f: &Fixture, id: &str) -> TaskRecord {
        serde_json::from_str(&fs::read_to_string(f.work.join(id).join(TASK_FILE)).unwrap()).unwrap()
    }

    #[tokio::test]
    async fn a_simple_command_runs_as_one_process() {
        let mut f = fixture();
        f.rt.launch(shell("one1", "sleep 1000")).await.unwrap();
        f.ev.started("one1").await;
        let record = record_of(&f, "one1");
        assert!(!record.launching);
        assert!(is_alive(record.pid, record.start_time));
        assert_eq!(comm_becomes(record.pid, "sleep").await, "sleep", "the task's leader is sleep itself, not a shell");
        assert_eq!(group_members(record.pgid), vec![record.pid], "one process in the task's group");
        assert_eq!(fs::read(format!("/proc/{}/cmdline", record.pid)).unwrap(), b"sleep\x001000\x00");
        // The record was completed in place: no temporary file is left.
        assert!(!f.work.join("one1").join("task.json.tmp").exists());

        // Shell syntax still runs through the shell.
        f.rt.launch(shell("sh2", "sleep 1000 && true")).await.unwrap();
        f.ev.started("sh2").await;
        let record = record_of(&f, "sh2");
        assert_eq!(comm(record.pid), "sh");
        until("sh has started sleep", || group_members(record.pgid).len() == 2).await;

        for id in ["one1", "sh2"] {
            f.rt.kill(&id.into(), Duration::from_secs(5)).await.unwrap();
            let (exit, killed, _) = f.ev.exited(id).await;
            assert_eq!((exit, killed), (Exit::Signal(libc::SIGTERM), true), "{id}");
        }
    }

    #[tokio::test]
    async fn shell_syntax_with_ports_and_lists_still_works() {
        let mut f = fixture();
        let mut s = shell("port1", "cd . && echo $PORT0 > port.txt && test -s port.txt");
        s.env.insert("PORT0".into(), "31000".into());
        f.rt.launch(s).await.unwrap();
        f.ev.started("port1").await;
        assert_eq!(f.ev.exited("port1").await.0, Exit::Code(0));
        assert_eq!(fs::read_to_string(f.work.join("port1").join("port.txt")).unwrap(), "31000\n");

        f.rt.launch(shell("exit1", "exit 3")).await.unwrap();
        f.ev.started("exit1").await;
        assert_eq!(f.ev.exited("exit1").await.0, Exit::Code(3));

        // A simple command's exit status is its own.
        f.rt.launch(shell("false1", "ls /mesh-no-such-file")).await.unwrap();
        f.ev.started("false1").await;
        assert_eq!(f.ev.exited("false1").await.0, Exit::Code(2));
    }

    /// A direct exec sees exactly what the command would see under `/bin/sh -c`.
    #[tokio::test]
    async fn a_direct_command_gets_the_shell_environment() {
        let mut f = fixture();
        let mut env_of = async |id: &str, cmd: &str| {
            let mut s = shell(id, cmd);
            s.env.insert("FOO".into(), "bar baz".into());
            f.rt.launch(s).await.unwrap();
            f.ev.started(id).await;
            assert_eq!(f.ev.exited(id).await.0, Exit::Code(0));
            let out = fs::read_to_string(f.work.join(id).join("stdout")).unwrap().replace(id, "<id>");
            // What a bash `/bin/sh` would add on top (dash, the shell this is meant for, adds
            // only `PWD`).
            let bash_only = |l: &&str| !l.starts_with("SHLVL=") && !l.starts_with("_=");
            let mut lines: Vec<String> = out.lines().filter(bash_only).map(str::to_owned).collect();
            lines.sort();
            lines
        };
        let direct = env_of("envdirect", "env").await;
        let shell = env_of("envshell", "env; exit 0").await;
        assert!(direct.iter().any(|l| l.starts_with("PWD=")), "{direct:?}");
        assert_eq!(direct, shell);
    }

    /// A program the kernel cannot exec (a script without `#!`) is run by the shell after all.
    #[tokio::test]
    async fn a_failed_direct_exec_falls_back_to_the_shell() {
        use std::os::unix::fs::PermissionsExt;
        let mut f = fixture();
        let script = f.root.join("noshebang");
        fs::write(&script, "echo fallback \"$1\"; exit 4\n").unwrap();
        fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
        f.rt.launch(shell("script1", &format!("{} arg", script.display()))).await.unwrap();
        f.ev.started("script1").await;
        assert_eq!(f.ev.exited("script1").await.0, Exit::Code(4));
        assert_eq!(fs::read_to_string(f.work.join("script1").join("stdout")).unwrap(), "fallback arg\n");
    }

    /// A `task.json` already in the sandbox (a task id launched again before a recovery) is
    /// replaced the old way, and the record is complete.
    #[tokio::test]
    async fn a_leftover_record_is_replaced() {
        let mut f = fixture();
        fs::create_dir_all(f.work.join("again1")).unwrap();
        fs::write(f.work.join("again1").join(TASK_FILE), "{\"leftover\": true, \"padding\": \"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\"}").unwrap();
        f.rt.launch(shell("again1", "sleep 1000")).await.unwrap();
        f.ev.started("again1").await;
        let record = record_of(&f, "again1");
        assert!(!record.launching);
        assert_eq!(comm_becomes(record.pid, "sleep").await, "sleep");
        f.rt.kill(&"again1".into(), Duration::ZERO).await.unwrap();
        f.ev.exited("again1").await;
    }

    #[test]
    fn a_completed_record_replaces_the_intent_whole() {
        let dir = tempfile::tempdir().unwrap();
        let mut record = TaskRecord {
            task_id: TaskId::from("t1"),
            pid: 0,
            pgid: 0,
            start_time: 0,
            labels: BTreeMap::from([("app".to_owned(), "/web".to_owned())]),
            ports: vec![31000],
            grace_ms: 5000,
            mem: 64.0,
            disk: 0.0,
            cgroup: None,
            freezer: Some(PathBuf::from("/sys/fs/cgroup/freezer/mesh-x/t1")),
            launched_at: 1,
            launching: true,
        };
        let intent = write_intent(dir.path(), &record).unwrap();
        assert!(intent.is_some());
        let read = || -> TaskRecord {
            serde_json::from_str(&fs::read_to_string(dir.path().join(TASK_FILE)).unwrap()).unwrap()
        };
        assert_eq!(read(), record);
        record.pid = 123456;
        record.pgid = 123456;
        record.start_time = 987654321;
        record.launching = false;
        complete_record(intent, dir.path(), &record).unwrap();
        assert_eq!(read(), record);
        // Shorter than the intent (cannot happen: pids only add digits): padded, still whole.
        let long = TaskRecord { labels: BTreeMap::from([("k".to_owned(), "v".repeat(100))]), ..record.clone() };
        fs::remove_file(dir.path().join(TASK_FILE)).unwrap();
        let intent = write_intent(dir.path(), &long).unwrap();
        complete_record(intent, dir.path(), &record).unwrap();
        assert_eq!(read(), record);
        // A record already there: replaced by rename, not in place.
        assert!(write_intent(dir.path(), &long).unwrap().is_none());
        assert_eq!(read(), long);
    }
}
