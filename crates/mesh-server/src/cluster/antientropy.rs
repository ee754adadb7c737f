//! Consul's anti-entropy for an agent's own registrations: services and checks registered
//! through an agent's `/v1/agent/service|check/register` belong to that agent. It keeps them
//! (on disk) and registers them again whenever the catalog it replicates lacks them: after the
//! server lost them, after a reconnect, or after someone deregistered them through the catalog
//! while the agent still has them (which therefore does not stick, as in Consul). Deregistering
//! through the agent ends that.

use super::replica::ReplicaStatus;
use crate::control::Published;
use crate::rpc::msg::HttpRequest;
use crate::rpc::{Request, Response};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tracing::{info, warn};

/// How often the agent compares its registrations with the catalog.
pub const SYNC_EVERY: Duration = Duration::from_secs(5);

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Saved {
    /// Service id → the register request's body.
    services: BTreeMap<String, String>,
    /// Check id → the register request's body.
    checks: BTreeMap<String, String>,
}

/// An agent's own registrations.
pub struct Registrations {
    path: PathBuf,
    saved: Mutex<Saved>,
}

impl Registrations {
    /// Load what an earlier run kept at `path` (nothing if absent or unreadable).
    pub fn open(path: PathBuf) -> Registrations {
        let saved = std::fs::read(&path).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
        Registrations { path, saved: Mutex::new(saved) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Saved> {
        self.saved.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn save(&self, saved: &Saved) {
        let tmp = self.path.with_extension("tmp");
        let r = serde_json::to_vec(saved)
            .map_err(std::io::Error::other)
            .and_then(|b| std::fs::write(&tmp, b))
            .and_then(|()| std::fs::rename(&tmp, &self.path));
        if let Err(e) = r {
            warn!(error = %e, "anti-entropy: cannot keep the agent's registrations on disk");
        }
    }

    /// A forwarded request succeeded: remember or forget what it registered.
    pub fn observe(&self, method: &str, path: &str, body: &[u8]) {
        if method != "PUT" {
            return;
        }
        let id_of = |body: &[u8]| -> Option<String> {
            let v: serde_json::Value = serde_json::from_slice(body).ok()?;
            let get =
                |k: &str| v.get(k).or_else(|| v.get(k.to_lowercase())).and_then(|x| x.as_str()).map(str::to_owned);
            get("ID").filter(|s| !s.is_empty()).or_else(|| get("Name"))
        };
        let mut saved = self.lock();
        let changed = match path {
            "/v1/agent/service/register" => {
                id_of(body).map(|id| saved.services.insert(id, String::from_utf8_lossy(body).into_owned())).is_some()
            }
            "/v1/agent/check/register" => {
                id_of(body).map(|id| saved.checks.insert(id, String::from_utf8_lossy(body).into_owned())).is_some()
            }
            p => {
                if let Some(id) = p.strip_prefix("/v1/agent/service/deregister/") {
                    saved.services.remove(id).is_some()
                } else if let Some(id) = p.strip_prefix("/v1/agent/check/deregister/") {
                    saved.checks.remove(id).is_some()
                } else {
                    false
                }
            }
        };
        if changed {
            let copy = saved.clone();
            drop(saved);
            self.save(&copy);
        }
    }

    /// Register again whatever the replicated catalog lacks, through the server.
    pub async fn sync(&self, node: &str, published: &Published, link: &super::Link) {
        let Some(conn) = link.borrow().clone().filter(|c| !c.is_closed()) else { return };
        let saved = self.lock().clone();
        let state = published.state.load_full();
        let mut missing = Vec::new();
        for (id, body) in &saved.services {
            if state.catalog.instance(node, id).is_none() {
                missing.push(("/v1/agent/service/register", id, body));
            }
        }
        for (id, body) in &saved.checks {
            if !state.catalog.node_checks(node).any(|c| c.id == *id) {
                missing.push(("/v1/agent/check/register", id, body));
            }
        }
        for (path, id, body) in missing {
            // Deregistered through the agent meanwhile: not ours any more.
            let still = {
                let now = self.lock();
                if path.contains("/service/") { now.services.contains_key(id) } else { now.checks.contains_key(id) }
            };
            if !still {
                continue;
            }

            let req = HttpRequest {
                method: "PUT".into(),
                uri: path.into(),
                headers: vec![("content-type".into(), "application/json".into())],
                body: body.clone().into_bytes(),
                node: node.to_owned(),
            };
            match conn.call(Request::Http(req), Duration::from_secs(10)).await {
                Ok(Response::Http(r)) if r.status == 200 => info!(id, "anti-entropy: registered again"),
                Ok(Response::Http(r)) => {
                    warn!(id, status = r.status, body = %String::from_utf8_lossy(&r.body), "anti-entropy: registering again refused")
                }
                Ok(_) => {}
                Err(e) => warn!(id, error = %e, "anti-entropy: cannot register again yet"),
            }
        }
    }
}

/// Keep the agent's registrations in the catalog: every [`SYNC_EVERY`] and whenever the replica
/// (re)connects or the catalog changes.
pub fn spawn(
    regs: Arc<Registrations>,
    node: String,
    published: Published,
    link: super::Link,
    status: Arc<ReplicaStatus>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut index = published.index.clone();
        let mut tick = tokio::time::interval(SYNC_EVERY);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                r = index.changed() => if r.is_err() { return },
            }
            if status.connected() {
                regs.sync(&node, &published, &link).await;
            }
        }
    })
}
