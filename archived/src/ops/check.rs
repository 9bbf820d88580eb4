//! `archived check`: the archive's named checks of one cluster (`Request::Check`), each
//! OK, WARNING or CRITICAL with what was found and a hint.
//!
//! Contract:
//!
//! - The checks, always in this order and under these names (scripts match on them):
//!   `catalog` (complete, not being rebuilt), `store_writable` (the store took a probe
//!   object within the last ten seconds, shared with `/readyz`), `disk_space` (free
//!   space of the data directory's filesystem and a local store's, statvfs, against
//!   `disk_free_warning_percent` / `disk_free_critical_percent`), `wal_continuity` (every
//!   segment from the oldest backup's first one, or the oldest segment without a backup,
//!   to the newest is in the catalog on some timeline, and the store holds every one of
//!   them: one listing of the cluster's WAL in the store, so a segment deleted behind
//!   archived's back is found), `wal_age` (the newest segment's time in the store against
//!   `[checks] wal_age_warning_secs` / `wal_age_critical_secs`), `backups` (usable
//!   backups, every segment of their WAL in the store, at least `min_backups`),
//!   `backup_age` (the newest usable backup's end against `backup_age_warning_hours` /
//!   `backup_age_critical_hours`), `retention` (the newest recorded retention run of the
//!   cluster: failed is CRITICAL, none or older than `retention_max_age_hours` a
//!   WARNING), `verify` (the newest recorded `archived verify` run: problems are
//!   CRITICAL, none or older than `verify_max_age_hours` a WARNING), `certificates` (the
//!   CA's and the server's certificate
//!   against `cert_warning_days` / `cert_critical_days`).
//! - Read from the catalog and the store at the time of the request, never from a cache
//!   older than the store probe's.
//! - Not checked yet: an object store's quota, certificates issued to clients (archived
//!   keeps no list of them).

use std::collections::{BTreeMap, BTreeSet};

use anyhow::Result;
use walvault_protocol::core::pg::wal::{Lsn, SegmentName, TimelineId, WalFileName};
use walvault_protocol::core::wire::backup::BackupState;
use walvault_protocol::core::wire::{CheckResult, CheckStatus, CheckValue};

use crate::config::ChecksConfig;
use crate::index::state;
use crate::ops::disk::{self, Volume};
use crate::service::Archive;
use crate::store::layout;

/// When a certificate of the server stops being valid.
#[derive(Clone, Debug)]
pub(crate) struct CertExpiry {
    /// Which one ("CA", "server").
    pub(crate) what: String,
    /// Its notAfter, Unix seconds.
    pub(crate) not_after: i64,
}

/// The notAfter of a PEM certificate, Unix seconds.
pub(crate) fn not_after(pem: &str) -> Result<i64> {
    walvault_protocol::net::pki::not_after(pem).map_err(|e| anyhow::anyhow!(e))
}

fn result(name: &str, status: CheckStatus, message: String, hint: Option<&str>) -> CheckResult {
    CheckResult {
        name: name.to_string(),
        status,
        message,
        hint: match status {
            CheckStatus::Ok => None,
            _ => hint.map(str::to_string),
        },
        value: None,
    }
}

/// OK, WARNING or CRITICAL for a value that must stay below its thresholds.
fn graded(value: i64, warning: i64, critical: i64) -> CheckStatus {
    if value >= critical {
        CheckStatus::Critical
    } else if value >= warning {
        CheckStatus::Warning
    } else {
        CheckStatus::Ok
    }
}

/// A duration for people: "42 s", "12 min", "3.5 h", "2.1 days".
pub(crate) fn age_text(secs: i64) -> String {
    match secs {
        s if s < 120 => format!("{s} s"),
        s if s < 7200 => format!("{} min", s / 60),
        s if s < 172_800 => format!("{:.1} h", s as f64 / 3600.0),
        s => format!("{:.1} days", s as f64 / 86400.0),
    }
}

