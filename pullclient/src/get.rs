//! archive-get: serve a WAL file from the prefetch spool or fetch it now, verified.
//!
//! Contract: a file appears at the destination only complete and verified. Fetched
//! bytes go to a temporary file beside the destination while they are decompressed and
//! hashed; only when size and blake3 match what the archive recorded at push time is the
//! file fsynced and renamed into place. A spool hit is hashed again against the
//! archive's blake3 before it is moved into place (see [`crate::spool`]). PostgreSQL
//! never sees a partial or corrupt file.
//!
//! Exit codes are PostgreSQL's contract (DESIGN promise 7, table in `main.rs`): "not in
//! the archive" is [`Fetched::NotFound`] (exit 1, everywhere). A failure that may pass
//! (archive unreachable, connection lost, the archive answering `Unavailable` or
//! `Internal`) is retried with doubling delays for `[archive_get] recovery_retry_secs`
//! in archive recovery (`recovery.signal` and no `standby.signal` in the working
//! directory, which PostgreSQL makes its data directory), `standby_retry_secs`
//! otherwise. What is left after that, and any failure that will not pass (the archived
//! copy fails verification, the file cannot be written), is a [`GetFailure`]: in archive
//! recovery it must stop recovery (exit 1 there would make PostgreSQL end recovery at
//! this file and promote, silently short of the archive's WAL), elsewhere it is exit 1
//! (a standby tries streaming and asks again).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use walvault_protocol::core::format::codec::{DecodeOrSinkError, VerifyingDecoder};
use walvault_protocol::core::pg::wal::WalFileName;
use walvault_protocol::core::wire::{ErrorCode, Request, Response, MAX_OBJECT_SIZE};
use walvault_protocol::net::config::ClientConfig;
use walvault_protocol::net::fsutil;
use walvault_protocol::net::retry::{ArchiveRefusal, Transient};
use walvault_protocol::net::transport::{ArchiveConnection, ReadFrameError};

use crate::spool::Spool;

/// Outcome of a fetch that did not fail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Fetched {
    /// The file is at the destination; its size and blake3 as the archive recorded them.
    Written {
        /// Raw size.
        raw_size: u64,
        /// blake3, hex.
        blake3: String,
    },
    /// The archive does not have it.
    NotFound,
}

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

