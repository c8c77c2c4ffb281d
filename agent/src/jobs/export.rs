//! The export job: a replica of this agent's store served over NBD (`helio export`, run by the
//! agent), absent chunks fetched from the source on demand and by a background copier. It
//! serves until cancelled; cancelling stops the listener and syncs the replica.

use super::{lock, Jobs, PROGRESS_EVERY};
use crate::error::Result;
use crate::model::Job;
use server::export::{ExportOptions, Exported, ReplicaDevice};
use server::nbd::handshake::Export;
use server::nbd::listener::{NbdAddr, NbdListener};
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// How long a read of an absent chunk retries an unreachable source before EIO.
const FETCH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

impl Jobs {
    pub(super) async fn run_export(&self, mut job: Job, cancel: CancellationToken) -> Result<()> {
        let addr: NbdAddr = match &job.spec.nbd {
            // Checked at creation.
            Some(a) => a
                .parse()
                .unwrap_or(NbdAddr::Unix(self.default_socket(&job.spec.disk))),
            None => NbdAddr::Unix(self.default_socket(&job.spec.disk)),
        };
        let (dev, listener) = match self.open_export(&job, &addr).await {
            Ok(x) => x,
            Err(e) => {
                return self.finish(&mut job, "failed", "the export could not start", Some(e))
            }
        };
        let where_ = listener.describe();
        let exports = vec![Export {
            name: job.spec.disk.clone(),
            device: Arc::new(crate::observed::Observed::new(
                Exported(dev.clone()),
                &job.spec.disk,
                self.metrics.clone(),
            )),
        }];
        let serve = tokio::spawn(listener.run(exports, None));
        let mut copier = tokio::spawn(dev.clone().background_copy());
        let socket = match &addr {
            NbdAddr::Unix(p) => Some(p.clone()),
            NbdAddr::Tcp(_) => None,
        };
        lock(&self.exports).insert(job.spec.disk.clone(), (dev.clone(), socket));
        self.set_phase(&mut job, "transferring", &format!("serving on {where_}"))?;
        let mut tick = tokio::time::interval(PROGRESS_EVERY);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tick.tick() => {}
            }
            let s = dev.status(&where_, 0.0);
            if s.absent_bytes > 0 && job.phase == "serving" {
                // Invalidated at a migration's switchover: chunks to fetch again.
                job.progress.bytes_done = s.present_bytes;
                self.set_phase(&mut job, "transferring", "chunks the source wrote after the replica got them are fetched again (a switchover)")?;
            }
            if copier.is_finished() && s.absent_bytes > 0 {
                copier = tokio::spawn(dev.clone().background_copy());
            }
            job.progress.bytes_total = s.size_bytes;
            job.progress.bytes_done = job.progress.bytes_done.max(s.present_bytes);
            job.figures = serde_json::to_value(&s).unwrap_or_default();
            if s.absent_bytes == 0 && job.phase != "serving" {
                self.set_phase(
                    &mut job,
                    "serving",
                    "every chunk is local; the source is no longer needed",
                )?;
            } else if let Err(e) = self.state.put(super::KIND, &job.id, &job, false) {
                tracing::warn!(job = %job.id, error = %e, "cannot store an export's progress");
            }
        }
        lock(&self.exports).remove(&job.spec.disk);
        serve.abort();
        copier.abort();
        let d = dev.clone();
        let synced = tokio::task::spawn_blocking(move || d.sync()).await;
        let why = match synced {
            Ok(Ok(())) => format!(
                "stopped on request: the NBD listener {where_} is closed and the replica synced"
            ),
            Ok(Err(e)) => format!("stopped on request; the final sync failed: {e}"),
            Err(e) => format!("stopped on request; the final sync did not run: {e}"),
        };
        if let NbdAddr::Unix(p) = &addr {
            let _ = std::fs::remove_file(p);
        }
        self.finish(&mut job, "cancelled", &why, None)
    }

    /// Opens the replica (with its source) and binds the listener.
    async fn open_export(
        &self,
        job: &Job,
        addr: &NbdAddr,
    ) -> std::result::Result<(Arc<ReplicaDevice>, NbdListener), String> {
        let peer = self.peer(&job.spec).map_err(|e| e.to_string())?;
        let opts = ExportOptions {
            read_only: false,
            fetch_timeout: FETCH_TIMEOUT,
            bandwidth: job.spec.bandwidth.as_deref().and_then(|b| b.parse().ok()),
            compress: peer
                .as_ref()
                .is_some_and(|p| !protocol::tls::is_loopback(&p.addr)),
        };
        let dev = ReplicaDevice::open(&self.store, &job.spec.disk, peer, &opts)
            .await
            .map_err(|e| format!("cannot export {:?}: {e}", job.spec.disk))?;
        if let NbdAddr::Unix(p) = addr {
            if let Some(parent) = p.parent() {
                let _ = std::fs::create_dir_all(parent);
            }
        }
        let listener = NbdListener::bind(addr, false)
            .await
            .map_err(|e| e.to_string())?;
        Ok((dev, listener))
    }

    /// Makes `chunks` of the running export of `disk` absent (a migration's switchover).
    pub fn invalidate(&self, disk: &str, chunks: &[u64]) -> Result<u64> {
        let dev = lock(&self.exports)
            .get(disk)
            .map(|(d, _)| d.clone())
            .ok_or_else(|| {
                crate::error::AgentError::not_found(
                    "export",
                    disk,
                    "start an export job of the disk first",
                )
            })?;
        dev.invalidate(chunks).map_err(|e| {
            crate::error::AgentError::Internal(format!("invalidating chunks of {disk:?}: {e}"))
        })
    }

    /// After a VM left this agent on the way back: the running export of `disk` records the
    /// VM's chunks with their hashes ([`ReplicaDevice::settle_written`]) and stops; the replica
    /// stays, the base of the next trip here. How many chunks were settled.
    pub async fn retire_export(&self, disk: &str) -> Result<u64> {
        let dev = self.export_device(disk).ok_or_else(|| {
            crate::error::AgentError::not_found("export", disk, "no export of it runs here")
        })?;
        let settled = tokio::task::spawn_blocking(move || dev.settle_written())
            .await
            .map_err(|e| crate::error::AgentError::Internal(format!("settling {disk:?}: {e}")))?
            .map_err(|e| crate::error::AgentError::Internal(format!("settling {disk:?}: {e}")))?;
        let running = self
            .list()?
            .into_iter()
            .filter(|j| j.spec.kind == "export" && j.spec.disk == disk && !j.ended());
        for j in running {
            self.cancel(&j.id)?;
        }
        Ok(settled)
    }

    /// The device of the running export of `disk`, if any.
    pub fn export_device(&self, disk: &str) -> Option<Arc<server::export::ReplicaDevice>> {
        lock(&self.exports).get(disk).map(|(d, _)| d.clone())
    }

    /// The unix socket of the running export of `disk`, if any.
    pub fn export_socket(&self, disk: &str) -> Option<std::path::PathBuf> {
        lock(&self.exports).get(disk).and_then(|(_, s)| s.clone())
    }

    fn default_socket(&self, disk: &str) -> std::path::PathBuf {
        self.exports_dir.join(format!("{disk}.sock"))
    }
}
