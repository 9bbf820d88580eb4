//! Finding 1: backups and chunk collection side by side. Retention with no grace period
//! runs in a loop while backups run one after the other: a running backup's chunks are
//! kept by its lease, so every backup commits, and every one restores and passes
//! pg_verifybackup.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use walvault_tests::*;

use crate::pg_backup::{archiving_primary, restore, try_backup, verifybackup, CLUSTER};

#[test]
fn backups_commit_and_restore_while_retention_collects_with_no_grace() {
    let archive = Archive::start(CLUSTER);
    let push = archive.issue(CLUSTER, "push");
    let pull = archive.issue(CLUSTER, "pull");
    let primary = archiving_primary(&archive, &push, &[]);
    primary.pgbench_init(2);
    primary.switch_wal();

    let stop = AtomicBool::new(false);
    let runs = AtomicUsize::new(0);
    let mut ids = Vec::new();
    std::thread::scope(|s| {
        let collector = s.spawn(|| {
            while !stop.load(Ordering::SeqCst) {
                let out = archive.try_admin(&["retention", "run", "--chunk-grace", "0s"]);
                assert!(out.success(), "retention run failed\n{}", out.describe());
                runs.fetch_add(1, Ordering::SeqCst);
            }
        });
        for round in 0..3 {
            primary.pgbench(&["-n", "-t", "300", "-c", "2"]);
            primary.switch_wal();
            let before = runs.load(Ordering::SeqCst);
            let out = try_backup(
                &archive,
                &push,
                &primary,
                &["--fast", "--max-rate", "16384"],
                &[],
            );
            let during = runs.load(Ordering::SeqCst) - before;
            if !out.success() {
                stop.store(true, Ordering::SeqCst);
                panic!(
                    "backup {round} failed beside retention --chunk-grace 0s ({during} runs during it)\n{}\n{}",
                    out.describe(),
                    archive.diag()
                );
            }
            assert!(
                during > 0,
                "no retention run completed while backup {round} ran: the test proves nothing"
            );
            ids.push(crate::pg_backup::backup_id(&out));
        }
        stop.store(true, Ordering::SeqCst);
        if collector.join().is_err() {
            panic!("the retention loop failed\n{}", archive.diag());
        }
    });
    // Collection kept running after the last backup: what is referenced stays.
    let out = archive.admin(&["retention", "run", "--chunk-grace", "0s"]);
    assert!(out.success());
    for (i, id) in ids.iter().enumerate() {
        let restored = restore(&archive, &pull, &format!("gc-{i}"), &["--backup", id]);
        verifybackup(&restored, None);
    }
}
