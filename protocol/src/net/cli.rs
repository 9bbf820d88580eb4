//! The command line the three binaries share: the common arguments, the one setup
//! (logging, the rustls ring crypto provider, the async runtime), and the one mapping
//! from a command's outcome to its exit code.
//!
//! Exit codes (README's tables; DESIGN promise 7 for archive-get, whose codes PostgreSQL
//! reads):
//!
//! | code | [`Exit`]                  | meaning |
//! |------|---------------------------|---------|
//! | 0    | [`Exit::Success`]         | done (archive-push: durably archived; archive-get: written and verified) |
//! | 1    | [`Exit::Failure`]         | failed, logged; archive-get: not in the archive, or (standby, by hand) not delivered |
//! | 2    | [`Exit::BadConfig`]       | the client config is missing or invalid (pushclient, `pullclient restore` / `clone`) |
//! | 126  | [`Exit::FatalConfig`]     | the same, for what PostgreSQL runs during recovery (`archive-get`, the prefetch daemon): recovery stops |
//! | 200  | [`Exit::StopRecovery`]    | archive-get in archive recovery: the archive did not deliver ([`StopRecovery`]) |
//!
//! Nothing else above 125 is ever returned: PostgreSQL treats such codes from
//! restore_command as fatal. 200, not 127 or 128+N: PostgreSQL reports 126 as "command
//! not executable", 127 as "command not found", and shells report death by signal N as
//! 128+N.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use crate::net::config::{config_path, ClientConfig, ConfigError};
use crate::net::logging::{self, LogFormat};

/// `--log-format`, for every binary.
#[derive(clap::Args, Clone, Debug)]
pub struct LogArgs {
    /// Log format: text (default) or json.
    #[arg(long, global = true, default_value = "text")]
    pub log_format: LogFormat,
}

/// The arguments of the clients: `--config` and [`LogArgs`].
#[derive(clap::Args, Clone, Debug)]
pub struct CommonArgs {
    /// Client config file.
    #[arg(long, global = true)]
    pub config: Option<PathBuf>,
    /// `--log-format`.
    #[command(flatten)]
    pub log: LogArgs,
}

impl CommonArgs {
    /// The config file of `binary`: `--config`, else `$WALVAULT_CONFIG`, else
    /// `/etc/walvault/<binary>.toml`.
    pub fn config_path(&self, binary: &str) -> PathBuf {
        config_path(self.config.as_deref(), binary)
    }

    /// Loads the config of `binary` (see [`CommonArgs::config_path`]); its path too.
    /// The error keeps its type, so [`run`] exits with the command's config code.
    pub fn load_config(&self, binary: &str) -> Result<(PathBuf, ClientConfig), ConfigError> {
        let path = self.config_path(binary);
        let cfg = ClientConfig::load(&path)?;
        Ok((path, cfg))
    }
}

/// How a command ended, as its exit code says it (the table above).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// 0.
    Success,
    /// 1.
    Failure,
    /// 2: the config is unusable.
    BadConfig,
    /// 126: the config is unusable, and PostgreSQL must stop recovery for it.
    FatalConfig,
    /// 200: archive recovery must stop rather than end early.
    StopRecovery,
    /// 2: a check found something CRITICAL (Nagios' code; `archived check`).
    Critical,
    /// 3: a check could not be run (Nagios' UNKNOWN; `archived check --nagios`).
    Unknown,
}

impl Exit {
    /// The process exit code.
    pub const fn code(self) -> u8 {
        match self {
            Exit::Success => 0,
            Exit::Failure => 1,
            Exit::BadConfig => 2,
            Exit::FatalConfig => 126,
            Exit::StopRecovery => 200,
            Exit::Critical => 2,
            Exit::Unknown => 3,
        }
    }
}

impl From<Exit> for ExitCode {
    fn from(exit: Exit) -> ExitCode {
        ExitCode::from(exit.code())
    }
}

