//! The read model in JetStream KV: compare-and-set writes driven from the store's outbox.
//!
//! Every write carries `Nats-Expected-Last-Subject-Sequence` (the key's KV revision). A
//! conflict (JetStream error 10071, or 10164 on replicated buckets) means another writer got
//! there first: the entry is re-read and the newer `last_applied_stream_seq` wins. So KV never
//! moves a key backwards, whatever the writers.

use foldhash::HashMap;
use std::sync::Mutex;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, context::PublishErrorKind, kv};
use futures::StreamExt;

pub mod verify;

use crate::store::{KvConfirmed, KvValue, KvWrite};

/// Conflicts resolved per write before giving up for this round (it is retried later).
const MAX_CONFLICTS: usize = 16;
/// Revisions remembered between batches; beyond it, the store's hint (or a re-read) is used.
const REVISION_CACHE: usize = 65_536;

/// The kinds of KV write failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum KvErrorKind {
    /// KV (or NATS) is unreachable or timed out: retry later.
    Unavailable,
    /// The server refused the write (e.g. the value exceeds the bucket's limits).
    Rejected,
    /// Conflicts kept happening (a very busy concurrent writer): retry later.
    Contended,
}

/// A failed KV write.
#[derive(Debug, thiserror::Error)]
#[error("KV write of {key:?} failed ({kind:?}): {reason}")]
pub struct KvError {
    /// The class of failure.
    pub kind: KvErrorKind,
    /// The key.
    pub key: String,
    /// The reason.
    pub reason: String,
}

/// How a write ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Written {
    /// KV now holds the value at this revision.
    Ok(KvConfirmed),
    /// KV already held the same or a newer sequence (another writer): nothing to write.
    Superseded(KvConfirmed),
}

/// Counts of one [`KvWriter::write_all`] round, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteStats {
    /// Writes that landed.
    pub ok: u64,
    /// Compare-and-set conflicts met (each re-read once).
    pub conflicts: u64,
    /// Writes found unnecessary (KV newer).
    pub superseded: u64,
    /// Writes that failed.
    pub errors: u64,
}

/// Writes store records to one KV bucket.
pub struct KvWriter {
    js: jetstream::Context,
    kv: kv::Store,
    prefix: String,
    in_flight: usize,
    revisions: Mutex<HashMap<String, u64>>,
}

impl std::fmt::Debug for KvWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvWriter")
            .field("prefix", &self.prefix)
            .finish()
    }
}

impl KvWriter {
    /// A writer for `bucket` with at most `in_flight` writes awaiting their acks.
    pub fn new(js: jetstream::Context, kv: kv::Store, bucket: &str, in_flight: usize) -> KvWriter {
        KvWriter {
            js,
            kv,
            prefix: format!("$KV.{bucket}."),
            in_flight: in_flight.max(1),
            revisions: Mutex::new(HashMap::default()),
        }
    }

    /// The bucket handle (for reads).
    pub fn store(&self) -> &kv::Store {
        &self.kv
    }

    fn cached_revision(&self, key: &str) -> Option<u64> {
        self.revisions.lock().ok().and_then(|m| m.get(key).copied())
    }

    fn remember(&self, key: &str, revision: u64) {
        if let Ok(mut map) = self.revisions.lock() {
            if map.len() >= REVISION_CACHE && !map.contains_key(key) {
                map.clear();
            }
            map.insert(key.to_owned(), revision);
        }
    }

    /// Writes every record, many in flight; returns what landed and what failed.
    pub async fn write_all(&self, writes: &[KvWrite]) -> (Vec<Written>, Vec<KvError>, WriteStats) {
        let mut done = Vec::with_capacity(writes.len());
        let mut failed = Vec::new();
        let mut stats = WriteStats::default();
        let mut queue = writes.iter();
        let mut in_flight = futures::stream::FuturesUnordered::new();
        loop {
            while in_flight.len() < self.in_flight {
                match queue.next() {
                    Some(write) => in_flight.push(self.write_one(write)),
                    None => break,
                }
            }
            let Some((result, conflicts)) = in_flight.next().await else {
                break;
            };
            stats.conflicts += conflicts;
            match result {
                Ok(w @ Written::Ok(_)) => {
                    stats.ok += 1;
                    done.push(w);
                }
                Ok(w @ Written::Superseded(_)) => {
                    stats.superseded += 1;
                    done.push(w);
                }
                Err(err) => {
                    stats.errors += 1;
                    failed.push(err);
                }
            }
        }
        (done, failed, stats)
    }

