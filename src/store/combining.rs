//! A storage backend that gathers redb's page writes between two syncs and writes each run of
//! adjacent pages with one system call.
//!
//! redb flushes a commit's dirty pages one `pwrite` each (from its write buffer's lock
//! stripes, so not in file order): about 190 calls per batch of 2,000 events in a redb-only
//! catch-up with an ack per message. Gathered, sorted and joined where they touch, the same
//! bytes reach the file in far fewer calls.
//!
//! Invariants: every gathered write reaches the inner backend before a sync, a read, a length
//! query or change, or a close returns (so durability and what reads see are unchanged: only
//! the order of writes between two syncs changes, which the kernel never promised anyway);
//! overlapping writes are written in the order redb made them; at most [`GATHER_BYTES`] are
//! held at a time.

use std::ops::Bound;
use std::sync::{Mutex, MutexGuard};

use redb::{BackendError, StorageBackend};

/// Bytes gathered at most before they are written out (a buffer reused from one sync to the
/// next: its capacity stays part of the resident memory).
const GATHER_BYTES: usize = 1 << 20;

/// The byte-range lock methods of a [`StorageBackend`] that wraps another one in its `inner`
/// field: passed through as they are.
macro_rules! delegate_locks {
    () => {
        fn try_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
            self.inner.try_lock_range(start, end)
        }

        fn try_lock_shared_range(
            &self,
            start: Bound<u64>,
            end: Bound<u64>,
        ) -> Result<bool, BackendError> {
            self.inner.try_lock_shared_range(start, end)
        }

        fn lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
            self.inner.lock_range(start, end)
        }

        fn lock_shared_range(
            &self,
            start: Bound<u64>,
            end: Bound<u64>,
        ) -> Result<(), BackendError> {
            self.inner.lock_shared_range(start, end)
        }

        fn unlock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
            self.inner.unlock_range(start, end)
        }

        fn query_lock_range(
            &self,
            start: Bound<u64>,
            end: Bound<u64>,
        ) -> Result<bool, BackendError> {
            self.inner.query_lock_range(start, end)
        }
    };
}
#[cfg(feature = "fault-injection")]
pub(super) use delegate_locks;

/// Writes gathered since the last flush.
#[derive(Debug, Default)]
struct Gathered {
    /// (file offset, start in `bytes`, length), in the order they were made.
    writes: Vec<(u64, usize, usize)>,
    /// Their bytes, one after the other.
    bytes: Vec<u8>,
    /// A run of adjacent writes, joined.
    run: Vec<u8>,
}

/// Wraps a backend; see the module documentation.
#[derive(Debug)]
pub(super) struct Combining<B> {
    inner: B,
    gathered: Mutex<Gathered>,
}

