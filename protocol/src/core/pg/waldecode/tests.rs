//! Tests against real PostgreSQL 15 WAL: two consecutive 1 MiB segments and pg_waldump's
//! reading of them (`testdata/make-fixture.sh` regenerates both), plus golden bytes,
//! truncation at every length, random chunking and random damage.

use std::sync::OnceLock;

use proptest::prelude::*;

use super::*;

mod synthetic;

const FIXTURE_ZST: &[u8] = include_bytes!("testdata/pg15-1mb.wal.zst");
/// `pg_waldump -b` of the fixture, descriptions cut (`, desc: ...`).
const FIXTURE_WALDUMP: &str = include_str!("testdata/pg15-1mb.waldump");
const SEGMENT: usize = 1 << 20;
/// LSN of the fixture's first byte (segment 000000010000000000000007).
const START: u64 = 0x0070_0000;

fn fixture() -> &'static [u8] {
    static BYTES: OnceLock<Vec<u8>> = OnceLock::new();
    BYTES.get_or_init(|| {
        let bytes = zstd::decode_all(FIXTURE_ZST).expect("fixture decompresses");
        assert_eq!(bytes.len(), 2 * SEGMENT);
        bytes
    })
}

/// All records of the fixture, decoded once.
fn fixture_records() -> &'static (Vec<DecodedRecord>, WalEnd) {
    static DECODED: OnceLock<(Vec<DecodedRecord>, WalEnd)> = OnceLock::new();
    DECODED.get_or_init(|| decode_all(START, &[fixture()]).expect("fixture decodes"))
}

/// Feeds `chunks` to a decoder starting at `start`, then finishes it.
fn decode_all(start: u64, chunks: &[&[u8]]) -> Result<(Vec<DecodedRecord>, WalEnd), DecodeError> {
    let mut decoder = WalDecoder::new(Lsn(start))?;
    let mut records = Vec::new();
    for chunk in chunks {
        decoder.feed(chunk);
        loop {
            match decoder.next_record()? {
                Next::Record(r) => records.push(r),
                Next::NeedInput => break,
                Next::End(end) => return Ok((records, end)),
            }
        }
    }
    decoder.finish();
    loop {
        match decoder.next_record()? {
            Next::Record(r) => records.push(r),
            Next::NeedInput => panic!("NeedInput after finish()"),
            Next::End(end) => return Ok((records, end)),
        }
    }
}

fn render(records: &[DecodedRecord]) -> Vec<String> {
    records.iter().flat_map(|r| r.waldump_lines(8192)).collect()
}

#[test]
fn fixture_agrees_with_pg_waldump_record_by_record() {
    let (records, end) = fixture_records();
    let ours = render(records);
    let theirs: Vec<&str> = FIXTURE_WALDUMP.lines().collect();
    for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
        assert_eq!(a, b, "line {} differs", i + 1);
    }
    assert_eq!(ours.len(), theirs.len(), "as many lines as pg_waldump");
    // pg_waldump: "invalid record length at 0/8785F8: wanted 24, got 0".
    let last = records.last().unwrap();
    assert_eq!(
        *end,
        WalEnd {
            lsn: last.next_lsn,
            reason: EndReason::EndOfWal(Invalid::Record {
                lsn: last.next_lsn,
                problem: RecordProblem::ZeroLength
            })
        }
    );
    assert_eq!(last.next_lsn, Lsn(0x0087_85F8));
    // The fixture has what it promises.
    let blocks: Vec<&BlockRef> = records.iter().flat_map(|r| &r.blocks).collect();
    for fork in [
        ForkNumber::Main,
        ForkNumber::Fsm,
        ForkNumber::Vm,
        ForkNumber::Init,
    ] {
        assert!(blocks.iter().any(|b| b.fork == fork), "no {fork} block");
    }
    for method in [
        ImageCompression::Pglz,
        ImageCompression::Lz4,
        ImageCompression::Zstd,
    ] {
        assert!(blocks
            .iter()
            .any(|b| b.image.and_then(|i| i.compression) == Some(method)));
    }
    assert!(blocks.iter().any(|b| b.image.is_some_and(|i| !i.apply)));
    assert!(
        blocks.iter().any(|b| b.rel.spc != 1663),
        "no block outside pg_default"
    );
    let spanning = records.iter().find(|r| r.total_len > 1_000_000).unwrap();
    assert!(spanning.lsn.0 < START + SEGMENT as u64 && spanning.end_lsn.0 > START + SEGMENT as u64);
}

