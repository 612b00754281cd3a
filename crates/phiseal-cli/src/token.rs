//! `token new`: generates a service token and the daemon config snippet that admits it.
//!
//! A token is `phst_` followed by 32 bytes from the OS random number generator in unpadded
//! base64url. The daemon stores only the SHA-256 (hex) of the full token text.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::TryRngCore;
use rand::rngs::OsRng;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::cli::{GlobalArgs, TokenCommand};
use crate::error::CliError;
use crate::output::{stderr_note, stdout_secret};

/// The prefix of every service token.
pub(crate) const TOKEN_PREFIX: &str = "phst_";

/// Random bytes in a token.
const TOKEN_BYTES: usize = 32;

/// Runs a `token` subcommand.
pub(crate) fn run(cmd: TokenCommand, global: &GlobalArgs) -> Result<(), CliError> {
    match cmd {
        TokenCommand::New { name } => new_token(&name, global.json),
    }
}

/// Checks a token name (clap value parser): the characters the daemon's config accepts,
/// which also need no quoting in TOML.
pub(crate) fn parse_name(name: &str) -> Result<String, String> {
    let valid = (1..=128).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if valid {
        Ok(name.to_owned())
    } else {
        Err("1 to 128 ASCII letters, digits, '-', '_', '.'".to_owned())
    }
}

/// The text form of a token from its random bytes.
fn format_token(bytes: &[u8; TOKEN_BYTES]) -> Zeroizing<String> {
    let mut token = Zeroizing::new(String::with_capacity(TOKEN_PREFIX.len() + 43));
    token.push_str(TOKEN_PREFIX);
    URL_SAFE_NO_PAD.encode_string(bytes, &mut token);
    token
}

/// A new token from the OS random number generator.
fn generate() -> Result<Zeroizing<String>, CliError> {
    let mut bytes = Zeroizing::new([0u8; TOKEN_BYTES]);
    OsRng
        .try_fill_bytes(&mut *bytes)
        .map_err(|e| CliError::Failed(format!("the OS random number generator failed: {e}")))?;
    Ok(format_token(&bytes))
}

/// The hex SHA-256 of the full token text (what the daemon config holds).
fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// The daemon config snippet admitting a token.
fn config_snippet(name: &str, hash: &str) -> String {
    format!("[[tokens]]\nname = \"{name}\"\nsha256 = \"{hash}\"\n")
}

/// `pieces` concatenated in a wiped buffer of their final size (never grown: no unwiped
/// copy of the token is left behind).
fn joined(pieces: &[&str]) -> Zeroizing<String> {
    let len = pieces
        .iter()
        .map(|p| p.len())
        .fold(0, usize::saturating_add);
    let mut text = Zeroizing::new(String::with_capacity(len));
    for piece in pieces {
        text.push_str(piece);
    }
    text
}

/// The `--json` output line (members in `serde_json`'s order). The token needs no JSON
/// escaping (`phst_` and base64url); the other members are not secret.
fn json_line(
    name: &str,
    token: &str,
    hash: &str,
    snippet: &str,
) -> Result<Zeroizing<String>, CliError> {
    let quoted =
        |s: &str| serde_json::to_string(s).map_err(|e| CliError::Failed(format!("JSON: {e}")));
    let (snippet, name) = (quoted(snippet)?, quoted(name)?);
    Ok(joined(&[
        "{\"config_toml\":",
        &snippet,
        ",\"name\":",
        &name,
        ",\"sha256\":\"",
        hash,
        "\",\"token\":\"",
        token,
        "\"}\n",
    ]))
}

fn new_token(name: &str, json: bool) -> Result<(), CliError> {
    let token = generate()?;
    let hash = token_hash(&token);
    let snippet = config_snippet(name, &hash);
    let text = if json {
        json_line(name, &token, &hash, &snippet)?
    } else {
        joined(&[&token, "\n\n", &snippet])
    };
    // (Unbuffered: no copy of the token stays in the standard library's stdout buffer.)
    stdout_secret(text.as_bytes())?;
    stderr_note(
        json,
        "phiseal: the token is shown only this once: give it to the service in a file only its \
         user can read (chmod 600), and add the [[tokens]] entry to the phiseald config",
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn token_format() {
        let token = format_token(&[0xffu8; TOKEN_BYTES]);
        assert_eq!(token.as_str(), format!("phst_{}8", "_".repeat(42)));
        let token = generate().unwrap();
        assert!(token.starts_with(TOKEN_PREFIX));
        let body = token.strip_prefix(TOKEN_PREFIX).unwrap();
        assert_eq!(body.len(), 43);
        assert_eq!(URL_SAFE_NO_PAD.decode(body).unwrap().len(), TOKEN_BYTES);
        assert_ne!(generate().unwrap(), token);
    }

    #[test]
    fn hash_is_sha256_of_the_full_text() {
        // SHA-256("abc"), FIPS 180-2 appendix B.1.
        assert_eq!(
            token_hash("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let token = generate().unwrap();
        let body_only = token_hash(token.strip_prefix(TOKEN_PREFIX).unwrap());
        assert_ne!(token_hash(&token), body_only);
        assert_eq!(token_hash(&token).len(), 64);
    }

    #[test]
    fn json_line_is_the_json_object() {
        let token = generate().unwrap();
        let snippet = config_snippet("billing", "00ff");
        let line = json_line("billing", &token, "00ff", &snippet).unwrap();
        assert!(line.ends_with('\n'));
        assert_eq!(line.capacity(), line.len(), "sized once");
        let want = serde_json::json!({
            "name": "billing",
            "token": token.as_str(),
            "sha256": "00ff",
            "config_toml": snippet,
        });
        assert_eq!(line.trim_end(), want.to_string());
    }

    #[test]
    fn snippet_is_toml() {
        assert_eq!(
            config_snippet("billing", "00ff"),
            "[[tokens]]\nname = \"billing\"\nsha256 = \"00ff\"\n"
        );
    }

    #[test]
    fn names_are_restricted() {
        assert!(parse_name("billing-svc_2.prod").is_ok());
        for bad in ["", "a\"b", "a b", "x\ny", "é", "a:b", &"a".repeat(129)] {
            assert!(parse_name(bad).is_err(), "{bad:?}");
        }
    }
}
