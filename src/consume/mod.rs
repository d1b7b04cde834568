//! Consuming: the NATS connection, binding (or creating) the durable pull consumer, the KV
//! bucket and the DLQ stream, and assembling fetched messages into batches.

mod subscription;

pub use subscription::{Delivery, PullError, Subscription, parse_reply};

use std::time::Duration;

use async_nats::jetstream::{
    self, AckKind,
    consumer::{AckPolicy, DeliverPolicy, PullConsumer, pull},
    kv,
    message::StreamMessage,
    stream,
};
use async_nats::{HeaderMap, Subject};
use bytes::Bytes;
use tokio_util::sync::CancellationToken;

use crate::config::{AckMode, NatsConfig, StorageKind};
use crate::spec::{MessageView, Spec};
use crate::store::Item;

/// Why talking to NATS failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NatsError {
    /// Could not connect (or configure the connection).
    #[error("cannot connect to NATS at {url}: {reason}")]
    Connect {
        /// The URL(s).
        url: String,
        /// Why.
        reason: String,
    },
    /// The projection's stream does not exist.
    #[error("stream {0:?} does not exist")]
    StreamNotFound(String),
    /// A JetStream API call failed.
    #[error("{what}: {reason}")]
    Api {
        /// What was attempted.
        what: String,
        /// The server's or client's reason.
        reason: String,
    },
}

fn api(what: impl Into<String>, err: impl std::fmt::Display) -> NatsError {
    NatsError::Api {
        what: what.into(),
        reason: err.to_string(),
    }
}

/// Connects to NATS with the configured authentication and TLS.
pub async fn connect(config: &NatsConfig, url: &str) -> Result<async_nats::Client, NatsError> {
    let fail = |reason: String| NatsError::Connect {
        url: url.to_owned(),
        reason,
    };
    let mut options = match &config.creds_file {
        Some(path) => async_nats::ConnectOptions::with_credentials_file(path)
            .await
            .map_err(|e| fail(format!("creds_file {}: {e}", path.display())))?,
        None => async_nats::ConnectOptions::new(),
    };
    if let Some(path) = &config.nkey_seed_file {
        let seed = std::fs::read_to_string(path)
            .map_err(|e| fail(format!("nkey_seed_file {}: {e}", path.display())))?;
        options = options.nkey(seed.trim().to_owned());
    }
    if let (Some(user), Some(password)) = (&config.user, &config.password) {
        options = options.user_and_password(user.clone(), password.clone());
    }
    if let Some(token) = &config.token {
        options = options.token(token.clone());
    }
    if let Some(tls) = &config.tls {
        options = options.require_tls(true);
        if let Some(ca) = &tls.ca_file {
            options = options.add_root_certificates(ca.clone());
        }
        if let (Some(cert), Some(key)) = (&tls.cert_file, &tls.key_file) {
            options = options.add_client_certificate(cert.clone(), key.clone());
        }
    }
    let name = config
        .name
        .clone()
        .unwrap_or_else(|| "nats-projector".into());
    options
        .name(name)
        .connection_timeout(Duration::from_secs(5))
        .max_reconnects(None)
        .event_callback(|event| async move {
            match event {
                async_nats::Event::Connected => tracing::info!("connected to NATS"),
                async_nats::Event::Disconnected => tracing::warn!("disconnected from NATS"),
                async_nats::Event::Closed => tracing::debug!("NATS connection closed"),
                other => tracing::warn!(event = %other, "NATS connection event"),
            }
        })
        .connect(url.split(',').map(str::trim).collect::<Vec<_>>().join(","))
        .await
        .map_err(|e| fail(e.to_string()))
}

/// Looks up the projection's stream.
pub async fn stream_of(js: &jetstream::Context, name: &str) -> Result<stream::Stream, NatsError> {
    match js.get_stream(name).await {
        Ok(stream) => Ok(stream),
        Err(err) => match err.kind() {
            jetstream::context::GetStreamErrorKind::JetStream(e)
                if e.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND =>
            {
                Err(NatsError::StreamNotFound(name.to_owned()))
            }
            _ => Err(api(format!("stream info {name}"), err)),
        },
    }
}

