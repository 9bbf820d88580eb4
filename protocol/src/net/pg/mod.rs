//! PostgreSQL connections. Two kinds, one resolution of where and as whom ([`conninfo`],
//! libpq's rules):
//!
//! - [`PgConnection`], hand-rolled over `postgres-protocol`, for the replication protocol
//!   only: a physical replication session (`replication=true`) with startup,
//!   authentication (trust, password, md5, SCRAM-SHA-256), and the commands walvault
//!   needs: IDENTIFY_SYSTEM, SHOW (the replication grammar's), BASE_BACKUP
//!   ([`basebackup`]) and a brief START_REPLICATION that reads the server's clock
//!   ([`replication`]);
//! - [`sql::SqlClient`], over `tokio-postgres`, for plain SQL (`SELECT ...`).
//!
//! Both are Unix socket or TCP, plain text, with TCP keepalives, `connect_timeout` and a
//! deadline on every read or query. The replication connection length-checks every
//! message against [`MAX_MESSAGE_LEN`] before it is buffered, so a confused or hostile
//! server cannot make us allocate without bound. NOTICE and WARNING messages are logged.

pub mod basebackup;
pub mod conninfo;
pub mod replication;
pub mod sql;
pub mod stream;

use std::collections::BTreeMap;
use std::fmt;

use bytes::BytesMut;
use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256, SCRAM_SHA_256};
use postgres_protocol::message::backend::Message;
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

pub use conninfo::{ConnParams, Endpoint};

/// Largest backend message accepted (BASE_BACKUP sends CopyData of at most a few hundred
/// KiB; a DataRow of a simple query is small).
pub const MAX_MESSAGE_LEN: usize = 64 << 20;

/// A failure talking to PostgreSQL.
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    /// The server answered with an error.
    #[error("{0}")]
    Server(ServerError),
    /// The connection failed or broke.
    #[error("{context}: {source}")]
    Io {
        /// What we were doing.
        context: String,
        /// Cause.
        source: std::io::Error,
    },
    /// The server said something the protocol does not allow here.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// Authentication cannot proceed (no password, unsupported method).
    #[error("{0}")]
    Auth(String),
}

/// An ErrorResponse from the server.
#[derive(Debug, Clone, Default)]
pub struct ServerError {
    /// ERROR, FATAL...
    pub severity: String,
    /// SQLSTATE.
    pub code: String,
    /// Primary message.
    pub message: String,
    /// DETAIL.
    pub detail: Option<String>,
    /// HINT.
    pub hint: Option<String>,
}

impl fmt::Display for ServerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "PostgreSQL {}: {} (SQLSTATE {})",
            self.severity, self.message, self.code
        )?;
        if let Some(d) = &self.detail {
            write!(f, "; DETAIL: {d}")?;
        }
        if let Some(h) = &self.hint {
            write!(f, "; HINT: {h}")?;
        }
        Ok(())
    }
}

fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> PgError {
    let context = context.into();
    move |source| PgError::Io { context, source }
}

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// An open, authenticated connection, idle (ready for a query).
pub struct PgConnection {
    stream: Box<dyn Stream>,
    read: BytesMut,
    write: BytesMut,
    /// ParameterStatus values reported by the server.
    pub parameters: BTreeMap<String, String>,
    /// Where it is connected.
    pub endpoint: Endpoint,
    /// Longest wait for bytes from the server before the connection is given up;
    /// `None` while waiting is legitimate for long (BASE_BACKUP's checkpoint), when TCP
    /// keepalives alone watch the peer.
    idle_timeout: Option<std::time::Duration>,
}

/// How long a connection waits for the server's next bytes: during startup, queries and
/// BASE_BACKUP's COPY stream (which never pauses this long: throttling with MAX_RATE
/// sends a piece every 1/8 s). A server that stops sending for longer is taken as wedged.
pub const IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// Rows of a simple query's last result set, as text.
pub type Rows = Vec<Vec<Option<String>>>;

