//! The JSON Schemas in `schemas/` agree with the code: golden fixtures validate, the values
//! the store writes to KV validate, and what the schemas refuse the decoder refuses too.

use std::path::Path;

use nats_projector::decode::{Decoder, FieldMap, Format};
use nats_projector::store::Record;
use serde_json::{Value, json};

fn load(path: &str) -> Value {
    let full = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    serde_json::from_str(&std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("{path}: {e}")))
        .unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn validator(path: &str) -> jsonschema::Validator {
    jsonschema::validator_for(&load(path)).expect("a valid schema")
}

#[test]
fn every_fixture_event_is_a_valid_cloudevent_that_decodes() {
    let schema = validator("schemas/cloudevent.schema.json");
    let decoder = Decoder::default();
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/orders.jsonl"),
    )
    .unwrap();
    let mut count = 0;
    for line in text.lines() {
        let event = serde_json::from_str::<Value>(line).unwrap()["event"].clone();
        if let Err(err) = schema.validate(&event) {
            panic!("fixture event does not validate: {err}: {event}");
        }
        decoder
            .decode(&serde_json::to_vec(&event).unwrap())
            .expect("decodes");
        count += 1;
    }
    assert_eq!(count, 5000);
}

#[test]
fn what_the_cloudevent_schema_refuses_the_decoder_refuses() {
    let schema = validator("schemas/cloudevent.schema.json");
    let decoder = Decoder::default();
    let base = json!({"specversion": "1.0", "id": "e", "source": "s", "type": "t"});
    assert!(schema.is_valid(&base));
    assert!(decoder.decode(&serde_json::to_vec(&base).unwrap()).is_ok());
    let mut bad = Vec::new();
    for field in ["specversion", "id", "source", "type"] {
        let mut v = base.clone();
        v.as_object_mut().unwrap().remove(field);
        bad.push(v);
    }
    let mut v = base.clone();
    v["specversion"] = json!("0.3");
    bad.push(v);
    let mut v = base.clone();
    v["data_base64"] = json!("AA==");
    bad.push(v);
    let mut v = base.clone();
    v["id"] = json!("");
    bad.push(v);
    for v in bad {
        assert!(!schema.is_valid(&v), "schema accepts {v}");
        assert!(
            decoder.decode(&serde_json::to_vec(&v).unwrap()).is_err(),
            "decoder accepts {v}"
        );
    }
}

#[test]
fn the_field_map_example_validates_and_decodes() {
    let schema = validator("schemas/fields-envelope.schema.json");
    let example = load("schemas/examples/fields-envelope.json");
    schema.validate(&example).expect("valid");
    let decoder = Decoder {
        format: Format::Fields(FieldMap::default()),
        ..Decoder::default()
    };
    let event = decoder
        .decode(&serde_json::to_vec(&example).unwrap())
        .unwrap();
    assert_eq!(event.dedupe_id(), "order-17-placed");
    assert_eq!(event.data["order_id"], "ord-17");
    let missing = json!({"eventType": "x"});
    assert!(!schema.is_valid(&missing));
    assert!(
        decoder
            .decode(&serde_json::to_vec(&missing).unwrap())
            .is_err()
    );
}

#[test]
fn kv_values_written_by_the_store_validate() {
    let schema = validator("schemas/kv-value.schema.json");
    for example in [
        "schemas/examples/kv-value.json",
        "schemas/examples/kv-tombstone.json",
    ] {
        schema
            .validate(&load(example))
            .unwrap_or_else(|e| panic!("{example}: {e}"));
    }
    let live = Record {
        state: Some(br#"{"a":[1,2],"b":{"c":null}}"#.to_vec()),
        seq: 9,
        event_id: "e9".into(),
        epoch: None,
        kv_revision: 0,
    };
    let tombstone = Record {
        state: None,
        epoch: Some(4),
        ..live.clone()
    };
    for record in [live, tombstone] {
        let value: Value = serde_json::from_slice(&record.kv_value("orders", 2)).unwrap();
        schema
            .validate(&value)
            .unwrap_or_else(|e| panic!("{value}: {e}"));
    }
    let both = json!({"state": {}, "deleted": true, "last_applied_stream_seq": 1,
        "last_applied_event_id": "e", "epoch": null, "projection": "p", "version": 1});
    assert!(!schema.is_valid(&both), "state and deleted are exclusive");
}
