//! The prefetch daemon and spool: started by archive-get, serves verified segments from
//! the spool, never serves a damaged one, and behaves as a well-mannered daemon
//! (no PGDATA working directory, no children, prompt SIGTERM).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use walvault_tests::{
    as_pg_user, chmod, chown_pg, try_run, wait_for, wait_until, Archive, Output, TestDir,
    WAIT_TIMEOUT,
};

use crate::promises::{fake_segment, put_file, seg_name};

/// A pull config whose spool is `spool`, with `[prefetch]` settings overridden.
fn pull_config_with_spool(
    archive: &Archive,
    cluster: &str,
    spool: &Path,
    settings: &[(&str, &str)],
) -> PathBuf {
    fs::create_dir_all(spool).unwrap();
    chown_pg(spool);
    // A spool must be private to archive-get's user, or it is refused.
    chmod(spool, 0o700);
    let conf = archive.issue(cluster, "pull");
    let text = fs::read_to_string(&conf).unwrap();
    let spool_value = format!("\"{}\"", spool.display());
    let mut all: Vec<(&str, &str)> = vec![("spool_dir", &spool_value)];
    all.extend_from_slice(settings);
    let mut lines: Vec<String> = text
        .lines()
        .filter(|l| {
            !all.iter()
                .any(|(k, _)| l.trim_start().starts_with(&format!("{k} =")))
        })
        .map(String::from)
        .collect();
    let at = lines
        .iter()
        .position(|l| l.trim() == "[prefetch]")
        .expect("issued config has a [prefetch] table")
        + 1;
    for (k, v) in all {
        lines.insert(at, format!("{k} = {v}"));
    }
    fs::write(&conf, lines.join("\n") + "\n").unwrap();
    chown_pg(&conf);
    conf
}

/// A running archive for `cluster` with a push config, a test directory `label`, and a
/// pull config whose spool is `<dir>/spool` (`[prefetch]` settings overridden):
/// (archive, push config, dir, spool, pull config).
fn archive_with_spool(
    cluster: &str,
    label: &str,
    settings: &[(&str, &str)],
) -> (Archive, PathBuf, TestDir, PathBuf, PathBuf) {
    let archive = Archive::start(cluster);
    let push = archive.issue(cluster, "push");
    let dir = TestDir::new(label);
    let spool = dir.join("spool");
    let pull = pull_config_with_spool(&archive, cluster, &spool, settings);
    (archive, push, dir, spool, pull)
}

/// The log of the daemon serving `spool` (started by archive-get), or "".
fn daemon_log(spool: &Path) -> String {
    fs::read_to_string(spool.join("daemon.log")).unwrap_or_default()
}

/// A directory standing in for PGDATA (the daemon must cope with no PostgreSQL at all).
fn fake_pgdata(dir: &TestDir) -> PathBuf {
    let pgdata = dir.join("pgdata");
    fs::create_dir_all(pgdata.join("pg_wal")).unwrap();
    // What makes archive-get treat its working directory as a data directory.
    fs::write(pgdata.join("PG_VERSION"), "15\n").unwrap();
    chown_pg(&pgdata);
    chown_pg(&pgdata.join("pg_wal"));
    pgdata
}

fn archive_get_in(archive: &Archive, conf: &Path, pgdata: &Path, name: &str) -> Output {
    try_run(
        as_pg_user(&mut Command::new(archive.bins().pullclient()))
            .args(["archive-get", name, &format!("pg_wal/RECOVERYXLOG.{name}")])
            .arg("--config")
            .arg(conf)
            .current_dir(pgdata),
    )
}

fn status(archive: &Archive, conf: &Path, pgdata: &Path) -> Option<serde_json::Value> {
    let out = try_run(
        as_pg_user(&mut Command::new(archive.bins().pullclient()))
            .args(["prefetch-status", "--json", "--pgdata"])
            .arg(pgdata)
            .arg("--config")
            .arg(conf)
            .current_dir("/tmp"),
    );
    if !out.success() {
        return None;
    }
    serde_json::from_str(&out.stdout).ok()
}

fn daemon_pid(spool: &Path) -> i32 {
    fs::read_to_string(spool.join("daemon.lock"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .expect("daemon.lock names the daemon's pid")
}

fn alive(pid: i32) -> bool {
    // A zombie is gone for our purposes: it holds no files and runs nothing.
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z'),
        Err(_) => false,
    }
}

/// The files under `dir` that process `pid` holds open (its `/proc/PID/fd` links).
fn open_under(pid: i32, dir: &Path) -> Vec<PathBuf> {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.flatten()
                .filter_map(|e| fs::read_link(e.path()).ok())
                .filter(|t| t.starts_with(dir))
                .collect()
        })
        .unwrap_or_default()
}

