//! Base backups as the archive stores them: the manifest format and chunking (pure
//! code, no I/O). Backup ids are in [`crate::core::format::names`], PostgreSQL's tar
//! stream in [`crate::core::pg::tar`].
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
//! `archived/src/store/layout.rs`). Chunk `i` of a file covers bytes
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
//! start_time/stop_time unix seconds on the clock of the PostgreSQL server backed up
//!                    (stop_time rounded up; older pushclients used their own clock)
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

use serde::{Deserialize, Serialize};

use crate::core::format::names::{validate_backup_id, validate_chunk_hash, validate_relative_path};

/// Bytes per chunk (new backups; readers use the manifest's `chunk_size`).
pub const BACKUP_CHUNK_SIZE: u64 = 128 << 10;
/// Largest raw chunk the archive accepts (room for a larger chunk size than today's). The
/// archive holds a chunk body in memory while it verifies it: at most this (plus zstd's
/// worst case) per request.
pub const MAX_CHUNK_SIZE: u64 = 1 << 20;
/// Largest manifest (raw JSON) either side accepts: room for ~1 million chunks.
pub const MAX_MANIFEST_SIZE: u64 = 256 << 20;
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

/// What a manifest entry is: the kind of the tar member it came from.
pub use crate::core::pg::tar::FileKind;

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
        crate::core::format::names::validate_cluster_name(&self.cluster)?;
        if self.chunk_size == 0 || self.chunk_size > MAX_CHUNK_SIZE {
            return Err(format!("chunk size {} is out of range", self.chunk_size));
        }
        let parse = |lsn: &str| {
            lsn.parse::<crate::core::pg::wal::Lsn>()
                .map_err(|_| format!("'{lsn}' is not an LSN"))
        };
        let (start, stop) = (parse(&self.start_lsn)?, parse(&self.stop_lsn)?);
        if start > stop {
            return Err(format!(
                "start LSN {start} is after stop LSN {stop}: not a backup PostgreSQL made"
            ));
        }
        if self.timeline == 0 || self.timeline > self.stop_timeline {
            return Err(format!(
                "start timeline {} is not a timeline at or before stop timeline {}",
                self.timeline, self.stop_timeline
            ));
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

#[cfg(test)]
mod tests {
    use super::*;

    fn minimal() -> BackupManifest {
        BackupManifest {
            format: MANIFEST_FORMAT,
            id: "20261122T044537123Z".into(),
            cluster: "main".into(),
            label: String::new(),
            system_identifier: 1,
            pg_version: 150000,
            timeline: 1,
            stop_timeline: 1,
            start_lsn: "0/2000028".into(),
            stop_lsn: "0/2000100".into(),
            start_time: 0,
            stop_time: 0,
            chunk_size: BACKUP_CHUNK_SIZE,
            tablespaces: Vec::new(),
            files: Vec::new(),
            backup_label: String::new(),
            pg_backup_manifest: String::new(),
            stats: BackupStats::default(),
        }
    }

    #[test]
    fn lsns_and_timelines_out_of_order_are_refused() {
        assert_eq!(minimal().validate(), Ok(()));
        let backwards = BackupManifest {
            start_lsn: "0/3000000".into(),
            ..minimal()
        };
        assert!(backwards.validate().unwrap_err().contains("after stop LSN"));
        let timelines = BackupManifest {
            timeline: 2,
            ..minimal()
        };
        assert!(timelines.validate().unwrap_err().contains("timeline"));
        let zero = BackupManifest {
            timeline: 0,
            stop_timeline: 0,
            ..minimal()
        };
        assert!(zero.validate().is_err());
    }

    #[test]
    fn chunks() {
        assert_eq!(chunk_count(0, 4), 0);
        assert_eq!(chunk_count(9, 4), 3);
        assert_eq!(chunk_range(9, 4, 2), 8..9);
    }
}
