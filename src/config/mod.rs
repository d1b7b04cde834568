//! The configuration file (TOML), as fixed by the contract, with documented defaults.
//!
//! Loading never stops at the first problem: every section is deserialized on its own and then
//! validated, and each problem is reported with its TOML path (`projection[1].ack_wait`).
//! Unknown keys are errors, never silent defaults.

pub mod duration;
mod validate;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::decode::FieldMap;

pub use validate::Problem;
pub(crate) use validate::check_subject as validate_subject;

/// The default NATS URL when neither the file nor `NATS_URL` names one.
pub const DEFAULT_NATS_URL: &str = "nats://127.0.0.1:4222";

/// The whole configuration file.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Config {
    /// `[nats]`: how to reach the NATS server or cluster.
    pub nats: NatsConfig,
    /// `[store]`: the local redb database.
    pub store: StoreConfig,
    /// `[http]`: the metrics, health and admin listener.
    pub http: HttpConfig,
    /// `[snapshots]`: automatic snapshots, and where restores look for them.
    pub snapshots: SnapshotConfig,
    /// `[[projection]]`: the projections this process runs.
    pub projection: Vec<ProjectionConfig>,
}

/// `[snapshots]`: automatic snapshots, and where a lost store is restored from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SnapshotConfig {
    /// Directory of snapshot files. Default: `snapshots` beside the store file.
    pub dir: Option<PathBuf>,
    /// Snapshot every projection this often while running; `"0s"` (the default) disables.
    #[serde(with = "duration")]
    pub interval: Duration,
    /// Automatic snapshots kept per projection (older ones are deleted). Default: 3.
    pub keep: usize,
    /// Also upload automatic snapshots to this JetStream Object Store bucket.
    pub object_store: Option<String>,
}

impl Default for SnapshotConfig {
    fn default() -> Self {
        SnapshotConfig {
            dir: None,
            interval: Duration::ZERO,
            keep: 3,
            object_store: None,
        }
    }
}

/// `[nats]`: connection settings.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatsConfig {
    /// Server URL, or several comma-separated for a cluster. Default: `NATS_URL`, then
    /// `nats://127.0.0.1:4222`.
    pub url: Option<String>,
    /// A `.creds` file (JWT + nkey seed).
    pub creds_file: Option<PathBuf>,
    /// A file holding an nkey seed (`SU...`).
    pub nkey_seed_file: Option<PathBuf>,
    /// User name (with `password`).
    pub user: Option<String>,
    /// Password (with `user`).
    pub password: Option<String>,
    /// Authentication token.
    pub token: Option<String>,
    /// Client name shown by the server's monitoring. Default: `nats-projector`.
    pub name: Option<String>,
    /// `[nats.tls]`: TLS settings; present means TLS is required.
    pub tls: Option<TlsConfig>,
}

/// `[nats.tls]`: certificates.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// CA bundle that signs the server certificate.
    pub ca_file: Option<PathBuf>,
    /// Client certificate (mutual TLS, with `key_file`).
    pub cert_file: Option<PathBuf>,
    /// Client private key (mutual TLS, with `cert_file`).
    pub key_file: Option<PathBuf>,
}

/// `[store]`: the embedded redb database.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// The database file. Default: `data/projector.redb` (relative to the working directory).
    pub path: PathBuf,
    /// redb page cache in MiB. Default: 64.
    pub cache_mib: usize,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            path: PathBuf::from("data/projector.redb"),
            cache_mib: 64,
        }
    }
}

/// `[http]`: metrics, health and admin routes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Listen address. Default: `127.0.0.1:9464` (loopback: the admin routes are not
    /// authenticated). An empty string disables the listener.
    pub listen: String,
    /// `/readyz` is 503 while a projection lags by more than this many messages. Default: 1000.
    pub ready_max_lag: u64,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: "127.0.0.1:9464".into(),
            ready_max_lag: 1000,
        }
    }
}

/// The built-in reducers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReducerKind {
    /// The state is the event's data.
    Latest,
    /// RFC 7386 merge patch of the data onto the state.
    Merge,
    /// `{"count": N}` (+ `"sum"` with `sum = "{data.PATH}"`).
    Counter,
    /// A Rust [`crate::reduce::Projection`] registered by a library user under this
    /// projection's name.
    Custom,
}

