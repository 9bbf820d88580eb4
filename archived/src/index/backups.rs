//! Backups in the catalog: tree "backups", `<cluster>/<ID>` -> JSON `BackupRecord`
//! (walvault_protocol's `wire::backup`: the manifest's figures without its file list,
//! what listings show).
//!
//! A rebuild reads, verifies and parses every manifest (`<cluster>/backups/<ID>/
//! manifest.zst`, store/layout.rs) to make its record.

use anyhow::{Context, Result};
use walvault_protocol::core::format::manifest::{BackupManifest, FileKind, MAX_MANIFEST_SIZE};
use walvault_protocol::core::wire::backup::BackupRecord;

use super::{Index, RebuildSummary};
use crate::store::{layout, Store, HEADER_LEN};

/// The catalog record of a backup whose manifest takes `manifest_stored` bytes.
pub(crate) fn record_of(m: &BackupManifest, manifest_stored: u64) -> BackupRecord {
    BackupRecord {
        id: m.id.clone(),
        label: m.label.clone(),
        timeline: m.timeline,
        stop_timeline: m.stop_timeline,
        start_lsn: m.start_lsn.clone(),
        stop_lsn: m.stop_lsn.clone(),
        start_time: m.start_time,
        stop_time: m.stop_time,
        pg_version: m.pg_version,
        logical_bytes: m.stats.logical_bytes,
        stored_bytes: m.stats.new_stored_bytes + manifest_stored,
        files: m.files.iter().filter(|f| f.kind == FileKind::File).count() as u64,
        chunks: m.stats.chunks,
    }
}

fn key(cluster: &str, id: &str) -> String {
    format!("{cluster}/{id}")
}

impl Index {
    /// Records a backup (unflushed).
    pub(crate) fn put_backup(&self, cluster: &str, r: &BackupRecord) -> Result<()> {
        super::put_json(&self.backups, &key(cluster, &r.id), r)
    }

    /// Forgets a backup (unflushed).
    pub(crate) fn remove_backup(&self, cluster: &str, id: &str) -> Result<()> {
        self.backups.remove(key(cluster, id))?;
        Ok(())
    }

    /// Every backup of a cluster, oldest first.
    pub(crate) fn backups(&self, cluster: &str) -> Result<Vec<BackupRecord>> {
        let mut out: Vec<BackupRecord> =
            super::scan_cluster::<BackupRecord>(&self.backups, cluster)?
                .into_iter()
                .map(|(_, r)| r)
                .collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }
}

impl Index {
    /// The record of one backup.
    pub(crate) fn backup(&self, cluster: &str, id: &str) -> Result<Option<BackupRecord>> {
        super::get_json(&self.backups, &key(cluster, id))
    }

    /// At most `limit` backups of a cluster whose id sorts after `after` (from the
    /// oldest without it), oldest first: a range scan from the cursor.
    pub(crate) fn backups_after(
        &self,
        cluster: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<BackupRecord>> {
        Ok(
            super::scan_cluster_after::<BackupRecord>(&self.backups, cluster, after, limit)?
                .into_iter()
                .map(|(_, r)| r)
                .collect(),
        )
    }
}

/// Reads, verifies and parses a manifest; also returns its stored size.
pub(crate) async fn read_manifest(
    store: &Store,
    cluster: &str,
    id: &str,
) -> Result<Option<(BackupManifest, u64)>> {
    let key = layout::manifest_key(cluster, id);
    let Some((raw, header)) = store
        .read_verified(&key, "manifest", MAX_MANIFEST_SIZE)
        .await?
    else {
        return Ok(None);
    };
    let m: BackupManifest =
        serde_json::from_slice(&raw).with_context(|| format!("{key}: unreadable manifest"))?;
    m.validate()
        .map_err(|e| anyhow::anyhow!("{key}: invalid manifest: {e}"))?;
    Ok(Some((m, HEADER_LEN as u64 + header.compressed_size)))
}

/// Empties the tree (start of a rebuild).
pub(super) fn clear(index: &Index) -> Result<()> {
    index.backups.clear()?;
    Ok(())
}

/// Indexes `key` during a rebuild if it is a manifest; `Ok(false)` if it is not one.
pub(super) async fn index_object(
    index: &Index,
    store: &Store,
    key: &str,
    summary: &mut RebuildSummary,
) -> Result<bool> {
    let Some((cluster, id)) = layout::parse_manifest_key(key) else {
        return Ok(false);
    };
    match read_manifest(store, &cluster, &id).await {
        Ok(Some((m, stored))) => {
            index.put_backup(&cluster, &record_of(&m, stored))?;
            summary.backups += 1;
        }
        Ok(None) => {}
        Err(e) => {
            summary.unreadable += 1;
            tracing::error!(%key, error = %format!("{e:#}"), "unreadable backup manifest; backup not listed");
        }
    }
    Ok(true)
}
