//! Reply plumbing: a handler's answer onto a QUIC stream.
//!
//! A [`Reply`] becomes one response frame (a refusal an `Error` frame, and so does an
//! answer over the frame limit), after telling the peer to stop sending whatever body is
//! left. A [`Streamed`] answer is its frame, then
//! its body, then FIN; a failure while the body is sent (storage, a client that went
//! away, or one that takes no data for `body_idle_timeout_secs`: each write must make
//! progress within it) resets the stream, so the client sees an interrupted download,
//! never a short one. Neither waits more than [`RESPONSE_DELIVERY_TIMEOUT`] for the client to take
//! the end of the answer: a client that vanished must not hold shutdown hostage.

use std::time::Duration;

use anyhow::{Context, Result};
use futures::StreamExt;
use walvault_protocol::core::wire::{self, ErrorCode, Response};
use walvault_protocol::net::transport::write_frame;

use crate::service::{Refusal, Reply, Streamed};

/// How long a finished response may take to be acknowledged by the client before the
/// request stops counting as in flight.
const RESPONSE_DELIVERY_TIMEOUT: Duration = Duration::from_secs(2);

/// Sends a one-frame answer and finishes the stream.
pub(crate) async fn respond(
    mut send: quinn::SendStream,
    recv: Option<quinn::RecvStream>,
    reply: Reply,
) {
    let response = match reply {
        Ok(r) => r,
        Err(Refusal { code, message }) => Response::Error { code, message },
    };
    if let Some(mut recv) = recv {
        // Whatever body is left is not wanted; tell the peer to stop sending it.
        let _ = recv.stop(0u32.into());
    }
    let _ = send.write_all(&answer_frame(&response)).await;
    let _ = send.finish();
    let _ = tokio::time::timeout(RESPONSE_DELIVERY_TIMEOUT, send.stopped()).await;
}

/// The frame of an answer, or of a `TooLarge` refusal saying why it cannot be sent: the
/// encoder refuses a frame over the limit, and a client must not be left with a stream
/// that ends without an answer. Paged requests keep every answer far below the limit.
fn answer_frame(response: &Response) -> Vec<u8> {
    match wire::encode_frame(response) {
        Ok(frame) => frame,
        Err(e) => {
            tracing::error!(error = %e, "an answer exceeds the frame limit; refused");
            let refusal = Response::Error {
                code: ErrorCode::TooLarge,
                message: format!(
                    "the answer is too large to send ({e}); ask for it in pages (a newer client does)"
                ),
            };
            // A short refusal always fits.
            wire::encode_frame(&refusal).unwrap_or_default()
        }
    }
}

/// Sends an answer with a body: the frame, the body, FIN (or a reset on failure); each
/// write must make progress within `idle`. The body bytes sent, or `None` when sending
/// failed.
pub(crate) async fn send_streamed(
    mut send: quinn::SendStream,
    answer: Streamed,
    idle: Duration,
) -> Option<u64> {
    let Streamed {
        response,
        mut body,
        what,
    } = answer;
    let mut streamed: Result<()> = write_frame(&mut send, &response)
        .await
        .context("sending response");
    let mut sent = 0u64;
    while streamed.is_ok() {
        let Some(chunk) = body.next().await else {
            break;
        };
        streamed = match chunk {
            Ok(c) => {
                sent += c.len() as u64;
                match tokio::time::timeout(idle, send.write_chunk(c)).await {
                    Ok(written) => written.context("client went away"),
                    Err(_) => Err(anyhow::anyhow!(
                        "the client took no data for {} s (body_idle_timeout_secs)",
                        idle.as_secs()
                    )),
                }
            }
            Err(e) => Err(e),
        };
    }
    match streamed {
        Ok(()) => {
            let _ = send.finish();
            let _ = tokio::time::timeout(RESPONSE_DELIVERY_TIMEOUT, send.stopped()).await;
            Some(sent)
        }
        Err(e) => {
            tracing::warn!(%what, error = %format!("{e:#}"), "sending object failed");
            let _ = send.reset(1u32.into());
            None
        }
    }
}
