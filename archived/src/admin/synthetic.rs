//! `archived synthesize` (hidden; for `benches/ops_bench.sh`): fills the catalog of a
//! stopped archive with a synthetic one of many clusters, each with many segments and
//! backups, as the operations benchmark needs (a real one of 100 clusters x 10 000
//! segments would take hours of pushes). The segments are catalog entries only, except
//! for the first cluster's, whose objects are written to the store (small placeholder
//! bodies: `archived check` lists and stats them, never reads them), so that `archived
//! check` on it does the work of a whole archive. Never run it on a real archive: it
//! binds cluster names `c000`, `c001`, ... to made-up systems.

use std::path::PathBuf;

use anyhow::{ensure, Context, Result};
use bytes::Bytes;
use walvault_protocol::core::pg::wal::{Lsn, SegmentName, TimelineId, WalFileName};
use walvault_protocol::core::wire::backup::BackupRecord;

use crate::datadir::DataDir;
use crate::index::clusters::ClusterBinding;
use crate::index::wal::WalEntry;
use crate::index::Index;
use crate::store::layout;

#[derive(clap::Args)]
pub(crate) struct SynthesizeArgs {
    /// Data directory of a stopped archive (its catalog and store).
    #[arg(long)]
    data_dir: PathBuf,
    /// Clusters to make.
    #[arg(long, default_value_t = 100)]
    clusters: u32,
    /// Segments per cluster.
    #[arg(long, default_value_t = 10_000)]
    segments: u64,
    /// Backups per cluster, spread over its segments, one a day.
    #[arg(long, default_value_t = 50)]
    backups: u64,
}

const SEG: u32 = 16 << 20;

pub(crate) async fn run(args: SynthesizeArgs) -> Result<()> {
    ensure!(
        args.segments >= 2 && args.backups >= 1,
        "--segments 2+ and --backups 1+"
    );
    let dir = DataDir::new(&args.data_dir);
    let cfg = dir.load_config()?;
    let store = dir.open_store(&cfg)?;
    let index = Index::open(&dir.catalog()).context("opening the catalog (stop archived first)")?;
    let now = crate::clock::unix_now();
    let segment = |n: u64| SegmentName::containing(TimelineId(1), Lsn(n * u64::from(SEG)), SEG);
    for c in 0..args.clusters {
        let cluster = format!("c{c:03}");
        let binding = ClusterBinding {
            system_identifier: 7_000_000_000 + u64::from(c),
            wal_segment_size: SEG,
            pg_version: 15,
        };
        index.put_binding(&cluster, &binding).await?;
        for n in 1..=args.segments {
            let name = WalFileName::Segment(segment(n));
            let entry = WalEntry {
                raw_size: u64::from(SEG),
                blake3: "0".repeat(64),
                stored_size: 4 << 20,
            };
            index.put_wal_unflushed(&cluster, &name, &entry)?;
            if c == 0 {
                store
                    .put_new(
                        &layout::wal_key(&cluster, &name),
                        Bytes::from_static(b"synthetic\n"),
                    )
                    .await?;
            }
        }
        let every = (args.segments / args.backups).max(1);
        for b in 0..args.backups {
            let start = 1 + b * every;
            let stop_time = now - ((args.backups - b) as i64) * 86400;
            let record = BackupRecord {
                id: format!("synthetic{b:04}"),
                label: "synthetic".into(),
                timeline: 1,
                stop_timeline: 1,
                start_lsn: Lsn(start * u64::from(SEG) + 40).to_string(),
                stop_lsn: Lsn(start * u64::from(SEG) + 4096).to_string(),
                start_time: stop_time - 600,
                stop_time,
                pg_version: 150_000,
                logical_bytes: 10 << 30,
                stored_bytes: 1 << 30,
                files: 2000,
                chunks: 80_000,
            };
            index.put_backup(&cluster, &record)?;
        }
    }
    index.set_complete(true)?;
    index.flush().await?;
    println!(
        "synthesized {} clusters x {} segments x {} backups (segment objects in the store for c000)",
        args.clusters, args.segments, args.backups
    );
    Ok(())
}
