//! Test harness: temp dirs, the binaries under test, archived, PostgreSQL clusters
//! (modules in `harness/`, re-exported here).
//!
//! Everything here panics with a message saying what failed (the command line, its exit
//! status, its stdout and stderr, and the relevant log tails): a harness failure must be
//! diagnosable from the test output alone.
//!
//! - [`TestDir`]: a world-traversable temp dir under /tmp (kept when `WALVAULT_KEEP_TMP`
//!   is set, for post-mortems).
//! - [`Binaries`]: `archived`, `pushclient` and `pullclient` copied from the cargo target
//!   directory into a temp dir the `postgres` user can execute from.
//! - [`Archive`]: a running `archived serve` on 127.0.0.1, on a UDP port the kernel picked.
//! - [`PgCluster`]: a PostgreSQL 15 cluster in its own temp dir on its own Unix socket.
//! - [`MotoServer`]: an S3 server (`moto_server`, PyPI `moto[server]`) on a 127.0.0.1
//!   TCP port the kernel picked, for archives whose store is `s3://`
//!   ([`Archive::start_s3`]).
//! - [`SkewedClock`]: an `LD_PRELOAD` library that moves a client's wall clock.
//! - [`PgProxy`]: a TCP proxy to a cluster's socket that can flip a bit of what the
//!   server sends.
//!
//! PostgreSQL refuses to run as root: when the tests run as root, every PostgreSQL
//! program (and every client the tests run on PostgreSQL's behalf) runs as the `postgres`
//! OS user.

mod harness;

pub use harness::archive::*;
pub use harness::bins::*;
pub use harness::clock::*;
pub use harness::cmd::*;
pub use harness::files::*;
pub use harness::moto::*;
pub use harness::pg::*;
pub use harness::proxy::*;
pub use harness::users::*;
pub use serde_json;
