//! The prefaulter: warms the relation blocks replay is about to read.
//!
//! Spooled segments are decoded natively (no pg_waldump) into block references. Between
//! the replay position and `prefault_ahead_bytes` past it, each referenced block that
//! replay will read from disk is brought into the page cache before replay gets to it.
//!
//! - [`watch`]: is PostgreSQL running, where is replay, its settings and pg_control.
//! - [`plan`]: which references need a read (pure: full-page images, WILL_INIT, past the
//!   end of the file, recently warmed, PostgreSQL's own prefetch distance), and the
//!   window of decoded segments.
//! - [`files`]: the open relation files (block to file: `core::pg::relpath`, with block
//!   size, segment size and catalog version from `global/pg_control`, never assumed).
//! - [`warm`]: the reads (`posix_fadvise` or `pread`, merged, a few threads).
//!
//! `warmed_for_pg_prefetch` counts the blocks warmed only because PostgreSQL's own
//! `recovery_prefetch` would read them; the setting comes from the configuration files
//! (see `walvault_protocol::core::pg::conf`) and, once a connection works, from `SHOW`.
//!
//! Files under PGDATA are held open in a small cache only while PostgreSQL runs
//! (`postmaster.pid` names a live process); the moment the postmaster exits (a pidfd
//! event, see [`watch`]) they are all closed, so the daemon never blocks an unmount. A
//! file deleted under it is closed at the next step, one replaced (another device or
//! inode at its path) also makes the prefaulter forget what it warmed.
//!
//! Each life of PostgreSQL (a postmaster: pid, start time, the data directory's device
//! and inode) starts from nothing: a restore into the same directory replays WAL an
//! earlier life replayed, into other files, and must be warmed again. Counters go on
//! across lives (`postgres_starts` counts them).

mod files;
mod plan;
mod warm;
mod watch;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use serde::Serialize;
use walvault_protocol::core::pg::control::ControlFacts;
use walvault_protocol::core::pg::wal::{Lsn, SegmentName, WalFileName};
use walvault_protocol::net::config::PrefetchConfig;

use files::FileCache;
use plan::{PgPrefetch, Planner, Window};

/// First wait after PostgreSQL refused a connection; doubles up to the maximum.
const CONNECT_BACKOFF_MIN: std::time::Duration = std::time::Duration::from_millis(200);
const CONNECT_BACKOFF_MAX: std::time::Duration = std::time::Duration::from_secs(60);

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
    /// Lives of PostgreSQL seen (a new postmaster, or the data directory replaced): each
    /// starts with no memory of what was warmed or decoded before.
    pub(crate) postgres_starts: u64,
    /// Times a relation file open here was found replaced (another device or inode):
    /// what was warmed is forgotten, the WAL ahead is handed out again.
    pub(crate) files_replaced: u64,
    /// WAL position up to which blocks have been considered.
    pub(crate) warmed_up_to: Option<String>,
    /// PostgreSQL's `recovery_prefetch` as far as the daemon knows it.
    pub(crate) pg_recovery_prefetch: Option<String>,
    /// Where that came from: `server` (SHOW), `files` (configuration files and command
    /// line), `default` (set nowhere the daemon can read: PostgreSQL's default) or
    /// `version` (PostgreSQL 13 and 14 have no recovery prefetch).
    pub(crate) pg_recovery_prefetch_source: Option<String>,
    /// Why no block is warmed, when pg_control cannot be used (an unsupported PostgreSQL
    /// version, a damaged file).
    pub(crate) prefault_off_because: Option<String>,
}

/// What the daemon knows of PostgreSQL.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct PgState {
    /// postmaster.pid names a live process.
    pub(crate) running: bool,
    /// `pg_last_wal_replay_lsn()`, when a connection works.
    pub(crate) replay_lsn: Option<Lsn>,
}

struct Inner {
    files: FileCache,
    planner: Planner,
    /// The setting came from the server (SHOW): files are not read again.
    pg_prefetch_from_server: bool,
    window: Window,
    control: Option<ControlFacts>,
    counters: PrefaultCounters,
    pg_client: Option<tokio_postgres::Client>,
    /// No connection attempt before this.
    next_connect: std::time::Instant,
    connect_backoff: std::time::Duration,
    /// The postmaster everything here belongs to.
    life: Option<watch::PostmasterLife>,
    /// Its pidfd said it exited.
    life_ended: bool,
    /// Bumped with every new life: a step of an earlier one stops.
    generation: u64,
}

