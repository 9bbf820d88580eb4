//! `archived backups ...` and `archived retention run`: admin commands that ask the
//! running server (with DIR/admin.toml or --config) and print what it answers.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Subcommand;
use walvault_protocol::core::format::names::format_unix_utc;
use walvault_protocol::core::wire::admin::RetentionReport;
use walvault_protocol::core::wire::backup::BackupSummary;
use walvault_protocol::core::wire::{Request, Response};
use walvault_protocol::net::config::ClientConfig;
use walvault_protocol::net::transport::ArchiveConnection;

use crate::admin_config;

#[derive(clap::Args)]
pub(crate) struct Target {
    /// Data directory (its admin.toml is used to connect).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Admin client config, instead of --data-dir.
    #[arg(long)]
    config: Option<PathBuf>,
}

#[derive(Subcommand)]
pub(crate) enum BackupsCommand {
    /// The backups of a cluster, oldest first: state, LSNs, sizes, restore window.
    List {
        #[command(flatten)]
        target: Target,
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
        target: Target,
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
        target: Target,
        /// Cluster name.
        #[arg(long)]
        cluster: String,
    },
}

#[derive(Subcommand)]
pub(crate) enum RetentionCommand {
    /// Expire backups outside the policy, the WAL no kept backup needs, and chunks no
    /// backup references after their grace period. Flags override archived.toml's
    /// [retention]. Safe to run from cron or a systemd timer at any time, also during
    /// backups.
    Run {
        #[command(flatten)]
        target: Target,
        /// Only this cluster (default: every cluster).
        #[arg(long)]
        cluster: Option<String>,
        /// Keep the newest N usable backups.
        #[arg(long)]
        keep_full: Option<u32>,
        /// Keep what restores to any point of this past duration (e.g. 7d, 36h, 90m).
        #[arg(long, value_parser = parse_duration)]
        keep_within: Option<u64>,
        /// Collect unreferenced chunks only after this long (default 24h; e.g. 0s, 2h).
        #[arg(long, value_parser = parse_duration)]
        chunk_grace: Option<u64>,
        /// Show the plan; delete nothing.
        #[arg(long)]
        dry_run: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// For tests: measure --keep-within back from this Unix time (seconds) instead
        /// of the server's clock. Chunk and pack ages always use the server's clock.
        #[arg(long, hide = true)]
        now: Option<i64>,
    },
}

/// Parses `90s`, `15m`, `36h`, `7d`, `2w` (a bare number is seconds) into seconds.
pub(crate) fn parse_duration(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a duration (examples: 90s, 15m, 36h, 7d, 2w)"))?;
    let mult = match unit.trim() {
        "" | "s" => 1,
        "m" | "min" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        other => {
            return Err(format!(
                "unknown duration unit '{other}' in '{s}' (use s, m, h, d or w)"
            ))
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("duration '{s}' is too large"))
}

async fn ask(target: &Target, request: Request) -> Result<Response> {
    let cfg: ClientConfig = admin_config(target.data_dir.as_deref(), target.config.as_deref())?;
    walvault_protocol::net::transport::install_crypto_provider();
    let conn = ArchiveConnection::connect(&cfg).await?;
    let (response, _) = conn.call(&request).await?;
    conn.close().await;
    match response {
        Response::Error { code, message } => bail!("archive refused ({code:?}): {message}"),
        other => Ok(other),
    }
}

async fn list(target: &Target, cluster: &str) -> Result<Vec<BackupSummary>> {
    match ask(
        target,
        Request::ListBackups {
            cluster: cluster.to_string(),
        },
    )
    .await?
    {
        Response::Backups { backups } => Ok(backups),
        other => bail!("unexpected answer from the archive: {other:?}"),
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1 << 20) as f64)
}

fn window(b: &BackupSummary) -> String {
    match (b.restorable_until, &b.restorable_until_lsn) {
        (Some(t), Some(lsn)) => format!(
            "{} .. {} (LSN {} .. {lsn})",
            format_unix_utc(b.stop_time),
            format_unix_utc(t),
            b.stop_lsn
        ),
        _ => "none until its WAL is archived".to_string(),
    }
}

