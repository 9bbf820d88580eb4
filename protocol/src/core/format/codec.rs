//! Incremental zstd + blake3 over byte chunks (pure code, no I/O).
//!
//! Both directions stream: a 1 GiB segment passes through in [`CHUNK_SIZE`] pieces and is
//! never held whole. [`Encoder`] turns raw chunks into a zstd frame; [`VerifyingDecoder`]
//! turns a zstd frame back into raw chunks while hashing them, counting them and keeping
//! the first bytes (for WAL header validation), so the receiver can refuse anything
//! whose size or blake3 differs from what the sender announced.

use zstd::stream::raw::{
    Decoder as RawDecoder, Encoder as RawEncoder, InBuffer, Operation, OutBuffer,
};

/// Size of the pieces files are read and sent in. Resident buffers per transfer stay at
/// a small multiple of this, whatever the file size.
pub const CHUNK_SIZE: usize = 256 * 1024;
/// How many leading raw bytes [`VerifyingDecoder`] keeps for validation.
pub const HEAD_LEN: usize = 8192;

/// blake3 of a byte string, hex.
pub fn blake3_hex(bytes: &[u8]) -> String {
    blake3::hash(bytes).to_hex().to_string()
}

/// Streaming zstd compressor.
pub struct Encoder {
    inner: RawEncoder<'static>,
    out: Vec<u8>,
}

impl Encoder {
    /// A compressor at `level` (1..=19; 3 is zstd's default).
    pub fn new(level: i32) -> std::io::Result<Encoder> {
        let mut inner = RawEncoder::new(level)?;
        // Segments are large and compress well with long matches off; checksums are ours.
        inner.set_parameter(zstd::zstd_safe::CParameter::ChecksumFlag(false))?;
        Ok(Encoder {
            inner,
            out: vec![0u8; zstd::zstd_safe::CCtx::out_size().max(CHUNK_SIZE)],
        })
    }

    /// Compresses `input`, appending output to `sink`.
    pub fn write(&mut self, input: &[u8], sink: &mut Vec<u8>) -> std::io::Result<()> {
        let mut inb = InBuffer::around(input);
        while inb.pos < input.len() {
            let mut outb = OutBuffer::around(&mut self.out[..]);
            self.inner.run(&mut inb, &mut outb)?;
            let n = outb.pos();
            sink.extend_from_slice(&self.out[..n]);
        }
        Ok(())
    }

    /// Ends the frame, appending the rest to `sink`.
    pub fn finish(&mut self, sink: &mut Vec<u8>) -> std::io::Result<()> {
        loop {
            let mut outb = OutBuffer::around(&mut self.out[..]);
            let remaining = self.inner.finish(&mut outb, true)?;
            let n = outb.pos();
            sink.extend_from_slice(&self.out[..n]);
            if remaining == 0 {
                return Ok(());
            }
        }
    }
}

/// Streaming zstd decompressor that hashes, counts and bounds what it produces.
pub struct VerifyingDecoder {
    inner: RawDecoder<'static>,
    out: Vec<u8>,
    hasher: blake3::Hasher,
    raw_len: u64,
    max_raw_len: u64,
    head: Vec<u8>,
    frame_done: bool,
}

/// What a finished [`VerifyingDecoder`] saw.
#[derive(Debug, Clone)]
pub struct DecodedSummary {
    /// Raw length.
    pub raw_len: u64,
    /// blake3 of the raw bytes, hex.
    pub blake3: String,
    /// The first up to [`HEAD_LEN`] raw bytes.
    pub head: Vec<u8>,
}

/// Why a body failed to decode.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// Not a valid zstd frame.
    #[error("corrupt zstd data: {0}")]
    Corrupt(String),
    /// Decompresses to more than allowed.
    #[error("decompressed data exceeds {0} bytes")]
    TooLong(u64),
    /// Ended before the zstd frame was complete.
    #[error("compressed data ended before the end of the zstd frame")]
    Truncated,
    /// Data after the end of the frame.
    #[error("unexpected bytes after the end of the zstd frame")]
    TrailingData,
    /// Raw size differs from the announced one.
    #[error("size mismatch: got {got} bytes, expected {expected}")]
    SizeMismatch {
        /// Decoded size.
        got: u64,
        /// Announced size.
        expected: u64,
    },
    /// blake3 differs from the announced one.
    #[error("blake3 mismatch: got {got}, expected {expected}")]
    HashMismatch {
        /// Hash of decoded bytes.
        got: String,
        /// Announced hash.
        expected: String,
    },
}

impl VerifyingDecoder {
    /// A decoder that refuses to produce more than `max_raw_len` bytes.
    pub fn new(max_raw_len: u64) -> std::io::Result<VerifyingDecoder> {
        Ok(VerifyingDecoder {
            inner: RawDecoder::new()?,
            out: vec![0u8; CHUNK_SIZE],
            hasher: blake3::Hasher::new(),
            raw_len: 0,
            max_raw_len,
            head: Vec::new(),
            frame_done: false,
        })
    }

