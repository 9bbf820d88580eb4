//! archive-get: serve a WAL file from the prefetch spool or fetch it now, verified.
//!
//! Contract: a file appears at the destination only complete and verified. Fetched
//! bytes go to a temporary file beside the destination while they are decompressed and
//! hashed; only when size and blake3 match what the archive recorded at push time is the
//! file fsynced and renamed into place. A spool hit is hashed again against the
//! archive's blake3 before it is moved into place (see [`crate::spool`]); a fetch writes
//! through [`crate::fetch`]. PostgreSQL never sees a partial or corrupt file.
//!
//! Exit codes are PostgreSQL's contract (DESIGN promise 7, table in `main.rs`): "not in
//! the archive" is [`Fetched::NotFound`] (exit 1, everywhere). A failure that may pass
//! (as `ClientError::is_transient` decides: archive unreachable, a deadline passed,
//! connection lost, the archive answering `Unavailable` or `Internal`) is retried with
//! doubling delays for `[archive_get] recovery_retry_secs` in archive recovery
//! (`recovery.signal` and no `standby.signal` in the working directory, which PostgreSQL
//! makes its data directory), `standby_retry_secs` otherwise. What is left after that, and
//! any failure that will not pass (the archived copy fails verification, the file cannot
//! be written), is a [`GetFailure`]: in archive recovery it must stop recovery (exit 1
//! there would make PostgreSQL end recovery at this file and promote, silently short of
//! the archive's WAL), elsewhere it is exit 1
//! (a standby tries streaming and asks again).

use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::Result;
use walvault_protocol::core::pg::wal::WalFileName;
use walvault_protocol::net::client::ArchiveClient;
use walvault_protocol::net::config::ClientConfig;
use walvault_protocol::net::retry::{retry, RetryPolicy};

use crate::fetch::{fetch_to, Fetched};
use crate::spool::Spool;
use walvault_protocol::core::wire::audit::FetchPurpose;
use walvault_protocol::net::client::new_request_id;

/// What PostgreSQL does with a failed restore_command, by the signal files in its data
/// directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RecoveryKind {
    /// `recovery.signal` without `standby.signal`: a failure (exit 1) ends recovery.
    Archive,
    /// A standby, or not run by PostgreSQL (no data directory): exit 1 is retried.
    Other,
}

impl RecoveryKind {
    fn of(pgdata: Option<&Path>) -> RecoveryKind {
        match pgdata {
            Some(d) if d.join("recovery.signal").exists() && !d.join("standby.signal").exists() => {
                RecoveryKind::Archive
            }
            _ => RecoveryKind::Other,
        }
    }
}

/// archive-get could not deliver a file the archive may have.
#[derive(Debug, thiserror::Error)]
#[error("{error:#}")]
pub(crate) struct GetFailure {
    /// Where PostgreSQL is: in archive recovery this failure must stop recovery.
    pub(crate) kind: RecoveryKind,
    /// What went wrong (after the retries).
    pub(crate) error: anyhow::Error,
}

/// The restore_command: spool first, then the archive.
pub(crate) async fn archive_get(
    cfg: &ClientConfig,
    config_path: &Path,
    name: &str,
    dest: &Path,
) -> Result<Fetched, GetFailure> {
    let Ok(wal_name) = name.parse::<WalFileName>() else {
        tracing::info!(file = %name, "not a WAL file name; nothing to restore");
        return Ok(Fetched::NotFound);
    };
    // PostgreSQL runs restore_command in its data directory; run anywhere else (by hand),
    // archive-get just fetches.
    let pgdata = std::env::current_dir()
        .ok()
        .filter(|d| d.join("PG_VERSION").is_file());
    let kind = RecoveryKind::of(pgdata.as_deref());
    let spool = match pgdata {
        Some(pgdata) if cfg.prefetch.enabled && wal_name.is_segment_file() => {
            match Spool::for_pgdata(cfg, &pgdata) {
                Ok(s) => Some(s),
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "prefetch spool unusable; fetching directly");
                    None
                }
            }
        }
        _ => None,
    };
    let mut started = false;
    if let Some(spool) = &spool {
        started = spool.notify_or_start(config_path, name);
        match spool.take(name, dest) {
            Ok(Some(outcome)) => {
                spool.record_served(name, true, started);
                tracing::info!(file = %name, "restored from the prefetch spool");
                return Ok(outcome);
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(file = %name, error = %format!("{e:#}"), "spool copy unusable; fetching directly")
            }
        }
    }
    let retry_for = Duration::from_secs(match kind {
        RecoveryKind::Archive => cfg.archive_get.recovery_retry_secs,
        RecoveryKind::Other => cfg.archive_get.standby_retry_secs,
    });
    // The archive's audit trail keeps this id (`archived wal history`); the log lines
    // below, which PostgreSQL's log holds, name it.
    let request = new_request_id();
    let outcome = fetch_retrying(cfg, name, dest, retry_for, &request)
        .await
        .map_err(|error| GetFailure { kind, error })?;
    if let (Some(spool), Fetched::Written { .. }) = (&spool, &outcome) {
        spool.record_served(name, false, started);
    }
    match &outcome {
        Fetched::Written {
            raw_size,
            partial_bytes: None,
            ..
        } => {
            tracing::info!(file = %name, bytes = raw_size, %request, "restored")
        }
        Fetched::Written {
            partial_bytes: Some(held),
            ..
        } => {
            tracing::info!(file = %name, wal_bytes = held, %request, "restored the streaming receiver's unfinished segment (zero-padded)")
        }
        Fetched::NotFound => tracing::info!(file = %name, %request, "not in the archive"),
    }
    Ok(outcome)
}

/// Connects and fetches, again with doubling delays while the failure may pass
/// ([`walvault_protocol::net::client::ClientError::is_transient`] decides) and `retry_for` has not run out.
async fn fetch_retrying(
    cfg: &ClientConfig,
    name: &str,
    dest: &Path,
    retry_for: Duration,
    request: &str,
) -> Result<Fetched> {
    let started = Instant::now();
    let attempts = AtomicU32::new(0);
    let policy = RetryPolicy {
        attempts: u32::MAX,
        first_delay: Duration::from_millis(200),
        max_delay: Duration::from_secs(5),
        deadline: Some(retry_for),
    };
    let fetched = retry(&policy, || async {
        attempts.fetch_add(1, Ordering::Relaxed);
        let archive = ArchiveClient::connect(cfg).await?;
        let outcome = fetch_to(&archive, name, dest, FetchPurpose::Restore, request).await;
        archive.close().await;
        outcome
    })
    .await;
    match fetched {
        Ok(outcome) => Ok(outcome),
        Err(e) if e.is_transient() => Err(anyhow::Error::from(e).context(format!(
            "{name}: still failing after {} attempts in {} s",
            attempts.load(Ordering::Relaxed),
            started.elapsed().as_secs()
        ))),
        Err(e) => Err(e.into()),
    }
}
