//! The archive's request handlers, over byte sources and answers, not sockets.
//!
//! A handler takes a [`Ctx`] (the archive's shared state and the client's identity), the
//! request's fields and, for uploads, the request body as any `AsyncRead`; it answers a
//! [`Reply`] (one response frame) or a [`Streamed`] (a response frame and a body to
//! send after it). The server (server/) feeds them QUIC streams; the tests below feed
//! them byte slices over an in-memory store. Role checks are the handlers' own; the
//! cluster a certificate may touch is checked by the dispatcher before any handler runs.
//!
//! - [`wal`]: `PutWal` ([`wal::ingest`]), `GetWal`, `ListWal` and the cluster binding;
//! - [`audit`]: the audit trail's records and their way into the store (here, not in
//!   ops/ as DESIGN's layout has it: the handlers record steps, and ops/ depends on
//!   service/, never the other way);
//! - [`backups`]: chunks, packs, manifests, listings and deletion of base backups;
//! - [`retention`]: what the archive may forget;
//! - [`stream`]: the streaming receiver's appends, its unfinished segments and their
//!   way into the store;
//! - [`budget`]: the byte budget every request takes what it buffers from, so resident
//!   request buffers stay under `request_memory_mib` regardless of connection and
//!   stream count.

pub(crate) mod audit;
pub(crate) mod backups;
pub(crate) mod budget;
pub(crate) mod retention;
pub(crate) mod stream;
pub(crate) mod wal;

#[cfg(test)]
pub(crate) mod tests;

use bytes::Bytes;
use futures::stream::BoxStream;
use futures::StreamExt;
use tokio::io::{AsyncRead, AsyncReadExt};
use walvault_protocol::core::wire::{ErrorCode, Response};
use walvault_protocol::net::pki::{ClientIdentity, Role};

use budget::{Budget, Grant};

use crate::config::RetentionConfig;
use crate::gc::Gc;
use crate::index::Index;
use crate::store::syncgroup::SyncGroup;
use crate::store::Store;

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

    /// A failure of the archive itself (storage, catalog): logged, and the client told.
    pub(crate) fn internal(e: anyhow::Error) -> Refusal {
        tracing::error!(error = %format!("{e:#}"), "request failed");
        Refusal::new(ErrorCode::Internal, format!("archive-side failure: {e:#}"))
    }

    pub(crate) fn invalid(message: impl Into<String>) -> Refusal {
        Refusal::new(ErrorCode::Invalid, message)
    }
}

/// The answer of a request that is one response frame.
pub(crate) type Reply = Result<Response, Refusal>;

/// A response frame and the body that follows it.
pub(crate) struct Streamed {
    /// The frame.
    pub(crate) response: Response,
    /// The body; an error item cuts the answer short (the client sees an interrupted
    /// download, never a short one that looks complete).
    pub(crate) body: BoxStream<'static, anyhow::Result<Bytes>>,
    /// What is sent, for logs.
    pub(crate) what: String,
}

/// The answer of a request that sends a body.
pub(crate) type StreamReply = Result<Streamed, Refusal>;

/// What every request of one archive shares.
pub(crate) struct Archive {
    pub(crate) store: Store,
    pub(crate) index: Index,
    pub(crate) gc: Gc,
    /// The policy from archived.toml.
    pub(crate) policy: RetentionConfig,
    /// What requests may buffer (`request_memory_mib`).
    pub(crate) budget: Budget,
    /// The streaming receiver's unfinished segments.
    pub(crate) streams: stream::Streams,
    /// Serializes the first binding of a cluster name.
    binding_lock: tokio::sync::Mutex<()>,
    /// Shared syncs of concurrent chunk writes (local store), made at first use.
    sync_group: std::sync::OnceLock<SyncGroup>,
    /// The newest store probe (`/readyz`, `archived check`): when, and what it found.
    probe: tokio::sync::Mutex<Option<(std::time::Instant, Result<(), String>)>>,
    /// `[checks]` of archived.toml (`archived check`).
    pub(crate) checks: crate::config::ChecksConfig,
    /// When the server's own certificates expire (`archived check`).
    pub(crate) certs: Vec<crate::ops::check::CertExpiry>,
    /// The filesystems archived writes to (`archived check`, `/metrics`).
    pub(crate) volumes: Vec<crate::ops::disk::Volume>,
    /// The data directory, whose tls/issued/ lists the client certificates issued
    /// (`archived check`, `/metrics`); `None` in tests.
    pub(crate) data_dir: Option<crate::datadir::DataDir>,
}

