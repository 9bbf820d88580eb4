//! The handlers driven in memory: an object_store `InMemory` backend (or a temporary
//! directory), a sled catalog in a temporary directory, bodies from byte slices; no
//! network.

use std::sync::Arc;

use futures::StreamExt;
use walvault_protocol::core::wire::{ErrorCode, Response};
use walvault_protocol::net::pki::{ClientIdentity, Role};

use super::backups::{self, ManifestUpload, MAX_BACKUP_LABEL_LEN};
use super::budget::Budget;
use super::wal::{self, WalUpload};
use super::{Archive, Refusal};
use crate::config::RetentionConfig;
use crate::index::Index;
use crate::store::{layout, RemoteStore, Store};

pub(crate) const SEG: u32 = 1 << 20;
pub(crate) const SYSID: u64 = 7_000_000_000_000_000_001;

/// An archive over an in-memory store.
pub(crate) struct TestArchive {
    _dir: tempfile::TempDir,
    pub(crate) archive: Archive,
    pub(crate) memory: Arc<dyn object_store::ObjectStore>,
}

impl TestArchive {
    pub(crate) fn new() -> TestArchive {
        let dir = tempfile::tempdir().unwrap();
        let memory: Arc<dyn object_store::ObjectStore> =
            Arc::new(object_store::memory::InMemory::new());
        let spool = dir.path().join("spool");
        std::fs::create_dir_all(&spool).unwrap();
        let store = Store::Remote(RemoteStore::with_backend(
            memory.clone(),
            "memory:///",
            &spool,
        ));
        let index = Index::open(&dir.path().join("catalog")).unwrap();
        let stream_dir = dir.path().join("stream");
        TestArchive {
            _dir: dir,
            archive: Archive::new(
                store,
                index,
                RetentionConfig::default(),
                Budget::new(1024),
                crate::service::stream::Streams::new(stream_dir, std::time::Duration::from_secs(2)),
            ),
            memory,
        }
    }
}

pub(crate) fn identity(role: Role) -> ClientIdentity {
    ClientIdentity {
        cluster: "main".into(),
        role,
        serial: format!("{role}-SERIAL"),
    }
}

/// A 1 MiB segment `0000000100000000000000<seg>` of system `sysid`, filled with `fill`.
pub(crate) fn segment(seg: u32, sysid: u64, fill: u8) -> (String, Vec<u8>) {
    let mut raw = vec![fill; SEG as usize];
    raw[..40].fill(0);
    raw[0..2].copy_from_slice(&0xD110u16.to_le_bytes());
    raw[2..4].copy_from_slice(&0x0002u16.to_le_bytes());
    raw[4..8].copy_from_slice(&1u32.to_le_bytes());
    raw[8..16].copy_from_slice(&(seg as u64 * SEG as u64).to_le_bytes());
    raw[24..32].copy_from_slice(&sysid.to_le_bytes());
    raw[32..36].copy_from_slice(&SEG.to_le_bytes());
    raw[36..40].copy_from_slice(&8192u32.to_le_bytes());
    (format!("00000001000000000000{seg:04X}"), raw)
}

/// What a client sends for `raw`: its zstd frame and blake3.
pub(crate) fn body(raw: &[u8]) -> (Vec<u8>, String) {
    (
        zstd::bulk::compress(raw, 1).unwrap(),
        blake3::hash(raw).to_hex().to_string(),
    )
}

pub(crate) async fn push(t: &TestArchive, name: &str, raw: &[u8]) -> Result<Response, Refusal> {
    let id = identity(Role::Push);
    let ctx = t.archive.ctx(&id);
    let (frame, hash) = body(raw);
    let upload = WalUpload {
        cluster: "main",
        name,
        raw_size: raw.len() as u64,
        blake3: &hash,
        request: Some("0123456789abcdef"),
        via: None,
    };
    wal::ingest(&ctx, &upload, &mut &frame[..]).await
}

async fn fetch(t: &TestArchive, name: &str) -> Result<Vec<u8>, Refusal> {
    let id = identity(Role::Pull);
    let ctx = t.archive.ctx(&id);
    let answer = wal::get(&ctx, "main", name).await?;
    let Response::Object { raw_size, .. } = answer.response else {
        panic!("GetWal answered {:?}", answer.response);
    };
    let frame: Vec<u8> = answer.body.map(|c| c.unwrap().to_vec()).concat().await;
    let raw = zstd::bulk::decompress(&frame, raw_size as usize).unwrap();
    Ok(raw)
}