/// Where KV bucket data lives when the projector creates the bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum StorageKind {
    /// On disk (the default).
    #[default]
    File,
    /// In memory.
    Memory,
}

/// How the projector acknowledges the messages it has applied (the consumer's ack policy).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum AckMode {
    /// `all` for a durable the projector creates; an existing durable keeps its own policy
    /// (the default).
    #[default]
    Auto,
    /// Every message is acked on its own (`AckPolicy::Explicit`).
    Explicit,
    /// One ack per completed group of batches, for its newest message (`AckPolicy::All`
    /// acknowledges every earlier delivery too). Safe here because groups complete in stream
    /// order and one process owns a durable. An existing durable created with another policy
    /// is refused (NATS cannot change it).
    All,
}

/// `format` of `[projection.envelope]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum EnvelopeFormat {
    /// CloudEvents 1.0 structured JSON (the default).
    #[default]
    Cloudevents,
    /// Any JSON object, with fields named by the field map.
    Fields,
}

/// `[projection.envelope]`: how to read events. The field names apply to `format = "fields"`;
/// unset ones keep [`FieldMap`]'s defaults (`eventId`, `eventType`, `eventVersion`,
/// `timestamp`, `idempotencyKey`, `payload`, `correlationId`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct EnvelopeConfig {
    /// `cloudevents` (default) or `fields`.
    pub format: EnvelopeFormat,
    /// The event id field.
    pub id: Option<String>,
    /// The event type field.
    #[serde(rename = "type")]
    pub event_type: Option<String>,
    /// The event version field (integer or string).
    pub version: Option<String>,
    /// The event time field.
    pub time: Option<String>,
    /// The idempotency key field; when an event has it, dedupe uses it instead of the id.
    pub idempotency_key: Option<String>,
    /// The data (payload) field.
    pub data: Option<String>,
    /// The correlation id field.
    pub correlation_id: Option<String>,
}

impl EnvelopeConfig {
    /// The effective field map for `format = "fields"`.
    pub fn field_map(&self) -> FieldMap {
        let d = FieldMap::default();
        FieldMap {
            id: self.id.clone().unwrap_or(d.id),
            event_type: self.event_type.clone().unwrap_or(d.event_type),
            version: self.version.clone().or(d.version),
            time: self.time.clone().or(d.time),
            idempotency_key: self.idempotency_key.clone().or(d.idempotency_key),
            data: self.data.clone().unwrap_or(d.data),
            correlation_id: self.correlation_id.clone().or(d.correlation_id),
        }
    }
}

