//! The streaming receiver's side in archived: `StreamAppend`, `StreamSeal`, the
//! unfinished segments they build, and what becomes of them.
//!
//! Contract:
//!
//! - **Flush means durable.** [`append`] answers `StreamFlushed` only after the bytes are
//!   written into the segment's local file and fdatasynced. The file lives on this
//!   archived's disk (`<data_dir>/stream/<cluster>/<TLI>/<SEGMENT>.partial`, created full
//!   size and zero-filled, fsynced with its directories before its first append, as
//!   PostgreSQL prepares a segment), so an append costs one fdatasync and no metadata
//!   update; that disk is the receiver's durability domain, as a standby's own disk is.
//! - **Idempotent.** Bytes below what the file holds must agree with it (a reconnected
//!   receiver streams the segment again from its start): a byte the file holds that is
//!   not zero and differs is a `Conflict`, and nothing is written. Zero bytes are taken as
//!   not yet written, so an append torn by a crash is completed by the resend. An append
//!   past what the file holds is refused (`Invalid`): the receiver starts every segment at
//!   offset 0. Appends of one segment are serialized.
//! - **Checked like a push.** The server's system identifier and segment size must be the
//!   cluster's binding (`WrongCluster`, both values in the message); the first append of a
//!   cluster's first segment binds it from the segment's long page header, as a push
//!   does. Every page header that starts inside the body must be a WAL page of this
//!   position (known magic, `xlp_pageaddr` = its LSN), and at offset 0 the long header's
//!   system identifier and segment size must be the binding's.
//! - **Receiving never waits.** The answer waits for nothing but the fdatasync. A worker
//!   ([`run`]) stores each unfinished segment that grew in the object store at least every
//!   `[stream] upload_interval_secs` (`<cluster>/stream/...`, store/layout.rs: one
//!   create-only object per upload, older ones deleted after), and turns each complete
//!   segment into a normal archived segment through [`super::wal::ingest`] (validation,
//!   binding, create-only, catalog; identical bytes from `archive_command` are fine);
//!   only then are its local file and uploads removed. At start-up the files left
//!   behind are found again, so a crash of archived loses nothing it acknowledged.
//! - **Restores use it.** `GetWal` of a segment the archive does not hold complete
//!   answers the unfinished one ([`partial_object`]): this archived's local file, else
//!   the newest upload in the store, zero-padded to the segment size and marked with
//!   `partial_bytes`, so archive recovery replays up to the last flushed byte.

use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use walvault_protocol::core::format::codec::Encoder;
use walvault_protocol::core::pg::wal::{
    pg_major_for_magic, LongPageHeader, SegmentName, WalFileName, LONG_PAGE_HEADER_LEN,
};
use walvault_protocol::core::wire::{ErrorCode, Response, StreamedSegment, MAX_STREAM_APPEND};
use walvault_protocol::net::fsutil;
use walvault_protocol::net::pki::{ClientIdentity, Role};

use super::wal::WalUpload;
use super::{Archive, Ctx, Refusal, Reply, StreamReply, Streamed};
use crate::store::{layout, ObjectHeader};

/// WAL page size (PostgreSQL's XLOG_BLCKSZ; the long header's `xlp_xlog_blcksz` at
/// offset 0 must say the same).
const WAL_PAGE: u64 = 8192;
/// zstd level of uploads and of answers made from a local file (mostly zeros, and on the
/// way of a restore: fast beats small).
const LEVEL: i32 = 1;

/// One unfinished segment on this archived's disk.
struct Partial {
    path: PathBuf,
    file: std::fs::File,
    segment_size: u32,
    /// Bytes held from the start, fdatasynced.
    held: u64,
    /// Bytes the newest upload in the store holds.
    uploaded: u64,
    /// Ingested as a complete segment (the file is gone).
    done: bool,
}

type Slot = Arc<tokio::sync::Mutex<Option<Partial>>>;

/// The unfinished segments of every cluster, by (cluster, segment).
pub(crate) struct Streams {
    dir: PathBuf,
    upload_interval: Duration,
    slots: std::sync::Mutex<HashMap<(String, SegmentName), Slot>>,
    wake: tokio::sync::Notify,
}

impl Streams {
    /// The unfinished segments under `dir`, uploaded every `upload_interval`.
    pub(crate) fn new(dir: PathBuf, upload_interval: Duration) -> Streams {
        Streams {
            dir,
            upload_interval,
            slots: std::sync::Mutex::new(HashMap::new()),
            wake: tokio::sync::Notify::new(),
        }
    }

    fn slot(&self, cluster: &str, segment: &SegmentName) -> Slot {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots
            .entry((cluster.to_string(), *segment))
            .or_default()
            .clone()
    }

