//! The plain HTTP endpoints of walvault's daemons (archived's `metrics_listen`, the
//! prefetch daemon's `[prefetch] metrics_listen`): binding, the accept loop and the
//! Prometheus exposition, shared so that both behave the same.
//!
//! Contract: HTTP/1.1 over plain TCP (bind it to loopback or a management network, or
//! put a TLS proxy in front); every connection is served by its own task, and a failed
//! accept is logged and retried, never the end of the endpoint. `/metrics` answers the
//! Prometheus text format (0.0.4), made from `prometheus-client`'s OpenMetrics text (a
//! counter family's HELP and TYPE lines carry the `_total` name, `# EOF` and `# UNIT`
//! lines go), or the OpenMetrics text unchanged when the scraper's `Accept` asks for it.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, ACCEPT, CONTENT_TYPE};
use hyper::{Request, Response, StatusCode};

/// An answer.
pub type Answer = Response<Full<Bytes>>;

/// Plain text.
pub const PLAIN: &str = "text/plain; charset=utf-8";

/// Binds `listen` (an `IP:port`), or nothing for "off"; `setting` names where the
/// address comes from, for the error.
pub async fn bind(listen: &str, setting: &str) -> Result<Option<tokio::net::TcpListener>> {
    if listen == "off" {
        return Ok(None);
    }
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| {
            format!(
            "cannot listen for HTTP on {setting} = \"{listen}\": set another address, or \"off\""
        )
        })?;
    Ok(Some(listener))
}

/// Serves `handler` on `listener` until the process ends.
pub async fn serve<H, F>(listener: tokio::net::TcpListener, handler: Arc<H>)
where
    H: Fn(Request<hyper::body::Incoming>) -> F + Send + Sync + 'static,
    F: Future<Output = Answer> + Send + 'static,
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
        let handler = handler.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let answer = handler(req);
                async move { Ok::<_, std::convert::Infallible>(answer.await) }
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

/// An answer of `status` with `body` as `content_type`.
pub fn text(status: StatusCode, content_type: &'static str, body: String) -> Answer {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

/// The `/metrics` answer for `req`, from the OpenMetrics text of a registry: the
/// Prometheus text format unless the scraper asks for OpenMetrics (module header).
pub fn metrics_answer<B>(req: &Request<B>, openmetrics: String) -> Answer {
    let wants_openmetrics = req
        .headers()
        .get(ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("application/openmetrics-text"));
    if wants_openmetrics {
        text(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            openmetrics,
        )
    } else {
        text(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            to_prometheus_text(&openmetrics),
        )
    }
}

/// OpenMetrics text to the Prometheus text format: a counter family's HELP and TYPE
/// lines name its `_total` samples, `# UNIT` and `# EOF` lines go.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|p| {
            let rest = line.strip_prefix(p)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{p}{name}_total {tail}"))
        });
        match renamed {
            Some(l) => out.push_str(&l),
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}
