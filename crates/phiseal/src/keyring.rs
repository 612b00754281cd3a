//! The keyring: the API a Rust service calls. Assembled by [`KeyringBuilder`] from a KMS
//! backend, a key store, an audit sink and cache settings.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use coarsetime::Instant;

use jiff::Timestamp;

use crate::audit::{Action, Actor, AuditEvent, AuditSink, KeySource, Outcome};
use crate::context::{EncryptionContext, TenantId};
use crate::crypto::{CryptoProvider, ct_eq, default_provider};
use crate::error::{BackendError, BackendErrorKind, Error};
use crate::field::{VersionKey, key_check};
use crate::format::{self, Algorithm};
use crate::kms::{KeyBinding, Kms};
use crate::secret::{Plaintext, TenantKey};
use crate::store::{KeyRecord, KeyState, KeyStore, TenantRecord};
use crate::stream::{StopReason, StreamKeyOrigin, StreamStop};

mod outage;
mod rootkey;
pub use rootkey::{RootKeyUsage, RootRewrapEvent, RootRewrapFailure, RootRewrapReport};
mod stream;
pub use stream::{AuditedStreamDecryptor, AuditedStreamEncryptor};
mod search;
mod tenant;
pub use tenant::TenantKeyring;
mod unwrap_failures;
mod views;

/// Where the keyring runs. `Production`, the default, refuses development-only parts (the
/// local file KMS, a disabled audit log, an audit sink that acknowledges before writing unless
/// allowed); `Development` must be asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Profile {
    /// Development and tests: every part allowed.
    Development,
    /// Production (the default): refuses `Kms::is_dev_only` backends, a disabled audit log
    /// and an audit sink that acknowledges before writing (unless
    /// [`KeyringBuilder::danger_allow_buffered_audit`]).
    #[default]
    Production,
}

/// Key-cache settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheSettings {
    /// Maximum unwrapped tenant key versions held (and tenant metadata entries). A key evicted
    /// for capacity can stay in use (and in memory) through its tenant's cached metadata
    /// until `key_ttl`, `max_uses` or the next metadata refresh, whichever comes first.
    pub capacity: usize,
    /// How long an unwrapped key is used before it is unwrapped again.
    pub key_ttl: Duration,
    /// Operations served by one unwrapped key before it is unwrapped again. The requests
    /// that waited on one unwrap all use the key they waited for, so a burst of concurrent
    /// misses can pass it by the number of those requests. (Nonce safety does not rest on it:
    /// an encryption epoch refuses to pass its own limit, `field::EPOCH_MESSAGE_LIMIT`.)
    pub max_uses: u64,
    /// How long tenant metadata (primary version, minimum version, shred state) is trusted
    /// before it is re-read from the key store: the bound within which a rotation, minimum
    /// version change or shred made by *another* process is seen. Changes made through this
    /// keyring are seen at once.
    pub metadata_ttl: Duration,
    /// How long past `key_ttl` a cached key may keep serving while the KMS is *unavailable*
    /// (unreachable, timing out, throttled), never when it refuses (access denied, disabled
    /// key, invalid data). Zero, the default, fails closed at `key_ttl`. While a key is served
    /// stale the KMS is tried again every [`STALE_RETRY_INTERVAL`]; each decision to serve a
    /// stale key, or to refuse one that is too old, is audited as `serve_stale_key`, and every
    /// field operation it serves records the key source `stale`.
    pub max_stale: Duration,
}

/// During a KMS outage the KMS is tried again this often: one request of the whole keyring
/// (per KMS backend, during a migration) makes the attempt (and requests for that key version wait for it, up to the backend's time
/// limit); meanwhile stale keys serve and keys that are not cached fail at once.
pub const STALE_RETRY_INTERVAL: Duration = Duration::from_secs(5);

impl Default for CacheSettings {
    fn default() -> Self {
        Self {
            capacity: 10_000,
            key_ttl: Duration::from_secs(300),
            max_uses: 100_000_000,
            metadata_ttl: Duration::from_secs(5),
            max_stale: Duration::ZERO,
        }
    }
}

/// Who calls and under which request id; every audit record carries both.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The authenticated identity.
    pub actor: Actor,
    /// Groups the audit records of one call.
    pub request_id: Arc<str>,
}

impl Caller {
    /// A caller with a fresh random request id.
    pub fn new(actor: Actor) -> Self {
        Self {
            actor,
            request_id: Self::fresh_request_id(),
        }
    }

    /// A fresh random request id (16 hex digits), for a call refused before it has a caller.
    pub fn fresh_request_id() -> Arc<str> {
        // A request id is not a secret: the thread-local CSPRNG (seeded from the OS) is enough
        // and saves a system call per request.
        format!("{:016x}", rand::random::<u64>()).into()
    }

    /// A caller with a given request id (the sidecar passes the client's).
    pub fn with_request_id(actor: Actor, request_id: impl Into<Arc<str>>) -> Self {
        Self {
            actor,
            request_id: request_id.into(),
        }
    }
}

/// One version of a tenant key as [`Keyring::key_status`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionStatus {
    /// Version number.
    pub version: u32,
    /// Lifecycle state.
    pub state: KeyState,
    /// Whether ciphertexts under it decrypt (not destroyed, not below the minimum).
    pub decrypts: bool,
    /// The root key that wraps it (`None` once destroyed).
    pub root_key_ref: Option<String>,
    /// When it was created.
    pub created_at: Timestamp,
}

/// A tenant's keys, without key material.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantStatus {
    /// The tenant.
    pub tenant: TenantId,
    /// The version new encryptions use (`None` once shredded).
    pub primary: Option<u32>,
    /// The minimum decryption version.
    pub min_decrypt_version: u32,
    /// When it was shredded, if it was.
    pub shredded_at: Option<Timestamp>,
    /// Every version, ascending.
    pub versions: Vec<VersionStatus>,
}

enum AuditChoice {
    Unset,
    Sink(Arc<dyn AuditSink>),
    Disabled,
}

/// Assembles a [`Keyring`]; [`KeyringBuilder::build`] refuses inconsistent combinations.
pub struct KeyringBuilder {
    kms: Option<Arc<dyn Kms>>,
    store: Option<Arc<dyn KeyStore>>,
    audit: AuditChoice,
    profile: Profile,
    provider: &'static CryptoProvider,
    algorithm: Algorithm,
    cache: CacheSettings,
    allow_buffered_audit: bool,
    max_stream_segment_size: u32,
}

impl Default for KeyringBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl KeyringBuilder {
    /// A builder with the default provider, algorithm (AES-256-GCM with HKDF subkeys), cache
    /// settings and profile (production).
    pub fn new() -> Self {
        Self {
            kms: None,
            store: None,
            audit: AuditChoice::Unset,
            profile: Profile::default(),
            provider: default_provider(),
            algorithm: Algorithm::Aes256GcmHkdf,
            cache: CacheSettings::default(),
            allow_buffered_audit: false,
            max_stream_segment_size: crate::stream::MAX_SEGMENT_SIZE,
        }
    }

    /// The KMS backend holding the root key (required).
    pub fn kms(mut self, kms: Arc<dyn Kms>) -> Self {
        self.kms = Some(kms);
        self
    }

    /// The key store (required).
    pub fn key_store(mut self, store: Arc<dyn KeyStore>) -> Self {
        self.store = Some(store);
        self
    }

    /// The audit sink (required unless [`KeyringBuilder::danger_disable_audit`]).
    pub fn audit(mut self, sink: Arc<dyn AuditSink>) -> Self {
        self.audit = AuditChoice::Sink(sink);
        self
    }

    /// Allows, in the `Production` profile, an audit sink that acknowledges records before
    /// writing them ([`AuditSink::acknowledges_before_write`], e.g. the file log's `Buffered`
    /// mode): faster, but records acknowledged just before a crash or a write failure are lost.
    pub fn danger_allow_buffered_audit(mut self) -> Self {
        self.allow_buffered_audit = true;
        self
    }

    /// Runs without an audit log. Benchmarks and tests only: the `Production` profile refuses
    /// it, and HIPAA deployments must not use it.
    pub fn danger_disable_audit(mut self) -> Self {
        self.audit = AuditChoice::Disabled;
        self
    }

    /// The deployment profile (default: [`Profile::Production`]).
    pub fn profile(mut self, profile: Profile) -> Self {
        self.profile = profile;
        self
    }

    /// The crypto provider (default: [`default_provider`]).
    pub fn crypto_provider(mut self, provider: &'static CryptoProvider) -> Self {
        self.provider = provider;
        self
    }

    /// The algorithm new ciphertexts use (decryption accepts every algorithm). A randomized
    /// one: deterministic encryption is asked for per call
    /// ([`Keyring::encrypt_deterministic`]), and `build` refuses it here.
    pub fn algorithm(mut self, algorithm: Algorithm) -> Self {
        self.algorithm = algorithm;
        self
    }

    /// Key-cache settings.
    pub fn cache(mut self, cache: CacheSettings) -> Self {
        self.cache = cache;
        self
    }

    /// The largest segment size a stream to decrypt may declare in its header (default
    /// [`crate::stream::MAX_SEGMENT_SIZE`], 16 MiB: every size the format allows), for
    /// [`Keyring::decrypt_stream`], [`Keyring::decrypting_reader`] and
    /// [`Keyring::start_decrypt_stream`] (which
    /// [`AuditedStreamDecryptor::with_max_segment_size`] can lower or raise per stream). A
    /// decryptor holds about three segments: a service decrypting streams from writers it does
    /// not fully trust bounds that memory here; a larger header is refused with
    /// [`Error::SegmentTooLarge`] before its key is looked up. It applies to decryption only:
    /// a stream this keyring encrypts has the segment size of its [`crate::stream::StreamOptions`]
    /// (keep that within the limit of every keyring that will read it).
    pub fn max_stream_segment_size(mut self, max: u32) -> Self {
        self.max_stream_segment_size = max;
        self
    }

    /// Checks the combination and builds the keyring.
    pub fn build(self) -> Result<Keyring, Error> {
        let kms = self
            .kms
            .ok_or_else(|| Error::Config("no KMS backend: call .kms(…)".into()))?;
        let kms_backends = kms.backend_count();
        let store = self
            .store
            .ok_or_else(|| Error::Config("no key store: call .key_store(…)".into()))?;
        let audit = match self.audit {
            AuditChoice::Unset => {
                return Err(Error::Config(
                    "no audit sink: call .audit(…) (every access to PHI must be audited)".into(),
                ));
            }
            AuditChoice::Sink(sink) => Some(sink),
            AuditChoice::Disabled => None,
        };
        if self.profile == Profile::Production {
            if kms.is_dev_only() {
                // (A chain is development-only through one of its members: name them all.)
                let names: Vec<String> = (0..kms.backend_count())
                    .map(|i| format!("'{}'", kms.backend_name(i)))
                    .collect();
                return Err(Error::Config(if names.len() > 1 {
                    format!(
                        "KMS backends {}: one of them is the local development KMS, which the \
                         production profile refuses: configure AWS KMS, Azure Key Vault or an \
                         HSM",
                        names.join(", ")
                    )
                } else {
                    format!(
                        "KMS backend {} is for development only and is refused by the \
                         production profile: configure AWS KMS, Azure Key Vault or an HSM",
                        names.join(", ")
                    )
                }));
            }
            match &audit {
                None => {
                    return Err(Error::Config(
                        "the production profile requires an audit sink".into(),
                    ));
                }
                Some(sink) if sink.acknowledges_before_write() && !self.allow_buffered_audit => {
                    return Err(Error::Config(format!(
                        "audit sink '{}' acknowledges records before writing them (not fail \
                         closed); the production profile refuses it unless \
                         .danger_allow_buffered_audit() is set",
                        sink.name()
                    )));
                }
                Some(_) => {}
            }
        }
        if self.algorithm.is_deterministic() {
            return Err(Error::Config(
                "the default algorithm must be randomized: deterministic encryption reveals \
                 equal values and is asked for per call (encrypt_deterministic)"
                    .into(),
            ));
        }
        let c = self.cache;
        if c.capacity == 0 || c.max_uses == 0 || c.key_ttl.is_zero() {
            return Err(Error::Config(
                "cache capacity, key_ttl and max_uses must be greater than zero".into(),
            ));
        }
        if c.max_uses > crate::field::EPOCH_MESSAGE_LIMIT / 2 {
            return Err(Error::Config(format!(
                "cache max_uses must be at most {} (a cached key's encryption epoch holds {} \
                 messages)",
                crate::field::EPOCH_MESSAGE_LIMIT / 2,
                crate::field::EPOCH_MESSAGE_LIMIT
            )));
        }
        if !(crate::stream::MIN_SEGMENT_SIZE..=crate::stream::MAX_SEGMENT_SIZE)
            .contains(&self.max_stream_segment_size)
        {
            return Err(Error::Config(format!(
                "max_stream_segment_size must be between {} and {} bytes",
                crate::stream::MIN_SEGMENT_SIZE,
                crate::stream::MAX_SEGMENT_SIZE
            )));
        }
        if c.metadata_ttl > c.key_ttl {
            return Err(Error::Config(
                "cache metadata_ttl must not exceed key_ttl".into(),
            ));
        }
        Ok(Keyring {
            inner: Arc::new(Inner {
                kms,
                store,
                audit,
                provider: self.provider,
                algorithm: self.algorithm,
                cache: c,
                key_ttl: c.key_ttl.into(),
                metadata_ttl: c.metadata_ttl.into(),
                max_age: (c.key_ttl.saturating_add(c.max_stale)).into(),
                tenants: views::TenantViews::new(c.capacity),
                keys: quick_cache::sync::Cache::new(c.capacity),
                unknown_version_reads: quick_cache::sync::Cache::new(c.capacity),
                streams: std::sync::Mutex::default(),
                read_sequence: AtomicU64::new(0),
                generations: Generations::default(),
                outages: outage::KmsOutages::new(kms_backends),
                unwrap_failures: unwrap_failures::UnwrapFailures::default(),
                query_refresh_paused_until: std::sync::atomic::AtomicU64::new(0),
                max_stream_segment_size: self.max_stream_segment_size,
            }),
        })
    }
}

