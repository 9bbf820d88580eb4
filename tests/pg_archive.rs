//! End-to-end archive and replay with real PostgreSQL 15.
//!
//! Every test starts its own `archived` (own data dir, free UDP port) and its own
//! PostgreSQL clusters (own temp dirs and Unix sockets): they run in parallel.

use std::fs;
use std::path::Path;
use std::thread::sleep;
use std::time::{Duration, Instant};

use walvault_tests::serde_json::Value;
use walvault_tests::*;

pub(crate) const CLUSTER: &str = "main";

/// A primary archiving into `archive` with `push_conf`, plus `extra` conf lines; started.
pub(crate) fn archiving_primary(archive: &Archive, push_conf: &Path, extra: &[&str]) -> PgCluster {
    let mut p = PgCluster::initdb("primary", &[]);
    p.append_conf(&["wal_level = replica", "archive_mode = on"]);
    p.set_conf("archive_command", &archive.archive_command(push_conf));
    p.append_conf(extra);
    p.start();
    p
}

/// Makes `c` a standby fed only by `restore_command` (no primary_conninfo), following the
/// latest timeline. `archive_push`: archive after a promotion, with that push config.
pub(crate) fn make_archive_standby(
    c: &PgCluster,
    archive: &Archive,
    pull_conf: &Path,
    archive_push: Option<&Path>,
) {
    c.set_conf("restore_command", &archive.restore_command(pull_conf));
    c.append_conf(&[
        "hot_standby = on",
        "primary_conninfo = ''",
        "recovery_target_timeline = 'latest'",
    ]);
    match archive_push {
        Some(push) => {
            c.append_conf(&["archive_mode = on"]);
            c.set_conf("archive_command", &archive.archive_command(push));
        }
        None => c.append_conf(&["archive_mode = off"]),
    }
    c.standby_signal();
}

/// The timeline entry `tli` of a `wal list --json` answer.
fn timeline(listing: &Value, tli: u64) -> &Value {
    listing["timelines"]
        .as_array()
        .and_then(|a| a.iter().find(|t| t["timeline"].as_u64() == Some(tli)))
        .unwrap_or_else(|| panic!("timeline {tli} missing from `wal list`: {listing:#}"))
}

/// Asserts a timeline of the listing holds `first..=last` (at least) without gaps.
fn assert_timeline_covers(listing: &Value, tli: u64, first: &str, last: &str) {
    let t = timeline(listing, tli);
    let gaps = t["gaps"].as_array().map(|g| g.len()).unwrap_or(0);
    assert_eq!(gaps, 0, "gaps in timeline {tli}: {listing:#}");
    let (f, l) = (
        t["first"].as_str().unwrap_or(""),
        t["last"].as_str().unwrap_or(""),
    );
    assert!(
        f <= first && l >= last,
        "timeline {tli} is {f}..{l}, expected to cover {first}..{last}: {listing:#}"
    );
}

/// `archive-get`s every segment (as PostgreSQL would) and compares it byte for byte with
/// the copy still in `pg`'s pg_wal.
fn assert_archive_serves_pg_wal(
    archive: &Archive,
    pull_conf: &Path,
    pg: &PgCluster,
    segments: &[String],
) {
    assert!(!segments.is_empty(), "no segment to compare");
    let dest_dir = pg.dir().subdir("fetched");
    chown_pg(&dest_dir);
    for seg in segments {
        let want = fs::read(pg.wal_dir().join(seg)).unwrap_or_else(|e| {
            panic!("{seg} is marked archived but cannot be read from pg_wal: {e}")
        });
        let dest = dest_dir.join(seg);
        let out = archive.archive_get(pull_conf, seg, &dest);
        assert!(
            out.success(),
            "archive-get of {seg}, which PostgreSQL was told is archived, failed\n{}\n{}",
            out.describe(),
            archive.diag()
        );
        let got = fs::read(&dest)
            .unwrap_or_else(|e| panic!("archive-get {seg} exited 0 but wrote nothing: {e}"));
        assert!(
            got == want,
            "{seg}: archive-get returned {} bytes (blake3 {}), pg_wal has {} bytes (blake3 {})",
            got.len(),
            b3(&got),
            want.len(),
            b3(&want)
        );
        fs::remove_file(&dest).unwrap();
    }
}

const ACCOUNTS: &str = "SELECT count(*), sum(abalance) FROM pgbench_accounts";

