//! `--delta`: what an existing data directory already has right (chunk hashes), what it
//! has that the backup lacks (removed), and the refusal to touch a directory a live
//! PostgreSQL runs in.

use std::collections::BTreeSet;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use walvault_protocol::core::format::manifest::{chunk_range, FileEntry};

/// Removes what is under `root` but not in `keep` (delta restores); never follows
/// symlinks.
pub(super) fn remove_extra(
    root: &Path,
    rel: &Path,
    keep: &BTreeSet<PathBuf>,
    removed: &mut u64,
) -> Result<()> {
    let dir = root.join(rel);
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(anyhow!(e).context(format!("cannot list {}", dir.display()))),
    };
    for entry in entries {
        let entry = entry?;
        let rel_path = rel.join(entry.file_name());
        let full = root.join(&rel_path);
        let ft = entry.file_type()?;
        if ft.is_dir() {
            if keep.contains(&full) {
                remove_extra(root, &rel_path, keep, removed)?;
            } else {
                std::fs::remove_dir_all(&full)
                    .with_context(|| format!("cannot remove {}", full.display()))?;
                *removed += 1;
            }
        } else if !keep.contains(&full) || ft.is_symlink() {
            std::fs::remove_file(&full)
                .with_context(|| format!("cannot remove {}", full.display()))?;
            *removed += 1;
        }
    }
    Ok(())
}

/// Hashes the chunks of an existing file; the indexes that differ from `f` (all, if the
/// file is missing or not a regular file).
pub(super) fn differing_chunks(path: &Path, f: &FileEntry, chunk_size: u64) -> Result<Vec<usize>> {
    let all = || (0..f.chunks.len()).collect::<Vec<_>>();
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_file() => m,
        _ => return Ok(all()),
    };
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut buf = vec![0u8; chunk_size as usize];
    let mut out = Vec::new();
    for (i, want) in f.chunks.iter().enumerate() {
        let range = chunk_range(f.size, chunk_size, i as u64);
        if range.end > meta.len() {
            out.push(i);
            continue;
        }
        let len = (range.end - range.start) as usize;
        file.read_exact_at(&mut buf[..len], range.start)
            .with_context(|| format!("cannot read {}", path.display()))?;
        if blake3::hash(&buf[..len]).to_hex().as_str() != want {
            out.push(i);
        }
    }
    Ok(out)
}

/// Refuses a data directory whose `postmaster.pid` names a live process, as pgBackRest
/// does. A `postmaster.pid` whose process is gone (a crash) is no obstacle: `--delta`
/// removes it with every other file the backup does not have. A pid that another process
/// has taken over since is refused too: this cannot tell it from PostgreSQL, the operator
/// can (the message says how).
pub(super) fn refuse_running_server(pgdata: &Path) -> Result<()> {
    use walvault_protocol::net::pgsetup::Postmaster;
    let pid_file = pgdata.join("postmaster.pid");
    match Postmaster::of(pgdata) {
        Postmaster::None | Postmaster::Stale(_) => Ok(()),
        Postmaster::Unreadable(e) => Err(e).with_context(|| {
            format!(
                "cannot read {} to check that PostgreSQL is not running there",
                pid_file.display()
            )
        }),
        Postmaster::Garbled => bail!(
            "{} does not start with a process id, so whether PostgreSQL runs in {} is unknown: \
             stop PostgreSQL (pg_ctl -D {} stop), or if none runs there, remove postmaster.pid",
            pid_file.display(),
            pgdata.display(),
            pgdata.display()
        ),
        Postmaster::Live(pid) => bail!(
            "PostgreSQL is running in {}: postmaster.pid names live process {pid}; stop it first \
             (pg_ctl -D {} stop -m fast) and run the restore again. If that process is not \
             PostgreSQL (a stale postmaster.pid whose pid was reused), remove {}",
            pgdata.display(),
            pgdata.display(),
            pid_file.display()
        ),
    }
}
