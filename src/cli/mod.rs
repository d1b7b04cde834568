//! The command line. `main.rs` only calls [`main`]; a library user with Rust reducers calls
//! [`main_with`] from their own binary and gets every command.

mod admin;
mod commands;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use crate::runtime::{Exit, Reducers};

/// Turns NATS JetStream event streams into read models (redb + JetStream KV).
#[derive(Debug, Parser)]
#[command(name = "nats-projector", version, about)]
pub struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human)]
    pub log_format: LogFormat,
    /// Log filter (`info`, `debug`, `nats_projector=debug`...); `RUST_LOG` also works.
    #[arg(long, global = true)]
    pub log_level: Option<String>,
    /// Threads of the async runtime (decoding, the NATS connection, KV, acks, HTTP); each
    /// projection applies to redb on a thread of its own besides. Default: one per CPU the
    /// process may use (a sidecar given a CPU share may want fewer).
    #[arg(long, global = true, env = "NATS_PROJECTOR_WORKER_THREADS")]
    pub worker_threads: Option<std::num::NonZeroUsize>,
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// Log formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Human,
    /// One JSON object per line.
    Json,
}

/// The configuration file argument shared by the commands.
#[derive(Debug, Clone, clap::Args)]
pub struct ConfigArg {
    /// The configuration file (TOML).
    #[arg(long, env = "NATS_PROJECTOR_CONFIG")]
    pub config: PathBuf,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run every projection until SIGTERM/SIGINT, then drain and exit 0.
    Run(ConfigArg),
    /// Parse and validate a configuration; print each problem with its TOML path (exit 2).
    CheckConfig(ConfigArg),
    /// Per projection: stream, consumer, last applied sequence, pending, KV outbox, readiness.
    Status {
        /// The configuration file.
        #[command(flatten)]
        config: ConfigArg,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Print the stored record of KEY in the KV value format.
    Get {
        /// The configuration file.
        #[command(flatten)]
        config: ConfigArg,
        /// The projection.
        projection: String,
        /// The key (as in KV; an unescaped value is escaped and tried too).
        key: String,
    },
    /// Compare KV with the local store key by key; exit 3 on any difference.
    Verify {
        /// The configuration file.
        #[command(flatten)]
        config: ConfigArg,
        /// The projection.
        projection: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Snapshots: create, verify, restore.
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Bounded backfill of the read model from a range of the stream; prints the count first.
    Replay {
        /// The configuration file.
        #[command(flatten)]
        config: ConfigArg,
        /// The projection.
        projection: String,
        /// First stream sequence.
        #[arg(long)]
        from_seq: Option<u64>,
        /// Last stream sequence.
        #[arg(long)]
        to_seq: Option<u64>,
        /// Earliest publish time (RFC 3339, e.g. 2026-11-23T10:00:00Z).
        #[arg(long)]
        from_time: Option<String>,
        /// Latest publish time (RFC 3339).
        #[arg(long)]
        to_time: Option<String>,
        /// Print the count and write nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Dead letters: list, replay.
    #[command(subcommand)]
    Dlq(DlqCommand),
    /// Build the configured (bumped) version of PROJECTION beside the live one, from the
    /// stream (or a snapshot of that version); `--promote` points readers at it once caught up.
    Rebuild {
        /// The configuration file holding the new version.
        #[command(flatten)]
        config: ConfigArg,
        /// The projection.
        projection: String,
        /// Start from this snapshot of the new version instead of the stream's start.
        #[arg(long)]
        from_snapshot: Option<PathBuf>,
        /// Promote the new version (switch the alias readers follow) once it has caught up.
        #[arg(long)]
        promote: bool,
    },
    /// Development helper: publish a JSONL file of `{"subject", "event"}` lines to NATS.
    #[command(hide = true)]
    PublishJsonl {
        /// NATS URL.
        #[arg(long, env = "NATS_URL", default_value = crate::config::DEFAULT_NATS_URL)]
        url: String,
        /// Create this stream (capturing the file's subjects' first token + `.>`) if missing.
        #[arg(long)]
        stream: Option<String>,
        /// The file.
        file: PathBuf,
    },
    /// Development helper: print every live KV entry of a projection's bucket.
    #[command(hide = true)]
    KvDump {
        /// The configuration file.
        #[command(flatten)]
        config: ConfigArg,
        /// The projection.
        projection: String,
    },
}

/// `dlq` subcommands.
#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// List dead letters: projection, stream sequence, error code, reason, subject.
    List {
        /// The configuration file.
        #[command(flatten)]
        config: ConfigArg,
        /// Only this projection's.
        #[arg(long)]
        projection: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Republish dead letters to their original subjects (after a fix).
    Replay {
        /// The configuration file.
        #[command(flatten)]
        config: ConfigArg,
        /// Only this projection's.
        #[arg(long)]
        projection: Option<String>,
        /// Only the dead letter of this source stream sequence.
        #[arg(long)]
        seq: Option<u64>,
    },
}

/// `snapshot` subcommands.
#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Write a snapshot of PROJECTION at its current applied sequence; print the path (or
    /// object name), the sequence and the checksum.
    Create {
        /// The configuration file.
        #[command(flatten)]
        config: ConfigArg,
        /// The projection.
        projection: String,
        /// The file to write (default: `[snapshots] dir`, named after the projection and
        /// sequence).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Also upload it to this JetStream Object Store bucket.
        #[arg(long)]
        object_store: Option<String>,
    },
    /// Check a snapshot's header and checksum: exit 0 valid, 3 damaged or tampered.
    Verify {
        /// The snapshot file.
        path: PathBuf,
    },
    /// Verify a snapshot, load it into the local store and resume the consumer at its sequence
    /// + 1; exit 3 when the stream no longer continues it. Run it while `run` is stopped.
    Restore {
        /// The configuration file.
        #[command(flatten)]
        config: ConfigArg,
        /// The snapshot file (or, with `--object-store`, the object name).
        path: PathBuf,
        /// Read the snapshot from this JetStream Object Store bucket.
        #[arg(long)]
        object_store: Option<String>,
    },
}

/// Runs the command line with the built-in reducers only.
pub fn main() -> ExitCode {
    main_with(Reducers::new())
}

/// Runs the command line with `reducers` for projections with `reducer = "custom"`.
pub fn main_with(reducers: Reducers) -> ExitCode {
    let cli = Cli::parse();
    // `run` reports its life at info; one-shot commands print results, and only problems.
    let default_level = match cli.command {
        Command::Run(_) => "info,async_nats=warn",
        _ => "warn,async_nats=error",
    };
    init_logging(cli.log_format, cli.log_level.as_deref(), default_level);
    // One log line instead of the default report: the store turns a storage-engine panic on a
    // damaged file into a clean error, and anything else still says where it happened.
    std::panic::set_hook(Box::new(|info| {
        let location = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_default();
        tracing::error!(%location, "internal failure: {message}");
    }));
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(
            cli.worker_threads
                .map_or_else(default_worker_threads, usize::from),
        )
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("cannot start the async runtime: {err}");
            return Exit::Failure.into();
        }
    };
    let exit = runtime.block_on(commands::dispatch(cli.command, reducers));
    // Blocking store tasks must not outlive main.
    runtime.shutdown_timeout(std::time::Duration::from_secs(5));
    exit.into()
}

/// One per CPU this process may use (tokio's own default; one worker measured alike on the
/// 2-core bench machine: benches/PERFORMANCE-LOG.md).
fn default_worker_threads() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

fn init_logging(format: LogFormat, level: Option<&str>, default_level: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = match level {
        Some(level) => EnvFilter::new(level),
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level)),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().with_current_span(true).init(),
        LogFormat::Human => builder.with_target(false).init(),
    }
}
