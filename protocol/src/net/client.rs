//! The typed client of the archive protocol: one method per request the binaries make,
//! a deadline on every request, and errors that say what they mean.
//!
//! Contract:
//!
//! - **Deadlines.** Every request has an idle deadline ([`Timeouts::idle`]: no byte sent
//!   to or received from the archive for that long) and a total deadline
//!   ([`Timeouts::total`]), besides the connect timeout of [`ArchiveClient::connect`]. A
//!   request that passes either fails with [`ClientError::Deadline`]; its stream is reset,
//!   so the archive stops working on it. QUIC keep-alives keep a connection to a wedged but
//!   living archive open; these deadlines are what ends the wait then. Time spent waiting
//!   on the caller's own body source does not count as the archive's idleness, only
//!   against the total.
//! - **Answers.** A method returns `Ok` only when the archive answered with the success
//!   response of that request; for the `put_*` methods that answer is the archive's
//!   durability promise (see `archived`'s handlers). Every `Response::Error` becomes
//!   [`ClientError::Refused`] with the archive's code and message.
//! - **Verified reads.** [`ArchiveClient::get_wal`] and [`ArchiveClient::get_backup`]
//!   decompress and check size and blake3 against what the archive recorded at push
//!   time before they return `Ok`. Bytes handed to a sink before that are unverified: a
//!   caller makes them visible (renames them into place) only after `Ok`.
//! - **Errors classify themselves.** [`ClientError::is_transient`] decides retry (with
//!   [`crate::net::retry`]); [`ClientError::class`] tells "archive unreachable", "not in
//!   the archive" and "the archive has it but could not deliver it" apart, for callers
//!   whose exit code depends on that (archive-get).
//!
//! - **Listings are whole.** [`ArchiveClient::list_wal`] and
//!   [`ArchiveClient::list_backups`] ask for every page of a listing in turn (each a
//!   request of its own, with its own deadlines) and return the whole of it;
//!   [`ArchiveClient::binding`] reads only the first page, for callers that need only the
//!   cluster's system identifier and segment size.
//!
//! One [`ArchiveClient`] is one QUIC connection; clones share it, and requests on it run
//! concurrently (one stream each, at most
//! [`crate::net::transport::MAX_STREAMS_PER_CONNECTION`] at once).

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt};

use crate::core::format::codec::{DecodeOrSinkError, VerifyingDecoder};
use crate::core::wire::admin::RetentionReport;
use crate::core::wire::audit::{AuditRecord, FetchPurpose};
use crate::core::wire::backup::{BackupSummary, PackChunk};
use crate::core::wire::{
    self, CheckResult, ClusterStatus, ErrorCode, Request, Response, WalListing, MAX_OBJECT_SIZE,
};
use crate::net::config::ClientConfig;
use crate::net::retry::Transient;
use crate::net::transport::{
    encode_request, ArchiveConnection, ClientTls, ConnectError, ReadFrameError, Timeouts,
};

/// Body bytes handed to QUIC per write. The idle deadline applies to each write, so an
/// upload that is slow but moving never trips it, and one that stops does within `idle`.
const SEND_PIECE: usize = 256 << 10;

/// The PostgreSQL system a cluster name is bound to ([`ArchiveClient::binding`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WalBinding {
    /// pg_control's system identifier.
    pub system_identifier: u64,
    /// The WAL segment size.
    pub segment_size: u32,
}

/// Which deadline a request passed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Deadline {
    /// No progress for [`Timeouts::idle`].
    Idle,
    /// Not done within [`Timeouts::total`].
    Total,
}

/// What a failure says about the archive and the object asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorClass {
    /// No answer from the archive: it cannot be reached, or it stopped answering before
    /// it answered this request, or it is shutting down (`Unavailable`).
    Unreachable,
    /// The archive answered that it does not have the object.
    NotFound,
    /// The archive answered, but the object did not arrive complete and verified: the
    /// transfer stalled or broke after the answer, the bytes failed verification, or the
    /// archive failed on its side (`Internal`) or answered nonsense.
    Undelivered,
    /// The archive refused the request (conflict, invalid, unauthorized, wrong cluster,
    /// too large): the request itself must change.
    Refused,
    /// This client's configuration cannot work with this archive (unusable certificates,
    /// a TLS refusal at the handshake, another protocol version).
    Misconfigured,
    /// A failure on this side: reading the body to send, writing what was received.
    Local,
}

