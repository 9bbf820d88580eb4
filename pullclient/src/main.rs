//! `pullclient`: the replica and restore side of walvault.
//!
//! `archive-get` is PostgreSQL's `restore_command`, and its exit code is a contract
//! (DESIGN promise 7):
//!
//! | exit | meaning                                         | what PostgreSQL does            |
//! |------|-------------------------------------------------|---------------------------------|
//! | 0    | file written to %p, verified                    | replays it                      |
//! | 1    | not in the archive; or, on a standby (or run by | "not available": tries          |
//! |      | hand), not delivered after `standby_retry_secs` | streaming, waits, asks again;   |
//! |      | (unreachable, failed verification)              | in archive recovery: its end    |
//! | 126  | configuration unusable (missing, invalid)       | stops recovery: fix the config  |
//! | 200  | archive recovery only: the archive may have the | stops recovery (FATAL, server   |
//! |      | file but did not deliver it within              | shuts down); start it again     |
//! |      | `recovery_retry_secs` (unreachable, failed      | once the archive delivers:      |
//! |      | verification, cannot write it)                  | recovery resumes                |
//!
//! Nothing else above 125 is ever returned: PostgreSQL treats such codes as fatal. 200,
//! not 127 or 128+N: PostgreSQL reports 126 as "command not executable", 127 as "command
//! not found", and shells report death by signal N as 128+N.

mod get;
mod pgconf;
mod prefault;
mod prefetch;
mod restore;
mod spool;
mod tools;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use walvault_protocol::net::config::{config_path, ClientConfig};
use walvault_protocol::net::logging::{self, LogFormat};

