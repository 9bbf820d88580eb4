//! The archive's data directory and its configuration.
//!
//! ```text
//! DIR/archived.toml     server configuration (below)
//! DIR/tls/ca.pem        the archive's CA certificate
//! DIR/tls/ca.key        the CA's private key (mode 0600; `archived issue` signs with it)
//! DIR/tls/server.pem    server certificate (DNS name "archived", "localhost", listen IP)
//! DIR/tls/server.key    server private key (mode 0600)
//! DIR/admin.toml        admin client config, used by the admin commands (mode 0600)
//! DIR/store/            objects, when `storage` is empty (the default)
//! DIR/catalog/          the sled catalog (an index; rebuilt from the store if lost)
//! DIR/spool/            temporary upload files for remote storage
//! ```
//!
//! `archived.toml`:
//!
//! ```toml
//! listen = "127.0.0.1:7433"     # UDP address for QUIC
//! storage = ""                  # "" = DIR/store; or s3://bucket/prefix, gs://..., az://...
//! max_connections = 256         # concurrent client connections
//! shutdown_grace_secs = 30      # how long SIGTERM waits for in-flight requests
//! [storage_options]             # object_store keys (aws_endpoint, aws_region...), over the
//!                               # AWS_* / GOOGLE_* / AZURE_* environment (store.rs)
//! [retention]                   # see retention.rs
//! keep_full = 2                 # newest usable backups kept
//! keep_within_days = 7          # and every backup needed to restore to any point of 7 days
//! chunk_grace_hours = 24        # unreferenced chunks are collected after this long
//! ```

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use walvault_protocol::net::config::{write_private_file, ClientConfig};
use walvault_protocol::net::pki::{self, PemPair, Role};

/// Default UDP address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7433";

/// `archived.toml`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// UDP address for QUIC.
    pub listen: String,
    /// Address clients are told to use (defaults to `listen`).
    #[serde(default)]
    pub advertise: Option<String>,
    /// Object store URL; empty for `DIR/store`.
    #[serde(default)]
    pub storage: String,
    /// object_store options (credentials, endpoint, region...).
    #[serde(default)]
    pub storage_options: BTreeMap<String, String>,
    /// Concurrent connections.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Seconds SIGTERM waits for in-flight requests.
    #[serde(default = "default_grace")]
    pub shutdown_grace_secs: u64,
    /// Backup retention policy (`archived retention run`).
    #[serde(default)]
    pub retention: crate::retention::RetentionConfig,
}

fn default_max_connections() -> usize {
    256
}
fn default_grace() -> u64 {
    30
}

/// Paths inside a data directory.
#[derive(Clone, Debug)]
pub struct DataDir {
    /// The directory.
    pub root: PathBuf,
}

impl DataDir {
    /// Wraps a path.
    pub fn new(root: &Path) -> DataDir {
        DataDir {
            root: root.to_path_buf(),
        }
    }
    /// `archived.toml`.
    pub fn config(&self) -> PathBuf {
        self.root.join("archived.toml")
    }
    /// TLS directory.
    pub fn tls(&self) -> PathBuf {
        self.root.join("tls")
    }
    /// Admin client config.
    pub fn admin_config(&self) -> PathBuf {
        self.root.join("admin.toml")
    }
    /// Default object directory.
    pub fn store(&self) -> PathBuf {
        self.root.join("store")
    }
    /// Catalog directory.
    pub fn catalog(&self) -> PathBuf {
        self.root.join("catalog")
    }
    /// Upload spool directory.
    pub fn spool(&self) -> PathBuf {
        self.root.join("spool")
    }

    /// Loads `archived.toml`.
    pub fn load_config(&self) -> Result<ServerConfig> {
        let path = self.config();
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "cannot read {} (run `archived init --data-dir {}` first)",
                path.display(),
                self.root.display()
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
        Ok(cfg)
    }

