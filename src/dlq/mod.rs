//! Dead letters: poison events published durably to the DLQ stream with the reason.
//!
//! A dead letter carries the original payload and headers plus `Projector-Error` (a fixed
//! code), `Projector-Reason`, `Projector-Projection`, `Projector-Stream`,
//! `Projector-Stream-Seq`, `Projector-Deliveries` and `Projector-Subject` (the original
//! subject, which `dlq replay` republishes to). It is published with an awaited JetStream ack
//! BEFORE the original is acked, with a `Nats-Msg-Id` derived from the projection and the
//! stream sequence, so a retried publish is deduplicated by the DLQ stream.

mod template;

pub use template::{DlqTemplate, DlqTemplateError};

use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream;
use bytes::Bytes;

use crate::decode::Poison;
use crate::spec::Spec;

/// Header names of a dead letter.
pub mod headers {
    /// The fixed error code (`invalid_json`, ...).
    pub const ERROR: &str = "Projector-Error";
    /// Human-readable reason.
    pub const REASON: &str = "Projector-Reason";
    /// The projection that refused the event.
    pub const PROJECTION: &str = "Projector-Projection";
    /// The projection's version.
    pub const VERSION: &str = "Projector-Version";
    /// The source stream.
    pub const STREAM: &str = "Projector-Stream";
    /// The event's sequence in the source stream.
    pub const STREAM_SEQ: &str = "Projector-Stream-Seq";
    /// The delivery count when it was dead-lettered.
    pub const DELIVERIES: &str = "Projector-Deliveries";
    /// The original subject.
    pub const SUBJECT: &str = "Projector-Subject";
    /// The original `Nats-Msg-Id`, when it had one.
    pub const ORIGINAL_MSG_ID: &str = "Projector-Original-Msg-Id";
}

/// Why publishing a dead letter failed (transient: retried).
#[derive(Debug, thiserror::Error)]
#[error("publishing the dead letter of stream seq {seq} to {subject} failed: {reason}")]
pub struct DlqError {
    /// The original stream sequence.
    pub seq: u64,
    /// The dead-letter subject.
    pub subject: String,
    /// Why.
    pub reason: String,
}

/// Everything needed to publish one dead letter.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// Stream sequence of the original.
    pub seq: u64,
    /// The original subject.
    pub subject: String,
    /// The original headers.
    pub headers: Option<HeaderMap>,
    /// The original payload.
    pub payload: Bytes,
    /// Delivery count.
    pub deliveries: u64,
    /// The verdict.
    pub poison: Poison,
}

impl DeadLetter {
    /// The dead-letter subject and headers.
    pub fn render(&self, spec: &Spec) -> (String, HeaderMap) {
        let c = &spec.config;
        let subject = spec.dlq.render(&c.name, &c.stream, &self.subject);
        let mut out = HeaderMap::new();
        if let Some(original) = &self.headers {
            for (name, values) in original.iter() {
                let name: &str = name.as_ref();
                if name.eq_ignore_ascii_case("Nats-Msg-Id") {
                    if let Some(v) = values.first() {
                        out.insert(headers::ORIGINAL_MSG_ID, v.as_str());
                    }
                    continue;
                }
                // Other Nats-* headers are instructions to the server (expected stream,
                // sequence, TTL...) that must not apply to the DLQ stream.
                if name.len() >= 5 && name[..5].eq_ignore_ascii_case("Nats-") {
                    continue;
                }
                for value in values {
                    out.append(name, value.as_str());
                }
            }
        }
        out.insert(headers::ERROR, self.poison.code.as_str());
        out.insert(headers::REASON, header_safe(&self.poison.reason).as_str());
        out.insert(headers::PROJECTION, c.name.as_str());
        out.insert(headers::VERSION, c.version.to_string().as_str());
        out.insert(headers::STREAM, c.stream.as_str());
        out.insert(headers::STREAM_SEQ, self.seq.to_string().as_str());
        out.insert(headers::DELIVERIES, self.deliveries.to_string().as_str());
        out.insert(headers::SUBJECT, self.subject.as_str());
        out.insert(
            "Nats-Msg-Id",
            format!("projector:{}:{}:{}", spec.namespace, c.stream, self.seq).as_str(),
        );
        (subject, out)
    }

    /// Publishes and awaits the DLQ stream's acknowledgement.
    pub async fn publish(&self, js: &jetstream::Context, spec: &Spec) -> Result<(), DlqError> {
        let (subject, headers) = self.render(spec);
        let fail = |reason: String| DlqError {
            seq: self.seq,
            subject: subject.clone(),
            reason,
        };
        let ack = js
            .publish_with_headers(subject.clone(), headers, self.payload.clone())
            .await
            .map_err(|e| fail(e.to_string()))?;
        match tokio::time::timeout(Duration::from_secs(10), ack.into_future()).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(err)) => Err(fail(err.to_string())),
            Err(_) => Err(fail("timed out waiting for the DLQ stream's ack".into())),
        }
    }
}

