//! The local store: one redb database holding, per projection, the state of every key, its
//! last applied stream sequence and epoch, tombstones, dedupe markers, the KV outbox, dead
//! letters and the checkpoint.
//!
//! A fetched batch is applied in ONE write transaction ([`Store::apply`]); the KV writes and the
//! acks happen only after it commits durably: redb's default `Durability::Immediate` fsyncs,
//! and a batch committed without an fsync ([`Store::apply_deferring`]) waits for a later
//! durable commit.
//! Every table of a projection is namespaced by `name@vVERSION`, so a rebuild can write a new
//! version beside the live one.

mod combining;
#[cfg(feature = "fault-injection")]
mod faulty;
mod filter;
mod namespaces;
mod record;
mod runs;

use record::RecordRef;
pub use record::{Checkpoint, DeadNote, KvValue, Record};

use std::collections::HashSet;

use foldhash::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use bytes::Bytes;
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::decode::{ErrorCode, Poison};
use crate::reduce::Change;
use crate::spec::{Prepared, Spec};

/// The store file format this build writes (bumped on incompatible layout changes).
pub const FORMAT_VERSION: u32 = 2;

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

/// The table names of one projection namespace.
struct Tables {
    records: String,
    dedupe: String,
    runs: String,
    outbox: String,
    dead: String,
    checkpoint_key: String,
    seq_bound_key: String,
}

impl Tables {
    fn new(namespace: &str) -> Tables {
        Tables {
            records: format!("records:{namespace}"),
            dedupe: format!("dedupe:{namespace}"),
            runs: format!("runs:{namespace}"),
            outbox: format!("outbox:{namespace}"),
            dead: format!("dead:{namespace}"),
            checkpoint_key: format!("checkpoint:{namespace}"),
            seq_bound_key: format!("seq_bound:{namespace}"),
        }
    }
    /// key → bincode [`Record`].
    fn records(&self) -> TableDefinition<'_, &'static str, &'static [u8]> {
        TableDefinition::new(&self.records)
    }
    /// (publish-time bucket, dedupe id) → (stream seq, publish ms): markers one row each, for
    /// buckets whose run index is full, and those of imports and of format 1. Bucketing by the
    /// dedupe window makes expiry a range delete of old buckets.
    fn dedupe(&self) -> TableDefinition<'_, (u64, &'static str), (u64, u64)> {
        TableDefinition::new(&self.dedupe)
    }
    /// (publish-time bucket, first stream seq) → a run of markers ([`runs`]): the markers one
    /// batch applied in that bucket. Keyed in stream order, so writing them is append-like.
    fn runs(&self) -> TableDefinition<'_, (u64, u64), &'static [u8]> {
        TableDefinition::new(&self.runs)
    }
    /// key → the sequence KV must reach. Present = KV is behind the store for that key.
    fn outbox(&self) -> TableDefinition<'_, &'static str, u64> {
        TableDefinition::new(&self.outbox)
    }
    /// stream seq → bincode [`DeadNote`] of a published dead letter.
    fn dead(&self) -> TableDefinition<'_, u64, &'static [u8]> {
        TableDefinition::new(&self.dead)
    }
}

/// Why a store operation failed. Match on [`StoreError::kind`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// An I/O error (full disk, EIO): transient, the operation may be retried after a reopen.
    #[error("store I/O error: {0}")]
    Io(#[source] std::io::Error),
    /// The file is damaged: fail closed.
    #[error("store is corrupted: {0}")]
    Corrupted(String),
    /// Another process holds the database.
    #[error("store {0} is open in another process")]
    Locked(PathBuf),
    /// Written by a newer (or incompatible) nats-projector.
    #[error("store format {found} is not supported (this build writes {FORMAT_VERSION})")]
    Format {
        /// The version found in the file.
        found: u32,
    },
    /// Anything else redb reports.
    #[error("store error: {0}")]
    Other(String),
}

/// The classes of [`StoreError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreErrorKind {
    /// Retry (after reopening the database).
    Transient,
    /// Fail closed: the file needs an operator.
    Corrupted,
    /// Another process holds the file.
    Locked,
    /// Anything else: a bug or an unusable file.
    Fatal,
}

impl StoreError {
    /// The class of this error.
    pub fn kind(&self) -> StoreErrorKind {
        match self {
            StoreError::Io(_) => StoreErrorKind::Transient,
            StoreError::Corrupted(_) | StoreError::Format { .. } => StoreErrorKind::Corrupted,
            StoreError::Locked(_) => StoreErrorKind::Locked,
            StoreError::Other(_) => StoreErrorKind::Fatal,
        }
    }
}

/// A redb I/O error as a [`StoreError`]: transient, except a read past the end of the file,
/// which means the file's own pointers lead beyond it (a truncated or damaged store): no retry
/// mends that, so it fails closed.
fn io_error(io: std::io::Error) -> StoreError {
    if io.kind() == std::io::ErrorKind::UnexpectedEof {
        StoreError::Corrupted(format!("a read past the end of the file ({io})"))
    } else {
        StoreError::Io(io)
    }
}

impl From<redb::StorageError> for StoreError {
    fn from(err: redb::StorageError) -> Self {
        match err {
            redb::StorageError::Io(io) => io_error(io),
            redb::StorageError::Corrupted(what) => StoreError::Corrupted(what),
            redb::StorageError::PreviousIo => StoreError::Io(std::io::Error::other(
                "an earlier I/O error poisoned the database",
            )),
            other => StoreError::Other(other.to_string()),
        }
    }
}

macro_rules! from_redb {
    ($($ty:ty),*) => {$(
        impl From<$ty> for StoreError {
            fn from(err: $ty) -> Self {
                match redb::Error::from(err) {
                    redb::Error::Io(io) => io_error(io),
                    redb::Error::Corrupted(what) => StoreError::Corrupted(what),
                    redb::Error::PreviousIo => StoreError::Io(std::io::Error::other(
                        "an earlier I/O error poisoned the database",
                    )),
                    other => StoreError::Other(other.to_string()),
                }
            }
        }
    )*};
}
from_redb!(
    redb::TransactionError,
    redb::TableError,
    redb::CommitError,
    redb::CompactionError
);

impl From<redb::DatabaseError> for StoreError {
    fn from(err: redb::DatabaseError) -> Self {
        match err {
            redb::DatabaseError::Storage(storage) => storage.into(),
            other => StoreError::Other(other.to_string()),
        }
    }
}

/// One item of a batch, in stream order.
#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)] // Items are moved once into the transaction, never copied.
pub enum Item {
    /// A decoded, keyed event.
    Event(Prepared),
    /// A message that failed decoding; it is only checked against already published dead
    /// letters here (the pipeline publishes it after the commit).
    Poison {
        /// Stream sequence.
        seq: u64,
        /// The verdict.
        poison: Poison,
    },
}

impl Outcome {
    /// The `outcome` spelling of logs and metrics.
    pub fn as_str(&self) -> &'static str {
        match self {
            Outcome::Applied => "applied",
            Outcome::Duplicate | Outcome::AlreadyDead => "duplicate",
            Outcome::StaleEpoch => "stale_epoch",
            Outcome::Poison(_) => "dead_lettered",
        }
    }
}

