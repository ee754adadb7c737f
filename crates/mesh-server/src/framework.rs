//! Run a [`mesh_sdk::framework::Framework`] inside a mesh node, against its control loop, with no
//! HTTP in between: [`InProcess`] is a [`Transport`] over a [`ControlHandle`], so the same
//! framework code runs embedded or remote ([`mesh_sdk::framework::HttpTransport`]).
//!
//! ```no_run
//! # async fn demo(control: mesh_server::control::ControlHandle, fw: impl mesh_sdk::framework::Framework + 'static) {
//! use mesh_sdk::framework::{DriverOptions, FrameworkInfo};
//! let info = FrameworkInfo { name: "embedded".into(), ..Default::default() };
//! let handle = mesh_server::framework::spawn(control, info, fw, DriverOptions::default());
//! let (_fw, result) = handle.await.unwrap();
//! # }
//! ```

use crate::control::{ControlHandle, MesosError};
use futures_util::StreamExt;
use mesh_sdk::framework::{
    Call, Driver, DriverOptions, Framework, FrameworkError, FrameworkInfo, RunSummary, Subscription, Transport,
};

/// A [`Transport`] straight into a node's control loop.
#[derive(Clone)]
pub struct InProcess {
    control: ControlHandle,
}

impl InProcess {
    /// A transport over `control`.
    pub fn new(control: ControlHandle) -> Self {
        Self { control }
    }
}

fn to_framework_error(e: MesosError) -> FrameworkError {
    match e {
        MesosError::BadRequest(message) => FrameworkError::Rejected { status: 400, message },
        MesosError::Forbidden(message) => FrameworkError::Rejected { status: 403, message },
        other => FrameworkError::Connect(other.to_string()),
    }
}

#[async_trait::async_trait]
impl Transport for InProcess {
    async fn subscribe(&self, call: Call) -> Result<Subscription, FrameworkError> {
        let sub = self.control.mesos_subscribe(call).await.map_err(to_framework_error)?;
        let events =
            futures_util::stream::unfold(sub.events, |mut rx| async move { rx.recv().await.map(|e| (Ok(e), rx)) });
        Ok(Subscription { stream_id: sub.stream_id, events: events.boxed() })
    }

    async fn call(&self, stream_id: &str, call: Call) -> Result<(), FrameworkError> {
        self.control.mesos_call(call, Some(stream_id.to_owned())).await.map_err(to_framework_error)
    }
}

/// Run `framework` in-process on a task of its own until it is done; the task returns the
/// framework (with whatever it recorded) and the driver's result.
pub fn spawn<F: Framework + 'static>(
    control: ControlHandle,
    info: FrameworkInfo,
    mut framework: F,
    opts: DriverOptions,
) -> tokio::task::JoinHandle<(F, Result<RunSummary, FrameworkError>)> {
    tokio::spawn(async move {
        let res = Driver::new(InProcess::new(control), info).with_options(opts).run(&mut framework).await;
        (framework, res)
    })
}
