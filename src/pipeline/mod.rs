//! One projection's loop: fetch → decode → apply (one redb transaction) → KV → DLQ → ack.
//!
//! Ack ordering, the invariant everything else serves: a message is acked only after
//! (1) the redb transaction holding its effect committed durably (itself, or a later one when
//! it committed without an fsync), (2) KV acknowledged the write of every key the batch changed
//! (driven from the durable outbox, so a crash in between loses nothing), and (3) for a poison
//! event, the DLQ stream acknowledged the dead letter.
//!
//! Infrastructure failures (store I/O, KV or NATS unavailable) hold the batch in hand: it is
//! kept alive with in-progress acks and retried on the `backoff` schedule, never NAKed, so no
//! later event of a key can overtake an earlier one. A message on its last delivery is
//! processed alone, and dead-lettered if it still cannot be applied.

mod applier;
pub mod crash;
mod effects;
pub mod gap;
mod status;

pub use status::{Status, StatusCell};

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::PullConsumer};

use crate::consume::Incoming;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::consume::{self, Fetched, Source};
use crate::decode::{ErrorCode, Poison};
use crate::kv::KvWriter;
use crate::metrics::ProjectionMetrics;
use crate::spec::Spec;
use crate::store::{
    Applied, Housekeeping, Item, KvWrite, Outcome, Position, Store, StoreError, StoreErrorKind,
};
use effects::{Committed, Effects, Job};

/// How long a fetch waits before the pipeline does idle work (samples, housekeeping).
const IDLE: Duration = Duration::from_secs(1);
/// KV writes awaiting their acks at once.
const KV_IN_FLIGHT: usize = 1024;
/// Messages gathered ahead that are decoded at a time while a batch is applied, between checks
/// of whether the applying thread is done (so that it never waits long for the next batch).
const DECODE_AHEAD_CHUNK: usize = 64;
/// During a catch-up without KV and with bulk acks, batches committed in a row without an fsync
/// at most: a batch with another queued behind it commits unsynced, and its acks wait for the
/// next durable commit (every `MAX_UNSYNCED + 1`-th batch at least, or the catch-up's last).
const MAX_UNSYNCED: u32 = 7;

/// What a batch's job on the applying thread gives back: the store's answer (`None`: not
/// applied, because the batch was queued behind one that failed), the housekeeping it carried,
/// the batch's messages, the per-event log fields, its sequence range, and its items (as
/// decoded, when not applied).
type Applying = (
    Option<Result<Applied, StoreError>>,
    Housekeeping,
    Vec<Incoming>,
    Option<Vec<EventLog>>,
    Option<(u64, u64)>,
    Vec<Item>,
);

/// A batch's job on the applying thread, as the pipeline task awaits it.
type ApplyTask =
    Pin<Box<dyn Future<Output = Result<Applying, applier::ApplierError>> + Send + Sync>>;

/// A batch queued on the applying thread behind the one it applies.
struct Queued {
    task: ApplyTask,
    /// Messages in the batch.
    size: usize,
}

/// Why a pipeline stopped for good.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PipelineError {
    /// A condition that needs an operator (corruption, gap): the process exits 3.
    #[error("failed closed: {0}")]
    FailClosed(String),
    /// A replay gap: this projection stops applying and acking; the process keeps serving
    /// `/readyz` (503) and metrics, and exits 3 when stopped.
    #[error(transparent)]
    Gap(#[from] gap::Gap),
    /// Anything else that cannot be retried: the process exits 1.
    #[error("{0}")]
    Fatal(String),
}

/// Process-wide settings a pipeline follows.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// `/readyz` lag threshold (for the `ready` gauge).
    pub ready_max_lag: u64,
    /// Where snapshots live (automatic ones, and those a lost store is restored from).
    pub snapshot_dir: std::path::PathBuf,
    /// Automatic snapshot interval (zero: off).
    pub snapshot_interval: Duration,
    /// Automatic snapshots kept per projection.
    pub snapshot_keep: usize,
    /// Object Store bucket automatic snapshots are also uploaded to.
    pub snapshot_object_store: Option<String>,
}

/// Everything one projection's loop needs.
pub struct Pipeline {
    spec: Arc<Spec>,
    store: Arc<Store>,
    js: jetstream::Context,
    metrics: ProjectionMetrics,
    status: Arc<StatusCell>,
    cancel: CancellationToken,
    /// KV writes, dead letters and acks: shared with the sink task.
    fx: Arc<Effects>,
    /// Committed batches on their way to the sink (while running).
    jobs: Option<tokio::sync::mpsc::Sender<Job>>,
    stream_created_ns: i128,
    /// The highest stream sequence whose outcome is settled in the store (committed) or the
    /// DLQ. Set before any of those messages is acked, on this task, so the ack floor the
    /// sampler reads can never legitimately pass it (the sink acks on its own task).
    processed_seq: u64,
    last_sample: Option<Instant>,
    idle_rounds: u32,
    ready_max_lag: u64,
    options: Options,
    last_snapshot: Instant,
    last_snapshot_seq: u64,
    stream: Option<async_nats::jetstream::stream::Stream>,
    checkpoint: crate::store::Checkpoint,
    /// The messages gathered ahead ([`Source::ahead`]), decoded while the previous batch was
    /// applied: the next batch's first items, used only where their sequences match it.
    ahead_items: Vec<Item>,
    /// The items vector of the last applied batch, emptied: it holds the next batch's items
    /// decoded ahead while that batch's own vector is applied (two vectors take turns, so
    /// neither is grown, or its memory faulted in, batch after batch).
    spare_items: Vec<Item>,
    /// The thread that applies batches, started with the first one.
    applier: Option<applier::Applier>,
    /// During a catch-up, the next batch, queued on the applying thread while the one before
    /// it is applied, so that the thread goes from one to the next without waiting for this
    /// task. Completed before the next fetch, a recovery after a re-bind, and shutdown.
    queued: Option<Queued>,
    /// Whether the last batch the applying thread took up failed (or panicked). A queued batch
    /// behind it is then handed back unapplied (see [`Pipeline::submit`]).
    last_failed: Arc<AtomicBool>,
    /// Jobs handed to the applying thread so far (a job's number is its rank).
    jobs_submitted: u64,
    /// The number of the job that has a batch queued behind it: that job may commit without
    /// an fsync, the batch behind it (or one after) commits durably.
    queued_behind: Arc<AtomicU64>,
    /// Batches the applying thread committed in a row without an fsync.
    unsynced_streak: Arc<AtomicU32>,
    /// Batches committed without an fsync, in order, held (not acked, no DLQ publish) until a
    /// later commit is durable. Only without KV (so they carry no KV writes).
    unsynced: Vec<Committed>,
    /// Set when the store may have lost unsynced commits (a later commit failed): the unacked
    /// range is read back from the stream before anything newer, as after a re-bind.
    recover_needed: bool,
}

