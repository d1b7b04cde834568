//! Event semantics through a real nats-server: every poison kind lands in the DLQ with its
//! code and headers while good events still apply; update → delete → update; duplicate
//! envelope ids counted once by `counter`; stale epochs refused, deleted keys not resurrected.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use async_nats::jetstream;
use common::*;
use futures::StreamExt;
use serde_json::json;

const DRAIN: Duration = Duration::from_secs(60);

async fn dead_letters(js: &jetstream::Context, count: usize) -> Vec<jetstream::Message> {
    let stream = js
        .get_stream("PROJECTOR_DLQ")
        .await
        .expect("DLQ stream exists");
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::Config::default())
        .await
        .unwrap();
    let mut batch = consumer
        .fetch()
        .max_messages(count + 10)
        .expires(Duration::from_secs(2))
        .messages()
        .await
        .unwrap();
    let mut out = Vec::new();
    while let Some(m) = batch.next().await {
        out.push(m.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_poison_kind_is_dead_lettered_while_good_events_apply() {
    let server = NatsServer::start();
    let (_client, js) = server.jetstream().await;
    create_stream(&js, "EV", &["ev.>"]).await;
    let deep = format!("{}{}", "[".repeat(80), "]".repeat(80));
    let poison: Vec<(&str, Vec<u8>)> = vec![
        ("invalid_json", b"{not json".to_vec()),
        ("invalid_envelope", br#"{"hello":"world"}"#.to_vec()),
        ("missing_key", cloudevent("p3", "t", json!({"other": 1}))),
        (
            "bad_key",
            cloudevent("p4", "t", json!({"k": {"nested": true}})),
        ),
        (
            "bad_epoch",
            cloudevent("p5", "t", json!({"k": "a", "e": "not-a-number"})),
        ),
        (
            "too_deep",
            cloudevent(
                "p6",
                "t",
                json!({"k": "a", "x": serde_json::from_str::<serde_json::Value>(&deep).unwrap()}),
            ),
        ),
        (
            "too_large",
            cloudevent("p7", "t", json!({"k": "a", "pad": "x".repeat(5000)})),
        ),
        (
            "reducer_error",
            cloudevent("p8", "t", json!({"k": "a", "e": 1, "amount": "ten"})),
        ),
    ];
    let mut messages = Vec::new();
    for (i, (_, payload)) in poison.iter().enumerate() {
        messages.push((
            "ev.x".to_owned(),
            cloudevent(
                &format!("g{i}"),
                "t",
                json!({"k": "a", "e": 1, "amount": 1}),
            ),
        ));
        messages.push(("ev.x".to_owned(), payload.clone()));
    }
    messages.push((
        "ev.x".to_owned(),
        cloudevent("g-last", "t", json!({"k": "b", "e": 1, "amount": 5})),
    ));
    publish_all(&js, messages).await;

    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = write_config(
        &server,
        dir.path(),
        port,
        r#"
        [[projection]]
        name = "totals"
        stream = "EV"
        key = "{data.k}"
        reducer = "counter"
        sum = "{data.amount}"
        epoch = "{data.e}"
        kv_bucket = "totals"
        max_event_bytes = 4096
        max_depth = 32
        "#,
    );
    let projector = InProcess::start(&config);
    wait_drained(&js, "EV", "projector__totals_v1", DRAIN).await;
    assert_eq!(
        metric(port, "projector_events_total", &[("outcome", "applied")]).await,
        Some(9.0)
    );
    assert_eq!(
        metric(
            port,
            "projector_events_total",
            &[("outcome", "dead_lettered")]
        )
        .await,
        Some(8.0)
    );
    for (code, _) in &poison {
        assert_eq!(
            metric(
                port,
                "projector_dead_letters_total",
                &[("error_code", code)]
            )
            .await,
            Some(1.0),
            "{code}"
        );
    }
    assert_eq!(projector.stop().await, nats_projector::runtime::Exit::Ok);

    let letters = dead_letters(&js, poison.len()).await;
    assert_eq!(
        letters.len(),
        poison.len(),
        "one dead letter per poison event, no more"
    );
    let mut by_seq = BTreeMap::new();
    for m in &letters {
        let h = m.headers.as_ref().expect("dead letters have headers");
        let get = |n: &str| h.get(n).map(|v| v.as_str().to_owned()).unwrap_or_default();
        assert_eq!(get("Projector-Projection"), "totals");
        assert_eq!(get("Projector-Stream"), "EV");
        assert_eq!(get("Projector-Subject"), "ev.x");
        assert_eq!(m.subject.as_str(), "dlq.ev.x");
        assert!(!get("Projector-Reason").is_empty());
        assert!(get("Projector-Deliveries").parse::<u64>().unwrap() >= 1);
        let seq: u64 = get("Projector-Stream-Seq").parse().unwrap();
        by_seq.insert(seq, (get("Projector-Error"), m.payload.to_vec()));
    }
    for (i, (code, payload)) in poison.iter().enumerate() {
        let seq = 2 * i as u64 + 2;
        let (got, original) = &by_seq[&seq];
        assert_eq!(got, code, "stream seq {seq}");
        assert_eq!(original, payload, "the original payload is kept");
    }
    let (live, _) = kv_snapshot(&js, "totals").await;
    assert_eq!(live["a"]["state"], json!({"count": 8, "sum": 8}));
    assert_eq!(live["b"]["state"], json!({"count": 1, "sum": 5}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deletes_duplicates_and_epochs() {
    let server = NatsServer::start();
    let (_client, js) = server.jetstream().await;
    create_stream(&js, "EV", &["ev.>"]).await;
    let e =
        |id: &str, t: &str, data: serde_json::Value| ("ev.x".to_owned(), cloudevent(id, t, data));
    publish_all(
        &js,
        vec![
            // update → delete → update: the second life starts from an empty state.
            e("u1", "upd", json!({"k": "doc", "epoch": 1, "a": 1})),
            e("u2", "del", json!({"k": "doc", "epoch": 1})),
            e("u3", "upd", json!({"k": "doc", "epoch": 1, "b": 2})),
            // A re-published envelope (same id, new sequence) is applied once.
            e("c1", "upd", json!({"k": "dup", "epoch": 1, "n": 1})),
            e("c1", "upd", json!({"k": "dup", "epoch": 1, "n": 1})),
            // Epochs: a newer owner, then a stale one that is refused.
            e("o1", "upd", json!({"k": "own", "epoch": 2, "who": "new"})),
            e("o2", "upd", json!({"k": "own", "epoch": 1, "who": "old"})),
            // A delete keeps its epoch: a stale owner cannot resurrect the key.
            e("x1", "upd", json!({"k": "gone", "epoch": 3, "v": 1})),
            e("x2", "del", json!({"k": "gone", "epoch": 3})),
            e("x3", "upd", json!({"k": "gone", "epoch": 2, "v": 2})),
        ],
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = write_config(
        &server,
        dir.path(),
        port,
        r#"
        [[projection]]
        name = "docs"
        stream = "EV"
        key = "{data.k}"
        reducer = "merge"
        delete_on = ["del"]
        epoch = "{data.epoch}"
        kv_bucket = "docs"

        [[projection]]
        name = "counts"
        stream = "EV"
        key = "{data.k}"
        reducer = "counter"
        kv_bucket = "counts"
        "#,
    );
    let projector = InProcess::start(&config);
    wait_drained(&js, "EV", "projector__docs_v1", DRAIN).await;
    wait_drained(&js, "EV", "projector__counts_v1", DRAIN).await;
    let docs = [("projection", "docs")];
    assert_eq!(
        metric(
            port,
            "projector_events_total",
            &[docs[0], ("outcome", "stale_epoch")]
        )
        .await,
        Some(2.0)
    );
    assert_eq!(
        metric(
            port,
            "projector_events_total",
            &[docs[0], ("outcome", "duplicate")]
        )
        .await,
        Some(1.0)
    );
    assert_eq!(projector.stop().await, nats_projector::runtime::Exit::Ok);

    let (live, deleted) = kv_snapshot(&js, "docs").await;
    assert_eq!(
        live["doc"]["state"],
        json!({"k": "doc", "epoch": 1, "b": 2}),
        "no field of the first life"
    );
    assert_eq!(live["doc"]["last_applied_event_id"], "u3");
    assert_eq!(live["own"]["state"]["who"], "new");
    assert_eq!(live["own"]["epoch"], 2);
    assert!(
        !live.contains_key("gone"),
        "a stale owner did not resurrect the key"
    );
    assert_eq!(deleted["gone"]["epoch"], 3);
    assert_eq!(deleted["gone"]["last_applied_stream_seq"], 9);

    let (counts, _) = kv_snapshot(&js, "counts").await;
    assert_eq!(
        counts["dup"]["state"],
        json!({"count": 1}),
        "a re-published envelope counts once"
    );
    assert_eq!(counts["doc"]["state"], json!({"count": 3}));
    assert_eq!(
        counts["dup"]["epoch"],
        serde_json::Value::Null,
        "no epoch field: null"
    );

    let cfg = config.to_str().unwrap();
    let (code, out, _) = run_cli(&["get", "--config", cfg, "docs", "doc"]);
    assert_eq!(code, 0);
    let value: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(value, live["doc"], "get prints the KV value format");
    let (code, out, _) = run_cli(&["verify", "--config", cfg, "docs"]);
    assert_eq!(code, 0, "{out}");
    let (code, _, err) = run_cli(&["get", "--config", cfg, "docs", "nope"]);
    assert_eq!(code, 1, "{err}");
}
