//! [`PostgresStoreConfig`]: where the database is and how to reach it; parsing of the
//! connection string and the TLS client set-up.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rustls::RootCertStore;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use secrecy::{ExposeSecret, SecretString};
use tokio_postgres::config::{Host, SslMode, TargetSessionAttrs};

/// Unacknowledged data older than this ends a connection (unless the URL sets
/// `tcp_user_timeout`).
const TCP_USER_TIMEOUT: Duration = Duration::from_secs(30);
/// tokio-postgres' default idle time before TCP keepalive probes (2 hours).
const DEFAULT_KEEPALIVES_IDLE: Duration = Duration::from_secs(2 * 60 * 60);
/// Idle time before keepalive probes, unless the URL sets `keepalives_idle`.
const KEEPALIVES_IDLE: Duration = Duration::from_secs(30);

use crate::error::PostgresStoreError;

/// Default for [`PostgresStoreConfig::max_connections`].
pub const DEFAULT_MAX_CONNECTIONS: usize = 8;
/// Default for [`PostgresStoreConfig::connect_timeout`].
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Default for [`PostgresStoreConfig::schema`].
pub const DEFAULT_SCHEMA: &str = "phiseal";
/// The longest [`PostgresStoreConfig::schema`]: its change channel, `<schema>_key_changes`,
/// must fit PostgreSQL's 63-byte identifiers.
pub const MAX_SCHEMA_LEN: usize = 48;
/// `application_name` reported to the server unless the connection string sets one.
const APPLICATION_NAME: &str = "phiseal";

/// How the store connects to PostgreSQL. Build it with [`PostgresStoreConfig::new`] and adjust
/// the public fields.
///
/// `Debug` never shows the connection string: it may hold a password.
#[derive(Clone)]
#[non_exhaustive]
pub struct PostgresStoreConfig {
    /// A libpq-style connection string, as a URL
    /// (`postgresql://user:password@host:5432/dbname?application_name=x`) or as `key=value`
    /// pairs (`host=db user=phiseal dbname=keys`). Secret: it may hold a password.
    ///
    /// Its `sslmode` may be left out (recommended) or must agree with [`Self::tls`]:
    /// `disable`/`prefer` with [`TlsMode::Disable`], `require` with [`TlsMode::Require`].
    /// The libpq values `verify-ca`/`verify-full` are not accepted here; [`TlsMode::Require`]
    /// always verifies the certificate chain *and* the host name (libpq's `verify-full`).
    pub database_url: SecretString,
    /// The largest number of connections this store keeps open (the pool size). At least 1.
    pub max_connections: usize,
    /// How long establishing one connection (TCP, TLS and authentication) may take.
    pub connect_timeout: Duration,
    /// Whether connections use TLS.
    pub tls: TlsMode,
    /// The PostgreSQL schema that holds the store's tables (default [`DEFAULT_SCHEMA`]):
    /// 1 to [`MAX_SCHEMA_LEN`] characters of `[a-z0-9_]`, not starting with a digit or `pg_`,
    /// not `information_schema`. Created on the first migration if it does not exist. Every
    /// session runs with `search_path = "<schema>", pg_temp`, whatever the role's own
    /// `search_path` says (PostgreSQL still looks in `pg_catalog` first), so no other schema
    /// can put a table or function in the store's way. Change notifications use the channel
    /// [`crate::changes_channel`] of the schema, so deployments in different schemas of one
    /// database do not see each other's.
    pub schema: String,
    /// The role trusted to own [`Self::schema`] and its objects besides the store's own role:
    /// a least-privilege set-up, where an administrator's role owns the schema and the tables
    /// and the store's role only has `USAGE` on the schema and `SELECT, INSERT, UPDATE` on the
    /// tables (and `SELECT` on `schema_migrations`). `None` (the default): the schema must be
    /// owned by the store's role itself (membership in the owner does not count: a superuser
    /// is a member of every role), or by `pg_database_owner` (as `public` is) in a database
    /// the store's role owns.
    pub schema_owner: Option<String>,
}

