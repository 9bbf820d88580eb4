//! The prefaulter: warms the relation blocks replay is about to read.
//!
//! Spooled segments are decoded natively (no pg_waldump) into block references. Between
//! the replay position and `prefault_ahead_bytes` past it, each referenced block is
//! brought into the page cache with `posix_fadvise(WILLNEED)` (or a `pread`), by up to
//! `prefault_concurrency` threads (no more than the CPUs for `posix_fadvise`, which does
//! not wait for the read), unless:
//! - the record carries a full-page image of it (replay overwrites the page unread),
//! - it is WILL_INIT (replay initializes the page unread),
//! - it lies past the end of its file (replay extends the file),
//! - it was warmed recently, or an earlier record of the window carried its image,
//!   initialized it or extended its file (a bounded memory of recent blocks: replay has
//!   such a block in memory when it gets to the later record).
//!
//! One exception: when PostgreSQL's own `recovery_prefetch` is on, its prefetcher looks
//! `4 x maintenance_io_concurrency` block references ahead of replay and calls
//! `posix_fadvise` for every block not yet in shared buffers, including blocks whose image
//! is in a record it has decoded but replay has not applied yet. Each such call on a cold
//! block submits a read from the single startup process. Those blocks (a later reference
//! within that distance of the image or initialization, main fork only) are warmed too, so
//! PostgreSQL's call finds them in the page cache; `warmed_for_pg_prefetch` counts them.
//! The setting comes from the configuration files (see `pgconf`) and, once a connection
//! works, from `SHOW`.
//!
//! Blocks of one file closer than `prefault_merge_bytes` are warmed with one request
//! covering the gap (at most [`MAX_REQUEST_BYTES`]): a request costs a system call and an
//! I/O submission whatever its size, a few extra blocks of sequential read cost less.
//!
//! # Block to file
//!
//! ```text
//! tablespace 1664 (pg_global)   PGDATA/global/<rel>
//! tablespace 1663 (pg_default)  PGDATA/base/<db>/<rel>
//! any other tablespace <spc>    PGDATA/pg_tblspc/<spc>/PG_<major>_<catversion>/<db>/<rel>
//! fork                          "" (main), "_fsm", "_vm", "_init" appended to <rel>
//! 1 GiB segments                ".<blk / RELSEG_SIZE>" appended when non-zero
//! ```
//!
//! Block size, segment size (RELSEG_SIZE) and catalog version come from
//! `global/pg_control`, never assumed; PG_VERSION gives the major version.
//!
//! Files under PGDATA are held open in a small cache only while PostgreSQL runs
//! (`postmaster.pid` names a live process); the moment it stops they are all closed, so
//! the daemon never blocks an unmount or holds deleted relation files.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use serde::Serialize;
use walvault_protocol::core::pg::wal::{Lsn, SegmentName};
use walvault_protocol::core::pg::waldecode::{self, ForkNumber};
use walvault_protocol::net::config::{PrefaultMethod, PrefetchConfig};

use crate::pgconf;
use crate::pgcontrol::ControlFacts;

/// Files kept open at once.
const OPEN_FILES: usize = 128;
/// Blocks remembered as recently warmed.
const RECENT_BLOCKS: usize = 1 << 16;
/// First wait after PostgreSQL refused a connection; doubles up to the maximum.
const CONNECT_BACKOFF_MIN: std::time::Duration = std::time::Duration::from_millis(200);
const CONNECT_BACKOFF_MAX: std::time::Duration = std::time::Duration::from_secs(60);
/// Blocks handled per batch (a step runs batches up to the horizon).
const BLOCKS_PER_STEP: usize = 8192;
/// Largest single warming request after merging neighbouring blocks.
pub(crate) const MAX_REQUEST_BYTES: u64 = 1 << 20;
/// PostgreSQL's `XLOGPREFETCHER_DISTANCE_MULTIPLIER`: its prefetcher looks this many times
/// `maintenance_io_concurrency` block references ahead of replay.
const PG_DISTANCE_MULTIPLIER: u64 = 4;
/// `maintenance_io_concurrency`'s default.
const PG_DEFAULT_IO_CONCURRENCY: u64 = 10;

/// One block a record references, reduced to what prefaulting needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct WarmTarget {
    /// LSN of the referencing record.
    pub(crate) lsn: Lsn,
    /// Tablespace OID.
    pub(crate) spc: u32,
    /// Database OID.
    pub(crate) db: u32,
    /// relfilenode.
    pub(crate) rel: u32,
    /// Fork.
    pub(crate) fork: ForkNumber,
    /// Block number.
    pub(crate) block: u32,
    /// The record restores a full-page image of the block.
    pub(crate) fpw: bool,
    /// The record initializes the block.
    pub(crate) will_init: bool,
}

