//! Where and as whom to connect to PostgreSQL, resolved the way libpq does it.
//!
//! Sources, first wins: the connection string (`key=value ...` or a `postgres://` /
//! `postgresql://` URI), then the environment (`PGHOST`, `PGPORT`, `PGUSER`,
//! `PGPASSWORD`, `PGDATABASE`, `PGPASSFILE`, `PGAPPNAME`, `PGCONNECT_TIMEOUT`,
//! `PGSSLMODE`, `PGCLIENTENCODING`, `PGTARGETSESSIONATTRS`, `PGGSSENCMODE`), then
//! libpq's defaults: a Unix socket in `/var/run/postgresql` (Debian's libpq default) or
//! `/tmp`, port 5432, the OS user's name as user and database. A host starting with `/`
//! is a Unix socket directory. A password not given otherwise is looked up in the
//! password file (`PGPASSFILE`, else `~/.pgpass`), whose database field is
//! `replication` for replication connections, as libpq does.
//!
//! Every keyword is either honoured or refused with an error saying so; none is accepted
//! and ignored:
//!
//! - honoured: `host`, `hostaddr` (when `host` is not given), `port`, `user`, `password`,
//!   `dbname`, `passfile`, `application_name`, `fallback_application_name`,
//!   `connect_timeout` (per host, as libpq: 0 or negative waits without limit, 1 means
//!   2; walvault's default when it is not given is 30 s, where libpq waits forever), and
//!   on TCP `keepalives`, `keepalives_idle`, `keepalives_interval`, `keepalives_count`;
//! - accepted only with the value walvault implements: `sslmode` `disable`, `allow`,
//!   `prefer` (TLS to PostgreSQL is not implemented: all three connect in plain text);
//!   `client_encoding` `UTF8`; `target_session_attrs` `any`; `gssencmode` `disable` or
//!   `prefer` (no GSSAPI: plain text);
//! - refused: every other libpq keyword (`options`, `replication`, `sslcert`,
//!   `service`, ...), and `hostaddr` beside `host`.
//!
//! Keepalives are on by default, as in libpq, but with walvault's times when the
//! conninfo gives none: first probe after 60 s idle, then every 10 s, 6 unanswered
//! probes end the connection. They are what notices a dead server or network while
//! BASE_BACKUP waits for its checkpoint (the operating system's default of two hours
//! would not).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// One place to connect to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// A Unix socket: `<dir>/.s.PGSQL.<port>`.
    Unix {
        /// Socket directory.
        dir: PathBuf,
        /// Port (names the socket file).
        port: u16,
    },
    /// TCP.
    Tcp {
        /// Host name or address.
        host: String,
        /// Port.
        port: u16,
    },
}

impl Endpoint {
    /// The host as the password file names it.
    fn passfile_host(&self) -> String {
        match self {
            Endpoint::Unix { .. } => "localhost".into(),
            Endpoint::Tcp { host, .. } => host.clone(),
        }
    }

