//! The tar streams of BASE_BACKUP turned into manifest entries and chunks.
//!
//! Each archive (PGDATA's `base.tar`, one `<oid>.tar` per tablespace) is parsed as it
//! arrives ([`TarReader`]); every file is cut into `BACKUP_CHUNK_SIZE` chunks, each hashed
//! with blake3 and handed to the [`Uploader`]. The collector keeps the manifest entries
//! (one per file, its chunk hashes in order) and PGDATA's `backup_label`; it holds at most
//! one chunk being filled.
//!
//! It also computes each regular file's size and CRC32C on the way in, named as
//! PostgreSQL's `backup_manifest` names it, so [`Collector::verify`] can check the whole
//! backup against that manifest before anything is committed.

use anyhow::{anyhow, Context, Result};
use bytes::Bytes;
use walvault_protocol::core::format::manifest::{
    BackupStats, FileEntry, FileKind, TablespaceEntry, BACKUP_CHUNK_SIZE,
};
use walvault_protocol::core::pg::backup_manifest::{FileDigest, PgBackupManifest};
use walvault_protocol::core::pg::tar::{TarError, TarEvent, TarReader};
use walvault_protocol::net::client::ArchiveClient;

use super::uploader::Uploader;

/// Turns tar streams into manifest entries and chunk uploads.
pub(super) struct Collector {
    uploader: Uploader,
    tablespace: Option<u32>,
    tar: Option<TarReader>,
    tablespaces: Vec<TablespaceEntry>,
    files: Vec<FileEntry>,
    current: Option<FileEntry>,
    chunk: Vec<u8>,
    ready: Vec<(String, Bytes)>,
    backup_label: Option<String>,
    capture_label: bool,
    /// Size and CRC32C of every regular file received, for [`Collector::verify`].
    digests: Vec<FileDigest>,
    /// The digest of the regular file being received.
    digest: Option<FileDigest>,
}

impl Collector {
    /// `archive` names the backup's lease ([`ArchiveClient::with_lease`]).
    pub(super) fn new(
        archive: ArchiveClient,
        level: i32,
        tablespaces: Vec<TablespaceEntry>,
    ) -> Collector {
        Collector {
            uploader: Uploader::new(archive, level),
            tablespace: None,
            tar: None,
            tablespaces,
            files: Vec::new(),
            current: None,
            chunk: Vec::with_capacity(BACKUP_CHUNK_SIZE as usize),
            ready: Vec::new(),
            backup_label: None,
            capture_label: false,
            digests: Vec::new(),
            digest: None,
        }
    }

    pub(super) fn begin_archive(&mut self, tablespace: Option<(u32, String)>) {
        if let Some((oid, location)) = &tablespace {
            if !self.tablespaces.iter().any(|t| t.oid == *oid) {
                self.tablespaces.push(TablespaceEntry {
                    oid: *oid,
                    location: location.clone(),
                });
            }
        }
        self.tablespace = tablespace.map(|(oid, _)| oid);
        self.tar = Some(TarReader::new());
    }

    pub(super) fn end_archive(&mut self) -> Result<()> {
        if let Some(tar) = self.tar.take() {
            tar.finish()
                .context("PostgreSQL's backup archive ended early")?;
        }
        Ok(())
    }

    fn seal_chunk(&mut self) {
        if self.chunk.is_empty() {
            return;
        }
        let data = Bytes::from(std::mem::replace(
            &mut self.chunk,
            Vec::with_capacity(BACKUP_CHUNK_SIZE as usize),
        ));
        let hash = blake3::hash(&data).to_hex().to_string();
        if let Some(f) = self.current.as_mut() {
            f.chunks.push(hash.clone());
        }
        self.ready.push((hash, data));
    }

    fn on_event(&mut self, event: TarEvent<'_>) -> Result<(), TarError> {
        match event {
            TarEvent::Entry(e) => {
                self.capture_label = self.tablespace.is_none() && e.path == "backup_label";
                self.digest = (e.kind == FileKind::File).then(|| FileDigest {
                    path: match self.tablespace {
                        Some(oid) => format!("pg_tblspc/{oid}/{}", e.path),
                        None => e.path.clone(),
                    },
                    size: 0,
                    crc32c: 0,
                });
                self.current = Some(FileEntry {
                    tablespace: self.tablespace,
                    path: e.path,
                    kind: e.kind,
                    mode: e.mode,
                    size: e.size,
                    mtime: e.mtime,
                    link: e.link,
                    chunks: Vec::new(),
                });
            }
            TarEvent::Data(mut data) => {
                if let Some(d) = self.digest.as_mut() {
                    d.size += data.len() as u64;
                    d.crc32c = crc32c::crc32c_append(d.crc32c, data);
                }
                if self.capture_label {
                    self.backup_label
                        .get_or_insert_with(String::new)
                        .push_str(&String::from_utf8_lossy(data));
                }
                while !data.is_empty() {
                    let room = BACKUP_CHUNK_SIZE as usize - self.chunk.len();
                    let take = room.min(data.len());
                    self.chunk.extend_from_slice(&data[..take]);
                    data = &data[take..];
                    if self.chunk.len() == BACKUP_CHUNK_SIZE as usize {
                        self.seal_chunk();
                    }
                }
            }
            TarEvent::EntryEnd => {
                self.seal_chunk();
                if let Some(d) = self.digest.take() {
                    self.digests.push(d);
                }
                if let Some(f) = self.current.take() {
                    self.files.push(f);
                }
            }
        }
        Ok(())
    }

    pub(super) async fn feed(&mut self, bytes: &[u8]) -> Result<()> {
        let mut tar = self
            .tar
            .take()
            .ok_or_else(|| anyhow!("PostgreSQL sent backup data before naming an archive"))?;
        let result = tar.feed::<TarError>(bytes, |e| self.on_event(e));
        self.tar = Some(tar);
        result.context("PostgreSQL's backup archive is not a tar stream walvault can read")?;
        for (hash, data) in std::mem::take(&mut self.ready) {
            self.uploader.add(hash, data).await?;
        }
        Ok(())
    }

    /// Checks every file received against PostgreSQL's own `backup_manifest` (its
    /// checksum, then each file's size and CRC32C, none missing, none extra); the number
    /// of files checked. An error names the files that differ.
    pub(super) fn verify(&self, pg_manifest: &[u8]) -> Result<usize> {
        let manifest = PgBackupManifest::parse(pg_manifest)?;
        Ok(manifest.check(&self.digests)?)
    }

    pub(super) async fn finish(
        self,
    ) -> Result<(Vec<FileEntry>, Vec<TablespaceEntry>, String, BackupStats)> {
        let stats = self.uploader.finish().await?;
        let label = self
            .backup_label
            .ok_or_else(|| anyhow!("PostgreSQL's backup has no backup_label"))?;
        let mut stats = stats;
        stats.chunks = self.files.iter().map(|f| f.chunks.len() as u64).sum();
        Ok((self.files, self.tablespaces, label, stats))
    }
}
