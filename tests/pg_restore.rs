//! `pullclient restore` and `archive-get` against the things that can go wrong around
//! them: a server still running in the target directory, a spool planted by another
//! user, an archive that goes away in the middle of a recovery. Real PostgreSQL 15 and a
//! real `archived` on loopback in every test.

use std::fs;

use walvault_tests::*;

use crate::pg_backup::{archiving_primary, backup, try_pullclient, ACCOUNTS, CLUSTER};

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
