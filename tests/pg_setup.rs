//! `pushclient setup` and `pullclient setup` against real PostgreSQL 15: a fresh `initdb`
//! configured offline archives once started, a running server is changed with ALTER
//! SYSTEM (and told what waits for a restart), a `pg_basebackup` copy becomes a standby
//! that replays from the archive, and a second run of either changes nothing.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use walvault_tests::*;

use crate::pg_archive::archiving_primary;
use crate::pg_backup::CLUSTER;

/// `<binary> setup ARGS --config CONF` as root (the harness's user), with the libpq
/// environment pointing at `pg`'s socket.
fn setup(binary: &Path, conf: &Path, pg: &PgCluster, args: &[&str]) -> Output {
    try_run(
        std::process::Command::new(binary)
            .arg("setup")
            .args(args)
            .arg("--config")
            .arg(conf)
            .env("PGHOST", pg.sock_dir())
            .env("PGPORT", PG_PORT.to_string())
            .env("PGUSER", "postgres")
            .current_dir("/tmp"),
    )
}

fn auto_conf(pg: &PgCluster) -> Vec<u8> {
    std::fs::read(pg.data_dir().join("postgresql.auto.conf")).unwrap()
}

fn assert_owned_by_postgres(path: &Path) {
    let m = std::fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    if let Some((uid, gid)) = pg_user() {
        assert_eq!((m.uid(), m.gid()), (uid, gid), "{}", path.display());
    }
    assert_eq!(
        m.mode() & 0o077,
        0,
        "{} is readable by others",
        path.display()
    );
}

fn assert_nothing_to_change(out: &Output) {
    assert!(out.success(), "{}", out.describe());
    assert!(
        out.stdout.contains("nothing to change"),
        "{}",
        out.describe()
    );
}

#[test]
fn pushclient_setup_configures_a_fresh_initdb_that_then_archives_and_changes_nothing_twice() {
    let archive = Archive::start(CLUSTER);
    let push = archive.issue(CLUSTER, "push");
    let pushclient = archive.bins().pushclient();
    let mut primary = PgCluster::initdb("primary", &[]);
    let pgdata = primary.data_dir().to_str().unwrap().to_string();
    let before = auto_conf(&primary);

    // Without --apply: the plan, and no change.
    let out = setup(&pushclient, &push, &primary, &["--pgdata", &pgdata]);
    assert!(out.success(), "{}", out.describe());
    for want in [
        "archive_mode",
        "-> 'on'  [restart]",
        "archive-push %p'  [reload]",
        "archive_timeout",
        "-> '60s'  [reload]",
        "wal_level",
        "3 change(s); run again with --apply",
    ] {
        assert!(out.stdout.contains(want), "no {want:?}\n{}", out.describe());
    }
    assert_eq!(
        auto_conf(&primary),
        before,
        "a dry run changed postgresql.auto.conf"
    );

    let out = setup(
        &pushclient,
        &push,
        &primary,
        &["--pgdata", &pgdata, "--apply"],
    );
    assert!(out.success(), "{}", out.describe());
    assert!(out.stdout.contains("applied"), "{}", out.describe());
    // Run as root: the file keeps PostgreSQL's owner and a private mode.
    assert_owned_by_postgres(&primary.data_dir().join("postgresql.auto.conf"));

    primary.start();
    assert_eq!(primary.psql("SHOW archive_mode"), "on");
    assert_eq!(primary.psql("SHOW archive_timeout"), "1min");
    primary.psql("CREATE TABLE t AS SELECT g FROM generate_series(1, 1000) g");
    let segment = primary.switch_wal();
    primary.wait_archived(&segment, String::new);
    assert_eq!(
        primary.psql("SELECT failed_count FROM pg_stat_archiver"),
        "0",
        "{}",
        primary.diag()
    );

    // Again, on the running server (ALTER SYSTEM's view) and on the stopped one (the
    // files' view): both agree there is nothing left to do.
    let applied = auto_conf(&primary);
    assert_nothing_to_change(&setup(&pushclient, &push, &primary, &[]));
    primary.stop();
    assert_nothing_to_change(&setup(
        &pushclient,
        &push,
        &primary,
        &["--pgdata", &pgdata, "--apply"],
    ));
    assert_eq!(
        auto_conf(&primary),
        applied,
        "a second run changed the file"
    );
}

