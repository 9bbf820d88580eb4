//! The local backend: a directory on local disk, with our own fsyncing write path
//! (object_store's LocalFileSystem does not fsync).
//!
//! A key is a path below the root. An object is written to a `.tmp.*` file beside its
//! final name, fsynced, hard-linked to the final name (which fails if the name exists:
//! create-only), and the directory is fsynced; [`LocalStore::put_grouped`] replaces the
//! two fsyncs with shared syncfs calls (syncgroup.rs). A directory an object needs is
//! created with `fsutil::create_dir_durable`: each new component fsynced into its parent
//! before the object in it is acknowledged. `.tmp.*` files are never objects:
//! listings skip them and startup removes them.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use futures::stream::BoxStream;
use futures::StreamExt;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use walvault_protocol::net::fsutil;

use super::object::{CreateOutcome, Loc, Many, ObjectHeader, PendingObject, HEADER_LEN};
use super::syncgroup::SyncGroup;

/// Objects a `get_many` holds at most: those waiting in its channel, the one its reader
/// is reading and the one the answer is sending.
pub(super) const GET_MANY_AHEAD: usize = 6;
/// What a body stream holds while its answer is sent: the piece being read and the one
/// being sent.
pub(super) const BODY_STREAM_MEMORY: u64 =
    2 * walvault_protocol::core::format::codec::CHUNK_SIZE as u64;

/// A store in a local directory.
#[derive(Clone)]
pub(crate) struct LocalStore {
    root: PathBuf,
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

impl LocalStore {
    /// The store in `root`, created if missing.
    pub(super) fn open(root: PathBuf) -> Result<LocalStore> {
        fsutil::create_dir_durable(&root)
            .with_context(|| format!("cannot create store directory {}", root.display()))?;
        Ok(LocalStore { root })
    }

    /// The store's directory.
    pub(crate) fn root(&self) -> &Path {
        &self.root
    }

    fn path(&self, key: &str) -> PathBuf {
        self.root.join(key)
    }

    /// A temporary path beside the object's final name, its directory created (durable
    /// in its parent, fsutil.rs).
    pub(super) async fn temp_path(&self, key: &str) -> Result<PathBuf> {
        let target = self.path(key);
        let dir = target
            .parent()
            .ok_or_else(|| anyhow!("bad key {key}"))?
            .to_path_buf();
        tokio::task::spawn_blocking(move || fsutil::create_dir_durable(&dir)).await??;
        Ok(fsutil::temp_path_beside(&target))
    }

    pub(super) async fn commit(&self, pending: &mut PendingObject) -> Result<CreateOutcome> {
        pending
            .file
            .sync_all()
            .await
            .context("fsync of object failed")?;
        let target = self.path(&pending.key);
        let tmp = pending.tmp.clone();
        let created = tokio::task::spawn_blocking(move || fsutil::durable_link_new(&tmp, &target))
            .await?
            .with_context(|| format!("cannot store {}", pending.key))?;
        Ok(if created {
            CreateOutcome::Created
        } else {
            CreateOutcome::Exists
        })
    }

