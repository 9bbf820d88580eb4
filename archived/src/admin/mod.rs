//! The admin commands' client side: `archived wal`, `audit`, `backups`, `retention`, `check`, `status` ask the
//! running server (with DIR/admin.toml or --config) and print what it answers;
//! `archived catalog rebuild` works on the data directory itself, with the server
//! stopped; `archived verify` reads the store itself, beside the server or without it. How answers are printed is output.rs.

pub(crate) mod audit;
pub(crate) mod backups;
pub(crate) mod catalog;
pub(crate) mod check;

pub(crate) mod retention;
pub(crate) mod status;
pub(crate) mod synthetic;
pub(crate) mod verify;
pub(crate) mod wal;

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use walvault_protocol::net::client::{ArchiveClient, ClientError};
use walvault_protocol::net::config::ClientConfig;

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

/// Connects to the running server as the admin config says.
async fn connect(target: &ConnectArgs) -> Result<ArchiveClient> {
    let cfg = admin_config(target.data_dir.as_deref(), target.config.as_deref())?;
    Ok(ArchiveClient::connect(&cfg).await?)
}

/// Runs `request` on a connection to the running server, then closes it. The client
/// names the config's cluster; admin certificates may name any ([`ArchiveClient::for_cluster`]).
async fn ask<T, F>(target: &ConnectArgs, request: impl FnOnce(ArchiveClient) -> F) -> Result<T>
where
    F: std::future::Future<Output = Result<T, ClientError>>,
{
    let archive = connect(target).await?;
    let answer = request(archive.clone()).await;
    archive.close().await;
    Ok(answer?)
}

/// Prints `rows` under `header` as columns as wide as their widest cell (labels and ids of
/// any length line up); columns whose `right[i]` is true are right-aligned (numbers). The
/// last column is not padded.
pub(crate) fn print_table(header: &[&str], right: &[bool], rows: &[Vec<String>]) {
    print!("{}", table(header, right, rows));
}

fn table(header: &[&str], right: &[bool], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut out = String::new();
        for (i, cell) in cells.enumerate() {
            let last = i + 1 == widths.len();
            let pad = widths[i].saturating_sub(cell.chars().count());
            if i > 0 {
                out.push_str("  ");
            }
            if right.get(i).copied().unwrap_or(false) {
                out.push_str(&" ".repeat(pad));
                out.push_str(cell);
            } else {
                out.push_str(cell);
                if !last {
                    out.push_str(&" ".repeat(pad));
                }
            }
        }
        out.push('\n');
        out
    };
    let mut out = line(&mut header.iter().copied());
    for row in rows {
        out += &line(&mut row.iter().map(String::as_str));
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn columns_are_as_wide_as_their_widest_cell() {
        let rows = vec![
            vec![
                "a-very-long-label".to_string(),
                "1".to_string(),
                "x".to_string(),
            ],
            vec!["b".to_string(), "12345".to_string(), "yz".to_string()],
        ];
        assert_eq!(
            super::table(&["LABEL", "SIZE", "NOTE"], &[false, true, false], &rows),
            "LABEL               SIZE  NOTE\n\
             a-very-long-label      1  x\n\
             b                  12345  yz\n"
        );
    }
}
