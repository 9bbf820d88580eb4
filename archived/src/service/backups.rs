//! Base backup requests: chunk and pack uploads and downloads, manifests, listings,
//! deletion. Where things are kept is store/layout.rs and index/; who may delete what,
//! gc.rs.
//!
//! # Contracts
//!
//! - `PutChunk` answers `Stored` once the chunk is durable in the store; `PutPack`
//!   answers `PackStored` once the pack is, every chunk in it verified first.
//! - `PutBackup` answers `Stored` once the manifest is durable and indexed, and refuses a
//!   manifest that names a chunk the store does not hold, so a listed backup never lacks
//!   a chunk. `ChunksMissing` refreshes `touched` of every chunk it reports present, so
//!   a chunk a running backup counts on is within the grace period when retention looks
//!   at it; both hold the shared side of the GC lock (gc.rs), as do `PutPack` and
//!   `PutChunk` while they commit and index. `BeginBackup` takes the backup's lease,
//!   which those requests renew and a committed `PutBackup` releases.
//!
//! # Bounds
//!
//! Each request takes what it holds from the byte budget ([`super::budget`]) once its
//! body's first bytes are there, before it buffers, and never while it holds the GC lock:
//!
//! - `PutChunk`: the body whole (at most `MAX_CHUNK_SIZE` plus zstd's worst case) while
//!   it is verified, the decoder's window, and on a remote store the object's copy;
//! - `PutPack`: [`PACK_RECEIVE_MEMORY`] while it receives ([`PACK_GROUP_BYTES`] of
//!   frames at a time, one decoded chunk); then, given back, what the commit holds;
//! - `PutBackup`: the decoder, and [`MANIFEST_MEMORY_FACTOR`] times the raw manifest (up
//!   to `MAX_MANIFEST_SIZE`: its JSON is kept to be parsed), and the remote commit;
//! - `GetChunks`: what the store reads ahead of the answer (all of its chunks on a
//!   remote store), until the answer is sent.

use std::collections::BTreeSet;

use tokio::io::{AsyncRead, AsyncReadExt};
use walvault_protocol::core::format::codec::HEAD_LEN;
use walvault_protocol::core::format::codec::{DecodeOrSinkError, VerifyingDecoder, CHUNK_SIZE};
use walvault_protocol::core::format::manifest::{
    BackupManifest, MAX_CHUNK_SIZE, MAX_MANIFEST_SIZE,
};
use walvault_protocol::core::format::names;
use walvault_protocol::core::format::object::with_thread_decoder;
use walvault_protocol::core::format::pack;
use walvault_protocol::core::wire::backup::{
    PackChunk, MAX_CHUNKS_PER_GET, MAX_CHUNKS_PER_PACK, MAX_HASHES_PER_REQUEST, MAX_PACK_RAW_BYTES,
};
use walvault_protocol::core::wire::paging::{BACKUP_PAGE_BYTES, BACKUP_PAGE_ENTRIES};
use walvault_protocol::core::wire::{ErrorCode, Response};

use super::budget::{FrameStart, DECODER_OVERHEAD, READ_BUFFER};
use super::{BodyError, Ctx, Refusal, Reply, StreamReply, Streamed};
use crate::clock::unix_now;
use crate::index::backups::record_of;
use crate::index::chunks::ChunkEntry;
use crate::store::{self, layout, CreateOutcome, ObjectHeader, PendingObject, HEADER_LEN};

/// Longest backup label `PutBackup` accepts, in bytes: PostgreSQL's own limit for a
/// `BASE_BACKUP` label (MAXPGPATH), so every backup PostgreSQL made fits. The label is
/// shown by every listing and kept in the catalog.
pub(crate) const MAX_BACKUP_LABEL_LEN: usize = 1024;

/// Bytes of chunk frames a `PutPack` reads at a time (a single larger chunk is read
/// alone).
const PACK_GROUP_BYTES: u64 = 2 << 20;

