//! What operators watch: metrics (metrics.rs) and the HTTP endpoint that serves them
//! and the health probes (http.rs).

pub(crate) mod http;
pub(crate) mod metrics;
