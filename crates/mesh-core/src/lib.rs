//! mesh-core: the policy cores of mesh, written as sans-IO state machines where they decide
//! anything, plus the runtimes that touch processes.
//!
//! Module map (start with [`state`]):
//! - [`model`]: ids, resources (scalars and port ranges), timestamps.
//! - [`app`]: the Marathon app definition, its validation and service-name mapping.
//! - [`state`]: [`state::Command`], the pure [`state::State`] machine, the [`state::Log`] trait and the redb log.
//! - [`allocator`]: Mesos-style offers ordered by weighted DRF, filters, suppress/revive, quota.
//! - [`mesos`]: the Mesos v1 scheduler API on the wire (calls, events, RecordIO).
//! - [`frameworks`]: Mesos-API frameworks in the state, and their subscriptions' timers.
//! - [`scheduler`]: the [`scheduler::Scheduler`] trait (framework side) and the Marathon app scheduler.
//! - [`catalog`]: nodes, services, instances and their health, behind the [`catalog::Catalog`] trait.
//! - [`kv`]: Consul's key/value store and sessions (locks, TTLs, lock-delay), pure.
//! - [`dns`]: Consul-style name parsing and answer building, as plain functions.
//! - [`runtime`]: the [`runtime::Runtime`] trait and the process runtime.
//! - [`proto`]: the serializable messages between control and agents.
//! - [`registrator`]: service instances for hand-started Docker containers (Registrator's conventions).

pub mod allocator;
pub mod app;
pub mod catalog;
pub mod coordinate;
pub mod dns;
pub mod frameworks;
pub mod health;
pub mod kv;
pub mod mesos;
pub mod model;
pub mod proto;
pub mod registrator;
pub mod runtime;
pub mod scheduler;
pub mod state;
