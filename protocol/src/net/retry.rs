//! One retry policy, for requests whose failure classifies itself.
//!
//! A failure says whether it may pass ([`Transient::is_transient`]: the archive is
//! unreachable or shutting down, the connection broke, a deadline passed, a storage
//! hiccup); [`retry`] repeats only those, at most [`RetryPolicy::attempts`] times and
//! never starting an attempt after [`RetryPolicy::deadline`], with doubling delays, each
//! jittered (a random half of it added to the other half) so clients that failed
//! together do not come back together. Permanent failures (not found, refused,
//! invalid) are returned at once, and so is any error that does not classify itself.
//! The deadline bounds when attempts start; each attempt is bounded by its own request
//! deadlines ([`crate::net::client`]).

use std::future::Future;
use std::time::Duration;

/// An error that knows whether trying again may succeed.
pub trait Transient {
    /// Whether the same request may succeed later.
    fn is_transient(&self) -> bool;
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
    /// No attempt starts later than this after the first one began (`None`: only
    /// `attempts` bounds the retries).
    pub deadline: Option<Duration>,
}

impl Default for RetryPolicy {
    /// 4 attempts within 10 s (the delays add up to about 1.4 s): rides out an archive
    /// restart's refusals and a broken connection, and gives up on a lasting failure
    /// (a full disk answered as `Internal`) after a few tries.
    fn default() -> Self {
        RetryPolicy {
            attempts: 4,
            first_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(2),
            deadline: Some(Duration::from_secs(10)),
        }
    }
}

/// `delay` with jitter: its first half plus a random part of its second half.
fn jittered(delay: Duration) -> Duration {
    use std::hash::{BuildHasher, Hasher};
    // A fresh RandomState is seeded randomly per process and per call: enough to spread
    // clients apart, no dependency needed.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(delay.as_nanos());
    let half = delay / 2;
    let spread = half.as_nanos() as u64;
    let extra = if spread == 0 {
        0
    } else {
        h.finish() % (spread + 1)
    };
    half + Duration::from_nanos(extra)
}

/// Runs `op` until it succeeds, fails permanently, or the attempts are used up.
pub async fn retry<T, E, F, Fut>(policy: &RetryPolicy, mut op: F) -> Result<T, E>
where
    E: Transient + std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let started = tokio::time::Instant::now();
    let mut delay = policy.first_delay;
    let mut attempt = 1;
    loop {
        match op().await {
            Ok(v) => return Ok(v),
            Err(e) if e.is_transient() && attempt < policy.attempts.max(1) => {
                let wait = jittered(delay);
                if let Some(deadline) = policy.deadline {
                    if started.elapsed() + wait > deadline {
                        return Err(e);
                    }
                }
                tracing::warn!(attempt, retry_in = ?wait, error = %e, "transient failure; retrying");
                tokio::time::sleep(wait).await;
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
    use crate::core::wire::ErrorCode;
    use crate::net::client::ClientError;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[derive(Debug, PartialEq)]
    struct Failure(bool);
    impl std::fmt::Display for Failure {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "failure (transient: {})", self.0)
        }
    }
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
            deadline: None,
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
        let refusal = |code| ClientError::Refused {
            what: "chunk x".into(),
            code,
            message: "m".into(),
        };
        let e = anyhow::Error::new(refusal(ErrorCode::Unavailable)).context("fetching");
        assert!(e.is_transient());
        let e = anyhow::Error::new(refusal(ErrorCode::NotFound));
        assert!(!e.is_transient());
        // A broken connection classifies itself as transient: a QUIC blip must not end a
        // multi-hour backup (before ArchiveClient, transport failures were plain strings
        // and this test asserted that "connection lost" was permanent).
        let lost = anyhow::Error::new(ClientError::ConnectionLost {
            what: "pack".into(),
            reason: "timed out".into(),
            answered: false,
        })
        .context("uploading");
        assert!(lost.is_transient());
        // What nothing classifies stays permanent.
        assert!(!anyhow::anyhow!("connection lost").is_transient());
    }

    #[tokio::test(start_paused = true)]
    async fn no_attempt_starts_after_the_deadline() {
        let policy = RetryPolicy {
            attempts: 1000,
            first_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(4),
            deadline: Some(Duration::from_secs(30)),
        };
        let started = tokio::time::Instant::now();
        let calls = AtomicU32::new(0);
        let last_start = std::sync::Mutex::new(Duration::ZERO);
        let r: Result<(), Failure> = retry(&policy, || async {
            calls.fetch_add(1, Ordering::SeqCst);
            *last_start.lock().unwrap() = started.elapsed();
            Err(Failure(true))
        })
        .await;
        assert_eq!(r, Err(Failure(true)));
        let calls = calls.load(Ordering::SeqCst);
        // Delays of at least 0.5, 1, 2, then 2 s each: no more than 17 starts fit in 30 s,
        // and at least 8 (1 + 2 + 4 + 4 ... at most).
        assert!((8..=17).contains(&calls), "{calls} attempts");
        assert!(*last_start.lock().unwrap() <= Duration::from_secs(30));
    }

    #[test]
    fn jitter_stays_within_the_upper_half() {
        let delay = Duration::from_millis(800);
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..200 {
            let j = jittered(delay);
            assert!(j >= delay / 2 && j <= delay, "{j:?}");
            seen.insert(j);
        }
        assert!(seen.len() > 1, "no jitter: always {seen:?}");
        assert_eq!(jittered(Duration::ZERO), Duration::ZERO);
    }
}
