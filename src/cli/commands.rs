//! What each command does.

use std::path::Path;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::{Command, ConfigArg, DlqCommand, SnapshotCommand, admin};
use crate::config::Config;
use crate::pipeline::Status;
use crate::runtime::{self, Exit, Reducers};
use crate::spec::Spec;
use crate::store::{Store, StoreErrorKind};

pub(super) async fn dispatch(command: Command, reducers: Reducers) -> Exit {
    match command {
        Command::Run(c) => run(&c, reducers).await,
        Command::CheckConfig(c) => check_config(&c, &reducers),
        Command::Status { config, json } => status(&config, &reducers, json).await,
        Command::Get {
            config,
            projection,
            key,
        } => get(&config, &reducers, &projection, &key).await,
        Command::Verify {
            config,
            projection,
            json,
        } => verify(&config, &reducers, &projection, json).await,
        Command::Snapshot(command) => snapshot(command, &reducers).await,
        Command::Replay {
            config,
            projection,
            from_seq,
            to_seq,
            from_time,
            to_time,
            dry_run,
        } => {
            let times = (
                from_time
                    .as_deref()
                    .map(crate::replay::parse_time)
                    .transpose(),
                to_time
                    .as_deref()
                    .map(crate::replay::parse_time)
                    .transpose(),
            );
            let (Ok(from_ms), Ok(to_ms)) = times else {
                eprintln!("--from-time/--to-time take RFC 3339 times like 2026-11-23T10:00:00Z");
                return Exit::Usage;
            };
            if from_seq.is_none() && from_ms.is_none() {
                eprintln!("replay needs --from-seq or --from-time");
                return Exit::Usage;
            }
            let range = crate::replay::Range {
                from_seq,
                to_seq,
                from_ms,
                to_ms,
            };
            replay(&config, &reducers, &projection, range, dry_run).await
        }
        Command::Dlq(command) => dlq(command, &reducers).await,
        Command::Rebuild {
            config,
            projection,
            from_snapshot,
            promote,
        } => rebuild(&config, reducers, &projection, from_snapshot, promote).await,
        Command::PublishJsonl { url, stream, file } => publish_jsonl(&url, stream, &file).await,
        Command::KvDump { config, projection } => kv_dump(&config, &reducers, &projection).await,
    }
}

/// Loads and compiles a configuration, printing every problem.
fn load(arg: &ConfigArg, reducers: &Reducers) -> Result<(Config, Vec<Arc<Spec>>), Exit> {
    let config = Config::load(&arg.config).map_err(|err| {
        eprintln!("{}: invalid configuration:\n{err}", arg.config.display());
        Exit::Usage
    })?;
    let specs = runtime::compile(&config, reducers).map_err(|err| {
        eprintln!("{}: {err}", arg.config.display());
        Exit::Usage
    })?;
    Ok((config, specs))
}

/// The configuration and its projection named `name`.
fn load_projection(
    arg: &ConfigArg,
    reducers: &Reducers,
    name: &str,
) -> Result<(Config, Arc<Spec>), Exit> {
    let (config, specs) = load(arg, reducers)?;
    let spec = spec_named(&specs, name)?.clone();
    Ok((config, spec))
}

fn spec_named<'a>(specs: &'a [Arc<Spec>], name: &str) -> Result<&'a Arc<Spec>, Exit> {
    specs.iter().find(|s| s.name() == name).ok_or_else(|| {
        let names: Vec<&str> = specs.iter().map(|s| s.name()).collect();
        eprintln!(
            "no projection {name:?} (the configuration has: {})",
            names.join(", ")
        );
        Exit::Usage
    })
}

async fn run(arg: &ConfigArg, reducers: Reducers) -> Exit {
    let (config, _) = match load(arg, &reducers) {
        Ok(loaded) => loaded,
        Err(exit) => return exit,
    };
    let shutdown = CancellationToken::new();
    let signal = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("signal received");
        signal.cancel();
    });
    runtime::run(config, reducers, shutdown).await
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn check_config(arg: &ConfigArg, reducers: &Reducers) -> Exit {
    match load(arg, reducers) {
        Ok((config, _)) => {
            println!(
                "{}: valid ({} projection{})",
                arg.config.display(),
                config.projection.len(),
                if config.projection.len() == 1 {
                    ""
                } else {
                    "s"
                }
            );
            Exit::Ok
        }
        Err(exit) => exit,
    }
}

/// How a one-shot command reaches the store.
enum Access {
    /// The store file, opened by this process.
    Direct(Arc<Store>),
    /// A running process holds it: ask its admin routes.
    Running(String),
    /// No store file yet.
    Missing,
}

