//! Messages of the backup requests (pure code): chunks offered and stored, backups as
//! listings show them, and the limits that keep every request and answer bounded.

use std::fmt;

use serde::{Deserialize, Serialize};

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

/// A committed backup as its manifest describes it, without the file list: what the
/// archive's catalog keeps per backup, and the first part of every [`BackupSummary`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupRecord {
    /// Backup id.
    pub id: String,
    /// Label.
    pub label: String,
    /// Timeline of the start LSN.
    pub timeline: u32,
    /// Timeline of the stop LSN (later than `timeline` when the backup spans a
    /// promotion); 0 in answers of archived versions that did not list it.
    #[serde(default)]
    pub stop_timeline: u32,
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
}

/// A backup as `archived backups list/show` and restores see it: its record and its
/// state in the archive now.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupSummary {
    /// What the manifest says (flattened: the JSON has its fields at the top level).
    #[serde(flatten)]
    pub record: BackupRecord,
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