impl PostgresStoreConfig {
    /// A configuration for `database_url` with the defaults: [`DEFAULT_MAX_CONNECTIONS`],
    /// [`DEFAULT_CONNECT_TIMEOUT`] and no TLS.
    pub fn new(database_url: impl Into<String>) -> Self {
        Self {
            database_url: SecretString::from(database_url.into()),
            max_connections: DEFAULT_MAX_CONNECTIONS,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            tls: TlsMode::Disable,
            schema: DEFAULT_SCHEMA.to_owned(),
            schema_owner: None,
        }
    }
}

impl fmt::Debug for PostgresStoreConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresStoreConfig")
            .field("database_url", &"[REDACTED]")
            .field("max_connections", &self.max_connections)
            .field("connect_timeout", &self.connect_timeout)
            .field("tls", &self.tls)
            .field("schema", &self.schema)
            .field("schema_owner", &self.schema_owner)
            .finish()
    }
}

/// TLS for the connections to PostgreSQL.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum TlsMode {
    /// Plain TCP (or a Unix socket). Only for a database on the same host or a private,
    /// otherwise protected network.
    Disable,
    /// TLS is required; the server's certificate chain and host name are verified.
    Require {
        /// PEM file with the CA certificate(s) to trust. `None`: the platform's trust store
        /// (`/etc/ssl/certs` and friends, or `SSL_CERT_FILE` / `SSL_CERT_DIR`).
        ca_file: Option<PathBuf>,
    },
}

/// A validated configuration: the driver's config, a printable description of the target and
/// the TLS connector (if any).
pub(crate) struct Parsed {
    /// The checked schema name (see [`PostgresStoreConfig::schema`]).
    pub(crate) schema: String,
    /// See [`PostgresStoreConfig::schema_owner`].
    pub(crate) schema_owner: Option<String>,
    pub(crate) pg: tokio_postgres::Config,
    pub(crate) target: String,
    pub(crate) tls: Option<tokio_postgres_rustls::MakeRustlsConnect>,
}

fn config_error(reason: impl Into<String>) -> PostgresStoreError {
    PostgresStoreError::Config {
        reason: reason.into(),
    }
}

/// Parses and checks `config`. Errors never quote the connection string.
pub(crate) fn parse(config: &PostgresStoreConfig) -> Result<Parsed, PostgresStoreError> {
    if config.max_connections == 0 {
        return Err(config_error("max_connections must be at least 1"));
    }
    if config.connect_timeout.is_zero() {
        return Err(config_error("connect_timeout must be greater than zero"));
    }
    check_schema_name(&config.schema)?;
    if let Some(owner) = &config.schema_owner
        && (owner.is_empty() || owner.len() > 63 || owner.chars().any(char::is_control))
    {
        return Err(config_error(
            "schema_owner must be a role name of 1 to 63 bytes without control characters",
        ));
    }
    let url = config.database_url.expose_secret();
    if credentials_after_authority(url) {
        // The driver takes everything before the first '@' as user and password, wherever
        // it is: `postgresql://db/keys?password=a@b` would parse with the host and most of
        // the query as the user name (printed in every message) and `b` as the host.
        return Err(config_error(
            "database_url has an '@' after its host part (in the database name or a query \
             parameter such as password=…): percent-encode it as %40",
        ));
    }
    let mut pg: tokio_postgres::Config = url.parse().map_err(|e: tokio_postgres::Error| {
        // The parser's messages can quote characters of the string (and so of a
        // password); only the fixed "invalid value for option `name`" form is passed on.
        let detail = std::error::Error::source(&e)
            .map(ToString::to_string)
            .filter(|d| d.starts_with("invalid value for option `"))
            .map(|d| format!(": {d}"))
            .unwrap_or_default();
        config_error(format!(
            "database_url is not a valid PostgreSQL connection URL or key=value string{detail} \
                 (the string itself is not shown: it may contain a password)"
        ))
    })?;
    if pg.get_hosts().is_empty() {
        return Err(config_error(
            "database_url names no host: give a host name, an IP address or a Unix-socket \
             directory",
        ));
    }
    for host in pg.get_hosts() {
        if let Host::Tcp(name) = host
            && (name.contains('@') || name.contains(':'))
            && name.parse::<std::net::IpAddr>().is_err()
        {
            // `postgresql://user:p@ss@host` parses with part of the password as the host.
            return Err(config_error(
                "database_url has an invalid host (is there an unescaped '@' or ':' in the \
                 user name or password? percent-encode them as %40 and %3A)",
            ));
        }
    }
    match (&config.tls, pg.get_ssl_mode()) {
        (TlsMode::Disable, SslMode::Require) => {
            return Err(config_error(
                "database_url says sslmode=require but tls is disabled: set tls to require \
                 (with a CA file or the platform's trust store) or remove sslmode from the URL",
            ));
        }
        (TlsMode::Require { .. }, SslMode::Disable) => {
            return Err(config_error(
                "database_url says sslmode=disable but tls is set to require: remove sslmode \
                 from the URL",
            ));
        }
        _ => {}
    }
    pg.connect_timeout(config.connect_timeout);
    // The store writes, and its reads must not lag behind the primary (a shred on the
    // primary must count at once): only a read-write session will do, never a hot standby.
    pg.target_session_attrs(TargetSessionAttrs::ReadWrite);
    // Notice a peer that vanished (a failover without a reset) in seconds, not hours.
    if pg.get_tcp_user_timeout().is_none() {
        pg.tcp_user_timeout(TCP_USER_TIMEOUT);
    }
    if pg.get_keepalives_idle() == DEFAULT_KEEPALIVES_IDLE {
        pg.keepalives_idle(KEEPALIVES_IDLE);
    }
    if pg.get_application_name().is_none() {
        pg.application_name(APPLICATION_NAME);
    }
    let tls = match &config.tls {
        TlsMode::Disable => {
            pg.ssl_mode(SslMode::Disable);
            None
        }
        TlsMode::Require { ca_file } => {
            pg.ssl_mode(SslMode::Require);
            Some(tls_connector(ca_file.as_ref())?)
        }
    };
    let target = describe(&pg);
    Ok(Parsed {
        schema: config.schema.clone(),
        schema_owner: config.schema_owner.clone(),
        pg,
        target,
        tls,
    })
}

