//! deploy/: the Prometheus alert rules pass promtool's checks and their own unit tests
//! (Debian's `prometheus` package, which scripts/test installs).

use std::path::PathBuf;
use std::process::Command;

/// deploy/prometheus in the repository.
pub(crate) fn prometheus_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("deploy")
        .join("prometheus")
}

/// The `walvault_*` metric names a rules file uses.
pub(crate) fn metric_names(rules: &str) -> Vec<String> {
    let mut names: Vec<String> = rules
        .match_indices("walvault_")
        .map(|(at, _)| {
            rules[at..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                .collect()
        })
        .collect();
    names.sort();
    names.dedup();
    names
}

#[test]
fn alert_rules_pass_promtool_check_and_their_unit_tests() {
    let dir = prometheus_dir();
    for args in [
        ["check", "rules", "walvault.rules.yml"],
        ["test", "rules", "walvault.tests.yml"],
    ] {
        let out = Command::new("promtool")
            .args(args)
            .current_dir(&dir)
            .output()
            .unwrap_or_else(|e| {
                panic!(
                    "promtool is missing ({e}): install Debian's prometheus package (scripts/test does: apt-get install prometheus)"
                )
            });
        assert!(
            out.status.success(),
            "promtool {} failed ({}):\n{}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn the_rules_name_metrics_of_every_family_they_alert_on() {
    let rules = std::fs::read_to_string(prometheus_dir().join("walvault.rules.yml")).unwrap();
    let names = metric_names(&rules);
    // The families the rules are about (what the scrape test checks against a real one).
    for want in [
        "walvault_build_info",
        "walvault_wal_last_archived_timestamp_seconds",
        "walvault_requests_total",
        "walvault_backup_last_end_timestamp_seconds",
        "walvault_backups",
    ] {
        assert!(names.iter().any(|n| n == want), "{want} not in {names:?}");
    }
}
