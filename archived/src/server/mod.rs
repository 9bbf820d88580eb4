//! The QUIC server: one request per bidirectional stream, authorized by the client
//! certificate (auth.rs), dispatched to its handler (dispatch.rs, service/), answered
//! only after the effect is durable (rpc.rs). The only code that knows quinn.
//!
//! Bounds: at most `max_connections` connections, `MAX_STREAMS_PER_CONNECTION`
//! requests each (quinn refuses more streams); a request header must arrive within 30 s
//! and each read of a body make progress within `body_idle_timeout_secs` (body.rs);
//! what requests hold in memory stays under `request_memory_mib`, whatever the number
//! of connections and streams (service/budget.rs; each handler says what it takes).
//!
//! SIGTERM/SIGINT: new connections and requests are refused, in-flight requests get
//! `shutdown_grace_secs` to finish, and whatever has not finished by then is dropped
//! unacknowledged.

mod auth;
mod body;
mod dispatch;
mod rpc;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::sync::{Notify, Semaphore};

use crate::datadir::DataDir;
use crate::index::rebuild;
use crate::ops::http::Ops;
use crate::ops::metrics::Metrics;
use crate::service::budget::Budget;
use crate::service::stream::Streams;
use crate::service::Archive;

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
struct ServerState {
    archive: Archive,
    metrics: Arc<Metrics>,
    shutting_down: AtomicBool,
    inflight: InFlight,
    /// How long each read of a request body may wait for data.
    body_idle: Duration,
}

impl AsRef<Archive> for ServerState {
    fn as_ref(&self) -> &Archive {
        &self.archive
    }
}

impl ServerState {
    fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst)
    }
}

/// Runs the server until SIGTERM/SIGINT. With `listen_address_file`, the bound address
/// is written there (atomically: a temp file renamed over it) before the first connection
/// is accepted, so a caller that let the kernel pick the port (`listen` port 0) can wait
/// for the file instead of guessing a free port.
pub(crate) async fn serve(
    dir: &DataDir,
    listen_address_file: Option<&Path>,
    metrics_address_file: Option<&Path>,
) -> Result<()> {
    let cfg = dir.load_config()?;
    // A metrics address taken by something else is a misconfiguration: said at start-up.
    let http = crate::ops::http::bind(&cfg.metrics_listen).await?;
    let store = dir.open_store(&cfg)?;
    let removed = store.remove_stale_temp_files().await?;
    if removed > 0 {
        tracing::info!(
            removed,
            "removed temporary files of uploads that never completed"
        );
    }
    let index = rebuild::open_or_rebuild(&dir.catalog(), &store).await?;
    let tls = dir.server_cert()?;
    let ca_pem = dir.ca_cert()?;
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

    let streams = Streams::new(
        dir.stream(),
        Duration::from_secs(cfg.stream.upload_interval_secs.max(1)),
    );
    let recovered = streams.recover()?;
    if recovered > 0 {
        tracing::info!(
            recovered,
            "found the streaming receiver's unfinished segments of an earlier run"
        );
    }
    let mut archive = Archive::new(
        store,
        index,
        cfg.retention.clone(),
        Budget::new(cfg.request_memory_mib),
        streams,
    );
    archive.checks = cfg.checks.clone();
    archive.data_dir = Some(dir.clone());
    archive.volumes.push(crate::ops::disk::Volume {
        name: "data",
        path: dir.root.clone(),
    });
    if let Some(root) = archive.store.local_root() {
        archive.volumes.push(crate::ops::disk::Volume {
            name: "store",
            path: root.to_path_buf(),
        });
    }
    for (what, pem) in [("CA", &ca_pem), ("server", &tls.cert_pem)] {
        match crate::ops::check::not_after(pem) {
            Ok(not_after) => archive.certs.push(crate::ops::check::CertExpiry {
                what: what.to_string(),
                not_after,
            }),
            Err(e) => {
                tracing::warn!(certificate = what, error = %format!("{e:#}"), "cannot read the certificate's expiry (archived check reports it)")
            }
        }
    }
    let metrics = Arc::new(Metrics::new());
    metrics.certificates(&archive.certs);
    let state = Arc::new(ServerState {
        archive,
        metrics,
        shutting_down: AtomicBool::new(false),
        inflight: InFlight::default(),
        body_idle: Duration::from_secs(cfg.body_idle_timeout_secs),
    });
    let worker = {
        let state = state.clone();
        tokio::spawn(async move { crate::service::stream::run(&state.archive).await })
    };
    let summaries = {
        let state = state.clone();
        let every = Duration::from_secs(cfg.summary_interval_secs);
        tokio::spawn(async move {
            crate::ops::summary::run(&state.archive, &state.metrics.summaries, every).await
        })
    };
    let audit = {
        let state = state.clone();
        tokio::spawn(async move {
            crate::service::audit::run(&state.archive.store, &state.archive.index).await
        })
    };
    let http = match http {
        Some(listener) => {
            let bound = listener.local_addr()?;
            if let Some(path) = metrics_address_file {
                write_listen_address(path, bound)?;
            }
            tracing::info!(metrics_listen = %bound, "serving /metrics, /healthz and /readyz over HTTP");
            let ops = Arc::new(Ops::new(state.metrics.clone(), cfg.metrics_token.clone()));
            Some(tokio::spawn(crate::ops::http::serve(
                listener,
                ops,
                state.clone(),
            )))
        }
        None => None,
    };
    crate::ops::systemd::ready(&format!("serving on {bound}"));
    let watchdog = crate::ops::systemd::spawn_watchdog(state.clone());
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
    crate::ops::systemd::stopping();
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
    worker.abort();
    audit.abort();
    summaries.abort();
    if let Err(e) = crate::service::audit::export(&state.archive.store, &state.archive.index).await
    {
        tracing::warn!(error = %format!("{e:#}"), "cannot write the last audit trail records to the store; the next start does");
    }
    if let Some(watchdog) = watchdog {
        watchdog.abort();
    }
    if let Some(http) = http {
        http.abort();
    }
    endpoint.close(0u32.into(), b"archived shutting down");
    state.archive.index.flush().await?;
    let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
    tracing::info!("archived stopped");
    Ok(())
}

