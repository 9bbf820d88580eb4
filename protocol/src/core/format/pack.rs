//! Packs: many backup chunks in one stored object (pure code, no I/O).
//!
//! A backup of a large database has hundreds of thousands of chunks. One file (or S3
//! object) per chunk costs an inode allocation (slow on a filesystem that just deleted
//! many files) or a PUT request each; so `pushclient backup` sends the chunks the
//! archive lacks in packs of up to 8 MiB, and the archive stores each pack as one object
//! (its key is `archived`'s business: `archived/src/store/layout.rs`).
//!
//! # Format
//!
//! ```text
//! off        size  field
//!   0           8  magic "WVPACK\0\x01" (last byte: format version 1)
//!   8           4  chunk count N, u32 little-endian
//!  12           4  reserved, zero
//!  16      56 x N  index, one entry per chunk in body order:
//!                    blake3 of the raw chunk (32), offset of its object from the start
//!                    of the pack (u64 LE), object length (u64 LE), raw size (u64 LE)
//!  16+56N       .  the chunks, each a whole object ([`crate::core::format::object`]:
//!                  64-byte header with raw size and blake3, then its zstd frame), back
//!                  to back
//! ```
//!
//! The index up front lets a catalog rebuild read one range per pack, and lets the
//! archive write it before the chunks arrive (offsets follow from the announced sizes),
//! then verify and append the chunks a few at a time; the per-chunk object headers let
//! every reader verify a chunk it took out of a pack on its own. A pack is written
//! create-only and never changed.

use crate::core::format::object::{ObjectHeader, HEADER_LEN};

const MAGIC: &[u8; 8] = b"WVPACK\0\x01";
/// Bytes before the index.
pub const PACK_HEADER_LEN: usize = 16;
/// Bytes per index entry.
pub const INDEX_ENTRY_LEN: usize = 56;

/// Why bytes are not a pack's index.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PackError {
    /// The bytes do not start with a pack header.
    #[error("not a walvault pack (bad magic or short header)")]
    NotAPack,
    /// Fewer index bytes than the header announces.
    #[error("pack index cut short ({0} entries announced)")]
    IndexCutShort(usize),
    /// An entry does not follow the previous one, or is shorter than an object header.
    #[error("pack index entry {0} is inconsistent")]
    BadEntry(usize),
    /// The entries do not end where the pack does.
    #[error("pack index covers {covered} bytes but the pack has {len}")]
    WrongLength {
        /// Bytes the index accounts for.
        covered: u64,
        /// The pack's length.
        len: u64,
    },
}

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

/// A whole pack in memory (index, then each chunk's header and frame): for tests and
/// tools; the archive writes packs piece by piece.
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
pub fn decode_count(b: &[u8]) -> Result<usize, PackError> {
    if b.len() < PACK_HEADER_LEN || &b[0..8] != MAGIC {
        return Err(PackError::NotAPack);
    }
    Ok(u32::from_le_bytes([b[8], b[9], b[10], b[11]]) as usize)
}

/// Bytes from the start of a pack that hold the header and an index of `count` entries.
pub fn index_len(count: usize) -> u64 {
    (PACK_HEADER_LEN + INDEX_ENTRY_LEN * count) as u64
}

/// The index of a pack from its first [`index_len`] bytes, checked for consistency
/// (entries in order, back to back, after the index) against the pack's total length.
pub fn decode_index(b: &[u8], pack_len: u64) -> Result<Vec<PackEntry>, PackError> {
    let count = decode_count(b)?;
    let index_end = PACK_HEADER_LEN + INDEX_ENTRY_LEN * count;
    let Some(index) = b.get(PACK_HEADER_LEN..index_end) else {
        return Err(PackError::IndexCutShort(count));
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
            return Err(PackError::BadEntry(out.len()));
        }
        expected = entry.offset.saturating_add(entry.length);
        out.push(entry);
    }
    if expected != pack_len {
        return Err(PackError::WrongLength {
            covered: expected,
            len: pack_len,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

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
        let mut d = crate::core::format::object::ObjectDecoder::new().unwrap();
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
        assert_eq!(
            decode_index(&bad, bad.len() as u64),
            Err(PackError::NotAPack)
        );
        let mut lying = pack.clone();
        lying[PACK_HEADER_LEN + 32] ^= 1;
        assert_eq!(
            decode_index(&lying, lying.len() as u64),
            Err(PackError::BadEntry(0))
        );
        assert!(decode_index(&pack[..20], pack.len() as u64).is_err());
    }

    proptest! {
        #[test]
        fn decoding_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512), len in any::<u64>()) {
            let _ = decode_count(&bytes);
            let _ = decode_index(&bytes, len);
        }
    }
}