    /// Decompresses `input`; every produced raw chunk is passed to `on_raw`.
    pub fn write<E>(
        &mut self,
        input: &[u8],
        mut on_raw: impl FnMut(&[u8]) -> Result<(), E>,
    ) -> Result<(), DecodeOrSinkError<E>> {
        let mut inb = InBuffer::around(input);
        loop {
            if self.frame_done {
                if inb.pos < input.len() {
                    return Err(DecodeError::TrailingData.into());
                }
                return Ok(());
            }
            let mut outb = OutBuffer::around(&mut self.out[..]);
            let hint = self
                .inner
                .run(&mut inb, &mut outb)
                .map_err(|e| DecodeError::Corrupt(e.to_string()))?;
            let n = outb.pos();
            if n > 0 {
                let chunk = &self.out[..n];
                self.raw_len += n as u64;
                if self.raw_len > self.max_raw_len {
                    return Err(DecodeError::TooLong(self.max_raw_len).into());
                }
                self.hasher.update(chunk);
                if self.head.len() < HEAD_LEN {
                    let take = (HEAD_LEN - self.head.len()).min(n);
                    self.head.extend_from_slice(&chunk[..take]);
                }
                on_raw(chunk).map_err(DecodeOrSinkError::Sink)?;
            }
            if hint == 0 {
                self.frame_done = true;
                continue;
            }
            if inb.pos == input.len() && n < self.out.len() {
                return Ok(());
            }
        }
    }

    /// The first raw bytes decoded so far.
    pub fn head(&self) -> &[u8] {
        &self.head
    }

    /// Raw bytes decoded so far.
    pub fn raw_len(&self) -> u64 {
        self.raw_len
    }

    /// Ends decoding and checks the frame was complete.
    pub fn finish(self) -> Result<DecodedSummary, DecodeError> {
        if !self.frame_done {
            return Err(DecodeError::Truncated);
        }
        Ok(DecodedSummary {
            raw_len: self.raw_len,
            blake3: self.hasher.finalize().to_hex().to_string(),
            head: self.head,
        })
    }
}

impl DecodedSummary {
    /// Checks size and hash against what the sender announced.
    pub fn check(&self, raw_size: u64, blake3: &str) -> Result<(), DecodeError> {
        if self.raw_len != raw_size {
            return Err(DecodeError::SizeMismatch {
                got: self.raw_len,
                expected: raw_size,
            });
        }
        if !self.blake3.eq_ignore_ascii_case(blake3) {
            return Err(DecodeError::HashMismatch {
                got: self.blake3.clone(),
                expected: blake3.to_string(),
            });
        }
        Ok(())
    }
}

/// A decoding failure or a failure of the consumer of decoded bytes.
#[derive(Debug, thiserror::Error)]
pub enum DecodeOrSinkError<E> {
    /// The data is bad.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// The consumer failed (for example a disk write).
    #[error("writing decoded data failed")]
    Sink(E),
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn compress(data: &[u8]) -> Vec<u8> {
        let mut enc = Encoder::new(3).unwrap();
        let mut out = Vec::new();
        for c in data.chunks(1000) {
            enc.write(c, &mut out).unwrap();
        }
        enc.finish(&mut out).unwrap();
        out
    }

    fn decode(z: &[u8], piece: usize, max: u64) -> Result<(Vec<u8>, DecodedSummary), DecodeError> {
        let mut dec = VerifyingDecoder::new(max).unwrap();
        let mut raw = Vec::new();
        for c in z.chunks(piece.max(1)) {
            dec.write::<()>(c, |b| {
                raw.extend_from_slice(b);
                Ok(())
            })
            .map_err(|e| match e {
                DecodeOrSinkError::Decode(d) => d,
                DecodeOrSinkError::Sink(()) => unreachable!(),
            })?;
        }
        Ok((raw, dec.finish()?))
    }

    #[test]
    fn round_trip_large() {
        let data: Vec<u8> = (0..3_000_000u32)
            .map(|i| (i % 251) as u8 ^ (i >> 13) as u8)
            .collect();
        let z = compress(&data);
        let (raw, sum) = decode(&z, 7777, u64::MAX).unwrap();
        assert_eq!(raw, data);
        sum.check(data.len() as u64, &blake3_hex(&data)).unwrap();
        assert_eq!(sum.head, &data[..HEAD_LEN]);
    }

    #[test]
    fn bad_input_is_typed() {
        let data = vec![7u8; 100_000];
        let z = compress(&data);
        assert!(matches!(
            decode(&z[..z.len() - 3], 100, u64::MAX),
            Err(DecodeError::Truncated)
        ));
        assert!(matches!(
            decode(&z, 100, 1000),
            Err(DecodeError::TooLong(1000))
        ));
        let mut trailing = z.clone();
        trailing.extend_from_slice(b"xx");
        assert!(matches!(
            decode(&trailing, 100_000, u64::MAX),
            Err(DecodeError::TrailingData)
        ));
        let (_, sum) = decode(&z, 100, u64::MAX).unwrap();
        assert!(matches!(
            sum.check(1, &sum.blake3),
            Err(DecodeError::SizeMismatch { .. })
        ));
        assert!(matches!(
            sum.check(100_000, &"0".repeat(64)),
            Err(DecodeError::HashMismatch { .. })
        ));
    }

    proptest! {
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2048), piece in 1usize..300) {
            let _ = decode(&bytes, piece, 1 << 20);
        }
    }
}
