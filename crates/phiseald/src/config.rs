//! The daemon's configuration: one TOML file plus `PHISEALD_*` environment overrides, read
//! with figment and validated as a whole before anything starts. Every error names the key
//! and the problem. The fully commented example is `crates/phiseald/phiseald.example.toml`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use phiseal_store_postgres::{PostgresStoreConfig, TlsMode};
use serde::{Deserialize, Serialize};

use crate::error::DaemonError;
use crate::policy::Rule;

/// Where the daemon listens when neither the file nor `--socket` says otherwise.
pub const DEFAULT_SOCKET: &str = "/run/phiseal/phiseald.sock";

/// The default of `socket_check_parents`, `kms.pkcs11.check_module` and
/// `key_store.check_ca_file`.
fn checked() -> bool {
    true
}

/// The whole configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The Unix socket to listen on (its directory is created 0750 and must not be writable
    /// by group or others).
    pub socket: PathBuf,
    /// Group that may connect to the socket (name or numeric gid); default: the daemon's own
    /// primary group.
    #[serde(default, deserialize_with = "name_or_number")]
    pub socket_group: Option<String>,
    /// Whether every directory above the socket's own must be owned by root or the daemon and
    /// not writable by group or others unless sticky (default). `false` only where those
    /// directories are shared with trusted parties alone (a Kubernetes `emptyDir`).
    #[serde(default = "checked")]
    pub socket_check_parents: bool,
    /// `production` (the default in a config file: refuses the local development KMS and the
    /// other development-only parts) or `development` (the embedded default without a file).
    #[serde(default)]
    pub profile: ProfileName,
    /// The embedded backends: local KMS, SQLite key store, file audit log in one directory.
    pub data_dir: PathBuf,
    /// Audit log durability.
    #[serde(default)]
    pub audit: AuditConfig,
    /// Where the root key is (the KMS backend).
    #[serde(default)]
    pub kms: KmsConfig,
    /// Where wrapped tenant keys are stored.
    #[serde(default)]
    pub key_store: KeyStoreConfig,
    /// Key cache.
    #[serde(default)]
    pub cache: CacheConfig,
    /// Request limits.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// Prometheus metrics listener.
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// Logging.
    #[serde(default)]
    pub log: LogConfig,
    /// Scheduled rotation.
    #[serde(default)]
    pub rotation: RotationConfig,
    /// Service tokens, stored hashed.
    #[serde(default)]
    pub tokens: Vec<TokenConfig>,
    /// Who may do what. Empty means nobody may do anything (default deny).
    #[serde(default)]
    pub policy: Vec<Rule>,
    /// The access-control keys (`policy`, `tokens`, `socket_group`, `socket_check_parents`)
    /// that environment variables set (logged as a warning at start; refused under
    /// `profile = "production"`).
    #[serde(skip)]
    pub access_from_env: Vec<String>,
}

/// Configuration keys that decide who may do what: set from the environment, they replace
/// the (root-owned) file's, so they are reported, and refused in production.
const ACCESS_KEYS: [&str; 4] = ["policy", "tokens", "socket_group", "socket_check_parents"];

/// The setting a `PHISEALD_*` variable names (the part after the prefix, which is matched
/// without case), or `None` for another variable.
fn setting_of(variable: &str) -> Option<&str> {
    variable
        .get(..9)
        .filter(|p| p.eq_ignore_ascii_case("PHISEALD_"))
        .and_then(|_| variable.get(9..))
}

/// The access-control keys (or keys inside one) that `PHISEALD_*` variables set, as the
/// environment provider reads them — it trims names and ignores case, so that
/// `" PHISEALD_POLICY"` sets `policy` too —, named as their canonical variables.
fn access_variables(env: &Env) -> Vec<String> {
    env.iter()
        .map(|(key, _)| key.as_str().to_ascii_lowercase())
        .filter(|key| {
            ACCESS_KEYS.iter().any(|k| {
                key.strip_prefix(k)
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with('.'))
            })
        })
        .map(|key| format!("PHISEALD_{}", key.to_ascii_uppercase().replace('.', "__")))
        .collect()
}

/// A group given as a name or a number (`"phiseal-clients"`, `1234`, or `"1234"`).
fn name_or_number<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum NameOrNumber {
        Name(String),
        Number(u32),
    }
    Ok(Option::<NameOrNumber>::deserialize(d)?.map(|v| match v {
        NameOrNumber::Name(name) => name,
        NameOrNumber::Number(gid) => gid.to_string(),
    }))
}

/// Profile names as written in the file.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProfileName {
    /// Development: the local KMS is allowed. Must be asked for in a config file.
    Development,
    /// Production (the default of a config file): development-only parts are refused.
    #[default]
    Production,
}

/// `[audit]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuditConfig {
    /// The audit log file; default `DATA_DIR/audit.log`. Daemons sharing a key store each
    /// need their own (one writer per file).
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// `interval` (default: written before return, fsynced within `sync_interval`) or
    /// `strict` (fsynced before return, group commit).
    pub durability: DurabilityName,
    /// For `interval`: the longest time between a write and its fsync.
    #[serde(with = "humantime_serde")]
    pub sync_interval: Duration,
    /// Close the active log file as a segment and continue in a new one at this size, in
    /// bytes; 0: never (one file).
    pub rollover_bytes: u64,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            path: None,
            durability: DurabilityName::Interval,
            sync_interval: Duration::from_millis(200),
            rollover_bytes: DEFAULT_AUDIT_ROLLOVER_BYTES,
        }
    }
}

/// `audit.rollover_bytes` by default: 1 GiB.
pub const DEFAULT_AUDIT_ROLLOVER_BYTES: u64 = 1 << 30;

/// Audit durability names as written in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DurabilityName {
    /// Written before return, fsynced within `sync_interval`.
    Interval,
    /// Fsynced before return (group commit).
    Strict,
}

/// `[kms]`: the KMS backend holding the root key. `kind` selects it; its settings are in the
/// sub-table of the same name (`[kms.aws]`, `[kms.azure]`, `[kms.pkcs11]`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KmsConfig {
    /// `local` (default: `DATA_DIR/root.key`, development only), `aws`, `azure` or `pkcs11`.
    pub kind: KmsKind,
    /// For `aws`.
    pub aws: Option<AwsKmsSection>,
    /// For `azure`.
    pub azure: Option<AzureKmsSection>,
    /// For `pkcs11`.
    pub pkcs11: Option<Pkcs11KmsSection>,
    /// During a root-key migration: the backend the stored keys are moved away from. It only
    /// unwraps; new wraps use this section's backend. Remove it once `phiseal root rotate`
    /// reports the old root key is no longer referenced.
    pub previous: Option<Box<KmsConfig>>,
}

/// KMS kinds as written in the file.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KmsKind {
    /// The local development KMS (`DATA_DIR/root.key`); refused by the production profile.
    #[default]
    Local,
    /// AWS KMS.
    Aws,
    /// Azure Key Vault (or Managed HSM).
    Azure,
    /// A PKCS#11 HSM.
    Pkcs11,
}

impl KmsKind {
    /// The name as written in the file.
    pub fn as_str(self) -> &'static str {
        match self {
            KmsKind::Local => "local",
            KmsKind::Aws => "aws",
            KmsKind::Azure => "azure",
            KmsKind::Pkcs11 => "pkcs11",
        }
    }
}

/// `[kms.aws]`. Credentials come from the standard AWS chain (environment, shared files,
/// web identity / IRSA, ECS and EC2 instance metadata), never from this file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AwsKmsSection {
    /// The KMS key: key id, key ARN, alias name (`alias/…`) or alias ARN.
    pub key_id: String,
    /// The key's region, e.g. `eu-central-1`.
    pub region: String,
    /// A custom endpoint (VPC or FIPS endpoint); default: the region's standard endpoint.
    /// https only (plain http is refused unless the host is a loopback address).
    #[serde(default)]
    pub endpoint_url: Option<String>,
}

