//! Running commands and waiting on conditions: every failure message carries the command
//! line, its exit status, its stdout and stderr (tails), and what was awaited.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use super::files::{read_lossy, tail_file};

/// Timeout for a single harness command (initdb, psql, pg_ctl, archived admin...).
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);

/// Default bound of the waits in the tests.
pub const WAIT_TIMEOUT: Duration = Duration::from_secs(60);

/// What a finished command said.
#[derive(Debug)]
pub struct Output {
    /// The command line, for messages.
    pub command: String,
    /// Exit status.
    pub status: ExitStatus,
    /// Standard output (lossy UTF-8).
    pub stdout: String,
    /// Standard error (lossy UTF-8).
    pub stderr: String,
}

impl Output {
    /// Exit code, or `None` if killed by a signal.
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// Whether it exited 0.
    pub fn success(&self) -> bool {
        self.status.success()
    }

    /// A description for failure messages.
    pub fn describe(&self) -> String {
        format!(
            "command: {}\nexit: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.command,
            self.status,
            tail_str(&self.stdout, 60),
            tail_str(&self.stderr, 60)
        )
    }
}

/// A command line as a string, for messages.
pub fn describe_command(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        s.push(' ');
        let a = arg.to_string_lossy();
        if a.is_empty() || a.contains(|c: char| c.is_whitespace() || c == '\'' || c == '"') {
            s.push_str(&format!("{a:?}"));
        } else {
            s.push_str(&a);
        }
    }
    s
}

/// Runs `cmd` to completion (stdin closed, stdout and stderr captured), killing it after
/// `timeout`. Panics only if it cannot be started or times out.
pub fn try_run_timeout(cmd: &mut Command, timeout: Duration) -> Output {
    let command = describe_command(cmd);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start `{command}`: {e}"));
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out_t = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let err_t = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                let stdout =
                    String::from_utf8_lossy(&out_t.join().unwrap_or_default()).into_owned();
                let stderr =
                    String::from_utf8_lossy(&err_t.join().unwrap_or_default()).into_owned();
                panic!(
                    "`{command}` did not finish within {timeout:?} (killed)\n--- stdout ---\n{}\n--- stderr ---\n{}",
                    tail_str(&stdout, 60),
                    tail_str(&stderr, 60)
                );
            }
            Ok(None) => thread::sleep(Duration::from_millis(10)),
            Err(e) => panic!("waiting for `{command}`: {e}"),
        }
    };
    let stdout = String::from_utf8_lossy(&out_t.join().unwrap_or_default()).into_owned();
    let stderr = String::from_utf8_lossy(&err_t.join().unwrap_or_default()).into_owned();
    Output {
        command,
        status,
        stdout,
        stderr,
    }
}

/// [`try_run_timeout`] with [`COMMAND_TIMEOUT`].
pub fn try_run(cmd: &mut Command) -> Output {
    try_run_timeout(cmd, COMMAND_TIMEOUT)
}

/// Runs `cmd` and panics, saying `what` failed, unless it exits 0.
pub fn run(what: &str, cmd: &mut Command) -> Output {
    let out = try_run(cmd);
    if !out.success() {
        panic!("{what} failed\n{}", out.describe());
    }
    out
}

/// A process running in the background, its stdout and stderr going to files; killed
/// (SIGKILL) when dropped.
pub struct BgProcess {
    what: String,
    child: Option<Child>,
    stdout_path: PathBuf,
    stderr_path: PathBuf,
}

impl BgProcess {
    /// Spawns `cmd`, stdout and stderr to `<log_prefix>.stdout` / `<log_prefix>.stderr`.
    pub fn spawn(what: &str, cmd: &mut Command, log_prefix: &Path) -> BgProcess {
        let stdout_path = log_prefix.with_extension("stdout");
        let stderr_path = log_prefix.with_extension("stderr");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(open_append(&stdout_path))
            .stderr(open_append(&stderr_path))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what} (`{}`): {e}", describe_command(cmd)));
        BgProcess {
            what: what.into(),
            child: Some(child),
            stdout_path,
            stderr_path,
        }
    }

    /// Process id.
    pub fn id(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Whether it has exited (and its status).
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Waits for it to exit on its own; panics after `timeout` (killing it).
    pub fn wait(mut self, timeout: Duration) -> (ExitStatus, String, String) {
        let mut child = self.child.take().unwrap();
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "{} did not finish within {timeout:?} (killed)\n--- stdout ---\n{}\n--- stderr ---\n{}",
                    self.what,
                    tail_file(&self.stdout_path, 40),
                    tail_file(&self.stderr_path, 40)
                );
            }
            thread::sleep(Duration::from_millis(20));
        };
        (
            status,
            read_lossy(&self.stdout_path),
            read_lossy(&self.stderr_path),
        )
    }

    /// Sends `signal` and waits for the exit (up to `timeout`, then SIGKILL).
    pub fn signal_and_wait(&mut self, signal: i32, timeout: Duration) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        // SAFETY: kill(2) on our own child's pid, which we have not reaped yet.
        unsafe { libc::kill(child.id() as libc::pid_t, signal) };
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = child.try_wait().unwrap() {
                return Some(s);
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stderr so far.
    pub fn stderr_tail(&self, lines: usize) -> String {
        tail_file(&self.stderr_path, lines)
    }
}

impl Drop for BgProcess {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub(crate) fn open_append(path: &Path) -> fs::File {
    fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

/// Polls `cond` every 100 ms until it returns `Some`; after `timeout` panics saying what
/// was awaited, with `diag()` (log tails, state) appended.
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut cond: impl FnMut() -> Option<T>,
    diag: impl FnOnce() -> String,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = cond() {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}\n{}", diag());
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// [`wait_for`] with a boolean condition.
pub fn wait_until(
    what: &str,
    timeout: Duration,
    mut cond: impl FnMut() -> bool,
    diag: impl FnOnce() -> String,
) {
    wait_for(what, timeout, || cond().then_some(()), diag)
}

/// The last `lines` lines of `s`.
pub fn tail_str(s: &str, lines: usize) -> String {
    let all: Vec<&str> = s.lines().collect();
    let start = all.len().saturating_sub(lines);
    let mut t = all[start..].join("\n");
    if start > 0 {
        t = format!("[... {start} lines before ...]\n{t}");
    }
    t
}