/// What a `PutPack` holds while it receives: a group of frames, one decoded chunk, and
/// the pack's index and chunk headers (1024 chunks at most) with the decoder's context.
pub(crate) const PACK_RECEIVE_MEMORY: u64 = PACK_GROUP_BYTES + MAX_CHUNK_SIZE + DECODER_OVERHEAD;

/// What a manifest holds while `PutBackup` checks it, per raw byte: its JSON and the
/// manifest parsed from it side by side while it is parsed (the parse is at most about
/// 1.6 times the JSON: a chunk hash is 67 bytes of JSON and 104 parsed), then the
/// manifest and the set of its distinct chunks.
pub(crate) const MANIFEST_MEMORY_FACTOR: u64 = 3;

/// A manifest offered for storage: what `PutBackup` announces.
#[derive(Clone, Debug)]
pub(crate) struct ManifestUpload<'a> {
    /// Cluster name (already checked against the certificate).
    pub(crate) cluster: &'a str,
    /// Backup id.
    pub(crate) backup_id: &'a str,
    /// Size of the raw manifest.
    pub(crate) raw_size: u64,
    /// blake3 of the raw manifest, hex.
    pub(crate) blake3: &'a str,
    /// The backup's lease, released once the manifest is committed.
    pub(crate) lease: Option<&'a str>,
}

/// Renews the backup's lease, if the request names one.
fn renew(ctx: &Ctx<'_>, cluster: &str, lease: Option<&str>) {
    if let Some(id) = lease {
        ctx.gc.renew(cluster, id, unix_now());
    }
}

/// `BeginBackup`: a lease that keeps the chunks the backup touches (gc.rs).
pub(crate) fn begin_backup(ctx: &Ctx<'_>, cluster: &str) -> Reply {
    ctx.require_writer("store backups")?;
    let lease = ctx.gc.begin_backup(cluster, unix_now());
    tracing::debug!(%cluster, %lease, "backup lease taken");
    Ok(Response::BackupLease {
        lease,
        ttl_secs: crate::gc::LEASE_TTL_SECS as u64,
    })
}

/// Refuses a list of chunk hashes longer than `limit` or holding one that is not a hash.
fn validate_hashes(hashes: &[String], limit: usize, what: &str) -> Result<(), Refusal> {
    if hashes.len() > limit {
        return Err(Refusal::new(
            ErrorCode::TooLarge,
            format!(
                "{} {what} in one request; the limit is {limit}",
                hashes.len()
            ),
        ));
    }
    for h in hashes {
        names::validate_chunk_hash(h).map_err(Refusal::invalid)?;
    }
    Ok(())
}

fn not_such_backup(cluster: &str, backup_id: &str) -> Refusal {
    Refusal::new(
        ErrorCode::NotFound,
        format!(
            "backup {backup_id} does not exist in cluster '{cluster}' \
             (see `archived backups list --cluster {cluster}`)"
        ),
    )
}

/// `GetChunks`: the chunks asked for, whole stored objects back to back in the order
/// asked, after a `Chunks` frame; a chunk the store lacks refuses the whole request
/// first.
pub(crate) async fn get_chunks(ctx: &Ctx<'_>, cluster: &str, hashes: Vec<String>) -> StreamReply {
    validate_hashes(&hashes, MAX_CHUNKS_PER_GET, "chunks")?;
    let not_found = |h: &str| {
        Refusal::new(
            ErrorCode::NotFound,
            format!(
                "chunk {h} is not in the archive of cluster '{cluster}' \
                 (deleted by retention, or a damaged store?)"
            ),
        )
    };
    let mut locs = Vec::with_capacity(hashes.len());
    let mut sizes = Vec::with_capacity(hashes.len());
    for h in &hashes {
        match ctx.index.chunk(cluster, h).map_err(Refusal::internal)? {
            Some(e) => {
                sizes.push(e.stored_size);
                locs.push(e.location(cluster, h));
            }
            None => return Err(not_found(h)),
        }
    }
    let grant = ctx
        .budget
        .body(
            ctx.store.get_many_memory(&sizes),
            &format!("GetChunks of {} chunks", hashes.len()),
        )
        .await?;
    let objects = match ctx.store.get_many(locs).await.map_err(Refusal::internal)? {
        store::Many::Missing(i) => return Err(not_found(&hashes[i])),
        store::Many::Objects(s) => s,
    };
    Ok(Streamed {
        response: Response::Chunks {
            count: hashes.len() as u32,
        },
        body: super::holding(objects, grant),
        what: format!("{} chunks of {cluster}", hashes.len()),
    })
}