/// A ciphertext naming an unknown (newer) key version re-reads the tenant's metadata at most
/// once per this interval per tenant (`Inner::unknown_version_reads`).
const MIN_REFRESH_AGE: coarsetime::Duration = coarsetime::Duration::from_millis(100);

/// A field operation's result and what it touched.
type FieldOutcome<T> = (Result<T, Error>, OpMeta);

/// An admin operation's result, its record's metadata, and the root key that wraps the key
/// version it created (for its result record, `AuditEvent::root_key`).
type AdminOutcome<T> = (Result<T, Error>, OpMeta, Option<Arc<str>>);

/// What one field operation touched, for its audit record.
#[derive(Default)]
struct OpMeta {
    key_version: Option<u32>,
    key_source: Option<KeySource>,
    /// For rewrap: the version the ciphertext was under.
    from_key_version: Option<u32>,
}

struct TenantView {
    record: TenantRecord,
    fetched_at: Instant,
    /// The tenant's shard of `Inner::generations`.
    shard: usize,
    /// `Inner::generations` for this tenant when this view was loaded: a key unwrapped
    /// through a view older than the tenant's last invalidation is not kept in the cache
    /// (see `version_key`).
    generation: u64,
    /// Keys this view has served, so that the per-field fast path needs one cache lookup,
    /// not two. A memo over `Inner::keys` (which does the coalescing): it dies with the view,
    /// and every entry is still checked for TTL and max uses before use.
    hot: std::sync::RwLock<Vec<Arc<VersionKey>>>,
    /// Set when it leaves the keyring's cache (`views`): it then serves no more fields.
    superseded: AtomicBool,
    /// `Inner::read_sequence` when its read began: the streams registered before it are
    /// those it may judge.
    read_seq: u64,
}

impl TenantView {
    fn new(
        record: TenantRecord,
        shard: usize,
        generation: u64,
        fetched_at: Instant,
        read_seq: u64,
    ) -> Self {
        Self {
            record,
            fetched_at,
            read_seq,
            shard,
            generation,
            hot: std::sync::RwLock::new(Vec::new()),
            superseded: AtomicBool::new(false),
        }
    }

    fn remember(&self, key: &Arc<VersionKey>) {
        if let Ok(mut hot) = self.hot.write() {
            hot.retain(|k| k.version() != key.version());
            hot.push(Arc::clone(key));
        }
    }
}

/// The cached metadata of the tenant a batch's previous item used: consecutive items of one
/// tenant (the usual batch) look it up once. Each item still checks it at its own time of
/// use ([`Keyring::view_serves_fields`]: current, and not dropped or replaced by the keyring
/// since), and the batch holds it only until its last item is done.
///
/// It also remembers the tenants of the batch that the key store did not have: their further
/// items are answered without another read, and once [`MAX_UNKNOWN_TENANTS_PER_BATCH`]
/// distinct tenants were not found, the batch's items that miss the caches are refused
/// without a store read, so that one call naming thousands of made-up tenants (a caller
/// granted `clinic-*`, say) cannot make thousands of key-store queries.
#[derive(Default)]
struct BatchView {
    view: Option<Arc<TenantView>>,
    unknown_tenants: Vec<TenantId>,
}

/// Distinct tenants of one batch that may be looked up in vain (see [`BatchView`]).
const MAX_UNKNOWN_TENANTS_PER_BATCH: usize = 16;

impl BatchView {
    /// The cached metadata of `tenant` the fast path may use at `now`, if any.
    fn get(&mut self, keyring: &Keyring, tenant: &TenantId, now: Instant) -> Option<&TenantView> {
        let reusable = self.view.as_ref().is_some_and(|view| {
            view.record.tenant == *tenant && keyring.view_serves_fields(view, now)
        });
        if !reusable {
            self.view = keyring.cached_view(tenant, now);
        }
        self.view.as_deref()
    }

    /// Runs an item's slow path (`slow`, which reads the key store for `tenant` when
    /// `reads_store`), unless the batch already found `tenant` missing, or found too many
    /// tenants missing; remembers `tenant` if it is.
    async fn slow_path<T>(
        &mut self,
        tenant: &TenantId,
        reads_store: bool,
        slow: impl Future<Output = FieldOutcome<T>>,
    ) -> FieldOutcome<T> {
        if self.unknown_tenants.contains(tenant) {
            let missing = Error::TenantNotFound {
                tenant: tenant.clone(),
            };
            return (Err(missing), OpMeta::default());
        }
        if reads_store && self.unknown_tenants.len() >= MAX_UNKNOWN_TENANTS_PER_BATCH {
            let refused = Error::InvalidInput {
                what: "batch",
                reason: "more than 16 of the tenants it names do not exist: the items of \
                         other tenants not in the cache were not looked up (check the tenant \
                         ids, or send those items again in another call)",
            };
            return (Err(refused), OpMeta::default());
        }
        let outcome = slow.await;
        if matches!(outcome.0, Err(Error::TenantNotFound { .. })) {
            self.unknown_tenants.push(tenant.clone());
        }
        outcome
    }
}

/// The contexts of a batch's items, for its audit records.
fn contexts_of<'a>(
    items: &'a [(&'a EncryptionContext, &'a [u8])],
) -> impl Iterator<Item = &'a EncryptionContext> {
    items.iter().map(|(context, _)| *context)
}

/// Invalidation counters: one epoch for `invalidate_all` and one counter per shard of
/// tenants for `invalidate_tenant`, so that invalidating one tenant (every admin operation,
/// every change notification of a shared store) leaves the other shards' cached metadata
/// current. A tenant's generation is the sum of the two; both only grow, so any
/// invalidation that concerns it changes the sum.
///
/// Each shard also has a key-use lock: every use of a tenant key version for a field
/// (encryption, decryption, searchable values) holds it shared, after checking that the
/// generation it validated the tenant under is still current; `shred` and every other admin
/// operation (rotate, minimum decryption version) take it exclusively once they have
/// committed and invalidated, so they return only when no operation that checked the tenant
/// before them still uses the key. (The lock is writer-preferring: a waiting admin operation
/// is not starved by a stream of new operations.)
struct Generations {
    all: std::sync::atomic::AtomicU64,
    shards: [std::sync::atomic::AtomicU64; GENERATION_SHARDS],
    key_use: [std::sync::RwLock<()>; GENERATION_SHARDS],
}

/// A use of a tenant key in progress (see [`Generations`]).
type KeyUse<'a> = std::sync::RwLockReadGuard<'a, ()>;

/// Shards of [`Generations`]: invalidating a tenant makes 1/64 of the tenants re-read.
const GENERATION_SHARDS: usize = 64;

impl Default for Generations {
    fn default() -> Self {
        Self {
            all: std::sync::atomic::AtomicU64::new(0),
            shards: std::array::from_fn(|_| std::sync::atomic::AtomicU64::new(0)),
            key_use: std::array::from_fn(|_| std::sync::RwLock::new(())),
        }
    }
}

impl Generations {
    /// The shard of `tenant` (stable within the process).
    fn shard_of(tenant: &TenantId) -> usize {
        use std::hash::{BuildHasher, BuildHasherDefault};
        let hash = BuildHasherDefault::<std::hash::DefaultHasher>::default().hash_one(tenant);
        // safe: the remainder is below GENERATION_SHARDS, which fits in usize.
        (hash % GENERATION_SHARDS as u64) as usize
    }

    /// The current generation of the tenants of `shard`.
    fn current(&self, shard: usize) -> u64 {
        use std::sync::atomic::Ordering::Acquire;
        let tenant = self.shards.get(shard).map_or(0, |s| s.load(Acquire));
        self.all.load(Acquire).wrapping_add(tenant)
    }

    fn bump_tenant(&self, tenant: &TenantId) {
        if let Some(shard) = self.shards.get(Self::shard_of(tenant)) {
            shard.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        }
    }

    fn bump_all(&self) {
        self.all.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }

    /// Starts a use of a key of a tenant in `shard`, checked under `generation`: `None` if
    /// the tenant was invalidated since (check it again first). Hold it while the key is used.
    fn enter(&self, shard: usize, generation: u64) -> Option<KeyUse<'_>> {
        let lock = self.key_use.get(shard)?;
        // The lock guards no data, so a panic while it was held leaves nothing inconsistent.
        let guard = lock
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        (self.current(shard) == generation).then_some(guard)
    }

    /// Waits until no use of a key of `shard` that started before this call is in progress.
    /// Blocks the thread for at most the longest such use (one field's cryptography).
    fn wait_for_key_uses(&self, shard: usize) {
        if let Some(lock) = self.key_use.get(shard) {
            drop(
                lock.write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner),
            );
        }
    }
}

struct Inner {
    kms: Arc<dyn Kms>,
    store: Arc<dyn KeyStore>,
    audit: Option<Arc<dyn AuditSink>>,
    provider: &'static CryptoProvider,
    algorithm: Algorithm,
    cache: CacheSettings,
    /// `cache.key_ttl` and `cache.metadata_ttl` on the coarse clock (checked per operation).
    key_ttl: coarsetime::Duration,
    metadata_ttl: coarsetime::Duration,
    /// `key_ttl + max_stale`: no key is used longer after its unwrap, outage or not.
    max_age: coarsetime::Duration,
    tenants: views::TenantViews,
    keys: quick_cache::sync::Cache<(TenantId, u32), Arc<VersionKey>>,
    /// When (coarse-clock ticks) each tenant was last read again because a ciphertext named a
    /// version newer than its cached metadata: not again within `MIN_REFRESH_AGE`, whatever
    /// replaced the metadata meanwhile.
    unknown_version_reads: quick_cache::sync::Cache<TenantId, u64>,
    /// The stop flags of the streams running per tenant (`crate::stream`): set when the
    /// tenant is found shredded, or cannot be read for longer than `max_age`, so that a
    /// running stream stops at its next segment.
    streams: std::sync::Mutex<HashMap<TenantId, TenantStreams>>,
    /// Counts tenant reads begun and streams registered, to order them (`StreamKeyOrigin`).
    read_sequence: AtomicU64,
    /// Bumped by every invalidation (rotate, minimum version, shred, `invalidate_tenant`,
    /// `invalidate_all`, `forget_metadata`).
    generations: Generations,
    /// Whether each KMS backend is in an outage, and when to try it again.
    outages: outage::KmsOutages,
    /// Failed unwraps, for the requests that were waiting on them.
    unwrap_failures: unwrap_failures::UnwrapFailures,
    /// Coarse-clock ticks until which queries do not try to re-read tenant metadata (the key
    /// store failed the last attempt; `keyring::search`); 0 when they may.
    query_refresh_paused_until: std::sync::atomic::AtomicU64,
    /// The largest segment size a stream to decrypt may declare (`KeyringBuilder`).
    max_stream_segment_size: u32,
}

/// The running streams of one tenant (`Inner::streams`).
struct TenantStreams {
    running: Vec<Weak<StreamStop>>,
    /// When the tenant's record was last read (or its first stream registered): its streams
    /// stop once that is older than `key_ttl + max_stale` and a read fails.
    confirmed_at: Instant,
}

impl TenantStreams {
    /// Makes those of the streams under key versions below `min` stop: all of them, or, for
    /// a minimum from a tenant read that began at read sequence `begun`, those whose own
    /// metadata was read before it began (no newer than that read).
    fn retire_below(&self, min: u32, begun: Option<u64>) {
        for stop in self.running.iter().filter_map(Weak::upgrade) {
            if begun.is_none_or(|b| stop.minimum_applies(b)) {
                stop.retire_below(min);
            }
        }
    }
}

/// Per-tenant envelope encryption of fields. Cheap to clone; share one per process.
#[derive(Clone)]
pub struct Keyring {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keyring")
            .field("kms", &self.inner.kms.name())
            .field("store", &self.inner.store.name())
            .field("audit", &self.inner.audit.as_ref().map(|a| a.name()))
            .field("provider", &self.inner.provider.name)
            .field("algorithm", &self.inner.algorithm)
            .finish_non_exhaustive()
    }
}