/// An archive holding `count` synthetic segments of one system, a pull config with its
/// own spool, and a stand-in data directory with no PostgreSQL running.
struct SpoolFixture {
    archive: Archive,
    dir: TestDir,
    spool: PathBuf,
    conf: PathBuf,
    pgdata: PathBuf,
    segments: Vec<(String, Vec<u8>)>,
}

impl SpoolFixture {
    fn new(
        cluster: &str,
        label: &str,
        spool_max_bytes: u64,
        count: u64,
        sysid: u64,
    ) -> SpoolFixture {
        SpoolFixture::with(cluster, label, spool_max_bytes, count, sysid, &[])
    }

    /// [`SpoolFixture::new`] with more `[prefetch]` settings.
    fn with(
        cluster: &str,
        label: &str,
        spool_max_bytes: u64,
        count: u64,
        sysid: u64,
        extra: &[(&str, &str)],
    ) -> SpoolFixture {
        let max = spool_max_bytes.to_string();
        let mut settings = vec![("spool_max_bytes", max.as_str()), ("idle_exit_secs", "300")];
        settings.extend_from_slice(extra);
        let (archive, push, dir, spool, conf) = archive_with_spool(cluster, label, &settings);
        let pgdata = fake_pgdata(&dir);
        let segments: Vec<(String, Vec<u8>)> = (1..=count)
            .map(|n| (seg_name(1, n), fake_segment(1, n, sysid)))
            .collect();
        for (name, bytes) in &segments {
            let p = put_file(&dir.join("src"), name, bytes);
            assert!(
                archive.archive_push(&push, &p).success(),
                "{}",
                archive.diag()
            );
        }
        SpoolFixture {
            archive,
            dir,
            spool,
            conf,
            pgdata,
            segments,
        }
    }
}

/// The first archive-get of a recovery (a miss, served directly; it starts the daemon),
/// then a wait until the daemon has fetched `spooled` segments.
fn first_call_then_spooled(f: &SpoolFixture, spooled: u64) {
    let first = archive_get_in(&f.archive, &f.conf, &f.pgdata, &f.segments[0].0);
    assert!(first.success(), "{}", first.describe());
    wait_until(
        "the daemon spooled the next segments",
        Duration::from_secs(30),
        || {
            status(&f.archive, &f.conf, &f.pgdata)
                .map(|s| s["segments_fetched"].as_u64() >= Some(spooled))
                .unwrap_or(false)
        },
        || {
            format!(
                "status: {:?}\nlog: {}",
                status(&f.archive, &f.conf, &f.pgdata),
                daemon_log(&f.spool)
            )
        },
    );
}

/// Waits until the daemon counted `hits` spool hits and `misses` misses (archive-get
/// does not wait for the daemon to count what it served); its status then.
fn counted(f: &SpoolFixture, hits: u64, misses: u64) -> serde_json::Value {
    wait_for(
        &format!("the daemon to count {hits} spool hits and {misses} miss(es)"),
        Duration::from_secs(10),
        || {
            status(&f.archive, &f.conf, &f.pgdata).filter(|s| {
                s["spool_hits"].as_u64() == Some(hits) && s["spool_misses"].as_u64() == Some(misses)
            })
        },
        || format!("status: {:?}", status(&f.archive, &f.conf, &f.pgdata)),
    )
}

