//! `archived verify`: reads every object of a cluster back from the store and reports
//! each problem with the object's key.
//!
//! Contract:
//!
//! - Works on the store itself (DIR's archived.toml names it), beside a running server or
//!   without one, and only reads: objects are create-only, so none changes while it is
//!   read; one deleted meanwhile (by retention) is counted as skipped, not as a problem.
//! - WAL (`--wal`): every WAL file decompressed and checked against its header (raw size
//!   and blake3); a segment is the cluster's segment size (`cluster.toml`) and its first
//!   page names its own position, its timeline and the cluster's system; per timeline no
//!   segment is missing between its first and last; every timeline after 1 that has WAL
//!   has its history file.
//! - Backups (`--backups`): every manifest read and checked; every pack's index read, and
//!   every chunk in it decompressed and checked against the hash the index names; every
//!   loose chunk against its name; every chunk a manifest names held intact by a pack or
//!   a chunk object.
//! - Neither flag: both. Memory: a piece of one WAL object, one pack (up to the 8 MiB
//!   pushclient sends) or one chunk at a time. `--max-rate MIB` keeps the stored bytes
//!   read under MIB MiB a second on average, so that it can run beside production.
//! - The run (counts and the first problems) is recorded in the running server's
//!   catalog through DIR/admin.toml (`RecordVerify`), for `archived check` (`verify`)
//!   and `/metrics`; `--no-record` skips that.
//! - Exit 0 when it found no problem, 2 when it found any, 1 when it could not run or
//!   could not record a clean run.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::Serialize;
use walvault_protocol::core::format::manifest::MAX_CHUNK_SIZE;
use walvault_protocol::core::format::object::{ObjectDecoder, ObjectHeader, HEADER_LEN};
use walvault_protocol::core::format::pack;
use walvault_protocol::core::pg::wal::{LongPageHeader, TimelineId, WalFileName};
use walvault_protocol::net::cli::Exit;

use crate::datadir::DataDir;
use crate::index::backups::read_manifest;
use crate::index::clusters::ClusterBinding;
use crate::store::{layout, Store};

#[derive(clap::Args)]
pub(crate) struct VerifyArgs {
    /// Data directory (its archived.toml names the store).
    #[arg(long)]
    data_dir: PathBuf,
    /// Cluster name.
    #[arg(long)]
    cluster: String,
    /// Verify WAL (with --backups: both; neither: both).
    #[arg(long)]
    wal: bool,
    /// Verify base backups: manifests, packs and chunks.
    #[arg(long)]
    backups: bool,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// Read at most this many MiB of stored objects a second, on average.
    #[arg(long, value_name = "MIB")]
    max_rate: Option<f64>,
    /// Do not record the run in the running server's catalog (by default it is, through
    /// DIR/admin.toml, for `archived check` and /metrics).
    #[arg(long)]
    no_record: bool,
}

/// One problem, with the key of the object it is in (or of what is missing).
#[derive(Debug, Serialize)]
struct Problem {
    object: String,
    problem: String,
}

#[derive(Debug, Default, Serialize)]
struct Report {
    cluster: String,
    wal_files: u64,
    manifests: u64,
    packs: u64,
    chunks: u64,
    stored_bytes_read: u64,
    /// Objects listed that were gone when read (deleted meanwhile).
    skipped: u64,
    problems: Vec<Problem>,
}

impl Report {
    fn problem(&mut self, object: impl Into<String>, problem: impl Into<String>) {
        self.problems.push(Problem {
            object: object.into(),
            problem: problem.into(),
        });
    }
}

/// Paces reads to `--max-rate`.
struct Pace {
    start: Instant,
    bytes_per_sec: Option<f64>,
}

impl Pace {
    async fn after(&self, total_read: u64) {
        let Some(rate) = self.bytes_per_sec else {
            return;
        };
        let due = Duration::from_secs_f64(total_read as f64 / rate);
        if let Some(wait) = due.checked_sub(self.start.elapsed()) {
            tokio::time::sleep(wait).await;
        }
    }
}

