//! `pullclient`: the replica and restore side of walvault.
//!
//! `archive-get` is PostgreSQL's `restore_command`, and its exit code is a contract
//! (DESIGN promise 7; the table is in `walvault_protocol::net::cli`, and in the README):
//! 0 written and verified; 1 not in the archive, or (standby, by hand) not delivered
//! after `standby_retry_secs`; 126 an unusable config; 200 in archive recovery, not
//! delivered after `recovery_retry_secs`, so PostgreSQL stops instead of ending recovery
//! early. `restore` and `clone` exit 2 for an unusable config, 1 for any other failure.

mod check;
mod fetch;
mod get;
mod prefault;
mod prefetch;
mod restore;
mod setup;
mod spool;
mod tools;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use walvault_protocol::net::cli::{self, CommonArgs, Exit, Setup, StopRecovery};
use walvault_protocol::net::config::ClientConfig;

/// walvault replica-side client: restores WAL from archived.
///
/// Configuration: --config FILE, else $WALVAULT_CONFIG, else /etc/walvault/pullclient.toml
/// (a client config written by `archived issue --role pull`).
#[derive(Parser)]
#[command(name = "pullclient", version, about, long_about = None)]
struct Cli {
    #[command(flatten)]
    common: CommonArgs,
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
    /// Check the replica side: archived answers and accepts the certificate; the
    /// archive's newest segment comes back verified; PostgreSQL (libpq environment or
    /// --conninfo; skipped with a note when it is down) has a restore_command running
    /// pullclient archive-get %f %p, is in recovery and is the cluster's system; the
    /// prefetch spool of its data directory (or --pgdata) is usable, and whether its daemon
    /// runs. One ok:, WARNING: or FAILED: line per step; exit 0 when nothing FAILED.
    Check {
        /// The data directory whose prefetch spool to check (default: PostgreSQL's).
        #[arg(long)]
        pgdata: Option<PathBuf>,
        /// libpq connection string (PGHOST, PGPORT, PGUSER... apply otherwise).
        #[arg(long)]
        conninfo: Option<String>,
    },
    /// Configure a stopped data directory (a pg_basebackup copy, a standby) to recover
    /// from the archive: restore_command (this pullclient with this config),
    /// recovery_target_timeline = 'latest', recovery_prefetch = off when the prefaulter
    /// warms blocks, and standby.signal (--standby) or recovery.signal (recover to the
    /// end of the archive, then promote). Recovery targets an earlier restore left in
    /// postgresql.auto.conf are commented out.
    ///
    /// Prints each change (value in force, where it comes from, new value) and changes
    /// nothing without --apply; with it, edits postgresql.auto.conf atomically (owner and
    /// mode kept) and creates the signal file. Settings already as wanted are left alone,
    /// so a second run changes nothing.
    Setup {
        /// The data directory (PostgreSQL must not be running on it).
        #[arg(long)]
        pgdata: PathBuf,
        /// Make it a standby that keeps following the archive (standby.signal).
        #[arg(long)]
        standby: bool,
        /// Make the changes (default: print them only).
        #[arg(long)]
        apply: bool,
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
    let setup = Setup {
        workers: Some(2),
        config_exit: match cli.command {
            Command::Restore(_)
            | Command::Clone(_)
            | Command::Check { .. }
            | Command::Setup { .. } => Exit::BadConfig,
            // What PostgreSQL runs during recovery: an unusable config must stop it.
            _ => Exit::FatalConfig,
        },
    };
    let common = &cli.common;
    cli::run(&common.log, setup, |runtime| match cli.command {
        // Offline: no configuration, no archive.
        Command::WalBlocks { files } => tools::walblocks::run(&files).map(|()| Exit::Success),
        Command::Restore(c) => restore::command(restore::Invocation::Restore(c), common, runtime)
            .map(|()| Exit::Success),
        Command::Clone(c) => {
            restore::command(restore::Invocation::Clone(c), common, runtime).map(|()| Exit::Success)
        }
        Command::ArchiveGet { name, path } => {
            let (config_path, cfg) = common.load_config("pullclient")?;
            match runtime.block_on(get::archive_get(&cfg, &config_path, &name, &path)) {
                Ok(fetch::Fetched::Written { .. }) => Ok(Exit::Success),
                Ok(fetch::Fetched::NotFound) => Ok(Exit::Failure),
                Err(f) if f.kind == get::RecoveryKind::Archive => Err(StopRecovery {
                    file: name,
                    error: f.error,
                }
                .into()),
                Err(f) => Err(f.error),
            }
        }
        Command::Prefetch {
            pgdata,
            start_at,
            exit_when_idle,
        } => {
            let (_, cfg) = common.load_config("pullclient")?;
            runtime.block_on(prefetch::run(cfg, &pgdata, start_at, exit_when_idle))?;
            Ok(Exit::Success)
        }
        Command::Check { pgdata, conninfo } => {
            let (config_path, cfg) = common.load_config("pullclient")?;
            let args = check::CheckArgs {
                pgdata,
                conninfo,
                config_path,
            };
            let passed = runtime.block_on(check::check(&cfg, &args))?;
            Ok(if passed { Exit::Success } else { Exit::Failure })
        }
        Command::Setup {
            pgdata,
            standby,
            apply,
        } => {
            let (config_path, cfg) = common.load_config("pullclient")?;
            let args = setup::SetupArgs {
                pgdata,
                standby,
                apply,
                config_path,
            };
            setup::setup(&cfg, &args).map(|()| Exit::Success)
        }
        Command::PrefetchStatus { pgdata, json } => {
            let (_, cfg) = common.load_config("pullclient")?;
            prefetch_status(&cfg, &pgdata, json)?;
            Ok(Exit::Success)
        }
    })
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