#[test]
fn archive_get_starts_a_daemon_that_serves_verified_segments_from_the_spool() {
    let f = SpoolFixture::new("pf", "prefetch", 134217728, 7, 31337);
    // The first call: a miss, served directly, and a daemon starts (PostgreSQL is not running).
    first_call_then_spooled(&f, 6);
    for (name, bytes) in &f.segments[1..] {
        let out = archive_get_in(&f.archive, &f.conf, &f.pgdata, name);
        assert!(out.success(), "{}", out.describe());
        assert!(
            out.stderr.contains("prefetch spool"),
            "{name} not served from the spool:\n{}",
            out.describe()
        );
        let got = fs::read(f.pgdata.join(format!("pg_wal/RECOVERYXLOG.{name}"))).unwrap();
        assert!(&got == bytes, "{name}: spool served different bytes");
    }
    let s = counted(&f, 6, 1);
    let SpoolFixture {
        archive,
        spool,
        conf,
        pgdata,
        ..
    } = &f;
    assert_eq!(s["postgres_running"].as_bool(), Some(false), "{s}");

    // Past the end of the archive: PostgreSQL gets exit 1, and the daemon waits politely.
    let end = archive_get_in(archive, conf, pgdata, &seg_name(1, 8));
    assert_eq!(end.code(), Some(1), "{}", end.describe());
    // Once it has taken that request the daemon asks for the missing segment at once,
    // then after 1, 2, 4 ... s: three more answers take at least 1 + 2 s however loaded
    // the machine is (a lower bound: slowness cannot break it), a busy loop none.
    let probes = |s: &serde_json::Value| s["archive_end_reached"].as_u64().unwrap_or(0);
    let taken = wait_for(
        "the daemon to take the request for segment 8",
        Duration::from_secs(30),
        || {
            status(archive, conf, pgdata)
                .filter(|s| s["last_requested"].as_str() == Some(seg_name(1, 8).as_str()))
        },
        || format!("status: {:?}", status(archive, conf, pgdata)),
    );
    let t = Instant::now();
    let before = probes(&taken);
    wait_until(
        "three more answers that segment 8 is not archived",
        Duration::from_secs(60),
        || status(archive, conf, pgdata).is_some_and(|s| probes(&s) >= before + 3),
        || format!("status: {:?}", status(archive, conf, pgdata)),
    );
    assert!(
        t.elapsed() >= Duration::from_secs(2),
        "the daemon asks for a segment the archive lacks too often: 3 times in {:?}",
        t.elapsed()
    );

    // A well-mannered daemon: cwd is the spool, no children, exits on SIGTERM (cleaning up
    // its socket).
    let pid = daemon_pid(spool);
    let cwd = fs::read_link(format!("/proc/{pid}/cwd")).unwrap();
    assert_eq!(
        cwd,
        fs::canonicalize(spool).unwrap(),
        "daemon working directory"
    );
    assert!(!cwd.starts_with(pgdata));
    let children: Vec<String> = fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| fs::read_to_string(e.path().join("stat")).ok())
        .filter(|stat| {
            stat.rsplit(')')
                .next()
                .and_then(|r| r.split_whitespace().nth(1))
                == Some(&pid.to_string())
        })
        .collect();
    assert!(
        children.is_empty(),
        "the daemon runs child processes: {children:?}"
    );
    // SAFETY: signalling a process we started.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    wait_until(
        "the daemon to exit after SIGTERM",
        Duration::from_secs(30),
        || !alive(pid),
        || daemon_log(spool),
    );
    assert!(
        !spool.join("daemon.sock").exists(),
        "the daemon did not exit its own way (its socket is left):\n{}",
        daemon_log(spool)
    );
}

#[test]
fn a_damaged_spool_file_is_never_served() {
    let SpoolFixture {
        archive,
        dir: _dir,
        spool,
        conf,
        pgdata,
        segments,
    } = SpoolFixture::new("pfbad", "prefetch-bad", 67108864, 3, 4242);
    assert!(archive_get_in(&archive, &conf, &pgdata, &segments[0].0).success());
    let spooled = spool.join("ready").join(&segments[1].0);
    wait_until(
        "segment 2 spooled",
        Duration::from_secs(30),
        || spooled.exists(),
        || daemon_log(&spool),
    );
    let mut bytes = fs::read(&spooled).unwrap();
    bytes[1000] ^= 0xFF;
    fs::write(&spooled, &bytes).unwrap();

    let out = archive_get_in(&archive, &conf, &pgdata, &segments[1].0);
    assert!(out.success(), "{}", out.describe());
    assert!(
        out.stderr.contains("fails verification"),
        "the damaged spool file went unnoticed:\n{}",
        out.describe()
    );
    let got = fs::read(pgdata.join(format!("pg_wal/RECOVERYXLOG.{}", segments[1].0))).unwrap();
    assert!(got == segments[1].1, "a damaged spool file was served");

    // The data directory goes away (a test, a dropped replica): the daemon follows it.
    let pid = daemon_pid(&spool);
    fs::remove_dir_all(&pgdata).unwrap();
    wait_until(
        "the daemon to exit after its data directory was removed",
        Duration::from_secs(5),
        || !alive(pid),
        || daemon_log(&spool),
    );
}

