//! The synthetic guest: a thread that writes pages at the workload's rate and hot-set
//! distribution, for machines without KVM and for large-memory experiments. Its writes go
//! through vm-memory, whose bitmap is its dirty log.

use crate::control::Control;
use crate::guest::{Guest, GuestError};
use crate::page::{PageSet, PAGE_SIZE};
use crate::region::Memory;
use crate::workload::{xorshift, Layout, Pacer, Workload, STATUS_ADDR, WORK_BASE};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::thread::JoinHandle;

/// Where the writer is in its sequence: its whole "vCPU state".
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
struct WriterState {
    rng: u64,
    cursor: u64,
}

/// A guest made of memory and a writer thread.
pub struct SyntheticGuest {
    memory: Arc<Memory>,
    workload: Workload,
    layout: Layout,
    control: Arc<Control<WriterState>>,
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
            control: Arc::new(Control::new(state)),
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

fn run_writer(memory: Arc<Memory>, layout: Layout, rate: u64, control: Arc<Control<WriterState>>) {
    let mut pacer = Pacer::new(rate);
    let mut st = control.lock().extra;
    while let Some((throttle, parked)) = control.checkpoint(|saved| *saved = st) {
        if parked {
            pacer.restart();
        }
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
        control.sleep(pacer.after(batch, throttle));
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
        drop(self.control.pause());
        Ok(())
    }

    fn resume(&mut self) -> Result<(), GuestError> {
        self.control.resume();
        if self.thread.is_none() {
            let (memory, layout, control) =
                (self.memory.clone(), self.layout, self.control.clone());
            let rate = self.workload.dirty_rate;
            self.thread = Some(
                std::thread::Builder::new()
                    .name("synthetic-guest".into())
                    .spawn(move || run_writer(memory, layout, rate, control))
                    .map_err(|e| GuestError::Stopped(format!("cannot start the writer: {e}")))?,
            );
        }
        Ok(())
    }

    fn vcpu_state(&self) -> Result<Vec<u8>, GuestError> {
        let ctl = self.control.lock();
        serde_json::to_vec(&ctl.extra).map_err(|e| GuestError::BadState(e.to_string()))
    }

    fn load_vcpu_state(&mut self, state: &[u8]) -> Result<(), GuestError> {
        let st: WriterState =
            serde_json::from_slice(state).map_err(|e| GuestError::BadState(e.to_string()))?;
        self.control.lock().extra = st;
        Ok(())
    }

    fn set_throttle(&mut self, fraction: f64) {
        self.control.lock().throttle = fraction;
    }

    fn is_running(&self) -> bool {
        self.control.lock().want == crate::control::Want::Run
            && self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }
}

impl Drop for SyntheticGuest {
    fn drop(&mut self) {
        self.control.stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
