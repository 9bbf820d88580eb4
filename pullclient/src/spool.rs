//! The prefetch spool: verified segments waiting for PostgreSQL to ask for them.
//!
//! # Layout
//!
//! ```text
//! <spool>/daemon.lock          flock'ed by the one prefetch daemon serving this spool
//! <spool>/daemon.sock          the daemon's control socket: one JSON line in, one answer
//!                              line out (archive-get sends its notes and does not wait);
//!                              bound and reached through the spool directory, so its
//!                              path may be longer than sun_path's 108 bytes
//! <spool>/daemon.log           log of a daemon started by archive-get
//! <spool>/daemon.started       touched when archive-get starts a daemon: it starts no
//!                              other for a minute (never one per call)
//! <spool>/ready/<NAME>.b3      blake3 (hex) of NAME as the archive recorded it at push time
//! <spool>/ready/<NAME>         the segment, written and fsynced before it got this name
//! <spool>/ready/<NAME>.fetching  a download in progress (removed at daemon start)
//! ```
//!
//! The spool is never inside PGDATA: by default it is `<PGDATA>.walvault-spool` beside
//! the data directory (same file system, so a hit is a rename), else
//! `/var/tmp/walvault-spool-<uid>-<hash of PGDATA>` (a hit is then a copy), or whatever
//! `[prefetch] spool_dir` says.
//!
//! # Who may write it
//!
//! A spool directory (and its `ready/`) is used only when it is a real directory (opened
//! with `O_NOFOLLOW`), belongs to the effective user of this process and has mode 0700;
//! a missing one is created so. Anything else is refused, not repaired: a directory
//! another user made (in world-writable `/var/tmp`, say) could already hold a segment
//! and a `.b3` that match each other, and the hash check below would pass them. When no
//! candidate is usable, archive-get logs every candidate's reason and fetches directly.
//!
//! # Serving
//!
//! A segment counts as spooled only when both `<NAME>.b3` and `<NAME>` exist; the daemon
//! writes the hash first and renames the verified data into place last. archive-get
//! hashes the file again and compares it with `<NAME>.b3` before moving it to `%p`, so a
//! spool file damaged after it was fetched is never served: it is deleted and the
//! segment is fetched from the archive instead.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use walvault_protocol::net::config::ClientConfig;
use walvault_protocol::net::fsutil;

use crate::fetch::Fetched;

/// How long archive-get waits for the daemon to take a notification.
const NOTIFY_TIMEOUT: Duration = Duration::from_millis(200);
/// The control socket's name in the spool directory.
pub(crate) const SOCKET_NAME: &str = "daemon.sock";
/// After starting a daemon, archive-get starts no other for this long, whatever happened
/// to the first: a daemon that cannot run is not restarted by every call.
const START_BACKOFF: Duration = Duration::from_secs(60);
/// How long the call that started the daemon waits for its socket to report what it
/// served (once per daemon).
const STARTING_PATIENCE: Duration = Duration::from_secs(2);
/// Longest socket path `sun_path` holds (108 bytes with its NUL).
const SUN_PATH_MAX: usize = 107;

/// A message to the daemon.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub(crate) enum ControlRequest {
    /// PostgreSQL asked for this file (so replay has reached it).
    Requested {
        /// WAL file name.
        name: String,
    },
    /// archive-get handed the file over.
    Served {
        /// WAL file name.
        name: String,
        /// From the spool (a hit) or fetched directly (a miss).
        from_spool: bool,
    },
    /// Report counters.
    Status,
}

/// A spool directory for one data directory.
#[derive(Clone, Debug)]
pub(crate) struct Spool {
    /// The spool directory.
    pub(crate) dir: PathBuf,
    /// The data directory it serves.
    pub(crate) pgdata: PathBuf,
}

impl Spool {
    /// The spool for `pgdata`, created if needed.
    pub(crate) fn for_pgdata(cfg: &ClientConfig, pgdata: &Path) -> Result<Spool> {
        let pgdata = crate::fetch::absolute(pgdata);
        let candidates: Vec<PathBuf> = match &cfg.prefetch.spool_dir {
            Some(dir) => vec![dir.clone()],
            None => {
                let mut c = Vec::new();
                if let (Some(parent), Some(base)) = (pgdata.parent(), pgdata.file_name()) {
                    c.push(parent.join(format!("{}.walvault-spool", base.to_string_lossy())));
                }
                let hash = blake3::hash(pgdata.as_os_str().as_encoded_bytes()).to_hex();
                // SAFETY: getuid has no preconditions.
                let uid = unsafe { libc::getuid() };
                c.push(PathBuf::from(format!(
                    "/var/tmp/walvault-spool-{uid}-{}",
                    &hash[..16]
                )));
                c
            }
        };
        let mut refused = Vec::new();
        for dir in candidates {
            if dir.starts_with(&pgdata) {
                refused.push(format!("{} is inside PGDATA", dir.display()));
                continue;
            }
            match open_private_dir(&dir).and_then(|()| open_private_dir(&dir.join("ready"))) {
                Ok(()) => return Ok(Spool { dir, pgdata }),
                Err(e) => refused.push(format!("{e:#}")),
            }
        }
        anyhow::bail!("no usable spool directory ({})", refused.join("; "))
    }

