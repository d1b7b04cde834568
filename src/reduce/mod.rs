//! Reducers: how one event changes the JSON state of its key.
//!
//! Every reducer is deterministic: the same events in the same order give the same state, and
//! states serialize to the same bytes (serde_json maps are ordered by key; `latest` keeps compact
//! data as published, which the same events also repeat byte for byte). Deletes
//! (`delete_on`), duplicates, stale epochs and sequence guards are handled by the store around
//! the reducer, so a reducer only folds.

use serde_json::{Map, Number, Value};

use crate::decode::{Event, RawJson};

/// What an event does to its key.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// The key's new state.
    Put(Value),
    /// The key's new state as JSON text: an event's data as published ([`Event::raw_data`]),
    /// stored without parsing it again.
    PutText(RawJson),
    /// The key is deleted (a tombstone); the next event starts again from no state.
    Delete,
}

/// Why a reducer refused an event. The event is dead-lettered with `reducer_error` and this text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ReduceError(pub String);

/// A projection's fold: the state of a key after one more event.
///
/// Implement it to write a reducer in Rust (see `examples/custom_reducer.rs`). It must be
/// deterministic and must not do I/O: it runs inside the store's write transaction, and a
/// replay must reproduce the same bytes.
pub trait Projection: Send + Sync + 'static {
    /// Folds `event` into `state` (`None` for a new key or after a delete).
    fn apply(&self, state: Option<Value>, event: &Event) -> Result<Change, ReduceError>;

    /// [`Projection::apply`] when the caller is done with the event: a reducer may take
    /// `event.data` instead of cloning it. The default calls `apply`.
    fn apply_owned(&self, state: Option<Value>, event: &mut Event) -> Result<Change, ReduceError> {
        self.apply(state, event)
    }

    /// Whether `apply` reads the previous state. `false` lets the store skip parsing it.
    fn needs_state(&self) -> bool {
        true
    }

    /// Whether `apply` never fails. `false` (the safe default) makes the store keep a copy of
    /// the state to restore when an event is refused.
    fn infallible(&self) -> bool {
        false
    }
}

/// `latest`: the state is the event's data.
#[derive(Debug, Clone, Copy, Default)]
pub struct Latest;

impl Projection for Latest {
    fn apply(&self, _state: Option<Value>, event: &Event) -> Result<Change, ReduceError> {
        Ok(match &event.raw_data {
            Some(text) => Change::PutText(text.clone()),
            None => Change::Put(event.data.clone()),
        })
    }

    fn apply_owned(&self, _state: Option<Value>, event: &mut Event) -> Result<Change, ReduceError> {
        Ok(match event.raw_data.take() {
            Some(text) => Change::PutText(text),
            None => Change::Put(std::mem::take(&mut event.data)),
        })
    }

    fn needs_state(&self) -> bool {
        false
    }

    fn infallible(&self) -> bool {
        true
    }
}

/// `merge`: RFC 7386 JSON merge patch of the event's data onto the state.
#[derive(Debug, Clone, Copy, Default)]
pub struct Merge;

impl Projection for Merge {
    fn apply(&self, state: Option<Value>, event: &Event) -> Result<Change, ReduceError> {
        let mut target = state.unwrap_or_else(|| Value::Object(Map::new()));
        merge_patch(&mut target, event.data.clone());
        Ok(Change::Put(target))
    }

    fn apply_owned(&self, state: Option<Value>, event: &mut Event) -> Result<Change, ReduceError> {
        let mut target = state.unwrap_or_else(|| Value::Object(Map::new()));
        merge_patch(&mut target, std::mem::take(&mut event.data));
        Ok(Change::Put(target))
    }

    fn infallible(&self) -> bool {
        true
    }
}

/// `counter`: `{"count": N}` per key, plus `"sum": S` of a numeric data field.
#[derive(Debug, Clone, Default)]
pub struct Counter {
    /// The data path summed into `"sum"` (`sum = "{data.amount}"` → `["amount"]`).
    pub sum: Option<Vec<String>>,
}

