//! The `nats-projector` binary: all logic lives in the library.

/// mimalloc: the event path allocates many small short-lived values from several threads,
/// where glibc's allocator spent about a third of the CPU (consolidation and chunk unlinking).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    nats_projector::cli::main()
}
