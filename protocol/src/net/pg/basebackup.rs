//! `BASE_BACKUP` on a physical replication connection (PostgreSQL 15 and later).
//!
//! The server answers with a result set (start LSN, timeline), a result set of
//! tablespaces (OID, location, size in KiB; PGDATA last, with NULL OID), then one COPY OUT
//! stream whose CopyData messages start with a type byte:
//!
//! ```text
//! 'n' name\0 location\0   a new archive begins: "base.tar" (PGDATA, location "") or
//!                         "<oid>.tar" (a tablespace at location)
//! 'd' bytes               content of the current archive, or of the manifest after 'm'
//! 'm'                     the backup manifest follows
//! 'p' int64               progress: bytes sent so far
//! ```
//!
//! then CopyDone and a last result set (stop LSN, timeline). [`parse_copy_message`] is
//! the pure parser of one CopyData payload; [`BaseBackup`] drives the exchange.

use bytes::{Buf, Bytes};
use postgres_protocol::message::backend::Message;

use super::{data_row, quote_literal, server_error, take_cstr, PgConnection, PgError};

/// What to ask BASE_BACKUP for.
#[derive(Clone, Debug)]
pub struct BaseBackupOptions {
    /// Label (recorded in backup_label).
    pub label: String,
    /// Immediate checkpoint instead of a spread one.
    pub fast_checkpoint: bool,
    /// Ask for sizes first and progress messages.
    pub progress: bool,
    /// Server-side rate limit in kB/s (32..=1048576), like `pg_basebackup --max-rate`.
    pub max_rate_kb: Option<u32>,
}

impl BaseBackupOptions {
    /// The command: manifest with CRC32C checksums, no WAL (the archive has it) and no
    /// wait for archiving in the server (the client waits, with a timeout).
    pub fn command(&self) -> String {
        let mut opts = vec![
            format!("LABEL {}", quote_literal(&self.label)),
            format!(
                "CHECKPOINT '{}'",
                if self.fast_checkpoint {
                    "fast"
                } else {
                    "spread"
                }
            ),
            "WAL false".to_string(),
            "WAIT false".to_string(),
            "MANIFEST 'yes'".to_string(),
            "MANIFEST_CHECKSUMS 'CRC32C'".to_string(),
        ];
        if self.progress {
            opts.push("PROGRESS true".to_string());
        }
        if let Some(rate) = self.max_rate_kb {
            opts.push(format!("MAX_RATE {}", rate.clamp(32, 1_048_576)));
        }
        format!("BASE_BACKUP ({})", opts.join(", "))
    }
}

/// One CopyData message of a BASE_BACKUP stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CopyMessage {
    /// A new archive begins.
    NewArchive {
        /// Archive name: `base.tar` or `<oid>.tar`.
        name: String,
        /// Tablespace location, empty for PGDATA.
        location: String,
    },
    /// Archive or manifest content.
    Data(Bytes),
    /// The manifest follows.
    Manifest,
    /// Bytes sent so far.
    Progress(u64),
}

/// Parses one CopyData payload.
pub fn parse_copy_message(mut data: Bytes) -> Result<CopyMessage, PgError> {
    if data.is_empty() {
        return Err(PgError::Protocol("empty CopyData in BASE_BACKUP".into()));
    }
    let kind = data[0];
    data.advance(1);
    match kind {
        b'n' => {
            let mut rest: &[u8] = &data;
            let name = take_cstr(&mut rest);
            let location = take_cstr(&mut rest);
            match (name, location) {
                (Some(name), Some(location)) if rest.is_empty() => {
                    Ok(CopyMessage::NewArchive { name, location })
                }
                _ => Err(PgError::Protocol("malformed new-archive message".into())),
            }
        }
        b'd' => Ok(CopyMessage::Data(data)),
        b'm' if data.is_empty() => Ok(CopyMessage::Manifest),
        b'p' if data.len() == 8 => Ok(CopyMessage::Progress(data.get_u64())),
        other => Err(PgError::Protocol(format!(
            "unexpected BASE_BACKUP message type {:?} ({} bytes); is the server older than PostgreSQL 15?",
            other as char,
            data.len()
        ))),
    }
}

/// A tablespace as BASE_BACKUP lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TablespaceInfo {
    /// OID; `None` for PGDATA.
    pub oid: Option<u32>,
    /// Location; `None` for PGDATA.
    pub location: Option<String>,
    /// Estimated size in bytes (with PROGRESS).
    pub size: Option<u64>,
}

/// A running BASE_BACKUP.
pub struct BaseBackup<'a> {
    conn: &'a mut PgConnection,
    /// Start LSN as the server prints it.
    pub start_lsn: String,
    /// Start timeline.
    pub start_timeline: u32,
    /// Tablespaces, PGDATA last.
    pub tablespaces: Vec<TablespaceInfo>,
    finished: bool,
}

/// The end of a BASE_BACKUP.
#[derive(Clone, Debug)]
pub struct BackupEnd {
    /// Stop LSN.
    pub stop_lsn: String,
    /// Stop timeline.
    pub stop_timeline: u32,
}

