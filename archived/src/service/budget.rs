//! The byte budget of requests: resident request buffers stay under
//! `request_memory_mib` (archived.toml) regardless of connection and stream count.
//!
//! Every request takes a [`Grant`] of the bytes it will buffer before it buffers them,
//! and gives it back when the grant is dropped (a streamed answer carries its grant in
//! its body stream). A request that does not fit waits until others give theirs back; a
//! request that could never fit is refused as `TooLarge`, naming the setting. The budget
//! is two pools of one total:
//!
//! - **headers**, an eighth of the total (at least 2 MiB, so the largest frame fits):
//!   the request frame, taken from its length prefix before the frame is read, twice
//!   its length (the JSON and what it parses into), held for the whole request;
//! - **bodies**, the rest: what the handler buffers (decoders and their windows, chunk
//!   groups, a manifest and its parse, a remote commit, a download's read-ahead, a
//!   listing's answer). The sizes are written where they are taken (service/*.rs,
//!   [`crate::store`]'s `*_memory` functions).
//!
//! Waiting cannot deadlock: a request waits for a body grant holding only its header
//! grant (a pool body grants never wait on), holds at most one body grant at a time (a
//! request that needs two in turn, as a push's receiving and then its remote commit,
//! gives the first back before it asks for the second), and never waits for one while
//! it holds the GC lock (gc.rs), whose writer would stop the readers that could give
//! budget back. A body grant is taken once the body's first bytes are there, so a
//! client that opens streams and sends nothing holds header grants only, and a body
//! that then stalls gives its grant back after `body_idle_timeout_secs`.
//!
//! Outside the budget: QUIC's own buffers (per connection, bounded by its flow-control
//! windows and `max_connections`), allocator slack, and what a retention run or a
//! listing needs per store (the store's keys, the catalog), which grows with the
//! archive, not with requests.

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use walvault_protocol::core::format::codec::CHUNK_SIZE;
use walvault_protocol::core::wire::{ErrorCode, MAX_FRAME_LEN};

use super::Refusal;
use crate::config::MIN_REQUEST_MEMORY_MIB;

/// What a streaming zstd decoder holds beside its window: its input and output block
/// buffers (128 KiB each at most), its tables and context (about 100 KiB), and the
/// [`CHUNK_SIZE`] output buffer of `VerifyingDecoder`, rounded up.
pub(crate) const DECODER_OVERHEAD: u64 = 512 << 10;

/// The largest window a zstd decoder accepts (zstd's default `windowLogMax`, 27); a
/// frame that asks for more is refused by the decoder anyway, and here before any
/// memory is granted.
pub(crate) const MAX_FRAME_WINDOW: u64 = 1 << 27;

/// What a one-frame answer of a listing may hold: the answer and its encoded frame.
pub(crate) const ANSWER_MEMORY: u64 = 2 * MAX_FRAME_LEN as u64;

/// The byte budget shared by every request of one archive.
pub(crate) struct Budget {
    headers: Arc<Semaphore>,
    bodies: Arc<Semaphore>,
    /// Size of the header pool, KiB.
    header_kib: u32,
    /// Size of the body pool, KiB.
    body_kib: u32,
    /// `request_memory_mib`.
    total_mib: u64,
}

/// Bytes of the budget a request holds; given back when dropped.
#[must_use = "a grant is given back when dropped"]
pub(crate) struct Grant {
    _permit: Option<OwnedSemaphorePermit>,
}

fn kib(bytes: u64) -> u64 {
    bytes.div_ceil(1024)
}

impl Budget {
    /// A budget of `total_mib` (at least [`MIN_REQUEST_MEMORY_MIB`], at most 4 TiB: a
    /// permit is a KiB).
    pub(crate) fn new(total_mib: u64) -> Budget {
        let total_kib = (total_mib.max(MIN_REQUEST_MEMORY_MIB) * 1024).min(u64::from(u32::MAX));
        let header_kib = (total_kib / 8).max(kib(2 * MAX_FRAME_LEN as u64));
        let body_kib = total_kib - header_kib;
        Budget {
            headers: Arc::new(Semaphore::new(header_kib as usize)),
            bodies: Arc::new(Semaphore::new(body_kib as usize)),
            header_kib: header_kib as u32,
            body_kib: body_kib as u32,
            total_mib,
        }
    }

