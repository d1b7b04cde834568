//! Dedupe markers written as runs, and the in-memory index that finds them by id.
//!
//! A batch writes the markers it applies in one publish-time bucket as one *run*: a single row
//! keyed (bucket, stream sequence of the run's first marker), its markers sorted by id. Rows
//! arrive in stream order, so writing them stays append-like whatever the ids look like (with a
//! row per marker keyed by id, random ids scatter a batch over the whole table: a page copied
//! and written per marker).
//!
//! The index maps an id to the runs that may hold it: per namespace and bucket, an
//! open-addressing table of 32-bit slots, each a 16-bit fingerprint of the id's hash and the low
//! 16 bits of its run's sequence block (first sequence >> [`BLOCK_BITS`]): 4.6 to 9 bytes per
//! id, one cache miss per lookup. A slot is confirmed by reading the runs of its block.
//!
//! Invariant: a loaded bucket holds a slot for every marker of the bucket's runs (it may hold
//! more: runs of a transaction that did not commit, runs expired since). So "no candidate" is
//! definite. A bucket is loaded from the table the first time a batch needs it, inside that
//! batch's write transaction; every marker written later goes through [`Buckets::insert`].
//! Whatever replaces runs wholesale (an import) must call [`Namespaces::forget`].

use std::hash::BuildHasher;

use foldhash::HashMap;

use super::StoreError;
use super::namespaces::{Expiring, Namespaces};

/// A run's sequence block: runs whose first sequence shares `seq >> BLOCK_BITS`.
pub(super) const BLOCK_BITS: u32 = 12;
/// Ids a bucket indexes at most: a table of 2^19 slots (2 MiB) seven eighths full. Markers
/// beyond it are written one row per id instead (the by-id table, behind its Bloom filter), so
/// the index of a bucket never outgrows 2 MiB whatever the backlog (4 MiB, twice the ids, cost a
/// million-event catch-up 2 MiB more peak RSS, with the RSS target 3 MiB away).
#[cfg(not(test))]
pub(super) const MAX_INDEXED: usize = 7 << 16;
#[cfg(test)]
pub(super) const MAX_INDEXED: usize = 40;
/// Slots of a bucket's table at least (tests: small, so that batches rebuild tables).
#[cfg(not(test))]
const FIRST_SLOTS: usize = 1 << 12;
#[cfg(test)]
const FIRST_SLOTS: usize = 16;

/// The hash an id (its UTF-8 bytes) is indexed by.
pub(super) fn hash(id: &[u8]) -> u64 {
    foldhash::quality::FixedState::with_seed(0x7275_6e73_2d69_6478).hash_one(id)
}

/// The block of a run starting at `first_seq`.
pub(super) fn block(first_seq: u64) -> u64 {
    first_seq >> BLOCK_BITS
}

/// The first-sequence range of the runs of `block`.
pub(super) fn block_range(block: u64) -> std::ops::Range<u64> {
    let start = block << BLOCK_BITS;
    start..start.saturating_add(1 << BLOCK_BITS)
}

/// One marker of a run: (dedupe id, stream seq, publish ms).
pub(super) type Marker = (String, u64, u64);

/// Encodes markers as a run: `n: u32`, `n` end offsets (`u32`, into the entries), then the
/// entries sorted by id, each `seq: u64`, `publish_ms: u64`, the id's bytes (all little-endian).
pub(super) fn encode(markers: &mut [Marker]) -> Vec<u8> {
    markers.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    let n = markers.len();
    let entries: usize = markers.iter().map(|m| 16 + m.0.len()).sum();
    let mut out = Vec::with_capacity(4 + 4 * n + entries);
    out.extend_from_slice(&(n as u32).to_le_bytes());
    let mut end = 0u32;
    for (id, _, _) in markers.iter() {
        end += 16 + id.len() as u32;
        out.extend_from_slice(&end.to_le_bytes());
    }
    for (id, seq, ms) in markers.iter() {
        out.extend_from_slice(&seq.to_le_bytes());
        out.extend_from_slice(&ms.to_le_bytes());
        out.extend_from_slice(id.as_bytes());
    }
    out
}

/// A stored run, read in place.
pub(super) struct Run<'a> {
    ends: &'a [u8],
    entries: &'a [u8],
}