/// Every check of `cluster` (module header), as of `now` (Unix seconds), with the
/// archive's `[checks]` thresholds and certificates.
pub(crate) async fn run(archive: &Archive, cluster: &str, now: i64) -> Result<Vec<CheckResult>> {
    let (cfg, certs) = (&archive.checks, &archive.certs);
    let mut out = Vec::new();
    out.push(match archive.index.is_complete() {
        Ok(true) => result("catalog", CheckStatus::Ok, "complete".into(), None),
        Ok(false) => result(
            "catalog",
            CheckStatus::Critical,
            "the catalog is being rebuilt from the store".into(),
            Some("wait for the rebuild to finish (archived's log); if no rebuild runs, stop archived and run `archived catalog rebuild`"),
        ),
        Err(e) => result(
            "catalog",
            CheckStatus::Critical,
            format!("the catalog cannot be read: {e:#}"),
            Some("stop archived and run `archived catalog rebuild` (the store holds everything)"),
        ),
    });
    out.push(match archive.probe_store().await {
        Ok(()) => result(
            "store_writable",
            CheckStatus::Ok,
            format!("{} takes writes", archive.store.describe()),
            None,
        ),
        Err(e) => result(
            "store_writable",
            CheckStatus::Critical,
            e,
            Some("archive_command fails while the store refuses writes and PostgreSQL keeps the WAL in pg_wal: fix the store (space, permissions, credentials) before pg_wal fills"),
        ),
    });
    out.push(disk_check(
        cfg,
        &archive.volumes,
        archive.store.local_root().is_none(),
    ));
    out.extend(wal_checks(archive, cfg, cluster, now).await?);
    out.extend(backup_checks(archive, cfg, cluster, now).await?);
    out.push(retention_check(archive, cfg, cluster, now)?);
    out.push(verify_check(archive, cfg, cluster, now)?);
    let mut all = certs.clone();
    if let Some(dir) = &archive.data_dir {
        // The client certificates of this cluster, and the admin ones (the timers').
        for c in crate::datadir::issued_certs(dir) {
            let id = &c.identity;
            if id.cluster == cluster || id.role == walvault_protocol::net::pki::Role::Admin {
                all.push(CertExpiry {
                    what: format!("client {}", id.peer()),
                    not_after: c.not_after,
                });
            }
        }
    }
    out.push(cert_check(cfg, &all, now));
    Ok(out)
}

