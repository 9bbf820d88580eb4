//! Every key of the object store: what is stored under which name.
//!
//! ```text
//! <cluster>/cluster.toml                      binding: system identifier, segment size,
//!                                             PG major (index/clusters.rs)
//! <cluster>/wal/<TLI>/<SEGMENT>.zst           a segment
//! <cluster>/wal/<TLI>/<SEGMENT>.partial.zst   a partial segment (end of a timeline, as
//!                                             archive_command pushes it)
//! <cluster>/stream/<TLI>/<SEGMENT>.<BYTES>.zst the streaming receiver's unfinished
//!                                             segment holding BYTES (8 hex digits) of
//!                                             WAL, zero-padded to the segment size; one
//!                                             object per upload (create-only), older
//!                                             ones deleted after a newer is stored, all
//!                                             once the complete segment is
//!                                             (service/stream.rs)
//! <cluster>/wal/<TLI>/<SEG>.<OFF>.backup.zst  a backup history file
//! <cluster>/history/<TLI>.history.zst         a timeline history file
//! <cluster>/chunks/<h[0..2]>/<blake3>.zst     one backup chunk, named by the blake3 of
//!                                             its raw bytes
//! <cluster>/packs/<id[0..2]>/<id>.pack        many chunks in one object, as pushclient
//!                                             sends them (walvault_protocol's
//!                                             core::format::pack: index, then objects)
//! <cluster>/backups/<ID>/manifest.zst         a backup's manifest; create-only, written
//!                                             after every chunk it names is stored: its
//!                                             existence commits the backup
//! <cluster>/audit/<ID>-<H>.jsonl.zst         a batch of the audit trail: zstd of JSON
//!                                             lines (core::wire::audit), ID its first
//!                                             record's id, H 16 hex digits of the blake3
//!                                             of the bytes; create-only, deleted once
//!                                             every file it names has expired
//!                                             (service/audit.rs)
//! .uploads/<unique>                           remote stores: a streamed upload on its way
//!                                             to its name (store/remote.rs)
//! ```
//!
//! Why no name can collide or escape:
//!
//! - WAL keys hold the WAL file name and nothing else, so a create-only write makes "one
//!   content per name" a property of the store itself. A name's key is derived from the
//!   parsed `WalFileName`, never from client text, so no key can escape its cluster.
//! - Chunk keys are content addresses: a name has one possible content, so a create-only
//!   conflict is a harmless duplicate.
//! - Pack ids are 32 hex digits made from time, process and a counter ([`new_pack_id`]),
//!   and a create-only write refuses the impossible collision anyway.
//! - Cluster names, backup ids and chunk hashes are validated
//!   (`core::format::names`) before a key is made of them; a cluster name cannot start
//!   with '.', so no cluster's keys meet `.uploads/`.
//!
//! Every `parse_*` function accepts exactly the keys its `*_key` function makes (it
//! rebuilds the key and compares), so a catalog rebuild never indexes a stray object
//! under a name that would not lead back to it.
//!
//! Everything except `cluster.toml` and packs is an object in the archive's object format
//! (`core::format::object`: a 64-byte header, then one zstd frame).

use walvault_protocol::core::format::names;
use walvault_protocol::core::pg::wal::{SegmentName, WalFileName};

/// Temporary keys of streamed uploads (a cluster name cannot start with '.').
pub(crate) const UPLOADS_PREFIX: &str = ".uploads/";

/// Key of a cluster's binding file.
pub(crate) fn cluster_key(cluster: &str) -> String {
    format!("{cluster}/cluster.toml")
}

/// Parses a binding key into its cluster.
pub(crate) fn parse_cluster_key(key: &str) -> Option<&str> {
    let cluster = key.strip_suffix("/cluster.toml")?;
    names::validate_cluster_name(cluster).ok()?;
    Some(cluster)
}

/// Key of a WAL file of a cluster.
pub(crate) fn wal_key(cluster: &str, name: &WalFileName) -> String {
    match name {
        WalFileName::History(_) => format!("{cluster}/history/{name}.zst"),
        other => format!("{cluster}/wal/{}/{other}.zst", other.timeline()),
    }
}

/// Parses a key back into cluster and WAL file name (for catalog rebuilds).
pub(crate) fn parse_wal_key(key: &str) -> Option<(String, WalFileName)> {
    let mut parts = key.split('/');
    let cluster = parts.next()?;
    let kind = parts.next()?;
    let rest: Vec<&str> = parts.collect();
    let file = match (kind, rest.as_slice()) {
        ("wal", [_, file]) | ("history", [file]) => *file,
        _ => return None,
    };
    let name: WalFileName = file.strip_suffix(".zst")?.parse().ok()?;
    if wal_key(cluster, &name) != key {
        return None;
    }
    Some((cluster.to_string(), name))
}

