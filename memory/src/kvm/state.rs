//! The vCPU state that moves with the guest: general and special registers. The built-in guest
//! takes no interrupts and uses no FPU, so this is all of it; a real VMM adapter would add
//! MSRs, the FPU/XSAVE area, LAPIC and events (what Cloud Hypervisor's snapshot carries).

use crate::guest::GuestError;
use kvm_bindings::{kvm_regs, kvm_sregs};
use serde::{Deserialize, Serialize};

/// Registers of vCPU 0.
#[derive(Clone, Serialize, Deserialize)]
pub struct VcpuState {
    /// General-purpose registers, rip and rflags.
    pub regs: kvm_regs,
    /// Segments, control registers, EFER.
    pub sregs: kvm_sregs,
}

impl VcpuState {
    /// Serialises for the wire.
    pub fn encode(&self) -> Result<Vec<u8>, GuestError> {
        bincode::serialize(self).map_err(|e| GuestError::BadState(e.to_string()))
    }

    /// Parses what `encode` produced.
    pub fn decode(data: &[u8]) -> Result<Self, GuestError> {
        bincode::deserialize(data).map_err(|e| GuestError::BadState(e.to_string()))
    }
}
