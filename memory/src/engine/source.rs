//! The source side: pre-copy rounds with d/r convergence, hot pages held for the stop-and-copy,
//! divergence policies, warm migration and the post-copy push with demand faults served first.

use super::hashes::{hex, memory_hash, zero_page_hash};
use super::report::{DestinationReport, PostcopyReport, Predicted, Report, RoundReport, Saved};
use super::{MigrateError, MigrationSpec, Mode, Policy, DEMAND_ROUND};
use crate::guest::Guest;
use crate::model::{ModelInput, MAX_ROUNDS, MAX_SENT_FACTOR};
use crate::page::{PageSet, PAGE_SIZE};
use crate::region::{is_zero, Memory};
use crate::wire::{BatchBuilder, Record};
use bytes::Bytes;
use protocol::{ChunkHash, Conn, ConnError, Frame, FrameWriter, Message};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tracing::{info, warn};

/// Wire bytes a frame costs beyond its payload (length prefix, header, TLS record share): an
/// estimate, for counting wire bytes without asking the socket.
const FRAME_OVERHEAD: u64 = 32;
/// Pages per batch frame: 256 KiB of page data, enough for zstd to find repeats.
const BATCH_PAGES: usize = 64;
/// Pages per batch in the post-copy push: smaller, so that a fault waits behind less.
const PUSH_BATCH_PAGES: usize = 16;
/// Pages sampled before round 1 to estimate zero pages and compression for the prediction.
const SAMPLE_PAGES: u64 = 1024;
/// A round whose dirty set shrinks by less than this fraction does not converge.
const MIN_SHRINK: f64 = 0.9;
/// Measured d/r at which pre-copy is taken not to converge. Just under 1: a guest that rewrites
/// all of memory within a round saturates the dirty log, and then measures as d/r ≈ 1.
const DIVERGING: f64 = 0.95;
/// Once throttled, the throttle steps up each round whose d/r stays above this (QEMU's
/// `throttle-trigger-threshold`, 50%): at d/r 0.9 the dirty set shrinks only 10% a round and
/// Xen's limits end the migration before it converges; at 0.5 it halves each round.
const THROTTLE_TRIGGER: f64 = 0.5;
/// Share of the link the post-copy push takes, leaving room for demand pages.
const PUSH_SHARE: f64 = 0.9;

/// How the source migrates.
#[derive(Clone, Debug)]
pub struct SourceOptions {
    /// Pre-copy, warm or post-copy.
    pub mode: Mode,
    /// Switch over once the predicted downtime is within this.
    pub downtime_target: Duration,
    /// What to do when pre-copy does not converge.
    pub on_diverge: Policy,
    /// The link's bandwidth in bytes per second, when known: used for the prediction, and to
    /// pace the post-copy push so that demand pages never queue behind it.
    pub bandwidth: Option<u64>,
    /// Hold hot pages back for the stop-and-copy.
    pub hold_hot: bool,
    /// zstd-compress page batches.
    pub compress: bool,
    /// How long the destination lets the guest run before it reports.
    pub run_after: Duration,
}

/// Where the migration is, for deciding what a failure leaves behind.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Phase {
    Live,
    Paused,
    Switched,
}

struct Counts {
    pages: u64,
    bytes: u64,
    zero: u64,
    refs: u64,
}

/// Sends pages, remembering what the destination holds so that nothing is sent twice.
struct Sender {
    wr: FrameWriter,
    memory: Arc<Memory>,
    /// The content the destination holds for each page, when we sent it one.
    sent: Vec<Option<ChunkHash>>,
    /// Some page at the destination holding each content.
    by_hash: HashMap<ChunkHash, u64>,
    refs: bool,
    /// True while a page the destination was never sent reads as zero there (fresh memory);
    /// false after a post-copy switchover, when such a page is missing and faults.
    missing_is_zero: bool,
    compress: bool,
    wire_bytes: u64,
    saved: Saved,
    buf: Vec<u8>,
    batch: BatchBuilder,
    flow: Arc<Flow>,
    /// Payload bytes sent.
    payload_sent: u64,
    /// Unacknowledged payload allowed in flight.
    window: u64,
}

