//! A runtime that routes each task to one of several runtimes: container tasks to the
//! container runtime, plain commands to the process runtime.

use super::{RecoveredTask, Runtime, RuntimeError, TaskSpec};
use crate::model::TaskId;
use std::sync::Arc;
use std::time::Duration;

/// Routes tasks by kind: a spec with a container goes to `containers`, others to `processes`.
/// Kills go to whichever runtime runs the task.
pub struct MultiRuntime {
    processes: Arc<dyn Runtime>,
    containers: Option<Arc<dyn Runtime>>,
}

impl MultiRuntime {
    /// Combine a process runtime with an optional container runtime.
    pub fn new(processes: Arc<dyn Runtime>, containers: Option<Arc<dyn Runtime>>) -> Self {
        Self { processes, containers }
    }

    /// Names of the runtimes offered (`process`, and e.g. `docker`).
    pub fn runtimes(&self) -> Vec<String> {
        let mut v = vec![self.processes.name().to_owned()];
        if let Some(c) = &self.containers {
            v.push(c.name().to_owned());
        }
        v
    }

    fn all(&self) -> impl Iterator<Item = &Arc<dyn Runtime>> {
        std::iter::once(&self.processes).chain(self.containers.iter())
    }
}

#[async_trait::async_trait]
impl Runtime for MultiRuntime {
    fn name(&self) -> &'static str {
        "multi"
    }

    async fn launch(&self, spec: TaskSpec) -> Result<(), RuntimeError> {
        match (&spec.container, &self.containers) {
            (None, _) => self.processes.launch(spec).await,
            (Some(_), Some(c)) => c.launch(spec).await,
            (Some(_), None) => Err(RuntimeError::Launch {
                task: spec.task_id,
                message: "NoDockerRuntime: this agent has no container runtime".into(),
            }),
        }
    }

    async fn kill(&self, task_id: &TaskId, grace: Duration) -> Result<(), RuntimeError> {
        for rt in self.all() {
            if rt.is_running(task_id) {
                return rt.kill(task_id, grace).await;
            }
        }
        Ok(())
    }

    async fn recover(&self) -> Result<Vec<RecoveredTask>, RuntimeError> {
        let mut out = Vec::new();
        for rt in self.all() {
            out.extend(rt.recover().await?);
        }
        Ok(out)
    }

    fn running(&self) -> Vec<TaskId> {
        self.all().flat_map(|rt| rt.running()).collect()
    }

    fn is_running(&self, task_id: &TaskId) -> bool {
        self.all().any(|rt| rt.is_running(task_id))
    }

    async fn kill_all(&self, grace: Duration) {
        let p = self.processes.kill_all(grace);
        match &self.containers {
            Some(c) => {
                tokio::join!(p, c.kill_all(grace));
            }
            None => p.await,
        }
    }
}
