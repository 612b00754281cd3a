//! The default provider on aws-lc-rs.
//!
//! aws-lc-rs has no XChaCha20-Poly1305, so this provider builds it the standard way
//! (draft-irtf-cfrg-xchacha §2.3): HChaCha20 (from the RustCrypto `chacha20` crate) derives a
//! subkey from the key and the first 16 nonce bytes, and aws-lc's ChaCha20-Poly1305 runs with
//! that subkey and the nonce `0^4 ‖ nonce[16..24]`. The cross-check tests confirm it matches the
//! RustCrypto implementation byte for byte.
//!
//! Key schedules live inside aws-lc's `EVP_AEAD_CTX`, which aws-lc-rs frees on drop; the
//! tenant key and derived subkeys we hold are zeroized by us.

use aws_lc_rs::{aead, digest, hkdf, hmac};
use chacha20::cipher::consts::U10;
use zeroize::{Zeroize, Zeroizing};

use super::{AeadAlgorithm, AeadKey, CryptoFailure, CryptoProvider, Hkdf, Hmac, Sha256, TAG_LEN};

/// The aws-lc-rs provider.
pub static PROVIDER: CryptoProvider = CryptoProvider {
    name: "aws-lc-rs",
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

struct AesGcmKey(aead::LessSafeKey);
struct XChaChaKey(Zeroizing<[u8; 32]>);

impl AeadAlgorithm for AesGcm {
    fn nonce_len(&self) -> usize {
        aead::NONCE_LEN
    }

    fn key(&self, key: &[u8; 32]) -> Result<Box<dyn AeadKey>, CryptoFailure> {
        let unbound = aead::UnboundKey::new(&aead::AES_256_GCM, key).map_err(|_| CryptoFailure)?;
        Ok(Box::new(AesGcmKey(aead::LessSafeKey::new(unbound))))
    }
}

fn seal_less_safe(
    key: &aead::LessSafeKey,
    nonce: &[u8],
    aad: &[u8],
    in_out: &mut [u8],
) -> Result<[u8; TAG_LEN], CryptoFailure> {
    let nonce = aead::Nonce::try_assume_unique_for_key(nonce).map_err(|_| CryptoFailure)?;
    let tag = key
        .seal_in_place_separate_tag(nonce, aead::Aad::from(aad), in_out)
        .map_err(|_| CryptoFailure)?;
    let mut out = [0u8; TAG_LEN];
    let tag = tag.as_ref();
    if tag.len() != TAG_LEN {
        return Err(CryptoFailure);
    }
    out.copy_from_slice(tag);
    Ok(out)
}

fn open_less_safe(
    key: &aead::LessSafeKey,
    nonce: &[u8],
    aad: &[u8],
    ciphertext: &[u8],
    tag: &[u8],
    out: &mut [u8],
) -> Result<(), CryptoFailure> {
    if out.len() != ciphertext.len() {
        return Err(CryptoFailure);
    }
    let nonce = aead::Nonce::try_assume_unique_for_key(nonce).map_err(|_| CryptoFailure)?;
    let result = key.open_separate_gather(nonce, aead::Aad::from(aad), ciphertext, tag, out);
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
        seal_less_safe(&self.0, nonce, aad, in_out)
    }

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
        let nonce = aead::Nonce::try_assume_unique_for_key(nonce).map_err(|_| CryptoFailure)?;
        let mut tag = [0u8; TAG_LEN];
        self.0
            .seal_out_of_place_scatter(nonce, aead::Aad::from(aad), plaintext, out, &[], &mut tag)
            .map_err(|_| CryptoFailure)?;
        Ok(tag)
    }

    fn open(
        &self,
        nonce: &[u8],
        aad: &[u8],
        ciphertext: &[u8],
        tag: &[u8],
        out: &mut [u8],
    ) -> Result<(), CryptoFailure> {
        open_less_safe(&self.0, nonce, aad, ciphertext, tag, out)
    }
}

