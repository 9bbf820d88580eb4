//! The audit trail: what is recorded at each step, and its way into the store.
//!
//! Contract:
//!
//! - Every step of a WAL file's life is one record (`core::wire::audit`): received,
//!   refused, stored, acknowledged (`PutWal`, and the streaming receiver's segments),
//!   served and prefetched (`GetWal`), expired (retention), verified (`archived verify`,
//!   a record of the cluster). Records carry the client's request id and the peer
//!   certificate.
//! - A stored and an acknowledged step are in the catalog before the client hears of
//!   them: they are written before the flush that makes the WAL entry durable, so they
//!   cost no fsync of their own. The other steps are flushed with the next flush (sled
//!   flushes every half second by itself).
//! - The trail is kept in the store too: [`export`] writes the records not yet there as
//!   create-only batches (`<cluster>/audit/`, store/layout.rs) every [`EXPORT_INTERVAL`],
//!   at shutdown, and after retention; a catalog rebuild reads them back. A catalog lost
//!   between a step and the next export loses that step's records, at most
//!   [`EXPORT_INTERVAL`] of them; the WAL itself is never at stake, and the rebuild
//!   records every WAL file the store holds without a record as `stored` (from its
//!   object; when and by whom unknown), so no stored file is missing from the trail.
//! - The trail expires with the files it describes: retention replaces a file's records
//!   by one `expired` record that summarizes them, and [`prune`] deletes a batch once
//!   every file it names has expired and the summaries are in later batches. Records of
//!   the cluster (verify runs) in a pruned batch are written again into a new one first.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Result;
use bytes::Bytes;
use walvault_protocol::core::pg::wal::WalFileName;
use walvault_protocol::core::wire::audit::{AuditRecord, FetchPurpose, Step, AUDIT_PAGE_RECORDS};
use walvault_protocol::core::wire::Response;

use super::{Ctx, Refusal, Reply};

use crate::index::audit::{batch_bytes, record};
use crate::index::Index;
use crate::store::{layout, Store};

/// How often records are written to the store.
pub(crate) const EXPORT_INTERVAL: Duration = Duration::from_secs(10);

/// Records per batch object at most.
const BATCH_RECORDS: usize = 5000;

/// Who caused a step: the request's id and the peer certificate.
#[derive(Clone, Debug, Default)]
pub(crate) struct Provenance {
    /// The client's request id.
    pub(crate) request: Option<String>,
    /// The peer, as [`walvault_protocol::net::pki::ClientIdentity::peer`] names it.
    pub(crate) peer: String,
}

impl Provenance {
    /// A record of `step` of `file` stamped with this provenance.
    pub(crate) fn record(&self, cluster: &str, file: &str, step: Step) -> AuditRecord {
        let mut r = record(cluster, Some(file), step);
        r.request = self.request.clone();
        r.peer = Some(self.peer.clone());
        r
    }
}

/// Adds a record, logging (not failing the request) when the catalog cannot take it.
pub(crate) fn note(index: &Index, record: AuditRecord) {
    if let Err(e) = index.audit_put(record) {
        tracing::error!(error = %format!("{e:#}"), "cannot record an audit trail step");
    }
}

/// Writes every record not yet in the store as batches (one per cluster, at most
/// [`BATCH_RECORDS`] records each), then flushes the catalog. Returns how many.
pub(crate) async fn export(store: &Store, index: &Index) -> Result<usize> {
    let mut total = 0;
    loop {
        let pending = index.audit_unexported(BATCH_RECORDS)?;
        if pending.is_empty() {
            break;
        }
        let mut by_cluster: BTreeMap<String, Vec<AuditRecord>> = BTreeMap::new();
        for r in pending {
            by_cluster.entry(r.cluster.clone()).or_default().push(r);
        }
        for (cluster, records) in by_cluster {
            let bytes = batch_bytes(&records)?;
            let hash = blake3::hash(&bytes).to_hex();
            let key = layout::audit_key(&cluster, &records[0].id, &hash);
            // Exists: the same records, exported before a crash forgot it.
            store.put_new(&key, Bytes::from(bytes)).await?;
            index.audit_exported(&cluster, &key, &records)?;
            total += records.len();
        }
        index.flush().await?;
    }
    Ok(total)
}

