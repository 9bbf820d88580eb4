//! WAL file names, LSNs, timelines and the long page header that opens every segment.
//!
//! PostgreSQL hands `archive_command` four kinds of file, and this module names them:
//!
//! | file                                  | example                                   |
//! |---------------------------------------|-------------------------------------------|
//! | segment                               | `000000010000000A000000FE`                |
//! | partial segment (end of a timeline)   | `000000010000000A000000FE.partial`        |
//! | timeline history                      | `00000002.history`                        |
//! | backup history                        | `000000010000000A000000FE.00000028.backup`|
//!
//! A segment name is `TTTTTTTT` (timeline) `XXXXXXXX` (high 32 bits of the LSN)
//! `YYYYYYYY` (segment number within that 4 GiB "xlogid"). Which LSN the name stands for
//! depends on the segment size, which only the segment itself knows: its first page
//! carries a *long* page header (`XLogLongPageHeaderData`, 40 bytes, little-endian on
//! every platform we support):
//!
//! ```text
//! off  size  field
//!   0     2  xlp_magic      WAL format version (0xD106 = PG13 ... 0xD116 = PG17)
//!   2     2  xlp_info       flags; XLP_LONG_HEADER (0x0002) must be set
//!   4     4  xlp_tli        timeline of the first record on the page
//!   8     8  xlp_pageaddr   LSN of the page start = segment start LSN
//!  16     4  xlp_rem_len    bytes of a record continued from the previous segment
//!  20     4  (padding)
//!  24     8  xlp_sysid      system identifier (pg_control), binds WAL to one cluster
//!  32     4  xlp_seg_size   segment size in bytes (power of two, 1 MiB ..= 1 GiB)
//!  36     4  xlp_xlog_blcksz WAL page size
//! ```
//!
//! [`validate_wal_file`] is the one check both sides use: the pushing client before it
//! sends a byte, and `archived` again on what it actually received.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Length of the long page header at the start of every segment.
pub const LONG_PAGE_HEADER_LEN: usize = 40;
/// `XLP_LONG_HEADER` bit of `xlp_info`.
pub const XLP_LONG_HEADER: u16 = 0x0002;
/// Smallest segment size PostgreSQL accepts (`initdb --wal-segsize=1`).
pub const MIN_SEGMENT_SIZE: u32 = 1 << 20;
/// Largest segment size PostgreSQL accepts (`initdb --wal-segsize=1024`).
pub const MAX_SEGMENT_SIZE: u32 = 1 << 30;
/// Refuses a segment size PostgreSQL cannot have (a power of two from
/// [`MIN_SEGMENT_SIZE`] to [`MAX_SEGMENT_SIZE`]). Every size that reaches the segment
/// arithmetic of this module from outside (a WAL header, the store's `cluster.toml`, a
/// wire listing) passes here first: 0 would divide by zero in [`segments_per_log`].
pub fn validate_segment_size(size: u32) -> Result<(), String> {
    if size.is_power_of_two() && (MIN_SEGMENT_SIZE..=MAX_SEGMENT_SIZE).contains(&size) {
        Ok(())
    } else {
        Err(format!(
            "implausible WAL segment size {size}: PostgreSQL's are powers of two from \
             {MIN_SEGMENT_SIZE} to {MAX_SEGMENT_SIZE} bytes"
        ))
    }
}

/// `#[serde(deserialize_with)]` for a segment size: refused unless
/// [`validate_segment_size`] accepts it.
pub fn deserialize_segment_size<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    let size = u32::deserialize(d)?;
    validate_segment_size(size).map_err(serde::de::Error::custom)?;
    Ok(size)
}

/// [`deserialize_segment_size`] for an optional one (with `#[serde(default)]`).
pub fn deserialize_opt_segment_size<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<u32>, D::Error> {
    let size = Option::<u32>::deserialize(d)?;
    if let Some(s) = size {
        validate_segment_size(s).map_err(serde::de::Error::custom)?;
    }
    Ok(size)
}

/// History and backup-history files are a few lines of text; anything bigger is not one.
pub const MAX_TEXT_FILE_SIZE: u64 = 1 << 20;

/// A write-ahead-log position, printed the way PostgreSQL prints it (`16/B374D848`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Lsn(pub u64);

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