/// Why a request to the archive failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No connection could be made.
    #[error("{}", connect_text(.0))]
    Connect(#[source] ConnectError),
    /// A deadline passed.
    #[error("{what}: {}", deadline_text(*.deadline, *.after, *.answered))]
    Deadline {
        /// The request, for the message.
        what: String,
        /// Which deadline.
        deadline: Deadline,
        /// Its length.
        after: Duration,
        /// Whether the archive had answered (the body was on its way) when it passed.
        answered: bool,
    },
    /// The connection or the request's stream broke.
    #[error("{what}: connection to the archive lost ({reason})")]
    ConnectionLost {
        /// The request.
        what: String,
        /// What the transport said.
        reason: String,
        /// Whether the archive had answered when it broke.
        answered: bool,
    },
    /// The archive answered with an error.
    #[error("archive refused {what} ({code:?}): {message}")]
    Refused {
        /// The request.
        what: String,
        /// The archive's class of failure.
        code: ErrorCode,
        /// The archive's explanation.
        message: String,
    },
    /// What the archive sent is not the object it announced.
    #[error("{what}: the archived copy {reason}")]
    Corrupt {
        /// The object.
        what: String,
        /// How it failed ("failed verification: ...", "is incomplete", ...).
        reason: String,
    },
    /// An answer this request does not expect (a protocol mismatch or an archive bug).
    #[error("{what}: unexpected answer from the archive: {answer}")]
    Unexpected {
        /// The request.
        what: String,
        /// The answer, abridged.
        answer: String,
    },
    /// The caller's body source or sink failed.
    #[error("{what}: {source}")]
    Local {
        /// What was being read or written.
        what: String,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
}

fn connect_text(e: &ConnectError) -> String {
    match e {
        ConnectError::Tls(_) => format!("{e}: fix the client config"),
        _ if e.is_refusal() => format!(
            "{e} (is this client config issued by this archive's `archived issue`, and are both \
             the same walvault version?)"
        ),
        _ => format!("archive unreachable: {e}"),
    }
}

fn deadline_text(deadline: Deadline, after: Duration, answered: bool) -> String {
    let secs = after.as_secs_f64();
    match (deadline, answered) {
        (Deadline::Idle, false) => {
            format!("the archive made no progress for {secs} s and never answered (idle timeout)")
        }
        (Deadline::Idle, true) => {
            format!("the archive answered, then sent nothing for {secs} s (idle timeout)")
        }
        (Deadline::Total, false) => {
            format!("no answer from the archive within {secs} s (request timeout)")
        }
        (Deadline::Total, true) => {
            format!("the transfer did not complete within {secs} s (request timeout)")
        }
    }
}

impl ClientError {
    /// Whether the same request may succeed later: the archive was unreachable, a
    /// deadline passed, the connection broke, or the archive answered `Unavailable` or
    /// `Internal`. `Internal` is a failure on the archive's side: mostly passing (a
    /// storage hiccup, a pack id collision the client cures with a new id), sometimes
    /// lasting (a full disk). It is retried, but only as many times as a
    /// [`crate::net::retry::RetryPolicy`] allows, so a lasting one costs a few attempts
    /// and then reports the archive's message.
    pub fn is_transient(&self) -> bool {
        match self {
            ClientError::Connect(e) => !e.is_refusal(),
            ClientError::Deadline { .. } | ClientError::ConnectionLost { .. } => true,
            ClientError::Refused { code, .. } => code.is_transient(),
            ClientError::Corrupt { .. }
            | ClientError::Unexpected { .. }
            | ClientError::Local { .. } => false,
        }
    }

    /// What the failure says about the archive (see [`ErrorClass`]).
    pub fn class(&self) -> ErrorClass {
        match self {
            ClientError::Connect(e) if e.is_refusal() => ErrorClass::Misconfigured,
            ClientError::Connect(_) => ErrorClass::Unreachable,
            ClientError::Deadline { answered, .. }
            | ClientError::ConnectionLost { answered, .. } => {
                if *answered {
                    ErrorClass::Undelivered
                } else {
                    ErrorClass::Unreachable
                }
            }
            ClientError::Refused { code, .. } => match code {
                ErrorCode::NotFound => ErrorClass::NotFound,
                ErrorCode::Unavailable => ErrorClass::Unreachable,
                ErrorCode::Internal => ErrorClass::Undelivered,
                ErrorCode::Conflict
                | ErrorCode::Invalid
                | ErrorCode::Unauthorized
                | ErrorCode::WrongCluster
                | ErrorCode::TooLarge => ErrorClass::Refused,
            },
            ClientError::Corrupt { .. } | ClientError::Unexpected { .. } => ErrorClass::Undelivered,
            ClientError::Local { .. } => ErrorClass::Local,
        }
    }

    /// Whether the archive answered that it does not have the object.
    pub fn is_not_found(&self) -> bool {
        self.class() == ErrorClass::NotFound
    }

    /// The archive's error code, when it answered with one.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Refused { code, .. } => Some(*code),
            _ => None,
        }
    }
}

impl Transient for ClientError {
    fn is_transient(&self) -> bool {
        ClientError::is_transient(self)
    }
}

/// Answer to [`ArchiveClient::ping`]: who the archive thinks this client is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pong {
    /// Cluster named in the client certificate.
    pub cluster: String,
    /// Role named in the client certificate.
    pub role: String,
    /// The archive's walvault version.
    pub version: String,
}

/// An object the archive delivered, verified.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delivered {
    /// Size of the raw (decompressed) object.
    pub raw_size: u64,
    /// Its blake3, hex, as the archive recorded it at push time (and as checked).
    pub blake3: String,
    /// For the streaming receiver's unfinished segment (zero-padded to the segment
    /// size): the bytes of WAL it holds. Never keep such a copy as if complete.
    pub partial_bytes: Option<u64>,
}

/// Answer to [`ArchiveClient::stream_append`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamFlushed {
    /// Offset in the segment up to which the archive holds it fdatasynced.
    pub flushed: u64,
    /// The segment is complete.
    pub complete: bool,
}

/// The sending half of a stream session ([`ArchiveClient::stream_session`]).
pub struct StreamSender {
    cluster: String,
    system_identifier: u64,
    segment_size: u32,
    idle: Duration,
    send: quinn::SendStream,
}

impl StreamSender {
    /// Sends one append (`bytes` at `offset` of `segment`, at most
    /// [`crate::core::wire::MAX_STREAM_APPEND`] bytes); returns once the transport took
    /// it, not when it is durable (that is the [`StreamAcks`]). Each write must progress
    /// within the idle deadline.
    /// `server_wal_end`: where the server's WAL ended as the receiver last heard.
    pub async fn append(
        &mut self,
        segment: &str,
        offset: u64,
        bytes: Bytes,
        server_wal_end: Option<u64>,
    ) -> Result<(), ClientError> {
        let what = format!("streaming {segment} from offset {offset}");
        let header = encode_request(&Request::StreamAppend {
            cluster: self.cluster.clone(),
            segment: segment.to_string(),
            offset,
            len: bytes.len() as u64,
            system_identifier: self.system_identifier,
            segment_size: self.segment_size,
            server_wal_end,
        });
        // The announcement and the first piece of the body in one write: a small append
        // then leaves in one packet.
        let mut pieces = (0..bytes.len())
            .step_by(SEND_PIECE)
            .map(|at| bytes.slice(at..(at + SEND_PIECE).min(bytes.len())));
        let mut batches = vec![vec![Bytes::from(header)]];
        batches[0].extend(pieces.next());
        batches.extend(pieces.map(|p| vec![p]));
        for mut batch in batches {
            let write = self.send.write_all_chunks(&mut batch);
            match tokio::time::timeout(self.idle, write).await {
                Err(_) => return Err(idle_deadline(&what, self.idle, false)),
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    return Err(ClientError::ConnectionLost {
                        what,
                        reason: e.to_string(),
                        answered: false,
                    })
                }
            }
        }
        Ok(())
    }

    /// Ends the session from this side: the archive syncs and acknowledges what it has,
    /// then ends its side.
    pub fn finish(&mut self) {
        let _ = self.send.finish();
    }
}

/// The acknowledging half of a stream session.
pub struct StreamAcks {
    recv: quinn::RecvStream,
}

