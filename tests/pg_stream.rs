//! `pushclient stream`, the receiver on a replication slot, against real PostgreSQL 15,
//! a real `archived` and `pg_receivewal` as the oracle nobody here wrote: RPO 0 as a
//! synchronous standby, a flush never reported early, byte agreement, kills of either
//! side, timelines, and bad input.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread::sleep;
use std::time::{Duration, Instant};

use walvault_tests::serde_json::{self, Value};
use walvault_tests::*;

use crate::pg_backup::{backup, restore, start_and_wait_promoted, ACCOUNTS, CLUSTER};

/// A running `pushclient stream` (as the `postgres` user) and its status file.
pub(crate) struct StreamReceiver {
    process: Option<BgProcess>,
    status: PathBuf,
    dir: TestDir,
    args: Vec<String>,
    push: PathBuf,
    bins_pushclient: PathBuf,
    sock: PathBuf,
}

impl StreamReceiver {
    /// Starts `pushclient stream --create-slot ARGS` against `pg`'s socket.
    pub(crate) fn start(archive: &Archive, push: &Path, pg: &PgCluster, args: &[&str]) -> Self {
        let dir = TestDir::new("stream");
        chown_pg(dir.path());
        let mut r = StreamReceiver {
            process: None,
            status: dir.join("stream.json"),
            dir,
            args: args.iter().map(|s| s.to_string()).collect(),
            push: push.to_path_buf(),
            bins_pushclient: archive.bins().pushclient(),
            sock: pg.sock_dir().to_path_buf(),
        };
        r.spawn();
        r
    }

    fn spawn(&mut self) {
        let mut cmd = Command::new(&self.bins_pushclient);
        as_pg_user(&mut cmd)
            .arg("stream")
            .arg("--config")
            .arg(&self.push)
            .arg("--status-file")
            .arg(&self.status)
            .args(&self.args)
            .env("PGHOST", &self.sock)
            .env("PGPORT", PG_PORT.to_string())
            .current_dir("/tmp");
        let prefix = self.dir.join("pushclient-stream");
        self.process = Some(BgProcess::spawn("pushclient stream", &mut cmd, &prefix));
    }

    /// The status file, parsed (`Null` before the first write).
    pub(crate) fn status(&self) -> Value {
        fs::read(&self.status)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or(Value::Null)
    }

    /// The receiver's log and status, for failure messages.
    pub(crate) fn diag(&self) -> String {
        let log = self
            .process
            .as_ref()
            .map(|p| p.stderr_tail(40))
            .unwrap_or_else(|| tail_file(&self.dir.join("pushclient-stream.stderr"), 40));
        format!(
            "--- pushclient stream (tail) ---\n{log}\n--- status ---\n{:#}",
            self.status()
        )
    }

    /// Waits until the status says `flushed` has reached `lsn` (as PostgreSQL prints it).
    pub(crate) fn wait_flushed(&self, pg: &PgCluster, lsn: &str) {
        wait_until(
            &format!("the receiver to flush {lsn}"),
            WAIT_TIMEOUT,
            || {
                let flushed = self.status()["flushed"].as_str().map(str::to_string);
                flushed.is_some_and(|f| {
                    pg.psql(&format!("SELECT '{f}'::pg_lsn >= '{lsn}'::pg_lsn")) == "t"
                })
            },
            || self.diag(),
        );
    }

    /// SIGKILL.
    pub(crate) fn kill9(&mut self) {
        let mut p = self.process.take().expect("the receiver is not running");
        p.signal_and_wait(libc::SIGKILL, Duration::from_secs(10))
            .expect("pushclient stream survived SIGKILL");
    }

    /// Starts it again with the same arguments.
    pub(crate) fn restart(&mut self) {
        assert!(self.process.is_none(), "the receiver is still running");
        self.spawn();
    }

    /// SIGTERM; the exit status and stderr.
    pub(crate) fn terminate(&mut self) -> (Option<i32>, String) {
        let mut p = self.process.take().expect("the receiver is not running");
        let status = p.signal_and_wait(libc::SIGTERM, Duration::from_secs(30));
        let stderr = p.stderr_tail(40);
        (status.and_then(|s| s.code()), stderr)
    }