impl Item {
    /// The stream sequence of the item.
    pub fn seq(&self) -> u64 {
        match self {
            Item::Event(p) => p.seq,
            Item::Poison { seq, .. } => *seq,
        }
    }
}

/// What happened to one item.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The event changed its key.
    Applied,
    /// Already applied (same or older sequence for the key, or a known envelope id).
    Duplicate,
    /// Its epoch is below the key's: refused.
    StaleEpoch,
    /// It was dead-lettered before (a replay): nothing to do.
    AlreadyDead,
    /// It cannot be applied: publish it to the DLQ.
    Poison(Poison),
}

/// What [`Store::apply`] does with events at or below the checkpoint's ack floor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BelowFloor {
    /// Processed before: a duplicate.
    Skip,
    /// Decided by the key guards (backfills).
    Apply,
}

/// Confirmations from earlier batches, folded into the next transaction for free.
#[derive(Debug, Clone, Default)]
pub struct Housekeeping {
    /// Keys whose KV copy reached `seq`, with the KV revision that holds it.
    pub kv_confirmed: Vec<KvConfirmed>,
    /// Dead letters whose publish the DLQ stream acknowledged.
    pub dead_published: Vec<(u64, DeadNote)>,
    /// The durable consumer's ack floor (stream seq) and a lower bound of its publish time.
    pub ack_floor: Option<(u64, u64)>,
}

impl Housekeeping {
    /// Whether there is nothing to fold in.
    pub fn is_empty(&self) -> bool {
        self.kv_confirmed.is_empty() && self.dead_published.is_empty() && self.ack_floor.is_none()
    }
}

/// A key's KV copy reached `seq` at `revision`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvConfirmed {
    /// The KV key.
    pub key: String,
    /// The sequence KV now holds (or newer).
    pub seq: u64,
    /// The KV revision holding it.
    pub revision: u64,
}

/// The new checkpoint position of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    /// The stream name.
    pub stream: String,
    /// The stream's `created`, Unix nanoseconds.
    pub stream_created_ns: i128,
    /// The highest stream sequence of the batch.
    pub seq: u64,
    /// Its publish time, Unix ms.
    pub publish_ms: u64,
    /// SHA-256 of its payload.
    pub payload_sha256: [u8; 32],
}

/// A KV write the committed batch requires.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvWrite {
    /// The KV key.
    pub key: String,
    /// The key's sequence in the store (what KV must reach).
    pub seq: u64,
    /// A delete (tombstone) rather than a put.
    pub delete: bool,
    /// The KV value (for deletes, the tombstone payload).
    pub payload: Bytes,
    /// The last KV revision the store knew (a hint for the compare-and-set; 0 when unknown).
    pub revision_hint: u64,
}

/// The result of one committed batch.
#[derive(Debug, Clone, Default)]
pub struct Applied {
    /// One outcome per item, in order.
    pub outcomes: Vec<Outcome>,
    /// The KV writes to perform (one per dirty key), empty without a KV bucket.
    pub kv_writes: Vec<KvWrite>,
    /// Keys in the outbox after the commit.
    pub outbox_len: u64,
    /// Keys (records, tombstones included) of the projection after the commit.
    pub keys: u64,
    /// How long the commit took (page writes and, unless unsynced, the fsync).
    pub commit_time: std::time::Duration,
    /// Committed without an fsync ([`Store::apply_deferring`]): visible, but durable only once
    /// a later commit is, so nothing it settled may be acked before then.
    pub unsynced: bool,
    /// Stored records the batch read (none when no record could change an outcome).
    pub records_read: u64,
}

/// The state slot of a key while a batch is being applied.
enum Slot {
    /// No state: a new key or a tombstone.
    Empty,
    /// Stored JSON not parsed yet (parsed only when the reducer needs it).
    Raw(Vec<u8>),
    /// Parsed (and possibly changed) state.
    Parsed(Value),
    /// The stored state, not read: the reducer does not need it. Only a key that stays
    /// unchanged keeps it (an applied event replaces the slot), and unchanged keys are not
    /// written back.
    Unread,
}

struct Working {
    slot: Slot,
    seq: u64,
    event_id: String,
    epoch: Option<u64>,
    kv_revision: u64,
    dirty: bool,
}

impl Working {
    /// The working copy of a stored record; its state and event id are copied only when
    /// `needs_state` (otherwise the first applied event replaces both).
    fn from_stored(record: Option<RecordRef<'_>>, needs_state: bool) -> Working {
        match record {
            Some(r) => Working {
                slot: match r.state {
                    None => Slot::Empty,
                    Some(state) if needs_state => Slot::Raw(state.to_vec()),
                    Some(_) => Slot::Unread,
                },
                seq: r.seq,
                event_id: if needs_state {
                    r.event_id.to_owned()
                } else {
                    String::new()
                },
                epoch: r.epoch,
                kv_revision: r.kv_revision,
                dirty: false,
            },
            None => Working {
                slot: Slot::Empty,
                seq: 0,
                event_id: String::new(),
                epoch: None,
                kv_revision: 0,
                dirty: false,
            },
        }
    }

    /// The working copy of a record that is not read: any stored one has a sequence at most
    /// `bound`, below every event the batch folds into it ([`Store::apply`]).
    fn unread(bound: u64) -> Working {
        Working {
            slot: Slot::Unread,
            seq: bound,
            event_id: String::new(),
            epoch: None,
            kv_revision: 0,
            dirty: false,
        }
    }

    fn take_state(&mut self) -> Result<Option<Value>, StoreError> {
        match std::mem::replace(&mut self.slot, Slot::Empty) {
            Slot::Empty => Ok(None),
            Slot::Parsed(v) => Ok(Some(v)),
            Slot::Unread => Err(StoreError::Other(
                "internal: a state that was not read was needed".into(),
            )),
            Slot::Raw(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| StoreError::Corrupted(format!("stored state is not JSON: {e}"))),
        }
    }

    fn into_record(self) -> Result<Record, StoreError> {
        let state = match self.slot {
            Slot::Empty => None,
            Slot::Raw(bytes) => Some(bytes),
            Slot::Parsed(value) => {
                Some(serde_json::to_vec(&value).map_err(|e| StoreError::Other(e.to_string()))?)
            }
            // Never written back: an unchanged key is not dirty.
            Slot::Unread => {
                return Err(StoreError::Other(
                    "internal: a key whose state was not read was to be written".into(),
                ));
            }
        };
        Ok(Record {
            state,
            seq: self.seq,
            event_id: self.event_id,
            epoch: self.epoch,
            kv_revision: self.kv_revision,
        })
    }
}

/// The local redb store.
pub struct Store {
    path: PathBuf,
    cache_bytes: usize,
    /// `None` only while a reopen is in progress.
    db: RwLock<Option<Arc<Database>>>,
    /// The by-id dedupe markers' negative cache; used and changed only under a write
    /// transaction.
    filters: Mutex<filter::Filters>,
    /// The index of the dedupe runs; used and changed only under a write transaction.
    run_index: Mutex<runs::RunIndex>,
    /// A batch's working space, used only under a write transaction.
    scratch: Mutex<Scratch>,
    /// Whether a batch may skip reading its keys' records when their contents cannot change
    /// its outcome ([`Store::apply`]); off only in tests that compare both ways.
    unread_keys: std::sync::atomic::AtomicBool,
}

