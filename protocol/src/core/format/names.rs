//! Names the archive accepts from clients: cluster names, backup ids, chunk names and
//! paths inside a backup (pure code). Each becomes part of a storage key or a file path,
//! so each is kept to a conservative alphabet and checked before it is used.
//!
//! # Backup ids
//!
//! `YYYYMMDDTHHMMSSmmmZ` of the start time in UTC (e.g. `20261122T044537123Z`): ids sort
//! in start order, and two backups of one cluster cannot start in the same millisecond
//! through one archive without one of them being refused (create-only manifest).

/// Backup ids: 1-64 of `[A-Za-z0-9._-]`, not starting with `.` or `-`.
pub fn validate_backup_id(id: &str) -> Result<(), String> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && !id.starts_with(['.', '-'])
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid backup id {:?}: ids are 1-64 letters, digits, '.', '_' or '-' (see `archived backups list`)",
            id.escape_debug().to_string()
        ))
    }
}

/// Chunk names: 64 lower-case hex digits.
pub fn validate_chunk_hash(hash: &str) -> Result<(), String> {
    if hash.len() == 64 && hash.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        Ok(())
    } else {
        Err(format!(
            "invalid chunk name {:?}: expected 64 lower-case hex digits",
            hash.escape_debug().to_string()
        ))
    }
}

pub use crate::core::pg::tar::validate_relative_path;

/// The backup id for a backup started at `unix_millis` (`YYYYMMDDTHHMMSSmmmZ`, UTC).
pub fn backup_id_at(unix_millis: i64) -> String {
    match chrono::DateTime::from_timestamp_millis(unix_millis) {
        Some(t) => t.format("%Y%m%dT%H%M%S%3fZ").to_string(),
        None => format!("{unix_millis}"),
    }
}

/// A unix time as `YYYY-MM-DD HH:MM:SS+00` (a form PostgreSQL's recovery_target_time accepts).
pub fn format_unix_utc(secs: i64) -> String {
    match chrono::DateTime::from_timestamp(secs, 0) {
        Some(t) => t.format("%Y-%m-%d %H:%M:%S+00").to_string(),
        None => format!("@{secs}"),
    }
}

/// Cluster names become the first component of every storage key, so they are kept to
/// a conservative alphabet: 1-63 of `[A-Za-z0-9_-]`, not starting with `-`.
pub fn validate_cluster_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && !name.starts_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid cluster name {:?}: use 1-63 letters, digits, '_' or '-' (not starting with '-')",
            name.escape_debug().to_string()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_paths() {
        assert_eq!(backup_id_at(0), "19700101T000000000Z");
        assert_eq!(backup_id_at(1_700_000_000_123), "20231114T221320123Z");
        assert!(validate_backup_id(&backup_id_at(1_700_000_000_123)).is_ok());
        for bad in ["", ".x", "-x", "a/b", "a\0", &"x".repeat(65)] {
            assert!(validate_backup_id(bad).is_err(), "{bad:?}");
        }
        assert_eq!(format_unix_utc(86_400 * 365), "1971-01-01 00:00:00+00");
        for bad in ["", "/x", "a//b", "a/../b", "./a", "a/"] {
            assert!(validate_relative_path(bad).is_err(), "{bad:?}");
        }
        assert!(validate_chunk_hash(&"a".repeat(64)).is_ok());
        assert!(validate_chunk_hash(&"A".repeat(64)).is_err());
    }

    #[test]
    fn cluster_names() {
        assert!(validate_cluster_name("main-db_1").is_ok());
        for bad in ["", "../x", "a/b", "-x", "a\0b", ".", "..", &"x".repeat(64)] {
            assert!(validate_cluster_name(bad).is_err(), "{bad:?}");
        }
    }
}
