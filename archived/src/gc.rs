//! Who may delete what, and when: the chunk-liveness lock, backup leases, and the rules
//! that make chunk collection safe beside running backups.
//!
//! A backup's chunks are uploaded long before its manifest, which alone makes them
//! referenced. Until the manifest is committed two things keep them:
//!
//! - **The lease** of the backup ([`Gc::begin_backup`], `BeginBackup`): registered when
//!   the backup starts, renewed by each of its requests (`ChunksMissing`, `PutPack`,
//!   `PutChunk`, `PutBackup` name it), released when its manifest is committed, and
//!   expired [`LEASE_TTL_SECS`] after its last renewal. While a lease of a cluster is
//!   live, no chunk of that cluster touched since the lease began is collectable: every
//!   chunk the backup stored, or was told is present, was touched by that request.
//! - **The grace period**: an unreferenced chunk untouched for `chunk_grace` is
//!   collectable. With leases, the grace only guards against uploads that crashed (a
//!   backup killed midway) and clients that take no lease.
//!
//! And the lock ([`Gc::keep_chunks`] shared, [`Gc::judge_chunks`] exclusive):
//!
//! - Requests that rely on chunks staying where the catalog says hold the shared side:
//!   `ChunksMissing` (while it touches what it reports present), `PutBackup` (while it
//!   checks every chunk of the manifest and commits it), and `PutPack`/`PutChunk` while
//!   they commit their object and index it, so no chunk is ever committed but unindexed
//!   while chunks are judged. Uploads read their bodies before taking it.
//! - Retention holds the exclusive side only while it judges chunks and deletes the
//!   collectable ones (index entries first, flushed, then objects); it reads manifests
//!   and expires backups and WAL outside it. Whatever manifest was committed between its
//!   reading and its judging is read again under the lock ([`Gc::judge_chunks`]'s
//!   caller compares the backup list), so no newly referenced chunk is judged
//!   unreferenced.
//! - One retention run at a time ([`Gc::retention_run`]); it blocks no backup.
//! - A pack the catalog locates no chunk in (a crash between commit and index, or every
//!   chunk stored first elsewhere) is collected only once older than
//!   [`UNINDEXED_PACK_MIN_AGE_SECS`], whatever the grace period: a guard against clocks
//!   of the store and of archived that disagree, and against another archived over the
//!   same bucket between its commit and its index.

use std::collections::HashMap;
use std::sync::Mutex;

use tokio::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

/// A lease not renewed for this long has expired: the backup is presumed dead. pushclient
/// renews with every batch of chunks; only PostgreSQL's checkpoint at the start and the
/// end of the backup pass without requests.
pub(crate) const LEASE_TTL_SECS: i64 = 15 * 60;

/// Unindexed packs younger than this are never collected (see the module header).
pub(crate) const UNINDEXED_PACK_MIN_AGE_SECS: i64 = 3600;

struct Lease {
    cluster: String,
    started: i64,
    renewed: i64,
}

/// The chunk-liveness lock and the backup leases of one archive.
#[derive(Default)]
pub(crate) struct Gc {
    lock: RwLock<()>,
    run: tokio::sync::Mutex<()>,
    leases: Mutex<HashMap<String, Lease>>,
}

/// Held while a request relies on chunks staying (shared).
pub(crate) struct KeepChunks<'a> {
    _guard: RwLockReadGuard<'a, ()>,
}

/// Held while chunks are judged and deleted (exclusive).
pub(crate) struct JudgeChunks<'a> {
    _guard: RwLockWriteGuard<'a, ()>,
}

/// Held for a whole retention run.
pub(crate) struct RetentionRun<'a> {
    _guard: tokio::sync::MutexGuard<'a, ()>,
}

