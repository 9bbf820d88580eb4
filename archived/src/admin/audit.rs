//! `archived wal history` and `archived audit`: the audit trail as the running server
//! keeps it (service/audit.rs), one file's story or a cluster's records from a time.
//! Text is a table, one step per line; `--json` prints each record as one JSON line.

use anyhow::{bail, Context, Result};
use walvault_protocol::core::wire::audit::{AuditRecord, Step};

use super::ConnectArgs;

/// `archived audit`.
#[derive(clap::Args)]
pub(crate) struct AuditArgs {
    #[command(flatten)]
    target: ConnectArgs,
    /// Cluster name.
    #[arg(long)]
    cluster: String,
    /// From when: an RFC 3339 time (2026-12-04T21:30:00Z), a UTC date and time
    /// ("2026-12-04 21:30"), a Unix time (@1796420000), or an age (90s, 15m, 2h, 7d).
    #[arg(long)]
    since: String,
    /// Print one JSON object per record (JSON lines) instead of a table.
    #[arg(long)]
    json: bool,
}

/// `archived wal history --cluster C NAME`.
pub(crate) async fn history(
    target: &ConnectArgs,
    cluster: &str,
    name: &str,
    json: bool,
) -> Result<()> {
    let records = super::ask(target, |archive| async move {
        archive.for_cluster(cluster).wal_history(name).await
    })
    .await?;
    if records.is_empty() {
        bail!("the audit trail of cluster '{cluster}' has no record of {name}");
    }
    print_records(&records, json, Some(name))?;
    Ok(())
}

/// `archived audit`.
pub(crate) async fn run(args: AuditArgs) -> Result<()> {
    let now_us = chrono::Utc::now().timestamp_micros();
    let since_us = parse_since(&args.since, now_us)?;
    let archive = super::connect(&args.target).await?;
    let archive = archive.for_cluster(&args.cluster);
    let mut after = None;
    let mut header = !args.json;
    let result = async {
        loop {
            let (records, next) = archive.audit_page(since_us, after.take()).await?;
            if header {
                println!("{}", header_line());
                header = false;
            }
            print_rows(&records, args.json, None)?;
            match next {
                Some(n) => after = Some(n),
                None => return Ok::<_, anyhow::Error>(()),
            }
        }
    }
    .await;
    archive.close().await;
    result
}

/// Column widths of `archived audit`'s table, printed page by page: as wide as a
/// certificate's serial (20 bytes, 40 hex digits) needs.
fn header_line() -> String {
    format!(
        "{:<27}  {:<24}  {:<12}  {:<16}  {:<62}  DETAIL",
        "TIME", "FILE", "STEP", "REQUEST", "PEER"
    )
}

/// One file's records: a table as wide as its cells, or JSON lines.
fn print_records(records: &[AuditRecord], json: bool, file: Option<&str>) -> Result<()> {
    if json {
        return print_rows(records, json, file);
    }
    let rows: Vec<Vec<String>> = records.iter().map(|r| cells(r, file)).collect();
    super::print_table(
        &["TIME", "FILE", "STEP", "REQUEST", "PEER", "DETAIL"],
        &[],
        &rows,
    );
    Ok(())
}

fn cells(r: &AuditRecord, file: Option<&str>) -> Vec<String> {
    vec![
        r.time.clone(),
        r.file.clone().unwrap_or_else(|| "(cluster)".into()),
        r.step.as_str().to_string(),
        r.request.clone().unwrap_or_else(|| "-".into()),
        r.peer.clone().unwrap_or_else(|| "-".into()),
        detail(r, file),
    ]
}

fn print_rows(records: &[AuditRecord], json: bool, file: Option<&str>) -> Result<()> {
    for r in records {
        if json {
            println!("{}", serde_json::to_string(r)?);
        } else {
            let c = cells(r, file);
            println!(
                "{:<27}  {:<24}  {:<12}  {:<16}  {:<62}  {}",
                c[0], c[1], c[2], c[3], c[4], c[5]
            );
        }
    }
    Ok(())
}

