//! `verify`: KV compared with the local store, key by key.

use std::collections::BTreeMap;
use std::sync::Arc;

use async_nats::jetstream::{self, kv::Operation};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::spec::Spec;
use crate::store::{KvValue, Store};

/// At most this many differences are listed (all are counted).
const LISTED: usize = 100;

/// The result of a comparison.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// The projection.
    pub projection: String,
    /// Records in the store (tombstones included).
    pub store_keys: u64,
    /// Keys in KV (deleted ones included).
    pub kv_keys: u64,
    /// Keys equal on both sides.
    pub matching: u64,
    /// Keys whose KV write is still in the outbox (not a difference).
    pub pending: u64,
    /// Number of differences.
    pub differences: u64,
    /// The first differences, one line each.
    pub listed: Vec<String>,
}

impl Report {
    /// Whether KV equals the store (pending outbox writes aside).
    pub fn is_clean(&self) -> bool {
        self.differences == 0
    }
}

/// The last entry of every key of a bucket, deleted keys included.
pub async fn kv_entries(
    js: &jetstream::Context,
    bucket: &str,
) -> Result<BTreeMap<String, (Operation, Vec<u8>)>, String> {
    let kv = js
        .get_key_value(bucket)
        .await
        .map_err(|e| format!("KV bucket {bucket}: {e}"))?;
    let mut out = BTreeMap::new();
    let status = kv.status().await.map_err(|e| format!("KV status: {e}"))?;
    if status.info.state.messages == 0 {
        return Ok(out);
    }
    let mut watch = kv
        .watch_with_history(">")
        .await
        .map_err(|e| format!("KV watch: {e}"))?;
    while let Some(entry) = watch.next().await {
        let entry = entry.map_err(|e| format!("KV watch: {e}"))?;
        let done = entry.delta == 0;
        out.insert(entry.key, (entry.operation, entry.value.to_vec()));
        if done {
            break;
        }
    }
    Ok(out)
}

/// Compares the projection's KV bucket with its store.
pub async fn verify(
    store: &Arc<Store>,
    js: &jetstream::Context,
    spec: &Spec,
) -> Result<Report, String> {
    let Some(bucket) = spec.kv_bucket() else {
        return Err(format!("projection {} has no kv_bucket", spec.name()));
    };
    let (s, ns) = (store.clone(), spec.namespace.clone());
    let (records, outbox) = tokio::task::spawn_blocking(move || {
        Ok::<_, crate::store::StoreError>((s.records(&ns)?, s.outbox(&ns)?))
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| e.to_string())?;
    let pending: std::collections::HashSet<String> = outbox.into_iter().map(|(k, _)| k).collect();
    let mut kv = kv_entries(js, &bucket).await?;
    let mut report = Report {
        projection: spec.name().to_owned(),
        store_keys: records.len() as u64,
        kv_keys: kv.len() as u64,
        ..Report::default()
    };
    let differ = |report: &mut Report, line: String| {
        report.differences += 1;
        if report.listed.len() < LISTED {
            report.listed.push(line);
        }
    };
    for (key, record) in records {
        let expected: Value =
            serde_json::from_slice(&record.kv_value(&spec.config.name, spec.config.version))
                .map_err(|e| e.to_string())?;
        let problem = match kv.remove(&key) {
            None => Some(format!(
                "{key}: in the store (seq {}) but not in KV",
                record.seq
            )),
            Some((Operation::Put, bytes)) => {
                let actual: Option<Value> = serde_json::from_slice(&bytes).ok();
                if record.is_deleted() {
                    Some(format!("{key}: deleted in the store but live in KV"))
                } else if actual.as_ref() != Some(&expected) {
                    Some(format!(
                        "{key}: KV value differs from the store (seq {})",
                        record.seq
                    ))
                } else {
                    None
                }
            }
            Some((_, bytes)) => {
                let held = serde_json::from_slice::<KvValue>(&bytes).ok();
                if !record.is_deleted() {
                    Some(format!(
                        "{key}: live in the store (seq {}) but deleted in KV",
                        record.seq
                    ))
                } else if held.is_some_and(|v| v.last_applied_stream_seq != record.seq) {
                    Some(format!("{key}: tombstone sequences differ"))
                } else {
                    None
                }
            }
        };
        match problem {
            None => report.matching += 1,
            // Its KV write is still on its way: not a difference.
            Some(_) if pending.contains(&key) => report.pending += 1,
            Some(line) => differ(&mut report, line),
        }
    }
    for (key, (op, _)) in kv {
        if op == Operation::Put {
            differ(&mut report, format!("{key}: in KV but not in the store"));
        }
    }
    Ok(report)
}