/// A batch's keys and working records, kept (empty) between batches: the next batch reuses
/// their memory instead of faulting in fresh pages (each is a few hundred KiB at
/// catch-up batch sizes, freed and purged by the allocator otherwise).
#[derive(Default)]
struct Scratch {
    /// The batch's keys, each with the index of its item, sorted by key.
    keyed: Vec<(String, u32)>,
    /// The batch's distinct keys in key order, with their working records.
    slots: Vec<(String, Working)>,
    /// Per item, the index of its key's slot (`u32::MAX`: none).
    slot_of: Vec<u32>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

/// Locks a cache of the store; a cache a panic poisoned is emptied (it reloads from the tables).
fn lock_or_forget<T: Default>(cache: &Mutex<T>) -> MutexGuard<'_, T> {
    cache.lock().unwrap_or_else(|poisoned| {
        let mut cache = poisoned.into_inner();
        *cache = T::default();
        cache
    })
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    let mut bytes = Vec::new();
    encode_into(value, &mut bytes)?;
    Ok(bytes)
}

/// Encodes like [`encode`], into `buf` (cleared first): a batch's records share one buffer
/// instead of each growing its own from empty.
fn encode_into<T: Serialize>(value: &T, buf: &mut Vec<u8>) -> Result<(), StoreError> {
    buf.clear();
    bincode::serde::encode_into_std_write(value, buf, bincode::config::standard())
        .map(|_| ())
        .map_err(|e| StoreError::Other(format!("encode: {e}")))
}

/// Decodes a stored value; a borrowing type (such as [`RecordRef`]) borrows from `bytes`.
fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, StoreError> {
    bincode::serde::borrow_decode_from_slice(bytes, bincode::config::standard())
        .map(|(value, _)| value)
        .map_err(|e| StoreError::Corrupted(format!("undecodable record: {e}")))
}