/// `GetBackup`: the manifest object.
pub(crate) async fn get_backup(ctx: &Ctx<'_>, cluster: &str, backup_id: &str) -> StreamReply {
    names::validate_backup_id(backup_id).map_err(Refusal::invalid)?;
    super::object(ctx, &layout::manifest_key(cluster, backup_id), || {
        not_such_backup(cluster, backup_id)
    })
    .await
}

/// `ListBackups`: one page, the backups after the cursor `after` (a backup id, as the
/// previous page's `next` gave it).
pub(crate) async fn list(ctx: &Ctx<'_>, cluster: &str, after: Option<&str>, paged: bool) -> Reply {
    if let Some(a) = after {
        names::validate_backup_id(a).map_err(Refusal::invalid)?;
    }
    // A client from before paging: the whole listing in one answer (or TooLarge).
    let (entries, bytes) = if paged {
        (BACKUP_PAGE_ENTRIES, BACKUP_PAGE_BYTES)
    } else {
        (usize::MAX, usize::MAX)
    };
    crate::index::state::backups_page(ctx.store, ctx.index, cluster, after, entries, bytes)
        .await
        .map(|(backups, next)| Response::Backups { backups, next })
        .map_err(Refusal::internal)
}

/// `BackupState`: one backup and its state, as a listing would say it.
pub(crate) async fn state(ctx: &Ctx<'_>, cluster: &str, backup_id: &str) -> Reply {
    names::validate_backup_id(backup_id).map_err(Refusal::invalid)?;
    crate::index::state::backup_state(ctx.store, ctx.index, cluster, backup_id)
        .await
        .map_err(Refusal::internal)?
        .map(|backup| Response::Backup { backup })
        .ok_or_else(|| not_such_backup(cluster, backup_id))
}

