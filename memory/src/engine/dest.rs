//! The destination side: builds an empty guest of the source's shape, installs pages as they
//! come (directly during pre-copy, through userfaultfd during post-copy), resumes the guest at
//! the switchover and reports whether its memory equals the source's at the pause and whether
//! the guest runs on.

use super::hashes::{combine, hex, zero_page_hash};
use super::report::DestinationReport;
use super::{MigrateError, MigrationSpec, DEMAND_ROUND};
use crate::guest;
use crate::page::{PageSet, PAGE_SIZE, ZERO_PAGE};
use crate::region::Memory;
use crate::uffd::{self, Userfault};
use crate::wire::{decode_payload, records, Record};
use bytes::Bytes;
use protocol::{ChunkHash, Conn, Frame, FrameWriter, Message};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tracing::{info, warn};

/// How the destination ended.
#[derive(Debug)]
pub enum Outcome {
    /// The guest moved; the report says how well.
    Migrated(DestinationReport),
    /// The source gave up (its guest keeps running there).
    Aborted(String),
}

/// Post-copy machinery: the registered memory, outstanding faults and their latencies.
struct Pull {
    uf: Arc<Userfault>,
    pending: Arc<Mutex<HashMap<u64, Instant>>>,
    latencies: Vec<Duration>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Pull {
    fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Pull {
    fn drop(&mut self) {
        // Unregistering wakes any vCPU still blocked on a missing page (it then sees zeros);
        // only reached when the migration failed.
        let _ = self.uf.unregister();
        self.stop();
    }
}

struct State {
    memory: Arc<Memory>,
    /// The content of each page as installed. The verification reads back every page the
    /// guest did not write after resuming (`verify_memory`); the others count with these.
    hashes: Vec<ChunkHash>,
    installed: PageSet,
    pull: Option<Pull>,
    buf: Vec<u8>,
    /// Page payload bytes installed, for `MemAck`.
    acked: u64,
}

impl State {
    fn install(&mut self, page: u64, data: &[u8], hash: ChunkHash) -> Result<(), MigrateError> {
        if page as usize >= self.hashes.len() {
            return Err(MigrateError::Protocol(format!(
                "page {page} is beyond guest memory"
            )));
        }
        let landed = match &self.pull {
            // EEXIST (false): the guest already has a newer copy, faulted in earlier.
            Some(pull) => pull.uf.install(page, data)?,
            None => {
                self.memory
                    .write_page(page, data)
                    .map_err(|e| MigrateError::Protocol(e.to_string()))?;
                true
            }
        };
        if landed {
            self.hashes[page as usize] = hash;
        }
        self.fault_served(page);
        self.installed.insert(page);
        Ok(())
    }

    /// Ends the stall of a fault on `page`, if the guest waited on it.
    fn fault_served(&mut self, page: u64) {
        if let Some(pull) = &mut self.pull {
            let waited = pull
                .pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&page);
            if let Some(t0) = waited {
                pull.latencies.push(t0.elapsed());
            }
        }
    }

    /// Post-copy's end: every page the source never sent is zero; installing it ends any
    /// stall on it, which counts like any other.
    fn zero_fill_rest(&mut self) -> Result<(), MigrateError> {
        let Some(pull) = &self.pull else {
            return Ok(());
        };
        let uf = pull.uf.clone();
        for p in 0..self.hashes.len() as u64 {
            if !self.installed.contains(p) {
                if uf.install_zero(p)? {
                    self.hashes[p as usize] = zero_page_hash();
                }
                self.fault_served(p);
                self.installed.insert(p);
            }
        }
        Ok(())
    }

    fn apply(
        &mut self,
        encoding: protocol::Encoding,
        pages: u32,
        payload: &[u8],
    ) -> Result<(), MigrateError> {
        let raw = decode_payload(encoding, pages, payload)
            .map_err(|e| MigrateError::Protocol(e.to_string()))?;
        let recs = records(&raw).map_err(|e| MigrateError::Protocol(e.to_string()))?;
        for (page, rec) in recs {
            match rec {
                Record::Zero => self.install(page, &ZERO_PAGE, zero_page_hash())?,
                Record::Data(d) => self.install(page, d, ChunkHash::of(d))?,
                Record::Ref { from, hash } => {
                    if self.hashes.get(from as usize) != Some(&hash) {
                        return Err(MigrateError::Protocol(format!(
                            "page {page} refers to page {from}, which does not hold that content"
                        )));
                    }
                    let mut buf = std::mem::take(&mut self.buf);
                    self.memory
                        .read_page(from, &mut buf)
                        .map_err(|e| MigrateError::Protocol(e.to_string()))?;
                    let r = self.install(page, &buf, hash);
                    self.buf = buf;
                    r?;
                }
            }
        }
        Ok(())
    }
}

fn percentile(sorted: &[Duration], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    Some(sorted[i].as_secs_f64() * 1000.0)
}

async fn send(wr: &mut FrameWriter, msg: Message) -> Result<(), MigrateError> {
    Ok(wr.send(&Frame::new(msg)).await?)
}

/// Receives a guest from the source at the other end of `conn` (hello done).
pub async fn receive(conn: Conn) -> Result<Outcome, MigrateError> {
    let (mut rd, mut wr) = conn.split();
    let first = rd.recv().await?;
    let Message::MemStart { spec } = first.msg else {
        return Err(MigrateError::Protocol(format!(
            "expected MemStart, got {:?}",
            first.msg
        )));
    };
    let spec: MigrationSpec = serde_json::from_str(&spec)
        .map_err(|e| MigrateError::Protocol(format!("the migration spec does not parse: {e}")))?;
    // Checked before anything is mapped: the spec comes from the peer.
    spec.workload
        .layout()
        .map_err(crate::guest::GuestError::from)?;
    let memory =
        Arc::new(Memory::new(spec.workload.memory_bytes).map_err(crate::guest::GuestError::from)?);
    let mut guest = guest::receive(spec.backend, &spec.workload, memory.clone())?;
    info!(backend = %spec.backend, bytes = spec.workload.memory_bytes, "receiving a guest");
    let pages = memory.pages();
    let mut st = State {
        memory: memory.clone(),
        hashes: vec![zero_page_hash(); pages],
        installed: PageSet::new(pages),
        pull: None,
        buf: vec![0u8; PAGE_SIZE],
        acked: 0,
    };
    send(&mut wr, Message::MemReady).await?;
    let (fault_tx, mut fault_rx) = mpsc::unbounded_channel::<u64>();
    let mut counter_at_resume = 0;
    let mut resumed = false;
    loop {
        let f = tokio::select! {
            biased;
            Some(page) = fault_rx.recv() => {
                let mut pages = vec![page];
                while let Ok(p) = fault_rx.try_recv() {
                    pages.push(p);
                }
                send(&mut wr, Message::MemFault { pages }).await?;
                continue;
            }
            f = rd.recv() => f?,
        };
        match f.msg {
            Message::Ping { id } => send(&mut wr, Message::Pong { id }).await?,
            Message::MemPages {
                round,
                pages,
                encoding,
            } => {
                if round == DEMAND_ROUND && st.pull.is_none() {
                    return Err(MigrateError::Protocol(
                        "demand pages outside post-copy".into(),
                    ));
                }
                st.apply(encoding, pages, &f.payload)?;
                st.acked += f.payload.len() as u64;
                send(&mut wr, Message::MemAck { bytes: st.acked }).await?;
            }
            Message::MemSwitchover {
                postcopy, discard, ..
            } => {
                if postcopy {
                    uffd::discard(&memory, &discard)?;
                    for &p in &discard {
                        st.installed.remove(p);
                        // Dropped: it reads as zero unless the source sends it again.
                        if let Some(h) = st.hashes.get_mut(p as usize) {
                            *h = zero_page_hash();
                        }
                    }
                    st.pull = Some(start_pull(memory.clone(), fault_tx.clone())?);
                }
                guest.load_vcpu_state(&f.payload)?;
                // Read before the guest runs: the counter it resumes from.
                counter_at_resume = guest.counter();
                // What the guest writes from here on cannot be compared with the source: the
                // verification reads back every other page (see `verify_memory`).
                guest.start_dirty_log()?;
                guest.resume()?;
                let at = super::unix_ns();
                resumed = true;
                info!(
                    postcopy,
                    counter = counter_at_resume,
                    "guest resumed at the destination"
                );
                send(
                    &mut wr,
                    Message::MemResumed {
                        at_unix_ns: at,
                        counter: counter_at_resume,
                    },
                )
                .await?;
            }
            Message::MemComplete { memory_hash } => {
                if !resumed {
                    return Err(MigrateError::Protocol(
                        "MemComplete before the switchover".into(),
                    ));
                }
                let mut faults = 0;
                let mut latencies = Vec::new();
                let counter_at_push_end = guest.counter();
                let unanswered_faults = st.pull.as_ref().map_or(0, |p| {
                    p.pending.lock().unwrap_or_else(|e| e.into_inner()).len() as u64
                });
                st.zero_fill_rest()?;
                if let Some(mut pull) = st.pull.take() {
                    pull.uf.unregister()?;
                    pull.stop();
                    latencies = std::mem::take(&mut pull.latencies);
                    faults = latencies.len() as u64;
                }
                send(&mut wr, Message::MemCompleted).await?;
                tokio::time::sleep(Duration::from_millis(spec.run_after_ms)).await;
                let counter_after = guest.counter();
                let running = guest.is_running();
                guest.pause()?;
                let written = guest.take_dirty()?;
                let (ours, pages_reread) = verify_memory(&mut st, &written).await?;
                latencies.sort();
                let report = DestinationReport {
                    memory_hash: hex(&ours),
                    memory_hash_equal: ours == memory_hash,
                    counter_at_resume,
                    counter_after,
                    guest_ran_on: running && counter_after > counter_at_resume,
                    faults,
                    fault_p50_ms: percentile(&latencies, 0.5),
                    fault_p99_ms: percentile(&latencies, 0.99),
                    fault_max_ms: percentile(&latencies, 1.0),
                    unanswered_faults,
                    counter_at_push_end,
                    pages_reread,
                    error: None,
                };
                if !report.memory_hash_equal {
                    warn!("the received memory differs from the source's");
                }
                let json = serde_json::to_string(&report)
                    .map_err(|e| MigrateError::Protocol(e.to_string()))?;
                wr.send(&Frame::with_payload(
                    Message::MemVerified { report: json },
                    Bytes::new(),
                ))
                .await?;
                return Ok(Outcome::Migrated(report));
            }
            Message::MemAbort { reason } => return Ok(Outcome::Aborted(reason)),
            other => return Err(MigrateError::Protocol(format!("unexpected {other:?}"))),
        }
    }
}

/// The memory hash to compare with the source's, taken from guest memory itself: with the
/// guest paused, every page it did not write since it resumed here is read back and hashed
/// (it must hold what arrived); a page it wrote counts with the hash of what was installed.
/// Returns the hash and how many pages were read back.
async fn verify_memory(
    st: &mut State,
    written: &PageSet,
) -> Result<(ChunkHash, u64), MigrateError> {
    let memory = st.memory.clone();
    let now = tokio::task::spawn_blocking(move || super::hashes::page_hashes(&memory))
        .await
        .map_err(|e| MigrateError::Protocol(format!("hashing guest memory failed: {e}")))?;
    let mut reread = 0;
    for (p, h) in now.into_iter().enumerate() {
        if !written.contains(p as u64) {
            st.hashes[p] = h;
            reread += 1;
        }
    }
    Ok((combine(&st.hashes), reread))
}

fn start_pull(
    memory: Arc<Memory>,
    faults: mpsc::UnboundedSender<u64>,
) -> Result<Pull, MigrateError> {
    let uf = Arc::new(Userfault::register(memory)?);
    let pending: Arc<Mutex<HashMap<u64, Instant>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let thread = {
        let (uf, pending, stop) = (uf.clone(), pending.clone(), stop.clone());
        std::thread::Builder::new()
            .name("uffd-faults".into())
            .spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    match uf.next_fault(Duration::from_millis(20)) {
                        Ok(Some(page)) => {
                            let mut p = pending.lock().unwrap_or_else(|e| e.into_inner());
                            if let std::collections::hash_map::Entry::Vacant(e) = p.entry(page) {
                                e.insert(Instant::now());
                                if faults.send(page).is_err() {
                                    return;
                                }
                            }
                        }
                        Ok(None) => {}
                        Err(e) => {
                            warn!("post-copy fault handler: {e}");
                            return;
                        }
                    }
                }
            })
            .map_err(|e| MigrateError::Protocol(format!("cannot start the fault handler: {e}")))?
    };
    Ok(Pull {
        uf,
        pending,
        latencies: Vec::new(),
        stop,
        thread: Some(thread),
    })
}
