//! archived's metrics, read by `/metrics` (ops/http.rs).
//!
//! Contract:
//!
//! - **Families** are prefixed `walvault_`, in base units (seconds, bytes), counters end
//!   in `_total`. Labels are bounded: `cluster`, `operation` (the request's op, a fixed
//!   set), `result` (stored, duplicate, conflict, refused, error, ok), `certificate`
//!   (CA, server) and `volume` (data, store); never a file name, an LSN or a backup id.
//! - **Counted as they happen**: requests by operation and result, their duration, the
//!   request body bytes received and the answer bytes sent, the QUIC connections open.
//! - **Read at scrape time from the catalog**, never from a shell-out or a full scan: per
//!   cluster the newest archived segment (its end LSN, timeline and the store's time of
//!   it, looked up once per new segment), the number of backups and the newest one's end
//!   time and size, and where the streaming receiver's durable WAL ends (its unfinished
//!   segments on this archived); the newest retention and verify runs; the free space of the filesystems archived writes to
//!   (statvfs). A scrape costs a few catalog reads per cluster.
//! - **Exposition**: the Prometheus text format (0.0.4) that promtool and every scraper
//!   read, made from `prometheus-client`'s OpenMetrics text (its counters' HELP and TYPE
//!   lines carry the `_total` name, `# EOF` and `# UNIT` lines go); a client that asks
//!   for OpenMetrics (`Accept: application/openmetrics-text`) gets it unchanged.

use std::collections::HashMap;
use std::sync::Mutex;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use walvault_protocol::core::pg::wal::{Lsn, SegmentName};
use walvault_protocol::core::wire::{ErrorCode, Response};

use crate::service::{Archive, Refusal};
use crate::store::layout;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    operation: String,
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OperationLabels {
    operation: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClusterLabels {
    cluster: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CertificateLabels {
    certificate: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClientCertLabels {
    cluster: String,
    role: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VolumeLabels {
    volume: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabels {
    version: String,
}

/// The newest segment of a cluster and the store's time of it (cached per segment).
#[derive(Clone)]
struct Newest {
    segment: SegmentName,
    unix: Option<i64>,
}

/// archived's metrics (module header).
pub(crate) struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    duration: Family<OperationLabels, Histogram>,
    bytes_in: Family<OperationLabels, Counter>,
    bytes_out: Family<OperationLabels, Counter>,
    connections: Gauge,
    last_segment_lsn: Family<ClusterLabels, Gauge>,
    last_segment_timeline: Family<ClusterLabels, Gauge>,
    last_archived: Family<ClusterLabels, Gauge>,
    backups: Family<ClusterLabels, Gauge>,
    last_backup_end: Family<ClusterLabels, Gauge>,
    last_backup_bytes: Family<ClusterLabels, Gauge>,
    last_backup_duration: Family<ClusterLabels, Gauge>,
    last_backup_stored: Family<ClusterLabels, Gauge>,
    retention_removed: [Family<ClusterLabels, Gauge>; 4],
    summary_gauges: [Family<ClusterLabels, Gauge>; 5],
    archive_lag: Family<ClusterLabels, Gauge>,
    stream_server_end: Family<ClusterLabels, Gauge>,
    stream_lag: Family<ClusterLabels, Gauge>,
    /// What the background refresher computed (ops/summary.rs).
    pub(crate) summaries: super::summary::Summaries,
    stream_flushed: Family<ClusterLabels, Gauge>,
    ready_files: Family<ClusterLabels, Gauge>,
    retention_success: Family<ClusterLabels, Gauge>,
    verify_run: Family<ClusterLabels, Gauge>,
    verify_problems: Family<ClusterLabels, Gauge>,
    cert_expiry: Family<CertificateLabels, Gauge>,
    client_cert_expiry: Family<ClientCertLabels, Gauge>,
    fs_free: Family<VolumeLabels, Gauge>,
    fs_size: Family<VolumeLabels, Gauge>,
    clusters: Gauge,
    newest: Mutex<HashMap<String, Newest>>,
}

/// Registers `metric` as `name` and hands it back (its clones share the values).
fn register<M>(registry: &mut Registry, name: &str, help: &str, metric: M) -> M
where
    M: prometheus_client::registry::Metric + Clone,
{
    registry.register(name, help, metric.clone());
    metric
}

/// Request durations: 0.5 ms to about 2 minutes, each bucket 4 times the last.
fn duration_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 4.0, 10))
}

/// The result label of a one-frame answer.
pub(crate) fn result_of(reply: &Result<Response, Refusal>) -> &'static str {
    match reply {
        Ok(Response::Stored {
            already_present: true,
        }) => "duplicate",
        Ok(Response::Stored { .. }) => "stored",
        Ok(_) => "ok",
        Err(r) => refusal_result(r.code),
    }
}