/// The detail column: the record's own, with sizes, durations and an expiry's summary.
fn detail(r: &AuditRecord, file: Option<&str>) -> String {
    let mut parts = Vec::new();
    if let (Some(size), Some(b3)) = (r.size, &r.blake3) {
        parts.push(format!("{size} bytes, blake3 {}", &b3[..b3.len().min(16)]));
    }
    if let Some(us) = r.duration_us {
        parts.push(format!("{:.1} ms", us as f64 / 1000.0));
    }
    if let Some(d) = &r.detail {
        parts.push(d.clone());
    }
    if let Some(s) = &r.summary {
        let when = |us: Option<i64>| {
            us.and_then(chrono::DateTime::from_timestamp_micros)
                .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
                .unwrap_or_else(|| "-".into())
        };
        let mut text = format!("replaces {} records", s.records);
        if s.stored_at_us.is_some() {
            text += &format!(
                "; stored {} by {} (request {})",
                when(s.stored_at_us),
                s.stored_by.as_deref().unwrap_or("-"),
                s.stored_request.as_deref().unwrap_or("-")
            );
        }
        text += &format!(
            "; served {}, prefetched {}, refused {}",
            s.served, s.prefetched, s.refused
        );
        if !s.sent_to.is_empty() {
            text += &format!(
                "; sent to {}; last {} to {}",
                s.sent_to.join(", "),
                when(s.last_sent_at_us),
                s.last_sent_to.as_deref().unwrap_or("-")
            );
        }
        parts.push(text);
    }
    if let (Step::Verified, Some(f), Some(d)) = (r.step, file, &r.detail) {
        parts.push(if d.contains(f) {
            "THIS FILE is among the problems".into()
        } else if d.contains("; 0 problems") {
            "this file read back intact".into()
        } else {
            "this file is not among the problems named".into()
        });
    }
    parts.join("; ")
}

/// `--since`: a time, or an age counted back from `now_us`; microseconds.
fn parse_since(text: &str, now_us: i64) -> Result<i64> {
    let t = text.trim();
    if let Some(unix) = t.strip_prefix('@') {
        let secs: i64 = unix
            .parse()
            .with_context(|| format!("bad Unix time {t:?}"))?;
        return Ok(secs.saturating_mul(1_000_000));
    }
    if let Some(unit) = t.chars().last().filter(|c| "smhd".contains(*c)) {
        if let Ok(n) = t[..t.len() - 1].parse::<i64>() {
            let secs = n * match unit {
                's' => 1,
                'm' => 60,
                'h' => 3600,
                _ => 86400,
            };
            return Ok(now_us - secs * 1_000_000);
        }
    }
    if let Ok(d) = chrono::DateTime::parse_from_rfc3339(t) {
        return Ok(d.timestamp_micros());
    }
    for f in ["%Y-%m-%d %H:%M:%S", "%Y-%m-%d %H:%M", "%Y-%m-%dT%H:%M:%S"] {
        if let Ok(d) = chrono::NaiveDateTime::parse_from_str(t, f) {
            return Ok(d.and_utc().timestamp_micros());
        }
    }
    if let Ok(d) = chrono::NaiveDate::parse_from_str(t, "%Y-%m-%d") {
        return Ok(d
            .and_hms_opt(0, 0, 0)
            .unwrap_or_default()
            .and_utc()
            .timestamp_micros());
    }
    bail!(
        "--since {t:?}: give an RFC 3339 time (2026-12-04T21:30:00Z), a UTC date and time \
         (\"2026-12-04 21:30\"), a Unix time (@1796420000) or an age (90s, 15m, 2h, 7d)"
    )
}

#[cfg(test)]
mod tests {
    use super::parse_since;

    #[test]
    fn since_takes_times_dates_unix_times_and_ages() {
        let now = 1_800_000_000_000_000;
        assert_eq!(parse_since("2h", now).unwrap(), now - 7_200_000_000);
        assert_eq!(parse_since("90s", now).unwrap(), now - 90_000_000);
        assert_eq!(
            parse_since("@1700000000", now).unwrap(),
            1_700_000_000_000_000
        );
        assert_eq!(
            parse_since("2023-11-14T22:13:20Z", now).unwrap(),
            1_700_000_000_000_000
        );
        assert_eq!(
            parse_since("2023-11-14 22:13:20", now).unwrap(),
            1_700_000_000_000_000
        );
        assert_eq!(
            parse_since("2023-11-14", now).unwrap(),
            1_699_920_000_000_000
        );
        let e = parse_since("yesterday", now).unwrap_err().to_string();
        assert!(e.contains("RFC 3339"), "{e}");
    }
}