/// The consumer configuration a projection needs. `start_after` is the sequence already
/// processed by the store (a new durable starts right after it).
///
/// The configured `backoff` is deliberately NOT set on the consumer: the server then replaces
/// `ack_wait` by `backoff[0]` and redelivers any batch that takes longer. The projector applies
/// the backoff itself as its retry schedule.
pub fn consumer_config(spec: &Spec, start_after: u64) -> pull::Config {
    let c = &spec.config;
    let (filter_subject, filter_subjects) = match c.filter_subjects.as_slice() {
        [one] => (one.clone(), Vec::new()),
        many => (String::new(), many.to_vec()),
    };
    pull::Config {
        durable_name: Some(spec.durable.clone()),
        description: Some(format!("nats-projector {} v{}", c.name, c.version)),
        deliver_policy: if start_after == 0 {
            DeliverPolicy::All
        } else {
            DeliverPolicy::ByStartSequence {
                start_sequence: start_after + 1,
            }
        },
        ack_policy: match c.ack_policy {
            AckMode::Explicit => AckPolicy::Explicit,
            AckMode::All | AckMode::Auto => AckPolicy::All,
        },
        ack_wait: c.ack_wait,
        max_deliver: c.max_deliver,
        max_ack_pending: c.max_ack_pending,
        filter_subject,
        filter_subjects,
        ..Default::default()
    }
}

/// Binds the durable consumer: updates it when it exists (filter subjects, limits), creates it
/// otherwise, starting after `start_after`.
pub async fn bind_consumer(
    stream: &stream::Stream,
    spec: &Spec,
    start_after: u64,
) -> Result<PullConsumer, NatsError> {
    let mut wanted = consumer_config(spec, start_after);
    match stream.consumer_info(&spec.durable).await {
        Ok(info) => {
            let current = info.config;
            // The start position of an existing durable cannot change, and must not.
            wanted.deliver_policy = current.deliver_policy;
            wanted.replay_policy = current.replay_policy;
            wanted.description = current.description.clone();
            if spec.config.ack_policy == AckMode::Auto {
                wanted.ack_policy = current.ack_policy;
            } else if current.ack_policy != wanted.ack_policy {
                return Err(api(
                    format!("bind consumer {}", spec.durable),
                    format!(
                        "the durable exists with ack policy {:?} and the configuration asks for \
                         {:?}; NATS cannot change it: delete the durable (it is re-created at \
                         the store's checkpoint) or set ack_policy back",
                        current.ack_policy, wanted.ack_policy
                    ),
                ));
            }
            if needs_update(&current, &wanted) {
                tracing::info!(consumer = %spec.durable, "updating the durable consumer's configuration");
                stream
                    .update_consumer(wanted)
                    .await
                    .map_err(|e| api(format!("update consumer {}", spec.durable), e))
            } else {
                stream
                    .get_consumer(&spec.durable)
                    .await
                    .map_err(|e| api(format!("bind consumer {}", spec.durable), e))
            }
        }
        Err(err) if err.kind() == jetstream::context::ConsumerInfoErrorKind::NotFound => {
            tracing::info!(consumer = %spec.durable, start_after, "creating the durable consumer");
            stream
                .create_consumer(wanted)
                .await
                .map_err(|e| api(format!("create consumer {}", spec.durable), e))
        }
        Err(err) => Err(api(format!("consumer info {}", spec.durable), err)),
    }
}

fn needs_update(current: &jetstream::consumer::Config, wanted: &pull::Config) -> bool {
    current.ack_wait != wanted.ack_wait
        || current.max_deliver != wanted.max_deliver
        || current.max_ack_pending != wanted.max_ack_pending
        || current.filter_subject != wanted.filter_subject
        || current.filter_subjects != wanted.filter_subjects
        || !current.backoff.is_empty()
}

