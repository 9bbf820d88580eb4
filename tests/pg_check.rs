//! `archived check` beside a real archiving PostgreSQL 15: a healthy archive passes every
//! named check; archiving stopped past the age limit, a segment object deleted behind the
//! archive's back and certificates near their end fail the checks that name them, with
//! hints, and `--nagios` exits with Nagios' codes.

use std::time::{Duration, Instant};

use serde_json::Value;
use walvault_tests::*;

use crate::pg_archive::archiving_primary;
use crate::pg_backup::CLUSTER;

/// The checks every answer has, in order (ops/check.rs).
const NAMES: [&str; 10] = [
    "catalog",
    "store_writable",
    "disk_space",
    "wal_continuity",
    "wal_age",
    "backups",
    "backup_age",
    "retention",
    "verify",
    "certificates",
];

/// `archived check --json`: its exit code and the checks by name.
fn check(archive: &Archive) -> (Option<i32>, Vec<Value>) {
    let out = archive.try_admin(&["check", "--cluster", CLUSTER, "--json"]);
    let v: Value = serde_json::from_str(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "archived check --json printed no JSON ({e})\n{}",
            out.describe()
        )
    });
    let checks = v.as_array().cloned().unwrap_or_default();
    let names: Vec<&str> = checks.iter().filter_map(|c| c["name"].as_str()).collect();
    assert_eq!(names, NAMES, "{}", out.describe());
    (out.code(), checks)
}

fn named<'a>(checks: &'a [Value], name: &str) -> &'a Value {
    checks.iter().find(|c| c["name"] == name).unwrap()
}

/// An archive whose archived.toml sets `[checks]` keys (which `archived init` writes with
/// their defaults) to these values.
fn configured(settings: &'static [(&'static str, u64)]) -> Archive {
    Archive::start_configured(
        CLUSTER,
        move |toml| {
            let text = std::fs::read_to_string(toml).unwrap();
            let mut out = String::new();
            for line in text.lines() {
                let key = line.split('=').next().unwrap_or_default().trim();
                match settings.iter().find(|(k, _)| *k == key) {
                    Some((k, v)) => out.push_str(&format!("{k} = {v}\n")),
                    None => out.push_str(&format!("{line}\n")),
                }
            }
            for (k, _) in settings {
                assert!(
                    out.contains(&format!("\n{k} = ")),
                    "archived.toml has no {k}:\n{text}"
                );
            }
            std::fs::write(toml, out).unwrap();
        },
        vec![],
    )
}