impl<'a> Run<'a> {
    /// Checks the layout of a stored run (its offsets; ids are compared as bytes, and turned
    /// into text by [`text`] where needed).
    pub(super) fn parse(bytes: &'a [u8]) -> Result<Run<'a>, StoreError> {
        let bad = || StoreError::Corrupted("a dedupe run has a broken layout".into());
        let n = bytes
            .get(..4)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_le_bytes)
            .ok_or_else(bad)? as usize;
        let header = n
            .checked_mul(4)
            .and_then(|b| b.checked_add(4))
            .ok_or_else(bad)?;
        let ends = bytes.get(4..header).ok_or_else(bad)?;
        let entries = &bytes[header..];
        let run = Run { ends, entries };
        let mut start = 0;
        for i in 0..n {
            let end = run.end(i);
            if end < start + 16 || end > entries.len() {
                return Err(bad());
            }
            start = end;
        }
        if start != entries.len() {
            return Err(bad());
        }
        Ok(run)
    }

    fn len(&self) -> usize {
        self.ends.len() / 4
    }

    fn end(&self, i: usize) -> usize {
        let b = &self.ends[4 * i..4 * i + 4];
        u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize
    }

    /// Entry `i`: (id, seq, publish ms). Offsets were checked by [`Run::parse`].
    fn entry(&self, i: usize) -> (&'a [u8], u64, u64) {
        let start = if i == 0 { 0 } else { self.end(i - 1) };
        let e = &self.entries[start..self.end(i)];
        let num = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&e[at..at + 8]);
            u64::from_le_bytes(b)
        };
        (&e[16..], num(0), num(8))
    }

    /// The marker of `id`: (seq, publish ms).
    pub(super) fn find(&self, id: &[u8]) -> Option<(u64, u64)> {
        let (mut lo, mut hi) = (0, self.len());
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let (at, seq, ms) = self.entry(mid);
            match at.cmp(id) {
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid,
                std::cmp::Ordering::Equal => return Some((seq, ms)),
            }
        }
        None
    }

    /// Every marker, in id order.
    pub(super) fn iter(&self) -> impl Iterator<Item = (&'a [u8], u64, u64)> + '_ {
        (0..self.len()).map(|i| self.entry(i))
    }
}

/// A run's id as text (ids are written from `&str`, so only damage fails).
pub(super) fn text(id: &[u8]) -> Result<&str, StoreError> {
    std::str::from_utf8(id)
        .map_err(|_| StoreError::Corrupted("a dedupe run holds an id that is not UTF-8".into()))
}

/// The run index of every namespace of one store.
pub(super) type RunIndex = Namespaces<Buckets>;

/// The run index of one namespace, by bucket.
#[derive(Debug, Default)]
pub(super) struct Buckets(HashMap<u64, Bucket>);

/// The index of one bucket: one open-addressing table (linear probing), rebuilt twice as large
/// from the bucket's runs when seven eighths full (a slot keeps too little of the hash to be
/// moved).
#[derive(Debug, Default)]
struct Bucket {
    /// Empty, or a power of two long.
    slots: Vec<u32>,
    /// Slots in use.
    used: usize,
    /// Ids inserted (repeats counted).
    len: usize,
    /// The lowest and highest block of the bucket's runs (a slot keeps 16 bits of it).
    blocks: Option<(u64, u64)>,
}

/// The slot of an id's hash in a run of `block`: a nonzero fingerprint and the block's low bits.
fn slot(h: u64, block: u64) -> u32 {
    let fingerprint = ((h >> 48) as u32).max(1);
    fingerprint << 16 | (block as u32 & 0xffff)
}

impl Bucket {
    /// An empty table at most half full with `ids` ids.
    fn with_room(ids: usize) -> Bucket {
        Bucket {
            slots: vec![0; (ids * 2).next_power_of_two().max(FIRST_SLOTS)],
            ..Bucket::default()
        }
    }

    /// Whether the table must grow before it takes another id (at seven eighths: a miss
    /// probes ~30 slots, two cache lines).
    fn full(&self) -> bool {
        self.used * 8 >= self.slots.len() * 7
    }

    /// Inserts into a table that is not full.
    fn insert(&mut self, h: u64, block: u64) {
        self.len += 1;
        self.blocks = Some(match self.blocks {
            Some((lo, hi)) => (lo.min(block), hi.max(block)),
            None => (block, block),
        });
        let value = slot(h, block);
        let mask = self.slots.len() - 1;
        let mut i = h as usize & mask;
        loop {
            match self.slots[i] {
                0 => {
                    self.slots[i] = value;
                    self.used += 1;
                    return;
                }
                same if same == value => return,
                _ => i = (i + 1) & mask,
            }
        }
    }

