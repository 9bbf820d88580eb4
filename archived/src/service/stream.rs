//! The streaming receiver's side in archived: `StreamAppend`, `StreamSeal`, the
//! unfinished segments they build, and what becomes of them.
//!
//! Contract:
//!
//! - **Flush means durable.** An append is acknowledged (`StreamAcked` in a
//!   [`session`], `StreamFlushed` for a lone [`append`]) only after its bytes are
//!   written into the segment's local file and fdatasynced. The file lives on this
//!   archived's disk (`<data_dir>/stream/<cluster>/<TLI>/<SEGMENT>.partial`, created full
//!   size and zero-filled, fsynced with its directories before its first append, as
//!   PostgreSQL prepares a segment; a session prepares the next segment's file in the
//!   background, removed when the receiver seals the segment before it at the end of
//!   its timeline, and a file that holds nothing yet is never listed or served), so an
//!   append costs no metadata update; that disk is the receiver's durability domain, as
//!   a standby's own disk is.
//! - **Group commit.** A session's appends are read as they arrive and queued for one
//!   writer thread, which writes every append waiting, fdatasyncs each file it touched
//!   once, and acknowledges the burst (appends are durable in the order sent). A refused
//!   append ends the session after the acknowledgement of those before it.
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
use walvault_protocol::core::pg::timeline::TimelineHistory;
use walvault_protocol::core::pg::wal::{
    pg_major_for_magic, LongPageHeader, SegmentName, WalFileName, LONG_PAGE_HEADER_LEN,
};
use walvault_protocol::core::wire::{
    self, ErrorCode, Request, Response, StreamedSegment, MAX_OBJECT_SIZE, MAX_STREAM_APPEND,
};
use walvault_protocol::net::fsutil;
use walvault_protocol::net::pki::{ClientIdentity, Role};

use super::budget::Grant;
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
    /// Bytes written from the start (at least `held`; the rest not yet fdatasynced).
    /// A failed fdatasync sets it back to `held`: what it did not sync must be written
    /// again, never taken as written because the page cache shows it.
    written: u64,
    /// The file is zeros from here on: nothing was ever written past it (at least
    /// `written`), so an append here needs no comparison.
    zero_from: u64,
    /// Bytes the newest upload in the store holds.
    uploaded: u64,
    /// Ingested as a complete segment (the file is gone).
    done: bool,
}

impl Partial {
    /// It is an unfinished segment that holds some WAL: one to list and serve (a file
    /// prepared ahead holds none, an ingested one is gone).
    fn holds_wal(&self) -> bool {
        !self.done && self.held > 0
    }
}

type Slot = Arc<tokio::sync::Mutex<Option<Partial>>>;

/// The unfinished segments of every cluster, by (cluster, segment).
pub(crate) struct Streams {
    dir: PathBuf,
    upload_interval: Duration,
    slots: std::sync::Mutex<HashMap<(String, SegmentName), Slot>>,
    wake: Arc<tokio::sync::Notify>,
    /// One upload at a time (the worker's and a seal's).
    uploading: tokio::sync::Mutex<()>,
    /// The newest answer made of each unfinished segment, reused while it holds the same
    /// bytes (an archive-fed standby asks for the same segment every few seconds).
    answers: std::sync::Mutex<HashMap<(String, SegmentName), Snapshot>>,
    /// Answers made from a local file (not reused), for tests.
    answers_made: std::sync::atomic::AtomicU64,
    /// Per cluster, where the streamed server's WAL ended as its receiver's newest
    /// append said (`/metrics`: the receiver's lag).
    server_ends: std::sync::Mutex<HashMap<String, u64>>,
}

/// An unfinished segment's answer: its zero-padded content compressed, and its blake3.
#[derive(Clone)]
struct Snapshot {
    held: u64,
    frame: Bytes,
    hash: [u8; 32],
}

impl Streams {
    /// The unfinished segments under `dir`, uploaded every `upload_interval`.
    pub(crate) fn new(dir: PathBuf, upload_interval: Duration) -> Streams {
        Streams {
            dir,
            upload_interval,
            slots: std::sync::Mutex::new(HashMap::new()),
            wake: Arc::new(tokio::sync::Notify::new()),
            uploading: tokio::sync::Mutex::new(()),
            answers: std::sync::Mutex::new(HashMap::new()),
            answers_made: std::sync::atomic::AtomicU64::new(0),
            server_ends: std::sync::Mutex::new(HashMap::new()),
        }
    }

    /// Notes where the streamed server's WAL ended, as an append reported it.
    pub(crate) fn note_server_end(&self, cluster: &str, end: u64) {
        let mut ends = self.server_ends.lock().unwrap_or_else(|e| e.into_inner());
        let e = ends.entry(cluster.to_string()).or_default();
        *e = (*e).max(end);
    }

