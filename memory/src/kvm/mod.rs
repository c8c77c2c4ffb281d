//! The kvm backend: a one-vCPU micro-VM on /dev/kvm running the built-in workload program.
//!
//! The vCPU runs in its own thread. The guest exits to the host after every batch of writes
//! (an `out` to a port); the host sleeps there to hold the dirty rate, and parks the thread
//! there to pause the guest, so a pause takes at most one batch (about a millisecond).
//! Dirty pages come from KVM's dirty log; the host's own writes from vm-memory's bitmap.

mod boot;
mod slot;
mod state;

use crate::control::{Control, Want};
use crate::guest::{Guest, GuestError};
use crate::page::PageSet;
use crate::region::Memory;
use crate::workload::{Pacer, Workload};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use state::VcpuState;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// How long the guest may take to fill its memory before launch gives up.
const FILL_TIMEOUT: Duration = Duration::from_secs(300);

/// What the vCPU thread reports besides running and pausing.
#[derive(Default)]
struct VcpuReport {
    filled: bool,
    state: Option<VcpuState>,
    error: Option<String>,
}

/// A micro-VM running the built-in workload.
pub struct KvmGuest {
    // Field order matters: the VM must be dropped before the memory it maps.
    vm: VmFd,
    vcpu: Option<VcpuFd>,
    thread: Option<JoinHandle<()>>,
    control: Arc<Control<VcpuReport>>,
    rate: u64,
    _kvm: Kvm,
    memory: Arc<Memory>,
}

fn kvm_err(op: &'static str) -> impl Fn(kvm_ioctls::Error) -> GuestError {
    move |e| GuestError::Kvm {
        op,
        detail: e.to_string(),
    }
}

impl KvmGuest {
    fn create(workload: &Workload, memory: Arc<Memory>) -> Result<Self, GuestError> {
        workload.layout()?;
        let kvm = Kvm::new().map_err(|e| GuestError::NoKvm(format!("/dev/kvm: {e}")))?;
        let vm = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        slot::register(&vm, &memory, false)?;
        let vcpu = vm.create_vcpu(0).map_err(kvm_err("KVM_CREATE_VCPU"))?;
        let cpuid = kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        vcpu.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
        Ok(KvmGuest {
            vm,
            vcpu: Some(vcpu),
            thread: None,
            control: Arc::new(Control::new(VcpuReport::default())),
            rate: workload.dirty_rate,
            _kvm: kvm,
            memory,
        })
    }

    /// Boots the guest and returns once it has filled its memory and started its workload.
    pub fn launch(workload: &Workload) -> Result<Self, GuestError> {
        let memory = Arc::new(Memory::new(workload.memory_bytes)?);
        let mut g = KvmGuest::create(workload, memory)?;
        let layout = workload.layout()?;
        boot::load(&g.memory, workload, &layout, Pacer::new(g.rate).batch())?;
        {
            let vcpu = g
                .vcpu
                .as_ref()
                .ok_or_else(|| GuestError::Stopped("no vCPU".into()))?;
            let sregs = vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
            vcpu.set_sregs(&boot::sregs(sregs))
                .map_err(kvm_err("KVM_SET_SREGS"))?;
            vcpu.set_regs(&boot::regs())
                .map_err(kvm_err("KVM_SET_REGS"))?;
        }
        g.resume()?;
        let (ctl, done) = g
            .control
            .wait_until(FILL_TIMEOUT, |c| c.extra.filled || c.extra.error.is_some());
        if let Some(e) = &ctl.extra.error {
            return Err(GuestError::Stopped(e.clone()));
        }
        if !done {
            return Err(GuestError::Stopped(format!(
                "the guest did not fill its memory within {FILL_TIMEOUT:?}"
            )));
        }
        drop(ctl);
        Ok(g)
    }

    /// A paused VM over `memory`, waiting for its vCPU state.
    pub fn receive(workload: &Workload, memory: Arc<Memory>) -> Result<Self, GuestError> {
        KvmGuest::create(workload, memory)
    }
}