    /// The header grant of a request frame of `frame_len` bytes (at most
    /// `MAX_FRAME_LEN`, which always fits): waits while the header pool is in use.
    pub(crate) async fn header(&self, frame_len: usize) -> Grant {
        let want = kib(2 * frame_len as u64).clamp(1, u64::from(self.header_kib)) as u32;
        Grant {
            _permit: self.headers.clone().acquire_many_owned(want).await.ok(),
        }
    }

    /// A body grant of `bytes` for `what` (for the refusal and the log): waits while
    /// the body pool is in use by others; refused as `TooLarge` if it could never fit.
    pub(crate) async fn body(&self, bytes: u64, what: &str) -> Result<Grant, Refusal> {
        if bytes == 0 {
            return Ok(Grant { _permit: None });
        }
        let want = kib(bytes);
        if want > u64::from(self.body_kib) {
            return Err(Refusal::new(
                ErrorCode::TooLarge,
                format!(
                    "{what} needs {} MiB of request memory, more than one request may hold with \
                     request_memory_mib = {} (at most {} MiB: the rest is kept for request \
                     headers); raise request_memory_mib in archived.toml",
                    bytes.div_ceil(1 << 20),
                    self.total_mib,
                    u64::from(self.body_kib) / 1024
                ),
            ));
        }
        let want = want as u32;
        let permit = match self.bodies.clone().try_acquire_many_owned(want) {
            Ok(p) => p,
            Err(_) => {
                tracing::debug!(
                    what,
                    mib = bytes.div_ceil(1 << 20),
                    "waiting for request memory (request_memory_mib)"
                );
                self.bodies
                    .clone()
                    .acquire_many_owned(want)
                    .await
                    .map_err(|e| Refusal::internal(e.into()))?
            }
        };
        Ok(Grant {
            _permit: Some(permit),
        })
    }

    /// Body bytes granted now, for tests.
    #[cfg(test)]
    pub(crate) fn bodies_in_use(&self) -> u64 {
        (u64::from(self.body_kib) - self.bodies.available_permits() as u64) * 1024
    }
}

/// The start of a zstd body, read before its memory is granted: its frame header (up
/// to 18 bytes) and the window its decoder will allocate.
pub(crate) struct FrameStart {
    head: [u8; FRAME_HEADER_MAX],
    len: usize,
    /// Bytes of the decoder's window.
    pub(crate) window: u64,
}

/// Longest zstd frame header (magic, descriptor, window, dictionary id, content size).
const FRAME_HEADER_MAX: usize = 18;

impl FrameStart {
    /// Reads the frame header off `source` (`what` names the body in refusals).
    pub(crate) async fn read(
        source: &mut (impl AsyncRead + Unpin + Send),
        what: &str,
    ) -> Result<FrameStart, Refusal> {
        let mut head = [0u8; FRAME_HEADER_MAX];
        let mut len = 0;
        while len < head.len() {
            let n = source
                .read(&mut head[len..])
                .await
                .map_err(|e| Refusal::invalid(format!("{what}: body stream failed: {e}")))?;
            if n == 0 {
                break;
            }
            len += n;
        }
        let window =
            frame_window(&head[..len]).map_err(|e| Refusal::invalid(format!("{what}: {e}")))?;
        if window > MAX_FRAME_WINDOW {
            return Err(Refusal::invalid(format!(
                "{what}: its zstd frame asks for a {window} byte window, more than the \
                 {MAX_FRAME_WINDOW} bytes a decoder accepts"
            )));
        }
        Ok(FrameStart { head, len, window })
    }

    /// The bytes read, to be read again before the rest of the body.
    pub(crate) fn bytes(&self) -> &[u8] {
        &self.head[..self.len]
    }

