//! The post-copy switchover and push: the destination runs at once; the pages it lacks are
//! pushed in the background and the ones it faults on are sent first.

use super::{
    hash_memory, ms, note_resumed, Counts, Run, BATCH_PAGES, PUSH_BATCH_PAGES, PUSH_SHARE,
};
use crate::engine::report::{PostcopyReport, Report, RoundReport};
use crate::engine::{MigrateError, DEMAND_ROUND};
use crate::page::{PageSet, PAGE_SIZE};
use protocol::{Frame, Message};
use std::time::{Duration, Instant};

/// The post-copy push's state: what the destination still lacks, and the faults to serve.
struct Push {
    stale: PageSet,
    demand: Vec<u64>,
    pc: PostcopyReport,
    counts: Counts,
}

impl Run<'_> {
    /// Post-copy: the destination drops its stale copies and runs; everything it lacks is
    /// pushed in the background, and what it faults on is sent first.
    pub(super) async fn postcopy(
        &mut self,
        final_set: PageSet,
        vcpu: Vec<u8>,
    ) -> Result<(), MigrateError> {
        let mut discard = final_set;
        for p in discard.iter() {
            self.tx.sent[p as usize] = None;
        }
        // Stale: every page the destination does not hold, dropped now or never sent (zero
        // pages skipped by the live rounds included: under userfaultfd they are missing).
        let mut stale = PageSet::new(self.pages);
        for (p, slot) in self.tx.sent.iter().enumerate() {
            if slot.is_none() {
                stale.insert(p as u64);
            }
        }
        self.tx.missing_is_zero = false;
        // The guest's own boot area (page tables, code, status) goes ahead of the switch so
        // that neither the first instruction nor the destination's status read faults.
        let boot: Vec<u64> = (0..(crate::workload::WORK_BASE / PAGE_SIZE as u64))
            .filter(|p| stale.contains(*p))
            .collect();
        if !self.report.rounds.is_empty() {
            self.round += 1;
        }
        let t0 = Instant::now();
        let counts = self.tx.send(self.round, &boot, BATCH_PAGES).await?;
        for &p in &boot {
            stale.remove(p);
            discard.remove(p);
        }
        self.tx.refs = false;
        self.switch_over(true, discard.to_vec(), vcpu).await?;
        let mut push = Push {
            stale,
            demand: Vec::new(),
            pc: PostcopyReport::default(),
            counts,
        };
        self.push(&mut push).await?;
        let memory_hash = hash_memory(&self.memory).await?;
        self.tx.msg(Message::MemComplete { memory_hash }).await?;
        loop {
            let f = self.inbox.recv().await.ok_or_else(|| {
                MigrateError::Protocol("connection closed before post-copy completed".into())
            })??;
            if matches!(f.msg, Message::MemCompleted) {
                break;
            }
            handle_postcopy_msg(f, &mut push, self.report, self.paused_unix)?;
        }
        self.report.total_ms = ms(self.start.elapsed());
        self.report.rounds.push(RoundReport {
            round: self.round,
            kind: "postcopy".into(),
            pages: push.counts.pages + push.pc.demand_pages,
            bytes: push.counts.bytes,
            elapsed_ms: ms(t0.elapsed()),
            zero_pages: push.counts.zero,
            throttle: self.throttle,
            ..RoundReport::default()
        });
        self.verify(memory_hash, Some(push.pc)).await
    }

    /// Pushes every stale page, serving faults first, paced to the push's share of the link.
    async fn push(&mut self, push: &mut Push) -> Result<(), MigrateError> {
        let bucket = self
            .opts
            .bandwidth
            .map(|b| wan::TokenBucket::new(wan::Rate((b as f64 * PUSH_SHARE) as u64)));
        let mut remaining: std::collections::VecDeque<u64> = push.stale.iter().collect();
        loop {
            while let Ok(f) = self.inbox.try_recv() {
                handle_postcopy_msg(f?, push, self.report, self.paused_unix)?;
            }
            if !push.demand.is_empty() {
                self.serve_faults(push).await?;
                continue;
            }
            let mut batch = Vec::with_capacity(PUSH_BATCH_PAGES);
            while batch.len() < PUSH_BATCH_PAGES {
                match remaining.pop_front() {
                    Some(p) if push.stale.contains(p) => batch.push(p),
                    Some(_) => {}
                    None => break,
                }
            }
            if batch.is_empty() {
                return Ok(());
            }
            for &p in &batch {
                push.stale.remove(p);
            }
            let c = self.tx.send(self.round, &batch, PUSH_BATCH_PAGES).await?;
            push.pc.pushed_pages += c.pages;
            push.counts.pages += c.pages;
            push.counts.bytes += c.bytes;
            push.counts.zero += c.zero;
            let wait = bucket
                .as_ref()
                .map_or(Duration::ZERO, |b| b.reserve(c.bytes));
            if !wait.is_zero() {
                // Sleep off the push's share, but wake for a fault.
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    f = self.inbox.recv() => {
                        let f = f.ok_or_else(|| MigrateError::Protocol("connection closed during post-copy".into()))?;
                        handle_postcopy_msg(f?, push, self.report, self.paused_unix)?;
                    }
                }
            }
        }
    }

    /// Sends the pages faulted on. Every fault is answered, also for a page the push already
    /// sent: that copy may still be on its way, and a duplicate costs less than a guess.
    async fn serve_faults(&mut self, push: &mut Push) -> Result<(), MigrateError> {
        let pages = self.pages as u64;
        let mut want: Vec<u64> = push.demand.drain(..).filter(|&p| p < pages).collect();
        want.sort_unstable();
        want.dedup();
        push.pc.faults += want.len() as u64;
        for &p in &want {
            push.stale.remove(p);
        }
        let c = self.tx.send(DEMAND_ROUND, &want, PUSH_BATCH_PAGES).await?;
        push.pc.demand_pages += c.pages;
        push.counts.bytes += c.bytes;
        Ok(())
    }
}

fn handle_postcopy_msg(
    f: Frame,
    push: &mut Push,
    report: &mut Report,
    paused_unix: u64,
) -> Result<(), MigrateError> {
    match f.msg {
        Message::MemFault { pages } => push.demand.extend(pages),
        Message::MemResumed {
            at_unix_ns,
            counter,
        } => note_resumed(report, at_unix_ns, counter, paused_unix),
        Message::MemAbort { reason } => return Err(MigrateError::Aborted(reason)),
        other => {
            return Err(MigrateError::Protocol(format!(
                "unexpected {other:?} during post-copy"
            )))
        }
    }
    Ok(())
}
