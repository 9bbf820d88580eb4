//! PostgreSQL's own formats, read as PostgreSQL writes them.

pub mod tar;
pub mod wal;
pub mod waldecode;