/// Binds the KV bucket, creating it when missing.
pub async fn ensure_kv(
    js: &jetstream::Context,
    spec: &Spec,
) -> Result<Option<kv::Store>, NatsError> {
    let Some(bucket) = spec.kv_bucket() else {
        return Ok(None);
    };
    if let Ok(store) = js.get_key_value(&bucket).await {
        return Ok(Some(store));
    }
    let created = js
        .create_key_value(kv::Config {
            bucket: bucket.clone(),
            description: format!("nats-projector read model of {}", spec.config.name),
            history: spec.config.kv_history,
            num_replicas: spec.config.kv_replicas,
            storage: match spec.config.kv_storage {
                StorageKind::File => stream::StorageType::File,
                StorageKind::Memory => stream::StorageType::Memory,
            },
            ..Default::default()
        })
        .await;
    match created {
        Ok(store) => {
            tracing::info!(kv_bucket = %bucket, "created the KV bucket");
            Ok(Some(store))
        }
        // Another instance may have created it meanwhile.
        Err(err) => js
            .get_key_value(&bucket)
            .await
            .map(Some)
            .map_err(|_| api(format!("create KV bucket {bucket}"), err)),
    }
}

/// Ensures the DLQ stream exists and captures this projection's dead-letter subjects.
pub async fn ensure_dlq_stream(js: &jetstream::Context, spec: &Spec) -> Result<(), NatsError> {
    let name = &spec.config.dlq_stream;
    let capture = spec.dlq.capture(spec.name(), &spec.config.stream);
    match js.get_stream(name).await {
        Ok(mut existing) => {
            let info = existing
                .info()
                .await
                .map_err(|e| api(format!("stream info {name}"), e))?;
            if info
                .config
                .subjects
                .iter()
                .any(|s| s == &capture || s == ">")
            {
                return Ok(());
            }
            let mut config = info.config.clone();
            config.subjects.push(capture);
            js.update_stream(config)
                .await
                .map(|_| ())
                .map_err(|e| api(format!("add the DLQ subject to stream {name}"), e))
        }
        Err(_) => js
            .create_stream(stream::Config {
                name: name.clone(),
                description: Some("nats-projector dead letters".into()),
                subjects: vec![capture],
                storage: stream::StorageType::File,
                duplicate_window: Duration::from_secs(600),
                ..Default::default()
            })
            .await
            .map(|_| ())
            .map_err(|e| api(format!("create DLQ stream {name}"), e)),
    }
}

/// A message handed to the pipeline: delivered by the durable consumer (and then ackable),
/// or read back from the stream during recovery (not ackable: its pending delivery is acked
/// when the consumer redelivers it).
pub struct Incoming {
    /// Stream sequence.
    pub seq: u64,
    /// Delivery count (0 for a message read back from the stream).
    pub delivered: i64,
    /// Messages still pending for the consumer after this one (0 when unknown).
    pub pending: u64,
    /// Publish time in the stream, Unix ms.
    pub publish_ms: u64,
    /// Subject.
    pub subject: Subject,
    /// Headers.
    pub headers: Option<HeaderMap>,
    /// Payload.
    pub payload: Bytes,
    /// Where acks go (`None` for a message read back from the stream). Only the subject is
    /// kept, not the message's JetStream context: acks go through one shared client.
    reply: Option<Subject>,
}

impl std::fmt::Debug for Incoming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Incoming")
            .field("seq", &self.seq)
            .field("subject", &self.subject)
            .finish_non_exhaustive()
    }
}