/// `[kms.azure]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AzureKmsSection {
    /// The vault (or Managed HSM) URL, e.g. `https://contoso.vault.azure.net`.
    pub vault_url: String,
    /// The key's name.
    pub key_name: String,
    /// `RSA-OAEP-256` (default; RSA keys) or `A256KW` (Managed HSM `oct-HSM` keys).
    #[serde(default)]
    pub algorithm: AzureAlgorithmName,
    /// `managed-identity` (default), `workload-identity`, `client-secret`, `azure-cli` or
    /// `developer-tools`.
    #[serde(default)]
    pub credential: AzureCredentialName,
    /// For `client-secret`: the Entra ID tenant.
    #[serde(default)]
    pub tenant_id: Option<String>,
    /// For `client-secret`, or a user-assigned managed identity: the client id.
    #[serde(default)]
    pub client_id: Option<String>,
    /// For `client-secret`: the secret. Prefer the environment variable
    /// `PHISEALD_KMS__AZURE__CLIENT_SECRET` to a file others can read.
    #[serde(default)]
    pub client_secret: Option<SecretText>,
}

/// Key Vault wrap algorithms as written in the file.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum AzureAlgorithmName {
    /// RSA-OAEP with SHA-256, for RSA keys (every vault and Managed HSM).
    #[default]
    #[serde(rename = "RSA-OAEP-256")]
    RsaOaep256,
    /// AES key wrap, for Managed HSM `oct-HSM` keys.
    #[serde(rename = "A256KW")]
    A256Kw,
}

/// Microsoft Entra ID credentials as written in the file.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AzureCredentialName {
    /// The host's managed identity (`client_id` selects a user-assigned one).
    #[default]
    ManagedIdentity,
    /// Entra Workload ID on Kubernetes (`AZURE_TENANT_ID`, `AZURE_CLIENT_ID`,
    /// `AZURE_FEDERATED_TOKEN_FILE`, or `tenant_id` / `client_id` here).
    WorkloadIdentity,
    /// A service principal's secret (`tenant_id`, `client_id`, `client_secret`).
    ClientSecret,
    /// The Azure CLI's signed-in account (development; refused by the production profile).
    AzureCli,
    /// The Azure CLI, then the Azure Developer CLI (development; refused by the production
    /// profile).
    DeveloperTools,
}

/// `[kms.pkcs11]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pkcs11KmsSection {
    /// The PKCS#11 module (shared library) of the HSM vendor.
    pub module: PathBuf,
    /// The token's label.
    pub token_label: String,
    /// The label of the AES-256 root key on the token (new wraps use it).
    pub key_label: String,
    /// Labels of earlier root keys that still unwrap, until `phiseal root rotate` has
    /// re-wrapped everything under `key_label`.
    #[serde(default)]
    pub previous_key_labels: Vec<String>,
    /// The user PIN. Prefer the environment variable `PHISEALD_KMS__PKCS11__PIN`.
    pub pin: SecretText,
    /// Refuse a module that another user could replace (its file or a directory on its
    /// path; `Config::check_trusted_files`). `false` trusts them, for a platform that makes
    /// the module's directory group-writable (an init container's `emptyDir`).
    #[serde(default = "checked")]
    pub check_module: bool,
}

impl KmsConfig {
    /// The selected kind's section is present and the others are absent; required values
    /// are not blank. The message names the key.
    pub fn validate(&self) -> Result<(), String> {
        let present = [
            (KmsKind::Aws, self.aws.is_some()),
            (KmsKind::Azure, self.azure.is_some()),
            (KmsKind::Pkcs11, self.pkcs11.is_some()),
        ];
        for (kind, is_present) in present {
            if kind == self.kind && !is_present {
                return Err(format!(
                    "kms.{0}: required with kms.kind = \"{0}\"",
                    kind.as_str()
                ));
            }
            if kind != self.kind && is_present {
                return Err(format!(
                    "kms.{}: set, but kms.kind is \"{}\" (remove it or change kms.kind)",
                    kind.as_str(),
                    self.kind.as_str()
                ));
            }
        }
        let blank = |key: &str, value: &str| {
            if value.trim().is_empty() {
                Err(format!("{key}: must not be empty"))
            } else {
                Ok(())
            }
        };
        if let Some(aws) = &self.aws {
            blank("kms.aws.key_id", &aws.key_id)?;
            blank("kms.aws.region", &aws.region)?;
        }
        if let Some(azure) = &self.azure {
            blank("kms.azure.vault_url", &azure.vault_url)?;
            blank("kms.azure.key_name", &azure.key_name)?;
            let secret = azure.client_secret.is_some();
            if (azure.credential == AzureCredentialName::ClientSecret)
                != (secret && azure.tenant_id.is_some() && azure.client_id.is_some())
            {
                return Err(if secret {
                    "kms.azure.client_secret: needs credential = \"client-secret\" with \
                     tenant_id and client_id"
                        .into()
                } else {
                    "kms.azure.credential: \"client-secret\" needs tenant_id, client_id and \
                     client_secret (PHISEALD_KMS__AZURE__CLIENT_SECRET)"
                        .into()
                });
            }
        }
        if let Some(p) = &self.pkcs11 {
            // A bare name would be looked up by the dynamic loader's search path, which the
            // checks on the module's directories cannot cover.
            if !p.module.is_absolute() {
                return Err("kms.pkcs11.module: must be an absolute path".into());
            }
            blank("kms.pkcs11.token_label", &p.token_label)?;
            blank("kms.pkcs11.key_label", &p.key_label)?;
            blank("kms.pkcs11.pin", &p.pin.0)?;
        }
        if let Some(previous) = &self.previous {
            if previous.previous.is_some() {
                return Err(
                    "kms.previous.previous: one migration at a time (finish the running one \
                     with `phiseal root rotate` first)"
                        .into(),
                );
            }
            previous
                .validate()
                .map_err(|problem| problem.replace("kms.", "kms.previous."))?;
            // One token, one user PIN: logged in with the current PIN, the token never checks
            // the previous one, so a wrong one would surface only once the current key is gone.
            if let (Some(current), Some(earlier)) = (&self.pkcs11, &previous.pkcs11) {
                let same_token = same_module(&current.module, &earlier.module)
                    && current.token_label == earlier.token_label;
                if same_token && current.pin.0 != earlier.pin.0 {
                    return Err(
                        "kms.previous.pkcs11.pin: differs from kms.pkcs11.pin for the same token \
                         (module and token_label): a token has one user PIN, and the token \
                         would never check this one while the current key is in use; use the \
                         same PIN (or list the old key in kms.pkcs11.previous_key_labels)"
                            .into(),
                    );
                }
                distinct_pkcs11_root_keys(
                    ("kms.pkcs11", current),
                    ("kms.previous.pkcs11", earlier),
                )?;
            }
        }
        Ok(())
    }

    /// Its PKCS#11 sections (current, then previous) with their names in the file.
    fn pkcs11_sections(&self) -> impl Iterator<Item = (&'static str, &Pkcs11KmsSection)> {
        let current = self.pkcs11.as_ref().map(|p| ("kms.pkcs11", p));
        let previous = self
            .previous
            .as_ref()
            .and_then(|p| p.pkcs11.as_ref())
            .map(|p| ("kms.previous.pkcs11", p));
        current.into_iter().chain(previous)
    }
}

impl Pkcs11KmsSection {
    /// The references (`pkcs11:<token label>/<key label>`) of the root keys it unwraps.
    fn root_key_refs(&self) -> impl Iterator<Item = String> + '_ {
        std::iter::once(&self.key_label)
            .chain(&self.previous_key_labels)
            .map(|label| phiseal_kms_pkcs11::root_key_ref_of(&self.token_label, label))
    }
}

