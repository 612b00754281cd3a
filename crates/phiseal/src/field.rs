//! Field encryption under one tenant key version: subkey derivation, nonce handling, AAD,
//! seal and open. The layout is in [`crate::format`]; the rationale in `docs/FORMAT.md`.
//!
//! **Nonce safety of the default algorithm.** Each *encryption epoch* draws, from the OS, a
//! random 10-byte salt and a random 4-byte nonce prefix. The epoch's AES-256-GCM subkey is
//! `HKDF-SHA256(ikm = tenant key, salt, info = "phiseal v1 aes-256-gcm-hkdf subkey")`, and its
//! messages use the nonce `prefix ‖ u64be counter` with a counter starting at 0 — the
//! deterministic IV construction of SP 800-38D §8.2.1, so nonces never repeat under one
//! subkey. Each load of a key version into a cache is a new epoch; an epoch that reached
//! [`EPOCH_MESSAGE_LIMIT`] messages refuses to encrypt (the keyring's max-uses limit, capped
//! below it, reloads the key first). Two epochs reuse a nonce only if they drew the same
//! salt *and* the same prefix (2^-112 per pair of epochs), so the number of messages per
//! tenant key version needs no operator action (`docs/FORMAT.md` §7). Decryption re-derives
//! the subkey from the salt in the header and caches it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use zeroize::Zeroize;

use crate::context::EncryptionContext;
use crate::crypto::{AeadKey, CryptoFailure, CryptoProvider, os_random};
use crate::error::Error;
use crate::format::{Algorithm, FORMAT_V1, KEY_SALT_LEN, ParsedCiphertext};
use crate::kms::KeyBinding;
use crate::secret::{Plaintext, TenantKey};

/// Most messages one encryption epoch (one derived AES-GCM subkey) encrypts: the counter half
/// of the nonce never wraps, and one subkey never encrypts more than this.
pub const EPOCH_MESSAGE_LIMIT: u64 = 1 << 32;

const AES_SUBKEY_INFO: &[u8] = b"phiseal v1 aes-256-gcm-hkdf subkey";
const XCHACHA_KEY_INFO: &[u8] = b"phiseal v1 xchacha20-poly1305 key";
const KEY_CHECK_INFO: &[u8] = b"phiseal v1 key-check";
/// Decryption subkeys kept per tenant key version (one per epoch seen).
const SUBKEY_CACHE_CAPACITY: usize = 256;

type SharedAeadKey = Arc<dyn AeadKey>;

/// The AES-256-GCM subkey for `salt` (see the module docs).
pub(crate) fn derive_aes_subkey(
    provider: &'static CryptoProvider,
    tenant_key: &TenantKey,
    salt: &[u8],
) -> Result<SharedAeadKey, Error> {
    let subkey = provider
        .hkdf_sha256
        .derive(tenant_key.expose(), salt, &[AES_SUBKEY_INFO]);
    let key = provider
        .aes_256_gcm
        .key(&subkey)
        .map_err(|_| Error::Crypto {
            provider: provider.name,
            what: "AES-256-GCM key setup",
        })?;
    Ok(Arc::from(key))
}

/// The XChaCha20-Poly1305 key of a tenant key version.
pub(crate) fn derive_xchacha_key(
    provider: &'static CryptoProvider,
    tenant_key: &TenantKey,
) -> Result<SharedAeadKey, Error> {
    let key = provider
        .hkdf_sha256
        .derive(tenant_key.expose(), &[], &[XCHACHA_KEY_INFO]);
    let key = provider
        .xchacha20_poly1305
        .key(&key)
        .map_err(|_| Error::Crypto {
            provider: provider.name,
            what: "XChaCha20-Poly1305 key setup",
        })?;
    Ok(Arc::from(key))
}

/// The key-check MAC that binds an unwrapped tenant key to its (tenant, version):
/// `HMAC-SHA256(HKDF(ikm = tenant key, salt = "", info = "phiseal v1 key-check"), binding AAD)`.
pub fn key_check(
    provider: &'static CryptoProvider,
    tenant_key: &TenantKey,
    binding: &KeyBinding,
) -> [u8; 32] {
    let mac_key = provider
        .hkdf_sha256
        .derive(tenant_key.expose(), &[], &[KEY_CHECK_INFO]);
    provider
        .hmac_sha256
        .sign(mac_key.as_slice(), &[&binding.to_aad()])
}

/// AADs up to this length are built on the stack; longer ones (long record ids) on the heap.
const INLINE_AAD_LEN: usize = 192;

