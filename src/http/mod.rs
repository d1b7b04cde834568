//! The HTTP listener: `/metrics`, `/livez`, `/readyz`, and the admin routes through which
//! one-shot commands reach a running process (redb lets one process open the store).
//!
//! Loopback by default: the admin routes are read-only but not authenticated.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::pipeline::StatusCell;
use crate::spec::Spec;
use crate::store::Store;

/// One projection as the HTTP routes see it.
#[derive(Clone)]
pub struct ProjectionHandle {
    /// The compiled projection.
    pub spec: Arc<Spec>,
    /// Its live status.
    pub status: Arc<StatusCell>,
}

/// Shared state of the routes.
#[derive(Clone)]
pub struct AppState {
    /// The metrics registry.
    pub metrics: Metrics,
    /// Every running projection version.
    pub projections: Arc<std::sync::RwLock<Vec<ProjectionHandle>>>,
    /// The store.
    pub store: Arc<Store>,
    /// `/readyz` is 503 above this lag.
    pub ready_max_lag: u64,
    /// Set at SIGTERM: `/readyz` turns 503 while the process drains.
    pub draining: Arc<AtomicBool>,
    /// The NATS connection, for admin routes that read KV.
    pub js: Option<async_nats::jetstream::Context>,
    /// Where snapshots go by default.
    pub snapshot_dir: std::path::PathBuf,
    /// Starts pipelines (rebuilds).
    pub spawner: Option<crate::runtime::Spawner>,
}

impl AppState {
    fn handles(&self) -> Vec<ProjectionHandle> {
        match self.projections.read() {
            Ok(list) => list.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// The projection called `name`: that version, or its highest running one.
    fn projection(&self, name: &str, version: Option<u32>) -> Option<ProjectionHandle> {
        self.handles()
            .into_iter()
            .filter(|p| p.spec.name() == name)
            .filter(|p| version.is_none_or(|v| p.spec.config.version == v))
            .max_by_key(|p| p.spec.config.version)
    }
}

/// The 404 of a request naming a projection that does not run here.
fn no_projection(name: &str) -> Response {
    (StatusCode::NOT_FOUND, format!("no projection {name:?}\n")).into_response()
}

/// The router.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/livez", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/admin/status", get(status))
        .route("/admin/get", get(get_record))
        .route("/admin/verify", get(verify))
        .route("/admin/snapshot", get(snapshot))
        .route("/admin/replay", get(replay))
        .route("/admin/rebuild", get(rebuild))
        .with_state(state)
}

/// Serves until `stop` fires.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    stop: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(stop.cancelled_owned())
        .await
}

async fn metrics(State(state): State<AppState>) -> Response {
    state
        .metrics
        .store_bytes
        .set(state.store.file_size() as i64);
    let draining = state.draining.load(Ordering::SeqCst);
    for p in state.handles().iter() {
        let c = &p.spec.config;
        let ready = !draining && p.status.get().readiness(state.ready_max_lag).is_ok();
        state
            .metrics
            .set_ready(&c.name, &c.stream, &p.spec.durable, ready);
    }
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}

async fn readyz(State(state): State<AppState>) -> Response {
    if state.draining.load(Ordering::SeqCst) {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response();
    }
    let mut problems = String::new();
    for p in state.handles().iter() {
        if let Err(why) = p.status.get().readiness(state.ready_max_lag) {
            problems.push_str(&format!("{}: {why}\n", p.spec.name()));
        }
    }
    if problems.is_empty() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, problems).into_response()
    }
}

async fn status(State(state): State<AppState>) -> Response {
    let all: Vec<_> = state
        .handles()
        .iter()
        .map(|p| {
            let s = p.status.get();
            let ready = s.readiness(state.ready_max_lag);
            serde_json::json!({
                "status": s,
                "ready": ready.is_ok(),
                "reason": ready.err(),
            })
        })
        .collect();
    Json(all).into_response()
}

#[derive(Deserialize)]
struct GetQuery {
    projection: String,
    version: Option<u32>,
    key: String,
}

async fn get_record(State(state): State<AppState>, Query(q): Query<GetQuery>) -> Response {
    let Some(p) = state.projection(&q.projection, q.version) else {
        return no_projection(&q.projection);
    };
    let (store, spec, key) = (state.store.clone(), p.spec.clone(), q.key);
    let found =
        tokio::task::spawn_blocking(move || crate::runtime::lookup(&store, &spec, &key)).await;
    match found {
        Ok(Ok(Some(value))) => {
            ([(header::CONTENT_TYPE, "application/json")], value).into_response()
        }
        Ok(Ok(None)) => (StatusCode::NOT_FOUND, "no such key\n").into_response(),
        Ok(Err(err)) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{err}\n")).into_response(),
        Err(err) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{err}\n")).into_response(),
    }
}

#[derive(Deserialize)]
struct ProjectionQuery {
    projection: String,
    version: Option<u32>,
}

