//! `phiseal`: the operator's command-line tool for a phiseal deployment.
//!
//! Most commands talk to the sidecar daemon `phiseald` over its Unix socket (`--socket`, env
//! `PHISEAL_SOCKET`, default `/run/phiseal/phiseald.sock`) through the gRPC contract in
//! `proto/phiseal/v1/phiseal.proto`, optionally authenticated by a service token
//! (`--token-file`, or the token itself in env `PHISEAL_TOKEN`). `audit` reads the audit log
//! file directly, `token new` works offline, and `root rotate` / `root migrate` open the key
//! store and KMS of a daemon config directly.
//!
//! # Exit codes
//!
//! | code | meaning |
//! | ---- | ------- |
//! | 0 | success |
//! | 1 | other failure: invalid argument, decryption failed, internal error, I/O error |
//! | 2 | usage error (clap's own; `shred` without confirmation and without a terminal; an existing `encrypt-file` / `decrypt-file` output; a non-empty `rewrap --output` without `--resume`, or a `rewrap` whose output or stdout is its input) |
//! | 3 | denied: `PERMISSION_DENIED`, `UNAUTHENTICATED`, or the socket's permissions keep this user out |
//! | 4 | not found: `NOT_FOUND` |
//! | 5 | unavailable: `UNAVAILABLE`, `DEADLINE_EXCEEDED`, `RESOURCE_EXHAUSTED`, `UNKNOWN` (the connection broke mid-call), or the socket cannot be reached |
//! | 6 | key destroyed or retired: `FAILED_PRECONDITION` |
//! | 7 | `rewrap` or `root rotate` / `root migrate` finished, but some items failed (for `rewrap`, also in earlier runs of a resumed output) |
//! | 8 | the audit log has problems (verification failed, broken chain, torn tail) |
//!
//! Errors are printed on stderr as `phiseal: <what failed>: <message> (<kind>)`. No error
//! message contains plaintext, ciphertext or token bytes.
#![forbid(unsafe_code)]

mod admin;
mod audit;
mod cli;
mod client;
mod error;
mod field;
mod health;
mod output;
mod partial;
mod rewrap;
mod root;
mod search;
mod shred;
mod stream;
mod token;
mod wiped;

use std::process::ExitCode;

use clap::Parser;

use crate::cli::{Cli, Command};
use crate::error::CliError;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if e.use_stderr() => {
            // clap's message quotes what it could not use, which may be a value — PHI typed
            // on the command line by mistake — on its way to a log: not repeated here.
            let usage = CliError::Usage(
                output::usage_without_values(&e)
                    .unwrap_or_else(|| e.render().to_string().trim_end().to_owned()),
            );
            // Under --json a usage error is a JSON line too.
            if json_requested() {
                output::stderr_line(&usage.to_json().to_string());
            } else {
                output::stderr_line(&format!("phiseal: {usage}"));
            }
            return ExitCode::from(usage.exit_code());
        }
        // --help and --version print as usual.
        Err(e) => e.exit(),
    };
    let json = cli.global.json;
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if json => {
            output::stderr_line(&e.to_json().to_string());
            ExitCode::from(e.exit_code())
        }
        Err(e) => {
            output::stderr_line(&format!("phiseal: {e}"));
            ExitCode::from(e.exit_code())
        }
    }
}

/// Whether `--json` is among the arguments (before a `--`), for errors of arguments that could
/// not be parsed.
fn json_requested() -> bool {
    std::env::args_os()
        .skip(1)
        .take_while(|a| a != "--")
        .any(|a| a == "--json")
}

/// Runs one command: the offline ones directly, the others on a single-threaded runtime.
fn run(cli: Cli) -> Result<(), CliError> {
    // The CLI holds what the daemon does — decrypted values, tokens, and for the root-key
    // commands every tenant key and the KMS credentials: no core dump of it, and no ptrace
    // by other processes of the same user.
    phiseald::hardening::disable_core_dumps()?;
    let global = &cli.global;
    match cli.command {
        Command::Audit(cmd) => audit::run(cmd, global),
        Command::Token(cmd) => token::run(cmd, global),
        Command::Health => block_on(health::health(global)),
        Command::Tenant(cmd) => block_on(admin::tenant(cmd, global)),
        Command::Key(cmd) => block_on(admin::key(cmd, global)),
        Command::Encrypt(args) => block_on(field::encrypt(args, global)),
        Command::EncryptFile(args) => block_on(stream::encrypt_file(args, global)),
        Command::DecryptFile(args) => block_on(stream::decrypt_file(args, global)),
        Command::BlindIndex(args) => block_on(search::blind_index(args, global)),
        Command::SearchTerms(args) => block_on(search::search_terms(args, global)),
        Command::Decrypt(args) => block_on(field::decrypt(args, global)),
        Command::Rewrap(args) => block_on(rewrap::run(args, global)),
        Command::Shred(args) => block_on(shred::run(args, global)),
        Command::Root(cmd) => block_on(root::run(cmd, global)),
    }
}

/// Drives `fut` to completion on a current-thread tokio runtime.
fn block_on(fut: impl Future<Output = Result<(), CliError>>) -> Result<(), CliError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| CliError::Io {
            what: "cannot start the async runtime".to_owned(),
            source,
        })?
        .block_on(fut)
}