/// Calls `f` with the AAD of a message, `header ‖ context encoding`, built on the stack for
/// typical contexts (no allocation, no copy of the buffer) and on the heap for long record ids.
fn with_aad<R>(header: &[u8], context: &EncryptionContext, f: impl FnOnce(&[u8]) -> R) -> R {
    let len = header.len() + context.encoded_len();
    if len <= INLINE_AAD_LEN {
        let mut buf = [0u8; INLINE_AAD_LEN];
        let mut at = 0;
        let mut push = |bytes: &[u8]| {
            if let Some(dst) = buf.get_mut(at..at + bytes.len()) {
                dst.copy_from_slice(bytes);
            }
            at += bytes.len();
        };
        push(header);
        context.encode_with(&mut push);
        // `len` was computed from the same pieces; never authenticate a truncated AAD.
        if let (true, Some(aad)) = (at == len, buf.get(..len)) {
            return f(aad);
        }
    }
    let mut aad = Vec::with_capacity(len);
    aad.extend_from_slice(header);
    context.encode_with(|bytes| aad.extend_from_slice(bytes));
    f(&aad)
}

fn crypto_error(provider: &'static CryptoProvider) -> Error {
    Error::Crypto {
        provider: provider.name,
        what: "AEAD seal",
    }
}

/// Plaintexts from this size up are encrypted straight into the ciphertext buffer
/// ([`AeadKey::seal_into`]), which saves a pass over the data (1 MiB round trip 228 → 200 µs
/// here); shorter ones are copied and sealed in place: at 64 bytes, zero-filling the buffer
/// first measured 10–20 ns slower per round trip (docs/PERFORMANCE.md, session 18).
const SEAL_INTO_FROM: usize = 4096;

/// Seals `plaintext` with explicit nonce material (`salt ‖ nonce` or the XChaCha nonce) under
/// an already-derived AEAD key. Shared by the keyring and the known-answer seam.
pub(crate) fn seal(
    provider: &'static CryptoProvider,
    algorithm: Algorithm,
    key_version: u32,
    nonce_material: &[u8],
    key: &dyn AeadKey,
    context: &EncryptionContext,
    plaintext: &[u8],
) -> Result<Vec<u8>, Error> {
    let header_len = algorithm.header_len();
    if nonce_material.len() != algorithm.nonce_material_len() {
        return Err(crypto_error(provider));
    }
    let nonce = match algorithm {
        Algorithm::Aes256GcmHkdf => nonce_material.get(KEY_SALT_LEN..),
        Algorithm::XChaCha20Poly1305 => Some(nonce_material),
        // Deterministic AES-SIV has its own seal (`crate::search`).
        Algorithm::Aes256Siv => None,
    }
    .ok_or_else(|| crypto_error(provider))?;
    let total_len = algorithm.overhead() + plaintext.len();
    // On the in-place path (and a provider's default `seal_into`) it holds plaintext until the
    // AEAD has run: wiped below if that fails. (Not a `Zeroizing` guard, which would also
    // cover a panicking provider: measured ~60 ns more per 64-byte round trip. `AeadKey`
    // implementations must not panic.)
    let mut out = Vec::with_capacity(total_len);
    out.push(FORMAT_V1);
    out.push(algorithm.id());
    out.extend_from_slice(&key_version.to_be_bytes());
    out.extend_from_slice(nonce_material);
    let large = plaintext.len() >= SEAL_INTO_FROM;
    if large {
        // Room for ciphertext ‖ tag, written by the AEAD reading the plaintext once.
        out.resize(total_len, 0);
    } else {
        out.extend_from_slice(plaintext);
    }
    let (header, rest) = out
        .split_at_mut_checked(header_len)
        .ok_or_else(|| crypto_error(provider))?;
    let header: &[u8] = header;
    let sealed = with_aad(header, context, |aad| {
        if large {
            let (body, tag_out) = rest
                .split_at_mut_checked(plaintext.len())
                .ok_or(CryptoFailure)?;
            let tag = key.seal_into(nonce, aad, plaintext, body)?;
            if tag_out.len() != tag.len() {
                return Err(CryptoFailure);
            }
            tag_out.copy_from_slice(&tag);
            Ok(None)
        } else {
            key.seal(nonce, aad, rest).map(Some)
        }
    });
    match sealed {
        Ok(Some(tag)) => {
            out.extend_from_slice(&tag);
            Ok(out)
        }
        Ok(None) => Ok(out),
        Err(_) => {
            out.zeroize();
            Err(crypto_error(provider))
        }
    }
}

