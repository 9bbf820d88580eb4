//! Offline tools: commands that need no configuration and no archive.

pub(crate) mod walblocks;
