//! The archive wire protocol: messages and their framing (pure code, no I/O).
//!
//! Every request uses one bidirectional QUIC stream:
//!
//! ```text
//! client -> server   frame(Request)  [body bytes ...]  FIN
//! server -> client   frame(Response) [body bytes ...]  FIN
//! ```
//!
//! A frame is a 4-byte big-endian length followed by that many bytes of JSON. The length
//! is checked against [`MAX_FRAME_LEN`] before anything is allocated, so a hostile peer
//! cannot make either side buffer more than that. Bodies are never framed: they are the
//! rest of the stream, and their length is announced in the frame (`compressed_size` /
//! `raw_size`) and checked as the bytes arrive, bounded by [`MAX_OBJECT_SIZE`].
//!
//! Bodies of WAL objects are one zstd frame of the raw file; the frame carries the raw
//! file's blake3 so the receiver can verify what it decompressed before it uses it.
//!
//! Answers that grow with the archive are paged, so that no answer outgrows the frame
//! limit: `ListWal` and `ListBackups` carry a cursor `after` (the last WAL file name or
//! backup id of the previous page; absent for the first page) and their answers a cursor
//! `next` for the following page (absent on the last page). A page covers at most
//! [`paging::WAL_PAGE_FILES`] WAL files or [`paging::BACKUP_PAGE_ENTRIES`] backups; WAL
//! pages are merged back into one listing by [`WalListing::merge_page`], which also finds
//! the gaps that span a page boundary (see [`paging`]). The typed client
//! (`net::client`) marks its requests `paged` and asks for every page; a request without
//! `paged` (a client from before paging, which reads one answer as the whole listing) is
//! answered with the whole listing or `TooLarge`, never silently with a first page.
//!
//! The protocol version is negotiated by ALPN ([`ALPN`]); an incompatible change gets a
//! new ALPN string, so an old peer is refused at the handshake, not mid-stream. Fields
//! added later (the paging cursors, a lease) have serde defaults: a message without them
//! still decodes.

pub mod admin;
pub mod audit;
pub mod backup;
pub mod paging;

use serde::{Deserialize, Serialize};

use crate::core::pg::wal::TimelineId;

/// ALPN protocol name for this version of the wire protocol.
pub const ALPN: &[u8] = b"walvault/1";
/// Largest frame (request or response header) either side accepts: 1 MiB. Listings are
/// paged to stay far below it (see [`paging`]).
pub const MAX_FRAME_LEN: u32 = 1 << 20;
/// Largest object body accepted: a 1 GiB segment plus zstd's worst-case expansion.
pub const MAX_OBJECT_SIZE: u64 = (1 << 30) + (1 << 24);
/// Largest body of a [`Request::StreamAppend`].
pub const MAX_STREAM_APPEND: u64 = 16 << 20;

