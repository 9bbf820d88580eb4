//! The object store: the archive's source of truth.
//!
//! # Layout
//!
//! ```text
//! <cluster>/cluster.toml                      binding: system identifier, segment size, PG major
//! <cluster>/wal/<TLI>/<SEGMENT>.zst           a segment
//! <cluster>/wal/<TLI>/<SEGMENT>.partial.zst   a partial segment (end of a timeline)
//! <cluster>/wal/<TLI>/<SEG>.<OFF>.backup.zst  a backup history file
//! <cluster>/history/<TLI>.history.zst         a timeline history file
//! ```
//!
//! Keys hold the WAL file name and nothing else, so a create-only write makes "one
//! content per name" a property of the store itself. A name's key is derived from the
//! parsed [`WalFileName`], never from client text, so no key can escape its cluster.
//!
//! # Object format
//!
//! Every object is a 64-byte header (raw size, blake3, compressed size) followed by one
//! zstd frame of the raw file: [`walvault_protocol::core::format::object`] owns the format. The header
//! makes objects self-describing: a catalog rebuild needs a listing and one 64-byte
//! ranged read per object, and every reader can verify what it decompresses.
//!
//! # Durability
//!
//! Local backend (the default): the object is written to a `.tmp.*` file beside its
//! final name, fsynced, hard-linked to the final name (which fails if the name exists:
//! create-only), and the directory is fsynced. Backup chunks, written by the thousand,
//! use [`Store::put_grouped`]: the same steps with the two fsyncs replaced by syncfs
//! calls shared by every concurrent writer (syncgroup.rs). Remote backends (`s3://`, `gs://`,
//! `az://`): the body is spooled to a local temporary file while it is received and
//! verified, then uploaded create-only; success is the backend's acknowledgement. An object
//! up to [`SINGLE_PUT_MAX`] is one PUT with `PutMode::Create` (`If-None-Match: *` on S3).
//! A larger one streams from the spool file as a multipart upload to a temporary key under
//! [`UPLOADS_PREFIX`] and is then copied to its name with `copy_if_not_exists` (on S3 a
//! one-part multipart copy completed with `If-None-Match: *`), because object_store's
//! multipart uploads cannot be create-only themselves (arrow-rs-object-store#289); the
//! temporary key is deleted after the copy, and at startup if a crash left it behind.
//!
//! # Remote backends: configuration
//!
//! `s3://`, `gs://` and `az://` builders start from the environment (`AWS_*`,
//! `GOOGLE_*`, `AZURE_*`: e.g. `AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`,
//! `AWS_SECRET_ACCESS_KEY`, `AWS_REGION`, `AWS_ALLOW_HTTP`), then `[storage_options]` of
//! archived.toml overrides them. An option the backend does not know is refused at
//! startup (object_store's own URL parser would silently ignore a misspelt key). On S3,
//! `aws_copy_if_not_exists` defaults to `multipart`, which the streaming path needs.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use futures::stream::BoxStream;
use futures::StreamExt;
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey, S3CopyIfNotExists};
use object_store::azure::{AzureConfigKey, MicrosoftAzureBuilder};
use object_store::gcp::{GoogleCloudStorageBuilder, GoogleConfigKey};
use object_store::{
    path::Path as ObjPath, ObjectStore, ObjectStoreScheme, PutMode, PutOptions, PutPayload,
    WriteMultipart,
};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use walvault_protocol::core::pg::wal::WalFileName;
use walvault_protocol::net::fsutil;

pub use walvault_protocol::core::format::object::{ObjectHeader, HEADER_LEN};

/// Remote objects up to this size (header included) are uploaded in one PUT, read whole
/// into memory; larger ones stream as multipart uploads (see the module header).
pub const SINGLE_PUT_MAX: u64 = 16 << 20;
/// Part size of streamed uploads.
const PART_SIZE: usize = 8 << 20;
/// Parts uploaded at once per streamed object: a large upload holds at most
/// (PARTS_IN_FLIGHT + 1) x PART_SIZE = 40 MiB, whatever the object's size.
const PARTS_IN_FLIGHT: usize = 4;
/// Temporary keys of streamed uploads (a cluster name cannot start with '.').
pub const UPLOADS_PREFIX: &str = ".uploads/";
/// Temporary upload keys older than this are removed at startup (a crash mid-upload).
const STALE_UPLOAD_SECS: i64 = 3600;

/// Storage key of a WAL file of a cluster.
pub fn wal_key(cluster: &str, name: &WalFileName) -> String {
    match name {
        WalFileName::History(_) => format!("{cluster}/history/{name}.zst"),
        other => format!("{cluster}/wal/{}/{other}.zst", other.timeline()),
    }
}

