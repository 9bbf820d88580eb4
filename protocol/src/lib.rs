//! walvault's shared library: everything the binaries speak, in two halves.
//!
//! [`core`] is pure code (PostgreSQL's formats, walvault's formats, the wire protocol):
//! no sockets, no files, no tokio, quinn or rustls, and no panic on any input. It builds
//! without the default `net` feature, for fuzz targets and pure tests.
//!
//! [`net`] is the I/O every binary shares: QUIC + mutual TLS transport, PKI, client
//! config, the PostgreSQL connection, durable file writes, bounded fan-out, retry and
//! logging.
//!
//! ```
//! use walvault_protocol::core::pg::wal::{Lsn, WalFileName};
//! let name: WalFileName = "000000010000000A000000FE".parse().unwrap();
//! assert_eq!(name.segment().unwrap().start_lsn(16 << 20), "A/FE000000".parse::<Lsn>().unwrap());
//! ```
#![warn(missing_docs, unreachable_pub)]

pub mod core;
#[cfg(feature = "net")]
pub mod net;

/// Version of walvault, reported by every binary and by the server.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
