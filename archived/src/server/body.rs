//! A request body as handlers read it: the rest of the stream, where every read must
//! make progress within `body_idle_timeout_secs` (archived.toml).
//!
//! A read that waits longer fails with `TimedOut`; the handler then fails the request
//! the way it fails any broken body (its pending object is dropped: nothing is stored,
//! nothing indexed), and the dispatcher, seeing [`IdleReader::stalled`], logs the
//! request it gave up and resets the stream instead of answering. The clock of a read
//! starts when the handler asks for it, so time the handler spends between reads
//! (storing, waiting for the memory budget) is never the client's.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, ReadBuf};
use tokio::time::{Instant, Sleep};

/// `inner` with an idle timeout on every read, counting the bytes read.
pub(super) struct IdleReader<R> {
    inner: R,
    idle: Duration,
    /// The deadline of the read in progress; `None` between reads.
    deadline: Option<Pin<Box<Sleep>>>,
    received: u64,
    stalled: bool,
}

impl<R> IdleReader<R> {
    pub(super) fn new(inner: R, idle: Duration) -> IdleReader<R> {
        IdleReader {
            inner,
            idle,
            deadline: None,
            received: 0,
            stalled: false,
        }
    }

    /// The stream, for the answer.
    pub(super) fn into_inner(self) -> R {
        self.inner
    }

    /// Body bytes read so far.
    pub(super) fn received(&self) -> u64 {
        self.received
    }

    /// Whether a read waited longer than the idle timeout.
    pub(super) fn stalled(&self) -> bool {
        self.stalled
    }

    fn timed_out(&self) -> std::io::Error {
        std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!(
                "no body data for {} s (body_idle_timeout_secs)",
                self.idle.as_secs()
            ),
        )
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for IdleReader<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if this.stalled {
            return Poll::Ready(Err(this.timed_out()));
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(done) => {
                this.received += (buf.filled().len() - before) as u64;
                this.deadline = None;
                Poll::Ready(done)
            }
            Poll::Pending => {
                let idle = this.idle;
                let deadline = this.deadline.get_or_insert_with(|| {
                    Box::pin(tokio::time::sleep_until(Instant::now() + idle))
                });
                match deadline.as_mut().poll(cx) {
                    Poll::Ready(()) => {
                        this.stalled = true;
                        this.deadline = None;
                        Poll::Ready(Err(this.timed_out()))
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Reads that progress never time out however long the body takes; a read that
    /// waits longer than the timeout fails as `TimedOut` and the reader says it stalled;
    /// time between reads is not counted.
    #[tokio::test(start_paused = true)]
    async fn each_read_must_progress_within_the_timeout() {
        let (mut client, server) = tokio::io::duplex(64);
        let mut body = IdleReader::new(server, Duration::from_secs(2));
        let writer = tokio::spawn(async move {
            for _ in 0..5 {
                tokio::time::sleep(Duration::from_millis(1500)).await;
                client.write_all(b"0123456789").await.unwrap();
            }
            // 11 s later (the reader is busy for 10 s of them), once more; then stall
            // without closing.
            tokio::time::sleep(Duration::from_secs(11)).await;
            client.write_all(b"0123456789").await.unwrap();
            tokio::time::sleep(Duration::from_secs(3600)).await;
            drop(client);
        });
        let mut buf = [0u8; 10];
        for _ in 0..5 {
            body.read_exact(&mut buf).await.unwrap();
        }
        // The handler is busy for longer than the timeout: not the client's fault, and
        // the next read has its own 2 s.
        tokio::time::sleep(Duration::from_secs(10)).await;
        body.read_exact(&mut buf).await.unwrap();
        assert_eq!(body.received(), 60);
        let e = body.read(&mut buf).await.unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
        assert!(body.stalled());
        assert_eq!(body.received(), 60);
        assert!(body.read(&mut buf).await.is_err(), "a stalled body read on");
        writer.abort();
    }
}
