//! A manual switchover: the migration waits in `ready`, the VM running here untouched, until
//! `POST /v1/migrations/{id}/switchover`. The hold comes before QEMU's migration starts: once
//! pre-copy converges QEMU switches over by itself (a 1 ms downtime limit did not hold it when
//! the guest's dirty set got small), so memory moves after the go, as a replication-assisted
//! vMotion waits for its switchover window with only the disks replicated. While held, the
//! disks keep in step (a sync or way-back round every [`HOLD_ROUND`]) and the control
//! connection stays alive; after the go a last round runs, then the memory moves and the cut.

use super::disk::{ask, Ctl};
use super::{lock, Migration, Migrations};
use protocol::Message;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often a held migration's disks catch up (and its connection proves alive).
const HOLD_ROUND: Duration = Duration::from_secs(30);
/// How often the go is looked for.
const HOLD_POLL: Duration = Duration::from_millis(100);

impl Migrations {
    /// Holds migration `m` in `ready` until its switchover is let go; `disks` are replicated
    /// from `source` (none for shared disks; a way back's disks are in `ctl`).
    pub(super) async fn hold(
        &self,
        m: &mut Migration,
        ctl: &mut Ctl,
        disks: &[String],
        source: &str,
    ) -> Result<(), String> {
        let go = Arc::new(AtomicBool::new(false));
        lock(&self.go).insert(m.id.clone(), go.clone());
        let held = self.wait_for_go(m, ctl, disks, source, &go).await;
        lock(&self.go).remove(&m.id);
        held
    }

    async fn wait_for_go(
        &self,
        m: &mut Migration,
        ctl: &mut Ctl,
        disks: &[String],
        source: &str,
        go: &AtomicBool,
    ) -> Result<(), String> {
        let p = &m.figures["prediction"];
        let why = format!(
            "the disks are in step and the VM runs here; POST /v1/migrations/{}/switchover moves its memory (predicted {:.1} s) and cuts over (predicted downtime {:.0} ms)",
            m.id,
            p["total_ms"].as_f64().unwrap_or(0.0) / 1000.0,
            p["downtime_ms"].as_f64().unwrap_or(0.0),
        );
        self.set_phase(m, "ready", &why)
            .map_err(|e| e.to_string())?;
        let (held, mut last, mut rounds) = (Instant::now(), Instant::now(), 0);
        while !go.load(Ordering::SeqCst) {
            tokio::time::sleep(HOLD_POLL).await;
            if last.elapsed() >= HOLD_ROUND {
                rounds += 1;
                self.keep_in_step(m, ctl, disks, source, &format!("hold-{rounds}"))
                    .await?;
                last = Instant::now();
            }
        }
        m.figures["held_ms"] = (held.elapsed().as_millis() as u64).into();
        let why = "switchover let go: a last disk round, then the memory moves";
        self.set_phase(m, "syncing", why)
            .map_err(|e| e.to_string())?;
        self.keep_in_step(m, ctl, disks, source, "after-hold").await
    }

    /// A round trip on the control connection, then a round of every disk.
    async fn keep_in_step(
        &self,
        m: &mut Migration,
        ctl: &mut Ctl,
        disks: &[String],
        source: &str,
        label: &str,
    ) -> Result<(), String> {
        match ask(&mut ctl.conn, Message::Ping { id: 2 }).await? {
            Message::Pong { .. } => {}
            other => return Err(format!("the destination answered {other:?} to a ping")),
        }
        if !ctl.returning.is_empty() {
            self.return_round(m, ctl, label).await?;
        }
        for d in disks {
            self.sync_round(m, ctl, d, source, label).await?;
        }
        Ok(())
    }
}