#[test]
fn check_passes_on_a_healthy_archive_and_names_what_breaks() {
    const CRITICAL_AGE: u64 = 25;
    // This machine's own free space is not what the test is about (the grading is unit-
    // tested in ops/check.rs): thresholds of 0% keep disk_space OK wherever it runs.
    let archive = configured(&[
        ("wal_age_warning_secs", 20),
        ("wal_age_critical_secs", 25),
        ("disk_free_warning_percent", 0),
        ("disk_free_critical_percent", 0),
    ]);
    let push = archive.issue(CLUSTER, "push");
    let mut primary = archiving_primary(&archive, &push, &[]);
    primary.pgbench_init(1);
    crate::pg_backup::backup(&archive, &push, &primary, &["--fast"]);
    // Retention runs daily (here with the default policy, which expires nothing), verify
    // weekly.
    archive.admin(&["retention", "run", "--cluster", CLUSTER]);
    let last = primary.switch_wal();
    primary.wait_archived(&last, || archive.diag());
    archive.admin(&["verify", "--cluster", CLUSTER]);
    let archived_at = Instant::now();

    let (code, checks) = check(&archive);
    for c in &checks {
        assert_eq!(c["status"], "OK", "{c:#}\nall: {checks:#?}");
    }
    assert_eq!(code, Some(0), "{checks:#?}");
    let text = archive.admin(&["check", "--cluster", CLUSTER]).stdout;
    assert!(
        text.contains("OK  ") && text.contains("wal_continuity"),
        "{text}"
    );
    let nagios = archive.try_admin(&["check", "--cluster", CLUSTER, "--nagios"]);
    assert_eq!(nagios.code(), Some(0), "{}", nagios.describe());
    assert!(
        nagios
            .stdout
            .starts_with("WALVAULT OK - cluster main: 10 checks OK | wal_age="),
        "{}",
        nagios.describe()
    );
    assert!(
        nagios.stdout.contains(" backups=1;;1"),
        "{}",
        nagios.describe()
    );

    // archived status says the same, on one screen per cluster.
    let out = archive.admin(&["status", "--cluster", CLUSTER, "--json"]);
    let status: Value = serde_json::from_str(&out.stdout).unwrap();
    let main = &status[0];
    assert_eq!(main["cluster"], CLUSTER, "{status:#}");
    assert_eq!(main["newest_segment"], last.as_str(), "{status:#}");
    assert_eq!(main["usable_backups"], 1, "{status:#}");
    assert!(main["ready_files"].as_u64() >= Some(1), "{status:#}");
    assert!(
        main["window_start"].as_i64().is_some()
            && main["window_end"].as_i64() >= main["window_start"].as_i64(),
        "{status:#}"
    );
    assert_eq!(main["failing_checks"], serde_json::json!([]), "{status:#}");
    // The retention and verify runs above, as they recorded themselves.
    assert!(
        main["retention_last_success"].as_i64().is_some(),
        "{status:#}"
    );
    assert_eq!(main["retention_error"], Value::Null, "{status:#}");
    assert!(main["verify_last_run"].as_i64().is_some(), "{status:#}");
    assert_eq!(main["verify_scope"], "wal and backups", "{status:#}");
    assert_eq!(main["verify_problems"], 0, "{status:#}");
    let screen = archive.admin(&["status"]).stdout;
    for part in [
        "cluster main (system ",
        "recovery window",
        "retention       ran ",
        "verify          ",
        "(wal and backups): no problem",
        "checks          all OK",
    ] {
        assert!(screen.contains(part), "no {part:?} in:\n{screen}");
    }

    // Archiving stops (the primary is down) past the critical age.
    primary.stop();
    let wait = Duration::from_secs(CRITICAL_AGE + 1).saturating_sub(archived_at.elapsed());
    std::thread::sleep(wait);
    let (code, checks) = check(&archive);
    let age = named(&checks, "wal_age");
    assert_eq!(age["status"], "CRITICAL", "{checks:#?}");
    assert!(age["message"].as_str().unwrap().contains(&last), "{age:#}");
    assert!(
        age["hint"].as_str().unwrap().contains("pg_stat_archiver"),
        "{age:#}"
    );
    assert_eq!(code, Some(2), "{checks:#?}");
    let nagios = archive.try_admin(&["check", "--cluster", CLUSTER, "--nagios"]);
    assert_eq!(nagios.code(), Some(2), "{}", nagios.describe());
    assert!(
        nagios
            .stdout
            .starts_with("WALVAULT CRITICAL - cluster main: wal_age CRITICAL"),
        "{}",
        nagios.describe()
    );
    assert!(nagios.stdout.contains(";20;25"), "{}", nagios.describe());

    // A segment the backup needs is deleted from the store behind the archive's back:
    // continuity and the backup count fail, naming it.
    let listed = archive.admin(&["backups", "list", "--cluster", CLUSTER, "--json"]);
    let backups: Value = serde_json::from_str(&listed.stdout).unwrap();
    let first = backups[0]["wal_start"].as_str().unwrap().to_string();
    let object = archive
        .data_dir()
        .join(format!("store/{CLUSTER}/wal/00000001/{first}.zst"));
    std::fs::remove_file(&object).unwrap_or_else(|e| panic!("removing {}: {e}", object.display()));
    let (code, checks) = check(&archive);
    let cont = named(&checks, "wal_continuity");
    assert_eq!(cont["status"], "CRITICAL", "{checks:#?}");
    assert!(
        cont["message"].as_str().unwrap().contains(&first)
            && cont["message"]
                .as_str()
                .unwrap()
                .contains("missing from the store"),
        "{cont:#}"
    );
    assert!(
        cont["hint"].as_str().unwrap().contains("archive-push"),
        "{cont:#}"
    );
    let count = named(&checks, "backups");
    assert_eq!(count["status"], "CRITICAL", "{count:#}");
    assert_eq!(named(&checks, "backup_age")["status"], "CRITICAL");
    assert_eq!(named(&checks, "catalog")["status"], "OK");
    assert_eq!(code, Some(2));
}

