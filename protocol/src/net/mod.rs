//! The I/O half of walvault's shared library (cargo feature `net`, on by default): what
//! every binary needs to talk to the archive, to PostgreSQL and to the disk.
//!
//! - [`transport`]: QUIC + mutual TLS endpoints and frames on streams;
//! - [`client`]: the typed [`client::ArchiveClient`], with deadlines on every request and
//!   errors that classify themselves;
//! - [`pki`]: the archive CA and the certificates that name a cluster and a role;
//! - [`config`]: client config files;
//! - [`pg`]: PostgreSQL connections (replication protocol, BASE_BACKUP);
//! - [`progress`]: the progress bar of long operations on a terminal;
//! - [`fsutil`]: durable file writes; [`fanout`]: bounded parallelism; [`retry`]: one
//!   retry policy for failures that classify themselves; [`logging`]; [`users`]: the
//!   password database entry of a uid, thread-safe;
//! - [`cli`]: the command-line setup the three binaries share and their exit codes.

pub mod checklist;
pub mod cli;
pub mod client;
pub mod config;
pub mod fanout;
pub mod fsutil;
pub mod http;
pub mod logging;
pub mod pg;
pub mod pgsetup;
pub mod pki;
pub mod progress;
pub mod retry;
pub mod transport;
pub mod users;
