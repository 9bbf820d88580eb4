//! PostgreSQL 15 clusters ([`PgCluster`]), each in its own temp dir on its own Unix
//! socket, run as the `postgres` user when the tests run as root. New data directories
//! are copies of a cached initdb (`pgdata_template`). Under nextest, a cluster can only
//! be started by a test in the `postgres` test group (`.config/nextest.toml`).

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use super::cmd::{try_run, try_run_timeout, wait_until, BgProcess, Output, WAIT_TIMEOUT};
use super::files::{read_lossy, tail_file, TestDir};
use super::pgdata_template::copy_fresh_pgdata;
use super::users::{as_pg_user, chown_pg};

/// Where PostgreSQL 15 lives (override with `WALVAULT_PG_BIN`).
pub const DEFAULT_PG_BIN: &str = "/usr/lib/postgresql/15/bin";

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

/// The nextest test group of the tests that start PostgreSQL (`.config/nextest.toml`).
pub const POSTGRES_TEST_GROUP: &str = "postgres";

/// Under nextest, panics unless the running test is in [`POSTGRES_TEST_GROUP`]: the
/// group's filter is a list of names, and a test that starts PostgreSQL outside it would
/// be scheduled as a light test (one slot, no cap on how many run at once).
fn check_postgres_test_group() {
    if std::env::var_os("NEXTEST").is_none() {
        return;
    }
    let group = std::env::var("NEXTEST_TEST_GROUP").unwrap_or_default();
    if group != POSTGRES_TEST_GROUP {
        panic!(
            "test {} starts PostgreSQL but nextest runs it in test group {group:?}, not \
             {POSTGRES_TEST_GROUP:?}: add it to the `{POSTGRES_TEST_GROUP}` override's filter \
             in .config/nextest.toml (or put it in a module named pg_*), so it gets its two \
             slots and counts against the cap on concurrent PostgreSQL tests",
            std::env::var("NEXTEST_TEST_NAME").unwrap_or_default()
        );
    }
}

impl PgCluster {
    fn new_dirs(name: &str) -> PgCluster {
        check_postgres_test_group();
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

    /// A new data directory as `initdb` (trust auth, C locale, no sync) plus `extra_args`
    /// (e.g. `["--wal-segsize", "1"]`) makes it: a copy of a cached initdb, with a system
    /// identifier of its own (see `pgdata_template`). Not started.
    pub fn initdb(name: &str, extra_args: &[&str]) -> PgCluster {
        let c = PgCluster::new_dirs(name);
        let mut args = vec![
            "--auth=trust",
            "--no-locale",
            "-E",
            "UTF8",
            "--no-sync",
            "--no-instructions",
        ];
        args.extend_from_slice(extra_args);
        copy_fresh_pgdata(&args, &c.data);
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

    /// As [`PgCluster::from_basebackup`], with the data directory at `data` (a relative
    /// path, its directories made and handed to `postgres`) inside the cluster's temp dir:
    /// for data directories with long paths.
    pub fn from_basebackup_at(
        source: &PgCluster,
        name: &str,
        data: &str,
        args: &[&str],
    ) -> PgCluster {
        let mut c = PgCluster::new_dirs(name);
        c.data = c.dir.join(data);
        let mut dir = c.dir.path().to_path_buf();
        for part in Path::new(data)
            .parent()
            .into_iter()
            .flat_map(|p| p.components())
        {
            dir.push(part);
            fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
            chown_pg(&dir);
        }
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

    /// SIGKILL of the postmaster, as when the machine is lost (PostgreSQL gets no chance
    /// to do anything); waits until it and its children are gone. The data directory
    /// stays as it was left.
    pub fn kill9(&mut self) {
        let text = fs::read_to_string(self.data.join("postmaster.pid"))
            .unwrap_or_else(|e| panic!("cluster {} has no postmaster.pid: {e}", self.name));
        let pid: i32 = text
            .lines()
            .next()
            .and_then(|l| l.trim().parse().ok())
            .unwrap_or_else(|| panic!("postmaster.pid of {} has no pid:\n{text}", self.name));
        // SAFETY: kill(2) with a pid and a signal number; no memory is shared.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        let alive = |pid: i32| {
            // SAFETY: signal 0 only checks that the process exists.
            unsafe { libc::kill(pid, 0) == 0 }
        };
        wait_until(
            &format!("the postmaster of {} to die", self.name),
            WAIT_TIMEOUT,
            || !alive(pid) && children_of_data_dir_gone(&self.data),
            || self.diag(),
        );
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

    /// Records that the server exited by itself (a FATAL in the startup process shuts it
    /// down, say), so it can be started again. Panics if `postmaster.pid` is still there.
    pub fn exited(&mut self) {
        assert!(
            !self.data.join("postmaster.pid").exists(),
            "cluster {} still has a postmaster.pid\n{}",
            self.name,
            self.diag()
        );
        self.running = false;
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

/// Whether no process has its working directory in `data` (PostgreSQL's processes run in
/// their data directory).
fn children_of_data_dir_gone(data: &Path) -> bool {
    let data = fs::canonicalize(data).unwrap_or_else(|_| data.to_path_buf());
    let Ok(procs) = fs::read_dir("/proc") else {
        return true;
    };
    !procs.flatten().any(|e| {
        e.file_name()
            .to_string_lossy()
            .bytes()
            .all(|b| b.is_ascii_digit())
            && fs::read_link(e.path().join("cwd")).is_ok_and(|cwd| cwd == data)
    })
}

/// Whether `name` is a WAL segment file name (24 upper-case hex digits).
pub fn is_segment_name(name: &str) -> bool {
    name.len() == 24
        && name
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(&b))
}