/// Refuses two PKCS#11 backends on different modules whose root keys carry the same
/// reference. A wrapped key names its root key only by token and key label, and the first
/// backend that claims a reference unwraps it: during a migration from one HSM to another
/// with alike labels, every old key would go to the new HSM and fail, `root rotate` would
/// count them as already under the new key, and retiring the old HSM would lose them.
/// (On the same module, one token label is one token, and the reference one key.)
fn distinct_pkcs11_root_keys(
    (a_name, a): (&str, &Pkcs11KmsSection),
    (b_name, b): (&str, &Pkcs11KmsSection),
) -> Result<(), String> {
    if same_module(&a.module, &b.module) {
        return Ok(());
    }
    match a
        .root_key_refs()
        .find(|r| b.root_key_refs().any(|other| other == *r))
    {
        None => Ok(()),
        Some(shared) => Err(format!(
            "{b_name}: a root key of {a_name} (on another module) has the same reference \
             '{shared}': wrapped keys name their root key only by token and key label, so \
             the two could not be told apart (old keys would be sent to the new HSM); give \
             the new HSM's token or key another label"
        )),
    }
}

/// Whether another local user could have made, or could put a socket in, `dir`: as written
/// or after resolving its symlinks, it or a directory above it is writable by every user
/// (such as `/tmp`: anyone may create the directory there before PostgreSQL does, or replace
/// a symlink); for a directory that does not exist (yet), the nearest one that does decides.
fn open_to_every_user(dir: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let open =
        |path: &Path| std::fs::metadata(path).is_ok_and(|m| m.permissions().mode() & 0o002 != 0);
    // Every spelling the path takes on the way: as written, then with each symlink replaced
    // by its target (a dangling one included: its target may be created by anyone).
    let mut paths = vec![dir.to_owned()];
    let mut next = dir.to_owned();
    for _ in 0..40 {
        let Some(link) = next
            .ancestors()
            .find(|a| std::fs::symlink_metadata(a).is_ok_and(|m| m.file_type().is_symlink()))
            .map(Path::to_owned)
        else {
            break;
        };
        let Ok(target) = std::fs::read_link(&link) else {
            break;
        };
        let base = link.parent().map(Path::to_owned).unwrap_or_default();
        let rest = next
            .strip_prefix(&link)
            .map(Path::to_owned)
            .unwrap_or_default();
        next = base.join(target).join(rest);
        paths.push(next.clone());
    }
    paths.iter().any(|path| {
        path.ancestors()
            .filter(|a| std::fs::symlink_metadata(a).is_ok())
            .any(open)
    })
}

/// Whether two module paths name one library (after resolving symlinks, as the loader does;
/// as written if a path cannot be resolved).
fn same_module(a: &Path, b: &Path) -> bool {
    let resolved = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_owned());
    a == b || resolved(a) == resolved(b)
}

/// [`distinct_pkcs11_root_keys`] across the KMS configurations of a migration's target and
/// source (`phiseal root migrate --to`), which one keyring uses together.
pub fn distinct_root_keys_across(target: &KmsConfig, source: &KmsConfig) -> Result<(), String> {
    for (target_name, t) in target.pkcs11_sections() {
        for (source_name, s) in source.pkcs11_sections() {
            distinct_pkcs11_root_keys(
                (&format!("source {source_name}"), s),
                (&format!("target {target_name}"), t),
            )?;
        }
    }
    Ok(())
}

/// `[key_store]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KeyStoreConfig {
    /// `sqlite` (default: `DATA_DIR/keys.db`, one host) or `postgres` (a database shared by
    /// many daemons).
    pub kind: KeyStoreKind,
    /// For `postgres`: the connection string (URL or `key=value` pairs). It may hold a
    /// password: prefer the environment variable `PHISEALD_KEY_STORE__DATABASE_URL` to a
    /// config file others can read.
    pub database_url: Option<SecretText>,
    /// For `postgres`: the pool size.
    pub max_connections: usize,
    /// For `postgres`: how long connecting (TCP, TLS, authentication) may take.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// For `postgres`: `disable` or `require` (verifies the certificate chain and host name).
    pub tls: DatabaseTls,
    /// For `postgres` with `tls = "require"`: the CA file to trust (default: the platform's
    /// trust store).
    pub ca_file: Option<PathBuf>,
    /// Refuse a `ca_file` that another user could replace (as `kms.pkcs11.check_module`).
    pub check_ca_file: bool,
    /// For `postgres` with `tls = "disable"` under `profile = "production"`: allow a database
    /// on another host (default false: only a Unix socket, `localhost` or a loopback address).
    /// Set it only when something else encrypts and authenticates the path (a service mesh's
    /// mutual TLS): without, the key store's answers could be read or replayed on the way.
    pub allow_plaintext_network: bool,
    /// For `postgres`: the PostgreSQL schema holding the tables (default `phiseal`; created
    /// by the first migration if missing). Every session's `search_path` is set to it alone.
    pub schema: Option<String>,
    /// For `postgres`: the role trusted to own the schema and its tables when it is not the
    /// daemon's database role itself: a least-privilege set-up.
    pub schema_owner: Option<String>,
}

impl KeyStoreConfig {
    /// The PostgreSQL store's settings (kind `postgres`).
    pub(crate) fn postgres(&self) -> Result<PostgresStoreConfig, DaemonError> {
        let url = self.database_url.as_ref().ok_or_else(|| {
            DaemonError::Config("key_store.database_url: required with kind = \"postgres\"".into())
        })?;
        let mut pg = PostgresStoreConfig::new(url.0.clone());
        pg.max_connections = self.max_connections;
        pg.connect_timeout = self.connect_timeout;
        if let Some(schema) = &self.schema {
            pg.schema.clone_from(schema);
        }
        pg.schema_owner.clone_from(&self.schema_owner);
        pg.tls = match self.tls {
            DatabaseTls::Disable => TlsMode::Disable,
            DatabaseTls::Require => TlsMode::Require {
                ca_file: self.ca_file.clone(),
            },
        };
        Ok(pg)
    }
}

impl Default for KeyStoreConfig {
    fn default() -> Self {
        Self {
            kind: KeyStoreKind::Sqlite,
            database_url: None,
            max_connections: 16,
            connect_timeout: Duration::from_secs(5),
            tls: DatabaseTls::Disable,
            ca_file: None,
            allow_plaintext_network: false,
            check_ca_file: true,
            schema: None,
            schema_owner: None,
        }
    }
}

/// Key store kinds as written in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyStoreKind {
    /// `DATA_DIR/keys.db`.
    Sqlite,
    /// PostgreSQL, shared by many daemons.
    Postgres,
}

/// Database TLS modes as written in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DatabaseTls {
    /// Plain TCP: a database on the same host or a protected network only.
    Disable,
    /// TLS with the certificate chain and host name verified.
    Require,
}

/// A configuration value that is a secret: never shown by `Debug`, wiped when dropped (the
/// configuration parser's own intermediate copies are not).
#[derive(Clone, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SecretText(pub String);

impl Drop for SecretText {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.0);
    }
}

impl std::fmt::Debug for SecretText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[redacted]")
    }
}

/// The longest `limits.request_timeout` accepted (also a stream's idle limit and, with a few
/// seconds' grace, the drain time on SIGTERM).
const MAX_REQUEST_TIMEOUT: Duration = Duration::from_secs(3600);

/// The largest `cache.max_stale` accepted: a day-long KMS outage is an incident to resolve,
/// not a mode to run in.
const MAX_STALE_LIMIT: Duration = Duration::from_secs(24 * 3600);

/// `[cache]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CacheConfig {
    /// Unwrapped key versions held.
    pub capacity: usize,
    /// How long an unwrapped key is used before it is unwrapped again.
    #[serde(with = "humantime_serde")]
    pub key_ttl: Duration,
    /// Operations one unwrapped key serves before it is unwrapped again.
    pub max_uses: u64,
    /// How long tenant metadata is trusted: the bound within which another daemon's rotation,
    /// minimum-version change or shred is seen.
    #[serde(with = "humantime_serde")]
    pub metadata_ttl: Duration,
    /// How long past `key_ttl` cached keys keep serving while the KMS is unavailable (zero:
    /// fail closed at `key_ttl`).
    #[serde(with = "humantime_serde")]
    pub max_stale: Duration,
}

