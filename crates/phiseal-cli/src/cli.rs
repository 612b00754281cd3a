//! The command line (clap derive).

use std::path::PathBuf;

use clap::builder::RangedU64ValueParser;
use clap::{Args, Parser, Subcommand};

/// The daemon's default socket.
pub(crate) const DEFAULT_SOCKET: &str = "/run/phiseal/phiseald.sock";

/// Appended to `--help`.
const AFTER_LONG_HELP: &str = "\
Exit codes:
  0  success
  1  other failure (invalid argument, decryption failed, internal error, I/O error)
  2  usage error (bad command line; shred without confirmation and without a terminal; an
     encrypt-file/decrypt-file --output that already exists; a non-empty rewrap --output
     without --resume, or a rewrap whose output or stdout is its input)
  3  denied (PERMISSION_DENIED, UNAUTHENTICATED)
  4  not found (NOT_FOUND)
  5  unavailable (UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, UNKNOWN: the connection
     broke mid-call, or the socket cannot be reached)
  6  key destroyed or retired (FAILED_PRECONDITION)
  7  rewrap or root rotate/migrate finished, but some items failed (for rewrap, also in
     earlier runs of a resumed output)
  8  the audit log has problems

Errors go to stderr as `phiseal: <what failed>: <message> (<kind>)`.

Environment:
  PHISEAL_SOCKET    the daemon's socket (default /run/phiseal/phiseald.sock)
  PHISEAL_TOKEN     the service token itself, used when --token-file is not given
  PHISEAL_DATA_DIR  the data directory for `audit` (default /var/lib/phiseal)
  PHISEALD_*        for `root`: overrides of the daemon config, as for phiseald";

/// Operate phiseal: tenants, keys, field encryption, rewrap, audit log, service tokens.
#[derive(Debug, Parser)]
#[command(name = "phiseal", version, after_long_help = AFTER_LONG_HELP)]
pub(crate) struct Cli {
    /// Options for every command.
    #[command(flatten)]
    pub(crate) global: GlobalArgs,
    /// The command.
    #[command(subcommand)]
    pub(crate) command: Command,
}

/// Options for every command.
#[derive(Debug, Args)]
pub(crate) struct GlobalArgs {
    /// The daemon's Unix socket.
    #[arg(
        long,
        global = true,
        value_name = "PATH",
        env = "PHISEAL_SOCKET",
        default_value = DEFAULT_SOCKET
    )]
    pub(crate) socket: PathBuf,
    /// Print results as JSON (and notes, failed lines and errors on stderr as JSON lines).
    #[arg(long, global = true)]
    pub(crate) json: bool,
    /// Read the service token from this file (mode 0600 or stricter).
    ///
    /// A file accessible by group or others is refused. Without this option, env
    /// PHISEAL_TOKEN holds the token itself, if set. The token is sent as
    /// `authorization: Bearer <token>`.
    #[arg(long, global = true, value_name = "PATH")]
    pub(crate) token_file: Option<PathBuf>,
    /// The deadline of each call to the daemon, in seconds.
    #[arg(
        long,
        global = true,
        value_name = "SECS",
        default_value_t = 30,
        value_parser = RangedU64ValueParser::<u64>::new().range(1..=86_400)
    )]
    pub(crate) timeout: u64,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Check that the daemon answers and serves (exit 0), else exit 5: for start-up waits and
    /// health checks. Nothing is audited.
    Health,
    /// Manage tenants.
    #[command(subcommand)]
    Tenant(TenantCommand),
    /// Manage a tenant's key versions.
    #[command(subcommand)]
    Key(KeyCommand),
    /// Encrypt stdin (raw bytes) and print the `phs1:` ciphertext.
    ///
    /// All of stdin is the plaintext, byte for byte (nothing is trimmed) — except that a value
    /// typed at a terminal loses the newline that ended it. Prints the text form
    /// and a newline; with --json, {"ciphertext": "phs1:…", "key_version": N}. With
    /// --deterministic, the same value always gives the same ciphertext (searchable by
    /// equality; reveals equal values: docs/SEARCH.md; no --record).
    Encrypt(EncryptArgs),
    /// Decrypt the `phs1:` ciphertext on stdin and write the raw plaintext to stdout (on a
    /// terminal, control characters escaped and a newline added).
    ///
    /// Surrounding whitespace around the ciphertext is ignored. The plaintext is written as
    /// is, without a newline; with --json, {"plaintext_base64": "…" (standard base64),
    /// "key_version": N}.
    Decrypt(FieldArgs),
    /// Move ciphertexts (one per line) to the tenant's primary key version.
    #[command(long_about = REWRAP_LONG_ABOUT)]
    Rewrap(RewrapArgs),
    /// Crypto-shred a tenant: destroy every key version, forever.
    Shred(ShredArgs),
    /// Encrypt a file of any size in constant memory (streamed through the daemon).
    ///
    /// The output is written to OUTPUT.partial and renamed to OUTPUT only when the daemon has
    /// sealed the whole stream; on any failure the partial file is removed.
    EncryptFile(FileArgs),
    /// Decrypt a file made by encrypt-file, in constant memory.
    ///
    /// Plaintext is written to OUTPUT.partial (mode 0600) as segments authenticate and renamed
    /// to OUTPUT only when the whole stream has authenticated; a truncated, reordered or altered
    /// file fails and the partial output is removed.
    DecryptFile(FileArgs),
    /// Print the blind index of the value on stdin (hex), to store next to its ciphertext.
    ///
    /// With --json, {"key_version": N, "index_hex": "…"}.
    BlindIndex(BlindIndexArgs),
    /// Print the search terms for the value on stdin under every live key version (one per
    /// line, primary first): `phs1:` deterministic ciphertexts with --deterministic, else hex
    /// blind indexes. What goes into `WHERE column IN (…)`.
    ///
    /// With --json, {"terms": [{"key_version": N, "value": "phs1:…" or hex}, …]}.
    SearchTerms(SearchTermsArgs),
    /// Verify or export the audit log (reads the file directly, not through the daemon).
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Service tokens for the daemon's config.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Root-key rotation and KMS migration (offline: opens the key store and KMS of a daemon
    /// config directly, not through the daemon).
    #[command(subcommand)]
    Root(RootCommand),
}

