//! Model-based property test of the apply path: random event sequences with redeliveries,
//! re-published envelope ids, deletes, epochs and poison, cut into random batches and applied
//! through the real redb store (reopened after the larger batches, so its caches reload), must leave exactly the state a simple in-memory model computes,
//! with the same outcome for every delivery.

use std::collections::BTreeMap;
use std::path::Path;

use nats_projector::config::Config;
use nats_projector::reduce::merge_patch;
use nats_projector::spec::{MessageView, Spec};
use nats_projector::store::{Housekeeping, Item, Outcome, Position, Store};
use proptest::prelude::*;
use serde_json::{Value, json};

const WINDOW_MS: u64 = 50;

fn spec(reducer: &str) -> Spec {
    let toml = format!(
        r#"
        [[projection]]
        name = "model"
        stream = "S"
        key = "{{data.k}}"
        reducer = "{reducer}"
        delete_on = ["deleted"]
        epoch = "{{data.epoch}}"
        kv_bucket = "model_kv"
        dedupe_window = "{WINDOW_MS}ms"
        "#
    );
    let config = Config::parse(&toml, Path::new(".")).expect("valid config");
    Spec::compile(&config.projection[0], None).expect("compiles")
}

/// One published message.
#[derive(Debug, Clone)]
struct Published {
    seq: u64,
    publish_ms: u64,
    payload: Vec<u8>,
}

#[derive(Debug, Clone)]
enum Gen {
    /// A new event: key index, patch value, epoch, delete?
    Event {
        key: u8,
        value: i8,
        field: u8,
        epoch: u8,
        delete: bool,
    },
    /// Re-publish the envelope of an earlier message (same id) with a new sequence.
    Republish { back: usize },
    /// Redeliver an earlier message (same sequence).
    Redeliver { back: usize },
    /// A payload that is not JSON.
    Poison,
    /// Time passes (so some re-published ids fall outside the dedupe window).
    Wait { ms: u8 },
}

fn gen_step() -> impl Strategy<Value = Gen> {
    prop_oneof![
        6 => (0u8..4, any::<i8>(), 0u8..3, 0u8..3, prop::bool::weighted(0.15)).prop_map(
            |(key, value, field, epoch, delete)| Gen::Event { key, value, field, epoch, delete }
        ),
        2 => (0usize..10).prop_map(|back| Gen::Republish { back }),
        2 => (0usize..10).prop_map(|back| Gen::Redeliver { back }),
        1 => Just(Gen::Poison),
        1 => (0u8..40).prop_map(|ms| Gen::Wait { ms }),
    ]
}

#[derive(Debug, Clone, PartialEq)]
struct ModelRecord {
    state: Option<Value>,
    seq: u64,
    event_id: String,
    epoch: Option<u64>,
}

#[derive(Default)]
struct Model {
    keys: BTreeMap<String, ModelRecord>,
    applied_ids: Vec<(String, u64)>,
    dead: Vec<u64>,
}

