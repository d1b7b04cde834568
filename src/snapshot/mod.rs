//! Snapshots: every record of one projection at one stream sequence, in a self-checking file.
//!
//! Format (`format_version` 1), JSON lines:
//!
//! ```text
//! {"header": {"format": "nats-projector-snapshot", "format_version": 1, "projection": ...,
//!             "seq": N, "stream": ..., "stream_created_ns": "...", "records": R, ...}}
//! {"record": {"key": ..., "state": {...}, "seq": ..., "event_id": ..., "epoch": ...}}
//! {"marker": [bucket, "dedupe id", seq, publish_ms]}
//! {"dead": {"seq": ..., "code": ..., "reason": ..., "subject": ...}}
//! {"sha256": "<hex of every byte before this line>"}
//! ```
//!
//! The checksum covers the header and every line, and the header's counts must match the
//! body: a truncated, edited or re-ordered file is refused. The content is deterministic: the
//! same store state gives the same bytes (and checksum), whichever store it was restored into.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};

use crate::spec::Spec;
use crate::store::{Checkpoint, Contents, DeadNote, Record, Store};

/// The `format` value of a snapshot header.
pub const MAGIC: &str = "nats-projector-snapshot";
/// The format version this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;

/// Why a snapshot is unusable.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SnapshotError {
    /// The file cannot be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The content is damaged or tampered with (bad checksum, bad line, counts that differ).
    #[error("damaged snapshot: {0}")]
    Damaged(String),
}

/// What a snapshot says about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Header {
    /// Always [`MAGIC`].
    pub format: String,
    /// [`FORMAT_VERSION`].
    pub format_version: u32,
    /// The projection name.
    pub projection: String,
    /// The projection version.
    pub version: u32,
    /// The source stream.
    pub stream: String,
    /// The stream's `created`, Unix nanoseconds (as text: it does not fit JSON numbers).
    pub stream_created_ns: String,
    /// The stream sequence every record is at (the checkpoint's last processed sequence).
    pub seq: u64,
    /// Publish time of that message, Unix ms.
    pub last_publish_ms: u64,
    /// SHA-256 (hex) of that message's payload.
    pub last_payload_sha256: String,
    /// Events applied up to `seq`.
    pub applied: u64,
    /// Number of record lines.
    pub records: u64,
    /// Number of dedupe marker lines.
    pub markers: u64,
    /// Number of dead-letter lines.
    pub dead_letters: u64,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RecordLine<'a> {
    key: String,
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    state: Option<&'a RawValue>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    deleted: bool,
    seq: u64,
    event_id: String,
    epoch: Option<u64>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeadLine {
    seq: u64,
    code: String,
    reason: String,
    subject: String,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
enum Line<'a> {
    Header(Header),
    #[serde(borrow)]
    Record(RecordLine<'a>),
    Marker((u64, String, u64, u64)),
    Dead(DeadLine),
    Sha256(String),
}

/// A verified snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// Its header.
    pub header: Header,
    /// Its content, ready for [`crate::store::Store::import`].
    pub contents: Contents,
    /// The checksum (hex).
    pub sha256: String,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    if text.len() != 64 {
        return None;
    }
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// Serializes a namespace's contents as a snapshot; returns the bytes, the header and the
/// checksum (hex).
pub fn encode(
    contents: &Contents,
    projection: &str,
    version: u32,
) -> Result<(Vec<u8>, Header, String), SnapshotError> {
    let c = &contents.checkpoint;
    let header = Header {
        format: MAGIC.into(),
        format_version: FORMAT_VERSION,
        projection: projection.into(),
        version,
        stream: c.stream.clone(),
        stream_created_ns: c.stream_created_ns.to_string(),
        seq: c.last_seq,
        last_publish_ms: c.last_publish_ms,
        last_payload_sha256: hex(&c.last_payload_sha256),
        applied: c.applied,
        records: contents.records.len() as u64,
        markers: contents.markers.len() as u64,
        dead_letters: contents.dead.len() as u64,
    };
    let damaged = |e: serde_json::Error| SnapshotError::Damaged(e.to_string());
    let mut out = Vec::new();
    let push = |line: &Line<'_>, out: &mut Vec<u8>| -> Result<(), SnapshotError> {
        serde_json::to_writer(&mut *out, line).map_err(damaged)?;
        out.push(b'\n');
        Ok(())
    };
    push(&Line::Header(header.clone()), &mut out)?;
    for (key, record) in &contents.records {
        let state = match &record.state {
            Some(bytes) => Some(serde_json::from_slice::<&RawValue>(bytes).map_err(damaged)?),
            None => None,
        };
        let line = RecordLine {
            key: key.clone(),
            state,
            deleted: record.is_deleted(),
            seq: record.seq,
            event_id: record.event_id.clone(),
            epoch: record.epoch,
        };
        push(&Line::Record(line), &mut out)?;
    }
    for marker in &contents.markers {
        push(&Line::Marker(marker.clone()), &mut out)?;
    }
    for (seq, note) in &contents.dead {
        let line = DeadLine {
            seq: *seq,
            code: note.code.clone(),
            reason: note.reason.clone(),
            subject: note.subject.clone(),
        };
        push(&Line::Dead(line), &mut out)?;
    }
    let sha = hex(&Sha256::digest(&out));
    push(&Line::Sha256(sha.clone()), &mut out)?;
    Ok((out, header, sha))
}