/// A request from a client to `archived`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Store a WAL file. Body: one zstd frame of the raw file.
    PutWal {
        /// Cluster name.
        cluster: String,
        /// WAL file name as PostgreSQL names it.
        name: String,
        /// Size of the raw file.
        raw_size: u64,
        /// blake3 of the raw file, hex.
        blake3: String,
        /// The primary's archiving backlog as `archive_command` saw it: `.ready` files in
        /// `pg_wal/archive_status/` (this one included), when the client could count them.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ready_files: Option<u64>,
        /// The client's id of this request, for the audit trail (the client logs it).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        request_id: Option<String>,
    },
    /// Fetch a WAL file. Response body: one zstd frame.
    GetWal {
        /// Cluster name.
        cluster: String,
        /// WAL file name.
        name: String,
        /// The client's id of this request, for the audit trail (the client logs it).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        request_id: Option<String>,
        /// Why the client fetches it (a restore when absent), for the audit trail.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        purpose: Option<crate::core::wire::audit::FetchPurpose>,
    },
    /// The audit trail of one WAL file, oldest first (admin; `archived wal history`).
    /// Answer: [`Response::Audit`] (one page; `next` is `None`).
    WalHistory {
        /// Cluster name.
        cluster: String,
        /// WAL file name.
        name: String,
    },
    /// The audit trail of a cluster from a point in time, oldest first, one page of at
    /// most [`audit::AUDIT_PAGE_RECORDS`] records (admin; `archived audit`). Answer:
    /// [`Response::Audit`].
    Audit {
        /// Cluster name.
        cluster: String,
        /// Records at or after this time, microseconds since the Unix epoch.
        since_us: i64,
        /// The previous page's `next` (a record id); `None`: the first page.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        after: Option<String>,
    },
    /// List the WAL of a cluster, one page: the files that sort after `after`, at most
    /// [`paging::WAL_PAGE_FILES`] of them. Answer: [`Response::WalList`].
    ListWal {
        /// Cluster name.
        cluster: String,
        /// The previous page's last WAL file name (its `next`); `None`: the first page.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        after: Option<String>,
        /// Set by every client that reads `next` and asks for the following pages. A
        /// request without it (a client from before paging) gets the whole listing in
        /// one answer, or `TooLarge` when that exceeds the frame limit: never a first
        /// page it would take for the whole.
        #[serde(default)]
        paged: bool,
    },
    /// Who am I, and is the server alive.
    Ping,
    /// One screen per cluster (`archived status`): of `cluster`, or of every cluster
    /// (admin only). Answer: [`Response::Status`].
    Status {
        /// Cluster name; `None`: every cluster.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cluster: Option<String>,
    },
    /// The archive's named checks of a cluster (`archived check`). Answer:
    /// [`Response::Checks`].
    Check {
        /// Cluster name.
        cluster: String,
    },
    /// Records what an `archived verify` run of a cluster found (admin). Answer:
    /// [`Response::Recorded`].
    RecordVerify {
        /// Cluster name.
        cluster: String,
        /// The run.
        run: crate::core::wire::admin::VerifyRun,
    },
    /// Which of these backup chunks does the archive lack? Answer: [`Response::Missing`].
    /// At most [`crate::core::wire::backup::MAX_HASHES_PER_REQUEST`] hashes.
    ChunksMissing {
        /// Cluster name.
        cluster: String,
        /// blake3 of each chunk, hex.
        hashes: Vec<String>,
        /// The backup's lease ([`Request::BeginBackup`]), renewed by this request.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        lease: Option<String>,
    },
    /// Store many backup chunks as one pack (one object in the store). Body: each chunk's
    /// zstd frame, back to back, in the order listed. Answer: [`Response::PackStored`].
    /// At most [`crate::core::wire::backup::MAX_CHUNKS_PER_PACK`] chunks and
    /// [`crate::core::wire::backup::MAX_PACK_RAW_BYTES`] raw bytes.
    PutPack {
        /// Cluster name.
        cluster: String,
        /// The chunks, in body order.
        chunks: Vec<crate::core::wire::backup::PackChunk>,
        /// The backup's lease ([`Request::BeginBackup`]), renewed by this request.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        lease: Option<String>,
    },
    /// Store a backup chunk (content-addressed). Body: one zstd frame of the raw chunk.
    PutChunk {
        /// Cluster name.
        cluster: String,
        /// blake3 of the raw chunk, hex (its name).
        blake3: String,
        /// Size of the raw chunk.
        raw_size: u64,
        /// The backup's lease ([`Request::BeginBackup`]), renewed by this request.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        lease: Option<String>,
    },
    /// Fetch several backup chunks on one stream. Answer: [`Response::Chunks`], then the
    /// stored objects (header + zstd frame, see [`crate::core::format::object`]) back to back, in the
    /// order asked. At most [`crate::core::wire::backup::MAX_CHUNKS_PER_GET`] hashes.
    GetChunks {
        /// Cluster name.
        cluster: String,
        /// blake3 of each raw chunk, hex.
        hashes: Vec<String>,
    },
    /// Commit a backup by storing its manifest (create-only; every chunk it names must
    /// be stored). Body: one zstd frame of the manifest JSON.
    PutBackup {
        /// Cluster name.
        cluster: String,
        /// Backup id.
        backup_id: String,
        /// Size of the raw manifest.
        raw_size: u64,
        /// blake3 of the raw manifest, hex.
        blake3: String,
        /// The backup's lease, released once the manifest is committed.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        lease: Option<String>,
    },
    /// A backup starts: take a lease that keeps the chunks it stores or reuses from
    /// chunk collection until its manifest is committed, or until the lease expires
    /// unrenewed. Answer: [`Response::BackupLease`].
    BeginBackup {
        /// Cluster name.
        cluster: String,
    },
    /// Fetch a backup's manifest. Response body: one zstd frame of the manifest JSON.
    GetBackup {
        /// Cluster name.
        cluster: String,
        /// Backup id.
        backup_id: String,
    },
    /// List the backups of a cluster, one page: those whose id sorts after `after`, at
    /// most [`paging::BACKUP_PAGE_ENTRIES`]. Answer: [`Response::Backups`].
    ListBackups {
        /// Cluster name.
        cluster: String,
        /// The previous page's last backup id (its `next`); `None`: the first page.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        after: Option<String>,
        /// As for [`Request::ListWal`]: without it (a client from before paging), the
        /// whole listing in one answer, or `TooLarge`.
        #[serde(default)]
        paged: bool,
    },
    /// The state of one backup: what `ListBackups` says of it, without listing the
    /// others. Answer: [`Response::Backup`], or `NotFound`.
    BackupState {
        /// Cluster name.
        cluster: String,
        /// Backup id.
        backup_id: String,
    },
    /// Delete a backup's manifest (admin); its chunks go at the next retention run.
    DeleteBackup {
        /// Cluster name.
        cluster: String,
        /// Backup id.
        backup_id: String,
    },
    /// Append streamed WAL to the receiver's unfinished segment (`pushclient stream`).
    /// Body: `len` raw WAL bytes (not compressed). Answer: [`Response::StreamFlushed`],
    /// sent only once the bytes are fdatasynced on the archive's disk. Bytes below what
    /// the archive already holds of the segment must be identical to them (a receiver
    /// that reconnected streams the segment again from its start); a segment's first
    /// append starts at offset 0.
    StreamAppend {
        /// Cluster name.
        cluster: String,
        /// The segment's file name (a complete segment's name).
        segment: String,
        /// Offset in the segment of the body's first byte.
        offset: u64,
        /// Body length, 1 ..= [`MAX_STREAM_APPEND`]; `offset + len` within the segment.
        len: u64,
        /// The streamed server's system identifier (IDENTIFY_SYSTEM): refused when it is
        /// not the cluster's.
        system_identifier: u64,
        /// The streamed server's `wal_segment_size`.
        segment_size: u32,
        /// Where the server's WAL ended (as a number of bytes) when the receiver sent
        /// this append, from its XLogData and keepalive messages: the archive's lag
        /// behind the primary is this minus what it holds.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        server_wal_end: Option<u64>,
    },
    /// Opens the streaming receiver's session (`pushclient stream`): the rest of the
    /// stream is a sequence of appends, each a frame of [`Request::StreamAppend`] (of this
    /// cluster, system and segment size) followed by its `len` raw bytes, sent without
    /// waiting for answers. Answers: one [`Response::StreamAcked`] per burst the archive
    /// fdatasynced (appends are durable in the order sent), and an [`Response::Error`]
    /// that ends the session when an append is refused (after the acks of those before
    /// it) or the archive shuts down. The client ends the session by finishing its side.
    StreamSession {
        /// Cluster name.
        cluster: String,
        /// The streamed server's system identifier: refused when it is not the cluster's.
        system_identifier: u64,
        /// The streamed server's `wal_segment_size`.
        segment_size: u32,
    },
    /// The stream's timeline ended inside `segment` (promotion, switchover): what the
    /// archive holds of it stays as that timeline's last streamed segment, stored now.
    /// Answer: [`Response::Stored`].
    StreamSeal {
        /// Cluster name.
        cluster: String,
        /// The segment's file name.
        segment: String,
    },
    /// Apply the retention policy (admin). Answer: [`Response::Retention`].
    Retention {
        /// One cluster, or every cluster when `None`.
        cluster: Option<String>,
        /// Keep this many newest usable backups (overrides the server's policy).
        keep_full: Option<u32>,
        /// Keep every backup needed to restore to any point of this many past seconds.
        keep_within_secs: Option<u64>,
        /// Collect unreferenced chunks only when untouched for this many seconds.
        chunk_grace_secs: Option<u64>,
        /// Report the plan, delete nothing.
        dry_run: bool,
        /// Measure the `keep_within` window back from this Unix time instead of the
        /// server's clock (for tests; chunk and pack ages always use the server's clock).
        #[serde(default)]
        window_end: Option<i64>,
    },
}

