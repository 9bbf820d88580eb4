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
//!
//! # Cancellation
//!
//! A caller's future may be dropped at any await (a request timed out, a client went
//! away). The round a leader starts is finished by the blocking task that runs the
//! syncfs, not by the leader's future: whether the leader is still there or not, the
//! round's result reaches every waiter. Should that task die without a result (a panic),
//! a drop guard fails the round and wakes the waiters with an error; `running` is never
//! left set.

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
    /// Why the last failed round failed.
    last_error: String,
}

/// What makes the filesystem durable: `syncfs` in production, anything in tests.
type Syncer = Arc<dyn Fn() -> std::io::Result<()> + Send + Sync>;

/// The state every caller and the running round share.
struct Shared {
    rounds: Mutex<Rounds>,
    done: Notify,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Rounds> {
        self.rounds.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Ends the round that covers tickets up to `target` and wakes every waiter.
    fn finish(&self, target: u64, result: Result<(), String>) {
        {
            let mut r = self.lock();
            r.running = false;
            match result {
                Ok(()) => r.covered = r.covered.max(target),
                // Everyone of this round fails, not only the caller that ran it.
                Err(e) => {
                    r.failed_through = r.failed_through.max(target);
                    r.last_error = e;
                }
            }
        }
        self.done.notify_waiters();
    }
}

/// A running round: finished by [`Round::complete`], or failed when dropped without it.
struct Round {
    shared: Arc<Shared>,
    target: u64,
    completed: bool,
}

impl Round {
    fn complete(mut self, result: Result<(), String>) {
        self.completed = true;
        self.shared.finish(self.target, result);
    }
}

impl Drop for Round {
    fn drop(&mut self) {
        if !self.completed {
            self.shared
                .finish(self.target, Err("the sync ended without a result".into()));
        }
    }
}

/// Coalesces durability requests into shared `syncfs` calls on one filesystem.
pub(crate) struct SyncGroup {
    /// Opened when the group is made, before anything it covers is written, so every
    /// writeback error since then reaches a syncfs.
    syncer: Result<Syncer, String>,
    shared: Arc<Shared>,
}

impl SyncGroup {
    /// For the filesystem holding `root`.
    pub(crate) fn new(root: &Path) -> SyncGroup {
        let syncer = FsSync::open(root)
            .map(|fs| Arc::new(move || fs.sync()) as Syncer)
            .map_err(|e| format!("cannot open {} to sync it: {e}", root.display()));
        SyncGroup::with_syncer(syncer)
    }

    fn with_syncer(syncer: Result<Syncer, String>) -> SyncGroup {
        SyncGroup {
            syncer,
            shared: Arc::new(Shared {
                rounds: Mutex::new(Rounds::default()),
                done: Notify::new(),
            }),
        }
    }

    /// Returns once everything written before this call is durable. Cancel-safe: a
    /// dropped call leaves the group as if it had never been made, whether it was
    /// waiting or leading a round (see the module header).
    pub(crate) async fn sync(&self) -> std::io::Result<()> {
        let syncer = self.syncer.clone().map_err(std::io::Error::other)?;
        let shared = &self.shared;
        let ticket = {
            let mut r = shared.lock();
            r.issued += 1;
            r.issued
        };
        loop {
            let notified = shared.done.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let lead = {
                let mut r = shared.lock();
                if r.failed_through >= ticket {
                    return Err(std::io::Error::other(format!(
                        "syncing the store's filesystem failed ({}): what was written may not \
                         be durable",
                        r.last_error
                    )));
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
            if let Some(target) = lead {
                // The round belongs to the blocking task from here on: it finishes the
                // round (or its guard fails it) whatever becomes of this future.
                let round = Round {
                    shared: shared.clone(),
                    target,
                    completed: false,
                };
                let syncer = syncer.clone();
                tokio::task::spawn_blocking(move || {
                    round.complete(syncer().map_err(|e| e.to_string()));
                });
            }
            notified.await;
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
        let r = group.shared.lock();
        assert_eq!(r.covered, 32);
        assert!(!r.running);
    }

    /// Before: the dropped leader left `running` set, and every later caller waited
    /// forever.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dropped_leader_does_not_strand_its_waiters() {
        // The first sync waits until the test lets it go, so the leader's round is surely
        // running when the leader is dropped; later ones (however many rounds the waiters
        // need, as they arrive) pass at once.
        let (release, gate) = std::sync::mpsc::channel::<()>();
        let gate = Mutex::new(gate);
        let (started_tx, started) = std::sync::mpsc::channel::<()>();
        let started_tx = Mutex::new(started_tx);
        let first = std::sync::atomic::AtomicBool::new(true);
        let syncer: Syncer = Arc::new(move || {
            if !first.swap(false, std::sync::atomic::Ordering::SeqCst) {
                return Ok(());
            }
            let _ = started_tx.lock().unwrap().send(());
            gate.lock().unwrap().recv().map_err(std::io::Error::other)
        });
        let group = Arc::new(SyncGroup::with_syncer(Ok(syncer)));

        let mut leader = Box::pin(group.sync());
        assert!(futures::poll!(&mut leader).is_pending());
        tokio::task::spawn_blocking(move || started.recv().unwrap())
            .await
            .unwrap();
        assert!(group.shared.lock().running, "the leader's round is running");
        let waiters: Vec<_> = (0..3)
            .map(|_| {
                let group = group.clone();
                tokio::spawn(async move { group.sync().await })
            })
            .collect();
        drop(leader);
        release.send(()).unwrap();
        for w in waiters {
            tokio::time::timeout(std::time::Duration::from_secs(30), w)
                .await
                .expect("a waiter of a dropped leader never finished")
                .unwrap()
                .unwrap();
        }
        let r = group.shared.lock();
        assert!(!r.running);
        assert_eq!(r.covered, 4);
    }

    /// A round whose sync task dies without a result fails its callers; the next round
    /// runs.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_round_that_ends_without_a_result_fails_its_callers_and_the_next_one_runs() {
        let calls = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let counted = calls.clone();
        let syncer: Syncer = Arc::new(move || {
            if counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
                panic!("the first sync dies");
            }
            Ok(())
        });
        let group = SyncGroup::with_syncer(Ok(syncer));
        let e = group.sync().await.unwrap_err();
        assert!(e.to_string().contains("without a result"), "{e}");
        group.sync().await.unwrap();
        assert!(!group.shared.lock().running);
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
