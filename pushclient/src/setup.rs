//! `pushclient setup`: configures a primary for walvault: `archive_mode = on`,
//! `archive_command` running this pushclient with its config, `archive_timeout` (when
//! it is off), `wal_level` at least `replica`, and with `--slot` what the streaming
//! receiver needs (`max_wal_senders` at least 2, `max_replication_slots` at least 1,
//! the physical slot itself, reserving WAL).
//!
//! Contract (besides protocol's net::pgsetup): a setting is never lowered (a higher
//! `wal_level`, more senders, a shorter or longer non-zero `archive_timeout` stay as
//! they are); `archive_mode = always` stays. A running server (reachable through the
//! libpq environment or `--conninfo`) is changed with `ALTER SYSTEM` and
//! `pg_reload_conf()`, and setup then says which changes wait for a restart (as
//! pg_settings' `pending_restart` says); a stopped one (`--pgdata`) has its
//! `postgresql.auto.conf` edited. A standby is refused: setup configures a primary.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use walvault_protocol::core::pg::conf;
use walvault_protocol::net::pg::conninfo;
use walvault_protocol::net::pg::sql::{self, SqlClient};
use walvault_protocol::net::pgsetup::{self, Current, Manager, Needs, Plan, Source};

/// What `pushclient setup` was asked.
pub(crate) struct SetupArgs {
    pub(crate) pgdata: Option<PathBuf>,
    pub(crate) conninfo: Option<String>,
    pub(crate) apply: bool,
    pub(crate) archive_timeout_secs: u64,
    pub(crate) slot: Option<String>,
    pub(crate) config_path: PathBuf,
}

/// The settings setup reads, with PostgreSQL 15's defaults (for files that set none).
const SETTINGS: [(&str, &str); 6] = [
    ("archive_mode", "off"),
    ("archive_command", ""),
    ("archive_timeout", "0"),
    ("wal_level", "replica"),
    ("max_wal_senders", "10"),
    ("max_replication_slots", "10"),
];

/// Plans, prints and (with `--apply`) makes the changes.
pub(crate) async fn setup(args: &SetupArgs) -> Result<()> {
    if let Some(slot) = &args.slot {
        walvault_protocol::net::pg::stream::validate_slot_name(slot)?;
    }
    let command = pgsetup::own_command(&args.config_path, "archive-push %p")?;
    let want = Wanted {
        archive_command: &command,
        archive_timeout_secs: args.archive_timeout_secs,
        slot: args.slot.as_deref(),
    };
    match &args.pgdata {
        Some(pgdata) if !pgsetup::server_running(pgdata) => offline(pgdata, &want, args.apply),
        _ => online(args, &want).await,
    }
}

/// What the primary should have.
struct Wanted<'a> {
    archive_command: &'a str,
    archive_timeout_secs: u64,
    slot: Option<&'a str>,
}

fn offline(pgdata: &Path, want: &Wanted<'_>, apply: bool) -> Result<()> {
    if !pgdata.join("PG_VERSION").is_file() {
        bail!(
            "{} is not a PostgreSQL data directory (no PG_VERSION)",
            pgdata.display()
        );
    }
    if pgdata.join("standby.signal").exists() {
        bail!(
            "{} has standby.signal: setup configures a primary (run it there; archive_mode = always, set by hand, archives on a standby too)",
            pgdata.display()
        );
    }
    let names: Vec<&str> = SETTINGS.iter().map(|(n, _)| *n).collect();
    let found = conf::read_settings_with_origin(pgdata, &names);
    let current: HashMap<String, Current> = SETTINGS
        .iter()
        .map(|(name, default)| {
            let cur = match found.get(*name) {
                Some((v, origin)) => Current {
                    value: v.clone(),
                    source: Source::from_origin(Some(origin)),
                },
                None => Current {
                    value: default.to_string(),
                    source: Source::Default,
                },
            };
            (name.to_string(), cur)
        })
        .collect();
    let mut plan = plan(pgsetup::offline_target(pgdata), &current, want);
    if want.slot.is_some() {
        plan.notes.push(
            "the slot is created once the server runs: run setup --slot again then, or start `pushclient stream --create-slot`"
                .into(),
        );
    }
    if let Some(m) = Manager::of(pgdata) {
        plan.managed_by(m);
    }
    if apply {
        plan.check_applicable()?;
        plan.apply_offline(pgdata, "walvault: pushclient setup")?;
    }
    print!("{}", plan.render(apply));
    if apply && !plan.changes.is_empty() {
        println!("applied; they take effect when PostgreSQL starts");
    }
    Ok(())
}

