//! The end of a restore: PostgreSQL's `backup_manifest`, `pg_wal`, the recovery settings in
//! `postgresql.auto.conf` (through core::pg::conf's editor) and the signal file.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use anyhow::{Context, Result};
use walvault_protocol::core::format::manifest::BackupManifest;
use walvault_protocol::core::format::names::format_unix_utc;
use walvault_protocol::core::pg::conf;
use walvault_protocol::net::config::ClientConfig;
use walvault_protocol::net::pgsetup;

use super::write::create_dir;
use super::{Mode, RecoveryTarget, RestoreArgs};

/// The settings every recovery through walvault has (restore and `pullclient setup`):
/// `restore_command` running this pullclient with `config`, `recovery_target_timeline =
/// 'latest'`, and `recovery_prefetch = off` when the prefaulter warms blocks ahead.
pub(crate) fn recovery_settings(
    cfg: &ClientConfig,
    config: &Path,
) -> Result<Vec<(&'static str, String)>> {
    let mut set = vec![
        (
            "restore_command",
            pgsetup::own_command(config, "archive-get %f %p")?,
        ),
        ("recovery_target_timeline", "latest".to_string()),
    ];
    if cfg.prefetch.enabled && cfg.prefetch.prefault {
        // Measured (benches/RESULTS.md, replay): with walvault's prefaulter warming
        // blocks ahead, PostgreSQL's own prefetch only adds work during archive
        // recovery (and with full_page_writes on, reads of pages replay overwrites).
        set.push(("recovery_prefetch", "off".into()));
    }
    Ok(set)
}

/// PostgreSQL's backup_manifest, pg_wal, recovery settings and the signal file.
pub(super) fn finish_pgdata(
    pgdata: &Path,
    manifest: &BackupManifest,
    args: &RestoreArgs,
    cfg: &ClientConfig,
) -> Result<()> {
    let write_new = |name: &str, contents: &[u8]| -> Result<()> {
        let path = pgdata.join(name);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .with_context(|| format!("cannot write {}", path.display()))?;
        f.write_all(contents)?;
        f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        f.sync_all()
            .with_context(|| format!("cannot fsync {}", path.display()))
    };
    write_new("backup_manifest", manifest.pg_backup_manifest.as_bytes())?;
    create_dir(&pgdata.join("pg_wal"), 0o700)?;
    create_dir(&pgdata.join("pg_wal/archive_status"), 0o700)?;
    for stale in ["recovery.signal", "standby.signal"] {
        let _ = std::fs::remove_file(pgdata.join(stale));
    }

    let mut set = recovery_settings(cfg, &args.config_path)?;
    let signal = match &args.mode {
        Mode::Recovery { target, action } => {
            match target {
                RecoveryTarget::End => {}
                RecoveryTarget::Time(t, _) => set.push(("recovery_target_time", t.clone())),
                RecoveryTarget::Lsn(l) => set.push(("recovery_target_lsn", l.to_string())),
                RecoveryTarget::Xid(x) => set.push(("recovery_target_xid", x.clone())),
                RecoveryTarget::Name(n) => set.push(("recovery_target_name", n.clone())),
                RecoveryTarget::Immediate => set.push(("recovery_target", "immediate".into())),
            }
            if let Some(a) = action {
                set.push(("recovery_target_action", a.clone()));
            }
            "recovery.signal"
        }
        Mode::Standby { primary_conninfo } => {
            if let Some(c) = primary_conninfo {
                set.push(("primary_conninfo", c.clone()));
            }
            "standby.signal"
        }
    };
    // The backup's own postgresql.auto.conf may hold recovery settings of an earlier
    // restore of this cluster (PostgreSQL keeps them after promotion): every recovery
    // target in it is commented out, whether or not this restore sets one, so a stale
    // target cannot stop this recovery (core::pg::conf).
    let auto = pgdata.join("postgresql.auto.conf");
    let old = match std::fs::read_to_string(&auto) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", auto.display())),
    };
    let note = format!(
        "walvault: restored from backup {} (stopped {}) by pullclient",
        manifest.id,
        format_unix_utc(manifest.stop_time)
    );
    let text = conf::replace_settings(&old, &note, |k| k.starts_with("recovery_target"), &set);
    write_new("postgresql.auto.conf", text.as_bytes())?;
    write_new(signal, b"")?;
    walvault_protocol::net::fsutil::fsync_dir(pgdata)?;
    Ok(())
}
