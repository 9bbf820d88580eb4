//! walvault's formats: what the archive stores and the names it accepts.

pub mod codec;
pub mod manifest;
pub mod names;
pub mod object;
pub mod pack;