fn access(config: &Config) -> Result<Access, Exit> {
    match Store::open_existing(&config.store.path, config.store.cache_mib) {
        Ok(Some(store)) => Ok(Access::Direct(Arc::new(store))),
        Ok(None) => Ok(Access::Missing),
        Err(err) if err.kind() == StoreErrorKind::Locked => {
            if config.http.listen.is_empty() {
                eprintln!("{err}, and [http] listen is disabled, so it cannot be asked");
                return Err(Exit::Failure);
            }
            Ok(Access::Running(config.http.listen.clone()))
        }
        Err(err) => {
            let (exit, message) = runtime::store_exit(&err);
            eprintln!("{message}");
            Err(exit)
        }
    }
}

async fn get(arg: &ConfigArg, reducers: &Reducers, projection: &str, key: &str) -> Exit {
    let (config, spec) = match load_projection(arg, reducers, projection) {
        Ok(loaded) => loaded,
        Err(exit) => return exit,
    };
    let found = match access(&config) {
        Err(exit) => return exit,
        Ok(Access::Missing) => None,
        Ok(Access::Direct(store)) => match runtime::lookup(&store, &spec, key) {
            Ok(found) => found,
            Err(err) => {
                let (exit, message) = runtime::store_exit(&err);
                eprintln!("{message}");
                return exit;
            }
        },
        Ok(Access::Running(addr)) => {
            let path = format!(
                "/admin/get?projection={}&version={}&key={}",
                admin::encode(projection),
                spec.config.version,
                admin::encode(key)
            );
            match admin::get(&addr, &path).await {
                Ok(r) if r.status == 200 => Some(r.body),
                Ok(r) if r.status == 404 => None,
                Ok(r) => return refused(&r),
                Err(err) => {
                    eprintln!("{err}");
                    return Exit::Failure;
                }
            }
        }
    };
    match found {
        Some(value) => {
            println!("{}", String::from_utf8_lossy(&value));
            Exit::Ok
        }
        None => {
            eprintln!("{projection}: no key {key:?}");
            Exit::Failure
        }
    }
}