impl FromStr for Lsn {
    type Err = WalError;
    fn from_str(s: &str) -> Result<Self, WalError> {
        let bad = || WalError::BadLsn(s.to_string());
        let (hi, lo) = s.split_once('/').ok_or_else(bad)?;
        if hi.is_empty() || lo.is_empty() || hi.len() > 8 || lo.len() > 8 {
            return Err(bad());
        }
        let hi = u32::from_str_radix(hi, 16).map_err(|_| bad())?;
        let lo = u32::from_str_radix(lo, 16).map_err(|_| bad())?;
        Ok(Lsn(((hi as u64) << 32) | lo as u64))
    }
}

/// A timeline identifier. Timeline 0 does not exist.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct TimelineId(pub u32);

impl fmt::Display for TimelineId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:08X}", self.0)
    }
}

/// The name of a 16 MiB-or-otherwise segment: timeline plus the two halves of the name.
///
/// The halves are kept as written because turning them into a segment number needs the
/// segment size, which only the file's header (or the cluster's binding) provides.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct SegmentName {
    /// Timeline the segment belongs to.
    pub timeline: TimelineId,
    /// High 32 bits of the segment's start LSN.
    pub log: u32,
    /// Segment number within `log`.
    pub seg: u32,
}

impl SegmentName {
    /// The segment containing `lsn` on `timeline` for the given segment size.
    pub fn containing(timeline: TimelineId, lsn: Lsn, segment_size: u32) -> SegmentName {
        let segno = lsn.0 / segment_size as u64;
        let per_log = segments_per_log(segment_size);
        SegmentName {
            timeline,
            log: (segno / per_log) as u32,
            seg: (segno % per_log) as u32,
        }
    }

    /// Global segment number (what PostgreSQL calls `XLogSegNo`).
    pub fn segno(&self, segment_size: u32) -> u64 {
        self.log as u64 * segments_per_log(segment_size) + self.seg as u64
    }

    /// LSN of the first byte of this segment.
    pub fn start_lsn(&self, segment_size: u32) -> Lsn {
        Lsn(self.segno(segment_size) * segment_size as u64)
    }

    /// The following segment on the same timeline.
    pub fn next(&self, segment_size: u32) -> SegmentName {
        let per_log = segments_per_log(segment_size);
        let segno = self.segno(segment_size) + 1;
        SegmentName {
            timeline: self.timeline,
            log: (segno / per_log) as u32,
            seg: (segno % per_log) as u32,
        }
    }
}

impl fmt::Display for SegmentName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:08X}{:08X}{:08X}", self.timeline.0, self.log, self.seg)
    }
}

/// Segments per 4 GiB "xlogid" for a segment size.
pub fn segments_per_log(segment_size: u32) -> u64 {
    0x1_0000_0000u64 / segment_size as u64
}

/// Any file PostgreSQL archives, by name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum WalFileName {
    /// A complete segment.
    Segment(SegmentName),
    /// The last, incomplete segment of a timeline (`.partial`).
    Partial(SegmentName),
    /// A timeline history file (`TTTTTTTT.history`).
    History(TimelineId),
    /// A backup history file (`<segment>.<offset>.backup`).
    BackupHistory(SegmentName, u32),
}

fn parse_hex8(s: &str) -> Option<u32> {
    if s.len() == 8
        && s.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_lowercase())
    {
        u32::from_str_radix(s, 16).ok()
    } else {
        None
    }
}

fn parse_segment(s: &str) -> Option<SegmentName> {
    if s.len() != 24 || !s.is_ascii() {
        return None;
    }
    let timeline = parse_hex8(&s[0..8])?;
    if timeline == 0 {
        return None;
    }
    Some(SegmentName {
        timeline: TimelineId(timeline),
        log: parse_hex8(&s[8..16])?,
        seg: parse_hex8(&s[16..24])?,
    })
}

impl FromStr for WalFileName {
    type Err = WalError;
    /// Parses a bare file name. Anything with a path separator, a NUL, lower-case hex or
    /// an unknown suffix is refused: the name becomes part of a storage key.
    fn from_str(s: &str) -> Result<Self, WalError> {
        let bad = || WalError::BadName(s.escape_debug().to_string());
        if s.len() > 64 || !s.is_ascii() {
            return Err(bad());
        }
        if let Some(seg) = parse_segment(s) {
            return Ok(WalFileName::Segment(seg));
        }
        if let Some(base) = s.strip_suffix(".partial") {
            return parse_segment(base)
                .map(WalFileName::Partial)
                .ok_or_else(bad);
        }
        if let Some(base) = s.strip_suffix(".history") {
            return match parse_hex8(base) {
                Some(t) if t > 0 => Ok(WalFileName::History(TimelineId(t))),
                _ => Err(bad()),
            };
        }
        if let Some(base) = s.strip_suffix(".backup") {
            let (seg, off) = base.split_once('.').ok_or_else(bad)?;
            let seg = parse_segment(seg).ok_or_else(bad)?;
            let off = parse_hex8(off).ok_or_else(bad)?;
            return Ok(WalFileName::BackupHistory(seg, off));
        }
        Err(bad())
    }
}

