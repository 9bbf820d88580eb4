//! `archived catalog rebuild`: rebuilds the catalog from a listing of the store, in the
//! data directory itself (the server must be stopped: sled allows one process).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Subcommand;

use crate::datadir::DataDir;
use crate::index::rebuild;

#[derive(Subcommand)]
pub(crate) enum CatalogCommand {
    /// Rebuild the catalog from a listing of the store. Run with the server stopped.
    Rebuild {
        /// Data directory.
        #[arg(long)]
        data_dir: PathBuf,
    },
}

pub(crate) async fn run(command: CatalogCommand) -> Result<()> {
    let CatalogCommand::Rebuild { data_dir } = command;
    let dir = DataDir::new(&data_dir);
    let cfg = dir.load_config()?;
    let store = dir.open_store(&cfg)?;
    // Opened as it is (a damaged one moved aside), then rebuilt once: not through
    // open_or_rebuild, which would already rebuild an incomplete catalog.
    let index = rebuild::open_or_move_aside(&dir.catalog())
        .context("opening the catalog (is archived serve still running?)")?;
    let summary = rebuild::rebuild(&index, &store).await?;
    println!(
        "catalog rebuilt: {} clusters, {} WAL files, {} backups, {} backup chunks, {} unreadable objects",
        summary.clusters, summary.wal_files, summary.backups, summary.chunks, summary.unreadable
    );
    Ok(())
}
