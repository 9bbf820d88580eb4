//! `pullclient`: the replica and restore side of walvault.
//!
//! `archive-get` is PostgreSQL's `restore_command`, and its exit code is a contract:
//!
//! | exit | meaning                                   | what PostgreSQL does                  |
//! |------|-------------------------------------------|---------------------------------------|
//! | 0    | file written to %p, verified              | replays it                            |
//! | 1    | not in the archive, archive unreachable,  | treats it as "not available": tries   |
//! |      | or the archived copy failed verification  | streaming, waits, or ends recovery    |
//! | 126  | configuration unusable (missing, invalid) | aborts recovery: fix the config       |
//!
//! Nothing else above 125 is ever returned: PostgreSQL treats such codes as fatal.

mod get;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use walvault_protocol::config::{config_path, ClientConfig};
use walvault_protocol::logging::{self, LogFormat};

/// Exit code for a configuration that cannot work (aborts PostgreSQL's recovery).
const EXIT_FATAL_CONFIG: u8 = 126;

/// walvault replica-side client: restores WAL from archived.
///
/// Configuration: --config FILE, else $WALVAULT_CONFIG, else /etc/walvault/pullclient.toml
/// (a client config written by `archived issue --role pull`).
#[derive(Parser)]
#[command(name = "pullclient", version, about, long_about = None)]
struct Cli {
    /// Client config file.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Log format: text (default) or json.
    #[arg(long, global = true, default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Restore one WAL file; use as restore_command = 'pullclient archive-get %f %p'.
    ///
    /// Fetches NAME, checks its blake3, writes it to PATH atomically (temporary file,
    /// fsync, rename). Exit 0 = written; 1 = not available (not archived, archive
    /// unreachable, or failed verification; PostgreSQL retries or ends recovery);
    /// 126 = unusable configuration (PostgreSQL aborts recovery).
    ArchiveGet {
        /// WAL file name (%f).
        name: String,
        /// Destination path (%p), usually relative to the data directory.
        path: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    logging::init(cli.log_format, "info");
    let path = config_path(cli.config.as_deref(), "pullclient");
    let cfg = match ClientConfig::load(&path) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("{e}; this is fatal for recovery (exit {EXIT_FATAL_CONFIG})");
            return ExitCode::from(EXIT_FATAL_CONFIG);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            tracing::error!("cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    walvault_protocol::transport::install_crypto_provider();
    match cli.command {
        Command::ArchiveGet { name, path } => {
            match runtime.block_on(get::archive_get(&cfg, &name, &path)) {
                Ok(get::Fetched::Written) => ExitCode::SUCCESS,
                Ok(get::Fetched::NotFound) => ExitCode::from(1),
                Err(e) => {
                    tracing::error!("{e:#}");
                    ExitCode::from(1)
                }
            }
        }
    }
}
