//! A lost server: nats-server is killed in the middle of a backlog and restarted (same port,
//! same store). The projector says why it is not ready meanwhile, recovers by itself, and the
//! read model converges to the oracle with nothing lost.

mod common;

use std::time::Duration;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_projector_survives_a_server_restart_mid_backlog() {
    let mut server = NatsServer::start();
    let (events, expected) = fixture();
    {
        let (_client, js) = server.jetstream().await;
        create_stream(&js, "ORDERS", &["orders.>"]).await;
        publish_all(&js, events).await;
    }
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let projection = FIXTURE_PROJECTION.replace(
        "batch = 64",
        "batch = 16\nack_wait = \"3s\"\nbackoff = [\"200ms\", \"1s\"]",
    );
    let config = write_config(&server, dir.path(), port, &projection);
    let log = dir.path().join("projector.log");
    let projector = Child2::run(&config, &[], &log);
    {
        let (_client, js) = server.jetstream().await;
        eventually(
            Duration::from_secs(20),
            "the projector to be busy",
            || async {
                let Ok(stream) = js.get_stream("ORDERS").await else {
                    return false;
                };
                stream
                    .consumer_info("projector__orders_v1")
                    .await
                    .is_ok_and(|i| i.ack_floor.stream_sequence > 300)
            },
        )
        .await;
    }
    server.kill();
    eventually(
        Duration::from_secs(20),
        "/readyz to report the outage",
        || async { matches!(http_get(port, "/readyz").await, Some((503, _))) },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    server.restart();
    let (_client, js) = server.jetstream().await;
    wait_orders_drained(&js, Duration::from_secs(120)).await;
    eventually(
        Duration::from_secs(20),
        "/readyz to be 200 again",
        || async { matches!(http_get(port, "/readyz").await, Some((200, _))) },
    )
    .await;
    projector.stop();
    assert_fixture_model(&js, &dir.path().join("store.redb"), &expected).await;
}

/// A frozen server (SIGSTOP past two heartbeat intervals, then SIGCONT) while the projector
/// has nothing pending: only the missing heartbeats can tell the silence from a quiet stream.
/// The pull subscription is re-created, and the events published after the thaw are applied:
/// the store equals the oracle. Store only: with KV, the projector would be waiting on its KV
/// writes, not on the subscription.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_server_is_noticed_by_the_missing_heartbeats() {
    let server = NatsServer::start();
    let (mut events, expected) = fixture();
    let later = events.split_off(4000);
    let (_client, js) = server.jetstream().await;
    create_stream(&js, "ORDERS", &["orders.>"]).await;
    publish_all(&js, events).await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let projection = FIXTURE_PROJECTION.replace("kv_bucket = \"orders_view\"\n", "");
    assert!(!projection.contains("kv_bucket"));
    let config = write_config(&server, dir.path(), port, &projection);
    let log = dir.path().join("projector.log");
    let projector = Child2::run(&config, &[], &log);
    wait_orders_drained(&js, Duration::from_secs(60)).await;
    let pid = server.pid().expect("the server runs") as libc::pid_t;
    // SAFETY: signals a child process this test started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
    // Heartbeats are asked for every 5 s; two missed ones end the subscription. The projector
    // also spends 5 s of every 6 waiting on lag samples (consumer info) that time out, and
    // notices the silence only when it next waits on its subscription: up to 18 s.
    tokio::time::sleep(Duration::from_secs(20)).await;
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGCONT) }, 0);
    publish_all(&js, later).await;
    wait_orders_drained(&js, Duration::from_secs(60)).await;
    projector.stop();
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        text.contains("no message or heartbeat for 10s"),
        "the silence is named in the log:\n{text}\n{}",
        server.log_tail(20)
    );
    assert_fixture_store(&dir.path().join("store.redb"), &expected);
}
