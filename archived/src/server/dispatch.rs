//! One request per bidirectional stream: read its frame (within
//! [`REQUEST_HEADER_TIMEOUT`]), refuse it while shutting down, check that the certificate
//! may touch the cluster it names, and hand it to its handler (service/) with the rest of
//! the stream as its body, every read of which must make progress within
//! `body_idle_timeout_secs` (body.rs). A request whose body stalls is logged (cluster,
//! operation, bytes received) and its stream reset with [`RESET_BODY_STALLED`]: no
//! answer, and nothing of it stored (its handler failed as on any broken body).
//!
//! Memory: the frame's header grant is taken from its length prefix before the frame is
//! read and held for the whole request; listings and other one-frame answers up to the
//! frame limit hold `ANSWER_MEMORY` until sent (service/budget.rs).

use std::time::Duration;

use tokio::time::Instant;
use walvault_protocol::core::format::names;
use walvault_protocol::core::wire::audit::Step;
use walvault_protocol::core::wire::{self, ErrorCode, FrameError, Request, Response};
use walvault_protocol::net::pki::ClientIdentity;

use super::body::IdleReader;
use super::rpc::{respond, send_streamed};
use crate::ops::metrics::Metrics;
use crate::service::backups::ManifestUpload;
use crate::service::budget::{Budget, Grant, ANSWER_MEMORY};
use crate::service::retention::RetentionRequest;
use crate::service::wal::WalUpload;
use crate::service::Archive;
use crate::service::{self, Refusal, StreamReply};

/// How long a client may take to send its request frame.
const REQUEST_HEADER_TIMEOUT: Duration = Duration::from_secs(30);

/// The QUIC application error code of a stream reset because its request body stalled
/// for `body_idle_timeout_secs`.
pub(super) const RESET_BODY_STALLED: u32 = 2;

