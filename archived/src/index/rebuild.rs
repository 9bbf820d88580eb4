//! Rebuilding the catalog from a listing of the store: every tree is emptied, then each
//! key is offered to the index module of its kind (clusters, wal, chunks, backups).
//! The `complete` mark is removed (and flushed) first and set last, so an interrupted
//! rebuild is redone at the next start. [`open_or_rebuild`] is how the server and the
//! admin command open the catalog.

use std::path::Path;

use anyhow::{Context, Result};

use super::{audit, backups, chunks, clusters, wal, Index, RebuildSummary};
use crate::store::Store;

/// Opens the catalog at `dir`, rebuilding it from `store` when it is missing,
/// damaged or incomplete.
pub(crate) async fn open_or_rebuild(dir: &Path, store: &Store) -> Result<Index> {
    let existed = dir.exists();
    let index = open_or_move_aside(dir)?;
    if !index.is_complete()? {
        if existed {
            tracing::warn!(
                "catalog is incomplete (interrupted rebuild?); rebuilding from the store"
            );
        } else {
            tracing::info!("no catalog yet; building it from the store");
        }
        rebuild(&index, store).await?;
    }
    Ok(index)
}

/// Opens the catalog at `dir` as it is; one sled cannot open is moved aside to
/// `catalog.damaged.<unix time>` and an empty one is opened in its place (not yet
/// complete: the caller rebuilds it).
pub(crate) fn open_or_move_aside(dir: &Path) -> Result<Index> {
    match Index::open(dir) {
        Ok(c) => Ok(c),
        Err(e) => {
            let aside = dir.with_file_name(format!(
                "catalog.damaged.{}",
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0)
            ));
            tracing::warn!(error = %format!("{e:#}"), aside = %aside.display(), "catalog cannot be opened; moving it aside and rebuilding from the store");
            std::fs::rename(dir, &aside)
                .with_context(|| format!("cannot move damaged catalog {} aside", dir.display()))?;
            Index::open(dir)
        }
    }
}

/// Rebuilds every tree from a listing of the store.
pub(crate) async fn rebuild(index: &Index, store: &Store) -> Result<RebuildSummary> {
    index.set_complete(false)?;
    index.flush().await?;
    clusters::clear(index)?;
    wal::clear(index)?;
    chunks::clear(index)?;
    backups::clear(index)?;
    audit::clear(index)?;
    let mut summary = RebuildSummary::default();
    for key in store
        .list("")
        .await
        .context("listing the store for a catalog rebuild")?
    {
        let s = &mut summary;
        let indexed = clusters::index_object(index, store, &key, s).await?
            || wal::index_object(index, store, &key, s).await?
            || chunks::index_object(index, store, &key, s).await?
            || backups::index_object(index, store, &key, s).await?
            || audit::index_object(index, store, &key, s).await?;
        if !indexed {
            summary.other += 1;
        }
    }
    audit::settle(index)?;
    summary.audit_records += audit::note_unrecorded_files(index)?;
    index.set_complete(true)?;
    index.flush().await?;
    tracing::info!(
        clusters = summary.clusters,
        wal_files = summary.wal_files,
        unreadable = summary.unreadable,
        backups = summary.backups,
        chunks = summary.chunks,
        "catalog rebuilt from the store"
    );
    Ok(summary)
}
