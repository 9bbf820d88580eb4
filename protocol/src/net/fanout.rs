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

    #[tokio::test]
    async fn never_more_than_limit_and_first_error_wins() {
        let running = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let mut f = Fanout::new(3);
        for i in 0..20u32 {
            let (running, peak) = (running.clone(), peak.clone());
            f.spawn(async move {
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                running.fetch_sub(1, Ordering::SeqCst);
                Ok(i)
            })
            .await
            .unwrap();
        }
        let mut got = f.finish().await.unwrap();
        got.sort();
        assert_eq!(got, (0..20).collect::<Vec<_>>());
        assert!(peak.load(Ordering::SeqCst) <= 3);

        let mut f = Fanout::new(2);
        f.spawn(async { Err::<(), _>(anyhow!("boom")) })
            .await
            .unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        let e = f.spawn(async { Ok(()) }).await.unwrap_err();
        assert!(e.to_string().contains("boom"));
    }
}
