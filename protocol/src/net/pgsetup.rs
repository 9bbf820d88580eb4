//! What `pushclient setup` and `pullclient setup` share: a plan of setting changes, how
//! it is printed, and how it is applied.
//!
//! Contract:
//!
//! - **Nothing without `--apply`.** A plan lists each setting with its value in force,
//!   where that value comes from, the new value and what makes it take effect (reload,
//!   restart). A setting already as wanted is not a change; a plan with no changes
//!   applies nothing and touches no file, so running setup twice changes nothing the
//!   second time.
//! - **Never behind the user's back.** A change that `postgresql.auto.conf` (or `ALTER
//!   SYSTEM`, which writes it) cannot make take effect, because the postmaster's command
//!   line sets the setting, or because a cluster manager (Patroni, CloudNativePG) owns the
//!   configuration, is not applied: the plan says where to put the value instead, and
//!   `--apply` refuses the whole plan (a half-configured server is worse than none).
//! - **Offline edits are atomic.** `postgresql.auto.conf` is rewritten through
//!   [`conf::replace_settings`](crate::core::pg::conf::replace_settings) (an earlier
//!   assignment of a key is commented out, never left beside a duplicate) into a
//!   temporary file with the old file's owner and mode, fsynced and renamed over it; a new
//!   file (and a signal file) gets the data directory's owner and mode 0600. A running
//!   server's files are never edited: it is changed with `ALTER SYSTEM` and
//!   `pg_reload_conf()`, or not at all.

use std::fmt::Write as _;
use std::io::Write as _;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};

use crate::core::pg::conf;
use crate::net::fsutil;
use crate::net::pg::sql::{self, SqlClient};

/// What makes a change take effect.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Needs {
    /// `pg_reload_conf()` (setup does it when the server runs).
    Reload,
    /// A restart of PostgreSQL.
    Restart,
    /// The next start of the server (a signal file, a slot).
    Start,
}

impl Needs {
    fn word(self) -> &'static str {
        match self {
            Needs::Reload => "reload",
            Needs::Restart => "restart",
            Needs::Start => "next start",
        }
    }
}

/// Where a value in force comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// Not set anywhere: PostgreSQL's default.
    Default,
    /// A configuration file other than `postgresql.auto.conf`.
    File(String),
    /// `postgresql.auto.conf` (`ALTER SYSTEM`): where setup writes.
    AutoConf,
    /// The postmaster's command line: wins over every file.
    CommandLine,
    /// Something else pg_settings names (environment variable, ...).
    Other(String),
}

impl Source {
    /// From pg_settings' `source` and `sourcefile` (NULL for roles that may not see it).
    pub fn from_pg_settings(source: &str, sourcefile: Option<&str>) -> Source {
        match (source, sourcefile) {
            ("default", _) => Source::Default,
            ("configuration file", Some(f)) if f.ends_with("postgresql.auto.conf") => {
                Source::AutoConf
            }
            ("configuration file", Some(f)) => Source::File(f.to_string()),
            ("configuration file", None) => Source::File("a configuration file".into()),
            ("command line", _) => Source::CommandLine,
            (other, _) => Source::Other(other.to_string()),
        }
    }

    /// From the files an offline data directory has.
    pub fn from_origin(origin: Option<&conf::Origin>) -> Source {
        match origin {
            None => Source::Default,
            Some(conf::Origin::CommandLine) => Source::CommandLine,
            Some(conf::Origin::File(p)) if p.ends_with("postgresql.auto.conf") => Source::AutoConf,
            Some(conf::Origin::File(p)) => Source::File(p.display().to_string()),
        }
    }

    /// Where, in words.
    pub fn describe(&self) -> String {
        match self {
            Source::Default => "default".into(),
            Source::File(f) => f.clone(),
            Source::AutoConf => "postgresql.auto.conf".into(),
            Source::CommandLine => "postmaster command line".into(),
            Source::Other(o) => o.clone(),
        }
    }
}

/// A setting as the server (or its files) has it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Current {
    /// The value in force, as SHOW prints it (or as the file writes it, offline).
    pub value: String,
    /// Where it comes from.
    pub source: Source,
}

impl Current {
    /// Not set anywhere (PostgreSQL's default, or a file or slot that does not exist).
    pub fn unset() -> Current {
        Current {
            value: String::new(),
            source: Source::Default,
        }
    }
}

