//! `pullclient check`: the replica side of the round trip, run once after setting up a
//! standby or before a restore.
//!
//! 1. archived answers and accepts the certificate (cluster, role);
//! 2. the archive holds WAL of the cluster, and its newest segment comes back whole and
//!    verified (what `restore_command` will do);
//! 3. with `--pgdata DIR`: the prefetch spool for it is usable (a real directory of this
//!    user, mode 0700, outside PGDATA: archive-get uses nothing else) and whether its
//!    daemon runs;
//! 4. when PostgreSQL answers (libpq environment or `--conninfo`; a stopped one is
//!    skipped with a note): its `restore_command` runs `pullclient archive-get %f %p`,
//!    it is in recovery (a WARNING otherwise: restore_command is only used then), and it
//!    is the system the cluster is bound to.
//!
//! One `ok:`, `WARNING:` or `FAILED:` line per step; exit 0 when nothing FAILED.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use walvault_protocol::core::pg::wal::WalFileName;
use walvault_protocol::core::wire::audit::FetchPurpose;
use walvault_protocol::net::checklist::Checklist;
use walvault_protocol::net::config::ClientConfig;
use walvault_protocol::net::pg::conninfo;
use walvault_protocol::net::pg::sql::{self, SqlClient};

use crate::spool::{ControlRequest, Spool};

/// What `pullclient check` is asked to do.
pub(crate) struct CheckArgs {
    pub(crate) pgdata: Option<PathBuf>,
    pub(crate) conninfo: Option<String>,
    pub(crate) config_path: PathBuf,
}

pub(crate) async fn check(cfg: &ClientConfig, args: &CheckArgs) -> Result<bool> {
    let (mut out, pong) = Checklist::start(cfg).await?;
    let result = check_with(cfg, &pong.cluster, args, &mut out).await;
    out.finish(result).await
}

async fn check_with(
    cfg: &ClientConfig,
    cluster: &str,
    args: &CheckArgs,
    out: &mut Checklist,
) -> Result<()> {
    let archive = out.archive().clone();
    let listing = archive.list_wal().await?;
    // The newest segment of any timeline: the highest position, then the latest timeline.
    let newest = listing
        .timelines
        .iter()
        .filter_map(|t| match t.last.as_deref()?.parse::<WalFileName>() {
            Ok(WalFileName::Segment(s)) => Some(s),
            _ => None,
        })
        .max_by_key(|s| (s.log, s.seg, s.timeline))
        .map(|s| s.to_string());
    let bound = listing.system_identifier;
    match &newest {
        None => out.warn(&format!(
            "cluster {cluster} has no WAL segment in the archive yet: nothing to restore from"
        )),
        Some(name) => {
            let started = Instant::now();
            match archive
                .get_wal_for(name, FetchPurpose::Check, None, |_| Ok(()))
                .await
            {
                Ok(d) => out.ok(&format!(
                    "the newest segment {name} came back verified ({} MiB in {:.0} ms)",
                    d.raw_size >> 20,
                    started.elapsed().as_secs_f64() * 1000.0
                )),
                Err(e) => out.fail(&format!("reading {name} back from the archive: {e:#}")),
            }
        }
    }
    let mut pgdata = args.pgdata.clone();
    // PostgreSQL, if it answers: its own settings, and its data directory.
    let params = conninfo::resolve(args.conninfo.as_deref(), &|k| std::env::var(k).ok())?;
    match SqlClient::connect(&params).await {
        Err(e) => out.warn(&format!(
            "PostgreSQL does not answer ({e}); its restore_command is not checked (start it, or set PGHOST/PGPORT/--conninfo)"
        )),
        Ok(pg) => {
            const IDENTITY: &str =
                "SELECT system_identifier::text, pg_is_in_recovery() FROM pg_control_system()";
            let row = pg.query_one(IDENTITY, &[]).await?;
            let system: String = sql::column(&row, 0, IDENTITY)?;
            let in_recovery: bool = sql::column(&row, 1, IDENTITY)?;
            let at = pg.endpoint().to_string();
            let command = pg.show("restore_command").await?;
            if command.contains("pullclient")
                && command.contains("archive-get")
                && command.contains("%f")
                && command.contains("%p")
            {
                out.ok(&format!("restore_command = '{command}'"));
            } else {
                out.fail(&format!(
                    "restore_command = '{command}' does not run pullclient: set restore_command = 'pullclient --config {} archive-get %f %p' (reload is enough; `pullclient setup` does it on a stopped server)",
                    args.config_path.display()
                ));
            }
            if in_recovery {
                out.ok(&format!("PostgreSQL at {at} is in recovery"));
            } else {
                out.warn(&format!(
                    "PostgreSQL at {at} is not in recovery: restore_command is used only by a standby or a restore"
                ));
            }
            match bound {
                Some(b) if b.to_string() == system => {
                    out.ok(&format!("PostgreSQL is system {system}, the one cluster {cluster} is bound to"))
                }
                Some(b) => out.fail(&format!(
                    "PostgreSQL at {at} is system {system}, but cluster {cluster} holds WAL of system {b}: this config is another cluster's"
                )),
                None => {}
            }
            if pgdata.is_none() {
                pgdata = Some(PathBuf::from(pg.show("data_directory").await?));
            }
        }
    }
    let Some(pgdata) = pgdata else {
        out.warn("no --pgdata and no PostgreSQL to ask: the prefetch spool is not checked");
        return Ok(());
    };
    match Spool::for_pgdata(cfg, &pgdata) {
        Err(e) => out.fail(&format!(
            "no usable prefetch spool for {} ({e:#}): archive-get still works, fetching every segment directly",
            pgdata.display()
        )),
        Ok(spool) => {
            out.ok(&format!(
                "prefetch spool {} is usable (this user's, mode 0700)",
                spool.dir.display()
            ));
            match spool.send(&ControlRequest::Status) {
                Ok(_) => out.ok("its prefetch daemon answers (pullclient prefetch-status shows its counters)"),
                Err(_) => out.ok("no prefetch daemon runs for it now: archive-get starts one at PostgreSQL's next request"),
            }
        }
    }
    Ok(())
}
