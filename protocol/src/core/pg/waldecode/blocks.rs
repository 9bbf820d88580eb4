//! Block references: which relation block a record touches, and whether it carries a
//! full-page image (`XLogRecordBlockHeader` and what follows it).

use std::fmt;

use super::record::{BodyReader, RecordProblem};

/// `fork_flags`: the fork number lives in the low four bits.
const BKPBLOCK_FORK_MASK: u8 = 0x0F;
/// `fork_flags`: an `XLogRecordBlockImageHeader` follows.
const BKPBLOCK_HAS_IMAGE: u8 = 0x10;
/// `fork_flags`: the block has rmgr data (`data_length` > 0).
const BKPBLOCK_HAS_DATA: u8 = 0x20;
/// `fork_flags`: redo reinitializes the page (it need not be read first).
const BKPBLOCK_WILL_INIT: u8 = 0x40;
/// `fork_flags`: no `RelFileLocator` follows; same relation as the previous block.
const BKPBLOCK_SAME_REL: u8 = 0x80;

/// `bimg_info`: the image omits a run of zeros (the "hole").
const BKPIMAGE_HAS_HOLE: u8 = 0x01;
/// `bimg_info` up to PostgreSQL 14: the image is pglz-compressed.
const BKPIMAGE_IS_COMPRESSED_14: u8 = 0x02;
/// `bimg_info` up to PostgreSQL 14: redo restores the image.
const BKPIMAGE_APPLY_14: u8 = 0x04;
/// `bimg_info` from PostgreSQL 15: redo restores the image.
const BKPIMAGE_APPLY_15: u8 = 0x02;
/// `bimg_info` from PostgreSQL 15: compressed with pglz.
const BKPIMAGE_COMPRESS_PGLZ: u8 = 0x04;
/// `bimg_info` from PostgreSQL 15: compressed with LZ4.
const BKPIMAGE_COMPRESS_LZ4: u8 = 0x08;
/// `bimg_info` from PostgreSQL 15: compressed with zstd.
const BKPIMAGE_COMPRESS_ZSTD: u8 = 0x10;

/// Which file of a relation a block belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ForkNumber {
    /// The relation's data (`MAIN_FORKNUM`).
    Main,
    /// The free space map (`FSM_FORKNUM`).
    Fsm,
    /// The visibility map (`VISIBILITYMAP_FORKNUM`).
    Vm,
    /// The init fork of an unlogged relation (`INIT_FORKNUM`).
    Init,
}

impl ForkNumber {
    /// The fork with PostgreSQL's number, if it exists.
    pub fn from_number(n: u8) -> Option<ForkNumber> {
        match n {
            0 => Some(ForkNumber::Main),
            1 => Some(ForkNumber::Fsm),
            2 => Some(ForkNumber::Vm),
            3 => Some(ForkNumber::Init),
            _ => None,
        }
    }

    /// The name PostgreSQL uses (file suffix, pg_waldump output).
    pub fn name(&self) -> &'static str {
        match self {
            ForkNumber::Main => "main",
            ForkNumber::Fsm => "fsm",
            ForkNumber::Vm => "vm",
            ForkNumber::Init => "init",
        }
    }
}

impl fmt::Display for ForkNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A relation's storage: tablespace, database and relation file number
/// (`RelFileLocator`, `RelFileNode` before PostgreSQL 16). Printed `spc/db/rel`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RelFileLocator {
    /// Tablespace OID (1663 = pg_default, 1664 = pg_global).
    pub spc: u32,
    /// Database OID (0 for shared relations).
    pub db: u32,
    /// Relation file number.
    pub rel: u32,
}

impl fmt::Display for RelFileLocator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.spc, self.db, self.rel)
    }
}

/// How a full-page image is compressed (`wal_compression`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ImageCompression {
    /// PostgreSQL's own LZ (the only method before PostgreSQL 15).
    Pglz,
    /// LZ4 (PostgreSQL 15 and later).
    Lz4,
    /// Zstandard (PostgreSQL 15 and later).
    Zstd,
}

impl ImageCompression {
    /// The name pg_waldump and `wal_compression` use.
    pub fn name(&self) -> &'static str {
        match self {
            ImageCompression::Pglz => "pglz",
            ImageCompression::Lz4 => "lz4",
            ImageCompression::Zstd => "zstd",
        }
    }
}

impl fmt::Display for ImageCompression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A full-page image carried by a block reference (`XLogRecordBlockImageHeader`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BlockImage {
    /// Bytes of image data in the record (`length`), after hole removal and compression.
    pub len: u16,
    /// Offset of the omitted run of zeros (`hole_offset`).
    pub hole_offset: u16,
    /// Length of the omitted run of zeros.
    pub hole_length: u16,
    /// Whether redo restores the image (`BKPIMAGE_APPLY`); an image that is not applied
    /// is there for `wal_consistency_checking` only.
    pub apply: bool,
    /// Compression, if any.
    pub compression: Option<ImageCompression>,
}

/// One block a record touches (`XLogRecordBlockHeader`, decoded).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BlockRef {
    /// Block reference id within the record (0 ..= 32).
    pub id: u8,
    /// The relation.
    pub rel: RelFileLocator,
    /// The fork.
    pub fork: ForkNumber,
    /// Block number within the fork.
    pub block: u32,
    /// Redo reinitializes the page, so it need not be read (`BKPBLOCK_WILL_INIT`).
    pub will_init: bool,
    /// Bytes of rmgr data for this block (`data_length`).
    pub data_len: u16,
    /// The full-page image, if the record carries one.
    pub image: Option<BlockImage>,
}