/// Primary with pgbench data and load, marker row, all archived; returns the expected
/// `ACCOUNTS` answer and the last segment archived.
pub(crate) fn load_primary(primary: &PgCluster, archive: &Archive) -> (String, String) {
    primary.pgbench_init(2);
    primary.pgbench(&["-n", "-t", "200", "-c", "2"]);
    let expected = primary.psql(ACCOUNTS);
    primary.psql("CREATE TABLE marker (id int PRIMARY KEY, note text); INSERT INTO marker VALUES (1, 'last row')");
    let last = primary.switch_wal();
    primary.wait_archived(&last, || archive.diag());
    (expected, last)
}

/// Waits until `standby` shows the primary's final state.
pub(crate) fn wait_replayed(standby: &PgCluster, archive: &Archive, expected: &str) {
    wait_until(
        &format!(
            "standby {} to replay from the archive up to the marker row",
            standby.name()
        ),
        WAIT_TIMEOUT,
        || {
            standby.try_psql(ACCOUNTS).ok().as_deref() == Some(expected)
                && standby
                    .try_psql("SELECT note FROM marker WHERE id = 1")
                    .ok()
                    .as_deref()
                    == Some("last row")
        },
        || {
            format!(
                "expected {ACCOUNTS} = {expected:?}, standby says {:?} / marker {:?}\n{}\n{}",
                standby.try_psql(ACCOUNTS),
                standby.try_psql("SELECT * FROM marker"),
                standby.diag(),
                archive.diag()
            )
        },
    );
}

/// The harness itself against PostgreSQL, without any walvault binary: initdb, start,
/// pgbench, psql, a base backup started as a copy.
#[test]
fn harness_runs_postgres() {
    let mut primary = PgCluster::initdb("selftest", &[]);
    primary.start();
    assert_eq!(primary.psql("SELECT 1"), "1");
    primary.pgbench_init(1);
    primary.pgbench(&["-t", "50", "-c", "2", "-n"]);
    let sum = primary.psql(ACCOUNTS);
    let seg = primary.switch_wal();
    assert!(is_segment_name(&seg), "pg_switch_wal gave {seg:?}");

    let mut copy = PgCluster::from_basebackup(&primary, "selftest-copy", &["-X", "fetch"]);
    copy.start();
    assert_eq!(copy.psql(ACCOUNTS), sum);
    copy.stop();
    primary.stop();
    assert!(
        primary.log().contains("database system is shut down"),
        "{}",
        primary.diag()
    );
}

/// Clusters are copies of one cached initdb (harness/pgdata_template.rs), yet each is a
/// system of its own, as a real initdb makes it: PostgreSQL accepts the rewritten
/// pg_control and WAL headers, reports distinct system identifiers, and its WAL starts
/// where initdb's does; other initdb options get their own template.
#[test]
fn initdb_clusters_are_distinct_systems() {
    let mut a = PgCluster::initdb("distinct-a", &[]);
    let mut b = PgCluster::initdb("distinct-b", &[]);
    let mut small = PgCluster::initdb("distinct-small", &["--wal-segsize", "1"]);
    let mut ids = Vec::new();
    for c in [&mut a, &mut b, &mut small] {
        c.start();
        ids.push(c.psql("SELECT system_identifier FROM pg_control_system()"));
    }
    // initdb's WAL fits in the first 16 MiB segment (with 1 MiB segments it spans several).
    for c in [&a, &b] {
        assert_eq!(
            c.psql("SELECT pg_walfile_name(pg_current_wal_lsn())"),
            "000000010000000000000001",
            "{}",
            c.diag()
        );
    }
    assert_eq!(small.psql("SHOW wal_segment_size"), "1MB");
    assert_eq!(a.psql("SHOW wal_segment_size"), "16MB");
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 3, "system identifiers repeat: {ids:?}");
    b.psql("CREATE TABLE only_in_b (x int)");
    assert_eq!(
        a.psql("SELECT count(*) FROM pg_class WHERE relname = 'only_in_b'"),
        "0",
        "a write to one copy shows in another"
    );
}

