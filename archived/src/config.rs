//! `archived.toml`, the server's configuration, and the retention policy a run applies.
//!
//! ```toml
//! listen = "127.0.0.1:7433"     # UDP address for QUIC
//! advertise = "host:7433"       # optional: the address issued client configs name
//! storage = ""                  # "" = DIR/store; or s3://bucket/prefix, gs://..., az://...
//! max_connections = 256         # concurrent client connections
//! shutdown_grace_secs = 30      # how long SIGTERM waits for in-flight requests
//! body_idle_timeout_secs = 60   # each read of a request body must progress within this
//! request_memory_mib = 1024     # what all requests together may buffer (service/budget.rs)
//! summary_interval_secs = 60    # how often /metrics' gap, store and window figures are
//!                               # recomputed (ops/summary.rs)
//! [storage_options]             # object_store keys (aws_endpoint, aws_region...), over the
//!                               # AWS_* / GOOGLE_* / AZURE_* environment (store/remote.rs)
//! [retention]                   # archived retention run; its flags override these
//! keep_full = 2                 # the newest N usable backups
//! keep_within_days = 7          # every backup needed to restore to any point of 7 days
//! min_full = 1                  # never fewer usable backups than this
//! chunk_grace_hours = 24        # unreferenced chunks untouched this long are collected
//! [stream]                      # the streaming receiver's unfinished segments
//! upload_interval_secs = 2      # stored in the object store at least this often
//! [checks]                      # thresholds of `archived check` (ops/check.rs)
//! wal_age_warning_secs = 900    # newest segment older: WARNING
//! wal_age_critical_secs = 3600  #   ... CRITICAL
//! min_backups = 1               # fewer usable backups: CRITICAL
//! backup_age_warning_hours = 26 # newest usable backup older: WARNING
//! backup_age_critical_hours = 50 #  ... CRITICAL
//! retention_max_age_hours = 48  # no successful retention run for longer: WARNING
//! cert_warning_days = 30        # a server certificate expiring sooner: WARNING
//! cert_critical_days = 7        #   ... CRITICAL
//! ```
//!
//! With neither `keep_full` nor `keep_within_days` no backup expires; when both are set a
//! backup is kept if either keeps it (service/retention.rs).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// Default UDP address.
pub(crate) const DEFAULT_LISTEN: &str = "127.0.0.1:7433";

/// The smallest `request_memory_mib`: its header pool (an eighth, service/budget.rs)
/// must hold the largest request frame twice over.
pub(crate) const MIN_REQUEST_MEMORY_MIB: u64 = 16;

/// `archived.toml`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ServerConfig {
    /// UDP address for QUIC.
    pub(crate) listen: String,
    /// Address clients are told to use (defaults to `listen`).
    #[serde(default)]
    pub(crate) advertise: Option<String>,
    /// Object store URL; empty for `DIR/store`.
    #[serde(default)]
    pub(crate) storage: String,
    /// object_store options (credentials, endpoint, region...).
    #[serde(default)]
    pub(crate) storage_options: BTreeMap<String, String>,
    /// Concurrent connections.
    #[serde(default = "default_max_connections")]
    pub(crate) max_connections: usize,
    /// Seconds SIGTERM waits for in-flight requests.
    #[serde(default = "default_grace")]
    pub(crate) shutdown_grace_secs: u64,
    /// Seconds each read of a request body may wait for data before the request is
    /// dropped (the client stalled after its header).
    #[serde(default = "default_body_idle_timeout")]
    pub(crate) body_idle_timeout_secs: u64,
    /// Seconds between refreshes of the per-cluster figures of `/metrics` (ops/summary.rs).
    #[serde(default = "default_summary_interval")]
    pub(crate) summary_interval_secs: u64,
    /// MiB the buffers of all requests together may hold (at least 16).
    #[serde(default = "default_request_memory")]
    pub(crate) request_memory_mib: u64,
    /// TCP address of the HTTP endpoint (`/metrics`, `/healthz`, `/readyz`; ops/http.rs);
    /// "off" turns it off.
    #[serde(default = "default_metrics_listen")]
    pub(crate) metrics_listen: String,
    /// When set, `/metrics` answers only with `Authorization: Bearer <this>` (the probes
    /// stay open).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) metrics_token: Option<String>,
    /// Backup retention policy (`archived retention run`).
    #[serde(default)]
    pub(crate) retention: RetentionConfig,
    /// The streaming receiver's unfinished segments.
    #[serde(default)]
    pub(crate) stream: StreamConfig,
    /// Thresholds of `archived check` (ops/check.rs).
    #[serde(default)]
    pub(crate) checks: ChecksConfig,
}