    /// The blocks whose runs may hold the id of hash `h`, into `out` (cleared first).
    fn candidates(&self, h: u64, out: &mut Vec<u64>) {
        out.clear();
        let Some((lo, hi)) = self.blocks else {
            return;
        };
        let fingerprint = slot(h, 0) >> 16;
        let mask = self.slots.len() - 1;
        let mut i = h as usize & mask;
        // At most seven eighths full, so the probe meets an empty slot.
        while self.slots[i] != 0 {
            let found = self.slots[i];
            if found >> 16 == fingerprint {
                // A bucket's blocks almost always span fewer than 65,536 values: one each.
                let mut block = (lo & !0xffff) | u64::from(found & 0xffff);
                if block < lo {
                    block += 1 << 16;
                }
                while block <= hi {
                    if !out.contains(&block) {
                        out.push(block);
                    }
                    block += 1 << 16;
                }
            }
            i = (i + 1) & mask;
        }
    }
}

/// Reads a bucket's markers: calls its argument with each marker's run's first sequence and id.
pub(super) type Load<'l, E> = &'l mut dyn FnMut(&mut dyn FnMut(u64, &[u8])) -> Result<(), E>;

impl Expiring for Buckets {
    fn expire(&mut self, horizon: u64) {
        self.0.retain(|bucket, _| *bucket >= horizon);
    }
}

impl Buckets {
    /// The blocks of `bucket` whose runs may hold the id of hash `h`, into `out` (none is
    /// definite). `load` reads the bucket's markers; it runs the first time a bucket is asked
    /// about.
    pub(super) fn candidates<E>(
        &mut self,
        bucket: u64,
        h: u64,
        load: Load<'_, E>,
        out: &mut Vec<u64>,
    ) -> Result<(), E> {
        let index = match self.0.entry(bucket) {
            std::collections::hash_map::Entry::Occupied(known) => known.into_mut(),
            std::collections::hash_map::Entry::Vacant(slot) => slot.insert(build(load, 0)?),
        };
        index.candidates(h, out);
        Ok(())
    }

    /// Asks the CPU to fetch the slot where a lookup of hash `h` in `bucket` starts, so that
    /// the lookup a moment later does not wait for memory (a table of 2 MiB misses the caches
    /// and the TLB: measured, that first load was 70% of a lookup and 7% of a 100-key batch).
    /// A hint only: nothing changes, and an unloaded bucket is ignored.
    pub(super) fn prefetch(&self, bucket: u64, h: u64) {
        let Some(index) = self.0.get(&bucket) else {
            return;
        };
        // A miss probes ~30 slots at the fullest: the line after the first one too.
        let mask = index.slots.len().wrapping_sub(1);
        for at in [h as usize & mask, (h as usize).wrapping_add(16) & mask] {
            if let Some(slot) = index.slots.get(at) {
                prefetch(slot);
            }
        }
    }

    /// Whether `bucket` is loaded and has room for another id.
    pub(super) fn has_room(&self, bucket: u64) -> bool {
        self.0
            .get(&bucket)
            .is_some_and(|index| index.len < MAX_INDEXED)
    }

    /// Records the id of hash `h` as written in the run of `bucket` starting at `first_seq`.
    /// The bucket must be loaded (see [`Buckets::has_room`]). A full table is rebuilt from
    /// `load`, which must read every marker of the bucket, the batch in hand's (this one
    /// included) as well as the stored runs.
    pub(super) fn insert<E>(
        &mut self,
        bucket: u64,
        h: u64,
        first_seq: u64,
        load: Load<'_, E>,
    ) -> Result<(), E> {
        let buckets = &mut self.0;
        let Some(index) = buckets.get_mut(&bucket) else {
            return Ok(());
        };
        if !index.full() {
            index.insert(h, block(first_seq));
            return Ok(());
        }
        // The old table goes first (it is never needed with the new one in memory); if the
        // rebuild fails the bucket is unloaded, so it loads again when next asked about. The
        // rebuilt table holds this id too: `load` reads it.
        let len = index.len;
        buckets.remove(&bucket);
        let index = build(load, len)?;
        buckets.insert(bucket, index);
        Ok(())
    }
}

/// Starts loading the cache line of `slot`.
#[cfg(target_arch = "x86_64")]
fn prefetch(slot: &u32) {
    // SAFETY: a prefetch reads nothing into the program and never faults; the pointer comes
    // from a reference, so it is valid anyway.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
            (slot as *const u32).cast::<i8>(),
        )
    }
}