    /// Directory of verified segments.
    pub(crate) fn ready_dir(&self) -> PathBuf {
        self.dir.join("ready")
    }
    /// Control socket.
    pub(crate) fn socket(&self) -> PathBuf {
        self.dir.join(SOCKET_NAME)
    }
    /// Touched by archive-get when it starts a daemon (see [`START_BACKOFF`]).
    fn start_stamp(&self) -> PathBuf {
        self.dir.join("daemon.started")
    }

    /// Connects to the control socket. A path too long for `sun_path` is reached through
    /// the spool directory's descriptor (`/proc/self/fd/N/daemon.sock`), so a spool beside
    /// a data directory of any path length works.
    fn connect(&self) -> std::io::Result<UnixStream> {
        let path = self.socket();
        if path.as_os_str().len() <= SUN_PATH_MAX {
            return UnixStream::connect(path);
        }
        use std::os::unix::fs::OpenOptionsExt;
        use std::os::unix::io::AsRawFd;
        let dir = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
            .open(&self.dir)?;
        UnixStream::connect(format!("/proc/self/fd/{}/{SOCKET_NAME}", dir.as_raw_fd()))
    }
    /// Lock file.
    pub(crate) fn lock_file(&self) -> PathBuf {
        self.dir.join("daemon.lock")
    }
    /// Log of a detached daemon.
    pub(crate) fn log_file(&self) -> PathBuf {
        self.dir.join("daemon.log")
    }
    /// Path of a spooled segment.
    pub(crate) fn segment(&self, name: &str) -> PathBuf {
        self.ready_dir().join(name)
    }
    /// Path of a spooled segment's hash.
    pub(crate) fn hash_file(&self, name: &str) -> PathBuf {
        self.ready_dir().join(format!("{name}.b3"))
    }

    /// Sends one request to the daemon and returns its answer line.
    pub(crate) fn send(&self, request: &ControlRequest) -> std::io::Result<String> {
        let stream = self.tell(request)?;
        stream.set_read_timeout(Some(NOTIFY_TIMEOUT))?;
        let mut answer = String::new();
        BufReader::new(stream).read_line(&mut answer)?;
        Ok(answer)
    }

    /// Sends one request to the daemon without waiting for its answer (archive-get, which
    /// PostgreSQL waits for, never waits on the daemon); the stream is returned for a
    /// caller that wants the answer line.
    fn tell(&self, request: &ControlRequest) -> std::io::Result<UnixStream> {
        let mut stream = self.connect()?;
        stream.set_write_timeout(Some(NOTIFY_TIMEOUT))?;
        let mut line = serde_json::to_string(request).unwrap_or_default();
        line.push('\n');
        stream.write_all(line.as_bytes())?;
        Ok(stream)
    }