/// Checks a [`PostgresStoreConfig::schema`] value: refuses a name that would need quoting
/// rules to be safe, or that names a system schema.
pub fn check_schema_name(schema: &str) -> Result<(), PostgresStoreError> {
    let well_formed = (1..=MAX_SCHEMA_LEN).contains(&schema.len())
        && schema
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        && !schema.starts_with(|c: char| c.is_ascii_digit());
    if !well_formed {
        return Err(config_error(format!(
            "schema {schema:?} is not 1 to {MAX_SCHEMA_LEN} characters of a-z, 0-9 and _ \
             (not starting with a digit)"
        )));
    }
    if schema.starts_with("pg_") || schema == "information_schema" {
        return Err(config_error(format!(
            "schema {schema:?} is reserved for PostgreSQL's system catalogs: choose another \
             (the default is {DEFAULT_SCHEMA:?})"
        )));
    }
    Ok(())
}

/// Whether `url` (the URL form) has its first '@' after the end of its authority (the first
/// '/' or '?' after the scheme): the driver would take the text before it as credentials.
fn credentials_after_authority(url: &str) -> bool {
    let Some(rest) = ["postgres://", "postgresql://"]
        .iter()
        .find_map(|prefix| url.strip_prefix(prefix))
    else {
        return false;
    };
    match (rest.find('@'), rest.find(['/', '?'])) {
        (Some(at), Some(end)) => at > end,
        _ => false,
    }
}

/// Whether a `database_url` may carry a password: as the PostgreSQL client reads it (URL user
/// info, a `password` query parameter, a `password=` key-value pair, in any of their
/// spellings), or a `:` before the URL's last `@` (a password holding `/`, which the client
/// reads differently and this store refuses). A value that does not parse counts as carrying
/// one: a caller deciding how carefully to keep the value must not be told it is harmless
/// when unsure.
pub fn database_url_has_password(database_url: &str) -> bool {
    let by_client = database_url
        .parse::<tokio_postgres::Config>()
        .map_or(true, |pg| pg.get_password().is_some());
    let user_info_with_colon = database_url
        .split_once("://")
        .and_then(|(_, rest)| rest.rsplit_once('@'))
        .is_some_and(|(user_info, _)| user_info.contains(':'));
    by_client || user_info_with_colon
}