/// A header value: one line, printable, at most 512 bytes.
fn header_safe(text: &str) -> String {
    let mut out: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if out.len() > 512 {
        let mut cut = 512;
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        out.truncate(cut);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::ErrorCode;

    #[test]
    fn header_values_are_single_line_and_bounded() {
        assert_eq!(header_safe("a\r\nb"), "a  b");
        assert!(header_safe(&"é".repeat(600)).len() <= 512);
    }

    #[test]
    fn renders_contract_headers_and_strips_server_instructions() {
        let config = crate::config::Config::parse(
            "[[projection]]\nname=\"o\"\nstream=\"ORDERS\"\nkey=\"{data.id}\"\nreducer=\"latest\"\n",
            std::path::Path::new("."),
        )
        .unwrap();
        let spec = Spec::compile(&config.projection[0], None).unwrap();
        let mut original = HeaderMap::new();
        original.insert("Nats-Msg-Id", "m1");
        original.insert("Nats-Expected-Stream", "ORDERS");
        original.insert("X-Correlation-Id", "c1");
        let letter = DeadLetter {
            seq: 42,
            subject: "orders.event.x".into(),
            headers: Some(original),
            payload: Bytes::from_static(b"{"),
            deliveries: 1,
            poison: Poison::new(ErrorCode::InvalidJson, "bad\njson"),
        };
        let (subject, h) = letter.render(&spec);
        assert_eq!(subject, "dlq.orders.event.x");
        let get = |n: &str| h.get(n).map(|v| v.as_str().to_owned());
        assert_eq!(get(headers::ERROR).as_deref(), Some("invalid_json"));
        assert_eq!(get(headers::REASON).as_deref(), Some("bad json"));
        assert_eq!(get(headers::STREAM_SEQ).as_deref(), Some("42"));
        assert_eq!(get(headers::ORIGINAL_MSG_ID).as_deref(), Some("m1"));
        assert_eq!(get("X-Correlation-Id").as_deref(), Some("c1"));
        assert_eq!(get("Nats-Expected-Stream"), None);
        assert_eq!(
            get("Nats-Msg-Id").as_deref(),
            Some("projector:o@v1:ORDERS:42")
        );
    }
}

/// A dead letter as `dlq list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Listed {
    /// Its sequence in the DLQ stream.
    pub dlq_seq: u64,
    /// The projection that refused it.
    pub projection: String,
    /// The source stream.
    pub stream: String,
    /// Its sequence in the source stream.
    pub stream_seq: u64,
    /// The fixed error code.
    pub error_code: String,
    /// The reason.
    pub reason: String,
    /// The original subject.
    pub subject: String,
    /// Deliveries when it was dead-lettered.
    pub deliveries: u64,
}

/// Every dead letter in `dlq_stream` (of `projection`, when given), oldest first, with the
/// message itself (for replays).
pub async fn list(
    js: &jetstream::Context,
    dlq_stream: &str,
    projection: Option<&str>,
) -> Result<Vec<(Listed, crate::consume::Incoming)>, String> {
    let stream = match crate::consume::stream_of(js, dlq_stream).await {
        Ok(stream) => stream,
        Err(crate::consume::NatsError::StreamNotFound(_)) => return Ok(Vec::new()),
        Err(err) => return Err(err.to_string()),
    };
    let last = stream.cached_info().state.last_sequence;
    let mut out = Vec::new();
    let mut cursor = 0;
    while cursor < last {
        let chunk = crate::consume::read_range(&stream, &[], cursor, last, 1024)
            .await
            .map_err(|e| e.to_string())?;
        let Some(end) = chunk.last().map(|m| m.seq) else {
            break;
        };
        cursor = end;
        for m in chunk {
            let get = |name: &str| {
                m.headers
                    .as_ref()
                    .and_then(|h| h.get(name))
                    .map(|v| v.as_str().to_owned())
                    .unwrap_or_default()
            };
            let listed = Listed {
                dlq_seq: m.seq,
                projection: get(headers::PROJECTION),
                stream: get(headers::STREAM),
                stream_seq: get(headers::STREAM_SEQ).parse().unwrap_or(0),
                error_code: get(headers::ERROR),
                reason: get(headers::REASON),
                subject: get(headers::SUBJECT),
                deliveries: get(headers::DELIVERIES).parse().unwrap_or(0),
            };
            if projection.is_none_or(|p| p == listed.projection) && !listed.subject.is_empty() {
                out.push((listed, m));
            }
        }
    }
    Ok(out)
}

/// Republishes a dead letter to its original subject, with its original headers (the
/// `Projector-*` ones removed) and a `Nats-Msg-Id` derived from its DLQ sequence, so that
/// replaying the same dead letter twice is deduplicated by the source stream.
pub async fn republish(
    js: &jetstream::Context,
    dlq_stream: &str,
    listed: &Listed,
    message: &crate::consume::Incoming,
) -> Result<u64, String> {
    let mut out = HeaderMap::new();
    if let Some(original) = &message.headers {
        for (name, values) in original.iter() {
            let name: &str = name.as_ref();
            let lower = name.to_ascii_lowercase();
            if lower.starts_with("projector-") || lower.starts_with("nats-") {
                continue;
            }
            for value in values {
                out.append(name, value.as_str());
            }
        }
    }
    out.insert(
        "Nats-Msg-Id",
        format!("dlq-replay:{dlq_stream}:{}", listed.dlq_seq).as_str(),
    );
    let ack = js
        .publish_with_headers(listed.subject.clone(), out, message.payload.clone())
        .await
        .map_err(|e| format!("republish to {}: {e}", listed.subject))?;
    let ack = tokio::time::timeout(Duration::from_secs(10), ack.into_future())
        .await
        .map_err(|_| format!("republish to {}: no ack", listed.subject))?
        .map_err(|e| format!("republish to {}: {e}", listed.subject))?;
    Ok(ack.sequence)
}