async fn online(args: &SetupArgs, want: &Wanted<'_>) -> Result<()> {
    let params = conninfo::resolve(args.conninfo.as_deref(), &|k| std::env::var(k).ok())?;
    let pg = SqlClient::connect(&params).await.context(
        "cannot connect to PostgreSQL (set PGHOST/PGPORT/PGUSER or --conninfo; for a stopped server give --pgdata)",
    )?;
    let at = pg.endpoint().to_string();
    let standby: bool = pg.query_value("SELECT pg_is_in_recovery()", &[]).await?;
    if standby {
        bail!(
            "PostgreSQL at {at} is a standby: setup configures a primary (run it there; archive_mode = always, set by hand, archives on a standby too)"
        );
    }
    const SQL: &str = "SELECT name, current_setting(name), source, sourcefile FROM pg_settings WHERE name = ANY($1)";
    let names: Vec<String> = SETTINGS.iter().map(|(n, _)| n.to_string()).collect();
    let mut current = HashMap::new();
    for row in pg.query(SQL, &[&names]).await? {
        let name: String = sql::column(&row, 0, SQL)?;
        let value: String = sql::column(&row, 1, SQL)?;
        let source: String = sql::column(&row, 2, SQL)?;
        let file: Option<String> = sql::column(&row, 3, SQL)?;
        current.insert(
            name,
            Current {
                value,
                source: Source::from_pg_settings(&source, file.as_deref()),
            },
        );
    }
    let mut plan = plan(
        format!("PostgreSQL at {at} (running: ALTER SYSTEM and a reload)"),
        &current,
        want,
    );
    if let Some(slot) = want.slot {
        const SLOT: &str = "SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1";
        let exists: i64 = pg.query_value(SLOT, &[&slot]).await?;
        let slots_now = current
            .get("max_replication_slots")
            .and_then(|c| c.value.parse::<u64>().ok())
            .unwrap_or(0);
        if exists > 0 {
            plan.unchanged
                .push((format!("slot:{slot}"), "exists".into()));
        } else if slots_now == 0 {
            plan.notes.push(format!(
                "slot {slot} can be created only after the restart that raises max_replication_slots: run setup --slot {slot} again then"
            ));
        } else {
            plan.create(
                format!("slot:{slot}"),
                "created, reserving WAL from now on",
                Needs::Reload,
            );
        }
    }
    // The data directory, to see whether a cluster manager owns the configuration (a
    // role without pg_read_all_settings may not see it: then nothing is known).
    if let Ok(dir) = pg.show("data_directory").await {
        if let Some(m) = Manager::of(Path::new(&dir)) {
            plan.managed_by(m);
        }
    }
    let mut pending = Vec::new();
    if args.apply {
        plan.check_applicable()?;
        pending = plan.apply_online(&pg).await?;
        for c in plan.changes.iter() {
            if let Some(slot) = c.name.strip_prefix("slot:") {
                pg.query(
                    "SELECT pg_create_physical_replication_slot($1, true)",
                    &[&slot],
                )
                .await
                .with_context(|| format!("creating the replication slot {slot}"))?;
            }
        }
    }
    print!("{}", plan.render(args.apply));
    if args.apply && !plan.changes.is_empty() {
        if pending.is_empty() {
            println!("applied and reloaded: in force now");
        } else {
            println!(
                "applied and reloaded; restart PostgreSQL for {} to take effect (pg_settings.pending_restart)",
                pending.join(", ")
            );
        }
    }
    Ok(())
}

/// Seconds of a time setting in seconds as SHOW or a file writes it ("0", "60",
/// "1min"); `None` when it does not parse.
fn seconds(value: &str) -> Option<u64> {
    conf::time_setting(value, std::time::Duration::from_secs(1)).map(|d| d.as_secs())
}