async fn status(arg: &ConfigArg, reducers: &Reducers, json: bool) -> Exit {
    let (config, specs) = match load(arg, reducers) {
        Ok(loaded) => loaded,
        Err(exit) => return exit,
    };
    let rows: Vec<(Status, Result<(), String>)> = match access(&config) {
        Err(exit) => return exit,
        Ok(Access::Running(addr)) => match admin::get(&addr, "/admin/status").await {
            Ok(r) if r.status == 200 => {
                match serde_json::from_slice::<Vec<serde_json::Value>>(&r.body) {
                    Ok(values) => values
                        .into_iter()
                        .filter_map(|v| {
                            let status: Status =
                                serde_json::from_value(v["status"].clone()).ok()?;
                            let ready = match v["reason"].as_str() {
                                Some(reason) => Err(reason.to_owned()),
                                None => Ok(()),
                            };
                            Some((status, ready))
                        })
                        .collect(),
                    Err(err) => {
                        eprintln!("unexpected answer from the running projector: {err}");
                        return Exit::Failure;
                    }
                }
            }
            Ok(r) => {
                eprintln!("the running projector answered {}", r.status);
                return Exit::Failure;
            }
            Err(err) => {
                eprintln!("{err}");
                return Exit::Failure;
            }
        },
        Ok(access) => offline_status(&config, &specs, access).await,
    };
    if json {
        let out: Vec<_> = rows
            .iter()
            .map(|(s, ready)| {
                serde_json::json!({
                    "projection": s.projection, "version": s.version, "stream": s.stream,
                    "consumer": s.consumer, "kv_bucket": s.kv_bucket,
                    "last_applied_stream_seq": s.last_applied_seq,
                    "stream_last_seq": s.stream_last_seq, "pending": s.pending,
                    "ack_pending": s.ack_pending, "kv_outbox": s.kv_outbox,
                    "ready": ready.is_ok(), "reason": ready.as_ref().err(),
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
    } else {
        for (s, ready) in &rows {
            println!("{} (v{})", s.projection, s.version);
            println!("  stream            {}  consumer {}", s.stream, s.consumer);
            println!(
                "  kv bucket         {}",
                s.kv_bucket.as_deref().unwrap_or("(none: store only)")
            );
            println!(
                "  last applied seq  {}  (stream last {})",
                s.last_applied_seq, s.stream_last_seq
            );
            println!(
                "  pending           {}  ack pending {}  kv outbox {}",
                s.pending, s.ack_pending, s.kv_outbox
            );
            match ready {
                Ok(()) => println!("  ready             yes"),
                Err(why) => println!("  ready             no: {why}"),
            }
        }
    }
    Exit::Ok
}

/// Status from the store file and NATS when no process runs.
async fn offline_status(
    config: &Config,
    specs: &[Arc<Spec>],
    access: Access,
) -> Vec<(Status, Result<(), String>)> {
    let store = match access {
        Access::Direct(store) => Some(store),
        _ => None,
    };
    let js = match tokio::time::timeout(
        std::time::Duration::from_secs(5),
        crate::consume::connect(&config.nats, config.nats_url()),
    )
    .await
    {
        Ok(Ok(client)) => Some(async_nats::jetstream::new(client)),
        _ => None,
    };
    let mut rows = Vec::new();
    for spec in specs {
        let mut s = Status {
            projection: spec.config.name.clone(),
            version: spec.config.version,
            stream: spec.config.stream.clone(),
            consumer: spec.durable.clone(),
            kv_bucket: spec.kv_bucket(),
            ..Status::default()
        };
        if let Some(store) = &store {
            if let Ok(Some(c)) = store.checkpoint(&spec.namespace) {
                s.last_applied_seq = c.last_seq;
            }
            s.kv_outbox = store.outbox_len(&spec.namespace).unwrap_or(0);
        }
        if let Some(js) = &js {
            if let Ok(mut stream) = js.get_stream(&spec.config.stream).await {
                if let Ok(info) = stream.info().await {
                    s.stream_last_seq = info.state.last_sequence;
                }
                if let Ok(mut consumer) = stream
                    .get_consumer::<async_nats::jetstream::consumer::pull::Config>(&spec.durable)
                    .await
                {
                    if let Ok(info) = consumer.info().await {
                        s.pending = info.num_pending;
                        s.ack_pending = info.num_ack_pending as u64;
                    }
                }
            }
        }
        let why = if js.is_none() {
            "not running (and NATS is not reachable)"
        } else {
            "not running"
        };
        rows.push((s, Err(why.to_owned())));
    }
    rows
}

async fn verify(arg: &ConfigArg, reducers: &Reducers, projection: &str, json: bool) -> Exit {
    let (config, spec) = match load_projection(arg, reducers, projection) {
        Ok(loaded) => loaded,
        Err(exit) => return exit,
    };
    let report = match access(&config) {
        Err(exit) => return exit,
        Ok(Access::Missing) => {
            eprintln!("no store at {}", config.store.path.display());
            return Exit::Failure;
        }
        Ok(Access::Running(addr)) => {
            let path = format!(
                "/admin/verify?projection={}&version={}",
                admin::encode(projection),
                spec.config.version
            );
            match admin_json(&addr, &path).await {
                Ok(report) => report,
                Err(exit) => return exit,
            }
        }
        Ok(Access::Direct(store)) => {
            let client = match crate::consume::connect(&config.nats, config.nats_url()).await {
                Ok(client) => client,
                Err(err) => {
                    eprintln!("{err}");
                    return Exit::Failure;
                }
            };
            let js = async_nats::jetstream::new(client);
            match crate::kv::verify::verify(&store, &js, &spec).await {
                Ok(report) => report,
                Err(err) => {
                    eprintln!("{err}");
                    return Exit::Failure;
                }
            }
        }
    };
    print_report(&report, json);
    if report.is_clean() {
        Exit::Ok
    } else {
        Exit::FailClosed
    }
}

fn print_report(report: &crate::kv::verify::Report, json: bool) {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(report).unwrap_or_default()
        );
        return;
    }
    println!(
        "{}: {} store keys, {} KV keys, {} matching, {} pending in the outbox, {} differences",
        report.projection,
        report.store_keys,
        report.kv_keys,
        report.matching,
        report.pending,
        report.differences
    );
    for line in &report.listed {
        println!("  {line}");
    }
}

async fn publish_jsonl(url: &str, stream: Option<String>, file: &Path) -> Exit {
    let text = match std::fs::read_to_string(file) {
        Ok(text) => text,
        Err(err) => {
            eprintln!("{}: {err}", file.display());
            return Exit::Usage;
        }
    };
    let mut messages = Vec::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let value: serde_json::Value = match serde_json::from_str(line) {
            Ok(value) => value,
            Err(err) => {
                eprintln!("{}:{}: {err}", file.display(), i + 1);
                return Exit::Usage;
            }
        };
        let (Some(subject), Some(event)) = (value["subject"].as_str(), value.get("event")) else {
            eprintln!(
                "{}:{}: needs \"subject\" and \"event\"",
                file.display(),
                i + 1
            );
            return Exit::Usage;
        };
        messages.push((
            subject.to_owned(),
            serde_json::to_vec(event).unwrap_or_default(),
        ));
    }
    let client = match async_nats::connect(url).await {
        Ok(client) => client,
        Err(err) => {
            eprintln!("cannot connect to {url}: {err}");
            return Exit::Failure;
        }
    };
    let js = async_nats::jetstream::new(client);
    if let Some(name) = stream {
        let mut prefixes: Vec<String> = messages
            .iter()
            .map(|(s, _)| format!("{}.>", s.split('.').next().unwrap_or(s)))
            .collect();
        prefixes.sort();
        prefixes.dedup();
        if js.get_stream(&name).await.is_err() {
            if let Err(err) = js
                .create_stream(async_nats::jetstream::stream::Config {
                    name: name.clone(),
                    subjects: prefixes,
                    ..Default::default()
                })
                .await
            {
                eprintln!("cannot create stream {name}: {err}");
                return Exit::Failure;
            }
        }
    }
    let total = messages.len();
    let mut acks = std::collections::VecDeque::new();
    for (subject, payload) in messages {
        match js.publish(subject, payload.into()).await {
            Ok(ack) => acks.push_back(ack),
            Err(err) => {
                eprintln!("publish failed: {err}");
                return Exit::Failure;
            }
        }
        if acks.len() >= 512 {
            if let Some(ack) = acks.pop_front() {
                if let Err(err) = ack.await {
                    eprintln!("publish failed: {err}");
                    return Exit::Failure;
                }
            }
        }
    }
    for ack in acks {
        if let Err(err) = ack.await {
            eprintln!("publish failed: {err}");
            return Exit::Failure;
        }
    }
    println!("published {total} events");
    Exit::Ok
}

async fn kv_dump(arg: &ConfigArg, reducers: &Reducers, projection: &str) -> Exit {
    let (config, spec) = match load_projection(arg, reducers, projection) {
        Ok(loaded) => loaded,
        Err(exit) => return exit,
    };
    let Some(bucket) = spec.kv_bucket() else {
        eprintln!("{projection} has no kv_bucket");
        return Exit::Usage;
    };
    let client = match crate::consume::connect(&config.nats, config.nats_url()).await {
        Ok(client) => client,
        Err(err) => {
            eprintln!("{err}");
            return Exit::Failure;
        }
    };
    let js = async_nats::jetstream::new(client);
    match crate::kv::verify::kv_entries(&js, &bucket).await {
        Ok(entries) => {
            for (key, (op, value)) in entries {
                if op == async_nats::jetstream::kv::Operation::Put {
                    println!("{key} {}", String::from_utf8_lossy(&value));
                }
            }
            Exit::Ok
        }
        Err(err) => {
            eprintln!("{err}");
            Exit::Failure
        }
    }
}

async fn snapshot(command: SnapshotCommand, reducers: &Reducers) -> Exit {
    match command {
        SnapshotCommand::Create {
            config,
            projection,
            out,
            object_store,
        } => snapshot_create(&config, reducers, &projection, out, object_store).await,
        SnapshotCommand::Verify { path } => match crate::snapshot::read_file(&path) {
            Ok(snapshot) => {
                let h = &snapshot.header;
                println!(
                    "{}: valid snapshot of {} v{} at stream sequence {} of {} ({} records, {} dedupe markers, {} dead letters), sha256 {}",
                    path.display(),
                    h.projection,
                    h.version,
                    h.seq,
                    h.stream,
                    h.records,
                    h.markers,
                    h.dead_letters,
                    snapshot.sha256
                );
                Exit::Ok
            }
            Err(err @ crate::snapshot::SnapshotError::Damaged(_)) => {
                eprintln!("{}: {err}", path.display());
                Exit::FailClosed
            }
            Err(err) => {
                eprintln!("{err}");
                Exit::Failure
            }
        },
        SnapshotCommand::Restore {
            config,
            path,
            object_store,
        } => snapshot_restore(&config, reducers, &path, object_store).await,
    }
}

fn print_created(created: &crate::snapshot::Created) {
    let h = &created.header;
    println!("{}", created.path.display());
    if let Some(object) = &created.object {
        println!("object {object}");
    }
    println!(
        "{} v{} at stream sequence {}: {} records, sha256 {}",
        h.projection, h.version, h.seq, h.records, created.sha256
    );
}

async fn snapshot_create(
    arg: &ConfigArg,
    reducers: &Reducers,
    projection: &str,
    out: Option<std::path::PathBuf>,
    object_store: Option<String>,
) -> Exit {
    let (config, spec) = match load_projection(arg, reducers, projection) {
        Ok(loaded) => loaded,
        Err(exit) => return exit,
    };
    let mut created = match access(&config) {
        Err(exit) => return exit,
        Ok(Access::Missing) => {
            eprintln!("no store at {}", config.store.path.display());
            return Exit::Failure;
        }
        Ok(Access::Running(addr)) => {
            let mut path = format!(
                "/admin/snapshot?projection={}&version={}",
                admin::encode(projection),
                spec.config.version
            );
            if let Some(out) = &out {
                let absolute = std::path::absolute(out).unwrap_or_else(|_| out.clone());
                path.push_str(&format!(
                    "&out={}",
                    admin::encode(&absolute.to_string_lossy())
                ));
            }
            if let Some(bucket) = &object_store {
                path.push_str(&format!("&object_store={}", admin::encode(bucket)));
            }
            return match admin_json(&addr, &path).await {
                Ok(created) => {
                    print_created(&created);
                    Exit::Ok
                }
                Err(exit) => exit,
            };
        }
        Ok(Access::Direct(store)) => {
            match crate::snapshot::create(&store, &spec, out.as_deref(), &config.snapshot_dir()) {
                Ok(created) => created,
                Err(err) => {
                    eprintln!("{err}");
                    return Exit::Failure;
                }
            }
        }
    };
    if let Some(bucket) = &object_store {
        let js = match connect_js(&config).await {
            Ok(js) => js,
            Err(exit) => return exit,
        };
        match crate::snapshot::upload(&js, bucket, &created.path).await {
            Ok(name) => created.object = Some(format!("{bucket}/{name}")),
            Err(err) => {
                eprintln!("{err}");
                return Exit::Failure;
            }
        }
    }
    print_created(&created);
    Exit::Ok
}

async fn connect_js(config: &Config) -> Result<async_nats::jetstream::Context, Exit> {
    match crate::consume::connect(&config.nats, config.nats_url()).await {
        Ok(client) => Ok(async_nats::jetstream::new(client)),
        Err(err) => {
            eprintln!("{err}");
            Err(Exit::Failure)
        }
    }
}

async fn snapshot_restore(
    arg: &ConfigArg,
    reducers: &Reducers,
    path: &Path,
    object_store: Option<String>,
) -> Exit {
    let (config, specs) = match load(arg, reducers) {
        Ok(loaded) => loaded,
        Err(exit) => return exit,
    };
    let js = match connect_js(&config).await {
        Ok(js) => js,
        Err(exit) => return exit,
    };
    let bytes = match &object_store {
        Some(bucket) => crate::snapshot::download(&js, bucket, &path.to_string_lossy()).await,
        None => std::fs::read(path).map_err(|e| format!("{}: {e}", path.display())),
    };
    let bytes = match bytes {
        Ok(bytes) => bytes,
        Err(err) => {
            eprintln!("{err}");
            return Exit::Failure;
        }
    };
    let snapshot = match crate::snapshot::decode(&bytes) {
        Ok(snapshot) => snapshot,
        Err(err) => {
            eprintln!("{}: {err}; nothing was restored", path.display());
            return Exit::FailClosed;
        }
    };
    let h = snapshot.header.clone();
    let Some(spec) = specs
        .iter()
        .find(|s| s.config.name == h.projection && s.config.version == h.version)
    else {
        eprintln!(
            "the snapshot is of projection {} v{}, which this configuration does not run",
            h.projection, h.version
        );
        return Exit::Usage;
    };
    let store = match access(&config) {
        Err(exit) => return exit,
        Ok(Access::Running(_)) => {
            eprintln!(
                "a running nats-projector holds the store: stop it, restore, then start it again"
            );
            return Exit::Failure;
        }
        Ok(Access::Direct(store)) => store,
        Ok(Access::Missing) => match runtime::open_store(&config) {
            Ok(store) => store,
            Err((exit, message)) => {
                eprintln!("{message}");
                return exit;
            }
        },
    };
    let mut stream = match crate::consume::stream_of(&js, &spec.config.stream).await {
        Ok(stream) => stream,
        Err(err) => {
            eprintln!("{err}; nothing was restored");
            return Exit::FailClosed;
        }
    };
    if let Err(err) = crate::restore::continues(&mut stream, &snapshot.contents.checkpoint).await {
        eprintln!(
            "refusing to restore: the stream no longer continues the snapshot at sequence {} ({err}); nothing was restored",
            h.seq
        );
        return Exit::FailClosed;
    }
    if let Err(err) = store.import(&spec.namespace, &snapshot.contents, true) {
        let (exit, message) = runtime::store_exit(&err);
        eprintln!("{message}");
        return exit;
    }
    if let Err(err) = crate::restore::reset_durable(&stream, spec, h.seq).await {
        eprintln!("the store was restored but the consumer could not be reset: {err}");
        return Exit::Failure;
    }
    println!(
        "restored {} v{}: {} records at stream sequence {}; the consumer {} resumes at {}",
        h.projection,
        h.version,
        h.records,
        h.seq,
        spec.durable,
        h.seq + 1
    );
    Exit::Ok
}

fn print_replay(report: &crate::replay::Report, done: bool) {
    if !done {
        println!(
            "{} events in stream sequences {}..={}{}",
            report.count,
            report.from_seq,
            report.to_seq,
            if report.dry_run {
                " (dry run: nothing written)"
            } else {
                "; replaying"
            }
        );
    } else if !report.dry_run {
        println!(
            "replayed: {} applied, {} already in the read model, {} stale epoch, {} not applicable (dead letters)",
            report.applied, report.duplicate, report.stale_epoch, report.poison
        );
    }
}

async fn replay(
    arg: &ConfigArg,
    reducers: &Reducers,
    projection: &str,
    range: crate::replay::Range,
    dry_run: bool,
) -> Exit {
    let (config, spec) = match load_projection(arg, reducers, projection) {
        Ok(loaded) => loaded,
        Err(exit) => return exit,
    };
    let store = match access(&config) {
        Err(exit) => return exit,
        Ok(Access::Running(addr)) => {
            // Ask the running process: a dry run first, so the count is out before any write.
            let query = |dry: bool| {
                let mut q = format!(
                    "/admin/replay?projection={}&version={}&dry_run={dry}",
                    admin::encode(projection),
                    spec.config.version
                );
                for (name, value) in [
                    ("from_seq", range.from_seq),
                    ("to_seq", range.to_seq),
                    ("from_ms", range.from_ms),
                    ("to_ms", range.to_ms),
                ] {
                    if let Some(v) = value {
                        q.push_str(&format!("&{name}={v}"));
                    }
                }
                q
            };
            for dry in [true, false] {
                if dry_run && !dry {
                    break;
                }
                match admin_json::<crate::replay::Report>(&addr, &query(dry)).await {
                    Ok(report) => print_replay(&report, !dry),
                    Err(exit) => return exit,
                }
            }
            return Exit::Ok;
        }
        Ok(Access::Direct(store)) => store,
        Ok(Access::Missing) => match runtime::open_store(&config) {
            Ok(store) => store,
            Err((exit, message)) => {
                eprintln!("{message}");
                return exit;
            }
        },
    };
    let js = match connect_js(&config).await {
        Ok(js) => js,
        Err(exit) => return exit,
    };
    match crate::replay::run(&js, &store, &spec, &range, dry_run, |r| {
        print_replay(r, false)
    })
    .await
    {
        Ok(report) => {
            print_replay(&report, true);
            Exit::Ok
        }
        Err(err) => {
            eprintln!("replay failed: {err}");
            Exit::Failure
        }
    }
}

async fn dlq(command: DlqCommand, reducers: &Reducers) -> Exit {
    let (arg, only, seq, json, replaying) = match &command {
        DlqCommand::List {
            config,
            projection,
            json,
        } => (config, projection.clone(), None, *json, false),
        DlqCommand::Replay {
            config,
            projection,
            seq,
        } => (config, projection.clone(), *seq, false, true),
    };
    let (config, specs) = match load(arg, reducers) {
        Ok(loaded) => loaded,
        Err(exit) => return exit,
    };
    if let Some(name) = &only {
        if let Err(exit) = spec_named(&specs, name) {
            return exit;
        }
    }
    let js = match connect_js(&config).await {
        Ok(js) => js,
        Err(exit) => return exit,
    };
    let mut streams: Vec<&str> = specs
        .iter()
        .filter(|s| only.as_deref().is_none_or(|p| p == s.name()))
        .map(|s| s.config.dlq_stream.as_str())
        .collect();
    streams.sort();
    streams.dedup();
    let mut letters = Vec::new();
    for stream in streams {
        match crate::dlq::list(&js, stream, only.as_deref()).await {
            Ok(found) => letters.extend(found.into_iter().map(|(l, m)| (stream.to_owned(), l, m))),
            Err(err) => {
                eprintln!("{stream}: {err}");
                return Exit::Failure;
            }
        }
    }
    letters.retain(|(_, l, _)| seq.is_none_or(|s| l.stream_seq == s));
    if replaying {
        if letters.is_empty() {
            eprintln!("no dead letter matches");
            return Exit::Failure;
        }
        for (stream, listed, message) in &letters {
            match crate::dlq::republish(&js, stream, listed, message).await {
                Ok(new_seq) => println!(
                    "republished {} (was {} seq {}, dead letter {}) as {} seq {new_seq}",
                    listed.subject, listed.stream, listed.stream_seq, listed.dlq_seq, listed.stream
                ),
                Err(err) => {
                    eprintln!("{err}");
                    return Exit::Failure;
                }
            }
        }
        return Exit::Ok;
    }
    if json {
        let listed: Vec<_> = letters.iter().map(|(_, l, _)| l).collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&listed).unwrap_or_default()
        );
    } else if letters.is_empty() {
        println!("no dead letters");
    } else {
        for (_, l, _) in &letters {
            println!(
                "{} seq {:>8}  {:<17} {}  ({}; dead letter {}, {} deliveries)",
                l.projection,
                l.stream_seq,
                l.error_code,
                l.subject,
                l.reason,
                l.dlq_seq,
                l.deliveries
            );
        }
    }
    Exit::Ok
}

