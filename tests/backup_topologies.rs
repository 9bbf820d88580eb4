//! Backups beyond one primary on one timeline, with real PostgreSQL 15: a backup taken
//! from a streaming standby, and backups, restores and retention across a promotion
//! (timeline 2).

use std::fs;
use std::path::Path;

use walvault_tests::serde_json::Value;
use walvault_tests::*;

use crate::pg_backup::{
    archiving_primary, assert_times_between, backup, backup_id, backup_json, backups_json, markers,
    restore, server_clock, start_and_wait_promoted, try_backup, verifybackup, ACCOUNTS, CLUSTER,
};

/// A streaming standby of `primary` (pg_basebackup -R; its postgresql.conf is the
/// primary's, so it archives after a promotion) with `extra` settings; started, caught up.
fn streaming_standby(primary: &PgCluster, name: &str, extra: &[&str]) -> PgCluster {
    let mut standby = PgCluster::from_basebackup(primary, name, &["-X", "stream", "-R"]);
    standby.append_conf(&["hot_standby = on"]);
    standby.append_conf(extra);
    standby.start();
    wait_caught_up(primary, &standby);
    standby
}

/// Waits until `standby` has replayed everything `primary` has written so far.
fn wait_caught_up(primary: &PgCluster, standby: &PgCluster) {
    let target = primary.psql("SELECT pg_current_wal_lsn()");
    wait_until(
        &format!("{} to replay up to {target}", standby.name()),
        WAIT_TIMEOUT,
        || {
            standby
                .try_psql(&format!(
                    "SELECT pg_last_wal_replay_lsn() >= '{target}'::pg_lsn"
                ))
                .ok()
                .as_deref()
                == Some("t")
        },
        || format!("{}\n{}", standby.diag(), primary.diag()),
    );
}

/// `pushclient backup ARGS` against `pg` with `env`, which must succeed; the whole output.
fn backup_output(
    archive: &Archive,
    push: &Path,
    pg: &PgCluster,
    args: &[&str],
    env: &[(&str, &str)],
) -> Output {
    let out = try_backup(archive, push, pg, args, env);
    assert!(
        out.success(),
        "pushclient backup of {} failed\n{}\n{}\n{}",
        pg.name(),
        out.describe(),
        pg.diag(),
        archive.diag()
    );
    out
}

fn restored_label(c: &PgCluster) -> String {
    fs::read_to_string(c.data_dir().join("backup_label")).unwrap_or_else(|e| {
        panic!(
            "no backup_label in the restored {}: {e}",
            c.data_dir().display()
        )
    })
}

