//! Durable file writes: data fsynced, renamed or linked into place, directory fsynced.
//!
//! A file written through these functions is either absent or complete under its final
//! name, after a crash at any point; the temporary names start with `.tmp.` so they are
//! never mistaken for real objects. A directory made by [`create_dir_durable`] is
//! durable in its parent, each component it creates, before it returns (PostgreSQL's
//! `fsync_parent_path`): a file acknowledged inside it cannot vanish with its directory
//! after a power loss.

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

/// Creates `dir` and each missing ancestor (mode 0777 less the umask), fsyncing the parent
/// of every component it creates; what exists already is left as it is.
pub fn create_dir_durable(dir: &Path) -> io::Result<()> {
    create_dir_durable_mode(dir, 0o777)
}

/// [`create_dir_durable`] with `mode` (less the umask) for every component it creates.
/// A component that exists but is not a directory is refused, naming it.
pub fn create_dir_durable_mode(dir: &Path, mode: u32) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    let not_a_dir = |p: &Path| {
        io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!(
                "cannot create directory {}: {} exists and is not a directory",
                dir.display(),
                p.display()
            ),
        )
    };
    // The missing components, deepest first; ENOTDIR means a file is in the way higher
    // up, named when the walk reaches it.
    let mut missing = Vec::new();
    let mut at = dir;
    loop {
        match std::fs::metadata(at) {
            Ok(m) if m.is_dir() => break,
            Ok(_) => return Err(not_a_dir(at)),
            Err(e)
                if e.kind() == io::ErrorKind::NotFound
                    || e.raw_os_error() == Some(libc::ENOTDIR) =>
            {
                missing.push(at);
                match at.parent() {
                    Some(p) if !p.as_os_str().is_empty() => at = p,
                    _ => break,
                }
            }
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!(
                        "cannot create directory {}: {}: {e}",
                        dir.display(),
                        at.display()
                    ),
                ))
            }
        }
    }
    for component in missing.iter().rev() {
        match std::fs::DirBuilder::new().mode(mode).create(component) {
            Ok(()) => {}
            // Made meanwhile by someone else: still fsynced into its parent below, as
            // our caller may acknowledge what it puts inside before the other one does.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && component.is_dir() => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Err(not_a_dir(component)),
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("cannot create directory {}: {e}", component.display()),
                ))
            }
        }
        fsync_dir(parent(component)).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "cannot fsync {} after creating {}: {e}",
                    parent(component).display(),
                    component.display()
                ),
            )
        })?;
    }
    Ok(())
}

/// Replaces `target` with `contents` through a temporary file beside it and a rename, so
/// a reader sees the old file or the whole new one, never a part (not fsynced: for files
/// people and tests read, such as a bound address or a status).
pub fn write_replacing(target: &Path, contents: &[u8]) -> io::Result<()> {
    let tmp = temp_path_beside(target);
    let written = std::fs::write(&tmp, contents).and_then(|()| std::fs::rename(&tmp, target));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
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

    /// What can be checked without a power cut: every component is created, existing
    /// ones are kept, a file in the way is refused by name. That each creation is fsynced
    /// into its parent cannot be observed after the fact; the code says so (one
    /// `fsync_dir` of the parent per component created) and review checks that the
    /// store, the catalog and the spool create their directories through this function.
    #[test]
    fn create_dir_durable_creates_each_component_and_refuses_a_file_in_the_way() {
        let tmp = tempfile::tempdir().unwrap();
        let deep = tmp.path().join("a/b/c");
        create_dir_durable(&deep).unwrap();
        for p in ["a", "a/b", "a/b/c"] {
            assert!(tmp.path().join(p).is_dir(), "{p} missing");
        }
        // Some components exist already (and one holds a file that must stay).
        std::fs::write(tmp.path().join("a/b/keep"), b"x").unwrap();
        create_dir_durable(&tmp.path().join("a/b/d/e")).unwrap();
        assert!(tmp.path().join("a/b/d/e").is_dir());
        assert_eq!(std::fs::read(tmp.path().join("a/b/keep")).unwrap(), b"x");
        // Everything exists: nothing to do.
        create_dir_durable(&deep).unwrap();

        // A file where a directory should be, at the end or higher up.
        let file = tmp.path().join("a/f");
        std::fs::write(&file, b"").unwrap();
        for target in [file.clone(), file.join("g/h")] {
            let e = create_dir_durable(&target).unwrap_err();
            let msg = e.to_string();
            assert!(
                msg.contains(&format!("{} exists and is not a directory", file.display())),
                "{msg}"
            );
        }
        assert!(!file.join("g").exists());

        // A mode for what it creates (the spool's 0700).
        use std::os::unix::fs::PermissionsExt;
        let private = tmp.path().join("p/q");
        create_dir_durable_mode(&private, 0o700).unwrap();
        for p in ["p", "p/q"] {
            let mode = std::fs::metadata(tmp.path().join(p))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o700, "{p}");
        }
    }

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
