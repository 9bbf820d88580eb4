//! archive-get: fetch one WAL file, verify it, write it atomically.
//!
//! The bytes go to a temporary file beside the destination while they are decompressed
//! and hashed; only when size and blake3 match what the archive recorded at push time is
//! the file fsynced and renamed into place. PostgreSQL never sees a partial or corrupt file.

use std::io::Write;
use std::path::Path;

use anyhow::{bail, Context, Result};
use walvault_protocol::codec::{DecodeOrSinkError, VerifyingDecoder};
use walvault_protocol::config::ClientConfig;
use walvault_protocol::fsutil;
use walvault_protocol::transport::ArchiveConnection;
use walvault_protocol::wal::WalFileName;
use walvault_protocol::wire::{ErrorCode, Request, Response, MAX_OBJECT_SIZE};

/// Outcome of a fetch that did not fail.
pub(crate) enum Fetched {
    /// The file is at the destination.
    Written,
    /// The archive does not have it.
    NotFound,
}

pub(crate) async fn archive_get(cfg: &ClientConfig, name: &str, dest: &Path) -> Result<Fetched> {
    if name.parse::<WalFileName>().is_err() {
        tracing::info!(file = %name, "not a WAL file name; nothing to restore");
        return Ok(Fetched::NotFound);
    }
    let conn = ArchiveConnection::connect(cfg)
        .await
        .context("archive unreachable; PostgreSQL will retry")?;
    let request = Request::GetWal {
        cluster: cfg.cluster.clone(),
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
        } => {
            tracing::info!(file = %name, "not in the archive");
            conn.close().await;
            return Ok(Fetched::NotFound);
        }
        Response::Error { code, message } => bail!("archive refused {name} ({code:?}): {message}"),
        other => bail!("unexpected answer for {name}: {other:?}"),
    };
    if raw_size > MAX_OBJECT_SIZE || compressed_size > MAX_OBJECT_SIZE {
        bail!("{name}: archive announced an impossible size ({raw_size} bytes)");
    }

    let tmp = fsutil::temp_path_beside(dest);
    let result = async {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .with_context(|| format!("cannot create {}", tmp.display()))?;
        let mut decoder = VerifyingDecoder::new(raw_size)?;
        let mut received = 0u64;
        while let Some(chunk) = recv
            .read_chunk(usize::MAX, true)
            .await
            .context("download interrupted")?
        {
            received += chunk.bytes.len() as u64;
            if received > compressed_size {
                bail!("{name}: archive sent more than the announced {compressed_size} bytes");
            }
            decoder
                .write(&chunk.bytes, |raw| file.write_all(raw))
                .map_err(|e| match e {
                    DecodeOrSinkError::Decode(d) => {
                        anyhow::Error::from(d).context(format!("{name}: archived copy is corrupt"))
                    }
                    DecodeOrSinkError::Sink(io) => {
                        anyhow::Error::from(io).context(format!("writing {}", tmp.display()))
                    }
                })?;
        }
        let summary = decoder
            .finish()
            .with_context(|| format!("{name}: archived copy is incomplete"))?;
        summary.check(raw_size, &blake3).with_context(|| {
            format!("{name}: archived copy failed verification; not handing it to PostgreSQL")
        })?;
        file.sync_all()?;
        drop(file);
        fsutil::durable_rename(&tmp, dest)
            .with_context(|| format!("cannot move the file into {}", dest.display()))?;
        Ok(())
    }
    .await;
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    conn.close().await;
    result?;
    tracing::info!(file = %name, bytes = raw_size, "restored");
    Ok(Fetched::Written)
}