#[test]
fn pushclient_setup_changes_a_running_server_with_alter_system_and_names_the_restart() {
    let archive = Archive::start(CLUSTER);
    let push = archive.issue(CLUSTER, "push");
    let pushclient = archive.bins().pushclient();
    let mut primary = PgCluster::initdb("primary", &[]);
    primary.append_conf(&[
        "archive_mode = off",
        "archive_timeout = 300",
        "max_replication_slots = 4",
    ]);
    primary.start();

    let out = setup(
        &pushclient,
        &push,
        &primary,
        &["--apply", "--slot", "walvault"],
    );
    assert!(out.success(), "{}", out.describe());
    assert!(
        out.stdout
            .contains("restart PostgreSQL for archive_mode to take effect"),
        "{}",
        out.describe()
    );
    // Never lowered: the longer archive_timeout and the slots stay.
    assert!(
        out.stdout.contains("archive_timeout") && out.stdout.contains("'5min' (unchanged)"),
        "{}",
        out.describe()
    );
    assert_eq!(
        primary.psql(
            "SELECT restart_lsn IS NOT NULL FROM pg_replication_slots WHERE slot_name = 'walvault'"
        ),
        "t",
        "the slot was not created reserving WAL\n{}",
        out.describe()
    );
    assert_eq!(
        primary.psql("SHOW archive_mode"),
        "off",
        "not before the restart"
    );

    primary.stop();
    primary.start();
    primary.psql("CREATE TABLE t AS SELECT g FROM generate_series(1, 1000) g");
    let segment = primary.switch_wal();
    primary.wait_archived(&segment, || out.describe());
    assert_nothing_to_change(&setup(
        &pushclient,
        &push,
        &primary,
        &["--apply", "--slot", "walvault"],
    ));
}

#[test]
fn pullclient_setup_makes_a_basebackup_copy_a_standby_of_the_archive() {
    let archive = Archive::start(CLUSTER);
    let push = archive.issue(CLUSTER, "push");
    let pull = archive.issue(CLUSTER, "pull");
    let pullclient = archive.bins().pullclient();
    let primary = archiving_primary(&archive, &push, &[]);
    primary.psql("CREATE TABLE t AS SELECT g FROM generate_series(1, 100) g");
    // Only WAL from the archive: nothing copied with the backup, no primary_conninfo.
    let mut copy = PgCluster::from_basebackup(&primary, "standby", &["-X", "none"]);
    copy.append_conf(&["primary_conninfo = ''", "archive_mode = off"]);
    let pgdata = copy.data_dir().to_str().unwrap().to_string();

    let out = setup(
        &pullclient,
        &pull,
        &copy,
        &["--pgdata", &pgdata, "--standby"],
    );
    assert!(out.success(), "{}", out.describe());
    assert!(
        out.stdout.contains("restore_command") && out.stdout.contains("archive-get %f %p'"),
        "{}",
        out.describe()
    );
    assert!(
        out.stdout.contains("file:standby.signal"),
        "{}",
        out.describe()
    );
    assert!(
        !copy.data_dir().join("standby.signal").exists(),
        "a dry run made the signal file"
    );

    let out = setup(
        &pullclient,
        &pull,
        &copy,
        &["--pgdata", &pgdata, "--standby", "--apply"],
    );
    assert!(out.success(), "{}", out.describe());
    assert_owned_by_postgres(&copy.data_dir().join("standby.signal"));
    assert_owned_by_postgres(&copy.data_dir().join("postgresql.auto.conf"));
    copy.start();
    assert_eq!(copy.psql("SELECT pg_is_in_recovery()"), "t");

    primary.psql("INSERT INTO t SELECT g FROM generate_series(101, 200) g");
    let segment = primary.switch_wal();
    primary.wait_archived(&segment, String::new);
    let deadline = Instant::now() + Duration::from_secs(60);
    while copy.try_psql("SELECT count(*) FROM t").as_deref() != Ok("200") {
        assert!(
            Instant::now() < deadline,
            "the standby did not replay the archived rows\n{}",
            copy.diag()
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // Running, as wanted: nothing to change. Without --standby it refuses to make the
    // standby one that promotes.
    assert_nothing_to_change(&setup(
        &pullclient,
        &pull,
        &copy,
        &["--pgdata", &pgdata, "--standby", "--apply"],
    ));
    let out = setup(&pullclient, &pull, &copy, &["--pgdata", &pgdata, "--apply"]);
    assert!(!out.success(), "{}", out.describe());
    assert!(out.stderr.contains("standby.signal"), "{}", out.describe());
}