/// Prefix of every streamed segment of a cluster.
pub(crate) fn stream_prefix(cluster: &str) -> String {
    format!("{cluster}/stream/")
}

/// Prefix (a directory: store listings match whole path segments) of the uploads of
/// one streamed segment's timeline; [`parse_stream_key`] tells the segment.
pub(crate) fn stream_timeline_prefix(cluster: &str, segment: &SegmentName) -> String {
    format!("{cluster}/stream/{}/", segment.timeline)
}

/// Key of an upload of the receiver's unfinished `segment` holding `bytes` of WAL.
pub(crate) fn stream_key(cluster: &str, segment: &SegmentName, bytes: u64) -> String {
    format!(
        "{}{segment}.{bytes:08X}.zst",
        stream_timeline_prefix(cluster, segment)
    )
}

/// Parses a streamed segment's key into (cluster, segment, bytes).
pub(crate) fn parse_stream_key(key: &str) -> Option<(String, SegmentName, u64)> {
    let mut parts = key.split('/');
    let (cluster, kind, _, file) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if kind != "stream" || parts.next().is_some() {
        return None;
    }
    let (segment, bytes) = file.strip_suffix(".zst")?.split_once('.')?;
    let WalFileName::Segment(segment) = segment.parse::<WalFileName>().ok()? else {
        return None;
    };
    if bytes.len() != 8 {
        return None;
    }
    let bytes = u64::from_str_radix(bytes, 16).ok()?;
    (stream_key(cluster, &segment, bytes) == key).then(|| (cluster.to_string(), segment, bytes))
}

/// Key of a loose chunk.
pub(crate) fn chunk_key(cluster: &str, hash: &str) -> String {
    format!("{cluster}/chunks/{}/{hash}.zst", &hash[..2.min(hash.len())])
}

/// Parses a chunk key into (cluster, hash).
pub(crate) fn parse_chunk_key(key: &str) -> Option<(String, String)> {
    let mut parts = key.split('/');
    let (cluster, kind, _, file) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if kind != "chunks" || parts.next().is_some() {
        return None;
    }
    let hash = file.strip_suffix(".zst")?;
    names::validate_chunk_hash(hash).ok()?;
    (chunk_key(cluster, hash) == key).then(|| (cluster.to_string(), hash.to_string()))
}

/// Prefix of every pack of a cluster.
pub(crate) fn packs_prefix(cluster: &str) -> String {
    format!("{cluster}/packs/")
}

/// Key of a pack.
pub(crate) fn pack_key(cluster: &str, id: &str) -> String {
    format!("{cluster}/packs/{}/{id}.pack", &id[..2.min(id.len())])
}

/// Parses a pack key into (cluster, id).
pub(crate) fn parse_pack_key(key: &str) -> Option<(String, String)> {
    let mut parts = key.split('/');
    let (cluster, kind, _, file) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if kind != "packs" || parts.next().is_some() {
        return None;
    }
    let id = file.strip_suffix(".pack")?;
    if !valid_pack_id(id) {
        return None;
    }
    (pack_key(cluster, id) == key).then(|| (cluster.to_string(), id.to_string()))
}

