//! The binaries under test: `archived`, `pushclient` and `pullclient`, found in the
//! cargo target directory and copied (or hard-linked) into a temp dir the `postgres`
//! user can execute from.
//!
//! `cargo nextest run` builds the test executable but not the binaries, so the tests
//! could run yesterday's `archived`. Before the first copy, each binary is checked
//! against cargo's dep-info file beside it (`target/debug/archived.d`, every source file
//! the binary was built from): a source modified after the binary was linked, or gone,
//! fails every test with the command to run. (Not against the test executable: editing
//! only a test makes it newer than binaries that are up to date, and `cargo build` then
//! leaves them untouched.) `WALVAULT_BIN_DIR` binaries are not checked.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::SystemTime;

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
        if std::env::var_os("WALVAULT_BIN_DIR").is_none() {
            check_fresh(&src);
        }
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

/// Panics, in every test of this process, if a binary in `dir` is missing or older than
/// a source it was built from (see the module header).
fn check_fresh(dir: &Path) {
    static VERDICT: OnceLock<Option<String>> = OnceLock::new();
    let verdict = VERDICT.get_or_init(|| {
        let mut problems = Vec::new();
        for name in BINARIES {
            let binary = dir.join(name);
            if !binary.is_file() {
                problems.push(format!("{} is missing", binary.display()));
                continue;
            }
            match stale_sources(&binary, &dir.join(format!("{name}.d"))) {
                Ok(stale) => problems.extend(
                    stale
                        .into_iter()
                        .map(|s| format!("{} is older than {s}", binary.display())),
                ),
                Err(e) => problems.push(e),
            }
        }
        (!problems.is_empty()).then(|| problems.join("\n"))
    });
    if let Some(problems) = verdict {
        panic!(
            "the binaries under test are not built from the current sources:\n{problems}\n\
             The end-to-end tests run the binaries in {}; build them first:\n    \
             cargo build --workspace --bins\n\
             (or set WALVAULT_BIN_DIR to run binaries from elsewhere, unchecked)",
            dir.display()
        );
    }
}

/// The sources listed in `dep_info` (cargo's `target/debug/NAME.d`: `TARGET: SRC SRC...`,
/// spaces in paths escaped as `\ `) that were modified after `binary` or no longer exist,
/// each described for a message. Errors say why the check cannot be made.
pub fn stale_sources(binary: &Path, dep_info: &Path) -> Result<Vec<String>, String> {
    let built = modified(binary).map_err(|e| format!("cannot stat {}: {e}", binary.display()))?;
    let text = fs::read_to_string(dep_info).map_err(|e| {
        format!(
            "cannot check that {} is up to date: cargo's dep-info file {} is unreadable ({e})",
            binary.display(),
            dep_info.display()
        )
    })?;
    let first = text.lines().next().unwrap_or_default();
    let Some((_, deps)) = first.split_once(": ") else {
        return Err(format!(
            "cannot check that {} is up to date: {} is not a dep-info file (no `TARGET: SOURCES`)",
            binary.display(),
            dep_info.display()
        ));
    };
    let mut stale = Vec::new();
    for source in split_escaped(deps) {
        let path = Path::new(&source);
        match modified(path) {
            Ok(t) if t > built => {
                stale.push(format!("{source} (modified after the binary was built)"))
            }
            Ok(_) => {}
            Err(_) => stale.push(format!("{source} (a source it was built from, now gone)")),
        }
    }
    Ok(stale)
}

fn modified(path: &Path) -> std::io::Result<SystemTime> {
    fs::metadata(path)?.modified()
}

/// Splits a dep-info source list at unescaped spaces, unescaping `\ `.
fn split_escaped(list: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    let mut chars = list.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some(' ') => current.push(' '),
                Some(other) => {
                    current.push('\\');
                    current.push(other);
                }
                None => current.push('\\'),
            },
            ' ' => {
                if !current.is_empty() {
                    out.push(std::mem::take(&mut current));
                }
            }
            c => current.push(c),
        }
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

#[cfg(test)]
mod tests {
    use std::fs::File;
    use std::time::Duration;

    use super::*;

    fn touch(path: &Path, at: SystemTime) {
        let f = File::create(path).unwrap();
        f.set_modified(at).unwrap();
    }

    #[test]
    fn a_source_newer_than_the_binary_or_gone_makes_it_stale() {
        let dir = tempfile::tempdir().unwrap();
        let built = SystemTime::now() - Duration::from_secs(3600);
        let binary = dir.path().join("archived");
        touch(&binary, built);
        let old = dir.path().join("old.rs");
        touch(&old, built - Duration::from_secs(60));
        let spaced = dir.path().join("with space.rs");
        touch(&spaced, built - Duration::from_secs(60));
        let dep_info = dir.path().join("archived.d");
        let write_dep_info = |sources: &[&Path]| {
            let list: Vec<String> = sources
                .iter()
                .map(|p| p.display().to_string().replace(' ', "\\ "))
                .collect();
            fs::write(
                &dep_info,
                format!("{}: {}\n", binary.display(), list.join(" ")),
            )
            .unwrap();
        };

        write_dep_info(&[&old, &spaced]);
        assert_eq!(stale_sources(&binary, &dep_info), Ok(vec![]));

        touch(&spaced, built + Duration::from_secs(60));
        let stale = stale_sources(&binary, &dep_info).unwrap();
        assert_eq!(stale.len(), 1, "{stale:?}");
        assert!(
            stale[0].starts_with(&spaced.display().to_string()),
            "{stale:?}"
        );

        let gone = dir.path().join("gone.rs");
        write_dep_info(&[&old, &gone]);
        let stale = stale_sources(&binary, &dep_info).unwrap();
        assert_eq!(stale.len(), 1, "{stale:?}");
        assert!(stale[0].contains("now gone"), "{stale:?}");
    }

    #[test]
    fn without_a_dep_info_file_the_check_says_it_cannot_be_made() {
        let dir = tempfile::tempdir().unwrap();
        let binary = dir.path().join("archived");
        touch(&binary, SystemTime::now());
        let err = stale_sources(&binary, &dir.path().join("archived.d")).unwrap_err();
        assert!(err.contains("dep-info"), "{err}");
    }
}
