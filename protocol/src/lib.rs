//! walvault's shared library: everything the binaries speak.
//!
//! The pure core has no sockets and no files and never panics on input:
//! - [`wal`]: WAL file names, LSNs, timelines, the long page header and the check that a
//!   file is what its name says;
//! - [`wire`]: the archive protocol's messages and framing;
//! - [`codec`]: streaming zstd + blake3 with verification;
//! - [`object`]: the stored object format (header + zstd frame) and its verifier;
//! - [`backup`]: base backup manifests, chunking, and PostgreSQL's tar stream.
//!
//! Beside it, the I/O every binary shares: [`transport`] (QUIC + mutual TLS endpoints,
//! frames on streams), [`pki`] (the archive CA and client certificates), [`config`]
//! (client config files), [`fsutil`] (durable writes), [`fanout`] (bounded parallelism),
//! [`retry`] (one retry policy for transient failures),
//! [`pgconn`] (PostgreSQL connections: SQL and BASE_BACKUP) and [`logging`].
//!
//! ```
//! use walvault_protocol::wal::{WalFileName, Lsn};
//! let name: WalFileName = "000000010000000A000000FE".parse().unwrap();
//! assert_eq!(name.segment().unwrap().start_lsn(16 << 20), "A/FE000000".parse::<Lsn>().unwrap());
//! ```
#![warn(missing_docs, unreachable_pub)]

pub mod backup;
pub mod codec;
pub mod config;
pub mod fanout;
pub mod fsutil;
pub mod logging;
pub mod object;
pub mod pgconn;
pub mod pki;
pub mod retry;
pub mod transport;
pub mod wal;
pub mod waldecode;
pub mod wire;

/// Version of walvault, reported by every binary and by the server.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
