//! The dashboard proven against a real Prometheus: Prometheus (Debian's package) scrapes a
//! running projector under load, with the alert rules loaded; then every PromQL expression of
//! the dashboard must return data, the key values must be what happened (applied == published,
//! lag back to 0), and every alert rule must evaluate cleanly, firing exactly when expected.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::Value;

struct Prometheus {
    child: std::process::Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(target_port: u16) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let rules = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("grafana/alerts.yml");
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\n\
                 scrape_configs:\n  - job_name: nats-projector\n    static_configs:\n      - targets: ['127.0.0.1:{target_port}']\n",
                rules.display()
            ),
        )
        .unwrap();
        let port = free_port();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = Command::new(prometheus_tool("prometheus"))
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start prometheus");
        Prometheus {
            child,
            port,
            _dir: dir,
        }
    }

    async fn query(&self, expr: &str) -> Value {
        let path = format!("/api/v1/query?query={}", encode(expr));
        let (status, body) = http_get(self.port, &path)
            .await
            .expect("prometheus answers");
        assert_eq!(status, 200, "{expr}: {body}");
        let value: Value = serde_json::from_str(&body).expect("json");
        assert_eq!(value["status"], "success", "{expr}: {body}");
        value["data"]["result"].clone()
    }

    async fn scalar(&self, expr: &str) -> Option<f64> {
        let result = self.query(expr).await;
        result[0]["value"][1].as_str().and_then(|v| v.parse().ok())
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = std::fs::read_to_string(self._dir.path().join("prometheus.log"))
                .unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            eprintln!(
                "---- prometheus log tail ----\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_query_and_alert_rule_evaluates_against_a_real_prometheus() {
    let server = NatsServer::start();
    let (_client, js) = server.jetstream().await;
    create_stream(&js, "ORDERS", &["orders.>"]).await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let projection =
        FIXTURE_PROJECTION.replace("batch = 64", "batch = 32\nlag_sample_interval = \"500ms\"");
    let config = write_config(&server, dir.path(), port, &projection);
    let log = dir.path().join("projector.log");
    let projector = Child2::run(&config, &[], &log);
    let prometheus = Prometheus::start(port);
    eventually(
        Duration::from_secs(30),
        "prometheus to be ready",
        || async { matches!(http_get(prometheus.port, "/-/ready").await, Some((200, _))) },
    )
    .await;

    // Load over several scrapes: the fixture in chunks, plus three poison events.
    let (events, expected) = fixture();
    let mut chunks = events.chunks(500);
    for _ in 0..10 {
        if let Some(chunk) = chunks.next() {
            publish_all(&js, chunk.to_vec()).await;
        }
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    let poison = (0..3)
        .map(|i| {
            (
                "orders.event.updated".to_owned(),
                format!("{{not json {i}").into_bytes(),
            )
        })
        .collect();
    publish_all(&js, poison).await;
    wait_orders_drained(&js, Duration::from_secs(90)).await;
    let applied = expected["outcomes"]["applied"].as_f64().unwrap();
    let p = r#"{projection="orders"}"#;
    eventually(
        Duration::from_secs(30),
        "prometheus to scrape the drained state",
        || async {
            let scraped = prometheus
                .scalar(r#"projector_events_total{projection="orders",outcome="applied"}"#)
                .await;
            let lag = prometheus
                .scalar(&format!("projector_lag_messages{p}"))
                .await;
            let dead = prometheus
                .scalar(r#"sum(projector_dead_letters_total{projection="orders"})"#)
                .await;
            scraped == Some(applied) && lag == Some(0.0) && dead == Some(3.0)
        },
    )
    .await;

    // Every dashboard expression returns data.
    let queries = dashboard_queries("orders");
    assert!(queries.len() >= 15, "the dashboard has its panels");
    for (title, expr) in &queries {
        let result = prometheus.query(expr).await;
        assert!(
            result.as_array().is_some_and(|r| !r.is_empty()),
            "panel {title:?}: {expr} returned no data"
        );
    }
    // ... with the values of what happened.
    assert_eq!(
        prometheus
            .scalar(&format!("projector_lag_seconds{p}"))
            .await,
        Some(0.0)
    );
    assert_eq!(
        prometheus.scalar(&format!("projector_ready{p}")).await,
        Some(1.0)
    );
    assert_eq!(
        prometheus
            .scalar(&format!("projector_kv_outbox_keys{p}"))
            .await,
        Some(0.0)
    );
    assert_eq!(
        prometheus
            .scalar(&format!("projector_last_applied_stream_sequence{p}"))
            .await,
        Some(5003.0)
    );
    let dead =
        r#"sum(projector_dead_letters_total{projection="orders",error_code="invalid_json"})"#;
    assert_eq!(prometheus.scalar(dead).await, Some(3.0));
    let rate = r#"sum(rate(projector_events_total{projection="orders",outcome="applied"}[5m]))"#;
    assert!(
        prometheus.scalar(rate).await.unwrap_or(0.0) > 0.0,
        "applied/s during the load"
    );
    let p99 = r#"histogram_quantile(0.99, sum by (le) (rate(projector_batch_duration_seconds_bucket{projection="orders"}[5m])))"#;
    let p99 = prometheus.scalar(p99).await.unwrap();
    assert!(p99 > 0.0 && p99 < 10.0, "batch p99 {p99}");

    // Every alert rule evaluates cleanly; only the dead-letter alert fires.
    let rules = {
        let (_, body) = http_get(prometheus.port, "/api/v1/rules").await.unwrap();
        serde_json::from_str::<Value>(&body).unwrap()
    };
    let mut seen = Vec::new();
    eventually(
        Duration::from_secs(15),
        "the dead-letter alert to fire",
        || async {
            let (_, body) = http_get(prometheus.port, "/api/v1/rules").await.unwrap();
            let rules: Value = serde_json::from_str(&body).unwrap();
            rules["data"]["groups"][0]["rules"]
                .as_array()
                .unwrap()
                .iter()
                .any(|r| r["name"] == "ProjectorDeadLetters" && r["state"] == "firing")
        },
    )
    .await;
    for rule in rules["data"]["groups"][0]["rules"]
        .as_array()
        .expect("rules loaded")
    {
        let name = rule["name"].as_str().unwrap().to_owned();
        assert_eq!(rule["health"], "ok", "{name}: {}", rule["lastError"]);
        let result = prometheus.query(rule["query"].as_str().unwrap()).await;
        let fires = result.as_array().is_some_and(|r| !r.is_empty());
        assert_eq!(
            fires,
            name == "ProjectorDeadLetters",
            "{name} firing: {result}"
        );
        seen.push(name);
    }
    assert!(seen.len() >= 7, "every alert rule was evaluated: {seen:?}");
    projector.stop();
}
