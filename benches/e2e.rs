//! End-to-end benchmark against a local nats-server: the machine's ceilings and the projector
//! measured in the same run, printed as a table with ratios and written as JSON.
//!
//! ```sh
//! cargo bench --bench e2e                 # the whole table (medians of 3 runs)
//! cargo bench --bench e2e -- --quick      # one run, smaller backlogs (a smoke test)
//! cargo bench --bench e2e -- --steady-secs 600   # the 10-minute steady run
//! ```
//!
//! Needs nats-server (NATS_SERVER_BIN, PATH, or `.venv` from scripts/test). The projector runs
//! as its release binary in a child process, so its peak RSS is its own.

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::VecDeque;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::{self, consumer::pull, kv};
use common::{Child2, NatsServer, create_stream};
use futures::StreamExt;
use serde_json::{Value, json};

struct Options {
    runs: usize,
    events: usize,
    million: usize,
    steady_secs: u64,
    steady_rate: u64,
    out: String,
    /// Runs only the catch-ups whose label (`latest/10000`, `store-only`) contains this (ends
    /// with it, given a trailing `$`: `latest/100$`; is it, given `^` and `$`:
    /// `^store-only$`), and skips the ceilings and the steady run (for profiling one case).
    only: Option<String>,
    /// Measures the ceilings even with `--only` (for ratios).
    with_ceilings: bool,
}

fn options() -> Options {
    let args: Vec<String> = std::env::args().collect();
    let value = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse::<u64>().ok())
    };
    let quick = args.iter().any(|a| a == "--quick");
    Options {
        runs: value("--runs").map_or(if quick { 1 } else { 3 }, |v| v as usize),
        events: value("--events").map_or(if quick { 50_000 } else { 200_000 }, |v| v as usize),
        million: value("--million").map_or(if quick { 100_000 } else { 1_000_000 }, |v| v as usize),
        steady_secs: value("--steady-secs").unwrap_or(if quick { 5 } else { 20 }),
        steady_rate: value("--steady-rate").unwrap_or(5_000),
        out: args
            .iter()
            .position(|a| a == "--out")
            .and_then(|i| args.get(i + 1).cloned())
            .unwrap_or_else(|| "bench-results/e2e.json".into()),
        with_ceilings: args.iter().any(|a| a == "--with-ceilings"),
        only: args
            .iter()
            .position(|a| a == "--only")
            .and_then(|i| args.get(i + 1).cloned()),
    }
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// A ~256-byte CloudEvent for key `k`, with the id `e{n}`.
fn event(n: usize, k: usize) -> Vec<u8> {
    event_with_id(format!("e{n}"), n, k)
}

/// The id of event `n` in the UUIDv4 shape: random-looking, so consecutive events' dedupe
/// markers land far apart in the marker table (as real UUIDv4 ids do).
fn random_id(n: usize) -> String {
    use std::hash::BuildHasher;
    let hash = |seed| foldhash::quality::FixedState::with_seed(seed).hash_one(n);
    let (a, b) = (hash(1), hash(2));
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xfff,
        b >> 48,
        b & 0xffff_ffff_ffff
    )
}

fn event_with_id(id: String, n: usize, k: usize) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "specversion": "1.0", "id": id, "source": "bench", "type": "upd",
        "data": {"k": k, "n": n, "amount": n % 100, "ts": now_us(), "pad": "x".repeat(96)},
    }))
    .unwrap()
}

/// Publishes `events` events over `keys` keys, with `e{n}` ids or, `random_ids`, UUIDv4-shaped.
async fn publish(
    js: &jetstream::Context,
    subject: &str,
    events: usize,
    keys: usize,
    offset: usize,
    random_ids: bool,
) {
    let mut pending = VecDeque::new();
    for n in offset..offset + events {
        let payload = if random_ids {
            event_with_id(random_id(n), n, n % keys)
        } else {
            event(n, n % keys)
        };
        let ack = js
            .publish(subject.to_owned(), payload.into())
            .await
            .unwrap();
        pending.push_back(ack);
        if pending.len() >= 4096 {
            pending.pop_front().unwrap().await.unwrap();
        }
    }
    for ack in pending {
        ack.await.unwrap();
    }
}

/// A fresh durable over all of `stream` (explicit acks, 100,000 unacked at most), for a peer
/// measured beside the projector; returns the stream, the durable's name and the consumer.
async fn bench_durable(
    js: &jetstream::Context,
    stream: &str,
    prefix: &str,
) -> (
    jetstream::stream::Stream,
    String,
    jetstream::consumer::PullConsumer,
) {
    let stream = js.get_stream(stream).await.unwrap();
    let name = format!("{prefix}{}", now_us());
    let consumer = stream
        .create_consumer(pull::Config {
            durable_name: Some(name.clone()),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            max_ack_pending: 100_000,
            ..Default::default()
        })
        .await
        .unwrap();
    (stream, name, consumer)
}

