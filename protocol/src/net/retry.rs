//! One retry policy, for requests whose failure classifies itself.
//!
//! A failure says whether it may pass ([`Transient::is_transient`]: the archive is
//! shutting down, a storage hiccup); [`retry`] repeats only those, a bounded number of
//! times with doubling delays, and returns the last error otherwise. Permanent failures
//! (not found, refused, invalid) are returned at once.

use std::future::Future;
use std::time::Duration;

use crate::core::wire::ErrorCode;

/// An error that knows whether trying again may succeed.
pub trait Transient {
    /// Whether the same request may succeed later.
    fn is_transient(&self) -> bool;
}

/// The archive answered a request with an error.
#[derive(Debug, Clone, thiserror::Error)]
#[error("archive refused {what} ({code:?}): {message}")]
pub struct ArchiveRefusal {
    /// What was asked for, for the message.
    pub what: String,
    /// The archive's class of failure.
    pub code: ErrorCode,
    /// The archive's explanation.
    pub message: String,
}

impl Transient for ArchiveRefusal {
    fn is_transient(&self) -> bool {
        self.code.is_transient()
    }
}

/// An `anyhow` error is transient when an [`ArchiveRefusal`] in its chain is.
impl Transient for anyhow::Error {
    fn is_transient(&self) -> bool {
        self.chain().any(|c| {
            c.downcast_ref::<ArchiveRefusal>()
                .is_some_and(ArchiveRefusal::is_transient)
        })
    }
}

/// How often and how patiently to retry.
#[derive(Clone, Debug)]
pub struct RetryPolicy {
    /// Attempts in all (at least 1).
    pub attempts: u32,
    /// Delay before the second attempt; doubles after each failure.
    pub first_delay: Duration,
    /// Longest delay between attempts.
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    /// 4 attempts over about 1.4 s: rides out an archive restart's refusals, gives up
    /// before a caller's own timeout matters.
    fn default() -> Self {
        RetryPolicy {
            attempts: 4,
            first_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(2),
        }
    }
}

/// Runs `op` until it succeeds, fails permanently, or the attempts are used up.
pub async fn retry<T, E, F, Fut>(policy: &RetryPolicy, mut op: F) -> Result<T, E>
where
    E: Transient,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut delay = policy.first_delay;
    let mut attempt = 1;
    loop {
        match op().await {
            Ok(v) => return Ok(v),
            Err(e) if e.is_transient() && attempt < policy.attempts.max(1) => {
                tracing::debug!(attempt, ?delay, "transient failure; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(policy.max_delay);
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[derive(Debug, PartialEq)]
    struct Failure(bool);
    impl Transient for Failure {
        fn is_transient(&self) -> bool {
            self.0
        }
    }

    fn quick(attempts: u32) -> RetryPolicy {
        RetryPolicy {
            attempts,
            first_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(2),
        }
    }

    #[tokio::test]
    async fn retries_transient_failures_only_and_within_bounds() {
        let calls = AtomicU32::new(0);
        let r: Result<u32, Failure> = retry(&quick(4), || async {
            let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
            if n < 3 {
                Err(Failure(true))
            } else {
                Ok(n)
            }
        })
        .await;
        assert_eq!(r, Ok(3));

        let calls = AtomicU32::new(0);
        let r: Result<(), Failure> = retry(&quick(4), || async {
            calls.fetch_add(1, Ordering::SeqCst);
            Err(Failure(false))
        })
        .await;
        assert_eq!(r, Err(Failure(false)));
        assert_eq!(
            calls.load(Ordering::SeqCst),
            1,
            "a permanent failure is not retried"
        );

        let calls = AtomicU32::new(0);
        let r: Result<(), Failure> = retry(&quick(3), || async {
            calls.fetch_add(1, Ordering::SeqCst);
            Err(Failure(true))
        })
        .await;
        assert_eq!(r, Err(Failure(true)));
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn refusals_classify_through_anyhow() {
        let refusal = |code| ArchiveRefusal {
            what: "chunk x".into(),
            code,
            message: "m".into(),
        };
        let e = anyhow::Error::new(refusal(ErrorCode::Unavailable)).context("fetching");
        assert!(e.is_transient());
        let e = anyhow::Error::new(refusal(ErrorCode::NotFound));
        assert!(!e.is_transient());
        assert!(!anyhow::anyhow!("connection lost").is_transient());
    }
}