/// Rows of a simple query's last result set, as the bytes the server sent.
pub type RawRows = Vec<Vec<Option<Vec<u8>>>>;

/// Tries the endpoints of `params` in order, as libpq does: the first that connects
/// wins; a refusal by a server or a failed authentication ends the search (another host
/// would refuse the same way); a network failure or `connect_timeout` (bounding each
/// attempt whole, authentication included) moves on to the next host.
pub(crate) async fn connect_first<'a, T, F, Fut>(
    params: &'a ConnParams,
    mut connect_one: F,
) -> Result<T, PgError>
where
    F: FnMut(&'a Endpoint) -> Fut,
    Fut: std::future::Future<Output = Result<T, PgError>>,
{
    let mut last: Option<PgError> = None;
    for endpoint in &params.endpoints {
        let attempt = connect_one(endpoint);
        let result = match params.connect_timeout {
            Some(limit) => tokio::time::timeout(limit, attempt)
                .await
                .map_err(|_| limit),
            None => Ok(attempt.await),
        };
        match result {
            Ok(Ok(c)) => return Ok(c),
            Ok(Err(e @ PgError::Server(_))) | Ok(Err(e @ PgError::Auth(_))) => return Err(e),
            Ok(Err(e)) => last = Some(e),
            Err(limit) => {
                last = Some(PgError::Io {
                    context: format!("connecting to PostgreSQL at {endpoint}"),
                    source: std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("no answer within {} s (connect_timeout)", limit.as_secs()),
                    ),
                })
            }
        }
    }
    Err(last.unwrap_or_else(|| PgError::Protocol("no host to connect to".into())))
}

impl PgConnection {
    /// Opens a physical replication connection (`replication=true`) to the first
    /// endpoint of `params` that answers, and authenticates.
    pub async fn connect(params: &ConnParams) -> Result<PgConnection, PgError> {
        connect_first(params, |endpoint| Self::connect_one(params, endpoint)).await
    }

    async fn connect_one(
        params: &ConnParams,
        endpoint: &Endpoint,
    ) -> Result<PgConnection, PgError> {
        let what = format!("connecting to PostgreSQL at {endpoint}");
        let stream: Box<dyn Stream> = match endpoint {
            Endpoint::Unix { dir, port } => Box::new(
                tokio::net::UnixStream::connect(dir.join(format!(".s.PGSQL.{port}")))
                    .await
                    .map_err(io_err(&what))?,
            ),
            Endpoint::Tcp { host, port } => {
                let s = tokio::net::TcpStream::connect((host.as_str(), *port))
                    .await
                    .map_err(io_err(&what))?;
                let _ = s.set_nodelay(true);
                if let Some(k) = &params.keepalives {
                    let keepalive = socket2::TcpKeepalive::new()
                        .with_time(k.idle)
                        .with_interval(k.interval)
                        .with_retries(k.count);
                    socket2::SockRef::from(&s)
                        .set_tcp_keepalive(&keepalive)
                        .map_err(io_err(format!("setting TCP keepalives for {endpoint}")))?;
                }
                Box::new(s)
            }
        };
        let mut conn = PgConnection {
            stream,
            read: BytesMut::with_capacity(64 * 1024),
            write: BytesMut::new(),
            parameters: BTreeMap::new(),
            endpoint: endpoint.clone(),
            idle_timeout: Some(IDLE_TIMEOUT),
        };
        let startup: Vec<(&str, &str)> = vec![
            ("user", params.user.as_str()),
            ("application_name", params.application_name.as_str()),
            ("client_encoding", "UTF8"),
            ("replication", "true"),
        ];
        frontend::startup_message(startup, &mut conn.write)
            .map_err(io_err("encoding the startup message"))?;
        conn.flush().await?;
        // The password file names replication connections' database "replication".
        conn.authenticate(params, "replication").await?;
        loop {
            match conn.next_message().await? {
                Message::ReadyForQuery(_) => return Ok(conn),
                Message::ParameterStatus(p) => {
                    if let (Ok(n), Ok(v)) = (p.name(), p.value()) {
                        conn.parameters.insert(n.to_string(), v.to_string());
                    }
                }
                Message::BackendKeyData(_) => {}
                Message::ErrorResponse(e) => return Err(PgError::Server(server_error(&e))),
                _ => {
                    return Err(PgError::Protocol(
                        "unexpected message during startup".into(),
                    ))
                }
            }
        }
    }

