//! The stored object format (pure code, no I/O): what the archive keeps for every WAL
//! file, backup chunk and manifest, and what a batched chunk answer carries.
//!
//! ```text
//! off size
//!   0    8  magic "WVOBJ\0\0\x01" (last byte: format version 1)
//!   8    8  raw size, u64 little-endian
//!  16   32  blake3 of the raw bytes
//!  48    8  compressed size (length of the zstd frame), u64 little-endian
//!  56    8  reserved, zero
//!  64    .  zstd frame of the raw bytes
//! ```
//!
//! The header makes objects self-describing: a catalog rebuild needs a listing and one
//! 64-byte read per object, and every reader can verify what it decompresses. The body
//! of a `GetChunks` answer is the requested objects, whole and in the requested order,
//! back to back; the headers delimit them.

/// Why bytes are not the object they should be.
#[derive(Debug, thiserror::Error)]
pub enum ObjectError {
    /// The bytes do not start with an object header.
    #[error("not a walvault object (bad magic or short header)")]
    NotAnObject,
    /// The header names another object than the one asked for.
    #[error("the archive sent object {got} where {expected} was asked for")]
    WrongObject {
        /// blake3 in the header, hex.
        got: String,
        /// blake3 asked for, hex.
        expected: String,
    },
    /// The header announces more raw bytes than allowed.
    #[error("object {object} announces {raw_size} bytes, more than the {max} allowed")]
    TooLarge {
        /// blake3, hex.
        object: String,
        /// Announced raw size.
        raw_size: u64,
        /// Limit.
        max: u64,
    },
    /// The frame is not as long as the header says.
    #[error("object {object}: {got} compressed bytes where its header says {announced}")]
    FrameLength {
        /// blake3, hex.
        object: String,
        /// Bytes received.
        got: u64,
        /// Bytes announced.
        announced: u64,
    },
    /// The frame does not decompress.
    #[error("object {object} does not decompress: {source}")]
    Corrupt {
        /// blake3, hex.
        object: String,
        /// zstd's error.
        source: std::io::Error,
    },
    /// The frame decompresses to another size than announced.
    #[error("object {object} decompresses to {got} bytes where its header says {announced}")]
    RawLength {
        /// blake3, hex.
        object: String,
        /// Bytes decompressed.
        got: u64,
        /// Bytes announced.
        announced: u64,
    },
    /// The decompressed bytes have another blake3.
    #[error("object {object}: the decompressed bytes do not have that blake3 (damaged copy)")]
    HashMismatch {
        /// blake3 announced, hex.
        object: String,
    },
}

/// Object header length.
pub const HEADER_LEN: usize = 64;
const MAGIC: &[u8; 8] = b"WVOBJ\0\0\x01";

/// The header of a stored object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectHeader {
    /// Raw file size.
    pub raw_size: u64,
    /// blake3 of the raw file.
    pub blake3: [u8; 32],
    /// Length of the zstd frame after the header.
    pub compressed_size: u64,
}

impl ObjectHeader {
    /// Encodes the header.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..8].copy_from_slice(MAGIC);
        b[8..16].copy_from_slice(&self.raw_size.to_le_bytes());
        b[16..48].copy_from_slice(&self.blake3);
        b[48..56].copy_from_slice(&self.compressed_size.to_le_bytes());
        b
    }

    /// Decodes a header, refusing anything that is not one.
    pub fn decode(b: &[u8]) -> Result<ObjectHeader, ObjectError> {
        if b.len() < HEADER_LEN || &b[0..8] != MAGIC {
            return Err(ObjectError::NotAnObject);
        }
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or([0; 8]));
        let mut blake3 = [0u8; 32];
        blake3.copy_from_slice(&b[16..48]);
        Ok(ObjectHeader {
            raw_size: u64_at(8),
            blake3,
            compressed_size: u64_at(48),
        })
    }

    /// blake3 as hex.
    pub fn blake3_hex(&self) -> String {
        hex::encode(self.blake3)
    }

    /// Largest zstd frame a raw object of `raw_size` bytes can have (zstd's bound).
    pub fn max_compressed_size(raw_size: u64) -> u64 {
        raw_size + raw_size / 128 + 4096
    }
}

/// Decompresses and verifies whole small objects (backup chunks), reusing one zstd
/// context: creating a context per 128 KiB chunk costs more than decompressing it.
pub struct ObjectDecoder {
    dctx: zstd::bulk::Decompressor<'static>,
}

impl ObjectDecoder {
    /// A decoder with a fresh zstd context.
    pub fn new() -> std::io::Result<ObjectDecoder> {
        Ok(ObjectDecoder {
            dctx: zstd::bulk::Decompressor::new()?,
        })
    }