/// The plan for a primary whose settings are `current` (every name of [`SETTINGS`]).
fn plan(target: String, current: &HashMap<String, Current>, want: &Wanted<'_>) -> Plan {
    let mut plan = Plan {
        target,
        ..Default::default()
    };
    let get = |name: &str| current.get(name).cloned().unwrap_or_else(Current::unset);
    let mode = get("archive_mode");
    let keep_mode = matches!(mode.value.as_str(), "on" | "always");
    let mode_want = if keep_mode {
        mode.value.clone()
    } else {
        "on".into()
    };
    plan.want("archive_mode", &mode, &mode_want, Needs::Restart);
    plan.want(
        "archive_command",
        &get("archive_command"),
        want.archive_command,
        Needs::Reload,
    );
    let timeout = get("archive_timeout");
    let timeout_want = match seconds(&timeout.value) {
        Some(s) if s > 0 => timeout.value.clone(),
        _ => format!("{}s", want.archive_timeout_secs),
    };
    if want.archive_timeout_secs > 0 || timeout_want == timeout.value {
        plan.want("archive_timeout", &timeout, &timeout_want, Needs::Reload);
    }
    let level = get("wal_level");
    let level_want = if level.value == "minimal" {
        "replica".to_string()
    } else {
        level.value.clone()
    };
    plan.want("wal_level", &level, &level_want, Needs::Restart);
    if want.slot.is_some() {
        for (name, at_least, raise_to) in [
            ("max_wal_senders", 2, "10"),
            ("max_replication_slots", 1, "10"),
        ] {
            let cur = get(name);
            let value = match cur.value.parse::<u64>() {
                Ok(n) if n >= at_least => cur.value.clone(),
                _ => raise_to.to_string(),
            };
            plan.want(name, &cur, &value, Needs::Restart);
        }
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(pairs: &[(&str, &str)]) -> HashMap<String, Current> {
        SETTINGS
            .iter()
            .map(|(n, d)| {
                let set = pairs.iter().find(|(k, _)| k == n);
                (
                    n.to_string(),
                    Current {
                        value: set.map_or(*d, |(_, v)| *v).to_string(),
                        source: if set.is_some() {
                            Source::File("postgresql.conf".into())
                        } else {
                            Source::Default
                        },
                    },
                )
            })
            .collect()
    }

    fn want(slot: Option<&str>) -> Wanted<'_> {
        Wanted {
            archive_command: "/bin/pushclient --config /c archive-push %p",
            archive_timeout_secs: 60,
            slot,
        }
    }

    fn changed(plan: &Plan) -> Vec<(&str, &str)> {
        plan.changes
            .iter()
            .map(|c| (c.name.as_str(), c.new.as_deref().unwrap_or("-")))
            .collect()
    }

    #[test]
    fn a_fresh_initdb_gets_archiving_and_a_timeout() {
        let plan = plan("t".into(), &settings(&[]), &want(None));
        assert_eq!(
            changed(&plan),
            [
                ("archive_mode", "on"),
                (
                    "archive_command",
                    "/bin/pushclient --config /c archive-push %p"
                ),
                ("archive_timeout", "60s"),
            ]
        );
    }

    #[test]
    fn nothing_is_ever_lowered() {
        let current = settings(&[
            ("archive_mode", "always"),
            ("archive_timeout", "5min"),
            ("wal_level", "logical"),
            ("max_wal_senders", "20"),
            ("max_replication_slots", "4"),
            (
                "archive_command",
                "/bin/pushclient --config /c archive-push %p",
            ),
        ]);
        let plan = plan("t".into(), &current, &want(Some("walvault")));
        assert!(plan.changes.is_empty(), "{:?}", changed(&plan));
        assert_eq!(plan.unchanged.len(), 6);
    }

    #[test]
    fn minimal_wal_and_no_senders_are_raised_for_the_receiver() {
        let current = settings(&[
            ("wal_level", "minimal"),
            ("max_wal_senders", "0"),
            ("max_replication_slots", "0"),
            ("archive_timeout", "1min"),
        ]);
        let plan = plan("t".into(), &current, &want(Some("walvault")));
        let c = changed(&plan);
        assert!(c.contains(&("wal_level", "replica")), "{c:?}");
        assert!(c.contains(&("max_wal_senders", "10")), "{c:?}");
        assert!(c.contains(&("max_replication_slots", "10")), "{c:?}");
        assert!(!c.iter().any(|(n, _)| *n == "archive_timeout"), "{c:?}");
    }

    #[test]
    fn time_settings_read_in_every_unit() {
        assert_eq!(seconds("0"), Some(0));
        assert_eq!(seconds("60"), Some(60));
        assert_eq!(seconds("1min"), Some(60));
        assert_eq!(seconds("'90s'"), Some(90));
        assert_eq!(seconds("1h"), Some(3600));
        assert_eq!(seconds("soon"), None);
    }
}
