//! Packs: many backup chunks in one store object.
//!
//! A backup of a large database has hundreds of thousands of chunks. One file (or S3
//! object) per chunk costs an inode allocation (slow on a filesystem that just deleted
//! many files) or a PUT request each; so `pushclient backup` sends the chunks the
//! archive lacks in packs of up to 8 MiB, and the archive stores each pack as one object.
//!
//! # Store layout and format
//!
//! ```text
//! <cluster>/packs/<id[0..2]>/<id>.pack        id: 32 hex digits, unique per pack
//!
//! off        size  field
//!   0           8  magic "WVPACK\0\x01" (last byte: format version 1)
//!   8           4  chunk count N, u32 little-endian
//!  12           4  reserved, zero
//!  16      56 x N  index, one entry per chunk in body order:
//!                    blake3 of the raw chunk (32), offset of its object from the start
//!                    of the pack (u64 LE), object length (u64 LE), raw size (u64 LE)
//!  16+56N       .  the chunks, each a whole object (walvault_protocol::core::format::object: 64-byte
//!                  header with raw size and blake3, then its zstd frame), back to back
//! ```
//!
//! The index up front lets a catalog rebuild read one range per pack, and lets archived
//! write it before the chunks arrive (offsets follow from the announced sizes), then
//! verify and append the chunks a few at a time; the per-chunk object headers let every
//! reader verify a chunk it took out of a pack on its own.
//! A pack is written create-only and never changed; the catalog maps each chunk hash to
//! (pack, offset, length). Retention deletes a pack when no chunk the catalog locates in
//! it is referenced by a kept backup or within the grace period.

use anyhow::{bail, Result};
use walvault_protocol::core::format::object::{ObjectHeader, HEADER_LEN};

const MAGIC: &[u8; 8] = b"WVPACK\0\x01";
/// Bytes before the index.
pub const PACK_HEADER_LEN: usize = 16;
/// Bytes per index entry.
pub const INDEX_ENTRY_LEN: usize = 56;

/// One chunk of a pack, as its index says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PackEntry {
    /// blake3 of the raw chunk.
    pub blake3: [u8; 32],
    /// Offset of the chunk's object (its 64-byte header) from the start of the pack.
    pub offset: u64,
    /// Length of the object (header + zstd frame).
    pub length: u64,
    /// Raw size of the chunk.
    pub raw_size: u64,
}

/// Key of a pack.
pub fn pack_key(cluster: &str, id: &str) -> String {
    format!("{cluster}/packs/{}/{id}.pack", &id[..2.min(id.len())])
}

