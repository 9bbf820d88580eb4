//! What the store's backends read and write: where an object (or a range of one) is,
//! the outcome of a create-only write, and an object being written.

use std::path::PathBuf;

use anyhow::{Context, Result};
use bytes::Bytes;
use futures::stream::BoxStream;
use tokio::io::AsyncWriteExt;

pub(crate) use walvault_protocol::core::format::object::{ObjectHeader, HEADER_LEN};

/// Where a chunk is: a whole object, or a byte range of one (a chunk in a pack).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Loc {
    /// Store key.
    pub(crate) key: String,
    /// Byte range within the object; `None` for the whole object.
    pub(crate) range: Option<std::ops::Range<u64>>,
}

/// Answer of [`Store::get_many`].
pub(crate) enum Many {
    /// Every object, whole (header and frame), in the order asked.
    Objects(BoxStream<'static, Result<Bytes>>),
    /// The object at this index of the request is absent (nothing was streamed).
    Missing(usize),
}

/// Result of a create-only write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CreateOutcome {
    /// The object was created.
    Created,
    /// An object already existed under the key; nothing changed.
    Exists,
}

/// An object being written: a temporary file that becomes the object on commit.
pub(crate) struct PendingObject {
    pub(super) key: String,
    pub(super) tmp: PathBuf,
    pub(super) file: tokio::fs::File,
    /// Bytes reserved at the start, written at commit (the object header), or 0.
    pub(super) reserved: u64,
    pub(super) written: u64,
}

impl PendingObject {
    /// Appends body bytes.
    pub(crate) async fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.file
            .write_all(bytes)
            .await
            .context("writing object body")?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    /// Body bytes written so far.
    pub(crate) fn written(&self) -> u64 {
        self.written
    }
}

impl Drop for PendingObject {
    fn drop(&mut self) {
        // Committed objects were linked/uploaded already; the temp file is never an object.
        let _ = std::fs::remove_file(&self.tmp);
    }
}
