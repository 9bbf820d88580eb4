//! The archive's data directory: its paths, `archived init` and `archived issue`.
//!
//! ```text
//! DIR/archived.toml     server configuration (config.rs)
//! DIR/tls/ca.pem        the archive's CA certificate
//! DIR/tls/ca.key        the CA's private key (mode 0600; `archived issue` signs with it)
//! DIR/tls/server.pem    server certificate (DNS name "archived", "localhost", listen IP)
//! DIR/tls/server.key    server private key (mode 0600)
//! DIR/tls/issued/       every client certificate `archived issue` made (certificate only,
//!                       ROLE-CLUSTER-SERIAL.pem): their expiry is in `archived check`
//!                       and /metrics; remove the file of one retired for good
//! DIR/admin.toml        admin client config, used by the admin commands (mode 0600)
//! DIR/store/            objects, when `storage` is empty (the default)
//! DIR/catalog/          the sled catalog (an index; rebuilt from the store if lost)
//! DIR/spool/            temporary upload files for remote storage
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use walvault_protocol::net::config::{write_private_file, ClientConfig};
use walvault_protocol::net::pki::{self, PemPair, Role};

use crate::config::ServerConfig;

/// Paths inside a data directory.
#[derive(Clone, Debug)]
pub(crate) struct DataDir {
    /// The directory.
    pub(crate) root: PathBuf,
}

impl DataDir {
    /// Wraps a path.
    pub(crate) fn new(root: &Path) -> DataDir {
        DataDir {
            root: root.to_path_buf(),
        }
    }
    /// `archived.toml`.
    pub(crate) fn config(&self) -> PathBuf {
        self.root.join("archived.toml")
    }
    /// TLS directory.
    pub(crate) fn tls(&self) -> PathBuf {
        self.root.join("tls")
    }
    /// The client certificates `archived issue` made.
    pub(crate) fn issued(&self) -> PathBuf {
        self.tls().join("issued")
    }
    /// Admin client config.
    pub(crate) fn admin_config(&self) -> PathBuf {
        self.root.join("admin.toml")
    }
    /// Default object directory.
    pub(crate) fn store(&self) -> PathBuf {
        self.root.join("store")
    }
    /// Catalog directory.
    pub(crate) fn catalog(&self) -> PathBuf {
        self.root.join("catalog")
    }
    /// The streaming receiver's unfinished segments (service/stream.rs).
    pub(crate) fn stream(&self) -> PathBuf {
        self.root.join("stream")
    }

    /// Upload spool directory.
    pub(crate) fn spool(&self) -> PathBuf {
        self.root.join("spool")
    }

    /// Loads `archived.toml`.
    pub(crate) fn load_config(&self) -> Result<ServerConfig> {
        ServerConfig::load(&self.config(), &self.root)
    }

    /// Opens the store `archived.toml` names.
    pub(crate) fn open_store(&self, cfg: &ServerConfig) -> Result<crate::store::Store> {
        crate::store::Store::open(
            &cfg.storage,
            &cfg.storage_options(),
            &self.store(),
            &self.spool(),
        )
    }

    fn read_tls(&self, name: &str) -> Result<String> {
        let p = self.tls().join(name);
        std::fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))
    }

    /// Loads the CA.
    pub(crate) fn ca(&self) -> Result<PemPair> {
        Ok(PemPair {
            cert_pem: self.read_tls("ca.pem")?,
            key_pem: self.read_tls("ca.key")?,
        })
    }

    /// The CA certificate alone (what the server checks client certificates against).
    pub(crate) fn ca_cert(&self) -> Result<String> {
        self.read_tls("ca.pem")
    }

    /// Loads the server certificate and key.
    pub(crate) fn server_cert(&self) -> Result<PemPair> {
        Ok(PemPair {
            cert_pem: self.read_tls("server.pem")?,
            key_pem: self.read_tls("server.key")?,
        })
    }
}