#[tokio::test]
async fn wal_put_then_get_returns_the_bytes_and_binds_the_cluster() {
    let t = TestArchive::new();
    let (name, raw) = segment(1, SYSID, 0x5a);
    let stored = push(&t, &name, &raw).await.unwrap();
    assert_eq!(
        stored,
        Response::Stored {
            already_present: false
        }
    );
    assert_eq!(fetch(&t, &name).await.unwrap(), raw);
    let binding = t.archive.index.binding("main").unwrap().unwrap();
    assert_eq!(binding.system_identifier, SYSID);
    assert_eq!(binding.wal_segment_size, SEG);
    let keys: Vec<String> = t
        .memory
        .list(None)
        .map(|m| m.unwrap().location.to_string())
        .collect()
        .await;
    assert_eq!(
        keys,
        vec![
            layout::cluster_key("main"),
            layout::wal_key("main", &name.parse().unwrap())
        ]
    );
    let missing = fetch(&t, &segment(2, SYSID, 0).0).await.unwrap_err();
    assert_eq!(missing.code, ErrorCode::NotFound);
}

#[tokio::test]
async fn identical_repush_is_acknowledged_and_a_different_one_is_a_conflict() {
    let t = TestArchive::new();
    let (name, raw) = segment(3, SYSID, 1);
    push(&t, &name, &raw).await.unwrap();
    assert_eq!(
        push(&t, &name, &raw).await.unwrap(),
        Response::Stored {
            already_present: true
        }
    );
    let (_, other) = segment(3, SYSID, 2);
    let conflict = push(&t, &name, &other).await.unwrap_err();
    assert_eq!(conflict.code, ErrorCode::Conflict, "{}", conflict.message);
    assert_eq!(fetch(&t, &name).await.unwrap(), raw, "the original changed");
}

#[tokio::test]
async fn wal_of_another_system_and_a_lying_body_are_refused_and_store_nothing() {
    let t = TestArchive::new();
    let (first, raw) = segment(1, SYSID, 1);
    push(&t, &first, &raw).await.unwrap();
    let (name, foreign) = segment(2, SYSID + 1, 1);
    let refused = push(&t, &name, &foreign).await.unwrap_err();
    assert_eq!(refused.code, ErrorCode::WrongCluster, "{}", refused.message);
    // A body that is not what the frame announced.
    let id = identity(Role::Push);
    let ctx = t.archive.ctx(&id);
    let (frame, _) = body(&raw);
    let upload = WalUpload {
        cluster: "main",
        name: &name,
        raw_size: raw.len() as u64,
        blake3: &"00".repeat(32),
        request: None,
        via: None,
    };
    let refused = wal::ingest(&ctx, &upload, &mut &frame[..])
        .await
        .unwrap_err();
    assert_eq!(refused.code, ErrorCode::Invalid, "{}", refused.message);
    // A pull certificate may not write.
    let pull = identity(Role::Pull);
    let (frame, hash) = body(&raw);
    let upload = WalUpload {
        blake3: &hash,
        ..upload
    };
    let refused = wal::ingest(&t.archive.ctx(&pull), &upload, &mut &frame[..])
        .await
        .unwrap_err();
    assert_eq!(refused.code, ErrorCode::Unauthorized);
    assert!(t
        .archive
        .index
        .wal("main", &name.parse().unwrap())
        .unwrap()
        .is_none());
    assert_eq!(
        fetch(&t, &name).await.unwrap_err().code,
        ErrorCode::NotFound
    );
}

