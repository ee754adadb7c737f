//! mesh-sdk: write frameworks for mesh, register services, resolve them.
//!
//! For now it re-exports the framework-side vocabulary of mesh-core: the
//! [`Scheduler`](mesh_core::scheduler::Scheduler) trait that the stock Marathon scheduler
//! implements, and the model types it speaks in.
//!
//! # Services: register, find, call; apps: deploy and scale
//!
//! Start from the examples (`cargo run -p mesh-sdk --example <name> -- --help`):
//!
//! - **`examples/echo-service`**: an HTTP service that registers itself with a TTL check
//!   ([`registry`]) and calls its peers through health-aware client-side load balancing
//!   ([`endpoints`]).
//! - **`examples/autoscaler`**: scales a Marathon app up and down, within bounds, by a metric the
//!   app serves over HTTP (e.g. a queue length), through the typed Marathon client
//!   ([`marathon`]).
//!
//! Modules:
//!
//! - [`registry`]: [`Registration::register`](registry::Registration::register) registers an
//!   instance with HTTP, TCP or TTL checks through the Consul agent API, keeps its TTL checks
//!   passing from a background task, and deregisters on
//!   [`shutdown`](registry::Registration::shutdown) or drop.
//! - [`endpoints`]: [`Endpoints::watch`](endpoints::Endpoints::watch) resolves a service to its
//!   healthy instances and keeps them current with blocking queries (no polling);
//!   [`pick`](endpoints::Endpoints::pick) balances by power-of-two-choices on requests in flight
//!   or round robin, ejects instances whose calls fail, and falls back to other datacenters when
//!   the local one has no healthy instance.
//! - [`marathon`]: a typed async client of the Marathon v2 API: apps, deployments, tasks, and the
//!   event stream as a `Stream` of typed events.
//! - [`consul`]: the small Consul HTTP client the two above share.
//!
//! ```no_run
//! # async fn f() -> Result<(), Box<dyn std::error::Error>> {
//! use mesh_sdk::consul::{Check, ConsulClient, ServiceRegistration};
//! use mesh_sdk::endpoints::{Endpoints, EndpointsOptions};
//! use mesh_sdk::registry::Registration;
//! use std::time::Duration;
//!
//! let consul = ConsulClient::new("127.0.0.1:8080")?; // mesh dev serves Consul's API on its HTTP port
//! let me = Registration::register(
//!     &consul,
//!     ServiceRegistration::new("echo", 7001).id("echo-1").address("127.0.0.1").check(Check::ttl(Duration::from_secs(3))),
//! )
//! .await?;
//! let peers = Endpoints::watch(&consul, "echo", EndpointsOptions::default()).await?;
//! if let Some(peer) = peers.pick_where(|i| i.id != "echo-1") {
//!     println!("calling http://{}/", peer.authority());
//!     peer.success();
//! }
//! me.shutdown().await?;
//! # Ok(()) }
//! ```

pub use mesh_core::model;
pub use mesh_core::scheduler;

pub mod consul;
pub mod endpoints;
pub mod framework;
pub mod marathon;
pub mod registry;
