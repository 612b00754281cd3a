//! Ciphertext format v1: parsing and layout. Byte-by-byte specification: `docs/FORMAT.md`.
//!
//! ```text
//! offset  size  field
//! 0       1     format version = 0x01
//! 1       1     algorithm id (0x01 AES-256-GCM with HKDF subkeys, 0x02 XChaCha20-Poly1305,
//!               0x03 deterministic AES-256-SIV)
//! 2       4     tenant key version, big-endian u32, >= 1
//! 6       n     algorithm-specific nonce material (0x01: 10-byte key salt ‖ 12-byte nonce;
//!               0x02: 24-byte nonce; 0x03: the 16-byte synthetic IV, which is also the tag)
//! 6+n     …     ciphertext (same length as the plaintext)
//! end-t   t     tag (t = 16 for 0x01 and 0x02; t = 0 for 0x03, whose SIV authenticates)
//! ```
//! Text form: `phs1:` followed by the binary form in unpadded base64url.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use crate::crypto::TAG_LEN;
use crate::error::FormatError;

/// The only format version this library writes and reads.
pub const FORMAT_V1: u8 = 0x01;
/// Prefix of the text form.
pub const TEXT_PREFIX: &str = "phs1:";
/// Bytes before the nonce material: version, algorithm, key version.
pub const FIXED_HEADER_LEN: usize = 6;
/// Length of the per-epoch key salt of [`Algorithm::Aes256GcmHkdf`].
pub const KEY_SALT_LEN: usize = 10;
/// Length of the synthetic IV of [`Algorithm::Aes256Siv`] (RFC 5297), its nonce material.
pub const SIV_LEN: usize = 16;

/// A field-encryption algorithm, by its format id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Algorithm {
    /// 0x01, the default: AES-256-GCM under a subkey derived with HKDF-SHA256 from the tenant
    /// key and a random 10-byte salt that is reused for one encryption epoch (at most 2^32
    /// messages), with the nonce `random 4-byte epoch prefix ‖ 64-bit message counter`
    /// (`docs/FORMAT.md` §7).
    Aes256GcmHkdf,
    /// 0x02: XChaCha20-Poly1305 with a random 192-bit nonce, for hosts without AES-NI.
    XChaCha20Poly1305,
    /// 0x03: deterministic AES-256-SIV (RFC 5297) under a key derived per tenant key version
    /// and field, for fields that must support equality lookup. Equal plaintexts of one
    /// tenant, field and key version give equal ciphertexts; no record id is bound. Written
    /// only by `Keyring::encrypt_deterministic`, never as the keyring's default algorithm.
    /// Layout: the 16-byte SIV as nonce material, no trailing tag (`docs/FORMAT.md` §3.3).
    Aes256Siv,
}

impl Algorithm {
    /// The algorithm id byte.
    pub fn id(self) -> u8 {
        match self {
            Algorithm::Aes256GcmHkdf => 0x01,
            Algorithm::XChaCha20Poly1305 => 0x02,
            Algorithm::Aes256Siv => 0x03,
        }
    }

    /// The algorithm for an id byte.
    pub fn from_id(id: u8) -> Result<Self, FormatError> {
        match id {
            0x01 => Ok(Algorithm::Aes256GcmHkdf),
            0x02 => Ok(Algorithm::XChaCha20Poly1305),
            0x03 => Ok(Algorithm::Aes256Siv),
            other => Err(FormatError::UnknownAlgorithm(other)),
        }
    }

    /// Length of the nonce material after the fixed header.
    pub fn nonce_material_len(self) -> usize {
        match self {
            Algorithm::Aes256GcmHkdf => KEY_SALT_LEN + 12,
            Algorithm::XChaCha20Poly1305 => 24,
            Algorithm::Aes256Siv => SIV_LEN,
        }
    }

    /// Length of the trailing tag: 16, or 0 for [`Algorithm::Aes256Siv`] (whose synthetic IV,
    /// in the nonce material, is the authenticator).
    pub fn tag_len(self) -> usize {
        match self {
            Algorithm::Aes256GcmHkdf | Algorithm::XChaCha20Poly1305 => TAG_LEN,
            Algorithm::Aes256Siv => 0,
        }
    }

    /// Whether equal inputs give equal ciphertexts (only [`Algorithm::Aes256Siv`]).
    pub fn is_deterministic(self) -> bool {
        matches!(self, Algorithm::Aes256Siv)
    }

    /// Full header length (everything before the ciphertext).
    pub fn header_len(self) -> usize {
        FIXED_HEADER_LEN + self.nonce_material_len()
    }

    /// Bytes a ciphertext adds to its plaintext (44, 46 and 22 bytes).
    pub fn overhead(self) -> usize {
        self.header_len() + self.tag_len()
    }

