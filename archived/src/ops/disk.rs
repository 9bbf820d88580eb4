//! Free space of the filesystems archived writes to: the data directory (catalog, the
//! streaming receiver's unfinished segments, an object store's upload spool) and, when
//! the store is local, the store. Read with statvfs(3) at the time of a scrape or a
//! check: space available to an unprivileged writer (`f_bavail`), as archived is one.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// A filesystem archived writes to, by what it holds.
#[derive(Clone, Debug)]
pub(crate) struct Volume {
    /// `data` (the data directory) or `store` (a local store): the metrics' label.
    pub(crate) name: &'static str,
    pub(crate) path: PathBuf,
}

/// What a filesystem has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Space {
    /// Bytes an unprivileged writer may still use.
    pub(crate) free: u64,
    /// The filesystem's size.
    pub(crate) size: u64,
    /// Its device: two volumes on one filesystem are reported once.
    pub(crate) device: u64,
}

impl Space {
    /// Free space in percent of the size (0 for an empty-sized filesystem).
    pub(crate) fn free_percent(&self) -> f64 {
        if self.size == 0 {
            return 0.0;
        }
        self.free as f64 * 100.0 / self.size as f64
    }
}

/// The space of the filesystem holding `path`.
pub(crate) fn space(path: &Path) -> std::io::Result<Space> {
    use std::os::unix::ffi::OsStrExt;
    let device = std::fs::metadata(path)?.dev();
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::other("a path with a NUL byte"))?;
    // SAFETY: statvfs(3) with a NUL-terminated path and a zeroed out-struct it fills.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let unit = st.f_frsize as u64;
    Ok(Space {
        free: st.f_bavail as u64 * unit,
        size: st.f_blocks as u64 * unit,
        device,
    })
}

/// Each volume with its space (or why it could not be read), a volume on the same
/// filesystem as an earlier one left out.
pub(crate) fn volumes(volumes: &[Volume]) -> Vec<(Volume, std::io::Result<Space>)> {
    let mut seen = Vec::new();
    let mut out = Vec::new();
    for v in volumes {
        let s = space(&v.path);
        if let Ok(s) = &s {
            if seen.contains(&s.device) {
                continue;
            }
            seen.push(s.device);
        }
        out.push((v.clone(), s));
    }
    out
}

/// Bytes for people: "512 MiB", "42.1 GiB".
pub(crate) fn bytes_text(n: u64) -> String {
    const GIB: f64 = (1u64 << 30) as f64;
    if n >= 1 << 30 {
        format!("{:.1} GiB", n as f64 / GIB)
    } else {
        format!("{} MiB", n >> 20)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_space_of_a_directory_agrees_with_df_and_one_filesystem_counts_once() {
        let dir = tempfile::tempdir().unwrap();
        let s = space(dir.path()).unwrap();
        assert!(s.size > 0 && s.free <= s.size, "{s:?}");
        let out = std::process::Command::new("df")
            .args(["--output=size,avail", "-B1"])
            .arg(dir.path())
            .output()
            .expect("df (coreutils)");
        let text = String::from_utf8_lossy(&out.stdout);
        let nums: Vec<u64> = text
            .lines()
            .nth(1)
            .unwrap()
            .split_whitespace()
            .map(|n| n.parse().unwrap())
            .collect();
        assert_eq!(nums[0], s.size, "df says {text}");
        // Free space moves with other writers: within 1%.
        assert!(
            nums[1].abs_diff(s.free) <= s.size / 100,
            "df says {text}, statvfs {s:?}"
        );
        let both = volumes(&[
            Volume {
                name: "data",
                path: dir.path().to_path_buf(),
            },
            Volume {
                name: "store",
                path: dir.path().join("."),
            },
        ]);
        assert_eq!(both.len(), 1);
        assert!(space(&dir.path().join("missing")).is_err());
        assert_eq!(bytes_text(3 << 29), "1.5 GiB");
    }
}