/// `archived init`: creates the data directory, CA, server certificate and admin config.
pub(crate) fn init(
    dir: &DataDir,
    listen: &str,
    metrics_listen: Option<&str>,
    extra_names: &[String],
) -> Result<()> {
    let addr: SocketAddr = listen
        .parse()
        .with_context(|| format!("--listen '{listen}' is not an IP:port"))?;
    if let Some(m) = metrics_listen.filter(|m| *m != "off") {
        m.parse::<SocketAddr>()
            .with_context(|| format!("--metrics-listen '{m}' is not an IP:port (or \"off\")"))?;
    }
    if dir.tls().join("ca.pem").exists() || dir.tls().join("ca.key").exists() {
        bail!(
            "{} already holds a CA; refusing to overwrite it (client certificates issued by it would stop working). \
             Use another --data-dir, or remove the directory if you really mean to start over.",
            dir.root.display()
        );
    }
    walvault_protocol::net::fsutil::create_dir_durable(&dir.tls())
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
    let mut cfg = ServerConfig::new(listen);
    if let Some(m) = metrics_listen {
        cfg.metrics_listen = m.to_string();
    }
    if !dir.config().exists() {
        let text = format!(
            "# archived configuration (see README.md, \"Configuration\")\n{}",
            toml::to_string(&cfg).context("serializing config")?
        );
        std::fs::write(dir.config(), text)?;
    }
    let admin = client_config(&cfg, &ca, "admin", Role::Admin, None)?;
    let _ = std::fs::remove_file(dir.admin_config());
    write_private_file(
        &dir.admin_config(),
        client_toml(&admin, Role::Admin)?.as_bytes(),
    )?;
    record_issued(dir, &admin)
}

/// The config file of `client`: the archive-get and prefetch sections only for the
/// pull role, the only one pullclient runs with (pullclient's defaults serve any other).
fn client_toml(client: &ClientConfig, role: Role) -> Result<String> {
    let mut table = toml::Table::try_from(client).context("cannot serialize the client config")?;
    if role != Role::Pull {
        table.remove("archive_get");
        table.remove("prefetch");
    }
    Ok(toml::to_string(&table)?)
}

fn client_config(
    cfg: &ServerConfig,
    ca: &PemPair,
    cluster: &str,
    role: Role,
    valid_days: Option<u32>,
) -> Result<ClientConfig> {
    let cert = pki::issue_client_cert_valid(ca, cluster, role, valid_days)?;
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
        connect_timeout_secs: 10,
        idle_timeout_secs: 60,
        request_timeout_secs: 600,
        timeout_secs: None,
        archive_get: Default::default(),
        prefetch: Default::default(),
    })
}

/// `archived issue`: writes a client config for a cluster and role.
/// `archived issue`: a client config at `out` with a new certificate (valid for
/// `valid_days`, else until 4096), recorded in DIR/tls/issued/.
pub(crate) fn issue(
    dir: &DataDir,
    cluster: &str,
    role: Role,
    out: &Path,
    valid_days: Option<u32>,
) -> Result<()> {
    walvault_protocol::core::format::names::validate_cluster_name(cluster)
        .map_err(anyhow::Error::msg)?;
    let cfg = dir.load_config()?;
    let ca = dir.ca()?;
    let client = client_config(&cfg, &ca, cluster, role, valid_days)?;
    write_private_file(out, client_toml(&client, role)?.as_bytes())
        .with_context(|| format!("cannot write {} (it must not exist yet)", out.display()))?;
    record_issued(dir, &client)
}

/// Records the certificate of `client` in DIR/tls/issued/.
fn record_issued(dir: &DataDir, client: &ClientConfig) -> Result<()> {
    let issued = pki::issued_cert(&client.client_cert).map_err(anyhow::Error::msg)?;
    let id = &issued.identity;
    let record = dir
        .issued()
        .join(format!("{}-{}-{}.pem", id.role, id.cluster, id.serial));
    walvault_protocol::net::fsutil::create_dir_durable(&dir.issued())
        .with_context(|| format!("cannot create {}", dir.issued().display()))?;
    walvault_protocol::net::fsutil::write_replacing(&record, client.client_cert.as_bytes())
        .with_context(|| format!("cannot record the certificate in {}", record.display()))
}

/// Every client certificate recorded in DIR/tls/issued/ (unreadable files are logged and
/// skipped).
pub(crate) fn issued_certs(dir: &DataDir) -> Vec<pki::IssuedCert> {
    let Ok(entries) = std::fs::read_dir(dir.issued()) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in entries.flatten() {
        let path = e.path();
        if path.extension().is_none_or(|x| x != "pem") {
            continue;
        }
        match std::fs::read_to_string(&path)
            .map_err(|e| e.to_string())
            .and_then(|pem| pki::issued_cert(&pem))
        {
            Ok(c) => out.push(c),
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "unreadable issued certificate; skipped")
            }
        }
    }
    out
}
