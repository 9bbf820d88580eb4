//! Physical streaming replication over a [`PgConnection`]: the slot commands, timeline
//! history, and a `START_REPLICATION` stream ([`WalStream`]) that a receiver reads WAL
//! from and reports its positions on. The messages are parsed in
//! [`core::pg::replication`](crate::core::pg::replication).
//!
//! Contract:
//!
//! - [`WalStream::next`] is cancel-safe: it may be raced in `tokio::select!` against a
//!   status timer or an archive's answer; a message half received stays buffered, and
//!   the end-of-timeline exchange keeps its progress in the stream's state.
//! - While streaming there is no idle timeout (the server may be silent for
//!   `wal_sender_timeout / 2` between keepalives; TCP keepalives watch the peer); once
//!   the connection is idle again the usual [`super::IDLE_TIMEOUT`] applies.
//! - Status updates report write and flush as given and apply as 0 (InvalidXLogRecPtr):
//!   walvault replays nothing. No hot-standby feedback is ever sent.
//! - Slot names are checked against PostgreSQL's rule before they go into a command.

use bytes::Bytes;
use postgres_protocol::message::backend::Message;
use postgres_protocol::message::frontend;

use super::{server_error, Incoming, PgConnection, PgError, IDLE_TIMEOUT};
use crate::core::pg::replication::{
    parse_create_slot_row, parse_read_slot_row, parse_server_message, parse_timeline_end_row,
    standby_status_update, xlogdata_wal, PgTimestamp, ServerMessage, SlotInfo,
};
use crate::core::pg::wal::{Lsn, TimelineId, WalFileName};

/// What the stream delivers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StreamEvent {
    /// WAL from `start`.
    XLogData {
        /// LSN of the first byte.
        start: Lsn,
        /// The server's end of WAL.
        wal_end: Lsn,
        /// The server's clock when it sent this.
        send_time: PgTimestamp,
        /// The WAL bytes.
        data: Bytes,
    },
    /// A keepalive; answer at once when `reply_requested`.
    Keepalive {
        /// The server's end of WAL.
        wal_end: Lsn,
        /// Whether the server wants a status update now.
        reply_requested: bool,
        /// The server's clock when it sent this.
        send_time: PgTimestamp,
    },
    /// The server ended this timeline: its next timeline and where that starts. The
    /// connection is idle again (the stream is over).
    TimelineEnd {
        /// The server's next timeline.
        next_timeline: TimelineId,
        /// Where it starts (the switchpoint).
        next_start: Lsn,
    },
}

/// PostgreSQL's rule for replication slot names (ReplicationSlotValidateName).
pub fn validate_slot_name(slot: &str) -> Result<(), PgError> {
    if slot.is_empty()
        || slot.len() > 63
        || !slot
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        return Err(PgError::Protocol(format!(
            "{slot:?} is not a replication slot name: 1 to 63 of a-z, 0-9 and _"
        )));
    }
    Ok(())
}

fn row_error(
    what: &str,
) -> impl FnOnce(crate::core::pg::replication::ReplicationMessageError) -> PgError + '_ {
    move |e| PgError::Protocol(format!("{what}: {e}"))
}

impl PgConnection {
    /// `READ_REPLICATION_SLOT` (PostgreSQL 15+): `None` when the slot does not exist.
    pub async fn read_replication_slot(&mut self, slot: &str) -> Result<Option<SlotInfo>, PgError> {
        validate_slot_name(slot)?;
        let rows = self
            .simple_query(&format!("READ_REPLICATION_SLOT {slot}"))
            .await?;
        let row = rows
            .first()
            .ok_or_else(|| PgError::Protocol("READ_REPLICATION_SLOT returned no row".into()))?;
        parse_read_slot_row(row).map_err(row_error("READ_REPLICATION_SLOT"))
    }

