//! The QUIC server: one request per bidirectional stream, authorized by the client
//! certificate, answered only after the effect is durable.
//!
//! Contract of `PutWal`: the response is `Stored` only once the object is durably in the
//! store (create-only) and its catalog entry is flushed. The body is verified on the way
//! in (zstd frame complete, size and blake3 as announced, WAL header consistent with the
//! name and with the cluster's binding); anything else gets an `Error` and leaves
//! neither an object nor a catalog entry behind.
//!
//! Bounds: at most `max_connections` connections, `MAX_STREAMS_PER_CONNECTION`
//! requests each; a WAL or manifest request buffers at most [`CHUNK_SIZE`] of body (plus
//! QUIC's per-stream window) however large the object; a backup chunk (at most 1 MiB)
//! is held whole while it is verified, a pack about 2 MiB of its chunks at a time.
//! SIGTERM/SIGINT: new connections and requests are refused, in-flight requests get
//! `shutdown_grace_secs` to finish, and whatever has not finished by then is dropped
//! unacknowledged.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use futures::stream::BoxStream;
use futures::StreamExt;
use tokio::sync::{Mutex, Notify, Semaphore};
use walvault_protocol::core::format::codec::{DecodeOrSinkError, VerifyingDecoder, CHUNK_SIZE};
use walvault_protocol::core::pg::wal::{validate_wal_file, LongPageHeader, WalFileName};
use walvault_protocol::core::wire::{
    self, ErrorCode, FrameError, Request, Response, MAX_OBJECT_SIZE,
};
use walvault_protocol::net::pki::{client_identity, ClientIdentity, Role};
use walvault_protocol::net::transport::{read_frame, write_frame, ReadFrameError};

use crate::catalog::{Catalog, ClusterBinding, WalEntry};
use crate::settings::DataDir;
use crate::store::{self, CreateOutcome, ObjectHeader, Store};

/// How long a finished response may take to be acknowledged by the client before the
/// request stops counting as in flight.
const RESPONSE_DELIVERY_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a client may take to send its request frame.
const REQUEST_HEADER_TIMEOUT: Duration = Duration::from_secs(30);

/// A failed request: what the client is told.
#[derive(Debug)]
pub(crate) struct Refusal {
    pub(crate) code: ErrorCode,
    pub(crate) message: String,
}

impl Refusal {
    pub(crate) fn new(code: ErrorCode, message: impl Into<String>) -> Refusal {
        Refusal {
            code,
            message: message.into(),
        }
    }
    pub(crate) fn internal(e: anyhow::Error) -> Refusal {
        tracing::error!(error = %format!("{e:#}"), "request failed");
        Refusal::new(ErrorCode::Internal, format!("archive-side failure: {e:#}"))
    }
}

pub(crate) type Reply = std::result::Result<Response, Refusal>;

/// Counts requests in flight so shutdown can wait for them.
#[derive(Default)]
struct InFlight {
    count: AtomicUsize,
    idle: Notify,
}

struct InFlightGuard<'a>(&'a InFlight);

impl InFlight {
    fn enter(&self) -> InFlightGuard<'_> {
        self.count.fetch_add(1, Ordering::SeqCst);
        InFlightGuard(self)
    }
    async fn wait_idle(&self) {
        while self.count.load(Ordering::SeqCst) > 0 {
            let notified = self.idle.notified();
            if self.count.load(Ordering::SeqCst) == 0 {
                break;
            }
            notified.await;
        }
    }
}

impl Drop for InFlightGuard<'_> {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// Shared server state.
pub struct ArchiveState {
    store: Store,
    catalog: Catalog,
    shutting_down: AtomicBool,
    inflight: InFlight,
    binding_lock: Mutex<()>,
    backups: crate::backups::BackupService,
}