impl Store {
    /// Opens (or creates) the database at `path`.
    fn open_unguarded(path: &Path, cache_mib: usize) -> Result<Store, StoreError> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(StoreError::Io)?;
        }
        let cache_bytes = cache_mib.max(1) * 1024 * 1024;
        let db = open_db(path, cache_bytes)?;
        let store = Store {
            path: path.to_owned(),
            cache_bytes,
            db: RwLock::new(Some(Arc::new(db))),
            filters: Mutex::default(),
            run_index: Mutex::default(),
            scratch: Mutex::default(),
            unread_keys: std::sync::atomic::AtomicBool::new(true),
        };
        store.check_format()?;
        Ok(store)
    }

    /// Opens an existing database only (for one-shot commands); `Ok(None)` when the file is
    /// absent.
    pub fn open_existing(path: &Path, cache_mib: usize) -> Result<Option<Store>, StoreError> {
        if !path.exists() {
            return Ok(None);
        }
        Store::open(path, cache_mib).map(Some)
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Size of the database file in bytes.
    pub fn file_size(&self) -> u64 {
        std::fs::metadata(&self.path).map(|m| m.len()).unwrap_or(0)
    }

    /// The dedupe filters (emptied if a panic poisoned them: forgetting is always safe).
    fn filters(&self) -> MutexGuard<'_, filter::Filters> {
        lock_or_forget(&self.filters)
    }

    /// The dedupe run index (emptied if a panic poisoned it: forgetting is always safe).
    fn run_index(&self) -> MutexGuard<'_, runs::RunIndex> {
        lock_or_forget(&self.run_index)
    }

    fn db(&self) -> Result<Arc<Database>, StoreError> {
        let guard = match self.db.read() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        guard
            .clone()
            .ok_or_else(|| StoreError::Io(std::io::Error::other("the store is being reopened")))
    }

    /// Reopens the database after a failed commit (redb refuses further writes on a handle that
    /// saw an I/O error).
    pub fn reopen(&self) -> Result<(), StoreError> {
        guard(|| self.reopen_unguarded())
    }

    fn reopen_unguarded(&self) -> Result<(), StoreError> {
        let mut guard = match self.db.write() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        // The old handle must be closed before the file lock can be taken again.
        drop(guard.take());
        *guard = Some(Arc::new(open_db(&self.path, self.cache_bytes)?));
        Ok(())
    }

    fn check_format(&self) -> Result<(), StoreError> {
        let db = self.db()?;
        let txn = db.begin_write()?;
        {
            let mut meta = txn.open_table(META)?;
            let found = meta
                .get("format")?
                .map(|v| decode::<u32>(v.value()))
                .transpose()?;
            match found {
                Some(FORMAT_VERSION) => {}
                // Format 1 had no runs table: its by-id markers stay valid and are still read.
                Some(1) => {
                    meta.insert("format", encode(&FORMAT_VERSION)?.as_slice())?;
                }
                Some(found) => return Err(StoreError::Format { found }),
                None => {
                    meta.insert("format", encode(&FORMAT_VERSION)?.as_slice())?;
                }
            }
        }
        txn.commit()?;
        Ok(())
    }

    /// Applies one batch in one write transaction (durable unless `defer_sync`, asked just
    /// before the commit, says otherwise) and returns what the pipeline must do next (KV
    /// writes, dead letters, acks).
    ///
    /// Rules, per event, in this order: a sequence not newer than the key's is a duplicate; a
    /// dedupe id applied within the window is a duplicate; an epoch below the key's is stale;
    /// otherwise the event is applied (or deleted by `delete_on`). Duplicates and stale events
    /// change nothing, not even the key's sequence or event id.
    ///
    /// Each batch reads its keys' records once, unless none could change an outcome: the store
    /// keeps a bound on every record's sequence (`seq_bound:<namespace>` in the meta table), and
    /// a batch of a reducer that does not read the state, whose events are all above it and
    /// carry no epoch (a catch-up, or steady state), writes its keys without reading them first.
    fn apply_unguarded(
        &self,
        spec: &Spec,
        items: &mut [Item],
        house: &Housekeeping,
        position: Option<&Position>,
        below_floor: BelowFloor,
        defer_sync: impl FnOnce() -> bool,
    ) -> Result<Applied, StoreError> {
        if crate::pipeline::crash::store_failure() {
            return Err(StoreError::Io(std::io::Error::other(
                "injected store failure",
            )));
        }
        let db = self.db()?;
        let tables = Tables::new(&spec.namespace);
        let with_kv = spec.config.kv_bucket.is_some();
        let window = spec.dedupe_window_ms;
        let mut txn = db.begin_write()?;
        let mut filters = self.filters();
        let mut run_index = self.run_index();
        let mut scratch = lock_or_forget(&self.scratch);
        let Scratch {
            keyed,
            slots,
            slot_of,
        } = &mut *scratch;
        // Empty unless a failed batch left entries behind.
        keyed.clear();
        slots.clear();
        slot_of.clear();
        let mut applied = Applied {
            outcomes: Vec::with_capacity(items.len()),
            ..Applied::default()
        };
        {
            let mut records = txn.open_table(tables.records())?;
            let mut dedupe = txn.open_table(tables.dedupe())?;
            let mut runs = txn.open_table(tables.runs())?;
            let mut outbox = txn.open_table(tables.outbox())?;
            let mut dead = txn.open_table(tables.dead())?;
            let mut meta = txn.open_table(META)?;

            let mut checkpoint = meta
                .get(tables.checkpoint_key.as_str())?
                .map(|v| decode::<Checkpoint>(v.value()))
                .transpose()?
                .unwrap_or_default();
            fold_housekeeping(
                house,
                &mut checkpoint,
                window,
                &mut outbox,
                &mut dead,
                &mut dedupe,
                &mut runs,
            )?
            .inspect(|horizon| {
                filters.expire(&spec.namespace, *horizon);
                run_index.expire(&spec.namespace, *horizon);
            });
            let mut markers = Markers {
                by_id: &mut dedupe,
                runs: &mut runs,
                filters: filters.namespace(&spec.namespace),
                index: run_index.namespace(&spec.namespace),
                pending: Vec::new(),
                blocks: Vec::new(),
            };
            let confirmed_revisions: HashMap<&str, u64> = house
                .kv_confirmed
                .iter()
                .map(|c| (c.key.as_str(), c.revision))
                .collect();
            let floor = checkpoint.acked_floor;

            let mut applied_count = 0u64;
            let needs_state = spec.reducer.needs_state();
            let infallible = spec.reducer.infallible();
            let bound = match meta.get(tables.seq_bound_key.as_str())? {
                Some(v) => decode::<u64>(v.value())?,
                // Not kept yet (a store of an earlier build): found once, kept from now on.
                None => highest_seq(&records)?,
            };

            // Dead letters among this batch's sequences, read with one range scan (usually
            // none) instead of one lookup per event.
            let dead_here: HashSet<u64> = match (
                items.iter().map(Item::seq).min(),
                items.iter().map(Item::seq).max(),
            ) {
                (Some(lo), Some(hi)) => dead
                    .range(lo..=hi)?
                    .map(|entry| entry.map(|(seq, _)| seq.value()))
                    .collect::<Result<_, _>>()?,
                _ => HashSet::new(),
            };
            // Each key's stored record is read once, in key order (neighbouring keys share
            // B-tree pages), into the slot its events fold into; the keys move out of the items.
            // Events the loop below settles without their key (at or below the floor, already
            // dead) get no slot and no read.
            let settled = |seq: u64| {
                (below_floor == BelowFloor::Skip && seq <= floor) || dead_here.contains(&seq)
            };
            // Invariant (sequences only grow): no stored record has a sequence above `bound`.
            // When every event to fold is above it and carries no epoch, and the reducer does
            // not read the state, nothing a record holds can change an outcome: the records are
            // not read, and what the fold keeps of them (epoch, KV revision) is taken from the
            // values the writes below replace.
            let mut unread =
                !needs_state && self.unread_keys.load(std::sync::atomic::Ordering::Relaxed);
            for (index, item) in items.iter_mut().enumerate() {
                if let Item::Event(p) = item {
                    if !settled(p.seq) {
                        unread &= p.seq > bound && p.epoch.is_none();
                        keyed.push((std::mem::take(&mut p.key), index as u32));
                    }
                }
            }
            keyed.sort_unstable_by(|a, b| a.0.cmp(&b.0));
            slot_of.resize(items.len(), u32::MAX);
            for (key, index) in keyed.drain(..) {
                if slots.last().is_none_or(|(last, _)| *last != key) {
                    let mut w = if unread {
                        Working::unread(bound)
                    } else {
                        applied.records_read += 1;
                        let stored = records.get(key.as_str())?;
                        let stored = stored.as_ref().map(|v| decode(v.value())).transpose()?;
                        Working::from_stored(stored, needs_state)
                    };
                    if let Some(rev) = confirmed_revisions.get(key.as_str()) {
                        w.kv_revision = w.kv_revision.max(*rev);
                    }
                    slots.push((key, w));
                }
                slot_of[index as usize] = (slots.len() - 1) as u32;
            }

            // The next event's id hash is computed one event ahead, and its index slot
            // prefetched while this event is folded.
            // The items stay in `items` (what is kept moves out of them): they are freed by the
            // caller, on the thread that decoded them, where freeing is cheapest.
            let mut items = items.iter_mut().enumerate().peekable();
            let mut next_hash = None;
            while let Some((index, item)) = items.next() {
                let this_hash = next_hash.take();
                if let Some((_, Item::Event(next))) = items.peek().filter(|_| window > 0) {
                    let h = runs::hash(next.event.dedupe_id().as_bytes());
                    markers.prefetch(dedupe_bucket(next.publish_ms, window), h);
                    next_hash = Some(h);
                }
                // At or below the ack floor: processed and acked before (a replay through a
                // re-created durable). An explicit backfill goes through the key guards only.
                if below_floor == BelowFloor::Skip && item.seq() <= floor {
                    applied.outcomes.push(Outcome::Duplicate);
                    continue;
                }
                if dead_here.contains(&item.seq()) {
                    applied.outcomes.push(Outcome::AlreadyDead);
                    continue;
                }
                let p = match item {
                    Item::Poison { poison, .. } => {
                        applied.outcomes.push(Outcome::Poison(poison.clone()));
                        continue;
                    }
                    Item::Event(p) => p,
                };
                let Some((_, w)) = slot_of
                    .get(index)
                    .and_then(|&slot| slots.get_mut(slot as usize))
                else {
                    return Err(StoreError::Other(
                        "internal: an event without its key's slot".into(),
                    ));
                };
                if p.seq <= w.seq {
                    applied.outcomes.push(Outcome::Duplicate);
                    continue;
                }
                let bucket = dedupe_bucket(p.publish_ms, window);
                let mut id_hash = 0;
                if window > 0 {
                    let id = p.event.dedupe_id();
                    id_hash = this_hash.unwrap_or_else(|| runs::hash(id.as_bytes()));
                    let mut seen = false;
                    for b in [bucket, bucket.saturating_sub(1), bucket + 1] {
                        if markers.seen(b, id, id_hash, p.publish_ms, window)? {
                            seen = true;
                            break;
                        }
                    }
                    if seen {
                        applied.outcomes.push(Outcome::Duplicate);
                        continue;
                    }
                }
                if let Some(epoch) = p.epoch {
                    if epoch < w.epoch.unwrap_or(0) {
                        applied.outcomes.push(Outcome::StaleEpoch);
                        continue;
                    }
                }
                let change = if p.delete {
                    Ok(Change::Delete)
                } else {
                    let state = if needs_state { w.take_state()? } else { None };
                    let backup = if infallible { None } else { state.clone() };
                    // A panicking reducer refuses the event, like an error does.
                    let folded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        spec.reducer.apply_owned(state, &mut p.event)
                    }))
                    .unwrap_or_else(|panic| {
                        Err(crate::reduce::ReduceError(format!(
                            "the reducer panicked: {}",
                            panic_message(&panic)
                        )))
                    });
                    match folded {
                        Ok(change) => Ok(change),
                        Err(err) => {
                            // The event is refused: put back the state it was given.
                            if let Some(previous) = backup {
                                w.slot = Slot::Parsed(previous);
                            }
                            Err(err)
                        }
                    }
                };
                match change {
                    Ok(Change::Put(state)) => w.slot = Slot::Parsed(state),
                    Ok(Change::PutText(text)) => w.slot = Slot::Raw(text.into_bytes()),
                    Ok(Change::Delete) => w.slot = Slot::Empty,
                    Err(err) => {
                        applied
                            .outcomes
                            .push(Outcome::Poison(Poison::new(ErrorCode::ReducerError, err.0)));
                        continue;
                    }
                }
                w.seq = p.seq;
                w.epoch = match (w.epoch, p.epoch) {
                    (Some(a), Some(b)) => Some(a.max(b)),
                    (a, b) => a.or(b),
                };
                w.dirty = true;
                if window > 0 {
                    markers.record(bucket, p.event.dedupe_id(), id_hash, p.seq, p.publish_ms)?;
                }
                w.event_id = std::mem::take(&mut p.event.id);
                applied_count += 1;
                applied.outcomes.push(Outcome::Applied);
            }

            markers.write_runs()?;

            // Written in key order: neighbouring keys share B-tree pages, so a batch dirties
            // (and copies on write) fewer pages than in arrival order. KV writes follow the
            // same order (deterministic).
            let mut bytes = Vec::new();
            let mut highest = bound;
            for (key, w) in slots.drain(..).filter(|(_, w)| w.dirty) {
                let mut record = w.into_record()?;
                highest = highest.max(record.seq);
                encode_into(&record, &mut bytes)?;
                let replaced = records.insert(key.as_str(), bytes.as_slice())?;
                // Unread, the fold would have kept the replaced record's epoch and KV revision.
                let replaced_unread = replaced.as_ref().filter(|_| unread);
                let kept = match replaced_unread.map(|v| decode::<RecordRef>(v.value())) {
                    Some(Ok(old)) if old.seq > bound => {
                        return Err(StoreError::Corrupted(format!(
                            "key {key:?} holds sequence {} above the store's bound {bound}",
                            old.seq
                        )));
                    }
                    old => old.transpose()?.map(|old| (old.epoch, old.kv_revision)),
                };
                drop(replaced);
                if let Some((epoch, revision)) = kept {
                    let revision = revision.max(record.kv_revision);
                    if epoch.is_some() || revision != record.kv_revision {
                        record.epoch = epoch;
                        record.kv_revision = revision;
                        encode_into(&record, &mut bytes)?;
                        records.insert(key.as_str(), bytes.as_slice())?;
                    }
                }
                if with_kv {
                    outbox.insert(key.as_str(), record.seq)?;
                    applied.kv_writes.push(KvWrite {
                        payload: Bytes::from(
                            record.kv_value(&spec.config.name, spec.config.version),
                        ),
                        seq: record.seq,
                        delete: record.is_deleted(),
                        revision_hint: record.kv_revision,
                        key,
                    });
                }
            }

            if let Some(pos) = position {
                if pos.seq >= checkpoint.last_seq {
                    checkpoint.stream = pos.stream.clone();
                    checkpoint.stream_created_ns = pos.stream_created_ns;
                    checkpoint.last_seq = pos.seq;
                    checkpoint.last_publish_ms = pos.publish_ms;
                    checkpoint.last_payload_sha256 = pos.payload_sha256;
                }
            }
            checkpoint.applied += applied_count;
            meta.insert(
                tables.checkpoint_key.as_str(),
                encode(&checkpoint)?.as_slice(),
            )?;
            // In the same transaction as the records it bounds (an unsynced commit lost later
            // loses both).
            meta.insert(tables.seq_bound_key.as_str(), encode(&highest)?.as_slice())?;
            applied.outbox_len = outbox.len()?;
            applied.keys = records.len()?;
        }
        // Asked for at the last moment: the caller knows best then whether a batch follows.
        if defer_sync() {
            txn.set_durability(redb::Durability::None)
                .map_err(|e| StoreError::Other(format!("set durability: {e}")))?;
            applied.unsynced = true;
        }
        #[cfg(feature = "fault-injection")]
        faulty::before_commit(applied.unsynced);
        let committing = std::time::Instant::now();
        txn.commit()?;
        applied.commit_time = committing.elapsed();
        Ok(applied)
    }

    /// Folds confirmations into the store on their own (when idle or at shutdown); returns the
    /// outbox size.
    fn housekeep_unguarded(&self, spec: &Spec, house: &Housekeeping) -> Result<u64, StoreError> {
        let db = self.db()?;
        let tables = Tables::new(&spec.namespace);
        let txn = db.begin_write()?;
        let len;
        {
            let mut outbox = txn.open_table(tables.outbox())?;
            let mut dead = txn.open_table(tables.dead())?;
            let mut dedupe = txn.open_table(tables.dedupe())?;
            let mut runs = txn.open_table(tables.runs())?;
            let mut meta = txn.open_table(META)?;
            let mut checkpoint = meta
                .get(tables.checkpoint_key.as_str())?
                .map(|v| decode::<Checkpoint>(v.value()))
                .transpose()?
                .unwrap_or_default();
            let before = checkpoint.clone();
            fold_housekeeping(
                house,
                &mut checkpoint,
                spec.dedupe_window_ms,
                &mut outbox,
                &mut dead,
                &mut dedupe,
                &mut runs,
            )?
            .inspect(|horizon| {
                self.filters().expire(&spec.namespace, *horizon);
                self.run_index().expire(&spec.namespace, *horizon);
            });
            if checkpoint != before {
                meta.insert(
                    tables.checkpoint_key.as_str(),
                    encode(&checkpoint)?.as_slice(),
                )?;
            }
            len = outbox.len()?;
        }
        txn.commit()?;
        Ok(len)
    }

    /// The record of `key`.
    fn record_unguarded(&self, namespace: &str, key: &str) -> Result<Option<Record>, StoreError> {
        let db = self.db()?;
        let tables = Tables::new(namespace);
        let txn = db.begin_read()?;
        let Some(table) = open_existing(&txn, tables.records())? else {
            return Ok(None);
        };
        table
            .get(key)?
            .map(|v| decode::<Record>(v.value()))
            .transpose()
    }

    /// Every record of a namespace, in key order.
    fn records_unguarded(&self, namespace: &str) -> Result<Vec<(String, Record)>, StoreError> {
        let db = self.db()?;
        records_in(&db.begin_read()?, &Tables::new(namespace))
    }

    /// The keys whose KV copy is behind, with their records (for the startup flush).
    fn outbox_unguarded(&self, namespace: &str) -> Result<Vec<(String, Record)>, StoreError> {
        let db = self.db()?;
        let tables = Tables::new(namespace);
        let txn = db.begin_read()?;
        let Some(outbox) = open_existing(&txn, tables.outbox())? else {
            return Ok(Vec::new());
        };
        let records = txn.open_table(tables.records())?;
        let mut out = Vec::new();
        for entry in outbox.iter()? {
            let (k, _) = entry?;
            let key = k.value();
            if let Some(v) = records.get(key)? {
                out.push((key.to_owned(), decode::<Record>(v.value())?));
            }
        }
        Ok(out)
    }

    /// Number of keys in the outbox.
    fn outbox_len_unguarded(&self, namespace: &str) -> Result<u64, StoreError> {
        let db = self.db()?;
        let tables = Tables::new(namespace);
        let txn = db.begin_read()?;
        match open_existing(&txn, tables.outbox())? {
            Some(table) => Ok(table.len()?),
            None => Ok(0),
        }
    }

    /// The checkpoint of a namespace.
    fn checkpoint_unguarded(&self, namespace: &str) -> Result<Option<Checkpoint>, StoreError> {
        let db = self.db()?;
        let tables = Tables::new(namespace);
        let txn = db.begin_read()?;
        let meta = txn.open_table(META)?;
        meta.get(tables.checkpoint_key.as_str())?
            .map(|v| decode::<Checkpoint>(v.value()))
            .transpose()
    }

    /// The dead letters a namespace published, by stream sequence.
    fn dead_letters_unguarded(&self, namespace: &str) -> Result<Vec<(u64, DeadNote)>, StoreError> {
        let db = self.db()?;
        dead_letters_in(&db.begin_read()?, &Tables::new(namespace))
    }
}