impl fmt::Display for WalFileName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WalFileName::Segment(s) => write!(f, "{s}"),
            WalFileName::Partial(s) => write!(f, "{s}.partial"),
            WalFileName::History(t) => write!(f, "{t}.history"),
            WalFileName::BackupHistory(s, off) => write!(f, "{s}.{off:08X}.backup"),
        }
    }
}

impl WalFileName {
    /// Timeline the file belongs to.
    pub fn timeline(&self) -> TimelineId {
        match self {
            WalFileName::Segment(s)
            | WalFileName::Partial(s)
            | WalFileName::BackupHistory(s, _) => s.timeline,
            WalFileName::History(t) => *t,
        }
    }

    /// The segment, for segment and partial-segment files.
    pub fn segment(&self) -> Option<SegmentName> {
        match self {
            WalFileName::Segment(s) | WalFileName::Partial(s) => Some(*s),
            _ => None,
        }
    }

    /// Whether the file carries a long page header (segments and partial segments).
    pub fn is_segment_file(&self) -> bool {
        self.segment().is_some()
    }
}

/// WAL format versions we know, by page magic.
pub fn pg_major_for_magic(magic: u16) -> Option<u32> {
    match magic {
        0xD106 => Some(13),
        0xD10D => Some(14),
        0xD110 => Some(15),
        0xD113 => Some(16),
        0xD116 => Some(17),
        _ => None,
    }
}

/// The decoded long page header of a segment's first page.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LongPageHeader {
    /// `xlp_magic`.
    pub magic: u16,
    /// `xlp_info`.
    pub info: u16,
    /// `xlp_tli`.
    pub timeline: TimelineId,
    /// `xlp_pageaddr`.
    pub page_address: Lsn,
    /// `xlp_rem_len`.
    pub rem_len: u32,
    /// `xlp_sysid`.
    pub system_identifier: u64,
    /// `xlp_seg_size`.
    pub segment_size: u32,
    /// `xlp_xlog_blcksz`.
    pub block_size: u32,
}

impl LongPageHeader {
    /// Decodes the header from the first bytes of a segment.
    pub fn parse(bytes: &[u8]) -> Result<LongPageHeader, WalError> {
        let b = bytes
            .get(..LONG_PAGE_HEADER_LEN)
            .ok_or(WalError::Truncated {
                len: bytes.len() as u64,
                expected: LONG_PAGE_HEADER_LEN as u64,
            })?;
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let u64_at = |o: usize| (u32_at(o) as u64) | ((u32_at(o + 4) as u64) << 32);
        let header = LongPageHeader {
            magic: u16_at(0),
            info: u16_at(2),
            timeline: TimelineId(u32_at(4)),
            page_address: Lsn(u64_at(8)),
            rem_len: u32_at(16),
            system_identifier: u64_at(24),
            segment_size: u32_at(32),
            block_size: u32_at(36),
        };
        if pg_major_for_magic(header.magic).is_none() {
            return Err(WalError::BadHeader(format!(
                "unknown WAL page magic 0x{:04X} (not PostgreSQL 13..17 WAL)",
                header.magic
            )));
        }
        if header.info & XLP_LONG_HEADER == 0 {
            return Err(WalError::BadHeader(
                "first page has no long header (XLP_LONG_HEADER not set)".into(),
            ));
        }
        validate_segment_size(header.segment_size)
            .map_err(|e| WalError::BadHeader(format!("{e} (in the long page header)")))?;
        let blk = header.block_size;
        if !blk.is_power_of_two() || !(1024..=65536).contains(&blk) {
            return Err(WalError::BadHeader(format!(
                "implausible WAL block size {blk} in header"
            )));
        }
        Ok(header)
    }

    /// PostgreSQL major version that wrote the segment.
    pub fn pg_major(&self) -> u32 {
        pg_major_for_magic(self.magic).unwrap_or(0)
    }
}

