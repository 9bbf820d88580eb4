//! `ArchiveClient` against a real archived: each request's answer, errors that classify
//! themselves, and deadlines that end a request to an archive frozen with SIGSTOP.

use std::time::Duration;

use bytes::Bytes;
use walvault_protocol::core::format::codec::Encoder;
use walvault_protocol::core::wire::ErrorCode;
use walvault_protocol::net::client::{ArchiveClient, ClientError, Deadline, ErrorClass};
use walvault_protocol::net::config::ClientConfig;
use walvault_protocol::net::transport::Timeouts;
use walvault_tests::{synthetic_segment, Archive, SegmentFill};

use crate::promises::{fake_segment, seg_name};

/// SIGSTOPs a process; SIGCONT when dropped (also when the test fails).
pub(crate) struct Frozen(u32);

impl Frozen {
    /// Returns once the process is stopped (signals are delivered asynchronously).
    pub(crate) fn freeze(pid: u32) -> Frozen {
        // SAFETY: kill(2) on the archived child the harness started and still holds.
        assert_eq!(unsafe { libc::kill(pid as libc::pid_t, libc::SIGSTOP) }, 0);
        let frozen = Frozen(pid);
        walvault_tests::wait_until(
            "archived stopped by SIGSTOP",
            Duration::from_secs(10),
            || stopped(pid),
            String::new,
        );
        frozen
    }
}

/// Whether `/proc/PID/stat` says the process is stopped (state `T`).
fn stopped(pid: u32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The state follows the parenthesized command name.
    stat.rsplit_once(')')
        .is_some_and(|(_, rest)| rest.trim_start().starts_with('T'))
}

impl Drop for Frozen {
    fn drop(&mut self) {
        // SAFETY: as above.
        unsafe { libc::kill(self.0 as libc::pid_t, libc::SIGCONT) };
    }
}

fn compress(raw: &[u8]) -> Vec<Bytes> {
    let mut encoder = Encoder::new(3).unwrap();
    let mut out = Vec::new();
    for piece in raw.chunks(1 << 20) {
        let mut frame = Vec::new();
        encoder.write(piece, &mut frame).unwrap();
        out.push(Bytes::from(frame));
    }
    let mut end = Vec::new();
    encoder.finish(&mut end).unwrap();
    out.push(Bytes::from(end));
    out
}

fn body(pieces: Vec<Bytes>) -> impl futures::Stream<Item = std::io::Result<Bytes>> + Send {
    futures::stream::iter(pieces.into_iter().map(Ok))
}

/// A segment with a valid header and random (incompressible) content: its compressed
/// body is larger than QUIC's per-stream window, so a download cannot be in flight whole.
fn random_segment(tli: u32, segno: u64, sysid: u64) -> Vec<u8> {
    synthetic_segment(
        16 << 20,
        tli,
        segno,
        sysid,
        SegmentFill::Random(0xDEAD_BEEF),
    )
}

async fn push(client: &ArchiveClient, name: &str, raw: &[u8]) -> Result<bool, ClientError> {
    client
        .put_wal(
            name,
            raw.len() as u64,
            &blake3::hash(raw).to_hex(),
            body(compress(raw)),
        )
        .await
}

/// Every answer of the WAL requests, as typed results: stored, already present,
/// delivered and verified, not found, conflict, unauthorized.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_answer_typed_results_and_refusals_classify_themselves() {
    let archive = Archive::start("main");
    walvault_protocol::net::transport::install_crypto_provider();
    let push_cfg = ClientConfig::load(&archive.issue("main", "push")).unwrap();
    let pull_cfg = ClientConfig::load(&archive.issue("main", "pull")).unwrap();
    let pusher = ArchiveClient::connect(&push_cfg).await.unwrap();
    let puller = ArchiveClient::connect(&pull_cfg).await.unwrap();

    let pong = puller.ping().await.unwrap();
    assert_eq!(
        (pong.cluster.as_str(), pong.role.as_str()),
        ("main", "pull")
    );

    let name = seg_name(1, 2);
    let seg = fake_segment(1, 2, 4242);
    assert!(!push(&pusher, &name, &seg).await.unwrap(), "first push");
    assert!(
        push(&pusher, &name, &seg).await.unwrap(),
        "identical re-push"
    );

    let mut got = Vec::new();
    let delivered = puller
        .get_wal(&name, |b| {
            got.extend_from_slice(b);
            Ok(())
        })
        .await
        .unwrap();
    assert_eq!(delivered.raw_size, seg.len() as u64);
    assert!(got == seg, "get_wal delivered other bytes than pushed");

    let listing = puller.list_wal().await.unwrap();
    assert_eq!(listing.system_identifier, Some(4242));

    let missing = puller
        .get_wal(&seg_name(1, 3), |_| Ok(()))
        .await
        .unwrap_err();
    assert!(missing.is_not_found(), "{missing}");
    assert!(!missing.is_transient(), "{missing}");

    let mut changed = seg.clone();
    changed[1 << 20] ^= 0xFF;
    let conflict = push(&pusher, &name, &changed).await.unwrap_err();
    assert_eq!(conflict.code(), Some(ErrorCode::Conflict), "{conflict}");
    assert_eq!(conflict.class(), ErrorClass::Refused);
    assert!(!conflict.is_transient());

    // The archive refuses a pull certificate's push before reading the body.
    let unauthorized = push(&puller, &seg_name(1, 4), &fake_segment(1, 4, 4242))
        .await
        .unwrap_err();
    assert_eq!(
        unauthorized.code(),
        Some(ErrorCode::Unauthorized),
        "{unauthorized}"
    );
    assert!(!unauthorized.is_transient());

    let backups = puller.list_backups().await.unwrap();
    assert!(backups.is_empty());
    let no_backup = puller
        .backup_state("20260101T000000000Z")
        .await
        .unwrap_err();
    assert!(no_backup.is_not_found(), "{no_backup}");
    pusher.close().await;
    puller.close().await;
}

