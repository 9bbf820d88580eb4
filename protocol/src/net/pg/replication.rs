//! The server's clock over a physical replication connection: the I/O of a brief
//! `START_REPLICATION` (the messages are parsed in
//! [`core::pg::replication`](crate::core::pg::replication)).
//!
//! [`PgConnection::server_clock`] starts streaming at the server's own flush position
//! (so no WAL has to be read), sends one standby status update asking for a reply, and
//! takes the send time of the first message that comes back (the keepalive it asked for,
//! or XLogData if WAL was being written meanwhile); then it ends the stream with CopyDone
//! and leaves the connection idle. It needs nothing beyond what BASE_BACKUP needs (the
//! REPLICATION attribute and a `replication` line in pg_hba.conf), and it reads the clock
//! of the server the connection is to, a standby included (cascading walsender).
//!
//! The status update reports no position (all zero, InvalidXLogRecPtr): walvault does not
//! receive the WAL, so it must never count as a synchronous standby's flush and release
//! commits waiting for one.

use postgres_protocol::message::backend::Message;

use super::stream::StreamEvent;
use super::{PgConnection, PgError};
use crate::core::pg::replication::PgTimestamp;
use crate::core::pg::wal::{Lsn, TimelineId};

impl PgConnection {
    /// Reads the server's clock (microsecond resolution). The connection must be an idle
    /// replication connection; it is idle again afterwards.
    pub async fn server_clock(&mut self) -> Result<PgTimestamp, PgError> {
        let system = self.identify_system().await?;
        let at: Lsn = system.xlogpos.parse().map_err(|_| {
            PgError::Protocol(format!(
                "IDENTIFY_SYSTEM gave a bad WAL position {:?}",
                system.xlogpos
            ))
        })?;
        let mut stream = self
            .start_physical(None, at, TimelineId(system.timeline))
            .await?;
        // No position (InvalidXLogRecPtr): never a synchronous standby's flush.
        stream.send_status(Lsn(0), Lsn(0), true).await?;
        let clock = match stream.next().await? {
            StreamEvent::XLogData { send_time, .. } | StreamEvent::Keepalive { send_time, .. } => {
                send_time
            }
            StreamEvent::TimelineEnd { .. } => {
                return Err(PgError::Protocol(
                    "the server ended the replication stream before sending its clock".into(),
                ))
            }
        };
        // The server answers CopyDone, CommandComplete, ReadyForQuery (CopyData it had
        // already sent comes first and is dropped).
        stream.stop().await?;
        Ok(clock)
    }

    /// Reads and drops messages up to the next ReadyForQuery (after an error).
    pub(crate) async fn drain_to_ready(&mut self) {
        while let Ok(m) = self.next_message().await {
            if matches!(m, Message::ReadyForQuery(_)) {
                break;
            }
        }
    }
}
