//! WAL written here, byte for byte in PostgreSQL's format, for what the real fixture
//! does not hold: other versions' flag bits, `XLOG_SWITCH`, an overwritten contrecord,
//! headers split across pages, and each of the decoder's record checks.

use super::*;
use crate::core::pg::waldecode::record::MAX_HEADERS_LEN;

const SEG: u64 = 1 << 20;
const PAGE: u64 = 8192;
const PG13: u16 = 0xD106;
const PG14: u16 = 0xD10D;
const PG15: u16 = 0xD110;
const PG17: u16 = 0xD116;

/// Whether `v` is a multiple of the power of two `to`.
fn aligned(v: u64, to: u64) -> bool {
    v & (to - 1) == 0
}

/// A long page header (40 bytes).
pub(super) fn long_header(magic: u16, address: u64, tli: u32, seg: u32, page: u32) -> Vec<u8> {
    let mut b = Vec::with_capacity(40);
    b.extend_from_slice(&magic.to_le_bytes());
    b.extend_from_slice(&0x0002u16.to_le_bytes());
    b.extend_from_slice(&tli.to_le_bytes());
    b.extend_from_slice(&address.to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    b.extend_from_slice(&[0; 4]);
    b.extend_from_slice(&0x5EED_0000_0000_0001u64.to_le_bytes());
    b.extend_from_slice(&seg.to_le_bytes());
    b.extend_from_slice(&page.to_le_bytes());
    b
}

/// Writes WAL the way PostgreSQL lays it out: records MAXALIGNed, split across pages
/// with `XLP_FIRST_IS_CONTRECORD` and `xlp_rem_len`, a long header on segment starts.
struct WalWriter {
    magic: u16,
    start: u64,
    bytes: Vec<u8>,
    previous: u64,
    /// Extra `xlp_info` bits for the next page header.
    next_page_flags: u16,
}

impl WalWriter {
    fn new(magic: u16, start: u64) -> WalWriter {
        WalWriter {
            magic,
            start,
            bytes: Vec::new(),
            previous: 0,
            next_page_flags: 0,
        }
    }

    fn pos(&self) -> u64 {
        self.start + self.bytes.len() as u64
    }

    fn page_header(&mut self, rem_len: u32) {
        let address = self.pos();
        if aligned(address, SEG) {
            let mut h = long_header(self.magic, address, 1, SEG as u32, PAGE as u32);
            let info = 0x0002 | self.next_page_flags | if rem_len > 0 { 0x0001 } else { 0 };
            h[2..4].copy_from_slice(&info.to_le_bytes());
            h[16..20].copy_from_slice(&rem_len.to_le_bytes());
            self.bytes.extend_from_slice(&h);
        } else {
            let info = self.next_page_flags | if rem_len > 0 { 0x0001 } else { 0 };
            self.bytes.extend_from_slice(&self.magic.to_le_bytes());
            self.bytes.extend_from_slice(&info.to_le_bytes());
            self.bytes.extend_from_slice(&1u32.to_le_bytes());
            self.bytes.extend_from_slice(&address.to_le_bytes());
            self.bytes.extend_from_slice(&rem_len.to_le_bytes());
            self.bytes.extend_from_slice(&[0; 4]);
        }
        self.next_page_flags = 0;
    }

    /// Appends a record (fixed header built here, CRC included); returns its LSN.
    fn record(&mut self, rmid: u8, info: u8, xid: u32, body: &[u8]) -> u64 {
        while !aligned(self.pos(), 8) {
            self.bytes.push(0);
        }
        if aligned(self.pos(), PAGE) {
            self.page_header(0);
        }
        let lsn = self.pos();
        let tot_len = 24 + body.len() as u32;
        let mut rec = Vec::with_capacity(tot_len as usize);
        rec.extend_from_slice(&tot_len.to_le_bytes());
        rec.extend_from_slice(&xid.to_le_bytes());
        rec.extend_from_slice(&self.previous.to_le_bytes());
        rec.extend_from_slice(&[info, rmid, 0, 0]);
        let crc = crc32c::crc32c_append(crc32c::crc32c(body), &rec[..20]);
        rec.extend_from_slice(&crc.to_le_bytes());
        rec.extend_from_slice(body);
        let mut left = &rec[..];
        loop {
            let room = (PAGE - self.pos() % PAGE) as usize;
            let n = room.min(left.len());
            self.bytes.extend_from_slice(&left[..n]);
            left = &left[n..];
            if left.is_empty() {
                break;
            }
            self.page_header(left.len() as u32);
        }
        self.previous = lsn;
        lsn
    }

    /// `XLOG_SWITCH`, then the rest of the segment as PostgreSQL leaves it: page headers
    /// and zeros (here: junk, which nobody must read).
    fn switch(&mut self) -> u64 {
        let lsn = self.record(0, 0x40, 0, &[]);
        while !aligned(self.pos(), SEG) {
            if aligned(self.pos(), PAGE) {
                self.page_header(0);
            } else {
                self.bytes.push(0xA5);
            }
        }
        lsn
    }

    /// Zeros up to the end of the current page.
    fn pad_page(&mut self) {
        while !aligned(self.pos(), PAGE) {
            self.bytes.push(0);
        }
    }
}

/// Fragment headers and payloads of a record body.
#[derive(Default)]
struct Body {
    headers: Vec<u8>,
    payload: Vec<u8>,
}

struct Image {
    len: u16,
    hole_offset: u16,
    info: u8,
    hole_length: Option<u16>,
}

impl Body {
    #[allow(clippy::too_many_arguments)]
    fn block(
        &mut self,
        id: u8,
        flags: u8,
        rel: Option<[u32; 3]>,
        blk: u32,
        data: &[u8],
        image: Option<Image>,
    ) -> &mut Body {
        self.headers.push(id);
        self.headers.push(flags);
        self.headers
            .extend_from_slice(&(data.len() as u16).to_le_bytes());
        if let Some(image) = image {
            self.headers.extend_from_slice(&image.len.to_le_bytes());
            self.headers
                .extend_from_slice(&image.hole_offset.to_le_bytes());
            self.headers.push(image.info);
            if let Some(h) = image.hole_length {
                self.headers.extend_from_slice(&h.to_le_bytes());
            }
            self.payload
                .extend_from_slice(&vec![0x11; image.len as usize]);
        }
        if let Some(rel) = rel {
            for v in rel {
                self.headers.extend_from_slice(&v.to_le_bytes());
            }
        }
        self.headers.extend_from_slice(&blk.to_le_bytes());
        self.payload.extend_from_slice(data);
        self
    }

    fn raw(&mut self, bytes: &[u8]) -> &mut Body {
        self.headers.extend_from_slice(bytes);
        self
    }

    fn main_data(&mut self, len: u32) -> &mut Body {
        if len < 256 {
            self.headers.extend_from_slice(&[255, len as u8]);
        } else {
            self.headers.push(254);
            self.headers.extend_from_slice(&len.to_le_bytes());
        }
        self.payload.extend_from_slice(&vec![0x22; len as usize]);
        self
    }

    fn bytes(&self) -> Vec<u8> {
        [&self.headers[..], &self.payload[..]].concat()
    }
}

const REL: [u32; 3] = [1663, 5, 16384];

fn decode(w: &WalWriter) -> (Vec<DecodedRecord>, WalEnd) {
    decode_all(w.start, &[&w.bytes]).unwrap()
}

/// One record with `body` on a fresh segment of format `magic`.
fn lone(magic: u16, rmid: u8, body: &[u8]) -> (Vec<DecodedRecord>, WalEnd) {
    let mut w = WalWriter::new(magic, SEG);
    w.record(rmid, 0, 1, body);
    w.pad_page();
    decode(&w)
}

fn lone_problem(magic: u16, body: &[u8]) -> RecordProblem {
    match lone(magic, 10, body) {
        (
            records,
            WalEnd {
                reason: EndReason::EndOfWal(Invalid::Record { problem, .. }),
                ..
            },
        ) if records.is_empty() => problem,
        other => panic!("{other:?}"),
    }
}

#[test]
fn switch_skips_the_rest_of_the_segment() {
    let mut w = WalWriter::new(PG15, SEG);
    let a = w.record(
        10,
        0,
        5,
        Body::default()
            .block(0, 0x20, Some(REL), 7, &[1, 2, 3], None)
            .main_data(3)
            .bytes()
            .as_slice(),
    );
    let switch = w.switch();
    let b = w.record(10, 0, 6, &Body::default().main_data(1).bytes());
    let (records, end) = decode(&w);
    assert_eq!(
        records.iter().map(|r| r.lsn.0).collect::<Vec<_>>(),
        vec![a, switch, b]
    );
    assert!(records[1].is_switch());
    assert_eq!(records[1].next_lsn, Lsn(2 * SEG));
    assert_eq!(b, 2 * SEG + 40);
    assert_eq!(records[2].prev_lsn, Lsn(switch));
    assert_eq!(end.reason, EndReason::InputExhausted);

    // Alone, the first segment ends at the switch, between records.
    let first = decode_segment(&w.bytes[..SEG as usize]).unwrap();
    assert_eq!(first.records.len(), 2);
    assert_eq!(
        first.end,
        WalEnd {
            lsn: Lsn(2 * SEG),
            reason: EndReason::InputExhausted
        }
    );
}

#[test]
fn switch_at_the_very_end_of_a_page() {
    // The switch record ends exactly at a page end: the next record is in the next segment
    // all the same.
    let mut w = WalWriter::new(PG15, SEG);
    let body_len = PAGE - 40 - 24 - 24;
    w.record(
        10,
        0,
        5,
        &Body::default().main_data(body_len as u32 - 5).bytes(),
    );
    w.switch();
    let b = w.record(10, 0, 6, &[]);
    let (records, _) = decode(&w);
    assert_eq!(records[1].end_lsn, Lsn(SEG + PAGE));
    assert_eq!(records[2].lsn, Lsn(b));
}

#[test]
fn record_header_split_across_pages() {
    let mut w = WalWriter::new(PG15, SEG);
    // Ends 8 bytes before the page end: the next header straddles the boundary.
    let first_len = PAGE - 40 - 8;
    w.record(
        10,
        0,
        5,
        &Body::default().main_data(first_len as u32 - 24 - 5).bytes(),
    );
    assert_eq!(w.pos(), SEG + PAGE - 8);
    let b = w.record(
        10,
        0,
        6,
        Body::default()
            .block(0, 0x20, Some(REL), 1, &[9; 40], None)
            .main_data(10)
            .bytes()
            .as_slice(),
    );
    let c = w.record(10, 0, 7, &[]);
    let (records, _) = decode(&w);
    assert_eq!(
        records.iter().map(|r| r.lsn.0).collect::<Vec<_>>(),
        vec![SEG + 40, b, c]
    );
    assert_eq!(records[1].blocks[0].data_len, 40);
    // Fed a byte at a time, the same.
    let mut decoder = WalDecoder::new(Lsn(SEG)).unwrap();
    let mut streamed = Vec::new();
    for byte in &w.bytes {
        decoder.feed(std::slice::from_ref(byte));
        while let Next::Record(r) = decoder.next_record().unwrap() {
            streamed.push(r);
        }
    }
    assert_eq!(streamed, records);
}

#[test]
fn a_record_across_three_segments() {
    let mut w = WalWriter::new(PG17, SEG);
    let a = w.record(10, 0, 5, &[]);
    let big = w.record(21, 0, 0, &Body::default().main_data(2 * SEG as u32).bytes());
    let c = w.record(10, 0, 6, &[]);
    w.pad_page();
    let (records, end) = decode(&w);
    assert_eq!(
        records.iter().map(|r| r.lsn.0).collect::<Vec<_>>(),
        vec![a, big, c]
    );
    assert_eq!(records[1].main_data_len, 2 * SEG as u32);
    assert!(records[1].end_lsn.0 > 3 * SEG);
    assert!(matches!(
        end.reason,
        EndReason::EndOfWal(Invalid::Record {
            problem: RecordProblem::ZeroLength,
            ..
        })
    ));
    // Segment by segment: the middle one is all continuation.
    let segments: Vec<&[u8]> = w.bytes.chunks(SEG as usize).collect();
    assert_eq!(decode_all(SEG, &segments).unwrap(), (records.clone(), end));
    let middle = decode_segment(segments[1]).unwrap();
    assert!(middle.records.is_empty());
    assert_eq!(middle.end.reason, EndReason::InputExhausted);
    assert_eq!(segments.len(), 3);
    let last = decode_segment(segments[2]).unwrap();
    assert_eq!(last.records, records[2..]);
}

#[test]
fn overwritten_contrecord_drops_the_cut_record() {
    let mut w = WalWriter::new(PG15, SEG);
    let a = w.record(10, 0, 5, &[]);
    // A record that would span into the next page; the crash loses the continuation.
    let cut = w.record(10, 0, 6, &Body::default().main_data(PAGE as u32).bytes());
    let page = (cut / PAGE + 1) * PAGE;
    w.bytes.truncate((page - SEG) as usize);
    w.previous = a;
    w.next_page_flags = 0x0008;
    let b = w.record(0, 0x90, 0, &Body::default().main_data(16).bytes());
    let c = w.record(10, 0, 7, &[]);
    let (records, _) = decode(&w);
    assert_eq!(
        records.iter().map(|r| r.lsn.0).collect::<Vec<_>>(),
        vec![a, b, c]
    );
    assert_eq!(b, page + 24);
    // Without the flag the same bytes are a page that fails to continue the record.
    let mut plain = w.bytes.clone();
    plain[(page - SEG) as usize + 2] = 0;
    let (records, end) = decode_all(SEG, &[&plain]).unwrap();
    assert_eq!(records.len(), 1);
    assert_eq!(end.lsn, Lsn(cut));
    assert!(matches!(
        end.reason,
        EndReason::EndOfWal(Invalid::Page {
            problem: PageProblem::MissingContrecord,
            ..
        })
    ));
}

#[test]
fn image_flags_moved_in_postgresql_15() {
    // bimg_info 0x07: PG14 reads HAS_HOLE | IS_COMPRESSED (pglz) | APPLY;
    // PG15 reads HAS_HOLE | APPLY | COMPRESS_PGLZ.
    let compressed_with_hole = Image {
        len: 100,
        hole_offset: 200,
        info: 0x07,
        hole_length: Some(4000),
    };
    let body = Body::default()
        .block(0, 0x10, Some(REL), 3, &[], Some(compressed_with_hole))
        .bytes();
    for magic in [PG13, PG14, PG15, PG17] {
        let (records, _) = lone(magic, 10, &body);
        let image = records[0].blocks[0].image.unwrap();
        assert_eq!(
            image,
            BlockImage {
                len: 100,
                hole_offset: 200,
                hole_length: 4000,
                apply: true,
                compression: Some(ImageCompression::Pglz)
            }
        );
    }
    // 0x0A: PG15 reads APPLY | COMPRESS_LZ4; PG14 IS_COMPRESSED (pglz), not applied.
    let lz4 = Image {
        len: 300,
        hole_offset: 0,
        info: 0x0A,
        hole_length: None,
    };
    let body = Body::default()
        .block(0, 0x10, Some(REL), 3, &[], Some(lz4))
        .bytes();
    let image = |magic| lone(magic, 10, &body).0[0].blocks[0].image.unwrap();
    assert_eq!(
        (image(PG15).apply, image(PG15).compression),
        (true, Some(ImageCompression::Lz4))
    );
    assert_eq!(
        (image(PG14).apply, image(PG14).compression),
        (false, Some(ImageCompression::Pglz))
    );
    // 0x04 without hole, uncompressed: PG14 APPLY of a whole page; PG15 pglz.
    let whole = Image {
        len: 8192,
        hole_offset: 0,
        info: 0x04,
        hole_length: None,
    };
    let body = Body::default()
        .block(0, 0x10, Some(REL), 3, &[], Some(whole))
        .bytes();
    let (records, _) = lone(PG14, 10, &body);
    assert_eq!(records[0].blocks[0].image.unwrap().compression, None);
    assert_eq!(
        lone_problem(PG15, &body),
        RecordProblem::BadImage {
            block_id: 0,
            why: "compressed image as long as a block"
        }
    );
    // Zstd is PG15+.
    let zstd = Image {
        len: 50,
        hole_offset: 0,
        info: 0x12,
        hole_length: None,
    };
    let body = Body::default()
        .block(0, 0x10, Some(REL), 3, &[], Some(zstd))
        .bytes();
    assert_eq!(
        lone(PG15, 10, &body).0[0].blocks[0]
            .image
            .unwrap()
            .compression,
        Some(ImageCompression::Zstd)
    );
}

#[test]
fn uncompressed_hole_is_what_the_image_lacks() {
    let with_hole = Image {
        len: 5000,
        hole_offset: 300,
        info: 0x03,
        hole_length: None,
    };
    let body = Body::default()
        .block(0, 0x10 | 0x40, Some(REL), 3, &[], Some(with_hole))
        .block(2, 0x80 | 0x01, None, 9, &[], None)
        .main_data(0)
        .bytes();
    let (records, _) = lone(PG15, 10, &body);
    let r = &records[0];
    assert_eq!(r.blocks[0].image.unwrap().hole_length, 8192 - 5000);
    assert!(r.blocks[0].will_init);
    assert_eq!(r.blocks[1].fork, ForkNumber::Fsm);
    assert_eq!(
        r.blocks[1].rel,
        RelFileLocator {
            spc: 1663,
            db: 5,
            rel: 16384
        }
    );
    assert_eq!(r.image_len(), 5000);
}

#[test]
fn toplevel_xid_and_origin() {
    let body = Body::default()
        .raw(&[253, 7, 0, 252, 0x10, 0, 0, 0])
        .main_data(4)
        .bytes();
    let (records, _) = lone(PG14, 1, &body);
    assert_eq!(
        (
            records[0].origin,
            records[0].toplevel_xid,
            records[0].main_data_len
        ),
        (Some(7), Some(16), 4)
    );
    // PostgreSQL 13 has no XLR_BLOCK_ID_TOPLEVEL_XID.
    assert_eq!(lone_problem(PG13, &body), RecordProblem::BadBlockId(252));
}

#[test]
fn custom_resource_managers_from_postgresql_15() {
    assert_eq!(lone(PG15, 200, &[]).0[0].rmgr_name(), None);
    assert_eq!(lone(PG15, 21, &[]).0[0].rmgr_name(), Some("LogicalMessage"));
    match lone(PG14, 200, &[]).1.reason {
        EndReason::EndOfWal(Invalid::Record { problem, .. }) => {
            assert_eq!(problem, RecordProblem::BadRmgr(200))
        }
        other => panic!("{other:?}"),
    }
    match lone(PG15, 22, &[]).1.reason {
        EndReason::EndOfWal(Invalid::Record { problem, .. }) => {
            assert_eq!(problem, RecordProblem::BadRmgr(22))
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn every_record_check() {
    let img = |len, hole_offset, info, hole_length| {
        Some(Image {
            len,
            hole_offset,
            info,
            hole_length,
        })
    };
    let cases: Vec<(Vec<u8>, RecordProblem)> = vec![
        (
            Body::default().raw(&[40]).bytes(),
            RecordProblem::BadBlockId(40),
        ),
        (
            Body::default()
                .block(2, 0, Some(REL), 0, &[], None)
                .block(1, 0, Some(REL), 0, &[], None)
                .bytes(),
            RecordProblem::BlockOutOfOrder(1),
        ),
        (
            Body::default()
                .block(0, 0, Some(REL), 0, &[], None)
                .block(0, 0, Some(REL), 0, &[], None)
                .bytes(),
            RecordProblem::BlockOutOfOrder(0),
        ),
        (
            Body::default().block(0, 0x80, None, 0, &[], None).bytes(),
            RecordProblem::SameRelWithoutRel { block_id: 0 },
        ),
        (
            Body::default()
                .block(0, 0x20, Some(REL), 0, &[], None)
                .bytes(),
            RecordProblem::DataFlagMismatch {
                block_id: 0,
                data_len: 0,
            },
        ),
        (
            Body::default()
                .block(0, 0x00, Some(REL), 0, &[1], None)
                .bytes(),
            RecordProblem::DataFlagMismatch {
                block_id: 0,
                data_len: 1,
            },
        ),
        (
            Body::default()
                .block(0, 0x05, Some(REL), 0, &[], None)
                .bytes(),
            RecordProblem::BadFork {
                block_id: 0,
                fork: 5,
            },
        ),
        (
            Body::default()
                .block(0, 0x10, Some(REL), 0, &[], img(100, 0, 0x01, None))
                .bytes(),
            RecordProblem::BadImage {
                block_id: 0,
                why: "BKPIMAGE_HAS_HOLE set, but the hole is empty or the image is a whole block",
            },
        ),
        (
            Body::default()
                .block(0, 0x10, Some(REL), 0, &[], img(8192, 5, 0x00, None))
                .bytes(),
            RecordProblem::BadImage {
                block_id: 0,
                why: "BKPIMAGE_HAS_HOLE not set, but the image has a hole",
            },
        ),
        (
            Body::default()
                .block(0, 0x10, Some(REL), 0, &[], img(100, 0, 0x00, None))
                .bytes(),
            RecordProblem::BadImage {
                block_id: 0,
                why: "BKPIMAGE_HAS_HOLE not set, but the image has a hole",
            },
        ),
        (
            Body::default()
                .block(0, 0x10, Some(REL), 0, &[], img(9000, 0, 0x00, None))
                .bytes(),
            RecordProblem::BadImage {
                block_id: 0,
                why: "image longer than a block",
            },
        ),
        (
            Body::default()
                .block(0, 0x10, Some(REL), 0, &[], img(100, 10, 0x05, Some(0)))
                .bytes(),
            RecordProblem::BadImage {
                block_id: 0,
                why: "BKPIMAGE_HAS_HOLE set, but the hole is empty or the image is a whole block",
            },
        ),
        (
            Body::default().main_data(3).raw(&[0]).bytes(),
            RecordProblem::ShortData,
        ),
        (
            [Body::default().main_data(3).bytes(), vec![0]].concat(),
            RecordProblem::ShortData,
        ),
        (
            Body::default().raw(&[255]).bytes(),
            RecordProblem::ShortData,
        ),
        (vec![0; MAX_HEADERS_LEN], RecordProblem::BlockOutOfOrder(0)),
        (
            [[253, 1, 0].repeat(2000), vec![255, 0]].concat(),
            RecordProblem::HeadersTooLong,
        ),
    ];
    for (body, problem) in cases {
        assert_eq!(lone_problem(PG15, &body), problem, "{body:?}");
        // The same record mid-stream, with good records after it: corruption, not the end.
        let mut w = WalWriter::new(PG15, SEG);
        let bad = w.record(10, 0, 1, &body);
        w.record(10, 0, 2, &[]);
        w.record(
            10,
            0,
            3,
            &Body::default().main_data(2 * PAGE as u32).bytes(),
        );
        w.pad_page();
        match decode_all(w.start, &[&w.bytes]) {
            Err(DecodeError::Corrupt {
                invalid: Invalid::Record { lsn, problem: p },
                ..
            }) => {
                assert_eq!((lsn, p), (Lsn(bad), problem))
            }
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn streaming_asks_for_input_and_carries_state() {
    let mut w = WalWriter::new(PG15, SEG);
    for i in 0..200 {
        w.record(
            10,
            0,
            i,
            &Body::default()
                .block(0, 0x20, Some(REL), i, &[7; 100], None)
                .main_data(20)
                .bytes(),
        );
    }
    w.pad_page();
    let (all, _) = decode(&w);
    assert_eq!(all.len(), 200);
    let mut decoder = WalDecoder::new(Lsn(SEG)).unwrap();
    assert_eq!(decoder.next_record(), Ok(Next::NeedInput));
    assert_eq!(decoder.geometry(), None);
    decoder.feed(&w.bytes[..30]);
    assert_eq!(decoder.next_record(), Ok(Next::NeedInput));
    decoder.feed(&w.bytes[30..10_000]);
    let mut got = Vec::new();
    while let Next::Record(r) = decoder.next_record().unwrap() {
        got.push(r);
    }
    assert_eq!(
        decoder.geometry(),
        WalGeometry::new(SEG as u32, PAGE as u32)
    );
    assert_eq!(decoder.pg_major(), Some(15));
    assert_eq!(got, all[..got.len()]);
    decoder.feed(&w.bytes[10_000..]);
    decoder.finish();
    loop {
        match decoder.next_record().unwrap() {
            Next::Record(r) => got.push(r),
            Next::End(end) => {
                assert_eq!(end.lsn, all[199].next_lsn);
                break;
            }
            Next::NeedInput => panic!("NeedInput after finish"),
        }
    }
    assert_eq!(got, all);
    assert_eq!(decoder.input_end(), Lsn(SEG + w.bytes.len() as u64));
}

#[test]
fn timeline_and_system_identifier_are_checked() {
    let mut w = WalWriter::new(PG15, SEG);
    w.record(
        10,
        0,
        1,
        &Body::default().main_data(3 * PAGE as u32).bytes(),
    );
    w.record(10, 0, 1, &[]);
    w.pad_page();
    // Timeline 0 on the third page, after timeline 1.
    let mut bytes = w.bytes.clone();
    bytes[2 * PAGE as usize + 4] = 0;
    let err = decode_all(SEG, &[&bytes]).unwrap_err();
    assert!(
        matches!(
            err,
            DecodeError::Corrupt {
                invalid: Invalid::Page {
                    problem: PageProblem::TimelineRegressed {
                        found: 0,
                        previous: 1
                    },
                    ..
                },
                ..
            }
        ),
        "{err:?}"
    );
    // Invalid info bits.
    let mut bytes = w.bytes.clone();
    bytes[PAGE as usize + 2] |= 0x40;
    let err = decode_all(SEG, &[&bytes]).unwrap_err();
    assert!(
        matches!(
            err,
            DecodeError::Corrupt {
                invalid: Invalid::Page {
                    problem: PageProblem::BadInfoBits(0x41),
                    ..
                },
                ..
            }
        ),
        "{err:?}"
    );
    // A continuation page claiming the wrong remaining length.
    let mut bytes = w.bytes.clone();
    bytes[PAGE as usize + 16] ^= 1;
    let err = decode_all(SEG, &[&bytes]).unwrap_err();
    assert!(
        matches!(
            err,
            DecodeError::Corrupt {
                invalid: Invalid::Page {
                    problem: PageProblem::ContrecordLength { .. },
                    ..
                },
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn segments_of_another_cluster_or_geometry() {
    let mut w = WalWriter::new(PG15, SEG);
    w.record(10, 0, 1, &[]);
    w.switch();
    w.record(10, 0, 2, &[]);
    w.pad_page();
    let seg2 = SEG as usize;
    let mut other = w.bytes.clone();
    other[seg2 + 24] ^= 1;
    let (records, end) = decode_all(SEG, &[&other]).unwrap();
    assert_eq!(records.len(), 2);
    assert!(matches!(
        end.reason,
        EndReason::EndOfWal(Invalid::Page {
            problem: PageProblem::SystemIdChanged { .. },
            ..
        })
    ));
    let mut other = w.bytes.clone();
    other[seg2 + 32..seg2 + 36].copy_from_slice(&(2u32 << 20).to_le_bytes());
    let (_, end) = decode_all(SEG, &[&other]).unwrap();
    assert!(matches!(
        end.reason,
        EndReason::EndOfWal(Invalid::Page {
            problem: PageProblem::GeometryChanged { .. },
            ..
        })
    ));
    let mut other = w.bytes.clone();
    other[seg2..seg2 + 2].copy_from_slice(&PG14.to_le_bytes());
    let (_, end) = decode_all(SEG, &[&other]).unwrap();
    assert!(matches!(
        end.reason,
        EndReason::EndOfWal(Invalid::Page {
            problem: PageProblem::BadMagic {
                found: PG14,
                expected: PG15
            },
            ..
        })
    ));
}
