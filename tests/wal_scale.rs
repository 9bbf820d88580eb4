//! The archive at the scale of a large cluster: listings larger than a frame, and a
//! retention run that expires more than 50 000 WAL files. Segments are synthesized (1 MiB,
//! as `initdb --wal-segsize=1` makes them, zero-filled after their header) and pushed
//! through a real archived over QUIC many at a time: PostgreSQL's archiver pushes one
//! file at a time and would take far too long. The archive lives in /dev/shm, so the
//! test measures archived, not the disk's fsyncs.

use std::sync::Arc;

use bytes::Bytes;
use walvault_protocol::core::pg::wal::{Lsn, SegmentName, TimelineId};
use walvault_protocol::core::wire::MAX_FRAME_LEN;
use walvault_protocol::net::client::{ArchiveClient, WalBinding};
use walvault_protocol::net::config::ClientConfig;
use walvault_tests::serde_json::{json, Value};
use walvault_tests::{fast_tmp, synthetic_segment, Archive, SegmentFill};

use crate::backup_promises::{self, manifest, put_manifest};

const SEG: u32 = 1 << 20;
const SYSID: u64 = 7_123_456_789_012_345_678;
/// Pushes in flight at once.
const IN_FLIGHT: usize = 32;

fn seg(segno: u64) -> SegmentName {
    SegmentName::containing(TimelineId(1), Lsn(segno * SEG as u64), SEG)
}

/// A file to push: its name and raw bytes.
enum File {
    Segment(u64),
    BackupHistory(u64),
}

impl File {
    fn name(&self) -> String {
        match self {
            File::Segment(n) => seg(*n).to_string(),
            File::BackupHistory(n) => format!("{}.00000028.backup", seg(*n)),
        }
    }

    fn raw(&self) -> Vec<u8> {
        match self {
            File::Segment(n) => synthetic_segment(SEG as usize, 1, *n, SYSID, SegmentFill::Zero),
            File::BackupHistory(n) => {
                let start = seg(*n).start_lsn(SEG).0 + 0x28;
                format!(
                    "START WAL LOCATION: {:X}/{:X} (file {})\nLABEL: scale\n",
                    start >> 32,
                    start as u32,
                    seg(*n)
                )
                .into_bytes()
            }
        }
    }
}

/// Pushes `files` with `IN_FLIGHT` pushes at a time, each compressed and hashed on the
/// runtime's worker threads.
async fn push_all(client: &ArchiveClient, files: Vec<File>) {
    let limit = Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
    let mut tasks = tokio::task::JoinSet::new();
    for f in files {
        let permit = limit.clone().acquire_owned().await.unwrap();
        let client = client.clone();
        tasks.spawn(async move {
            let (name, raw) = (f.name(), f.raw());
            let hash = blake3::hash(&raw).to_hex().to_string();
            let body = Bytes::from(zstd::bulk::compress(&raw, 1).unwrap());
            let stream = futures::stream::iter([Ok::<_, std::io::Error>(body)]);
            let stored = client.put_wal(&name, raw.len() as u64, &hash, stream).await;
            drop(permit);
            stored.unwrap_or_else(|e| panic!("push of {name}: {e}"));
        });
        while let Some(done) = tasks.try_join_next() {
            done.unwrap();
        }
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
}

async fn pusher(archive: &Archive) -> ArchiveClient {
    walvault_protocol::net::transport::install_crypto_provider();
    let cfg = ClientConfig::load(&archive.issue("main", "push")).unwrap();
    ArchiveClient::connect(&cfg).await.unwrap()
}

fn names(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a list: {v}"))
        .iter()
        .map(|n| n.as_str().unwrap().to_string())
        .collect()
}

/// Before: `archived wal list` failed with `TooLarge` ("the answer is too large to
/// send") as soon as the listing passed 1 MiB; now it arrives whole, in pages, gaps that
/// span a page boundary included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wal_listing_larger_than_a_frame_arrives_whole_in_pages() {
    let archive = Archive::start_in("main", &fast_tmp());
    let client = pusher(&archive).await;
    // Every other segment of 2..=8002 (4000 gaps of one segment, 56 bytes each in the
    // listing) among 24 000 backup history files of segments 1..=24 000 (43 bytes each):
    // > 1 MiB, and pages (2048 files) that end on a segment or on a backup history file,
    // with a gap across most boundaries.
    let segments: Vec<u64> = (1..=4001).map(|i| 2 * i).collect();
    let histories: Vec<u64> = (1..=24_000).collect();
    let mut files: Vec<File> = segments.iter().map(|&n| File::Segment(n)).collect();
    files.extend(histories.iter().map(|&n| File::BackupHistory(n)));
    push_all(&client, files).await;

    let listing = archive.wal_list_json("main");
    let text = listing.to_string();
    assert!(
        text.len() > MAX_FRAME_LEN as usize,
        "the listing ({} bytes) does not need paging",
        text.len()
    );
    let timelines = listing["timelines"].as_array().unwrap();
    assert_eq!(timelines.len(), 1, "{}", &text[..2000]);
    let t = &timelines[0];
    assert_eq!(t["segments"], segments.len() as u64);
    assert_eq!(t["first"], seg(2).to_string());
    assert_eq!(t["last"], seg(8002).to_string());
    assert_eq!(t["raw_bytes"], segments.len() as u64 * SEG as u64);
    let gaps: Vec<Value> = segments
        .windows(2)
        .map(|w| json!([seg(w[0] + 1).to_string(), seg(w[1] - 1).to_string()]))
        .collect();
    assert!(
        t["gaps"] == Value::Array(gaps),
        "gaps differ: {}",
        t["gaps"]
    );
    assert_eq!(names(&t["partials"]), Vec::<String>::new());
    let expected: Vec<String> = histories
        .iter()
        .map(|&n| File::BackupHistory(n).name())
        .collect();
    assert!(
        names(&listing["backup_history_files"]) == expected,
        "backup history files differ"
    );
    assert_eq!(names(&listing["history_files"]), Vec::<String>::new());
    // The binding alone takes one page.
    assert_eq!(
        client.binding().await.unwrap(),
        Some(WalBinding {
            system_identifier: SYSID,
            segment_size: SEG
        })
    );
    client.close().await;
}

