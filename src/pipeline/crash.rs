//! Crash points and injected store failures for the fault-injection tests.
//!
//! With the `fault-injection` feature, `NATS_PROJECTOR_CRASH_AT=POINT:N` aborts the process
//! (no unwinding, no flush: like `kill -9`) the N-th time the pipeline reaches POINT. Without
//! the feature these calls compile to nothing.

/// Between the redb commit and the KV writes.
pub const AFTER_COMMIT: &str = "after_commit";
/// Between the KV writes and the acks.
pub const AFTER_KV: &str = "after_kv";

/// Aborts here if the environment asks for it.
#[cfg(feature = "fault-injection")]
pub fn point(name: &str) {
    use std::sync::atomic::{AtomicU64, Ordering};
    static HITS: AtomicU64 = AtomicU64::new(0);
    let Ok(spec) = std::env::var("NATS_PROJECTOR_CRASH_AT") else {
        return;
    };
    let Some((point, nth)) = spec.split_once(':') else {
        return;
    };
    if point != name {
        return;
    }
    let nth: u64 = nth.parse().unwrap_or(1);
    if HITS.fetch_add(1, Ordering::SeqCst) + 1 == nth {
        eprintln!("fault injection: aborting at {name} (hit {nth})");
        std::process::abort();
    }
}

/// Whether the store should fail this write (`NATS_PROJECTOR_FAIL_STORE=N` fails the first N
/// batch commits with an I/O error, `always` all of them, and `N@K` the N after the first K,
/// each after 100 ms, like a disk timing out: time for the next batch to queue behind it).
#[cfg(feature = "fault-injection")]
pub fn store_failure() -> bool {
    use std::sync::atomic::{AtomicU64, Ordering};
    static CALLS: AtomicU64 = AtomicU64::new(0);
    let Ok(spec) = std::env::var("NATS_PROJECTOR_FAIL_STORE") else {
        return false;
    };
    if spec == "always" {
        return true;
    }
    let (n, skip) = spec.split_once('@').unwrap_or((&spec, "0"));
    let (n, skip): (u64, u64) = (n.parse().unwrap_or(0), skip.parse().unwrap_or(0));
    let call = CALLS.fetch_add(1, Ordering::SeqCst);
    let fail = call >= skip && call < skip + n;
    if fail && spec.contains('@') {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    fail
}

/// Whether the store should fail this write (disabled in this build).
#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub fn store_failure() -> bool {
    false
}

/// Aborts here if the environment asks for it (disabled in this build).
#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub fn point(_name: &str) {}