impl StreamAcks {
    /// The next acknowledgement: the count of the session's appends durable in the
    /// archive so far; `None` when the archive ended the session without an error (after
    /// [`StreamSender::finish`]). A refusal (`Err`) ends the session. Not cancel-safe:
    /// keep it in a task of its own.
    pub async fn next(&mut self) -> Result<Option<u64>, ClientError> {
        let what = "the stream session";
        let mut prefix = [0u8; 4];
        let mut got = 0;
        while got < 4 {
            match self.recv.read(&mut prefix[got..]).await {
                Ok(Some(n)) => got += n,
                Ok(None) if got == 0 => return Ok(None),
                Ok(None) => {
                    return Err(ClientError::Unexpected {
                        what: what.to_string(),
                        answer: "the archive's answer ended inside a frame".into(),
                    })
                }
                Err(e) => {
                    return Err(ClientError::ConnectionLost {
                        what: what.to_string(),
                        reason: e.to_string(),
                        answered: false,
                    })
                }
            }
        }
        let unexpected = |answer: String| ClientError::Unexpected {
            what: what.to_string(),
            answer,
        };
        let len = wire::frame_len(prefix).map_err(|e| unexpected(e.to_string()))?;
        let mut payload = vec![0u8; len];
        self.recv
            .read_exact(&mut payload)
            .await
            .map_err(|e| ClientError::ConnectionLost {
                what: what.to_string(),
                reason: e.to_string(),
                answered: false,
            })?;
        match wire::decode_frame::<Response>(&payload).map_err(|e| unexpected(e.to_string()))? {
            Response::StreamAcked { appends } => Ok(Some(appends)),
            other => Err(answer_error(what, other)),
        }
    }
}

/// Answer to [`ArchiveClient::put_pack`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PackStored {
    /// Chunks the archive did not hold before.
    pub new_chunks: u32,
    /// Bytes the pack takes in the store.
    pub stored_bytes: u64,
}

/// A retention run as [`ArchiveClient::retention`] asks for it (see
/// [`Request::Retention`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RetentionRun {
    /// One cluster, or every cluster when `None`.
    pub cluster: Option<String>,
    /// Keep this many newest usable backups (overrides the server's policy).
    pub keep_full: Option<u32>,
    /// Keep every backup needed to restore to any point of this many past seconds.
    pub keep_within_secs: Option<u64>,
    /// Collect unreferenced chunks only when untouched for this many seconds.
    pub chunk_grace_secs: Option<u64>,
    /// Report the plan, delete nothing.
    pub dry_run: bool,
    /// Measure the keep-within window back from this Unix time instead of the server's
    /// clock (for tests).
    pub window_end: Option<i64>,
}

/// A connection to the archive with one typed method per request.
#[derive(Clone)]
pub struct ArchiveClient {
    connection: std::sync::Arc<ArchiveConnection>,
    cluster: String,
    timeouts: Timeouts,
    /// The backup lease the backup requests name (see `Request::BeginBackup`).
    lease: Option<String>,
}

impl ArchiveClient {
    /// Connects with the config's server, certificates and timeouts; requests name the
    /// config's cluster.
    pub async fn connect(cfg: &ClientConfig) -> Result<ArchiveClient, ClientError> {
        ArchiveClient::connect_tls(&cfg.tls(), &cfg.cluster).await
    }

    /// Connects (resolve and handshake within `tls.timeouts.connect`); requests name
    /// `cluster`.
    pub async fn connect_tls(tls: &ClientTls, cluster: &str) -> Result<ArchiveClient, ClientError> {
        let connection = ArchiveConnection::connect(tls)
            .await
            .map_err(ClientError::Connect)?;
        Ok(ArchiveClient {
            connection: std::sync::Arc::new(connection),
            cluster: cluster.to_string(),
            timeouts: tls.timeouts,
            lease: None,
        })
    }

    /// The same connection, with requests naming `cluster` (admin certificates may
    /// access every cluster).
    pub fn for_cluster(&self, cluster: &str) -> ArchiveClient {
        ArchiveClient {
            cluster: cluster.to_string(),
            ..self.clone()
        }
    }

    /// The same connection, with other deadlines (for requests the archive works on
    /// silently for long, such as a retention run).
    pub fn with_timeouts(&self, timeouts: Timeouts) -> ArchiveClient {
        ArchiveClient {
            timeouts,
            ..self.clone()
        }
    }

    /// The same connection, with the backup requests (chunks missing, put pack, put
    /// chunk, put backup) naming backup lease `lease`.
    pub fn with_lease(&self, lease: Option<String>) -> ArchiveClient {
        ArchiveClient {
            lease,
            ..self.clone()
        }
    }

    /// The cluster requests name.
    pub fn cluster(&self) -> &str {
        &self.cluster
    }

    /// The deadlines requests get.
    pub fn timeouts(&self) -> Timeouts {
        self.timeouts
    }

    /// Whether the connection has ended (a new one is needed).
    pub fn is_closed(&self) -> bool {
        self.connection.connection.close_reason().is_some()
    }

    /// Closes the connection if this is its last user (clones share it), letting the
    /// server free it at once.
    pub async fn close(self) {
        if let Ok(connection) = std::sync::Arc::try_unwrap(self.connection) {
            connection.close().await;
        }
    }

    /// `Ping`: the cluster and role the archive reads in this client's certificate.
    pub async fn ping(&self) -> Result<Pong, ClientError> {
        let what = "ping".to_string();
        match self.simple(&what, &Request::Ping).await? {
            Response::Pong {
                cluster,
                role,
                version,
            } => Ok(Pong {
                cluster,
                role,
                version,
            }),
            other => Err(answer_error(&what, other)),
        }
    }

    /// `Status`: this client's cluster, or (`all`, admin only) every cluster.
    pub async fn status(&self, all: bool) -> Result<Vec<ClusterStatus>, ClientError> {
        let what = match all {
            true => "the status of every cluster".to_string(),
            false => format!("the status of cluster '{}'", self.cluster),
        };
        let request = Request::Status {
            cluster: (!all).then(|| self.cluster.clone()),
        };
        match self.simple(&what, &request).await? {
            Response::Status { clusters } => Ok(clusters),
            other => Err(answer_error(&what, other)),
        }
    }

    /// `Check`: the archive's named checks of this client's cluster.
    pub async fn check(&self) -> Result<Vec<CheckResult>, ClientError> {
        let what = format!("the checks of cluster '{}'", self.cluster);
        let request = Request::Check {
            cluster: self.cluster.clone(),
        };
        match self.simple(&what, &request).await? {
            Response::Checks { checks } => Ok(checks),
            other => Err(answer_error(&what, other)),
        }
    }

    /// `RecordVerify`: records a verify run of this client's cluster (admin).
    pub async fn record_verify(
        &self,
        run: &crate::core::wire::admin::VerifyRun,
    ) -> Result<(), ClientError> {
        let what = format!("recording the verify run of cluster '{}'", self.cluster);
        let request = Request::RecordVerify {
            cluster: self.cluster.clone(),
            run: run.clone(),
        };
        match self.simple(&what, &request).await? {
            Response::Recorded => Ok(()),
            other => Err(answer_error(&what, other)),
        }
    }

