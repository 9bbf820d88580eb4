//! A backup is checked against PostgreSQL's own `backup_manifest` while it is taken:
//! damage between PostgreSQL and pushclient fails the backup, naming the file, and
//! nothing is committed.

use walvault_tests::*;

use crate::pg_backup::{archiving_primary, backup_id, backups_json, try_backup, CLUSTER};

/// Stored in many rows of one table, so the proxy finds it inside that relation's data.
const MARKER: &str = "walvault-flip-me-0123456789abcdef";

/// One bit flipped inside a relation file's data in the COPY stream (a TCP proxy between
/// pushclient and PostgreSQL): the backup fails naming that file, and only the clean
/// backup taken through the same kind of proxy is listed.
#[test]
fn a_bit_flipped_in_the_copy_stream_fails_the_backup_naming_the_file() {
    let archive = Archive::start(CLUSTER);
    let push = archive.issue(CLUSTER, "push");
    let pg = archiving_primary(&archive, &push, &[]);
    pg.psql(&format!(
        "CREATE TABLE flipme (t text); \
         INSERT INTO flipme SELECT '{MARKER}' || i FROM generate_series(1, 5000) i"
    ));
    let relfile = pg.psql("SELECT pg_relation_filepath('flipme')");

    let backup_through = |proxy: &PgProxy| {
        let port = proxy.port().to_string();
        try_backup(
            &archive,
            &push,
            &pg,
            &["--fast"],
            &[("PGHOST", "127.0.0.1"), ("PGPORT", &port)],
        )
    };
    let clean = PgProxy::start(pg.sock_dir(), PG_PORT, None);
    let out = backup_through(&clean);
    assert!(
        out.success(),
        "backup through a proxy that changes nothing\n{}\n{}\n{}",
        out.describe(),
        pg.diag(),
        archive.diag()
    );
    assert!(
        clean.relayed_from_server() > 1 << 20,
        "the backup did not go through the proxy"
    );
    let good = backup_id(&out);

    let flipping = PgProxy::start(pg.sock_dir(), PG_PORT, Some(MARKER.as_bytes()));
    let out = backup_through(&flipping);
    assert!(
        flipping.flipped(),
        "the proxy never saw the marker\n{}",
        out.describe()
    );
    assert_eq!(out.code(), Some(1), "{}", out.describe());
    assert!(
        out.stderr.contains(&format!("file {relfile}")) && out.stderr.contains("CRC32C"),
        "the error should name {relfile} and its CRC32C\n{}",
        out.describe()
    );
    let listed: Vec<String> = backups_json(&archive)
        .iter()
        .filter_map(|b| b["id"].as_str().map(String::from))
        .collect();
    assert_eq!(
        listed,
        vec![good],
        "the damaged backup must not be committed"
    );
}

/// PostgreSQL's WARNINGs during BASE_BACKUP reach pushclient's log: with data checksums
/// on, a page damaged on disk is named by PostgreSQL's WARNING (its ERROR alone says
/// only that verification failed), and the backup fails with nothing committed.
#[test]
fn postgres_warnings_during_base_backup_are_logged() {
    let archive = Archive::start(CLUSTER);
    let push = archive.issue(CLUSTER, "push");
    let mut pg = PgCluster::initdb("checksums", &["--data-checksums"]);
    pg.append_conf(&["wal_level = replica", "archive_mode = on"]);
    pg.set_conf("archive_command", &archive.archive_command(&push));
    pg.start();
    pg.psql("CREATE TABLE damaged AS SELECT i FROM generate_series(1, 1000) i");
    let relfile = pg.psql("SELECT pg_relation_filepath('damaged')");
    pg.stop();
    // A byte in the middle of block 0, past the page header: its checksum no longer
    // matches. Written in place, so the file keeps its owner.
    let path = pg.data_dir().join(&relfile);
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    use std::io::{Read, Seek, SeekFrom, Write};
    let mut byte = [0u8; 1];
    f.seek(SeekFrom::Start(4000)).unwrap();
    f.read_exact(&mut byte).unwrap();
    byte[0] ^= 0xff;
    f.seek(SeekFrom::Start(4000)).unwrap();
    f.write_all(&byte).unwrap();
    drop(f);
    pg.start();

    let out = try_backup(&archive, &push, &pg, &["--fast"], &[]);
    assert_eq!(out.code(), Some(1), "{}", out.describe());
    assert!(
        out.stderr.contains("WARNING") && out.stderr.contains("checksum verification failed"),
        "PostgreSQL's WARNING naming the damaged block should be logged\n{}\n{}",
        out.describe(),
        pg.diag()
    );
    assert!(backups_json(&archive).is_empty());
}
