//! `kill -9` loop: the real binary is killed repeatedly while a publisher keeps adding events.
//! A KV watcher asserts throughout that no key's `last_applied_stream_seq` ever decreases; at
//! the end KV == store == a model computed from what was published.
//!
//! Bounded: 12,000 events over 300 keys, 8 kills, loopback only.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use nats_projector::reduce::merge_patch;
use serde_json::{Value, json};

const EVENTS: usize = 12_000;
const KEYS: usize = 300;
const KILL_AFTER_MS: [u64; 8] = [350, 800, 250, 1100, 500, 300, 900, 450];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loop_under_load_converges_without_regression() {
    kill_9_loop("explicit", true).await;
}

/// The same with `ack_policy = "all"`: one ack per completed group must never cover an event
/// that is not applied, whatever the kills cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loop_with_bulk_acks_converges_without_regression() {
    kill_9_loop("all", true).await;
}

/// Bulk acks without KV: catch-ups commit batches without an fsync, their ack held for the
/// next durable commit; a kill loses those commits, never an event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loop_with_bulk_acks_and_no_kv_converges() {
    kill_9_loop("all", false).await;
}

/// `kv`: with a KV bucket (watched for regressions and checked at the end), or the store only.
async fn kill_9_loop(ack_policy: &str, kv: bool) {
    let server = NatsServer::start();
    let (_client, js) = server.jetstream().await;
    create_stream(&js, "LOAD", &["load.>"]).await;
    let watch = if kv {
        create_bucket(&js, "load_view").await;
        Some(MonotonicWatch::start(&js, "load_view").await)
    } else {
        None
    };
    let bucket = if kv { "kv_bucket = \"load_view\"" } else { "" };

    let dir = tempfile::tempdir().unwrap();
    let projection = format!(
        r#"
        [[projection]]
        name = "load"
        stream = "LOAD"
        key = "k.{{data.k}}"
        reducer = "merge"
        {bucket}
        batch = 128
        ack_wait = "2s"
        ack_policy = "{ack_policy}"
        "#
    );
    let port = free_port();
    let config = write_config(&server, dir.path(), port, &projection);
    let log = dir.path().join("projector.log");

    // The publisher: steady batches, recording what the stream acknowledged.
    let publisher = {
        let js = js.clone();
        tokio::spawn(async move {
            let mut published: Vec<(u64, usize, Value)> = Vec::with_capacity(EVENTS);
            for chunk in 0..EVENTS / 100 {
                let mut acks = Vec::new();
                for i in chunk * 100..(chunk + 1) * 100 {
                    let key = (i * 7919) % KEYS;
                    let data = json!({"k": key, "n": i, format!("f{}", i % 7): i});
                    let payload = cloudevent(&format!("e{i}"), "upd", data.clone());
                    let ack = js
                        .publish(format!("load.{key}"), payload.into())
                        .await
                        .unwrap();
                    acks.push((ack, key, data));
                }
                for (ack, key, data) in acks {
                    let seq = ack.await.unwrap().sequence;
                    published.push((seq, key, data));
                }
                tokio::time::sleep(Duration::from_millis(40)).await;
            }
            published
        })
    };

    // Commits without an fsync seen just before the kills (without KV, catch-ups make them).
    let mut unsynced = 0.0;
    let unsynced_commits = || metric(port, "projector_store_unsynced_commits_total", &[]);
    for wait in KILL_AFTER_MS {
        let mut projector = Child2::run(&config, &[], &log);
        tokio::time::sleep(Duration::from_millis(wait)).await;
        unsynced += unsynced_commits().await.unwrap_or(0.0);
        projector.kill9();
    }
    let published = publisher.await.unwrap();
    let projector = Child2::run(&config, &[], &log);
    wait_drained(&js, "LOAD", "projector__load_v1", Duration::from_secs(120)).await;
    unsynced += unsynced_commits().await.unwrap_or(0.0);
    if !kv && ack_policy == "all" {
        assert!(unsynced > 0.0, "catch-ups should commit without an fsync");
    }
    let durable = js.get_stream("LOAD").await.unwrap();
    let info = durable.consumer_info("projector__load_v1").await.unwrap();
    let policy = serde_json::to_value(info.config.ack_policy).unwrap();
    assert_eq!(policy, json!(ack_policy), "the durable's ack policy");
    projector.stop();

    // The model: merge every key's events in stream order.
    let mut model: BTreeMap<String, (Value, u64, String)> = BTreeMap::new();
    let mut ordered = published;
    ordered.sort_by_key(|(seq, _, _)| *seq);
    for (seq, key, data) in ordered {
        let entry = model
            .entry(format!("k.{key}"))
            .or_insert_with(|| (json!({}), 0, String::new()));
        merge_patch(&mut entry.0, data.clone());
        entry.1 = seq;
        entry.2 = format!("e{}", data["n"]);
    }
    if let Some(watch) = watch {
        let (seen, regressions) = watch.finish().await;
        assert!(
            regressions.is_empty(),
            "keys went backwards: {regressions:?}"
        );
        assert!(seen >= KEYS as u64, "the watcher saw the writes ({seen})");
        let (live, deleted) = kv_snapshot(&js, "load_view").await;
        assert!(deleted.is_empty());
        assert_eq!(live.len(), model.len(), "every key is in KV");
        for (key, (state, seq, id)) in &model {
            let kv = &live[key];
            assert_eq!(&kv["state"], state, "{key} state in KV");
            assert_eq!(kv["last_applied_stream_seq"], json!(seq), "{key} seq in KV");
            assert_eq!(kv["last_applied_event_id"], json!(id), "{key} id in KV");
        }
    }
    let store = nats_projector::store::Store::open(&dir.path().join("store.redb"), 8).unwrap();
    let records = store.records("load@v1").unwrap();
    assert_eq!(records.len(), model.len());
    for (key, record) in records {
        let (state, seq, _) = &model[&key];
        let stored: Value = serde_json::from_slice(record.state.as_ref().unwrap()).unwrap();
        assert_eq!(&stored, state, "{key} state in the store");
        assert_eq!(record.seq, *seq);
    }
    drop(store);
    if kv {
        let (code, out, _) = run_cli(&["verify", "--config", config.to_str().unwrap(), "load"]);
        assert_eq!(code, 0, "{out}");
    }
}
