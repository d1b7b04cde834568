//! A negative cache of the dedupe markers: per projection namespace and publish-time bucket, a
//! Bloom filter of the dedupe ids stored in that bucket, so that a new id (the common case) is
//! decided without looking it up in the table.
//!
//! Invariant: a loaded bucket filter contains every id the table holds in that bucket (it may
//! contain more: ids of a transaction that did not commit, markers expired since). So "absent"
//! is definite and "maybe" falls back to the table. A bucket is loaded from the table the first
//! time a batch needs it, inside that batch's write transaction; every marker inserted later
//! goes through [`Buckets::insert`]. Whatever replaces markers wholesale (an import) must call
//! [`Namespaces::forget`].

use std::collections::hash_map::Entry;
use std::hash::BuildHasher;

use foldhash::HashMap;

use super::namespaces::{Expiring, Namespaces};

/// Ids a bucket filters at most; beyond it the bucket is always looked up in the table (keeps
/// memory bounded: about 12 bits per id, so 2 M ids take ~3-6 MiB).
const MAX_FILTERED: usize = 2 << 20;
/// Ids the first layer of a bucket holds before a layer twice as large is added.
const FIRST_LAYER: usize = 4096;
/// Filter bits per id.
const BITS_PER_ID: usize = 12;

/// The filters of every namespace of one store.
pub(super) type Filters = Namespaces<Buckets>;

/// The filters of one namespace, by bucket.
#[derive(Debug, Default)]
pub(super) struct Buckets(HashMap<u64, Bucket>);

/// What is known of one bucket.
#[derive(Debug)]
enum Bucket {
    /// Every id of the bucket is in the filter.
    Filtered(Bloom),
    /// Too many ids to filter: always look them up.
    Unfiltered,
}

impl Expiring for Buckets {
    fn expire(&mut self, horizon: u64) {
        self.0.retain(|bucket, _| *bucket >= horizon);
    }
}

impl Buckets {
    /// Whether `id` may have a marker in `bucket` (`false` is definite). `load` reads the
    /// bucket's ids from the table, calling its argument with each until it returns `false`;
    /// it runs the first time a bucket is asked about.
    pub(super) fn may_contain<E>(
        &mut self,
        bucket: u64,
        id: &str,
        load: impl FnOnce(&mut dyn FnMut(&str) -> bool) -> Result<(), E>,
    ) -> Result<bool, E> {
        let state = match self.0.entry(bucket) {
            Entry::Occupied(known) => known.into_mut(),
            Entry::Vacant(slot) => {
                let mut bloom = Bloom::default();
                let mut full = false;
                load(&mut |id| {
                    bloom.insert(hash(id));
                    full = bloom.len >= MAX_FILTERED;
                    !full
                })?;
                slot.insert(if full {
                    Bucket::Unfiltered
                } else {
                    Bucket::Filtered(bloom)
                })
            }
        };
        Ok(match state {
            Bucket::Filtered(bloom) => bloom.contains(hash(id)),
            Bucket::Unfiltered => true,
        })
    }

    /// Records a marker being inserted into `bucket`. Must be called for every insert into a
    /// loaded bucket; an unloaded bucket will read it from the table when it loads.
    pub(super) fn insert(&mut self, bucket: u64, id: &str) {
        let Some(state) = self.0.get_mut(&bucket) else {
            return;
        };
        if let Bucket::Filtered(bloom) = state {
            if bloom.len >= MAX_FILTERED {
                *state = Bucket::Unfiltered;
            } else {
                bloom.insert(hash(id));
            }
        }
    }
}

fn hash(id: &str) -> u64 {
    foldhash::quality::FixedState::with_seed(0x6e61_7473_2d70_726f).hash_one(id)
}

/// A scalable blocked Bloom filter: layers of growing size; each id sets 4 bits of one 64-bit
/// word of the newest layer, and is looked for in every layer.
#[derive(Debug, Default)]
struct Bloom {
    layers: Vec<Layer>,
    /// Ids inserted (duplicates counted).
    len: usize,
}

