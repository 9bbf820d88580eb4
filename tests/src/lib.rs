//! Test harness: temp dirs, the binaries under test, archived, PostgreSQL clusters.
//!
//! Everything here panics with a message saying what failed (the command line, its exit
//! status, its stdout and stderr, and the relevant log tails): a harness failure must be
//! diagnosable from the test output alone.
//!
//! - [`TestDir`]: a world-traversable temp dir under /tmp (kept when `WALVAULT_KEEP_TMP`
//!   is set, for post-mortems).
//! - [`Binaries`]: `archived`, `pushclient` and `pullclient` copied from the cargo target
//!   directory into a temp dir the `postgres` user can execute from.
//! - [`Archive`]: a running `archived serve` on 127.0.0.1, on a UDP port the kernel picked.
//! - [`PgCluster`]: a PostgreSQL 15 cluster in its own temp dir on its own Unix socket.
//! - [`MotoServer`]: an S3 server (`moto_server`, PyPI `moto[server]`) on a 127.0.0.1
//!   TCP port the kernel picked, for archives whose store is `s3://`
//!   ([`Archive::start_s3`]).
//!
//! PostgreSQL refuses to run as root: when the tests run as root, every PostgreSQL
//! program (and every client the tests run on PostgreSQL's behalf) runs as the `postgres`
//! OS user.

use std::ffi::CString;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

pub use serde_json;

/// Where PostgreSQL 15 lives (override with `WALVAULT_PG_BIN`).
pub const DEFAULT_PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// Timeout for a single harness command (initdb, psql, pg_ctl, archived admin...).
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);

/// Default bound of the waits in the tests.
pub const WAIT_TIMEOUT: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------
// Users and permissions
// ---------------------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------------------
// Running commands
// ---------------------------------------------------------------------------------------

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