/// Exit code for a configuration that cannot work (aborts PostgreSQL's recovery).
const EXIT_FATAL_CONFIG: u8 = 126;
/// Exit code that stops an archive recovery which would otherwise end early.
const EXIT_STOP_RECOVERY: u8 = 200;

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
    /// Restore a base backup into PGDATA and set up recovery (to a target) from the archive.
    Restore(restore::RestoreCommand),
    /// Make a new standby from the latest backup: PGDATA, standby.signal, restore_command.
    Clone(restore::CloneCommand),
    /// Restore one WAL file; use as restore_command = 'pullclient archive-get %f %p'.
    ///
    /// Fetches NAME, checks its blake3, writes it to PATH atomically (temporary file,
    /// fsync, rename). An unreachable or unavailable archive is retried for
    /// [archive_get] recovery_retry_secs in archive recovery, standby_retry_secs otherwise.
    /// Exit 0 = written; 1 = not in the archive, or (standby, by hand) not delivered
    /// (PostgreSQL tries streaming and asks again); 126 = unusable configuration; 200 =
    /// in archive recovery, the archive did not deliver: PostgreSQL stops instead of
    /// ending recovery early (start it again once the archive is back).
    ArchiveGet {
        /// WAL file name (%f).
        name: String,
        /// Destination path (%p), usually relative to the data directory.
        path: PathBuf,
    },
    /// Run the prefetch daemon for a data directory in the foreground (as a service).
    ///
    /// archive-get starts one by itself (detached, one per spool); run it as a service
    /// instead to start it before PostgreSQL. It keeps the segments after the one
    /// PostgreSQL last asked for fetched and verified in the spool, and warms the relation
    /// blocks their records touch ahead of replay. SIGTERM stops it within a second.
    Prefetch {
        /// The data directory of the PostgreSQL being restored.
        #[arg(long)]
        pgdata: PathBuf,
        /// Start prefetching after this segment (archive-get passes what PostgreSQL asked for).
        #[arg(long)]
        start_at: Option<String>,
        /// Exit after [prefetch] idle_exit_secs without requests while PostgreSQL is down.
        #[arg(long)]
        exit_when_idle: bool,
    },
    /// Show the prefetch daemon's counters: spool hits and misses, segments fetched,
    /// bytes ahead of replay, blocks warmed and skipped (by reason).
    PrefetchStatus {
        /// The data directory the daemon serves.
        #[arg(long)]
        pgdata: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print the blocks WAL records touch: one line per block reference, in WAL order.
    ///
    /// `<record LSN> <spc>/<db>/<rel> <main|fsm|vm|init> <block> <fpw|->`, the LSN as
    /// pg_waldump prints it. FILE... are consecutive segment files (records spanning them
    /// decode). Needs no configuration. Exit 0 at the end of the input or of the WAL; 1 if
    /// a file is unreadable or not WAL, or the WAL is corrupt.
    WalBlocks {
        /// Segment files, in WAL order.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    logging::init(cli.log_format, "info");
    let config_path = config_path(cli.config.as_deref(), "pullclient");
    let load = || match ClientConfig::load(&config_path) {
        Ok(c) => Ok(c),
        Err(e) => {
            tracing::error!("{e}; this is fatal for recovery (exit {EXIT_FATAL_CONFIG})");
            Err(ExitCode::from(EXIT_FATAL_CONFIG))
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
    walvault_protocol::net::transport::install_crypto_provider();
    let code = match cli.command {
        // Offline: no configuration, no archive.
        Command::WalBlocks { files } => tools::walblocks::run(&files),
        Command::Restore(c) => restore::command(
            restore::Invocation::Restore(c),
            cli.config.as_deref(),
            &runtime,
        ),
        Command::Clone(c) => restore::command(
            restore::Invocation::Clone(c),
            cli.config.as_deref(),
            &runtime,
        ),
        Command::ArchiveGet { name, path } => {
            let cfg = match load() {
                Ok(c) => c,
                Err(code) => return code,
            };
            match runtime.block_on(get::archive_get(&cfg, &config_path, &name, &path)) {
                Ok(get::Fetched::Written { .. }) => ExitCode::SUCCESS,
                Ok(get::Fetched::NotFound) => ExitCode::from(1),
                Err(f) if f.kind == get::RecoveryKind::Archive => {
                    tracing::error!(
                        file = %name,
                        "{:#}; archive recovery stops here (exit {EXIT_STOP_RECOVERY}) instead of \
                         taking this for the end of the WAL and promoting early: PostgreSQL shuts \
                         down; start it again once the archive can deliver {name} and recovery \
                         resumes",
                        f.error
                    );
                    ExitCode::from(EXIT_STOP_RECOVERY)
                }
                Err(f) => {
                    tracing::error!(file = %name, "{:#}", f.error);
                    ExitCode::from(1)
                }
            }
        }
        Command::Prefetch {
            pgdata,
            start_at,
            exit_when_idle,
        } => {
            let cfg = match load() {
                Ok(c) => c,
                Err(code) => return code,
            };
            report(runtime.block_on(prefetch::run(cfg, &pgdata, start_at, exit_when_idle)))
        }
        Command::PrefetchStatus { pgdata, json } => {
            let cfg = match load() {
                Ok(c) => c,
                Err(code) => return code,
            };
            report(prefetch_status(&cfg, &pgdata, json))
        }
    };
    // In-flight downloads and prefault batches are abandoned, not awaited: SIGTERM must
    // end the daemon within a second.
    runtime.shutdown_timeout(std::time::Duration::from_millis(200));
    code
}

fn report(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

fn prefetch_status(cfg: &ClientConfig, pgdata: &std::path::Path, json: bool) -> anyhow::Result<()> {
    use anyhow::Context;
    let spool = spool::Spool::for_pgdata(cfg, pgdata)?;
    let answer = spool
        .send(&spool::ControlRequest::Status)
        .with_context(|| format!("no prefetch daemon answers at {}", spool.socket().display()))?;
    let value: serde_json::Value =
        serde_json::from_str(answer.trim()).context("unreadable answer from the daemon")?;
    if json {
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    println!(
        "prefetch daemon for {} (spool {})",
        spool.pgdata.display(),
        spool.dir.display()
    );
    let flat = |v: &serde_json::Value, prefix: &str| {
        if let Some(map) = v.as_object() {
            for (k, v) in map {
                if !v.is_object() {
                    println!("  {prefix}{k}: {v}");
                }
            }
        }
    };
    flat(&value, "");
    flat(&value["prefault"], "prefault.");
    Ok(())
}