/// Whether every connection `config` makes stays on this machine: each host is a Unix-socket
/// directory, `localhost` or a loopback address (and so is each `hostaddr`, if given). Plain
/// connections ([`TlsMode::Disable`]) to anything else cross a network, where a key-store
/// answer could be read or replayed (an old tenant record brought back after a shred).
pub fn connects_only_to_this_host(
    config: &PostgresStoreConfig,
) -> Result<bool, PostgresStoreError> {
    let pg = parse(config)?.pg;
    let local_ip = |ip: &std::net::IpAddr| ip.is_loopback();
    let hosts_local = pg.get_hosts().iter().all(|host| match host {
        Host::Unix(_) => true,
        Host::Tcp(name) => {
            name.eq_ignore_ascii_case("localhost")
                || name
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| local_ip(&ip))
        }
    });
    Ok(hosts_local && pg.get_hostaddrs().iter().all(local_ip))
}

/// The Unix-socket directories `config` connects through (none for TCP hosts). A directory
/// another user can write lets that user put a socket of their own there while PostgreSQL is
/// down, and answer in its place: the caller decides whether to accept it.
pub fn unix_socket_dirs(config: &PostgresStoreConfig) -> Result<Vec<PathBuf>, PostgresStoreError> {
    Ok(parse(config)?
        .pg
        .get_hosts()
        .iter()
        .filter_map(|host| match host {
            Host::Unix(dir) => Some(dir.clone()),
            Host::Tcp(_) => None,
        })
        .collect())
}

/// `user@host:port/dbname` (several hosts separated by commas), for messages and `Debug`.
/// Never contains the password.
pub(crate) fn describe(pg: &tokio_postgres::Config) -> String {
    let ports = pg.get_ports();
    let hosts: Vec<String> = pg
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, host)| {
            let port = ports
                .get(i)
                .or_else(|| ports.first())
                .copied()
                .unwrap_or(5432);
            match host {
                Host::Tcp(name) if name.contains(':') => format!("[{name}]:{port}"),
                Host::Tcp(name) => format!("{name}:{port}"),
                Host::Unix(dir) => format!("{}/.s.PGSQL.{port}", dir.display()),
            }
        })
        .collect();
    let user = pg.get_user().unwrap_or("(default user)");
    let dbname = pg.get_dbname().unwrap_or(user);
    format!("{user}@{}/{dbname}", hosts.join(","))
}

fn tls_error(reason: impl Into<String>) -> PostgresStoreError {
    PostgresStoreError::Tls {
        reason: reason.into(),
    }
}