    /// `PutWal`: stores a WAL file whose zstd frame `body` yields. `Ok(true)` when the
    /// archive already held identical bytes. The archive may refuse before the whole body
    /// is sent; its answer is then the error.
    pub async fn put_wal<S>(
        &self,
        name: &str,
        raw_size: u64,
        blake3: &str,
        body: S,
    ) -> Result<bool, ClientError>
    where
        S: Stream<Item = io::Result<Bytes>> + Send,
    {
        self.put_wal_reporting(name, raw_size, blake3, None, None, body)
            .await
    }

    /// [`put_wal`](Self::put_wal) from `archive_command`, reporting the primary's
    /// archiving backlog (`.ready` files) and the request's id ([`new_request_id`])
    /// with it.
    pub async fn put_wal_reporting<S>(
        &self,
        name: &str,
        raw_size: u64,
        blake3: &str,
        ready_files: Option<u64>,
        request_id: Option<&str>,
        body: S,
    ) -> Result<bool, ClientError>
    where
        S: Stream<Item = io::Result<Bytes>> + Send,
    {
        let what = match request_id {
            Some(id) => format!("{name} (request {id})"),
            None => name.to_string(),
        };
        let request = Request::PutWal {
            cluster: self.cluster.clone(),
            name: name.to_string(),
            raw_size,
            blake3: blake3.to_string(),
            ready_files,
            request_id: request_id.map(str::to_string),
        };
        match self.upload(&what, &request, body).await? {
            Response::Stored { already_present } => Ok(already_present),
            other => Err(answer_error(&what, other)),
        }
    }

    /// `StreamAppend`: appends `bytes` at `offset` of the receiver's unfinished `segment`;
    /// answered once the archive has fdatasynced them.
    pub async fn stream_append(
        &self,
        segment: &str,
        offset: u64,
        system_identifier: u64,
        segment_size: u32,
        bytes: Bytes,
    ) -> Result<StreamFlushed, ClientError> {
        let what = format!("{segment} from offset {offset}");
        let request = Request::StreamAppend {
            cluster: self.cluster.clone(),
            segment: segment.to_string(),
            offset,
            len: bytes.len() as u64,
            system_identifier,
            segment_size,
            server_wal_end: None,
        };
        let pieces: Vec<io::Result<Bytes>> = (0..bytes.len())
            .step_by(SEND_PIECE)
            .map(|at| Ok(bytes.slice(at..(at + SEND_PIECE).min(bytes.len()))))
            .collect();
        match self
            .upload(&what, &request, futures::stream::iter(pieces))
            .await?
        {
            Response::StreamFlushed { flushed, complete } => {
                Ok(StreamFlushed { flushed, complete })
            }
            other => Err(answer_error(&what, other)),
        }
    }

    /// `StreamSession`: opens the receiver's session of appends on one stream (see
    /// [`Request::StreamSession`]): appends go through the [`StreamSender`] without
    /// waiting for answers, acknowledgements come from [`StreamAcks`].
    pub async fn stream_session(
        &self,
        system_identifier: u64,
        segment_size: u32,
    ) -> Result<(StreamSender, StreamAcks), ClientError> {
        let what = "opening the stream session";
        let idle = self.timeouts.idle;
        let lost = |reason: String| ClientError::ConnectionLost {
            what: what.to_string(),
            reason,
            answered: false,
        };
        let (mut send, recv) = tokio::time::timeout(idle, self.connection.connection.open_bi())
            .await
            .map_err(|_| idle_deadline(what, idle, false))?
            .map_err(|e| lost(e.to_string()))?;
        let request = Request::StreamSession {
            cluster: self.cluster.clone(),
            system_identifier,
            segment_size,
        };
        tokio::time::timeout(idle, send.write_all(&encode_request(&request)))
            .await
            .map_err(|_| idle_deadline(what, idle, false))?
            .map_err(|e| lost(e.to_string()))?;
        Ok((
            StreamSender {
                cluster: self.cluster.clone(),
                system_identifier,
                segment_size,
                idle,
                send,
            },
            StreamAcks { recv },
        ))
    }

    /// `StreamSeal`: the stream's timeline ended inside `segment`.
    pub async fn stream_seal(&self, segment: &str) -> Result<(), ClientError> {
        let what = format!("sealing {segment}");
        let request = Request::StreamSeal {
            cluster: self.cluster.clone(),
            segment: segment.to_string(),
        };
        match self.simple(&what, &request).await? {
            Response::Stored { .. } => Ok(()),
            other => Err(answer_error(&what, other)),
        }
    }

    /// `GetWal`: streams WAL file `name` through decompression and verification into
    /// `sink`; `Ok` once all of it arrived and verified. Not in the archive:
    /// [`ClientError::is_not_found`].
    pub async fn get_wal(
        &self,
        name: &str,
        sink: impl FnMut(&[u8]) -> io::Result<()> + Send,
    ) -> Result<Delivered, ClientError> {
        self.get_wal_for(name, FetchPurpose::Restore, None, sink)
            .await
    }

    /// [`get_wal`](Self::get_wal) saying why (for the archive's audit trail) and with the
    /// request's id ([`new_request_id`]), which errors name.
    pub async fn get_wal_for(
        &self,
        name: &str,
        purpose: FetchPurpose,
        request_id: Option<&str>,
        sink: impl FnMut(&[u8]) -> io::Result<()> + Send,
    ) -> Result<Delivered, ClientError> {
        let request = Request::GetWal {
            cluster: self.cluster.clone(),
            name: name.to_string(),
            request_id: request_id.map(str::to_string),
            purpose: Some(purpose),
        };
        let what = match request_id {
            Some(id) => format!("{name} (request {id})"),
            None => name.to_string(),
        };
        self.get_object(&what, &request, MAX_OBJECT_SIZE, sink)
            .await
    }

    /// The audit trail of WAL file `name` (admin), oldest first.
    pub async fn wal_history(&self, name: &str) -> Result<Vec<AuditRecord>, ClientError> {
        let request = Request::WalHistory {
            cluster: self.cluster.clone(),
            name: name.to_string(),
        };
        match self.simple(&format!("history of {name}"), &request).await? {
            Response::Audit { records, .. } => Ok(records),
            other => Err(answer_error("WalHistory", other)),
        }
    }

    /// One page of the cluster's audit trail from `since_us` (admin): the records and
    /// the cursor of the next page.
    pub async fn audit_page(
        &self,
        since_us: i64,
        after: Option<String>,
    ) -> Result<(Vec<AuditRecord>, Option<String>), ClientError> {
        let request = Request::Audit {
            cluster: self.cluster.clone(),
            since_us,
            after: after.clone(),
        };
        match self.simple("audit trail", &request).await? {
            Response::Audit { records, next } => {
                check_cursor("audit trail", after.as_deref(), next.as_deref())?;
                Ok((records, next))
            }
            other => Err(answer_error("Audit", other)),
        }
    }

