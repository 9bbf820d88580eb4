//! A decoder for PostgreSQL 13 to 17 write-ahead log: pure code, no I/O, no panics on
//! any input. It yields every record with the blocks it touches (what a prefetcher needs)
//! and says how the WAL ends: a torn or never-written tail is an answer
//! ([`EndReason::EndOfWal`]); damage with valid WAL after it is an error
//! ([`DecodeError::Corrupt`]).
//!
//! # The format decoded
//!
//! All integers are little-endian. WAL is a sequence of segment files (`xlp_seg_size`
//! bytes, 16 MiB by default), each a sequence of pages (`xlp_xlog_blcksz`, 8 KiB by
//! default). Every page starts with a header; the first page of a segment with a long one:
//!
//! ```text
//! XLogPageHeaderData (24 bytes: 20, MAXALIGNed)
//!   0  u16 xlp_magic     WAL format: 0xD106 PG13, 0xD10D PG14, 0xD110 PG15, 0xD113 PG16, 0xD116 PG17
//!   2  u16 xlp_info      0x1 FIRST_IS_CONTRECORD, 0x2 LONG_HEADER, 0x4 BKP_REMOVABLE,
//!                        0x8 FIRST_IS_OVERWRITE_CONTRECORD
//!   4  u32 xlp_tli       timeline
//!   8  u64 xlp_pageaddr  LSN of the page itself (a recycled segment's stale pages fail this)
//!  16  u32 xlp_rem_len   bytes of a record continued from the previous page
//! XLogLongPageHeaderData (40 bytes) adds
//!  24  u64 xlp_sysid  32  u32 xlp_seg_size  36  u32 xlp_xlog_blcksz
//! ```
//!
//! Records follow the header, each starting on an 8-byte boundary (MAXALIGN). A record
//! may span any number of pages and segments: a page whose first bytes continue a record
//! has `FIRST_IS_CONTRECORD` and `xlp_rem_len` = what is left of it. Only `xl_tot_len`
//! must sit on the record's first page; the rest of the header may be on the next. After
//! a crash that cut a record short, PostgreSQL writes on where the missing piece was and
//! marks that page `FIRST_IS_OVERWRITE_CONTRECORD`: the cut record is dropped.
//!
//! ```text
//! XLogRecord (24 bytes)
//!   0  u32 xl_tot_len  whole record, headers included (0: nothing written here)
//!   4  u32 xl_xid      transaction id
//!   8  u64 xl_prev     LSN of the previous record
//!  16  u8  xl_info     high 4 bits rmgr-specific; XLOG_SWITCH = 0x40 for rmgr 0
//!  17  u8  xl_rmid     resource manager
//!  18  2 bytes padding
//!  20  u32 xl_crc      CRC-32C over bytes 24..tot_len, then over bytes 0..20
//! ```
//!
//! Then fragment headers, unaligned, until their announced payload fills the record:
//!
//! ```text
//! block reference (id 0..=32, increasing)
//!   u8 id, u8 fork_flags (fork in bits 0-3; 0x10 HAS_IMAGE, 0x20 HAS_DATA,
//!   0x40 WILL_INIT, 0x80 SAME_REL), u16 data_length
//!   if HAS_IMAGE: u16 length, u16 hole_offset, u8 bimg_info
//!       PG13-14: 0x01 HAS_HOLE, 0x02 IS_COMPRESSED (pglz), 0x04 APPLY
//!       PG15+:   0x01 HAS_HOLE, 0x02 APPLY, 0x04 pglz, 0x08 lz4, 0x10 zstd
//!     if compressed and HAS_HOLE: u16 hole_length (else BLCKSZ - length, or 0)
//!   unless SAME_REL: u32 spcOid, u32 dbOid, u32 relNumber
//!   u32 block number
//! 253 ORIGIN: u16 replication origin      252 TOPLEVEL_XID (PG14+): u32 xid
//! 255 DATA_SHORT: u8 main data length     254 DATA_LONG: u32 main data length (last)
//! ```
//!
//! followed by the payloads: each block's image then data, then the main data.
//!
//! An `XLOG_SWITCH` record ends its segment: the next record starts the next one.
//!
//! # How the WAL ends
//!
//! PostgreSQL's reader treats the first record it cannot read as the end of WAL. Here a
//! failure (zero `xl_tot_len`, bad CRC, stale or zeroed page...) is the end of WAL only
//! if nothing after it says WAL went on: neither the page after the failure point carries
//! a header written for its own address, nor a good record linked to the damaged one
//! follows it on the same page. Otherwise it is [`DecodeError::Corrupt`]. Without the
//! bytes that follow (a single segment decoded alone), a damaged last record cannot be
//! told from a torn write and counts as the end.
//!
//! # Use
//!
//! [`decode_segment`] for one file; [`WalDecoder`] to stream consecutive segments, records
//! spanning them included.

