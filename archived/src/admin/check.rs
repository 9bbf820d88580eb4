//! `archived check`: prints the archive's named checks of a cluster (ops/check.rs) as a
//! table, JSON or one Nagios status line, and exits with their worst status.

use anyhow::Result;
use walvault_protocol::core::wire::{CheckResult, CheckStatus};
use walvault_protocol::net::cli::Exit;

use super::ConnectArgs;

#[derive(clap::Args)]
pub(crate) struct CheckArgs {
    #[command(flatten)]
    target: ConnectArgs,
    /// Cluster name.
    #[arg(long)]
    cluster: String,
    /// Print the checks as JSON.
    #[arg(long, conflicts_with = "nagios")]
    json: bool,
    /// Print one Nagios status line with perfdata; exit 0 OK, 1 WARNING, 2 CRITICAL,
    /// 3 UNKNOWN (the server could not be asked).
    #[arg(long)]
    nagios: bool,
}

pub(crate) async fn run(args: CheckArgs) -> Result<Exit> {
    let cluster = args.cluster.clone();
    let asked = super::ask(&args.target, |archive| async move {
        archive.for_cluster(&cluster).check().await
    })
    .await;
    let checks = match asked {
        Ok(c) => c,
        Err(e) if args.nagios => {
            println!("WALVAULT UNKNOWN - cluster {}: {e:#}", args.cluster);
            return Ok(Exit::Unknown);
        }
        Err(e) => return Err(e),
    };
    let worst = checks
        .iter()
        .map(|c| c.status)
        .max()
        .unwrap_or(CheckStatus::Ok);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&checks)?);
    } else if args.nagios {
        println!("{}", nagios_line(&args.cluster, &checks));
    } else {
        print_checks(&args.cluster, &checks);
    }
    Ok(match worst {
        CheckStatus::Ok => Exit::Success,
        CheckStatus::Warning => Exit::Failure,
        CheckStatus::Critical => Exit::Critical,
    })
}

fn print_checks(cluster: &str, checks: &[CheckResult]) {
    println!("cluster {cluster}");
    let rows: Vec<Vec<String>> = checks
        .iter()
        .map(|c| vec![c.status.to_string(), c.name.clone(), c.message.clone()])
        .collect();
    super::print_table(&["STATUS", "CHECK", "FOUND"], &[false, false, false], &rows);
    for c in checks.iter().filter(|c| c.status != CheckStatus::Ok) {
        if let Some(hint) = &c.hint {
            println!("hint ({}): {hint}", c.name);
        }
    }
}

/// `WALVAULT <WORST> - <the checks that are not OK, or all OK> | <perfdata>`.
fn nagios_line(cluster: &str, checks: &[CheckResult]) -> String {
    let worst = checks
        .iter()
        .map(|c| c.status)
        .max()
        .unwrap_or(CheckStatus::Ok);
    let bad: Vec<String> = checks
        .iter()
        .filter(|c| c.status != CheckStatus::Ok)
        .map(|c| format!("{} {}: {}", c.name, c.status, c.message))
        .collect();
    let summary = match bad.is_empty() {
        true => format!("cluster {cluster}: {} checks OK", checks.len()),
        false => format!("cluster {cluster}: {}", bad.join("; ")),
    };
    let perf: Vec<String> = checks
        .iter()
        .filter_map(|c| c.value.as_ref())
        .map(|v| {
            let t = |x: Option<i64>| x.map(|x| x.to_string()).unwrap_or_default();
            format!(
                "{}={}{};{};{}",
                v.label,
                v.value,
                v.unit,
                t(v.warning),
                t(v.critical)
            )
        })
        .collect();
    // '|' separates perfdata in Nagios' plugin output: none may appear before it.
    format!(
        "WALVAULT {worst} - {} | {}",
        summary.replace('|', "/"),
        perf.join(" ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use walvault_protocol::core::wire::CheckValue;

    #[test]
    fn the_nagios_line_names_what_is_wrong_and_carries_perfdata() {
        let checks = vec![
            CheckResult {
                name: "catalog".into(),
                status: CheckStatus::Ok,
                message: "complete".into(),
                hint: None,
                value: None,
            },
            CheckResult {
                name: "wal_age".into(),
                status: CheckStatus::Critical,
                message: "the newest segment was archived 2.0 h ago | x".into(),
                hint: Some("look".into()),
                value: Some(CheckValue {
                    label: "wal_age".into(),
                    value: 7200,
                    unit: "s".into(),
                    warning: Some(900),
                    critical: Some(3600),
                }),
            },
        ];
        assert_eq!(
            nagios_line("main", &checks),
            "WALVAULT CRITICAL - cluster main: wal_age CRITICAL: the newest segment was archived 2.0 h ago / x | wal_age=7200s;900;3600"
        );
    }
}
