//! A storage backend that fails like a dying disk, for the fault-injection tests only.
//!
//! `NATS_PROJECTOR_FAIL_DISK=K`: the K-th durable commit that follows commits without an fsync
//! fails in redb's own page writes (after 100 ms), and every later write and fsync of that
//! database handle fails too; a reopened handle works again (the failure fires once). Unlike
//! `NATS_PROJECTOR_FAIL_STORE`, which fails a batch before it touches the database, this fails
//! a commit half-way: what the last durable commit did not cover is lost.

use std::fs::File;
use std::ops::Bound;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use redb::backends::FileBackend;
use redb::{BackendError, StorageBackend};

/// Whether commits without an fsync were made since the last durable one.
static UNSYNCED: AtomicBool = AtomicBool::new(false);
/// Durable commits made after unsynced ones.
static CLOSING: AtomicU64 = AtomicU64::new(0);
/// Whether the next write fails.
static ARMED: AtomicBool = AtomicBool::new(false);

/// The durable commit after unsynced ones that fails, when the environment asks for one.
pub(super) fn fail_at() -> Option<u64> {
    std::env::var("NATS_PROJECTOR_FAIL_DISK")
        .ok()
        .and_then(|v| v.parse().ok())
}

/// Called before every batch commit (`unsynced`: without an fsync): arms the failure for the
/// page writes of the chosen durable commit.
pub(super) fn before_commit(unsynced: bool) {
    let Some(at) = fail_at() else {
        return;
    };
    if unsynced {
        UNSYNCED.store(true, Ordering::Release);
    } else if UNSYNCED.swap(false, Ordering::AcqRel)
        && CLOSING.fetch_add(1, Ordering::AcqRel) + 1 == at
    {
        ARMED.store(true, Ordering::Release);
    }
}

/// A file backend that fails once armed (see [`before_commit`]).
#[derive(Debug)]
pub(super) struct FaultyDisk {
    inner: FileBackend,
    failing: AtomicBool,
}

impl FaultyDisk {
    /// Wraps `file`.
    pub(super) fn new(file: File) -> Result<FaultyDisk, redb::DatabaseError> {
        Ok(FaultyDisk {
            inner: FileBackend::new(file)?,
            failing: AtomicBool::new(false),
        })
    }

    fn failed(&self) -> std::io::Result<()> {
        if !self.failing.load(Ordering::Acquire) {
            if !ARMED.swap(false, Ordering::AcqRel) {
                return Ok(());
            }
            self.failing.store(true, Ordering::Release);
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        Err(injected())
    }
}

/// The error of a failing disk.
fn injected() -> std::io::Error {
    std::io::Error::other("injected disk failure")
}

impl StorageBackend for FaultyDisk {
    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
        self.inner.read(offset, out)
    }

    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.inner.set_len(len)
    }

    fn sync_data(&self) -> std::io::Result<()> {
        if self.failing.load(Ordering::Acquire) {
            return Err(injected());
        }
        self.inner.sync_data()
    }

    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.failed()?;
        self.inner.write(offset, data)
    }

    fn close(&self) -> std::io::Result<()> {
        self.inner.close()
    }

    super::combining::delegate_locks!();
}