/// Key of a cluster's binding file.
pub fn cluster_key(cluster: &str) -> String {
    format!("{cluster}/cluster.toml")
}

/// Parses a storage key back into cluster and WAL file name (for catalog rebuilds).
pub fn parse_wal_key(key: &str) -> Option<(String, WalFileName)> {
    let mut parts = key.split('/');
    let cluster = parts.next()?;
    let kind = parts.next()?;
    let rest: Vec<&str> = parts.collect();
    let file = match (kind, rest.as_slice()) {
        ("wal", [_, file]) | ("history", [file]) => *file,
        _ => return None,
    };
    let name: WalFileName = file.strip_suffix(".zst")?.parse().ok()?;
    if wal_key(cluster, &name) != key {
        return None;
    }
    Some((cluster.to_string(), name))
}

/// A whole local file, or `range` of it.
fn read_part(f: &std::fs::File, range: Option<&std::ops::Range<u64>>) -> std::io::Result<Bytes> {
    match range {
        None => {
            let mut buf = Vec::new();
            std::io::Read::read_to_end(&mut &*f, &mut buf)?;
            Ok(Bytes::from(buf))
        }
        Some(r) => {
            let mut buf = vec![0u8; (r.end - r.start) as usize];
            std::os::unix::fs::FileExt::read_exact_at(f, &mut buf, r.start)?;
            Ok(Bytes::from(buf))
        }
    }
}

/// Where a chunk is: a whole object, or a byte range of one (a chunk in a pack).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Loc {
    /// Store key.
    pub key: String,
    /// Byte range within the object; `None` for the whole object.
    pub range: Option<std::ops::Range<u64>>,
}

/// Answer of [`Store::get_many`].
pub enum Many {
    /// Every object, whole (header and frame), in the order asked.
    Objects(BoxStream<'static, Result<Bytes>>),
    /// The object at this index of the request is absent (nothing was streamed).
    Missing(usize),
}

/// Result of a create-only write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CreateOutcome {
    /// The object was created.
    Created,
    /// An object already existed under the key; nothing changed.
    Exists,
}

/// Where objects live.
#[derive(Clone)]
pub enum Store {
    /// A directory on local disk, with our own fsyncing write path.
    Local {
        /// Root directory.
        root: PathBuf,
    },
    /// Any object_store backend.
    Remote {
        /// The backend.
        store: Arc<dyn ObjectStore>,
        /// Description for logs.
        url: String,
        /// Local directory for spooling uploads.
        spool: PathBuf,
    },
}

/// An object being written: a temporary file that becomes the object on commit.
pub struct PendingObject {
    key: String,
    tmp: PathBuf,
    file: tokio::fs::File,
    /// Bytes reserved at the start, written at commit (the object header), or 0.
    reserved: u64,
    written: u64,
}

impl PendingObject {
    /// Appends body bytes.
    pub async fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.file
            .write_all(bytes)
            .await
            .context("writing object body")?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    /// Body bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }
}

impl Drop for PendingObject {
    fn drop(&mut self) {
        // Committed objects were linked/uploaded already; the temp file is never an object.
        let _ = std::fs::remove_file(&self.tmp);
    }
}