/// `PutPack`: receives a pack of chunks, verifies every one (size and blake3 of the
/// decompressed bytes) before anything is stored, stores the pack as one object
/// (`core::format::pack`) and indexes the chunks the catalog did not hold. A chunk
/// another backup stored meanwhile stays where it was indexed first; its copy in this
/// pack is dead weight, never wrong.
pub(crate) async fn put_pack(
    ctx: &Ctx<'_>,
    cluster: &str,
    chunks: Vec<PackChunk>,
    lease: Option<&str>,
    source: &mut (impl AsyncRead + Unpin + Send),
) -> Reply {
    ctx.require_writer("store backups")?;
    renew(ctx, cluster, lease);
    if chunks.is_empty() || chunks.len() > MAX_CHUNKS_PER_PACK {
        return Err(Refusal::new(
            ErrorCode::TooLarge,
            format!(
                "a pack holds 1 to {MAX_CHUNKS_PER_PACK} chunks, not {}",
                chunks.len()
            ),
        ));
    }
    let mut raw_total = 0u64;
    let mut body_len = 0u64;
    for c in &chunks {
        names::validate_chunk_hash(&c.blake3).map_err(Refusal::invalid)?;
        if c.raw_size > MAX_CHUNK_SIZE
            || c.compressed_size > ObjectHeader::max_compressed_size(c.raw_size)
        {
            return Err(Refusal::new(
                ErrorCode::TooLarge,
                format!(
                    "chunk {}: {} raw / {} compressed bytes exceed the limits ({MAX_CHUNK_SIZE} raw)",
                    c.blake3, c.raw_size, c.compressed_size
                ),
            ));
        }
        raw_total += c.raw_size;
        body_len += c.compressed_size;
    }
    if raw_total > MAX_PACK_RAW_BYTES {
        return Err(Refusal::new(
            ErrorCode::TooLarge,
            format!("a pack of {raw_total} raw bytes exceeds the {MAX_PACK_RAW_BYTES} byte limit"),
        ));
    }
    // The index goes first (offsets follow from the announced sizes); then each chunk is
    // read, verified and appended, a few at a time: memory stays at about one 2 MiB group
    // per upload whatever the pack's size. A chunk that fails verification, or a body
    // longer or shorter than announced, drops the temporary file: nothing is stored.
    let start = FrameStart::read(source, "pack").await?;
    let receiving = ctx.budget.body(PACK_RECEIVE_MEMORY, "PutPack").await?;
    let source = &mut AsyncReadExt::chain(start.bytes(), &mut *source);
    let headers: Vec<ObjectHeader> = chunks
        .iter()
        .map(|c| {
            let mut blake3 = [0u8; 32];
            hex::decode_to_slice(&c.blake3, &mut blake3)
                .map_err(|_| Refusal::invalid("blake3 must be 64 hex digits"))?;
            Ok(ObjectHeader {
                raw_size: c.raw_size,
                blake3,
                compressed_size: c.compressed_size,
            })
        })
        .collect::<Result<_, Refusal>>()?;
    let (index, entries) = pack::index(&headers);
    let id = layout::new_pack_id();
    let key = layout::pack_key(cluster, &id);
    let mut pending = ctx.store.begin_raw(&key).await.map_err(Refusal::internal)?;
    pending.write(&index).await.map_err(Refusal::internal)?;
    let mut next = 0usize;
    while next < headers.len() {
        // A group: at least one chunk, up to ~2 MiB of frames.
        let mut end = next;
        let mut group_bytes = 0u64;
        while end < headers.len()
            && (end == next || group_bytes + headers[end].compressed_size <= PACK_GROUP_BYTES)
        {
            group_bytes += headers[end].compressed_size;
            end += 1;
        }
        let mut frames = vec![0u8; group_bytes as usize];
        source.read_exact(&mut frames).await.map_err(|e| {
            Refusal::invalid(format!(
                "pack body ends before its chunks do ({body_len} bytes announced): {e}"
            ))
        })?;
        let group: Vec<ObjectHeader> = headers[next..end].to_vec();
        let frames = tokio::task::spawn_blocking(move || -> Result<Vec<u8>, String> {
            with_thread_decoder(|decoder| {
                let mut at = 0usize;
                for h in &group {
                    let frame = &frames[at..at + h.compressed_size as usize];
                    at += frame.len();
                    decoder
                        .decode(h, frame, &h.blake3, MAX_CHUNK_SIZE)
                        .map_err(|e| {
                            format!(
                                "chunk {}: body is not the announced content: {e:#}",
                                h.blake3_hex()
                            )
                        })?;
                }
                Ok(frames)
            })
            .map_err(|e| e.to_string())?
        })
        .await
        .map_err(|e| Refusal::internal(e.into()))?
        .map_err(Refusal::invalid)?;
        let mut at = 0usize;
        for h in &headers[next..end] {
            let len = h.compressed_size as usize;
            pending
                .write(&h.encode())
                .await
                .map_err(Refusal::internal)?;
            pending
                .write(&frames[at..at + len])
                .await
                .map_err(Refusal::internal)?;
            at += len;
        }
        next = end;
    }
    match super::at_end(source).await {
        Ok(true) => {}
        Ok(false) => {
            return Err(Refusal::invalid(format!(
                "pack body exceeds the announced {body_len} bytes"
            )))
        }
        Err(e) => return Err(Refusal::invalid(format!("pack body stream failed: {e}"))),
    }
    let stored_bytes = pending.written();
    drop(receiving);
    let _committing = ctx
        .budget
        .body(ctx.store.commit_memory(stored_bytes), "storing a pack")
        .await?;
    // Committed and indexed under the shared side of the GC lock: retention never sees
    // this pack committed but its chunks unindexed (gc.rs).
    let _keep = ctx.gc.keep_chunks().await;
    let outcome = ctx
        .store
        .commit_raw(pending)
        .await
        .map_err(Refusal::internal)?;
    if outcome == CreateOutcome::Exists {
        return Err(Refusal::internal(anyhow::anyhow!(
            "pack id {id} collided with an existing pack; send the pack again"
        )));
    }
    let touched = unix_now();
    let mut new_chunks = 0u32;
    for e in entries {
        let hash = hex::encode(e.blake3);
        if ctx
            .index
            .chunk(cluster, &hash)
            .map_err(Refusal::internal)?
            .is_some()
        {
            continue;
        }
        ctx.index
            .put_chunk(cluster, &hash, &ChunkEntry::in_pack(&id, &e, touched))
            .map_err(Refusal::internal)?;
        new_chunks += 1;
    }
    // Flushed before the answer: after a crash, a packed chunk without its entry could
    // only be found again by a rebuild (PutBackup probes loose chunk keys, not packs),
    // and the next backup would upload it again. One flush per pack of many chunks.
    ctx.index.flush().await.map_err(Refusal::internal)?;
    Ok(Response::PackStored {
        new_chunks,
        stored_bytes,
    })
}

