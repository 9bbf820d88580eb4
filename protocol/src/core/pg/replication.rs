//! Messages of a physical replication stream (`START_REPLICATION`, CopyBoth), pure (the
//! I/O is `net::pg::replication`).
//!
//! In CopyBoth every message is a CopyData whose first byte says what it is. From the
//! server (all integers big-endian, times in microseconds since 2000-01-01 00:00 UTC,
//! PostgreSQL's epoch, read from the server's clock when it sent the message):
//!
//! ```text
//! 'w' int64 dataStart, int64 walEnd, int64 sendTime, bytes   XLogData
//! 'k' int64 walEnd, int64 sendTime, byte replyRequested      primary keepalive
//! ```
//!
//! From the client:
//!
//! ```text
//! 'r' int64 written, int64 flushed, int64 applied, int64 clientTime, byte replyRequested
//! ```
//!
//! A status update with `replyRequested` 1 makes the server answer at once with a
//! keepalive: the one reading of the server's clock the replication protocol offers.

use bytes::{Buf, BufMut};

use super::wal::{Lsn, TimelineId};

/// Seconds from the Unix epoch to PostgreSQL's (2000-01-01 00:00:00 UTC).
pub const PG_EPOCH_UNIX_SECONDS: i64 = 946_684_800;

/// A CopyData payload of a replication stream that is not a message of it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ReplicationMessageError(String);

/// An instant on the server's clock, as the replication protocol sends it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct PgTimestamp(pub i64);

impl PgTimestamp {
    /// Microseconds since the Unix epoch.
    pub fn unix_micros(self) -> i64 {
        self.0.saturating_add(PG_EPOCH_UNIX_SECONDS * 1_000_000)
    }

    /// Whole seconds since the Unix epoch, rounded up: a time recorded for something that
    /// happened before this instant is then never earlier than it happened.
    pub fn unix_seconds_ceil(self) -> i64 {
        let micros = self.unix_micros();
        micros.div_euclid(1_000_000) + i64::from(micros.rem_euclid(1_000_000) != 0)
    }

    /// From microseconds since the Unix epoch.
    pub fn from_unix_micros(micros: i64) -> PgTimestamp {
        PgTimestamp(micros.saturating_sub(PG_EPOCH_UNIX_SECONDS * 1_000_000))
    }
}

/// A server message of a replication stream, as far as walvault reads it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServerMessage {
    /// XLogData: WAL from `data_start` (its bytes are not kept here).
    XLogData {
        /// LSN of the first byte sent.
        data_start: u64,
        /// The server's end of WAL.
        wal_end: u64,
        /// The server's clock when it sent this.
        send_time: PgTimestamp,
    },
    /// A primary keepalive.
    Keepalive {
        /// The server's end of WAL.
        wal_end: u64,
        /// The server's clock when it sent this.
        send_time: PgTimestamp,
        /// Whether the server wants a status update at once.
        reply_requested: bool,
    },
}

impl ServerMessage {
    /// The server's clock when it sent the message.
    pub fn send_time(&self) -> PgTimestamp {
        match self {
            ServerMessage::XLogData { send_time, .. }
            | ServerMessage::Keepalive { send_time, .. } => *send_time,
        }
    }
}

/// Bytes before the WAL in an XLogData payload (type, dataStart, walEnd, sendTime).
pub const XLOGDATA_HEADER_LEN: usize = 25;

/// The WAL an XLogData payload carries (after [`parse_server_message`] read it as one):
/// everything after its header.
pub fn xlogdata_wal(payload: &[u8]) -> &[u8] {
    payload.get(XLOGDATA_HEADER_LEN..).unwrap_or_default()
}

/// What `READ_REPLICATION_SLOT` says of a slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotInfo {
    /// Where the slot keeps WAL from; `None` for a slot that reserves none yet.
    pub restart_lsn: Option<Lsn>,
    /// The timeline of `restart_lsn`.
    pub restart_tli: Option<TimelineId>,
}

fn field(row: &[Option<String>], i: usize) -> Option<&str> {
    row.get(i).and_then(|v| v.as_deref())
}

fn lsn_field(
    row: &[Option<String>],
    i: usize,
    what: &str,
) -> Result<Option<Lsn>, ReplicationMessageError> {
    field(row, i)
        .map(|v| {
            v.parse::<Lsn>()
                .map_err(|_| ReplicationMessageError(format!("{what} {v:?} is not a WAL position")))
        })
        .transpose()
}

fn tli_field(
    row: &[Option<String>],
    i: usize,
    what: &str,
) -> Result<Option<TimelineId>, ReplicationMessageError> {
    field(row, i)
        .map(|v| match v.parse::<u32>() {
            Ok(t) if t > 0 => Ok(TimelineId(t)),
            _ => Err(ReplicationMessageError(format!(
                "{what} {v:?} is not a timeline"
            ))),
        })
        .transpose()
}

