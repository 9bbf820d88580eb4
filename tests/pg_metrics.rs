//! archived's HTTP endpoint (`metrics_listen`) beside a real archiving PostgreSQL 15: the
//! probes answer, a scrape passes `promtool check metrics` (Debian's `prometheus`
//! package, which scripts/test installs), and the newest archived segment and the push
//! counters move as PostgreSQL's `pg_stat_archiver` says.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::Duration;

use walvault_protocol::core::pg::wal::WalFileName;
use walvault_tests::*;

use crate::pg_archive::archiving_primary;
use crate::pg_backup::CLUSTER;

/// One HTTP/1.1 GET with `headers`: status and body.
pub(crate) fn get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("connect to the metrics endpoint {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        request.push_str(&format!("{k}: {v}\r\n"));
    }
    request.push_str("\r\n");
    s.write_all(request.as_bytes()).unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP answer: {answer:?}"));
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    // Connection: close, and hyper sends a length or chunks; chunked bodies are small
    // enough here to come in one chunk.
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        let (size, rest) = body.split_once("\r\n").expect("a chunk size line");
        let size = usize::from_str_radix(size.trim(), 16).expect("a hex chunk size");
        rest[..size].to_string()
    } else {
        body.to_string()
    };
    (status, body)
}

/// The value of the sample `name{labels}` (labels exactly as printed) in a scrape.
pub(crate) fn sample(scrape: &str, series: &str) -> Option<f64> {
    scrape.lines().find_map(|l| {
        let (s, v) = l.rsplit_once(' ')?;
        (s == series).then(|| v.parse().ok())?
    })
}

