//! Bounded replays and DLQ replays against a real nats-server.

mod common;

use std::time::Duration;

use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, pull};
use common::*;
use serde_json::json;

fn cfg(path: &std::path::Path) -> &str {
    path.to_str().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bounded_replay_backfills_what_a_late_durable_missed() {
    let server = NatsServer::start();
    let (_client, js) = server.jetstream().await;
    let stream = create_stream(&js, "ORDERS", &["orders.>"]).await;
    let (events, expected) = fixture();
    publish_all(&js, events.clone()).await;
    // The durable was created late: it starts at 4901.
    stream
        .create_consumer(pull::Config {
            durable_name: Some("projector__orders_v1".into()),
            deliver_policy: DeliverPolicy::ByStartSequence {
                start_sequence: 4901,
            },
            ack_policy: AckPolicy::Explicit,
            filter_subject: "orders.event.>".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(&server, dir.path(), 0, FIXTURE_PROJECTION);
    let log = dir.path().join("projector.log");
    let projector = Child2::run(&config, &[], &log);
    wait_orders_drained(&js, Duration::from_secs(60)).await;
    projector.stop();
    let keys = expected["keys"].as_object().unwrap();
    // Keys with no message at all after 4900 (a re-published copy there would have been new
    // to the late durable, and applied).
    let touched_late: std::collections::HashSet<String> = events[4900..]
        .iter()
        .filter_map(|(_, e)| serde_json::from_slice::<serde_json::Value>(e).ok())
        .filter_map(|e| e["data"]["order_id"].as_str().map(str::to_owned))
        .collect();
    let early: Vec<&String> = keys.keys().filter(|k| !touched_late.contains(*k)).collect();
    let (before, _) = kv_snapshot(&js, "orders_view").await;
    let missing = early
        .iter()
        .filter(|k| !before.contains_key(k.as_str()))
        .count();
    assert!(
        missing > 0,
        "keys whose events all came before 4901 are missing"
    );

    // A time window maps to sequences: messages 1000..=2000, by their publish times.
    let time_of = |seq: u64| {
        let js = js.clone();
        async move {
            let s = js.get_stream("ORDERS").await.unwrap();
            let m = s
                .direct_get(seq)
                .await
                .or(s.get_raw_message(seq).await)
                .unwrap();
            let ms = (m.time.unix_timestamp_nanos() / 1_000_000) as u64;
            humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + Duration::from_millis(ms))
                .to_string()
        }
    };
    let (from, to) = (time_of(1000).await, time_of(2000).await);
    let (code, out, err) = run_cli(&[
        "replay",
        "--config",
        cfg(&config),
        "orders",
        "--from-time",
        &from,
        "--to-time",
        &to,
        "--dry-run",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("(dry run: nothing written)"), "{out}");
    let count: u64 = out.split_whitespace().next().unwrap().parse().unwrap();
    assert!(count >= 1001, "a window of at least 1001 messages: {out}");

    let (code, out, err) = run_cli(&[
        "replay",
        "--config",
        cfg(&config),
        "orders",
        "--from-seq",
        "1",
        "--to-seq",
        "4900",
        "--dry-run",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.starts_with("4900 events in stream sequences 1..=4900 (dry run"),
        "{out}"
    );
    let (after_dry, _) = kv_snapshot(&js, "orders_view").await;
    assert_eq!(before, after_dry, "a dry run writes nothing");

    let (code, out, err) = run_cli(&[
        "replay",
        "--config",
        cfg(&config),
        "orders",
        "--from-seq",
        "1",
        "--to-seq",
        "4900",
    ]);
    assert_eq!(code, 0, "{err}");
    let mut lines = out.lines();
    assert!(
        lines
            .next()
            .unwrap()
            .starts_with("4900 events in stream sequences 1..=4900; replaying"),
        "{out}"
    );
    assert!(lines.next().unwrap().starts_with("replayed: "), "{out}");
    let (after, deleted) = kv_snapshot(&js, "orders_view").await;
    for key in early {
        let want = &keys[key.as_str()];
        if want["deleted"] == true {
            assert_eq!(
                deleted[key.as_str()]["last_applied_stream_seq"],
                want["last_applied_stream_seq"]
            );
        } else {
            assert!(
                after.contains_key(key.as_str()),
                "{key} missing after the replay: {out}; deleted: {:?}; want {want}",
                deleted.get(key.as_str())
            );
            assert_eq!(
                after[key.as_str()]["state"],
                want["state"],
                "{key} backfilled"
            );
            assert_eq!(
                after[key.as_str()]["last_applied_stream_seq"],
                want["last_applied_stream_seq"]
            );
        }
    }
    // Replaying the same range again changes nothing.
    let kv_before = js
        .get_key_value("orders_view")
        .await
        .unwrap()
        .status()
        .await
        .unwrap();
    let (code, out, _) = run_cli(&[
        "replay",
        "--config",
        cfg(&config),
        "orders",
        "--from-seq",
        "1",
        "--to-seq",
        "4900",
    ]);
    assert_eq!(code, 0);
    assert!(out.contains("replayed: 0 applied"), "{out}");
    let kv_after = js
        .get_key_value("orders_view")
        .await
        .unwrap()
        .status()
        .await
        .unwrap();
    assert_eq!(
        kv_before.info.state.last_sequence,
        kv_after.info.state.last_sequence
    );
    let (code, _, err) = run_cli(&["replay", "--config", cfg(&config), "orders"]);
    assert_eq!(code, 2, "a replay needs a lower bound: {err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_listed_and_replayed_after_a_fix() {
    let server = NatsServer::start();
    let (_client, js) = server.jetstream().await;
    create_stream(&js, "EV", &["ev.>"]).await;
    let mut messages = Vec::new();
    for i in 0..3 {
        messages.push((
            "ev.a".to_owned(),
            cloudevent(
                &format!("good{i}"),
                "t",
                json!({"id": format!("k{i}"), "v": i}),
            ),
        ));
        // Written by an older producer: the key is under "ident", not "id".
        messages.push((
            "ev.b".to_owned(),
            cloudevent(
                &format!("old{i}"),
                "t",
                json!({"ident": format!("o{i}"), "v": i}),
            ),
        ));
    }
    publish_all(&js, messages).await;
    let dir = tempfile::tempdir().unwrap();
    let projection = "[[projection]]\nname = \"p\"\nstream = \"EV\"\nkey = \"{data.id}\"\nreducer = \"latest\"\nkv_bucket = \"p\"\n";
    let config = write_config(&server, dir.path(), 0, projection);
    let log = dir.path().join("projector.log");
    let projector = Child2::run(&config, &[], &log);
    wait_drained(&js, "EV", "projector__p_v1", Duration::from_secs(30)).await;
    projector.stop();

    let (code, out, err) = run_cli(&["dlq", "list", "--config", cfg(&config), "--json"]);
    assert_eq!(code, 0, "{err}");
    let listed: serde_json::Value = serde_json::from_str(&out).unwrap();
    let listed = listed.as_array().unwrap();
    assert_eq!(listed.len(), 3);
    assert!(listed.iter().all(|l| l["error_code"] == "missing_key"
        && l["subject"] == "ev.b"
        && l["projection"] == "p"));
    let (code, out, _) = run_cli(&["dlq", "list", "--config", cfg(&config)]);
    assert_eq!(code, 0);
    assert!(out.contains("missing_key"), "{out}");

    // The fix: the key template falls back on the old field name via a new projection key.
    std::fs::write(
        &config,
        std::fs::read_to_string(&config)
            .unwrap()
            .replace("{data.id}", "{data.ident}"),
    )
    .unwrap();
    let (code, out, err) = run_cli(&[
        "dlq",
        "replay",
        "--config",
        cfg(&config),
        "--projection",
        "p",
        "--seq",
        "2",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("republished ev.b (was EV seq 2"), "{out}");
    let (code, _, err) = run_cli(&[
        "dlq",
        "replay",
        "--config",
        cfg(&config),
        "--projection",
        "p",
    ]);
    assert_eq!(code, 0, "{err}");
    // Seq 2's dead letter was replayed twice: the source stream deduplicated the second copy.
    let info = js.get_stream("EV").await.unwrap().get_info().await.unwrap();
    assert_eq!(info.state.messages, 9, "6 originals + 3 republished, not 4");
    let projector = Child2::run(&config, &[], &log);
    wait_drained(&js, "EV", "projector__p_v1", Duration::from_secs(30)).await;
    projector.stop();
    let (live, _) = kv_snapshot(&js, "p").await;
    for i in 0..3 {
        assert_eq!(
            live[&format!("o{i}")]["state"]["v"],
            i,
            "dead letter o{i} applied after the fix"
        );
    }
}