impl<'a> BaseBackup<'a> {
    /// Sends BASE_BACKUP and reads up to the start of the COPY stream.
    pub async fn start(
        conn: &'a mut PgConnection,
        options: &BaseBackupOptions,
    ) -> Result<BaseBackup<'a>, PgError> {
        conn.send_query(&options.command()).await?;
        let mut result_sets: Vec<Vec<Vec<Option<String>>>> = Vec::new();
        loop {
            match conn.next_message().await? {
                Message::RowDescription(_) => result_sets.push(Vec::new()),
                Message::DataRow(row) => match result_sets.last_mut() {
                    Some(set) => set.push(data_row(&row)?),
                    None => {
                        return Err(PgError::Protocol("data row before its description".into()))
                    }
                },
                Message::CopyOutResponse(_) => break,
                Message::ErrorResponse(e) => {
                    let err = server_error(&e);
                    drain_to_ready(conn).await;
                    return Err(PgError::Server(err));
                }
                Message::CommandComplete(_) | Message::NoticeResponse(_) => {}
                Message::ReadyForQuery(_) => {
                    return Err(PgError::Protocol(
                        "BASE_BACKUP ended before its COPY stream".into(),
                    ))
                }
                _ => {}
            }
        }
        let start = result_sets
            .first()
            .and_then(|s| s.first())
            .ok_or_else(|| PgError::Protocol("BASE_BACKUP sent no start position".into()))?;
        let start_lsn = start.first().cloned().flatten().unwrap_or_default();
        let start_timeline = start
            .get(1)
            .cloned()
            .flatten()
            .and_then(|t| t.parse().ok())
            .ok_or_else(|| PgError::Protocol("BASE_BACKUP sent no start timeline".into()))?;
        let mut tablespaces = Vec::new();
        for row in result_sets.get(1).map(Vec::as_slice).unwrap_or(&[]) {
            let oid = match row.first().cloned().flatten() {
                Some(o) => Some(
                    o.parse()
                        .map_err(|_| PgError::Protocol(format!("bad tablespace OID {o:?}")))?,
                ),
                None => None,
            };
            tablespaces.push(TablespaceInfo {
                oid,
                location: row.get(1).cloned().flatten(),
                size: row
                    .get(2)
                    .cloned()
                    .flatten()
                    .and_then(|s| s.parse::<u64>().ok())
                    .map(|kb| kb * 1024),
            });
        }
        Ok(BaseBackup {
            conn,
            start_lsn,
            start_timeline,
            tablespaces,
            finished: false,
        })
    }

    /// The next message of the COPY stream; `Ok(None)` after CopyDone (then call
    /// [`finish`](Self::finish)).
    pub async fn next(&mut self) -> Result<Option<CopyMessage>, PgError> {
        if self.finished {
            return Ok(None);
        }
        loop {
            match self.conn.next_message().await? {
                Message::CopyData(body) => return parse_copy_message(body.into_bytes()).map(Some),
                Message::CopyDone => {
                    self.finished = true;
                    return Ok(None);
                }
                Message::ErrorResponse(e) => {
                    let err = server_error(&e);
                    drain_to_ready(self.conn).await;
                    return Err(PgError::Server(err));
                }
                Message::NoticeResponse(_) => {}
                _ => {
                    return Err(PgError::Protocol(
                        "unexpected message inside BASE_BACKUP's COPY".into(),
                    ))
                }
            }
        }
    }

    /// Reads the stop position and waits for the server to be ready again.
    pub async fn finish(self) -> Result<BackupEnd, PgError> {
        if !self.finished {
            return Err(PgError::Protocol(
                "BASE_BACKUP finished before its COPY stream ended".into(),
            ));
        }
        let mut end: Option<Vec<Option<String>>> = None;
        let mut error = None;
        loop {
            match self.conn.next_message().await? {
                Message::DataRow(row) => end = Some(data_row(&row)?),
                Message::ErrorResponse(e) => error = Some(server_error(&e)),
                Message::ReadyForQuery(_) => break,
                _ => {}
            }
        }
        if let Some(e) = error {
            return Err(PgError::Server(e));
        }
        let end =
            end.ok_or_else(|| PgError::Protocol("BASE_BACKUP sent no stop position".into()))?;
        Ok(BackupEnd {
            stop_lsn: end.first().cloned().flatten().unwrap_or_default(),
            stop_timeline: end
                .get(1)
                .cloned()
                .flatten()
                .and_then(|t| t.parse().ok())
                .ok_or_else(|| PgError::Protocol("BASE_BACKUP sent no stop timeline".into()))?,
        })
    }
}

async fn drain_to_ready(conn: &mut PgConnection) {
    while let Ok(m) = conn.next_message().await {
        if matches!(m, Message::ReadyForQuery(_)) {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_messages() {
        assert_eq!(
            parse_copy_message(Bytes::from_static(b"nbase.tar\0\0")).unwrap(),
            CopyMessage::NewArchive {
                name: "base.tar".into(),
                location: String::new()
            }
        );
        assert_eq!(
            parse_copy_message(Bytes::from_static(b"n16384.tar\0/srv/ts\0")).unwrap(),
            CopyMessage::NewArchive {
                name: "16384.tar".into(),
                location: "/srv/ts".into()
            }
        );
        assert_eq!(
            parse_copy_message(Bytes::from_static(b"dabc")).unwrap(),
            CopyMessage::Data(Bytes::from_static(b"abc"))
        );
        assert_eq!(
            parse_copy_message(Bytes::from_static(b"m")).unwrap(),
            CopyMessage::Manifest
        );
        let mut p = b"p".to_vec();
        p.extend_from_slice(&1234u64.to_be_bytes());
        assert_eq!(
            parse_copy_message(Bytes::from(p)).unwrap(),
            CopyMessage::Progress(1234)
        );
        for bad in [&b""[..], b"nbase.tar", b"p12", b"x", b"mzz"] {
            assert!(
                parse_copy_message(Bytes::copy_from_slice(bad)).is_err(),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn command_text() {
        let c = BaseBackupOptions {
            label: "it's".into(),
            fast_checkpoint: true,
            progress: false,
            max_rate_kb: None,
        }
        .command();
        assert_eq!(
            c,
            "BASE_BACKUP (LABEL 'it''s', CHECKPOINT 'fast', WAL false, WAIT false, MANIFEST 'yes', MANIFEST_CHECKSUMS 'CRC32C')"
        );
    }
}