async fn wal_checks(
    archive: &Archive,
    cfg: &ChecksConfig,
    cluster: &str,
    now: i64,
) -> Result<Vec<CheckResult>> {
    let index = &archive.index;
    let Some(newest) = index.last_segment(cluster)? else {
        let hint = Some("check PostgreSQL's archive_command (pg_stat_archiver.last_failed_wal, the server log) and `pushclient check`");
        return Ok(vec![
            result(
                "wal_continuity",
                CheckStatus::Warning,
                format!("cluster '{cluster}' has no WAL archived"),
                hint,
            ),
            result(
                "wal_age",
                CheckStatus::Warning,
                "no segment archived yet".into(),
                hint,
            ),
        ]);
    };
    let seg_size = index.segment_size(cluster)?;
    let continuity = continuity(index, cluster, &newest)?;
    let missing = continuity.missing();
    let Continuity {
        catalog,
        from,
        from_what,
        to,
        gaps,
    } = continuity;
    // The store's own listing: a segment deleted behind archived's back is a gap too.
    let mut stored: BTreeSet<u64> = BTreeSet::new();
    let prefix = format!("{cluster}/wal/");
    for key in archive.store.list(&prefix).await? {
        if let Some((_, WalFileName::Segment(s))) = layout::parse_wal_key(&key) {
            stored.insert(s.segno(seg_size));
        }
    }
    let name_of = |segno: u64| {
        let tli = catalog
            .get(&segno)
            .and_then(|t| t.iter().max().copied())
            .unwrap_or(newest.timeline);
        SegmentName::containing(tli, Lsn(segno * u64::from(seg_size)), seg_size).to_string()
    };
    let lost: Vec<u64> = (from..=to)
        .filter(|segno| catalog.contains_key(segno) && !stored.contains(segno))
        .collect();
    let span = format!("from {from_what} to {newest}");
    let continuity = if !lost.is_empty() {
        let names: Vec<String> = lost.iter().take(5).map(|&s| name_of(s)).collect();
        result(
            "wal_continuity",
            CheckStatus::Critical,
            format!(
                "{} segment(s) in the catalog are missing from the store ({}{}), {span}",
                lost.len(),
                names.join(", "),
                if lost.len() > 5 { ", ..." } else { "" }
            ),
            Some("a restore cannot pass a missing segment: if the primary still has them in pg_wal, push them again (`pushclient archive-push pg_wal/NAME`); then take a new backup, and find out what deleted objects from the store"),
        )
    } else if !gaps.is_empty() {
        let first = gaps
            .iter()
            .take(3)
            .map(|&(a, b)| match a == b {
                true => name_of(a),
                false => format!("{} .. {}", name_of(a), name_of(b)),
            })
            .collect::<Vec<_>>()
            .join(", ");
        result(
            "wal_continuity",
            CheckStatus::Critical,
            format!("{missing} segment(s) missing {span}: {first}"),
            Some("point-in-time recovery stops at the first gap: push the missing segments if the primary still has them (`pushclient archive-push`), then take a new backup so that recovery past the gap does not need them"),
        )
    } else {
        result(
            "wal_continuity",
            CheckStatus::Ok,
            format!("{} segments, no gap {span}", to - from + 1),
            None,
        )
    };
    let key = layout::wal_key(cluster, &WalFileName::Segment(newest));
    let age = match archive.store.modified(&key).await? {
        Some(t) => {
            let age = (now - t).max(0);
            let status = graded(
                age,
                cfg.wal_age_warning_secs as i64,
                cfg.wal_age_critical_secs as i64,
            );
            let mut r = result(
                "wal_age",
                status,
                format!("the newest segment {newest} was archived {} ago", age_text(age)),
                Some("archiving may have stopped: look at pg_stat_archiver (last_failed_wal, failed_count) and the server log on the primary; an idle primary archives only every archive_timeout"),
            );
            r.value = Some(CheckValue {
                label: "wal_age".into(),
                value: age,
                unit: "s".into(),
                warning: Some(cfg.wal_age_warning_secs as i64),
                critical: Some(cfg.wal_age_critical_secs as i64),
            });
            r
        }
        None => result(
            "wal_age",
            CheckStatus::Critical,
            format!("the newest segment {newest} of the catalog is not in the store"),
            Some("the store lost an object the catalog lists: see wal_continuity"),
        ),
    };
    Ok(vec![continuity, age])
}

/// WAL continuity as the catalog sees it: segment numbers from the oldest backup's first
/// segment (else the oldest segment) to `newest`, and the runs missing between them.
pub(crate) struct Continuity {
    /// Segment numbers in the catalog, and on which timelines.
    pub(crate) catalog: BTreeMap<u64, Vec<TimelineId>>,
    /// The first segment number that must be there.
    pub(crate) from: u64,
    /// What it is, for messages.
    pub(crate) from_what: String,
    /// The newest segment's number.
    pub(crate) to: u64,
    /// Missing runs, first and last segment number.
    pub(crate) gaps: Vec<(u64, u64)>,
}

impl Continuity {
    /// How many segments the gaps miss.
    pub(crate) fn missing(&self) -> u64 {
        self.gaps.iter().map(|(a, b)| b - a + 1).sum()
    }
}