/// The prefaulter of one data directory.
pub(crate) struct Prefaulter {
    pgdata: PathBuf,
    cfg: PrefetchConfig,
    inner: Arc<Mutex<Inner>>,
    running: Arc<AtomicBool>,
    busy: Arc<AtomicBool>,
    /// The task waiting for the postmaster's exit (see `watch`).
    exit_watch: Mutex<Option<tokio::task::JoinHandle<()>>>,
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
    let was_on = inner.planner.pg_prefetch.on;
    inner.planner.pg_prefetch = PgPrefetch::from_settings(Some(recovery_prefetch), io_concurrency);
    inner.counters.pg_recovery_prefetch = Some(recovery_prefetch.to_string());
    inner.counters.pg_recovery_prefetch_source = Some(source.to_string());
    if inner.planner.pg_prefetch.on && !was_on {
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
            files: FileCache::default(),
            planner: Planner::new(),
            pg_prefetch_from_server: false,
            window: Window::default(),
            control: None,
            counters: PrefaultCounters::default(),
            pg_client: None,
            next_connect: std::time::Instant::now(),
            connect_backoff: CONNECT_BACKOFF_MIN,
            life: None,
            life_ended: false,
            generation: 0,
        }
    }

    /// A new postmaster: nothing of an earlier life holds. Its blocks were warmed into
    /// files that may be gone, its WAL positions may come again (a restore replays the
    /// same WAL), its pg_control and settings may have changed. Counters go on.
    fn begin_life(&mut self, life: watch::PostmasterLife) {
        let counters = std::mem::take(&mut self.counters);
        let generation = self.generation + 1;
        *self = Inner::new();
        self.counters = PrefaultCounters {
            postgres_starts: counters.postgres_starts + 1,
            warmed_up_to: None,
            pg_recovery_prefetch: None,
            pg_recovery_prefetch_source: None,
            ..counters
        };
        self.life = Some(life);
        self.generation = generation;
    }

    /// Forgets the blocks warmed and the WAL handed out (decoded segments are decoded
    /// again): a file they were warmed into was replaced.
    fn forget_warmed(&mut self) {
        self.window = Window::default();
        self.planner.forget_blocks();
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
            exit_watch: Mutex::new(None),
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
        inner.pg_client = None;
    }

    /// Drops what was decoded of a segment that left the spool.
    pub(crate) fn forget(&self, name: &str) {
        if let Ok(WalFileName::Segment(seg)) = name.parse() {
            lock(&self.inner).window.forget(&seg);
        }
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
        let generation = lock(&self.inner).generation;
        tokio::task::spawn_blocking(move || {
            forget_if_files_replaced(&inner, generation);
            decode_window(&inner, &spool, requested, seg_size, horizon, generation);
            // Everything up to the horizon, nearest first, in batches; a step that stopped
            // at one batch per tick fell behind replay (about 33k blocks/s).
            loop {
                let targets = {
                    let mut guard = lock(&inner);
                    if guard.generation != generation {
                        break;
                    }
                    let (targets, reached) = guard.window.pick(replay, horizon);
                    if let Some(reached) = reached {
                        guard.counters.warmed_up_to = Some(reached.to_string());
                    }
                    targets
                };
                if targets.is_empty() || !running.load(Ordering::SeqCst) {
                    break;
                }
                warm::warm(&inner, &running, &pgdata, &cfg, &targets);
            }
            busy.store(false, Ordering::SeqCst);
        });
    }
}

/// Closes the open files that were deleted, and when one was replaced (its path now has
/// another device or inode: a restore, a relation file recreated) forgets what was
/// warmed. The paths are looked at without the lock.
fn forget_if_files_replaced(inner: &Mutex<Inner>, generation: u64) {
    let open = lock(inner).files.identities();
    let changed: Vec<_> = open
        .into_iter()
        .filter(|(path, id)| files::identity(path) != Some(*id))
        .collect();
    if changed.is_empty() {
        return;
    }
    let mut guard = lock(inner);
    if guard.generation != generation {
        return;
    }
    let mut replaced = false;
    for (path, id) in &changed {
        guard.files.close(path);
        replaced |= files::identity(path).is_some_and(|now| now != *id);
    }
    if replaced {
        guard.counters.files_replaced += 1;
        guard.forget_warmed();
        tracing::info!("a relation file under PGDATA was replaced; what was warmed is forgotten");
    }
}

