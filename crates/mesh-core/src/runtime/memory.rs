//! A runtime whose tasks run nowhere: a launch is `RUNNING` at once, a kill ends the task at
//! once. It exists to measure and test everything *around* tasks (control loop, scheduler,
//! catalog, DNS, state store) at sizes that real processes would not fit on one machine
//! (100,000 tasks), and for simulations. Nothing is executed, so no resource is isolated.
//!
//! Events keep their order per task (a kill right after a launch reports `Started` before
//! `Exited`): they go through one unbounded queue that a forwarding task drains into the
//! agent's channel, so `launch` and `kill` never wait for the agent to read its events.

use super::{Exit, RecoveredTask, Runtime, RuntimeError, RuntimeEvent, TaskSpec};
use crate::model::{Clock, TaskId};
use std::collections::BTreeSet;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::mpsc;

/// Tasks that only exist in memory. See the module documentation.
pub struct MemoryRuntime {
    tasks: Mutex<BTreeSet<TaskId>>,
    queue: mpsc::UnboundedSender<Queued>,
    clock: std::sync::Arc<dyn Clock>,
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
        Self { tasks: Mutex::new(BTreeSet::new()), queue, clock }
    }

    fn lock(&self) -> MutexGuard<'_, BTreeSet<TaskId>> {
        self.tasks.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn exited(&self, task_id: TaskId) {
        let message = "killed (memory runtime)".to_owned();
        let at = self.clock.now();
        let _ = self.queue.send(Queued::Event(RuntimeEvent::Exited {
            task_id,
            exit: Exit::Signal(15),
            killed: true,
            message,
            at,
        }));
    }
}

#[async_trait::async_trait]
impl Runtime for MemoryRuntime {
    fn name(&self) -> &'static str {
        "memory"
    }

    async fn launch(&self, spec: TaskSpec) -> Result<(), RuntimeError> {
        if !self.lock().insert(spec.task_id.clone()) {
            return Err(RuntimeError::Launch {
                task: spec.task_id,
                message: "a task with this id is already running".into(),
            });
        }
        let _ = self.queue.send(Queued::Event(RuntimeEvent::Started { task_id: spec.task_id, at: self.clock.now() }));
        Ok(())
    }

    async fn kill(&self, task_id: &TaskId, _grace: Duration) -> Result<(), RuntimeError> {
        if self.lock().remove(task_id) {
            self.exited(task_id.clone());
        }
        Ok(())
    }

    async fn recover(&self) -> Result<Vec<RecoveredTask>, RuntimeError> {
        // Nothing survives the process: tasks of a previous run are reported lost.
        Ok(Vec::new())
    }

    fn running(&self) -> Vec<TaskId> {
        self.lock().iter().cloned().collect()
    }

    fn is_running(&self, task_id: &TaskId) -> bool {
        self.lock().contains(task_id)
    }

    async fn kill_all(&self, _grace: Duration) {
        let all: Vec<TaskId> = std::mem::take(&mut *self.lock()).into_iter().collect();
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
        TaskSpec {
            task_id: TaskId(id.into()),
            command: Command::Shell("true".into()),
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
}