/// Parses and verifies a snapshot: checksum, format, and counts.
pub fn decode(bytes: &[u8]) -> Result<Snapshot, SnapshotError> {
    let damaged = |what: String| SnapshotError::Damaged(what);
    let body_end = bytes
        .strip_suffix(b"\n")
        .and_then(|b| b.iter().rposition(|c| *c == b'\n'))
        .map(|i| i + 1)
        .ok_or_else(|| damaged("no checksum line: the file is truncated".into()))?;
    let (body, trailer) = bytes.split_at(body_end);
    let trailer: Line<'_> = serde_json::from_slice(trailer)
        .map_err(|_| damaged("the last line is not a checksum: the file is truncated".into()))?;
    let Line::Sha256(expected) = trailer else {
        return Err(damaged(
            "the last line is not a checksum: the file is truncated".into(),
        ));
    };
    let actual = hex(&Sha256::digest(body));
    if actual != expected {
        return Err(damaged(format!(
            "checksum mismatch (content {actual}, recorded {expected}): the file was changed"
        )));
    }
    let mut lines = body.split(|c| *c == b'\n').filter(|l| !l.is_empty());
    let first = lines
        .next()
        .ok_or_else(|| damaged("empty snapshot".into()))?;
    let Ok(Line::Header(header)) = serde_json::from_slice::<Line<'_>>(first) else {
        return Err(damaged("the first line is not a snapshot header".into()));
    };
    if header.format != MAGIC || header.format_version != FORMAT_VERSION {
        return Err(damaged(format!(
            "format {} v{} is not {MAGIC} v{FORMAT_VERSION}",
            header.format, header.format_version
        )));
    }
    let created: i128 = header
        .stream_created_ns
        .parse()
        .map_err(|_| damaged("stream_created_ns is not a number".into()))?;
    let hash = unhex(&header.last_payload_sha256)
        .ok_or_else(|| damaged("last_payload_sha256 is not 64 hex digits".into()))?;
    let mut contents = Contents {
        checkpoint: Checkpoint {
            stream: header.stream.clone(),
            stream_created_ns: created,
            last_seq: header.seq,
            last_publish_ms: header.last_publish_ms,
            last_payload_sha256: hash,
            applied: header.applied,
            acked_floor: header.seq,
            acked_floor_ms: header.last_publish_ms,
        },
        ..Contents::default()
    };
    for (n, line) in lines.enumerate() {
        let parsed: Line<'_> =
            serde_json::from_slice(line).map_err(|e| damaged(format!("line {}: {e}", n + 2)))?;
        match parsed {
            Line::Record(r) => {
                if r.deleted == r.state.is_some() {
                    return Err(damaged(format!(
                        "line {}: a record is either live or deleted",
                        n + 2
                    )));
                }
                contents.records.push((
                    r.key,
                    Record {
                        state: r.state.map(|s| s.get().as_bytes().to_vec()),
                        seq: r.seq,
                        event_id: r.event_id,
                        epoch: r.epoch,
                        kv_revision: 0,
                    },
                ));
            }
            Line::Marker(m) => contents.markers.push(m),
            Line::Dead(d) => contents.dead.push((
                d.seq,
                DeadNote {
                    code: d.code,
                    reason: d.reason,
                    subject: d.subject,
                },
            )),
            Line::Header(_) | Line::Sha256(_) => {
                return Err(damaged(format!(
                    "line {}: unexpected header or checksum",
                    n + 2
                )));
            }
        }
    }
    let counts = (
        contents.records.len() as u64,
        contents.markers.len() as u64,
        contents.dead.len() as u64,
    );
    if counts != (header.records, header.markers, header.dead_letters) {
        return Err(damaged(format!(
            "the body has {counts:?} records/markers/dead letters, the header says {:?}",
            (header.records, header.markers, header.dead_letters)
        )));
    }
    Ok(Snapshot {
        header,
        contents,
        sha256: expected,
    })
}

