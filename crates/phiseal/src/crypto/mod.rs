//! The crypto-provider seam, in the manner of rustls' `CryptoProvider`: a plain struct of
//! primitive implementations, passed to the keyring as a value.
//!
//! Two providers ship: [`aws_lc::PROVIDER`] (default; aws-lc-rs, FIPS-capable, fastest here)
//! and [`rust_crypto::PROVIDER`] (pure Rust, for targets where aws-lc cannot build). Both pass
//! the same known-answer and Wycheproof vectors, and each decrypts what the other encrypts.

#[cfg(feature = "aws-lc")]
pub mod aws_lc;
pub mod rust_crypto;

use zeroize::Zeroizing;

/// Length of every AEAD tag used by phiseal.
pub const TAG_LEN: usize = 16;

/// A primitive failed. Authentication failures and misuse are not distinguished here; the
/// keyring maps this to one opaque error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CryptoFailure;

/// An AEAD with 256-bit keys and 16-byte tags.
pub trait AeadAlgorithm: Send + Sync {
    /// Nonce length in bytes (12 for AES-GCM, 24 for XChaCha20-Poly1305).
    fn nonce_len(&self) -> usize;

    /// Prepares a key (key schedule, GHASH tables …) for many operations.
    fn key(&self, key: &[u8; 32]) -> Result<Box<dyn AeadKey>, CryptoFailure>;
}

/// A prepared AEAD key. Implementations zeroize their key schedule on drop where the
/// underlying library allows it (see each provider's notes), and must not panic: callers wipe
/// their buffers (which may hold plaintext) when an operation returns an error, not when it
/// unwinds.
pub trait AeadKey: Send + Sync {
    /// Encrypts `in_out` in place and returns the tag.
    fn seal(
        &self,
        nonce: &[u8],
        aad: &[u8],
        in_out: &mut [u8],
    ) -> Result<[u8; TAG_LEN], CryptoFailure>;

    /// Encrypts `plaintext` into `out` (same length) and returns the tag. The default copies
    /// the plaintext into `out` and seals it in place; a provider with an out-of-place
    /// primitive saves that pass over the data.
    fn seal_into(
        &self,
        nonce: &[u8],
        aad: &[u8],
        plaintext: &[u8],
        out: &mut [u8],
    ) -> Result<[u8; TAG_LEN], CryptoFailure> {
        if out.len() != plaintext.len() {
            return Err(CryptoFailure);
        }
        out.copy_from_slice(plaintext);
        self.seal(nonce, aad, out)
    }

    /// Decrypts `ciphertext` with `tag` into `out` (same length). On failure `out` holds no
    /// plaintext (it is zeroed).
    fn open(
        &self,
        nonce: &[u8],
        aad: &[u8],
        ciphertext: &[u8],
        tag: &[u8],
        out: &mut [u8],
    ) -> Result<(), CryptoFailure>;
}

/// HKDF-SHA256 (RFC 5869) producing 32- and 64-byte keys. Implementations wipe their
/// intermediate state (the pseudorandom key) where the underlying library allows it.
pub trait Hkdf: Send + Sync {
    /// Extract-then-expand: `HKDF(salt, ikm, info = concat(info))`, 32 bytes.
    fn derive(&self, ikm: &[u8], salt: &[u8], info: &[&[u8]]) -> Zeroizing<[u8; 32]>;
    /// The same with 64 bytes of output (an AES-256-SIV key); its first 32 bytes are
    /// [`Hkdf::derive`]'s.
    fn derive_64(&self, ikm: &[u8], salt: &[u8], info: &[&[u8]]) -> Zeroizing<[u8; 64]>;
}

/// HMAC-SHA256.
pub trait Hmac: Send + Sync {
    /// `HMAC(key, concat(message))`.
    fn sign(&self, key: &[u8], message: &[&[u8]]) -> [u8; 32];
}

/// SHA-256.
pub trait Sha256: Send + Sync {
    /// `SHA-256(concat(parts))`.
    fn digest(&self, parts: &[&[u8]]) -> [u8; 32];
}

/// A set of primitive implementations.
pub struct CryptoProvider {
    /// Provider name, for errors and benchmarks.
    pub name: &'static str,
    /// AES-256-GCM with 96-bit nonces.
    pub aes_256_gcm: &'static dyn AeadAlgorithm,
    /// XChaCha20-Poly1305 with 192-bit nonces.
    pub xchacha20_poly1305: &'static dyn AeadAlgorithm,
    /// HKDF-SHA256.
    pub hkdf_sha256: &'static dyn Hkdf,
    /// HMAC-SHA256.
    pub hmac_sha256: &'static dyn Hmac,
    /// SHA-256.
    pub sha256: &'static dyn Sha256,
}

impl std::fmt::Debug for CryptoProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CryptoProvider")
            .field("name", &self.name)
            .finish()
    }
}

/// The default provider: aws-lc-rs when the `aws-lc` feature is on, else RustCrypto.
pub fn default_provider() -> &'static CryptoProvider {
    #[cfg(feature = "aws-lc")]
    {
        &aws_lc::PROVIDER
    }
    #[cfg(not(feature = "aws-lc"))]
    {
        &rust_crypto::PROVIDER
    }
}

/// `N` fresh bytes from the operating system's CSPRNG, for public values such as salts and
/// nonce prefixes (not for keys: the array is not wiped).
pub(crate) fn os_random<const N: usize>(
    provider: &CryptoProvider,
) -> Result<[u8; N], crate::error::Error> {
    use rand::TryRngCore;
    let mut bytes = [0u8; N];
    rand::rngs::OsRng
        .try_fill_bytes(&mut bytes)
        .map_err(|_| crate::error::Error::Crypto {
            provider: provider.name,
            what: "OS random number generator",
        })?;
    Ok(bytes)
}

/// Constant-time equality of two byte strings (MACs, key checks, hash-chain links).
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    a.len() == b.len() && bool::from(a.ct_eq(b))
}
