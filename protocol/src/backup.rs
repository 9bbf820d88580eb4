//! Base backups as the archive stores them: the manifest format, chunking, backup ids
//! and a streaming ustar reader for PostgreSQL's BASE_BACKUP archives (pure code, no I/O).
//!
//! # Chunks
//!
//! Every regular file of a backup is cut at fixed offsets into [`BACKUP_CHUNK_SIZE`]
//! pieces (128 KiB: 16 PostgreSQL pages, so a chunk never splits a page). The size trades
//! the bytes a changed page costs (its whole chunk is stored again) against the number
//! of objects (8192 per GiB): updating 1% of pgbench_accounts re-stores about 3% of the
//! first backup's bytes at 128 KiB, 14% at 1 MiB. A chunk is named by the blake3
//! of its raw bytes and stored once per cluster, whatever the number of backups and
//! files that contain it (`<cluster>/chunks/<h[0..2]>/<blake3>.zst`, see
//! `archived/src/backups.rs`). Chunk `i` of a file covers bytes
//! `i * chunk_size .. min((i + 1) * chunk_size, size)`; only the last chunk is short, so
//! a manifest lists hashes and no sizes. Empty files have no chunk.
//!
//! # Manifest (`<cluster>/backups/<ID>/manifest.zst`)
//!
//! One JSON document ([`BackupManifest`]), zstd-compressed, behind the archive's usual
//! 64-byte object header. It is written last and create-only: the backup exists exactly
//! when its manifest does, and the archive refuses a manifest that names a chunk it does
//! not hold. Fields:
//!
//! ```text
//! format             1
//! id, cluster, label backup id (below), cluster name, --label
//! system_identifier  from IDENTIFY_SYSTEM
//! pg_version         server_version_num, e.g. 150004
//! timeline           timeline of the start LSN; stop_timeline of the stop LSN
//! start_lsn/stop_lsn "X/X" as PostgreSQL prints them
//! start_time/stop_time unix seconds (the backing-up client's clock)
//! chunk_size         bytes per chunk (128 KiB)
//! tablespaces        [{oid, location}] of the source (restore may remap them)
//! files              [{tablespace, path, kind, mode, size, mtime, link, chunks}]
//!                    tablespace null = PGDATA, else the tablespace's OID and the path
//!                    relative to its location; kind file|directory|symlink
//! backup_label       PostgreSQL's backup_label (also in files, as restored)
//! pg_backup_manifest PostgreSQL's backup_manifest, written verbatim into a restore so
//!                    pg_verifybackup can check it
//! stats              logical bytes, chunks, chunks and bytes newly stored by this backup
//! ```
//!
//! # Backup ids
//!
//! `YYYYMMDDTHHMMSSmmmZ` of the start time in UTC (e.g. `20261122T044537123Z`): ids sort
//! in start order, and two backups of one cluster cannot start in the same millisecond
//! through one archive without one of them being refused (create-only manifest).

use std::fmt;

use serde::{Deserialize, Serialize};

mod tar;
pub use tar::{tar_header, TarEntry, TarError, TarEvent, TarReader};

/// Bytes per chunk (new backups; readers use the manifest's `chunk_size`).
pub const BACKUP_CHUNK_SIZE: u64 = 128 << 10;
/// Largest raw chunk the archive accepts (room for a larger chunk size than today's). The
/// archive holds a chunk body in memory while it verifies it: at most this (plus zstd's
/// worst case) per request.
pub const MAX_CHUNK_SIZE: u64 = 1 << 20;
/// Largest manifest (raw JSON) either side accepts: room for ~1 million chunks.
pub const MAX_MANIFEST_SIZE: u64 = 256 << 20;
/// Hashes per `ChunksMissing` request: 4096 x 67 bytes of JSON stays far below the
/// 1 MiB frame limit.
pub const MAX_HASHES_PER_REQUEST: usize = 4096;
/// Most chunks one `GetChunks` request may ask for (bounds what the server buffers).
pub const MAX_CHUNKS_PER_GET: usize = 64;
/// Most chunks one `PutPack` request may carry.
pub const MAX_CHUNKS_PER_PACK: usize = 1024;
/// Most raw bytes one `PutPack` request may carry: the archive holds a pack's compressed
/// body in memory while it verifies every chunk of it.
pub const MAX_PACK_RAW_BYTES: u64 = 16 << 20;