fn tls_connector(
    ca_file: Option<&PathBuf>,
) -> Result<tokio_postgres_rustls::MakeRustlsConnect, PostgresStoreError> {
    let mut roots = RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(|e| {
                    tls_error(format!("could not read ca_file '{}': {e}", path.display()))
                })?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| {
                    tls_error(format!(
                        "ca_file '{}' is not a valid PEM file: {e}",
                        path.display()
                    ))
                })?;
            if certs.is_empty() {
                return Err(tls_error(format!(
                    "ca_file '{}' contains no certificate (expected PEM 'BEGIN CERTIFICATE' \
                     blocks)",
                    path.display()
                )));
            }
            for cert in certs {
                roots.add(cert).map_err(|e| {
                    tls_error(format!(
                        "ca_file '{}' holds a certificate that cannot be a trust anchor: {e}",
                        path.display()
                    ))
                })?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            let (added, _ignored) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                let errors: Vec<String> = found.errors.iter().map(ToString::to_string).collect();
                return Err(tls_error(format!(
                    "no trusted CA certificates found in the platform's trust store{}: set \
                     ca_file to the PEM file of the CA that signed the server's certificate",
                    if errors.is_empty() {
                        String::new()
                    } else {
                        format!(" ({})", errors.join("; "))
                    }
                )));
            }
        }
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_error(format!("the TLS provider cannot be used: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(client))
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::indexing_slicing,
        clippy::panic
    )]

    use super::*;

    const PASSWORD: &str = "Pa55-w0rd-NEVER-SHOWN";

    fn parse_url(url: &str) -> Result<Parsed, PostgresStoreError> {
        parse(&PostgresStoreConfig::new(url))
    }

    #[test]
    fn debug_redacts_the_url() {
        let config = PostgresStoreConfig::new(format!("postgresql://u:{PASSWORD}@db/keys"));
        let shown = format!("{config:?}");
        assert!(!shown.contains(PASSWORD), "{shown}");
        assert!(shown.contains("REDACTED"), "{shown}");
    }

    #[test]
    fn target_names_user_host_port_and_database() {
        let parsed = parse_url(&format!(
            "postgresql://app:{PASSWORD}@db.internal:6543/keys"
        ))
        .unwrap();
        assert_eq!(parsed.target, "app@db.internal:6543/keys");
        let parsed = parse_url("host=10.0.0.5 user=app dbname=keys").unwrap();
        assert_eq!(parsed.target, "app@10.0.0.5:5432/keys");
        let parsed = parse_url("postgresql://app@[::1]:5433/keys").unwrap();
        assert_eq!(parsed.target, "app@[::1]:5433/keys");
        let parsed = parse_url("postgresql://app@h1:1,h2:2/keys").unwrap();
        assert_eq!(parsed.target, "app@h1:1,h2:2/keys");
        let parsed = parse_url("host=/run/postgresql user=app").unwrap();
        assert_eq!(parsed.target, "app@/run/postgresql/.s.PGSQL.5432/app");
        assert_eq!(parsed.pg.get_application_name(), Some("phiseal"));
        let parsed = parse_url("postgresql://app@h/keys?application_name=mine").unwrap();
        assert_eq!(parsed.pg.get_application_name(), Some("mine"));
    }

    #[test]
    fn sessions_are_read_write_and_dead_peers_are_noticed() {
        let parsed = parse_url("postgresql://app@h1:1,h2:2/keys").unwrap();
        assert_eq!(
            parsed.pg.get_target_session_attrs(),
            TargetSessionAttrs::ReadWrite
        );
        assert_eq!(parsed.pg.get_tcp_user_timeout(), Some(&TCP_USER_TIMEOUT));
        assert_eq!(parsed.pg.get_keepalives_idle(), KEEPALIVES_IDLE);
        // Even a URL that asks for any session gets a read-write one; its own TCP settings
        // are kept.
        let parsed = parse_url(
            "postgresql://app@h/keys?target_session_attrs=any&tcp_user_timeout=5&keepalives_idle=7",
        )
        .unwrap();
        assert_eq!(
            parsed.pg.get_target_session_attrs(),
            TargetSessionAttrs::ReadWrite
        );
        assert_eq!(
            parsed.pg.get_tcp_user_timeout(),
            Some(&Duration::from_secs(5))
        );
        assert_eq!(parsed.pg.get_keepalives_idle(), Duration::from_secs(7));
    }

    #[test]
    fn bad_urls_are_refused_without_quoting_them() {
        for url in [
            format!("postgresql://u:{PASSWORD}@db/keys?sslmode=verify-full"),
            format!("postgresql://u:{PASSWORD}@db:notaport/keys"),
            format!("postgresql://u:{PASSWORD}@db/keys?bogus{PASSWORD}=1"),
            format!("host=db password='{PASSWORD}"),
            format!("postgresql://u:{PASSWORD}@@db/keys"),
            format!("postgresql://u:{PASSWORD}@/keys"),
            // An unescaped '@' in the password.
            "postgresql://u:Pa55@w0rd-NEVER-SHOWN@db/keys".to_owned(),
            "postgresql://u:Pa55@w0rd:5432@NEVER-SHOWN/keys".to_owned(),
            // An '@' in a password given as a query parameter (no credentials part).
            "postgresql://db.internal/keys?user=u&password=Pa55@w0rdNEVER-SHOWN".to_owned(),
            "postgresql://db.internal:5432/keys?password=Pa55@NEVER-SHOWN".to_owned(),
            "postgresql://db.internal?password=Pa55@NEVER-SHOWN".to_owned(),
        ] {
            let err = match parse_url(&url) {
                Ok(_) => panic!("accepted {url}"),
                Err(e) => e,
            };
            let text = format!("{err} {err:?}");
            assert!(matches!(err, PostgresStoreError::Config { .. }), "{text}");
            for piece in ["Pa55", "w0rd", "NEVER-SHOWN"] {
                assert!(!text.contains(piece), "{url}: {text}");
            }
        }
        let err = parse_url("postgresql://u@db/keys?sslmode=verify-full")
            .err()
            .unwrap();
        assert!(err.to_string().contains("`sslmode`"), "{err}");
    }

    #[test]
    fn an_at_sign_after_the_credentials_part_is_kept_as_text() {
        let parsed = parse_url("postgresql://u:pw@db/keys?application_name=a@b").unwrap();
        assert_eq!(parsed.pg.get_user(), Some("u"));
        assert_eq!(parsed.pg.get_application_name(), Some("a@b"));
        assert_eq!(parsed.target, "u@db:5432/keys");
    }

    #[test]
    fn only_unix_sockets_localhost_and_loopback_addresses_are_this_host() {
        let local = |url: &str| connects_only_to_this_host(&PostgresStoreConfig::new(url));
        for url in [
            "postgresql://u@localhost/keys",
            "postgresql://u@127.0.0.1:5433/keys",
            "postgresql://u@[::1]/keys",
            "postgresql://u@%2Fvar%2Frun%2Fpostgresql/keys",
            "host=/var/run/postgresql user=u dbname=keys",
            "postgresql://u@localhost,127.0.0.2/keys",
            "host=localhost hostaddr=127.0.0.1 user=u",
        ] {
            assert!(local(url).unwrap(), "{url}");
        }
        for url in [
            "postgresql://u@db.internal/keys",
            "postgresql://u@10.0.0.7/keys",
            "postgresql://u@localhost,db.internal/keys",
            "host=localhost hostaddr=10.0.0.7 user=u",
            "postgresql://u@localhost.example.com/keys",
        ] {
            assert!(!local(url).unwrap(), "{url}");
        }
        assert!(local("postgresql://u@db:notaport/keys").is_err());
    }

    #[test]
    fn sslmode_must_agree_with_tls() {
        let err = parse_url("postgresql://u@db/keys?sslmode=require")
            .err()
            .unwrap();
        assert!(err.to_string().contains("sslmode=require"), "{err}");
        let mut config = PostgresStoreConfig::new("postgresql://u@db/keys?sslmode=disable");
        config.tls = TlsMode::Require { ca_file: None };
        let err = parse(&config).err().unwrap();
        assert!(err.to_string().contains("sslmode=disable"), "{err}");
        // `prefer` (the driver's default) is overridden by the explicit setting.
        let parsed = parse_url("postgresql://u@db/keys?sslmode=prefer").unwrap();
        assert_eq!(parsed.pg.get_ssl_mode(), SslMode::Disable);
        assert!(parsed.tls.is_none());
    }

    #[test]
    fn limits_are_checked() {
        let mut config = PostgresStoreConfig::new("postgresql://u@db/keys");
        config.max_connections = 0;
        assert!(parse(&config).is_err());
        let mut config = PostgresStoreConfig::new("postgresql://u@db/keys");
        config.connect_timeout = Duration::ZERO;
        assert!(parse(&config).is_err());
    }

    #[test]
    fn ca_file_problems_are_tls_errors() {
        let dir = std::env::temp_dir().join(format!("phiseal-pg-ca-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let missing = dir.join("missing.pem");
        for (path, needle) in [
            (&empty, "contains no certificate"),
            (&missing, "could not read"),
        ] {
            let mut config = PostgresStoreConfig::new("postgresql://u@db/keys");
            config.tls = TlsMode::Require {
                ca_file: Some(path.clone()),
            };
            let err = parse(&config).err().unwrap();
            assert!(matches!(err, PostgresStoreError::Tls { .. }), "{err:?}");
            assert!(err.to_string().contains(needle), "{err}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