async fn rebuild(
    arg: &ConfigArg,
    reducers: Reducers,
    projection: &str,
    from_snapshot: Option<std::path::PathBuf>,
    promote: bool,
) -> Exit {
    let (config, spec) = match load_projection(arg, &reducers, projection) {
        Ok(loaded) => loaded,
        Err(exit) => return exit,
    };
    let version = spec.config.version;
    let Some(logical) = spec.config.kv_bucket.clone() else {
        eprintln!(
            "{projection} has no kv_bucket: there are no readers to switch; run the new version with `run`"
        );
        return Exit::Usage;
    };
    let js = match connect_js(&config).await {
        Ok(js) => js,
        Err(exit) => return exit,
    };
    let live = match crate::alias::resolve(&js, &logical).await {
        Ok(alias) => alias.map_or(1, |a| a.version),
        Err(err) => {
            eprintln!("{err}");
            return Exit::Failure;
        }
    };
    if version <= live {
        eprintln!(
            "{projection} v{version} is not newer than the live v{live}: bump `version` in {} to rebuild into a new read model",
            arg.config.display()
        );
        return Exit::Usage;
    }
    let absolute = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_owned());
    match access(&config) {
        Err(exit) => exit,
        Ok(Access::Running(addr)) => {
            let mut path = format!(
                "/admin/rebuild?config={}&projection={}&promote={promote}",
                admin::encode(&absolute(&arg.config).to_string_lossy()),
                admin::encode(projection)
            );
            if let Some(snapshot) = &from_snapshot {
                path.push_str(&format!(
                    "&from_snapshot={}",
                    admin::encode(&absolute(snapshot).to_string_lossy())
                ));
            }
            match admin::get(&addr, &path).await {
                Ok(r) if r.status == 200 || r.status == 409 => {
                    if r.status == 409 {
                        println!("{}", String::from_utf8_lossy(&r.body).trim());
                    }
                }
                Ok(r) => return refused(&r),
                Err(err) => {
                    eprintln!("{err}");
                    return Exit::Failure;
                }
            }
            println!(
                "building {projection} v{version} beside the live v{live} in the running process"
            );
            watch_rebuild(&addr, projection, version, promote).await
        }
        Ok(access) => {
            // Nothing runs: build the new version in this process, then stop it.
            if let Some(snapshot) = &from_snapshot {
                let store = match access {
                    Access::Direct(store) => store,
                    _ => match runtime::open_store(&config) {
                        Ok(store) => store,
                        Err((exit, message)) => {
                            eprintln!("{message}");
                            return exit;
                        }
                    },
                };
                match crate::restore::seed_from_snapshot(&js, &store, &spec, snapshot).await {
                    Ok(seq) => println!(
                        "seeded {projection} v{version} from {} at sequence {seq}",
                        snapshot.display()
                    ),
                    Err(err) => {
                        eprintln!("{err}");
                        return Exit::FailClosed;
                    }
                }
            } else {
                drop(access);
            }
            let mut only = config.clone();
            only.projection.retain(|p| p.name == spec.config.name);
            only.http.listen = String::new();
            let shutdown = CancellationToken::new();
            let mut task = tokio::spawn(runtime::run(only, reducers, shutdown.clone()));
            println!(
                "building {projection} v{version} (nothing else runs: this process builds it)"
            );
            let caught_up = tokio::select! {
                caught_up = wait_caught_up(&js, &spec) => caught_up,
                // The build stopped by itself (a gap, a fatal error): report its exit code.
                exit = &mut task => return exit.unwrap_or(Exit::Failure),
            };
            let mut exit = Exit::Ok;
            if caught_up && promote {
                exit = promote_now(&js, &spec, &logical).await;
            }
            shutdown.cancel();
            match task.await {
                Ok(Exit::Ok) => exit,
                Ok(other) => other,
                Err(_) => Exit::Failure,
            }
        }
    }
}

