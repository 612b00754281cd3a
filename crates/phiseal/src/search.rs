//! Searchable fields: deterministic encryption (algorithm `0x03`, AES-256-SIV per RFC 5297)
//! and keyed blind indexes (HMAC-SHA256 over a normalised value). The keyring API is in
//! `Keyring::encrypt_deterministic`, `Keyring::deterministic_query`, `Keyring::blind_index` and
//! `Keyring::blind_index_query`; what they reveal and how to choose between them is in
//! `docs/SEARCH.md`, the byte-level rules in `docs/FORMAT.md` §3.3 and §9.
//!
//! **Keys.** Both derive from the tenant key version with HKDF-SHA256 (empty salt), one key
//! per (tenant key version, field), with different info strings:
//!
//! ```text
//! siv_key   = HKDF-SHA256(TK, salt = "", info = "phiseal v1 aes-256-siv key" ‖ u8 len(F) ‖ F, L = 64)
//! index_key = HKDF-SHA256(TK, salt = "", info = "phiseal v1 blind-index key" ‖ u8 len(F) ‖ F, L = 32)
//! ```
//!
//! **Deterministic ciphertext** (`0x03`): `header(6) ‖ SIV(16) ‖ C`, where
//! `SIV ‖ C = AES-SIV(siv_key, AD = [header(6) ‖ context], plaintext)`: one associated-data
//! component, the fixed 6-byte header and the context encoding of `docs/FORMAT.md` §4 (the
//! SIV cannot authenticate itself, so it is not part of its own AD). The context must have no
//! record id: a record id would make equal values differ, which defeats the purpose.
//!
//! **Blind index**: `HMAC-SHA256(index_key, u8 normalisation id ‖ u16be bits ‖ normalised
//! value)`, truncated to its first `bits / 8` bytes. The specification is part of the MAC input,
//! so indexes of one field under two specifications are unrelated.
//!
//! AES-SIV always runs on the RustCrypto `aes-siv` crate (aws-lc-rs has no RFC 5297 SIV;
//! its AES-GCM-SIV is a different mode), whichever provider the keyring uses; HKDF and HMAC
//! go through the provider. Derived keys live in zeroizing buffers, cached per field inside
//! the cached tenant key version (at most [`FIELD_KEY_CACHE_CAPACITY`] fields each), and die
//! with it (TTL, max uses, rotation, shred).

use std::sync::{Arc, OnceLock};

use aes_siv::KeyInit;
use aes_siv::siv::Aes256Siv;
use zeroize::{Zeroize, Zeroizing};

use crate::context::EncryptionContext;
use crate::crypto::CryptoProvider;
use crate::error::Error;
use crate::format::{Algorithm, FIXED_HEADER_LEN, FORMAT_V1, ParsedCiphertext, SIV_LEN};
use crate::secret::{Plaintext, TenantKey};

const SIV_KEY_INFO: &[u8] = b"phiseal v1 aes-256-siv key";
const INDEX_KEY_INFO: &[u8] = b"phiseal v1 blind-index key";
/// Length of an AES-256-SIV key (a 256-bit CMAC key and a 256-bit CTR key).
const SIV_KEY_LEN: usize = 64;

/// Smallest blind-index length, in bits.
pub const MIN_BLIND_INDEX_BITS: u32 = 16;
/// Largest blind-index length, in bits (the whole HMAC-SHA256 output).
pub const MAX_BLIND_INDEX_BITS: u32 = 256;
/// Fields whose derived keys one cached tenant key version keeps (per kind); a miss costs one
/// HKDF (about a microsecond).
pub const FIELD_KEY_CACHE_CAPACITY: usize = 64;