/// `[[projection]]`: one stream folded into one read model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProjectionConfig {
    /// Name, `[a-z0-9_-]+`, unique in the file; labels metrics and names the durable.
    pub name: String,
    /// Read-model version; bumping it means a rebuild into a new read model. Default: 1.
    #[serde(default = "defaults::version")]
    pub version: u32,
    /// The JetStream stream to read.
    pub stream: String,
    /// Subjects to read (consumer filter subjects). Default: every subject of the stream.
    #[serde(default)]
    pub filter_subjects: Vec<String>,
    /// Durable consumer name. Default: `projector__{name}_v{version}`.
    #[serde(default)]
    pub durable: Option<String>,
    /// Key template (see the key module): `{subject.N}`, `{data.PATH}`, `{FIELD}`,
    /// `{header.NAME}` and literal text.
    pub key: String,
    /// `latest`, `merge`, `counter` or `custom`.
    pub reducer: ReducerKind,
    /// For `counter`: `{data.PATH}` of a number added into `"sum"`.
    #[serde(default)]
    pub sum: Option<String>,
    /// Event types that delete the key (a tombstone).
    #[serde(default)]
    pub delete_on: Vec<String>,
    /// Optional fencing token template (an unsigned integer); older epochs are refused.
    #[serde(default)]
    pub epoch: Option<String>,
    /// JetStream KV bucket of the read model, created if missing. Omit it to keep the read
    /// model in redb only.
    #[serde(default)]
    pub kv_bucket: Option<String>,
    /// Replicas of the KV bucket when the projector creates it. Default: 1.
    #[serde(default = "defaults::one_usize")]
    pub kv_replicas: usize,
    /// History per key of the KV bucket when the projector creates it. Default: 1.
    #[serde(default = "defaults::one_i64")]
    pub kv_history: i64,
    /// Storage of the KV bucket when the projector creates it: `file` (default) or `memory`.
    #[serde(default)]
    pub kv_storage: StorageKind,
    /// Max messages per fetched batch. Default: 256.
    #[serde(default = "defaults::batch")]
    pub batch: usize,
    /// Max payload bytes per fetched batch. Default: 4 MiB.
    #[serde(default = "defaults::batch_bytes")]
    pub batch_bytes: usize,
    /// Consumer `max_ack_pending`. Default: 2048.
    #[serde(default = "defaults::max_ack_pending")]
    pub max_ack_pending: i64,
    /// `all` (an ack per completed group: fewer messages for nats-server and the projector),
    /// `explicit` (an ack per message), or `auto` (the default: `all` for a durable the
    /// projector creates, the existing durable's own policy otherwise).
    #[serde(default)]
    pub ack_policy: AckMode,
    /// Consumer `ack_wait`. Default: 30s.
    #[serde(default = "defaults::ack_wait", with = "duration")]
    pub ack_wait: Duration,
    /// Consumer `max_deliver`; the last delivery of an event that still fails goes to the DLQ.
    /// Default: 5.
    #[serde(default = "defaults::max_deliver")]
    pub max_deliver: i64,
    /// NAK delays for transient failures, indexed by delivery count (the last repeats).
    /// Default: `["1s", "5s", "30s"]`.
    #[serde(default = "defaults::backoff", with = "duration::list")]
    pub backoff: Vec<Duration>,
    /// Dead-letter subject template: `{subject}` (the original subject, as the last token),
    /// `{projection}`, `{stream}`. Default: `dlq.{subject}`.
    #[serde(default = "defaults::dlq_subject")]
    pub dlq_subject: String,
    /// Stream capturing the dead-letter subjects, created if missing. Default: `PROJECTOR_DLQ`.
    #[serde(default = "defaults::dlq_stream")]
    pub dlq_stream: String,
    /// Envelope ids applied within this window (in stream publish time) are applied once.
    /// `"0s"` disables envelope-id dedupe. Default: 10m.
    #[serde(default = "defaults::dedupe_window", with = "duration")]
    pub dedupe_window: Duration,
    /// Payloads above this size are dead-lettered as `too_large`. Default: 1 MiB.
    #[serde(default = "defaults::max_event_bytes")]
    pub max_event_bytes: usize,
    /// Payloads nesting deeper than this are dead-lettered as `too_deep`. Default: 64.
    #[serde(default = "defaults::max_depth")]
    pub max_depth: usize,
    /// How often consumer and stream info are sampled (lag, readiness, continuity). Default: 2s.
    #[serde(default = "defaults::lag_sample_interval", with = "duration")]
    pub lag_sample_interval: Duration,
    /// `[projection.envelope]`: the envelope format. Default: CloudEvents.
    #[serde(default)]
    pub envelope: EnvelopeConfig,
}

impl ProjectionConfig {
    /// The durable consumer name.
    pub fn durable_name(&self) -> String {
        self.durable
            .clone()
            .unwrap_or_else(|| format!("projector__{}_v{}", self.name, self.version))
    }

    /// The namespace of this projection's tables in the store (`name@vVERSION`).
    pub fn store_namespace(&self) -> String {
        format!("{}@v{}", self.name, self.version)
    }
}

mod defaults {
    use std::time::Duration;