/// `definition` opened for reading; `None` if no write transaction ever created it.
fn open_existing<K: redb::Key + 'static, V: redb::Value + 'static>(
    txn: &redb::ReadTransaction,
    definition: TableDefinition<'_, K, V>,
) -> Result<Option<redb::ReadOnlyTable<K, V>>, StoreError> {
    match txn.open_table(definition) {
        Ok(table) => Ok(Some(table)),
        Err(redb::TableError::TableDoesNotExist(_)) => Ok(None),
        Err(err) => Err(err.into()),
    }
}

/// Every record of a namespace, in key order.
fn records_in(
    txn: &redb::ReadTransaction,
    tables: &Tables,
) -> Result<Vec<(String, Record)>, StoreError> {
    let Some(table) = open_existing(txn, tables.records())? else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for entry in table.iter()? {
        let (k, v) = entry?;
        out.push((k.value().to_owned(), decode::<Record>(v.value())?));
    }
    Ok(out)
}

/// The highest sequence of any record of `records` (0 when empty).
fn highest_seq(records: &RecordsTable<'_>) -> Result<u64, StoreError> {
    let mut highest = 0;
    for entry in records.iter()? {
        let (_, value) = entry?;
        highest = highest.max(decode::<RecordRef>(value.value())?.seq);
    }
    Ok(highest)
}

