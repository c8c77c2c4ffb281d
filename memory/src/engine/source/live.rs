//! The live (pre-copy) rounds: send what is dirty, measure, ask the policy, hold hot pages.

use super::{ms, LiveEnd, Predictor, Run, Sent};
use crate::engine::policy;
use crate::engine::report::RoundReport;
use crate::engine::{MigrateError, Mode, Policy};
use crate::page::{PageSet, PAGE_SIZE};
use protocol::Message;
use std::time::Instant;
use tracing::info;

/// What the live rounds carry from one to the next.
struct Live {
    /// Hot pages held back by the last round.
    carry: PageSet,
    /// Per page, the consecutive rounds it was dirtied in.
    streak: Vec<u8>,
    last_take: Instant,
    /// The dirty set's size after each round since the throttle last changed.
    history: Vec<usize>,
    sent_pages: u64,
    /// Page bytes sent (logical), for Xen's limit.
    logical: u64,
    best_wire_bw: f64,
    /// Round and logical bytes from which the limits count.
    limit_base: (u32, u64),
}

/// A live round's figures, besides its report.
struct Assessed {
    rr: RoundReport,
    dirty: PageSet,
    pending: PageSet,
    page_rate: f64,
    next: policy::Next,
    d_over_r: f64,
}

impl Run<'_> {
    /// Pre-copy rounds (one round, the guest paused, for warm) until the rest fits the
    /// downtime target or a policy ends them.
    pub(super) async fn live_rounds(
        &mut self,
        predictor: &Predictor,
    ) -> Result<LiveEnd, MigrateError> {
        let mut live = Live {
            carry: PageSet::new(self.pages),
            streak: vec![0u8; self.pages],
            last_take: Instant::now(),
            history: Vec::new(),
            sent_pages: 0,
            logical: 0,
            best_wire_bw: 0.0,
            limit_base: (0, 0),
        };
        let mut to_send: Vec<u64> = (0..self.pages as u64).collect();
        loop {
            let sent = self.send_round(&to_send).await?;
            if self.opts.mode == Mode::Warm {
                let rr = self.round_report("warm", &sent);
                self.report.rounds.push(rr);
                return Ok(LiveEnd {
                    left: PageSet::new(self.pages),
                    postcopy: false,
                });
            }
            let Assessed {
                mut rr,
                dirty,
                mut pending,
                page_rate,
                next,
                d_over_r,
            } = self.assess(&sent, &mut live, predictor)?;
            match next {
                policy::Next::Switch => {
                    let p = &self.report.policy_applied;
                    self.report.converged = p == "none" || p == "throttle";
                    self.report.rounds.push(rr);
                    return Ok(LiveEnd {
                        left: pending,
                        postcopy: false,
                    });
                }
                policy::Next::Limit => {
                    self.report.policy_applied = "limit".into();
                    self.report.rounds.push(rr);
                    return Ok(LiveEnd {
                        left: pending,
                        postcopy: false,
                    });
                }
                policy::Next::Diverging { .. } | policy::Next::TooSlow => {
                    if let Some(end) = self
                        .on_divergence(next, d_over_r, &mut rr, &mut live)
                        .await?
                    {
                        self.report.rounds.push(rr);
                        return Ok(LiveEnd {
                            left: pending,
                            ..end
                        });
                    }
                }
                policy::Next::Continue => {}
            }
            // Hold back pages dirtied in each of the last rounds, as many as keep the target.
            policy::update_streaks(&mut live.streak, &dirty);
            let held = if self.opts.hold_hot {
                let budget = policy::hot_budget(self.opts.downtime_target, self.rtt, page_rate);
                policy::hot_pages(&pending, &live.streak, budget)
            } else {
                PageSet::new(self.pages)
            };
            rr.held_pages = held.len() as u64;
            self.tx.saved.held_page_sends += held.len() as u64;
            pending.subtract(&held);
            to_send = pending.to_vec();
            live.carry = held;
            self.report.rounds.push(rr);
            self.round += 1;
        }
    }

    /// Measures a live round (dirty rate, the link's page rate, the downtime the rest would
    /// take) and asks the policy what next.
    fn assess(
        &mut self,
        sent: &Sent,
        live: &mut Live,
        predictor: &Predictor,
    ) -> Result<Assessed, MigrateError> {
        let mut rr = self.round_report("live", sent);
        live.sent_pages += sent.counts.pages;
        live.logical += sent.counts.pages * PAGE_SIZE as u64;
        if sent.counts.bytes > 1 << 20 {
            live.best_wire_bw = live.best_wire_bw.max(rr.wire_bandwidth);
        }
        let dirty = self.guest.take_dirty()?;
        let period = live.last_take.elapsed().as_secs_f64().max(1e-6);
        live.last_take = Instant::now();
        rr.dirty_rate = dirty.len() as f64 / period;
        let mut pending = dirty.clone();
        pending.union(&live.carry);
        rr.dirty_pages = pending.len() as u64;
        // The link's rate: the operator's figure when given, else the best round measured.
        let link = self
            .opts
            .bandwidth
            .map(|b| b as f64)
            .unwrap_or(live.best_wire_bw.max(rr.wire_bandwidth))
            .max(1.0);
        let wire_per_page = if live.sent_pages > 0 {
            (self.tx.wire_bytes as f64 / live.sent_pages as f64)
                .clamp(64.0, PAGE_SIZE as f64 + 64.0)
        } else {
            PAGE_SIZE as f64
        };
        let page_rate = link / wire_per_page;
        let predicted_downtime = pending.len() as f64 / page_rate + self.rtt.as_secs_f64() / 2.0;
        rr.predicted_downtime_ms = predicted_downtime * 1000.0;
        if self.report.predicted.is_none() && self.round == 1 {
            self.report.predicted = Some(predictor.predicted(link));
        }
        let d_over_r = rr.dirty_rate / page_rate;
        info!(
            round = self.round,
            pages = sent.counts.pages,
            dirty = pending.len(),
            d_over_r,
            predicted_ms = rr.predicted_downtime_ms,
            "pre-copy round done"
        );
        live.history.push(pending.len());
        let measured = policy::Measured {
            predicted_downtime,
            d_over_r,
            throttle: self.throttle,
            rounds: self.round - live.limit_base.0,
            sent_factor: (live.logical - live.limit_base.1) as f64 / self.memory.bytes() as f64,
        };
        let next = policy::next(&measured, self.opts.downtime_target, &live.history);
        Ok(Assessed {
            rr,
            dirty,
            pending,
            page_rate,
            next,
            d_over_r,
        })
    }

    /// Applies the operator's policy to a pre-copy that does not converge (or, throttled,
    /// converges too slowly): `Some` ends the live rounds (the pages left are the caller's).
    async fn on_divergence(
        &mut self,
        next: policy::Next,
        d_over_r: f64,
        rr: &mut RoundReport,
        live: &mut Live,
    ) -> Result<Option<LiveEnd>, MigrateError> {
        let round = self.round;
        match next {
            policy::Next::Diverging { stuck } => {
                info!(round, d_over_r, stuck, policy = %self.opts.on_diverge, "pre-copy does not converge");
            }
            _ => info!(
                round,
                d_over_r,
                throttle = self.throttle,
                "throttled pre-copy converges too slowly"
            ),
        }
        let end = |postcopy| {
            Some(LiveEnd {
                left: PageSet::new(0),
                postcopy,
            })
        };
        match self.opts.on_diverge {
            Policy::Throttle => {
                self.report.policy_applied = "throttle".into();
                self.throttle = policy::next_throttle(self.throttle);
                self.guest.set_throttle(self.throttle);
                live.history.clear();
                // Xen's limits bound a migration that makes no progress; a throttled one
                // does, so they count afresh from each step of the throttle.
                live.limit_base = (round, live.logical);
                Ok(None)
            }
            Policy::Stop => {
                self.report.policy_applied = "stop".into();
                Ok(end(false))
            }
            Policy::Postcopy => {
                self.report.policy_applied = "postcopy".into();
                Ok(end(true))
            }
            Policy::Abort => {
                self.report.policy_applied = "abort".into();
                self.report.outcome = "aborted".into();
                let reason = format!(
                    "pre-copy does not converge (d/r {d_over_r:.2} after round {round}); \
                     the guest keeps running at the source"
                );
                self.tx
                    .msg(Message::MemAbort {
                        reason: reason.clone(),
                    })
                    .await?;
                self.report.rounds.push(rr.clone());
                self.report.wire_bytes = self.tx.wire_bytes;
                self.report.saved = self.tx.saved.clone();
                self.report.total_ms = ms(self.start.elapsed());
                Err(MigrateError::Aborted(reason))
            }
        }
    }
}