/// The row `READ_REPLICATION_SLOT` answers (slot_type, restart_lsn, restart_tli): `None`
/// for a slot that does not exist (PostgreSQL answers a row of NULLs), an error for a
/// logical slot or a malformed row.
pub fn parse_read_slot_row(
    row: &[Option<String>],
) -> Result<Option<SlotInfo>, ReplicationMessageError> {
    if row.len() < 3 {
        return Err(ReplicationMessageError(format!(
            "READ_REPLICATION_SLOT answered {} columns, not 3",
            row.len()
        )));
    }
    match field(row, 0) {
        None => Ok(None),
        Some("physical") => Ok(Some(SlotInfo {
            restart_lsn: lsn_field(row, 1, "restart_lsn")?,
            restart_tli: tli_field(row, 2, "restart_tli")?,
        })),
        Some(other) => Err(ReplicationMessageError(format!(
            "the slot is a {other} slot; the receiver needs a physical one"
        ))),
    }
}

/// The consistent point of `CREATE_REPLICATION_SLOT ... PHYSICAL RESERVE_WAL` (slot_name,
/// consistent_point, snapshot_name, output_plugin).
pub fn parse_create_slot_row(row: &[Option<String>]) -> Result<Lsn, ReplicationMessageError> {
    lsn_field(row, 1, "consistent_point")?.ok_or_else(|| {
        ReplicationMessageError("CREATE_REPLICATION_SLOT answered no consistent point".into())
    })
}

/// The result set a walsender sends after ending a timeline's stream with CopyDone
/// (next_tli, next_tli_startpos): the next timeline and where it starts.
pub fn parse_timeline_end_row(
    row: &[Option<String>],
) -> Result<(TimelineId, Lsn), ReplicationMessageError> {
    let tli = tli_field(row, 0, "next_tli")?.ok_or_else(|| {
        ReplicationMessageError("the end of the timeline names no next timeline".into())
    })?;
    let start = lsn_field(row, 1, "next_tli_startpos")?.ok_or_else(|| {
        ReplicationMessageError("the end of the timeline gives no start of the next".into())
    })?;
    Ok((tli, start))
}

/// Parses one CopyData payload sent by a walsender.
pub fn parse_server_message(payload: &[u8]) -> Result<ServerMessage, ReplicationMessageError> {
    let mut buf = payload;
    let short = |what: &str| {
        ReplicationMessageError(format!(
            "{what} message of {} bytes is too short",
            payload.len()
        ))
    };
    match buf.first().copied() {
        Some(b'w') => {
            buf.advance(1);
            if buf.remaining() < 24 {
                return Err(short("XLogData"));
            }
            Ok(ServerMessage::XLogData {
                data_start: buf.get_u64(),
                wal_end: buf.get_u64(),
                send_time: PgTimestamp(buf.get_i64()),
            })
        }
        Some(b'k') => {
            buf.advance(1);
            if buf.remaining() < 17 {
                return Err(short("keepalive"));
            }
            Ok(ServerMessage::Keepalive {
                wal_end: buf.get_u64(),
                send_time: PgTimestamp(buf.get_i64()),
                reply_requested: buf.get_u8() != 0,
            })
        }
        Some(t) => Err(ReplicationMessageError(format!(
            "unknown replication message type {:?}",
            t as char
        ))),
        None => Err(ReplicationMessageError(
            "empty replication message".to_string(),
        )),
    }
}