    fn existing(&self, cluster: &str, segment: &SegmentName) -> Option<Slot> {
        let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots.get(&(cluster.to_string(), *segment)).cloned()
    }

    fn all(&self) -> Vec<((String, SegmentName), Slot)> {
        let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    fn forget(&self, cluster: &str, segment: &SegmentName) {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots.remove(&(cluster.to_string(), *segment));
    }

    fn path(&self, cluster: &str, segment: &SegmentName) -> PathBuf {
        self.dir
            .join(cluster)
            .join(segment.timeline.to_string())
            .join(format!("{segment}.partial"))
    }

    /// The streaming receiver's segments of `cluster` before `horizon` (on its timeline or
    /// an earlier one): each with its uploads' keys and their stored bytes.
    pub(crate) async fn before(
        &self,
        store: &crate::store::Store,
        cluster: &str,
        horizon: &SegmentName,
        segment_size: u32,
    ) -> Result<Vec<(SegmentName, Vec<String>, u64)>> {
        let old = |s: &SegmentName| {
            s.timeline <= horizon.timeline && s.segno(segment_size) < horizon.segno(segment_size)
        };
        let mut found: std::collections::BTreeMap<SegmentName, (Vec<String>, u64)> =
            Default::default();
        for key in store.list(&layout::stream_prefix(cluster)).await? {
            if let Some((_, segment, _)) = layout::parse_stream_key(&key) {
                if old(&segment) {
                    let stored = store.len(&key).await?.unwrap_or(0);
                    let e = found.entry(segment).or_default();
                    e.0.push(key);
                    e.1 += stored;
                }
            }
        }
        for ((c, segment), _) in self.all() {
            if c == cluster && old(&segment) {
                found.entry(segment).or_default();
            }
        }
        Ok(found.into_iter().map(|(s, (k, b))| (s, k, b)).collect())
    }

    /// Forgets an expired segment: its uploads `keys`, its local file, its slot.
    pub(crate) async fn expire(
        &self,
        store: &crate::store::Store,
        cluster: &str,
        segment: &SegmentName,
        keys: &[String],
    ) -> Result<()> {
        if let Some(slot) = self.existing(cluster, segment) {
            let mut guard = slot.lock().await;
            if let Some(p) = guard.as_mut().filter(|p| !p.done) {
                std::fs::remove_file(&p.path)
                    .with_context(|| format!("removing {}", p.path.display()))?;
                p.done = true;
            }
            drop(guard);
            self.forget(cluster, segment);
        }
        for key in keys {
            store.delete(key).await?;
        }
        Ok(())
    }

    /// Finds the files an earlier run left (start-up): each is registered with what it
    /// holds (up to its last byte that is not zero), to be uploaded or completed by the
    /// worker.
    pub(crate) fn recover(&self) -> Result<usize> {
        let mut found = 0;
        let Ok(clusters) = std::fs::read_dir(&self.dir) else {
            return Ok(0);
        };
        for cluster in clusters.flatten() {
            let cluster_name = cluster.file_name().to_string_lossy().into_owned();
            for tli in std::fs::read_dir(cluster.path())
                .into_iter()
                .flatten()
                .flatten()
            {
                for file in std::fs::read_dir(tli.path())
                    .into_iter()
                    .flatten()
                    .flatten()
                {
                    let name = file.file_name().to_string_lossy().into_owned();
                    let Some(Ok(WalFileName::Segment(segment))) =
                        name.strip_suffix(".partial").map(str::parse::<WalFileName>)
                    else {
                        continue;
                    };
                    if file.path() != self.path(&cluster_name, &segment) {
                        continue;
                    }
                    let f = std::fs::OpenOptions::new()
                        .read(true)
                        .write(true)
                        .open(file.path())
                        .with_context(|| format!("opening {}", file.path().display()))?;
                    let len = f.metadata()?.len();
                    let Ok(segment_size) = u32::try_from(len) else {
                        continue;
                    };
                    let held = held_bytes(&f, len)?;
                    let slot = self.slot(&cluster_name, &segment);
                    let mut guard = slot.try_lock().expect("nothing runs yet");
                    *guard = Some(Partial {
                        path: file.path(),
                        file: f,
                        segment_size,
                        held,
                        uploaded: 0,
                        done: false,
                    });
                    found += 1;
                }
            }
        }
        Ok(found)
    }
}

/// The bytes of a file up to its last byte that is not zero.
fn held_bytes(file: &std::fs::File, len: u64) -> Result<u64> {
    let mut buf = vec![0u8; 1 << 20];
    let mut end = len;
    while end > 0 {
        let start = end.saturating_sub(buf.len() as u64);
        let piece = &mut buf[..(end - start) as usize];
        file.read_exact_at(piece, start)?;
        if let Some(i) = piece.iter().rposition(|&b| b != 0) {
            return Ok(start + i as u64 + 1);
        }
        end = start;
    }
    Ok(0)
}

/// What a `StreamAppend` announces.
pub(crate) struct Append<'a> {
    pub(crate) cluster: &'a str,
    pub(crate) segment: &'a str,
    pub(crate) offset: u64,
    pub(crate) len: u64,
    pub(crate) system_identifier: u64,
    pub(crate) segment_size: u32,
}