    /// `ListWal`: the WAL the archive holds for the cluster, every page of it asked for
    /// in turn and merged into one listing ([`WalListing::merge_page`]).
    pub async fn list_wal(&self) -> Result<WalListing, ClientError> {
        let what = format!("the WAL listing of cluster '{}'", self.cluster);
        let mut listing = WalListing::default();
        let mut after = None;
        loop {
            let page = self.wal_page(&what, after.take()).await?;
            let next = page.next.clone();
            listing.merge_page(page);
            match next {
                Some(n) => after = Some(n),
                None => return Ok(listing),
            }
        }
    }

    /// The PostgreSQL system the cluster name is bound to (by the first segment archived
    /// under it), `None` before any: the first page of the WAL listing only.
    pub async fn binding(&self) -> Result<Option<WalBinding>, ClientError> {
        let what = format!("the WAL binding of cluster '{}'", self.cluster);
        let page = self.wal_page(&what, None).await?;
        Ok(match (page.system_identifier, page.segment_size) {
            (Some(system_identifier), Some(segment_size)) => Some(WalBinding {
                system_identifier,
                segment_size,
            }),
            _ => None,
        })
    }

    /// One page of the WAL listing, after cursor `after`; a page whose `next` does not
    /// move past `after` is refused (a listing that would never end).
    async fn wal_page(&self, what: &str, after: Option<String>) -> Result<WalListing, ClientError> {
        let request = Request::ListWal {
            cluster: self.cluster.clone(),
            after: after.clone(),
            paged: true,
        };
        match self.simple(what, &request).await? {
            Response::WalList(page) => {
                check_cursor(what, after.as_deref(), page.next.as_deref())?;
                Ok(page)
            }
            other => Err(answer_error(what, other)),
        }
    }

    /// `ChunksMissing`: which of `hashes` the archive lacks (at most
    /// [`crate::core::wire::backup::MAX_HASHES_PER_REQUEST`]).
    pub async fn chunks_missing(&self, hashes: Vec<String>) -> Result<Vec<String>, ClientError> {
        let what = format!("a check of {} chunks", hashes.len());
        let request = Request::ChunksMissing {
            cluster: self.cluster.clone(),
            hashes,
            lease: self.lease.clone(),
        };
        match self.simple(&what, &request).await? {
            Response::Missing { hashes } => Ok(hashes),
            other => Err(answer_error(&what, other)),
        }
    }

    /// `BeginBackup`: takes a backup lease for the cluster (name it in the backup's
    /// requests with [`ArchiveClient::with_lease`]).
    pub async fn begin_backup(&self) -> Result<String, ClientError> {
        let what = format!("a backup lease for cluster '{}'", self.cluster);
        let request = Request::BeginBackup {
            cluster: self.cluster.clone(),
        };
        match self.simple(&what, &request).await? {
            Response::BackupLease { lease, .. } => Ok(lease),
            other => Err(answer_error(&what, other)),
        }
    }

    /// `PutPack`: stores `chunks` as one pack; `body` is their zstd frames back to back.
    pub async fn put_pack(
        &self,
        chunks: Vec<PackChunk>,
        body: Bytes,
    ) -> Result<PackStored, ClientError> {
        let what = match chunks.first() {
            Some(first) => format!("pack of {} chunks (first {})", chunks.len(), first.blake3),
            None => "empty pack".to_string(),
        };
        let request = Request::PutPack {
            cluster: self.cluster.clone(),
            chunks,
            lease: self.lease.clone(),
        };
        match self.upload(&what, &request, pieces(body)).await? {
            Response::PackStored {
                new_chunks,
                stored_bytes,
            } => Ok(PackStored {
                new_chunks,
                stored_bytes,
            }),
            other => Err(answer_error(&what, other)),
        }
    }

    /// `PutChunk`: stores one backup chunk; `body` is its zstd frame. `Ok(true)` when the
    /// archive already held it.
    pub async fn put_chunk(
        &self,
        blake3: &str,
        raw_size: u64,
        body: Bytes,
    ) -> Result<bool, ClientError> {
        let what = format!("chunk {blake3}");
        let request = Request::PutChunk {
            cluster: self.cluster.clone(),
            blake3: blake3.to_string(),
            raw_size,
            lease: self.lease.clone(),
        };
        match self.upload(&what, &request, pieces(body)).await? {
            Response::Stored { already_present } => Ok(already_present),
            other => Err(answer_error(&what, other)),
        }
    }

    /// `GetChunks`: the stored objects of `hashes` (at most
    /// [`crate::core::wire::backup::MAX_CHUNKS_PER_GET`]), back to back as the archive
    /// keeps them (header, then zstd frame), in the order asked, at most `max_body` bytes
    /// in all. Checking each object against its hash is the caller's (it decompresses
    /// them anyway).
    pub async fn get_chunks(
        &self,
        hashes: &[String],
        max_body: u64,
    ) -> Result<Vec<u8>, ClientError> {
        let what = match hashes.first() {
            Some(first) => format!("{} chunks (first {first})", hashes.len()),
            None => "no chunks".to_string(),
        };
        let request = Request::GetChunks {
            cluster: self.cluster.clone(),
            hashes: hashes.to_vec(),
        };
        let answered = AtomicBool::new(false);
        let exchange = async {
            let mut ex = Exchange::open(self, &what, &request, &answered).await?;
            ex.finish()?;
            match ex.response().await? {
                Response::Chunks { count } if count as usize == hashes.len() => {}
                Response::Chunks { count } => {
                    return Err(ClientError::Unexpected {
                        what: what.clone(),
                        answer: format!("{count} chunks announced for {} asked", hashes.len()),
                    })
                }
                other => return Err(answer_error(&what, other)),
            }
            let mut body = Vec::new();
            while let Some(piece) = ex.body_piece().await? {
                if body.len() as u64 + piece.len() as u64 > max_body {
                    return Err(ClientError::Corrupt {
                        what: what.clone(),
                        reason: format!("is larger than the {max_body} bytes its chunks can take"),
                    });
                }
                body.extend_from_slice(&piece);
            }
            Ok(body)
        };
        self.bounded(&what, &answered, exchange).await
    }

