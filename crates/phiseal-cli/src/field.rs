//! `encrypt` and `decrypt`: one field through stdin and stdout.

use std::io::{IsTerminal, Read};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use phiseal_proto::v1::{Context, DecryptRequest, EncryptRequest};
use serde_json::json;
use zeroize::Zeroizing;

use crate::cli::{EncryptArgs, FieldArgs, GlobalArgs};
use crate::client::Daemon;
use crate::error::CliError;
use crate::output::{stdout_bytes, stdout_json, stdout_secret};

impl FieldArgs {
    /// The encryption context named by the arguments.
    pub(crate) fn context(&self) -> Context {
        Context {
            tenant: self.tenant.clone(),
            field: self.field.clone(),
            record: self.record.clone(),
        }
    }
}

/// The most stdin bytes read for one field (64 MiB). The daemon refuses messages over its
/// `limits.max_message_bytes` (4 MiB by default) anyway; past this the command stops reading
/// instead of holding an unbounded input in memory.
const MAX_STDIN_BYTES: usize = 64 << 20;

/// All of stdin, as raw bytes (wiped when dropped, and so is every buffer on the way); a
/// usage error, without reading further, if it holds more than [`MAX_STDIN_BYTES`].
pub(crate) fn read_stdin() -> Result<Zeroizing<Vec<u8>>, CliError> {
    let limit = MAX_STDIN_BYTES as u64 + 1;
    let value = crate::wiped::read_to_end_wiped(&mut std::io::stdin().lock().take(limit))
        .map_err(CliError::io("reading stdin"))?;
    if value.len() > MAX_STDIN_BYTES {
        return Err(CliError::Usage(format!(
            "stdin holds more than {} MiB, too much for one field (the daemon's limit is its \
             limits.max_message_bytes, 4 MiB by default); encrypt files with `phiseal \
             encrypt-file`",
            MAX_STDIN_BYTES >> 20
        )));
    }
    Ok(value)
}

/// The value to encrypt or index: all of stdin, byte for byte; but typed at a terminal, the
/// newline that ended the typed line is not part of the value (it would make deterministic
/// ciphertexts and blind indexes silently differ from the stored ones).
pub(crate) fn read_value() -> Result<Zeroizing<Vec<u8>>, CliError> {
    let mut value = read_stdin()?;
    if std::io::stdin().is_terminal() {
        strip_line_end(&mut value);
    }
    Ok(value)
}

/// Removes one final `\n` or `\r\n`.
fn strip_line_end(value: &mut Vec<u8>) {
    if value.last() == Some(&b'\n') {
        value.pop();
        if value.last() == Some(&b'\r') {
            value.pop();
        }
    }
}

/// Encrypts the value on stdin ([`read_value`]) and prints the `phs1:` text form plus a
/// newline.
pub(crate) async fn encrypt(args: EncryptArgs, global: &GlobalArgs) -> Result<(), CliError> {
    let mut plaintext = read_value()?;
    let daemon = Daemon::connect(global).await?;
    // Moved into the request: the gRPC stack's copies are out of reach anyway.
    let request = EncryptRequest {
        context: Some(args.field.context()),
        plaintext: std::mem::take(&mut *plaintext),
    };
    let response = if args.deterministic {
        daemon
            .call(
                "encrypt (deterministic)",
                daemon.field().encrypt_deterministic(request),
            )
            .await?
    } else {
        daemon
            .call("encrypt", daemon.field().encrypt(request))
            .await?
    };
    let text = phiseal::format::to_text(&response.ciphertext);
    if global.json {
        stdout_json(&json!({ "ciphertext": text, "key_version": response.key_version }))
    } else {
        stdout_bytes(format!("{text}\n").as_bytes())
    }
}

/// The binary ciphertext from the text on stdin (surrounding ASCII whitespace trimmed).
fn parse_ciphertext(input: &[u8]) -> Result<Vec<u8>, CliError> {
    let text = std::str::from_utf8(input.trim_ascii()).map_err(|_| {
        CliError::Failed("decrypt: stdin is not a phs1: ciphertext (not UTF-8 text)".into())
    })?;
    phiseal::format::from_text(text)
        .map_err(|e| CliError::Failed(format!("decrypt: stdin is not a phs1: ciphertext ({e})")))
}

