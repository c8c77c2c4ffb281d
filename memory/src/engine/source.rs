//! The source side: pre-copy rounds with d/r convergence, hot pages held for the stop-and-copy,
//! divergence policies, warm migration and the post-copy push with demand faults served first.

use super::hashes::{hex, memory_hash, zero_page_hash};
use super::report::{DestinationReport, PostcopyReport, Predicted, Report, RoundReport, Saved};
use super::{MigrateError, MigrationSpec, Mode, Policy, DEMAND_ROUND};
use crate::guest::Guest;
use crate::model::ModelInput;
use crate::page::{PageSet, PAGE_SIZE};
use crate::region::{is_zero, Memory};
use crate::wire::{BatchBuilder, Record};
use bytes::Bytes;
use protocol::{ChunkHash, Conn, ConnError, Frame, FrameWriter, Message};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tracing::warn;

mod live;
mod postcopy;

/// Wire bytes a frame costs beyond its payload (length prefix, header, TLS record share): an
/// estimate, for counting wire bytes without asking the socket.
const FRAME_OVERHEAD: u64 = 32;
/// Pages per batch frame: 256 KiB of page data, enough for zstd to find repeats.
const BATCH_PAGES: usize = 64;
/// Pages per batch in the post-copy push: smaller, so that a fault waits behind less.
const PUSH_BATCH_PAGES: usize = 16;
/// Pages sampled before round 1 to estimate zero pages and compression for the prediction.
const SAMPLE_PAGES: u64 = 1024;
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

/// What one migration's phases share.
struct Run<'a> {
    guest: &'a mut dyn Guest,
    opts: &'a SourceOptions,
    report: &'a mut Report,
    phase: &'a mut Phase,
    tx: Sender,
    inbox: Inbox,
    memory: Arc<Memory>,
    pages: usize,
    start: Instant,
    rtt: Duration,
    /// The round being sent (also numbers the stop-and-copy and the push).
    round: u32,
    throttle: f64,
    paused_at: Instant,
    paused_unix: u64,
}

/// How the live rounds ended.
struct LiveEnd {
    /// Pages left dirty (or held back) for the switchover.
    left: PageSet,
    /// Switch over by post-copy.
    postcopy: bool,
}

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
    let (tx, inbox, reader) = open_channel(conn, &memory, opts.compress);
    let _reader = AbortOnDrop(reader);
    let mut run = Run {
        pages: memory.pages(),
        memory,
        guest,
        opts,
        report,
        phase,
        tx,
        inbox,
        start,
        rtt: Duration::ZERO,
        round: 1,
        throttle: 0.0,
        paused_at: Instant::now(),
        paused_unix: 0,
    };
    run.handshake(spec).await?;
    run.guest.start_dirty_log()?;
    let predictor = run.predictor(spec)?;
    if let Some(bw) = opts.bandwidth {
        run.report.predicted = Some(predictor.predicted(bw as f64));
    }
    if opts.mode == Mode::Warm {
        run.pause()?;
    }
    let live = match opts.mode {
        // Post-copy sends nothing before the switch but the boot pages.
        Mode::Postcopy => LiveEnd {
            left: PageSet::new(run.pages),
            postcopy: true,
        },
        _ => run.live_rounds(&predictor).await?,
    };
    if *run.phase == Phase::Live {
        run.pause()?;
    }
    let mut final_set = run.guest.take_dirty()?;
    final_set.union(&live.left);
    let vcpu = run.guest.vcpu_state()?;
    run.report.verified.counter_at_pause = run.guest.counter();
    if live.postcopy {
        run.postcopy(final_set, vcpu).await
    } else {
        run.stop_and_copy(final_set, vcpu).await
    }
}

/// Splits `conn`: a sender of pages, and an inbox fed by a task that also takes the
/// destination's acknowledgements (which pace the sender).
fn open_channel(
    conn: Conn,
    memory: &Arc<Memory>,
    compress: bool,
) -> (Sender, Inbox, tokio::task::JoinHandle<()>) {
    let (mut rd, wr) = conn.split();
    let (inbox_tx, inbox) = mpsc::unbounded_channel();
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
                if inbox_tx.send(f).is_err() || done {
                    break;
                }
            }
            flow.closed.store(true, std::sync::atomic::Ordering::SeqCst);
            flow.notify.notify_waiters();
        })
    };
    let tx = Sender {
        wr,
        memory: memory.clone(),
        sent: vec![None; memory.pages()],
        by_hash: HashMap::new(),
        refs: true,
        missing_is_zero: true,
        compress,
        wire_bytes: 0,
        saved: Saved::default(),
        buf: vec![0u8; PAGE_SIZE],
        batch: BatchBuilder::default(),
        flow,
        payload_sent: 0,
        window: 4 << 20,
    };
    (tx, inbox, reader)
}

