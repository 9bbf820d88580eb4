//! archived with its store on S3: a real `moto_server` on 127.0.0.1 (PyPI `moto[server]`,
//! started per test), real PostgreSQL 15 pushing to and restoring from it.
//!
//! The archive is configured the way an operator would: `storage = "s3://BUCKET/PREFIX"`,
//! the endpoint in `[storage_options]`, credentials and region in `AWS_*` variables.
//! What lands in the bucket is checked with an independent S3 client (object_store).

use std::fs;
use std::path::Path;

use object_store::{ObjectStore, PutMode, PutOptions, PutPayload};
use walvault_tests::serde_json::Value;
use walvault_tests::*;

use crate::pg_backup::{
    archiving_primary, backup, backups_json, start_and_wait_promoted, try_pullclient, verifybackup,
    ACCOUNTS, CLUSTER,
};
use crate::promises::{fake_segment, put_file, seg_name};

const BUCKET: &str = "walvault";

/// A segment of `seg_size` bytes with a valid PostgreSQL 15 long page header and
/// incompressible content (so its stored object is as large as the segment).
fn random_segment(seg_size: usize, segno: u64, sysid: u64, salt: u64) -> Vec<u8> {
    synthetic_segment(seg_size, 1, segno, sysid, SegmentFill::Random(salt))
}

/// `archive-get NAME` into a fresh file; its bytes, or `None` when archive-get exits 1.
fn get(archive: &Archive, pull: &Path, name: &str, dir: &TestDir) -> Option<Vec<u8>> {
    let out_dir = dir.subdir("got");
    chown_pg(&out_dir);
    let dest = out_dir.join(format!("{name}.{}", std::process::id()));
    let _ = fs::remove_file(&dest);
    let out = archive.archive_get(pull, name, &dest);
    if out.success() {
        let bytes = fs::read(&dest).unwrap();
        fs::remove_file(&dest).unwrap();
        return Some(bytes);
    }
    assert_eq!(
        out.code(),
        Some(1),
        "{}\n{}",
        out.describe(),
        archive.diag()
    );
    None
}

fn push_refused_as_different(archive: &Archive, push: &Path, file: &Path, what: &str) {
    let out = archive.archive_push(push, file);
    assert_eq!(
        out.code(),
        Some(1),
        "{what}: different content under an archived name was accepted\n{}\n{}",
        out.describe(),
        archive.diag()
    );
    assert!(
        out.stderr.contains("different"),
        "{what}: the refusal should say the content differs\n{}",
        out.describe()
    );
}

