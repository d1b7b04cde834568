//! Test support: a real nats-server per test, and helpers to publish events and read KV.
//!
//! The server binary comes from `NATS_SERVER_BIN`, then `PATH`, then the project's `.venv`
//! (what `scripts/test` installs). Each server listens on a dynamic loopback port with its own
//! temporary store, is killed on drop, and prints its log tail when the test panicked.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, stream};

/// A running nats-server.
pub struct NatsServer {
    child: Option<Child>,
    /// `nats://127.0.0.1:PORT`.
    pub url: String,
    /// The port (kept across restarts).
    pub port: u16,
    dir: tempfile::TempDir,
}

/// The nats-server binary to run.
pub fn nats_server_bin() -> PathBuf {
    if let Ok(bin) = std::env::var("NATS_SERVER_BIN") {
        return PathBuf::from(bin);
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join("nats-server");
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/nats-server");
    if venv.is_file() {
        return venv;
    }
    panic!("nats-server not found: set NATS_SERVER_BIN or run scripts/test (it installs one)");
}

impl NatsServer {
    /// The server's process id while it runs.
    #[allow(dead_code)]
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Starts a JetStream-enabled server on a dynamic loopback port.
    pub fn start() -> NatsServer {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut server = NatsServer {
            child: None,
            url: String::new(),
            port: 0,
            dir,
        };
        server.spawn("-1");
        server
    }

    fn spawn(&mut self, port: &str) {
        let ports_dir = self.dir.path().join("ports");
        let _ = std::fs::remove_dir_all(&ports_dir);
        std::fs::create_dir_all(&ports_dir).expect("ports dir");
        let child = Command::new(nats_server_bin())
            .args(["-a", "127.0.0.1", "-p", port, "-js", "-sd"])
            .arg(self.dir.path().join("js"))
            .arg("--ports_file_dir")
            .arg(&ports_dir)
            .arg("-l")
            .arg(self.log_path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn nats-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(url) = read_ports(&ports_dir) {
                self.port = url
                    .rsplit(':')
                    .next()
                    .and_then(|p| p.parse().ok())
                    .expect("port in the ports file");
                self.url = url;
                break;
            }
            assert!(
                Instant::now() < deadline,
                "nats-server did not start; log:\n{}",
                self.log_tail(40)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The server's log file.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("nats.log")
    }

    /// The last `lines` lines of the server log.
    pub fn log_tail(&self, lines: usize) -> String {
        file_tail(&self.log_path(), lines)
    }

    /// Kills the server (SIGKILL), keeping its store.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Restarts a killed server on the same port with the same store.
    pub fn restart(&mut self) {
        self.kill();
        let port = self.port.to_string();
        self.spawn(&port);
    }

    /// A temp directory that lives as long as the server.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Connects a client with JetStream.
    pub async fn jetstream(&self) -> (async_nats::Client, jetstream::Context) {
        let client = async_nats::connect(&self.url).await.expect("connect");
        let js = jetstream::new(client.clone());
        (client, js)
    }
}

fn read_ports(dir: &Path) -> Option<String> {
    for entry in std::fs::read_dir(dir).ok()? {
        let text = std::fs::read_to_string(entry.ok()?.path()).ok()?;
        let value: serde_json::Value = serde_json::from_str(&text).ok()?;
        if let Some(url) = value["nats"][0].as_str() {
            return Some(url.to_owned());
        }
    }
    None
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- nats-server log tail ----\n{}\n------------------------------",
                self.log_tail(40)
            );
        }
        self.kill();
    }
}

/// Creates a file-backed stream capturing `subjects`.
pub async fn create_stream(
    js: &jetstream::Context,
    name: &str,
    subjects: &[&str],
) -> stream::Stream {
    js.create_stream(stream::Config {
        name: name.into(),
        subjects: subjects.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    })
    .await
    .expect("create stream")
}

