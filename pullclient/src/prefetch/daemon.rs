//! The daemon's life: the spool lock, the control socket, the loop that watches
//! PostgreSQL and steps the prefaulter, and the downloads that keep the spool ahead of
//! replay (see the [module header](super) for the contract and bounds).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::Serialize;
use tokio::net::UnixListener;
use tokio::sync::{Notify, Semaphore};
use walvault_protocol::core::pg::wal::{SegmentName, WalFileName};
use walvault_protocol::net::client::ArchiveClient;
use walvault_protocol::net::config::ClientConfig;

use crate::fetch::{fetch_to, Fetched};
use crate::prefault::{PgState, Prefaulter};
use crate::spool::{Spool, SOCKET_NAME};
use walvault_protocol::core::wire::audit::FetchPurpose;
use walvault_protocol::net::client::new_request_id;

use super::control::control_loop;

/// Longest wait before asking the archive again for a segment it did not have.
const MAX_RETRY: Duration = Duration::from_secs(30);
/// How often the daemon looks at PostgreSQL (running? replay position?).
const WATCH_INTERVAL: Duration = Duration::from_millis(250);

/// Counters, as `pullclient prefetch-status` prints them.
#[derive(Clone, Debug, Default, Serialize)]
pub(crate) struct Counters {
    /// archive-get requests seen.
    pub(crate) requests: u64,
    /// Requests served from the spool.
    pub(crate) spool_hits: u64,
    /// Requests fetched directly.
    pub(crate) spool_misses: u64,
    /// Segments downloaded into the spool.
    pub(crate) segments_fetched: u64,
    /// Raw bytes downloaded into the spool.
    pub(crate) bytes_fetched: u64,
    /// Downloads that failed.
    pub(crate) fetch_errors: u64,
    /// Times the next segment was not archived yet.
    pub(crate) archive_end_reached: u64,
    /// Segments in the spool now.
    pub(crate) spooled_segments: u64,
    /// WAL bytes in the spool ahead of the requested segment.
    pub(crate) bytes_ahead: u64,
    /// Last segment PostgreSQL asked for.
    pub(crate) last_requested: Option<String>,
    /// Replay position from PostgreSQL, when connected.
    pub(crate) replay_lsn: Option<String>,
    /// Whether PostgreSQL is running.
    pub(crate) postgres_running: bool,
    /// Prefault counters.
    pub(crate) prefault: crate::prefault::PrefaultCounters,
}

struct State {
    requested: Option<SegmentName>,
    segment_size: Option<u32>,
    inflight: BTreeSet<SegmentName>,
    /// First segment the archive did not have, and when to ask again.
    archive_end: Option<(SegmentName, Instant, Duration)>,
    last_activity: Instant,
    counters: Counters,
}

impl State {
    fn new() -> State {
        State {
            requested: None,
            segment_size: None,
            inflight: BTreeSet::new(),
            archive_end: None,
            last_activity: Instant::now(),
            counters: Counters::default(),
        }
    }

    /// PostgreSQL asked for `seg`: the daemon plans from the segment after it.
    fn request(&mut self, seg: SegmentName) {
        self.requested = Some(seg);
        // PostgreSQL moved on: anything it may ask for next is worth asking for now.
        if let Some((end, _, _)) = self.archive_end {
            if seg >= end || seg.timeline != end.timeline {
                self.archive_end = None;
            }
        }
    }

    /// The archive answered that `seg` is not (complete) there yet: the end to probe
    /// again after a back-off (1 s, doubling to `MAX_RETRY` while the answer repeats).
    /// Counted unless it says nothing new: a segment past an end already known (fetched
    /// in parallel), or one PostgreSQL has asked for since its download started, whose
    /// answer archive-get gives PostgreSQL itself; an end there would stop the daemon
    /// probing past the request until PostgreSQL asked again.
    fn end_reached(&mut self, seg: SegmentName, now: Instant) {
        if self
            .requested
            .is_some_and(|r| r.timeline == seg.timeline && seg <= r)
        {
            return;
        }
        let backoff = match self.archive_end {
            Some((end, _, _)) if end < seg && end.timeline == seg.timeline => return,
            Some((end, _, b)) if end == seg => (b * 2).min(MAX_RETRY),
            _ => Duration::from_secs(1),
        };
        self.archive_end = Some((seg, now + backoff, backoff));
        self.counters.archive_end_reached += 1;
    }
}

pub(super) struct Daemon {
    cfg: ClientConfig,
    spool: Spool,
    state: Mutex<State>,
    wake: Notify,
    connection: tokio::sync::Mutex<Option<ArchiveClient>>,
    downloads: Arc<Semaphore>,
    prefaulter: Prefaulter,
}

