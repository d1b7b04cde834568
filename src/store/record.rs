//! What the store keeps per key, per projection and per dead letter, and the KV value format.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The stored state of one key of one projection.
///
/// Invariant: `seq` only grows. A tombstone (`state == None`) keeps its `seq`, `event_id` and
/// `epoch`, so a replay cannot resurrect the key and a stale owner cannot write it again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// The state as JSON bytes, or `None` for a deleted key.
    #[serde(with = "optional_bytes")]
    pub state: Option<Vec<u8>>,
    /// The stream sequence of the last applied event.
    pub seq: u64,
    /// The envelope id of the last applied event.
    pub event_id: String,
    /// The highest epoch applied to the key (`None` when the projection has no epoch field).
    pub epoch: Option<u64>,
    /// The KV revision last known for the key (a hint for compare-and-set; 0 when unknown).
    pub kv_revision: u64,
}

impl Record {
    /// Whether this is a tombstone.
    pub fn is_deleted(&self) -> bool {
        self.state.is_none()
    }

    /// The value written to KV and printed by `get`: section 4 of the contract for a live key,
    /// and for a tombstone the same fields with `"deleted": true` instead of `"state"` (carried
    /// as the payload of the KV delete, so that KV alone can rebuild tombstones).
    pub fn kv_value(&self, projection: &str, version: u32) -> Vec<u8> {
        let state_len = self.state.as_ref().map_or(0, Vec::len);
        let mut out = Vec::with_capacity(state_len + self.event_id.len() + projection.len() + 128);
        match &self.state {
            Some(state) => {
                out.extend_from_slice(b"{\"state\":");
                out.extend_from_slice(state);
            }
            None => out.extend_from_slice(b"{\"deleted\":true"),
        }
        out.extend_from_slice(b",\"last_applied_stream_seq\":");
        out.extend_from_slice(self.seq.to_string().as_bytes());
        out.extend_from_slice(b",\"last_applied_event_id\":");
        write_json_string(&mut out, &self.event_id);
        out.extend_from_slice(b",\"epoch\":");
        match self.epoch {
            Some(epoch) => out.extend_from_slice(epoch.to_string().as_bytes()),
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\"projection\":");
        write_json_string(&mut out, projection);
        out.extend_from_slice(b",\"version\":");
        out.extend_from_slice(version.to_string().as_bytes());
        out.push(b'}');
        out
    }
}

/// A stored [`Record`] read in place: its state and event id borrowed from the stored bytes.
/// Same encoding as [`Record`].
#[derive(Debug, Deserialize)]
pub(crate) struct RecordRef<'a> {
    /// The state as JSON bytes, or `None` for a deleted key.
    #[serde(borrow)]
    pub state: Option<&'a [u8]>,
    /// The stream sequence of the last applied event.
    pub seq: u64,
    /// The envelope id of the last applied event.
    #[serde(borrow)]
    pub event_id: &'a str,
    /// The highest epoch applied to the key.
    pub epoch: Option<u64>,
    /// The KV revision last known for the key.
    pub kv_revision: u64,
}

/// `Option<Vec<u8>>` as one byte string instead of a sequence of `u8`s: the same bincode
/// bytes (a length, then the bytes), encoded and decoded in one copy instead of byte by byte.
mod optional_bytes {
    use serde::de::{Deserializer, SeqAccess, Visitor};
    use serde::ser::Serializer;

    pub fn serialize<S: Serializer>(value: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        match value {
            Some(bytes) => s.serialize_some(&Bytes(bytes)),
            None => s.serialize_none(),
        }
    }

    /// A byte slice that serializes as a byte string.
    struct Bytes<'a>(&'a [u8]);

    impl serde::Serialize for Bytes<'_> {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            s.serialize_bytes(self.0)
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
        d.deserialize_option(OptionVisitor)
    }

    struct OptionVisitor;

    impl<'de> Visitor<'de> for OptionVisitor {
        type Value = Option<Vec<u8>>;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("optional bytes")
        }

        fn visit_none<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_byte_buf(BytesVisitor).map(Some)
        }
    }

    struct BytesVisitor;

    impl<'de> Visitor<'de> for BytesVisitor {
        type Value = Vec<u8>;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("bytes")
        }

        fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
            Ok(v.to_vec())
        }

        fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
            Ok(v)
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
            let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 20));
            while let Some(b) = seq.next_element::<u8>()? {
                out.push(b);
            }
            Ok(out)
        }
    }
}