/// One chunk of a `PutPack` request, in body order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackChunk {
    /// blake3 of the raw chunk, hex (its name).
    pub blake3: String,
    /// Raw size.
    pub raw_size: u64,
    /// Length of its zstd frame in the body.
    pub compressed_size: u64,
}
/// Manifest format written by this version.
pub const MANIFEST_FORMAT: u32 = 1;

/// The manifest of one backup.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupManifest {
    /// Format version ([`MANIFEST_FORMAT`]).
    pub format: u32,
    /// Backup id.
    pub id: String,
    /// Cluster name.
    pub cluster: String,
    /// Operator's label.
    pub label: String,
    /// pg_control system identifier.
    pub system_identifier: u64,
    /// server_version_num.
    pub pg_version: u32,
    /// Timeline of the start LSN.
    pub timeline: u32,
    /// Timeline of the stop LSN.
    pub stop_timeline: u32,
    /// Where replay of this backup starts (the backup's checkpoint redo point).
    pub start_lsn: String,
    /// Where the backup becomes consistent.
    pub stop_lsn: String,
    /// Start, unix seconds.
    pub start_time: i64,
    /// End, unix seconds.
    pub stop_time: i64,
    /// Bytes per chunk.
    pub chunk_size: u64,
    /// Tablespaces of the source cluster.
    pub tablespaces: Vec<TablespaceEntry>,
    /// Every directory, file and symlink of the backup.
    pub files: Vec<FileEntry>,
    /// PostgreSQL's backup_label.
    pub backup_label: String,
    /// PostgreSQL's backup_manifest (JSON text).
    pub pg_backup_manifest: String,
    /// Figures.
    pub stats: BackupStats,
}

/// A tablespace of the source cluster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TablespaceEntry {
    /// OID (the name of its symlink in pg_tblspc).
    pub oid: u32,
    /// Directory on the source.
    pub location: String,
}

/// What a manifest entry is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FileKind {
    /// Regular file.
    File,
    /// Directory.
    Directory,
    /// Symbolic link (pg_tblspc entries).
    Symlink,
}

/// One entry of a backup.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// `None`: in PGDATA; `Some(oid)`: in that tablespace.
    pub tablespace: Option<u32>,
    /// Path relative to PGDATA or to the tablespace location.
    pub path: String,
    /// Kind.
    pub kind: FileKind,
    /// Permission bits.
    pub mode: u32,
    /// Size in bytes (files).
    pub size: u64,
    /// Modification time, unix seconds.
    pub mtime: i64,
    /// Link target (symlinks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link: Option<String>,
    /// blake3 of each chunk, hex (files).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub chunks: Vec<String>,
}

/// Figures of one backup.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupStats {
    /// Bytes of all files.
    pub logical_bytes: u64,
    /// Chunks referenced.
    pub chunks: u64,
    /// Chunks this backup sent because the archive lacked them.
    pub new_chunks: u64,
    /// Stored (compressed) bytes of those chunks.
    pub new_stored_bytes: u64,
}

impl BackupManifest {
    /// Every chunk hash the manifest references (with repetitions).
    pub fn chunk_hashes(&self) -> impl Iterator<Item = &str> {
        self.files
            .iter()
            .flat_map(|f| f.chunks.iter().map(String::as_str))
    }