/// How a value is normalised before it is blind-indexed. Part of the index: a value indexed
/// with one normalisation is found only by queries with the same one (`docs/SEARCH.md`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Normalization {
    /// The bytes as given: no change at all (`"Smith"` ≠ `"smith"` ≠ `"Smith "`).
    Exact,
    /// UTF-8 required (anything else is refused); the value is lowercased with Rust's
    /// `str::to_lowercase`: the Unicode `Lowercase_Mapping` of each character (including the
    /// unconditional multi-character mappings such as `İ` → `i̇`) and the one conditional rule
    /// for a word-final capital sigma (`Σ` → `ς`). It is **not** full Unicode case folding
    /// (`ß` stays `ß`, `ς` stays `ς`) and **not** Unicode normalisation (an NFC and an NFD
    /// spelling stay different); whitespace is kept as is. Results follow the Unicode version
    /// of the Rust standard library that built phiseal.
    CaseFolded,
    /// Only the ASCII digits `0`–`9` are kept, in order; every other byte is dropped
    /// (`078-05-1120` and `078 05 1120` both become `078051120`). Non-ASCII digits (`٣`, `３`)
    /// are dropped, not converted. A value with no ASCII digit is refused.
    DigitsOnly,
}

impl Normalization {
    /// The byte that identifies it in the blind-index MAC input (`docs/FORMAT.md` §9).
    pub fn id(self) -> u8 {
        match self {
            Normalization::Exact => 0x01,
            Normalization::CaseFolded => 0x02,
            Normalization::DigitsOnly => 0x03,
        }
    }

    /// A short stable name (`exact`, `case_folded`, `digits_only`).
    pub fn name(self) -> &'static str {
        match self {
            Normalization::Exact => "exact",
            Normalization::CaseFolded => "case_folded",
            Normalization::DigitsOnly => "digits_only",
        }
    }

    /// The normalisation named `name` (see [`Normalization::name`]).
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "exact" => Some(Normalization::Exact),
            "case_folded" => Some(Normalization::CaseFolded),
            "digits_only" => Some(Normalization::DigitsOnly),
            _ => None,
        }
    }

    /// Normalises `value` into a zeroizing buffer.
    pub(crate) fn apply(self, value: &[u8]) -> Result<Zeroizing<Vec<u8>>, Error> {
        match self {
            Normalization::Exact => Ok(Zeroizing::new(value.to_vec())),
            Normalization::CaseFolded => {
                let text = std::str::from_utf8(value).map_err(|_| Error::InvalidInput {
                    what: "blind index value",
                    reason: "the case_folded normalisation requires UTF-8",
                })?;
                // `to_lowercase` allocates its result with the input's length; only when
                // lowercasing lengthens the value (a few characters such as U+0130) may it
                // grow that buffer once, freeing the first one unwiped (docs/SEARCH.md §5).
                let lower = Zeroizing::new(text.to_lowercase());
                Ok(Zeroizing::new(lower.as_bytes().to_vec()))
            }
            Normalization::DigitsOnly => {
                let count = value.iter().filter(|b| b.is_ascii_digit()).count();
                if count == 0 {
                    return Err(Error::InvalidInput {
                        what: "blind index value",
                        reason: "the digits_only normalisation left no digit",
                    });
                }
                let mut out = Zeroizing::new(Vec::with_capacity(count));
                out.extend(value.iter().copied().filter(u8::is_ascii_digit));
                Ok(out)
            }
        }
    }
}

/// What a blind index is computed with: a normalisation and a length in bits (a multiple of 8
/// in [`MIN_BLIND_INDEX_BITS`]`..=`[`MAX_BLIND_INDEX_BITS`]). Both are part of the index: store
/// them with the column's schema and query with the same spec.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BlindIndexSpec {
    normalization: Normalization,
    bits: u16,
}

impl BlindIndexSpec {
    /// A spec; refuses `bits` that are not a multiple of 8 in 16..=256. See `docs/SEARCH.md`
    /// for choosing `bits` (fewer bits: more false positives, less linkage).
    pub fn new(normalization: Normalization, bits: u32) -> Result<Self, Error> {
        if !(MIN_BLIND_INDEX_BITS..=MAX_BLIND_INDEX_BITS).contains(&bits) || !bits.is_multiple_of(8)
        {
            return Err(Error::InvalidInput {
                what: "blind index bits",
                reason: "must be a multiple of 8 from 16 to 256",
            });
        }
        let bits = u16::try_from(bits).map_err(|_| Error::InvalidInput {
            what: "blind index bits",
            reason: "must be a multiple of 8 from 16 to 256",
        })?;
        Ok(Self {
            normalization,
            bits,
        })
    }