/// How long a store probe counts (`/readyz`, `archived check`).
pub(crate) const PROBE_TTL: std::time::Duration = std::time::Duration::from_secs(10);

impl Archive {
    pub(crate) fn new(
        store: Store,
        index: Index,
        policy: RetentionConfig,
        budget: Budget,
        streams: stream::Streams,
    ) -> Archive {
        Archive {
            store,
            index,
            gc: Gc::default(),
            policy,
            budget,
            streams,
            binding_lock: tokio::sync::Mutex::new(()),
            sync_group: std::sync::OnceLock::new(),
            probe: tokio::sync::Mutex::new(None),
            checks: crate::config::ChecksConfig::default(),
            certs: Vec::new(),
            volumes: Vec::new(),
            data_dir: None,
        }
    }

    /// Whether the store takes writes: a probe object created create-only under
    /// `_readyz/` and deleted, at most once per [`PROBE_TTL`] (callers in between get the
    /// newest probe's answer).
    pub(crate) async fn probe_store(&self) -> Result<(), String> {
        let mut probe = self.probe.lock().await;
        if let Some((at, result)) = probe.as_ref() {
            if at.elapsed() < PROBE_TTL {
                return result.clone();
            }
        }
        let key = format!("_readyz/{}.probe", std::process::id());
        let result = async {
            self.store
                .put_new(&key, Bytes::from_static(b"walvault readiness probe\n"))
                .await?;
            self.store.delete(&key).await
        }
        .await
        .map_err(|e| format!("the store does not take writes: {e:#}"));
        *probe = Some((std::time::Instant::now(), result.clone()));
        result
    }

    /// The context of one request of a client.
    pub(crate) fn ctx<'a>(&'a self, identity: &'a ClientIdentity) -> Ctx<'a> {
        Ctx {
            store: &self.store,
            index: &self.index,
            gc: &self.gc,
            budget: &self.budget,
            identity,
            archive: self,
        }
    }

    fn sync_group(&self) -> &SyncGroup {
        self.sync_group.get_or_init(|| self.store.sync_group())
    }
}

/// What a handler works with.
pub(crate) struct Ctx<'a> {
    pub(crate) store: &'a Store,
    pub(crate) index: &'a Index,
    pub(crate) gc: &'a Gc,
    pub(crate) budget: &'a Budget,
    /// Who asks (from the client certificate).
    pub(crate) identity: &'a ClientIdentity,
    archive: &'a Archive,
}

impl Ctx<'_> {
    /// Refuses clients that may not write (`what`: "store backups", ...).
    fn require_writer(&self, what: &str) -> Result<(), Refusal> {
        if matches!(self.identity.role, Role::Push | Role::Admin) {
            Ok(())
        } else {
            Err(Refusal::new(
                ErrorCode::Unauthorized,
                format!(
                    "a {} certificate may not {what}; use the cluster's push certificate",
                    self.identity.role
                ),
            ))
        }
    }

    /// Refuses clients without an admin certificate (`why`: the message).
    pub(crate) fn require_admin(&self, why: &str) -> Result<(), Refusal> {
        if self.identity.role == Role::Admin {
            Ok(())
        } else {
            Err(Refusal::new(ErrorCode::Unauthorized, why))
        }
    }
}