/// Writes a snapshot file atomically (temporary file, fsync, rename).
pub fn write_file(path: &Path, bytes: &[u8]) -> Result<(), SnapshotError> {
    let io = |source| SnapshotError::Io {
        path: path.to_owned(),
        source,
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(io)?;
    }
    let tmp = path.with_extension("snapshot.tmp");
    let mut file = std::fs::File::create(&tmp).map_err(io)?;
    file.write_all(bytes).map_err(io)?;
    file.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)?;
    Ok(())
}

/// Reads and verifies a snapshot file.
pub fn read_file(path: &Path) -> Result<Snapshot, SnapshotError> {
    let bytes = std::fs::read(path).map_err(|source| SnapshotError::Io {
        path: path.to_owned(),
        source,
    })?;
    decode(&bytes)
}

/// The default file name of a snapshot.
pub fn file_name(projection: &str, version: u32, seq: u64) -> String {
    format!("{projection}-v{version}-{seq:012}.snapshot")
}

/// The snapshot files of a projection in `dir`, newest sequence first.
pub fn list(dir: &Path, projection: &str, version: u32) -> Vec<PathBuf> {
    let prefix = format!("{projection}-v{version}-");
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".snapshot"))
        })
        .collect();
    found.sort();
    found.reverse();
    found
}

/// Reads only the header line of a snapshot (no verification).
pub fn peek_header(path: &Path) -> Option<Header> {
    let file = std::fs::File::open(path).ok()?;
    let mut first = String::new();
    std::io::BufReader::new(file).read_line(&mut first).ok()?;
    match serde_json::from_str::<Line<'_>>(&first).ok()? {
        Line::Header(header) => Some(header),
        _ => None,
    }
}

/// A snapshot that was written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Created {
    /// The file.
    pub path: PathBuf,
    /// Its header.
    pub header: Header,
    /// Its checksum (hex).
    pub sha256: String,
    /// The Object Store object it was also uploaded as, when asked.
    #[serde(default)]
    pub object: Option<String>,
}

/// Snapshots a projection from the store (one read transaction) into the file `out`, or into
/// `dir` under [`file_name`]. Blocking: call it on the blocking pool.
pub fn create(
    store: &Store,
    spec: &Spec,
    out: Option<&Path>,
    dir: &Path,
) -> Result<Created, String> {
    let contents = store.export(&spec.namespace).map_err(|e| e.to_string())?;
    if contents.checkpoint.last_seq == 0 {
        return Err(format!(
            "projection {} has applied nothing yet",
            spec.name()
        ));
    }
    let (bytes, header, sha256) =
        encode(&contents, &spec.config.name, spec.config.version).map_err(|e| e.to_string())?;
    let path = match out {
        Some(path) => path.to_owned(),
        None => dir.join(file_name(
            &spec.config.name,
            spec.config.version,
            header.seq,
        )),
    };
    write_file(&path, &bytes).map_err(|e| e.to_string())?;
    Ok(Created {
        path,
        header,
        sha256,
        object: None,
    })
}

/// Deletes all but the `keep` newest snapshots of a projection in `dir`.
pub fn prune(dir: &Path, projection: &str, version: u32, keep: usize) {
    for old in list(dir, projection, version).into_iter().skip(keep) {
        if let Err(err) = std::fs::remove_file(&old) {
            tracing::warn!(path = %old.display(), error = %err, "cannot delete an old snapshot");
        }
    }
}