    /// The normalisation.
    pub fn normalization(&self) -> Normalization {
        self.normalization
    }

    /// The index length in bits.
    pub fn bits(&self) -> u32 {
        u32::from(self.bits)
    }

    /// The index length in bytes (`bits / 8`).
    pub fn len_bytes(&self) -> usize {
        usize::from(self.bits / 8)
    }
}

/// One value to search for, under one tenant key version: a deterministic ciphertext or a
/// blind index. Queries return one per live key version, primary first — the list a caller
/// puts in `WHERE column IN (…)`. Its `Debug` shows the version and length only.
#[derive(Clone, PartialEq, Eq)]
pub struct SearchTerm {
    /// The tenant key version the value was computed under.
    pub key_version: u32,
    /// The deterministic ciphertext (binary form) or the truncated blind index.
    pub value: Vec<u8>,
}

impl std::fmt::Debug for SearchTerm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "SearchTerm {{ key_version: {}, value: [{} bytes] }}",
            self.key_version,
            self.value.len()
        )
    }
}

/// The length-prefixed field name of the key derivations: `u8 len(F) ‖ F`.
fn field_info(field: &str) -> ([u8; 1], &[u8]) {
    // Field names are at most 128 bytes (checked by `EncryptionContext`).
    let bytes = field.as_bytes();
    ([u8::try_from(bytes.len()).unwrap_or(u8::MAX)], bytes)
}

/// The AES-256-SIV key of (tenant key version, field).
fn derive_siv_key(
    provider: &'static CryptoProvider,
    tenant_key: &TenantKey,
    field: &str,
) -> Zeroizing<[u8; SIV_KEY_LEN]> {
    let (len, name) = field_info(field);
    provider
        .hkdf_sha256
        .derive_64(tenant_key.expose(), &[], &[SIV_KEY_INFO, &len, name])
}

/// The blind-index key of (tenant key version, field).
fn derive_index_key(
    provider: &'static CryptoProvider,
    tenant_key: &TenantKey,
    field: &str,
) -> Zeroizing<[u8; 32]> {
    let (len, name) = field_info(field);
    provider
        .hkdf_sha256
        .derive(tenant_key.expose(), &[], &[INDEX_KEY_INFO, &len, name])
}

pub(crate) fn record_refused() -> Error {
    Error::InvalidInput {
        what: "encryption context",
        reason: "deterministic encryption and blind indexes bind no record id (equal values \
                 must give equal results): use a context without a record id",
    }
}

fn siv_failure() -> Error {
    Error::Crypto {
        provider: "rust-crypto aes-siv",
        what: "AES-SIV seal",
    }
}

/// The 6-byte fixed header of a `0x03` ciphertext.
fn siv_header(key_version: u32) -> [u8; FIXED_HEADER_LEN] {
    let v = key_version.to_be_bytes();
    [FORMAT_V1, Algorithm::Aes256Siv.id(), v[0], v[1], v[2], v[3]]
}

/// `fixed header ‖ context encoding`, the single AES-SIV associated-data component.
fn siv_aad(header: &[u8], context: &EncryptionContext) -> Vec<u8> {
    let mut aad = Vec::with_capacity(header.len() + context.encoded_len());
    aad.extend_from_slice(header);
    context.encode_with(|bytes| aad.extend_from_slice(bytes));
    aad
}

/// Seals a `0x03` ciphertext under a derived SIV key.
fn seal_siv(
    siv: &mut Aes256Siv,
    key_version: u32,
    context: &EncryptionContext,
    plaintext: &[u8],
) -> Result<Vec<u8>, Error> {
    if context.record().is_some() {
        return Err(record_refused());
    }
    if key_version == 0 {
        return Err(Error::InvalidInput {
            what: "key version",
            reason: "version 0 is never used",
        });
    }
    let header = siv_header(key_version);
    let aad = siv_aad(&header, context);
    let mut out = Vec::with_capacity(Algorithm::Aes256Siv.overhead() + plaintext.len());
    out.extend_from_slice(&header);
    out.extend_from_slice(&[0u8; SIV_LEN]);
    out.extend_from_slice(plaintext);
    let result = match out.get_mut(Algorithm::Aes256Siv.header_len()..) {
        Some(body) => siv
            .encrypt_in_place_detached([aad.as_slice()], body)
            .map_err(|_| siv_failure()),
        None => Err(siv_failure()),
    };
    match (
        result,
        out.get_mut(FIXED_HEADER_LEN..Algorithm::Aes256Siv.header_len()),
    ) {
        (Ok(tag), Some(slot)) => {
            slot.copy_from_slice(&tag);
            Ok(out)
        }
        (Ok(_), None) | (Err(_), _) => {
            // The buffer may still hold plaintext.
            out.zeroize();
            Err(siv_failure())
        }
    }
}