/// Opens a parsed ciphertext under an already-derived AEAD key. Every failure is the opaque
/// [`Error::DecryptionFailed`].
pub(crate) fn open(
    parsed: &ParsedCiphertext<'_>,
    key: &dyn AeadKey,
    context: &EncryptionContext,
) -> Result<Plaintext, Error> {
    let nonce = match parsed.algorithm {
        Algorithm::Aes256GcmHkdf => parsed.nonce_material.get(KEY_SALT_LEN..),
        Algorithm::XChaCha20Poly1305 => Some(parsed.nonce_material),
        // Deterministic AES-SIV has its own open (`crate::search`).
        Algorithm::Aes256Siv => None,
    }
    .ok_or_else(|| Error::DecryptionFailed)?;
    let mut out = Plaintext::zeroed(parsed.ciphertext.len());
    with_aad(parsed.header, context, |aad| {
        key.open(
            nonce,
            aad,
            parsed.ciphertext,
            parsed.tag,
            out.as_mut_slice(),
        )
    })
    .map_err(|_| Error::DecryptionFailed)?;
    Ok(out)
}

/// One encryption epoch of the default algorithm.
struct Epoch {
    salt: [u8; KEY_SALT_LEN],
    /// The first 4 bytes of every nonce in this epoch.
    nonce_prefix: [u8; 4],
    key: SharedAeadKey,
    /// Messages encrypted so far; also the counter half of the next nonce.
    used: AtomicU64,
}

/// An unwrapped tenant key version, ready to encrypt and decrypt. Zeroized when the last
/// reference is dropped (cache eviction, TTL, max uses, shred).
pub(crate) struct VersionKey {
    provider: &'static CryptoProvider,
    version: u32,
    tenant_key: TenantKey,
    /// The key-check MAC of the key record it was unwrapped from (checked then): a cached key
    /// serves a record only if the record still has it (a store restored from a backup, or a
    /// failover that lost a rotation, can hold another key under the same version).
    pub(crate) key_check: [u8; 32],
    /// This load's encryption epoch (immutable but for its counter).
    epoch: Epoch,
    xchacha: SharedAeadKey,
    subkeys: quick_cache::sync::Cache<[u8; KEY_SALT_LEN], SharedAeadKey>,
    /// Per-field keys of deterministic encryption and blind indexes (`crate::search`),
    /// created on first use.
    search: crate::search::FieldKeys,
    /// Operations served from this cached key, for the cache's max-uses limit.
    pub(crate) uses: AtomicU64,
    /// When it was unwrapped, for the cache's TTL (coarse monotonic clock).
    pub(crate) loaded_at: coarsetime::Instant,
    /// Until when (coarse clock ticks) it serves past its TTL because the KMS was found
    /// unavailable; 0 when it never was.
    degraded_until: AtomicU64,
    /// Held by the one request that tries the KMS for a fresh copy once this key is past its
    /// TTL (single flight per key version, without taking the key out of the cache).
    pub(crate) refresh: tokio::sync::Mutex<()>,
    /// The KMS backend that unwraps its record ([`crate::kms::Kms::backend_for`]), whose
    /// outage state decides whether it may serve past its TTL: the one that unwrapped it, or
    /// the one its refresh last asked (a root rotation may have moved the record since).
    kms_backend: std::sync::atomic::AtomicUsize,
}

impl VersionKey {
    /// Prepares a freshly unwrapped key.
    pub(crate) fn new(
        provider: &'static CryptoProvider,
        version: u32,
        tenant_key: TenantKey,
        key_check: [u8; 32],
    ) -> Result<Self, Error> {
        let epoch = Self::new_epoch(provider, &tenant_key)?;
        let xchacha = derive_xchacha_key(provider, &tenant_key)?;
        Ok(Self {
            provider,
            version,
            epoch,
            xchacha,
            subkeys: quick_cache::sync::Cache::new(SUBKEY_CACHE_CAPACITY),
            search: crate::search::FieldKeys::default(),
            tenant_key,
            key_check,
            // The operation that unwrapped it is its first use.
            uses: AtomicU64::new(1),
            loaded_at: coarsetime::Instant::now_without_cache_update(),
            degraded_until: AtomicU64::new(0),
            refresh: tokio::sync::Mutex::new(()),
            kms_backend: std::sync::atomic::AtomicUsize::new(0),
        })
    }

    /// Records which KMS backend unwrapped it ([`crate::kms::Kms::backend_for`]).
    pub(crate) fn unwrapped_by(self, kms_backend: usize) -> Self {
        self.set_kms_backend(kms_backend);
        self
    }