/// A standby status update (`'r'`) reporting the positions given and asking, when
/// `reply_requested`, for an immediate keepalive.
pub fn standby_status_update(
    written: u64,
    flushed: u64,
    applied: u64,
    client_time: PgTimestamp,
    reply_requested: bool,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(34);
    out.put_u8(b'r');
    out.put_u64(written);
    out.put_u64(flushed);
    out.put_u64(applied);
    out.put_i64(client_time.0);
    out.put_u8(u8::from(reply_requested));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keepalive_and_xlogdata_carry_the_server_clock() {
        // 2026-12-02 14:50:05.250000 UTC on PostgreSQL's epoch.
        let unix_micros: i64 = 1_796_223_005_250_000;
        let t = PgTimestamp::from_unix_micros(unix_micros);
        assert_eq!(t.0, unix_micros - 946_684_800_000_000);
        let mut k = vec![b'k'];
        k.extend_from_slice(&0x0000_0001_0300_0028u64.to_be_bytes());
        k.extend_from_slice(&t.0.to_be_bytes());
        k.push(1);
        let m = parse_server_message(&k).unwrap();
        assert_eq!(
            m,
            ServerMessage::Keepalive {
                wal_end: 0x0000_0001_0300_0028,
                send_time: t,
                reply_requested: true
            }
        );
        assert_eq!(m.send_time().unix_micros(), unix_micros);
        assert_eq!(m.send_time().unix_seconds_ceil(), 1_796_223_006);

        let mut w = vec![b'w'];
        w.extend_from_slice(&0x0300_0000u64.to_be_bytes());
        w.extend_from_slice(&0x0300_0100u64.to_be_bytes());
        w.extend_from_slice(&t.0.to_be_bytes());
        w.extend_from_slice(b"WAL bytes");
        assert_eq!(parse_server_message(&w).unwrap().send_time(), t);
    }

    #[test]
    fn whole_seconds_round_up_only_when_there_is_a_fraction() {
        let at = |us: i64| PgTimestamp::from_unix_micros(us).unix_seconds_ceil();
        assert_eq!(at(1_700_000_000_000_000), 1_700_000_000);
        assert_eq!(at(1_700_000_000_000_001), 1_700_000_001);
        assert_eq!(at(1_700_000_000_999_999), 1_700_000_001);
        // Before PostgreSQL's epoch (a server clock far in the past) is still exact.
        assert_eq!(PgTimestamp(-1).unix_seconds_ceil(), PG_EPOCH_UNIX_SECONDS);
        assert_eq!(
            PgTimestamp(-1_000_000).unix_seconds_ceil(),
            PG_EPOCH_UNIX_SECONDS - 1
        );
    }

    #[test]
    fn every_truncation_is_a_typed_error() {
        let mut k = vec![b'k'];
        k.extend_from_slice(&[0u8; 17]);
        let mut w = vec![b'w'];
        w.extend_from_slice(&[0u8; 24]);
        for full in [k, w] {
            assert!(parse_server_message(&full).is_ok());
            for len in 0..full.len() {
                assert!(parse_server_message(&full[..len]).is_err(), "{len}");
            }
        }
        assert!(parse_server_message(b"x").is_err());
    }

    #[test]
    fn slot_rows_as_postgresql_answers_them() {
        let s = |v: &str| Some(v.to_string());
        assert_eq!(parse_read_slot_row(&[None, None, None]).unwrap(), None);
        assert_eq!(
            parse_read_slot_row(&[s("physical"), s("0/3000060"), s("1")]).unwrap(),
            Some(SlotInfo {
                restart_lsn: Some(Lsn(0x3000060)),
                restart_tli: Some(TimelineId(1))
            })
        );
        assert_eq!(
            parse_read_slot_row(&[s("physical"), None, None]).unwrap(),
            Some(SlotInfo {
                restart_lsn: None,
                restart_tli: None
            })
        );
        assert!(parse_read_slot_row(&[s("logical"), s("0/1"), s("1")]).is_err());
        assert!(parse_read_slot_row(&[s("physical"), s("zz"), s("1")]).is_err());
        assert!(parse_read_slot_row(&[s("physical"), s("0/1"), s("0")]).is_err());
        assert!(parse_read_slot_row(&[s("physical")]).is_err());
        assert_eq!(
            parse_create_slot_row(&[s("walvault"), s("0/1A2B3C8"), None, None]).unwrap(),
            Lsn(0x1A2B3C8)
        );
        assert!(parse_create_slot_row(&[s("walvault"), None]).is_err());
        assert_eq!(
            parse_timeline_end_row(&[s("2"), s("0/5000A0")]).unwrap(),
            (TimelineId(2), Lsn(0x5000A0))
        );
        assert!(parse_timeline_end_row(&[s("2")]).is_err());
        assert!(parse_timeline_end_row(&[]).is_err());
    }

    proptest::proptest! {
        #[test]
        fn no_row_or_payload_makes_a_parser_panic(
            row in proptest::collection::vec(proptest::option::of("\\PC{0,12}"), 0..5),
            payload in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64),
        ) {
            let _ = parse_read_slot_row(&row);
            let _ = parse_create_slot_row(&row);
            let _ = parse_timeline_end_row(&row);
            if let Ok(ServerMessage::XLogData { .. }) = parse_server_message(&payload) {
                proptest::prop_assert_eq!(xlogdata_wal(&payload).len(), payload.len() - XLOGDATA_HEADER_LEN);
            }
        }
    }

    #[test]
    fn status_update_layout() {
        let r = standby_status_update(1, 2, 3, PgTimestamp(4), true);
        assert_eq!(r.len(), 34);
        assert_eq!(r[0], b'r');
        assert_eq!(&r[1..9], &1u64.to_be_bytes());
        assert_eq!(&r[9..17], &2u64.to_be_bytes());
        assert_eq!(&r[17..25], &3u64.to_be_bytes());
        assert_eq!(&r[25..33], &4i64.to_be_bytes());
        assert_eq!(r[33], 1);
        assert_eq!(standby_status_update(0, 0, 0, PgTimestamp(0), false)[33], 0);
    }
}
