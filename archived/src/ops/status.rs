//! `archived status`: one screen per cluster (`Request::Status`), read from the catalog
//! and the store at the time of the request: the newest segment and when the store took
//! it, WAL files and their stored bytes, the primary's `.ready` backlog as its newest push
//! reported it, the streaming receiver's durable position, backups (usable ones, the
//! newest, stored bytes), the recovery window (from the oldest usable backup's end to the
//! last WAL archived without a gap after the newest), and which named checks
//! (`archived check`, ops/check.rs) are not OK, and the newest retention and verify runs
//! (as they recorded themselves).

use anyhow::Result;
use walvault_protocol::core::pg::wal::{Lsn, WalFileName};
use walvault_protocol::core::wire::backup::BackupState;
use walvault_protocol::core::wire::{CheckStatus, ClusterStatus, ErrorCode, Response};
use walvault_protocol::net::pki::{ClientIdentity, Role};

use super::metrics::Metrics;
use crate::index::state;
use crate::service::{Archive, Refusal};
use crate::store::layout;

/// `Status`: of `cluster`, or of every cluster for an admin certificate.
pub(crate) async fn request(
    archive: &Archive,
    metrics: &Metrics,
    identity: &ClientIdentity,
    cluster: Option<&str>,
    now: i64,
) -> Result<Response, Refusal> {
    let names = match cluster {
        Some(c) => vec![c.to_string()],
        None if identity.role == Role::Admin => {
            archive.index.clusters().map_err(Refusal::internal)?
        }
        None => {
            return Err(Refusal::new(
                ErrorCode::Unauthorized,
                "only an admin certificate may ask for the status of every cluster",
            ))
        }
    };
    let mut clusters = Vec::with_capacity(names.len());
    for c in names {
        clusters.push(
            status(archive, metrics, &c, now)
                .await
                .map_err(Refusal::internal)?,
        );
    }
    Ok(Response::Status { clusters })
}

/// The status of `cluster` as of `now` (Unix seconds).
pub(crate) async fn status(
    archive: &Archive,
    metrics: &Metrics,
    cluster: &str,
    now: i64,
) -> Result<ClusterStatus> {
    let index = &archive.index;
    let binding = index.binding(cluster)?;
    let mut st = ClusterStatus {
        cluster: cluster.to_string(),
        system_identifier: binding.as_ref().map(|b| b.system_identifier),
        segment_size: binding.as_ref().map(|b| b.wal_segment_size),
        ready_files: metrics.reported_ready_files(cluster),
        ..ClusterStatus::default()
    };
    for (_, entry) in index.wal_files(cluster)? {
        st.wal_files += 1;
        st.wal_stored_bytes += entry.stored_size;
    }
    if let Some(newest) = index.last_segment(cluster)? {
        let key = layout::wal_key(cluster, &WalFileName::Segment(newest));
        st.newest_segment = Some(newest.to_string());
        st.newest_segment_time = archive.store.modified(&key).await?;
    }
    if let Some(end) = archive.streams.flushed_ends().await.get(cluster) {
        st.stream_flushed_lsn = Some(Lsn(*end).to_string());
    }
    for r in index.backups(cluster)? {
        st.backups += 1;
        st.backup_stored_bytes += r.stored_bytes;
        let s = state::summarize(&archive.store, index, cluster, &r).await?;
        if s.state != BackupState::Usable {
            continue;
        }
        st.usable_backups += 1;
        let end = s.record.stop_time;
        st.window_start = Some(st.window_start.map_or(end, |w| w.min(end)));
        if st.newest_backup_time.is_none_or(|t| end > t) {
            st.newest_backup = Some(s.record.id.clone());
            st.newest_backup_time = Some(end);
            st.window_end = s.restorable_until;
        }
    }
    if let Some(run) = index.retention_run(cluster)? {
        st.retention_last_run = Some(run.at);
        st.retention_error = run.error;
        st.retention_last_success = run.last_success;
        st.retention_expired_wal_files = run.removed.wal_files;
        st.retention_expired_backups = run.removed.backups;
    }
    if let Some(run) = index.verify_run(cluster)? {
        st.verify_last_run = Some(run.finished_at);
        st.verify_scope = Some(run.scope);
        st.verify_problems = run.problems;
    }
    let checks = super::check::run(archive, cluster, now).await?;
    st.failing_checks = checks
        .into_iter()
        .filter(|c| c.status != CheckStatus::Ok)
        .map(|c| (c.name, c.status))
        .collect();
    Ok(st)
}
