//! The audit trail beside a real PostgreSQL 15: a segment archived by the primary's
//! archive_command, fetched by an archive-fed standby and expired by retention has all
//! three steps in `archived wal history`, with the certificates openssl reads from the
//! client configs and the request id PostgreSQL's log holds; the trail is in the catalog
//! before archive-push hears "stored" (a SIGKILL right after loses nothing of it) and
//! survives deleting the catalog.

use std::process::Command;

use serde_json::Value;
use walvault_tests::*;

use crate::pg_archive::{archiving_primary, load_primary, make_archive_standby, wait_replayed};
use crate::pg_backup::{backup, CLUSTER};

/// The serial number of a client config's certificate, as openssl prints it.
fn openssl_serial(config: &std::path::Path) -> String {
    let cfg = walvault_protocol::net::config::ClientConfig::load(config)
        .unwrap_or_else(|e| panic!("{}: {e:#}", config.display()));
    let pem = std::env::temp_dir().join(format!("audit-cert-{}.pem", std::process::id()));
    std::fs::write(&pem, &cfg.client_cert).unwrap();
    let out = try_run(
        Command::new("openssl")
            .args(["x509", "-noout", "-serial", "-in"])
            .arg(&pem),
    );
    let _ = std::fs::remove_file(&pem);
    assert!(
        out.success(),
        "openssl (Debian package openssl) is needed: {}",
        out.describe()
    );
    out.stdout
        .trim()
        .strip_prefix("serial=")
        .unwrap_or_else(|| panic!("openssl printed no serial: {}", out.describe()))
        .to_string()
}

/// `archived wal history --json` of `name`: its records.
fn history(archive: &Archive, name: &str) -> Vec<Value> {
    let out = archive.admin(&["wal", "history", "--cluster", CLUSTER, name, "--json"]);
    out.stdout
        .lines()
        .map(|l| {
            serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}\n{}", out.describe()))
        })
        .collect()
}

fn steps(records: &[Value]) -> Vec<String> {
    records
        .iter()
        .map(|r| r["step"].as_str().unwrap_or("?").to_string())
        .collect()
}

fn step<'a>(records: &'a [Value], name: &str) -> &'a Value {
    records
        .iter()
        .find(|r| r["step"] == name)
        .unwrap_or_else(|| panic!("no {name} step in {records:#?}"))
}