/// Opens a parsed `0x03` ciphertext under a derived SIV key. Every failure is the opaque
/// [`Error::DecryptionFailed`].
fn open_siv(
    siv: &mut Aes256Siv,
    parsed: &ParsedCiphertext<'_>,
    context: &EncryptionContext,
) -> Result<Plaintext, Error> {
    if parsed.algorithm != Algorithm::Aes256Siv {
        return Err(Error::DecryptionFailed);
    }
    let header = parsed
        .header
        .get(..FIXED_HEADER_LEN)
        .ok_or_else(|| Error::DecryptionFailed)?;
    let tag: [u8; SIV_LEN] = parsed
        .nonce_material
        .try_into()
        .map_err(|_| Error::DecryptionFailed)?;
    let aad = siv_aad(header, context);
    let mut out = Plaintext::zeroed(parsed.ciphertext.len());
    out.as_mut_slice().copy_from_slice(parsed.ciphertext);
    // On failure aes-siv re-encrypts the buffer, so it holds no plaintext.
    siv.decrypt_in_place_detached([aad.as_slice()], out.as_mut_slice(), &tag.into())
        .map_err(|_| Error::DecryptionFailed)?;
    Ok(out)
}

/// Computes a blind index under a derived index key.
fn index_with(
    provider: &'static CryptoProvider,
    key: &[u8; 32],
    spec: &BlindIndexSpec,
    value: &[u8],
) -> Result<Vec<u8>, Error> {
    let normalised = spec.normalization.apply(value)?;
    let prefix = {
        let bits = spec.bits.to_be_bytes();
        [spec.normalization.id(), bits[0], bits[1]]
    };
    let mut mac = provider
        .hmac_sha256
        .sign(key.as_slice(), &[&prefix, normalised.as_slice()]);
    let out = mac.get(..spec.len_bytes()).map(<[u8]>::to_vec);
    mac.zeroize();
    out.ok_or(Error::InvalidInput {
        what: "blind index bits",
        reason: "must be a multiple of 8 from 16 to 256",
    })
}

/// An AES-256-SIV key for one (key version, field), and a prepared instance (its CMAC key
/// schedule and subkeys) reused by one operation at a time: `aes-siv` needs `&mut` for every
/// operation, so a caller that finds it busy prepares its own from the key rather than wait.
/// The key and the key schedules wipe themselves on drop (`Zeroizing`; `aes-siv` zeroizes its
/// CTR key, `aes` and `cmac` are built with `zeroize`). Known gap: the CMAC block buffer
/// (`digest` 0.10 / `block-buffer` 0.10) is never wiped; after each operation it holds the
/// last S2V block — for values under 16 bytes the padded value masked by a key-derived
/// constant of the (tenant, field, key version) — until the next operation or the drop.
struct SivKey {
    key: Zeroizing<[u8; SIV_KEY_LEN]>,
    prepared: std::sync::Mutex<Aes256Siv>,
}

impl SivKey {
    fn new(key: Zeroizing<[u8; SIV_KEY_LEN]>) -> Self {
        let prepared = std::sync::Mutex::new(Aes256Siv::new(key.as_ref().into()));
        Self { key, prepared }
    }

    fn with<R>(&self, f: impl FnOnce(&mut Aes256Siv) -> R) -> R {
        match self.prepared.try_lock() {
            Ok(mut siv) => f(&mut siv),
            // Busy, or poisoned by a panic mid-operation (never reused then).
            Err(_) => f(&mut Aes256Siv::new(self.key.as_ref().into())),
        }
    }
}

/// A blind-index key for one (key version, field).
struct IndexKey(Zeroizing<[u8; 32]>);