    /// Per cluster, where the streamed server's WAL ended as the newest append said.
    pub(crate) fn server_ends(&self) -> HashMap<String, u64> {
        self.server_ends
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
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

    /// Where the streaming receiver's WAL durable on this archived's disk ends, per
    /// cluster: the furthest end of what its unfinished segments hold (metrics).
    pub(crate) async fn flushed_ends(&self) -> HashMap<String, u64> {
        let mut ends: HashMap<String, u64> = HashMap::new();
        for ((cluster, segment), slot) in self.all() {
            let guard = slot.lock().await;
            let Some(p) = guard.as_ref().filter(|p| p.holds_wal()) else {
                continue;
            };
            let end = segment.start_lsn(p.segment_size).0 + p.held;
            let e = ends.entry(cluster).or_default();
            *e = (*e).max(end);
        }
        ends
    }

    fn forget(&self, cluster: &str, segment: &SegmentName) {
        let key = (cluster.to_string(), *segment);
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots.remove(&key);
        drop(slots);
        let mut answers = self.answers.lock().unwrap_or_else(|e| e.into_inner());
        answers.remove(&key);
    }

    /// The answer made of `segment` when it held `held` bytes, if that is the newest.
    fn answer(&self, cluster: &str, segment: &SegmentName, held: u64) -> Option<Snapshot> {
        let answers = self.answers.lock().unwrap_or_else(|e| e.into_inner());
        answers
            .get(&(cluster.to_string(), *segment))
            .filter(|a| a.held == held)
            .cloned()
    }

    fn keep_answer(&self, cluster: &str, segment: &SegmentName, answer: Snapshot) {
        let mut answers = self.answers.lock().unwrap_or_else(|e| e.into_inner());
        answers.insert((cluster.to_string(), *segment), answer);
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

    /// Removes the file of `segment` if it was only prepared (holds no WAL), and its slot.
    async fn drop_prepared(&self, cluster: &str, segment: &SegmentName) -> Result<()> {
        self.discard(cluster, segment, |p| !p.holds_wal()).await
    }

    /// Removes the local file of `segment` and forgets its slot, unless `only` says to
    /// keep an unfinished file (then both stay).
    async fn discard(
        &self,
        cluster: &str,
        segment: &SegmentName,
        only: impl Fn(&Partial) -> bool,
    ) -> Result<()> {
        let Some(slot) = self.existing(cluster, segment) else {
            return Ok(());
        };
        let mut guard = slot.lock().await;
        match guard.as_mut() {
            Some(p) if !p.done && only(p) => {
                std::fs::remove_file(&p.path)
                    .with_context(|| format!("removing {}", p.path.display()))?;
                p.done = true;
            }
            Some(p) if !p.done => return Ok(()),
            _ => {}
        }
        drop(guard);
        self.forget(cluster, segment);
        Ok(())
    }

    /// Forgets an expired segment: its uploads `keys`, its local file, its slot.
    pub(crate) async fn expire(
        &self,
        store: &crate::store::Store,
        cluster: &str,
        segment: &SegmentName,
        keys: &[String],
    ) -> Result<()> {
        self.discard(cluster, segment, |_| true).await?;
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
                        written: held,
                        zero_from: held,
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
    /// Where the server's WAL ended as the receiver last heard.
    pub(crate) server_wal_end: Option<u64>,
}

impl Append<'_> {
    /// The append a `StreamAppend` request announces.
    pub(crate) fn of(request: &Request) -> Option<Append<'_>> {
        match request {
            Request::StreamAppend {
                cluster,
                segment,
                offset,
                len,
                system_identifier,
                segment_size,
                server_wal_end,
            } => Some(Append {
                cluster,
                segment,
                offset: *offset,
                len: *len,
                system_identifier: *system_identifier,
                segment_size: *segment_size,
                server_wal_end: *server_wal_end,
            }),
            _ => None,
        }
    }
}

fn parse_segment(name: &str) -> Result<SegmentName, Refusal> {
    match name.parse::<WalFileName>() {
        Ok(WalFileName::Segment(s)) => Ok(s),
        _ => Err(Refusal::invalid(format!(
            "{name:?} is not a WAL segment name"
        ))),
    }
}

/// `StreamAppend` (module header): one append on its own stream.
pub(crate) async fn append(
    ctx: &Ctx<'_>,
    a: &Append<'_>,
    body: &mut (impl tokio::io::AsyncRead + Unpin + Send),
) -> Reply {
    let job = receive(ctx, a, body).await?;
    let end = job.offset + job.bytes.len() as u64;
    let applied = tokio::task::spawn_blocking(move || apply(vec![job]))
        .await
        .map_err(|e| Refusal::internal(e.into()))?;
    if let Some(refusal) = applied.failed {
        return Err(refusal);
    }
    if applied.complete {
        ctx.archive.streams.wake.notify_one();
    }
    Ok(Response::StreamFlushed {
        flushed: end,
        complete: applied.held_full,
    })
}

/// One append read and checked, on its way to the segment's file.
struct Job {
    slot: Slot,
    path: PathBuf,
    name: String,
    size: u64,
    offset: u64,
    bytes: Vec<u8>,
    /// Its memory, from the request budget, until it is written.
    _grant: Grant,
}

/// Checks an append's announcement, reads its body within the request budget, checks
/// the body's pages and the binding: the job to write (nothing is written yet).
async fn receive(
    ctx: &Ctx<'_>,
    a: &Append<'_>,
    body: &mut (impl tokio::io::AsyncRead + Unpin + Send),
) -> Result<Job, Refusal> {
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
    let bound = check_system(ctx, a.cluster, a.system_identifier, a.segment_size)?;
    let grant = ctx
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
        if !bound {
            super::wal::check_binding(ctx, a.cluster, a.segment, &header).await?;
        }
    } else if !bound {
        return Err(Refusal::invalid(format!(
            "cluster '{}' is not bound to a system yet: stream its first segment from its start",
            a.cluster
        )));
    }
    let streams = &ctx.archive.streams;
    Ok(Job {
        slot: streams.slot(a.cluster, &segment),
        path: streams.path(a.cluster, &segment),
        name: a.segment.to_string(),
        size,
        offset: a.offset,
        bytes,
        _grant: grant,
    })
}

/// Refuses a server that is not the cluster's (`WrongCluster`, both values in the
/// message); `Ok(true)` when the cluster is bound, `Ok(false)` when not yet.
fn check_system(
    ctx: &Ctx<'_>,
    cluster: &str,
    system_identifier: u64,
    segment_size: u32,
) -> Result<bool, Refusal> {
    let Some(b) = ctx.index.binding(cluster).map_err(Refusal::internal)? else {
        return Ok(false);
    };
    if b.system_identifier != system_identifier || b.wal_segment_size != segment_size {
        return Err(Refusal::new(
            ErrorCode::WrongCluster,
            format!(
                "the streamed server is system {system_identifier} with {segment_size} byte segments, but cluster '{cluster}' is bound to system {} with {} byte segments. \
                 Each PostgreSQL cluster needs its own cluster name (archived issue --cluster NAME).",
                b.system_identifier, b.wal_segment_size
            ),
        ));
    }
    Ok(true)
}

/// What [`apply`] made of a batch of jobs.
struct Applied {
    /// The first `durable` jobs, in order, are written and fdatasynced.
    durable: usize,
    /// A segment became complete (the worker stores it).
    complete: bool,
    /// The segment of the last job was already complete.
    held_full: bool,
    /// Why the job after the durable ones failed; the jobs after it were not applied.
    failed: Option<Refusal>,
}

/// Writes a batch of jobs in order, then fdatasyncs each file they touched once (group
/// commit: one sync per burst, as PostgreSQL's walreceiver does), and only then counts
/// them as held. Blocking: runs on a blocking thread.
fn apply(jobs: Vec<Job>) -> Applied {
    let mut touched: Vec<(Slot, std::fs::File, u64)> = Vec::new();
    let mut written = 0;
    let mut failed = None;
    for job in &jobs {
        let seen = touched
            .iter()
            .position(|(s, _, _)| Arc::ptr_eq(s, &job.slot));
        match write_one(job, seen.is_none()) {
            Ok((file, end)) => {
                match (seen, file) {
                    (Some(i), _) => touched[i].2 = touched[i].2.max(end),
                    (None, Some(file)) => touched.push((job.slot.clone(), file, end)),
                    (None, None) => unreachable!("write_one hands out the file when asked"),
                }
                written += 1;
            }
            Err(r) => {
                failed = Some(r);
                break;
            }
        }
    }
    drop(jobs);
    for (_, file, _) in &touched {
        if let Err(e) = sync_data(file) {
            // Nothing of the batch counts as durable; the receiver sends it again. After
            // a failed fdatasync the kernel may have dropped the pages or marked them
            // clean, so a later sync would not write them: what was written past `held`
            // must be written again by the resend (write_one writes past `written`).
            for (slot, _, _) in &touched {
                if let Some(p) = slot.blocking_lock().as_mut() {
                    p.written = p.held;
                }
            }
            let e = anyhow::Error::new(e).context("fdatasync of a streamed segment");
            return Applied {
                durable: 0,
                complete: false,
                held_full: false,
                failed: Some(Refusal::internal(e)),
            };
        }
    }
    let mut complete = false;
    let mut held_full = false;
    for (slot, _, end) in &touched {
        let mut guard = slot.blocking_lock();
        if let Some(p) = guard.as_mut() {
            p.held = p.held.max(*end);
            let full = p.held == u64::from(p.segment_size);
            complete |= full && !p.done;
            held_full = full;
        }
    }
    Applied {
        durable: written,
        complete,
        held_full,
        failed,
    }
}

