//! Key material types. They cannot be printed, cloned or serialized; they zeroize on drop.

use rand::TryRngCore;
use secrecy::{ExposeSecret, ExposeSecretMut, SecretBox};
use zeroize::Zeroize;

use crate::error::{BackendError, BackendErrorKind};

/// Length of a tenant key in bytes.
pub const TENANT_KEY_LEN: usize = 32;

/// A 256-bit tenant data key in the clear. Lives only in memory; stored only wrapped by a KMS.
pub struct TenantKey(SecretBox<[u8; TENANT_KEY_LEN]>);

impl TenantKey {
    /// A fresh key from the operating system's CSPRNG.
    pub fn generate() -> Result<Self, BackendError> {
        let mut key = Self::zeroed();
        rand::rngs::OsRng
            .try_fill_bytes(key.0.expose_secret_mut())
            .map_err(|e| {
                BackendError::new(BackendErrorKind::Other, "OS random number generator failed")
                    .with_source(e)
            })?;
        Ok(key)
    }

    /// Takes ownership of key bytes (from a KMS unwrap). The caller should zeroize its copy.
    pub fn from_bytes(bytes: [u8; TENANT_KEY_LEN]) -> Self {
        let mut key = Self::zeroed();
        *key.0.expose_secret_mut() = bytes;
        key
    }

    /// Copies key bytes from a slice; `None` if the length is not 32.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        let mut key = Self::zeroed();
        if bytes.len() != TENANT_KEY_LEN {
            return None;
        }
        key.0.expose_secret_mut().copy_from_slice(bytes);
        Some(key)
    }

    fn zeroed() -> Self {
        Self(SecretBox::new(Box::new([0u8; TENANT_KEY_LEN])))
    }

    /// The key bytes, for a KMS backend to wrap or the crypto layer to derive from.
    pub fn expose(&self) -> &[u8; TENANT_KEY_LEN] {
        self.0.expose_secret()
    }
}

impl std::fmt::Debug for TenantKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TenantKey([REDACTED])")
    }
}

/// A decrypted field. Derefs to its bytes; zeroized when dropped (with one bulk write — not
/// `Zeroizing<Vec<u8>>`, whose per-byte volatile writes cost about a nanosecond a byte).
/// Its `Debug` shows only the length.
pub struct Plaintext(Vec<u8>);

impl Plaintext {
    /// A zero-filled buffer of `len` bytes to decrypt into.
    pub(crate) fn zeroed(len: usize) -> Self {
        Self(vec![0; len])
    }

    /// The buffer, for the decryptor to write into.
    pub(crate) fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.0
    }

    /// The plaintext bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl std::ops::Deref for Plaintext {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for Plaintext {
    fn drop(&mut self) {
        // `[u8]::zeroize` is a bulk fill behind an optimization barrier. The vector never
        // grows, so there is no spare capacity or earlier allocation holding plaintext.
        self.0.as_mut_slice().zeroize();
    }
}

impl std::fmt::Debug for Plaintext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Plaintext([REDACTED; {} bytes])", self.0.len())
    }
}

/// Makes room in `buf` for `additional` more bytes without leaving its contents (plaintext) in
/// freed memory: where `Vec` would reallocate and free the old buffer as it is, the bytes are
/// copied into a buffer at least twice as large and the old one is wiped. For buffers that
/// collect plaintext piece by piece (stream output, stdin).
pub fn reserve_wiped(buf: &mut Vec<u8>, additional: usize) {
    if buf.capacity() - buf.len() >= additional {
        return;
    }
    let wanted = buf.len().saturating_add(additional);
    let mut grown = Vec::with_capacity(wanted.max(buf.capacity().saturating_mul(2)));
    grown.extend_from_slice(buf);
    // Wipes the whole capacity of the old buffer, then it is freed.
    buf.zeroize();
    *buf = grown;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_grows_into_a_new_buffer_only_when_it_must() {
        let mut out = Vec::with_capacity(10);
        out.extend_from_slice(b"abc");
        let ptr = out.as_ptr();
        reserve_wiped(&mut out, 7);
        assert_eq!(
            (out.as_ptr(), out.as_slice()),
            (ptr, &b"abc"[..]),
            "room enough"
        );
        reserve_wiped(&mut out, 8);
        assert_eq!(out, b"abc", "contents kept");
        assert!(out.capacity() >= 20, "at least doubled: {}", out.capacity());
        let mut empty = Vec::new();
        reserve_wiped(&mut empty, 5);
        assert!(empty.is_empty() && empty.capacity() >= 5);
    }
}