fn parse_segment(name: &str) -> Result<SegmentName, Refusal> {
    match name.parse::<WalFileName>() {
        Ok(WalFileName::Segment(s)) => Ok(s),
        _ => Err(Refusal::invalid(format!(
            "{name:?} is not a WAL segment name"
        ))),
    }
}

/// `StreamAppend` (module header).
pub(crate) async fn append(
    ctx: &Ctx<'_>,
    a: &Append<'_>,
    body: &mut (impl tokio::io::AsyncRead + Unpin + Send),
) -> Reply {
    ctx.require_writer("stream WAL")?;
    let segment = parse_segment(a.segment)?;
    walvault_protocol::core::pg::wal::validate_segment_size(a.segment_size)
        .map_err(Refusal::invalid)?;
    let size = u64::from(a.segment_size);
    if a.len == 0 || a.len > MAX_STREAM_APPEND || a.offset.saturating_add(a.len) > size {
        return Err(Refusal::invalid(format!(
            "{}: an append of {} bytes at offset {} does not fit a {size} byte segment (at most {MAX_STREAM_APPEND} bytes per append)",
            a.segment, a.len, a.offset
        )));
    }
    let bound = ctx.index.binding(a.cluster).map_err(Refusal::internal)?;
    if let Some(b) = &bound {
        if b.system_identifier != a.system_identifier || b.wal_segment_size != a.segment_size {
            return Err(Refusal::new(
                ErrorCode::WrongCluster,
                format!(
                    "the streamed server is system {} with {} byte segments, but cluster '{}' is bound to system {} with {} byte segments. \
                     Each PostgreSQL cluster needs its own cluster name (archived issue --cluster NAME).",
                    a.system_identifier, a.segment_size, a.cluster, b.system_identifier, b.wal_segment_size
                ),
            ));
        }
    }
    let _grant = ctx
        .budget
        .body(a.len, &format!("StreamAppend {}", a.segment))
        .await?;
    let bytes = super::read_to_end_bounded(body, a.len as usize)
        .await
        .map_err(|e| match e {
            super::BodyError::TooLong => {
                Refusal::invalid(format!("{}: body longer than {} bytes", a.segment, a.len))
            }
            super::BodyError::Io(e) => {
                Refusal::invalid(format!("{}: body stream failed: {e}", a.segment))
            }
        })?;
    if bytes.len() as u64 != a.len {
        return Err(Refusal::invalid(format!(
            "{}: body of {} bytes, {} announced",
            a.segment,
            bytes.len(),
            a.len
        )));
    }
    let seg_start = segment.start_lsn(a.segment_size).0;
    check_pages(&bytes, a.offset, seg_start, a).map_err(Refusal::invalid)?;
    if a.offset == 0 && bytes.len() >= LONG_PAGE_HEADER_LEN {
        let header = LongPageHeader::parse(&bytes)
            .map_err(|e| Refusal::invalid(format!("{}: {e}", a.segment)))?;
        if header.system_identifier != a.system_identifier
            || header.segment_size != a.segment_size
            || u64::from(header.block_size) != WAL_PAGE
        {
            return Err(Refusal::invalid(format!(
                "{}: its long page header says system {}, {} byte segments, {} byte pages; the request says system {}, {} byte segments",
                a.segment, header.system_identifier, header.segment_size, header.block_size,
                a.system_identifier, a.segment_size
            )));
        }
        if bound.is_none() {
            super::wal::check_binding(ctx, a.cluster, a.segment, &header).await?;
        }
    } else if bound.is_none() {
        return Err(Refusal::invalid(format!(
            "cluster '{}' is not bound to a system yet: stream its first segment from its start",
            a.cluster
        )));
    }

    let streams = &ctx.archive.streams;
    let slot = streams.slot(a.cluster, &segment);
    let mut guard = slot.lock().await;
    if guard.as_ref().is_none_or(|p| p.done) {
        let path = streams.path(a.cluster, &segment);
        let prepared = tokio::task::spawn_blocking(move || prepare_file(&path, size))
            .await
            .map_err(|e| Refusal::internal(e.into()))?
            .map_err(Refusal::internal)?;
        *guard = Some(prepared);
    }
    let partial = guard.as_mut().expect("prepared above");
    if u64::from(partial.segment_size) != size {
        return Err(Refusal::invalid(format!(
            "{}: the archive's unfinished copy is {} bytes, the request says {size}",
            a.segment, partial.segment_size
        )));
    }
    if a.offset > partial.held {
        return Err(Refusal::invalid(format!(
            "{}: append at offset {} but the archive holds only {} bytes of it; stream the segment from its start",
            a.segment, a.offset, partial.held
        )));
    }
    let file = partial
        .file
        .try_clone()
        .map_err(|e| Refusal::internal(e.into()))?;
    let offset = a.offset;
    let name = a.segment.to_string();
    let written = tokio::task::spawn_blocking(move || write_synced(&file, offset, &bytes, &name))
        .await
        .map_err(|e| Refusal::internal(e.into()))?;
    match written {
        Ok(()) => {}
        Err(WriteError::Conflict(at)) => {
            return Err(Refusal::new(
                ErrorCode::Conflict,
                format!(
                    "{}: the archive holds different WAL at offset {at} of this segment; the archived bytes are kept. \
                     Two servers may be streaming under one cluster name.",
                    a.segment
                ),
            ))
        }
        Err(WriteError::Io(e)) => return Err(Refusal::internal(e)),
    }
    partial.held = partial.held.max(a.offset + a.len);
    let complete = partial.held == size;
    drop(guard);
    if complete {
        streams.wake.notify_one();
    }
    Ok(Response::StreamFlushed {
        flushed: a.offset + a.len,
        complete,
    })
}

