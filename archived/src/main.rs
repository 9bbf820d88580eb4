//! `archived`: the walvault archive daemon and its admin commands. This file is the
//! command line and the runtime; what each command does lives in its module:
//!
//! - `serve`: server/ (QUIC, auth, dispatch) over service/ (the request handlers),
//!   store/ (the object store, the truth), index/ (the sled catalog over it) and gc.rs
//!   (who may delete what, when);
//! - `init`, `issue`: datadir.rs; archived.toml is config.rs;
//! - `wal`, `backups`, `retention`, `catalog`: admin/.
#![warn(unreachable_pub)]

mod admin;
mod clock;
mod config;
mod datadir;
mod gc;
mod index;
mod ops;
mod server;
mod service;
mod store;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};
use walvault_protocol::net::cli::{self, Exit, LogArgs, Setup};
use walvault_protocol::net::pki::Role;

use datadir::DataDir;

/// The walvault archive: keeps PostgreSQL WAL and base backups for any number of
/// clusters, served over QUIC with mutual TLS.
#[derive(Parser)]
#[command(name = "archived", version, about, long_about = None)]
struct Cli {
    #[command(flatten)]
    log: LogArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create a data directory: configuration, a new CA, the server certificate and an
    /// admin client config (DIR/admin.toml). Refuses to overwrite an existing CA.
    Init {
        /// Data directory to create.
        #[arg(long)]
        data_dir: PathBuf,
        /// UDP address to serve QUIC on.
        #[arg(long, default_value = config::DEFAULT_LISTEN)]
        listen: String,
        /// TCP address of /metrics, /healthz and /readyz (metrics_listen in
        /// archived.toml; default 127.0.0.1:7434; "off" for none). In a container:
        /// 0.0.0.0:7434, so probes and Prometheus reach it.
        #[arg(long)]
        metrics_listen: Option<String>,
        /// Extra DNS names or IP addresses for the server certificate (repeatable).
        #[arg(long = "server-name")]
        server_names: Vec<String>,
    },
    /// Write a client config (server address, CA, client certificate and key; mode 0600)
    /// for one cluster and role. push: archive WAL. pull: restore WAL. admin: everything.
    Issue {
        /// Data directory holding the CA.
        #[arg(long)]
        data_dir: PathBuf,
        /// Cluster name the certificate is bound to.
        #[arg(long)]
        cluster: String,
        /// push, pull or admin.
        #[arg(long)]
        role: Role,
        /// Where to write the config (must not exist).
        #[arg(long)]
        out: PathBuf,
        /// Make the certificate valid for this many days (default: until the year 4096).
        /// archived check and /metrics warn before it ends (cert_warning_days).
        #[arg(long)]
        valid_days: Option<u32>,
    },
    /// Run the archive server in the foreground. SIGTERM or SIGINT stops it after
    /// in-flight requests finish (bounded by shutdown_grace_secs). Also serves
    /// /metrics, /healthz and /readyz over HTTP on metrics_listen (archived.toml).
    Serve {
        /// Data directory.
        #[arg(long)]
        data_dir: PathBuf,
        /// Once the UDP socket is bound, write the address it is bound to (IP:port and a
        /// newline) to this file, replacing it atomically. With `listen` port 0 the
        /// kernel picks a free port; this is how a caller (the test harness) learns it.
        #[arg(long)]
        listen_address_file: Option<PathBuf>,
        /// The same for the HTTP endpoint (`metrics_listen`), once it is bound.
        #[arg(long)]
        metrics_address_file: Option<PathBuf>,
    },
    /// WAL held in the archive.
    Wal {
        #[command(subcommand)]
        command: admin::wal::WalCommand,
    },
    /// The audit trail of a cluster from a point in time: every step of every WAL file
    /// (received, refused, stored, acknowledged, served, prefetched, verified, expired),
    /// oldest first, with the certificate and request id of each (asks the running
    /// server).
    Audit(admin::audit::AuditArgs),
    /// The catalog (an index of the object store).
    Catalog {
        #[command(subcommand)]
        command: admin::catalog::CatalogCommand,
    },
    /// Base backups held in the archive (asks the running server).
    Backups {
        #[command(subcommand)]
        command: admin::backups::BackupsCommand,
    },
    /// Expire backups, WAL and chunks by the retention policy (asks the running server).
    Retention {
        #[command(subcommand)]
        command: admin::retention::RetentionCommand,
    },
    /// Named checks of one cluster, each OK, WARNING or CRITICAL with a hint: the
    /// catalog, the store taking writes, WAL continuity from the oldest backup (store
    /// objects included), the newest segment's age, usable backups and the newest one's
    /// age, certificate expiry ([checks] in archived.toml sets the thresholds). Exit 0
    /// when all are OK, 1 when the worst is a WARNING, 2 for a CRITICAL; with --nagios
    /// one status line with perfdata, and 3 (UNKNOWN) when the server cannot be asked.
    Check(admin::check::CheckArgs),
    /// Read every object of a cluster back from the store: each WAL file against its
    /// header (size, blake3) and its name (segment size, first page), gaps per timeline
    /// and missing history files; every manifest, every chunk of every pack and every
    /// loose chunk; every chunk a backup needs held intact. Reads the store named by
    /// DIR/archived.toml directly, beside a running server or without one; --max-rate
    /// bounds the read rate. Exit 0 when no problem was found, 2 when any was (each
    /// printed with the object's key), 1 when it could not run.
    Verify(admin::verify::VerifyArgs),
    /// One screen per cluster (every cluster without --cluster): the newest segment and
    /// its age, WAL files and stored bytes, the primary's .ready backlog as its newest
    /// push reported it, the streaming receiver's position, backups (usable, newest,
    /// stored bytes), the recovery window, and which named checks are not OK (asks the
    /// running server).
    Status(admin::status::StatusArgs),
    /// A synthetic catalog for benches/ops_bench.sh (never on a real archive).
    #[command(hide = true)]
    Synthesize(admin::synthetic::SynthesizeArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Every failure is exit 1, an unusable admin config too (README).
    let setup = Setup {
        workers: None,
        config_exit: Exit::Failure,
    };
    cli::run(&cli.log, setup, |runtime| {
        runtime.block_on(run(cli.command))
    })
}

async fn run(command: Command) -> Result<Exit> {
    match command {
        Command::Check(args) => return admin::check::run(args).await,
        Command::Verify(args) => return admin::verify::run(args).await,
        _ => {}
    }
    run_other(command).await.map(|()| Exit::Success)
}

async fn run_other(command: Command) -> Result<()> {
    match command {
        Command::Init {
            data_dir,
            listen,
            metrics_listen,
            server_names,
        } => {
            datadir::init(
                &DataDir::new(&data_dir),
                &listen,
                metrics_listen.as_deref(),
                &server_names,
            )?;
            println!("initialized {} (listen {listen})", data_dir.display());
            println!(
                "next: archived issue --data-dir {} --cluster NAME --role push --out push.toml",
                data_dir.display()
            );
            Ok(())
        }
        Command::Issue {
            data_dir,
            cluster,
            role,
            out,
            valid_days,
        } => {
            datadir::issue(&DataDir::new(&data_dir), &cluster, role, &out, valid_days)?;
            println!("wrote {} ({role} for cluster {cluster})", out.display());
            Ok(())
        }
        Command::Serve {
            data_dir,
            listen_address_file,
            metrics_address_file,
        } => {
            server::serve(
                &DataDir::new(&data_dir),
                listen_address_file.as_deref(),
                metrics_address_file.as_deref(),
            )
            .await
        }
        Command::Wal { command } => admin::wal::run(command).await,
        Command::Audit(args) => admin::audit::run(args).await,
        Command::Backups { command } => admin::backups::run(command).await,
        Command::Retention { command } => admin::retention::run(command).await,
        Command::Catalog { command } => admin::catalog::run(command).await,
        Command::Status(args) => admin::status::run(args).await,
        Command::Synthesize(args) => admin::synthetic::run(args).await,
        Command::Check(_) | Command::Verify(_) => unreachable!("run answers them"),
    }
}