/// A backup without files labelled `label`, offered as `PutBackup` by a push client.
async fn put_labelled_backup(
    t: &TestArchive,
    id: &str,
    label: String,
) -> Result<Response, Refusal> {
    use walvault_protocol::core::format::manifest::{
        BackupManifest, BackupStats, BACKUP_CHUNK_SIZE, MANIFEST_FORMAT,
    };
    let manifest = BackupManifest {
        format: MANIFEST_FORMAT,
        id: id.into(),
        cluster: "main".into(),
        label,
        system_identifier: SYSID,
        pg_version: 150000,
        timeline: 1,
        stop_timeline: 1,
        start_lsn: "0/2000028".into(),
        stop_lsn: "0/2000100".into(),
        start_time: 0,
        stop_time: 0,
        chunk_size: BACKUP_CHUNK_SIZE,
        tablespaces: Vec::new(),
        files: Vec::new(),
        backup_label: String::new(),
        pg_backup_manifest: String::new(),
        stats: BackupStats::default(),
    };
    let raw = serde_json::to_vec(&manifest).unwrap();
    let (frame, hash) = body(&raw);
    let id_push = identity(Role::Push);
    let upload = ManifestUpload {
        cluster: "main",
        backup_id: id,
        raw_size: raw.len() as u64,
        blake3: &hash,
        lease: None,
    };
    backups::put_backup(&t.archive.ctx(&id_push), &upload, &mut &frame[..]).await
}

#[tokio::test]
async fn a_backup_label_longer_than_1024_bytes_is_refused_and_nothing_is_stored() {
    let t = TestArchive::new();
    let refused = put_labelled_backup(
        &t,
        "20261202T100000000Z",
        "x".repeat(MAX_BACKUP_LABEL_LEN + 1),
    )
    .await
    .unwrap_err();
    assert_eq!(refused.code, ErrorCode::Invalid, "{}", refused.message);
    assert!(
        refused.message.contains("label of 1025 bytes") && refused.message.contains("1024"),
        "{}",
        refused.message
    );
    assert!(t.archive.index.backups("main").unwrap().is_empty());
    let keys: Vec<_> = t.memory.list(None).collect().await;
    assert!(keys.is_empty(), "a refused backup left {keys:?}");
    // At the limit (and PostgreSQL's): accepted.
    let stored = put_labelled_backup(
        &t,
        "20261202T100001000Z",
        "é".repeat(MAX_BACKUP_LABEL_LEN / 2),
    )
    .await
    .unwrap();
    assert_eq!(
        stored,
        Response::Stored {
            already_present: false
        }
    );
}

/// A page of the WAL listing is a range scan from its cursor within the cluster (never
/// another cluster's keys, whose names share a prefix), and the pages of any size merge
/// into the listing of one page, gaps across page boundaries included.
#[tokio::test]
async fn wal_listing_pages_stay_in_their_cluster_and_merge_into_the_whole_listing() {
    use crate::index::wal::WalEntry;
    use walvault_protocol::core::pg::wal::WalFileName;
    use walvault_protocol::core::wire::paging::merge_wal_pages;

    let t = TestArchive::new();
    let index = &t.archive.index;
    let entry = WalEntry {
        raw_size: 100,
        blake3: "00".repeat(32),
        stored_size: 40,
    };
    let names = [
        "00000001.history",
        "000000010000000000000001",
        "000000010000000000000001.00000028.backup",
        "000000010000000000000002",
        "000000010000000000000005",
        "000000010000000000000005.partial",
        "00000002.history",
        "0000000200000000000000FF",
        "000000020000000100000001",
        "000000020000000100000001.00000060.backup",
        "000000020000000100000004",
    ];
    for cluster in ["main", "main-a", "main0", "mai"] {
        for n in &names[..if cluster == "main" { names.len() } else { 2 }] {
            let name: WalFileName = n.parse().unwrap();
            index.put_wal(cluster, &name, &entry).await.unwrap();
        }
    }
    let whole = index.listing_page("main", None, 1000).unwrap();
    assert_eq!(whole.next, None);
    assert_eq!(whole.timelines.len(), 2, "{whole:#?}");
    assert_eq!(whole.timelines[0].segments, 3);
    assert_eq!(whole.timelines[1].gaps.len(), 2, "{whole:#?}");
    for per_page in 1..=names.len() {
        let mut pages = Vec::new();
        let mut after: Option<WalFileName> = None;
        loop {
            let page = index
                .listing_page("main", after.as_ref(), per_page)
                .unwrap();
            let files = page.history_files.len()
                + page.backup_history_files.len()
                + page
                    .timelines
                    .iter()
                    .map(|t| t.segments as usize + t.partials.len())
                    .sum::<usize>();
            assert!(files <= per_page, "{page:#?}");
            after = page.next.as_ref().map(|n| n.parse().unwrap());
            pages.push(page);
            if after.is_none() {
                break;
            }
        }
        assert_eq!(pages.len(), names.len().div_ceil(per_page));
        assert_eq!(merge_wal_pages(pages), whole, "pages of {per_page}");
    }
}

