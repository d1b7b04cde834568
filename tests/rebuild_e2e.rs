//! Rebuild with a changed reducer while events keep flowing: the new version builds beside the
//! live one, readers (following the alias) never see an empty or half-built model, and after
//! promotion the new model equals a replay of the stream through the new reducer.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_nats::jetstream;
use common::*;
use serde_json::{Value, json};

const KEYS: usize = 40;

fn projection(version: u32, reducer: &str) -> String {
    format!(
        "[[projection]]\nname = \"docs\"\nversion = {version}\nstream = \"DOCS\"\nkey = \"{{data.k}}\"\n\
         reducer = \"{reducer}\"\nkv_bucket = \"docs\"\nbatch = 32\nlag_sample_interval = \"200ms\"\n"
    )
}

/// The bucket readers use and its version: the alias, or the configured name (v1).
async fn resolve(js: &jetstream::Context) -> (String, u64) {
    match nats_projector::alias::resolve(js, "docs").await {
        Ok(Some(alias)) => (alias.bucket, u64::from(alias.version)),
        _ => ("docs".into(), 1),
    }
}

/// Reads every key like a reader does (one get each); returns how many exist and the newest
/// sequence among them, checking each came from `version`.
async fn read_all(
    js: &jetstream::Context,
    bucket: &str,
    version: u64,
) -> Result<(usize, u64), String> {
    let kv = js
        .get_key_value(bucket)
        .await
        .map_err(|e| format!("{bucket}: {e}"))?;
    let (mut found, mut newest) = (0, 0);
    for k in 0..KEYS {
        if let Some(bytes) = kv.get(k.to_string()).await.map_err(|e| e.to_string())? {
            let value: Value = serde_json::from_slice(&bytes).map_err(|e| e.to_string())?;
            if value["version"] != version {
                return Err(format!(
                    "{bucket} key {k} holds version {}",
                    value["version"]
                ));
            }
            newest = newest.max(value["last_applied_stream_seq"].as_u64().unwrap_or(0));
            found += 1;
        }
    }
    Ok((found, newest))
}

/// How far the model readers follow may be behind the live v1 model, read just before it, while
/// events flow (a few batches). Measured against v1 rather than the stream: both projections
/// share the disk, so an fsync stall delays both alike, while a version promoted before it
/// caught up would be hundreds of events behind v1.
const FRESH: u64 = 300;

