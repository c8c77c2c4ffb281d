//! The guest and engine flags shared by `helio memory demo` and `helio memory source`.

use crate::units::parse_size;
use memory::engine::source::SourceOptions;
use memory::engine::{Mode, Policy};
use memory::{Backend, Workload};
use std::time::Duration;
use wan::Rate;

/// What guest to run and how to migrate it.
#[derive(clap::Args, Clone, Debug)]
pub struct GuestArgs {
    /// Guest implementation: kvm (a micro-VM on /dev/kvm) or synthetic (a writer thread).
    #[arg(long, default_value = "kvm")]
    pub backend: Backend,
    /// precopy (live rounds, then stop-and-copy), warm (pause, copy, resume) or postcopy
    /// (resume at once, pull pages on demand).
    #[arg(long, default_value = "precopy")]
    pub mode: Mode,
    /// Guest RAM (a multiple of 2 MiB).
    #[arg(long, default_value = "256MiB")]
    pub memory: String,
    /// Page writes per second while the guest runs.
    #[arg(long, default_value_t = 5000)]
    pub dirty_rate: u64,
    /// Size of the hot set (the writable working set, rewritten often); 0 for none.
    #[arg(long, default_value = "0")]
    pub hot_set: String,
    /// Fraction of writes that go to the hot set.
    #[arg(long, default_value_t = 0.9)]
    pub hot_fraction: f64,
    /// Fraction of pages the guest leaves zero.
    #[arg(long, default_value_t = 0.2)]
    pub zero_fraction: f64,
    /// Fraction of pages filled with random (incompressible) bytes; the rest not zero,
    /// random or duplicate is text-like.
    #[arg(long, default_value_t = 0.4)]
    pub random_fraction: f64,
    /// Fraction of pages that duplicate one of 16 templates.
    #[arg(long, default_value_t = 0.1)]
    pub duplicate_fraction: f64,
    /// Seeds the guest's fill and its choice of pages.
    #[arg(long, default_value_t = 0x5eed)]
    pub seed: u64,
    /// Switch over once the predicted downtime is within this.
    #[arg(long, default_value = "50ms", value_parser = humantime::parse_duration)]
    pub downtime_target: Duration,
    /// When pre-copy does not converge (d/r ≥ 1): throttle, postcopy, stop or abort.
    #[arg(long, default_value = "throttle")]
    pub on_diverge: Policy,
    /// Resend hot pages every round instead of holding them for the stop-and-copy.
    #[arg(long)]
    pub no_hold_hot: bool,
    /// Send pages uncompressed.
    #[arg(long)]
    pub no_compress: bool,
    /// How long the guest runs before the migration starts.
    #[arg(long, default_value = "500ms", value_parser = humantime::parse_duration)]
    pub warmup: Duration,
    /// How long the destination lets the moved guest run before it reports.
    #[arg(long, default_value = "300ms", value_parser = humantime::parse_duration)]
    pub run_after: Duration,
}

impl GuestArgs {
    pub fn workload(&self) -> anyhow::Result<Workload> {
        let w = Workload {
            memory_bytes: parse_size(&self.memory)?,
            dirty_rate: self.dirty_rate,
            hot_set_bytes: parse_size(&self.hot_set)?,
            hot_fraction: self.hot_fraction,
            zero_fraction: self.zero_fraction,
            random_fraction: self.random_fraction,
            duplicate_fraction: self.duplicate_fraction,
            seed: self.seed,
        };
        w.layout()?;
        Ok(w)
    }

    pub fn options(&self, bandwidth: Option<Rate>) -> SourceOptions {
        SourceOptions {
            mode: self.mode,
            downtime_target: self.downtime_target,
            on_diverge: self.on_diverge,
            bandwidth: bandwidth.map(|r| r.bytes_per_sec()),
            hold_hot: !self.no_hold_hot,
            compress: !self.no_compress,
            run_after: self.run_after,
        }
    }

    /// The flags again, for the source process the demo starts.
    pub fn to_flags(&self) -> Vec<String> {
        let mut f = vec![
            format!("--backend={}", self.backend),
            format!("--mode={}", self.mode),
            format!("--memory={}", self.memory),
            format!("--dirty-rate={}", self.dirty_rate),
            format!("--hot-set={}", self.hot_set),
            format!("--hot-fraction={}", self.hot_fraction),
            format!("--zero-fraction={}", self.zero_fraction),
            format!("--random-fraction={}", self.random_fraction),
            format!("--duplicate-fraction={}", self.duplicate_fraction),
            format!("--seed={}", self.seed),
            format!(
                "--downtime-target={}",
                humantime::format_duration(self.downtime_target)
            ),
            format!("--on-diverge={}", self.on_diverge),
            format!("--warmup={}", humantime::format_duration(self.warmup)),
            format!("--run-after={}", humantime::format_duration(self.run_after)),
        ];
        if self.no_hold_hot {
            f.push("--no-hold-hot".into());
        }
        if self.no_compress {
            f.push("--no-compress".into());
        }
        f
    }
}