/// Review 2.5: the control socket serves a bounded number of clients at once and drops a
/// client that sends nothing. 100 connections that never send a line: the daemon never
/// holds more than its 32 (plus its own few sockets) and closes every one (5 s each);
/// meanwhile, and after, `prefetch-status` is answered.
#[test]
fn control_socket_serves_a_bounded_number_of_clients_and_drops_silent_ones() {
    use std::io::Read;
    use std::os::unix::net::UnixStream;

    let SpoolFixture {
        archive,
        dir: _dir,
        spool,
        conf,
        pgdata,
        segments,
    } = SpoolFixture::new("pfctl", "prefetch-control", 67108864, 2, 777);
    assert!(archive_get_in(&archive, &conf, &pgdata, &segments[0].0).success());
    wait_until(
        "the daemon to answer",
        Duration::from_secs(30),
        || status(&archive, &conf, &pgdata).is_some(),
        || daemon_log(&spool),
    );
    let pid = daemon_pid(&spool);
    let sockets = || {
        fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|d| {
                d.flatten()
                    .filter_map(|e| fs::read_link(e.path()).ok())
                    .filter(|t| t.to_string_lossy().starts_with("socket:"))
                    .count()
            })
            .unwrap_or(0)
    };
    let own = sockets();
    let silent: Vec<UnixStream> = (0..100)
        .map(|_| UnixStream::connect(spool.join("daemon.sock")).unwrap())
        .collect();
    for c in &silent {
        c.set_nonblocking(true).unwrap();
    }
    let silent = std::cell::RefCell::new(silent);
    let most = std::cell::Cell::new(0);
    wait_until(
        "the daemon to close all 100 silent connections",
        Duration::from_secs(90),
        || {
            most.set(most.get().max(sockets()));
            // Nothing to read yet (WouldBlock): still open; end of stream: closed.
            silent.borrow_mut().retain_mut(|c| {
                matches!(c.read(&mut [0u8; 16]), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
            });
            silent.borrow().is_empty()
        },
        || {
            format!(
                "{} still open; the daemon held {} sockets at most",
                silent.borrow().len(),
                most.get()
            )
        },
    );
    let most = most.get();
    // 32 clients, and slack for a reconnection to the archive.
    assert!(
        most <= own + 34,
        "the daemon held {most} sockets at once ({own} of its own before the clients came)"
    );
    // The same daemon closed them (not an exit).
    assert!(
        alive(pid) && status(&archive, &conf, &pgdata).is_some(),
        "{}",
        daemon_log(&spool)
    );
    // SAFETY: signalling a process we started.
    unsafe { libc::kill(pid, libc::SIGTERM) };
}

/// Real recovery: a replica fed by restore_command gets its segments from the spool and
/// the prefaulter warms blocks ahead of replay; once PostgreSQL stops, the daemon holds
/// nothing under PGDATA open.
#[test]
fn replica_recovery_uses_the_spool_and_prefaults_then_lets_go_of_pgdata() {
    use crate::pg_archive::{archiving_primary, make_archive_standby, wait_replayed, CLUSTER};
    use walvault_tests::PgCluster;

    let (archive, push, _dir, spool, pull) =
        archive_with_spool(CLUSTER, "prefetch-pg", &[("prefault_method", "\"pread\"")]);
    // Without full-page writes replay reads the blocks it changes: work for the prefaulter.
    let primary = archiving_primary(
        &archive,
        &push,
        &["full_page_writes = off", "checkpoint_timeout = 1h"],
    );
    primary.pgbench_init(2);
    primary.psql("CHECKPOINT");
    let mut replica = PgCluster::from_basebackup(&primary, "replica", &["-X", "none"]);
    for _ in 0..3 {
        primary.pgbench(&["-n", "-t", "300", "-c", "2"]);
        primary.switch_wal();
    }
    // The marker row wait_replayed looks for.
    primary.psql("CREATE TABLE marker (id int PRIMARY KEY, note text); INSERT INTO marker VALUES (1, 'last row')");
    let expected = primary.psql("SELECT count(*), sum(abalance) FROM pgbench_accounts");
    let last = primary.switch_wal();
    primary.wait_archived(&last, || archive.diag());

    make_archive_standby(&replica, &archive, &pull, None);
    // Replay waits until 5 s after each commit's time: it cannot outrun the daemon on a
    // loaded machine, so the daemon's work is there to be seen whatever the timing.
    replica.append_conf(&["recovery_min_apply_delay = '5s'"]);
    replica.start();
    wait_replayed(&replica, &archive, &expected);
    let pgdata = fs::canonicalize(replica.data_dir()).unwrap();
    let s = wait_for(
        "prefetch counters",
        Duration::from_secs(30),
        || {
            status(&archive, &pull, &pgdata).filter(|s| {
                s["prefault"]["blocks_warmed"].as_u64() > Some(0)
                    && s["prefault"]["pg_recovery_prefetch_source"].as_str() == Some("server")
            })
        },
        || {
            format!(
                "{:?}\n{}",
                status(&archive, &pull, &pgdata),
                daemon_log(&spool)
            )
        },
    );
    assert!(
        s["spool_hits"].as_u64() >= Some(1),
        "no segment came from the spool: {s:#}"
    );
    assert_eq!(s["postgres_running"].as_bool(), Some(true), "{s:#}");
    assert_eq!(s["prefault"]["decode_errors"].as_u64(), Some(0), "{s:#}");
    // PostgreSQL 15's default, read over the daemon's SQL connection, and called out.
    assert_eq!(
        s["prefault"]["pg_recovery_prefetch"].as_str(),
        Some("try"),
        "{s:#}"
    );
    let log = daemon_log(&spool);
    assert!(log.contains("set recovery_prefetch = off"), "{log}");

    let pid = daemon_pid(&spool);
    replica.stop();
    wait_until(
        "the daemon to close every file under PGDATA after PostgreSQL stopped",
        Duration::from_secs(5),
        || open_under(pid, &pgdata).is_empty(),
        || format!("still open: {:?}", open_under(pid, &pgdata)),
    );
    // SAFETY: signalling a process we started.
    unsafe { libc::kill(pid, libc::SIGTERM) };
}

