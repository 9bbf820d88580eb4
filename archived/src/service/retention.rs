//! Retention: which backups, WAL and chunks the archive may forget. The policy is
//! `[retention]` of archived.toml (config.rs) with a run's overrides. Per cluster:
//!
//! 1. Kept backups: the newest `keep_full` and those `keep_within` needs, among *usable*
//!    backups (all their WAL archived), never fewer than `min_full`. Backups whose WAL is
//!    still incomplete and that are newer than the oldest kept one are kept too (they may
//!    be in the middle of becoming usable). A backup is only expired when it is older
//!    than the oldest kept usable backup. Without any usable backup nothing is expired.
//! 2. WAL: the oldest kept backup's first segment S (timeline T) is the horizon. On
//!    timelines up to T, segments, partial segments and backup history files before S
//!    are expired, with the streaming receiver's unfinished segments there (uploads and
//!    local files); later timelines and every history file are kept, so a kept backup
//!    stays restorable to every point of its window, on every timeline after it.
//! 3. Chunks: a chunk no remaining manifest names, untouched (neither stored nor reused
//!    by a backup) for the grace period, is collectable. A loose chunk is deleted; a pack
//!    is deleted when every chunk the catalog locates in it is collectable (a pack that
//!    still holds one live chunk stays whole), and a pack the catalog locates no chunk in
//!    is deleted once it is older than the grace period and at least
//!    `gc::UNINDEXED_PACK_MIN_AGE_SECS`. A chunk touched since a live backup lease of the
//!    cluster began is never collectable. Only this step holds the exclusive side of the
//!    GC lock (gc.rs); manifests are read and backups and WAL expired outside it.
//!
//! `dry_run` computes the same plan and deletes nothing.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::Result;
use walvault_protocol::core::pg::wal::WalFileName;

use super::stream::Streams;
use walvault_protocol::core::wire::admin::{ClusterRetention, RetentionReport};
use walvault_protocol::core::wire::backup::BackupState;
use walvault_protocol::core::wire::Response;

use super::{Ctx, Refusal, Reply};
use crate::clock::unix_now;
use crate::config::Policy;
use crate::gc::Gc;
use crate::index::backups::read_manifest;
use crate::index::{state, Index, Removed};
use crate::store::{layout, Store};

/// Which backups (ids, oldest first, with stop time and state) a policy keeps.
pub(crate) fn plan_backups(
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

/// What a `Retention` request asks for.
#[derive(Clone, Debug)]
pub(crate) struct RetentionRequest<'a> {
    /// One cluster, or every cluster.
    pub(crate) cluster: Option<&'a str>,
    /// Overrides of `[retention]`.
    pub(crate) keep_full: Option<u32>,
    pub(crate) keep_within_secs: Option<u64>,
    pub(crate) chunk_grace_secs: Option<u64>,
    /// Plan only.
    pub(crate) dry_run: bool,
    /// Where the `keep_within` window ends (tests); the clock when `None`.
    pub(crate) window_end: Option<i64>,
}

/// `Retention` (admin): applies the configured policy with the request's overrides.
pub(crate) async fn request(ctx: &Ctx<'_>, r: &RetentionRequest<'_>) -> Reply {
    ctx.require_admin(
        "retention needs an admin certificate (archived retention run uses DIR/admin.toml)",
    )?;
    let mut policy =
        ctx.archive
            .policy
            .with_overrides(r.keep_full, r.keep_within_secs, r.chunk_grace_secs);
    policy.window_end = r.window_end;
    let streams = &ctx.archive.streams;
    let ran = run(
        ctx.store, ctx.index, ctx.gc, streams, r.cluster, &policy, r.dry_run,
    )
    .await;
    if !r.dry_run {
        // What `archived check` and the metrics say of retention.
        let now = crate::clock::unix_now();
        let (covered, error): (Vec<(String, Option<Removed>)>, _) = match &ran {
            Ok(report) => (
                report
                    .clusters
                    .iter()
                    .map(|c| {
                        let removed = Removed {
                            backups: c.expired_backups.len() as u64,
                            wal_files: c.expired_wal_files,
                            wal_bytes: c.expired_wal_bytes,
                            chunk_bytes: c.collected_chunk_bytes,
                        };
                        (c.cluster.clone(), Some(removed))
                    })
                    .collect(),
                None,
            ),
            Err(e) => (
                match r.cluster {
                    Some(c) => vec![(c.to_string(), None)],
                    None => ctx
                        .index
                        .clusters()
                        .unwrap_or_default()
                        .into_iter()
                        .map(|c| (c, None))
                        .collect(),
                },
                Some(format!("{e:#}")),
            ),
        };
        for (c, removed) in covered {
            if let Err(e) = ctx
                .index
                .record_retention(&c, now, error.clone(), removed)
                .await
            {
                tracing::warn!(cluster = %c, error = %format!("{e:#}"), "cannot record the retention run");
            }
        }
    }
    ran.map(Response::Retention).map_err(Refusal::internal)
}