impl Request {
    /// The cluster a request touches, if any (authorization is per cluster).
    pub fn cluster(&self) -> Option<&str> {
        match self {
            Request::PutWal { cluster, .. }
            | Request::GetWal { cluster, .. }
            | Request::ListWal { cluster, .. }
            | Request::WalHistory { cluster, .. }
            | Request::Audit { cluster, .. } => Some(cluster),
            Request::ChunksMissing { cluster, .. }
            | Request::PutChunk { cluster, .. }
            | Request::PutPack { cluster, .. }
            | Request::GetChunks { cluster, .. }
            | Request::PutBackup { cluster, .. }
            | Request::GetBackup { cluster, .. }
            | Request::ListBackups { cluster, .. }
            | Request::BackupState { cluster, .. }
            | Request::DeleteBackup { cluster, .. }
            | Request::BeginBackup { cluster }
            | Request::StreamAppend { cluster, .. }
            | Request::StreamSession { cluster, .. }
            | Request::StreamSeal { cluster, .. }
            | Request::Check { cluster }
            | Request::RecordVerify { cluster, .. } => Some(cluster),
            Request::Retention { cluster, .. } | Request::Status { cluster } => cluster.as_deref(),
            Request::Ping => None,
        }
    }

    /// Short operation name for logs and metrics.
    pub fn op(&self) -> &'static str {
        match self {
            Request::PutWal { .. } => "put_wal",
            Request::GetWal { .. } => "get_wal",
            Request::ListWal { .. } => "list_wal",
            Request::WalHistory { .. } => "wal_history",
            Request::Audit { .. } => "audit",
            Request::Ping => "ping",
            Request::ChunksMissing { .. } => "chunks_missing",
            Request::PutChunk { .. } => "put_chunk",
            Request::PutPack { .. } => "put_pack",
            Request::GetChunks { .. } => "get_chunks",
            Request::PutBackup { .. } => "put_backup",
            Request::GetBackup { .. } => "get_backup",
            Request::ListBackups { .. } => "list_backups",
            Request::BackupState { .. } => "backup_state",
            Request::DeleteBackup { .. } => "delete_backup",
            Request::Retention { .. } => "retention",
            Request::BeginBackup { .. } => "begin_backup",
            Request::StreamAppend { .. } => "stream_append",
            Request::StreamSession { .. } => "stream_session",
            Request::StreamSeal { .. } => "stream_seal",
            Request::Check { .. } => "check",
            Request::RecordVerify { .. } => "record_verify",
            Request::Status { .. } => "status",
        }
    }
}