    /// `CREATE_REPLICATION_SLOT slot PHYSICAL RESERVE_WAL`: a slot that keeps WAL from
    /// now on (unlike pg_receivewal's `--create-slot`); its restart LSN.
    pub async fn create_physical_slot(&mut self, slot: &str) -> Result<Lsn, PgError> {
        validate_slot_name(slot)?;
        let rows = self
            .simple_query(&format!(
                "CREATE_REPLICATION_SLOT {slot} PHYSICAL RESERVE_WAL"
            ))
            .await?;
        let row = rows
            .first()
            .ok_or_else(|| PgError::Protocol("CREATE_REPLICATION_SLOT returned no row".into()))?;
        parse_create_slot_row(row).map_err(row_error("CREATE_REPLICATION_SLOT"))
    }

    /// `TIMELINE_HISTORY tli`: the history file's name and content, as the server holds
    /// them (the name is checked to be the history file of `tli`).
    pub async fn timeline_history(
        &mut self,
        tli: TimelineId,
    ) -> Result<(String, Vec<u8>), PgError> {
        let rows = self
            .simple_query_raw(&format!("TIMELINE_HISTORY {}", tli.0))
            .await?;
        let row = rows
            .into_iter()
            .next()
            .ok_or_else(|| PgError::Protocol("TIMELINE_HISTORY returned no row".into()))?;
        let mut fields = row.into_iter();
        let name = fields
            .next()
            .flatten()
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        let content = fields.next().flatten().unwrap_or_default();
        if name != WalFileName::History(tli).to_string() {
            return Err(PgError::Protocol(format!(
                "TIMELINE_HISTORY {} answered a file named {name:?}",
                tli.0
            )));
        }
        Ok((name, content))
    }

    /// `START_REPLICATION [SLOT slot] PHYSICAL start TIMELINE tli`. The server's refusal
    /// (slot in use, timeline not in its history, ...) is [`PgError::Server`]; a start
    /// whose WAL the server has removed fails at the stream's first [`WalStream::next`].
    pub async fn start_physical(
        &mut self,
        slot: Option<&str>,
        start: Lsn,
        tli: TimelineId,
    ) -> Result<WalStream<'_>, PgError> {
        let slot_clause = match slot {
            Some(s) => {
                validate_slot_name(s)?;
                format!("SLOT {s} ")
            }
            None => String::new(),
        };
        self.send_query(&format!(
            "START_REPLICATION {slot_clause}PHYSICAL {start} TIMELINE {}",
            tli.0
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
        self.set_idle_timeout(None);
        Ok(WalStream {
            conn: self,
            phase: Phase::Streaming,
            end_row: None,
        })
    }
}

/// Where the stream is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// CopyBoth: WAL and keepalives arrive.
    Streaming,
    /// The server sent CopyDone; ours is buffered (sent by the next flush).
    ServerDone,
    /// Both sides sent CopyDone: the result set and ReadyForQuery follow.
    Ending,
    /// Idle again.
    Ended,
}

/// A physical replication stream (CopyBoth) on a borrowed connection.
pub struct WalStream<'a> {
    conn: &'a mut PgConnection,
    phase: Phase,
    /// The end-of-timeline row, once it arrived.
    end_row: Option<Vec<Option<String>>>,
}