impl Default for CacheConfig {
    fn default() -> Self {
        let d = phiseal::CacheSettings::default();
        Self {
            capacity: d.capacity,
            key_ttl: d.key_ttl,
            max_uses: d.max_uses,
            metadata_ttl: d.metadata_ttl,
            max_stale: d.max_stale,
        }
    }
}

/// `[limits]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Largest request or response message, in bytes.
    pub max_message_bytes: usize,
    /// Most items in one batch call.
    pub max_batch_items: usize,
    /// Longest time a request may take (a client's shorter `grpc-timeout` wins).
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Calls per second one identity may make (sustained).
    pub rate_per_second: u32,
    /// Calls one identity may make in a burst above the sustained rate.
    pub rate_burst: u32,
    /// Streams (`EncryptStream`, `DecryptStream`) open at once, all callers together: each
    /// holds buffers of up to a few segments and messages.
    pub max_streams: usize,
    /// Streams one caller (peer uid and token) may have open at once, so that one caller
    /// cannot hold every one of `max_streams`; not set: half of `max_streams`, rounded up.
    pub max_streams_per_caller: Option<usize>,
    /// Largest segment size a `DecryptStream` may declare in its header, in bytes: the writer
    /// chooses it, and the daemon holds up to two segments of each stream in memory.
    pub max_stream_segment_bytes: u32,
    /// Whether an `EncryptStream` must end with its `end` message (the default) to be sealed
    /// as complete. `false` also seals one whose requests just close, as daemons did before
    /// `end` existed — for clients not yet upgraded; unsafe, since a client whose input failed
    /// part way may close its requests cleanly and get a truncated plaintext sealed.
    pub require_stream_end: bool,
    /// Connections to the socket open at once, all callers together; beyond it, new
    /// connections wait until one closes (`connections.rs`).
    pub max_connections: usize,
    /// Connections one peer uid may have open at once; one more is closed at once.
    pub max_connections_per_uid: usize,
    /// Calls being received or served at once, all connections together (each may hold a
    /// message of up to `max_message_bytes` while it arrives); beyond it, calls wait.
    pub max_requests_in_flight: usize,
    /// Calls in flight one peer uid may have at once, so that one local user cannot hold
    /// every one of `max_requests_in_flight` (`inflight.rs`); beyond it, its calls wait.
    /// Not set: half of `max_requests_in_flight`, rounded up.
    pub max_requests_in_flight_per_uid: Option<usize>,
}

impl LimitsConfig {
    /// `max_requests_in_flight_per_uid`, or its default: half of `max_requests_in_flight`,
    /// rounded up.
    pub fn requests_in_flight_per_uid(&self) -> usize {
        self.max_requests_in_flight_per_uid
            .unwrap_or(self.max_requests_in_flight.div_ceil(2))
    }

    /// `max_streams_per_caller`, or its default: half of `max_streams`, rounded up.
    pub fn streams_per_caller(&self) -> usize {
        self.max_streams_per_caller
            .unwrap_or(self.max_streams.div_ceil(2))
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_message_bytes: 4 * 1024 * 1024,
            max_batch_items: 10_000,
            request_timeout: Duration::from_secs(10),
            rate_per_second: 20_000,
            rate_burst: 2_000,
            max_streams: 16,
            max_streams_per_caller: None,
            max_stream_segment_bytes: 1024 * 1024,
            require_stream_end: true,
            max_connections: 1024,
            max_connections_per_uid: 256,
            max_requests_in_flight: 1024,
            max_requests_in_flight_per_uid: None,
        }
    }
}

/// `[metrics]`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address of the Prometheus listener (`GET /metrics`); absent means no listener.
    #[serde(default)]
    pub listen: Option<SocketAddr>,
}

/// `[log]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `text` (default) or `json`.
    pub format: LogFormat,
    /// A tracing filter (`info`, `phiseald=debug`, …).
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            level: "info".into(),
        }
    }
}

/// The crates whose events a bare `log.level` applies to in full (tracing targets).
const OWN_TARGETS: [&str; 11] = [
    "phiseal",
    "phiseald",
    "phiseal_cli",
    "phiseal_embedded",
    "phiseal_audit_file",
    "phiseal_kms_local",
    "phiseal_kms_aws",
    "phiseal_kms_azure",
    "phiseal_kms_pkcs11",
    "phiseal_store_sqlite",
    "phiseal_store_postgres",
];

impl LogConfig {
    /// The tracing filter for `level`. A bare `debug` or `trace` — alone or as one directive
    /// of a list (`debug,h2=info`) — applies to phiseal's own crates only; the libraries
    /// (the AWS and Azure SDKs, h2, hyper, tonic, the PostgreSQL driver) stay at `info`: at
    /// debug and trace levels some of them log request and response details, and a KMS
    /// response carries a tenant key. Name a library's target explicitly to go further
    /// (`h2=debug`); every directive naming a target is kept as written.
    pub fn filter(&self) -> String {
        let mut directives = Vec::new();
        for directive in self
            .level
            .split(',')
            .map(str::trim)
            .filter(|d| !d.is_empty())
        {
            // A level with no target, by name or number ("4" is debug, "5" trace).
            let bare_verbose = directive
                .parse::<tracing_subscriber::filter::LevelFilter>()
                .is_ok_and(|level| level >= tracing_subscriber::filter::LevelFilter::DEBUG);
            if bare_verbose {
                directives.push("info".to_owned());
                directives.extend(OWN_TARGETS.iter().map(|t| format!("{t}={directive}")));
            } else {
                directives.push(directive.to_owned());
            }
        }
        directives.join(",")
    }
}

/// Log output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// `[rotation]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RotationConfig {
    /// Rotate a tenant key once its newest version is this old; absent means never.
    #[serde(default, with = "humantime_serde")]
    pub period: Option<Duration>,
    /// Per-tenant periods overriding `period`.
    #[serde(default, with = "tenant_periods")]
    pub tenants: BTreeMap<String, Duration>,
    /// How often the scheduler looks for due tenants.
    #[serde(with = "humantime_serde")]
    pub check_interval: Duration,
}

impl Default for RotationConfig {
    fn default() -> Self {
        Self {
            period: None,
            tenants: BTreeMap::new(),
            check_interval: Duration::from_secs(600),
        }
    }
}

mod tenant_periods {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub(super) fn serialize<S: Serializer>(
        map: &BTreeMap<String, Duration>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        let text: BTreeMap<&String, String> = map
            .iter()
            .map(|(k, v)| {
                (
                    k,
                    humantime_serde::re::humantime::format_duration(*v).to_string(),
                )
            })
            .collect();
        text.serialize(s)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<BTreeMap<String, Duration>, D::Error> {
        let text = BTreeMap::<String, String>::deserialize(d)?;
        text.into_iter()
            .map(|(k, v)| {
                humantime_serde::re::humantime::parse_duration(&v)
                    .map(|d| (k.clone(), d))
                    .map_err(|e| serde::de::Error::custom(format!("tenant '{k}': {e}")))
            })
            .collect()
    }
}

/// One `[[tokens]]` entry: a service token, stored as the SHA-256 of its text (made by
/// `phiseal token new`).
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// The name policies refer to (`token = "billing"`); the audit identity is `token:NAME`.
    pub name: String,
    /// Lower-case hex SHA-256 of the token text.
    pub sha256: String,
}

impl std::fmt::Debug for TokenConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenConfig")
            .field("name", &self.name)
            .field("sha256", &"[redacted]")
            .finish()
    }
}

/// How the daemon was started: a file, or the embedded default (no file).
#[derive(Debug, Clone)]
pub enum Source<'a> {
    /// `--config FILE` (plus environment overrides).
    File(&'a Path),
    /// No file: the embedded default, where the daemon's own uid may do everything (plus
    /// environment overrides).
    Embedded,
}

/// Values given on the command line; they win over the file and the environment.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--socket`.
    pub socket: Option<PathBuf>,
    /// `--data-dir`.
    pub data_dir: Option<PathBuf>,
}

