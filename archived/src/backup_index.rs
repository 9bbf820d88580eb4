//! The backup index: where chunks and manifests live in the store, their catalog trees,
//! how a rebuild fills those, and a backup's WAL state and restore window.
//!
//! # Store layout
//!
//! ```text
//! <cluster>/chunks/<h[0..2]>/<blake3>.zst    one backup chunk, named by the blake3 of its
//!                                            raw bytes (content-addressed: a name has one
//!                                            possible content, so create-only conflicts
//!                                            are harmless duplicates)
//! <cluster>/packs/<id[0..2]>/<id>.pack       many chunks in one object, as pushclient
//!                                            sends them (packs.rs: index, then objects)
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
//! tree "chunks"   <cluster>/<blake3>  -> JSON ChunkEntry  (sizes; its pack and offset, or
//!                                        none for a loose chunk; `touched`: last time a
//!                                        backup stored or reused it, for the GC grace)
//! tree "backups"  <cluster>/<ID>      -> JSON BackupRecord (what listings show)
//! ```
//!
//! # State
//!
//! A backup is *usable* when every WAL segment from its start to its stop LSN is in the
//! archive; `restorable_until` is the archive time of the last segment after it on its
//! timeline without a gap.

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use walvault_protocol::core::format::codec::VerifyingDecoder;
use walvault_protocol::core::format::manifest::{BackupManifest, FileKind, MAX_MANIFEST_SIZE};
use walvault_protocol::core::format::names;
use walvault_protocol::core::pg::wal::{Lsn, SegmentName, TimelineId, WalFileName};
use walvault_protocol::core::wire::backup::{BackupState, BackupSummary};

use crate::catalog::{Catalog, RebuildSummary};
use crate::store::{self, Store};

const CHUNKS_TREE: &str = "chunks";
const BACKUPS_TREE: &str = "backups";

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
    names::validate_chunk_hash(hash).ok()?;
    (chunk_key(cluster, hash) == key).then(|| (cluster.to_string(), hash.to_string()))
}

/// Parses a manifest key into (cluster, id).
pub fn parse_manifest_key(key: &str) -> Option<(String, String)> {
    let mut parts = key.split('/');
    let (cluster, kind, id, file) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if kind != "backups" || file != "manifest.zst" || parts.next().is_some() {
        return None;
    }
    names::validate_backup_id(id).ok()?;
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
    /// The pack holding the chunk (see packs.rs); `None`: a loose object at
    /// [`chunk_key`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pack: Option<String>,
    /// Offset of the chunk's object in its pack.
    #[serde(default)]
    pub offset: u64,
}

impl ChunkEntry {
    /// The entry of a chunk in pack `id`, as the pack's index describes it.
    pub fn in_pack(id: &str, e: &crate::packs::PackEntry, touched: i64) -> ChunkEntry {
        ChunkEntry {
            raw_size: e.raw_size,
            stored_size: e.length,
            touched,
            pack: Some(id.to_string()),
            offset: e.offset,
        }
    }

    /// Where the chunk's object is in the store.
    pub fn location(&self, cluster: &str, hash: &str) -> store::Loc {
        match &self.pack {
            Some(id) => store::Loc {
                key: crate::packs::pack_key(cluster, id),
                range: Some(self.offset..self.offset + self.stored_size),
            },
            None => store::Loc {
                key: chunk_key(cluster, hash),
                range: None,
            },
        }
    }
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
    pub(crate) fn of(m: &BackupManifest, manifest_stored: u64) -> BackupRecord {
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

pub(crate) fn now() -> i64 {
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
                        pack: None,
                        offset: 0,
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
    if let Some((cluster, id)) = crate::packs::parse_pack_key(key) {
        match read_pack_index(store, key).await {
            Ok(Some(entries)) => {
                let touched = store.modified(key).await.ok().flatten().unwrap_or_else(now);
                for e in entries {
                    put_chunk_entry(
                        catalog,
                        &cluster,
                        &hex::encode(e.blake3),
                        &ChunkEntry::in_pack(&id, &e, touched),
                    )?;
                    summary.chunks += 1;
                }
            }
            Ok(None) => {}
            Err(e) => {
                summary.unreadable += 1;
                tracing::error!(%key, error = %format!("{e:#}"), "unreadable pack; its chunks are not indexed");
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

/// A pack's index (two range reads); `None` if the pack is absent.
pub async fn read_pack_index(
    store: &Store,
    key: &str,
) -> Result<Option<Vec<crate::packs::PackEntry>>> {
    use crate::packs::{decode_count, decode_index, INDEX_ENTRY_LEN, PACK_HEADER_LEN};
    let Some(len) = store.len(key).await? else {
        return Ok(None);
    };
    let part = |end: u64| store::Loc {
        key: key.to_string(),
        range: Some(0..end.min(len)),
    };
    let Some(head) = store.get_part(&part(PACK_HEADER_LEN as u64)).await? else {
        return Ok(None);
    };
    let count = decode_count(&head).with_context(|| format!("{key}: damaged pack header"))?;
    let index_len = (PACK_HEADER_LEN + INDEX_ENTRY_LEN * count) as u64;
    let Some(index) = store.get_part(&part(index_len)).await? else {
        return Ok(None);
    };
    decode_index(&index, len)
        .with_context(|| format!("{key}: damaged pack index"))
        .map(Some)
}

pub(crate) fn put_chunk_entry(
    catalog: &Catalog,
    cluster: &str,
    hash: &str,
    e: &ChunkEntry,
) -> Result<()> {
    catalog
        .tree(CHUNKS_TREE)?
        .insert(format!("{cluster}/{hash}"), serde_json::to_vec(e)?)?;
    Ok(())
}

pub(crate) fn chunk_entry(
    catalog: &Catalog,
    cluster: &str,
    hash: &str,
) -> Result<Option<ChunkEntry>> {
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

pub(crate) fn put_backup_record(catalog: &Catalog, cluster: &str, r: &BackupRecord) -> Result<()> {
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