/// One change of a plan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    /// The setting (or `file:<name>` for a signal file, `slot:<name>` for a slot).
    pub name: String,
    /// What is in force now.
    pub current: Current,
    /// The new value (`None`: remove, i.e. comment out of postgresql.auto.conf).
    pub new: Option<String>,
    /// What makes it take effect.
    pub needs: Needs,
}

/// What setup would do.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Where the plan applies (data directory or server), for the heading.
    pub target: String,
    /// What would change.
    pub changes: Vec<Change>,
    /// Settings already as wanted: name and value.
    pub unchanged: Vec<(String, String)>,
    /// Changes setup must not make itself, each with where to make it instead; any of
    /// them makes `--apply` refuse.
    pub blocked: Vec<String>,
    /// Things the operator should know that change nothing (e.g. a slot to create later).
    pub notes: Vec<String>,
}

impl Plan {
    /// Adds `name` with `want` unless `current` already has it. A setting set on the
    /// postmaster's command line cannot be changed from postgresql.auto.conf: blocked.
    pub fn want(&mut self, name: &str, current: &Current, want: &str, needs: Needs) {
        if current.value == want {
            self.unchanged.push((name.into(), want.into()));
            return;
        }
        if current.source == Source::CommandLine {
            self.blocked.push(format!(
                "{name} = {} is set on the postmaster's command line (pg_ctl -o, or the service's options), which wins over postgresql.auto.conf: set {name} = {} there",
                conf::quote(&current.value),
                conf::quote(want)
            ));
            return;
        }
        self.changes.push(Change {
            name: name.into(),
            current: current.clone(),
            new: Some(want.into()),
            needs,
        });
    }

    /// Adds the creation of something that does not exist yet (`file:<name>`,
    /// `slot:<name>`), described as `what`.
    pub fn create(&mut self, name: String, what: &str, needs: Needs) {
        self.changes.push(Change {
            name,
            current: Current::unset(),
            new: Some(what.into()),
            needs,
        });
    }

    /// Blocks the whole plan when `manager` (a cluster manager) owns the configuration.
    pub fn managed_by(&mut self, manager: Manager) {
        if self.changes.is_empty() {
            return;
        }
        let settings: Vec<String> = self
            .changes
            .iter()
            .filter(|c| !c.name.contains(':'))
            .filter_map(|c| Some(format!("{}: {}", c.name, conf::quote(c.new.as_ref()?))))
            .collect();
        self.blocked.push(format!(
            "this server is managed by {}: it rewrites PostgreSQL's configuration, so setup changes nothing here; {} ({})",
            manager.name(),
            manager.where_to(),
            settings.join(", ")
        ));
    }

    /// Whether `--apply` may go ahead.
    pub fn check_applicable(&self) -> Result<()> {
        if self.blocked.is_empty() {
            return Ok(());
        }
        bail!("not applying anything: {}", self.blocked.join("; "))
    }

    /// The plan as setup prints it.
    pub fn render(&self, applied: bool) -> String {
        let mut out = format!("{}\n", self.target);
        let width = self
            .changes
            .iter()
            .map(|c| c.name.len())
            .chain(self.unchanged.iter().map(|(n, _)| n.len()))
            .max()
            .unwrap_or(0);
        for c in &self.changes {
            let current = match (&c.current.source, c.current.value.as_str()) {
                (Source::Default, "") => "(not set)".to_string(),
                (s, v) => format!("{} ({})", conf::quote(v), s.describe()),
            };
            let new = c
                .new
                .as_deref()
                .map(conf::quote)
                .unwrap_or_else(|| "(removed)".into());
            let _ = writeln!(
                out,
                "  {:<width$}  {current} -> {new}  [{}]",
                c.name,
                c.needs.word()
            );
        }
        for (name, value) in &self.unchanged {
            let _ = writeln!(out, "  {name:<width$}  {} (unchanged)", conf::quote(value));
        }
        for b in &self.blocked {
            let _ = writeln!(out, "BLOCKED: {b}");
        }
        for n in &self.notes {
            let _ = writeln!(out, "note: {n}");
        }
        if self.changes.is_empty() && self.blocked.is_empty() {
            out.push_str("nothing to change\n");
        } else if !applied && self.blocked.is_empty() {
            let _ = writeln!(
                out,
                "{} change(s); run again with --apply to make them",
                self.changes.len()
            );
        }
        out
    }

