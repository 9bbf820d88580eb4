//! `archived retention run --keep-within DURATION` end to end: real backups of a real
//! PostgreSQL 15 with different stop times, the plan `--dry-run --json` prints, and what a
//! real run deletes. The window is measured back from a chosen time (the hidden `--now`),
//! not from whenever the run happens to start, so no test waits on the wall clock
//! beyond making two stop times differ.

use std::fs;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use walvault_tests::serde_json::{json, Value};
use walvault_tests::*;

use crate::pg_backup::{
    archiving_primary, backup, backup_json, backups_json, restore, start_and_wait_promoted,
    verifybackup, CLUSTER,
};

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// `retention run ARGS --json`, parsed; the cluster's report.
fn retention(archive: &Archive, args: &[&str]) -> Value {
    let mut all = vec!["retention", "run"];
    all.extend_from_slice(args);
    all.push("--json");
    let out = archive.admin(&all);
    let report: Value = serde_json::from_str(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "`retention run --json` printed something that is not JSON ({e})\n{}",
            out.describe()
        )
    });
    assert_eq!(
        report["dry_run"].as_bool(),
        Some(args.contains(&"--dry-run")),
        "{report:#}"
    );
    let clusters = report["clusters"].as_array().expect("clusters array");
    assert_eq!(clusters.len(), 1, "{report:#}");
    assert_eq!(clusters[0]["cluster"], CLUSTER, "{report:#}");
    clusters[0].clone()
}

fn ids(archive: &Archive) -> Vec<String> {
    backups_json(archive)
        .iter()
        .map(|b| b["id"].as_str().unwrap().to_string())
        .collect()
}

/// Three backups, the third stopping in a later second than the second. A window whose
/// start falls after the second and at the third keeps the third and, to restore to the
/// window's start, the second; a window covering all keeps all; a one-second window
/// keeps only the newest. `--dry-run` deletes
/// nothing. With `min_full = 2` the one-second window still keeps two backups, and the
/// real run deletes the oldest backup and the WAL before the oldest kept one, which
/// still restores.
#[test]
fn keep_within_keeps_the_window_and_its_anchor_honours_min_full_and_dry_run() {
    let mut archive = Archive::start(CLUSTER);
    let push = archive.issue(CLUSTER, "push");
    let pull = archive.issue(CLUSTER, "pull");
    let primary = archiving_primary(&archive, &push, &[]);
    primary.pgbench_init(1);
    let mut backups: Vec<String> = Vec::new();
    let stop = |id: &str| backup_json(&archive, id)["stop_time"].as_i64().unwrap();
    for i in 0..3 {
        if i == 2 {
            // Stop times are whole seconds: the third must stop in a later one.
            let t2 = stop(&backups[1]);
            wait_until(
                "the clock to pass the second backup's stop time",
                Duration::from_secs(5),
                || now() > t2,
                String::new,
            );
        }
        primary.pgbench(&["-n", "-t", "100"]);
        primary.switch_wal();
        backups.push(backup(&archive, &push, &primary, &["--fast"]));
    }
    let (t2, t3) = (stop(&backups[1]), stop(&backups[2]));
    assert!(
        t3 > t2,
        "the third backup stopped no later than the second: {:#?}",
        backups_json(&archive)
    );
    // Every run measures its window back from here (`--now`), whenever it starts.
    let window_end = t3 + 100;
    let at = window_end.to_string();
    // PostgreSQL archives a backup's history file (.backup) after the backup returns:
    // wait for all three, or the listing could change under the comparison below.
    wait_until(
        "the three backup history files to be archived",
        Duration::from_secs(60),
        || {
            archive.wal_list_json(CLUSTER)["backup_history_files"]
                .as_array()
                .is_some_and(|a| a.len() >= 3)
        },
        || archive.diag(),
    );
    let wal_before = archive.wal_list_json(CLUSTER);

    // The window starts at the third backup's stop time, after the second's.
    let window = format!("{}s", window_end - t3);
    let plan = retention(
        &archive,
        &["--keep-within", &window, "--now", &at, "--dry-run"],
    );
    assert_eq!(
        plan["kept_backups"],
        json!([backups[1], backups[2]]),
        "window {window}: {plan:#}"
    );
    assert_eq!(plan["expired_backups"], json!([backups[0]]), "{plan:#}");
    assert!(
        !plan["expired_wal"].as_array().unwrap().is_empty(),
        "the plan should show the WAL before the second backup: {plan:#}"
    );
    assert_eq!(ids(&archive), backups, "--dry-run deleted a backup");
    assert_eq!(
        archive.wal_list_json(CLUSTER),
        wal_before,
        "--dry-run deleted WAL"
    );

    let plan = retention(
        &archive,
        &["--keep-within", "1h", "--now", &at, "--dry-run"],
    );
    assert_eq!(plan["kept_backups"], json!(backups), "{plan:#}");
    assert_eq!(plan["expired_backups"], json!([]), "{plan:#}");

    let plan = retention(
        &archive,
        &["--keep-within", "1s", "--now", &at, "--dry-run"],
    );
    assert_eq!(plan["kept_backups"], json!([backups[2]]), "{plan:#}");
    assert_eq!(
        plan["expired_backups"],
        json!([backups[0], backups[1]]),
        "{plan:#}"
    );
    assert_eq!(ids(&archive), backups, "--dry-run deleted a backup");

    // min_full = 2 in archived.toml: the same window now keeps two, and a real run
    // deletes only the oldest.
    archive.stop();
    let config = archive.data_dir().join("archived.toml");
    let text = fs::read_to_string(&config).unwrap();
    assert!(text.contains("min_full = 1\n"), "{text}");
    fs::write(&config, text.replace("min_full = 1\n", "min_full = 2\n")).unwrap();
    archive.serve();
    let run = retention(&archive, &["--keep-within", "1s", "--now", &at]);
    assert_eq!(
        run["kept_backups"],
        json!([backups[1], backups[2]]),
        "{run:#}"
    );
    assert_eq!(run["expired_backups"], json!([backups[0]]), "{run:#}");
    assert_eq!(ids(&archive), backups[1..].to_vec());
    let kept_oldest = backup_json(&archive, &backups[1]);
    let wal_after = archive.wal_list_json(CLUSTER);
    assert_eq!(
        wal_after["timelines"][0]["first"], kept_oldest["wal_start"],
        "WAL before the oldest kept backup should be gone, and no more: {wal_after:#}"
    );

    let mut restored = restore(
        &archive,
        &pull,
        "oldest-kept",
        &[
            "--backup",
            &backups[1],
            "--target-immediate",
            "--target-action",
            "promote",
        ],
    );
    verifybackup(&restored, None);
    start_and_wait_promoted(&mut restored);
}
