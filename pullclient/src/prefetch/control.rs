//! The control socket: one JSON line in (a [`ControlRequest`]), one answer line out.
//! archive-get tells the daemon what PostgreSQL asked for and what it served;
//! `prefetch-status` asks for the counters.

use std::sync::Arc;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;

use crate::spool::ControlRequest;

use super::daemon::Daemon;

pub(super) async fn control_loop(daemon: Arc<Daemon>, listener: UnixListener) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let daemon = daemon.clone();
        tokio::spawn(async move {
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
                Ok(ControlRequest::Status) => {
                    serde_json::to_string(&daemon.counters()).unwrap_or_default()
                }
                Err(e) => serde_json::json!({ "error": e.to_string() }).to_string(),
            };
            let _ = write.write_all(format!("{answer}\n").as_bytes()).await;
        });
    }
}
