//! `BASE_BACKUP` on a physical replication connection (PostgreSQL 15 and later): the
//! exchange's I/O. The command text and the messages are parsed in
//! [`core::pg::basebackup`](crate::core::pg::basebackup).
//!
//! [`BaseBackup::start`] sends the command and reads the start position and the
//! tablespace list; [`BaseBackup::next`] yields the COPY stream's messages;
//! [`BaseBackup::finish`] reads the stop position.

use postgres_protocol::message::backend::Message;

use super::{data_row, server_error, PgConnection, PgError};
use crate::core::pg::basebackup::{
    parse_copy_message, BaseBackupOptions, CopyMessage, TablespaceInfo,
};

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
        // The server answers only after its checkpoint, which a spread checkpoint can
        // make minutes: no read timeout until the COPY stream starts (keepalives watch a
        // TCP peer meanwhile), then the idle timeout again.
        conn.set_idle_timeout(None);
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
                Message::CopyOutResponse(_) => {
                    conn.set_idle_timeout(Some(super::IDLE_TIMEOUT));
                    break;
                }
                Message::ErrorResponse(e) => {
                    let err = server_error(&e);
                    conn.set_idle_timeout(Some(super::IDLE_TIMEOUT));
                    conn.drain_to_ready().await;
                    return Err(PgError::Server(err));
                }
                Message::CommandComplete(_) => {}
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
        match self.conn.next_message().await? {
            Message::CopyData(body) => parse_copy_message(body.into_bytes())
                .map(Some)
                .map_err(|e| PgError::Protocol(e.to_string())),
            Message::CopyDone => {
                self.finished = true;
                Ok(None)
            }
            Message::ErrorResponse(e) => {
                let err = server_error(&e);
                self.conn.drain_to_ready().await;
                Err(PgError::Server(err))
            }
            _ => Err(PgError::Protocol(
                "unexpected message inside BASE_BACKUP's COPY".into(),
            )),
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