impl BlockRef {
    /// Whether the record carries a full-page image of the block.
    pub fn has_image(&self) -> bool {
        self.image.is_some()
    }

    /// Reads one block header, its `id` byte already consumed. Returns the block and the
    /// payload bytes it accounts for later in the record (data plus image). The checks are
    /// PostgreSQL's (`DecodeXLogRecord`); `block_size` is the relation page size `BLCKSZ`.
    pub(crate) fn read(
        r: &mut BodyReader<'_>,
        id: u8,
        previous_rel: Option<RelFileLocator>,
        pg_major: u32,
        block_size: u32,
    ) -> Result<(BlockRef, u32), RecordProblem> {
        let fork_flags = r.u8()?;
        let fork = ForkNumber::from_number(fork_flags & BKPBLOCK_FORK_MASK).ok_or(
            RecordProblem::BadFork {
                block_id: id,
                fork: fork_flags & BKPBLOCK_FORK_MASK,
            },
        )?;
        let data_len = r.u16()?;
        if (fork_flags & BKPBLOCK_HAS_DATA != 0) != (data_len != 0) {
            return Err(RecordProblem::DataFlagMismatch {
                block_id: id,
                data_len,
            });
        }
        let mut payload = data_len as u32;
        let image = if fork_flags & BKPBLOCK_HAS_IMAGE != 0 {
            let image = read_image(r, id, pg_major, block_size)?;
            payload += image.len as u32;
            Some(image)
        } else {
            None
        };
        let rel = if fork_flags & BKPBLOCK_SAME_REL == 0 {
            RelFileLocator {
                spc: r.u32()?,
                db: r.u32()?,
                rel: r.u32()?,
            }
        } else {
            previous_rel.ok_or(RecordProblem::SameRelWithoutRel { block_id: id })?
        };
        let block = r.u32()?;
        Ok((
            BlockRef {
                id,
                rel,
                fork,
                block,
                will_init: fork_flags & BKPBLOCK_WILL_INIT != 0,
                data_len,
                image,
            },
            payload,
        ))
    }
}

/// Reads `XLogRecordBlockImageHeader` (and `XLogRecordBlockCompressHeader`), whose flag
/// bits moved in PostgreSQL 15 when lz4 and zstd joined pglz.
fn read_image(
    r: &mut BodyReader<'_>,
    block_id: u8,
    pg_major: u32,
    block_size: u32,
) -> Result<BlockImage, RecordProblem> {
    let len = r.u16()?;
    let hole_offset = r.u16()?;
    let info = r.u8()?;
    let (apply, compression) = if pg_major <= 14 {
        let compression = (info & BKPIMAGE_IS_COMPRESSED_14 != 0).then_some(ImageCompression::Pglz);
        (info & BKPIMAGE_APPLY_14 != 0, compression)
    } else {
        // Several method bits cannot come from PostgreSQL; its restore code would try
        // pglz first, then lz4, so that is the order here.
        let compression = if info & BKPIMAGE_COMPRESS_PGLZ != 0 {
            Some(ImageCompression::Pglz)
        } else if info & BKPIMAGE_COMPRESS_LZ4 != 0 {
            Some(ImageCompression::Lz4)
        } else if info & BKPIMAGE_COMPRESS_ZSTD != 0 {
            Some(ImageCompression::Zstd)
        } else {
            None
        };
        (info & BKPIMAGE_APPLY_15 != 0, compression)
    };
    let has_hole = info & BKPIMAGE_HAS_HOLE != 0;
    let bad = |why| RecordProblem::BadImage { block_id, why };
    let hole_length = match compression {
        Some(_) if has_hole => r.u16()?,
        Some(_) => 0,
        // An uncompressed image is the page minus the hole.
        None => u16::try_from(
            block_size
                .checked_sub(len as u32)
                .ok_or(bad("image longer than a block"))?,
        )
        .map_err(|_| bad("hole longer than 64 KiB"))?,
    };
    if has_hole && (hole_offset == 0 || hole_length == 0 || len as u32 == block_size) {
        return Err(bad(
            "BKPIMAGE_HAS_HOLE set, but the hole is empty or the image is a whole block",
        ));
    }
    if !has_hole && (hole_offset != 0 || hole_length != 0) {
        return Err(bad("BKPIMAGE_HAS_HOLE not set, but the image has a hole"));
    }
    if compression.is_some() && len as u32 == block_size {
        return Err(bad("compressed image as long as a block"));
    }
    if !has_hole && compression.is_none() && len as u32 != block_size {
        return Err(bad(
            "uncompressed image without a hole shorter than a block",
        ));
    }
    Ok(BlockImage {
        len,
        hole_offset,
        hole_length,
        apply,
        compression,
    })
}