/// A CloudEvents 1.0 envelope.
pub fn cloudevent(id: &str, event_type: &str, data: serde_json::Value) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "specversion": "1.0", "id": id, "source": "tests", "type": event_type, "data": data,
    }))
    .expect("json")
}

/// Publishes and awaits the stream acks of many messages (a bounded window in flight).
pub async fn publish_all(js: &jetstream::Context, messages: Vec<(String, Vec<u8>)>) {
    let mut pending = std::collections::VecDeque::new();
    for (subject, payload) in messages {
        let ack = js.publish(subject, payload.into()).await.expect("publish");
        pending.push_back(ack);
        if pending.len() >= 256 {
            pending.pop_front().unwrap().await.expect("publish ack");
        }
    }
    for ack in pending {
        ack.await.expect("publish ack");
    }
}

/// Every live KV entry of a bucket as (key, JSON value), and the deleted keys.
pub async fn kv_snapshot(
    js: &jetstream::Context,
    bucket: &str,
) -> (
    std::collections::BTreeMap<String, serde_json::Value>,
    std::collections::BTreeMap<String, serde_json::Value>,
) {
    use futures::StreamExt;
    let kv = js.get_key_value(bucket).await.expect("bucket");
    let mut live = std::collections::BTreeMap::new();
    let mut deleted = std::collections::BTreeMap::new();
    let mut keys = kv.keys().await.expect("keys");
    let mut names = Vec::new();
    while let Some(key) = keys.next().await {
        names.push(key.expect("key"));
    }
    // `keys()` skips deleted keys; read every subject's last entry through a watch of history.
    let mut entries = kv.watch_all_from_revision(1).await.expect("watch");
    let info = kv.status().await.expect("status");
    let last = info.info.state.last_sequence;
    let mut latest = std::collections::BTreeMap::new();
    if last > 0 {
        while let Some(entry) = entries.next().await {
            let entry = entry.expect("entry");
            let revision = entry.revision;
            latest.insert(entry.key.clone(), entry);
            if revision >= last {
                break;
            }
        }
    }
    for (key, entry) in latest {
        let value: serde_json::Value = if entry.value.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_slice(&entry.value).expect("KV value is JSON")
        };
        match entry.operation {
            async_nats::jetstream::kv::Operation::Put => {
                live.insert(key, value);
            }
            _ => {
                deleted.insert(key, value);
            }
        }
    }
    assert_eq!(live.len(), names.len(), "keys() and the watch agree");
    (live, deleted)
}