/// What validation learned about a file that may be archived.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WalFileFacts {
    /// The file's name.
    pub name: WalFileName,
    /// Header of a segment or partial segment; `None` for text files.
    pub header: Option<LongPageHeader>,
}

/// Checks that a file is what its name says, given its first bytes and its full length.
///
/// Segments and partial segments: the long header must parse, the file length must equal
/// `xlp_seg_size`, the header's timeline must be the name's or an earlier one (the first
/// segment of a timeline that began mid-segment), and the page address must
/// be the start LSN of the named segment. History and backup-history files must be small
/// UTF-8 text.
pub fn validate_wal_file(name: &str, head: &[u8], len: u64) -> Result<WalFileFacts, WalError> {
    let name: WalFileName = name.parse()?;
    match name.segment() {
        Some(seg) => {
            let header = LongPageHeader::parse(head)?;
            if len != header.segment_size as u64 {
                return Err(WalError::Truncated {
                    len,
                    expected: header.segment_size as u64,
                });
            }
            // The first segment of a new timeline begins with a copy of the old timeline's
            // last segment up to the switch point (PostgreSQL's XLogInitNewTimeline), so
            // its first page carries an ancestor's timeline: lower, never higher.
            if header.timeline.0 == 0 || header.timeline > seg.timeline {
                return Err(WalError::HeaderContradictsName(format!(
                    "{name}: header timeline {} but the name says {}",
                    header.timeline.0, seg.timeline.0
                )));
            }
            if seg.seg as u64 >= segments_per_log(header.segment_size) {
                return Err(WalError::HeaderContradictsName(format!(
                    "{name}: segment number {:X} does not exist with {} byte segments",
                    seg.seg, header.segment_size
                )));
            }
            let expected = seg.start_lsn(header.segment_size);
            if header.page_address != expected {
                return Err(WalError::HeaderContradictsName(format!(
                    "{name}: first page address {} but the name stands for {}",
                    header.page_address, expected
                )));
            }
            Ok(WalFileFacts {
                name,
                header: Some(header),
            })
        }
        None => {
            if len > MAX_TEXT_FILE_SIZE {
                return Err(WalError::BadHeader(format!(
                    "{name}: {len} bytes is too large for a history file"
                )));
            }
            if (head.len() as u64) == len && std::str::from_utf8(head).is_err() {
                return Err(WalError::BadHeader(format!("{name}: not a text file")));
            }
            Ok(WalFileFacts { name, header: None })
        }
    }
}