    /// The raw bytes of `frame` (a zstd frame of an object whose header is `header`),
    /// refused unless the header names `expected`, its size is at most `max_raw`, and the
    /// decompressed bytes have exactly the header's size and blake3.
    pub fn decode(
        &mut self,
        header: &ObjectHeader,
        frame: &[u8],
        expected: &[u8; 32],
        max_raw: u64,
    ) -> Result<Vec<u8>, ObjectError> {
        let object = || header.blake3_hex();
        if &header.blake3 != expected {
            return Err(ObjectError::WrongObject {
                got: object(),
                expected: hex::encode(expected),
            });
        }
        if header.raw_size > max_raw {
            return Err(ObjectError::TooLarge {
                object: object(),
                raw_size: header.raw_size,
                max: max_raw,
            });
        }
        if frame.len() as u64 != header.compressed_size {
            return Err(ObjectError::FrameLength {
                object: object(),
                got: frame.len() as u64,
                announced: header.compressed_size,
            });
        }
        let raw = self
            .dctx
            .decompress(frame, header.raw_size as usize)
            .map_err(|source| ObjectError::Corrupt {
                object: object(),
                source,
            })?;
        if raw.len() as u64 != header.raw_size {
            return Err(ObjectError::RawLength {
                object: object(),
                got: raw.len() as u64,
                announced: header.raw_size,
            });
        }
        if blake3::hash(&raw).as_bytes() != expected {
            return Err(ObjectError::HashMismatch { object: object() });
        }
        Ok(raw)
    }
}

thread_local! {
    static THREAD_DECODER: std::cell::RefCell<Option<ObjectDecoder>> =
        const { std::cell::RefCell::new(None) };
}

/// Runs `f` with this thread's [`ObjectDecoder`] (made at first use): blocking workers
/// that verify many chunks keep one zstd context each.
pub fn with_thread_decoder<R>(f: impl FnOnce(&mut ObjectDecoder) -> R) -> std::io::Result<R> {
    THREAD_DECODER.with(|cell| {
        let mut cell = cell.borrow_mut();
        let decoder = match cell.as_mut() {
            Some(d) => d,
            None => cell.insert(ObjectDecoder::new()?),
        };
        Ok(f(decoder))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object(raw: &[u8]) -> (ObjectHeader, Vec<u8>) {
        let frame = zstd::bulk::compress(raw, 3).unwrap();
        let header = ObjectHeader {
            raw_size: raw.len() as u64,
            blake3: *blake3::hash(raw).as_bytes(),
            compressed_size: frame.len() as u64,
        };
        (header, frame)
    }

    #[test]
    fn header_round_trips_and_refuses_garbage() {
        let (h, _) = object(b"hello");
        let e = h.encode();
        assert_eq!(ObjectHeader::decode(&e).unwrap(), h);
        assert!(ObjectHeader::decode(&e[..63]).is_err());
        let mut bad = e;
        bad[0] = b'X';
        assert!(ObjectHeader::decode(&bad).is_err());
    }

    #[test]
    fn decoder_verifies_everything_and_is_reusable() {
        let mut d = ObjectDecoder::new().unwrap();
        let raw: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let (h, frame) = object(&raw);
        for _ in 0..3 {
            assert_eq!(d.decode(&h, &frame, &h.blake3, 1 << 20).unwrap(), raw);
        }
        // Asked for another object.
        let other = *blake3::hash(b"other").as_bytes();
        assert!(d.decode(&h, &frame, &other, 1 << 20).is_err());
        // Too large for the caller.
        assert!(d.decode(&h, &frame, &h.blake3, 1000).is_err());
        // Truncated frame.
        assert!(d
            .decode(&h, &frame[..frame.len() - 1], &h.blake3, 1 << 20)
            .is_err());
        // A frame of different bytes under the same header.
        let mut raw2 = raw.clone();
        raw2[7] ^= 1;
        let (h2, frame2) = object(&raw2);
        let lying = ObjectHeader {
            compressed_size: h2.compressed_size,
            ..h.clone()
        };
        assert!(d.decode(&lying, &frame2, &h.blake3, 1 << 20).is_err());
        // A header that claims fewer raw bytes than the frame holds.
        let short = ObjectHeader {
            raw_size: h.raw_size - 1,
            ..h.clone()
        };
        assert!(d.decode(&short, &frame, &h.blake3, 1 << 20).is_err());
        // Still fine afterwards.
        assert_eq!(d.decode(&h, &frame, &h.blake3, 1 << 20).unwrap(), raw);
    }
}
