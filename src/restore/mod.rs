//! Rebuilding a projection's local store: from a snapshot, from the KV bucket, or by replay.
//!
//! KV is a valid source when the durable consumer exists: a message is acked only after KV
//! acknowledged its effect, so every message at or below the durable's ack floor is in KV, with
//! its state and sequence (tombstones included, in the payload of the KV delete). Dedupe
//! markers are not in KV; they are re-derived from the stream's messages inside the dedupe
//! window before the floor.

use async_nats::jetstream::{
    self,
    consumer::{DeliverPolicy, pull},
    kv::Operation,
    stream::Stream,
};
use sha2::{Digest, Sha256};

use crate::consume::{self, NatsError};
use crate::pipeline::gap::{self, Gap};
use crate::spec::Spec;
use crate::store::{Checkpoint, Contents, KvValue, Record};

/// Messages read back to re-derive dedupe markers, at most.
const MARKER_SCAN_LIMIT: usize = 1_000_000;

/// Checks that `stream` still continues `checkpoint`: same stream (`created`), not shorter, the
/// message at the checkpoint unchanged, and nothing after it removed (`seq + 1` still held).
pub async fn continues(stream: &mut Stream, checkpoint: &Checkpoint) -> Result<(), RestoreError> {
    let info = stream
        .info()
        .await
        .map_err(|e| RestoreError::Nats(e.to_string()))?;
    let observed = gap::Observed {
        created_ns: info.created.unix_timestamp_nanos(),
        first_seq: info.state.first_sequence,
        last_seq: info.state.last_sequence,
        ack_floor: None,
        // Whatever the filter, a removed message right after the checkpoint cannot be ruled
        // out: refuse rather than resume past a hole.
        unfiltered: true,
    };
    gap::check(checkpoint, &observed)?;
    gap::check_message(stream, checkpoint).await?;
    Ok(())
}

/// Why a restore is impossible.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RestoreError {
    /// The stream does not continue the restored state: fail closed (exit 3).
    #[error(transparent)]
    Gap(#[from] Gap),
    /// NATS failed.
    #[error("{0}")]
    Nats(String),
    /// The source is unusable.
    #[error("{0}")]
    Source(String),
}

impl From<NatsError> for RestoreError {
    fn from(err: NatsError) -> Self {
        RestoreError::Nats(err.to_string())
    }
}

/// Re-creates the durable so that it delivers from `after + 1` (or from the start when 0).
pub async fn reset_durable(stream: &Stream, spec: &Spec, after: u64) -> Result<(), RestoreError> {
    if let Err(err) = stream.delete_consumer(&spec.durable).await {
        let missing = matches!(
            err.kind(),
            jetstream::stream::ConsumerErrorKind::JetStream(e)
                if e.error_code() == jetstream::ErrorCode::CONSUMER_NOT_FOUND
        );
        if !missing {
            return Err(RestoreError::Nats(format!(
                "delete consumer {}: {err}",
                spec.durable
            )));
        }
    }
    let mut config = consume::consumer_config(spec, after);
    if after == 0 {
        config.deliver_policy = DeliverPolicy::All;
    }
    stream
        .create_consumer::<pull::Config>(config)
        .await
        .map_err(|e| RestoreError::Nats(format!("create consumer {}: {e}", spec.durable)))?;
    Ok(())
}

/// Builds the store content of a projection from its KV bucket, at the durable's ack floor.
pub async fn from_kv(
    js: &jetstream::Context,
    stream: &Stream,
    spec: &Spec,
    floor: u64,
) -> Result<Contents, RestoreError> {
    let Some(bucket) = spec.kv_bucket() else {
        return Err(RestoreError::Source(
            "the projection has no kv_bucket".into(),
        ));
    };
    let entries = crate::kv::verify::kv_entries(js, &bucket)
        .await
        .map_err(RestoreError::Nats)?;
    let mut records = Vec::with_capacity(entries.len());
    let mut skipped = 0usize;
    for (key, (operation, bytes)) in entries {
        let Ok(value) = serde_json::from_slice::<KvValue>(&bytes) else {
            skipped += 1;
            continue;
        };
        if value.projection != spec.config.name || value.version != spec.config.version {
            skipped += 1;
            continue;
        }
        let state = match (operation, value.deleted, value.state) {
            (Operation::Put, false, Some(state)) => {
                Some(serde_json::to_vec(&state).map_err(|e| RestoreError::Source(e.to_string()))?)
            }
            (Operation::Delete | Operation::Purge, _, _) | (_, true, _) => None,
            _ => {
                skipped += 1;
                continue;
            }
        };
        records.push((
            key,
            Record {
                state,
                seq: value.last_applied_stream_seq,
                event_id: value.last_applied_event_id,
                epoch: value.epoch,
                kv_revision: 0,
            },
        ));
    }
    if skipped > 0 {
        tracing::warn!(skipped, kv_bucket = %bucket, "KV entries without a projector value of this projection were skipped");
    }
    let info = stream.cached_info();
    let at_floor = message_at(stream, floor).await;
    let (floor_ms, floor_hash) = at_floor.map_or((0, [0u8; 32]), |(ms, payload)| {
        (ms, Sha256::digest(&payload).into())
    });
    let markers = markers_before(stream, spec, floor, floor_ms).await?;
    Ok(Contents {
        checkpoint: Checkpoint {
            stream: spec.config.stream.clone(),
            stream_created_ns: info.created.unix_timestamp_nanos(),
            last_seq: floor,
            last_publish_ms: floor_ms,
            last_payload_sha256: floor_hash,
            applied: records.iter().filter(|(_, r)| !r.is_deleted()).count() as u64,
            acked_floor: floor,
            acked_floor_ms: floor_ms,
        },
        records,
        markers,
        dead: Vec::new(),
    })
}