/// The server's answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    /// The object is durably stored (or was already, with the same content).
    Stored {
        /// True when an identical object was already archived.
        already_present: bool,
    },
    /// An object follows as the body.
    Object {
        /// Size of the raw file.
        raw_size: u64,
        /// blake3 of the raw file, hex.
        blake3: String,
        /// Size of the body that follows.
        compressed_size: u64,
        /// Set when the object is the streaming receiver's unfinished segment, zero-padded
        /// to the segment size: the bytes of WAL it holds. Such an answer must not be
        /// kept as if complete (a later one holds more).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        partial_bytes: Option<u64>,
    },
    /// Answer to [`Request::PutPack`]: every chunk of the pack is durably stored.
    PackStored {
        /// Chunks the archive did not hold before.
        new_chunks: u32,
        /// Bytes the pack takes in the store.
        stored_bytes: u64,
    },
    /// Answer to [`Request::GetChunks`]: every chunk asked for follows as the body, each
    /// a whole stored object (64-byte header, then its zstd frame), in the order asked.
    Chunks {
        /// Number of objects that follow.
        count: u32,
    },
    /// WAL listing of a cluster: one page of it (its `next` names the following one).
    WalList(WalListing),
    /// Answer to [`Request::Status`]: one status per cluster, by name.
    Status {
        /// The clusters.
        clusters: Vec<ClusterStatus>,
    },
    /// Answer to [`Request::Check`]: every named check, in a fixed order.
    Checks {
        /// The checks.
        checks: Vec<CheckResult>,
    },
    /// Answer to [`Request::WalHistory`] and [`Request::Audit`]: records, oldest first.
    Audit {
        /// The records.
        records: Vec<crate::core::wire::audit::AuditRecord>,
        /// The cursor of the following page (its `after`); `None`: this is the last.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        next: Option<String>,
    },
    /// Answer to [`Request::Ping`].
    Pong {
        /// Cluster named in the client certificate.
        cluster: String,
        /// Role named in the client certificate.
        role: String,
        /// Server version.
        version: String,
    },
    /// Answer to [`Request::ChunksMissing`]: the chunks the archive lacks.
    Missing {
        /// blake3 of each missing chunk, hex.
        hashes: Vec<String>,
    },
    /// Answer to [`Request::ListBackups`]: one page, oldest first.
    Backups {
        /// The backups.
        backups: Vec<crate::core::wire::backup::BackupSummary>,
        /// The cursor of the following page (its `after`); `None`: this is the last.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        next: Option<String>,
    },
    /// Answer to [`Request::BackupState`].
    Backup {
        /// The backup and its state.
        backup: crate::core::wire::backup::BackupSummary,
    },
    /// Answer to [`Request::StreamAppend`]: the segment is durable up to `flushed`.
    StreamFlushed {
        /// Offset in the segment up to which the archive holds it fdatasynced.
        flushed: u64,
        /// The segment is complete; it becomes a normal archived segment shortly.
        complete: bool,
    },
    /// In a [`Request::StreamSession`]: the first `appends` appends of the session are
    /// fdatasynced on the archive's disk.
    StreamAcked {
        /// Appends durable since the session began.
        appends: u64,
    },
    /// The object was deleted.
    Deleted,
    /// The record was written to the catalog.
    Recorded,
    /// Answer to [`Request::BeginBackup`].
    BackupLease {
        /// The lease, to name in the backup's requests.
        lease: String,
        /// Seconds the lease lives without a renewal.
        ttl_secs: u64,
    },
    /// Answer to [`Request::Retention`].
    Retention(crate::core::wire::admin::RetentionReport),
    /// The request failed; nothing was changed.
    Error {
        /// Machine-readable class.
        code: ErrorCode,
        /// What happened and what to do, for a human.
        message: String,
    },
}

