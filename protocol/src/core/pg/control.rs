//! The facts walvault needs from `global/pg_control` and `PG_VERSION`, for PostgreSQL 13
//! to 17; any other major version is refused with an error naming it, never guessed.
//!
//! `ControlFileData` (`src/include/catalog/pg_control.h`; native endianness, which is
//! little-endian on every platform walvault supports). PostgreSQL 13 to 16 write format
//! 1300, PostgreSQL 17 writes 1700 (its `CheckPoint` copy gained `wal_level`, which fits
//! in padding: no field below moves). The offsets follow from C's layout of the struct:
//!
//! ```text
//! off  size  field
//!   0     8  system_identifier
//!   8     4  pg_control_version   1300 (PG 13-16), 1700 (PG 17): must match PG_VERSION
//!  12     4  catalog_version_no   names tablespace directories PG_<major>_<catversion>
//!  16     4  state                (DBState)
//!  24     8  time
//!  32     8  checkPoint
//!  40    88  checkPointCopy       (CheckPoint)
//! 128   ...  unloggedLSN, minRecoveryPoint[TLI], backupStart/EndPoint, settings, maxAlign
//! 208     8  floatFormat          1234567.0
//! 216     4  blcksz               relation block size
//! 220     4  relseg_size          blocks per relation segment file (1 GiB by default)
//! 224     4  xlog_blcksz          WAL block size
//! 228     4  xlog_seg_size        WAL segment size
//! 232    20  nameDataLen, indexMaxKeys, toast_max_chunk_size, loblksize, float8ByVal
//! 252     4  data_checksum_version
//! 256    32  mock_authentication_nonce
//! 288     4  crc                  CRC-32C of bytes 0..288
//! ```
//!
//! PostgreSQL 18 (format 1800) inserts `default_char_signedness` before the nonce and
//! moves the CRC: refused until its layout is added here. The CRC is checked, then every
//! value for plausibility; a file that fails either is an error, never a guess.

use super::relpath::RelationLayout;

/// Bytes covered by the CRC in formats 1300 and 1700 (`offsetof(ControlFileData, crc)`).
const CRC_OFFSET: usize = 288;

/// The control file format each supported major version writes.
fn control_version_for(major: u32) -> Option<u32> {
    match major {
        13..=16 => Some(1300),
        17 => Some(1700),
        _ => None,
    }
}

/// What walvault reads from the control file.
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
    /// The cluster's system identifier.
    pub system_identifier: u64,
    /// WAL page size.
    pub wal_block_size: u32,
    /// WAL segment size.
    pub wal_segment_size: u32,
    /// Data checksums version (0: off).
    pub data_checksum_version: u32,
}