    fn password(&self, params: &ConnParams, database: &str) -> Result<String, PgError> {
        password_for(params, &self.endpoint, database)
            .ok_or_else(|| no_password(params, &self.endpoint))
    }

    async fn authenticate(&mut self, params: &ConnParams, database: &str) -> Result<(), PgError> {
        loop {
            match self.next_message().await? {
                Message::AuthenticationOk => return Ok(()),
                Message::AuthenticationCleartextPassword => {
                    let pw = self.password(params, database)?;
                    frontend::password_message(pw.as_bytes(), &mut self.write)
                        .map_err(io_err("encoding the password"))?;
                    self.flush().await?;
                }
                Message::AuthenticationMd5Password(body) => {
                    let pw = self.password(params, database)?;
                    let hash = postgres_protocol::authentication::md5_hash(
                        params.user.as_bytes(),
                        pw.as_bytes(),
                        body.salt(),
                    );
                    frontend::password_message(hash.as_bytes(), &mut self.write)
                        .map_err(io_err("encoding the password"))?;
                    self.flush().await?;
                }
                Message::AuthenticationSasl(body) => {
                    let mut mechanisms = body.mechanisms();
                    let mut scram_offered = false;
                    while let Some(m) = mechanisms
                        .next()
                        .map_err(|e| PgError::Protocol(format!("SASL mechanisms: {e}")))?
                    {
                        scram_offered |= m == SCRAM_SHA_256;
                    }
                    if !scram_offered {
                        return Err(PgError::Auth(
                            "PostgreSQL offers no SASL mechanism walvault supports (SCRAM-SHA-256 without channel binding)".into(),
                        ));
                    }
                    let pw = self.password(params, database)?;
                    let mut scram = ScramSha256::new(pw.as_bytes(), ChannelBinding::unsupported());
                    frontend::sasl_initial_response(
                        SCRAM_SHA_256,
                        scram.message(),
                        &mut self.write,
                    )
                    .map_err(io_err("encoding SASL"))?;
                    self.flush().await?;
                    match self.next_message().await? {
                        Message::AuthenticationSaslContinue(c) => scram
                            .update(c.data())
                            .map_err(|e| PgError::Auth(format!("SCRAM exchange failed: {e}")))?,
                        Message::ErrorResponse(e) => return Err(PgError::Server(server_error(&e))),
                        _ => return Err(PgError::Protocol("unexpected message in SCRAM".into())),
                    }
                    frontend::sasl_response(scram.message(), &mut self.write)
                        .map_err(io_err("encoding SASL"))?;
                    self.flush().await?;
                    match self.next_message().await? {
                        Message::AuthenticationSaslFinal(f) => scram.finish(f.data()).map_err(|e| {
                            PgError::Auth(format!(
                                "the server's SCRAM signature is wrong ({e}): not the server we meant to reach"
                            ))
                        })?,
                        Message::ErrorResponse(e) => return Err(PgError::Server(server_error(&e))),
                        _ => return Err(PgError::Protocol("unexpected message in SCRAM".into())),
                    }
                }
                Message::ErrorResponse(e) => return Err(PgError::Server(server_error(&e))),
                _ => {
                    return Err(PgError::Auth(format!(
                        "PostgreSQL at {} asks for an authentication method walvault does not \
                         support (supported: trust, password, md5, scram-sha-256)",
                        self.endpoint
                    )))
                }
            }
        }
    }

