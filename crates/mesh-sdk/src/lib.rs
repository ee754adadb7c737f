//! mesh-sdk: write frameworks for mesh, register services, resolve them.
//!
//! For now it re-exports the framework-side vocabulary of mesh-core: the
//! [`Scheduler`](mesh_core::scheduler::Scheduler) trait that the stock Marathon scheduler
//! implements, and the model types it speaks in.

pub use mesh_core::model;
pub use mesh_core::scheduler;

pub mod framework;
