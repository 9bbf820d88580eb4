//! `pullclient restore` and `pullclient clone`: a backup from the archive into PGDATA,
//! set up to recover (to a target) or to run as a standby.
//!
//! Contract: on success PGDATA (and every tablespace directory) holds exactly the
//! backup's files, each verified chunk by chunk against the blake3 in the manifest before
//! it is written, durable (one syncfs per filesystem, through a descriptor opened before
//! the writes, so writeback errors are reported); PostgreSQL's `backup_manifest` is beside them (so
//! `pg_verifybackup` can check the result); `postgresql.auto.conf` ends with the recovery
//! settings (`restore_command` running this pullclient with this config, the target, and
//! for archive recovery with the prefaulter on, `recovery_prefetch = off`), and every
//! earlier assignment of those keys and every recovery target it came with from the
//! backup is commented out (a restored-and-promoted primary keeps its old target there); and
//! `recovery.signal` (restore) or `standby.signal` (clone) exists. `pg_ctl start` then
//! replays the archived WAL. On failure the directory is not startable (no signal file
//! and no recovery settings were written): fix the cause and run again with `--delta`.
//!
//! Choosing the backup: `--backup ID` uses that one; otherwise the newest usable backup
//! that ended before the target (`--target-time`: stopped at or before the time;
//! `--target-lsn`: stop LSN at or before it); for xid, name and immediate targets, and
//! without a target, the newest usable backup.
//!
//! `--delta` rewrites only what differs: every existing file is hashed chunk by chunk and
//! only differing chunks are fetched; files the backup does not have are removed.
//!
//! A data directory whose `postmaster.pid` names a live process is refused before the
//! archive is asked anything or a file is touched (with or without `--delta`): the error
//! names the pid.
//!
//! Tablespaces: `pg_tblspc/<OID>` becomes a symlink to the tablespace's original location
//! or to `--tablespace-map OID=DIR`. No tablespace_map file is written, so the restored
//! files are byte for byte what PostgreSQL's backup manifest lists.
//!
//! Parallelism: distinct chunks are asked for in batches (one `GetChunks` request of
//! [`BATCH_BYTES`] of raw chunks, in file order), [`BATCHES_IN_FLIGHT`] at once; each
//! batch is decompressed, verified and written by one blocking task, and each distinct
//! chunk is fetched once and written to every place that holds it. Memory: the
//! compressed bodies of the batches in flight plus one raw chunk per writer. A batch
//! that fails transiently (the archive restarting, a storage hiccup, a deadline: as
//! `ClientError::is_transient` decides) is asked for again under the one retry policy
//! (protocol::retry).

mod cli;
mod delta;
pub(crate) mod recovery_conf;
mod target;
mod write;

pub(crate) use cli::{command, CloneCommand, Invocation, RestoreCommand};
pub(crate) use target::RecoveryTarget;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use walvault_protocol::core::format::manifest::{
    chunk_range, BackupManifest, FileEntry, FileKind, MAX_CHUNK_SIZE, MAX_MANIFEST_SIZE,
};
use walvault_protocol::core::format::names::format_unix_utc;
use walvault_protocol::core::format::object::{ObjectHeader, HEADER_LEN};
use walvault_protocol::core::wire::backup::MAX_CHUNKS_PER_GET;
use walvault_protocol::net::client::ArchiveClient;
use walvault_protocol::net::config::ClientConfig;
use walvault_protocol::net::fanout::Fanout;
use walvault_protocol::net::progress;
use walvault_protocol::net::retry::{retry, RetryPolicy};

use delta::{differing_chunks, refuse_running_server, remove_extra};
use recovery_conf::finish_pgdata;
use target::choose;
use write::{create_dir, dir_is_empty, write_chunks, Layout};

/// Raw bytes of chunks asked for in one `GetChunks` request (32 chunks of 128 KiB).
const BATCH_BYTES: u64 = 4 << 20;
/// Requests in flight at once (hides the round trip and overlaps the archive's reads
/// with our decompression and writes).
const BATCHES_IN_FLIGHT: usize = 4;

