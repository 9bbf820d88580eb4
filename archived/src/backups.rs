//! Base backups in the archive: chunk and manifest objects, their catalog, and the
//! requests that read and write them.
//!
//! # Store layout
//!
//! ```text
//! <cluster>/chunks/<h[0..2]>/<blake3>.zst    one backup chunk, named by the blake3 of its
//!                                            raw bytes (content-addressed: a name has one
//!                                            possible content, so create-only conflicts
//!                                            are harmless duplicates)
//! <cluster>/backups/<ID>/manifest.zst        the backup's manifest (protocol::backup);
//!                                            create-only, written after every chunk it
//!                                            names is stored: its existence commits the
//!                                            backup
//! ```
//!
//! Both use the archive's object format (64-byte header with raw size and blake3, then
//! one zstd frame; see store.rs), so a rebuild needs a listing, one header read per chunk
//! and one read per manifest.
//!
//! # Catalog
//!
//! ```text
//! tree "chunks"   <cluster>/<blake3>  -> JSON ChunkEntry  (sizes; `touched`: last time a
//!                                        backup stored or reused it, for the GC grace)
//! tree "backups"  <cluster>/<ID>      -> JSON BackupRecord (what listings show)
//! ```
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
//! - A backup is *usable* when every WAL segment from its start to its stop LSN is in
//!   the archive; `restorable_until` is the archive time of the last segment after it
//!   on its timeline without a gap.

use std::collections::BTreeSet;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use walvault_protocol::backup::{
    self as format, BackupManifest, BackupState, BackupSummary, FileKind, MAX_CHUNK_SIZE,
    MAX_HASHES_PER_REQUEST, MAX_MANIFEST_SIZE,
};
use walvault_protocol::codec::{DecodeOrSinkError, VerifyingDecoder, CHUNK_SIZE};
use walvault_protocol::pki::{ClientIdentity, Role};
use walvault_protocol::wal::{Lsn, SegmentName, TimelineId, WalFileName};
use walvault_protocol::wire::{ErrorCode, Request, Response};

use crate::catalog::{Catalog, RebuildSummary};
use crate::retention::RetentionConfig;
use crate::server::{respond, send_object, Refusal, Reply};
use crate::store::{self, CreateOutcome, ObjectHeader, PendingObject, Store};

const CHUNKS_TREE: &str = "chunks";
const BACKUPS_TREE: &str = "backups";

/// Server-side state of the backup service.
pub struct BackupService {
    /// Read: requests that rely on chunks staying (ChunksMissing, PutBackup). Write:
    /// chunk collection and backup deletion.
    pub(crate) gc_lock: tokio::sync::RwLock<()>,
    /// The policy from archived.toml.
    pub(crate) policy: RetentionConfig,
}

impl BackupService {
    /// With the configured retention policy.
    pub fn new(policy: RetentionConfig) -> BackupService {
        BackupService {
            gc_lock: tokio::sync::RwLock::new(()),
            policy,
        }
    }
}

/// Key of a chunk.
pub fn chunk_key(cluster: &str, hash: &str) -> String {
    format!("{cluster}/chunks/{}/{hash}.zst", &hash[..2.min(hash.len())])
}

/// Key of a backup's manifest.
pub fn manifest_key(cluster: &str, id: &str) -> String {
    format!("{cluster}/backups/{id}/manifest.zst")
}

/// Parses a chunk key into (cluster, hash).
pub fn parse_chunk_key(key: &str) -> Option<(String, String)> {
    let mut parts = key.split('/');
    let (cluster, kind, _, file) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if kind != "chunks" || parts.next().is_some() {
        return None;
    }
    let hash = file.strip_suffix(".zst")?;
    format::validate_chunk_hash(hash).ok()?;
    (chunk_key(cluster, hash) == key).then(|| (cluster.to_string(), hash.to_string()))
}

