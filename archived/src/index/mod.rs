//! The sled catalog: an index of the object store, never the truth.
//!
//! # Trees
//!
//! ```text
//! tree "clusters"  <cluster>             -> JSON ClusterBinding   (clusters.rs)
//! tree "wal"       <cluster>/<file name> -> JSON WalEntry         (wal.rs: segments,
//!                                           partials, history, backup history)
//! tree "chunks"    <cluster>/<blake3>    -> JSON ChunkEntry       (chunks.rs)
//! tree "backups"   <cluster>/<ID>        -> JSON BackupRecord     (backups.rs)
//! tree "meta"      "complete"            -> "1" once the index covers the whole store
//! trees "audit*"                          the audit trail (audit.rs)
//! ```
//!
//! Each object kind has its module: its entry type, its tree's reads and writes, and the
//! `index_object` a rebuild (rebuild.rs) calls for every key of the store. Whether a
//! backup is usable is state.rs.
//!
//! # Rebuild
//!
//! The catalog is rebuilt from a listing of the store (plus one header read per object)
//! when its directory is missing, when sled cannot open it (it is moved aside to
//! `catalog.damaged.<unix time>`), when it lacks the `complete` mark (a rebuild was
//! interrupted), or on `archived catalog rebuild`. Writers always store the object first
//! and index it second; a crash between the two leaves an object without an entry, which
//! the client's retry (or a rebuild) indexes. Deleters go the other way: the entry is
//! removed and the catalog flushed before the object is deleted, so a crash never leaves
//! an entry whose object is gone. The catalog is flushed before a request is answered
//! for WAL, cluster bindings, manifests and packs; not for loose chunks (`PutChunk`,
//! written by the thousand): a lost entry of one costs nothing, since `PutBackup` finds
//! a loose chunk at its key in the store and a rebuild indexes it.
//!
//! The catalog is never the last word on what the store holds: an entry only says where
//! to look. A duplicate upload is acknowledged from the store's object, and a backup is
//! usable only when the store holds its WAL (service/wal.rs, state.rs).

pub(crate) mod audit;
pub(crate) mod backups;
pub(crate) mod chunks;
pub(crate) mod clusters;
pub(crate) mod rebuild;
pub(crate) mod state;
pub(crate) mod wal;

use std::path::Path;

use anyhow::{Context, Result};
use serde::Serialize;
use walvault_protocol::net::fsutil;

/// The catalog.
#[derive(Clone)]
pub(crate) struct Index {
    db: sled::Db,
    clusters: sled::Tree,
    wal: sled::Tree,
    chunks: sled::Tree,
    backups: sled::Tree,
    meta: sled::Tree,
    audit: sled::Tree,
    audit_files: sled::Tree,
    audit_unexported: sled::Tree,
    audit_batches: sled::Tree,
}

impl Index {
    /// Opens (or creates) the catalog at `dir` as it is, without rebuilding. The
    /// directory is made durable in its parent, and the files sled creates in it in the
    /// directory, before anything is indexed (sled fsyncs its files, not directories).
    pub(crate) fn open(dir: &Path) -> Result<Index> {
        fsutil::create_dir_durable(dir)
            .with_context(|| format!("cannot create catalog {}", dir.display()))?;
        let db = sled::Config::new()
            .path(dir)
            .open()
            .with_context(|| format!("cannot open catalog {}", dir.display()))?;
        fsutil::fsync_dir(dir)
            .with_context(|| format!("cannot fsync catalog {}", dir.display()))?;
        Ok(Index {
            clusters: db.open_tree("clusters")?,
            wal: db.open_tree("wal")?,
            chunks: db.open_tree("chunks")?,
            backups: db.open_tree("backups")?,
            meta: db.open_tree("meta")?,
            audit: db.open_tree("audit")?,
            audit_files: db.open_tree("audit_files")?,
            audit_unexported: db.open_tree("audit_unexported")?,
            audit_batches: db.open_tree("audit_batches")?,
            db,
        })
    }

    /// Whether the index covers the whole store (a rebuild completed).
    pub(crate) fn is_complete(&self) -> Result<bool> {
        Ok(self.meta.get("complete")?.is_some())
    }

    /// Marks the index as covering the whole store, or not (a rebuild starts).
    pub(crate) fn set_complete(&self, complete: bool) -> Result<()> {
        if complete {
            self.meta.insert("complete", "1")?;
        } else {
            self.meta.remove("complete")?;
        }
        Ok(())
    }

    /// Flushes everything to disk, on a blocking thread. Not sled's `flush_async`: in
    /// sled 0.34 concurrent `flush_async` calls can miss their wake-up and wait forever
    /// (sled issue #1308, fixed only on its unreleased main branch); with 32 parallel
    /// pushes archived stopped answering after ~1500 of them (tests/wal_scale.rs).
    pub(crate) async fn flush(&self) -> Result<()> {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || db.flush())
            .await
            .context("the catalog flush was cancelled")?
            .context("flushing the catalog")?;
        Ok(())
    }
}

/// The newest retention run that covered a cluster (not a dry run), for `archived check`
/// and the metrics. Kept in the catalog only: a catalog rebuild forgets it until the next
/// run.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub(crate) struct RetentionRun {
    /// When it ended, unix seconds.
    pub(crate) at: i64,
    /// Why it failed; `None` when it succeeded.
    pub(crate) error: Option<String>,
    /// When a run last succeeded, unix seconds.
    pub(crate) last_success: Option<i64>,
    /// What the last successful run removed.
    #[serde(default)]
    pub(crate) removed: Removed,
}

