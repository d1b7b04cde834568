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

/// Applies one batch and returns its outcomes.
fn outcomes(store: &Store, spec: &Spec, items: Vec<Item>) -> Vec<Outcome> {
    store
        .apply(spec, items, &Housekeeping::default(), None)
        .unwrap()
        .outcomes
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
        assert_eq!(
            outcomes(&store, &spec, items),
            vec![Outcome::Applied, Outcome::Duplicate, Outcome::Duplicate],
            "{reducer}"
        );
    }
}

/// The dedupe filter of a fresh handle loads the markers already in the file, in every bucket
/// the window reaches (the one before, the same, the one after), and an import replaces them.
#[test]
fn dedupe_markers_survive_a_reopen_and_an_import() {
    let spec = spec_for("counter", "dedupe_window = \"1s\"");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    let d = |k: &str| serde_json::json!({"k": k});
    {
        let store = Store::open(&path, 4).unwrap();
        let items = vec![
            item(&spec, 1, 10_999, "early", d("a")),
            item(&spec, 2, 11_500, "mid", d("b")),
            item(&spec, 3, 12_001, "late", d("c")),
        ];
        assert_eq!(outcomes(&store, &spec, items), vec![Outcome::Applied; 3]);
    }
    let store = Store::open(&path, 4).unwrap();
    // Re-published within the window, under other keys, from the neighbouring buckets.
    let again = vec![
        item(&spec, 4, 11_600, "early", d("x")),
        item(&spec, 5, 11_600, "mid", d("y")),
        item(&spec, 6, 11_600, "late", d("z")),
        item(&spec, 7, 11_600, "new", d("w")),
    ];
    let mut expected = vec![Outcome::Duplicate; 3];
    expected.push(Outcome::Applied);
    assert_eq!(outcomes(&store, &spec, again), expected);

    // An import that carries a marker the filter has never seen.
    let mut contents = store.export(&spec.namespace).unwrap();
    contents.markers.push((11, "imported".into(), 8, 11_700));
    store.import(&spec.namespace, &contents, false).unwrap();
    let imported = vec![item(&spec, 9, 11_800, "imported", d("v"))];
    assert_eq!(outcomes(&store, &spec, imported), vec![Outcome::Duplicate]);
}