pub(crate) async fn run(args: VerifyArgs) -> Result<Exit> {
    walvault_protocol::core::format::names::validate_cluster_name(&args.cluster)
        .map_err(|e| anyhow::anyhow!(e))?;
    if let Some(r) = args.max_rate {
        anyhow::ensure!(r > 0.0, "--max-rate must be more than 0 MiB/s");
    }
    let dir = DataDir::new(&args.data_dir);
    let cfg = dir.load_config()?;
    let store = dir.open_store(&cfg)?;
    let pace = Pace {
        start: Instant::now(),
        bytes_per_sec: args.max_rate.map(|m| m * 1024.0 * 1024.0),
    };
    let mut report = Report {
        cluster: args.cluster.clone(),
        ..Report::default()
    };
    let both = !args.wal && !args.backups;
    if args.wal || both {
        verify_wal(&store, &args.cluster, &pace, &mut report).await?;
    }
    if args.backups || both {
        verify_backups(&store, &args.cluster, &pace, &mut report).await?;
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "cluster {}: {} WAL files, {} manifests, {} packs, {} chunks verified; {:.1} MiB read; {} skipped (deleted meanwhile)",
            report.cluster,
            report.wal_files,
            report.manifests,
            report.packs,
            report.chunks,
            report.stored_bytes_read as f64 / 1048576.0,
            report.skipped
        );
        for p in &report.problems {
            println!("PROBLEM {}: {}", p.object, p.problem);
        }
        if report.problems.is_empty() {
            println!("no problem found");
        }
    }
    let recorded = match args.no_record {
        true => true,
        false => record(&args, &report, scope(&args)).await,
    };
    Ok(match (report.problems.is_empty(), recorded) {
        (false, _) => Exit::Critical,
        (true, true) => Exit::Success,
        (true, false) => Exit::Failure,
    })
}

/// What the run read, in words.
fn scope(args: &VerifyArgs) -> &'static str {
    match (args.wal, args.backups) {
        (true, false) => "wal",
        (false, true) => "backups",
        _ => "wal and backups",
    }
}

/// Records the run in the running server's catalog; says so on stderr when it cannot.
async fn record(args: &VerifyArgs, report: &Report, scope: &str) -> bool {
    use walvault_protocol::core::wire::admin::{VerifyRun, VERIFY_PROBLEMS_KEPT};
    let run = VerifyRun {
        finished_at: crate::clock::unix_now(),
        scope: scope.to_string(),
        wal_files: report.wal_files,
        manifests: report.manifests,
        packs: report.packs,
        chunks: report.chunks,
        problems: report.problems.len() as u64,
        first_problems: report
            .problems
            .iter()
            .take(VERIFY_PROBLEMS_KEPT)
            .map(|p| format!("{}: {}", p.object, p.problem))
            .collect(),
    };
    let target = super::ConnectArgs {
        data_dir: Some(args.data_dir.clone()),
        config: None,
    };
    let cluster = args.cluster.clone();
    match super::ask(&target, |archive| async move {
        archive.for_cluster(&cluster).record_verify(&run).await
    })
    .await
    {
        Ok(()) => true,
        Err(e) => {
            eprintln!(
                "WARNING: this run is not recorded in archived's catalog, so archived check and /metrics do not see it: {e:#} \
                 (start archived, or pass --no-record)"
            );
            false
        }
    }
}

async fn binding(store: &Store, cluster: &str) -> Result<Option<ClusterBinding>> {
    let key = layout::cluster_key(cluster);
    let Some(text) = store.get_small(&key).await? else {
        return Ok(None);
    };
    let b = toml::from_str(&String::from_utf8_lossy(&text))
        .with_context(|| format!("{key} is unreadable"))?;
    Ok(Some(b))
}