/// Acknowledged payload bytes, updated by the reader task.
#[derive(Default)]
struct Flow {
    acked: std::sync::atomic::AtomicU64,
    closed: std::sync::atomic::AtomicBool,
    notify: tokio::sync::Notify,
}

impl Sender {
    /// Adds `page` to the batch; returns what was added (None: the destination has it).
    fn add(&mut self, page: u64, counts: &mut Counts, demanded: bool) -> Result<(), MigrateError> {
        self.memory
            .read_page(page, &mut self.buf)
            .map_err(|e| MigrateError::Protocol(e.to_string()))?;
        let slot = &mut self.sent[page as usize];
        if is_zero(&self.buf) {
            counts.zero += 1;
            self.saved.zero_pages += 1;
            let zh = zero_page_hash();
            // The destination's page is zero already, unless it faulted on it or, in post-copy,
            // it is missing there (a zero marker costs a few bytes; a skipped one would leave
            // the guest blocked on the page until the end).
            let held = *slot == Some(zh) || (slot.is_none() && self.missing_is_zero);
            if !demanded && held {
                return Ok(());
            }
            *slot = Some(zh);
            self.batch.push(page, &Record::Zero);
            counts.pages += 1;
            return Ok(());
        }
        let hash = ChunkHash::of(&self.buf);
        if *slot == Some(hash) && !demanded {
            return Ok(());
        }
        *slot = Some(hash);
        counts.pages += 1;
        if self.refs {
            if let Some(&from) = self.by_hash.get(&hash) {
                if from != page && self.sent[from as usize] == Some(hash) {
                    counts.refs += 1;
                    self.saved.ref_pages += 1;
                    self.batch.push(page, &Record::Ref { from, hash });
                    return Ok(());
                }
            }
            self.by_hash.insert(hash, page);
        }
        self.batch.push(page, &Record::Data(&self.buf));
        Ok(())
    }

    async fn flush(&mut self, round: u32, counts: &mut Counts) -> Result<(), MigrateError> {
        if self.batch.pages() == 0 {
            return Ok(());
        }
        let raw = self.batch.raw_len() as u64;
        let (encoding, pages, payload) = self.batch.finish(self.compress.then_some(1));
        if encoding == protocol::Encoding::Zstd {
            self.saved.compressed_input += raw;
            self.saved.compressed_output += payload.len() as u64;
        }
        // Keep about a bandwidth-delay product in flight and no more: bytes queued beyond it
        // would sit in socket buffers ahead of the stop-and-copy's pages.
        loop {
            let notified = self.flow.notify.notified();
            let acked = self.flow.acked.load(std::sync::atomic::Ordering::SeqCst);
            if self.payload_sent.saturating_sub(acked) <= self.window {
                break;
            }
            if self.flow.closed.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(MigrateError::Protocol(
                    "the destination closed the connection".into(),
                ));
            }
            notified.await;
        }
        self.payload_sent += payload.len() as u64;
        let bytes = payload.len() as u64 + FRAME_OVERHEAD;
        self.wr
            .send(&Frame::with_payload(
                Message::MemPages {
                    round,
                    pages,
                    encoding,
                },
                Bytes::from(payload),
            ))
            .await?;
        counts.bytes += bytes;
        self.wire_bytes += bytes;
        Ok(())
    }

    async fn send(
        &mut self,
        round: u32,
        pages: &[u64],
        per_batch: usize,
    ) -> Result<Counts, MigrateError> {
        let demanded = round == DEMAND_ROUND;
        let mut counts = Counts {
            pages: 0,
            bytes: 0,
            zero: 0,
            refs: 0,
        };
        for &p in pages {
            self.add(p, &mut counts, demanded)?;
            if self.batch.pages() as usize >= per_batch {
                self.flush(round, &mut counts).await?;
            }
        }
        self.flush(round, &mut counts).await?;
        Ok(counts)
    }

    async fn msg(&mut self, msg: Message) -> Result<(), MigrateError> {
        self.wr.send(&Frame::new(msg)).await?;
        self.wire_bytes += FRAME_OVERHEAD;
        Ok(())
    }
}

/// Frames from the destination, read by a task of their own.
type Inbox = mpsc::UnboundedReceiver<Result<Frame, ConnError>>;

