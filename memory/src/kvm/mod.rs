//! The kvm backend: a one-vCPU micro-VM on /dev/kvm running the built-in workload program.
//!
//! The vCPU runs in its own thread. The guest exits to the host after every batch of writes
//! (an `out` to a port); the host sleeps there to hold the dirty rate, and parks the thread
//! there to pause the guest, so a pause takes at most one batch (about a millisecond).
//! Dirty pages come from KVM's dirty log; the host's own writes from vm-memory's bitmap.

mod boot;
mod slot;
mod state;

use crate::guest::{Guest, GuestError};
use crate::page::PageSet;
use crate::region::Memory;
use crate::workload::{Pacer, Workload};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use state::VcpuState;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

/// How long the guest may take to fill its memory before launch gives up.
const FILL_TIMEOUT: Duration = Duration::from_secs(300);

#[derive(Clone, Copy, PartialEq, Eq)]
enum Want {
    Run,
    Pause,
    Stop,
}

struct Ctl {
    want: Want,
    paused: bool,
    filled: bool,
    throttle: f64,
    state: Option<VcpuState>,
    error: Option<String>,
}

struct Shared {
    ctl: Mutex<Ctl>,
    cv: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Ctl> {
        // A poisoned lock means the vCPU thread panicked; the control block is plain data.
        self.ctl.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A micro-VM running the built-in workload.
pub struct KvmGuest {
    // Field order matters: the VM must be dropped before the memory it maps.
    vm: VmFd,
    vcpu: Option<VcpuFd>,
    thread: Option<JoinHandle<()>>,
    shared: Arc<Shared>,
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
            shared: Arc::new(Shared {
                ctl: Mutex::new(Ctl {
                    want: Want::Pause,
                    paused: true,
                    filled: false,
                    throttle: 0.0,
                    state: None,
                    error: None,
                }),
                cv: Condvar::new(),
            }),
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
        let ctl = g.shared.lock();
        let (ctl, timeout) = g
            .shared
            .cv
            .wait_timeout_while(ctl, FILL_TIMEOUT, |c| !c.filled && c.error.is_none())
            .unwrap_or_else(|e| e.into_inner());
        if let Some(e) = &ctl.error {
            return Err(GuestError::Stopped(e.clone()));
        }
        if timeout.timed_out() {
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

fn run_vcpu(mut vcpu: VcpuFd, rate: u64, shared: Arc<Shared>) {
    let mut pacer = Pacer::new(rate);
    let batch = pacer.batch();
    let stop = |shared: &Shared, why: String| {
        let mut ctl = shared.lock();
        ctl.error = Some(why);
        ctl.paused = true;
        shared.cv.notify_all();
    };
    loop {
        let throttle = {
            let mut ctl = shared.lock();
            if ctl.want != Want::Run {
                let regs = vcpu.get_regs();
                let sregs = vcpu.get_sregs();
                ctl.state = match (regs, sregs) {
                    (Ok(regs), Ok(sregs)) => Some(VcpuState { regs, sregs }),
                    _ => None,
                };
                ctl.paused = true;
                shared.cv.notify_all();
                while ctl.want == Want::Pause {
                    ctl = shared.cv.wait(ctl).unwrap_or_else(|e| e.into_inner());
                }
                if ctl.want == Want::Stop {
                    return;
                }
                ctl.paused = false;
                pacer.restart();
            }
            ctl.throttle
        };
        match vcpu.run() {
            Ok(VcpuExit::IoOut(boot::PORT_BATCH, _)) => {
                let wait = pacer.after(batch, throttle);
                if !wait.is_zero() {
                    let ctl = shared.lock();
                    if ctl.want == Want::Run {
                        let _ = shared.cv.wait_timeout(ctl, wait);
                    }
                }
            }
            Ok(VcpuExit::IoOut(boot::PORT_FILLED, _)) => {
                shared.lock().filled = true;
                shared.cv.notify_all();
            }
            Ok(VcpuExit::IoOut(boot::PORT_FILL_STEP, _)) => {}
            Ok(exit) => {
                let what = format!("{exit:?}");
                let rip = vcpu.get_regs().map(|r| r.rip).unwrap_or_default();
                stop(
                    &shared,
                    format!("unexpected vCPU exit {what} at rip {rip:#x}"),
                );
                return;
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Err(e) => {
                stop(&shared, format!("KVM_RUN failed: {e}"));
                return;
            }
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
        let mut ctl = self.shared.lock();
        if ctl.want == Want::Run {
            ctl.want = Want::Pause;
            self.shared.cv.notify_all();
        }
        while !ctl.paused {
            ctl = self.shared.cv.wait(ctl).unwrap_or_else(|e| e.into_inner());
        }
        match &ctl.error {
            Some(e) => Err(GuestError::Stopped(e.clone())),
            None => Ok(()),
        }
    }

    fn resume(&mut self) -> Result<(), GuestError> {
        {
            let mut ctl = self.shared.lock();
            if let Some(e) = &ctl.error {
                return Err(GuestError::Stopped(e.clone()));
            }
            ctl.want = Want::Run;
            // The thread sets it again once it has really stopped; pause() waits for that.
            ctl.paused = false;
            self.shared.cv.notify_all();
        }
        if let Some(vcpu) = self.vcpu.take() {
            let (shared, rate) = (self.shared.clone(), self.rate);
            self.thread = Some(
                std::thread::Builder::new()
                    .name("vcpu0".into())
                    .spawn(move || run_vcpu(vcpu, rate, shared))
                    .map_err(|e| GuestError::Stopped(format!("cannot start the vCPU: {e}")))?,
            );
        }
        Ok(())
    }

    fn vcpu_state(&self) -> Result<Vec<u8>, GuestError> {
        let ctl = self.shared.lock();
        match (&ctl.state, ctl.paused) {
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
        self.shared.lock().throttle = fraction;
    }

    fn is_running(&self) -> bool {
        let ctl = self.shared.lock();
        ctl.want == Want::Run && ctl.error.is_none() && self.thread.is_some()
    }
}

impl Drop for KvmGuest {
    fn drop(&mut self) {
        self.shared.lock().want = Want::Stop;
        self.shared.cv.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
