//! Backup chunks in the catalog: tree "chunks", `<cluster>/<blake3>` -> JSON
//! [`ChunkEntry`]: its sizes, the pack and offset that hold it (none for a loose chunk),
//! and `touched`, the last time a backup stored or reused it (for the GC grace period,
//! gc.rs).
//!
//! A rebuild indexes loose chunks from their object headers and packed chunks from
//! their pack's index (two ranged reads per pack), `touched` from the object's time.

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use walvault_protocol::core::format::pack::{self, PackEntry, PACK_HEADER_LEN};

use super::{Index, RebuildSummary};
use crate::clock::unix_now;
use crate::store::{layout, Loc, Store, HEADER_LEN};

/// Catalog entry of a chunk.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct ChunkEntry {
    /// Raw size.
    pub(crate) raw_size: u64,
    /// Stored bytes (header + zstd frame).
    pub(crate) stored_size: u64,
    /// Last time (unix seconds) a backup stored or reused the chunk.
    pub(crate) touched: i64,
    /// The pack holding the chunk; `None`: a loose object at its chunk key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) pack: Option<String>,
    /// Offset of the chunk's object in its pack.
    #[serde(default)]
    pub(crate) offset: u64,
}

impl ChunkEntry {
    /// The entry of a chunk in pack `id`, as the pack's index describes it.
    pub(crate) fn in_pack(id: &str, e: &PackEntry, touched: i64) -> ChunkEntry {
        ChunkEntry {
            raw_size: e.raw_size,
            stored_size: e.length,
            touched,
            pack: Some(id.to_string()),
            offset: e.offset,
        }
    }

    /// Where the chunk's object is in the store.
    pub(crate) fn location(&self, cluster: &str, hash: &str) -> Loc {
        match &self.pack {
            Some(id) => Loc {
                key: layout::pack_key(cluster, id),
                range: Some(self.offset..self.offset + self.stored_size),
            },
            None => Loc {
                key: layout::chunk_key(cluster, hash),
                range: None,
            },
        }
    }
}

fn key(cluster: &str, hash: &str) -> String {
    format!("{cluster}/{hash}")
}

impl Index {
    /// Records a chunk (unflushed).
    pub(crate) fn put_chunk(&self, cluster: &str, hash: &str, e: &ChunkEntry) -> Result<()> {
        super::put_json(&self.chunks, &key(cluster, hash), e)
    }

    /// The entry of a chunk.
    pub(crate) fn chunk(&self, cluster: &str, hash: &str) -> Result<Option<ChunkEntry>> {
        super::get_json(&self.chunks, &key(cluster, hash))
    }

    /// Every chunk of a cluster in the catalog.
    pub(crate) fn chunks(&self, cluster: &str) -> Result<Vec<(String, ChunkEntry)>> {
        super::scan_cluster(&self.chunks, cluster)
    }

    /// Forgets a chunk (unflushed).
    pub(crate) fn remove_chunk(&self, cluster: &str, hash: &str) -> Result<()> {
        self.chunks.remove(key(cluster, hash))?;
        Ok(())
    }
}

/// A pack's index (two range reads); `None` if the pack is absent.
pub(crate) async fn read_pack_index(store: &Store, key: &str) -> Result<Option<Vec<PackEntry>>> {
    let Some(len) = store.len(key).await? else {
        return Ok(None);
    };
    let part = |end: u64| Loc {
        key: key.to_string(),
        range: Some(0..end.min(len)),
    };
    let Some(head) = store.get_part(&part(PACK_HEADER_LEN as u64)).await? else {
        return Ok(None);
    };
    let count = pack::decode_count(&head).with_context(|| format!("{key}: damaged pack header"))?;
    let Some(index) = store.get_part(&part(pack::index_len(count))).await? else {
        return Ok(None);
    };
    pack::decode_index(&index, len)
        .with_context(|| format!("{key}: damaged pack index"))
        .map(Some)
}

/// Empties the tree (start of a rebuild).
pub(super) fn clear(index: &Index) -> Result<()> {
    index.chunks.clear()?;
    Ok(())
}

/// Indexes `key` during a rebuild if it is a loose chunk or a pack; `Ok(false)` if it is
/// neither.
pub(super) async fn index_object(
    index: &Index,
    store: &Store,
    key: &str,
    summary: &mut RebuildSummary,
) -> Result<bool> {
    if let Some((cluster, hash)) = layout::parse_chunk_key(key) {
        match store.read_header(key).await {
            Ok(Some(h)) => {
                let touched = store
                    .modified(key)
                    .await
                    .ok()
                    .flatten()
                    .unwrap_or_else(unix_now);
                index.put_chunk(
                    &cluster,
                    &hash,
                    &ChunkEntry {
                        raw_size: h.raw_size,
                        stored_size: HEADER_LEN as u64 + h.compressed_size,
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
    if let Some((cluster, id)) = layout::parse_pack_key(key) {
        match read_pack_index(store, key).await {
            Ok(Some(entries)) => {
                let touched = store
                    .modified(key)
                    .await
                    .ok()
                    .flatten()
                    .unwrap_or_else(unix_now);
                for e in entries {
                    index.put_chunk(
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
    Ok(false)
}
