//! Base backup requests: chunk and manifest uploads and downloads, listings, deletion,
//! retention runs. Where things are kept is backup_index.rs.
//!
//! # Contracts
//!
//! - `PutChunk` answers `Stored` once the chunk is durable in the store.
//! - `PutBackup` answers `Stored` once the manifest is durable and indexed, and refuses a
//!   manifest that names a chunk the store does not hold, so a listed backup never lacks
//!   a chunk. Chunk collection (retention) takes the write side of [`BackupService`]'s
//!   lock; `ChunksMissing` and `PutBackup` take the read side, and `ChunksMissing`
//!   refreshes `touched` of every chunk it reports present, so a chunk a running backup
//!   counts on is within the grace period when retention looks at it.

use std::collections::BTreeSet;

use walvault_protocol::core::format::manifest::{
    BackupManifest, MAX_CHUNK_SIZE, MAX_MANIFEST_SIZE,
};

use walvault_protocol::core::wire::backup::{
    PackChunk, MAX_CHUNKS_PER_GET, MAX_CHUNKS_PER_PACK, MAX_HASHES_PER_REQUEST, MAX_PACK_RAW_BYTES,
};

use walvault_protocol::core::format::codec::{DecodeOrSinkError, VerifyingDecoder, CHUNK_SIZE};
use walvault_protocol::core::format::names;
use walvault_protocol::core::format::object::with_thread_decoder;
use walvault_protocol::core::wire::{ErrorCode, Request, Response};
use walvault_protocol::net::pki::{ClientIdentity, Role};
use walvault_protocol::net::transport::write_frame;

use crate::backup_index::{
    chunk_entry, chunk_key, list_backups, manifest_key, now, put_backup_record, put_chunk_entry,
    remove_backup_record, BackupRecord, ChunkEntry,
};
use crate::catalog::Catalog;
use crate::retention::RetentionConfig;
use crate::server::{respond, send_object, stream_body, Refusal, Reply};
use crate::store::{self, CreateOutcome, ObjectHeader, PendingObject, Store};
use crate::syncgroup::SyncGroup;

/// Server-side state of the backup service.
pub struct BackupService {
    /// Read: requests that rely on chunks staying (ChunksMissing, PutBackup). Write:
    /// chunk collection and backup deletion.
    pub(crate) gc_lock: tokio::sync::RwLock<()>,
    /// The policy from archived.toml.
    pub(crate) policy: RetentionConfig,
    /// Shared syncs of concurrent chunk writes (local store), made at first use.
    sync_group: std::sync::OnceLock<SyncGroup>,
}

impl BackupService {
    /// With the configured retention policy.
    pub fn new(policy: RetentionConfig) -> BackupService {
        BackupService {
            gc_lock: tokio::sync::RwLock::new(()),
            policy,
            sync_group: std::sync::OnceLock::new(),
        }
    }

    fn sync_group(&self, store: &Store) -> &SyncGroup {
        self.sync_group.get_or_init(|| match store {
            Store::Local { root } => SyncGroup::new(root),
            Store::Remote { spool, .. } => SyncGroup::new(spool),
        })
    }
}