/// Applies the policy to one cluster or to all.
pub(crate) async fn run(
    store: &Store,
    index: &Index,
    gc: &Gc,
    streams: &Streams,
    cluster: Option<&str>,
    policy: &Policy,
    dry_run: bool,
) -> Result<RetentionReport> {
    let clusters = match cluster {
        Some(c) => vec![c.to_string()],
        None => index.clusters()?,
    };
    let mut report = RetentionReport {
        dry_run,
        clusters: Vec::new(),
    };
    let _run = gc.retention_run().await;
    for c in clusters {
        report
            .clusters
            .push(run_cluster(store, index, gc, streams, &c, policy, dry_run).await?);
    }
    index.flush().await?;
    Ok(report)
}

async fn run_cluster(
    store: &Store,
    index: &Index,
    gc: &Gc,
    streams: &Streams,
    cluster: &str,
    policy: &Policy,
    dry_run: bool,
) -> Result<ClusterRetention> {
    let mut out = ClusterRetention {
        cluster: cluster.to_string(),
        ..Default::default()
    };
    let mut summaries = state::list_backups(store, index, cluster).await?;
    // A backup listed without its manifest (deleted outside archived, or a crash of an
    // older archived between the two steps of a deletion) is no backup: it is not
    // counted by the plan, and forgotten.
    let mut listed = Vec::with_capacity(summaries.len());
    for s in summaries {
        let key = layout::manifest_key(cluster, &s.record.id);
        if store.read_header(&key).await?.is_some() {
            listed.push(s);
            continue;
        }
        out.notes.push(format!(
            "backup {} was listed but its manifest is gone from the store: forgotten",
            s.record.id
        ));
        tracing::warn!(%cluster, backup = %s.record.id, "listed backup without a manifest; forgotten");
        if !dry_run {
            index.remove_backup(cluster, &s.record.id)?;
        }
    }
    summaries = listed;
    let list: Vec<(String, i64, BackupState)> = summaries
        .iter()
        .map(|s| (s.record.id.clone(), s.record.stop_time, s.state))
        .collect();
    let (kept, expired, notes) =
        plan_backups(&list, policy, policy.window_end.unwrap_or_else(unix_now));
    out.notes.extend(notes);
    out.kept_backups = kept.clone();
    out.expired_backups = expired.clone();

    // Backups, index first (flushed), object second as every deletion: a crash in
    // between leaves an unlisted manifest (a rebuild lists it again), never a listed
    // backup without one.
    if !dry_run {
        for id in &expired {
            index.remove_backup(cluster, id)?;
        }
        index.flush().await?;
        for id in &expired {
            store.delete(&layout::manifest_key(cluster, id)).await?;
            tracing::info!(%cluster, backup = %id, "backup expired");
        }
    }

    // WAL before the oldest kept backup.
    let records = index.backups(cluster)?;
    let oldest_kept = records
        .iter()
        .filter(|r| kept.contains(&r.id))
        .min_by(|a, b| a.id.cmp(&b.id));
    if let Some(oldest) = oldest_kept.filter(|_| !expired.is_empty() || !kept.is_empty()) {
        if summaries.iter().any(|s| s.state == BackupState::Usable) {
            let seg_size = index.segment_size(cluster)?;
            let (horizon, _) = state::wal_range(oldest, seg_size)?;
            let horizon_no = horizon.segno(seg_size);
            let mut doomed = Vec::new();
            for (name, entry) in index.wal_files(cluster)? {
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
                out.add_expired_wal(name.timeline().0, &name.to_string(), entry.stored_size);
                doomed.push(name);
            }
            // Index first (flushed), objects second: a push meanwhile or a crash in
            // between leaves objects without entries, never entries without objects.
            if !dry_run && !doomed.is_empty() {
                let why = format!(
                    "retention: before {horizon}, the oldest kept backup {}'s start",
                    oldest.id
                );
                for name in &doomed {
                    index.remove_wal(cluster, name)?;
                    index.audit_expire(cluster, &name.to_string(), &why)?;
                }
                index.flush().await?;
                for name in &doomed {
                    store.delete(&layout::wal_key(cluster, name)).await?;
                }
            }
            // The streaming receiver's unfinished segments before the horizon (sealed
            // ends of old timelines): their uploads and local files.
            for (segment, keys, stored) in
                streams.before(store, cluster, &horizon, seg_size).await?
            {
                out.add_expired_wal(segment.timeline.0, &format!("{segment} (streamed)"), stored);
                if !dry_run {
                    streams.expire(store, cluster, &segment, &keys).await?;
                }
            }
            if out.expired_wal_files > 0 {
                tracing::info!(%cluster, files = out.expired_wal_files, horizon = %horizon, dry_run, "WAL expired");
            }
            if !dry_run && !doomed.is_empty() {
                let pruned = crate::service::audit::prune(store, index, cluster).await?;
                if pruned > 0 {
                    out.notes.push(format!(
                        "audit trail: {pruned} batches of expired files deleted (their summaries are kept)"
                    ));
                }
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
        index.backups(cluster)?.into_iter().map(|r| r.id).collect()
    };
    let mut read = BTreeSet::new();
    for id in remaining {
        read_referenced(store, cluster, &id, &mut referenced).await?;
        read.insert(id);
    }
    // Chunks are judged under the exclusive side of the GC lock (gc.rs); a manifest
    // committed since the reading above is read now, so what it names stays.
    let _judge = gc.judge_chunks().await;
    for r in index.backups(cluster)? {
        let expired_by_this_plan = dry_run && expired.contains(&r.id);
        if !read.contains(&r.id) && !expired_by_this_plan {
            read_referenced(store, cluster, &r.id, &mut referenced).await?;
            read.insert(r.id);
        }
    }
    let now = unix_now();
    let grace = policy.chunk_grace_secs as i64;
    let protected_since = gc.protected_since(cluster, now);
    let mut loose = Vec::new();
    // Pack id -> (every chunk the catalog locates in it is collectable, those hashes, bytes).
    let mut packs: BTreeMap<String, (bool, Vec<String>, u64)> = BTreeMap::new();
    for (hash, entry) in index.chunks(cluster)? {
        let unreferenced = !referenced.contains(&hash);
        let collectable = unreferenced
            && crate::gc::chunk_collectable(entry.touched, now, grace, protected_since);
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
    // or the archive stopped between storing and indexing it), once past the grace period
    // and the age floor of unindexed packs (gc.rs).
    for key in store.list(&layout::packs_prefix(cluster)).await? {
        let Some((_, id)) = layout::parse_pack_key(&key) else {
            continue;
        };
        if packs.contains_key(&id) {
            continue;
        }
        let modified = store.modified(&key).await?.unwrap_or(now);
        if crate::gc::unindexed_pack_collectable(modified, now, grace) {
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
            index.remove_chunk(cluster, hash)?;
        }
        for id in &dead_packs {
            for hash in packs.get(id).map(|p| &p.1[..]).unwrap_or_default() {
                index.remove_chunk(cluster, hash)?;
            }
        }
        index.flush().await?;
        for hash in &loose {
            store.delete(&layout::chunk_key(cluster, hash)).await?;
        }
        for id in &dead_packs {
            store.delete(&layout::pack_key(cluster, id)).await?;
        }
    }
    if out.collected_chunks > 0 {
        tracing::info!(%cluster, chunks = out.collected_chunks, bytes = out.collected_chunk_bytes, dry_run, "unreferenced chunks collected");
    }
    Ok(out)
}

/// Adds the chunks backup `id`'s manifest names to `referenced`. A manifest the store
/// does not hold names nothing: that backup cannot be restored, and its record was
/// forgotten at the start of the run (a dry run only reports it).
async fn read_referenced(
    store: &Store,
    cluster: &str,
    id: &str,
    referenced: &mut BTreeSet<String>,
) -> Result<()> {
    if let Some((m, _)) = read_manifest(store, cluster, id).await? {
        referenced.extend(m.chunk_hashes().map(String::from));
    }
    Ok(())
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