/// With hot_standby off the daemon can never connect during recovery: PostgreSQL's
/// `recovery_prefetch` comes from its configuration files. With it on and full-page writes
/// on, the blocks PostgreSQL's prefetcher would read just before replay overwrites them
/// from an image (a PRUNE with an image, then a HOT update of the same page) are warmed
/// by walvault first.
#[test]
fn settings_come_from_the_files_and_blocks_postgresql_would_read_are_warmed_first() {
    use crate::pg_archive::{archiving_primary, make_archive_standby, CLUSTER};
    use walvault_tests::PgCluster;

    let (archive, push, _dir, spool, pull) = archive_with_spool(CLUSTER, "prefetch-pgconf", &[]);
    let primary = archiving_primary(&archive, &push, &["checkpoint_timeout = 1h"]);
    primary.pgbench_init(2);
    // Dead tuples on many pages: after a checkpoint, updates prune a page (its image in
    // the PRUNE record) and then update it in place.
    primary.pgbench(&["-n", "-t", "500", "-c", "2"]);
    let mut replica = PgCluster::from_basebackup(&primary, "replica", &["-X", "none"]);
    // A checkpoint before each round: every round's WAL has the pattern, so the segments
    // still in the spool while replay waits have it too.
    for _ in 0..3 {
        primary.psql("CHECKPOINT");
        primary.pgbench(&["-n", "-t", "500", "-c", "2"]);
        primary.switch_wal();
    }
    let last = primary.switch_wal();
    primary.wait_archived(&last, || archive.diag());

    make_archive_standby(&replica, &archive, &pull, None);
    // The apply delay parks replay at its first commit (all are younger than 10 minutes):
    // the later segments stay in the spool for the prefaulter, however late its turn comes
    // on a loaded machine (with replay running free it could find them taken already).
    replica.append_conf(&[
        "hot_standby = off",
        "recovery_prefetch = on",
        "recovery_min_apply_delay = '10min'",
    ]);
    replica.start_nowait();
    let pgdata = fs::canonicalize(replica.data_dir()).unwrap();
    let s = wait_for(
        "blocks warmed for PostgreSQL's own prefetch",
        Duration::from_secs(60),
        || {
            status(&archive, &pull, &pgdata)
                .filter(|s| s["prefault"]["warmed_for_pg_prefetch"].as_u64() > Some(0))
        },
        || {
            format!(
                "{:?}\n{}\n{}",
                status(&archive, &pull, &pgdata),
                daemon_log(&spool),
                replica.diag()
            )
        },
    );
    assert_eq!(
        s["prefault"]["pg_recovery_prefetch"].as_str(),
        Some("on"),
        "{s:#}"
    );
    assert_eq!(
        s["prefault"]["pg_recovery_prefetch_source"].as_str(),
        Some("files"),
        "{s:#}"
    );
    assert!(
        s["prefault"]["warmed_for_pg_prefetch"].as_u64() <= s["prefault"]["blocks_warmed"].as_u64()
            && s["prefault"]["io_requests"].as_u64() <= s["prefault"]["blocks_warmed"].as_u64()
            && s["prefault"]["io_requests"].as_u64() > Some(0),
        "{s:#}"
    );
    let log = daemon_log(&spool);
    assert!(log.contains("set recovery_prefetch = off"), "{log}");
    let pid = daemon_pid(&spool);
    replica.stop();
    // SAFETY: signalling a process we started.
    unsafe { libc::kill(pid, libc::SIGTERM) };
}

