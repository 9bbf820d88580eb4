//! Who may delete what, and when: the chunk-liveness lock.
//!
//! A backup's chunks are uploaded long before its manifest, which alone makes them
//! referenced; until then only the catalog's `touched` time of each chunk protects it.
//! The rules:
//!
//! - Requests that rely on chunks staying where the catalog says (`ChunksMissing`, which
//!   refreshes `touched` of every chunk it reports present, and `PutBackup`, which checks
//!   every chunk of the manifest before committing it) hold [`Gc::keep_chunks`], the
//!   shared side.
//! - Retention holds [`Gc::collect`], the exclusive side, for its whole run, and backup
//!   deletion holds it while it deletes a manifest: no manifest is committed meanwhile,
//!   and a chunk a running backup relies on was touched within the grace period.
//! - A chunk no remaining manifest names is collectable once untouched for the grace
//!   period (service/retention.rs).

use tokio::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

/// The chunk-liveness lock of one archive.
#[derive(Default)]
pub(crate) struct Gc {
    lock: RwLock<()>,
}

/// Held while a request relies on chunks staying (shared).
pub(crate) struct KeepChunks<'a> {
    _guard: RwLockReadGuard<'a, ()>,
}

/// Held while chunks and backups are judged and deleted (exclusive).
pub(crate) struct Collect<'a> {
    _guard: RwLockWriteGuard<'a, ()>,
}

impl Gc {
    /// The shared side: chunks the catalog lists stay until it is dropped.
    pub(crate) async fn keep_chunks(&self) -> KeepChunks<'_> {
        KeepChunks {
            _guard: self.lock.read().await,
        }
    }

    /// The exclusive side: no request relies on chunks while it is held.
    pub(crate) async fn collect(&self) -> Collect<'_> {
        Collect {
            _guard: self.lock.write().await,
        }
    }
}
