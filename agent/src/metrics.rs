//! `/metrics` in Prometheus text format (the `prometheus-client` crate): API requests and
//! their latency, bytes and chunks received per peer, jobs by phase and VMs by state.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::Arc;

/// Labels of an API request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// HTTP method.
    pub method: String,
    /// The route's template (`/v1/jobs/{id}`), never the raw path.
    pub route: String,
    /// Status code.
    pub status: u16,
}

/// Labels naming a peer.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabels {
    /// The peer's address.
    pub peer: String,
}

/// Labels of an NBD request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NbdLabels {
    /// The export (disk) name.
    pub export: String,
    /// `read`, `write`, `flush`, ...
    pub command: String,
}

/// Labels naming a phase or state.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabels {
    /// The phase or state.
    pub phase: String,
}

/// The agent's metrics.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    /// API requests.
    pub requests: Family<RequestLabels, Counter>,
    /// API latency.
    pub latency: Family<RequestLabels, Histogram>,
    /// Bytes received from each peer (jobs' wire bytes).
    pub peer_bytes_received: Family<PeerLabels, Counter>,
    /// Chunk payload bytes sent to each peer agent (by its name).
    pub peer_bytes_sent: Family<PeerLabels, Counter>,
    /// Chunks sent to each peer agent.
    pub chunks_sent: Family<PeerLabels, Counter>,
    /// Chunks fetched from each peer.
    pub chunks_fetched: Family<PeerLabels, Counter>,
    /// Chunks deduplicated locally while transferring from each peer.
    pub chunks_deduplicated: Family<PeerLabels, Counter>,
    /// NBD requests served (count and latency), per export and command.
    pub nbd_latency: Family<NbdLabels, Histogram>,
    /// NBD requests that failed.
    pub nbd_errors: Family<NbdLabels, Counter>,
    /// Jobs by phase (set at each scrape).
    pub jobs: Family<PhaseLabels, Gauge>,
    /// VMs by state (set at each scrape).
    pub vms: Family<PhaseLabels, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Metrics {
        let mut r = Registry::with_prefix("helio");
        let requests = Family::<RequestLabels, Counter>::default();
        let latency = Family::<RequestLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0001, 2.0, 18))
        });
        let peer_bytes_received = Family::<PeerLabels, Counter>::default();
        let chunks_fetched = Family::<PeerLabels, Counter>::default();
        let peer_bytes_sent = Family::<PeerLabels, Counter>::default();
        let chunks_sent = Family::<PeerLabels, Counter>::default();
        let chunks_deduplicated = Family::<PeerLabels, Counter>::default();
        let nbd_latency = Family::<NbdLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.00001, 2.0, 22))
        });
        let nbd_errors = Family::<NbdLabels, Counter>::default();
        let jobs = Family::<PhaseLabels, Gauge>::default();
        let vms = Family::<PhaseLabels, Gauge>::default();
        r.register("api_requests", "API requests served", requests.clone());
        r.register(
            "api_request_seconds",
            "API request latency",
            latency.clone(),
        );
        r.register(
            "peer_received_bytes",
            "Bytes received from a peer agent",
            peer_bytes_received.clone(),
        );
        r.register(
            "chunks_fetched",
            "Chunks fetched from a peer agent",
            chunks_fetched.clone(),
        );
        r.register(
            "chunks_deduplicated",
            "Chunks copied locally instead of fetched",
            chunks_deduplicated.clone(),
        );
        r.register(
            "nbd_request_seconds",
            "NBD requests served and their latency",
            nbd_latency.clone(),
        );
        r.register("nbd_errors", "NBD requests that failed", nbd_errors.clone());
        r.register(
            "peer_sent_bytes",
            "Chunk payload bytes sent to a peer agent",
            peer_bytes_sent.clone(),
        );
        r.register(
            "chunks_sent",
            "Chunks sent to a peer agent",
            chunks_sent.clone(),
        );
        r.register("jobs", "Jobs by phase", jobs.clone());
        r.register("vms", "VMs by state", vms.clone());
        Metrics {
            registry: Arc::new(r),
            requests,
            latency,
            peer_bytes_received,
            chunks_fetched,
            peer_bytes_sent,
            chunks_sent,
            chunks_deduplicated,
            nbd_latency,
            nbd_errors,
            jobs,
            vms,
        }
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// Brings the sent counters up to the source's figures `(peer, chunks, bytes)`.
    pub fn set_sent(&self, sent: &[(String, u64, u64)]) {
        for (peer, chunks, bytes) in sent {
            let l = PeerLabels { peer: peer.clone() };
            let c = self.chunks_sent.get_or_create(&l);
            c.inc_by(chunks.saturating_sub(c.get()));
            let b = self.peer_bytes_sent.get_or_create(&l);
            b.inc_by(bytes.saturating_sub(b.get()));
        }
    }

    /// Sets a by-phase gauge family to `counts` (phases absent now read 0).
    pub fn set_counts(
        family: &Family<PhaseLabels, Gauge>,
        counts: &std::collections::HashMap<String, u64>,
        known: &[&str],
    ) {
        for p in known {
            family
                .get_or_create(&PhaseLabels {
                    phase: p.to_string(),
                })
                .set(0);
        }
        for (p, n) in counts {
            family
                .get_or_create(&PhaseLabels { phase: p.clone() })
                .set(*n as i64);
        }
    }
}