    /// `PutBackup`: commits backup `backup_id` by storing its manifest; `body` is the zstd
    /// frame of the manifest JSON (`raw_size` bytes with blake3 `blake3`).
    pub async fn put_backup(
        &self,
        backup_id: &str,
        raw_size: u64,
        blake3: &str,
        body: Bytes,
    ) -> Result<(), ClientError> {
        let what = format!("the manifest of backup {backup_id}");
        let request = Request::PutBackup {
            cluster: self.cluster.clone(),
            backup_id: backup_id.to_string(),
            raw_size,
            blake3: blake3.to_string(),
            lease: self.lease.clone(),
        };
        match self.upload(&what, &request, pieces(body)).await? {
            Response::Stored { .. } => Ok(()),
            other => Err(answer_error(&what, other)),
        }
    }

    /// `GetBackup`: the manifest JSON of backup `backup_id`, verified, at most `max_raw`
    /// bytes.
    pub async fn get_backup(&self, backup_id: &str, max_raw: u64) -> Result<Vec<u8>, ClientError> {
        let what = format!("manifest of backup {backup_id}");
        let request = Request::GetBackup {
            cluster: self.cluster.clone(),
            backup_id: backup_id.to_string(),
        };
        let mut raw = Vec::new();
        self.get_object(&what, &request, max_raw, |b| {
            raw.extend_from_slice(b);
            Ok(())
        })
        .await?;
        Ok(raw)
    }

    /// `ListBackups`: the cluster's backups, oldest first, every page asked for in turn.
    pub async fn list_backups(&self) -> Result<Vec<BackupSummary>, ClientError> {
        let what = format!("the backup listing of cluster '{}'", self.cluster);
        let mut all = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let request = Request::ListBackups {
                cluster: self.cluster.clone(),
                after: after.clone(),
                paged: true,
            };
            match self.simple(&what, &request).await? {
                Response::Backups { backups, next } => {
                    check_cursor(&what, after.as_deref(), next.as_deref())?;
                    all.extend(backups);
                    match next {
                        Some(n) => after = Some(n),
                        None => return Ok(all),
                    }
                }
                other => return Err(answer_error(&what, other)),
            }
        }
    }

    /// `BackupState`: one backup and its state now (not in the archive:
    /// [`ClientError::is_not_found`]).
    pub async fn backup_state(&self, backup_id: &str) -> Result<BackupSummary, ClientError> {
        let what = format!("the state of backup {backup_id}");
        let request = Request::BackupState {
            cluster: self.cluster.clone(),
            backup_id: backup_id.to_string(),
        };
        match self.simple(&what, &request).await? {
            Response::Backup { backup } => Ok(backup),
            other => Err(answer_error(&what, other)),
        }
    }

    /// `DeleteBackup` (admin): deletes the manifest of backup `backup_id`.
    pub async fn delete_backup(&self, backup_id: &str) -> Result<(), ClientError> {
        let what = format!("deletion of backup {backup_id}");
        let request = Request::DeleteBackup {
            cluster: self.cluster.clone(),
            backup_id: backup_id.to_string(),
        };
        match self.simple(&what, &request).await? {
            Response::Deleted => Ok(()),
            other => Err(answer_error(&what, other)),
        }
    }

    /// `Retention` (admin): applies the retention policy. The archive says nothing until
    /// the run is done, so give this client deadlines that allow for a whole run
    /// ([`ArchiveClient::with_timeouts`]).
    pub async fn retention(&self, run: &RetentionRun) -> Result<RetentionReport, ClientError> {
        let what = match &run.cluster {
            Some(c) => format!("a retention run for cluster '{c}'"),
            None => "a retention run".to_string(),
        };
        let request = Request::Retention {
            cluster: run.cluster.clone(),
            keep_full: run.keep_full,
            keep_within_secs: run.keep_within_secs,
            chunk_grace_secs: run.chunk_grace_secs,
            dry_run: run.dry_run,
            window_end: run.window_end,
        };
        match self.simple(&what, &request).await? {
            Response::Retention(report) => Ok(report),
            other => Err(answer_error(&what, other)),
        }
    }

    /// A request without a body whose whole answer is its response frame.
    async fn simple(&self, what: &str, request: &Request) -> Result<Response, ClientError> {
        let answered = AtomicBool::new(false);
        let exchange = async {
            let mut ex = Exchange::open(self, what, request, &answered).await?;
            ex.finish()?;
            ex.response().await
        };
        self.bounded(what, &answered, exchange).await
    }

    /// A request with a body from `body`, answered by one response frame.
    async fn upload<S>(
        &self,
        what: &str,
        request: &Request,
        body: S,
    ) -> Result<Response, ClientError>
    where
        S: Stream<Item = io::Result<Bytes>> + Send,
    {
        let answered = AtomicBool::new(false);
        let exchange = async {
            let mut ex = Exchange::open(self, what, request, &answered).await?;
            let body = std::pin::pin!(body);
            let mut body = body;
            let mut accepted = true;
            while let Some(piece) = body.next().await {
                let piece = piece.map_err(|source| ClientError::Local {
                    what: format!("reading the body of {what}"),
                    source,
                })?;
                if !ex.send(piece).await? {
                    // The archive refused early and stopped reading: its answer says why.
                    accepted = false;
                    break;
                }
            }
            if accepted {
                ex.finish()?;
            }
            ex.response().await
        };
        self.bounded(what, &answered, exchange).await
    }

    /// A request answered by an `Object` frame and its body, verified into `sink`.
    async fn get_object(
        &self,
        what: &str,
        request: &Request,
        max_raw: u64,
        mut sink: impl FnMut(&[u8]) -> io::Result<()> + Send,
    ) -> Result<Delivered, ClientError> {
        let answered = AtomicBool::new(false);
        let exchange = async {
            let mut ex = Exchange::open(self, what, request, &answered).await?;
            ex.finish()?;
            let (raw_size, blake3, compressed_size, partial_bytes) = match ex.response().await? {
                Response::Object {
                    raw_size,
                    blake3,
                    compressed_size,
                    partial_bytes,
                } => (raw_size, blake3, compressed_size, partial_bytes),
                other => return Err(answer_error(what, other)),
            };
            let corrupt = |reason: String| ClientError::Corrupt {
                what: what.to_string(),
                reason,
            };
            if raw_size > max_raw || compressed_size > max_compressed(max_raw) {
                return Err(corrupt(format!(
                    "has an impossible size ({raw_size} bytes, {compressed_size} compressed; at most {max_raw})"
                )));
            }
            let mut decoder =
                VerifyingDecoder::new(raw_size).map_err(|source| ClientError::Local {
                    what: format!("setting up zstd for {what}"),
                    source,
                })?;
            let mut received = 0u64;
            while let Some(piece) = ex.body_piece().await? {
                received += piece.len() as u64;
                if received > compressed_size {
                    return Err(corrupt(format!(
                        "is longer than the announced {compressed_size} bytes"
                    )));
                }
                decoder.write(&piece, &mut sink).map_err(|e| match e {
                    DecodeOrSinkError::Decode(d) => corrupt(format!("is corrupt: {d}")),
                    DecodeOrSinkError::Sink(source) => ClientError::Local {
                        what: format!("writing {what}"),
                        source,
                    },
                })?;
            }
            let summary = decoder
                .finish()
                .map_err(|e| corrupt(format!("is incomplete: {e}")))?;
            summary
                .check(raw_size, &blake3)
                .map_err(|e| corrupt(format!("failed verification: {e}")))?;
            Ok(Delivered {
                raw_size,
                blake3,
                partial_bytes,
            })
        };
        self.bounded(what, &answered, exchange).await
    }

    /// Runs one request's exchange under the total deadline.
    async fn bounded<T>(
        &self,
        what: &str,
        answered: &AtomicBool,
        exchange: impl std::future::Future<Output = Result<T, ClientError>>,
    ) -> Result<T, ClientError> {
        match tokio::time::timeout(self.timeouts.total, exchange).await {
            Ok(result) => result,
            // Dropping the exchange reset its stream: the archive stops working on it.
            Err(_) => Err(ClientError::Deadline {
                what: what.to_string(),
                deadline: Deadline::Total,
                after: self.timeouts.total,
                answered: answered.load(Ordering::SeqCst),
            }),
        }
    }
}

