//! The WAL decoder against pg_waldump, the oracle, on WAL that PostgreSQL 15 writes under
//! varied load: record by record over the whole sequence (LSN, resource manager, lengths,
//! xid, prev-link, and every block reference with its full-page image header), and
//! `pullclient wal-blocks` against the block references pg_waldump lists.
//!
//! One cluster with 1 MiB segments (many segment boundaries, records crossing them) goes
//! through the scenarios in turn; `wal_keep_size` keeps every segment from the first.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use walvault_protocol::core::pg::wal::Lsn;
use walvault_protocol::core::pg::waldecode::{
    DecodedRecord, EndReason, ForkNumber, ImageCompression, Next, WalDecoder,
};
use walvault_tests::*;

#[test]
fn waldump_decoder_agrees_with_pg_waldump_record_by_record() {
    let mut pg = PgCluster::initdb("waldump", &["--wal-segsize", "1"]);
    pg.append_conf(&[
        "wal_level = replica",
        "wal_keep_size = '1GB'",
        "max_wal_size = '1GB'",
        "checkpoint_timeout = '1h'",
        "autovacuum = off",
        // Hint-bit and free-space-map changes get full-page images (XLOG_FPI_FOR_HINT).
        "wal_log_hints = on",
    ]);
    let tablespace = pg.dir().subdir("tablespace");
    chown_pg(&tablespace);
    pg.start();
    let first_segment = pg.psql("SELECT pg_walfile_name(pg_current_wal_insert_lsn())");

    // A table outside pg_default, and pgbench's tables.
    pg.psql(&format!(
        "CREATE TABLESPACE ts LOCATION '{}'",
        tablespace.display()
    ));
    pg.psql("CREATE TABLE in_ts (id int, v text) TABLESPACE ts");
    pg.psql("INSERT INTO in_ts SELECT g, md5(g::text) FROM generate_series(1, 2000) g");
    pg.pgbench_init(1);
    // Full-page writes after a checkpoint, uncompressed and with each method.
    pg.psql("CHECKPOINT");
    pg.pgbench(&["-t", "100", "-c", "2", "-n"]);
    for method in ["pglz", "lz4", "zstd"] {
        set_and_reload(&pg, "wal_compression", method);
        pg.psql("CHECKPOINT");
        pg.pgbench(&["-t", "100", "-c", "2", "-n"]);
    }
    set_and_reload(&pg, "wal_compression", "off");
    // No full-page writes at all.
    set_and_reload(&pg, "full_page_writes", "off");
    pg.psql("CHECKPOINT");
    pg.pgbench(&["-t", "100", "-c", "2", "-n"]);
    set_and_reload(&pg, "full_page_writes", "on");
    // Images for consistency checking only: the second insert's image is not applied.
    pg.psql(
        "SET wal_consistency_checking = 'heap'; INSERT INTO in_ts VALUES (-1, 'a'); \
         INSERT INTO in_ts VALUES (-2, 'b')",
    );
    // Databases copied block by block (WAL_LOG) and by file (FILE_COPY).
    pg.psql("CREATE DATABASE copied_by_wal");
    pg.psql("CREATE DATABASE copied_by_file STRATEGY FILE_COPY");
    // TRUNCATE, VACUUM (visibility map and free space map), an unlogged table's init fork.
    pg.psql("TRUNCATE pgbench_history");
    pg.psql("VACUUM pgbench_accounts");
    pg.psql("VACUUM in_ts");
    pg.psql("CREATE UNLOGGED TABLE unlogged (id int PRIMARY KEY)");
    // A 2.2 MB record: many pages, and at least one whole segment.
    pg.psql("SELECT pg_logical_emit_message(false, 'walvault', repeat('y', 2200000))");
    // A switch, then a little more WAL.
    pg.psql("INSERT INTO in_ts VALUES (-3, 'before the switch')");
    pg.psql("SELECT pg_switch_wal()");
    pg.psql("INSERT INTO in_ts VALUES (-4, 'after the switch')");
    pg.stop();

    let segments = segments_from(&pg.wal_dir(), &first_segment);
    let last_segment = segments
        .last()
        .unwrap()
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let dump = pg_waldump(&pg.wal_dir(), &first_segment, &last_segment);
    let (records, end) = decode(&segments);

    // Record by record, the whole sequence.
    let ours: Vec<String> = records.iter().flat_map(|r| r.waldump_lines(8192)).collect();
    for (i, (a, b)) in ours.iter().zip(&dump.lines).enumerate() {
        assert_eq!(a, b, "line {} of pg_waldump's output differs", i + 1);
    }
    assert_eq!(
        ours.len(),
        dump.lines.len(),
        "pg_waldump printed {} lines, the decoder {}; pg_waldump's last words: {}",
        dump.lines.len(),
        ours.len(),
        dump.stderr
    );
    // Both stop at the same place: pg_waldump names the LSN where reading failed.
    assert!(
        matches!(end.reason, EndReason::EndOfWal(_)),
        "the decoder did not find the end of WAL: {end}"
    );
    assert!(
        dump.stderr.contains(&end.lsn.to_string()),
        "decoder: {end}; pg_waldump: {}",
        dump.stderr
    );

    eprintln!(
        "{} records, {} block references over {} segments agree with pg_waldump; {end}",
        records.len(),
        dump.blocks.len(),
        segments.len()
    );

    // The scenarios wrote what they were meant to.
    let blocks: Vec<_> = records.iter().flat_map(|r| &r.blocks).collect();
    for fork in [
        ForkNumber::Main,
        ForkNumber::Fsm,
        ForkNumber::Vm,
        ForkNumber::Init,
    ] {
        assert!(blocks.iter().any(|b| b.fork == fork), "no {fork} block");
    }
    for method in [
        ImageCompression::Pglz,
        ImageCompression::Lz4,
        ImageCompression::Zstd,
    ] {
        assert!(
            blocks
                .iter()
                .any(|b| b.image.and_then(|i| i.compression) == Some(method)),
            "no image compressed with {method}"
        );
    }
    assert!(blocks
        .iter()
        .any(|b| b.image.is_some_and(|i| i.compression.is_none())));
    assert!(blocks.iter().any(|b| b.image.is_some_and(|i| !i.apply)));
    assert!(blocks
        .iter()
        .any(|b| b.rel.spc != 1663 && b.rel.spc != 1664));
    assert!(records.iter().any(|r| r.is_switch()));
    let segment_size = 1 << 20;
    assert!(
        records
            .iter()
            .any(|r| r.end_lsn.0 / segment_size > r.lsn.0 / segment_size + 1),
        "no record spans a whole segment"
    );

    // pullclient wal-blocks prints pg_waldump's block references, nothing else, with no
    // configuration anywhere.
    let dir = TestDir::new("waldump-bin");
    let bins = Binaries::copy_to(&dir.join("bin"));
    let out = run(
        "pullclient wal-blocks",
        Command::new(bins.pullclient())
            .arg("wal-blocks")
            .args(&segments)
            .env("WALVAULT_CONFIG", dir.join("no-such-config.toml")),
    );
    let printed: Vec<&str> = out.stdout.lines().collect();
    for (i, (a, b)) in printed.iter().zip(&dump.blocks).enumerate() {
        assert_eq!(a, b, "line {} of wal-blocks differs from pg_waldump", i + 1);
    }
    assert_eq!(printed.len(), dump.blocks.len(), "{}", out.describe());
}