mod blocks;
mod decoder;
mod page;
mod record;
#[cfg(test)]
mod tests;

use std::fmt;

use crate::core::pg::wal::Lsn;

pub use blocks::{BlockImage, BlockRef, ForkNumber, ImageCompression, RelFileLocator};
pub use decoder::{WalDecoder, MAX_START_LSN};
pub use page::{PageProblem, WalGeometry};
pub use record::{rmgr_name, RecordProblem};

/// A decoded record: its place in the WAL, its header, and the blocks it touches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecodedRecord {
    /// Where the record starts.
    pub lsn: Lsn,
    /// Just after its last byte.
    pub end_lsn: Lsn,
    /// Where the next record starts: `end_lsn` aligned to 8 bytes, or the next segment
    /// after an `XLOG_SWITCH`.
    pub next_lsn: Lsn,
    /// `xl_prev`: the previous record.
    pub prev_lsn: Lsn,
    /// `xl_xid`.
    pub xid: u32,
    /// `xl_rmid`: the resource manager (see [`rmgr_name`]).
    pub rmid: u8,
    /// `xl_info`.
    pub info: u8,
    /// `xl_tot_len`: the whole record, headers and images included.
    pub total_len: u32,
    /// The block references, in id order.
    pub blocks: Vec<BlockRef>,
    /// Length of the rmgr's main data.
    pub main_data_len: u32,
    /// Replication origin, if the record carries one.
    pub origin: Option<u16>,
    /// Top-level transaction of a subtransaction's record, if it carries one.
    pub toplevel_xid: Option<u32>,
}

impl DecodedRecord {
    /// The resource manager's name as pg_waldump prints it (`None` for custom ones).
    pub fn rmgr_name(&self) -> Option<&'static str> {
        rmgr_name(self.rmid)
    }

    /// Whether this is an `XLOG_SWITCH` (the rest of its segment is unused).
    pub fn is_switch(&self) -> bool {
        self.rmid == record::RM_XLOG_ID
            && self.info & record::XLR_RMGR_INFO_MASK == record::XLOG_SWITCH
    }

    /// Bytes of full-page images in the record (pg_waldump's "tot" minus "rec").
    pub fn image_len(&self) -> u32 {
        self.blocks
            .iter()
            .filter_map(|b| b.image.map(|i| i.len as u32))
            .sum()
    }
}

/// What [`WalDecoder::next_record`] has next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Next {
    /// A record.
    Record(DecodedRecord),
    /// Feed more bytes (or call [`WalDecoder::finish`]) to go on.
    NeedInput,
    /// The WAL (or the input) ends here; asked again, the decoder says so again.
    End(WalEnd),
}

/// Where and why decoding stopped without an error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WalEnd {
    /// Where valid WAL stops: the first byte no returned record covers (the start of the
    /// record that could not be completed or read; after an `XLOG_SWITCH`, the next
    /// segment).
    pub lsn: Lsn,
    /// Why.
    pub reason: EndReason,
}

/// Why decoding stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EndReason {
    /// The input ended between records: everything in it was decoded.
    InputExhausted,
    /// The input ended inside a record (it continues in bytes not given, e.g. the next
    /// segment).
    IncompleteRecord,
    /// The WAL written so far ends here: invalid data with nothing valid after it (zeros,
    /// a recycled segment's stale pages, a torn last record).
    EndOfWal(Invalid),
}

impl fmt::Display for WalEnd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.reason {
            EndReason::InputExhausted => write!(f, "input ends at {} between records", self.lsn),
            EndReason::IncompleteRecord => write!(
                f,
                "input ends inside the record at {} (it continues in the next segment)",
                self.lsn
            ),
            EndReason::EndOfWal(invalid) => write!(f, "end of WAL at {}: {invalid}", self.lsn),
        }
    }
}

/// What made decoding stop: a page or a record PostgreSQL would not accept either.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    /// A page header.
    #[error("page at {page}: {problem}")]
    Page {
        /// The page's address.
        page: Lsn,
        /// What is wrong.
        problem: PageProblem,
    },
    /// A record.
    #[error("record at {lsn}: {problem}")]
    Record {
        /// The record's address.
        lsn: Lsn,
        /// What is wrong.
        problem: RecordProblem,
    },
}