#[test]
fn a_segment_pushed_fetched_and_expired_tells_its_story_after_the_catalog_is_lost() {
    let mut archive = Archive::start(CLUSTER);
    let push = archive.issue(CLUSTER, "push");
    let pull = archive.issue(CLUSTER, "pull");
    let push_serial = openssl_serial(&push);
    let pull_serial = openssl_serial(&pull);
    assert_ne!(push_serial, pull_serial);
    let primary = archiving_primary(&archive, &push, &[]);
    let mut standby = PgCluster::from_basebackup(&primary, "standby", &["-X", "none"]);
    let (expected, _) = load_primary(&primary, &archive);
    make_archive_standby(&standby, &archive, &pull, None);
    standby.start();
    wait_replayed(&standby, &archive, &expected);

    // A segment the standby fetched (through its spool or directly).
    let segments = primary.archived_segments();
    let fetched = segments
        .iter()
        .find(|s| {
            steps(&history(&archive, s))
                .iter()
                .any(|st| st == "served" || st == "prefetched")
        })
        .unwrap_or_else(|| panic!("no segment was fetched by the standby: {segments:?}"))
        .clone();
    let story = history(&archive, &fetched);
    let st = steps(&story);
    assert_eq!(
        &st[..3],
        ["received", "stored", "acknowledged"],
        "{story:#?}"
    );
    let stored = step(&story, "stored");
    let expect_push = format!("push:{CLUSTER} serial {push_serial}");
    let expect_pull = format!("pull:{CLUSTER} serial {pull_serial}");
    assert_eq!(stored["peer"], expect_push.as_str(), "{story:#?}");
    assert_eq!(stored["size"], 16 << 20, "{story:#?}");
    let sent = story
        .iter()
        .find(|r| r["step"] == "served" || r["step"] == "prefetched")
        .unwrap();
    assert_eq!(sent["peer"], expect_pull.as_str(), "{story:#?}");
    // The request id is in PostgreSQL's log: archive-push logged it as archive_command.
    let request = stored["request"]
        .as_str()
        .expect("a request id")
        .to_string();
    let log = primary.log();
    assert!(
        log.lines()
            .any(|l| l.contains(&fetched) && l.contains(&format!("request={request}"))),
        "request {request} of {fetched} is not in the primary's log:\n{}",
        primary.log_tail(40)
    );
    standby.stop();

    // Two backups, retention keeps the newer: the fetched segment (before it) expires.
    backup(&archive, &push, &primary, &["--fast"]);
    let seg = primary.switch_wal();
    primary.wait_archived(&seg, || archive.diag());
    backup(&archive, &push, &primary, &["--fast"]);
    let report = archive.admin(&["retention", "run", "--keep-full", "1", "--json"]);
    let report: Value = serde_json::from_str(&report.stdout).unwrap();
    assert!(
        report["clusters"][0]["expired_wal_files"].as_u64() > Some(0),
        "{report:#}"
    );
    let story = history(&archive, &fetched);
    let expired = story.last().unwrap();
    assert_eq!(expired["step"], "expired", "{story:#?}");
    let summary = &expired["summary"];
    assert_eq!(summary["stored_by"], expect_push.as_str(), "{story:#?}");
    assert_eq!(summary["stored_request"], request.as_str(), "{story:#?}");
    assert!(
        summary["sent_to"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p == expect_pull.as_str()),
        "{story:#?}"
    );
    let text = archive
        .admin(&["wal", "history", "--cluster", CLUSTER, &fetched])
        .stdout;
    for part in ["expired", &expect_push, &expect_pull, &request] {
        assert!(text.contains(part), "no {part:?} in:\n{text}");
    }

    // A push acknowledged just before a SIGKILL is in the trail after the restart.
    let newest = primary.switch_wal();
    primary.wait_archived(&newest, || archive.diag());
    archive.kill9();
    archive.serve();
    let newest_story = history(&archive, &newest);
    assert_eq!(
        &steps(&newest_story)[..3],
        ["received", "stored", "acknowledged"],
        "{newest_story:#?}"
    );

    // `archived audit` streams the cluster's records from a time on.
    let out = archive.admin(&["audit", "--cluster", CLUSTER, "--since", "1h", "--json"]);
    let records: Vec<Value> = out
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        records
            .iter()
            .any(|r| r["file"] == newest.as_str() && r["step"] == "acknowledged")
            && records
                .iter()
                .any(|r| r["file"] == fetched.as_str() && r["step"] == "expired"),
        "{}",
        out.describe()
    );
    let ids: Vec<&str> = records.iter().filter_map(|r| r["id"].as_str()).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "oldest first: {ids:?}");
    let later = archive.admin(&["audit", "--cluster", CLUSTER, "--since", "@4000000000"]);
    assert_eq!(
        later.stdout.lines().count(),
        1,
        "only the header: {}",
        later.describe()
    );

    // The catalog is lost: the trail comes back from the store.
    archive.stop();
    let catalog = archive.data_dir().join("catalog");
    std::fs::remove_dir_all(&catalog).unwrap();
    archive.serve();
    assert_eq!(
        history(&archive, &fetched),
        story,
        "the expired file's story"
    );
    assert_eq!(
        steps(&history(&archive, &newest))[..3],
        ["received", "stored", "acknowledged"]
    );
    // And the rebuilt archive still serves the files and records again.
    let wal_dir = primary.dir().subdir("fetched-again");
    chown_pg(&wal_dir);
    let dest = wal_dir.join(&newest);
    let out = archive.archive_get(&pull, &newest, &dest);
    assert!(out.success(), "{}", out.describe());
    wait_until(
        "the fetch to be recorded",
        std::time::Duration::from_secs(10),
        || steps(&history(&archive, &newest)).contains(&"served".to_string()),
        || archive.diag(),
    );
    let served = history(&archive, &newest);
    let served = served.iter().rev().find(|r| r["step"] == "served").unwrap();
    assert_eq!(served["peer"], expect_pull.as_str());
    let request = served["request"].as_str().unwrap();
    assert!(
        out.stderr.contains(&format!("request={request}")) || out.stderr.contains(request),
        "archive-get did not log request {request}: {}",
        out.describe()
    );
}
