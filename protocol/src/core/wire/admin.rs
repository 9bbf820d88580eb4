//! Answers of the admin requests (pure code): what a retention run did; what a verify
//! run found.

use serde::{Deserialize, Serialize};

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
    /// WAL files expired, per timeline: counts and the first and last names, never every
    /// name (a first run on a large archive expires tens of thousands, and the answer
    /// must fit in one frame).
    pub expired_wal: Vec<ExpiredWal>,
    /// WAL files expired, all timelines.
    #[serde(default)]
    pub expired_wal_files: u64,
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

/// The WAL files a retention run expired on one timeline.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExpiredWal {
    /// The timeline.
    pub timeline: u32,
    /// Files expired (segments, partial segments, backup history files).
    pub files: u64,
    /// Bytes of those files in the store.
    pub bytes: u64,
    /// The first of them in name order.
    pub first: String,
    /// The last of them in name order.
    pub last: String,
}

impl ClusterRetention {
    /// Counts an expired WAL file of `timeline` (files come in name order).
    pub fn add_expired_wal(&mut self, timeline: u32, name: &str, bytes: u64) {
        self.expired_wal_files += 1;
        self.expired_wal_bytes += bytes;
        match self.expired_wal.iter_mut().find(|e| e.timeline == timeline) {
            Some(e) => {
                e.files += 1;
                e.bytes += bytes;
                if name < e.first.as_str() {
                    e.first = name.to_string();
                }
                if name > e.last.as_str() {
                    e.last = name.to_string();
                }
            }
            None => self.expired_wal.push(ExpiredWal {
                timeline,
                files: 1,
                bytes,
                first: name.to_string(),
                last: name.to_string(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expired_wal_is_counted_per_timeline_with_its_first_and_last_names() {
        let mut c = ClusterRetention::default();
        c.add_expired_wal(1, "000000010000000000000003", 10);
        c.add_expired_wal(1, "000000010000000000000001", 10);
        c.add_expired_wal(2, "000000020000000000000004", 5);
        c.add_expired_wal(1, "000000010000000000000002.00000028.backup", 1);
        assert_eq!(c.expired_wal_files, 4);
        assert_eq!(c.expired_wal_bytes, 26);
        assert_eq!(
            c.expired_wal,
            [
                ExpiredWal {
                    timeline: 1,
                    files: 3,
                    bytes: 21,
                    first: "000000010000000000000001".into(),
                    last: "000000010000000000000003".into(),
                },
                ExpiredWal {
                    timeline: 2,
                    files: 1,
                    bytes: 5,
                    first: "000000020000000000000004".into(),
                    last: "000000020000000000000004".into(),
                },
            ]
        );
    }
}

/// What one `archived verify` run of a cluster found (recorded in the catalog through
/// [`crate::core::wire::Request::RecordVerify`]; `archived check` and `/metrics` read it).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyRun {
    /// When the run ended (Unix seconds, the verifying host's clock).
    pub finished_at: i64,
    /// What it read: "wal", "backups" or "wal and backups".
    pub scope: String,
    /// WAL files read back.
    pub wal_files: u64,
    /// Backup manifests read back.
    pub manifests: u64,
    /// Packs read back.
    pub packs: u64,
    /// Loose chunks read back.
    pub chunks: u64,
    /// Problems found.
    pub problems: u64,
    /// The first problems (at most [`VERIFY_PROBLEMS_KEPT`]), "object: problem".
    pub first_problems: Vec<String>,
}

/// How many problems a recorded verify run keeps by name.
pub const VERIFY_PROBLEMS_KEPT: usize = 10;