/// Answers the request on one stream; `shutting_down` refuses it as `Unavailable`;
/// every body read must progress within `body_idle`.
pub(super) async fn handle_stream(
    archive: &Archive,
    metrics: &Metrics,
    shutting_down: impl Fn() -> bool,
    body_idle: Duration,
    identity: &ClientIdentity,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let (request, _header) = match read_request(&mut recv, &archive.budget).await {
        Ok(r) => r,
        Err(HeaderError::Frame(e)) => {
            let code = if matches!(e, FrameError::TooLarge(_)) {
                ErrorCode::TooLarge
            } else {
                ErrorCode::Invalid
            };
            tracing::warn!(cluster = %identity.cluster, error = %e, "bad request frame");
            respond(send, Some(recv), Err(Refusal::new(code, e.to_string()))).await;
            return;
        }
        Err(HeaderError::Stream(e)) => {
            tracing::debug!(error = %e, "stream failed before a request arrived");
            return;
        }
        Err(HeaderError::Late) => {
            let refusal = Refusal::invalid("no request header within 30 s");
            respond(send, Some(recv), Err(refusal)).await;
            return;
        }
    };
    let started = Instant::now();
    if shutting_down() {
        let reply = Err(Refusal::new(
            ErrorCode::Unavailable,
            "archived is shutting down; retry shortly",
        ));
        respond(send, Some(recv), reply).await;
        return;
    }
    let op = request.op();
    if let Some(cluster) = request.cluster() {
        if let Err(m) = names::validate_cluster_name(cluster) {
            respond(send, Some(recv), Err(Refusal::invalid(m))).await;
            return;
        }
        if !identity.may_access(cluster) {
            let msg = format!(
                "certificate for cluster '{}' ({}) may not access cluster '{cluster}'",
                identity.cluster, identity.role
            );
            tracing::warn!(%op, %msg, "unauthorized");
            if let Request::PutWal {
                name,
                raw_size,
                blake3,
                request_id,
                ..
            } = &request
            {
                if archive.index.binding(cluster).ok().flatten().is_some() {
                    let provenance = crate::service::audit::Provenance {
                        request: request_id.clone(),
                        peer: identity.peer(),
                    };
                    let mut r = provenance.record(cluster, name, Step::Refused);
                    r.size = Some(*raw_size);
                    r.blake3 = Some(blake3.clone());
                    r.detail = Some(format!("Unauthorized: {msg}"));
                    crate::service::audit::note(&archive.index, r);
                }
            }
            metrics.request(op, "refused", started.elapsed().as_secs_f64(), 0);
            respond(
                send,
                Some(recv),
                Err(Refusal::new(ErrorCode::Unauthorized, msg)),
            )
            .await;
            return;
        }
    }
    // One-frame answers that can be large (up to the frame limit) hold their memory
    // until they are sent; the other handlers take theirs themselves.
    let _answer = match request {
        Request::ListWal { .. }
        | Request::ListBackups { .. }
        | Request::ChunksMissing { .. }
        | Request::Retention { .. } => match archive.budget.body(ANSWER_MEMORY, op).await {
            Ok(grant) => Some(grant),
            Err(refusal) => {
                respond(send, Some(recv), Err(refusal)).await;
                return;
            }
        },
        _ => None,
    };
    let ctx = archive.ctx(identity);
    if let Request::StreamSession {
        cluster,
        system_identifier,
        segment_size,
    } = &request
    {
        // A long-lived exchange of its own: appends and acknowledgements, no one answer.
        let session = service::stream::Session {
            cluster,
            system_identifier: *system_identifier,
            segment_size: *segment_size,
        };
        let mut recv = recv;
        service::stream::session(&ctx, &session, &mut recv, send, body_idle, &shutting_down).await;
        return;
    }
    let answering = Answering {
        idle: body_idle,
        metrics,
        op,
        started,
    };
    let cluster_name = request.cluster().unwrap_or_default().to_string();
    let mut body = IdleReader::new(recv, body_idle);
    let recv = &mut body;
    let reply = match request {
        Request::PutWal {
            cluster,
            name,
            raw_size,
            blake3,
            ready_files,
            request_id,
        } => {
            let upload = WalUpload {
                cluster: &cluster,
                name: &name,
                raw_size,
                blake3: &blake3,
                request: request_id.as_deref(),
                via: None,
            };
            let reply = service::wal::ingest(&ctx, &upload, recv).await;
            match &reply {
                Ok(Response::Stored { already_present }) => {
                    if let Some(n) = ready_files {
                        metrics.ready_files(&cluster, n);
                    }
                    tracing::info!(%cluster, %name, already_present, request = request_id.as_deref().unwrap_or("-"), "stored")
                }
                Err(r) => {
                    tracing::warn!(%cluster, %name, code = ?r.code, message = %r.message, request = request_id.as_deref().unwrap_or("-"), "push refused")
                }
                _ => {}
            }
            reply
        }
        Request::GetWal {
            cluster,
            name,
            request_id,
            purpose,
        } => {
            let answer = service::wal::get(&ctx, &cluster, &name).await;
            let object = match &answer {
                Ok(s) => match &s.response {
                    Response::Object {
                        raw_size,
                        blake3,
                        partial_bytes,
                        ..
                    } => Some((*raw_size, blake3.clone(), *partial_bytes)),
                    _ => None,
                },
                Err(_) => None,
            };
            let sending = Instant::now();
            let sent = answering.streamed(send, body.into_inner(), answer).await;
            if let (true, Some((raw_size, blake3, partial_bytes))) = (sent, object) {
                let provenance = crate::service::audit::Provenance {
                    request: request_id,
                    peer: identity.peer(),
                };
                let what = crate::service::audit::Sent {
                    cluster: &cluster,
                    name: &name,
                    purpose: purpose.unwrap_or_default(),
                    raw_size,
                    blake3,
                    partial_bytes,
                    took: sending.elapsed(),
                };
                crate::service::audit::sent(&archive.index, &provenance, &what);
            }
            return;
        }
        Request::WalHistory { cluster, name } => {
            crate::service::audit::history(&ctx, &cluster, &name)
        }
        Request::Audit {
            cluster,
            since_us,
            after,
        } => crate::service::audit::since(&ctx, &cluster, since_us, after.as_deref()),
        Request::ListWal {
            cluster,
            after,
            paged,
        } => service::wal::list(&ctx, &cluster, after.as_deref(), paged).await,
        request @ Request::StreamAppend { .. } => {
            let append = service::stream::Append::of(&request).expect("a stream append");
            let reply = service::stream::append(&ctx, &append, recv).await;
            if let Err(r) = &reply {
                tracing::warn!(cluster = %append.cluster, segment = %append.segment, offset = append.offset, code = ?r.code, message = %r.message, "stream append refused");
            }
            reply
        }
        Request::StreamSession { .. } => unreachable!("answered above"),
        Request::StreamSeal { cluster, segment } => {
            service::stream::seal(&ctx, &cluster, &segment).await
        }
        Request::BeginBackup { cluster } => service::backups::begin_backup(&ctx, &cluster),
        Request::ChunksMissing {
            cluster,
            hashes,
            lease,
        } => service::backups::chunks_missing(&ctx, &cluster, hashes, lease.as_deref()).await,
        Request::PutChunk {
            cluster,
            blake3,
            raw_size,
            lease,
        } => {
            service::backups::put_chunk(&ctx, &cluster, &blake3, raw_size, lease.as_deref(), recv)
                .await
        }
        Request::PutPack {
            cluster,
            chunks,
            lease,
        } => service::backups::put_pack(&ctx, &cluster, chunks, lease.as_deref(), recv).await,
        Request::GetChunks { cluster, hashes } => {
            let answer = service::backups::get_chunks(&ctx, &cluster, hashes).await;
            answering.streamed(send, body.into_inner(), answer).await;
            return;
        }
        Request::PutBackup {
            cluster,
            backup_id,
            raw_size,
            blake3,
            lease,
        } => {
            let upload = ManifestUpload {
                cluster: &cluster,
                backup_id: &backup_id,
                raw_size,
                blake3: &blake3,
                lease: lease.as_deref(),
            };
            let reply = service::backups::put_backup(&ctx, &upload, recv).await;
            match &reply {
                Ok(_) => tracing::info!(%cluster, %backup_id, "backup committed"),
                Err(r) => {
                    tracing::warn!(%cluster, %backup_id, code = ?r.code, message = %r.message, "backup refused")
                }
            }
            reply
        }
        Request::GetBackup { cluster, backup_id } => {
            let answer = service::backups::get_backup(&ctx, &cluster, &backup_id).await;
            answering.streamed(send, body.into_inner(), answer).await;
            return;
        }
        Request::ListBackups {
            cluster,
            after,
            paged,
        } => service::backups::list(&ctx, &cluster, after.as_deref(), paged).await,
        Request::BackupState { cluster, backup_id } => {
            service::backups::state(&ctx, &cluster, &backup_id).await
        }
        Request::DeleteBackup { cluster, backup_id } => {
            service::backups::delete(&ctx, &cluster, &backup_id).await
        }
        Request::Retention {
            cluster,
            keep_full,
            keep_within_secs,
            chunk_grace_secs,
            dry_run,
            window_end,
        } => {
            let r = RetentionRequest {
                cluster: cluster.as_deref(),
                keep_full,
                keep_within_secs,
                chunk_grace_secs,
                dry_run,
                window_end,
            };
            service::retention::request(&ctx, &r).await
        }
        Request::Status { cluster } => {
            let now = crate::clock::unix_now();
            crate::ops::status::request(archive, metrics, identity, cluster.as_deref(), now).await
        }
        Request::RecordVerify { cluster, run } => {
            crate::service::record_verify(&ctx, &cluster, &run).await
        }
        Request::Check { cluster } => {
            let now = crate::clock::unix_now();
            match crate::ops::check::run(archive, &cluster, now).await {
                Ok(checks) => Ok(Response::Checks { checks }),
                Err(e) => Err(Refusal::internal(e)),
            }
        }
        Request::Ping => Ok(Response::Pong {
            cluster: identity.cluster.clone(),
            role: identity.role.to_string(),
            version: walvault_protocol::VERSION.to_string(),
        }),
    };
    if body.stalled() {
        tracing::warn!(
            cluster = %cluster_name,
            %op,
            received = body.received(),
            idle_secs = body_idle.as_secs(),
            "request body stalled: no data for idle_secs (body_idle_timeout_secs); \
             request dropped, stream reset, nothing stored"
        );
        let mut recv = body.into_inner();
        let _ = recv.stop(RESET_BODY_STALLED.into());
        let _ = send.reset(RESET_BODY_STALLED.into());
        return;
    }
    metrics.request(
        op,
        crate::ops::metrics::result_of(&reply),
        started.elapsed().as_secs_f64(),
        body.received(),
    );
    respond(send, Some(body.into_inner()), reply).await;
}

