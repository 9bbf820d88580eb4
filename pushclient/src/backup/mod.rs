//! `pushclient backup`: a base backup over the replication protocol into the archive.
//!
//! Contract: when `backup` returns Ok, the backup's manifest is durably in the archive
//! (so every chunk it names is too) and the WAL from its start to its stop LSN is
//! archived: the backup is listed as usable and restores. A run that fails or is killed
//! before the manifest is committed leaves no listed backup, only chunks that retention
//! collects after its grace period. If the manifest was committed but the WAL did not
//! arrive within `--wal-timeout`, the backup stays listed as `incomplete-wal` (it becomes
//! usable as soon as the WAL is archived) and the command fails saying so. The wait asks
//! the archive for this backup's state alone (`BackupState`), after pauses growing from
//! 50 ms to 1 s, never for the whole listing.
//!
//! Flow: IDENTIFY_SYSTEM, then BASE_BACKUP (PostgreSQL's manifest, no WAL, fast or spread
//! checkpoint). The tar stream of each tablespace is parsed as it arrives and cut into
//! chunks ([`collector`]); only the chunks the archive lacks are sent ([`uploader`]). Every
//! file's size and CRC32C, computed on the way in, are checked against PostgreSQL's own
//! `backup_manifest` (and that manifest against its checksum) before anything is
//! committed: damage between PostgreSQL and pushclient fails the backup, naming the file.
//! The manifest is written last, and its commit is the backup's. Its start and stop times
//! are on the clock of the server backed up, read over the replication connection right
//! after BASE_BACKUP ends (`net::pg::replication`), not on this client's clock.
//!
//! Connections: one replication connection to the server backed up (`--conninfo`:
//! IDENTIFY_SYSTEM, SHOW, BASE_BACKUP, the clock), and for a standby with
//! `--primary-conninfo` one SQL session to its primary (`net::pg::sql`).
//!
//! From a standby (PostgreSQL 15 runs BASE_BACKUP there too): the backup ends at the
//! standby's minimum recovery point, and PostgreSQL does not switch WAL at its end as it
//! does on a primary, so the segment holding the stop LSN is archived (by the primary)
//! only once the primary completes it. With `--primary-conninfo`, pushclient checks that
//! the primary is the same system and runs `pg_switch_wal()` there, as pgBackRest does
//! for its standby backups; without it, it says so and waits like any backup (the
//! primary's `archive_timeout` bounds the wait). The archive_mode check is skipped on a
//! standby: the primary's archiving is what matters, and the wait checks that.
//!
//! Memory: bounded by the uploader's batches and packs in flight (see [`uploader`]),
//! whatever the database size. The manifest itself grows with the database: 64 bytes per
//! 128 KiB chunk (about 0.5 MiB per GiB).

mod collector;
mod uploader;

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use walvault_protocol::core::format::manifest::{
    BackupManifest, BackupStats, FileKind, TablespaceEntry, BACKUP_CHUNK_SIZE, MANIFEST_FORMAT,
};
use walvault_protocol::core::format::names::{backup_id_at, format_unix_utc};
use walvault_protocol::core::pg::basebackup::{BaseBackupOptions, CopyMessage};
use walvault_protocol::core::pg::wal::{Lsn, SegmentName, TimelineId};
use walvault_protocol::core::wire::backup::BackupState;
use walvault_protocol::net::client::ArchiveClient;
use walvault_protocol::net::config::ClientConfig;
use walvault_protocol::net::pg::basebackup::BaseBackup;
use walvault_protocol::net::pg::sql::{self, SqlClient};
use walvault_protocol::net::pg::{conninfo, PgConnection};
use walvault_protocol::net::progress;

use collector::Collector;

/// What `pushclient backup` was asked.
pub(crate) struct BackupArgs {
    pub(crate) label: Option<String>,
    pub(crate) fast: bool,
    pub(crate) conninfo: Option<String>,
    pub(crate) primary_conninfo: Option<String>,
    pub(crate) wal_timeout: Duration,
    pub(crate) max_rate_kb: Option<u32>,
}

