//! A backup's state in the archive: which WAL it needs, whether all of it is archived
//! (*usable*), and its restore window.
//!
//! A backup is *usable* when every WAL segment from its start to its stop LSN is in the
//! archive, the store's objects checked, not only the catalog (a backup spanning a
//! timeline switch may have its later segments on the stop timeline); `restorable_until`
//! is the archive time of the last segment after it on its timeline without a gap.

use anyhow::Result;
use walvault_protocol::core::pg::wal::{Lsn, SegmentName, TimelineId, WalFileName};
use walvault_protocol::core::wire::backup::{BackupRecord, BackupState, BackupSummary};

use super::Index;
use crate::store::{layout, Store};

/// The WAL segments a backup needs: first and last.
pub(crate) fn wal_range(r: &BackupRecord, seg_size: u32) -> Result<(SegmentName, SegmentName)> {
    let start: Lsn = r
        .start_lsn
        .parse()
        .map_err(|_| anyhow::anyhow!("backup {}: bad start LSN", r.id))?;
    let stop: Lsn = r
        .stop_lsn
        .parse()
        .map_err(|_| anyhow::anyhow!("backup {}: bad stop LSN", r.id))?;
    Ok((
        SegmentName::containing(TimelineId(r.timeline), start, seg_size),
        SegmentName::containing(
            TimelineId(r.stop_timeline),
            Lsn(stop.0.saturating_sub(1).max(start.0)),
            seg_size,
        ),
    ))
}

/// A record with its WAL state and restore window.
pub(crate) async fn summarize(
    store: &Store,
    index: &Index,
    cluster: &str,
    r: &BackupRecord,
) -> Result<BackupSummary> {
    let seg_size = index.segment_size(cluster)?;
    let (first, last) = wal_range(r, seg_size)?;
    let mut usable = true;
    let mut seg = first;
    let last_no = last.segno(seg_size);
    while seg.segno(seg_size) <= last_no {
        // A backup spanning a timeline switch has its later segments on the new timeline.
        let on_stop_tli = SegmentName {
            timeline: last.timeline,
            ..seg
        };
        let archived = if index.has_segment(cluster, &seg)? {
            Some(seg)
        } else if index.has_segment(cluster, &on_stop_tli)? {
            Some(on_stop_tli)
        } else {
            None
        };
        // The store outranks the catalog: an entry whose object is gone (deleted behind
        // archived's back) does not make a backup usable. One look per segment of the
        // backup's own range (a few), not of its restore window.
        let stored = match archived {
            Some(s) => store
                .len(&layout::wal_key(cluster, &WalFileName::Segment(s)))
                .await?
                .is_some(),
            None => false,
        };
        if !stored {
            usable = false;
            break;
        }
        seg = seg.next(seg_size);
    }
    let (mut until, mut until_lsn) = (None, None);
    if usable {
        let mut end = last;
        loop {
            let next = end.next(seg_size);
            if !index.has_segment(cluster, &next)? {
                break;
            }
            end = next;
        }
        let key = layout::wal_key(cluster, &WalFileName::Segment(end));
        until = store.modified(&key).await?.map(|t| t.max(r.stop_time));
        until_lsn = Some(end.next(seg_size).start_lsn(seg_size).to_string());
    }
    Ok(BackupSummary {
        record: r.clone(),
        state: if usable {
            BackupState::Usable
        } else {
            BackupState::IncompleteWal
        },
        wal_start: first.to_string(),
        wal_stop: last.to_string(),
        restorable_until: until,
        restorable_until_lsn: until_lsn,
    })
}

/// One backup with its state, `None` if the cluster has no backup of that id.
pub(crate) async fn backup_state(
    store: &Store,
    index: &Index,
    cluster: &str,
    id: &str,
) -> Result<Option<BackupSummary>> {
    match index.backup(cluster, id)? {
        Some(r) => Ok(Some(summarize(store, index, cluster, &r).await?)),
        None => Ok(None),
    }
}

/// One page of the backups of a cluster with their state, oldest first: those whose id
/// sorts after `after`, at most `limit`, ending early once their JSON passes
/// `max_bytes` (the summary that passes it is the last); and the cursor of the next page
/// when more follow.
pub(crate) async fn backups_page(
    store: &Store,
    index: &Index,
    cluster: &str,
    after: Option<&str>,
    limit: usize,
    max_bytes: usize,
) -> Result<(Vec<BackupSummary>, Option<String>)> {
    let limit = limit.max(1);
    // One more than a page tells whether another follows.
    let records = index.backups_after(cluster, after, limit.saturating_add(1))?;
    let mut out = Vec::new();
    let mut bytes = 0;
    for r in &records {
        if out.len() == limit || bytes > max_bytes {
            break;
        }
        let summary = summarize(store, index, cluster, r).await?;
        bytes += serde_json::to_vec(&summary).map(|j| j.len()).unwrap_or(0);
        out.push(summary);
    }
    let next = (out.len() < records.len())
        .then(|| out.last().map(|b| b.record.id.clone()))
        .flatten();
    Ok((out, next))
}

/// Every backup of a cluster with its state, oldest first.
pub(crate) async fn list_backups(
    store: &Store,
    index: &Index,
    cluster: &str,
) -> Result<Vec<BackupSummary>> {
    let mut out = Vec::new();
    for r in index.backups(cluster)? {
        out.push(summarize(store, index, cluster, &r).await?);
    }
    Ok(out)
}
