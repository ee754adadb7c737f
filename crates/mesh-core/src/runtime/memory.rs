//! A runtime whose tasks run nowhere: a launch is `RUNNING` at once, a kill ends the task at
//! once. It exists to measure and test everything *around* tasks (control loop, scheduler,
//! catalog, DNS, state store) at sizes that real processes would not fit on one machine
//! (100,000 tasks), and for simulations. Nothing is executed, so no resource is isolated.
//!
//! A task's shell command says how it behaves, in the words a shell would run the same way:
//! - `exit N`: ends at once with code `N`; `sleep S; exit N` (or `&&`): after `S` seconds;
//!   `sleep S` alone: ends with code 0 after `S` seconds;
//! - `trap '' TERM; …`: ignores SIGTERM, so a kill ends it only after its grace period (as
//!   SIGKILL, signal 9), and `trap '' TERM; sleep infinity` hangs until then;
//! - anything else runs until it is killed.
//!
//! Tests make tasks fail on command: [`MemoryRuntime::fail`] ends a running task with a code,
//! [`MemoryRuntime::fail_launches`] makes the next launches fail. Timers are tokio's, so a
//! simulation's virtual time drives them.
//!
//! Events keep their order per task (a kill right after a launch reports `Started` before
//! `Exited`): they go through one unbounded queue that a forwarding task drains into the
//! agent's channel, so `launch` and `kill` never wait for the agent to read its events.

use super::{Exit, RecoveredTask, Runtime, RuntimeError, RuntimeEvent, TaskSpec};
use crate::model::{Clock, TaskId};
use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::mpsc;

/// Tasks that only exist in memory. See the module documentation.
pub struct MemoryRuntime {
    /// Running tasks, and whether each ignores SIGTERM.
    tasks: std::sync::Arc<Mutex<BTreeMap<TaskId, Behaviour>>>,
    queue: mpsc::UnboundedSender<Queued>,
    clock: std::sync::Arc<dyn Clock>,
    /// Launches still to fail ([`MemoryRuntime::fail_launches`]).
    failing_launches: std::sync::atomic::AtomicU32,
}

/// How a task behaves, read from its command (see the module documentation).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct Behaviour {
    /// Ends by itself after this long, with this code.
    exits: Option<(Duration, i32)>,
    /// A kill ends it only after the grace period.
    ignores_term: bool,
}

impl Behaviour {
    fn of(spec: &TaskSpec) -> Behaviour {
        let super::Command::Shell(cmd) = &spec.command else { return Behaviour::default() };
        let mut b = Behaviour::default();
        let mut rest = cmd.trim();
        for prefix in ["trap '' TERM;", "trap \"\" TERM;", "trap '' TERM &&"] {
            if let Some(r) = rest.strip_prefix(prefix) {
                b.ignores_term = true;
                rest = r.trim();
            }
        }
        let parts: Vec<&str> =
            rest.split([';']).flat_map(|p| p.split("&&")).map(str::trim).filter(|p| !p.is_empty()).collect();
        let sleep = |p: &str| {
            p.strip_prefix("sleep ").and_then(|s| s.trim().parse::<f64>().ok()).filter(|s| s.is_finite() && *s >= 0.0)
        };
        let exit = |p: &str| {
            p.strip_prefix("exit")
                .and_then(|c| if c.trim().is_empty() { Some(0) } else { c.trim().parse::<i32>().ok() })
        };
        b.exits = match parts.as_slice() {
            [p] => exit(p).map(|c| (Duration::ZERO, c)).or_else(|| sleep(p).map(|s| (Duration::from_secs_f64(s), 0))),
            [s, e] => sleep(s).zip(exit(e)).map(|(s, c)| (Duration::from_secs_f64(s), c)),
            _ => None,
        };
        b
    }
}

/// What the forwarding task carries: events, and markers that report when everything queued
/// before them has reached the agent.
enum Queued {
    Event(RuntimeEvent),
    Delivered(tokio::sync::oneshot::Sender<()>),
}