/// The per-field keys derived from one cached tenant key version, created on first use (a
/// tenant that never searches pays nothing), bounded, and zeroized with the version key.
#[derive(Default)]
pub(crate) struct FieldKeys {
    caches: OnceLock<FieldKeyCaches>,
}

struct FieldKeyCaches {
    siv: quick_cache::sync::Cache<Arc<str>, Arc<SivKey>>,
    index: quick_cache::sync::Cache<Arc<str>, Arc<IndexKey>>,
}

impl FieldKeys {
    fn caches(&self) -> &FieldKeyCaches {
        self.caches.get_or_init(|| FieldKeyCaches {
            siv: quick_cache::sync::Cache::new(FIELD_KEY_CACHE_CAPACITY),
            index: quick_cache::sync::Cache::new(FIELD_KEY_CACHE_CAPACITY),
        })
    }

    /// The field's SIV key: `(key, true)` from the cache, or `(key, false)` freshly derived
    /// and not cached yet (see [`FieldKeys::remember_siv_key`]).
    fn siv_key(
        &self,
        provider: &'static CryptoProvider,
        tenant_key: &TenantKey,
        context: &EncryptionContext,
    ) -> (Arc<SivKey>, bool) {
        if let Some(key) = self.caches().siv.get(context.field()) {
            return (key, true);
        }
        let key = derive_siv_key(provider, tenant_key, context.field());
        (Arc::new(SivKey::new(key)), false)
    }

    fn remember_siv_key(&self, context: &EncryptionContext, key: Arc<SivKey>) {
        self.caches()
            .siv
            .insert(Arc::clone(context.field_shared()), key);
    }

    fn index_key(
        &self,
        provider: &'static CryptoProvider,
        tenant_key: &TenantKey,
        context: &EncryptionContext,
    ) -> Arc<IndexKey> {
        let cache = &self.caches().index;
        if let Some(key) = cache.get(context.field()) {
            return key;
        }
        let key = Arc::new(IndexKey(derive_index_key(
            provider,
            tenant_key,
            context.field(),
        )));
        cache.insert(Arc::clone(context.field_shared()), Arc::clone(&key));
        key
    }

    /// Deterministically encrypts one field under version `key_version` of `tenant_key`.
    pub(crate) fn seal(
        &self,
        provider: &'static CryptoProvider,
        tenant_key: &TenantKey,
        key_version: u32,
        context: &EncryptionContext,
        plaintext: &[u8],
    ) -> Result<Vec<u8>, Error> {
        if context.record().is_some() {
            return Err(record_refused());
        }
        let (key, cached) = self.siv_key(provider, tenant_key, context);
        if !cached {
            self.remember_siv_key(context, Arc::clone(&key));
        }
        key.with(|siv| seal_siv(siv, key_version, context, plaintext))
    }

    /// Decrypts a parsed `0x03` ciphertext.
    pub(crate) fn open(
        &self,
        provider: &'static CryptoProvider,
        tenant_key: &TenantKey,
        parsed: &ParsedCiphertext<'_>,
        context: &EncryptionContext,
    ) -> Result<Plaintext, Error> {
        // A record id cannot authenticate (none is ever sealed): fail like any wrong context,
        // without deriving (and caching) a key.
        if context.record().is_some() {
            return Err(Error::DecryptionFailed);
        }
        let (key, cached) = self.siv_key(provider, tenant_key, context);
        let plaintext = key.with(|siv| open_siv(siv, parsed, context))?;
        // Cache a field's key only once a message under it authenticated: forged ciphertexts
        // under made-up field names cost their sender a derivation each but cannot evict
        // genuine keys.
        if !cached {
            self.remember_siv_key(context, key);
        }
        Ok(plaintext)
    }

    /// The blind index of `value` for the context's field.
    pub(crate) fn blind_index(
        &self,
        provider: &'static CryptoProvider,
        tenant_key: &TenantKey,
        context: &EncryptionContext,
        spec: &BlindIndexSpec,
        value: &[u8],
    ) -> Result<Vec<u8>, Error> {
        if context.record().is_some() {
            return Err(record_refused());
        }
        let key = self.index_key(provider, tenant_key, context);
        index_with(provider, &key.0, spec, value)
    }
}