async fn expect(
    inbox: &mut Inbox,
    what: &str,
    mut accept: impl FnMut(&Message) -> bool,
) -> Result<Frame, MigrateError> {
    loop {
        let f = inbox.recv().await.ok_or_else(|| {
            MigrateError::Protocol(format!("connection closed while waiting for {what}"))
        })??;
        match &f.msg {
            Message::MemAbort { reason } => return Err(MigrateError::Aborted(reason.clone())),
            Message::Error { message, .. } => return Err(MigrateError::Aborted(message.clone())),
            m if accept(m) => return Ok(f),
            // A post-copy fault that raced with the end of the push: the page is on its way.
            Message::MemFault { .. } => {}
            other => {
                return Err(MigrateError::Protocol(format!(
                    "expected {what}, got {other:?}"
                )))
            }
        }
    }
}

/// Estimates the fraction of zero pages and the compression ratio of the rest from a sample.
fn sample(memory: &Memory) -> (f64, f64) {
    let pages = memory.pages() as u64;
    let step = (pages / SAMPLE_PAGES).max(1);
    let mut buf = vec![0u8; PAGE_SIZE];
    let (mut zero, mut total) = (0u64, 0u64);
    let mut batch = BatchBuilder::default();
    let (mut raw, mut wire) = (0u64, 0u64);
    let mut by_hash = std::collections::HashSet::new();
    for p in (0..pages).step_by(step as usize) {
        total += 1;
        if memory.read_page(p, &mut buf).is_err() || is_zero(&buf) {
            zero += 1;
            continue;
        }
        // Duplicates travel as references, which the sample should credit too.
        let h = ChunkHash::of(&buf);
        if by_hash.insert(h) {
            batch.push(p, &Record::Data(&buf));
        } else {
            batch.push(p, &Record::Ref { from: 0, hash: h });
        }
        raw += PAGE_SIZE as u64;
        if batch.pages() as usize == BATCH_PAGES {
            wire += batch.finish(Some(1)).2.len() as u64 + FRAME_OVERHEAD;
        }
    }
    if batch.pages() > 0 {
        wire += batch.finish(Some(1)).2.len() as u64 + FRAME_OVERHEAD;
    }
    let zero_fraction = zero as f64 / total.max(1) as f64;
    let compression = if wire == 0 {
        1.0
    } else {
        raw as f64 / wire as f64
    };
    (zero_fraction, compression.max(1.0))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Migrates `guest` to the destination at the other end of `conn` (hello done).
pub async fn migrate(
    guest: &mut dyn Guest,
    spec: &MigrationSpec,
    conn: Conn,
    opts: &SourceOptions,
) -> Report {
    let mut report = Report {
        backend: spec.backend.to_string(),
        mode: opts.mode.to_string(),
        memory_bytes: spec.workload.memory_bytes,
        policy_applied: "none".into(),
        ..Report::default()
    };
    let mut phase = Phase::Live;
    let result = run(guest, spec, conn, opts, &mut report, &mut phase).await;
    match result {
        Ok(()) => {}
        Err(MigrateError::Aborted(reason)) if report.outcome == "aborted" => {
            report.error = Some(reason);
        }
        Err(e) => {
            warn!("memory migration failed: {e}");
            report.outcome = "failed".into();
            report.error = Some(match phase {
                Phase::Live => format!("{e}; the guest keeps running at the source"),
                Phase::Paused => match guest.resume() {
                    Ok(()) => format!("{e}; the guest was resumed at the source"),
                    Err(r) => format!("{e}; resuming the guest at the source failed too: {r}"),
                },
                Phase::Switched => format!(
                    "{e}; the switchover was sent, so the guest may be running at the destination: \
                     it stays paused here; check the destination before resuming it"
                ),
            });
        }
    }
    report.source_guest_running = guest.is_running();
    report
}

#[allow(clippy::too_many_lines)]
async fn run(
    guest: &mut dyn Guest,
    spec: &MigrationSpec,
    conn: Conn,
    opts: &SourceOptions,
    report: &mut Report,
    phase: &mut Phase,
) -> Result<(), MigrateError> {
    let start = Instant::now();
    let memory = guest.memory().clone();
    let pages = memory.pages();
    let (mut rd, wr) = conn.split();
    let (tx, mut inbox) = mpsc::unbounded_channel();
    let flow = Arc::new(Flow::default());
    let reader = {
        let flow = flow.clone();
        tokio::spawn(async move {
            loop {
                let f = rd.recv().await;
                if let Ok(Frame {
                    msg: Message::MemAck { bytes },
                    ..
                }) = &f
                {
                    flow.acked
                        .fetch_max(*bytes, std::sync::atomic::Ordering::SeqCst);
                    flow.notify.notify_waiters();
                    continue;
                }
                let done = f.is_err();
                if tx.send(f).is_err() || done {
                    break;
                }
            }
            flow.closed.store(true, std::sync::atomic::Ordering::SeqCst);
            flow.notify.notify_waiters();
        })
    };
    let _reader = AbortOnDrop(reader);
    let mut tx = Sender {
        wr,
        memory: memory.clone(),
        sent: vec![None; pages],
        by_hash: HashMap::new(),
        refs: true,
        missing_is_zero: true,
        compress: opts.compress,
        wire_bytes: 0,
        saved: Saved::default(),
        buf: vec![0u8; PAGE_SIZE],
        batch: BatchBuilder::default(),
        flow,
        payload_sent: 0,
        window: 4 << 20,
    };
    let spec_json =
        serde_json::to_string(spec).map_err(|e| MigrateError::Protocol(e.to_string()))?;
    tx.msg(Message::MemStart { spec: spec_json }).await?;
    expect(&mut inbox, "MemReady", |m| matches!(m, Message::MemReady)).await?;
    let ping = Instant::now();
    tx.msg(Message::Ping { id: 1 }).await?;
    expect(&mut inbox, "Pong", |m| matches!(m, Message::Pong { .. })).await?;
    let rtt = ping.elapsed();
    report.rtt_ms = ms(rtt);
    if let Some(bw) = opts.bandwidth {
        // A quarter over the product: acknowledgements come after the destination has
        // installed a batch and queue behind data on a busy link, so exactly one product leaves
        // the link idle part of the time (measured: 93-118 MB/s of 125 at 1.0×, 124 at 1.25×);
        // more only queues in front of the stop-and-copy (downtime +3-6 ms at 1.5×).
        tx.window = (bw as f64 * rtt.as_secs_f64() * 1.25) as u64 + (256 << 10);
    }

    guest.start_dirty_log()?;
    let (zero_fraction, compression) = sample(&memory);
    let layout = spec
        .workload
        .layout()
        .map_err(|e| MigrateError::Protocol(e.to_string()))?;
    let model = |bandwidth: f64| ModelInput {
        memory_bytes: (memory.bytes() as f64 * (1.0 - zero_fraction)) as u64,
        total_pages: pages as u64,
        dirty_rate: spec.workload.dirty_rate as f64,
        bandwidth,
        compression,
        hot_pages: if layout.hot_per_mille > 0 {
            layout.hot_pages
        } else {
            0
        },
        hot_fraction: spec.workload.hot_fraction,
        rtt: rtt.as_secs_f64(),
        downtime_target: opts.downtime_target.as_secs_f64(),
        hold_hot: opts.hold_hot,
    };
    let predict = |m: ModelInput| match opts.mode {
        Mode::Precopy => m.predict(),
        Mode::Warm => m.predict_warm(),
        Mode::Postcopy => m.predict_postcopy(PUSH_SHARE),
    };
    if let Some(bw) = opts.bandwidth {
        report.predicted = Some(Predicted::new(&predict(model(bw as f64)), compression));
    }

    let mut at_dest = PageSet::new(pages);
    let mut carry = PageSet::new(pages);
    let mut streak = vec![0u8; pages];
    let mut throttle = 0.0f64;
    let mut last_take = Instant::now();
    let mut prev_dirty: Vec<usize> = Vec::new();
    let mut sent_pages_total = 0u64;
    let mut logical_total = 0u64;
    let mut best_wire_bw = 0.0f64;
    let mut to_send: Vec<u64> = (0..pages as u64).collect();
    // Dirty pages the live rounds left for the switchover.
    let mut unsent = PageSet::new(pages);
    let mut round = 1u32;
    let mut limit_base = (0u32, 0u64);
    let mut postcopy = opts.mode == Mode::Postcopy;
    let mut paused_at = Instant::now();
    let mut paused_unix = 0;

    if opts.mode == Mode::Warm {
        paused_at = Instant::now();
        paused_unix = super::unix_ns();
        guest.pause()?;
        *phase = Phase::Paused;
    }

    // Live rounds (none for post-copy; warm does one round with the guest paused).
    while !postcopy {
        let t0 = Instant::now();
        // Rounds follow each other without waiting for acknowledgements (the window paces
        // them), so a round lasts as long as its pages take to send.
        let counts = tx.send(round, &to_send, BATCH_PAGES).await?;
        let elapsed = t0.elapsed();
        for &p in &to_send {
            at_dest.insert(p);
        }
        sent_pages_total += counts.pages;
        logical_total += counts.pages * PAGE_SIZE as u64;
        let secs = elapsed.as_secs_f64().max(1e-6);
        let wire_bw = counts.bytes as f64 / secs;
        if counts.bytes > 1 << 20 {
            best_wire_bw = best_wire_bw.max(wire_bw);
        }
        let mut rr = RoundReport {
            round,
            kind: if opts.mode == Mode::Warm {
                "warm"
            } else {
                "live"
            }
            .into(),
            pages: counts.pages,
            bytes: counts.bytes,
            elapsed_ms: ms(elapsed),
            bandwidth: counts.pages as f64 * PAGE_SIZE as f64 / secs,
            wire_bandwidth: wire_bw,
            zero_pages: counts.zero,
            ref_pages: counts.refs,
            throttle,
            ..RoundReport::default()
        };
        if opts.mode == Mode::Warm {
            report.rounds.push(rr);
            break;
        }
        let dirty = guest.take_dirty()?;
        let period = last_take.elapsed().as_secs_f64().max(1e-6);
        last_take = Instant::now();
        rr.dirty_rate = dirty.len() as f64 / period;
        at_dest.subtract(&dirty);
        let mut pending = dirty.clone();
        pending.union(&carry);
        rr.dirty_pages = pending.len() as u64;

        // The link's rate: the operator's figure when given, else the best round measured.
        let link = opts
            .bandwidth
            .map(|b| b as f64)
            .unwrap_or(best_wire_bw.max(wire_bw))
            .max(1.0);
        let wire_per_page = if sent_pages_total > 0 {
            (tx.wire_bytes as f64 / sent_pages_total as f64).clamp(64.0, PAGE_SIZE as f64 + 64.0)
        } else {
            PAGE_SIZE as f64
        };
        let page_rate = link / wire_per_page;
        let predicted_downtime = pending.len() as f64 / page_rate + rtt.as_secs_f64() / 2.0;
        rr.predicted_downtime_ms = predicted_downtime * 1000.0;
        if report.predicted.is_none() && round == 1 {
            report.predicted = Some(Predicted::new(&predict(model(link)), compression));
        }
        let d_over_r = rr.dirty_rate / page_rate;
        info!(
            round,
            pages = counts.pages,
            dirty = pending.len(),
            d_over_r,
            predicted_ms = rr.predicted_downtime_ms,
            "pre-copy round done"
        );
        prev_dirty.push(pending.len());

        if predicted_downtime <= opts.downtime_target.as_secs_f64() {
            report.converged =
                report.policy_applied == "none" || report.policy_applied == "throttle";
            report.rounds.push(rr);
            unsent = pending;
            break;
        }
        let stuck = prev_dirty.len() >= 3 && {
            let n = prev_dirty.len();
            prev_dirty[n - 1] as f64 > MIN_SHRINK * prev_dirty[n - 2] as f64
                && prev_dirty[n - 2] as f64 > MIN_SHRINK * prev_dirty[n - 3] as f64
        };
        let diverging = d_over_r >= DIVERGING || stuck;
        let too_slow = throttle > 0.0 && d_over_r > THROTTLE_TRIGGER;
        if round - limit_base.0 >= MAX_ROUNDS
            || (logical_total - limit_base.1) as f64 >= MAX_SENT_FACTOR * memory.bytes() as f64
        {
            report.policy_applied = "limit".into();
            report.rounds.push(rr);
            unsent = pending;
            break;
        }
        if diverging || too_slow {
            if diverging {
                info!(round, d_over_r, stuck, policy = %opts.on_diverge, "pre-copy does not converge");
            } else {
                info!(
                    round,
                    d_over_r, throttle, "throttled pre-copy converges too slowly"
                );
            }
            match opts.on_diverge {
                Policy::Throttle => {
                    report.policy_applied = "throttle".into();
                    throttle = if throttle == 0.0 {
                        0.2
                    } else {
                        (throttle + 0.1).min(0.99)
                    };
                    guest.set_throttle(throttle);
                    prev_dirty.clear();
                    // Xen's limits bound a migration that makes no progress; a throttled one
                    // does, so they count afresh from each step of the throttle.
                    limit_base = (round, logical_total);
                }
                Policy::Stop => {
                    report.policy_applied = "stop".into();
                    report.rounds.push(rr);
                    unsent = pending;
                    break;
                }
                Policy::Postcopy => {
                    report.policy_applied = "postcopy".into();
                    report.rounds.push(rr);
                    unsent = pending;
                    postcopy = true;
                    break;
                }
                Policy::Abort => {
                    report.policy_applied = "abort".into();
                    report.outcome = "aborted".into();
                    report.rounds.push(rr);
                    let reason = format!(
                        "pre-copy does not converge (d/r {d_over_r:.2} after round {round}); \
                         the guest keeps running at the source"
                    );
                    tx.msg(Message::MemAbort {
                        reason: reason.clone(),
                    })
                    .await?;
                    report.wire_bytes = tx.wire_bytes;
                    report.saved = tx.saved.clone();
                    report.total_ms = ms(start.elapsed());
                    return Err(MigrateError::Aborted(reason));
                }
            }
        }

        // Hold back pages dirtied in each of the last rounds, as many as keep the target.
        for (p, s) in streak.iter_mut().enumerate() {
            *s = if dirty.contains(p as u64) {
                s.saturating_add(1)
            } else {
                0
            };
        }
        let mut held = PageSet::new(pages);
        if opts.hold_hot {
            let budget = ((opts.downtime_target.as_secs_f64() - rtt.as_secs_f64() / 2.0).max(0.0)
                * page_rate
                / 2.0) as usize;
            for p in pending.iter() {
                if held.len() >= budget {
                    break;
                }
                if streak[p as usize] >= 2 {
                    held.insert(p);
                }
            }
        }
        rr.held_pages = held.len() as u64;
        tx.saved.held_page_sends += held.len() as u64;
        pending.subtract(&held);
        to_send = pending.to_vec();
        carry = held;
        report.rounds.push(rr);
        round += 1;
    }

    // The switchover.
    if *phase == Phase::Live {
        paused_at = Instant::now();
        paused_unix = super::unix_ns();
        guest.pause()?;
        *phase = Phase::Paused;
    }
    let mut final_set = guest.take_dirty()?;
    final_set.union(&carry);
    final_set.union(&unsent);
    let vcpu = guest.vcpu_state()?;
    let counter_at_pause = guest.counter();
    report.verified.counter_at_pause = counter_at_pause;
    let mut postcopy_report = None;

    if !postcopy {
        if opts.mode != Mode::Warm {
            let list = final_set.to_vec();
            round += 1;
            let t0 = Instant::now();
            let counts = tx.send(round, &list, BATCH_PAGES).await?;
            report.rounds.push(RoundReport {
                round,
                kind: "stop-and-copy".into(),
                pages: counts.pages,
                bytes: counts.bytes,
                elapsed_ms: ms(t0.elapsed()),
                zero_pages: counts.zero,
                ref_pages: counts.refs,
                throttle,
                ..RoundReport::default()
            });
        }
        tx.wr
            .send(&Frame::with_payload(
                Message::MemSwitchover {
                    paused_at_unix_ns: paused_unix,
                    postcopy: false,
                    discard: Vec::new(),
                },
                Bytes::from(vcpu),
            ))
            .await?;
        *phase = Phase::Switched;
        let resumed = expect(&mut inbox, "MemResumed", |m| {
            matches!(m, Message::MemResumed { .. })
        })
        .await?;
        report.downtime_ms = ms(paused_at.elapsed());
        if let Message::MemResumed {
            at_unix_ns,
            counter,
        } = resumed.msg
        {
            report.downtime_ms = at_unix_ns.saturating_sub(paused_unix) as f64 / 1e6;
            report.verified.counter_at_resume = counter;
        }
        report.total_ms = ms(start.elapsed());
    } else {
        // Post-copy: the destination drops its stale copies and runs; everything it lacks is
        // pushed in the background, and what it faults on is sent first.
        let discard = final_set.clone();
        for p in discard.iter() {
            tx.sent[p as usize] = None;
        }
        // Stale: every page the destination does not hold, dropped now or never sent (zero
        // pages skipped by the live rounds included: under userfaultfd they are missing).
        let mut stale = PageSet::new(pages);
        for (p, slot) in tx.sent.iter().enumerate() {
            if slot.is_none() {
                stale.insert(p as u64);
            }
        }
        tx.missing_is_zero = false;
        // The guest's own boot area (page tables, code, status) goes ahead of the switch so
        // that neither the first instruction nor the destination's status read faults.
        let boot: Vec<u64> = (0..(crate::workload::WORK_BASE / PAGE_SIZE as u64))
            .filter(|p| stale.contains(*p))
            .collect();
        if !report.rounds.is_empty() {
            round += 1;
        }
        let t0 = Instant::now();
        let mut counts = tx.send(round, &boot, BATCH_PAGES).await?;
        let mut discard = discard;
        for &p in &boot {
            stale.remove(p);
            discard.remove(p);
        }
        tx.refs = false;
        tx.wr
            .send(&Frame::with_payload(
                Message::MemSwitchover {
                    paused_at_unix_ns: paused_unix,
                    postcopy: true,
                    discard: discard.to_vec(),
                },
                Bytes::from(vcpu),
            ))
            .await?;
        *phase = Phase::Switched;
        let bucket = opts
            .bandwidth
            .map(|b| wan::TokenBucket::new(wan::Rate((b as f64 * PUSH_SHARE) as u64)));
        let mut remaining: std::collections::VecDeque<u64> = stale.iter().collect();
        let mut pc = PostcopyReport::default();
        let mut resumed = false;
        let mut demand: Vec<u64> = Vec::new();
        loop {
            // Serve faults first.
            while let Ok(f) = inbox.try_recv() {
                handle_postcopy_msg(f?, &mut demand, report, &mut resumed, paused_unix)?;
            }
            if !demand.is_empty() {
                // Every fault is answered, also for a page the push already sent: that copy
                // may still be on its way, and a duplicate costs less than a guess.
                let mut want: Vec<u64> = demand.drain(..).filter(|&p| p < pages as u64).collect();
                want.sort_unstable();
                want.dedup();
                pc.faults += want.len() as u64;
                for &p in &want {
                    stale.remove(p);
                }
                let c = tx.send(DEMAND_ROUND, &want, PUSH_BATCH_PAGES).await?;
                pc.demand_pages += c.pages;
                counts.bytes += c.bytes;
                continue;
            }
            let mut batch = Vec::with_capacity(PUSH_BATCH_PAGES);
            while batch.len() < PUSH_BATCH_PAGES {
                match remaining.pop_front() {
                    Some(p) if stale.contains(p) => batch.push(p),
                    Some(_) => {}
                    None => break,
                }
            }
            if batch.is_empty() {
                break;
            }
            for &p in &batch {
                stale.remove(p);
            }
            let c = tx.send(round, &batch, PUSH_BATCH_PAGES).await?;
            pc.pushed_pages += c.pages;
            counts.pages += c.pages;
            counts.bytes += c.bytes;
            counts.zero += c.zero;
            if let Some(bucket) = &bucket {
                let wait = bucket.reserve(c.bytes);
                if !wait.is_zero() {
                    // Sleep off the push's share, but wake for a fault.
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        f = inbox.recv() => {
                            let f = f.ok_or_else(|| MigrateError::Protocol("connection closed during post-copy".into()))?;
                            handle_postcopy_msg(f?, &mut demand, report, &mut resumed, paused_unix)?;
                        }
                    }
                }
            }
        }
        let memory_hash = hash_memory(&memory).await?;
        tx.msg(Message::MemComplete { memory_hash }).await?;
        loop {
            let f = inbox.recv().await.ok_or_else(|| {
                MigrateError::Protocol("connection closed before post-copy completed".into())
            })??;
            if matches!(f.msg, Message::MemCompleted) {
                break;
            }
            handle_postcopy_msg(f, &mut demand, report, &mut resumed, paused_unix)?;
        }
        report.total_ms = ms(start.elapsed());
        report.rounds.push(RoundReport {
            round,
            kind: "postcopy".into(),
            pages: counts.pages + pc.demand_pages,
            bytes: counts.bytes,
            elapsed_ms: ms(t0.elapsed()),
            zero_pages: counts.zero,
            throttle,
            ..RoundReport::default()
        });
        postcopy_report = Some(pc);
        let verdict = expect(&mut inbox, "MemVerified", |m| {
            matches!(m, Message::MemVerified { .. })
        })
        .await?;
        finish(report, verdict, memory_hash, postcopy_report, &tx);
        return Ok(());
    }

    // The source's memory stays as it was at the pause: hash it now that the downtime is over.
    let memory_hash = hash_memory(&memory).await?;
    tx.msg(Message::MemComplete { memory_hash }).await?;
    expect(&mut inbox, "MemCompleted", |m| {
        matches!(m, Message::MemCompleted)
    })
    .await?;
    let verdict = expect(&mut inbox, "MemVerified", |m| {
        matches!(m, Message::MemVerified { .. })
    })
    .await?;
    finish(report, verdict, memory_hash, postcopy_report, &tx);
    Ok(())
}