    /// Waits for the receiver to exit by itself; its exit code and stderr.
    pub(crate) fn wait_exit(&mut self, timeout: Duration) -> (Option<i32>, String) {
        let p = self.process.take().expect("the receiver is not running");
        let (status, _out, err) = p.wait(timeout);
        (status.code(), err)
    }
}

/// Waits until `pg` lists the receiver (`application_name`) as streaming, with
/// `sync_state` when given.
pub(crate) fn wait_streaming(
    pg: &PgCluster,
    app: &str,
    sync_state: Option<&str>,
    r: &StreamReceiver,
) {
    let want = sync_state.unwrap_or("%");
    wait_until(
        &format!("{app} to stream from {} (sync_state {want})", pg.name()),
        WAIT_TIMEOUT,
        || {
            pg.psql(&format!(
                "SELECT count(*) FROM pg_stat_replication WHERE application_name = '{app}' \
                 AND state = 'streaming' AND sync_state LIKE '{want}'"
            )) == "1"
        },
        || {
            format!(
                "{}\n{}\n{}",
                r.diag(),
                pg.diag(),
                pg.psql("SELECT * FROM pg_stat_replication")
            )
        },
    );
}

/// A primary archiving into `archive` whose only synchronous standby is the receiver.
fn sync_primary(archive: &Archive, push: &Path) -> PgCluster {
    crate::pg_archive::archiving_primary(
        archive,
        push,
        &[
            "synchronous_standby_names = 'walvault'",
            "wal_sender_timeout = '60s'",
        ],
    )
}

/// `pullclient archive-get NAME` into a file of `dir`; its bytes, or `None` when the
/// archive does not have it.
fn archive_get(archive: &Archive, pull: &Path, name: &str, dir: &TestDir) -> Option<Vec<u8>> {
    chown_pg(dir.path());
    let dest = dir.join(format!("got-{name}"));
    let _ = fs::remove_file(&dest);
    let out = archive.archive_get(pull, name, &dest);
    match out.code() {
        Some(0) => Some(fs::read(&dest).unwrap()),
        Some(1) if out.stderr.contains("not in the archive") => None,
        _ => panic!("archive-get {name}\n{}\n{}", out.describe(), archive.diag()),
    }
}

/// The segment holding `lsn` on timeline 1 (16 MiB segments) and the offset in it.
fn segment_of(lsn: &str) -> (String, usize) {
    let (hi, lo) = lsn.split_once('/').unwrap();
    let v = (u64::from_str_radix(hi, 16).unwrap() << 32) | u64::from_str_radix(lo, 16).unwrap();
    let segno = v >> 24;
    (
        format!("00000001{:08X}{:08X}", segno / 256, segno % 256),
        (v & 0xFF_FFFF) as usize,
    )
}