#[test]
fn segments_decode_alone() {
    let (all, end) = fixture_records();
    let boundary = Lsn(START + SEGMENT as u64);
    let spanning = all.iter().position(|r| r.end_lsn > boundary).unwrap();

    let first = decode_segment(&fixture()[..SEGMENT]).unwrap();
    assert_eq!(first.records, all[..spanning]);
    assert_eq!(
        first.end,
        WalEnd {
            lsn: all[spanning].lsn,
            reason: EndReason::IncompleteRecord
        }
    );

    // The second segment opens with the tail of the 1.2 MB message: skipped.
    let second = decode_segment(&fixture()[SEGMENT..]).unwrap();
    assert_eq!(second.records[0].prev_lsn, all[spanning].lsn);
    assert_eq!(second.records, all[spanning + 1..]);
    assert_eq!(second.end, *end);
}

#[test]
fn waldump_lsn_format() {
    assert_eq!(WaldumpLsn(Lsn(0x01A3_B4C8)).to_string(), "0/01A3B4C8");
    assert_eq!(WaldumpLsn(Lsn(0x16_0000_0028)).to_string(), "16/00000028");
    assert_eq!(Lsn(0x01A3_B4C8).to_string(), "0/1A3B4C8");
}

/// Decodes `record` as the only record on a fresh segment's first page.
fn decode_lone_record(record: &[u8]) -> (Vec<DecodedRecord>, WalEnd) {
    let start = 0x0100_0000u64;
    let mut page = synthetic::long_header(0xD110, start, 1, 1 << 20, 8192);
    page.extend_from_slice(record);
    decode_all(start, &[&page]).unwrap()
}

#[test]
fn golden_bytes_visibility_map_record() {
    // pg_waldump: rmgr: Heap2 len (rec/tot): 59/59, tx: 0, lsn: 0/007252D8,
    // prev 0/00725298, desc: VISIBLE cutoff xid 731 flags 0x01
    //   blkref #0: rel 1663/5/16385 fork vm blk 0
    //   blkref #1: rel 1663/5/16385 fork main blk 2
    #[rustfmt::skip]
    let record: &[u8] = &[
        0x3b, 0x00, 0x00, 0x00,                         // xl_tot_len 59
        0x00, 0x00, 0x00, 0x00,                         // xl_xid 0
        0x98, 0x52, 0x72, 0x00, 0x00, 0x00, 0x00, 0x00, // xl_prev 0/00725298
        0x40,                                           // xl_info: XLOG_HEAP2_VISIBLE
        0x09,                                           // xl_rmid 9: Heap2
        0x00, 0x00,                                     // padding
        0x57, 0x82, 0xd0, 0xe6,                         // xl_crc
        0x00,                                           // block id 0
        0x02,                                           //   fork 2 (vm), no flags
        0x00, 0x00,                                     //   data_length 0
        0x7f, 0x06, 0x00, 0x00,                         //   spcOid 1663
        0x05, 0x00, 0x00, 0x00,                         //   dbOid 5
        0x01, 0x40, 0x00, 0x00,                         //   relNumber 16385
        0x00, 0x00, 0x00, 0x00,                         //   block 0
        0x01,                                           // block id 1
        0x80,                                           //   BKPBLOCK_SAME_REL, fork 0 (main)
        0x00, 0x00,                                     //   data_length 0
        0x02, 0x00, 0x00, 0x00,                         //   block 2
        0xff, 0x05,                                     // XLR_BLOCK_ID_DATA_SHORT, 5 bytes
        0xdb, 0x02, 0x00, 0x00, 0x01,                   // main data: cutoff xid 731, flags 1
    ];
    assert_eq!(&fixture()[0x7252D8 - START as usize..][..59], record);
    let (records, _) = decode_lone_record(record);
    let r = &records[0];
    assert_eq!(
        (r.rmid, r.info, r.xid, r.total_len, r.main_data_len),
        (9, 0x40, 0, 59, 5)
    );
    assert_eq!(r.prev_lsn, Lsn(0x0072_5298));
    let rel = RelFileLocator {
        spc: 1663,
        db: 5,
        rel: 16385,
    };
    let block = |id, fork, block| BlockRef {
        id,
        rel,
        fork,
        block,
        will_init: false,
        data_len: 0,
        image: None,
    };
    assert_eq!(
        r.blocks,
        vec![block(0, ForkNumber::Vm, 0), block(1, ForkNumber::Main, 2)]
    );
}