    pub(super) async fn put_grouped(
        &self,
        key: &str,
        header: &ObjectHeader,
        body: Bytes,
        group: &SyncGroup,
    ) -> Result<CreateOutcome> {
        let header = header.encode();
        let target = self.path(key);
        let tmp = fsutil::temp_path_beside(&target);
        let (t, target_dir) = (tmp.clone(), target.clone());
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            if let Some(dir) = target_dir.parent() {
                fsutil::create_dir_durable(dir)?;
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

    pub(super) async fn put_new(&self, key: &str, bytes: Bytes) -> Result<CreateOutcome> {
        let target = self.path(key);
        let result = tokio::task::spawn_blocking(move || -> std::io::Result<bool> {
            if let Some(dir) = target.parent() {
                fsutil::create_dir_durable(dir)?;
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

    pub(super) async fn get_small(&self, key: &str) -> Result<Option<Bytes>> {
        match tokio::fs::read(self.path(key)).await {
            Ok(b) => Ok(Some(b.into())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(anyhow!(e).context(format!("cannot read {key}"))),
        }
    }

    /// One blocking task opens every file first (once for a run of ranges of one pack),
    /// then reads one after the other: a thread hand-off per chunk costs more than
    /// reading a 10 KiB chunk.
    pub(super) async fn get_many(&self, locs: Vec<Loc>) -> Result<Many> {
        let paths: Vec<PathBuf> = locs.iter().map(|l| self.path(&l.key)).collect();
        let (opened_tx, opened_rx) = tokio::sync::oneshot::channel::<Result<Option<usize>>>();
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes>>(GET_MANY_AHEAD - 2);
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
                        let _ = opened_tx.send(Err(
                            anyhow!(e).context(format!("cannot open {}", p.display()))
                        ));
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

    pub(super) async fn get_range(
        &self,
        key: &str,
        range: std::ops::Range<u64>,
    ) -> Result<Option<Bytes>> {
        let path = self.path(key);
        tokio::task::spawn_blocking(move || {
            let f = match std::fs::File::open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(anyhow!(e).context(format!("cannot open {}", path.display()))),
            };
            read_part(&f, Some(&range))
                .map(Some)
                .with_context(|| format!("cannot read {}", path.display()))
        })
        .await?
    }

    pub(super) async fn len(&self, key: &str) -> Result<Option<u64>> {
        match tokio::fs::metadata(self.path(key)).await {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(anyhow!(e).context(format!("cannot stat {key}"))),
        }
    }

    /// The first [`HEADER_LEN`] bytes of an object; `None` if absent.
    pub(super) async fn read_head(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let mut f = match tokio::fs::File::open(self.path(key)).await {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(anyhow!(e).context(format!("cannot open {key}"))),
        };
        let mut b = vec![0u8; HEADER_LEN];
        f.read_exact(&mut b)
            .await
            .with_context(|| format!("{key}: object shorter than its header"))?;
        Ok(Some(b))
    }

    pub(super) async fn body_stream(
        &self,
        key: &str,
        header: &ObjectHeader,
    ) -> Result<BoxStream<'static, Result<Bytes>>> {
        let mut f = tokio::fs::File::open(self.path(key)).await?;
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

    pub(super) async fn delete(&self, key: &str) -> Result<()> {
        let path = self.path(key);
        tokio::task::spawn_blocking(move || match std::fs::remove_file(&path) {
            Ok(()) => fsutil::fsync_dir(path.parent().unwrap_or(Path::new("."))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        })
        .await?
        .with_context(|| format!("cannot delete {key}"))
    }

    pub(super) async fn modified(&self, key: &str) -> Result<Option<i64>> {
        match tokio::fs::metadata(self.path(key)).await {
            Ok(m) => Ok(Some(
                m.modified()?
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs() as i64)
                    .unwrap_or(0),
            )),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(anyhow!(e).context(format!("cannot stat {key}"))),
        }
    }

    pub(super) async fn list(&self, prefix: &str) -> Result<Vec<String>> {
        let root = self.root.clone();
        let prefix = prefix.to_string();
        tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            // Only the directory the prefix names (up to its last '/') can hold its keys:
            // the walk starts there, not at the root of a store of millions of objects.
            let start = match prefix.rsplit_once('/') {
                Some((dir, _)) if !dir.is_empty() => root.join(dir),
                _ => root.clone(),
            };
            list_local(&root, &start, &mut out)?;
            out.retain(|k| k.starts_with(&prefix));
            out.sort();
            Ok(out)
        })
        .await?
    }
}

/// Removes every `.tmp.*` file below `dir`, counting them.
pub(super) fn remove_temp(dir: &Path, removed: &mut u64) -> Result<()> {
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
        // A prefix whose directory part names a file: it holds no keys below it.
        Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => return Ok(()),
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