/// Runs the server until SIGTERM/SIGINT. With `listen_address_file`, the bound address
/// is written there (atomically: a temp file renamed over it) before the first connection
/// is accepted, so a caller that let the kernel pick the port (`listen` port 0) can wait
/// for the file instead of guessing a free port.
pub async fn serve(dir: &DataDir, listen_address_file: Option<&Path>) -> Result<()> {
    walvault_protocol::net::transport::install_crypto_provider();
    let cfg = dir.load_config()?;
    let options: Vec<(String, String)> = cfg.storage_options.clone().into_iter().collect();
    let store = Store::open(&cfg.storage, &options, &dir.store(), &dir.spool())?;
    let removed = store.remove_stale_temp_files().await?;
    if removed > 0 {
        tracing::info!(
            removed,
            "removed temporary files of uploads that never completed"
        );
    }
    let catalog = Catalog::open_or_rebuild(&dir.catalog(), &store).await?;
    let tls = dir.server_cert()?;
    let ca_pem =
        std::fs::read_to_string(dir.tls().join("ca.pem")).context("cannot read tls/ca.pem")?;
    let addr: SocketAddr = cfg.listen.parse()?;
    let endpoint = walvault_protocol::net::transport::server_endpoint(
        addr,
        &tls.cert_pem,
        &tls.key_pem,
        &ca_pem,
    )?;
    let bound = endpoint.local_addr()?;
    if let Some(path) = listen_address_file {
        write_listen_address(path, bound)?;
    }
    tracing::info!(listen = %bound, store = %store.describe(), "archived is serving");

    let state = Arc::new(ArchiveState {
        store,
        catalog,
        shutting_down: AtomicBool::new(false),
        inflight: InFlight::default(),
        binding_lock: Mutex::new(()),
        backups: crate::backups::BackupService::new(cfg.retention.clone()),
    });
    let connections = Arc::new(Semaphore::new(cfg.max_connections.max(1)));
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    loop {
        tokio::select! {
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                let Ok(permit) = connections.clone().try_acquire_owned() else {
                    tracing::warn!(peer = %incoming.remote_address(), "connection limit reached; refusing");
                    incoming.refuse();
                    continue;
                };
                let state = state.clone();
                tokio::spawn(async move {
                    handle_connection(state, incoming).await;
                    drop(permit);
                });
            }
            _ = sigterm.recv() => { tracing::info!("SIGTERM: shutting down"); break; }
            _ = sigint.recv() => { tracing::info!("SIGINT: shutting down"); break; }
        }
    }
    state.shutting_down.store(true, Ordering::SeqCst);
    endpoint.set_server_config(None);
    let grace = Duration::from_secs(cfg.shutdown_grace_secs);
    if tokio::time::timeout(grace, state.inflight.wait_idle())
        .await
        .is_err()
    {
        tracing::warn!(
            inflight = state.inflight.count.load(Ordering::SeqCst),
            "requests still running after the shutdown grace period; they are dropped unacknowledged"
        );
    }
    endpoint.close(0u32.into(), b"archived shutting down");
    state.catalog.flush().await?;
    let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
    tracing::info!("archived stopped");
    Ok(())
}

/// Writes `addr` and a newline to `path` through a temp file beside it, so a reader sees
/// either no file, the previous content or the whole address, never a partial line.
fn write_listen_address(path: &Path, addr: SocketAddr) -> Result<()> {
    let tmp = walvault_protocol::net::fsutil::temp_path_beside(path);
    let written =
        std::fs::write(&tmp, format!("{addr}\n")).and_then(|()| std::fs::rename(&tmp, path));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written.with_context(|| {
        format!(
            "cannot write the listen address to {} (--listen-address-file): is its directory writable?",
            path.display()
        )
    })
}

