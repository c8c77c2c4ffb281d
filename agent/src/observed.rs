//! An NBD device that counts and times every request into the agent's metrics, wrapped around
//! the VMs' tracked disks and the export jobs' replicas.

use crate::metrics::{Metrics, NbdLabels};
use server::nbd::device::{Device, DeviceError, Extent};
use std::future::Future;
use std::time::Instant;

/// `inner`, observed under the export name `export`.
pub struct Observed<D> {
    inner: D,
    export: String,
    metrics: Metrics,
}

impl<D> Observed<D> {
    /// Wraps `inner`.
    pub fn new(inner: D, export: &str, metrics: Metrics) -> Observed<D> {
        Observed {
            inner,
            export: export.to_string(),
            metrics,
        }
    }

    async fn timed<T>(
        &self,
        command: &'static str,
        f: impl Future<Output = Result<T, DeviceError>>,
    ) -> Result<T, DeviceError> {
        let started = Instant::now();
        let r = f.await;
        let labels = NbdLabels {
            export: self.export.clone(),
            command: command.into(),
        };
        self.metrics
            .nbd_latency
            .get_or_create(&labels)
            .observe(started.elapsed().as_secs_f64());
        if r.is_err() {
            self.metrics.nbd_errors.get_or_create(&labels).inc();
        }
        r
    }
}

impl<D: Device> Device for Observed<D> {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_only(&self) -> bool {
        self.inner.read_only()
    }
    async fn read(&self, offset: u64, len: u32) -> Result<Vec<u8>, DeviceError> {
        self.timed("read", self.inner.read(offset, len)).await
    }
    async fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> Result<(), DeviceError> {
        self.timed("write", self.inner.write(offset, data, fua))
            .await
    }
    async fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        no_hole: bool,
        fua: bool,
    ) -> Result<(), DeviceError> {
        self.timed(
            "write_zeroes",
            self.inner.write_zeroes(offset, len, no_hole, fua),
        )
        .await
    }
    fn zeroing_is_fast(&self, offset: u64, len: u32) -> bool {
        self.inner.zeroing_is_fast(offset, len)
    }
    async fn trim(&self, offset: u64, len: u32, fua: bool) -> Result<(), DeviceError> {
        self.timed("trim", self.inner.trim(offset, len, fua)).await
    }
    async fn flush(&self) -> Result<(), DeviceError> {
        self.timed("flush", self.inner.flush()).await
    }
    async fn cache(&self, offset: u64, len: u32) -> Result<(), DeviceError> {
        self.timed("cache", self.inner.cache(offset, len)).await
    }
    async fn block_status(&self, offset: u64, len: u32) -> Result<Vec<Extent>, DeviceError> {
        self.timed("block_status", self.inner.block_status(offset, len))
            .await
    }
}