impl Projection for Counter {
    fn apply(&self, state: Option<Value>, event: &Event) -> Result<Change, ReduceError> {
        let previous = state.as_ref().and_then(Value::as_object);
        let count = previous
            .and_then(|s| s.get("count"))
            .and_then(Value::as_u64)
            .unwrap_or(0)
            .saturating_add(1);
        let mut next = Map::new();
        next.insert("count".into(), Value::from(count));
        if let Some(path) = &self.sum {
            let addend = data_at(&event.data, path)
                .and_then(Value::as_number)
                .ok_or_else(|| {
                    ReduceError(format!("sum field data.{} is not a number", path.join(".")))
                })?;
            let total = match previous
                .and_then(|s| s.get("sum"))
                .and_then(Value::as_number)
            {
                Some(sum) => add_numbers(sum, addend)?,
                None => addend.clone(),
            };
            next.insert("sum".into(), Value::Number(total));
        }
        Ok(Change::Put(Value::Object(next)))
    }

    fn infallible(&self) -> bool {
        self.sum.is_none()
    }
}

fn data_at<'a>(data: &'a Value, path: &[String]) -> Option<&'a Value> {
    path.iter().try_fold(data, |value, segment| match value {
        Value::Object(map) => map.get(segment),
        Value::Array(items) => segment.parse::<usize>().ok().and_then(|i| items.get(i)),
        _ => None,
    })
}

/// Adds two JSON numbers exactly while both are integers that fit, as `f64` otherwise.
fn add_numbers(a: &Number, b: &Number) -> Result<Number, ReduceError> {
    if let (Some(x), Some(y)) = (a.as_i64(), b.as_i64()) {
        if let Some(total) = x.checked_add(y) {
            return Ok(Number::from(total));
        }
    }
    if let (Some(x), Some(y)) = (a.as_u64(), b.as_u64()) {
        if let Some(total) = x.checked_add(y) {
            return Ok(Number::from(total));
        }
    }
    let (x, y) = (
        a.as_f64().unwrap_or(f64::NAN),
        b.as_f64().unwrap_or(f64::NAN),
    );
    Number::from_f64(x + y)
        .ok_or_else(|| ReduceError("sum overflowed to a non-finite number".into()))
}