    /// Checks everything a reader relies on: id, paths, chunk hashes and counts.
    pub fn validate(&self) -> Result<(), String> {
        if self.format != MANIFEST_FORMAT {
            return Err(format!(
                "manifest format {} is not supported (this version reads {MANIFEST_FORMAT})",
                self.format
            ));
        }
        validate_backup_id(&self.id)?;
        crate::wire::validate_cluster_name(&self.cluster)?;
        if self.chunk_size == 0 || self.chunk_size > MAX_CHUNK_SIZE {
            return Err(format!("chunk size {} is out of range", self.chunk_size));
        }
        for lsn in [&self.start_lsn, &self.stop_lsn] {
            lsn.parse::<crate::wal::Lsn>()
                .map_err(|_| format!("'{lsn}' is not an LSN"))?;
        }
        for t in &self.tablespaces {
            if !t.location.starts_with('/') {
                return Err(format!(
                    "tablespace {} has location {:?}, not an absolute path",
                    t.oid, t.location
                ));
            }
        }
        for f in &self.files {
            validate_relative_path(&f.path).map_err(|e| format!("file {:?}: {e}", f.path))?;
            // Restores write through paths: nothing may lead them out of PGDATA or a
            // tablespace, so the only links are pg_tblspc/<OID>, and no entry lies below one.
            let in_tblspc = f.tablespace.is_none() && f.path.starts_with("pg_tblspc/");
            let tblspc_link = in_tblspc
                && f.path["pg_tblspc/".len()..]
                    .bytes()
                    .all(|b| b.is_ascii_digit());
            if (f.kind == FileKind::Symlink) != tblspc_link || (in_tblspc && !tblspc_link) {
                return Err(format!(
                    "entry {} is not allowed: symbolic links are allowed only as pg_tblspc/<OID>, \
                     and nothing below them",
                    f.path
                ));
            }
            if let Some(oid) = f.tablespace {
                if !self.tablespaces.iter().any(|t| t.oid == oid) {
                    return Err(format!("file {} names unknown tablespace {oid}", f.path));
                }
            }
            let want = match f.kind {
                FileKind::File => chunk_count(f.size, self.chunk_size),
                _ => 0,
            };
            if f.chunks.len() as u64 != want {
                return Err(format!(
                    "file {} of {} bytes lists {} chunks, expected {want}",
                    f.path,
                    f.size,
                    f.chunks.len()
                ));
            }
            for h in &f.chunks {
                validate_chunk_hash(h).map_err(|e| format!("file {}: {e}", f.path))?;
            }
            if f.kind == FileKind::Symlink && f.link.as_deref().unwrap_or("").is_empty() {
                return Err(format!("symlink {} has no target", f.path));
            }
        }
        Ok(())
    }
}

/// Number of chunks of a file of `size` bytes.
pub fn chunk_count(size: u64, chunk_size: u64) -> u64 {
    size.div_ceil(chunk_size.max(1))
}

/// Byte range of chunk `index` of a file of `size` bytes.
pub fn chunk_range(size: u64, chunk_size: u64, index: u64) -> std::ops::Range<u64> {
    let start = (index * chunk_size).min(size);
    start..(start + chunk_size).min(size)
}

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

/// Paths inside a backup: relative, no `.`/`..`/empty components, no NUL.
pub fn validate_relative_path(path: &str) -> Result<(), String> {
    if path.is_empty() || path.starts_with('/') || path.contains('\0') || path.len() > 4096 {
        return Err("not a relative path".into());
    }
    if path
        .split('/')
        .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return Err("path has an empty, '.' or '..' component".into());
    }
    Ok(())
}

/// The backup id for a backup started at `unix_millis`.
pub fn backup_id_at(unix_millis: i64) -> String {
    let secs = unix_millis.div_euclid(1000);
    let millis = unix_millis.rem_euclid(1000);
    let (y, mo, d, h, mi, s) = civil_from_unix(secs);
    format!("{y:04}{mo:02}{d:02}T{h:02}{mi:02}{s:02}{millis:03}Z")
}