impl<B: StorageBackend> Combining<B> {
    /// Gathers the writes made to `inner`.
    pub(super) fn new(inner: B) -> Combining<B> {
        Combining {
            inner,
            gathered: Mutex::new(Gathered::default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Gathered> {
        // A panic while holding the lock leaves plain data behind: still consistent enough to
        // be written out (or dropped with the handle).
        self.gathered
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Writes out what was gathered.
    fn flush(&self) -> std::io::Result<()> {
        drain(&self.inner, &mut self.lock())
    }
}

/// Writes out what was gathered; written or failed, nothing stays gathered (a failed write
/// fails the call that flushed, and redb treats the handle as failed from then on).
fn drain<B: StorageBackend>(inner: &B, g: &mut Gathered) -> std::io::Result<()> {
    let result = write_out(inner, g);
    g.writes.clear();
    g.bytes.clear();
    result
}

fn write_out<B: StorageBackend>(inner: &B, g: &mut Gathered) -> std::io::Result<()> {
    if g.writes.is_empty() {
        return Ok(());
    }
    let Gathered { writes, bytes, run } = g;
    // Stable: writes at the same offset keep their order.
    let mut order: Vec<usize> = (0..writes.len()).collect();
    order.sort_by_key(|&i| writes[i].0);
    let overlapping = order.windows(2).any(|pair| {
        let (a, b) = (writes[pair[0]], writes[pair[1]]);
        b.0 < a.0 + a.2 as u64
    });
    if overlapping {
        // The same bytes written twice: the order redb made them in decides.
        for &(offset, start, len) in writes.iter() {
            inner.write(offset, &bytes[start..start + len])?;
        }
        return Ok(());
    }
    let mut at = 0;
    while at < order.len() {
        let (offset, start, len) = writes[order[at]];
        let mut end = at + 1;
        let mut next = offset + len as u64;
        while end < order.len() && writes[order[end]].0 == next {
            next += writes[order[end]].2 as u64;
            end += 1;
        }
        if end == at + 1 {
            inner.write(offset, &bytes[start..start + len])?;
        } else {
            run.clear();
            for &i in &order[at..end] {
                let (_, start, len) = writes[i];
                run.extend_from_slice(&bytes[start..start + len]);
            }
            inner.write(offset, run)?;
        }
        at = end;
    }
    Ok(())
}

impl<B: StorageBackend> StorageBackend for Combining<B> {
    fn len(&self) -> std::io::Result<u64> {
        self.flush()?;
        self.inner.len()
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
        self.flush()?;
        self.inner.read(offset, out)
    }

    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.flush()?;
        self.inner.set_len(len)
    }

    fn sync_data(&self) -> std::io::Result<()> {
        self.flush()?;
        self.inner.sync_data()
    }

    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        let mut gathered = self.lock();
        if gathered.bytes.len() + data.len() > GATHER_BYTES {
            drain(&self.inner, &mut gathered)?;
        }
        if data.len() > GATHER_BYTES {
            return self.inner.write(offset, data);
        }
        let start = gathered.bytes.len();
        gathered.bytes.extend_from_slice(data);
        gathered.writes.push((offset, start, data.len()));
        Ok(())
    }

    fn close(&self) -> std::io::Result<()> {
        let flushed = self.flush();
        let closed = self.inner.close();
        flushed.and(closed)
    }

    delegate_locks!();
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A file in memory that records the writes it gets.
    #[derive(Debug, Default)]
    struct Recording {
        file: Mutex<Vec<u8>>,
        writes: Mutex<Vec<(u64, usize)>>,
    }

    impl StorageBackend for Recording {
        fn len(&self) -> std::io::Result<u64> {
            Ok(self.file.lock().unwrap().len() as u64)
        }

        fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
            let file = self.file.lock().unwrap();
            let start = offset as usize;
            let bytes = file
                .get(start..start + out.len())
                .ok_or_else(|| std::io::Error::other("read past the end"))?;
            out.copy_from_slice(bytes);
            Ok(())
        }

        fn set_len(&self, len: u64) -> std::io::Result<()> {
            self.file.lock().unwrap().resize(len as usize, 0);
            Ok(())
        }

        fn sync_data(&self) -> std::io::Result<()> {
            Ok(())
        }

        fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
            let mut file = self.file.lock().unwrap();
            let end = offset as usize + data.len();
            if file.len() < end {
                file.resize(end, 0);
            }
            file[offset as usize..end].copy_from_slice(data);
            self.writes.lock().unwrap().push((offset, data.len()));
            Ok(())
        }
    }

    fn page(fill: u8) -> Vec<u8> {
        vec![fill; 4096]
    }

    #[test]
    fn adjacent_pages_written_in_any_order_reach_the_file_in_one_write_per_run() {
        let disk = Combining::new(Recording::default());
        for p in [3u64, 1, 0, 2, 7, 6] {
            disk.write(p * 4096, &page(p as u8)).unwrap();
        }
        assert!(
            disk.inner.writes.lock().unwrap().is_empty(),
            "gathered until the sync"
        );
        disk.sync_data().unwrap();
        assert_eq!(
            *disk.inner.writes.lock().unwrap(),
            vec![(0, 4 * 4096), (6 * 4096, 2 * 4096)]
        );
        let file = disk.inner.file.lock().unwrap();
        for p in [0usize, 1, 2, 3, 6, 7] {
            assert!(file[p * 4096..(p + 1) * 4096].iter().all(|&b| b == p as u8));
        }
    }