#[test]
fn certificates_near_their_end_warn_and_an_unreachable_archive_is_unknown() {
    // rcgen issues certificates valid until 4096: with a warning window of 27 000 years
    // every one is near its end. The server reads its real ones.
    let mut archive = configured(&[("cert_warning_days", 10_000_000), ("cert_critical_days", 1)]);
    let (_, checks) = check(&archive);
    let certs = named(&checks, "certificates");
    assert_eq!(certs["status"], "WARNING", "{checks:#?}");
    assert!(
        certs["message"].as_str().unwrap().contains("expires first"),
        "{certs:#}"
    );
    assert!(
        certs["hint"].as_str().unwrap().contains("certificate"),
        "{certs:#}"
    );
    // No WAL yet: a warning that says so, not an error.
    assert_eq!(named(&checks, "wal_continuity")["status"], "WARNING");
    assert_eq!(named(&checks, "backups")["status"], "CRITICAL");
    // No retention run recorded: a warning that names the timer.
    let retention = named(&checks, "retention");
    assert_eq!(retention["status"], "WARNING", "{retention:#}");
    assert!(
        retention["hint"]
            .as_str()
            .unwrap()
            .contains("archived-retention.timer"),
        "{retention:#}"
    );

    archive.stop();
    let out = archive.try_admin(&["check", "--cluster", CLUSTER, "--nagios"]);
    assert_eq!(out.code(), Some(3), "{}", out.describe());
    assert!(
        out.stdout.starts_with("WALVAULT UNKNOWN - cluster main: "),
        "{}",
        out.describe()
    );
}

/// Flips one byte of the file at `path` (`at` from its start), whatever its mode.
fn flip_byte(path: &std::path::Path, at: u64) {
    use std::os::unix::fs::{FileExt, PermissionsExt};
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[b[0] ^ 0x5a], at).unwrap();
}

/// `archived verify ARGS --json`: exit code and report.
fn verify(archive: &Archive, args: &[&str]) -> (Option<i32>, Value) {
    let mut all = vec!["verify", "--cluster", CLUSTER, "--json"];
    all.extend_from_slice(args);
    let out = archive.try_admin(&all);
    let v: Value = serde_json::from_str(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "archived verify --json printed no JSON ({e})\n{}",
            out.describe()
        )
    });
    (out.code(), v)
}

#[test]
fn verify_finds_a_flipped_byte_in_a_segment_and_in_a_pack_and_names_both() {
    let archive = Archive::start(CLUSTER);
    let push = archive.issue(CLUSTER, "push");
    let primary = archiving_primary(&archive, &push, &[]);
    primary.pgbench_init(1);
    crate::pg_backup::backup(&archive, &push, &primary, &["--fast"]);
    let last = primary.switch_wal();
    primary.wait_archived(&last, || archive.diag());

    let (code, report) = verify(&archive, &["--max-rate", "512"]);
    assert_eq!(code, Some(0), "{report:#}");
    assert_eq!(report["problems"], serde_json::json!([]), "{report:#}");
    for field in ["wal_files", "packs", "chunks"] {
        assert!(report[field].as_u64() > Some(0), "{field}: {report:#}");
    }
    assert_eq!(report["manifests"], 1, "{report:#}");
    let text = archive.admin(&["verify", "--cluster", CLUSTER]).stdout;
    assert!(text.contains("no problem found"), "{text}");

    // One byte flipped in a stored segment and one in a pack, behind archived's back.
    let store = archive.data_dir().join("store");
    let segment = format!("{CLUSTER}/wal/00000001/{last}.zst");
    let seg_path = store.join(&segment);
    flip_byte(&seg_path, std::fs::metadata(&seg_path).unwrap().len() / 2);
    let packs = store.join(CLUSTER).join("packs");
    let pack_path = std::fs::read_dir(&packs)
        .unwrap()
        .flatten()
        .flat_map(|d| std::fs::read_dir(d.path()).unwrap().flatten())
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "pack"))
        .unwrap_or_else(|| panic!("no pack under {}", packs.display()));
    flip_byte(
        &pack_path,
        std::fs::metadata(&pack_path).unwrap().len() - 100,
    );
    let pack = pack_path
        .strip_prefix(&store)
        .unwrap()
        .to_string_lossy()
        .into_owned();

    let (code, report) = verify(&archive, &[]);
    assert_eq!(code, Some(2), "{report:#}");
    let problems = report["problems"].as_array().unwrap();
    let about = |key: &str| problems.iter().any(|p| p["object"] == key);
    assert!(
        about(&segment),
        "the flipped segment {segment} is not named: {report:#}"
    );
    assert!(
        about(&pack),
        "the flipped pack {pack} is not named: {report:#}"
    );
    assert!(
        problems.iter().any(|p| p["problem"]
            .as_str()
            .unwrap()
            .contains("cannot be restored")),
        "the backup that needs the damaged pack's chunks is not named: {report:#}"
    );
    // The run is recorded: archived check names the problems, /metrics counts them.
    let (code, checks) = check(&archive);
    assert_eq!(code, Some(2), "{checks:#?}");
    let v = named(&checks, "verify");
    assert_eq!(v["status"], "CRITICAL", "{v:#}");
    let message = v["message"].as_str().unwrap();
    assert!(
        message.contains("problem(s)") && message.contains(&segment),
        "{v:#}"
    );
    let (_, scrape) = crate::pg_metrics::get(archive.metrics_addr(), "/metrics", &[]);
    let problems_series = format!("walvault_verify_problems{{cluster=\"{CLUSTER}\"}}");
    assert!(
        crate::pg_metrics::sample(&scrape, &problems_series).is_some_and(|n| n >= 2.0),
        "{scrape}"
    );
    // --no-record leaves the record as it was; --wal alone reads only WAL.
    let (code, _) = verify(&archive, &["--wal", "--no-record"]);
    assert_eq!(code, Some(2));
    let (code, wal_only) = verify(&archive, &["--wal"]);
    assert_eq!(code, Some(2));
    assert_eq!(wal_only["packs"], 0, "{wal_only:#}");
    assert!(
        wal_only["problems"]
            .as_array()
            .unwrap()
            .iter()
            .all(|p| p["object"] == segment.as_str()),
        "{wal_only:#}"
    );
}

