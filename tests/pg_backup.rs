//! Base backups, restores, point-in-time recovery, clones and retention with real
//! PostgreSQL 15.
//!
//! Every test has its own `archived` and PostgreSQL clusters. Restored clusters run with
//! `archive_mode = off`, so a promoted restore never pushes a new timeline into the
//! archive the other restores of the test read.

use std::fs;
use std::path::Path;
use std::process::Command;
use std::thread::sleep;
use std::time::Duration;

use walvault_tests::serde_json::Value;
use walvault_tests::*;

pub(crate) const CLUSTER: &str = "main";
pub(crate) const ACCOUNTS: &str = "SELECT count(*), sum(abalance) FROM pgbench_accounts";

pub(crate) use crate::pg_archive::archiving_primary;

/// `pushclient backup ARGS` as the `postgres` user against `pg`'s socket; no check.
pub(crate) fn try_backup(
    archive: &Archive,
    push: &Path,
    pg: &PgCluster,
    args: &[&str],
    env: &[(&str, &str)],
) -> Output {
    let mut cmd = Command::new(archive.bins().pushclient());
    as_pg_user(&mut cmd)
        .arg("backup")
        .args(args)
        .arg("--config")
        .arg(push)
        .env("PGHOST", pg.sock_dir())
        .env("PGPORT", PG_PORT.to_string())
        .current_dir("/tmp");
    for (k, v) in env {
        cmd.env(k, v);
    }
    try_run_timeout(&mut cmd, Duration::from_secs(300))
}

/// A backup that must succeed; its id.
pub(crate) fn backup(archive: &Archive, push: &Path, pg: &PgCluster, args: &[&str]) -> String {
    let out = try_backup(archive, push, pg, args, &[]);
    if !out.success() {
        panic!(
            "pushclient backup failed\n{}\n{}\n{}",
            out.describe(),
            pg.diag(),
            archive.diag()
        );
    }
    backup_id(&out)
}

pub(crate) fn backup_id(out: &Output) -> String {
    out.stdout
        .lines()
        .find_map(|l| {
            l.strip_prefix("backup ")
                .and_then(|r| r.split_once(" committed"))
        })
        .map(|(id, _)| id.to_string())
        .unwrap_or_else(|| {
            panic!(
                "no backup id in the output of pushclient backup\n{}",
                out.describe()
            )
        })
}

pub(crate) fn backups_json(archive: &Archive) -> Vec<Value> {
    let out = archive.admin(&["backups", "list", "--cluster", CLUSTER, "--json"]);
    let v: Value = serde_json::from_str(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "`backups list --json` is not JSON ({e})\n{}",
            out.describe()
        )
    });
    v.as_array().cloned().unwrap_or_default()
}

pub(crate) fn backup_json(archive: &Archive, id: &str) -> Value {
    backups_json(archive)
        .into_iter()
        .find(|b| b["id"] == id)
        .unwrap_or_else(|| panic!("backup {id} is not listed: {:#?}", backups_json(archive)))
}

/// `pullclient restore/clone ARGS` as `postgres`; no check.
pub(crate) fn try_pullclient(archive: &Archive, pull: &Path, args: &[&str]) -> Output {
    try_run_timeout(
        as_pg_user(&mut Command::new(archive.bins().pullclient()))
            .args(args)
            .arg("--config")
            .arg(pull)
            .current_dir("/tmp"),
        Duration::from_secs(300),
    )
}

/// Restores into a new cluster `name` with `args` (after `--pgdata DIR`); not started.
pub(crate) fn restore(archive: &Archive, pull: &Path, name: &str, args: &[&str]) -> PgCluster {
    let c = PgCluster::empty(name);
    let dir = c.data_dir().to_string_lossy().into_owned();
    let mut all = vec!["restore", "--pgdata", dir.as_str()];
    all.extend_from_slice(args);
    let out = try_pullclient(archive, pull, &all);
    if !out.success() {
        panic!(
            "pullclient restore into {name} failed\n{}\n{}",
            out.describe(),
            archive.diag()
        );
    }
    no_archiving(&c);
    c
}

/// `archive_mode = off` in postgresql.auto.conf (which pg_verifybackup ignores, unlike
/// postgresql.conf).
pub(crate) fn no_archiving(c: &PgCluster) {
    let auto = c.data_dir().join("postgresql.auto.conf");
    let mut text = fs::read_to_string(&auto).unwrap_or_default();
    text.push_str("archive_mode = off\n");
    fs::write(&auto, text).unwrap();
}

