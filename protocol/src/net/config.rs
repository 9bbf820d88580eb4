//! Client configuration files, as written by `archived issue` and read by `pushclient`
//! and `pullclient`.
//!
//! A client config is self-contained TOML: where the server is, which cluster and role
//! the embedded certificate carries, the CA that signs the server, and the client's own
//! certificate and key (so the file is written with mode 0600):
//!
//! ```toml
//! server = "127.0.0.1:7433"      # UDP address of archived
//! server_name = "archived"       # name verified in the server certificate
//! cluster = "main"
//! role = "push"
//! ca_cert = "-----BEGIN CERTIFICATE-----..."
//! client_cert = "-----BEGIN CERTIFICATE-----..."
//! client_key = "-----BEGIN PRIVATE KEY-----..."
//! zstd_level = 3                 # pushclient: compression level (1..=22)
//! connect_timeout_secs = 10      # resolve + QUIC/TLS handshake
//! idle_timeout_secs = 60         # a request with no byte sent or received this long fails
//! request_timeout_secs = 600     # the most one request may take in all
//!
//! # `archived issue` writes the two tables below into pull configs only; any config may
//! # have them.
//! [archive_get]                  # pullclient archive-get, when the archive cannot deliver
//! recovery_retry_secs = 300      # archive recovery: keep retrying this long, then stop
//!                                # recovery (exit 200) rather than let it end early
//! standby_retry_secs = 10        # standby (or by hand): keep retrying this long, then exit 1
//!
//! [prefetch]                     # pullclient archive-get / prefetch daemon
//! enabled = true                 # archive-get starts a prefetch daemon per data directory
//! spool_dir = "/var/lib/postgresql/15/walvault-spool"   # default: beside PGDATA
//! spool_max_bytes = 268435456    # segments kept ahead of replay, in bytes
//! fetch_concurrency = 4          # segments downloaded at once
//! idle_exit_secs = 600           # a daemon started by archive-get exits after this long
//!                                # without requests while PostgreSQL is down
//! prefault = true                # warm heap blocks replay is about to read
//! prefault_method = "fadvise"    # fadvise (posix_fadvise WILLNEED) or pread
//! prefault_ahead_bytes = 67108864 # how far past the replay position to warm, in WAL bytes
//! prefault_concurrency = 16      # preads in flight (fadvise: threads, at most the CPUs)
//! prefault_merge_bytes = 32768   # blocks of one file this close are read with one request
//! metrics_listen = "off"         # "127.0.0.1:7435": the daemon's counters for Prometheus
//! ```
//!
//! Which file: `--config FILE`, else `$WALVAULT_CONFIG`, else `/etc/walvault/<binary>.toml`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::net::pki::Role;
use crate::net::transport::{ClientTls, Timeouts};

/// Environment variable naming the config file when `--config` is not given.
pub const CONFIG_ENV: &str = "WALVAULT_CONFIG";

/// A client's configuration.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    /// `host:port` of archived (UDP).
    pub server: String,
    /// Name to verify in the server certificate.
    #[serde(default = "default_server_name")]
    pub server_name: String,
    /// Cluster the certificate is for.
    pub cluster: String,
    /// Role the certificate carries (informational; the server reads the certificate).
    pub role: Role,
    /// CA certificate, PEM.
    pub ca_cert: String,
    /// Client certificate, PEM.
    pub client_cert: String,
    /// Client private key, PEM.
    pub client_key: String,
    /// zstd level for pushes.
    #[serde(default = "default_zstd_level")]
    pub zstd_level: i32,
    /// Seconds to resolve the server and complete the QUIC + TLS handshake.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_secs: u64,
    /// Seconds a request may go without progress (no byte sent or received) before it
    /// fails; a connection whose peer answers nothing at all for twice this long is
    /// closed.
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout_secs: u64,
    /// Seconds one request may take in all, however steadily it progresses.
    #[serde(default = "default_request_timeout")]
    pub request_timeout_secs: u64,
    /// Deprecated (configs written before the three settings above): the connect and idle
    /// timeout in one. When present it sets `connect_timeout_secs` and
    /// `idle_timeout_secs` unless those are given too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_secs: Option<u64>,
    /// How long archive-get retries an archive that cannot deliver (pullclient).
    #[serde(default)]
    pub archive_get: ArchiveGetConfig,
    /// Prefetch daemon and prefaulter settings (pullclient).
    #[serde(default)]
    pub prefetch: PrefetchConfig,
}

/// How long archive-get retries transient failures (archive unreachable, connection
/// lost, the archive answering `Unavailable`) before it gives up.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ArchiveGetConfig {
    /// In archive recovery (`recovery.signal`, no `standby.signal`): seconds of retrying,
    /// after which archive-get stops recovery (exit above 125) instead of letting
    /// PostgreSQL take the failure for the end of the WAL and promote.
    pub recovery_retry_secs: u64,
    /// On a standby, or outside a data directory: seconds of retrying before exit 1
    /// (PostgreSQL then tries streaming and asks again).
    pub standby_retry_secs: u64,
}

impl Default for ArchiveGetConfig {
    fn default() -> Self {
        ArchiveGetConfig {
            recovery_retry_secs: 300,
            standby_retry_secs: 10,
        }
    }
}

