//! `phiseald`: signals, hardening, configuration, start. Everything else is in the library.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// mimalloc instead of glibc malloc: the daemon allocates many small, short-lived buffers per
/// field (requests, ciphertexts, audit records); measured in docs/PERFORMANCE.md.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use phiseald::config::{Config, LogFormat, Overrides, Source};
use phiseald::daemon::Daemon;

/// The phiseal sidecar: per-tenant field encryption over gRPC on a Unix socket.
///
/// Zero setup: `phiseald --socket PATH --data-dir DIR` runs the embedded default (local
/// development KMS, SQLite key store and audit log in DIR), where the daemon's own uid may do
/// everything. Anything else: `phiseald --config FILE` (see phiseald.example.toml).
/// Environment variables `PHISEALD_<SECTION>__<KEY>` override the configuration.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// The configuration file (TOML).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// The Unix socket to listen on (overrides the file).
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// The data directory of the embedded backends (overrides the file).
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Validate the configuration and exit.
    #[arg(long)]
    check_config: bool,
    /// Apply the PostgreSQL key store's schema migrations and exit (they are also applied
    /// at every start; this runs them explicitly, e.g. before a rolling upgrade).
    #[arg(long, conflicts_with = "check_config")]
    migrate: bool,
}

fn load(args: &Args) -> Result<Config, phiseald::DaemonError> {
    let overrides = Overrides {
        socket: args.socket.clone(),
        data_dir: args.data_dir.clone(),
    };
    match (&args.config, &args.data_dir) {
        (Some(file), _) => Config::load(Source::File(file), &overrides),
        (None, Some(_)) => Config::load(Source::Embedded, &overrides),
        (None, None) => Err(phiseald::DaemonError::Config(
            "give --config FILE, or --data-dir DIR for the embedded default".into(),
        )),
    }
}

fn init_logging(config: &Config) -> Result<(), phiseald::DaemonError> {
    let filter = tracing_subscriber::EnvFilter::try_new(config.log.filter())
        .map_err(|e| phiseald::DaemonError::Config(format!("log.level: {e}")))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false);
    let installed = match config.log.format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
    installed.map_err(|e| phiseald::DaemonError::Config(format!("logging: {e}")))
}

/// The signals the daemon handles: SIGTERM and SIGINT drain and stop it; SIGHUP (often sent
/// to reload) is logged and ignored — it would otherwise kill the daemon without draining.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> Result<Self, phiseald::DaemonError> {
        use tokio::signal::unix::{SignalKind, signal};
        let io = |source| phiseald::DaemonError::Io {
            what: "installing signal handlers".into(),
            source,
        };
        Ok(Self {
            term: signal(SignalKind::terminate()).map_err(io)?,
            int: signal(SignalKind::interrupt()).map_err(io)?,
            hup: signal(SignalKind::hangup()).map_err(io)?,
        })
    }

    /// Resolves on SIGTERM or SIGINT.
    async fn shutdown(mut self) {
        loop {
            tokio::select! {
                _ = self.term.recv() => return,
                _ = self.int.recv() => return,
                _ = self.hup.recv() => tracing::warn!(
                    "SIGHUP ignored: phiseald does not reload its configuration; restart it to apply changes"
                ),
            }
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let report = |e: &dyn std::fmt::Display| {
        eprintln!("phiseald: {e}");
        ExitCode::FAILURE
    };
    if let Err(e) = phiseald::hardening::disable_core_dumps() {
        return report(&e);
    }
    let config = match load(&args) {
        Ok(c) => c,
        Err(e) => return report(&e),
    };
    if args.check_config {
        eprintln!("phiseald: configuration ok");
        return ExitCode::SUCCESS;
    }
    if let Err(e) = init_logging(&config) {
        return report(&e);
    }
    if !config.socket_check_parents {
        tracing::warn!(
            socket = %config.socket.display(),
            "socket_check_parents = false: the directories above the socket's own are not \
             checked (whoever can write to them could replace the socket's directory)"
        );
    }
    if !config.limits.require_stream_end {
        tracing::warn!(
            "limits.require_stream_end = false: an EncryptStream whose requests just close is \
             sealed as complete, so a client whose input failed part way gets a truncated \
             plaintext sealed; set it back once every client sends `end`"
        );
    }
    if !config.access_from_env.is_empty() {
        tracing::warn!(
            variables = %config.access_from_env.join(", "),
            "access control (policy, tokens or socket group) set from the environment: it \
             replaces the config file's; profile = \"production\" refuses this"
        );
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => return report(&e),
    };
    let migrate = args.migrate;
    let result = runtime.block_on(async move {
        // Signal handlers are installed before the socket appears, so a SIGTERM sent as soon
        // as the socket exists always drains.
        let signals = Signals::install()?;
        if migrate {
            let version = phiseald::daemon::migrate(&config).await?;
            eprintln!("phiseald: key store schema is at version {version}");
            return Ok(());
        }
        let daemon = Daemon::build(config).await?;
        daemon.run(signals.shutdown()).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "phiseald failed");
            report(&e)
        }
    }
}
