//! `run`: every projection of a configuration, the HTTP listener, and a graceful shutdown.
//!
//! One cancellation token is fanned out to every task; at SIGTERM/SIGINT `/readyz` turns 503,
//! the pipelines stop fetching and finish the batch in hand (commit, KV, ack), and the process
//! exits once every task has drained.

use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::config::Config;
use crate::http::{AppState, ProjectionHandle};
use crate::metrics::Metrics;
use crate::pipeline::{Pipeline, PipelineError, Status, StatusCell};
use crate::reduce::Projection;
use crate::spec::Spec;
use crate::store::{Store, StoreError, StoreErrorKind};

/// The process exit codes of the contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// 0: success.
    Ok = 0,
    /// 1: a runtime failure.
    Failure = 1,
    /// 2: bad usage or bad configuration.
    Usage = 2,
    /// 3: failed closed (a gap or a mismatch that needs an operator).
    FailClosed = 3,
}

impl From<Exit> for ExitCode {
    fn from(exit: Exit) -> ExitCode {
        ExitCode::from(exit as u8)
    }
}

/// Rust reducers for projections with `reducer = "custom"`, by projection name.
#[derive(Clone, Default)]
pub struct Reducers(HashMap<String, Arc<dyn Projection>>);

impl Reducers {
    /// No custom reducers.
    pub fn new() -> Reducers {
        Reducers::default()
    }

    /// Registers `reducer` for the projection named `projection`.
    pub fn with(mut self, projection: &str, reducer: impl Projection) -> Reducers {
        self.0.insert(projection.to_owned(), Arc::new(reducer));
        self
    }

    /// The reducer of a projection.
    pub fn get(&self, projection: &str) -> Option<Arc<dyn Projection>> {
        self.0.get(projection).cloned()
    }
}

/// Compiles every projection of a validated configuration.
pub fn compile(config: &Config, reducers: &Reducers) -> Result<Vec<Arc<Spec>>, String> {
    config
        .projection
        .iter()
        .map(|p| Spec::compile(p, reducers.get(&p.name)).map(Arc::new))
        .collect()
}

/// Opens the store for a long-running process, with a message for each failure class.
pub fn open_store(config: &Config) -> Result<Arc<Store>, (Exit, String)> {
    Store::open(&config.store.path, config.store.cache_mib)
        .map(Arc::new)
        .map_err(|err| store_exit(&err))
}

/// The exit code and message of a store error.
pub fn store_exit(err: &StoreError) -> (Exit, String) {
    match err.kind() {
        StoreErrorKind::Corrupted => (
            Exit::FailClosed,
            format!("{err}: restore it (see the README's runbook) or move it aside to rebuild"),
        ),
        StoreErrorKind::Locked => (
            Exit::Failure,
            format!("{err}: another nats-projector is running with this store"),
        ),
        _ => (Exit::Failure, err.to_string()),
    }
}

/// The KV-format JSON of `key` (or of its escaped form) in the store.
pub fn lookup(store: &Store, spec: &Spec, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
    let mut record = store.record(&spec.namespace, key)?;
    if record.is_none() {
        let escaped = crate::key::escape(key);
        if escaped != key {
            record = store.record(&spec.namespace, &escaped)?;
        }
    }
    Ok(record.map(|r| r.kv_value(&spec.config.name, spec.config.version)))
}

/// Starts projection pipelines, at startup and later (a rebuild starts the next version of a
/// projection beside the live one). Shared with the admin routes.
#[derive(Clone)]
pub struct Spawner {
    store: Arc<Store>,
    js: async_nats::jetstream::Context,
    metrics: Metrics,
    shutdown: CancellationToken,
    pipelines: TaskTracker,
    options: crate::pipeline::Options,
    failure: Arc<std::sync::Mutex<Option<Exit>>>,
    /// Every running projection version.
    pub projections: Arc<std::sync::RwLock<Vec<ProjectionHandle>>>,
    /// The custom reducers, for specs compiled later.
    pub reducers: Reducers,
}

