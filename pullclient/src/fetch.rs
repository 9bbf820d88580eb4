//! A verified fetch of one WAL file into place, shared by archive-get, the spool and the
//! prefetch daemon.
//!
//! Contract: a file appears at the destination only complete and verified. Fetched
//! bytes go to a temporary file beside the destination while they are decompressed and
//! hashed ([`ArchiveClient::get_wal`] checks size and blake3 against what the archive
//! recorded at push time); only then is the file fsynced and renamed into place. On any
//! error nothing is left at the destination or beside it.

use std::io::Write;
use std::path::{Path, PathBuf};

use walvault_protocol::core::wire::audit::FetchPurpose;
use walvault_protocol::net::client::{ArchiveClient, ClientError};
use walvault_protocol::net::fsutil;

/// Outcome of a fetch that did not fail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Fetched {
    /// The file is at the destination; its size and blake3 as the archive recorded them.
    Written {
        /// Raw size.
        raw_size: u64,
        /// blake3, hex.
        blake3: String,
        /// The streaming receiver's unfinished segment, zero-padded: the bytes of WAL it
        /// holds. Good for PostgreSQL now (it replays up to there and asks again later),
        /// never for keeping in the spool.
        partial_bytes: Option<u64>,
    },
    /// The archive does not have it.
    NotFound,
}

/// Fetches `name` over `archive` into `dest` (temporary file, verify, fsync, rename).
/// On any error nothing is left at `dest` or beside it.
/// `purpose` and `request` (its id) go to the archive's audit trail.
pub(crate) async fn fetch_to(
    archive: &ArchiveClient,
    name: &str,
    dest: &Path,
    purpose: FetchPurpose,
    request: &str,
) -> Result<Fetched, ClientError> {
    let tmp = fsutil::temp_path_beside(dest);
    let result = async {
        // Created at the first byte: an answer without a body leaves nothing to remove.
        // Decoded output arrives in pieces as small as a QUIC packet's worth: batch writes.
        let mut file: Option<std::io::BufWriter<std::fs::File>> = None;
        let delivered = archive
            .get_wal_for(name, purpose, Some(request), |raw| {
                let f = match &mut file {
                    Some(f) => f,
                    None => file.insert(create_temp(&tmp)?),
                };
                f.write_all(raw)
            })
            .await?;
        let local =
            |what: String| move |source: std::io::Error| ClientError::Local { what, source };
        let file = match file {
            Some(f) => f,
            None => create_temp(&tmp).map_err(local(format!("writing {name}")))?,
        };
        let file = file
            .into_inner()
            .map_err(|e| e.into_error())
            .and_then(|f| f.sync_all().map(|()| f))
            .map_err(local(format!("writing {}", tmp.display())))?;
        drop(file);
        fsutil::durable_rename(&tmp, dest)
            .map_err(local(format!("moving the file into {}", dest.display())))?;
        Ok::<_, ClientError>(delivered)
    }
    .await;
    match result {
        Ok(delivered) => Ok(Fetched::Written {
            raw_size: delivered.raw_size,
            blake3: delivered.blake3,
            partial_bytes: delivered.partial_bytes,
        }),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            if e.is_not_found() {
                Ok(Fetched::NotFound)
            } else {
                Err(e)
            }
        }
    }
}

fn create_temp(tmp: &Path) -> std::io::Result<std::io::BufWriter<std::fs::File>> {
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(tmp)
        .map_err(|e| {
            std::io::Error::new(e.kind(), format!("cannot create {}: {e}", tmp.display()))
        })?;
    Ok(std::io::BufWriter::with_capacity(1 << 20, file))
}

/// The data directory a restore_command runs in, made absolute.
pub(crate) fn absolute(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}