impl Store {
    /// Opens the store named by `url` (empty: local directory `default_root`).
    pub fn open(
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
            std::fs::create_dir_all(&root)
                .with_context(|| format!("cannot create store directory {}", root.display()))?;
            return Ok(Store::Local { root });
        }
        let parsed =
            url::Url::parse(url).with_context(|| format!("invalid storage URL '{url}'"))?;
        let (store, prefix) = remote_backend(&parsed, options)
            .with_context(|| format!("unsupported or misconfigured storage URL '{url}'"))?;
        let store: Arc<dyn ObjectStore> = if prefix.as_ref().is_empty() {
            Arc::from(store)
        } else {
            Arc::new(object_store::prefix::PrefixStore::new(store, prefix))
        };
        std::fs::create_dir_all(spool)
            .with_context(|| format!("cannot create spool directory {}", spool.display()))?;
        Ok(Store::Remote {
            store,
            url: url.to_string(),
            spool: spool.to_path_buf(),
        })
    }

    /// Human description.
    pub fn describe(&self) -> String {
        match self {
            Store::Local { root } => format!("local directory {}", root.display()),
            Store::Remote { url, .. } => url.clone(),
        }
    }

    fn local_path(root: &Path, key: &str) -> PathBuf {
        root.join(key)
    }

    /// Starts writing an object; the body is appended after a header-sized gap.
    pub async fn begin(&self, key: &str) -> Result<PendingObject> {
        self.begin_reserving(key, HEADER_LEN).await
    }

    /// Starts writing an object whose every byte the writer appends (a pack); commit it
    /// with [`commit_raw`](Self::commit_raw).
    pub async fn begin_raw(&self, key: &str) -> Result<PendingObject> {
        self.begin_reserving(key, 0).await
    }

    async fn begin_reserving(&self, key: &str, reserved: usize) -> Result<PendingObject> {
        let tmp = match self {
            Store::Local { root } => {
                let target = Self::local_path(root, key);
                let dir = target.parent().ok_or_else(|| anyhow!("bad key {key}"))?;
                tokio::fs::create_dir_all(dir)
                    .await
                    .with_context(|| format!("cannot create {}", dir.display()))?;
                fsutil::temp_path_beside(&target)
            }
            Store::Remote { spool, .. } => {
                fsutil::temp_path_beside(&spool.join(key.replace('/', "_")))
            }
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
    pub async fn commit(
        &self,
        mut pending: PendingObject,
        header: &ObjectHeader,
    ) -> Result<CreateOutcome> {
        pending.file.seek(std::io::SeekFrom::Start(0)).await?;
        pending.file.write_all(&header.encode()).await?;
        self.commit_raw(pending).await
    }

    /// Makes a pending object durable under its key, create-only, as written.
    pub async fn commit_raw(&self, mut pending: PendingObject) -> Result<CreateOutcome> {
        pending.file.flush().await?;
        match self {
            Store::Local { root } => {
                pending
                    .file
                    .sync_all()
                    .await
                    .context("fsync of object failed")?;
                let target = Self::local_path(root, &pending.key);
                let tmp = pending.tmp.clone();
                let created =
                    tokio::task::spawn_blocking(move || fsutil::durable_link_new(&tmp, &target))
                        .await?
                        .with_context(|| format!("cannot store {}", pending.key))?;
                Ok(if created {
                    CreateOutcome::Created
                } else {
                    CreateOutcome::Exists
                })
            }
            Store::Remote { store, .. } => {
                let size = pending.reserved + pending.written;
                if size <= SINGLE_PUT_MAX {
                    let bytes = tokio::fs::read(&pending.tmp).await?;
                    return self.put_new(&pending.key, bytes.into()).await;
                }
                let name = pending
                    .tmp
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let upload_key = format!(
                    "{UPLOADS_PREFIX}{}-{}",
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_nanos())
                        .unwrap_or(0),
                    name.trim_start_matches('.')
                );
                stream_create(store.as_ref(), &mut pending.file, &upload_key, &pending.key).await
            }
        }
    }

    /// Stores a small object (header + `body`, the zstd frame) create-only: for the many
    /// chunks of a backup. On a local store the file is written in one blocking call and
    /// its fsyncs are shared with every concurrent writer through `group` (see
    /// syncgroup.rs), with the same guarantee as [`commit`](Self::commit): on return the
    /// object, data and name, is durable.
    pub async fn put_grouped(
        &self,
        key: &str,
        header: &ObjectHeader,
        body: Bytes,
        group: &crate::syncgroup::SyncGroup,
    ) -> Result<CreateOutcome> {
        let header = header.encode();
        let root = match self {
            Store::Local { root } => root,
            Store::Remote { .. } => {
                let mut object = Vec::with_capacity(HEADER_LEN + body.len());
                object.extend_from_slice(&header);
                object.extend_from_slice(&body);
                return self.put_new(key, object.into()).await;
            }
        };
        let target = Self::local_path(root, key);
        let tmp = fsutil::temp_path_beside(&target);
        let (t, target_dir) = (tmp.clone(), target.clone());
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            if let Some(dir) = target_dir.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let write = (|| {
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&t)?;
                std::io::Write::write_all(&mut f, &header)?;
                std::io::Write::write_all(&mut f, &body)
            })();
            if write.is_err() {
                let _ = std::fs::remove_file(&t);
            }
            write
        })
        .await?
        .with_context(|| format!("cannot write {key}"))?;
        if let Err(e) = group.sync().await {
            let _ = std::fs::remove_file(&tmp);
            return Err(anyhow!(e).context("syncing the store failed"));
        }
        let created = tokio::task::spawn_blocking(move || {
            let linked = std::fs::hard_link(&tmp, &target);
            let _ = std::fs::remove_file(&tmp);
            match linked {
                Ok(()) => Ok(true),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
                Err(e) => Err(e),
            }
        })
        .await?
        .with_context(|| format!("cannot store {key}"))?;
        if !created {
            return Ok(CreateOutcome::Exists);
        }
        group.sync().await.context("syncing the store failed")?;
        Ok(CreateOutcome::Created)
    }

    /// Writes a small object create-only.
    pub async fn put_new(&self, key: &str, bytes: Bytes) -> Result<CreateOutcome> {
        match self {
            Store::Local { root } => {
                let target = Self::local_path(root, key);
                let result = tokio::task::spawn_blocking(move || -> std::io::Result<bool> {
                    if let Some(dir) = target.parent() {
                        std::fs::create_dir_all(dir)?;
                    }
                    let tmp = fsutil::temp_path_beside(&target);
                    let write = (|| {
                        std::fs::write(&tmp, &bytes)?;
                        std::fs::File::open(&tmp)?.sync_all()
                    })();
                    if let Err(e) = write {
                        let _ = std::fs::remove_file(&tmp);
                        return Err(e);
                    }
                    fsutil::durable_link_new(&tmp, &target)
                })
                .await?
                .with_context(|| format!("cannot store {key}"))?;
                Ok(if result {
                    CreateOutcome::Created
                } else {
                    CreateOutcome::Exists
                })
            }
            Store::Remote { store, .. } => {
                let opts = PutOptions {
                    mode: PutMode::Create,
                    ..Default::default()
                };
                match store
                    .put_opts(&ObjPath::from(key), PutPayload::from(bytes), opts)
                    .await
                {
                    Ok(_) => Ok(CreateOutcome::Created),
                    Err(object_store::Error::AlreadyExists { .. }) => Ok(CreateOutcome::Exists),
                    Err(e) => Err(anyhow!(e).context(format!("cannot store {key}"))),
                }
            }
        }
    }

    /// Reads a whole small object; `None` if absent.
    pub async fn get_small(&self, key: &str) -> Result<Option<Bytes>> {
        match self {
            Store::Local { root } => match tokio::fs::read(Self::local_path(root, key)).await {
                Ok(b) => Ok(Some(b.into())),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(anyhow!(e).context(format!("cannot read {key}"))),
            },
            Store::Remote { store, .. } => match store.get(&ObjPath::from(key)).await {
                Ok(r) => Ok(Some(r.bytes().await?)),
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(anyhow!(e).context(format!("cannot read {key}"))),
            },
        }
    }

    /// Several small objects or ranges of objects (backup chunks, loose or in packs), in
    /// order, as a stream; or the index of the first whose object is absent, found before
    /// anything is streamed. Local store: one blocking task opens every file first (once
    /// for a run of ranges of one pack), then reads one after the other: a thread hand-off
    /// per chunk costs more than reading a 10 KiB chunk. Memory: a few chunks in flight. A
    /// failure after the stream started (a short read) comes as its error item.
    pub async fn get_many(&self, locs: Vec<Loc>) -> Result<Many> {
        match self {
            Store::Local { root } => {
                let paths: Vec<PathBuf> = locs
                    .iter()
                    .map(|l| Self::local_path(root, &l.key))
                    .collect();
                let (opened_tx, opened_rx) =
                    tokio::sync::oneshot::channel::<Result<Option<usize>>>();
                let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes>>(4);
                tokio::task::spawn_blocking(move || {
                    let mut files: Vec<Arc<std::fs::File>> = Vec::with_capacity(paths.len());
                    for (i, p) in paths.iter().enumerate() {
                        if i > 0 && paths[i - 1] == *p {
                            files.push(files[i - 1].clone());
                            continue;
                        }
                        match std::fs::File::open(p) {
                            Ok(f) => files.push(Arc::new(f)),
                            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                                let _ = opened_tx.send(Ok(Some(i)));
                                return;
                            }
                            Err(e) => {
                                let _ =
                                    opened_tx
                                        .send(Err(anyhow!(e)
                                            .context(format!("cannot open {}", p.display()))));
                                return;
                            }
                        }
                    }
                    if opened_tx.send(Ok(None)).is_err() {
                        return;
                    }
                    for ((f, p), loc) in files.iter().zip(&paths).zip(&locs) {
                        let item = read_part(f, loc.range.as_ref())
                            .with_context(|| format!("cannot read {}", p.display()));
                        let failed = item.is_err();
                        if tx.blocking_send(item).is_err() || failed {
                            return;
                        }
                    }
                });
                match opened_rx.await {
                    Ok(Ok(Some(i))) => Ok(Many::Missing(i)),
                    Ok(Ok(None)) => Ok(Many::Objects(
                        futures::stream::unfold(rx, |mut rx| async move {
                            rx.recv().await.map(|item| (item, rx))
                        })
                        .boxed(),
                    )),
                    Ok(Err(e)) => Err(e),
                    Err(_) => bail!("the reader of the store stopped"),
                }
            }
            Store::Remote { .. } => {
                let mut objects = Vec::with_capacity(locs.len());
                for group in locs.chunks(8) {
                    let mut gets = Vec::with_capacity(group.len());
                    for l in group {
                        gets.push(self.get_part(l));
                    }
                    for got in futures::future::join_all(gets).await {
                        match got? {
                            Some(b) => objects.push(Ok(b)),
                            None => return Ok(Many::Missing(objects.len())),
                        }
                    }
                }
                Ok(Many::Objects(futures::stream::iter(objects).boxed()))
            }
        }
    }

    /// A whole object or a range of it; `None` if the object is absent.
    pub async fn get_part(&self, loc: &Loc) -> Result<Option<Bytes>> {
        let Some(range) = &loc.range else {
            return self.get_small(&loc.key).await;
        };
        match self {
            Store::Local { root } => {
                let path = Self::local_path(root, &loc.key);
                let range = range.clone();
                tokio::task::spawn_blocking(move || {
                    let f = match std::fs::File::open(&path) {
                        Ok(f) => f,
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                        Err(e) => {
                            return Err(
                                anyhow!(e).context(format!("cannot open {}", path.display()))
                            )
                        }
                    };
                    read_part(&f, Some(&range))
                        .map(Some)
                        .with_context(|| format!("cannot read {}", path.display()))
                })
                .await?
            }
            Store::Remote { store, .. } => {
                match store
                    .get_range(&ObjPath::from(loc.key.as_str()), range.clone())
                    .await
                {
                    Ok(b) => Ok(Some(b)),
                    Err(object_store::Error::NotFound { .. }) => Ok(None),
                    Err(e) => Err(anyhow!(e).context(format!("cannot read {}", loc.key))),
                }
            }
        }
    }

    /// An object's length in bytes; `None` if absent.
    pub async fn len(&self, key: &str) -> Result<Option<u64>> {
        match self {
            Store::Local { root } => match tokio::fs::metadata(Self::local_path(root, key)).await {
                Ok(m) => Ok(Some(m.len())),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(anyhow!(e).context(format!("cannot stat {key}"))),
            },
            Store::Remote { store, .. } => match store.head(&ObjPath::from(key)).await {
                Ok(m) => Ok(Some(m.size)),
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(anyhow!(e).context(format!("cannot stat {key}"))),
            },
        }
    }

    /// Reads an object's header; `None` if absent.
    pub async fn read_header(&self, key: &str) -> Result<Option<ObjectHeader>> {
        let bytes = match self {
            Store::Local { root } => {
                let mut f = match tokio::fs::File::open(Self::local_path(root, key)).await {
                    Ok(f) => f,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                    Err(e) => return Err(anyhow!(e).context(format!("cannot open {key}"))),
                };
                let mut b = vec![0u8; HEADER_LEN];
                f.read_exact(&mut b)
                    .await
                    .with_context(|| format!("{key}: object shorter than its header"))?;
                b
            }
            Store::Remote { store, .. } => match store
                .get_range(&ObjPath::from(key), 0..HEADER_LEN as u64)
                .await
            {
                Ok(b) => b.to_vec(),
                Err(object_store::Error::NotFound { .. }) => return Ok(None),
                Err(e) => return Err(anyhow!(e).context(format!("cannot read {key}"))),
            },
        };
        ObjectHeader::decode(&bytes)
            .map(Some)
            .with_context(|| format!("{key}: damaged object header"))
    }

    /// The object's body (the zstd frame) as a stream of chunks.
    pub async fn body_stream(
        &self,
        key: &str,
        header: &ObjectHeader,
    ) -> Result<BoxStream<'static, Result<Bytes>>> {
        let end = HEADER_LEN as u64 + header.compressed_size;
        match self {
            Store::Local { root } => {
                let mut f = tokio::fs::File::open(Self::local_path(root, key)).await?;
                f.seek(std::io::SeekFrom::Start(HEADER_LEN as u64)).await?;
                let key = key.to_string();
                let state = (f, header.compressed_size, key);
                Ok(
                    futures::stream::try_unfold(state, |(mut f, left, key)| async move {
                        if left == 0 {
                            return Ok(None);
                        }
                        let mut buf = vec![
                            0u8;
                            (walvault_protocol::core::format::codec::CHUNK_SIZE as u64).min(left)
                                as usize
                        ];
                        let n = f.read(&mut buf).await?;
                        if n == 0 {
                            bail!("{key}: object is shorter than its header says");
                        }
                        buf.truncate(n);
                        Ok(Some((Bytes::from(buf), (f, left - n as u64, key))))
                    })
                    .boxed(),
                )
            }
            Store::Remote { store, .. } => {
                let opts = object_store::GetOptions {
                    range: Some((HEADER_LEN as u64..end).into()),
                    ..Default::default()
                };
                let stream = store
                    .get_opts(&ObjPath::from(key), opts)
                    .await?
                    .into_stream();
                Ok(stream.map(|r| r.map_err(anyhow::Error::from)).boxed())
            }
        }
    }

    /// Removes `.tmp.*` files left by uploads that never completed (a crash mid-write),
    /// and on a remote store the temporary keys of streamed uploads older than an hour.
    pub async fn remove_stale_temp_files(&self) -> Result<u64> {
        let dir = match self {
            Store::Local { root } => root.clone(),
            Store::Remote { spool, .. } => spool.clone(),
        };
        let mut removed = tokio::task::spawn_blocking(move || {
            let mut removed = 0;
            remove_temp(&dir, &mut removed)?;
            Ok::<_, anyhow::Error>(removed)
        })
        .await??;
        if let Store::Remote { store, .. } = self {
            let now = unix_now();
            let mut stale = Vec::new();
            let mut listing = store.list(Some(&ObjPath::from(UPLOADS_PREFIX)));
            while let Some(meta) = listing.next().await {
                let meta = meta.context("listing temporary uploads")?;
                if now - meta.last_modified.timestamp() > STALE_UPLOAD_SECS {
                    stale.push(meta.location);
                }
            }
            for key in stale {
                match store.delete(&key).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => removed += 1,
                    Err(e) => return Err(anyhow!(e).context(format!("cannot delete {key}"))),
                }
            }
        }
        Ok(removed)
    }

    /// Deletes an object (retention and `backups delete`); absent is not an error.
    /// Local: the file is unlinked and its directory fsynced.
    pub async fn delete(&self, key: &str) -> Result<()> {
        match self {
            Store::Local { root } => {
                let path = Self::local_path(root, key);
                tokio::task::spawn_blocking(move || match std::fs::remove_file(&path) {
                    Ok(()) => fsutil::fsync_dir(path.parent().unwrap_or(Path::new("."))),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                    Err(e) => Err(e),
                })
                .await?
                .with_context(|| format!("cannot delete {key}"))
            }
            Store::Remote { store, .. } => match store.delete(&ObjPath::from(key)).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                Err(e) => Err(anyhow!(e).context(format!("cannot delete {key}"))),
            },
        }
    }

    /// When an object was written (unix seconds); `None` if absent.
    pub async fn modified(&self, key: &str) -> Result<Option<i64>> {
        match self {
            Store::Local { root } => match tokio::fs::metadata(Self::local_path(root, key)).await {
                Ok(m) => Ok(Some(
                    m.modified()?
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_secs() as i64)
                        .unwrap_or(0),
                )),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(anyhow!(e).context(format!("cannot stat {key}"))),
            },
            Store::Remote { store, .. } => match store.head(&ObjPath::from(key)).await {
                Ok(meta) => Ok(Some(meta.last_modified.timestamp())),
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(anyhow!(e).context(format!("cannot stat {key}"))),
            },
        }
    }

    /// Lists every key in the store with a prefix (`""` for all).
    pub async fn list(&self, prefix: &str) -> Result<Vec<String>> {
        match self {
            Store::Local { root } => {
                let root = root.clone();
                let prefix = prefix.to_string();
                tokio::task::spawn_blocking(move || {
                    let mut out = Vec::new();
                    list_local(&root, &root, &mut out)?;
                    out.retain(|k| k.starts_with(&prefix));
                    out.sort();
                    Ok(out)
                })
                .await?
            }
            Store::Remote { store, .. } => {
                let p = if prefix.is_empty() {
                    None
                } else {
                    Some(ObjPath::from(prefix))
                };
                let mut stream = store.list(p.as_ref());
                let mut out = Vec::new();
                while let Some(meta) = stream.next().await {
                    out.push(meta?.location.to_string());
                }
                out.sort();
                Ok(out)
            }
        }
    }
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// The object_store backend for a remote URL: the scheme's builder from the environment,
/// then `options` (refusing keys the backend does not know), and the path inside it.
fn remote_backend(
    url: &url::Url,
    options: &[(String, String)],
) -> Result<(Box<dyn ObjectStore>, ObjPath)> {
    let (scheme, path) = ObjectStoreScheme::parse(url)?;
    let unknown = |key: &str, scheme: &str| {
        anyhow!(
            "[storage_options] has '{key}', which the {scheme} backend does not know \
             (see README, \"Configuration\", for the keys)"
        )
    };
    let store: Box<dyn ObjectStore> = match scheme {
        ObjectStoreScheme::AmazonS3 => {
            let mut builder = AmazonS3Builder::from_env().with_url(url.as_str());
            for (key, value) in options {
                let k: AmazonS3ConfigKey = key.parse().map_err(|_| unknown(key, "S3"))?;
                builder = builder.with_config(k, value);
            }
            if builder
                .get_config_value(&AmazonS3ConfigKey::CopyIfNotExists)
                .is_none()
            {
                builder = builder.with_copy_if_not_exists(S3CopyIfNotExists::Multipart);
            }
            Box::new(builder.build()?)
        }
        ObjectStoreScheme::GoogleCloudStorage => {
            let mut builder = GoogleCloudStorageBuilder::from_env().with_url(url.as_str());
            for (key, value) in options {
                let k: GoogleConfigKey = key.parse().map_err(|_| unknown(key, "GCS"))?;
                builder = builder.with_config(k, value);
            }
            Box::new(builder.build()?)
        }
        ObjectStoreScheme::MicrosoftAzure => {
            let mut builder = MicrosoftAzureBuilder::from_env().with_url(url.as_str());
            for (key, value) in options {
                let k: AzureConfigKey = key.parse().map_err(|_| unknown(key, "Azure"))?;
                builder = builder.with_config(k, value);
            }
            Box::new(builder.build()?)
        }
        _ => {
            bail!("only s3://, gs:// and az:// object stores (or a local directory) are supported")
        }
    };
    Ok((store, path))
}

