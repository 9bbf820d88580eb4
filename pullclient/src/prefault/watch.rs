//! Watching PostgreSQL: is it running (`postmaster.pid` names a live process), where is
//! replay (`pg_last_wal_replay_lsn()` over a connection through the socket named in
//! `postmaster.pid`), and the facts the prefaulter needs before its first read: the
//! control file and PostgreSQL's own recovery prefetch settings (configuration files
//! first, `SHOW` once a connection works).
//!
//! A life of PostgreSQL is one postmaster: its pid and start time (lines 1 and 3 of
//! `postmaster.pid`) and the data directory's device and inode. A new life starts with
//! no memory of the previous one (blocks warmed, WAL decoded and handed out, pg_control,
//! settings): a restore into the same directory replays the same WAL again, into files
//! that are not those warmed before. The end of a life is an event, not a poll: a pidfd
//! of the postmaster, readable the moment it exits, closes every file under PGDATA.

use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use anyhow::{Context, Result};
use walvault_protocol::core::pg::control::{parse_pg_version, ControlFacts};
use walvault_protocol::core::pg::wal::Lsn;

use super::{
    learn_pg_prefetch, lock, Inner, PgState, Prefaulter, CONNECT_BACKOFF_MAX, CONNECT_BACKOFF_MIN,
};
use walvault_protocol::core::pg::conf as pgconf;