/// Classes of failure the client acts on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The object is not in the archive.
    NotFound,
    /// A different object is already archived under this name.
    Conflict,
    /// The request or its body is malformed or fails validation.
    Invalid,
    /// The certificate's cluster or role does not allow this.
    Unauthorized,
    /// The WAL belongs to another cluster than the one bound to this name.
    WrongCluster,
    /// A frame or body exceeds a protocol limit.
    TooLarge,
    /// The server is shutting down; retry later.
    Unavailable,
    /// A server-side failure (storage, catalog).
    Internal,
}

impl ErrorCode {
    /// Whether retrying the same request later may succeed.
    pub fn is_transient(self) -> bool {
        matches!(self, ErrorCode::Unavailable | ErrorCode::Internal)
    }
}

/// WAL held for a cluster.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WalListing {
    /// Cluster name.
    pub cluster: String,
    /// System identifier bound to the cluster, once a segment was pushed.
    pub system_identifier: Option<u64>,
    /// Segment size bound to the cluster; a size PostgreSQL cannot have is refused when
    /// the listing is decoded.
    #[serde(
        default,
        deserialize_with = "crate::core::pg::wal::deserialize_opt_segment_size"
    )]
    pub segment_size: Option<u32>,
    /// Per timeline, ascending.
    pub timelines: Vec<TimelineListing>,
    /// History files present.
    pub history_files: Vec<String>,
    /// Backup history files present.
    pub backup_history_files: Vec<String>,
    /// The streaming receiver's unfinished (or sealed) segments, on the first page.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub streamed: Vec<StreamedSegment>,
    /// In a page: the cursor of the following page (its `after`); `None` on the last page
    /// and in a merged listing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
}