/// The catalog's [`Continuity`] of `cluster`, whose newest segment is `newest`.
pub(crate) fn continuity(
    index: &crate::index::Index,
    cluster: &str,
    newest: &SegmentName,
) -> Result<Continuity> {
    let seg_size = index.segment_size(cluster)?;
    let mut catalog: BTreeMap<u64, Vec<TimelineId>> = BTreeMap::new();
    for (name, _) in index.wal_files(cluster)? {
        if let WalFileName::Segment(s) = name {
            catalog
                .entry(s.segno(seg_size))
                .or_default()
                .push(s.timeline);
        }
    }
    let oldest_backup = index
        .backups(cluster)?
        .iter()
        .filter_map(|b| state::wal_range(b, seg_size).ok())
        .map(|(first, _)| first)
        .min_by_key(|s| s.segno(seg_size));
    let to = newest.segno(seg_size);
    let (from, from_what) = match oldest_backup {
        Some(s) => (
            s.segno(seg_size),
            format!("{s} (the oldest backup's first)"),
        ),
        None => {
            let first = catalog.keys().next().copied().unwrap_or(to);
            (first, "the oldest segment".to_string())
        }
    };
    let mut gaps: Vec<(u64, u64)> = Vec::new();
    for segno in from..=to {
        if !catalog.contains_key(&segno) {
            match gaps.last_mut() {
                Some((_, end)) if *end + 1 == segno => *end = segno,
                _ => gaps.push((segno, segno)),
            }
        }
    }
    Ok(Continuity {
        catalog,
        from,
        from_what,
        to,
        gaps,
    })
}

async fn backup_checks(
    archive: &Archive,
    cfg: &ChecksConfig,
    cluster: &str,
    now: i64,
) -> Result<Vec<CheckResult>> {
    let mut usable = Vec::new();
    let mut unusable = 0;
    for r in archive.index.backups(cluster)? {
        let s = state::summarize(&archive.store, &archive.index, cluster, &r).await?;
        match s.state {
            BackupState::Usable => usable.push(s.record),
            _ => unusable += 1,
        }
    }
    let n = usable.len() as i64;
    let min = i64::from(cfg.min_backups);
    let mut count = result(
        "backups",
        if n < min {
            CheckStatus::Critical
        } else {
            CheckStatus::Ok
        },
        format!(
            "{n} usable backup(s) (at least {min} wanted){}",
            match unusable {
                0 => String::new(),
                u => format!(", {u} without all their WAL"),
            }
        ),
        Some("take a backup (`pushclient backup`); a backup whose WAL is incomplete cannot be restored: see wal_continuity"),
    );
    count.value = Some(CheckValue {
        label: "backups".into(),
        value: n,
        unit: String::new(),
        warning: None,
        critical: Some(min),
    });
    let warn = cfg.backup_age_warning_hours as i64 * 3600;
    let crit = cfg.backup_age_critical_hours as i64 * 3600;
    let age = match usable.iter().max_by_key(|b| b.stop_time) {
        Some(b) => {
            let age = (now - b.stop_time).max(0);
            let mut r = result(
                "backup_age",
                graded(age, warn, crit),
                format!("the newest usable backup {} ended {} ago", b.id, age_text(age)),
                Some("backups may have stopped: look at the backup job (its timer or cron and its log); a restore from an old backup replays all the WAL since"),
            );
            r.value = Some(CheckValue {
                label: "backup_age".into(),
                value: age,
                unit: "s".into(),
                warning: Some(warn),
                critical: Some(crit),
            });
            r
        }
        None => result(
            "backup_age",
            CheckStatus::Critical,
            "no usable backup".into(),
            Some("take a backup (`pushclient backup`)"),
        ),
    };
    Ok(vec![count, age])
}

fn retention_check(
    archive: &Archive,
    cfg: &ChecksConfig,
    cluster: &str,
    now: i64,
) -> Result<CheckResult> {
    let max = cfg.retention_max_age_hours as i64 * 3600;
    let timer = "run `archived retention run` daily (deploy/archived-retention.timer): without it WAL and backups grow without bound";
    let Some(run) = archive.index.retention_run(cluster)? else {
        return Ok(result(
            "retention",
            CheckStatus::Warning,
            "no retention run is recorded for this cluster (since the catalog was made)".into(),
            Some(timer),
        ));
    };
    if let Some(e) = &run.error {
        return Ok(result(
            "retention",
            CheckStatus::Critical,
            format!("the newest retention run, {} ago, failed: {e}", age_text(now - run.at)),
            Some("archived's log has the run's error (retention run); nothing was expired past the failure"),
        ));
    }
    let age = now - run.last_success.unwrap_or(run.at);
    let mut r = result(
        "retention",
        if age > max {
            CheckStatus::Warning
        } else {
            CheckStatus::Ok
        },
        format!("the newest retention run succeeded {} ago", age_text(age)),
        Some(timer),
    );
    r.value = Some(age_value("retention_age", age, max));
    Ok(r)
}