/// Waits until `check` returns true, or panics after `timeout` with `what`.
pub async fn eventually<F, Fut>(timeout: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A free loopback port (bound then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// Writes a configuration file for `server` with `store` as the redb path, an HTTP listener
/// on `http_port` (0: none), and `projections` (TOML text of `[[projection]]` tables).
pub fn write_config(server: &NatsServer, dir: &Path, http_port: u16, projections: &str) -> PathBuf {
    let listen = if http_port == 0 {
        String::new()
    } else {
        format!("127.0.0.1:{http_port}")
    };
    let text = format!(
        "[nats]\nurl = \"{}\"\n\n[store]\npath = \"{}\"\n\n[http]\nlisten = \"{listen}\"\n\n{projections}\n",
        server.url,
        dir.join("store.redb").display()
    );
    let path = dir.join("projector.toml");
    std::fs::write(&path, text).expect("write config");
    path
}

/// The projector running in this process.
pub struct InProcess {
    cancel: tokio_util::sync::CancellationToken,
    handle: tokio::task::JoinHandle<nats_projector::runtime::Exit>,
}

impl InProcess {
    /// Starts `run` on a configuration file.
    pub fn start(config: &Path) -> InProcess {
        InProcess::start_with(config, nats_projector::Reducers::new())
    }

    /// Starts `run` with custom reducers.
    pub fn start_with(config: &Path, reducers: nats_projector::Reducers) -> InProcess {
        let config = nats_projector::config::Config::load(config).expect("valid config");
        let cancel = tokio_util::sync::CancellationToken::new();
        let handle = tokio::spawn(nats_projector::runtime::run(
            config,
            reducers,
            cancel.clone(),
        ));
        InProcess { cancel, handle }
    }

    /// Stops it like SIGTERM does, and returns its exit code.
    pub async fn stop(self) -> nats_projector::runtime::Exit {
        self.cancel.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.handle)
            .await
            .expect("drains within 30s")
            .expect("run task")
    }
}

/// Waits until the fixture projection's durable (`projector__orders_v1` on `ORDERS`) has
/// nothing pending or unacked.
pub async fn wait_orders_drained(js: &jetstream::Context, timeout: Duration) {
    wait_drained(js, "ORDERS", "projector__orders_v1", timeout).await;
}

/// Waits until the durable consumer has nothing pending or unacked (everything applied, in
/// KV, and acked).
pub async fn wait_drained(js: &jetstream::Context, stream: &str, durable: &str, timeout: Duration) {
    eventually(timeout, "the consumer to drain", || async {
        let Ok(stream) = js.get_stream(stream).await else {
            return false;
        };
        match stream.consumer_info(durable).await {
            Ok(info) => {
                info.num_pending == 0
                    && info.num_ack_pending == 0
                    && info.delivered.stream_sequence > 0
            }
            Err(_) => false,
        }
    })
    .await;
}

/// The `nats-projector` binary built for these tests (`NATS_PROJECTOR_BIN` names another: the
/// end-to-end bench compares two builds that way).
pub fn binary() -> &'static str {
    static BINARY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BINARY.get_or_init(|| {
        std::env::var("NATS_PROJECTOR_BIN")
            .unwrap_or_else(|_| env!("CARGO_BIN_EXE_nats-projector").to_owned())
    })
}

/// Runs a one-shot command of the binary; returns (exit code, stdout, stderr).
pub fn run_cli(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(binary())
        .args(args)
        .output()
        .expect("run the binary");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Loads the shared fixture: (subject, envelope bytes) lines and the expected read model.
pub fn fixture() -> (Vec<(String, Vec<u8>)>, serde_json::Value) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures");
    let lines = std::fs::read_to_string(dir.join("orders.jsonl")).expect("fixture events");
    let events = lines
        .lines()
        .map(|line| {
            let v: serde_json::Value = serde_json::from_str(line).expect("fixture line");
            (
                v["subject"].as_str().expect("subject").to_owned(),
                serde_json::to_vec(&v["event"]).expect("json"),
            )
        })
        .collect();
    let expected = serde_json::from_str(
        &std::fs::read_to_string(dir.join("orders.expected.json")).expect("fixture oracle"),
    )
    .expect("oracle json");
    (events, expected)
}

/// The `[[projection]]` of the fixture's oracle.
pub const FIXTURE_PROJECTION: &str = r#"
[[projection]]
name = "orders"
stream = "ORDERS"
filter_subjects = ["orders.event.>"]
key = "{data.order_id}"
reducer = "merge"
delete_on = ["order.cancelled"]
epoch = "{data.epoch}"
kv_bucket = "orders_view"
batch = 64
"#;

/// Creates the ORDERS stream on `server` and publishes the fixture's 5,000 events to it;
/// returns a JetStream context and the fixture's expected read model.
pub async fn publish_fixture(server: &NatsServer) -> (jetstream::Context, serde_json::Value) {
    let (_client, js) = server.jetstream().await;
    create_stream(&js, "ORDERS", &["orders.>"]).await;
    let (events, expected) = fixture();
    publish_all(&js, events).await;
    (js, expected)
}