/// `ChunksMissing`: the hashes the catalog does not hold; those it holds are touched.
pub(crate) async fn chunks_missing(
    ctx: &Ctx<'_>,
    cluster: &str,
    hashes: Vec<String>,
    lease: Option<&str>,
) -> Reply {
    ctx.require_writer("store backups")?;
    validate_hashes(&hashes, MAX_HASHES_PER_REQUEST, "hashes")?;
    renew(ctx, cluster, lease);
    let _keep = ctx.gc.keep_chunks().await;
    let touched = unix_now();
    let mut missing = Vec::new();
    for h in hashes {
        match ctx.index.chunk(cluster, &h).map_err(Refusal::internal)? {
            Some(mut e) => {
                e.touched = touched;
                ctx.index
                    .put_chunk(cluster, &h, &e)
                    .map_err(Refusal::internal)?;
            }
            None => missing.push(h),
        }
    }
    Ok(Response::Missing { hashes: missing })
}

/// Receives a zstd body into a pending object, verifying size and blake3; with
/// `keep_raw`, also returns the raw bytes (bounded by `raw_size`).
async fn receive_verified(
    ctx: &Ctx<'_>,
    key: &str,
    what: &str,
    raw_size: u64,
    blake3: &str,
    source: &mut (impl AsyncRead + Unpin + Send),
    keep_raw: bool,
) -> Result<(PendingObject, ObjectHeader, Vec<u8>), Refusal> {
    let mut hash = [0u8; 32];
    hex::decode_to_slice(blake3, &mut hash)
        .map_err(|_| Refusal::invalid("blake3 must be 64 hex digits"))?;
    let max_body = raw_size + raw_size / 8 + 4096;
    let mut pending = ctx.store.begin(key).await.map_err(Refusal::internal)?;
    let mut decoder = VerifyingDecoder::new(raw_size).map_err(|e| Refusal::internal(e.into()))?;
    // Reserved whole: grown by doubling it could hold twice what the budget counts.
    let mut raw = Vec::with_capacity(if keep_raw { raw_size as usize } else { 0 });
    let invalid = |e: String| Refusal::invalid(format!("{what}: {e}"));
    let mut buf = Vec::with_capacity(CHUNK_SIZE);
    loop {
        buf.clear();
        let end = super::fill(source, &mut buf, CHUNK_SIZE)
            .await
            .map_err(|e| invalid(format!("body stream failed: {e}")))?;
        if pending.written() + buf.len() as u64 > max_body {
            return Err(Refusal::new(
                ErrorCode::TooLarge,
                format!("{what}: body exceeds {max_body} bytes"),
            ));
        }
        if !buf.is_empty() {
            decoder
                .write::<std::convert::Infallible>(&buf, |b| {
                    if keep_raw {
                        raw.extend_from_slice(b);
                    }
                    Ok(())
                })
                .map_err(|e: DecodeOrSinkError<_>| {
                    invalid(format!("body is not the announced content: {e}"))
                })?;
            pending.write(&buf).await.map_err(Refusal::internal)?;
        }
        if end {
            break;
        }
    }
    decoder
        .finish()
        .and_then(|s| s.check(raw_size, blake3))
        .map_err(|e| invalid(format!("body is not the announced content: {e}")))?;
    let header = ObjectHeader {
        raw_size,
        blake3: hash,
        compressed_size: pending.written(),
    };
    Ok((pending, header, raw))
}