async fn message_at(stream: &Stream, seq: u64) -> Option<(u64, bytes::Bytes)> {
    if seq == 0 {
        return None;
    }
    let message = if stream.cached_info().config.allow_direct {
        stream.direct_get(seq).await.ok()?
    } else {
        stream.get_raw_message(seq).await.ok()?
    };
    let ms = (message.time.unix_timestamp_nanos() / 1_000_000).max(0) as u64;
    Some((ms, message.payload))
}

/// Dedupe markers for the events published within the dedupe window before `floor`: every
/// decodable event there counts as seen (an event that was a duplicate or stale then was not
/// applied, and a re-published copy of it must not be either).
async fn markers_before(
    stream: &Stream,
    spec: &Spec,
    floor: u64,
    floor_ms: u64,
) -> Result<Vec<(u64, String, u64, u64)>, RestoreError> {
    let window = spec.dedupe_window_ms;
    if window == 0 || floor == 0 {
        return Ok(Vec::new());
    }
    let since = floor_ms.saturating_sub(window);
    let first = stream.cached_info().state.first_sequence.max(1);
    // Binary search for the first message published at or after `since`.
    let (mut lo, mut hi) = (first, floor);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        let ms = consume::read_range(stream, &[], mid - 1, floor, 1)
            .await?
            .first()
            .map_or(u64::MAX, |m| m.publish_ms);
        if ms < since {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    let filters = spec.config.filter_subjects.clone();
    let mut markers = Vec::new();
    let mut cursor = lo.saturating_sub(1);
    let mut scanned = 0usize;
    while cursor < floor && scanned < MARKER_SCAN_LIMIT {
        let batch = consume::read_range(stream, &filters, cursor, floor, 1000).await?;
        let Some(last) = batch.last().map(|m| m.seq) else {
            break;
        };
        scanned += batch.len();
        for m in &batch {
            if let Ok(prepared) = spec.prepare(&m.view()) {
                markers.push((
                    crate::store::dedupe_bucket(m.publish_ms, window),
                    prepared.event.dedupe_id().to_owned(),
                    m.seq,
                    m.publish_ms,
                ));
            }
        }
        cursor = last;
    }
    if scanned >= MARKER_SCAN_LIMIT {
        tracing::warn!(
            scanned,
            "the dedupe window holds more messages than re-derived; markers are partial"
        );
    }
    markers.sort();
    markers.dedup_by(|a, b| a.0 == b.0 && a.1 == b.1);
    Ok(markers)
}

/// Seeds a (new) projection version from a snapshot of that same version: verifies it, checks
/// the stream still continues it, loads it into the store, and starts the durable after it.
pub async fn seed_from_snapshot(
    js: &jetstream::Context,
    store: &std::sync::Arc<crate::store::Store>,
    spec: &std::sync::Arc<Spec>,
    path: &std::path::Path,
) -> Result<u64, String> {
    let snapshot = crate::snapshot::read_file(path).map_err(|e| e.to_string())?;
    let h = &snapshot.header;
    if h.projection != spec.config.name || h.version != spec.config.version {
        return Err(format!(
            "the snapshot is of {} v{}, not {} v{}",
            h.projection, h.version, spec.config.name, spec.config.version
        ));
    }
    let mut stream = consume::stream_of(js, &spec.config.stream)
        .await
        .map_err(|e| e.to_string())?;
    continues(&mut stream, &snapshot.contents.checkpoint)
        .await
        .map_err(|e| format!("the stream no longer continues the snapshot: {e}"))?;
    let seq = h.seq;
    let (s, sp, contents) = (store.clone(), spec.clone(), snapshot.contents);
    tokio::task::spawn_blocking(move || s.import(&sp.namespace, &contents, true))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    reset_durable(&stream, spec, seq)
        .await
        .map_err(|e| e.to_string())?;
    Ok(seq)
}