async fn wait_caught_up(js: &async_nats::jetstream::Context, spec: &Spec) -> bool {
    let threshold = spec.config.batch as u64;
    loop {
        if let Ok(stream) = js.get_stream(&spec.config.stream).await {
            if let Ok(info) = stream.consumer_info(&spec.durable).await {
                if info.num_pending + info.num_ack_pending as u64 <= threshold
                    && info.num_ack_pending == 0
                {
                    println!(
                        "{} v{} caught up at stream sequence {}",
                        spec.name(),
                        spec.config.version,
                        info.ack_floor.stream_sequence
                    );
                    return true;
                }
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }
}

async fn promote_now(js: &async_nats::jetstream::Context, spec: &Spec, logical: &str) -> Exit {
    let alias = crate::alias::Alias {
        bucket: spec.kv_bucket().unwrap_or_default(),
        projection: spec.config.name.clone(),
        version: spec.config.version,
        promoted_unix_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
    };
    match crate::alias::promote(js, logical, &alias).await {
        Ok(()) => {
            println!(
                "promoted: alias {logical} -> {} (v{})",
                alias.bucket, alias.version
            );
            Exit::Ok
        }
        Err(err) => {
            eprintln!("{err}");
            Exit::Failure
        }
    }
}

/// Prints a running projector's refusal (its status and body) and fails.
fn refused(r: &admin::Response) -> Exit {
    eprintln!(
        "the running projector answered {}: {}",
        r.status,
        String::from_utf8_lossy(&r.body).trim()
    );
    Exit::Failure
}

/// GETs an admin route of the running projector and parses its JSON answer. A refusal, a
/// transport failure or an unexpected body is printed and becomes `Exit::Failure`.
async fn admin_json<T: serde::de::DeserializeOwned>(addr: &str, path: &str) -> Result<T, Exit> {
    match admin::get(addr, path).await {
        Ok(r) if r.status == 200 => serde_json::from_slice(&r.body).map_err(|err| {
            eprintln!("unexpected answer from the running projector: {err}");
            Exit::Failure
        }),
        Ok(r) => Err(refused(&r)),
        Err(err) => {
            eprintln!("{err}");
            Err(Exit::Failure)
        }
    }
}

async fn watch_rebuild(addr: &str, projection: &str, version: u32, promote: bool) -> Exit {
    let mut last_report = std::time::Instant::now();
    loop {
        let rows: Vec<serde_json::Value> = match admin::get(addr, "/admin/status").await {
            Ok(r) if r.status == 200 => serde_json::from_slice(&r.body).unwrap_or_default(),
            Ok(r) => {
                eprintln!("the running projector answered {}", r.status);
                return Exit::Failure;
            }
            Err(err) => {
                eprintln!("{err}");
                return Exit::Failure;
            }
        };
        let row = rows
            .iter()
            .find(|r| r["status"]["projection"] == projection && r["status"]["version"] == version);
        if let Some(row) = row {
            let s = &row["status"];
            if let Some(gap) = s["gap"].as_str() {
                eprintln!("{projection} v{version} failed closed: {gap}");
                return Exit::FailClosed;
            }
            let done = if promote {
                s["promoted"] == true
            } else {
                row["ready"] == true
            };
            if done {
                println!(
                    "{projection} v{version} {} at stream sequence {}",
                    if promote {
                        "caught up and promoted: readers follow it now"
                    } else {
                        "caught up (not promoted)"
                    },
                    s["last_applied_seq"]
                );
                return Exit::Ok;
            }
            if last_report.elapsed() > std::time::Duration::from_secs(5) {
                last_report = std::time::Instant::now();
                println!(
                    "  v{version}: applied up to {}, {} pending",
                    s["last_applied_seq"], s["pending"]
                );
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }
}