/// The largest compressed body an object of at most `max_raw` raw bytes can have.
fn max_compressed(max_raw: u64) -> u64 {
    max_raw.saturating_add(max_raw / 8).saturating_add(4096)
}

/// `body` as a stream of [`SEND_PIECE`] slices (no copies).
fn pieces(body: Bytes) -> impl Stream<Item = io::Result<Bytes>> + Send {
    let count = body.len().div_ceil(SEND_PIECE);
    futures::stream::iter((0..count).map(move |i| {
        let end = ((i + 1) * SEND_PIECE).min(body.len());
        Ok(body.slice(i * SEND_PIECE..end))
    }))
}

/// The error for an answer other than the success response of a request.
/// Refuses a page cursor `next` that does not sort after the page's `after`: a
/// listing that would never end.
/// A new id for one client request: 16 hex digits, unique across processes and hosts in
/// practice (a hash of the time, the process, a counter and the host name). The client
/// logs it and sends it with the request, and the archive's audit trail keeps it, so a
/// line of PostgreSQL's log can be matched to the archive's record.
pub fn new_request_id() -> String {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let mut h = blake3::Hasher::new();
    h.update(&now.to_le_bytes());
    h.update(&std::process::id().to_le_bytes());
    h.update(&COUNTER.fetch_add(1, Ordering::Relaxed).to_le_bytes());
    if let Ok(host) = std::fs::read("/proc/sys/kernel/hostname") {
        h.update(&host);
    }
    h.finalize().to_hex()[..16].to_string()
}

fn check_cursor(what: &str, after: Option<&str>, next: Option<&str>) -> Result<(), ClientError> {
    match (after, next) {
        (Some(a), Some(n)) if n <= a => Err(ClientError::Unexpected {
            what: what.to_string(),
            answer: format!("a page after {a:?} whose next page starts after {n:?}"),
        }),
        _ => Ok(()),
    }
}

fn answer_error(what: &str, answer: Response) -> ClientError {
    match answer {
        Response::Error { code, message } => ClientError::Refused {
            what: what.to_string(),
            code,
            message,
        },
        other => {
            let mut answer = format!("{other:?}");
            if answer.len() > 200 {
                let cut = (0..=200)
                    .rev()
                    .find(|i| answer.is_char_boundary(*i))
                    .unwrap_or(0);
                answer.truncate(cut);
                answer.push_str("...");
            }
            ClientError::Unexpected {
                what: what.to_string(),
                answer,
            }
        }
    }
}

/// One request's stream, every wait on the archive bounded by the idle deadline.
struct Exchange<'a> {
    what: &'a str,
    idle: Duration,
    answered: &'a AtomicBool,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
}

impl<'a> Exchange<'a> {
    async fn open(
        client: &ArchiveClient,
        what: &'a str,
        request: &Request,
        answered: &'a AtomicBool,
    ) -> Result<Exchange<'a>, ClientError> {
        let idle = client.timeouts.idle;
        let lost = |reason: String| ClientError::ConnectionLost {
            what: what.to_string(),
            reason,
            answered: false,
        };
        let (send, recv) = tokio::time::timeout(idle, client.connection.connection.open_bi())
            .await
            .map_err(|_| idle_deadline(what, idle, false))?
            .map_err(|e| lost(e.to_string()))?;
        let mut ex = Exchange {
            what,
            idle,
            answered,
            send,
            recv,
        };
        if !ex.send(Bytes::from(encode_request(request))).await? {
            return Err(lost(
                "the archive stopped the request before reading it".into(),
            ));
        }
        Ok(ex)
    }

    /// Sends body bytes; `Ok(false)` when the archive stopped reading (it refused: read
    /// the response).
    async fn send(&mut self, bytes: Bytes) -> Result<bool, ClientError> {
        match tokio::time::timeout(self.idle, self.send.write_chunk(bytes)).await {
            Err(_) => Err(idle_deadline(self.what, self.idle, false)),
            Ok(Ok(())) => Ok(true),
            Ok(Err(quinn::WriteError::Stopped(_))) => Ok(false),
            Ok(Err(e)) => Err(ClientError::ConnectionLost {
                what: self.what.to_string(),
                reason: e.to_string(),
                answered: false,
            }),
        }
    }

    /// Ends the request body.
    fn finish(&mut self) -> Result<(), ClientError> {
        // Fails only on a stream already finished or reset: the response then says why.
        let _ = self.send.finish();
        Ok(())
    }

    /// Reads the response frame.
    async fn response(&mut self) -> Result<Response, ClientError> {
        let read = crate::net::transport::read_frame::<Response>(&mut self.recv);
        let response = match tokio::time::timeout(self.idle, read).await {
            Err(_) => return Err(idle_deadline(self.what, self.idle, false)),
            Ok(Ok(r)) => r,
            Ok(Err(ReadFrameError::Frame(e))) => {
                return Err(ClientError::Unexpected {
                    what: self.what.to_string(),
                    answer: e.to_string(),
                })
            }
            Ok(Err(ReadFrameError::Stream(e))) => {
                return Err(ClientError::ConnectionLost {
                    what: self.what.to_string(),
                    reason: e.to_string(),
                    answered: false,
                })
            }
        };
        if matches!(response, Response::Object { .. } | Response::Chunks { .. }) {
            self.answered.store(true, Ordering::SeqCst);
        }
        Ok(response)
    }

    /// The next piece of the response body; `None` at its end.
    async fn body_piece(&mut self) -> Result<Option<Bytes>, ClientError> {
        match tokio::time::timeout(self.idle, self.recv.read_chunk(usize::MAX, true)).await {
            Err(_) => Err(idle_deadline(self.what, self.idle, true)),
            Ok(Ok(chunk)) => Ok(chunk.map(|c| c.bytes)),
            Ok(Err(e)) => Err(ClientError::ConnectionLost {
                what: self.what.to_string(),
                reason: format!("download interrupted: {e}"),
                answered: true,
            }),
        }
    }
}