/// Runs the daemon until SIGTERM/SIGINT (or idleness, with `exit_when_idle`).
pub(crate) async fn run(
    cfg: ClientConfig,
    pgdata: &Path,
    start_at: Option<String>,
    exit_when_idle: bool,
) -> Result<()> {
    let spool = Spool::for_pgdata(&cfg, pgdata)?;
    std::env::set_current_dir(&spool.dir)
        .with_context(|| format!("cannot enter {}", spool.dir.display()))?;
    let _lock = match lock(&spool.lock_file())? {
        Some(l) => l,
        None => {
            tracing::info!(spool = %spool.dir.display(), "another prefetch daemon serves this spool; exiting");
            return Ok(());
        }
    };
    clean_partial_downloads(&spool.ready_dir());
    let _ = std::fs::remove_file(spool.socket());
    // Bound by its name in the working directory (the spool): a spool whose path is
    // longer than sun_path's 108 bytes still gets its socket.
    let listener = UnixListener::bind(SOCKET_NAME)
        .with_context(|| format!("cannot bind {}", spool.socket().display()))?;
    tracing::info!(spool = %spool.dir.display(), pgdata = %spool.pgdata.display(), "prefetch daemon running");

    let prefaulter = Prefaulter::new(&spool.pgdata, &cfg.prefetch);
    let daemon = Arc::new(Daemon {
        downloads: Arc::new(Semaphore::new(cfg.prefetch.fetch_concurrency)),
        cfg,
        spool,
        state: Mutex::new(State::new()),
        wake: Notify::new(),
        connection: tokio::sync::Mutex::new(None),
        prefaulter,
    });
    if let Some(name) = start_at {
        daemon.requested(&name);
    }
    super::metrics::start(
        daemon.clone(),
        &daemon.cfg.prefetch.metrics_listen,
        &daemon.spool.dir,
    )
    .await;

    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let control = tokio::spawn(control_loop(daemon.clone(), listener));
    let fetcher = tokio::spawn(fetch_loop(daemon.clone()));
    let mut watch = tokio::time::interval(WATCH_INTERVAL);
    let mut pg = PgState::default();
    let reason = loop {
        tokio::select! {
            _ = sigterm.recv() => break "SIGTERM",
            _ = sigint.recv() => break "SIGINT",
            _ = watch.tick() => {
                pg = daemon.prefaulter.watch_postgres(pg).await;
                let idle_for = {
                    let mut st = lock_state(&daemon.state);
                    st.counters.postgres_running = pg.running;
                    st.counters.replay_lsn = pg.replay_lsn.map(|l| l.to_string());
                    st.last_activity.elapsed()
                };
                if !daemon.spool.pgdata.exists() {
                    break "the data directory is gone";
                }
                if exit_when_idle && !pg.running && idle_for > Duration::from_secs(daemon.cfg.prefetch.idle_exit_secs) {
                    break "idle with PostgreSQL stopped";
                }
                daemon.prefault_step(&pg);
            }
        }
    };
    tracing::info!(reason, "prefetch daemon exiting");
    control.abort();
    fetcher.abort();
    daemon.prefaulter.close_all();
    let _ = std::fs::remove_file(daemon.spool.socket());
    if !daemon.spool.pgdata.exists() && daemon.cfg.prefetch.spool_dir.is_none() {
        // A spool we chose for a data directory that no longer exists serves nobody.
        let _ = std::fs::remove_dir_all(&daemon.spool.dir);
    }
    Ok(())
}