/// Why a control file (or `PG_VERSION`) cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    /// `PG_VERSION` does not hold a major version number.
    #[error("PG_VERSION holds {0:?}, not a PostgreSQL major version number")]
    BadVersionFile(String),
    /// A major version whose layout this version of walvault does not know.
    #[error(
        "PostgreSQL {0}: control file layout not known to this version of walvault (it reads \
         PostgreSQL 13 to 17)"
    )]
    UnsupportedVersion(u32),
    /// The file's format is not the one PG_VERSION's major version writes.
    #[error(
        "pg_control has format {found}, but PostgreSQL {major} writes {expected}: PG_VERSION and \
         global/pg_control disagree"
    )]
    VersionMismatch {
        /// From PG_VERSION.
        major: u32,
        /// What that version writes.
        expected: u32,
        /// What the file says.
        found: u32,
    },
    /// Fewer bytes than the layout needs.
    #[error("control file too short ({0} bytes)")]
    Truncated(usize),
    /// The stored CRC does not match the contents.
    #[error(
        "control file CRC mismatch (stored {stored:08x}, computed {computed:08x}): damaged or torn"
    )]
    BadCrc {
        /// CRC in the file.
        stored: u32,
        /// CRC of the bytes before it.
        computed: u32,
    },
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
        let expected = control_version_for(major).ok_or(ControlError::UnsupportedVersion(major))?;
        if bytes.len() < CRC_OFFSET + 4 {
            return Err(ControlError::Truncated(bytes.len()));
        }
        let u32_at =
            |o: usize| u32::from_le_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]);
        let found = u32_at(8);
        if found != expected {
            return Err(ControlError::VersionMismatch {
                major,
                expected,
                found,
            });
        }
        let stored = u32_at(CRC_OFFSET);
        let computed = crc32c::crc32c(&bytes[..CRC_OFFSET]);
        if stored != computed {
            return Err(ControlError::BadCrc { stored, computed });
        }
        let mut sysid = [0u8; 8];
        sysid.copy_from_slice(&bytes[0..8]);
        let facts = ControlFacts {
            system_identifier: u64::from_le_bytes(sysid),
            catalog_version: u32_at(12),
            block_size: u32_at(216),
            relseg_blocks: u32_at(220),
            wal_block_size: u32_at(224),
            wal_segment_size: u32_at(228),
            data_checksum_version: u32_at(252),
            major,
        };
        let plausible = facts.block_size.is_power_of_two()
            && (1024..=32768).contains(&facts.block_size)
            && facts.relseg_blocks > 0
            && facts.wal_block_size.is_power_of_two()
            && facts.wal_segment_size.is_power_of_two()
            && (1 << 20..=1 << 30).contains(&facts.wal_segment_size)
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

    /// `global/pg_control` of a PostgreSQL 15.x `initdb` on x86-64 (the 292 bytes of
    /// `ControlFileData`; the rest of the 8 KiB file is zeros): pg_controldata says
    /// version 1300, catalog 202209061, system identifier 7714563648052767874, blocks of
    /// 8192, 131072 per segment, WAL pages 8192, segments 16 MiB, checksums off.
    const PG15: &[u8] = include_bytes!("testdata/pg15_pg_control.bin");

    /// A control file as PostgreSQL `major` lays it out (see the module header), with
    /// `fields` at their offsets and the CRC PostgreSQL would write.
    fn control_file(fields: &[(usize, u32)]) -> Vec<u8> {
        let mut b = vec![0u8; 8192];
        b[0..8].copy_from_slice(&0x6B2F_0000_1234_5678u64.to_le_bytes()); // system_identifier
        for (off, v) in fields {
            b[*off..*off + 4].copy_from_slice(&v.to_le_bytes());
        }
        b[208..216].copy_from_slice(&1234567.0f64.to_le_bytes()); // floatFormat
        let crc = crc32c::crc32c(&b[..CRC_OFFSET]);
        b[CRC_OFFSET..CRC_OFFSET + 4].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// The common fields, by offset: version, catalog, blcksz, relseg, WAL page, WAL
    /// segment, checksums.
    fn fields(
        version: u32,
        catalog: u32,
        blcksz: u32,
        relseg: u32,
        checksums: u32,
    ) -> Vec<(usize, u32)> {
        vec![
            (8, version),
            (12, catalog),
            (216, blcksz),
            (220, relseg),
            (224, 8192),
            (228, 16 << 20),
            (252, checksums),
        ]
    }

    #[test]
    fn reads_a_real_pg15_control_file() {
        let f = ControlFacts::parse(PG15, 15).unwrap();
        assert_eq!(
            f,
            ControlFacts {
                block_size: 8192,
                relseg_blocks: 131072,
                catalog_version: 202209061,
                major: 15,
                system_identifier: 7714563648052767874,
                wal_block_size: 8192,
                wal_segment_size: 16 << 20,
                data_checksum_version: 0,
            }
        );
    }

    /// Each supported version's own catalog version and format number (catversion.h and
    /// pg_control.h of its release branch).
    #[test]
    fn reads_every_supported_version() {
        for (major, version, catalog) in [
            (13, 1300, 202007201),
            (14, 1300, 202107181),
            (15, 1300, 202209061),
            (16, 1300, 202307071),
            (17, 1700, 202406281),
        ] {
            let b = control_file(&fields(version, catalog, 8192, 131072, 1));
            let f = ControlFacts::parse(&b, major).unwrap_or_else(|e| panic!("PG {major}: {e}"));
            assert_eq!(
                (
                    f.major,
                    f.catalog_version,
                    f.block_size,
                    f.relseg_blocks,
                    f.data_checksum_version
                ),
                (major, catalog, 8192, 131072, 1)
            );
            assert_eq!(
                f.relation_layout().tablespace_version_dir(),
                format!("PG_{major}_{catalog}")
            );
        }
        // Non-default geometry (configure --with-blocksize=32 --with-segsize-blocks).
        let b = control_file(&fields(1700, 202406281, 32768, 1024, 0));
        let f = ControlFacts::parse(&b, 17).unwrap();
        assert_eq!((f.block_size, f.relseg_blocks), (32768, 1024));
    }

    #[test]
    fn refuses_other_versions_and_mismatched_formats() {
        let b = control_file(&fields(1800, 202506291, 8192, 131072, 1));
        assert_eq!(
            ControlFacts::parse(&b, 18),
            Err(ControlError::UnsupportedVersion(18))
        );
        assert_eq!(
            ControlFacts::parse(PG15, 12),
            Err(ControlError::UnsupportedVersion(12))
        );
        // A PG 15 file in a directory whose PG_VERSION says 17.
        assert_eq!(
            ControlFacts::parse(PG15, 17),
            Err(ControlError::VersionMismatch {
                major: 17,
                expected: 1700,
                found: 1300
            })
        );
        assert!(ControlFacts::parse(PG15, 17)
            .unwrap_err()
            .to_string()
            .contains("PG_VERSION and global/pg_control disagree"));
    }

    #[test]
    fn refuses_damage() {
        let mut b = PG15.to_vec();
        b[216] ^= 1; // blcksz 8193: the CRC catches it first
        assert!(matches!(
            ControlFacts::parse(&b, 15),
            Err(ControlError::BadCrc { .. })
        ));
        for len in 0..PG15.len() {
            assert!(
                ControlFacts::parse(&PG15[..len], 15).is_err(),
                "{len} bytes"
            );
        }
        // A valid CRC over values no PostgreSQL writes.
        let b = control_file(&fields(1300, 202209061, 3000, 131072, 0));
        assert!(matches!(
            ControlFacts::parse(&b, 15),
            Err(ControlError::Implausible(_))
        ));
        assert!(ControlFacts::parse(&vec![0xFF; 8192], 15).is_err());
    }

    #[test]
    fn pg_version_file() {
        assert_eq!(parse_pg_version("15\n"), Ok(15));
        assert!(parse_pg_version("fifteen").is_err());
    }
}