impl Gc {
    /// The shared side: chunks the catalog lists stay until it is dropped.
    pub(crate) async fn keep_chunks(&self) -> KeepChunks<'_> {
        KeepChunks {
            _guard: self.lock.read().await,
        }
    }

    /// The exclusive side: no request relies on chunks while it is held.
    pub(crate) async fn judge_chunks(&self) -> JudgeChunks<'_> {
        JudgeChunks {
            _guard: self.lock.write().await,
        }
    }

    /// One retention run at a time.
    pub(crate) async fn retention_run(&self) -> RetentionRun<'_> {
        RetentionRun {
            _guard: self.run.lock().await,
        }
    }

    fn leases(&self) -> std::sync::MutexGuard<'_, HashMap<String, Lease>> {
        self.leases.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new lease for a backup of `cluster` starting `now`: its id.
    pub(crate) fn begin_backup(&self, cluster: &str, now: i64) -> String {
        static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut h = blake3::Hasher::new();
        h.update(cluster.as_bytes());
        h.update(&now.to_le_bytes());
        h.update(&n.to_le_bytes());
        h.update(&std::process::id().to_le_bytes());
        let id = h.finalize().to_hex()[..32].to_string();
        self.leases().insert(
            id.clone(),
            Lease {
                cluster: cluster.to_string(),
                started: now,
                renewed: now,
            },
        );
        id
    }

    /// Renews a lease of `cluster` at `now`. A lease this archive does not know (it
    /// expired, or archived restarted) is registered again from `now`: chunks the backup
    /// touched before then are kept by the grace period only, and `PutBackup` refuses the
    /// backup if one of them was collected meanwhile.
    pub(crate) fn renew(&self, cluster: &str, id: &str, now: i64) {
        let mut leases = self.leases();
        match leases.get_mut(id) {
            Some(l) if l.cluster == cluster && now - l.renewed <= LEASE_TTL_SECS => l.renewed = now,
            _ => {
                tracing::warn!(%cluster, lease = %id, "backup lease unknown or expired; taken again from now");
                leases.insert(
                    id.to_string(),
                    Lease {
                        cluster: cluster.to_string(),
                        started: now,
                        renewed: now,
                    },
                );
            }
        }
    }

    /// Releases a lease (its manifest is committed).
    pub(crate) fn release(&self, cluster: &str, id: &str) {
        let mut leases = self.leases();
        if leases.get(id).is_some_and(|l| l.cluster == cluster) {
            leases.remove(id);
        }
    }

    /// The start of the oldest live lease of `cluster`: chunks touched at or after it are
    /// not collectable. Expired leases are forgotten.
    pub(crate) fn protected_since(&self, cluster: &str, now: i64) -> Option<i64> {
        let mut leases = self.leases();
        leases.retain(|_, l| now - l.renewed <= LEASE_TTL_SECS);
        leases
            .values()
            .filter(|l| l.cluster == cluster)
            .map(|l| l.started)
            .min()
    }
}

/// Whether an unreferenced chunk last touched at `touched` may be collected at `now`.
pub(crate) fn chunk_collectable(
    touched: i64,
    now: i64,
    grace_secs: i64,
    protected_since: Option<i64>,
) -> bool {
    now - touched >= grace_secs && protected_since.is_none_or(|since| touched < since)
}

/// Whether a pack the catalog locates no chunk in, written at `modified`, may be
/// collected at `now`.
pub(crate) fn unindexed_pack_collectable(modified: i64, now: i64, grace_secs: i64) -> bool {
    now - modified >= grace_secs.max(UNINDEXED_PACK_MIN_AGE_SECS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_live_lease_keeps_what_was_touched_since_it_began() {
        let gc = Gc::default();
        let id = gc.begin_backup("main", 1000);
        let since = gc.protected_since("main", 1001);
        assert_eq!(since, Some(1000));
        assert_eq!(gc.protected_since("other", 1001), None);
        assert!(
            !chunk_collectable(1000, 1001, 0, since),
            "touched by the backup"
        );
        assert!(
            chunk_collectable(999, 1001, 0, since),
            "older than the backup"
        );
        gc.renew("main", &id, 1000 + LEASE_TTL_SECS);
        assert_eq!(
            gc.protected_since("main", 1000 + 2 * LEASE_TTL_SECS),
            Some(1000)
        );
        gc.release("main", &id);
        assert_eq!(gc.protected_since("main", 1002), None);
        // Expiry, and a renewal after it starts a new lease.
        let id = gc.begin_backup("main", 5000);
        assert_eq!(gc.protected_since("main", 5001 + LEASE_TTL_SECS), None);
        gc.renew("main", &id, 9000);
        assert_eq!(gc.protected_since("main", 9001), Some(9000));
    }

    #[test]
    fn unindexed_packs_have_an_age_floor_that_grace_cannot_lower() {
        assert!(!unindexed_pack_collectable(1000, 1000 + 60, 0));
        assert!(unindexed_pack_collectable(
            1000,
            1000 + UNINDEXED_PACK_MIN_AGE_SECS,
            0
        ));
        assert!(!unindexed_pack_collectable(
            1000,
            1000 + UNINDEXED_PACK_MIN_AGE_SECS,
            2 * UNINDEXED_PACK_MIN_AGE_SECS
        ));
    }
}