/// `BINARY check ARGS --config CONF` as postgres against `pg`'s socket.
fn client_check(
    binary: &std::path::Path,
    args: &[&str],
    conf: &std::path::Path,
    pg: &PgCluster,
) -> Output {
    let mut cmd = std::process::Command::new(binary);
    as_pg_user(&mut cmd)
        .arg("check")
        .args(args)
        .arg("--config")
        .arg(conf)
        .env("PGHOST", pg.sock_dir())
        .env("PGPORT", PG_PORT.to_string())
        .current_dir("/tmp");
    try_run_timeout(&mut cmd, Duration::from_secs(180))
}

fn pushclient_check(archive: &Archive, push: &std::path::Path, pg: &PgCluster) -> Output {
    client_check(&archive.bins().pushclient(), &["--timeout", "60"], push, pg)
}

#[test]
fn pushclient_check_archives_a_switched_segment_and_names_a_wrong_setting() {
    let archive = Archive::start(CLUSTER);
    let push = archive.issue(CLUSTER, "push");
    let mut primary = archiving_primary(&archive, &push, &["archive_timeout = 60"]);
    let out = pushclient_check(&archive, &push, &primary);
    assert!(out.success(), "{}\n{}", out.describe(), primary.diag());
    for line in [
        "ok: wal_level = replica",
        "ok: archive_mode = on",
        "ok: archive_timeout = 1min",
        "archived and read back verified",
    ] {
        assert!(
            out.stdout.contains(line),
            "no {line:?}:\n{}",
            out.describe()
        );
    }
    // The segment it switched out is the archive's newest, as `wal list` says.
    let segment = out
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("ok: WAL switched: segment "))
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_else(|| panic!("no switched segment named:\n{}", out.describe()))
        .to_string();
    let listing = archive
        .admin(&["wal", "list", "--cluster", CLUSTER, "--json"])
        .stdout;
    let listing: Value = serde_json::from_str(&listing).unwrap();
    assert_eq!(
        listing["timelines"][0]["last"],
        segment.as_str(),
        "{listing:#}"
    );

    // archive_command that is not pushclient, archive_timeout 0: named, exit 1, and no WAL
    // switched.
    primary.set_conf("archive_command", "cp %p /nonexistent/%f");
    primary.set_conf("archive_timeout", "0");
    primary.psql("SELECT pg_reload_conf()");
    std::thread::sleep(Duration::from_millis(500));
    let before = primary.psql("SELECT pg_current_wal_lsn()");
    let out = pushclient_check(&archive, &push, &primary);
    assert_eq!(out.code(), Some(1), "{}", out.describe());
    assert!(
        out.stdout
            .contains("FAILED: archive_command = 'cp %p /nonexistent/%f' does not run pushclient"),
        "{}",
        out.describe()
    );
    assert!(
        out.stdout.contains("WARNING: archive_timeout = 0"),
        "{}",
        out.describe()
    );
    assert!(
        out.stdout.contains("not switching WAL"),
        "{}",
        out.describe()
    );
    let after = primary.psql("SELECT pg_current_wal_lsn()");
    assert_eq!(
        before, after,
        "pushclient check switched WAL despite a failed setting"
    );
    primary.stop();
}