    /// Settings to write (name, new value) and to comment out.
    fn settings(&self) -> (Vec<(&str, String)>, Vec<&str>) {
        let mut set = Vec::new();
        let mut drop = Vec::new();
        for c in self.changes.iter().filter(|c| !c.name.contains(':')) {
            match &c.new {
                Some(v) => set.push((c.name.as_str(), v.clone())),
                None => drop.push(c.name.as_str()),
            }
        }
        (set, drop)
    }

    /// Writes the plan's settings into `pgdata`'s postgresql.auto.conf (module header).
    /// Signal files and slots are the caller's.
    pub fn apply_offline(&self, pgdata: &Path, note: &str) -> Result<()> {
        let (set, drop) = self.settings();
        if set.is_empty() && drop.is_empty() {
            return Ok(());
        }
        let auto = pgdata.join("postgresql.auto.conf");
        let old = match std::fs::read_to_string(&auto) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", auto.display())),
        };
        let text = conf::replace_settings(&old, note, |k| drop.contains(&k), &set);
        write_like(&auto, pgdata, text.as_bytes())
    }

    /// Makes the plan's settings with `ALTER SYSTEM` and reloads; returns the changed
    /// settings that still wait for a restart (pg_settings.pending_restart).
    pub async fn apply_online(&self, pg: &SqlClient) -> Result<Vec<String>> {
        let (set, drop) = self.settings();
        for (name, value) in &set {
            pg.query(
                &format!("ALTER SYSTEM SET {name} TO {}", sql_literal(value)),
                &[],
            )
            .await
            .with_context(|| format!("ALTER SYSTEM SET {name}"))?;
        }
        for name in &drop {
            pg.query(&format!("ALTER SYSTEM RESET {name}"), &[])
                .await
                .with_context(|| format!("ALTER SYSTEM RESET {name}"))?;
        }
        if set.is_empty() && drop.is_empty() {
            return Ok(Vec::new());
        }
        pg.query("SELECT pg_reload_conf()", &[]).await?;
        // The postmaster rereads the files asynchronously: give it a moment to mark what
        // waits for a restart.
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let names: Vec<String> = set
            .iter()
            .map(|(n, _)| n.to_string())
            .chain(drop.iter().map(|n| n.to_string()))
            .collect();
        const PENDING: &str =
            "SELECT name FROM pg_settings WHERE pending_restart AND name = ANY($1) ORDER BY name";
        let rows = pg.query(PENDING, &[&names]).await?;
        rows.iter()
            .map(|r| sql::column::<String>(r, 0, PENDING).map_err(Into::into))
            .collect()
    }
}

/// A cluster manager that owns PostgreSQL's configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Manager {
    /// Patroni (`patroni.dynamic.json` or `postgresql.base.conf` in the data directory).
    Patroni,
    /// CloudNativePG (`custom.conf` and `override.conf` in the data directory).
    CloudNativePg,
}

impl Manager {
    /// The manager whose files `pgdata` holds, if any.
    pub fn of(pgdata: &Path) -> Option<Manager> {
        if pgdata.join("patroni.dynamic.json").exists()
            || pgdata.join("postgresql.base.conf").exists()
        {
            Some(Manager::Patroni)
        } else if pgdata.join("override.conf").exists() && pgdata.join("custom.conf").exists() {
            Some(Manager::CloudNativePg)
        } else {
            None
        }
    }

    fn name(self) -> &'static str {
        match self {
            Manager::Patroni => "Patroni",
            Manager::CloudNativePg => "CloudNativePG",
        }
    }

    fn where_to(self) -> &'static str {
        match self {
            Manager::Patroni => {
                "put these under postgresql.parameters with `patronictl edit-config` (archive_mode and archive_command may also go in postgresql.parameters of patroni.yml)"
            }
            Manager::CloudNativePg => {
                "put these under spec.postgresql.parameters of the Cluster resource (CloudNativePG manages archive_command and restore_command itself unless a plugin hands them over)"
            }
        }
    }
}

/// What a data directory's `postmaster.pid` says (restore and setup refuse a live one).
#[derive(Debug)]
pub enum Postmaster {
    /// No `postmaster.pid` (or no data directory).
    None,
    /// It names a process that is gone (a crash left it).
    Stale(u32),
    /// It names a live process (or one we may not signal).
    Live(u32),
    /// It cannot be read.
    Unreadable(std::io::Error),
    /// Its first line is no process id.
    Garbled,
}