/// Prefault counters.
#[derive(Clone, Debug, Default, Serialize)]
pub(crate) struct PrefaultCounters {
    /// Segments decoded.
    pub(crate) segments_decoded: u64,
    /// Segments that failed to decode (their blocks are simply not warmed).
    pub(crate) decode_errors: u64,
    /// Blocks warmed.
    pub(crate) blocks_warmed: u64,
    /// Of those, blocks replay writes unread that were warmed only because PostgreSQL's
    /// own prefetch would otherwise read them (see the module header).
    pub(crate) warmed_for_pg_prefetch: u64,
    /// Read requests issued for the warmed blocks (neighbours merged).
    pub(crate) io_requests: u64,
    /// Skipped: full-page image in the record.
    pub(crate) skipped_fpw: u64,
    /// Skipped: WILL_INIT.
    pub(crate) skipped_will_init: u64,
    /// Skipped: past the end of the file.
    pub(crate) skipped_past_eof: u64,
    /// Skipped: warmed recently, or in memory since an earlier record (image, init,
    /// extension).
    pub(crate) skipped_recent: u64,
    /// Skipped: the file does not exist (yet).
    pub(crate) skipped_no_file: u64,
    /// Files under PGDATA open now.
    pub(crate) open_files: u64,
    /// WAL position up to which blocks have been considered.
    pub(crate) warmed_up_to: Option<String>,
    /// PostgreSQL's `recovery_prefetch` as far as the daemon knows it.
    pub(crate) pg_recovery_prefetch: Option<String>,
    /// Where that came from: `server` (SHOW), `files` (configuration files and command
    /// line) or `default` (set nowhere the daemon can read: PostgreSQL's default).
    pub(crate) pg_recovery_prefetch_source: Option<String>,
}

/// What the daemon knows of PostgreSQL.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct PgState {
    /// postmaster.pid names a live process.
    pub(crate) running: bool,
    /// `pg_last_wal_replay_lsn()`, when a connection works.
    pub(crate) replay_lsn: Option<Lsn>,
}

type BlockKey = (u32, u32, u32, ForkNumber, u32);

/// Why a block is remembered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mark {
    /// Warmed by the prefaulter, or past the end of its file (replay extends the file
    /// with it): later references need no read.
    Handled,
    /// Imaged or initialized by the record of this block-reference ordinal: replay writes
    /// it without reading it.
    Written(u64),
}

/// What the daemon knows of PostgreSQL's own recovery prefetch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct PgPrefetch {
    /// It runs (`recovery_prefetch` not off, `maintenance_io_concurrency` > 0).
    on: bool,
    /// How many block references it looks ahead of replay.
    lookahead_refs: u64,
}

impl PgPrefetch {
    /// From the two settings (None: PostgreSQL's default).
    fn from_settings(recovery_prefetch: Option<&str>, io_concurrency: Option<&str>) -> PgPrefetch {
        let off = recovery_prefetch.is_some_and(|v| {
            matches!(
                v.trim().to_ascii_lowercase().as_str(),
                "off" | "false" | "no" | "0" | "of" | "f" | "n"
            )
        });
        let mic = io_concurrency
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(PG_DEFAULT_IO_CONCURRENCY);
        PgPrefetch {
            on: !off && mic > 0,
            lookahead_refs: mic * PG_DISTANCE_MULTIPLIER,
        }
    }
}

struct OpenFile {
    file: Arc<File>,
    /// Length when last looked at (files only grow while replay runs; a block past it
    /// is looked at again before it is called past the end).
    len: u64,
}

struct Inner {
    files: HashMap<PathBuf, OpenFile>,
    file_order: VecDeque<PathBuf>,
    recent: HashMap<BlockKey, Mark>,
    recent_order: VecDeque<BlockKey>,
    /// Ordinal of the last block reference handled.
    ref_seq: u64,
    pg_prefetch: PgPrefetch,
    /// The setting came from the server (SHOW): files are not read again.
    pg_prefetch_from_server: bool,
    decoded: BTreeMap<SegmentName, Vec<WarmTarget>>,
    /// Targets of the current window not yet handled, and the LSN the window reached.
    done_up_to: Lsn,
    control: Option<ControlFacts>,
    tablespace_dirs: HashMap<u32, PathBuf>,
    counters: PrefaultCounters,
    pg_client: Option<tokio_postgres::Client>,
    /// No connection attempt before this.
    next_connect: std::time::Instant,
    connect_backoff: std::time::Duration,
}

/// The prefaulter of one data directory.
pub(crate) struct Prefaulter {
    pgdata: PathBuf,
    cfg: PrefetchConfig,
    inner: Arc<Mutex<Inner>>,
    running: Arc<AtomicBool>,
    busy: Arc<AtomicBool>,
}

fn lock(m: &Mutex<Inner>) -> std::sync::MutexGuard<'_, Inner> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Records PostgreSQL's recovery prefetch settings; warns the first time it is seen on.
fn learn_pg_prefetch(
    inner: &mut Inner,
    recovery_prefetch: &str,
    io_concurrency: Option<&str>,
    source: &str,
) {
    let was_on = inner.pg_prefetch.on;
    inner.pg_prefetch = PgPrefetch::from_settings(Some(recovery_prefetch), io_concurrency);
    inner.counters.pg_recovery_prefetch = Some(recovery_prefetch.to_string());
    inner.counters.pg_recovery_prefetch_source = Some(source.to_string());
    if inner.pg_prefetch.on && !was_on {
        tracing::warn!(
            recovery_prefetch = %recovery_prefetch,
            source,
            "PostgreSQL's own recovery prefetch is on beside walvault's prefaulter: during \
             archive recovery it only adds work (with full_page_writes on it also reads pages \
             replay overwrites, which walvault then warms first); set recovery_prefetch = off"
        );
    }
}

