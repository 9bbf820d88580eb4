//! The prefetch daemon's counters for Prometheus (`[prefetch] metrics_listen`, off by
//! default), through protocol's net::http like archived's endpoint.
//!
//! Contract: `GET /metrics` answers the counters `pullclient prefetch-status` prints, as
//! they are at the scrape (the same snapshot), prefixed `walvault_prefetch_`: counters
//! end in `_total`, the spool and PostgreSQL's state are gauges, and the prefaulter's
//! skipped blocks carry one bounded label, `reason`. `GET /healthz`: 200 while the daemon
//! runs. One daemon serves one data directory, so no label names it (Prometheus'
//! `instance` does). The bound address is written to `<spool>/metrics-address` (with
//! port 0 the kernel picks one). A taken address is logged and the daemon runs on
//! without the endpoint: prefetching matters more than its metrics.

use std::path::Path;
use std::sync::Arc;

use hyper::{Method, StatusCode};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use walvault_protocol::net::http::{self, text, PLAIN};

use super::daemon::{Counters, Daemon};

/// Where the bound address goes, in the spool directory.
pub(crate) const ADDRESS_FILE: &str = "metrics-address";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: String,
}

/// The OpenMetrics text of `c` (module header).
pub(crate) fn encode(c: &Counters) -> String {
    let mut r = Registry::default();
    let p = &c.prefault;
    let counters: [(&str, &str, u64); 13] = [
        (
            "walvault_prefetch_requests",
            "archive-get requests the daemon was told of",
            c.requests,
        ),
        (
            "walvault_prefetch_spool_hits",
            "Requests served from the spool",
            c.spool_hits,
        ),
        (
            "walvault_prefetch_spool_misses",
            "Requests archive-get fetched itself (not in the spool yet)",
            c.spool_misses,
        ),
        (
            "walvault_prefetch_segments_fetched",
            "Segments downloaded into the spool",
            c.segments_fetched,
        ),
        (
            "walvault_prefetch_fetched_bytes",
            "Raw WAL bytes downloaded into the spool",
            c.bytes_fetched,
        ),
        (
            "walvault_prefetch_fetch_errors",
            "Downloads that failed",
            c.fetch_errors,
        ),
        (
            "walvault_prefetch_archive_end_reached",
            "Times the next segment was not in the archive yet",
            c.archive_end_reached,
        ),
        (
            "walvault_prefetch_segments_decoded",
            "Spooled segments the prefaulter decoded",
            p.segments_decoded,
        ),
        (
            "walvault_prefetch_decode_errors",
            "Segments the prefaulter could not decode",
            p.decode_errors,
        ),
        (
            "walvault_prefetch_blocks_warmed",
            "Relation blocks warmed ahead of replay",
            p.blocks_warmed,
        ),
        (
            "walvault_prefetch_warmed_for_pg_prefetch",
            "Blocks warmed that PostgreSQL's own recovery_prefetch would read too",
            p.warmed_for_pg_prefetch,
        ),
        (
            "walvault_prefetch_io_requests",
            "Read requests (fadvise or pread) the prefaulter issued",
            p.io_requests,
        ),
        (
            "walvault_prefetch_postgres_starts",
            "Times PostgreSQL was seen starting",
            p.postgres_starts,
        ),
    ];
    for (name, help, value) in counters {
        let counter = Counter::<u64>::default();
        counter.inc_by(value);
        r.register(name, help, counter);
    }
    let gauge = |v: u64| {
        let g = Gauge::<i64>::default();
        g.set(i64::try_from(v).unwrap_or(i64::MAX));
        g
    };
    r.register(
        "walvault_prefetch_spooled_segments",
        "Segments in the spool now",
        gauge(c.spooled_segments),
    );
    r.register(
        "walvault_prefetch_ahead_bytes",
        "WAL bytes in the spool ahead of the segment PostgreSQL asked for last",
        gauge(c.bytes_ahead),
    );
    r.register(
        "walvault_prefetch_open_files",
        "Relation files the prefaulter holds open",
        gauge(p.open_files),
    );
    r.register(
        "walvault_prefetch_postgres_running",
        "1 while PostgreSQL runs on the data directory",
        gauge(u64::from(c.postgres_running)),
    );
    let skipped = Family::<ReasonLabels, Counter<u64>>::default();
    for (reason, n) in [
        ("fpw", p.skipped_fpw),
        ("will_init", p.skipped_will_init),
        ("past_eof", p.skipped_past_eof),
        ("recent", p.skipped_recent),
        ("no_file", p.skipped_no_file),
    ] {
        skipped
            .get_or_create(&ReasonLabels {
                reason: reason.into(),
            })
            .inc_by(n);
    }
    r.register(
        "walvault_prefetch_skipped_blocks",
        "Block references the prefaulter did not warm, by reason (fpw: a full-page image replaces it; will_init; past_eof; recent: warmed shortly before; no_file)",
        skipped,
    );
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &r).expect("writing to a String");
    out
}

/// Serves the endpoint when `listen` is not "off" (module header).
pub(crate) async fn start(daemon: Arc<Daemon>, listen: &str, spool_dir: &Path) {
    let listener = match http::bind(listen, "[prefetch] metrics_listen (pullclient.toml)").await {
        Ok(Some(l)) => l,
        Ok(None) => return,
        Err(e) => {
            tracing::warn!(error = %format!("{e:#}"), "prefetch metrics endpoint not started; prefetching goes on");
            return;
        }
    };
    let Ok(bound) = listener.local_addr() else {
        return;
    };
    let file = spool_dir.join(ADDRESS_FILE);
    if let Err(e) =
        walvault_protocol::net::fsutil::write_replacing(&file, format!("{bound}\n").as_bytes())
    {
        tracing::warn!(file = %file.display(), error = %e, "cannot write the metrics address");
    }
    tracing::info!(metrics_listen = %bound, "serving the prefetch daemon's /metrics and /healthz over HTTP");
    let handler = move |req: hyper::Request<hyper::body::Incoming>| {
        let daemon = daemon.clone();
        async move {
            if req.method() != Method::GET {
                return text(StatusCode::METHOD_NOT_ALLOWED, PLAIN, "GET only\n".into());
            }
            match req.uri().path() {
                "/healthz" => text(StatusCode::OK, PLAIN, "ok\n".into()),
                "/metrics" => http::metrics_answer(&req, encode(&daemon.counters())),
                _ => text(StatusCode::NOT_FOUND, PLAIN, "not found\n".into()),
            }
        }
    };
    tokio::spawn(http::serve(listener, Arc::new(handler)));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_counter_is_a_family_of_its_own_and_skips_carry_their_reason() {
        let mut c = Counters {
            requests: 7,
            spool_hits: 6,
            spool_misses: 1,
            postgres_running: true,
            ..Counters::default()
        };
        c.prefault.skipped_fpw = 3;
        let text = http::to_prometheus_text(&encode(&c));
        assert!(text.contains("# TYPE walvault_prefetch_requests_total counter\nwalvault_prefetch_requests_total 7\n"), "{text}");
        assert!(
            text.contains("walvault_prefetch_spool_hits_total 6\n"),
            "{text}"
        );
        assert!(
            text.contains("walvault_prefetch_postgres_running 1\n"),
            "{text}"
        );
        assert!(
            text.contains("walvault_prefetch_skipped_blocks_total{reason=\"fpw\"} 3\n"),
            "{text}"
        );
        assert!(!text.contains("# EOF"), "{text}");
    }
}