/// Whether `id` has the shape of a pack id (32 lowercase hex digits).
pub(crate) fn valid_pack_id(id: &str) -> bool {
    id.len() == 32 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// A new pack id: unique across the packs of one archive (time, process, counter), and
/// a create-only write refuses the impossible collision anyway.
pub(crate) fn new_pack_id() -> String {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let mut h = blake3::Hasher::new();
    h.update(&t.to_le_bytes());
    h.update(&std::process::id().to_le_bytes());
    h.update(&n.to_le_bytes());
    h.finalize().to_hex()[..32].to_string()
}

/// Key of a backup's manifest.
pub(crate) fn manifest_key(cluster: &str, id: &str) -> String {
    format!("{cluster}/backups/{id}/manifest.zst")
}

/// Parses a manifest key into (cluster, id).
pub(crate) fn parse_manifest_key(key: &str) -> Option<(String, String)> {
    let mut parts = key.split('/');
    let (cluster, kind, id, file) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if kind != "backups" || file != "manifest.zst" || parts.next().is_some() {
        return None;
    }
    names::validate_backup_id(id).ok()?;
    Some((cluster.to_string(), id.to_string()))
}

/// Key of an audit trail batch whose first record has `first_id` and whose bytes hash
/// to `hash` (hex).
pub(crate) fn audit_key(cluster: &str, first_id: &str, hash: &str) -> String {
    format!("{cluster}/audit/{first_id}-{}.jsonl.zst", &hash[..16])
}

/// Parses an audit batch key into its cluster.
pub(crate) fn parse_audit_key(key: &str) -> Option<String> {
    let (cluster, rest) = key.split_once("/audit/")?;
    names::validate_cluster_name(cluster).ok()?;
    let stem = rest.strip_suffix(".jsonl.zst")?;
    let (id, hash) = stem.split_once('-')?;
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    if !hex(id, 32) || !hex(hash, 16) {
        return None;
    }
    Some(cluster.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audit_keys_round_trip_and_refuse_tricks() {
        let id = format!("{:016x}{:016x}", 1_700_000_000_000_000u64, 7);
        let key = audit_key("main", &id, &"ab".repeat(32));
        assert_eq!(parse_audit_key(&key).as_deref(), Some("main"));
        for bad in [
            "main/audit/x-0123456789abcdef.jsonl.zst".to_string(),
            format!("main/audit/{id}-0123.jsonl.zst"),
            format!("../audit/{id}-0123456789abcdef.jsonl.zst"),
            format!("main/audit/{id}-0123456789abcdef.json"),
        ] {
            assert_eq!(parse_audit_key(&bad), None, "{bad}");
        }
    }

    #[test]
    fn stream_keys_round_trip_and_refuse_tricks() {
        let seg = match "00000002000000010000000A".parse::<WalFileName>().unwrap() {
            WalFileName::Segment(s) => s,
            _ => unreachable!(),
        };
        let key = stream_key("main", &seg, 0x1234);
        assert_eq!(
            key,
            "main/stream/00000002/00000002000000010000000A.00001234.zst"
        );
        assert_eq!(
            parse_stream_key(&key),
            Some(("main".to_string(), seg, 0x1234))
        );
        assert!(key.starts_with(&stream_timeline_prefix("main", &seg)));
        assert!(key.starts_with(&stream_prefix("main")));
        for bad in [
            "main/stream/00000002/00000002000000010000000A.1234.zst",
            "main/stream/00000001/00000002000000010000000A.00001234.zst",
            "main/stream/00000002/00000002000000010000000A.partial.zst",
            "main/stream/00000002/x/00000002000000010000000A.00001234.zst",
            "main/wal/00000002/00000002000000010000000A.00001234.zst",
        ] {
            assert_eq!(parse_stream_key(bad), None, "{bad}");
        }
    }

    #[test]
    fn wal_keys_round_trip() {
        for n in [
            "000000010000000A000000FE",
            "000000010000000A000000FE.partial",
            "00000002.history",
            "000000010000000000000002.00000028.backup",
        ] {
            let name: WalFileName = n.parse().unwrap();
            let key = wal_key("main", &name);
            assert_eq!(parse_wal_key(&key), Some(("main".to_string(), name)));
        }
        assert_eq!(parse_wal_key("main/cluster.toml"), None);
        assert_eq!(
            parse_wal_key("main/wal/00000002/000000010000000000000001.zst"),
            None
        );
        assert_eq!(parse_cluster_key(&cluster_key("main")), Some("main"));
        assert_eq!(parse_cluster_key("a/b/cluster.toml"), None);
    }

    #[test]
    fn backup_keys_round_trip_and_refuse_tricks() {
        let h = "ab".repeat(32);
        let k = chunk_key("main", &h);
        assert_eq!(k, format!("main/chunks/ab/{h}.zst"));
        assert_eq!(parse_chunk_key(&k), Some(("main".into(), h.clone())));
        assert_eq!(parse_chunk_key(&format!("main/chunks/cd/{h}.zst")), None);
        assert_eq!(parse_chunk_key("main/chunks/ab/xyz.zst"), None);
        let m = manifest_key("main", "20261122T044537123Z");
        assert_eq!(
            parse_manifest_key(&m),
            Some(("main".into(), "20261122T044537123Z".into()))
        );
        assert_eq!(parse_manifest_key("main/backups/../manifest.zst"), None);
        assert_eq!(parse_manifest_key("main/backups/x/other.zst"), None);
    }

    #[test]
    fn pack_keys_round_trip_and_refuse_tricks() {
        let id = new_pack_id();
        assert!(valid_pack_id(&id));
        assert_ne!(id, new_pack_id());
        let k = pack_key("main", &id);
        assert!(k.starts_with(&packs_prefix("main")));
        assert_eq!(parse_pack_key(&k), Some(("main".into(), id.clone())));
        assert_eq!(parse_pack_key(&format!("main/packs/zz/{id}.pack")), None);
        assert_eq!(parse_pack_key("main/packs/ab/../x.pack"), None);
        assert_eq!(
            parse_pack_key(&format!("main/chunks/{}/{id}.pack", &id[..2])),
            None
        );
    }
}