fn store_error(store: &dyn KeyStore, source: BackendError) -> Error {
    Error::Store {
        backend: store.name().to_owned(),
        source,
    }
}

/// An error of the KMS backend `kms`, named after it.
fn kms_error(kms: &dyn Kms, source: BackendError) -> Error {
    Error::Kms {
        backend: kms.name().to_owned(),
        source,
    }
}

/// What the wrapped bytes of `tenant`'s key `version` are bound to.
fn key_binding(tenant: &TenantId, version: u32) -> KeyBinding {
    KeyBinding {
        tenant: tenant.clone(),
        version,
    }
}

/// The error of an operation under the primary version that rotations overtook three times.
fn primary_kept_changing(store: &dyn KeyStore) -> Error {
    store_error(
        store,
        BackendError::new(
            BackendErrorKind::Conflict,
            "the tenant's primary key version changed repeatedly during the operation; retry",
        ),
    )
}

/// The error of an operation of `tenant` whose result record could not be written (`audit`):
/// [`Error::AuditAfterCommit`] when it succeeded (done, so a retry would repeat it: a second
/// rotation); the operation's own error when it failed in the key store, which may follow a
/// commit (so [`Error::Audit`], which says that nothing was done, would mislead; its attempt
/// record is on the log); else `audit` itself.
fn unrecorded<T>(
    action: Action,
    tenant: &TenantId,
    audit: Error,
    result: Result<T, Error>,
) -> Error {
    match (audit, result) {
        (Error::Audit { backend, source }, Ok(_)) => Error::AuditAfterCommit {
            action: action.as_str(),
            tenant: tenant.clone(),
            backend,
            source,
        },
        (Error::Audit { .. }, Err(store @ Error::Store { .. })) => store,
        (audit, _) => audit,
    }
}

/// Stops the running streams of `tenant` when dropped while `armed`: a `shred` whose future
/// was dropped after it reached the key store (it may have committed).
struct RevokeStreamsOnDrop<'a> {
    keyring: &'a Keyring,
    tenant: &'a TenantId,
    armed: bool,
}

impl Drop for RevokeStreamsOnDrop<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.keyring.revoke_streams(self.tenant);
        }
    }
}

/// The root key a key record is wrapped under, for its audit records.
fn root_key_of(record: &KeyRecord) -> Option<Arc<str>> {
    record
        .wrapped
        .as_ref()
        .map(|w| Arc::from(w.root_key_ref.as_str()))
}

/// The error for key bytes that are not the key `binding` names (tampering or a mix-up).
fn binding_mismatch(binding: &KeyBinding) -> Error {
    Error::KeyBindingMismatch {
        tenant: binding.tenant.clone(),
        version: binding.version,
    }
}

/// Conditions of a change of the minimum decryption version
/// ([`Keyring::set_min_decrypt_version_with`]). The default is the plain
/// [`Keyring::set_min_decrypt_version`]: any current minimum, never lowered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct MinVersionGuard {
    /// Change it only if the current minimum is this one (as a key status showed it): a change
    /// made since fails with [`Error::ConcurrentChange`], so a stale decision never undoes it.
    /// (A minimum that is already the one asked for is no change: a repeated call succeeds.)
    pub expected: Option<u32>,
    /// Allow a minimum below the current one. Lowering it brings retired key versions back
    /// into service (their old ciphertexts decrypt again), so it must be asked for.
    pub allow_lower: bool,
}

impl MinVersionGuard {
    /// Only if the current minimum is `expected` ([`MinVersionGuard::expected`]).
    pub fn if_current(mut self, expected: Option<u32>) -> Self {
        self.expected = expected;
        self
    }

    /// Whether a lower minimum is allowed ([`MinVersionGuard::allow_lower`]).
    pub fn allow_lower(mut self, allow: bool) -> Self {
        self.allow_lower = allow;
        self
    }
}

impl Keyring {
    /// A builder.
    pub fn builder() -> KeyringBuilder {
        KeyringBuilder::new()
    }

    // ----- audit -------------------------------------------------------------------------

    fn event(
        caller: &Caller,
        action: Action,
        tenant: Option<&TenantId>,
        context: Option<&EncryptionContext>,
        meta: &OpMeta,
        outcome: Outcome,
    ) -> AuditEvent {
        Self::event_at(
            Timestamp::now(),
            caller,
            action,
            tenant,
            context,
            meta,
            outcome,
        )
    }

    fn event_at(
        time: Timestamp,
        caller: &Caller,
        action: Action,
        tenant: Option<&TenantId>,
        context: Option<&EncryptionContext>,
        meta: &OpMeta,
        outcome: Outcome,
    ) -> AuditEvent {
        AuditEvent {
            time,
            actor: caller.actor.clone(),
            action,
            tenant: tenant.or(context.map(|c| c.tenant())).cloned(),
            field: context.map(|c| Arc::clone(c.field_shared())),
            record: context.and_then(|c| c.record_shared()).cloned(),
            key_version: meta.key_version,
            from_key_version: meta.from_key_version,
            key_source: meta.key_source,
            root_key: None,
            outcome,
            request_id: Arc::clone(&caller.request_id),
        }
    }

    async fn append(&self, events: &[AuditEvent]) -> Result<(), Error> {
        match &self.inner.audit {
            None => Ok(()),
            Some(sink) => sink.append(events).await.map_err(|source| Error::Audit {
                backend: sink.name().to_owned(),
                source,
            }),
        }
    }

    /// Records that `caller` was refused `action` before it ran (by the sidecar's
    /// authentication or policy): one record per context, or one naming only `tenant` when
    /// there are no contexts. `reason` becomes the record's result (`permission_denied`,
    /// `unauthenticated`). An error means the refusal could not be recorded.
    pub async fn audit_refusal(
        &self,
        caller: &Caller,
        action: Action,
        reason: &'static str,
        tenant: Option<&TenantId>,
        contexts: &[&EncryptionContext],
    ) -> Result<(), Error> {
        if self.inner.audit.is_none() {
            return Ok(());
        }
        let none = OpMeta::default();
        let outcome = Outcome::Error(reason);
        let events: Vec<AuditEvent> = if contexts.is_empty() {
            vec![Self::event(caller, action, tenant, None, &none, outcome)]
        } else {
            contexts
                .iter()
                .map(|c| Self::event(caller, action, None, Some(c), &none, outcome))
                .collect()
        };
        self.append(&events).await
    }

    /// Records the outcome of one field operation; the operation fails if that fails.
    async fn finish<T>(
        &self,
        caller: &Caller,
        action: Action,
        context: &EncryptionContext,
        (result, meta): FieldOutcome<T>,
    ) -> Result<T, Error> {
        if self.inner.audit.is_some() {
            let outcome = outcome_of(&result);
            let event = Self::event(caller, action, None, Some(context), &meta, outcome);
            self.append(std::slice::from_ref(&event)).await?;
        }
        result
    }

    /// Records the outcomes of a batch in one append; the whole batch fails if that fails.
    async fn finish_batch<T>(
        &self,
        caller: &Caller,
        action: Action,
        contexts: impl Iterator<Item = &EncryptionContext>,
        results: Vec<FieldOutcome<T>>,
    ) -> Result<Vec<Result<T, Error>>, Error> {
        self.audit_batch(caller, action, contexts, &results).await?;
        Ok(results.into_iter().map(|(result, _)| result).collect())
    }

    /// Writes the records of a batch of field operations (one per outcome, paired with
    /// `contexts`) in one append.
    async fn audit_batch<T>(
        &self,
        caller: &Caller,
        action: Action,
        contexts: impl Iterator<Item = &EncryptionContext>,
        outcomes: &[FieldOutcome<T>],
    ) -> Result<(), Error> {
        if self.inner.audit.is_none() {
            return Ok(());
        }
        // One time for the whole batch: its records are written together.
        let time = Timestamp::now();
        let events: Vec<AuditEvent> = contexts
            .zip(outcomes)
            .map(|(context, (result, meta))| {
                Self::event_at(
                    time,
                    caller,
                    action,
                    None,
                    Some(context),
                    meta,
                    outcome_of(result),
                )
            })
            .collect();
        self.append(&events).await
    }

    /// Writes the `attempt` record of an admin operation (refusing it if that fails), runs
    /// it, and records its outcome.
    async fn admin<T>(
        &self,
        caller: &Caller,
        action: Action,
        tenant: &TenantId,
        op: impl std::future::Future<Output = AdminOutcome<T>>,
    ) -> Result<T, Error> {
        let none = OpMeta::default();
        let attempt = Self::event(caller, action, Some(tenant), None, &none, Outcome::Attempt);
        self.append(std::slice::from_ref(&attempt)).await?;
        // Caches are dropped before the change and again after it, even if this call is
        // cancelled mid-way (the store may have committed): the guard runs on drop. A
        // cancelled call leaves only its `attempt` record; `key_status` shows the outcome.
        self.invalidate_tenant(tenant);
        let invalidate = InvalidateOnDrop {
            keyring: self,
            tenant,
        };
        let (result, meta, root_key) = op.await;
        drop(invalidate);
        // Operations that checked the tenant before the invalidation (an encryption under the
        // old primary, a decryption under a version just retired) finish before this returns;
        // later ones see the change.
        self.inner
            .generations
            .wait_for_key_uses(Generations::shard_of(tenant));
        let mut done = Self::event(
            caller,
            action,
            Some(tenant),
            None,
            &meta,
            outcome_of(&result),
        );
        done.root_key = root_key;
        match (self.append(std::slice::from_ref(&done)).await, result) {
            (Ok(()), result) => result,
            (Err(e), result) => Err(unrecorded(action, tenant, e, result)),
        }
    }

    // ----- caches ------------------------------------------------------------------------

    async fn load_view(&self, tenant: &TenantId) -> Result<Arc<TenantView>, Error> {
        let inner = &self.inner;
        // Read before the store: a view whose read may predate an invalidation is stale, and
        // its age counts from before the read (a slow read must not extend metadata_ttl).
        let shard = Generations::shard_of(tenant);
        let generation = inner.generations.current(shard);
        let fetched_at = Instant::now_without_cache_update();
        let begun = inner.read_sequence.fetch_add(1, Ordering::AcqRel) + 1;
        let loaded = inner
            .store
            .load_tenant(tenant)
            .await
            .map_err(|e| store_error(&*inner.store, e))
            .and_then(|found| {
                found.ok_or_else(|| Error::TenantNotFound {
                    tenant: tenant.clone(),
                })
            })
            .and_then(|record| {
                if record.tenant == *tenant {
                    return Ok(record);
                }
                // Defence in depth: never use another tenant's record (a store bug, a
                // collation that folds case) for this tenant.
                Err(store_error(
                    &*inner.store,
                    BackendError::new(
                        BackendErrorKind::InvalidData,
                        format!("the key store returned another tenant's record for '{tenant}'"),
                    ),
                ))
            });
        let record = match loaded {
            Ok(record) => record,
            Err(e) => {
                // Tenants are never deleted (a shred keeps the record): a key store without
                // it, or with a record it cannot vouch for, was restored or is the wrong one.
                // The tenant's running streams stop at once; an outage leaves them to the
                // re-reads' own limit.
                let refused = matches!(&e, Error::TenantNotFound { .. })
                    || matches!(&e, Error::Store { source, .. }
                        if source.kind() == BackendErrorKind::InvalidData);
                if refused {
                    self.refuse_streams(tenant, begun, |_| Some(e.replay()));
                }
                return Err(e);
            }
        };
        if record.shredded_at.is_some() {
            // Shredded, perhaps by another process: its running streams stop.
            self.revoke_streams(tenant);
        } else {
            self.confirm_streams(&record, fetched_at, begun);
        }
        self.drop_refused_keys(&record);
        Ok(Arc::new(TenantView::new(
            record, shard, generation, fetched_at, begun,
        )))
    }

    /// Drops the cached unwrapped keys of versions that `record`, freshly read, no longer lets
    /// serve — all of a shredded tenant's, destroyed ones, those below the minimum decryption
    /// version, and any whose record now has another key check (another key under the same
    /// version: a store restored from a backup, a failover that lost a rotation) — perhaps
    /// changed by another process: they are zeroized once no operation uses them, rather than
    /// when their TTL ends. If it dropped any, the tenant's cached metadata goes too.
    fn drop_refused_keys(&self, record: &TenantRecord) {
        let shredded = record.shredded_at.is_some();
        let keys = &self.inner.keys;
        let mut dropped = false;
        for version in &record.versions {
            let cache_key = KeyRef(&record.tenant, version.version);
            let Some(cached) = keys.get(&cache_key) else {
                continue;
            };
            let refused = shredded
                || version.state == KeyState::Destroyed
                || version.version < record.min_decrypt_version
                || !ct_eq(&cached.key_check, &version.key_check);
            if refused {
                dropped |= keys
                    .remove_if(&cache_key, |key| Arc::ptr_eq(key, &cached))
                    .is_some();
            }
        }
        if dropped {
            // The cached metadata (and the views' hot keys) predate what was just learned:
            // the next operation reads the store again.
            self.forget_metadata(Some(&record.tenant));
        }
    }

