//! The promises of DESIGN.md for backup requests, tried with a raw client against a real
//! archived: lies about chunk contents, manifests naming chunks the archive lacks or
//! paths outside PGDATA, wrong roles and clusters. Each gets a clear error and changes
//! nothing.

use walvault_protocol::backup::{
    BackupManifest, BackupStats, FileEntry, FileKind, MANIFEST_FORMAT,
};
use walvault_protocol::config::ClientConfig;
use walvault_protocol::transport::{read_frame, ArchiveConnection};
use walvault_protocol::wire::{ErrorCode, Request, Response};
use walvault_tests::Archive;

fn b3(bytes: &[u8]) -> String {
    blake3::hash(bytes).to_hex().to_string()
}

async fn connect(archive: &Archive, cluster: &str, role: &str) -> ArchiveConnection {
    let cfg = ClientConfig::load(&archive.issue(cluster, role)).unwrap();
    ArchiveConnection::connect(&cfg).await.unwrap()
}

/// Sends `request` with `raw` zstd-compressed as its body.
async fn send(conn: &ArchiveConnection, request: Request, raw: &[u8]) -> Response {
    let (mut send, mut recv) = conn.open(&request).await.unwrap();
    let _ = send.write_all(&zstd::encode_all(raw, 1).unwrap()).await;
    let _ = send.finish();
    read_frame(&mut recv).await.unwrap()
}

async fn put_chunk(
    conn: &ArchiveConnection,
    cluster: &str,
    announced: &[u8],
    body: &[u8],
) -> Response {
    let request = Request::PutChunk {
        cluster: cluster.into(),
        blake3: b3(announced),
        raw_size: announced.len() as u64,
    };
    send(conn, request, body).await
}

async fn put_manifest(conn: &ArchiveConnection, m: &BackupManifest) -> Response {
    let raw = serde_json::to_vec(m).unwrap();
    let request = Request::PutBackup {
        cluster: m.cluster.clone(),
        backup_id: m.id.clone(),
        raw_size: raw.len() as u64,
        blake3: b3(&raw),
    };
    send(conn, request, &raw).await
}

fn code(r: Response) -> ErrorCode {
    match r {
        Response::Error { code, .. } => code,
        other => panic!("expected an error, got {other:?}"),
    }
}

fn manifest(id: &str, files: Vec<FileEntry>) -> BackupManifest {
    BackupManifest {
        format: MANIFEST_FORMAT,
        id: id.into(),
        cluster: "main".into(),
        label: "raw".into(),
        system_identifier: 7,
        pg_version: 150000,
        timeline: 1,
        stop_timeline: 1,
        start_lsn: "0/2000028".into(),
        stop_lsn: "0/2000100".into(),
        start_time: 1,
        stop_time: 2,
        chunk_size: 128 << 10,
        tablespaces: Vec::new(),
        files,
        backup_label: "START WAL LOCATION: 0/2000028\n".into(),
        pg_backup_manifest: "{}".into(),
        stats: BackupStats::default(),
    }
}

fn file(path: &str, data: &[u8]) -> FileEntry {
    FileEntry {
        tablespace: None,
        path: path.into(),
        kind: FileKind::File,
        mode: 0o600,
        size: data.len() as u64,
        mtime: 0,
        link: None,
        chunks: if data.is_empty() {
            vec![]
        } else {
            vec![b3(data)]
        },
    }
}