/// The synchronous archive: the primary is killed (SIGKILL) right after a COMMIT
/// returned and its data directory is thrown away; a restore from the latest backup and
/// the archive alone has the row. The row's segment is not complete when the primary
/// dies: the restore replays the receiver's unfinished segment.
#[test]
fn rpo_zero_a_commit_the_sync_archive_acknowledged_survives_the_loss_of_the_primary() {
    let archive = Archive::start(CLUSTER);
    let push = archive.issue(CLUSTER, "push");
    let pull = archive.issue(CLUSTER, "pull");
    let mut primary = sync_primary(&archive, &push);
    let receiver = StreamReceiver::start(&archive, &push, &primary, &["--create-slot"]);
    wait_streaming(&primary, "walvault", Some("sync"), &receiver);
    primary.pgbench_init(1);
    backup(&archive, &push, &primary, &["--fast"]);
    primary.pgbench(&["-n", "-c", "4", "-t", "100"]);
    let expected = primary.psql(ACCOUNTS);
    primary.psql("CREATE TABLE marker (id int, note text)");
    // The COMMIT returned: the archive has it durably (the receiver is the sync standby).
    let inserted_at: f64 = primary
        .psql(
            "INSERT INTO marker VALUES (42, 'acknowledged by the sync archive') \
             RETURNING pg_current_wal_insert_lsn() - '0/0'",
        )
        .lines()
        .next()
        .and_then(|l| l.trim().parse().ok())
        .expect("the insert position");
    // archived's /metrics says so too: the receiver's durable WAL (or, once its segment
    // completed, the newest segment) ends past the row.
    let (_, scrape) = crate::pg_metrics::get(archive.metrics_addr(), "/metrics", &[]);
    let durable = [
        format!("walvault_stream_flushed_lsn{{cluster=\"{CLUSTER}\"}}"),
        format!("walvault_wal_last_segment_end_lsn{{cluster=\"{CLUSTER}\"}}"),
    ]
    .iter()
    .filter_map(|series| crate::pg_metrics::sample(&scrape, series))
    .fold(0.0, f64::max);
    assert!(
        durable > inserted_at,
        "the archive's durable WAL ends at {durable}, before the acknowledged row at {inserted_at}:\n{scrape}"
    );
    // The primary's WAL end as the receiver reported it with its appends: past the row,
    // not past where PostgreSQL is now; the lag is what the archive lacks of it.
    let now_at: f64 = primary
        .psql("SELECT pg_current_wal_lsn() - '0/0'")
        .trim()
        .parse()
        .unwrap();
    let server_end = crate::pg_metrics::sample(
        &scrape,
        &format!("walvault_stream_server_wal_end_lsn{{cluster=\"{CLUSTER}\"}}"),
    )
    .unwrap_or_else(|| panic!("no server WAL end in the scrape:\n{scrape}"));
    assert!(
        server_end >= inserted_at && server_end <= now_at,
        "server WAL end {server_end}: the row is at {inserted_at}, the primary at {now_at}"
    );
    let lag = crate::pg_metrics::sample(
        &scrape,
        &format!("walvault_stream_lag_bytes{{cluster=\"{CLUSTER}\"}}"),
    )
    .unwrap();
    assert_eq!(lag, (server_end - durable).max(0.0), "{scrape}");
    primary.kill9();
    // Gone for good: its WAL with it.
    fs::remove_dir_all(primary.data_dir()).unwrap();
    drop(receiver);

    let mut copy = restore(&archive, &pull, "after-loss", &[]);
    start_and_wait_promoted(&mut copy);
    assert_eq!(
        copy.psql("SELECT note FROM marker WHERE id = 42"),
        "acknowledged by the sync archive",
        "the acknowledged row is lost\n{}\n{}",
        copy.diag(),
        archive.diag()
    );
    assert_eq!(copy.psql(ACCOUNTS), expected);
}

/// The receiver reports a flush only after archived fsynced: with `archived` frozen
/// (SIGSTOP) a commit waits; after SIGCONT it returns, and its WAL is in the archive
/// byte for byte.
#[test]
fn a_flush_is_never_reported_before_archived_has_the_bytes() {
    let archive = Archive::start(CLUSTER);
    let push = archive.issue(CLUSTER, "push");
    let pull = archive.issue(CLUSTER, "pull");
    let primary = sync_primary(&archive, &push);
    let receiver = StreamReceiver::start(&archive, &push, &primary, &["--create-slot"]);
    wait_streaming(&primary, "walvault", Some("sync"), &receiver);
    primary.psql("CREATE TABLE frozen (id int)");

    let pid = archive.pid() as i32;
    // SAFETY: kill(2) on archived's pid.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let mut psql = pg_command("psql");
    psql.args(["-AtX", "-v", "ON_ERROR_STOP=1", "-h"])
        .arg(primary.sock_dir())
        .args(["-p", &PG_PORT.to_string(), "-d", "postgres", "-c"])
        .arg("INSERT INTO frozen VALUES (1)");
    let mut insert = BgProcess::spawn(
        "psql INSERT",
        &mut psql,
        &primary.dir().join("frozen-insert"),
    );
    sleep(Duration::from_secs(3));
    let waited = insert.try_wait();
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    assert!(
        waited.is_none(),
        "the COMMIT returned while archived was frozen: {waited:?}\n{}",
        receiver.diag()
    );
    let (status, _, err) = insert.wait(WAIT_TIMEOUT);
    assert!(status.success(), "the INSERT failed after SIGCONT: {err}");
    let lsn = primary.psql("SELECT pg_current_wal_flush_lsn()");
    receiver.wait_flushed(&primary, &lsn);
    let (segment, offset) = segment_of(&lsn);
    let dir = TestDir::new("frozen");
    let got = archive_get(&archive, &pull, &segment, &dir)
        .unwrap_or_else(|| panic!("{segment} is not in the archive\n{}", receiver.diag()));
    let local = fs::read(primary.wal_dir().join(&segment)).unwrap();
    assert_eq!(
        got.len(),
        local.len(),
        "the partial is not padded to the segment size"
    );
    assert!(
        got[..offset] == local[..offset],
        "the archive's {segment} differs from the primary's before the commit's end ({lsn})"
    );
}