impl Prefaulter {
    /// Is PostgreSQL running, and where is replay? Closes files when it stopped.
    pub(crate) async fn watch_postgres(&self, previous: PgState) -> PgState {
        let pid_file = read_postmaster_pid(&self.pgdata);
        let running = pid_file
            .as_ref()
            .map(|p| process_alive(p.pid))
            .unwrap_or(false);
        let life = match &pid_file {
            Some(p) if running => Some(PostmasterLife {
                pid: p.pid,
                started: p.started,
                data_dir: dir_identity(&self.pgdata),
            }),
            _ => None,
        };
        // A life whose pidfd said it ended is over, whatever postmaster.pid still says.
        let life = life.filter(|l| {
            let inner = lock(&self.inner);
            !(inner.life == Some(*l) && inner.life_ended)
        });
        let Some(life) = life else {
            if previous.running || self.running.load(Ordering::SeqCst) {
                tracing::info!("PostgreSQL is not running; closed every file under PGDATA");
            }
            self.close_all();
            return PgState::default();
        };
        let new_life = lock(&self.inner).life != Some(life);
        if new_life {
            // Files are read before the lock is taken: warming threads wait on it.
            let s = pgconf::read_settings(
                &self.pgdata,
                &["recovery_prefetch", "maintenance_io_concurrency"],
            );
            let mut inner = lock(&self.inner);
            inner.begin_life(life);
            tracing::info!(
                postmaster = life.pid,
                started = life.started.unwrap_or_default(),
                "PostgreSQL started: nothing warmed before counts"
            );
            self.follow_exit(life);
            if inner.control.is_none() {
                match read_control(&self.pgdata) {
                    Ok(c) => {
                        inner.counters.prefault_off_because = None;
                        inner.control = Some(c);
                    }
                    Err(e) => {
                        // Loud: a version walvault cannot read means no block is warmed.
                        let why = format!("{e:#}");
                        tracing::error!(
                            error = %why,
                            "cannot use pg_control: prefaulting is off for this data directory \
                             (segments are still spooled); it is read again when PostgreSQL \
                             next starts"
                        );
                        inner.counters.prefault_off_because = Some(why);
                    }
                }
            }
            let major = inner.control.as_ref().map(|c| c.major);
            if major.is_some_and(|m| m < 15) {
                // recovery_prefetch came with PostgreSQL 15: older replay never prefetches.
                learn_pg_prefetch(&mut inner, "off", None, "version");
                inner.pg_prefetch_from_server = true;
            } else if !inner.pg_prefetch_from_server {
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
        {
            // Under the lock: an exit seen meanwhile (by the pidfd) keeps it false.
            let inner = lock(&self.inner);
            if inner.life_ended {
                return PgState::default();
            }
            self.running.store(true, Ordering::SeqCst);
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

    /// Closes every file under PGDATA the moment the postmaster of `life` exits: a task
    /// waits on a pidfd of it (readable once the process has exited). Without pidfds (a
    /// kernel before 5.3) the next look at `postmaster.pid` does it.
    fn follow_exit(&self, life: PostmasterLife) {
        let mut watch = self.exit_watch.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(old) = watch.take() {
            old.abort();
        }
        let pidfd = match pidfd_open(life.pid) {
            Ok(fd) => fd,
            Err(e) => {
                tracing::debug!(error = %e, "no pidfd of the postmaster: its exit is seen by polling");
                return;
            }
        };
        // SAFETY: the OwnedFd moves into the AsyncFd and stays open, the same descriptor,
        // until the AsyncFd is dropped.
        let registered = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(pidfd, tokio::io::Interest::READABLE)
        };
        let fd = match registered {
            Ok(fd) => fd,
            Err(e) => {
                tracing::debug!(error = %e, "cannot poll the postmaster's pidfd: its exit is seen by polling");
                return;
            }
        };
        let inner = self.inner.clone();
        let running = self.running.clone();
        *watch = Some(tokio::spawn(async move {
            if fd.readable().await.is_ok() {
                postmaster_exited(&inner, &running, life);
            }
        }));
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
                let user = walvault_protocol::net::users::current_user()?.name;
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
}

/// One postmaster: a restart, or a data directory replaced, is another life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct PostmasterLife {
    /// Its pid.
    pid: i32,
    /// Its start time (seconds since the epoch), line 3 of `postmaster.pid`.
    started: Option<i64>,
    /// Device and inode of the data directory.
    data_dir: Option<(u64, u64)>,
}

/// Device and inode of `path`.
pub(super) fn dir_identity(path: &Path) -> Option<(u64, u64)> {
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// The postmaster of `life` exited: every file under PGDATA is closed now (reads in
/// flight stop at their next request, see `warm`).
fn postmaster_exited(inner: &Mutex<Inner>, running: &AtomicBool, life: PostmasterLife) {
    // First the flag: a batch being planned stops and lets go of the lock.
    running.store(false, Ordering::SeqCst);
    let mut guard = lock(inner);
    if guard.life == Some(life) {
        // Again under the lock, where watch_postgres sets it (unless the life ended).
        running.store(false, Ordering::SeqCst);
        guard.life_ended = true;
        guard.files.clear();
        guard.pg_client = None;
        drop(guard);
        tracing::info!(
            postmaster = life.pid,
            "PostgreSQL exited; closed every file under PGDATA"
        );
    }
}

/// A pidfd of process `pid` (`pidfd_open(2)`).
fn pidfd_open(pid: i32) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, libc::PIDFD_NONBLOCK) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a descriptor the kernel just returned to us, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Reads `PGDATA/global/pg_control` and `PGDATA/PG_VERSION`.
fn read_control(pgdata: &Path) -> Result<ControlFacts> {
    let path = pgdata.join("global").join("pg_control");
    let bytes = std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let version_path = pgdata.join("PG_VERSION");
    let text = std::fs::read_to_string(&version_path)
        .with_context(|| format!("cannot read {}", version_path.display()))?;
    let major = parse_pg_version(&text).with_context(|| format!("{}", version_path.display()))?;
    ControlFacts::parse(&bytes, major).with_context(|| format!("{}", path.display()))
}

/// A setting as the server reports it (`SHOW`), or None when the query fails.
async fn show(client: &tokio_postgres::Client, name: &str) -> Option<String> {
    let row = client.query_one(&format!("SHOW {name}"), &[]).await.ok()?;
    row.try_get(0).ok()
}

struct PostmasterPid {
    pid: i32,
    started: Option<i64>,
    port: u16,
    socket_dir: Option<PathBuf>,
}

/// `postmaster.pid`: line 1 PID, 3 start time (epoch seconds), 4 port, 5 first socket
/// directory.
fn read_postmaster_pid(pgdata: &Path) -> Option<PostmasterPid> {
    let text = std::fs::read_to_string(pgdata.join("postmaster.pid")).ok()?;
    let lines: Vec<&str> = text.lines().collect();
    let pid: i32 = lines.first()?.trim().parse().ok()?;
    let started = lines.get(2).and_then(|l| l.trim().parse().ok());
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
        started,
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
