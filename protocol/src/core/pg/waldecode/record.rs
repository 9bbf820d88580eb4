//! The record header (`XLogRecord`), its CRC, and the fragment headers that follow it
//! (block references, origin, top-level xid, main data), checked the way PostgreSQL's
//! `ValidXLogRecordHeader`, `ValidXLogRecord` and `DecodeXLogRecord` check them.

use crate::core::pg::wal::Lsn;

use super::blocks::{BlockRef, RelFileLocator};

/// `SizeOfXLogRecord`: the fixed header every record starts with.
pub(crate) const RECORD_HEADER_LEN: usize = 24;
/// Offset of `xl_crc` in the header; the CRC covers the bytes before it, last.
const CRC_OFFSET: usize = 20;
/// Longest record any PostgreSQL reader accepts (`MaxAllocSize`, 1 GiB - 1); PostgreSQL 16
/// and later never write more than 1020 MiB.
pub(crate) const MAX_RECORD_LEN: u32 = 0x3FFF_FFFF;
/// Fragment headers never run past this many bytes of a record: 33 block headers of at
/// most 27 bytes, plus origin, top-level xid and main-data headers, come to under 1 KiB.
/// A record whose headers would need more is refused rather than buffered.
pub(crate) const MAX_HEADERS_LEN: usize = 4096;

/// `XLR_MAX_BLOCK_ID`: block reference ids run from 0 to this.
const XLR_MAX_BLOCK_ID: u8 = 32;
/// Fragment id: main data with a one-byte length.
const XLR_BLOCK_ID_DATA_SHORT: u8 = 255;
/// Fragment id: main data with a four-byte length.
const XLR_BLOCK_ID_DATA_LONG: u8 = 254;
/// Fragment id: the replication origin (two bytes).
const XLR_BLOCK_ID_ORIGIN: u8 = 253;
/// Fragment id: the top-level transaction id (four bytes; PostgreSQL 14 and later).
const XLR_BLOCK_ID_TOPLEVEL_XID: u8 = 252;

/// The XLOG resource manager (`RM_XLOG_ID`).
pub(crate) const RM_XLOG_ID: u8 = 0;
/// `XLOG_SWITCH` in `xl_info` of an XLOG record: the rest of the segment is unused.
pub(crate) const XLOG_SWITCH: u8 = 0x40;
/// The high four bits of `xl_info` belong to the resource manager.
pub(crate) const XLR_RMGR_INFO_MASK: u8 = 0xF0;

/// Names of PostgreSQL's built-in resource managers, by id, as pg_waldump prints them.
const RMGR_NAMES: [&str; 22] = [
    "XLOG",
    "Transaction",
    "Storage",
    "CLOG",
    "Database",
    "Tablespace",
    "MultiXact",
    "RelMap",
    "Standby",
    "Heap2",
    "Heap",
    "Btree",
    "Hash",
    "Gin",
    "Gist",
    "Sequence",
    "SPGist",
    "BRIN",
    "CommitTs",
    "ReplicationOrigin",
    "Generic",
    "LogicalMessage",
];

/// First id of extension resource managers (PostgreSQL 15 and later).
const RM_MIN_CUSTOM_ID: u8 = 128;

/// The pg_waldump name of a built-in resource manager (`None` for custom ones).
pub fn rmgr_name(rmid: u8) -> Option<&'static str> {
    RMGR_NAMES.get(rmid as usize).copied()
}

/// Whether a WAL format of `pg_major` can carry resource manager `rmid`.
fn rmgr_is_valid(rmid: u8, pg_major: u32) -> bool {
    (rmid as usize) < RMGR_NAMES.len() || (pg_major >= 15 && rmid >= RM_MIN_CUSTOM_ID)
}