async fn handle_connection(state: Arc<ArchiveState>, incoming: quinn::Incoming) {
    let peer = incoming.remote_address();
    let connection = match incoming.await {
        Ok(c) => c,
        Err(e) => {
            tracing::info!(%peer, error = %e, "handshake refused");
            return;
        }
    };
    let identity = match peer_identity(&connection) {
        Ok(id) => id,
        Err(message) => {
            tracing::warn!(%peer, %message, "refusing connection");
            connection.close(1u32.into(), message.as_bytes());
            return;
        }
    };
    tracing::debug!(%peer, cluster = %identity.cluster, role = %identity.role, "client connected");
    let mut streams = tokio::task::JoinSet::new();
    loop {
        let (send, recv) = match connection.accept_bi().await {
            Ok(streams) => streams,
            Err(reason) => {
                tracing::debug!(%peer, %reason, "connection closed");
                break;
            }
        };
        let state = state.clone();
        let identity = identity.clone();
        streams.spawn(async move { handle_stream(&state, &identity, send, recv).await });
        // Reap finished requests; quinn caps open streams at MAX_STREAMS_PER_CONNECTION.
        while streams.try_join_next().is_some() {}
    }
    while streams.join_next().await.is_some() {}
}

fn peer_identity(connection: &quinn::Connection) -> std::result::Result<ClientIdentity, String> {
    let alpn = connection
        .handshake_data()
        .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|d| d.protocol);
    if alpn.as_deref() != Some(wire::ALPN) {
        return Err("unsupported protocol version (ALPN)".into());
    }
    let certs = connection
        .peer_identity()
        .and_then(|i| {
            i.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
                .ok()
        })
        .ok_or("no client certificate")?;
    let leaf = certs.first().ok_or("empty client certificate chain")?;
    client_identity(leaf)
}

async fn handle_stream(
    state: &ArchiveState,
    identity: &ClientIdentity,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let _guard = state.inflight.enter();
    let request = match tokio::time::timeout(
        REQUEST_HEADER_TIMEOUT,
        read_frame::<Request>(&mut recv),
    )
    .await
    {
        Ok(Ok(r)) => r,
        Ok(Err(ReadFrameError::Frame(e))) => {
            let code = if matches!(e, FrameError::TooLarge(_)) {
                ErrorCode::TooLarge
            } else {
                ErrorCode::Invalid
            };
            tracing::warn!(cluster = %identity.cluster, error = %e, "bad request frame");
            respond(send, Some(recv), Err(Refusal::new(code, e.to_string()))).await;
            return;
        }
        Ok(Err(ReadFrameError::Stream(e))) => {
            tracing::debug!(error = %e, "stream failed before a request arrived");
            return;
        }
        Err(_) => {
            respond(
                send,
                Some(recv),
                Err(Refusal::new(
                    ErrorCode::Invalid,
                    "no request header within 30 s",
                )),
            )
            .await;
            return;
        }
    };
    if state.shutting_down.load(Ordering::SeqCst) {
        let reply = Err(Refusal::new(
            ErrorCode::Unavailable,
            "archived is shutting down; retry shortly",
        ));
        respond(send, Some(recv), reply).await;
        return;
    }
    let op = request.op();
    if let Some(cluster) = request.cluster() {
        if let Err(m) = walvault_protocol::core::format::names::validate_cluster_name(cluster) {
            respond(send, Some(recv), Err(Refusal::new(ErrorCode::Invalid, m))).await;
            return;
        }
        if !identity.may_access(cluster) {
            let msg = format!(
                "certificate for cluster '{}' ({}) may not access cluster '{cluster}'",
                identity.cluster, identity.role
            );
            tracing::warn!(%op, %msg, "unauthorized");
            respond(
                send,
                Some(recv),
                Err(Refusal::new(ErrorCode::Unauthorized, msg)),
            )
            .await;
            return;
        }
    }
    match request {
        Request::PutWal {
            cluster,
            name,
            raw_size,
            blake3,
        } => {
            let reply = put_wal(
                state, identity, &cluster, &name, raw_size, &blake3, &mut recv,
            )
            .await;
            match &reply {
                Ok(Response::Stored { already_present }) => {
                    tracing::info!(%cluster, %name, already_present, "stored")
                }
                Err(r) => {
                    tracing::warn!(%cluster, %name, code = ?r.code, message = %r.message, "push refused")
                }
                _ => {}
            }
            respond(send, Some(recv), reply).await;
        }
        Request::GetWal { cluster, name } => {
            if let Err(r) = get_wal(state, &cluster, &name, &mut send).await {
                respond(send, Some(recv), Err(r)).await;
            }
        }
        Request::ListWal { cluster } => {
            let reply = state
                .catalog
                .listing(&cluster)
                .map(Response::WalList)
                .map_err(Refusal::internal);
            respond(send, Some(recv), reply).await;
        }
        backup_request @ (Request::ChunksMissing { .. }
        | Request::PutChunk { .. }
        | Request::PutPack { .. }
        | Request::GetChunks { .. }
        | Request::PutBackup { .. }
        | Request::GetBackup { .. }
        | Request::ListBackups { .. }
        | Request::DeleteBackup { .. }
        | Request::Retention { .. }) => {
            crate::backups::handle(
                &state.store,
                &state.catalog,
                &state.backups,
                identity,
                backup_request,
                send,
                recv,
            )
            .await;
        }
        Request::Ping => {
            let reply = Ok(Response::Pong {
                cluster: identity.cluster.clone(),
                role: identity.role.to_string(),
                version: walvault_protocol::VERSION.to_string(),
            });
            respond(send, Some(recv), reply).await;
        }
    }
}

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
    let _ = write_frame(&mut send, &response).await;
    let _ = send.finish();
    // Bounded: a client that vanished without closing must not hold shutdown hostage.
    let _ = tokio::time::timeout(RESPONSE_DELIVERY_TIMEOUT, send.stopped()).await;
}

