//! WAL files in the catalog: tree "wal", `<cluster>/<file name>` -> JSON [`WalEntry`].
//!
//! Segment names sort in WAL order within a timeline, so a prefix scan of `<cluster>/`
//! yields each timeline's segments in order, and a page of the listing is a range scan
//! from its cursor's key.

use anyhow::Result;
use serde::{Deserialize, Serialize};
use walvault_protocol::core::pg::wal::{SegmentName, WalFileName};
use walvault_protocol::core::wire::paging::{wal_listing_page, WalFileEntry};
use walvault_protocol::core::wire::WalListing;

use super::{Index, RebuildSummary};
use crate::store::{layout, Store, HEADER_LEN};

/// Catalog entry of one WAL object.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct WalEntry {
    /// Raw size.
    pub(crate) raw_size: u64,
    /// blake3 of the raw bytes, hex.
    pub(crate) blake3: String,
    /// Stored bytes (header + zstd frame).
    pub(crate) stored_size: u64,
}

fn key(cluster: &str, name: &WalFileName) -> String {
    format!("{cluster}/{name}")
}

impl Index {
    /// Records a WAL object without flushing (a rebuild, a synthetic catalog).
    pub(crate) fn put_wal_unflushed(
        &self,
        cluster: &str,
        name: &WalFileName,
        entry: &WalEntry,
    ) -> Result<()> {
        super::put_json(&self.wal, &key(cluster, name), entry)
    }

    /// Records a WAL object and flushes the catalog to disk before returning.
    pub(crate) async fn put_wal(
        &self,
        cluster: &str,
        name: &WalFileName,
        entry: &WalEntry,
    ) -> Result<()> {
        self.put_wal_unflushed(cluster, name, entry)?;
        self.flush().await
    }

    /// The entry of a WAL file.
    pub(crate) fn wal(&self, cluster: &str, name: &WalFileName) -> Result<Option<WalEntry>> {
        super::get_json(&self.wal, &key(cluster, name))
    }

    /// Whether the catalog holds a segment.
    pub(crate) fn has_segment(&self, cluster: &str, seg: &SegmentName) -> Result<bool> {
        Ok(self
            .wal
            .contains_key(key(cluster, &WalFileName::Segment(*seg)))?)
    }

    /// The newest complete segment of a cluster: the last in name order (the highest
    /// timeline's highest segment), found by a reverse scan that passes over the few
    /// history, backup history and `.partial` files that sort after it.
    pub(crate) fn last_segment(&self, cluster: &str) -> Result<Option<SegmentName>> {
        let prefix = format!("{cluster}/");
        for item in self.wal.scan_prefix(&prefix).keys().rev() {
            let k = item?;
            let name = String::from_utf8_lossy(&k);
            if let Some(Ok(WalFileName::Segment(s))) =
                name.strip_prefix(&prefix).map(str::parse::<WalFileName>)
            {
                return Ok(Some(s));
            }
        }
        Ok(None)
    }

    /// Every WAL file of a cluster, in name order.
    pub(crate) fn wal_files(&self, cluster: &str) -> Result<Vec<(WalFileName, WalEntry)>> {
        Ok(super::scan_cluster::<WalEntry>(&self.wal, cluster)?
            .into_iter()
            .filter_map(|(name, e)| Some((name.parse::<WalFileName>().ok()?, e)))
            .collect())
    }

    /// Forgets a WAL file (retention, after its object was deleted).
    pub(crate) fn remove_wal(&self, cluster: &str, name: &WalFileName) -> Result<()> {
        self.wal.remove(key(cluster, name))?;
        Ok(())
    }

    /// One page of the listing `archived wal list` shows: the files that sort after
    /// `after` (from the first without it), at most `limit` of them, summarized by
    /// `paging::wal_listing_page`; `next` is the last one's name when more follow.
    pub(crate) fn listing_page(
        &self,
        cluster: &str,
        after: Option<&WalFileName>,
        limit: usize,
    ) -> Result<WalListing> {
        let binding = self
            .binding(cluster)?
            .map(|b| (b.system_identifier, b.wal_segment_size));
        let after = after.map(|a| a.to_string());
        let limit = limit.max(1);
        // One more than a page tells whether another follows.
        let mut raw = super::scan_cluster_after::<WalEntry>(
            &self.wal,
            cluster,
            after.as_deref(),
            limit.saturating_add(1),
        )?;
        let next = if raw.len() > limit {
            raw.truncate(limit);
            raw.last().map(|(name, _)| name.clone())
        } else {
            None
        };
        let files = raw.into_iter().filter_map(|(name, e)| {
            Some(WalFileEntry {
                name: name.parse::<WalFileName>().ok()?,
                raw_bytes: e.raw_size,
                stored_bytes: e.stored_size,
            })
        });
        Ok(wal_listing_page(cluster, binding, files, next))
    }
}

/// Empties the tree (start of a rebuild).
pub(super) fn clear(index: &Index) -> Result<()> {
    index.wal.clear()?;
    Ok(())
}

/// Indexes `key` during a rebuild if it is a WAL object; `Ok(false)` if it is not one.
pub(super) async fn index_object(
    index: &Index,
    store: &Store,
    key: &str,
    summary: &mut RebuildSummary,
) -> Result<bool> {
    let Some((cluster, name)) = layout::parse_wal_key(key) else {
        return Ok(false);
    };
    match store.read_header(key).await {
        Ok(Some(h)) => {
            index.put_wal_unflushed(
                &cluster,
                &name,
                &WalEntry {
                    raw_size: h.raw_size,
                    blake3: h.blake3_hex(),
                    stored_size: HEADER_LEN as u64 + h.compressed_size,
                },
            )?;
            summary.wal_files += 1;
        }
        Ok(None) => {}
        Err(e) => {
            summary.unreadable += 1;
            tracing::error!(%key, error = %format!("{e:#}"), "unreadable object; not indexed");
        }
    }
    Ok(true)
}