/// The dead letters of a namespace, by stream sequence.
fn dead_letters_in(
    txn: &redb::ReadTransaction,
    tables: &Tables,
) -> Result<Vec<(u64, DeadNote)>, StoreError> {
    let Some(table) = open_existing(txn, tables.dead())? else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for entry in table.iter()? {
        let (k, v) = entry?;
        out.push((k.value(), decode::<DeadNote>(v.value())?));
    }
    Ok(out)
}

/// The public surface of the store: every call is guarded, so that a panic inside redb on a
/// damaged file (it has panicked on flipped bytes) becomes [`StoreError::Corrupted`] instead
/// of crashing the process.
impl Store {
    /// Opens (or creates) the database at `path`.
    pub fn open(path: &Path, cache_mib: usize) -> Result<Store, StoreError> {
        guard(|| Store::open_unguarded(path, cache_mib))
    }

    /// Applies one batch in one durable write transaction (see the rules on the inner
    /// function): returns the outcomes, the KV writes, and the outbox size.
    pub fn apply(
        &self,
        spec: &Spec,
        mut items: Vec<Item>,
        house: &Housekeeping,
        position: Option<&Position>,
    ) -> Result<Applied, StoreError> {
        self.apply_from(spec, &mut items, house, position)
    }

    /// Like [`Store::apply`], leaving the items in `items` (emptied of what the store kept) for
    /// the caller to clear: on the thread that decoded them their memory is freed cheaply, and
    /// the vector is filled again for a later batch (no fresh memory to fault in).
    pub fn apply_from(
        &self,
        spec: &Spec,
        items: &mut [Item],
        house: &Housekeeping,
        position: Option<&Position>,
    ) -> Result<Applied, StoreError> {
        self.apply_deferring(spec, items, house, position, || false)
    }

    /// Like [`Store::apply_from`]; when `defer_sync` (called just before the commit) says so,
    /// commits without an fsync ([`Applied::unsynced`]). Such a commit is visible at once and
    /// becomes durable with the next durable commit (or when the database is closed); a crash
    /// or a failed commit before then may lose it. What it settled must not be acked until a
    /// later commit is durable.
    pub fn apply_deferring(
        &self,
        spec: &Spec,
        items: &mut [Item],
        house: &Housekeeping,
        position: Option<&Position>,
        defer_sync: impl FnOnce() -> bool,
    ) -> Result<Applied, StoreError> {
        guard(|| {
            let below = BelowFloor::Skip;
            self.apply_unguarded(spec, items, house, position, below, defer_sync)
        })
    }

    /// Applies events of a bounded replay (a backfill): like [`Store::apply`], but events at or
    /// below the ack floor are not presumed processed (a durable that started late never
    /// delivered them); the per-key sequence guards, dedupe markers and epochs still decide.
    /// The checkpoint does not move.
    pub fn backfill(&self, spec: &Spec, mut items: Vec<Item>) -> Result<Applied, StoreError> {
        let house = Housekeeping::default();
        guard(|| self.apply_unguarded(spec, &mut items, &house, None, BelowFloor::Apply, || false))
    }

    /// Folds confirmations into the store on their own; returns the outbox size.
    pub fn housekeep(&self, spec: &Spec, house: &Housekeeping) -> Result<u64, StoreError> {
        guard(|| self.housekeep_unguarded(spec, house))
    }

    /// The record of `key`.
    pub fn record(&self, namespace: &str, key: &str) -> Result<Option<Record>, StoreError> {
        guard(|| self.record_unguarded(namespace, key))
    }

    /// Every record of a namespace, in key order.
    pub fn records(&self, namespace: &str) -> Result<Vec<(String, Record)>, StoreError> {
        guard(|| self.records_unguarded(namespace))
    }

    /// The keys whose KV copy is behind, with their records.
    pub fn outbox(&self, namespace: &str) -> Result<Vec<(String, Record)>, StoreError> {
        guard(|| self.outbox_unguarded(namespace))
    }

    /// Number of keys in the outbox.
    pub fn outbox_len(&self, namespace: &str) -> Result<u64, StoreError> {
        guard(|| self.outbox_len_unguarded(namespace))
    }

    /// The checkpoint of a namespace.
    pub fn checkpoint(&self, namespace: &str) -> Result<Option<Checkpoint>, StoreError> {
        guard(|| self.checkpoint_unguarded(namespace))
    }

    /// The dead letters a namespace published, by stream sequence.
    pub fn dead_letters(&self, namespace: &str) -> Result<Vec<(u64, DeadNote)>, StoreError> {
        guard(|| self.dead_letters_unguarded(namespace))
    }