    fn port(&self) -> u16 {
        match self {
            Endpoint::Unix { port, .. } | Endpoint::Tcp { port, .. } => *port,
        }
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Unix { dir, port } => {
                write!(f, "socket {}/.s.PGSQL.{port}", dir.display())
            }
            Endpoint::Tcp { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

/// Resolved connection parameters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnParams {
    /// Where to try, in order.
    pub endpoints: Vec<Endpoint>,
    /// Role.
    pub user: String,
    /// Database.
    pub dbname: String,
    /// Password, if any source gave one.
    pub password: Option<String>,
    /// application_name.
    pub application_name: String,
    /// Connect timeout per host; `None` waits without limit (`connect_timeout=0`).
    pub connect_timeout: Option<Duration>,
    /// TCP keepalives; `None` when turned off (`keepalives=0`).
    pub keepalives: Option<Keepalives>,
    /// Password file consulted when no password was given.
    pub passfile: Option<PathBuf>,
}

/// TCP keepalive settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Keepalives {
    /// Idle time before the first probe.
    pub idle: Duration,
    /// Time between probes.
    pub interval: Duration,
    /// Unanswered probes before the connection is dropped.
    pub count: u32,
}

impl Default for Keepalives {
    fn default() -> Keepalives {
        Keepalives {
            idle: Duration::from_secs(60),
            interval: Duration::from_secs(10),
            count: 6,
        }
    }
}

/// Why connection parameters cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid connection string: {0} (use key=value pairs like \"host=/var/run/postgresql user=postgres\" or a postgres:// URI)")]
pub struct ConnInfoError(pub String);

/// Parses a `key=value ...` string or a `postgres://` URI into its keywords.
pub fn parse_conninfo(text: &str) -> Result<BTreeMap<String, String>, ConnInfoError> {
    let t = text.trim();
    if t.starts_with("postgres://") || t.starts_with("postgresql://") {
        parse_uri(t)
    } else {
        parse_keywords(t)
    }
}

fn parse_keywords(text: &str) -> Result<BTreeMap<String, String>, ConnInfoError> {
    let mut out = BTreeMap::new();
    let mut chars = text.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none() {
            break;
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c.is_whitespace() {
                break;
            }
            key.push(c);
            chars.next();
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.next() != Some('=') {
            return Err(ConnInfoError(format!("missing \"=\" after \"{key}\"")));
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let mut value = String::new();
        if chars.peek() == Some(&'\'') {
            chars.next();
            loop {
                match chars.next() {
                    None => {
                        return Err(ConnInfoError(format!(
                            "unterminated quoted value of \"{key}\""
                        )))
                    }
                    Some('\\') => match chars.next() {
                        Some(c) => value.push(c),
                        None => {
                            return Err(ConnInfoError(format!(
                                "unterminated quoted value of \"{key}\""
                            )))
                        }
                    },
                    Some('\'') => break,
                    Some(c) => value.push(c),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                chars.next();
                if c == '\\' {
                    if let Some(n) = chars.next() {
                        value.push(n);
                    }
                } else {
                    value.push(c);
                }
            }
        }
        if key.is_empty() {
            return Err(ConnInfoError("empty keyword".into()));
        }
        out.insert(key, value);
    }
    Ok(out)
}

fn percent_decode(s: &str) -> Result<String, ConnInfoError> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| ConnInfoError(format!("bad percent-encoding in \"{s}\"")))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| ConnInfoError(format!("\"{s}\" is not UTF-8")))
}

fn parse_uri(uri: &str) -> Result<BTreeMap<String, String>, ConnInfoError> {
    let mut out = BTreeMap::new();
    let rest = uri
        .split_once("://")
        .map(|(_, r)| r)
        .ok_or_else(|| ConnInfoError("not a URI".into()))?;
    let (main, query) = match rest.split_once('?') {
        Some((m, q)) => (m, Some(q)),
        None => (rest, None),
    };
    let (authority, path) = match main.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (main, None),
    };
    let hostport = match authority.rsplit_once('@') {
        Some((userinfo, hp)) => {
            match userinfo.split_once(':') {
                Some((u, p)) => {
                    out.insert("user".into(), percent_decode(u)?);
                    out.insert("password".into(), percent_decode(p)?);
                }
                None if !userinfo.is_empty() => {
                    out.insert("user".into(), percent_decode(userinfo)?);
                }
                None => {}
            }
            hp
        }
        None => authority,
    };
    if !hostport.is_empty() {
        let (hosts, ports): (Vec<String>, Vec<String>) = hostport
            .split(',')
            .map(|hp| {
                if let Some(v6) = hp.strip_prefix('[') {
                    let (h, p) = v6.split_once(']').unwrap_or((v6, ""));
                    (h.to_string(), p.trim_start_matches(':').to_string())
                } else {
                    match hp.rsplit_once(':') {
                        Some((h, p)) => (h.to_string(), p.to_string()),
                        None => (hp.to_string(), String::new()),
                    }
                }
            })
            .unzip();
        let hosts: Vec<String> = hosts
            .iter()
            .map(|h| percent_decode(h))
            .collect::<Result<_, _>>()?;
        if hosts.iter().any(|h| !h.is_empty()) {
            out.insert("host".into(), hosts.join(","));
        }
        if ports.iter().any(|p| !p.is_empty()) {
            out.insert("port".into(), ports.join(","));
        }
    }
    if let Some(db) = path.filter(|p| !p.is_empty()) {
        out.insert("dbname".into(), percent_decode(db)?);
    }
    if let Some(q) = query {
        for pair in q.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair
                .split_once('=')
                .ok_or_else(|| ConnInfoError(format!("URI parameter \"{pair}\" has no value")))?;
            out.insert(percent_decode(k)?, percent_decode(v)?);
        }
    }
    Ok(out)
}