/// Writes one job into its segment's file (made first if need be), without a sync: the
/// file (a handle of its own, when `want_file`: the sync needs it) and the end of what
/// it wrote.
fn write_one(job: &Job, want_file: bool) -> Result<(Option<std::fs::File>, u64), Refusal> {
    let mut guard = job.slot.blocking_lock();
    if guard.as_ref().is_none_or(|p| p.done) {
        *guard = Some(prepare_file(&job.path, job.size).map_err(Refusal::internal)?);
    }
    let p = guard.as_mut().expect("prepared above");
    if u64::from(p.segment_size) != job.size {
        return Err(Refusal::invalid(format!(
            "{}: the archive's unfinished copy is {} bytes, the request says {}",
            job.name, p.segment_size, job.size
        )));
    }
    if job.offset > p.written.max(p.held) {
        return Err(Refusal::invalid(format!(
            "{}: append at offset {} but the archive holds only {} bytes of it; stream the segment from its start",
            job.name, job.offset, p.written.max(p.held)
        )));
    }
    let end = job.offset + job.bytes.len() as u64;
    let fresh = Fresh {
        zeros: job.offset >= p.zero_from,
        must_write: end > p.written,
    };
    match write_compared(&p.file, job.offset, &job.bytes, &job.name, fresh) {
        Ok(_) => {}
        Err(WriteError::Conflict(at)) => {
            return Err(Refusal::new(
                ErrorCode::Conflict,
                format!(
                    "{}: the archive holds different WAL at offset {at} of this segment; the archived bytes are kept. \
                     Two servers may be streaming under one cluster name.",
                    job.name
                ),
            ))
        }
        Err(WriteError::Io(e)) => return Err(Refusal::internal(e)),
    }
    p.written = p.written.max(end);
    p.zero_from = p.zero_from.max(end);
    let file = match want_file {
        true => Some(
            p.file
                .try_clone()
                .map_err(|e| Refusal::internal(e.into()))?,
        ),
        false => None,
    };
    Ok((file, end))
}

/// Prepares the segment after `segment` in the background (full size, zero-filled), so
/// that the receiver's first append there does not wait for 16 MiB of zeros.
fn prepare_next(streams: &Streams, cluster: &str, segment: &SegmentName, segment_size: u32) {
    let next = segment.next(segment_size);
    let slot = streams.slot(cluster, &next);
    let path = streams.path(cluster, &next);
    tokio::task::spawn_blocking(move || {
        let mut guard = slot.blocking_lock();
        if guard.is_none() {
            match prepare_file(&path, u64::from(segment_size)) {
                Ok(p) => *guard = Some(p),
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "preparing the next streamed segment (the first append there will)")
                }
            }
        }
    });
}

/// What opens a `StreamSession`.
pub(crate) struct Session<'a> {
    pub(crate) cluster: &'a str,
    pub(crate) system_identifier: u64,
    pub(crate) segment_size: u32,
}

/// Largest frame inside a session (an append's announcement is a few hundred bytes).
const SESSION_FRAME_MAX: usize = 64 << 10;
/// Appends one burst may hold before it is synced.
const BATCH_MAX: usize = 512;

/// `StreamSession` (module header): appends from `recv`, each a `StreamAppend` frame and
/// its body, until the client finishes the stream; every burst written is fdatasynced
/// once and acknowledged with one `StreamAcked` (the count of appends durable so far, in
/// order). A refused append ends the session with its `Error` frame after the acks of
/// the appends before it. `shutting_down` ends an idle session with `Unavailable`.
pub(crate) async fn session<R, W>(
    ctx: &Ctx<'_>,
    s: &Session<'_>,
    recv: &mut R,
    mut send: W,
    body_idle: Duration,
    shutting_down: impl Fn() -> bool,
) -> W
where
    R: tokio::io::AsyncRead + Unpin + Send,
    W: tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use tokio::io::AsyncWriteExt;
    let opened = ctx.require_writer("stream WAL").and_then(|()| {
        walvault_protocol::core::pg::wal::validate_segment_size(s.segment_size)
            .map_err(Refusal::invalid)?;
        check_system(ctx, s.cluster, s.system_identifier, s.segment_size)
    });
    if let Err(r) = opened {
        tracing::warn!(cluster = %s.cluster, code = ?r.code, message = %r.message, "stream session refused");
        let _ = send.write_all(&error_frame(r)).await;
        let _ = send.shutdown().await;
        return send;
    }
    tracing::info!(cluster = %s.cluster, "stream session opened");
    let (jobs, queued) = tokio::sync::mpsc::channel::<Job>(BATCH_MAX);
    let wake = ctx.archive.streams.wake.clone();
    let cluster = s.cluster.to_string();
    let runtime = tokio::runtime::Handle::current();
    // The writer answers too: an acknowledgement leaves the moment its sync returns.
    let writer =
        tokio::task::spawn_blocking(move || write_bursts(queued, send, wake, &cluster, &runtime));
    let read = read_appends(ctx, s, recv, &jobs, body_idle, &shutting_down).await;
    drop(jobs);
    let (mut send, ended) = match writer.await {
        Ok(done) => done,
        Err(e) => {
            // The writer panicked: its stream went with it.
            tracing::error!(error = %e, "stream session writer failed");
            std::panic::resume_unwind(e.into_panic())
        }
    };
    if !ended {
        if let Err(r) = read {
            tracing::warn!(cluster = %s.cluster, code = ?r.code, message = %r.message, "stream session ended");
            let _ = send.write_all(&error_frame(r)).await;
        }
    }
    let _ = send.shutdown().await;
    send
}

fn error_frame(r: Refusal) -> Vec<u8> {
    wire::encode_frame(&Response::Error {
        code: r.code,
        message: r.message,
    })
    .unwrap_or_default()
}

