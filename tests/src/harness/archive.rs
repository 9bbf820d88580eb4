//! A running `archived serve` ([`Archive`]) with its own data dir, on a UDP port the
//! kernel picked, and the admin and client commands run against it.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use super::bins::{processes_running, Binaries};
use super::cmd::{open_append, run, try_run, BgProcess, Output, WAIT_TIMEOUT};
use super::files::{tail_file, TestDir};
use super::moto::MotoServer;
use super::users::{as_pg_user, chown_pg};

/// What the harness gives `archived init --listen`: port 0, the kernel picks at `serve`.
const UNBOUND_LISTEN: &str = "127.0.0.1:0";
/// `archived init` writes the default HTTP address; every test archive takes a port of
/// the kernel's pick instead (its `serve --metrics-address-file` says which), so that
/// archives of tests running side by side do not collide.
const DEFAULT_METRICS_LISTEN: &str = "metrics_listen = \"127.0.0.1:7434\"\n";
const UNBOUND_METRICS_LISTEN: &str = "metrics_listen = \"127.0.0.1:0\"\n";

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

    /// [`start`](Self::start) with the data dir (and binaries and configs) under
    /// `parent` instead of /tmp, e.g. [`crate::fast_tmp`].
    pub fn start_in(cluster: &str, parent: &Path) -> Archive {
        Archive::start_with_dir(
            TestDir::new_in("archive", parent),
            cluster,
            |_| {},
            Vec::new(),
        )
    }

    /// `archived init`, then `configure(archived.toml)`, then `archived serve` with `env`
    /// (also given to every admin command).
    pub fn start_configured(
        cluster: &str,
        configure: impl FnOnce(&Path),
        env: Vec<(String, String)>,
    ) -> Archive {
        Archive::start_with_dir(TestDir::new("archive"), cluster, configure, env)
    }

    fn start_with_dir(
        dir: TestDir,
        cluster: &str,
        configure: impl FnOnce(&Path),
        env: Vec<(String, String)>,
    ) -> Archive {
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
        let toml_path = data_dir.join("archived.toml");
        let toml = fs::read_to_string(&toml_path)
            .unwrap_or_else(|e| panic!("read {}: {e}", toml_path.display()));
        assert!(
            toml.contains(DEFAULT_METRICS_LISTEN),
            "archived init wrote no {DEFAULT_METRICS_LISTEN:?}:\n{toml}"
        );
        fs::write(
            &toml_path,
            toml.replacen(DEFAULT_METRICS_LISTEN, UNBOUND_METRICS_LISTEN, 1),
        )
        .unwrap_or_else(|e| panic!("write {}: {e}", toml_path.display()));
        configure(&toml_path);
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
                .arg("--metrics-address-file")
                .arg(self.metrics_address_file())
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

    /// Where `serve` writes the address of its HTTP endpoint.
    fn metrics_address_file(&self) -> PathBuf {
        self.dir.join("metrics-address")
    }

    /// The address of the running server's HTTP endpoint (`/metrics`, `/healthz`,
    /// `/readyz`).
    pub fn metrics_addr(&self) -> std::net::SocketAddr {
        let path = self.metrics_address_file();
        let text = fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("read {}: {e}\n{}", path.display(), self.diag()));
        text.trim_end()
            .parse()
            .unwrap_or_else(|e| panic!("{} holds {text:?}: {e}", path.display()))
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

    /// [`issue`](Self::issue), optionally setting the connect and idle timeouts of the
    /// config (`connect_timeout_secs`, `idle_timeout_secs`) to `timeout_secs`.
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
                .filter(|l| {
                    let l = l.trim_start();
                    !l.starts_with("connect_timeout_secs") && !l.starts_with("idle_timeout_secs")
                })
                .map(String::from)
                .collect();
            // Top-level key: must precede any [table].
            let at = lines
                .iter()
                .position(|l| l.trim_start().starts_with('['))
                .unwrap_or(lines.len());
            lines.insert(at, format!("connect_timeout_secs = {t}"));
            lines.insert(at, format!("idle_timeout_secs = {t}"));
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