/// Why no request was read.
enum HeaderError {
    /// Too large, malformed or cut short.
    Frame(FrameError),
    /// The stream failed.
    Stream(quinn::ReadExactError),
    /// Not within [`REQUEST_HEADER_TIMEOUT`].
    Late,
}

/// Reads the request frame and takes its header grant, from its length prefix and
/// before the frame is read. Reading has [`REQUEST_HEADER_TIMEOUT`]; waiting for the
/// grant does not count.
async fn read_request(
    recv: &mut quinn::RecvStream,
    budget: &Budget,
) -> Result<(Request, Grant), HeaderError> {
    async fn read_by(
        recv: &mut quinn::RecvStream,
        buf: &mut [u8],
        deadline: Instant,
    ) -> Result<(), HeaderError> {
        match tokio::time::timeout_at(deadline, recv.read_exact(buf)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(quinn::ReadExactError::FinishedEarly(_))) => {
                Err(HeaderError::Frame(FrameError::Truncated))
            }
            Ok(Err(e)) => Err(HeaderError::Stream(e)),
            Err(_) => Err(HeaderError::Late),
        }
    }
    let mut deadline = Instant::now() + REQUEST_HEADER_TIMEOUT;
    let mut prefix = [0u8; 4];
    read_by(recv, &mut prefix, deadline).await?;
    let len = wire::frame_len(prefix).map_err(HeaderError::Frame)?;
    let waiting = Instant::now();
    let grant = budget.header(len).await;
    deadline += waiting.elapsed();
    let mut payload = vec![0u8; len];
    read_by(recv, &mut payload, deadline).await?;
    let request = wire::decode_frame(&payload).map_err(HeaderError::Frame)?;
    Ok((request, grant))
}

/// How a request's answer with a body is sent and counted.
struct Answering<'a> {
    idle: Duration,
    metrics: &'a Metrics,
    op: &'static str,
    started: Instant,
}

impl Answering<'_> {
    /// Sends an answer with a body (or its refusal), counted in the metrics; whether the
    /// whole body was sent.
    async fn streamed(
        &self,
        send: quinn::SendStream,
        recv: quinn::RecvStream,
        answer: StreamReply,
    ) -> bool {
        let result = match answer {
            Ok(s) => match send_streamed(send, s, self.idle).await {
                Some(sent) => {
                    self.metrics.sent(self.op, sent);
                    "ok"
                }
                None => "error",
            },
            Err(r) => {
                let result = crate::ops::metrics::refusal_result(r.code);
                respond(send, Some(recv), Err(r)).await;
                result
            }
        };
        let seconds = self.started.elapsed().as_secs_f64();
        self.metrics.request(self.op, result, seconds, 0);
        result == "ok"
    }
}