impl Inner {
    fn new() -> Inner {
        Inner {
            files: HashMap::new(),
            file_order: VecDeque::new(),
            recent: HashMap::new(),
            recent_order: VecDeque::new(),
            ref_seq: 0,
            // Read from the settings when PostgreSQL is first seen running (nothing is
            // warmed before that).
            pg_prefetch: PgPrefetch::from_settings(Some("off"), None),
            pg_prefetch_from_server: false,
            decoded: BTreeMap::new(),
            done_up_to: Lsn(0),
            control: None,
            tablespace_dirs: HashMap::new(),
            counters: PrefaultCounters::default(),
            pg_client: None,
            next_connect: std::time::Instant::now(),
            connect_backoff: CONNECT_BACKOFF_MIN,
        }
    }
}

impl Prefaulter {
    pub(crate) fn new(pgdata: &Path, cfg: &PrefetchConfig) -> Prefaulter {
        Prefaulter {
            pgdata: pgdata.to_path_buf(),
            cfg: cfg.clone(),
            inner: Arc::new(Mutex::new(Inner::new())),
            running: Arc::new(AtomicBool::new(false)),
            busy: Arc::new(AtomicBool::new(false)),
        }
    }

    pub(crate) fn counters(&self) -> PrefaultCounters {
        let inner = lock(&self.inner);
        let mut c = inner.counters.clone();
        c.open_files = inner.files.len() as u64;
        c
    }

    /// Closes every file under PGDATA.
    pub(crate) fn close_all(&self) {
        self.running.store(false, Ordering::SeqCst);
        let mut inner = lock(&self.inner);
        inner.files.clear();
        inner.file_order.clear();
        inner.pg_client = None;
    }

    /// Drops what was decoded of a segment that left the spool.
    pub(crate) fn forget(&self, name: &str) {
        if let Ok(walvault_protocol::core::pg::wal::WalFileName::Segment(seg)) = name.parse() {
            let mut inner = lock(&self.inner);
            // Keep the segment replay is in: its blocks may still be ahead.
            if inner.decoded.len() > 64 {
                inner.decoded.remove(&seg);
            }
        }
    }

    /// Is PostgreSQL running, and where is replay? Closes files when it stopped.
    pub(crate) async fn watch_postgres(&self, previous: PgState) -> PgState {
        let pid_file = read_postmaster_pid(&self.pgdata);
        let running = pid_file
            .as_ref()
            .map(|p| process_alive(p.pid))
            .unwrap_or(false);
        if !running {
            if previous.running || self.running.load(Ordering::SeqCst) {
                tracing::info!("PostgreSQL is not running; closed every file under PGDATA");
            }
            self.close_all();
            return PgState {
                running: false,
                replay_lsn: None,
            };
        }
        if !self.running.swap(true, Ordering::SeqCst) {
            // Files are read before the lock is taken: warming threads wait on it.
            let s = pgconf::read_settings(
                &self.pgdata,
                &["recovery_prefetch", "maintenance_io_concurrency"],
            );
            let mut inner = lock(&self.inner);
            if inner.control.is_none() {
                inner.control = ControlFacts::read(&self.pgdata)
                    .map_err(|e| tracing::warn!(error = %format!("{e:#}"), "cannot read pg_control; prefaulting waits"))
                    .ok();
            }
            if !inner.pg_prefetch_from_server {
                let (setting, source) = match s.get("recovery_prefetch") {
                    Some(v) => (v.as_str(), "files"),
                    None => ("try", "default"),
                };
                learn_pg_prefetch(
                    &mut inner,
                    setting,
                    s.get("maintenance_io_concurrency").map(String::as_str),
                    source,
                );
            }
        }
        let replay_lsn = match pid_file {
            Some(p) => self.replay_lsn(&p).await,
            None => None,
        };
        PgState {
            running: true,
            replay_lsn,
        }
    }