/// Why the input cannot be decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Invalid data with valid WAL after it: damage, not the end of the WAL.
    #[error("corrupt WAL: {invalid}, yet WAL goes on at {valid_wal_at}")]
    Corrupt {
        /// What is invalid.
        invalid: Invalid,
        /// Where valid WAL was found after it.
        valid_wal_at: Lsn,
    },
    /// The input does not start with a usable WAL page (not WAL, or of an unknown version).
    #[error("not PostgreSQL 13..17 WAL at {lsn}: {problem}")]
    BadFirstPage {
        /// Where the input starts.
        lsn: Lsn,
        /// What is wrong with its first page.
        problem: PageProblem,
    },
    /// The input is too short to hold a page header.
    #[error("{len} bytes are too few for a WAL page header")]
    TooShort {
        /// Bytes given.
        len: usize,
    },
    /// The caller's start position cannot be right.
    #[error("cannot start decoding at {lsn}: {why}")]
    BadStart {
        /// The position given.
        lsn: Lsn,
        /// Why not.
        why: &'static str,
    },
}

impl DecodeError {
    /// Whether the WAL itself is damaged (as opposed to not being WAL, or a caller's
    /// mistake).
    pub fn is_corruption(&self) -> bool {
        matches!(self, DecodeError::Corrupt { .. })
    }
}

/// Every record of one segment file, and how the WAL in it ends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentRecords {
    /// The records that start in the segment and end in it, in order. A record that
    /// began in the previous segment is skipped; one that continues into the next is not
    /// here ([`EndReason::IncompleteRecord`]).
    pub records: Vec<DecodedRecord>,
    /// How decoding stopped.
    pub end: WalEnd,
}

/// Decodes one segment file (or a truncated one); its start LSN and geometry come from
/// its long page header.
pub fn decode_segment(segment: &[u8]) -> Result<SegmentRecords, DecodeError> {
    let Some(header) = segment.first_chunk::<{ page::SHORT_PAGE_HEADER_LEN }>() else {
        return Err(DecodeError::TooShort { len: segment.len() });
    };
    let magic = u16::from_le_bytes([header[0], header[1]]);
    let mut address = [0u8; 8];
    address.copy_from_slice(&header[8..16]);
    let start = Lsn(u64::from_le_bytes(address));
    if magic != 0 && crate::core::pg::wal::pg_major_for_magic(magic).is_none() {
        return Err(DecodeError::BadFirstPage {
            lsn: start,
            problem: PageProblem::BadMagic {
                found: magic,
                expected: 0,
            },
        });
    }
    let mut decoder = WalDecoder::new(start)?;
    decoder.feed(segment);
    decoder.finish();
    let mut records = Vec::new();
    loop {
        match decoder.next_record()? {
            Next::Record(r) => records.push(r),
            Next::End(end) => return Ok(SegmentRecords { records, end }),
            // Unreachable after finish(); ending here is the safe answer anyway.
            Next::NeedInput => {
                return Ok(SegmentRecords {
                    records,
                    end: WalEnd {
                        lsn: decoder.input_end(),
                        reason: EndReason::InputExhausted,
                    },
                })
            }
        }
    }
}

impl DecodedRecord {
    /// The record as `pg_waldump -b` (PostgreSQL 15) prints it, without the resource
    /// manager's description: the header line, then one line per block reference. What
    /// the agreement tests compare with pg_waldump's output. `block_size` is the WAL's
    /// (page header), needed for "compression saved".
    pub fn waldump_lines(&self, block_size: u32) -> Vec<String> {
        let name = self
            .rmgr_name()
            .map(String::from)
            .unwrap_or_else(|| format!("custom{:03}", self.rmid));
        let mut lines = vec![format!(
            "rmgr: {name:<11} len (rec/tot): {:>6}/{:>6}, tx: {:>10}, lsn: {}, prev {}",
            self.total_len - self.image_len(),
            self.total_len,
            self.xid,
            WaldumpLsn(self.lsn),
            WaldumpLsn(self.prev_lsn)
        )];
        for b in &self.blocks {
            let mut line = format!(
                "\tblkref #{}: rel {} fork {} blk {}",
                b.id, b.rel, b.fork, b.block
            );
            if let Some(image) = b.image {
                let verification = if image.apply {
                    ""
                } else {
                    " for WAL verification"
                };
                line += &format!(
                    " (FPW{verification}); hole: offset: {}, length: {}",
                    image.hole_offset, image.hole_length
                );
                if let Some(method) = image.compression {
                    let saved = block_size - image.len as u32 - image.hole_length as u32;
                    line += &format!(", compression saved: {saved}, method: {method}");
                }
            }
            lines.push(line);
        }
        lines
    }
}

/// An LSN printed the way pg_waldump prints `lsn:` (`%X/%08X`: `0/01A3B4C8`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WaldumpLsn(pub Lsn);

impl fmt::Display for WaldumpLsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:08X}", self.0 .0 >> 32, self.0 .0 & 0xFFFF_FFFF)
    }
}
