//! `pullclient restore` and `archive-get` against the things that can go wrong around
//! them: a server still running in the target directory, a spool planted by another
//! user, an archive that goes away in the middle of a recovery, a backup that carries an
//! earlier restore's recovery target. Real PostgreSQL 15 and a
//! real `archived` on loopback in every test.

use std::fs;
use std::path::{Path, PathBuf};

use walvault_tests::*;

use crate::pg_backup::{
    archiving_primary, backup, backup_json, restore, segment_range, start_and_wait_promoted,
    try_pullclient, ACCOUNTS, CLUSTER,
};

/// `restore --delta` into the data directory of a running cluster is refused before
/// anything is touched: the error names the postmaster's pid, the server keeps running
/// and answering, and its files (a file the backup does not have included) are intact.
#[test]
fn delta_restore_refuses_a_running_server() {
    let archive = Archive::start(CLUSTER);
    let push = archive.issue(CLUSTER, "push");
    let pull = archive.issue(CLUSTER, "pull");
    let primary = archiving_primary(&archive, &push, &[]);
    primary.pgbench_init(1);
    backup(&archive, &push, &primary, &["--fast"]);
    let expected = primary.psql(ACCOUNTS);

    let pid_file = primary.data_dir().join("postmaster.pid");
    let pid_text = fs::read_to_string(&pid_file).unwrap();
    let pid = pid_text
        .lines()
        .next()
        .unwrap_or_default()
        .trim()
        .to_string();
    assert!(!pid.is_empty(), "postmaster.pid has no pid:\n{pid_text}");
    // A file the backup does not have: --delta would remove it.
    let stray = primary.data_dir().join("base").join("not-in-the-backup");
    fs::write(&stray, b"keep me").unwrap();
    chown_pg(&stray);

    let dir = primary.data_dir().to_string_lossy().into_owned();
    let out = try_pullclient(&archive, &pull, &["restore", "--pgdata", &dir, "--delta"]);
    assert_eq!(
        out.code(),
        Some(1),
        "restore --delta into a running cluster\n{}",
        out.describe()
    );
    assert!(
        out.stderr.contains(&pid) && out.stderr.contains("running"),
        "the refusal does not name the running postmaster (pid {pid})\n{}",
        out.describe()
    );
    assert_eq!(
        fs::read_to_string(&pid_file).ok().as_deref(),
        Some(pid_text.as_str()),
        "postmaster.pid was changed"
    );
    assert_eq!(
        fs::read(&stray).ok().as_deref(),
        Some(&b"keep me"[..]),
        "a file was removed"
    );
    assert!(
        !primary.data_dir().join("recovery.signal").exists(),
        "the refused restore wrote recovery.signal"
    );
    assert_eq!(primary.psql(ACCOUNTS), expected, "{}", primary.diag());
    assert_eq!(primary.psql("SELECT pg_is_in_recovery()"), "f");
}

/// A primary that was itself restored to a target and promoted keeps the old recovery
/// settings in postgresql.auto.conf (PostgreSQL never removes them), and its backups carry
/// them. A restore of such a backup with no target must not inherit the old one: before,
/// the old `recovery_target_name` stayed in force beside the appended settings and
/// recovery ended with "recovery ended before configured recovery target was reached".
/// Now every recovery target the backup came with is commented out (left there, with a
/// note, for the DBA to read) and the restore's own settings appear once.
#[test]
fn a_restore_does_not_inherit_the_recovery_target_the_backup_came_with() {
    let archive = Archive::start(CLUSTER);
    let push = archive.issue(CLUSTER, "push");
    let pull = archive.issue(CLUSTER, "pull");
    let primary = archiving_primary(&archive, &push, &[]);
    // What a primary restored with --target-name and promoted has in its auto.conf.
    primary.psql("ALTER SYSTEM SET recovery_target_name = 'never_created'");
    primary.psql("ALTER SYSTEM SET recovery_target_action = 'shutdown'");
    primary.psql("ALTER SYSTEM SET restore_command = 'false'");
    primary.pgbench_init(1);
    backup(&archive, &push, &primary, &["--fast"]);
    primary.pgbench(&["-n", "-t", "200"]);
    let expected = primary.psql(ACCOUNTS);
    let last = primary.switch_wal();
    primary.wait_archived(&last, || archive.diag());

    let mut copy = restore(&archive, &pull, "inherits", &[]);
    let auto = fs::read_to_string(copy.data_dir().join("postgresql.auto.conf")).unwrap();
    let live: Vec<&str> = auto
        .lines()
        .filter(|l| !l.trim_start().starts_with('#') && !l.trim().is_empty())
        .collect();
    assert!(
        !live
            .iter()
            .any(|l| l.starts_with("recovery_target_name")
                || l.starts_with("recovery_target_action")),
        "an inherited recovery target is still in force:\n{auto}"
    );
    assert_eq!(
        live.iter()
            .filter(|l| l.starts_with("restore_command"))
            .count(),
        1,
        "restore_command is set more than once:\n{auto}"
    );
    assert!(
        auto.contains("was: recovery_target_name = 'never_created'"),
        "the inherited setting was not kept as a comment:\n{auto}"
    );
    start_and_wait_promoted(&mut copy);
    assert_eq!(copy.psql(ACCOUNTS), expected, "{}", copy.diag());
    assert!(
        copy.log().contains("redo done"),
        "recovery did not replay to the end\n{}",
        copy.diag()
    );
}