fn write_json_string(out: &mut Vec<u8>, text: &str) {
    // Serializing a &str into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, text);
}

/// A KV value read back (by `verify`, by conflict resolution, by restore-from-KV).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KvValue {
    /// The state (absent for tombstones).
    #[serde(default)]
    pub state: Option<Value>,
    /// `true` for the payload of a KV delete written by the projector.
    #[serde(default)]
    pub deleted: bool,
    /// The stream sequence of the last applied event.
    pub last_applied_stream_seq: u64,
    /// The envelope id of the last applied event.
    pub last_applied_event_id: String,
    /// The key's epoch.
    pub epoch: Option<u64>,
    /// The projection name.
    pub projection: String,
    /// The projection version.
    pub version: u32,
}

/// The durable progress of one projection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Checkpoint {
    /// The stream the projection reads.
    pub stream: String,
    /// The stream's `created` time (Unix nanoseconds) when the checkpoint was written.
    pub stream_created_ns: i128,
    /// The highest stream sequence processed (applied, duplicate, stale or dead-lettered).
    pub last_seq: u64,
    /// That message's publish time, Unix milliseconds.
    pub last_publish_ms: u64,
    /// SHA-256 of that message's payload.
    pub last_payload_sha256: [u8; 32],
    /// Events applied since the store was created.
    pub applied: u64,
    /// Every stream sequence at or below this was processed by this store AND acknowledged to
    /// the durable consumer (its ack floor, capped by `last_seq`): the durable never redelivers
    /// it, and a replay skips it.
    pub acked_floor: u64,
    /// A lower bound of the publish time (Unix ms) of the message at `acked_floor`: dedupe
    /// markers older than this minus the window can never match again.
    pub acked_floor_ms: u64,
}

/// A dead letter the projection published, recorded so that a replay does not publish it twice.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadNote {
    /// The `Projector-Error` code.
    pub code: String,
    /// The `Projector-Reason` text.
    pub reason: String,
    /// The original subject.
    pub subject: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The stored format before `state` was encoded as a byte string.
    #[derive(Serialize, Deserialize, PartialEq, Debug)]
    struct RecordV0 {
        state: Option<Vec<u8>>,
        seq: u64,
        event_id: String,
        epoch: Option<u64>,
        kv_revision: u64,
    }

    #[test]
    fn state_as_a_byte_string_keeps_the_stored_bincode_format() {
        let config = bincode::config::standard();
        for state in [
            None,
            Some(Vec::new()),
            Some(br#"{"a":[1,2,300]}"#.repeat(20)),
        ] {
            let new = Record {
                state: state.clone(),
                seq: 1 << 40,
                event_id: "e1".into(),
                epoch: Some(7),
                kv_revision: 3,
            };
            let old = RecordV0 {
                state,
                seq: 1 << 40,
                event_id: "e1".into(),
                epoch: Some(7),
                kv_revision: 3,
            };
            let new_bytes = bincode::serde::encode_to_vec(&new, config).unwrap();
            let old_bytes = bincode::serde::encode_to_vec(&old, config).unwrap();
            assert_eq!(new_bytes, old_bytes);
            let (back, _): (Record, usize) =
                bincode::serde::decode_from_slice(&old_bytes, config).unwrap();
            assert_eq!(back, new);
        }
    }

    #[test]
    fn kv_value_has_the_contract_shape() {
        let record = Record {
            state: Some(br#"{"a":1}"#.to_vec()),
            seq: 1042,
            event_id: "evt_\"9f2".into(),
            epoch: Some(3),
            kv_revision: 0,
        };
        let value: Value = serde_json::from_slice(&record.kv_value("orders", 1)).unwrap();
        assert_eq!(
            value,
            json!({"state": {"a": 1}, "last_applied_stream_seq": 1042,
                "last_applied_event_id": "evt_\"9f2", "epoch": 3, "projection": "orders", "version": 1})
        );
        let parsed: KvValue = serde_json::from_value(value).unwrap();
        assert!(!parsed.deleted);
    }

    #[test]
    fn tombstone_value_is_marked_deleted_and_has_null_epoch_when_unfenced() {
        let record = Record {
            state: None,
            seq: 7,
            event_id: "e".into(),
            epoch: None,
            kv_revision: 0,
        };
        let value: KvValue = serde_json::from_slice(&record.kv_value("p", 2)).unwrap();
        assert!(value.deleted);
        assert_eq!(value.state, None);
        assert_eq!(value.epoch, None);
        assert_eq!(value.last_applied_stream_seq, 7);
    }
}