/// Parses a pack key into (cluster, id).
pub fn parse_pack_key(key: &str) -> Option<(String, String)> {
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
pub fn valid_pack_id(id: &str) -> bool {
    id.len() == 32 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// A new pack id: unique across the packs of one archive (time, process, counter), and
/// a create-only write refuses the impossible collision anyway.
pub fn new_pack_id() -> String {
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

/// The index of a pack of chunks with these object headers, in body order: the bytes
/// that start the pack, and the entries. Offsets follow from the sizes alone, so the
/// index can be written before the chunks arrive.
pub fn index(headers: &[ObjectHeader]) -> (Vec<u8>, Vec<PackEntry>) {
    let index_end = PACK_HEADER_LEN + INDEX_ENTRY_LEN * headers.len();
    let mut out = Vec::with_capacity(index_end);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(headers.len() as u32).to_le_bytes());
    out.extend_from_slice(&[0u8; 4]);
    let mut entries = Vec::with_capacity(headers.len());
    let mut offset = index_end as u64;
    for h in headers {
        let length = HEADER_LEN as u64 + h.compressed_size;
        entries.push(PackEntry {
            blake3: h.blake3,
            offset,
            length,
            raw_size: h.raw_size,
        });
        out.extend_from_slice(&h.blake3);
        out.extend_from_slice(&offset.to_le_bytes());
        out.extend_from_slice(&length.to_le_bytes());
        out.extend_from_slice(&h.raw_size.to_le_bytes());
        offset += length;
    }
    (out, entries)
}

/// A whole pack in memory (index, then each chunk's header and frame): for tests.
#[cfg(test)]
pub fn encode(chunks: &[(ObjectHeader, &[u8])]) -> (Vec<u8>, Vec<PackEntry>) {
    let headers: Vec<ObjectHeader> = chunks.iter().map(|(h, _)| h.clone()).collect();
    let (mut out, entries) = index(&headers);
    for (h, frame) in chunks {
        out.extend_from_slice(&h.encode());
        out.extend_from_slice(frame);
    }
    (out, entries)
}

/// The chunk count from a pack's first [`PACK_HEADER_LEN`] bytes.
pub fn decode_count(b: &[u8]) -> Result<usize> {
    if b.len() < PACK_HEADER_LEN || &b[0..8] != MAGIC {
        bail!("not a walvault pack (bad magic or short header)");
    }
    Ok(u32::from_le_bytes([b[8], b[9], b[10], b[11]]) as usize)
}

/// The index of a pack from its first `PACK_HEADER_LEN + INDEX_ENTRY_LEN * count` bytes,
/// checked for consistency (entries in order, back to back, after the index) against
/// the pack's total length.
pub fn decode_index(b: &[u8], pack_len: u64) -> Result<Vec<PackEntry>> {
    let count = decode_count(b)?;
    let index_end = PACK_HEADER_LEN + INDEX_ENTRY_LEN * count;
    let Some(index) = b.get(PACK_HEADER_LEN..index_end) else {
        bail!("pack index cut short ({count} entries announced)");
    };
    let mut expected = index_end as u64;
    let mut out = Vec::with_capacity(count);
    for e in index.chunks_exact(INDEX_ENTRY_LEN) {
        let u64_at = |o: usize| u64::from_le_bytes(e[o..o + 8].try_into().unwrap_or([0; 8]));
        let mut blake3 = [0u8; 32];
        blake3.copy_from_slice(&e[0..32]);
        let entry = PackEntry {
            blake3,
            offset: u64_at(32),
            length: u64_at(40),
            raw_size: u64_at(48),
        };
        if entry.offset != expected || entry.length < HEADER_LEN as u64 {
            bail!("pack index entry {} is inconsistent", out.len());
        }
        expected = entry.offset.saturating_add(entry.length);
        out.push(entry);
    }
    if expected != pack_len {
        bail!("pack index covers {expected} bytes but the pack has {pack_len}");
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(raw: &[u8]) -> (ObjectHeader, Vec<u8>) {
        let frame = zstd::bulk::compress(raw, 3).unwrap();
        (
            ObjectHeader {
                raw_size: raw.len() as u64,
                blake3: *blake3::hash(raw).as_bytes(),
                compressed_size: frame.len() as u64,
            },
            frame,
        )
    }

    #[test]
    fn packs_round_trip_and_every_chunk_reads_alone() {
        let raws: Vec<Vec<u8>> = (0..5u8).map(|i| vec![i; 1000 + i as usize]).collect();
        let chunks: Vec<(ObjectHeader, Vec<u8>)> = raws.iter().map(|r| chunk(r)).collect();
        let refs: Vec<(ObjectHeader, &[u8])> =
            chunks.iter().map(|(h, f)| (h.clone(), &f[..])).collect();
        let (pack, entries) = encode(&refs);
        let index = decode_index(&pack, pack.len() as u64).unwrap();
        assert_eq!(index, entries);
        let mut d = walvault_protocol::core::format::object::ObjectDecoder::new().unwrap();
        for (e, raw) in index.iter().zip(&raws) {
            let obj = &pack[e.offset as usize..(e.offset + e.length) as usize];
            let h = ObjectHeader::decode(obj).unwrap();
            assert_eq!(e.raw_size, raw.len() as u64);
            assert_eq!(
                &d.decode(&h, &obj[HEADER_LEN..], &e.blake3, 1 << 20)
                    .unwrap(),
                raw
            );
        }
        // Damage is noticed: a pack cut short, a bad magic, a lying entry.
        assert!(decode_index(&pack, pack.len() as u64 - 1).is_err());
        let mut bad = pack.clone();
        bad[0] = b'X';
        assert!(decode_index(&bad, bad.len() as u64).is_err());
        let mut lying = pack.clone();
        lying[PACK_HEADER_LEN + 32] ^= 1;
        assert!(decode_index(&lying, lying.len() as u64).is_err());
        assert!(decode_index(&pack[..20], pack.len() as u64).is_err());
    }

    #[test]
    fn keys_round_trip_and_refuse_tricks() {
        let id = new_pack_id();
        assert!(valid_pack_id(&id));
        assert_ne!(id, new_pack_id());
        let k = pack_key("main", &id);
        assert_eq!(parse_pack_key(&k), Some(("main".into(), id.clone())));
        assert_eq!(parse_pack_key(&format!("main/packs/zz/{id}.pack")), None);
        assert_eq!(parse_pack_key("main/packs/ab/../x.pack"), None);
        assert_eq!(
            parse_pack_key(&format!("main/chunks/{}/{id}.pack", &id[..2])),
            None
        );
    }
}