/// WAL and a base backup go to S3 (nothing to the local disk); after the catalog is
/// deleted and rebuilt from the bucket every segment and backup is listed as before; a
/// restore from that rebuilt archive replays the WAL through archive-get and equals the
/// primary, checked by pg_verifybackup and PostgreSQL.
#[test]
fn s3_store_archives_backs_up_rebuilds_its_catalog_and_restores() {
    let moto = MotoServer::start();
    let mut archive = Archive::start_s3(CLUSTER, &moto, BUCKET, "archive");
    let push = archive.issue(CLUSTER, "push");
    let pull = archive.issue(CLUSTER, "pull");
    let primary = archiving_primary(&archive, &push, &[]);
    primary.pgbench_init(1);
    let id = backup(&archive, &push, &primary, &["--fast"]);
    primary.psql("CREATE TABLE after_backup AS SELECT generate_series(1, 4321) AS id");
    primary.pgbench(&["-n", "-t", "300"]);
    let expected = primary.psql(ACCOUNTS);
    let last = primary.switch_wal();
    primary.wait_archived(&last, || archive.diag());

    // /readyz's probe write goes to the bucket (create-only, then deleted) and passes;
    // /metrics reads the newest segment's time from it.
    let addr = archive.metrics_addr();
    assert_eq!(
        crate::pg_metrics::get(addr, "/readyz", &[]),
        (200, "ready\n".to_string())
    );
    let (_, scrape) = crate::pg_metrics::get(addr, "/metrics", &[]);
    let archived_at =
        format!("walvault_wal_last_archived_timestamp_seconds{{cluster=\"{CLUSTER}\"}}");
    assert!(
        crate::pg_metrics::sample(&scrape, &archived_at).is_some(),
        "{scrape}"
    );

    let keys = moto.list_keys(BUCKET, "archive");
    assert!(
        !keys.iter().any(|k| k.contains("_readyz")),
        "the readiness probe was left in the bucket: {keys:#?}"
    );
    let has = |prefix: &str| keys.iter().any(|k| k.starts_with(prefix));
    assert!(
        has(&format!("archive/{CLUSTER}/wal/00000001/{last}.zst")),
        "the last segment is not in the bucket: {keys:#?}"
    );
    assert!(
        has(&format!("archive/{CLUSTER}/backups/{id}/manifest.zst")),
        "the manifest is not in the bucket: {keys:#?}"
    );
    let packs = keys
        .iter()
        .filter(|k| k.starts_with(&format!("archive/{CLUSTER}/packs/")) && k.ends_with(".pack"))
        .count();
    assert!(
        packs >= 1,
        "no pack of backup chunks in the bucket: {keys:#?}"
    );
    assert!(
        !keys.iter().any(|k| k.contains(".uploads/")),
        "temporary uploads left in the bucket: {keys:#?}"
    );
    assert!(
        !archive.data_dir().join("store").exists(),
        "an S3 archive wrote a local store"
    );

    // The catalog is only an index: delete it, restart, and the bucket rebuilds it.
    let wal_before = archive.wal_list_json(CLUSTER);
    let backups_before = backups_json(&archive);
    archive.stop();
    fs::remove_dir_all(archive.data_dir().join("catalog")).unwrap();
    archive.serve();
    assert!(
        archive.stderr_tail(40).contains("catalog rebuilt"),
        "archived did not say it rebuilt the catalog\n{}",
        archive.diag()
    );
    assert_eq!(archive.wal_list_json(CLUSTER), wal_before);
    assert_eq!(backups_json(&archive), backups_before);
    assert_eq!(backups_before[0]["state"], "usable", "{backups_before:#?}");

    let mut restored = PgCluster::empty("from-s3");
    let dir = restored.data_dir().to_string_lossy().into_owned();
    let out = try_pullclient(&archive, &pull, &["restore", "--pgdata", &dir]);
    assert!(out.success(), "{}\n{}", out.describe(), archive.diag());
    crate::pg_backup::no_archiving(&restored);
    verifybackup(&restored, None);
    start_and_wait_promoted(&mut restored);
    assert_eq!(restored.psql(ACCOUNTS), expected, "{}", restored.diag());
    assert_eq!(restored.psql("SELECT count(*) FROM after_backup"), "4321");
    assert!(
        restored
            .log()
            .contains(&format!("restored log file \"{last}\"")),
        "the restore did not replay the last segment from the S3 archive\n{}",
        restored.diag()
    );
    restored.stop();

    // Deleting the only backup and running retention collects its packs from the bucket.
    let id = backups_before[0]["id"].as_str().unwrap().to_string();
    archive.admin(&["backups", "delete", &id, "--cluster", CLUSTER]);
    let run = archive.admin(&["retention", "run", "--chunk-grace", "0s", "--json"]);
    let report: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    let c = &report["clusters"][0];
    assert!(c["collected_packs"].as_u64().unwrap() >= 1, "{report:#}");
    let keys = moto.list_keys(BUCKET, "archive");
    assert!(
        !keys.iter().any(|k| k.contains("/packs/")),
        "packs left in the bucket after their last backup went: {keys:#?}"
    );
    assert!(
        keys.iter().any(|k| k.contains(&format!("{last}.zst"))),
        "retention removed WAL with no backup to anchor it: {keys:#?}"
    );
}

