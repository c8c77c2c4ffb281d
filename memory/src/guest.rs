//! The guest a migration moves, as the engine sees it: memory it can read and write, a dirty
//! log, pause and resume, and an opaque vCPU state.
//!
//! Two backends implement [`Guest`]: [`crate::kvm`] (a real micro-VM) and [`crate::synthetic`]
//! (a writer thread). An adapter for a real VMM would implement the same trait over the VMM's
//! own interfaces: for Cloud Hypervisor, memory from its `memory_manager` mappings (shared with
//! the VMM through a memfd), the dirty log from its `dirty_log` HTTP API and vCPU state from a
//! snapshot; for QEMU, a QMP client (`stop`/`cont`, `query-dirty-rate`, dirty bitmaps) with
//! memory shared through a `memory-backend-memfd`. Nothing in the engine depends on how the
//! guest runs.

use crate::page::PageSet;
use crate::region::Memory;
use crate::workload::{Workload, WorkloadError, STATUS_ADDR};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

/// Which guest implementation to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// A micro-VM on /dev/kvm.
    Kvm,
    /// A writer thread over plain memory.
    Synthetic,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backend::Kvm => "kvm",
            Backend::Synthetic => "synthetic",
        })
    }
}

impl FromStr for Backend {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "kvm" => Ok(Backend::Kvm),
            "synthetic" => Ok(Backend::Synthetic),
            _ => Err(format!("unknown backend {s:?}: use kvm or synthetic")),
        }
    }
}

/// A guest operation failed.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    /// The workload cannot run.
    #[error(transparent)]
    Workload(#[from] WorkloadError),
    /// Guest memory failed.
    #[error(transparent)]
    Memory(#[from] crate::region::MemoryError),
    /// /dev/kvm is missing or refused us.
    #[error("KVM is not available: {0} (use --backend synthetic on machines without /dev/kvm)")]
    NoKvm(String),
    /// A KVM ioctl failed.
    #[error("KVM {op} failed: {detail}")]
    Kvm {
        /// The operation.
        op: &'static str,
        /// The error.
        detail: String,
    },
    /// The guest stopped running by itself (a crash, an unexpected exit).
    #[error("the guest stopped: {0}")]
    Stopped(String),
    /// A vCPU state that does not fit this backend.
    #[error("vCPU state does not load: {0}")]
    BadState(String),
}

/// A guest being migrated: at the source it runs and is read; at the destination it is written
/// and then resumed.
pub trait Guest: Send {
    /// The guest's RAM.
    fn memory(&self) -> &Arc<Memory>;
    /// Starts tracking the guest's writes; the dirty set starts empty.
    fn start_dirty_log(&mut self) -> Result<(), GuestError>;
    /// Pages written (by the guest or the host) since the last call, clearing the set.
    fn take_dirty(&mut self) -> Result<PageSet, GuestError>;
    /// Stops the guest; returns once it no longer writes memory.
    fn pause(&mut self) -> Result<(), GuestError>;
    /// Runs the guest (again).
    fn resume(&mut self) -> Result<(), GuestError>;
    /// The paused guest's vCPU state.
    fn vcpu_state(&self) -> Result<Vec<u8>, GuestError>;
    /// Loads a vCPU state taken at the source (destination side, before `resume`).
    fn load_vcpu_state(&mut self, state: &[u8]) -> Result<(), GuestError>;
    /// Slows the guest's writes by this fraction (auto-converge).
    fn set_throttle(&mut self, fraction: f64);
    /// Whether the guest is running (not paused, not stopped).
    fn is_running(&self) -> bool;
    /// The guest's running write counter, from its status page.
    fn counter(&self) -> u64 {
        self.memory().read_u64(STATUS_ADDR)
    }
}

/// The source's guest: boots it, fills its memory and starts its workload.
pub fn launch(backend: Backend, workload: &Workload) -> Result<Box<dyn Guest>, GuestError> {
    Ok(match backend {
        Backend::Kvm => Box::new(crate::kvm::KvmGuest::launch(workload)?),
        Backend::Synthetic => Box::new(crate::synthetic::SyntheticGuest::launch(workload)?),
    })
}

/// The destination's guest: empty memory of the workload's shape, paused. `memory` may already
/// be registered with userfaultfd (post-copy).
pub fn receive(
    backend: Backend,
    workload: &Workload,
    memory: std::sync::Arc<Memory>,
) -> Result<Box<dyn Guest>, GuestError> {
    Ok(match backend {
        Backend::Kvm => Box::new(crate::kvm::KvmGuest::receive(workload, memory)?),
        Backend::Synthetic => {
            Box::new(crate::synthetic::SyntheticGuest::receive(workload, memory)?)
        }
    })
}

/// Whether this machine can run the kvm backend, and if not, why.
pub fn kvm_available() -> Result<(), String> {
    kvm_ioctls::Kvm::new()
        .map(|_| ())
        .map_err(|e| format!("/dev/kvm: {e}"))
}