/// `pg_verifybackup` of a restored (not yet started) data directory; `wal_dir`: check
/// the backup's WAL from there too, else skip WAL parsing.
pub(crate) fn verifybackup(c: &PgCluster, wal_dir: Option<&Path>) {
    let mut cmd = pg_command("pg_verifybackup");
    match wal_dir {
        Some(w) => cmd.arg("-w").arg(w),
        None => cmd.arg("-n"),
    };
    cmd.arg(c.data_dir());
    let out = try_run(&mut cmd);
    assert!(
        out.success(),
        "pg_verifybackup of {} failed\n{}",
        c.name(),
        out.describe()
    );
}

/// Starts a restored cluster and waits until recovery ended (not in recovery).
pub(crate) fn start_and_wait_promoted(c: &mut PgCluster) {
    c.start();
    wait_until(
        &format!("{} to finish recovery", c.name()),
        WAIT_TIMEOUT,
        || c.try_psql("SELECT pg_is_in_recovery()").ok().as_deref() == Some("f"),
        || c.diag(),
    );
}

pub(crate) fn markers(c: &PgCluster) -> String {
    c.psql("SELECT coalesce(string_agg(id::text, ',' ORDER BY id), '') FROM marker")
}

/// Segment names from `first` to `last` (same timeline, 16 MiB segments).
pub(crate) fn segment_range(first: &str, last: &str) -> Vec<String> {
    let parse = |s: &str| {
        (
            s[..8].to_string(),
            u64::from_str_radix(&s[8..16], 16).unwrap() * 256
                + u64::from_str_radix(&s[16..], 16).unwrap(),
        )
    };
    let (tli, a) = parse(first);
    let (_, b) = parse(last);
    (a..=b)
        .map(|n| format!("{tli}{:08X}{:08X}", n / 256, n % 256))
        .collect()
}

/// Objects holding backup chunks in the store (packs and loose chunks).
/// Chunk and pack objects in the local store: committed ones only, never the `.tmp.*`
/// files an upload in progress writes beside them (counting those let the killed-backup
/// case below kill the backup before any chunk of it was stored).
fn store_chunks(archive: &Archive) -> usize {
    fn walk(dir: &Path) -> usize {
        fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| {
                if e.path().is_dir() {
                    walk(&e.path())
                } else if e.file_name().to_string_lossy().contains(".tmp.") {
                    0
                } else {
                    1
                }
            })
            .sum()
    }
    let cluster = archive.data_dir().join("store").join(CLUSTER);
    walk(&cluster.join("chunks")) + walk(&cluster.join("packs"))
}

/// PostgreSQL's clock now, whole seconds since the Unix epoch (rounded down, or up).
pub(crate) fn server_clock(pg: &PgCluster, round_up: bool) -> i64 {
    let f = if round_up { "ceil" } else { "floor" };
    let t = pg.psql(&format!(
        "SELECT {f}(extract(epoch from clock_timestamp()))::bigint"
    ));
    t.parse()
        .unwrap_or_else(|e| panic!("clock_timestamp() gave {t:?}: {e}"))
}

/// Asserts that backup `b` started and stopped between the server clock readings
/// `before` and `after` (PostgreSQL's clock, one-second resolution).
pub(crate) fn assert_times_between(b: &Value, before: i64, after: i64) {
    let (start, stop) = (
        b["start_time"].as_i64().unwrap(),
        b["stop_time"].as_i64().unwrap(),
    );
    assert!(
        before <= start && start <= stop && stop <= after,
        "backup times {start} .. {stop} are not within the server's clock readings {before} .. {after} \
         (taken just before and just after the backup)\n{b:#}"
    );
}