/// The perfdata of a run's age in seconds, WARNING past `max`.
fn age_value(label: &str, age: i64, max: i64) -> CheckValue {
    CheckValue {
        label: label.into(),
        value: age,
        unit: "s".into(),
        warning: Some(max),
        critical: None,
    }
}

/// `verify`: the newest recorded `archived verify` run of the cluster.
fn verify_check(
    archive: &Archive,
    cfg: &ChecksConfig,
    cluster: &str,
    now: i64,
) -> Result<CheckResult> {
    let max = cfg.verify_max_age_hours as i64 * 3600;
    let timer = "run `archived verify` weekly (deploy/archived-verify@.timer): it reads every object back, so damage in the store is found before a restore needs it";
    let Some(run) = archive.index.verify_run(cluster)? else {
        return Ok(result(
            "verify",
            CheckStatus::Warning,
            "no archived verify run is recorded for this cluster (since the catalog was made)"
                .into(),
            Some(timer),
        ));
    };
    let age = now - run.finished_at;
    if run.problems > 0 {
        return Ok(result(
            "verify",
            CheckStatus::Critical,
            format!(
                "the newest verify run ({}, {} ago) found {} problem(s): {}",
                run.scope,
                age_text(age),
                run.problems,
                run.first_problems.join("; ")
            ),
            Some("restores that need a damaged object fail: take a new base backup now, and find out what damaged the store (disk, bucket policy, another writer); archived verify --json lists every problem"),
        ));
    }
    let mut r = result(
        "verify",
        if age > max {
            CheckStatus::Warning
        } else {
            CheckStatus::Ok
        },
        format!(
            "the newest verify run ({}, {} ago) read {} WAL files, {} manifests, {} packs and {} chunks back: no problem",
            run.scope,
            age_text(age),
            run.wal_files,
            run.manifests,
            run.packs,
            run.chunks
        ),
        (age > max).then_some(timer),
    );
    r.value = Some(age_value("verify_age", age, max));
    Ok(r)
}

/// `disk_space`: the free space of every filesystem archived writes to.
fn disk_check(cfg: &ChecksConfig, volumes: &[Volume], object_store: bool) -> CheckResult {
    let mut status = CheckStatus::Ok;
    let mut found = Vec::new();
    for (v, space) in disk::volumes(volumes) {
        let what = match v.name {
            "data" => "data directory",
            _ => "store",
        };
        match space {
            Ok(s) => {
                let pct = s.free_percent();
                let grade = if pct < cfg.disk_free_critical_percent as f64 {
                    CheckStatus::Critical
                } else if pct < cfg.disk_free_warning_percent as f64 {
                    CheckStatus::Warning
                } else {
                    CheckStatus::Ok
                };
                status = status.max(grade);
                found.push(format!(
                    "{what} {}: {} free of {} ({pct:.0}%)",
                    v.path.display(),
                    disk::bytes_text(s.free),
                    disk::bytes_text(s.size)
                ));
            }
            Err(e) => {
                status = status.max(CheckStatus::Warning);
                found.push(format!(
                    "{what} {}: cannot read its free space: {e}",
                    v.path.display()
                ));
            }
        }
    }
    if object_store {
        found.push("the object store has no limit archived can read".into());
    }
    let hint = (status != CheckStatus::Ok).then_some(
        "pushes and stream appends fail once the data directory's or the local store's filesystem is full (PostgreSQL then keeps WAL in pg_wal): run retention, grow the filesystem, or move the store",
    );
    result("disk_space", status, found.join("; "), hint)
}