fn pullclient_check(archive: &Archive, pull: &std::path::Path, pg: &PgCluster) -> Output {
    client_check(&archive.bins().pullclient(), &[], pull, pg)
}

#[test]
fn pullclient_check_passes_on_an_archive_fed_standby_and_names_a_wrong_restore_command() {
    use crate::pg_archive::{load_primary, make_archive_standby, wait_replayed};
    let archive = Archive::start(CLUSTER);
    let push = archive.issue(CLUSTER, "push");
    let pull = archive.issue(CLUSTER, "pull");
    let primary = archiving_primary(&archive, &push, &[]);
    let mut standby = PgCluster::from_basebackup(&primary, "standby", &["-X", "none"]);
    let (expected, last) = load_primary(&primary, &archive);
    make_archive_standby(&standby, &archive, &pull, None);
    standby.start();
    wait_replayed(&standby, &archive, &expected);

    let out = pullclient_check(&archive, &pull, &standby);
    assert!(out.success(), "{}\n{}", out.describe(), standby.diag());
    for line in [
        "(cluster main, role pull)",
        &format!("ok: the newest segment {last} came back verified"),
        "ok: restore_command = '",
        "is in recovery",
        "the one cluster main is bound to",
        ".walvault-spool is usable (this user's, mode 0700)",
    ] {
        assert!(
            out.stdout.contains(line),
            "no {line:?}:\n{}",
            out.describe()
        );
    }

    standby.set_conf("restore_command", "cp /nonexistent/%f %p");
    standby.psql("SELECT pg_reload_conf()");
    std::thread::sleep(Duration::from_millis(500));
    let out = pullclient_check(&archive, &pull, &standby);
    assert_eq!(out.code(), Some(1), "{}", out.describe());
    assert!(
        out.stdout
            .contains("FAILED: restore_command = 'cp /nonexistent/%f %p' does not run pullclient"),
        "{}",
        out.describe()
    );
    standby.stop();
}

#[test]
fn a_client_certificate_near_its_end_is_named_by_check_and_by_the_metrics() {
    let archive = configured(&[("summary_interval_secs", 1)]);
    // The configs the harness issued are valid until 4096; this one for ten days.
    let out_path = archive.data_dir().join("short-push.toml");
    let out = try_run(
        std::process::Command::new(archive.bins().archived())
            .args(["issue", "--data-dir"])
            .arg(archive.data_dir())
            .args([
                "--cluster",
                CLUSTER,
                "--role",
                "push",
                "--valid-days",
                "10",
                "--out",
            ])
            .arg(&out_path),
    );
    assert!(out.success(), "{}", out.describe());
    let cfg = walvault_protocol::net::config::ClientConfig::load(&out_path).unwrap();
    let issued = walvault_protocol::net::pki::issued_cert(&cfg.client_cert).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!((9 * 86400..=11 * 86400).contains(&(issued.not_after - now)));

    let (code, checks) = check(&archive);
    let certs = named(&checks, "certificates");
    assert_eq!(certs["status"], "WARNING", "{checks:#?}");
    let message = certs["message"].as_str().unwrap();
    assert!(
        message.contains(&format!(
            "client push:{CLUSTER} serial {}",
            issued.identity.serial
        )),
        "{certs:#}"
    );
    assert!(
        certs["hint"].as_str().unwrap().contains("--valid-days"),
        "{certs:#}"
    );
    assert_ne!(code, Some(0));

    let series = format!(
        "walvault_client_certificate_expiry_timestamp_seconds{{cluster=\"{CLUSTER}\",role=\"push\"}}"
    );
    let scrape = wait_for(
        "the client certificate's expiry in /metrics",
        Duration::from_secs(20),
        || {
            let (_, s) = crate::pg_metrics::get(archive.metrics_addr(), "/metrics", &[]);
            (crate::pg_metrics::sample(&s, &series) == Some(issued.not_after as f64)).then_some(s)
        },
        || archive.diag(),
    );
    crate::pg_metrics::promtool_check(&scrape);

    // Retired: its record removed, the check is back to the server's certificates.
    let record = archive.data_dir().join(format!(
        "tls/issued/push-{CLUSTER}-{}.pem",
        issued.identity.serial
    ));
    std::fs::remove_file(&record).unwrap_or_else(|e| panic!("{}: {e}", record.display()));
    let (_, checks) = check(&archive);
    let certs = named(&checks, "certificates");
    assert_eq!(certs["status"], "OK", "{checks:#?}");
}