    pub fn version() -> u32 {
        1
    }
    pub fn one_usize() -> usize {
        1
    }
    pub fn one_i64() -> i64 {
        1
    }
    pub fn batch() -> usize {
        256
    }
    pub fn batch_bytes() -> usize {
        4 * 1024 * 1024
    }
    pub fn max_ack_pending() -> i64 {
        2048
    }
    pub fn ack_wait() -> Duration {
        Duration::from_secs(30)
    }
    pub fn max_deliver() -> i64 {
        5
    }
    pub fn backoff() -> Vec<Duration> {
        vec![
            Duration::from_secs(1),
            Duration::from_secs(5),
            Duration::from_secs(30),
        ]
    }
    pub fn dlq_subject() -> String {
        "dlq.{subject}".into()
    }
    pub fn dlq_stream() -> String {
        "PROJECTOR_DLQ".into()
    }
    pub fn dedupe_window() -> Duration {
        Duration::from_secs(600)
    }
    pub fn max_event_bytes() -> usize {
        1024 * 1024
    }
    pub fn max_depth() -> usize {
        64
    }
    pub fn lag_sample_interval() -> Duration {
        Duration::from_secs(2)
    }
}

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file was read but has problems; each names its TOML path.
    #[error("{}", Problem::list(.0))]
    Invalid(Vec<Problem>),
}

impl Config {
    /// Reads, parses and validates a file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Config::parse(&text, base)
    }

    /// Parses and validates TOML text; relative file paths are checked against `base`.
    pub fn parse(text: &str, base: &Path) -> Result<Config, ConfigError> {
        let mut problems = Vec::new();
        let table: toml::Table = toml::from_str(text).map_err(|err| {
            ConfigError::Invalid(vec![Problem::new(
                "",
                format!("not valid TOML: {}", err.to_string().trim()),
            )])
        })?;
        let mut config = Config::default();
        for (name, value) in table {
            match name.as_str() {
                "nats" => section(&name, value, &mut problems, &mut config.nats),
                "store" => section(&name, value, &mut problems, &mut config.store),
                "http" => section(&name, value, &mut problems, &mut config.http),
                "snapshots" => section(&name, value, &mut problems, &mut config.snapshots),
                "projection" => match value {
                    toml::Value::Array(items) => {
                        for (i, item) in items.into_iter().enumerate() {
                            let path = format!("projection[{i}]");
                            if let Some(p) =
                                deserialize_at::<ProjectionConfig>(&path, item, &mut problems)
                            {
                                config.projection.push(p);
                            }
                        }
                    }
                    _ => problems.push(Problem::new(
                        "projection",
                        "must be an array of tables: write [[projection]]",
                    )),
                },
                other => problems.push(Problem::new(
                    other,
                    "unknown key (expected nats, store, http, snapshots or projection)",
                )),
            }
        }
        if config.nats.url.is_none() {
            config.nats.url = std::env::var("NATS_URL").ok().filter(|u| !u.is_empty());
        }
        if problems.is_empty() {
            problems = validate::validate(&config, base);
        }
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError::Invalid(problems))
        }
    }

    /// The NATS URL(s) to connect to.
    pub fn nats_url(&self) -> &str {
        self.nats.url.as_deref().unwrap_or(DEFAULT_NATS_URL)
    }

    /// The snapshot directory.
    pub fn snapshot_dir(&self) -> PathBuf {
        self.snapshots.dir.clone().unwrap_or_else(|| {
            self.store
                .path
                .parent()
                .unwrap_or(Path::new("."))
                .join("snapshots")
        })
    }

    /// The projection named `name`.
    pub fn projection(&self, name: &str) -> Option<&ProjectionConfig> {
        self.projection.iter().find(|p| p.name == name)
    }
}

fn section<T: DeserializeOwned>(
    path: &str,
    value: toml::Value,
    problems: &mut Vec<Problem>,
    slot: &mut T,
) {
    if let Some(parsed) = deserialize_at(path, value, problems) {
        *slot = parsed;
    }
}

fn deserialize_at<T: DeserializeOwned>(
    prefix: &str,
    value: toml::Value,
    problems: &mut Vec<Problem>,
) -> Option<T> {
    match serde_path_to_error::deserialize::<_, T>(value) {
        Ok(parsed) => Some(parsed),
        Err(err) => {
            let inner = err.path().to_string();
            let path = if inner == "." {
                prefix.to_owned()
            } else {
                format!("{prefix}.{inner}")
            };
            problems.push(Problem::new(path, err.into_inner().to_string()));
            None
        }
    }
}

#[cfg(test)]
mod tests;
