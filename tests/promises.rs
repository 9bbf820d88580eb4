//! Promises of DESIGN.md tried against a real archived, without PostgreSQL: synthetic
//! segments with real long page headers, the real binaries, and a raw QUIC client that
//! says things the real clients never would.

use std::fs;
use std::path::{Path, PathBuf};

use walvault_protocol::core::wire::{self, ErrorCode, Request, Response};
use walvault_protocol::net::config::ClientConfig;
use walvault_protocol::net::transport::{read_frame, write_frame, ArchiveConnection};
use walvault_tests::{chown_pg, synthetic_segment, Archive, SegmentFill, TestDir};

const SEG: usize = 16 << 20;

/// A 16 MiB segment with a valid PostgreSQL 15 long page header and varied content.
pub(crate) fn fake_segment(tli: u32, segno: u64, sysid: u64) -> Vec<u8> {
    synthetic_segment(SEG, tli, segno, sysid, SegmentFill::Compressible)
}

pub(crate) fn seg_name(tli: u32, segno: u64) -> String {
    format!("{tli:08X}{:08X}{:08X}", segno >> 8, segno & 0xFF)
}

/// Writes `bytes` as `dir/name`, readable by the postgres user that runs the clients.
pub(crate) fn put_file(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    fs::create_dir_all(dir).unwrap();
    chown_pg(dir);
    let p = dir.join(name);
    fs::write(&p, bytes).unwrap();
    chown_pg(&p);
    p
}

/// Every object file in the store (temporary files excluded).
pub(crate) fn stored_objects(archive: &Archive) -> Vec<String> {
    let mut out = Vec::new();
    fn walk(dir: &Path, out: &mut Vec<String>) {
        for e in fs::read_dir(dir).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, out);
            } else {
                out.push(p.to_string_lossy().into_owned());
            }
        }
    }
    walk(&archive.data_dir().join("store"), &mut out);
    out.sort();
    out
}

