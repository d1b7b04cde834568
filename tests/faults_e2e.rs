//! Infrastructure faults with the real binary (needs the `fault-injection` feature):
//! a store that fails for a while holds the batch, says why in `/readyz` and the metrics, and
//! recovers with nothing lost; a store that keeps failing on a message's last delivery
//! dead-letters it with `store_unavailable`; SIGTERM in the middle of a backlog drains and
//! exits 0.
#![cfg(feature = "fault-injection")]

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_store_holds_the_batch_then_recovers() {
    let server = NatsServer::start();
    let (js, expected) = publish_fixture(&server).await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let projection = FIXTURE_PROJECTION.replace("batch = 64", "batch = 64\nbackoff = [\"300ms\"]");
    let config = write_config(&server, dir.path(), port, &projection);
    let log = dir.path().join("projector.log");
    let projector = Child2::run(&config, &[("NATS_PROJECTOR_FAIL_STORE", "4")], &log);

    let mut saw_reason = false;
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline && !saw_reason {
        if let Some((503, body)) = http_get(port, "/readyz").await {
            saw_reason = body.contains("store unavailable");
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    assert!(
        saw_reason,
        "/readyz should say the store is unavailable while it fails"
    );
    wait_orders_drained(&js, Duration::from_secs(60)).await;
    let retried = metric(port, "projector_events_total", &[("outcome", "retried")]).await;
    assert!(
        retried.unwrap_or(0.0) >= 4.0,
        "retries are counted: {retried:?}"
    );
    assert_eq!(
        metric(
            port,
            "projector_events_total",
            &[("outcome", "dead_lettered")]
        )
        .await,
        Some(0.0)
    );
    assert_eq!(http_get(port, "/readyz").await.map(|r| r.0), Some(200));
    projector.stop();
    assert_fixture_model(&js, &dir.path().join("store.redb"), &expected).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_failure_on_the_last_delivery_dead_letters_the_event() {
    let server = NatsServer::start();
    let (_client, js) = server.jetstream().await;
    create_stream(&js, "EV", &["ev.>"]).await;
    let messages = (0..3)
        .map(|i| {
            (
                "ev.x".to_owned(),
                cloudevent(&format!("e{i}"), "t", json!({"k": i})),
            )
        })
        .collect();
    publish_all(&js, messages).await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = write_config(
        &server,
        dir.path(),
        port,
        "[[projection]]\nname = \"p\"\nstream = \"EV\"\nkey = \"{data.k}\"\nreducer = \"latest\"\nkv_bucket = \"p\"\nmax_deliver = 1\nbackoff = [\"100ms\"]\n",
    );
    let log = dir.path().join("projector.log");
    let projector = Child2::run(&config, &[("NATS_PROJECTOR_FAIL_STORE", "always")], &log);
    wait_drained(&js, "EV", "projector__p_v1", Duration::from_secs(30)).await;
    let labels = [("error_code", "store_unavailable")];
    assert_eq!(
        metric(port, "projector_dead_letters_total", &labels).await,
        Some(3.0)
    );
    projector.stop();
    let dlq = js
        .get_stream("PROJECTOR_DLQ")
        .await
        .unwrap()
        .get_info()
        .await
        .unwrap();
    assert_eq!(dlq.state.messages, 3, "each event is in the DLQ once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_in_the_middle_of_a_backlog_drains_and_exits_0() {
    let server = NatsServer::start();
    let (js, expected) = publish_fixture(&server).await;
    let dir = tempfile::tempdir().unwrap();
    let projection = FIXTURE_PROJECTION.replace("batch = 64", "batch = 16\nack_wait = \"3s\"");
    let config = write_config(&server, dir.path(), 0, &projection);
    let log = dir.path().join("projector.log");
    let projector = Child2::run(&config, &[], &log);
    // Stop once it is busy, well before the backlog is drained.
    eventually(
        Duration::from_secs(20),
        "the projector to start applying",
        || async {
            let Ok(stream) = js.get_stream("ORDERS").await else {
                return false;
            };
            stream
                .consumer_info("projector__orders_v1")
                .await
                .is_ok_and(|i| i.ack_floor.stream_sequence > 100)
        },
    )
    .await;
    let started = Instant::now();
    projector.stop();
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "drained in {:?}",
        started.elapsed()
    );
    let info = js
        .get_stream("ORDERS")
        .await
        .unwrap()
        .consumer_info("projector__orders_v1")
        .await
        .unwrap();
    assert!(info.num_pending > 0, "stopped mid-backlog");
    // Everything acked is in KV: KV equals the store, with nothing left in the outbox.
    let (code, out, _) = run_cli(&["verify", "--config", config.to_str().unwrap(), "orders"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(" 0 pending"), "{out}");
    let projector = Child2::run(&config, &[], &log);
    wait_orders_drained(&js, Duration::from_secs(60)).await;
    projector.stop();
    assert_fixture_model(&js, &dir.path().join("store.redb"), &expected).await;
}

/// NATS cannot change a durable's ack policy: a configuration asking for the other one is
/// refused with the reason (nothing is consumed), and `auto` (the default) binds the same
/// durable with the policy it has.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_with_another_ack_policy_is_refused_with_the_reason() {
    use async_nats::jetstream::consumer::{AckPolicy, pull};
    let server = NatsServer::start();
    let (js, expected) = publish_fixture(&server).await;
    let stream = js.get_stream("ORDERS").await.unwrap();
    stream
        .create_consumer(pull::Config {
            durable_name: Some("projector__orders_v1".into()),
            ack_policy: AckPolicy::Explicit,
            filter_subject: "orders.event.>".into(),
            ..Default::default()
        })
        .await
        .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let all = format!("{FIXTURE_PROJECTION}ack_policy = \"all\"\n");
    let config = write_config(&server, dir.path(), port, &all);
    let log = dir.path().join("projector.log");
    let projector = Child2::run(&config, &[], &log);
    let mut reason = String::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline && !reason.contains("ack policy") {
        if let Some((503, body)) = http_get(port, "/readyz").await {
            reason = body;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        reason.contains("asks for All; NATS cannot change it: delete the durable"),
        "/readyz: {reason}"
    );
    let info = stream.consumer_info("projector__orders_v1").await.unwrap();
    assert_eq!(info.delivered.stream_sequence, 0, "nothing consumed");
    projector.stop();

    let config = write_config(&server, dir.path(), port, FIXTURE_PROJECTION);
    let projector = Child2::run(&config, &[], &log);
    wait_orders_drained(&js, Duration::from_secs(60)).await;
    projector.stop();
    assert_fixture_model(&js, &dir.path().join("store.redb"), &expected).await;
}

/// A `counter` projection over 40 keys (`k0`..`k39`) that drained `events` events of the
/// COUNTS stream, run with `settings` added to its config and `env` set.
struct Counts {
    /// Kept alive (killed on drop).
    _server: NatsServer,
    js: async_nats::jetstream::Context,
    dir: tempfile::TempDir,
    port: u16,
    projector: Child2,
    /// The projector's log once drained.
    log: String,
}

impl Counts {
    async fn drained(events: usize, settings: &str, env: &[(&str, &str)]) -> Counts {
        let server = NatsServer::start();
        let (_client, js) = server.jetstream().await;
        create_stream(&js, "COUNTS", &["counts.>"]).await;
        let events = (0..events)
            .map(|n| {
                let data = json!({"k": format!("k{}", n % 40)});
                let payload = cloudevent(&format!("e{n}"), "add", data);
                ("counts.add".to_owned(), payload)
            })
            .collect();
        publish_all(&js, events).await;
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let projection = format!(
            "[[projection]]\nname = \"counts\"\nstream = \"COUNTS\"\nkey = \"{{data.k}}\"\n\
             reducer = \"counter\"\nbatch = 64\nmax_ack_pending = 4096\nbackoff = [\"200ms\"]\n\
             {settings}\n"
        );
        let config = write_config(&server, dir.path(), port, &projection);
        let log = dir.path().join("projector.log");
        let mut env = env.to_vec();
        env.push(("RUST_LOG", "warn,nats_projector::pipeline=info"));
        let projector = Child2::run(&config, &env, &log);
        let durable = "projector__counts_v1";
        wait_drained(&js, "COUNTS", durable, Duration::from_secs(60)).await;
        let log = std::fs::read_to_string(&log).unwrap_or_default();
        Counts {
            _server: server,
            js,
            dir,
            port,
            projector,
            log,
        }
    }

    /// The last 30 lines of the log, newest first.
    fn tail(&self) -> String {
        self.log
            .lines()
            .rev()
            .take(30)
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// During a catch-up the next batch is queued on the applying thread behind the one it
/// applies. When that one fails, the queued batch is handed back unapplied, the failed one is
/// retried, and only then is the queued one applied. A `counter` over 40 keys shows any event
/// lost or applied out of order (an older event behind a newer one of its key counts as a
/// duplicate): every key must count all of its 75 events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_queued_behind_a_failed_one_is_applied_after_it() {
    // The 21st batch apply fails, well inside the catch-up (one failure: had the batch queued
    // behind it been applied, it would not have failed too).
    let env = [("NATS_PROJECTOR_FAIL_STORE", "1@20")];
    let run = Counts::drained(3000, "kv_bucket = \"counts_view\"", &env).await;
    assert!(
        run.log.contains("queued behind a failed one"),
        "a queued batch should have met the failure: {}",
        run.tail()
    );
    let retried = metric(
        run.port,
        "projector_events_total",
        &[("outcome", "retried")],
    )
    .await;
    assert!(
        retried.unwrap_or(0.0) >= 1.0,
        "retries are counted: {retried:?}"
    );
    run.projector.stop();
    let (live, deleted) = kv_snapshot(&run.js, "counts_view").await;
    assert!(deleted.is_empty());
    assert_eq!(live.len(), 40);
    for (key, value) in &live {
        assert_eq!(value["state"]["count"], json!(75), "{key}: {value}");
    }
}

/// During a catch-up without KV and with bulk acks, a batch with another queued behind it
/// commits without an fsync, its ack held for the next durable commit. When the disk fails in
/// that durable commit, the unsynced batches are lost with it: the pipeline must read the
/// unacked range back from the stream, in order, rather than retry the failed batch alone
/// (which would put its keys past the lost events, and its bulk ack would ack them). A
/// `counter` over 40 keys shows any event lost: every key must count all of its 150 events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_failure_after_unsynced_commits_reads_them_back() {
    // The disk fails in the third durable commit that follows unsynced ones.
    let env = [("NATS_PROJECTOR_FAIL_DISK", "3")];
    let run = Counts::drained(6000, "ack_policy = \"all\"", &env).await;
    assert!(
        run.log.contains("injected disk failure"),
        "the disk should have failed: {}",
        run.tail()
    );
    assert!(
        run.log.contains("after batches committed without an fsync"),
        "the failure should have met unsynced commits: {}",
        run.tail()
    );
    let tail = run.tail();
    run.projector.stop();
    let store = nats_projector::store::Store::open(&run.dir.path().join("store.redb"), 8).unwrap();
    let records = store.records("counts@v1").unwrap();
    assert_eq!(records.len(), 40);
    for (key, record) in records {
        let state: serde_json::Value =
            serde_json::from_slice(record.state.as_ref().unwrap()).unwrap();
        assert_eq!(state["count"], json!(150), "{key}: {state}\n{tail}");
    }
}
