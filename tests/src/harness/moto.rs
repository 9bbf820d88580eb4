//! An S3 server for archives whose store is `s3://`: `moto_server` (PyPI `moto[server]`)
//! on a 127.0.0.1 TCP port the kernel picked ([`MotoServer`]; [`Archive::start_s3`]).
//!
//! [`Archive::start_s3`]: super::archive::Archive::start_s3

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use super::cmd::{tail_str, wait_for, wait_until, BgProcess, WAIT_TIMEOUT};
use super::files::{read_lossy, tail_file, TestDir};

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
