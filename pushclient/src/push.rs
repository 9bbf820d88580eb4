//! archive-push: validate, hash, compress and stream one WAL file to archived.
//!
//! Contract: returns Ok only once archived has acknowledged a durable store of exactly
//! these bytes (or reported that identical bytes were already stored). The file is read
//! twice (blake3 first, so the hash can lead the request; then compressed while sending),
//! in [`CHUNK_SIZE`] pieces: memory stays at a few chunks whatever the segment size.
//! If the file changes between the two reads, archived's check of the hash fails the push.

use std::io::Read;
use std::path::Path;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use walvault_protocol::core::format::codec::{Encoder, CHUNK_SIZE, HEAD_LEN};
use walvault_protocol::core::pg::wal::validate_wal_file;
use walvault_protocol::core::wire::{Request, Response};
use walvault_protocol::net::config::ClientConfig;
use walvault_protocol::net::transport::{read_frame, ArchiveConnection};

/// Compressed chunks queued between the compressing thread and the network.
const SEND_QUEUE: usize = 4;

pub(crate) async fn archive_push(cfg: &ClientConfig, path: &Path) -> Result<()> {
    let started = Instant::now();
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| anyhow!("{}: no usable file name", path.display()))?
        .to_string();
    let owned_path = path.to_path_buf();
    let (raw_size, blake3) = tokio::task::spawn_blocking(move || inspect(&owned_path)).await??;

    let conn = ArchiveConnection::connect(&cfg.tls()).await?;
    let request = Request::PutWal {
        cluster: cfg.cluster.clone(),
        name: name.clone(),
        raw_size,
        blake3: blake3.clone(),
    };
    let (mut send, mut recv) = conn.open(&request).await?;

    let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>>>(SEND_QUEUE);
    let owned_path = path.to_path_buf();
    let level = cfg.zstd_level;
    let compressor = tokio::task::spawn_blocking(move || compress_into(&owned_path, level, &tx));
    let mut sent = 0u64;
    let mut send_error = None;
    while let Some(chunk) = rx.recv().await {
        let chunk = chunk?;
        sent += chunk.len() as u64;
        if let Err(e) = send.write_all(&chunk).await {
            // The server may have refused early and stopped the stream: its answer says why.
            send_error = Some(e);
            break;
        }
    }
    drop(rx);
    let _ = compressor.await;
    if send_error.is_none() {
        send.finish().context("finishing the upload")?;
    }
    let response: Response = read_frame(&mut recv).await.map_err(|e| match &send_error {
        Some(se) => anyhow!("upload of {name} failed: {se}; no answer from the archive ({e})"),
        None => anyhow!("no answer from the archive for {name}: {e}"),
    })?;
    conn.close().await;
    match response {
        Response::Stored { already_present } => {
            tracing::info!(
                file = %name,
                raw_bytes = raw_size,
                sent_bytes = sent,
                already_present,
                ms = started.elapsed().as_millis() as u64,
                "archived"
            );
            Ok(())
        }
        Response::Error { code, message } => bail!("archive refused {name} ({code:?}): {message}"),
        other => bail!("unexpected answer from the archive for {name}: {other:?}"),
    }
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

pub(crate) async fn check(cfg: &ClientConfig) -> Result<()> {
    let conn = ArchiveConnection::connect(&cfg.tls()).await?;
    let (response, _) = conn.call(&Request::Ping).await?;
    conn.close().await;
    match response {
        Response::Pong {
            cluster,
            role,
            version,
        } => {
            println!("ok: archived {version} at {} accepts this certificate (cluster {cluster}, role {role})", cfg.server);
            Ok(())
        }
        Response::Error { code, message } => bail!("archive refused ({code:?}): {message}"),
        other => bail!("unexpected answer: {other:?}"),
    }
}
