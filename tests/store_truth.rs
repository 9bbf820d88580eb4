//! The store outranks the catalog (DESIGN promise 5, review finding 3), against a real
//! archived without PostgreSQL: objects deleted behind the catalog's back (an operator, a
//! bucket lifecycle rule, a crash between the two steps of a deletion) are never
//! vouched for by a catalog entry alone.

use std::fs;
use std::path::PathBuf;

use serde_json::Value;
use walvault_protocol::core::wire::Response;
use walvault_tests::{chown_pg, Archive, TestDir};

use crate::backup_promises::{connect, manifest, put_manifest};
use crate::promises::{fake_segment, put_file, seg_name};

const SYSID: u64 = 7;

/// The local store's file of a segment of timeline 1.
fn wal_object(archive: &Archive, name: &str) -> PathBuf {
    archive
        .data_dir()
        .join(format!("store/main/wal/00000001/{name}.zst"))
}

/// Commits a backup of no files whose WAL is segment 2 of timeline 1, through the raw
/// protocol.
async fn commit_backup(archive: &Archive, id: &str) {
    let conn = connect(archive, "main", "push").await;
    let answer = put_manifest(&conn, &manifest(id, Vec::new())).await;
    assert!(
        matches!(answer, Response::Stored { .. }),
        "backup {id} not committed: {answer:?}"
    );
}

fn backups(archive: &Archive) -> Vec<Value> {
    let out = archive.admin(&["backups", "list", "--cluster", "main", "--json"]);
    let v: Value = serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e})\n{}", out.describe()));
    v.as_array().cloned().unwrap_or_default()
}

fn state_of(archive: &Archive, id: &str) -> String {
    let all = backups(archive);
    let b = all
        .iter()
        .find(|b| b["id"] == id)
        .unwrap_or_else(|| panic!("backup {id} is not listed: {all:#?}"));
    b["state"].as_str().unwrap_or_default().to_string()
}

/// Before: the re-push was acknowledged as a duplicate from the catalog entry, and
/// nothing was stored.
#[test]
fn a_wal_object_deleted_behind_the_catalog_is_stored_again_by_the_next_push() {
    let archive = Archive::start("main");
    let push = archive.issue("main", "push");
    let dir = TestDir::new("store-truth-wal");
    let name = seg_name(1, 2);
    let p = put_file(&dir.join("wal"), &name, &fake_segment(1, 2, SYSID));
    let out = archive.archive_push(&push, &p);
    assert!(out.success(), "{}\n{}", out.describe(), archive.diag());
    let object = wal_object(&archive, &name);
    assert!(
        object.exists(),
        "{} is not where the test expects it",
        object.display()
    );

    fs::remove_file(&object).unwrap();
    let out = archive.archive_push(&push, &p);
    assert!(out.success(), "{}\n{}", out.describe(), archive.diag());
    assert!(
        object.exists(),
        "the re-push was acknowledged but nothing was stored (a catalog hit is not an object)\n{}",
        archive.diag()
    );
    let pull = archive.issue("main", "pull");
    let out_dir = dir.join("restored");
    fs::create_dir_all(&out_dir).unwrap();
    chown_pg(&out_dir);
    let dest = out_dir.join(&name);
    let out = archive.archive_get(&pull, &name, &dest);
    assert!(out.success(), "{}", out.describe());
    assert!(fs::read(&dest).unwrap() == fake_segment(1, 2, SYSID));
}

/// Before: still `usable` after its only WAL segment was deleted from the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backups_list_does_not_call_a_backup_usable_whose_wal_is_gone() {
    let archive = Archive::start("main");
    let push = archive.issue("main", "push");
    let dir = TestDir::new("store-truth-backup");
    let name = seg_name(1, 2);
    let p = put_file(&dir.join("wal"), &name, &fake_segment(1, 2, SYSID));
    let out = archive.archive_push(&push, &p);
    assert!(out.success(), "{}\n{}", out.describe(), archive.diag());
    commit_backup(&archive, "20260101T000000001Z").await;
    assert_eq!(state_of(&archive, "20260101T000000001Z"), "usable");

    fs::remove_file(wal_object(&archive, &name)).unwrap();
    assert_eq!(
        state_of(&archive, "20260101T000000001Z"),
        "incomplete-wal",
        "a backup whose WAL object is gone cannot restore"
    );
    // The next push of the segment makes it usable again.
    let out = archive.archive_push(&push, &p);
    assert!(out.success(), "{}", out.describe());
    assert_eq!(state_of(&archive, "20260101T000000001Z"), "usable");
}

/// Before: every retention run failed with "listed but its manifest is missing".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_forgets_a_listed_backup_whose_manifest_is_gone() {
    let archive = Archive::start("main");
    let push = archive.issue("main", "push");
    let dir = TestDir::new("store-truth-retention");
    let name = seg_name(1, 2);
    let p = put_file(&dir.join("wal"), &name, &fake_segment(1, 2, SYSID));
    assert!(archive.archive_push(&push, &p).success());
    commit_backup(&archive, "20260101T000000001Z").await;
    commit_backup(&archive, "20260101T000000002Z").await;
    let manifest = archive
        .data_dir()
        .join("store/main/backups/20260101T000000001Z/manifest.zst");
    assert!(
        manifest.exists(),
        "{} is not where the test expects it",
        manifest.display()
    );
    fs::remove_file(&manifest).unwrap();

    for _ in 0..2 {
        let out = archive.try_admin(&["retention", "run", "--cluster", "main", "--json"]);
        assert!(
            out.success(),
            "retention must cope with a listed backup whose manifest is gone\n{}",
            out.describe()
        );
    }
    let ids: Vec<Value> = backups(&archive).iter().map(|b| b["id"].clone()).collect();
    assert_eq!(
        ids,
        ["20260101T000000002Z"],
        "the phantom backup is still listed"
    );
}