/// archive-get could not deliver `file` during archive recovery: exit 200, so
/// PostgreSQL stops instead of taking the failure for the end of the WAL and promoting
/// early (DESIGN promise 7).
#[derive(Debug, thiserror::Error)]
#[error(
    "{error:#}; archive recovery stops here (exit 200) instead of taking this for the end of \
     the WAL and promoting early: PostgreSQL shuts down; start it again once the archive can \
     deliver {file} and recovery resumes"
)]
pub struct StopRecovery {
    /// The file PostgreSQL asked for.
    pub file: String,
    /// Why it was not delivered (after the retries).
    pub error: anyhow::Error,
}

/// How a binary runs its command.
#[derive(Clone, Copy, Debug)]
pub struct Setup {
    /// Worker threads of the runtime (`None`: one per CPU; `Some(0)`: no workers, the
    /// command's own thread runs every task, for a latency-bound loop that would only
    /// pay for waking other threads).
    pub workers: Option<usize>,
    /// The exit for an unusable client config ([`Exit::BadConfig`] or
    /// [`Exit::FatalConfig`]; [`Exit::Failure`] where no table says otherwise).
    pub config_exit: Exit,
}

/// Runs a command: installs logging (stderr, which PostgreSQL puts in its log) and the
/// rustls ring crypto provider, builds the runtime, runs `command`, and maps its outcome
/// to the exit code, logging a failure once ([`failure`]).
pub fn run(
    log: &LogArgs,
    setup: Setup,
    command: impl FnOnce(&tokio::runtime::Runtime) -> anyhow::Result<Exit>,
) -> ExitCode {
    logging::init(log.log_format, "info");
    crate::net::transport::install_crypto_provider();
    let mut builder = match setup.workers {
        Some(0) => tokio::runtime::Builder::new_current_thread(),
        Some(n) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    let runtime = match builder.enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            tracing::error!("cannot start the async runtime: {e}");
            return Exit::Failure.into();
        }
    };
    let exit = match command(&runtime) {
        Ok(exit) => exit,
        Err(e) => failure(&e, setup.config_exit),
    };
    // In-flight downloads and prefault batches are abandoned, not awaited: SIGTERM must
    // end the prefetch daemon within a second.
    runtime.shutdown_timeout(Duration::from_millis(200));
    exit.into()
}

/// Logs a failed command and says its exit: [`Exit::StopRecovery`] for a
/// [`StopRecovery`], `config_exit` when the config could not be loaded
/// ([`ConfigError`]), else [`Exit::Failure`].
pub fn failure(e: &anyhow::Error, config_exit: Exit) -> Exit {
    let exit = if e.downcast_ref::<StopRecovery>().is_some() {
        Exit::StopRecovery
    } else if e.chain().any(|c| c.is::<ConfigError>()) {
        config_exit
    } else {
        Exit::Failure
    };
    match exit {
        Exit::FatalConfig => {
            tracing::error!("{e:#}; this is fatal for recovery (exit {})", exit.code())
        }
        _ => tracing::error!("{e:#}"),
    }
    exit
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_map_to_the_exit_code_table() {
        let config = anyhow::Error::new(ConfigError::Invalid {
            path: "/x.toml".into(),
            message: "m".into(),
        })
        .context("loading");
        assert_eq!(failure(&config, Exit::FatalConfig).code(), 126);
        assert_eq!(failure(&config, Exit::BadConfig).code(), 2);
        let stop = anyhow::Error::new(StopRecovery {
            file: "000000010000000000000003".into(),
            error: anyhow::anyhow!("archive unreachable"),
        });
        assert_eq!(failure(&stop, Exit::FatalConfig).code(), 200);
        assert!(stop
            .to_string()
            .starts_with("archive unreachable; archive recovery stops"));
        assert_eq!(
            failure(&anyhow::anyhow!("x"), Exit::BadConfig),
            Exit::Failure
        );
    }
}