fn unix_now_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

pub(crate) async fn backup(cfg: &ClientConfig, args: &BackupArgs) -> Result<()> {
    let started = Instant::now();
    let start_millis = unix_now_millis();
    let id = backup_id_at(start_millis);
    let label = args
        .label
        .clone()
        .unwrap_or_else(|| format!("walvault {id}"));

    let params = conninfo::resolve(args.conninfo.as_deref(), &|k| std::env::var(k).ok())?;
    let mut pg = PgConnection::connect(&params)
        .await
        .context("cannot open a replication connection to PostgreSQL (set PGHOST/PGPORT/PGUSER or --conninfo; the role needs REPLICATION and a `replication` line in pg_hba.conf)")?;
    let pg_version = pg.server_version_num().await?;
    if pg_version < 150_000 {
        bail!(
            "PostgreSQL at {} reports version {pg_version}; pushclient backup needs PostgreSQL 15 or later",
            pg.endpoint
        );
    }
    let system = pg.identify_system().await?;
    // Reported at connection by PostgreSQL 14+ (and a standby only accepts connections
    // with hot_standby on).
    let from_standby = pg.parameters.get("in_hot_standby").map(String::as_str) == Some("on");
    if from_standby {
        tracing::info!(
            "PostgreSQL at {} is a standby: backing up from it; its primary archives the WAL",
            pg.endpoint
        );
    } else if args.primary_conninfo.is_some() {
        bail!(
            "--primary-conninfo is for backups of a standby, and PostgreSQL at {} is not in recovery",
            pg.endpoint
        );
    }
    // SHOW is a command of the replication grammar: no SQL session is needed for it.
    let archive_mode = pg.show("archive_mode").await?;
    if archive_mode == "off" && !from_standby {
        bail!(
            "archive_mode is off on PostgreSQL at {}: the backup's WAL would never reach the archive and \
             the backup could not be restored. Set archive_mode = on and archive_command = \
             'pushclient archive-push %p' (needs a restart), then back up again.",
            pg.endpoint
        );
    }

    let archive = ArchiveClient::connect(cfg).await?;
    check_cluster(&archive, system.system_identifier).await?;
    // The lease keeps the chunks this backup stores or reuses from chunk collection
    // until its manifest is committed (archived/src/gc.rs): every backup request names it.
    let archive = archive.with_lease(Some(archive.begin_backup().await?));

    let options = BaseBackupOptions {
        label: label.clone(),
        fast_checkpoint: args.fast,
        progress: true,
        max_rate_kb: args.max_rate_kb,
    };
    let mut stream = BaseBackup::start(&mut pg, &options)
        .await
        .context("BASE_BACKUP failed to start")?;
    tracing::info!(backup = %id, start_lsn = %stream.start_lsn, timeline = stream.start_timeline, "backup started");
    let total: u64 = stream.tablespaces.iter().filter_map(|t| t.size).sum();
    let tablespaces: Vec<TablespaceEntry> = stream
        .tablespaces
        .iter()
        .filter_map(|t| {
            Some(TablespaceEntry {
                oid: t.oid?,
                location: t.location.clone()?,
            })
        })
        .collect();
    let progress = progress::byte_bar("backup", total);

    let mut collector = Collector::new(archive.clone(), cfg.zstd_level, tablespaces);
    let mut pg_manifest: Vec<u8> = Vec::new();
    let mut in_manifest = false;
    while let Some(message) = stream.next().await? {
        match message {
            CopyMessage::NewArchive { name, location } => {
                collector.end_archive()?;
                let tablespace = if location.is_empty() {
                    None
                } else {
                    let oid = name
                        .strip_suffix(".tar")
                        .and_then(|o| o.parse::<u32>().ok())
                        .ok_or_else(|| {
                            anyhow!("unexpected archive name {name:?} for tablespace {location}")
                        })?;
                    Some((oid, location))
                };
                collector.begin_archive(tablespace);
            }
            CopyMessage::Data(bytes) if in_manifest => {
                if pg_manifest.len() + bytes.len()
                    > walvault_protocol::core::format::manifest::MAX_MANIFEST_SIZE as usize
                {
                    bail!(
                        "PostgreSQL's backup manifest exceeds {} bytes",
                        walvault_protocol::core::format::manifest::MAX_MANIFEST_SIZE
                    );
                }
                pg_manifest.extend_from_slice(&bytes);
            }
            CopyMessage::Data(bytes) => {
                collector.feed(&bytes).await?;
                if total == 0 {
                    progress.inc(bytes.len() as u64);
                }
            }
            CopyMessage::Manifest => {
                collector.end_archive()?;
                in_manifest = true;
            }
            CopyMessage::Progress(done) => progress.set_position(done),
        }
    }
    collector.end_archive()?;
    let end = stream
        .finish()
        .await
        .context("BASE_BACKUP failed at its end")?;
    // The backup's times are on the clock of the server backed up (a standby's own),
    // the clock recovery targets are compared with, never on this client's, which may
    // be skewed. stop_time is read right after BASE_BACKUP ended, over the same
    // replication connection (a brief START_REPLICATION whose keepalive carries the
    // server's clock), so it needs no SQL session and no privilege beyond REPLICATION.
    // The backup history file's STOP TIME is not an option: BASE_BACKUP without WAL does
    // not send it, a standby writes none, and it is printed in the server's log_timezone.
    let server_stop = pg
        .server_clock()
        .await
        .context("reading the server's clock at the end of the backup")?;
    let since_start = started.elapsed();
    pg.close().await;
    let checked = collector
        .verify(&pg_manifest)
        .context("the backup was damaged on its way from PostgreSQL; nothing was committed")?;
    tracing::info!(
        files = checked,
        "every file matches PostgreSQL's backup_manifest (size and CRC32C)"
    );
    let (files, tablespaces, backup_label, mut stats) = collector.finish().await?;
    progress.finish_and_clear();
    // Rounded up: the backup is consistent before this instant, so a recovery target at
    // or after stop_time is never before the backup's end. start_time is when this
    // command started, on the same clock (the stop reading less the time elapsed here).
    let stop_time = server_stop.unix_seconds_ceil();
    let start_time =
        (server_stop.unix_micros() - since_start.as_micros() as i64).div_euclid(1_000_000);

    let manifest = BackupManifest {
        format: MANIFEST_FORMAT,
        id: id.clone(),
        cluster: cfg.cluster.clone(),
        label,
        system_identifier: system.system_identifier,
        pg_version,
        timeline: start_timeline_of(&backup_label).unwrap_or(system.timeline),
        stop_timeline: end.stop_timeline,
        start_lsn: start_lsn_of(&backup_label).unwrap_or_default(),
        stop_lsn: end.stop_lsn.clone(),
        start_time,
        stop_time,
        chunk_size: BACKUP_CHUNK_SIZE,
        tablespaces,
        files,
        backup_label,
        pg_backup_manifest: String::from_utf8(pg_manifest)
            .map_err(|_| anyhow!("PostgreSQL's backup manifest is not UTF-8"))?,
        stats: BackupStats::default(),
    };
    stats.logical_bytes = manifest.files.iter().map(|f| f.size).sum();
    let manifest = BackupManifest { stats, ..manifest };
    manifest
        .validate()
        .map_err(|e| anyhow!("the backup's manifest is inconsistent: {e}"))?;
    put_manifest(&archive, cfg, &manifest).await?;
    println!(
        "backup {id} committed: {} in {} files; {} new chunks stored ({}) of {}; LSN {} .. {} on timeline {}",
        mib(manifest.stats.logical_bytes),
        manifest.files.iter().filter(|f| f.kind == FileKind::File).count(),
        manifest.stats.new_chunks,
        mib(manifest.stats.new_stored_bytes),
        manifest.stats.chunks,
        manifest.start_lsn,
        manifest.stop_lsn,
        manifest.stop_timeline
    );

    if from_standby {
        let stop: Lsn = manifest
            .stop_lsn
            .parse()
            .map_err(|_| anyhow!("PostgreSQL gave a bad stop LSN {}", manifest.stop_lsn))?;
        // The last byte of the backup's WAL is just before the stop LSN.
        let stop_segment = SegmentName::containing(
            TimelineId(manifest.stop_timeline),
            Lsn(stop.0.saturating_sub(1)),
            segment_size(&archive).await?,
        );
        match &args.primary_conninfo {
            Some(conninfo) => {
                switch_primary_wal(conninfo, system.system_identifier).await?;
                println!(
                    "asked the primary to switch WAL, so {stop_segment} (holding stop LSN {}) is archived",
                    manifest.stop_lsn
                );
            }
            None => println!(
                "backed up a standby: segment {stop_segment} (holding stop LSN {}) is archived when the primary \
                 completes it; waiting up to {} s (pass --primary-conninfo to have pushclient switch WAL on \
                 the primary, or set archive_timeout there)",
                manifest.stop_lsn,
                args.wal_timeout.as_secs()
            ),
        }
    }

    let waited = wait_usable(&archive, &id, args.wal_timeout).await;
    archive.close().await;
    match waited? {
        true => {
            println!(
                "backup {id} is usable (its WAL is archived); took {:.1} s, stopped {}",
                started.elapsed().as_secs_f64(),
                format_unix_utc(stop_time)
            );
            Ok(())
        }
        false => bail!(
            "backup {id} is committed but the WAL from {} to {} was not archived within {} s: it is listed as \
             incomplete-wal and becomes usable once PostgreSQL's archive_command has pushed that WAL. \
             Check pg_stat_archiver on the server and `archived wal list`.{}",
            manifest.start_lsn,
            manifest.stop_lsn,
            args.wal_timeout.as_secs(),
            if from_standby && args.primary_conninfo.is_none() {
                " This backup is of a standby: its last segment is archived only once the primary completes \
                 it (SELECT pg_switch_wal() there, or pass --primary-conninfo next time)."
            } else {
                ""
            }
        ),
    }
}