/// `ALTER SYSTEM SET key = value`, reload, and wait until new sessions see it (the
/// postmaster rereads the file asynchronously).
fn set_and_reload(pg: &PgCluster, key: &str, value: &str) {
    pg.psql(&format!("ALTER SYSTEM SET {key} = '{value}'"));
    pg.psql("SELECT pg_reload_conf()");
    wait_until(
        &format!("{key} = {value} after a reload"),
        Duration::from_secs(30),
        || pg.psql(&format!("SHOW {key}")) == value,
        || pg.diag(),
    );
}

/// The segment files of `wal_dir` from `first` on, in order.
fn segments_from(wal_dir: &Path, first: &str) -> Vec<PathBuf> {
    let mut names: Vec<String> = fs::read_dir(wal_dir)
        .unwrap_or_else(|e| panic!("read_dir {}: {e}", wal_dir.display()))
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| is_segment_name(n) && n.as_str() >= first)
        .collect();
    names.sort();
    assert!(names.len() > 10, "too little WAL: {names:?}");
    names.into_iter().map(|n| wal_dir.join(n)).collect()
}

/// What `pg_waldump -b` printed: record lines without their descriptions, block lines,
/// and the block references in `wal-blocks` form.
struct Dump {
    lines: Vec<String>,
    blocks: Vec<String>,
    stderr: String,
}

fn pg_waldump(wal_dir: &Path, first: &str, last: &str) -> Dump {
    let out = try_run(
        pg_command("pg_waldump")
            .arg("-b")
            .arg("-p")
            .arg(wal_dir)
            .args([first, last]),
    );
    // pg_waldump exits 1 at the end of WAL ("error in WAL record at ..."); no output at
    // all would be a failure.
    assert!(out.stdout.starts_with("rmgr: "), "{}", out.describe());
    let mut dump = Dump {
        lines: Vec::new(),
        blocks: Vec::new(),
        stderr: out.stderr.clone(),
    };
    let mut lsn = String::new();
    for line in out.stdout.lines() {
        if let Some(body) = line.strip_prefix("rmgr: ") {
            let record = body.split(", desc: ").next().unwrap_or(body);
            lsn = record
                .split("lsn: ")
                .nth(1)
                .and_then(|s| s.split(',').next())
                .unwrap_or_else(|| panic!("no lsn in {line}"))
                .to_string();
            dump.lines.push(format!("rmgr: {record}"));
        } else if let Some(block) = line.strip_prefix("\tblkref #") {
            dump.lines.push(line.to_string());
            // "0: rel 1663/5/16385 fork main blk 17 (FPW); hole: ..."
            let words: Vec<&str> = block.split_whitespace().collect();
            let fpw = if words.get(7).is_some_and(|w| w.starts_with("(FPW")) {
                "fpw"
            } else {
                "-"
            };
            dump.blocks.push(format!(
                "{lsn} {} {} {} {fpw}",
                words[2], words[4], words[6]
            ));
        } else {
            panic!("unexpected pg_waldump line: {line}");
        }
    }
    dump
}

/// Every segment through one decoder, as the prefetcher feeds them.
fn decode(
    segments: &[PathBuf],
) -> (
    Vec<DecodedRecord>,
    walvault_protocol::core::pg::waldecode::WalEnd,
) {
    let first = fs::read(&segments[0]).unwrap();
    let start = u64::from_le_bytes(first[8..16].try_into().unwrap());
    let mut decoder = WalDecoder::new(Lsn(start)).unwrap();
    let mut records = Vec::new();
    for path in segments {
        decoder.feed(&fs::read(path).unwrap());
        loop {
            match decoder.next_record() {
                Ok(Next::Record(r)) => records.push(r),
                Ok(Next::NeedInput) => break,
                Ok(Next::End(end)) => return (records, end),
                Err(e) => panic!("{} after {} records", e, records.len()),
            }
        }
    }
    decoder.finish();
    loop {
        match decoder.next_record() {
            Ok(Next::Record(r)) => records.push(r),
            Ok(Next::End(end)) => return (records, end),
            other => panic!("{other:?} after finish()"),
        }
    }
}