    async fn replay_lsn(&self, pid: &PostmasterPid) -> Option<Lsn> {
        let client = lock(&self.inner).pg_client.take();
        let client = match client {
            Some(c) if !c.is_closed() => c,
            _ => {
                // Every refused attempt is a FATAL line in PostgreSQL's log (not yet
                // consistent, hot_standby off): back off instead of trying every tick.
                {
                    let inner = lock(&self.inner);
                    if std::time::Instant::now() < inner.next_connect {
                        return None;
                    }
                }
                let socket_dir = pid.socket_dir.clone()?;
                let user = current_user_name()?;
                let mut config = tokio_postgres::Config::new();
                config
                    .host_path(socket_dir)
                    .port(pid.port)
                    .user(&user)
                    .dbname("postgres")
                    .application_name("walvault-prefetch")
                    .connect_timeout(std::time::Duration::from_millis(500));
                let (client, connection) = match config.connect(tokio_postgres::NoTls).await {
                    Ok(c) => {
                        lock(&self.inner).connect_backoff = CONNECT_BACKOFF_MIN;
                        c
                    }
                    Err(_) => {
                        let mut inner = lock(&self.inner);
                        inner.next_connect = std::time::Instant::now() + inner.connect_backoff;
                        inner.connect_backoff =
                            (inner.connect_backoff * 2).min(CONNECT_BACKOFF_MAX);
                        return None;
                    }
                };
                tokio::spawn(async move {
                    let _ = connection.await;
                });
                client
            }
        };
        if !lock(&self.inner).pg_prefetch_from_server {
            if let Some(rp) = show(&client, "recovery_prefetch").await {
                let mic = show(&client, "maintenance_io_concurrency").await;
                let mut inner = lock(&self.inner);
                inner.pg_prefetch_from_server = true;
                learn_pg_prefetch(&mut inner, &rp, mic.as_deref(), "server");
            }
        }
        let lsn = match client
            .query_one("SELECT pg_last_wal_replay_lsn()::text", &[])
            .await
        {
            Ok(row) => row
                .get::<_, Option<String>>(0)
                .and_then(|s| s.parse::<Lsn>().ok()),
            Err(_) => None,
        };
        if self.running.load(Ordering::SeqCst) {
            lock(&self.inner).pg_client = Some(client);
        }
        lsn
    }

    /// Decodes new spooled segments and warms the blocks of the window ahead of replay.
    pub(crate) fn step(
        &self,
        spool: &crate::spool::Spool,
        requested: SegmentName,
        seg_size: u32,
        pg: &PgState,
    ) {
        if !pg.running || self.busy.swap(true, Ordering::SeqCst) {
            return;
        }
        let start = requested.start_lsn(seg_size);
        let replay = match pg.replay_lsn {
            Some(l) if l > start && l.0 < start.0 + seg_size as u64 * 2 => l,
            _ => start,
        };
        let horizon = Lsn(replay.0 + self.cfg.prefault_ahead_bytes);
        let inner = self.inner.clone();
        let busy = self.busy.clone();
        let running = self.running.clone();
        let pgdata = self.pgdata.clone();
        let cfg = self.cfg.clone();
        let spool = spool.clone();
        tokio::task::spawn_blocking(move || {
            decode_window(&inner, &spool, requested, seg_size, horizon);
            // Everything up to the horizon, nearest first, in batches; a step that stopped
            // at one batch per tick fell behind replay (about 33k blocks/s).
            loop {
                let targets = pick_targets(&inner, replay, horizon);
                if targets.is_empty() || !running.load(Ordering::SeqCst) {
                    break;
                }
                warm(&inner, &running, &pgdata, &cfg, &targets);
            }
            busy.store(false, Ordering::SeqCst);
        });
    }
}

/// Decodes the spooled segments from `requested` up to `horizon` not decoded yet.
fn decode_window(
    inner: &Mutex<Inner>,
    spool: &crate::spool::Spool,
    requested: SegmentName,
    seg_size: u32,
    horizon: Lsn,
) {
    let mut seg = requested;
    loop {
        if seg.start_lsn(seg_size) > horizon {
            break;
        }
        let known = lock(inner).decoded.contains_key(&seg);
        if !known {
            // Only whole, verified segments: the data file appears after its hash.
            let name = seg.to_string();
            if !spool.hash_file(&name).exists() {
                if seg != requested {
                    break;
                }
            } else if let Ok(bytes) = std::fs::read(spool.segment(&name)) {
                let decoded = warm_targets(&bytes);
                let mut guard = lock(inner);
                match decoded {
                    Ok(targets) => {
                        guard.counters.segments_decoded += 1;
                        guard.decoded.insert(seg, targets);
                    }
                    Err(e) => {
                        guard.counters.decode_errors += 1;
                        guard.decoded.insert(seg, Vec::new());
                        tracing::warn!(segment = %name, error = %e, "cannot decode spooled segment; its blocks are not prefaulted");
                    }
                }
            }
        }
        seg = seg.next(seg_size);
    }
    // Forget segments replay has left behind.
    let mut guard = lock(inner);
    let stale: Vec<SegmentName> = guard
        .decoded
        .keys()
        .filter(|s| **s < requested)
        .copied()
        .collect();
    for s in stale {
        guard.decoded.remove(&s);
    }
}

