//! `pushclient stream`: a physical replication receiver on a slot that forwards WAL to
//! archived as it arrives, so the archive can be a synchronous standby (RPO 0).
//!
//! Contract:
//!
//! - **Flush means durable in archived.** The position reported to PostgreSQL as
//!   `flush` is the end of what archived answered as fdatasynced (`StreamAppend`);
//!   `write` is what was received, `apply` is always 0 (the archive replays nothing:
//!   claiming more would let `remote_apply` commits return before any replica applied
//!   them). No hot-standby feedback is ever sent. Keepalives that ask for a reply are
//!   answered at once, and a status goes out at least every quarter of the server's
//!   `wal_sender_timeout` ([`status_interval`]) whatever the receiver is doing, also
//!   while it does not read (below) and so does not see the server's keepalives. The
//!   receive loop awaits nothing but PostgreSQL's socket, the archive session's
//!   channels and its timer (the archive session is opened before START_REPLICATION,
//!   the status file is written by a thread of its own), so neither a stalled archive
//!   nor a slow disk can starve those statuses.
//! - **Group commit, never waiting on the archive.** Each timeline is streamed through
//!   one session with archived (`StreamSession`): what arrives is sent at once, cut at
//!   segment ends, by a task of its own, without waiting for earlier appends to be
//!   acknowledged; archived writes each burst it received and fdatasyncs it once, then
//!   acknowledges it, as PostgreSQL's walreceiver does. At most [`MAX_PENDING`] bytes may
//!   be received and not yet durable (beyond that the receiver stops reading from
//!   PostgreSQL, still answering it, until the archive catches up: memory stays bounded
//!   whatever the WAL rate); an append unacknowledged for the client's idle timeout ends
//!   the session (reconnect).
//! - **Never a silent gap.** The start is where the archive's WAL on the server's
//!   history ends ([`start`]), else the slot's restart LSN; if the server no longer has
//!   the WAL from there, the receiver refuses to go on unless `--allow-gap` (then it
//!   starts at the slot, says so in its log and status, and `wal list` shows the gap).
//! - **Timelines.** The next timeline and its start are the server's (the end-of-timeline
//!   message, and TIMELINE_HISTORY), never `tli + 1`; the history file is archived before
//!   any WAL of its timeline; the old timeline's unfinished segment is sealed in the
//!   archive. A server restored to an earlier point is followed from its fork.
//! - **Reconnects forever**, with back-off from 1 s to 30 s, after any failure of
//!   PostgreSQL, the network or archived; only a misconfiguration (another system than
//!   the cluster's, a missing slot without `--create-slot`, a gap without `--allow-gap`)
//!   ends it, with exit 1. SIGTERM or SIGINT: the appends in flight are acknowledged, the last
//!   position reported, exit 0.

mod start;
pub(crate) mod status;

use std::collections::VecDeque;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use bytes::{Bytes, BytesMut};
use walvault_protocol::core::format::codec::{blake3_hex, Encoder};
use walvault_protocol::core::pg::conf;
use walvault_protocol::core::pg::timeline::TimelineHistory;
use walvault_protocol::core::pg::wal::{Lsn, SegmentName, TimelineId, WalFileName};
use walvault_protocol::core::wire::{WalListing, MAX_STREAM_APPEND};
use walvault_protocol::net::client::{ArchiveClient, ClientError};
use walvault_protocol::net::config::ClientConfig;
use walvault_protocol::net::pg::stream::{validate_slot_name, StreamEvent, WalStream};
use walvault_protocol::net::pg::{conninfo, ConnParams, PgConnection, PgError};

use start::{HeldTimeline, PathStep, Start};
use status::StreamStatus;

/// The longest PostgreSQL goes without a status from the receiver, whatever its
/// `wal_sender_timeout`.
const STATUS_INTERVAL_MAX: Duration = Duration::from_secs(10);
/// The shortest interval between statuses sent unasked.
const STATUS_INTERVAL_MIN: Duration = Duration::from_millis(100);
/// Received bytes that may wait for the archive before the receiver stops reading.
pub(crate) const MAX_PENDING: u64 = 2 * MAX_STREAM_APPEND;