    /// Tells the daemon PostgreSQL asked for `name`; starts a daemon if none listens.
    /// Never fails: prefetching is an optimization, never a reason to fail a restore.
    /// Returns whether this call started a daemon (which is then still coming up).
    pub(crate) fn notify_or_start(&self, config_path: &Path, name: &str) -> bool {
        let told = self.tell(&ControlRequest::Requested {
            name: name.to_string(),
        });
        if told.is_err() && self.may_start_daemon() {
            match self.start_daemon(config_path, name) {
                Ok(()) => return true,
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "cannot start the prefetch daemon")
                }
            }
        }
        false
    }

    /// No daemon holds the spool's lock (none runs, none is starting), and none was
    /// started in the last [`START_BACKOFF`] (one that died at once is not restarted by
    /// every call; its log says why).
    fn may_start_daemon(&self) -> bool {
        use std::os::unix::io::AsRawFd;
        let recently_started = std::fs::metadata(self.start_stamp())
            .and_then(|m| m.modified())
            .is_ok_and(|t| t.elapsed().is_ok_and(|age| age < START_BACKOFF));
        if recently_started {
            return false;
        }
        let Ok(lock) = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.lock_file())
        else {
            return false;
        };
        // SAFETY: flock on a descriptor we own; the lock goes with it when it is dropped.
        unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) == 0 }
    }

    /// Reports a served segment (hit or miss) to the daemon's counters. `just_started`:
    /// this call started the daemon, whose socket may not listen yet: it is given up to
    /// [`STARTING_PATIENCE`] (once per daemon, after the segment is written), so the
    /// first miss of a recovery is counted too.
    pub(crate) fn record_served(&self, name: &str, from_spool: bool, just_started: bool) {
        let request = ControlRequest::Served {
            name: name.to_string(),
            from_spool,
        };
        let until = std::time::Instant::now() + STARTING_PATIENCE;
        while self.tell(&request).is_err() && just_started && std::time::Instant::now() < until {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    fn start_daemon(&self, config_path: &Path, name: &str) -> Result<()> {
        use std::os::unix::process::CommandExt;
        let exe = std::env::current_exe().context("cannot find my own executable")?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_file())
            .with_context(|| format!("cannot open {}", self.log_file().display()))?;
        let mut cmd = std::process::Command::new(exe);
        cmd.arg("prefetch")
            .arg("--pgdata")
            .arg(&self.pgdata)
            .arg("--config")
            .arg(crate::fetch::absolute(config_path))
            .arg("--start-at")
            .arg(name)
            .arg("--exit-when-idle")
            .current_dir(&self.dir)
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        // SAFETY: setsid is async-signal-safe; it detaches the daemon from PostgreSQL's
        // process group so signals to the startup process do not reach it.
        unsafe {
            cmd.pre_exec(|| {
                libc::setsid();
                Ok(())
            });
        }
        std::fs::write(self.start_stamp(), b"")
            .with_context(|| format!("cannot write {}", self.start_stamp().display()))?;
        let child = cmd.spawn().context("spawning the prefetch daemon")?;
        tracing::info!(pid = child.id(), spool = %self.dir.display(), "started the prefetch daemon");
        // The daemon is not our child to wait for: it reparents to init when we exit.
        std::mem::forget(child);
        Ok(())
    }

    /// Moves a verified spooled segment to `dest`. `Ok(None)`: not spooled.
    pub(crate) fn take(&self, name: &str, dest: &Path) -> Result<Option<Fetched>> {
        let hash_path = self.hash_file(name);
        let expected = match std::fs::read_to_string(&hash_path) {
            Ok(h) => h.trim().to_string(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(e).with_context(|| format!("cannot read {}", hash_path.display()))
            }
        };
        let path = self.segment(name);
        let mut file = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("cannot open {}", path.display())),
        };
        let mut hasher = blake3::Hasher::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut raw_size = 0u64;
        loop {
            let n = file.read(&mut buf)?;
            if n == 0 {
                break;
            }
            raw_size += n as u64;
            hasher.update(&buf[..n]);
        }
        let got = hasher.finalize().to_hex().to_string();
        if got != expected {
            let _ = std::fs::remove_file(&path);
            let _ = std::fs::remove_file(&hash_path);
            anyhow::bail!("spooled {name} fails verification (blake3 {got}, archive says {expected}); deleted it");
        }
        // No fsync of the destination's directory: PostgreSQL makes a restored file durable
        // itself when it keeps it (file, new name and pg_wal), and one lost in a crash is
        // asked for again (the archive still has it). cp, the floor, does not either.
        match std::fs::rename(&path, dest) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
                let tmp = fsutil::temp_path_beside(dest);
                let copied = (|| -> std::io::Result<()> {
                    std::fs::copy(&path, &tmp)?;
                    std::fs::File::open(&tmp)?.sync_all()?;
                    fsutil::durable_rename(&tmp, dest)
                })();
                if let Err(e) = copied {
                    let _ = std::fs::remove_file(&tmp);
                    return Err(e)
                        .with_context(|| format!("copying spooled {name} to {}", dest.display()));
                }
                let _ = std::fs::remove_file(&path);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("moving spooled {name} to {}", dest.display()))
            }
        }
        let _ = std::fs::remove_file(&hash_path);
        Ok(Some(Fetched::Written {
            raw_size,
            blake3: expected,
            partial_bytes: None,
        }))
    }
}

/// Creates `dir` (mode 0700) if it is missing, then opens it without following a
/// symbolic link and checks that it belongs to our effective user and has mode 0700:
/// anything else could hold files planted by another user (a segment and a `.b3` that
/// match each other), so it is refused, never repaired. Whoever can write the parent
/// could still swap the directory afterwards; `/var/tmp` is sticky, so there nobody
/// but its owner (and root) can.
fn open_private_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    match walvault_protocol::net::fsutil::create_dir_durable_mode(dir, 0o700) {
        Ok(()) => {}
        // An existing symlink (dangling or not) is reported by the open below.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e).with_context(|| format!("cannot create {}", dir.display())),
    }
    let opened = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
        .open(dir);
    let meta = match opened.and_then(|f| f.metadata()) {
        Ok(m) => m,
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => anyhow::bail!(
            "{} is a symbolic link; a spool must be a real directory (remove the link)",
            dir.display()
        ),
        Err(e) => return Err(e).with_context(|| format!("cannot open {}", dir.display())),
    };
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    let mode = meta.mode() & 0o777;
    if meta.uid() != euid || mode != 0o700 {
        anyhow::bail!(
            "{} belongs to uid {} with mode {mode:03o}; a spool must belong to the user \
             archive-get runs as (uid {euid}) with mode 0700, or another user could plant WAL \
             in it; remove it (it is only a cache) or set [prefetch] spool_dir",
            dir.display(),
            meta.uid()
        );
    }
    Ok(())
}