/// `pushclient backup` pointed at a streaming standby (archive_mode off there: the
/// primary archives): without a way to reach the primary
/// it waits for the primary to complete the segment holding its stop LSN and says so
/// (exit 1 after --wal-timeout, usable as soon as the primary switches); with
/// `--primary-conninfo` it switches WAL on the primary itself (an SQL session there) and
/// exits 0, its times on the standby's clock even with pushclient's clock skewed. The restored
/// standby backup (BACKUP FROM: standby) passes pg_verifybackup, replays the primary's
/// later WAL from the archive and equals the primary.
#[test]
fn backup_from_a_standby_waits_for_the_primary_to_archive_its_wal() {
    let archive = Archive::start(CLUSTER);
    let push = archive.issue(CLUSTER, "push");
    let pull = archive.issue(CLUSTER, "pull");
    let primary = archiving_primary(&archive, &push, &[]);
    primary.pgbench_init(1);
    primary.psql("CREATE TABLE marker (id int PRIMARY KEY)");
    primary.psql("INSERT INTO marker VALUES (1)");
    // A standby that does not archive itself (its primary does): not a reason to refuse.
    let standby = streaming_standby(&primary, "standby", &["archive_mode = off"]);
    // A recent checkpoint for the standby's restartpoint, so the backup starts near here.
    primary.psql("CHECKPOINT");
    wait_caught_up(&primary, &standby);
    // pg_basebackup switched WAL on the primary: let that segment be archived first.
    wait_until(
        "the primary to archive everything ready",
        WAIT_TIMEOUT,
        || {
            fs::read_dir(primary.wal_dir().join("archive_status"))
                .unwrap()
                .flatten()
                .all(|e| !e.file_name().to_string_lossy().ends_with(".ready"))
        },
        || format!("{}\n{}", primary.archiver_stats(), archive.diag()),
    );
    let done_before = primary.archived_segments().len();

    // Nothing switches WAL on the idle primary: the backup is committed, waits, and says
    // what would end the wait.
    let out = try_backup(
        &archive,
        &push,
        &standby,
        &["--fast", "--wal-timeout", "3"],
        &[],
    );
    assert_eq!(
        out.code(),
        Some(1),
        "{}\n{}",
        out.describe(),
        archive.diag()
    );
    assert!(
        out.stdout.contains("backed up a standby") && out.stderr.contains("--primary-conninfo"),
        "the standby backup should say why it waits and what ends the wait\n{}",
        out.describe()
    );
    let waiting = backup_id(&out);
    assert_eq!(backup_json(&archive, &waiting)["state"], "incomplete-wal");
    assert_eq!(
        primary.archived_segments().len(),
        done_before,
        "the primary archived a segment meanwhile: the wait above proved nothing"
    );
    let switched = primary.switch_wal();
    primary.wait_archived(&switched, || archive.diag());
    wait_until(
        "the standby backup to become usable once the primary archived its last segment",
        WAIT_TIMEOUT,
        || backup_json(&archive, &waiting)["state"] == "usable",
        || format!("{:#?}\n{}", backups_json(&archive), archive.diag()),
    );

    // With the primary's address, pushclient switches WAL there and the backup is usable
    // at once.
    primary.psql("INSERT INTO marker VALUES (2)");
    primary.pgbench(&["-n", "-t", "200"]);
    wait_caught_up(&primary, &standby);
    let conninfo = format!(
        "host={} port={PG_PORT} user=postgres dbname=postgres",
        primary.sock_dir().display()
    );
    // pushclient's wall clock two hours ahead: the backup's times are the standby's clock.
    let skew = SkewedClock::build(2 * 3600);
    let preload = skew.library().to_string_lossy().into_owned();
    let before = server_clock(&standby, false);
    let out = backup_output(
        &archive,
        &push,
        &standby,
        &["--fast", "--primary-conninfo", &conninfo],
        &[("LD_PRELOAD", preload.as_str())],
    );
    let after = server_clock(&standby, true);
    assert!(
        out.stdout.contains("asked the primary to switch WAL"),
        "{}",
        out.describe()
    );
    let id = backup_id(&out);
    let b = backup_json(&archive, &id);
    assert_eq!(b["state"], "usable", "{b:#}");
    assert_times_between(&b, before, after);

    // A role the primary does not let run pg_switch_wal(): the backup is committed, and
    // the command fails with PostgreSQL's own error and SQLSTATE.
    primary.psql("CREATE ROLE bk_noswitch LOGIN");
    let unprivileged = format!(
        "host={} port={PG_PORT} user=bk_noswitch dbname=postgres",
        primary.sock_dir().display()
    );
    let out = try_backup(
        &archive,
        &push,
        &standby,
        &["--fast", "--primary-conninfo", &unprivileged],
        &[],
    );
    assert_eq!(out.code(), Some(1), "{}", out.describe());
    assert!(
        out.stderr
            .contains("permission denied for function pg_switch_wal")
            && out.stderr.contains("SQLSTATE 42501"),
        "{}",
        out.describe()
    );

    // --primary-conninfo must name the primary of this system, and only for a standby.
    let out = try_backup(
        &archive,
        &push,
        &primary,
        &["--fast", "--primary-conninfo", &conninfo],
        &[],
    );
    assert_eq!(out.code(), Some(1), "{}", out.describe());
    assert!(out.stderr.contains("not in recovery"), "{}", out.describe());

    primary.psql("INSERT INTO marker VALUES (3)");
    let expected = primary.psql(ACCOUNTS);
    let last = primary.switch_wal();
    primary.wait_archived(&last, || archive.diag());

    let mut restored = restore(&archive, &pull, "from-standby", &["--backup", &id]);
    assert!(
        restored_label(&restored).contains("BACKUP FROM: standby"),
        "{}",
        restored_label(&restored)
    );
    verifybackup(&restored, None);
    start_and_wait_promoted(&mut restored);
    assert_eq!(restored.psql(ACCOUNTS), expected, "{}", restored.diag());
    assert_eq!(markers(&restored), "1,2,3");
}