    /// A short stable name.
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Aes256GcmHkdf => "aes-256-gcm-hkdf",
            Algorithm::XChaCha20Poly1305 => "xchacha20-poly1305",
            Algorithm::Aes256Siv => "aes-256-siv",
        }
    }
}

/// A parsed view of a binary v1 ciphertext. Nothing is authenticated yet. Its `Debug` shows
/// the algorithm, the key version and the lengths, never the bytes (a ciphertext in a log
/// line is PHI at rest in another place).
#[derive(Clone, Copy)]
pub struct ParsedCiphertext<'a> {
    /// The algorithm.
    pub algorithm: Algorithm,
    /// The tenant key version.
    pub key_version: u32,
    /// The header bytes (authenticated as part of the AAD).
    pub header: &'a [u8],
    /// The nonce material (salt ‖ nonce, the XChaCha nonce, or the AES-SIV synthetic IV).
    pub nonce_material: &'a [u8],
    /// The encrypted field.
    pub ciphertext: &'a [u8],
    /// The tag (empty for [`Algorithm::Aes256Siv`]).
    pub tag: &'a [u8],
}

impl std::fmt::Debug for ParsedCiphertext<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ParsedCiphertext")
            .field("algorithm", &self.algorithm)
            .field("key_version", &self.key_version)
            .field("ciphertext_len", &self.ciphertext.len())
            .finish_non_exhaustive()
    }
}

/// Parses a binary v1 ciphertext. Never panics; every malformation is a [`FormatError`].
pub fn parse(bytes: &[u8]) -> Result<ParsedCiphertext<'_>, FormatError> {
    let [version, alg, v0, v1, v2, v3, ..] = *bytes else {
        return Err(FormatError::Truncated {
            len: bytes.len(),
            min: Algorithm::Aes256GcmHkdf.overhead(),
        });
    };
    if version != FORMAT_V1 {
        return Err(FormatError::UnknownVersion(version));
    }
    let algorithm = Algorithm::from_id(alg)?;
    let key_version = u32::from_be_bytes([v0, v1, v2, v3]);
    if key_version == 0 {
        return Err(FormatError::ZeroKeyVersion);
    }
    let min = algorithm.overhead();
    if bytes.len() < min {
        return Err(FormatError::Truncated {
            len: bytes.len(),
            min,
        });
    }
    let truncated = FormatError::Truncated {
        len: bytes.len(),
        min,
    };
    // The length check above makes every split succeed; the checked forms keep it panic-free
    // even if that check were ever changed.
    let (header, rest) = bytes
        .split_at_checked(algorithm.header_len())
        .ok_or(truncated.clone())?;
    let (_, nonce_material) = header
        .split_at_checked(FIXED_HEADER_LEN)
        .ok_or(truncated.clone())?;
    let (ciphertext, tag) = rest
        .split_at_checked(rest.len().saturating_sub(algorithm.tag_len()))
        .ok_or(truncated)?;
    Ok(ParsedCiphertext {
        algorithm,
        key_version,
        header,
        nonce_material,
        ciphertext,
        tag,
    })
}

/// The text form of a binary ciphertext: `phs1:` + unpadded base64url.
pub fn to_text(binary: &[u8]) -> String {
    let mut out = String::with_capacity(TEXT_PREFIX.len() + binary.len().div_ceil(3) * 4);
    out.push_str(TEXT_PREFIX);
    URL_SAFE_NO_PAD.encode_string(binary, &mut out);
    out
}

/// The binary form of a text ciphertext. Checks the prefix and the encoding only; call
/// [`parse`] (or decrypt) for the rest.
pub fn from_text(text: &str) -> Result<Vec<u8>, FormatError> {
    let body = text
        .strip_prefix(TEXT_PREFIX)
        .ok_or(FormatError::BadTextPrefix)?;
    URL_SAFE_NO_PAD
        .decode(body)
        .map_err(|_| FormatError::BadBase64)
}

/// How many ciphertexts use each tenant key version (rotation progress).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VersionCounts {
    /// Ciphertext count per key version.
    pub by_version: std::collections::BTreeMap<u32, u64>,
    /// Inputs that are not v1 ciphertexts.
    pub malformed: u64,
}

