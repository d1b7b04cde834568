//! The shared 5,000-event fixture through a real nats-server: the projected read model (KV
//! and store) equals the independently computed oracle, the outcome counters match, and
//! replaying the whole stream into the existing store changes nothing.

mod common;

use std::time::Duration;

use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, pull};
use common::*;

const DRAIN: Duration = Duration::from_secs(90);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fixture_projects_to_the_oracle_and_replay_changes_nothing() {
    let server = NatsServer::start();
    let (js, expected) = publish_fixture(&server).await;

    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = write_config(&server, dir.path(), port, FIXTURE_PROJECTION);
    let projector = InProcess::start(&config);
    wait_drained(&js, "ORDERS", "projector__orders_v1", DRAIN).await;
    // ack_policy = "auto": a durable the projector creates acks in bulk.
    let orders = js.get_stream("ORDERS").await.unwrap();
    let info = orders.consumer_info("projector__orders_v1").await.unwrap();
    assert_eq!(info.config.ack_policy, AckPolicy::All);

    let outcomes = &expected["outcomes"];
    assert_eq!(
        outcome_at(port, "applied").await,
        outcomes["applied"].as_f64()
    );
    assert_eq!(
        outcome_at(port, "duplicate").await,
        outcomes["duplicate"].as_f64()
    );
    assert_eq!(
        outcome_at(port, "stale_epoch").await,
        outcomes["stale_epoch"].as_f64()
    );
    assert_eq!(outcome_at(port, "dead_lettered").await, Some(0.0));
    assert_eq!(http_get(port, "/readyz").await.map(|r| r.0), Some(200));
    let (code, out, _) = run_cli(&["verify", "--config", config.to_str().unwrap(), "orders"]);
    assert_eq!(code, 0, "verify through the running process: {out}");
    assert!(out.contains("200 matching"), "{out}");
    let (code, out, err) = run_cli(&["status", "--config", config.to_str().unwrap(), "--json"]);
    assert_eq!(code, 0, "{err}");
    let status: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(status[0]["projection"], "orders");
    assert_eq!(status[0]["last_applied_stream_seq"], 5000);
    assert_eq!(status[0]["kv_outbox"], 0);
    assert_eq!(status[0]["ready"], true, "{out}");
    let (code, out, _) = run_cli(&[
        "get",
        "--config",
        config.to_str().unwrap(),
        "orders",
        "ord-001",
    ]);
    assert_eq!(code, 0, "get through the running process");
    assert!(out.contains("\"last_applied_stream_seq\":4770"), "{out}");
    assert_eq!(projector.stop().await, nats_projector::runtime::Exit::Ok);

    let store_path = dir.path().join("store.redb");
    assert_fixture_model(&js, &store_path, &expected).await;

    // Replay: a fresh durable that delivers the whole stream again into the same store.
    let kv_before = js
        .get_key_value("orders_view")
        .await
        .unwrap()
        .status()
        .await
        .unwrap();
    let records_before = {
        let store = nats_projector::store::Store::open(&store_path, 8).unwrap();
        store.records("orders@v1").unwrap()
    };
    let stream = js.get_stream("ORDERS").await.unwrap();
    stream
        .delete_consumer("projector__orders_v1")
        .await
        .unwrap();
    stream
        .create_consumer(pull::Config {
            durable_name: Some("projector__orders_v1".into()),
            deliver_policy: DeliverPolicy::All,
            ack_policy: AckPolicy::Explicit,
            filter_subject: "orders.event.>".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let port = free_port();
    let config = write_config(&server, dir.path(), port, FIXTURE_PROJECTION);
    let projector = InProcess::start(&config);
    wait_drained(&js, "ORDERS", "projector__orders_v1", DRAIN).await;
    // ... and an existing durable keeps its own.
    let info = stream.consumer_info("projector__orders_v1").await.unwrap();
    assert_eq!(info.config.ack_policy, AckPolicy::Explicit);
    assert_eq!(
        outcome_at(port, "applied").await,
        Some(0.0),
        "a replay applies nothing"
    );
    assert_eq!(outcome_at(port, "duplicate").await, Some(5000.0));
    assert_eq!(
        metric(port, "projector_kv_writes_total", &[("result", "ok")]).await,
        Some(0.0)
    );
    assert_eq!(projector.stop().await, nats_projector::runtime::Exit::Ok);

    let kv_after = js
        .get_key_value("orders_view")
        .await
        .unwrap()
        .status()
        .await
        .unwrap();
    assert_eq!(
        kv_before.info.state.last_sequence, kv_after.info.state.last_sequence,
        "a replay writes nothing to KV"
    );
    let store = nats_projector::store::Store::open(&store_path, 8).unwrap();
    assert_eq!(
        store.records("orders@v1").unwrap(),
        records_before,
        "a replay changes no record"
    );
    drop(store);
    assert_fixture_model(&js, &store_path, &expected).await;
}

async fn outcome_at(port: u16, outcome: &str) -> Option<f64> {
    metric(port, "projector_events_total", &[("outcome", outcome)]).await
}

/// The binary with a single async worker (`--worker-threads` through its environment
/// variable): everything that must not block the runtime (the NATS connection, KV, acks,
/// HTTP) shares one thread while the store applies on its own, and the fixture still projects
/// to the oracle; SIGTERM drains and exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_async_worker_projects_the_fixture() {
    let server = NatsServer::start();
    let (js, expected) = publish_fixture(&server).await;

    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = write_config(&server, dir.path(), port, FIXTURE_PROJECTION);
    let log = dir.path().join("projector.log");
    let projector = Child2::run(&config, &[("NATS_PROJECTOR_WORKER_THREADS", "1")], &log);
    wait_drained(&js, "ORDERS", "projector__orders_v1", DRAIN).await;
    assert_eq!(
        outcome_at(port, "applied").await,
        expected["outcomes"]["applied"].as_f64(),
        "log tail:\n{}",
        file_tail(&log, 40)
    );
    assert_eq!(http_get(port, "/readyz").await.map(|r| r.0), Some(200));
    projector.stop();
    assert_fixture_model(&js, &dir.path().join("store.redb"), &expected).await;
}