impl Pipeline {
    /// A pipeline for `spec`.
    pub fn new(
        spec: Arc<Spec>,
        store: Arc<Store>,
        js: jetstream::Context,
        metrics: ProjectionMetrics,
        status: Arc<StatusCell>,
        cancel: CancellationToken,
        options: Options,
    ) -> Pipeline {
        let fx = Arc::new(Effects::new(
            spec.clone(),
            js.clone(),
            metrics.clone(),
            status.clone(),
            cancel.clone(),
        ));
        Pipeline {
            spec,
            store,
            js,
            metrics,
            status,
            cancel,
            fx,
            jobs: None,
            stream_created_ns: 0,
            processed_seq: 0,
            last_sample: None,
            idle_rounds: 0,
            ready_max_lag: options.ready_max_lag,
            options,
            last_snapshot: Instant::now(),
            last_snapshot_seq: 0,
            stream: None,
            checkpoint: crate::store::Checkpoint::default(),
            ahead_items: Vec::new(),
            spare_items: Vec::new(),
            applier: None,
            queued: None,
            last_failed: Arc::new(AtomicBool::new(false)),
            jobs_submitted: 0,
            queued_behind: Arc::new(AtomicU64::new(0)),
            unsynced_streak: Arc::new(AtomicU32::new(0)),
            unsynced: Vec::new(),
            recover_needed: false,
        }
    }

    /// Runs until the cancellation token fires (then drains: the batch in hand is finished,
    /// committed, written to KV and acked) or a fail-closed condition.
    pub async fn run(mut self) -> Result<(), PipelineError> {
        let span = info_span!("projection", projection = %self.spec.name(),
            stream = %self.spec.config.stream, consumer = %self.spec.durable);
        async move {
            let Some(consumer) = self.bind().await? else {
                return Ok(());
            };
            if !self.flush_outbox().await? {
                return Ok(());
            }
            self.status.update(|s| {
                s.bound = true;
                s.failure = None;
            });
            info!("projection bound and running");
            let (jobs, queue) = tokio::sync::mpsc::channel(effects::QUEUED_BATCHES);
            self.jobs = Some(jobs);
            let sink = tokio::spawn(effects::sink(self.fx.clone(), queue).in_current_span());
            let looped = self.run_bound(consumer).await;
            // Whatever happened, batches already committed are completed (KV, DLQ, acks).
            self.jobs = None;
            if let Err(err) = sink.await {
                error!(error = %err, "the KV and ack task failed");
            }
            looped?;
            self.housekeep().await?;
            info!("projection drained");
            Ok(())
        }
        .instrument(span)
        .await
    }

    /// The loop of a bound projection, until cancelled (or failed closed).
    async fn run_bound(&mut self, consumer: PullConsumer) -> Result<(), PipelineError> {
        let c = &self.spec.config;
        let idle = IDLE.min(c.lag_sample_interval);
        let mut source = Source::new(consumer, self.js.client(), c.batch, c.batch_bytes, idle);
        loop {
            // A batch queued on the applying thread is completed first, in order; recovery
            // (after a re-bind) waits until none is.
            if let Some(queued) = self.queued.take() {
                self.process_segment(
                    Vec::new(),
                    Mode::Normal,
                    Some(&mut source),
                    Vec::new(),
                    Some(queued),
                )
                .await?;
                if self.cancel.is_cancelled() {
                    break;
                }
            }
            if self.queued.is_none() && (source.rebound() || self.recover_needed) {
                self.recover_needed = true;
                if !self.recover(source.consumer()).await? {
                    break;
                }
                // Postponed (consumer info failed): nothing newer is fetched before it ran.
                if self.recover_needed {
                    if !self.pause(Duration::from_secs(1)).await {
                        break;
                    }
                    continue;
                }
            }
            let every = self.spec.config.lag_sample_interval;
            if self.last_sample.is_none_or(|t| t.elapsed() >= every) {
                self.sample(source.consumer()).await?;
            }
            let interval = self.options.snapshot_interval;
            if !interval.is_zero() && self.last_snapshot.elapsed() >= interval {
                self.last_snapshot = Instant::now();
                // Nothing applied since the last one: the same snapshot again is useless.
                let seq = self.status.get().last_applied_seq;
                if seq > self.last_snapshot_seq {
                    self.last_snapshot_seq = seq;
                    self.auto_snapshot().await;
                }
            }
            if self.queued.is_some() {
                continue;
            }
            match source.next_batch(&self.cancel).await {
                Ok(Fetched::Shutdown) => break,
                Ok(Fetched::Idle) => {
                    self.idle_rounds += 1;
                    self.housekeep().await?;
                    let status = self.status.get();
                    if self.idle_rounds >= 3 && status.pending > 0 {
                        warn!(
                            pending = status.pending,
                            "no message while the consumer has pending ones; re-binding"
                        );
                        source.rebind();
                        self.metrics.rebinds.inc();
                        self.idle_rounds = 0;
                    }
                }
                Ok(Fetched::Batch(messages)) => {
                    self.idle_rounds = 0;
                    self.process(messages, Some(&mut source)).await?;
                }
                Err(err) => {
                    warn!(error = %err, "fetch failed");
                    self.status
                        .update(|s| s.failure = Some(format!("fetch failed: {err}")));
                    if !self.pause(Duration::from_secs(1)).await {
                        break;
                    }
                }
            }
            if self.cancel.is_cancelled() {
                break;
            }
        }
        // A batch still queued is completed (committed, then its KV writes and acks).
        if let Some(queued) = self.queued.take() {
            self.process_segment(Vec::new(), Mode::Normal, None, Vec::new(), Some(queued))
                .await?;
        }
        // Only a batch queued behind commits unsynced, and that one was just completed.
        if !self.unsynced.is_empty() {
            error!(
                batches = self.unsynced.len(),
                "batches committed without an fsync are left unacked (redelivered)"
            );
            self.unsynced.clear();
        }
        Ok(())
    }

    /// Sleeps unless cancelled; returns false when cancelled.
    async fn pause(&self, duration: Duration) -> bool {
        self.fx.pause(duration).await
    }

    fn backoff(&self, attempt: u32) -> Duration {
        self.fx.backoff(attempt)
    }

    /// Waits until the sink completed every batch sent so far.
    async fn drain_sink(&self) {
        let Some(jobs) = &self.jobs else {
            return;
        };
        let (done, completed) = tokio::sync::oneshot::channel();
        if jobs.send(Job::Barrier(done)).await.is_ok() {
            let _ = completed.await;
        }
    }

