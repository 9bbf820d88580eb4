//! The few facts walvault needs from `global/pg_control` and `PG_VERSION`.
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
//! Every value is checked for plausibility; a file that fails the check is an error,
//! never a guess.

use super::relpath::RelationLayout;

/// What maps a block to a file offset.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ControlFacts {
    /// Relation block size.
    pub block_size: u32,
    /// Blocks per relation segment file.
    pub relseg_blocks: u32,
    /// `catalog_version_no`.
    pub catalog_version: u32,
    /// PostgreSQL major version (PG_VERSION).
    pub major: u32,
}

/// Why a control file (or `PG_VERSION`) cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    /// `PG_VERSION` does not hold a major version number.
    #[error("PG_VERSION holds {0:?}, not a PostgreSQL major version number")]
    BadVersionFile(String),
    /// A major version whose layout this version of walvault does not know.
    #[error("PostgreSQL {0}: control file layout not known to this version of walvault")]
    UnsupportedVersion(u32),
    /// Fewer bytes than the layout needs.
    #[error("control file too short ({0} bytes)")]
    Truncated(usize),
    /// Values no PostgreSQL writes.
    #[error("implausible control file values {0}")]
    Implausible(String),
}

/// The major version in `PG_VERSION`'s text ("15\n").
pub fn parse_pg_version(text: &str) -> Result<u32, ControlError> {
    text.trim()
        .parse()
        .map_err(|_| ControlError::BadVersionFile(text.trim().chars().take(32).collect()))
}

impl ControlFacts {
    /// Parses the control file bytes of a cluster of major version `major`.
    pub fn parse(bytes: &[u8], major: u32) -> Result<ControlFacts, ControlError> {
        let u32_at = |o: usize| -> Result<u32, ControlError> {
            let b = bytes
                .get(o..o + 4)
                .ok_or(ControlError::Truncated(bytes.len()))?;
            Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        };
        if !(13..=16).contains(&major) {
            return Err(ControlError::UnsupportedVersion(major));
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
            return Err(ControlError::Implausible(format!("{facts:?}")));
        }
        Ok(facts)
    }

    /// The block-to-file mapping these facts give.
    pub fn relation_layout(&self) -> RelationLayout {
        RelationLayout {
            block_size: self.block_size,
            relseg_blocks: self.relseg_blocks,
            major: self.major,
            catalog_version: self.catalog_version,
        }
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

    #[test]
    fn pg_version_file() {
        assert_eq!(parse_pg_version("15\n"), Ok(15));
        assert!(parse_pg_version("fifteen").is_err());
    }
}