fn parse_name(name: &str) -> std::result::Result<WalFileName, Refusal> {
    name.parse::<WalFileName>()
        .map_err(|e| Refusal::new(ErrorCode::Invalid, e.to_string()))
}

#[allow(clippy::too_many_arguments)]
async fn put_wal(
    state: &ArchiveState,
    identity: &ClientIdentity,
    cluster: &str,
    name: &str,
    raw_size: u64,
    blake3: &str,
    recv: &mut quinn::RecvStream,
) -> Reply {
    if !matches!(identity.role, Role::Push | Role::Admin) {
        return Err(Refusal::new(
            ErrorCode::Unauthorized,
            format!(
                "a {} certificate may not write WAL; issue a push certificate",
                identity.role
            ),
        ));
    }
    let wal_name = parse_name(name)?;
    if raw_size > MAX_OBJECT_SIZE {
        return Err(Refusal::new(
            ErrorCode::TooLarge,
            format!("{name}: {raw_size} bytes exceeds the {MAX_OBJECT_SIZE} byte limit"),
        ));
    }
    let mut hash = [0u8; 32];
    hex::decode_to_slice(blake3, &mut hash)
        .map_err(|_| Refusal::new(ErrorCode::Invalid, "blake3 must be 64 hex digits"))?;

    if let Some(existing) = state
        .catalog
        .wal(cluster, &wal_name)
        .map_err(Refusal::internal)?
    {
        return if existing.blake3.eq_ignore_ascii_case(blake3) {
            Ok(Response::Stored {
                already_present: true,
            })
        } else {
            Err(conflict(cluster, name, &existing.blake3, blake3))
        };
    }

    let key = store::wal_key(cluster, &wal_name);
    let mut pending = state.store.begin(&key).await.map_err(Refusal::internal)?;
    let mut decoder = VerifyingDecoder::new(raw_size).map_err(|e| Refusal::internal(e.into()))?;
    let mut batch: Vec<u8> = Vec::with_capacity(CHUNK_SIZE);
    let invalid = |e: DecodeOrSinkError<std::convert::Infallible>| {
        Refusal::new(
            ErrorCode::Invalid,
            format!("{name}: body is not the announced file: {e}"),
        )
    };
    loop {
        let chunk = recv.read_chunk(CHUNK_SIZE, true).await.map_err(|e| {
            Refusal::new(
                ErrorCode::Invalid,
                format!("{name}: body stream failed: {e}"),
            )
        })?;
        let end = chunk.is_none();
        if let Some(c) = chunk {
            if pending.written() + batch.len() as u64 + c.bytes.len() as u64 > MAX_OBJECT_SIZE {
                return Err(Refusal::new(
                    ErrorCode::TooLarge,
                    format!("{name}: body exceeds {MAX_OBJECT_SIZE} bytes"),
                ));
            }
            batch.extend_from_slice(&c.bytes);
        }
        if batch.len() >= CHUNK_SIZE || (end && !batch.is_empty()) {
            decoder.write(&batch, |_| Ok(())).map_err(invalid)?;
            pending.write(&batch).await.map_err(Refusal::internal)?;
            batch.clear();
        }
        if end {
            break;
        }
    }
    let summary = decoder.finish().map_err(|e| {
        Refusal::new(
            ErrorCode::Invalid,
            format!("{name}: body is not the announced file: {e}"),
        )
    })?;
    summary.check(raw_size, blake3).map_err(|e| {
        Refusal::new(
            ErrorCode::Invalid,
            format!("{name}: body is not the announced file: {e}"),
        )
    })?;
    let facts = validate_wal_file(name, &summary.head, summary.raw_len)
        .map_err(|e| Refusal::new(ErrorCode::Invalid, format!("{name}: {e}")))?;
    if let Some(header) = facts.header {
        check_binding(state, cluster, name, &header).await?;
    }

    let object_header = ObjectHeader {
        raw_size,
        blake3: hash,
        compressed_size: pending.written(),
    };
    let stored_size = store::HEADER_LEN as u64 + pending.written();
    let outcome = state
        .store
        .commit(pending, &object_header)
        .await
        .map_err(Refusal::internal)?;
    let entry = match outcome {
        CreateOutcome::Created => WalEntry {
            raw_size,
            blake3: object_header.blake3_hex(),
            stored_size,
        },
        CreateOutcome::Exists => {
            let existing = state
                .store
                .read_header(&key)
                .await
                .map_err(Refusal::internal)?
                .ok_or_else(|| {
                    Refusal::internal(anyhow::anyhow!("{key} vanished after a create conflict"))
                })?;
            if existing.blake3 != hash {
                return Err(conflict(cluster, name, &existing.blake3_hex(), blake3));
            }
            WalEntry {
                raw_size: existing.raw_size,
                blake3: existing.blake3_hex(),
                stored_size: store::HEADER_LEN as u64 + existing.compressed_size,
            }
        }
    };
    state
        .catalog
        .put_wal(cluster, &wal_name, &entry)
        .await
        .map_err(Refusal::internal)?;
    Ok(Response::Stored {
        already_present: outcome == CreateOutcome::Exists,
    })
}

