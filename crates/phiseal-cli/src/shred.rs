//! `shred`: crypto-shreds a tenant, after the operator typed its id (or passed `--yes`).

use std::io::{BufRead, IsTerminal, Write};

use phiseal_proto::v1::ShredTenantRequest;
use serde_json::json;

use crate::cli::{GlobalArgs, ShredArgs};
use crate::client::Daemon;
use crate::error::CliError;
use crate::output::{printable, report};

/// Runs `shred`.
pub(crate) async fn run(args: ShredArgs, global: &GlobalArgs) -> Result<(), CliError> {
    if !args.yes {
        confirm(&args.tenant)?;
    }
    let daemon = Daemon::connect(global).await?;
    let request = ShredTenantRequest {
        tenant: args.tenant.clone(),
        confirm_tenant: args.tenant.clone(),
    };
    let shown = printable(&args.tenant);
    daemon
        .call(
            &format!("shred tenant '{shown}'"),
            daemon.admin().shred_tenant(request),
        )
        .await?;
    report(
        global.json,
        &json!({ "tenant": args.tenant, "shredded": true }),
        &format!(
            "tenant '{shown}' shredded: every key version is destroyed; its data can never be \
             decrypted again"
        ),
    )
}

/// Asks the operator on the terminal to type the tenant id; refuses without a terminal.
fn confirm(tenant: &str) -> Result<(), CliError> {
    let shown = printable(tenant);
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        return Err(CliError::Usage(format!(
            "refusing to shred tenant '{shown}' without confirmation: stdin is not a terminal; \
             pass --yes to confirm non-interactively"
        )));
    }
    {
        let mut err = std::io::stderr().lock();
        let _ = write!(
            err,
            "WARNING: this crypto-shreds tenant '{shown}'.\nEvery one of its key versions is \
             destroyed: everything encrypted for it can never be decrypted again, by anyone.\n\
             This cannot be undone.\nType the tenant id to confirm: "
        );
        let _ = err.flush();
    }
    let mut answer = String::new();
    stdin
        .lock()
        .read_line(&mut answer)
        .map_err(CliError::io("reading the confirmation"))?;
    if confirmation_matches(&answer, tenant) {
        Ok(())
    } else {
        Err(CliError::Failed(format!(
            "shred tenant '{shown}': the confirmation did not match the tenant id; nothing was \
             shredded"
        )))
    }
}

/// True if `answer` (one line as typed, with its line ending) is exactly `tenant`.
fn confirmation_matches(answer: &str, tenant: &str) -> bool {
    let answer = answer.strip_suffix('\n').unwrap_or(answer);
    let answer = answer.strip_suffix('\r').unwrap_or(answer);
    !tenant.is_empty() && answer == tenant
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn confirmation_must_match_exactly() {
        assert!(confirmation_matches("acme\n", "acme"));
        assert!(confirmation_matches("acme\r\n", "acme"));
        assert!(confirmation_matches("acme", "acme"));
        assert!(!confirmation_matches("acme \n", "acme"));
        assert!(!confirmation_matches(" acme\n", "acme"));
        assert!(!confirmation_matches("ACME\n", "acme"));
        assert!(!confirmation_matches("acm\n", "acme"));
        assert!(!confirmation_matches("\n", "acme"));
        assert!(!confirmation_matches("", ""));
        assert!(!confirmation_matches("\n", ""));
    }
}