impl Incoming {
    /// The message as the pure steps see it.
    pub fn view(&self) -> MessageView<'_> {
        MessageView {
            seq: self.seq,
            subject: self.subject.as_str(),
            headers: self.headers.as_ref(),
            payload: &self.payload,
            publish_ms: self.publish_ms,
        }
    }

    /// The message decoded for the store: its event prepared, or why it is poison.
    pub fn item(&self, spec: &Spec) -> Item {
        match spec.prepare(&self.view()) {
            Ok(prepared) => Item::Event(prepared),
            Err(poison) => Item::Poison {
                seq: self.seq,
                poison,
            },
        }
    }

    /// A message read back from the stream.
    pub fn stored(message: StreamMessage) -> Incoming {
        Incoming {
            seq: message.sequence,
            delivered: 0,
            pending: 0,
            publish_ms: (message.time.unix_timestamp_nanos() / 1_000_000).max(0) as u64,
            subject: message.subject,
            headers: Some(message.headers).filter(|h| h.iter().next().is_some()),
            payload: message.payload,
            reply: None,
        }
    }

    /// A delivered message of stream sequence `seq` (for tests of what consumes batches).
    #[cfg(test)]
    pub(crate) fn for_test(seq: u64, payload: &[u8]) -> Incoming {
        Incoming {
            seq,
            delivered: 1,
            pending: 0,
            publish_ms: 1_700_000_000_000 + seq,
            subject: Subject::from("orders.created"),
            headers: None,
            payload: Bytes::copy_from_slice(payload),
            reply: None,
        }
    }

    /// Sends an ack of `kind` through `client` (nothing for messages read back from the
    /// stream). Errors are logged: an ack that never arrives only means a redelivery, which
    /// the store recognizes.
    pub async fn ack(&self, client: &async_nats::Client, kind: AckKind) {
        if let Some(reply) = &self.reply {
            if let Err(err) = client.publish(reply.clone(), kind.into()).await {
                tracing::warn!(error = %err, stream_seq = self.seq, "could not send an ack");
            }
        }
    }

    /// Whether this message can be acked (it was delivered, not read back from the stream).
    pub fn ackable(&self) -> bool {
        self.reply.is_some()
    }

    /// Drops what only decoding and dead-lettering need (payload, headers) once the message's
    /// outcome is committed and it is not a poison event: a message waiting for its ack then
    /// holds a few dozen bytes, not its payload (nor the read buffer the payload shares).
    pub fn slim(&mut self) {
        self.payload = Bytes::new();
        self.headers = None;
    }
}

/// What [`Source::next_batch`] returns.
#[derive(Debug)]
pub enum Fetched {
    /// Messages, in delivery order.
    Batch(Vec<Incoming>),
    /// Nothing arrived within the idle interval.
    Idle,
    /// Shutdown was requested.
    Shutdown,
}

/// Batches a pull request asks for (fewer if `max_ack_pending` is lower).
const PULL_AHEAD: usize = 4;

/// Turns the consumer's message stream into batches bounded by count and bytes.
pub struct Source {
    consumer: PullConsumer,
    client: async_nats::Client,
    messages: Option<Subscription>,
    batch: usize,
    batch_bytes: usize,
    /// Messages asked for per pull request: several batches, so that the server keeps
    /// delivering while a batch is applied (nothing polls the subscription meanwhile, and the
    /// client asks for more only when polled).
    pull: usize,
    /// Messages taken while the previous batch was applied ([`Source::gather`]), in delivery
    /// order: the start of the next batch.
    ahead: Vec<Incoming>,
    ahead_bytes: usize,
    idle: Duration,
    /// Incremented each time the message stream had to be re-created (missed heartbeats, a
    /// deleted or moved consumer, a stall).
    pub rebinds: u64,
    rebound: bool,
}

impl Source {
    /// A source over `consumer`, pulled through `client`, in batches of `batch` messages and
    /// `batch_bytes` at most.
    pub fn new(
        consumer: PullConsumer,
        client: async_nats::Client,
        batch: usize,
        batch_bytes: usize,
        idle: Duration,
    ) -> Source {
        let max_ack_pending = usize::try_from(consumer.cached_info().config.max_ack_pending)
            .ok()
            .filter(|&m| m > 0)
            .unwrap_or(usize::MAX);
        Source {
            consumer,
            client,
            messages: None,
            batch,
            batch_bytes,
            pull: batch
                .saturating_mul(PULL_AHEAD)
                .min(max_ack_pending)
                .max(batch),
            ahead: Vec::new(),
            ahead_bytes: 0,
            idle,
            rebinds: 0,
            rebound: true,
        }
    }

