//! `pushclient check`: the round trip a DBA runs once after setting up a primary (as
//! pgBackRest's `check` does).
//!
//! 1. archived answers and accepts the certificate (cluster, role);
//! 2. PostgreSQL (libpq environment or `--conninfo`) has `wal_level` at least
//!    `replica`, `archive_mode` on (`always` on a standby), an `archive_command` that runs
//!    `pushclient archive-push %p`, an `archive_timeout` (a warning without one), and the
//!    system identifier the archive's cluster is bound to;
//! 3. on a primary with nothing failed above: a restore point is written
//!    (`pg_create_restore_point`: on an idle server `pg_switch_wal()` alone switches
//!    nothing), WAL is switched, and the segment switched out must come back from the
//!    archive, whole and verified, within `--timeout` seconds.
//!
//! Each step prints one `ok:`, `WARNING:` or `FAILED:` line naming the setting and what to
//! put there. Exit 0 when nothing failed (warnings allowed), 1 otherwise.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use walvault_protocol::core::wire::audit::FetchPurpose;
use walvault_protocol::net::checklist::Checklist;
use walvault_protocol::net::client::ArchiveClient;
use walvault_protocol::net::config::ClientConfig;
use walvault_protocol::net::pg::conninfo;
use walvault_protocol::net::pg::sql::{self, SqlClient};

/// What `pushclient check` is asked to do.
pub(crate) struct CheckArgs {
    pub(crate) conninfo: Option<String>,
    pub(crate) archive_only: bool,
    pub(crate) timeout: Duration,
    /// The config file, named in the archive_command it suggests.
    pub(crate) config_path: std::path::PathBuf,
}

pub(crate) async fn check(cfg: &ClientConfig, args: &CheckArgs) -> Result<bool> {
    let (mut out, pong) = Checklist::start(cfg).await?;
    let result = check_with(&pong.cluster, args, &mut out).await;
    out.finish(result).await
}

async fn check_with(cluster: &str, args: &CheckArgs, out: &mut Checklist) -> Result<()> {
    let archive = out.archive().clone();
    if args.archive_only {
        return Ok(());
    }
    let params = conninfo::resolve(args.conninfo.as_deref(), &|k| std::env::var(k).ok())?;
    let pg = SqlClient::connect(&params)
        .await
        .context("cannot connect to PostgreSQL (set PGHOST/PGPORT/PGUSER or --conninfo; --archive-only checks the archive alone)")?;
    let at = pg.endpoint().to_string();
    const IDENTITY: &str =
        "SELECT system_identifier::text, pg_is_in_recovery() FROM pg_control_system()";
    let row = pg.query_one(IDENTITY, &[]).await?;
    let system: String = sql::column(&row, 0, IDENTITY)?;
    let standby: bool = sql::column(&row, 1, IDENTITY)?;

    let wal_level = pg.show("wal_level").await?;
    match wal_level.as_str() {
        "replica" | "logical" => out.ok(&format!("wal_level = {wal_level}")),
        other => out.fail(&format!(
            "wal_level = {other}: archived WAL cannot restore a backup; set wal_level = replica (restart needed; `pushclient setup` does it)"
        )),
    }
    let mode = pg.show("archive_mode").await?;
    match (mode.as_str(), standby) {
        ("always", _) | ("on", false) => out.ok(&format!("archive_mode = {mode}")),
        ("on", true) => out.warn(&format!(
            "archive_mode = on on a standby ({at}): it archives nothing until promoted (archive_mode = always archives here too)"
        )),
        (other, _) => out.fail(&format!(
            "archive_mode = {other}: set archive_mode = on (restart needed; `pushclient setup` does it)"
        )),
    }
    let command = pg.show("archive_command").await?;
    if command.contains("pushclient") && command.contains("archive-push") && command.contains("%p")
    {
        out.ok(&format!("archive_command = '{command}'"));
    } else {
        out.fail(&format!(
            "archive_command = '{command}' does not run pushclient: set archive_command = 'pushclient --config {} archive-push %p' (reload is enough; `pushclient setup` does it)",
            args.config_path.display()
        ));
    }
    let timeout = pg.show("archive_timeout").await?;
    if timeout == "0" {
        out.warn("archive_timeout = 0: an idle primary never archives its current segment, so the newest WAL is lost with the primary; set archive_timeout = 60 (reload)");
    } else {
        out.ok(&format!("archive_timeout = {timeout}"));
    }
    match archive.binding().await? {
        Some(b) if b.system_identifier.to_string() == system => out.ok(&format!(
            "PostgreSQL at {at} is system {system}, the one cluster {cluster} is bound to"
        )),
        Some(b) => out.fail(&format!(
            "PostgreSQL at {at} is system {system}, but cluster {cluster} is bound to system {}: each PostgreSQL cluster needs its own cluster name (archived issue --cluster NAME)",
            b.system_identifier
        )),
        None => out.ok(&format!(
            "nothing is archived under cluster {cluster} yet: the first segment binds it to system {system}"
        )),
    }
    if standby {
        out.warn("a standby: no WAL is switched from here; run pushclient check on the primary for the round trip");
        return Ok(());
    }
    if out.failed() > 0 {
        println!("not switching WAL to test archiving: fix the settings above first");
        return Ok(());
    }
    round_trip(&pg, &archive, args.timeout, out).await
}

/// Writes a restore point, switches WAL, and waits for the segment to come back.
async fn round_trip(
    pg: &SqlClient,
    archive: &ArchiveClient,
    timeout: Duration,
    out: &mut Checklist,
) -> Result<()> {
    pg.query_value::<String>("SELECT pg_create_restore_point('pushclient check')::text", &[])
        .await
        .context("pg_create_restore_point() failed (the role needs superuser or EXECUTE on pg_create_restore_point and pg_switch_wal)")?;
    let segment: String = pg
        .query_value("SELECT pg_walfile_name(pg_switch_wal())", &[])
        .await
        .context("pg_switch_wal() failed (the role needs superuser or EXECUTE on it)")?;
    let started = Instant::now();
    loop {
        match archive
            .get_wal_for(&segment, FetchPurpose::Check, None, |_| Ok(()))
            .await
        {
            Ok(_) => {
                out.ok(&format!(
                    "WAL switched: segment {segment} archived and read back verified after {:.1} s",
                    started.elapsed().as_secs_f64()
                ));
                return Ok(());
            }
            Err(e) if e.is_not_found() && started.elapsed() < timeout => {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) if e.is_not_found() => {
                const ARCHIVER: &str = "SELECT coalesce(last_archived_wal, '-') || ' ' || failed_count || ' ' || coalesce(last_failed_wal, '-') FROM pg_stat_archiver";
                let archiver: String = pg.query_value(ARCHIVER, &[]).await.unwrap_or_default();
                out.fail(&format!(
                    "segment {segment} is not in the archive {} s after the switch (pg_stat_archiver: last archived, failures, last failed = {archiver}): see the PostgreSQL log for archive_command's error",
                    timeout.as_secs()
                ));
                return Ok(());
            }
            Err(e) => return Err(e).context(format!("reading {segment} back from the archive")),
        }
    }
}