/// What is wrong with a record, in the words of PostgreSQL's checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RecordProblem {
    /// `xl_tot_len` is zero: nothing was written here (the usual end of WAL).
    #[error("zero record length (nothing written here)")]
    ZeroLength,
    /// `xl_tot_len` is shorter than a record header or longer than any record.
    #[error("invalid record length {0}")]
    BadLength(u32),
    /// `xl_rmid` names no resource manager.
    #[error("invalid resource manager id {0}")]
    BadRmgr(u8),
    /// `xl_prev` does not point at the previous record.
    #[error("record with incorrect prev-link {found}{}", match expected { Some(e) => format!(" (previous record at {e})"), None => " (not before the record)".to_string() })]
    BadPrevLink {
        /// `xl_prev` found.
        found: Lsn,
        /// The previous record, or `None` when decoding began at this record (then the
        /// link only has to point backwards).
        expected: Option<Lsn>,
    },
    /// The CRC does not match the record's bytes.
    #[error("incorrect record checksum: stored {stored:08X}, computed {computed:08X}")]
    BadCrc {
        /// `xl_crc`.
        stored: u32,
        /// CRC-32C of the record.
        computed: u32,
    },
    /// The fragment headers do not add up to the record length.
    #[error("record with invalid length (fragment lengths do not add up)")]
    ShortData,
    /// The fragment headers run past what any PostgreSQL writes.
    #[error("record fragment headers longer than {MAX_HEADERS_LEN} bytes")]
    HeadersTooLong,
    /// A fragment id that is no block id and no special id.
    #[error("invalid block id {0}")]
    BadBlockId(u8),
    /// Block ids must increase within a record.
    #[error("out-of-order block id {0}")]
    BlockOutOfOrder(u8),
    /// `BKPBLOCK_HAS_DATA` disagrees with `data_length`.
    #[error("block {block_id}: BKPBLOCK_HAS_DATA disagrees with data length {data_len}")]
    DataFlagMismatch {
        /// Block reference id.
        block_id: u8,
        /// `data_length`.
        data_len: u16,
    },
    /// An image header contradicts itself.
    #[error("block {block_id}: invalid image header: {why}")]
    BadImage {
        /// Block reference id.
        block_id: u8,
        /// Which of PostgreSQL's cross-checks failed.
        why: &'static str,
    },
    /// `BKPBLOCK_SAME_REL` on the first block of a record.
    #[error("block {block_id}: BKPBLOCK_SAME_REL set but no previous relation")]
    SameRelWithoutRel {
        /// Block reference id.
        block_id: u8,
    },
    /// A fork number PostgreSQL does not have.
    #[error("block {block_id}: invalid fork number {fork}")]
    BadFork {
        /// Block reference id.
        block_id: u8,
        /// The fork number found.
        fork: u8,
    },
}

/// The fixed record header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RecordHeader {
    pub(crate) tot_len: u32,
    pub(crate) xid: u32,
    pub(crate) prev: u64,
    pub(crate) info: u8,
    pub(crate) rmid: u8,
    pub(crate) crc: u32,
}

impl RecordHeader {
    /// Reads the header from the first [`RECORD_HEADER_LEN`] bytes.
    pub(crate) fn read(b: &[u8; RECORD_HEADER_LEN]) -> RecordHeader {
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        RecordHeader {
            tot_len: u32_at(0),
            xid: u32_at(4),
            prev: u32_at(8) as u64 | (u32_at(12) as u64) << 32,
            info: b[16],
            rmid: b[17],
            crc: u32_at(20),
        }
    }

    /// `ValidXLogRecordHeader`: the resource manager exists and the prev-link points at
    /// the previous record (or, with none known, before this one).
    pub(crate) fn check(
        &self,
        lsn: u64,
        previous: Option<u64>,
        pg_major: u32,
    ) -> Result<(), RecordProblem> {
        if !rmgr_is_valid(self.rmid, pg_major) {
            return Err(RecordProblem::BadRmgr(self.rmid));
        }
        let linked = match previous {
            Some(p) => self.prev == p,
            None => self.prev < lsn,
        };
        if !linked {
            return Err(RecordProblem::BadPrevLink {
                found: Lsn(self.prev),
                expected: previous.map(Lsn),
            });
        }
        Ok(())
    }
}

/// Checks that `len` is a possible `xl_tot_len`.
pub(crate) fn check_length(len: u32) -> Result<(), RecordProblem> {
    match len {
        0 => Err(RecordProblem::ZeroLength),
        l if l < RECORD_HEADER_LEN as u32 || l > MAX_RECORD_LEN => Err(RecordProblem::BadLength(l)),
        _ => Ok(()),
    }
}