fn open_append(path: &Path) -> fs::File {
    fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

// ---------------------------------------------------------------------------------------
// Waiting and diagnostics
// ---------------------------------------------------------------------------------------

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

/// A file's content, lossily decoded; empty if it cannot be read.
pub fn read_lossy(path: &Path) -> String {
    fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// The last `lines` lines of a file (or a note that it cannot be read).
pub fn tail_file(path: &Path, lines: usize) -> String {
    match fs::read(path) {
        Ok(b) => tail_str(&String::from_utf8_lossy(&b), lines),
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

/// blake3 of some bytes, as hex.
pub fn b3(bytes: &[u8]) -> String {
    blake3::hash(bytes).to_hex().to_string()
}

/// blake3 of a file, read in pieces (for files too large to hold).
pub fn b3_file(path: &Path) -> blake3::Hash {
    let mut hasher = blake3::Hasher::new();
    hasher
        .update_reader(
            fs::File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display())),
        )
        .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    hasher.finalize()
}

// ---------------------------------------------------------------------------------------
// Temp dirs and binaries
// ---------------------------------------------------------------------------------------

/// A temp dir under /tmp, mode 0755 so the `postgres` user can traverse it. Removed on
/// drop unless `WALVAULT_KEEP_TMP` is set.
pub struct TestDir {
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
}

impl TestDir {
    /// Creates `/tmp/walvault-<label>-XXXXXX`.
    pub fn new(label: &str) -> TestDir {
        let dir = tempfile::Builder::new()
            .prefix(&format!("walvault-{label}-"))
            .tempdir_in("/tmp")
            .unwrap_or_else(|e| panic!("cannot create a temp dir in /tmp: {e}"));
        let path = dir.path().to_path_buf();
        chmod(&path, 0o755);
        TestDir {
            dir: Some(dir),
            path,
        }
    }

    /// The dir.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A path inside.
    pub fn join(&self, p: impl AsRef<Path>) -> PathBuf {
        self.path.join(p)
    }

    /// Creates a subdir (mode 0755) and returns it.
    pub fn subdir(&self, name: &str) -> PathBuf {
        let p = self.path.join(name);
        fs::create_dir_all(&p).unwrap_or_else(|e| panic!("mkdir {}: {e}", p.display()));
        chmod(&p, 0o755);
        p
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if std::env::var_os("WALVAULT_KEEP_TMP").is_some() {
            if let Some(d) = self.dir.take() {
                eprintln!("keeping {}", d.keep().display());
            }
        }
    }
}

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

// ---------------------------------------------------------------------------------------
// archived
// ---------------------------------------------------------------------------------------

/// What the harness gives `archived init --listen`: port 0, the kernel picks at `serve`.
const UNBOUND_LISTEN: &str = "127.0.0.1:0";

/// A running `archived serve` with its own data dir and port; killed when dropped.
///
/// The port is the kernel's pick: `archived init --listen 127.0.0.1:0`, then `serve
/// --listen-address-file` reports the bound address, which the harness writes into
/// `archived.toml` (so restarts keep the port, and `issue` writes it into client
/// configs) and `admin.toml`. No port is ever chosen by binding and releasing, which
/// races with every other test run on the machine.
pub struct Archive {
    dir: TestDir,
    bins: Binaries,
    data_dir: PathBuf,
    conf_dir: PathBuf,
    /// 0 until the first `serve` has bound.
    port: u16,
    ready_cluster: String,
    server: Option<BgProcess>,
    log_prefix: PathBuf,
    env: Vec<(String, String)>,
}

impl Archive {
    /// `archived init` + `archived serve`, waiting until it answers `wal list` for
    /// `cluster`.
    pub fn start(cluster: &str) -> Archive {
        Archive::start_configured(cluster, |_| {}, Vec::new())
    }

    /// [`start`](Self::start) with the store in `s3://BUCKET/PREFIX` on `moto` (the bucket
    /// is created): the endpoint and plain HTTP in archived.toml's `[storage_options]`,
    /// credentials and region in the environment (`AWS_*`) of every archived command, the
    /// way an operator keeps secrets out of the config file.
    pub fn start_s3(cluster: &str, moto: &MotoServer, bucket: &str, prefix: &str) -> Archive {
        moto.create_bucket(bucket);
        let url = format!("s3://{bucket}/{prefix}");
        let endpoint = moto.endpoint();
        Archive::start_configured(
            cluster,
            |config| {
                let text = fs::read_to_string(config).unwrap();
                assert!(
                    text.contains("storage = \"\"\n") && text.contains("[storage_options]\n"),
                    "archived init wrote an archived.toml the harness does not recognise:\n{text}"
                );
                let text = text
                    .replacen("storage = \"\"\n", &format!("storage = \"{url}\"\n"), 1)
                    .replacen(
                        "[storage_options]\n",
                        &format!(
                            "[storage_options]\naws_endpoint = \"{endpoint}\"\naws_allow_http = \"true\"\n"
                        ),
                        1,
                    );
                fs::write(config, text).unwrap();
            },
            moto.credentials_env(),
        )
    }

    /// `archived init`, then `configure(archived.toml)`, then `archived serve` with `env`
    /// (also given to every admin command).
    pub fn start_configured(
        cluster: &str,
        configure: impl FnOnce(&Path),
        env: Vec<(String, String)>,
    ) -> Archive {
        let dir = TestDir::new("archive");
        let bins = Binaries::copy_to(&dir.join("bin"));
        let conf_dir = dir.subdir("conf");
        let data_dir = dir.join("data");
        run(
            "archived init",
            Command::new(bins.archived())
                .arg("init")
                .arg("--data-dir")
                .arg(&data_dir)
                .args(["--listen", UNBOUND_LISTEN])
                .current_dir(dir.path()),
        );
        configure(&data_dir.join("archived.toml"));
        let log_prefix = dir.join("archived");
        let mut a = Archive {
            dir,
            bins,
            data_dir,
            conf_dir,
            port: 0,
            ready_cluster: cluster.into(),
            server: None,
            log_prefix,
            env,
        };
        a.serve();
        a
    }

    /// Starts `archived serve` (after [`stop`](Self::stop) or [`kill9`](Self::kill9)),
    /// same data dir and port, and waits until it has bound its socket and is ready.
    pub fn serve(&mut self) {
        assert!(self.server.is_none(), "archived is already running");
        let _ = writeln!(
            open_append(&self.log_prefix.with_extension("stderr")),
            "=== harness: archived serve ==="
        );
        let address_file = self.dir.join("listen-address");
        match fs::remove_file(&address_file) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => panic!("remove {}: {e}", address_file.display()),
        }
        let p = BgProcess::spawn(
            "archived serve",
            Command::new(self.bins.archived())
                .arg("serve")
                .arg("--data-dir")
                .arg(&self.data_dir)
                .arg("--listen-address-file")
                .arg(&address_file)
                .envs(self.env.iter().map(|(k, v)| (k, v)))
                .current_dir(self.dir.path()),
            &self.log_prefix,
        );
        self.server = Some(p);
        let bound = self.wait_bound(&address_file);
        if self.port == 0 {
            self.port = bound;
            self.pin_port();
        } else if bound != self.port {
            panic!(
                "archived serve bound port {bound}, not {} as archived.toml says\n{}",
                self.port,
                self.diag()
            );
        }
        self.wait_ready();
    }

    /// Waits until `serve` has written its bound address to `address_file`; its port.
    fn wait_bound(&mut self, address_file: &Path) -> u16 {
        let deadline = Instant::now() + WAIT_TIMEOUT;
        loop {
            if let Some(status) = self.server.as_mut().and_then(|s| s.try_wait()) {
                panic!(
                    "archived serve exited ({status}) before it had bound its socket\n{}",
                    self.diag()
                );
            }
            if let Ok(text) = fs::read_to_string(address_file) {
                let addr: std::net::SocketAddr = text.trim_end().parse().unwrap_or_else(|e| {
                    panic!(
                        "{} holds {text:?}, not an IP:port ({e})\n{}",
                        address_file.display(),
                        self.diag()
                    )
                });
                return addr.port();
            }
            if Instant::now() >= deadline {
                panic!(
                    "archived serve did not write {} within {WAIT_TIMEOUT:?}\n{}",
                    address_file.display(),
                    self.diag()
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Writes the port the first `serve` bound into `archived.toml` (restarts bind it
    /// again; `issue` writes it into client configs) and `admin.toml` (admin commands).
    fn pin_port(&self) {
        let listen = format!("127.0.0.1:{}", self.port);
        for (file, key) in [("archived.toml", "listen"), ("admin.toml", "server")] {
            let path = self.data_dir.join(file);
            let text = fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
            let line = format!("{key} = \"{UNBOUND_LISTEN}\"\n");
            assert!(
                text.contains(&line),
                "{} has no line {line:?}; the harness cannot give it the bound port:\n{text}",
                path.display()
            );
            let text = text.replacen(&line, &format!("{key} = \"{listen}\"\n"), 1);
            fs::write(&path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        }
    }

    /// Waits until `archived wal list` for the readiness cluster exits 0.
    pub fn wait_ready(&mut self) {
        let cluster = self.ready_cluster.clone();
        let deadline = Instant::now() + WAIT_TIMEOUT;
        loop {
            if let Some(status) = self.server.as_mut().and_then(|s| s.try_wait()) {
                panic!(
                    "archived serve exited ({status}) before it was ready\n{}",
                    self.diag()
                );
            }
            let out = self.try_admin(&["wal", "list", "--cluster", &cluster, "--json"]);
            if out.success() {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "archived not ready after {WAIT_TIMEOUT:?}: last `wal list`:\n{}\n{}",
                    out.describe(),
                    self.diag()
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGKILL, no cleanup chance.
    pub fn kill9(&mut self) {
        let mut p = self.server.take().expect("archived is not running");
        p.signal_and_wait(libc::SIGKILL, Duration::from_secs(10))
            .expect("archived survived SIGKILL");
    }

    /// SIGTERM, and waits for it to exit (panics if it takes over 30 s or exits with
    /// an error).
    pub fn stop(&mut self) {
        let mut p = self.server.take().expect("archived is not running");
        match p.signal_and_wait(libc::SIGTERM, Duration::from_secs(30)) {
            None => panic!(
                "archived did not exit within 30 s of SIGTERM (killed)\n{}",
                self.diag()
            ),
            Some(s) if !s.success() && s.code() != Some(143) => {
                panic!("archived exited with {s} after SIGTERM\n{}", self.diag())
            }
            Some(_) => {}
        }
    }

    /// Stop (SIGTERM) if running, then serve again.
    pub fn restart(&mut self) {
        if self.server.is_some() {
            self.stop();
        }
        self.serve();
    }

    /// Process id of the running `archived serve`.
    pub fn pid(&self) -> u32 {
        self.server.as_ref().expect("archived is not running").id()
    }

    /// Peak resident memory (VmHWM) of the running `archived serve`, in bytes.
    pub fn peak_rss(&self) -> u64 {
        let status = fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("read /proc/PID/status");
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmHWM in /proc/PID/status");
        kib * 1024
    }

    /// Whether `serve` is running (was started and has not exited).
    pub fn is_running(&mut self) -> bool {
        match self.server.as_mut() {
            None => false,
            Some(p) => p.try_wait().is_none(),
        }
    }

    /// The data dir.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The UDP port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The copied binaries (executable by `postgres`).
    pub fn bins(&self) -> &Binaries {
        &self.bins
    }

    /// Runs `archived ARGS --data-dir DIR` as ourselves; no check.
    pub fn try_admin(&self, args: &[&str]) -> Output {
        try_run(
            Command::new(self.bins.archived())
                .args(args)
                .arg("--data-dir")
                .arg(&self.data_dir)
                .envs(self.env.iter().map(|(k, v)| (k, v)))
                .current_dir(self.dir.path()),
        )
    }

    /// Runs `archived ARGS --data-dir DIR`, panicking unless it exits 0.
    pub fn admin(&self, args: &[&str]) -> Output {
        let out = self.try_admin(args);
        if !out.success() {
            panic!(
                "archived {} failed\n{}\n{}",
                args.join(" "),
                out.describe(),
                self.diag()
            );
        }
        out
    }

    /// `archived issue` a client config for `cluster`/`role`, readable by `postgres`.
    pub fn issue(&self, cluster: &str, role: &str) -> PathBuf {
        self.issue_with(cluster, role, None)
    }

    /// [`issue`](Self::issue), optionally setting `timeout_secs` in the config.
    pub fn issue_with(&self, cluster: &str, role: &str, timeout_secs: Option<u64>) -> PathBuf {
        let mut n = 0;
        let out = loop {
            let p = self.conf_dir.join(format!("{cluster}-{role}-{n}.toml"));
            if !p.exists() {
                break p;
            }
            n += 1;
        };
        let out_s = out.to_string_lossy().into_owned();
        self.admin(&[
            "issue",
            "--cluster",
            cluster,
            "--role",
            role,
            "--out",
            &out_s,
        ]);
        if let Some(t) = timeout_secs {
            let text = fs::read_to_string(&out).unwrap();
            let mut lines: Vec<String> = text
                .lines()
                .filter(|l| !l.trim_start().starts_with("timeout_secs"))
                .map(String::from)
                .collect();
            // Top-level key: must precede any [table].
            let at = lines
                .iter()
                .position(|l| l.trim_start().starts_with('['))
                .unwrap_or(lines.len());
            lines.insert(at, format!("timeout_secs = {t}"));
            fs::write(&out, lines.join("\n") + "\n").unwrap();
        }
        chown_pg(&out);
        out
    }

    /// `archive_command` for PostgreSQL pushing with `push_conf`.
    pub fn archive_command(&self, push_conf: &Path) -> String {
        format!(
            "{} archive-push %p --config {}",
            self.bins.pushclient().display(),
            push_conf.display()
        )
    }

    /// `restore_command` for PostgreSQL pulling with `pull_conf`.
    pub fn restore_command(&self, pull_conf: &Path) -> String {
        format!(
            "{} archive-get %f %p --config {}",
            self.bins.pullclient().display(),
            pull_conf.display()
        )
    }

    /// `archived wal list --cluster C --json`, parsed.
    pub fn wal_list_json(&self, cluster: &str) -> serde_json::Value {
        let out = self.admin(&["wal", "list", "--cluster", cluster, "--json"]);
        serde_json::from_str(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "`archived wal list --json` printed something that is not JSON ({e}):\n{}",
                out.describe()
            )
        })
    }

    /// Runs `pullclient archive-get NAME DEST --config CONF` as the `postgres` user (as
    /// PostgreSQL would); no check.
    pub fn archive_get(&self, pull_conf: &Path, name: &str, dest: &Path) -> Output {
        try_run(
            as_pg_user(&mut Command::new(self.bins.pullclient()))
                .args(["archive-get", name])
                .arg(dest)
                .arg("--config")
                .arg(pull_conf)
                .current_dir("/tmp"),
        )
    }

    /// Runs `pushclient archive-push PATH --config CONF` as the `postgres` user; no check.
    pub fn archive_push(&self, push_conf: &Path, path: &Path) -> Output {
        try_run(
            as_pg_user(&mut Command::new(self.bins.pushclient()))
                .arg("archive-push")
                .arg(path)
                .arg("--config")
                .arg(push_conf)
                .current_dir("/tmp"),
        )
    }

    /// How many `pushclient` processes from this archive's bin dir are running (pushes
    /// in flight, when PostgreSQL runs them as archive_command).
    pub fn pushes_in_flight(&self) -> usize {
        processes_running(&self.bins.pushclient()).len()
    }

    /// The tail of archived's stderr (all runs).
    pub fn stderr_tail(&self, lines: usize) -> String {
        tail_file(&self.log_prefix.with_extension("stderr"), lines)
    }

    /// Diagnostics for failure messages.
    pub fn diag(&self) -> String {
        format!(
            "--- archived stderr (tail), data dir {} ---\n{}\n--- archived stdout (tail) ---\n{}",
            self.data_dir.display(),
            self.stderr_tail(40),
            tail_file(&self.log_prefix.with_extension("stdout"), 10)
        )
    }
}

impl Drop for Archive {
    fn drop(&mut self) {
        if let Some(mut p) = self.server.take() {
            let _ = p.signal_and_wait(libc::SIGKILL, Duration::from_secs(10));
        }
    }
}

// ---------------------------------------------------------------------------------------
// S3 (moto_server)
// ---------------------------------------------------------------------------------------

/// The `moto_server` program: `WALVAULT_MOTO_SERVER`, else the first on `PATH`. Panics
/// (never skips) saying how to install it when it is missing.
pub fn moto_server_program() -> PathBuf {
    if let Some(p) = std::env::var_os("WALVAULT_MOTO_SERVER") {
        return PathBuf::from(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join("moto_server"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "moto_server is missing: the S3 tests run archived against a local S3 server, \
                 moto_server from PyPI. Install it with `pip install 'moto[server]'` \
                 (./scripts/test does), or set WALVAULT_MOTO_SERVER to its path"
            )
        })
}

/// A running `moto_server` (an in-memory S3) on a 127.0.0.1 TCP port the kernel picked;
/// killed when dropped.
pub struct MotoServer {
    _dir: TestDir,
    process: BgProcess,
    port: u16,
    log_prefix: PathBuf,
}

impl MotoServer {
    /// Starts it on port 0 (the kernel picks a free port, so concurrent test runs never
    /// race for one), learns the port from the line werkzeug logs once it listens
    /// (` * Running on http://127.0.0.1:PORT`), and waits until it answers HTTP.
    pub fn start() -> MotoServer {
        let program = moto_server_program();
        let dir = TestDir::new("moto");
        let log_prefix = dir.join("moto");
        let stderr = log_prefix.with_extension("stderr");
        let mut process = BgProcess::spawn(
            "moto_server",
            Command::new(&program)
                .args(["-H", "127.0.0.1", "-p", "0"])
                .current_dir(dir.path()),
            &log_prefix,
        );
        let port = wait_for(
            "moto_server to log the port it listens on (\" * Running on http://127.0.0.1:PORT\")",
            WAIT_TIMEOUT,
            || {
                if let Some(status) = process.try_wait() {
                    panic!(
                        "moto_server ({}) exited ({status}) at startup\n{}",
                        program.display(),
                        tail_file(&stderr, 30)
                    );
                }
                moto_listen_port(&read_lossy(&stderr))
            },
            || tail_file(&stderr, 30),
        );
        wait_until(
            &format!("moto_server to answer HTTP on 127.0.0.1:{port}"),
            WAIT_TIMEOUT,
            || http_request(port, "GET", "/", &[]).is_ok_and(|r| r.starts_with("HTTP/1.")),
            || tail_file(&stderr, 30),
        );
        MotoServer {
            _dir: dir,
            process,
            port,
            log_prefix,
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Credentials and region as the standard AWS variables (moto accepts any).
    pub fn credentials_env(&self) -> Vec<(String, String)> {
        [
            ("AWS_ACCESS_KEY_ID", "walvault-test"),
            ("AWS_SECRET_ACCESS_KEY", "walvault-test-secret"),
            ("AWS_REGION", "us-east-1"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    /// Creates a bucket (`PUT /BUCKET`).
    pub fn create_bucket(&self, bucket: &str) {
        let answer = http_request(self.port, "PUT", &format!("/{bucket}"), &[])
            .unwrap_or_else(|e| panic!("creating bucket {bucket} on moto_server: {e}"));
        let created = answer.starts_with("HTTP/1.1 200") || answer.starts_with("HTTP/1.0 200");
        // A second archive on the same bucket (tests of two servers sharing a store).
        if !created && !answer.contains("BucketAlreadyOwnedByYou") {
            panic!(
                "moto_server refused to create bucket {bucket}:\n{}\n{}",
                tail_str(&answer, 20),
                self.diag()
            );
        }
    }

    /// An object_store client of `bucket`, to look at what archived stored (or to put
    /// something behind its back).
    pub fn bucket_store(&self, bucket: &str) -> std::sync::Arc<dyn object_store::ObjectStore> {
        walvault_protocol::net::transport::install_crypto_provider();
        let mut builder = object_store::aws::AmazonS3Builder::new()
            .with_bucket_name(bucket)
            .with_endpoint(self.endpoint())
            .with_allow_http(true);
        for (k, v) in self.credentials_env() {
            let key: object_store::aws::AmazonS3ConfigKey = k.to_ascii_lowercase().parse().unwrap();
            builder = builder.with_config(key, v);
        }
        std::sync::Arc::new(
            builder
                .build()
                .unwrap_or_else(|e| panic!("an S3 client for moto_server: {e}")),
        )
    }

    /// Every key in `bucket` under `prefix`, sorted.
    pub fn list_keys(&self, bucket: &str, prefix: &str) -> Vec<String> {
        use futures::TryStreamExt;
        let store = self.bucket_store(bucket);
        let prefix = object_store::path::Path::from(prefix);
        let mut keys: Vec<String> = block_on(async {
            store
                .list(Some(&prefix))
                .map_ok(|m| m.location.to_string())
                .try_collect()
                .await
        })
        .unwrap_or_else(|e| panic!("listing s3://{bucket}/{prefix} on moto_server: {e}"));
        keys.sort();
        keys
    }

    /// Whether the server is still running.
    pub fn is_running(&mut self) -> bool {
        self.process.try_wait().is_none()
    }

    /// Diagnostics for failure messages.
    pub fn diag(&self) -> String {
        format!(
            "--- moto_server stderr (tail) ---\n{}",
            tail_file(&self.log_prefix.with_extension("stderr"), 30)
        )
    }
}

/// The port in werkzeug's ` * Running on http://127.0.0.1:PORT` line, once logged.
fn moto_listen_port(log: &str) -> Option<u16> {
    log.lines().find_map(|line| {
        let rest = line.split("Running on http://127.0.0.1:").nth(1)?;
        let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
        digits.parse().ok().filter(|&port| port != 0)
    })
}

/// Runs a future to completion on a small current-thread runtime (harness helpers are
/// synchronous).
pub fn block_on<F: std::future::Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
        .block_on(future)
}

/// One HTTP/1.1 request with `Connection: close`; the whole answer (status line, headers,
/// body).
fn http_request(port: u16, method: &str, path: &str, body: &[u8]) -> std::io::Result<String> {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    stream.write_all(body)?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer)?;
    Ok(String::from_utf8_lossy(&answer).into_owned())
}

// ---------------------------------------------------------------------------------------
// PostgreSQL
// ---------------------------------------------------------------------------------------

/// The PostgreSQL 15 bin dir; panics (never skips) if it is missing.
pub fn pg_bin_dir() -> PathBuf {
    let dir = std::env::var_os("WALVAULT_PG_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| DEFAULT_PG_BIN.into());
    for prog in [
        "initdb",
        "pg_ctl",
        "postgres",
        "psql",
        "pgbench",
        "pg_basebackup",
    ] {
        if !dir.join(prog).is_file() {
            panic!(
                "PostgreSQL 15 is missing: {} not found (the end-to-end tests need PostgreSQL 15 under \
                 {DEFAULT_PG_BIN}, e.g. `apt-get install postgresql-15`, or set WALVAULT_PG_BIN)",
                dir.join(prog).display()
            );
        }
    }
    dir
}

/// A PostgreSQL program, set up to run as the `postgres` user.
pub fn pg_command(prog: &str) -> Command {
    let mut cmd = Command::new(pg_bin_dir().join(prog));
    as_pg_user(&mut cmd);
    cmd.current_dir("/tmp");
    cmd
}

/// The port every cluster uses (sockets are in per-cluster dirs, so no clash).
pub const PG_PORT: u16 = 5432;

/// A PostgreSQL cluster in its own temp dir: `data/` (PGDATA), `sock/` (its Unix socket
/// dir), `postgres.log`. Stopped (immediate) when dropped.
pub struct PgCluster {
    name: String,
    dir: TestDir,
    data: PathBuf,
    sock: PathBuf,
    log: PathBuf,
    running: bool,
}

impl PgCluster {
    fn new_dirs(name: &str) -> PgCluster {
        let dir = TestDir::new(&format!("pg-{name}"));
        let sock = dir.subdir("sock");
        let data = dir.join("data");
        let log = dir.join("postgres.log");
        chown_pg(dir.path());
        chown_pg(&sock);
        PgCluster {
            name: name.into(),
            data,
            sock,
            log,
            dir,
            running: false,
        }
    }

    /// Dirs for a cluster whose data directory does not exist yet (a restore target).
    pub fn empty(name: &str) -> PgCluster {
        PgCluster::new_dirs(name)
    }

    /// `initdb` (trust auth, C locale, no sync) plus `extra_args` (e.g.
    /// `["--wal-segsize", "1"]`). Not started.
    pub fn initdb(name: &str, extra_args: &[&str]) -> PgCluster {
        let c = PgCluster::new_dirs(name);
        run(
            &format!("initdb of cluster {name}"),
            pg_command("initdb")
                .arg("-D")
                .arg(&c.data)
                .args([
                    "--auth=trust",
                    "--no-locale",
                    "-E",
                    "UTF8",
                    "--no-sync",
                    "--no-instructions",
                ])
                .args(extra_args),
        );
        c.append_conf(&[
            "fsync = off",
            "log_line_prefix = '%m [%p] %b '",
            "log_min_messages = info",
            "max_wal_senders = 4",
        ]);
        c
    }

    /// A new cluster from `pg_basebackup` of `source` (running), with `args` (e.g.
    /// `["-X", "none"]`). Not started; `postgresql.conf` is the source's.
    pub fn from_basebackup(source: &PgCluster, name: &str, args: &[&str]) -> PgCluster {
        let c = PgCluster::new_dirs(name);
        source.basebackup_to(&c.data, args);
        c
    }

    /// `pg_basebackup -D dest -c fast ARGS` from this cluster.
    pub fn basebackup_to(&self, dest: &Path, args: &[&str]) {
        let out = try_run(
            pg_command("pg_basebackup")
                .arg("-D")
                .arg(dest)
                .arg("-h")
                .arg(&self.sock)
                .args(["-p", &PG_PORT.to_string(), "-c", "fast", "--no-sync"])
                .args(args),
        );
        if !out.success() {
            panic!(
                "pg_basebackup of {} failed\n{}\n{}",
                self.name,
                out.describe(),
                self.diag()
            );
        }
    }

    /// Name given at creation.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// PGDATA.
    pub fn data_dir(&self) -> &Path {
        &self.data
    }

    /// The Unix socket dir.
    pub fn sock_dir(&self) -> &Path {
        &self.sock
    }

    /// PGDATA/pg_wal.
    pub fn wal_dir(&self) -> PathBuf {
        self.data.join("pg_wal")
    }

    /// The cluster's temp dir (for scratch files).
    pub fn dir(&self) -> &TestDir {
        &self.dir
    }

    /// Appends lines to postgresql.conf (effective at the next start or reload).
    pub fn append_conf(&self, lines: &[&str]) {
        let path = self.data.join("postgresql.conf");
        let mut f = fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
        writeln!(f, "\n# added by the walvault test harness").unwrap();
        for l in lines {
            writeln!(f, "{l}").unwrap();
        }
    }

    /// `key = 'value'` in postgresql.conf, quoting the value.
    pub fn set_conf(&self, key: &str, value: &str) {
        self.append_conf(&[&format!("{key} = '{}'", value.replace('\'', "''"))]);
    }

    /// Creates `standby.signal`.
    pub fn standby_signal(&self) {
        let p = self.data.join("standby.signal");
        fs::write(&p, "").unwrap();
        chown_pg(&p);
    }

    /// `pg_ctl start -w`, listening only on the cluster's own socket. Panics with the log
    /// tail if the server does not come up (for a standby: reach consistency) in 60 s.
    pub fn start(&mut self) {
        self.pg_ctl_start(true);
    }

    /// `pg_ctl start` without waiting for the server to accept connections.
    pub fn start_nowait(&mut self) {
        self.pg_ctl_start(false);
    }

    fn pg_ctl_start(&mut self, wait: bool) {
        assert!(!self.running, "cluster {} is already running", self.name);
        let opts = format!(
            "-k {} -p {PG_PORT} -c listen_addresses=''",
            self.sock.display()
        );
        let out = try_run(
            pg_command("pg_ctl")
                .arg("-D")
                .arg(&self.data)
                .arg("-l")
                .arg(&self.log)
                .args(["-o", &opts])
                .args(if wait {
                    ["-w", "-t", "60"]
                } else {
                    ["-W", "-t", "60"]
                })
                .arg("start"),
        );
        // Even a failed start may have left a postmaster behind: make Drop stop it.
        self.running = true;
        if !out.success() {
            panic!(
                "starting cluster {} failed\n{}\n{}",
                self.name,
                out.describe(),
                self.diag()
            );
        }
    }

    /// `pg_ctl stop -m fast -w`.
    pub fn stop(&mut self) {
        self.pg_ctl_stop("fast");
    }

    /// `pg_ctl stop -m immediate -w` (crash).
    pub fn stop_immediate(&mut self) {
        self.pg_ctl_stop("immediate");
    }

    fn pg_ctl_stop(&mut self, mode: &str) {
        let out = try_run(
            pg_command("pg_ctl")
                .arg("-D")
                .arg(&self.data)
                .args(["-m", mode, "-w", "-t", "60", "stop"]),
        );
        if !out.success() {
            panic!(
                "stopping cluster {} ({mode}) failed\n{}\n{}",
                self.name,
                out.describe(),
                self.diag()
            );
        }
        self.running = false;
    }

    /// `pg_ctl promote -w`.
    pub fn promote(&self) {
        let out = try_run(
            pg_command("pg_ctl")
                .arg("-D")
                .arg(&self.data)
                .args(["-w", "-t", "60", "promote"]),
        );
        if !out.success() {
            panic!(
                "promoting cluster {} failed\n{}\n{}",
                self.name,
                out.describe(),
                self.diag()
            );
        }
    }

    fn psql_command(&self, sql: &str) -> Command {
        let mut cmd = pg_command("psql");
        cmd.args(["-AtX", "-v", "ON_ERROR_STOP=1", "-h"])
            .arg(&self.sock)
            .args(["-p", &PG_PORT.to_string(), "-d", "postgres", "-c", sql]);
        cmd
    }

    /// Runs SQL with `psql -AtX`; the output (trimmed), or the error text.
    pub fn try_psql(&self, sql: &str) -> Result<String, String> {
        let out = try_run(&mut self.psql_command(sql));
        if out.success() {
            Ok(out.stdout.trim_end().to_string())
        } else {
            Err(out.describe())
        }
    }

    /// Runs SQL with `psql -AtX`, panicking on error; the output, trimmed.
    pub fn psql(&self, sql: &str) -> String {
        self.try_psql(sql).unwrap_or_else(|e| {
            panic!(
                "SQL on cluster {} failed: {sql}\n{e}\n{}",
                self.name,
                self.diag()
            )
        })
    }

    fn pgbench_command(&self, args: &[&str]) -> Command {
        let mut cmd = pg_command("pgbench");
        cmd.arg("-h")
            .arg(&self.sock)
            .args(["-p", &PG_PORT.to_string()])
            .args(args)
            .arg("postgres");
        cmd
    }

    /// `pgbench -i -s SCALE -q`.
    pub fn pgbench_init(&self, scale: u32) {
        self.pgbench(&["-i", "-s", &scale.to_string(), "-q"]);
    }

    /// `pgbench ARGS postgres`, panicking on failure.
    pub fn pgbench(&self, args: &[&str]) -> Output {
        let out = try_run_timeout(&mut self.pgbench_command(args), Duration::from_secs(300));
        if !out.success() {
            panic!(
                "pgbench {} on cluster {} failed\n{}\n{}",
                args.join(" "),
                self.name,
                out.describe(),
                self.diag()
            );
        }
        out
    }

    /// `pgbench ARGS postgres` in the background (killed when dropped).
    pub fn spawn_pgbench(&self, args: &[&str]) -> BgProcess {
        let prefix = self.dir.join(format!("pgbench-{}", std::process::id()));
        BgProcess::spawn("pgbench", &mut self.pgbench_command(args), &prefix)
    }

    /// `pg_switch_wal()` and the name of the segment it completed. Writes a little WAL
    /// first, so there is always a segment to complete.
    pub fn switch_wal(&self) -> String {
        self.psql(
            "CREATE TABLE IF NOT EXISTS walvault_switch (t timestamptz); \
             INSERT INTO walvault_switch VALUES (now());",
        );
        self.psql("SELECT pg_walfile_name(pg_switch_wal())")
    }

    /// `pg_stat_archiver` as one line (for messages).
    pub fn archiver_stats(&self) -> String {
        self.try_psql(
            "SELECT 'archived_count=' || archived_count || ' last_archived_wal=' || coalesce(last_archived_wal, '-') \
             || ' failed_count=' || failed_count || ' last_failed_wal=' || coalesce(last_failed_wal, '-') \
             || ' last_failed_time=' || coalesce(last_failed_time::text, '-') FROM pg_stat_archiver",
        )
        .unwrap_or_else(|e| format!("(pg_stat_archiver unavailable: {e})"))
    }

    /// Whether PostgreSQL marked `file` (a segment, history file...) archived
    /// (`pg_wal/archive_status/FILE.done`).
    pub fn is_archived(&self, file: &str) -> bool {
        self.wal_dir()
            .join("archive_status")
            .join(format!("{file}.done"))
            .exists()
    }

    /// Every file PostgreSQL marked archived (`.done` in pg_wal/archive_status), sorted.
    pub fn archived_files(&self) -> Vec<String> {
        let dir = self.wal_dir().join("archive_status");
        let mut v: Vec<String> = fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("read_dir {}: {e}", dir.display()))
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter_map(|n| n.strip_suffix(".done").map(String::from))
            .collect();
        v.sort();
        v
    }

    /// [`archived_files`](Self::archived_files) restricted to plain WAL segments (24 hex digits).
    pub fn archived_segments(&self) -> Vec<String> {
        self.archived_files()
            .into_iter()
            .filter(|n| is_segment_name(n))
            .collect()
    }

    /// Waits (60 s) until PostgreSQL marks `file` archived; the failure message has the
    /// archiver stats, the PostgreSQL log and `extra_diag()`.
    pub fn wait_archived(&self, file: &str, extra_diag: impl FnOnce() -> String) {
        wait_until(
            &format!("cluster {} to archive {file}", self.name),
            WAIT_TIMEOUT,
            || self.is_archived(file),
            || {
                format!(
                    "{}\n{}\n{}",
                    self.archiver_stats(),
                    self.diag(),
                    extra_diag()
                )
            },
        );
    }

    /// The server log so far.
    pub fn log(&self) -> String {
        read_lossy(&self.log)
    }

    /// The last `lines` lines of the server log.
    pub fn log_tail(&self, lines: usize) -> String {
        tail_file(&self.log, lines)
    }

    /// Diagnostics for failure messages.
    pub fn diag(&self) -> String {
        format!(
            "--- PostgreSQL log of cluster {} ({}) (tail) ---\n{}",
            self.name,
            self.log.display(),
            self.log_tail(50)
        )
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if self.running && self.data.join("postmaster.pid").exists() {
            // Never panic in drop: plain status(), bounded by pg_ctl's own -t.
            let _ = pg_command("pg_ctl")
                .arg("-D")
                .arg(&self.data)
                .args(["-m", "immediate", "-w", "-t", "30", "stop"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// Whether `name` is a WAL segment file name (24 upper-case hex digits).
pub fn is_segment_name(name: &str) -> bool {
    name.len() == 24
        && name
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(&b))
}