    /// Binds the stream, KV bucket, DLQ stream and consumer, retrying until it works or the
    /// pipeline is cancelled (`Ok(None)`).
    async fn bind(&mut self) -> Result<Option<PullConsumer>, PipelineError> {
        let mut attempt = 0;
        loop {
            match self.try_bind().await {
                Ok(consumer) => return Ok(Some(consumer)),
                Err(BindError::Gap(gap)) => return Err(PipelineError::Gap(gap)),
                Err(BindError::Nats(err)) => {
                    warn!(error = %err, "cannot bind the projection yet; retrying");
                    self.status.update(|s| s.failure = Some(err.to_string()));
                    if !self.pause(self.backoff(attempt)).await {
                        return Ok(None);
                    }
                    attempt += 1;
                }
            }
        }
    }

    async fn try_bind(&mut self) -> Result<PullConsumer, BindError> {
        let stream = consume::stream_of(&self.js, &self.spec.config.stream).await?;
        self.stream_created_ns = stream.cached_info().created.unix_timestamp_nanos();
        self.stream = Some(stream.clone());
        if let Some(kv) = consume::ensure_kv(&self.js, &self.spec).await? {
            let bucket = self.spec.kv_bucket().unwrap_or_default();
            if self.fx.kv.get().is_none() {
                let _ = self
                    .fx
                    .kv
                    .set(KvWriter::new(self.js.clone(), kv, &bucket, KV_IN_FLIGHT));
            }
        }
        consume::ensure_dlq_stream(&self.js, &self.spec).await?;
        let checkpoint = self
            .store_call(|store, spec| store.checkpoint(&spec.namespace))
            .await;
        let checkpoint = match checkpoint {
            Ok(c) => c.unwrap_or_default(),
            Err(err) => {
                return Err(BindError::Nats(consume::NatsError::Api {
                    what: "read the checkpoint".into(),
                    reason: err,
                }));
            }
        };
        let mut stream = stream;
        let durable = stream.consumer_info(&self.spec.durable).await.ok();
        let mut ack_floor = durable.as_ref().map(|i| i.ack_floor.stream_sequence);
        // A durable that acked deliveries this store has no trace of: the store was lost. (A
        // durable created with a start sequence and never delivered has a floor too, but no
        // acked delivery: nothing was lost.)
        let acked_deliveries = durable
            .as_ref()
            .is_some_and(|i| i.ack_floor.consumer_sequence > 0);
        let lost = ack_floor.filter(|f| *f > 0 && acked_deliveries && checkpoint.last_seq == 0);
        let checkpoint = match lost {
            Some(floor) => {
                let restored = self.restore_lost_store(&mut stream, floor).await?;
                ack_floor = stream
                    .consumer_info(&self.spec.durable)
                    .await
                    .ok()
                    .map(|i| i.ack_floor.stream_sequence);
                restored
            }
            None => checkpoint,
        };
        self.fx.set_last_applied_ms(checkpoint.last_publish_ms);
        self.metrics.last_applied.set(checkpoint.last_seq as i64);
        self.status
            .update(|s| s.last_applied_seq = checkpoint.last_seq);
        self.processed_seq = checkpoint.last_seq;
        // Continuity first: never bind (let alone apply) on top of a gap.
        let info = stream.cached_info();
        let observed = gap::Observed {
            created_ns: self.stream_created_ns,
            first_seq: info.state.first_sequence,
            last_seq: info.state.last_sequence,
            ack_floor,
            unfiltered: self.spec.config.filter_subjects.is_empty(),
        };
        gap::check(&checkpoint, &observed)?;
        gap::check_message(&stream, &checkpoint).await?;
        self.checkpoint = checkpoint.clone();
        let consumer = consume::bind_consumer(&stream, &self.spec, checkpoint.acked_floor).await?;
        let policy = consumer.cached_info().config.ack_policy;
        self.fx
            .set_bulk_acks(policy == async_nats::jetstream::consumer::AckPolicy::All);
        Ok(consumer)
    }

    /// Rebuilds a lost store before binding: from KV when the projection has a bucket (every
    /// acked effect is there), else from the newest snapshot the stream still continues, else by
    /// replaying a complete stream from its first sequence; otherwise the projection fails
    /// closed.
    async fn restore_lost_store(
        &mut self,
        stream: &mut async_nats::jetstream::stream::Stream,
        floor: u64,
    ) -> Result<crate::store::Checkpoint, BindError> {
        warn!(
            ack_floor = floor,
            "the store has no checkpoint for this projection but its \
            durable acked messages: the store was lost; restoring it"
        );
        let failed = |e: crate::restore::RestoreError| match e {
            crate::restore::RestoreError::Gap(gap) => BindError::Gap(gap),
            other => BindError::Nats(consume::NatsError::Api {
                what: "restore the lost store".into(),
                reason: other.to_string(),
            }),
        };
        let imported = |reason: String| {
            BindError::Nats(consume::NatsError::Api {
                what: "import the restored content".into(),
                reason,
            })
        };
        if self.spec.config.kv_bucket.is_some() {
            let contents = crate::restore::from_kv(&self.js, stream, &self.spec, floor)
                .await
                .map_err(failed)?;
            let (keys, markers) = (contents.records.len(), contents.markers.len());
            let checkpoint = contents.checkpoint.clone();
            self.store_call(move |store, spec| store.import(&spec.namespace, &contents, false))
                .await
                .map_err(imported)?;
            info!(
                keys,
                markers,
                at = floor,
                "store restored from the KV bucket"
            );
            return Ok(checkpoint);
        }
        let (name, version) = (self.spec.config.name.clone(), self.spec.config.version);
        for path in crate::snapshot::list(&self.options.snapshot_dir, &name, version) {
            let snapshot = match crate::snapshot::read_file(&path) {
                Ok(snapshot) => snapshot,
                Err(err) => {
                    warn!(path = %path.display(), error = %err, "snapshot unusable");
                    continue;
                }
            };
            let checkpoint = snapshot.contents.checkpoint.clone();
            if let Err(err) = crate::restore::continues(stream, &checkpoint).await {
                warn!(path = %path.display(), error = %err,
                    "the stream no longer continues this snapshot");
                continue;
            }
            let contents = snapshot.contents;
            self.store_call(move |store, spec| store.import(&spec.namespace, &contents, true))
                .await
                .map_err(imported)?;
            crate::restore::reset_durable(stream, &self.spec, checkpoint.last_seq)
                .await
                .map_err(failed)?;
            info!(path = %path.display(), at = checkpoint.last_seq, "store restored from a snapshot");
            return Ok(checkpoint);
        }
        let first = stream.cached_info().state.first_sequence;
        if first <= 1 {
            crate::restore::reset_durable(stream, &self.spec, 0)
                .await
                .map_err(failed)?;
            info!("store rebuilt by replaying the stream from its first sequence");
            return Ok(crate::store::Checkpoint::default());
        }
        Err(BindError::Gap(gap::Gap {
            kind: gap::GapKind::Removed,
            detail: format!(
                "the store was lost (the durable acked up to {floor}) and cannot be rebuilt: no \
                 kv_bucket, no snapshot in {} that the stream continues, and the stream now \
                 starts at {first}",
                self.options.snapshot_dir.display()
            ),
        }))
    }

