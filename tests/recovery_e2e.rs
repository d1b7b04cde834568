//! Replay and recovery that fail closed, against a real nats-server: snapshot round trips, a
//! purge of an unread range, a lost store rebuilt from KV, a corrupted store.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;

const DRAIN: Duration = Duration::from_secs(90);

fn cfg(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// Publishes the fixture lines `range`, runs the projector until drained, stops it.
async fn project(server: &NatsServer, config: &Path, dir: &Path, events: &[(String, Vec<u8>)]) {
    let (_client, js) = server.jetstream().await;
    publish_all(&js, events.to_vec()).await;
    let projector = Child2::run_with_log_level(config, "info", &dir.join("projector.log"));
    wait_drained(&js, "ORDERS", "projector__orders_v1", DRAIN).await;
    projector.stop();
}

fn snapshot_create(config: &Path, out: &Path) -> (i32, String) {
    let (code, out, err) = run_cli(&[
        "snapshot",
        "create",
        "--config",
        cfg(config),
        "orders",
        "--out",
        cfg(out),
    ]);
    (code, format!("{out}{err}"))
}

fn sha_of(output: &str) -> String {
    output.rsplit("sha256 ").next().unwrap().trim().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_round_trip_and_tampering() {
    let server = NatsServer::start();
    let (_client, js) = server.jetstream().await;
    create_stream(&js, "ORDERS", &["orders.>"]).await;
    let (events, expected) = fixture();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = write_config(&server, dir.path(), port, FIXTURE_PROJECTION);
    project(&server, &config, dir.path(), &events).await;

    let file = dir.path().join("orders.snapshot");
    let (code, out) = snapshot_create(&config, &file);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("at stream sequence 5000: 200 records"),
        "{out}"
    );
    let sha = sha_of(&out);
    let (code, out, _) = run_cli(&["snapshot", "verify", cfg(&file)]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(&sha), "{out}");

    // Restore into an empty store (another store file, same stream and durable).
    let restored_dir = tempfile::tempdir().unwrap();
    let restored = write_config(&server, restored_dir.path(), 0, FIXTURE_PROJECTION);
    let (code, out, err) = run_cli(&[
        "snapshot",
        "restore",
        "--config",
        cfg(&restored),
        cfg(&file),
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("resumes at 5001"), "{out}");
    let again = restored_dir.path().join("again.snapshot");
    let (code, out) = snapshot_create(&restored, &again);
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        sha_of(&out),
        sha,
        "identical records give the identical checksum"
    );
    assert_eq!(
        std::fs::read(&file).unwrap(),
        std::fs::read(&again).unwrap()
    );
    assert_fixture_model(&js, &restored_dir.path().join("store.redb"), &expected).await;

    // Tampered, truncated and flipped copies are refused, by verify and by restore.
    let text = std::fs::read_to_string(&file).unwrap();
    let tampered = dir.path().join("tampered.snapshot");
    std::fs::write(
        &tampered,
        text.replacen("\"status\":\"new\"", "\"status\":\"old\"", 1),
    )
    .unwrap();
    let truncated = dir.path().join("truncated.snapshot");
    std::fs::write(&truncated, &text.as_bytes()[..text.len() / 2]).unwrap();
    for bad in [&tampered, &truncated] {
        let (code, _, err) = run_cli(&["snapshot", "verify", cfg(bad)]);
        assert_eq!(code, 3, "{err}");
        assert!(err.contains("damaged snapshot"), "{err}");
        let (code, _, err) =
            run_cli(&["snapshot", "restore", "--config", cfg(&restored), cfg(bad)]);
        assert_eq!(code, 3, "{err}");
        assert!(err.contains("nothing was restored"), "{err}");
    }

    // While `run` holds the store, `snapshot create` asks it, and can upload to an Object Store.
    let projector = Child2::run(&config, &[], &dir.path().join("projector.log"));
    eventually(
        Duration::from_secs(20),
        "the projector to listen",
        || async { matches!(http_get(port, "/readyz").await, Some((200, _))) },
    )
    .await;
    let live = dir.path().join("live.snapshot");
    let (code, out, err) = run_cli(&[
        "snapshot",
        "create",
        "--config",
        cfg(&config),
        "orders",
        "--out",
        cfg(&live),
        "--object-store",
        "snapshots",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("object snapshots/live.snapshot"), "{out}");
    assert_eq!(sha_of(&out), sha);
    projector.stop();
    // ... and a restore can read it back from there.
    let from_object = tempfile::tempdir().unwrap();
    let object_config = write_config(&server, from_object.path(), 0, FIXTURE_PROJECTION);
    let (code, out, err) = run_cli(&[
        "snapshot",
        "restore",
        "--config",
        cfg(&object_config),
        "live.snapshot",
        "--object-store",
        "snapshots",
    ]);
    assert_eq!(code, 0, "{out}{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_of_an_unread_range_fails_closed_and_only_a_snapshot_past_it_restores() {
    let server = NatsServer::start();
    let (_client, js) = server.jetstream().await;
    create_stream(&js, "ORDERS", &["orders.>"]).await;
    let (events, expected) = fixture();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = write_config(&server, dir.path(), port, FIXTURE_PROJECTION);
    let store = dir.path().join("store.redb");

    // This store gets to 2000; a snapshot is taken there, and a copy of the store kept.
    project(&server, &config, dir.path(), &events[..2000]).await;
    let early = dir.path().join("early.snapshot");
    assert_eq!(snapshot_create(&config, &early).0, 0);
    let old_store: PathBuf = dir.path().join("old.redb");
    std::fs::copy(&store, &old_store).unwrap();
    // Someone (another replica) went on to 5000 and snapshotted there.
    project(&server, &config, dir.path(), &events[2000..]).await;
    let late = dir.path().join("late.snapshot");
    assert_eq!(snapshot_create(&config, &late).0, 0);

    // Messages 2001..2999, never applied by the old store, are purged; the old store is back.
    js.get_stream("ORDERS")
        .await
        .unwrap()
        .purge()
        .sequence(3000)
        .await
        .unwrap();
    std::fs::copy(&old_store, &store).unwrap();
    let log = dir.path().join("projector.log");
    let projector = Child2::run(&config, &[], &log);
    eventually(Duration::from_secs(20), "/readyz to fail closed", || async {
        matches!(http_get(port, "/readyz").await, Some((503, b)) if b.contains("replay gap (Removed)"))
    })
    .await;
    assert_eq!(
        metric(
            port,
            "projector_gaps_detected_total",
            &[("projection", "orders")]
        )
        .await,
        Some(1.0)
    );
    assert_eq!(
        metric(port, "projector_events_total", &[("outcome", "applied")]).await,
        Some(0.0)
    );
    assert_eq!(projector.terminate(), Some(3));

    // The snapshot at 2000 is not continued by the stream (2001 is gone): refused.
    let (code, _, err) = run_cli(&["snapshot", "restore", "--config", cfg(&config), cfg(&early)]);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("refusing to restore"), "{err}");
    // The snapshot at 5000 is: restored, and the projector converges.
    let (code, out, err) = run_cli(&["snapshot", "restore", "--config", cfg(&config), cfg(&late)]);
    assert_eq!(code, 0, "{out}{err}");
    let tail: Vec<(String, Vec<u8>)> = vec![(
        "orders.event.updated".into(),
        cloudevent(
            "evt-late",
            "order.updated",
            serde_json::json!({"order_id": "ord-late", "epoch": 1}),
        ),
    )];
    project(&server, &config, dir.path(), &tail).await;
    let mut expected = expected;
    expected["keys"]["ord-late"] = serde_json::json!({"epoch": 1, "last_applied_event_id": "evt-late",
        "last_applied_stream_seq": 5001, "state": {"order_id": "ord-late", "epoch": 1}});
    assert_fixture_model(&js, &store, &expected).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_store_is_rebuilt_from_kv_without_regression() {
    let server = NatsServer::start();
    let (_client, js) = server.jetstream().await;
    create_stream(&js, "ORDERS", &["orders.>"]).await;
    create_bucket(&js, "orders_view").await;
    let watch = MonotonicWatch::start(&js, "orders_view").await;
    let (events, expected) = fixture();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(&server, dir.path(), 0, FIXTURE_PROJECTION);
    project(&server, &config, dir.path(), &events[..2500]).await;
    std::fs::remove_file(dir.path().join("store.redb")).unwrap();
    project(&server, &config, dir.path(), &events[2500..]).await;
    let log = std::fs::read_to_string(dir.path().join("projector.log")).unwrap();
    assert!(log.contains("the store was lost"), "{log}");
    let (_, regressions) = watch.finish().await;
    assert!(regressions.is_empty(), "{regressions:?}");
    assert_fixture_model(&js, &dir.path().join("store.redb"), &expected).await;
    let (code, out, _) = run_cli(&["verify", "--config", cfg(&config), "orders"]);
    assert_eq!(code, 0, "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_store_fails_closed_without_panic_and_the_recovery_path_works() {
    let server = NatsServer::start();
    let (_client, js) = server.jetstream().await;
    create_stream(&js, "ORDERS", &["orders.>"]).await;
    let (events, expected) = fixture();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(&server, dir.path(), 0, FIXTURE_PROJECTION);
    project(&server, &config, dir.path(), &events[..3000]).await;
    let store = dir.path().join("store.redb");
    let pristine = std::fs::read(&store).unwrap();

    for damage in ["truncate", "flip"] {
        let mut bytes = pristine.clone();
        match damage {
            "truncate" => bytes.truncate(bytes.len() / 3),
            _ => {
                for i in (4096..bytes.len()).step_by(997) {
                    bytes[i] ^= 0xA5;
                }
            }
        }
        std::fs::write(&store, &bytes).unwrap();
        for args in [
            vec!["get", "--config", cfg(&config), "orders", "ord-001"],
            vec!["status", "--config", cfg(&config)],
        ] {
            let (code, _, err) = run_cli(&args);
            assert!(!err.contains("panicked"), "{damage}: {err}");
            assert_eq!(code, 3, "{damage}: {args:?}: {err}");
            assert!(err.contains("corrupted"), "{damage}: {err}");
        }
        let out = std::process::Command::new(binary())
            .args(["run", "--config", cfg(&config)])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("panicked"), "{damage}: {err}");
        assert_eq!(out.status.code(), Some(3), "{damage}: {err}");
        assert!(err.contains("corrupted"), "{damage}: {err}");
    }
    // The runbook: move the damaged file aside and start again; the store is rebuilt from KV.
    std::fs::rename(&store, dir.path().join("store.redb.corrupt")).unwrap();
    project(&server, &config, dir.path(), &events[3000..]).await;
    assert_fixture_model(&js, &store, &expected).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_only_projection_restores_from_its_snapshots_then_by_replay() {
    let server = NatsServer::start();
    let (_client, js) = server.jetstream().await;
    create_stream(&js, "ORDERS", &["orders.>"]).await;
    let (events, expected) = fixture();
    let dir = tempfile::tempdir().unwrap();
    // No KV bucket: the local store is the only read model. Automatic snapshots every second.
    let projection = FIXTURE_PROJECTION.replace("kv_bucket = \"orders_view\"\n", "");
    let config = write_config(&server, dir.path(), 0, &projection);
    std::fs::write(
        &config,
        std::fs::read_to_string(&config).unwrap().replace(
            "[http]",
            "[snapshots]\ninterval = \"1s\"\nkeep = 2\n\n[http]",
        ),
    )
    .unwrap();
    let snapshots = dir.path().join("snapshots");
    let log = dir.path().join("projector.log");
    let projector = Child2::run_with_log_level(&config, "info", &log);
    for (start, end) in [(0, 1000), (1000, 2000), (2000, 2500)] {
        publish_all(&js, events[start..end].to_vec()).await;
        eventually(
            Duration::from_secs(20),
            "an automatic snapshot at the new sequence",
            || async {
                let files = nats_projector::snapshot::list(&snapshots, "orders", 1);
                files
                    .first()
                    .and_then(|f| nats_projector::snapshot::peek_header(f))
                    .is_some_and(|h| h.seq == end as u64)
            },
        )
        .await;
    }
    let files = nats_projector::snapshot::list(&snapshots, "orders", 1);
    assert_eq!(files.len(), 2, "pruned to `keep`: {files:?}");
    for file in &files {
        nats_projector::snapshot::read_file(file).expect("automatic snapshots verify");
    }
    projector.stop();

    // The store is lost: restored from the newest snapshot, then the rest is applied.
    std::fs::remove_file(dir.path().join("store.redb")).unwrap();
    project(&server, &config, dir.path(), &events[2500..]).await;
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("store restored from a snapshot"), "{text}");
    let store = nats_projector::store::Store::open(&dir.path().join("store.redb"), 8).unwrap();
    let records = store.records("orders@v1").unwrap();
    drop(store);
    assert_eq!(records.len(), 200);
    for (key, record) in &records {
        assert_eq!(
            record.seq,
            expected["keys"][key]["last_applied_stream_seq"]
                .as_u64()
                .unwrap(),
            "{key}"
        );
    }

    // Lost again, with no snapshot left: the stream still holds everything, so it is replayed.
    std::fs::remove_file(dir.path().join("store.redb")).unwrap();
    std::fs::remove_dir_all(&snapshots).unwrap();
    std::fs::write(
        &config,
        std::fs::read_to_string(&config)
            .unwrap()
            .replace("interval = \"1s\"", "interval = \"0s\""),
    )
    .unwrap();
    let projector = Child2::run_with_log_level(&config, "info", &log);
    eventually(
        Duration::from_secs(20),
        "the replay from the first sequence",
        || async {
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains("store rebuilt by replaying the stream")
        },
    )
    .await;
    wait_drained(&js, "ORDERS", "projector__orders_v1", DRAIN).await;
    projector.stop();
    let store = nats_projector::store::Store::open(&dir.path().join("store.redb"), 8).unwrap();
    let again = store.records("orders@v1").unwrap();
    assert_eq!(again, records, "the replay rebuilt the same store");
}