/// A standby built from a base backup without WAL replays everything from the archive.
#[test]
fn replica_replays_from_archive() {
    let archive = Archive::start(CLUSTER);
    let push = archive.issue(CLUSTER, "push");
    let pull = archive.issue(CLUSTER, "pull");
    let primary = archiving_primary(&archive, &push, &[]);
    // Before any load: everything the replica needs afterwards comes from the archive.
    let mut replica = PgCluster::from_basebackup(&primary, "replica", &["-X", "none"]);

    let (expected, last) = load_primary(&primary, &archive);
    let first = primary.archived_segments()[0].clone();
    assert_timeline_covers(&archive.wal_list_json(CLUSTER), 1, &first, &last);

    make_archive_standby(&replica, &archive, &pull, None);
    replica.start();
    wait_replayed(&replica, &archive, &expected);
    assert!(
        replica
            .log()
            .contains(&format!("restored log file \"{last}\" from archive")),
        "the replica has the marker row but did not restore {last} from the archive\n{}",
        replica.diag()
    );
    assert_eq!(replica.psql("SELECT pg_is_in_recovery()"), "t");
}

/// A replica promoted onto timeline 2 archives into the same cluster; a second standby
/// from the original base backup follows timeline 2 from the archive alone.
#[test]
fn promoted_replica_new_timeline_followed_by_second_standby() {
    let archive = Archive::start(CLUSTER);
    let push = archive.issue(CLUSTER, "push");
    let push2 = archive.issue(CLUSTER, "push");
    let pull = archive.issue(CLUSTER, "pull");
    let mut primary = archiving_primary(&archive, &push, &[]);
    let mut replica = PgCluster::from_basebackup(&primary, "replica", &["-X", "none"]);
    let mut standby2 = PgCluster::from_basebackup(&primary, "standby2", &["-X", "none"]);

    let (expected, _) = load_primary(&primary, &archive);
    make_archive_standby(&replica, &archive, &pull, Some(&push2));
    replica.start();
    wait_replayed(&replica, &archive, &expected);

    // Failover.
    primary.stop();
    replica.promote();
    assert_eq!(replica.psql("SELECT pg_is_in_recovery()"), "f");
    assert_eq!(
        replica.psql("SELECT substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8)"),
        "00000002"
    );
    replica.wait_archived("00000002.history", || archive.diag());
    let listing = archive.wal_list_json(CLUSTER);
    assert!(
        listing["history_files"]
            .as_array()
            .is_some_and(|h| h.iter().any(|f| f == "00000002.history")),
        "PostgreSQL archived 00000002.history but `wal list` does not show it: {listing:#}"
    );

    replica.psql("CREATE TABLE after_promotion (id int); INSERT INTO after_promotion SELECT generate_series(1, 1000)");
    let seg2 = replica.switch_wal();
    assert!(
        seg2.starts_with("00000002"),
        "segment after promotion {seg2} is not on timeline 2"
    );
    replica.wait_archived(&seg2, || archive.diag());
    let listing = archive.wal_list_json(CLUSTER);
    let t2 = timeline(&listing, 2);
    assert!(
        t2["last"].as_str().is_some_and(|l| l >= seg2.as_str()),
        "timeline 2 lacks {seg2}: {listing:#}"
    );
    // PostgreSQL archives the old timeline's last segment as .partial at promotion.
    for partial in replica
        .archived_files()
        .iter()
        .filter(|f| f.ends_with(".partial"))
    {
        assert!(
            timeline(&listing, 1)["partials"]
                .as_array()
                .is_some_and(|p| p.iter().any(|x| x == partial.as_str())),
            "PostgreSQL archived {partial} but `wal list` does not show it: {listing:#}"
        );
    }

    make_archive_standby(&standby2, &archive, &pull, None);
    standby2.start();
    wait_until(
        "the second standby to follow timeline 2 from the archive",
        WAIT_TIMEOUT,
        || {
            standby2
                .try_psql("SELECT count(*) FROM after_promotion")
                .ok()
                .as_deref()
                == Some("1000")
        },
        || {
            format!(
                "standby2 says {:?}\n{}\n{}",
                standby2.try_psql("SELECT count(*) FROM after_promotion"),
                standby2.diag(),
                archive.diag()
            )
        },
    );
    let log = standby2.log();
    for f in ["00000002.history", seg2.as_str()] {
        assert!(
            log.contains(&format!("restored log file \"{f}\" from archive")),
            "standby2 did not restore {f} from the archive\n{}",
            standby2.diag()
        );
    }
    assert_eq!(standby2.psql(ACCOUNTS), expected);
}

