//! The dashboard and the alert rules are checked against the metrics this build exports, so
//! renaming a metric breaks the build, not the dashboard; the alert rules pass their
//! `promtool test rules` unit tests.

mod common;

use std::collections::BTreeSet;
use std::path::Path;

use nats_projector::metrics::METRIC_NAMES;

fn read(path: &str) -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(path)).expect(path)
}

/// Every `projector_*` name in a text, histogram suffixes folded into their family.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(found) = text[i..].find("projector_") {
        let start = i + found;
        let prev = |k: usize| start.checked_sub(k).map(|j| bytes[j]);
        let identifier_start =
            !matches!(prev(1), Some(b) if b.is_ascii_alphanumeric() || b == b'_');
        // A quoted label value (`consumer_name="projector__orders_v1"`) is not a metric.
        let label_value = prev(1) == Some(b'"') && matches!(prev(2), Some(b'=' | b'~'));
        let before_ok = identifier_start && !label_value;
        let mut end = start;
        while end < bytes.len()
            && (bytes[end].is_ascii_lowercase()
                || bytes[end].is_ascii_digit()
                || bytes[end] == b'_')
        {
            end += 1;
        }
        // Names with `__` are reserved by Prometheus and none of ours has one: such a token is
        // a consumer name (`projector__orders_v1`) in a label value or a description.
        if before_ok && !text[start..end].contains("__") {
            let name = &text[start..end];
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| {
                    name.strip_suffix(s)
                        .filter(|f| f.ends_with("_seconds") || f.ends_with("_size"))
                })
                .unwrap_or(name);
            names.insert(family.to_owned());
        }
        i = end.max(start + 1);
    }
    names
}

#[test]
fn every_metric_the_dashboard_and_rules_query_is_exported() {
    let exported: BTreeSet<&str> = METRIC_NAMES.into_iter().collect();
    for file in [
        "grafana/dashboard.json",
        "grafana/alerts.yml",
        "grafana/alerts_test.yml",
    ] {
        let used = metric_names(&read(file));
        assert!(!used.is_empty(), "{file} queries projector metrics");
        for name in &used {
            assert!(
                exported.contains(name.as_str()),
                "{file} uses {name}, which is not exported"
            );
        }
    }
}

#[test]
fn the_dashboard_shows_what_an_operator_needs() {
    let used = metric_names(&read("grafana/dashboard.json"));
    for name in [
        "projector_ready",
        "projector_lag_messages",
        "projector_lag_seconds",
        "projector_events_total",
        "projector_dead_letters_total",
        "projector_redeliveries_total",
        "projector_batch_duration_seconds",
        "projector_kv_outbox_keys",
        "projector_kv_writes_total",
        "projector_store_bytes",
        "projector_store_commit_seconds",
        "projector_last_applied_stream_sequence",
        "projector_stream_last_sequence",
    ] {
        assert!(used.contains(name), "the dashboard has no panel for {name}");
    }
    let dashboard: serde_json::Value =
        serde_json::from_str(&read("grafana/dashboard.json")).unwrap();
    assert!(
        dashboard.get("__inputs").is_none(),
        "the datasource is a template variable"
    );
    let variables = dashboard["templating"]["list"].as_array().unwrap();
    assert!(
        variables
            .iter()
            .any(|v| v["type"] == "datasource" && v["query"] == "prometheus")
    );
    for (title, expr) in common::dashboard_queries("orders") {
        assert!(!expr.contains('$'), "{title}: unbound variable in {expr}");
    }
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            assert_eq!(
                target["datasource"]["uid"], "${datasource}",
                "{}",
                panel["title"]
            );
        }
    }
}

#[test]
fn the_metric_name_scanner_finds_names_and_folds_histograms() {
    let names = metric_names(
        "rate(projector_batch_duration_seconds_bucket[5m]) + projector_ready - xprojector_no \
         {consumer_name=\"projector__orders_v1\"}",
    );
    assert_eq!(
        names.into_iter().collect::<Vec<_>>(),
        ["projector_batch_duration_seconds", "projector_ready"]
    );
}

#[test]
fn alert_rules_pass_their_promtool_unit_tests() {
    let promtool = common::prometheus_tool("promtool");
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let check = std::process::Command::new(&promtool)
        .args(["check", "rules", "grafana/alerts.yml"])
        .current_dir(dir)
        .output()
        .expect("promtool");
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );
    let test = std::process::Command::new(&promtool)
        .args(["test", "rules", "grafana/alerts_test.yml"])
        .current_dir(dir)
        .output()
        .expect("promtool");
    assert!(
        test.status.success(),
        "{}{}",
        String::from_utf8_lossy(&test.stdout),
        String::from_utf8_lossy(&test.stderr)
    );
}