/// Handles one backup request and answers it.
pub async fn handle(
    store: &Store,
    catalog: &Catalog,
    service: &BackupService,
    identity: &ClientIdentity,
    request: Request,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let reply: Reply = match request {
        Request::ChunksMissing { cluster, hashes } => {
            chunks_missing(catalog, service, identity, &cluster, hashes).await
        }
        Request::PutChunk {
            cluster,
            blake3,
            raw_size,
        } => {
            put_chunk(
                store, catalog, service, identity, &cluster, &blake3, raw_size, &mut recv,
            )
            .await
        }
        Request::PutPack { cluster, chunks } => {
            put_pack(store, catalog, identity, &cluster, chunks, &mut recv).await
        }
        Request::GetChunks { cluster, hashes } => {
            match get_chunks(store, catalog, &cluster, hashes, &mut send).await {
                Ok(()) => return,
                Err(r) => Err(r),
            }
        }
        Request::PutBackup {
            cluster,
            backup_id,
            raw_size,
            blake3,
        } => {
            let reply = put_backup(
                store, catalog, service, identity, &cluster, &backup_id, raw_size, &blake3,
                &mut recv,
            )
            .await;
            match &reply {
                Ok(_) => tracing::info!(%cluster, %backup_id, "backup committed"),
                Err(r) => {
                    tracing::warn!(%cluster, %backup_id, code = ?r.code, message = %r.message, "backup refused")
                }
            }
            reply
        }
        Request::GetBackup { cluster, backup_id } => {
            let sent = match names::validate_backup_id(&backup_id) {
                Err(m) => Err(Refusal::new(ErrorCode::Invalid, m)),
                Ok(()) => {
                    send_object(
                        store,
                        &manifest_key(&cluster, &backup_id),
                        &mut send,
                        || {
                            Refusal::new(
                                ErrorCode::NotFound,
                                format!(
                                    "backup {backup_id} does not exist in cluster '{cluster}' \
                                 (see `archived backups list --cluster {cluster}`)"
                                ),
                            )
                        },
                    )
                    .await
                }
            };
            match sent {
                Ok(()) => return,
                Err(r) => Err(r),
            }
        }
        Request::ListBackups { cluster } => list_backups(store, catalog, &cluster)
            .await
            .map(|backups| Response::Backups { backups })
            .map_err(Refusal::internal),
        Request::DeleteBackup { cluster, backup_id } => {
            delete_backup(store, catalog, service, identity, &cluster, &backup_id).await
        }
        Request::Retention {
            cluster,
            keep_full,
            keep_within_secs,
            chunk_grace_secs,
            dry_run,
            window_end,
        } => {
            if identity.role != Role::Admin {
                Err(Refusal::new(
                    ErrorCode::Unauthorized,
                    "retention needs an admin certificate (archived retention run uses DIR/admin.toml)",
                ))
            } else {
                let mut policy =
                    service
                        .policy
                        .with_overrides(keep_full, keep_within_secs, chunk_grace_secs);
                policy.window_end = window_end;
                crate::retention::run(
                    store,
                    catalog,
                    service,
                    cluster.as_deref(),
                    &policy,
                    dry_run,
                )
                .await
                .map(Response::Retention)
                .map_err(Refusal::internal)
            }
        }
        other => Err(Refusal::new(
            ErrorCode::Invalid,
            format!("{} is not a backup request", other.op()),
        )),
    };
    respond(send, Some(recv), reply).await;
}

fn require_writer(identity: &ClientIdentity, what: &str) -> std::result::Result<(), Refusal> {
    if matches!(identity.role, Role::Push | Role::Admin) {
        Ok(())
    } else {
        Err(Refusal::new(
            ErrorCode::Unauthorized,
            format!(
                "a {} certificate may not {what}; use the cluster's push certificate",
                identity.role
            ),
        ))
    }
}

/// Refuses a list of chunk hashes longer than `limit` or holding one that is not a hash.
fn validate_hashes(
    hashes: &[String],
    limit: usize,
    what: &str,
) -> std::result::Result<(), Refusal> {
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
        names::validate_chunk_hash(h).map_err(|m| Refusal::new(ErrorCode::Invalid, m))?;
    }
    Ok(())
}

/// Streams the chunks asked for, whole stored objects back to back in the order asked,
/// after a `Chunks` frame; a chunk the store lacks refuses the whole request first.
async fn get_chunks(
    store: &Store,
    catalog: &Catalog,
    cluster: &str,
    hashes: Vec<String>,
    send: &mut quinn::SendStream,
) -> std::result::Result<(), Refusal> {
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
    for h in &hashes {
        match chunk_entry(catalog, cluster, h).map_err(Refusal::internal)? {
            Some(e) => locs.push(e.location(cluster, h)),
            None => return Err(not_found(h)),
        }
    }
    let objects = match store.get_many(locs).await.map_err(Refusal::internal)? {
        store::Many::Missing(i) => return Err(not_found(&hashes[i])),
        store::Many::Objects(s) => s,
    };
    write_frame(
        send,
        &Response::Chunks {
            count: hashes.len() as u32,
        },
    )
    .await
    .map_err(|e| Refusal::internal(e.context("sending response")))?;
    stream_body(
        send,
        &format!("{} chunks of {cluster}", hashes.len()),
        objects,
    )
    .await;
    Ok(())
}