/// `pg_switch_wal()` on the primary of a backed-up standby, after checking it is the
/// same PostgreSQL system.
async fn switch_primary_wal(conninfo: &str, system_identifier: u64) -> Result<()> {
    let params = conninfo::resolve(Some(conninfo), &|k| std::env::var(k).ok())?;
    let primary = SqlClient::connect(&params)
        .await
        .context("cannot connect to the primary given by --primary-conninfo")?;
    const IDENTITY: &str =
        "SELECT system_identifier::text, pg_is_in_recovery() FROM pg_control_system()";
    let row = primary
        .query_one(IDENTITY, &[])
        .await
        .context("asking the primary for its system identifier")?;
    let system: String = sql::column(&row, 0, IDENTITY)?;
    let in_recovery: bool = sql::column(&row, 1, IDENTITY)?;
    if system != system_identifier.to_string() {
        bail!(
            "--primary-conninfo points at PostgreSQL system {system} ({}), not at the primary of the \
             backed-up standby (system {system_identifier})",
            primary.endpoint()
        );
    }
    if in_recovery {
        bail!(
            "--primary-conninfo points at {}, which is itself a standby: give the primary",
            primary.endpoint()
        );
    }
    let switched: String = primary
        .query_value("SELECT pg_switch_wal()::text", &[])
        .await
        .context("pg_switch_wal() on the primary failed (the role needs superuser or EXECUTE on pg_switch_wal)")?;
    tracing::info!(primary = %primary.endpoint(), switched_at = %switched, "switched WAL on the primary");
    Ok(())
}