pub(crate) async fn backups(command: BackupsCommand) -> Result<()> {
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
            println!(
                "{:<21} {:<15} {:<10} {:<22} {:>12} {:>12}  restore window",
                "ID", "STATE", "LABEL", "STOPPED", "SIZE", "STORED"
            );
            for b in &backups {
                println!(
                    "{:<21} {:<15} {:<10} {:<22} {:>12} {:>12}  {}",
                    b.id,
                    b.state.to_string(),
                    b.label,
                    format_unix_utc(b.stop_time),
                    mib(b.logical_bytes),
                    mib(b.stored_bytes),
                    window(b)
                );
            }
            Ok(())
        }
        BackupsCommand::Show {
            id,
            target,
            cluster,
            json,
        } => {
            let backups = list(&target, &cluster).await?;
            let Some(b) = backups.into_iter().find(|b| b.id == id) else {
                bail!("backup {id} does not exist in cluster '{cluster}' (see `archived backups list --cluster {cluster}`)");
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&b)?);
                return Ok(());
            }
            println!("backup {} of cluster {cluster}", b.id);
            println!("  label            {}", b.label);
            println!("  state            {}", b.state);
            println!("  timeline         {}", b.timeline);
            println!(
                "  start            {} at LSN {}",
                format_unix_utc(b.start_time),
                b.start_lsn
            );
            println!(
                "  stop             {} at LSN {}",
                format_unix_utc(b.stop_time),
                b.stop_lsn
            );
            println!(
                "  duration         {} s",
                (b.stop_time - b.start_time).max(0)
            );
            println!("  PostgreSQL       {}", b.pg_version);
            println!(
                "  size             {} in {} files, {} chunks",
                mib(b.logical_bytes),
                b.files,
                b.chunks
            );
            println!("  stored by it     {}", mib(b.stored_bytes));
            println!("  WAL needed       {} .. {}", b.wal_start, b.wal_stop);
            println!("  restore window   {}", window(&b));
            Ok(())
        }
        BackupsCommand::Delete {
            id,
            target,
            cluster,
        } => {
            match ask(
                &target,
                Request::DeleteBackup {
                    cluster: cluster.clone(),
                    backup_id: id.clone(),
                },
            )
            .await?
            {
                Response::Deleted => {
                    println!("deleted backup {id} of cluster {cluster}; its unshared chunks go at the next retention run after the grace period");
                    Ok(())
                }
                other => bail!("unexpected answer from the archive: {other:?}"),
            }
        }
    }
}

pub(crate) async fn retention(command: RetentionCommand) -> Result<()> {
    let RetentionCommand::Run {
        target,
        cluster,
        keep_full,
        keep_within,
        chunk_grace,
        dry_run,
        json,
        now,
    } = command;
    let report = match ask(
        &target,
        Request::Retention {
            cluster,
            keep_full,
            keep_within_secs: keep_within,
            chunk_grace_secs: chunk_grace,
            dry_run,
            window_end: now,
        },
    )
    .await?
    {
        Response::Retention(r) => r,
        other => bail!("unexpected answer from the archive: {other:?}"),
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report);
    }
    Ok(())
}

fn print_report(r: &RetentionReport) {
    let verb = if r.dry_run { "would expire" } else { "expired" };
    for c in &r.clusters {
        println!("cluster {}", c.cluster);
        println!("  kept backups:    {}", c.kept_backups.join(" "));
        println!("  {verb} backups: {}", c.expired_backups.join(" "));
        println!(
            "  {verb} WAL:     {} files ({})",
            c.expired_wal.len(),
            mib(c.expired_wal_bytes)
        );
        println!(
            "  {} chunks: {} ({}, {} packs); {} unreferenced chunks within the grace period",
            if r.dry_run {
                "would collect"
            } else {
                "collected"
            },
            c.collected_chunks,
            mib(c.collected_chunk_bytes),
            c.collected_packs,
            c.chunks_in_grace
        );
        for n in &c.notes {
            println!("  note: {n}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90"), Ok(90));
        assert_eq!(parse_duration("15m"), Ok(900));
        assert_eq!(parse_duration("7d"), Ok(604_800));
        assert!(parse_duration("7y").is_err());
        assert!(parse_duration("h").is_err());
    }
}
