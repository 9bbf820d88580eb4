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
        TestArchive {
            _dir: dir,
            archive: Archive::new(store, index, RetentionConfig::default(), Budget::new(1024)),
            memory,
        }
    }
}

pub(crate) fn identity(role: Role) -> ClientIdentity {
    ClientIdentity {
        cluster: "main".into(),
        role,
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