/// The start LSN from backup_label's `START WAL LOCATION: 0/2000028 (file ...)`.
fn start_lsn_of(label: &str) -> Option<String> {
    label
        .lines()
        .find_map(|l| l.strip_prefix("START WAL LOCATION: "))
        .and_then(|r| r.split_whitespace().next())
        .map(String::from)
}

/// The start timeline from backup_label's `START TIMELINE: 1`.
fn start_timeline_of(label: &str) -> Option<u32> {
    label
        .lines()
        .find_map(|l| l.strip_prefix("START TIMELINE: "))
        .and_then(|t| t.trim().parse().ok())
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1 << 20) as f64)
}

async fn check_cluster(archive: &ArchiveClient, sysid: u64) -> Result<()> {
    match archive.binding().await?.map(|b| b.system_identifier) {
        Some(bound) if bound != sysid => bail!(
            "this PostgreSQL (system {sysid}) is not the one cluster '{}' is bound to (system {bound}); \
             use the push config of this server's cluster",
            archive.cluster()
        ),
        _ => Ok(()),
    }
}

/// The cluster's segment size, as the archive knows it from its WAL.
async fn segment_size(archive: &ArchiveClient) -> Result<u32> {
    archive
        .binding()
        .await?
        .map(|b| b.segment_size)
        .ok_or_else(|| {
            anyhow!(
                "cluster '{}' has no WAL in the archive yet: is the primary archiving to it?",
                archive.cluster()
            )
        })
}