    /// Whether a cached view may be used: younger than `metadata_ttl` at `now`, and loaded
    /// after the last invalidation.
    fn view_is_current(&self, view: &TenantView, now: Instant) -> bool {
        now.duration_since(view.fetched_at) <= self.inner.metadata_ttl
            && view.generation == self.inner.generations.current(view.shard)
    }

    /// The tenant's metadata: the cached view if current, else a fresh read of the store.
    async fn tenant_view(&self, tenant: &TenantId, now: Instant) -> Result<Arc<TenantView>, Error> {
        let tenants = &self.inner.tenants;
        // A load that raced an invalidation is stale and is loaded again (bounded: under a
        // storm of invalidations the last load is used; it is at most one admin change old).
        for _ in 0..3 {
            if let Some(view) = tenants.get(tenant) {
                if self.view_is_current(&view, now) {
                    return Ok(view);
                }
                tenants.remove_if_same(tenant, &view);
            }
            let view = tenants.get_or_load(tenant, self.load_view(tenant)).await?;
            if view.generation == self.inner.generations.current(view.shard) {
                return Ok(view);
            }
        }
        tenants.get_or_load(tenant, self.load_view(tenant)).await
    }

    /// Drops cached metadata and unwrapped keys of `tenant` (they zeroize once no operation
    /// uses them). The next operation re-reads the key store and unwraps through the KMS.
    /// For a change another process made, [`Keyring::forget_metadata`] is enough (and keeps
    /// the keys the change still allows); this is for keys that must go whatever the store
    /// says.
    pub fn invalidate_tenant(&self, tenant: &TenantId) {
        // Bump first: an unwrap in flight through an older view will not keep its key.
        self.inner.generations.bump_tenant(tenant);
        self.inner.tenants.remove(tenant);
        self.inner.keys.retain(|(t, _), _| t != tenant);
    }

    /// Drops cached unwrapped keys past their lifetime (`key_ttl` + `max_stale`), also from
    /// the tenants' hot-key memos, and tenant metadata past `metadata_ttl`: expiry is
    /// otherwise noticed only at a tenant's next use, and an idle tenant's unwrapped keys would
    /// stay in memory until then. They zeroize once no operation uses them. Cheap enough to
    /// call every few seconds; the sidecar calls it every 60 s (every `key_ttl` / 2 when
    /// shorter). Returns how many keys left the key cache.
    pub fn evict_expired(&self) -> usize {
        let inner = &self.inner;
        let now = Instant::now_without_cache_update();
        let alive = |key: &VersionKey| now.duration_since(key.loaded_at) <= inner.max_age;
        let before = inner.keys.len();
        inner.keys.retain(|_, key| alive(key));
        let evicted = before.saturating_sub(inner.keys.len());
        // Tenants whose streams have all ended leave the stream registry.
        drop(self.live_streams());
        inner.tenants.retain(|view| {
            if let Ok(mut hot) = view.hot.write() {
                hot.retain(|key| alive(key));
            }
            now.duration_since(view.fetched_at) <= inner.metadata_ttl
        });
        evicted
    }

    /// A stop flag for a stream of `tenant` starting now from `view`'s metadata, with a key
    /// derived from `key` (see `Inner::streams`).
    fn register_stream(
        &self,
        tenant: &TenantId,
        key: &VersionKey,
        view: &TenantView,
    ) -> Arc<StreamStop> {
        let read_at = view.fetched_at;
        let origin = StreamKeyOrigin {
            version: key.version(),
            key_check: key.key_check,
            confirmed_at: AtomicU64::new(key.loaded_at.as_ticks()),
            failing_since: AtomicU64::new(0),
            registered: self.inner.read_sequence.fetch_add(1, Ordering::AcqRel) + 1,
            metadata_seq: view.read_seq,
        };
        let stop = Arc::new(StreamStop::new(origin));
        let mut streams = self.running_streams();
        let entry = streams
            .entry(tenant.clone())
            .or_insert_with(|| TenantStreams {
                running: Vec::new(),
                confirmed_at: read_at,
            });
        entry.running.retain(|f| f.strong_count() > 0);
        if entry.running.is_empty() {
            entry.confirmed_at = read_at;
        }
        entry.running.push(Arc::downgrade(&stop));
        stop
    }

