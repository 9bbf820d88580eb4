//! deploy/: the Prometheus alert rules pass promtool's checks and their own unit tests,
//! and every query of the Grafana dashboard parses as PromQL (Debian's `prometheus`
//! package, which scripts/test installs); pg_metrics checks that archived serves every
//! family both use.

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

/// deploy/grafana/walvault.json in the repository.
pub(crate) fn dashboard() -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("deploy")
        .join("grafana")
        .join("walvault.json");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The family a sample name belongs to (a histogram's `_bucket`, `_sum`, `_count`).
pub(crate) fn family_of(name: &str) -> &str {
    ["_bucket", "_sum", "_count"]
        .iter()
        .find_map(|s| name.strip_suffix(s))
        .unwrap_or(name)
}

#[test]
fn every_dashboard_query_parses_as_promql() {
    let d: serde_json::Value = serde_json::from_str(&dashboard()).expect("the dashboard is JSON");
    let panels = d["panels"].as_array().expect("panels");
    assert!(!panels.is_empty());
    // Every query, Grafana's variables given values, as recording rules: promtool parses
    // each expression (and refuses a bad one by its rule).
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for p in panels {
        let targets = p["targets"]
            .as_array()
            .unwrap_or_else(|| panic!("panel without targets: {p}"));
        assert!(!targets.is_empty(), "{p}");
        assert!(
            p["description"].as_str().is_some_and(|s| !s.is_empty()),
            "panel without a description: {p}"
        );
        for t in targets {
            let expr = t["expr"]
                .as_str()
                .unwrap_or_else(|| panic!("target without expr: {t}"));
            let expr = expr
                .replace("$__rate_interval", "5m")
                .replace("$cluster", "main");
            rules.push_str(&format!(
                "      - record: walvault:dashboard_panel_{}\n        expr: {}\n",
                p["id"],
                serde_json::to_string(&expr).unwrap()
            ));
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("dashboard.rules.yml");
    std::fs::write(&file, &rules).unwrap();
    let out = Command::new("promtool")
        .args(["check", "rules"])
        .arg(&file)
        .output()
        .unwrap_or_else(|e| panic!("promtool is missing ({e}): apt-get install prometheus"));
    assert!(
        out.status.success(),
        "a dashboard query does not parse:\n{}{}\n{rules}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
