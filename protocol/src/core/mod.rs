//! The pure half of walvault's shared library: formats and messages, no sockets, no files,
//! no async runtime. It builds alone (`cargo build -p walvault-protocol
//! --no-default-features`), so fuzz targets and property tests compile only this, and
//! every decoder of outside input in it returns a typed error on any input, never panics.
//!
//! - [`pg`]: PostgreSQL's formats: LSNs, timelines, WAL file names and the long page
//!   header ([`pg::wal`]), WAL page and record decoding ([`pg::waldecode`]), BASE_BACKUP's
//!   command and COPY messages ([`pg::basebackup`]) and its ustar stream ([`pg::tar`]),
//!   the control file ([`pg::control`]) and where a relation block lives under PGDATA
//!   ([`pg::relpath`]).
//! - [`format`]: walvault's own formats: the stored object ([`format::object`]),
//!   streaming zstd + blake3 ([`format::codec`]), backup manifests
//!   ([`format::manifest`]), packs of backup chunks ([`format::pack`]) and the names
//!   clients may use ([`format::names`]).
//! - [`wire`]: the archive protocol's messages and framing.

pub mod format;
pub mod pg;
pub mod wire;
