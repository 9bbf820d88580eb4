//! Retention: which backups, WAL and chunks the archive may forget.
//!
//! Policy (`[retention]` in archived.toml; `archived retention run` flags override it):
//!
//! ```toml
//! [retention]
//! keep_full = 2            # the newest N usable backups
//! keep_within_days = 7     # every backup needed to restore to any point of the last 7 days
//! min_full = 1             # never fewer usable backups than this, whatever the above says
//! chunk_grace_hours = 24   # unreferenced chunks untouched this long are collected
//! ```
//!
//! With neither `keep_full` nor `keep_within_days` no backup expires. When both are set a
//! backup is kept if either keeps it. Per cluster:
//!
//! 1. Kept backups: as above, among *usable* backups (all their WAL archived). Backups
//!    whose WAL is still incomplete and that are newer than the oldest kept one are kept
//!    too (they may be in the middle of becoming usable). A backup is only expired when
//!    it is older than the oldest kept usable backup. Without any usable backup nothing
//!    is expired.
//! 2. WAL: the oldest kept backup's first segment S (timeline T) is the horizon. On
//!    timelines up to T, segments, partial segments and backup history files before S
//!    are expired; later timelines and every history file are kept, so a kept backup
//!    stays restorable to every point of its window, on every timeline after it.
//! 3. Chunks: a chunk no remaining manifest names, untouched (neither stored nor reused
//!    by a backup) for the grace period, is collectable. A loose chunk is deleted; a pack
//!    (packs.rs) is deleted when every chunk the catalog locates in it is collectable (a
//!    pack that still holds one live chunk stays whole), and a pack the catalog locates
//!    no chunk in is deleted once it is older than the grace period. This step holds the write side of
//!    the backup lock (see backups.rs), so no manifest is committed meanwhile, and a
//!    chunk a running backup relies on was touched within the grace period.
//!
//! `dry_run` computes the same plan and deletes nothing.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::Result;
use serde::{Deserialize, Serialize};
use walvault_protocol::core::pg::wal::WalFileName;
use walvault_protocol::core::wire::admin::{ClusterRetention, RetentionReport};
use walvault_protocol::core::wire::backup::BackupState;

use crate::backup_index;
use crate::backups::BackupService;
use crate::catalog::Catalog;
use crate::store::{self, Store};

/// `[retention]` of archived.toml.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionConfig {
    /// Newest usable backups kept.
    pub keep_full: Option<u32>,
    /// Restore window in days.
    pub keep_within_days: Option<u64>,
    /// Minimum usable backups kept.
    pub min_full: u32,
    /// Grace period of unreferenced chunks, hours.
    pub chunk_grace_hours: u64,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        RetentionConfig {
            keep_full: None,
            keep_within_days: None,
            min_full: 1,
            chunk_grace_hours: 24,
        }
    }
}

/// The policy one run applies.
#[derive(Clone, Debug)]
pub struct Policy {
    /// Newest usable backups kept.
    pub keep_full: Option<u32>,
    /// Restore window, seconds.
    pub keep_within_secs: Option<u64>,
    /// Minimum usable backups kept.
    pub min_full: u32,
    /// Chunk grace period, seconds.
    pub chunk_grace_secs: u64,
    /// Unix time the `keep_within` window ends at, instead of now (tests: `--now`).
    /// Only the backup window uses it; chunk and pack ages always use the clock.
    pub window_end: Option<i64>,
}