/// The session's reading half: each append checked and read, then queued for the
/// writer; `Ok` when the client finished the stream.
async fn read_appends<R>(
    ctx: &Ctx<'_>,
    s: &Session<'_>,
    recv: &mut R,
    jobs: &tokio::sync::mpsc::Sender<Job>,
    body_idle: Duration,
    shutting_down: &impl Fn() -> bool,
) -> Result<(), Refusal>
where
    R: tokio::io::AsyncRead + Unpin + Send,
{
    use tokio::io::AsyncReadExt;
    let mut last_segment: Option<SegmentName> = None;
    loop {
        // The announcement's length prefix: an idle session waits here for ever, but
        // not through a shutdown (AsyncReadExt::read is cancel-safe).
        let mut prefix = [0u8; 4];
        let mut got = 0;
        while got < 4 {
            tokio::select! {
                n = recv.read(&mut prefix[got..]) => {
                    let n = n.map_err(|e| Refusal::invalid(format!("stream session: {e}")))?;
                    if n == 0 {
                        return if got == 0 { Ok(()) } else {
                            Err(Refusal::invalid("stream session: the stream ended inside a frame"))
                        };
                    }
                    got += n;
                }
                _ = tokio::time::sleep(Duration::from_millis(250)) => {
                    if shutting_down() {
                        return Err(Refusal::new(ErrorCode::Unavailable, "archived is shutting down; reconnect shortly"));
                    }
                }
            }
        }
        let len = wire::frame_len(prefix).map_err(|e| Refusal::invalid(e.to_string()))?;
        if len > SESSION_FRAME_MAX {
            return Err(Refusal::invalid(format!(
                "stream session: a frame of {len} bytes (appends are announced in at most {SESSION_FRAME_MAX})"
            )));
        }
        let mut payload = vec![0u8; len];
        tokio::time::timeout(body_idle, recv.read_exact(&mut payload))
            .await
            .map_err(|_| Refusal::invalid("stream session: a frame stalled"))?
            .map_err(|e| Refusal::invalid(format!("stream session: {e}")))?;
        let request: Request =
            wire::decode_frame(&payload).map_err(|e| Refusal::invalid(e.to_string()))?;
        let Some(a) = Append::of(&request) else {
            return Err(Refusal::invalid(format!(
                "stream session: {} where only stream appends may follow",
                request.op()
            )));
        };
        if a.cluster != s.cluster
            || a.system_identifier != s.system_identifier
            || a.segment_size != s.segment_size
        {
            return Err(Refusal::invalid(format!(
                "stream session of cluster '{}' (system {}, {} byte segments): an append for cluster '{}' (system {}, {} byte segments)",
                s.cluster, s.system_identifier, s.segment_size, a.cluster, a.system_identifier, a.segment_size
            )));
        }
        let (segment, offset, len, segment_size) = (a.segment, a.offset, a.len, a.segment_size);
        if let Some(end) = a.server_wal_end {
            ctx.archive.streams.note_server_end(s.cluster, end);
        }
        // Once announced, an append (its memory and its body) must come within the idle
        // deadline.
        let mut body = (&mut *recv).take(len);
        let job = tokio::time::timeout(body_idle, receive(ctx, &a, &mut body))
            .await
            .map_err(|_| {
                Refusal::invalid(format!(
                    "stream session: the append of {segment} at offset {offset} stalled for {} s",
                    body_idle.as_secs()
                ))
            })??;
        let name = parse_segment(segment)?;
        if last_segment != Some(name) {
            last_segment = Some(name);
            prepare_next(&ctx.archive.streams, s.cluster, &name, segment_size);
        }
        if jobs.send(job).await.is_err() {
            // The writer stopped on a failed append: its answer says why.
            return Ok(());
        }
    }
}

/// The session's writing half (a blocking thread): each burst of queued jobs applied
/// and answered on `send` (`StreamAcked`, or the refusal that ends the session). Returns
/// the stream, and whether the session's end was answered.
fn write_bursts<W>(
    mut queued: tokio::sync::mpsc::Receiver<Job>,
    mut send: W,
    wake: Arc<tokio::sync::Notify>,
    cluster: &str,
    runtime: &tokio::runtime::Handle,
) -> (W, bool)
where
    W: tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::AsyncWriteExt;
    let mut durable: u64 = 0;
    while let Some(first) = queued.blocking_recv() {
        let mut burst = vec![first];
        while burst.len() < BATCH_MAX {
            match queued.try_recv() {
                Ok(job) => burst.push(job),
                Err(_) => break,
            }
        }
        let applied = apply(burst);
        if applied.complete {
            wake.notify_one();
        }
        if applied.durable > 0 {
            durable += applied.durable as u64;
            let frame = wire::encode_frame(&Response::StreamAcked { appends: durable })
                .expect("a small frame");
            if runtime.block_on(send.write_all(&frame)).is_err() {
                return (send, true);
            }
        }
        if let Some(r) = applied.failed {
            tracing::warn!(%cluster, code = ?r.code, message = %r.message, "stream append refused; session ended");
            let _ = runtime.block_on(send.write_all(&error_frame(r)));
            return (send, true);
        }
    }
    (send, false)
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
        written: held,
        zero_from: held,
        uploaded: 0,
        done: false,
    })
}

enum WriteError {
    /// A byte the file holds (not zero) differs, at this offset.
    Conflict(u64),
    Io(anyhow::Error),
}

/// What is known of the file where an append goes.
#[derive(Clone, Copy)]
struct Fresh {
    /// Nothing was ever written there: zeros, nothing to compare.
    zeros: bool,
    /// It reaches past what is written (or what a failed sync left unwritten): write it
    /// even where the file already shows the same bytes.
    must_write: bool,
}

/// Compares `bytes` with what the file holds at `offset` and writes them (no sync);
/// `true` when it wrote.
fn write_compared(
    file: &std::fs::File,
    offset: u64,
    bytes: &[u8],
    name: &str,
    fresh: Fresh,
) -> Result<bool, WriteError> {
    let io = |e: std::io::Error| {
        WriteError::Io(anyhow::Error::new(e).context(format!("writing {name}")))
    };
    if !fresh.zeros {
        let mut have = vec![0u8; bytes.len()];
        file.read_exact_at(&mut have, offset).map_err(io)?;
        if let Some(i) = have
            .iter()
            .zip(bytes)
            .position(|(&old, &new)| old != 0 && old != new)
        {
            return Err(WriteError::Conflict(offset + i as u64));
        }
        if have == bytes && !fresh.must_write {
            return Ok(false);
        }
    }
    file.write_all_at(bytes, offset).map_err(io)?;
    Ok(true)
}

/// fdatasync; in tests, fails once for a file a test armed (`tests::fail_next_sync`).
fn sync_data(file: &std::fs::File) -> std::io::Result<()> {
    #[cfg(test)]
    tests::injected_sync_failure(file)?;
    file.sync_data()
}

/// `StreamSeal`: the timeline ended inside `segment`; what is held is stored now and
/// stays as the timeline's last streamed segment.
pub(crate) async fn seal(ctx: &Ctx<'_>, cluster: &str, segment: &str) -> Reply {
    ctx.require_writer("stream WAL")?;
    let segment = parse_segment(segment)?;
    if let Some(slot) = ctx.archive.streams.existing(cluster, &segment) {
        upload(ctx.archive, cluster, &segment, &slot)
            .await
            .map_err(Refusal::internal)?;
        // The timeline ends in this segment: the next one's file, prepared ahead and
        // holding only zeros, will never be written on this timeline.
        let size = ctx.index.segment_size(cluster).map_err(Refusal::internal)?;
        ctx.archive
            .streams
            .drop_prepared(cluster, &segment.next(size))
            .await
            .map_err(Refusal::internal)?;
    }
    Ok(Response::Stored {
        already_present: false,
    })
}

/// The full, zero-padded content of a local file, compressed, with its blake3.
/// Only the first `held` bytes are taken (what follows may be written and not yet
/// synced: it is not acknowledged, so it is not served).
fn snapshot(file: &std::fs::File, size: u32, held: u64) -> Result<(Vec<u8>, [u8; 32])> {
    let mut raw = vec![0u8; size as usize];
    file.read_exact_at(&mut raw, 0)?;
    compressed(raw, held)
}

/// `raw` with every byte from `held` on zeroed, compressed, and its blake3.
fn compressed(mut raw: Vec<u8>, held: u64) -> Result<(Vec<u8>, [u8; 32])> {
    let from = (held as usize).min(raw.len());
    raw[from..].fill(0);
    let hash = *blake3::hash(&raw).as_bytes();
    let mut encoder = Encoder::new(LEVEL)?;
    let mut out = Vec::new();
    encoder.write(&raw, &mut out)?;
    encoder.finish(&mut out)?;
    Ok((out, hash))
}