/// Commits the backup: its manifest, under the lease `archive` names.
async fn put_manifest(
    archive: &ArchiveClient,
    cfg: &ClientConfig,
    m: &BackupManifest,
) -> Result<()> {
    let raw = serde_json::to_vec(m)?;
    let blake3 = blake3::hash(&raw).to_hex().to_string();
    let level = cfg.zstd_level;
    let raw_size = raw.len() as u64;
    let body = tokio::task::spawn_blocking(move || zstd::bulk::compress(&raw, level)).await??;
    archive
        .put_backup(&m.id, raw_size, &blake3, body.into())
        .await?;
    Ok(())
}

/// First pause between two looks at a backup's state in [`wait_usable`].
const WAIT_FIRST_PAUSE: Duration = Duration::from_millis(50);
/// Longest pause between two looks.
// At most 1 s: the WAL of a backup usually arrives within a second of its end (the
// switch after BASE_BACKUP), and each pause past its arrival lengthens the backup; one
// BackupState a second is cheap (one backup's WAL range), unlike the whole listing.
const WAIT_MAX_PAUSE: Duration = Duration::from_secs(1);

/// The pause after `pause`: doubled, at most [`WAIT_MAX_PAUSE`].
fn next_pause(pause: Duration) -> Duration {
    (pause * 2).min(WAIT_MAX_PAUSE)
}

/// Waits until the archive calls backup `id` usable (all its WAL archived), asking for
/// that one backup's state (`BackupState`, not the whole listing) after pauses of
/// 50 ms, doubling up to 1 s; `Ok(false)` once `timeout` has passed.
async fn wait_usable(archive: &ArchiveClient, id: &str, timeout: Duration) -> Result<bool> {
    let deadline = Instant::now() + timeout;
    let mut pause = WAIT_FIRST_PAUSE;
    loop {
        match archive.backup_state(id).await {
            Ok(b) if b.state == BackupState::Usable => return Ok(true),
            Ok(_) => {}
            Err(e) if e.is_not_found() => {
                bail!("backup {id} vanished from the archive (deleted meanwhile?)")
            }
            Err(e) => return Err(e.into()),
        }
        let now = Instant::now();
        if now >= deadline {
            return Ok(false);
        }
        tokio::time::sleep(pause.min(deadline - now)).await;
        pause = next_pause(pause);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_for_a_usable_backup_back_off_from_50_ms_to_1_s() {
        let mut pause = WAIT_FIRST_PAUSE;
        let mut pauses = Vec::new();
        for _ in 0..7 {
            pauses.push(pause.as_millis());
            pause = next_pause(pause);
        }
        assert_eq!(pauses, [50, 100, 200, 400, 800, 1000, 1000]);
    }

    #[test]
    fn backup_label_fields() {
        let label = "START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\nCHECKPOINT LOCATION: 0/2000060\nSTART TIMELINE: 1\n";
        assert_eq!(start_lsn_of(label).as_deref(), Some("0/2000028"));
        assert_eq!(start_timeline_of(label), Some(1));
    }
}
