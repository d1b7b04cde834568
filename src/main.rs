//! The `nats-projector` binary: all logic lives in the library.

// Events are decoded on the async workers and folded on the applying thread, and their KV writes
// and acks freed on the async workers. mimalloc's per-thread free lists make those cross-thread
// frees cheap (measured: catch-ups 10-50% faster than glibc malloc, which spent 15-30% of the
// CPU here).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc 3's `mi_option_t` (include/mimalloc.h).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
/// `mi_option_allow_thp` in mimalloc 3's `mi_option_t`.
const MI_OPTION_ALLOW_THP: libmimalloc_sys::mi_option_t = 43;

/// Sets a mimalloc option unless its `MIMALLOC_*` environment variable does.
fn mimalloc_option(option: libmimalloc_sys::mi_option_t, env: &str, value: std::ffi::c_long) {
    if std::env::var_os(env).is_none() {
        // SAFETY: sets a plain integer option, read by mimalloc when it next needs it.
        unsafe { libmimalloc_sys::mi_option_set(option, value) };
    }
}

fn main() -> std::process::ExitCode {
    // Measured on a million-key catch-up (README, Performance): with transparent huge pages
    // every fresh arena page faulted in 2 MiB at a time (peak RSS 123 MiB, a quarter of the
    // CPU zeroing pages); without them 97 MiB. A 50 ms purge delay (instead of mimalloc's
    // 1 s, or 0) lets the next batch reuse the pages the last one freed: 42,000 -> 52,000
    // events/s there at 108 MiB, and redb-only catch-ups 93,000 -> 105,000.
    if std::env::var_os("MIMALLOC_ALLOW_THP").is_none() {
        // The first arena was mapped (and advised huge) before main: only the process-wide
        // switch reaches it. Best effort: an old kernel without it keeps huge pages.
        // SAFETY: prctl with integer arguments only; changes no memory of this process.
        unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    }
    mimalloc_option(MI_OPTION_ALLOW_THP, "MIMALLOC_ALLOW_THP", 0);
    mimalloc_option(MI_OPTION_PURGE_DELAY, "MIMALLOC_PURGE_DELAY", 50);
    nats_projector::cli::main()
}
