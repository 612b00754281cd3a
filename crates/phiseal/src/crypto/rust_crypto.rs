//! The pure-Rust provider on the RustCrypto crates (`aes-gcm`, `chacha20poly1305`, `hkdf`,
//! `hmac`, `sha2`). `aes-gcm` is built with `zeroize`, so key schedules are wiped on drop.

use aes_gcm::aead::{AeadInPlace, KeyInit};
use hmac::Mac;
use sha2::Digest;
use zeroize::{Zeroize, Zeroizing};

use super::{AeadAlgorithm, AeadKey, CryptoFailure, CryptoProvider, Hkdf, Hmac, Sha256, TAG_LEN};

/// The RustCrypto provider.
pub static PROVIDER: CryptoProvider = CryptoProvider {
    name: "rust-crypto",
    aes_256_gcm: &AesGcm,
    xchacha20_poly1305: &XChaCha,
    hkdf_sha256: &HkdfSha256,
    hmac_sha256: &HmacSha256,
    sha256: &Sha256Digest,
};

struct AesGcm;
struct XChaCha;
struct HkdfSha256;
struct HmacSha256;
struct Sha256Digest;

struct AesGcmKey(aes_gcm::Aes256Gcm);
struct XChaChaKey(chacha20poly1305::XChaCha20Poly1305);

impl AeadAlgorithm for AesGcm {
    fn nonce_len(&self) -> usize {
        12
    }

    fn key(&self, key: &[u8; 32]) -> Result<Box<dyn AeadKey>, CryptoFailure> {
        Ok(Box::new(AesGcmKey(aes_gcm::Aes256Gcm::new(key.into()))))
    }
}

impl AeadAlgorithm for XChaCha {
    fn nonce_len(&self) -> usize {
        24
    }

    fn key(&self, key: &[u8; 32]) -> Result<Box<dyn AeadKey>, CryptoFailure> {
        Ok(Box::new(XChaChaKey(
            chacha20poly1305::XChaCha20Poly1305::new(key.into()),
        )))
    }
}

/// Shared body of the two RustCrypto AEADs, which have the same detached in-place API.
fn seal_with<A: AeadInPlace>(
    aead: &A,
    nonce_len: usize,
    nonce: &[u8],
    aad: &[u8],
    in_out: &mut [u8],
) -> Result<[u8; TAG_LEN], CryptoFailure> {
    if nonce.len() != nonce_len {
        return Err(CryptoFailure);
    }
    let tag = aead
        .encrypt_in_place_detached(aes_gcm::aead::Nonce::<A>::from_slice(nonce), aad, in_out)
        .map_err(|_| CryptoFailure)?;
    let mut out = [0u8; TAG_LEN];
    out.copy_from_slice(&tag);
    Ok(out)
}

fn open_with<A: AeadInPlace>(
    aead: &A,
    nonce_len: usize,
    nonce: &[u8],
    aad: &[u8],
    ciphertext: &[u8],
    tag: &[u8],
    out: &mut [u8],
) -> Result<(), CryptoFailure> {
    if nonce.len() != nonce_len || tag.len() != TAG_LEN || out.len() != ciphertext.len() {
        return Err(CryptoFailure);
    }
    out.copy_from_slice(ciphertext);
    let result = aead.decrypt_in_place_detached(
        aes_gcm::aead::Nonce::<A>::from_slice(nonce),
        aad,
        out,
        aes_gcm::aead::Tag::<A>::from_slice(tag),
    );
    if result.is_err() {
        out.zeroize();
        return Err(CryptoFailure);
    }
    Ok(())
}

impl AeadKey for AesGcmKey {
    fn seal(
        &self,
        nonce: &[u8],
        aad: &[u8],
        in_out: &mut [u8],
    ) -> Result<[u8; TAG_LEN], CryptoFailure> {
        seal_with(&self.0, 12, nonce, aad, in_out)
    }

    fn open(
        &self,
        nonce: &[u8],
        aad: &[u8],
        ciphertext: &[u8],
        tag: &[u8],
        out: &mut [u8],
    ) -> Result<(), CryptoFailure> {
        open_with(&self.0, 12, nonce, aad, ciphertext, tag, out)
    }
}

impl AeadKey for XChaChaKey {
    fn seal(
        &self,
        nonce: &[u8],
        aad: &[u8],
        in_out: &mut [u8],
    ) -> Result<[u8; TAG_LEN], CryptoFailure> {
        seal_with(&self.0, 24, nonce, aad, in_out)
    }

    fn open(
        &self,
        nonce: &[u8],
        aad: &[u8],
        ciphertext: &[u8],
        tag: &[u8],
        out: &mut [u8],
    ) -> Result<(), CryptoFailure> {
        open_with(&self.0, 24, nonce, aad, ciphertext, tag, out)
    }
}

/// HKDF-SHA256 with an `N`-byte output (`N` is 32 or 64 here). Known gap: the `hkdf` and
/// `hmac` 0.12 crates do not wipe their internal state (the pseudorandom key) on drop; the
/// aws-lc provider does.
fn hkdf_sha256<const N: usize>(ikm: &[u8], salt: &[u8], info: &[&[u8]]) -> Zeroizing<[u8; N]> {
    let hk = hkdf::Hkdf::<sha2::Sha256>::new(Some(salt), ikm);
    let mut okm = Zeroizing::new([0u8; N]);
    // safe: 32 and 64 bytes are far below HKDF-SHA256's 255 * 32 byte output limit.
    #[allow(clippy::expect_used)]
    hk.expand_multi_info(info, okm.as_mut_slice())
        .expect("32- and 64-byte HKDF output is always valid");
    okm
}

impl Hkdf for HkdfSha256 {
    fn derive(&self, ikm: &[u8], salt: &[u8], info: &[&[u8]]) -> Zeroizing<[u8; 32]> {
        hkdf_sha256(ikm, salt, info)
    }

    fn derive_64(&self, ikm: &[u8], salt: &[u8], info: &[&[u8]]) -> Zeroizing<[u8; 64]> {
        hkdf_sha256(ikm, salt, info)
    }
}

impl Hmac for HmacSha256 {
    fn sign(&self, key: &[u8], message: &[&[u8]]) -> [u8; 32] {
        // safe: HMAC accepts keys of any length.
        #[allow(clippy::expect_used)]
        let mut mac = <hmac::Hmac<sha2::Sha256> as Mac>::new_from_slice(key)
            .expect("HMAC takes keys of any length");
        for part in message {
            mac.update(part);
        }
        mac.finalize().into_bytes().into()
    }
}

impl Sha256 for Sha256Digest {
    fn digest(&self, parts: &[&[u8]]) -> [u8; 32] {
        let mut hasher = sha2::Sha256::new();
        for part in parts {
            hasher.update(part);
        }
        hasher.finalize().into()
    }
}
