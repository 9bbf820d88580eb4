//! systemd's service protocol for `archived serve` (`Type=notify`, `WatchdogSec=`).
//!
//! Contract: `READY=1` is sent once the QUIC endpoint is bound, the catalog is open (or
//! its rebuild has started) and the metrics endpoint listens, so a unit ordered after
//! archived (`After=archived.service`) finds it answering; `STOPPING=1` when a
//! shutdown begins. With a watchdog (`WATCHDOG_USEC` for this pid), `WATCHDOG=1` goes
//! out every half interval only while the catalog answers a read: a wedged catalog or a
//! stuck runtime lets the watchdog expire, and systemd restarts archived
//! (`Restart=on-failure`). An unreachable store does not stop the pings (a restart does
//! not bring S3 back; `/readyz` and `archived check` report it). Without `NOTIFY_SOCKET`
//! (not under systemd) every call does nothing.

use std::sync::Arc;
use std::time::Duration;

use sd_notify::NotifyState;

use crate::service::Archive;

fn notify(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(false, states) {
        tracing::warn!(error = %e, "cannot notify systemd");
    }
}

/// The daemon serves.
pub(crate) fn ready(status: &str) {
    notify(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// A shutdown began.
pub(crate) fn stopping() {
    notify(&[NotifyState::Stopping, NotifyState::Status("shutting down")]);
}

/// Starts the watchdog's pings when systemd asked for them.
pub(crate) fn spawn_watchdog<S>(state: Arc<S>) -> Option<tokio::task::JoinHandle<()>>
where
    S: AsRef<Archive> + Send + Sync + 'static,
{
    let mut usec = 0u64;
    if !sd_notify::watchdog_enabled(false, &mut usec) || usec == 0 {
        return None;
    }
    let every = Duration::from_micros(usec / 2).max(Duration::from_millis(100));
    tracing::info!(
        watchdog_secs = usec as f64 / 1e6,
        "systemd watchdog on: pinging while the catalog answers"
    );
    Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            match (*state).as_ref().index.is_complete() {
                Ok(_) => notify(&[NotifyState::Watchdog]),
                Err(e) => tracing::error!(
                    error = %format!("{e:#}"),
                    "the catalog cannot be read: not pinging systemd's watchdog (it restarts archived when this lasts)"
                ),
            }
        }
    }))
}