/// Why a file is not acceptable WAL.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum WalError {
    /// Not a WAL, partial, history or backup-history file name.
    #[error("'{0}' is not a WAL file name (segment, .partial, .history or .backup)")]
    BadName(String),
    /// Not a `X/X` LSN.
    #[error("'{0}' is not an LSN (expected hex 'X/X', as PostgreSQL prints it)")]
    BadLsn(String),
    /// Shorter than the header says.
    #[error("truncated WAL file: {len} bytes, expected {expected}")]
    Truncated {
        /// Actual length.
        len: u64,
        /// Length the header demands.
        expected: u64,
    },
    /// The header is not a WAL long page header.
    #[error("bad WAL header: {0}")]
    BadHeader(String),
    /// The header is fine but belongs to another file.
    #[error("WAL header contradicts the file name: {0}")]
    HeaderContradictsName(String),
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    pub(crate) fn header_bytes(tli: u32, pageaddr: u64, sysid: u64, seg_size: u32) -> Vec<u8> {
        let mut b = vec![0u8; 8192];
        b[0..2].copy_from_slice(&0xD110u16.to_le_bytes());
        b[2..4].copy_from_slice(&XLP_LONG_HEADER.to_le_bytes());
        b[4..8].copy_from_slice(&tli.to_le_bytes());
        b[8..16].copy_from_slice(&pageaddr.to_le_bytes());
        b[24..32].copy_from_slice(&sysid.to_le_bytes());
        b[32..36].copy_from_slice(&seg_size.to_le_bytes());
        b[36..40].copy_from_slice(&8192u32.to_le_bytes());
        b
    }

    #[test]
    fn names_round_trip() {
        for n in [
            "000000010000000A000000FE",
            "000000010000000A000000FE.partial",
            "00000002.history",
            "000000010000000000000002.00000028.backup",
        ] {
            let parsed: WalFileName = n.parse().unwrap();
            assert_eq!(parsed.to_string(), n);
        }
    }

    #[test]
    fn path_tricks_and_junk_are_refused() {
        for n in [
            "",
            "../000000010000000000000001",
            "/etc/passwd",
            "000000010000000000000001/",
            "00000001000000000000000a",
            "000000010000000000000001\0",
            "000000000000000000000001",
            "00000000.history",
            "000000010000000000000001.partial.partial",
            "000000010000000000000001.backup",
            "RECOVERYHISTORY",
            "00000001000000000000000Ü",
        ] {
            assert!(n.parse::<WalFileName>().is_err(), "{n:?} accepted");
        }
    }

    #[test]
    fn lsn_parse_and_print() {
        let l: Lsn = "16/B374D848".parse().unwrap();
        assert_eq!(l.0, 0x16_B374_D848);
        assert_eq!(l.to_string(), "16/B374D848");
        assert!("16B374D848".parse::<Lsn>().is_err());
        assert!("/1".parse::<Lsn>().is_err());
    }

    #[test]
    fn segment_arithmetic() {
        let s: WalFileName = "000000010000000A000000FE".parse().unwrap();
        let s = s.segment().unwrap();
        let size = 16 << 20;
        assert_eq!(s.start_lsn(size), Lsn(0x0A_FE00_0000));
        assert_eq!(
            s.next(size).next(size).to_string(),
            "000000010000000B00000000"
        );
        assert_eq!(
            SegmentName::containing(TimelineId(1), Lsn(0x0A_FE12_3456), size),
            s
        );
    }

    #[test]
    fn validation_accepts_a_good_segment() {
        let seg_size = 16 << 20;
        let head = header_bytes(1, 0x0A_FE00_0000, 42, seg_size);
        let facts = validate_wal_file("000000010000000A000000FE", &head, seg_size as u64).unwrap();
        assert_eq!(facts.header.unwrap().system_identifier, 42);
    }

    /// A standby promoted mid-segment starts timeline 2 with a copy of timeline 1's
    /// segment up to the switch: the file is named for timeline 2, its first page says 1.
    #[test]
    fn validation_accepts_a_new_timelines_first_segment_copied_from_its_parent() {
        let seg_size = 16 << 20;
        let head = header_bytes(1, 0x0A_FE00_0000, 42, seg_size);
        let facts = validate_wal_file("000000020000000A000000FE", &head, seg_size as u64).unwrap();
        assert_eq!(facts.header.unwrap().timeline, TimelineId(1));
    }

    #[test]
    fn validation_refuses_contradictions() {
        let seg_size = 16 << 20;
        let head = header_bytes(1, 0x0A_FE00_0000, 42, seg_size);
        assert!(matches!(
            validate_wal_file("000000010000000A000000FE", &head, 8192),
            Err(WalError::Truncated { .. })
        ));
        let later = header_bytes(3, 0x0A_FE00_0000, 42, seg_size);
        assert!(matches!(
            validate_wal_file("000000020000000A000000FE", &later, seg_size as u64),
            Err(WalError::HeaderContradictsName(_))
        ));
        let zero = header_bytes(0, 0x0A_FE00_0000, 42, seg_size);
        assert!(matches!(
            validate_wal_file("000000010000000A000000FE", &zero, seg_size as u64),
            Err(WalError::HeaderContradictsName(_))
        ));
        assert!(matches!(
            validate_wal_file("000000010000000A000000FD", &head, seg_size as u64),
            Err(WalError::HeaderContradictsName(_))
        ));
        assert!(matches!(
            validate_wal_file("000000010000000A000000FE", &[0u8; 100], seg_size as u64),
            Err(WalError::BadHeader(_))
        ));
        assert!(matches!(
            validate_wal_file("not-wal", &head, 1),
            Err(WalError::BadName(_))
        ));
    }

    proptest! {
        #[test]
        fn parsers_never_panic(s in ".{0,80}", bytes in proptest::collection::vec(any::<u8>(), 0..128), len in any::<u64>()) {
            let _ = s.parse::<WalFileName>();
            let _ = s.parse::<Lsn>();
            let _ = LongPageHeader::parse(&bytes);
            let _ = validate_wal_file(&s, &bytes, len);
        }

        #[test]
        fn segment_names_round_trip(t in 1u32.., log in any::<u32>(), seg in 0u32..256) {
            let name = SegmentName { timeline: TimelineId(t), log, seg };
            let parsed: WalFileName = name.to_string().parse().unwrap();
            prop_assert_eq!(parsed, WalFileName::Segment(name));
        }
    }
}