    /// Loads the CA.
    pub fn ca(&self) -> Result<PemPair> {
        let read = |n: &str| {
            let p = self.tls().join(n);
            std::fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))
        };
        Ok(PemPair {
            cert_pem: read("ca.pem")?,
            key_pem: read("ca.key")?,
        })
    }

    /// Loads the server certificate and key.
    pub fn server_cert(&self) -> Result<PemPair> {
        let read = |n: &str| {
            let p = self.tls().join(n);
            std::fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))
        };
        Ok(PemPair {
            cert_pem: read("server.pem")?,
            key_pem: read("server.key")?,
        })
    }
}

/// `archived init`: creates the data directory, CA, server certificate and admin config.
pub fn init(dir: &DataDir, listen: &str, extra_names: &[String]) -> Result<()> {
    let addr: SocketAddr = listen
        .parse()
        .with_context(|| format!("--listen '{listen}' is not an IP:port"))?;
    if dir.tls().join("ca.pem").exists() || dir.tls().join("ca.key").exists() {
        bail!(
            "{} already holds a CA; refusing to overwrite it (client certificates issued by it would stop working). \
             Use another --data-dir, or remove the directory if you really mean to start over.",
            dir.root.display()
        );
    }
    std::fs::create_dir_all(dir.tls())
        .with_context(|| format!("cannot create {}", dir.tls().display()))?;
    let ca = pki::generate_ca()?;
    let mut names: Vec<String> = extra_names.to_vec();
    if !addr.ip().is_unspecified() {
        names.push(addr.ip().to_string());
    }
    names.push("127.0.0.1".into());
    names.push("::1".into());
    let server = pki::issue_server_cert(&ca, &names)?;
    write_private_file(&dir.tls().join("ca.key"), ca.key_pem.as_bytes())?;
    std::fs::write(dir.tls().join("ca.pem"), &ca.cert_pem)?;
    write_private_file(&dir.tls().join("server.key"), server.key_pem.as_bytes())?;
    std::fs::write(dir.tls().join("server.pem"), &server.cert_pem)?;
    let cfg = ServerConfig {
        listen: listen.to_string(),
        advertise: None,
        storage: String::new(),
        storage_options: BTreeMap::new(),
        max_connections: default_max_connections(),
        shutdown_grace_secs: default_grace(),
        retention: Default::default(),
    };
    if !dir.config().exists() {
        let text = format!(
            "# archived configuration (see README.md, \"Configuration\")\n{}",
            toml::to_string(&cfg).context("serializing config")?
        );
        std::fs::write(dir.config(), text)?;
    }
    let admin = client_config(dir, &cfg, &ca, "admin", Role::Admin)?;
    let _ = std::fs::remove_file(dir.admin_config());
    write_private_file(&dir.admin_config(), admin.to_toml().as_bytes())?;
    Ok(())
}

fn client_config(
    dir: &DataDir,
    cfg: &ServerConfig,
    ca: &PemPair,
    cluster: &str,
    role: Role,
) -> Result<ClientConfig> {
    let _ = dir;
    let cert = pki::issue_client_cert(ca, cluster, role)?;
    let mut server = cfg.advertise.clone().unwrap_or_else(|| cfg.listen.clone());
    if let Ok(addr) = server.parse::<SocketAddr>() {
        if addr.ip().is_unspecified() {
            server = SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), addr.port()).to_string();
        }
    }
    Ok(ClientConfig {
        server,
        server_name: pki::SERVER_NAME.to_string(),
        cluster: cluster.to_string(),
        role,
        ca_cert: ca.cert_pem.clone(),
        client_cert: cert.cert_pem,
        client_key: cert.key_pem,
        zstd_level: 3,
        timeout_secs: 60,
        prefetch: Default::default(),
    })
}

/// `archived issue`: writes a client config for a cluster and role.
pub fn issue(dir: &DataDir, cluster: &str, role: Role, out: &Path) -> Result<()> {
    walvault_protocol::core::format::names::validate_cluster_name(cluster)
        .map_err(anyhow::Error::msg)?;
    let cfg = dir.load_config()?;
    let ca = dir.ca()?;
    let client = client_config(dir, &cfg, &ca, cluster, role)?;
    write_private_file(out, client.to_toml().as_bytes())
        .with_context(|| format!("cannot write {} (it must not exist yet)", out.display()))?;
    Ok(())
}