/// The block references of one segment's records (records continued from the previous
/// segment are skipped; their blocks were handled with that segment when it was spooled).
pub(crate) fn warm_targets(bytes: &[u8]) -> Result<Vec<WarmTarget>, String> {
    // Records are turned into targets one at a time and dropped: memory stays at the
    // segment plus its targets, never a segment's worth of decoded records.
    let start = walvault_protocol::core::pg::wal::LongPageHeader::parse(bytes)
        .map_err(|e| e.to_string())?
        .page_address;
    let mut decoder = waldecode::WalDecoder::new(start).map_err(|e| e.to_string())?;
    decoder.feed(bytes);
    decoder.finish();
    let mut targets = Vec::new();
    loop {
        match decoder.next_record() {
            Ok(waldecode::Next::Record(r)) => targets.extend(r.blocks.iter().map(|b| WarmTarget {
                lsn: r.lsn,
                spc: b.rel.spc,
                db: b.rel.db,
                rel: b.rel.rel,
                fork: b.fork,
                block: b.block,
                fpw: b.image.is_some_and(|i| i.apply),
                will_init: b.will_init,
            })),
            Ok(_) => return Ok(targets),
            // Corruption mid-segment: what came before it is still worth warming.
            Err(e) if !targets.is_empty() => {
                tracing::warn!(error = %e, "decoding stopped early; warming what was decoded");
                return Ok(targets);
            }
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// Targets with replay < lsn <= horizon not handled yet, at most [`BLOCKS_PER_STEP`].
fn pick_targets(inner: &Mutex<Inner>, replay: Lsn, horizon: Lsn) -> Vec<WarmTarget> {
    let mut guard = lock(inner);
    let from = guard.done_up_to.max(replay);
    let mut out = Vec::new();
    let mut reached = from;
    'segments: for targets in guard.decoded.values() {
        for t in targets {
            if t.lsn <= from || t.lsn > horizon {
                continue;
            }
            if out.len() >= BLOCKS_PER_STEP && t.lsn > reached {
                break 'segments;
            }
            reached = reached.max(t.lsn);
            out.push(*t);
        }
    }
    if !out.is_empty() {
        guard.done_up_to = reached;
        guard.counters.warmed_up_to = Some(reached.to_string());
    }
    out
}

fn warm(
    inner: &Mutex<Inner>,
    running: &AtomicBool,
    pgdata: &Path,
    cfg: &PrefetchConfig,
    targets: &[WarmTarget],
) {
    // Filter under the lock (skips, recent memory), then do the I/O without it.
    let mut jobs: Vec<Job> = Vec::new();
    let mut for_pg_blocks = 0u64;
    {
        let mut guard = lock(inner);
        let Some(control) = guard.control.clone() else {
            return;
        };
        let bs = control.block_size as u64;
        for t in targets {
            guard.ref_seq += 1;
            let seq = guard.ref_seq;
            let key = (t.spc, t.db, t.rel, t.fork, t.block);
            // A block replay overwrites or initializes unread is in memory for the
            // records after it: remembered, so their references are not read either.
            if t.fpw || t.will_init {
                if t.fpw {
                    guard.counters.skipped_fpw += 1;
                } else {
                    guard.counters.skipped_will_init += 1;
                }
                remember(&mut guard, key, Mark::Written(seq));
                continue;
            }
            let mut for_pg = false;
            match guard.recent.get(&key).copied() {
                // ... unless PostgreSQL's prefetcher will see this reference before replay
                // applies the earlier record, and read the block itself.
                Some(Mark::Written(at))
                    if guard.pg_prefetch.on
                        && t.fork == ForkNumber::Main
                        && seq - at <= guard.pg_prefetch.lookahead_refs =>
                {
                    for_pg = true;
                }
                Some(_) => {
                    guard.counters.skipped_recent += 1;
                    continue;
                }
                None => {}
            }
            if !running.load(Ordering::SeqCst) {
                return;
            }
            let Some(path) = block_path(&mut guard, pgdata, &control, t) else {
                guard.counters.skipped_no_file += 1;
                continue;
            };
            let offset = (t.block % control.relseg_blocks) as u64 * bs;
            let Some(file) = open_cached(&mut guard, &path, offset + bs) else {
                guard.counters.skipped_no_file += 1;
                continue;
            };
            if file.len < offset + bs {
                // Replay extends the file with this block: later records find it in memory.
                guard.counters.skipped_past_eof += 1;
                remember(&mut guard, key, Mark::Handled);
                continue;
            }
            remember(&mut guard, key, Mark::Handled);
            for_pg_blocks += u64::from(for_pg);
            jobs.push(Job {
                file: file.file,
                offset,
                len: bs,
            });
        }
    }
    if jobs.is_empty() {
        return;
    }
    let blocks = jobs.len() as u64;
    let requests = merge_jobs(jobs, cfg.prefault_merge_bytes);
    let n_requests = requests.len() as u64;
    let method = cfg.prefault_method;
    let threads = warming_threads(method, cfg.prefault_concurrency).min(requests.len());
    std::thread::scope(|scope| {
        for part in requests.chunks(requests.len().div_ceil(threads)) {
            scope.spawn(move || read_ahead(method, part));
        }
    });
    let mut guard = lock(inner);
    // Counted together once the reads are issued: a status read meanwhile never shows
    // more blocks warmed for PostgreSQL's prefetch than blocks warmed.
    guard.counters.blocks_warmed += blocks;
    guard.counters.warmed_for_pg_prefetch += for_pg_blocks;
    guard.counters.io_requests += n_requests;
}

/// Threads that issue one batch of requests. A `pread` holds its thread until the data
/// is in, so threads are the reads in flight: `prefault_concurrency` of them. A
/// `posix_fadvise` only submits the read and returns; more threads than CPUs add CPU
/// time taken from replay (and thread start-ups per batch) without more reads in flight.
fn warming_threads(method: PrefaultMethod, concurrency: usize) -> usize {
    let concurrency = concurrency.max(1);
    match method {
        PrefaultMethod::Pread => concurrency,
        PrefaultMethod::Fadvise => concurrency.min(cpus()),
    }
}

/// CPUs this process may use, asked once (the answer reads cgroup files).
fn cpus() -> usize {
    static CPUS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *CPUS.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// One read request: a byte range of an open file.
struct Job {
    file: Arc<File>,
    offset: u64,
    len: u64,
}

/// Brings the requests' byte ranges into the page cache.
fn read_ahead(method: PrefaultMethod, jobs: &[Job]) {
    let mut buf = Vec::new();
    for job in jobs {
        match method {
            PrefaultMethod::Fadvise => {
                // SAFETY: fadvise on a descriptor we hold open.
                unsafe {
                    libc::posix_fadvise(
                        job.file.as_raw_fd(),
                        job.offset as i64,
                        job.len as i64,
                        libc::POSIX_FADV_WILLNEED,
                    );
                }
            }
            PrefaultMethod::Pread => {
                buf.resize(job.len as usize, 0);
                let _ = job.file.read_at(&mut buf, job.offset);
            }
        }
    }
}

/// Sorts requests by file and offset and merges those of one file whose gap is at most
/// `gap` bytes, up to [`MAX_REQUEST_BYTES`] per request.
fn merge_jobs(mut jobs: Vec<Job>, gap: u64) -> Vec<Job> {
    jobs.sort_by_key(|j| (Arc::as_ptr(&j.file) as usize, j.offset));
    let mut out: Vec<Job> = Vec::with_capacity(jobs.len());
    for j in jobs {
        if let Some(last) = out.last_mut() {
            let end = last.offset + last.len;
            if Arc::ptr_eq(&last.file, &j.file)
                && j.offset <= end + gap
                && (j.offset + j.len).max(end) - last.offset <= MAX_REQUEST_BYTES
            {
                last.len = (j.offset + j.len).max(end) - last.offset;
                continue;
            }
        }
        out.push(j);
    }
    out
}

fn remember(inner: &mut Inner, key: BlockKey, mark: Mark) {
    if inner.recent.insert(key, mark).is_none() {
        inner.recent_order.push_back(key);
        if inner.recent_order.len() > RECENT_BLOCKS {
            if let Some(old) = inner.recent_order.pop_front() {
                inner.recent.remove(&old);
            }
        }
    }
}

/// The open file at `path` and its length, looked at again when `need` bytes are more
/// than the length last seen.
fn open_cached(inner: &mut Inner, path: &Path, need: u64) -> Option<OpenFile> {
    if let Some(f) = inner.files.get_mut(path) {
        if f.len < need {
            f.len = f.file.metadata().map(|m| m.len()).unwrap_or(0);
        }
        return Some(OpenFile {
            file: f.file.clone(),
            len: f.len,
        });
    }
    let file = Arc::new(File::open(path).ok()?);
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    inner.files.insert(
        path.to_path_buf(),
        OpenFile {
            file: file.clone(),
            len,
        },
    );
    inner.file_order.push_back(path.to_path_buf());
    if inner.file_order.len() > OPEN_FILES {
        if let Some(old) = inner.file_order.pop_front() {
            inner.files.remove(&old);
        }
    }
    Some(OpenFile { file, len })
}

/// Path of the file holding a block (see the module header).
fn block_path(
    inner: &mut Inner,
    pgdata: &Path,
    control: &ControlFacts,
    t: &WarmTarget,
) -> Option<PathBuf> {
    let dir = match t.spc {
        1664 => pgdata.join("global"),
        1663 => pgdata.join("base").join(t.db.to_string()),
        spc => {
            let base = match inner.tablespace_dirs.get(&spc) {
                Some(b) => b.clone(),
                None => {
                    let b = pgdata
                        .join("pg_tblspc")
                        .join(spc.to_string())
                        .join(format!("PG_{}_{}", control.major, control.catalog_version));
                    inner.tablespace_dirs.insert(spc, b.clone());
                    b
                }
            };
            base.join(t.db.to_string())
        }
    };
    Some(dir.join(relation_file_name(
        t.rel,
        t.fork,
        t.block,
        control.relseg_blocks,
    )))
}

/// `<rel>[_fork][.segment]` for a block.
pub(crate) fn relation_file_name(
    rel: u32,
    fork: ForkNumber,
    block: u32,
    relseg_blocks: u32,
) -> String {
    let suffix = match fork {
        ForkNumber::Main => String::new(),
        other => format!("_{}", other.name()),
    };
    let segment = block / relseg_blocks.max(1);
    if segment == 0 {
        format!("{rel}{suffix}")
    } else {
        format!("{rel}{suffix}.{segment}")
    }
}

/// A setting as the server reports it (`SHOW`), or None when the query fails.
async fn show(client: &tokio_postgres::Client, name: &str) -> Option<String> {
    let row = client.query_one(&format!("SHOW {name}"), &[]).await.ok()?;
    row.try_get(0).ok()
}

struct PostmasterPid {
    pid: i32,
    port: u16,
    socket_dir: Option<PathBuf>,
}

/// `postmaster.pid`: line 1 PID, 4 port, 5 first socket directory.
fn read_postmaster_pid(pgdata: &Path) -> Option<PostmasterPid> {
    let text = std::fs::read_to_string(pgdata.join("postmaster.pid")).ok()?;
    let lines: Vec<&str> = text.lines().collect();
    let pid: i32 = lines.first()?.trim().parse().ok()?;
    let port: u16 = lines
        .get(3)
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or(5432);
    let socket_dir = lines
        .get(4)
        .map(|l| l.trim())
        .filter(|l| !l.is_empty())
        .map(PathBuf::from);
    Some(PostmasterPid {
        pid,
        port,
        socket_dir,
    })
}

fn process_alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    pid > 0
        && (unsafe { libc::kill(pid, 0) } == 0
            || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM))
}

fn current_user_name() -> Option<String> {
    // SAFETY: getpwuid returns a pointer into static storage or null; we copy at once.
    unsafe {
        let pw = libc::getpwuid(libc::getuid());
        if pw.is_null() {
            return None;
        }
        Some(
            std::ffi::CStr::from_ptr((*pw).pw_name)
                .to_string_lossy()
                .into_owned(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relation_file_names() {
        assert_eq!(
            relation_file_name(16384, ForkNumber::Main, 5, 131072),
            "16384"
        );
        assert_eq!(
            relation_file_name(16384, ForkNumber::Fsm, 5, 131072),
            "16384_fsm"
        );
        assert_eq!(
            relation_file_name(16384, ForkNumber::Vm, 131072, 131072),
            "16384_vm.1"
        );
        assert_eq!(
            relation_file_name(16384, ForkNumber::Init, 262145, 131072),
            "16384_init.2"
        );
    }

    /// Only block 2 is read: block 0's first reference carries its image and block 1's
    /// initializes it (so their later references find them in memory), block 9 lies past
    /// the end of the file (replay extends it) and is remembered the same way.
    #[test]
    fn blocks_replay_writes_unread_are_not_read_later() {
        let t = |lsn, block, fpw, will_init| WarmTarget {
            will_init,
            ..target(lsn, block, fpw)
        };
        let targets = [
            t(1, 0, true, false),
            t(2, 0, false, false),
            t(3, 1, false, true),
            t(4, 1, false, false),
            t(5, 2, false, false),
            t(6, 9, false, false),
            t(7, 9, false, false),
            t(8, 2, false, false),
        ];
        let (_dir, c) = warm_counters("off", 3, &PrefetchConfig::default(), &targets);
        assert_eq!(c.blocks_warmed, 1, "{c:?}");
        assert_eq!(c.skipped_fpw, 1, "{c:?}");
        assert_eq!(c.skipped_will_init, 1, "{c:?}");
        assert_eq!(c.skipped_past_eof, 1, "{c:?}");
        assert_eq!(c.skipped_recent, 4, "{c:?}");
    }

    /// A data directory with one relation file of `blocks` blocks, and PostgreSQL's
    /// recovery_prefetch as given (maintenance_io_concurrency 1: 4 references ahead).
    fn test_inner(pg_prefetch: &str, blocks: usize) -> (tempfile::TempDir, Mutex<Inner>) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("base/5")).unwrap();
        std::fs::write(dir.path().join("base/5/16384"), vec![0u8; blocks * 8192]).unwrap();
        let mut inner = Inner::new();
        inner.control = Some(ControlFacts {
            block_size: 8192,
            relseg_blocks: 131072,
            catalog_version: 202209061,
            major: 15,
        });
        learn_pg_prefetch(&mut inner, pg_prefetch, Some("1"), "files");
        (dir, Mutex::new(inner))
    }

    /// Counters after warming `targets` in a fresh [`test_inner`].
    fn warm_counters(
        pg_prefetch: &str,
        blocks: usize,
        cfg: &PrefetchConfig,
        targets: &[WarmTarget],
    ) -> (tempfile::TempDir, PrefaultCounters) {
        let (dir, inner) = test_inner(pg_prefetch, blocks);
        warm(&inner, &AtomicBool::new(true), dir.path(), cfg, targets);
        let c = lock(&inner).counters.clone();
        (dir, c)
    }

    fn target(lsn: u64, block: u32, fpw: bool) -> WarmTarget {
        WarmTarget {
            lsn: Lsn(lsn),
            spc: 1663,
            db: 5,
            rel: 16384,
            fork: ForkNumber::Main,
            block,
            fpw,
            will_init: false,
        }
    }

    /// With PostgreSQL's prefetch on (maintenance_io_concurrency 1: 4 references ahead),
    /// a later reference to an imaged block is warmed when it lies within that distance of
    /// the image (PostgreSQL would read the block itself), not when it lies further.
    #[test]
    fn blocks_postgres_prefetch_would_read_are_warmed_first() {
        let targets = [
            target(1, 0, true),
            target(2, 1, true),
            target(3, 0, false), // 2 references after block 0's image: PostgreSQL reads it
            target(4, 7, false),
            target(5, 8, false),
            target(6, 9, false),
            target(7, 1, false), // 5 after block 1's image: in shared buffers by then
            target(8, 0, false), // warmed already
        ];
        let cfg = PrefetchConfig {
            prefault_merge_bytes: 0,
            ..PrefetchConfig::default()
        };
        let (_dir, c) = warm_counters("try", 64, &cfg, &targets);
        assert_eq!(c.blocks_warmed, 4, "{c:?}");
        assert_eq!(c.warmed_for_pg_prefetch, 1, "{c:?}");
        assert_eq!(c.skipped_recent, 2, "{c:?}");
        // 7, 8 and 9 are adjacent: one request.
        assert_eq!(c.io_requests, 2, "{c:?}");
        // The same WAL with PostgreSQL's prefetch off: only never-touched blocks.
        let (_dir, c) = warm_counters("off", 64, &cfg, &targets);
        assert_eq!(c.blocks_warmed, 3, "{c:?}");
        assert_eq!(c.warmed_for_pg_prefetch, 0, "{c:?}");
        assert_eq!(c.skipped_recent, 3, "{c:?}");
    }

    /// preads wait for their data: one thread per read in flight. fadvise returns at
    /// submission: never more threads than CPUs, never fewer than one.
    #[test]
    fn warming_threads_by_method() {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert_eq!(warming_threads(PrefaultMethod::Pread, 16), 16);
        assert_eq!(warming_threads(PrefaultMethod::Pread, 0), 1);
        assert_eq!(warming_threads(PrefaultMethod::Fadvise, 1000), cpus);
        assert_eq!(warming_threads(PrefaultMethod::Fadvise, 1), 1);
        assert_eq!(warming_threads(PrefaultMethod::Fadvise, 0), 1);
    }

    /// Blocks 7, 8 and 9 (adjacent) and 12 (gap of two blocks) become one request with a
    /// 32 KiB merge distance; 40 is too far. Requests never exceed MAX_REQUEST_BYTES.
    #[test]
    fn neighbouring_blocks_are_read_with_one_request() {
        let targets = [
            target(1, 9, false),
            target(2, 7, false),
            target(3, 12, false),
            target(4, 8, false),
            target(5, 40, false),
        ];
        let (dir, c) = warm_counters("off", 64, &PrefetchConfig::default(), &targets);
        assert_eq!((c.blocks_warmed, c.io_requests), (5, 2), "{c:?}");

        let f = Arc::new(File::open(dir.path().join("base/5/16384")).unwrap());
        let jobs = (0..300u64)
            .map(|b| Job {
                file: f.clone(),
                offset: b * 8192,
                len: 8192,
            })
            .collect();
        let merged = merge_jobs(jobs, 32 << 10);
        assert!(merged.iter().all(|j| j.len <= MAX_REQUEST_BYTES));
        assert_eq!(merged.iter().map(|j| j.len).sum::<u64>(), 300 * 8192);
        assert_eq!(merged.len(), 3);
    }

    #[test]
    fn postgres_prefetch_settings() {
        let p = |rp: Option<&str>, mic: Option<&str>| PgPrefetch::from_settings(rp, mic);
        assert!(p(None, None).on);
        assert_eq!(p(None, None).lookahead_refs, 40);
        assert!(p(Some("try"), Some("20")).on);
        assert_eq!(p(Some("on"), Some("20")).lookahead_refs, 80);
        assert!(!p(Some("off"), None).on);
        assert!(!p(Some("OFF"), None).on);
        assert!(!p(Some("false"), None).on);
        assert!(!p(Some("try"), Some("0")).on);
    }

    #[test]
    fn block_paths_cover_tablespaces() {
        let control = ControlFacts {
            block_size: 8192,
            relseg_blocks: 131072,
            catalog_version: 202209061,
            major: 15,
        };
        let mut inner = Inner::new();
        let t = |spc, db, rel, fork, block| WarmTarget {
            lsn: Lsn(1),
            spc,
            db,
            rel,
            fork,
            block,
            fpw: false,
            will_init: false,
        };
        let pg = Path::new("/d");
        let p = |inner: &mut Inner, t: WarmTarget| block_path(inner, pg, &control, &t).unwrap();
        assert_eq!(
            p(&mut inner, t(1664, 0, 1262, ForkNumber::Main, 0)),
            PathBuf::from("/d/global/1262")
        );
        assert_eq!(
            p(&mut inner, t(1663, 5, 16384, ForkNumber::Main, 131073)),
            PathBuf::from("/d/base/5/16384.1")
        );
        assert_eq!(
            p(&mut inner, t(16400, 5, 16401, ForkNumber::Vm, 0)),
            PathBuf::from("/d/pg_tblspc/16400/PG_15_202209061/5/16401_vm")
        );
    }
}
