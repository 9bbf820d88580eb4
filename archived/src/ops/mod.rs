//! What operators watch: metrics (metrics.rs), the HTTP endpoint that serves them and
//! the health probes (http.rs), the named checks of `archived check` (check.rs), and
//! per-cluster figures refreshed in the background for the metrics (summary.rs). The
//! audit trail is service/audit.rs: the handlers record its steps, and ops/ depends on
//! service/, never the other way.

pub(crate) mod check;
pub(crate) mod disk;
pub(crate) mod http;
pub(crate) mod metrics;
pub(crate) mod status;
pub(crate) mod summary;
pub(crate) mod systemd;