/// Asserts that KV and the store both equal the fixture's expected read model.
pub async fn assert_fixture_model(
    js: &jetstream::Context,
    store_path: &Path,
    expected: &serde_json::Value,
) {
    assert_fixture_store(store_path, expected);
    let (live, deleted) = kv_snapshot(js, "orders_view").await;
    let keys = expected["keys"].as_object().expect("keys");
    for (key, want) in keys {
        if want["deleted"].as_bool() == Some(true) {
            assert!(!live.contains_key(key), "{key} deleted in KV");
            assert_eq!(
                deleted[key]["last_applied_stream_seq"], want["last_applied_stream_seq"],
                "{key} tombstone"
            );
            assert_eq!(deleted[key]["deleted"], serde_json::json!(true));
        } else {
            let kv = &live[key];
            assert_eq!(kv["state"], want["state"], "{key} state in KV");
            assert_eq!(
                kv["last_applied_stream_seq"], want["last_applied_stream_seq"],
                "{key} KV seq"
            );
            assert_eq!(
                kv["last_applied_event_id"], want["last_applied_event_id"],
                "{key} KV id"
            );
            assert_eq!(kv["epoch"], want["epoch"], "{key} KV epoch");
            assert_eq!(kv["projection"], "orders");
            assert_eq!(kv["version"], 1);
        }
    }
}

/// Asserts that the store equals the fixture's expected read model.
pub fn assert_fixture_store(store_path: &Path, expected: &serde_json::Value) {
    let store = nats_projector::store::Store::open(store_path, 8).expect("open store");
    let records = store.records("orders@v1").expect("records");
    let keys = expected["keys"].as_object().expect("keys");
    assert_eq!(records.len(), keys.len(), "store key count");
    for (key, record) in records {
        let want = &keys[&key];
        assert_eq!(
            record.seq,
            want["last_applied_stream_seq"].as_u64().unwrap(),
            "{key} seq"
        );
        assert_eq!(
            record.event_id,
            want["last_applied_event_id"].as_str().unwrap(),
            "{key} id"
        );
        assert_eq!(record.epoch, want["epoch"].as_u64(), "{key} epoch");
        if want["deleted"].as_bool() == Some(true) {
            assert!(record.is_deleted(), "{key} deleted in the store");
        } else {
            let state: serde_json::Value =
                serde_json::from_slice(record.state.as_ref().unwrap()).unwrap();
            assert_eq!(state, want["state"], "{key} state in the store");
        }
    }
}