/// Writes `addr` and a newline to `path` through a temp file beside it, so a reader sees
/// either no file, the previous content or the whole address, never a partial line.
fn write_listen_address(path: &Path, addr: SocketAddr) -> Result<()> {
    walvault_protocol::net::fsutil::write_replacing(path, format!("{addr}\n").as_bytes()).with_context(|| {
        format!(
            "cannot write the listen address to {} (--listen-address-file): is its directory writable?",
            path.display()
        )
    })
}

async fn handle_connection(state: Arc<ServerState>, incoming: quinn::Incoming) {
    let peer = incoming.remote_address();
    let connection = match incoming.await {
        Ok(c) => c,
        Err(e) => {
            tracing::info!(%peer, error = %e, "handshake refused");
            return;
        }
    };
    let identity = match auth::peer_identity(&connection) {
        Ok(id) => id,
        Err(message) => {
            tracing::warn!(%peer, %message, "refusing connection");
            connection.close(1u32.into(), message.as_bytes());
            return;
        }
    };
    tracing::debug!(%peer, cluster = %identity.cluster, role = %identity.role, "client connected");
    state.metrics.connection(1);
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
        streams.spawn(async move {
            let _guard = state.inflight.enter();
            let shutting_down = || state.is_shutting_down();
            dispatch::handle_stream(
                &state.archive,
                &state.metrics,
                shutting_down,
                state.body_idle,
                &identity,
                send,
                recv,
            )
            .await
        });
        // Reap finished requests; quinn caps open streams at MAX_STREAMS_PER_CONNECTION.
        while streams.try_join_next().is_some() {}
    }
    while streams.join_next().await.is_some() {}
    state.metrics.connection(-1);
}
