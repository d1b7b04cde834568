//! The per-namespace part of the dedupe markers' caches (the run index and the Bloom filters):
//! each projection namespace of a store has its own buckets, forgotten when its markers are
//! replaced and trimmed when they expire.

use foldhash::HashMap;

/// A namespace's per-bucket cache.
pub(super) trait Expiring {
    /// Drops what it keeps of buckets below `horizon`.
    fn expire(&mut self, horizon: u64);
}

/// One cache per namespace of a store.
#[derive(Debug, Default)]
pub(super) struct Namespaces<T> {
    namespaces: HashMap<String, T>,
}

impl<T: Default + Expiring> Namespaces<T> {
    /// The cache of `namespace` (empty the first time): looked up once per batch, so that each
    /// event's lookups hash a bucket number only.
    pub(super) fn namespace(&mut self, namespace: &str) -> &mut T {
        self.namespaces.entry(namespace.to_owned()).or_default()
    }

    /// Drops the buckets of `namespace` below `horizon` (their markers expired).
    pub(super) fn expire(&mut self, namespace: &str, horizon: u64) {
        if let Some(buckets) = self.namespaces.get_mut(namespace) {
            buckets.expire(horizon);
        }
    }

    /// Forgets a namespace (its markers were replaced): its buckets load again.
    pub(super) fn forget(&mut self, namespace: &str) {
        self.namespaces.remove(namespace);
    }
}