/// Parses a manifest key into (cluster, id).
pub fn parse_manifest_key(key: &str) -> Option<(String, String)> {
    let mut parts = key.split('/');
    let (cluster, kind, id, file) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if kind != "backups" || file != "manifest.zst" || parts.next().is_some() {
        return None;
    }
    format::validate_backup_id(id).ok()?;
    Some((cluster.to_string(), id.to_string()))
}

/// Catalog entry of a chunk.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ChunkEntry {
    /// Raw size.
    pub raw_size: u64,
    /// Stored bytes (header + zstd frame).
    pub stored_size: u64,
    /// Last time (unix seconds) a backup stored or reused the chunk.
    pub touched: i64,
}

/// Catalog entry of a backup: the manifest's figures, without its file list.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BackupRecord {
    /// Id.
    pub id: String,
    /// Label.
    pub label: String,
    /// Start timeline.
    pub timeline: u32,
    /// Stop timeline.
    pub stop_timeline: u32,
    /// Start LSN.
    pub start_lsn: String,
    /// Stop LSN.
    pub stop_lsn: String,
    /// Start, unix seconds.
    pub start_time: i64,
    /// Stop, unix seconds.
    pub stop_time: i64,
    /// server_version_num.
    pub pg_version: u32,
    /// Bytes of all files.
    pub logical_bytes: u64,
    /// Bytes this backup added to the store.
    pub stored_bytes: u64,
    /// Regular files.
    pub files: u64,
    /// Chunks referenced.
    pub chunks: u64,
}

