//! Replay continuity: sequence numbers alone are not trusted.
//!
//! The checkpoint records the stream's `created` time, the last processed sequence, and that
//! message's payload hash. A gap is any of: the stream was re-created; it is shorter than the
//! checkpoint (a lost tail, after which the server may reuse sequence numbers); the message at
//! the checkpoint's sequence no longer matches its hash; or messages after the checkpoint were
//! removed (purge, retention) or consumed before this store applied them. A gap fails closed.

use async_nats::jetstream::stream;
use sha2::{Digest, Sha256};

use crate::store::Checkpoint;

/// What kind of continuity failure was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum GapKind {
    /// The stream has another `created` time than the checkpoint's.
    Recreated,
    /// The stream's last sequence is below the checkpoint's.
    LostTail,
    /// The message at the checkpoint's sequence has another payload.
    Rewritten,
    /// Messages after the checkpoint are gone or were acked without this store.
    Removed,
}

/// A continuity failure, with what was found and how to repair it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("replay gap ({kind:?}): {detail}")]
pub struct Gap {
    /// The kind.
    pub kind: GapKind,
    /// What was found, in numbers.
    pub detail: String,
}

/// What the stream and the durable report now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Observed {
    /// The stream's `created`, Unix nanoseconds.
    pub created_ns: i128,
    /// The stream's first sequence.
    pub first_seq: u64,
    /// The stream's last sequence.
    pub last_seq: u64,
    /// The durable consumer's ack floor, when it exists.
    pub ack_floor: Option<u64>,
    /// Whether the projection reads every subject of the stream.
    pub unfiltered: bool,
}

/// Checks the checkpoint against what the stream reports (no I/O).
pub fn check(checkpoint: &Checkpoint, now: &Observed) -> Result<(), Gap> {
    if checkpoint.last_seq == 0 {
        return Ok(());
    }
    if checkpoint.stream_created_ns != 0 && checkpoint.stream_created_ns != now.created_ns {
        return Err(Gap {
            kind: GapKind::Recreated,
            detail: format!(
                "stream {} was re-created (created {} ns, the checkpoint was taken on the stream \
                 created {} ns); its sequences are not the ones this store applied",
                checkpoint.stream, now.created_ns, checkpoint.stream_created_ns
            ),
        });
    }
    if now.last_seq < checkpoint.last_seq {
        return Err(Gap {
            kind: GapKind::LostTail,
            detail: format!(
                "stream {} ends at sequence {} but this store applied up to {}: the server lost \
                 its tail and may reuse those sequence numbers",
                checkpoint.stream, now.last_seq, checkpoint.last_seq
            ),
        });
    }
    if let Some(floor) = now.ack_floor.filter(|f| *f > checkpoint.last_seq) {
        return Err(Gap {
            kind: GapKind::Removed,
            detail: format!(
                "the durable's ack floor is {floor} but this store processed only up to {}: \
                 messages after it were purged, expired or acked by someone else before being \
                 applied here",
                checkpoint.last_seq
            ),
        });
    }
    if now.unfiltered && now.first_seq > checkpoint.last_seq + 1 {
        return Err(Gap {
            kind: GapKind::Removed,
            detail: format!(
                "stream {} now starts at sequence {} but this store processed only up to {}: \
                 sequences {}..{} were removed before being applied",
                checkpoint.stream,
                now.first_seq,
                checkpoint.last_seq,
                checkpoint.last_seq + 1,
                now.first_seq - 1
            ),
        });
    }
    Ok(())
}

/// Checks that the message at the checkpoint's sequence still has the recorded payload hash.
/// A message removed since (retention of processed messages) is not a gap.
pub async fn check_message(stream: &stream::Stream, checkpoint: &Checkpoint) -> Result<(), Gap> {
    if checkpoint.last_seq == 0 || checkpoint.last_payload_sha256 == [0; 32] {
        return Ok(());
    }
    let found = if stream.cached_info().config.allow_direct {
        stream.direct_get(checkpoint.last_seq).await.ok()
    } else {
        stream.get_raw_message(checkpoint.last_seq).await.ok()
    };
    let Some(message) = found else {
        return Ok(());
    };
    let hash: [u8; 32] = Sha256::digest(&message.payload).into();
    if hash != checkpoint.last_payload_sha256 {
        return Err(Gap {
            kind: GapKind::Rewritten,
            detail: format!(
                "the message at sequence {} of stream {} is not the one this store applied \
                 (payload hash differs): the stream's history was rewritten",
                checkpoint.last_seq, checkpoint.stream
            ),
        });
    }
    Ok(())
}

/// What an operator can do about a gap.
pub fn repair_hint(projection: &str) -> String {
    format!(
        "the projection stopped applying and acking; repair: `nats-projector rebuild --config FILE \
         {projection}` (a new version from the stream), or `nats-projector snapshot restore` of a \
         snapshot the stream still continues"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checkpoint() -> Checkpoint {
        Checkpoint {
            stream: "S".into(),
            stream_created_ns: 7,
            last_seq: 100,
            ..Checkpoint::default()
        }
    }

    fn observed() -> Observed {
        Observed {
            created_ns: 7,
            first_seq: 1,
            last_seq: 150,
            ack_floor: Some(90),
            unfiltered: false,
        }
    }

    #[test]
    fn a_healthy_stream_has_no_gap() {
        assert_eq!(check(&checkpoint(), &observed()), Ok(()));
        assert_eq!(
            check(
                &Checkpoint::default(),
                &Observed {
                    last_seq: 0,
                    ..observed()
                }
            ),
            Ok(())
        );
        let processed_prefix_removed = Observed {
            first_seq: 101,
            unfiltered: true,
            ..observed()
        };
        assert_eq!(check(&checkpoint(), &processed_prefix_removed), Ok(()));
    }

    #[test]
    fn each_kind_is_detected() {
        let kind = |o: Observed| check(&checkpoint(), &o).unwrap_err().kind;
        assert_eq!(
            kind(Observed {
                created_ns: 8,
                ..observed()
            }),
            GapKind::Recreated
        );
        assert_eq!(
            kind(Observed {
                last_seq: 99,
                ..observed()
            }),
            GapKind::LostTail
        );
        assert_eq!(
            kind(Observed {
                ack_floor: Some(120),
                ..observed()
            }),
            GapKind::Removed
        );
        let purged = Observed {
            first_seq: 130,
            unfiltered: true,
            ..observed()
        };
        assert_eq!(kind(purged), GapKind::Removed);
        let filtered_purge = Observed {
            first_seq: 130,
            ..observed()
        };
        assert_eq!(
            check(&checkpoint(), &filtered_purge),
            Ok(()),
            "filtered: the floor decides"
        );
    }
}