#[derive(Debug)]
struct Layer {
    words: Vec<u64>,
    capacity: usize,
    len: usize,
}

impl Layer {
    fn with_capacity(capacity: usize) -> Layer {
        Layer {
            words: vec![0; (capacity * BITS_PER_ID).div_ceil(64)],
            capacity,
            len: 0,
        }
    }

    /// The word index and the 4-bit mask of a hash.
    fn slot(&self, h: u64) -> (usize, u64) {
        let index = (((h >> 32) * self.words.len() as u64) >> 32) as usize;
        let mask = (1u64 << (h & 63))
            | (1u64 << ((h >> 6) & 63))
            | (1u64 << ((h >> 12) & 63))
            | (1u64 << ((h >> 18) & 63));
        (index, mask)
    }
}

impl Bloom {
    fn insert(&mut self, h: u64) {
        let grow = match self.layers.last() {
            Some(layer) => (layer.len >= layer.capacity).then_some(layer.capacity * 2),
            None => Some(FIRST_LAYER),
        };
        if let Some(capacity) = grow {
            self.layers.push(Layer::with_capacity(capacity));
        }
        if let Some(layer) = self.layers.last_mut() {
            let (index, mask) = layer.slot(h);
            layer.words[index] |= mask;
            layer.len += 1;
        }
        self.len += 1;
    }

    fn contains(&self, h: u64) -> bool {
        self.layers.iter().any(|layer| {
            let (index, mask) = layer.slot(h);
            layer.words[index] & mask == mask
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_none(_: &mut dyn FnMut(&str) -> bool) -> Result<(), ()> {
        Ok(())
    }

    #[test]
    fn every_inserted_id_is_found_and_most_others_are_not() {
        let mut f = Filters::default();
        assert_eq!(f.namespace("ns").may_contain(7, "x", load_none), Ok(false));
        for i in 0..100_000 {
            f.namespace("ns").insert(7, &format!("id-{i}"));
        }
        for i in 0..100_000 {
            assert_eq!(
                f.namespace("ns")
                    .may_contain(7, &format!("id-{i}"), load_none),
                Ok(true)
            );
        }
        let false_positives = (0..100_000)
            .filter(|i| {
                f.namespace("ns")
                    .may_contain(7, &format!("other-{i}"), load_none)
                    == Ok(true)
            })
            .count();
        // Six layers at ~0.5% each, in theory; far below what would make the filter useless.
        assert!(false_positives < 5_000, "{false_positives} false positives");
        // Another bucket and another namespace know nothing of these.
        assert_eq!(
            f.namespace("ns").may_contain(8, "id-1", load_none),
            Ok(false)
        );
        assert_eq!(
            f.namespace("other").may_contain(7, "id-1", load_none),
            Ok(false)
        );
    }

    #[test]
    fn a_bucket_loads_what_the_table_holds_once() {
        let mut f = Filters::default();
        let mut loads = 0;
        for _ in 0..3 {
            let found =
                f.namespace("ns")
                    .may_contain(1, "b", |add: &mut dyn FnMut(&str) -> bool| {
                        loads += 1;
                        for id in ["a", "b", "c"] {
                            add(id);
                        }
                        Ok::<_, ()>(())
                    });
            assert_eq!(found, Ok(true));
        }
        assert_eq!(loads, 1);
        f.forget("ns");
        assert_eq!(f.namespace("ns").may_contain(1, "b", load_none), Ok(false));
    }

    #[test]
    fn an_oversized_bucket_is_looked_up_always() {
        let mut f = Filters::default();
        let filled = f
            .namespace("ns")
            .may_contain(1, "zz", |add: &mut dyn FnMut(&str) -> bool| {
                let mut i = 0u64;
                while add(&i.to_string()) {
                    i += 1;
                }
                Ok::<_, ()>(())
            });
        assert_eq!(filled, Ok(true), "an unfiltered bucket answers maybe");
        f.expire("ns", 2);
        assert_eq!(f.namespace("ns").may_contain(1, "zz", load_none), Ok(false));
    }
}
