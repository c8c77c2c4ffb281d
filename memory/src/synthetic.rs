//! The synthetic guest: a thread that writes pages at the workload's rate and hot-set
//! distribution, for machines without KVM and for large-memory experiments. Its writes go
//! through vm-memory, whose bitmap is its dirty log.

use crate::guest::{Guest, GuestError};
use crate::page::{PageSet, PAGE_SIZE};
use crate::region::Memory;
use crate::workload::{xorshift, Layout, Pacer, Workload, STATUS_ADDR, WORK_BASE};
use serde::{Deserialize, Serialize};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

/// Where the writer is in its sequence: its whole "vCPU state".
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
struct WriterState {
    rng: u64,
    cursor: u64,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Want {
    Run,
    Pause,
    Stop,
}

struct Ctl {
    want: Want,
    paused: bool,
    throttle: f64,
    state: WriterState,
}

struct Shared {
    ctl: Mutex<Ctl>,
    cv: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Ctl> {
        // A poisoned lock means the writer panicked; its state is still plain data.
        self.ctl.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A guest made of memory and a writer thread.
pub struct SyntheticGuest {
    memory: Arc<Memory>,
    workload: Workload,
    layout: Layout,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl SyntheticGuest {
    fn new(
        workload: &Workload,
        memory: Arc<Memory>,
        state: WriterState,
    ) -> Result<Self, GuestError> {
        let layout = workload.layout()?;
        Ok(SyntheticGuest {
            memory,
            workload: workload.clone(),
            layout,
            shared: Arc::new(Shared {
                ctl: Mutex::new(Ctl {
                    want: Want::Pause,
                    paused: true,
                    throttle: 0.0,
                    state,
                }),
                cv: Condvar::new(),
            }),
            thread: None,
        })
    }

    /// Fills memory as the workload says and starts writing.
    pub fn launch(workload: &Workload) -> Result<Self, GuestError> {
        let memory = Arc::new(Memory::new(workload.memory_bytes)?);
        let mut page = vec![0u8; PAGE_SIZE];
        for p in WORK_BASE / PAGE_SIZE as u64..memory.pages() as u64 {
            if workload.fill_page(p * PAGE_SIZE as u64, &mut page) {
                memory.write_page(p, &page)?;
            }
        }
        let state = WriterState {
            rng: workload.seed | 1,
            cursor: 0,
        };
        let mut g = SyntheticGuest::new(workload, memory, state)?;
        g.resume()?;
        Ok(g)
    }

    /// An empty, paused guest for the destination.
    pub fn receive(workload: &Workload, memory: Arc<Memory>) -> Result<Self, GuestError> {
        SyntheticGuest::new(workload, memory, WriterState::default())
    }
}

fn run_writer(memory: Arc<Memory>, layout: Layout, rate: u64, shared: Arc<Shared>) {
    let mut pacer = Pacer::new(rate);
    let mut st = shared.lock().state;
    loop {
        let throttle = {
            let mut ctl = shared.lock();
            if ctl.want != Want::Run {
                ctl.state = st;
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
        let batch = pacer.batch();
        for _ in 0..batch {
            st.rng = xorshift(st.rng);
            let page = if st.rng % 1000 < layout.hot_per_mille {
                layout.hot_base + (st.rng >> 12) % layout.hot_pages
            } else {
                let p = layout.cold_base + st.cursor;
                st.cursor = (st.cursor + 1) % layout.cold_pages;
                p
            };
            let counter = memory.read_u64(STATUS_ADDR) + 1;
            memory.write_u64(STATUS_ADDR, counter);
            let addr = page * PAGE_SIZE as u64 + ((st.rng >> 40) & 0xff8);
            memory.write_u64(addr, counter);
            let sum = memory.read_u64(STATUS_ADDR + 8).rotate_left(7) ^ counter ^ addr;
            memory.write_u64(STATUS_ADDR + 8, sum);
        }
        let wait = pacer.after(batch, throttle);
        if !wait.is_zero() {
            let ctl = shared.lock();
            if ctl.want == Want::Run {
                let _ = shared.cv.wait_timeout(ctl, wait);
            }
        }
    }
}

impl Guest for SyntheticGuest {
    fn memory(&self) -> &Arc<Memory> {
        &self.memory
    }

    fn start_dirty_log(&mut self) -> Result<(), GuestError> {
        self.memory.take_host_writes();
        Ok(())
    }

    fn take_dirty(&mut self) -> Result<PageSet, GuestError> {
        Ok(self.memory.take_host_writes())
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
        Ok(())
    }

    fn resume(&mut self) -> Result<(), GuestError> {
        {
            let mut ctl = self.shared.lock();
            ctl.want = Want::Run;
            // The thread sets it again once it has really stopped; pause() waits for that.
            ctl.paused = false;
            self.shared.cv.notify_all();
        }
        if self.thread.is_none() {
            let (memory, layout, shared) = (self.memory.clone(), self.layout, self.shared.clone());
            let rate = self.workload.dirty_rate;
            self.thread = Some(
                std::thread::Builder::new()
                    .name("synthetic-guest".into())
                    .spawn(move || run_writer(memory, layout, rate, shared))
                    .map_err(|e| GuestError::Stopped(format!("cannot start the writer: {e}")))?,
            );
        }
        Ok(())
    }

    fn vcpu_state(&self) -> Result<Vec<u8>, GuestError> {
        let ctl = self.shared.lock();
        serde_json::to_vec(&ctl.state).map_err(|e| GuestError::BadState(e.to_string()))
    }

    fn load_vcpu_state(&mut self, state: &[u8]) -> Result<(), GuestError> {
        let st: WriterState =
            serde_json::from_slice(state).map_err(|e| GuestError::BadState(e.to_string()))?;
        self.shared.lock().state = st;
        Ok(())
    }

    fn set_throttle(&mut self, fraction: f64) {
        self.shared.lock().throttle = fraction;
    }

    fn is_running(&self) -> bool {
        let ctl = self.shared.lock();
        ctl.want == Want::Run && self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }
}

impl Drop for SyntheticGuest {
    fn drop(&mut self) {
        self.shared.lock().want = Want::Stop;
        self.shared.cv.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