    /// The consumer.
    pub fn consumer(&mut self) -> &mut PullConsumer {
        &mut self.consumer
    }

    /// The messages gathered so far for the next batch, in delivery order (its start: the batch
    /// [`Source::next_batch`] returns next begins with them, unless a re-bind drops them).
    pub fn ahead(&self) -> &[Incoming] {
        &self.ahead
    }

    /// Drops the message stream so the next fetch re-creates it (the watchdog's re-bind).
    /// Messages it had buffered come back only after `ack_wait`, behind newer ones, so the
    /// pipeline must recover the unacked range before fetching again ([`Source::rebound`]).
    pub fn rebind(&mut self) {
        self.messages = None;
        // Unacked like the rest of the subscription's messages: read back in order by the
        // recovery that follows a re-bind.
        self.ahead.clear();
        self.ahead_bytes = 0;
        self.rebinds += 1;
        self.rebound = true;
    }

    /// Whether the subscription was (re-)created since the last call: the unacked range must
    /// then be read back in order first. True before the first fetch.
    pub fn rebound(&mut self) -> bool {
        std::mem::take(&mut self.rebound)
    }

    async fn stream(&mut self) -> Result<&mut Subscription, NatsError> {
        if self.messages.is_none() {
            let info = self.consumer.cached_info();
            let pull = Subscription::open(
                &self.client,
                &info.stream_name,
                &info.name,
                self.pull,
                self.batch_bytes.saturating_mul(PULL_AHEAD),
                Duration::from_secs(30),
                Duration::from_secs(5),
            )
            .await?;
            self.messages = Some(pull);
        }
        self.messages
            .as_mut()
            .ok_or_else(|| api("pull messages", "stream missing"))
    }

    /// Waits for the first message (up to the idle interval), then takes whatever else is
    /// already buffered, up to the batch limits. Messages gathered while the previous batch
    /// was applied come first, without waiting.
    pub async fn next_batch(&mut self, cancel: &CancellationToken) -> Result<Fetched, NatsError> {
        let idle = self.idle;
        if self.ahead.is_empty() {
            let stream = self.stream().await?;
            let first = tokio::select! {
                biased;
                _ = cancel.cancelled() => return Ok(Fetched::Shutdown),
                next = tokio::time::timeout(idle, stream.next()) => next,
            };
            let first = match first {
                Err(_) => return Ok(Fetched::Idle),
                Ok(None) => {
                    self.rebind();
                    return Ok(Fetched::Idle);
                }
                Ok(Some(Err(err))) => {
                    tracing::warn!(error = %err, "pull consumer error; re-binding");
                    self.rebind();
                    return Ok(Fetched::Idle);
                }
                Ok(Some(Ok(message))) => message,
            };
            self.ahead_bytes = first.payload.len();
            self.ahead.push(first);
        }
        let broken = self.take_buffered();
        // The next batch is likely the size of this one: sized up front, it is not grown
        // (copied, and its fresh memory faulted in) a doubling at a time.
        let next = Vec::with_capacity(self.ahead.len());
        let batch = std::mem::replace(&mut self.ahead, next);
        self.ahead_bytes = 0;
        // After taking the batch: a re-bind drops what was gathered ahead.
        if broken {
            self.rebind();
        }
        Ok(Fetched::Batch(batch))
    }

    /// Whether the messages gathered ahead make a whole batch (by count or bytes).
    pub fn ahead_full(&self) -> bool {
        self.ahead.len() >= self.batch || self.ahead_bytes >= self.batch_bytes
    }