/// Environment variables (after `PHISEALD_`) that hold secrets, and their keys.
const SECRET_VARIABLES: [(&str, &str); 5] = [
    ("KEY_STORE__DATABASE_URL", "key_store.database_url"),
    ("KMS__AZURE__CLIENT_SECRET", "kms.azure.client_secret"),
    ("KMS__PKCS11__PIN", "kms.pkcs11.pin"),
    (
        "KMS__PREVIOUS__AZURE__CLIENT_SECRET",
        "kms.previous.azure.client_secret",
    ),
    ("KMS__PREVIOUS__PKCS11__PIN", "kms.previous.pkcs11.pin"),
];

/// Every directory a lookup of `path` passes through: the ancestors of the path as given and,
/// each time a component is a symlink, the ancestors of the path it leads to (so each
/// directory holding a link on the way, however many links are chained). At most 40 links.
pub(crate) fn directories_on_the_way(path: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut current = std::path::absolute(path)?;
    let mut directories: Vec<PathBuf> = Vec::new();
    for _ in 0..=40 {
        for dir in current.parent().into_iter().flat_map(Path::ancestors) {
            if !directories.iter().any(|known| known == dir) {
                directories.push(dir.to_owned());
            }
        }
        // The first component that is a symlink: replace it by its target.
        let link = current
            .ancestors()
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .find(|prefix| {
                std::fs::symlink_metadata(prefix).is_ok_and(|meta| meta.file_type().is_symlink())
            })
            .map(Path::to_owned);
        let Some(link) = link else {
            return Ok(directories);
        };
        let target = std::fs::read_link(&link)?;
        let rest = current.strip_prefix(&link).map_err(std::io::Error::other)?;
        let base = link.parent().unwrap_or(Path::new("/"));
        current = base.join(target).join(rest);
    }
    Err(std::io::Error::other("more than 40 symlinks on the way"))
}

/// The config file's text, read once after its checks (`read_config_file`); named a file in
/// error messages, as `Toml::file` would be.
struct ConfigFileText(String);

impl figment::Provider for ConfigFileText {
    fn metadata(&self) -> figment::Metadata {
        figment::Metadata::named("TOML file")
    }

    fn data(
        &self,
    ) -> Result<figment::value::Map<figment::Profile, figment::value::Dict>, figment::Error> {
        Toml::string(&self.0).data()
    }
}

/// Refuses `meta` (of `at`, described as `what` in the message) unless it belongs to this
/// process's user or root and is not writable by group or others — but for a sticky directory
/// (such as `/tmp`: others cannot replace what is in it) and the root of a read-only mount (a
/// Kubernetes ConfigMap's 0777 volume). `stake`: what a writer could change.
fn check_owner_and_writers(
    at: &Path,
    what: &str,
    meta: &std::fs::Metadata,
    stake: &str,
    refuse: &dyn Fn(String) -> DaemonError,
) -> Result<(), DaemonError> {
    use std::os::unix::fs::MetadataExt;
    let me = rustix::process::geteuid().as_raw();
    let mode = meta.mode();
    if meta.uid() != me && meta.uid() != 0 {
        return Err(refuse(format!(
            "{what} belongs to uid {}, neither this process's user ({me}) nor root: another \
             user could change {stake}; chown it",
            meta.uid()
        )));
    }
    let sticky_dir = meta.is_dir() && mode & 0o1000 != 0;
    // Only the root of a read-only mount (a ConfigMap volume): not a directory that is
    // read-only in this process's view alone (systemd's ProtectSystem=strict makes /etc so,
    // while it stays writable on the host).
    let read_only_mount = meta.is_dir()
        && at
            .parent()
            .is_some_and(|up| std::fs::metadata(up).is_ok_and(|up| up.dev() != meta.dev()))
        && rustix::fs::statvfs(at)
            .is_ok_and(|fs| fs.f_flag.contains(rustix::fs::StatVfsMountFlags::RDONLY));
    if mode & 0o022 != 0 && !sticky_dir && !read_only_mount {
        return Err(refuse(format!(
            "{what} is writable by group or others (mode {:04o}): anyone who can write it \
             could change {stake}; chmod go-w",
            mode & 0o7777
        )));
    }
    Ok(())
}

/// Checks every directory on the way to `path` (along the path as given, each path a symlink
/// on the way leads to, and the resolved path) with [`check_owner_and_writers`]; returns the
/// resolved path.
fn check_directories_on_the_way(
    path: &Path,
    stake: &str,
    refuse: &dyn Fn(String) -> DaemonError,
) -> Result<PathBuf, DaemonError> {
    let canonical =
        std::fs::canonicalize(path).map_err(|e| refuse(format!("cannot resolve its path: {e}")))?;
    for dir in directories_on_the_way(path)
        .map_err(|e| refuse(format!("cannot resolve its path: {e}")))?
        .iter()
        .map(PathBuf::as_path)
        .chain(canonical.parent().into_iter().flat_map(Path::ancestors))
    {
        let meta = std::fs::metadata(dir)
            .map_err(|e| refuse(format!("cannot read its directory {}: {e}", dir.display())))?;
        check_owner_and_writers(
            dir,
            &format!("its directory {}", dir.display()),
            &meta,
            stake,
            refuse,
        )?;
    }
    Ok(canonical)
}

/// Refuses a file the daemon trusts — the PKCS#11 module it loads into itself, the CA it
/// trusts for the key store — that another user could replace (see
/// [`check_owner_and_writers`]); `key` names the setting. A missing file is left to the
/// component that opens it.
fn check_trusted_file(key: &str, path: &Path, stake: &str) -> Result<(), DaemonError> {
    if std::fs::symlink_metadata(path).is_err() {
        return Ok(());
    }
    let shown = path.display();
    let refuse = |what: String| DaemonError::Config(format!("{key} {shown}: {what}"));
    let canonical = check_directories_on_the_way(path, stake, &refuse)?;
    let meta = std::fs::metadata(&canonical).map_err(|e| refuse(format!("cannot read it: {e}")))?;
    check_owner_and_writers(&canonical, "it", &meta, stake, &refuse)
}

/// Reads the config file, refusing one that someone other than this process's user (or root)
/// could change — it grants access to PHI and names the KMS and the key store — and one that
/// holds a secret others could read. Like sshd's `StrictModes`: the file and every directory
/// above it (along the path as given, along each path a symlink on the way leads to, and along
/// the resolved path: `directories_on_the_way`) must belong to this user or root and not be writable by group
/// or others, except a directory with the sticky bit (such as `/tmp`: others cannot replace
/// what is in it) or the root of a read-only mount (a Kubernetes ConfigMap's 0777 volume; not
/// a directory read-only only in this process's view, as systemd's `ProtectSystem` makes
/// them). A file holding a secret (`SECRET_VARIABLES`) must not be readable by group or
/// others. The owner and mode checked are those of the open file the text is read from.
fn read_config_file(path: &Path) -> Result<String, DaemonError> {
    use std::io::Read;
    use std::os::unix::fs::MetadataExt;
    let shown = path.display();
    let refuse = |what: String| DaemonError::Config(format!("config file {shown}: {what}"));
    let canonical = check_directories_on_the_way(path, "who may decrypt", &refuse)?;
    let mut file =
        std::fs::File::open(&canonical).map_err(|e| refuse(format!("cannot open it: {e}")))?;
    let meta = file
        .metadata()
        .map_err(|e| refuse(format!("cannot read it: {e}")))?;
    if !meta.is_file() {
        return Err(refuse("not a regular file".into()));
    }
    check_owner_and_writers(&canonical, "it", &meta, "who may decrypt", &refuse)?;
    let mut text = String::new();
    file.read_to_string(&mut text)
        .map_err(|e| refuse(format!("cannot read it: {e}")))?;
    if meta.mode() & 0o044 != 0 {
        let parsed = Figment::new().merge(Toml::string(&text));
        let secrets: Vec<&(&str, &str)> = SECRET_VARIABLES
            .iter()
            .filter(|(_, key)| {
                parsed.find_value(key).is_ok_and(|value| {
                    *key != "key_store.database_url"
                        || value
                            .as_str()
                            .is_none_or(phiseal_store_postgres::database_url_has_password)
                })
            })
            .collect();
        if !secrets.is_empty() {
            let keys: Vec<&str> = secrets.iter().map(|(_, key)| *key).collect();
            let variables: Vec<String> = secrets
                .iter()
                .map(|(variable, _)| format!("PHISEALD_{variable}"))
                .collect();
            return Err(refuse(format!(
                "it holds {} and is readable by group or others (mode {:04o}): chmod 600, or \
                 better move the secret to {} (root-owned, e.g. a systemd EnvironmentFile)",
                keys.join(", "),
                meta.mode() & 0o7777,
                variables.join(", ")
            )));
        }
    }
    Ok(text)
}

