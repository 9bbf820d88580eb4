//! WAL page headers: the short header on every page, the long one that opens a segment,
//! and the checks PostgreSQL's reader (`XLogReaderValidatePageHeader`) applies to them.

use crate::core::pg::wal::{
    pg_major_for_magic, Lsn, LONG_PAGE_HEADER_LEN, MAX_SEGMENT_SIZE, MIN_SEGMENT_SIZE,
    XLP_LONG_HEADER,
};

/// Length of the short page header (`XLogPageHeaderData`, 20 bytes, MAXALIGNed to 24).
pub(crate) const SHORT_PAGE_HEADER_LEN: usize = 24;
/// `xlp_info`: the page starts with the rest of a record begun on an earlier page.
pub(crate) const XLP_FIRST_IS_CONTRECORD: u16 = 0x0001;
/// `xlp_info`: the record continued here was abandoned (crash) and overwritten.
pub(crate) const XLP_FIRST_IS_OVERWRITE_CONTRECORD: u16 = 0x0008;
/// Every `xlp_info` bit PostgreSQL defines (`XLP_ALL_FLAGS`).
const XLP_ALL_FLAGS: u16 = 0x000F;

/// Segment and page size of a WAL stream, both read from a segment's long page header.
/// Only sizes PostgreSQL can use are representable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WalGeometry {
    segment_size: u32,
    page_size: u32,
}

impl WalGeometry {
    /// PostgreSQL's defaults (16 MiB segments, 8 KiB pages).
    pub(crate) const DEFAULT: WalGeometry = WalGeometry {
        segment_size: 16 << 20,
        page_size: 8192,
    };

    /// The geometry, if both sizes are ones PostgreSQL can be built or initialized with.
    pub fn new(segment_size: u32, page_size: u32) -> Option<WalGeometry> {
        let segment_ok = segment_size.is_power_of_two()
            && (MIN_SEGMENT_SIZE..=MAX_SEGMENT_SIZE).contains(&segment_size);
        let page_ok = page_size.is_power_of_two() && (1024..=65536).contains(&page_size);
        (segment_ok && page_ok).then_some(WalGeometry {
            segment_size,
            page_size,
        })
    }

    /// `xlp_seg_size`: bytes per segment file (a power of two, 1 MiB ..= 1 GiB).
    pub fn segment_size(&self) -> u32 {
        self.segment_size
    }

    /// `xlp_xlog_blcksz`: bytes per WAL page (a power of two, 1 KiB ..= 64 KiB).
    pub fn page_size(&self) -> u32 {
        self.page_size
    }

    /// Whether `lsn` is the first byte of a page.
    pub(crate) fn is_page_start(&self, lsn: u64) -> bool {
        lsn & (self.page_size as u64 - 1) == 0
    }

    /// Whether `lsn` is the first byte of a segment.
    pub(crate) fn is_segment_start(&self, lsn: u64) -> bool {
        lsn & (self.segment_size as u64 - 1) == 0
    }

    /// Start of the page holding `lsn`.
    pub(crate) fn page_start(&self, lsn: u64) -> u64 {
        lsn & !(self.page_size as u64 - 1)
    }

    /// Start of the page after the one holding `lsn`.
    pub(crate) fn next_page(&self, lsn: u64) -> u64 {
        self.page_start(lsn) + self.page_size as u64
    }

    /// `lsn` rounded up to a segment boundary.
    pub(crate) fn round_up_to_segment(&self, lsn: u64) -> u64 {
        let seg = self.segment_size as u64;
        lsn.div_ceil(seg) * seg
    }
}