async fn list(conn: &ArchiveConnection) -> Vec<String> {
    match conn
        .call(&Request::ListBackups {
            cluster: "main".into(),
        })
        .await
        .unwrap()
        .0
    {
        Response::Backups { backups } => backups.into_iter().map(|b| b.id).collect(),
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_requests_refuse_bad_input_and_change_nothing() {
    let archive = Archive::start("main");
    walvault_protocol::transport::install_crypto_provider();
    let push = connect(&archive, "main", "push").await;
    let pull = connect(&archive, "main", "pull").await;
    let stranger = connect(&archive, "other", "push").await;
    let chunks_dir = archive.data_dir().join("store/main/chunks");
    let data: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();

    // A chunk stores once; the same chunk again is "already present".
    assert_eq!(
        put_chunk(&push, "main", &data, &data).await,
        Response::Stored {
            already_present: false
        }
    );
    assert_eq!(
        put_chunk(&push, "main", &data, &data).await,
        Response::Stored {
            already_present: true
        }
    );

    // Lies and trespass store nothing.
    let other_data = vec![9u8; 4000];
    let mut lie = other_data.clone();
    lie[7] ^= 1;
    assert_eq!(
        code(put_chunk(&push, "main", &other_data, &lie).await),
        ErrorCode::Invalid
    );
    assert_eq!(
        code(put_chunk(&pull, "main", &other_data, &other_data).await),
        ErrorCode::Unauthorized
    );
    assert_eq!(
        code(put_chunk(&stranger, "main", &other_data, &other_data).await),
        ErrorCode::Unauthorized
    );
    let bad_name = Request::PutChunk {
        cluster: "main".into(),
        blake3: "../../etc/passwd".into(),
        raw_size: 1,
    };
    assert_eq!(code(send(&push, bad_name, b"x").await), ErrorCode::Invalid);
    let stored: Vec<_> = walk(&chunks_dir);
    assert_eq!(stored.len(), 1, "refused chunks left objects: {stored:?}");
    let get = Request::GetChunk {
        cluster: "main".into(),
        blake3: b3(&other_data),
    };
    assert_eq!(code(push.call(&get).await.unwrap().0), ErrorCode::NotFound);

    // ChunksMissing: only the unknown ones; oversized requests refused.
    let ask = Request::ChunksMissing {
        cluster: "main".into(),
        hashes: vec![b3(&data), b3(&other_data)],
    };
    assert_eq!(
        push.call(&ask).await.unwrap().0,
        Response::Missing {
            hashes: vec![b3(&other_data)]
        }
    );
    let huge = Request::ChunksMissing {
        cluster: "main".into(),
        hashes: vec![b3(&data); 4097],
    };
    assert_eq!(code(push.call(&huge).await.unwrap().0), ErrorCode::TooLarge);

    // Manifests that name a missing chunk, leave PGDATA or link elsewhere are refused.
    let missing = manifest(
        "20260101T000000000Z",
        vec![file("base/1/1", &data), file("base/1/2", &other_data)],
    );
    assert_eq!(
        code(put_manifest(&push, &missing).await),
        ErrorCode::Invalid
    );
    let escape = manifest("20260101T000000001Z", vec![file("../etc/cron.d/x", &data)]);
    assert_eq!(code(put_manifest(&push, &escape).await), ErrorCode::Invalid);
    let mut link = file("base/evil", &[]);
    link.kind = FileKind::Symlink;
    link.link = Some("/etc".into());
    let linked = manifest("20260101T000000002Z", vec![link]);
    assert_eq!(code(put_manifest(&push, &linked).await), ErrorCode::Invalid);
    let good = manifest(
        "20260101T000000003Z",
        vec![file("base/1/1", &data), file("PG_VERSION", b"")],
    );
    assert_eq!(
        code(put_manifest(&pull, &good).await),
        ErrorCode::Unauthorized
    );
    assert!(list(&push).await.is_empty(), "a refused manifest is listed");
    let left = walk(&archive.data_dir().join("store/main/backups"));
    assert!(left.is_empty(), "a refused manifest left objects: {left:?}");

    // A good one commits; create-only: different content under its id is a conflict.
    assert_eq!(
        put_manifest(&push, &good).await,
        Response::Stored {
            already_present: false
        }
    );
    assert_eq!(
        put_manifest(&push, &good).await,
        Response::Stored {
            already_present: true
        }
    );
    let mut changed = good.clone();
    changed.label = "changed".into();
    assert_eq!(
        code(put_manifest(&push, &changed).await),
        ErrorCode::Conflict
    );
    assert_eq!(list(&pull).await, vec![good.id.clone()]);

    // Reading is per cluster; deleting and retention are for admins.
    let get = Request::GetBackup {
        cluster: "main".into(),
        backup_id: good.id.clone(),
    };
    assert!(matches!(
        pull.call(&get).await.unwrap().0,
        Response::Object { .. }
    ));
    assert_eq!(
        code(stranger.call(&get).await.unwrap().0),
        ErrorCode::Unauthorized
    );
    let delete = Request::DeleteBackup {
        cluster: "main".into(),
        backup_id: good.id.clone(),
    };
    assert_eq!(
        code(push.call(&delete).await.unwrap().0),
        ErrorCode::Unauthorized
    );
    let retention = Request::Retention {
        cluster: None,
        keep_full: Some(0),
        keep_within_secs: None,
        chunk_grace_secs: Some(0),
        dry_run: false,
    };
    assert_eq!(
        code(push.call(&retention).await.unwrap().0),
        ErrorCode::Unauthorized
    );
    assert_eq!(list(&pull).await, vec![good.id.clone()]);
    let path = Request::GetBackup {
        cluster: "main".into(),
        backup_id: "../x".into(),
    };
    assert_eq!(code(pull.call(&path).await.unwrap().0), ErrorCode::Invalid);
}

fn walk(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p.to_string_lossy().into_owned());
        }
    }
    out
}
