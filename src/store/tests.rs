use super::*;
use crate::config::Config;
use crate::spec::MessageView;
use std::path::Path;

pub(crate) fn spec_for(reducer: &str, extra: &str) -> Spec {
    let toml = format!(
        "[[projection]]\nname = \"t\"\nstream = \"S\"\nkey = \"{{data.k}}\"\nreducer = \"{reducer}\"\nkv_bucket = \"kv\"\n{extra}\n"
    );
    let config = Config::parse(&toml, Path::new(".")).expect("valid config");
    Spec::compile(&config.projection[0], None).expect("compiles")
}

fn item(spec: &Spec, seq: u64, ms: u64, id: &str, data: serde_json::Value) -> Item {
    let payload = serde_json::to_vec(&serde_json::json!({"specversion": "1.0", "id": id,
        "source": "t", "type": "updated", "data": data}))
    .unwrap();
    let view = MessageView {
        seq,
        subject: "s",
        headers: None,
        payload: &payload,
        publish_ms: ms,
    };
    Item::Event(spec.prepare(&view).unwrap())
}

#[test]
fn republished_id_in_one_batch_is_a_duplicate() {
    for reducer in ["merge", "counter", "latest"] {
        let spec = spec_for(reducer, "dedupe_window = \"50ms\"");
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("s.redb"), 4).unwrap();
        let d = serde_json::json!({"k": "k1", "f0": 0});
        let items = vec![
            item(&spec, 1, 1_000_014, "e1", d.clone()),
            item(&spec, 2, 1_000_015, "e1", d.clone()),
            item(&spec, 3, 1_000_016, "e1", d),
        ];
        let applied = store
            .apply(&spec, items, &Housekeeping::default(), None)
            .unwrap();
        assert_eq!(
            applied.outcomes,
            vec![Outcome::Applied, Outcome::Duplicate, Outcome::Duplicate],
            "{reducer}"
        );
    }
}
