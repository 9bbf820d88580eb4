//! Durable file writes: data fsynced, renamed or linked into place, directory fsynced.
//!
//! A file written through these functions is either absent or complete under its final
//! name, after a crash at any point; the temporary names start with `.tmp.` so they are
//! never mistaken for real objects.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

/// A filesystem to `syncfs(2)`, through a descriptor opened once: Linux (5.8 and later)
/// reports to it every writeback error on that filesystem since it was opened, so open it
/// before writing what a later [`sync`](FsSync::sync) must cover.
pub struct FsSync {
    dir: File,
}

impl FsSync {
    /// The filesystem holding `path`.
    pub fn open(path: &Path) -> io::Result<FsSync> {
        Ok(FsSync {
            dir: File::open(path)?,
        })
    }

    /// Every dirty file, directory and inode of the filesystem reaches the disk; an error
    /// if writeback failed anywhere on it since [`open`](FsSync::open) (or the last error
    /// this returned).
    pub fn sync(&self) -> io::Result<()> {
        use std::os::fd::AsRawFd;
        // SAFETY: syncfs on a descriptor we own and keep open for the call.
        if unsafe { libc::syncfs(self.dir.as_raw_fd()) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// fsyncs a directory, making renames and creations inside it durable.
pub fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// A temporary path beside `target`, unique to this process and call.
pub fn temp_path_beside(target: &Path) -> PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    target.with_file_name(format!(".tmp.{name}.{}.{n}", std::process::id()))
}

fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Renames a fully written and fsynced `tmp` over `target`, then fsyncs the directory.
pub fn durable_rename(tmp: &Path, target: &Path) -> io::Result<()> {
    std::fs::rename(tmp, target)?;
    fsync_dir(parent(target))
}

/// Links a fully written and fsynced `tmp` to `target` only if `target` does not exist
/// (create-only), removes `tmp`, then fsyncs the directory. Returns `Ok(false)` when
/// `target` already existed (nothing changed).
pub fn durable_link_new(tmp: &Path, target: &Path) -> io::Result<bool> {
    let result = std::fs::hard_link(tmp, target);
    let _ = std::fs::remove_file(tmp);
    match result {
        Ok(()) => {
            fsync_dir(parent(target))?;
            Ok(true)
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_new_never_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("obj");
        let a = temp_path_beside(&target);
        std::fs::write(&a, b"first").unwrap();
        assert!(durable_link_new(&a, &target).unwrap());
        let b = temp_path_beside(&target);
        std::fs::write(&b, b"second").unwrap();
        assert!(!durable_link_new(&b, &target).unwrap());
        assert_eq!(std::fs::read(&target).unwrap(), b"first");
        assert!(!a.exists() && !b.exists());
    }
}
