//! The prefaulter's open relation files: at most [`OPEN_FILES`] descriptors under PGDATA,
//! the oldest closed first. Held only while PostgreSQL runs: [`FileCache::clear`] closes
//! them all (warming batches in flight hold a reference until their reads return).

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Files kept open at once.
const OPEN_FILES: usize = 128;

/// An open relation file.
pub(super) struct OpenFile {
    pub(super) file: Arc<File>,
    /// Length when last looked at (files only grow while replay runs; a block past it
    /// is looked at again before it is called past the end).
    pub(super) len: u64,
}

/// Open files by path, oldest first.
#[derive(Default)]
pub(super) struct FileCache {
    files: HashMap<PathBuf, OpenFile>,
    order: VecDeque<PathBuf>,
}

impl FileCache {
    /// Files open now.
    pub(super) fn len(&self) -> usize {
        self.files.len()
    }

    /// Closes every file.
    pub(super) fn clear(&mut self) {
        self.files.clear();
        self.order.clear();
    }

    /// The open file at `path` and its length, looked at again when `need` bytes are more
    /// than the length last seen; `None` when it cannot be opened.
    pub(super) fn open(&mut self, path: &Path, need: u64) -> Option<OpenFile> {
        if let Some(f) = self.files.get_mut(path) {
            if f.len < need {
                f.len = f.file.metadata().map(|m| m.len()).unwrap_or(0);
            }
            return Some(OpenFile {
                file: f.file.clone(),
                len: f.len,
            });
        }
        let file = Arc::new(File::open(path).ok()?);
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        self.files.insert(
            path.to_path_buf(),
            OpenFile {
                file: file.clone(),
                len,
            },
        );
        self.order.push_back(path.to_path_buf());
        if self.order.len() > OPEN_FILES {
            if let Some(old) = self.order.pop_front() {
                self.files.remove(&old);
            }
        }
        Some(OpenFile { file, len })
    }
}
