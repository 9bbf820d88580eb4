//! `BASE_BACKUP` (PostgreSQL 15 and later): the command text and the messages of its COPY
//! stream, pure (the I/O is `net::pg::basebackup`).
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
//! the parser of one CopyData payload: any input gives a message or a typed error.

use bytes::{Buf, Bytes};

/// A CopyData payload that is not a BASE_BACKUP message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct CopyMessageError(String);

/// Quotes a string as a SQL / replication-grammar literal.
pub fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// Takes a NUL-terminated string off the front of `buf`.
fn take_cstr(buf: &mut &[u8]) -> Option<String> {
    let end = buf.iter().position(|b| *b == 0)?;
    let s = String::from_utf8_lossy(&buf[..end]).into_owned();
    buf.advance(end + 1);
    Some(s)
}

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
pub fn parse_copy_message(mut data: Bytes) -> Result<CopyMessage, CopyMessageError> {
    if data.is_empty() {
        return Err(CopyMessageError("empty CopyData in BASE_BACKUP".into()));
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
                _ => Err(CopyMessageError("malformed new-archive message".into())),
            }
        }
        b'd' => Ok(CopyMessage::Data(data)),
        b'm' if data.is_empty() => Ok(CopyMessage::Manifest),
        b'p' if data.len() == 8 => Ok(CopyMessage::Progress(data.get_u64())),
        other => Err(CopyMessageError(format!(
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