/// The answer of an unfinished segment: `frame` (of the zero-padded segment, blake3
/// `hash`) holding `held` bytes of WAL, its memory held by `grant` until sent.
fn padded_answer(
    size: u32,
    (frame, hash): (Bytes, [u8; 32]),
    held: u64,
    grant: Grant,
    what: String,
) -> Streamed {
    let compressed_size = frame.len() as u64;
    let body = futures::stream::iter([Ok(frame)]);
    Streamed {
        response: Response::Object {
            raw_size: u64::from(size),
            blake3: hex::encode(hash),
            compressed_size,
            partial_bytes: Some(held),
        },
        body: super::holding(Box::pin(body), grant),
        what,
    }
}

/// Stores what `slot` holds as a new upload (when it grew) and deletes the older ones.
/// The slot is locked only to read and to record: appends go on meanwhile.
async fn upload(
    archive: &Archive,
    cluster: &str,
    segment: &SegmentName,
    slot: &Slot,
) -> Result<()> {
    let _one = archive.streams.uploading.lock().await;
    let (held, file, size) = {
        let guard = slot.lock().await;
        let Some(p) = guard.as_ref().filter(|p| !p.done && p.held > p.uploaded) else {
            return Ok(());
        };
        (p.held, p.file.try_clone()?, p.segment_size)
    };
    let (frame, hash) = tokio::task::spawn_blocking(move || snapshot(&file, size, held)).await??;
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
    if let Some(p) = slot.lock().await.as_mut() {
        p.uploaded = p.uploaded.max(held);
    }
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
    let (frame, hash) =
        tokio::task::spawn_blocking(move || snapshot(&file, size, u64::from(size))).await??;
    let identity = ClientIdentity {
        cluster: cluster.to_string(),
        role: Role::Admin,
        serial: String::new(),
    };
    let ctx = archive.ctx(&identity);
    let name = segment.to_string();
    let blake3 = hex::encode(hash);
    let upload = WalUpload {
        cluster,
        name: &name,
        raw_size: u64::from(size),
        blake3: &blake3,
        request: None,
        via: Some("archived: the streaming receiver's segment, complete"),
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
    for ((cluster, segment), slot) in streams.all() {
        let full = {
            let guard = slot.lock().await;
            match guard.as_ref() {
                Some(p) if !p.done => p.held == u64::from(p.segment_size),
                _ => continue,
            }
        };
        let result = if full {
            // Once complete, nothing appends to it: it may stay locked while stored.
            let mut guard = slot.lock().await;
            match guard.as_mut() {
                Some(p) if !p.done => complete(archive, &cluster, &segment, p).await,
                _ => Ok(()),
            }
        } else {
            upload(archive, &cluster, &segment, &slot).await
        };
        if let Err(e) = result {
            tracing::error!(%cluster, %segment, error = %format!("{e:#}"), "streamed segment: will retry");
        }
        if slot.lock().await.as_ref().is_some_and(|p| p.done) {
            streams.forget(&cluster, &segment);
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
        if let Some(p) = guard.as_ref().filter(|p| p.holds_wal()) {
            let held = p.held;
            let size = p.segment_size;
            let file = match p.file.try_clone() {
                Ok(f) => f,
                Err(e) => return Some(Err(Refusal::internal(e.into()))),
            };
            drop(guard);
            let streams = &ctx.archive.streams;
            let what = format!("the unfinished {segment} ({held} bytes)");
            // Made before for these bytes: its memory is the cache's, not a request's.
            if let Some(a) = streams.answer(cluster, segment, held) {
                let grant = match ctx.budget.body(0, &what).await {
                    Ok(g) => g,
                    Err(r) => return Some(Err(r)),
                };
                return Some(Ok(padded_answer(
                    size,
                    (a.frame, a.hash),
                    held,
                    grant,
                    what,
                )));
            }
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
            let made = tokio::task::spawn_blocking(move || snapshot(&file, size, held)).await;
            let (frame, hash) = match made {
                Ok(Ok(v)) => v,
                Ok(Err(e)) => return Some(Err(Refusal::internal(e))),
                Err(e) => return Some(Err(Refusal::internal(e.into()))),
            };
            let frame = Bytes::from(frame);
            streams
                .answers_made
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            streams.keep_answer(
                cluster,
                segment,
                Snapshot {
                    held,
                    frame: frame.clone(),
                    hash,
                },
            );
            return Some(Ok(padded_answer(size, (frame, hash), held, grant, what)));
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

/// The bytes of WAL the streaming receiver holds of `segment` (this archived's file, else
/// the newest upload), if any.
async fn streamed_bytes(ctx: &Ctx<'_>, cluster: &str, segment: &SegmentName) -> Result<u64> {
    if let Some(slot) = ctx.archive.streams.existing(cluster, segment) {
        if let Some(p) = slot.lock().await.as_ref().filter(|p| p.holds_wal()) {
            return Ok(p.held);
        }
    }
    Ok(newest_upload(ctx, cluster, segment)
        .await?
        .map_or(0, |(_, held)| held))
}

/// How many WAL history files after a timeline are searched for its switchpoint.
const HISTORY_SEARCH: u32 = 64;

/// A `<segment>.partial` in the archive (a promoted standby's `archive_command` stores
/// the end of its old timeline so) and how many of its bytes are WAL of that timeline: up
/// to the switchpoint a later timeline's history file in the archive gives. The rest of
/// such a file may hold recycled bytes. `None` without the file or without a history
/// that says where the timeline ended.
async fn archived_partial(
    ctx: &Ctx<'_>,
    cluster: &str,
    segment: &SegmentName,
    segment_size: u32,
) -> Result<Option<(String, u64)>> {
    let partial = WalFileName::Partial(*segment);
    if ctx.index.wal(cluster, &partial)?.is_none() {
        return Ok(None);
    }
    let start = segment.start_lsn(segment_size).0;
    for t in segment.timeline.0 + 1..=segment.timeline.0.saturating_add(HISTORY_SEARCH) {
        let name = WalFileName::History(walvault_protocol::core::pg::wal::TimelineId(t));
        if ctx.index.wal(cluster, &name)?.is_none() {
            continue;
        }
        let key = layout::wal_key(cluster, &name);
        let Some((raw, _)) = ctx
            .store
            .read_verified(&key, "history file", MAX_OBJECT_SIZE)
            .await?
        else {
            continue;
        };
        let text = String::from_utf8_lossy(&raw);
        let Ok(history) = TimelineHistory::parse(&text) else {
            continue;
        };
        if let Some(e) = history
            .entries
            .iter()
            .find(|e| e.timeline == segment.timeline)
        {
            let valid = e
                .switchpoint
                .0
                .saturating_sub(start)
                .min(u64::from(segment_size));
            return Ok(Some((layout::wal_key(cluster, &partial), valid)));
        }
    }
    Ok(None)
}

/// `GetWal` of a segment without a complete object, where the archive holds both the
/// receiver's unfinished segment and a `.partial` from `archive_command`: whichever holds
/// more WAL of the segment's timeline is served (the `.partial` zero-padded past its
/// timeline's switchpoint), marked with `partial_bytes` either way. `None`: neither.
pub(crate) async fn unfinished_object(
    ctx: &Ctx<'_>,
    cluster: &str,
    segment: &SegmentName,
) -> Option<StreamReply> {
    let size = match ctx.index.binding(cluster) {
        Ok(Some(b)) => b.wal_segment_size,
        Ok(None) => return None,
        Err(e) => return Some(Err(Refusal::internal(e))),
    };
    let archived = match archived_partial(ctx, cluster, segment, size).await {
        Ok(a) => a.filter(|(_, valid)| *valid > 0),
        Err(e) => return Some(Err(Refusal::internal(e))),
    };
    let Some((key, valid)) = archived else {
        return partial_object(ctx, cluster, segment).await;
    };
    match streamed_bytes(ctx, cluster, segment).await {
        Ok(streamed) if streamed >= valid => return partial_object(ctx, cluster, segment).await,
        Ok(_) => {}
        Err(e) => return Some(Err(Refusal::internal(e))),
    }
    let grant = match ctx
        .budget
        .body(2 * u64::from(size), &format!("sending {key}"))
        .await
    {
        Ok(g) => g,
        Err(r) => return Some(Err(r)),
    };
    let raw = match ctx
        .store
        .read_verified(&key, "partial segment", MAX_OBJECT_SIZE)
        .await
    {
        Ok(Some((raw, _))) if raw.len() == size as usize => raw,
        Ok(_) => return partial_object(ctx, cluster, segment).await,
        Err(e) => return Some(Err(Refusal::internal(e))),
    };
    let made = match tokio::task::spawn_blocking(move || compressed(raw, valid)).await {
        Ok(Ok((frame, hash))) => (Bytes::from(frame), hash),
        Ok(Err(e)) => return Some(Err(Refusal::internal(e))),
        Err(e) => return Some(Err(Refusal::internal(e.into()))),
    };
    let what = format!("{segment}.partial up to its timeline's end ({valid} bytes)");
    Some(Ok(padded_answer(size, made, valid, grant, what)))
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
        // A prepared file that holds nothing yet is no unfinished segment.
        if let Some(p) = slot.lock().await.as_ref().filter(|p| p.holds_wal()) {
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
            server_wal_end: None,
        };
        append(&ctx, &a, &mut &bytes[..]).await
    }

    /// Files whose next fdatasync fails (device and inode), armed by [`fail_next_sync`].
    static ARMED_SYNC_FAILURES: std::sync::Mutex<Vec<(u64, u64)>> =
        std::sync::Mutex::new(Vec::new());

    /// The next fdatasync of the file at `path` fails, as one on a failing disk does.
    pub(super) fn fail_next_sync(path: &Path) {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path).unwrap();
        ARMED_SYNC_FAILURES.lock().unwrap().push((m.dev(), m.ino()));
    }

    pub(super) fn injected_sync_failure(file: &std::fs::File) -> std::io::Result<()> {
        use std::os::unix::fs::MetadataExt;
        let m = file.metadata()?;
        let mut armed = ARMED_SYNC_FAILURES.lock().unwrap();
        if let Some(i) = armed.iter().position(|&k| k == (m.dev(), m.ino())) {
            armed.remove(i);
            return Err(std::io::Error::other("injected fdatasync failure"));
        }
        Ok(())
    }

    #[tokio::test]
    async fn after_a_failed_fdatasync_the_unsynced_appends_are_written_again() {
        let t = TestArchive::new();
        let (name, raw) = wal(9);
        send(&t, &name, 0, &raw[..50_000], SYSID).await.unwrap();
        let seg = parse_segment(&name).unwrap();
        fail_next_sync(&t.archive.streams.path("main", &seg));
        let failed = send(&t, &name, 50_000, &raw[50_000..90_000], SYSID).await;
        assert!(
            matches!(&failed, Err(r) if r.code == ErrorCode::Internal && r.message.contains("fdatasync")),
            "{failed:?}"
        );
        // Not acknowledged, not served, and not taken as written: the page cache shows
        // the bytes, but the failed sync may have dropped them from the disk's way.
        let (got, held) = get(&t, &name).await.unwrap();
        assert_eq!(held, Some(50_000));
        assert_padded(&got, &raw, 50_000);
        {
            let slot = t.archive.streams.existing("main", &seg).unwrap();
            let guard = slot.lock().await;
            let p = guard.as_ref().unwrap();
            assert_eq!((p.held, p.written), (50_000, 50_000));
            assert_eq!(
                p.zero_from, 90_000,
                "the file is no longer known zero there"
            );
        }
        // The reconnected receiver streams the segment again from its start: the part
        // the failed sync covered is written again (write_compared's must_write), synced
        // and acknowledged.
        let again = send(&t, &name, 0, &raw[..90_000], SYSID).await;
        assert!(
            matches!(
                again,
                Ok(Response::StreamFlushed {
                    flushed: 90_000,
                    ..
                })
            ),
            "{again:?}"
        );
        let (got, held) = get(&t, &name).await.unwrap();
        assert_eq!(held, Some(90_000));
        assert_padded(&got, &raw, 90_000);
    }

    #[test]
    fn a_resend_is_compared_and_written_only_where_it_must_be() {
        let dir = tempfile::tempdir().unwrap();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("seg"))
            .unwrap();
        file.set_len(64).unwrap();
        let fresh = |zeros, must_write| Fresh { zeros, must_write };
        let w = |offset, bytes: &[u8], f| match write_compared(&file, offset, bytes, "seg", f) {
            Ok(wrote) => Some(wrote),
            Err(WriteError::Conflict(_)) => None,
            Err(WriteError::Io(e)) => panic!("{e:#}"),
        };
        assert_eq!(w(0, b"abcd", fresh(true, true)), Some(true));
        // The same bytes again: nothing to write, unless a failed sync made it a must.
        assert_eq!(w(0, b"abcd", fresh(false, false)), Some(false));
        assert_eq!(w(0, b"abcd", fresh(false, true)), Some(true));
        // Zeros in the file are not yet written; other bytes are a conflict.
        assert_eq!(w(2, b"cdef", fresh(false, true)), Some(true));
        assert_eq!(w(0, b"abXd", fresh(false, true)), None);
        let mut got = [0u8; 6];
        file.read_exact_at(&mut got, 0).unwrap();
        assert_eq!(&got, b"abcdef");
    }

    /// `got` is the first `held` bytes of `raw`, then zeros.
    fn assert_padded(got: &[u8], raw: &[u8], held: usize) {
        assert_eq!(&got[..held], &raw[..held], "the held bytes differ");
        assert!(
            got[held..].iter().all(|&b| b == 0),
            "bytes past the {held} held are not zero"
        );
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
        assert_padded(&got, &raw, cut);
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
            server_wal_end: None,
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

    /// Every answer is an acknowledgement, and they count up to `appends`, never beyond.
    fn assert_acks_count_up_to(answers: &[Response], appends: u64) {
        let counts: Vec<u64> = answers
            .iter()
            .map(|a| match a {
                Response::StreamAcked { appends } => *appends,
                other => panic!("unexpected answer {other:?} in {answers:?}"),
            })
            .collect();
        assert!(counts.windows(2).all(|w| w[0] < w[1]), "{counts:?}");
        assert_eq!(counts.last(), Some(&appends), "{counts:?}");
    }

    /// A session of cluster `main`, system `SYSID`.
    const MAIN_SESSION: Session<'static> = Session {
        cluster: "main",
        system_identifier: SYSID,
        segment_size: SEG,
    };

    /// The answer frames a session wrote.
    fn answers_in(out: &[u8]) -> Vec<Response> {
        let mut answers = Vec::new();
        let mut at = 0;
        while at < out.len() {
            let len = wire::frame_len(out[at..at + 4].try_into().unwrap()).unwrap();
            answers.push(wire::decode_frame(&out[at + 4..at + 4 + len]).unwrap());
            at += 4 + len;
        }
        answers
    }

    /// A session's client side: frames of `appends` (offset, length of `raw`), then FIN.
    fn session_input(name: &str, appends: &[(u64, &[u8])]) -> Vec<u8> {
        let mut input = Vec::new();
        for (offset, bytes) in appends {
            input.extend(
                wire::encode_frame(&Request::StreamAppend {
                    cluster: "main".into(),
                    segment: name.into(),
                    offset: *offset,
                    len: bytes.len() as u64,
                    system_identifier: SYSID,
                    segment_size: SEG,
                    // The server is a segment ahead of each append.
                    server_wal_end: Some(u64::from(SEG) * 2 + offset + bytes.len() as u64),
                })
                .unwrap(),
            );
            input.extend_from_slice(bytes);
        }
        input
    }

    /// Runs a session (of `role`, for system `sysid`) over `input` and returns the
    /// archive's answers.
    async fn run_session(t: &TestArchive, role: Role, sysid: u64, input: Vec<u8>) -> Vec<Response> {
        let id = identity(role);
        let ctx = t.archive.ctx(&id);
        let s = Session {
            cluster: "main",
            system_identifier: sysid,
            segment_size: SEG,
        };
        let mut recv: &[u8] = &input;
        let out = session(
            &ctx,
            &s,
            &mut recv,
            Vec::new(),
            Duration::from_secs(5),
            || false,
        )
        .await;
        answers_in(&out)
    }

    #[tokio::test]
    async fn a_session_acknowledges_appends_in_order_once_synced() {
        let t = TestArchive::new();
        let (name, raw) = wal(3);
        let cuts = [0usize, 9000, 9100, 200_000, 500_000];
        let appends: Vec<(u64, &[u8])> = cuts
            .windows(2)
            .map(|w| (w[0] as u64, &raw[w[0]..w[1]]))
            .collect();
        let answers = run_session(&t, Role::Push, SYSID, session_input(&name, &appends)).await;
        // Acknowledgements count up to every append, never beyond.
        assert_acks_count_up_to(&answers, 4);
        let (got, held) = get(&t, &name).await.unwrap();
        assert_eq!(held, Some(500_000));
        assert_eq!(&got[..500_000], &raw[..500_000]);
        // Where the server's WAL ended, as the newest append reported it (/metrics).
        assert_eq!(
            t.archive.streams.server_ends().get("main"),
            Some(&(u64::from(SEG) * 2 + 500_000))
        );
        // The next segment's file is prepared in the background, and not listed.
        let (next, _) = wal(4);
        let next_seg = match next.parse::<WalFileName>().unwrap() {
            WalFileName::Segment(s) => s,
            _ => unreachable!(),
        };
        let path = t.archive.streams.path("main", &next_seg);
        for _ in 0..200 {
            if path.exists() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(path.exists(), "{} was not prepared", path.display());
        let id = identity(Role::Pull);
        let ctx = t.archive.ctx(&id);
        assert_eq!(streamed(&ctx, "main").await.unwrap().len(), 1);
        // The timeline ends in this segment (the receiver seals it): the prepared next
        // file goes, the sealed segment stays served.
        let push = identity(Role::Push);
        let ctx = t.archive.ctx(&push);
        seal(&ctx, "main", &name).await.unwrap();
        assert!(!path.exists(), "{} stayed after the seal", path.display());
        assert!(t.archive.streams.existing("main", &next_seg).is_none());
        let (_, held) = get(&t, &name).await.unwrap();
        assert_eq!(held, Some(500_000));
    }

    /// Runs a session over a pipe the client writes `input` into in pieces of `piece`
    /// bytes (yielding between them), then keeps open for `hold` before closing.
    async fn run_session_in_pieces(
        t: &TestArchive,
        input: Vec<u8>,
        piece: usize,
        hold: Duration,
        body_idle: Duration,
    ) -> Vec<Response> {
        use tokio::io::AsyncWriteExt;
        let id = identity(Role::Push);
        let ctx = t.archive.ctx(&id);
        let s = MAIN_SESSION;
        let (mut client, mut server) = tokio::io::duplex(64 << 10);
        let writer = tokio::spawn(async move {
            for chunk in input.chunks(piece) {
                if client.write_all(chunk).await.is_err() {
                    return;
                }
                tokio::task::yield_now().await;
            }
            tokio::time::sleep(hold).await;
            let _ = client.shutdown().await;
        });
        let out = session(&ctx, &s, &mut server, Vec::new(), body_idle, || false).await;
        writer.abort();
        answers_in(&out)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn appends_that_arrive_in_pieces_are_taken_whole_and_all_acknowledged() {
        let t = TestArchive::new();
        let (name, raw) = wal(7);
        let cuts = [
            0usize, 8192, 8200, 40_000, 41_000, 300_000, 300_001, 600_000,
        ];
        let appends: Vec<(u64, &[u8])> = cuts
            .windows(2)
            .map(|w| (w[0] as u64, &raw[w[0]..w[1]]))
            .collect();
        // Pieces smaller than an announcement, and pieces that end inside bodies.
        for piece in [3usize, 1000, 65_537] {
            let input = session_input(&name, &appends);
            let answers =
                run_session_in_pieces(&t, input, piece, Duration::ZERO, Duration::from_secs(5))
                    .await;
            assert_acks_count_up_to(&answers, 7);
            let (got, held) = get(&t, &name).await.unwrap();
            assert_eq!(held, Some(600_000));
            assert_padded(&got, &raw, 600_000);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_session_whose_append_stops_halfway_ends_as_stalled_and_keeps_the_rest() {
        let t = TestArchive::new();
        let (name, raw) = wal(8);
        let mut input = session_input(
            &name,
            &[(0, &raw[..20_000]), (20_000, &raw[20_000..60_000])],
        );
        // The second body stops halfway; the client keeps its side open.
        input.truncate(input.len() - 20_000);
        let answers = run_session_in_pieces(
            &t,
            input,
            4096,
            Duration::from_secs(30),
            Duration::from_secs(1),
        )
        .await;
        assert!(
            matches!(answers.first(), Some(Response::StreamAcked { appends: 1 })),
            "{answers:?}"
        );
        let Some(Response::Error { code, message }) = answers.last() else {
            panic!("no refusal: {answers:?}");
        };
        assert_eq!(*code, ErrorCode::Invalid, "{message}");
        assert!(message.contains("stalled"), "{message}");
        let (got, held) = get(&t, &name).await.unwrap();
        assert_eq!(held, Some(20_000));
        assert_padded(&got, &raw, 20_000);
    }

    #[tokio::test]
    async fn a_refused_append_ends_the_session_after_the_acks_before_it() {
        let t = TestArchive::new();
        let (name, raw) = wal(5);
        send(&t, &name, 0, &raw[..100_000], SYSID).await.unwrap();
        let mut other = raw[100_000..150_000].to_vec();
        other[10] ^= 0xff;
        // Resent identical bytes, new bytes, then different bytes where the archive holds
        // some, then more: the last is never written.
        let mut first_again = raw[..100_000].to_vec();
        first_again.truncate(60_000);
        let appends: Vec<(u64, &[u8])> = vec![
            (0, &first_again),
            (100_000, &raw[100_000..150_000]),
            (100_000, &other),
            (150_000, &raw[150_000..200_000]),
        ];
        let answers = run_session(&t, Role::Push, SYSID, session_input(&name, &appends)).await;
        let Some(Response::Error { code, message }) = answers.last() else {
            panic!("no refusal: {answers:?}");
        };
        assert_eq!(*code, ErrorCode::Conflict, "{message}");
        let acked = answers
            .iter()
            .filter_map(|a| match a {
                Response::StreamAcked { appends } => Some(*appends),
                _ => None,
            })
            .max();
        assert_eq!(acked, Some(2), "{answers:?}");
        let (got, held) = get(&t, &name).await.unwrap();
        assert_eq!(held, Some(150_000));
        assert_padded(&got, &raw, 150_000);
    }

    #[tokio::test]
    async fn a_session_of_another_system_or_a_pull_certificate_is_refused() {
        let t = TestArchive::new();
        let (name, raw) = wal(6);
        send(&t, &name, 0, &raw[..10_000], SYSID).await.unwrap();
        for (role, sysid, want) in [
            (Role::Push, SYSID + 1, ErrorCode::WrongCluster),
            (Role::Pull, SYSID, ErrorCode::Unauthorized),
        ] {
            let input = session_input(&name, &[(10_000, &raw[10_000..20_000])]);
            let answers = run_session(&t, role, sysid, input).await;
            assert_eq!(answers.len(), 1, "{answers:?}");
            let answer = &answers[0];
            assert!(
                matches!(answer, Response::Error { code, .. } if *code == want),
                "{answer:?}"
            );
        }
        assert_eq!(get(&t, &name).await.unwrap().1, Some(10_000));
    }

    #[tokio::test]
    async fn an_idle_session_ends_when_archived_shuts_down() {
        let t = TestArchive::new();
        let id = identity(Role::Push);
        let ctx = t.archive.ctx(&id);
        let s = MAIN_SESSION;
        // The client sends nothing and keeps its side open.
        let (_client, mut server) = tokio::io::duplex(1024);
        let out = tokio::time::timeout(
            Duration::from_secs(10),
            session(
                &ctx,
                &s,
                &mut server,
                Vec::new(),
                Duration::from_secs(5),
                || true,
            ),
        )
        .await
        .expect("the session ends");
        let len = wire::frame_len(out[..4].try_into().unwrap()).unwrap();
        let answer: Response = wire::decode_frame(&out[4..4 + len]).unwrap();
        assert!(
            matches!(&answer, Response::Error { code, .. } if *code == ErrorCode::Unavailable),
            "{answer:?}"
        );
    }

    #[tokio::test]
    async fn a_restore_gets_whichever_of_the_streamed_segment_and_an_archived_partial_holds_more() {
        let t = TestArchive::new();
        // A promoted standby's archive_command stored the end of timeline 1 as
        // <segment>.partial (its tail recycled bytes), and timeline 2's history says
        // where timeline 1 ended: 256 KiB into segment 5.
        let (name, old_raw) = crate::service::tests::segment(5, SYSID, 0x77);
        crate::service::tests::push(&t, &format!("{name}.partial"), &old_raw)
            .await
            .unwrap();
        let switch = 5 * u64::from(SEG) + (256 << 10);
        let history = format!("1\t0/{switch:X}\tno recovery target specified\n");
        crate::service::tests::push(&t, "00000002.history", history.as_bytes())
            .await
            .unwrap();
        let (got, held) = get(&t, &name).await.unwrap();
        assert_eq!(held, Some(256 << 10));
        // The bytes past the switchpoint are not served.
        assert_padded(&got, &old_raw, 256 << 10);
        // The receiver holds less of the segment: the archived partial still wins.
        let (_, streamed_raw) = wal(5);
        send(&t, &name, 0, &streamed_raw[..100_000], SYSID)
            .await
            .unwrap();
        assert_eq!(get(&t, &name).await.unwrap().1, Some(256 << 10));
        // Once it holds more, the receiver's copy is served.
        send(&t, &name, 100_000, &streamed_raw[100_000..300_000], SYSID)
            .await
            .unwrap();
        let (got, held) = get(&t, &name).await.unwrap();
        assert_eq!(held, Some(300_000));
        assert_eq!(&got[..300_000], &streamed_raw[..300_000]);
        // Without a history that says where timeline 1 ended, the partial is not used.
        let t = TestArchive::new();
        crate::service::tests::push(&t, &format!("{name}.partial"), &old_raw)
            .await
            .unwrap();
        assert!(matches!(get(&t, &name).await, Err(r) if r.code == ErrorCode::NotFound));
    }

    #[tokio::test]
    async fn an_unfinished_segment_is_compressed_once_per_size_it_reaches() {
        let t = TestArchive::new();
        let (name, raw) = wal(7);
        send(&t, &name, 0, &raw[..100_000], SYSID).await.unwrap();
        let made = || {
            t.archive
                .streams
                .answers_made
                .load(std::sync::atomic::Ordering::Relaxed)
        };
        let first = get(&t, &name).await.unwrap();
        assert_eq!(made(), 1);
        // Asked again for the same bytes: the same answer, not made again.
        assert_eq!(get(&t, &name).await.unwrap(), first);
        assert_eq!(made(), 1);
        // Once it grew, the answer is made anew and holds the new bytes.
        send(&t, &name, 100_000, &raw[100_000..150_000], SYSID)
            .await
            .unwrap();
        let (got, held) = get(&t, &name).await.unwrap();
        assert_eq!(made(), 2);
        assert_eq!(held, Some(150_000));
        assert_padded(&got, &raw, 150_000);
    }

    #[tokio::test]
    async fn a_segment_file_that_holds_nothing_is_not_listed() {
        let t = TestArchive::new();
        let (name, raw) = wal(6);
        send(&t, &name, 0, &raw[..70_000], SYSID).await.unwrap();
        // The next segment's file, prepared but not yet written (zeros only).
        let (next, _) = wal(7);
        let next_seg = match next.parse::<WalFileName>().unwrap() {
            WalFileName::Segment(s) => s,
            _ => unreachable!(),
        };
        let path = t.archive.streams.path("main", &next_seg);
        let prepared = prepare_file(&path, u64::from(SEG)).unwrap();
        assert_eq!(prepared.held, 0);
        *t.archive.streams.slot("main", &next_seg).lock().await = Some(prepared);
        let id = identity(Role::Pull);
        let ctx = t.archive.ctx(&id);
        let listed = streamed(&ctx, "main").await.unwrap();
        assert_eq!(
            listed,
            vec![StreamedSegment {
                name: name.clone(),
                bytes: 70_000
            }]
        );
        assert!(matches!(get(&t, &next).await, Err(r) if r.code == ErrorCode::NotFound));
        // Nor after a restart finds both files again.
        t.archive.streams.slots.lock().unwrap().clear();
        assert_eq!(t.archive.streams.recover().unwrap(), 2);
        assert_eq!(streamed(&ctx, "main").await.unwrap(), listed);
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