fn conflict(cluster: &str, name: &str, archived: &str, offered: &str) -> Refusal {
    Refusal::new(
        ErrorCode::Conflict,
        format!(
            "cluster '{cluster}' already has a different {name} (archived blake3 {}, offered {}); the archived copy is kept. \
             Two servers may be pushing under one cluster name, or the file changed after it was archived.",
            &archived[..archived.len().min(16)],
            &offered[..offered.len().min(16)]
        ),
    )
}

/// Binds the cluster name to the segment's system identifier at the first push, and
/// refuses segments of any other system afterwards.
async fn check_binding(
    state: &ArchiveState,
    cluster: &str,
    name: &str,
    header: &LongPageHeader,
) -> std::result::Result<(), Refusal> {
    let offered = ClusterBinding {
        system_identifier: header.system_identifier,
        wal_segment_size: header.segment_size,
        pg_version: header.pg_major(),
    };
    let bound = match state.catalog.binding(cluster).map_err(Refusal::internal)? {
        Some(b) => b,
        None => {
            let _serial = state.binding_lock.lock().await;
            let key = store::cluster_key(cluster);
            let text = toml::to_string(&offered).map_err(|e| Refusal::internal(e.into()))?;
            state
                .store
                .put_new(&key, Bytes::from(text))
                .await
                .map_err(Refusal::internal)?;
            let stored = state
                .store
                .get_small(&key)
                .await
                .map_err(Refusal::internal)?
                .unwrap_or_default();
            let bound: ClusterBinding = toml::from_str(&String::from_utf8_lossy(&stored))
                .map_err(|e| Refusal::internal(anyhow::anyhow!("{key} is unreadable: {e}")))?;
            state
                .catalog
                .put_binding(cluster, &bound)
                .await
                .map_err(Refusal::internal)?;
            if bound == offered {
                tracing::info!(%cluster, system_identifier = bound.system_identifier, "cluster bound to its system identifier");
            }
            bound
        }
    };
    if bound.system_identifier != offered.system_identifier {
        return Err(Refusal::new(
            ErrorCode::WrongCluster,
            format!(
                "{name} belongs to the PostgreSQL system {} but cluster '{cluster}' is bound to system {}. \
                 Each PostgreSQL cluster needs its own cluster name (archived issue --cluster NAME).",
                offered.system_identifier, bound.system_identifier
            ),
        ));
    }
    if bound.wal_segment_size != offered.wal_segment_size {
        return Err(Refusal::new(
            ErrorCode::WrongCluster,
            format!(
                "{name} has {} byte segments but cluster '{cluster}' uses {} byte segments",
                offered.wal_segment_size, bound.wal_segment_size
            ),
        ));
    }
    Ok(())
}