/// Checks every page header that starts inside `bytes` (at segment offset `offset`).
fn check_pages(bytes: &[u8], offset: u64, seg_start: u64, a: &Append<'_>) -> Result<(), String> {
    let first = offset.div_ceil(WAL_PAGE) * WAL_PAGE;
    let end = offset + bytes.len() as u64;
    let mut page = first;
    while page < end {
        let at = (page - offset) as usize;
        let header = &bytes[at..];
        // After a WAL switch record PostgreSQL sends the rest of the segment as zeros.
        if header.iter().take(16).all(|&b| b == 0) {
            page += WAL_PAGE;
            continue;
        }
        if header.len() >= 2 {
            let magic = u16::from_le_bytes([header[0], header[1]]);
            if pg_major_for_magic(magic).is_none() {
                return Err(format!(
                    "{}: offset {page} is not a WAL page (magic {magic:#06x})",
                    a.segment
                ));
            }
        }
        if header.len() >= 16 {
            let addr = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
            if addr != seg_start + page {
                return Err(format!(
                    "{}: the page at offset {page} says it is at {:X}/{:X}, not {:X}/{:X}",
                    a.segment,
                    addr >> 32,
                    addr & 0xFFFF_FFFF,
                    (seg_start + page) >> 32,
                    (seg_start + page) & 0xFFFF_FFFF
                ));
            }
        }
        page += WAL_PAGE;
    }
    Ok(())
}

/// Creates (or reopens) a segment's local file, full size and zero-filled, fsynced with
/// every directory made for it.
fn prepare_file(path: &Path, size: u64) -> Result<Partial> {
    let dir = path.parent().expect("a file under the stream directory");
    fsutil::create_dir_durable(dir).with_context(|| format!("creating {}", dir.display()))?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    let len = file.metadata()?.len();
    if len < size {
        // Written zeros, not a sparse file: fdatasync of later appends then updates no
        // block allocation.
        let zeros = vec![0u8; 1 << 20];
        let mut at = len;
        while at < size {
            let n = (size - at).min(zeros.len() as u64) as usize;
            file.write_all_at(&zeros[..n], at)?;
            at += n as u64;
        }
        file.sync_all()?;
        fsutil::fsync_dir(dir)?;
    }
    let held = held_bytes(&file, size)?;
    Ok(Partial {
        path: path.to_path_buf(),
        file,
        segment_size: size as u32,
        held,
        uploaded: 0,
        done: false,
    })
}

enum WriteError {
    /// A byte the file holds (not zero) differs, at this offset.
    Conflict(u64),
    Io(anyhow::Error),
}

/// Compares `bytes` with what the file holds at `offset`, writes them, fdatasyncs.
fn write_synced(
    file: &std::fs::File,
    offset: u64,
    bytes: &[u8],
    name: &str,
) -> Result<(), WriteError> {
    let io = |e: std::io::Error| {
        WriteError::Io(anyhow::Error::new(e).context(format!("writing {name}")))
    };
    let mut have = vec![0u8; bytes.len()];
    file.read_exact_at(&mut have, offset).map_err(io)?;
    if let Some(i) = have
        .iter()
        .zip(bytes)
        .position(|(&old, &new)| old != 0 && old != new)
    {
        return Err(WriteError::Conflict(offset + i as u64));
    }
    if have != bytes {
        file.write_all_at(bytes, offset).map_err(io)?;
    }
    file.sync_data().map_err(io)?;
    Ok(())
}