/// archived killed with SIGKILL while PostgreSQL archives under load, then restarted:
/// every segment PostgreSQL was told is archived (before the kill and at the end) is in
/// the archive, byte for byte.
#[test]
fn sigkill_under_load_loses_nothing_acknowledged() {
    let mut archive = Archive::start(CLUSTER);
    // A push in flight when the server dies waits for the idle timeout: keep it short.
    let push = archive.issue_with(CLUSTER, "push", Some(10));
    let pull = archive.issue(CLUSTER, "pull");
    // Keep every segment in pg_wal so the archived ones can be compared.
    let primary = archiving_primary(
        &archive,
        &push,
        &[
            "wal_keep_size = '2GB'",
            "wal_recycle = off",
            "max_wal_size = '4GB'",
            "checkpoint_timeout = '1h'",
        ],
    );
    primary.pgbench_init(1);
    let load = primary.spawn_pgbench(&["-n", "-T", "120", "-c", "2"]);
    let diag = |archive: &Archive| {
        format!(
            "{}\n{}\n{}",
            primary.archiver_stats(),
            primary.diag(),
            archive.diag()
        )
    };

    // Phase 1: archiving under load with frequent switches.
    wait_until(
        "4 segments archived under load",
        WAIT_TIMEOUT,
        || {
            primary.switch_wal();
            sleep(Duration::from_millis(300));
            primary.archived_segments().len() >= 4
        },
        || diag(&archive),
    );
    // Kill while a push is in flight: switch until the archiver runs a pushclient.
    wait_until(
        "a push in flight",
        WAIT_TIMEOUT,
        || {
            primary.switch_wal();
            let deadline = Instant::now() + Duration::from_millis(500);
            while Instant::now() < deadline {
                if archive.pushes_in_flight() > 0 {
                    return true;
                }
                sleep(Duration::from_millis(2));
            }
            false
        },
        || diag(&archive),
    );
    sleep(Duration::from_millis(50)); // let the upload start
    let before_kill = primary.archived_segments();
    archive.kill9();

    // Phase 2: archived down, PostgreSQL keeps producing segments and retrying.
    for _ in 0..5 {
        primary.switch_wal();
        sleep(Duration::from_millis(300));
    }
    archive.serve();

    // Phase 3: archived back on the same data dir and port.
    for _ in 0..5 {
        primary.switch_wal();
        sleep(Duration::from_millis(300));
    }
    drop(load);
    let last = primary.switch_wal();
    primary.wait_archived(&last, || archive.diag());
    // Not asserted (a push started while archived was down may simply retry its handshake
    // until the server is back), but worth seeing in the output.
    eprintln!("after the kill: {}", primary.archiver_stats());

    let end = primary.archived_segments();
    for seg in &before_kill {
        assert!(
            end.contains(seg),
            "{seg} was archived before the kill but its .done vanished from pg_wal"
        );
    }
    assert_eq!(end.last(), Some(&last));
    assert_timeline_covers(&archive.wal_list_json(CLUSTER), 1, &end[0], &last);
    assert_archive_serves_pg_wal(&archive, &pull, &primary, &end);
    assert!(archive.is_running(), "archived died\n{}", archive.diag());
}

/// Deleting the catalog loses nothing: the restarted server rebuilds it from the store.
#[test]
fn catalog_rebuilt_after_deletion() {
    let mut archive = Archive::start(CLUSTER);
    let push = archive.issue(CLUSTER, "push");
    let pull = archive.issue(CLUSTER, "pull");
    let mut primary = archiving_primary(
        &archive,
        &push,
        &["wal_keep_size = '1GB'", "wal_recycle = off"],
    );
    primary.pgbench_init(1);
    for _ in 0..3 {
        primary.switch_wal();
    }
    let last = primary.switch_wal();
    primary.wait_archived(&last, || archive.diag());
    // Nothing may be archived between the two listings: stop the primary (its archiver
    // finishes what is ready first) before taking the first one.
    primary.stop();
    let segments = primary.archived_segments();
    let before = archive.wal_list_json(CLUSTER);
    assert_timeline_covers(&before, 1, &segments[0], &last);

    archive.stop();
    let catalog = archive.data_dir().join("catalog");
    assert!(
        catalog.is_dir(),
        "{} does not exist: where is the catalog?",
        catalog.display()
    );
    fs::remove_dir_all(&catalog).unwrap();
    archive.serve();

    let after = archive.wal_list_json(CLUSTER);
    assert!(
        before == after,
        "`wal list` changed after the catalog was rebuilt\nbefore: {before:#}\nafter: {after:#}"
    );
    assert_archive_serves_pg_wal(&archive, &pull, &primary, &segments);
}