    /// Sends what is buffered. Cancel-safe: bytes leave the buffer only once written, so
    /// a flush cut short (a `select!` taking another branch) is finished by the next.
    async fn flush(&mut self) -> Result<(), PgError> {
        while !self.write.is_empty() {
            let n = self
                .stream
                .write(&self.write)
                .await
                .map_err(io_err("sending to PostgreSQL"))?;
            if n == 0 {
                return Err(PgError::Io {
                    context: "sending to PostgreSQL".into(),
                    source: std::io::ErrorKind::WriteZero.into(),
                });
            }
            let _ = self.write.split_to(n);
        }
        self.stream
            .flush()
            .await
            .map_err(io_err("sending to PostgreSQL"))
    }

    /// Reads the next backend message. NoticeResponses (NOTICE, WARNING...) are logged
    /// here and never returned: every exchange sees only the messages it acts on.
    pub(crate) async fn next_message(&mut self) -> Result<Message, PgError> {
        match self.next_incoming().await? {
            Incoming::Message(m) => Ok(m),
            Incoming::CopyBothResponse => Err(PgError::Protocol(
                "unexpected CopyBothResponse (the server started streaming)".into(),
            )),
        }
    }

    /// [`next_message`](Self::next_message), and CopyBothResponse, which `START_REPLICATION`
    /// answers with and `postgres-protocol` 0.6 does not parse.
    pub(crate) async fn next_incoming(&mut self) -> Result<Incoming, PgError> {
        loop {
            if self.read.len() >= 5 {
                let len =
                    u32::from_be_bytes([self.read[1], self.read[2], self.read[3], self.read[4]])
                        as usize;
                if !(4..=MAX_MESSAGE_LEN).contains(&len) {
                    return Err(PgError::Protocol(format!(
                        "message of {len} bytes (type {:?}) exceeds the limit",
                        self.read[0] as char
                    )));
                }
                if self.read.len() > len {
                    if self.read[0] == b'W' {
                        // Format and column formats: nothing walvault acts on.
                        let _ = self.read.split_to(len + 1);
                        return Ok(Incoming::CopyBothResponse);
                    }
                    return match Message::parse(&mut self.read) {
                        Ok(Some(Message::NoticeResponse(n))) => {
                            log_notice(&self.endpoint, &notice_fields(n.fields()));
                            continue;
                        }
                        Ok(Some(m)) => Ok(Incoming::Message(m)),
                        Ok(None) => Err(PgError::Protocol("incomplete message".into())),
                        Err(e) => Err(PgError::Protocol(format!("malformed message: {e}"))),
                    };
                }
                self.read.reserve(len + 1 - self.read.len());
            } else {
                self.read.reserve(64 * 1024);
            }
            let read = self.stream.read_buf(&mut self.read);
            let n = match self.idle_timeout {
                Some(limit) => {
                    tokio::time::timeout(limit, read)
                        .await
                        .map_err(|_| PgError::Io {
                            context: format!("reading from PostgreSQL at {}", self.endpoint),
                            source: std::io::Error::new(
                                std::io::ErrorKind::TimedOut,
                                format!("nothing received for {} s", limit.as_secs()),
                            ),
                        })?
                }
                None => read.await,
            }
            .map_err(io_err("reading from PostgreSQL"))?;
            if n == 0 {
                return Err(PgError::Io {
                    context: "reading from PostgreSQL".into(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "the server closed the connection",
                    ),
                });
            }
        }
    }

    /// Sets how long a read waits for the server ([`IDLE_TIMEOUT`] after connecting;
    /// `None`: no limit, TCP keepalives alone watch the peer).
    pub(crate) fn set_idle_timeout(&mut self, limit: Option<std::time::Duration>) {
        self.idle_timeout = limit;
    }