/// Removes a directory outside the test's temp dirs when dropped.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Plants a spool as another user would: `dir` and `dir/ready` owned by the test's user
/// (root, not `postgres`), mode 0777, holding an all-zero segment (mode 0666) for each of `names`
/// with a matching `.b3`. Served, such a segment looks like the end of the WAL and ends
/// recovery early; it verifies against its own hash.
fn plant_spool(dir: &Path, names: &[String]) {
    let ready = dir.join("ready");
    fs::create_dir_all(&ready).unwrap();
    chmod(dir, 0o777);
    chmod(&ready, 0o777);
    let zeros = vec![0u8; 16 << 20];
    let hash = b3(&zeros);
    for name in names {
        // Sparse: 16 MiB of zeros that take no disk.
        let f = fs::File::create(ready.join(name)).unwrap();
        f.set_len(16 << 20).unwrap();
        chmod(&ready.join(name), 0o666);
        fs::write(ready.join(format!("{name}.b3")), &hash).unwrap();
    }
}

/// A spool planted by another user, both where archive-get looks first (beside PGDATA)
/// and in its fallback in world-writable /var/tmp, is refused: archive-get logs why and
/// fetches every segment directly; replay reaches the primary's last row, and the
/// planted segments were never served.
#[test]
fn spool_of_another_user_is_refused() {
    let Some((pg_uid, _)) = pg_user() else {
        panic!(
            "this test plays the other user as root while archive-get runs as `postgres`: \
             run the tests as root"
        );
    };
    let archive = Archive::start(CLUSTER);
    let push = archive.issue(CLUSTER, "push");
    let pull = archive.issue(CLUSTER, "pull");
    let (_primary, expected, segments) = backed_up_primary(&archive, &push, 3);

    let mut copy = restore(&archive, &pull, "forged", &[]);
    let pgdata = fs::canonicalize(copy.data_dir()).unwrap();
    let beside = PathBuf::from(format!("{}.walvault-spool", pgdata.display()));
    let fallback = PathBuf::from(format!(
        "/var/tmp/walvault-spool-{pg_uid}-{}",
        &b3(pgdata.as_os_str().as_encoded_bytes())[..16]
    ));
    let _cleanup = RemoveOnDrop(fallback.clone());
    plant_spool(&beside, &segments);
    plant_spool(&fallback, &segments);

    start_and_wait_promoted(&mut copy);
    assert_eq!(copy.psql(ACCOUNTS), expected, "{}", copy.diag());
    let log = copy.log();
    for seg in &segments {
        assert!(
            log.contains(&format!("restored log file \"{seg}\" from archive")),
            "segment {seg} was not restored\n{}",
            copy.diag()
        );
        for spool in [&beside, &fallback] {
            assert!(
                spool.join("ready").join(seg).exists(),
                "planted {seg} in {} was taken",
                spool.display()
            );
        }
    }
    assert!(
        !log.contains("restored from the prefetch spool"),
        "a segment was served from a planted spool\n{}",
        copy.diag()
    );
    for spool in [&beside, &fallback] {
        assert!(
            log.contains(&format!("{} belongs to uid 0", spool.display())),
            "archive-get did not say why it refused {}\n{}",
            spool.display(),
            copy.diag()
        );
    }
}

/// Sets `key = value` lines in `[table]` of a client config (replacing those keys).
fn set_in_table(conf: &Path, table: &str, settings: &[(&str, &str)]) {
    let text = fs::read_to_string(conf).unwrap();
    let mut lines: Vec<String> = Vec::new();
    let mut current = String::new();
    for l in text.lines() {
        let t = l.trim();
        if t.starts_with('[') {
            current = t.trim_matches(|c| c == '[' || c == ']').to_string();
        } else if current == table
            && settings
                .iter()
                .any(|(k, _)| t.starts_with(&format!("{k} =")))
        {
            continue;
        }
        lines.push(l.to_string());
    }
    let at = lines
        .iter()
        .position(|l| l.trim() == format!("[{table}]"))
        .unwrap_or_else(|| panic!("{} has no [{table}] table:\n{text}", conf.display()))
        + 1;
    for (k, v) in settings {
        lines.insert(at, format!("{k} = {v}"));
    }
    fs::write(conf, lines.join("\n") + "\n").unwrap();
    chown_pg(conf);
}