/// How often a status goes out unasked against a server whose `wal_sender_timeout` is
/// `timeout` (`None`: 0, no timeout): a quarter of it, so that one late wake-up of the
/// receiver, or of the walsender, never reaches the timeout; at most
/// [`STATUS_INTERVAL_MAX`] (PostgreSQL's own `wal_receiver_status_interval` default).
pub(crate) fn status_interval(timeout: Option<Duration>) -> Duration {
    match timeout {
        None => STATUS_INTERVAL_MAX,
        Some(t) => (t / 4).clamp(STATUS_INTERVAL_MIN, STATUS_INTERVAL_MAX),
    }
}

/// `SHOW wal_sender_timeout`'s answer ("60s", "1min", "500ms", "0") as a duration;
/// `None` for 0 (no timeout).
fn parse_sender_timeout(text: &str) -> Result<Option<Duration>> {
    let t = conf::time_setting(text, Duration::from_millis(1))
        .ok_or_else(|| anyhow!("wal_sender_timeout {text:?} is not a duration"))?;
    Ok((!t.is_zero()).then_some(t))
}

/// Back-off between sessions: first and longest pause.
const BACKOFF_FIRST: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A session that ran this long resets the back-off.
const HEALTHY_SESSION: Duration = Duration::from_secs(60);

/// What `pushclient stream` was asked.
pub(crate) struct StreamArgs {
    pub(crate) conninfo: Option<String>,
    pub(crate) slot: String,
    pub(crate) create_slot: bool,
    pub(crate) application_name: String,
    pub(crate) allow_gap: bool,
    pub(crate) status_file: Option<PathBuf>,
    /// Received bytes that may wait for the archive ([`MAX_PENDING`] unless a test
    /// says otherwise).
    pub(crate) max_pending: u64,
}

/// Why a session ended.
enum Ended {
    /// SIGTERM/SIGINT.
    Shutdown,
}

/// A session's failure: retried, or the end of the receiver.
enum Failure {
    Retry(anyhow::Error),
    Fatal(anyhow::Error),
}

impl<E: Into<anyhow::Error>> From<E> for Failure {
    fn from(e: E) -> Failure {
        Failure::Retry(e.into())
    }
}

fn fatal(e: anyhow::Error) -> Failure {
    Failure::Fatal(e)
}

/// The receiver's state across sessions.
struct Receiver<'a> {
    cfg: &'a ClientConfig,
    args: &'a StreamArgs,
    params: ConnParams,
    status_file: status::StatusWriter,
    status: StreamStatus,
    shutdown: tokio::sync::watch::Receiver<bool>,
    /// The next session starts at the slot's restart LSN (`--allow-gap` after the server
    /// had removed the WAL the archive needs).
    start_at_slot: bool,
    last_status_write: Option<Instant>,
    /// How often a status goes out unasked (from the server's wal_sender_timeout).
    status_every: Duration,
}

