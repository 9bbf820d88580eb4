//! The `restore` and `clone` command lines.

use std::path::PathBuf;

use anyhow::{anyhow, bail, Result};
use walvault_protocol::net::cli::CommonArgs;

use super::target::{parse_tablespace_mapping, parse_target_time, RecoveryTarget};
use super::{restore, Mode, RestoreArgs};

/// `pullclient restore`.
#[derive(clap::Args)]
pub(crate) struct RestoreCommand {
    /// Data directory to restore into (created; must be empty unless --delta).
    #[arg(long)]
    pgdata: PathBuf,
    /// Backup id, or "latest" (default: the newest usable backup that ended before the target).
    #[arg(long)]
    backup: Option<String>,
    /// Recover to this time, with a UTC offset: '2026-11-22 04:45:37+00'.
    #[arg(long, group = "target")]
    target_time: Option<String>,
    /// Recover to this LSN, e.g. 0/5000028.
    #[arg(long, group = "target")]
    target_lsn: Option<String>,
    /// Recover to the commit of this transaction id.
    #[arg(long, group = "target")]
    target_xid: Option<String>,
    /// Recover to this restore point (pg_create_restore_point).
    #[arg(long, group = "target")]
    target_name: Option<String>,
    /// Stop as soon as the backup is consistent.
    #[arg(long, group = "target")]
    target_immediate: bool,
    /// What PostgreSQL does at the target: promote, pause (PostgreSQL's default) or shutdown.
    #[arg(long, value_parser = ["promote", "pause", "shutdown"])]
    target_action: Option<String>,
    /// Rewrite only what differs from the backup in an existing data directory.
    #[arg(long)]
    delta: bool,
    /// Put tablespace OID in DIR instead of its original location (repeatable).
    #[arg(long = "tablespace-map", value_parser = parse_tablespace_mapping)]
    tablespace_map: Vec<(u32, PathBuf)>,
}

/// `pullclient clone`.
#[derive(clap::Args)]
pub(crate) struct CloneCommand {
    /// Data directory of the new standby (created; must be empty unless --delta).
    #[arg(long)]
    pgdata: PathBuf,
    /// primary_conninfo for streaming from the primary as well as from the archive.
    #[arg(long)]
    primary_conninfo: Option<String>,
    /// Rewrite only what differs in an existing data directory.
    #[arg(long)]
    delta: bool,
    /// Put tablespace OID in DIR instead of its original location (repeatable).
    #[arg(long = "tablespace-map", value_parser = parse_tablespace_mapping)]
    tablespace_map: Vec<(u32, PathBuf)>,
}

fn target_of(c: &RestoreCommand) -> Result<RecoveryTarget> {
    Ok(if let Some(t) = &c.target_time {
        RecoveryTarget::Time(t.clone(), parse_target_time(t)?)
    } else if let Some(l) = &c.target_lsn {
        RecoveryTarget::Lsn(
            l.parse().map_err(|_| {
                anyhow!("--target-lsn '{l}' is not an LSN (write it like 0/5000028)")
            })?,
        )
    } else if let Some(x) = &c.target_xid {
        if x.trim().parse::<u64>().is_err() {
            bail!("--target-xid '{x}' is not a transaction id");
        }
        RecoveryTarget::Xid(x.trim().to_string())
    } else if let Some(n) = &c.target_name {
        RecoveryTarget::Name(n.clone())
    } else if c.target_immediate {
        RecoveryTarget::Immediate
    } else {
        RecoveryTarget::End
    })
}

/// Which of the two commands.
pub(crate) enum Invocation {
    /// `restore`.
    Restore(RestoreCommand),
    /// `clone`.
    Clone(CloneCommand),
}

/// Runs `restore` or `clone` with the config `common` names (an unusable one is exit 2:
/// `walvault_protocol::net::cli`).
pub(crate) fn command(
    invocation: Invocation,
    common: &CommonArgs,
    runtime: &tokio::runtime::Runtime,
) -> Result<()> {
    let (config_path, cfg) = common.load_config("pullclient")?;
    let args = match invocation {
        Invocation::Restore(c) => RestoreArgs {
            mode: Mode::Recovery {
                target: target_of(&c)?,
                action: c.target_action.clone(),
            },
            pgdata: c.pgdata,
            backup: c.backup,
            delta: c.delta,
            tablespace_map: c.tablespace_map,
            config_path,
        },
        Invocation::Clone(c) => RestoreArgs {
            mode: Mode::Standby {
                primary_conninfo: c.primary_conninfo,
            },
            pgdata: c.pgdata,
            backup: None,
            delta: c.delta,
            tablespace_map: c.tablespace_map,
            config_path,
        },
    };
    runtime.block_on(restore(&cfg, &args))
}