    /// Sends a query (simple protocol) without reading the answer.
    pub(crate) async fn send_query(&mut self, sql: &str) -> Result<(), PgError> {
        frontend::query(sql, &mut self.write).map_err(io_err("encoding a query"))?;
        self.flush().await
    }

    /// Runs one replication command (simple query protocol) and returns the rows of its
    /// (last) result set. Plain SQL goes through [`sql::SqlClient`].
    pub async fn simple_query(&mut self, sql: &str) -> Result<Rows, PgError> {
        Ok(self
            .simple_query_raw(sql)
            .await?
            .into_iter()
            .map(|row| {
                row.into_iter()
                    .map(|v| v.map(|b| String::from_utf8_lossy(&b).into_owned()))
                    .collect()
            })
            .collect())
    }

    /// [`simple_query`](Self::simple_query) with the values as the server sent them
    /// (TIMELINE_HISTORY's file content).
    pub async fn simple_query_raw(&mut self, sql: &str) -> Result<RawRows, PgError> {
        self.send_query(sql).await?;
        let mut rows = Vec::new();
        let mut error = None;
        loop {
            match self.next_message().await? {
                Message::RowDescription(_) => rows.clear(),
                Message::DataRow(row) => rows.push(data_row_raw(&row)?),
                Message::ErrorResponse(e) => error = Some(server_error(&e)),
                Message::ReadyForQuery(_) => break,
                Message::CommandComplete(_)
                | Message::EmptyQueryResponse
                | Message::ParameterStatus(_) => {}
                Message::CopyOutResponse(_) | Message::CopyInResponse(_) => {
                    return Err(PgError::Protocol(
                        "a simple query started a COPY; not supported here".into(),
                    ))
                }
                _ => {}
            }
        }
        match error {
            Some(e) => Err(PgError::Server(e)),
            None => Ok(rows),
        }
    }

    /// A setting as the server reports it: `SHOW name`, a command of the replication
    /// grammar (`name` must be a setting name).
    pub async fn show(&mut self, name: &str) -> Result<String, PgError> {
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.')
        {
            return Err(PgError::Protocol(format!("{name:?} is not a setting name")));
        }
        let rows = self.simple_query(&format!("SHOW {name}")).await?;
        Ok(rows
            .first()
            .and_then(|r| r.first().cloned().flatten())
            .unwrap_or_default())
    }

    /// `server_version_num` as the server reports it (`SHOW`), e.g. 150004: never parsed
    /// from `server_version`, where "16beta1" would read as 160001.
    pub async fn server_version_num(&mut self) -> Result<u32, PgError> {
        let text = self.show("server_version_num").await?;
        text.trim().parse().map_err(|_| {
            PgError::Protocol(format!(
                "SHOW server_version_num answered {text:?}, not a number"
            ))
        })
    }

    /// `IDENTIFY_SYSTEM` (replication connections).
    pub async fn identify_system(&mut self) -> Result<SystemIdentity, PgError> {
        let rows = self.simple_query("IDENTIFY_SYSTEM").await?;
        let row = rows
            .first()
            .ok_or_else(|| PgError::Protocol("IDENTIFY_SYSTEM returned no row".into()))?;
        let field = |i: usize| row.get(i).cloned().flatten().unwrap_or_default();
        Ok(SystemIdentity {
            system_identifier: field(0)
                .parse()
                .map_err(|_| PgError::Protocol("IDENTIFY_SYSTEM: bad systemid".into()))?,
            timeline: field(1)
                .parse()
                .map_err(|_| PgError::Protocol("IDENTIFY_SYSTEM: bad timeline".into()))?,
            xlogpos: field(2),
        })
    }

    /// Ends the session politely.
    pub async fn close(mut self) {
        frontend::terminate(&mut self.write);
        let _ = self.flush().await;
    }
}

