//! `pullclient setup`: makes a data directory (a `pg_basebackup` copy, a stopped
//! standby) recover from the archive: `restore_command` running this pullclient,
//! `recovery_target_timeline = 'latest'`, `recovery_prefetch = off` when the prefaulter
//! warms blocks (the settings `restore` writes too), and the signal file:
//! `standby.signal` with `--standby`, else `recovery.signal` (recover to the end of the
//! archive, then promote).
//!
//! Contract (besides protocol's net::pgsetup): the data directory is edited offline
//! only; a recovery target left in `postgresql.auto.conf` by an earlier restore is
//! commented out (it would stop this recovery early); a data directory with
//! `standby.signal` is never turned into one that promotes (without `--standby` setup
//! refuses it).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use walvault_protocol::core::pg::conf;
use walvault_protocol::net::config::ClientConfig;
use walvault_protocol::net::pgsetup::{self, Change, Current, Manager, Needs, Plan, Source};

use crate::restore::recovery_conf::recovery_settings;

/// What `pullclient setup` was asked.
pub(crate) struct SetupArgs {
    pub(crate) pgdata: PathBuf,
    pub(crate) standby: bool,
    pub(crate) apply: bool,
    pub(crate) config_path: PathBuf,
}

/// Recovery targets an earlier restore may have left (recovery_target_timeline is set).
const TARGETS: [&str; 7] = [
    "recovery_target",
    "recovery_target_name",
    "recovery_target_time",
    "recovery_target_xid",
    "recovery_target_lsn",
    "recovery_target_inclusive",
    "recovery_target_action",
];

/// Plans, prints and (with `--apply`) makes the changes.
pub(crate) fn setup(cfg: &ClientConfig, args: &SetupArgs) -> Result<()> {
    let pgdata = &args.pgdata;
    if !pgdata.join("PG_VERSION").is_file() {
        bail!(
            "{} is not a PostgreSQL data directory (no PG_VERSION)",
            pgdata.display()
        );
    }
    let standby_signal = pgdata.join("standby.signal").exists();
    if standby_signal && !args.standby {
        bail!(
            "{} has standby.signal: it is a standby, and setup without --standby would make it promote at the end of the archive; \
             run with --standby to keep it a standby (or remove standby.signal yourself if promotion is what you want)",
            pgdata.display()
        );
    }
    let wanted = recovery_settings(cfg, &args.config_path)?;
    let mut names: Vec<&str> = wanted.iter().map(|(n, _)| *n).collect();
    names.extend(TARGETS);
    let found = conf::read_settings_with_origin(pgdata, &names);
    let plan = plan(pgdata, &wanted, &found, args.standby, Manager::of(pgdata));
    if args.apply {
        plan.check_applicable()?;
    }
    if args.apply && !plan.changes.is_empty() {
        pgsetup::refuse_running(
            pgdata,
            "stop it, run setup again, then start it (restore_command alone could be changed with ALTER SYSTEM and a reload)",
        )?;
        plan.apply_offline(pgdata, "walvault: pullclient setup")?;
        for c in &plan.changes {
            if let Some(file) = c.name.strip_prefix("file:") {
                pgsetup::write_like(&pgdata.join(file), pgdata, b"")?;
            }
        }
    }
    print!("{}", plan.render(args.apply));
    if args.apply && !plan.changes.is_empty() {
        println!(
            "applied; start PostgreSQL on {} to {}",
            pgdata.display(),
            if args.standby {
                "run it as a standby fed by the archive"
            } else {
                "recover to the end of the archive and promote"
            }
        );
    }
    Ok(())
}

/// The plan for `pgdata`, from what its files set (pure but for nothing: unit-tested).
fn plan(
    pgdata: &Path,
    wanted: &[(&str, String)],
    found: &HashMap<String, (String, conf::Origin)>,
    standby: bool,
    manager: Option<Manager>,
) -> Plan {
    let mut plan = Plan {
        target: pgsetup::offline_target(pgdata),
        ..Default::default()
    };
    let current = |name: &str| match found.get(name) {
        Some((v, origin)) => Current {
            value: v.clone(),
            source: Source::from_origin(Some(origin)),
        },
        None => Current::unset(),
    };
    for (name, value) in wanted {
        let needs = match *name {
            // postmaster context: read at the start of recovery.
            "recovery_target_timeline" => Needs::Restart,
            _ => Needs::Reload,
        };
        let cur = current(name);
        // Not set at all is PostgreSQL's default, 'latest' (12 and later).
        if *name == "recovery_target_timeline" && cur.source == Source::Default {
            plan.unchanged
                .push((name.to_string(), "latest (default)".into()));
            continue;
        }
        plan.want(name, &cur, value, needs);
    }
    for name in TARGETS {
        let cur = current(name);
        match &cur.source {
            Source::Default => {}
            Source::AutoConf => plan.changes.push(Change {
                name: name.into(),
                current: cur,
                new: None,
                needs: Needs::Restart,
            }),
            other => plan.notes.push(format!(
                "{name} = {} in {} would stop recovery there: remove it unless that is what you want",
                conf::quote(&cur.value),
                other.describe()
            )),
        }
    }
    let signal = if standby {
        "standby.signal"
    } else {
        "recovery.signal"
    };
    if pgdata.join(signal).exists() {
        plan.unchanged
            .push((format!("file:{signal}"), "present".into()));
    } else {
        plan.create(format!("file:{signal}"), "created", Needs::Start);
    }
    if let Some(m) = manager {
        plan.managed_by(m);
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wanted() -> Vec<(&'static str, String)> {
        vec![
            (
                "restore_command",
                "/bin/pullclient --config /c archive-get %f %p".into(),
            ),
            ("recovery_target_timeline", "latest".into()),
        ]
    }

    #[test]
    fn a_fresh_copy_gets_every_setting_and_the_signal() {
        let dir = tempfile::tempdir().unwrap();
        let plan = plan(dir.path(), &wanted(), &HashMap::new(), true, None);
        let names: Vec<&str> = plan.changes.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["restore_command", "file:standby.signal"]);
        assert!(plan.blocked.is_empty());
    }

    #[test]
    fn a_stale_target_in_auto_conf_is_commented_out_and_one_elsewhere_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let auto = dir.path().join("postgresql.auto.conf");
        let found: HashMap<String, (String, conf::Origin)> = [
            (
                "recovery_target_time".to_string(),
                ("2026-01-01".to_string(), conf::Origin::File(auto)),
            ),
            (
                "recovery_target_name".to_string(),
                (
                    "x".to_string(),
                    conf::Origin::File(dir.path().join("postgresql.conf")),
                ),
            ),
        ]
        .into();
        let plan = plan(dir.path(), &wanted(), &found, false, None);
        let removed: Vec<&str> = plan
            .changes
            .iter()
            .filter(|c| c.new.is_none())
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(removed, ["recovery_target_time"]);
        assert!(plan
            .notes
            .iter()
            .any(|n| n.contains("recovery_target_name")));
        assert!(plan
            .changes
            .iter()
            .any(|c| c.name == "file:recovery.signal"));
    }
}