impl MemoryRuntime {
    /// A runtime reporting to `events`. Must be called inside a tokio runtime (it spawns the
    /// task that forwards events).
    pub fn new(events: mpsc::Sender<RuntimeEvent>) -> Self {
        Self::with_clock(events, crate::model::system_clock())
    }

    /// [`MemoryRuntime::new`] with events dated by `clock` (a simulation's).
    pub fn with_clock(events: mpsc::Sender<RuntimeEvent>, clock: std::sync::Arc<dyn Clock>) -> Self {
        let (queue, mut rx) = mpsc::unbounded_channel::<Queued>();
        tokio::spawn(async move {
            while let Some(q) = rx.recv().await {
                match q {
                    Queued::Event(ev) => {
                        if events.send(ev).await.is_err() {
                            break;
                        }
                    }
                    Queued::Delivered(done) => {
                        let _ = done.send(());
                    }
                }
            }
        });
        Self { tasks: std::sync::Arc::default(), queue, clock, failing_launches: std::sync::atomic::AtomicU32::new(0) }
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<TaskId, Behaviour>> {
        lock(&self.tasks)
    }

    fn exited(&self, task_id: TaskId) {
        ended(&self.queue, self.clock.as_ref(), task_id, Exit::Signal(15), true, "killed (memory runtime)".into());
    }

    /// End the running task `task_id` now with `code`, as if it had failed by itself; false if
    /// it is not running.
    pub fn fail(&self, task_id: &TaskId, code: i32) -> bool {
        if self.lock().remove(task_id).is_none() {
            return false;
        }
        let message = format!("exited with code {code} (memory runtime, made to fail)");
        ended(&self.queue, self.clock.as_ref(), task_id.clone(), Exit::Code(code), false, message);
        true
    }

    /// Make the next `n` launches fail (as a runtime that cannot start a task).
    pub fn fail_launches(&self, n: u32) {
        self.failing_launches.store(n, std::sync::atomic::Ordering::SeqCst);
    }

    /// After `after`, end `task_id` with `exit` if it still runs (its own exit, or the end of a
    /// kill's grace period).
    fn end_later(&self, task_id: TaskId, after: Duration, exit: Exit, killed: bool, message: String) {
        let (tasks, queue, clock) = (self.tasks.clone(), self.queue.clone(), self.clock.clone());
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            if lock(&tasks).remove(&task_id).is_some() {
                ended(&queue, clock.as_ref(), task_id, exit, killed, message);
            }
        });
    }
}

fn lock(tasks: &Mutex<BTreeMap<TaskId, Behaviour>>) -> MutexGuard<'_, BTreeMap<TaskId, Behaviour>> {
    tasks.lock().unwrap_or_else(|e| e.into_inner())
}

fn ended(
    queue: &mpsc::UnboundedSender<Queued>,
    clock: &dyn Clock,
    task_id: TaskId,
    exit: Exit,
    killed: bool,
    message: String,
) {
    let at = clock.now();
    let _ = queue.send(Queued::Event(RuntimeEvent::Exited { task_id, exit, killed, message, at }));
}