    /// Takes the messages gathered ahead as the next batch, before the batch in hand is
    /// complete (the pipeline queues it on the applying thread).
    pub fn take_ahead(&mut self) -> Vec<Incoming> {
        self.ahead_bytes = 0;
        let next = Vec::with_capacity(self.ahead.len());
        std::mem::replace(&mut self.ahead, next)
    }

    /// Takes messages that arrive while a batch is applied, up to one batch, so that the next
    /// batch is ready when the applying thread is. Returns once it took some; never returns
    /// when it wants no more (a full batch, no subscription). Cancel-safe.
    pub async fn gather(&mut self) {
        let full = self.ahead_full();
        let Some(stream) = self.messages.as_mut().filter(|_| !full) else {
            return std::future::pending().await;
        };
        match stream.next().await {
            Some(Ok(message)) => {
                self.ahead_bytes += message.payload.len();
                self.ahead.push(message);
                if self.take_buffered() {
                    self.rebind();
                }
            }
            Some(Err(err)) => {
                tracing::warn!(error = %err, "pull consumer error; re-binding");
                self.rebind();
            }
            None => self.rebind(),
        }
    }

    /// Appends what the subscription already buffered to the messages gathered ahead, up to
    /// the batch limits; true if the subscription broke (the caller re-binds).
    fn take_buffered(&mut self) -> bool {
        let Some(stream) = self.messages.as_mut() else {
            return false;
        };
        while self.ahead.len() < self.batch && self.ahead_bytes < self.batch_bytes {
            match stream.try_next() {
                Some(Some(Ok(message))) => {
                    self.ahead_bytes += message.payload.len();
                    self.ahead.push(message);
                }
                Some(Some(Err(err))) => {
                    tracing::warn!(error = %err, "pull consumer error; re-binding");
                    return true;
                }
                Some(None) => return true,
                None => break,
            }
        }
        false
    }
}

/// Acks (or NAKs, or marks in progress) a set of messages.
pub async fn ack_all(client: &async_nats::Client, messages: &[Incoming], kind: AckKind) {
    for message in messages {
        message.ack(client, kind).await;
    }
}

/// Reads the messages of `stream` matching `filters` with sequences in `(after, through]`, in
/// stream order, up to `limit` of them. Used to recover a range the durable delivered to a
/// previous subscription but that was never acked.
pub async fn read_range(
    stream: &stream::Stream,
    filters: &[String],
    after: u64,
    through: u64,
    limit: usize,
) -> Result<Vec<Incoming>, NatsError> {
    let all = [">".to_owned()];
    let filters = if filters.is_empty() {
        &all[..]
    } else {
        filters
    };
    let direct = stream.cached_info().config.allow_direct;
    let mut out = Vec::new();
    let mut cursor = after + 1;
    while cursor <= through && out.len() < limit {
        let mut next: Option<StreamMessage> = None;
        for filter in filters {
            let found = if direct {
                match stream
                    .direct_get_builder()
                    .sequence(cursor)
                    .next_by_subject(filter.clone())
                    .send()
                    .await
                {
                    Ok(m) => Some(m),
                    Err(e) if e.kind() == stream::DirectGetErrorKind::NotFound => None,
                    Err(e) => return Err(api("read the unacked range", e)),
                }
            } else {
                match stream
                    .raw_message_builder()
                    .sequence(cursor)
                    .next_by_subject(filter.clone())
                    .send()
                    .await
                {
                    Ok(m) => Some(m),
                    Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => None,
                    Err(e) => return Err(api("read the unacked range", e)),
                }
            };
            if let Some(m) = found {
                if next.as_ref().is_none_or(|n| m.sequence < n.sequence) {
                    next = Some(m);
                }
            }
        }
        match next {
            Some(m) if m.sequence <= through => {
                cursor = m.sequence + 1;
                out.push(Incoming::stored(m));
            }
            _ => break,
        }
    }
    Ok(out)
}