fn lock_state(m: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Takes the spool's lock; `None` if another daemon holds it.
fn lock(path: &Path) -> Result<Option<std::fs::File>> {
    use std::os::unix::io::AsRawFd;
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    // SAFETY: flock on a descriptor we own.
    let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if r != 0 {
        return Ok(None);
    }
    // The lock file names the daemon's pid, for operators (and tests).
    use std::io::Write;
    f.set_len(0)?;
    (&f).write_all(format!("{}\n", std::process::id()).as_bytes())?;
    Ok(Some(f))
}

fn clean_partial_downloads(ready: &Path) {
    for e in std::fs::read_dir(ready).into_iter().flatten().flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        if n.ends_with(".fetching") || n.starts_with(".tmp.") {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

impl Daemon {
    pub(super) fn requested(&self, name: &str) {
        let mut st = lock_state(&self.state);
        st.counters.requests += 1;
        st.counters.last_requested = Some(name.to_string());
        st.last_activity = Instant::now();
        if let Ok(WalFileName::Segment(seg)) = name.parse::<WalFileName>() {
            st.request(seg);
        }
        drop(st);
        self.wake.notify_one();
    }

    /// archive-get served a file, from the spool or fetched directly.
    pub(super) fn served(&self, from_spool: bool) {
        let mut st = lock_state(&self.state);
        if from_spool {
            st.counters.spool_hits += 1;
        } else {
            st.counters.spool_misses += 1;
        }
    }

    /// The counters now.
    pub(super) fn counters(&self) -> Counters {
        lock_state(&self.state).counters.clone()
    }

    async fn connection(&self) -> Result<ArchiveClient> {
        let mut guard = self.connection.lock().await;
        if let Some(c) = guard.as_ref() {
            if !c.is_closed() {
                return Ok(c.clone());
            }
        }
        let c = ArchiveClient::connect(&self.cfg).await?;
        *guard = Some(c.clone());
        Ok(c)
    }

    async fn segment_size(&self) -> Result<u32> {
        if let Some(s) = lock_state(&self.state).segment_size {
            return Ok(s);
        }
        let size = self
            .connection()
            .await?
            .binding()
            .await?
            .map_or(16 << 20, |b| b.segment_size);
        lock_state(&self.state).segment_size = Some(size);
        Ok(size)
    }

    /// Segments to have in the spool now, in replay order (none in flight), and removes
    /// what is stale. The spool directory is read and stale segments unlinked on a
    /// blocking thread, without the state lock: the lock is the control socket's and the
    /// watch loop's too, and the runtime has few workers.
    async fn plan(self: &Arc<Self>, seg_size: u32) -> Vec<SegmentName> {
        let (requested, wanted) = {
            let st = lock_state(&self.state);
            let Some(requested) = st.requested else {
                return Vec::new();
            };
            let budget = (self.cfg.prefetch.spool_max_bytes / seg_size as u64).max(1);
            let mut wanted = Vec::new();
            let mut next = requested.next(seg_size);
            for _ in 0..budget {
                if let Some((end, retry_at, _)) = st.archive_end {
                    if next >= end && next.timeline == end.timeline {
                        // At the end of the archive: probe only the first missing segment,
                        // and only when its back-off has passed.
                        if next == end && Instant::now() >= retry_at {
                            wanted.push(next);
                        }
                        break;
                    }
                }
                wanted.push(next);
                next = next.next(seg_size);
            }
            // Only this task starts downloads: what is not in flight now will not be
            // until this plan is carried out.
            wanted.retain(|s| !st.inflight.contains(s));
            (requested, wanted)
        };
        let daemon = self.clone();
        let scanned =
            tokio::task::spawn_blocking(move || daemon.scan_spool(requested, wanted)).await;
        let Ok((spooled, wanted)) = scanned else {
            return Vec::new();
        };
        let mut st = lock_state(&self.state);
        st.counters.spooled_segments = spooled;
        st.counters.bytes_ahead = spooled * seg_size as u64;
        wanted
    }

    /// Evicts the spooled segments replay has passed (or of another timeline) and counts
    /// the rest; of `wanted`, those not spooled yet.
    fn scan_spool(
        &self,
        requested: SegmentName,
        mut wanted: Vec<SegmentName>,
    ) -> (u64, Vec<SegmentName>) {
        let mut spooled = 0;
        for e in std::fs::read_dir(self.spool.ready_dir())
            .into_iter()
            .flatten()
            .flatten()
        {
            let file = e.file_name().to_string_lossy().into_owned();
            let Ok(WalFileName::Segment(seg)) = file.parse::<WalFileName>() else {
                continue;
            };
            if seg.timeline != requested.timeline || seg < requested {
                let _ = std::fs::remove_file(self.spool.segment(&file));
                let _ = std::fs::remove_file(self.spool.hash_file(&file));
                self.prefaulter.forget(&file);
            } else {
                spooled += 1;
            }
        }
        wanted.retain(|s| !self.spool.hash_file(&s.to_string()).exists());
        (spooled, wanted)
    }

    fn prefault_step(&self, pg: &PgState) {
        if !self.cfg.prefetch.prefault {
            return;
        }
        let (requested, seg_size) = {
            let st = lock_state(&self.state);
            (st.requested, st.segment_size)
        };
        let (Some(requested), Some(seg_size)) = (requested, seg_size) else {
            return;
        };
        self.prefaulter.step(&self.spool, requested, seg_size, pg);
        let counters = self.prefaulter.counters();
        lock_state(&self.state).counters.prefault = counters;
    }
}

async fn fetch_loop(daemon: Arc<Daemon>) {
    loop {
        let seg_size = match daemon.segment_size().await {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::debug!(error = %format!("{e:#}"), "cannot learn the segment size yet");
                None
            }
        };
        if let Some(seg_size) = seg_size {
            for seg in daemon.plan(seg_size).await {
                let Ok(permit) = daemon.downloads.clone().try_acquire_owned() else {
                    break;
                };
                lock_state(&daemon.state).inflight.insert(seg);
                let d = daemon.clone();
                tokio::spawn(async move {
                    d.download(seg).await;
                    lock_state(&d.state).inflight.remove(&seg);
                    drop(permit);
                    d.wake.notify_one();
                });
            }
        }
        let sleep = {
            let st = lock_state(&daemon.state);
            match st.archive_end {
                Some((_, at, _)) => at
                    .saturating_duration_since(Instant::now())
                    .max(Duration::from_millis(100)),
                None => Duration::from_secs(1),
            }
        };
        tokio::select! {
            _ = daemon.wake.notified() => {}
            _ = tokio::time::sleep(sleep) => {}
        }
    }
}

impl Daemon {
    /// `seg` is not (complete) in the archive yet: ask again after a back-off.
    fn reached_end(&self, seg: SegmentName) {
        lock_state(&self.state).end_reached(seg, Instant::now());
    }

    async fn download(&self, seg: SegmentName) {
        let name = seg.to_string();
        let tmp_dest: PathBuf = self.spool.ready_dir().join(format!("{name}.fetching"));
        let result = async {
            let conn = self.connection().await?;
            let request = new_request_id();
            tracing::debug!(file = %name, %request, "prefetching");
            let outcome = fetch_to(&conn, &name, &tmp_dest, FetchPurpose::Prefetch, &request).await;
            if outcome.is_err() {
                // A broken connection is replaced on the next attempt.
                if conn.is_closed() {
                    *self.connection.lock().await = None;
                }
            }
            Ok::<_, anyhow::Error>(outcome?)
        }
        .await;
        match result {
            Ok(Fetched::Written {
                partial_bytes: Some(_),
                ..
            }) => {
                // The receiver's unfinished segment: PostgreSQL gets it from archive-get
                // when it asks (it grows meanwhile); the spool keeps complete ones only.
                let _ = std::fs::remove_file(&tmp_dest);
                self.reached_end(seg);
            }
            Ok(Fetched::Written {
                raw_size,
                blake3,
                partial_bytes: None,
            }) => {
                let done = (|| -> std::io::Result<()> {
                    let hash_path = self.spool.hash_file(&name);
                    std::fs::write(&hash_path, format!("{blake3}\n"))?;
                    std::fs::rename(&tmp_dest, self.spool.segment(&name))
                })();
                let mut st = lock_state(&self.state);
                match done {
                    Ok(()) => {
                        st.counters.segments_fetched += 1;
                        st.counters.bytes_fetched += raw_size;
                        tracing::debug!(segment = %name, "spooled");
                    }
                    Err(e) => {
                        st.counters.fetch_errors += 1;
                        tracing::warn!(segment = %name, error = %e, "cannot place a spooled segment");
                    }
                }
            }
            Ok(Fetched::NotFound) => self.reached_end(seg),
            Err(e) => {
                let _ = std::fs::remove_file(&tmp_dest);
                let mut st = lock_state(&self.state);
                st.counters.fetch_errors += 1;
                // Treat like the end of the archive for pacing: no hot retry loop.
                st.archive_end = Some((
                    seg,
                    Instant::now() + Duration::from_secs(2),
                    Duration::from_secs(2),
                ));
                tracing::warn!(segment = %name, error = %format!("{e:#}"), "prefetch failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> State {
        State::new()
    }

    fn seg(n: u32) -> SegmentName {
        SegmentName {
            timeline: walvault_protocol::core::pg::wal::TimelineId(1),
            log: 0,
            seg: n,
        }
    }

    #[test]
    fn the_end_backs_off_and_parallel_answers_past_it_are_not_counted() {
        let mut st = state();
        let now = Instant::now();
        st.request(seg(1));
        st.end_reached(seg(8), now);
        assert_eq!(
            st.archive_end,
            Some((seg(8), now + Duration::from_secs(1), Duration::from_secs(1)))
        );
        st.end_reached(seg(9), now);
        st.end_reached(seg(8), now);
        assert_eq!(st.archive_end.map(|e| e.2), Some(Duration::from_secs(2)));
        assert_eq!(st.counters.archive_end_reached, 2);
    }

    /// The race the prefetch test once lost: a probe of the archive's end (segment 8)
    /// was in flight when PostgreSQL asked for segment 8 itself; its "not found" came
    /// after the request and set the end back to 8, behind the request, so the plan
    /// (which starts at 9) never probed again.
    #[test]
    fn an_answer_for_a_segment_postgres_already_asked_for_sets_no_end() {
        let mut st = state();
        let now = Instant::now();
        st.request(seg(7));
        st.end_reached(seg(8), now);
        st.request(seg(8));
        assert_eq!(st.archive_end, None, "the request moves past the end");
        st.end_reached(seg(8), now);
        assert_eq!(
            st.archive_end, None,
            "a stale answer for the requested segment"
        );
        st.end_reached(seg(9), now);
        assert_eq!(st.archive_end.map(|e| e.0), Some(seg(9)));
        assert_eq!(st.counters.archive_end_reached, 2);
    }
}
