//! The harness's modules; `lib.rs` re-exports what the tests use.

pub mod archive;
pub mod bins;
pub mod clock;
pub mod cmd;
pub mod files;
pub mod moto;
pub mod pg;
mod pgdata_template;
pub mod proxy;
pub mod users;
