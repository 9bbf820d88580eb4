//! The HTTP endpoint of `archived serve` (`metrics_listen` in archived.toml, default
//! `127.0.0.1:7434`; "off" turns it off).
//!
//! Contract:
//!
//! - `GET /healthz`: 200 while the process serves requests.
//! - `GET /readyz`: 200 only when the catalog is complete (not being rebuilt) and the
//!   store took a probe object within the last [`PROBE_TTL`](crate::service::PROBE_TTL) (created create-only under
//!   `_readyz/`, then deleted); else 503 with the reason as text.
//! - `GET /metrics`: the families of metrics.rs, the per-cluster ones read from the
//!   catalog at this scrape; Prometheus text format, or OpenMetrics when the client's
//!   `Accept` asks for it. With `metrics_token`, only for `Authorization: Bearer <token>`
//!   (401 otherwise); the probes stay open.
//! - Anything else: 404. HTTP/1.1 only, plain TCP: bind it to loopback or a management
//!   network, or put a TLS proxy in front.

use std::sync::Arc;

use anyhow::Result;
use hyper::header::{HeaderValue, AUTHORIZATION};
use hyper::{Method, Request, StatusCode};
use walvault_protocol::net::http::{self, text, PLAIN};

use super::metrics::Metrics;
use crate::service::Archive;

/// The endpoint's state.
pub(crate) struct Ops {
    pub(crate) metrics: Arc<Metrics>,
    token: Option<String>,
}

impl Ops {
    pub(crate) fn new(metrics: Arc<Metrics>, token: Option<String>) -> Ops {
        Ops { metrics, token }
    }

    /// Why the archive is not ready, if it is not (module header).
    async fn ready(&self, archive: &Archive) -> Result<(), String> {
        match archive.index.is_complete() {
            Ok(true) => {}
            Ok(false) => return Err("the catalog is being rebuilt from the store".into()),
            Err(e) => return Err(format!("the catalog cannot be read: {e:#}")),
        }
        archive.probe_store().await
    }

    fn authorized(&self, req: &Request<hyper::body::Incoming>) -> bool {
        let Some(token) = &self.token else {
            return true;
        };
        let want = format!("Bearer {token}");
        let got = req
            .headers()
            .get(AUTHORIZATION)
            .map(HeaderValue::as_bytes)
            .unwrap_or_default();
        // Compared in constant time: the token is a secret.
        got.len() == want.len()
            && got
                .iter()
                .zip(want.as_bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    }
}

/// Binds `listen`; `None` for "off".
pub(crate) async fn bind(listen: &str) -> Result<Option<tokio::net::TcpListener>> {
    http::bind(listen, "metrics_listen (archived.toml)").await
}

/// Serves the endpoint on `listener` until the process ends.
pub(crate) async fn serve<S>(listener: tokio::net::TcpListener, ops: Arc<Ops>, state: Arc<S>)
where
    S: AsRef<Archive> + Send + Sync + 'static,
{
    let handler = move |req| {
        let ops = ops.clone();
        let state = state.clone();
        async move { answer(&ops, state.as_ref().as_ref(), req).await }
    };
    http::serve(listener, Arc::new(handler)).await
}

async fn answer(ops: &Ops, archive: &Archive, req: Request<hyper::body::Incoming>) -> http::Answer {
    if req.method() != Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, PLAIN, "GET only\n".into());
    }
    match req.uri().path() {
        "/healthz" => text(StatusCode::OK, PLAIN, "ok\n".into()),
        "/readyz" => match ops.ready(archive).await {
            Ok(()) => text(StatusCode::OK, PLAIN, "ready\n".into()),
            Err(why) => text(StatusCode::SERVICE_UNAVAILABLE, PLAIN, format!("{why}\n")),
        },
        "/metrics" => {
            if !ops.authorized(&req) {
                return text(
                    StatusCode::UNAUTHORIZED,
                    PLAIN,
                    "/metrics wants Authorization: Bearer <metrics_token>\n".into(),
                );
            }
            if let Err(e) = ops.metrics.refresh(archive).await {
                tracing::error!(error = %format!("{e:#}"), "metrics: reading the catalog failed");
                return text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    PLAIN,
                    format!("reading the catalog failed: {e:#}\n"),
                );
            }
            http::metrics_answer(&req, ops.metrics.openmetrics())
        }
        _ => text(StatusCode::NOT_FOUND, PLAIN, "not found\n".into()),
    }
}
