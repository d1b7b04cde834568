//! Read-model aliases: how readers find the live version of a projection.
//!
//! Version 1 of a projection writes the configured `kv_bucket`; version N >= 2 writes
//! `<kv_bucket>_v<N>` (a rebuild never writes where readers read). The KV bucket
//! [`ALIAS_BUCKET`] maps each configured `kv_bucket` name to the bucket readers should use:
//!
//! ```json
//! {"bucket": "orders_view_v2", "projection": "orders", "version": 2, "promoted_unix_ms": 1764...}
//! ```
//!
//! Readers get key `<kv_bucket>` from `projector_aliases` (or watch it) and read the bucket it
//! names, falling back to `<kv_bucket>` itself when the key does not exist. Promotion is one
//! compare-and-set put of that key: readers switch atomically, from a complete model to a
//! complete (caught-up) one.

use async_nats::jetstream::{self, kv};
use serde::{Deserialize, Serialize};

/// The KV bucket holding the aliases.
pub const ALIAS_BUCKET: &str = "projector_aliases";

/// Where an alias points.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Alias {
    /// The physical bucket readers should read.
    pub bucket: String,
    /// The projection.
    pub projection: String,
    /// Its version behind that bucket.
    pub version: u32,
    /// When it was promoted, Unix ms.
    pub promoted_unix_ms: u64,
}

async fn bucket(js: &jetstream::Context) -> Result<kv::Store, String> {
    if let Ok(store) = js.get_key_value(ALIAS_BUCKET).await {
        return Ok(store);
    }
    match js
        .create_key_value(kv::Config {
            bucket: ALIAS_BUCKET.into(),
            description: "nats-projector read-model aliases".into(),
            history: 5,
            ..Default::default()
        })
        .await
    {
        Ok(store) => Ok(store),
        Err(err) => js
            .get_key_value(ALIAS_BUCKET)
            .await
            .map_err(|_| format!("alias bucket {ALIAS_BUCKET}: {err}")),
    }
}

/// The alias of a configured bucket name, when one was promoted.
pub async fn resolve(js: &jetstream::Context, logical: &str) -> Result<Option<Alias>, String> {
    let Ok(store) = js.get_key_value(ALIAS_BUCKET).await else {
        return Ok(None);
    };
    match store.get(logical).await {
        Ok(Some(bytes)) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| format!("alias {logical}: {e}")),
        Ok(None) => Ok(None),
        Err(err) => Err(format!("alias {logical}: {err}")),
    }
}

/// Points the alias of `logical` at `alias.bucket`, atomically (compare-and-set on the
/// alias's revision, so two promotions cannot interleave). Refuses to move it to an older
/// version.
pub async fn promote(js: &jetstream::Context, logical: &str, alias: &Alias) -> Result<(), String> {
    let store = bucket(js).await?;
    let current = store
        .entry(logical)
        .await
        .map_err(|e| format!("alias {logical}: {e}"))?;
    let revision = match &current {
        Some(entry) if entry.operation == kv::Operation::Put => {
            if let Ok(live) = serde_json::from_slice::<Alias>(&entry.value) {
                if live.version > alias.version {
                    return Err(format!(
                        "alias {logical} already points at version {} ({}), newer than {}",
                        live.version, live.bucket, alias.version
                    ));
                }
            }
            entry.revision
        }
        Some(entry) => entry.revision,
        None => 0,
    };
    let value = serde_json::to_vec(alias).map_err(|e| e.to_string())?;
    store
        .update(logical, value.into(), revision)
        .await
        .map(|_| ())
        .map_err(|e| format!("promote alias {logical}: {e}"))
}
