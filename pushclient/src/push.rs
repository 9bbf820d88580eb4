//! archive-push: validate, hash, compress and stream one WAL file to archived.
//!
//! Contract: returns Ok only once archived has acknowledged a durable store of exactly
//! these bytes (or reported that identical bytes were already stored). The file is read
//! twice (blake3 first, so the hash can lead the request; then compressed while sending),
//! in [`CHUNK_SIZE`] pieces: memory stays at a few chunks whatever the segment size.
//! If the file changes between the two reads, archived's check of the hash fails the push.
//! The upload has the config's deadlines ([`ArchiveClient`]): an archive that stops
//! reading or answering fails it within `idle_timeout_secs`, so PostgreSQL's archiver is
//! never held by a wedged archive.

use std::io::Read;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use futures::StreamExt;
use walvault_protocol::core::format::codec::{Encoder, CHUNK_SIZE, HEAD_LEN};
use walvault_protocol::core::pg::wal::validate_wal_file;
use walvault_protocol::net::client::{new_request_id, ArchiveClient};
use walvault_protocol::net::config::ClientConfig;

/// Compressed chunks queued between the compressing thread and the network.
const SEND_QUEUE: usize = 4;

/// The primary's archiving backlog: `.ready` files in the `archive_status` directory
/// beside the file pushed (`pg_wal/archive_status/`), `None` when there is none (a file
/// pushed from elsewhere) or it cannot be read.
fn ready_files(path: &Path) -> Option<u64> {
    let status = path.parent()?.join("archive_status");
    let entries = std::fs::read_dir(status).ok()?;
    Some(
        entries
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".ready"))
            .count() as u64,
    )
}

pub(crate) async fn archive_push(cfg: &ClientConfig, path: &Path) -> Result<()> {
    let started = Instant::now();
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| anyhow!("{}: no usable file name", path.display()))?
        .to_string();
    let owned_path = path.to_path_buf();
    let (raw_size, blake3) = tokio::task::spawn_blocking(move || inspect(&owned_path)).await??;

    let archive = ArchiveClient::connect(cfg).await?;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>>>(SEND_QUEUE);
    let owned_path = path.to_path_buf();
    let level = cfg.zstd_level;
    let compressor = tokio::task::spawn_blocking(move || compress_into(&owned_path, level, &tx));
    let sent = AtomicU64::new(0);
    // The compressed pieces as the body; a compression failure ends it as a local error.
    let body = futures::stream::unfold(rx, |mut rx| async move {
        let piece = rx.recv().await?;
        Some((piece, rx))
    })
    .map(|piece| match piece {
        Ok(bytes) => {
            sent.fetch_add(bytes.len() as u64, Ordering::Relaxed);
            Ok(Bytes::from(bytes))
        }
        Err(e) => Err(std::io::Error::other(format!("{e:#}"))),
    });
    // Dropping the body (with the request) stops the compressor at its next piece.
    let backlog = ready_files(path);
    // The archive's audit trail keeps this id (`archived wal history`): it is in this
    // log line, which PostgreSQL's log holds, and in the error when the push fails.
    let request = new_request_id();
    let stored = archive
        .put_wal_reporting(&name, raw_size, &blake3, backlog, Some(&request), body)
        .await;
    let _ = compressor.await;
    archive.close().await;
    let already_present = stored?;
    tracing::info!(
        file = %name,
        %request,
        raw_bytes = raw_size,
        sent_bytes = sent.load(Ordering::Relaxed),
        already_present,
        ms = started.elapsed().as_millis() as u64,
        "archived"
    );
    Ok(())
}

/// Validates the file and returns its size and blake3.
fn inspect(path: &Path) -> Result<(u64, String)> {
    let mut file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let len = file.metadata()?.len();
    let mut hasher = blake3::Hasher::new();
    let mut head = Vec::with_capacity(HEAD_LEN);
    let mut buf = vec![0u8; CHUNK_SIZE];
    let mut total = 0u64;
    loop {
        let n = file
            .read(&mut buf)
            .with_context(|| format!("cannot read {}", path.display()))?;
        if n == 0 {
            break;
        }
        if head.len() < HEAD_LEN {
            let take = (HEAD_LEN - head.len()).min(n);
            head.extend_from_slice(&buf[..take]);
        }
        hasher.update(&buf[..n]);
        total += n as u64;
    }
    if total != len {
        bail!("{}: file changed size while being read", path.display());
    }
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    validate_wal_file(name, &head, len)
        .with_context(|| format!("refusing to archive {}", path.display()))?;
    Ok((len, hasher.finalize().to_hex().to_string()))
}

fn compress_into(path: &Path, level: i32, tx: &tokio::sync::mpsc::Sender<Result<Vec<u8>>>) {
    let run = || -> Result<()> {
        let mut file = std::fs::File::open(path)?;
        let mut encoder = Encoder::new(level)?;
        let mut buf = vec![0u8; CHUNK_SIZE];
        loop {
            let n = file.read(&mut buf)?;
            let mut out = Vec::with_capacity(CHUNK_SIZE / 2);
            if n == 0 {
                encoder.finish(&mut out)?;
                let _ = tx.blocking_send(Ok(out));
                return Ok(());
            }
            encoder.write(&buf[..n], &mut out)?;
            if !out.is_empty() && tx.blocking_send(Ok(out)).is_err() {
                return Ok(());
            }
        }
    };
    if let Err(e) = run() {
        let _ = tx.blocking_send(Err(e.context(format!("compressing {}", path.display()))));
    }
}