/// Starts loading the cache line of `slot` (a no-op where no stable intrinsic exists).
#[cfg(not(target_arch = "x86_64"))]
fn prefetch(_slot: &u32) {}

/// A bucket's index of what `load` reads, sized for `ids` ids at first (and read again into a
/// larger table if they do not fit).
fn build<E>(load: Load<'_, E>, ids: usize) -> Result<Bucket, E> {
    let mut index = Bucket::with_room(ids);
    loop {
        let mut overflow = false;
        load(&mut |first_seq, id| {
            if index.full() {
                overflow = true;
            } else {
                index.insert(hash(id), block(first_seq));
            }
        })?;
        if !overflow {
            return Ok(index);
        }
        index = Bucket::with_room(index.slots.len() * 2);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn no_runs(_: &mut dyn FnMut(u64, &[u8])) -> Result<(), ()> {
        Ok(())
    }

    /// The rows an index is loaded and rebuilt from: (first seq, id).
    #[derive(Default)]
    struct Rows(Vec<(u64, String)>);

    impl Rows {
        fn insert(&mut self, index: &mut RunIndex, bucket: u64, id: &str, first_seq: u64) {
            self.0.push((first_seq, id.to_owned()));
            let rows = &self.0;
            let mut load = |add: &mut dyn FnMut(u64, &[u8])| {
                rows.iter().for_each(|(seq, id)| add(*seq, id.as_bytes()));
                Ok::<_, ()>(())
            };
            index
                .namespace("ns")
                .insert(bucket, hash(id.as_bytes()), first_seq, &mut load)
                .unwrap();
        }
    }

    proptest! {
        /// Every marker of a run is found with its own sequence and time; other ids are not.
        #[test]
        fn a_run_finds_exactly_its_markers(
            ids in prop::collection::hash_set("[a-z0-9-]{0,12}", 0..60),
            probe in "[a-z0-9-]{0,12}",
        ) {
            let mut markers: Vec<Marker> = ids
                .iter()
                .enumerate()
                .map(|(i, id)| (id.clone(), i as u64 + 1, 1_000 + i as u64))
                .collect();
            let expected = markers.clone();
            let bytes = encode(&mut markers);
            let run = Run::parse(&bytes).unwrap();
            for (id, seq, ms) in &expected {
                prop_assert_eq!(run.find(id.as_bytes()), Some((*seq, *ms)));
            }
            if !ids.contains(&probe) {
                prop_assert_eq!(run.find(probe.as_bytes()), None);
            }
            let listed: Vec<_> =
                run.iter().map(|(id, _, _)| text(id).unwrap().to_owned()).collect();
            let mut sorted: Vec<_> = ids.iter().cloned().collect();
            sorted.sort();
            prop_assert_eq!(listed, sorted);
        }

        /// A damaged run is refused, never misread or a panic.
        #[test]
        fn a_damaged_run_is_refused_or_read_in_bounds(cut in 0usize..200, flip in 0usize..200) {
            let mut markers: Vec<Marker> =
                (0..5).map(|i| (format!("id-{i}"), i, i * 10)).collect();
            let mut bytes = encode(&mut markers);
            if flip < bytes.len() {
                bytes[flip] ^= 0x5a;
            }
            bytes.truncate(cut.min(bytes.len()));
            if let Ok(run) = Run::parse(&bytes) {
                for (id, _, _) in run.iter() {
                    let _ = run.find(id);
                    let _ = text(id);
                }
            }
        }
    }

    #[test]
    fn an_id_that_is_not_utf8_reads_as_bytes_and_fails_as_text() {
        let mut markers: Vec<Marker> = vec![("ab".into(), 1, 10), ("cd".into(), 2, 20)];
        let mut bytes = encode(&mut markers);
        let last = bytes.len() - 1;
        bytes[last] = 0xff;
        let run = Run::parse(&bytes).unwrap();
        assert_eq!(run.find(b"c\xff"), Some((2, 20)));
        let ids: Vec<_> = run.iter().map(|(id, _, _)| text(id).is_ok()).collect();
        assert_eq!(ids, vec![true, false]);
        assert!(matches!(text(b"c\xff"), Err(StoreError::Corrupted(_))));
    }

    #[test]
    fn every_inserted_id_points_at_its_block_and_most_others_at_none() {
        let mut index = RunIndex::default();
        let mut rows = Rows::default();
        let mut out = Vec::new();
        index
            .namespace("ns")
            .candidates(7, hash(b"x"), &mut no_runs, &mut out)
            .unwrap();
        assert!(out.is_empty());
        for i in 0..100_000u64 {
            rows.insert(&mut index, 7, &format!("id-{i}"), 1_000_000 + i);
        }
        for i in 0..100_000u64 {
            index
                .namespace("ns")
                .candidates(
                    7,
                    hash(format!("id-{i}").as_bytes()),
                    &mut no_runs,
                    &mut out,
                )
                .unwrap();
            assert!(out.contains(&block(1_000_000 + i)), "id-{i}: {out:?}");
        }
        let false_candidates: usize = (0..100_000)
            .map(|i| {
                index
                    .namespace("ns")
                    .candidates(
                        7,
                        hash(format!("other-{i}").as_bytes()),
                        &mut no_runs,
                        &mut out,
                    )
                    .unwrap();
                out.len()
            })
            .sum();
        // At most seven eighths full: about thirty slots probed per miss, 1 in 65,535 matching
        // each.
        assert!(
            false_candidates < 500,
            "{false_candidates} false candidates"
        );
        let mut other = Vec::new();
        index
            .namespace("ns")
            .candidates(8, hash(b"id-1"), &mut no_runs, &mut other)
            .unwrap();
        assert!(other.is_empty(), "another bucket knows nothing of these");
        index.expire("ns", 8);
        index
            .namespace("ns")
            .candidates(7, hash(b"id-1"), &mut no_runs, &mut out)
            .unwrap();
        assert!(
            out.is_empty(),
            "an expired bucket loads again from the (empty) table"
        );
    }

    #[test]
    fn a_prefetch_changes_nothing_and_ignores_unloaded_buckets() {
        let mut index = RunIndex::default();
        index.namespace("ns").prefetch(1, hash(b"a"));
        let mut rows = Rows::default();
        let mut out = Vec::new();
        index
            .namespace("ns")
            .candidates(1, hash(b"a"), &mut no_runs, &mut out)
            .unwrap();
        rows.insert(&mut index, 1, "a", 10);
        for h in [hash(b"a"), hash(b"b"), 0, u64::MAX] {
            index.namespace("ns").prefetch(1, h);
            index.namespace("ns").prefetch(2, h);
            index.namespace("other").prefetch(1, h);
        }
        index
            .namespace("ns")
            .candidates(1, hash(b"a"), &mut no_runs, &mut out)
            .unwrap();
        assert_eq!(out, vec![block(10)]);
    }

    #[test]
    fn blocks_far_apart_in_one_bucket_are_all_candidates() {
        let mut index = RunIndex::default();
        let mut out = Vec::new();
        index
            .namespace("ns")
            .candidates(1, 0, &mut no_runs, &mut out)
            .unwrap();
        let h = hash(b"same");
        // The same low 16 bits of the block, 65,536 blocks apart.
        let mut rows = Rows::default();
        rows.insert(&mut index, 1, "same", 5 << BLOCK_BITS);
        rows.insert(&mut index, 1, "same", (5 + (1 << 16)) << BLOCK_BITS);
        index
            .namespace("ns")
            .candidates(1, h, &mut no_runs, &mut out)
            .unwrap();
        assert_eq!(out, vec![5, 5 + (1 << 16)]);
    }

    #[test]
    fn a_bucket_loads_what_the_table_holds_once() {
        let mut index = RunIndex::default();
        let mut loads = 0;
        let mut out = Vec::new();
        for _ in 0..3 {
            index
                .namespace("ns")
                .candidates(
                    1,
                    hash(b"b"),
                    &mut |add: &mut dyn FnMut(u64, &[u8])| {
                        loads += 1;
                        for (seq, id) in [(10, "a"), (10, "b"), (9_000, "c")] {
                            add(seq, id.as_bytes());
                        }
                        Ok::<_, ()>(())
                    },
                    &mut out,
                )
                .unwrap();
            assert_eq!(out, vec![block(10)]);
        }
        assert_eq!(loads, 1);
        assert!(index.namespace("ns").has_room(1));
        assert!(
            !index.namespace("ns").has_room(2),
            "an unloaded bucket takes nothing"
        );
        index.forget("ns");
        index
            .namespace("ns")
            .candidates(1, hash(b"b"), &mut no_runs, &mut out)
            .unwrap();
        assert!(out.is_empty());
    }
}