/// `root` subcommands.
#[derive(Debug, Subcommand)]
pub(crate) enum RootCommand {
    /// Re-wrap every stored tenant key version under the current root key of the config's
    /// [kms] (unwrapping with [kms] or [kms.previous]).
    ///
    /// Use after rotating the key in the vault or HSM, or with [kms.previous] set during a
    /// migration. No data is re-encrypted. Resumable and idempotent: versions already under
    /// the current root key are skipped. Reports when older root keys are no longer
    /// referenced by the key store. Exit code 7 if some versions failed (run again).
    Rotate(RootArgs),
    /// Re-wrap every stored tenant key version under the [kms] of another config (local →
    /// AWS, Azure → AWS, …), unwrapping with the --config's KMS.
    ///
    /// The key store is the one of --config. No data is re-encrypted; resumable and
    /// idempotent. Daemons must be able to unwrap both during the run: give them the target as
    /// [kms] and the old backend as [kms.previous] first (docs/KMS.md, "Migration").
    Migrate {
        /// The daemon config whose key store and KMS hold the keys now.
        #[command(flatten)]
        from: RootArgs,
        /// A config whose [kms] is the target (its other sections are ignored).
        #[arg(long, value_name = "FILE")]
        to: PathBuf,
    },
    /// Show which root keys the stored tenant key versions are wrapped under (read-only).
    ///
    /// Names the config's current root key and counts the versions under it and under every
    /// other root key: check it before retiring an old root key. No tenant key is unwrapped
    /// and nothing in the key store changes (but the KMS and the run's audit log are opened
    /// as for `root rotate`: the local KMS reads root.key, PKCS#11 logs in).
    Status(RootArgs),
    /// Create a new AES-256 root key on the PKCS#11 token of the config's [kms.pkcs11].
    ///
    /// The key is a token object: private, sensitive, non-extractable, encrypt/decrypt only.
    /// A label already in use is refused. To rotate, in two rounds of restarts (docs/KMS.md):
    /// add the new label to previous_key_labels on every daemon and restart them all; then
    /// set key_label to it (the old one in previous_key_labels), restart them all, and run
    /// `root rotate`.
    NewHsmKey {
        /// The daemon config naming the token (module, token_label, pin).
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// The new key's label (CKA_LABEL).
        #[arg(long)]
        label: String,
        /// Where the audit records of the creation go (default:
        /// DATA_DIR/audit-root-keys.log of --config, as for `root rotate`).
        #[arg(long, value_name = "FILE")]
        audit_log: Option<PathBuf>,
    },
}