impl RetentionConfig {
    /// The configured policy with a run's overrides.
    pub fn with_overrides(
        &self,
        keep_full: Option<u32>,
        keep_within_secs: Option<u64>,
        chunk_grace_secs: Option<u64>,
    ) -> Policy {
        Policy {
            keep_full: keep_full.or(self.keep_full),
            keep_within_secs: keep_within_secs.or(self.keep_within_days.map(|d| d * 86_400)),
            min_full: self.min_full,
            chunk_grace_secs: chunk_grace_secs.unwrap_or(self.chunk_grace_hours * 3600),
            window_end: None,
        }
    }
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Which backups (ids, oldest first, with stop time and state) a policy keeps.
pub fn plan_backups(
    backups: &[(String, i64, BackupState)],
    policy: &Policy,
    now: i64,
) -> (Vec<String>, Vec<String>, Vec<String>) {
    let mut notes = Vec::new();
    let usable: Vec<&(String, i64, BackupState)> = backups
        .iter()
        .filter(|b| b.2 == BackupState::Usable)
        .collect();
    if usable.is_empty() {
        if !backups.is_empty() {
            notes.push("no usable backup (WAL incomplete): nothing expired".to_string());
        }
        return (
            backups.iter().map(|b| b.0.clone()).collect(),
            Vec::new(),
            notes,
        );
    }
    if policy.keep_full.is_none() && policy.keep_within_secs.is_none() {
        notes.push("no retention policy (keep_full / keep_within): no backup expired".to_string());
        return (
            backups.iter().map(|b| b.0.clone()).collect(),
            Vec::new(),
            notes,
        );
    }
    let mut keep: BTreeSet<&str> = BTreeSet::new();
    let n = usable.len();
    let by_count = policy.keep_full.unwrap_or(0).max(policy.min_full) as usize;
    for b in &usable[n.saturating_sub(by_count)..] {
        keep.insert(&b.0);
    }
    if let Some(window) = policy.keep_within_secs {
        let cutoff = now - window as i64;
        let mut anchor: Option<&str> = None;
        for b in &usable {
            if b.1 >= cutoff {
                keep.insert(&b.0);
            } else {
                anchor = Some(&b.0);
            }
        }
        // The newest backup before the cutoff restores to the cutoff itself.
        if let Some(a) = anchor {
            keep.insert(a);
        }
    }
    let oldest_kept = usable
        .iter()
        .find(|b| keep.contains(b.0.as_str()))
        .map(|b| b.0.clone())
        .unwrap_or_default();
    let (mut kept, mut expired) = (Vec::new(), Vec::new());
    for b in backups {
        if keep.contains(b.0.as_str()) || b.0 > oldest_kept {
            kept.push(b.0.clone());
        } else {
            expired.push(b.0.clone());
        }
    }
    (kept, expired, notes)
}

/// Applies the policy to one cluster or to all.
pub async fn run(
    store: &Store,
    catalog: &Catalog,
    service: &BackupService,
    cluster: Option<&str>,
    policy: &Policy,
    dry_run: bool,
) -> Result<RetentionReport> {
    let clusters = match cluster {
        Some(c) => vec![c.to_string()],
        None => catalog.clusters()?,
    };
    let mut report = RetentionReport {
        dry_run,
        clusters: Vec::new(),
    };
    // One run at a time, and no manifest committed while chunks are judged.
    let _gc = service.gc_lock.write().await;
    for c in clusters {
        report
            .clusters
            .push(run_cluster(store, catalog, &c, policy, dry_run).await?);
    }
    catalog.flush().await?;
    Ok(report)
}

async fn run_cluster(
    store: &Store,
    catalog: &Catalog,
    cluster: &str,
    policy: &Policy,
    dry_run: bool,
) -> Result<ClusterRetention> {
    let mut out = ClusterRetention {
        cluster: cluster.to_string(),
        ..Default::default()
    };
    let summaries = backup_index::list_backups(store, catalog, cluster).await?;
    let list: Vec<(String, i64, BackupState)> = summaries
        .iter()
        .map(|s| (s.id.clone(), s.stop_time, s.state))
        .collect();
    let window_end = policy.window_end.unwrap_or_else(now);
    let (kept, expired, notes) = plan_backups(&list, policy, window_end);
    out.notes = notes;
    out.kept_backups = kept.clone();
    out.expired_backups = expired.clone();

    // Backups.
    if !dry_run {
        for id in &expired {
            store
                .delete(&backup_index::manifest_key(cluster, id))
                .await?;
            backup_index::remove_backup_record(catalog, cluster, id)?;
            tracing::info!(%cluster, backup = %id, "backup expired");
        }
    }

    // WAL before the oldest kept backup.
    let records = backup_index::backup_records(catalog, cluster)?;
    let oldest_kept = records
        .iter()
        .filter(|r| kept.contains(&r.id))
        .min_by(|a, b| a.id.cmp(&b.id));
    if let Some(oldest) = oldest_kept.filter(|_| !expired.is_empty() || !kept.is_empty()) {
        if summaries.iter().any(|s| s.state == BackupState::Usable) {
            let seg_size = backup_index::segment_size(catalog, cluster)?;
            let (horizon, _) = backup_index::wal_range(oldest, seg_size)?;
            let horizon_no = horizon.segno(seg_size);
            for (name, entry) in catalog.wal_files(cluster)? {
                if name.timeline() > horizon.timeline {
                    continue;
                }
                let segment = match &name {
                    WalFileName::History(_) => continue,
                    WalFileName::BackupHistory(s, _) => Some(*s),
                    other => other.segment(),
                };
                let Some(segment) = segment else { continue };
                if segment.segno(seg_size) >= horizon_no {
                    continue;
                }
                out.expired_wal.push(name.to_string());
                out.expired_wal_bytes += entry.stored_size;
                if !dry_run {
                    store.delete(&store::wal_key(cluster, &name)).await?;
                    catalog.remove_wal(cluster, &name)?;
                }
            }
            if !out.expired_wal.is_empty() {
                tracing::info!(%cluster, files = out.expired_wal.len(), horizon = %horizon, dry_run, "WAL expired");
            }
        } else {
            out.notes.push("no usable backup: WAL kept".to_string());
        }
    } else if records.is_empty() {
        out.notes.push(
            "no backup: WAL kept (retention never expires WAL no backup anchors)".to_string(),
        );
    }

    // Chunks no remaining manifest names.
    let mut referenced: BTreeSet<String> = BTreeSet::new();
    let remaining: Vec<String> = if dry_run {
        kept.clone()
    } else {
        backup_index::backup_records(catalog, cluster)?
            .into_iter()
            .map(|r| r.id)
            .collect()
    };
    for id in &remaining {
        match backup_index::read_manifest(store, cluster, id).await? {
            Some((m, _)) => referenced.extend(m.chunk_hashes().map(String::from)),
            None => anyhow::bail!(
                "backup {id} of cluster '{cluster}' is listed but its manifest is missing; \
                 run `archived catalog rebuild` before retention"
            ),
        }
    }
    let now = now();
    let grace = policy.chunk_grace_secs as i64;
    let mut loose = Vec::new();
    // Pack id -> (every chunk the catalog locates in it is collectable, those hashes, bytes).
    let mut packs: BTreeMap<String, (bool, Vec<String>, u64)> = BTreeMap::new();
    for (hash, entry) in backup_index::chunk_entries(catalog, cluster)? {
        let unreferenced = !referenced.contains(&hash);
        let collectable = unreferenced && now - entry.touched >= grace;
        if unreferenced && !collectable {
            out.chunks_in_grace += 1;
        }
        match entry.pack {
            None if collectable => {
                out.collected_chunks += 1;
                out.collected_chunk_bytes += entry.stored_size;
                loose.push(hash);
            }
            None => {}
            Some(id) => {
                let p = packs.entry(id).or_insert((true, Vec::new(), 0));
                p.0 &= collectable;
                p.1.push(hash);
                p.2 += entry.stored_size;
            }
        }
    }
    let mut dead_packs = Vec::new();
    for (id, (all_collectable, hashes, bytes)) in &packs {
        if *all_collectable {
            out.collected_chunks += hashes.len() as u64;
            out.collected_chunk_bytes += bytes;
            dead_packs.push(id.clone());
        }
    }
    // Packs the catalog locates no chunk in (every chunk of it was stored first elsewhere,
    // or the archive stopped between storing and indexing it), once past the grace period.
    for key in store.list(&format!("{cluster}/packs/")).await? {
        let Some((_, id)) = crate::packs::parse_pack_key(&key) else {
            continue;
        };
        if packs.contains_key(&id) {
            continue;
        }
        let modified = store.modified(&key).await?.unwrap_or(now);
        if now - modified >= grace {
            dead_packs.push(id);
        }
    }
    out.collected_packs = dead_packs.len() as u64;
    let held: Vec<(u64, u64)> = packs
        .values()
        .filter(|p| !p.0)
        .map(|(_, hashes, _)| {
            let dead = hashes.iter().filter(|h| !referenced.contains(*h)).count() as u64;
            (dead, hashes.len() as u64)
        })
        .filter(|(dead, _)| *dead > 0)
        .collect();
    if !held.is_empty() {
        out.notes.push(format!(
            "{} unreferenced chunks stay in {} packs that still hold chunks kept backups need \
             (a pack is deleted whole; packs are not rewritten)",
            held.iter().map(|(d, _)| d).sum::<u64>(),
            held.len()
        ));
    }
    // Index first, object second: a crash in between leaves an unindexed object (found
    // again by a catalog rebuild, or collected as an unindexed pack), never an index
    // entry that would make a backup skip uploading a chunk the store no longer has.
    if !dry_run && (!loose.is_empty() || !dead_packs.is_empty()) {
        for hash in &loose {
            backup_index::remove_chunk_entry(catalog, cluster, hash)?;
        }
        for id in &dead_packs {
            for hash in packs.get(id).map(|p| &p.1[..]).unwrap_or_default() {
                backup_index::remove_chunk_entry(catalog, cluster, hash)?;
            }
        }
        catalog.flush().await?;
        for hash in &loose {
            store
                .delete(&backup_index::chunk_key(cluster, hash))
                .await?;
        }
        for id in &dead_packs {
            store.delete(&crate::packs::pack_key(cluster, id)).await?;
        }
    }
    if out.collected_chunks > 0 {
        tracing::info!(%cluster, chunks = out.collected_chunks, bytes = out.collected_chunk_bytes, dry_run, "unreferenced chunks collected");
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(id: &str, t: i64, usable: bool) -> (String, i64, BackupState) {
        (
            id.into(),
            t,
            if usable {
                BackupState::Usable
            } else {
                BackupState::IncompleteWal
            },
        )
    }

    fn policy(keep_full: Option<u32>, within: Option<u64>) -> Policy {
        Policy {
            keep_full,
            keep_within_secs: within,
            min_full: 1,
            chunk_grace_secs: 0,
            window_end: None,
        }
    }

    #[test]
    fn keep_count() {
        let l = [b("a", 10, true), b("b", 20, true), b("c", 30, true)];
        let (kept, expired, _) = plan_backups(&l, &policy(Some(2), None), 100);
        assert_eq!(kept, ["b", "c"]);
        assert_eq!(expired, ["a"]);
    }

    #[test]
    fn keep_window_keeps_the_anchor_before_it() {
        let l = [b("a", 10, true), b("b", 20, true), b("c", 90, true)];
        let (kept, expired, _) = plan_backups(&l, &policy(None, Some(50)), 100);
        assert_eq!(kept, ["b", "c"]);
        assert_eq!(expired, ["a"]);
    }

    #[test]
    fn incomplete_and_no_policy() {
        let l = [b("a", 10, true), b("b", 20, true), b("c", 30, false)];
        let (kept, expired, _) = plan_backups(&l, &policy(Some(1), None), 100);
        assert_eq!(
            kept,
            ["b", "c"],
            "an incomplete newest backup is no reason to drop the last usable one"
        );
        assert_eq!(expired, ["a"]);
        let (kept, expired, notes) = plan_backups(&l, &policy(None, None), 100);
        assert_eq!(kept.len(), 3);
        assert!(expired.is_empty() && !notes.is_empty());
        let only_incomplete = [b("x", 10, false)];
        let (_, expired, _) = plan_backups(&only_incomplete, &policy(Some(1), None), 100);
        assert!(expired.is_empty());
    }
}
