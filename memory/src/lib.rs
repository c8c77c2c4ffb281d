//! heliotrope's memory migration engine: moves a running guest's RAM and vCPU state with the
//! shortest downtime the link allows.
//!
//! - [`guest`]: the [`Guest`] abstraction the engine migrates (memory, dirty log, pause,
//!   resume, vCPU state), with two backends: [`kvm`] (a micro-VM on /dev/kvm running a
//!   built-in workload program) and [`synthetic`] (a writer thread). The `guest` module docs say
//!   how a real VMM (Cloud Hypervisor, QEMU) would plug in.
//! - [`workload`]: what the guest does (fill mix, dirty rate, hot set) and its pacing.
//! - [`region`] and [`page`]: guest RAM (vm-memory) and page sets.
//! - [`engine`]: pre-copy rounds with d/r convergence, hot pages held for the stop-and-copy,
//!   divergence policies, warm and post-copy migration, and the destination side.
//! - [`wire`]: page batches (zero markers, references to content the destination holds, zstd).
//! - [`model`]: the d/r model `helio memory model` prints and the engine predicts with.
//! - [`uffd`]: userfaultfd for post-copy.
//!
//! All `unsafe` lives in two small modules, each block with a `SAFETY` comment: [`uffd`]
//! (userfaultfd ioctls, `madvise`, `poll`) and `kvm::slot` (handing KVM the memory mapping).

mod control;
pub mod engine;
pub mod guest;
pub mod kvm;
pub mod model;
pub mod page;
pub mod region;
pub mod synthetic;
pub mod uffd;
pub mod wire;
pub mod workload;

pub use guest::{kvm_available, Backend, Guest, GuestError};
pub use workload::Workload;