/// One cluster as `archived status` shows it. Times are Unix seconds.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterStatus {
    /// Cluster name.
    pub cluster: String,
    /// The PostgreSQL system it is bound to.
    pub system_identifier: Option<u64>,
    /// Its WAL segment size.
    pub segment_size: Option<u32>,
    /// The newest complete segment, and when the store took it.
    pub newest_segment: Option<String>,
    /// When the store took the newest segment.
    pub newest_segment_time: Option<i64>,
    /// Complete WAL segments and other WAL files in the catalog.
    pub wal_files: u64,
    /// Their stored (compressed) bytes.
    pub wal_stored_bytes: u64,
    /// The primary's `.ready` files as its newest push reported them (since archived
    /// started).
    pub ready_files: Option<u64>,
    /// Where the streaming receiver's WAL durable on this archived ends, while its
    /// segment is unfinished.
    pub stream_flushed_lsn: Option<String>,
    /// Base backups, and how many are usable.
    pub backups: u64,
    /// Usable backups (all their WAL in the store).
    pub usable_backups: u64,
    /// The newest usable backup's id and end.
    pub newest_backup: Option<String>,
    /// When the newest usable backup ended.
    pub newest_backup_time: Option<i64>,
    /// Stored bytes the backups added (their chunks and manifests).
    pub backup_stored_bytes: u64,
    /// The recovery window: from the oldest usable backup's end ...
    pub window_start: Option<i64>,
    /// ... to the last WAL archived without a gap after the newest one.
    pub window_end: Option<i64>,
    /// The newest retention run that covered the cluster: when it ended ...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention_last_run: Option<i64>,
    /// ... why it failed, if it did ...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention_error: Option<String>,
    /// ... and when the newest successful one ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention_last_success: Option<i64>,
    /// WAL files the newest successful retention run expired.
    #[serde(default)]
    pub retention_expired_wal_files: u64,
    /// Backups the newest successful retention run expired.
    #[serde(default)]
    pub retention_expired_backups: u64,
    /// When the newest recorded `archived verify` run ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify_last_run: Option<i64>,
    /// What it read ("wal", "backups", "wal and backups").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify_scope: Option<String>,
    /// The problems it found.
    #[serde(default)]
    pub verify_problems: u64,
    /// Names of the checks (`archived check`) that are not OK, with their status.
    pub failing_checks: Vec<(String, CheckStatus)>,
}

/// How a named check came out (Nagios' OK, WARNING, CRITICAL).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum CheckStatus {
    /// Nothing to do.
    Ok,
    /// Look at it soon.
    Warning,
    /// Act now: a restore may not get what it needs.
    Critical,
}

impl std::fmt::Display for CheckStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CheckStatus::Ok => "OK",
            CheckStatus::Warning => "WARNING",
            CheckStatus::Critical => "CRITICAL",
        })
    }
}

/// One named check of `archived check`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckResult {
    /// Its name (`wal_continuity`, `wal_age`, ...), stable: scripts match on it.
    pub name: String,
    /// How it came out.
    pub status: CheckStatus,
    /// What was found, with the names and numbers that matter.
    pub message: String,
    /// What to do about it (absent when OK).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
    /// The measured value, for Nagios perfdata and monitoring scripts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<CheckValue>,
}