/// Uploads a snapshot file to a JetStream Object Store bucket (created if missing) under
/// its file name; returns the object name.
pub async fn upload(
    js: &async_nats::jetstream::Context,
    bucket: &str,
    path: &Path,
) -> Result<String, String> {
    let store = match js.get_object_store(bucket).await {
        Ok(store) => store,
        Err(_) => js
            .create_object_store(async_nats::jetstream::object_store::Config {
                bucket: bucket.to_owned(),
                description: Some("nats-projector snapshots".into()),
                ..Default::default()
            })
            .await
            .map_err(|e| format!("object store {bucket}: {e}"))?,
    };
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or("a snapshot path needs a file name")?
        .to_owned();
    let mut file = tokio::fs::File::open(path)
        .await
        .map_err(|e| format!("{}: {e}", path.display()))?;
    store
        .put(name.as_str(), &mut file)
        .await
        .map_err(|e| format!("upload to object store {bucket}: {e}"))?;
    Ok(name)
}

/// Downloads a snapshot from a JetStream Object Store bucket.
pub async fn download(
    js: &async_nats::jetstream::Context,
    bucket: &str,
    name: &str,
) -> Result<Vec<u8>, String> {
    use tokio::io::AsyncReadExt;
    let store = js
        .get_object_store(bucket)
        .await
        .map_err(|e| format!("object store {bucket}: {e}"))?;
    let mut object = store
        .get(name)
        .await
        .map_err(|e| format!("object {name} in {bucket}: {e}"))?;
    let mut bytes = Vec::new();
    object
        .read_to_end(&mut bytes)
        .await
        .map_err(|e| format!("object {name} in {bucket}: {e}"))?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn contents() -> Contents {
        Contents {
            checkpoint: Checkpoint {
                stream: "S".into(),
                stream_created_ns: 1_700_000_000_123_456_789,
                last_seq: 42,
                last_publish_ms: 99,
                last_payload_sha256: [7; 32],
                applied: 40,
                acked_floor: 41,
                acked_floor_ms: 98,
            },
            records: vec![
                (
                    "a".into(),
                    Record {
                        state: Some(br#"{"x":[1,{"y":null}]}"#.to_vec()),
                        seq: 40,
                        event_id: "e40".into(),
                        epoch: Some(2),
                        kv_revision: 9,
                    },
                ),
                (
                    "b".into(),
                    Record {
                        state: None,
                        seq: 42,
                        event_id: "e42".into(),
                        epoch: None,
                        kv_revision: 0,
                    },
                ),
            ],
            markers: vec![(3, "e40".into(), 40, 97)],
            dead: vec![(
                41,
                DeadNote {
                    code: "invalid_json".into(),
                    reason: "bad".into(),
                    subject: "s.x".into(),
                },
            )],
        }
    }

    #[test]
    fn round_trips_exactly() {
        let (bytes, header, sha) = encode(&contents(), "p", 3).unwrap();
        assert_eq!(header.seq, 42);
        let snapshot = decode(&bytes).unwrap();
        assert_eq!(snapshot.sha256, sha);
        let mut expected = contents();
        expected.records[0].1.kv_revision = 0;
        expected.checkpoint.acked_floor = 42;
        expected.checkpoint.acked_floor_ms = 99;
        assert_eq!(snapshot.contents, expected);
        assert_eq!(snapshot.header, header);
        let (again, _, _) = encode(&snapshot.contents, "p", 3).unwrap();
        assert_eq!(decode(&again).unwrap().contents, snapshot.contents);
    }

    #[test]
    fn tampering_and_truncation_are_refused() {
        let (bytes, _, _) = encode(&contents(), "p", 3).unwrap();
        let text = String::from_utf8(bytes.clone()).unwrap();
        let tampered = text.replace("\"seq\":40", "\"seq\":41");
        assert!(matches!(
            decode(tampered.as_bytes()),
            Err(SnapshotError::Damaged(_))
        ));
        for cut in [0, 1, bytes.len() / 2, bytes.len() - 2] {
            assert!(decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut flipped = bytes.clone();
        flipped[bytes.len() / 3] ^= 0x01;
        assert!(decode(&flipped).is_err());
        // Re-computing the checksum does not help a body that disagrees with its header.
        let body_end = text.trim_end().rfind('\n').unwrap() + 1;
        let body = text[..body_end].replace("\"records\":2", "\"records\":3");
        let forged = format!(
            "{body}{{\"sha256\":\"{}\"}}\n",
            hex(&Sha256::digest(body.as_bytes()))
        );
        assert!(
            decode(forged.as_bytes())
                .unwrap_err()
                .to_string()
                .contains("header says")
        );
    }

    #[test]
    fn hex_round_trips() {
        let bytes = [0xab; 32];
        assert_eq!(unhex(&hex(&bytes)), Some(bytes));
        assert_eq!(unhex("zz"), None);
    }
}
