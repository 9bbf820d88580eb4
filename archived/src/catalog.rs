//! The sled catalog: an index of the object store, never the truth.
//!
//! # Keys
//!
//! ```text
//! tree "clusters"  <cluster>             -> JSON ClusterBinding
//! tree "wal"       <cluster>/<file name> -> JSON WalEntry   (segments, partials,
//!                                                            history, backup history)
//! tree "meta"      "complete"            -> "1" once the index covers the whole store
//! tree "chunks", "backups"                 -> backup chunks and backups, see backups.rs
//! ```
//!
//! Segment names sort in WAL order within a timeline, so a prefix scan of
//! `<cluster>/` yields each timeline's segments in order.
//!
//! # Rebuild
//!
//! The catalog is rebuilt from a listing of the store (plus one header read per object)
//! when its directory is missing, when sled cannot open it (it is moved aside to
//! `catalog.damaged.<unix time>`), when it lacks the `complete` mark (a rebuild was
//! interrupted), or on `archived catalog rebuild`. Writers always store the object first
//! and index it second, and flush before acknowledging; a crash between the two leaves an
//! object without an entry, which the client's retry (or a rebuild) indexes.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use walvault_protocol::core::pg::wal::{SegmentName, TimelineId, WalFileName};
use walvault_protocol::core::wire::{TimelineListing, WalListing};

use crate::store::{self, Store};

/// What binds a cluster name to one PostgreSQL cluster (`<cluster>/cluster.toml`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterBinding {
    /// pg_control system identifier.
    pub system_identifier: u64,
    /// WAL segment size.
    pub wal_segment_size: u32,
    /// PostgreSQL major version of the first segment pushed.
    pub pg_version: u32,
}

/// Catalog entry of one WAL object.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WalEntry {
    /// Raw size.
    pub raw_size: u64,
    /// blake3 of the raw bytes, hex.
    pub blake3: String,
    /// Stored bytes (header + zstd frame).
    pub stored_size: u64,
}

/// The catalog.
#[derive(Clone)]
pub struct Catalog {
    db: sled::Db,
    clusters: sled::Tree,
    wal: sled::Tree,
    meta: sled::Tree,
}

