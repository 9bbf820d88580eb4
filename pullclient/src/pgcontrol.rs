//! The few facts the prefaulter needs from `global/pg_control` and `PG_VERSION`.
//!
//! `ControlFileData` (PostgreSQL 13-16 share this layout up to these fields; native
//! endianness, which is little-endian on every platform walvault supports):
//!
//! ```text
//! off  size  field
//!  12     4  catalog_version_no   names tablespace directories PG_<major>_<catversion>
//! 216     4  blcksz               relation block size
//! 220     4  relseg_size          blocks per relation segment file (1 GiB by default)
//! 224     4  xlog_blcksz          WAL block size
//! 228     4  xlog_seg_size        WAL segment size
//! ```
//!
//! Every value is checked for plausibility; a file that fails the check is reported and
//! prefaulting is skipped rather than guessed.

use std::path::Path;

use anyhow::{bail, Context, Result};

/// What the prefaulter needs to map a block to a file offset.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ControlFacts {
    /// Relation block size.
    pub(crate) block_size: u32,
    /// Blocks per relation segment file.
    pub(crate) relseg_blocks: u32,
    /// `catalog_version_no`.
    pub(crate) catalog_version: u32,
    /// PostgreSQL major version (PG_VERSION).
    pub(crate) major: u32,
}

impl ControlFacts {
    /// Reads `PGDATA/global/pg_control` and `PGDATA/PG_VERSION`.
    pub(crate) fn read(pgdata: &Path) -> Result<ControlFacts> {
        let path = pgdata.join("global").join("pg_control");
        let bytes =
            std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
        let version_path = pgdata.join("PG_VERSION");
        let major: u32 = std::fs::read_to_string(&version_path)
            .with_context(|| format!("cannot read {}", version_path.display()))?
            .trim()
            .parse()
            .with_context(|| format!("{} is not a version number", version_path.display()))?;
        Self::parse(&bytes, major).with_context(|| format!("{}", path.display()))
    }

    /// Parses the control file bytes.
    pub(crate) fn parse(bytes: &[u8], major: u32) -> Result<ControlFacts> {
        let u32_at = |o: usize| -> Result<u32> {
            let b = bytes.get(o..o + 4).context("control file too short")?;
            Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        };
        if !(13..=16).contains(&major) {
            bail!("PostgreSQL {major}: control file layout not known to this version of walvault");
        }
        let facts = ControlFacts {
            catalog_version: u32_at(12)?,
            block_size: u32_at(216)?,
            relseg_blocks: u32_at(220)?,
            major,
        };
        let wal_block = u32_at(224)?;
        let seg_size = u32_at(228)?;
        let plausible = facts.block_size.is_power_of_two()
            && (1024..=32768).contains(&facts.block_size)
            && facts.relseg_blocks > 0
            && wal_block.is_power_of_two()
            && seg_size.is_power_of_two()
            && (1 << 20..=1 << 30).contains(&seg_size)
            && facts.catalog_version > 200_000_000;
        if !plausible {
            bail!("implausible control file values {facts:?}; not prefaulting");
        }
        Ok(facts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_pg15_layout_and_refuses_garbage() {
        let mut b = vec![0u8; 8192];
        b[12..16].copy_from_slice(&202209061u32.to_le_bytes());
        b[216..220].copy_from_slice(&8192u32.to_le_bytes());
        b[220..224].copy_from_slice(&131072u32.to_le_bytes());
        b[224..228].copy_from_slice(&8192u32.to_le_bytes());
        b[228..232].copy_from_slice(&(16u32 << 20).to_le_bytes());
        let f = ControlFacts::parse(&b, 15).unwrap();
        assert_eq!(
            (f.block_size, f.relseg_blocks, f.catalog_version),
            (8192, 131072, 202209061)
        );
        assert!(ControlFacts::parse(&b[..100], 15).is_err());
        assert!(ControlFacts::parse(&vec![0xFF; 8192], 15).is_err());
        assert!(ControlFacts::parse(&b, 12).is_err());
    }
}