/// The issue's scenario: `pullclient restore` with no target, `timeout_secs = 5`,
/// prefetching off, and the archive stopped once three segments after the backup's
/// first were replayed, until PostgreSQL reacts. archive-get retries for
/// `recovery_retry_secs`, then stops recovery (exit 200, a log line saying why) instead
/// of letting PostgreSQL take the outage for the end of the WAL and promote. Started
/// again with the archive back, recovery replays every segment, ends on the primary's
/// last row and promotes once, to timeline 2.
#[test]
fn archive_outage_stops_archive_recovery_instead_of_ending_it() {
    let mut archive = Archive::start(CLUSTER);
    let push = archive.issue(CLUSTER, "push");
    let pull = archive.issue_with(CLUSTER, "pull", Some(5));
    set_in_table(&pull, "prefetch", &[("enabled", "false")]);
    set_in_table(&pull, "archive_get", &[("recovery_retry_secs", "5")]);
    let (_primary, expected, segments) = backed_up_primary(&archive, &push, 5);
    assert!(segments.len() >= 5, "too few segments: {segments:?}");
    let held = segments[3].clone();

    let mut copy = restore(&archive, &pull, "outage", &[]);
    // The first request for `held` waits until the test has stopped the archive, so the
    // outage starts at a known segment.
    let gate = copy.dir().subdir("gate");
    gate_restore_command(&copy, &archive, &pull, &gate, &held);

    copy.start_nowait();
    wait_until(
        &format!("PostgreSQL to ask for {held}"),
        WAIT_TIMEOUT,
        || gate.join("reached").exists(),
        || copy.diag(),
    );
    archive.stop();
    fs::write(gate.join("go"), "").unwrap();
    let pid_file = copy.data_dir().join("postmaster.pid");
    wait_until(
        "PostgreSQL to stop, or to end recovery",
        WAIT_TIMEOUT * 2,
        || !pid_file.exists() || copy.log().contains("selected new timeline ID"),
        || copy.diag(),
    );
    let log = copy.log();
    assert!(
        !log.contains("selected new timeline ID") && !log.contains("redo done"),
        "recovery ended at the outage instead of stopping\n{}",
        copy.diag()
    );
    assert!(
        log.contains(&format!("could not restore file \"{held}\" from archive"))
            && log.contains("exit code 200")
            && log.contains("archive recovery stops here"),
        "PostgreSQL did not stop because archive-get said so\n{}",
        copy.diag()
    );
    copy.exited();

    archive.serve();
    start_and_wait_promoted(&mut copy);
    assert_eq!(copy.psql(ACCOUNTS), expected, "{}", copy.diag());
    let log = copy.log();
    for seg in &segments {
        assert!(
            log.contains(&format!("restored log file \"{seg}\" from archive")),
            "segment {seg} was skipped\n{}",
            copy.diag()
        );
    }
    assert_eq!(
        log.matches("selected new timeline ID").count(),
        1,
        "{}",
        copy.diag()
    );
    assert_eq!(
        copy.psql("SELECT substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8)"),
        "00000002",
        "{}",
        copy.diag()
    );
}

/// Makes `copy`'s restore_command a gate in the directory `gate` before archive-get with
/// `pull`: the first request for `held` touches `gate/reached` and waits until `gate/go`
/// exists. Appended to postgresql.auto.conf, so it outranks what `pullclient restore`
/// wrote there (call it again after another restore).
pub(crate) fn gate_restore_command(
    copy: &PgCluster,
    archive: &Archive,
    pull: &Path,
    gate: &Path,
    held: &str,
) {
    chown_pg(gate);
    let g = gate.display();
    let script = gate.join("restore.sh");
    let get = archive
        .restore_command(pull)
        .replace("%f", "\"$1\"")
        .replace("%p", "\"$2\"");
    fs::write(
        &script,
        format!(
            "#!/bin/sh\nif [ \"$1\" = {held} ] && [ ! -e {g}/reached ]; then\n  touch {g}/reached\n  \
             while [ ! -e {g}/go ]; do sleep 0.1; done\nfi\nexec {get}\n"
        ),
    )
    .unwrap();
    chmod(&script, 0o755);
    let auto = copy.data_dir().join("postgresql.auto.conf");
    let mut conf = fs::read_to_string(&auto).unwrap();
    conf.push_str(&format!("restore_command = '{} %f %p'\n", script.display()));
    fs::write(&auto, conf).unwrap();
}

/// A primary archiving into `archive`, with a backup and then `rounds` of pgbench, each
/// ended by a WAL switch, all archived: the primary, its rows (ACCOUNTS) and every segment
/// from the backup's first to the last one.
fn backed_up_primary(
    archive: &Archive,
    push: &Path,
    rounds: usize,
) -> (PgCluster, String, Vec<String>) {
    let primary = archiving_primary(archive, push, &[]);
    primary.pgbench_init(1);
    let id = backup(archive, push, &primary, &["--fast"]);
    for _ in 0..rounds {
        primary.pgbench(&["-n", "-t", "300"]);
        primary.switch_wal();
    }
    let expected = primary.psql(ACCOUNTS);
    let last = primary.switch_wal();
    primary.wait_archived(&last, || archive.diag());
    let wal_start = backup_json(archive, &id)["wal_start"]
        .as_str()
        .unwrap()
        .to_string();
    let segments = segment_range(&wal_start, &last);
    (primary, expected, segments)
}