/// `RecordVerify`: an admin records what `archived verify` found in a bound cluster.
pub(crate) async fn record_verify(
    ctx: &Ctx<'_>,
    cluster: &str,
    run: &walvault_protocol::core::wire::admin::VerifyRun,
) -> Result<Response, Refusal> {
    ctx.require_admin(
        "only an admin certificate may record verify runs (archived verify uses DIR/admin.toml)",
    )?;
    if ctx
        .index
        .binding(cluster)
        .map_err(Refusal::internal)?
        .is_none()
    {
        return Err(Refusal::new(
            ErrorCode::NotFound,
            format!("cluster '{cluster}' is not in the archive"),
        ));
    }
    let mut r = crate::index::audit::record(
        cluster,
        None,
        walvault_protocol::core::wire::audit::Step::Verified,
    );
    r.peer = Some(ctx.identity.peer());
    r.detail = Some(format!(
        "archived verify ({}): {} WAL files, {} manifests, {} packs, {} chunks read back; {} problems{}",
        run.scope,
        run.wal_files,
        run.manifests,
        run.packs,
        run.chunks,
        run.problems,
        if run.first_problems.is_empty() {
            String::new()
        } else {
            format!(": {}", run.first_problems.join("; "))
        }
    ));
    ctx.index.audit_put(r).map_err(Refusal::internal)?;
    ctx.index
        .record_verify(cluster, run)
        .await
        .map_err(Refusal::internal)?;
    Ok(Response::Recorded)
}

/// `body` holding `grant` until the stream is dropped (sent, or abandoned).
fn holding(
    body: BoxStream<'static, anyhow::Result<Bytes>>,
    grant: Grant,
) -> BoxStream<'static, anyhow::Result<Bytes>> {
    body.map(move |item| {
        let _held = &grant;
        item
    })
    .boxed()
}

/// A stored object as an answer: an `Object` frame, then its zstd frame; a missing
/// object is `not_found()`. Memory: the store's read-ahead of one body stream.
async fn object(ctx: &Ctx<'_>, key: &str, not_found: impl FnOnce() -> Refusal) -> StreamReply {
    let grant = ctx
        .budget
        .body(ctx.store.body_stream_memory(), &format!("sending {key}"))
        .await?;
    let header = ctx
        .store
        .read_header(key)
        .await
        .map_err(Refusal::internal)?
        .ok_or_else(not_found)?;
    let body = ctx
        .store
        .body_stream(key, &header)
        .await
        .map_err(Refusal::internal)?;
    Ok(Streamed {
        response: Response::Object {
            raw_size: header.raw_size,
            blake3: header.blake3_hex(),
            compressed_size: header.compressed_size,
            partial_bytes: None,
        },
        body: holding(body, grant),
        what: key.to_string(),
    })
}

/// Reads from `source` until `buf` holds `want` bytes or the body ends; returns whether
/// it ended.
async fn fill(
    source: &mut (impl AsyncRead + Unpin + Send),
    buf: &mut Vec<u8>,
    want: usize,
) -> std::io::Result<bool> {
    let start = buf.len();
    buf.resize(want.max(start), 0);
    let mut at = start;
    while at < buf.len() {
        let n = source.read(&mut buf[at..]).await?;
        if n == 0 {
            buf.truncate(at);
            return Ok(true);
        }
        at += n;
    }
    Ok(false)
}

/// Why a body could not be read whole.
enum BodyError {
    /// Longer than allowed.
    TooLong,
    /// The stream failed.
    Io(std::io::Error),
}

/// A whole body of at most `max` bytes, in a buffer of `max` and a few bytes allocated
/// once (grown by doubling it could reach twice what the budget counts).
async fn read_to_end_bounded(
    source: &mut (impl AsyncRead + Unpin + Send),
    max: usize,
) -> Result<Vec<u8>, BodyError> {
    // The one byte past `max` that tells a longer body, and the 32 bytes tokio's
    // read_to_end wants free before each read.
    let mut body = Vec::with_capacity(max + 1 + 32);
    source
        .take(max as u64 + 1)
        .read_to_end(&mut body)
        .await
        .map_err(BodyError::Io)?;
    if body.len() > max {
        return Err(BodyError::TooLong);
    }
    Ok(body)
}

/// Whether the body has ended (reading one more byte).
async fn at_end(source: &mut (impl AsyncRead + Unpin + Send)) -> std::io::Result<bool> {
    let mut extra = [0u8; 1];
    Ok(source.read(&mut extra).await? == 0)
}