/// Runs `promtool check metrics` on `scrape`; panics with its words when it complains.
pub(crate) fn promtool_check(scrape: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "promtool is missing ({e}): install Debian's prometheus package (scripts/test does: apt-get install prometheus)"
            )
        });
    child
        .stdin
        .take()
        .unwrap()
        .write_all(scrape.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed ({}):\n{}{}\n--- the scrape:\n{scrape}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The end LSN of segment `name` (16 MiB segments), as a number.
fn segment_end(name: &str) -> f64 {
    let Ok(WalFileName::Segment(s)) = name.parse::<WalFileName>() else {
        panic!("{name:?} is not a segment name");
    };
    (s.start_lsn(16 << 20).0 + (16 << 20)) as f64
}

/// pg_stat_archiver's last archived WAL file and count.
fn archiver(primary: &PgCluster) -> (String, f64) {
    let row =
        primary.psql("SELECT last_archived_wal || ' ' || archived_count FROM pg_stat_archiver");
    let (name, count) = row.split_once(' ').expect("two fields");
    (name.to_string(), count.parse().expect("a count"))
}

#[test]
fn the_metrics_endpoint_follows_archiving_and_passes_promtool() {
    // The gap, store and window figures are refreshed every second here (60 by default).
    let archive = Archive::start_configured(
        CLUSTER,
        |toml| {
            let text = std::fs::read_to_string(toml).unwrap();
            let edited = text.replace("summary_interval_secs = 60", "summary_interval_secs = 1");
            assert_ne!(
                text, edited,
                "archived.toml has no summary_interval_secs:\n{text}"
            );
            std::fs::write(toml, edited).unwrap();
        },
        vec![],
    );
    let addr = archive.metrics_addr();
    assert_eq!(get(addr, "/healthz", &[]), (200, "ok\n".into()));
    assert_eq!(get(addr, "/readyz", &[]), (200, "ready\n".into()));
    assert_eq!(get(addr, "/nosuch", &[]).0, 404);

    let push = archive.issue(CLUSTER, "push");
    let primary = archiving_primary(&archive, &push, &[]);
    let first = primary.switch_wal();
    primary.wait_archived(&first, || archive.diag());
    let (last, count) = archiver(&primary);
    let (status, scrape) = get(addr, "/metrics", &[]);
    assert_eq!(status, 200, "{scrape}");
    promtool_check(&scrape);
    let lsn = format!("walvault_wal_last_segment_end_lsn{{cluster=\"{CLUSTER}\"}}");
    assert_eq!(sample(&scrape, &lsn), Some(segment_end(&last)), "{scrape}");
    let stored = "walvault_requests_total{operation=\"put_wal\",result=\"stored\"}";
    assert!(
        sample(&scrape, stored).is_some_and(|n| n >= count),
        "pg_stat_archiver archived {count} files:\n{scrape}"
    );
    let archived_at =
        format!("walvault_wal_last_archived_timestamp_seconds{{cluster=\"{CLUSTER}\"}}");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        sample(&scrape, &archived_at).is_some_and(|t| (now - t).abs() < 300.0),
        "{scrape}"
    );
    assert!(
        sample(&scrape, "walvault_quic_connections").is_some(),
        "{scrape}"
    );
    for cert in ["CA", "server"] {
        let series =
            format!("walvault_certificate_expiry_timestamp_seconds{{certificate=\"{cert}\"}}");
        assert!(
            sample(&scrape, &series).is_some_and(|t| t > now + 86400.0 * 365.0),
            "{series}: {scrape}"
        );
    }

    // The data directory's filesystem as df sees it (the local store is inside the data
    // directory here: one volume, so no volume="store" series).
    let df = Command::new("df")
        .args(["--output=size,avail", "-B1"])
        .arg(archive.data_dir())
        .output()
        .expect("df (coreutils)");
    let df = String::from_utf8_lossy(&df.stdout).into_owned();
    let df: Vec<f64> = df
        .lines()
        .nth(1)
        .unwrap_or_else(|| panic!("df printed {df:?}"))
        .split_whitespace()
        .map(|n| n.parse().unwrap())
        .collect();
    let size = sample(&scrape, "walvault_filesystem_size_bytes{volume=\"data\"}");
    let free = sample(&scrape, "walvault_filesystem_free_bytes{volume=\"data\"}");
    assert_eq!(size, Some(df[0]), "df: {df:?}\n{scrape}");
    assert!(
        free.is_some_and(|f| (f - df[1]).abs() <= df[0] / 100.0),
        "df: {df:?}\n{scrape}"
    );
    assert_eq!(
        sample(&scrape, "walvault_filesystem_free_bytes{volume=\"store\"}"),
        None,
        "{scrape}"
    );

    // More WAL and a base backup: the figures move with pg_stat_archiver's.
    primary.pgbench_init(1);
    let backup_id = crate::pg_backup::backup(&archive, &push, &primary, &["--fast"]);
    let run = archive.admin(&["retention", "run", "--cluster", CLUSTER, "--json"]);
    let report: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    let expired_wal = report["clusters"][0]["expired_wal_files"].as_f64().unwrap();
    archive.admin(&["verify", "--cluster", CLUSTER, "--wal"]);
    let second = primary.switch_wal();
    primary.wait_archived(&second, || archive.diag());
    let (last2, count2) = archiver(&primary);
    assert!(count2 > count);
    let (_, scrape2) = get(addr, "/metrics", &[]);
    promtool_check(&scrape2);
    assert_eq!(
        sample(&scrape2, &lsn),
        Some(segment_end(&last2)),
        "{scrape2}"
    );
    let grown = sample(&scrape2, stored).unwrap() - sample(&scrape, stored).unwrap();
    assert!(
        grown >= count2 - count,
        "{} more files archived, {grown} more stored:\n{scrape2}",
        count2 - count
    );
    let backups = format!("walvault_backups{{cluster=\"{CLUSTER}\"}}");
    assert_eq!(sample(&scrape2, &backups), Some(1.0), "{scrape2}");
    let ended = format!("walvault_backup_last_end_timestamp_seconds{{cluster=\"{CLUSTER}\"}}");
    assert!(
        sample(&scrape2, &ended).is_some_and(|t| (now - t).abs() < 600.0),
        "{scrape2}"
    );
    let retained =
        format!("walvault_retention_last_success_timestamp_seconds{{cluster=\"{CLUSTER}\"}}");
    assert!(
        sample(&scrape2, &retained).is_some_and(|t| (now - t).abs() < 600.0),
        "{scrape2}"
    );
    let verified = format!("walvault_verify_last_run_timestamp_seconds{{cluster=\"{CLUSTER}\"}}");
    assert!(
        sample(&scrape2, &verified).is_some_and(|t| (now - t).abs() < 600.0),
        "{scrape2}"
    );
    let problems = format!("walvault_verify_problems{{cluster=\"{CLUSTER}\"}}");
    assert_eq!(sample(&scrape2, &problems), Some(0.0), "{scrape2}");
    // What retention removed, as its report says; the backup's duration and bytes, as
    // its listing says.
    let removed = format!("walvault_retention_last_expired_wal_files{{cluster=\"{CLUSTER}\"}}");
    assert_eq!(sample(&scrape2, &removed), Some(expired_wal), "{scrape2}");
    let b = crate::pg_backup::backup_json(&archive, &backup_id);
    let took = format!("walvault_backup_last_duration_seconds{{cluster=\"{CLUSTER}\"}}");
    assert_eq!(
        sample(&scrape2, &took),
        Some(b["stop_time"].as_f64().unwrap() - b["start_time"].as_f64().unwrap()),
        "{b:#}\n{scrape2}"
    );
    let added = format!("walvault_backup_last_stored_bytes{{cluster=\"{CLUSTER}\"}}");
    assert_eq!(
        sample(&scrape2, &added),
        b["stored_bytes"].as_f64(),
        "{b:#}\n{scrape2}"
    );
    // The background figures: the recovery window opens at the backup's end and reaches
    // the newest segment's store time; no gap; the store holds the WAL and the backup.
    let start =
        format!("walvault_recovery_window_start_timestamp_seconds{{cluster=\"{CLUSTER}\"}}");
    let end = format!("walvault_recovery_window_end_timestamp_seconds{{cluster=\"{CLUSTER}\"}}");
    let scrape3 = wait_for(
        "the summary to cover the backup and the newest segment",
        Duration::from_secs(20),
        || {
            let (_, s) = get(addr, "/metrics", &[]);
            let (Some(_), Some(e)) = (sample(&s, &start), sample(&s, &end)) else {
                return None;
            };
            let newest = sample(
                &s,
                "walvault_wal_last_archived_timestamp_seconds{cluster=\"main\"}",
            )?;
            // A scan that started in a later second than the newest segment's store
            // time holds it (its catalog entry is written right after the object).
            let scanned = sample(
                &s,
                "walvault_catalog_scan_timestamp_seconds{cluster=\"main\"}",
            )?;
            (e >= newest && scanned > newest).then_some(s)
        },
        || archive.diag(),
    );
    promtool_check(&scrape3);
    assert_eq!(
        sample(&scrape3, &start),
        b["stop_time"].as_f64(),
        "{b:#}\n{scrape3}"
    );
    let gaps = format!("walvault_wal_gap_segments{{cluster=\"{CLUSTER}\"}}");
    assert_eq!(sample(&scrape3, &gaps), Some(0.0), "{scrape3}");
    let store = format!("walvault_store_bytes{{cluster=\"{CLUSTER}\"}}");
    let wal_listing = archive.wal_list_json(CLUSTER);
    let wal_stored: f64 = wal_listing["timelines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["stored_bytes"].as_f64().unwrap())
        .sum();
    assert!(
        sample(&scrape3, &store)
            .is_some_and(|s| s >= wal_stored + b["stored_bytes"].as_f64().unwrap()),
        "WAL {wal_stored} + backup {} bytes:\n{scrape3}",
        b["stored_bytes"]
    );
    // PostgreSQL's own archive_command reported its backlog: at least the file it pushed.
    let ready = format!("walvault_archive_ready_files{{cluster=\"{CLUSTER}\"}}");
    assert!(
        sample(&scrape2, &ready).is_some_and(|n| n >= 1.0),
        "{scrape2}"
    );
    let bytes = "walvault_request_body_bytes_total{operation=\"put_wal\"}";
    assert!(sample(&scrape2, bytes).unwrap() > sample(&scrape, bytes).unwrap());

    // Every family the alert rules (deploy/prometheus) use is one archived serves (the
    // prefetch daemon's, walvault_prefetch_*, are checked against its own scrape in
    // prefetch.rs; the streaming receiver's have series only while one streams, and
    // pg_stream's RPO test reads them).
    let rules = std::fs::read_to_string(crate::deploy::prometheus_dir().join("walvault.rules.yml"))
        .unwrap();
    for name in crate::deploy::metric_names(&rules)
        .into_iter()
        .filter(|n| !n.starts_with("walvault_prefetch_") && !n.starts_with("walvault_stream_"))
    {
        assert!(
            scrape3.contains(&format!("# TYPE {name} ")),
            "the alert rules use {name}, which the scrape has no family of:\n{scrape3}"
        );
    }

    // Every family is documented in README (Operations, "Metrics and probes").
    let readme = crate::deploy::readme();
    for family in scrape3
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
    {
        let documented = readme.contains(&format!("`{family}`"))
            || readme.contains(&format!("`{family}{{"))
            || readme.contains(&format!("`{}", family.trim_end_matches("_total")));
        assert!(documented, "README does not document {family}");
    }

    // And every family the dashboard (deploy/grafana) shows; the receiver's has series
    // only while a receiver streams (pg_stream's RPO test reads it), and a family without
    // series is not printed.
    for name in crate::deploy::metric_names(&crate::deploy::dashboard()) {
        // The prefetch daemon's are checked against its own scrape (prefetch.rs).
        if name == "walvault_stream_flushed_lsn" || name.starts_with("walvault_prefetch_") {
            continue;
        }
        let family = crate::deploy::family_of(&name);
        assert!(
            scrape3.contains(&format!("# TYPE {family} ")),
            "the dashboard uses {name}, which the scrape has no family of:\n{scrape3}"
        );
    }

    // A scraper that asks for OpenMetrics gets it.
    let (status, om) = get(
        addr,
        "/metrics",
        &[("Accept", "application/openmetrics-text; version=1.0.0")],
    );
    assert_eq!(status, 200);
    assert!(om.ends_with("# EOF\n"), "{om}");
    assert!(om.contains("# TYPE walvault_requests counter"), "{om}");
}

#[test]
fn a_metrics_token_guards_the_scrape_but_not_the_probes() {
    let archive = Archive::start_configured(
        CLUSTER,
        |toml| {
            let text = std::fs::read_to_string(toml).unwrap();
            std::fs::write(toml, format!("metrics_token = \"s3cret\"\n{text}")).unwrap();
        },
        vec![],
    );
    let addr = archive.metrics_addr();
    assert_eq!(get(addr, "/metrics", &[]).0, 401);
    assert_eq!(
        get(addr, "/metrics", &[("Authorization", "Bearer wrong")]).0,
        401
    );
    let (status, scrape) = get(addr, "/metrics", &[("Authorization", "Bearer s3cret")]);
    assert_eq!(status, 200, "{scrape}");
    assert!(scrape.contains("walvault_build_info{version="), "{scrape}");
    assert_eq!(get(addr, "/healthz", &[]).0, 200);
    assert_eq!(get(addr, "/readyz", &[]).0, 200);
}

#[test]
fn a_push_reports_the_primarys_ready_backlog_and_the_scrape_shows_it() {
    use crate::promises::{fake_segment, put_file, seg_name};
    let archive = Archive::start("main");
    let push = archive.issue("main", "push");
    let dir = TestDir::new("ready-backlog");
    // A primary's layout: the segment pushed and five .ready files (itself and four
    // waiting), a .done file that does not count.
    let wal = dir.join("pg_wal");
    let status = wal.join("archive_status");
    std::fs::create_dir_all(&status).unwrap();
    let name = seg_name(1, 2);
    let p = put_file(&wal, &name, &fake_segment(1, 2, 7));
    for n in 2..7 {
        std::fs::write(status.join(format!("{}.ready", seg_name(1, n))), b"").unwrap();
    }
    std::fs::write(status.join(format!("{}.done", seg_name(1, 1))), b"").unwrap();
    let out = archive.archive_push(&push, &p);
    assert!(out.success(), "{}\n{}", out.describe(), archive.diag());
    let (_, scrape) = get(archive.metrics_addr(), "/metrics", &[]);
    promtool_check(&scrape);
    let series = "walvault_archive_ready_files{cluster=\"main\"}";
    assert_eq!(sample(&scrape, series), Some(5.0), "{scrape}");
    // Four segments wait behind the one pushed: the lag is their bytes (fake_segment's
    // segment size is the cluster's).
    let lag = "walvault_archive_lag_bytes{cluster=\"main\"}";
    let size = std::fs::metadata(&p).unwrap().len() as f64;
    assert_eq!(sample(&scrape, lag), Some(4.0 * size), "{scrape}");
    // Caught up: only the file being pushed is .ready.
    for n in 3..7 {
        std::fs::remove_file(status.join(format!("{}.ready", seg_name(1, n)))).unwrap();
    }
    let out = archive.archive_push(&push, &p);
    assert!(out.success(), "{}", out.describe());
    let (_, scrape) = get(archive.metrics_addr(), "/metrics", &[]);
    assert_eq!(sample(&scrape, series), Some(1.0), "{scrape}");
    assert_eq!(sample(&scrape, lag), Some(0.0), "{scrape}");
}