/// Finding 11: a data directory whose path is 200 bytes long puts the default spool's
/// control socket past the 108-byte `sun_path` limit. Replay still gets its segments from
/// the spool, and one daemon serves the whole recovery (archive-get never starts one per
/// call).
#[test]
fn pg_prefetch_with_a_200_byte_data_directory_path_runs_one_daemon() {
    use crate::pg_archive::{archiving_primary, make_archive_standby, wait_replayed, CLUSTER};
    use walvault_tests::{processes_running, PgCluster};

    let archive = Archive::start(CLUSTER);
    let push = archive.issue(CLUSTER, "push");
    // The default spool: <PGDATA>.walvault-spool, beside the data directory.
    let pull = archive.issue(CLUSTER, "pull");
    let primary = archiving_primary(&archive, &push, &["checkpoint_timeout = 1h"]);
    primary.pgbench_init(1);
    primary.psql("CHECKPOINT");
    // The data directory's absolute path is exactly 200 bytes: the cluster's temp dir is
    // /tmp/walvault-pg-replica-XXXXXX (31 bytes), then components of 60 bytes at most.
    let dir_len = "/tmp/walvault-pg-replica-".len() + 6;
    let pad = 200 - dir_len - 1 - "/data".len();
    let mut parts = Vec::new();
    let mut left = pad;
    while left > 0 {
        // components of at most 60 bytes, each but the last followed by a slash
        let n = if left > 61 { 60 } else { left };
        parts.push("d".repeat(n));
        left = (left - n).saturating_sub(1);
    }
    let data_rel = format!("{}/data", parts.join("/"));
    let mut replica =
        PgCluster::from_basebackup_at(&primary, "replica", &data_rel, &["-X", "none"]);
    assert_eq!(
        replica.data_dir().as_os_str().len(),
        200,
        "{}",
        replica.data_dir().display()
    );
    for _ in 0..3 {
        primary.pgbench(&["-n", "-t", "300", "-c", "2"]);
        primary.switch_wal();
    }
    primary.psql("CREATE TABLE marker (id int PRIMARY KEY, note text); INSERT INTO marker VALUES (1, 'last row')");
    let expected = primary.psql("SELECT count(*), sum(abalance) FROM pgbench_accounts");
    let last = primary.switch_wal();
    primary.wait_archived(&last, || archive.diag());

    make_archive_standby(&replica, &archive, &pull, None);
    // Replay waits a little after each commit: the daemon has time to spool ahead.
    replica.append_conf(&["recovery_min_apply_delay = '3s'"]);
    replica.start();
    wait_replayed(&replica, &archive, &expected);
    let pgdata = fs::canonicalize(replica.data_dir()).unwrap();
    let spool = PathBuf::from(format!("{}.walvault-spool", pgdata.display()));
    let s = wait_for(
        "a spool hit, counted by the one daemon",
        Duration::from_secs(30),
        || status(&archive, &pull, &pgdata).filter(|s| s["spool_hits"].as_u64() >= Some(1)),
        || {
            format!(
                "status: {:?}\ndaemon log: {}\n{}",
                status(&archive, &pull, &pgdata),
                daemon_log(&spool),
                replica.log_tail(40)
            )
        },
    );
    let started = replica.log().matches("started the prefetch daemon").count();
    assert_eq!(
        started,
        1,
        "archive-get started {started} daemons\n{s:#}\n{}",
        replica.log_tail(60)
    );
    let daemons: Vec<u32> = processes_running(&archive.bins().pullclient())
        .into_iter()
        .filter(|pid| {
            fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                let args: Vec<&[u8]> = c.split(|b| *b == 0).collect();
                args.contains(&&b"prefetch"[..])
                    && args.contains(&pgdata.as_os_str().as_encoded_bytes())
            })
        })
        .collect();
    assert_eq!(
        daemons.len(),
        1,
        "daemons for this data directory: {daemons:?}"
    );
    replica.stop();
    // SAFETY: signalling a process we started.
    unsafe { libc::kill(daemons[0] as i32, libc::SIGTERM) };
}

/// An LSN as PostgreSQL prints it (`16/B374D848`), as a number.
fn lsn(text: &str) -> u64 {
    let (hi, lo) = text.trim().split_once('/').expect("an LSN");
    (u64::from_str_radix(hi, 16).unwrap() << 32) | u64::from_str_radix(lo, 16).unwrap()
}