/// Receives a pack of chunks, verifies every one (size and blake3 of the decompressed
/// bytes) before anything is stored, stores the pack as one object (packs.rs) and indexes
/// the chunks the catalog did not hold. A chunk another backup stored meanwhile stays
/// where it was indexed first; its copy in this pack is dead weight, never wrong.
async fn put_pack(
    store: &Store,
    catalog: &Catalog,
    identity: &ClientIdentity,
    cluster: &str,
    chunks: Vec<PackChunk>,
    recv: &mut quinn::RecvStream,
) -> Reply {
    require_writer(identity, "store backups")?;
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
        names::validate_chunk_hash(&c.blake3).map_err(|m| Refusal::new(ErrorCode::Invalid, m))?;
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
    let headers: Vec<ObjectHeader> = chunks
        .iter()
        .map(|c| {
            let mut blake3 = [0u8; 32];
            hex::decode_to_slice(&c.blake3, &mut blake3)
                .map_err(|_| Refusal::new(ErrorCode::Invalid, "blake3 must be 64 hex digits"))?;
            Ok(ObjectHeader {
                raw_size: c.raw_size,
                blake3,
                compressed_size: c.compressed_size,
            })
        })
        .collect::<std::result::Result<_, Refusal>>()?;
    let (index, entries) = crate::packs::index(&headers);
    let id = crate::packs::new_pack_id();
    let key = crate::packs::pack_key(cluster, &id);
    let mut pending = store.begin_raw(&key).await.map_err(Refusal::internal)?;
    pending.write(&index).await.map_err(Refusal::internal)?;
    let invalid = |m: String| Refusal::new(ErrorCode::Invalid, m);
    let mut next = 0usize;
    while next < headers.len() {
        // A group: at least one chunk, up to ~2 MiB of frames.
        let mut end = next;
        let mut group_bytes = 0u64;
        while end < headers.len()
            && (end == next || group_bytes + headers[end].compressed_size <= 2 << 20)
        {
            group_bytes += headers[end].compressed_size;
            end += 1;
        }
        let mut frames = vec![0u8; group_bytes as usize];
        recv.read_exact(&mut frames).await.map_err(|e| {
            invalid(format!(
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
        .map_err(invalid)?;
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
    let mut extra = [0u8; 1];
    match recv.read(&mut extra).await {
        Ok(None) => {}
        Ok(Some(_)) => {
            return Err(invalid(format!(
                "pack body exceeds the announced {body_len} bytes"
            )))
        }
        Err(e) => return Err(invalid(format!("pack body stream failed: {e}"))),
    }
    let stored_bytes = pending.written();
    let outcome = store.commit_raw(pending).await.map_err(Refusal::internal)?;
    if outcome == CreateOutcome::Exists {
        return Err(Refusal::internal(anyhow::anyhow!(
            "pack id {id} collided with an existing pack; send the pack again"
        )));
    }
    let touched = now();
    let mut new_chunks = 0u32;
    for e in entries {
        let hash = hex::encode(e.blake3);
        if chunk_entry(catalog, cluster, &hash)
            .map_err(Refusal::internal)?
            .is_some()
        {
            continue;
        }
        put_chunk_entry(
            catalog,
            cluster,
            &hash,
            &ChunkEntry::in_pack(&id, &e, touched),
        )
        .map_err(Refusal::internal)?;
        new_chunks += 1;
    }
    Ok(Response::PackStored {
        new_chunks,
        stored_bytes,
    })
}

async fn chunks_missing(
    catalog: &Catalog,
    service: &BackupService,
    identity: &ClientIdentity,
    cluster: &str,
    hashes: Vec<String>,
) -> Reply {
    require_writer(identity, "store backups")?;
    validate_hashes(&hashes, MAX_HASHES_PER_REQUEST, "hashes")?;
    let _keep = service.gc_lock.read().await;
    let touched = now();
    let mut missing = Vec::new();
    for h in hashes {
        match chunk_entry(catalog, cluster, &h).map_err(Refusal::internal)? {
            Some(mut e) => {
                e.touched = touched;
                put_chunk_entry(catalog, cluster, &h, &e).map_err(Refusal::internal)?;
            }
            None => missing.push(h),
        }
    }
    Ok(Response::Missing { hashes: missing })
}

/// Receives a zstd body into a pending object, verifying size and blake3; with
/// `keep_raw`, also returns the raw bytes (bounded by `raw_size`).
async fn receive_verified(
    store: &Store,
    key: &str,
    what: &str,
    raw_size: u64,
    blake3: &str,
    recv: &mut quinn::RecvStream,
    keep_raw: bool,
) -> std::result::Result<(PendingObject, ObjectHeader, Vec<u8>), Refusal> {
    let mut hash = [0u8; 32];
    hex::decode_to_slice(blake3, &mut hash)
        .map_err(|_| Refusal::new(ErrorCode::Invalid, "blake3 must be 64 hex digits"))?;
    let max_body = raw_size + raw_size / 8 + 4096;
    let mut pending = store.begin(key).await.map_err(Refusal::internal)?;
    let mut decoder = VerifyingDecoder::new(raw_size).map_err(|e| Refusal::internal(e.into()))?;
    let mut raw = Vec::new();
    let invalid = |e: String| Refusal::new(ErrorCode::Invalid, format!("{what}: {e}"));
    loop {
        let chunk = recv
            .read_chunk(CHUNK_SIZE, true)
            .await
            .map_err(|e| invalid(format!("body stream failed: {e}")))?;
        let Some(c) = chunk else { break };
        if pending.written() + c.bytes.len() as u64 > max_body {
            return Err(Refusal::new(
                ErrorCode::TooLarge,
                format!("{what}: body exceeds {max_body} bytes"),
            ));
        }
        decoder
            .write::<std::convert::Infallible>(&c.bytes, |b| {
                if keep_raw {
                    raw.extend_from_slice(b);
                }
                Ok(())
            })
            .map_err(|e: DecodeOrSinkError<_>| {
                invalid(format!("body is not the announced content: {e}"))
            })?;
        pending.write(&c.bytes).await.map_err(Refusal::internal)?;
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

#[allow(clippy::too_many_arguments)]
async fn put_chunk(
    store: &Store,
    catalog: &Catalog,
    service: &BackupService,
    identity: &ClientIdentity,
    cluster: &str,
    blake3: &str,
    raw_size: u64,
    recv: &mut quinn::RecvStream,
) -> Reply {
    require_writer(identity, "store backups")?;
    names::validate_chunk_hash(blake3).map_err(|m| Refusal::new(ErrorCode::Invalid, m))?;
    if raw_size > MAX_CHUNK_SIZE {
        return Err(Refusal::new(
            ErrorCode::TooLarge,
            format!("chunk of {raw_size} bytes exceeds the {MAX_CHUNK_SIZE} byte limit"),
        ));
    }
    if chunk_entry(catalog, cluster, blake3)
        .map_err(Refusal::internal)?
        .is_some()
    {
        return Ok(Response::Stored {
            already_present: true,
        });
    }
    let key = chunk_key(cluster, blake3);
    let mut hash = [0u8; 32];
    hex::decode_to_slice(blake3, &mut hash)
        .map_err(|_| Refusal::new(ErrorCode::Invalid, "blake3 must be 64 hex digits"))?;
    // A chunk body is small (bounded by MAX_CHUNK_SIZE plus zstd's worst case): it is read
    // whole, verified off the async threads, and written in one go.
    let max_body = raw_size + raw_size / 8 + 4096;
    let body = recv
        .read_to_end(max_body as usize)
        .await
        .map_err(|e| match e {
            quinn::ReadToEndError::TooLong => Refusal::new(
                ErrorCode::TooLarge,
                format!("chunk {blake3}: body exceeds {max_body} bytes"),
            ),
            other => Refusal::new(
                ErrorCode::Invalid,
                format!("chunk {blake3}: body stream failed: {other}"),
            ),
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
        Refusal::new(
            ErrorCode::Invalid,
            format!("chunk {blake3}: body is not the announced content: {e}"),
        )
    })?;
    let header = ObjectHeader {
        raw_size,
        blake3: hash,
        compressed_size: body.len() as u64,
    };
    let stored_size = store::HEADER_LEN as u64 + header.compressed_size;
    let outcome = store
        .put_grouped(&key, &header, body, service.sync_group(store))
        .await
        .map_err(Refusal::internal)?;
    // Same name, same content (the name is the hash): an existing object is as good.
    let stored_size = match outcome {
        CreateOutcome::Created => stored_size,
        CreateOutcome::Exists => store
            .read_header(&key)
            .await
            .map_err(Refusal::internal)?
            .map(|h| store::HEADER_LEN as u64 + h.compressed_size)
            .unwrap_or(stored_size),
    };
    put_chunk_entry(
        catalog,
        cluster,
        blake3,
        &ChunkEntry {
            raw_size,
            stored_size,
            touched: now(),
            pack: None,
            offset: 0,
        },
    )
    .map_err(Refusal::internal)?;
    Ok(Response::Stored {
        already_present: outcome == CreateOutcome::Exists,
    })
}

#[allow(clippy::too_many_arguments)]
async fn put_backup(
    store: &Store,
    catalog: &Catalog,
    service: &BackupService,
    identity: &ClientIdentity,
    cluster: &str,
    backup_id: &str,
    raw_size: u64,
    blake3: &str,
    recv: &mut quinn::RecvStream,
) -> Reply {
    require_writer(identity, "store backups")?;
    names::validate_backup_id(backup_id).map_err(|m| Refusal::new(ErrorCode::Invalid, m))?;
    if raw_size > MAX_MANIFEST_SIZE {
        return Err(Refusal::new(
            ErrorCode::TooLarge,
            format!("manifest of {raw_size} bytes exceeds the {MAX_MANIFEST_SIZE} byte limit"),
        ));
    }
    let key = manifest_key(cluster, backup_id);
    let what = format!("manifest of backup {backup_id}");
    let (pending, header, raw) =
        receive_verified(store, &key, &what, raw_size, blake3, recv, true).await?;
    let manifest: BackupManifest = serde_json::from_slice(&raw)
        .map_err(|e| Refusal::new(ErrorCode::Invalid, format!("{what} is not a manifest: {e}")))?;
    drop(raw);
    manifest
        .validate()
        .map_err(|e| Refusal::new(ErrorCode::Invalid, format!("{what}: {e}")))?;
    if manifest.id != backup_id || manifest.cluster != cluster {
        return Err(Refusal::new(
            ErrorCode::Invalid,
            format!(
                "{what} names backup {} of cluster '{}'",
                manifest.id, manifest.cluster
            ),
        ));
    }
    if let Some(binding) = catalog.binding(cluster).map_err(Refusal::internal)? {
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
    let _keep = service.gc_lock.read().await;
    let unique: BTreeSet<&str> = manifest.chunk_hashes().collect();
    for h in &unique {
        let present = chunk_entry(catalog, cluster, h)
            .map_err(Refusal::internal)?
            .is_some()
            || store
                .read_header(&chunk_key(cluster, h))
                .await
                .map_err(Refusal::internal)?
                .is_some();
        if !present {
            return Err(Refusal::new(
                ErrorCode::Invalid,
                format!(
                    "{what} names chunk {h}, which the archive does not hold (collected by retention \
                     while the backup ran?); nothing was committed: run the backup again"
                ),
            ));
        }
    }
    let stored = store::HEADER_LEN as u64 + header.compressed_size;
    let outcome = store
        .commit(pending, &header)
        .await
        .map_err(Refusal::internal)?;
    if outcome == CreateOutcome::Exists {
        let existing = store
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
    put_backup_record(catalog, cluster, &BackupRecord::of(&manifest, stored))
        .map_err(Refusal::internal)?;
    catalog.flush().await.map_err(Refusal::internal)?;
    Ok(Response::Stored {
        already_present: outcome == CreateOutcome::Exists,
    })
}

async fn delete_backup(
    store: &Store,
    catalog: &Catalog,
    service: &BackupService,
    identity: &ClientIdentity,
    cluster: &str,
    backup_id: &str,
) -> Reply {
    if identity.role != Role::Admin {
        return Err(Refusal::new(
            ErrorCode::Unauthorized,
            "deleting a backup needs an admin certificate (archived backups delete uses DIR/admin.toml)",
        ));
    }
    names::validate_backup_id(backup_id).map_err(|m| Refusal::new(ErrorCode::Invalid, m))?;
    let _gc = service.gc_lock.write().await;
    let key = manifest_key(cluster, backup_id);
    if store
        .read_header(&key)
        .await
        .map_err(Refusal::internal)?
        .is_none()
    {
        return Err(Refusal::new(
            ErrorCode::NotFound,
            format!("backup {backup_id} does not exist in cluster '{cluster}' (see `archived backups list --cluster {cluster}`)"),
        ));
    }
    store.delete(&key).await.map_err(Refusal::internal)?;
    remove_backup_record(catalog, cluster, backup_id).map_err(Refusal::internal)?;
    catalog.flush().await.map_err(Refusal::internal)?;
    tracing::info!(%cluster, %backup_id, "backup deleted; its chunks are collected by the next retention run");
    Ok(Response::Deleted)
}
