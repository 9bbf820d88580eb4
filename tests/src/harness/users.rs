//! Users and permissions: PostgreSQL refuses to run as root, so when the tests run as
//! root every PostgreSQL program (and every client the tests run on PostgreSQL's behalf)
//! runs as the `postgres` OS user, and what it must read is given to it.

use std::ffi::CString;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::sync::OnceLock;

/// The uid/gid PostgreSQL programs run as: `Some` (the `postgres` user) when the tests run
/// as root, `None` (run as ourselves) otherwise.
pub fn pg_user() -> Option<(u32, u32)> {
    static USER: OnceLock<Option<(u32, u32)>> = OnceLock::new();
    *USER.get_or_init(|| {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return None;
        }
        let name = CString::new("postgres").unwrap();
        // SAFETY: getpwnam with a valid C string; the result is read immediately (the
        // OnceLock serializes this first call).
        let pw = unsafe { libc::getpwnam(name.as_ptr()) };
        if pw.is_null() {
            panic!(
                "the tests run as root, and PostgreSQL refuses to run as root, but there is no \
                 `postgres` OS user to run it as (install PostgreSQL 15 from the distribution, \
                 or run the tests as an ordinary user)"
            );
        }
        // SAFETY: pw is non-null and points to a valid passwd entry.
        let (uid, gid) = unsafe { ((*pw).pw_uid, (*pw).pw_gid) };
        Some((uid, gid))
    })
}

/// Makes `cmd` run as the `postgres` user when we are root, with a clean PostgreSQL
/// environment (no inherited PG* variables, C locale).
pub fn as_pg_user(cmd: &mut Command) -> &mut Command {
    if let Some((uid, gid)) = pg_user() {
        cmd.uid(uid).gid(gid);
    }
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("PG") {
            cmd.env_remove(key);
        }
    }
    cmd.env("LC_ALL", "C").env("LANG", "C");
    cmd
}

/// Gives `path` to the `postgres` user (no-op when not root). Not recursive.
pub fn chown_pg(path: &Path) {
    if let Some((uid, gid)) = pg_user() {
        std::os::unix::fs::lchown(path, Some(uid), Some(gid))
            .unwrap_or_else(|e| panic!("chown postgres {}: {e}", path.display()));
    }
}

/// Gives `path` and everything below it to the `postgres` user (no-op when not root).
pub fn chown_pg_recursive(path: &Path) {
    if pg_user().is_none() {
        return;
    }
    chown_pg(path);
    let meta =
        fs::symlink_metadata(path).unwrap_or_else(|e| panic!("stat {}: {e}", path.display()));
    if meta.is_dir() {
        for entry in
            fs::read_dir(path).unwrap_or_else(|e| panic!("read_dir {}: {e}", path.display()))
        {
            chown_pg_recursive(&entry.unwrap().path());
        }
    }
}

/// `chmod mode path`.
pub fn chmod(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {mode:o} {}: {e}", path.display()));
}