/// A page of the backup listing ends at its count, or once its JSON passes the byte
/// bound; the pages together are the whole listing, in order.
#[tokio::test]
async fn backup_listing_pages_end_at_their_count_or_byte_bound() {
    use crate::index::state::{backups_page, list_backups};

    let t = TestArchive::new();
    let (store, index) = (&t.archive.store, &t.archive.index);
    for i in 0..7 {
        index
            .put_backup(
                "main",
                &backup_record(
                    format!("20260101T00000{i}000Z"),
                    "x".repeat(100 * i),
                    "0/2000028",
                    "0/2000100",
                ),
            )
            .unwrap();
    }
    let whole = list_backups(store, index, "main").await.unwrap();
    assert_eq!(whole.len(), 7);
    for (limit, max_bytes, expect_pages) in [(3, usize::MAX, 3), (7, usize::MAX, 1), (100, 1, 7)] {
        let (mut all, mut after, mut pages) = (Vec::new(), None, 0);
        loop {
            let (page, next) =
                backups_page(store, index, "main", after.as_deref(), limit, max_bytes)
                    .await
                    .unwrap();
            assert!(!page.is_empty() && page.len() <= limit);
            all.extend(page);
            pages += 1;
            after = next;
            if after.is_none() {
                break;
            }
        }
        assert_eq!(pages, expect_pages, "limit {limit}, {max_bytes} bytes");
        assert_eq!(all, whole);
    }
}

/// `BackupState` answers what the listing says of one backup, without the others;
/// `NotFound` for an id the cluster lacks, `Invalid` for one that cannot be an id.
#[tokio::test]
async fn backup_state_answers_one_backup_as_the_listing_does() {
    use super::backups;
    use crate::index::state::list_backups;

    let t = TestArchive::new();
    let (store, index) = (&t.archive.store, &t.archive.index);
    let (name, raw) = segment(2, SYSID, 0);
    push(&t, &name, &raw).await.unwrap();
    for (i, start) in [(1, "0/200028"), (2, "0/300028")] {
        index
            .put_backup(
                "main",
                &backup_record(
                    format!("20260101T00000{i}000Z"),
                    String::new(),
                    start,
                    &start.replace("28", "80"),
                ),
            )
            .unwrap();
    }
    let listed = list_backups(store, index, "main").await.unwrap();
    assert_eq!(listed.len(), 2);
    let id = identity(Role::Pull);
    let ctx = t.archive.ctx(&id);
    for summary in &listed {
        assert_eq!(
            backups::state(&ctx, "main", &summary.record.id)
                .await
                .unwrap(),
            Response::Backup {
                backup: summary.clone()
            }
        );
    }
    // One usable (its segment is archived), one not: the state is each one's own.
    assert_ne!(listed[0].state, listed[1].state);
    let missing = backups::state(&ctx, "main", "20260101T000009000Z")
        .await
        .unwrap_err();
    assert_eq!(missing.code, ErrorCode::NotFound, "{}", missing.message);
    let bad = backups::state(&ctx, "main", "../x").await.unwrap_err();
    assert_eq!(bad.code, ErrorCode::Invalid);
}