/// The result label of a refusal.
pub(crate) fn refusal_result(code: ErrorCode) -> &'static str {
    match code {
        ErrorCode::Conflict => "conflict",
        ErrorCode::Internal => "error",
        _ => "refused",
    }
}

impl Metrics {
    pub(crate) fn new() -> Metrics {
        let mut r = Registry::default();
        let requests = register(
            &mut r,
            "walvault_requests",
            "Requests answered, by operation and result (stored, duplicate, conflict, refused, error, ok)",
            Family::<RequestLabels, Counter>::default(),
        );
        let duration = register(
            &mut r,
            "walvault_request_duration_seconds",
            "Time from a request's header to its answer, by operation",
            Family::<OperationLabels, Histogram>::new_with_constructor(
                duration_histogram as fn() -> Histogram,
            ),
        );
        let by_op = Family::<OperationLabels, Counter>::default;
        let bytes_in = register(
            &mut r,
            "walvault_request_body_bytes",
            "Request body bytes received, by operation",
            by_op(),
        );
        let bytes_out = register(
            &mut r,
            "walvault_answer_body_bytes",
            "Answer body bytes sent (WAL, chunks), by operation",
            by_op(),
        );
        let connections = register(
            &mut r,
            "walvault_quic_connections",
            "QUIC connections of clients open now",
            Gauge::default(),
        );
        let per_cluster = Family::<ClusterLabels, Gauge>::default;
        let gauges = [
            (
                "walvault_wal_last_segment_end_lsn",
                "End LSN (as a number of bytes) of the newest complete WAL segment in the archive, on its newest timeline",
            ),
            (
                "walvault_wal_last_segment_timeline",
                "Timeline of the newest complete WAL segment in the archive",
            ),
            (
                "walvault_wal_last_archived_timestamp_seconds",
                "When the newest complete WAL segment was stored (unix time, the store's)",
            ),
            ("walvault_backups", "Base backups in the catalog (usable or not)"),
            (
                "walvault_backup_last_end_timestamp_seconds",
                "When the newest base backup ended (unix time, the backed-up server's clock)",
            ),
            (
                "walvault_backup_last_size_bytes",
                "Bytes of all files of the newest base backup",
            ),
            (
                "walvault_stream_flushed_lsn",
                "End LSN (as a number of bytes) of the WAL the streaming receiver (pushclient stream) made durable on this archived and that is not yet a complete segment; compare with pg_current_wal_lsn() - '0/0' on the primary",
            ),
            (
                "walvault_retention_last_success_timestamp_seconds",
                "When the newest successful retention run of the cluster ended (unix time; none recorded: no series)",
            ),
            (
                "walvault_verify_last_run_timestamp_seconds",
                "When the newest recorded archived verify run of the cluster ended (unix time; none recorded: no series)",
            ),
            (
                "walvault_verify_problems",
                "Problems the newest recorded archived verify run of the cluster found (damaged or missing objects)",
            ),
            (
                "walvault_backup_last_duration_seconds",
                "How long the newest base backup took, from its start to its stop (the backed-up server's clock)",
            ),
            (
                "walvault_backup_last_stored_bytes",
                "Bytes the newest base backup added to the store (chunks no earlier backup held, and its manifest)",
            ),
            (
                "walvault_retention_last_expired_backups",
                "Base backups the newest successful retention run of the cluster expired",
            ),
            (
                "walvault_retention_last_expired_wal_files",
                "WAL files the newest successful retention run of the cluster expired",
            ),
            (
                "walvault_retention_last_expired_wal_bytes",
                "Stored bytes of the WAL files the newest successful retention run of the cluster expired",
            ),
            (
                "walvault_retention_last_collected_chunk_bytes",
                "Stored bytes of the backup chunks the newest successful retention run of the cluster collected",
            ),
            (
                "walvault_wal_gap_segments",
                "WAL segments missing in the catalog between the oldest backup's first segment and the newest segment: a point-in-time recovery stops at the first (refreshed every minute)",
            ),
            (
                "walvault_store_bytes",
                "Bytes the cluster's WAL and base backups take in the store (refreshed every minute)",
            ),
            (
                "walvault_recovery_window_start_timestamp_seconds",
                "The recovery window's start: the end of the oldest usable base backup (unix time; refreshed every minute; none usable: no series)",
            ),
            (
                "walvault_recovery_window_end_timestamp_seconds",
                "The recovery window's end: when the last WAL segment without a gap after the newest usable base backup was stored (unix time; refreshed every minute)",
            ),
            (
                "walvault_catalog_scan_timestamp_seconds",
                "When the gap, store and window figures of the cluster were computed (unix time)",
            ),
            (
                "walvault_archive_lag_bytes",
                "WAL the primary has completed and not yet archived, as its newest push reported: (.ready files - 1) x the segment size (0 = archive_command keeps up)",
            ),
            (
                "walvault_stream_server_wal_end_lsn",
                "Where the streamed primary's WAL ended (as a number of bytes), as the streaming receiver's newest append reported it",
            ),
            (
                "walvault_stream_lag_bytes",
                "The streaming receiver's lag: the primary's WAL end its newest append reported minus the end of the WAL this archived holds durably (the unfinished segment's, else the newest complete segment's)",
            ),
            (
                "walvault_archive_ready_files",
                "The primary's archiving backlog as its newest push reported it: .ready files in pg_wal/archive_status (the pushed one included; 1 = keeping up)",
            ),
        ]
        .map(|(name, help)| register(&mut r, name, help, per_cluster()));
        let [last_segment_lsn, last_segment_timeline, last_archived, backups, last_backup_end, last_backup_bytes, stream_flushed, retention_success, verify_run, verify_problems, last_backup_duration, last_backup_stored, expired_backups, expired_wal_files, expired_wal_bytes, collected_chunk_bytes, gap_segments, store_bytes, window_start, window_end, summary_at, archive_lag, stream_server_end, stream_lag, ready_files] =
            gauges;
        let summary_gauges = [
            gap_segments,
            store_bytes,
            window_start,
            window_end,
            summary_at,
        ];
        let retention_removed = [
            expired_backups,
            expired_wal_files,
            expired_wal_bytes,
            collected_chunk_bytes,
        ];
        let clusters = register(
            &mut r,
            "walvault_clusters",
            "Clusters bound in the catalog",
            Gauge::default(),
        );
        let cert_expiry = register(
            &mut r,
            "walvault_certificate_expiry_timestamp_seconds",
            "When the server's certificates stop being valid (unix time), by certificate (CA, server)",
            Family::<CertificateLabels, Gauge>::default(),
        );
        let client_cert_expiry = register(
            &mut r,
            "walvault_client_certificate_expiry_timestamp_seconds",
            "When the first of the client certificates archived issue made for a cluster and role stops being valid (unix time; from DIR/tls/issued/, refreshed with the catalog scan)",
            Family::<ClientCertLabels, Gauge>::default(),
        );
        let fs_free = register(
            &mut r,
            "walvault_filesystem_free_bytes",
            "Bytes archived may still write on the filesystem of its data directory (volume=\"data\") and of a local store (volume=\"store\", absent when on the same filesystem or when the store is an object store)",
            Family::<VolumeLabels, Gauge>::default(),
        );
        let fs_size = register(
            &mut r,
            "walvault_filesystem_size_bytes",
            "Size of those filesystems, by volume",
            Family::<VolumeLabels, Gauge>::default(),
        );
        let build = register(
            &mut r,
            "walvault_build_info",
            "Always 1; the label says archived's version",
            Family::<VersionLabels, Gauge>::default(),
        );
        build
            .get_or_create(&VersionLabels {
                version: walvault_protocol::VERSION.to_string(),
            })
            .set(1);
        Metrics {
            registry: r,
            requests,
            duration,
            bytes_in,
            bytes_out,
            connections,
            last_segment_lsn,
            last_segment_timeline,
            last_archived,
            backups,
            last_backup_end,
            last_backup_bytes,
            last_backup_duration,
            last_backup_stored,
            retention_removed,
            summary_gauges,
            archive_lag,
            stream_server_end,
            stream_lag,
            summaries: Default::default(),
            stream_flushed,
            ready_files,
            retention_success,
            verify_run,
            verify_problems,
            cert_expiry,
            client_cert_expiry,
            fs_free,
            fs_size,
            clusters,
            newest: Mutex::new(HashMap::new()),
        }
    }