impl Postmaster {
    /// Reads `pgdata/postmaster.pid`: line 1 is the postmaster's pid (negative for a
    /// single-user backend).
    pub fn of(pgdata: &Path) -> Postmaster {
        let text = match std::fs::read_to_string(pgdata.join("postmaster.pid")) {
            Ok(t) => t,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
                ) =>
            {
                return Postmaster::None
            }
            Err(e) => return Postmaster::Unreadable(e),
        };
        let Some(pid) = text
            .lines()
            .next()
            .and_then(|l| l.trim().parse::<i32>().ok())
            .map(|p| p.unsigned_abs())
            .filter(|p| *p > 0 && *p <= i32::MAX as u32)
        else {
            return Postmaster::Garbled;
        };
        match process_exists(pid as i32) {
            true => Postmaster::Live(pid),
            false => Postmaster::Stale(pid),
        }
    }
}

/// Whether a process with this pid exists (also one we may not signal).
pub fn process_exists(pid: i32) -> bool {
    // SAFETY: kill(2) with signal 0 sends nothing; it only checks that the pid exists.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Whether a postmaster may run on `pgdata`: anything but no file or a stale one.
pub fn server_running(pgdata: &Path) -> bool {
    !matches!(
        Postmaster::of(pgdata),
        Postmaster::None | Postmaster::Stale(_)
    )
}

/// The command line that runs this binary's `subcommand` with `config`, quoted for the
/// shell PostgreSQL runs archive_command and restore_command with (`%p`, `%f` stay
/// unquoted: PostgreSQL substitutes them).
pub fn own_command(config: &Path, subcommand: &str) -> Result<String> {
    let exe = std::env::current_exe().context("cannot find this program's own path")?;
    let config = std::fs::canonicalize(config)
        .with_context(|| format!("cannot resolve the config path {}", config.display()))?;
    Ok(format!(
        "{} --config {} {subcommand}",
        shell_word(&exe.to_string_lossy()),
        shell_word(&config.to_string_lossy())
    ))
}

/// `word` as one shell word: as is when it holds only safe characters, else quoted.
pub fn shell_word(word: &str) -> String {
    let safe = |c: char| c.is_ascii_alphanumeric() || "/._-+,:=@".contains(c);
    if !word.is_empty() && word.chars().all(safe) {
        return word.to_string();
    }
    format!("'{}'", word.replace('\'', r"'\''"))
}

/// `value` as an SQL string literal (standard_conforming_strings: quotes doubled).
fn sql_literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

/// Writes `contents` to `path` atomically: a temporary file beside it with the owner and
/// mode of the file it replaces (or, for a new file, of `pgdata`, and mode 0600),
/// fsynced, renamed over it, the directory fsynced.
pub fn write_like(path: &Path, pgdata: &Path, contents: &[u8]) -> Result<()> {
    let (uid, gid, mode) = match std::fs::metadata(path) {
        Ok(m) => (m.uid(), m.gid(), m.mode() & 0o7777),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let d = std::fs::metadata(pgdata)
                .with_context(|| format!("cannot read {}", pgdata.display()))?;
            (d.uid(), d.gid(), 0o600)
        }
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let tmp: PathBuf = fsutil::temp_path_beside(path);
    let result = (|| -> Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .with_context(|| format!("cannot create {}", tmp.display()))?;
        f.write_all(contents)?;
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        let me = std::fs::metadata(&tmp)?;
        if (me.uid(), me.gid()) != (uid, gid) {
            std::os::unix::fs::fchown(&f, Some(uid), Some(gid)).with_context(|| {
                format!(
                    "cannot give {} to uid {uid}, gid {gid} (the owner of what it replaces): run setup as that user or as root",
                    tmp.display()
                )
            })?;
        }
        f.sync_all()?;
        fsutil::durable_rename(&tmp, path)
            .with_context(|| format!("cannot rename {} over {}", tmp.display(), path.display()))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// The plan's target line for a data directory.
pub fn offline_target(pgdata: &Path) -> String {
    format!(
        "{} (server not running: postgresql.auto.conf is edited)",
        pgdata.display()
    )
}

/// Refuses to edit a running server's files.
pub fn refuse_running(pgdata: &Path, hint: &str) -> Result<()> {
    if server_running(pgdata) {
        return Err(anyhow!(
            "PostgreSQL is running on {} (postmaster.pid): its files are not edited behind its back; {hint}",
            pgdata.display()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cur(value: &str, source: Source) -> Current {
        Current {
            value: value.into(),
            source,
        }
    }

    #[test]
    fn a_setting_as_wanted_is_no_change_and_the_command_line_blocks() {
        let mut plan = Plan::default();
        plan.want(
            "archive_mode",
            &cur("on", Source::AutoConf),
            "on",
            Needs::Restart,
        );
        plan.want(
            "archive_timeout",
            &cur("0", Source::Default),
            "60s",
            Needs::Reload,
        );
        plan.want(
            "wal_level",
            &cur("minimal", Source::CommandLine),
            "replica",
            Needs::Restart,
        );
        assert_eq!(plan.unchanged, vec![("archive_mode".into(), "on".into())]);
        assert_eq!(plan.changes.len(), 1);
        assert_eq!(plan.changes[0].name, "archive_timeout");
        assert_eq!(plan.blocked.len(), 1);
        assert!(
            plan.blocked[0].contains("command line"),
            "{:?}",
            plan.blocked
        );
        let err = plan.check_applicable().unwrap_err();
        assert!(
            format!("{err}").contains("wal_level = 'replica' there"),
            "{err}"
        );
        let text = plan.render(false);
        assert!(
            text.contains("archive_timeout  '0' (default) -> '60s'  [reload]"),
            "{text}"
        );
        assert!(text.contains("BLOCKED"), "{text}");
    }

    #[test]
    fn a_managed_server_blocks_every_change_and_says_where_they_go() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(Manager::of(dir.path()), None);
        std::fs::write(dir.path().join("patroni.dynamic.json"), "{}").unwrap();
        assert_eq!(Manager::of(dir.path()), Some(Manager::Patroni));
        let mut plan = Plan::default();
        plan.want(
            "archive_mode",
            &cur("off", Source::Default),
            "on",
            Needs::Restart,
        );
        plan.managed_by(Manager::Patroni);
        let err = format!("{}", plan.check_applicable().unwrap_err());
        assert!(
            err.contains("Patroni") && err.contains("archive_mode: 'on'"),
            "{err}"
        );
        // Nothing to change: nothing to block.
        let mut done = Plan::default();
        done.want(
            "archive_mode",
            &cur("on", Source::AutoConf),
            "on",
            Needs::Restart,
        );
        done.managed_by(Manager::CloudNativePg);
        assert!(done.check_applicable().is_ok());
    }

    #[test]
    fn offline_edits_keep_owner_and_mode_and_replace_earlier_keys() {
        let dir = tempfile::tempdir().unwrap();
        let auto = dir.path().join("postgresql.auto.conf");
        std::fs::write(
            &auto,
            "# Do not edit this file manually!\narchive_mode = 'off'\n",
        )
        .unwrap();
        std::fs::set_permissions(&auto, std::fs::Permissions::from_mode(0o640)).unwrap();
        let mut plan = Plan::default();
        plan.want(
            "archive_mode",
            &cur("off", Source::AutoConf),
            "on",
            Needs::Restart,
        );
        plan.apply_offline(dir.path(), "walvault: test").unwrap();
        let text = std::fs::read_to_string(&auto).unwrap();
        assert!(
            text.contains("# walvault: test, was: archive_mode = 'off'"),
            "{text}"
        );
        assert!(text.ends_with("archive_mode = 'on'\n"), "{text}");
        assert_eq!(std::fs::metadata(&auto).unwrap().mode() & 0o7777, 0o640);
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(left.len(), 1, "a temporary file was left behind");
        // A new file gets mode 0600.
        let fresh = tempfile::tempdir().unwrap();
        plan.apply_offline(fresh.path(), "walvault: test").unwrap();
        let m = std::fs::metadata(fresh.path().join("postgresql.auto.conf")).unwrap();
        assert_eq!(m.mode() & 0o7777, 0o600);
    }

    #[test]
    fn shell_words_are_quoted_only_when_they_must_be() {
        assert_eq!(shell_word("/usr/bin/pushclient"), "/usr/bin/pushclient");
        assert_eq!(
            shell_word("/etc/wal vault/p.toml"),
            "'/etc/wal vault/p.toml'"
        );
        assert_eq!(shell_word("it's"), r"'it'\''s'");
        assert_eq!(shell_word(""), "''");
    }

    #[test]
    fn a_stale_pid_file_is_not_a_running_server() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!server_running(dir.path()));
        std::fs::write(
            dir.path().join("postmaster.pid"),
            format!("{}\n", std::process::id()),
        )
        .unwrap();
        assert!(server_running(dir.path()));
        // A pid far beyond pid_max.
        std::fs::write(dir.path().join("postmaster.pid"), "99999999\n").unwrap();
        assert!(!server_running(dir.path()));
    }
}
