//! The shape of the fast path against a real nats-server (speed itself is measured by
//! `benches/e2e.rs`, never by timed tests): a backlog is drained in full batches, and KV writes
//! of a pipelined, coalesced catch-up still leave KV equal to the oracle.

mod common;

use std::time::Duration;

use common::*;

/// A projector that drained the published fixture, with what the assertions need.
struct Drained {
    _server: NatsServer,
    js: async_nats::jetstream::Context,
    port: u16,
    dir: tempfile::TempDir,
    log: std::path::PathBuf,
    projector: Child2,
    oracle: serde_json::Value,
    events: usize,
}

/// Publishes the fixture, runs `projection` on it with metrics on a free port, and waits until
/// the durable has acked everything.
async fn drain_fixture(projection: &str) -> Drained {
    let server = NatsServer::start();
    let (_client, js) = server.jetstream().await;
    create_stream(&js, "ORDERS", &["orders.>"]).await;
    let (events, oracle) = fixture();
    let count = events.len();
    publish_all(&js, events).await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = write_config(&server, dir.path(), port, projection);
    let log = dir.path().join("projector.log");
    let projector = Child2::run(&config, &[], &log);
    wait_orders_drained(&js, Duration::from_secs(90)).await;
    Drained {
        _server: server,
        js,
        port,
        dir,
        log,
        projector,
        oracle,
        events: count,
    }
}

/// A backlog is fetched in batches near the configured size. (tokio's cooperative budget once
/// cut every batch at about 120 messages, whatever `batch` said: one fsync per 120 events.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_is_drained_in_full_batches_and_matches_the_oracle() {
    let projection = FIXTURE_PROJECTION.replace("batch = 64", "batch = 1000");
    let run = drain_fixture(&format!("{projection}max_ack_pending = 8000\n")).await;
    let count = run.events as f64;
    let labels = [("projection", "orders")];
    eventually(
        Duration::from_secs(10),
        "every batch to be counted",
        || async { metric(run.port, "projector_batch_size_sum", &labels).await == Some(count) },
    )
    .await;
    let batches = metric(run.port, "projector_batch_size_count", &labels)
        .await
        .unwrap_or(0.0);
    let mean = count / batches;
    assert!(
        mean >= 300.0,
        "{count} backlogged events took {batches} batches (mean {mean:.0}, batch = 1000)\n{}",
        std::fs::read_to_string(&run.log).unwrap_or_default()
    );
    run.projector.stop();
    assert_fixture_model(&run.js, &run.dir.path().join("store.redb"), &run.oracle).await;
}

/// A catch-up over few keys gathers committed batches before writing KV, so a key that recurs
/// across the backlog is written once per group: the 5,000 fixture events over 200 keys in
/// batches of 64 take about 4,300 KV writes when each batch is completed alone (about 55
/// distinct keys per batch), and a few hundred per 2,048-message group when gathered. KV and
/// the store still equal the oracle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_catch_up_over_few_keys_coalesces_kv_writes_across_batches() {
    let run = drain_fixture(&format!("{FIXTURE_PROJECTION}max_ack_pending = 4096\n")).await;
    let count = run.events;
    let labels = [("projection", "orders"), ("result", "ok")];
    let writes = metric(run.port, "projector_kv_writes_total", &labels)
        .await
        .unwrap_or(f64::MAX);
    assert!(
        writes < 1500.0,
        "{count} backlogged events over 200 keys took {writes} KV writes\n{}",
        std::fs::read_to_string(&run.log).unwrap_or_default()
    );
    run.projector.stop();
    assert_fixture_model(&run.js, &run.dir.path().join("store.redb"), &run.oracle).await;
}