/// How pullclient prefetches and prefaults.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PrefetchConfig {
    /// Whether archive-get starts and uses a prefetch daemon.
    pub enabled: bool,
    /// Spool directory; default `<PGDATA>.walvault-spool` beside the data directory.
    pub spool_dir: Option<PathBuf>,
    /// Bytes of segments kept in the spool.
    pub spool_max_bytes: u64,
    /// Segments downloaded at once.
    pub fetch_concurrency: usize,
    /// Seconds without requests (PostgreSQL down) before a daemon started by archive-get exits.
    pub idle_exit_secs: u64,
    /// Whether to warm the blocks replay will read.
    pub prefault: bool,
    /// `fadvise` or `pread`.
    pub prefault_method: PrefaultMethod,
    /// WAL bytes past the replay position whose blocks are warmed.
    pub prefault_ahead_bytes: u64,
    /// Reads in flight with `pread`; with `fadvise`, threads submitting (at most the CPUs:
    /// a `posix_fadvise` returns once the read is submitted).
    pub prefault_concurrency: usize,
    /// Blocks of one file whose gap is at most this many bytes are warmed with one request
    /// that covers the gap (0: only adjacent blocks share a request).
    pub prefault_merge_bytes: u64,
    /// TCP address where the daemon serves its counters as Prometheus metrics
    /// (`/metrics`, `/healthz`); "off" (the default) for none. Port 0 picks a free one,
    /// written to `<spool>/metrics-address`.
    pub metrics_listen: String,
}

/// How a block is brought into the page cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PrefaultMethod {
    /// `posix_fadvise(POSIX_FADV_WILLNEED)`: asynchronous readahead by the kernel.
    Fadvise,
    /// `pread` of the block: synchronous, works where fadvise is a no-op.
    Pread,
}

impl Default for PrefetchConfig {
    fn default() -> Self {
        PrefetchConfig {
            enabled: true,
            spool_dir: None,
            spool_max_bytes: 256 << 20,
            fetch_concurrency: 4,
            idle_exit_secs: 600,
            prefault: true,
            prefault_method: PrefaultMethod::Fadvise,
            prefault_ahead_bytes: 64 << 20,
            prefault_concurrency: 16,
            prefault_merge_bytes: 32 << 10,
            metrics_listen: "off".into(),
        }
    }
}

fn default_server_name() -> String {
    crate::net::pki::SERVER_NAME.to_string()
}
fn default_zstd_level() -> i32 {
    3
}
fn default_connect_timeout() -> u64 {
    Timeouts::default().connect.as_secs()
}
fn default_idle_timeout() -> u64 {
    Timeouts::default().idle.as_secs()
}
fn default_request_timeout() -> u64 {
    Timeouts::default().total.as_secs()
}

/// Where a binary's config comes from.
pub fn config_path(explicit: Option<&Path>, binary: &str) -> PathBuf {
    if let Some(p) = explicit {
        return p.to_path_buf();
    }
    match std::env::var_os(CONFIG_ENV) {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from(format!("/etc/walvault/{binary}.toml")),
    }
}

/// Why a config cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read config {path}: {cause} (pass --config FILE or set {CONFIG_ENV})")]
    Read {
        /// File.
        path: PathBuf,
        /// Cause (in the message, so not also a `source` that `{:#}` would repeat).
        cause: std::io::Error,
    },
    /// The file is not a valid config.
    #[error("invalid config {path}: {message}")]
    Invalid {
        /// File.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

impl ClientConfig {
    /// Loads and checks a config file.
    pub fn load(path: &Path) -> Result<ClientConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|cause| ConfigError::Read {
            path: path.into(),
            cause,
        })?;
        let invalid = |message: String| ConfigError::Invalid {
            path: path.into(),
            message,
        };
        let mut cfg: ClientConfig = toml::from_str(&text).map_err(|e| invalid(e.to_string()))?;
        let table: toml::Table = toml::from_str(&text).map_err(|e| invalid(e.to_string()))?;
        if let Some(old) = cfg.timeout_secs {
            if !table.contains_key("connect_timeout_secs") {
                cfg.connect_timeout_secs = old;
            }
            if !table.contains_key("idle_timeout_secs") {
                cfg.idle_timeout_secs = old;
            }
        }
        for (key, value) in [
            ("connect_timeout_secs", cfg.connect_timeout_secs),
            ("idle_timeout_secs", cfg.idle_timeout_secs),
            ("request_timeout_secs", cfg.request_timeout_secs),
        ] {
            if value == 0 {
                return Err(invalid(format!("{key} must be at least 1")));
            }
        }
        crate::core::format::names::validate_cluster_name(&cfg.cluster).map_err(invalid)?;
        if cfg.prefetch.fetch_concurrency == 0 || cfg.prefetch.prefault_concurrency == 0 {
            return Err(invalid(
                "prefetch concurrency settings must be at least 1".into(),
            ));
        }
        if !(1..=22).contains(&cfg.zstd_level) {
            return Err(invalid(format!(
                "zstd_level {} is outside 1..=22",
                cfg.zstd_level
            )));
        }
        Ok(cfg)
    }

    /// The connect, idle and total timeouts.
    pub fn timeouts(&self) -> Timeouts {
        Timeouts {
            connect: Duration::from_secs(self.connect_timeout_secs),
            idle: Duration::from_secs(self.idle_timeout_secs),
            total: Duration::from_secs(self.request_timeout_secs),
        }
    }

    /// What the transport needs to reach the archive.
    pub fn tls(&self) -> ClientTls {
        ClientTls {
            server: self.server.clone(),
            server_name: self.server_name.clone(),
            ca: self.ca_cert.clone(),
            cert: self.client_cert.clone(),
            key: self.client_key.clone(),
            timeouts: self.timeouts(),
        }
    }

    /// Serializes the config as TOML.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_default()
    }
}

/// Writes `contents` to `path` with mode 0600, refusing to replace an existing file.
pub fn write_private_file(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(contents)?;
    f.sync_all()
}
