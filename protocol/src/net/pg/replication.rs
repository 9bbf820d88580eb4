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

use bytes::Bytes;
use postgres_protocol::message::backend::Message;
use postgres_protocol::message::frontend;

use super::{server_error, Incoming, PgConnection, PgError};
use crate::core::pg::replication::{parse_server_message, standby_status_update, PgTimestamp};
use crate::core::pg::wal::Lsn;

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
        self.send_query(&format!(
            "START_REPLICATION PHYSICAL {at} TIMELINE {}",
            system.timeline
        ))
        .await?;
        loop {
            match self.next_incoming().await? {
                Incoming::CopyBothResponse => break,
                Incoming::Message(Message::ErrorResponse(e)) => {
                    let err = server_error(&e);
                    self.drain_to_ready().await;
                    return Err(PgError::Server(err));
                }
                Incoming::Message(Message::ReadyForQuery(_)) => {
                    return Err(PgError::Protocol(
                        "START_REPLICATION ended without streaming".into(),
                    ))
                }
                Incoming::Message(_) => {}
            }
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as i64)
            .unwrap_or(0);
        let update = standby_status_update(0, 0, 0, PgTimestamp::from_unix_micros(now), true);
        frontend::CopyData::new(Bytes::from(update))
            .map_err(super::io_err("encoding a status update"))?
            .write(&mut self.write);
        self.flush().await?;
        let clock = loop {
            match self.next_message().await? {
                Message::CopyData(d) => match parse_server_message(d.data()) {
                    Ok(m) => break m.send_time(),
                    Err(e) => return Err(PgError::Protocol(format!("replication stream: {e}"))),
                },
                Message::ErrorResponse(e) => {
                    let err = server_error(&e);
                    self.drain_to_ready().await;
                    return Err(PgError::Server(err));
                }
                Message::CopyDone | Message::ReadyForQuery(_) => {
                    return Err(PgError::Protocol(
                        "the server ended the replication stream before sending its clock".into(),
                    ))
                }
                _ => {}
            }
        };
        // End the stream: the server answers CopyDone, CommandComplete, ReadyForQuery
        // (CopyData it had already sent comes first and is dropped).
        frontend::copy_done(&mut self.write);
        self.flush().await?;
        let mut error = None;
        loop {
            match self.next_message().await? {
                Message::ReadyForQuery(_) => break,
                Message::ErrorResponse(e) => error = Some(server_error(&e)),
                _ => {}
            }
        }
        match error {
            Some(e) => Err(PgError::Server(e)),
            None => Ok(clock),
        }
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
