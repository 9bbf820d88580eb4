//! `archived status`: prints one screen per cluster (ops/status.rs) or its JSON.

use anyhow::Result;
use walvault_protocol::core::format::names::format_unix_utc;
use walvault_protocol::core::wire::ClusterStatus;

use super::ConnectArgs;
use crate::ops::check::age_text;

#[derive(clap::Args)]
pub(crate) struct StatusArgs {
    #[command(flatten)]
    target: ConnectArgs,
    /// Cluster name; without it, every cluster (admin certificate).
    #[arg(long)]
    cluster: Option<String>,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

pub(crate) async fn run(args: StatusArgs) -> Result<()> {
    let cluster = args.cluster.clone();
    let clusters = super::ask(&args.target, |archive| async move {
        match &cluster {
            Some(c) => archive.for_cluster(c).status(false).await,
            None => archive.status(true).await,
        }
    })
    .await?;
    let now = crate::clock::unix_now();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&clusters)?);
        return Ok(());
    }
    if clusters.is_empty() {
        println!("no cluster has archived anything yet");
    }
    for c in &clusters {
        print!("{}", screen(c, now));
    }
    Ok(())
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / 1048576.0)
}

/// One cluster's screen.
fn screen(c: &ClusterStatus, now: i64) -> String {
    let mut out = format!("cluster {}", c.cluster);
    match (c.system_identifier, c.segment_size) {
        (Some(id), Some(size)) => out += &format!(" (system {id}, {} MiB segments)\n", size >> 20),
        _ => out += " (nothing archived yet)\n",
    }
    let line = |out: &mut String, what: &str, text: String| {
        *out += &format!("  {what:<16}{text}\n");
    };
    let newest = match (&c.newest_segment, c.newest_segment_time) {
        (Some(s), Some(t)) => format!("{s}, archived {} ago", age_text(now - t)),
        (Some(s), None) => format!("{s} (its object is not in the store)"),
        _ => "none".into(),
    };
    line(&mut out, "newest WAL", newest);
    line(
        &mut out,
        "WAL",
        format!("{} files, {} stored", c.wal_files, mib(c.wal_stored_bytes)),
    );
    if let Some(n) = c.ready_files {
        let keeping = if n <= 1 { " (keeping up)" } else { "" };
        line(
            &mut out,
            "primary backlog",
            format!("{n} .ready file(s) at its newest push{keeping}"),
        );
    }
    if let Some(lsn) = &c.stream_flushed_lsn {
        line(
            &mut out,
            "streaming",
            format!("receiver durable up to {lsn}"),
        );
    }
    let newest_backup = match (&c.newest_backup, c.newest_backup_time) {
        (Some(id), Some(t)) => format!(", newest {id} ended {} ago", age_text(now - t)),
        _ => String::new(),
    };
    line(
        &mut out,
        "backups",
        format!(
            "{} ({} usable){newest_backup}; {} stored",
            c.backups,
            c.usable_backups,
            mib(c.backup_stored_bytes)
        ),
    );
    let window = match (c.window_start, c.window_end) {
        (Some(a), Some(b)) => format!("{} .. {}", format_unix_utc(a), format_unix_utc(b)),
        (Some(a), None) => format!("from {}", format_unix_utc(a)),
        _ => "none (no usable backup)".into(),
    };
    line(&mut out, "recovery window", window);
    let retention = match (
        c.retention_last_run,
        &c.retention_error,
        c.retention_last_success,
    ) {
        (None, _, _) => "never ran (deploy/archived-retention.timer)".to_string(),
        (Some(at), Some(e), ok) => format!(
            "FAILED {} ago: {e}{}",
            age_text(now - at),
            ok.map(|t| format!(" (last success {} ago)", age_text(now - t)))
                .unwrap_or_default()
        ),
        (Some(at), None, _) => format!(
            "ran {} ago, expired {} WAL files and {} backups",
            age_text(now - at),
            c.retention_expired_wal_files,
            c.retention_expired_backups
        ),
    };
    line(&mut out, "retention", retention);
    let verify = match c.verify_last_run {
        None => "never ran (deploy/archived-verify@.timer)".to_string(),
        Some(at) => format!(
            "{} ago ({}): {}",
            age_text(now - at),
            c.verify_scope.as_deref().unwrap_or("-"),
            match c.verify_problems {
                0 => "no problem".to_string(),
                n => format!("{n} PROBLEMS (archived check --cluster {})", c.cluster),
            }
        ),
    };
    line(&mut out, "verify", verify);
    let checks = match c.failing_checks.is_empty() {
        true => "all OK".to_string(),
        false => {
            c.failing_checks
                .iter()
                .map(|(name, s)| format!("{name} {s}"))
                .collect::<Vec<_>>()
                .join(", ")
                + " (archived check --cluster "
                + &c.cluster
                + ")"
        }
    };
    line(&mut out, "checks", checks);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use walvault_protocol::core::wire::CheckStatus;

    #[test]
    fn a_screen_says_what_an_operator_looks_for() {
        let c = ClusterStatus {
            cluster: "main".into(),
            system_identifier: Some(7),
            segment_size: Some(16 << 20),
            newest_segment: Some("000000010000000000000042".into()),
            newest_segment_time: Some(1000),
            wal_files: 66,
            wal_stored_bytes: 3 << 20,
            ready_files: Some(1),
            backups: 2,
            usable_backups: 1,
            newest_backup: Some("20261203T100000Z".into()),
            newest_backup_time: Some(100),
            backup_stored_bytes: 10 << 20,
            window_start: Some(100),
            window_end: Some(1000),
            failing_checks: vec![("backups".into(), CheckStatus::Critical)],
            retention_last_run: Some(442),
            retention_last_success: Some(442),
            retention_expired_wal_files: 12,
            retention_expired_backups: 1,
            verify_last_run: Some(1000),
            verify_scope: Some("wal".into()),
            verify_problems: 2,
            ..ClusterStatus::default()
        };
        let text = screen(&c, 1042);
        assert!(
            text.starts_with("cluster main (system 7, 16 MiB segments)\n"),
            "{text}"
        );
        assert!(
            text.contains("000000010000000000000042, archived 42 s ago"),
            "{text}"
        );
        assert!(
            text.contains("1 .ready file(s) at its newest push (keeping up)"),
            "{text}"
        );
        assert!(
            text.contains("2 (1 usable), newest 20261203T100000Z ended 15 min ago"),
            "{text}"
        );
        assert!(
            text.contains("1970-01-01 00:01:40+00 .. 1970-01-01 00:16:40+00"),
            "{text}"
        );
        assert!(
            text.contains("backups CRITICAL (archived check --cluster main)"),
            "{text}"
        );
        assert!(
            text.contains("retention       ran 10 min ago, expired 12 WAL files and 1 backups"),
            "{text}"
        );
        assert!(
            text.contains("verify          42 s ago (wal): 2 PROBLEMS"),
            "{text}"
        );
        let never = screen(&ClusterStatus::default(), 0);
        assert!(never.contains("archived-retention.timer"), "{never}");
        assert!(never.contains("archived-verify@.timer"), "{never}");
    }
}