/// The model's inputs for this guest and link, but the link's rate.
struct Predictor {
    input: ModelInput,
    mode: Mode,
    compression: f64,
}

impl Predictor {
    fn prediction(&self, bandwidth: f64) -> crate::model::Prediction {
        let m = ModelInput {
            bandwidth,
            ..self.input.clone()
        };
        match self.mode {
            Mode::Precopy => m.predict(),
            Mode::Warm => m.predict_warm(),
            Mode::Postcopy => m.predict_postcopy(PUSH_SHARE),
        }
    }

    fn predicted(&self, bandwidth: f64) -> Predicted {
        Predicted::new(&self.prediction(bandwidth), self.compression)
    }
}

/// One live round's sending, as measured.
struct Sent {
    counts: Counts,
    elapsed: Duration,
}

impl Run<'_> {
    /// Announces the migration, waits for the destination, measures the round trip and sizes
    /// the window of unacknowledged bytes from it.
    async fn handshake(&mut self, spec: &MigrationSpec) -> Result<(), MigrateError> {
        let spec_json =
            serde_json::to_string(spec).map_err(|e| MigrateError::Protocol(e.to_string()))?;
        self.tx.msg(Message::MemStart { spec: spec_json }).await?;
        expect(&mut self.inbox, "MemReady", |m| {
            matches!(m, Message::MemReady)
        })
        .await?;
        let ping = Instant::now();
        self.tx.msg(Message::Ping { id: 1 }).await?;
        expect(&mut self.inbox, "Pong", |m| {
            matches!(m, Message::Pong { .. })
        })
        .await?;
        self.rtt = ping.elapsed();
        self.report.rtt_ms = ms(self.rtt);
        if let Some(bw) = self.opts.bandwidth {
            // A quarter over the product: acknowledgements come after the destination has
            // installed a batch and queue behind data on a busy link, so exactly one product
            // leaves the link idle part of the time (measured: 93-118 MB/s of 125 at 1.0×, 124
            // at 1.25×); more only queues in front of the stop-and-copy (downtime +3-6 ms at
            // 1.5×).
            self.tx.window = (bw as f64 * self.rtt.as_secs_f64() * 1.25) as u64 + (256 << 10);
        }
        Ok(())
    }

    /// Samples memory (zero pages, compression) for the model.
    fn predictor(&self, spec: &MigrationSpec) -> Result<Predictor, MigrateError> {
        let (zero_fraction, compression) = sample(&self.memory);
        let layout = spec
            .workload
            .layout()
            .map_err(|e| MigrateError::Protocol(e.to_string()))?;
        let input = ModelInput {
            memory_bytes: (self.memory.bytes() as f64 * (1.0 - zero_fraction)) as u64,
            total_pages: self.pages as u64,
            dirty_rate: spec.workload.dirty_rate as f64,
            bandwidth: 0.0,
            compression,
            hot_pages: if layout.hot_per_mille > 0 {
                layout.hot_pages
            } else {
                0
            },
            hot_fraction: spec.workload.hot_fraction,
            rtt: self.rtt.as_secs_f64(),
            downtime_target: self.opts.downtime_target.as_secs_f64(),
            hold_hot: self.opts.hold_hot,
        };
        Ok(Predictor {
            input,
            mode: self.opts.mode,
            compression,
        })
    }

    fn pause(&mut self) -> Result<(), MigrateError> {
        self.paused_at = Instant::now();
        self.paused_unix = super::unix_ns();
        self.guest.pause()?;
        *self.phase = Phase::Paused;
        Ok(())
    }

    /// Sends `pages` as round `self.round`, timed.
    async fn send_round(&mut self, pages: &[u64]) -> Result<Sent, MigrateError> {
        let t0 = Instant::now();
        // Rounds follow each other without waiting for acknowledgements (the window paces
        // them), so a round lasts as long as its pages take to send.
        let counts = self.tx.send(self.round, pages, BATCH_PAGES).await?;
        Ok(Sent {
            counts,
            elapsed: t0.elapsed(),
        })
    }

    fn round_report(&self, kind: &str, sent: &Sent) -> RoundReport {
        let secs = sent.elapsed.as_secs_f64().max(1e-6);
        RoundReport {
            round: self.round,
            kind: kind.into(),
            pages: sent.counts.pages,
            bytes: sent.counts.bytes,
            elapsed_ms: ms(sent.elapsed),
            bandwidth: sent.counts.pages as f64 * PAGE_SIZE as f64 / secs,
            wire_bandwidth: sent.counts.bytes as f64 / secs,
            zero_pages: sent.counts.zero,
            ref_pages: sent.counts.refs,
            throttle: self.throttle,
            ..RoundReport::default()
        }
    }
}
impl Run<'_> {
    /// The pre-copy switchover: the last dirty pages with the guest paused, then the vCPU
    /// state; waits for the destination to resume, then verifies.
    async fn stop_and_copy(
        &mut self,
        final_set: PageSet,
        vcpu: Vec<u8>,
    ) -> Result<(), MigrateError> {
        if self.opts.mode != Mode::Warm {
            self.round += 1;
            let sent = self.send_round(&final_set.to_vec()).await?;
            let rr = self.round_report("stop-and-copy", &sent);
            self.report.rounds.push(RoundReport {
                bandwidth: 0.0,
                wire_bandwidth: 0.0,
                ..rr
            });
        }
        self.switch_over(false, Vec::new(), vcpu).await?;
        let resumed = expect(&mut self.inbox, "MemResumed", |m| {
            matches!(m, Message::MemResumed { .. })
        })
        .await?;
        self.report.downtime_ms = ms(self.paused_at.elapsed());
        if let Message::MemResumed {
            at_unix_ns,
            counter,
        } = resumed.msg
        {
            note_resumed(self.report, at_unix_ns, counter, self.paused_unix);
        }
        self.report.total_ms = ms(self.start.elapsed());
        // The source's memory stays as it was at the pause: hash it now that the downtime is
        // over.
        let memory_hash = hash_memory(&self.memory).await?;
        self.tx.msg(Message::MemComplete { memory_hash }).await?;
        expect(&mut self.inbox, "MemCompleted", |m| {
            matches!(m, Message::MemCompleted)
        })
        .await?;
        self.verify(memory_hash, None).await
    }

    /// Sends the switchover (with the pages the destination must drop, for post-copy).
    async fn switch_over(
        &mut self,
        postcopy: bool,
        discard: Vec<u64>,
        vcpu: Vec<u8>,
    ) -> Result<(), MigrateError> {
        self.tx
            .wr
            .send(&Frame::with_payload(
                Message::MemSwitchover {
                    paused_at_unix_ns: self.paused_unix,
                    postcopy,
                    discard,
                },
                Bytes::from(vcpu),
            ))
            .await?;
        *self.phase = Phase::Switched;
        Ok(())
    }

    /// Waits for the destination's verdict and completes the report.
    async fn verify(
        &mut self,
        memory_hash: ChunkHash,
        postcopy: Option<PostcopyReport>,
    ) -> Result<(), MigrateError> {
        let verdict = expect(&mut self.inbox, "MemVerified", |m| {
            matches!(m, Message::MemVerified { .. })
        })
        .await?;
        finish(self.report, verdict, memory_hash, postcopy, &self.tx);
        Ok(())
    }
}

/// The destination resumed the guest at `at_unix_ns` with its counter at `counter`: the
/// downtime is that time less the pause's, on the shared clock.
fn note_resumed(report: &mut Report, at_unix_ns: u64, counter: u64, paused_unix: u64) {
    report.downtime_ms = at_unix_ns.saturating_sub(paused_unix) as f64 / 1e6;
    report.verified.counter_at_resume = counter;
}

async fn hash_memory(memory: &Arc<Memory>) -> Result<ChunkHash, MigrateError> {
    let memory = memory.clone();
    tokio::task::spawn_blocking(move || memory_hash(&memory))
        .await
        .map_err(|e| MigrateError::Protocol(format!("hashing the guest's memory failed: {e}")))
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
    v.pages_reread = dest.pages_reread;
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