impl Model {
    fn deliver(&mut self, m: &Published, reducer: &str) -> Outcome {
        if self.dead.contains(&m.seq) {
            return Outcome::AlreadyDead;
        }
        // A dead letter counts as published only once the batch that found it is done (the
        // pipeline records it in the next transaction, after the DLQ stream acknowledged it).
        let Ok(envelope) = serde_json::from_slice::<Value>(&m.payload) else {
            return Outcome::Poison(nats_projector::decode::Poison::new(
                nats_projector::decode::ErrorCode::InvalidJson,
                "",
            ));
        };
        let id = envelope["id"].as_str().unwrap_or_default().to_owned();
        let data = envelope["data"].clone();
        let key = data["k"].as_str().unwrap_or_default().to_owned();
        let epoch = data["epoch"].as_u64().unwrap_or(0);
        let delete = envelope["type"] == "deleted";
        let record = self.keys.get(&key).cloned();
        if record.as_ref().is_some_and(|r| m.seq <= r.seq) {
            return Outcome::Duplicate;
        }
        if self
            .applied_ids
            .iter()
            .any(|(i, ms)| *i == id && ms.abs_diff(m.publish_ms) <= WINDOW_MS)
        {
            return Outcome::Duplicate;
        }
        let stored_epoch = record.as_ref().and_then(|r| r.epoch).unwrap_or(0);
        if epoch < stored_epoch {
            return Outcome::StaleEpoch;
        }
        let previous = record.and_then(|r| r.state);
        let state = if delete {
            None
        } else {
            Some(match reducer {
                "merge" => {
                    let mut target = previous.unwrap_or_else(|| json!({}));
                    merge_patch(&mut target, data);
                    target
                }
                "latest" => data,
                _ => {
                    let count = previous.map_or(0, |p| p["count"].as_u64().unwrap_or(0));
                    json!({"count": count + 1})
                }
            })
        };
        self.keys.insert(
            key,
            ModelRecord {
                state,
                seq: m.seq,
                event_id: id.clone(),
                epoch: Some(epoch.max(stored_epoch)),
            },
        );
        self.applied_ids.push((id, m.publish_ms));
        Outcome::Applied
    }
}

fn build(steps: &[Gen]) -> Vec<Published> {
    let mut stream: Vec<Published> = Vec::new();
    let mut deliveries = Vec::new();
    let mut now = 1_000_000u64;
    let mut next_id = 0;
    for step in steps {
        now += 1;
        match step {
            Gen::Event {
                key,
                value,
                field,
                epoch,
                delete,
            } => {
                next_id += 1;
                let data = json!({"k": format!("k{key}"), "epoch": epoch,
                    format!("f{field}"): if *value < -100 { Value::Null } else { json!(value) }});
                let envelope = json!({"specversion": "1.0", "id": format!("e{next_id}"),
                    "source": "model", "type": if *delete { "deleted" } else { "updated" },
                    "data": data});
                let m = Published {
                    seq: stream.len() as u64 + 1,
                    publish_ms: now,
                    payload: serde_json::to_vec(&envelope).unwrap(),
                };
                stream.push(m.clone());
                deliveries.push(m);
            }
            Gen::Republish { back } if !stream.is_empty() => {
                let original = &stream[stream.len() - 1 - back % stream.len()];
                let m = Published {
                    seq: stream.len() as u64 + 1,
                    publish_ms: now,
                    payload: original.payload.clone(),
                };
                stream.push(m.clone());
                deliveries.push(m);
            }
            Gen::Redeliver { back } if !stream.is_empty() => {
                deliveries.push(stream[stream.len() - 1 - back % stream.len()].clone());
            }
            Gen::Poison => {
                let m = Published {
                    seq: stream.len() as u64 + 1,
                    publish_ms: now,
                    payload: b"{not json".to_vec(),
                };
                stream.push(m.clone());
                deliveries.push(m);
            }
            Gen::Wait { ms } => now += u64::from(*ms),
            _ => {}
        }
    }
    deliveries
}