    /// A stored push reported the primary's archiving backlog: `n` `.ready` files (only
    /// stored pushes report, so the cluster is a bound one: labels stay bounded).
    pub(crate) fn ready_files(&self, cluster: &str, n: u64) {
        self.ready_files
            .get_or_create(&ClusterLabels {
                cluster: cluster.to_string(),
            })
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// The server's certificates and their notAfter (read once at start-up).
    pub(crate) fn certificates(&self, certs: &[super::check::CertExpiry]) {
        for c in certs {
            self.cert_expiry
                .get_or_create(&CertificateLabels {
                    certificate: c.what.clone(),
                })
                .set(c.not_after);
        }
    }

    /// The backlog the newest stored push of `cluster` reported, if any since start.
    pub(crate) fn reported_ready_files(&self, cluster: &str) -> Option<u64> {
        let labels = ClusterLabels {
            cluster: cluster.to_string(),
        };
        self.ready_files
            .get(&labels)
            .and_then(|g| u64::try_from(g.get()).ok())
    }

    /// One request answered: its operation, result, seconds and body bytes received.
    pub(crate) fn request(&self, operation: &str, result: &str, seconds: f64, body_in: u64) {
        self.requests
            .get_or_create(&RequestLabels {
                operation: operation.to_string(),
                result: result.to_string(),
            })
            .inc();
        let op = OperationLabels {
            operation: operation.to_string(),
        };
        self.duration.get_or_create(&op).observe(seconds);
        if body_in > 0 {
            self.bytes_in.get_or_create(&op).inc_by(body_in);
        }
    }

    /// Answer body bytes sent for `operation`.
    pub(crate) fn sent(&self, operation: &str, bytes: u64) {
        self.bytes_out
            .get_or_create(&OperationLabels {
                operation: operation.to_string(),
            })
            .inc_by(bytes);
    }

    /// A client connection opened (`+1`) or closed (`-1`).
    pub(crate) fn connection(&self, delta: i64) {
        self.connections.inc_by(delta);
    }

    /// Reads the per-cluster values from the catalog (module header).
    pub(crate) async fn refresh(&self, archive: &Archive) -> anyhow::Result<()> {
        let clusters = archive.index.clusters()?;
        self.clusters.set(clusters.len() as i64);
        for (v, space) in super::disk::volumes(&archive.volumes) {
            let labels = VolumeLabels {
                volume: v.name.to_string(),
            };
            match space {
                Ok(s) => {
                    self.fs_free
                        .get_or_create(&labels)
                        .set(i64::try_from(s.free).unwrap_or(i64::MAX));
                    self.fs_size
                        .get_or_create(&labels)
                        .set(i64::try_from(s.size).unwrap_or(i64::MAX));
                }
                Err(e) => {
                    tracing::warn!(volume = v.name, path = %v.path.display(), error = %e, "cannot read the free space");
                    self.fs_free.remove(&labels);
                    self.fs_size.remove(&labels);
                }
            }
        }
        // A receiver's segment completes into the catalog: the gauge goes with it.
        self.stream_flushed.clear();
        let flushed = archive.streams.flushed_ends().await;
        for (cluster, end) in &flushed {
            self.stream_flushed
                .get_or_create(&ClusterLabels {
                    cluster: cluster.clone(),
                })
                .set(i64::try_from(*end).unwrap_or(i64::MAX));
        }
        for (cluster, server_end) in archive.streams.server_ends() {
            let size = archive.index.segment_size(&cluster)?;
            let complete = archive
                .index
                .last_segment(&cluster)?
                .map_or(0, |s| s.start_lsn(size).0 + u64::from(size));
            let held = flushed.get(&cluster).copied().unwrap_or(0).max(complete);
            let labels = ClusterLabels { cluster };
            self.stream_server_end
                .get_or_create(&labels)
                .set(i64::try_from(server_end).unwrap_or(i64::MAX));
            self.stream_lag
                .get_or_create(&labels)
                .set(i64::try_from(server_end.saturating_sub(held)).unwrap_or(i64::MAX));
        }
        for g in &self.summary_gauges {
            g.clear();
        }
        self.client_cert_expiry.clear();
        let mut first: std::collections::HashMap<ClientCertLabels, i64> = Default::default();
        for c in self.summaries.client_certs() {
            let labels = ClientCertLabels {
                cluster: c.identity.cluster.clone(),
                role: c.identity.role.to_string(),
            };
            let at = first.entry(labels).or_insert(c.not_after);
            *at = (*at).min(c.not_after);
        }
        for (labels, at) in first {
            self.client_cert_expiry.get_or_create(&labels).set(at);
        }
        for (cluster, s) in self.summaries.all() {
            let labels = ClusterLabels { cluster };
            let as_i64 = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
            let values = [
                Some(as_i64(s.wal_gap_segments)),
                Some(as_i64(s.wal_bytes + s.backup_bytes)),
                s.window_start,
                s.window_end,
                Some(s.at),
            ];
            for (g, v) in self.summary_gauges.iter().zip(values) {
                if let Some(v) = v {
                    g.get_or_create(&labels).set(v);
                }
            }
        }
        for cluster in &clusters {
            let labels = ClusterLabels {
                cluster: cluster.clone(),
            };
            let size = archive.index.segment_size(cluster)?;
            if let Some(n) = self.reported_ready_files(cluster) {
                let lag = n.saturating_sub(1).saturating_mul(u64::from(size));
                self.archive_lag
                    .get_or_create(&labels)
                    .set(i64::try_from(lag).unwrap_or(i64::MAX));
            }
            if let Some(segment) = archive.index.last_segment(cluster)? {
                let end = Lsn(segment.start_lsn(size).0 + u64::from(size));
                self.last_segment_lsn
                    .get_or_create(&labels)
                    .set(end.0 as i64);
                self.last_segment_timeline
                    .get_or_create(&labels)
                    .set(i64::from(segment.timeline.0));
                let cached = self
                    .newest
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(cluster)
                    .filter(|n| n.segment == segment && n.unix.is_some())
                    .cloned();
                let unix = match cached {
                    Some(n) => n.unix,
                    None => {
                        let key = layout::wal_key(
                            cluster,
                            &walvault_protocol::core::pg::wal::WalFileName::Segment(segment),
                        );
                        let unix = archive.store.modified(&key).await?;
                        self.newest
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .insert(cluster.clone(), Newest { segment, unix });
                        unix
                    }
                };
                if let Some(unix) = unix {
                    self.last_archived.get_or_create(&labels).set(unix);
                }
            }
            if let Some(run) = archive.index.retention_run(cluster)? {
                if let Some(t) = run.last_success {
                    self.retention_success.get_or_create(&labels).set(t);
                    let r = &run.removed;
                    let values = [r.backups, r.wal_files, r.wal_bytes, r.chunk_bytes];
                    for (family, v) in self.retention_removed.iter().zip(values) {
                        family
                            .get_or_create(&labels)
                            .set(i64::try_from(v).unwrap_or(i64::MAX));
                    }
                }
            }
            if let Some(run) = archive.index.verify_run(cluster)? {
                self.verify_run.get_or_create(&labels).set(run.finished_at);
                self.verify_problems
                    .get_or_create(&labels)
                    .set(i64::try_from(run.problems).unwrap_or(i64::MAX));
            }
            let backups = archive.index.backups(cluster)?;
            self.backups
                .get_or_create(&labels)
                .set(backups.len() as i64);
            if let Some(newest) = backups.iter().max_by_key(|b| b.stop_time) {
                self.last_backup_end
                    .get_or_create(&labels)
                    .set(newest.stop_time);
                self.last_backup_bytes
                    .get_or_create(&labels)
                    .set(i64::try_from(newest.logical_bytes).unwrap_or(i64::MAX));
                self.last_backup_duration
                    .get_or_create(&labels)
                    .set((newest.stop_time - newest.start_time).max(0));
                self.last_backup_stored
                    .get_or_create(&labels)
                    .set(i64::try_from(newest.stored_bytes).unwrap_or(i64::MAX));
            }
        }
        Ok(())
    }

    /// The OpenMetrics text of every family.
    pub(crate) fn openmetrics(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)
            .expect("writing to a String");
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_named_by_their_samples_in_the_prometheus_text() {
        let m = Metrics::new();
        m.request("put_wal", "stored", 0.01, 100);
        m.request("put_wal", "conflict", 0.02, 50);
        m.sent("get_wal", 4096);
        m.connection(1);
        let text = walvault_protocol::net::http::to_prometheus_text(&m.openmetrics());
        assert!(
            text.contains("# TYPE walvault_requests_total counter\n"),
            "{text}"
        );
        assert!(text.contains("# HELP walvault_requests_total "), "{text}");
        assert!(
            text.contains("walvault_requests_total{operation=\"put_wal\",result=\"conflict\"} 1\n"),
            "{text}"
        );
        assert!(text.contains("walvault_request_body_bytes_total{operation=\"put_wal\"} 150\n"));
        assert!(text.contains("walvault_answer_body_bytes_total{operation=\"get_wal\"} 4096\n"));
        assert!(text.contains("# TYPE walvault_request_duration_seconds histogram\n"));
        assert!(text.contains("walvault_quic_connections 1\n"));
        assert!(!text.contains("# EOF"), "{text}");
        // OpenMetrics, for a scraper that asks for it, keeps its own naming.
        let om = m.openmetrics();
        assert!(om.contains("# TYPE walvault_requests counter\n") && om.ends_with("# EOF\n"));
    }

    #[test]
    fn results_name_what_became_of_a_request() {
        let stored = Ok(Response::Stored {
            already_present: false,
        });
        let again = Ok(Response::Stored {
            already_present: true,
        });
        assert_eq!(result_of(&stored), "stored");
        assert_eq!(result_of(&again), "duplicate");
        assert_eq!(result_of(&Ok(Response::Deleted)), "ok");
        assert_eq!(
            result_of(&Err(Refusal::new(ErrorCode::Conflict, "x"))),
            "conflict"
        );
        assert_eq!(
            result_of(&Err(Refusal::new(ErrorCode::NotFound, "x"))),
            "refused"
        );
        assert_eq!(
            result_of(&Err(Refusal::new(ErrorCode::Internal, "x"))),
            "error"
        );
    }
}
