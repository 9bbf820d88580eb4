//! The object store: the archive's source of truth.
//!
//! Where each object lives is [`layout`]; what an object is, is
//! `walvault_protocol::core::format::object`: a 64-byte header (raw size, blake3,
//! compressed size) followed by one zstd frame of the raw file. The header makes objects
//! self-describing: a catalog rebuild needs a listing and one 64-byte ranged read per
//! object, and every reader can verify what it decompresses.
//!
//! # Durability
//!
//! Every write is create-only and durable on return. Local backend (the default,
//! [`local`]): the object is written to a `.tmp.*` file beside its final name, fsynced,
//! hard-linked to the final name (which fails if the name exists: create-only), and the
//! directory is fsynced. Backup chunks, written by the thousand, use
//! [`Store::put_grouped`]: the same steps with the two fsyncs replaced by syncfs calls
//! shared by every concurrent writer ([`syncgroup`]). Remote backends ([`remote`]:
//! `s3://`, `gs://`, `az://`): the body is spooled to a local temporary file while it is
//! received and verified, then uploaded create-only; success is the backend's
//! acknowledgement.

pub(crate) mod layout;
mod local;
mod object;
mod remote;
pub(crate) mod syncgroup;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use bytes::Bytes;
use futures::stream::BoxStream;
use tokio::io::{AsyncSeekExt, AsyncWriteExt};
use walvault_protocol::core::format::codec::VerifyingDecoder;

pub(crate) use local::LocalStore;
pub(crate) use object::{CreateOutcome, Loc, Many, ObjectHeader, PendingObject, HEADER_LEN};
pub(crate) use remote::RemoteStore;
use syncgroup::SyncGroup;

/// Where objects live.
#[derive(Clone)]
pub(crate) enum Store {
    /// A directory on local disk, with our own fsyncing write path.
    Local(LocalStore),
    /// Any object_store backend.
    Remote(RemoteStore),
}

impl Store {
    /// Opens the store named by `url` (empty: local directory `default_root`).
    pub(crate) fn open(
        url: &str,
        options: &[(String, String)],
        default_root: &Path,
        spool: &Path,
    ) -> Result<Store> {
        if url.is_empty() || url.starts_with("file://") || url.starts_with('/') {
            let root = if url.is_empty() {
                default_root.to_path_buf()
            } else {
                PathBuf::from(url.trim_start_matches("file://"))
            };
            return Ok(Store::Local(LocalStore::open(root)?));
        }
        Ok(Store::Remote(RemoteStore::open(url, options, spool)?))
    }

    /// Human description.
    pub(crate) fn describe(&self) -> String {
        match self {
            Store::Local(l) => format!("local directory {}", l.root().display()),
            Store::Remote(r) => r.url().to_string(),
        }
    }

    /// The directory of a local store (`None` for an object store).
    pub(crate) fn local_root(&self) -> Option<&std::path::Path> {
        match self {
            Store::Local(l) => Some(l.root()),
            Store::Remote(_) => None,
        }
    }

    /// A new group commit for the filesystem that [`put_grouped`](Self::put_grouped)
    /// writes to: made once, before the writes it covers.
    pub(crate) fn sync_group(&self) -> SyncGroup {
        match self {
            Store::Local(l) => SyncGroup::new(l.root()),
            Store::Remote(r) => SyncGroup::new(r.spool()),
        }
    }

    /// Starts writing an object; the body is appended after a header-sized gap.
    pub(crate) async fn begin(&self, key: &str) -> Result<PendingObject> {
        self.begin_reserving(key, HEADER_LEN).await
    }

    /// Starts writing an object whose every byte the writer appends (a pack); commit it
    /// with [`commit_raw`](Self::commit_raw).
    pub(crate) async fn begin_raw(&self, key: &str) -> Result<PendingObject> {
        self.begin_reserving(key, 0).await
    }