/// Streams `file` (a finished spool file, header included) to `key` create-only: a
/// multipart upload to `upload_key`, then `copy_if_not_exists`, then the temporary key is
/// deleted. Memory: at most (PARTS_IN_FLIGHT + 1) x PART_SIZE.
async fn stream_create(
    store: &dyn ObjectStore,
    file: &mut tokio::fs::File,
    upload_key: &str,
    key: &str,
) -> Result<CreateOutcome> {
    let upload_path = ObjPath::from(upload_key);
    let upload = store
        .put_multipart(&upload_path)
        .await
        .with_context(|| format!("cannot start a multipart upload for {key}"))?;
    let mut writer = WriteMultipart::new_with_chunk_size(upload, PART_SIZE);
    file.seek(std::io::SeekFrom::Start(0)).await?;
    let mut buf = vec![0u8; 1 << 20];
    let sent: Result<()> = async {
        loop {
            let n = file
                .read(&mut buf)
                .await
                .context("reading the spool file")?;
            if n == 0 {
                return Ok(());
            }
            writer
                .wait_for_capacity(PARTS_IN_FLIGHT)
                .await
                .with_context(|| format!("uploading a part of {key}"))?;
            writer.write(&buf[..n]);
        }
    }
    .await;
    if let Err(e) = sent {
        let _ = writer.abort().await;
        return Err(e);
    }
    writer
        .finish()
        .await
        .with_context(|| format!("cannot complete the multipart upload of {key}"))?;
    let copied = store
        .copy_if_not_exists(&upload_path, &ObjPath::from(key))
        .await;
    // The temporary object is never read again, whatever the copy did.
    if let Err(e) = store.delete(&upload_path).await {
        tracing::warn!(key = %upload_key, error = %e, "cannot delete a temporary upload; it is removed at the next start");
    }
    match copied {
        Ok(()) => Ok(CreateOutcome::Created),
        Err(object_store::Error::AlreadyExists { .. }) => Ok(CreateOutcome::Exists),
        Err(e) => Err(anyhow!(e).context(format!("cannot store {key}"))),
    }
}

