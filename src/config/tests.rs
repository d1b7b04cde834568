use super::*;

const CONTRACT_EXAMPLE: &str = r#"
[nats]
url = "nats://127.0.0.1:4222"

[store]
path = "data/projector.redb"

[http]
listen = "127.0.0.1:9464"

[[projection]]
name = "orders"
version = 1
stream = "ORDERS"
filter_subjects = ["orders.event.>"]
durable = "projector__orders"
key = "{data.order_id}"
reducer = "merge"
delete_on = ["order.cancelled"]
epoch = "{data.epoch}"
kv_bucket = "orders_view"
kv_replicas = 1
kv_history = 1
batch = 256
max_ack_pending = 2048
ack_wait = "30s"
max_deliver = 5
backoff = ["1s", "5s", "30s"]
dlq_subject = "dlq.{subject}"
dlq_stream = "PROJECTOR_DLQ"
dedupe_window = "10m"
"#;

fn parse(text: &str) -> Result<Config, Vec<Problem>> {
    Config::parse(text, Path::new(".")).map_err(|e| match e {
        ConfigError::Invalid(problems) => problems,
        other => panic!("unexpected {other}"),
    })
}

fn paths(text: &str) -> Vec<String> {
    parse(text)
        .unwrap_err()
        .into_iter()
        .map(|p| p.path)
        .collect()
}

const MINIMAL: &str =
    "[[projection]]\nname = \"p\"\nstream = \"S\"\nkey = \"{data.id}\"\nreducer = \"latest\"\n";

#[test]
fn the_contract_example_parses() {
    let config = parse(CONTRACT_EXAMPLE).unwrap();
    let p = &config.projection[0];
    assert_eq!(p.durable_name(), "projector__orders");
    assert_eq!(p.ack_wait, Duration::from_secs(30));
    assert_eq!(p.backoff.len(), 3);
    assert_eq!(p.dedupe_window, Duration::from_secs(600));
    assert_eq!(config.http.listen, "127.0.0.1:9464");
}

#[test]
fn defaults_are_documented_values() {
    let config = parse(MINIMAL).unwrap();
    let p = &config.projection[0];
    assert_eq!(p.version, 1);
    assert_eq!(p.durable_name(), "projector__p_v1");
    assert_eq!(p.batch, 256);
    assert_eq!(p.max_ack_pending, 2048);
    assert_eq!(p.max_deliver, 5);
    assert_eq!(p.dlq_subject, "dlq.{subject}");
    assert_eq!(p.dlq_stream, "PROJECTOR_DLQ");
    assert_eq!(p.kv_bucket, None);
    assert_eq!(p.ack_policy, AckMode::Auto);
    assert_eq!(config.store.path, PathBuf::from("data/projector.redb"));
    assert_eq!(config.http.listen, "127.0.0.1:9464");
}

#[test]
fn unknown_keys_name_their_path() {
    assert_eq!(
        paths(&format!("{MINIMAL}batchsize = 3\n")),
        ["projection[0].batchsize"]
    );
    assert_eq!(
        paths(&format!("[nats]\nurll = \"x\"\n{MINIMAL}")),
        ["nats.urll"]
    );
    assert_eq!(paths(&format!("[surprise]\n{MINIMAL}")), ["surprise"]);
    assert_eq!(
        paths(&format!(
            "{MINIMAL}[projection.envelope]\nformat = \"fields\"\nidd = \"x\"\n"
        )),
        ["projection[0].envelope.idd"]
    );
}

#[test]
fn type_errors_name_their_path() {
    assert_eq!(
        paths(&format!("{MINIMAL}batch = \"many\"\n")),
        ["projection[0].batch"]
    );
    assert_eq!(
        paths(&format!("{MINIMAL}ack_wait = \"soon\"\n")),
        ["projection[0].ack_wait"]
    );
    assert_eq!(
        paths(&format!("{MINIMAL}backoff = [\"1s\", \"x\"]\n")),
        ["projection[0].backoff[1]"]
    );
    assert_eq!(
        paths(&format!("{MINIMAL}reducer = \"sum\"\n").replace("reducer = \"latest\"\n", "")),
        ["projection[0].reducer"]
    );
}

#[test]
fn every_semantic_problem_is_reported() {
    let text = r#"
[http]
listen = "everywhere"
[[projection]]
name = "Bad Name"
stream = "a.b"
key = "{data.}"
reducer = "latest"
sum = "{data.x}"
kv_bucket = "no.dots"
batch = 0
max_deliver = 0
dlq_subject = "{subject}.dlq"
[[projection]]
name = "ok"
stream = "S"
key = "{data.id}"
reducer = "counter"
epoch = "e{data.e}"
max_ack_pending = 1
"#;
    let got = paths(text);
    for want in [
        "http.listen",
        "projection[0].name",
        "projection[0].stream",
        "projection[0].key",
        "projection[0].sum",
        "projection[0].kv_bucket",
        "projection[0].batch",
        "projection[0].max_deliver",
        "projection[0].dlq_subject",
        "projection[1].epoch",
        "projection[1].max_ack_pending",
    ] {
        assert!(got.iter().any(|p| p == want), "{want} missing from {got:?}");
    }
}

#[test]
fn duplicate_names_and_missing_projections() {
    assert_eq!(paths(""), ["projection"]);
    assert_eq!(
        paths(&format!("{MINIMAL}{MINIMAL}")),
        ["projection[1].name", "projection[1].durable"]
    );
}

#[test]
fn syntax_errors_say_where() {
    let problems = parse("[[projection]\nname = ").unwrap_err();
    assert!(problems[0].message.contains("line"), "{}", problems[0]);
}
