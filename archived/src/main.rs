//! `archived`: the walvault archive daemon and its admin commands.

mod admin_backups;
mod backup_index;
mod backups;
mod catalog;
mod packs;
mod retention;
mod server;
mod settings;
mod store;
mod syncgroup;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use walvault_protocol::core::wire::{Request, Response, WalListing};
use walvault_protocol::net::config::ClientConfig;
use walvault_protocol::net::logging::{self, LogFormat};
use walvault_protocol::net::pki::Role;
use walvault_protocol::net::transport::ArchiveConnection;

use settings::DataDir;

/// The walvault archive: keeps PostgreSQL WAL and base backups for any number of
/// clusters, served over QUIC with mutual TLS.
#[derive(Parser)]
#[command(name = "archived", version, about, long_about = None)]
struct Cli {
    /// Log format: text (default) or json.
    #[arg(long, global = true, default_value = "text")]
    log_format: LogFormat,
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
        #[arg(long, default_value = settings::DEFAULT_LISTEN)]
        listen: String,
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
    },
    /// Run the archive server in the foreground. SIGTERM or SIGINT stops it after
    /// in-flight requests finish (bounded by shutdown_grace_secs).
    Serve {
        /// Data directory.
        #[arg(long)]
        data_dir: PathBuf,
        /// Once the UDP socket is bound, write the address it is bound to (IP:port and a
        /// newline) to this file, replacing it atomically. With `listen` port 0 the
        /// kernel picks a free port; this is how a caller (the test harness) learns it.
        #[arg(long)]
        listen_address_file: Option<PathBuf>,
    },
    /// WAL held in the archive.
    Wal {
        #[command(subcommand)]
        command: WalCommand,
    },
    /// The catalog (an index of the object store).
    Catalog {
        #[command(subcommand)]
        command: CatalogCommand,
    },
    /// Base backups held in the archive (asks the running server).
    Backups {
        #[command(subcommand)]
        command: admin_backups::BackupsCommand,
    },
    /// Expire backups, WAL and chunks by the retention policy (asks the running server).
    Retention {
        #[command(subcommand)]
        command: admin_backups::RetentionCommand,
    },
}

#[derive(Subcommand)]
enum WalCommand {
    /// Segments per timeline, history files and gaps of one cluster (asks the running server).
    List {
        /// Data directory (its admin.toml is used to connect).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Admin client config, instead of --data-dir.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Cluster name.
        #[arg(long)]
        cluster: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum CatalogCommand {
    /// Rebuild the catalog from a listing of the store. Run with the server stopped.
    Rebuild {
        /// Data directory.
        #[arg(long)]
        data_dir: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    logging::init(cli.log_format, "info");
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("archived: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("archived: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> Result<()> {
    match command {
        Command::Init {
            data_dir,
            listen,
            server_names,
        } => {
            let dir = DataDir::new(&data_dir);
            settings::init(&dir, &listen, &server_names)?;
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
        } => {
            settings::issue(&DataDir::new(&data_dir), &cluster, role, &out)?;
            println!("wrote {} ({role} for cluster {cluster})", out.display());
            Ok(())
        }
        Command::Serve {
            data_dir,
            listen_address_file,
        } => server::serve(&DataDir::new(&data_dir), listen_address_file.as_deref()).await,
        Command::Wal {
            command:
                WalCommand::List {
                    data_dir,
                    config,
                    cluster,
                    json,
                },
        } => {
            let cfg = admin_config(data_dir.as_deref(), config.as_deref())?;
            let listing = list_wal(&cfg, &cluster).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&listing)?);
            } else {
                print_listing(&listing);
            }
            Ok(())
        }
        Command::Backups { command } => admin_backups::backups(command).await,
        Command::Retention { command } => admin_backups::retention(command).await,
        Command::Catalog {
            command: CatalogCommand::Rebuild { data_dir },
        } => {
            let dir = DataDir::new(&data_dir);
            let cfg = dir.load_config()?;
            let options: Vec<(String, String)> = cfg.storage_options.clone().into_iter().collect();
            let store = store::Store::open(&cfg.storage, &options, &dir.store(), &dir.spool())?;
            let catalog = catalog::Catalog::open_or_rebuild(&dir.catalog(), &store)
                .await
                .context("opening the catalog (is archived serve still running?)")?;
            let summary = catalog.rebuild(&store).await?;
            println!(
                "catalog rebuilt: {} clusters, {} WAL files, {} backups, {} backup chunks, {} unreadable objects",
                summary.clusters, summary.wal_files, summary.backups, summary.chunks, summary.unreadable
            );
            Ok(())
        }
    }
}

pub(crate) fn admin_config(data_dir: Option<&Path>, config: Option<&Path>) -> Result<ClientConfig> {
    let path = match (config, data_dir) {
        (Some(c), _) => c.to_path_buf(),
        (None, Some(d)) => DataDir::new(d).admin_config(),
        (None, None) => bail!("give --data-dir DIR (uses DIR/admin.toml) or --config FILE"),
    };
    Ok(ClientConfig::load(&path)?)
}

async fn list_wal(cfg: &ClientConfig, cluster: &str) -> Result<WalListing> {
    walvault_protocol::net::transport::install_crypto_provider();
    let conn = ArchiveConnection::connect(cfg).await?;
    let (response, _) = conn
        .call(&Request::ListWal {
            cluster: cluster.to_string(),
        })
        .await?;
    conn.close().await;
    match response {
        Response::WalList(l) => Ok(l),
        Response::Error { code, message } => bail!("archive refused ({code:?}): {message}"),
        other => bail!("unexpected answer from the archive: {other:?}"),
    }
}

fn print_listing(l: &WalListing) {
    println!("cluster {}", l.cluster);
    match l.system_identifier {
        Some(id) => println!(
            "  system identifier {id}, segment size {} MiB",
            l.segment_size.unwrap_or(0) >> 20
        ),
        None => println!("  no segment archived yet"),
    }
    if l.timelines.is_empty() {
        println!("  no WAL");
    }
    for t in &l.timelines {
        println!(
            "  timeline {}: {} segments {}..{} ({} MiB raw, {} MiB stored)",
            t.timeline.0,
            t.segments,
            t.first.as_deref().unwrap_or("-"),
            t.last.as_deref().unwrap_or("-"),
            t.raw_bytes >> 20,
            t.stored_bytes >> 20
        );
        for (a, b) in &t.gaps {
            println!("    GAP: {a} .. {b} missing");
        }
        for p in &t.partials {
            println!("    partial: {p}");
        }
    }
    for h in &l.history_files {
        println!("  history: {h}");
    }
    for b in &l.backup_history_files {
        println!("  backup history: {b}");
    }
}