/// What is wrong with a page header, in the words of PostgreSQL's checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PageProblem {
    /// The header is all zeros: the page was never written.
    #[error("page never written (zeroed header)")]
    Zeroed,
    /// `xlp_pageaddr` is not the page's own address: a page left over from a recycled
    /// segment, or a misplaced one.
    #[error("page address {found} where {expected} was expected (a stale page from a recycled segment, or a misplaced one)")]
    WrongAddress {
        /// `xlp_pageaddr` found.
        found: Lsn,
        /// The page's position in the stream.
        expected: Lsn,
    },
    /// `xlp_magic` is not the stream's WAL format version.
    #[error("page magic 0x{found:04X} where 0x{expected:04X} was expected")]
    BadMagic {
        /// `xlp_magic` found.
        found: u16,
        /// The magic of the stream's first page (or 0 when that page has none we know).
        expected: u16,
    },
    /// `xlp_info` has bits PostgreSQL never sets.
    #[error("invalid page info bits 0x{0:04X}")]
    BadInfoBits(u16),
    /// The first page of a segment has a short header.
    #[error("first page of a segment without a long header")]
    MissingLongHeader,
    /// A long header gives a segment size or page size no PostgreSQL uses.
    #[error("implausible geometry in the long header: segment size {segment_size}, page size {page_size}")]
    ImplausibleGeometry {
        /// `xlp_seg_size`.
        segment_size: u32,
        /// `xlp_xlog_blcksz`.
        page_size: u32,
    },
    /// A long header contradicts the geometry of the stream.
    #[error("long header says segment size {segment_size} and page size {page_size}, unlike the rest of the stream")]
    GeometryChanged {
        /// `xlp_seg_size`.
        segment_size: u32,
        /// `xlp_xlog_blcksz`.
        page_size: u32,
    },
    /// A long header carries another cluster's system identifier.
    #[error("system identifier {found} where {expected} was expected (WAL of another cluster)")]
    SystemIdChanged {
        /// `xlp_sysid` found.
        found: u64,
        /// The stream's system identifier.
        expected: u64,
    },
    /// The timeline went backwards from one page to the next.
    #[error("timeline {found} after timeline {previous}")]
    TimelineRegressed {
        /// `xlp_tli` found.
        found: u32,
        /// Timeline of the previous page.
        previous: u32,
    },
    /// A record continues onto this page, which does not say so.
    #[error("record continues onto a page without XLP_FIRST_IS_CONTRECORD")]
    MissingContrecord,
    /// A new record was due here, but the page claims to continue one.
    #[error(
        "page claims to continue a record (XLP_FIRST_IS_CONTRECORD) where a new record was due"
    )]
    UnexpectedContrecord,
    /// `xlp_rem_len` disagrees with what is left of the record being continued.
    #[error("continuation length {found} where {expected} bytes of the record remain")]
    ContrecordLength {
        /// `xlp_rem_len` found.
        found: u32,
        /// Bytes of the record still missing.
        expected: u32,
    },
    /// The first page of the input is no WAL page header we can use.
    #[error(
        "input does not start with a long page header; give the geometry to start mid-segment"
    )]
    NoGeometry,
}

/// The fields of a short or long page header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PageHeader {
    pub(crate) magic: u16,
    pub(crate) info: u16,
    pub(crate) timeline: u32,
    pub(crate) page_address: u64,
    pub(crate) rem_len: u32,
    /// `(xlp_sysid, xlp_seg_size, xlp_xlog_blcksz)` of a long header.
    pub(crate) long: Option<(u64, u32, u32)>,
    /// Whether the 24 bytes of the short header are all zero.
    zeroed: bool,
}

/// Outcome of reading a header from the bytes at hand.
pub(crate) enum HeaderRead {
    Ready(PageHeader),
    /// More bytes are needed (24 for any header, 40 for a long one).
    Short,
}

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

fn u64_at(b: &[u8], o: usize) -> u64 {
    u32_at(b, o) as u64 | (u32_at(b, o + 4) as u64) << 32
}