/// Where the keys are, and where the run's audit records go.
#[derive(Debug, Args)]
pub(crate) struct RootArgs {
    /// The daemon's config file (its key store and KMS; PHISEALD_* environment variables
    /// apply as for the daemon, e.g. PHISEALD_KMS__PKCS11__PIN).
    #[arg(long, value_name = "FILE")]
    pub(crate) config: PathBuf,
    /// The audit log of this run [default: DATA_DIR/audit-root-keys.log, its own hash chain;
    /// every step is recorded and fsynced before the next].
    #[arg(long, value_name = "FILE")]
    pub(crate) audit_log: Option<PathBuf>,
}

/// `rewrap --help`.
const REWRAP_LONG_ABOUT: &str = "\
Move ciphertexts to the tenant's primary key version, without ever seeing plaintext.

Each input line is either a plain `phs1:` ciphertext (context from --field and --record) or a
JSON object {\"field\": …, \"record\": … (optional), \"ciphertext\": \"phs1:…\"} (a line
starting with `{`; a missing field or record falls back to --field or --record; other members
are kept in order with their values unchanged; whitespace between members is not kept in a
rewritten line). Output line N always corresponds to input line N, in the
same shape. Empty lines are passed through. A line that fails is written unchanged and
reported on stderr as `line N: <kind>: <message>`; the exit code is then 7. A line whose
item (ciphertext and context) is larger than --max-call-bytes is not sent (`too_large`).

The output is flushed and fsynced after every batch. With --output FILE --resume, the lines
already in FILE are skipped in the input and the rest is appended: rerun the same command
after an interruption. The skipped lines are checked against FILE first (same shape, same
JSON members but for the ciphertext) and against FILE.checkpoint (a digest of the input lines
done and the flags, written before each batch: another input, the same rows in another order,
or other flags are refused); on a mismatch nothing is written. Then the lines of a batch that
was not committed and a torn last line are cut off. An output without a checkpoint (from an
earlier version) cannot be resumed. Failed lines are listed in FILE.failed, so a resumed run still
counts those of earlier runs (exit 7). One run at a time per output file (a second one is
refused); the output must not be the input, nor may stdout be.

A progress line is shown on stderr when it is a terminal (not with --json). At the end, a
summary goes to stderr (lines, rewrapped, already current, failed, empty, skipped, earlier
failed); with --json it is one JSON object.";

/// `tenant` subcommands.
#[derive(Debug, Subcommand)]
pub(crate) enum TenantCommand {
    /// Create a tenant (with key version 1).
    Create {
        /// The tenant id.
        tenant: String,
    },
}

/// `key` subcommands.
#[derive(Debug, Subcommand)]
pub(crate) enum KeyCommand {
    /// Show the tenant's key versions and their states (no key material).
    Status(TenantArg),
    /// Create a new primary key version; older versions keep decrypting.
    Rotate(RotateArgs),
    /// Set the minimum decryption version: older ciphertexts are refused from then on.
    MinVersion(MinVersionArgs),
}

/// `--tenant T`.
#[derive(Debug, Args)]
pub(crate) struct TenantArg {
    /// The tenant id.
    #[arg(long)]
    pub(crate) tenant: String,
}

/// `key rotate` arguments.
#[derive(Debug, Args)]
pub(crate) struct RotateArgs {
    /// The tenant id.
    #[arg(long)]
    pub(crate) tenant: String,
    /// Rotate only if the latest key version is still N (as `key status` showed it); else
    /// exit 1 with `rotation_conflict` and change nothing. Makes a repeated run safe.
    #[arg(long, value_name = "N")]
    pub(crate) if_latest: Option<u32>,
}