async fn verify_wal(store: &Store, cluster: &str, pace: &Pace, report: &mut Report) -> Result<()> {
    let bound = binding(store, cluster).await?;
    let mut keys = store.list(&format!("{cluster}/wal/")).await?;
    keys.extend(store.list(&format!("{cluster}/history/")).await?);
    // Segment numbers present per timeline, and the timelines with a history file.
    let mut segments: BTreeMap<TimelineId, BTreeSet<u64>> = BTreeMap::new();
    let mut histories: HashSet<TimelineId> = HashSet::new();
    for key in keys {
        let Some((_, name)) = layout::parse_wal_key(&key) else {
            report.problem(&key, "not the key of a WAL file (a stray object)");
            continue;
        };
        let mut first: Vec<u8> = Vec::new();
        let verified = store
            .verify_streamed(&key, "WAL file", u64::MAX, |_, b| {
                if first.len() < 64 {
                    first.extend_from_slice(&b[..b.len().min(64 - first.len())]);
                }
            })
            .await;
        match verified {
            Ok(None) => report.skipped += 1,
            Err(e) => report.problem(&key, format!("{e:#}")),
            Ok(Some(header)) => {
                report.wal_files += 1;
                report.stored_bytes_read += HEADER_LEN as u64 + header.compressed_size;
                match name {
                    WalFileName::History(tli) => {
                        histories.insert(tli);
                    }
                    WalFileName::Segment(s) => {
                        if let Some(b) = &bound {
                            if let Err(p) = check_segment(&s, &header, &first, b) {
                                report.problem(&key, p);
                            }
                            segments
                                .entry(s.timeline)
                                .or_default()
                                .insert(s.segno(b.wal_segment_size));
                        }
                    }
                    _ => {}
                }
            }
        }
        pace.after(report.stored_bytes_read).await;
    }
    if bound.is_none() && report.wal_files > 0 {
        report.problem(
            layout::cluster_key(cluster),
            "missing: the cluster's binding (system identifier, segment size) is not in the store",
        );
    }
    let seg_size = bound.map_or(16 << 20, |b| b.wal_segment_size);
    for (tli, segnos) in &segments {
        let (Some(&first), Some(&last)) = (segnos.first(), segnos.last()) else {
            continue;
        };
        let missing: Vec<u64> = (first..=last).filter(|n| !segnos.contains(n)).collect();
        if let Some(&m) = missing.first() {
            let name = walvault_protocol::core::pg::wal::SegmentName::containing(
                *tli,
                walvault_protocol::core::pg::wal::Lsn(m * u64::from(seg_size)),
                seg_size,
            );
            report.problem(
                layout::wal_key(cluster, &WalFileName::Segment(name)),
                format!(
                    "missing: {} segment(s) of timeline {} between its first and last, this the first",
                    missing.len(),
                    tli.0
                ),
            );
        }
        if tli.0 > 1 && !histories.contains(tli) {
            report.problem(
                layout::wal_key(cluster, &WalFileName::History(*tli)),
                format!("missing: timeline {} has WAL but no history file", tli.0),
            );
        }
    }
    Ok(())
}

/// A verified segment is what its name says: size, first page.
fn check_segment(
    s: &walvault_protocol::core::pg::wal::SegmentName,
    header: &ObjectHeader,
    first: &[u8],
    b: &ClusterBinding,
) -> Result<(), String> {
    if header.raw_size != u64::from(b.wal_segment_size) {
        return Err(format!(
            "a segment of {} bytes; the cluster's segments are {}",
            header.raw_size, b.wal_segment_size
        ));
    }
    let page = LongPageHeader::parse(first).map_err(|e| format!("first page: {e}"))?;
    let start = s.start_lsn(b.wal_segment_size);
    if page.page_address != start || page.timeline.0 < 1 {
        return Err(format!(
            "its first page is of {} where the name says {start}",
            page.page_address
        ));
    }
    if page.system_identifier != b.system_identifier {
        return Err(format!(
            "its first page is of system {}, the cluster's is {}",
            page.system_identifier, b.system_identifier
        ));
    }
    Ok(())
}