/// `StreamSeal`: the timeline ended inside `segment`; what is held is stored now and
/// stays as the timeline's last streamed segment.
pub(crate) async fn seal(ctx: &Ctx<'_>, cluster: &str, segment: &str) -> Reply {
    ctx.require_writer("stream WAL")?;
    let segment = parse_segment(segment)?;
    if let Some(slot) = ctx.archive.streams.existing(cluster, &segment) {
        let mut guard = slot.lock().await;
        if let Some(p) = guard.as_mut().filter(|p| !p.done) {
            upload(ctx.archive, cluster, &segment, p)
                .await
                .map_err(Refusal::internal)?;
        }
    }
    Ok(Response::Stored {
        already_present: false,
    })
}

/// The full, zero-padded content of a local file, compressed, with its blake3.
fn snapshot(file: &std::fs::File, size: u32) -> Result<(Vec<u8>, [u8; 32])> {
    let mut raw = vec![0u8; size as usize];
    file.read_exact_at(&mut raw, 0)?;
    let hash = *blake3::hash(&raw).as_bytes();
    let mut encoder = Encoder::new(LEVEL)?;
    let mut out = Vec::new();
    encoder.write(&raw, &mut out)?;
    encoder.finish(&mut out)?;
    Ok((out, hash))
}

/// Stores the current content of `p` as a new upload and deletes the older ones.
async fn upload(
    archive: &Archive,
    cluster: &str,
    segment: &SegmentName,
    p: &mut Partial,
) -> Result<()> {
    if p.held <= p.uploaded {
        return Ok(());
    }
    let held = p.held;
    let file = p.file.try_clone()?;
    let size = p.segment_size;
    let (frame, hash) = tokio::task::spawn_blocking(move || snapshot(&file, size)).await??;
    let key = layout::stream_key(cluster, segment, held);
    let mut pending = archive.store.begin(&key).await?;
    pending.write(&frame).await?;
    archive
        .store
        .commit(
            pending,
            &ObjectHeader {
                raw_size: u64::from(size),
                blake3: hash,
                compressed_size: frame.len() as u64,
            },
        )
        .await?;
    p.uploaded = held;
    for (old, bytes) in uploads(&archive.store, cluster, segment).await? {
        if bytes < held {
            archive.store.delete(&old).await?;
        }
    }
    Ok(())
}

/// A complete segment becomes a normal archived segment; then its file and uploads go.
async fn complete(
    archive: &Archive,
    cluster: &str,
    segment: &SegmentName,
    p: &mut Partial,
) -> Result<()> {
    let file = p.file.try_clone()?;
    let size = p.segment_size;
    let (frame, hash) = tokio::task::spawn_blocking(move || snapshot(&file, size)).await??;
    let identity = ClientIdentity {
        cluster: cluster.to_string(),
        role: Role::Admin,
    };
    let ctx = archive.ctx(&identity);
    let name = segment.to_string();
    let blake3 = hex::encode(hash);
    let upload = WalUpload {
        cluster,
        name: &name,
        raw_size: u64::from(size),
        blake3: &blake3,
    };
    let mut source: &[u8] = &frame;
    match super::wal::ingest(&ctx, &upload, &mut source).await {
        Ok(Response::Stored { already_present }) => {
            tracing::info!(%cluster, segment = %name, already_present, "streamed segment complete and stored")
        }
        Ok(other) => anyhow::bail!("storing {name}: unexpected answer {other:?}"),
        Err(r) => anyhow::bail!("storing the streamed {name}: {}", r.message),
    }
    for (key, _) in uploads(&archive.store, cluster, segment).await? {
        archive.store.delete(&key).await?;
    }
    std::fs::remove_file(&p.path).with_context(|| format!("removing {}", p.path.display()))?;
    if let Some(dir) = p.path.parent() {
        fsutil::fsync_dir(dir)?;
    }
    p.done = true;
    Ok(())
}

/// The worker (module header): uploads unfinished segments that grew, completes full
/// ones. Runs until the process ends.
pub(crate) async fn run(archive: &Archive) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(archive.streams.upload_interval) => {}
            _ = archive.streams.wake.notified() => {}
        }
        work(archive).await;
    }
}

/// One round of the worker: every segment that grew is uploaded, every complete one
/// stored as a segment.
async fn work(archive: &Archive) {
    let streams = &archive.streams;
    {
        for ((cluster, segment), slot) in streams.all() {
            let mut guard = slot.lock().await;
            let Some(p) = guard.as_mut() else { continue };
            if p.done {
                continue;
            }
            let result = if p.held == u64::from(p.segment_size) {
                complete(archive, &cluster, &segment, p).await
            } else {
                upload(archive, &cluster, &segment, p).await
            };
            if let Err(e) = result {
                tracing::error!(%cluster, %segment, error = %format!("{e:#}"), "streamed segment: will retry");
            }
            let done = p.done;
            drop(guard);
            if done {
                streams.forget(&cluster, &segment);
            }
        }
    }
}