/// `[checks]`: the thresholds of `archived check` (ops/check.rs).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct ChecksConfig {
    /// The newest segment older than this is a WARNING (an idle primary archives every
    /// `archive_timeout`: keep this above it).
    pub(crate) wal_age_warning_secs: u64,
    /// ... and a CRITICAL.
    pub(crate) wal_age_critical_secs: u64,
    /// Fewer usable backups than this is a CRITICAL.
    pub(crate) min_backups: u32,
    /// The newest usable backup older than this is a WARNING (daily backups: 26 h).
    pub(crate) backup_age_warning_hours: u64,
    /// ... and a CRITICAL.
    pub(crate) backup_age_critical_hours: u64,
    /// No successful retention run for this long is a WARNING (daily runs: 48 h).
    pub(crate) retention_max_age_hours: u64,
    /// No `archived verify` run recorded for this long is a WARNING (weekly runs: 8 days).
    pub(crate) verify_max_age_hours: u64,
    /// A filesystem archived writes to (data directory, local store) with less free
    /// space than this, in percent of its size, is a WARNING.
    pub(crate) disk_free_warning_percent: u64,
    /// ... and a CRITICAL.
    pub(crate) disk_free_critical_percent: u64,
    /// A server certificate expiring within this many days is a WARNING.
    pub(crate) cert_warning_days: u64,
    /// ... and a CRITICAL.
    pub(crate) cert_critical_days: u64,
}

impl Default for ChecksConfig {
    fn default() -> ChecksConfig {
        ChecksConfig {
            wal_age_warning_secs: 900,
            wal_age_critical_secs: 3600,
            min_backups: 1,
            backup_age_warning_hours: 26,
            backup_age_critical_hours: 50,
            retention_max_age_hours: 48,
            verify_max_age_hours: 192,
            disk_free_warning_percent: 15,
            disk_free_critical_percent: 5,
            cert_warning_days: 30,
            cert_critical_days: 7,
        }
    }
}

/// `[stream]`: the streaming receiver's unfinished segments (service/stream.rs).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct StreamConfig {
    /// Seconds between uploads of an unfinished segment that grew to the object store
    /// (the local disk has it at once; the store makes it visible to other archived and
    /// survives the loss of this host).
    #[serde(default = "default_upload_interval")]
    pub(crate) upload_interval_secs: u64,
}

impl Default for StreamConfig {
    fn default() -> StreamConfig {
        StreamConfig {
            upload_interval_secs: default_upload_interval(),
        }
    }
}

fn default_upload_interval() -> u64 {
    2
}

/// The metrics endpoint's default: loopback only, Prometheus' port range.
pub(crate) const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:7434";

fn default_metrics_listen() -> String {
    DEFAULT_METRICS_LISTEN.to_string()
}

fn default_max_connections() -> usize {
    256
}
fn default_grace() -> u64 {
    30
}
fn default_body_idle_timeout() -> u64 {
    60
}
fn default_summary_interval() -> u64 {
    60
}
fn default_request_memory() -> u64 {
    1024
}

impl ServerConfig {
    /// A new configuration listening on `listen`, everything else by default.
    pub(crate) fn new(listen: &str) -> ServerConfig {
        ServerConfig {
            listen: listen.to_string(),
            advertise: None,
            storage: String::new(),
            storage_options: BTreeMap::new(),
            max_connections: default_max_connections(),
            shutdown_grace_secs: default_grace(),
            body_idle_timeout_secs: default_body_idle_timeout(),
            request_memory_mib: default_request_memory(),
            summary_interval_secs: default_summary_interval(),
            metrics_listen: default_metrics_listen(),
            metrics_token: None,
            retention: Default::default(),
            stream: Default::default(),
            checks: Default::default(),
        }
    }