/// UTC calendar fields of a unix time (Howard Hinnant's days-to-civil).
pub fn civil_from_unix(secs: i64) -> (i64, u32, u32, u32, u32, u32) {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (
        y,
        m,
        d,
        (rem / 3600) as u32,
        ((rem % 3600) / 60) as u32,
        (rem % 60) as u32,
    )
}

/// A unix time as `YYYY-MM-DD HH:MM:SS+00` (a form PostgreSQL's recovery_target_time accepts).
pub fn format_unix_utc(secs: i64) -> String {
    let (y, mo, d, h, mi, s) = civil_from_unix(secs);
    format!("{y:04}-{mo:02}-{d:02} {h:02}:{mi:02}:{s:02}+00")
}

/// Whether a backup's WAL is all in the archive.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BackupState {
    /// Every segment from start to stop LSN is archived: the backup restores.
    Usable,
    /// Some WAL between start and stop LSN is not (yet) archived.
    IncompleteWal,
}

impl fmt::Display for BackupState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackupState::Usable => "usable",
            BackupState::IncompleteWal => "incomplete-wal",
        })
    }
}

/// A backup as `archived backups list/show` and restores see it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupSummary {
    /// Backup id.
    pub id: String,
    /// Label.
    pub label: String,
    /// Timeline of the start LSN.
    pub timeline: u32,
    /// Start LSN.
    pub start_lsn: String,
    /// Stop LSN.
    pub stop_lsn: String,
    /// Start, unix seconds.
    pub start_time: i64,
    /// Stop, unix seconds.
    pub stop_time: i64,
    /// server_version_num of the source.
    pub pg_version: u32,
    /// Bytes of all files.
    pub logical_bytes: u64,
    /// Bytes this backup added to the store (new chunks and the manifest).
    pub stored_bytes: u64,
    /// Files (regular) in the backup.
    pub files: u64,
    /// Chunks referenced.
    pub chunks: u64,
    /// WAL state.
    pub state: BackupState,
    /// First WAL segment the backup needs.
    pub wal_start: String,
    /// Last WAL segment the backup needs.
    pub wal_stop: String,
    /// The window of time this backup restores to: from `stop_time` to this (the
    /// archive time of the last WAL segment archived without a gap after the backup,
    /// on its timeline), unix seconds; `None` while the backup's own WAL is incomplete.
    pub restorable_until: Option<i64>,
    /// The last LSN reachable from this backup through archived WAL without a gap (end
    /// of the last contiguous segment on its timeline).
    pub restorable_until_lsn: Option<String>,
}

/// What `archived retention run` did (or would do, with `dry_run`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetentionReport {
    /// True when nothing was deleted.
    pub dry_run: bool,
    /// Per cluster.
    pub clusters: Vec<ClusterRetention>,
}

/// Retention of one cluster.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterRetention {
    /// Cluster name.
    pub cluster: String,
    /// Backups kept.
    pub kept_backups: Vec<String>,
    /// Backups expired.
    pub expired_backups: Vec<String>,
    /// WAL files expired.
    pub expired_wal: Vec<String>,
    /// Bytes of those WAL files.
    pub expired_wal_bytes: u64,
    /// Chunks collected (unreferenced and past the grace period).
    pub collected_chunks: u64,
    /// Bytes of those chunks.
    pub collected_chunk_bytes: u64,
    /// Unreferenced chunks still within the grace period.
    pub chunks_in_grace: u64,
    /// Packs deleted (every chunk in them collected).
    #[serde(default)]
    pub collected_packs: u64,
    /// Why nothing or less than the policy asked was expired, for the operator.
    pub notes: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_paths_and_chunks() {
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
        assert_eq!(chunk_count(0, 4), 0);
        assert_eq!(chunk_count(9, 4), 3);
        assert_eq!(chunk_range(9, 4, 2), 8..9);
        assert!(validate_chunk_hash(&"a".repeat(64)).is_ok());
        assert!(validate_chunk_hash(&"A".repeat(64)).is_err());
    }
}
