//! The heliotrope agent: one long-running process per host that holds every role.
//!
//! It owns the host's disks (served to peers over the replication protocol and to its VMs over
//! tracking NBD exports), its destination store, its QEMU VMs, and the jobs that move disks
//! between agents; and it exposes all of them through a control API.
//!
//! - [`agent`]: starting an agent and its roles; [`config`]: the TOML config file.
//! - [`state`]: the RocksDB state database; [`events`]: the event log.
//! - [`disks`], [`vm`], [`jobs`]: the resources; [`migrate`]: moving a VM to a peer agent.
//! - [`api`]: the HTTP API (axum), its OpenAPI document, roles and errors; [`metrics`].
//! - [`model`]: the resources' types as the API shows them.

pub mod agent;
pub mod api;
pub mod client;
pub mod config;
pub mod disks;
pub mod error;
pub mod events;
pub mod guest;
pub mod jobs;
pub mod metrics;
pub mod migrate;
pub mod model;
pub mod observed;
pub mod state;
pub mod vm;

pub use agent::{Agent, Options};
pub use error::AgentError;