/// `key min-version` arguments.
#[derive(Debug, Args)]
pub(crate) struct MinVersionArgs {
    /// The tenant id.
    #[arg(long)]
    pub(crate) tenant: String,
    /// The new minimum decryption version (1 to the primary version).
    #[arg(long, value_parser = RangedU64ValueParser::<u32>::new().range(1..=u64::from(u32::MAX)))]
    pub(crate) version: u32,
    /// Change it only if the current minimum is still N (as `key status` showed it); else
    /// exit 1 with `concurrent_change` and change nothing.
    #[arg(long, value_name = "N", value_parser = RangedU64ValueParser::<u32>::new().range(1..=u64::from(u32::MAX)))]
    pub(crate) if_current: Option<u32>,
    /// Allow a minimum below the current one, which brings retired key versions back into
    /// service (refused without it).
    #[arg(long)]
    pub(crate) allow_lower: bool,
}

/// The encryption context of `encrypt` and `decrypt`.
#[derive(Debug, Args)]
pub(crate) struct FieldArgs {
    /// The tenant id.
    #[arg(long)]
    pub(crate) tenant: String,
    /// The field name (for example `ssn`).
    #[arg(long)]
    pub(crate) field: String,
    /// The record id (an opaque id, not PHI: it is written to the audit log).
    #[arg(long)]
    pub(crate) record: Option<String>,
}

/// `encrypt` arguments.
#[derive(Debug, Args)]
pub(crate) struct EncryptArgs {
    /// The encryption context.
    #[command(flatten)]
    pub(crate) field: FieldArgs,
    /// Deterministic encryption (AES-SIV): equal values give equal ciphertexts.
    #[arg(long, conflicts_with = "record")]
    pub(crate) deterministic: bool,
}

/// `encrypt-file` / `decrypt-file` arguments.
#[derive(Debug, Args)]
pub(crate) struct FileArgs {
    /// The encryption context.
    #[command(flatten)]
    pub(crate) field: FieldArgs,
    /// The file to read.
    #[arg(long, value_name = "FILE")]
    pub(crate) input: PathBuf,
    /// The file to write (must not exist).
    #[arg(long, value_name = "FILE")]
    pub(crate) output: PathBuf,
}

/// How a blind index is computed.
#[derive(Debug, Args)]
pub(crate) struct IndexSpecArgs {
    /// exact, case-folded or digits-only (docs/SEARCH.md).
    #[arg(long, value_name = "NAME", value_parser = ["exact", "case-folded", "digits-only"])]
    pub(crate) normalization: Option<String>,
    /// Bits kept: a multiple of 8 from 16 to 256 (docs/SEARCH.md recommends 32).
    #[arg(long, value_name = "N")]
    pub(crate) bits: Option<u32>,
}

/// `blind-index` arguments.
#[derive(Debug, Args)]
pub(crate) struct BlindIndexArgs {
    /// The tenant id.
    #[arg(long)]
    pub(crate) tenant: String,
    /// The field name.
    #[arg(long)]
    pub(crate) field: String,
    /// The index spec.
    #[command(flatten)]
    pub(crate) spec: IndexSpecArgs,
}

/// `search-terms` arguments.
#[derive(Debug, Args)]
pub(crate) struct SearchTermsArgs {
    /// The tenant id.
    #[arg(long)]
    pub(crate) tenant: String,
    /// The field name.
    #[arg(long)]
    pub(crate) field: String,
    /// The column holds deterministic ciphertexts (encrypt --deterministic).
    #[arg(long, conflicts_with_all = ["normalization", "bits"])]
    pub(crate) deterministic: bool,
    /// The column holds blind indexes made with this spec.
    #[command(flatten)]
    pub(crate) spec: IndexSpecArgs,
}