async fn get_wal(
    state: &ArchiveState,
    cluster: &str,
    name: &str,
    send: &mut quinn::SendStream,
) -> std::result::Result<(), Refusal> {
    let wal_name = parse_name(name)?;
    let key = store::wal_key(cluster, &wal_name);
    send_object(&state.store, &key, send, || {
        Refusal::new(
            ErrorCode::NotFound,
            format!("{name} is not in the archive of cluster '{cluster}'"),
        )
    })
    .await
}

/// Answers with an object of the store: an `Object` frame, then its zstd frame. A
/// missing object is `not_found()`; a failure after the frame resets the stream.
pub(crate) async fn send_object(
    store: &Store,
    key: &str,
    send: &mut quinn::SendStream,
    not_found: impl FnOnce() -> Refusal,
) -> std::result::Result<(), Refusal> {
    let header = store
        .read_header(key)
        .await
        .map_err(Refusal::internal)?
        .ok_or_else(not_found)?;
    let response = Response::Object {
        raw_size: header.raw_size,
        blake3: header.blake3_hex(),
        compressed_size: header.compressed_size,
    };
    let body = store
        .body_stream(key, &header)
        .await
        .map_err(Refusal::internal)?;
    write_frame(send, &response)
        .await
        .map_err(|e| Refusal::internal(e.context("sending response")))?;
    stream_body(send, key, body).await;
    Ok(())
}

/// Sends a body after its response frame, then finishes the stream; a failure (storage,
/// a client that went away) resets it, so the client sees an interrupted download.
pub(crate) async fn stream_body(
    send: &mut quinn::SendStream,
    what: &str,
    mut body: BoxStream<'static, Result<Bytes>>,
) {
    let mut streamed: Result<()> = Ok(());
    while let Some(chunk) = body.next().await {
        let sent = match chunk {
            Ok(c) => send.write_chunk(c).await.context("client went away"),
            Err(e) => Err(e),
        };
        if let Err(e) = sent {
            streamed = Err(e);
            break;
        }
    }
    match streamed {
        Ok(()) => {
            let _ = send.finish();
            // Bounded: a client that vanished without closing must not hold shutdown hostage.
            let _ = tokio::time::timeout(RESPONSE_DELIVERY_TIMEOUT, send.stopped()).await;
        }
        Err(e) => {
            tracing::warn!(%what, error = %format!("{e:#}"), "sending object failed");
            let _ = send.reset(1u32.into());
        }
    }
}
