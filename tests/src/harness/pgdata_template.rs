//! Template data directories: `initdb` runs once per PostgreSQL installation and set of
//! initdb options, and every [`PgCluster::initdb`] copies the result.
//!
//! Cache: `/tmp/walvault-pgdata-templates-<euid>/<key>/data`, where `<key>` hashes the
//! PostgreSQL bin dir, `postgres --version` and the initdb options (a new PostgreSQL
//! minor version or new options get a new template; old ones are left to /tmp's
//! cleaning). A template is built in `<key>.build/` under an exclusive `flock` of
//! `<key>.lock` (concurrent test processes wait for one initdb instead of racing) and
//! renamed to `<key>/` only once initdb has succeeded, so a `<key>/` that exists is
//! complete and never changes again; copies are taken without the lock.
//!
//! A copy is made a system of its own: a new system identifier is written into
//! `global/pg_control` (its CRC-32C recomputed) and into the long page header of every
//! WAL segment in `pg_wal` (the only other place it is kept; records do not carry it),
//! as initdb would have chosen one. PostgreSQL checks both at startup ("WAL file is from
//! different database system"), so a mistake here cannot pass silently, and clusters of
//! one test never look like the same system to the archive (promise 4).
//!
//! [`PgCluster::initdb`]: super::pg::PgCluster::initdb

use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use super::cmd::run;
use super::pg::{is_segment_name, pg_bin_dir, pg_command};
use super::users::{chmod, chown_pg};

/// Bumped when the way templates are made changes, so old caches are not reused.
const TEMPLATE_FORMAT: &str = "walvault pgdata template 1";

/// A fresh data directory at `dest` (which must not exist): a copy of the cached
/// `initdb` output for `initdb_args`, with a system identifier of its own.
pub(crate) fn copy_fresh_pgdata(initdb_args: &[&str], dest: &Path) {
    let template = template_for(initdb_args);
    run(
        &format!("copying the template data directory to {}", dest.display()),
        Command::new("cp")
            .args(["-a", "--reflink=auto"])
            .arg(&template)
            .arg(dest),
    );
    give_new_system_identifier(dest);
}

/// The template data directory for `initdb_args`, made if it is not cached yet.
fn template_for(initdb_args: &[&str]) -> PathBuf {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    let root = PathBuf::from(format!("/tmp/walvault-pgdata-templates-{euid}"));
    let key = template_key(initdb_args);
    let ready = root.join(&key);
    let data = ready.join("data");
    if ready.is_dir() {
        return data;
    }
    fs::create_dir_all(&root).unwrap_or_else(|e| panic!("mkdir {}: {e}", root.display()));
    chmod(&root, 0o755);
    let lock_path = root.join(format!("{key}.lock"));
    let lock =
        File::create(&lock_path).unwrap_or_else(|e| panic!("create {}: {e}", lock_path.display()));
    // SAFETY: flock(2) on a descriptor we own; released when `lock` is closed.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
        panic!(
            "flock {}: {}",
            lock_path.display(),
            std::io::Error::last_os_error()
        );
    }
    if ready.is_dir() {
        return data;
    }
    let build = root.join(format!("{key}.build"));
    match fs::remove_dir_all(&build) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => panic!("removing the unfinished template {}: {e}", build.display()),
    }
    fs::create_dir(&build).unwrap_or_else(|e| panic!("mkdir {}: {e}", build.display()));
    chmod(&build, 0o755);
    chown_pg(&build);
    run(
        &format!("initdb of the template data directory {}", build.display()),
        pg_command("initdb")
            .arg("-D")
            .arg(build.join("data"))
            .args(initdb_args),
    );
    fs::rename(&build, &ready)
        .unwrap_or_else(|e| panic!("rename {} -> {}: {e}", build.display(), ready.display()));
    data
}

