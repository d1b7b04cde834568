//! Crash windows, with the real binary and a real nats-server: the process aborts (like
//! `kill -9`) between the redb commit and the KV writes, or between the KV writes and the
//! acks. After a restart KV converges to the oracle, the store equals it too, and a KV watcher
//! running throughout never sees a key's `last_applied_stream_seq` go backwards.
//!
//! Needs the `fault-injection` feature (`scripts/test` enables it).
#![cfg(feature = "fault-injection")]

mod common;

use std::time::Duration;

use common::*;

async fn crash_and_recover(point: &str, nth: u32) {
    let server = NatsServer::start();
    let (_client, js) = server.jetstream().await;
    create_stream(&js, "ORDERS", &["orders.>"]).await;
    create_bucket(&js, "orders_view").await;
    let watch = MonotonicWatch::start(&js, "orders_view").await;
    let (events, expected) = fixture();
    publish_all(&js, events).await;

    let dir = tempfile::tempdir().unwrap();
    // A short ack_wait: the stale redeliveries of the crashed run come back quickly. At most
    // 256 unacked messages: the sink completes groups of at most 256 messages (catch-up groups
    // gather up to two thirds of it), so the 5,000 events make at least 19 groups, and a crash
    // at the 15th is always reached.
    let projection = FIXTURE_PROJECTION.replace(
        "batch = 64",
        "batch = 64\nack_wait = \"3s\"\nmax_ack_pending = 256",
    );
    let config = write_config(&server, dir.path(), 0, &projection);
    let log = dir.path().join("projector.log");
    let crash = format!("{point}:{nth}");
    let status = Child2::run(&config, &[("NATS_PROJECTOR_CRASH_AT", &crash)], &log)
        .wait(Duration::from_secs(60));
    assert!(
        status.code().is_none(),
        "the injected crash at {crash} should abort the process: {status:?}\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let stream = js.get_stream("ORDERS").await.unwrap();
    let info = stream.consumer_info("projector__orders_v1").await.unwrap();
    assert!(
        info.num_ack_pending > 0 || info.num_pending > 0,
        "the crash left unacked work behind"
    );

    let projector = Child2::run(&config, &[], &log);
    wait_orders_drained(&js, Duration::from_secs(90)).await;
    projector.stop();

    assert_fixture_model(&js, &dir.path().join("store.redb"), &expected).await;
    let (seen, regressions) = watch.finish().await;
    assert!(seen > 0, "the watcher saw the writes");
    assert!(
        regressions.is_empty(),
        "keys went backwards: {regressions:?}"
    );
    let (code, out, _) = run_cli(&["verify", "--config", config.to_str().unwrap(), "orders"]);
    assert_eq!(code, 0, "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_between_commit_and_kv_write_loses_nothing() {
    crash_and_recover("after_commit", 3).await;
    crash_and_recover("after_commit", 40).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_between_kv_write_and_ack_loses_nothing() {
    crash_and_recover("after_kv", 3).await;
    crash_and_recover("after_kv", 15).await;
}