fn quick(idle: u64, total: u64) -> Timeouts {
    Timeouts {
        connect: Duration::from_secs(5),
        idle: Duration::from_secs(idle),
        total: Duration::from_secs(total),
    }
}

/// archived frozen (SIGSTOP) before it answers, and while it sends a segment: each
/// request ends by its idle or total deadline with an error that says which and whether
/// the archive had answered; after SIGCONT the next request succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_to_a_frozen_archive_end_by_their_deadlines() {
    let archive = Archive::start("main");
    walvault_protocol::net::transport::install_crypto_provider();
    let push_cfg = ClientConfig::load(&archive.issue("main", "push")).unwrap();
    let pull_cfg = ClientConfig::load(&archive.issue("main", "pull")).unwrap();
    let name = seg_name(1, 5);
    let seg = random_segment(1, 5, 99);
    let pusher = ArchiveClient::connect(&push_cfg).await.unwrap();
    push(&pusher, &name, &seg).await.unwrap();
    pusher.close().await;

    let mut tls = pull_cfg.tls();
    tls.timeouts = quick(2, 60);
    let client = ArchiveClient::connect_tls(&tls, "main").await.unwrap();

    // Frozen before the request: no answer, idle deadline.
    let frozen = Frozen::freeze(archive.pid());
    let guard = tokio::time::timeout(Duration::from_secs(30), client.list_wal()).await;
    drop(frozen);
    let err = guard
        .expect("list_wal to a frozen archive did not end by its 2 s idle deadline")
        .unwrap_err();
    assert!(
        matches!(
            err,
            ClientError::Deadline {
                deadline: Deadline::Idle,
                answered: false,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.is_transient());
    assert_eq!(err.class(), ErrorClass::Unreachable);
    assert!(err.to_string().contains("idle timeout"), "{err}");

    // Thawed: the next request succeeds (on the same connection unless QUIC gave it up).
    let client = if client.is_closed() {
        ArchiveClient::connect_tls(&tls, "main").await.unwrap()
    } else {
        client
    };
    client.list_wal().await.unwrap();

    // Frozen in the middle of a download: the archive had answered. The connection was
    // made with a 2 s idle timeout, so QUIC gives it up 4 s after the freeze: the total
    // deadline is shorter than that, or the two race.
    for (timeouts, deadline) in [
        (quick(2, 60), Deadline::Idle),
        (quick(60, 3), Deadline::Total),
    ] {
        let client = client.with_timeouts(timeouts);
        let pid = archive.pid();
        let mut frozen = None;
        let get = client.get_wal(&name, |_| {
            frozen.get_or_insert_with(|| Frozen::freeze(pid));
            Ok(())
        });
        let result = tokio::time::timeout(Duration::from_secs(60), get).await;
        drop(frozen);
        let err = result
            .unwrap_or_else(|_| panic!("get_wal did not end by its {deadline:?} deadline"))
            .unwrap_err();
        match &err {
            ClientError::Deadline {
                deadline: d,
                answered: true,
                ..
            } if *d == deadline => {}
            other => panic!("expected a {deadline:?} deadline after the answer, got {other:?}"),
        }
        assert!(err.is_transient());
        assert_eq!(err.class(), ErrorClass::Undelivered, "{err}");
    }

    let client = if client.is_closed() {
        ArchiveClient::connect_tls(&tls, "main").await.unwrap()
    } else {
        client
    };
    let mut got = Vec::new();
    client
        .get_wal(&name, |b| {
            got.extend_from_slice(b);
            Ok(())
        })
        .await
        .unwrap();
    assert!(
        got == seg,
        "after SIGCONT the segment did not come back whole"
    );
    client.close().await;
}

/// With the archive gone, connecting fails within the connect timeout as a transient,
/// "unreachable" failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_archive_that_does_not_answer_the_handshake_is_unreachable() {
    let archive = Archive::start("main");
    walvault_protocol::net::transport::install_crypto_provider();
    let mut tls = ClientConfig::load(&archive.issue("main", "pull"))
        .unwrap()
        .tls();
    tls.timeouts = quick(2, 10);
    tls.timeouts.connect = Duration::from_secs(2);
    let _frozen = Frozen::freeze(archive.pid());
    let err = tokio::time::timeout(
        Duration::from_secs(30),
        ArchiveClient::connect_tls(&tls, "main"),
    )
    .await
    .expect("connect to a frozen archive did not end by its 2 s connect timeout")
    .err()
    .expect("connected to a frozen archive");
    assert!(err.is_transient(), "{err}");
    assert_eq!(err.class(), ErrorClass::Unreachable);
    assert!(err.to_string().contains("unreachable"), "{err}");
}
