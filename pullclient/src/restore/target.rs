//! Recovery targets: parsing them, and choosing the backup that can reach one.

use std::path::PathBuf;

use anyhow::{anyhow, bail, Result};
use walvault_protocol::core::pg::wal::Lsn;
use walvault_protocol::core::wire::backup::{BackupState, BackupSummary};

/// Where recovery should stop.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum RecoveryTarget {
    /// Replay all archived WAL.
    End,
    /// `recovery_target_time` (text as given, and as unix seconds).
    Time(String, i64),
    /// `recovery_target_lsn`.
    Lsn(Lsn),
    /// `recovery_target_xid`.
    Xid(String),
    /// `recovery_target_name` (a pg_create_restore_point name).
    Name(String),
    /// `recovery_target = 'immediate'`: stop at consistency.
    Immediate,
}

/// Parses `--target-time`: RFC 3339 or PostgreSQL's `YYYY-MM-DD HH:MM:SS[.ffffff]+TZ`; a
/// UTC offset is required (PostgreSQL would read a bare time in the restored server's
/// TimeZone, which the archive cannot know).
pub(crate) fn parse_target_time(text: &str) -> Result<i64> {
    let t = text.trim();
    let normalized = t
        .strip_suffix(" UTC")
        .or_else(|| t.strip_suffix(" GMT"))
        .map(|b| format!("{b}+00"))
        .unwrap_or_else(|| t.to_string());
    if let Ok(d) = chrono::DateTime::parse_from_rfc3339(&normalized) {
        return Ok(d.timestamp());
    }
    for f in [
        "%Y-%m-%d %H:%M:%S%.f%#z",
        "%Y-%m-%d %H:%M:%S%#z",
        "%Y-%m-%dT%H:%M:%S%.f%#z",
    ] {
        if let Ok(d) = chrono::DateTime::parse_from_str(&normalized, f) {
            return Ok(d.timestamp());
        }
    }
    bail!(
        "--target-time '{text}' is not a time with a UTC offset; write it like '2026-11-22 04:45:37+00' \
         or '2026-11-22T04:45:37.5+01:00'"
    )
}

/// Parses `--tablespace-map OID=DIR`.
pub(crate) fn parse_tablespace_mapping(text: &str) -> Result<(u32, PathBuf), String> {
    let (oid, dir) = text
        .split_once('=')
        .ok_or_else(|| format!("'{text}' is not OID=DIR"))?;
    let oid: u32 = oid.trim().parse().map_err(|_| {
        format!("'{oid}' is not a tablespace OID (see pg_tblspc/ or `archived backups show`)")
    })?;
    let dir = PathBuf::from(dir);
    if !dir.is_absolute() {
        return Err(format!(
            "tablespace directory '{}' must be absolute",
            dir.display()
        ));
    }
    Ok((oid, dir))
}

/// The backup to restore: `wanted` (an id or "latest"), else the newest usable backup
/// that ended before the target.
pub(crate) fn choose<'a>(
    backups: &'a [BackupSummary],
    wanted: Option<&str>,
    target: Option<&RecoveryTarget>,
    cluster: &str,
) -> Result<&'a BackupSummary> {
    if let Some(id) = wanted.filter(|w| *w != "latest") {
        let b = backups
            .iter()
            .find(|b| b.record.id == id)
            .ok_or_else(|| anyhow!("backup {id} does not exist in cluster '{cluster}' (see `archived backups list --cluster {cluster}`)"))?;
        if b.state != BackupState::Usable {
            bail!(
                "backup {id} is not usable yet: the WAL from {} to {} is not all archived",
                b.wal_start,
                b.wal_stop
            );
        }
        return Ok(b);
    }
    let mut usable = backups
        .iter()
        .rev()
        .filter(|b| b.state == BackupState::Usable);
    let chosen = match target {
        Some(RecoveryTarget::Time(text, t)) => usable.find(|b| b.record.stop_time <= *t).ok_or_else(|| {
            anyhow!("no usable backup of cluster '{cluster}' ended at or before {text}: nothing can be restored to that time")
        })?,
        Some(RecoveryTarget::Lsn(l)) => usable
            .find(|b| b.record.stop_lsn.parse::<Lsn>().is_ok_and(|s| s <= *l))
            .ok_or_else(|| anyhow!("no usable backup of cluster '{cluster}' ended at or before LSN {l}"))?,
        _ => usable.next().ok_or_else(|| {
            anyhow!("cluster '{cluster}' has no usable backup (take one with `pushclient backup`)")
        })?,
    };
    Ok(chosen)
}

#[cfg(test)]
mod tests {
    use super::*;
    use walvault_protocol::core::wire::backup::{BackupRecord, BackupState};

    fn summary(id: &str, stop_time: i64, stop_lsn: &str, usable: bool) -> BackupSummary {
        BackupSummary {
            record: BackupRecord {
                id: id.into(),
                label: String::new(),
                timeline: 1,
                stop_timeline: 1,
                start_lsn: "0/1000000".into(),
                stop_lsn: stop_lsn.into(),
                start_time: stop_time - 1,
                stop_time,
                pg_version: 150000,
                logical_bytes: 0,
                stored_bytes: 0,
                files: 0,
                chunks: 0,
            },
            state: if usable {
                BackupState::Usable
            } else {
                BackupState::IncompleteWal
            },
            wal_start: String::new(),
            wal_stop: String::new(),
            restorable_until: None,
            restorable_until_lsn: None,
        }
    }

    #[test]
    fn backup_choice_follows_the_target() {
        let l = [
            summary("a", 100, "0/3000000", true),
            summary("b", 200, "0/5000000", true),
            summary("c", 300, "0/7000000", false),
        ];
        assert_eq!(choose(&l, None, None, "m").unwrap().record.id, "b");
        assert_eq!(
            choose(&l, Some("latest"), None, "m").unwrap().record.id,
            "b"
        );
        assert_eq!(choose(&l, Some("a"), None, "m").unwrap().record.id, "a");
        assert!(choose(&l, Some("c"), None, "m").is_err());
        assert!(choose(&l, Some("zz"), None, "m").is_err());
        let t = RecoveryTarget::Time("x".into(), 150);
        assert_eq!(choose(&l, None, Some(&t), "m").unwrap().record.id, "a");
        let t = RecoveryTarget::Time("x".into(), 50);
        assert!(choose(&l, None, Some(&t), "m").is_err());
        let t = RecoveryTarget::Lsn("0/6000000".parse().unwrap());
        assert_eq!(choose(&l, None, Some(&t), "m").unwrap().record.id, "b");
    }

    #[test]
    fn target_times_need_an_offset() {
        assert_eq!(parse_target_time("1970-01-01 00:01:00+00").unwrap(), 60);
        assert_eq!(parse_target_time("1970-01-01 00:01:00.5+00").unwrap(), 60);
        assert_eq!(parse_target_time("1970-01-01 01:01:00+01:00").unwrap(), 60);
        assert_eq!(parse_target_time("1970-01-01T00:01:00Z").unwrap(), 60);
        assert_eq!(parse_target_time("1970-01-01 00:01:00 UTC").unwrap(), 60);
        assert!(parse_target_time("1970-01-01 00:01:00").is_err());
        assert!(parse_tablespace_mapping("16384=/srv/ts").is_ok());
        assert!(parse_tablespace_mapping("16384=rel").is_err());
        assert!(parse_tablespace_mapping("x=/a").is_err());
    }
}