fn idle_deadline(what: &str, after: Duration, answered: bool) -> ClientError {
    ClientError::Deadline {
        what: what.to_string(),
        deadline: Deadline::Idle,
        after,
        answered,
    }
}

/// An `anyhow` error is transient when a [`ClientError`] in its chain is; an error
/// nothing classifies is permanent.
impl Transient for anyhow::Error {
    fn is_transient(&self) -> bool {
        self.chain().any(|c| {
            c.downcast_ref::<ClientError>()
                .is_some_and(ClientError::is_transient)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(code: ErrorCode) -> ClientError {
        ClientError::Refused {
            what: "x".into(),
            code,
            message: "m".into(),
        }
    }

    #[test]
    fn archive_answers_classify_code_by_code() {
        let cases = [
            (ErrorCode::NotFound, false, ErrorClass::NotFound),
            (ErrorCode::Conflict, false, ErrorClass::Refused),
            (ErrorCode::Invalid, false, ErrorClass::Refused),
            (ErrorCode::Unauthorized, false, ErrorClass::Refused),
            (ErrorCode::WrongCluster, false, ErrorClass::Refused),
            (ErrorCode::TooLarge, false, ErrorClass::Refused),
            (ErrorCode::Unavailable, true, ErrorClass::Unreachable),
            (ErrorCode::Internal, true, ErrorClass::Undelivered),
        ];
        for (code, transient, class) in cases {
            let e = refused(code);
            assert_eq!(e.is_transient(), transient, "{code:?}");
            assert_eq!(e.class(), class, "{code:?}");
            assert_eq!(e.code(), Some(code));
            assert_eq!(e.is_not_found(), code == ErrorCode::NotFound);
            assert!(e.to_string().contains(&format!("({code:?})")), "{e}");
        }
    }

    #[test]
    fn transport_failures_are_transient_and_say_whether_the_archive_answered() {
        let addr: std::net::SocketAddr = "127.0.0.1:7433".parse().unwrap();
        let timeout = ClientError::Connect(ConnectError::Timeout {
            addr,
            after: Duration::from_secs(10),
        });
        assert!(timeout.is_transient());
        assert_eq!(timeout.class(), ErrorClass::Unreachable);
        assert!(timeout.to_string().contains("unreachable"), "{timeout}");

        let network = ClientError::Connect(ConnectError::Network(anyhow::anyhow!("no route")));
        assert!(network.is_transient());
        assert_eq!(network.class(), ErrorClass::Unreachable);

        for deadline in [Deadline::Idle, Deadline::Total] {
            for answered in [false, true] {
                let e = ClientError::Deadline {
                    what: "000000010000000000000001".into(),
                    deadline,
                    after: Duration::from_secs(3),
                    answered,
                };
                assert!(e.is_transient(), "{e}");
                let class = if answered {
                    ErrorClass::Undelivered
                } else {
                    ErrorClass::Unreachable
                };
                assert_eq!(e.class(), class, "{e}");
                assert!(e.to_string().contains("3 s"), "{e}");
            }
        }
        // A QUIC blip during a multi-hour backup must not end it: connection lost is
        // retried (it was not, by test, before ArchiveClient).
        let lost = ClientError::ConnectionLost {
            what: "pack".into(),
            reason: "timed out".into(),
            answered: false,
        };
        assert!(lost.is_transient());
        assert_eq!(lost.class(), ErrorClass::Unreachable);
    }

    #[test]
    fn refusals_at_the_handshake_and_local_failures_are_permanent() {
        let addr: std::net::SocketAddr = "127.0.0.1:7433".parse().unwrap();
        // The archive refused this client's certificate (TLS alert 42, bad certificate).
        let alert = quinn::ConnectionError::ConnectionClosed(quinn::ConnectionClose {
            error_code: quinn::TransportErrorCode::crypto(42),
            frame_type: None,
            reason: Bytes::from_static(b"invalid peer certificate: UnknownIssuer"),
        });
        let e = ClientError::Connect(ConnectError::Handshake {
            addr,
            source: alert,
        });
        assert!(!e.is_transient(), "{e}");
        assert_eq!(e.class(), ErrorClass::Misconfigured);
        assert!(e.to_string().contains("handshake"), "{e}");

        let timed_out = ClientError::Connect(ConnectError::Handshake {
            addr,
            source: quinn::ConnectionError::TimedOut,
        });
        assert!(timed_out.is_transient());
        assert_eq!(timed_out.class(), ErrorClass::Unreachable);

        let tls = ClientError::Connect(ConnectError::Tls(anyhow::anyhow!("no key")));
        assert!(!tls.is_transient());
        assert_eq!(tls.class(), ErrorClass::Misconfigured);

        let corrupt = ClientError::Corrupt {
            what: "seg".into(),
            reason: "failed verification: blake3".into(),
        };
        assert!(!corrupt.is_transient());
        assert_eq!(corrupt.class(), ErrorClass::Undelivered);

        let local = ClientError::Local {
            what: "writing seg".into(),
            source: io::Error::other("disk full"),
        };
        assert!(!local.is_transient());
        assert_eq!(local.class(), ErrorClass::Local);

        let unexpected = answer_error("ping", Response::Deleted);
        assert!(!unexpected.is_transient());
        assert!(matches!(unexpected, ClientError::Unexpected { .. }));
    }

    #[test]
    fn bodies_are_cut_into_pieces_without_losing_a_byte() {
        let body = Bytes::from(
            (0..(SEND_PIECE * 2 + 17))
                .map(|i| i as u8)
                .collect::<Vec<_>>(),
        );
        let got: Vec<Bytes> = futures::executor::block_on(
            pieces(body.clone()).map(|p| p.unwrap()).collect::<Vec<_>>(),
        );
        assert_eq!(got.len(), 3);
        assert_eq!(got.concat(), body.to_vec());
        let none: Vec<_> = futures::executor::block_on(pieces(Bytes::new()).collect::<Vec<_>>());
        assert!(none.is_empty());
    }
}