/// A backup's start and stop times are on PostgreSQL's clock (the one recovery targets
/// are compared with), not on the client's: with pushclient's wall clock two hours ahead,
/// they are still between the server's clock readings just before and after the backup,
/// and a recovery target between them still selects the backup.
#[test]
fn backup_times_are_the_servers_clock_not_a_skewed_clients() {
    let skew = SkewedClock::build(2 * 3600);
    let archive = Archive::start(CLUSTER);
    let push = archive.issue(CLUSTER, "push");
    let pull = archive.issue(CLUSTER, "pull");
    let primary = archiving_primary(&archive, &push, &[]);
    primary.psql("CREATE TABLE marker (id int PRIMARY KEY)");
    primary.psql("INSERT INTO marker VALUES (1)");
    let before = server_clock(&primary, false);
    let preload = skew.library().to_string_lossy().into_owned();
    let out = try_backup(
        &archive,
        &push,
        &primary,
        &["--fast"],
        &[("LD_PRELOAD", preload.as_str())],
    );
    assert!(out.success(), "{}\n{}", out.describe(), archive.diag());
    let after = server_clock(&primary, true);
    let id = backup_id(&out);
    let b = backup_json(&archive, &id);
    assert_eq!(b["state"], "usable", "{b:#}");
    assert_times_between(&b, before, after);

    // A target a second after the backup (on the server's clock) restores from it: with
    // the client's clock as stop time, the backup would look two hours younger than it
    // is and no backup would be usable for this target.
    next_second(&primary);
    next_second(&primary);
    let target = primary.psql(
        "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS') || '+00'",
    );
    next_second(&primary);
    primary.psql("INSERT INTO marker VALUES (2)");
    let last = primary.switch_wal();
    primary.wait_archived(&last, || archive.diag());
    let mut c = restore(
        &archive,
        &pull,
        "at-target",
        &[
            "--target-time",
            target.as_str(),
            "--target-action",
            "promote",
        ],
    );
    start_and_wait_promoted(&mut c);
    assert_eq!(markers(&c), "1", "{}", c.diag());
}

/// Returns once PostgreSQL's clock is in a later second than when this was called, so
/// what committed before and what happens after differ even at one-second resolution
/// (PostgreSQL waits on its own clock: the one recovery targets are compared with).
fn next_second(pg: &PgCluster) {
    pg.psql("SELECT pg_sleep_until(date_trunc('second', clock_timestamp()) + interval '1 second')");
}

/// Backup under pgbench load; full restore checked by pg_verifybackup (with the
/// archived WAL) and by PostgreSQL; then PITR by time, LSN and restore point.
#[test]
fn backup_under_load_restore_and_pitr() {
    let archive = Archive::start(CLUSTER);
    let push = archive.issue(CLUSTER, "push");
    let pull = archive.issue(CLUSTER, "pull");
    let primary = archiving_primary(&archive, &push, &[]);
    primary.pgbench_init(2);
    primary
        .psql("CREATE TABLE marker (id int PRIMARY KEY, at timestamptz DEFAULT clock_timestamp())");
    let load = primary.spawn_pgbench(&["-n", "-T", "60", "-c", "2"]);
    wait_until(
        "pgbench to commit its first transactions",
        WAIT_TIMEOUT,
        || primary.psql("SELECT count(*) > 0 FROM pgbench_history") == "t",
        || primary.diag(),
    );
    let id = backup(
        &archive,
        &push,
        &primary,
        &["--fast", "--label", "under load"],
    );
    drop(load);
    let b = backup_json(&archive, &id);
    assert_eq!(b["state"], "usable", "{b:#}");
    assert_eq!(b["label"], "under load");

    // Marker 1, then the points between, then marker 2.
    let xid1 = primary.psql("INSERT INTO marker (id) VALUES (1) RETURNING txid_current()");
    // psql prints the command tag after the returned row.
    let xid1 = xid1.lines().next().unwrap_or_default().to_string();
    next_second(&primary);
    let between_time = primary.psql(
        "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US') || '+00'",
    );
    let between_lsn = primary.psql("SELECT pg_current_wal_lsn()");
    primary.psql("SELECT pg_create_restore_point('between')");
    next_second(&primary);
    primary.psql("INSERT INTO marker (id) VALUES (2)");
    let expected = primary.psql(ACCOUNTS);
    let last = primary.switch_wal();
    primary.wait_archived(&last, || archive.diag());

    // Full restore: pg_verifybackup with the backup's WAL fetched from the archive.
    let mut full = restore(&archive, &pull, "full", &[]);
    let wal_dir = full.dir().subdir("backup-wal");
    chown_pg(&wal_dir);
    for seg in segment_range(
        b["wal_start"].as_str().unwrap(),
        b["wal_stop"].as_str().unwrap(),
    ) {
        let out = archive.archive_get(&pull, &seg, &wal_dir.join(&seg));
        assert!(out.success(), "archive-get {seg}\n{}", out.describe());
    }
    verifybackup(&full, Some(&wal_dir));
    start_and_wait_promoted(&mut full);
    assert_eq!(full.psql(ACCOUNTS), expected, "{}", full.diag());
    assert_eq!(markers(&full), "1,2");
    assert!(
        full.log().contains("restored log file"),
        "the restore did not replay from the archive\n{}",
        full.diag()
    );
    full.stop();

    for (name, args) in [
        (
            "pitr-time",
            vec![
                "--target-time",
                between_time.as_str(),
                "--target-action",
                "promote",
            ],
        ),
        (
            "pitr-lsn",
            vec![
                "--target-lsn",
                between_lsn.as_str(),
                "--target-action",
                "promote",
            ],
        ),
        (
            "pitr-name",
            vec!["--target-name", "between", "--target-action", "promote"],
        ),
        (
            "pitr-xid",
            vec!["--target-xid", xid1.as_str(), "--target-action", "promote"],
        ),
    ] {
        let mut c = restore(&archive, &pull, name, &args);
        verifybackup(&c, None);
        start_and_wait_promoted(&mut c);
        assert_eq!(
            markers(&c),
            "1",
            "{name}: expected marker 1 only\n{}",
            c.diag()
        );
        c.stop();
    }

    // A target before every backup is refused, and changes nothing.
    let early = restore_refused(
        &archive,
        &pull,
        &["--target-time", "2000-01-01 00:00:00+00"],
    );
    assert!(early.contains("no usable backup"), "{early}");
}