/// `pg_receivewal` on its own slot beside the receiver during pgbench: every segment
/// both completed is byte-identical in both and in the primary's own pg_wal.
#[test]
fn streamed_segments_agree_with_pg_receivewal_byte_for_byte() {
    let archive = Archive::start(CLUSTER);
    let push = archive.issue(CLUSTER, "push");
    let pull = archive.issue(CLUSTER, "pull");
    // No archive_command: every segment in the archive came through the receiver.
    let mut primary = PgCluster::initdb("primary", &[]);
    primary.append_conf(&["wal_level = replica", "wal_keep_size = '1GB'"]);
    primary.start();
    let receiver = StreamReceiver::start(&archive, &push, &primary, &["--create-slot"]);
    wait_streaming(&primary, "walvault", None, &receiver);

    let pgrw_dir = primary.dir().subdir("pg_receivewal");
    chown_pg(&pgrw_dir);
    let mut create = pg_command("pg_receivewal");
    create.arg("-h").arg(primary.sock_dir()).args([
        "-p",
        &PG_PORT.to_string(),
        "--slot",
        "oracle",
        "--create-slot",
    ]);
    let out = try_run(&mut create);
    assert!(
        out.success(),
        "pg_receivewal --create-slot\n{}",
        out.describe()
    );
    let mut rw = pg_command("pg_receivewal");
    rw.arg("-h")
        .arg(primary.sock_dir())
        .args([
            "-p",
            &PG_PORT.to_string(),
            "--slot",
            "oracle",
            "--no-loop",
            "-D",
        ])
        .arg(&pgrw_dir);
    let _pg_receivewal = BgProcess::spawn(
        "pg_receivewal",
        &mut rw,
        &primary.dir().join("pg_receivewal"),
    );
    wait_streaming(&primary, "pg_receivewal", None, &receiver);

    primary.pgbench_init(2);
    // Segments completed by WAL volume and by switches (whose zero-filled tail is streamed
    // too).
    for _ in 0..3 {
        primary.pgbench(&["-n", "-c", "4", "-T", "2"]);
        primary.switch_wal();
    }
    let last = primary.switch_wal();
    let end = primary.psql("SELECT pg_current_wal_lsn()");
    receiver.wait_flushed(&primary, &end);
    wait_until(
        "pg_receivewal to complete the last segment",
        WAIT_TIMEOUT,
        || pgrw_dir.join(&last).exists(),
        || {
            format!(
                "{:?}",
                fs::read_dir(&pgrw_dir)
                    .map(|d| d.flatten().map(|e| e.file_name()).collect::<Vec<_>>())
            )
        },
    );
    let mut compared = 0;
    let dir = TestDir::new("agree");
    let mut names: Vec<String> = fs::read_dir(&pgrw_dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| is_segment_name(n))
        .collect();
    names.sort();
    for name in &names {
        let theirs = fs::read(pgrw_dir.join(name)).unwrap();
        let ours = wait_for(
            &format!("{name} to be a complete segment in the archive"),
            WAIT_TIMEOUT,
            || {
                archive_get(&archive, &pull, name, &dir)
                    .filter(|b| b.len() == theirs.len() && b == &theirs)
            },
            || format!("{}\n{}", receiver.diag(), archive.diag()),
        );
        let primary_copy = fs::read(primary.wal_dir().join(name)).unwrap();
        assert!(ours == theirs, "{name} differs from pg_receivewal's");
        assert!(
            ours == primary_copy,
            "{name} differs from the primary's pg_wal copy"
        );
        compared += 1;
    }
    assert!(
        compared >= 3,
        "only {compared} segments compared: {names:?}"
    );
    let listing = archive.wal_list_json(CLUSTER);
    let t1 = &listing["timelines"][0];
    assert!(
        t1["gaps"].as_array().is_some_and(|g| g.is_empty()),
        "gaps in the streamed WAL: {listing:#}"
    );
}