/// `rewrap` arguments.
#[derive(Debug, Args)]
pub(crate) struct RewrapArgs {
    /// The tenant id.
    #[arg(long)]
    pub(crate) tenant: String,
    /// The field name for plain lines (required if there are any) and JSON lines without one.
    #[arg(long)]
    pub(crate) field: Option<String>,
    /// The record id for plain lines and JSON lines without one.
    #[arg(long)]
    pub(crate) record: Option<String>,
    /// Read from this file instead of stdin.
    #[arg(long, value_name = "FILE")]
    pub(crate) input: Option<PathBuf>,
    /// Write to this file (created with mode 0600) instead of stdout.
    #[arg(long, value_name = "FILE")]
    pub(crate) output: Option<PathBuf>,
    /// Continue an interrupted run: skip the input lines already in --output (checked against
    /// it first), counting the failures of earlier runs listed in OUTPUT.failed.
    #[arg(long, requires = "output")]
    pub(crate) resume: bool,
    /// Lines per Rewrap call (1 to 10000).
    #[arg(
        long,
        value_name = "N",
        default_value_t = 500,
        value_parser = RangedU64ValueParser::<usize>::new().range(1..=10_000)
    )]
    pub(crate) batch: usize,
    /// Bytes of items per Rewrap call at most — each item's ciphertext and context (tenant,
    /// field, record, from its line or the flags) plus 32 bytes of framing (4096 to 64 MiB;
    /// default 1 MiB, well within the daemon's default 4 MiB message limit). A line whose item
    /// is larger on its own is written back unchanged and reported (`too_large`).
    #[arg(
        long,
        value_name = "BYTES",
        default_value_t = 1 << 20,
        value_parser = RangedU64ValueParser::<usize>::new().range(4096..=(64 << 20))
    )]
    pub(crate) max_call_bytes: usize,
}

/// `shred` arguments.
#[derive(Debug, Args)]
pub(crate) struct ShredArgs {
    /// The tenant id.
    #[arg(long)]
    pub(crate) tenant: String,
    /// Do not ask for confirmation (required when stdin is not a terminal).
    #[arg(long)]
    pub(crate) yes: bool,
}

/// `audit` subcommands.
#[derive(Debug, Subcommand)]
pub(crate) enum AuditCommand {
    /// Verify the whole hash chain of the audit log. Exit code 8 if it is not intact.
    Verify(VerifyArgs),
    /// Write one tenant's records as JSON lines to stdout, verifying the chain while reading.
    Export(ExportArgs),
    /// Recover from a crash mid-write: save a torn (partial) last record to LOG.torn-OFFSET,
    /// cut it off, and append a chained `recovered_torn_tail` record. The daemon must be
    /// stopped (it holds the log). Does nothing if the log does not end in a torn record.
    Recover(LogArgs),
}

/// Where the audit log is.
#[derive(Debug, Clone, Args)]
pub(crate) struct LogArgs {
    /// The daemon's data directory; the log is DIR/audit.log [default: env PHISEAL_DATA_DIR,
    /// else /var/lib/phiseal].
    #[arg(long, value_name = "DIR", conflicts_with = "log")]
    pub(crate) data_dir: Option<PathBuf>,
    /// The audit log file itself.
    #[arg(long, value_name = "FILE")]
    pub(crate) log: Option<PathBuf>,
}

/// `audit verify` arguments.
#[derive(Debug, Args)]
pub(crate) struct VerifyArgs {
    #[command(flatten)]
    pub(crate) log: LogArgs,
    /// Also check a head recorded earlier (`last_seq` and `head_hash` of an earlier
    /// `audit verify --json`): the log must still hold a line with that hash ending with that
    /// record. Catches records cut off the end and a chain rewritten from an earlier point,
    /// which the chain alone cannot show.
    #[arg(long, value_name = "SEQ:HASH", value_parser = parse_anchor)]
    pub(crate) anchor: Option<phiseal_audit_file::Anchor>,
    /// Accept a log whose active file is missing: an archive of its closed segments
    /// (`audit.log.<first>-<last>`). Without it, a missing active file is a failure (exit 8):
    /// it could have been deleted.
    #[arg(long)]
    pub(crate) segments_only: bool,
    /// The log's first closed segments were removed after archiving: its files start right
    /// after this record (`last_seq` and `head_hash` of the last removed segment, from a
    /// `verify --json` of the archive). Without it, such a log fails (`missing_header`).
    #[arg(long, value_name = "SEQ:HASH", value_parser = parse_anchor)]
    pub(crate) after: Option<phiseal_audit_file::Anchor>,
}

/// `SEQ:HASH`: a record's seq and a 64-hex-digit line hash.
fn parse_anchor(text: &str) -> Result<phiseal_audit_file::Anchor, String> {
    let bad = || "expected SEQ:HASH, e.g. 1234:9f86d08…  (64 hex digits)".to_owned();
    let (seq, hash) = text.split_once(':').ok_or_else(bad)?;
    let last_seq = seq.parse().map_err(|_| bad())?;
    let mut bytes = [0u8; 32];
    hex::decode_to_slice(hash.trim(), &mut bytes).map_err(|_| bad())?;
    Ok(phiseal_audit_file::Anchor {
        last_seq,
        hash: bytes,
    })
}