#[cfg(any(test, feature = "testkit"))]
/// Deterministic encryption under raw tenant key bytes, as a third-party implementation would
/// compute it (known-answer vectors).
pub(crate) fn seal_deterministic_raw(
    provider: &'static CryptoProvider,
    tenant_key: &TenantKey,
    key_version: u32,
    context: &EncryptionContext,
    plaintext: &[u8],
) -> Result<Vec<u8>, Error> {
    if context.record().is_some() {
        return Err(record_refused());
    }
    let key = derive_siv_key(provider, tenant_key, context.field());
    seal_siv(
        &mut Aes256Siv::new(key.as_ref().into()),
        key_version,
        context,
        plaintext,
    )
}

#[cfg(any(test, feature = "testkit"))]
/// Decrypts a parsed `0x03` ciphertext under raw tenant key bytes (known-answer vectors).
pub(crate) fn open_deterministic_raw(
    provider: &'static CryptoProvider,
    tenant_key: &TenantKey,
    parsed: &ParsedCiphertext<'_>,
    context: &EncryptionContext,
) -> Result<Plaintext, Error> {
    let key = derive_siv_key(provider, tenant_key, context.field());
    open_siv(&mut Aes256Siv::new(key.as_ref().into()), parsed, context)
}

#[cfg(any(test, feature = "testkit"))]
/// A blind index under raw tenant key bytes (known-answer vectors).
pub(crate) fn blind_index_raw(
    provider: &'static CryptoProvider,
    tenant_key: &TenantKey,
    context: &EncryptionContext,
    spec: &BlindIndexSpec,
    value: &[u8],
) -> Result<Vec<u8>, Error> {
    if context.record().is_some() {
        return Err(record_refused());
    }
    let key = derive_index_key(provider, tenant_key, context.field());
    index_with(provider, &key, spec, value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::context::TenantId;
    use crate::format::parse;

    fn cx(tenant: &str, field: &str) -> EncryptionContext {
        EncryptionContext::new(TenantId::new(tenant).unwrap(), field).unwrap()
    }

    fn tk(b: u8) -> TenantKey {
        TenantKey::from_bytes([b; 32])
    }

    fn provider() -> &'static CryptoProvider {
        crate::crypto::default_provider()
    }

    #[test]
    fn a_field_key_is_cached_only_once_a_message_under_it_authenticates() {
        let keys = FieldKeys::default();
        let ct =
            seal_deterministic_raw(provider(), &tk(1), 1, &cx("t", "ssn"), b"078051120").unwrap();
        let parsed = parse(&ct).unwrap();
        // The same bytes presented as another field's: refused, and that field's key is not
        // kept.
        assert!(matches!(
            keys.open(provider(), &tk(1), &parsed, &cx("t", "forged")),
            Err(Error::DecryptionFailed)
        ));
        assert!(keys.caches().siv.get("forged").is_none());
        assert_eq!(
            &keys
                .open(provider(), &tk(1), &parsed, &cx("t", "ssn"))
                .unwrap()[..],
            b"078051120"
        );
        assert!(keys.caches().siv.get("ssn").is_some());
        // Sealing caches at once (the key is ours, not a sender's claim).
        keys.seal(provider(), &tk(1), 1, &cx("t", "mrn"), b"MRN-1")
            .unwrap();
        assert!(keys.caches().siv.get("mrn").is_some());
    }

    #[test]
    fn siv_is_deterministic_and_separated() {
        let a =
            seal_deterministic_raw(provider(), &tk(1), 1, &cx("t", "ssn"), b"078051120").unwrap();
        let b =
            seal_deterministic_raw(provider(), &tk(1), 1, &cx("t", "ssn"), b"078051120").unwrap();
        assert_eq!(a, b);
        assert_eq!(a.len(), 22 + 9);
        assert_eq!(&a[..6], &[1, 3, 0, 0, 0, 1]);
        for other in [
            seal_deterministic_raw(provider(), &tk(1), 1, &cx("t", "ssn"), b"078051121").unwrap(),
            seal_deterministic_raw(provider(), &tk(1), 1, &cx("t", "mrn"), b"078051120").unwrap(),
            seal_deterministic_raw(provider(), &tk(1), 1, &cx("u", "ssn"), b"078051120").unwrap(),
            seal_deterministic_raw(provider(), &tk(2), 1, &cx("t", "ssn"), b"078051120").unwrap(),
            seal_deterministic_raw(provider(), &tk(1), 2, &cx("t", "ssn"), b"078051120").unwrap(),
        ] {
            assert_ne!(a[6..22], other[6..22], "SIVs must differ");
            assert_ne!(a[22..], other[22..], "ciphertexts must differ");
        }
        let parsed = parse(&a).unwrap();
        let pt = open_deterministic_raw(provider(), &tk(1), &parsed, &cx("t", "ssn")).unwrap();
        assert_eq!(&pt[..], b"078051120");
        for wrong in [cx("t", "mrn"), cx("u", "ssn")] {
            assert!(matches!(
                open_deterministic_raw(provider(), &tk(1), &parsed, &wrong),
                Err(Error::DecryptionFailed)
            ));
        }
    }

    #[test]
    fn siv_refuses_record_ids() {
        let c = cx("t", "ssn").with_record("r1").unwrap();
        assert!(matches!(
            seal_deterministic_raw(provider(), &tk(1), 1, &c, b"x"),
            Err(Error::InvalidInput { .. })
        ));
        let keys = FieldKeys::default();
        assert!(matches!(
            keys.seal(provider(), &tk(1), 1, &c, b"x"),
            Err(Error::InvalidInput { .. })
        ));
        let spec = BlindIndexSpec::new(Normalization::Exact, 32).unwrap();
        assert!(matches!(
            blind_index_raw(crate::crypto::default_provider(), &tk(1), &c, &spec, b"x"),
            Err(Error::InvalidInput { .. })
        ));
        let good = seal_deterministic_raw(provider(), &tk(1), 1, &cx("t", "ssn"), b"x").unwrap();
        assert!(matches!(
            keys.open(provider(), &tk(1), &parse(&good).unwrap(), &c),
            Err(Error::DecryptionFailed)
        ));
    }

    #[test]
    fn cached_keys_match_raw_derivation() {
        let keys = FieldKeys::default();
        let p = crate::crypto::default_provider();
        let spec = BlindIndexSpec::new(Normalization::CaseFolded, 64).unwrap();
        for _ in 0..2 {
            assert_eq!(
                keys.seal(provider(), &tk(3), 5, &cx("t", "name"), b"Zo\xc3\xab")
                    .unwrap(),
                seal_deterministic_raw(provider(), &tk(3), 5, &cx("t", "name"), b"Zo\xc3\xab")
                    .unwrap()
            );
            assert_eq!(
                keys.blind_index(p, &tk(3), &cx("t", "name"), &spec, b"ZO\xc3\x8b")
                    .unwrap(),
                blind_index_raw(p, &tk(3), &cx("t", "name"), &spec, b"zo\xc3\xab").unwrap()
            );
        }
    }

    #[test]
    fn normalisations() {
        let n = |norm: Normalization, v: &[u8]| norm.apply(v).map(|z| z.to_vec());
        for (norm, input, expected) in [
            (Normalization::Exact, &b" A b"[..], &b" A b"[..]),
            (Normalization::Exact, b"", b""),
            (Normalization::Exact, b"\xff", b"\xff"),
            (
                Normalization::CaseFolded,
                "ZOË Smith".as_bytes(),
                "zoë smith".as_bytes(),
            ),
            // Simple lowercasing, not case folding: ß stays, final sigma applies.
            (
                Normalization::CaseFolded,
                "STRASSE Straße".as_bytes(),
                "strasse straße".as_bytes(),
            ),
            (
                Normalization::CaseFolded,
                "ΟΔΟΣ".as_bytes(),
                "οδος".as_bytes(),
            ),
            // Lengthening mapping (U+0130 → i + U+0307).
            (
                Normalization::CaseFolded,
                "İ".as_bytes(),
                "i\u{307}".as_bytes(),
            ),
            (Normalization::DigitsOnly, b"078-05-1120", b"078051120"),
            (
                Normalization::DigitsOnly,
                "(٣) 12\u{ff13}".as_bytes(),
                b"12",
            ),
        ] {
            assert_eq!(n(norm, input).unwrap(), expected, "{norm:?} {input:?}");
        }
        // No Unicode normalisation: NFC and NFD differ.
        assert_ne!(
            n(Normalization::CaseFolded, "\u{e9}".as_bytes()).unwrap(),
            n(Normalization::CaseFolded, "e\u{301}".as_bytes()).unwrap()
        );
        assert!(matches!(
            n(Normalization::CaseFolded, b"\xff"),
            Err(Error::InvalidInput { .. })
        ));
        for empty in [&b""[..], b"---", "٣".as_bytes()] {
            assert!(matches!(
                n(Normalization::DigitsOnly, empty),
                Err(Error::InvalidInput { .. })
            ));
        }
        for norm in [
            Normalization::Exact,
            Normalization::CaseFolded,
            Normalization::DigitsOnly,
        ] {
            assert_eq!(Normalization::from_name(norm.name()), Some(norm));
        }
    }

    #[test]
    fn bits_are_validated() {
        for ok in [16, 24, 32, 64, 128, 248, 256] {
            let spec = BlindIndexSpec::new(Normalization::Exact, ok).unwrap();
            assert_eq!(spec.bits(), ok);
            assert_eq!(spec.len_bytes() * 8, ok as usize);
        }
        for bad in [0, 8, 15, 17, 31, 257, 264, 512, u32::MAX] {
            assert!(matches!(
                BlindIndexSpec::new(Normalization::Exact, bad),
                Err(Error::InvalidInput { .. })
            ));
        }
    }

    #[test]
    fn blind_index_properties() {
        let p = crate::crypto::default_provider();
        let digits = BlindIndexSpec::new(Normalization::DigitsOnly, 256).unwrap();
        let bi = |key: u8, t: &str, f: &str, spec: &BlindIndexSpec, v: &[u8]| {
            blind_index_raw(p, &tk(key), &cx(t, f), spec, v).unwrap()
        };
        let a = bi(1, "t", "ssn", &digits, b"078-05-1120");
        assert_eq!(a.len(), 32);
        assert_eq!(a, bi(1, "t", "ssn", &digits, b"078051120"));
        assert_ne!(a, bi(1, "t", "ssn", &digits, b"078051121"));
        assert_ne!(a, bi(1, "t", "mrn", &digits, b"078051120"));
        assert_ne!(a, bi(2, "t", "ssn", &digits, b"078051120"));
        // The spec is part of the MAC input: other bits or normalisation, unrelated values.
        let short = BlindIndexSpec::new(Normalization::DigitsOnly, 32).unwrap();
        let s = bi(1, "t", "ssn", &short, b"078051120");
        assert_eq!(s.len(), 4);
        assert_ne!(a[..4], s[..]);
        let exact = BlindIndexSpec::new(Normalization::Exact, 256).unwrap();
        assert_ne!(a, bi(1, "t", "ssn", &exact, b"078051120"));
        // Both providers agree.
        let rc = blind_index_raw(
            &crate::crypto::rust_crypto::PROVIDER,
            &tk(1),
            &cx("t", "ssn"),
            &digits,
            b"078051120",
        )
        .unwrap();
        assert_eq!(a, rc);
    }

    #[test]
    fn siv_rejects_tampering() {
        let ct =
            seal_deterministic_raw(provider(), &tk(1), 7, &cx("t", "f"), b"hello world").unwrap();
        for i in 0..ct.len() {
            let mut bad = ct.clone();
            bad[i] ^= 0x01;
            let result = parse(&bad)
                .map_err(Error::from)
                .and_then(|p| open_deterministic_raw(provider(), &tk(1), &p, &cx("t", "f")));
            assert!(result.is_err(), "flip at byte {i} accepted");
        }
        let empty = seal_deterministic_raw(provider(), &tk(1), 1, &cx("t", "f"), b"").unwrap();
        assert_eq!(empty.len(), 22);
        let p = parse(&empty).unwrap();
        assert!(
            open_deterministic_raw(provider(), &tk(1), &p, &cx("t", "f"))
                .unwrap()
                .is_empty()
        );
    }
}