impl PageHeader {
    /// Reads a header from the start of `bytes` (which may hold more, or too little).
    pub(crate) fn read(bytes: &[u8]) -> HeaderRead {
        let Some(b) = bytes.get(..SHORT_PAGE_HEADER_LEN) else {
            return HeaderRead::Short;
        };
        let info = u16_at(b, 2);
        let long = if info & XLP_LONG_HEADER != 0 {
            let Some(l) = bytes.get(..LONG_PAGE_HEADER_LEN) else {
                return HeaderRead::Short;
            };
            Some((u64_at(l, 24), u32_at(l, 32), u32_at(l, 36)))
        } else {
            None
        };
        HeaderRead::Ready(PageHeader {
            magic: u16_at(b, 0),
            info,
            timeline: u32_at(b, 4),
            page_address: u64_at(b, 8),
            rem_len: u32_at(b, 16),
            long,
            zeroed: b.iter().all(|&x| x == 0),
        })
    }

    /// Header length: where the page's record data begins.
    pub(crate) fn len(&self) -> u64 {
        if self.long.is_some() {
            LONG_PAGE_HEADER_LEN as u64
        } else {
            SHORT_PAGE_HEADER_LEN as u64
        }
    }

    pub(crate) fn is_zeroed(&self) -> bool {
        self.zeroed
    }

    pub(crate) fn has(&self, flag: u16) -> bool {
        self.info & flag != 0
    }

    /// Whether the header looks written for `address` by some PostgreSQL (any version we
    /// know): the evidence that WAL goes on past a point where decoding failed.
    pub(crate) fn is_written_for(&self, address: u64) -> bool {
        pg_major_for_magic(self.magic).is_some() && self.page_address == address
    }

    /// The geometry a long header announces.
    pub(crate) fn long_geometry(&self) -> Option<Result<WalGeometry, PageProblem>> {
        let (_, segment_size, page_size) = self.long?;
        Some(
            WalGeometry::new(segment_size, page_size).ok_or(PageProblem::ImplausibleGeometry {
                segment_size,
                page_size,
            }),
        )
    }
}

/// What a page must agree with: the stream as decoded so far.
pub(crate) struct PageRules {
    pub(crate) magic: u16,
    pub(crate) geometry: WalGeometry,
    pub(crate) system_id: Option<u64>,
    pub(crate) timeline: u32,
}

