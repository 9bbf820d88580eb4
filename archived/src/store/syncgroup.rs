//! Group commit for many small objects on a local store.
//!
//! A backup writes thousands of chunk objects; an fsync of each file and of its directory
//! would make the disk's flush latency the backup's speed. Instead, every writer of the
//! moment waits on one shared `syncfs(2)` of the store's filesystem: [`SyncGroup::sync`]
//! returns only once a syncfs that *started after the call* has completed, so whatever
//! the caller wrote before calling is durable, exactly as after its own fsyncs. Concurrent
//! callers share the same syncfs; one runs at a time.
//!
//! A chunk is written to a temporary file, synced (data durable), hard-linked to its
//! final name, and synced again (the name durable) before it is acknowledged or indexed:
//! a crash at any point leaves either no object or a complete one under its name.

use std::path::Path;
use std::sync::{Arc, Mutex};

use walvault_protocol::net::fsutil::FsSync;

use tokio::sync::Notify;

#[derive(Default)]
struct Rounds {
    /// Tickets handed out (one per call).
    issued: u64,
    /// Every ticket up to this one is covered by a completed syncfs.
    covered: u64,
    /// A syncfs is running.
    running: bool,
    /// Every ticket up to this one was in a round whose syncfs failed.
    failed_through: u64,
}

/// Coalesces durability requests into shared `syncfs` calls on one filesystem.
pub(crate) struct SyncGroup {
    /// Opened when the group is made, before anything it covers is written, so every
    /// writeback error since then reaches a syncfs.
    fs: Result<Arc<FsSync>, String>,
    rounds: Mutex<Rounds>,
    done: Notify,
}

impl SyncGroup {
    /// For the filesystem holding `root`.
    pub(crate) fn new(root: &Path) -> SyncGroup {
        SyncGroup {
            fs: FsSync::open(root)
                .map(Arc::new)
                .map_err(|e| format!("cannot open {} to sync it: {e}", root.display())),
            rounds: Mutex::new(Rounds::default()),
            done: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Rounds> {
        self.rounds.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Returns once everything written before this call is durable.
    pub(crate) async fn sync(&self) -> std::io::Result<()> {
        let fs = self.fs.clone().map_err(std::io::Error::other)?;
        let ticket = {
            let mut r = self.lock();
            r.issued += 1;
            r.issued
        };
        loop {
            let notified = self.done.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let lead = {
                let mut r = self.lock();
                if r.failed_through >= ticket {
                    return Err(std::io::Error::other(
                        "syncing the store's filesystem failed (a writeback error): what was written may not be durable",
                    ));
                }
                if r.covered >= ticket {
                    return Ok(());
                }
                if r.running {
                    None
                } else {
                    r.running = true;
                    Some(r.issued)
                }
            };
            let Some(target) = lead else {
                notified.await;
                continue;
            };
            let fs = fs.clone();
            let result = tokio::task::spawn_blocking(move || fs.sync())
                .await
                .unwrap_or_else(|e| Err(std::io::Error::other(e)));
            {
                let mut r = self.lock();
                r.running = false;
                match &result {
                    Ok(()) => r.covered = r.covered.max(target),
                    // Everyone of this round fails, not only the caller that ran it.
                    Err(_) => r.failed_through = r.failed_through.max(target),
                }
            }
            self.done.notify_waiters();
            result?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_callers_share_syncs_and_all_return() {
        let dir = tempfile::tempdir().unwrap();
        let group = Arc::new(SyncGroup::new(dir.path()));
        let mut tasks = Vec::new();
        for i in 0..32 {
            let group = group.clone();
            let path = dir.path().join(format!("f{i}"));
            tasks.push(tokio::spawn(async move {
                std::fs::write(&path, b"x").unwrap();
                group.sync().await.unwrap();
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let r = group.lock();
        assert_eq!(r.covered, 32);
        assert!(!r.running);
    }

    #[tokio::test]
    async fn a_filesystem_that_cannot_be_opened_fails_every_sync() {
        let group = SyncGroup::new(Path::new("/nonexistent/walvault-store"));
        for _ in 0..2 {
            let e = group.sync().await.unwrap_err();
            assert!(e.to_string().contains("cannot open"), "{e}");
        }
    }
}
