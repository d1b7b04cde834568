//! Prometheus metrics on a private registry, prefix `projector_`.
//!
//! Every per-projection series has the labels `projection`, `stream_name` and `consumer_name`
//! (the names prometheus-nats-exporter uses, so PromQL can join them). The other labels take
//! values from fixed sets only (`outcome`, `result`, `error_code`): never a key, a subject, an
//! event id or an error message.

use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec,
    IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::decode::ErrorCode;

/// The labels every projection series carries.
pub const PROJECTION_LABELS: [&str; 3] = ["projection", "stream_name", "consumer_name"];

/// The `outcome` values of `projector_events_total`.
pub const OUTCOMES: [&str; 5] = [
    "applied",
    "duplicate",
    "stale_epoch",
    "dead_lettered",
    "retried",
];

/// The `result` values of `projector_kv_writes_total`.
pub const KV_RESULTS: [&str; 4] = ["ok", "cas_conflict", "superseded", "error"];

/// Every metric family name this process exports (the dashboard test checks against it).
pub const METRIC_NAMES: [&str; 21] = [
    "projector_events_total",
    "projector_build_info",
    "projector_last_applied_stream_sequence",
    "projector_stream_last_sequence",
    "projector_lag_messages",
    "projector_lag_seconds",
    "projector_redeliveries_total",
    "projector_kv_outbox_keys",
    "projector_kv_writes_total",
    "projector_batch_duration_seconds",
    "projector_ready",
    "projector_gaps_detected_total",
    "projector_dead_letters_total",
    "projector_batch_size",
    "projector_store_commit_seconds",
    "projector_store_unsynced_commits_total",
    "projector_watchdog_rebinds_total",
    "projector_consumer_pending",
    "projector_consumer_ack_pending",
    "projector_store_bytes",
    "projector_up",
];

/// All metric families.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    events: IntCounterVec,
    last_applied: IntGaugeVec,
    stream_last: IntGaugeVec,
    lag_messages: IntGaugeVec,
    lag_seconds: GaugeVec,
    redeliveries: IntCounterVec,
    kv_outbox: IntGaugeVec,
    kv_writes: IntCounterVec,
    batch_duration: HistogramVec,
    batch_size: HistogramVec,
    store_commit: HistogramVec,
    unsynced_commits: IntCounterVec,
    ready: IntGaugeVec,
    gaps: IntCounterVec,
    dead_letters: IntCounterVec,
    rebinds: IntCounterVec,
    pending: IntGaugeVec,
    ack_pending: IntGaugeVec,
    /// Size of the redb file in bytes.
    pub store_bytes: IntGauge,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

fn with(extra: &str) -> Vec<&str> {
    let mut labels = PROJECTION_LABELS.to_vec();
    labels.push(extra);
    labels
}

