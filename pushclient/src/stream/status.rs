//! The receiver's status file, and `pushclient stream-status`, which reads it.
//!
//! `pushclient stream` rewrites the file (JSON, [`StreamStatus`]) about once a second and
//! at every change of state, by a rename, so a reader sees a whole one. It is
//! information, not state: nothing reads it back to decide where to stream from (the
//! archive's own holdings decide that), and losing it loses nothing.
//!
//! Default place: `/var/lib/walvault/stream-<slot>.json` (systemd's `StateDirectory`), or
//! `--status-file`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// How old a status may be while the receiver runs (it is rewritten every second).
pub(crate) const STALE_AFTER_SECS: i64 = 15;

/// The receiver's default status file for `slot`.
pub(crate) fn default_path(slot: &str) -> PathBuf {
    PathBuf::from(format!("/var/lib/walvault/stream-{slot}.json"))
}

/// What `pushclient stream` reports about itself.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct StreamStatus {
    /// The receiver's process id.
    pub(crate) pid: u32,
    /// connecting, streaming, waiting (to reconnect), stopped.
    pub(crate) state: String,
    /// Cluster name in the archive.
    pub(crate) cluster: String,
    /// Replication slot.
    pub(crate) slot: String,
    /// application_name the receiver connects with (what synchronous_standby_names names).
    pub(crate) application_name: String,
    /// The server's system identifier.
    pub(crate) system_identifier: Option<u64>,
    /// Timeline being streamed.
    pub(crate) timeline: Option<u32>,
    /// The server's end of WAL, as it last reported it.
    pub(crate) server_wal_end: Option<String>,
    /// End of the WAL received from the server.
    pub(crate) received: Option<String>,
    /// End of the WAL durable in the archive (what is reported to PostgreSQL as flushed).
    pub(crate) flushed: Option<String>,
    /// Server WAL end minus flushed, in bytes.
    pub(crate) lag_bytes: Option<u64>,
    /// Where this session started streaming, and why (archive, slot, gap).
    pub(crate) started_at: Option<String>,
    /// Sessions after the first (reconnects after an error).
    pub(crate) reconnects: u64,
    /// Times the receiver stopped reading from PostgreSQL because as much WAL as it may
    /// hold waited for the archive (it still answers the server then); a count that
    /// keeps rising means the archive's disk or network is slower than the primary.
    #[serde(default)]
    pub(crate) read_pauses: u64,
    /// The last error, if the receiver is reconnecting after one.
    pub(crate) last_error: Option<String>,
    /// Warnings an operator must act on (remote_apply with walvault in the sync set, a
    /// recorded gap).
    pub(crate) warnings: Vec<String>,
    /// When this status was written, Unix seconds.
    pub(crate) updated_unix: i64,
}

/// Writes `status` to `path` whole (temporary file and rename). Failures are logged, not
/// fatal: the file is for people.
pub(crate) fn write(path: &Path, status: &StreamStatus) {
    let result = (|| -> Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        walvault_protocol::net::fsutil::write_replacing(path, &serde_json::to_vec_pretty(status)?)?;
        Ok(())
    })();
    if let Err(e) = result {
        tracing::warn!(file = %path.display(), error = %format!("{e:#}"), "cannot write the stream status file");
    }
}

/// Writes the statuses it is given to `path` from a thread of its own, newest first
/// (an older one still waiting is skipped): a slow disk never holds up the receive
/// loop, which must answer PostgreSQL within `wal_sender_timeout`. Dropping it writes
/// what was given last, then returns.
pub(crate) struct StatusWriter {
    tx: Option<std::sync::mpsc::Sender<StreamStatus>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl StatusWriter {
    pub(crate) fn new(path: PathBuf) -> Result<StatusWriter> {
        let (tx, rx) = std::sync::mpsc::channel::<StreamStatus>();
        let thread = std::thread::Builder::new()
            .name("status-file".into())
            .spawn(move || {
                while let Ok(mut status) = rx.recv() {
                    while let Ok(newer) = rx.try_recv() {
                        status = newer;
                    }
                    write(&path, &status);
                }
            })
            .context("starting the status file's writer thread")?;
        Ok(StatusWriter {
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    pub(crate) fn send(&self, status: &StreamStatus) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(status.clone());
        }
    }
}

impl Drop for StatusWriter {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Reads a status file.
pub(crate) fn read(path: &Path) -> Result<StreamStatus> {
    let text = std::fs::read(path).with_context(|| {
        format!(
            "reading {} (is `pushclient stream` running with this --slot / --status-file?)",
            path.display()
        )
    })?;
    serde_json::from_slice(&text)
        .with_context(|| format!("{} is not a stream status", path.display()))
}

/// The status as `stream-status` prints it, and whether it is healthy (streaming and
/// fresh).
pub(crate) fn render(status: &StreamStatus, now_unix: i64) -> (String, bool) {
    let age = now_unix - status.updated_unix;
    let stale = status.state != "stopped" && age > STALE_AFTER_SECS;
    let dash = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    let mut out = String::new();
    let state = if stale {
        format!(
            "{} (stale: not updated for {age} s; is pushclient stream (pid {}) still running?)",
            status.state, status.pid
        )
    } else {
        status.state.clone()
    };
    let rows: Vec<(&str, String)> = vec![
        ("state", state),
        ("cluster", status.cluster.clone()),
        ("slot", status.slot.clone()),
        ("application name", status.application_name.clone()),
        (
            "timeline",
            status
                .timeline
                .map(|t| t.to_string())
                .unwrap_or_else(|| "-".into()),
        ),
        ("server WAL end", dash(&status.server_wal_end)),
        ("received", dash(&status.received)),
        ("flushed in archive", dash(&status.flushed)),
        (
            "lag",
            status
                .lag_bytes
                .map(|b| format!("{b} bytes"))
                .unwrap_or_else(|| "-".into()),
        ),
        ("started at", dash(&status.started_at)),
        ("reconnects", status.reconnects.to_string()),
        (
            "paused for archive",
            format!("{} times", status.read_pauses),
        ),
        ("last error", dash(&status.last_error)),
    ];
    for (k, v) in rows {
        out.push_str(&format!("{k:<20} {v}\n"));
    }
    for w in &status.warnings {
        out.push_str(&format!("WARNING              {w}\n"));
    }
    out.push_str(&format!(
        "{:<20} SELECT slot_name, active, wal_status, pg_size_pretty(pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)) AS retained FROM pg_replication_slots WHERE slot_name = '{}';\n",
        "watch the slot", status.slot
    ));
    let healthy = !stale && status.state == "streaming" && status.last_error.is_none();
    (out, healthy)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_status_round_trips_and_a_stale_one_is_unhealthy() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join("stream-walvault.json");
        let status = StreamStatus {
            pid: 7,
            state: "streaming".into(),
            slot: "walvault".into(),
            flushed: Some("0/3000148".into()),
            lag_bytes: Some(0),
            updated_unix: 1000,
            ..Default::default()
        };
        write(&path, &status);
        let back = read(&path).unwrap();
        assert_eq!(back, status);
        let (text, healthy) = render(&back, 1005);
        assert!(healthy, "{text}");
        assert!(text.contains("flushed in archive   0/3000148"), "{text}");
        let (text, healthy) = render(&back, 1000 + STALE_AFTER_SECS + 1);
        assert!(!healthy);
        assert!(text.contains("stale"), "{text}");
        let err = read(&dir.path().join("missing.json")).unwrap_err();
        assert!(format!("{err:#}").contains("is `pushclient stream` running"));
    }
}