    /// Records which KMS backend now unwraps its record.
    pub(crate) fn set_kms_backend(&self, kms_backend: usize) {
        self.kms_backend.store(kms_backend, Ordering::Relaxed);
    }

    /// The KMS backend that unwraps its record.
    pub(crate) fn kms_backend(&self) -> usize {
        self.kms_backend.load(Ordering::Relaxed)
    }

    /// Lets the key serve past its TTL until `until` (the next KMS retry).
    pub(crate) fn degrade_until(&self, until: coarsetime::Instant) {
        self.degraded_until
            .store(until.as_ticks(), std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether it may serve past its TTL at `now` (a KMS outage was seen and the next retry
    /// is not due).
    pub(crate) fn is_degraded_at(&self, now: coarsetime::Instant) -> bool {
        now.as_ticks()
            < self
                .degraded_until
                .load(std::sync::atomic::Ordering::Relaxed)
    }

    fn new_epoch(
        provider: &'static CryptoProvider,
        tenant_key: &TenantKey,
    ) -> Result<Epoch, Error> {
        let salt: [u8; KEY_SALT_LEN] = os_random(provider)?;
        let nonce_prefix: [u8; 4] = os_random(provider)?;
        let key = derive_aes_subkey(provider, tenant_key, &salt)?;
        Ok(Epoch {
            salt,
            nonce_prefix,
            key,
            used: AtomicU64::new(0),
        })
    }

    /// The tenant key version.
    pub(crate) fn tenant_key(&self) -> &TenantKey {
        &self.tenant_key
    }

    pub(crate) fn version(&self) -> u32 {
        self.version
    }

    /// The per-field keys of deterministic encryption and blind indexes.
    pub(crate) fn search_keys(&self) -> &crate::search::FieldKeys {
        &self.search
    }

    /// The crypto provider this key was prepared with.
    pub(crate) fn provider(&self) -> &'static CryptoProvider {
        self.provider
    }

    /// Encrypts one field under this version with `algorithm`.
    pub(crate) fn encrypt(
        &self,
        algorithm: Algorithm,
        context: &EncryptionContext,
        plaintext: &[u8],
    ) -> Result<Vec<u8>, Error> {
        match algorithm {
            Algorithm::Aes256GcmHkdf => {
                let epoch = &self.epoch;
                let counter = epoch.used.fetch_add(1, Ordering::Relaxed);
                if counter >= EPOCH_MESSAGE_LIMIT {
                    // Fail closed rather than ever reuse a nonce.
                    return Err(Error::Crypto {
                        provider: self.provider.name,
                        what: "encryption epoch exhausted (reload the key)",
                    });
                }
                let mut material = [0u8; KEY_SALT_LEN + 12];
                let (salt, nonce) = material.split_at_mut(KEY_SALT_LEN);
                let (prefix, count) = nonce.split_at_mut(4);
                salt.copy_from_slice(&epoch.salt);
                prefix.copy_from_slice(&epoch.nonce_prefix);
                count.copy_from_slice(&counter.to_be_bytes());
                seal(
                    self.provider,
                    algorithm,
                    self.version,
                    &material,
                    &*epoch.key,
                    context,
                    plaintext,
                )
            }
            Algorithm::XChaCha20Poly1305 => {
                // A random 192-bit nonce per message, from the OS: a user-space generator's
                // state would be copied into a child by `fork()` (rand's thread RNG is not
                // reseeded then), and the two would draw the same nonces under one key.
                let nonce: [u8; 24] = os_random(self.provider)?;
                seal(
                    self.provider,
                    algorithm,
                    self.version,
                    &nonce,
                    &*self.xchacha,
                    context,
                    plaintext,
                )
            }
            // Deterministic encryption is never a default algorithm: it leaks equality and
            // takes no record id. Only `Keyring::encrypt_deterministic` writes it.
            Algorithm::Aes256Siv => Err(Error::Config(
                "aes-256-siv (0x03) is deterministic and cannot be the keyring's default                  algorithm: use Keyring::encrypt_deterministic for searchable fields"
                    .into(),
            )),
        }
    }

    /// Deterministically encrypts one field under this version (`crate::search`).
    pub(crate) fn encrypt_deterministic(
        &self,
        context: &EncryptionContext,
        plaintext: &[u8],
    ) -> Result<Vec<u8>, Error> {
        self.search.seal(
            self.provider,
            &self.tenant_key,
            self.version,
            context,
            plaintext,
        )
    }

    /// True once this load's epoch has encrypted its maximum: the cache must reload the key.
    pub(crate) fn epoch_exhausted(&self) -> bool {
        self.epoch.used.load(Ordering::Relaxed) >= EPOCH_MESSAGE_LIMIT
    }

    /// Decrypts a parsed ciphertext of this version.
    pub(crate) fn decrypt(
        &self,
        parsed: &ParsedCiphertext<'_>,
        context: &EncryptionContext,
    ) -> Result<Plaintext, Error> {
        match parsed.algorithm {
            Algorithm::Aes256GcmHkdf => {
                let salt: [u8; KEY_SALT_LEN] = parsed
                    .nonce_material
                    .get(..KEY_SALT_LEN)
                    .and_then(|s| s.try_into().ok())
                    .ok_or_else(|| Error::DecryptionFailed)?;
                if self.epoch.salt == salt {
                    return open(parsed, &*self.epoch.key, context);
                }
                if let Some(key) = self.subkeys.get(&salt) {
                    return open(parsed, &*key, context);
                }
                // Cache a subkey only once a message under it authenticated: forged salts
                // cost their sender an HKDF each but cannot evict genuine subkeys.
                let key = derive_aes_subkey(self.provider, &self.tenant_key, &salt)?;
                let plaintext = open(parsed, &*key, context)?;
                self.subkeys.insert(salt, key);
                Ok(plaintext)
            }
            Algorithm::XChaCha20Poly1305 => open(parsed, &*self.xchacha, context),
            Algorithm::Aes256Siv => {
                self.search
                    .open(self.provider, &self.tenant_key, parsed, context)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::context::TenantId;
    use crate::format::parse;

    fn key() -> VersionKey {
        VersionKey::new(
            crate::crypto::default_provider(),
            3,
            TenantKey::from_bytes([7; 32]),
            [0; 32],
        )
        .unwrap()
    }

    fn nonce_material(ct: &[u8]) -> Vec<u8> {
        parse(ct).unwrap().nonce_material.to_vec()
    }

    #[test]
    fn nonces_count_up_within_an_epoch() {
        let k = key();
        let cx = EncryptionContext::new(TenantId::new("t").unwrap(), "f").unwrap();
        let a = nonce_material(&k.encrypt(Algorithm::Aes256GcmHkdf, &cx, b"x").unwrap());
        let b = nonce_material(&k.encrypt(Algorithm::Aes256GcmHkdf, &cx, b"x").unwrap());
        // Same salt and prefix; counter 0 then 1.
        assert_eq!(a[..14], b[..14]);
        assert_eq!(a[14..], 0u64.to_be_bytes());
        assert_eq!(b[14..], 1u64.to_be_bytes());
    }

    #[test]
    fn a_full_epoch_refuses_to_encrypt_and_a_reload_starts_a_new_one() {
        let k = key();
        let cx = EncryptionContext::new(TenantId::new("t").unwrap(), "f").unwrap();
        let first = k.encrypt(Algorithm::Aes256GcmHkdf, &cx, b"one").unwrap();
        k.epoch
            .used
            .store(EPOCH_MESSAGE_LIMIT - 1, Ordering::Relaxed);
        assert!(!k.epoch_exhausted());
        let last = k.encrypt(Algorithm::Aes256GcmHkdf, &cx, b"two").unwrap();
        assert!(k.epoch_exhausted());
        assert!(matches!(
            k.encrypt(Algorithm::Aes256GcmHkdf, &cx, b"three"),
            Err(Error::Crypto { .. })
        ));
        let (first_m, last_m) = (nonce_material(&first), nonce_material(&last));
        assert_eq!(first_m[..10], last_m[..10], "one salt per epoch");
        assert_eq!(last_m[14..], (EPOCH_MESSAGE_LIMIT - 1).to_be_bytes());
        // A reload (a new VersionKey of the same tenant key) is a new epoch.
        let reloaded = key();
        let next = reloaded
            .encrypt(Algorithm::Aes256GcmHkdf, &cx, b"three")
            .unwrap();
        let next_m = nonce_material(&next);
        assert_ne!(last_m[..14], next_m[..14], "a new salt and prefix");
        assert_eq!(next_m[14..], 0u64.to_be_bytes());
        // Every epoch decrypts under either load (the other one through the subkey cache).
        for ct in [&first, &last, &next] {
            let parsed = parse(ct).unwrap();
            assert!(k.decrypt(&parsed, &cx).is_ok());
            assert!(reloaded.decrypt(&parsed, &cx).is_ok());
        }
    }
}