#[test]
fn golden_bytes_insert_in_a_tablespace() {
    #[rustfmt::skip]
    let record: &[u8] = &[
        0x3b, 0x00, 0x00, 0x00,                         // xl_tot_len 59
        0xdd, 0x02, 0x00, 0x00,                         // xl_xid 733
        0x58, 0xe8, 0x71, 0x00, 0x00, 0x00, 0x00, 0x00, // xl_prev 0/0071E858
        0x00,                                           // xl_info: XLOG_HEAP_INSERT
        0x0a,                                           // xl_rmid 10: Heap
        0x00, 0x00,                                     // padding
        0x47, 0xf8, 0x34, 0x33,                         // xl_crc
        0x00,                                           // block id 0
        0x20,                                           //   BKPBLOCK_HAS_DATA, main fork
        0x0a, 0x00,                                     //   data_length 10
        0x00, 0x40, 0x00, 0x00,                         //   spcOid 16384 (tablespace ts)
        0x05, 0x00, 0x00, 0x00,                         //   dbOid 5
        0x06, 0x40, 0x00, 0x00,                         //   relNumber 16390
        0x00, 0x00, 0x00, 0x00,                         //   block 0
        0xff, 0x03,                                     // main data: 3 bytes
        0x01, 0x00, 0x00, 0x08, 0x18,                   // block 0 data: tuple header...
        0x00, 0x02, 0x00, 0x00, 0x00,                   // ...and tuple
        0x02, 0x00, 0x00,                               // main data: offnum 2, flags 0
    ];
    assert_eq!(&fixture()[0x71E898 - START as usize..][..59], record);
    let (records, _) = decode_lone_record(record);
    let r = &records[0];
    assert_eq!((r.rmid, r.xid, r.main_data_len), (10, 733, 3));
    let rel = RelFileLocator {
        spc: 16384,
        db: 5,
        rel: 16390,
    };
    assert_eq!(
        r.blocks,
        vec![BlockRef {
            id: 0,
            rel,
            fork: ForkNumber::Main,
            block: 0,
            will_init: false,
            data_len: 10,
            image: None
        }]
    );

    // One bit off anywhere, and the CRC says so.
    for i in 0..record.len() {
        let mut damaged = record.to_vec();
        damaged[i] ^= 0x10;
        let (records, end) = decode_lone_record(&damaged);
        assert!(records.is_empty(), "byte {i}");
        // Mostly the CRC; a length grown past the input is an incomplete record.
        assert_ne!(end.reason, EndReason::InputExhausted, "byte {i}");
    }
}