/// Scrapes a counter/gauge value from the Prometheus text at `port`.
pub async fn metric(port: u16, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let body = http_get(port, "/metrics").await?.1;
    body.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .find(|l| {
            l[name.len()..].starts_with('{')
                && labels
                    .iter()
                    .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
                || (labels.is_empty() && l[name.len()..].starts_with(' '))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// `GET path` on the loopback port: (status, body).
pub async fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut raw = String::new();
    stream.read_to_string(&mut raw).await.ok()?;
    let status = raw.split_whitespace().nth(1)?.parse().ok()?;
    let (head, body) = raw.split_once("\r\n\r\n")?;
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    Some((
        status,
        if chunked {
            dechunk(body)?
        } else {
            body.to_owned()
        },
    ))
}

fn dechunk(mut body: &str) -> Option<String> {
    let mut out = String::new();
    loop {
        let (size, rest) = body.split_once("\r\n")?;
        let size = usize::from_str_radix(size.split(';').next()?.trim(), 16).ok()?;
        if size == 0 {
            return Some(out);
        }
        out.push_str(rest.get(..size)?);
        body = rest.get(size + 2..)?;
    }
}

/// Watches a KV bucket and records any key whose `last_applied_stream_seq` goes backwards.
pub struct MonotonicWatch {
    task: tokio::task::JoinHandle<()>,
    state: std::sync::Arc<std::sync::Mutex<(u64, Vec<String>)>>,
}

impl MonotonicWatch {
    /// Starts watching `bucket` (which must exist) from its first revision.
    pub async fn start(js: &jetstream::Context, bucket: &str) -> MonotonicWatch {
        use futures::StreamExt;
        let kv = js.get_key_value(bucket).await.expect("bucket");
        let mut watch = kv.watch_all_from_revision(1).await.expect("watch");
        let state = std::sync::Arc::new(std::sync::Mutex::new((0u64, Vec::new())));
        let shared = state.clone();
        let task = tokio::spawn(async move {
            let mut last: std::collections::HashMap<String, u64> = std::collections::HashMap::new();
            while let Some(Ok(entry)) = watch.next().await {
                let seq = serde_json::from_slice::<serde_json::Value>(&entry.value)
                    .ok()
                    .and_then(|v| v["last_applied_stream_seq"].as_u64())
                    .unwrap_or(0);
                let mut s = shared.lock().unwrap();
                s.0 += 1;
                if let Some(previous) = last.get(&entry.key) {
                    if seq < *previous {
                        s.1.push(format!("{}: {} after {}", entry.key, seq, previous));
                    }
                }
                last.insert(entry.key.clone(), seq);
            }
        });
        MonotonicWatch { task, state }
    }

    /// Stops and returns (entries seen, regressions).
    pub async fn finish(self) -> (u64, Vec<String>) {
        tokio::time::sleep(Duration::from_millis(300)).await;
        self.task.abort();
        let s = self.state.lock().unwrap();
        (s.0, s.1.clone())
    }
}

/// Creates the KV bucket a projection will use (so a watcher can start first).
pub async fn create_bucket(js: &jetstream::Context, bucket: &str) {
    js.create_key_value(jetstream::kv::Config {
        bucket: bucket.into(),
        history: 1,
        ..Default::default()
    })
    .await
    .expect("create bucket");
}

/// The binary running `run`, as a child process.
pub struct Child2 {
    /// The child.
    pub child: std::process::Child,
    /// Where its stderr (the log) goes.
    pub log: PathBuf,
}

impl Child2 {
    /// Spawns `run --config` logging at `level` (instead of warn).
    pub fn run_with_log_level(config: &Path, level: &str, log: &Path) -> Child2 {
        Child2::run(config, &[("RUST_LOG", level)], log)
    }

    /// Spawns `run --config` with extra environment variables; logs go to `log`.
    pub fn run(config: &Path, env: &[(&str, &str)], log: &Path) -> Child2 {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("log");
        let mut command = Command::new(binary());
        command
            .args(["run", "--config"])
            .arg(config)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(file);
        for (k, v) in env {
            command.env(k, v);
        }
        Child2 {
            child: command.spawn().expect("spawn the projector"),
            log: log.to_path_buf(),
        }
    }

    /// SIGKILL.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then waits for the exit code.
    pub fn terminate(mut self) -> Option<i32> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            if Instant::now() > deadline {
                self.kill9();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, and asserts that the process drained and exited 0 (else shows its log's end).
    pub fn stop(self) {
        let log = self.log.clone();
        let code = self.terminate();
        assert_eq!(code, Some(0), "log tail:\n{}", file_tail(&log, 40));
    }

    /// Waits for the process to end by itself (e.g. an injected crash).
    pub fn wait(mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status;
            }
            if Instant::now() > deadline {
                self.kill9();
                panic!("the projector did not exit within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Child2 {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The last `lines` lines of a text file (empty if it cannot be read).
pub fn file_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A Prometheus tool (`prometheus`, `promtool`): `$PROMETHEUS_BIN`/`$PROMTOOL_BIN`, then PATH.
/// `scripts/test` installs Debian's prometheus package when they are missing.
pub fn prometheus_tool(name: &str) -> PathBuf {
    let var = format!("{}_BIN", name.to_uppercase());
    if let Ok(bin) = std::env::var(&var) {
        return PathBuf::from(bin);
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    panic!(
        "{name} not found: set {var} or run scripts/test (it installs Debian's prometheus package)"
    );
}

/// Every PromQL expression of the dashboard, with `$projection` bound to `projection`.
pub fn dashboard_queries(projection: &str) -> Vec<(String, String)> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("grafana/dashboard.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("dashboard")).expect("json");
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = target["expr"].as_str() {
                let title = panel["title"].as_str().unwrap_or("?").to_owned();
                out.push((title, expr.replace("$projection", projection)));
            }
        }
    }
    out
}