async fn hash_memory(memory: &Arc<Memory>) -> Result<ChunkHash, MigrateError> {
    let memory = memory.clone();
    tokio::task::spawn_blocking(move || memory_hash(&memory))
        .await
        .map_err(|e| MigrateError::Protocol(format!("hashing the guest's memory failed: {e}")))
}

fn handle_postcopy_msg(
    f: Frame,
    demand: &mut Vec<u64>,
    report: &mut Report,
    resumed: &mut bool,
    paused_unix: u64,
) -> Result<(), MigrateError> {
    match f.msg {
        Message::MemFault { pages } => demand.extend(pages),
        Message::MemResumed {
            at_unix_ns,
            counter,
        } => {
            *resumed = true;
            report.downtime_ms = at_unix_ns.saturating_sub(paused_unix) as f64 / 1e6;
            report.verified.counter_at_resume = counter;
        }
        Message::MemAbort { reason } => return Err(MigrateError::Aborted(reason)),
        other => {
            return Err(MigrateError::Protocol(format!(
                "unexpected {other:?} during post-copy"
            )))
        }
    }
    Ok(())
}

fn finish(
    report: &mut Report,
    verdict: Frame,
    memory_hash: ChunkHash,
    postcopy: Option<PostcopyReport>,
    tx: &Sender,
) {
    report.wire_bytes = tx.wire_bytes;
    report.saved = tx.saved.clone();
    let Message::MemVerified { report: json } = verdict.msg else {
        return;
    };
    let dest: DestinationReport = match serde_json::from_str(&json) {
        Ok(d) => d,
        Err(e) => {
            report.error = Some(format!("the destination's report does not parse: {e}"));
            report.outcome = "failed".into();
            return;
        }
    };
    let v = &mut report.verified;
    v.memory_hash_equal = dest.memory_hash == hex(&memory_hash);
    v.counter_after = dest.counter_after;
    v.guest_ran_on = dest.guest_ran_on && v.counter_at_resume == v.counter_at_pause;
    v.ok = v.memory_hash_equal && v.guest_ran_on && dest.error.is_none();
    if let Some(mut pc) = postcopy {
        pc.fault_p50_ms = dest.fault_p50_ms;
        pc.fault_p99_ms = dest.fault_p99_ms;
        pc.fault_max_ms = dest.fault_max_ms;
        pc.unanswered_faults = dest.unanswered_faults;
        pc.guest_writes_during_push = dest
            .counter_at_push_end
            .saturating_sub(dest.counter_at_resume);
        pc.faults = pc.faults.max(dest.faults);
        report.postcopy = Some(pc);
    }
    report.outcome = if v.ok { "migrated" } else { "failed" }.into();
    if let Some(e) = dest.error {
        report.error = Some(format!("destination: {e}"));
    } else if !v.ok {
        report.error = Some("verification failed: see verified".into());
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