    /// Reads a whole namespace in one read transaction.
    pub fn export(&self, namespace: &str) -> Result<Contents, StoreError> {
        guard(|| self.export_unguarded(namespace))
    }

    /// Replaces a whole namespace in one write transaction (`to_kv`: every record goes to the
    /// outbox).
    pub fn import(
        &self,
        namespace: &str,
        contents: &Contents,
        to_kv: bool,
    ) -> Result<(), StoreError> {
        guard(|| self.import_unguarded(namespace, contents, to_kv))
    }
}

/// Runs a store call, turning a panic of the storage engine into `Corrupted`.
fn guard<T>(call: impl FnOnce() -> Result<T, StoreError>) -> Result<T, StoreError> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(call)) {
        Ok(result) => result,
        Err(panic) => Err(StoreError::Corrupted(format!(
            "the storage engine failed on damaged data ({})",
            panic_message(&panic)
        ))),
    }
}

/// The publish-time bucket of the dedupe markers of an event published at `publish_ms`
/// (0 without a window).
pub fn dedupe_bucket(publish_ms: u64, window_ms: u64) -> u64 {
    publish_ms.checked_div(window_ms).unwrap_or(0)
}

/// The text of a caught panic.
pub fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
        .unwrap_or_else(|| "unknown panic".into())
}

type OutboxTable<'t> = redb::Table<'t, &'static str, u64>;
type DeadTable<'t> = redb::Table<'t, u64, &'static [u8]>;
type RecordsTable<'t> = redb::Table<'t, &'static str, &'static [u8]>;
type DedupeTable<'t> = redb::Table<'t, (u64, &'static str), (u64, u64)>;
type RunsTable<'t> = redb::Table<'t, (u64, u64), &'static [u8]>;

/// Folds confirmations from earlier batches into an open write transaction.
fn fold_housekeeping(
    house: &Housekeeping,
    checkpoint: &mut Checkpoint,
    window_ms: u64,
    outbox: &mut OutboxTable<'_>,
    dead: &mut DeadTable<'_>,
    dedupe: &mut DedupeTable<'_>,
    runs: &mut RunsTable<'_>,
) -> Result<Option<u64>, StoreError> {
    let mut expired_below = None;
    for c in &house.kv_confirmed {
        // Only clear the entry if no newer batch re-dirtied the key meanwhile.
        let done = matches!(outbox.get(c.key.as_str())?, Some(v) if v.value() <= c.seq);
        if done {
            outbox.remove(c.key.as_str())?;
        }
    }
    for (seq, note) in &house.dead_published {
        dead.insert(*seq, encode(note)?.as_slice())?;
    }
    if let Some((floor, floor_ms)) = house.ack_floor {
        // Never trust a floor beyond what this store processed itself.
        let floor = floor.min(checkpoint.last_seq);
        if floor > checkpoint.acked_floor {
            checkpoint.acked_floor = floor;
            checkpoint.acked_floor_ms = checkpoint.acked_floor_ms.max(floor_ms);
            // Every message that can still be delivered was published at or after
            // acked_floor_ms, so markers older than that minus the window never match again.
            if let Some(horizon) = checkpoint
                .acked_floor_ms
                .saturating_sub(window_ms)
                .checked_div(window_ms)
            {
                if matches!(dedupe.first()?, Some((k, _)) if k.value().0 < horizon) {
                    dedupe.retain_in::<(u64, &str), _>(..(horizon, ""), |_, _| false)?;
                    expired_below = Some(horizon);
                }
                if matches!(runs.first()?, Some((k, _)) if k.value().0 < horizon) {
                    runs.retain_in::<(u64, u64), _>(..(horizon, 0), |_, _| false)?;
                    expired_below = Some(horizon);
                }
            }
        }
    }
    Ok(expired_below)
}

/// The dedupe markers as one batch sees them: both tables, their caches, and the batch's own
/// runs (written at its end).
struct Markers<'a, 't> {
    by_id: &'a mut DedupeTable<'t>,
    runs: &'a mut RunsTable<'t>,
    /// The namespace's filters and run index.
    filters: &'a mut filter::Buckets,
    index: &'a mut runs::Buckets,
    /// This batch's runs: (bucket, first seq, markers).
    pending: Vec<(u64, u64, Vec<runs::Marker>)>,
    /// Scratch: candidate blocks of one lookup.
    blocks: Vec<u64>,
}

impl Markers<'_, '_> {
    /// Whether `bucket` holds a marker of `id` (hash `h`) published within `window` of
    /// `publish_ms`.
    fn seen(
        &mut self,
        bucket: u64,
        id: &str,
        h: u64,
        publish_ms: u64,
        window: u64,
    ) -> Result<bool, StoreError> {
        let within = |ms: u64| publish_ms.abs_diff(ms) <= window;
        let runs = &*self.runs;
        let mut load = |add: &mut dyn FnMut(u64, &[u8])| bucket_runs(runs, bucket, add);
        // Most ids are new: the index says so without reading a run.
        self.index
            .candidates(bucket, h, &mut load, &mut self.blocks)?;
        for &block in &self.blocks {
            for (b, first, pending) in &self.pending {
                if *b == bucket
                    && runs::block(*first) == block
                    && pending.iter().any(|(at, _, ms)| at == id && within(*ms))
                {
                    return Ok(true);
                }
            }
            let range = runs::block_range(block);
            for row in runs.range((bucket, range.start)..(bucket, range.end))? {
                let (_, run) = row?;
                let found = runs::Run::parse(run.value())?.find(id.as_bytes());
                if matches!(found, Some((_, ms)) if within(ms)) {
                    return Ok(true);
                }
            }
        }
        let by_id = &*self.by_id;
        let load = |add: &mut dyn FnMut(&str) -> bool| bucket_ids(by_id, bucket, add);
        if self.filters.may_contain(bucket, id, load)? {
            if let Some(marker) = by_id.get((bucket, id))? {
                return Ok(within(marker.value().1));
            }
        }
        Ok(false)
    }

    /// Starts fetching the index slot a lookup of hash `h` in `bucket` reads first.
    fn prefetch(&self, bucket: u64, h: u64) {
        self.index.prefetch(bucket, h);
    }

    /// Records the marker of an applied event: in this batch's run of its bucket, or one row by
    /// id when the bucket's run index is full.
    fn record(
        &mut self,
        bucket: u64,
        id: &str,
        h: u64,
        seq: u64,
        publish_ms: u64,
    ) -> Result<(), StoreError> {
        if !self.index.has_room(bucket) {
            self.by_id.insert((bucket, id), (seq, publish_ms))?;
            self.filters.insert(bucket, id);
            return Ok(());
        }
        let marker = (id.to_owned(), seq, publish_ms);
        let first = match self.pending.iter_mut().find(|(b, ..)| *b == bucket) {
            Some((_, first, run)) => {
                run.push(marker);
                *first
            }
            None => {
                self.pending.push((bucket, seq, vec![marker]));
                seq
            }
        };
        let (runs, pending) = (&*self.runs, &self.pending);
        // A rebuild reads the stored runs and this batch's.
        let mut load = |add: &mut dyn FnMut(u64, &[u8])| {
            bucket_runs(runs, bucket, add)?;
            for (_, first, markers) in pending.iter().filter(|(b, ..)| *b == bucket) {
                for (id, _, _) in markers {
                    add(*first, id.as_bytes());
                }
            }
            Ok::<_, StoreError>(())
        };
        self.index.insert(bucket, h, first, &mut load)
    }

    /// Writes this batch's runs (merged into a run already stored under the same key, which
    /// only a replay of the same sequences can leave).
    fn write_runs(self) -> Result<(), StoreError> {
        for (bucket, first, mut markers) in self.pending {
            if let Some(stored) = self.runs.get((bucket, first))? {
                for (id, seq, ms) in runs::Run::parse(stored.value())?.iter() {
                    markers.push((runs::text(id)?.to_owned(), seq, ms));
                }
            }
            self.runs
                .insert((bucket, first), runs::encode(&mut markers).as_slice())?;
        }
        Ok(())
    }
}

/// Calls `add` with the first sequence and each dedupe id of every run of `bucket`.
fn bucket_runs(
    runs: &RunsTable<'_>,
    bucket: u64,
    add: &mut dyn FnMut(u64, &[u8]),
) -> Result<(), StoreError> {
    for row in runs.range((bucket, 0)..=(bucket, u64::MAX))? {
        let (key, run) = row?;
        let first = key.value().1;
        for (id, _, _) in runs::Run::parse(run.value())?.iter() {
            add(first, id);
        }
    }
    Ok(())
}

/// Calls `add` with every dedupe id of `bucket`, until it returns `false`.
fn bucket_ids(
    dedupe: &DedupeTable<'_>,
    bucket: u64,
    add: &mut dyn FnMut(&str) -> bool,
) -> Result<(), StoreError> {
    for entry in dedupe.range::<(u64, &str)>((bucket, "")..)? {
        let (key, _) = entry?;
        let (b, id) = key.value();
        if b != bucket || !add(id) {
            break;
        }
    }
    Ok(())
}

/// Everything a projection namespace holds, read in one transaction (a consistent cut at one
/// stream sequence): what a snapshot carries and a restore loads.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Contents {
    /// The checkpoint.
    pub checkpoint: Checkpoint,
    /// Every record, tombstones included, in key order.
    pub records: Vec<(String, Record)>,
    /// Dedupe markers: (bucket, dedupe id, stream seq, publish ms).
    pub markers: Vec<(u64, String, u64, u64)>,
    /// Published dead letters by stream sequence.
    pub dead: Vec<(u64, DeadNote)>,
}

