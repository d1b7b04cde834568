//! What operators see, against a real nats-server: `/metrics` passes `promtool check
//! metrics`; `/readyz` is 503 before catch-up, 200 when caught up, 503 after a gap (the process
//! keeps serving and exits 3 when stopped); JSON logs carry the conventional fields and never
//! a payload.

mod common;

use std::time::Duration;

use async_nats::HeaderMap;
use common::*;
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_pass_promtool_and_readyz_follows_catch_up() {
    let server = NatsServer::start();
    let (_client, js) = server.jetstream().await;
    create_stream(&js, "ORDERS", &["orders.>"]).await;
    let (mut events, _) = fixture();
    events.push(("orders.event.updated".into(), b"not json".to_vec()));
    publish_all(&js, events).await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    // Small batches and a low ready lag: readiness waits for the backlog.
    let projection =
        FIXTURE_PROJECTION.replace("batch = 64", "batch = 8\nlag_sample_interval = \"200ms\"");
    let config = write_config(&server, dir.path(), port, &projection);
    std::fs::write(
        &config,
        std::fs::read_to_string(&config)
            .unwrap()
            .replace("listen = ", "ready_max_lag = 10\nlisten = "),
    )
    .unwrap();
    let log = dir.path().join("projector.log");
    let projector = Child2::run(&config, &[], &log);

    eventually(Duration::from_secs(30), "/readyz to report the catch-up", || async {
        matches!(http_get(port, "/readyz").await, Some((503, body)) if body.contains("orders: catching up"))
    })
    .await;
    assert_eq!(
        metric(port, "projector_ready", &[("projection", "orders")]).await,
        Some(0.0)
    );
    wait_orders_drained(&js, Duration::from_secs(90)).await;
    eventually(
        Duration::from_secs(10),
        "/readyz 200 once caught up",
        || async { matches!(http_get(port, "/readyz").await, Some((200, _))) },
    )
    .await;
    assert_eq!(http_get(port, "/livez").await.map(|r| r.0), Some(200));
    // The admin endpoints name what they cannot find.
    for path in [
        "/admin/get?projection=nope&key=a",
        "/admin/verify?projection=nope",
        "/admin/replay?projection=nope&dry_run=true",
    ] {
        assert_eq!(
            http_get(port, path).await,
            Some((404, "no projection \"nope\"\n".to_owned())),
            "{path}"
        );
    }
    assert_eq!(
        http_get(port, "/admin/get?projection=orders&key=no-such-key").await,
        Some((404, "no such key\n".to_owned()))
    );
    // Every applied batch was a durable commit, and its time was observed.
    let commits = metric(
        port,
        "projector_store_commit_seconds_count",
        &[("projection", "orders")],
    )
    .await
    .unwrap_or(0.0);
    let batches = metric(
        port,
        "projector_batch_size_count",
        &[("projection", "orders")],
    )
    .await
    .unwrap_or(0.0);
    assert!(
        commits >= 1.0 && commits >= batches,
        "{commits} commits, {batches} batches"
    );
    let lag = metric(port, "projector_lag_messages", &[("projection", "orders")]).await;
    assert_eq!(lag, Some(0.0));
    assert_eq!(
        metric(port, "projector_lag_seconds", &[("projection", "orders")]).await,
        Some(0.0)
    );
    assert_eq!(
        metric(port, "projector_ready", &[("projection", "orders")]).await,
        Some(1.0)
    );
    let last = metric(
        port,
        "projector_last_applied_stream_sequence",
        &[("projection", "orders")],
    )
    .await;
    assert_eq!(last, Some(5001.0));
    let stream_last = metric(
        port,
        "projector_stream_last_sequence",
        &[("projection", "orders")],
    )
    .await;
    assert_eq!(stream_last, Some(5001.0));
    assert!(
        metric(port, "projector_store_bytes", &[])
            .await
            .unwrap_or(0.0)
            > 0.0
    );
    assert_eq!(
        metric(
            port,
            "projector_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        )
        .await,
        Some(1.0)
    );

    let (_, body) = http_get(port, "/metrics").await.unwrap();
    let mut check = std::process::Command::new(prometheus_tool("promtool"))
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    check
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let out = check.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    for line in body.lines().filter(|l| !l.starts_with('#')) {
        assert!(!line.contains("ord-0"), "a key leaked into a label: {line}");
        assert!(
            !line.contains("evt-"),
            "an event id leaked into a label: {line}"
        );
    }
    projector.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gap_turns_readyz_503_and_the_process_exits_3() {
    let server = NatsServer::start();
    let (_client, js) = server.jetstream().await;
    create_stream(&js, "EV", &["ev.>"]).await;
    let batch = |from: usize| {
        (from..from + 20)
            .map(|i| {
                (
                    "ev.x".to_owned(),
                    cloudevent(&format!("e{i}"), "t", json!({"k": i % 3})),
                )
            })
            .collect::<Vec<_>>()
    };
    publish_all(&js, batch(0)).await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = write_config(
        &server,
        dir.path(),
        port,
        "[[projection]]\nname = \"p\"\nstream = \"EV\"\nkey = \"{data.k}\"\nreducer = \"latest\"\nkv_bucket = \"p\"\n",
    );
    let log = dir.path().join("projector.log");
    let projector = Child2::run(&config, &[], &log);
    wait_drained(&js, "EV", "projector__p_v1", Duration::from_secs(30)).await;
    projector.stop();

    // The stream is deleted and re-created under the same name: its sequences start over.
    js.delete_stream("EV").await.unwrap();
    create_stream(&js, "EV", &["ev.>"]).await;
    publish_all(&js, batch(100)).await;
    let projector = Child2::run(&config, &[], &log);
    eventually(Duration::from_secs(20), "/readyz to fail closed", || async {
        matches!(http_get(port, "/readyz").await, Some((503, body)) if body.contains("p: failed closed: replay gap (Recreated)"))
    })
    .await;
    assert_eq!(
        metric(
            port,
            "projector_gaps_detected_total",
            &[("projection", "p")]
        )
        .await,
        Some(1.0)
    );
    assert_eq!(
        metric(port, "projector_ready", &[("projection", "p")]).await,
        Some(0.0)
    );
    let (code, out, _) = run_cli(&["status", "--config", config.to_str().unwrap(), "--json"]);
    assert_eq!(code, 0);
    let status: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(status[0]["ready"], false);
    assert!(
        status[0]["reason"].as_str().unwrap().contains("re-created"),
        "{out}"
    );
    // Nothing of the new stream was applied on top of the old read model.
    assert_eq!(
        metric(port, "projector_events_total", &[("outcome", "applied")]).await,
        Some(0.0)
    );
    assert_eq!(
        projector.terminate(),
        Some(3),
        "a failed-closed run exits 3"
    );
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("nats-projector rebuild"),
        "the log says how to repair: {text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_the_conventional_fields_and_never_a_payload() {
    let server = NatsServer::start();
    let (client, js) = server.jetstream().await;
    create_stream(&js, "EV", &["ev.>"]).await;
    let mut headers = HeaderMap::new();
    headers.insert("X-Correlation-Id", "corr-42");
    let payload = cloudevent(
        "e1",
        "thing.happened",
        json!({"k": "key-1", "secret": "s3cr3t-payload"}),
    );
    js.publish_with_headers("ev.x", headers, payload.into())
        .await
        .unwrap()
        .await
        .unwrap();
    js.publish("ev.x", b"{broken s3cr3t-payload".to_vec().into())
        .await
        .unwrap()
        .await
        .unwrap();
    drop(client);
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        &server,
        dir.path(),
        0,
        "[[projection]]\nname = \"p\"\nstream = \"EV\"\nkey = \"{data.k}\"\nreducer = \"latest\"\nkv_bucket = \"p\"\n",
    );
    let log = dir.path().join("projector.log");
    let mut command = std::process::Command::new(binary());
    command
        .args([
            "--log-format",
            "json",
            "--log-level",
            "nats_projector=debug,info",
            "run",
            "--config",
        ])
        .arg(&config)
        .stderr(std::fs::File::create(&log).unwrap())
        .stdout(std::process::Stdio::null());
    let projector = Child2 {
        child: command.spawn().unwrap(),
        log: log.clone(),
    };
    wait_drained(&js, "EV", "projector__p_v1", Duration::from_secs(30)).await;
    projector.stop();

    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(!text.contains("s3cr3t-payload"), "a payload was logged");
    let applied = lines
        .iter()
        .find(|l| l["fields"]["message"] == "event" && l["fields"]["outcome"] == "applied")
        .unwrap_or_else(|| panic!("no per-event log line in {text}"));
    let f = &applied["fields"];
    assert_eq!(f["stream_seq"], 1);
    assert_eq!(f["subject"], "ev.x");
    assert_eq!(f["event_type"], "thing.happened");
    assert_eq!(f["kv_key"], "key-1");
    assert_eq!(f["kv_bucket"], "p");
    assert_eq!(f["correlation_id"], "corr-42");
    let spans = applied["spans"].as_array().expect("span list");
    assert!(spans.iter().any(|s| s["name"] == "projection"
        && s["projection"] == "p"
        && s["stream"] == "EV"
        && s["consumer"] == "projector__p_v1"));
    assert_eq!(
        applied["span"]["name"], "batch",
        "one span per batch: {applied}"
    );
    assert_eq!(applied["span"]["first_seq"], 1);
    assert!(lines.iter().any(|l| l["fields"]["message"] == "KV write"
        && l["fields"]["kv_key"] == "key-1"
        && l["fields"]["revision"].as_u64().is_some()));
    assert!(
        lines
            .iter()
            .any(|l| l["fields"]["message"] == "event dead-lettered"
                && l["fields"]["error_code"] == "invalid_json"
                && l["level"] == "WARN")
    );
}