/// Counts the key versions named by `ciphertexts` (binary form). Reads headers only: no key
/// material is touched, nothing is authenticated, so use it for progress, not for trust.
pub fn count_versions<'a>(ciphertexts: impl IntoIterator<Item = &'a [u8]>) -> VersionCounts {
    let mut counts = VersionCounts::default();
    for ciphertext in ciphertexts {
        match parse(ciphertext) {
            Ok(parsed) => *counts.by_version.entry(parsed.key_version).or_default() += 1,
            Err(_) => counts.malformed += 1,
        }
    }
    counts
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]
    use super::*;

    fn sample(alg: Algorithm, pt_len: usize) -> Vec<u8> {
        let mut v = vec![FORMAT_V1, alg.id(), 0, 0, 0, 7];
        v.resize(alg.overhead() + pt_len, 0xAB);
        v
    }

    #[test]
    fn a_parsed_ciphertext_debugs_without_its_bytes() {
        let bytes = sample(Algorithm::Aes256GcmHkdf, 5);
        let shown = format!("{:?}", parse(&bytes).unwrap());
        assert!(shown.contains("key_version: 7") && shown.contains("ciphertext_len: 5"));
        // 0xAB = 171: no byte list in any base.
        assert!(
            !shown.contains("171") && !shown.to_lowercase().contains("ab"),
            "{shown}"
        );
    }

    #[test]
    fn overhead_of_default_is_44_bytes() {
        assert_eq!(Algorithm::Aes256GcmHkdf.overhead(), 44);
        assert_eq!(Algorithm::XChaCha20Poly1305.overhead(), 46);
        assert_eq!(Algorithm::Aes256Siv.overhead(), 22);
    }

    #[test]
    fn ids_round_trip() {
        for alg in [
            Algorithm::Aes256GcmHkdf,
            Algorithm::XChaCha20Poly1305,
            Algorithm::Aes256Siv,
        ] {
            assert_eq!(Algorithm::from_id(alg.id()).unwrap(), alg);
        }
        assert!(Algorithm::Aes256Siv.is_deterministic());
        assert!(!Algorithm::Aes256GcmHkdf.is_deterministic());
        assert_eq!(
            Algorithm::from_id(0x04),
            Err(FormatError::UnknownAlgorithm(4))
        );
    }

    #[test]
    fn parses_siv_layout() {
        let c = sample(Algorithm::Aes256Siv, 5);
        let p = parse(&c).unwrap();
        assert_eq!(p.algorithm, Algorithm::Aes256Siv);
        assert_eq!(p.header.len(), 22);
        assert_eq!(p.nonce_material.len(), 16);
        assert_eq!(p.ciphertext.len(), 5);
        assert!(p.tag.is_empty());
        // Empty plaintext: exactly the 22-byte overhead; one byte less is truncated.
        let c = sample(Algorithm::Aes256Siv, 0);
        assert_eq!(parse(&c).unwrap().ciphertext.len(), 0);
        assert_eq!(
            parse(&c[..21]).unwrap_err(),
            FormatError::Truncated { len: 21, min: 22 }
        );
    }

    #[test]
    fn parses_fields() {
        let c = sample(Algorithm::Aes256GcmHkdf, 5);
        let p = parse(&c).unwrap();
        assert_eq!(p.key_version, 7);
        assert_eq!(p.header.len(), 28);
        assert_eq!(p.nonce_material.len(), 22);
        assert_eq!(p.ciphertext.len(), 5);
        assert_eq!(p.tag.len(), 16);
    }

    #[test]
    fn rejects_malformed() {
        assert!(matches!(parse(&[]), Err(FormatError::Truncated { .. })));
        assert!(matches!(
            parse(&[2, 1, 0, 0, 0, 1]),
            Err(FormatError::UnknownVersion(2))
        ));
        assert!(matches!(
            parse(&[1, 4, 0, 0, 0, 1]),
            Err(FormatError::UnknownAlgorithm(4))
        ));
        assert!(matches!(
            parse(&[1, 9, 0, 0, 0, 1]),
            Err(FormatError::UnknownAlgorithm(9))
        ));
        let mut c = sample(Algorithm::Aes256GcmHkdf, 0);
        c[5] = 0;
        assert_eq!(parse(&c).unwrap_err(), FormatError::ZeroKeyVersion);
        let c = sample(Algorithm::XChaCha20Poly1305, 0);
        assert!(parse(&c[..c.len() - 1]).is_err());
        assert!(parse(&c).is_ok());
    }

    #[test]
    fn never_panics_on_any_short_input() {
        for len in 0..64 {
            for fill in [0u8, 1, 2, 0xff] {
                let mut v = vec![fill; len];
                if len > 1 {
                    v[0] = 1;
                    v[1] = fill;
                }
                let _ = parse(&v);
            }
        }
    }

    #[test]
    fn text_round_trip_and_errors() {
        let c = sample(Algorithm::Aes256GcmHkdf, 3);
        let t = to_text(&c);
        assert!(t.starts_with("phs1:"));
        assert_eq!(from_text(&t).unwrap(), c);
        assert_eq!(from_text("xx1:AAAA"), Err(FormatError::BadTextPrefix));
        assert_eq!(from_text("phs1:AA=="), Err(FormatError::BadBase64));
        assert_eq!(from_text("phs1:@@"), Err(FormatError::BadBase64));
    }
}
