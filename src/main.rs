//! The `nats-projector` binary: all logic lives in the library.

fn main() -> std::process::ExitCode {
    nats_projector::cli::main()
}
