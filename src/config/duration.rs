//! Serde helpers for humantime durations (`"30s"`, `"1m 30s"`, `"250ms"`).

use std::time::Duration;

use serde::{Deserialize, Deserializer, Serializer, de::Error as _};

/// Deserializes one humantime string.
pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(deserializer)?;
    parse(&text).map_err(D::Error::custom)
}

/// Serializes as a humantime string.
pub fn serialize<S: Serializer>(value: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&humantime::format_duration(*value).to_string())
}

/// Parses a humantime string with an error that quotes it.
pub fn parse(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text)
        .map_err(|err| format!("{text:?} is not a duration like \"30s\" or \"5m\": {err}"))
}

/// The same for lists of durations.
pub mod list {
    use super::*;
    use serde::ser::SerializeSeq;

    /// One element, deserialized on its own so that errors carry its index.
    struct Element(Duration);

    impl<'de> Deserialize<'de> for Element {
        fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
            super::deserialize(deserializer).map(Element)
        }
    }

    /// Deserializes a list of humantime strings.
    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Vec<Duration>, D::Error> {
        let elements = Vec::<Element>::deserialize(deserializer)?;
        Ok(elements.into_iter().map(|e| e.0).collect())
    }

    /// Serializes as a list of humantime strings.
    pub fn serialize<S: Serializer>(values: &[Duration], serializer: S) -> Result<S::Ok, S::Error> {
        let mut seq = serializer.serialize_seq(Some(values.len()))?;
        for value in values {
            seq.serialize_element(&humantime::format_duration(*value).to_string())?;
        }
        seq.end()
    }
}