/// `audit export` arguments.
#[derive(Debug, Clone, Args)]
pub(crate) struct ExportArgs {
    /// The tenant id.
    #[arg(long)]
    pub(crate) tenant: String,
    /// Only records at or after this time (RFC 3339, for example 2025-01-31T00:00:00Z).
    #[arg(long, value_name = "RFC3339")]
    pub(crate) since: Option<jiff::Timestamp>,
    /// Only records before this time (RFC 3339).
    #[arg(long, value_name = "RFC3339")]
    pub(crate) until: Option<jiff::Timestamp>,
    /// The log's first closed segments were removed after archiving: its files start right
    /// after this record (as for `audit verify --after`).
    #[arg(long, value_name = "SEQ:HASH", value_parser = parse_anchor)]
    pub(crate) after: Option<phiseal_audit_file::Anchor>,
    /// Accept a log whose active file is missing: an archive of its closed segments. Without
    /// it, a missing active file fails the export (exit 8): the newest records could be gone.
    #[arg(long)]
    pub(crate) segments_only: bool,
    /// Write the records to FILE (which must not exist; mode 0600) instead of stdout, and
    /// only if the whole export succeeds: written to FILE.partial, renamed when complete.
    #[arg(long, value_name = "FILE")]
    pub(crate) output: Option<PathBuf>,
    /// Where the log is.
    #[command(flatten)]
    pub(crate) log: LogArgs,
}

/// `token` subcommands.
#[derive(Debug, Subcommand)]
pub(crate) enum TokenCommand {
    /// Generate a service token; print it once, with the config snippet for the daemon.
    New {
        /// The token's name in the daemon's config and policies (ASCII letters, digits, '-',
        /// '_', '.'; at most 128).
        #[arg(long, value_parser = crate::token::parse_name)]
        name: String,
    },
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn command_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("phiseal").chain(args.iter().copied()))
    }

    #[test]
    fn batch_is_bounded() {
        assert!(parse(&["rewrap", "--tenant", "t", "--batch", "0"]).is_err());
        assert!(parse(&["rewrap", "--tenant", "t", "--batch", "10001"]).is_err());
        let cli = parse(&["rewrap", "--tenant", "t", "--batch", "10000"]).unwrap();
        let Command::Rewrap(args) = cli.command else {
            panic!("not rewrap")
        };
        assert_eq!(args.batch, 10_000);
        let cli = parse(&["rewrap", "--tenant", "t"]).unwrap();
        let Command::Rewrap(args) = cli.command else {
            panic!("not rewrap")
        };
        assert_eq!(args.batch, 500);
    }

    #[test]
    fn resume_requires_output() {
        let err = parse(&["rewrap", "--tenant", "t", "--resume"]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        assert!(parse(&["rewrap", "--tenant", "t", "--resume", "--output", "f"]).is_ok());
    }

    #[test]
    fn global_flags_go_anywhere() {
        let cli = parse(&["key", "status", "--tenant", "t", "--json", "--timeout", "5"]).unwrap();
        assert!(cli.global.json);
        assert_eq!(cli.global.timeout, 5);
        assert!(parse(&["--timeout", "0", "key", "status", "--tenant", "t"]).is_err());
    }

    #[test]
    fn min_version_takes_version() {
        let cli = parse(&["key", "min-version", "--tenant", "t", "--version", "3"]).unwrap();
        let Command::Key(KeyCommand::MinVersion(args)) = cli.command else {
            panic!("not min-version")
        };
        assert_eq!(args.version, 3);
        assert!(parse(&["key", "min-version", "--tenant", "t", "--version", "0"]).is_err());
    }

    #[test]
    fn data_dir_conflicts_with_log() {
        assert!(parse(&["audit", "verify", "--data-dir", "d", "--log", "f"]).is_err());
        assert!(parse(&["audit", "export", "--tenant", "t", "--since", "nope"]).is_err());
        assert!(
            parse(&[
                "audit",
                "export",
                "--tenant",
                "t",
                "--since",
                "2025-01-01T00:00:00Z"
            ])
            .is_ok()
        );
    }
}
