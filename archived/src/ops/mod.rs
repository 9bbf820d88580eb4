//! What operators watch: metrics (metrics.rs), the HTTP endpoint that serves them and
//! the health probes (http.rs), the named checks of `archived check` (check.rs), and the
//! audit trail's records and their way into the store (audit.rs).

pub(crate) mod audit;
pub(crate) mod check;
pub(crate) mod disk;
pub(crate) mod http;
pub(crate) mod metrics;
pub(crate) mod status;
pub(crate) mod systemd;