/// Waits until `durable` has nothing pending and its ack floor is at `events` or beyond, as
/// nats-server reports it (polled every 10 ms): when a drain is complete, for the ceiling and
/// the projector alike.
async fn acked_through(stream: &jetstream::stream::Stream, durable: &str, events: usize) {
    loop {
        if let Ok(info) = stream.consumer_info(durable).await {
            if info.num_pending == 0
                && info.num_ack_pending == 0
                && info.ack_floor.stream_sequence as usize >= events
            {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// `o.runs` catch-ups of `latest` over `stream`, each with a KV bucket of its own: the rates,
/// and the projector's and nats-server's CPU per event.
async fn latest_catchups(
    server: &NatsServer,
    js: &jetstream::Context,
    stream: &str,
    ack_policy: &str,
    o: &Options,
) -> (Vec<f64>, Vec<(f64, f64)>) {
    let (mut rates, mut cpu) = (Vec::new(), Vec::new());
    for run in 0..o.runs {
        let bucket = format!("brandom{run}");
        let c = catchup(
            server,
            js,
            stream,
            "latest",
            Some(&bucket),
            o.events,
            ack_policy,
        )
        .await;
        rates.push(c.rate);
        cpu.push((c.projector_cpu_us, c.server_cpu_us));
    }
    (rates, cpu)
}

/// The medians of catch-up rates and CPU figures (zeros when there were none).
fn medians(rates: Vec<f64>, cpu: Vec<(f64, f64)>) -> (f64, f64, f64) {
    if rates.is_empty() {
        return (0.0, 0.0, 0.0);
    }
    (
        median(rates),
        median(cpu.iter().map(|c| c.0).collect()),
        median(cpu.iter().map(|c| c.1).collect()),
    )
}

/// Ceiling 1: a durable pull consumer draining and acking every message.
/// Returns messages/s, and the CPU per message of this process (the client) and nats-server.
async fn consume_ceiling(
    server: &NatsServer,
    js: &jetstream::Context,
    stream: &str,
    events: usize,
) -> (f64, f64, f64) {
    let (stream, name, consumer) = bench_durable(js, stream, "ceiling").await;
    let pids = (std::process::id(), server.pid().unwrap_or(0));
    let cpu_before = (cpu_us(pids.0), cpu_us(pids.1));
    let started = Instant::now();
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(10_000)
        .messages()
        .await
        .unwrap();
    let mut seen = 0;
    while seen < events {
        let m = messages.next().await.unwrap().unwrap();
        m.ack().await.unwrap();
        seen += 1;
    }
    // Done when nats-server has taken every ack, as for the projector (the same poll).
    acked_through(&stream, &name, events).await;
    let rate = seen as f64 / started.elapsed().as_secs_f64();
    let per_message = |before: u64, pid: u32| (cpu_us(pid) - before) as f64 / seen as f64;
    let cpu = (
        per_message(cpu_before.0, pids.0),
        per_message(cpu_before.1, pids.1),
    );
    drop(messages);
    let _ = stream.delete_consumer(&name).await;
    (rate, cpu.0, cpu.1)
}

/// Ceiling 2: compare-and-set KV writes of `keys` distinct keys, 256 in flight.
async fn kv_ceiling(js: &jetstream::Context, keys: usize) -> f64 {
    let bucket = format!("ceiling{}", now_us());
    let store = js
        .create_key_value(kv::Config {
            bucket: bucket.clone(),
            history: 1,
            ..Default::default()
        })
        .await
        .unwrap();
    let value: bytes::Bytes = vec![b'v'; 200].into();
    let started = Instant::now();
    let mut in_flight = futures::stream::FuturesUnordered::new();
    let mut next = 0;
    let mut done = 0;
    while done < keys {
        while in_flight.len() < 256 && next < keys {
            let (store, value) = (store.clone(), value.clone());
            in_flight.push(async move { create(&store, format!("k{next}"), value).await });
            next += 1;
        }
        in_flight.next().await;
        done += 1;
    }
    let rate = keys as f64 / started.elapsed().as_secs_f64();
    let _ = js.delete_key_value(&bucket).await;
    rate
}

/// Creates `key` with compare-and-set (revision 0), retrying a timed-out request: the machine
/// stalls now and then, and a full run must not die of it (a retry that finds the key there
/// means the timed-out write landed).
async fn create(store: &kv::Store, key: String, value: bytes::Bytes) {
    use async_nats::jetstream::kv::UpdateErrorKind;
    for attempt in 0..3 {
        match store.update(key.as_str(), value.clone(), 0).await {
            Ok(_) => return,
            Err(err) if err.kind() == UpdateErrorKind::TimedOut && attempt < 2 => {
                eprintln!("KV ceiling: a write timed out; retrying");
            }
            Err(err) if err.kind() == UpdateErrorKind::WrongLastRevision && attempt > 0 => return,
            Err(err) => panic!("KV ceiling write of {key}: {err}"),
        }
    }
}

/// The naive peer: fetch a batch of 1,000, write every event to redb in one durable
/// transaction, put every event to KV (the whole batch in flight, plain puts, no CAS, no
/// coalescing, no sequence guard), then ack every message.
async fn naive_loop(js: &jetstream::Context, stream: &str, events: usize) -> f64 {
    const RECORDS: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("records");
    let (stream, name, consumer) = bench_durable(js, stream, "naive").await;
    let kv = js
        .create_key_value(kv::Config {
            bucket: name.clone(),
            history: 1,
            ..Default::default()
        })
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let db = redb::Database::create(dir.path().join("naive.redb")).unwrap();
    let started = Instant::now();
    let mut seen = 0;
    while seen < events {
        let mut batch = Vec::new();
        let mut fetched = consumer
            .fetch()
            .max_messages(1000)
            .messages()
            .await
            .unwrap();
        while let Some(m) = fetched.next().await {
            let m = m.unwrap();
            let event: Value = serde_json::from_slice(&m.payload).unwrap();
            batch.push((format!("k{}", event["data"]["k"]), m));
        }
        let txn = db.begin_write().unwrap();
        {
            let mut table = txn.open_table(RECORDS).unwrap();
            for (key, m) in &batch {
                table.insert(key.as_str(), m.payload.as_ref()).unwrap();
            }
        }
        txn.commit().unwrap();
        let puts = batch
            .iter()
            .map(|(key, m)| kv.put(key.as_str(), m.payload.clone()));
        for put in futures::future::join_all(puts).await {
            put.unwrap();
        }
        for (_, m) in &batch {
            m.ack().await.unwrap();
        }
        seen += batch.len();
    }
    let rate = seen as f64 / started.elapsed().as_secs_f64();
    let _ = stream.delete_consumer(&name).await;
    let _ = js.delete_key_value(&name).await;
    rate
}

struct Catchup {
    rate: f64,
    rss_mib: f64,
    store_mib: f64,
    /// CPU time (user + system) per event of the projector and of nats-server, microseconds:
    /// what the two cores they share spend. It drifts with the host as the rates do (the same
    /// binary measured 10.6 and 15.0 us within an hour), so compare it within a run.
    projector_cpu_us: f64,
    server_cpu_us: f64,
}

/// CPU time (user + system) a process has used so far, microseconds.
/// Fields `from..from + n` of `/proc/<pid>/stat`, counted from the state (the 3rd field).
fn stat_fields(pid: u32, from: usize, n: usize) -> Vec<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces).
    let rest = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    rest.split_whitespace()
        .skip(from)
        .take(n)
        .filter_map(|f| f.parse().ok())
        .collect()
}

fn cpu_us(pid: u32) -> u64 {
    // utime and stime: the 14th and 15th fields.
    let fields = stat_fields(pid, 11, 2);
    // SAFETY: sysconf only reads a configuration value.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    fields.iter().sum::<u64>() * 1_000_000 / ticks
}

/// Minor page faults so far (the 10th field): each is a fresh page zeroed, several
/// microseconds on a virtual machine.
fn minor_faults(pid: u32) -> u64 {
    stat_fields(pid, 7, 1).first().copied().unwrap_or(0)
}

fn rss_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Starts the projector binary. BENCH_LOG=path keeps its log (returned: where to copy it),
/// with the sink's per-group debug lines (group sizes, KV writes, timings).
fn spawn_projector(config: &std::path::Path, log: &std::path::Path) -> (Child2, Option<String>) {
    let keep_log = std::env::var("BENCH_LOG").ok();
    let level = match (&keep_log, std::env::var("BENCH_LOG_LEVEL")) {
        (Some(_), Ok(level)) => level,
        (Some(_), Err(_)) => "warn,nats_projector::pipeline::effects=debug".into(),
        (None, _) => "warn".into(),
    };
    (Child2::run(config, &[("RUST_LOG", &level)], log), keep_log)
}

/// Runs the projector binary on the backlog of `stream` until drained.
async fn catchup(
    server: &NatsServer,
    js: &jetstream::Context,
    stream: &str,
    reducer: &str,
    kv_bucket: Option<&str>,
    events: usize,
    ack_policy: &str,
) -> Catchup {
    let dir = tempfile::tempdir().unwrap();
    let sum = if reducer == "counter" {
        "sum = \"{data.amount}\"\n"
    } else {
        ""
    };
    let bucket = kv_bucket
        .map(|b| format!("kv_bucket = \"{b}\"\n"))
        .unwrap_or_default();
    let name = format!("p{}", now_us());
    // The catch-up tuning the README recommends (BENCH_BATCH / BENCH_MAX_ACK_PENDING override).
    let tuning = |var: &str, default: usize| {
        std::env::var(var)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let (batch, max_ack_pending) = (
        tuning("BENCH_BATCH", 2048),
        tuning("BENCH_MAX_ACK_PENDING", 65_536),
    );
    let projection = format!(
        "[[projection]]\nname = \"{name}\"\nstream = \"{stream}\"\nkey = \"{{data.k}}\"\nreducer = \"{reducer}\"\n\
         {sum}{bucket}batch = {batch}\nmax_ack_pending = {max_ack_pending}\ndedupe_window = \"10m\"\n\
         ack_policy = \"{ack_policy}\"\n"
    );
    let port = common::free_port();
    let config = common::write_config(server, dir.path(), port, &projection);
    {
        let mib = tuning("BENCH_CACHE_MIB", 32);
        let text = std::fs::read_to_string(&config).unwrap();
        let text = text.replace("[store]\n", &format!("[store]\ncache_mib = {mib}\n"));
        std::fs::write(&config, text).unwrap();
    }
    let log = dir.path().join("log");
    let (child, keep_log) = spawn_projector(&config, &log);
    let pid = child.child.id();
    let perf = std::env::var("BENCH_PERF").ok().map(|out| {
        // BENCH_PERF_GRAPH=dwarf for call graphs through code built without frame pointers
        // (larger files); BENCH_PERF_ALL=1 samples every process and thread (nats-server too,
        // and the threads the projector starts later, such as its blocking pool's).
        let graph = std::env::var("BENCH_PERF_GRAPH").unwrap_or_else(|_| "fp".into());
        // BENCH_PERF_FREQ: samples per second (499 by default).
        let freq = std::env::var("BENCH_PERF_FREQ").unwrap_or_else(|_| "499".into());
        // BENCH_PERF_PERIOD: one sample every that many events instead (`1` with
        // `BENCH_PERF_EVENT=page-faults`: every fault).
        let (rate, every) = match std::env::var("BENCH_PERF_PERIOD") {
            Ok(period) => ("-c", period),
            Err(_) => ("-F", freq),
        };
        let mut args: Vec<String> = ["record", rate, &every, "--call-graph", &graph, "-o", &out]
            .map(String::from)
            .to_vec();
        // BENCH_PERF_EVENT: another event to sample (`page-faults` finds what touches fresh
        // memory).
        if let Ok(event) = std::env::var("BENCH_PERF_EVENT") {
            args.extend(["-e".to_string(), event]);
        }
        if std::env::var_os("BENCH_PERF_ALL").is_some() {
            args.extend(["-a", "--", "sleep", "3600"].map(String::from));
        } else {
            args.extend(["-p".to_string(), pid.to_string()]);
        }
        std::process::Command::new("perf")
            .args(args)
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    });
    let durable = format!("projector__{name}_v1");
    let stream_handle = js.get_stream(stream).await.unwrap();
    // The clock starts when the projector has bound its durable (process start-up excluded,
    // as consumer creation is for the ceiling).
    while stream_handle.consumer_info(&durable).await.is_err() {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let started = Instant::now();
    let server_pid = server.pid().unwrap_or(0);
    let cpu_before = (cpu_us(pid), cpu_us(server_pid));
    let faults_before = minor_faults(pid);
    acked_through(&stream_handle, &durable, events).await;
    let elapsed = started.elapsed().as_secs_f64();
    let per_event = |before: u64, after: u64| after.saturating_sub(before) as f64 / events as f64;
    let projector_cpu_us = per_event(cpu_before.0, cpu_us(pid));
    let server_cpu_us = per_event(cpu_before.1, cpu_us(server_pid));
    let faults = per_event(faults_before, minor_faults(pid));
    let rss = rss_kib(pid, "VmHWM:") as f64 / 1024.0;
    if let Some(mut perf) = perf {
        let _ = std::process::Command::new("kill")
            .args(["-INT", &perf.id().to_string()])
            .status();
        let _ = perf.wait();
    }
    let labels = [("projection", name.as_str())];
    let batches = common::metric(port, "projector_batch_size_count", &labels)
        .await
        .unwrap_or(0.0);
    let batched = common::metric(port, "projector_batch_size_sum", &labels)
        .await
        .unwrap_or(0.0);
    let busy = common::metric(port, "projector_batch_duration_seconds_sum", &labels)
        .await
        .unwrap_or(0.0);
    let committing = common::metric(port, "projector_store_commit_seconds_sum", &labels)
        .await
        .unwrap_or(0.0);
    eprintln!(
        "  {stream} {reducer} kv={}: {:.0} ev/s, {batches:.0} batches, mean {:.0} messages, \
         mean {:.2} ms fetch-to-ack, commits {:.0}% of the time, CPU per event \
         {projector_cpu_us:.1} us projector + {server_cpu_us:.1} us nats-server, \
         {faults:.3} page faults",
        kv_bucket.is_some(),
        events as f64 / elapsed,
        batched / batches.max(1.0),
        busy * 1000.0 / batches.max(1.0),
        100.0 * committing / elapsed
    );
    if let Some(keep) = keep_log {
        let _ = std::fs::copy(&log, format!("{keep}.{stream}.{reducer}.{}", now_us()));
    }
    assert_eq!(
        child.terminate(),
        Some(0),
        "{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let store = std::fs::metadata(dir.path().join("store.redb"))
        .map(|m| m.len())
        .unwrap_or(0) as f64
        / 1048576.0;
    if let Some(b) = kv_bucket {
        let _ = js.delete_key_value(b).await;
    }
    let _ = js
        .get_stream(stream)
        .await
        .unwrap()
        .delete_consumer(&durable)
        .await;
    Catchup {
        rate: events as f64 / elapsed,
        rss_mib: rss,
        store_mib: store,
        projector_cpu_us,
        server_cpu_us,
    }
}

struct Steady {
    p50_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    max_lag: u64,
    rss_first_mib: f64,
    rss_last_mib: f64,
    rss_max_mib: f64,
    seen: usize,
    rss_per_minute: Vec<f64>,
}

/// Publishes at a fixed rate; a KV watcher measures publish → KV-visible latency.
async fn steady(server: &NatsServer, js: &jetstream::Context, secs: u64, rate: u64) -> Steady {
    // A fresh stream, bucket and projection per run.
    let run = now_us();
    let (stream, subject, bucket) = (
        format!("STEADY{run}"),
        format!("steady{run}.x"),
        format!("steady{run}"),
    );
    create_stream(js, &stream, &[&format!("steady{run}.>")]).await;
    let dir = tempfile::tempdir().unwrap();
    let projection = format!(
        "[[projection]]\nname = \"steady\"\nstream = \"{stream}\"\nkey = \"{{data.k}}\"\nreducer = \"latest\"\n\
         kv_bucket = \"{bucket}\"\nlag_sample_interval = \"1s\"\n"
    );
    let projection = projection.as_str();
    let config = common::write_config(server, dir.path(), 0, projection);
    let log = dir.path().join("log");
    let (child, keep_log) = spawn_projector(&config, &log);
    let pid = child.child.id();
    common::eventually(Duration::from_secs(20), "the steady bucket", || async {
        js.get_key_value(&bucket).await.is_ok()
    })
    .await;
    let kv = js.get_key_value(&bucket).await.unwrap();
    let mut watch = kv.watch_all().await.unwrap();
    let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
    let watcher = tokio::spawn(async move {
        let mut latencies = Vec::new();
        loop {
            let entry = tokio::select! {
                _ = &mut stopped => break,
                entry = watch.next() => entry,
            };
            let Some(Ok(entry)) = entry else { break };
            let seen = now_us();
            if let Ok(v) = serde_json::from_slice::<Value>(&entry.value) {
                if let Some(ts) = v["state"]["ts"].as_u64() {
                    latencies.push(seen.saturating_sub(ts));
                }
            }
        }
        latencies
    });
    let total = (secs * rate) as usize;
    let started = Instant::now();
    let mut max_lag = 0;
    let mut rss = Vec::new();
    let mut acks = VecDeque::new();
    for n in 0..total {
        // Paced: event n goes out at n / rate seconds.
        let due = Duration::from_secs_f64(n as f64 / rate as f64);
        if let Some(wait) = due.checked_sub(started.elapsed()) {
            tokio::time::sleep(wait).await;
        }
        acks.push_back(
            js.publish(subject.clone(), event(n, n % 1000).into())
                .await
                .unwrap(),
        );
        if acks.len() > 1000 {
            acks.pop_front().unwrap().await.unwrap();
        }
        if n % rate as usize == 0 {
            rss.push(rss_kib(pid, "VmRSS:") as f64 / 1024.0);
            if let Ok(info) = js
                .get_stream(&stream)
                .await
                .unwrap()
                .consumer_info("projector__steady_v1")
                .await
            {
                max_lag = max_lag.max(info.num_pending + info.num_ack_pending as u64);
            }
        }
    }
    for ack in acks {
        ack.await.unwrap();
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let _ = stop.send(());
    let mut latencies = watcher.await.unwrap_or_default();
    if let Some(keep) = keep_log {
        let _ = std::fs::copy(&log, format!("{keep}.steady.{}", now_us()));
    }
    assert_eq!(child.terminate(), Some(0));
    latencies.sort_unstable();
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0) as f64
            / 1000.0
    };
    Steady {
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
        p999_ms: pct(0.999),
        max_lag,
        rss_first_mib: rss.first().copied().unwrap_or(0.0),
        rss_last_mib: rss.last().copied().unwrap_or(0.0),
        rss_max_mib: rss.iter().copied().fold(0.0, f64::max),
        seen: latencies.len(),
        // One RSS reading per minute (the first one at start): flat once the caches are full.
        rss_per_minute: rss.iter().step_by(60).copied().collect(),
    }
}

/// Latencies of `fsync` after a 16 KiB write, in a temporary file beside the projector's store:
/// a full `fsync`, so that each one commits the file system's journal (the write changed the
/// file's times). It characterizes the disk while it is otherwise idle; the projector's commits
/// during the steady runs, with nats-server writing beside them, stall more often (README).
struct Fsyncs {
    p50_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    max_ms: f64,
    /// Those over 50 ms.
    stalls: usize,
    count: usize,
}

fn fsync_profile(length: Duration) -> Fsyncs {
    use std::io::{Seek, Write};
    let mut file = tempfile::tempfile().unwrap();
    let block = vec![7u8; 16 * 1024];
    let mut ms = Vec::new();
    let end = Instant::now() + length;
    while Instant::now() < end {
        file.seek(std::io::SeekFrom::Start(
            (ms.len() % 64 * block.len()) as u64,
        ))
        .unwrap();
        file.write_all(&block).unwrap();
        let started = Instant::now();
        file.sync_all().unwrap();
        ms.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    ms.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| ms[((ms.len() as f64 * q) as usize).min(ms.len() - 1)];
    Fsyncs {
        p50_ms: at(0.5),
        p99_ms: at(0.99),
        p999_ms: at(0.999),
        max_ms: ms[ms.len() - 1],
        stalls: ms.iter().filter(|&&m| m > 50.0).count(),
        count: ms.len(),
    }
}

fn print_rows(rows: &[(String, f64, String, Option<f64>)]) {
    println!(
        "\n{:<100} {:>12}  {:<28} ratio",
        "measurement", "value", "unit"
    );
    for (name, value, unit, ratio) in rows {
        let ratio = ratio.map(|r| format!("{r:.2}")).unwrap_or_default();
        println!("{name:<100} {value:>12.1}  {unit:<28} {ratio}");
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values[values.len() / 2]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let o = options();
    let server = NatsServer::start();
    let (_client, js) = server.jetstream().await;
    let mut rows: Vec<(String, f64, String, Option<f64>)> = Vec::new();
    let mut report = serde_json::Map::new();

    // The 10,000-key and 100-key backlogs share one stream each; the million-key one too.
    // K10KR is K10K with UUIDv4-shaped ids.
    for (stream, keys, events, random_ids) in [
        ("K100", 100, o.events, false),
        ("K10K", 10_000, o.events, false),
        ("K10KR", 10_000, o.events, true),
        ("K1M", o.million, o.million, false),
    ] {
        create_stream(&js, stream, &[&format!("{}.>", stream.to_lowercase())]).await;
        publish(
            &js,
            &format!("{}.x", stream.to_lowercase()),
            events,
            keys,
            0,
            random_ids,
        )
        .await;
    }
    eprintln!("backlogs published");

    let wanted = |label: &str| {
        o.only.as_ref().is_none_or(
            |only| match (only.strip_prefix('^'), only.strip_suffix('$')) {
                (Some(exact), _) => exact.strip_suffix('$') == Some(label),
                (None, Some(end)) => label.ends_with(end),
                (None, None) => label.contains(only.as_str()),
            },
        )
    };
    let ceilings = if o.only.is_some() && !o.with_ceilings {
        0
    } else {
        o.runs
    };
    // The consume + ack ceiling and the redb-only catch-ups compared with it, interleaved: each
    // run measures the ceiling, then each redb-only catch-up, whose ratio is to the ceiling of
    // its own run (the host's speed drifts by tens of percent within minutes; neighbours see
    // the same host), and the table gives the medians over the runs. They come before anything
    // with KV (nats-server in the same state); their rows are printed after the KV catch-ups.
    let store_only: Vec<_> = [
        ("store-only", "K10K", "explicit"),
        ("store-only-ack-all", "K10K", "all"),
        ("random-ids-store-only", "K10KR", "all"),
    ]
    .into_iter()
    .filter(|(label, ..)| wanted(label))
    .collect();
    // Per catch-up: rates, (projector, nats-server) CPU per event, ratios to their run's ceiling.
    let mut measured = vec![(Vec::new(), Vec::new(), Vec::new()); store_only.len()];
    let (mut consume_runs, mut client_cpu, mut server_cpu) = (vec![1.0], vec![], vec![]);
    let runs = if store_only.is_empty() {
        ceilings
    } else {
        o.runs
    };
    for _ in 0..runs {
        let mut ceiling = 1.0;
        if ceilings > 0 {
            let (rate, client, server) = consume_ceiling(&server, &js, "K10K", o.events).await;
            ceiling = rate;
            consume_runs.push(rate);
            client_cpu.push(client);
            server_cpu.push(server);
        }
        for ((_, stream, ack_policy), (rates, cpu, ratios)) in store_only.iter().zip(&mut measured)
        {
            let c = catchup(&server, &js, stream, "latest", None, o.events, ack_policy).await;
            rates.push(c.rate);
            cpu.push((c.projector_cpu_us, c.server_cpu_us));
            ratios.push(c.rate / ceiling);
        }
    }
    let consume = median(consume_runs);
    let (client_cpu, server_cpu) = if ceilings > 0 {
        (median(client_cpu), median(server_cpu))
    } else {
        (0.0, 0.0)
    };
    rows.push((
        format!(
            "ceiling: pull consume + ack every message (CPU/msg {client_cpu:.1} client + \
             {server_cpu:.1} us nats-server)"
        ),
        consume,
        "msg/s".into(),
        None,
    ));
    let mut catchups = serde_json::Map::new();
    let mut store_rows = Vec::new();
    for ((label, stream, ack_policy), (rates, cpu, ratios)) in store_only.into_iter().zip(measured)
    {
        let (rate, cpu, server_cpu) = medians(rates, cpu);
        let ratio = median(ratios.clone());
        let ids = if stream == "K10KR" {
            "UUIDv4 ids"
        } else {
            "e{n} ids"
        };
        store_rows.push((
            format!(
                "catch-up latest, 10000 keys, {ids}, redb only (no KV), ack_policy = {ack_policy} \
                 (CPU/event {cpu:.1} + {server_cpu:.1} us; ratio: median of each run's)"
            ),
            rate,
            "events/s vs consume+ack".into(),
            Some(ratio),
        ));
        catchups.insert(
            format!("latest/10000/{label}"),
            json!({"events_per_s": rate, "ratio": ratio, "ratio_to": "consume+ack",
                "ratios_by_run": ratios,
                "projector_cpu_us_per_event": cpu, "server_cpu_us_per_event": server_cpu}),
        );
    }
    eprintln!("redb-only catch-ups measured");
    let mut kv_ceilings = std::collections::BTreeMap::new();
    for keys in [100usize, 10_000, o.million] {
        let mut runs = vec![1.0];
        for _ in 0..ceilings {
            runs.push(kv_ceiling(&js, keys).await);
        }
        let rate = median(runs);
        kv_ceilings.insert(keys, rate);
        rows.push((
            format!("ceiling: KV CAS writes, {keys} distinct keys, 256 in flight"),
            rate,
            "writes/s".into(),
            None,
        ));
    }
    let mut naive_runs = vec![1.0];
    for _ in 0..ceilings {
        naive_runs.push(naive_loop(&js, "K10K", o.events).await);
    }
    let naive = median(naive_runs);
    rows.push((
        "naive peer: fetch 1000 → redb txn → KV put each (all in flight) → ack each, 10000 keys"
            .into(),
        naive,
        "events/s".into(),
        None,
    ));
    report.insert("naive_loop".into(), json!(naive));
    report.insert("consume_ack_ceiling".into(), json!(consume));
    report.insert(
        "consume_ack_ceiling_cpu_us_per_msg".into(),
        json!({"client": client_cpu, "server": server_cpu}),
    );
    report.insert("kv_cas_ceiling".into(), json!(kv_ceilings));
    eprintln!("ceilings measured");

    // The projector's default (`auto`: bulk acks on the durables it creates) unless
    // BENCH_ACK_POLICY says otherwise (`explicit`: an ack per message).
    let kv_acks = std::env::var("BENCH_ACK_POLICY").unwrap_or_else(|_| "auto".into());
    for (stream, keys, events) in [
        ("K100", 100usize, o.events),
        ("K10K", 10_000, o.events),
        ("K1M", o.million, o.million),
    ] {
        for reducer in ["latest", "merge", "counter"] {
            if !wanted(&format!("{reducer}/{keys}")) {
                continue;
            }
            let mut rates = Vec::new();
            let mut rss = Vec::new();
            let mut cpu = (Vec::new(), Vec::new());
            let mut store = 0.0;
            for run in 0..o.runs {
                let bucket = format!("b{keys}{reducer}{run}");
                let c = catchup(
                    &server,
                    &js,
                    stream,
                    reducer,
                    Some(&bucket),
                    events,
                    &kv_acks,
                )
                .await;
                rates.push(c.rate);
                rss.push(c.rss_mib);
                cpu.0.push(c.projector_cpu_us);
                cpu.1.push(c.server_cpu_us);
                store = c.store_mib;
            }
            let rate = median(rates);
            let rss = rss.iter().copied().fold(0.0, f64::max);
            let (cpu, server_cpu) = (median(cpu.0), median(cpu.1));
            let (ceiling, against) = if keys <= 100 {
                (consume, "consume+ack")
            } else {
                (kv_ceilings[&keys], "KV CAS")
            };
            rows.push((
                format!(
                    "catch-up {reducer}, {keys} keys, {events} events, redb + KV (peak RSS \
                     {rss:.0} MiB, store {store:.0} MiB, CPU/event {cpu:.1} + {server_cpu:.1} us)"
                ),
                rate,
                format!("events/s vs {against}"),
                Some(rate / ceiling),
            ));
            let mut entry = json!({"events_per_s": rate, "ratio": rate / ceiling,
                "ratio_to": against, "peak_rss_mib": rss, "store_mib": store, "events": events,
                "projector_cpu_us_per_event": cpu, "server_cpu_us_per_event": server_cpu});
            if keys == 10_000 {
                entry["ratio_to_naive"] = json!(rate / naive);
                rows.push((
                    format!("  the same against the naive peer ({naive:.0} events/s)"),
                    rate,
                    "events/s vs naive".into(),
                    Some(rate / naive),
                ));
            }
            catchups.insert(format!("{reducer}/{keys}"), entry);
        }
    }
    // The consume + ack ceiling once more, after the KV catch-ups: by then nats-server has
    // written and deleted millions of KV entries, and spends more CPU per message (20-30% in
    // some runs) than at the start. The redb-only catch-ups ran right after the first ceiling,
    // in the state it was measured in; this one only shows the drift.
    let late_ceilings = if store_rows.is_empty() { 0 } else { ceilings };
    let (mut late_runs, mut late_cpu) = (vec![1.0], (vec![], vec![]));
    for _ in 0..late_ceilings {
        let (rate, client, server) = consume_ceiling(&server, &js, "K10K", o.events).await;
        late_runs.push(rate);
        late_cpu.0.push(client);
        late_cpu.1.push(server);
    }
    let consume_late = median(late_runs);
    if late_cpu.0.is_empty() {
        late_cpu = (vec![0.0], vec![0.0]);
    }
    let (late_client, late_server) = (median(late_cpu.0), median(late_cpu.1));
    rows.push((
        format!(
            "ceiling again, after the KV catch-ups (CPU/msg {late_client:.1} client + \
             {late_server:.1} us nats-server)"
        ),
        consume_late,
        "msg/s".into(),
        None,
    ));
    report.insert("consume_ack_ceiling_after_kv".into(), json!(consume_late));
    report.insert(
        "consume_ack_ceiling_after_kv_cpu_us_per_msg".into(),
        json!({"client": late_client, "server": late_server}),
    );
    // UUIDv4-shaped ids with KV (their dedupe markers scatter over the marker table).
    if wanted("random-ids") {
        let (label, stream) = ("random-ids", "K10KR");
        let (rates, cpu) = latest_catchups(&server, &js, stream, &kv_acks, &o).await;
        let (rate, cpu, server_cpu) = medians(rates, cpu);
        rows.push((
            format!(
                "catch-up latest, 10000 keys, UUIDv4 ids, redb + KV, ack_policy = {kv_acks} \
                 (CPU/event {cpu:.1} + {server_cpu:.1} us)"
            ),
            rate,
            "events/s vs KV CAS".into(),
            Some(rate / kv_ceilings[&10_000]),
        ));
        catchups.insert(
            format!("latest/10000/{label}"),
            json!({"events_per_s": rate, "ratio": rate / kv_ceilings[&10_000],
                "ratio_to": "KV CAS", "projector_cpu_us_per_event": cpu,
                "server_cpu_us_per_event": server_cpu}),
        );
    }
    rows.extend(store_rows);
    report.insert("catch_up".into(), Value::Object(catchups));
    eprintln!("catch-ups measured");

    if o.only
        .as_ref()
        .is_some_and(|only| !"steady".contains(only.as_str()))
    {
        print_rows(&rows);
        return;
    }
    // Every batch's commit waits for an fsync, so the disk's stalls bound steady latency.
    let disk = tokio::task::spawn_blocking(|| fsync_profile(Duration::from_secs(5)))
        .await
        .unwrap();
    rows.push((
        format!(
            "disk: fsync after a 16 KiB write, 5 s: p99 (p50 {:.2}, p99.9 {:.2}, max {:.0}; \
             {} of {} over 50 ms)",
            disk.p50_ms, disk.p999_ms, disk.max_ms, disk.stalls, disk.count
        ),
        disk.p99_ms,
        "ms".into(),
        None,
    ));
    report.insert(
        "disk_fsync".into(),
        json!({"p50_ms": disk.p50_ms, "p99_ms": disk.p99_ms,
        "p999_ms": disk.p999_ms, "max_ms": disk.max_ms, "over_50ms": disk.stalls,
        "count": disk.count}),
    );
    let mut runs = Vec::new();
    for _ in 0..o.runs {
        runs.push(steady(&server, &js, o.steady_secs, o.steady_rate).await);
    }
    let pick = |f: fn(&Steady) -> f64| median(runs.iter().map(f).collect());
    let s = Steady {
        p50_ms: pick(|s| s.p50_ms),
        p99_ms: pick(|s| s.p99_ms),
        p999_ms: pick(|s| s.p999_ms),
        max_lag: runs.iter().map(|s| s.max_lag).max().unwrap_or(0),
        rss_first_mib: runs[0].rss_first_mib,
        rss_last_mib: runs[0].rss_last_mib,
        rss_max_mib: runs.iter().map(|s| s.rss_max_mib).fold(0.0, f64::max),
        seen: runs.iter().map(|s| s.seen).sum(),
        rss_per_minute: runs[0].rss_per_minute.clone(),
    };
    eprintln!("steady RSS per minute (MiB): {:.0?}", s.rss_per_minute);
    eprintln!(
        "steady runs (p50, p99, p99.9 ms): {:?}",
        runs.iter()
            .map(|s| (s.p50_ms, s.p99_ms, s.p999_ms))
            .collect::<Vec<_>>()
    );
    rows.push((
        format!(
            "steady {} events/s, {} s: publish → KV visible p50",
            o.steady_rate, o.steady_secs
        ),
        s.p50_ms,
        "ms".into(),
        None,
    ));
    rows.push(("steady: p99".into(), s.p99_ms, "ms".into(), None));
    rows.push(("steady: p99.9".into(), s.p999_ms, "ms".into(), None));
    rows.push((
        "steady: max lag (sampled each second)".into(),
        s.max_lag as f64,
        "messages".into(),
        None,
    ));
    rows.push((
        format!(
            "steady: RSS first / last / max = {:.0} / {:.0} / {:.0}",
            s.rss_first_mib, s.rss_last_mib, s.rss_max_mib
        ),
        s.rss_max_mib,
        "MiB".into(),
        None,
    ));
    report.insert("steady".into(), json!({"rate": o.steady_rate, "secs": o.steady_secs, "p50_ms": s.p50_ms,
        "p99_ms": s.p99_ms, "p999_ms": s.p999_ms, "max_lag": s.max_lag, "latencies": s.seen,
        "rss_first_mib": s.rss_first_mib, "rss_last_mib": s.rss_last_mib, "rss_max_mib": s.rss_max_mib,
        "rss_per_minute_mib": s.rss_per_minute}));

    print_rows(&rows);
    report.insert("runs".into(), json!(o.runs));
    report.insert(
        "kv_ack_policy".into(),
        json!(std::env::var("BENCH_ACK_POLICY").unwrap_or_else(|_| "auto".into())),
    );
    report.insert("events".into(), json!(o.events));
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(&o.out);
    if let Some(parent) = path.parent() {
        let _ = std::fs::create_dir_all(parent);
    }
    std::fs::write(
        &path,
        serde_json::to_string_pretty(&Value::Object(report)).unwrap(),
    )
    .unwrap();
    println!("\nwritten to {}", path.display());
}