/// A listing request without `paged` comes from a client before paging, which takes its
/// one answer for the whole listing: it gets the whole (more than a page of WAL files and
/// of backups here), never a first page it would mistake for everything. A paging
/// client gets pages.
#[tokio::test]
async fn a_client_before_paging_gets_the_whole_listing_not_a_first_page() {
    use crate::index::wal::WalEntry;
    use walvault_protocol::core::pg::wal::{Lsn, SegmentName, TimelineId, WalFileName};
    use walvault_protocol::core::wire::paging::{BACKUP_PAGE_ENTRIES, WAL_PAGE_FILES};

    let t = TestArchive::new();
    let index = &t.archive.index;
    let entry = WalEntry {
        raw_size: 16 << 20,
        blake3: "00".repeat(32),
        stored_size: 40,
    };
    let segments = WAL_PAGE_FILES as u64 + 10;
    for n in 1..=segments {
        let seg = SegmentName::containing(TimelineId(1), Lsn(n << 24), 16 << 20);
        let name: WalFileName = seg.to_string().parse().unwrap();
        index.put_wal("main", &name, &entry).await.unwrap();
    }
    let backups = BACKUP_PAGE_ENTRIES + 5;
    for i in 0..backups {
        let record = backup_record(
            format!(
                "20260101T{:02}{:02}{:02}000Z",
                i / 3600,
                i / 60 % 60,
                i % 60
            ),
            String::new(),
            "0/1000028",
            "0/1000100",
        );
        index.put_backup("main", &record).unwrap();
    }
    let id = identity(Role::Pull);
    let ctx = t.archive.ctx(&id);

    let Response::WalList(whole) = wal::list(&ctx, "main", None, false).await.unwrap() else {
        panic!("not a WAL listing");
    };
    assert_eq!(whole.next, None, "an old client cannot follow a cursor");
    assert_eq!(
        whole.timelines[0].segments, segments,
        "{:?}",
        whole.timelines
    );
    let Response::WalList(first) = wal::list(&ctx, "main", None, true).await.unwrap() else {
        panic!("not a WAL listing");
    };
    assert_eq!(first.timelines[0].segments, WAL_PAGE_FILES as u64);
    assert!(first.next.is_some());

    let Response::Backups { backups: all, next } =
        backups::list(&ctx, "main", None, false).await.unwrap()
    else {
        panic!("not a backup listing");
    };
    assert_eq!((all.len(), next), (backups, None));
    let Response::Backups {
        backups: page,
        next,
    } = backups::list(&ctx, "main", None, true).await.unwrap()
    else {
        panic!("not a backup listing");
    };
    assert_eq!(page.len(), BACKUP_PAGE_ENTRIES);
    assert!(next.is_some());
}

/// A catalog record of a backup of cluster main on timeline 1 (times 1 to 2), for the
/// listing tests.
fn backup_record(
    id: String,
    label: String,
    start_lsn: &str,
    stop_lsn: &str,
) -> walvault_protocol::core::wire::backup::BackupRecord {
    walvault_protocol::core::wire::backup::BackupRecord {
        id,
        label,
        timeline: 1,
        stop_timeline: 1,
        start_lsn: start_lsn.into(),
        stop_lsn: stop_lsn.into(),
        start_time: 1,
        stop_time: 2,
        pg_version: 150000,
        logical_bytes: 0,
        stored_bytes: 0,
        files: 0,
        chunks: 0,
    }
}

#[tokio::test]
async fn a_failed_retention_run_is_recorded_and_keeps_the_last_success() {
    let t = TestArchive::new();
    let index = &t.archive.index;
    assert!(index.retention_run("main").unwrap().is_none());
    let removed = crate::index::Removed {
        backups: 1,
        wal_files: 20,
        wal_bytes: 4 << 20,
        chunk_bytes: 0,
    };
    index
        .record_retention("main", 100, None, Some(removed.clone()))
        .await
        .unwrap();
    index
        .record_retention("main", 200, Some("store unreachable".into()), None)
        .await
        .unwrap();
    let r = index.retention_run("main").unwrap().unwrap();
    assert_eq!(
        (r.at, r.last_success, r.error.as_deref()),
        (200, Some(100), Some("store unreachable"))
    );
    assert_eq!(
        r.removed, removed,
        "a failed run keeps what the last success removed"
    );
    index
        .record_retention("main", 300, None, Some(Default::default()))
        .await
        .unwrap();
    let r = index.retention_run("main").unwrap().unwrap();
    assert_eq!((r.last_success, r.error), (Some(300), None));
    assert_eq!(r.removed, Default::default());
}

/// The steps of `file`'s history, in order.
fn steps(index: &Index, file: &str) -> Vec<&'static str> {
    index
        .audit_history("main", file)
        .unwrap()
        .iter()
        .map(|r| r.step.as_str())
        .collect()
}