/// `PutChunk`: one loose chunk.
pub(crate) async fn put_chunk(
    ctx: &Ctx<'_>,
    cluster: &str,
    blake3: &str,
    raw_size: u64,
    lease: Option<&str>,
    source: &mut (impl AsyncRead + Unpin + Send),
) -> Reply {
    ctx.require_writer("store backups")?;
    renew(ctx, cluster, lease);
    names::validate_chunk_hash(blake3).map_err(Refusal::invalid)?;
    if raw_size > MAX_CHUNK_SIZE {
        return Err(Refusal::new(
            ErrorCode::TooLarge,
            format!("chunk of {raw_size} bytes exceeds the {MAX_CHUNK_SIZE} byte limit"),
        ));
    }
    // A catalog hit is acknowledged only when the store holds the object it points at
    // (only duplicates pay the look); otherwise the chunk is stored again, loose.
    if let Some(entry) = ctx
        .index
        .chunk(cluster, blake3)
        .map_err(Refusal::internal)?
    {
        let loc = entry.location(cluster, blake3);
        let len = ctx.store.len(&loc.key).await.map_err(Refusal::internal)?;
        if matches!(len, Some(n) if loc.range.as_ref().is_none_or(|r| r.end <= n)) {
            return Ok(Response::Stored {
                already_present: true,
            });
        }
        tracing::warn!(%cluster, chunk = %blake3, object = %loc.key, "the catalog lists a chunk the store does not hold; storing it again");
    }
    let key = layout::chunk_key(cluster, blake3);
    let mut hash = [0u8; 32];
    hex::decode_to_slice(blake3, &mut hash)
        .map_err(|_| Refusal::invalid("blake3 must be 64 hex digits"))?;
    // A chunk body is small (bounded by MAX_CHUNK_SIZE plus zstd's worst case): it is read
    // whole, verified off the async threads, and written in one go.
    let max_body = raw_size + raw_size / 8 + 4096;
    let what = format!("chunk {blake3}");
    let start = FrameStart::read(source, &what).await?;
    let _holding = ctx
        .budget
        .body(
            max_body + start.decoder_memory() + ctx.store.put_grouped_memory(max_body),
            &format!("PutChunk of {what}"),
        )
        .await?;
    let source = &mut AsyncReadExt::chain(start.bytes(), &mut *source);
    let body = super::read_to_end_bounded(source, max_body as usize)
        .await
        .map_err(|e| match e {
            BodyError::TooLong => Refusal::new(
                ErrorCode::TooLarge,
                format!("chunk {blake3}: body exceeds {max_body} bytes"),
            ),
            BodyError::Io(e) => {
                Refusal::invalid(format!("chunk {blake3}: body stream failed: {e}"))
            }
        })?;
    let body = bytes::Bytes::from(body);
    let (check, announced) = (body.clone(), blake3.to_string());
    tokio::task::spawn_blocking(move || -> Result<(), String> {
        let mut decoder = VerifyingDecoder::new(raw_size).map_err(|e| e.to_string())?;
        decoder
            .write::<std::convert::Infallible>(&check, |_| Ok(()))
            .map_err(|e| e.to_string())?;
        decoder
            .finish()
            .and_then(|s| s.check(raw_size, &announced))
            .map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| Refusal::internal(e.into()))?
    .map_err(|e| {
        Refusal::invalid(format!(
            "chunk {blake3}: body is not the announced content: {e}"
        ))
    })?;
    let header = ObjectHeader {
        raw_size,
        blake3: hash,
        compressed_size: body.len() as u64,
    };
    let stored_size = HEADER_LEN as u64 + header.compressed_size;
    // Stored and indexed under the shared side of the GC lock (gc.rs).
    let _keep = ctx.gc.keep_chunks().await;
    let outcome = ctx
        .store
        .put_grouped(&key, &header, body, ctx.archive.sync_group())
        .await
        .map_err(Refusal::internal)?;
    // Same name, same content (the name is the hash): an existing object is as good.
    let stored_size = match outcome {
        CreateOutcome::Created => stored_size,
        CreateOutcome::Exists => ctx
            .store
            .read_header(&key)
            .await
            .map_err(Refusal::internal)?
            .map(|h| HEADER_LEN as u64 + h.compressed_size)
            .unwrap_or(stored_size),
    };
    // Not flushed before the answer (a flush per chunk would cost what the shared syncs
    // of put_grouped save): an entry lost in a crash leaves a loose chunk that PutBackup
    // finds at its key anyway and a catalog rebuild indexes.
    ctx.index
        .put_chunk(
            cluster,
            blake3,
            &ChunkEntry {
                raw_size,
                stored_size,
                touched: unix_now(),
                pack: None,
                offset: 0,
            },
        )
        .map_err(Refusal::internal)?;
    Ok(Response::Stored {
        already_present: outcome == CreateOutcome::Exists,
    })
}

/// `PutBackup`: commits a backup by storing its manifest.
pub(crate) async fn put_backup(
    ctx: &Ctx<'_>,
    upload: &ManifestUpload<'_>,
    source: &mut (impl AsyncRead + Unpin + Send),
) -> Reply {
    let ManifestUpload {
        cluster,
        backup_id,
        raw_size,
        blake3,
        lease,
    } = *upload;
    ctx.require_writer("store backups")?;
    renew(ctx, cluster, lease);
    names::validate_backup_id(backup_id).map_err(Refusal::invalid)?;
    if raw_size > MAX_MANIFEST_SIZE {
        return Err(Refusal::new(
            ErrorCode::TooLarge,
            format!("manifest of {raw_size} bytes exceeds the {MAX_MANIFEST_SIZE} byte limit"),
        ));
    }
    let key = layout::manifest_key(cluster, backup_id);
    let what = format!("manifest of backup {backup_id}");
    let start = FrameStart::read(source, &what).await?;
    let max_body = raw_size + raw_size / 8 + 4096;
    let _holding = ctx
        .budget
        .body(
            start.decoder_memory()
                + READ_BUFFER
                + HEAD_LEN as u64
                + MANIFEST_MEMORY_FACTOR * raw_size
                + ctx.store.commit_memory(HEADER_LEN as u64 + max_body),
            &format!("PutBackup of a {raw_size} byte manifest"),
        )
        .await?;
    let source = &mut AsyncReadExt::chain(start.bytes(), &mut *source);
    let (pending, header, raw) =
        receive_verified(ctx, &key, &what, raw_size, blake3, source, true).await?;
    let manifest: BackupManifest = serde_json::from_slice(&raw)
        .map_err(|e| Refusal::invalid(format!("{what} is not a manifest: {e}")))?;
    drop(raw);
    manifest
        .validate()
        .map_err(|e| Refusal::invalid(format!("{what}: {e}")))?;
    if manifest.label.len() > MAX_BACKUP_LABEL_LEN {
        return Err(Refusal::invalid(format!(
            "{what} has a label of {} bytes; a label is at most {MAX_BACKUP_LABEL_LEN} bytes \
             (PostgreSQL's own limit): back up again with a shorter --label",
            manifest.label.len()
        )));
    }
    if manifest.id != backup_id || manifest.cluster != cluster {
        return Err(Refusal::invalid(format!(
            "{what} names backup {} of cluster '{}'",
            manifest.id, manifest.cluster
        )));
    }
    if let Some(binding) = ctx.index.binding(cluster).map_err(Refusal::internal)? {
        if binding.system_identifier != manifest.system_identifier {
            return Err(Refusal::new(
                ErrorCode::WrongCluster,
                format!(
                    "backup {backup_id} is of PostgreSQL system {} but cluster '{cluster}' is bound to system {}; \
                     back up each PostgreSQL cluster under its own cluster name",
                    manifest.system_identifier, binding.system_identifier
                ),
            ));
        }
    }
    let _keep = ctx.gc.keep_chunks().await;
    let unique: BTreeSet<&str> = manifest.chunk_hashes().collect();
    for h in &unique {
        let present = ctx
            .index
            .chunk(cluster, h)
            .map_err(Refusal::internal)?
            .is_some()
            || ctx
                .store
                .read_header(&layout::chunk_key(cluster, h))
                .await
                .map_err(Refusal::internal)?
                .is_some();
        if !present {
            return Err(Refusal::invalid(format!(
                "{what} names chunk {h}, which the archive does not hold (collected by retention \
                 while the backup ran?); nothing was committed: run the backup again"
            )));
        }
    }
    let stored = HEADER_LEN as u64 + header.compressed_size;
    let outcome = ctx
        .store
        .commit(pending, &header)
        .await
        .map_err(Refusal::internal)?;
    if outcome == CreateOutcome::Exists {
        let existing = ctx
            .store
            .read_header(&key)
            .await
            .map_err(Refusal::internal)?
            .ok_or_else(|| {
                Refusal::internal(anyhow::anyhow!("{key} vanished after a create conflict"))
            })?;
        if existing.blake3 != header.blake3 {
            return Err(Refusal::new(
                ErrorCode::Conflict,
                format!("cluster '{cluster}' already has a different backup {backup_id}; the archived one is kept"),
            ));
        }
    }
    ctx.index
        .put_backup(cluster, &record_of(&manifest, stored))
        .map_err(Refusal::internal)?;
    ctx.index.flush().await.map_err(Refusal::internal)?;
    if let Some(id) = lease {
        ctx.gc.release(cluster, id);
    }
    Ok(Response::Stored {
        already_present: outcome == CreateOutcome::Exists,
    })
}

/// `DeleteBackup` (admin): the manifest goes at once, its chunks at a later retention
/// run.
pub(crate) async fn delete(ctx: &Ctx<'_>, cluster: &str, backup_id: &str) -> Reply {
    ctx.require_admin(
        "deleting a backup needs an admin certificate (archived backups delete uses DIR/admin.toml)",
    )?;
    names::validate_backup_id(backup_id).map_err(Refusal::invalid)?;
    // Not beside a retention run; running backups are not concerned (their chunks are
    // touched or leased, whatever this manifest named).
    let _run = ctx.gc.retention_run().await;
    let key = layout::manifest_key(cluster, backup_id);
    if ctx
        .store
        .read_header(&key)
        .await
        .map_err(Refusal::internal)?
        .is_none()
    {
        return Err(not_such_backup(cluster, backup_id));
    }
    // Index first, object second (as every deletion): a crash in between leaves a
    // manifest no listing shows, which a catalog rebuild lists again, never a listed
    // backup without its manifest.
    ctx.index
        .remove_backup(cluster, backup_id)
        .map_err(Refusal::internal)?;
    ctx.index.flush().await.map_err(Refusal::internal)?;
    ctx.store.delete(&key).await.map_err(Refusal::internal)?;
    tracing::info!(%cluster, %backup_id, "backup deleted; its chunks are collected by the next retention run");
    Ok(Response::Deleted)
}
