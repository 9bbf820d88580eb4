//! `pushclient`: the primary's side of walvault.
//!
//! `archive-push` is PostgreSQL's `archive_command`. It returns 0 only once archived has
//! answered that the file is durably stored; every other outcome is a non-zero exit, so
//! PostgreSQL keeps the file and retries.

mod backup;
mod push;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use walvault_protocol::net::cli::{self, CommonArgs, Exit, Setup};

/// walvault primary-side client: archives WAL into archived.
///
/// Configuration: --config FILE, else $WALVAULT_CONFIG, else /etc/walvault/pushclient.toml
/// (a client config written by `archived issue --role push`).
#[derive(Parser)]
#[command(name = "pushclient", version, about, long_about = None)]
struct Cli {
    #[command(flatten)]
    common: CommonArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Archive one WAL file; use as archive_command = 'pushclient archive-push %p'.
    ///
    /// Accepts segments, .partial segments, .history and .backup files. The file is
    /// checked before sending (name, size = segment size from its header, header timeline
    /// and address match the name); archived checks it again and refuses WAL of another
    /// system than the one this cluster name is bound to. Exit 0 = durably archived
    /// (or already archived with identical content); anything else = PostgreSQL retries.
    ArchivePush {
        /// Path of the file (%p), relative to the data directory or absolute.
        path: PathBuf,
    },
    /// Check the configuration: connect to archived and show what the certificate allows.
    Check,
    /// Take a base backup into the archive (BASE_BACKUP over a replication connection).
    ///
    /// Only chunks the archive lacks are sent; the manifest is written last and commits
    /// the backup. Then waits until the WAL from the backup's start to its stop LSN is
    /// archived (the backup is then "usable"). Connects like libpq: PGHOST, PGPORT,
    /// PGUSER, PGPASSWORD, PGPASSFILE, or --conninfo. Exit 0 = usable backup.
    Backup {
        /// Label recorded in backup_label and listings.
        #[arg(long)]
        label: Option<String>,
        /// Immediate checkpoint instead of a spread one (starts at once, more I/O).
        #[arg(long)]
        fast: bool,
        /// Connection string: "host=/var/run/postgresql user=postgres" or postgres://...
        #[arg(long)]
        conninfo: Option<String>,
        /// When backing up a standby: an SQL connection to its primary, where
        /// pg_switch_wal() is run after the backup so the WAL up to its stop LSN is
        /// archived at once (the role needs EXECUTE on pg_switch_wal).
        #[arg(long)]
        primary_conninfo: Option<String>,
        /// Seconds to wait for the backup's WAL to be archived.
        #[arg(long, default_value_t = 300)]
        wal_timeout: u64,
        /// Limit how fast PostgreSQL reads and sends the data directory, in kB/s
        /// (32..1048576), to spare a busy server's disks.
        #[arg(long)]
        max_rate: Option<u32>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let setup = Setup {
        workers: Some(2),
        config_exit: Exit::BadConfig,
    };
    cli::run(&cli.common.log, setup, |runtime| {
        let (_, cfg) = cli.common.load_config("pushclient")?;
        match cli.command {
            Command::ArchivePush { path } => runtime.block_on(push::archive_push(&cfg, &path)),
            Command::Check => runtime.block_on(push::check(&cfg)),
            Command::Backup {
                label,
                fast,
                conninfo,
                primary_conninfo,
                wal_timeout,
                max_rate,
            } => runtime.block_on(backup::backup(
                &cfg,
                &backup::BackupArgs {
                    label,
                    fast,
                    conninfo,
                    primary_conninfo,
                    wal_timeout: std::time::Duration::from_secs(wal_timeout),
                    max_rate_kb: max_rate,
                },
            )),
        }?;
        Ok(Exit::Success)
    })
}
