//! The admin commands' client side: `archived wal`, `backups`, `retention` ask the
//! running server (with DIR/admin.toml or --config) and print what it answers;
//! `archived catalog rebuild` works on the data directory itself, with the server
//! stopped. How answers are printed is output.rs.

pub(crate) mod backups;
pub(crate) mod catalog;

pub(crate) mod retention;
pub(crate) mod wal;

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use walvault_protocol::core::wire::{Request, Response};
use walvault_protocol::net::config::ClientConfig;
use walvault_protocol::net::transport::ArchiveConnection;

use crate::datadir::DataDir;

/// How an admin command reaches the running server.
#[derive(clap::Args)]
pub(crate) struct ConnectArgs {
    /// Data directory (its admin.toml is used to connect).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Admin client config, instead of --data-dir.
    #[arg(long)]
    config: Option<PathBuf>,
}

/// The admin client config: `--config FILE`, else `DIR/admin.toml`.
fn admin_config(data_dir: Option<&Path>, config: Option<&Path>) -> Result<ClientConfig> {
    let path = match (config, data_dir) {
        (Some(c), _) => c.to_path_buf(),
        (None, Some(d)) => DataDir::new(d).admin_config(),
        (None, None) => bail!("give --data-dir DIR (uses DIR/admin.toml) or --config FILE"),
    };
    Ok(ClientConfig::load(&path)?)
}

/// Sends one request and returns the answer; a refusal is an error.
async fn ask(target: &ConnectArgs, request: Request) -> Result<Response> {
    let cfg = admin_config(target.data_dir.as_deref(), target.config.as_deref())?;
    walvault_protocol::net::transport::install_crypto_provider();
    let conn = ArchiveConnection::connect(&cfg.tls()).await?;
    let (response, _) = conn.call(&request).await?;
    conn.close().await;
    match response {
        Response::Error { code, message } => bail!("archive refused ({code:?}): {message}"),
        other => Ok(other),
    }
}