/// `ValidXLogRecord`: PostgreSQL computes CRC-32C over everything after the header,
/// then over the header up to `xl_crc`. `data_crc` is the CRC of the first part.
pub(crate) fn check_crc(header: &[u8], data_crc: u32) -> Result<(), RecordProblem> {
    let (Some(covered), Some(stored)) = (
        header.get(..CRC_OFFSET),
        header.get(CRC_OFFSET..RECORD_HEADER_LEN),
    ) else {
        return Err(RecordProblem::BadLength(header.len() as u32));
    };
    let stored = u32::from_le_bytes([stored[0], stored[1], stored[2], stored[3]]);
    let computed = crc32c::crc32c_append(data_crc, covered);
    if stored == computed {
        Ok(())
    } else {
        Err(RecordProblem::BadCrc { stored, computed })
    }
}

/// What the fragment headers of a record say.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct RecordBody {
    pub(crate) blocks: Vec<BlockRef>,
    pub(crate) main_data_len: u32,
    pub(crate) origin: Option<u16>,
    pub(crate) toplevel_xid: Option<u32>,
}

/// A cursor over the fragment headers, bounded both by the bytes kept and by the bytes
/// the record has left.
pub(crate) struct BodyReader<'a> {
    bytes: &'a [u8],
    remaining: u32,
}

impl BodyReader<'_> {
    fn take<const N: usize>(&mut self) -> Result<[u8; N], RecordProblem> {
        if (self.remaining as usize) < N {
            return Err(RecordProblem::ShortData);
        }
        let Some((head, rest)) = self.bytes.split_first_chunk::<N>() else {
            return Err(RecordProblem::HeadersTooLong);
        };
        self.bytes = rest;
        self.remaining -= N as u32;
        Ok(*head)
    }

    pub(crate) fn u8(&mut self) -> Result<u8, RecordProblem> {
        Ok(self.take::<1>()?[0])
    }

    pub(crate) fn u16(&mut self) -> Result<u16, RecordProblem> {
        Ok(u16::from_le_bytes(self.take()?))
    }

    pub(crate) fn u32(&mut self) -> Result<u32, RecordProblem> {
        Ok(u32::from_le_bytes(self.take()?))
    }
}

/// `DecodeXLogRecord` without the copying: reads the fragment headers from `headers`
/// (the record's bytes after its fixed header, possibly cut at [`MAX_HEADERS_LEN`]) and
/// checks that they account for exactly `tot_len` bytes.
pub(crate) fn decode_body(
    headers: &[u8],
    tot_len: u32,
    pg_major: u32,
    block_size: u32,
) -> Result<RecordBody, RecordProblem> {
    let mut r = BodyReader {
        bytes: headers,
        remaining: tot_len.saturating_sub(RECORD_HEADER_LEN as u32),
    };
    let mut body = RecordBody::default();
    // Payload announced by the headers read so far: block data, images, main data.
    let mut payload: u64 = 0;
    let mut previous_rel: Option<RelFileLocator> = None;
    while r.remaining as u64 > payload {
        match r.u8()? {
            XLR_BLOCK_ID_DATA_SHORT => {
                body.main_data_len = r.u8()? as u32;
                payload += body.main_data_len as u64;
                // The main data fragment is always last.
                break;
            }
            XLR_BLOCK_ID_DATA_LONG => {
                body.main_data_len = r.u32()?;
                payload += body.main_data_len as u64;
                break;
            }
            XLR_BLOCK_ID_ORIGIN => body.origin = Some(r.u16()?),
            XLR_BLOCK_ID_TOPLEVEL_XID if pg_major >= 14 => body.toplevel_xid = Some(r.u32()?),
            id if id <= XLR_MAX_BLOCK_ID => {
                if body.blocks.last().is_some_and(|b| id <= b.id) {
                    return Err(RecordProblem::BlockOutOfOrder(id));
                }
                let (block, block_payload) =
                    BlockRef::read(&mut r, id, previous_rel, pg_major, block_size)?;
                previous_rel = Some(block.rel);
                payload += block_payload as u64;
                body.blocks.push(block);
            }
            id => return Err(RecordProblem::BadBlockId(id)),
        }
    }
    if r.remaining as u64 != payload {
        return Err(RecordProblem::ShortData);
    }
    Ok(body)
}