#[tokio::test]
async fn the_audit_trail_survives_a_catalog_rebuilt_from_the_store_and_expires_with_its_files() {
    use walvault_protocol::core::wire::audit::{FetchPurpose, Step};
    let t = TestArchive::new();
    let index = &t.archive.index;
    let store = &t.archive.store;
    let (a, raw_a) = segment(1, SYSID, 1);
    let (b, raw_b) = segment(2, SYSID, 2);
    push(&t, &a, &raw_a).await.unwrap();
    push(&t, &b, &raw_b).await.unwrap();
    // Other bytes under a's name: refused, and recorded with why.
    let (_, other) = segment(1, SYSID, 9);
    let refused = push(&t, &a, &other).await.unwrap_err();
    assert_eq!(refused.code, ErrorCode::Conflict);
    let puller = identity(Role::Pull);
    let provenance = crate::service::audit::Provenance {
        request: Some("fedcba9876543210".into()),
        peer: puller.peer(),
    };
    crate::service::audit::sent(
        index,
        &provenance,
        &crate::service::audit::Sent {
            cluster: "main",
            name: &a,
            purpose: FetchPurpose::Prefetch,
            raw_size: raw_a.len() as u64,
            blake3: blake3::hash(&raw_a).to_hex().to_string(),
            partial_bytes: None,
            took: std::time::Duration::from_millis(3),
        },
    );
    let history = index.audit_history("main", &a).unwrap();
    assert_eq!(
        steps(index, &a),
        [
            "received",
            "stored",
            "acknowledged",
            "refused",
            "prefetched"
        ],
        "{history:#?}"
    );
    let stored = &history[1];
    assert_eq!(stored.peer.as_deref(), Some("push:main serial push-SERIAL"));
    assert_eq!(stored.request.as_deref(), Some("0123456789abcdef"));
    assert_eq!(stored.size, Some(raw_a.len() as u64));
    assert!(history[3].detail.as_deref().unwrap().contains("Conflict"));
    assert_eq!(
        history[4].peer.as_deref(),
        Some("pull:main serial pull-SERIAL")
    );
    let ids: Vec<&str> = history.iter().map(|r| r.id.as_str()).collect();
    let mut sorted = ids.clone();
    sorted.sort();
    assert_eq!(ids, sorted, "ids sort in recording order");

    // A verify run is a record of the cluster, in every file's story after it.
    let admin = identity(Role::Admin);
    let run = walvault_protocol::core::wire::admin::VerifyRun {
        finished_at: 1,
        scope: "wal".into(),
        wal_files: 2,
        ..Default::default()
    };
    super::record_verify(&t.archive.ctx(&admin), "main", &run)
        .await
        .unwrap();
    assert_eq!(steps(index, &b).last(), Some(&"verified"));

    // Into the store, then a new catalog from the store alone.
    let exported = crate::service::audit::export(store, index).await.unwrap();
    assert_eq!(
        exported, 9,
        "3 + 3 steps of two pushes, a refusal, a prefetch, a verify"
    );
    assert_eq!(index.audit_pending(), 0);
    assert_eq!(
        crate::service::audit::export(store, index).await.unwrap(),
        0
    );
    let batches = store.list("main/audit/").await.unwrap();
    assert_eq!(batches.len(), 1, "{batches:?}");
    let dir = tempfile::tempdir().unwrap();
    let rebuilt = Index::open(&dir.path().join("catalog")).unwrap();
    let summary = crate::index::rebuild::rebuild(&rebuilt, store)
        .await
        .unwrap();
    assert_eq!(summary.audit_records, 9);
    let before = index.audit_history("main", &a).unwrap();
    assert_eq!(before.len(), history.len() + 1, "and the verify run");
    assert_eq!(rebuilt.audit_history("main", &a).unwrap(), before);
    assert_eq!(
        rebuilt.audit_pending(),
        0,
        "what came from the store is not exported again"
    );
    let (page, next) = rebuilt.audit_since("main", 0, None, 4).unwrap();
    assert_eq!((page.len(), next.is_some()), (4, true));
    let (rest, next) = rebuilt
        .audit_since("main", 0, next.as_deref(), 100)
        .unwrap();
    assert_eq!((rest.len(), next), (5, None));

    // Retention expires a: its records become one summary; the batch stays while b's
    // records are in it.
    index.audit_expire("main", &a, "retention: test").unwrap();
    let expired = index.audit_history("main", &a).unwrap();
    assert_eq!(steps(index, &a), ["verified", "expired"], "{expired:#?}");
    let summary = expired[1].summary.as_ref().unwrap();
    assert_eq!(expired[1].step, Step::Expired);
    assert_eq!(summary.records, 5);
    assert_eq!(
        summary.stored_by.as_deref(),
        Some("push:main serial push-SERIAL")
    );
    assert_eq!((summary.prefetched, summary.refused), (1, 1));
    assert_eq!(
        crate::service::audit::prune(store, index, "main")
            .await
            .unwrap(),
        0
    );
    // b expires too: the first batch names only expired files and goes; the verify
    // record it held is written again, into a new batch.
    index.audit_expire("main", &b, "retention: test").unwrap();
    assert_eq!(
        crate::service::audit::prune(store, index, "main")
            .await
            .unwrap(),
        1
    );
    let left = store.list("main/audit/").await.unwrap();
    assert!(!left.contains(&batches[0]), "{left:?}");
    let dir = tempfile::tempdir().unwrap();
    let again = Index::open(&dir.path().join("catalog")).unwrap();
    crate::index::rebuild::rebuild(&again, store).await.unwrap();
    assert_eq!(steps(&again, &a), ["verified", "expired"]);
    assert_eq!(steps(&again, &b), ["verified", "expired"]);
    let (all, _) = again.audit_since("main", 0, None, 100).unwrap();
    assert!(
        all.iter().any(|r| r.step == Step::Verified),
        "the verify run outlives the pruned batch: {all:#?}"
    );
}