#[test]
fn golden_bytes_zstd_image() {
    // pg_waldump: rmgr: XLOG len (rec/tot): 51/497, lsn: 0/00717B30, desc: FPI
    //   blkref #0: rel 1663/5/16385 fork main blk 0 (FPW); hole: offset: 248,
    //   length: 4056, compression saved: 3690, method: zstd
    #[rustfmt::skip]
    let headers: &[u8] = &[
        0xf1, 0x01, 0x00, 0x00,                         // xl_tot_len 497
        0x00, 0x00, 0x00, 0x00,                         // xl_xid 0
        0xb8, 0x7a, 0x71, 0x00, 0x00, 0x00, 0x00, 0x00, // xl_prev 0/00717AB8
        0xa0,                                           // xl_info: XLOG_FPI
        0x00,                                           // xl_rmid 0: XLOG
        0x00, 0x00,                                     // padding
        0xb7, 0x7a, 0xa5, 0x22,                         // xl_crc
        0x00,                                           // block id 0
        0x10,                                           //   BKPBLOCK_HAS_IMAGE, main fork
        0x00, 0x00,                                     //   data_length 0
        0xbe, 0x01,                                     //   image length 446
        0xf8, 0x00,                                     //   hole_offset 248
        0x13,                                           //   bimg_info: HAS_HOLE | APPLY | COMPRESS_ZSTD
        0xd8, 0x0f,                                     //   hole_length 4056
        0x7f, 0x06, 0x00, 0x00,                         //   spcOid 1663
        0x05, 0x00, 0x00, 0x00,                         //   dbOid 5
        0x01, 0x40, 0x00, 0x00,                         //   relNumber 16385
        0x00, 0x00, 0x00, 0x00,                         //   block 0
        0x28, 0xb5, 0x2f, 0xfd,                         // image: a zstd frame (446 bytes)
    ];
    let record = &fixture()[0x717B30 - START as usize..][..497];
    assert_eq!(&record[..headers.len()], headers);
    let (records, _) = decode_lone_record(record);
    let image = records[0].blocks[0].image.unwrap();
    assert_eq!(
        image,
        BlockImage {
            len: 446,
            hole_offset: 248,
            hole_length: 4056,
            apply: true,
            compression: Some(ImageCompression::Zstd)
        }
    );
    assert_eq!(records[0].image_len(), 446);
}

/// What decoding the first `n` bytes of the fixture must give: the records that end
/// within them (`count` of them, the last being `last`), then the end of the input (or,
/// past the real end, the end of WAL).
fn check_truncated(n: usize, count: usize, last: Option<&DecodedRecord>, end: &WalEnd) {
    let (all, real_end) = fixture_records();
    let input_end = Lsn(START + n as u64);
    let expected = all.partition_point(|r| r.end_lsn <= input_end);
    assert_eq!(count, expected, "records from {n} bytes");
    assert_eq!(
        last,
        expected.checked_sub(1).map(|i| &all[i]),
        "last record from {n} bytes"
    );
    if input_end.0 >= real_end.lsn.0 + 4 {
        assert_eq!(end, real_end, "{n} bytes");
        return;
    }
    let next = last.map(|r| r.next_lsn).unwrap_or(Lsn(START + 40));
    match end.reason {
        EndReason::InputExhausted => assert!(end.lsn <= next, "{n} bytes: {end:?}"),
        EndReason::IncompleteRecord => assert_eq!(end.lsn, next, "{n} bytes"),
        EndReason::EndOfWal(_) => panic!("{n} bytes: {end:?}"),
    }
}

#[test]
fn truncation_at_every_length_is_an_incomplete_input_never_an_error() {
    // Byte by byte through the decoder, and at every length a copy finishes there: the
    // same as decoding every prefix, in linear time. Every length of the WAL (both
    // segments) and into the zeros after its end.
    let mut decoder = WalDecoder::new(Lsn(START)).unwrap();
    let mut records = Vec::new();
    let drain = |decoder: &mut WalDecoder, records: &mut Vec<DecodedRecord>| loop {
        match decoder.next_record().unwrap() {
            Next::Record(r) => records.push(r),
            Next::NeedInput => return None,
            Next::End(end) => return Some(end),
        }
    };
    // The decoder waits for the page after the zeros before it calls them the end.
    let evidence_page = 0x17A000;
    for n in 0..evidence_page + 64 {
        let mut finished = decoder.clone();
        let mut more = Vec::new();
        finished.finish();
        let end = drain(&mut finished, &mut more).expect("an end after finish()");
        let last = more.last().or(records.last());
        check_truncated(n, records.len() + more.len(), last, &end);
        decoder.feed(&fixture()[n..n + 1]);
        if let Some(end) = drain(&mut decoder, &mut records) {
            // Only once the zeros after the real end are in.
            assert_eq!(&end, &fixture_records().1);
            assert_eq!(n, evidence_page + 23);
            return;
        }
    }
    panic!("the zeros after the WAL did not end it");
}