    /// Takes an automatic snapshot (and uploads it when configured); failures are logged.
    async fn auto_snapshot(&mut self) {
        let dir = self.options.snapshot_dir.clone();
        let keep = self.options.snapshot_keep;
        let (store, spec) = (self.store.clone(), self.spec.clone());
        let made = tokio::task::spawn_blocking(move || {
            let created = crate::snapshot::create(&store, &spec, None, &dir)?;
            crate::snapshot::prune(&dir, &spec.config.name, spec.config.version, keep);
            Ok::<_, String>(created)
        })
        .await;
        match made {
            Ok(Ok(created)) => {
                info!(path = %created.path.display(), seq = created.header.seq,
                    records = created.header.records, "automatic snapshot");
                if let Some(bucket) = &self.options.snapshot_object_store {
                    if let Err(err) = crate::snapshot::upload(&self.js, bucket, &created.path).await
                    {
                        warn!(error = %err, "snapshot upload failed");
                    }
                }
            }
            Ok(Err(err)) => warn!(error = %err, "automatic snapshot failed"),
            Err(err) => warn!(error = %err, "automatic snapshot failed"),
        }
    }

    /// The thread that applies batches (started on first use).
    fn applier(&mut self) -> Result<&applier::Applier, PipelineError> {
        match &mut self.applier {
            Some(applier) => Ok(applier),
            slot => {
                let started = applier::Applier::start("projector-apply").map_err(|e| {
                    PipelineError::Fatal(format!("could not start the applying thread: {e}"))
                })?;
                Ok(slot.insert(started))
            }
        }
    }