    /// What a streaming decoder of this frame holds.
    pub(crate) fn decoder_memory(&self) -> u64 {
        self.window + DECODER_OVERHEAD
    }
}

/// The window size a zstd frame header declares (RFC 8878 3.1.1.1): the window
/// descriptor, or the content size of a single-segment frame.
fn frame_window(head: &[u8]) -> Result<u64, String> {
    const MAGIC: [u8; 4] = [0x28, 0xB5, 0x2F, 0xFD];
    if head.len() < 5 || head[..4] != MAGIC {
        return Err("the body is not a zstd frame".into());
    }
    let descriptor = head[4];
    let single_segment = descriptor & 0x20 != 0;
    let short = || "the body ends inside its zstd frame header".to_string();
    if !single_segment {
        let w = *head.get(5).ok_or_else(short)?;
        let base = 1u64 << (10 + u32::from(w >> 3));
        return Ok(base + base / 8 * u64::from(w & 7));
    }
    let dictionary_id_len = [0, 1, 2, 4][usize::from(descriptor & 3)];
    let content_size_len = [1, 2, 4, 8][usize::from(descriptor >> 6)];
    let at = 5 + dictionary_id_len;
    let field = head.get(at..at + content_size_len).ok_or_else(short)?;
    let mut size = [0u8; 8];
    size[..content_size_len].copy_from_slice(field);
    let size = u64::from_le_bytes(size);
    Ok(if content_size_len == 2 {
        size + 256
    } else {
        size
    })
}

/// A `CHUNK_SIZE` read buffer, for handlers that read a body that many bytes at a time.
pub(crate) const READ_BUFFER: u64 = CHUNK_SIZE as u64;

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;

    #[test]
    fn frame_windows_are_read_from_real_frames() {
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        // Streaming without a known size: the level's window (level 3: 2 MiB).
        let mut enc = zstd::stream::Encoder::new(Vec::new(), 3).unwrap();
        std::io::Write::write_all(&mut enc, &data).unwrap();
        let frame = enc.finish().unwrap();
        assert_eq!(frame_window(&frame).unwrap(), 2 << 20);
        // A window asked for explicitly.
        let mut enc = zstd::stream::Encoder::new(Vec::new(), 3).unwrap();
        enc.window_log(24).unwrap();
        std::io::Write::write_all(&mut enc, &data).unwrap();
        let frame = enc.finish().unwrap();
        assert_eq!(frame_window(&frame).unwrap(), 16 << 20);
        // Small known sizes are single-segment frames: the window is the content.
        for len in [0usize, 10, 300, 70_000] {
            let frame = zstd::bulk::compress(&data[..len], 3).unwrap();
            let w = frame_window(&frame).unwrap();
            assert!(
                w >= len as u64 && w <= (len as u64).max(1024) * 2,
                "{len}: {w}"
            );
        }
        assert!(frame_window(b"not zstd at all").is_err());
        assert!(frame_window(&[0x28, 0xB5, 0x2F, 0xFD]).is_err());
    }

    #[tokio::test]
    async fn grants_wait_for_each_other_and_too_large_is_refused() {
        let budget = Arc::new(Budget::new(16));
        let body_bytes = u64::from(budget.body_kib) * 1024;
        let refused = budget
            .body(body_bytes + 1, "a test request")
            .await
            .err()
            .unwrap();
        assert_eq!(refused.code, ErrorCode::TooLarge);
        assert!(
            refused.message.contains("request_memory_mib = 16"),
            "{}",
            refused.message
        );
        let first = budget.body(body_bytes, "first").await.unwrap();
        assert!(
            budget.body(1 << 20, "second").now_or_never().is_none(),
            "a grant over what is left did not wait"
        );
        drop(first);
        let second = budget.body(1 << 20, "second").now_or_never();
        assert!(
            matches!(second, Some(Ok(_))),
            "the budget given back was not granted"
        );
        drop(second);
        assert_eq!(budget.bodies_in_use(), 0);
        // The largest frame always fits the header pool.
        let _h = budget.header(MAX_FRAME_LEN as usize).await;
    }
}