impl Metrics {
    /// Registers every family on a new registry.
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let r = &registry;
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            r.register(Box::new(c.clone())).expect("unique metric");
            c
        };
        let gauge = |name: &str, help: &str| {
            let g =
                IntGaugeVec::new(Opts::new(name, help), &PROJECTION_LABELS).expect("valid metric");
            r.register(Box::new(g.clone())).expect("unique metric");
            g
        };
        let histogram = |name: &str, help: &str, buckets: Vec<f64>| {
            let h = HistogramVec::new(
                HistogramOpts::new(name, help).buckets(buckets),
                &PROJECTION_LABELS,
            )
            .expect("valid metric");
            r.register(Box::new(h.clone())).expect("unique metric");
            h
        };
        let lag_seconds = GaugeVec::new(
            Opts::new(
                "projector_lag_seconds",
                "Age of the oldest unapplied event, 0 when caught up.",
            ),
            &PROJECTION_LABELS,
        )
        .expect("valid metric");
        r.register(Box::new(lag_seconds.clone()))
            .expect("unique metric");
        let build_info = IntGaugeVec::new(
            Opts::new(
                "projector_build_info",
                "Always 1; the version label is the build.",
            ),
            &["version"],
        )
        .expect("valid metric");
        r.register(Box::new(build_info.clone()))
            .expect("unique metric");
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        let up = IntGauge::new("projector_up", "1 while the process runs.").expect("valid metric");
        r.register(Box::new(up.clone())).expect("unique metric");
        up.set(1);
        let store_bytes = IntGauge::new("projector_store_bytes", "Size of the redb store file.")
            .expect("valid metric");
        r.register(Box::new(store_bytes.clone()))
            .expect("unique metric");

        Metrics {
            events: counter(
                "projector_events_total",
                "Events by outcome: applied, duplicate, stale_epoch, dead_lettered, retried.",
                &with("outcome"),
            ),
            last_applied: gauge(
                "projector_last_applied_stream_sequence",
                "Highest stream sequence durably processed.",
            ),
            stream_last: gauge(
                "projector_stream_last_sequence",
                "The stream's last sequence (sampled).",
            ),
            lag_messages: gauge(
                "projector_lag_messages",
                "Consumer num_pending + num_ack_pending.",
            ),
            lag_seconds,
            redeliveries: counter(
                "projector_redeliveries_total",
                "Messages seen with a delivery count above 1.",
                &PROJECTION_LABELS,
            ),
            kv_outbox: gauge(
                "projector_kv_outbox_keys",
                "Keys whose KV copy is behind the local store.",
            ),
            kv_writes: counter(
                "projector_kv_writes_total",
                "KV writes by result: ok, cas_conflict, superseded, error.",
                &with("result"),
            ),
            batch_duration: histogram(
                "projector_batch_duration_seconds",
                "Fetch-to-ack time of a batch.",
                vec![
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0,
                ],
            ),
            batch_size: histogram(
                "projector_batch_size",
                "Messages per batch.",
                vec![
                    1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0,
                    10000.0,
                ],
            ),
            store_commit: histogram(
                "projector_store_commit_seconds",
                "Time of a batch's redb commit (page writes, and the fsync unless it is unsynced).",
                vec![
                    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                    0.5, 1.0, 2.5,
                ],
            ),
            unsynced_commits: counter(
                "projector_store_unsynced_commits_total",
                "Batch commits made without an fsync during a catch-up (their acks wait for the \
                 next durable commit).",
                &PROJECTION_LABELS,
            ),
            ready: gauge(
                "projector_ready",
                "1 when bound, caught up within the ready lag and without gap.",
            ),
            gaps: counter(
                "projector_gaps_detected_total",
                "Replay continuity failures (the projection stops until repaired).",
                &PROJECTION_LABELS,
            ),
            dead_letters: counter(
                "projector_dead_letters_total",
                "Events published to the DLQ, by error code.",
                &with("error_code"),
            ),
            rebinds: counter(
                "projector_watchdog_rebinds_total",
                "Times the pull subscription was re-created (missed heartbeats, stall).",
                &PROJECTION_LABELS,
            ),
            pending: gauge(
                "projector_consumer_pending",
                "Consumer num_pending (sampled).",
            ),
            ack_pending: gauge(
                "projector_consumer_ack_pending",
                "Consumer num_ack_pending (sampled).",
            ),
            store_bytes,
            registry,
        }
    }

    /// The series of one projection, with every fixed label value pre-created at 0.
    pub fn projection(&self, projection: &str, stream: &str, consumer: &str) -> ProjectionMetrics {
        let l = [projection, stream, consumer];
        let outcome = |o: &str| self.events.with_label_values(&[l[0], l[1], l[2], o]);
        let kv = |r: &str| self.kv_writes.with_label_values(&[l[0], l[1], l[2], r]);
        for code in ErrorCode::ALL {
            self.dead_letters
                .with_label_values(&[l[0], l[1], l[2], code.as_str()]);
        }
        ProjectionMetrics {
            labels: [
                projection.to_owned(),
                stream.to_owned(),
                consumer.to_owned(),
            ],
            dead_letters: self.dead_letters.clone(),
            applied: outcome("applied"),
            duplicate: outcome("duplicate"),
            stale_epoch: outcome("stale_epoch"),
            dead_lettered: outcome("dead_lettered"),
            retried: outcome("retried"),
            kv_ok: kv("ok"),
            kv_conflict: kv("cas_conflict"),
            kv_superseded: kv("superseded"),
            kv_error: kv("error"),
            last_applied: self.last_applied.with_label_values(&l),
            stream_last: self.stream_last.with_label_values(&l),
            lag_messages: self.lag_messages.with_label_values(&l),
            lag_seconds: self.lag_seconds.with_label_values(&l),
            redeliveries: self.redeliveries.with_label_values(&l),
            kv_outbox: self.kv_outbox.with_label_values(&l),
            batch_duration: self.batch_duration.with_label_values(&l),
            batch_size: self.batch_size.with_label_values(&l),
            store_commit: self.store_commit.with_label_values(&l),
            unsynced_commits: self.unsynced_commits.with_label_values(&l),
            ready: self.ready.with_label_values(&l),
            gaps: self.gaps.with_label_values(&l),
            rebinds: self.rebinds.with_label_values(&l),
            pending: self.pending.with_label_values(&l),
            ack_pending: self.ack_pending.with_label_values(&l),
        }
    }

    /// Sets the `ready` gauge of a projection (at scrape time, from the same status `/readyz`
    /// reads, so the two always agree).
    pub fn set_ready(&self, projection: &str, stream: &str, consumer: &str, ready: bool) {
        self.ready
            .with_label_values(&[projection, stream, consumer])
            .set(i64::from(ready));
    }

    /// The Prometheus text exposition of every family.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        let encoder = TextEncoder::new();
        if let Err(err) = encoder.encode(&self.registry.gather(), &mut out) {
            tracing::error!(error = %err, "cannot encode metrics");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// The pre-labelled series of one projection.
#[derive(Clone)]
#[allow(missing_docs)]
pub struct ProjectionMetrics {
    labels: [String; 3],
    dead_letters: IntCounterVec,
    pub applied: IntCounter,
    pub duplicate: IntCounter,
    pub stale_epoch: IntCounter,
    pub dead_lettered: IntCounter,
    pub retried: IntCounter,
    pub kv_ok: IntCounter,
    pub kv_conflict: IntCounter,
    pub kv_superseded: IntCounter,
    pub kv_error: IntCounter,
    pub last_applied: IntGauge,
    pub stream_last: IntGauge,
    pub lag_messages: IntGauge,
    pub lag_seconds: Gauge,
    pub redeliveries: IntCounter,
    pub kv_outbox: IntGauge,
    pub batch_duration: Histogram,
    pub batch_size: Histogram,
    pub store_commit: Histogram,
    pub unsynced_commits: IntCounter,
    pub ready: IntGauge,
    pub gaps: IntCounter,
    pub rebinds: IntCounter,
    pub pending: IntGauge,
    pub ack_pending: IntGauge,
}

impl ProjectionMetrics {
    /// Counts one dead letter with its code.
    pub fn dead_letter(&self, code: ErrorCode) {
        let l = &self.labels;
        self.dead_letters
            .with_label_values(&[l[0].as_str(), l[1].as_str(), l[2].as_str(), code.as_str()])
            .inc();
        self.dead_lettered.inc();
    }
}

/// Encodes with the text format (re-exported for tests).
pub fn encode_text(registry: &Registry) -> Vec<u8> {
    let mut out = Vec::new();
    let _ = TextEncoder::new().encode(&registry.gather(), &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_family_is_exported_with_its_labels() {
        let metrics = Metrics::new();
        let p = metrics.projection("orders", "ORDERS", "projector__orders_v1");
        p.applied.inc();
        p.lag_seconds.set(1.5);
        p.batch_duration.observe(0.01);
        p.batch_size.observe(10.0);
        p.store_commit.observe(0.001);
        p.dead_letter(ErrorCode::InvalidJson);
        let text = metrics.render();
        for name in METRIC_NAMES {
            assert!(text.contains(&format!("# TYPE {name} ")), "{name} missing");
        }
        assert!(text.contains(
            "projector_events_total{consumer_name=\"projector__orders_v1\",outcome=\"applied\",projection=\"orders\",stream_name=\"ORDERS\"} 1"
        ));
        assert!(text.contains("error_code=\"invalid_json\""));
    }
}