/// `GetWal` of a segment without a complete object: the unfinished one (module header),
/// or `None`.
pub(crate) async fn partial_object(
    ctx: &Ctx<'_>,
    cluster: &str,
    segment: &SegmentName,
) -> Option<StreamReply> {
    if let Some(slot) = ctx.archive.streams.existing(cluster, segment) {
        let guard = slot.lock().await;
        if let Some(p) = guard.as_ref().filter(|p| !p.done && p.held > 0) {
            let held = p.held;
            let size = p.segment_size;
            let file = match p.file.try_clone() {
                Ok(f) => f,
                Err(e) => return Some(Err(Refusal::internal(e.into()))),
            };
            drop(guard);
            let grant = match ctx
                .budget
                .body(
                    2 * u64::from(size),
                    &format!("sending the unfinished {segment}"),
                )
                .await
            {
                Ok(g) => g,
                Err(r) => return Some(Err(r)),
            };
            let made = tokio::task::spawn_blocking(move || snapshot(&file, size)).await;
            let (frame, hash) = match made {
                Ok(Ok(v)) => v,
                Ok(Err(e)) => return Some(Err(Refusal::internal(e))),
                Err(e) => return Some(Err(Refusal::internal(e.into()))),
            };
            let compressed_size = frame.len() as u64;
            let body = futures::stream::iter([Ok(Bytes::from(frame))]);
            return Some(Ok(Streamed {
                response: Response::Object {
                    raw_size: u64::from(size),
                    blake3: hex::encode(hash),
                    compressed_size,
                    partial_bytes: Some(held),
                },
                body: super::holding(Box::pin(body), grant),
                what: format!("the unfinished {segment} ({held} bytes)"),
            }));
        }
    }
    let newest = match newest_upload(ctx, cluster, segment).await {
        Ok(n) => n?,
        Err(e) => return Some(Err(Refusal::internal(e))),
    };
    let (key, held) = newest;
    let answer = super::object(ctx, &key, || {
        Refusal::new(
            ErrorCode::NotFound,
            format!("{segment} is not in the archive"),
        )
    })
    .await
    .map(|mut s| {
        if let Response::Object { partial_bytes, .. } = &mut s.response {
            *partial_bytes = Some(held);
        }
        s
    });
    Some(answer)
}

/// The uploads of `segment` in the store: key and bytes held.
async fn uploads(
    store: &crate::store::Store,
    cluster: &str,
    segment: &SegmentName,
) -> Result<Vec<(String, u64)>> {
    Ok(store
        .list(&layout::stream_timeline_prefix(cluster, segment))
        .await?
        .into_iter()
        .filter_map(|k| {
            let (c, s, bytes) = layout::parse_stream_key(&k)?;
            (c == cluster && s == *segment).then_some((k, bytes))
        })
        .collect())
}

/// The newest upload of `segment` in the store, and the bytes it holds.
async fn newest_upload(
    ctx: &Ctx<'_>,
    cluster: &str,
    segment: &SegmentName,
) -> Result<Option<(String, u64)>> {
    Ok(uploads(ctx.store, cluster, segment)
        .await?
        .into_iter()
        .max_by_key(|(_, b)| *b))
}