impl AeadAlgorithm for XChaCha {
    fn nonce_len(&self) -> usize {
        24
    }

    fn key(&self, key: &[u8; 32]) -> Result<Box<dyn AeadKey>, CryptoFailure> {
        Ok(Box::new(XChaChaKey(Zeroizing::new(*key))))
    }
}

impl XChaChaKey {
    /// HChaCha20 subkey and the 12-byte ChaCha20-Poly1305 nonce for a 24-byte XChaCha nonce.
    fn inner(&self, nonce: &[u8]) -> Result<(aead::LessSafeKey, [u8; 12]), CryptoFailure> {
        let (head, tail) = nonce.split_at_checked(16).ok_or(CryptoFailure)?;
        if tail.len() != 8 {
            return Err(CryptoFailure);
        }
        let mut subkey = chacha20::hchacha::<U10>(
            chacha20::Key::from_slice(self.0.as_slice()),
            chacha20::cipher::generic_array::GenericArray::from_slice(head),
        );
        let unbound = aead::UnboundKey::new(&aead::CHACHA20_POLY1305, subkey.as_slice());
        subkey.as_mut_slice().zeroize();
        let key = aead::LessSafeKey::new(unbound.map_err(|_| CryptoFailure)?);
        let mut inner_nonce = [0u8; 12];
        inner_nonce[4..].copy_from_slice(tail);
        Ok((key, inner_nonce))
    }
}

impl AeadKey for XChaChaKey {
    fn seal(
        &self,
        nonce: &[u8],
        aad: &[u8],
        in_out: &mut [u8],
    ) -> Result<[u8; TAG_LEN], CryptoFailure> {
        let (key, inner_nonce) = self.inner(nonce)?;
        seal_less_safe(&key, &inner_nonce, aad, in_out)
    }

    fn open(
        &self,
        nonce: &[u8],
        aad: &[u8],
        ciphertext: &[u8],
        tag: &[u8],
        out: &mut [u8],
    ) -> Result<(), CryptoFailure> {
        let (key, inner_nonce) = self.inner(nonce)?;
        open_less_safe(&key, &inner_nonce, aad, ciphertext, tag, out)
    }
}

/// An HKDF output length for aws-lc-rs.
struct OutputLen(usize);

impl hkdf::KeyType for OutputLen {
    fn len(&self) -> usize {
        self.0
    }
}

/// HKDF-SHA256 with an `N`-byte output (`N` is 32 or 64 here). aws-lc-rs wipes the
/// pseudorandom key on drop.
fn hkdf_sha256<const N: usize>(ikm: &[u8], salt: &[u8], info: &[&[u8]]) -> Zeroizing<[u8; N]> {
    let mut okm = Zeroizing::new([0u8; N]);
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, salt).extract(ikm);
    // safe: 32 and 64 bytes are within the 255 * 32 byte limit, and `okm` is exactly the
    // requested length, so neither expand nor fill can fail.
    #[allow(clippy::expect_used)]
    prk.expand(info, OutputLen(N))
        .and_then(|o| o.fill(okm.as_mut_slice()))
        .expect("32- and 64-byte HKDF-SHA256 output is always valid");
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
        let key = hmac::Key::new(hmac::HMAC_SHA256, key);
        let mut ctx = hmac::Context::with_key(&key);
        for part in message {
            ctx.update(part);
        }
        let mut out = [0u8; 32];
        out.copy_from_slice(ctx.sign().as_ref());
        out
    }
}

impl Sha256 for Sha256Digest {
    fn digest(&self, parts: &[&[u8]]) -> [u8; 32] {
        let mut ctx = digest::Context::new(&digest::SHA256);
        for part in parts {
            ctx.update(part);
        }
        let mut out = [0u8; 32];
        out.copy_from_slice(ctx.finish().as_ref());
        out
    }
}