pub(crate) fn restore_refused(archive: &Archive, pull: &Path, args: &[&str]) -> String {
    let c = PgCluster::empty("refused");
    let dir = c.data_dir().to_string_lossy().into_owned();
    let mut all = vec!["restore", "--pgdata", dir.as_str()];
    all.extend_from_slice(args);
    let out = try_pullclient(archive, pull, &all);
    assert_eq!(
        out.code(),
        Some(1),
        "restore should have failed\n{}",
        out.describe()
    );
    assert!(
        !c.data_dir().exists(),
        "a refused restore created {}",
        c.data_dir().display()
    );
    out.stderr
}

/// SCRAM and md5 authentication; a second backup after changing 1% of the accounts
/// stores under 10% of the first; a delta restore over the first backup's copy equals
/// the primary; a non-empty PGDATA is refused without --delta.
#[test]
fn auth_incremental_and_delta_restore() {
    let archive = Archive::start(CLUSTER);
    let push = archive.issue(CLUSTER, "push");
    let pull = archive.issue(CLUSTER, "pull");
    let mut primary = archiving_primary(&archive, &push, &[]);
    primary.psql("SET password_encryption = 'scram-sha-256'; CREATE ROLE bk_scram LOGIN REPLICATION PASSWORD 'scram pw'");
    primary.psql(
        "SET password_encryption = 'md5'; CREATE ROLE bk_md5 LOGIN REPLICATION PASSWORD 'md5pw'",
    );
    fs::write(
        primary.data_dir().join("pg_hba.conf"),
        "local replication bk_scram scram-sha-256\nlocal replication bk_md5 md5\nlocal all postgres trust\nlocal replication postgres trust\n",
    )
    .unwrap();
    primary.psql("SELECT pg_reload_conf()");
    primary.pgbench_init(5);

    // Wrong password: a clear error, nothing listed.
    let out = try_backup(
        &archive,
        &push,
        &primary,
        &["--fast"],
        &[("PGUSER", "bk_scram"), ("PGPASSWORD", "wrong")],
    );
    assert_eq!(out.code(), Some(1), "{}", out.describe());
    assert!(
        out.stderr.contains("password authentication failed"),
        "{}",
        out.describe()
    );
    // No password at all: says how to give one.
    let out = try_backup(
        &archive,
        &push,
        &primary,
        &["--fast"],
        &[("PGUSER", "bk_scram"), ("PGPASSFILE", "/nonexistent")],
    );
    assert!(out.stderr.contains("PGPASSWORD"), "{}", out.describe());
    assert!(backups_json(&archive).is_empty());

    let first = {
        let out = try_backup(
            &archive,
            &push,
            &primary,
            &["--fast"],
            &[("PGUSER", "bk_scram"), ("PGPASSWORD", "scram pw")],
        );
        assert!(out.success(), "{}\n{}", out.describe(), archive.diag());
        backup_id(&out)
    };
    let old_copy = restore(&archive, &pull, "delta", &[]);

    primary.psql(
        "UPDATE pgbench_accounts SET abalance = abalance + 7 WHERE aid BETWEEN 100001 AND 105000",
    );
    let uri = format!(
        "postgresql://bk_md5:md5pw@/postgres?host={}&port={PG_PORT}",
        primary.sock_dir().display()
    );
    let second = backup(&archive, &push, &primary, &["--fast", "--conninfo", &uri]);
    let (b1, b2) = (
        backup_json(&archive, &first),
        backup_json(&archive, &second),
    );
    let (s1, s2) = (
        b1["stored_bytes"].as_u64().unwrap(),
        b2["stored_bytes"].as_u64().unwrap(),
    );
    eprintln!("first backup stored {s1} bytes, second {s2} bytes");
    assert!(
        s2 * 10 < s1,
        "second backup stored {s2} bytes, first {s1}: not under 10%\n{b1:#}\n{b2:#}"
    );
    assert!(
        b2["logical_bytes"].as_u64().unwrap() >= b1["logical_bytes"].as_u64().unwrap() * 9 / 10
    );

    let expected = primary.psql(ACCOUNTS);
    let last = primary.switch_wal();
    primary.wait_archived(&last, || archive.diag());
    primary.stop();

    // Without --delta an existing data directory is refused.
    let dir = old_copy.data_dir().to_string_lossy().into_owned();
    let out = try_pullclient(&archive, &pull, &["restore", "--pgdata", &dir]);
    assert_eq!(out.code(), Some(1), "{}", out.describe());
    assert!(
        out.stderr.contains("not empty") && out.stderr.contains("--delta"),
        "{}",
        out.describe()
    );

    // A stray file is removed by --delta.
    let stray = old_copy.data_dir().join("base").join("stray-file");
    fs::write(&stray, b"x").unwrap();
    let out = try_pullclient(
        &archive,
        &pull,
        &["restore", "--pgdata", &dir, "--delta", "--backup", &second],
    );
    assert!(out.success(), "{}", out.describe());
    assert!(
        !stray.exists(),
        "--delta left a file the backup does not have"
    );
    let rewritten: Vec<u64> = out
        .stdout
        .lines()
        .find(|l| l.trim_start().starts_with("files "))
        .map(|l| {
            l.split(", ")
                .filter_map(|p| p.split_whitespace().nth(1)?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    eprintln!("delta restore: {}", out.stdout.trim());
    assert!(
        rewritten.len() >= 2 && rewritten[1] * 5 < rewritten[0].max(1),
        "delta rewrote too much: {}",
        out.stdout
    );
    let mut copy = old_copy;
    no_archiving(&copy);
    verifybackup(&copy, None);
    start_and_wait_promoted(&mut copy);
    assert_eq!(copy.psql(ACCOUNTS), expected, "{}", copy.diag());
}

/// Three backups, keep 2: the oldest and the WAL only it needed go, both kept backups
/// restore; retention during a running backup leaves it intact; a backup killed
/// midway is never listed and its chunks are collected after the grace period.
#[test]
fn retention_and_killed_backup() {
    let mut archive = Archive::start(CLUSTER);
    let push = archive.issue(CLUSTER, "push");
    let pull = archive.issue(CLUSTER, "pull");
    let primary = archiving_primary(&archive, &push, &[]);
    primary.pgbench_init(2);
    let mut ids = Vec::new();
    for _ in 0..3 {
        primary.pgbench(&["-n", "-t", "200", "-c", "2"]);
        primary.switch_wal();
        ids.push(backup(&archive, &push, &primary, &["--fast"]));
    }
    let before = archive.wal_list_json(CLUSTER);
    let b2 = backup_json(&archive, &ids[1]);

    let dry = archive.admin(&[
        "retention",
        "run",
        "--keep-full",
        "2",
        "--dry-run",
        "--json",
    ]);
    let dry: Value = serde_json::from_str(&dry.stdout).unwrap();
    assert_eq!(
        dry["clusters"][0]["expired_backups"],
        serde_json::json!([ids[0]]),
        "{dry:#}"
    );
    assert_eq!(backups_json(&archive).len(), 3, "dry run deleted something");

    let run = archive.admin(&["retention", "run", "--keep-full", "2", "--json"]);
    let report: Value = serde_json::from_str(&run.stdout).unwrap();
    let c = &report["clusters"][0];
    assert_eq!(
        c["expired_backups"],
        serde_json::json!([ids[0]]),
        "{report:#}"
    );
    assert!(
        !c["expired_wal"].as_array().unwrap().is_empty(),
        "no WAL expired: {report:#}"
    );
    let listed: Vec<String> = backups_json(&archive)
        .iter()
        .map(|b| b["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(listed, ids[1..].to_vec());
    let after = archive.wal_list_json(CLUSTER);
    let first_after = after["timelines"][0]["first"].as_str().unwrap();
    assert_eq!(
        first_after,
        b2["wal_start"].as_str().unwrap(),
        "before: {before:#}\nafter: {after:#}"
    );
    assert!(before["timelines"][0]["first"].as_str().unwrap() < first_after);

    // Retention while a (slowed) backup runs: the backup completes and restores.
    let mut cmd = Command::new(archive.bins().pushclient());
    as_pg_user(&mut cmd)
        .args(["backup", "--fast", "--max-rate", "4096", "--config"])
        .arg(&push)
        .env("PGHOST", primary.sock_dir())
        .env("PGPORT", PG_PORT.to_string())
        .current_dir("/tmp");
    let log = primary.dir().join("slow-backup");
    let mut slow = BgProcess::spawn("pushclient backup (slow)", &mut cmd, &log);
    let mut overlapped = 0;
    while slow.try_wait().is_none() {
        archive.admin(&["retention", "run", "--keep-full", "3"]);
        if slow.try_wait().is_none() {
            overlapped += 1;
        }
        sleep(Duration::from_millis(200));
    }
    let (status, stdout, stderr) = slow.wait(Duration::from_secs(5));
    assert!(
        status.success(),
        "backup during retention failed: {stderr}\n{stdout}"
    );
    assert!(overlapped > 0, "retention never ran during the backup");
    let during = stdout
        .lines()
        .find_map(|l| {
            l.strip_prefix("backup ")
                .and_then(|r| r.split_once(" committed"))
        })
        .map(|(id, _)| id.to_string())
        .unwrap();
    assert_eq!(backup_json(&archive, &during)["state"], "usable");

    // Both backups kept by "keep 2" restored: the older one through all later WAL.
    let mut r2 = restore(&archive, &pull, "kept-2", &["--backup", &ids[1]]);
    verifybackup(&r2, None);
    start_and_wait_promoted(&mut r2);
    r2.stop();
    let mut rd = restore(
        &archive,
        &pull,
        "during",
        &[
            "--backup",
            &during,
            "--target-immediate",
            "--target-action",
            "promote",
        ],
    );
    verifybackup(&rd, None);
    start_and_wait_promoted(&mut rd);
    rd.stop();

    // Killed midway: never listed; its chunks wait out its lease and the grace period, then go.
    let chunks_before = store_chunks(&archive);
    primary.psql("CREATE TABLE fresh AS SELECT g, md5(g::text) FROM generate_series(1, 300000) g");
    let mut killed = BgProcess::spawn(
        "pushclient backup (to kill)",
        &mut cmd,
        &primary.dir().join("killed-backup"),
    );
    wait_until(
        "the backup to store new chunks",
        WAIT_TIMEOUT,
        || store_chunks(&archive) > chunks_before,
        || killed.stderr_tail(20),
    );
    killed.signal_and_wait(libc::SIGKILL, Duration::from_secs(10));
    let listed_after_kill = backups_json(&archive).len();
    assert_eq!(
        listed_after_kill,
        3,
        "a killed backup is listed: {:#?}",
        backups_json(&archive)
    );
    let run = archive.admin(&["retention", "run", "--keep-full", "1", "--json"]);
    let report: Value = serde_json::from_str(&run.stdout).unwrap();
    assert!(
        report["clusters"][0]["chunks_in_grace"].as_u64().unwrap() > 0,
        "{report:#}"
    );
    // The killed backup's lease keeps its chunks whatever the grace, until it expires
    // (15 min unrenewed) or archived restarts (leases live in memory): restart, and the
    // grace period alone decides.
    let run = archive.admin(&[
        "retention",
        "run",
        "--keep-full",
        "1",
        "--chunk-grace",
        "0s",
        "--json",
    ]);
    let report: Value = serde_json::from_str(&run.stdout).unwrap();
    assert!(
        report["clusters"][0]["chunks_in_grace"].as_u64().unwrap() > 0,
        "the killed backup's lease kept nothing: {report:#}"
    );
    archive.restart();
    let run = archive.admin(&[
        "retention",
        "run",
        "--keep-full",
        "1",
        "--chunk-grace",
        "0s",
        "--json",
    ]);
    let report: Value = serde_json::from_str(&run.stdout).unwrap();
    let c = &report["clusters"][0];
    assert!(c["collected_chunks"].as_u64().unwrap() > 0, "{report:#}");
    assert_eq!(c["chunks_in_grace"].as_u64(), Some(0), "{report:#}");
    // What is left restores.
    let mut last = restore(
        &archive,
        &pull,
        "after-gc",
        &["--target-immediate", "--target-action", "promote"],
    );
    verifybackup(&last, None);
    start_and_wait_promoted(&mut last);
}

/// `pullclient clone` + `pg_ctl start` gives a standby that replays from the archive and
/// follows the primary; the catalog rebuild brings the backups back.
#[test]
fn clone_follows_primary_and_catalog_rebuild_keeps_backups() {
    let mut archive = Archive::start(CLUSTER);
    let push = archive.issue(CLUSTER, "push");
    let pull = archive.issue(CLUSTER, "pull");
    let primary = archiving_primary(&archive, &push, &[]);
    primary.pgbench_init(1);
    let id = backup(&archive, &push, &primary, &["--fast"]);

    let mut clone = PgCluster::empty("clone");
    let dir = clone.data_dir().to_string_lossy().into_owned();
    let out = try_pullclient(&archive, &pull, &["clone", "--pgdata", &dir]);
    assert!(out.success(), "{}", out.describe());
    assert!(clone.data_dir().join("standby.signal").exists());
    no_archiving(&clone);
    clone.start();
    assert_eq!(clone.psql("SELECT pg_is_in_recovery()"), "t");

    primary.psql("CREATE TABLE after_clone AS SELECT generate_series(1, 1234) AS id");
    let last = primary.switch_wal();
    primary.wait_archived(&last, || archive.diag());
    wait_until(
        "the clone to replay the primary's new table from the archive",
        WAIT_TIMEOUT,
        || {
            clone
                .try_psql("SELECT count(*) FROM after_clone")
                .ok()
                .as_deref()
                == Some("1234")
        },
        || format!("{}\n{}", clone.diag(), archive.diag()),
    );
    assert_eq!(clone.psql("SELECT pg_is_in_recovery()"), "t");
    clone.stop();

    let before = backups_json(&archive);
    archive.stop();
    fs::remove_dir_all(archive.data_dir().join("catalog")).unwrap();
    archive.serve();
    let after = backups_json(&archive);
    assert_eq!(before, after, "backups changed after the catalog rebuild");
    assert_eq!(after[0]["id"], id.as_str());
    let show = archive.admin(&["backups", "show", &id, "--cluster", CLUSTER]);
    assert!(show.stdout.contains("usable"), "{}", show.describe());

    // Deleting it: gone from the listing, restore says there is nothing.
    archive.admin(&["backups", "delete", &id, "--cluster", CLUSTER]);
    assert!(backups_json(&archive).is_empty());
    let refused = restore_refused(&archive, &pull, &[]);
    assert!(refused.contains("no usable backup"), "{refused}");
}

/// A tablespace is backed up and restored where `--tablespace-map` puts it (its original
/// location is refused while in use); `clone --primary-conninfo` gives a streaming standby.
#[test]
fn tablespace_remapped_and_streaming_clone() {
    let archive = Archive::start(CLUSTER);
    let push = archive.issue(CLUSTER, "push");
    let pull = archive.issue(CLUSTER, "pull");
    let primary = archiving_primary(&archive, &push, &[]);
    let ts_dir = primary.dir().subdir("ts");
    chown_pg(&ts_dir);
    primary.psql(&format!(
        "CREATE TABLESPACE ts LOCATION '{}'",
        ts_dir.display()
    ));
    primary.psql("CREATE TABLE in_ts TABLESPACE ts AS SELECT generate_series(1, 5000) AS id");
    let oid = primary.psql("SELECT oid FROM pg_tablespace WHERE spcname = 'ts'");
    backup(&archive, &push, &primary, &["--fast"]);

    let refused = restore_refused(&archive, &pull, &[]);
    assert!(
        refused.contains(&ts_dir.display().to_string()) && refused.contains("not empty"),
        "{refused}"
    );

    let target = TestDir::new("ts-target");
    let new_ts = target.subdir("ts");
    chown_pg(&new_ts);
    let map = format!("{oid}={}", new_ts.display());
    let mut c = restore(
        &archive,
        &pull,
        "ts-restore",
        &[
            "--tablespace-map",
            &map,
            "--target-immediate",
            "--target-action",
            "promote",
        ],
    );
    let link = fs::read_link(c.data_dir().join("pg_tblspc").join(&oid)).unwrap();
    assert_eq!(link, new_ts);
    verifybackup(&c, None);
    start_and_wait_promoted(&mut c);
    assert_eq!(c.psql("SELECT count(*) FROM in_ts"), "5000");
    assert_eq!(
        c.psql("SELECT pg_tablespace_location(oid) FROM pg_tablespace WHERE spcname = 'ts'"),
        new_ts.display().to_string()
    );
    c.stop();

    // A streaming clone (its tablespace elsewhere too).
    let mut clone = PgCluster::empty("streaming-clone");
    let clone_ts = target.subdir("clone-ts");
    chown_pg(&clone_ts);
    let conninfo = format!(
        "host={} port={PG_PORT} user=postgres",
        primary.sock_dir().display()
    );
    let dir = clone.data_dir().to_string_lossy().into_owned();
    let clone_map = format!("{oid}={}", clone_ts.display());
    let out = try_pullclient(
        &archive,
        &pull,
        &[
            "clone",
            "--pgdata",
            &dir,
            "--primary-conninfo",
            &conninfo,
            "--tablespace-map",
            &clone_map,
        ],
    );
    assert!(out.success(), "{}", out.describe());
    no_archiving(&clone);
    clone.start();
    wait_until(
        "the clone to stream from the primary",
        WAIT_TIMEOUT,
        || {
            clone
                .try_psql("SELECT status FROM pg_stat_wal_receiver")
                .ok()
                .as_deref()
                == Some("streaming")
        },
        || clone.diag(),
    );
    primary.psql("INSERT INTO in_ts SELECT generate_series(5001, 6000)");
    wait_until(
        "the streaming clone to see a row not yet archived",
        WAIT_TIMEOUT,
        || clone.try_psql("SELECT count(*) FROM in_ts").ok().as_deref() == Some("6000"),
        || clone.diag(),
    );
}

/// `pushclient backup` refuses a server that does not archive; when the WAL does not
/// arrive in time the backup is committed but listed `incomplete-wal` (exit 1), and
/// becomes usable once archiving catches up.
#[test]
fn backup_without_archived_wal_is_incomplete_until_it_arrives() {
    let archive = Archive::start(CLUSTER);
    let push = archive.issue(CLUSTER, "push");
    let mut pg = PgCluster::initdb("no-archiving", &[]);
    pg.append_conf(&["wal_level = replica", "archive_mode = off"]);
    pg.start();
    let out = try_backup(&archive, &push, &pg, &["--fast"], &[]);
    assert_eq!(out.code(), Some(1), "{}", out.describe());
    assert!(
        out.stderr.contains("archive_mode is off"),
        "{}",
        out.describe()
    );
    assert!(backups_json(&archive).is_empty());
    pg.stop();

    pg.append_conf(&["archive_mode = on", "archive_command = '/bin/false'"]);
    pg.start();
    let out = try_backup(&archive, &push, &pg, &["--fast", "--wal-timeout", "3"], &[]);
    assert_eq!(out.code(), Some(1), "{}", out.describe());
    assert!(out.stderr.contains("incomplete-wal"), "{}", out.describe());
    let id = backup_id(&out);
    assert_eq!(backup_json(&archive, &id)["state"], "incomplete-wal");

    pg.set_conf("archive_command", &archive.archive_command(&push));
    pg.psql("SELECT pg_reload_conf()");
    wait_until(
        "the backup to become usable once its WAL is archived",
        WAIT_TIMEOUT,
        || backup_json(&archive, &id)["state"] == "usable",
        || format!("{}\n{}\n{}", pg.archiver_stats(), pg.diag(), archive.diag()),
    );
}
