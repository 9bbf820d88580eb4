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
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};

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
    if listen == "off" {
        return Ok(None);
    }
    let listener = tokio::net::TcpListener::bind(listen).await.with_context(|| {
        format!(
            "cannot listen for HTTP on metrics_listen = \"{listen}\" (archived.toml): set another address, or \"off\""
        )
    })?;
    Ok(Some(listener))
}

/// Serves the endpoint on `listener` until the process ends.
pub(crate) async fn serve<S>(listener: tokio::net::TcpListener, ops: Arc<Ops>, state: Arc<S>)
where
    S: AsRef<Archive> + Send + Sync + 'static,
{
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "metrics endpoint: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let ops = ops.clone();
        let state = state.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let ops = ops.clone();
                let state = state.clone();
                async move {
                    Ok::<_, std::convert::Infallible>(
                        answer(&ops, state.as_ref().as_ref(), req).await,
                    )
                }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, service)
                .await
            {
                tracing::debug!(error = %e, "metrics endpoint: connection ended");
            }
        });
    }
}

fn text(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

const PLAIN: &str = "text/plain; charset=utf-8";

async fn answer(
    ops: &Ops,
    archive: &Archive,
    req: Request<hyper::body::Incoming>,
) -> Response<Full<Bytes>> {
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
            let openmetrics = req
                .headers()
                .get(ACCEPT)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.contains("application/openmetrics-text"));
            if openmetrics {
                text(
                    StatusCode::OK,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    ops.metrics.openmetrics(),
                )
            } else {
                text(
                    StatusCode::OK,
                    "text/plain; version=0.0.4; charset=utf-8",
                    ops.metrics.prometheus_text(),
                )
            }
        }
        _ => text(StatusCode::NOT_FOUND, PLAIN, "not found\n".into()),
    }
}
