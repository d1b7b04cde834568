//! The fixed, bounded set of reasons an event can be dead-lettered.
//!
//! Each code is the `Projector-Error` header of a dead letter and the `error_code` label of the
//! DLQ metrics, so the set is closed: never put a raw error string in its place.

use std::fmt;

/// Why an event could not be applied. `as_str` is the stable wire and metric spelling.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum ErrorCode {
    /// The payload is not valid UTF-8 JSON.
    InvalidJson,
    /// The JSON is not an envelope of the configured format (missing `id`, `type`, ...).
    InvalidEnvelope,
    /// The payload is larger than the projection's `max_event_bytes`.
    TooLarge,
    /// The payload nests objects or arrays deeper than the projection's `max_depth`.
    TooDeep,
    /// A field the key template needs is absent or null.
    MissingKey,
    /// The rendered key is not a valid KV key (empty part, too long, object value...).
    BadKey,
    /// The epoch field is missing or not an unsigned integer.
    BadEpoch,
    /// The reducer refused the event (e.g. a `counter` sum field that is not a number).
    ReducerError,
    /// The local store kept failing until the last delivery.
    StoreUnavailable,
}

impl ErrorCode {
    /// Every code, for metrics pre-registration and documentation.
    pub const ALL: [ErrorCode; 9] = [
        ErrorCode::InvalidJson,
        ErrorCode::InvalidEnvelope,
        ErrorCode::TooLarge,
        ErrorCode::TooDeep,
        ErrorCode::MissingKey,
        ErrorCode::BadKey,
        ErrorCode::BadEpoch,
        ErrorCode::ReducerError,
        ErrorCode::StoreUnavailable,
    ];

    /// The stable spelling used in the `Projector-Error` header and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidJson => "invalid_json",
            ErrorCode::InvalidEnvelope => "invalid_envelope",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::TooDeep => "too_deep",
            ErrorCode::MissingKey => "missing_key",
            ErrorCode::BadKey => "bad_key",
            ErrorCode::BadEpoch => "bad_epoch",
            ErrorCode::ReducerError => "reducer_error",
            ErrorCode::StoreUnavailable => "store_unavailable",
        }
    }

    /// Parses the header spelling back into a code.
    pub fn parse(s: &str) -> Option<ErrorCode> {
        ErrorCode::ALL.into_iter().find(|c| c.as_str() == s)
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An event that can never be applied: it goes to the dead-letter stream with this code and
/// reason. Retrying it would fail the same way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Poison {
    /// The bounded reason, as sent in `Projector-Error`.
    pub code: ErrorCode,
    /// A human explanation, as sent in `Projector-Reason`. Never contains the payload.
    pub reason: String,
}

impl Poison {
    /// A poison verdict with `code` and a human `reason`.
    pub fn new(code: ErrorCode, reason: impl Into<String>) -> Poison {
        Poison {
            code,
            reason: reason.into(),
        }
    }
}

impl fmt::Display for Poison {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.reason)
    }
}

impl std::error::Error for Poison {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_are_unique() {
        let mut seen = std::collections::HashSet::new();
        for code in ErrorCode::ALL {
            assert_eq!(ErrorCode::parse(code.as_str()), Some(code));
            assert!(seen.insert(code.as_str()));
            assert!(
                code.as_str()
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b == b'_')
            );
        }
        assert_eq!(ErrorCode::parse("nope"), None);
    }
}