#[test]
fn decode_segment_of_short_input() {
    for n in 0..24 {
        assert_eq!(
            decode_segment(&fixture()[..n]),
            Err(DecodeError::TooShort { len: n })
        );
    }
    for n in 24..40 {
        let got = decode_segment(&fixture()[..n]).unwrap();
        assert!(got.records.is_empty());
        assert_eq!(got.end.reason, EndReason::InputExhausted);
    }
}

#[test]
fn damage_mid_stream_is_corruption() {
    let (all, _) = fixture_records();
    // A record in the middle of the first segment, one byte of its payload flipped.
    let victim = &all[all.len() / 3];
    let mut bytes = fixture().to_vec();
    bytes[(victim.end_lsn.0 - START) as usize - 1] ^= 0x01;
    let err = decode_all(START, &[&bytes]).unwrap_err();
    assert!(err.is_corruption());
    match err {
        DecodeError::Corrupt {
            invalid:
                Invalid::Record {
                    lsn,
                    problem: RecordProblem::BadCrc { .. },
                },
            ..
        } => {
            assert_eq!(lsn, victim.lsn)
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn damaged_header_fields_mid_stream_are_corruption() {
    let (all, _) = fixture_records();
    let victim = &all[100];
    let at = (victim.lsn.0 - START) as usize;
    // xl_tot_len zeroed, too short, one longer; rmid out of range; prev-link and CRC off.
    type Damage = fn(&mut [u8]);
    let damage: [(&str, Damage); 6] = [
        ("zero length", |r| r[..4].fill(0)),
        ("short length", |r| {
            r[..4].copy_from_slice(&20u32.to_le_bytes())
        }),
        ("longer", |r| r[0] += 1),
        ("rmid", |r| r[17] = 99),
        ("prev-link", |r| r[9] ^= 0x11),
        ("crc", |r| r[21] ^= 0x11),
    ];
    for (what, damage) in damage {
        let mut bytes = fixture().to_vec();
        damage(&mut bytes[at..]);
        let offset = what;
        let err = decode_all(START, &[&bytes]).unwrap_err();
        assert!(
            matches!(err, DecodeError::Corrupt { invalid: Invalid::Record { lsn, .. }, .. } if lsn == victim.lsn),
            "offset {offset}: {err:?}"
        );
    }
}

#[test]
fn zeroed_tail_is_end_of_wal() {
    let (all, _) = fixture_records();
    let cut = &all[200];
    let mut bytes = fixture().to_vec();
    bytes[(cut.lsn.0 - START) as usize..].fill(0);
    let (records, end) = decode_all(START, &[&bytes]).unwrap();
    assert_eq!(records, all[..200]);
    assert_eq!(end.lsn, cut.lsn);
    assert!(matches!(
        end.reason,
        EndReason::EndOfWal(Invalid::Record {
            problem: RecordProblem::ZeroLength,
            ..
        })
    ));
}

#[test]
fn torn_last_record_is_end_of_wal() {
    let (all, _) = fixture_records();
    let last = all.last().unwrap();
    let mut bytes = fixture().to_vec();
    bytes[(last.end_lsn.0 - START) as usize - 2] ^= 0xFF;
    let (records, end) = decode_all(START, &[&bytes]).unwrap();
    assert_eq!(records, all[..all.len() - 1]);
    assert_eq!(end.lsn, last.lsn);
    assert!(matches!(
        end.reason,
        EndReason::EndOfWal(Invalid::Record {
            problem: RecordProblem::BadCrc { .. },
            ..
        })
    ));
}

#[test]
fn recycled_pages_are_end_of_wal() {
    // From page 40 of the second segment on, the pages are those of the first segment:
    // what a recycled segment holds beyond the WAL written into it.
    let (all, _) = fixture_records();
    let page = SEGMENT + 40 * 8192;
    let mut bytes = fixture().to_vec();
    let (first, second) = bytes.split_at_mut(SEGMENT);
    second[40 * 8192..].copy_from_slice(&first[40 * 8192..]);
    let (records, end) = decode_all(START, &[&bytes]).unwrap();
    let page_lsn = Lsn(START + page as u64);
    match end.reason {
        EndReason::EndOfWal(Invalid::Page {
            page,
            problem: PageProblem::WrongAddress { .. },
        }) => {
            assert_eq!(page, page_lsn)
        }
        other => panic!("{other:?}"),
    }
    // Every record that ends before the stale page, and nothing else.
    assert!(records.iter().all(|r| r.end_lsn <= page_lsn));
    assert_eq!(
        records.len(),
        all.iter().filter(|r| r.end_lsn <= page_lsn).count()
    );
    assert!(end.lsn <= page_lsn);
}

#[test]
fn a_stale_segment_is_end_of_wal() {
    // The first segment fed where the second belongs: every page has the wrong address.
    let (records, end) = decode_all(START + SEGMENT as u64, &[&fixture()[..SEGMENT]]).unwrap();
    assert!(records.is_empty());
    assert!(matches!(
        end.reason,
        EndReason::EndOfWal(Invalid::Page {
            problem: PageProblem::WrongAddress { .. },
            ..
        })
    ));
}

#[test]
fn not_wal() {
    assert!(matches!(
        decode_segment(&[0x42; 8192]),
        Err(DecodeError::BadFirstPage {
            problem: PageProblem::BadMagic { found: 0x4242, .. },
            ..
        })
    ));
    let zeros = decode_segment(&vec![0; SEGMENT]).unwrap();
    assert!(zeros.records.is_empty());
    assert!(matches!(
        zeros.end.reason,
        EndReason::EndOfWal(Invalid::Page {
            problem: PageProblem::Zeroed,
            ..
        })
    ));
    assert!(matches!(
        WalDecoder::new(Lsn(u64::MAX - 5)),
        Err(DecodeError::BadStart { .. })
    ));
    let g = WalGeometry::new(1 << 20, 8192).unwrap();
    assert!(matches!(
        WalDecoder::with_geometry(Lsn(100), g),
        Err(DecodeError::BadStart { .. })
    ));
}

#[test]
fn starting_mid_segment_with_the_geometry() {
    let (all, _) = fixture_records();
    let g = WalGeometry::new(1 << 20, 8192).unwrap();
    let from = 33 * 8192;
    let mut decoder = WalDecoder::with_geometry(Lsn(START + from as u64), g).unwrap();
    decoder.feed(&fixture()[from..]);
    decoder.finish();
    let mut records = Vec::new();
    while let Next::Record(r) = decoder.next_record().unwrap() {
        records.push(r);
    }
    let expected: Vec<_> = all
        .iter()
        .filter(|r| r.lsn.0 >= START + from as u64)
        .cloned()
        .collect();
    assert_eq!(records, expected);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn chunking_does_not_matter(cuts in proptest::collection::vec(0usize..2 * SEGMENT, 0..40)) {
        let mut cuts = cuts;
        cuts.sort_unstable();
        let mut chunks = Vec::new();
        let mut at = 0;
        for c in cuts {
            chunks.push(&fixture()[at..c]);
            at = c;
        }
        chunks.push(&fixture()[at..]);
        let decoded = decode_all(START, &chunks).unwrap();
        prop_assert_eq!(&decoded, fixture_records());
    }

    #[test]
    fn truncation_anywhere(n in 0usize..2 * SEGMENT) {
        let (records, end) = decode_all(START, &[&fixture()[..n]]).unwrap();
        check_truncated(n, records.len(), records.last(), &end);
        prop_assert_eq!(&records[..], &fixture_records().0[..records.len()]);
    }

    #[test]
    fn damage_never_panics_and_spares_what_comes_before(
        damage in proptest::collection::vec((0usize..0x1785F8 + 8192, any::<u8>(), 1usize..64), 1..6),
        cut in proptest::option::of(0usize..2 * SEGMENT),
    ) {
        let mut bytes = fixture().to_vec();
        for &(at, value, len) in &damage {
            let end = (at + len).min(bytes.len());
            for b in &mut bytes[at..end] {
                *b ^= value | 1;
            }
        }
        if let Some(cut) = cut {
            bytes.truncate(cut);
        }
        let first_damage = damage.iter().map(|d| d.0).min().unwrap_or(0).min(cut.unwrap_or(usize::MAX));
        let untouched = Lsn(START + first_damage as u64);
        let (all, _) = fixture_records();
        let mut decoder = WalDecoder::new(Lsn(START)).unwrap();
        decoder.feed(&bytes);
        decoder.finish();
        let mut records = Vec::new();
        let outcome = loop {
            match decoder.next_record() {
                Ok(Next::Record(r)) => records.push(r),
                Ok(Next::NeedInput) => prop_assert!(false, "NeedInput after finish()"),
                Ok(Next::End(end)) => break Ok(end),
                Err(e) => break Err(e),
            }
        };
        // Asked again, the same answer.
        prop_assert_eq!(decoder.next_record().map(|n| match n { Next::End(e) => Some(e), _ => None }).ok().flatten(), outcome.ok());
        let intact: Vec<&DecodedRecord> = all.iter().filter(|r| r.end_lsn <= untouched).collect();
        prop_assert!(records.len() >= intact.len(), "{} records, {} before the damage", records.len(), intact.len());
        for (a, b) in records.iter().zip(intact) {
            prop_assert_eq!(a, b);
        }
        // And one at a time, fed a byte-range at a time, the same outcome.
        let mut chunked = WalDecoder::new(Lsn(START)).unwrap();
        let mut chunked_records = Vec::new();
        let mut chunk_outcome = None;
        'feed: for chunk in bytes.chunks(8000) {
            chunked.feed(chunk);
            loop {
                match chunked.next_record() {
                    Ok(Next::Record(r)) => chunked_records.push(r),
                    Ok(Next::NeedInput) => break,
                    Ok(Next::End(e)) => { chunk_outcome = Some(Ok(e)); break 'feed; }
                    Err(e) => { chunk_outcome = Some(Err(e)); break 'feed; }
                }
            }
        }
        if chunk_outcome.is_none() {
            chunked.finish();
            loop {
                match chunked.next_record() {
                    Ok(Next::Record(r)) => chunked_records.push(r),
                    Ok(Next::NeedInput) => prop_assert!(false, "NeedInput after finish()"),
                    Ok(Next::End(e)) => { chunk_outcome = Some(Ok(e)); break; }
                    Err(e) => { chunk_outcome = Some(Err(e)); break; }
                }
            }
        }
        prop_assert_eq!(chunked_records, records);
        prop_assert_eq!(chunk_outcome, Some(outcome));
    }

    #[test]
    fn any_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..20_000), start in any::<u64>()) {
        let _ = decode_segment(&bytes);
        if let Ok(mut decoder) = WalDecoder::new(Lsn(start & !0xFFFFF)) {
            decoder.feed(&bytes);
            decoder.finish();
            for _ in 0..10_000 {
                match decoder.next_record() {
                    Ok(Next::Record(_)) => {}
                    _ => break,
                }
            }
        }
    }
}