/// `archived` killed (SIGKILL) while the receiver streams, and restarted; then the
/// receiver killed and restarted: no gap, and every commit that returned (sync) is in the
/// archive: a restore from the archive alone has every row.
#[test]
fn kills_of_archived_and_of_the_receiver_lose_nothing_acknowledged() {
    let mut archive = Archive::start(CLUSTER);
    let push = archive.issue(CLUSTER, "push");
    let pull = archive.issue(CLUSTER, "pull");
    let mut primary = sync_primary(&archive, &push);
    let mut receiver = StreamReceiver::start(&archive, &push, &primary, &["--create-slot"]);
    wait_streaming(&primary, "walvault", Some("sync"), &receiver);
    primary.pgbench_init(1);
    backup(&archive, &push, &primary, &["--fast"]);
    primary.psql("CREATE TABLE acked (id int)");
    let mut acked = 0;
    let mut commit = |primary: &PgCluster, n: usize| {
        for _ in 0..n {
            acked += 1;
            primary.psql(&format!("INSERT INTO acked VALUES ({acked})"));
        }
    };
    commit(&primary, 20);
    archive.kill9();
    archive.serve();
    archive.wait_ready();
    wait_streaming(&primary, "walvault", Some("sync"), &receiver);
    commit(&primary, 20);
    let reconnects = receiver.status()["reconnects"].as_u64().unwrap_or(0);
    assert!(
        reconnects >= 1,
        "the receiver did not count its reconnect\n{}",
        receiver.diag()
    );
    receiver.kill9();
    receiver.restart();
    wait_streaming(&primary, "walvault", Some("sync"), &receiver);
    commit(&primary, 20);
    let n = acked;

    primary.kill9();
    let mut copy = restore(&archive, &pull, "after-kills", &[]);
    start_and_wait_promoted(&mut copy);
    assert_eq!(
        copy.psql("SELECT count(*), coalesce(max(id), 0) FROM acked"),
        format!("{n}|{n}"),
        "acknowledged commits are missing\n{}\n{}",
        copy.diag(),
        archive.diag()
    );
}

/// The receiver refuses a server of another system than the cluster's (both system
/// identifiers in the message, exit 1), and a missing slot without `--create-slot`.
#[test]
fn another_clusters_server_and_a_missing_slot_are_refused() {
    let archive = Archive::start(CLUSTER);
    let push = archive.issue(CLUSTER, "push");
    let primary = crate::pg_archive::archiving_primary(&archive, &push, &[]);
    let first = primary.switch_wal();
    let bound = primary.psql("SELECT system_identifier FROM pg_control_system()");
    primary.wait_archived(&first, || archive.diag());
    let mut other = PgCluster::initdb("other", &[]);
    other.append_conf(&["wal_level = replica"]);
    other.start();
    let theirs = other.psql("SELECT system_identifier FROM pg_control_system()");
    let mut r = StreamReceiver::start(&archive, &push, &other, &["--create-slot"]);
    let (code, err) = r.wait_exit(WAIT_TIMEOUT);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains(&bound) && err.contains(&theirs),
        "both systems are not named: {err}"
    );
    assert_eq!(
        other.psql("SELECT count(*) FROM pg_replication_slots"),
        "0",
        "a slot was created on a server that was refused"
    );

    let mut r = StreamReceiver::start(&archive, &push, &primary, &["--slot", "nosuch"]);
    let (code, err) = r.wait_exit(WAIT_TIMEOUT);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("--create-slot"), "{err}");
}

