//! Register this process as a service instance, keep its TTL checks alive, deregister on the way
//! out.
//!
//! [`Registration::register`] registers the instance and its checks through the agent API
//! (`PUT /v1/agent/service/register`). For every TTL check, a background task reports the
//! instance's status (`PUT /v1/agent/check/pass/<check-id>`) at a third of the TTL, so the check
//! stays passing while the process is alive and turns critical about one TTL after it dies. The
//! task re-registers the instance if the agent has forgotten it (a check update answered 404,
//! e.g. after `DeregisterCriticalServiceAfter` reaped it). [`Registration::shutdown`]
//! deregisters; dropping the `Registration` does the same from a spawned task, best effort.
//!
//! ```no_run
//! # async fn f() -> Result<(), mesh_sdk::consul::ConsulError> {
//! use mesh_sdk::consul::{Check, ConsulClient, ServiceRegistration};
//! use mesh_sdk::registry::Registration;
//! use std::time::Duration;
//!
//! let consul = ConsulClient::new("127.0.0.1:8500")?;
//! let reg = Registration::register(
//!     &consul,
//!     ServiceRegistration::new("echo", 7000).id("echo-7000").address("127.0.0.1")
//!         .check(Check::ttl(Duration::from_secs(3)).deregister_critical_after(Duration::from_secs(60))),
//! ).await?;
//! // ... serve ...
//! reg.shutdown().await?; // deregister
//! # Ok(()) }
//! ```

use crate::consul::{CheckStatus, ConsulClient, ConsulError, ServiceRegistration};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// A registered service instance. Deregistered by [`shutdown`](Self::shutdown), or on drop.
#[derive(Debug)]
pub struct Registration {
    consul: ConsulClient,
    service_id: String,
    ttl_checks: Vec<String>,
    status: watch::Sender<(CheckStatus, Option<String>)>,
    keeper: Option<JoinHandle<()>>,
    done: bool,
}

impl Registration {
    /// Register `service` with the agent and start keeping its TTL checks alive.
    ///
    /// TTL checks start passing (unless the check sets another `Status`), so the instance is
    /// healthy as soon as this returns.
    pub async fn register(
        consul: &ConsulClient,
        mut service: ServiceRegistration,
    ) -> Result<Registration, ConsulError> {
        for c in service.checks.iter_mut().filter(|c| c.ttl.is_some() && c.status.is_none()) {
            c.status = Some(CheckStatus::Passing);
        }
        consul.register_service(&service).await?;
        let service_id = service.service_id().to_owned();
        let ids = service.check_ids();
        let ttls: Vec<(String, Duration)> =
            service.checks.iter().zip(ids).filter_map(|(c, id)| c.ttl_duration().map(|ttl| (id, ttl))).collect();
        let (status, rx) = watch::channel((CheckStatus::Passing, None));
        let keeper = match ttls.iter().map(|(_, ttl)| *ttl).min() {
            Some(min_ttl) => {
                let period = (min_ttl / 3).max(Duration::from_millis(50));
                let ids: Vec<String> = ttls.iter().map(|(id, _)| id.clone()).collect();
                Some(tokio::spawn(keep_alive(consul.clone(), Arc::new(service), ids, period, rx)))
            }
            None => None,
        };
        tracing::info!(service_id, "registered");
        Ok(Registration {
            consul: consul.clone(),
            service_id,
            ttl_checks: ttls.into_iter().map(|(id, _)| id).collect(),
            status,
            keeper,
            done: false,
        })
    }

    /// The instance id.
    pub fn service_id(&self) -> &str {
        &self.service_id
    }

    /// The ids of the TTL checks kept alive.
    pub fn ttl_check_ids(&self) -> &[String] {
        &self.ttl_checks
    }

    /// Report a status through the TTL checks from now on (e.g. critical while draining, so
    /// clients stop picking this instance before it goes away). Sent at once, then on every
    /// heartbeat.
    pub async fn set_status(&self, status: CheckStatus, note: Option<&str>) -> Result<(), ConsulError> {
        self.status.send_replace((status, note.map(str::to_owned)));
        for id in &self.ttl_checks {
            self.consul.update_ttl(id, status, note).await?;
        }
        Ok(())
    }

    /// Stop the heartbeat and deregister the instance.
    pub async fn shutdown(mut self) -> Result<(), ConsulError> {
        self.done = true;
        if let Some(k) = self.keeper.take() {
            k.abort();
        }
        let r = self.consul.deregister_service(&self.service_id).await;
        tracing::info!(service_id = self.service_id, ok = r.is_ok(), "deregistered");
        r
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some(k) = self.keeper.take() {
            k.abort();
        }
        if self.done {
            return;
        }
        // Best effort: needs a runtime that lives on long enough to send the request.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let consul = self.consul.clone();
            let id = std::mem::take(&mut self.service_id);
            rt.spawn(async move {
                if let Err(e) = consul.deregister_service(&id).await {
                    tracing::warn!(service_id = id, error = %e, "deregister on drop failed");
                }
            });
        }
    }
}

/// Report the current status on every TTL check each `period`; re-register when the agent no
/// longer knows a check.
async fn keep_alive(
    consul: ConsulClient,
    service: Arc<ServiceRegistration>,
    checks: Vec<String>,
    period: Duration,
    status: watch::Receiver<(CheckStatus, Option<String>)>,
) {
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let (st, note) = status.borrow().clone();
        for id in &checks {
            match consul.update_ttl(id, st, note.as_deref()).await {
                Ok(()) => {}
                Err(e) if e.status() == Some(404) => {
                    tracing::warn!(check = id, "agent lost the check; registering again");
                    let mut again = (*service).clone();
                    for c in again.checks.iter_mut().filter(|c| c.ttl.is_some()) {
                        c.status = Some(st);
                    }
                    if let Err(e) = consul.register_service(&again).await {
                        tracing::warn!(error = %e, "re-register failed");
                    }
                    break;
                }
                Err(e) => tracing::warn!(check = id, error = %e, "TTL update failed"),
            }
        }
    }
}