/// Whether a failed attempt may succeed later: the archive could not be reached, the
/// connection broke, or the archive said it is briefly unable to serve.
fn is_transient(e: &anyhow::Error) -> bool {
    e.is_transient()
        || e.chain().any(|c| {
            c.is::<quinn::ConnectionError>()
                || c.is::<quinn::ConnectError>()
                || c.is::<quinn::ReadError>()
                || c.is::<quinn::WriteError>()
                || c.is::<quinn::ReadExactError>()
                || c.downcast_ref::<ReadFrameError>()
                    .is_some_and(|r| matches!(r, ReadFrameError::Stream(_)))
        })
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
    if let Some(spool) = &spool {
        spool.notify_or_start(config_path, name);
        match spool.take(name, dest) {
            Ok(Some(outcome)) => {
                spool.record_served(name, true);
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
    let outcome = fetch_retrying(cfg, name, dest, retry_for)
        .await
        .map_err(|error| GetFailure { kind, error })?;
    if let (Some(spool), Fetched::Written { .. }) = (&spool, &outcome) {
        spool.record_served(name, false);
    }
    match &outcome {
        Fetched::Written { raw_size, .. } => {
            tracing::info!(file = %name, bytes = raw_size, "restored")
        }
        Fetched::NotFound => tracing::info!(file = %name, "not in the archive"),
    }
    Ok(outcome)
}

/// Connects and fetches, again with doubling delays while the failure may pass and
/// `retry_for` has not run out.
async fn fetch_retrying(
    cfg: &ClientConfig,
    name: &str,
    dest: &Path,
    retry_for: Duration,
) -> Result<Fetched> {
    let started = Instant::now();
    let mut delay = Duration::from_millis(200);
    let mut attempts = 1u32;
    loop {
        // (error, whether it may pass)
        let attempt = match ArchiveConnection::connect(&cfg.tls()).await {
            Err(e) => Err((anyhow::Error::from(e).context("archive unreachable"), true)),
            Ok(conn) => {
                let outcome = fetch_to(&conn, &cfg.cluster, name, dest).await;
                conn.close().await;
                outcome.map_err(|e| {
                    let transient = is_transient(&e);
                    (e, transient)
                })
            }
        };
        match attempt {
            Ok(outcome) => return Ok(outcome),
            Err((e, true)) if started.elapsed() + delay < retry_for => {
                tracing::warn!(file = %name, attempt = attempts, error = %format!("{e:#}"), "fetch failed; retrying in {delay:?}");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
                attempts += 1;
            }
            Err((e, true)) => {
                return Err(e.context(format!(
                    "{name}: still failing after {attempts} attempts in {} s",
                    started.elapsed().as_secs()
                )))
            }
            Err((e, false)) => return Err(e),
        }
    }
}

/// Fetches `name` over an open connection into `dest` (temporary file, verify, fsync,
/// rename). On any error nothing is left at `dest` or beside it.
pub(crate) async fn fetch_to(
    conn: &ArchiveConnection,
    cluster: &str,
    name: &str,
    dest: &Path,
) -> Result<Fetched> {
    let request = Request::GetWal {
        cluster: cluster.to_string(),
        name: name.to_string(),
    };
    let (response, mut recv) = conn.call(&request).await?;
    let (raw_size, blake3, compressed_size) = match response {
        Response::Object {
            raw_size,
            blake3,
            compressed_size,
        } => (raw_size, blake3, compressed_size),
        Response::Error {
            code: ErrorCode::NotFound,
            ..
        } => return Ok(Fetched::NotFound),
        Response::Error { code, message } => {
            return Err(ArchiveRefusal {
                what: name.to_string(),
                code,
                message,
            }
            .into())
        }
        other => bail!("unexpected answer for {name}: {other:?}"),
    };
    if raw_size > MAX_OBJECT_SIZE || compressed_size > MAX_OBJECT_SIZE {
        bail!("{name}: archive announced an impossible size ({raw_size} bytes)");
    }
    let tmp = fsutil::temp_path_beside(dest);
    let result = async {
        // Decoded output arrives in pieces as small as a QUIC packet's worth: batch writes.
        let mut file = std::io::BufWriter::with_capacity(
            1 << 20,
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&tmp)
                .with_context(|| format!("cannot create {}", tmp.display()))?,
        );
        receive_verified(
            &mut recv,
            name,
            raw_size,
            &blake3,
            compressed_size,
            "not handing it to PostgreSQL",
            |raw| file.write_all(raw),
        )
        .await?;
        let file = file.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        drop(file);
        fsutil::durable_rename(&tmp, dest)
            .with_context(|| format!("cannot move the file into {}", dest.display()))?;
        Ok::<(), anyhow::Error>(())
    }
    .await;
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result?;
    Ok(Fetched::Written { raw_size, blake3 })
}

/// Streams an object's body (what follows its `Object` frame) through decompression and
/// verification into `sink`. More bytes than announced, a corrupt or short frame, or a
/// size or blake3 other than announced is an error naming `what`; `consequence` says
/// what the caller does not do with the bytes then.
pub(crate) async fn receive_verified(
    recv: &mut quinn::RecvStream,
    what: &str,
    raw_size: u64,
    blake3: &str,
    compressed_size: u64,
    consequence: &str,
    mut sink: impl FnMut(&[u8]) -> std::io::Result<()>,
) -> Result<()> {
    let mut decoder = VerifyingDecoder::new(raw_size)?;
    let mut received = 0u64;
    while let Some(chunk) = recv
        .read_chunk(usize::MAX, true)
        .await
        .with_context(|| format!("download of {what} interrupted"))?
    {
        received += chunk.bytes.len() as u64;
        if received > compressed_size {
            bail!("{what}: archive sent more than the announced {compressed_size} bytes");
        }
        decoder
            .write(&chunk.bytes, &mut sink)
            .map_err(|e| match e {
                DecodeOrSinkError::Decode(d) => {
                    anyhow::Error::from(d).context(format!("{what}: archived copy is corrupt"))
                }
                DecodeOrSinkError::Sink(io) => {
                    anyhow::Error::from(io).context(format!("writing {what}"))
                }
            })?;
    }
    let summary = decoder
        .finish()
        .with_context(|| format!("{what}: archived copy is incomplete"))?;
    summary
        .check(raw_size, blake3)
        .with_context(|| format!("{what}: archived copy failed verification; {consequence}"))?;
    Ok(())
}

/// The data directory a restore_command runs in, made absolute.
pub(crate) fn absolute(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}