    /// Runs a store call on the blocking pool (redb commits fsync: never on the async workers).
    async fn store_call<T: Send + 'static>(
        &self,
        call: impl FnOnce(&Store, &Spec) -> Result<T, crate::store::StoreError> + Send + 'static,
    ) -> Result<T, String> {
        let (store, spec) = (self.store.clone(), self.spec.clone());
        tokio::task::spawn_blocking(move || call(&store, &spec))
            .await
            .map_err(|e| format!("store task failed: {e}"))?
            .map_err(|e| e.to_string())
    }

    /// Writes every outbox entry to KV before anything else (startup). Returns false when
    /// cancelled first.
    async fn flush_outbox(&mut self) -> Result<bool, PipelineError> {
        let Some(kv) = self.fx.kv.get() else {
            return Ok(true);
        };
        let (name, version) = (self.spec.config.name.clone(), self.spec.config.version);
        let entries = {
            let (store, ns) = (self.store.clone(), self.spec.namespace.clone());
            tokio::task::spawn_blocking(move || store.outbox(&ns))
                .await
                .map_err(|e| PipelineError::Fatal(e.to_string()))?
                .map_err(|e| match e.kind() {
                    StoreErrorKind::Corrupted => PipelineError::FailClosed(e.to_string()),
                    _ => PipelineError::Fatal(e.to_string()),
                })?
        };
        if entries.is_empty() {
            return Ok(true);
        }
        info!(
            keys = entries.len(),
            "flushing the KV outbox left by the previous run"
        );
        let writes: Vec<KvWrite> = entries
            .into_iter()
            .map(|(key, record)| KvWrite {
                payload: record.kv_value(&name, version).into(),
                seq: record.seq,
                delete: record.is_deleted(),
                revision_hint: record.kv_revision,
                key,
            })
            .collect();
        self.metrics.kv_outbox.set(writes.len() as i64);
        let mut pending = writes;
        let mut attempt = 0;
        loop {
            let (done, failed, stats) = kv.write_all(&pending).await;
            self.fx.count_kv(stats);
            self.fx.confirm(done);
            if failed.is_empty() {
                break;
            }
            let reason = format!("KV unavailable while flushing the outbox: {}", failed[0]);
            warn!(failed = failed.len(), "{reason}");
            self.status.update(|s| s.failure = Some(reason));
            pending.retain(|w| failed.iter().any(|f| f.key == w.key));
            if !self.pause(self.backoff(attempt)).await {
                return Ok(false);
            }
            attempt += 1;
        }
        self.housekeep().await?;
        Ok(true)
    }

    /// Folds pending confirmations into the store when there is no batch to carry them.
    async fn housekeep(&mut self) -> Result<(), PipelineError> {
        if self.fx.house_is_empty() {
            return Ok(());
        }
        let house = self.fx.take_house();
        let (store, spec) = (self.store.clone(), self.spec.clone());
        let kept = house.clone();
        let result = tokio::task::spawn_blocking(move || store.housekeep(&spec, &house))
            .await
            .map_err(|e| PipelineError::Fatal(e.to_string()))?;
        match result {
            Ok(outbox) => {
                self.metrics.kv_outbox.set(outbox as i64);
                self.status.update(|s| s.kv_outbox = outbox);
                Ok(())
            }
            Err(err) if err.kind() == StoreErrorKind::Corrupted => {
                Err(PipelineError::FailClosed(err.to_string()))
            }
            Err(err) => {
                warn!(error = %err, "store housekeeping failed; will retry");
                self.fx.restore_house(kept);
                let _ = self.store.reopen();
                Ok(())
            }
        }
    }

    /// Samples consumer and stream info: lag, readiness, the ack floor, and continuity (a
    /// purge or a re-created stream while running is a gap too).
    async fn sample(&mut self, consumer: &mut PullConsumer) -> Result<(), PipelineError> {
        self.last_sample = Some(Instant::now());
        let info = match consumer.info().await {
            Ok(info) => info.clone(),
            Err(err) => {
                debug!(error = %err, "consumer info failed");
                return Ok(());
            }
        };
        let (pending, ack_pending) = (info.num_pending, info.num_ack_pending as u64);
        let floor = info.ack_floor.stream_sequence;
        if floor > 0 {
            self.fx.note_ack_floor(floor);
        }
        let Some(mut stream) = self.stream.clone() else {
            return Ok(());
        };
        let state = match stream.info().await {
            Ok(info) => info.state.clone(),
            Err(err) => {
                debug!(error = %err, "stream info failed");
                return Ok(());
            }
        };
        let last_applied = self.processed_seq;
        let created = stream.cached_info().created.unix_timestamp_nanos();
        let running = crate::store::Checkpoint {
            stream: self.spec.config.stream.clone(),
            stream_created_ns: self.stream_created_ns,
            last_seq: last_applied,
            ..self.checkpoint.clone()
        };
        gap::check(
            &running,
            &gap::Observed {
                created_ns: created,
                first_seq: state.first_sequence,
                last_seq: state.last_sequence,
                ack_floor: Some(floor),
                unfiltered: self.spec.config.filter_subjects.is_empty(),
            },
        )?;
        let stream_last = self
            .filtered_last_sequence(&stream)
            .await
            .unwrap_or(state.last_sequence);
        let lag = pending + ack_pending;
        self.metrics.pending.set(pending as i64);
        self.metrics.ack_pending.set(ack_pending as i64);
        self.metrics.lag_messages.set(lag as i64);
        self.metrics.stream_last.set(stream_last as i64);
        if lag == 0 {
            self.metrics.lag_seconds.set(0.0);
        } else {
            // The age of the oldest unapplied event: the next one after the last applied.
            let filters = self.spec.config.filter_subjects.clone();
            match consume::read_range(&stream, &filters, last_applied, u64::MAX, 1).await {
                Ok(next) if !next.is_empty() => {
                    self.metrics
                        .lag_seconds
                        .set(age_seconds(next[0].publish_ms));
                }
                _ => self.fx.set_lag_seconds(lag),
            }
        }
        let status = {
            self.status.update(|s| {
                s.pending = pending;
                s.ack_pending = ack_pending;
                s.stream_last_seq = stream_last;
                s.sampled = true;
            });
            self.status.get()
        };
        self.metrics
            .ready
            .set(i64::from(status.readiness(self.ready_max_lag).is_ok()));
        Ok(())
    }

    /// The last sequence of the projection's subjects, where the server can tell (a direct
    /// get of the last message of each filter subject); `None` falls back to the stream's.
    async fn filtered_last_sequence(
        &self,
        stream: &async_nats::jetstream::stream::Stream,
    ) -> Option<u64> {
        let filters = &self.spec.config.filter_subjects;
        if filters.is_empty() || !stream.cached_info().config.allow_direct {
            return None;
        }
        let mut last = 0;
        for filter in filters {
            match stream.direct_get_last_for_subject(filter.clone()).await {
                Ok(message) => last = last.max(message.sequence),
                Err(err)
                    if err.kind()
                        == async_nats::jetstream::stream::DirectGetErrorKind::NotFound => {}
                Err(_) => return None,
            }
        }
        Some(last)
    }

    /// Reads back, in stream order, the range the durable delivered to an earlier subscription
    /// (a previous process, or a dropped pull) but that is not acked yet, and applies it before
    /// anything newer. Without this, those messages would be redelivered only after `ack_wait`,
    /// behind newer events of the same keys, and the sequence guard would drop them. Their
    /// late redeliveries are then recognized as duplicates and acked. Returns false when
    /// cancelled.
    async fn recover(&mut self, consumer: &mut PullConsumer) -> Result<bool, PipelineError> {
        // Batches still in the sink are not acked yet: complete them first.
        self.drain_sink().await;
        let info = match consumer.info().await {
            Ok(info) => info.clone(),
            Err(err) => {
                warn!(error = %err, "consumer info failed; recovery postponed");
                return Ok(true);
            }
        };
        let (floor, delivered) = (
            info.ack_floor.stream_sequence,
            info.delivered.stream_sequence,
        );
        if info.num_ack_pending == 0 || delivered <= floor {
            self.recover_needed = false;
            return Ok(true);
        }
        info!(
            after = floor,
            through = delivered,
            unacked = info.num_ack_pending,
            "reading the unacked range back from the stream, in order, before pulling"
        );
        let stream = loop {
            match consume::stream_of(&self.js, &self.spec.config.stream).await {
                Ok(stream) => break stream,
                Err(err) => {
                    warn!(error = %err, "stream info failed during recovery");
                    if !self.pause(Duration::from_secs(1)).await {
                        return Ok(false);
                    }
                }
            }
        };
        let filters = self.spec.config.filter_subjects.clone();
        let batch = self.spec.config.batch;
        let mut cursor = floor;
        while cursor < delivered {
            let read = consume::read_range(&stream, &filters, cursor, delivered, batch).await;
            let messages = match read {
                Ok(messages) => messages,
                Err(err) => {
                    warn!(error = %err, "reading the unacked range failed; retrying");
                    if !self.pause(Duration::from_secs(1)).await {
                        return Ok(false);
                    }
                    continue;
                }
            };
            let Some(last) = messages.last().map(|m| m.seq) else {
                break;
            };
            self.process(messages, None).await?;
            if self.cancel.is_cancelled() {
                return Ok(false);
            }
            cursor = last;
        }
        self.recover_needed = false;
        Ok(true)
    }

    /// Processes fetched messages in order; messages on their last delivery go alone. With a
    /// `source`, the next batch is gathered from it while this one is applied.
    async fn process(
        &mut self,
        messages: Vec<Incoming>,
        mut source: Option<&mut Source>,
    ) -> Result<(), PipelineError> {
        let max_deliver = self.spec.config.max_deliver;
        let is_last = |m: &Incoming| on_last_delivery(m, max_deliver);
        let mut segments: VecDeque<(Vec<Incoming>, Mode)> = VecDeque::new();
        let decoded = self.take_decoded_ahead();
        if messages.is_empty() {
            return Ok(());
        } else if !messages.iter().any(is_last) {
            // The usual case: the batch is one segment, not copied message by message.
            return self
                .process_segment(messages, Mode::Normal, source, decoded, None)
                .await;
        } else {
            let mut current = Vec::new();
            for message in messages {
                if is_last(&message) {
                    if !current.is_empty() {
                        segments.push_back((std::mem::take(&mut current), Mode::Normal));
                    }
                    segments.push_back((vec![message], Mode::LastDelivery));
                } else {
                    current.push(message);
                }
            }
            if !current.is_empty() {
                segments.push_back((current, Mode::Normal));
            }
        }
        while let Some((segment, mode)) = segments.pop_front() {
            // Only the last segment may queue the next batch behind it (batches apply in order).
            let gather = if segments.is_empty() {
                source.as_deref_mut()
            } else {
                None
            };
            self.process_segment(segment, mode, gather, Vec::new(), None)
                .await?;
            if self.cancel.is_cancelled() || self.recover_needed {
                // Messages not yet processed are left unacked: redelivered to the next run.
                break;
            }
        }
        Ok(())
    }

    /// Hands a batch to the applying thread. `queued`: behind a batch not yet complete, so it
    /// is handed back unapplied if that one fails.
    fn submit(
        &mut self,
        batch: Vec<Incoming>,
        decoded: Vec<Item>,
        house: Housekeeping,
        queued: bool,
    ) -> Result<ApplyTask, PipelineError> {
        let (store, spec) = (self.store.clone(), self.spec.clone());
        let created_ns = self.stream_created_ns;
        // Per-event log fields, captured only when someone listens at debug level.
        let debug = tracing::enabled!(tracing::Level::DEBUG);
        let failed = self.last_failed.clone();
        self.jobs_submitted += 1;
        let job = self.jobs_submitted;
        if queued {
            self.queued_behind.store(job - 1, Ordering::Release);
        }
        let (behind, streak) = (self.queued_behind.clone(), self.unsynced_streak.clone());
        // Held batches carry no KV writes, housekeeping is folded in durably only, and with an
        // ack per message holding acks back measured slower (nats-server takes them in bursts).
        let may_defer = spec.config.kv_bucket.is_none() && house.is_empty() && self.fx.bulk_acks();
        let task = self.applier()?.run(move || {
            // Invariant (order per key): a batch never commits after one before it failed;
            // the failed one is retried first, then this one is handed to the thread again.
            if queued && failed.load(Ordering::Acquire) {
                return (None, house, batch, None, None, decoded);
            }
            // Stays set if the apply panics.
            failed.store(true, Ordering::Release);
            // Whatever was not decoded ahead is decoded on the thread that applies.
            let (mut items, position) = items(&spec, created_ns, &batch, decoded);
            let described = debug.then(|| describe(&items, &batch));
            let range = items
                .first()
                .map(Item::seq)
                .zip(position.as_ref().map(|p| p.seq));
            // Decided at the commit: unsynced only with a batch queued behind this one, which
            // (or one after it) then commits durably.
            let defer_sync = || {
                let in_a_row = streak.load(Ordering::Relaxed);
                let defer =
                    may_defer && behind.load(Ordering::Acquire) == job && in_a_row < MAX_UNSYNCED;
                streak.store(if defer { in_a_row + 1 } else { 0 }, Ordering::Relaxed);
                defer
            };
            let applied =
                store.apply_deferring(&spec, &mut items, &house, position.as_ref(), defer_sync);
            failed.store(applied.is_err(), Ordering::Release);
            if applied.is_err() {
                streak.store(0, Ordering::Relaxed);
            }
            (Some(applied), house, batch, described, range, items)
        });
        Ok(Box::pin(task))
    }

    /// Drops the queued batch, which its failed predecessor makes the applying thread hand back
    /// unapplied (with the housekeeping it carried, kept for the next batch).
    async fn drop_queued(&mut self) {
        let Some(queued) = self.queued.take() else {
            return;
        };
        match queued.task.await {
            Ok((None, house, ..)) => self.fx.restore_house(house),
            Ok((Some(_), ..)) => {
                error!("a batch queued behind a failed one was applied; its messages stay unacked")
            }
            Err(err) => warn!(error = %err, "the queued batch's task failed"),
        }
    }

    /// The items decoded ahead (the gathered messages' first ones); the spare vector takes
    /// their place for the next batch's.
    fn take_decoded_ahead(&mut self) -> Vec<Item> {
        let spare = std::mem::take(&mut self.spare_items);
        std::mem::replace(&mut self.ahead_items, spare)
    }

    /// Counts the redelivered messages of a batch.
    fn count_redeliveries(&self, messages: &[Incoming]) {
        let redelivered = messages.iter().filter(|m| m.delivered > 1).count();
        self.metrics.redeliveries.inc_by(redelivered as u64);
    }

    /// Queues the batch gathered ahead (whole, decoded) on the applying thread, behind the one
    /// it applies.
    fn queue_next(&mut self, source: &mut Source) -> Result<(), PipelineError> {
        let batch = source.take_ahead();
        let decoded = self.take_decoded_ahead();
        self.count_redeliveries(&batch);
        let size = batch.len();
        let house = self.fx.take_house();
        let task = self.submit(batch, decoded, house, true)?;
        self.queued = Some(Queued { task, size });
        Ok(())
    }

    /// Applies one segment end to end; `decoded` holds items decoded ahead (used where they are
    /// the segment's first ones, see [`items`]). With `queued`, the segment is that batch,
    /// already handed to the applying thread (`messages` is then empty).
    async fn process_segment(
        &mut self,
        messages: Vec<Incoming>,
        mode: Mode,
        mut source: Option<&mut Source>,
        mut decoded: Vec<Item>,
        queued: Option<Queued>,
    ) -> Result<(), PipelineError> {
        let started = Instant::now();
        let span = info_span!(
            "batch",
            size = queued.as_ref().map_or(messages.len(), |q| q.size),
            first_seq = tracing::field::Empty,
            last_seq = tracing::field::Empty
        );
        // (A queued batch's were counted when it was queued.)
        self.count_redeliveries(&messages);
        let max_deliver = self.spec.config.max_deliver;
        let mut attempt = 0u32;
        let mut described: Option<Vec<EventLog>> = None;
        let mut messages = messages;
        let mut pending = queued.map(|q| q.task);
        let applied: Applied = loop {
            let mut task = match pending.take() {
                Some(task) => task,
                None => {
                    let house = self.fx.take_house();
                    let batch = std::mem::take(&mut messages);
                    let decoded = std::mem::take(&mut decoded);
                    self.submit(batch, decoded, house, false)?
                }
            };
            let result = match source.as_deref_mut() {
                // Messages arriving meanwhile become the next batch: the applying thread does
                // not wait for this task to take them from the subscription. Once shutdown is
                // requested nothing more is taken (the contract's drain stops fetching).
                // They are also decoded here meanwhile, a chunk at a time, so that the applying
                // thread only applies (decoding is a fifth of its work). During a catch-up the
                // next batch, once whole and decoded, is queued on the applying thread.
                Some(source) => {
                    let cancel = self.cancel.clone();
                    let spec = self.spec.clone();
                    loop {
                        let ahead = &mut self.ahead_items;
                        let undecoded = source.ahead().len() != ahead.len();
                        let queue = mode == Mode::Normal
                            && self.queued.is_none()
                            && !undecoded
                            && !cancel.is_cancelled()
                            && source.ahead_full()
                            // Messages on their last delivery go alone (see `process`).
                            && !source
                                .ahead()
                                .iter()
                                .any(|m| on_last_delivery(m, max_deliver));
                        let mut queue_now = false;
                        tokio::select! {
                            biased;
                            done = &mut task => break done,
                            () = std::future::ready(()), if queue => queue_now = true,
                            // Decoding first: what is gathered is decoded before more is
                            // gathered, so the next batch reaches the applying thread decoded.
                            () = std::future::ready(()), if undecoded => {
                                decode_ahead(&spec, source.ahead(), ahead);
                            }
                            () = source.gather(), if !cancel.is_cancelled() => {}
                            () = cancel.cancelled(), if !cancel.is_cancelled() => {}
                        }
                        if queue_now {
                            self.queue_next(source)?;
                        }
                    }
                }
                None => task.await,
            };
            let result = match result {
                // Queued behind a batch that failed: handed to the thread again, as a batch of
                // its own, once that one is complete.
                Ok((None, house, back, _, _, items)) => {
                    info!(parent: &span, "the batch queued behind a failed one goes to the applying thread again");
                    self.fx.restore_house(house);
                    messages = back;
                    decoded = items;
                    continue;
                }
                Ok((Some(applied), house, back, logs, range, used)) => {
                    Ok((applied, house, back, logs, range, used))
                }
                Err(err) => Err(err),
            };
            let result = result.map(|(applied, house, back, logs, range, mut used)| {
                messages = back;
                // Freed here, where they were decoded (ahead), not on the applying thread.
                used.clear();
                if used.capacity() > self.spare_items.capacity() {
                    self.spare_items = used;
                }
                described = logs;
                if let Some((first, last)) = range {
                    span.record("first_seq", first);
                    span.record("last_seq", last);
                }
                // Folded in only if the transaction committed.
                if applied.is_err() {
                    self.fx.restore_house(house);
                }
                applied
            });
            match result {
                Ok(Ok(applied)) => break applied,
                // Store calls catch panics (and reducer panics are refusals), so a failed
                // task is an unexplained fault in the store path: fail closed.
                Err(join) => {
                    return Err(PipelineError::FailClosed(format!(
                        "the store task failed: {join}"
                    )));
                }
                Ok(Err(err)) => match err.kind() {
                    StoreErrorKind::Corrupted => {
                        error!(parent: &span, error = %err, "the store is corrupted; failing closed");
                        return Err(PipelineError::FailClosed(err.to_string()));
                    }
                    StoreErrorKind::Locked | StoreErrorKind::Fatal => {
                        return Err(PipelineError::Fatal(err.to_string()));
                    }
                    StoreErrorKind::Transient => {
                        let reason = format!("store unavailable: {err}");
                        // Before anything that acks (a dead letter on the last delivery would,
                        // with bulk acks, ack the unsynced batches' messages too).
                        if !self.unsynced.is_empty() {
                            return self.lose_unsynced(&span, &err, &messages, reason).await;
                        }
                        if mode == Mode::LastDelivery {
                            let poison = Poison::new(
                                ErrorCode::StoreUnavailable,
                                format!("the store failed on the last delivery: {err}"),
                            );
                            self.drain_sink().await;
                            let newest = messages.iter().map(|m| m.seq).max().unwrap_or(0);
                            self.processed_seq = self.processed_seq.max(newest);
                            self.fx.dead_letter_all(&messages, poison).await;
                            return Ok(());
                        }
                        error!(parent: &span, error = %err, attempt, "store write failed; holding the batch and retrying");
                        if !self.fx.hold(&[&messages], reason, attempt).await {
                            // Cancelled with this batch unapplied: a batch queued behind it must
                            // not be applied either (order per key); both stay unacked.
                            self.drop_queued().await;
                            return Ok(());
                        }
                        if let Err(reopen) = self.store.reopen() {
                            warn!(error = %reopen, "store reopen failed");
                        }
                        attempt += 1;
                    }
                },
            }
        };
        crash::point(crash::AFTER_COMMIT);
        self.metrics
            .store_commit
            .observe(applied.commit_time.as_secs_f64());

        if let Some(described) = &described {
            for ((m, outcome), log) in messages.iter().zip(&applied.outcomes).zip(described) {
                debug!(parent: &span, stream_seq = m.seq, subject = %m.subject,
                    event_type = log.event_type.as_deref().unwrap_or(""),
                    kv_bucket = self.spec.kv_bucket().as_deref().unwrap_or(""),
                    kv_key = log.key.as_deref().unwrap_or(""), outcome = outcome.as_str(),
                    correlation_id = log.correlation_id.as_deref().unwrap_or(""),
                    redelivered = m.delivered > 1, "event");
            }
        }
        let mut poisoned = Vec::new();
        // Counted here, added to the metrics once per batch.
        let (mut fresh, mut duplicate, mut stale) = (0, 0, 0);
        for (index, outcome) in applied.outcomes.into_iter().enumerate() {
            match outcome {
                Outcome::Applied => fresh += 1,
                Outcome::Duplicate | Outcome::AlreadyDead => duplicate += 1,
                Outcome::StaleEpoch => stale += 1,
                Outcome::Poison(poison) => {
                    poisoned.push((index, poison));
                    continue;
                }
            }
            // Settled in the store: only the ack is left to send (memory stays small while
            // the batch waits for KV).
            if let Some(m) = messages.get_mut(index) {
                m.slim();
            }
        }
        self.metrics.applied.inc_by(fresh);
        self.metrics.duplicate.inc_by(duplicate);
        self.metrics.stale_epoch.inc_by(stale);
        debug!(parent: &span, elapsed_ms = started.elapsed().as_millis() as u64,
            commit_us = applied.commit_time.as_micros() as u64, "batch committed");
        let newest = messages.iter().map(|m| m.seq).max().unwrap_or(0);
        self.processed_seq = self.processed_seq.max(newest);
        let committed = Committed {
            messages,
            kv_writes: applied.kv_writes,
            poisoned,
            outbox_len: applied.outbox_len,
            keys: applied.keys,
            started,
        };
        // Invariant (ack after durable): a batch committed unsynced is held until a later
        // commit is durable, then goes to the sink ahead of that one (commit order).
        if applied.unsynced {
            self.metrics.unsynced_commits.inc();
            self.unsynced.push(committed);
            return Ok(());
        }
        for held in std::mem::take(&mut self.unsynced) {
            self.complete(held).await?;
        }
        self.complete(committed).await
    }

    /// After a store failure, with batches committed unsynced before it: those may be lost
    /// (redb closes a failed handle), so rather than retrying this batch alone (which would
    /// put its keys past the events of the lost ones), the pipeline holds it once, reopens
    /// the store, and reads the whole unacked range back from the stream in order.
    async fn lose_unsynced(
        &mut self,
        span: &tracing::Span,
        err: &StoreError,
        messages: &[Incoming],
        reason: String,
    ) -> Result<(), PipelineError> {
        error!(parent: span, error = %err, unsynced = self.unsynced.len(),
            "store write failed after batches committed without an fsync; reading the unacked range back");
        // Their messages stay unacked: the recovery reads them back.
        self.unsynced.clear();
        let held = self.fx.hold(&[messages], reason, 0).await;
        self.drop_queued().await;
        if held {
            if let Err(reopen) = self.store.reopen() {
                warn!(error = %reopen, "store reopen failed");
            }
            self.recover_needed = true;
        }
        Ok(())
    }

    /// Hands a committed (durable) batch to the sink: it writes KV, dead-letters and acks, in
    /// commit order, while the next batch is applied.
    async fn complete(&mut self, committed: Committed) -> Result<(), PipelineError> {
        match &self.jobs {
            Some(jobs) => {
                let bytes = committed.kv_writes.iter().map(effects::write_bytes).sum();
                tokio::select! {
                    _ = self.fx.reserve_kv(bytes, committed.keys) => {}
                    _ = jobs.closed() => {}
                }
                jobs.send(Job::Batch(committed)).await.map_err(|_| {
                    PipelineError::Fatal("the KV and ack task stopped unexpectedly".into())
                })
            }
            None => {
                let mut committed = committed;
                let writes = std::mem::take(&mut committed.kv_writes);
                self.fx.complete(vec![committed], writes).await;
                Ok(())
            }
        }
    }
}