#[async_trait::async_trait]
impl Runtime for MemoryRuntime {
    fn name(&self) -> &'static str {
        "memory"
    }

    async fn launch(&self, spec: TaskSpec) -> Result<(), RuntimeError> {
        let failing = self.failing_launches.fetch_update(
            std::sync::atomic::Ordering::SeqCst,
            std::sync::atomic::Ordering::SeqCst,
            |n| n.checked_sub(1),
        );
        if failing.is_ok() {
            return Err(RuntimeError::Launch {
                task: spec.task_id,
                message: "cannot start (memory runtime, made to fail)".into(),
            });
        }
        let behaviour = Behaviour::of(&spec);
        {
            let mut tasks = self.lock();
            if tasks.contains_key(&spec.task_id) {
                return Err(RuntimeError::Launch {
                    task: spec.task_id,
                    message: "a task with this id is already running".into(),
                });
            }
            tasks.insert(spec.task_id.clone(), behaviour);
        }
        let task_id = spec.task_id;
        let _ =
            self.queue.send(Queued::Event(RuntimeEvent::Started { task_id: task_id.clone(), at: self.clock.now() }));
        if let Some((after, code)) = behaviour.exits {
            let message = format!("exited with code {code} (memory runtime)");
            if after.is_zero() {
                lock(&self.tasks).remove(&task_id);
                ended(&self.queue, self.clock.as_ref(), task_id, Exit::Code(code), false, message);
            } else {
                self.end_later(task_id, after, Exit::Code(code), false, message);
            }
        }
        Ok(())
    }

    async fn kill(&self, task_id: &TaskId, grace: Duration) -> Result<(), RuntimeError> {
        let behaviour = self.lock().get(task_id).copied();
        match behaviour {
            None => {}
            // SIGTERM is ignored: SIGKILL at the end of the grace period.
            Some(b) if b.ignores_term => self.end_later(
                task_id.clone(),
                grace,
                Exit::Signal(9),
                true,
                "killed after its grace period (memory runtime)".into(),
            ),
            Some(_) if self.lock().remove(task_id).is_some() => self.exited(task_id.clone()),
            Some(_) => {}
        }
        Ok(())
    }

    async fn recover(&self) -> Result<Vec<RecoveredTask>, RuntimeError> {
        // Nothing survives the process: tasks of a previous run are reported lost.
        Ok(Vec::new())
    }

    fn running(&self) -> Vec<TaskId> {
        self.lock().keys().cloned().collect()
    }

    fn is_running(&self, task_id: &TaskId) -> bool {
        self.lock().contains_key(task_id)
    }

    async fn kill_all(&self, _grace: Duration) {
        let all: Vec<TaskId> = std::mem::take(&mut *self.lock()).into_keys().collect();
        for id in all {
            self.exited(id);
        }
        // Like the other runtimes, return once every end has been reported.
        let (done, delivered) = tokio::sync::oneshot::channel();
        let _ = self.queue.send(Queued::Delivered(done));
        let _ = delivered.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::Command;
    use std::collections::BTreeMap;

    fn spec(id: &str) -> TaskSpec {
        with_cmd(id, "true")
    }

    fn with_cmd(id: &str, cmd: &str) -> TaskSpec {
        TaskSpec {
            task_id: TaskId(id.into()),
            command: Command::Shell(cmd.into()),
            env: BTreeMap::new(),
            cpus: 0.1,
            mem: 1.0,
            disk: 0.0,
            ports: vec![],
            kill_grace: Duration::from_secs(3),
            labels: BTreeMap::new(),
            container: None,
        }
    }

    #[tokio::test]
    async fn launch_runs_kill_ends_in_order() {
        // Room for every event of the test: `kill_all` returns only once its events are taken
        // by the channel.
        let (tx, mut rx) = mpsc::channel(256);
        let rt = MemoryRuntime::new(tx);
        for i in 0..100 {
            rt.launch(spec(&format!("t{i}"))).await.unwrap();
        }
        assert!(rt.launch(spec("t0")).await.is_err(), "a second launch of a running id is refused");
        rt.kill(&TaskId("t0".into()), Duration::ZERO).await.unwrap();
        assert_eq!(rt.running().len(), 99);
        assert!(!rt.is_running(&TaskId("t0".into())));
        let mut seen = Vec::new();
        while seen.len() < 101 {
            seen.push(rx.recv().await.unwrap());
        }
        assert!(matches!(&seen[0], RuntimeEvent::Started { task_id, .. } if task_id.0 == "t0"));
        assert!(matches!(&seen[100], RuntimeEvent::Exited { task_id, killed: true, .. } if task_id.0 == "t0"));
        rt.kill_all(Duration::ZERO).await;
        assert!(rt.running().is_empty());
        for _ in 0..99 {
            assert!(
                matches!(rx.try_recv(), Ok(RuntimeEvent::Exited { killed: true, .. })),
                "reported before kill_all returned"
            );
        }
    }

    async fn next(rx: &mut mpsc::Receiver<RuntimeEvent>) -> RuntimeEvent {
        rx.recv().await.expect("an event")
    }

    fn exit_of(e: &RuntimeEvent) -> Option<(Exit, bool)> {
        match e {
            RuntimeEvent::Exited { exit, killed, .. } => Some((exit.clone(), *killed)),
            _ => None,
        }
    }

    /// Commands behave as a shell would run them, on tokio's (here paused) clock.
    #[tokio::test(start_paused = true)]
    async fn commands_exit_hang_and_ignore_sigterm_as_a_shell_would() {
        let (tx, mut rx) = mpsc::channel(64);
        let rt = MemoryRuntime::new(tx);
        rt.launch(with_cmd("now", "exit 3")).await.unwrap();
        assert!(matches!(next(&mut rx).await, RuntimeEvent::Started { .. }));
        assert_eq!(exit_of(&next(&mut rx).await), Some((Exit::Code(3), false)));
        assert!(!rt.is_running(&TaskId("now".into())));

        let started = tokio::time::Instant::now();
        rt.launch(with_cmd("later", "sleep 2; exit 1")).await.unwrap();
        assert!(matches!(next(&mut rx).await, RuntimeEvent::Started { .. }));
        assert!(rt.is_running(&TaskId("later".into())));
        assert_eq!(exit_of(&next(&mut rx).await), Some((Exit::Code(1), false)));
        assert_eq!(started.elapsed(), Duration::from_secs(2));

        // Ignores SIGTERM: the kill ends it after the grace period, as SIGKILL.
        rt.launch(with_cmd("stubborn", "trap '' TERM; sleep infinity")).await.unwrap();
        assert!(matches!(next(&mut rx).await, RuntimeEvent::Started { .. }));
        let killed_at = tokio::time::Instant::now();
        rt.kill(&TaskId("stubborn".into()), Duration::from_secs(5)).await.unwrap();
        assert!(rt.is_running(&TaskId("stubborn".into())), "still running during its grace period");
        assert_eq!(exit_of(&next(&mut rx).await), Some((Exit::Signal(9), true)));
        assert_eq!(killed_at.elapsed(), Duration::from_secs(5));

        // An ordinary command runs until killed, and ends at once with SIGTERM.
        rt.launch(with_cmd("plain", "python3 -m http.server $PORT0")).await.unwrap();
        assert!(matches!(next(&mut rx).await, RuntimeEvent::Started { .. }));
        rt.kill(&TaskId("plain".into()), Duration::from_secs(5)).await.unwrap();
        assert_eq!(exit_of(&next(&mut rx).await), Some((Exit::Signal(15), true)));
    }

    /// Tests make tasks fail: a running one with a code, and the next launches.
    #[tokio::test]
    async fn tasks_and_launches_fail_on_command() {
        let (tx, mut rx) = mpsc::channel(64);
        let rt = MemoryRuntime::new(tx);
        rt.launch(spec("a")).await.unwrap();
        assert!(matches!(next(&mut rx).await, RuntimeEvent::Started { .. }));
        assert!(rt.fail(&TaskId("a".into()), 137));
        assert_eq!(exit_of(&next(&mut rx).await), Some((Exit::Code(137), false)));
        assert!(!rt.fail(&TaskId("a".into()), 1), "no longer running");
        rt.fail_launches(2);
        assert!(rt.launch(spec("b")).await.is_err());
        assert!(rt.launch(spec("c")).await.is_err());
        rt.launch(spec("d")).await.unwrap();
        assert!(rt.running() == vec![TaskId("d".into())]);
    }
}
