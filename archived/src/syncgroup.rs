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

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use tokio::sync::Notify;

#[derive(Default)]
struct Rounds {
    /// Tickets handed out (one per call).
    issued: u64,
    /// Every ticket up to this one is covered by a completed syncfs.
    covered: u64,
    /// A syncfs is running.
    running: bool,
}

/// Coalesces durability requests into shared `syncfs` calls on one filesystem.
pub struct SyncGroup {
    root: PathBuf,
    rounds: Mutex<Rounds>,
    done: Notify,
}

impl SyncGroup {
    /// For the filesystem holding `root`.
    pub fn new(root: &Path) -> SyncGroup {
        SyncGroup {
            root: root.to_path_buf(),
            rounds: Mutex::new(Rounds::default()),
            done: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Rounds> {
        self.rounds.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Returns once everything written before this call is durable.
    pub async fn sync(&self) -> std::io::Result<()> {
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
            let root = self.root.clone();
            let result = tokio::task::spawn_blocking(move || syncfs(&root))
                .await
                .unwrap_or_else(|e| Err(std::io::Error::other(e)));
            {
                let mut r = self.lock();
                r.running = false;
                if result.is_ok() {
                    r.covered = r.covered.max(target);
                }
            }
            self.done.notify_waiters();
            result?;
        }
    }
}

fn syncfs(root: &Path) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let dir = std::fs::File::open(root)?;
    // SAFETY: syncfs on a descriptor we own and keep open for the call.
    if unsafe { libc::syncfs(dir.as_raw_fd()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
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
}