impl WalStream<'_> {
    /// The next event. Cancel-safe (module header).
    pub async fn next(&mut self) -> Result<StreamEvent, PgError> {
        loop {
            match self.phase {
                Phase::Ended => {
                    return Err(PgError::Protocol("the replication stream has ended".into()))
                }
                Phase::ServerDone => {
                    self.conn.flush().await?;
                    self.phase = Phase::Ending;
                    continue;
                }
                Phase::Streaming | Phase::Ending => {}
            }
            let message = self.conn.next_message().await?;
            match (self.phase, message) {
                (Phase::Streaming, Message::CopyData(d)) => {
                    let payload = d.into_bytes();
                    match parse_server_message(&payload) {
                        Ok(ServerMessage::XLogData {
                            data_start,
                            wal_end,
                            send_time,
                        }) => {
                            let wal = xlogdata_wal(&payload).len();
                            return Ok(StreamEvent::XLogData {
                                start: Lsn(data_start),
                                wal_end: Lsn(wal_end),
                                send_time,
                                data: payload.slice(payload.len() - wal..),
                            });
                        }
                        Ok(ServerMessage::Keepalive {
                            wal_end,
                            reply_requested,
                            send_time,
                        }) => {
                            return Ok(StreamEvent::Keepalive {
                                wal_end: Lsn(wal_end),
                                reply_requested,
                                send_time,
                            })
                        }
                        Err(e) => {
                            return Err(PgError::Protocol(format!("replication stream: {e}")))
                        }
                    }
                }
                (Phase::Streaming, Message::CopyDone) => {
                    // The end of a timeline: answer with our CopyDone, then the server
                    // sends the next timeline's row, CommandComplete and ReadyForQuery.
                    frontend::copy_done(&mut self.conn.write);
                    self.phase = Phase::ServerDone;
                }
                (_, Message::ErrorResponse(e)) => {
                    self.phase = Phase::Ended;
                    return Err(PgError::Server(server_error(&e)));
                }
                (Phase::Ending, Message::DataRow(row)) => {
                    self.end_row = Some(super::data_row(&row)?);
                }
                (Phase::Ending, Message::ReadyForQuery(_)) => {
                    self.phase = Phase::Ended;
                    self.conn.set_idle_timeout(Some(IDLE_TIMEOUT));
                    let row = self.end_row.take().ok_or_else(|| {
                        PgError::Protocol(
                            "the server ended the stream without naming its next timeline".into(),
                        )
                    })?;
                    let (next_timeline, next_start) =
                        parse_timeline_end_row(&row).map_err(row_error("end of timeline"))?;
                    return Ok(StreamEvent::TimelineEnd {
                        next_timeline,
                        next_start,
                    });
                }
                // RowDescription, CommandComplete, ParameterStatus...
                _ => {}
            }
        }
    }

    /// A standby status update: `written` and `flushed` as given, apply 0, asking for an
    /// immediate reply when `reply_requested`. Nothing is sent once the server ended the
    /// stream.
    pub async fn send_status(
        &mut self,
        written: Lsn,
        flushed: Lsn,
        reply_requested: bool,
    ) -> Result<(), PgError> {
        if self.phase != Phase::Streaming {
            return Ok(());
        }
        let update = standby_status_update(
            written.0,
            flushed.0,
            0,
            PgTimestamp::from_unix_micros(unix_micros_now()),
            reply_requested,
        );
        frontend::CopyData::new(Bytes::from(update))
            .map_err(super::io_err("encoding a status update"))?
            .write(&mut self.conn.write);
        self.conn.flush().await
    }

    /// Ends the stream from our side (CopyDone) and waits for the server to finish it;
    /// the connection is idle again.
    pub async fn stop(mut self) -> Result<(), PgError> {
        if self.phase == Phase::Streaming {
            frontend::copy_done(&mut self.conn.write);
            self.conn.flush().await?;
        }
        let mut error = None;
        while self.phase != Phase::Ended {
            match self.conn.next_message().await? {
                Message::ReadyForQuery(_) => self.phase = Phase::Ended,
                Message::ErrorResponse(e) => error = Some(server_error(&e)),
                _ => {}
            }
        }
        self.conn.set_idle_timeout(Some(IDLE_TIMEOUT));
        match error {
            Some(e) => Err(PgError::Server(e)),
            None => Ok(()),
        }
    }
}

fn unix_micros_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_names_follow_postgresql() {
        assert!(validate_slot_name("walvault").is_ok());
        assert!(validate_slot_name("wal_vault_2").is_ok());
        for bad in ["", "Walvault", "a-b", "a b", "x; DROP", &"a".repeat(64)] {
            assert!(validate_slot_name(bad).is_err(), "{bad}");
        }
    }
}