/// Deletes the batches of `cluster` whose files have all expired, once the records that
/// replace them are in the store. Returns how many.
pub(crate) async fn prune(store: &Store, index: &Index, cluster: &str) -> Result<usize> {
    export(store, index).await?;
    let prunable = index.audit_prunable(cluster)?;
    if prunable.is_empty() {
        return Ok(0);
    }
    for (_, entry) in &prunable {
        index.audit_requeue(cluster, &entry.cluster_records)?;
    }
    export(store, index).await?;
    // Entry first (flushed), object second, as every deletion.
    for (key, _) in &prunable {
        index.audit_forget_batch(cluster, key)?;
    }
    index.flush().await?;
    for (key, _) in &prunable {
        store.delete(key).await?;
    }
    Ok(prunable.len())
}

/// The exporter of a running server: every [`EXPORT_INTERVAL`] until aborted.
pub(crate) async fn run(store: &Store, index: &Index) {
    let mut tick = tokio::time::interval(EXPORT_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Err(e) = export(store, index).await {
            tracing::warn!(error = %format!("{e:#}"), pending = index.audit_pending(), "cannot write the audit trail to the store; retrying");
        }
    }
}

/// What a `GetWal` answer sent, for its record.
pub(crate) struct Sent<'a> {
    pub(crate) cluster: &'a str,
    pub(crate) name: &'a str,
    pub(crate) purpose: FetchPurpose,
    pub(crate) raw_size: u64,
    pub(crate) blake3: String,
    /// The streaming receiver's unfinished segment: the WAL bytes it held.
    pub(crate) partial_bytes: Option<u64>,
    pub(crate) took: Duration,
}

/// Records a WAL file sent whole to a client: `prefetched` for a prefetch daemon,
/// `served` otherwise.
pub(crate) fn sent(index: &Index, provenance: &Provenance, s: &Sent<'_>) {
    let step = match s.purpose {
        FetchPurpose::Prefetch => Step::Prefetched,
        _ => Step::Served,
    };
    let mut r = provenance.record(s.cluster, s.name, step);
    r.size = Some(s.raw_size);
    r.blake3 = Some(s.blake3.clone());
    r.duration_us = Some(s.took.as_micros() as u64);
    r.detail = Some(match s.partial_bytes {
        Some(held) => format!(
            "{}: the streaming receiver's unfinished segment ({held} bytes of WAL)",
            s.purpose.as_str()
        ),
        None => s.purpose.as_str().to_string(),
    });
    note(index, r);
}

/// `WalHistory` (admin): one file's records, oldest first.
pub(crate) fn history(ctx: &Ctx<'_>, cluster: &str, name: &str) -> Reply {
    ctx.require_admin("only an admin certificate may read the audit trail")?;
    name.parse::<WalFileName>()
        .map_err(|e| Refusal::invalid(e.to_string()))?;
    let mut records = ctx
        .index
        .audit_history(cluster, name)
        .map_err(Refusal::internal)?;
    if records.len() > AUDIT_PAGE_RECORDS {
        // The newest: a file fetched thousands of times keeps its latest story.
        records.drain(..records.len() - AUDIT_PAGE_RECORDS);
    }
    Ok(Response::Audit {
        records,
        next: None,
    })
}

/// `Audit` (admin): one page of a cluster's records from `since_us`.
pub(crate) fn since(ctx: &Ctx<'_>, cluster: &str, since_us: i64, after: Option<&str>) -> Reply {
    ctx.require_admin("only an admin certificate may read the audit trail")?;
    let (records, next) = ctx
        .index
        .audit_since(cluster, since_us, after, AUDIT_PAGE_RECORDS)
        .map_err(Refusal::internal)?;
    Ok(Response::Audit { records, next })
}