fn run_vcpu(mut vcpu: VcpuFd, rate: u64, control: Arc<Control<VcpuReport>>) {
    let mut pacer = Pacer::new(rate);
    let batch = pacer.batch();
    loop {
        let park = |r: &mut VcpuReport| {
            r.state = match (vcpu.get_regs(), vcpu.get_sregs()) {
                (Ok(regs), Ok(sregs)) => Some(VcpuState { regs, sregs }),
                _ => None,
            };
        };
        let Some((throttle, parked)) = control.checkpoint(park) else {
            return;
        };
        if parked {
            pacer.restart();
        }
        let failure = match vcpu.run() {
            Ok(VcpuExit::IoOut(boot::PORT_BATCH, _)) => {
                control.sleep(pacer.after(batch, throttle));
                None
            }
            Ok(VcpuExit::IoOut(boot::PORT_FILLED, _)) => {
                control.lock().extra.filled = true;
                control.notify();
                None
            }
            Ok(VcpuExit::IoOut(boot::PORT_FILL_STEP, _)) => None,
            Ok(exit) => {
                let what = format!("{exit:?}");
                let rip = vcpu.get_regs().map(|r| r.rip).unwrap_or_default();
                Some(format!("unexpected vCPU exit {what} at rip {rip:#x}"))
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => None,
            Err(e) => Some(format!("KVM_RUN failed: {e}")),
        };
        if let Some(why) = failure {
            control.fail(|r| r.error = Some(why));
            return;
        }
    }
}

impl Guest for KvmGuest {
    fn memory(&self) -> &Arc<Memory> {
        &self.memory
    }

    fn start_dirty_log(&mut self) -> Result<(), GuestError> {
        slot::register(&self.vm, &self.memory, true)?;
        self.take_dirty()?;
        Ok(())
    }

    fn take_dirty(&mut self) -> Result<PageSet, GuestError> {
        let words = self
            .vm
            .get_dirty_log(0, self.memory.bytes() as usize)
            .map_err(kvm_err("KVM_GET_DIRTY_LOG"))?;
        let mut set = PageSet::from_words(words, self.memory.pages());
        set.union(&self.memory.take_host_writes());
        Ok(set)
    }

    fn pause(&mut self) -> Result<(), GuestError> {
        match &self.control.pause().extra.error {
            Some(e) => Err(GuestError::Stopped(e.clone())),
            None => Ok(()),
        }
    }

    fn resume(&mut self) -> Result<(), GuestError> {
        if let Some(e) = &self.control.lock().extra.error {
            return Err(GuestError::Stopped(e.clone()));
        }
        self.control.resume();
        if let Some(vcpu) = self.vcpu.take() {
            let (control, rate) = (self.control.clone(), self.rate);
            self.thread = Some(
                std::thread::Builder::new()
                    .name("vcpu0".into())
                    .spawn(move || run_vcpu(vcpu, rate, control))
                    .map_err(|e| GuestError::Stopped(format!("cannot start the vCPU: {e}")))?,
            );
        }
        Ok(())
    }

    fn vcpu_state(&self) -> Result<Vec<u8>, GuestError> {
        let ctl = self.control.lock();
        match (&ctl.extra.state, ctl.paused) {
            (Some(s), true) => s.encode(),
            _ => Err(GuestError::BadState(
                "the vCPU state is only taken while the guest is paused".into(),
            )),
        }
    }

    fn load_vcpu_state(&mut self, state: &[u8]) -> Result<(), GuestError> {
        let s = VcpuState::decode(state)?;
        let vcpu = self.vcpu.as_ref().ok_or_else(|| {
            GuestError::BadState("the vCPU already runs; load its state before resuming".into())
        })?;
        vcpu.set_sregs(&s.sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
        vcpu.set_regs(&s.regs).map_err(kvm_err("KVM_SET_REGS"))?;
        Ok(())
    }

    fn set_throttle(&mut self, fraction: f64) {
        self.control.lock().throttle = fraction;
    }

    fn is_running(&self) -> bool {
        let ctl = self.control.lock();
        ctl.want == Want::Run && ctl.extra.error.is_none() && self.thread.is_some()
    }
}

impl Drop for KvmGuest {
    fn drop(&mut self) {
        self.control.stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
