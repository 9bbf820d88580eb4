//! The promises of DESIGN.md for backup requests, tried with a raw client against a real
//! archived: lies about chunk contents, manifests naming chunks the archive lacks or
//! paths outside PGDATA, wrong roles and clusters. Each gets a clear error and changes
//! nothing.

use walvault_protocol::core::format::manifest::{
    BackupManifest, BackupStats, FileEntry, FileKind, MANIFEST_FORMAT,
};
use walvault_protocol::core::wire::{ErrorCode, Request, Response};
use walvault_protocol::net::config::ClientConfig;
use walvault_protocol::net::transport::{read_frame, ArchiveConnection};
use walvault_tests::Archive;

fn b3(bytes: &[u8]) -> String {
    blake3::hash(bytes).to_hex().to_string()
}

pub(crate) async fn connect(archive: &Archive, cluster: &str, role: &str) -> ArchiveConnection {
    let cfg = ClientConfig::load(&archive.issue(cluster, role)).unwrap();
    ArchiveConnection::connect(&cfg.tls()).await.unwrap()
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
        lease: None,
        cluster: cluster.into(),
        blake3: b3(announced),
        raw_size: announced.len() as u64,
    };
    send(conn, request, body).await
}

pub(crate) async fn put_manifest(conn: &ArchiveConnection, m: &BackupManifest) -> Response {
    let raw = serde_json::to_vec(m).unwrap();
    let request = Request::PutBackup {
        lease: None,
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

pub(crate) fn manifest(id: &str, files: Vec<FileEntry>) -> BackupManifest {
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
            after: None,
            paged: false,
        })
        .await
        .unwrap()
        .0
    {
        Response::Backups { backups, .. } => backups.into_iter().map(|b| b.record.id).collect(),
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_requests_refuse_bad_input_and_change_nothing() {
    let archive = Archive::start("main");
    walvault_protocol::net::transport::install_crypto_provider();
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
        lease: None,
        cluster: "main".into(),
        blake3: "../../etc/passwd".into(),
        raw_size: 1,
    };
    assert_eq!(code(send(&push, bad_name, b"x").await), ErrorCode::Invalid);
    let stored: Vec<_> = walk(&chunks_dir);
    assert_eq!(stored.len(), 1, "refused chunks left objects: {stored:?}");
    let get = Request::GetChunks {
        cluster: "main".into(),
        hashes: vec![b3(&other_data)],
    };
    assert_eq!(code(push.call(&get).await.unwrap().0), ErrorCode::NotFound);

    // ChunksMissing: only the unknown ones; oversized requests refused.
    let ask = Request::ChunksMissing {
        lease: None,
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
        lease: None,
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
        window_end: None,
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

fn dir(path: &str) -> FileEntry {
    let mut d = file(path, b"");
    d.kind = FileKind::Directory;
    d.mode = 0o700;
    d
}

/// A file of `data` cut into 128 KiB chunks, as pushclient does.
pub(crate) fn chunked_file(path: &str, data: &[u8]) -> FileEntry {
    let mut f = file(path, data);
    f.chunks = data.chunks(128 << 10).map(b3).collect();
    f
}

/// Restore asks for chunks in batches (GetChunks) and verifies each before writing it:
/// a batch naming a missing chunk, too many chunks, a bad hash or another cluster is
/// refused; a chunk damaged in the store (flipped byte, or another chunk's object under
/// its name) fails the restore with a clear message, nothing of it is written, and the
/// directory is left unstartable (no recovery.signal).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_verifies_every_chunk_and_writes_nothing_unverified() {
    let archive = Archive::start("main");
    let push = connect(&archive, "main", "push").await;
    let pull = connect(&archive, "main", "pull").await;
    let stranger = connect(&archive, "other", "pull").await;

    // 300 KiB of distinct bytes (3 chunks) and one small file.
    let big: Vec<u8> = (0..300u32 << 10)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let small: Vec<u8> = (0..8192u32).map(|i| (i % 97) as u8).collect();
    for c in big.chunks(128 << 10).chain([&small[..]]) {
        assert!(matches!(
            put_chunk(&push, "main", c, c).await,
            Response::Stored { .. }
        ));
    }
    let m = manifest(
        "20260101T000000000Z",
        vec![
            dir("base"),
            dir("base/1"),
            chunked_file("base/1/16384", &big),
            chunked_file("base/1/16385", &small),
            file("PG_VERSION", b""),
        ],
    );
    assert!(matches!(
        put_manifest(&push, &m).await,
        Response::Stored { .. }
    ));

    // GetChunks: the objects, whole, in the order asked (a repeat included).
    let hashes = vec![b3(&small), b3(&big[..128 << 10]), b3(&small)];
    let ask = Request::GetChunks {
        cluster: "main".into(),
        hashes: hashes.clone(),
    };
    let (answer, mut recv) = pull.call(&ask).await.unwrap();
    assert_eq!(answer, Response::Chunks { count: 3 });
    let body = recv.read_to_end(1 << 20).await.unwrap();
    let mut rest = &body[..];
    let mut decoder = walvault_protocol::core::format::object::ObjectDecoder::new().unwrap();
    for (h, want) in hashes
        .iter()
        .zip([&small[..], &big[..128 << 10], &small[..]])
    {
        let header = walvault_protocol::core::format::object::ObjectHeader::decode(rest).unwrap();
        assert_eq!(&header.blake3_hex(), h);
        let end = 64 + header.compressed_size as usize;
        let raw = decoder
            .decode(&header, &rest[64..end], &header.blake3, 1 << 20)
            .unwrap();
        assert_eq!(raw, want);
        rest = &rest[end..];
    }
    assert!(
        rest.is_empty(),
        "{} bytes after the last object",
        rest.len()
    );
    let absent = b3(b"not stored");
    let missing = Request::GetChunks {
        cluster: "main".into(),
        hashes: vec![b3(&small), absent.clone()],
    };
    match pull.call(&missing).await.unwrap().0 {
        Response::Error { code, message } => {
            assert_eq!(code, ErrorCode::NotFound);
            assert!(message.contains(&absent), "{message}");
        }
        other => panic!("a batch with a missing chunk was answered {other:?}"),
    }
    let too_many = Request::GetChunks {
        cluster: "main".into(),
        hashes: vec![b3(&small); 65],
    };
    assert_eq!(
        code(pull.call(&too_many).await.unwrap().0),
        ErrorCode::TooLarge
    );
    let bad = Request::GetChunks {
        cluster: "main".into(),
        hashes: vec!["../../cluster.toml".into()],
    };
    assert_eq!(code(pull.call(&bad).await.unwrap().0), ErrorCode::Invalid);
    assert_eq!(
        code(stranger.call(&ask).await.unwrap().0),
        ErrorCode::Unauthorized
    );

    // A good restore (the backup is usable once its WAL is archived).
    let pull_conf = archive.issue("main", "pull");
    let work = walvault_tests::TestDir::new("restore-verify");
    let segment = work.join("000000010000000000000002");
    std::fs::write(&segment, crate::promises::fake_segment(1, 2, 7)).unwrap();
    let out = archive.archive_push(&archive.issue("main", "push"), &segment);
    assert!(out.success(), "{}", out.describe());
    let restore = |dir: &std::path::Path| {
        walvault_tests::try_run(
            std::process::Command::new(archive.bins().pullclient())
                .args(["restore", "--pgdata"])
                .arg(dir)
                .arg("--config")
                .arg(&pull_conf),
        )
    };
    let good = work.join("good");
    let out = restore(&good);
    assert!(out.success(), "{}", out.describe());
    assert_eq!(std::fs::read(good.join("base/1/16384")).unwrap(), big);
    assert_eq!(std::fs::read(good.join("base/1/16385")).unwrap(), small);
    assert!(good.join("recovery.signal").exists());
    let auto = std::fs::read_to_string(good.join("postgresql.auto.conf")).unwrap();
    assert!(
        auto.contains("restore_command = ") && auto.contains("recovery_prefetch = 'off'"),
        "{auto}"
    );

    // Damage the small file's chunk: one flipped byte in its zstd frame.
    let h = b3(&small);
    let object = archive
        .data_dir()
        .join(format!("store/main/chunks/{}/{h}.zst", &h[..2]));
    let original = std::fs::read(&object).unwrap();
    let mut flipped = original.clone();
    let last = flipped.len() - 3;
    flipped[last] ^= 0x40;
    std::fs::remove_file(&object).unwrap();
    std::fs::write(&object, &flipped).unwrap();
    let damaged = work.join("damaged");
    let out = restore(&damaged);
    assert!(!out.success(), "restore from a damaged chunk succeeded");
    assert!(
        out.stderr.contains(&h) && out.stderr.contains("failed verification"),
        "unclear error: {}",
        out.describe()
    );
    let written = std::fs::read(damaged.join("base/1/16385")).unwrap_or_default();
    assert!(
        written.iter().all(|b| *b == 0),
        "bytes of an unverified chunk were written"
    );
    assert!(!damaged.join("recovery.signal").exists());

    // Another chunk's (valid) object under this chunk's name.
    let other = b3(&big[..128 << 10]);
    let impostor = std::fs::read(
        archive
            .data_dir()
            .join(format!("store/main/chunks/{}/{other}.zst", &other[..2])),
    )
    .unwrap();
    std::fs::remove_file(&object).unwrap();
    std::fs::write(&object, &impostor).unwrap();
    let swapped = work.join("swapped");
    let out = restore(&swapped);
    assert!(!out.success(), "restore from a swapped chunk succeeded");
    assert!(
        out.stderr.contains(&h) && out.stderr.contains(&other),
        "unclear error: {}",
        out.describe()
    );
    assert!(!swapped.join("recovery.signal").exists());
    let written = std::fs::read(swapped.join("base/1/16385")).unwrap_or_default();
    assert!(written.iter().all(|b| *b == 0));
}

/// `PutPack` of `chunks` as (announced raw bytes, bytes actually compressed into the body).
pub(crate) async fn put_pack(
    conn: &ArchiveConnection,
    cluster: &str,
    chunks: &[(&[u8], &[u8])],
) -> Response {
    let mut listed = Vec::new();
    let mut body = Vec::new();
    for (announced, actual) in chunks {
        let frame = zstd::bulk::compress(actual, 3).unwrap();
        listed.push(walvault_protocol::core::wire::backup::PackChunk {
            blake3: b3(announced),
            raw_size: announced.len() as u64,
            compressed_size: frame.len() as u64,
        });
        body.extend_from_slice(&frame);
    }
    let request = Request::PutPack {
        lease: None,
        cluster: cluster.into(),
        chunks: listed,
    };
    let (mut send, mut recv) = conn.open(&request).await.unwrap();
    let _ = send.write_all(&body).await;
    let _ = send.finish();
    read_frame(&mut recv).await.unwrap()
}

/// GetChunks: each object of the answer, decoded and verified against its own header.
async fn read_chunks(conn: &ArchiveConnection, get: &Request) -> Vec<anyhow::Result<Vec<u8>>> {
    let (answer, mut recv) = conn.call(get).await.unwrap();
    assert!(matches!(answer, Response::Chunks { .. }), "{answer:?}");
    let body = recv.read_to_end(1 << 20).await.unwrap();
    let mut rest = &body[..];
    let mut out = Vec::new();
    let mut d = walvault_protocol::core::format::object::ObjectDecoder::new().unwrap();
    while !rest.is_empty() {
        let h = walvault_protocol::core::format::object::ObjectHeader::decode(rest).unwrap();
        let end = 64 + h.compressed_size as usize;
        out.push(
            d.decode(&h, &rest[64..end], &h.blake3, 1 << 20)
                .map_err(anyhow::Error::from),
        );
        rest = &rest[end..];
    }
    out
}

fn packs_in(archive: &Archive) -> Vec<String> {
    walk(&archive.data_dir().join("store/main/packs"))
        .into_iter()
        .filter(|p| p.ends_with(".pack"))
        .collect()
}

/// Packs (many chunks in one stored object) are verified chunk by chunk before anything
/// is stored: one lying chunk, a body shorter or longer than announced, too many chunks
/// or bytes, or a reader's certificate store nothing. A good pack serves its chunks
/// through GetChunks, counts them present for ChunksMissing, and a catalog rebuild finds
/// them again; a byte damaged inside a stored pack fails the chunk's verification.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packs_are_verified_whole_and_serve_their_chunks() {
    let mut archive = Archive::start("main");
    let push = connect(&archive, "main", "push").await;
    let pull = connect(&archive, "main", "pull").await;
    let a: Vec<u8> = (0..70_000u32).map(|i| (i % 251) as u8).collect();
    let b: Vec<u8> = (0..9_000u32).map(|i| (i % 13) as u8).collect();
    let c = vec![7u8; 128 << 10];
    let mut lie = b.clone();
    lie[100] ^= 1;

    // Refusals store nothing.
    assert_eq!(
        code(put_pack(&push, "main", &[(&a, &a), (&b, &lie), (&c, &c)]).await),
        ErrorCode::Invalid
    );
    assert_eq!(
        code(put_pack(&pull, "main", &[(&a, &a)]).await),
        ErrorCode::Unauthorized
    );
    let many: Vec<(&[u8], &[u8])> = vec![(&b[..], &b[..]); 1025];
    assert_eq!(
        code(put_pack(&push, "main", &many).await),
        ErrorCode::TooLarge
    );
    let big = vec![(&c[..], &c[..]); 129];
    assert_eq!(
        code(put_pack(&push, "main", &big).await),
        ErrorCode::TooLarge
    );
    // A body longer than its chunks announce.
    let frame = zstd::bulk::compress(&a, 3).unwrap();
    let request = Request::PutPack {
        lease: None,
        cluster: "main".into(),
        chunks: vec![walvault_protocol::core::wire::backup::PackChunk {
            blake3: b3(&a),
            raw_size: a.len() as u64,
            compressed_size: frame.len() as u64,
        }],
    };
    for body in [
        [&frame[..], b"extra"].concat(),
        frame[..frame.len() - 1].to_vec(),
    ] {
        let (mut send, mut recv) = push.open(&request).await.unwrap();
        let _ = send.write_all(&body).await;
        let _ = send.finish();
        let answer: Response = read_frame(&mut recv).await.unwrap();
        assert_eq!(code(answer), ErrorCode::Invalid);
    }
    let left = walk(&archive.data_dir().join("store/main/packs"));
    assert!(left.is_empty(), "a refused pack left files: {left:?}");
    let ask = Request::ChunksMissing {
        lease: None,
        cluster: "main".into(),
        hashes: vec![b3(&a), b3(&b), b3(&c)],
    };
    assert_eq!(
        push.call(&ask).await.unwrap().0,
        Response::Missing {
            hashes: vec![b3(&a), b3(&b), b3(&c)]
        }
    );

    // A good pack.
    match put_pack(&push, "main", &[(&a, &a), (&b, &b), (&c, &c)]).await {
        Response::PackStored { new_chunks, .. } => assert_eq!(new_chunks, 3),
        other => panic!("a good pack was answered {other:?}"),
    }
    assert_eq!(packs_in(&archive).len(), 1);
    assert_eq!(
        push.call(&ask).await.unwrap().0,
        Response::Missing { hashes: vec![] }
    );
    let get = Request::GetChunks {
        cluster: "main".into(),
        hashes: vec![b3(&c), b3(&a), b3(&b)],
    };
    let got = read_chunks(&pull, &get).await;
    assert_eq!(got.len(), 3);
    for (g, want) in got.iter().zip([&c, &a, &b]) {
        assert_eq!(g.as_ref().unwrap(), want);
    }

    // The catalog is rebuilt from the pack's index.
    archive.stop();
    std::fs::remove_dir_all(archive.data_dir().join("catalog")).unwrap();
    archive.serve();
    let pull = connect(&archive, "main", "pull").await;
    let got = read_chunks(&pull, &get).await;
    for (g, want) in got.iter().zip([&c, &a, &b]) {
        assert_eq!(g.as_ref().unwrap(), want);
    }

    // One flipped byte inside the stored pack (in chunk a's frame): a is refused by the
    // reader's verification, the others still read.
    let pack = packs_in(&archive).pop().unwrap();
    let mut bytes = std::fs::read(&pack).unwrap();
    let index_end = 16 + 56 * 3;
    let a_frame_end = index_end + 64 + frame.len();
    bytes[a_frame_end - 4] ^= 0x55;
    std::fs::remove_file(&pack).unwrap();
    std::fs::write(&pack, &bytes).unwrap();
    let got = read_chunks(&pull, &get).await;
    assert!(got[0].is_ok() && got[2].is_ok(), "{got:?}");
    assert!(got[1].is_err(), "a damaged chunk passed verification");
}
