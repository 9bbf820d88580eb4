//! Plain SQL to PostgreSQL over `tokio-postgres` (as DESIGN says): the one SQL client of
//! walvault. The hand-rolled [`PgConnection`](super::PgConnection) speaks only the
//! replication protocol.
//!
//! [`SqlClient::connect`] takes the parameters [`conninfo::resolve`](super::conninfo::resolve)
//! resolved, so both kinds of connection reach the same server the same way: the
//! endpoints in order (the first that answers wins; a server's refusal or an
//! authentication failure ends the attempt), Unix socket directories, the password given
//! or the password file's (looked up per endpoint, with the connection's database as
//! libpq does), `application_name`, TCP keepalives and `connect_timeout` (which bounds
//! the whole connection start, authentication included). Plain text only (`NoTls`): TLS
//! to PostgreSQL is refused by conninfo resolution.
//!
//! Every query has a deadline ([`QUERY_TIMEOUT`] by default), so a wedged server fails a
//! command instead of hanging it. Errors are [`PgError`]s: a server error carries its
//! SQLSTATE, message, DETAIL and HINT. NOTICE and WARNING messages are logged through
//! `tracing` as the replication connection logs them.

use std::time::Duration;

use futures::StreamExt;
use tokio_postgres::types::{FromSqlOwned, ToSql};
use tokio_postgres::{AsyncMessage, NoTls, Row};

use super::{log_notice, no_password, password_for, ConnParams, Endpoint, PgError, ServerError};

/// How long a query may take before it is given up (the server is taken as wedged).
/// walvault's queries are short: reading settings and clocks, `pg_switch_wal()`.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(60);

/// An open SQL session.
pub struct SqlClient {
    client: tokio_postgres::Client,
    endpoint: Endpoint,
    query_timeout: Duration,
}

impl SqlClient {
    /// Connects to the database `params.dbname` on the first endpoint of `params` that
    /// answers, and authenticates.
    pub async fn connect(params: &ConnParams) -> Result<SqlClient, PgError> {
        super::connect_first(params, |endpoint| Self::connect_one(params, endpoint)).await
    }

    async fn connect_one(params: &ConnParams, endpoint: &Endpoint) -> Result<SqlClient, PgError> {
        let mut config = tokio_postgres::Config::new();
        config
            .user(&params.user)
            .dbname(&params.dbname)
            .application_name(&params.application_name);
        match endpoint {
            Endpoint::Unix { dir, port } => config.host_path(dir).port(*port),
            Endpoint::Tcp { host, port } => config.host(host).port(*port),
        };
        match &params.keepalives {
            Some(k) => config
                .keepalives(true)
                .keepalives_idle(k.idle)
                .keepalives_interval(k.interval)
                .keepalives_retries(k.count),
            None => config.keepalives(false),
        };
        let password = password_for(params, endpoint, &params.dbname);
        if let Some(p) = &password {
            config.password(p);
        }
        let (client, mut connection) = config.connect(NoTls).await.map_err(|e| {
            if password.is_none() && e.as_db_error().is_none() && is_password_missing(&e) {
                no_password(params, endpoint)
            } else {
                pg_error(e, &format!("connecting to PostgreSQL at {endpoint}"))
            }
        })?;
        let logged = endpoint.clone();
        let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx)).boxed();
        tokio::spawn(async move {
            // Runs the connection until the client is dropped or the connection breaks
            // (the next query then fails and says why).
            while let Some(Ok(message)) = messages.next().await {
                if let AsyncMessage::Notice(n) = message {
                    log_notice(&logged, &server_error(&n));
                }
            }
        });
        Ok(SqlClient {
            client,
            endpoint: endpoint.clone(),
            query_timeout: QUERY_TIMEOUT,
        })
    }

    /// Where it is connected.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// Whether the connection is gone (queries would fail).
    pub fn is_closed(&self) -> bool {
        self.client.is_closed()
    }

    /// Runs a statement (extended protocol, typed parameters) and returns its rows.
    pub async fn query(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, PgError> {
        match tokio::time::timeout(self.query_timeout, self.client.query(sql, params)).await {
            Ok(rows) => rows.map_err(|e| pg_error(e, &format!("running {sql:?}"))),
            Err(_) => Err(PgError::Io {
                context: format!("running {sql:?} on PostgreSQL at {}", self.endpoint),
                source: std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no answer within {} s", self.query_timeout.as_secs()),
                ),
            }),
        }
    }

    /// Runs a statement that returns exactly one row.
    pub async fn query_one(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Row, PgError> {
        let mut rows = self.query(sql, params).await?;
        match rows.len() {
            1 => Ok(rows.remove(0)),
            n => Err(PgError::Protocol(format!(
                "{sql:?} returned {n} rows, not one"
            ))),
        }
    }

    /// The first column of a statement that returns exactly one row, typed.
    pub async fn query_value<T: FromSqlOwned>(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<T, PgError> {
        column(&self.query_one(sql, params).await?, 0, sql)
    }

    /// A setting as the server reports it (`SHOW name`; `name` must be a setting name).
    pub async fn show(&self, name: &str) -> Result<String, PgError> {
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.')
        {
            return Err(PgError::Protocol(format!("{name:?} is not a setting name")));
        }
        self.query_value(&format!("SHOW {name}"), &[]).await
    }
}

/// Column `index` of `row`, typed; a type mismatch is a protocol error naming the query.
pub fn column<T: FromSqlOwned>(row: &Row, index: usize, sql: &str) -> Result<T, PgError> {
    row.try_get(index)
        .map_err(|e| PgError::Protocol(format!("{sql:?}, column {index}: {e}")))
}

/// tokio-postgres reports a password the server asks for and the configuration lacks as
/// a configuration error; it has no typed accessor for that kind.
fn is_password_missing(e: &tokio_postgres::Error) -> bool {
    e.to_string().contains("password missing")
}

fn server_error(e: &tokio_postgres::error::DbError) -> ServerError {
    ServerError {
        severity: e
            .parsed_severity()
            .map(|s| s.to_string())
            .unwrap_or_else(|| e.severity().to_string()),
        code: e.code().code().to_string(),
        message: e.message().to_string(),
        detail: e.detail().map(String::from),
        hint: e.hint().map(String::from),
    }
}

fn pg_error(e: tokio_postgres::Error, context: &str) -> PgError {
    match e.as_db_error() {
        Some(db) => PgError::Server(server_error(db)),
        None => PgError::Io {
            context: context.to_string(),
            source: std::io::Error::other(e),
        },
    }
}
