//! Bounded parallelism: the one helper every parallel path uses.
//!
//! [`Fanout`] runs at most `limit` tasks at once: [`Fanout::spawn`] waits for a free slot
//! before it starts the next task (so a producer feeding it is throttled, and memory held
//! by queued work stays at `limit` tasks' worth), reports the first failure of any
//! finished task, and dropping the fan-out aborts whatever is still running.

use std::future::Future;
use std::sync::Arc;

use anyhow::{anyhow, Result};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

/// At most `limit` tasks at once, results collected in completion order.
pub struct Fanout<T> {
    slots: Arc<Semaphore>,
    tasks: JoinSet<Result<T>>,
    done: Vec<T>,
}

impl<T: Send + 'static> Fanout<T> {
    /// A fan-out running at most `limit` (at least 1) tasks at once.
    pub fn new(limit: usize) -> Fanout<T> {
        Fanout {
            slots: Arc::new(Semaphore::new(limit.max(1))),
            tasks: JoinSet::new(),
            done: Vec::new(),
        }
    }

    /// Starts `task` once a slot is free. Returns the error of a task that failed
    /// meanwhile (the caller should stop; dropping the fan-out cancels the rest).
    pub async fn spawn<F>(&mut self, task: F) -> Result<()>
    where
        F: Future<Output = Result<T>> + Send + 'static,
    {
        self.reap()?;
        let permit = self
            .slots
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| anyhow!("fan-out closed"))?;
        self.tasks.spawn(async move {
            let result = task.await;
            drop(permit);
            result
        });
        self.reap()
    }

    fn reap(&mut self) -> Result<()> {
        while let Some(joined) = self.tasks.try_join_next() {
            self.done.push(flatten(joined)?);
        }
        Ok(())
    }

    /// Tasks started and not yet finished.
    pub fn running(&self) -> usize {
        self.tasks.len()
    }

    /// Waits for every task; the first error wins (the others are aborted).
    pub async fn finish(mut self) -> Result<Vec<T>> {
        while let Some(joined) = self.tasks.join_next().await {
            self.done.push(flatten(joined)?);
        }
        Ok(std::mem::take(&mut self.done))
    }

    /// Takes the results of the tasks finished so far.
    pub fn take_done(&mut self) -> Result<Vec<T>> {
        self.reap()?;
        Ok(std::mem::take(&mut self.done))
    }
}

fn flatten<T>(joined: std::result::Result<Result<T>, tokio::task::JoinError>) -> Result<T> {
    match joined {
        Ok(r) => r,
        Err(e) if e.is_panic() => Err(anyhow!("a parallel task panicked: {e}")),
        Err(e) => Err(anyhow!("a parallel task was cancelled: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;
    use tokio::sync::mpsc;

    /// Generous bound that turns a hang (a serial or broken fan-out) into a failure.
    const HANG: Duration = Duration::from_secs(30);

    #[tokio::test]
    async fn runs_exactly_limit_tasks_at_once() {
        let running = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let release = Arc::new(Semaphore::new(0));
        let (started_tx, mut started_rx) = mpsc::unbounded_channel();
        let task = |i: u32| {
            let (running, peak, release) = (running.clone(), peak.clone(), release.clone());
            let started = started_tx.clone();
            async move {
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(now, Ordering::SeqCst);
                let _ = started.send(i);
                release.acquire().await?.forget();
                running.fetch_sub(1, Ordering::SeqCst);
                Ok(i)
            }
        };
        let body = async {
            let mut f = Fanout::new(3);
            for i in 0..3 {
                f.spawn(task(i)).await.unwrap();
            }
            for _ in 0..3 {
                started_rx.recv().await.unwrap();
            }
            assert_eq!(
                running.load(Ordering::SeqCst),
                3,
                "the three tasks run at once"
            );
            // A fourth waits for a slot: polled once, its spawn is still pending.
            tokio::select! {
                biased;
                _ = f.spawn(task(3)) => panic!("a fourth task started beside three running ones"),
                _ = std::future::ready(()) => {}
            }
            release.add_permits(1);
            f.spawn(task(3)).await.unwrap();
            started_rx.recv().await.unwrap();
            release.add_permits(3);
            let mut got = f.finish().await.unwrap();
            got.sort();
            assert_eq!(got, vec![0, 1, 2, 3]);
        };
        tokio::time::timeout(HANG, body)
            .await
            .expect("the fan-out never ran three tasks at once, or never freed a slot");
        assert_eq!(peak.load(Ordering::SeqCst), 3);
    }

    /// On the current-thread runtime this is deterministic: the failing task runs to
    /// completion (releasing its slot, then storing its result) before the waiting
    /// `spawn` is polled again, so that `spawn` sees the failure.
    #[tokio::test(flavor = "current_thread")]
    async fn a_failure_is_reported_by_the_next_spawn_and_by_finish() {
        let mut f = Fanout::new(1);
        f.spawn(async { Err::<(), _>(anyhow!("boom")) })
            .await
            .unwrap();
        let e = tokio::time::timeout(HANG, f.spawn(async { Ok(()) }))
            .await
            .expect("the failed task never freed its slot")
            .unwrap_err();
        assert!(e.to_string().contains("boom"), "{e:#}");

        let mut f = Fanout::new(2);
        f.spawn(async { Ok(()) }).await.unwrap();
        f.spawn(async { Err::<(), _>(anyhow!("bang")) })
            .await
            .unwrap();
        let e = f.finish().await.unwrap_err();
        assert!(e.to_string().contains("bang"), "{e:#}");
    }
}
