//! Per-cluster figures too costly to compute at every scrape, refreshed in the background
//! every `summary_interval_secs` (archived.toml, default 60) and served by `/metrics` from memory: WAL segments missing
//! in the catalog between the oldest backup's first segment and the newest one, stored
//! bytes (WAL and backups), and the recovery window (the oldest usable backup's end to the
//! time the last segment without a gap after the newest usable backup was stored); and
//! the client certificates `archived issue` recorded in DIR/tls/issued/.
//!
//! Cost per refresh and cluster: one scan of its WAL and backup entries in the catalog,
//! and store reads for two backups (the oldest and the newest usable: the segments of
//! their own range and one timestamp), never a listing of the store. A scrape costs
//! nothing more than a lookup; the summary's own time is exported too, so a stale one
//! shows.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::Result;
use walvault_protocol::core::wire::backup::BackupState;
use walvault_protocol::net::pki::IssuedCert;

use crate::index::state;
use crate::service::Archive;

/// One cluster's figures.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct ClusterSummary {
    /// When it was computed, Unix seconds.
    pub(crate) at: i64,
    /// Segments missing between the oldest backup's first segment and the newest one.
    pub(crate) wal_gap_segments: u64,
    /// Stored bytes of the WAL files.
    pub(crate) wal_bytes: u64,
    /// Stored bytes of the backups (what each added to the store).
    pub(crate) backup_bytes: u64,
    /// The recovery window: the oldest usable backup's end, Unix seconds.
    pub(crate) window_start: Option<i64>,
    /// Up to when the newest usable backup restores, Unix seconds.
    pub(crate) window_end: Option<i64>,
}

/// The newest summary of every cluster.
#[derive(Default)]
pub(crate) struct Summaries {
    by_cluster: Mutex<HashMap<String, ClusterSummary>>,
    /// The client certificates of DIR/tls/issued/, read with each refresh.
    client_certs: Mutex<Vec<IssuedCert>>,
}

impl Summaries {
    /// Every cluster's newest summary.
    pub(crate) fn all(&self) -> HashMap<String, ClusterSummary> {
        self.by_cluster
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The client certificates issued, as the newest refresh read them.
    pub(crate) fn client_certs(&self) -> Vec<IssuedCert> {
        self.client_certs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Recomputes every cluster's summary (clusters gone from the catalog are dropped)
    /// and rereads the client certificates issued.
    pub(crate) async fn refresh(&self, archive: &Archive, now: i64) -> Result<()> {
        if let Some(dir) = &archive.data_dir {
            *self.client_certs.lock().unwrap_or_else(|e| e.into_inner()) =
                crate::datadir::issued_certs(dir);
        }
        let clusters = archive.index.clusters()?;
        let mut fresh = HashMap::with_capacity(clusters.len());
        for c in clusters {
            let s = summarize(archive, &c, now).await?;
            fresh.insert(c, s);
        }
        *self.by_cluster.lock().unwrap_or_else(|e| e.into_inner()) = fresh;
        Ok(())
    }
}

/// The summary of `cluster` as of `now`.
pub(crate) async fn summarize(
    archive: &Archive,
    cluster: &str,
    now: i64,
) -> Result<ClusterSummary> {
    let index = &archive.index;
    let mut s = ClusterSummary {
        at: now,
        ..Default::default()
    };
    for (_, entry) in index.wal_files(cluster)? {
        s.wal_bytes += entry.stored_size;
    }
    if let Some(newest) = index.last_segment(cluster)? {
        s.wal_gap_segments = super::check::continuity(index, cluster, &newest)?.missing();
    }
    let mut backups = index.backups(cluster)?;
    s.backup_bytes = backups.iter().map(|b| b.stored_bytes).sum();
    backups.sort_by_key(|b| b.stop_time);
    for b in &backups {
        let b = state::summarize(&archive.store, index, cluster, b).await?;
        if b.state == BackupState::Usable {
            s.window_start = Some(b.record.stop_time);
            break;
        }
    }
    for b in backups.iter().rev() {
        let b = state::summarize(&archive.store, index, cluster, b).await?;
        if b.state == BackupState::Usable {
            s.window_end = b.restorable_until;
            break;
        }
    }
    Ok(s)
}

/// The refresher of a running server: every `interval` until aborted.
pub(crate) async fn run(archive: &Archive, summaries: &Summaries, interval: Duration) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Err(e) = summaries.refresh(archive, crate::clock::unix_now()).await {
            tracing::warn!(error = %format!("{e:#}"), "cannot refresh the per-cluster summaries of /metrics; retrying");
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::service::tests::{push, segment, TestArchive, SYSID};
    #[tokio::test]
    async fn the_metrics_summary_counts_the_segments_missing_in_the_catalog() {
        let t = TestArchive::new();
        for seg in [1, 2, 4, 5, 8] {
            let (name, raw) = segment(seg, SYSID, seg as u8);
            push(&t, &name, &raw).await.unwrap();
        }
        let s = super::summarize(&t.archive, "main", 1234).await.unwrap();
        assert_eq!(s.at, 1234);
        assert_eq!(s.wal_gap_segments, 3, "3, 6 and 7: {s:?}");
        let stored: u64 = t
            .archive
            .index
            .wal_files("main")
            .unwrap()
            .iter()
            .map(|(_, e)| e.stored_size)
            .sum();
        assert_eq!((s.wal_bytes, s.backup_bytes), (stored, 0));
        assert_eq!(
            (s.window_start, s.window_end),
            (None, None),
            "no backup, no window"
        );
    }
}
