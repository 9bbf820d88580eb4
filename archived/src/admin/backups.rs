//! `archived backups list|show|delete`.

use anyhow::{bail, Result};
use clap::Subcommand;
use walvault_protocol::core::format::names::format_unix_utc;
use walvault_protocol::core::wire::backup::BackupSummary;

use super::{ask, ConnectArgs};

#[derive(Subcommand)]
pub(crate) enum BackupsCommand {
    /// The backups of a cluster, oldest first: state, LSNs, sizes, restore window.
    List {
        #[command(flatten)]
        target: ConnectArgs,
        /// Cluster name.
        #[arg(long)]
        cluster: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// One backup in detail.
    Show {
        /// Backup id (see `backups list`).
        id: String,
        #[command(flatten)]
        target: ConnectArgs,
        /// Cluster name (backup ids are unique within a cluster).
        #[arg(long)]
        cluster: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Delete a backup (its manifest at once; chunks no other backup uses at the next
    /// `retention run` after the grace period).
    Delete {
        /// Backup id.
        id: String,
        #[command(flatten)]
        target: ConnectArgs,
        /// Cluster name.
        #[arg(long)]
        cluster: String,
    },
}

async fn list(target: &ConnectArgs, cluster: &str) -> Result<Vec<BackupSummary>> {
    ask(target, |archive| async move {
        archive.for_cluster(cluster).list_backups().await
    })
    .await
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1 << 20) as f64)
}

fn window(b: &BackupSummary) -> String {
    match (b.restorable_until, &b.restorable_until_lsn) {
        (Some(t), Some(lsn)) => format!(
            "{} .. {} (LSN {} .. {lsn})",
            format_unix_utc(b.record.stop_time),
            format_unix_utc(t),
            b.record.stop_lsn
        ),
        _ => "none until its WAL is archived".to_string(),
    }
}

pub(crate) async fn run(command: BackupsCommand) -> Result<()> {
    match command {
        BackupsCommand::List {
            target,
            cluster,
            json,
        } => {
            let backups = list(&target, &cluster).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&backups)?);
                return Ok(());
            }
            if backups.is_empty() {
                println!("cluster {cluster}: no backups");
                return Ok(());
            }
            let rows: Vec<Vec<String>> = backups
                .iter()
                .map(|b| {
                    vec![
                        b.record.id.clone(),
                        b.state.to_string(),
                        b.record.label.clone(),
                        format_unix_utc(b.record.stop_time),
                        mib(b.record.logical_bytes),
                        mib(b.record.stored_bytes),
                        window(b),
                    ]
                })
                .collect();
            super::print_table(
                &[
                    "ID",
                    "STATE",
                    "LABEL",
                    "STOPPED",
                    "SIZE",
                    "STORED",
                    "RESTORE WINDOW",
                ],
                &[false, false, false, false, true, true, false],
                &rows,
            );
            Ok(())
        }
        BackupsCommand::Show {
            id,
            target,
            cluster,
            json,
        } => {
            let backups = list(&target, &cluster).await?;
            let Some(b) = backups.into_iter().find(|b| b.record.id == id) else {
                bail!("backup {id} does not exist in cluster '{cluster}' (see `archived backups list --cluster {cluster}`)");
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&b)?);
                return Ok(());
            }
            println!("backup {} of cluster {cluster}", b.record.id);
            println!("  label            {}", b.record.label);
            println!("  state            {}", b.state);
            println!("  timeline         {}", b.record.timeline);
            println!(
                "  start            {} at LSN {}",
                format_unix_utc(b.record.start_time),
                b.record.start_lsn
            );
            println!(
                "  stop             {} at LSN {}",
                format_unix_utc(b.record.stop_time),
                b.record.stop_lsn
            );
            println!(
                "  duration         {} s",
                (b.record.stop_time - b.record.start_time).max(0)
            );
            println!("  PostgreSQL       {}", b.record.pg_version);
            println!(
                "  size             {} in {} files, {} chunks",
                mib(b.record.logical_bytes),
                b.record.files,
                b.record.chunks
            );
            println!("  stored by it     {}", mib(b.record.stored_bytes));
            println!("  WAL needed       {} .. {}", b.wal_start, b.wal_stop);
            println!("  restore window   {}", window(&b));
            Ok(())
        }
        BackupsCommand::Delete {
            id,
            target,
            cluster,
        } => {
            let (on, backup) = (&cluster, &id);
            ask(&target, |archive| async move {
                archive.for_cluster(on).delete_backup(backup).await
            })
            .await?;
            println!("deleted backup {id} of cluster {cluster}; its unshared chunks go at the next retention run after the grace period");
            Ok(())
        }
    }
}