/// Issue 10 item 10: three cold restores in a row into the same data directory, the
/// daemon archive-get started for the first left running between them (as archive-get
/// leaves it). Each run's replay is held at its second segment until the daemon has
/// warmed blocks of that run's WAL (up into its last pgbench round): a daemon that kept
/// its memory of the blocks warmed and the WAL handed out in an earlier run warms nothing
/// in runs 2 and 3. After each `pg_ctl stop -w`, once the postmaster is gone, the daemon
/// holds no descriptor under PGDATA.
#[test]
fn pg_prefetch_daemon_warms_blocks_in_each_of_three_restores_and_lets_go_at_each_stop() {
    use crate::pg_backup::{
        archiving_primary, backup, backup_json, no_archiving, segment_range, try_pullclient,
        ACCOUNTS, CLUSTER,
    };
    use crate::pg_restore::gate_restore_command;
    use walvault_tests::PgCluster;

    let (archive, push, dir, spool, pull) = archive_with_spool(CLUSTER, "prefetch-restores", &[]);
    // Without full-page writes replay reads every block it changes: work for the
    // prefaulter in every run.
    let primary = archiving_primary(
        &archive,
        &push,
        &["full_page_writes = off", "checkpoint_timeout = 1h"],
    );
    primary.pgbench_init(1);
    let id = backup(&archive, &push, &primary, &["--fast"]);
    primary.pgbench(&["-n", "-t", "300", "-c", "2"]);
    primary.switch_wal();
    // Blocks past this LSN belong to the last round: a run that warmed them warmed its WAL
    // up to the end, not only what an earlier run left unwarmed.
    let last_round = lsn(&primary.psql("SELECT pg_current_wal_lsn()"));
    primary.pgbench(&["-n", "-t", "300", "-c", "2"]);
    let expected = primary.psql(ACCOUNTS);
    let last = primary.switch_wal();
    primary.wait_archived(&last, || archive.diag());
    let wal_start = backup_json(&archive, &id)["wal_start"]
        .as_str()
        .unwrap()
        .to_string();
    let segments = segment_range(&wal_start, &last);
    assert!(segments.len() >= 3, "too few segments: {segments:?}");
    let held = &segments[1];

    // restore_command through a gate: the first request for `held` waits for `go`.
    let gate = dir.subdir("gate");
    let mut copy = PgCluster::empty("restores");
    let pgdata_arg = copy.data_dir().to_string_lossy().into_owned();
    let mut daemon = None;
    let mut warmed_before = 0;
    for run in 1..=3 {
        if run > 1 {
            // The same directory, emptied: a cold restore of every file.
            for e in fs::read_dir(copy.data_dir()).unwrap().flatten() {
                let p = e.path();
                if p.is_dir() {
                    fs::remove_dir_all(&p).unwrap();
                } else {
                    fs::remove_file(&p).unwrap();
                }
            }
        }
        let out = try_pullclient(&archive, &pull, &["restore", "--pgdata", &pgdata_arg]);
        assert!(out.success(), "restore {run}\n{}", out.describe());
        no_archiving(&copy);
        gate_restore_command(&copy, &archive, &pull, &gate, held);
        let _ = fs::remove_file(gate.join("reached"));
        let _ = fs::remove_file(gate.join("go"));

        copy.start_nowait();
        wait_until(
            &format!("run {run}: PostgreSQL to ask for {held}"),
            WAIT_TIMEOUT,
            || gate.join("reached").exists(),
            || copy.diag(),
        );
        let pgdata = fs::canonicalize(copy.data_dir()).unwrap();
        let pid = daemon_pid(&spool);
        assert_eq!(
            *daemon.get_or_insert(pid),
            pid,
            "run {run}: another daemon serves the spool\n{}",
            daemon_log(&spool)
        );
        let s = wait_for(
            &format!("run {run}: blocks of this run's WAL warmed while replay waits"),
            WAIT_TIMEOUT,
            || {
                status(&archive, &pull, &pgdata).filter(|s| {
                    let p = &s["prefault"];
                    p["blocks_warmed"].as_u64() > Some(warmed_before)
                        && p["warmed_up_to"]
                            .as_str()
                            .is_some_and(|l| lsn(l) > last_round)
                })
            },
            || {
                format!(
                    "warmed before this run: {warmed_before}\nstatus: {:#?}\n{}\n{}",
                    status(&archive, &pull, &pgdata),
                    daemon_log(&spool),
                    copy.diag()
                )
            },
        );
        warmed_before = s["prefault"]["blocks_warmed"].as_u64().unwrap();
        fs::write(gate.join("go"), "").unwrap();
        wait_until(
            &format!("run {run}: recovery to end"),
            WAIT_TIMEOUT,
            || copy.try_psql("SELECT pg_is_in_recovery()").ok().as_deref() == Some("f"),
            || copy.diag(),
        );
        assert_eq!(copy.psql(ACCOUNTS), expected, "run {run}\n{}", copy.diag());

        let postmaster: i32 = fs::read_to_string(copy.data_dir().join("postmaster.pid"))
            .unwrap()
            .lines()
            .next()
            .and_then(|l| l.trim().parse().ok())
            .expect("postmaster.pid names the postmaster");
        copy.stop();
        wait_until(
            &format!("run {run}: the postmaster {postmaster} to be gone"),
            Duration::from_secs(30),
            || !alive(postmaster),
            || copy.diag(),
        );
        wait_until(
            &format!("run {run}: the daemon to close every file under PGDATA"),
            Duration::from_secs(5),
            || open_under(pid, &pgdata).is_empty(),
            || {
                format!(
                    "still open: {:?}\n{}",
                    open_under(pid, &pgdata),
                    daemon_log(&spool)
                )
            },
        );
    }
    let pid = daemon.unwrap();
    let pgdata = fs::canonicalize(copy.data_dir()).unwrap();
    let s = status(&archive, &pull, &pgdata).expect("the daemon answers");
    assert_eq!(s["prefault"]["postgres_starts"].as_u64(), Some(3), "{s:#}");
    // SAFETY: signalling a process we started.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    wait_until(
        "the daemon to exit after SIGTERM",
        Duration::from_secs(30),
        || !alive(pid),
        || daemon_log(&spool),
    );
}