impl PageRules {
    /// PostgreSQL's page checks for the page at `address`, in its order.
    pub(crate) fn check(&self, h: &PageHeader, address: u64) -> Result<(), PageProblem> {
        if h.is_zeroed() {
            return Err(PageProblem::Zeroed);
        }
        if h.magic != self.magic {
            return Err(PageProblem::BadMagic {
                found: h.magic,
                expected: self.magic,
            });
        }
        if h.info & !XLP_ALL_FLAGS != 0 {
            return Err(PageProblem::BadInfoBits(h.info));
        }
        match h.long {
            Some((system_id, segment_size, page_size)) => {
                if let Some(expected) = self.system_id.filter(|&s| s != system_id) {
                    return Err(PageProblem::SystemIdChanged {
                        found: system_id,
                        expected,
                    });
                }
                if segment_size != self.geometry.segment_size
                    || page_size != self.geometry.page_size
                {
                    return Err(PageProblem::GeometryChanged {
                        segment_size,
                        page_size,
                    });
                }
            }
            None if self.geometry.is_segment_start(address) => {
                return Err(PageProblem::MissingLongHeader)
            }
            None => {}
        }
        if h.page_address != address {
            return Err(PageProblem::WrongAddress {
                found: Lsn(h.page_address),
                expected: Lsn(address),
            });
        }
        if h.timeline < self.timeline {
            return Err(PageProblem::TimelineRegressed {
                found: h.timeline,
                previous: self.timeline,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(magic: u16, info: u16, tli: u32, addr: u64, rem: u32) -> Vec<u8> {
        let mut b = vec![0u8; 40];
        b[0..2].copy_from_slice(&magic.to_le_bytes());
        b[2..4].copy_from_slice(&info.to_le_bytes());
        b[4..8].copy_from_slice(&tli.to_le_bytes());
        b[8..16].copy_from_slice(&addr.to_le_bytes());
        b[16..20].copy_from_slice(&rem.to_le_bytes());
        if info & XLP_LONG_HEADER != 0 {
            b[24..32].copy_from_slice(&7u64.to_le_bytes());
            b[32..36].copy_from_slice(&(1u32 << 20).to_le_bytes());
            b[36..40].copy_from_slice(&8192u32.to_le_bytes());
        }
        b
    }

    fn rules() -> PageRules {
        PageRules {
            magic: 0xD110,
            geometry: WalGeometry::new(1 << 20, 8192).unwrap(),
            system_id: Some(7),
            timeline: 1,
        }
    }

    fn ready(b: &[u8]) -> PageHeader {
        match PageHeader::read(b) {
            HeaderRead::Ready(h) => h,
            HeaderRead::Short => panic!("short"),
        }
    }

    #[test]
    fn short_and_long_headers() {
        let long = ready(&header(0xD110, XLP_LONG_HEADER, 1, 1 << 20, 0));
        assert_eq!(long.len(), 40);
        assert_eq!(rules().check(&long, 1 << 20), Ok(()));
        let short = ready(&header(
            0xD110,
            XLP_FIRST_IS_CONTRECORD,
            1,
            (1 << 20) + 8192,
            5,
        ));
        assert_eq!(short.len(), 24);
        assert!(short.has(XLP_FIRST_IS_CONTRECORD));
        assert_eq!(short.rem_len, 5);
        assert_eq!(rules().check(&short, (1 << 20) + 8192), Ok(()));
        // A long header needs all 40 bytes.
        assert!(matches!(
            PageHeader::read(&header(0xD110, XLP_LONG_HEADER, 1, 0, 0)[..30]),
            HeaderRead::Short
        ));
        assert!(matches!(PageHeader::read(&[0; 23]), HeaderRead::Short));
    }

    #[test]
    fn checks_in_postgres_order() {
        let r = rules();
        let check = |b: Vec<u8>, addr| r.check(&ready(&b), addr);
        assert_eq!(check(vec![0; 40], 8192), Err(PageProblem::Zeroed));
        assert!(matches!(
            check(header(0xD10D, 0, 1, 8192, 0), 8192),
            Err(PageProblem::BadMagic { found: 0xD10D, .. })
        ));
        assert_eq!(
            check(header(0xD110, 0x10, 1, 8192, 0), 8192),
            Err(PageProblem::BadInfoBits(0x10))
        );
        assert_eq!(
            check(header(0xD110, 0, 1, 1 << 20, 0), 1 << 20),
            Err(PageProblem::MissingLongHeader)
        );
        assert!(matches!(
            check(header(0xD110, 0, 1, 4096, 0), 8192),
            Err(PageProblem::WrongAddress { .. })
        ));
        let mut other_cluster = header(0xD110, XLP_LONG_HEADER, 1, 1 << 20, 0);
        other_cluster[24] = 8;
        assert!(matches!(
            check(other_cluster, 1 << 20),
            Err(PageProblem::SystemIdChanged { found: 8, .. })
        ));
        let r2 = PageRules {
            timeline: 2,
            ..rules()
        };
        assert!(matches!(
            r2.check(&ready(&header(0xD110, 0, 1, 8192, 0)), 8192),
            Err(PageProblem::TimelineRegressed { .. })
        ));
    }

    #[test]
    fn geometry_bounds() {
        assert!(WalGeometry::new(16 << 20, 8192).is_some());
        assert!(WalGeometry::new(1 << 19, 8192).is_none());
        assert!(WalGeometry::new(3 << 20, 8192).is_none());
        assert!(WalGeometry::new(16 << 20, 512).is_none());
        let g = WalGeometry::new(1 << 20, 8192).unwrap();
        assert_eq!(g.round_up_to_segment(1 << 20), 1 << 20);
        assert_eq!(g.round_up_to_segment((1 << 20) + 1), 2 << 20);
        assert_eq!(g.next_page(8191), 8192);
        assert_eq!(g.next_page(8192), 16384);
    }
}