#[tokio::test]
async fn a_rebuild_lets_an_expiry_stand_for_the_records_of_a_batch_not_yet_pruned() {
    let t = TestArchive::new();
    let index = &t.archive.index;
    let store = &t.archive.store;
    let (a, raw_a) = segment(1, SYSID, 1);
    push(&t, &a, &raw_a).await.unwrap();
    crate::service::audit::export(store, index).await.unwrap();
    // Expired and exported, but the crash comes before pruning.
    index.audit_expire("main", &a, "retention: test").unwrap();
    crate::service::audit::export(store, index).await.unwrap();
    assert_eq!(store.list("main/audit/").await.unwrap().len(), 2);
    let dir = tempfile::tempdir().unwrap();
    let rebuilt = Index::open(&dir.path().join("catalog")).unwrap();
    crate::index::rebuild::rebuild(&rebuilt, store)
        .await
        .unwrap();
    assert_eq!(steps(&rebuilt, &a), ["expired"]);
    // Stored again after its expiry (as retention removes it: entry, then object):
    // the new records follow the summary.
    let name: walvault_protocol::core::pg::wal::WalFileName = a.parse().unwrap();
    index.remove_wal("main", &name).unwrap();
    store.delete(&layout::wal_key("main", &name)).await.unwrap();
    push(&t, &a, &raw_a).await.unwrap();
    assert_eq!(
        steps(index, &a),
        ["expired", "received", "stored", "acknowledged"]
    );
}

#[tokio::test]
async fn a_file_stored_just_before_the_catalog_was_lost_is_still_in_the_trail() {
    let t = TestArchive::new();
    let (a, raw_a) = segment(1, SYSID, 1);
    push(&t, &a, &raw_a).await.unwrap();
    // The catalog is lost before the trail's next export: a rebuild from the store alone.
    assert_eq!(t.archive.store.list("main/audit/").await.unwrap().len(), 0);
    let dir = tempfile::tempdir().unwrap();
    let rebuilt = Index::open(&dir.path().join("catalog")).unwrap();
    crate::index::rebuild::rebuild(&rebuilt, &t.archive.store)
        .await
        .unwrap();
    let history = rebuilt.audit_history("main", &a).unwrap();
    assert_eq!(steps(&rebuilt, &a), ["stored"], "{history:#?}");
    let r = &history[0];
    assert_eq!(r.size, Some(raw_a.len() as u64));
    assert_eq!(r.blake3, Some(blake3::hash(&raw_a).to_hex().to_string()));
    assert_eq!(r.peer, None);
    assert!(
        r.detail.as_deref().unwrap().contains("catalog rebuild"),
        "{r:#?}"
    );
    // Exported, it is what the next rebuild finds: no second one is made.
    crate::service::audit::export(&t.archive.store, &rebuilt)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let again = Index::open(&dir.path().join("catalog")).unwrap();
    crate::index::rebuild::rebuild(&again, &t.archive.store)
        .await
        .unwrap();
    assert_eq!(steps(&again, &a), ["stored"]);
}