    /// The registry of running streams. A panic elsewhere while it was locked leaves it
    /// consistent (each change is one map operation), so a poisoned lock is used as is.
    fn running_streams(&self) -> std::sync::MutexGuard<'_, HashMap<TenantId, TenantStreams>> {
        self.inner
            .streams
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The registry of running streams, without the streams that have ended and the tenants
    /// left with none.
    fn live_streams(&self) -> std::sync::MutexGuard<'_, HashMap<TenantId, TenantStreams>> {
        let mut streams = self.running_streams();
        streams.retain(|_, entry| {
            entry.running.retain(|f| f.strong_count() > 0);
            !entry.running.is_empty()
        });
        streams
    }

    /// Stops the running streams of `tenant` at their next segment, for the reason `decide`
    /// gives from their registry entry (`None`: they go on). Decided and removed under one
    /// lock, so that a read confirming the tenant meanwhile wins.
    fn stop_streams(
        &self,
        tenant: &TenantId,
        decide: impl FnOnce(&TenantStreams) -> Option<StopReason>,
    ) {
        let stopped = {
            let mut streams = self.running_streams();
            let Some(reason) = streams.get(tenant).and_then(decide) else {
                return;
            };
            streams.remove(tenant).map(|entry| (entry, reason))
        };
        if let Some((entry, reason)) = stopped {
            for stop in entry.running.iter().filter_map(Weak::upgrade) {
                stop.stop(reason.clone());
            }
        }
    }

    /// Stops the running streams of `tenant` at their next segment (it was shredded).
    fn revoke_streams(&self, tenant: &TenantId) {
        self.stop_streams(tenant, |_| Some(StopReason::Shredded));
    }

    /// Notes that the tenant's `record`, read at `read_at` (read sequence `begun`), is not
    /// shredded: its streams may go on, but those under a key version below its minimum
    /// decryption version stop before their next segment — those that started from metadata
    /// no newer than this read (a read that began before a lowering must not stop a stream
    /// that started after it) — and so do those under a version it no longer holds
    /// (destroyed, gone) or holds another key under (a key store restored or failed over), of
    /// the streams registered before this read began (an older read may predate the
    /// rotation that made a stream's version).
    fn confirm_streams(&self, record: &TenantRecord, read_at: Instant, begun: u64) {
        let tenant = &record.tenant;
        if let Some(entry) = self.running_streams().get_mut(tenant) {
            entry.confirmed_at = entry.confirmed_at.max(read_at);
            entry.retire_below(record.min_decrypt_version, Some(begun));
        }
        self.refuse_streams(tenant, begun, |stop| {
            let version = stop.key.version;
            match record.version(version) {
                None => Some(Error::KeyVersionNotFound {
                    tenant: tenant.clone(),
                    version,
                }),
                Some(key) if key.state == KeyState::Destroyed || key.wrapped.is_none() => {
                    Some(Error::KeyDestroyed {
                        tenant: tenant.clone(),
                    })
                }
                Some(key) if !ct_eq(&key.key_check, &stop.key.key_check) => {
                    Some(self.replaced_key_error(tenant, version))
                }
                Some(_) => None,
            }
        });
    }

    /// Stops, with the error `refusal` gives (if any), each running stream of `tenant` not
    /// stopped yet that registered before the tenant read at read sequence `begun` began.
    fn refuse_streams(
        &self,
        tenant: &TenantId,
        begun: u64,
        refusal: impl Fn(&StreamStop) -> Option<Error>,
    ) {
        let stops: Vec<Arc<StreamStop>> = match self.running_streams().get(tenant) {
            Some(entry) => entry.running.iter().filter_map(Weak::upgrade).collect(),
            None => return,
        };
        for stop in stops
            .iter()
            .filter(|s| s.read_after_start(begun) && !s.is_stopped())
        {
            if let Some(error) = refusal(stop) {
                stop.stop(StopReason::KeyRefused(Arc::new(error)));
            }
        }
    }

    /// The error that stops a running stream whose key version now holds another key than
    /// the one the stream derived from.
    fn replaced_key_error(&self, tenant: &TenantId, version: u32) -> Error {
        store_error(
            &*self.inner.store,
            BackendError::new(
                BackendErrorKind::Conflict,
                format!(
                    "the key record of version {version} of tenant '{tenant}' holds another \
                     key than the one a running stream started with (a key store restored or \
                     failed over?): the stream is stopped"
                ),
            ),
        )
    }

    /// Stops the running streams of `tenant` under key versions below `min` (its minimum
    /// decryption version was just raised) before their next segment.
    fn retire_streams(&self, tenant: &TenantId, min: u32) {
        if let Some(entry) = self.running_streams().get(tenant) {
            entry.retire_below(min, None);
        }
    }

    /// After a failed read of `tenant`: stops its running streams if its record was last
    /// read longer ago than a key may serve without its backing service (`key_ttl +
    /// max_stale`, as cached keys during a KMS outage), since whether it was shredded
    /// meanwhile is unknown (fail closed).
    fn stop_unconfirmed_streams(&self, tenant: &TenantId, now: Instant) {
        // (Each stream then fails, audited, with the error `Revocation::check` gives.)
        self.stop_streams(tenant, |entry| {
            let unconfirmed = now.duration_since(entry.confirmed_at);
            (unconfirmed > self.inner.max_age).then(|| StopReason::Unconfirmed {
                backend: self.inner.store.name().to_owned(),
                for_secs: unconfirmed.as_secs(),
            })
        });
    }

    /// Re-reads from the key store the tenants with running streams (`tenant` only, if
    /// given) and stops the streams of those found shredded (for a process told by a change
    /// notification that another process changed them, and periodically: the sidecar calls
    /// it every 60 s, or every `key_ttl` / 2 when shorter). Then confirms with the KMS the
    /// keys of the streams that have run for longer than `key_ttl` since their key version
    /// was last unwrapped, as a field operation would need at that age: through the key
    /// cache (a version unwrapped again recently confirms them without a KMS call; an unwrap
    /// is audited with `caller`). A refusal — a disabled or revoked root key, a destroyed
    /// version, another key under the version — or an unwrap that cannot be audited stops
    /// those streams before their next segment with that error; a KMS outage stops them once
    /// their key version was last unwrapped longer than `key_ttl + max_stale` ago and these
    /// checks have been failing for two `STALE_RETRY_INTERVAL`s with no KMS answer between
    /// (fail closed, but not on one blip); a key store failure leaves them to the re-read's
    /// own limit. Call it at least every minute or so for revocation at the KMS to reach
    /// running streams within about `key_ttl`. The first error is returned; every tenant is
    /// checked.
    pub async fn recheck_streams(
        &self,
        caller: &Caller,
        tenant: Option<&TenantId>,
    ) -> Result<(), Error> {
        let tenants: Vec<TenantId> = {
            let streams = self.live_streams();
            streams
                .keys()
                .filter(|t| tenant.is_none_or(|wanted| *t == wanted))
                .cloned()
                .collect()
        };
        let (views, mut result) = self.reread(&tenants).await;
        for view in &views {
            if let Err(e) = self.confirm_stream_keys(caller, view).await {
                result = result.and(Err(e));
            }
        }
        result
    }

    /// Confirms the key versions of the running streams of `view`'s tenant (just read) last
    /// unwrapped longer than `key_ttl` ago (see [`Keyring::recheck_streams`]), one lookup per
    /// version. A key store failure stops nothing here: the re-reads stop the streams of a
    /// tenant not read for too long. Any other failure but an outage stops them at once.
    async fn confirm_stream_keys(&self, caller: &Caller, view: &TenantView) -> Result<(), Error> {
        let inner = &self.inner;
        let tenant = &view.record.tenant;
        let unwrapped_for = |stop: &StreamStop, now: Instant| {
            now.duration_since(Instant::from_ticks(
                stop.key.confirmed_at.load(Ordering::Relaxed),
            ))
        };
        let mut due: std::collections::BTreeMap<u32, Vec<Arc<StreamStop>>> = Default::default();
        {
            let now = Instant::now_without_cache_update();
            if let Some(entry) = self.running_streams().get(tenant) {
                for stop in entry.running.iter().filter_map(Weak::upgrade) {
                    // (A stream registered after this read began waits for the next one.)
                    if !stop.is_stopped()
                        && stop.read_after_start(view.read_seq)
                        && unwrapped_for(&stop, now) > inner.key_ttl
                    {
                        due.entry(stop.key.version).or_default().push(stop);
                    }
                }
            }
        }
        let mut first_error = None;
        for (version, stops) in due {
            let now = Instant::now_without_cache_update();
            let error = match self.version_key(caller, view, version, now).await {
                Ok((key, source)) => {
                    for stop in &stops {
                        if ct_eq(&key.key_check, &stop.key.key_check) {
                            let stale = source == KeySource::Stale;
                            stop.key.served(key.loaded_at, stale, now);
                        } else if !stop.is_stopped() {
                            let replaced = self.replaced_key_error(tenant, version);
                            stop.stop(StopReason::KeyRefused(Arc::new(replaced)));
                        }
                    }
                    continue;
                }
                Err(e) => e,
            };
            // (A stream retired meanwhile keeps its own error.)
            let stops = stops.iter().filter(|stop| !stop.is_stopped());
            match &error {
                // An outage, or a failure of no known kind (an unexpected SDK error): a field
                // operation would fail once and be retried; a stream, which cannot be, stops
                // only once the key could serve no longer without the KMS (`key_ttl +
                // max_stale`) *and* the KMS has been failing for two retry intervals
                // (`STALE_RETRY_INTERVAL`: the backoff after one failure answers without
                // calling it for one, so it was asked again meanwhile) — not on one blip,
                // however often this is called.
                Error::Kms { backend, source }
                    if matches!(
                        source.kind(),
                        BackendErrorKind::Unavailable | BackendErrorKind::Other
                    ) =>
                {
                    let now = Instant::now_without_cache_update();
                    let retry: coarsetime::Duration = (STALE_RETRY_INTERVAL * 2).into();
                    // When the backend of this version's record last answered a call.
                    let answered = view
                        .record
                        .version(version)
                        .and_then(|record| record.wrapped.as_ref())
                        .map_or(0, |w| self.backend_of(&w.root_key_ref).0.last_answer());
                    for stop in stops {
                        let since = stop.key.failing(now, answered);
                        let unconfirmed = unwrapped_for(stop, now);
                        if unconfirmed > inner.max_age && now.duration_since(since) >= retry {
                            stop.stop(StopReason::KeyUnconfirmed {
                                backend: backend.clone(),
                                for_secs: unconfirmed.as_secs(),
                            });
                        }
                    }
                }
                Error::Store { .. } => {}
                // A refusal, a version gone, an unwrap that could not be audited: the key
                // serves no field operation now, nor the stream.
                _ => {
                    let reason = Arc::new(error.replay());
                    for stop in stops {
                        stop.stop(StopReason::KeyRefused(Arc::clone(&reason)));
                    }
                }
            }
            first_error.get_or_insert(error);
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Re-reads from the key store those of `tenants` — every tenant, given `None` — of which
    /// this keyring holds unwrapped keys or running streams (for the others there is nothing
    /// to drop), after [`Keyring::forget_metadata`]: drops the keys their records no longer
    /// let serve (a shred, destroyed versions, a raised minimum decryption version, another
    /// key under the same version) and stops the streams of shredded ones. Store errors are
    /// returned (the first); every tenant is read. Keys the records still allow stay cached.
    pub async fn recheck_tenants(&self, tenants: Option<&[TenantId]>) -> Result<(), Error> {
        let mut held: Vec<TenantId> = self.live_streams().keys().cloned().collect();
        held.extend(self.inner.keys.iter().map(|((tenant, _), _)| tenant));
        held.sort_unstable();
        held.dedup();
        if let Some(wanted) = tenants {
            let wanted: std::collections::HashSet<&TenantId> = wanted.iter().collect();
            held.retain(|t| wanted.contains(t));
        }
        self.reread(&held).await.1
    }

    /// Reads `tenants` from the key store (`load_view`: drops refused keys, stops the streams
    /// of shredded tenants), also after a failed read; returns the views read and the first
    /// error. A tenant that could not be read for longer than `key_ttl + max_stale` gets its
    /// streams stopped.
    async fn reread(&self, tenants: &[TenantId]) -> (Vec<Arc<TenantView>>, Result<(), Error>) {
        let mut views = Vec::with_capacity(tenants.len());
        let mut first_error = None;
        for t in tenants {
            match self.load_view(t).await {
                Ok(view) => views.push(view),
                Err(e) => {
                    self.stop_unconfirmed_streams(t, Instant::now_without_cache_update());
                    first_error.get_or_insert(e);
                }
            }
        }
        (views, first_error.map_or(Ok(()), Err))
    }

    /// `view`, or — when `version` is newer than any it knows, perhaps rotated by another
    /// process just before its notification arrives — the tenant read again at once: at most
    /// once per `MIN_REFRESH_AGE` per tenant, so that forged versions cannot hammer the store.
    async fn view_knowing(
        &self,
        view: Arc<TenantView>,
        version: u32,
        now: Instant,
    ) -> Result<Arc<TenantView>, Error> {
        let tenant = &view.record.tenant;
        if version > view.record.latest_version()
            && view.record.shredded_at.is_none()
            && self.may_read_for_unknown_version(tenant, now)
        {
            self.inner.tenants.remove_if_same(tenant, &view);
            return self.tenant_view(tenant, now).await;
        }
        Ok(view)
    }

    /// Whether `tenant` may be read again at `now` for a ciphertext naming an unknown newer
    /// version (see `Inner::unknown_version_reads`); if so, that read is noted.
    fn may_read_for_unknown_version(&self, tenant: &TenantId, now: Instant) -> bool {
        let reads = &self.inner.unknown_version_reads;
        let due = reads
            .get(tenant)
            .is_none_or(|last| now.duration_since(Instant::from_ticks(last)) >= MIN_REFRESH_AGE);
        if due {
            reads.insert(tenant.clone(), now.as_ticks());
        }
        due
    }

    /// How many unwrapped key versions the key cache holds (for `crate::testkit`).
    #[cfg(feature = "testkit")]
    pub(crate) fn cached_key_count(&self) -> usize {
        self.inner.keys.len()
    }

    /// Drops the cached metadata of `tenant` — of every tenant, given `None` — but keeps the
    /// unwrapped keys: for a change another process made through a shared key store (its
    /// change notification). The next operation on the tenant reads the store again and
    /// refuses what the change no longer allows, without a KMS call for keys it still allows —
    /// unlike [`Keyring::invalidate_tenant`], so that notifications (which anyone able to
    /// connect to the database can send) cannot empty the key cache, nor throw away the keys
    /// that serve through a KMS outage. Follow it with [`Keyring::recheck_tenants`], which
    /// drops the keys the change destroyed at once.
    pub fn forget_metadata(&self, tenant: Option<&TenantId>) {
        let inner = &self.inner;
        match tenant {
            Some(tenant) => {
                inner.generations.bump_tenant(tenant);
                inner.tenants.remove(tenant);
            }
            None => {
                inner.generations.bump_all();
                inner.tenants.clear();
            }
        }
    }

    /// Drops every tenant's cached metadata and unwrapped keys. After missed change
    /// notifications (a shared key store's listener reconnecting),
    /// [`Keyring::forget_metadata`]`(None)` is enough.
    pub fn invalidate_all(&self) {
        self.inner.generations.bump_all();
        self.inner.tenants.clear();
        self.inner.keys.clear();
    }

    async fn version_key(
        &self,
        caller: &Caller,
        view: &TenantView,
        version: u32,
        now: Instant,
    ) -> Result<(Arc<VersionKey>, KeySource), Error> {
        let inner = &self.inner;
        let record = &view.record;
        let tenant = &record.tenant;
        if record.shredded_at.is_some() {
            return Err(Error::KeyDestroyed {
                tenant: tenant.clone(),
            });
        }
        let key_record = record
            .version(version)
            .ok_or_else(|| Error::KeyVersionNotFound {
                tenant: tenant.clone(),
                version,
            })?;
        if let Some(key) = inner.keys.get(&KeyRef(tenant, version)) {
            if !ct_eq(&key.key_check, &key_record.key_check) {
                // Another key under the same version now (a store restored, a failover that
                // lost a rotation), or this view is the older one: the cached key must not
                // serve this record. (One lookup: a key inserted after this check is checked
                // below like any other.)
                inner
                    .keys
                    .remove_if(&KeyRef(tenant, version), |k| Arc::ptr_eq(k, &key));
            } else if let Some(source) = self.serve(&key, now) {
                return Ok((key, source));
            } else if self.may_serve_stale(&key, now) {
                if let Some(done) = self
                    .refresh_or_serve_stale(caller, view, key_record, key)
                    .await
                {
                    return done;
                }
            } else {
                let removed = inner
                    .keys
                    .remove_if(&KeyRef(tenant, version), |k| Arc::ptr_eq(k, &key))
                    .is_some();
                if removed {
                    self.audit_stale_expiry(caller, tenant, &key, now).await?;
                }
            }
        }
        // Not through a view an invalidation (a shred) has overtaken: the KMS would unwrap, and
        // the log record, a key of a tenant that may be gone (a query reuses one view across
        // several versions and awaits in between).
        if inner.generations.current(view.shard) != view.generation {
            self.recheck_after_invalidation(tenant, version).await?;
        }
        let cache_key = (tenant.clone(), version);
        let mut unwrapped_here = false;
        let mut key = None;
        // A key another request unwrapped (or cached) meanwhile from another record of this
        // version — an older view's, or the store's before a restore — must not serve this
        // one: it is dropped and the lookup made again (once: then the record changed twice).
        for _ in 0..2 {
            let ticket = inner.unwrap_failures.ticket();
            let found = inner
                .keys
                .get_or_insert_async(&cache_key, async {
                    // An unwrap this request waited on failed: its failure, not one more KMS
                    // call (each waiter would otherwise call the KMS in turn).
                    if let Some(failure) =
                        inner
                            .unwrap_failures
                            .since(&cache_key, &key_record.key_check, ticket)
                    {
                        return Err(failure);
                    }
                    unwrapped_here = true;
                    let result = self.unwrap_version_guarded(tenant, key_record).await;
                    if let Err(e) = &result {
                        inner
                            .unwrap_failures
                            .record(&cache_key, &key_record.key_check, e);
                    }
                    self.audit_unwrap(caller, tenant, key_record, &result)
                        .await?;
                    result.map(Arc::new)
                })
                .await?;
            if unwrapped_here || ct_eq(&found.key_check, &key_record.key_check) {
                key = Some(found);
                break;
            }
            inner
                .keys
                .remove_if(&KeyRef(tenant, version), |k| Arc::ptr_eq(k, &found));
        }
        let key = key.ok_or_else(|| {
            store_error(
                &*inner.store,
                BackendError::new(
                    BackendErrorKind::Conflict,
                    format!(
                        "the key record of version {version} of tenant '{tenant}' changed \
                         during the operation (a key store restored or failed over?); retry"
                    ),
                ),
            )
        })?;
        let invalidated = inner.generations.current(view.shard) != view.generation;
        let source = if unwrapped_here {
            // An invalidation (shred, rotation, …) since `view` was loaded: the cache must not
            // keep the key.
            if invalidated {
                inner
                    .keys
                    .remove_if(&KeyRef(tenant, version), |k| Arc::ptr_eq(k, &key));
            }
            KeySource::Kms
        } else {
            // A waiter on a coalesced unwrap: count its use too.
            key.uses.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            KeySource::Cache
        };
        if invalidated {
            // …nor may this operation use it before the tenant is checked again: a shred that
            // committed while the KMS was unwrapping must refuse it.
            self.recheck_after_invalidation(tenant, version).await?;
        }
        Ok((key, source))
    }

    /// Re-reads `tenant` after an invalidation that happened during a slow key lookup and
    /// refuses `version` if the fresh metadata no longer allows it (shredded, version gone or
    /// below the minimum decryption version).
    async fn recheck_after_invalidation(
        &self,
        tenant: &TenantId,
        version: u32,
    ) -> Result<Arc<TenantView>, Error> {
        let fresh = self
            .tenant_view(tenant, Instant::now_without_cache_update())
            .await?;
        let record = &fresh.record;
        if record.shredded_at.is_some() {
            return Err(Error::KeyDestroyed {
                tenant: tenant.clone(),
            });
        }
        if record.version(version).is_none() {
            return Err(Error::KeyVersionNotFound {
                tenant: tenant.clone(),
                version,
            });
        }
        let min = record.min_decrypt_version;
        if version < min {
            return Err(Error::KeyVersionRetired {
                tenant: tenant.clone(),
                version,
                min,
            });
        }
        Ok(fresh)
    }

    /// [`Keyring::unwrap_version`] unless a KMS outage is in progress and its next attempt is
    /// not due (then it fails at once, naming the backend, not the last failure's cause); records the
    /// outcome for the outage policy. A record refused without the KMS (destroyed, or under a
    /// root key not configured here) is refused before the outage is consulted: taking the
    /// due retry and then not calling would hold every other key off the KMS for longer.
    async fn unwrap_version_guarded(
        &self,
        tenant: &TenantId,
        record: &KeyRecord,
    ) -> Result<VersionKey, Error> {
        let wrapped = self.refuse_without_kms(tenant, record)?;
        let (outage, backend) = self.backend_of(&wrapped.root_key_ref);
        if !outage.may_call(Instant::now_without_cache_update()) {
            return Err(outage.error(backend));
        }
        self.unwrap_wrapped(tenant, record, wrapped).await
    }

    /// Audits one attempt to get a tenant key version from the KMS.
    /// `record` is the version's key record: its wrapped key names the root key asked.
    async fn audit_unwrap<T>(
        &self,
        caller: &Caller,
        tenant: &TenantId,
        record: &KeyRecord,
        result: &Result<T, Error>,
    ) -> Result<(), Error> {
        if self.inner.audit.is_none() {
            return Ok(());
        }
        let meta = OpMeta {
            key_version: Some(record.version),
            key_source: Some(KeySource::Kms),
            from_key_version: None,
        };
        let mut event = Self::event(
            caller,
            Action::UnwrapKey,
            Some(tenant),
            None,
            &meta,
            outcome_of(result),
        );
        event.root_key = root_key_of(record);
        self.append(std::slice::from_ref(&event)).await
    }

    /// The wrapped key of `record`, or the refusal decided without the KMS: a destroyed
    /// version, or one wrapped under a root key this keyring is not configured with.
    fn refuse_without_kms<'r>(
        &self,
        tenant: &TenantId,
        record: &'r KeyRecord,
    ) -> Result<&'r crate::kms::WrappedKey, Error> {
        let inner = &self.inner;
        let destroyed = || Error::KeyDestroyed {
            tenant: tenant.clone(),
        };
        if record.state == KeyState::Destroyed {
            return Err(destroyed());
        }
        let wrapped = record.wrapped.as_ref().ok_or_else(destroyed)?;
        if !inner.kms.can_unwrap(&wrapped.root_key_ref) {
            // Wrapped under a root key this keyring is not configured with (a migration whose
            // old backend is not configured as previous): a configuration problem, not tampering.
            return Err(kms_error(
                &*inner.kms,
                BackendError::new(
                    BackendErrorKind::Misconfigured,
                    format!(
                        "tenant '{tenant}' version {} is wrapped under root key '{}', which is \
                         not configured here: configure its backend (as [kms.previous] during a \
                         migration) or finish `phiseal root rotate`",
                        record.version,
                        crate::kms::printable(&wrapped.root_key_ref, 300)
                    ),
                ),
            ));
        }
        Ok(wrapped)
    }

    /// Unwraps one version through the KMS and checks its binding.
    async fn unwrap_version(
        &self,
        tenant: &TenantId,
        record: &KeyRecord,
    ) -> Result<VersionKey, Error> {
        let wrapped = self.refuse_without_kms(tenant, record)?;
        self.unwrap_wrapped(tenant, record, wrapped).await
    }

    /// [`Keyring::unwrap_version`] once [`Keyring::refuse_without_kms`] let `wrapped` through.
    async fn unwrap_wrapped(
        &self,
        tenant: &TenantId,
        record: &KeyRecord,
        wrapped: &crate::kms::WrappedKey,
    ) -> Result<VersionKey, Error> {
        let inner = &self.inner;
        let binding = key_binding(tenant, record.version);
        let unwrapped = inner.kms.unwrap(wrapped, &binding).await;
        // Only the outcome of a real KMS call moves the outage state (the checks above
        // decided without the KMS), and only the state of the backend that was called.
        let index = inner.kms.backend_for(&wrapped.root_key_ref).unwrap_or(0);
        let (outage, backend) = self.backend(index);
        outage.record(&unwrapped, Instant::now_without_cache_update());
        let key = unwrapped.map_err(|source| match source.kind() {
            BackendErrorKind::InvalidData => binding_mismatch(&binding),
            _ => Error::Kms {
                backend: backend.to_owned(),
                source,
            },
        })?;
        let check = key_check(inner.provider, &key, &binding);
        if !ct_eq(&check, &record.key_check) {
            return Err(binding_mismatch(&binding));
        }
        Ok(
            VersionKey::new(inner.provider, record.version, key, record.key_check)?
                .unwrapped_by(index),
        )
    }

    // ----- field operations ----------------------------------------------------------------

    /// Whether a cached key may serve one more operation (counted), and as what: within its
    /// TTL ([`KeySource::Cache`]) or, during a KMS outage, within `max_stale` past it and
    /// before the next KMS retry ([`KeySource::Stale`]); always under max uses with its
    /// encryption epoch not exhausted. A stale key serves only while the outage lasts: once
    /// the KMS has answered (a key, or a refusal) the next use goes back to the KMS.
    fn serve(&self, key: &VersionKey, now: Instant) -> Option<KeySource> {
        let inner = &self.inner;
        let age = now.duration_since(key.loaded_at);
        let source = if age <= inner.key_ttl {
            KeySource::Cache
        } else if age <= inner.max_age
            && key.is_degraded_at(now)
            && self.backend_of_key(key).0.is_active()
        {
            KeySource::Stale
        } else {
            return None;
        };
        (key.uses.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < inner.cache.max_uses
            && !key.epoch_exhausted())
        .then_some(source)
    }

    /// Whether a key that [`Keyring::serve`] turned down may still serve if the KMS is
    /// unavailable: within `key_ttl + max_stale`, under max uses, epoch not exhausted.
    fn may_serve_stale(&self, key: &VersionKey, now: Instant) -> bool {
        let inner = &self.inner;
        now.duration_since(key.loaded_at) <= inner.max_age
            && key.uses.load(std::sync::atomic::Ordering::Relaxed) < inner.cache.max_uses
            && !key.epoch_exhausted()
    }

    /// Runs `op` with the fresh key of `version` remembered by `view` (borrowed under the
    /// memo's read lock: no reference counting on the per-field path), without touching the
    /// KMS or the store; `None` sends the caller to the slow path (which also handles expiry
    /// and max uses).
    fn with_cached_key<T>(
        &self,
        view: &TenantView,
        version: u32,
        now: Instant,
        op: impl FnOnce(&VersionKey) -> T,
    ) -> Option<(T, KeySource)> {
        let _in_use = self.inner.generations.enter(view.shard, view.generation)?;
        let hot = view.hot.read().ok()?;
        let key = hot.iter().find(|k| k.version() == version)?;
        let source = self.serve(key, now)?;
        Some((op(key), source))
    }

    /// Runs `op` with a key that the slow path looked up through `view`, holding the key-use
    /// guard (see [`Generations`]). If the tenant was invalidated since `view` was checked,
    /// it is re-read first and the key refused if the fresh metadata no longer allows it
    /// (shredded, version gone or retired).
    async fn use_key<T>(
        &self,
        view: &TenantView,
        key: &VersionKey,
        op: impl FnOnce() -> T,
    ) -> Result<T, Error> {
        match self.use_key_as(view, key, false, op).await? {
            Some(done) => Ok(done),
            // (Only a `primary` use gives way to a newer version.)
            None => Err(Error::KeyVersionNotFound {
                tenant: view.record.tenant.clone(),
                version: key.version(),
            }),
        }
    }

    /// [`Keyring::use_key`]; with `primary` (an encryption), the version must also still be
    /// the tenant's primary after an invalidation, with `key`'s key check: `None` when a
    /// rotation (through this keyring, or seen from another process) made another version
    /// primary meanwhile, so that nothing is encrypted under the old primary once `rotate` has
    /// returned — or when the version now has another key (a failover that lost a rotation).
    async fn use_key_as<T>(
        &self,
        view: &TenantView,
        key: &VersionKey,
        primary: bool,
        op: impl FnOnce() -> T,
    ) -> Result<Option<T>, Error> {
        let version = key.version();
        let generations = &self.inner.generations;
        let mut generation = view.generation;
        for _ in 0..3 {
            if let Some(_in_use) = generations.enter(view.shard, generation) {
                return Ok(Some(op()));
            }
            generation = generations.current(view.shard);
            let fresh = self
                .recheck_after_invalidation(&view.record.tenant, version)
                .await?;
            let still_this_key = fresh
                .record
                .version(version)
                .is_some_and(|r| ct_eq(&r.key_check, &key.key_check));
            if primary
                && (fresh.record.primary().map(|p| p.version) != Some(version) || !still_this_key)
            {
                return Ok(None);
            }
        }
        // Fail closed under a storm of invalidations rather than use an unchecked key.
        Err(store_error(
            &*self.inner.store,
            BackendError::new(
                BackendErrorKind::Conflict,
                "the tenant's keys changed repeatedly during the operation; retry",
            ),
        ))
    }

    /// The cached, fresh metadata of a live tenant; `None` sends the caller to the slow path.
    fn cached_view(&self, tenant: &TenantId, now: Instant) -> Option<Arc<TenantView>> {
        let view = self.inner.tenants.get(tenant)?;
        self.view_serves_fields(&view, now).then_some(view)
    }

    /// Whether the per-field fast path may use `view`: current (see
    /// [`Keyring::view_is_current`]), still the keyring's view of its tenant (not superseded
    /// by a fresher read, `views`) and of a tenant not shredded.
    fn view_serves_fields(&self, view: &TenantView, now: Instant) -> bool {
        self.view_is_current(view, now)
            && !view.is_superseded()
            && view.record.shredded_at.is_none()
    }

    /// Encrypts from the caches alone (no await); `None` when something is not cached.
    fn encrypt_cached(
        &self,
        context: &EncryptionContext,
        plaintext: &[u8],
        now: Instant,
    ) -> Option<FieldOutcome<Vec<u8>>> {
        let view = self.cached_view(context.tenant(), now)?;
        self.encrypt_in_view(&view, context, plaintext, now)
    }

    /// [`Keyring::encrypt_cached`] with the tenant's view in hand (one that
    /// [`Keyring::view_serves_fields`] accepted at `now`).
    fn encrypt_in_view(
        &self,
        view: &TenantView,
        context: &EncryptionContext,
        plaintext: &[u8],
        now: Instant,
    ) -> Option<FieldOutcome<Vec<u8>>> {
        let version = view.record.primary()?.version;
        let (result, source) = self.with_cached_key(view, version, now, |key| {
            key.encrypt(self.inner.algorithm, context, plaintext)
        })?;
        let meta = OpMeta {
            key_version: Some(version),
            key_source: Some(source),
            from_key_version: None,
        };
        Some((result, meta))
    }

    /// One field of a batch (or of a rewrap), not yet audited; `view` carries the tenant's
    /// cached metadata from the batch's previous item.
    async fn encrypt_one(
        &self,
        view: &mut BatchView,
        caller: &Caller,
        context: &EncryptionContext,
        plaintext: &[u8],
    ) -> FieldOutcome<Vec<u8>> {
        let now = Instant::now_without_cache_update();
        let cached = view
            .get(self, context.tenant(), now)
            .and_then(|view| self.encrypt_in_view(view, context, plaintext, now));
        match cached {
            Some(outcome) => outcome,
            None => {
                let slow = self.encrypt_slow(caller, context, plaintext, now);
                view.slow_path(context.tenant(), true, slow).await
            }
        }
    }

    /// Encrypts through the store and the KMS where the caches miss.
    async fn encrypt_slow(
        &self,
        caller: &Caller,
        context: &EncryptionContext,
        plaintext: &[u8],
        now: Instant,
    ) -> FieldOutcome<Vec<u8>> {
        let mut meta = OpMeta::default();
        let result = async {
            // Again with the new primary if a rotation overtook the lookup (twice at most).
            let mut now = now;
            for _ in 0..3 {
                // (A failed retry is not recorded with the overtaken attempt's key.)
                meta = OpMeta::default();
                let view = self.tenant_view(context.tenant(), now).await?;
                // Key age (TTL, max_stale) is judged at the time of use, not before the
                // awaits on the key store (or, on a retry, the KMS) that came first.
                now = Instant::now_without_cache_update();
                let primary = view
                    .record
                    .primary()
                    .ok_or_else(|| Error::KeyDestroyed {
                        tenant: context.tenant().clone(),
                    })?
                    .version;
                meta.key_version = Some(primary);
                let (key, source) = self.version_key(caller, &view, primary, now).await?;
                view.remember(&key);
                meta.key_source = Some(source);
                let sealed = self
                    .use_key_as(&view, &key, true, || {
                        key.encrypt(self.inner.algorithm, context, plaintext)
                    })
                    .await?;
                if let Some(sealed) = sealed {
                    return sealed;
                }
            }
            Err(primary_kept_changing(&*self.inner.store))
        }
        .await;
        (result, meta)
    }

    /// Decrypts from the caches alone (no await); `None` when something is not cached or the
    /// ciphertext needs the slow path's checks and errors.
    fn decrypt_cached(
        &self,
        context: &EncryptionContext,
        ciphertext: &[u8],
        now: Instant,
    ) -> Option<FieldOutcome<Plaintext>> {
        let parsed = format::parse(ciphertext).ok()?;
        let view = self.cached_view(context.tenant(), now)?;
        self.decrypt_in_view(&view, &parsed, context, now)
    }

    /// [`Keyring::decrypt_cached`] with the ciphertext parsed and the tenant's view in hand
    /// (one that [`Keyring::view_serves_fields`] accepted at `now`).
    fn decrypt_in_view(
        &self,
        view: &TenantView,
        parsed: &format::ParsedCiphertext<'_>,
        context: &EncryptionContext,
        now: Instant,
    ) -> Option<FieldOutcome<Plaintext>> {
        let version = parsed.key_version;
        if version < view.record.min_decrypt_version {
            return None;
        }
        let (result, source) =
            self.with_cached_key(view, version, now, |key| key.decrypt(parsed, context))?;
        let meta = OpMeta {
            key_version: Some(version),
            key_source: Some(source),
            from_key_version: None,
        };
        Some((result, meta))
    }

    /// [`Keyring::encrypt_one`] for decryption.
    async fn decrypt_one(
        &self,
        view: &mut BatchView,
        caller: &Caller,
        context: &EncryptionContext,
        ciphertext: &[u8],
    ) -> FieldOutcome<Plaintext> {
        let now = Instant::now_without_cache_update();
        let cached = format::parse(ciphertext).ok().and_then(|parsed| {
            let view = view.get(self, context.tenant(), now)?;
            self.decrypt_in_view(view, &parsed, context, now)
        });
        match cached {
            Some(outcome) => outcome,
            None => {
                // (A ciphertext that does not parse fails before any store read.)
                let reads_store = format::parse(ciphertext).is_ok();
                let slow = self.decrypt_slow(caller, context, ciphertext, now);
                view.slow_path(context.tenant(), reads_store, slow).await
            }
        }
    }

    /// Decrypts through the store and the KMS where the caches miss, with every check.
    async fn decrypt_slow(
        &self,
        caller: &Caller,
        context: &EncryptionContext,
        ciphertext: &[u8],
        now: Instant,
    ) -> FieldOutcome<Plaintext> {
        let mut meta = OpMeta::default();
        let result = async {
            let parsed = format::parse(ciphertext)?;
            let version = parsed.key_version;
            meta.key_version = Some(version);
            let view = self.tenant_view(context.tenant(), now).await?;
            let view = self.view_knowing(view, version, now).await?;
            let min = view.record.min_decrypt_version;
            if version < min && view.record.shredded_at.is_none() {
                return Err(Error::KeyVersionRetired {
                    tenant: context.tenant().clone(),
                    version,
                    min,
                });
            }
            // Key age is judged now, after the awaits on the key store above.
            let now = Instant::now_without_cache_update();
            let (key, source) = self.version_key(caller, &view, version, now).await?;
            view.remember(&key);
            meta.key_source = Some(source);
            self.use_key(&view, &key, || key.decrypt(&parsed, context))
                .await?
        }
        .await;
        (result, meta)
    }

    /// [`Keyring::rewrap_inner`], its record naming the version the ciphertext was under
    /// (`from_key_version`) whatever the outcome, when its header could be read.
    async fn rewrap_one(
        &self,
        view: &mut BatchView,
        caller: &Caller,
        context: &EncryptionContext,
        ciphertext: &[u8],
    ) -> FieldOutcome<Vec<u8>> {
        let (result, mut meta) = self.rewrap_inner(view, caller, context, ciphertext).await;
        meta.from_key_version = format::parse(ciphertext).ok().map(|p| p.key_version);
        (result, meta)
    }

    async fn rewrap_inner(
        &self,
        view: &mut BatchView,
        caller: &Caller,
        context: &EncryptionContext,
        ciphertext: &[u8],
    ) -> FieldOutcome<Vec<u8>> {
        // A failed decrypt is recorded with the version and key source it tried.
        let (plaintext, decrypted) = self.decrypt_one(view, caller, context, ciphertext).await;
        let plaintext = match plaintext {
            Ok(p) => p,
            Err(e) => return (Err(e), decrypted),
        };
        // A deterministic ciphertext stays deterministic (its column is searched by equality).
        let deterministic =
            format::parse(ciphertext).is_ok_and(|parsed| parsed.algorithm.is_deterministic());
        let target = if deterministic {
            Algorithm::Aes256Siv
        } else {
            self.inner.algorithm
        };
        if let Ok(parsed) = format::parse(ciphertext) {
            let view = self
                .tenant_view(context.tenant(), Instant::now_without_cache_update())
                .await;
            let primary = view
                .as_ref()
                .ok()
                .and_then(|v| v.record.primary().map(|p| p.version));
            if primary == Some(parsed.key_version) && parsed.algorithm == target {
                // Already current: the record says where the decrypt's key came from.
                return (Ok(ciphertext.to_vec()), decrypted);
            }
        }
        if deterministic {
            return self
                .encrypt_deterministic_one(caller, context, &plaintext)
                .await;
        }
        self.encrypt_one(view, caller, context, &plaintext).await
    }

    /// Encrypts one field under the tenant's primary key version. Audited.
    pub async fn encrypt(
        &self,
        caller: &Caller,
        context: &EncryptionContext,
        plaintext: &[u8],
    ) -> Result<Vec<u8>, Error> {
        let now = Instant::now_without_cache_update();
        match self.encrypt_cached(context, plaintext, now) {
            // (Returned here rather than in `complete_encrypt`: the fast path's result is not
            // moved through another future.)
            Some(outcome) if self.inner.audit.is_none() => outcome.0,
            cached => {
                self.complete_encrypt(caller, context, plaintext, now, cached)
                    .await
            }
        }
    }

    /// Completes [`Keyring::encrypt`] from the fast path's outcome, or from the slow path when
    /// the caches missed (`cached` is `None`), and audits it.
    async fn complete_encrypt(
        &self,
        caller: &Caller,
        context: &EncryptionContext,
        plaintext: &[u8],
        now: Instant,
        cached: Option<FieldOutcome<Vec<u8>>>,
    ) -> Result<Vec<u8>, Error> {
        let outcome = match cached {
            Some(outcome) if self.inner.audit.is_none() => return outcome.0,
            Some(outcome) => outcome,
            None => self.encrypt_slow(caller, context, plaintext, now).await,
        };
        self.finish(caller, Action::Encrypt, context, outcome).await
    }

    /// Decrypts one field. The plaintext is zeroized when dropped. Audited.
    pub async fn decrypt(
        &self,
        caller: &Caller,
        context: &EncryptionContext,
        ciphertext: &[u8],
    ) -> Result<Plaintext, Error> {
        let now = Instant::now_without_cache_update();
        match self.decrypt_cached(context, ciphertext, now) {
            // (Returned here rather than in `complete_decrypt`: the fast path's result is not
            // moved through another future.)
            Some(outcome) if self.inner.audit.is_none() => outcome.0,
            cached => {
                self.complete_decrypt(caller, context, ciphertext, now, cached)
                    .await
            }
        }
    }

    /// Completes [`Keyring::decrypt`] like [`Keyring::complete_encrypt`].
    async fn complete_decrypt(
        &self,
        caller: &Caller,
        context: &EncryptionContext,
        ciphertext: &[u8],
        now: Instant,
        cached: Option<FieldOutcome<Plaintext>>,
    ) -> Result<Plaintext, Error> {
        let outcome = match cached {
            Some(outcome) if self.inner.audit.is_none() => return outcome.0,
            Some(outcome) => outcome,
            None => self.decrypt_slow(caller, context, ciphertext, now).await,
        };
        self.finish(caller, Action::Decrypt, context, outcome).await
    }

    /// Moves a ciphertext to the tenant's primary key version (and the configured algorithm)
    /// without handing the plaintext to the caller. A ciphertext already there is returned
    /// unchanged. Audited.
    pub async fn rewrap(
        &self,
        caller: &Caller,
        context: &EncryptionContext,
        ciphertext: &[u8],
    ) -> Result<Vec<u8>, Error> {
        let outcome = self
            .rewrap_one(&mut BatchView::default(), caller, context, ciphertext)
            .await;
        self.finish(caller, Action::Rewrap, context, outcome).await
    }

    /// Encrypts many fields; one result per item, in order (a bad item does not fail the
    /// others). The outer error means the batch could not be audited and nothing is returned.
    pub async fn encrypt_batch(
        &self,
        caller: &Caller,
        items: &[(&EncryptionContext, &[u8])],
    ) -> Result<Vec<Result<Vec<u8>, Error>>, Error> {
        let mut view = BatchView::default();
        let mut results = Vec::with_capacity(items.len());
        for (context, plaintext) in items {
            results.push(
                self.encrypt_one(&mut view, caller, context, plaintext)
                    .await,
            );
        }
        // (Not held through the audit write: a shred's keys are freed as soon as possible.)
        drop(view);
        self.finish_batch(caller, Action::Encrypt, contexts_of(items), results)
            .await
    }

    /// Decrypts many fields; one result per item, in order. See [`Keyring::encrypt_batch`].
    pub async fn decrypt_batch(
        &self,
        caller: &Caller,
        items: &[(&EncryptionContext, &[u8])],
    ) -> Result<Vec<Result<Plaintext, Error>>, Error> {
        let mut view = BatchView::default();
        let mut results = Vec::with_capacity(items.len());
        for (context, ciphertext) in items {
            results.push(
                self.decrypt_one(&mut view, caller, context, ciphertext)
                    .await,
            );
        }
        // (Not held through the audit write: a shred's keys are freed as soon as possible.)
        drop(view);
        self.finish_batch(caller, Action::Decrypt, contexts_of(items), results)
            .await
    }

    /// Rewraps many ciphertexts; one result per item, in order. See [`Keyring::rewrap`].
    pub async fn rewrap_batch(
        &self,
        caller: &Caller,
        items: &[(&EncryptionContext, &[u8])],
    ) -> Result<Vec<Result<Vec<u8>, Error>>, Error> {
        let mut view = BatchView::default();
        let mut results = Vec::with_capacity(items.len());
        for (context, ciphertext) in items {
            results.push(
                self.rewrap_one(&mut view, caller, context, ciphertext)
                    .await,
            );
        }
        // (Not held through the audit write: a shred's keys are freed as soon as possible.)
        drop(view);
        self.finish_batch(caller, Action::Rewrap, contexts_of(items), results)
            .await
    }

    // ----- key management ------------------------------------------------------------------

    /// Wraps a fresh tenant key as `version` of `tenant`.
    async fn new_key_record(&self, tenant: &TenantId, version: u32) -> Result<KeyRecord, Error> {
        let inner = &self.inner;
        let key = TenantKey::generate().map_err(|_| Error::Crypto {
            provider: inner.provider.name,
            what: "OS random number generator",
        })?;
        let binding = key_binding(tenant, version);
        let wrapped = inner
            .kms
            .wrap(&key, &binding)
            .await
            .map_err(|source| kms_error(&*inner.kms, source))?;
        // A key whose wrapping cannot be unwrapped would lose everything encrypted under it:
        // prove the round trip before the record is stored (one more KMS call per new key).
        let back = inner
            .kms
            .unwrap(&wrapped, &binding)
            .await
            .map_err(|source| kms_error(&*inner.kms, source))?;
        if !ct_eq(back.expose(), key.expose()) {
            return Err(kms_error(
                &*inner.kms,
                BackendError::new(
                    BackendErrorKind::Other,
                    "the KMS returned a wrapped key that does not unwrap to the key it was \
                     given; nothing was stored",
                ),
            ));
        }
        Ok(KeyRecord {
            version,
            state: KeyState::Primary,
            wrapped: Some(wrapped),
            key_check: key_check(inner.provider, &key, &binding),
            created_at: Timestamp::now(),
        })
    }

    /// Creates `tenant` with key version 1. Audited (attempt and result).
    pub async fn create_tenant(&self, caller: &Caller, tenant: &TenantId) -> Result<(), Error> {
        let op = async {
            let meta = OpMeta {
                key_version: Some(1),
                key_source: None,
                from_key_version: None,
            };
            let mut root_key = None;
            let result = async {
                let record = self.new_key_record(tenant, 1).await?;
                let wrapped_under = root_key_of(&record);
                let store = &*self.inner.store;
                match store.create_tenant(tenant, record).await {
                    Ok(()) => {}
                    // A conflict is "exists" only if the store holds the tenant (or its
                    // tombstone): a shared store's serialization failure or deadlock is a
                    // conflict too, after which the id is still free (retry).
                    Err(e) if e.kind() == BackendErrorKind::Conflict => {
                        return Err(match store.load_tenant(tenant).await {
                            Ok(Some(_)) => Error::TenantExists {
                                tenant: tenant.clone(),
                            },
                            Ok(None) | Err(_) => store_error(store, e),
                        });
                    }
                    Err(e) => return Err(store_error(store, e)),
                }
                self.inner.tenants.remove(tenant);
                root_key = wrapped_under;
                Ok(())
            }
            .await;
            (result, meta, root_key)
        };
        self.admin(caller, Action::CreateTenant, tenant, op).await
    }

    /// Rotates `tenant`'s key: a new version becomes primary, older ones decrypt only.
    /// Returns the new version. If another process rotated at the same moment, exactly one
    /// wins and the other gets [`Error::RotationConflict`]. Audited (attempt and result).
    pub async fn rotate(&self, caller: &Caller, tenant: &TenantId) -> Result<u32, Error> {
        self.rotate_from(caller, tenant, None).await
    }

    /// Rotates `tenant`'s key only if its latest version is still `expected` (a scheduler
    /// that decided from an earlier read); otherwise fails with [`Error::RotationConflict`]
    /// and changes nothing. Audited like [`Keyring::rotate`].
    pub async fn rotate_if_latest(
        &self,
        caller: &Caller,
        tenant: &TenantId,
        expected: u32,
    ) -> Result<u32, Error> {
        self.rotate_from(caller, tenant, Some(expected)).await
    }

    async fn rotate_from(
        &self,
        caller: &Caller,
        tenant: &TenantId,
        expected: Option<u32>,
    ) -> Result<u32, Error> {
        let op = async {
            let mut meta = OpMeta::default();
            let mut root_key = None;
            let result = async {
                self.inner.tenants.remove(tenant);
                let view = self
                    .tenant_view(tenant, Instant::now_without_cache_update())
                    .await?;
                if view.record.shredded_at.is_some() {
                    return Err(Error::KeyDestroyed {
                        tenant: tenant.clone(),
                    });
                }
                let latest = view.record.latest_version();
                let next = latest.checked_add(1).ok_or(Error::InvalidInput {
                    what: "key version",
                    reason: "the tenant has used every key version number",
                })?;
                if expected.is_some_and(|e| e != latest) {
                    return Err(Error::RotationConflict {
                        tenant: tenant.clone(),
                        version: latest,
                    });
                }
                meta.key_version = Some(next);
                let record = self.new_key_record(tenant, next).await?;
                let wrapped_under = root_key_of(&record);
                let store = &*self.inner.store;
                let inserted = store.insert_version(tenant, latest, record).await;
                self.inner.tenants.remove(tenant);
                match inserted {
                    Ok(()) => {
                        root_key = wrapped_under;
                        Ok(next)
                    }
                    Err(e) if e.kind() == BackendErrorKind::Conflict => {
                        // Lost the compare-and-set: to another rotation, or to a shred.
                        let now = store
                            .load_tenant(tenant)
                            .await
                            .map_err(|e| store_error(store, e))?;
                        if now.is_some_and(|r| r.shredded_at.is_some()) {
                            Err(Error::KeyDestroyed {
                                tenant: tenant.clone(),
                            })
                        } else {
                            Err(Error::RotationConflict {
                                tenant: tenant.clone(),
                                version: next,
                            })
                        }
                    }
                    Err(e) => Err(store_error(store, e)),
                }
            }
            .await;
            (result, meta, root_key)
        };
        self.admin(caller, Action::RotateKey, tenant, op).await
    }

    /// Sets the minimum decryption version: ciphertexts under older versions then fail with
    /// [`Error::KeyVersionRetired`]. Must be between 1 and the primary version, and not below
    /// the current minimum (lowering it brings retired versions back into service: see
    /// [`Keyring::set_min_decrypt_version_with`]). Audited.
    pub async fn set_min_decrypt_version(
        &self,
        caller: &Caller,
        tenant: &TenantId,
        min: u32,
    ) -> Result<(), Error> {
        self.set_min_decrypt_version_with(caller, tenant, min, MinVersionGuard::default())
            .await
    }

    /// [`Keyring::set_min_decrypt_version`] with `guard`'s conditions: the minimum the
    /// caller read ([`Error::ConcurrentChange`], and nothing changed, if another change came
    /// since), and whether it may be lowered. Audited.
    pub async fn set_min_decrypt_version_with(
        &self,
        caller: &Caller,
        tenant: &TenantId,
        min: u32,
        guard: MinVersionGuard,
    ) -> Result<(), Error> {
        let op = async {
            let meta = OpMeta {
                key_version: Some(min),
                key_source: None,
                from_key_version: None,
            };
            let result = async {
                self.inner.tenants.remove(tenant);
                let view = self
                    .tenant_view(tenant, Instant::now_without_cache_update())
                    .await?;
                if view.record.shredded_at.is_some() {
                    return Err(Error::KeyDestroyed {
                        tenant: tenant.clone(),
                    });
                }
                if min == 0 || min > view.record.latest_version() {
                    return Err(Error::InvalidInput {
                        what: "minimum decryption version",
                        reason: "must be between 1 and the primary key version",
                    });
                }
                let current = view.record.min_decrypt_version;
                // Already so: nothing to change (a repeated call whose first outcome was
                // unknown succeeds, whatever it expected).
                if min == current {
                    return Ok(());
                }
                if guard.expected.is_some_and(|expected| expected != current) {
                    return Err(Error::ConcurrentChange {
                        tenant: tenant.clone(),
                        what: "minimum decryption version",
                    });
                }
                if min < current && !guard.allow_lower {
                    return Err(Error::InvalidInput {
                        what: "minimum decryption version",
                        reason: "is below the current minimum, which would bring retired key \
                                 versions back into service: ask for it explicitly (allow_lower; \
                                 `phiseal key min-version --allow-lower`)",
                    });
                }
                // A compare-and-set on the value just read: a concurrent change (another
                // operator, another daemon) fails this one rather than being undone by it.
                let store = &*self.inner.store;
                let expected = current;
                let result = store.set_min_decrypt_version(tenant, expected, min).await;
                self.inner.tenants.remove(tenant);
                match result {
                    Ok(()) => {
                        // Bumped first: a stream starting from the older view meanwhile
                        // either is refused when it enters its key use, or reads the tenant
                        // again after registering.
                        self.inner.generations.bump_tenant(tenant);
                        self.retire_streams(tenant, min);
                        Ok(())
                    }
                    // Lost the compare-and-set: to a shred, or to another change of the
                    // minimum (which stands). Read again to say which.
                    Err(e) if e.kind() == BackendErrorKind::Conflict => {
                        let now = self
                            .tenant_view(tenant, Instant::now_without_cache_update())
                            .await?;
                        Err(if now.record.shredded_at.is_some() {
                            Error::KeyDestroyed {
                                tenant: tenant.clone(),
                            }
                        } else {
                            Error::ConcurrentChange {
                                tenant: tenant.clone(),
                                what: "minimum decryption version",
                            }
                        })
                    }
                    Err(e) => Err(store_error(store, e)),
                }
            }
            .await;
            (result, meta, None)
        };
        self.admin(caller, Action::SetMinDecryptVersion, tenant, op)
            .await
    }

    /// Crypto-shreds `tenant`: every key version is destroyed in the store, cached keys are
    /// purged (and zeroized), and its ciphertexts fail with [`Error::KeyDestroyed`] forever.
    /// Returns once no field operation of this keyring that checked the tenant before the
    /// shred is still using its key (those finish; every later one is refused); streams
    /// already started stop before their next segment ([`Error::KeyDestroyed`]; if the key
    /// store reports an error the tenant is read again and they stop if it was shredded or
    /// cannot be read; if this future is dropped once the store was asked, they stop).
    /// Irreversible. Audited (attempt and result).
    pub async fn shred(&self, caller: &Caller, tenant: &TenantId) -> Result<(), Error> {
        let op = async {
            let result = async {
                let store = &*self.inner.store;
                let exists = store
                    .load_tenant(tenant)
                    .await
                    .map_err(|e| store_error(store, e))?;
                if exists.is_none() {
                    return Err(Error::TenantNotFound {
                        tenant: tenant.clone(),
                    });
                }
                // If this future is dropped from here on, the shred may commit (or have
                // committed): the running streams are stopped then too.
                let mut undecided = RevokeStreamsOnDrop {
                    keyring: self,
                    tenant,
                    armed: true,
                };
                let result = store.shred_tenant(tenant, Timestamp::now()).await;
                self.invalidate_tenant(tenant);
                // Operations that checked the tenant before the invalidation finish before
                // shred returns; later ones see it shredded.
                self.inner
                    .generations
                    .wait_for_key_uses(Generations::shard_of(tenant));
                // Running streams (registered under the key-use guard, so none is missed)
                // stop before their next segment. If the store reported an error, the shred
                // may still have committed: the tenant is read again, which revokes them if
                // so.
                match &result {
                    Ok(()) => self.revoke_streams(tenant),
                    // Read again (revokes them if the shred committed); if that fails too,
                    // nothing says the tenant is alive: stop them (fail closed).
                    Err(_) => {
                        if self.load_view(tenant).await.is_err() {
                            self.revoke_streams(tenant);
                        }
                    }
                }
                undecided.armed = false;
                result.map_err(|e| store_error(store, e))
            }
            .await;
            (result, OpMeta::default(), None)
        };
        self.admin(caller, Action::ShredTenant, tenant, op).await
    }

    /// The tenant's key versions and states, read from the key store. No key material is
    /// touched. Audited.
    pub async fn key_status(
        &self,
        caller: &Caller,
        tenant: &TenantId,
    ) -> Result<TenantStatus, Error> {
        let store = &*self.inner.store;
        let result = async {
            let record = store
                .load_tenant(tenant)
                .await
                .map_err(|e| store_error(store, e))?
                .ok_or_else(|| Error::TenantNotFound {
                    tenant: tenant.clone(),
                })?;
            Ok(status_of(record))
        }
        .await;
        if self.inner.audit.is_some() {
            let event = Self::event(
                caller,
                Action::KeyStatus,
                Some(tenant),
                None,
                &OpMeta::default(),
                outcome_of(&result),
            );
            self.append(std::slice::from_ref(&event)).await?;
        }
        result
    }

    /// Every tenant in the key store (shredded ones included). Reads ids only; not audited.
    pub async fn list_tenants(&self) -> Result<Vec<TenantId>, Error> {
        let store = &*self.inner.store;
        store
            .list_tenants()
            .await
            .map_err(|e| store_error(store, e))
    }

    /// For a rotation scheduler: the tenant's latest key version if it is older than `period`
    /// (`None` if it is younger, or the tenant is shredded or unknown). Reads the key store
    /// afresh, touches no key material; not audited (the rotation it leads to is).
    pub async fn rotation_due(
        &self,
        tenant: &TenantId,
        period: Duration,
        now: Timestamp,
    ) -> Result<Option<u32>, Error> {
        let store = &*self.inner.store;
        let Some(record) = store
            .load_tenant(tenant)
            .await
            .map_err(|e| store_error(store, e))?
        else {
            return Ok(None);
        };
        if record.shredded_at.is_some() {
            return Ok(None);
        }
        let latest = record.latest_version();
        let Some(newest) = record.version(latest) else {
            return Ok(None);
        };
        let age = now.duration_since(newest.created_at);
        let period = jiff::SignedDuration::try_from(period).unwrap_or(jiff::SignedDuration::MAX);
        Ok((age >= period).then_some(latest))
    }

    /// Flushes the audit sink (call before exit).
    pub async fn flush_audit(&self) -> Result<(), Error> {
        match &self.inner.audit {
            None => Ok(()),
            Some(sink) => sink.flush().await.map_err(|source| Error::Audit {
                backend: sink.name().to_owned(),
                source,
            }),
        }
    }

    /// The crypto provider in use.
    pub fn crypto_provider(&self) -> &'static CryptoProvider {
        self.inner.provider
    }
}