/// Events published before the live projection starts (v2 replays them all when it is built).
const HISTORY: usize = 6_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuild_with_a_changed_reducer_promotes_without_an_outage() {
    let server = NatsServer::start();
    let (_client, js) = server.jetstream().await;
    create_stream(&js, "DOCS", &["docs.>"]).await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let v1 = write_config(&server, dir.path(), port, &projection(1, "merge"));
    let v2_dir = tempfile::tempdir().unwrap();
    // The operator's edit: a new reducer, version bumped (same store, same listener).
    let v2 = v2_dir.path().join("v2.toml");
    std::fs::write(
        &v2,
        std::fs::read_to_string(&v1)
            .unwrap()
            .replace(&projection(1, "merge"), &projection(2, "latest")),
    )
    .unwrap();

    // Every key exists from the start, so a complete model always has all of them. The history
    // behind the seeds makes v2's catch-up last many reader cycles, so that a version promoted
    // before it caught up would be seen far behind v1.
    let seed = (0..KEYS)
        .map(|k| {
            (
                "docs.x".to_owned(),
                cloudevent(
                    &format!("seed{k}"),
                    "t",
                    json!({"k": k, "n": -1, "seed": true}),
                ),
            )
        })
        .chain((0..HISTORY).map(|n| {
            (
                "docs.x".to_owned(),
                cloudevent(
                    &format!("h{n}"),
                    "t",
                    json!({"k": n % KEYS, "h": n, format!("g{}", n % 3): n}),
                ),
            )
        }))
        .collect();
    publish_all(&js, seed).await;
    let log = dir.path().join("projector.log");
    let live = Child2::run_with_log_level(&v1, "info", &log);
    wait_drained(&js, "DOCS", "projector__docs_v1", Duration::from_secs(30)).await;

    // Readers: always resolve the alias, and must always find every key.
    let stop = Arc::new(AtomicBool::new(false));
    // Reads completed so far (the test waits for reads that start after the promotion).
    let done_reads = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let reader = {
        let (js, stop, done_reads) = (js.clone(), stop.clone(), done_reads.clone());
        tokio::spawn(async move {
            let mut reads = 0;
            let mut buckets = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                // The live model first: whatever the alias points at must not be far behind it.
                let (_, live_newest) = read_all(&js, "docs", 1).await?;
                let (bucket, version) = resolve(&js).await;
                let (count, newest) = read_all(&js, &bucket, version).await?;
                if count != KEYS || newest + FRESH < live_newest {
                    return Err(format!(
                        "readers saw {count} of {KEYS} keys in {bucket}, the newest at \
                        sequence {newest} while the live model was at {live_newest}: a half-built \
                        model"
                    ));
                }
                if buckets.last() != Some(&bucket) {
                    buckets.push(bucket);
                }
                reads += 1;
                done_reads.store(reads, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Ok((reads, buckets))
        })
    };
    // Events keep flowing during the rebuild.
    let publisher = {
        let js = js.clone();
        tokio::spawn(async move {
            for round in 0..30 {
                let batch = (0..100)
                    .map(|i| {
                        let n = round * 100 + i;
                        (
                            "docs.x".to_owned(),
                            cloudevent(
                                &format!("e{n}"),
                                "t",
                                json!({"k": n % KEYS, "n": n, format!("f{}", n % 3): n}),
                            ),
                        )
                    })
                    .collect();
                publish_all(&js, batch).await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(800)).await;
    let (code, out, err) = run_cli(&[
        "rebuild",
        "--config",
        v2.to_str().unwrap(),
        "docs",
        "--promote",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("caught up and promoted"), "{out}");
    publisher.await.unwrap();
    wait_drained(&js, "DOCS", "projector__docs_v1", Duration::from_secs(60)).await;
    wait_drained(&js, "DOCS", "projector__docs_v2", Duration::from_secs(60)).await;
    // Readers must follow the promotion: let them finish two reads that began after it (both
    // durables can be drained already when the CLI returns).
    let promoted_at = done_reads.load(Ordering::SeqCst);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while done_reads.load(Ordering::SeqCst) < promoted_at + 2
        && std::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::SeqCst);
    let (reads, buckets) = match reader.await.unwrap() {
        Ok(seen) => seen,
        Err(err) => panic!(
            "{err}\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        ),
    };
    assert!(reads > 20, "the readers kept reading ({reads})");
    assert_eq!(
        buckets,
        ["docs", "docs_v2"],
        "readers switched once, from v1 to v2"
    );

    // v2 equals a replay of the whole stream through `latest`; v1 (kept) through `merge`.
    let stream = js.get_stream("DOCS").await.unwrap();
    let last = stream.cached_info().state.last_sequence;
    let mut latest: BTreeMap<String, (Value, u64)> = BTreeMap::new();
    let mut merged: BTreeMap<String, Value> = BTreeMap::new();
    for seq in 1..=last {
        let m = stream
            .direct_get(seq)
            .await
            .or(stream.get_raw_message(seq).await)
            .unwrap();
        let event: Value = serde_json::from_slice(&m.payload).unwrap();
        let key = event["data"]["k"].to_string();
        latest.insert(key.clone(), (event["data"].clone(), seq));
        let target = merged.entry(key).or_insert_with(|| json!({}));
        nats_projector::reduce::merge_patch(target, event["data"].clone());
    }
    let (v2_live, _) = kv_snapshot(&js, "docs_v2").await;
    let (v1_live, _) = kv_snapshot(&js, "docs").await;
    assert_eq!(v2_live.len(), KEYS);
    for (key, (data, seq)) in &latest {
        assert_eq!(&v2_live[key]["state"], data, "v2 {key}");
        assert_eq!(v2_live[key]["last_applied_stream_seq"], json!(seq));
        assert_eq!(v2_live[key]["version"], 2);
        assert_eq!(
            v1_live[key]["state"], merged[key],
            "v1 {key} kept and current"
        );
    }
    // Both versions run in the process; the config names v1, so status answers for v1.
    let (code, out, _) = run_cli(&["status", "--config", v2.to_str().unwrap(), "--json"]);
    assert_eq!(code, 0);
    assert!(out.contains("projector__docs_v2"), "{out}");
    // Rebuilding the live version again is refused.
    let (code, _, err) = run_cli(&["rebuild", "--config", v2.to_str().unwrap(), "docs"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("not newer than the live v2"), "{err}");
    live.stop();
}