/// Names the template: PostgreSQL installation, its version, the initdb options.
fn template_key(initdb_args: &[&str]) -> String {
    static VERSION: OnceLock<String> = OnceLock::new();
    let version = VERSION.get_or_init(|| {
        run(
            "postgres --version",
            Command::new(pg_bin_dir().join("postgres")).arg("--version"),
        )
        .stdout
    });
    let mut hasher = blake3::Hasher::new();
    hasher.update(TEMPLATE_FORMAT.as_bytes());
    hasher.update(b"\0");
    hasher.update(pg_bin_dir().as_os_str().as_encoded_bytes());
    hasher.update(b"\0");
    hasher.update(version.as_bytes());
    for arg in initdb_args {
        hasher.update(b"\0");
        hasher.update(arg.as_bytes());
    }
    hasher.finalize().to_hex()[..16].to_string()
}

/// A system identifier the way PostgreSQL makes one (seconds, microseconds, low bits of
/// the pid), plus a counter so two copies in one microsecond differ.
fn new_system_identifier() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let low = (u64::from(std::process::id()) + COUNTER.fetch_add(1, Ordering::Relaxed)) & 0xFFF;
    (now.as_secs() << 32) | (u64::from(now.subsec_micros()) << 12) | low
}

/// Offset of `crc` in pg_control: the first 4-aligned offset whose 4 bytes are the
/// CRC-32C of everything before them (the struct's layout varies between versions).
fn control_crc_offset(control: &[u8]) -> Option<usize> {
    (8..control.len().min(1024) - 4)
        .step_by(4)
        .find(|&at| crc32c::crc32c(&control[..at]).to_le_bytes() == control[at..at + 4])
}

/// Writes a new system identifier into `pgdata`'s pg_control and WAL segment headers.
fn give_new_system_identifier(pgdata: &Path) {
    let control_path = pgdata.join("global/pg_control");
    let mut control =
        fs::read(&control_path).unwrap_or_else(|e| panic!("read {}: {e}", control_path.display()));
    let crc_at = control_crc_offset(&control).unwrap_or_else(|| {
        panic!(
            "{}: no CRC-32C found over its first bytes; is this a pg_control file?",
            control_path.display()
        )
    });
    let old = control[..8].to_vec();
    let new = new_system_identifier().to_le_bytes();
    control[..8].copy_from_slice(&new);
    let crc = crc32c::crc32c(&control[..crc_at]);
    control[crc_at..crc_at + 4].copy_from_slice(&crc.to_le_bytes());
    write_in_place(&control_path, 0, &control);

    let wal = pgdata.join("pg_wal");
    let mut segments = 0;
    for entry in fs::read_dir(&wal).unwrap_or_else(|e| panic!("read_dir {}: {e}", wal.display())) {
        let path = entry
            .unwrap_or_else(|e| panic!("read_dir {}: {e}", wal.display()))
            .path();
        if !path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(is_segment_name)
        {
            continue;
        }
        let mut header = [0u8; 32];
        File::open(&path)
            .and_then(|mut f| f.read_exact(&mut header))
            .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        // XLogLongPageHeaderData: xlp_info (bytes 2..4) has XLP_LONG_HEADER (0x0002);
        // xlp_sysid is bytes 24..32.
        let info = u16::from_le_bytes([header[2], header[3]]);
        if info & 0x0002 == 0 || header[24..32] != old[..] {
            panic!(
                "{}: no long page header with pg_control's system identifier; the template \
                 cannot be given a new one",
                path.display()
            );
        }
        write_in_place(&path, 24, &new);
        segments += 1;
    }
    if segments == 0 {
        panic!("{}: no WAL segment in the template copy", wal.display());
    }
}

/// Overwrites `bytes` at `offset` of an existing file (owner and mode unchanged).
fn write_in_place(path: &Path, offset: u64, bytes: &[u8]) {
    fs::OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|mut f| {
            f.seek(SeekFrom::Start(offset))?;
            f.write_all(bytes)
        })
        .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}
