//! `pushclient`: the primary's side of walvault.
//!
//! `archive-push` is PostgreSQL's `archive_command`. It returns 0 only once archived has
//! answered that the file is durably stored; every other outcome is a non-zero exit, so
//! PostgreSQL keeps the file and retries.

mod backup;
mod check;
mod push;
mod setup;
mod stream;

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
    /// Check the setup end to end, as after configuring a primary: archived answers and
    /// accepts the certificate; PostgreSQL (libpq environment or --conninfo) has
    /// wal_level >= replica, archive_mode on, an archive_command running pushclient
    /// archive-push %p, an archive_timeout, and the system identifier the cluster is bound
    /// to; then (on a primary) writes a restore point, switches WAL and waits until the
    /// archive holds that segment, read back verified. Each step prints ok:, WARNING: or
    /// FAILED: naming the setting. Exit 0 when nothing failed. The role needs superuser or
    /// EXECUTE on pg_create_restore_point and pg_switch_wal.
    Check {
        /// libpq connection string (PGHOST, PGPORT, PGUSER... apply otherwise).
        #[arg(long)]
        conninfo: Option<String>,
        /// Only check that archived answers and accepts the certificate.
        #[arg(long)]
        archive_only: bool,
        /// Seconds to wait for the switched segment to reach the archive.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
    },
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
    /// Stream WAL from a replication slot into the archive as it is written (RPO 0).
    ///
    /// A physical replication receiver: each burst of WAL is appended to the archive,
    /// which fsyncs it on its own disk before the receiver reports it to PostgreSQL as
    /// flushed, so with synchronous_standby_names = 'walvault' (the --application-name)
    /// no commit returns before its WAL is in the archive. Starts where the archive's WAL
    /// ends (never a silent gap), follows timeline switches, reconnects for ever after
    /// failures; stops cleanly on SIGTERM. Completed segments become normal archived
    /// segments (archive_command may stay on as a second line of defence), and restores
    /// use the unfinished one. Connects like libpq: PGHOST, PGPORT, PGUSER, PGPASSWORD,
    /// PGPASSFILE, or --conninfo; the role needs the REPLICATION attribute.
    Stream {
        /// Connection string: "host=/var/run/postgresql user=postgres" or postgres://...
        #[arg(long)]
        conninfo: Option<String>,
        /// Physical replication slot that keeps the server's WAL until the archive has it.
        #[arg(long, default_value = "walvault")]
        slot: String,
        /// Create the slot (reserving WAL at once) if it does not exist.
        #[arg(long)]
        create_slot: bool,
        /// application_name of the replication connection: the name to put in
        /// synchronous_standby_names. Wins over an application_name in --conninfo.
        #[arg(long, default_value = "walvault")]
        application_name: String,
        /// When the server no longer has the WAL the archive needs next, start at the
        /// slot's restart LSN anyway and record the gap (otherwise: refuse, exit 1).
        #[arg(long)]
        allow_gap: bool,
        /// Where the receiver writes its status (read by stream-status); default
        /// /var/lib/walvault/stream-<slot>.json.
        #[arg(long)]
        status_file: Option<PathBuf>,
        /// Received bytes that may wait for the archive before the receiver stops
        /// reading from PostgreSQL (memory bound; the tests make it small).
        #[arg(long, hide = true, default_value_t = stream::MAX_PENDING)]
        max_pending_bytes: u64,
    },
    /// Configure a primary for walvault: archive_mode = on, archive_command (this
    /// pushclient with this config), archive_timeout when it is off, wal_level at least
    /// replica; with --slot also max_wal_senders, max_replication_slots and the slot for
    /// `pushclient stream`.
    ///
    /// Prints each change (value in force, where it comes from, new value, reload or
    /// restart) and changes nothing without --apply. A running server (libpq environment
    /// or --conninfo) is changed with ALTER SYSTEM and pg_reload_conf(), and setup says
    /// which changes wait for a restart; a stopped one (--pgdata) has its
    /// postgresql.auto.conf edited atomically. Never lowers a setting; refuses a standby,
    /// a setting set on the postmaster's command line, and a server managed by Patroni or
    /// CloudNativePG (saying where to put the values instead). A second run changes
    /// nothing.
    Setup {
        /// The data directory of a stopped server (edited offline); when the server
        /// runs, it is reached through the libpq environment or --conninfo instead.
        #[arg(long)]
        pgdata: Option<PathBuf>,
        /// libpq connection string of the running primary (a superuser, or a role
        /// granted ALTER SYSTEM on these parameters).
        #[arg(long, conflicts_with = "pgdata")]
        conninfo: Option<String>,
        /// Make the changes (default: print them only).
        #[arg(long)]
        apply: bool,
        /// archive_timeout to set when it is off (0): the longest a quiet primary's WAL
        /// waits before its segment is archived. 0 leaves archive_timeout alone.
        #[arg(long, default_value_t = 60, value_name = "SECS")]
        archive_timeout: u64,
        /// Also prepare the streaming receiver: senders, slots, and this physical slot
        /// (created reserving WAL when the server runs).
        #[arg(long, value_name = "NAME")]
        slot: Option<String>,
    },
    /// Show the streaming receiver's status: server WAL end, received, flushed in the
    /// archive, lag, slot, timeline, reconnects. Exit 0 when it is streaming and up to
    /// date, 1 otherwise (for monitoring).
    StreamStatus {
        /// The receiver's slot (names its default status file).
        #[arg(long, default_value = "walvault")]
        slot: String,
        /// The receiver's --status-file.
        #[arg(long)]
        status_file: Option<PathBuf>,
        /// Print the status as JSON.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let setup = Setup {
        // The receiver's loop is bound by latency (each commit of a synchronous primary
        // waits for it): one thread, no wake-ups of others.
        workers: Some(if matches!(cli.command, Command::Stream { .. }) {
            0
        } else {
            2
        }),
        config_exit: Exit::BadConfig,
    };
    cli::run(&cli.common.log, setup, |runtime| {
        let config = || cli.common.load_config("pushclient").map(|(_, cfg)| cfg);
        match cli.command {
            Command::ArchivePush { path } => {
                runtime.block_on(push::archive_push(&config()?, &path))
            }
            Command::Check {
                conninfo,
                archive_only,
                timeout,
            } => {
                let (path, cfg) = cli.common.load_config("pushclient")?;
                let args = check::CheckArgs {
                    conninfo,
                    archive_only,
                    timeout: std::time::Duration::from_secs(timeout),
                    config_path: path,
                };
                let passed = runtime.block_on(check::check(&cfg, &args))?;
                return Ok(if passed { Exit::Success } else { Exit::Failure });
            }
            Command::Setup {
                pgdata,
                conninfo,
                apply,
                archive_timeout,
                slot,
            } => {
                // The archive_command names this config: it must be usable.
                let (config_path, _) = cli.common.load_config("pushclient")?;
                let args = setup::SetupArgs {
                    pgdata,
                    conninfo,
                    apply,
                    archive_timeout_secs: archive_timeout,
                    slot,
                    config_path,
                };
                runtime.block_on(setup::setup(&args))
            }
            Command::Backup {
                label,
                fast,
                conninfo,
                primary_conninfo,
                wal_timeout,
                max_rate,
            } => runtime.block_on(backup::backup(
                &config()?,
                &backup::BackupArgs {
                    label,
                    fast,
                    conninfo,
                    primary_conninfo,
                    wal_timeout: std::time::Duration::from_secs(wal_timeout),
                    max_rate_kb: max_rate,
                },
            )),
            Command::Stream {
                conninfo,
                slot,
                create_slot,
                application_name,
                allow_gap,
                status_file,
                max_pending_bytes,
            } => runtime.block_on(stream::stream(
                &config()?,
                &stream::StreamArgs {
                    conninfo,
                    slot,
                    create_slot,
                    application_name,
                    allow_gap,
                    status_file,
                    max_pending: max_pending_bytes.max(1),
                },
            )),
            Command::StreamStatus {
                slot,
                status_file,
                json,
            } => return stream_status(&slot, status_file.as_deref(), json),
        }?;
        Ok(Exit::Success)
    })
}

/// `pushclient stream-status`.
fn stream_status(
    slot: &str,
    status_file: Option<&std::path::Path>,
    json: bool,
) -> anyhow::Result<Exit> {
    let path = status_file
        .map(PathBuf::from)
        .unwrap_or_else(|| stream::status::default_path(slot));
    let status = stream::status::read(&path)?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let (text, healthy) = stream::status::render(&status, now);
    if json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print!("{text}");
    }
    Ok(if healthy {
        Exit::Success
    } else {
        Exit::Failure
    })
}
