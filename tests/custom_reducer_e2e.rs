//! Rust reducers through a real nats-server: a custom fold, a refusal (dead-lettered with
//! `reducer_error`), and a reducer that panics on one event: the event is isolated and
//! dead-lettered, the process and every other event are unaffected.

mod common;

use std::time::Duration;

use common::*;
use nats_projector::decode::Event;
use nats_projector::{Change, Projection, ReduceError, Reducers};
use serde_json::{Value, json};

struct Maximum;

impl Projection for Maximum {
    fn apply(&self, state: Option<Value>, event: &Event) -> Result<Change, ReduceError> {
        let Some(n) = event.data["n"].as_i64() else {
            return Err(ReduceError("n must be an integer".into()));
        };
        if n == 13 {
            panic!("unlucky number");
        }
        let best = state.and_then(|s| s["max"].as_i64()).unwrap_or(i64::MIN);
        Ok(Change::Put(json!({"max": best.max(n)})))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custom_reducers_fold_refuse_and_survive_panics() {
    let server = NatsServer::start();
    let (_client, js) = server.jetstream().await;
    create_stream(&js, "NUM", &["num.>"]).await;
    let values = [
        json!(3),
        json!(9),
        json!("x"),
        json!(13),
        json!(5),
        json!(11),
    ];
    let messages = values
        .iter()
        .enumerate()
        .map(|(i, n)| {
            (
                "num.a".to_owned(),
                cloudevent(&format!("n{i}"), "t", json!({"k": "a", "n": n})),
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
        "[[projection]]\nname = \"max\"\nstream = \"NUM\"\nkey = \"{data.k}\"\nreducer = \"custom\"\nkv_bucket = \"max\"\n",
    );
    let projector = InProcess::start_with(&config, Reducers::new().with("max", Maximum));
    wait_drained(&js, "NUM", "projector__max_v1", Duration::from_secs(60)).await;
    let labels = [("error_code", "reducer_error")];
    assert_eq!(
        metric(port, "projector_dead_letters_total", &labels).await,
        Some(2.0)
    );
    assert_eq!(
        metric(port, "projector_events_total", &[("outcome", "applied")]).await,
        Some(4.0)
    );
    assert_eq!(projector.stop().await, nats_projector::runtime::Exit::Ok);
    let (live, _) = kv_snapshot(&js, "max").await;
    assert_eq!(live["a"]["state"], json!({"max": 11}));
    assert_eq!(live["a"]["last_applied_stream_seq"], 6);
}

#[tokio::test]
async fn a_custom_projection_without_its_reducer_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(
        &path,
        "[[projection]]\nname = \"max\"\nstream = \"NUM\"\nkey = \"{data.k}\"\nreducer = \"custom\"\n",
    )
    .unwrap();
    let (code, _, err) = run_cli(&["check-config", "--config", path.to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(err.contains("no Rust reducer is registered"), "{err}");
}