/// A slot held by another receiver: the error is in the status (PostgreSQL's words),
/// the receiver keeps retrying, and streams once the slot is free.
#[test]
fn a_slot_in_use_is_retried_until_it_is_free() {
    let archive = Archive::start(CLUSTER);
    let push = archive.issue(CLUSTER, "push");
    let mut primary = PgCluster::initdb("primary", &[]);
    primary.append_conf(&["wal_level = replica"]);
    primary.start();
    primary.psql("SELECT pg_create_physical_replication_slot('walvault', true)");
    let busy = primary.dir().subdir("busy");
    chown_pg(&busy);
    let mut rw = pg_command("pg_receivewal");
    rw.arg("-h")
        .arg(primary.sock_dir())
        .args(["-p", &PG_PORT.to_string(), "--slot", "walvault", "-D"])
        .arg(&busy);
    let mut holder = BgProcess::spawn("pg_receivewal", &mut rw, &primary.dir().join("holder"));
    wait_until(
        "pg_receivewal to hold the slot",
        WAIT_TIMEOUT,
        || {
            primary.psql("SELECT active FROM pg_replication_slots WHERE slot_name = 'walvault'")
                == "t"
        },
        || primary.diag(),
    );
    let receiver = StreamReceiver::start(&archive, &push, &primary, &[]);
    wait_until(
        "the receiver to report the slot in use",
        WAIT_TIMEOUT,
        || {
            receiver.status()["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("is active"))
        },
        || receiver.diag(),
    );
    holder.signal_and_wait(libc::SIGTERM, Duration::from_secs(10));
    wait_streaming(&primary, "walvault", None, &receiver);
}

/// SIGTERM: the receiver exits 0 and reports its last position.
#[test]
fn sigterm_stops_the_receiver_cleanly() {
    let archive = Archive::start(CLUSTER);
    let push = archive.issue(CLUSTER, "push");
    let primary = sync_primary(&archive, &push);
    let mut receiver = StreamReceiver::start(&archive, &push, &primary, &["--create-slot"]);
    wait_streaming(&primary, "walvault", Some("sync"), &receiver);
    primary.psql("CREATE TABLE t (id int); INSERT INTO t VALUES (1)");
    let lsn = primary.psql("SELECT pg_current_wal_flush_lsn()");
    receiver.wait_flushed(&primary, &lsn);
    let started = Instant::now();
    let (code, err) = receiver.terminate();
    assert_eq!(code, Some(0), "{err}");
    assert!(started.elapsed() < Duration::from_secs(20));
    assert!(err.contains("stream receiver stopped"), "{err}");
    assert_eq!(receiver.status()["state"], "stopped");
}

/// The receiver streams from a standby, which is promoted: the receiver follows the
/// server's next timeline (its history file archived first, the old timeline's last
/// segment sealed), and what is written on timeline 2 reaches the archive.
#[test]
fn the_receiver_follows_a_promotion_to_the_servers_next_timeline() {
    let archive = Archive::start(CLUSTER);
    let push = archive.issue(CLUSTER, "push");
    let primary = crate::pg_archive::archiving_primary(&archive, &push, &[]);
    primary.pgbench_init(1);
    let mut standby = PgCluster::from_basebackup(&primary, "standby", &["-R"]);
    standby.append_conf(&["hot_standby = on", "archive_mode = off"]);
    standby.start();
    let receiver = StreamReceiver::start(&archive, &push, &standby, &["--create-slot"]);
    wait_streaming(&standby, "walvault", None, &receiver);
    primary.pgbench(&["-n", "-t", "200"]);
    let lsn = primary.psql("SELECT pg_current_wal_flush_lsn()");
    wait_until(
        "the standby to replay the primary's WAL",
        WAIT_TIMEOUT,
        || standby.psql(&format!("SELECT pg_last_wal_replay_lsn() >= '{lsn}'")) == "t",
        || standby.diag(),
    );
    receiver.wait_flushed(&standby, &lsn);
    assert_eq!(receiver.status()["timeline"], 1, "{}", receiver.diag());

    standby.promote();
    standby.psql("CREATE TABLE after_promotion (id int); INSERT INTO after_promotion VALUES (2)");
    let lsn2 = standby.psql("SELECT pg_current_wal_flush_lsn()");
    receiver.wait_flushed(&standby, &lsn2);
    assert_eq!(receiver.status()["timeline"], 2, "{}", receiver.diag());
    let listing = archive.wal_list_json(CLUSTER);
    assert!(
        listing["history_files"]
            .as_array()
            .is_some_and(|h| h.iter().any(|f| f == "00000002.history")),
        "the new timeline's history file is not archived: {listing:#}"
    );
    assert!(
        listing["streamed"]
            .as_array()
            .is_some_and(|s| s.iter().any(|seg| seg["name"]
                .as_str()
                .is_some_and(|n| n.starts_with("00000002")))),
        "nothing streamed on timeline 2: {listing:#}"
    );
}

/// The server is restored to an earlier point and promoted (timeline 2 forks from the
/// middle of timeline 1, which the archive holds further): the receiver on the restored
/// server starts at the fork by itself, and a restore from the archive follows timeline
/// 2: it has what was written before the fork and on timeline 2, not what timeline 1
/// wrote after the fork.
#[test]
fn after_a_pitr_of_the_server_the_receiver_rebases_to_the_fork() {
    let archive = Archive::start(CLUSTER);
    let push = archive.issue(CLUSTER, "push");
    let pull = archive.issue(CLUSTER, "pull");
    let mut primary = crate::pg_archive::archiving_primary(&archive, &push, &[]);
    let mut receiver = StreamReceiver::start(&archive, &push, &primary, &["--create-slot"]);
    wait_streaming(&primary, "walvault", None, &receiver);
    primary.pgbench_init(1);
    backup(&archive, &push, &primary, &["--fast"]);
    primary.psql(
        "CREATE TABLE rows (id int, part text); INSERT INTO rows VALUES (1, 'before the fork')",
    );
    primary.psql("SELECT pg_create_restore_point('fork')");
    primary.psql("INSERT INTO rows VALUES (2, 'timeline 1 after the fork')");
    let end = primary.psql("SELECT pg_current_wal_flush_lsn()");
    receiver.wait_flushed(&primary, &end);
    let last = primary.switch_wal();
    primary.wait_archived(&last, || archive.diag());
    receiver.terminate();
    primary.stop();

    let pitr = ["--target-name", "fork", "--target-action", "promote"];
    let mut rewound = restore(&archive, &pull, "rewound", &pitr);
    start_and_wait_promoted(&mut rewound);
    assert_eq!(rewound.psql("SELECT count(*) FROM rows"), "1");
    rewound.psql("INSERT INTO rows VALUES (3, 'timeline 2')");
    let mut receiver = StreamReceiver::start(&archive, &push, &rewound, &["--create-slot"]);
    wait_streaming(&rewound, "walvault", None, &receiver);
    let end2 = rewound.psql("SELECT pg_current_wal_flush_lsn()");
    receiver.wait_flushed(&rewound, &end2);
    let status = receiver.status();
    assert_eq!(status["timeline"], 2, "{}", receiver.diag());
    assert!(
        status["started_at"]
            .as_str()
            .is_some_and(|s| s.contains("timeline 2")),
        "{}",
        receiver.diag()
    );
    let (code, err) = receiver.terminate();
    assert_eq!(code, Some(0), "{err}");
    rewound.stop();

    let mut again = restore(&archive, &pull, "again", &[]);
    start_and_wait_promoted(&mut again);
    assert_eq!(
        again.psql("SELECT string_agg(id::text, ',' ORDER BY id) FROM rows"),
        "1,3",
        "{}",
        again.diag()
    );
}

/// A standby fed only by restore_command follows a primary whose receiver streams into
/// the archive: a row committed without any segment switch reaches the standby, because
/// archive-get serves the receiver's unfinished segment and the standby asks for it again.
#[test]
fn a_standby_fed_by_the_archive_alone_sees_commits_before_their_segment_completes() {
    let archive = Archive::start(CLUSTER);
    let push = archive.issue(CLUSTER, "push");
    let pull = archive.issue(CLUSTER, "pull");
    let primary = crate::pg_archive::archiving_primary(&archive, &push, &[]);
    let receiver = StreamReceiver::start(&archive, &push, &primary, &["--create-slot"]);
    wait_streaming(&primary, "walvault", None, &receiver);
    primary.pgbench_init(1);
    backup(&archive, &push, &primary, &["--fast"]);
    let mut standby = restore(&archive, &pull, "archive-standby", &[]);
    crate::pg_archive::make_archive_standby(&standby, &archive, &pull, None);
    standby.append_conf(&["wal_retrieve_retry_interval = '1s'"]);
    fs::remove_file(standby.data_dir().join("recovery.signal")).ok();
    standby.start();

    primary.pgbench(&["-n", "-c", "2", "-t", "100"]);
    primary.psql("CREATE TABLE seen (id int); INSERT INTO seen VALUES (7)");
    let segment_before = primary.psql("SELECT pg_walfile_name(pg_current_wal_lsn())");
    let committed = Instant::now();
    wait_until(
        "the archive-fed standby to replay the row",
        WAIT_TIMEOUT,
        || {
            standby
                .try_psql("SELECT count(*) FROM seen")
                .ok()
                .as_deref()
                == Some("1")
        },
        || format!("{}\n{}", standby.diag(), receiver.diag()),
    );
    let lag = committed.elapsed();
    assert_eq!(
        primary.psql("SELECT pg_walfile_name(pg_current_wal_lsn())"),
        segment_before,
        "the segment switched meanwhile: the test proves nothing about partials"
    );
    eprintln!(
        "archive-fed standby replayed the commit after {lag:?} (wal_retrieve_retry_interval 1 s)"
    );
}

/// The connection to PostgreSQL breaks in the middle of a message (a proxy cuts it): the
/// receiver reconnects by itself and the archive ends up with the same bytes as pg_wal,
/// without a gap.
#[test]
fn a_connection_cut_mid_message_is_resumed_without_a_gap() {
    let archive = Archive::start(CLUSTER);
    let push = archive.issue(CLUSTER, "push");
    let pull = archive.issue(CLUSTER, "pull");
    let mut primary = PgCluster::initdb("primary", &[]);
    primary.append_conf(&["wal_level = replica", "wal_keep_size = '1GB'"]);
    primary.start();
    let proxy = PgProxy::start(primary.sock_dir(), PG_PORT, None);
    let conninfo = format!("host=127.0.0.1 port={} user=postgres", proxy.port());
    let receiver = StreamReceiver::start(
        &archive,
        &push,
        &primary,
        &["--create-slot", "--conninfo", &conninfo],
    );
    wait_streaming(&primary, "walvault", None, &receiver);
    // Well into the XLogData stream, at an odd byte.
    proxy.cut_after(proxy.relayed_from_server() + 3_000_001);
    primary.pgbench_init(2);
    let first = primary.switch_wal();
    wait_until(
        "the proxy to cut the connection",
        WAIT_TIMEOUT,
        || proxy.was_cut(),
        || receiver.diag(),
    );
    wait_streaming(&primary, "walvault", None, &receiver);
    let end = primary.psql("SELECT pg_current_wal_flush_lsn()");
    receiver.wait_flushed(&primary, &end);
    assert!(
        receiver.status()["reconnects"].as_u64().unwrap_or(0) >= 1,
        "{}",
        receiver.diag()
    );
    let dir = TestDir::new("cut");
    let local = fs::read(primary.wal_dir().join(&first)).unwrap();
    wait_until(
        &format!("{first} in the archive, identical to pg_wal's"),
        WAIT_TIMEOUT,
        || archive_get(&archive, &pull, &first, &dir).is_some_and(|b| b == local),
        || receiver.diag(),
    );
    let listing = archive.wal_list_json(CLUSTER);
    assert!(
        listing["timelines"][0]["gaps"]
            .as_array()
            .is_some_and(|g| g.is_empty()),
        "{listing:#}"
    );
}

/// A short `wal_sender_timeout` (3 s) while archived answers nothing for 8 s (SIGSTOP):
/// the receiver stops reading once its small pending bound is reached but keeps sending
/// statuses, so the walsender never times out, and once archived is back the stream
/// goes on in the same session.
#[test]
fn a_stalled_archive_does_not_trip_a_short_wal_sender_timeout() {
    let archive = Archive::start(CLUSTER);
    let push = archive.issue(CLUSTER, "push");
    let mut primary = PgCluster::initdb("primary", &[]);
    primary.append_conf(&["wal_level = replica", "wal_sender_timeout = '3s'"]);
    primary.start();
    // A small bound on what may wait for the archive: the receiver stops reading early
    // in the stall, so only its own statuses (not answers to keepalives, which it does
    // not see then) keep the walsender from timing out.
    let receiver = StreamReceiver::start(
        &archive,
        &push,
        &primary,
        &["--create-slot", "--max-pending-bytes", "262144"],
    );
    wait_streaming(&primary, "walvault", None, &receiver);
    primary.pgbench_init(1);
    let pid = archive.pid() as i32;
    // SAFETY: kill(2) on archived's pid.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    primary.pgbench(&["-n", "-c", "2", "-T", "8"]);
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    let end = primary.psql("SELECT pg_current_wal_flush_lsn()");
    receiver.wait_flushed(&primary, &end);
    assert!(
        !primary.log().contains("replication timeout"),
        "the walsender timed out\n{}",
        primary.diag()
    );
    let status = receiver.status();
    assert_eq!(
        status["reconnects"].as_u64(),
        Some(0),
        "{}",
        receiver.diag()
    );
    assert!(
        status["read_pauses"].as_u64().is_some_and(|n| n >= 1),
        "the receiver never stopped reading, so the stall did not test its statuses\n{}",
        receiver.diag()
    );
}