/// A check's measured value and its thresholds (whole numbers in `unit`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckValue {
    /// Perfdata label.
    pub label: String,
    /// The value.
    pub value: i64,
    /// Its unit in Nagios perfdata (`s`, `B`, or empty for a count).
    pub unit: String,
    /// The warning threshold, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warning: Option<i64>,
    /// The critical threshold, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub critical: Option<i64>,
}

/// A segment the streaming receiver holds part of.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamedSegment {
    /// The segment's file name.
    pub name: String,
    /// Bytes of WAL held, from the segment's start.
    pub bytes: u64,
}

/// WAL of one timeline.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimelineListing {
    /// Timeline.
    pub timeline: TimelineId,
    /// Number of complete segments.
    pub segments: u64,
    /// First segment name.
    pub first: Option<String>,
    /// Last segment name.
    pub last: Option<String>,
    /// Missing ranges between first and last, inclusive, as (first missing, last missing).
    pub gaps: Vec<(String, String)>,
    /// Partial segments of the timeline.
    pub partials: Vec<String>,
    /// Raw bytes held.
    pub raw_bytes: u64,
    /// Stored (compressed) bytes.
    pub stored_bytes: u64,
}

/// Encodes a message as one frame.
///
/// A message whose frame would exceed [`MAX_FRAME_LEN`] is refused
/// ([`FrameError::TooLarge`]): the peer would refuse it anyway, after the sender had
/// done the work (a retention run, a listing). Listings that can grow are paged instead.
pub fn encode_frame<T: Serialize>(message: &T) -> Result<Vec<u8>, FrameError> {
    let out = encode_frame_unbounded(message);
    let len = out.len() - 4;
    if len > MAX_FRAME_LEN as usize {
        return Err(FrameError::TooLarge(u32::try_from(len).unwrap_or(u32::MAX)));
    }
    Ok(out)
}

/// [`encode_frame`] without the limit: for requests, which the wire's own limits (hashes
/// per request, ...) keep far below it; the archive refuses an oversized one by its
/// length prefix.
pub(crate) fn encode_frame_unbounded<T: Serialize>(message: &T) -> Vec<u8> {
    // Serializing our own plain data types cannot fail.
    let json = serde_json::to_vec(message).unwrap_or_default();
    let mut out = Vec::with_capacity(4 + json.len());
    out.extend_from_slice(&(json.len() as u32).to_be_bytes());
    out.extend_from_slice(&json);
    out
}

/// Reads the frame length from its 4-byte prefix, refusing anything over the limit.
pub fn frame_len(prefix: [u8; 4]) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(prefix);
    if len > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge(len));
    }
    Ok(len as usize)
}

/// Decodes a frame payload (without its length prefix).
pub fn decode_frame<T: for<'de> Deserialize<'de>>(payload: &[u8]) -> Result<T, FrameError> {
    serde_json::from_slice(payload).map_err(|e| FrameError::Malformed(e.to_string()))
}