impl Spawner {
    /// The running projections.
    pub fn handles(&self) -> Vec<ProjectionHandle> {
        match self.projections.read() {
            Ok(list) => list.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Starts a pipeline for `spec`; refuses a projection version that already runs.
    pub fn start(&self, spec: Arc<Spec>) -> Result<ProjectionHandle, String> {
        let handle = ProjectionHandle {
            status: Arc::new(StatusCell::new(Status {
                projection: spec.config.name.clone(),
                version: spec.config.version,
                stream: spec.config.stream.clone(),
                consumer: spec.durable.clone(),
                kv_bucket: spec.kv_bucket(),
                ..Status::default()
            })),
            spec: spec.clone(),
        };
        {
            let mut list = match self.projections.write() {
                Ok(list) => list,
                Err(poisoned) => poisoned.into_inner(),
            };
            let same = |h: &ProjectionHandle| {
                h.spec.config.name == spec.config.name
                    && h.spec.config.version == spec.config.version
            };
            if list.iter().any(same) {
                return Err(format!(
                    "{} v{} is already running",
                    spec.name(),
                    spec.config.version
                ));
            }
            list.push(handle.clone());
        }
        let m = self
            .metrics
            .projection(spec.name(), &spec.config.stream, &spec.durable);
        let pipeline = Pipeline::new(
            spec.clone(),
            self.store.clone(),
            self.js.clone(),
            m.clone(),
            handle.status.clone(),
            self.shutdown.clone(),
            self.options.clone(),
        );
        let (failure, shutdown, status) = (
            self.failure.clone(),
            self.shutdown.clone(),
            handle.status.clone(),
        );
        self.pipelines.spawn(async move {
            let Err(err) = pipeline.run().await else {
                return;
            };
            m.ready.set(0);
            status.update(|s| s.gap = Some(err.to_string()));
            let exit = match &err {
                // Fail closed: this projection stops applying and acking; the process keeps
                // serving /readyz (503, with the reason) and the metrics until stopped.
                PipelineError::Gap(_) | PipelineError::FailClosed(_) => {
                    m.gaps.inc();
                    error!(projection = %spec.name(), error = %err,
                        "{}", crate::pipeline::gap::repair_hint(spec.name()));
                    Exit::FailClosed
                }
                PipelineError::Fatal(_) => {
                    error!(projection = %spec.name(), error = %err, "projection stopped; stopping the process");
                    shutdown.cancel();
                    Exit::Failure
                }
            };
            if let Ok(mut slot) = failure.lock() {
                // A fatal error outranks a gap.
                if slot.is_none_or(|e| e == Exit::FailClosed) {
                    *slot = Some(exit);
                }
            }
        });
        Ok(handle)
    }

    /// Promotes `handle` (points its bucket's alias at it) as soon as it has caught up: bound,
    /// sampled, no failure or gap, and at most one batch behind.
    pub fn promote_when_caught_up(&self, handle: ProjectionHandle) {
        let (js, shutdown) = (self.js.clone(), self.shutdown.clone());
        self.pipelines.spawn(async move {
            let spec = &handle.spec;
            let (Some(logical), Some(bucket)) = (spec.config.kv_bucket.clone(), spec.kv_bucket()) else {
                return;
            };
            let threshold = spec.config.batch as u64;
            loop {
                let s = handle.status.get();
                let caught_up = s.bound && s.sampled && s.failure.is_none() && s.gap.is_none()
                    && s.pending + s.ack_pending <= threshold;
                if caught_up {
                    let alias = crate::alias::Alias {
                        bucket: bucket.clone(),
                        projection: spec.config.name.clone(),
                        version: spec.config.version,
                        promoted_unix_ms: std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .map(|d| d.as_millis() as u64)
                            .unwrap_or(0),
                    };
                    match crate::alias::promote(&js, &logical, &alias).await {
                        Ok(()) => {
                            info!(projection = %spec.name(), version = spec.config.version,
                                alias = %logical, bucket = %bucket, last_applied = s.last_applied_seq,
                                pending = s.pending, ack_pending = s.ack_pending,
                                "promoted: readers now follow this version");
                            handle.status.update(|s| s.promoted = true);
                            return;
                        }
                        Err(err) => {
                            warn!(error = %err, "promotion failed");
                            handle.status.update(|s| s.failure = Some(err));
                            return;
                        }
                    }
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                }
            }
        });
    }
}

/// Runs every projection until `shutdown` fires, then drains. Returns the exit code.
pub async fn run(config: Config, reducers: Reducers, shutdown: CancellationToken) -> Exit {
    let specs = match compile(&config, &reducers) {
        Ok(specs) => specs,
        Err(err) => {
            error!("{err}");
            return Exit::Usage;
        }
    };
    let store = match open_store(&config) {
        Ok(store) => store,
        Err((exit, message)) => {
            error!("{message}");
            return exit;
        }
    };
    let metrics = Metrics::new();
    let draining = Arc::new(AtomicBool::new(false));
    let http_stop = CancellationToken::new();
    let tracker = TaskTracker::new();

    info!(url = %config.nats_url(), "connecting to NATS");
    let client = loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Exit::Ok,
            result = crate::consume::connect(&config.nats, config.nats_url()) => match result {
                Ok(client) => break client,
                Err(err) => {
                    warn!(error = %err, "NATS not reachable yet; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => return Exit::Ok,
                        _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                    }
                }
            }
        }
    };
    let js = async_nats::jetstream::new(client.clone());