    #[test]
    fn reads_see_gathered_writes_and_a_later_overlapping_write_wins() {
        let disk = Combining::new(Recording::default());
        disk.write(4096, &[1; 8192]).unwrap();
        disk.write(0, &[2; 8192]).unwrap();
        let mut out = [0; 12288];
        disk.read(0, &mut out).unwrap();
        assert!(out[..8192].iter().all(|&b| b == 2));
        assert!(out[8192..].iter().all(|&b| b == 1));
    }

    #[test]
    fn a_write_larger_than_the_gather_limit_goes_straight_through() {
        let disk = Combining::new(Recording::default());
        disk.write(0, &page(1)).unwrap();
        disk.write(4096, &vec![2; GATHER_BYTES + 1]).unwrap();
        assert_eq!(
            *disk.inner.writes.lock().unwrap(),
            vec![(0, 4096), (4096, GATHER_BYTES + 1)]
        );
    }

    #[derive(Debug, Clone)]
    enum Op {
        Write { page: u64, pages: usize, fill: u8 },
        Read { page: u64, pages: usize },
        Sync,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0u64..64, 1usize..4, any::<u8>())
                .prop_map(|(page, pages, fill)| Op::Write { page, pages, fill }),
            1 => (0u64..64, 1usize..4).prop_map(|(page, pages)| Op::Read { page, pages }),
            1 => Just(Op::Sync),
        ]
    }

    proptest! {
        /// Whatever the writes (adjacent, scattered, overlapping), reads and syncs see what
        /// a plain file written in the same order holds.
        #[test]
        fn reads_and_syncs_see_what_a_plain_file_holds(ops in prop::collection::vec(op(), 1..60)) {
            let disk = Combining::new(Recording::default());
            let model = Recording::default();
            for op in ops {
                match op {
                    Op::Write { page, pages, fill } => {
                        let data = vec![fill; pages * 512];
                        disk.write(page * 512, &data).unwrap();
                        model.write(page * 512, &data).unwrap();
                    }
                    Op::Read { page, pages } => {
                        let (mut got, mut want) = (vec![0; pages * 512], vec![0; pages * 512]);
                        let a = disk.read(page * 512, &mut got).is_ok();
                        let b = model.read(page * 512, &mut want).is_ok();
                        prop_assert_eq!(a, b);
                        prop_assert_eq!(got, want);
                    }
                    Op::Sync => {
                        disk.sync_data().unwrap();
                        prop_assert_eq!(&*disk.inner.file.lock().unwrap(), &*model.file.lock().unwrap());
                    }
                }
            }
            disk.sync_data().unwrap();
            prop_assert_eq!(&*disk.inner.file.lock().unwrap(), &*model.file.lock().unwrap());
        }
    }

    #[test]
    fn a_redb_database_on_it_reads_back_what_it_committed() {
        const T: redb::TableDefinition<u64, &[u8]> = redb::TableDefinition::new("t");
        let db = redb::Database::builder()
            .create_with_backend(Combining::new(redb::backends::InMemoryBackend::new()))
            .unwrap();
        for round in 0..20u64 {
            let txn = db.begin_write().unwrap();
            {
                let mut table = txn.open_table(T).unwrap();
                for k in 0..500u64 {
                    table
                        .insert(k * 7 % 1000, [round as u8; 100].as_slice())
                        .unwrap();
                }
            }
            txn.commit().unwrap();
        }
        let txn = redb::ReadableDatabase::begin_read(&db).unwrap();
        let table = txn.open_table(T).unwrap();
        let got = redb::ReadableTable::get(&table, 7).unwrap().unwrap();
        assert_eq!(got.value(), [19u8; 100].as_slice());
        assert_eq!(redb::ReadableTableMetadata::len(&table).unwrap(), 500);
    }
}