/// Whether `m` is on its last delivery (`max_deliver` 0 or less: unlimited deliveries).
fn on_last_delivery(m: &Incoming, max_deliver: i64) -> bool {
    max_deliver > 0 && m.delivered >= max_deliver
}

/// Decodes up to [`DECODE_AHEAD_CHUNK`] more of the messages gathered ahead into `decoded`
/// (the items of `ahead`'s first messages), starting over when `ahead` no longer starts with
/// them (a re-bind dropped what was gathered).
fn decode_ahead(spec: &Spec, ahead: &[Incoming], decoded: &mut Vec<Item>) {
    let matches = decoded.len() <= ahead.len()
        && decoded.last().map(Item::seq) == decoded.len().checked_sub(1).map(|i| ahead[i].seq);
    if !matches {
        decoded.clear();
    }
    let end = ahead.len().min(decoded.len() + DECODE_AHEAD_CHUNK);
    decoded.extend(ahead[decoded.len()..end].iter().map(|m| m.item(spec)));
}

/// Decodes a batch: one item per message, and the position of its newest message. `decoded`
/// holds items decoded ahead; they are kept only if they are those of the batch's first
/// messages (its memory is reused either way).
fn items(
    spec: &Spec,
    stream_created_ns: i128,
    messages: &[Incoming],
    mut decoded: Vec<Item>,
) -> (Vec<Item>, Option<Position>) {
    // A stream sequence always holds the same message, and decoding depends on the message
    // alone: an item decoded ahead is valid for any delivery of its sequence.
    let prefix = decoded.len() <= messages.len()
        && decoded.iter().zip(messages).all(|(i, m)| i.seq() == m.seq);
    if !prefix {
        decoded.clear();
    }
    let start = decoded.len();
    let mut items = decoded;
    items.extend(messages[start..].iter().map(|m| m.item(spec)));
    let mut newest: Option<(u64, u64, &Incoming)> = None;
    for m in messages {
        let (seq, publish_ms) = (m.seq, m.publish_ms);
        if newest.is_none_or(|(s, _, _)| seq > s) {
            newest = Some((seq, publish_ms, m));
        }
    }
    let position = newest.map(|(seq, publish_ms, m)| Position {
        stream: spec.config.stream.clone(),
        stream_created_ns,
        seq,
        publish_ms,
        payload_sha256: Sha256::digest(&m.payload).into(),
    });
    (items, position)
}