fn wal_timeline(listing: &Value, tli: u64) -> Option<&Value> {
    listing["timelines"]
        .as_array()?
        .iter()
        .find(|t| t["timeline"].as_u64() == Some(tli))
}

fn retention(archive: &Archive, keep_full: &str) -> Value {
    let out = archive.admin(&["retention", "run", "--keep-full", keep_full, "--json"]);
    serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("retention --json is not JSON ({e})\n{}", out.describe()))
}

/// A standby promoted to timeline 2 archives into the same cluster. A backup taken on
/// timeline 2 restores and recovers to a point on timeline 2; a backup from timeline 1
/// restored to that point follows 00000002.history. Retention that keeps the timeline-1
/// backup keeps every timeline-2 segment it needs (PITR still works afterwards); once
/// only the timeline-2 backup is kept, timeline 1's old WAL goes, the history file stays,
/// and the backup still restores.
#[test]
fn backups_across_a_timeline_switch_and_retention_keeps_what_they_need() {
    let archive = Archive::start(CLUSTER);
    let push = archive.issue(CLUSTER, "push");
    let pull = archive.issue(CLUSTER, "pull");
    let mut primary = archiving_primary(&archive, &push, &[]);
    primary.pgbench_init(1);
    primary.psql("CREATE TABLE marker (id int PRIMARY KEY)");
    let oldest = backup(&archive, &push, &primary, &["--fast"]);
    primary.pgbench(&["-n", "-t", "200"]);
    primary.switch_wal();
    let on_tli1 = backup(&archive, &push, &primary, &["--fast"]);
    primary.psql("INSERT INTO marker VALUES (1)");
    let standby = streaming_standby(&primary, "new-primary", &[]);
    let last_tli1 = primary.switch_wal();
    primary.wait_archived(&last_tli1, || archive.diag());
    wait_caught_up(&primary, &standby);
    primary.stop();

    standby.promote();
    wait_until(
        "the standby to leave recovery",
        WAIT_TIMEOUT,
        || {
            standby
                .try_psql("SELECT pg_is_in_recovery()")
                .ok()
                .as_deref()
                == Some("f")
        },
        || standby.diag(),
    );
    let new_primary = standby;
    let current = new_primary.psql("SELECT pg_walfile_name(pg_current_wal_lsn())");
    assert!(
        current.starts_with("00000002"),
        "not on timeline 2: {current}"
    );
    new_primary.wait_archived("00000002.history", || archive.diag());
    new_primary.psql("INSERT INTO marker VALUES (2)");
    let on_tli2 = backup(&archive, &push, &new_primary, &["--fast"]);
    let b2 = backup_json(&archive, &on_tli2);
    assert_eq!(b2["timeline"], 2, "{b2:#}");
    assert_eq!(b2["state"], "usable", "{b2:#}");
    new_primary.psql("INSERT INTO marker VALUES (3)");
    new_primary.psql("SELECT pg_create_restore_point('on-tli2')");
    new_primary.psql("INSERT INTO marker VALUES (4)");
    let expected = new_primary.psql(ACCOUNTS);
    let last = new_primary.switch_wal();
    new_primary.wait_archived(&last, || archive.diag());

    let pitr = ["--target-name", "on-tli2", "--target-action", "promote"];
    let restore_to_point = |name: &str, id: &str| {
        let mut args = vec!["--backup", id];
        args.extend_from_slice(&pitr);
        let mut c = restore(&archive, &pull, name, &args);
        verifybackup(&c, None);
        start_and_wait_promoted(&mut c);
        assert_eq!(markers(&c), "1,2,3", "{name}\n{}", c.diag());
        assert!(
            c.log().contains("restored log file \"00000002.history\""),
            "{name} did not follow the history file\n{}",
            c.diag()
        );
        c
    };

    // The timeline-2 backup, to a point on timeline 2.
    restore_to_point("tli2-to-point", &on_tli2).stop();

    // Keep the two newest: the oldest backup and timeline 1's WAL before the timeline-1
    // backup go, every timeline-2 file stays, and the timeline-1 backup still reaches
    // the point on timeline 2 through the history file.
    let wal_before = archive.wal_list_json(CLUSTER);
    let report = retention(&archive, "2");
    let c = &report["clusters"][0];
    assert_eq!(
        c["expired_backups"],
        serde_json::json!([oldest]),
        "{report:#}"
    );
    // Per timeline: counts and the first and last names.
    let expired = c["expired_wal"].as_array().unwrap();
    assert!(!expired.is_empty(), "{report:#}");
    assert!(
        expired.iter().all(|e| e["timeline"] == 1
            && [&e["first"], &e["last"]].iter().all(|n| n
                .as_str()
                .is_some_and(|n| n.starts_with("00000001") && !n.ends_with(".history")))),
        "retention expired a file of timeline 2 or a history file: {expired:?}"
    );
    let wal_after = archive.wal_list_json(CLUSTER);
    assert_eq!(
        wal_timeline(&wal_after, 2),
        wal_timeline(&wal_before, 2),
        "timeline 2 changed"
    );
    assert_eq!(wal_after["history_files"], wal_before["history_files"]);
    restore_to_point("tli1-to-point-on-tli2", &on_tli1).stop();

    // Keep only the timeline-2 backup: timeline 1 keeps nothing before its start, the
    // history file stays, and it restores to the end of the archive.
    let report = retention(&archive, "1");
    let c = &report["clusters"][0];
    assert_eq!(
        c["expired_backups"],
        serde_json::json!([on_tli1]),
        "{report:#}"
    );
    let listing = archive.wal_list_json(CLUSTER);
    let history: Vec<&str> = listing["history_files"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v.as_str().or_else(|| v["name"].as_str()))
        .collect();
    assert!(
        history.iter().any(|h| h.contains("00000002.history")),
        "the history file was expired: {listing:#}"
    );
    let wal_start = b2["wal_start"].as_str().unwrap();
    let tli2 = wal_timeline(&listing, 2).expect("timeline 2 vanished");
    assert!(
        tli2["first"].as_str().unwrap() <= wal_start,
        "timeline 2 lost WAL the kept backup needs: {listing:#}"
    );
    if let Some(tli1) = wal_timeline(&listing, 1) {
        let segno = |s: &str| u64::from_str_radix(&s[8..], 16).unwrap();
        assert!(
            segno(tli1["first"].as_str().unwrap()) >= segno(wal_start),
            "timeline 1 kept WAL older than every kept backup: {listing:#}"
        );
    }
    let mut last = restore(&archive, &pull, "tli2-after-retention", &[]);
    verifybackup(&last, None);
    start_and_wait_promoted(&mut last);
    assert_eq!(markers(&last), "1,2,3,4", "{}", last.diag());
    assert_eq!(last.psql(ACCOUNTS), expected);
}