/// The unfinished segments of a cluster (this archived's files and the store's uploads),
/// for the listing's `streamed`.
pub(crate) async fn streamed(ctx: &Ctx<'_>, cluster: &str) -> Result<Vec<StreamedSegment>> {
    let mut best: std::collections::BTreeMap<SegmentName, u64> = Default::default();
    for key in ctx.store.list(&layout::stream_prefix(cluster)).await? {
        if let Some((_, segment, bytes)) = layout::parse_stream_key(&key) {
            let e = best.entry(segment).or_default();
            *e = (*e).max(bytes);
        }
    }
    for ((c, segment), slot) in ctx.archive.streams.all() {
        if c != cluster {
            continue;
        }
        if let Some(p) = slot.lock().await.as_ref().filter(|p| !p.done) {
            let e = best.entry(segment).or_default();
            *e = (*e).max(p.held);
        }
    }
    // A segment stored complete meanwhile is no longer unfinished.
    let mut out = Vec::new();
    for (segment, bytes) in best {
        if !ctx.index.has_segment(cluster, &segment)? {
            out.push(StreamedSegment {
                name: segment.to_string(),
                bytes,
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::tests::{identity, segment, TestArchive, SEG, SYSID};
    use futures::StreamExt;

    /// A 1 MiB segment whose every page has a header of its position.
    fn wal(seg: u32) -> (String, Vec<u8>) {
        let (name, mut raw) = segment(seg, SYSID, 0x5a);
        for page in (WAL_PAGE as usize..raw.len()).step_by(WAL_PAGE as usize) {
            raw[page..page + 2].copy_from_slice(&0xD110u16.to_le_bytes());
            raw[page + 2..page + 8].fill(0);
            raw[page + 4..page + 8].copy_from_slice(&1u32.to_le_bytes());
            let addr = seg as u64 * SEG as u64 + page as u64;
            raw[page + 8..page + 16].copy_from_slice(&addr.to_le_bytes());
        }
        (name, raw)
    }

    async fn send(t: &TestArchive, name: &str, offset: u64, bytes: &[u8], sysid: u64) -> Reply {
        let id = identity(Role::Push);
        let ctx = t.archive.ctx(&id);
        let a = Append {
            cluster: "main",
            segment: name,
            offset,
            len: bytes.len() as u64,
            system_identifier: sysid,
            segment_size: SEG,
        };
        append(&ctx, &a, &mut &bytes[..]).await
    }

    /// GetWal's raw answer and its `partial_bytes`.
    async fn get(t: &TestArchive, name: &str) -> Result<(Vec<u8>, Option<u64>), Refusal> {
        let id = identity(Role::Pull);
        let ctx = t.archive.ctx(&id);
        let answer = super::super::wal::get(&ctx, "main", name).await?;
        let Response::Object {
            raw_size,
            partial_bytes,
            blake3,
            ..
        } = answer.response
        else {
            panic!("GetWal answered {:?}", answer.response);
        };
        let frame: Vec<u8> = answer.body.map(|c| c.unwrap().to_vec()).concat().await;
        let raw = zstd::bulk::decompress(&frame, raw_size as usize).unwrap();
        assert_eq!(blake3::hash(&raw).to_hex().to_string(), blake3);
        Ok((raw, partial_bytes))
    }

    #[tokio::test]
    async fn appends_are_served_padded_resends_agree_and_a_complete_segment_is_stored() {
        let t = TestArchive::new();
        let (name, raw) = wal(3);
        let cut = 300_000;
        assert_eq!(
            send(&t, &name, 0, &raw[..cut], SYSID).await.unwrap(),
            Response::StreamFlushed {
                flushed: cut as u64,
                complete: false
            }
        );
        // Bound from the long page header, as a push binds.
        assert_eq!(
            t.archive
                .index
                .binding("main")
                .unwrap()
                .unwrap()
                .system_identifier,
            SYSID
        );
        let (got, held) = get(&t, &name).await.unwrap();
        assert_eq!(held, Some(cut as u64));
        assert_eq!(got.len(), SEG as usize, "padded to the segment size");
        assert_eq!(&got[..cut], &raw[..cut]);
        assert!(got[cut..].iter().all(|&b| b == 0));
        // A reconnected receiver sends the segment again from its start: accepted.
        send(&t, &name, 0, &raw[..cut + 1000], SYSID).await.unwrap();
        // Other bytes where the archive holds some: refused, nothing written.
        let mut other = raw[..cut].to_vec();
        other[100] ^= 0xff;
        let refused = send(&t, &name, 0, &other, SYSID).await.unwrap_err();
        assert_eq!(refused.code, ErrorCode::Conflict, "{}", refused.message);
        assert_eq!(get(&t, &name).await.unwrap().0[100], raw[100]);
        // A gap: refused.
        let gap = send(
            &t,
            &name,
            cut as u64 + 2000,
            &raw[cut + 2000..cut + 3000],
            SYSID,
        )
        .await
        .unwrap_err();
        assert_eq!(gap.code, ErrorCode::Invalid, "{}", gap.message);
        // The rest completes it; the worker stores it as a normal segment.
        let done = send(&t, &name, cut as u64 + 1000, &raw[cut + 1000..], SYSID)
            .await
            .unwrap();
        assert_eq!(
            done,
            Response::StreamFlushed {
                flushed: SEG as u64,
                complete: true
            }
        );
        work(&t.archive).await;
        let seg: SegmentName = match name.parse::<WalFileName>().unwrap() {
            WalFileName::Segment(s) => s,
            _ => unreachable!(),
        };
        assert!(t.archive.index.has_segment("main", &seg).unwrap());
        assert_eq!(get(&t, &name).await.unwrap(), (raw, None));
        let id = identity(Role::Pull);
        let ctx = t.archive.ctx(&id);
        assert!(streamed(&ctx, "main").await.unwrap().is_empty());
        assert!(t
            .archive
            .store
            .list(&layout::stream_prefix("main"))
            .await
            .unwrap()
            .is_empty());
    }

    #[tokio::test]
    async fn uploads_make_the_unfinished_segment_visible_without_the_local_file() {
        let t = TestArchive::new();
        let (name, raw) = wal(4);
        send(&t, &name, 0, &raw[..100_000], SYSID).await.unwrap();
        work(&t.archive).await;
        send(&t, &name, 100_000, &raw[100_000..200_000], SYSID)
            .await
            .unwrap();
        work(&t.archive).await;
        let keys = t
            .archive
            .store
            .list(&layout::stream_prefix("main"))
            .await
            .unwrap();
        assert_eq!(keys.len(), 1, "older uploads are deleted: {keys:?}");
        assert!(keys[0].ends_with(".00030D40.zst"), "{keys:?}");
        // Another archived over the same store (no local file) serves the upload.
        t.archive.streams.slots.lock().unwrap().clear();
        let (got, held) = get(&t, &name).await.unwrap();
        assert_eq!(held, Some(200_000));
        assert_eq!(&got[..200_000], &raw[..200_000]);
        let id = identity(Role::Pull);
        let ctx = t.archive.ctx(&id);
        assert_eq!(
            streamed(&ctx, "main").await.unwrap(),
            vec![StreamedSegment {
                name: name.clone(),
                bytes: 200_000
            }]
        );
    }

    #[tokio::test]
    async fn another_system_a_wrong_page_and_a_pull_certificate_are_refused() {
        let t = TestArchive::new();
        let (name, raw) = wal(5);
        send(&t, &name, 0, &raw[..50_000], SYSID).await.unwrap();
        let other = send(&t, &name, 50_000, &raw[50_000..60_000], SYSID + 1)
            .await
            .unwrap_err();
        assert_eq!(other.code, ErrorCode::WrongCluster);
        assert!(
            other.message.contains(&SYSID.to_string())
                && other.message.contains(&(SYSID + 1).to_string()),
            "{}",
            other.message
        );
        // Page 7's header says it is elsewhere.
        let mut moved = raw[50_000..60_000].to_vec();
        let page = 7 * WAL_PAGE as usize - 50_000;
        moved[page + 8] ^= 0x40;
        let bad = send(&t, &name, 50_000, &moved, SYSID).await.unwrap_err();
        assert_eq!(bad.code, ErrorCode::Invalid);
        assert!(bad.message.contains("offset 57344"), "{}", bad.message);
        let id = identity(Role::Pull);
        let ctx = t.archive.ctx(&id);
        let a = Append {
            cluster: "main",
            segment: &name,
            offset: 50_000,
            len: 10,
            system_identifier: SYSID,
            segment_size: SEG,
        };
        let pull = append(&ctx, &a, &mut &raw[50_000..50_010])
            .await
            .unwrap_err();
        assert_eq!(pull.code, ErrorCode::Unauthorized);
        assert_eq!(get(&t, &name).await.unwrap().1, Some(50_000));
    }

    #[tokio::test]
    async fn retention_forgets_streamed_segments_before_its_horizon() {
        let t = TestArchive::new();
        let (name, raw) = wal(4);
        send(&t, &name, 0, &raw[..100_000], SYSID).await.unwrap();
        work(&t.archive).await;
        let seg = |n: u32| SegmentName {
            timeline: walvault_protocol::core::pg::wal::TimelineId(1),
            log: 0,
            seg: n,
        };
        let streams = &t.archive.streams;
        let store = &t.archive.store;
        assert!(streams
            .before(store, "main", &seg(4), SEG)
            .await
            .unwrap()
            .is_empty());
        let old = streams.before(store, "main", &seg(6), SEG).await.unwrap();
        assert_eq!(old.len(), 1);
        assert_eq!(old[0].0, seg(4));
        assert_eq!(old[0].1.len(), 1, "{old:?}");
        assert!(old[0].2 > 0);
        let path = streams.path("main", &seg(4));
        assert!(path.exists());
        streams
            .expire(store, "main", &seg(4), &old[0].1)
            .await
            .unwrap();
        assert!(!path.exists());
        assert!(store
            .list(&layout::stream_prefix("main"))
            .await
            .unwrap()
            .is_empty());
        assert!(matches!(get(&t, &name).await, Err(r) if r.code == ErrorCode::NotFound));
    }

    #[tokio::test]
    async fn a_restart_finds_the_unfinished_segments_again() {
        let t = TestArchive::new();
        let (name, raw) = wal(6);
        send(&t, &name, 0, &raw[..70_000], SYSID).await.unwrap();
        let dir = t.archive.streams.dir.clone();
        let again = Streams::new(dir, Duration::from_secs(2));
        assert_eq!(again.recover().unwrap(), 1);
        let seg = match name.parse::<WalFileName>().unwrap() {
            WalFileName::Segment(s) => s,
            _ => unreachable!(),
        };
        let slot = again.existing("main", &seg).unwrap();
        assert_eq!(slot.lock().await.as_ref().unwrap().held, 70_000);
    }
}
