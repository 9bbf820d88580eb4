//! What one client can make archived hold, tried with raw QUIC clients against a real
//! archived on loopback: a request body that stalls is given up after
//! `body_idle_timeout_secs`, leaving nothing stored.

use std::fs;
use std::path::Path;

use walvault_protocol::core::wire::{Request, Response};
use walvault_protocol::net::config::ClientConfig;
use walvault_protocol::net::transport::{read_frame, ArchiveConnection};
use walvault_tests::{Archive, TestDir, WAIT_TIMEOUT};

use crate::promises::{fake_segment, get_bytes, put_file, seg_name, stored_objects};

/// `archived init`'s archived.toml with `key = from` replaced by `key = to`.
fn set_config(config: &Path, key: &str, from: &str, to: &str) {
    let text = fs::read_to_string(config).unwrap();
    let line = format!("{key} = {from}\n");
    assert!(
        text.contains(&line),
        "archived.toml has no line {line:?}:\n{text}"
    );
    fs::write(config, text.replace(&line, &format!("{key} = {to}\n"))).unwrap();
}

/// A client that sends a `PutWal` header and part of its body, then stalls (the
/// connection stays up, the stream open) is given up by the server after
/// `body_idle_timeout_secs` (2 s here): the client's stream fails, the server logs what
/// it gave up, nothing of the upload is left in the store, and the next push of the
/// same segment stores it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_request_body_is_given_up_and_stores_nothing() {
    let archive = Archive::start_configured(
        "main",
        |config| set_config(config, "body_idle_timeout_secs", "60", "2"),
        Vec::new(),
    );
    let push = archive.issue("main", "push");
    let cfg = ClientConfig::load(&push).unwrap();
    walvault_protocol::net::transport::install_crypto_provider();
    let conn = ArchiveConnection::connect(&cfg.tls()).await.unwrap();
    let name = seg_name(1, 7);
    let seg = fake_segment(1, 7, 77);
    let body = zstd::encode_all(&seg[..], 1).unwrap();
    let sent = body.len() / 2;
    let request = Request::PutWal {
        cluster: "main".into(),
        name: name.clone(),
        raw_size: seg.len() as u64,
        blake3: blake3::hash(&seg).to_hex().to_string(),
    };
    let (mut send, mut recv) = conn.open(&request).await.unwrap();
    send.write_all(&body[..sent]).await.unwrap();
    // No more body, no FIN: the stream stays open while the client waits for an answer.
    let answer = tokio::time::timeout(WAIT_TIMEOUT, read_frame::<Response>(&mut recv))
        .await
        .unwrap_or_else(|_| {
            panic!(
                "archived still waited for the rest of a stalled body {WAIT_TIMEOUT:?} later \
                 (body_idle_timeout_secs = 2)\n{}",
                archive.diag()
            )
        });
    assert!(
        !matches!(answer, Ok(Response::Stored { .. })),
        "half a body was acknowledged as stored: {answer:?}"
    );
    let logged = walvault_tests::wait_for(
        "archived to log the stalled body it gave up",
        WAIT_TIMEOUT,
        || {
            archive
                .stderr_tail(50)
                .lines()
                .find(|l| l.contains("request body stalled"))
                .map(str::to_string)
        },
        || archive.diag(),
    );
    for field in ["cluster=main", "op=put_wal", "received=", "idle_secs=2"] {
        assert!(
            logged.contains(field),
            "the log line lacks {field}: {logged}"
        );
    }
    assert!(
        stored_objects(&archive).is_empty(),
        "the stalled upload left files in the store: {:?}",
        stored_objects(&archive)
    );
    assert!(archive.wal_list_json("main")["timelines"]
        .as_array()
        .is_none_or(|t| t.is_empty()));
    drop((send, recv));
    conn.close().await;

    let dir = TestDir::new("stalled-body");
    let path = put_file(&dir.join("src"), &name, &seg);
    let out = archive.archive_push(&push, &path);
    assert!(out.success(), "{}\n{}", out.describe(), archive.diag());
    let pull = archive.issue("main", "pull");
    assert!(
        get_bytes(&archive, &pull, &name, &dir).as_deref() == Some(&seg[..]),
        "the segment pushed after the stalled one did not come back intact"
    );
}