/// What a retention run removed from one cluster.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Removed {
    /// Backups expired.
    pub(crate) backups: u64,
    /// WAL files expired.
    pub(crate) wal_files: u64,
    /// Their stored bytes.
    pub(crate) wal_bytes: u64,
    /// Chunk bytes collected.
    pub(crate) chunk_bytes: u64,
}

impl Index {
    /// Records a retention run of `cluster` ending at `at` (`error` when it failed).
    /// `removed`: what it removed (a successful run).
    pub(crate) async fn record_retention(
        &self,
        cluster: &str,
        at: i64,
        error: Option<String>,
        removed: Option<Removed>,
    ) -> Result<()> {
        let key = format!("retention/{cluster}");
        let before: Option<RetentionRun> = get_json(&self.meta, &key)?;
        let (last_success, removed) = match (&error, removed) {
            (None, removed) => (Some(at), removed.unwrap_or_default()),
            (Some(_), _) => before
                .map(|b| (b.last_success, b.removed))
                .unwrap_or_default(),
        };
        put_json(
            &self.meta,
            &key,
            &RetentionRun {
                at,
                error,
                last_success,
                removed,
            },
        )?;
        self.flush().await
    }

    /// Records the newest `archived verify` run of `cluster` (replacing the one before),
    /// durably.
    pub(crate) async fn record_verify(
        &self,
        cluster: &str,
        run: &walvault_protocol::core::wire::admin::VerifyRun,
    ) -> Result<()> {
        put_json(&self.meta, &format!("verify/{cluster}"), run)?;
        self.flush().await
    }

    /// The newest `archived verify` run recorded for `cluster`.
    pub(crate) fn verify_run(
        &self,
        cluster: &str,
    ) -> Result<Option<walvault_protocol::core::wire::admin::VerifyRun>> {
        get_json(&self.meta, &format!("verify/{cluster}"))
    }

    /// The newest retention run recorded for `cluster`.
    pub(crate) fn retention_run(&self, cluster: &str) -> Result<Option<RetentionRun>> {
        get_json(&self.meta, &format!("retention/{cluster}"))
    }
}

/// What a rebuild found.
#[derive(Clone, Debug, Default, Serialize)]
pub(crate) struct RebuildSummary {
    /// Cluster bindings indexed.
    pub(crate) clusters: u64,
    /// WAL objects indexed.
    pub(crate) wal_files: u64,
    /// Objects whose header could not be read.
    pub(crate) unreadable: u64,
    /// Backups (manifests) indexed.
    pub(crate) backups: u64,
    /// Backup chunks indexed.
    pub(crate) chunks: u64,
    /// Audit trail records read back from their batches.
    pub(crate) audit_records: u64,
    /// Keys that are not ours.
    pub(crate) other: u64,
}

/// Reads a JSON entry of a tree.
fn get_json<T: serde::de::DeserializeOwned>(tree: &sled::Tree, key: &str) -> Result<Option<T>> {
    Ok(match tree.get(key)? {
        Some(v) => Some(serde_json::from_slice(&v)?),
        None => None,
    })
}

/// Writes a JSON entry of a tree (unflushed).
fn put_json<T: serde::Serialize>(tree: &sled::Tree, key: &str, value: &T) -> Result<()> {
    tree.insert(key, serde_json::to_vec(value)?)?;
    Ok(())
}

/// At most `limit` `(rest of key, entry)` of a tree under `<cluster>/` whose rest sorts
/// after `after` (from the start without it), in key order: a range scan from the
/// cursor, never a scan of what precedes it.
fn scan_cluster_after<T: serde::de::DeserializeOwned>(
    tree: &sled::Tree,
    cluster: &str,
    after: Option<&str>,
    limit: usize,
) -> Result<Vec<(String, T)>> {
    use std::ops::Bound;
    let prefix = format!("{cluster}/");
    let start = match after {
        Some(a) => Bound::Excluded(format!("{prefix}{a}").into_bytes()),
        None => Bound::Included(prefix.clone().into_bytes()),
    };
    // '0' is the byte after '/': the first key past the cluster's prefix.
    let end = Bound::Excluded(format!("{cluster}0").into_bytes());
    let mut out = Vec::new();
    for item in tree.range::<Vec<u8>, _>((start, end)).take(limit) {
        let (k, v) = item?;
        let k = String::from_utf8_lossy(&k);
        if let Some(rest) = k.strip_prefix(&prefix) {
            out.push((rest.to_string(), serde_json::from_slice(&v)?));
        }
    }
    Ok(out)
}

/// Every `(rest of key, entry)` of a tree under `<cluster>/`, in key order.
fn scan_cluster<T: serde::de::DeserializeOwned>(
    tree: &sled::Tree,
    cluster: &str,
) -> Result<Vec<(String, T)>> {
    let mut out = Vec::new();
    for item in tree.scan_prefix(format!("{cluster}/")) {
        let (k, v) = item?;
        let k = String::from_utf8_lossy(&k);
        if let Some((_, rest)) = k.split_once('/') {
            out.push((rest.to_string(), serde_json::from_slice(&v)?));
        }
    }
    Ok(out)
}