impl BackupRecord {
    fn of(m: &BackupManifest, manifest_stored: u64) -> BackupRecord {
        BackupRecord {
            id: m.id.clone(),
            label: m.label.clone(),
            timeline: m.timeline,
            stop_timeline: m.stop_timeline,
            start_lsn: m.start_lsn.clone(),
            stop_lsn: m.stop_lsn.clone(),
            start_time: m.start_time,
            stop_time: m.stop_time,
            pg_version: m.pg_version,
            logical_bytes: m.stats.logical_bytes,
            stored_bytes: m.stats.new_stored_bytes + manifest_stored,
            files: m.files.iter().filter(|f| f.kind == FileKind::File).count() as u64,
            chunks: m.stats.chunks,
        }
    }
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Empties the backup trees (start of a rebuild).
pub fn clear_index(catalog: &Catalog) -> Result<()> {
    catalog.tree(CHUNKS_TREE)?.clear()?;
    catalog.tree(BACKUPS_TREE)?.clear()?;
    Ok(())
}

/// Indexes one key during a rebuild if it is a chunk or a manifest; `Ok(false)` if the
/// key is not ours.
pub async fn index_object(
    catalog: &Catalog,
    store: &Store,
    key: &str,
    summary: &mut RebuildSummary,
) -> Result<bool> {
    if let Some((cluster, hash)) = parse_chunk_key(key) {
        match store.read_header(key).await {
            Ok(Some(h)) => {
                let touched = store.modified(key).await.ok().flatten().unwrap_or_else(now);
                put_chunk_entry(
                    catalog,
                    &cluster,
                    &hash,
                    &ChunkEntry {
                        raw_size: h.raw_size,
                        stored_size: store::HEADER_LEN as u64 + h.compressed_size,
                        touched,
                    },
                )?;
                summary.chunks += 1;
            }
            Ok(None) => {}
            Err(e) => {
                summary.unreadable += 1;
                tracing::error!(%key, error = %format!("{e:#}"), "unreadable chunk; not indexed");
            }
        }
        return Ok(true);
    }
    if let Some((cluster, id)) = parse_manifest_key(key) {
        match read_manifest(store, &cluster, &id).await {
            Ok(Some((m, stored))) => {
                put_backup_record(catalog, &cluster, &BackupRecord::of(&m, stored))?;
                summary.backups += 1;
            }
            Ok(None) => {}
            Err(e) => {
                summary.unreadable += 1;
                tracing::error!(%key, error = %format!("{e:#}"), "unreadable backup manifest; backup not listed");
            }
        }
        return Ok(true);
    }
    Ok(false)
}

fn put_chunk_entry(catalog: &Catalog, cluster: &str, hash: &str, e: &ChunkEntry) -> Result<()> {
    catalog
        .tree(CHUNKS_TREE)?
        .insert(format!("{cluster}/{hash}"), serde_json::to_vec(e)?)?;
    Ok(())
}

fn chunk_entry(catalog: &Catalog, cluster: &str, hash: &str) -> Result<Option<ChunkEntry>> {
    Ok(
        match catalog
            .tree(CHUNKS_TREE)?
            .get(format!("{cluster}/{hash}"))?
        {
            Some(v) => Some(serde_json::from_slice(&v)?),
            None => None,
        },
    )
}

/// Every chunk of a cluster in the catalog.
pub fn chunk_entries(catalog: &Catalog, cluster: &str) -> Result<Vec<(String, ChunkEntry)>> {
    let mut out = Vec::new();
    for item in catalog
        .tree(CHUNKS_TREE)?
        .scan_prefix(format!("{cluster}/"))
    {
        let (k, v) = item?;
        let k = String::from_utf8_lossy(&k);
        if let Some((_, hash)) = k.split_once('/') {
            out.push((hash.to_string(), serde_json::from_slice(&v)?));
        }
    }
    Ok(out)
}

/// Forgets a chunk (after its object was deleted).
pub fn remove_chunk_entry(catalog: &Catalog, cluster: &str, hash: &str) -> Result<()> {
    catalog
        .tree(CHUNKS_TREE)?
        .remove(format!("{cluster}/{hash}"))?;
    Ok(())
}

fn put_backup_record(catalog: &Catalog, cluster: &str, r: &BackupRecord) -> Result<()> {
    catalog
        .tree(BACKUPS_TREE)?
        .insert(format!("{cluster}/{}", r.id), serde_json::to_vec(r)?)?;
    Ok(())
}

/// Forgets a backup (after its manifest was deleted).
pub fn remove_backup_record(catalog: &Catalog, cluster: &str, id: &str) -> Result<()> {
    catalog
        .tree(BACKUPS_TREE)?
        .remove(format!("{cluster}/{id}"))?;
    Ok(())
}

/// Every backup of a cluster, oldest first.
pub fn backup_records(catalog: &Catalog, cluster: &str) -> Result<Vec<BackupRecord>> {
    let mut out = Vec::new();
    for item in catalog
        .tree(BACKUPS_TREE)?
        .scan_prefix(format!("{cluster}/"))
    {
        let (_, v) = item?;
        out.push(serde_json::from_slice::<BackupRecord>(&v)?);
    }
    out.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(out)
}

/// Reads, verifies and parses a manifest; also returns its stored size.
pub async fn read_manifest(
    store: &Store,
    cluster: &str,
    id: &str,
) -> Result<Option<(BackupManifest, u64)>> {
    use futures::StreamExt;
    let key = manifest_key(cluster, id);
    let Some(header) = store.read_header(&key).await? else {
        return Ok(None);
    };
    if header.raw_size > MAX_MANIFEST_SIZE {
        anyhow::bail!(
            "{key}: manifest of {} bytes exceeds the limit",
            header.raw_size
        );
    }
    let mut body = store.body_stream(&key, &header).await?;
    let mut decoder = VerifyingDecoder::new(header.raw_size)?;
    let mut raw = Vec::with_capacity(header.raw_size as usize);
    while let Some(chunk) = body.next().await {
        decoder
            .write::<std::convert::Infallible>(&chunk?, |b| {
                raw.extend_from_slice(b);
                Ok(())
            })
            .map_err(|e| anyhow::anyhow!("{key}: corrupt manifest: {e}"))?;
    }
    decoder
        .finish()
        .and_then(|s| s.check(header.raw_size, &header.blake3_hex()))
        .with_context(|| format!("{key}: manifest failed verification"))?;
    let m: BackupManifest =
        serde_json::from_slice(&raw).with_context(|| format!("{key}: unreadable manifest"))?;
    m.validate()
        .map_err(|e| anyhow::anyhow!("{key}: invalid manifest: {e}"))?;
    Ok(Some((m, store::HEADER_LEN as u64 + header.compressed_size)))
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
                store, catalog, identity, &cluster, &blake3, raw_size, &mut recv,
            )
            .await
        }
        Request::GetChunk { cluster, blake3 } => {
            let sent = match format::validate_chunk_hash(&blake3) {
                Err(m) => Err(Refusal::new(ErrorCode::Invalid, m)),
                Ok(()) => {
                    send_object(store, &chunk_key(&cluster, &blake3), &mut send, || {
                        Refusal::new(
                            ErrorCode::NotFound,
                            format!(
                                "chunk {blake3} is not in the archive of cluster '{cluster}' \
                                 (deleted by retention, or a damaged store?)"
                            ),
                        )
                    })
                    .await
                }
            };
            match sent {
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
            let sent = match format::validate_backup_id(&backup_id) {
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
        } => {
            if identity.role != Role::Admin {
                Err(Refusal::new(
                    ErrorCode::Unauthorized,
                    "retention needs an admin certificate (archived retention run uses DIR/admin.toml)",
                ))
            } else {
                let policy =
                    service
                        .policy
                        .with_overrides(keep_full, keep_within_secs, chunk_grace_secs);
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

async fn chunks_missing(
    catalog: &Catalog,
    service: &BackupService,
    identity: &ClientIdentity,
    cluster: &str,
    hashes: Vec<String>,
) -> Reply {
    require_writer(identity, "store backups")?;
    if hashes.len() > MAX_HASHES_PER_REQUEST {
        return Err(Refusal::new(
            ErrorCode::TooLarge,
            format!(
                "{} hashes in one request; the limit is {MAX_HASHES_PER_REQUEST}",
                hashes.len()
            ),
        ));
    }
    for h in &hashes {
        format::validate_chunk_hash(h).map_err(|m| Refusal::new(ErrorCode::Invalid, m))?;
    }
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
    identity: &ClientIdentity,
    cluster: &str,
    blake3: &str,
    raw_size: u64,
    recv: &mut quinn::RecvStream,
) -> Reply {
    require_writer(identity, "store backups")?;
    format::validate_chunk_hash(blake3).map_err(|m| Refusal::new(ErrorCode::Invalid, m))?;
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
    let what = format!("chunk {blake3}");
    let (pending, header, _) =
        receive_verified(store, &key, &what, raw_size, blake3, recv, false).await?;
    let stored_size = store::HEADER_LEN as u64 + header.compressed_size;
    let outcome = store
        .commit(pending, &header)
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
    format::validate_backup_id(backup_id).map_err(|m| Refusal::new(ErrorCode::Invalid, m))?;
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
    format::validate_backup_id(backup_id).map_err(|m| Refusal::new(ErrorCode::Invalid, m))?;
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

/// Segment size of a cluster (16 MiB until a segment was pushed).
pub fn segment_size(catalog: &Catalog, cluster: &str) -> Result<u32> {
    Ok(catalog
        .binding(cluster)?
        .map(|b| b.wal_segment_size)
        .unwrap_or(16 << 20))
}

/// The WAL segments a backup needs: first and last.
pub fn wal_range(r: &BackupRecord, seg_size: u32) -> Result<(SegmentName, SegmentName)> {
    let start: Lsn = r
        .start_lsn
        .parse()
        .map_err(|_| anyhow::anyhow!("backup {}: bad start LSN", r.id))?;
    let stop: Lsn = r
        .stop_lsn
        .parse()
        .map_err(|_| anyhow::anyhow!("backup {}: bad stop LSN", r.id))?;
    Ok((
        SegmentName::containing(TimelineId(r.timeline), start, seg_size),
        SegmentName::containing(
            TimelineId(r.stop_timeline),
            Lsn(stop.0.saturating_sub(1).max(start.0)),
            seg_size,
        ),
    ))
}

fn has_segment(catalog: &Catalog, cluster: &str, seg: &SegmentName) -> Result<bool> {
    Ok(catalog.wal(cluster, &WalFileName::Segment(*seg))?.is_some())
}

/// A record with its WAL state and restore window.
pub async fn summarize(
    store: &Store,
    catalog: &Catalog,
    cluster: &str,
    r: &BackupRecord,
) -> Result<BackupSummary> {
    let seg_size = segment_size(catalog, cluster)?;
    let (first, last) = wal_range(r, seg_size)?;
    let mut usable = true;
    let mut seg = first;
    let last_no = last.segno(seg_size);
    while seg.segno(seg_size) <= last_no {
        // A backup spanning a timeline switch has its later segments on the new timeline.
        let on_stop_tli = SegmentName {
            timeline: last.timeline,
            ..seg
        };
        if !has_segment(catalog, cluster, &seg)? && !has_segment(catalog, cluster, &on_stop_tli)? {
            usable = false;
            break;
        }
        seg = seg.next(seg_size);
    }
    let (mut until, mut until_lsn) = (None, None);
    if usable {
        let mut end = last;
        loop {
            let next = end.next(seg_size);
            if !has_segment(catalog, cluster, &next)? {
                break;
            }
            end = next;
        }
        let key = store::wal_key(cluster, &WalFileName::Segment(end));
        until = store.modified(&key).await?.map(|t| t.max(r.stop_time));
        until_lsn = Some(end.next(seg_size).start_lsn(seg_size).to_string());
    }
    Ok(BackupSummary {
        id: r.id.clone(),
        label: r.label.clone(),
        timeline: r.timeline,
        start_lsn: r.start_lsn.clone(),
        stop_lsn: r.stop_lsn.clone(),
        start_time: r.start_time,
        stop_time: r.stop_time,
        pg_version: r.pg_version,
        logical_bytes: r.logical_bytes,
        stored_bytes: r.stored_bytes,
        files: r.files,
        chunks: r.chunks,
        state: if usable {
            BackupState::Usable
        } else {
            BackupState::IncompleteWal
        },
        wal_start: first.to_string(),
        wal_stop: last.to_string(),
        restorable_until: until,
        restorable_until_lsn: until_lsn,
    })
}

/// Every backup of a cluster with its state, oldest first.
pub async fn list_backups(
    store: &Store,
    catalog: &Catalog,
    cluster: &str,
) -> Result<Vec<BackupSummary>> {
    let mut out = Vec::new();
    for r in backup_records(catalog, cluster)? {
        out.push(summarize(store, catalog, cluster, &r).await?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_refuse_tricks() {
        let h = "ab".repeat(32);
        let k = chunk_key("main", &h);
        assert_eq!(k, format!("main/chunks/ab/{h}.zst"));
        assert_eq!(parse_chunk_key(&k), Some(("main".into(), h.clone())));
        assert_eq!(parse_chunk_key(&format!("main/chunks/cd/{h}.zst")), None);
        assert_eq!(parse_chunk_key("main/chunks/ab/xyz.zst"), None);
        let m = manifest_key("main", "20261122T044537123Z");
        assert_eq!(
            parse_manifest_key(&m),
            Some(("main".into(), "20261122T044537123Z".into()))
        );
        assert_eq!(parse_manifest_key("main/backups/../manifest.zst"), None);
        assert_eq!(parse_manifest_key("main/backups/x/other.zst"), None);
    }
}