    let spawner = Spawner {
        store: store.clone(),
        js: js.clone(),
        metrics: metrics.clone(),
        shutdown: shutdown.clone(),
        pipelines: TaskTracker::new(),
        options: crate::pipeline::Options {
            ready_max_lag: config.http.ready_max_lag,
            snapshot_dir: config.snapshot_dir(),
            snapshot_interval: config.snapshots.interval,
            snapshot_keep: config.snapshots.keep,
            snapshot_object_store: config.snapshots.object_store.clone(),
        },
        failure: Arc::default(),
        projections: Arc::default(),
        reducers: reducers.clone(),
    };
    for spec in specs {
        if let Err(err) = spawner.start(spec) {
            error!("{err}");
            return Exit::Usage;
        }
    }

    let state = AppState {
        metrics: metrics.clone(),
        projections: spawner.projections.clone(),
        store: store.clone(),
        ready_max_lag: config.http.ready_max_lag,
        draining: draining.clone(),
        js: Some(js.clone()),
        snapshot_dir: config.snapshot_dir(),
        spawner: Some(spawner.clone()),
    };
    if !config.http.listen.is_empty() {
        let listener = match tokio::net::TcpListener::bind(&config.http.listen).await {
            Ok(listener) => listener,
            Err(err) => {
                error!(listen = %config.http.listen, error = %err, "cannot listen");
                shutdown.cancel();
                let _ =
                    tokio::time::timeout(Duration::from_secs(25), spawner.pipelines.wait()).await;
                return Exit::Failure;
            }
        };
        info!(listen = %config.http.listen, "serving /metrics, /livez, /readyz");
        let stop = http_stop.clone();
        tracker.spawn(async move {
            if let Err(err) = crate::http::serve(listener, state, stop).await {
                error!(error = %err, "HTTP listener failed");
            }
        });
    }

    shutdown.cancelled().await;
    draining.store(true, Ordering::SeqCst);
    info!("shutting down: finishing the batches in hand");
    spawner.pipelines.close();
    if tokio::time::timeout(Duration::from_secs(25), spawner.pipelines.wait())
        .await
        .is_err()
    {
        warn!("projections did not drain within 25s");
    }
    if let Err(err) = client.flush().await {
        warn!(error = %err, "could not flush the last acks");
    }
    http_stop.cancel();
    tracker.close();
    let _ = tokio::time::timeout(Duration::from_secs(2), tracker.wait()).await;
    let exit = spawner
        .failure
        .lock()
        .ok()
        .and_then(|slot| *slot)
        .unwrap_or(Exit::Ok);
    info!(code = exit as u8, "stopped");
    exit
}
