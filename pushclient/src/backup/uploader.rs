//! Chunk uploads of a backup: only the chunks the archive lacks are sent, in packs.
//!
//! Chunks are batched ([`BATCH_BYTES`]), the archive says which of a batch it lacks, and
//! only those are compressed and sent as packs, [`PACKS_IN_FLIGHT`] at a time; an upload
//! that fails transiently (the archive unreachable or refusing for now, a deadline, a
//! broken connection: `ClientError::is_transient`) is retried (protocol::retry). Every
//! request names the backup's lease (the client is [`ArchiveClient::with_lease`]'s).
//!
//! Memory: at most three [`BATCH_BYTES`] batches of chunks (filling, queued, being
//! uploaded), [`PACKS_IN_FLIGHT`] packs compressed at a time, and a bounded set of
//! recently seen hashes ([`KNOWN_HASHES`]).

use std::collections::HashSet;

use anyhow::{anyhow, Result};
use bytes::Bytes;
use walvault_protocol::core::format::manifest::BackupStats;
use walvault_protocol::core::wire::backup::{
    PackChunk, MAX_CHUNKS_PER_PACK, MAX_HASHES_PER_REQUEST,
};
use walvault_protocol::net::client::{ArchiveClient, PackStored};
use walvault_protocol::net::fanout::Fanout;
use walvault_protocol::net::retry::{retry, RetryPolicy};

/// Chunks held while the archive is asked which it lacks (one batch being filled, one
/// queued, one being uploaded: 3 x 8 MiB at most).
const BATCH_BYTES: usize = 8 << 20;
/// Raw bytes of chunks per pack (one `PutPack` request, one object in the store): one
/// file or PUT per 8 MiB instead of one per 128 KiB chunk.
const PACK_RAW_BYTES: usize = 8 << 20;
/// Packs compressed and sent at once (compression of one overlaps the upload and the
/// archive's verification of the others): at most 3 x 8 MiB raw plus their frames.
const PACKS_IN_FLIGHT: usize = 3;
/// Hashes remembered to skip repeats within one backup (mostly all-zero chunks) without
/// asking the archive again: ~10 MiB at most, whatever the database size.
const KNOWN_HASHES: usize = 65_536;

/// Sends the chunks the archive lacks. Batches go to a worker task that asks the archive
/// which chunks it lacks and uploads those, while the tar stream keeps being read: at
/// most one batch waits in the channel and one is being worked on.
pub(super) struct Uploader {
    known: HashSet<String>,
    pending: Vec<(String, Bytes)>,
    pending_bytes: usize,
    batches: Option<tokio::sync::mpsc::Sender<Vec<(String, Bytes)>>>,
    worker: tokio::task::JoinHandle<Result<BackupStats>>,
}

impl Uploader {
    pub(super) fn new(archive: ArchiveClient, level: i32) -> Uploader {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        Uploader {
            known: HashSet::new(),
            pending: Vec::new(),
            pending_bytes: 0,
            batches: Some(tx),
            worker: tokio::spawn(upload_batches(archive, level, rx)),
        }
    }

    pub(super) async fn add(&mut self, hash: String, data: Bytes) -> Result<()> {
        if self.known.len() >= KNOWN_HASHES {
            self.known.clear();
        }
        if !self.known.insert(hash.clone()) {
            return Ok(());
        }
        self.pending_bytes += data.len();
        self.pending.push((hash, data));
        if self.pending_bytes >= BATCH_BYTES || self.pending.len() >= MAX_HASHES_PER_REQUEST {
            self.flush().await?;
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let batch = std::mem::take(&mut self.pending);
        self.pending_bytes = 0;
        let sent = match &self.batches {
            Some(tx) => tx.send(batch).await.is_ok(),
            None => false,
        };
        if !sent {
            // The worker stopped: its result says why.
            self.batches = None;
            return match (&mut self.worker).await {
                Ok(Err(e)) => Err(e),
                Ok(Ok(_)) => Err(anyhow!("chunk uploads stopped early")),
                Err(e) => Err(anyhow!("chunk upload task failed: {e}")),
            };
        }
        Ok(())
    }

    pub(super) async fn finish(mut self) -> Result<BackupStats> {
        self.flush().await?;
        self.batches = None;
        self.worker
            .await
            .map_err(|e| anyhow!("chunk upload task failed: {e}"))?
    }
}

async fn upload_batches(
    archive: ArchiveClient,
    level: i32,
    mut batches: tokio::sync::mpsc::Receiver<Vec<(String, Bytes)>>,
) -> Result<BackupStats> {
    let mut uploads: Fanout<PackStored> = Fanout::new(PACKS_IN_FLIGHT);
    while let Some(batch) = batches.recv().await {
        let missing: HashSet<String> = archive
            .chunks_missing(batch.iter().map(|(h, _)| h.clone()).collect())
            .await?
            .into_iter()
            .collect();
        let mut packs: Vec<Vec<(String, Bytes)>> = vec![Vec::new()];
        let mut raw = 0usize;
        for (hash, data) in batch.into_iter().filter(|(h, _)| missing.contains(h)) {
            let full = packs.last().is_some_and(|p| {
                p.len() >= MAX_CHUNKS_PER_PACK || raw + data.len() > PACK_RAW_BYTES
            });
            if full {
                packs.push(Vec::new());
                raw = 0;
            }
            raw += data.len();
            if let Some(p) = packs.last_mut() {
                p.push((hash, data));
            }
        }
        for pack in packs.into_iter().filter(|p| !p.is_empty()) {
            let archive = archive.clone();
            uploads
                .spawn(async move {
                    let (chunks, body) =
                        tokio::task::spawn_blocking(move || compress_pack(&pack, level)).await??;
                    Ok(retry(&RetryPolicy::default(), || {
                        archive.put_pack(chunks.clone(), body.clone())
                    })
                    .await?)
                })
                .await?;
        }
    }
    let mut stats = BackupStats::default();
    for stored in uploads.finish().await? {
        stats.new_chunks += stored.new_chunks as u64;
        stats.new_stored_bytes += stored.stored_bytes;
    }
    Ok(stats)
}

/// Compresses the chunks of a pack: what `PutPack` announces, and its body.
fn compress_pack(chunks: &[(String, Bytes)], level: i32) -> Result<(Vec<PackChunk>, Bytes)> {
    let mut cctx = zstd::bulk::Compressor::new(level)?;
    let mut listed = Vec::with_capacity(chunks.len());
    let mut body = Vec::new();
    for (hash, data) in chunks {
        let frame = cctx.compress(data)?;
        listed.push(PackChunk {
            blake3: hash.clone(),
            raw_size: data.len() as u64,
            compressed_size: frame.len() as u64,
        });
        body.extend_from_slice(&frame);
    }
    Ok((listed, body.into()))
}