async fn verify(State(state): State<AppState>, Query(q): Query<ProjectionQuery>) -> Response {
    let Some(p) = state.projection(&q.projection, q.version) else {
        return no_projection(&q.projection);
    };
    let Some(js) = &state.js else {
        return (StatusCode::SERVICE_UNAVAILABLE, "not connected to NATS\n").into_response();
    };
    match crate::kv::verify::verify(&state.store, js, &p.spec).await {
        Ok(report) => Json(report).into_response(),
        Err(err) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{err}\n")).into_response(),
    }
}

#[derive(Deserialize)]
struct SnapshotQuery {
    projection: String,
    version: Option<u32>,
    out: Option<String>,
    object_store: Option<String>,
}

async fn snapshot(State(state): State<AppState>, Query(q): Query<SnapshotQuery>) -> Response {
    let Some(p) = state.projection(&q.projection, q.version) else {
        return no_projection(&q.projection);
    };
    let (store, spec, dir) = (
        state.store.clone(),
        p.spec.clone(),
        state.snapshot_dir.clone(),
    );
    let out = q.out.map(std::path::PathBuf::from);
    let made = tokio::task::spawn_blocking(move || {
        crate::snapshot::create(&store, &spec, out.as_deref(), &dir)
    })
    .await;
    let mut created = match made {
        Ok(Ok(created)) => created,
        Ok(Err(err)) => {
            return (StatusCode::INTERNAL_SERVER_ERROR, format!("{err}\n")).into_response();
        }
        Err(err) => return (StatusCode::INTERNAL_SERVER_ERROR, format!("{err}\n")).into_response(),
    };
    if let Some(bucket) = q.object_store {
        let Some(js) = &state.js else {
            return (StatusCode::SERVICE_UNAVAILABLE, "not connected to NATS\n").into_response();
        };
        match crate::snapshot::upload(js, &bucket, &created.path).await {
            Ok(name) => created.object = Some(format!("{bucket}/{name}")),
            Err(err) => return (StatusCode::BAD_GATEWAY, format!("{err}\n")).into_response(),
        }
    }
    Json(created).into_response()
}

#[derive(Deserialize)]
struct ReplayQuery {
    projection: String,
    version: Option<u32>,
    from_seq: Option<u64>,
    to_seq: Option<u64>,
    from_ms: Option<u64>,
    to_ms: Option<u64>,
    #[serde(default)]
    dry_run: bool,
}

async fn replay(State(state): State<AppState>, Query(q): Query<ReplayQuery>) -> Response {
    let Some(p) = state.projection(&q.projection, q.version) else {
        return no_projection(&q.projection);
    };
    let Some(js) = &state.js else {
        return (StatusCode::SERVICE_UNAVAILABLE, "not connected to NATS\n").into_response();
    };
    let range = crate::replay::Range {
        from_seq: q.from_seq,
        to_seq: q.to_seq,
        from_ms: q.from_ms,
        to_ms: q.to_ms,
    };
    match crate::replay::run(js, &state.store, &p.spec, &range, q.dry_run, |_| {}).await {
        Ok(report) => Json(report).into_response(),
        Err(err) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{err}\n")).into_response(),
    }
}

#[derive(Deserialize)]
struct RebuildQuery {
    /// The configuration file holding the new version (absolute path on this machine).
    config: String,
    projection: String,
    #[serde(default)]
    promote: bool,
    from_snapshot: Option<String>,
}

/// Starts the configured (next) version of a projection beside the live one and, with
/// `promote`, points readers at it once it has caught up.
async fn rebuild(State(state): State<AppState>, Query(q): Query<RebuildQuery>) -> Response {
    let Some(spawner) = &state.spawner else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "this process cannot start projections\n",
        )
            .into_response();
    };
    let config = match crate::config::Config::load(std::path::Path::new(&q.config)) {
        Ok(config) => config,
        Err(err) => {
            return (StatusCode::BAD_REQUEST, format!("{}: {err}\n", q.config)).into_response();
        }
    };
    let Some(projection) = config.projection(&q.projection) else {
        return (
            StatusCode::NOT_FOUND,
            format!("no projection {:?} in {}\n", q.projection, q.config),
        )
            .into_response();
    };
    let spec = match crate::spec::Spec::compile(projection, spawner.reducers.get(&projection.name))
    {
        Ok(spec) => std::sync::Arc::new(spec),
        Err(err) => return (StatusCode::BAD_REQUEST, format!("{err}\n")).into_response(),
    };
    if let Some(path) = q.from_snapshot {
        let Some(js) = &state.js else {
            return (StatusCode::SERVICE_UNAVAILABLE, "not connected to NATS\n").into_response();
        };
        if let Err(err) =
            crate::restore::seed_from_snapshot(js, &state.store, &spec, std::path::Path::new(&path))
                .await
        {
            return (StatusCode::CONFLICT, format!("{err}\n")).into_response();
        }
    }
    match spawner.start(spec) {
        Ok(handle) => {
            if q.promote {
                spawner.promote_when_caught_up(handle);
            }
            (StatusCode::OK, "started\n").into_response()
        }
        Err(err) => (StatusCode::CONFLICT, format!("{err}\n")).into_response(),
    }
}
