//! `archived retention run`.

use std::time::Duration;

use anyhow::Result;
use clap::Subcommand;
use walvault_protocol::core::wire::admin::RetentionReport;
use walvault_protocol::net::client::RetentionRun;
use walvault_protocol::net::transport::Timeouts;

use super::{ask, ConnectArgs};

/// How long `retention run` waits for the archive's answer, which comes only when the
/// run is done: on a large archive that takes long, so the wait is as good as unbounded
/// (as before the typed client). An archive that goes away still ends it, by the
/// connection's own idle timeout.
const RUN_DEADLINE: Duration = Duration::from_secs(24 * 3600);

#[derive(Subcommand)]
pub(crate) enum RetentionCommand {
    /// Expire backups outside the policy, the WAL no kept backup needs, and chunks no
    /// backup references after their grace period. Flags override archived.toml's
    /// [retention]. Safe to run from cron or a systemd timer at any time, also during
    /// backups.
    Run {
        #[command(flatten)]
        target: ConnectArgs,
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

pub(crate) async fn run(command: RetentionCommand) -> Result<()> {
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
    let run = RetentionRun {
        cluster,
        keep_full,
        keep_within_secs: keep_within,
        chunk_grace_secs: chunk_grace,
        dry_run,
        window_end: now,
    };
    let report = ask(&target, |archive| async move {
        // The archive answers only once the whole run is done.
        let timeouts = Timeouts {
            idle: RUN_DEADLINE,
            total: RUN_DEADLINE,
            ..archive.timeouts()
        };
        archive.with_timeouts(timeouts).retention(&run).await
    })
    .await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report);
    }
    Ok(())
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1 << 20) as f64)
}

fn print_report(r: &RetentionReport) {
    let verb = if r.dry_run { "would expire" } else { "expired" };
    for c in &r.clusters {
        println!("cluster {}", c.cluster);
        println!("  kept backups:    {}", c.kept_backups.join(" "));
        println!("  {verb} backups: {}", c.expired_backups.join(" "));
        println!(
            "  {verb} WAL:     {} files ({})",
            c.expired_wal_files,
            mib(c.expired_wal_bytes)
        );
        for e in &c.expired_wal {
            println!(
                "    timeline {}: {} files, {} .. {}",
                e.timeline, e.files, e.first, e.last
            );
        }
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
