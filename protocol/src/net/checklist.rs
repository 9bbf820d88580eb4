//! The output of `pushclient check` and `pullclient check`: one `ok:`, `WARNING:` or
//! `FAILED:` line per step, a count of the failed ones at the end, and the first step
//! both share (archived answers and accepts the certificate).

use crate::net::client::{ArchiveClient, ClientError, Pong};
use crate::net::config::ClientConfig;

/// The steps of a check as they are printed, and the connection to archived they use.
pub struct Checklist {
    failed: usize,
    archive: ArchiveClient,
}

impl Checklist {
    /// Connects to archived and runs the first step (it answers and accepts the
    /// certificate): the checklist, and what archived said.
    pub async fn start(cfg: &ClientConfig) -> Result<(Checklist, Pong), ClientError> {
        let archive = ArchiveClient::connect(cfg).await?;
        let out = Checklist { failed: 0, archive };
        let pong = out.archive.ping().await?;
        out.ok(&format!(
            "archived {} at {} accepts this certificate (cluster {}, role {})",
            pong.version, cfg.server, pong.cluster, pong.role
        ));
        Ok((out, pong))
    }

    /// The connection to archived.
    pub fn archive(&self) -> &ArchiveClient {
        &self.archive
    }

    /// Closes the connection; `result` (the steps' own error) first, else whether no
    /// step failed (with their count printed when some did).
    pub async fn finish<E>(self, result: Result<(), E>) -> Result<bool, E> {
        self.archive.close().await;
        result?;
        if self.failed > 0 {
            println!("{} check(s) FAILED", self.failed);
        }
        Ok(self.failed == 0)
    }

    /// A step that passed.
    pub fn ok(&self, what: &str) {
        println!("ok: {what}");
    }

    /// A step that passed with something to look at.
    pub fn warn(&self, what: &str) {
        println!("WARNING: {what}");
    }

    /// A step that failed.
    pub fn fail(&mut self, what: &str) {
        self.failed += 1;
        println!("FAILED: {what}");
    }

    /// Steps failed so far.
    pub fn failed(&self) -> usize {
        self.failed
    }
}
