//! archive-get: serve a WAL file from the prefetch spool or fetch it now, verified.
//!
//! Contract: a file appears at the destination only complete and verified. Fetched
//! bytes go to a temporary file beside the destination while they are decompressed and
//! hashed; only when size and blake3 match what the archive recorded at push time is the
//! file fsynced and renamed into place. A spool hit is hashed again against the
//! archive's blake3 before it is moved into place (see [`crate::spool`]). PostgreSQL
//! never sees a partial or corrupt file.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use walvault_protocol::core::format::codec::{DecodeOrSinkError, VerifyingDecoder};
use walvault_protocol::core::pg::wal::WalFileName;
use walvault_protocol::core::wire::{ErrorCode, Request, Response, MAX_OBJECT_SIZE};
use walvault_protocol::net::config::ClientConfig;
use walvault_protocol::net::fsutil;
use walvault_protocol::net::transport::ArchiveConnection;

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

/// The restore_command: spool first, then the archive.
pub(crate) async fn archive_get(
    cfg: &ClientConfig,
    config_path: &Path,
    name: &str,
    dest: &Path,
) -> Result<Fetched> {
    let Ok(wal_name) = name.parse::<WalFileName>() else {
        tracing::info!(file = %name, "not a WAL file name; nothing to restore");
        return Ok(Fetched::NotFound);
    };
    // PostgreSQL runs restore_command in the data directory.
    // PostgreSQL runs restore_command in its data directory; run anywhere else (by hand),
    // archive-get just fetches.
    let pgdata = std::env::current_dir()
        .ok()
        .filter(|d| d.join("PG_VERSION").is_file());
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
    let conn = ArchiveConnection::connect(&cfg.tls())
        .await
        .context("archive unreachable; PostgreSQL will retry")?;
    let outcome = fetch_to(&conn, &cfg.cluster, name, dest).await;
    conn.close().await;
    let outcome = outcome?;
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
        Response::Error { code, message } => bail!("archive refused {name} ({code:?}): {message}"),
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
