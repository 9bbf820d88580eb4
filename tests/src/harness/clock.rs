//! A skewed wall clock for a client under test: [`SkewedClock`] builds (with the system C
//! compiler) a small `LD_PRELOAD` library whose `clock_gettime` adds a fixed offset to
//! `CLOCK_REALTIME` (and its coarse variant), the call Rust's `SystemTime::now` makes.
//! Monotonic clocks are untouched, so timeouts and sleeps behave. It models a client
//! host whose clock is off, beside PostgreSQL on a correct one.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::cmd::try_run;
use super::files::TestDir;
use super::users::chmod;

const SOURCE: &str = r#"
#define _GNU_SOURCE
#include <dlfcn.h>
#include <time.h>

static int (*real_clock_gettime)(clockid_t, struct timespec *);

int clock_gettime(clockid_t id, struct timespec *ts) {
    if (!real_clock_gettime)
        real_clock_gettime = (int (*)(clockid_t, struct timespec *))dlsym(RTLD_NEXT, "clock_gettime");
    int r = real_clock_gettime(id, ts);
    if (r == 0 && (id == CLOCK_REALTIME || id == CLOCK_REALTIME_COARSE))
        ts->tv_sec += SKEW_SECONDS;
    return r;
}
"#;

/// An `LD_PRELOAD` library that moves the wall clock by a fixed number of seconds.
pub struct SkewedClock {
    _dir: TestDir,
    library: PathBuf,
    /// The offset, seconds (positive: the client's clock is ahead).
    pub seconds: i64,
}

impl SkewedClock {
    /// Builds the library for `seconds` of skew.
    pub fn build(seconds: i64) -> SkewedClock {
        let dir = TestDir::new("clock-skew");
        let source = dir.join("skew.c");
        std::fs::write(&source, SOURCE).unwrap();
        let library = dir.join("skew.so");
        let out = try_run(
            Command::new("cc")
                .args(["-shared", "-fPIC", "-O1"])
                .arg(format!("-DSKEW_SECONDS={seconds}L"))
                .arg("-o")
                .arg(&library)
                .arg(&source)
                .arg("-ldl"),
        );
        assert!(
            out.success(),
            "cannot build the clock-skew library\n{}",
            out.describe()
        );
        chmod(&library, 0o755);
        SkewedClock {
            _dir: dir,
            library,
            seconds,
        }
    }

    /// The library, for `LD_PRELOAD`.
    pub fn library(&self) -> &Path {
        &self.library
    }
}
