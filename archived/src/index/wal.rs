//! WAL files in the catalog: tree "wal", `<cluster>/<file name>` -> JSON [`WalEntry`].
//!
//! Segment names sort in WAL order within a timeline, so a prefix scan of `<cluster>/`
//! yields each timeline's segments in order.

use std::collections::BTreeMap;

use anyhow::Result;
use serde::{Deserialize, Serialize};
use walvault_protocol::core::pg::wal::{Lsn, SegmentName, TimelineId, WalFileName};
use walvault_protocol::core::wire::{TimelineListing, WalListing};

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
    fn put_wal_unflushed(&self, cluster: &str, name: &WalFileName, entry: &WalEntry) -> Result<()> {
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

    /// The listing `archived wal list` shows.
    pub(crate) fn listing(&self, cluster: &str) -> Result<WalListing> {
        let binding = self.binding(cluster)?;
        let seg_size = binding
            .as_ref()
            .map(|b| b.wal_segment_size)
            .unwrap_or(16 << 20);
        let mut listing = WalListing {
            cluster: cluster.to_string(),
            system_identifier: binding.as_ref().map(|b| b.system_identifier),
            segment_size: binding.as_ref().map(|b| b.wal_segment_size),
            ..Default::default()
        };
        let mut per_tli: BTreeMap<TimelineId, (Vec<SegmentName>, TimelineListing)> =
            BTreeMap::new();
        for (name, entry) in self.wal_files(cluster)? {
            let tli = name.timeline();
            let slot = per_tli.entry(tli).or_insert_with(|| {
                (
                    Vec::new(),
                    TimelineListing {
                        timeline: tli,
                        segments: 0,
                        first: None,
                        last: None,
                        gaps: Vec::new(),
                        partials: Vec::new(),
                        raw_bytes: 0,
                        stored_bytes: 0,
                    },
                )
            });
            match name {
                WalFileName::Segment(s) => slot.0.push(s),
                WalFileName::Partial(_) => slot.1.partials.push(name.to_string()),
                WalFileName::History(_) => {
                    listing.history_files.push(name.to_string());
                    continue;
                }
                WalFileName::BackupHistory(..) => {
                    listing.backup_history_files.push(name.to_string());
                    continue;
                }
            }
            slot.1.raw_bytes += entry.raw_size;
            slot.1.stored_bytes += entry.stored_size;
        }
        for (_, (mut segs, mut tl)) in per_tli {
            segs.sort();
            tl.segments = segs.len() as u64;
            tl.first = segs.first().map(|s| s.to_string());
            tl.last = segs.last().map(|s| s.to_string());
            for pair in segs.windows(2) {
                let (a, b) = (pair[0].segno(seg_size), pair[1].segno(seg_size));
                if b > a + 1 {
                    let last_missing = SegmentName::containing(
                        pair[0].timeline,
                        Lsn((b - 1) * seg_size as u64),
                        seg_size,
                    );
                    tl.gaps
                        .push((pair[0].next(seg_size).to_string(), last_missing.to_string()));
                }
            }
            if tl.segments > 0 || !tl.partials.is_empty() {
                listing.timelines.push(tl);
            }
        }
        Ok(listing)
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