/// `[prefetch] metrics_listen`: the daemon serves the counters prefetch-status prints as
/// Prometheus metrics that promtool accepts.
#[test]
fn the_daemon_serves_its_counters_to_prometheus() {
    let f = SpoolFixture::with(
        "pm",
        "prefetch-metrics",
        134217728,
        4,
        4242,
        &[("metrics_listen", "\"127.0.0.1:0\"")],
    );
    first_call_then_spooled(&f, 3);
    for (name, _) in &f.segments[1..] {
        let out = archive_get_in(&f.archive, &f.conf, &f.pgdata, name);
        assert!(out.success(), "{}", out.describe());
    }
    let s = counted(&f, 3, 1);
    let spool = &f.spool;
    let address_file = spool.join("metrics-address");
    let addr: std::net::SocketAddr = fs::read_to_string(&address_file)
        .unwrap_or_else(|e| panic!("{}: {e}\n{}", address_file.display(), daemon_log(spool)))
        .trim()
        .parse()
        .unwrap();
    let (code, scrape) = crate::pg_metrics::get(addr, "/metrics", &[]);
    assert_eq!(code, 200, "{scrape}");
    crate::pg_metrics::promtool_check(&scrape);
    let sample = |series: &str| crate::pg_metrics::sample(&scrape, series);
    for (series, field) in [
        ("walvault_prefetch_requests_total", "requests"),
        ("walvault_prefetch_spool_hits_total", "spool_hits"),
        ("walvault_prefetch_spool_misses_total", "spool_misses"),
    ] {
        assert_eq!(
            sample(series),
            s[field].as_u64().map(|n| n as f64),
            "{series} against prefetch-status {field}: {s}\n{scrape}"
        );
    }
    assert!(
        sample("walvault_prefetch_segments_fetched_total") >= Some(3.0),
        "{scrape}"
    );
    assert_eq!(
        sample("walvault_prefetch_postgres_running"),
        Some(0.0),
        "{scrape}"
    );
    assert!(
        sample("walvault_prefetch_skipped_blocks_total{reason=\"fpw\"}").is_some(),
        "{scrape}"
    );
    // Every family of the daemon's that the alert rules use is served.
    let rules =
        fs::read_to_string(crate::deploy::prometheus_dir().join("walvault.rules.yml")).unwrap();
    // So is every one the dashboard shows.
    let dashboard = crate::deploy::dashboard();
    let used: Vec<String> = crate::deploy::metric_names(&rules)
        .into_iter()
        .chain(crate::deploy::metric_names(&dashboard))
        .filter(|n| n.starts_with("walvault_prefetch_"))
        .collect();
    assert!(!used.is_empty());
    for name in used {
        assert!(
            scrape.contains(&format!("# TYPE {name} ")),
            "the alert rules use {name}, which the daemon does not serve:\n{scrape}"
        );
    }
    let (code, _) = crate::pg_metrics::get(addr, "/healthz", &[]);
    assert_eq!(code, 200);
}