/// What the per-event debug log says of an event, captured before the batch is applied.
struct EventLog {
    key: Option<String>,
    event_type: Option<String>,
    correlation_id: Option<String>,
}

fn describe(items: &[Item], messages: &[Incoming]) -> Vec<EventLog> {
    items
        .iter()
        .zip(messages)
        .map(|(item, m)| {
            let event = match item {
                Item::Event(p) => Some(p),
                Item::Poison { .. } => None,
            };
            EventLog {
                key: event.map(|p| p.key.clone()),
                event_type: event.map(|p| p.event.event_type.clone()),
                correlation_id: crate::decode::correlation_id(
                    m.headers.as_ref(),
                    event.map(|p| &p.event),
                ),
            }
        })
        .collect()
}

/// Why binding failed.
#[derive(Debug, thiserror::Error)]
enum BindError {
    #[error(transparent)]
    Nats(#[from] consume::NatsError),
    #[error(transparent)]
    Gap(#[from] gap::Gap),
}

fn age_seconds(publish_ms: u64) -> f64 {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    now_ms.saturating_sub(publish_ms) as f64 / 1000.0
}

/// How a segment of a batch is processed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Normally: outages are held and retried.
    Normal,
    /// One message on its last delivery: any failure dead-letters it.
    LastDelivery,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn spec() -> Spec {
        let toml = "[[projection]]\nname = \"p\"\nstream = \"S\"\nkey = \"{data.k}\"\n\
                    reducer = \"latest\"\n";
        let config =
            crate::config::Config::parse(toml, std::path::Path::new(".")).expect("a valid config");
        Spec::compile(&config.projection[0], None).expect("a valid projection")
    }

    /// Stream message `seq`: a valid event of key `seq % 3`, or (every fifth) a poison one.
    fn message(seq: u64) -> Incoming {
        let payload = if seq % 5 == 0 {
            b"{not json".to_vec()
        } else {
            format!(
                r#"{{"specversion":"1.0","id":"e{seq}","source":"t","type":"t","data":{{"k":{}}}}}"#,
                seq % 3
            )
            .into_bytes()
        };
        Incoming::for_test(seq, &payload)
    }

    fn described(items: &[Item]) -> Vec<String> {
        items.iter().map(|i| format!("{i:?}")).collect()
    }

    proptest! {
        /// Whatever arrives ahead in whatever steps, and whatever a re-bind drops meanwhile,
        /// the items of a batch are those decoding it afresh would give.
        #[test]
        fn items_decoded_ahead_are_those_of_the_batch(
            steps in proptest::collection::vec((0usize..150, 0usize..4, proptest::bool::weighted(0.1)), 1..12)
        ) {
            let spec = spec();
            let (mut ahead, mut decoded, mut seq) = (Vec::new(), Vec::new(), 0u64);
            for (arrive, rounds, rebind) in steps {
                if rebind {
                    // A re-bind drops what was gathered; redeliveries may start lower.
                    ahead.clear();
                    seq = seq.saturating_sub(40);
                }
                for _ in 0..arrive {
                    seq += 1;
                    ahead.push(message(seq));
                }
                for _ in 0..rounds {
                    decode_ahead(&spec, &ahead, &mut decoded);
                }
            }
            let (fresh, fresh_position) = items(&spec, 0, &ahead, Vec::new());
            let (got, position) = items(&spec, 0, &ahead, decoded);
            prop_assert_eq!(described(&got), described(&fresh));
            prop_assert_eq!(format!("{position:?}"), format!("{fresh_position:?}"));
        }
    }

    #[test]
    fn decoding_ahead_goes_a_chunk_at_a_time_and_starts_over_after_a_rebind() {
        let spec = spec();
        let mut ahead: Vec<Incoming> = (1..=100).map(message).collect();
        let mut decoded = Vec::new();
        decode_ahead(&spec, &ahead, &mut decoded);
        assert_eq!(decoded.len(), DECODE_AHEAD_CHUNK);
        decode_ahead(&spec, &ahead, &mut decoded);
        assert_eq!(decoded.len(), 100);
        ahead = (61..=70).map(message).collect();
        decode_ahead(&spec, &ahead, &mut decoded);
        let seqs: Vec<u64> = decoded.iter().map(Item::seq).collect();
        assert_eq!(seqs, (61..=70).collect::<Vec<_>>());
    }
}