/// The OS user running this process (libpq's default user name).
pub fn os_user_name() -> Option<String> {
    crate::net::users::current_user().map(|u| u.name)
}

fn home_dir() -> Option<PathBuf> {
    if let Some(h) = std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        return Some(PathBuf::from(h));
    }
    crate::net::users::current_user()
        .map(|u| u.home)
        .filter(|h| !h.as_os_str().is_empty())
}

/// Resolves parameters from a connection string (optional) and an environment lookup
/// (`std::env::var` in real use; a map in tests).
pub fn resolve(
    conninfo: Option<&str>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<ConnParams, ConnInfoError> {
    let given = match conninfo {
        Some(c) => parse_conninfo(c)?,
        None => BTreeMap::new(),
    };
    // libpq keywords walvault does not implement: refused by name rather than ignored.
    const NOT_IMPLEMENTED: &[&str] = &[
        "options",
        "replication",
        "service",
        "channel_binding",
        "sslnegotiation",
        "sslcompression",
        "sslcert",
        "sslkey",
        "sslpassword",
        "sslcertmode",
        "sslrootcert",
        "sslcrl",
        "sslcrldir",
        "sslsni",
        "requirepeer",
        "require_auth",
        "ssl_min_protocol_version",
        "ssl_max_protocol_version",
        "krbsrvname",
        "gsslib",
        "gssdelegation",
        "load_balance_hosts",
        "tcp_user_timeout",
    ];
    const KNOWN: &[&str] = &[
        "host",
        "hostaddr",
        "port",
        "user",
        "password",
        "dbname",
        "passfile",
        "application_name",
        "fallback_application_name",
        "connect_timeout",
        "sslmode",
        "client_encoding",
        "target_session_attrs",
        "gssencmode",
        "keepalives",
        "keepalives_idle",
        "keepalives_interval",
        "keepalives_count",
    ];
    if let Some(k) = given.keys().find(|k| NOT_IMPLEMENTED.contains(&k.as_str())) {
        return Err(ConnInfoError(format!(
            "keyword \"{k}\" is not implemented by walvault's PostgreSQL connection; remove it \
             (walvault refuses what it would otherwise silently ignore)"
        )));
    }
    if let Some(unknown) = given.keys().find(|k| !KNOWN.contains(&k.as_str())) {
        return Err(ConnInfoError(format!("unknown keyword \"{unknown}\"")));
    }
    let get = |key: &str, var: &str| -> Option<String> {
        given
            .get(key)
            .cloned()
            .or_else(|| env(var))
            .filter(|v| !v.is_empty())
    };
    let sslmode = get("sslmode", "PGSSLMODE").unwrap_or_else(|| "prefer".into());
    match sslmode.as_str() {
        "disable" | "allow" | "prefer" => {}
        "require" | "verify-ca" | "verify-full" => {
            return Err(ConnInfoError(format!(
                "sslmode={sslmode}: walvault does not speak TLS to PostgreSQL; connect over a Unix socket \
                 or a trusted network with sslmode=prefer or disable"
            )))
        }
        other => return Err(ConnInfoError(format!("sslmode \"{other}\" is not a mode"))),
    }
    let only = |key: &str, var: &str, allowed: &[&str], what: &str| -> Result<(), ConnInfoError> {
        match get(key, var) {
            Some(v) if !allowed.iter().any(|a| a.eq_ignore_ascii_case(v.trim())) => {
                Err(ConnInfoError(format!(
                    "{key}={v} is not implemented by walvault ({what}); use {}",
                    allowed.join(" or ")
                )))
            }
            _ => Ok(()),
        }
    };
    only(
        "client_encoding",
        "PGCLIENTENCODING",
        &["UTF8", "UTF-8"],
        "it always asks for UTF8",
    )?;
    only(
        "target_session_attrs",
        "PGTARGETSESSIONATTRS",
        &["any"],
        "it takes the first host that answers",
    )?;
    only(
        "gssencmode",
        "PGGSSENCMODE",
        &["disable", "prefer"],
        "it has no GSSAPI encryption",
    )?;
    if get("host", "PGHOST").is_some() && given.contains_key("hostaddr") {
        return Err(ConnInfoError(
            "hostaddr together with host is not implemented by walvault; give only one of them"
                .into(),
        ));
    }
    let hosts: Vec<String> = match get("host", "PGHOST").or_else(|| get("hostaddr", "PGHOSTADDR")) {
        Some(h) => h.split(',').map(|s| s.trim().to_string()).collect(),
        None => {
            let dir = ["/var/run/postgresql", "/tmp"]
                .into_iter()
                .find(|d| Path::new(d).is_dir())
                .unwrap_or("/tmp");
            vec![dir.to_string()]
        }
    };
    let ports: Vec<u16> = match get("port", "PGPORT") {
        Some(p) => p
            .split(',')
            .map(|s| {
                s.trim()
                    .parse::<u16>()
                    .map_err(|_| ConnInfoError(format!("port \"{s}\" is not a port number")))
            })
            .collect::<Result<_, _>>()?,
        None => vec![5432],
    };
    if ports.len() != 1 && ports.len() != hosts.len() {
        return Err(ConnInfoError(format!(
            "{} ports for {} hosts",
            ports.len(),
            hosts.len()
        )));
    }
    let endpoints = hosts
        .iter()
        .enumerate()
        .map(|(i, h)| {
            let port = *ports.get(i).unwrap_or(&ports[0]);
            if h.starts_with('/') {
                Endpoint::Unix {
                    dir: PathBuf::from(h),
                    port,
                }
            } else {
                Endpoint::Tcp {
                    host: if h.is_empty() {
                        "localhost".into()
                    } else {
                        h.clone()
                    },
                    port,
                }
            }
        })
        .collect();
    let user = get("user", "PGUSER")
        .or_else(os_user_name)
        .ok_or_else(|| ConnInfoError("no user given and the OS user is unknown".into()))?;
    let dbname = get("dbname", "PGDATABASE").unwrap_or_else(|| user.clone());
    let seconds = |key: &str, t: &str| -> Result<i64, ConnInfoError> {
        t.trim()
            .parse::<i64>()
            .map_err(|_| ConnInfoError(format!("{key} \"{t}\" is not a number of seconds")))
    };
    let connect_timeout = match get("connect_timeout", "PGCONNECT_TIMEOUT") {
        // libpq: zero or negative waits without limit, and the least timeout is 2 s.
        Some(t) => match seconds("connect_timeout", &t)? {
            n if n <= 0 => None,
            n => Some(Duration::from_secs(n.max(2) as u64)),
        },
        None => Some(Duration::from_secs(30)),
    };
    let keepalives = match given.get("keepalives").map(|v| v.trim()) {
        Some("0") => None,
        Some("1") | None => {
            let mut k = Keepalives::default();
            let positive = |key: &str| -> Result<Option<u64>, ConnInfoError> {
                match given.get(key) {
                    None => Ok(None),
                    Some(v) => match seconds(key, v)? {
                        // libpq: 0 means the system default; walvault's default then.
                        0 => Ok(None),
                        n if n > 0 => Ok(Some(n as u64)),
                        _ => Err(ConnInfoError(format!("{key} \"{v}\" is negative"))),
                    },
                }
            };
            if let Some(n) = positive("keepalives_idle")? {
                k.idle = Duration::from_secs(n);
            }
            if let Some(n) = positive("keepalives_interval")? {
                k.interval = Duration::from_secs(n);
            }
            if let Some(n) = positive("keepalives_count")? {
                k.count = u32::try_from(n)
                    .map_err(|_| ConnInfoError(format!("keepalives_count \"{n}\" is too large")))?;
            }
            Some(k)
        }
        Some(other) => {
            return Err(ConnInfoError(format!(
                "keepalives \"{other}\" is neither 1 (on) nor 0 (off)"
            )))
        }
    };
    let passfile = get("passfile", "PGPASSFILE")
        .map(PathBuf::from)
        .or_else(|| home_dir().map(|h| h.join(".pgpass")));
    Ok(ConnParams {
        endpoints,
        user,
        dbname,
        password: get("password", "PGPASSWORD"),
        application_name: get("application_name", "PGAPPNAME")
            .or_else(|| given.get("fallback_application_name").cloned())
            .unwrap_or_else(|| "walvault".into()),
        connect_timeout,
        keepalives,
        passfile,
    })
}

/// Looks a password up in a password file (`host:port:database:user:password`, `*`
/// wildcards, `\` escapes), as libpq does. Ignored unless the file is not group- or
/// world-readable.
pub fn passfile_lookup(
    file: &Path,
    endpoint: &Endpoint,
    database: &str,
    user: &str,
) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(file).ok()?;
    if meta.permissions().mode() & 0o077 != 0 {
        tracing::warn!(file = %file.display(), "password file has group or world access; ignored (chmod 0600 it)");
        return None;
    }
    let text = std::fs::read_to_string(file).ok()?;
    passfile_match(
        &text,
        &endpoint.passfile_host(),
        endpoint,
        &endpoint.port().to_string(),
        database,
        user,
    )
}