pub(crate) async fn stream(cfg: &ClientConfig, args: &StreamArgs) -> Result<()> {
    validate_slot_name(&args.slot)?;
    let mut params = conninfo::resolve(args.conninfo.as_deref(), &|k| std::env::var(k).ok())?;
    // It decides whether the receiver is a synchronous standby: the flag wins.
    params.application_name = args.application_name.clone();
    let status_path = args
        .status_file
        .clone()
        .unwrap_or_else(|| status::default_path(&args.slot));
    let (tx, shutdown) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        wait_for_termination().await;
        let _ = tx.send(true);
    });
    let mut receiver = Receiver {
        cfg,
        args,
        params,
        status_file: status::StatusWriter::new(status_path)?,
        status: StreamStatus {
            pid: std::process::id(),
            state: "connecting".into(),
            cluster: cfg.cluster.clone(),
            slot: args.slot.clone(),
            application_name: args.application_name.clone(),
            ..Default::default()
        },
        shutdown,
        start_at_slot: false,
        last_status_write: None,
        status_every: STATUS_INTERVAL_MAX,
    };
    let mut backoff = BACKOFF_FIRST;
    loop {
        let began = Instant::now();
        let outcome = receiver.session().await;
        match outcome {
            Ok(Ended::Shutdown) => {
                receiver.status.state = "stopped".into();
                receiver.write_status();
                tracing::info!(
                    flushed = receiver.status.flushed.as_deref().unwrap_or("-"),
                    received = receiver.status.received.as_deref().unwrap_or("-"),
                    "stream receiver stopped"
                );
                return Ok(());
            }
            Err(Failure::Fatal(e)) => {
                receiver.status.state = "stopped".into();
                receiver.status.last_error = Some(format!("{e:#}"));
                receiver.write_status();
                return Err(e);
            }
            Err(Failure::Retry(e)) => {
                if began.elapsed() >= HEALTHY_SESSION {
                    backoff = BACKOFF_FIRST;
                }
                tracing::warn!(error = %format!("{e:#}"), retry_in_secs = backoff.as_secs(), "stream session ended; reconnecting");
                receiver.status.state = "waiting".into();
                receiver.status.last_error = Some(format!("{e:#}"));
                receiver.status.reconnects += 1;
                receiver.write_status();
                let mut shutdown = receiver.shutdown.clone();
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.wait_for(|s| *s) => {
                        receiver.status.state = "stopped".into();
                        receiver.write_status();
                        tracing::info!("stream receiver stopped while waiting to reconnect");
                        return Ok(());
                    }
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

async fn wait_for_termination() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => std::future::pending().await,
    }
}

/// `SHOW wal_segment_size`'s answer ("16MB", "1GB") in bytes.
fn parse_segment_size(text: &str) -> Result<u32> {
    let (n, unit) = conf::number_and_unit(text)
        .ok_or_else(|| anyhow!("wal_segment_size {text:?} is not a size"))?;
    let bytes = match unit {
        "" | "B" => n,
        "kB" => n << 10,
        "MB" => n << 20,
        "GB" => n << 30,
        other => bail!("wal_segment_size {text:?}: unknown unit {other:?}"),
    };
    let size =
        u32::try_from(bytes).map_err(|_| anyhow!("wal_segment_size {text:?} is too large"))?;
    walvault_protocol::core::pg::wal::validate_segment_size(size)
        .map_err(|e| anyhow!("wal_segment_size {text:?}: {e}"))?;
    Ok(size)
}

/// The server's path of timelines (its history, then its current timeline).
fn timeline_path(history: Option<&TimelineHistory>, current: TimelineId) -> Vec<PathStep> {
    let mut path: Vec<PathStep> = history
        .map(|h| {
            h.entries
                .iter()
                .map(|e| PathStep {
                    timeline: e.timeline,
                    end: Some(e.switchpoint),
                })
                .collect()
        })
        .unwrap_or_default();
    path.push(PathStep {
        timeline: current,
        end: None,
    });
    path
}

/// What the archive holds, as segment numbers per timeline.
fn held_wal(listing: &WalListing, segment_size: u32) -> Vec<HeldTimeline> {
    let segno = |name: &str| -> Option<u64> {
        match name.parse::<WalFileName>().ok()? {
            WalFileName::Segment(s) | WalFileName::Partial(s) => Some(s.segno(segment_size)),
            _ => None,
        }
    };
    let mut held: Vec<HeldTimeline> = listing
        .timelines
        .iter()
        .map(|t| {
            let mut complete = Vec::new();
            if let (Some(first), Some(last)) = (
                t.first.as_deref().and_then(segno),
                t.last.as_deref().and_then(segno),
            ) {
                // [first, last] minus the gaps.
                let mut gaps: Vec<(u64, u64)> = t
                    .gaps
                    .iter()
                    .filter_map(|(a, b)| Some((segno(a)?, segno(b)?)))
                    .collect();
                gaps.sort_unstable();
                let mut from = first;
                for (a, b) in gaps {
                    if a > from {
                        complete.push((from, a - 1));
                    }
                    from = from.max(b.saturating_add(1));
                }
                if from <= last {
                    complete.push((from, last));
                }
            }
            HeldTimeline {
                timeline: t.timeline,
                complete,
                streamed: Vec::new(),
            }
        })
        .collect();
    // An entry that holds nothing (a newer archived never lists one) starts nothing.
    for s in listing.streamed.iter().filter(|s| s.bytes > 0) {
        let Ok(WalFileName::Segment(seg)) = s.name.parse::<WalFileName>() else {
            continue;
        };
        let at = match held.iter().position(|h| h.timeline == seg.timeline) {
            Some(at) => at,
            None => {
                held.push(HeldTimeline {
                    timeline: seg.timeline,
                    complete: Vec::new(),
                    streamed: Vec::new(),
                });
                held.len() - 1
            }
        };
        held[at].streamed.push(seg.segno(segment_size));
    }
    held
}

/// A zstd frame of `bytes`, as PutWal takes it.
fn zstd_frame(bytes: &[u8], level: i32) -> Result<Vec<u8>> {
    let mut encoder = Encoder::new(level)?;
    let mut out = Vec::new();
    encoder.write(bytes, &mut out)?;
    encoder.finish(&mut out)?;
    Ok(out)
}

/// The archive's side of one timeline's streaming: a session whose appends are sent by
/// one task and whose acknowledgements are read by another, so that neither a slow
/// archive nor a slow network ever holds up the receive loop.
struct Session {
    /// Appends to send: segment, offset, bytes, and the server's WAL end then.
    appends: tokio::sync::mpsc::UnboundedSender<(String, u64, Bytes, Option<u64>)>,
    /// Acknowledgements (appends durable so far), or why the session failed.
    acks: tokio::sync::mpsc::UnboundedReceiver<Result<Option<u64>, ClientError>>,
    sender: tokio::task::JoinHandle<()>,
    reader: tokio::task::JoinHandle<()>,
}

impl Session {
    async fn open(
        archive: &ArchiveClient,
        system_identifier: u64,
        segment_size: u32,
    ) -> Result<Session, ClientError> {
        let (mut sender, mut acks) = archive
            .stream_session(system_identifier, segment_size)
            .await?;
        let (appends, mut queued) =
            tokio::sync::mpsc::unbounded_channel::<(String, u64, Bytes, Option<u64>)>();
        let (ack_tx, ack_rx) = tokio::sync::mpsc::unbounded_channel();
        let failed = ack_tx.clone();
        let sender = tokio::spawn(async move {
            while let Some((segment, offset, bytes, server_end)) = queued.recv().await {
                if let Err(e) = sender.append(&segment, offset, bytes, server_end).await {
                    let _ = failed.send(Err(e));
                    return;
                }
            }
            sender.finish();
        });
        let reader = tokio::spawn(async move {
            loop {
                let ack = acks.next().await;
                let more = matches!(ack, Ok(Some(_)));
                if ack_tx.send(ack).is_err() || !more {
                    return;
                }
            }
        });
        Ok(Session {
            appends,
            acks: ack_rx,
            sender,
            reader,
        })
    }

    /// Ends the session from this side once what was queued is sent (the archive then
    /// ends it too, without an error in its log).
    async fn close(mut self) {
        let (closed, _) = tokio::sync::mpsc::unbounded_channel();
        drop(std::mem::replace(&mut self.appends, closed));
        let _ = tokio::time::timeout(Duration::from_secs(5), &mut self.sender).await;
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.sender.abort();
        self.reader.abort();
    }
}

/// An append sent and not yet acknowledged.
struct Sent {
    /// Where its bytes end.
    end: Lsn,
    at: Instant,
}

impl Receiver<'_> {
    fn write_status(&mut self) {
        self.status.updated_unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        self.status_file.send(&self.status);
        self.last_status_write = Some(Instant::now());
    }

    /// One connection to PostgreSQL and archived, streaming until an error, a shutdown,
    /// or for ever (timeline switches stay in the session).
    async fn session(&mut self) -> Result<Ended, Failure> {
        self.status.state = "connecting".into();
        self.write_status();
        let archive = ArchiveClient::connect(self.cfg)
            .await
            .context("connecting to archived")?;
        let mut conn = PgConnection::connect(&self.params)
            .await
            .context("connecting to PostgreSQL for replication")?;
        let system = conn.identify_system().await?;
        let segment_size =
            parse_segment_size(&conn.show("wal_segment_size").await?).map_err(fatal)?;
        let version = conn.server_version_num().await?;
        if version < 150000 {
            return Err(fatal(anyhow!(
                "PostgreSQL {version} is too old for pushclient stream: it needs 15 or later (READ_REPLICATION_SLOT)"
            )));
        }
        if let Some(bound) = archive.binding().await? {
            if bound.system_identifier != system.system_identifier
                || bound.segment_size != segment_size
            {
                return Err(fatal(anyhow!(
                    "PostgreSQL at {} is system {} with {} byte WAL segments, but cluster '{}' in the archive is bound to system {} with {} byte segments; \
                     point --conninfo at this cluster's server, or use the client config of the cluster it belongs to",
                    conn.endpoint, system.system_identifier, segment_size, self.cfg.cluster,
                    bound.system_identifier, bound.segment_size
                )));
            }
        }
        self.status.system_identifier = Some(system.system_identifier);
        self.status_every = status_interval(
            parse_sender_timeout(&conn.show("wal_sender_timeout").await?).map_err(fatal)?,
        );
        self.check_sync_settings(&mut conn).await?;

        let slot = match conn.read_replication_slot(&self.args.slot).await? {
            Some(slot) => slot,
            None if self.args.create_slot => {
                let at = conn.create_physical_slot(&self.args.slot).await?;
                tracing::info!(slot = %self.args.slot, restart_lsn = %at, "created the replication slot (WAL reserved from now on)");
                conn.read_replication_slot(&self.args.slot)
                    .await?
                    .ok_or_else(|| anyhow!("slot {} vanished right after it was created", self.args.slot))?
            }
            None => {
                return Err(fatal(anyhow!(
                    "replication slot {:?} does not exist on {}: run with --create-slot, or create it with \
                     SELECT pg_create_physical_replication_slot('{}', true);",
                    self.args.slot, conn.endpoint, self.args.slot
                )))
            }
        };

        let mut timeline = TimelineId(system.timeline);
        let history = self.archive_history(&mut conn, &archive, timeline).await?;
        let path = timeline_path(history.as_ref(), timeline);
        let listing = archive.list_wal().await?;
        let held = held_wal(&listing, segment_size);
        let from_archive = start::archive_start(&path, &held, segment_size);
        let from_slot = slot
            .restart_lsn
            .and_then(|p| start::start_at(&path, p, segment_size));
        let (mut start, why) = match (from_archive, from_slot) {
            (Some(s), _) if !self.start_at_slot => (s, "the end of the archive's WAL"),
            (_, Some(s)) => (s, "the slot's restart LSN"),
            (Some(s), None) => (s, "the end of the archive's WAL"),
            (None, None) => {
                return Err(fatal(anyhow!(
                    "the archive holds no WAL of this server's history and slot {:?} reserves none (restart_lsn is NULL): \
                     drop it and run with --create-slot, which reserves WAL at once",
                    self.args.slot
                )))
            }
        };
        if self.start_at_slot {
            if let Some(Start { lsn: p, .. }) = from_archive {
                let warning = format!(
                    "gap: the archive's WAL ends at {p} but the server kept WAL only from {}; WAL in between is lost (--allow-gap)",
                    start.lsn
                );
                tracing::error!("{warning}");
                if !self.status.warnings.contains(&warning) {
                    self.status.warnings.push(warning);
                }
            }
        }
        tracing::info!(start = %start.lsn, timeline = start.timeline.0, "streaming from {why}");
        self.status.started_at = Some(format!(
            "{} on timeline {} ({why})",
            start.lsn, start.timeline.0
        ));

        loop {
            timeline = start.timeline;
            self.status.timeline = Some(timeline.0);
            let next = {
                // The archive's side first: once START_REPLICATION is sent the server
                // counts wal_sender_timeout, and an archive slow to answer must not
                // keep the receiver from answering it.
                let session = Session::open(&archive, system.system_identifier, segment_size)
                    .await
                    .context("opening the stream session with archived")?;
                let mut stream = match conn
                    .start_physical(Some(&self.args.slot), start.lsn, start.timeline)
                    .await
                {
                    Ok(s) => s,
                    Err(e) => return Err(self.start_failure(e)),
                };
                self.receive(&mut stream, &archive, session, start, segment_size)
                    .await?
            };
            let Some((next_timeline, next_start)) = next else {
                archive.close().await;
                return Ok(Ended::Shutdown);
            };
            tracing::info!(
                old_timeline = timeline.0,
                next_timeline = next_timeline.0,
                next_start = %next_start,
                "the server's timeline ended; following its next timeline"
            );
            self.archive_history(&mut conn, &archive, next_timeline)
                .await?;
            let size = u64::from(segment_size);
            start = Start {
                lsn: Lsn(next_start.0 / size * size),
                timeline: next_timeline,
            };
        }
    }

    /// A failure of START_REPLICATION or of the stream's first messages: a gap (the
    /// server removed the WAL), a slot in use, ...
    fn start_failure(&mut self, e: PgError) -> Failure {
        let text = e.to_string();
        if text.contains("has already been removed") {
            if self.args.allow_gap && !self.start_at_slot {
                self.start_at_slot = true;
                return Failure::Retry(anyhow!(e).context(
                    "the server no longer has the WAL the archive needs next; --allow-gap: starting at the slot's restart LSN",
                ));
            }
            return Failure::Fatal(anyhow!(e).context(
                "the server no longer has the WAL from where the archive's WAL ends: streaming from later would leave a gap. \
                 Archive the missing WAL (archive_command, or pushclient archive-push from a copy), or run with --allow-gap to start at the slot and record the gap",
            ));
        }
        Failure::Retry(anyhow!(e).context("starting replication"))
    }

    /// Archives the history file of `timeline` (before any WAL of it) and returns it.
    async fn archive_history(
        &mut self,
        conn: &mut PgConnection,
        archive: &ArchiveClient,
        timeline: TimelineId,
    ) -> Result<Option<TimelineHistory>, Failure> {
        if timeline.0 <= 1 {
            return Ok(None);
        }
        let (name, content) = conn.timeline_history(timeline).await?;
        let expected = WalFileName::History(timeline).to_string();
        if name != expected {
            return Err(anyhow!(
                "TIMELINE_HISTORY {} answered a file named {name:?}",
                timeline.0
            )
            .into());
        }
        let text = std::str::from_utf8(&content)
            .map_err(|_| anyhow!("{name} from the server is not text"))?;
        let history =
            TimelineHistory::parse(text).map_err(|e| anyhow!("{name} from the server: {e}"))?;
        let frame = zstd_frame(&content, self.cfg.zstd_level)?;
        let body = futures::stream::iter([Ok::<_, std::io::Error>(Bytes::from(frame))]);
        archive
            .put_wal(&name, content.len() as u64, &blake3_hex(&content), body)
            .await
            .with_context(|| format!("archiving {name}"))?;
        Ok(Some(history))
    }

    /// Warns when `synchronous_commit = remote_apply` while walvault is in the sync set.
    async fn check_sync_settings(&mut self, conn: &mut PgConnection) -> Result<(), Failure> {
        let commit = conn.show("synchronous_commit").await?;
        let names = conn.show("synchronous_standby_names").await?;
        let app = self.args.application_name.to_ascii_lowercase();
        let listed = names
            .to_ascii_lowercase()
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '*'))
            .any(|w| w == app || w == "*");
        self.status
            .warnings
            .retain(|w| !w.starts_with("synchronous_commit"));
        if commit == "remote_apply" && listed {
            let warning = format!(
                "synchronous_commit = remote_apply with {} in synchronous_standby_names ({names:?}): walvault reports apply = 0, \
                 so commits waiting for remote_apply are released by the other standbys only; use remote_write or on",
                self.args.application_name
            );
            tracing::warn!("{warning}");
            self.status.warnings.push(warning);
        }
        Ok(())
    }

    /// Streams one timeline from `start` until the server ends it (its next timeline and
    /// start), a shutdown (`None`), or an error.
    async fn receive(
        &mut self,
        stream: &mut WalStream<'_>,
        archive: &ArchiveClient,
        mut session: Session,
        start: Start,
        segment_size: u32,
    ) -> Result<Option<(TimelineId, Lsn)>, Failure> {
        let size = u64::from(segment_size);
        self.status.state = "streaming".into();
        self.status.last_error = None;
        self.write_status();
        // `pending` holds the received bytes from `pending_start` not yet sent.
        let mut pending = BytesMut::new();
        let mut pending_start = start.lsn;
        let mut received = start.lsn;
        let mut flushed: Option<Lsn> = None;
        let mut server_end: Option<Lsn> = None;
        // Appends sent and not yet durable, oldest first; `acked` counts the durable ones.
        let mut sent: VecDeque<Sent> = VecDeque::new();
        let mut acked: u64 = 0;
        let mut last_status = Instant::now();
        let mut tick = tokio::time::interval(self.status_every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut paused = false;
        let mut shutdown = self.shutdown.clone();
        let mut stopping = false;
        let mut timeline_end: Option<(TimelineId, Lsn)> = None;
        let mut first_message = true;
        loop {
            // Send what is pending at once, cut at segment ends: the archive syncs once
            // per burst of what it receives (group commit).
            while !pending.is_empty() {
                let segment = SegmentName::containing(start.timeline, pending_start, segment_size);
                let offset = pending_start.0 % size;
                let room = (size - offset).min(MAX_STREAM_APPEND) as usize;
                let bytes: Bytes = pending.split_to(room.min(pending.len())).freeze();
                pending_start = Lsn(pending_start.0 + bytes.len() as u64);
                if session
                    .appends
                    .send((segment.to_string(), offset, bytes, server_end.map(|e| e.0)))
                    .is_err()
                {
                    // The sender failed: its error is the next acknowledgement.
                    break;
                }
                sent.push_back(Sent {
                    end: pending_start,
                    at: Instant::now(),
                });
            }
            if sent.is_empty() && pending.is_empty() {
                if stopping {
                    session.close().await;
                    let flushed = flushed.unwrap_or(Lsn(0));
                    let _ = stream.send_status(received, flushed, false).await;
                    self.update_positions(received, Some(flushed), server_end);
                    self.write_status();
                    return Ok(None);
                }
                if let Some((next, at)) = timeline_end {
                    session.close().await;
                    // The old timeline's last segment stays as its streamed partial.
                    if !received.0.is_multiple_of(size) {
                        let segment = SegmentName::containing(
                            start.timeline,
                            Lsn(received.0 - 1),
                            segment_size,
                        );
                        archive
                            .stream_seal(&segment.to_string())
                            .await
                            .with_context(|| {
                                format!(
                                    "sealing {segment}, the end of timeline {}",
                                    start.timeline.0
                                )
                            })?;
                    }
                    return Ok(Some((next, at)));
                }
            }
            let unflushed = received.0 - flushed.unwrap_or(start.lsn).0;
            let full = unflushed >= self.args.max_pending;
            if full && !paused {
                self.status.read_pauses += 1;
                tracing::debug!(
                    unflushed,
                    "the archive is behind: not reading until it catches up"
                );
            }
            paused = full;
            let may_read = !stopping && timeline_end.is_none() && !full;
            tokio::select! {
                event = stream.next(), if may_read => {
                    let event = match event {
                        Ok(e) => e,
                        Err(e) if first_message => return Err(self.start_failure(e)),
                        Err(e) => return Err(anyhow!(e).context("receiving WAL").into()),
                    };
                    first_message = false;
                    match event {
                        StreamEvent::XLogData { start: at, wal_end, data, .. } => {
                            if at != received {
                                return Err(anyhow!("the server sent WAL from {at} where {received} was expected").into());
                            }
                            received = Lsn(received.0 + data.len() as u64);
                            server_end = Some(server_end.map_or(wal_end, |e| e.max(wal_end)));
                            pending.extend_from_slice(&data);
                        }
                        StreamEvent::Keepalive { wal_end, reply_requested, .. } => {
                            server_end = Some(server_end.map_or(wal_end, |e| e.max(wal_end)));
                            if reply_requested {
                                stream.send_status(received, flushed.unwrap_or(Lsn(0)), false).await?;
                                last_status = Instant::now();
                            }
                        }
                        StreamEvent::TimelineEnd { next_timeline, next_start } => {
                            timeline_end = Some((next_timeline, next_start));
                        }
                    }
                }
                ack = session.acks.recv() => {
                    let durable = match ack {
                        Some(Ok(Some(n))) => n,
                        Some(Ok(None)) | None => {
                            return Err(anyhow!("archived ended the stream session").into());
                        }
                        Some(Err(e)) => {
                            let upto = sent.front().map_or(received, |s| s.end);
                            return Err(anyhow!(e).context(format!("appending WAL up to {upto} to the archive")).into());
                        }
                    };
                    if durable > acked + sent.len() as u64 {
                        return Err(anyhow!(
                            "archived acknowledged {durable} appends where {} were sent",
                            acked + sent.len() as u64
                        )
                        .into());
                    }
                    while acked < durable {
                        let done = sent.pop_front().expect("counted above");
                        flushed = Some(done.end);
                        acked += 1;
                    }
                    // After the server ended the timeline the stream is no longer a COPY:
                    // nothing more is reported on it.
                    if timeline_end.is_none() {
                        if let Some(f) = flushed {
                            stream.send_status(received, f, false).await?;
                            last_status = Instant::now();
                        }
                    }
                    self.update_positions(received, flushed, server_end);
                }
                _ = tick.tick() => {
                    if let Some(oldest) = sent.front() {
                        let idle = self.cfg.timeouts().idle;
                        if oldest.at.elapsed() > idle {
                            return Err(anyhow!(
                                "archived has not confirmed WAL up to {} for {} s; reconnecting",
                                oldest.end, idle.as_secs()
                            ).into());
                        }
                    }
                    // Unasked, also while not reading (the server's keepalives are not
                    // seen then). A tick a little early still answers: a status is cheap.
                    let silent = last_status.elapsed();
                    if silent > self.status_every * 2 {
                        tracing::warn!(
                            silent_ms = silent.as_millis() as u64,
                            "no status reached PostgreSQL for this long: the receiver was not scheduled (an overloaded machine?); \
                             past wal_sender_timeout the server ends the connection"
                        );
                    }
                    if silent >= self.status_every * 3 / 4 && timeline_end.is_none() {
                        stream.send_status(received, flushed.unwrap_or(Lsn(0)), false).await?;
                        last_status = Instant::now();
                    }
                    // The status file follows below, at most once a second.
                }
                _ = shutdown.wait_for(|s| *s), if !stopping => {
                    tracing::info!("stopping: sending what was received to the archive first");
                    stopping = true;
                }
            }
            if self
                .last_status_write
                .is_none_or(|t| t.elapsed() >= Duration::from_secs(1))
            {
                self.update_positions(received, flushed, server_end);
                self.write_status();
            }
        }
    }

    fn update_positions(&mut self, received: Lsn, flushed: Option<Lsn>, server_end: Option<Lsn>) {
        self.status.received = Some(received.to_string());
        self.status.flushed = flushed.map(|f| f.to_string());
        self.status.server_wal_end = server_end.map(|e| e.to_string());
        self.status.lag_bytes = match (server_end, flushed) {
            (Some(e), Some(f)) => Some(e.0.saturating_sub(f.0)),
            _ => None,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use walvault_protocol::core::wire::{StreamedSegment, TimelineListing};
    use walvault_protocol::net::pg::stream::validate_slot_name;

    #[test]
    fn segment_sizes_as_show_prints_them() {
        assert_eq!(parse_segment_size("16MB").unwrap(), 16 << 20);
        assert_eq!(parse_segment_size("1GB").unwrap(), 1 << 30);
        assert_eq!(parse_segment_size("1MB").unwrap(), 1 << 20);
        for bad in ["", "16", "3MB", "16 TB", "MB", "99999999999GB"] {
            assert!(parse_segment_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn sender_timeouts_as_show_prints_them() {
        let ms = |n| Some(Duration::from_millis(n));
        assert_eq!(parse_sender_timeout("60s").unwrap(), ms(60_000));
        assert_eq!(parse_sender_timeout("1min").unwrap(), ms(60_000));
        assert_eq!(parse_sender_timeout("500ms").unwrap(), ms(500));
        assert_eq!(parse_sender_timeout("2h").unwrap(), ms(7_200_000));
        assert_eq!(parse_sender_timeout("0").unwrap(), None);
        for bad in ["", "s", "10 parsecs", "-1s"] {
            assert!(parse_sender_timeout(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn statuses_go_out_four_times_per_sender_timeout_within_bounds() {
        let s = Duration::from_secs;
        assert_eq!(status_interval(Some(s(2))), Duration::from_millis(500));
        assert_eq!(status_interval(Some(s(60))), s(10));
        assert_eq!(status_interval(None), s(10));
        assert_eq!(
            status_interval(Some(Duration::from_millis(100))),
            Duration::from_millis(100)
        );
    }

    #[test]
    fn slot_names_follow_postgresql() {
        assert!(validate_slot_name("walvault").is_ok());
        assert!(validate_slot_name("wal_vault_2").is_ok());
        for bad in ["", "Walvault", "a-b", "a b", "x'; DROP", &"a".repeat(64)] {
            assert!(validate_slot_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_listing_becomes_held_segment_ranges_without_its_gaps() {
        let seg = |n: u32| format!("00000001000000000000{n:04X}");
        let listing = WalListing {
            timelines: vec![TimelineListing {
                timeline: TimelineId(1),
                segments: 6,
                first: Some(seg(2)),
                last: Some(seg(12)),
                gaps: vec![(seg(4), seg(5)), (seg(9), seg(10))],
                partials: vec![],
                raw_bytes: 0,
                stored_bytes: 0,
            }],
            streamed: vec![StreamedSegment {
                name: seg(13),
                bytes: 4096,
            }],
            ..Default::default()
        };
        let held = held_wal(&listing, 16 << 20);
        assert_eq!(held.len(), 1);
        assert_eq!(held[0].complete, vec![(2, 3), (6, 8), (11, 12)]);
        assert_eq!(held[0].streamed, vec![13]);
    }
}