/// RFC 7386 JSON merge patch of `patch` onto `target`, in place.
///
/// Recursion is bounded by the patch's nesting, which the decoder caps (`max_depth`).
pub fn merge_patch(target: &mut Value, patch: Value) {
    let Value::Object(patch) = patch else {
        *target = patch;
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    if let Value::Object(map) = target {
        for (name, value) in patch {
            if value.is_null() {
                map.remove(&name);
            } else {
                merge_patch(map.entry(name).or_insert(Value::Null), value);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn ev(data: Value) -> Event {
        Event::for_tests("e", "t", data)
    }

    fn put(change: Change) -> Value {
        match change {
            Change::Put(v) => v,
            Change::PutText(text) => serde_json::from_str(text.as_str()).unwrap(),
            Change::Delete => panic!("expected a put"),
        }
    }

    /// The examples of RFC 7386, section 3.
    #[test]
    fn merge_patch_matches_rfc_7386_examples() {
        let cases = [
            (json!({"a":"b"}), json!({"a":"c"}), json!({"a":"c"})),
            (json!({"a":"b"}), json!({"b":"c"}), json!({"a":"b","b":"c"})),
            (json!({"a":"b"}), json!({"a":null}), json!({})),
            (
                json!({"a":"b","b":"c"}),
                json!({"a":null}),
                json!({"b":"c"}),
            ),
            (json!({"a":["b"]}), json!({"a":"c"}), json!({"a":"c"})),
            (json!({"a":"c"}), json!({"a":["b"]}), json!({"a":["b"]})),
            (
                json!({"a":{"b":"c"}}),
                json!({"a":{"b":"d","c":null}}),
                json!({"a":{"b":"d"}}),
            ),
            (json!({"a":[{"b":"c"}]}), json!({"a":[1]}), json!({"a":[1]})),
            (json!(["a", "b"]), json!(["c", "d"]), json!(["c", "d"])),
            (json!({"a":"b"}), json!(["c"]), json!(["c"])),
            (json!({"a":"foo"}), json!(null), json!(null)),
            (json!({"a":"foo"}), json!("bar"), json!("bar")),
            (json!({"e":null}), json!({"a":1}), json!({"e":null,"a":1})),
            (json!([1, 2]), json!({"a":"b","c":null}), json!({"a":"b"})),
            (
                json!({}),
                json!({"a":{"bb":{"ccc":null}}}),
                json!({"a":{"bb":{}}}),
            ),
        ];
        for (target, patch, expected) in cases {
            let mut t = target.clone();
            merge_patch(&mut t, patch.clone());
            assert_eq!(t, expected, "{target} + {patch}");
        }
    }

    #[test]
    fn merge_starts_from_an_empty_object() {
        let state = put(Merge.apply(None, &ev(json!({"a": 1, "b": null}))).unwrap());
        assert_eq!(state, json!({"a": 1}));
    }

    #[test]
    fn latest_takes_the_data() {
        let state = put(Latest
            .apply(Some(json!({"old": 1})), &ev(json!({"new": 2})))
            .unwrap());
        assert_eq!(state, json!({"new": 2}));
    }

    #[test]
    fn counter_counts_and_sums_exactly() {
        let counter = Counter {
            sum: Some(vec!["amount".into()]),
        };
        let mut state = None;
        for amount in [json!(5), json!(-2), json!(10)] {
            state = Some(put(counter
                .apply(state, &ev(json!({"amount": amount})))
                .unwrap()));
        }
        assert_eq!(state, Some(json!({"count": 3, "sum": 13})));
        let state = put(counter.apply(state, &ev(json!({"amount": 0.5}))).unwrap());
        assert_eq!(state, json!({"count": 4, "sum": 13.5}));
        let err = counter
            .apply(None, &ev(json!({"amount": "7"})))
            .unwrap_err();
        assert!(err.0.contains("not a number"));
        let big = Counter {
            sum: Some(vec!["n".into()]),
        };
        let s = put(big
            .apply(
                Some(json!({"count": 1, "sum": i64::MAX})),
                &ev(json!({"n": 1})),
            )
            .unwrap());
        assert_eq!(s["sum"], json!(9223372036854775808u64));
    }

    #[test]
    fn plain_counter_ignores_data() {
        let state = put(Counter::default().apply(None, &ev(Value::Null)).unwrap());
        assert_eq!(state, json!({"count": 1}));
    }

    fn json_leaf() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i32>().prop_map(Value::from),
            "[a-c]{0,2}".prop_map(Value::String),
        ]
    }

    fn json_value() -> impl Strategy<Value = Value> {
        json_leaf().prop_recursive(4, 24, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..3).prop_map(Value::Array),
                proptest::collection::btree_map("[a-d]", inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    fn has_null_member(v: &Value) -> bool {
        match v {
            Value::Object(m) => m.values().any(|x| x.is_null() || has_null_member(x)),
            _ => false,
        }
    }

    proptest! {
        /// Applying the same patch twice changes nothing the second time (RFC 7386 patches are
        /// idempotent), and an object patch never leaves nulls from the patch behind.
        #[test]
        fn merge_patch_is_idempotent(target in json_value(), patch in json_value()) {
            let mut once = target.clone();
            merge_patch(&mut once, patch.clone());
            let mut twice = once.clone();
            merge_patch(&mut twice, patch.clone());
            prop_assert_eq!(&once, &twice);
            if patch.is_object() && !has_null_member(&target) {
                prop_assert!(!has_null_member(&once));
            }
        }

        /// Same events, same order → same bytes.
        #[test]
        fn reducers_are_deterministic(datas in proptest::collection::vec(json_value(), 1..8)) {
            let run = || {
                let mut state: Option<Value> = None;
                for d in &datas {
                    state = match Merge.apply(state.clone(), &ev(d.clone())).unwrap() {
                        Change::Delete => None,
                        change => Some(put(change)),
                    };
                }
                serde_json::to_vec(&state).unwrap()
            };
            prop_assert_eq!(run(), run());
        }
    }
}