impl Config {
    /// Reads and validates the configuration: the file (or the embedded default), then
    /// `PHISEALD_*` environment variables, then the command-line overrides.
    pub fn load(source: Source<'_>, overrides: &Overrides) -> Result<Self, DaemonError> {
        let figment = match source {
            Source::File(path) => {
                if !path.is_file() {
                    return Err(DaemonError::Config(format!(
                        "config file {}: not found or not a regular file",
                        path.display()
                    )));
                }
                Figment::new().merge(ConfigFileText(read_config_file(path)?))
            }
            Source::Embedded => {
                let data_dir = overrides.data_dir.clone().unwrap_or_default();
                let socket = overrides
                    .socket
                    .clone()
                    .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET));
                Figment::new().merge(Serialized::defaults(Self::embedded(&socket, &data_dir)))
            }
        };
        // The environment may raise the file's profile to production, never lower it: the
        // production locks (access control only from the file, no local KMS, …) would go too.
        // A file that names no profile is production (the default); the embedded default
        // (no file) is development.
        let file_says_production =
            figment.extract_inner::<ProfileName>("profile").ok() != Some(ProfileName::Development);
        // (`filter` sees the keys after `split`: `kms.pkcs11.pin`, compared without case.)
        let env = Env::prefixed("PHISEALD_")
            .split("__")
            .filter(|key| !SECRET_VARIABLES.iter().any(|(_, path)| key == *path));
        let access_from_env = access_variables(&env);
        let mut figment = figment.merge(env);
        // Secrets are taken verbatim: the generic provider would read a PIN `0123` as the
        // number 123, or a password starting with `[` as an array.
        // (`vars_os`: `vars` panics on a variable that is not UTF-8, anywhere in the
        // environment; such a variable cannot be one of ours.)
        let utf8 = |(name, value): (std::ffi::OsString, std::ffi::OsString)| {
            Some((name.into_string().ok()?, value.into_string().ok()?))
        };
        for (name, value) in std::env::vars_os().filter_map(utf8) {
            let Some(var) = setting_of(&name) else {
                continue;
            };
            let Some((_, path)) = SECRET_VARIABLES
                .iter()
                .find(|(secret, _)| secret.eq_ignore_ascii_case(var))
            else {
                continue;
            };
            // A KMS secret counts only for a config with that backend; a database URL always
            // (with kind = "sqlite" it is refused, not ignored).
            let section = path.rsplit_once('.').map_or("", |(section, _)| section);
            if !path.starts_with("kms.") || figment.contains(section) {
                figment = figment.merge(Serialized::default(path, value));
            }
        }
        if let Some(socket) = &overrides.socket {
            figment = figment.merge(Serialized::default("socket", socket));
        }
        if let Some(data_dir) = &overrides.data_dir {
            figment = figment.merge(Serialized::default("data_dir", data_dir));
        }
        let mut config: Config = figment
            .extract()
            .map_err(|e| DaemonError::Config(describe_figment_error(e)))?;
        config.access_from_env = access_from_env;
        if file_says_production && config.profile != ProfileName::Production {
            return Err(DaemonError::Config(
                "profile: the config file says \"production\" (or names no profile: \
                 production is the default); the environment (PHISEALD_PROFILE) may not lower \
                 it — write profile = \"development\" in the file for a development setup"
                    .into(),
            ));
        }
        config.validate()?;
        config.check_trusted_files()?;
        Ok(config)
    }

    /// Refuses a PKCS#11 module (the daemon runs its code, with every tenant key and the PIN)
    /// or a key-store CA file (it decides which server is trusted with the wrapped keys) that
    /// another user could replace.
    fn check_trusted_files(&self) -> Result<(), DaemonError> {
        let mut kms = Some(&self.kms);
        let mut key = String::from("kms");
        while let Some(section) = kms {
            if let Some(pkcs11) = section.pkcs11.as_ref().filter(|p| p.check_module) {
                check_trusted_file(
                    &format!("{key}.pkcs11.module"),
                    &pkcs11.module,
                    "the code the daemon runs with every tenant key",
                )?;
            }
            kms = section.previous.as_deref();
            key.push_str(".previous");
        }
        if let Some(ca) = self
            .key_store
            .ca_file
            .as_ref()
            .filter(|_| self.key_store.check_ca_file)
        {
            check_trusted_file(
                "key_store.ca_file",
                ca,
                "which database server is trusted with the wrapped keys",
            )?;
        }
        Ok(())
    }

    /// The embedded default: everything default, and one rule letting the daemon's own uid
    /// do every operation on every tenant and field.
    fn embedded(socket: &Path, data_dir: &Path) -> Self {
        Self {
            socket: socket.to_owned(),
            socket_group: None,
            socket_check_parents: true,
            profile: ProfileName::Development,
            data_dir: data_dir.to_owned(),
            audit: AuditConfig::default(),
            kms: KmsConfig::default(),
            key_store: KeyStoreConfig::default(),
            cache: CacheConfig::default(),
            limits: LimitsConfig::default(),
            metrics: MetricsConfig::default(),
            log: LogConfig::default(),
            rotation: RotationConfig::default(),
            tokens: Vec::new(),
            policy: vec![Rule::everything_for_uid(rustix::process::getuid().as_raw())],
            access_from_env: Vec::new(),
        }
    }

    /// Checks values serde cannot: ranges, references between sections, duplicates.
    pub fn validate(&self) -> Result<(), DaemonError> {
        let bad = |key: &str, problem: &str| Err(DaemonError::Config(format!("{key}: {problem}")));
        if !self.socket.is_absolute() {
            return bad("socket", "must be an absolute path");
        }
        if !self.data_dir.is_absolute() {
            return bad("data_dir", "must be an absolute path");
        }
        let l = &self.limits;
        if !(1024..=256 * 1024 * 1024).contains(&l.max_message_bytes) {
            return bad(
                "limits.max_message_bytes",
                "must be between 1024 and 268435456",
            );
        }
        if !(1..=10_000).contains(&l.max_streams) {
            return bad("limits.max_streams", "must be between 1 and 10000");
        }
        if l.max_streams_per_caller
            .is_some_and(|n| !(1..=l.max_streams).contains(&n))
        {
            return bad(
                "limits.max_streams_per_caller",
                "must be between 1 and limits.max_streams",
            );
        }
        if !(phiseal::stream::MIN_SEGMENT_SIZE..=phiseal::stream::MAX_SEGMENT_SIZE)
            .contains(&l.max_stream_segment_bytes)
        {
            return bad(
                "limits.max_stream_segment_bytes",
                "must be between 4096 and 16777216",
            );
        }
        if !(1..=65_536).contains(&l.max_connections) {
            return bad("limits.max_connections", "must be between 1 and 65536");
        }
        if !(1..=l.max_connections).contains(&l.max_connections_per_uid) {
            return bad(
                "limits.max_connections_per_uid",
                "must be between 1 and limits.max_connections",
            );
        }
        if !(1..=65_536).contains(&l.max_requests_in_flight) {
            return bad(
                "limits.max_requests_in_flight",
                "must be between 1 and 65536",
            );
        }
        if l.max_requests_in_flight_per_uid
            .is_some_and(|n| !(1..=l.max_requests_in_flight).contains(&n))
        {
            return bad(
                "limits.max_requests_in_flight_per_uid",
                "must be between 1 and limits.max_requests_in_flight",
            );
        }
        if !(1..=1_000_000).contains(&l.max_batch_items) {
            return bad("limits.max_batch_items", "must be between 1 and 1000000");
        }
        if !(Duration::from_millis(10)..=MAX_REQUEST_TIMEOUT).contains(&l.request_timeout) {
            return bad("limits.request_timeout", "must be between 10ms and 1h");
        }
        if l.rate_per_second == 0 || l.rate_burst == 0 {
            return bad(
                "limits.rate_per_second / limits.rate_burst",
                "must be at least 1",
            );
        }
        if !(Duration::from_millis(1)..=Duration::from_secs(10)).contains(&self.audit.sync_interval)
        {
            return bad("audit.sync_interval", "must be between 1ms and 10s");
        }
        let rollover = self.audit.rollover_bytes;
        if rollover != 0 && !(64 * 1024..=1 << 40).contains(&rollover) {
            return bad(
                "audit.rollover_bytes",
                "must be 0 (never) or between 65536 and 1099511627776",
            );
        }
        if self.cache.capacity == 0 {
            return bad("cache.capacity", "must be at least 1");
        }
        // The keyring's own bound: a cached key's encryption epoch holds EPOCH_MESSAGE_LIMIT
        // messages, and max_uses stays well below it.
        let max_uses = phiseal::EPOCH_MESSAGE_LIMIT / 2;
        if !(1..=max_uses).contains(&self.cache.max_uses) {
            return bad(
                "cache.max_uses",
                &format!("must be between 1 and {max_uses}"),
            );
        }
        if self.cache.key_ttl.is_zero() {
            return bad(
                "cache.key_ttl",
                "must be more than 0 (every operation would unwrap)",
            );
        }
        if self.cache.metadata_ttl > self.cache.key_ttl {
            return bad("cache.metadata_ttl", "must not exceed cache.key_ttl");
        }
        if self.cache.max_stale > MAX_STALE_LIMIT {
            return bad("cache.max_stale", "must be at most 24h");
        }
        if self.log.level.split(',').all(|d| d.trim().is_empty()) {
            return bad(
                "log.level",
                "must not be empty (it would log nothing, warnings included)",
            );
        }
        if self.log.level.contains('[') && self.log.level.contains(']') {
            return bad(
                "log.level",
                "span directives ([span]=level) are not supported: they would raise every \
                 library inside the span; name a target (phiseald=debug)",
            );
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(self.log.filter()) {
            return bad("log.level", &format!("not a valid filter: {e}"));
        }
        if self
            .key_store
            .ca_file
            .as_ref()
            .is_some_and(|ca| !ca.is_absolute())
        {
            return bad("key_store.ca_file", "must be an absolute path");
        }
        if let Some(group) = &self.socket_group
            && let Err(e) = crate::transport::resolve_group(group)
        {
            return bad("socket_group", &e);
        }
        if let Err(problem) = self.kms.validate() {
            return Err(DaemonError::Config(problem));
        }
        let previous_local = self
            .kms
            .previous
            .as_ref()
            .is_some_and(|p| p.kind == KmsKind::Local);
        if self.profile == ProfileName::Production && previous_local {
            return bad(
                "profile",
                "production refuses the local development KMS, also as kms.previous: finish \
                 the migration away from it with profile = \"development\" (docs/KMS.md)",
            );
        }
        if self.profile == ProfileName::Production && !self.access_from_env.is_empty() {
            return bad(
                "profile",
                &format!(
                    "production takes access control only from the config file: unset {} (the \
                     environment would replace the file's policy, tokens or socket group)",
                    self.access_from_env.join(", ")
                ),
            );
        }
        let developer_credential = |kms: &KmsConfig| {
            kms.kind == KmsKind::Azure
                && kms.azure.as_ref().is_some_and(|a| {
                    matches!(
                        a.credential,
                        AzureCredentialName::AzureCli | AzureCredentialName::DeveloperTools
                    )
                })
        };
        let developer_credential_at = if developer_credential(&self.kms) {
            Some("kms.azure.credential")
        } else if self
            .kms
            .previous
            .as_deref()
            .is_some_and(developer_credential)
        {
            Some("kms.previous.azure.credential")
        } else {
            None
        };
        if let (ProfileName::Production, Some(key)) = (self.profile, developer_credential_at) {
            return bad(
                key,
                "production refuses the developer credentials \"azure-cli\" and \
                 \"developer-tools\" (they run the az / azd command-line tools under a person's \
                 sign-in, slowly): use managed-identity, workload-identity or client-secret",
            );
        }
        if self.profile == ProfileName::Production && self.kms.kind == KmsKind::Local {
            return bad(
                "profile",
                "production refuses the local development KMS (a config file is production \
                 unless it says profile = \"development\"): set kms.kind to aws, azure or \
                 pkcs11 (see docs/KMS.md), or write profile = \"development\" in the file for \
                 a development setup",
            );
        }
        let too_short = |p: &Duration| *p < Duration::from_secs(1);
        if self.rotation.period.as_ref().is_some_and(too_short)
            || self.rotation.tenants.values().any(too_short)
        {
            return bad("rotation.period / rotation.tenants", "must be at least 1s");
        }
        if self.rotation.check_interval < Duration::from_millis(100) {
            return bad("rotation.check_interval", "must be at least 100ms");
        }
        let store = &self.key_store;
        match (store.kind, &store.database_url) {
            (KeyStoreKind::Postgres, None) => {
                return bad(
                    "key_store.database_url",
                    "required with kind = \"postgres\" (or PHISEALD_KEY_STORE__DATABASE_URL)",
                );
            }
            (KeyStoreKind::Sqlite, Some(_)) => {
                return bad(
                    "key_store.database_url",
                    "only used with kind = \"postgres\"",
                );
            }
            _ => {}
        }
        if let Some(schema) = &store.schema {
            if store.kind != KeyStoreKind::Postgres {
                return bad("key_store.schema", "only used with kind = \"postgres\"");
            }
            match phiseal_store_postgres::check_schema_name(schema) {
                Ok(()) => {}
                Err(phiseal_store_postgres::PostgresStoreError::Config { reason }) => {
                    return bad("key_store.schema", &reason);
                }
                Err(e) => return bad("key_store.schema", &e.to_string()),
            }
        }
        if let Some(owner) = &store.schema_owner {
            if store.kind != KeyStoreKind::Postgres {
                return bad(
                    "key_store.schema_owner",
                    "only used with kind = \"postgres\"",
                );
            }
            if owner.is_empty() || owner.len() > 63 || owner.chars().any(char::is_control) {
                return bad(
                    "key_store.schema_owner",
                    "must be a role name of 1 to 63 bytes without control characters",
                );
            }
        }
        if !(1..=1000).contains(&store.max_connections) {
            return bad("key_store.max_connections", "must be between 1 and 1000");
        }
        // (Beyond the store's whole-call limit a connection attempt serves no call; the change
        // listener would hang that long on an unreachable host before trying again.)
        if !(Duration::from_millis(100)..=phiseal_store_postgres::OPERATION_TIMEOUT)
            .contains(&store.connect_timeout)
        {
            return bad(
                "key_store.connect_timeout",
                &format!(
                    "must be between 100ms and {}s",
                    phiseal_store_postgres::OPERATION_TIMEOUT.as_secs()
                ),
            );
        }
        if store.ca_file.is_some() && store.tls != DatabaseTls::Require {
            return bad("key_store.ca_file", "only used with tls = \"require\"");
        }
        if store.allow_plaintext_network
            && (store.kind != KeyStoreKind::Postgres || store.tls != DatabaseTls::Disable)
        {
            return bad(
                "key_store.allow_plaintext_network",
                "only used with kind = \"postgres\" and tls = \"disable\"",
            );
        }
        if self.profile == ProfileName::Production
            && store.kind == KeyStoreKind::Postgres
            && store.tls == DatabaseTls::Disable
            && !store.allow_plaintext_network
        {
            match phiseal_store_postgres::connects_only_to_this_host(&store.postgres()?) {
                Ok(true) => {}
                Ok(false) => {
                    return bad(
                        "key_store.tls",
                        "production refuses tls = \"disable\" to a database on another host: \
                         its answers (tenant records, shreds, minimum versions) could be read \
                         or replayed on the way; set tls = \"require\" (docs/DEPLOYMENT.md), \
                         or allow_plaintext_network = true if a service mesh's mutual TLS \
                         protects the path",
                    );
                }
                Err(e) => return bad("key_store.database_url", &e.to_string()),
            }
        }
        if self.profile == ProfileName::Production
            && store.kind == KeyStoreKind::Postgres
            && store.tls == DatabaseTls::Disable
        {
            let dirs = match phiseal_store_postgres::unix_socket_dirs(&store.postgres()?) {
                Ok(dirs) => dirs,
                Err(e) => return bad("key_store.database_url", &e.to_string()),
            };
            for dir in dirs {
                if open_to_every_user(&dir) {
                    return bad(
                        "key_store.database_url",
                        &format!(
                            "production refuses the socket directory {}: every user may \
                             create files in it (or create it, or replace the symlink it is), \
                             so while PostgreSQL is down any local user could put a socket \
                             there and answer in its place (receiving the password, replaying \
                             tenant records); use a directory only PostgreSQL's user can write, \
                             such as /var/run/postgresql",
                            dir.display()
                        ),
                    );
                }
            }
        }
        if self.audit.path.as_ref().is_some_and(|p| !p.is_absolute()) {
            return bad("audit.path", "must be an absolute path");
        }
        for tenant in self.rotation.tenants.keys() {
            if phiseal::TenantId::new(tenant).is_err() {
                return bad(
                    &format!("rotation.tenants.\"{tenant}\""),
                    "is not a valid tenant id",
                );
            }
        }
        let mut names = std::collections::BTreeSet::new();
        for (i, token) in self.tokens.iter().enumerate() {
            let key = format!("tokens[{i}]");
            if token.name.is_empty()
                || !token
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
            {
                return bad(
                    &format!("{key}.name"),
                    "must be non-empty ASCII letters, digits, '-', '_', '.'",
                );
            }
            if !names.insert(token.name.as_str()) {
                return bad(&format!("{key}.name"), "is defined twice");
            }
            if self.tokens.iter().take(i).any(|t| t.sha256 == token.sha256) {
                return bad(
                    &format!("{key}.sha256"),
                    "is another token's hash too: one token would always be taken for the \
                     other (give each service its own `phiseal token new`)",
                );
            }
            if token.sha256.len() != 64
                || !token
                    .sha256
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
            {
                return bad(
                    &format!("{key}.sha256"),
                    "must be 64 lower-case hex digits (the SHA-256 of the token; `phiseal token new` prints it)",
                );
            }
        }
        for (i, rule) in self.policy.iter().enumerate() {
            rule.validate(&format!("policy[{i}]"), &names)?;
        }
        Ok(())
    }
}

