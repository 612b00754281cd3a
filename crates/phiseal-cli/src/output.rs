//! Writing to stdout and stderr, and making daemon-supplied text safe for a terminal.

use std::borrow::Cow;
use std::io::Write;

use crate::error::CliError;

/// Writes `bytes` to stdout (locked) and flushes.
pub(crate) fn stdout_bytes(bytes: &[u8]) -> Result<(), CliError> {
    let mut out = std::io::stdout().lock();
    out.write_all(bytes)
        .and_then(|()| out.flush())
        .map_err(CliError::io("writing to stdout"))
}

/// Writes `secret` (a decrypted value, or a line holding one) to stdout without the standard
/// library's stdout buffer, which would keep a copy of its tail until the process exits:
/// straight to file descriptor 1, after flushing what is buffered before it.
pub(crate) fn stdout_secret(secret: &[u8]) -> Result<(), CliError> {
    use std::os::fd::AsFd;
    let mut out = std::io::stdout().lock();
    out.flush().map_err(CliError::io("writing to stdout"))?;
    let mut rest = secret;
    while !rest.is_empty() {
        match rustix::io::write(out.as_fd(), rest) {
            Ok(0) => {
                return Err(CliError::io("writing to stdout")(
                    std::io::ErrorKind::WriteZero.into(),
                ));
            }
            Ok(written) => rest = rest.get(written..).unwrap_or_default(),
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(CliError::io("writing to stdout")(e.into())),
        }
    }
    Ok(())
}

/// Writes `value` as one line of compact JSON to stdout.
pub(crate) fn stdout_json(value: &serde_json::Value) -> Result<(), CliError> {
    let mut line = value.to_string();
    line.push('\n');
    stdout_bytes(line.as_bytes())
}

/// The result of a command: `value` as JSON with `--json`, else `human` (a newline is added).
pub(crate) fn report(json: bool, value: &serde_json::Value, human: &str) -> Result<(), CliError> {
    if json {
        stdout_json(value)
    } else {
        stdout_bytes(format!("{human}\n").as_bytes())
    }
}

/// Writes one line to stderr. Best effort: there is nowhere to report a failure to.
pub(crate) fn stderr_line(line: &str) {
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "{line}");
}

/// A note for the operator on stderr: the text, or with `--json` one object `{"note": …}`
/// (so that everything the CLI writes under `--json` is JSON lines).
pub(crate) fn stderr_note(json: bool, text: &str) {
    if json {
        stderr_line(&serde_json::json!({ "note": text }).to_string());
    } else {
        stderr_line(text);
    }
}

/// `s` with every control character replaced by `?`, so that text from the daemon or from an
/// input file cannot drive the operator's terminal.
pub(crate) fn printable(s: &str) -> Cow<'_, str> {
    if s.chars().any(char::is_control) {
        Cow::Owned(
            s.chars()
                .map(|c| if c.is_control() { '?' } else { c })
                .collect(),
        )
    } else {
        Cow::Borrowed(s)
    }
}

/// A usage error's message without the text clap could not use, for the errors whose message
/// would quote it (an unexpected argument, an invalid value or subcommand): that text may be
/// a value, such as PHI typed where a flag was expected. A flag name (`--tenat`) is kept;
/// `None` for the other errors (clap's own message then).
pub(crate) fn usage_without_values(error: &clap::Error) -> Option<String> {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    let context = |kind| match error.get(kind) {
        Some(ContextValue::String(s)) => Some(s.clone()),
        _ => None,
    };
    let hint = "run with --help for the usage";
    match error.kind() {
        ErrorKind::UnknownArgument => {
            let arg = context(ContextKind::InvalidArg).unwrap_or_default();
            // A flag is named (without any `=value`); anything else may be a value.
            Some(match arg.strip_prefix('-') {
                Some(_) => format!(
                    "unexpected argument '{}' ({hint})",
                    arg.split('=').next().unwrap_or_default()
                ),
                None => format!(
                    "unexpected argument (not shown: it could be a value; values go on stdin \
                     or in files) ({hint})"
                ),
            })
        }
        ErrorKind::InvalidSubcommand => Some(format!(
            "unrecognized subcommand (not shown: it could be a value) ({hint})"
        )),
        ErrorKind::InvalidValue | ErrorKind::ValueValidation => {
            let arg = context(ContextKind::InvalidArg).unwrap_or_else(|| "an argument".into());
            let value = context(ContextKind::InvalidValue).unwrap_or_default();
            // The parser's reason, unless it repeats the value.
            let reason = std::error::Error::source(error)
                .map(ToString::to_string)
                .filter(|r| value.is_empty() || !r.contains(&value))
                .map(|r| format!(": {r}"))
                .unwrap_or_default();
            Some(format!(
                "invalid value for {arg} (not shown){reason} ({hint})"
            ))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn printable_replaces_control_characters() {
        assert_eq!(printable("plain text"), "plain text");
        assert_eq!(printable("a\x1b[2Jb\nc\u{7f}"), "a?[2Jb?c?");
    }
}