pub(crate) fn get_bytes(
    archive: &Archive,
    conf: &Path,
    name: &str,
    dir: &TestDir,
) -> Option<Vec<u8>> {
    let out_dir = dir.join("restored");
    fs::create_dir_all(&out_dir).unwrap();
    chown_pg(&out_dir);
    let dest = out_dir.join(format!("got-{name}-{}", rand_suffix()));
    let out = archive.archive_get(conf, name, &dest);
    if out.success() {
        Some(fs::read(&dest).unwrap())
    } else {
        assert_eq!(
            out.code(),
            Some(1),
            "archive-get must exit 1 when it cannot serve\n{}",
            out.describe()
        );
        assert!(
            !dest.exists(),
            "a failed archive-get left {}",
            dest.display()
        );
        None
    }
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

#[test]
fn never_overwrite_identical_repush_succeeds_and_different_content_is_refused() {
    let archive = Archive::start("main");
    let push = archive.issue("main", "push");
    let pull = archive.issue("main", "pull");
    let dir = TestDir::new("overwrite");
    let name = seg_name(1, 3);
    let original = fake_segment(1, 3, 77);
    let p = put_file(&dir.join("a"), &name, &original);
    let out = archive.archive_push(&push, &p);
    assert!(
        out.success(),
        "first push failed\n{}\n{}",
        out.describe(),
        archive.diag()
    );
    let out = archive.archive_push(&push, &p);
    assert!(
        out.success(),
        "identical re-push must succeed (PostgreSQL retries after crashes)\n{}",
        out.describe()
    );

    let mut changed = original.clone();
    changed[SEG / 2] ^= 0xFF;
    let q = put_file(&dir.join("b"), &name, &changed);
    let out = archive.archive_push(&push, &q);
    assert!(
        !out.success(),
        "different content under an archived name was accepted"
    );
    assert!(
        out.stderr.contains("different"),
        "the refusal should say the content differs:\n{}",
        out.describe()
    );
    let served = get_bytes(&archive, &pull, &name, &dir).expect("the archived copy is gone");
    assert!(served == original, "the archived copy changed");
}

#[test]
fn bad_files_are_refused_and_nothing_is_stored() {
    let archive = Archive::start("main");
    let push = archive.issue("main", "push");
    let dir = TestDir::new("badfiles");
    let good = put_file(
        &dir.join("good"),
        &seg_name(1, 1),
        &fake_segment(1, 1, 1000),
    );
    assert!(
        archive.archive_push(&push, &good).success(),
        "{}",
        archive.diag()
    );
    let before = stored_objects(&archive);
    let listing_before = archive.wal_list_json("main");

    let seg2 = fake_segment(1, 2, 1000);
    let cases: Vec<(&str, PathBuf)> = vec![
        (
            "truncated segment",
            put_file(&dir.join("t"), &seg_name(1, 2), &seg2[..SEG / 2]),
        ),
        (
            // A lower header timeline is legal (a new timeline's first segment starts as
            // a copy of its parent's); a later one never is.
            "timeline contradicts name",
            put_file(&dir.join("tl"), &seg_name(2, 2), &fake_segment(3, 2, 1000)),
        ),
        (
            "page address contradicts name",
            put_file(&dir.join("pa"), &seg_name(1, 5), &seg2),
        ),
        (
            "non-WAL name",
            put_file(&dir.join("nw"), "pg_control", &seg2),
        ),
        (
            "another cluster's segment",
            put_file(
                &dir.join("other"),
                &seg_name(1, 2),
                &fake_segment(1, 2, 999_999),
            ),
        ),
        (
            "garbage header",
            put_file(&dir.join("g"), &seg_name(1, 2), &vec![0x5A; SEG]),
        ),
    ];
    for (what, path) in cases {
        let out = archive.archive_push(&push, &path);
        assert!(!out.success(), "{what} was accepted\n{}", out.describe());
        assert!(
            !out.stderr.trim().is_empty(),
            "{what}: refusal printed no reason"
        );
    }
    assert_eq!(
        stored_objects(&archive),
        before,
        "a refused push left something in the store"
    );
    assert_eq!(
        archive.wal_list_json("main"),
        listing_before,
        "a refused push changed the catalog"
    );
}

/// The server checks everything itself: a client that skips validation or lies about the
/// body gets an error and stores nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_refuses_lies_from_a_raw_client() {
    let archive = Archive::start("main");
    let cfg = ClientConfig::load(&archive.issue("main", "push")).unwrap();
    walvault_protocol::net::transport::install_crypto_provider();
    let conn = ArchiveConnection::connect(&cfg.tls()).await.unwrap();
    let seg = fake_segment(1, 4, 5);

    async fn put(
        conn: &ArchiveConnection,
        cluster: &str,
        name: &str,
        announced: &[u8],
        body: &[u8],
    ) -> Response {
        let req = Request::PutWal {
            cluster: cluster.into(),
            name: name.into(),
            raw_size: announced.len() as u64,
            blake3: blake3::hash(announced).to_hex().to_string(),
            ready_files: None,
            request_id: None,
        };
        let (mut send, mut recv) = conn.open(&req).await.unwrap();
        let z = zstd::encode_all(body, 1).unwrap();
        let _ = send.write_all(&z).await;
        let _ = send.finish();
        read_frame(&mut recv).await.unwrap()
    }
    let code = |r: Response| match r {
        Response::Error { code, .. } => code,
        other => panic!("expected an error, got {other:?}"),
    };

    let mut other = seg.clone();
    other[9000] ^= 1;
    assert_eq!(
        code(put(&conn, "main", &seg_name(1, 4), &seg, &other).await),
        ErrorCode::Invalid,
        "hash lie"
    );
    assert_eq!(
        code(put(&conn, "main", &seg_name(1, 9), &seg, &seg).await),
        ErrorCode::Invalid,
        "header contradicts name"
    );
    assert_eq!(
        code(put(&conn, "main", "../../etc/passwd", &seg, &seg).await),
        ErrorCode::Invalid,
        "path in name"
    );
    assert_eq!(
        code(put(&conn, "main", "000000010000000000000004\0", &seg, &seg).await),
        ErrorCode::Invalid,
        "NUL"
    );
    assert_eq!(
        code(put(&conn, "../main", &seg_name(1, 4), &seg, &seg).await),
        ErrorCode::Invalid,
        "path in cluster"
    );
    assert_eq!(
        code(put(&conn, "other", &seg_name(1, 4), &seg, &seg).await),
        ErrorCode::Unauthorized,
        "foreign cluster"
    );
    assert!(
        stored_objects(&archive).is_empty(),
        "refused pushes left objects: {:?}",
        stored_objects(&archive)
    );

    // And the honest request on the same connection still works.
    assert_eq!(
        put(&conn, "main", &seg_name(1, 4), &seg, &seg).await,
        Response::Stored {
            already_present: false
        }
    );
    conn.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_oversized_frames_get_errors_and_the_server_keeps_serving() {
    let archive = Archive::start("main");
    let cfg = ClientConfig::load(&archive.issue("main", "pull")).unwrap();
    walvault_protocol::net::transport::install_crypto_provider();
    let conn = ArchiveConnection::connect(&cfg.tls()).await.unwrap();

    let raw = |bytes: Vec<u8>| {
        let conn = &conn;
        async move {
            let (mut send, mut recv) = conn.connection.open_bi().await.unwrap();
            let _ = send.write_all(&bytes).await;
            let _ = send.finish();
            read_frame::<Response>(&mut recv).await
        }
    };
    let expect = |r: Result<Response, _>, want: ErrorCode, what: &str| match r {
        Ok(Response::Error { code, .. }) => assert_eq!(code, want, "{what}"),
        other => panic!("{what}: expected {want:?}, got {other:?}"),
    };
    expect(
        raw(u32::MAX.to_be_bytes().to_vec()).await,
        ErrorCode::TooLarge,
        "length prefix 4 GiB",
    );
    expect(
        raw((wire::MAX_FRAME_LEN + 1).to_be_bytes().to_vec()).await,
        ErrorCode::TooLarge,
        "one byte over the limit",
    );
    let mut junk = 10u32.to_be_bytes().to_vec();
    junk.extend_from_slice(b"\xff\xfe{not json");
    expect(raw(junk).await, ErrorCode::Invalid, "not JSON");
    let unknown = wire::encode_frame(&serde_json::json!({"op": "drop_everything"})).unwrap();
    expect(raw(unknown).await, ErrorCode::Invalid, "unknown operation");
    expect(
        raw(vec![0, 0]).await,
        ErrorCode::Invalid,
        "stream ends inside the length prefix",
    );
    expect(
        raw(vec![0, 0, 0, 50, b'{']).await,
        ErrorCode::Invalid,
        "stream ends inside the frame",
    );

    // Same connection, then a fresh one: both still served.
    let (mut send, mut recv) = conn.connection.open_bi().await.unwrap();
    write_frame(&mut send, &Request::Ping).await.unwrap();
    send.finish().unwrap();
    assert!(matches!(
        read_frame::<Response>(&mut recv).await.unwrap(),
        Response::Pong { .. }
    ));
    conn.close().await;
    let other = ArchiveConnection::connect(&cfg.tls()).await.unwrap();
    let (r, _) = other.call(&Request::Ping).await.unwrap();
    assert!(
        matches!(r, Response::Pong { ref role, .. } if role == "pull"),
        "{r:?}"
    );
    other.close().await;
}

#[test]
fn roles_and_clusters_are_enforced() {
    let archive = Archive::start("a");
    let push_a = archive.issue("a", "push");
    let pull_a = archive.issue("a", "pull");
    let push_b = archive.issue("b", "push");
    let pull_b = archive.issue("b", "pull");
    let dir = TestDir::new("authz");
    let a_seg = put_file(&dir.join("a"), &seg_name(1, 1), &fake_segment(1, 1, 10));
    let b_seg = put_file(&dir.join("b"), &seg_name(1, 1), &fake_segment(1, 1, 20));
    assert!(
        archive.archive_push(&push_a, &a_seg).success(),
        "{}",
        archive.diag()
    );
    assert!(
        archive.archive_push(&push_b, &b_seg).success(),
        "{}",
        archive.diag()
    );

    let out = archive.archive_push(&pull_a, &a_seg);
    assert!(!out.success(), "pull credentials pushed");
    assert!(out.stderr.contains("Unauthorized"), "{}", out.describe());

    // Cluster A's certificate, with the config edited to claim cluster B.
    let forged = dir.join("forged.toml");
    let text = fs::read_to_string(&pull_a)
        .unwrap()
        .replace("cluster = \"a\"", "cluster = \"b\"");
    assert!(
        text.contains("cluster = \"b\""),
        "config layout changed: {text}"
    );
    fs::write(&forged, text).unwrap();
    chown_pg(&forged);
    let got = archive.archive_get(&forged, &seg_name(1, 1), &dir.join("stolen"));
    assert_eq!(
        got.code(),
        Some(1),
        "cluster A read cluster B\n{}",
        got.describe()
    );
    assert!(got.stderr.contains("Unauthorized"), "{}", got.describe());
    assert!(!dir.join("stolen").exists());

    let forged_push = dir.join("forged-push.toml");
    let text = fs::read_to_string(&push_a)
        .unwrap()
        .replace("cluster = \"a\"", "cluster = \"b\"");
    fs::write(&forged_push, text).unwrap();
    chown_pg(&forged_push);
    let c_seg = put_file(&dir.join("c"), &seg_name(1, 2), &fake_segment(1, 2, 20));
    let out = archive.archive_push(&forged_push, &c_seg);
    assert!(
        !out.success() && out.stderr.contains("Unauthorized"),
        "cluster A wrote to B\n{}",
        out.describe()
    );

    // B's own credentials read B's segment, which is not A's.
    let b = get_bytes(&archive, &pull_b, &seg_name(1, 1), &dir).expect("pull B cannot read B");
    let a = get_bytes(&archive, &pull_a, &seg_name(1, 1), &dir).expect("pull A cannot read A");
    assert!(a != b, "cluster A was served cluster B's segment");
}

#[test]
fn a_certificate_from_another_ca_is_refused_at_the_handshake() {
    let archive = Archive::start("main");
    let impostor = Archive::start("main");
    let foreign = impostor.issue("main", "push");
    // Point the foreign config at the first archive.
    let dir = TestDir::new("foreignca");
    let text = fs::read_to_string(&foreign).unwrap().replace(
        &format!("127.0.0.1:{}", impostor.port()),
        &format!("127.0.0.1:{}", archive.port()),
    );
    let conf = dir.join("foreign.toml");
    fs::write(&conf, text).unwrap();
    chown_pg(&conf);
    let seg = put_file(&dir.join("s"), &seg_name(1, 1), &fake_segment(1, 1, 5));
    let out = archive.archive_push(&conf, &seg);
    assert!(!out.success(), "a foreign certificate was accepted");
    assert!(out.stderr.contains("handshake"), "{}", out.describe());
    assert!(stored_objects(&archive).is_empty());
    let got = archive.archive_get(&conf, &seg_name(1, 1), &dir.join("x"));
    assert_eq!(got.code(), Some(1), "{}", got.describe());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_protocol_version_is_refused_at_the_handshake() {
    let archive = Archive::start("main");
    let cfg = ClientConfig::load(&archive.issue("main", "pull")).unwrap();
    walvault_protocol::net::transport::install_crypto_provider();
    let addr = format!("127.0.0.1:{}", archive.port()).parse().unwrap();
    let endpoint = walvault_protocol::net::transport::client_endpoint_with_alpn(
        &cfg.tls(),
        addr,
        vec![b"walvault/999".to_vec()],
    )
    .unwrap();
    let result = endpoint.connect(addr, &cfg.server_name).unwrap().await;
    let err = result.expect_err("handshake with an unknown ALPN succeeded");
    assert!(
        err.to_string()
            .to_lowercase()
            .contains("application protocol")
            || err.to_string().contains("120"),
        "{err}"
    );
}

#[test]
fn archive_get_exit_codes_follow_postgresqls_contract() {
    let mut archive = Archive::start("main");
    let push = archive.issue("main", "push");
    let pull = archive.issue_with("main", "pull", Some(3));
    let dir = TestDir::new("exitcodes");
    let name = seg_name(1, 7);
    let seg = fake_segment(1, 7, 42);
    assert!(archive
        .archive_push(&push, &put_file(&dir.join("s"), &name, &seg))
        .success());

    assert_eq!(
        get_bytes(&archive, &pull, &seg_name(1, 8), &dir),
        None,
        "missing segment"
    );
    assert_eq!(
        get_bytes(&archive, &pull, "00000005.history", &dir),
        None,
        "missing history"
    );
    let missing_conf = archive.archive_get(&dir.join("no-such.toml"), &name, &dir.join("x"));
    assert_eq!(
        missing_conf.code(),
        Some(126),
        "unusable config must abort recovery\n{}",
        missing_conf.describe()
    );

    // Corrupt the stored object: archive-get must refuse to hand it over.
    let object = stored_objects(&archive)
        .into_iter()
        .find(|p| p.ends_with(&format!("{name}.zst")))
        .unwrap();
    let mut bytes = fs::read(&object).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    fs::write(&object, &bytes).unwrap();
    let out = archive.archive_get(&pull, &name, &dir.join("corrupt"));
    assert_eq!(out.code(), Some(1), "{}", out.describe());
    assert!(!dir.join("corrupt").exists(), "a corrupt object was served");
    assert!(
        out.stderr.contains("corrupt") || out.stderr.contains("verification"),
        "{}",
        out.describe()
    );

    archive.stop();
    let out = archive.archive_get(&pull, &name, &dir.join("down"));
    assert_eq!(
        out.code(),
        Some(1),
        "unreachable archive must be exit 1\n{}",
        out.describe()
    );
    assert!(out.stderr.contains("unreachable"), "{}", out.describe());
}

/// Runs a client as the postgres user and returns its exit status and peak RSS in bytes.
// wait4 below reaps the child (std's wait cannot report rusage).
#[allow(clippy::zombie_processes)]
fn run_measured(program: &Path, args: &[&std::ffi::OsStr]) -> (i32, u64) {
    let mut cmd = std::process::Command::new(program);
    cmd.args(args).current_dir("/tmp");
    let child = walvault_tests::as_pg_user(&mut cmd)
        .spawn()
        .expect("spawn client");
    let mut status = 0;
    // SAFETY: rusage is plain data; wait4 fills it for our own child.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let pid = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut usage) };
    assert_eq!(pid, child.id() as i32, "wait4 failed");
    (libc::WEXITSTATUS(status), usage.ru_maxrss as u64 * 1024)
}

/// A 1 GiB segment (the largest PostgreSQL allows) streams through client and server:
/// no process holds it whole.
#[test]
fn a_one_gib_segment_streams_with_bounded_memory() {
    const GIB: usize = 1 << 30;
    let archive = Archive::start("big");
    let push = archive.issue("big", "push");
    let pull = archive.issue("big", "pull");
    let dir = TestDir::new("bigseg");
    // Segment 1 of timeline 1 with 1 GiB segments: name ...00000001, start LSN 0/40000000.
    let mut seg = vec![0u8; GIB];
    let block: Vec<u8> = (0..(1 << 20))
        .map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    for (i, chunk) in seg.chunks_mut(1 << 20).enumerate() {
        chunk.copy_from_slice(&block);
        chunk[64..72].copy_from_slice(&(i as u64).to_le_bytes());
    }
    seg[0..2].copy_from_slice(&0xD110u16.to_le_bytes());
    seg[2..4].copy_from_slice(&2u16.to_le_bytes());
    seg[4..8].copy_from_slice(&1u32.to_le_bytes());
    seg[8..16].copy_from_slice(&(GIB as u64).to_le_bytes());
    seg[16..24].fill(0);
    seg[24..32].copy_from_slice(&4242u64.to_le_bytes());
    seg[32..36].copy_from_slice(&(GIB as u32).to_le_bytes());
    seg[36..40].copy_from_slice(&8192u32.to_le_bytes());
    let name = "000000010000000000000001";
    let path = put_file(&dir.join("src"), name, &seg);
    let expected = blake3::hash(&seg);
    drop(seg);

    let (code, push_rss) = run_measured(
        &archive.bins().pushclient(),
        &[
            "archive-push".as_ref(),
            path.as_os_str(),
            "--config".as_ref(),
            push.as_os_str(),
        ],
    );
    assert_eq!(
        code,
        0,
        "push of a 1 GiB segment failed\n{}",
        archive.diag()
    );
    let out_dir = dir.join("out");
    fs::create_dir_all(&out_dir).unwrap();
    chown_pg(&out_dir);
    let dest = out_dir.join(name);
    let (code, get_rss) = run_measured(
        &archive.bins().pullclient(),
        &[
            "archive-get".as_ref(),
            name.as_ref(),
            dest.as_os_str(),
            "--config".as_ref(),
            pull.as_os_str(),
        ],
    );
    assert_eq!(code, 0, "get of a 1 GiB segment failed\n{}", archive.diag());
    assert_eq!(
        walvault_tests::b3_file(&dest),
        expected,
        "restored 1 GiB segment differs"
    );

    let server_rss = archive.peak_rss();
    eprintln!(
        "peak RSS: pushclient {} MiB, pullclient {} MiB, archived {} MiB",
        push_rss >> 20,
        get_rss >> 20,
        server_rss >> 20
    );
    const BOUND: u64 = 256 << 20;
    for (who, rss) in [
        ("pushclient", push_rss),
        ("pullclient", get_rss),
        ("archived", server_rss),
    ] {
        assert!(
            rss < BOUND,
            "{who} peaked at {} MiB for a 1 GiB segment: it must stream",
            rss >> 20
        );
    }
}

/// A client that vanishes without closing its connection (process killed, packets lost)
/// must not hold a SIGTERM'ed archived for its shutdown grace period: a request answered
/// to nobody counts as in flight only until a short delivery timeout.
///
/// The client sends a whole segment, waits until QUIC has acknowledged every body byte,
/// and vanishes (its runtime stops: no close frame, no acknowledgements). The attempt
/// counts only if the server wrote the object after that moment (object mtime), so its
/// answer certainly went to a vanished client; otherwise it is tried again with the next
/// segment. The grace period is 600 s, so "held" cannot pass for "not held".
#[test]
fn shutdown_is_not_held_by_a_vanished_client() {
    let mut archive = Archive::start_configured(
        "main",
        |config| {
            let text = fs::read_to_string(config).unwrap();
            assert!(text.contains("shutdown_grace_secs = 30\n"), "{text}");
            fs::write(
                config,
                text.replace("shutdown_grace_secs = 30\n", "shutdown_grace_secs = 600\n"),
            )
            .unwrap();
        },
        Vec::new(),
    );
    let cfg = ClientConfig::load(&archive.issue("main", "push")).unwrap();
    walvault_protocol::net::transport::install_crypto_provider();
    let mut exercised = false;
    for segno in 1..=5u64 {
        let name = seg_name(1, segno);
        let seg = fake_segment(1, segno, 41);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let vanished_at = runtime.block_on(async {
            let conn = ArchiveConnection::connect(&cfg.tls()).await.unwrap();
            let req = Request::PutWal {
                cluster: "main".into(),
                name: name.clone(),
                raw_size: seg.len() as u64,
                blake3: blake3::hash(&seg).to_hex().to_string(),
                ready_files: None,
                request_id: None,
            };
            let (mut send, recv) = conn.open(&req).await.unwrap();
            send.write_all(&zstd::encode_all(&seg[..], 1).unwrap())
                .await
                .unwrap();
            send.finish().unwrap();
            // Every body byte acknowledged by the server's QUIC stack.
            send.stopped().await.unwrap();
            let at = std::time::SystemTime::now();
            std::mem::forget((conn, send, recv));
            at
        });
        runtime.shutdown_background();
        let object = walvault_tests::wait_for(
            &format!("archived to store {name} sent by the vanished client"),
            walvault_tests::WAIT_TIMEOUT,
            || {
                stored_objects(&archive)
                    .into_iter()
                    .find(|p| p.contains(&name) && !p.contains(".tmp"))
            },
            || archive.diag(),
        );
        let written = fs::metadata(&object).unwrap().modified().unwrap();
        if written > vanished_at {
            exercised = true;
            break;
        }
    }
    assert!(
        exercised,
        "in 5 tries archived always stored the segment before the client vanished, so its \
         answer may have been delivered: the test did not exercise a vanished client\n{}",
        archive.diag()
    );
    // stop() panics unless archived exits within 30 s of SIGTERM (grace: 600 s).
    archive.stop();
}

/// `wal list` names the segments missing inside a timeline.
#[test]
fn wal_list_reports_gaps() {
    let archive = Archive::start("gaps");
    let push = archive.issue("gaps", "push");
    let dir = TestDir::new("gaps");
    for n in [1, 2, 5] {
        let p = put_file(
            &dir.join(format!("s{n}")),
            &seg_name(1, n),
            &fake_segment(1, n, 77),
        );
        assert!(
            archive.archive_push(&push, &p).success(),
            "{}",
            archive.diag()
        );
    }
    let listing = archive.wal_list_json("gaps");
    let tl = &listing["timelines"][0];
    assert_eq!(tl["segments"].as_u64(), Some(3), "{listing:#}");
    assert_eq!(
        tl["first"].as_str(),
        Some(seg_name(1, 1).as_str()),
        "{listing:#}"
    );
    assert_eq!(
        tl["last"].as_str(),
        Some(seg_name(1, 5).as_str()),
        "{listing:#}"
    );
    assert_eq!(
        tl["gaps"],
        serde_json::json!([[seg_name(1, 3), seg_name(1, 4)]]),
        "{listing:#}"
    );
    let text = archive.admin(&["wal", "list", "--cluster", "gaps"]).stdout;
    assert!(
        text.contains(&format!(
            "GAP: {} .. {} missing",
            seg_name(1, 3),
            seg_name(1, 4)
        )),
        "{text}"
    );
}

/// Settings of a client config the harness does not set: top-level `request_timeout_secs`
/// and `[archive_get] standby_retry_secs`.
fn set_client_deadlines(conf: &Path, request_timeout_secs: u64, standby_retry_secs: u64) {
    let text = fs::read_to_string(conf).unwrap();
    let mut lines: Vec<String> = text
        .lines()
        .filter(|l| {
            let l = l.trim_start();
            !l.starts_with("request_timeout_secs") && !l.starts_with("standby_retry_secs")
        })
        .map(String::from)
        .collect();
    let first_table = lines
        .iter()
        .position(|l| l.trim_start().starts_with('['))
        .unwrap_or(lines.len());
    lines.insert(
        first_table,
        format!("request_timeout_secs = {request_timeout_secs}"),
    );
    match lines.iter().position(|l| l.trim() == "[archive_get]") {
        Some(at) => lines.insert(at + 1, format!("standby_retry_secs = {standby_retry_secs}")),
        None => {
            lines.push("[archive_get]".into());
            lines.push(format!("standby_retry_secs = {standby_retry_secs}"));
        }
    }
    fs::write(conf, lines.join("\n") + "\n").unwrap();
}

/// A 64 MiB segment (segment size 64 MiB) with a valid long page header and random,
/// incompressible content: its transfer outlasts QUIC's 8 MiB stream window many times,
/// so a freeze seen after its first bytes catches it in the middle.
fn random_64mib_segment(segno: u64, sysid: u64) -> (String, Vec<u8>) {
    let b = synthetic_segment(64 << 20, 1, segno, sysid, SegmentFill::Random(1));
    // 64 segments of 64 MiB per 4 GiB "xlogid".
    (format!("00000001{:08X}{:08X}", segno / 64, segno % 64), b)
}

/// Runs a client in the background and freezes archived (SIGSTOP) as soon as `started`
/// says the transfer is under way. `None` if the client finished first (the freeze
/// came too late to test anything); else its output and how long after the freeze it
/// exited. archived is thawed again before this returns.
fn freeze_mid_transfer(
    archive: &Archive,
    cmd: &mut std::process::Command,
    log_prefix: &Path,
    mut started: impl FnMut() -> bool,
) -> Option<(std::process::ExitStatus, String, std::time::Duration)> {
    use std::time::{Duration, Instant};
    let mut client = walvault_tests::BgProcess::spawn("client", cmd, log_prefix);
    let deadline = Instant::now() + walvault_tests::WAIT_TIMEOUT;
    loop {
        if client.try_wait().is_some() {
            return None;
        }
        if started() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the transfer did not start within {:?}\n{}\n{}",
            walvault_tests::WAIT_TIMEOUT,
            client.stderr_tail(20),
            archive.diag()
        );
        // Polling for a file, not a synchronisation by sleep.
        std::thread::sleep(Duration::from_millis(1));
    }
    let frozen = crate::client::Frozen::freeze(archive.pid());
    let at = Instant::now();
    // A client that hangs on the frozen archive is killed (and reported) after 60 s.
    let (status, _, stderr) = client.wait(Duration::from_secs(60));
    let after = at.elapsed();
    drop(frozen);
    Some((status, stderr, after))
}

/// archived frozen with SIGSTOP (finding 9): `archive-push` and `archive-get` return
/// within the deadlines of their config (connect 2 s when frozen before they connect,
/// idle 2 s when frozen in the middle of the transfer) with an error naming the timeout
/// that passed, leave nothing behind, and after SIGCONT the next call succeeds. Before
/// the binaries used the typed client, a transfer ended only when QUIC gave up the
/// connection (twice the idle timeout), saying "connection lost", and the connect
/// failure did not name its timeout.
#[test]
fn clients_return_within_their_deadlines_from_a_frozen_archive() {
    use std::time::{Duration, Instant};
    // What the clients may take beyond a 2 s deadline: their own start, hashing 64 MiB,
    // a loaded machine. Far below a hang.
    const SLACK: Duration = Duration::from_secs(6);
    const DEADLINE: Duration = Duration::from_secs(2);
    let archive = Archive::start("main");
    let push = archive.issue_with("main", "push", Some(2));
    let pull = archive.issue_with("main", "pull", Some(2));
    set_client_deadlines(&push, 60, 1);
    set_client_deadlines(&pull, 60, 1);
    let dir = TestDir::new("frozen");
    let out_dir = dir.join("out");
    fs::create_dir_all(&out_dir).unwrap();
    chown_pg(&out_dir);
    let segments: Vec<(String, PathBuf, blake3::Hash)> = (1..=3)
        .map(|segno| {
            let (name, seg) = random_64mib_segment(segno, 6464);
            let path = put_file(&dir.join("src"), &name, &seg);
            (name, path, blake3::hash(&seg))
        })
        .collect();

    // Frozen before the client connects: the connect timeout.
    let frozen = crate::client::Frozen::freeze(archive.pid());
    let started = Instant::now();
    let out = archive.archive_push(&push, &segments[0].1);
    let took = started.elapsed();
    drop(frozen);
    assert!(
        !out.success(),
        "pushed into a frozen archive\n{}",
        out.describe()
    );
    assert!(
        took < DEADLINE + SLACK,
        "archive-push took {took:?}\n{}",
        out.describe()
    );
    assert!(
        out.stderr.contains("connect timeout"),
        "the error does not name the timeout\n{}",
        out.describe()
    );

    // Frozen in the middle of the upload: the idle deadline.
    let mut exercised = false;
    for (name, path, _) in &segments {
        let mut cmd = std::process::Command::new(archive.bins().pushclient());
        walvault_tests::as_pg_user(&mut cmd)
            .arg("archive-push")
            .arg(path)
            .arg("--config")
            .arg(&push)
            .current_dir("/tmp");
        let receiving = format!("/.tmp.{name}");
        let Some((status, stderr, after)) = freeze_mid_transfer(
            &archive,
            &mut cmd,
            &dir.join(format!("push-{name}")),
            || {
                stored_objects(&archive)
                    .iter()
                    .any(|p| p.contains(&receiving))
            },
        ) else {
            continue;
        };
        exercised = true;
        assert!(
            !status.success(),
            "archive-push succeeded into a frozen archive\n{stderr}"
        );
        assert!(
            after < DEADLINE + SLACK,
            "archive-push ended {after:?} after the freeze\n{stderr}"
        );
        assert!(
            stderr.contains("idle timeout"),
            "the error does not name the idle timeout\n{stderr}"
        );
        break;
    }
    assert!(
        exercised,
        "every upload finished before archived froze\n{}",
        archive.diag()
    );
    // Thawed: every push succeeds, the interrupted ones too.
    for (name, path, _) in &segments {
        let out = archive.archive_push(&push, path);
        assert!(
            out.success(),
            "push of {name} after SIGCONT\n{}\n{}",
            out.describe(),
            archive.diag()
        );
    }

    // Frozen before archive-get connects: the connect timeout, then 1 s of retrying.
    let (name, _, hash) = &segments[0];
    let dest = out_dir.join(format!("before-{name}"));
    let frozen = crate::client::Frozen::freeze(archive.pid());
    let started = Instant::now();
    let out = archive.archive_get(&pull, name, &dest);
    let took = started.elapsed();
    drop(frozen);
    assert_eq!(out.code(), Some(1), "{}", out.describe());
    assert!(
        took < DEADLINE * 2 + Duration::from_secs(1) + SLACK,
        "archive-get took {took:?}\n{}",
        out.describe()
    );
    assert!(
        out.stderr.contains("connect timeout"),
        "the error does not name the timeout\n{}",
        out.describe()
    );
    assert!(!dest.exists());

    // Frozen in the middle of the download.
    let mut exercised = false;
    for (name, _, _) in &segments {
        let dest = out_dir.join(format!("during-{name}"));
        let mut cmd = std::process::Command::new(archive.bins().pullclient());
        walvault_tests::as_pg_user(&mut cmd)
            .args(["archive-get", name])
            .arg(&dest)
            .arg("--config")
            .arg(&pull)
            .current_dir("/tmp");
        let receiving = format!(".tmp.during-{name}.");
        let Some((status, stderr, after)) =
            freeze_mid_transfer(&archive, &mut cmd, &dir.join(format!("get-{name}")), || {
                fs::read_dir(&out_dir)
                    .unwrap()
                    .flatten()
                    .any(|e| e.file_name().to_string_lossy().starts_with(&receiving))
            })
        else {
            fs::remove_file(&dest).unwrap();
            continue;
        };
        exercised = true;
        assert_eq!(status.code(), Some(1), "{stderr}");
        assert!(
            after < DEADLINE + SLACK,
            "archive-get ended {after:?} after the freeze\n{stderr}"
        );
        assert!(
            stderr.contains("idle timeout"),
            "the error does not name the idle timeout\n{stderr}"
        );
        let left: Vec<_> = fs::read_dir(&out_dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .filter(|n| n.to_string_lossy().contains(&format!("during-{name}")))
            .collect();
        assert!(left.is_empty(), "a failed archive-get left {left:?}");
        break;
    }
    assert!(
        exercised,
        "every download finished before archived froze\n{}",
        archive.diag()
    );

    // Thawed: the next archive-get delivers the segment whole.
    let dest = out_dir.join(format!("after-{name}"));
    let out = archive.archive_get(&pull, name, &dest);
    assert!(out.success(), "{}\n{}", out.describe(), archive.diag());
    assert_eq!(
        walvault_tests::b3_file(&dest),
        *hash,
        "archive-get after SIGCONT"
    );
}