async fn verify_backups(
    store: &Store,
    cluster: &str,
    pace: &Pace,
    report: &mut Report,
) -> Result<()> {
    // Chunks held intact, by hash.
    let mut intact: HashSet<[u8; 32]> = HashSet::new();
    let mut decoder = ObjectDecoder::new()?;
    for key in store.list(&layout::packs_prefix(cluster)).await? {
        if layout::parse_pack_key(&key).is_none() {
            report.problem(&key, "not the key of a pack (a stray object)");
            continue;
        }
        let Some(bytes) = store.get_small(&key).await? else {
            report.skipped += 1;
            continue;
        };
        report.packs += 1;
        report.stored_bytes_read += bytes.len() as u64;
        match verify_pack(&bytes, &mut decoder) {
            Ok(hashes) => {
                report.chunks += hashes.len() as u64;
                intact.extend(hashes);
            }
            Err(p) => report.problem(&key, p),
        }
        pace.after(report.stored_bytes_read).await;
    }
    for key in store.list(&format!("{cluster}/chunks/")).await? {
        let Some((_, hash)) = layout::parse_chunk_key(&key) else {
            report.problem(&key, "not the key of a chunk (a stray object)");
            continue;
        };
        match store.read_verified(&key, "chunk", MAX_CHUNK_SIZE).await {
            Ok(None) => report.skipped += 1,
            Err(e) => report.problem(&key, format!("{e:#}")),
            Ok(Some((_, header))) => {
                report.stored_bytes_read += HEADER_LEN as u64 + header.compressed_size;
                if header.blake3_hex() != hash {
                    report.problem(&key, format!("holds chunk {}", header.blake3_hex()));
                } else {
                    report.chunks += 1;
                    intact.insert(header.blake3);
                }
            }
        }
        pace.after(report.stored_bytes_read).await;
    }
    for key in store.list(&format!("{cluster}/backups/")).await? {
        let Some((_, id)) = layout::parse_manifest_key(&key) else {
            continue;
        };
        let manifest = match read_manifest(store, cluster, &id).await {
            Ok(Some((m, stored))) => {
                report.stored_bytes_read += stored;
                m
            }
            Ok(None) => {
                report.skipped += 1;
                continue;
            }
            Err(e) => {
                report.problem(&key, format!("{e:#}"));
                continue;
            }
        };
        report.manifests += 1;
        let mut lacking = 0u64;
        let mut first_lacking = None;
        for chunk in manifest.files.iter().flat_map(|f| &f.chunks) {
            let held = hex::decode(chunk)
                .ok()
                .and_then(|h| <[u8; 32]>::try_from(h).ok())
                .is_some_and(|h| intact.contains(&h));
            if !held {
                lacking += 1;
                first_lacking.get_or_insert_with(|| chunk.clone());
            }
        }
        if let Some(c) = first_lacking {
            report.problem(
                &key,
                format!(
                    "backup {id} needs {lacking} chunk(s) that no pack or chunk object holds intact, the first {c}: it cannot be restored"
                ),
            );
        }
        pace.after(report.stored_bytes_read).await;
    }
    Ok(())
}

/// The hashes of a pack's chunks, each decompressed and checked against its index entry.
fn verify_pack(bytes: &[u8], decoder: &mut ObjectDecoder) -> Result<Vec<[u8; 32]>, String> {
    let count = pack::decode_count(bytes).map_err(|e| format!("pack header: {e}"))?;
    let index_end = pack::index_len(count) as usize;
    let index = bytes
        .get(..index_end)
        .ok_or("the pack is shorter than its index")?;
    let entries =
        pack::decode_index(index, bytes.len() as u64).map_err(|e| format!("pack index: {e}"))?;
    let mut hashes = Vec::with_capacity(entries.len());
    for e in &entries {
        let object = usize::try_from(e.offset)
            .ok()
            .zip(usize::try_from(e.offset + e.length).ok())
            .and_then(|(a, b)| bytes.get(a..b))
            .ok_or_else(|| format!("chunk {} lies outside the pack", hex::encode(e.blake3)))?;
        let header = ObjectHeader::decode(&object[..HEADER_LEN.min(object.len())])
            .map_err(|err| format!("chunk {}: {err}", hex::encode(e.blake3)))?;
        decoder
            .decode(
                &header,
                &object[HEADER_LEN.min(object.len())..],
                &e.blake3,
                MAX_CHUNK_SIZE,
            )
            .map_err(|err| format!("chunk {}: {err}", hex::encode(e.blake3)))?;
        hashes.push(e.blake3);
    }
    Ok(hashes)
}
