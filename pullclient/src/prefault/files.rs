//! The prefaulter's open relation files: at most [`OPEN_FILES`] descriptors under PGDATA,
//! the oldest closed first. Held only while PostgreSQL runs: [`FileCache::clear`] closes
//! them all (warming batches in flight hold a reference until their next read, which
//! they skip once PostgreSQL is gone). Each file's device and inode are kept, so a path
//! that now names another file (deleted and recreated, restored) is noticed.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::os::unix::fs::MetadataExt;
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

/// Device and inode: which file a path names.
pub(super) type FileId = (u64, u64);

/// The file `path` names now (links followed, as when it was opened).
pub(super) fn identity(path: &Path) -> Option<FileId> {
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// Open files by path, oldest first.
#[derive(Default)]
pub(super) struct FileCache {
    files: HashMap<PathBuf, (OpenFile, FileId)>,
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

    /// The open files' paths and the device and inode each had when opened.
    pub(super) fn identities(&self) -> Vec<(PathBuf, FileId)> {
        self.files
            .iter()
            .map(|(p, (_, id))| (p.clone(), *id))
            .collect()
    }

    /// Closes the file at `path`, if open.
    pub(super) fn close(&mut self, path: &Path) {
        if self.files.remove(path).is_some() {
            self.order.retain(|p| p != path);
        }
    }

    /// The open file at `path` and its length, looked at again when `need` bytes are more
    /// than the length last seen; `None` when it cannot be opened.
    pub(super) fn open(&mut self, path: &Path, need: u64) -> Option<OpenFile> {
        if let Some((f, _)) = self.files.get_mut(path) {
            if f.len < need {
                f.len = f.file.metadata().map(|m| m.len()).unwrap_or(0);
            }
            return Some(OpenFile {
                file: f.file.clone(),
                len: f.len,
            });
        }
        let file = Arc::new(File::open(path).ok()?);
        let meta = file.metadata().ok();
        let len = meta.as_ref().map_or(0, |m| m.len());
        let id = meta.map_or((0, 0), |m| (m.dev(), m.ino()));
        self.files.insert(
            path.to_path_buf(),
            (
                OpenFile {
                    file: file.clone(),
                    len,
                },
                id,
            ),
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