/// Figment's messages name the key (`for key "default.limits.max_batch_items"`); drop the
/// profile prefix so they match the file. For a key that holds a secret (a PIN, a client
/// secret, a database URL) the message never repeats the value found: figment's would
/// (``invalid type: found unsigned int `123456` ``).
/// A TOML parse error without the lines of the file it quotes (`9 | pin = "…"` and the
/// caret line under it): the line may hold a secret. Line, column and cause stay.
fn without_source_lines(message: &str) -> String {
    let quotes_the_file = |line: &&str| {
        let line = line.trim_start();
        line.starts_with('|')
            || line.split_once(" |").is_some_and(|(number, _)| {
                !number.is_empty() && number.chars().all(|c| c.is_ascii_digit())
            })
    };
    message
        .lines()
        .filter(|line| !quotes_the_file(line))
        .collect::<Vec<_>>()
        .join("\n")
}

fn describe_figment_error(error: figment::Error) -> String {
    use figment::error::Kind;
    error
        .into_iter()
        .map(|e| {
            let key = e.path.join(".");
            let origin = e
                .metadata
                .as_ref()
                .map(|m| format!(" (from {})", m.name))
                .unwrap_or_default();
            let secret = SECRET_VARIABLES
                .iter()
                .any(|(_, path)| path.eq_ignore_ascii_case(&key));
            // These kinds name keys, never values.
            let names_keys_only = matches!(
                e.kind,
                Kind::MissingField(_) | Kind::UnknownField(..) | Kind::DuplicateField(_)
            );
            let kind = if secret && !names_keys_only {
                "invalid value (not shown: this key holds a secret); write it as a quoted \
                 string, or set it in the environment"
                    .to_owned()
            } else {
                without_source_lines(&e.kind.to_string())
            };
            if key.is_empty() {
                format!("{kind}{origin}")
            } else {
                format!("{key}: {kind}{origin}")
            }
        })
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::{KmsConfig, LogConfig, distinct_root_keys_across};

    /// `root migrate --to`: the target's and the source's PKCS#11 keys are checked against
    /// each other as a daemon's current and previous ones are (`Config::load` of each file
    /// checks only its own pair).
    #[test]
    fn a_migration_target_on_another_module_needs_root_key_references_of_its_own() {
        let kms = |module: &str, key: &str| -> KmsConfig {
            toml::from_str(&format!(
                "kind = \"pkcs11\"\n[pkcs11]\nmodule = \"{module}\"\ntoken_label = \"phiseal\"\n\
                 key_label = \"{key}\"\npin = \"1234\"\n"
            ))
            .unwrap()
        };
        let source = kms("/opt/old-hsm/lib.so", "phiseal-root-1");
        let refused =
            distinct_root_keys_across(&kms("/opt/new-hsm/lib.so", "phiseal-root-1"), &source)
                .unwrap_err();
        assert!(
            refused.starts_with(
                "target kms.pkcs11: a root key of source kms.pkcs11 (on another module)"
            ),
            "{refused}"
        );
        assert!(!refused.contains("1234"), "{refused}");
        distinct_root_keys_across(&kms("/opt/new-hsm/lib.so", "phiseal-root-2"), &source).unwrap();
        distinct_root_keys_across(&kms("/opt/old-hsm/lib.so", "phiseal-root-1"), &source).unwrap();
    }

    #[test]
    fn a_bare_verbose_level_stops_at_info_for_the_libraries() {
        let filter = |level: &str| {
            LogConfig {
                level: level.into(),
                ..LogConfig::default()
            }
            .filter()
        };
        let trace = filter("trace");
        assert!(trace.starts_with("info,"), "{trace}");
        assert!(trace.contains(",phiseald=trace") && trace.contains(",phiseal_kms_aws=trace"));
        assert!(!trace.contains("h2") && !trace.contains("aws_smithy"));
        assert!(filter(" DEBUG ").contains("phiseal=DEBUG"));
        // Also as one directive of a list (before: any list was taken as written, so
        // `debug,h2=info` raised every other library to debug).
        for list in ["debug,h2=info", "info,debug", "h2=info, trace"] {
            let got = filter(list);
            assert!(
                !got.split(',').any(|d| d == "debug" || d == "trace"),
                "{list} -> {got}"
            );
            assert!(got.contains(",phiseald="), "{got}");
        }
        assert!(filter("debug,h2=info").ends_with(",h2=info"));
        // Levels by number too ("4" is debug, "5" trace).
        for numeric in ["4", "5", "info,5"] {
            let got = filter(numeric);
            assert!(
                got.starts_with("info,") || got.starts_with("info,info,"),
                "{numeric} -> {got}"
            );
            assert!(!got.split(',').any(|d| d == "4" || d == "5"), "{got}");
        }
        // Anything else as written: plain levels, and directives naming a target.
        for written in [
            "info",
            "warn",
            "off",
            "h2=debug,info",
            "aws_smithy_runtime=debug",
        ] {
            assert_eq!(filter(written), written);
        }
    }
}