    async fn begin_reserving(&self, key: &str, reserved: usize) -> Result<PendingObject> {
        let tmp = match self {
            Store::Local(l) => l.temp_path(key).await?,
            Store::Remote(r) => r.temp_path(key),
        };
        // Readable too: a large remote object streams from it at commit.
        let mut file = tokio::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&tmp)
            .await
            .with_context(|| format!("cannot create {}", tmp.display()))?;
        file.write_all(&vec![0u8; reserved]).await?;
        Ok(PendingObject {
            key: key.to_string(),
            tmp,
            file,
            reserved: reserved as u64,
            written: 0,
        })
    }

    /// Makes a pending object durable under its key, create-only.
    pub(crate) async fn commit(
        &self,
        mut pending: PendingObject,
        header: &ObjectHeader,
    ) -> Result<CreateOutcome> {
        pending.file.seek(std::io::SeekFrom::Start(0)).await?;
        pending.file.write_all(&header.encode()).await?;
        self.commit_raw(pending).await
    }

    /// Makes a pending object durable under its key, create-only, as written.
    pub(crate) async fn commit_raw(&self, mut pending: PendingObject) -> Result<CreateOutcome> {
        pending.file.flush().await?;
        match self {
            Store::Local(l) => l.commit(&mut pending).await,
            Store::Remote(r) => r.commit(&mut pending).await,
        }
    }

    /// Stores a small object (header + `body`, the zstd frame) create-only: for the many
    /// chunks of a backup. On a local store the file is written in one blocking call and
    /// its fsyncs are shared with every concurrent writer through `group` (see
    /// syncgroup.rs), with the same guarantee as [`commit`](Self::commit): on return the
    /// object, data and name, is durable.
    pub(crate) async fn put_grouped(
        &self,
        key: &str,
        header: &ObjectHeader,
        body: Bytes,
        group: &SyncGroup,
    ) -> Result<CreateOutcome> {
        match self {
            Store::Local(l) => l.put_grouped(key, header, body, group).await,
            Store::Remote(r) => {
                let mut object = Vec::with_capacity(HEADER_LEN + body.len());
                object.extend_from_slice(&header.encode());
                object.extend_from_slice(&body);
                r.put_new(key, object.into()).await
            }
        }
    }

    /// Writes a small object create-only.
    pub(crate) async fn put_new(&self, key: &str, bytes: Bytes) -> Result<CreateOutcome> {
        match self {
            Store::Local(l) => l.put_new(key, bytes).await,
            Store::Remote(r) => r.put_new(key, bytes).await,
        }
    }

    /// Reads a whole small object; `None` if absent.
    pub(crate) async fn get_small(&self, key: &str) -> Result<Option<Bytes>> {
        match self {
            Store::Local(l) => l.get_small(key).await,
            Store::Remote(r) => r.get_small(key).await,
        }
    }

    /// Several small objects or ranges of objects (backup chunks, loose or in packs), in
    /// order, as a stream; or the index of the first whose object is absent, found before
    /// anything is streamed. Memory: a few chunks in flight. A failure after the stream
    /// started (a short read) comes as its error item.
    pub(crate) async fn get_many(&self, locs: Vec<Loc>) -> Result<Many> {
        match self {
            Store::Local(l) => l.get_many(locs).await,
            Store::Remote(r) => r.get_many(locs).await,
        }
    }

    /// A whole object or a range of it; `None` if the object is absent.
    pub(crate) async fn get_part(&self, loc: &Loc) -> Result<Option<Bytes>> {
        let Some(range) = &loc.range else {
            return self.get_small(&loc.key).await;
        };
        match self {
            Store::Local(l) => l.get_range(&loc.key, range.clone()).await,
            Store::Remote(r) => r.get_range(&loc.key, range.clone()).await,
        }
    }

    /// An object's length in bytes; `None` if absent.
    pub(crate) async fn len(&self, key: &str) -> Result<Option<u64>> {
        match self {
            Store::Local(l) => l.len(key).await,
            Store::Remote(r) => r.len(key).await,
        }
    }

    /// Reads an object's header; `None` if absent.
    pub(crate) async fn read_header(&self, key: &str) -> Result<Option<ObjectHeader>> {
        let bytes = match self {
            Store::Local(l) => l.read_head(key).await?,
            Store::Remote(r) => r.read_head(key).await?,
        };
        let Some(bytes) = bytes else {
            return Ok(None);
        };
        ObjectHeader::decode(&bytes)
            .map(Some)
            .with_context(|| format!("{key}: damaged object header"))
    }

    /// A whole object decompressed and verified against its header (size and blake3),
    /// with its header; `None` if absent. `what` names it in errors ("manifest"); an
    /// object of more than `max_raw` bytes is refused before anything is read.
    pub(crate) async fn read_verified(
        &self,
        key: &str,
        what: &str,
        max_raw: u64,
    ) -> Result<Option<(Vec<u8>, ObjectHeader)>> {
        let mut raw = Vec::new();
        let header = self
            .verify_streamed(key, what, max_raw, |header, b| {
                if raw.is_empty() {
                    raw.reserve_exact(header.raw_size as usize);
                }
                raw.extend_from_slice(b);
            })
            .await?;
        Ok(header.map(|h| (raw, h)))
    }

    /// Decompresses an object as it is read, verifying it against its header (size and
    /// blake3), and hands each piece of raw bytes to `sink`; its header, `None` if
    /// absent. Memory: one piece at a time. `what` and `max_raw` as for
    /// [`read_verified`](Self::read_verified).
    pub(crate) async fn verify_streamed(
        &self,
        key: &str,
        what: &str,
        max_raw: u64,
        mut sink: impl FnMut(&ObjectHeader, &[u8]),
    ) -> Result<Option<ObjectHeader>> {
        use futures::StreamExt;
        let Some(header) = self.read_header(key).await? else {
            return Ok(None);
        };
        if header.raw_size > max_raw {
            anyhow::bail!(
                "{key}: {what} of {} bytes exceeds the limit",
                header.raw_size
            );
        }
        let mut body = self.body_stream(key, &header).await?;
        let mut decoder = VerifyingDecoder::new(header.raw_size)?;
        while let Some(chunk) = body.next().await {
            decoder
                .write::<std::convert::Infallible>(&chunk?, |b| {
                    sink(&header, b);
                    Ok(())
                })
                .map_err(|e| anyhow::anyhow!("{key}: corrupt {what}: {e}"))?;
        }
        decoder
            .finish()
            .and_then(|s| s.check(header.raw_size, &header.blake3_hex()))
            .with_context(|| format!("{key}: {what} failed verification"))?;
        Ok(Some(header))
    }

    /// The object's body (the zstd frame) as a stream of chunks.
    pub(crate) async fn body_stream(
        &self,
        key: &str,
        header: &ObjectHeader,
    ) -> Result<BoxStream<'static, Result<Bytes>>> {
        match self {
            Store::Local(l) => l.body_stream(key, header).await,
            Store::Remote(r) => r.body_stream(key, header).await,
        }
    }

    /// Removes `.tmp.*` files left by uploads that never completed (a crash mid-write),
    /// and on a remote store the temporary keys of streamed uploads older than an hour.
    pub(crate) async fn remove_stale_temp_files(&self) -> Result<u64> {
        let dir = match self {
            Store::Local(l) => l.root().to_path_buf(),
            Store::Remote(r) => r.spool().to_path_buf(),
        };
        let mut removed = tokio::task::spawn_blocking(move || {
            let mut removed = 0;
            local::remove_temp(&dir, &mut removed)?;
            Ok::<_, anyhow::Error>(removed)
        })
        .await??;
        if let Store::Remote(r) = self {
            removed += r.remove_stale_uploads().await?;
        }
        Ok(removed)
    }

    /// Deletes an object (retention and `backups delete`); absent is not an error.
    /// Local: the file is unlinked and its directory fsynced.
    pub(crate) async fn delete(&self, key: &str) -> Result<()> {
        match self {
            Store::Local(l) => l.delete(key).await,
            Store::Remote(r) => r.delete(key).await,
        }
    }

    /// When an object was written (unix seconds); `None` if absent.
    pub(crate) async fn modified(&self, key: &str) -> Result<Option<i64>> {
        match self {
            Store::Local(l) => l.modified(key).await,
            Store::Remote(r) => r.modified(key).await,
        }
    }

    /// Bytes [`commit`](Self::commit) or [`commit_raw`](Self::commit_raw) of a pending
    /// object of `len` bytes holds in memory: none on a local store; on a remote one the
    /// whole object up to `SINGLE_PUT_MAX`, the parts in flight above it.
    pub(crate) fn commit_memory(&self, len: u64) -> u64 {
        match self {
            Store::Local(_) => 0,
            Store::Remote(_) => remote::commit_memory(len),
        }
    }

    /// Bytes [`put_grouped`](Self::put_grouped) of a body of `len` bytes holds beside
    /// the body itself: none locally, a copy with its header on a remote store.
    pub(crate) fn put_grouped_memory(&self, len: u64) -> u64 {
        match self {
            Store::Local(_) => 0,
            Store::Remote(_) => HEADER_LEN as u64 + len,
        }
    }

    /// Bytes [`get_many`](Self::get_many) of objects of `sizes` holds at most: a few
    /// of the largest locally (the reader runs ahead of the answer by its channel), all
    /// of them on a remote store (every object is fetched before the answer starts).
    pub(crate) fn get_many_memory(&self, sizes: &[u64]) -> u64 {
        let all: u64 = sizes.iter().sum();
        match self {
            Store::Local(_) => {
                let largest = sizes.iter().copied().max().unwrap_or(0);
                all.min(local::GET_MANY_AHEAD as u64 * largest)
            }
            Store::Remote(_) => all,
        }
    }

    /// Bytes a [`body_stream`](Self::body_stream) holds while its answer is sent.
    pub(crate) fn body_stream_memory(&self) -> u64 {
        match self {
            Store::Local(_) => local::BODY_STREAM_MEMORY,
            Store::Remote(_) => remote::BODY_STREAM_MEMORY,
        }
    }

    /// Lists every key in the store with a prefix (`""` for all), sorted.
    pub(crate) async fn list(&self, prefix: &str) -> Result<Vec<String>> {
        match self {
            Store::Local(l) => l.list(prefix).await,
            Store::Remote(r) => r.list(prefix).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    #[test]
    fn header_round_trip_and_refusal() {
        let h = ObjectHeader {
            raw_size: 16 << 20,
            blake3: [7; 32],
            compressed_size: 1234,
        };
        assert_eq!(ObjectHeader::decode(&h.encode()).unwrap(), h);
        assert!(ObjectHeader::decode(&[0u8; 64]).is_err());
        assert!(ObjectHeader::decode(&h.encode()[..10]).is_err());
    }

    /// A local store in `dir`.
    fn local_store(dir: &std::path::Path) -> Store {
        Store::open("", &[], &dir.join("store"), &dir.join("spool")).unwrap()
    }

    #[tokio::test]
    async fn a_local_listing_of_a_prefix_is_the_whole_listing_filtered() {
        let dir = tempfile::tempdir().unwrap();
        let store = local_store(dir.path());
        for key in [
            "main/cluster.toml",
            "main/wal/00000001/000000010000000000000001.zst",
            "main/wal/00000002/000000020000000000000003.zst",
            "main/stream/00000001/000000010000000000000002.00001000.zst",
            "mainly/cluster.toml",
            "other/wal/00000001/000000010000000000000001.zst",
        ] {
            assert_eq!(
                store.put_new(key, Bytes::from_static(b"x")).await.unwrap(),
                CreateOutcome::Created
            );
        }
        let all = store.list("").await.unwrap();
        assert_eq!(all.len(), 6, "{all:?}");
        for prefix in [
            "main/",
            "main",
            "mai",
            "main/wal/",
            "main/wal/0000000",
            "main/wal/00000001/",
            "main/stream/00000001/",
            "main/cluster.toml/x",
            "nothing/",
            "other/wal/00000001/000000010000000000000001.zst",
        ] {
            let want: Vec<String> = all
                .iter()
                .filter(|k| k.starts_with(prefix))
                .cloned()
                .collect();
            assert_eq!(store.list(prefix).await.unwrap(), want, "prefix {prefix:?}");
        }
    }

    #[tokio::test]
    async fn local_store_is_create_only() {
        let dir = tempfile::tempdir().unwrap();
        let store = local_store(dir.path());
        let h = ObjectHeader {
            raw_size: 1,
            blake3: [1; 32],
            compressed_size: 3,
        };
        let mut p = store.begin("c/wal/00000001/x.zst").await.unwrap();
        p.write(b"abc").await.unwrap();
        assert_eq!(store.commit(p, &h).await.unwrap(), CreateOutcome::Created);
        let mut p = store.begin("c/wal/00000001/x.zst").await.unwrap();
        p.write(b"xyz").await.unwrap();
        let h2 = ObjectHeader {
            blake3: [2; 32],
            ..h.clone()
        };
        assert_eq!(store.commit(p, &h2).await.unwrap(), CreateOutcome::Exists);
        assert_eq!(
            store.read_header("c/wal/00000001/x.zst").await.unwrap(),
            Some(h.clone())
        );
        let chunks: Vec<Bytes> = store
            .body_stream("c/wal/00000001/x.zst", &h)
            .await
            .unwrap()
            .map(|c| c.unwrap())
            .collect()
            .await;
        assert_eq!(chunks.concat(), b"abc");
        assert_eq!(
            store.list("").await.unwrap(),
            vec!["c/wal/00000001/x.zst".to_string()]
        );
    }
}