fn cert_check(cfg: &ChecksConfig, certs: &[CertExpiry], now: i64) -> CheckResult {
    let Some(first) = certs.iter().min_by_key(|c| c.not_after) else {
        return result(
            "certificates",
            CheckStatus::Warning,
            "the server's certificates could not be read".into(),
            Some("see archived's log at start-up"),
        );
    };
    let left = first.not_after - now;
    let warn = cfg.cert_warning_days as i64 * 86400;
    let crit = cfg.cert_critical_days as i64 * 86400;
    let status = if left <= crit {
        CheckStatus::Critical
    } else if left <= warn {
        CheckStatus::Warning
    } else {
        CheckStatus::Ok
    };
    let message = if left <= 0 {
        format!(
            "the {} certificate expired {} ago",
            first.what,
            age_text(-left)
        )
    } else {
        format!(
            "the {} certificate expires first, in {}",
            first.what,
            age_text(left)
        )
    };
    let hint = if first.what.starts_with("client ") {
        "that client cannot connect once it expires: `archived issue` a new config for it before then (--valid-days), install it, and remove the old certificate's file from DIR/tls/issued/ (a retired certificate's file too)"
    } else {
        "clients cannot connect once it expires: make a new server certificate (or a new CA and new client configs) before then, and restart archived"
    };
    let mut r = result("certificates", status, message, Some(hint));
    r.value = Some(CheckValue {
        label: "cert_days_left".into(),
        value: left.div_euclid(86400),
        unit: String::new(),
        warning: None,
        critical: None,
    });
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_space_is_graded_against_its_thresholds() {
        let dir = tempfile::tempdir().unwrap();
        let volumes = [Volume {
            name: "data",
            path: dir.path().to_path_buf(),
        }];
        let pct = disk::space(dir.path()).unwrap().free_percent() as u64;
        let cfg = |warning: u64, critical: u64| ChecksConfig {
            disk_free_warning_percent: warning,
            disk_free_critical_percent: critical,
            ..ChecksConfig::default()
        };
        let ok = disk_check(&cfg(0, 0), &volumes, false);
        assert_eq!(ok.status, CheckStatus::Ok, "{ok:?}");
        assert!(ok.message.starts_with("data directory "), "{ok:?}");
        assert!(ok.hint.is_none());
        let warn = disk_check(&cfg(pct + 2, 0), &volumes, true);
        assert_eq!(warn.status, CheckStatus::Warning, "{warn:?}");
        assert!(
            warn.message.contains("the object store has no limit"),
            "{warn:?}"
        );
        assert!(warn.hint.is_some());
        let crit = disk_check(&cfg(pct + 2, pct + 1), &volumes, false);
        assert_eq!(crit.status, CheckStatus::Critical, "{crit:?}");
        let gone = [Volume {
            name: "store",
            path: dir.path().join("missing"),
        }];
        let unreadable = disk_check(&cfg(0, 0), &gone, false);
        assert_eq!(unreadable.status, CheckStatus::Warning, "{unreadable:?}");
    }

    #[test]
    fn values_are_graded_against_their_thresholds() {
        assert_eq!(graded(10, 20, 30), CheckStatus::Ok);
        assert_eq!(graded(20, 20, 30), CheckStatus::Warning);
        assert_eq!(graded(31, 20, 30), CheckStatus::Critical);
    }

    #[test]
    fn certificates_expiring_soon_warn_then_fail() {
        let cfg = ChecksConfig::default();
        let now = 1_000_000_000;
        let at = |days: i64| {
            vec![
                CertExpiry {
                    what: "CA".into(),
                    not_after: now + 3650 * 86400,
                },
                CertExpiry {
                    what: "server".into(),
                    not_after: now + days * 86400 + 60,
                },
            ]
        };
        assert_eq!(cert_check(&cfg, &at(365), now).status, CheckStatus::Ok);
        let soon = cert_check(&cfg, &at(20), now);
        assert_eq!(soon.status, CheckStatus::Warning, "{soon:?}");
        assert!(soon.message.contains("server"), "{soon:?}");
        assert_eq!(cert_check(&cfg, &at(3), now).status, CheckStatus::Critical);
        let gone = cert_check(&cfg, &at(-2), now);
        assert!(gone.message.contains("expired"), "{gone:?}");
    }
}
