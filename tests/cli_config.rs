//! Bad configuration files: every error case exits 2 with a message naming the TOML path,
//! for `check-config` and for `run`.

mod common;

use std::process::Command;

const GOOD: &str = r#"
[[projection]]
name = "orders"
stream = "ORDERS"
key = "{data.order_id}"
reducer = "merge"
"#;

fn check(text: &str) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(&path, text).unwrap();
    let (code, out, err) = common::run_cli(&["check-config", "--config", path.to_str().unwrap()]);
    (code, format!("{out}{err}"))
}

#[test]
fn a_valid_file_exits_0() {
    let (code, out) = check(GOOD);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("valid (1 projection)"), "{out}");
}

#[test]
fn each_bad_file_exits_2_naming_the_toml_path() {
    let cases: Vec<(String, &str)> = vec![
        (format!("{GOOD}batch = \"lots\"\n"), "projection[0].batch"),
        (
            format!("{GOOD}unknown_knob = 1\n"),
            "projection[0].unknown_knob",
        ),
        (
            format!("{GOOD}ack_wait = \"thirty seconds\"\n"),
            "projection[0].ack_wait",
        ),
        (
            format!("{GOOD}backoff = [\"1s\", \"-\"]\n"),
            "projection[0].backoff[1]",
        ),
        (
            GOOD.replace("{data.order_id}", "{data.order_id"),
            "projection[0].key",
        ),
        (GOOD.replace("merge", "fold"), "projection[0].reducer"),
        (
            GOOD.replace("orders\"\nstream", "Orders!\"\nstream"),
            "projection[0].name",
        ),
        (
            format!("{GOOD}kv_bucket = \"a.b\"\n"),
            "projection[0].kv_bucket",
        ),
        (
            format!("{GOOD}epoch = \"{{data.e}}-x\"\n"),
            "projection[0].epoch",
        ),
        (
            format!("{GOOD}dlq_subject = \"dlq\"\n"),
            "projection[0].dlq_subject",
        ),
        (
            format!("{GOOD}max_ack_pending = 10\n"),
            "projection[0].max_ack_pending",
        ),
        (
            format!("[http]\nlisten = \"nowhere\"\n{GOOD}"),
            "http.listen",
        ),
        (
            format!("[nats]\ncreds_file = \"/no/such.creds\"\n{GOOD}"),
            "nats.creds_file",
        ),
        (format!("[store]\npath = 7\n{GOOD}"), "store.path"),
        (format!("{GOOD}{GOOD}"), "projection[1].name"),
        (
            format!("[nats]\nurl = \"x\"\nbogus = true\n{GOOD}"),
            "nats.bogus",
        ),
        ("".into(), "projection"),
        ("[[projection]\n".into(), "not valid TOML"),
    ];
    for (text, path) in cases {
        let (code, out) = check(&text);
        assert_eq!(code, 2, "expected exit 2 for {path}: {out}");
        assert!(out.contains(path), "the message should name {path}: {out}");
    }
}

#[test]
fn run_refuses_a_bad_file_with_exit_2_and_a_missing_file_too() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(&path, format!("{GOOD}batch = 0\n")).unwrap();
    let (code, _, err) = common::run_cli(&["run", "--config", path.to_str().unwrap()]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("projection[0].batch"), "{err}");
    let (code, _, err) = common::run_cli(&["check-config", "--config", "/no/such/file.toml"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("/no/such/file.toml"), "{err}");
}

#[test]
fn the_config_may_come_from_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(&path, GOOD).unwrap();
    let out = Command::new(common::binary())
        .arg("check-config")
        .env("NATS_PROJECTOR_CONFIG", &path)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn every_command_has_help() {
    for command in ["run", "check-config", "status", "get", "verify"] {
        let (code, out, _) = common::run_cli(&[command, "--help"]);
        assert_eq!(code, 0, "{command} --help");
        assert!(
            out.contains("--config"),
            "{command} --help mentions --config"
        );
    }
}

#[test]
fn worker_threads_must_be_a_positive_number() {
    for bad in ["0", "1.5", "two"] {
        let (code, _, err) = common::run_cli(&["--worker-threads", bad, "snapshot", "verify", "x"]);
        assert_eq!(code, 2, "--worker-threads {bad}: {err}");
        assert!(err.contains("--worker-threads"), "{err}");
    }
    let (code, out, err) = common::run_cli(&["--worker-threads", "1", "run", "--help"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("--worker-threads"), "{out}");
}