/// Never overwrite, on S3: moto honours `If-None-Match: *` (checked first, or the rest
/// would prove nothing); a different segment under an archived name is refused by the
/// catalog, and, when a second archived on the same bucket does not know the name, by
/// the store itself, for a one-PUT object and for a streamed (multipart) one. The
/// original stays and is what both servers serve.
#[test]
fn s3_never_overwrites_even_behind_the_catalogs_back() {
    let moto = MotoServer::start();
    let raw = moto.bucket_store(BUCKET);
    moto.create_bucket(BUCKET);
    let probe = object_store::path::Path::from("probe");
    let create = || PutOptions {
        mode: PutMode::Create,
        ..Default::default()
    };
    block_on(raw.put_opts(&probe, PutPayload::from_static(b"one"), create()))
        .unwrap_or_else(|e| panic!("a create-only PUT on moto_server failed: {e}"));
    let second = block_on(raw.put_opts(&probe, PutPayload::from_static(b"two"), create()));
    assert!(
        matches!(second, Err(object_store::Error::AlreadyExists { .. })),
        "moto_server ignores If-None-Match: *: the create-only tests would prove nothing ({second:?})"
    );
    let kept = block_on(async { raw.get(&probe).await?.bytes().await }).unwrap();
    assert_eq!(&kept[..], b"one");

    let first = Archive::start_s3(CLUSTER, &moto, BUCKET, "shared");
    let (push1, pull1) = (first.issue(CLUSTER, "push"), first.issue(CLUSTER, "pull"));
    let (big_push1, big_pull1) = (first.issue("big", "push"), first.issue("big", "pull"));
    let dir = TestDir::new("s3-create-only");
    const SYSID: u64 = 7_111_222_333;

    // Through the catalog.
    let a = fake_segment(1, 3, SYSID);
    let mut a_changed = a.clone();
    a_changed[(16 << 20) / 2] ^= 0xFF;
    let name3 = seg_name(1, 3);
    let p = put_file(&dir.join("a"), &name3, &a);
    let out = first.archive_push(&push1, &p);
    assert!(out.success(), "{}\n{}", out.describe(), first.diag());
    let out = first.archive_push(&push1, &p);
    assert!(
        out.success(),
        "identical re-push refused\n{}",
        out.describe()
    );
    let p = put_file(&dir.join("a-changed"), &name3, &a_changed);
    push_refused_as_different(&first, &push1, &p, "catalog");
    assert!(get(&first, &pull1, &name3, &dir) == Some(a.clone()));

    // A 32 MiB incompressible segment: its object is over SINGLE_PUT_MAX, so it streams.
    const BIG: usize = 32 << 20;
    let big = random_segment(BIG, 1, SYSID + 1, 1);
    let big_name = "000000010000000000000001";
    let p = put_file(&dir.join("big"), big_name, &big);
    let out = first.archive_push(&big_push1, &p);
    assert!(out.success(), "{}\n{}", out.describe(), first.diag());

    // A second server on the same bucket and prefix, started now: its catalog (rebuilt
    // from the bucket) knows segment 3 and the big one, not what the first stores next.
    let mut second = Archive::start_s3(CLUSTER, &moto, BUCKET, "shared");
    let (push2, pull2) = (second.issue(CLUSTER, "push"), second.issue(CLUSTER, "pull"));
    let big_pull2 = second.issue("big", "pull");
    assert!(get(&second, &pull2, &name3, &dir) == Some(a.clone()));
    let b = fake_segment(1, 4, SYSID);
    let mut b_changed = b.clone();
    b_changed[100_000] ^= 0x55;
    let name4 = seg_name(1, 4);
    let p = put_file(&dir.join("b"), &name4, &b);
    let out = first.archive_push(&push1, &p);
    assert!(out.success(), "{}\n{}", out.describe(), first.diag());
    let p = put_file(&dir.join("b-changed"), &name4, &b_changed);
    push_refused_as_different(&second, &push2, &p, "store, one PUT");

    // The same for a streamed object: a big segment the second server has not seen.
    let big2 = random_segment(BIG, 2, SYSID + 1, 3);
    let big2_changed = random_segment(BIG, 2, SYSID + 1, 4);
    let big2_name = "000000010000000000000002";
    let p = put_file(&dir.join("big2"), big2_name, &big2);
    let out = first.archive_push(&big_push1, &p);
    assert!(out.success(), "{}\n{}", out.describe(), first.diag());
    let big_push2 = second.issue("big", "push");
    let p = put_file(&dir.join("big2-changed"), big2_name, &big2_changed);
    push_refused_as_different(&second, &big_push2, &p, "store, streamed");

    // The originals stay: served by the first server, and by the second once it reindexes.
    assert!(get(&first, &pull1, &name4, &dir) == Some(b.clone()));
    assert!(get(&first, &big_pull1, big2_name, &dir) == Some(big2.clone()));
    second.stop();
    fs::remove_dir_all(second.data_dir().join("catalog")).unwrap();
    second.serve();
    assert!(get(&second, &pull2, &name4, &dir) == Some(b));
    assert!(get(&second, &big_pull2, big2_name, &dir) == Some(big2));
    assert!(get(&second, &big_pull2, big_name, &dir) == Some(big));
    let keys = moto.list_keys(BUCKET, "shared");
    assert!(
        !keys.iter().any(|k| k.contains(".uploads/")),
        "temporary uploads left in the bucket: {keys:#?}"
    );
}

/// A 256 MiB incompressible segment pushed to an S3 archive streams as a multipart
/// upload: archived's peak memory stays far below the object's size (it used to read
/// the whole object before its PUT), and archive-get returns it intact.
#[test]
fn s3_large_segment_uploads_with_bounded_memory() {
    const SEG: usize = 256 << 20;
    let moto = MotoServer::start();
    let archive = Archive::start_s3("big", &moto, BUCKET, "big");
    let push = archive.issue("big", "push");
    let pull = archive.issue("big", "pull");
    let dir = TestDir::new("s3-big");
    let seg = random_segment(SEG, 1, 4242, 0);
    let expected = blake3::hash(&seg);
    let name = "000000010000000000000001";
    let path = put_file(&dir.join("src"), name, &seg);
    drop(seg);
    let rss_before = archive.peak_rss();
    let out = archive.archive_push(&push, &path);
    assert!(out.success(), "{}\n{}", out.describe(), archive.diag());
    let rss = archive.peak_rss();
    fs::remove_file(&path).unwrap();

    let out_dir = dir.subdir("out");
    chown_pg(&out_dir);
    let dest = out_dir.join(name);
    let out = archive.archive_get(&pull, name, &dest);
    assert!(out.success(), "{}\n{}", out.describe(), archive.diag());
    assert_eq!(
        walvault_tests::b3_file(&dest),
        expected,
        "the segment came back different"
    );

    let listing: Value = archive.wal_list_json("big");
    assert_eq!(listing["timelines"][0]["segments"], 1, "{listing:#}");
    let growth = rss.saturating_sub(rss_before);
    eprintln!(
        "archived peak RSS {} MiB before the push, {} MiB after storing a 256 MiB object on S3",
        rss_before >> 20,
        rss >> 20
    );
    // Parts in flight are 40 MiB by design (store.rs); the rest is slack for QUIC and
    // allocator buffers. Holding the object whole would grow the peak by over 256 MiB.
    const BOUND: u64 = 100 << 20;
    assert!(
        growth < BOUND,
        "archived's peak RSS grew by {} MiB storing a 256 MiB object on S3: the upload must stream",
        growth >> 20
    );
}