/// The plaintext as shown on a terminal: invalid UTF-8 replaced, control characters other
/// than newline and tab escaped (`\u{1b}`: a decrypted value must not drive the operator's
/// terminal), and a final newline so that the prompt does not run into it. Wiped on drop; sized
/// before it is filled, so that no grown-out-of buffer is left behind unwiped.
fn terminal_view(plaintext: &[u8]) -> Zeroizing<String> {
    // What `String::from_utf8_lossy` would give, without its intermediate copy.
    let chars = || {
        plaintext.utf8_chunks().flat_map(|chunk| {
            let invalid = !chunk.invalid().is_empty();
            chunk
                .valid()
                .chars()
                .chain(invalid.then_some(char::REPLACEMENT_CHARACTER))
        })
    };
    let escaped = |c: char| c.is_control() && c != '\n' && c != '\t';
    let len = chars()
        .map(|c| {
            if escaped(c) {
                c.escape_unicode().len()
            } else {
                c.len_utf8()
            }
        })
        .fold(1, usize::saturating_add);
    let mut shown = Zeroizing::new(String::with_capacity(len));
    for c in chars() {
        if escaped(c) {
            shown.extend(c.escape_unicode());
        } else {
            shown.push(c);
        }
    }
    if !shown.ends_with('\n') {
        shown.push('\n');
    }
    shown
}

/// Decrypts the ciphertext on stdin and writes the raw plaintext (no newline added), or on a
/// terminal its [`terminal_view`].
pub(crate) async fn decrypt(args: FieldArgs, global: &GlobalArgs) -> Result<(), CliError> {
    let ciphertext = parse_ciphertext(&read_stdin()?)?;
    let daemon = Daemon::connect(global).await?;
    let request = DecryptRequest {
        context: Some(args.context()),
        ciphertext,
    };
    let response = daemon
        .call("decrypt", daemon.field().decrypt(request))
        .await?;
    let plaintext = Zeroizing::new(response.plaintext);
    if global.json {
        // Built by hand (base64 needs no JSON escaping) in buffers of their final size, so
        // that the only copies are the wiped ones.
        let encoded = Zeroizing::new(STANDARD.encode(&*plaintext));
        let version = response.key_version.to_string();
        let (head, middle, tail) = ("{\"plaintext_base64\":\"", "\",\"key_version\":", "}\n");
        let mut line = Zeroizing::new(String::with_capacity(
            head.len() + encoded.len() + middle.len() + version.len() + tail.len(),
        ));
        for piece in [head, encoded.as_str(), middle, &version, tail] {
            line.push_str(piece);
        }
        stdout_secret(line.as_bytes())
    } else if std::io::stdout().is_terminal() {
        stdout_secret(terminal_view(&plaintext).as_bytes())
    } else {
        stdout_secret(&plaintext)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn one_typed_line_end_is_stripped() {
        for (typed, value) in [
            (&b"078051120\n"[..], &b"078051120"[..]),
            (b"078051120\r\n", b"078051120"),
            (b"078051120", b"078051120"),
            (b"two\n\n", b"two\n"),
            (b"", b""),
        ] {
            let mut v = typed.to_vec();
            strip_line_end(&mut v);
            assert_eq!(v, value);
        }
    }

    #[test]
    fn terminal_view_escapes_control_characters_and_ends_the_line() {
        assert_eq!(
            terminal_view(b"a\x1b[2Jb\nc\td\x7f\xff").as_str(),
            "a\\u{1b}[2Jb\nc\td\\u{7f}\u{fffd}\n"
        );
        assert_eq!(terminal_view(b"line\n").as_str(), "line\n");
        assert_eq!(terminal_view(b"").as_str(), "\n");
        // As from_utf8_lossy would replace, in a buffer that never had to grow.
        for input in [
            &b"\xf0\x9f\x98"[..],
            b"a\xe2\x82b\xc0\xafc\xed\xa0\x80\x01",
            "é😀\u{1}\u{9b}".as_bytes(),
            b"\xff\xfe\n",
        ] {
            let view = terminal_view(input);
            let mut want = String::new();
            for c in String::from_utf8_lossy(input).chars() {
                if c.is_control() && c != '\n' && c != '\t' {
                    want.extend(c.escape_unicode());
                } else {
                    want.push(c);
                }
            }
            if !want.ends_with('\n') {
                want.push('\n');
            }
            assert_eq!(view.as_str(), want, "{input:?}");
            assert!(view.capacity() <= view.len() + 1, "{input:?}: it grew");
        }
    }

    #[test]
    fn ciphertext_text_is_trimmed_and_checked() {
        let binary = vec![1u8, 1, 0, 0, 0, 1, 9, 9];
        let text = phiseal::format::to_text(&binary);
        assert_eq!(
            parse_ciphertext(format!("  {text}\r\n").as_bytes()).unwrap(),
            binary
        );
        let err = parse_ciphertext(b"xyz1:AAAA").unwrap_err().to_string();
        assert!(err.contains("not a phs1: ciphertext"), "{err}");
        assert!(!err.contains("AAAA"), "{err}");
        assert!(parse_ciphertext(b"phs1:@@").is_err());
        assert!(parse_ciphertext(b"\xff\xfe").is_err());
    }
}