impl Catalog {
    /// Opens the catalog at `dir`, rebuilding it from `store` when it is missing,
    /// damaged or incomplete.
    pub async fn open_or_rebuild(dir: &Path, store: &Store) -> Result<Catalog> {
        let existed = dir.exists();
        let catalog = match Self::open(dir) {
            Ok(c) => c,
            Err(e) => {
                let aside = dir.with_file_name(format!(
                    "catalog.damaged.{}",
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_secs())
                        .unwrap_or(0)
                ));
                tracing::warn!(error = %format!("{e:#}"), aside = %aside.display(), "catalog cannot be opened; moving it aside and rebuilding from the store");
                std::fs::rename(dir, &aside).with_context(|| {
                    format!("cannot move damaged catalog {} aside", dir.display())
                })?;
                Self::open(dir)?
            }
        };
        if !catalog.is_complete()? {
            if existed {
                tracing::warn!(
                    "catalog is incomplete (interrupted rebuild?); rebuilding from the store"
                );
            } else {
                tracing::info!("no catalog yet; building it from the store");
            }
            catalog.rebuild(store).await?;
        }
        Ok(catalog)
    }

    fn open(dir: &Path) -> Result<Catalog> {
        let db = sled::Config::new()
            .path(dir)
            .open()
            .with_context(|| format!("cannot open catalog {}", dir.display()))?;
        Ok(Catalog {
            clusters: db.open_tree("clusters")?,
            wal: db.open_tree("wal")?,
            meta: db.open_tree("meta")?,
            db,
        })
    }

    fn is_complete(&self) -> Result<bool> {
        Ok(self.meta.get("complete")?.is_some())
    }

    /// Rebuilds every tree from a listing of the store.
    pub async fn rebuild(&self, store: &Store) -> Result<RebuildSummary> {
        self.meta.remove("complete")?;
        self.db.flush_async().await?;
        self.clusters.clear()?;
        self.wal.clear()?;
        crate::backup_index::clear_index(self)?;
        let mut summary = RebuildSummary::default();
        for key in store
            .list("")
            .await
            .context("listing the store for a catalog rebuild")?
        {
            if crate::backup_index::index_object(self, store, &key, &mut summary).await? {
                continue;
            }
            if let Some(cluster) = key.strip_suffix("/cluster.toml") {
                if let Some(bytes) = store.get_small(&key).await? {
                    let text = String::from_utf8_lossy(&bytes);
                    match toml::from_str::<ClusterBinding>(&text) {
                        Ok(b) => {
                            self.clusters.insert(cluster, serde_json::to_vec(&b)?)?;
                            summary.clusters += 1;
                        }
                        Err(e) => {
                            tracing::error!(%key, error = %e, "unreadable cluster binding; cluster not indexed")
                        }
                    }
                }
            } else if let Some((cluster, name)) = store::parse_wal_key(&key) {
                match store.read_header(&key).await {
                    Ok(Some(h)) => {
                        self.put_wal_entry_unflushed(
                            &cluster,
                            &name,
                            &WalEntry {
                                raw_size: h.raw_size,
                                blake3: h.blake3_hex(),
                                stored_size: store::HEADER_LEN as u64 + h.compressed_size,
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
            } else {
                summary.other += 1;
            }
        }
        self.meta.insert("complete", "1")?;
        self.db.flush_async().await?;
        tracing::info!(
            clusters = summary.clusters,
            wal_files = summary.wal_files,
            unreadable = summary.unreadable,
            backups = summary.backups,
            chunks = summary.chunks,
            "catalog rebuilt from the store"
        );
        Ok(summary)
    }

    /// The binding of a cluster.
    pub fn binding(&self, cluster: &str) -> Result<Option<ClusterBinding>> {
        Ok(match self.clusters.get(cluster)? {
            Some(v) => Some(serde_json::from_slice(&v)?),
            None => None,
        })
    }

    /// Records a binding and flushes.
    pub async fn put_binding(&self, cluster: &str, binding: &ClusterBinding) -> Result<()> {
        self.clusters
            .insert(cluster, serde_json::to_vec(binding)?)?;
        self.db.flush_async().await?;
        Ok(())
    }

    fn wal_key(cluster: &str, name: &WalFileName) -> String {
        format!("{cluster}/{name}")
    }

    fn put_wal_entry_unflushed(
        &self,
        cluster: &str,
        name: &WalFileName,
        entry: &WalEntry,
    ) -> Result<()> {
        self.wal
            .insert(Self::wal_key(cluster, name), serde_json::to_vec(entry)?)?;
        Ok(())
    }

    /// Records a WAL object and flushes the catalog to disk before returning.
    pub async fn put_wal(&self, cluster: &str, name: &WalFileName, entry: &WalEntry) -> Result<()> {
        self.put_wal_entry_unflushed(cluster, name, entry)?;
        self.db
            .flush_async()
            .await
            .context("flushing the catalog")?;
        Ok(())
    }

    /// The entry of a WAL file.
    pub fn wal(&self, cluster: &str, name: &WalFileName) -> Result<Option<WalEntry>> {
        Ok(match self.wal.get(Self::wal_key(cluster, name))? {
            Some(v) => Some(serde_json::from_slice(&v)?),
            None => None,
        })
    }

    /// Every WAL file of a cluster, in name order.
    pub fn wal_files(&self, cluster: &str) -> Result<Vec<(WalFileName, WalEntry)>> {
        let mut out = Vec::new();
        for item in self.wal.scan_prefix(format!("{cluster}/")) {
            let (k, v) = item?;
            let k = String::from_utf8_lossy(&k);
            let Some(name) = k
                .split_once('/')
                .and_then(|(_, n)| n.parse::<WalFileName>().ok())
            else {
                continue;
            };
            out.push((name, serde_json::from_slice(&v)?));
        }
        Ok(out)
    }

    /// The listing `archived wal list` shows.
    pub fn listing(&self, cluster: &str) -> Result<WalListing> {
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
                    tl.gaps.push((pair[0].next(seg_size).to_string(), {
                        let last_missing = SegmentName::containing(
                            pair[0].timeline,
                            walvault_protocol::core::pg::wal::Lsn((b - 1) * seg_size as u64),
                            seg_size,
                        );
                        last_missing.to_string()
                    }));
                }
            }
            if tl.segments > 0 || !tl.partials.is_empty() {
                listing.timelines.push(tl);
            }
        }
        Ok(listing)
    }

    /// A tree of the catalog by name (backups.rs keeps its own trees).
    pub fn tree(&self, name: &str) -> Result<sled::Tree> {
        Ok(self.db.open_tree(name)?)
    }

    /// Forgets a WAL file (retention, after its object was deleted).
    pub fn remove_wal(&self, cluster: &str, name: &WalFileName) -> Result<()> {
        self.wal.remove(Self::wal_key(cluster, name))?;
        Ok(())
    }

    /// Every cluster with a binding.
    pub fn clusters(&self) -> Result<Vec<String>> {
        let mut out = Vec::new();
        for item in self.clusters.iter() {
            let (k, _) = item?;
            out.push(String::from_utf8_lossy(&k).into_owned());
        }
        Ok(out)
    }

    /// Flushes everything to disk.
    pub async fn flush(&self) -> Result<()> {
        self.db.flush_async().await?;
        Ok(())
    }
}

/// What a rebuild found.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RebuildSummary {
    /// Cluster bindings indexed.
    pub clusters: u64,
    /// WAL objects indexed.
    pub wal_files: u64,
    /// Objects whose header could not be read.
    pub unreadable: u64,
    /// Backups (manifests) indexed.
    pub backups: u64,
    /// Backup chunks indexed.
    pub chunks: u64,
    /// Keys that are not ours.
    pub other: u64,
}