fn passfile_match(
    text: &str,
    host: &str,
    endpoint: &Endpoint,
    port: &str,
    database: &str,
    user: &str,
) -> Option<String> {
    for line in text.lines() {
        if line.trim_start().starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let mut fields = Vec::new();
        let mut cur = String::new();
        let mut chars = line.chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' => {
                    if let Some(n) = chars.next() {
                        cur.push(n);
                    }
                }
                ':' if fields.len() < 4 => fields.push(std::mem::take(&mut cur)),
                c => cur.push(c),
            }
        }
        fields.push(cur);
        if fields.len() != 5 {
            continue;
        }
        let host_ok = fields[0] == "*"
            || fields[0] == host
            || matches!(endpoint, Endpoint::Unix { dir, .. } if Path::new(&fields[0]) == dir);
        if host_ok
            && (fields[1] == "*" || fields[1] == port)
            && (fields[2] == "*" || fields[2] == database)
            && (fields[3] == "*" || fields[3] == user)
        {
            return Some(fields[4].clone());
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: BTreeMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn keyword_strings() {
        let m = parse_conninfo("host=/tmp/s  port = 5433 user='o\\'neil' password='a b'").unwrap();
        assert_eq!(m["host"], "/tmp/s");
        assert_eq!(m["port"], "5433");
        assert_eq!(m["user"], "o'neil");
        assert_eq!(m["password"], "a b");
        assert!(parse_conninfo("host").is_err());
        assert!(parse_conninfo("password='x").is_err());
    }

    #[test]
    fn uris() {
        let m = parse_conninfo("postgresql://bob:s%40cret@db.example:6543/app?application_name=x")
            .unwrap();
        assert_eq!(m["user"], "bob");
        assert_eq!(m["password"], "s@cret");
        assert_eq!(m["host"], "db.example");
        assert_eq!(m["port"], "6543");
        assert_eq!(m["dbname"], "app");
        assert_eq!(m["application_name"], "x");
        let m = parse_conninfo("postgres://%2Fvar%2Frun%2Fpostgresql/db").unwrap();
        assert_eq!(m["host"], "/var/run/postgresql");
        let m = parse_conninfo("postgresql:///db?host=/tmp&port=5499").unwrap();
        assert_eq!(m["host"], "/tmp");
        assert_eq!(m["port"], "5499");
    }

    #[test]
    fn resolution_order_and_sockets() {
        let env = env_of(&[
            ("PGHOST", "/run/pg"),
            ("PGPORT", "5444"),
            ("PGUSER", "envuser"),
            ("PGPASSWORD", "envpw"),
        ]);
        let p = resolve(None, &env).unwrap();
        assert_eq!(
            p.endpoints,
            vec![Endpoint::Unix {
                dir: "/run/pg".into(),
                port: 5444
            }]
        );
        assert_eq!(p.user, "envuser");
        assert_eq!(p.dbname, "envuser");
        assert_eq!(p.password.as_deref(), Some("envpw"));
        let p = resolve(Some("host=10.0.0.1 user=u dbname=d"), &env).unwrap();
        assert_eq!(
            p.endpoints,
            vec![Endpoint::Tcp {
                host: "10.0.0.1".into(),
                port: 5444
            }]
        );
        assert_eq!((p.user.as_str(), p.dbname.as_str()), ("u", "d"));
        assert!(resolve(Some("sslmode=require"), &env).is_err());
        assert!(resolve(Some("bogus=1"), &env).is_err());
        assert!(resolve(Some("port=x"), &env).is_err());
    }

    #[test]
    fn timeouts_and_keepalives_are_honoured() {
        let env = env_of(&[("PGUSER", "u")]);
        let p = resolve(None, &env).unwrap();
        assert_eq!(p.connect_timeout, Some(Duration::from_secs(30)));
        assert_eq!(p.keepalives, Some(Keepalives::default()));
        let p = resolve(Some("connect_timeout=7"), &env).unwrap();
        assert_eq!(p.connect_timeout, Some(Duration::from_secs(7)));
        assert_eq!(
            resolve(Some("connect_timeout=1"), &env)
                .unwrap()
                .connect_timeout,
            Some(Duration::from_secs(2))
        );
        assert_eq!(
            resolve(Some("connect_timeout=0"), &env)
                .unwrap()
                .connect_timeout,
            None
        );
        assert_eq!(
            resolve(Some("connect_timeout=-3"), &env)
                .unwrap()
                .connect_timeout,
            None
        );
        let env_timeout = env_of(&[("PGUSER", "u"), ("PGCONNECT_TIMEOUT", "5")]);
        assert_eq!(
            resolve(None, &env_timeout).unwrap().connect_timeout,
            Some(Duration::from_secs(5))
        );
        assert!(resolve(Some("connect_timeout=soon"), &env).is_err());

        assert_eq!(
            resolve(Some("keepalives=0"), &env).unwrap().keepalives,
            None
        );
        let p = resolve(
            Some("keepalives=1 keepalives_idle=5 keepalives_interval=2 keepalives_count=3"),
            &env,
        )
        .unwrap();
        assert_eq!(
            p.keepalives,
            Some(Keepalives {
                idle: Duration::from_secs(5),
                interval: Duration::from_secs(2),
                count: 3
            })
        );
        let p = resolve(Some("keepalives_idle=0 keepalives_count=9"), &env).unwrap();
        assert_eq!(
            p.keepalives,
            Some(Keepalives {
                count: 9,
                ..Keepalives::default()
            })
        );
        for bad in [
            "keepalives=2",
            "keepalives_idle=-1",
            "keepalives_interval=x",
            "keepalives_count=99999999999",
        ] {
            assert!(resolve(Some(bad), &env).is_err(), "{bad}");
        }
    }

    #[test]
    fn keywords_not_implemented_are_refused_not_ignored() {
        let env = env_of(&[("PGUSER", "u")]);
        for refused in [
            "options='-c statement_timeout=0'",
            "replication=database",
            "sslrootcert=/etc/ca.pem",
            "service=main",
            "tcp_user_timeout=1000",
            "client_encoding=LATIN1",
            "target_session_attrs=read-write",
            "gssencmode=require",
            "host=/tmp hostaddr=127.0.0.1",
        ] {
            let e = resolve(Some(refused), &env).unwrap_err();
            assert!(e.0.contains("not implemented"), "{refused}: {e}");
        }
        let e = resolve(
            None,
            &env_of(&[("PGUSER", "u"), ("PGCLIENTENCODING", "SJIS")]),
        )
        .unwrap_err();
        assert!(e.0.contains("client_encoding"), "{e}");
        for accepted in [
            "client_encoding=UTF8",
            "client_encoding=utf8",
            "target_session_attrs=any",
            "gssencmode=disable",
            "gssencmode=prefer",
            "hostaddr=127.0.0.1",
            "postgresql://h/db?keepalives_idle=30&connect_timeout=4",
        ] {
            assert!(resolve(Some(accepted), &env).is_ok(), "{accepted}");
        }
        assert!(resolve(Some("bogus=1"), &env)
            .unwrap_err()
            .0
            .contains("unknown keyword"));
    }

    #[test]
    fn password_file_matching() {
        let unix = Endpoint::Unix {
            dir: "/run/pg".into(),
            port: 5432,
        };
        let text =
            "# comment\nother:*:*:*:no\nlocalhost:5432:replication:rep:pw\\:1\n*:*:*:*:fallback\n";
        assert_eq!(
            passfile_match(text, "localhost", &unix, "5432", "replication", "rep").as_deref(),
            Some("pw:1")
        );
        assert_eq!(
            passfile_match(text, "localhost", &unix, "5432", "postgres", "rep").as_deref(),
            Some("fallback")
        );
        assert_eq!(
            passfile_match("/run/pg:*:*:*:bydir", "localhost", &unix, "5432", "x", "y").as_deref(),
            Some("bydir")
        );
    }
}