    /// Reads and checks `path`; `data_dir` is named in the error when it is missing.
    pub(crate) fn load(path: &Path, data_dir: &Path) -> Result<ServerConfig> {
        let text = std::fs::read_to_string(path).with_context(|| {
            format!(
                "cannot read {} (run `archived init --data-dir {}` first)",
                path.display(),
                data_dir.display()
            )
        })?;
        let cfg: ServerConfig =
            toml::from_str(&text).with_context(|| format!("invalid {}", path.display()))?;
        cfg.listen.parse::<SocketAddr>().with_context(|| {
            format!(
                "{}: listen '{}' is not an IP:port",
                path.display(),
                cfg.listen
            )
        })?;
        if cfg.metrics_listen != "off" {
            cfg.metrics_listen.parse::<SocketAddr>().with_context(|| {
                format!(
                    "{}: metrics_listen '{}' is not an IP:port (or \"off\")",
                    path.display(),
                    cfg.metrics_listen
                )
            })?;
        }
        if cfg.summary_interval_secs == 0 {
            anyhow::bail!(
                "{}: summary_interval_secs must be at least 1",
                path.display()
            );
        }
        if cfg.body_idle_timeout_secs == 0 {
            anyhow::bail!(
                "{}: body_idle_timeout_secs must be at least 1",
                path.display()
            );
        }
        let min = MIN_REQUEST_MEMORY_MIB;
        if !(min..=4 << 20).contains(&cfg.request_memory_mib) {
            anyhow::bail!(
                "{}: request_memory_mib = {} is outside {min}..=4194304 (the largest request \
                 header must fit)",
                path.display(),
                cfg.request_memory_mib
            );
        }
        Ok(cfg)
    }

    /// `[storage_options]` as the store takes them.
    pub(crate) fn storage_options(&self) -> Vec<(String, String)> {
        self.storage_options.clone().into_iter().collect()
    }
}

/// `[retention]` of archived.toml.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct RetentionConfig {
    /// Newest usable backups kept.
    pub(crate) keep_full: Option<u32>,
    /// Restore window in days.
    pub(crate) keep_within_days: Option<u64>,
    /// Minimum usable backups kept.
    pub(crate) min_full: u32,
    /// Grace period of unreferenced chunks, hours.
    pub(crate) chunk_grace_hours: u64,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        RetentionConfig {
            keep_full: None,
            keep_within_days: None,
            min_full: 1,
            chunk_grace_hours: 24,
        }
    }
}

/// The policy one retention run applies: `[retention]` with the run's overrides.
#[derive(Clone, Debug)]
pub(crate) struct Policy {
    /// Newest usable backups kept.
    pub(crate) keep_full: Option<u32>,
    /// Restore window, seconds.
    pub(crate) keep_within_secs: Option<u64>,
    /// Minimum usable backups kept.
    pub(crate) min_full: u32,
    /// Chunk grace period, seconds.
    pub(crate) chunk_grace_secs: u64,
    /// Unix time the `keep_within` window ends at, instead of now (tests: `--now`).
    /// Only the backup window uses it; chunk and pack ages always use the clock.
    pub(crate) window_end: Option<i64>,
}

impl RetentionConfig {
    /// The configured policy with a run's overrides.
    pub(crate) fn with_overrides(
        &self,
        keep_full: Option<u32>,
        keep_within_secs: Option<u64>,
        chunk_grace_secs: Option<u64>,
    ) -> Policy {
        Policy {
            keep_full: keep_full.or(self.keep_full),
            keep_within_secs: keep_within_secs.or(self.keep_within_days.map(|d| d * 86_400)),
            min_full: self.min_full,
            chunk_grace_secs: chunk_grace_secs.unwrap_or(self.chunk_grace_hours * 3600),
            window_end: None,
        }
    }
}