fn remove_temp(dir: &Path, removed: &mut u64) -> Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(anyhow!(e).context(format!("cannot list {}", dir.display()))),
    };
    for entry in entries {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            remove_temp(&entry.path(), removed)?;
        } else if entry.file_name().to_string_lossy().starts_with(".tmp.") {
            std::fs::remove_file(entry.path())?;
            *removed += 1;
        }
    }
    Ok(())
}

fn list_local(root: &Path, dir: &Path, out: &mut Vec<String>) -> Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(anyhow!(e).context(format!("cannot list {}", dir.display()))),
    };
    for entry in entries {
        let entry = entry?;
        let path = entry.path();
        if entry.file_name().to_string_lossy().starts_with(".tmp.") {
            continue;
        }
        if entry.file_type()?.is_dir() {
            list_local(root, &path, out)?;
        } else if let Ok(rel) = path.strip_prefix(root) {
            out.push(rel.to_string_lossy().into_owned());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn keys_round_trip() {
        for n in [
            "000000010000000A000000FE",
            "000000010000000A000000FE.partial",
            "00000002.history",
            "000000010000000000000002.00000028.backup",
        ] {
            let name: WalFileName = n.parse().unwrap();
            let key = wal_key("main", &name);
            assert_eq!(parse_wal_key(&key), Some(("main".to_string(), name)));
        }
        assert_eq!(parse_wal_key("main/cluster.toml"), None);
        assert_eq!(
            parse_wal_key("main/wal/00000002/000000010000000000000001.zst"),
            None
        );
    }

    #[test]
    fn object_store_urls_are_accepted_and_bad_ones_explained() {
        walvault_protocol::net::transport::install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        let opts = vec![
            ("aws_region".to_string(), "us-east-1".to_string()),
            ("aws_endpoint".to_string(), "http://127.0.0.1:9".to_string()),
            ("aws_access_key_id".to_string(), "test".to_string()),
            ("aws_secret_access_key".to_string(), "test".to_string()),
            ("aws_allow_http".to_string(), "true".to_string()),
        ];
        let store = Store::open(
            "s3://walvault-test/prefix",
            &opts,
            &dir.path().join("store"),
            &dir.path().join("spool"),
        )
        .unwrap();
        assert!(matches!(store, Store::Remote { .. }));
        assert_eq!(store.describe(), "s3://walvault-test/prefix");
        let err = Store::open(
            "ftp://nowhere/x",
            &[],
            &dir.path().join("store"),
            &dir.path().join("spool"),
        )
        .err()
        .expect("ftp:// accepted");
        assert!(format!("{err:#}").contains("ftp://nowhere/x"), "{err:#}");
        let mut misspelt = opts.clone();
        misspelt.push(("aws_endpiont".to_string(), "http://x".to_string()));
        let err = Store::open(
            "s3://walvault-test/prefix",
            &misspelt,
            &dir.path().join("store"),
            &dir.path().join("spool"),
        )
        .err()
        .expect("a misspelt storage option was silently ignored");
        assert!(format!("{err:#}").contains("aws_endpiont"), "{err:#}");
    }

    /// An object above SINGLE_PUT_MAX goes through the streamed path: created once, a
    /// second (different) one under the name is `Exists` and changes nothing, and no
    /// temporary upload key is left behind.
    #[tokio::test]
    async fn large_remote_objects_stream_create_only() {
        let dir = tempfile::tempdir().unwrap();
        let memory: Arc<dyn ObjectStore> = Arc::new(object_store::memory::InMemory::new());
        let store = Store::Remote {
            store: Arc::new(object_store::prefix::PrefixStore::new(
                memory.clone(),
                "pre",
            )),
            url: "memory:///pre".into(),
            spool: dir.path().to_path_buf(),
        };
        let size = SINGLE_PUT_MAX as usize + 3 * PART_SIZE + 12345;
        let body: Vec<u8> = (0..size).map(|i| (i * 7 % 251) as u8).collect();
        let h = ObjectHeader {
            raw_size: 99,
            blake3: [3; 32],
            compressed_size: size as u64,
        };
        let key = "c/wal/00000001/big.zst";
        let mut p = store.begin(key).await.unwrap();
        for part in body.chunks(1 << 20) {
            p.write(part).await.unwrap();
        }
        assert_eq!(store.commit(p, &h).await.unwrap(), CreateOutcome::Created);
        let mut p = store.begin(key).await.unwrap();
        p.write(&body[..SINGLE_PUT_MAX as usize + 1]).await.unwrap();
        let other = ObjectHeader {
            blake3: [4; 32],
            compressed_size: SINGLE_PUT_MAX + 1,
            ..h.clone()
        };
        assert_eq!(
            store.commit(p, &other).await.unwrap(),
            CreateOutcome::Exists
        );
        assert_eq!(store.read_header(key).await.unwrap(), Some(h.clone()));
        let got: Vec<Bytes> = store
            .body_stream(key, &h)
            .await
            .unwrap()
            .map(|c| c.unwrap())
            .collect()
            .await;
        assert!(got.concat() == body, "the streamed object differs");
        let all: Vec<String> = memory
            .list(None)
            .map(|m| m.unwrap().location.to_string())
            .collect()
            .await;
        assert_eq!(
            all,
            vec![format!("pre/{key}")],
            "temporary uploads left behind"
        );
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn local_store_is_create_only() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(
            "",
            &[],
            &dir.path().join("store"),
            &dir.path().join("spool"),
        )
        .unwrap();
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
