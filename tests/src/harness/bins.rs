//! The binaries under test: `archived`, `pushclient` and `pullclient`, found in the
//! cargo target directory and copied (or hard-linked) into a temp dir the `postgres`
//! user can execute from.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use super::users::chmod;

/// Where cargo put the binaries under test: the directory above the test executable's
/// `deps/` (e.g. target/debug), or `WALVAULT_BIN_DIR`.
pub fn target_bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("WALVAULT_BIN_DIR") {
        return PathBuf::from(d);
    }
    let exe = std::env::current_exe().expect("current_exe");
    let mut dir = exe
        .parent()
        .expect("test executable has a parent dir")
        .to_path_buf();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.pop();
    }
    dir
}

/// The three binaries under test, copied (or hard-linked) where `postgres` can run them.
#[derive(Clone, Debug)]
pub struct Binaries {
    dir: PathBuf,
}

/// Names of the binaries under test.
pub const BINARIES: [&str; 3] = ["archived", "pushclient", "pullclient"];

impl Binaries {
    /// Copies the binaries from the target dir into `dest` (created, mode 0755).
    pub fn copy_to(dest: &Path) -> Binaries {
        let src = target_bin_dir();
        fs::create_dir_all(dest).unwrap_or_else(|e| panic!("mkdir {}: {e}", dest.display()));
        chmod(dest, 0o755);
        for name in BINARIES {
            let from = src.join(name);
            if !from.is_file() {
                panic!(
                    "{} is missing: build the binaries first: cargo build --workspace --bins",
                    from.display()
                );
            }
            let to = dest.join(name);
            // A hard link is as good as a copy (the path is under /tmp; cargo replaces
            // rather than rewrites its outputs) when everyone may run the file; the debug
            // binaries are large, so link when possible.
            let world_runnable =
                fs::metadata(&from).is_ok_and(|m| m.permissions().mode() & 0o005 == 0o005);
            if !(world_runnable && fs::hard_link(&from, &to).is_ok()) {
                fs::copy(&from, &to)
                    .unwrap_or_else(|e| panic!("copy {} -> {}: {e}", from.display(), to.display()));
                chmod(&to, 0o755);
            }
        }
        Binaries {
            dir: dest.to_path_buf(),
        }
    }

    /// The dir holding them.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `archived`.
    pub fn archived(&self) -> PathBuf {
        self.dir.join("archived")
    }

    /// `pushclient`.
    pub fn pushclient(&self) -> PathBuf {
        self.dir.join("pushclient")
    }

    /// `pullclient`.
    pub fn pullclient(&self) -> PathBuf {
        self.dir.join("pullclient")
    }
}

/// Pids of the running processes whose `argv[0]` is `program` (e.g. a pushclient run by
/// PostgreSQL's archiver from this test's bin dir).
pub fn processes_running(program: &Path) -> Vec<u32> {
    let want = program.as_os_str().as_encoded_bytes();
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.split(|b| *b == 0).next() == Some(want))
        })
        .collect()
}