fn status_of(record: TenantRecord) -> TenantStatus {
    let min = record.min_decrypt_version;
    let shredded = record.shredded_at.is_some();
    TenantStatus {
        primary: record.primary().map(|p| p.version),
        versions: record
            .versions
            .iter()
            .map(|v| VersionStatus {
                version: v.version,
                state: v.state,
                decrypts: !shredded && v.state != KeyState::Destroyed && v.version >= min,
                root_key_ref: v.wrapped.as_ref().map(|w| w.root_key_ref.clone()),
                created_at: v.created_at,
            })
            .collect(),
        tenant: record.tenant,
        min_decrypt_version: min,
        shredded_at: record.shredded_at,
    }
}

/// Invalidates a tenant's caches when dropped (admin operations, cancellation included).
struct InvalidateOnDrop<'a> {
    keyring: &'a Keyring,
    tenant: &'a TenantId,
}

impl Drop for InvalidateOnDrop<'_> {
    fn drop(&mut self) {
        self.keyring.invalidate_tenant(self.tenant);
    }
}

/// A borrowed key-cache key: looks up `(TenantId, u32)` without cloning the tenant id.
/// Hashes exactly like the tuple (fields in order), as `Equivalent` requires.
struct KeyRef<'a>(&'a TenantId, u32);

impl std::hash::Hash for KeyRef<'_> {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.hash(state);
        self.1.hash(state);
    }
}

impl quick_cache::Equivalent<(TenantId, u32)> for KeyRef<'_> {
    fn equivalent(&self, key: &(TenantId, u32)) -> bool {
        *self.0 == key.0 && self.1 == key.1
    }
}

fn outcome_of<T>(result: &Result<T, Error>) -> Outcome {
    match result {
        Ok(_) => Outcome::Ok,
        Err(e) => Outcome::Error(e.kind()),
    }
}
