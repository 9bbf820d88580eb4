//! The control socket: one JSON line in (a [`ControlRequest`]), one answer line out.
//! archive-get tells the daemon what PostgreSQL asked for and what it served;
//! `prefetch-status` asks for the counters.
//!
//! Bounds: at most [`MAX_CLIENTS`] clients are served at once (the next wait in the
//! listen backlog), each gets [`CLIENT_TIMEOUT`] to send its line and take the answer,
//! and a failing `accept` (out of descriptors: EMFILE) is retried after a pause that
//! doubles up to [`MAX_ACCEPT_PAUSE`], never in a hot loop.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;

use crate::spool::ControlRequest;

use super::daemon::Daemon;

/// Clients served at once.
pub(super) const MAX_CLIENTS: usize = 32;
/// Time a client has to send its request and read the answer.
pub(super) const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);
/// First pause after a failed `accept`.
const MIN_ACCEPT_PAUSE: Duration = Duration::from_millis(10);
/// Longest pause after failed `accept`s in a row.
const MAX_ACCEPT_PAUSE: Duration = Duration::from_secs(1);

pub(super) async fn control_loop(daemon: Arc<Daemon>, listener: UnixListener) {
    let clients = Arc::new(Semaphore::new(MAX_CLIENTS));
    let mut pause = MIN_ACCEPT_PAUSE;
    loop {
        let Ok(permit) = clients.clone().acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((stream, _)) => {
                pause = MIN_ACCEPT_PAUSE;
                stream
            }
            Err(e) => {
                tracing::warn!(error = %e, pause_ms = pause.as_millis() as u64, "cannot accept a control connection");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(MAX_ACCEPT_PAUSE);
                continue;
            }
        };
        let daemon = daemon.clone();
        tokio::spawn(async move {
            // A client that sends nothing, or never reads its answer, is dropped.
            let _ = tokio::time::timeout(CLIENT_TIMEOUT, serve(&daemon, stream)).await;
            drop(permit);
        });
    }
}

/// Reads one request line, answers it.
async fn serve(daemon: &Daemon, stream: UnixStream) {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(read).take(64 * 1024);
    if reader.read_line(&mut line).await.is_err() {
        return;
    }
    let answer = match serde_json::from_str::<ControlRequest>(line.trim()) {
        Ok(ControlRequest::Requested { name }) => {
            daemon.requested(&name);
            "{\"ok\":true}".to_string()
        }
        Ok(ControlRequest::Served { from_spool, .. }) => {
            daemon.served(from_spool);
            "{\"ok\":true}".to_string()
        }
        Ok(ControlRequest::Status) => serde_json::to_string(&daemon.counters()).unwrap_or_default(),
        Err(e) => serde_json::json!({ "error": e.to_string() }).to_string(),
    };
    let _ = write.write_all(format!("{answer}\n").as_bytes()).await;
}
