//! Bounded replays for backfills: a sequence (or time) range of the stream applied to the read
//! model through the normal apply path (sequence guards, dedupe, epochs), without moving the
//! checkpoint or the durable consumer, and without dead-lettering again.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_nats::jetstream::{self, stream::Stream};
use serde::{Deserialize, Serialize};

use crate::consume;
use crate::kv::{KvWriter, Written};
use crate::spec::Spec;
use crate::store::{Housekeeping, Item, Outcome, Store};

/// What to replay.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Range {
    /// First stream sequence (inclusive).
    pub from_seq: Option<u64>,
    /// Last stream sequence (inclusive).
    pub to_seq: Option<u64>,
    /// Earliest publish time (inclusive), Unix ms.
    pub from_ms: Option<u64>,
    /// Latest publish time (inclusive), Unix ms.
    pub to_ms: Option<u64>,
}

/// What a replay did (or, for a dry run, would do).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// The resolved first sequence.
    pub from_seq: u64,
    /// The resolved last sequence.
    pub to_seq: u64,
    /// Messages of the projection in the range.
    pub count: u64,
    /// Whether nothing was written.
    pub dry_run: bool,
    /// Events applied.
    pub applied: u64,
    /// Events already in the read model (or duplicates).
    pub duplicate: u64,
    /// Events refused for a stale epoch.
    pub stale_epoch: u64,
    /// Events that cannot be applied (already dead-lettered by the live run).
    pub poison: u64,
}

/// Parses an RFC 3339 time (`2026-11-23T10:00:00Z`) into Unix ms.
pub fn parse_time(text: &str) -> Result<u64, String> {
    humantime::parse_rfc3339_weak(text)
        .map_err(|e| format!("{text:?} is not a time like 2026-11-23T10:00:00Z: {e}"))?
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .map_err(|_| format!("{text:?} is before 1970"))
}

/// The first sequence in `[lo, hi]` whose message was published at or after `ms`.
async fn first_at_or_after(stream: &Stream, lo: u64, hi: u64, ms: u64) -> Result<u64, String> {
    let (mut lo, mut hi) = (lo, hi.saturating_add(1));
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        let found = consume::read_range(stream, &[], mid.saturating_sub(1), u64::MAX, 1)
            .await
            .map_err(|e| e.to_string())?;
        match found.first() {
            Some(m) if m.publish_ms < ms => lo = m.seq + 1,
            _ => hi = mid,
        }
    }
    Ok(lo)
}

/// Resolves a range into stream sequences (time windows are mapped to sequences first).
pub async fn resolve(stream: &mut Stream, range: &Range) -> Result<(u64, u64), String> {
    let info = stream.info().await.map_err(|e| e.to_string())?;
    let (first, last) = (info.state.first_sequence.max(1), info.state.last_sequence);
    let mut from = range.from_seq.unwrap_or(first).max(first);
    let mut to = range.to_seq.unwrap_or(last).min(last);
    if let Some(ms) = range.from_ms {
        from = from.max(first_at_or_after(stream, first, last, ms).await?);
    }
    if let Some(ms) = range.to_ms {
        let after = first_at_or_after(stream, first, last, ms.saturating_add(1)).await?;
        to = to.min(after.saturating_sub(1));
    }
    Ok((from, to))
}

/// Counts, then (unless `dry_run`) applies the projection's messages in the range.
pub async fn run(
    js: &jetstream::Context,
    store: &Arc<Store>,
    spec: &Arc<Spec>,
    range: &Range,
    dry_run: bool,
    announce: impl FnOnce(&Report),
) -> Result<Report, String> {
    let mut stream = consume::stream_of(js, &spec.config.stream)
        .await
        .map_err(|e| e.to_string())?;
    let (from, to) = resolve(&mut stream, range).await?;
    let filters = spec.config.filter_subjects.clone();
    let mut report = Report {
        from_seq: from,
        to_seq: to,
        dry_run,
        ..Report::default()
    };
    let mut cursor = from.saturating_sub(1);
    while from <= to && cursor < to {
        let chunk = consume::read_range(&stream, &filters, cursor, to, 4096)
            .await
            .map_err(|e| e.to_string())?;
        let Some(last) = chunk.last().map(|m| m.seq) else {
            break;
        };
        report.count += chunk.len() as u64;
        cursor = last;
    }
    // The count is out before anything is written.
    announce(&report);
    if dry_run || report.count == 0 {
        return Ok(report);
    }
    let kv = match consume::ensure_kv(js, spec)
        .await
        .map_err(|e| e.to_string())?
    {
        Some(kv) => {
            let bucket = spec.kv_bucket().unwrap_or_default();
            Some(KvWriter::new(js.clone(), kv, &bucket, 256))
        }
        None => None,
    };
    let mut cursor = from.saturating_sub(1);
    while cursor < to {
        let chunk = consume::read_range(&stream, &filters, cursor, to, spec.config.batch)
            .await
            .map_err(|e| e.to_string())?;
        let Some(last) = chunk.last().map(|m| m.seq) else {
            break;
        };
        cursor = last;
        let items: Vec<Item> = chunk.iter().map(|m| m.item(spec)).collect();
        let (s, sp) = (store.clone(), spec.clone());
        let applied = tokio::task::spawn_blocking(move || s.backfill(&sp, items))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        for outcome in &applied.outcomes {
            match outcome {
                Outcome::Applied => report.applied += 1,
                Outcome::Duplicate | Outcome::AlreadyDead => report.duplicate += 1,
                Outcome::StaleEpoch => report.stale_epoch += 1,
                Outcome::Poison(_) => report.poison += 1,
            }
        }
        if let Some(kv) = &kv {
            let mut pending = applied.kv_writes;
            let mut confirmed = Vec::new();
            for attempt in 0.. {
                let (done, failed, _) = kv.write_all(&pending).await;
                confirmed.extend(done.into_iter().map(|w| match w {
                    Written::Ok(c) | Written::Superseded(c) => c,
                }));
                if failed.is_empty() {
                    break;
                }
                if attempt >= 10 {
                    return Err(format!("KV unavailable: {}", failed[0]));
                }
                pending.retain(|w| failed.iter().any(|f| f.key == w.key));
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            let house = Housekeeping {
                kv_confirmed: confirmed,
                ..Housekeeping::default()
            };
            let (s, sp) = (store.clone(), spec.clone());
            tokio::task::spawn_blocking(move || s.housekeep(&sp, &house))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
        }
    }
    Ok(report)
}