/// The first retention run on a large archive: more than 50 000 WAL files before the
/// only backup. The run answers (its report counts per timeline, with the first and
/// last names, instead of listing every file), the WAL before the backup is gone from
/// the listing and from the store, and the listing shows exactly what was kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retention_run_that_expires_over_50000_wal_files_answers() {
    const EXPIRED: u64 = 50_001;
    let archive = Archive::start_in("main", &fast_tmp());
    let client = pusher(&archive).await;
    // Segments 1..=50 001 are before the backup, which starts and stops in segment
    // 50 002; 50 002..=50 005 are kept.
    let backup_seg = EXPIRED + 1;
    let last = EXPIRED + 4;
    push_all(&client, (1..=last).map(File::Segment).collect()).await;
    client.close().await;

    let start = seg(backup_seg).start_lsn(SEG).0 + 0x28;
    let lsn = |l: u64| format!("{:X}/{:X}", l >> 32, l as u32);
    let mut m = manifest("20260102T000000000Z", Vec::new());
    m.system_identifier = SYSID;
    m.start_lsn = lsn(start);
    m.stop_lsn = lsn(start + 0x100);
    let conn = backup_promises::connect(&archive, "main", "push").await;
    let stored = put_manifest(&conn, &m).await;
    assert!(
        matches!(
            stored,
            walvault_protocol::core::wire::Response::Stored { .. }
        ),
        "{stored:?}"
    );
    conn.close().await;

    let out = archive.admin(&[
        "retention",
        "run",
        "--cluster",
        "main",
        "--keep-full",
        "1",
        "--json",
    ]);
    let report: Value = walvault_tests::serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}):\n{}", out.describe()));
    let c = &report["clusters"][0];
    assert_eq!(c["kept_backups"], json!([m.id]), "{report:#}");
    assert_eq!(c["expired_backups"], json!([]), "{report:#}");
    assert_eq!(c["expired_wal_files"], EXPIRED, "{report:#}");
    let expired = c["expired_wal"].as_array().unwrap();
    assert_eq!(expired.len(), 1, "{report:#}");
    assert_eq!(expired[0]["timeline"], 1);
    assert_eq!(expired[0]["files"], EXPIRED);
    assert_eq!(expired[0]["first"], seg(1).to_string());
    assert_eq!(expired[0]["last"], seg(EXPIRED).to_string());

    let listing = archive.wal_list_json("main");
    let timelines = listing["timelines"].as_array().unwrap();
    assert_eq!(timelines.len(), 1, "{listing:#}");
    let t = &timelines[0];
    assert_eq!(t["segments"], last - EXPIRED, "{listing:#}");
    assert_eq!(t["first"], seg(backup_seg).to_string(), "{listing:#}");
    assert_eq!(t["last"], seg(last).to_string(), "{listing:#}");
    assert_eq!(t["gaps"], json!([]), "{listing:#}");
    assert_eq!(listing["backup_history_files"], json!([]), "{listing:#}");
    let mut stored: Vec<String> =
        std::fs::read_dir(archive.data_dir().join("store/main/wal/00000001"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
    stored.sort();
    let kept: Vec<String> = (backup_seg..=last)
        .map(|n| format!("{}.zst", seg(n)))
        .collect();
    assert_eq!(stored, kept, "the store holds other WAL than the listing");
}