/// Why a frame was refused.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum FrameError {
    /// The length prefix exceeds [`MAX_FRAME_LEN`].
    #[error("frame of {0} bytes exceeds the limit of {MAX_FRAME_LEN} bytes")]
    TooLarge(u32),
    /// The payload is not a valid message.
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// The stream ended inside a frame.
    #[error("stream ended inside a frame")]
    Truncated,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn frames_round_trip() {
        let req = Request::PutWal {
            cluster: "main".into(),
            name: "000000010000000000000001".into(),
            raw_size: 16 << 20,
            blake3: "00".repeat(32),
            ready_files: None,
            request_id: Some("0123456789abcdef".into()),
        };
        let frame = encode_frame(&req).unwrap();
        let len = frame_len(frame[..4].try_into().unwrap()).unwrap();
        assert_eq!(len, frame.len() - 4);
        assert_eq!(decode_frame::<Request>(&frame[4..]).unwrap(), req);
    }

    #[test]
    fn oversized_and_malformed_frames_are_refused() {
        assert!(matches!(
            frame_len((MAX_FRAME_LEN + 1).to_be_bytes()),
            Err(FrameError::TooLarge(_))
        ));
        assert!(matches!(
            decode_frame::<Request>(b"{\"op\":\"nope\"}"),
            Err(FrameError::Malformed(_))
        ));
        assert!(matches!(
            decode_frame::<Request>(b"\xff\xfe"),
            Err(FrameError::Malformed(_))
        ));
    }

    /// Before: encoded whatever its size, for the peer to refuse after the work was done.
    #[test]
    fn the_encoder_refuses_a_frame_over_the_limit() {
        let listing = |files: usize| {
            Response::WalList(WalListing {
                cluster: "main".into(),
                history_files: vec!["0000000A.history".to_string(); files],
                ..Default::default()
            })
        };
        // 19 bytes per name with its quotes and comma.
        let small = encode_frame(&listing(1000)).unwrap();
        assert_eq!(
            frame_len(small[..4].try_into().unwrap()).unwrap(),
            small.len() - 4
        );
        match encode_frame(&listing(MAX_FRAME_LEN as usize / 19 + 1)) {
            Err(FrameError::TooLarge(len)) => assert!(len > MAX_FRAME_LEN),
            other => panic!(
                "an oversized frame was encoded: {:?}",
                other.map(|f| f.len())
            ),
        }
    }

    /// Before: a listing with segment size 0 decoded, and the prefetch daemon divided by
    /// it.
    #[test]
    fn a_listing_with_an_impossible_segment_size_is_refused_when_decoded() {
        let listing = |size: Option<u32>| {
            encode_frame(&Response::WalList(WalListing {
                cluster: "main".into(),
                segment_size: size,
                ..Default::default()
            }))
            .unwrap()
        };
        for bad in [0, 3 << 20, 1 << 19, 1 << 31] {
            let frame = listing(Some(bad));
            match decode_frame::<Response>(&frame[4..]) {
                Err(FrameError::Malformed(m)) => {
                    assert!(m.contains("implausible WAL segment size"), "{m}")
                }
                other => panic!("segment size {bad} was not refused: {other:?}"),
            }
        }
        for good in [Some(1 << 20), Some(16 << 20), Some(1 << 30), None] {
            let frame = listing(good);
            assert!(decode_frame::<Response>(&frame[4..]).is_ok(), "{good:?}");
        }
        // A listing without the field at all (an older server) is still read.
        let old = br#"{"result":"wal_list","cluster":"main","system_identifier":null,"timelines":[],"history_files":[],"backup_history_files":[]}"#;
        assert!(decode_frame::<Response>(old).is_ok());
    }

    /// Requests and answers of clients and servers before paging still decode: no
    /// cursor means the first page, no `next` the last, and no `paged` marks a client
    /// that would take a first page for the whole listing (the server answers it whole).
    #[test]
    fn messages_without_the_paging_fields_still_decode() {
        assert_eq!(
            decode_frame::<Request>(br#"{"op":"list_wal","cluster":"main"}"#).unwrap(),
            Request::ListWal {
                cluster: "main".into(),
                after: None,
                paged: false,
            }
        );
        assert_eq!(
            decode_frame::<Request>(br#"{"op":"list_backups","cluster":"main"}"#).unwrap(),
            Request::ListBackups {
                cluster: "main".into(),
                after: None,
                paged: false,
            }
        );
        assert_eq!(
            decode_frame::<Response>(br#"{"result":"backups","backups":[]}"#).unwrap(),
            Response::Backups {
                backups: Vec::new(),
                next: None
            }
        );
        // A paging client says so.
        let first = encode_frame(&Request::ListWal {
            cluster: "main".into(),
            after: None,
            paged: true,
        })
        .unwrap();
        assert_eq!(
            &first[4..],
            br#"{"op":"list_wal","cluster":"main","paged":true}"#
        );
    }

    proptest! {
        #[test]
        fn decoding_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode_frame::<Request>(&bytes);
            let _ = decode_frame::<Response>(&bytes);
        }
    }
}
