//! `archived wal list` and `archived wal history` (admin/audit.rs prints it).

use anyhow::Result;
use clap::Subcommand;
use walvault_protocol::core::wire::WalListing;

use super::ConnectArgs;

#[derive(Subcommand)]
pub(crate) enum WalCommand {
    /// Segments per timeline, history files and gaps of one cluster (asks the running server).
    List {
        #[command(flatten)]
        target: ConnectArgs,
        /// Cluster name.
        #[arg(long)]
        cluster: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// One WAL file's story from the audit trail: received, stored and acknowledged
    /// (with the pushing certificate and its request id, which archive-push logs in
    /// PostgreSQL's log), refused, served or prefetched (to which certificate), verified,
    /// expired by retention (asks the running server).
    History {
        #[command(flatten)]
        target: ConnectArgs,
        /// Cluster name.
        #[arg(long)]
        cluster: String,
        /// The WAL file name (000000010000000000000003, 00000002.history, ...).
        name: String,
        /// Print one JSON object per record (JSON lines) instead of a table.
        #[arg(long)]
        json: bool,
    },
}

pub(crate) async fn run(command: WalCommand) -> Result<()> {
    let (target, cluster, json) = match command {
        WalCommand::List {
            target,
            cluster,
            json,
        } => (target, cluster, json),
        WalCommand::History {
            target,
            cluster,
            name,
            json,
        } => return super::audit::history(&target, &cluster, &name, json).await,
    };
    let listing = super::ask(&target, |archive| async move {
        archive.for_cluster(&cluster).list_wal().await
    })
    .await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&listing)?);
    } else {
        print_listing(&listing);
    }
    Ok(())
}

fn print_listing(l: &WalListing) {
    println!("cluster {}", l.cluster);
    match l.system_identifier {
        Some(id) => println!(
            "  system identifier {id}, segment size {} MiB",
            l.segment_size.unwrap_or(0) >> 20
        ),
        None => println!("  no segment archived yet"),
    }
    if l.timelines.is_empty() {
        println!("  no WAL");
    }
    for t in &l.timelines {
        println!(
            "  timeline {}: {} segments {}..{} ({} MiB raw, {} MiB stored)",
            t.timeline.0,
            t.segments,
            t.first.as_deref().unwrap_or("-"),
            t.last.as_deref().unwrap_or("-"),
            t.raw_bytes >> 20,
            t.stored_bytes >> 20
        );
        for (a, b) in &t.gaps {
            println!("    GAP: {a} .. {b} missing");
        }
        for p in &t.partials {
            println!("    partial: {p}");
        }
    }
    for s in &l.streamed {
        println!(
            "  streamed (unfinished, the receiver's): {} ({} bytes of WAL)",
            s.name, s.bytes
        );
    }
    for h in &l.history_files {
        println!("  history: {h}");
    }
    for b in &l.backup_history_files {
        println!("  backup history: {b}");
    }
}