fn run(reducer: &str, steps: Vec<Gen>, cuts: Vec<usize>) -> Result<(), TestCaseError> {
    let spec = spec(reducer);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.redb");
    let mut store = Store::open(&path, 4).unwrap();
    let deliveries = build(&steps);
    let mut model = Model::default();
    let mut house = Housekeeping::default();
    let mut cut_iter = cuts.into_iter().cycle();
    let publish_ms: BTreeMap<u64, u64> = deliveries.iter().map(|m| (m.seq, m.publish_ms)).collect();
    let mut processed_max = 0;
    let mut i = 0;
    while i < deliveries.len() {
        let size = cut_iter.next().unwrap_or(1).max(1);
        let batch = &deliveries[i..(i + size).min(deliveries.len())];
        i += batch.len();
        let items: Vec<Item> = batch
            .iter()
            .map(|m| {
                let view = MessageView {
                    seq: m.seq,
                    subject: "s.x",
                    headers: None,
                    payload: &m.payload,
                    publish_ms: m.publish_ms,
                };
                match spec.prepare(&view) {
                    Ok(p) => Item::Event(p),
                    Err(poison) => Item::Poison { seq: m.seq, poison },
                }
            })
            .collect();
        let last = batch.iter().max_by_key(|m| m.seq).unwrap();
        let position = Position {
            stream: "S".into(),
            stream_created_ns: 0,
            seq: last.seq,
            publish_ms: last.publish_ms,
            payload_sha256: [0; 32],
        };
        let applied = store.apply(&spec, items, &house, Some(&position)).unwrap();
        house = Housekeeping::default();
        let mut published = Vec::new();
        for (m, outcome) in batch.iter().zip(&applied.outcomes) {
            let expected = model.deliver(m, reducer);
            match (&expected, outcome) {
                (Outcome::Poison(_), Outcome::Poison(p)) => {
                    published.push(m.seq);
                    house.dead_published.push((
                        m.seq,
                        nats_projector::store::DeadNote {
                            code: p.code.to_string(),
                            reason: p.reason.clone(),
                            subject: "s.x".into(),
                        },
                    ));
                }
                _ => prop_assert_eq!(&expected, outcome, "seq {}", m.seq),
            }
        }
        model.dead.extend(published);
        // The consumer's ack floor: everything below the first sequence still to be
        // (re)delivered, as far as processed (a redelivery means it was never acked).
        processed_max = batch
            .iter()
            .map(|m| m.seq)
            .max()
            .unwrap_or(0)
            .max(processed_max);
        let next_min = deliveries[i..]
            .iter()
            .map(|m| m.seq)
            .min()
            .unwrap_or(u64::MAX);
        let floor = processed_max.min(next_min.saturating_sub(1));
        if floor > 0 {
            house.ack_floor = Some((floor, publish_ms[&floor]));
        }
        // Each dirty key is written to KV once per batch, with the store's latest value.
        let mut seen = std::collections::HashSet::new();
        for write in &applied.kv_writes {
            prop_assert!(
                seen.insert(write.key.clone()),
                "one KV write per key per batch"
            );
            let stored = store.record(&spec.namespace, &write.key).unwrap().unwrap();
            prop_assert_eq!(write.seq, stored.seq);
            prop_assert_eq!(write.delete, stored.is_deleted());
        }
        // After the larger batches, a restart: the dedupe caches reload from the tables.
        if size >= 10 {
            drop(store);
            store = Store::open(&path, 4).unwrap();
        }
    }
    let stored = store.records(&spec.namespace).unwrap();
    prop_assert_eq!(stored.len(), model.keys.len());
    for (key, record) in stored {
        let expected = &model.keys[&key];
        let state = record
            .state
            .as_ref()
            .map(|bytes| serde_json::from_slice::<Value>(bytes).unwrap());
        prop_assert_eq!(&state, &expected.state, "state of {}", key);
        prop_assert_eq!(record.seq, expected.seq);
        prop_assert_eq!(&record.event_id, &expected.event_id);
        prop_assert_eq!(record.epoch, expected.epoch);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn merge_store_equals_model(
        steps in prop::collection::vec(gen_step(), 1..80),
        cuts in prop::collection::vec(1usize..12, 1..6),
    ) {
        run("merge", steps, cuts)?;
    }

    #[test]
    fn latest_store_equals_model(
        steps in prop::collection::vec(gen_step(), 1..60),
        cuts in prop::collection::vec(1usize..12, 1..6),
    ) {
        run("latest", steps, cuts)?;
    }

    #[test]
    fn counter_store_equals_model(
        steps in prop::collection::vec(gen_step(), 1..60),
        cuts in prop::collection::vec(1usize..12, 1..6),
    ) {
        run("counter", steps, cuts)?;
    }
}