    /// One compare-and-set write, resolving conflicts by sequence. Returns the conflicts met.
    async fn write_one(&self, write: &KvWrite) -> (Result<Written, KvError>, u64) {
        let mut revision = self
            .cached_revision(&write.key)
            .unwrap_or(write.revision_hint);
        let mut conflicts = 0;
        let subject = format!("{}{}", self.prefix, write.key);
        let fail = |kind, reason: String| KvError {
            kind,
            key: write.key.clone(),
            reason,
        };
        while conflicts < MAX_CONFLICTS as u64 {
            let mut headers = HeaderMap::new();
            headers.insert(
                async_nats::header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
                revision.to_string().as_str(),
            );
            if write.delete {
                headers.insert("KV-Operation", "DEL");
            }
            let sent = self
                .js
                .publish_with_headers(subject.clone(), headers, write.payload.clone())
                .await;
            // The ack future times out on its own (the context's request timeout).
            let acked = match sent {
                Ok(ack) => ack.await,
                Err(err) => Err(err),
            };
            match acked {
                Ok(ack) => {
                    tracing::debug!(kv_key = %write.key, revision = ack.sequence,
                        stream_seq = write.seq, result = "ok", "KV write");
                    self.remember(&write.key, ack.sequence);
                    let confirmed = KvConfirmed {
                        key: write.key.clone(),
                        seq: write.seq,
                        revision: ack.sequence,
                    };
                    return (Ok(Written::Ok(confirmed)), conflicts);
                }
                Err(err) if is_cas_conflict(&err) => {
                    conflicts += 1;
                    // Re-read: the newer last_applied_stream_seq wins.
                    match self.kv.entry(write.key.clone()).await {
                        Ok(Some(entry)) => {
                            let held = serde_json::from_slice::<KvValue>(&entry.value)
                                .map(|v| v.last_applied_stream_seq)
                                .unwrap_or(0);
                            if held >= write.seq {
                                tracing::debug!(kv_key = %write.key, revision = entry.revision,
                                    stream_seq = write.seq, held, result = "superseded", "KV write");
                                self.remember(&write.key, entry.revision);
                                let confirmed = KvConfirmed {
                                    key: write.key.clone(),
                                    seq: write.seq,
                                    revision: entry.revision,
                                };
                                return (Ok(Written::Superseded(confirmed)), conflicts);
                            }
                            revision = entry.revision;
                        }
                        Ok(None) => revision = 0,
                        Err(err) => {
                            return (
                                Err(fail(KvErrorKind::Unavailable, err.to_string())),
                                conflicts,
                            );
                        }
                    }
                }
                Err(err) => {
                    let kind = match err.kind() {
                        PublishErrorKind::TimedOut
                        | PublishErrorKind::BrokenPipe
                        | PublishErrorKind::StreamNotFound
                        | PublishErrorKind::MaxAckPending => KvErrorKind::Unavailable,
                        _ => KvErrorKind::Rejected,
                    };
                    return (Err(fail(kind, err.to_string())), conflicts);
                }
            }
        }
        (
            Err(fail(
                KvErrorKind::Contended,
                format!("{MAX_CONFLICTS} conflicts in a row"),
            )),
            conflicts,
        )
    }
}

/// Whether a publish failed its compare-and-set: 10071 (wrong last sequence), or 10164 (the
/// same on replicated streams), matched by error code, never by message text.
pub fn is_cas_conflict(err: &jetstream::context::PublishError) -> bool {
    if err.kind() == PublishErrorKind::WrongLastSequence {
        return true;
    }
    let mut source = std::error::Error::source(err);
    while let Some(inner) = source {
        if let Some(js) = inner.downcast_ref::<jetstream::Error>() {
            return matches!(
                js.error_code(),
                jetstream::ErrorCode::STREAM_WRONG_LAST_SEQUENCE
                    | jetstream::ErrorCode::STREAM_WRONG_LAST_SEQUENCE_CONSTANT
            );
        }
        source = inner.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use jetstream::context::PublishError;

    fn server_error(code: u64) -> PublishError {
        let err: jetstream::Error = serde_json::from_value(serde_json::json!({
            "code": 400, "err_code": code, "description": "wrong last sequence: 7"
        }))
        .expect("a JetStream API error");
        PublishError::with_source(PublishErrorKind::Other, err)
    }

    #[test]
    fn both_cas_error_codes_are_conflicts_and_nothing_else_is() {
        assert!(is_cas_conflict(&PublishError::new(
            PublishErrorKind::WrongLastSequence
        )));
        assert!(is_cas_conflict(&server_error(10071)));
        assert!(is_cas_conflict(&server_error(10164)));
        assert!(!is_cas_conflict(&server_error(10077)));
        assert!(!is_cas_conflict(&PublishError::new(
            PublishErrorKind::TimedOut
        )));
        assert!(!is_cas_conflict(&PublishError::new(
            PublishErrorKind::Other
        )));
    }
}