/// Decodes the spooled segments from `requested` up to `horizon` not decoded yet.
fn decode_window(
    inner: &Mutex<Inner>,
    spool: &crate::spool::Spool,
    requested: SegmentName,
    seg_size: u32,
    horizon: Lsn,
    generation: u64,
) {
    let mut seg = requested;
    loop {
        if seg.start_lsn(seg_size) > horizon {
            break;
        }
        let known = lock(inner).window.contains(&seg);
        if !known {
            // Only whole, verified segments: the data file appears after its hash.
            let name = seg.to_string();
            if !spool.hash_file(&name).exists() {
                if seg != requested {
                    break;
                }
            } else if let Ok(bytes) = std::fs::read(spool.segment(&name)) {
                let decoded = plan::warm_targets(&bytes);
                let mut guard = lock(inner);
                if guard.generation != generation {
                    return;
                }
                match decoded {
                    Ok(targets) => {
                        guard.counters.segments_decoded += 1;
                        guard.window.insert(seg, targets);
                    }
                    Err(e) => {
                        guard.counters.decode_errors += 1;
                        guard.window.insert(seg, Vec::new());
                        tracing::warn!(segment = %name, error = %e, "cannot decode spooled segment; its blocks are not prefaulted");
                    }
                }
            }
        }
        seg = seg.next(seg_size);
    }
    // Forget segments replay has left behind.
    let mut guard = lock(inner);
    if guard.generation == generation {
        guard.window.forget_before(requested);
    }
}

#[cfg(test)]
mod tests {
    use walvault_protocol::core::pg::wal::TimelineId;
    use walvault_protocol::core::pg::waldecode::ForkNumber;

    use super::plan::WarmTarget;
    use super::*;

    /// A deleted file open here is closed; one replaced (another inode at its path) is
    /// closed too and the WAL already handed out is handed out again.
    #[test]
    fn a_replaced_file_is_closed_and_what_was_warmed_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::write(&a, [0u8; 8192]).unwrap();
        std::fs::write(&b, [0u8; 8192]).unwrap();
        let target = WarmTarget {
            lsn: Lsn(100),
            spc: 1663,
            db: 5,
            rel: 16384,
            fork: ForkNumber::Main,
            block: 0,
            fpw: false,
            will_init: false,
        };
        let seg = SegmentName {
            timeline: TimelineId(1),
            log: 0,
            seg: 1,
        };
        let mut inner = Inner::new();
        assert!(inner.files.open(&a, 0).is_some() && inner.files.open(&b, 0).is_some());
        inner.window.insert(seg, vec![target]);
        assert_eq!(inner.window.pick(Lsn(0), Lsn(u64::MAX)).0, [target]);
        let inner = Mutex::new(inner);

        std::fs::remove_file(&b).unwrap();
        forget_if_files_replaced(&inner, 0);
        {
            let mut g = lock(&inner);
            assert_eq!((g.files.len(), g.counters.files_replaced), (1, 0));
            assert!(g.window.pick(Lsn(0), Lsn(u64::MAX)).0.is_empty());
        }

        // A new file renamed over `a` while the old one is still open: another inode.
        std::fs::write(dir.path().join("a.new"), [1u8; 8192]).unwrap();
        std::fs::rename(dir.path().join("a.new"), &a).unwrap();
        forget_if_files_replaced(&inner, 0);
        let mut g = lock(&inner);
        assert_eq!((g.files.len(), g.counters.files_replaced), (0, 1));
        assert!(
            g.window.pick(Lsn(0), Lsn(u64::MAX)).0.is_empty(),
            "decoded segments are decoded again"
        );
        g.window.insert(seg, vec![target]);
        assert_eq!(g.window.pick(Lsn(0), Lsn(u64::MAX)).0, [target]);
    }
}