/// How the restored cluster should come up.
#[derive(Clone, Debug)]
pub(crate) enum Mode {
    /// Archive recovery (recovery.signal), to a target.
    Recovery {
        target: RecoveryTarget,
        action: Option<String>,
    },
    /// A standby (standby.signal) following the archive and optionally a primary.
    Standby { primary_conninfo: Option<String> },
}

/// What `restore`/`clone` were asked.
pub(crate) struct RestoreArgs {
    pub(crate) pgdata: PathBuf,
    pub(crate) backup: Option<String>,
    pub(crate) mode: Mode,
    pub(crate) delta: bool,
    pub(crate) tablespace_map: Vec<(u32, PathBuf)>,
    pub(crate) config_path: PathBuf,
}

/// The most a `GetChunks` answer for `count` chunks of at most `chunk_size` raw bytes
/// can take: each object's header and its worst-case compressed frame.
fn max_chunks_body(count: usize, chunk_size: u64) -> u64 {
    count as u64
        * (HEADER_LEN as u64 + ObjectHeader::max_compressed_size(chunk_size.min(MAX_CHUNK_SIZE)))
}

pub(crate) async fn restore(cfg: &ClientConfig, args: &RestoreArgs) -> Result<()> {
    let started = Instant::now();
    // Before anything else: never write under a live server (--delta would rewrite its
    // relation files and remove postmaster.pid).
    refuse_running_server(&args.pgdata)?;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        tracing::warn!(
            "running as root: the restored files will belong to root, and PostgreSQL refuses to start \
             from them; run pullclient as the user PostgreSQL runs as (or chown -R the data directory)"
        );
    }
    let conn = ArchiveClient::connect(cfg).await?;
    let backups = conn.list_backups().await?;
    let target = match &args.mode {
        Mode::Recovery { target, .. } => Some(target),
        Mode::Standby { .. } => None,
    };
    let chosen = choose(&backups, args.backup.as_deref(), target, &cfg.cluster)?.clone();
    if let (Some(RecoveryTarget::Time(text, t)), Some(until)) = (target, chosen.restorable_until) {
        if *t > until {
            tracing::warn!(
                "the archive's WAL after backup {} reaches only {} (archive time); recovery to {text} may end early",
                chosen.record.id,
                format_unix_utc(until)
            );
        }
    }
    let raw = conn
        .get_backup(&chosen.record.id, MAX_MANIFEST_SIZE)
        .await?;
    let manifest: BackupManifest = serde_json::from_slice(&raw)
        .with_context(|| format!("manifest of backup {} is unreadable", chosen.record.id))?;
    drop(raw);
    manifest
        .validate()
        .map_err(|e| anyhow!("manifest of backup {} is invalid: {e}", chosen.record.id))?;
    if manifest.id != chosen.record.id {
        bail!(
            "the archive answered with backup {} when asked for {}",
            manifest.id,
            chosen.record.id
        );
    }

    // Destinations.
    let mapping: BTreeMap<u32, PathBuf> = args.tablespace_map.iter().cloned().collect();
    for oid in mapping.keys() {
        if !manifest.tablespaces.iter().any(|t| t.oid == *oid) {
            bail!(
                "--tablespace-map {oid}=...: backup {} has no tablespace {oid} (it has: {})",
                manifest.id,
                manifest
                    .tablespaces
                    .iter()
                    .map(|t| format!("{} at {}", t.oid, t.location))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    }
    let layout = Layout {
        pgdata: std::path::absolute(&args.pgdata)
            .with_context(|| format!("bad --pgdata {}", args.pgdata.display()))?,
        tablespaces: manifest
            .tablespaces
            .iter()
            .map(|t| {
                (
                    t.oid,
                    mapping
                        .get(&t.oid)
                        .cloned()
                        .unwrap_or_else(|| PathBuf::from(&t.location)),
                )
            })
            .collect(),
    };
    let mut roots = vec![layout.pgdata.clone()];
    roots.extend(layout.tablespaces.values().cloned());
    if !args.delta {
        for root in &roots {
            if !dir_is_empty(root)? {
                bail!(
                    "{} is not empty: restore into an empty or new directory, or pass --delta to rewrite only \
                     what differs from the backup (and remove what it does not have)",
                    root.display()
                );
            }
        }
    }
    create_dir(&layout.pgdata, 0o700)?;
    for dir in layout.tablespaces.values() {
        create_dir(dir, 0o700)?;
    }
    // One syncfs per filesystem at the end, through descriptors opened before anything is
    // written, so a writeback error on the way is reported (see fsutil::FsSync).
    let mut filesystems: Vec<(u64, PathBuf, walvault_protocol::net::fsutil::FsSync)> = Vec::new();
    for root in &roots {
        let dev = std::os::unix::fs::MetadataExt::dev(
            &std::fs::metadata(root).with_context(|| format!("cannot stat {}", root.display()))?,
        );
        if !filesystems.iter().any(|(d, _, _)| *d == dev) {
            let fs = walvault_protocol::net::fsutil::FsSync::open(root)
                .with_context(|| format!("cannot open {}", root.display()))?;
            filesystems.push((dev, root.clone(), fs));
        }
    }

    let chunk_size = manifest.chunk_size;
    let mut removed = 0u64;
    if args.delta {
        let mut keep: BTreeSet<PathBuf> = BTreeSet::new();
        for f in &manifest.files {
            keep.insert(layout.path_of(f)?);
        }
        for root in &roots {
            remove_extra(root, Path::new(""), &keep, &mut removed)?;
        }
    }

    // Directories first (parents before children), then symlinks.
    let mut dirs: Vec<&FileEntry> = manifest
        .files
        .iter()
        .filter(|f| f.kind == FileKind::Directory)
        .collect();
    dirs.sort_by(|a, b| a.path.cmp(&b.path));
    for d in dirs {
        create_dir(&layout.path_of(d)?, d.mode)?;
    }
    for l in manifest
        .files
        .iter()
        .filter(|f| f.kind == FileKind::Symlink)
    {
        let path = layout.path_of(l)?;
        let target = match (l.tablespace, l.path.strip_prefix("pg_tblspc/")) {
            (None, Some(oid)) => match oid
                .parse::<u32>()
                .ok()
                .and_then(|o| layout.tablespaces.get(&o))
            {
                Some(dir) => dir.clone(),
                None => PathBuf::from(l.link.as_deref().unwrap_or_default()),
            },
            _ => PathBuf::from(l.link.as_deref().unwrap_or_default()),
        };
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("cannot create {}", parent.display()))?;
        }
        let _ = std::fs::remove_file(&path);
        std::os::unix::fs::symlink(&target, &path).with_context(|| {
            format!(
                "cannot create symlink {} -> {}",
                path.display(),
                target.display()
            )
        })?;
    }

    // Files: what to fetch, where.
    let files: Vec<(PathBuf, FileEntry)> = manifest
        .files
        .iter()
        .filter(|f| f.kind == FileKind::File)
        .map(|f| Ok((layout.path_of(f)?, f.clone())))
        .collect::<Result<_>>()?;
    let mut needed: Vec<Vec<usize>> = Vec::with_capacity(files.len());
    if args.delta {
        let mut hashing = Fanout::new(2);
        for (i, (path, f)) in files.iter().enumerate() {
            let (path, f) = (path.clone(), f.clone());
            hashing
                .spawn(async move {
                    let d = tokio::task::spawn_blocking(move || {
                        differing_chunks(&path, &f, chunk_size)
                    })
                    .await??;
                    Ok((i, d))
                })
                .await?;
        }
        let mut done = hashing.finish().await?;
        done.sort_by_key(|(i, _)| *i);
        needed = done.into_iter().map(|(_, d)| d).collect();
    } else {
        for (_, f) in &files {
            needed.push((0..f.chunks.len()).collect());
        }
    }
    let mut places: HashMap<String, Vec<(usize, u64)>> = HashMap::new();
    let mut fetch_bytes = 0u64;
    for (i, ((path, f), idx)) in files.iter().zip(&needed).enumerate() {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(!args.delta)
            .open(path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        file.set_len(f.size)
            .with_context(|| format!("cannot size {}", path.display()))?;
        file.set_permissions(std::fs::Permissions::from_mode(f.mode))
            .with_context(|| format!("cannot chmod {}", path.display()))?;
        for c in idx {
            let range = chunk_range(f.size, chunk_size, *c as u64);
            fetch_bytes += range.end - range.start;
            places
                .entry(f.chunks[*c].clone())
                .or_default()
                .push((i, range.start));
        }
    }
    let rewritten_files = needed.iter().filter(|n| !n.is_empty()).count();
    let progress = progress::byte_bar("restore", fetch_bytes);
    let paths: Arc<Vec<PathBuf>> = Arc::new(files.iter().map(|(p, _)| p.clone()).collect());
    let locks: Arc<Vec<std::sync::Mutex<()>>> =
        Arc::new(files.iter().map(|_| std::sync::Mutex::new(())).collect());
    let distinct = places.len();
    // In file order, so a batch writes a few files front to back.
    let mut wanted: Vec<(String, Vec<(usize, u64)>)> = places.into_iter().collect();
    wanted.sort_by_key(|(_, at)| at.first().copied());
    let per_batch = ((BATCH_BYTES / chunk_size.max(1)) as usize).clamp(1, MAX_CHUNKS_PER_GET);
    let mut fetches = Fanout::new(BATCHES_IN_FLIGHT);
    let mut rest = wanted.into_iter().peekable();
    while rest.peek().is_some() {
        let batch: Vec<(String, Vec<(usize, u64)>)> = rest.by_ref().take(per_batch).collect();
        let conn = conn.clone();
        let paths = paths.clone();
        let locks = locks.clone();
        let progress = progress.clone();
        fetches
            .spawn(async move {
                let hashes: Vec<String> = batch.iter().map(|(h, _)| h.clone()).collect();
                let max_body = max_chunks_body(hashes.len(), chunk_size);
                let body = retry(&RetryPolicy::default(), || {
                    conn.get_chunks(&hashes, max_body)
                })
                .await?;
                let written = tokio::task::spawn_blocking(move || {
                    write_chunks(&body, &batch, &paths, &locks, chunk_size)
                })
                .await??;
                progress.inc(written);
                Ok(())
            })
            .await?;
    }
    fetches.finish().await?;
    progress.finish_and_clear();

    tracing::debug!(elapsed = ?started.elapsed(), "chunks written");
    // Durability: every file and directory written, one syncfs per filesystem (one call
    // instead of an fsync per file and directory; the same guarantee).
    tokio::task::spawn_blocking(move || -> Result<()> {
        for (_, root, fs) in &filesystems {
            fs.sync().with_context(|| {
                format!(
                    "syncing the filesystem of {} failed (a write did not reach the disk): \
                     the restore is not durable; fix the cause and run again with --delta",
                    root.display()
                )
            })?;
        }
        Ok(())
    })
    .await??;
    tracing::debug!(elapsed = ?started.elapsed(), "files and directories synced");
    finish_pgdata(&layout.pgdata, &manifest, args, cfg)?;
    conn.close().await;
    println!(
        "restored backup {} (stopped {}, LSN {}) into {} in {:.1} s",
        manifest.id,
        format_unix_utc(manifest.stop_time),
        manifest.stop_lsn,
        layout.pgdata.display(),
        started.elapsed().as_secs_f64()
    );
    println!(
        "  files {}, rewritten {rewritten_files}, removed {removed}, chunks fetched {distinct} ({:.1} MiB)",
        files.len(),
        fetch_bytes as f64 / (1 << 20) as f64,
    );
    println!("next: pg_ctl -D {} start", layout.pgdata.display());
    Ok(())
}
