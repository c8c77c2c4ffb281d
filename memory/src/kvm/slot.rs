//! The one unsafe step of running a KVM guest: handing KVM the host mapping of guest memory.

use crate::guest::GuestError;
use crate::region::Memory;
use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::VmFd;

/// (Re-)registers memory slot 0 over all of `memory`, with or without dirty logging. Cloud
/// Hypervisor and QEMU start dirty logging the same way: the slot is registered again with
/// `KVM_MEM_LOG_DIRTY_PAGES`, which makes KVM write-protect the pages and log each first write.
pub fn register(vm: &VmFd, memory: &Memory, log_dirty: bool) -> Result<(), GuestError> {
    let region = kvm_userspace_memory_region {
        slot: 0,
        flags: if log_dirty {
            KVM_MEM_LOG_DIRTY_PAGES
        } else {
            0
        },
        guest_phys_addr: 0,
        memory_size: memory.bytes(),
        userspace_addr: memory.host_addr(),
    };
    // SAFETY: the range [host_addr, host_addr + bytes) is a live mapping owned by `memory`.
    // KvmGuest keeps an Arc<Memory> and declares the VmFd before it, so the VM (and with it
    // KVM's use of the mapping) is gone before the mapping is unmapped.
    unsafe { vm.set_user_memory_region(region) }.map_err(|e| GuestError::Kvm {
        op: "KVM_SET_USER_MEMORY_REGION",
        detail: e.to_string(),
    })
}