/// The password for `endpoint`: the one given, else the password file's.
fn password_for(params: &ConnParams, endpoint: &Endpoint, database: &str) -> Option<String> {
    if let Some(p) = &params.password {
        return Some(p.clone());
    }
    let file = params.passfile.as_ref()?;
    conninfo::passfile_lookup(file, endpoint, database, &params.user)
}

/// The server asks for a password and no source gave one.
fn no_password(params: &ConnParams, endpoint: &Endpoint) -> PgError {
    PgError::Auth(format!(
        "PostgreSQL at {endpoint} asks for a password for role \"{}\" and none was given: set PGPASSWORD, \
         add password=... to --conninfo, or add a line to the password file ({})",
        params.user,
        params
            .passfile
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "~/.pgpass".into())
    ))
}

/// A backend message as [`PgConnection::next_incoming`] reads it.
pub(crate) enum Incoming {
    /// Any message `postgres-protocol` parses.
    Message(Message),
    /// CopyBothResponse ('W'): the server starts streaming (`START_REPLICATION`).
    CopyBothResponse,
}

/// What IDENTIFY_SYSTEM says.
#[derive(Clone, Debug)]
pub struct SystemIdentity {
    /// pg_control system identifier.
    pub system_identifier: u64,
    /// Current timeline.
    pub timeline: u32,
    /// Current WAL flush position.
    pub xlogpos: String,
}

pub(crate) fn data_row_raw(
    row: &postgres_protocol::message::backend::DataRowBody,
) -> Result<Vec<Option<Vec<u8>>>, PgError> {
    let buf = row.buffer();
    let mut out = Vec::new();
    let mut ranges = row.ranges();
    while let Some(r) = ranges
        .next()
        .map_err(|e| PgError::Protocol(format!("malformed data row: {e}")))?
    {
        out.push(r.map(|r| buf[r].to_vec()));
    }
    Ok(out)
}

pub(crate) fn data_row(
    row: &postgres_protocol::message::backend::DataRowBody,
) -> Result<Vec<Option<String>>, PgError> {
    Ok(data_row_raw(row)?
        .into_iter()
        .map(|v| v.map(|b| String::from_utf8_lossy(&b).into_owned()))
        .collect())
}

pub(crate) fn server_error(
    body: &postgres_protocol::message::backend::ErrorResponseBody,
) -> ServerError {
    notice_fields(body.fields())
}

/// Logs a NoticeResponse: WARNING at warn level, the rest (NOTICE, INFO, LOG, DEBUG) at
/// info, with its DETAIL and HINT. BASE_BACKUP reports damaged pages this way.
fn log_notice(endpoint: &Endpoint, n: &ServerError) {
    let detail = n.detail.as_deref().unwrap_or("");
    let hint = n.hint.as_deref().unwrap_or("");
    if n.severity == "WARNING" {
        tracing::warn!(postgres = %endpoint, sqlstate = %n.code, detail, hint, "PostgreSQL WARNING: {}", n.message);
    } else {
        tracing::info!(postgres = %endpoint, sqlstate = %n.code, detail, hint, "PostgreSQL {}: {}", n.severity, n.message);
    }
}

/// The fields of an ErrorResponse or a NoticeResponse.
fn notice_fields(mut fields: postgres_protocol::message::backend::ErrorFields<'_>) -> ServerError {
    let mut e = ServerError::default();
    while let Ok(Some(f)) = fields.next() {
        let v = String::from_utf8_lossy(f.value_bytes()).into_owned();
        match f.type_() {
            // 'V' is the severity never localized (PostgreSQL 9.6+); 'S' may be translated.
            b'V' => e.severity = v,
            b'S' if e.severity.is_empty() => e.severity = v,
            b'C' => e.code = v,
            b'M' => e.message = v,
            b'D' => e.detail = Some(v),
            b'H' => e.hint = Some(v),
            _ => {}
        }
    }
    e
}