impl Store {
    /// Reads a whole namespace in one read transaction.
    fn export_unguarded(&self, namespace: &str) -> Result<Contents, StoreError> {
        let db = self.db()?;
        let tables = Tables::new(namespace);
        let txn = db.begin_read()?;
        let mut contents = Contents::default();
        let meta = txn.open_table(META)?;
        if let Some(v) = meta.get(tables.checkpoint_key.as_str())? {
            contents.checkpoint = decode(v.value())?;
        }
        contents.records = records_in(&txn, &tables)?;
        if let Some(table) = open_existing(&txn, tables.dedupe())? {
            for entry in table.iter()? {
                let (k, v) = entry?;
                let ((bucket, id), (seq, ms)) = (k.value(), v.value());
                contents.markers.push((bucket, id.to_owned(), seq, ms));
            }
        }
        if let Some(table) = open_existing(&txn, tables.runs())? {
            for entry in table.iter()? {
                let (k, v) = entry?;
                let (bucket, _) = k.value();
                for (id, seq, ms) in runs::Run::parse(v.value())?.iter() {
                    contents
                        .markers
                        .push((bucket, runs::text(id)?.to_owned(), seq, ms));
                }
            }
            // One order whatever table a marker came from, one marker per id and bucket
            // (an import keeps one), so a restored store exports the same markers.
            contents.markers.sort_unstable();
            contents.markers.dedup_by(|b, a| a.0 == b.0 && a.1 == b.1);
        }
        contents.dead = dead_letters_in(&txn, &tables)?;
        Ok(contents)
    }

    /// Replaces a whole namespace in one write transaction. With `to_kv`, every record is put
    /// in the outbox, so KV receives the restored values (compare-and-set keeps anything newer
    /// that KV already holds).
    fn import_unguarded(
        &self,
        namespace: &str,
        contents: &Contents,
        to_kv: bool,
    ) -> Result<(), StoreError> {
        let db = self.db()?;
        let tables = Tables::new(namespace);
        let txn = db.begin_write()?;
        {
            let mut records = txn.open_table(tables.records())?;
            let mut dedupe = txn.open_table(tables.dedupe())?;
            let mut runs = txn.open_table(tables.runs())?;
            let mut outbox = txn.open_table(tables.outbox())?;
            let mut dead = txn.open_table(tables.dead())?;
            let mut meta = txn.open_table(META)?;
            // Under the write transaction: no batch can load the old markers meanwhile.
            self.filters().forget(namespace);
            self.run_index().forget(namespace);
            records.retain(|_, _| false)?;
            dedupe.retain(|_, _| false)?;
            runs.retain(|_, _| false)?;
            outbox.retain(|_, _| false)?;
            dead.retain(|_, _| false)?;
            for (key, record) in &contents.records {
                records.insert(key.as_str(), encode(record)?.as_slice())?;
                if to_kv {
                    outbox.insert(key.as_str(), record.seq)?;
                }
            }
            for (bucket, id, seq, ms) in &contents.markers {
                dedupe.insert((*bucket, id.as_str()), (*seq, *ms))?;
            }
            for (seq, note) in &contents.dead {
                dead.insert(*seq, encode(note)?.as_slice())?;
            }
            meta.insert(
                tables.checkpoint_key.as_str(),
                encode(&contents.checkpoint)?.as_slice(),
            )?;
            let highest = contents.records.iter().map(|(_, r)| r.seq).max();
            meta.insert(
                tables.seq_bound_key.as_str(),
                encode(&highest.unwrap_or(0))?.as_slice(),
            )?;
        }
        txn.commit()?;
        Ok(())
    }
}

fn open_db(path: &Path, cache_bytes: usize) -> Result<Database, StoreError> {
    let mut builder = Database::builder();
    builder.set_cache_size(cache_bytes);
    // As redb's own `Builder::create` opens it.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(StoreError::Io)?;
    #[cfg(feature = "fault-injection")]
    if faulty::fail_at().is_some() {
        return create_db(&builder, faulty::FaultyDisk::new(file)?, path);
    }
    create_db(&builder, redb::backends::FileBackend::new(file)?, path)
}

/// Creates (or opens) the database on `disk`, its page writes gathered per sync.
fn create_db(
    builder: &redb::Builder,
    disk: impl redb::StorageBackend,
    path: &Path,
) -> Result<Database, StoreError> {
    match builder.create_with_backend(combining::Combining::new(disk)) {
        Ok(db) => Ok(db),
        Err(redb::DatabaseError::DatabaseAlreadyOpen) => Err(StoreError::Locked(path.to_owned())),
        Err(err) => Err(err.into()),
    }
}

#[cfg(test)]
mod tests;
