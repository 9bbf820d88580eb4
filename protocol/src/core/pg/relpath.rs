//! Where PostgreSQL keeps a block of a relation: the file under PGDATA and the offset in
//! it, as PostgreSQL's `GetRelationPath` (common/relpath.c) and md.c's segmenting compute
//! them. Pure: paths are relative to the data directory, nothing is opened.
//!
//! ```text
//! tablespace 1664 (pg_global)   global/<rel>
//! tablespace 1663 (pg_default)  base/<db>/<rel>
//! any other tablespace <spc>    pg_tblspc/<spc>/PG_<major>_<catversion>/<db>/<rel>
//! fork                          "" (main), "_fsm", "_vm", "_init" appended to <rel>
//! segment files                 ".<blk / RELSEG_SIZE>" appended when non-zero
//! offset in the file            (blk % RELSEG_SIZE) * BLCKSZ
//! ```
//!
//! The same for PostgreSQL 13 to 17 (16 renamed `RelFileNode` to `RelFileLocator`; the
//! files kept their names). Block size, `RELSEG_SIZE` and the catalog version come from
//! `global/pg_control` ([`super::control`]), the major version from `PG_VERSION`: never
//! assumed. Temporary relations (`t<backend>_<rel>`) are never WAL-logged, so no block
//! reference names one.

use std::path::PathBuf;

use super::waldecode::{ForkNumber, RelFileLocator};

/// `GLOBALTABLESPACE_OID`: shared catalogs, in `global/`.
pub const GLOBAL_TABLESPACE: u32 = 1664;
/// `DEFAULTTABLESPACE_OID`: `base/`.
pub const DEFAULT_TABLESPACE: u32 = 1663;

/// What maps a block to a file: the cluster's storage geometry and version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RelationLayout {
    /// Relation block size (`BLCKSZ`).
    pub block_size: u32,
    /// Blocks per segment file (`RELSEG_SIZE`).
    pub relseg_blocks: u32,
    /// PostgreSQL major version (13 ..= 17).
    pub major: u32,
    /// `catalog_version_no`.
    pub catalog_version: u32,
}

/// A block's place on disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockLocation {
    /// The file, relative to the data directory.
    pub path: PathBuf,
    /// Byte offset of the block in that file.
    pub offset: u64,
}

impl RelationLayout {
    /// `PG_<major>_<catversion>`: a tablespace's directory for this version
    /// (`TABLESPACE_VERSION_DIRECTORY`).
    pub fn tablespace_version_dir(&self) -> String {
        format!("PG_{}_{}", self.major, self.catalog_version)
    }

    /// The directory of a database's files in a tablespace, relative to PGDATA.
    pub fn database_dir(&self, spc: u32, db: u32) -> PathBuf {
        match spc {
            GLOBAL_TABLESPACE => PathBuf::from("global"),
            DEFAULT_TABLESPACE => PathBuf::from("base").join(db.to_string()),
            spc => PathBuf::from("pg_tblspc")
                .join(spc.to_string())
                .join(self.tablespace_version_dir())
                .join(db.to_string()),
        }
    }

    /// Where `block` of `fork` of `rel` lives.
    pub fn locate(&self, rel: RelFileLocator, fork: ForkNumber, block: u32) -> BlockLocation {
        let relseg = self.relseg_blocks.max(1);
        BlockLocation {
            path: self
                .database_dir(rel.spc, rel.db)
                .join(relation_file_name(rel.rel, fork, block, relseg)),
            offset: u64::from(block % relseg) * u64::from(self.block_size),
        }
    }
}

/// `<rel>[_fork][.segment]`: the name of the file holding `block`.
pub fn relation_file_name(rel: u32, fork: ForkNumber, block: u32, relseg_blocks: u32) -> String {
    let suffix = match fork {
        ForkNumber::Main => String::new(),
        other => format!("_{}", other.name()),
    };
    let segment = block / relseg_blocks.max(1);
    if segment == 0 {
        format!("{rel}{suffix}")
    } else {
        format!("{rel}{suffix}.{segment}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> RelationLayout {
        RelationLayout {
            block_size: 8192,
            relseg_blocks: 131072,
            major: 15,
            catalog_version: 202209061,
        }
    }

    #[test]
    fn relation_file_names() {
        assert_eq!(
            relation_file_name(16384, ForkNumber::Main, 5, 131072),
            "16384"
        );
        assert_eq!(
            relation_file_name(16384, ForkNumber::Fsm, 5, 131072),
            "16384_fsm"
        );
        assert_eq!(
            relation_file_name(16384, ForkNumber::Vm, 131072, 131072),
            "16384_vm.1"
        );
        assert_eq!(
            relation_file_name(16384, ForkNumber::Init, 262145, 131072),
            "16384_init.2"
        );
        // A RELSEG_SIZE of 0 (never valid) cannot divide by zero.
        assert_eq!(relation_file_name(1, ForkNumber::Main, 7, 0), "1.7");
    }

    #[test]
    fn block_locations_cover_tablespaces_forks_and_segments() {
        let l = layout();
        let loc =
            |spc, db, rel, fork, block| l.locate(RelFileLocator { spc, db, rel }, fork, block);
        assert_eq!(
            loc(1664, 0, 1262, ForkNumber::Main, 0),
            BlockLocation {
                path: PathBuf::from("global/1262"),
                offset: 0
            }
        );
        assert_eq!(
            loc(1663, 5, 16384, ForkNumber::Main, 131073),
            BlockLocation {
                path: PathBuf::from("base/5/16384.1"),
                offset: 8192
            }
        );
        assert_eq!(
            loc(16400, 5, 16401, ForkNumber::Vm, 2),
            BlockLocation {
                path: PathBuf::from("pg_tblspc/16400/PG_15_202209061/5/16401_vm"),
                offset: 2 * 8192
            }
        );
        let pg17 = RelationLayout {
            major: 17,
            catalog_version: 202406281,
            block_size: 32768,
            relseg_blocks: 32768,
        };
        assert_eq!(
            pg17.locate(
                RelFileLocator {
                    spc: 16500,
                    db: 1,
                    rel: 7
                },
                ForkNumber::Main,
                32769
            ),
            BlockLocation {
                path: PathBuf::from("pg_tblspc/16500/PG_17_202406281/1/7.1"),
                offset: 32768
            }
        );
    }
}
