//! # phiseal-kms-pkcs11 — tenant keys wrapped by an AES-256 key on a PKCS#11 token
//!
//! [`Pkcs11Kms`] is a [`Kms`] backend whose root key is an AES-256 secret key object on a
//! PKCS#11 token (an HSM, a smart card, SoftHSM2 in tests). The root key never leaves the token:
//! it must be sensitive and non-extractable, and every wrap and unwrap is a `C_Encrypt` /
//! `C_Decrypt` call on the token.
//!
//! ## What it does
//! - **Connect.** [`Pkcs11Kms::connect`] loads the PKCS#11 module (a shared library, e.g.
//!   `/usr/lib/softhsm/libsofthsm2.so`), initializes it with OS locking, finds the one token
//!   whose label is [`Pkcs11Config::token_label`], logs in as the normal user with the PIN and
//!   resolves every configured key label ([`Pkcs11Config::key_label`] and
//!   [`Pkcs11Config::previous_key_labels`]) to exactly one secret-key object. Each key must be
//!   an AES key of 32 bytes with `CKA_ENCRYPT` and `CKA_DECRYPT` set, `CKA_TOKEN`,
//!   `CKA_PRIVATE` and `CKA_SENSITIVE` true and `CKA_EXTRACTABLE` and `CKA_DERIVE` false (a
//!   derivable key could be carried off the token through a derived key); anything else is
//!   refused as `Misconfigured` before the first use. (`CKA_ALWAYS_SENSITIVE` /
//!   `CKA_NEVER_EXTRACTABLE` are not required, so that a root key restored into an HSM from a
//!   wrapped backup is accepted.)
//! - **Wrap** is `C_Encrypt` with `CKM_AES_GCM` under the current root key (`key_label`): a
//!   fresh 96-bit IV, the AAD [`KeyBinding::to_aad`] (tenant and key version) and a 128-bit
//!   tag. The wrapped bytes are `0x01 (format) ‖ IV (12) ‖ ciphertext (32) ‖ tag (16)`,
//!   61 bytes. The root-key reference is `pkcs11:<token label>/<key label>`.
//! - **Unwrap** parses strictly (exactly 61 bytes, format byte `0x01`) and accepts only the
//!   references `pkcs11:<token label>/<label>` for the configured `key_label` and
//!   `previous_key_labels`; anything else is refused as `InvalidData` without calling the
//!   token. It then calls `C_Decrypt` with the same AAD, so a wrapped key moved to another
//!   tenant or version, altered bytes, or bytes made by another key fail the GCM tag check.
//!   The plaintext must be exactly 32 bytes.
//!
//! ## The IV
//! The IV comes from the operating system's CSPRNG (`getrandom` via `rand::rngs::OsRng`), not
//! from the token's `C_GenerateRandom`: it saves a round trip to the token, does not depend on
//! the quality of a token RNG that may not be documented, and a GCM IV need only be unique,
//! not secret. Random 96-bit IVs are safe for up to 2^32 wraps per root key (NIST SP 800-38D);
//! phiseal wraps once per tenant key version, and root-key rotation starts a new key. If the
//! token writes its own IV back into the mechanism parameters (some FIPS-mode HSMs generate
//! the IV inside the token), the IV it wrote is the one recorded.
//!
//! ## Setting up the root key
//! Create the key on the token with [`generate_root_key`] (token object, private, sensitive,
//! non-extractable, `CKA_ENCRYPT`/`CKA_DECRYPT` only; refuses an existing label; destroys the
//! new key again if the token did not honour the template). No `pkcs11-tool` or other tool is
//! needed. Keys made with the HSM vendor's tools (or OpenSC's `pkcs11-tool --keygen
//! --key-type AES:32`) work too, provided they have the attributes listed above: `connect`
//! refuses anything else, naming the attribute.
//!
//! ## Root-key rotation
//! An HSM key's material never changes, so rotation means a new key with a new label. With
//! several daemons on one key store, in two rounds of restarts, so that no daemon meets a key
//! wrapped under a root key it does not know (`docs/KMS.md`):
//! 1. create it (`generate_root_key(&config, "phiseal-root-2")`);
//! 2. add the new label to `previous_key_labels` on every daemon and restart them all (they
//!    can unwrap under it and still wrap under the old key);
//! 3. set `key_label` to the new label and `previous_key_labels` to the old one, restart them
//!    all, and run `phiseal root rotate`: it re-wraps every stored tenant key whose reference
//!    differs from [`Kms::current_root_key_ref`];
//! 4. when no stored key names the old reference any more, remove the old label from
//!    `previous_key_labels`; destroy the old key on the token only once no backup of the key
//!    store made before the rotation can be restored.
//!
//! ## Sessions, login and threads
//! PKCS#11 calls block, so each runs on Tokio's blocking thread pool
//! (`tokio::task::spawn_blocking`). A cryptoki `Session` may move between threads but not be
//! shared, so the backend keeps a pool of read-only sessions: a call takes one (opening a new
//! one if the pool is empty), and gives it back afterwards — only after a success; a session
//! that saw an error is closed (or, if the token dropped it or a reconnection retired its
//! connection, forgotten). At most [`MAX_IN_FLIGHT`] calls run at once.
//!
//! The login state belongs to the application and token, not to a session: one `C_Login`
//! covers every session of the process on that token, and the token logs the application out
//! when its last session closes. The backend therefore keeps its login session open for its
//! whole life. A second backend on the same token in the same process finds the user already
//! logged in (`CKR_USER_ALREADY_LOGGED_IN`, accepted): in that case the token does not check
//! its PIN again.
//!
//! If the token drops the session or the login behind the backend's back (a token removed
//! and re-inserted, an HSM restart or failover, an idle session closed), the call's error is
//! one of `CKR_SESSION_HANDLE_INVALID`, `CKR_SESSION_CLOSED`, `CKR_USER_NOT_LOGGED_IN`,
//! `CKR_DEVICE_REMOVED`, `CKR_TOKEN_NOT_PRESENT`, `CKR_TOKEN_NOT_RECOGNIZED`,
//! `CKR_SLOT_ID_INVALID`, `CKR_CRYPTOKI_NOT_INITIALIZED`, `CKR_KEY_HANDLE_INVALID` or
//! `CKR_OBJECT_HANDLE_INVALID`. The backend then reconnects — module, token, a new login
//! session with the PIN, every root key looked up by label and checked again (so a stale
//! handle never names another object) — and retries the call once. The reconnection runs in
//! a task of its own, one at a time for all the calls that need it, on a blocking thread that
//! holds an in-flight permit, within [`CONNECT_TIMEOUT`] (permit wait included); a call waits
//! for it at most [`OPERATION_TIMEOUT`] (then `Unavailable`), so with its first attempt and
//! the retry a call can take up to three times that. From its start, the connection being
//! replaced is used by no call (its handles may name other objects once the module is
//! initialized again): such calls join the reconnection. If it fails, a token no longer
//! present (or not answering, or dropping the session again) is `Unavailable`, the current
//! root key no longer found by a logged-in session `Denied` (destroyed: revoked); calls then
//! get that answer without another reconnection for [`RECONNECT_BACKOFF`], and at most one
//! reconnection starts per [`RECONNECT_BACKOFF`] even after successes. A session lost again on
//! the retry is `Unavailable`. A previous root key no longer on the token is taken as
//! revoked: only its wraps are refused (`Denied`). A PIN the token refuses on a
//! reconnection (`CKR_PIN_INCORRECT`, `CKR_PIN_LOCKED`, …) stops reconnecting for the
//! backend's life — every call is then `Denied` until the daemon is restarted with the right
//! PIN — so that retries never use up the PIN's attempts. The connection replaced does not
//! close its sessions: their handle numbers may name live sessions by then (of the new
//! connection, or of another backend on the same module, once the module was initialized
//! again; or when a token reuses invalidated numbers), so they are forgotten — at most
//! [`MAX_IN_FLIGHT`]` + 1` per reconnection, and at most one reconnection per
//! [`RECONNECT_BACKOFF`]. A call whose connection is retired while it runs discards its
//! result and joins the reconnection. Every backend of the process on one module shares the
//! module's state: when one of them initializes the module again (after a reset), every
//! connection made before — of any backend on that module — is retired at its next call,
//! before it uses a handle number that may now name another backend's session or root key.
//!
//! ## Timeouts
//! PKCS#11 has no timeouts. Every call is bounded by [`OPERATION_TIMEOUT`] ([`CONNECT_TIMEOUT`]
//! for connecting and key generation) and fails with `Unavailable` when it elapses — but a
//! hung token keeps the blocking thread (and its session and in-flight slot) until the call
//! returns, if ever. The [`MAX_IN_FLIGHT`] limit, which reconnections count against too,
//! bounds how many threads a hung token can hold.
//!
//! ## Error mapping
//! | PKCS#11 says | kind |
//! |---|---|
//! | `CKR_ENCRYPTED_DATA_INVALID`, `CKR_ENCRYPTED_DATA_LEN_RANGE`, and — from a SoftHSM2 token only (manufacturer `SoftHSM project`) — `CKR_GENERAL_ERROR` from `C_Decrypt` (its answer to a GCM tag mismatch) | `InvalidData` |
//! | `CKR_PIN_INCORRECT`, `CKR_PIN_INVALID`, `CKR_PIN_LEN_RANGE`, `CKR_PIN_EXPIRED`, `CKR_PIN_LOCKED`, `CKR_USER_PIN_NOT_INITIALIZED`, `CKR_USER_TYPE_INVALID`, `CKR_KEY_FUNCTION_NOT_PERMITTED`; after a lost session or login, a root key that a logged-in session no longer finds on the token | `Denied` |
//! | `CKR_FUNCTION_FAILED` or `CKR_GENERAL_ERROR` from `C_Decrypt` of another token (some HSMs' answer to a GCM tag mismatch) | `Other` |
//! | `CKR_DEVICE_ERROR`, `CKR_DEVICE_MEMORY`, `CKR_DEVICE_REMOVED`, `CKR_TOKEN_NOT_PRESENT`, `CKR_TOKEN_NOT_RECOGNIZED`, `CKR_SESSION_CLOSED`, `CKR_SESSION_HANDLE_INVALID`, `CKR_SESSION_COUNT`, `CKR_HOST_MEMORY`, other `CKR_FUNCTION_FAILED` and `CKR_GENERAL_ERROR`, `CKR_FUNCTION_CANCELED`, `CKR_CRYPTOKI_NOT_INITIALIZED`, `CKR_SLOT_ID_INVALID`, a timeout; after a lost session or login, a token no longer present, or `CKR_USER_NOT_LOGGED_IN`, `CKR_KEY_HANDLE_INVALID` or `CKR_OBJECT_HANDLE_INVALID` again (while reconnecting, or on the retry) | `Unavailable` |
//! | a module that cannot be loaded, no token or several tokens with the label, a key label with no or several keys, a key with the wrong type, length, usage or protection, `CKR_MECHANISM_INVALID`, `CKR_MECHANISM_PARAM_INVALID`, `CKR_KEY_TYPE_INCONSISTENT`, `CKR_KEY_SIZE_RANGE`, `CKR_TEMPLATE_INCOMPLETE`, `CKR_TEMPLATE_INCONSISTENT`, `CKR_ATTRIBUTE_VALUE_INVALID`, `CKR_TOKEN_WRITE_PROTECTED` | `Misconfigured` |
//! | a label that already exists ([`generate_root_key`]) | `Conflict` |
//! | anything else | `Other` |
//!
//! Messages name the backend (`pkcs11`), the operation, the token and key label and the
//! PKCS#11 return code, and say what to check.
//!
//! ## Key material in memory
//! The tenant key is copied once into a zeroizing buffer that the blocking task owns, and
//! handed to `C_Encrypt` from there. The plaintext from `C_Decrypt` is moved into a zeroizing
//! buffer at once, copied into a [`TenantKey`] and wiped. What the PKCS#11 module does with its
//! own copies is up to the module. The PIN is held as a [`SecretString`] (zeroized on drop,
//! redacted in `Debug`) for the backend's life, to log in again after a lost login. Error
//! messages and `Debug` output never
//! contain the PIN, key bytes or wrapped bytes.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Function, Pkcs11};
use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::mechanism::aead::GcmParams;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, SessionState, UserType};
use cryptoki::slot::Slot;
use cryptoki::types::Ulong;
use phiseal::kms::{KeyBinding, Kms, WrappedKey};
use phiseal::{BackendError, BackendErrorKind, TENANT_KEY_LEN, TenantKey};
use rand::TryRngCore;
use secrecy::SecretString;
use tokio::sync::{Semaphore, watch};
use zeroize::Zeroizing;

/// The backend's name, as returned by [`Kms::name`] and used in every error message.
pub const NAME: &str = "pkcs11";
/// Prefix of every root-key reference made by this backend: `pkcs11:<token label>/<key label>`.
pub const REF_PREFIX: &str = "pkcs11:";
/// Limit for one wrap or unwrap (waiting for a free slot included).
pub const OPERATION_TIMEOUT: Duration = Duration::from_secs(5);
/// Limit for [`Pkcs11Kms::connect`] and [`generate_root_key`]: loading the module, finding the
/// token, logging in and checking the keys.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Maximum number of PKCS#11 calls (and so sessions and blocking threads) in flight at once.
pub const MAX_IN_FLIGHT: usize = 16;
/// After a failed reconnection, calls fail with its error for this long before another is
/// tried; and at most one reconnection starts per this interval (counted from the start and
/// the end of the last one), also after successes: calls that lose the session again
/// meanwhile fail as `Unavailable`.
pub const RECONNECT_BACKOFF: Duration = Duration::from_secs(5);
/// The first byte of every wrapped key made by this backend.
pub const WRAP_FORMAT: u8 = 0x01;
/// Length of the AES-GCM IV in the wrapped bytes.
pub const IV_LEN: usize = 12;
/// Length of the AES-GCM tag in the wrapped bytes.
pub const TAG_LEN: usize = 16;
/// Length of the wrapped bytes: format byte, IV, encrypted tenant key, tag.
pub const WRAPPED_LEN: usize = 1 + IV_LEN + TENANT_KEY_LEN + TAG_LEN;
/// Length of the root key in bytes (AES-256).
pub const ROOT_KEY_LEN: usize = 32;
/// The manufacturer id SoftHSM2 tokens report (its `CKR_GENERAL_ERROR` quirk).
const SOFTHSM_MANUFACTURER: &str = "SoftHSM project";
/// PKCS#11 limits token labels to 32 bytes.
const MAX_TOKEN_LABEL_LEN: usize = 32;

/// Where the root key is: the PKCS#11 module, the token, the user PIN and the key labels.
///
/// Its `Debug` output shows everything but the PIN.
#[derive(Clone)]
pub struct Pkcs11Config {
    /// Path of the PKCS#11 module (shared library) of the HSM vendor, e.g.
    /// `/usr/lib/softhsm/libsofthsm2.so`.
    pub module: PathBuf,
    /// The label of the token (`CKA_LABEL` of the token info, without the space padding). It
    /// must name exactly one token and may not contain `/`.
    pub token_label: String,
    /// The normal user's PIN.
    pub pin: SecretString,
    /// `CKA_LABEL` of the current root key: every wrap uses it.
    pub key_label: String,
    /// Labels of earlier root keys, still accepted for unwrapping (see the crate documentation
    /// on rotation).
    pub previous_key_labels: Vec<String>,
}

impl fmt::Debug for Pkcs11Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pkcs11Config")
            .field("module", &self.module)
            .field("token_label", &self.token_label)
            .field("pin", &"[REDACTED]")
            .field("key_label", &self.key_label)
            .field("previous_key_labels", &self.previous_key_labels)
            .finish()
    }
}

/// A KMS backend whose root key is an AES-256 key on a PKCS#11 token. See the crate
/// documentation.
///
/// Its `Debug` output shows the token and key labels, never the PIN or key bytes.
#[derive(Clone)]
pub struct Pkcs11Kms {
    shared: Arc<Shared>,
}

/// What outlives a reconnection: the configuration (the PIN included, to log in again), the
/// connection in use, and the limits.
struct Shared {
    config: Pkcs11Config,
    /// The `pkcs11:<token>/<key_label>` reference of the current key.
    key_ref: String,
    /// The connection in use; replaced by [`Pkcs11Kms::reconnect`].
    inner: std::sync::RwLock<Arc<Inner>>,
    /// The reconnection in progress and what the last ones found.
    reconnect: Mutex<ReconnectState>,
    /// Every blocking PKCS#11 thread holds a permit, reconnections included.
    in_flight: Arc<Semaphore>,
}

/// See [`Pkcs11Kms::reconnect`].
#[derive(Default)]
struct ReconnectState {
    /// The reconnection in progress (a task of its own), or the last one (then answered).
    running: Option<Reconnection>,
    /// The last failed reconnection: when, and what it found. None is tried again before
    /// [`RECONNECT_BACKOFF`] has passed.
    failed: Option<(std::time::Instant, Failure)>,
    /// When the last reconnection started: at most one starts per [`RECONNECT_BACKOFF`], also
    /// after a success (a token whose new sessions fail at once is not reconnected in a loop).
    started: Option<std::time::Instant>,
    /// The token refused the PIN on a reconnection: the backend never logs in again (each try
    /// would use up one of the PIN's attempts until the token locks it).
    pin_refused: Option<Failure>,
}

/// A reconnection's answer, awaited by every caller that needs it.
type Reconnection = watch::Receiver<Option<Result<Arc<Inner>, Failure>>>;

/// A reconnection's error, for every caller that waited on it.
#[derive(Debug, Clone)]
struct Failure {
    kind: BackendErrorKind,
    message: String,
}

impl Failure {
    fn of(error: &BackendError) -> Self {
        Self {
            kind: error.kind(),
            message: error.to_string(),
        }
    }

    fn error(&self) -> BackendError {
        BackendError::new(self.kind, self.message.clone())
    }
}

struct Inner {
    // Field order is drop order: pooled sessions close before the login session, whose
    // closing (as the application's last session on the token) logs out.
    // A `Session` is `Send` but not `Sync`: the mutexes make `Inner` shareable.
    pool: Mutex<Vec<Session>>,
    /// Never used after connecting; open so that the login lasts.
    login_session: Mutex<Option<Session>>,
    /// Being replaced by a reconnection: no call uses its handles any more.
    retired: std::sync::atomic::AtomicBool,
    /// Its sessions are forgotten, not closed: set when it is retired. Their handle numbers
    /// may name live sessions by then — of the new connection, or of another backend on the
    /// same module — once the module was initialized again (by any backend of the process),
    /// or when the token reuses invalidated numbers; so closing them by number is never safe.
    forget_sessions: std::sync::atomic::AtomicBool,
    /// Its module's shared state, and how many times the process had initialized the module
    /// when this connection was made (see [`ModuleState`]).
    module: ModuleCount,
    ctx: Pkcs11,
    slot: Slot,
    token_label: String,
    /// The token's serial number at the first connection: a reconnection logs in (sends the
    /// PIN) only to the token with this serial, not to another that took its label.
    token_serial: String,
    current: RootKey,
    previous: Vec<RootKey>,
    /// The token is SoftHSM2, which answers a GCM tag mismatch in `C_Decrypt` with
    /// `CKR_GENERAL_ERROR`; from any other token that code is a device failure.
    general_error_is_tag_mismatch: bool,
}

/// A resolved root key: its label, its object handle and its reference.
#[derive(Debug, Clone)]
struct RootKey {
    label: String,
    /// `None`: a previous key no longer on the token when reconnecting (revoked).
    handle: Option<ObjectHandle>,
    key_ref: String,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if self.must_forget_sessions() {
            let pool = std::mem::take(self.pool.get_mut().unwrap_or_else(PoisonError::into_inner));
            pool.into_iter().for_each(std::mem::forget);
            let login = self
                .login_session
                .get_mut()
                .unwrap_or_else(PoisonError::into_inner)
                .take();
            login.into_iter().for_each(std::mem::forget);
        }
    }
}

impl fmt::Debug for Pkcs11Kms {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let config = &self.shared.config;
        f.debug_struct("Pkcs11Kms")
            .field("token_label", &config.token_label)
            .field("key_label", &config.key_label)
            .field("previous_key_labels", &config.previous_key_labels)
            .finish_non_exhaustive()
    }
}

impl Pkcs11Kms {
    /// Loads the module, finds the token by label, logs in with the PIN and checks every
    /// configured root key (see the crate documentation).
    ///
    /// Fails with `Misconfigured` if the module cannot be loaded, the token or a key is not
    /// found (or found more than once) or a key is not a sensitive, non-extractable,
    /// non-derivable AES-256 encrypt/decrypt key; `Denied` if the PIN is wrong or locked; `Unavailable` if the token
    /// does not answer within [`CONNECT_TIMEOUT`].
    pub async fn connect(config: &Pkcs11Config) -> Result<Pkcs11Kms, BackendError> {
        validate_config(config)?;
        let config = config.clone();
        let what = format!("connect to token '{}'", config.token_label);
        let kept = config.clone();
        let inner = blocking(CONNECT_TIMEOUT, &what, move || {
            connect_blocking(&config, Mode::Connect, None)
        })
        .await?;
        Ok(Pkcs11Kms {
            shared: Arc::new(Shared {
                key_ref: key_ref(&kept.token_label, &kept.key_label),
                config: kept,
                inner: std::sync::RwLock::new(Arc::new(inner)),
                reconnect: Mutex::default(),
                in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
            }),
        })
    }

    /// The connection in use.
    fn inner(&self) -> Arc<Inner> {
        Arc::clone(
            &self
                .shared
                .inner
                .read()
                .unwrap_or_else(PoisonError::into_inner),
        )
    }

    /// Replaces `failed` (whose session or login the token dropped) by a new connection —
    /// module, token, login, root keys looked up and checked again — unless another call did
    /// so meanwhile. The reconnection runs in a task of its own, one at a time, on a blocking
    /// thread that holds an in-flight permit, within [`CONNECT_TIMEOUT`]; callers wait for it
    /// at most [`OPERATION_TIMEOUT`]. If it fails, the token is taken as unavailable (gone, or
    /// not answering), the current root key no longer found as revoked (`Denied`), and no
    /// other reconnection starts for [`RECONNECT_BACKOFF`]; a refused PIN stops reconnecting
    /// for the backend's life (`Denied`), so that retries never lock the PIN.
    async fn reconnect(&self, failed: &Arc<Inner>) -> Result<Arc<Inner>, BackendError> {
        let mut running = {
            let mut state = self
                .shared
                .reconnect
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let current = self.inner();
            // Replaced meanwhile (by a reconnection that is not itself being replaced).
            if !Arc::ptr_eq(&current, failed) && !current.is_retired() {
                return Ok(current);
            }
            if let Some(refused) = &state.pin_refused {
                return Err(refused.error());
            }
            if let Some((at, failure)) = &state.failed
                && at.elapsed() < RECONNECT_BACKOFF
            {
                return Err(failure.error());
            }
            let answered_or_gone =
                |rx: &Reconnection| rx.borrow().is_some() || rx.has_changed().is_err();
            match state.running.as_ref().filter(|rx| !answered_or_gone(rx)) {
                Some(rx) => rx.clone(),
                None => {
                    if let Some(at) = state.started
                        && at.elapsed() < RECONNECT_BACKOFF
                    {
                        return Err(BackendError::new(
                            BackendErrorKind::Unavailable,
                            format!(
                                "{NAME}: the session with token '{}' was lost again less than \
                                 {RECONNECT_BACKOFF:?} after a reconnection: retry later",
                                self.shared.config.token_label
                            ),
                        ));
                    }
                    state.started = Some(std::time::Instant::now());
                    let rx = self.start_reconnect(&current);
                    state.running = Some(rx.clone());
                    rx
                }
            }
        };
        let token = &self.shared.config.token_label;
        match tokio::time::timeout(OPERATION_TIMEOUT, running.wait_for(Option::is_some)).await {
            Ok(Ok(answer)) => match answer.clone() {
                Some(Ok(inner)) => Ok(inner),
                Some(Err(failure)) => Err(failure.error()),
                None => Err(reconnect_pending(token)),
            },
            Ok(Err(_)) | Err(_) => Err(reconnect_pending(token)),
        }
    }

    /// Starts a reconnection task; see [`Pkcs11Kms::reconnect`].
    fn start_reconnect(&self, failed: &Arc<Inner>) -> Reconnection {
        let (tx, rx) = watch::channel(None);
        let shared = Arc::clone(&self.shared);
        // From now on no call uses the old connection's handles (see `call`), and its
        // sessions are not closed by number (see `forget_sessions`).
        failed
            .forget_sessions
            .store(true, std::sync::atomic::Ordering::SeqCst);
        failed
            .retired
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let failed_serial = failed.token_serial.clone();
        tokio::spawn(async move {
            let what = format!("reconnect to token '{}'", shared.config.token_label);
            let connect = async {
                let permit = Arc::clone(&shared.in_flight)
                    .acquire_owned()
                    .await
                    .map_err(|_| {
                        BackendError::new(
                            BackendErrorKind::Other,
                            format!("{NAME}: {what} failed: the in-flight limiter was closed"),
                        )
                    })?;
                let config = shared.config.clone();
                let serial = failed_serial.clone();
                let task = tokio::task::spawn_blocking(move || {
                    // Held until the PKCS#11 calls return, even if the task gave up.
                    let _permit = permit;
                    connect_blocking(&config, Mode::Reconnect, Some(&serial))
                });
                task.await.map_err(|e| thread_failed(&what, e))?
            };
            // A session lost again while reconnecting is an outage, not a refusal.
            let connected = within(CONNECT_TIMEOUT, &what, connect)
                .await
                .map_err(outage_if_session_lost);
            let mut state = shared
                .reconnect
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            // The back-off counts from the end too (a reconnection may take CONNECT_TIMEOUT).
            state.started = Some(std::time::Instant::now());
            let answer = match connected {
                Ok(inner) => {
                    let inner = Arc::new(inner);
                    *shared.inner.write().unwrap_or_else(PoisonError::into_inner) =
                        Arc::clone(&inner);
                    state.failed = None;
                    Ok(inner)
                }
                Err(e) => {
                    let failure = Failure::of(&e);
                    if marked::<PinRefused>(&e) {
                        state.pin_refused = Some(failure.clone());
                    } else {
                        state.failed = Some((std::time::Instant::now(), failure.clone()));
                    }
                    Err(failure)
                }
            };
            // Answered before the lock is released: a caller that finds the new connection
            // failed already never joins this (answered) reconnection by mistake.
            let _ = tx.send(Some(answer));
            drop(state);
        });
        rx
    }

    /// The token's label.
    pub fn token_label(&self) -> &str {
        &self.shared.config.token_label
    }

    /// The reference this instance writes into [`WrappedKey::root_key_ref`]:
    /// `pkcs11:<token label>/<key label>`.
    pub fn root_key_ref(&self) -> &str {
        &self.shared.key_ref
    }

    /// Runs `f` with a pooled session on a blocking thread, within [`OPERATION_TIMEOUT`] and
    /// the [`MAX_IN_FLIGHT`] limit. `what` describes the operation for error messages. The
    /// session goes back to the pool only if `f` succeeded.
    async fn call<T, F>(&self, inner: &Arc<Inner>, what: &str, f: F) -> Result<T, BackendError>
    where
        T: Send + 'static,
        F: FnOnce(&Session) -> Result<T, BackendError> + Send + 'static,
    {
        let inner = Arc::clone(inner);
        if inner.is_retired() {
            return Err(retired_connection(&inner.token_label));
        }
        let semaphore = Arc::clone(&self.shared.in_flight);
        let run = async move {
            let permit = semaphore.acquire_owned().await.map_err(|_| {
                BackendError::new(
                    BackendErrorKind::Other,
                    format!("{NAME}: {what} failed: the in-flight limiter was closed"),
                )
            })?;
            let task = tokio::task::spawn_blocking(move || {
                // Held until the PKCS#11 call returns, even if the caller gave up waiting.
                let _permit = permit;
                // A connection being replaced: its handles (sessions, keys) may name other
                // objects once the module is initialized again. Never use them.
                if inner.is_retired() {
                    return Err(retired_connection(&inner.token_label));
                }
                let session = inner.take_session()?;
                let result = f(&session);
                if inner.is_retired() {
                    // Retired while `f` ran: its handles may have named other objects by
                    // then, so whatever it returned is not used.
                    inner.release(session, false);
                    return Err(retired_connection(&inner.token_label));
                }
                match &result {
                    Ok(_) => inner.put_session(session),
                    Err(e) => inner.release(session, marked::<SessionLost>(e)),
                }
                result
            });
            task.await.map_err(|e| thread_failed(what, e))?
        };
        within(OPERATION_TIMEOUT, what, run).await
    }
}

impl Inner {
    /// Whether a reconnection is replacing this connection, or its module was initialized
    /// again since it was made (by any backend of the process): its session and object
    /// handle numbers may then name another connection's sessions and keys — another
    /// backend's root key on the same module, say — so it must not use them (its next call
    /// joins a reconnection).
    fn is_retired(&self) -> bool {
        self.retired.load(std::sync::atomic::Ordering::SeqCst) || self.module_reinitialized()
    }

    /// Whether its module was initialized again since this connection was made.
    fn module_reinitialized(&self) -> bool {
        let (module, initializations) = &self.module;
        module
            .initializations
            .load(std::sync::atomic::Ordering::SeqCst)
            != *initializations
    }

    /// Whether its sessions must be forgotten rather than closed by number (see
    /// `forget_sessions`).
    fn must_forget_sessions(&self) -> bool {
        self.forget_sessions
            .load(std::sync::atomic::Ordering::SeqCst)
            || self.module_reinitialized()
    }

    /// Lets go of a session of this connection that will not be used again: closed, or
    /// forgotten when its number may now name another connection's session (see
    /// `forget_sessions`) or the token dropped it already (`gone`).
    fn release(&self, session: Session, gone: bool) {
        if gone || self.must_forget_sessions() {
            std::mem::forget(session);
        } else {
            drop(session);
        }
    }

    /// The configured root key that `key_ref` names, if any.
    fn key_for_ref(&self, key_ref: &str) -> Option<&RootKey> {
        std::iter::once(&self.current)
            .chain(self.previous.iter())
            .find(|k| k.key_ref == key_ref)
    }

    /// A session from the pool, or a new read-only one. Sessions opened after the login are
    /// logged in too (the login state is the application's).
    fn take_session(&self) -> Result<Session, BackendError> {
        let pooled = self
            .pool
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        match pooled {
            Some(session) => Ok(session),
            None => self.ctx.open_ro_session(self.slot).map_err(|e| {
                ck_error(
                    e,
                    &format!("open a session on token '{}'", self.token_label),
                )
            }),
        }
    }

    fn put_session(&self, session: Session) {
        let mut pool = self.pool.lock().unwrap_or_else(PoisonError::into_inner);
        if pool.len() < MAX_IN_FLIGHT {
            pool.push(session);
        }
    }
}

#[async_trait]
impl Kms for Pkcs11Kms {
    fn name(&self) -> &str {
        NAME
    }

    /// `pkcs11:<token label>/<key_label>`: changes only when `key_label` is changed (rotation).
    async fn current_root_key_ref(&self) -> Result<String, BackendError> {
        Ok(self.shared.key_ref.clone())
    }

    /// The current key's reference or one of `previous_key_labels`'.
    fn can_unwrap(&self, root_key_ref: &str) -> bool {
        self.inner().key_for_ref(root_key_ref).is_some()
    }

    async fn wrap(
        &self,
        key: &TenantKey,
        binding: &KeyBinding,
    ) -> Result<WrappedKey, BackendError> {
        self.with_reconnect(|inner| async move { self.wrap_with(&inner, key, binding).await })
            .await
    }

    async fn unwrap(
        &self,
        wrapped: &WrappedKey,
        binding: &KeyBinding,
    ) -> Result<TenantKey, BackendError> {
        self.with_reconnect(|inner| async move { self.unwrap_with(&inner, wrapped, binding).await })
            .await
    }
}

impl Pkcs11Kms {
    /// Runs `op` on the connection in use; if the token dropped the session or the login,
    /// reconnects ([`Pkcs11Kms::reconnect`]) and runs it once more, a session lost again then
    /// being an outage.
    async fn with_reconnect<T, Fut>(
        &self,
        op: impl Fn(Arc<Inner>) -> Fut,
    ) -> Result<T, BackendError>
    where
        Fut: Future<Output = Result<T, BackendError>>,
    {
        let inner = self.inner();
        match op(Arc::clone(&inner)).await {
            Err(e) if marked::<SessionLost>(&e) => {
                let inner = self.reconnect(&inner).await?;
                op(inner).await.map_err(outage_if_session_lost)
            }
            done => done,
        }
    }

    /// [`Kms::wrap`] over the connection `inner`.
    async fn wrap_with(
        &self,
        inner: &Arc<Inner>,
        key: &TenantKey,
        binding: &KeyBinding,
    ) -> Result<WrappedKey, BackendError> {
        let root = inner.current.clone();
        let what = format!(
            "wrap (C_Encrypt) with key '{}' on token '{}' for tenant '{}' version {}",
            root.label, inner.token_label, binding.tenant, binding.version
        );
        let mut iv = [0u8; IV_LEN];
        rand::rngs::OsRng.try_fill_bytes(&mut iv).map_err(|e| {
            BackendError::new(
                BackendErrorKind::Other,
                format!("{NAME}: {what} failed: the OS random number generator failed"),
            )
            .with_source(e)
        })?;
        let aad = binding.to_aad();
        // Copied straight from the key into the heap (no stack temporary); wiped on drop.
        let plaintext = Zeroizing::new(key.expose().to_vec());
        let task_what = what.clone();
        let handle = root
            .handle
            .ok_or_else(|| key_gone(&root.label, &inner.token_label).refused_before_calling())?;
        let (iv, sealed) = self
            .call(inner, &what, move |session| {
                let mut iv = iv;
                let sealed = {
                    let params = gcm_params(&mut iv, &aad).map_err(|e| ck_error(e, &task_what))?;
                    session
                        .encrypt(&Mechanism::AesGcm(params), handle, plaintext.as_slice())
                        .map_err(|e| ck_error(e, &task_what))?
                };
                drop(plaintext);
                Ok((iv, sealed))
            })
            .await?;
        if sealed.len() != TENANT_KEY_LEN + TAG_LEN {
            return Err(BackendError::new(
                BackendErrorKind::Other,
                format!(
                    "{NAME}: {what} returned {} bytes, expected {}: refusing the wrap",
                    sealed.len(),
                    TENANT_KEY_LEN + TAG_LEN
                ),
            ));
        }
        let mut ciphertext = Vec::with_capacity(WRAPPED_LEN);
        ciphertext.push(WRAP_FORMAT);
        ciphertext.extend_from_slice(&iv);
        ciphertext.extend_from_slice(&sealed);
        Ok(WrappedKey {
            root_key_ref: root.key_ref,
            ciphertext,
        })
    }

    /// [`Kms::unwrap`] over the connection `inner`.
    async fn unwrap_with(
        &self,
        inner: &Arc<Inner>,
        wrapped: &WrappedKey,
        binding: &KeyBinding,
    ) -> Result<TenantKey, BackendError> {
        let Some(root) = inner.key_for_ref(&wrapped.root_key_ref).cloned() else {
            return Err(BackendError::invalid_data(
                NAME,
                format!(
                    "wrapped key for tenant '{}' version {} was made by root key '{}', which \
                     is not configured here (token '{}', key_label '{}', previous_key_labels {:?}): \
                     add its key label to previous_key_labels to unwrap it",
                    binding.tenant,
                    binding.version,
                    wrapped.root_key_ref,
                    inner.token_label,
                    inner.current.label,
                    inner
                        .previous
                        .iter()
                        .map(|k| k.label.as_str())
                        .collect::<Vec<_>>()
                ),
            )
            .refused_before_calling());
        };
        let (iv, sealed) = parse_wrapped(&wrapped.ciphertext).ok_or_else(|| {
            BackendError::invalid_data(
                NAME,
                format!(
                    "wrapped key for tenant '{}' version {} is not a {WRAPPED_LEN}-byte \
                     format-{WRAP_FORMAT:#04x} wrap ({} bytes): the key store record is damaged",
                    binding.tenant,
                    binding.version,
                    wrapped.ciphertext.len()
                ),
            )
            .refused_before_calling()
        })?;
        let mut iv = iv;
        let sealed = sealed.to_vec();
        let aad = binding.to_aad();
        let what = format!(
            "unwrap (C_Decrypt) with key '{}' on token '{}' for tenant '{}' version {}",
            root.label, inner.token_label, binding.tenant, binding.version
        );
        let task_what = what.clone();
        let handle = root
            .handle
            // (Learnt at the last reconnection; the token is not called now.)
            .ok_or_else(|| key_gone(&root.label, &inner.token_label).refused_before_calling())?;
        let tag_quirk = inner.general_error_is_tag_mismatch;
        let plaintext = self
            .call(inner, &what, move |session| {
                let params = gcm_params(&mut iv, &aad).map_err(|e| ck_error(e, &task_what))?;
                session
                    .decrypt(&Mechanism::AesGcm(params), handle, &sealed)
                    .map(Zeroizing::new)
                    .map_err(|e| {
                        let tag_mismatch = tag_quirk
                            && matches!(
                                e,
                                CkError::Pkcs11(RvError::GeneralError, Function::Decrypt)
                            );
                        ck_error_as(
                            e,
                            &task_what,
                            tag_mismatch.then_some(BackendErrorKind::InvalidData),
                        )
                    })
            })
            .await?;
        if plaintext.len() != TENANT_KEY_LEN {
            return Err(BackendError::invalid_data(
                NAME,
                format!(
                    "{what} returned {} bytes, expected {TENANT_KEY_LEN}: the wrapped key is \
                     not a phiseal tenant key",
                    plaintext.len()
                ),
            ));
        }
        TenantKey::from_slice(plaintext.as_slice()).ok_or_else(|| {
            BackendError::invalid_data(
                NAME,
                format!("{what} returned a plaintext that is not a tenant key"),
            )
        })
    }
}

/// `CKM_AES_GCM` parameters with a 128-bit tag.
fn gcm_params<'a>(iv: &'a mut [u8], aad: &'a [u8]) -> Result<GcmParams<'a>, CkError> {
    GcmParams::new(iv, aad, Ulong::try_from(TAG_LEN * 8)?)
}

/// Splits `0x01 ‖ iv ‖ ciphertext ‖ tag` into the IV and `ciphertext ‖ tag`; `None` unless the
/// length and format byte are exact.
fn parse_wrapped(bytes: &[u8]) -> Option<([u8; IV_LEN], &[u8])> {
    if bytes.len() != WRAPPED_LEN {
        return None;
    }
    let (&format, rest) = bytes.split_first()?;
    if format != WRAP_FORMAT {
        return None;
    }
    let (iv, sealed) = rest.split_at_checked(IV_LEN)?;
    Some((iv.try_into().ok()?, sealed))
}

/// Creates a new root key on the token named by `config`: an AES-256 token object labelled
/// `label`, private, sensitive and non-extractable, usable for `C_Encrypt` / `C_Decrypt` only.
/// `config.key_label` and `config.previous_key_labels` are not used.
///
/// Fails with `Conflict` if an object with that label exists already (nothing is created),
/// and otherwise as [`Pkcs11Kms::connect`]. Creating a key needs a read-write session, which
/// some HSMs allow only to particular users or not at all (use the vendor's tools then).
pub async fn generate_root_key(config: &Pkcs11Config, label: &str) -> Result<(), BackendError> {
    validate_token_label(&config.token_label)?;
    validate_key_label(label)?;
    let config = config.clone();
    let label = label.to_owned();
    let what = format!(
        "generate root key '{label}' on token '{}'",
        config.token_label
    );
    blocking(CONNECT_TIMEOUT, &what.clone(), move || {
        let (ctx, slot, _) = load(&config, Mode::Connect)?;
        let session = ctx
            .open_rw_session(slot)
            .map_err(|e| ck_error(e, &format!("{what}: open a read-write session")))?;
        login(&ctx, slot, &session, &config)?;
        let existing = session
            .find_objects(&[Attribute::Label(label.as_bytes().to_vec())])
            .map_err(|e| ck_error(e, &format!("{what}: C_FindObjects")))?;
        if !existing.is_empty() {
            return Err(BackendError::new(
                BackendErrorKind::Conflict,
                format!(
                    "{NAME}: {what}: {} object(s) with that label exist already: choose a new \
                     label (nothing was created)",
                    existing.len()
                ),
            ));
        }
        let template = [
            Attribute::Class(ObjectClass::SECRET_KEY),
            Attribute::KeyType(KeyType::AES),
            Attribute::ValueLen(Ulong::try_from(ROOT_KEY_LEN).map_err(|e| ck_error(e, &what))?),
            Attribute::Label(label.as_bytes().to_vec()),
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Encrypt(true),
            Attribute::Decrypt(true),
            Attribute::Wrap(false),
            Attribute::Unwrap(false),
            Attribute::Sign(false),
            Attribute::Verify(false),
            Attribute::Derive(false),
        ];
        let handle = session
            .generate_key(&Mechanism::AesKeyGen, &template)
            .map_err(|e| ck_error(e, &format!("{what}: C_GenerateKey")))?;
        // Another process may have created the same label meanwhile: then neither key is
        // usable by label, so take ours back.
        let found = find_secret_keys(&session, &label)
            .map_err(|e| ck_error(e, &format!("{what}: C_FindObjects")))?;
        if found.len() != 1 {
            let _ = session.destroy_object(handle);
            return Err(BackendError::new(
                BackendErrorKind::Conflict,
                format!(
                    "{NAME}: {what}: another key with that label was created at the same time: \
                     the new key was destroyed again; choose a new label"
                ),
            ));
        }
        // A token that ignored part of the template must not leave a weak key behind.
        if let Err(e) = check_key(&session, handle, &label, &config.token_label) {
            let _ = session.destroy_object(handle);
            return Err(e);
        }
        Ok(())
    })
    .await
}

/// Why [`connect_blocking`] runs: the first connection, or a reconnection after the token
/// dropped the session or login. A token or root key missing then was there before: the
/// token is gone for now (unavailable), the key was destroyed (revoked: denied).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Connect,
    Reconnect,
}

/// Connects to the configured token and finds its root keys; a reconnection (`expected_serial`
/// given) only to the token with that serial number.
fn connect_blocking(
    config: &Pkcs11Config,
    mode: Mode,
    expected_serial: Option<&str>,
) -> Result<Inner, BackendError> {
    let (ctx, slot, module) = load(config, mode)?;
    let token = &config.token_label;
    let info = ctx
        .get_token_info(slot)
        .map_err(|e| ck_error(e, &format!("connect: read the info of token '{token}'")))?;
    let token_serial = info.serial_number().trim_end_matches(' ').to_owned();
    let manufacturer = info.manufacturer_id().trim_end_matches(' ').to_owned();
    if let Some(expected) = expected_serial
        && token_serial != expected
    {
        // Before the login: the PIN goes to no other token.
        return Err(BackendError::new(
            BackendErrorKind::Denied,
            format!(
                "{NAME}: token '{token}' now has serial number '{}', not '{}' as when the \
                 daemon connected: another token took its label; not logged in to it (restart \
                 the daemon if the token was replaced on purpose)",
                phiseal::kms::printable(&token_serial, 64),
                phiseal::kms::printable(expected, 64)
            ),
        ));
    }
    let session = ctx
        .open_ro_session(slot)
        .map_err(|e| ck_error(e, &format!("connect: open a session on token '{token}'")))?;
    login(&ctx, slot, &session, config)?;
    let resolve = |label: &str| -> Result<RootKey, BackendError> {
        let handle = find_key(&session, label, token, mode)?;
        Ok(RootKey {
            label: label.to_owned(),
            handle: Some(handle),
            key_ref: key_ref(token, label),
        })
    };
    let current = resolve(&config.key_label)?;
    // On a reconnection, a previous key no longer on the token is revoked (its wraps are
    // refused); the others, and the current key, keep working.
    let previous = config
        .previous_key_labels
        .iter()
        .map(|l| match resolve(l) {
            Err(e) if mode == Mode::Reconnect && marked::<KeyGone>(&e) => Ok(RootKey {
                label: l.clone(),
                handle: None,
                key_ref: key_ref(token, l),
            }),
            other => other,
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Inner {
        general_error_is_tag_mismatch: manufacturer == SOFTHSM_MANUFACTURER,
        pool: Mutex::new(Vec::new()),
        login_session: Mutex::new(Some(session)),
        retired: std::sync::atomic::AtomicBool::new(false),
        forget_sessions: std::sync::atomic::AtomicBool::new(false),
        module,
        ctx,
        slot,
        token_label: token.clone(),
        token_serial,
        current,
        previous,
    })
}

/// What the backends of this process share of one module: every backend on a module shares
/// its state, so an initialization from the uninitialized state (after a reset: the module
/// answered `CKR_CRYPTOKI_NOT_INITIALIZED` to one of them) invalidates every earlier
/// connection's handles, and the numbers it hands out next may be the ones those
/// connections still hold.
#[derive(Debug, Default)]
struct ModuleState {
    /// Held (on a blocking thread) around one initialization, so that it and its count go
    /// together.
    init: Mutex<()>,
    /// Initializations from the uninitialized state so far; read without a lock by every
    /// call ([`Inner::is_retired`]).
    initializations: std::sync::atomic::AtomicU64,
}

/// A module's shared state and the count of its initializations a connection saw.
type ModuleCount = (Arc<ModuleState>, u64);

/// The [`ModuleState`] of each module (by canonical path) this process loaded.
static MODULES: Mutex<BTreeMap<PathBuf, Arc<ModuleState>>> = Mutex::new(BTreeMap::new());

/// The [`ModuleState`] of the module at `canonical`.
fn module_state(canonical: &Path) -> Arc<ModuleState> {
    let mut modules = MODULES.lock().unwrap_or_else(PoisonError::into_inner);
    Arc::clone(modules.entry(canonical.to_owned()).or_default())
}

/// Loads and initializes the module and finds the token's slot; also the module's shared
/// state and its count of initializations once this one is counted.
fn load(config: &Pkcs11Config, mode: Mode) -> Result<(Pkcs11, Slot, ModuleCount), BackendError> {
    let module = config.module.display();
    let ctx = Pkcs11::new(&config.module).map_err(|e| {
        BackendError::misconfigured(
            NAME,
            format!(
                "cannot load the PKCS#11 module '{module}': check the path and that the HSM \
                 vendor's library is installed (SoftHSM2: the Debian package softhsm2)"
            ),
        )
        .with_source(e)
    })?;
    let canonical = std::fs::canonicalize(&config.module).unwrap_or_else(|_| config.module.clone());
    let state = module_state(&canonical);
    let initializations = {
        let _one_at_a_time = state.init.lock().unwrap_or_else(PoisonError::into_inner);
        // Only an initialization from the uninitialized state hands out numbers afresh. A
        // module that answers C_GetInfo was initialized already (by another backend or
        // connection of this process); one that counts its initializations (p11-kit's proxy)
        // then answers C_Initialize with OK too, which must not retire the others.
        let uninitialized = matches!(
            ctx.get_library_info(),
            Err(CkError::Pkcs11(RvError::CryptokiNotInitialized, _))
        );
        match ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
            Ok(()) | Err(CkError::Pkcs11(RvError::CryptokiAlreadyInitialized, _)) => {}
            Err(e) => return Err(ck_error(e, &format!("initialize the module '{module}'"))),
        }
        let counted = &state.initializations;
        if uninitialized {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1
        } else {
            counted.load(std::sync::atomic::Ordering::SeqCst)
        }
    };
    let slot = find_slot(&ctx, &config.token_label, mode)?;
    Ok((ctx, slot, (state, initializations)))
}

/// The one slot holding a token labelled `label`.
fn find_slot(ctx: &Pkcs11, label: &str, mode: Mode) -> Result<Slot, BackendError> {
    let what = format!("find token '{label}'");
    let slots = ctx.get_slots_with_token().map_err(|e| ck_error(e, &what))?;
    let mut seen = Vec::new();
    let mut matching = Vec::new();
    for slot in slots {
        let info = ctx.get_token_info(slot).map_err(|e| ck_error(e, &what))?;
        let found = info.label().trim_end_matches(' ');
        if found == label {
            matching.push(slot);
        }
        seen.push(found.to_owned());
    }
    match matching.as_slice() {
        [slot] => Ok(*slot),
        [] if mode == Mode::Reconnect => Err(BackendError::new(
            BackendErrorKind::Unavailable,
            format!(
                "{NAME}: token '{label}' is no longer present (removed, or the HSM restarted): \
                 retry later"
            ),
        )),
        [] => Err(BackendError::misconfigured(
            NAME,
            format!(
                "no token labelled '{label}' (tokens present: {seen:?}): check token_label and that \
                 the token is initialized and visible to this process"
            ),
        )),
        more => Err(BackendError::misconfigured(
            NAME,
            format!(
                "{} tokens are labelled '{label}': token labels must be unique",
                more.len()
            ),
        )),
    }
}

/// The user-PIN state a token reports, as far as a login attempt is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PinState {
    /// `CKF_USER_PIN_FINAL_TRY`: one more wrong PIN locks it.
    final_try: bool,
    /// `CKF_USER_PIN_LOCKED`.
    locked: bool,
}

/// Refuses to try the configured PIN on a token whose user PIN is locked, or that allows
/// one more attempt only: a wrong PIN in the configuration (a daemon restarting in a loop
/// with it, say) must not be what locks the token for every service that uses it. A PIN that
/// is right would reset the counter, but that cannot be known without spending the try.
/// Nothing was tried, so a reconnection may check again later (unlike a PIN the token
/// refused, [`PinRefused`]): once someone resets the counter, the daemon recovers by itself.
fn check_pin_state(state: PinState, token: &str) -> Result<(), BackendError> {
    let reason = if state.locked {
        "its user PIN is locked (too many wrong PINs): have the token's security officer \
         unlock or reset it"
    } else if state.final_try {
        "one more wrong user PIN would lock it, and phiseal does not spend that try: check the \
         configured PIN (PHISEALD_KMS__PKCS11__PIN), then log in once with the vendor's tool, \
         which resets the counter when the PIN is right"
    } else {
        return Ok(());
    };
    Err(BackendError::new(
        BackendErrorKind::Denied,
        format!("{NAME}: token '{token}': not logging in: {reason}"),
    ))
}

/// Logs the normal user in (unless the token's PIN state forbids trying, see
/// [`check_pin_state`]); an application that is logged in already is accepted.
fn login(
    ctx: &Pkcs11,
    slot: Slot,
    session: &Session,
    config: &Pkcs11Config,
) -> Result<(), BackendError> {
    let token = &config.token_label;
    let info = ctx
        .get_token_info(slot)
        .map_err(|e| ck_error(e, &format!("read the PIN state of token '{token}'")))?;
    check_pin_state(
        PinState {
            final_try: info.user_pin_final_try(),
            locked: info.user_pin_locked(),
        },
        token,
    )?;
    match session.login(UserType::User, Some(&config.pin)) {
        Ok(()) | Err(CkError::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(()),
        Err(e) => {
            let refused = matches!(
                e,
                CkError::Pkcs11(
                    RvError::PinIncorrect
                        | RvError::PinInvalid
                        | RvError::PinLenRange
                        | RvError::PinExpired
                        | RvError::PinLocked,
                    _
                )
            );
            let error = ck_error(
                e,
                &format!("log in to token '{}' as user", config.token_label),
            );
            Err(if refused {
                error.with_source(PinRefused)
            } else {
                error
            })
        }
    }
}

fn find_secret_keys(session: &Session, label: &str) -> Result<Vec<ObjectHandle>, CkError> {
    session.find_objects(&[
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::Label(label.as_bytes().to_vec()),
    ])
}

/// The one secret key labelled `label`, checked by [`check_key`].
fn find_key(
    session: &Session,
    label: &str,
    token: &str,
    mode: Mode,
) -> Result<ObjectHandle, BackendError> {
    let found = find_secret_keys(session, label).map_err(|e| {
        ck_error(
            e,
            &format!("find key '{label}' on token '{token}' (C_FindObjects)"),
        )
    })?;
    match found.as_slice() {
        [handle] => {
            check_key(session, *handle, label, token)?;
            Ok(*handle)
        }
        [] if mode == Mode::Reconnect => {
            // Only a logged-in session's empty search says the key is gone (a private key is
            // invisible to a session the token logged out again meanwhile).
            let logged_in = session.get_session_info().is_ok_and(|info| {
                matches!(
                    info.session_state(),
                    SessionState::RoUser | SessionState::RwUser
                )
            });
            if logged_in {
                Err(key_gone(label, token).with_source(KeyGone))
            } else {
                Err(BackendError::new(
                    BackendErrorKind::Unavailable,
                    format!(
                        "{NAME}: token '{token}' logged the session out again while root key \
                         '{label}' was looked up: retry later"
                    ),
                ))
            }
        }
        [] => Err(BackendError::misconfigured(
            NAME,
            format!(
                "no secret key labelled '{label}' on token '{token}' (visible to the logged-in \
                 user): check key_label / previous_key_labels, or create the key \
                 (phiseal_kms_pkcs11::generate_root_key)"
            ),
        )),
        more => Err(BackendError::misconfigured(
            NAME,
            format!(
                "{} secret keys are labelled '{label}' on token '{token}': a root-key label must \
                 name exactly one key",
                more.len()
            ),
        )),
    }
}

/// Checks that the key is a 32-byte AES token key, private, sensitive, non-extractable,
/// non-derivable, with encrypt and decrypt allowed.
fn check_key(
    session: &Session,
    handle: ObjectHandle,
    label: &str,
    token: &str,
) -> Result<(), BackendError> {
    let attrs = session
        .get_attributes(
            handle,
            &[
                AttributeType::KeyType,
                AttributeType::ValueLen,
                AttributeType::Token,
                AttributeType::Private,
                AttributeType::Sensitive,
                AttributeType::Extractable,
                AttributeType::Encrypt,
                AttributeType::Decrypt,
                AttributeType::Derive,
            ],
        )
        .map_err(|e| {
            ck_error(
                e,
                &format!("read the attributes of key '{label}' on token '{token}'"),
            )
        })?;
    let (mut key_type, mut len) = (None, None);
    let (mut on_token, mut private, mut sensitive, mut extractable, mut encrypt, mut decrypt) =
        (None, None, None, None, None, None);
    let mut derive = None;
    for attr in attrs {
        match attr {
            Attribute::KeyType(t) => key_type = Some(t),
            Attribute::ValueLen(l) => len = Some(usize::from(l)),
            Attribute::Token(b) => on_token = Some(b),
            Attribute::Private(b) => private = Some(b),
            Attribute::Sensitive(b) => sensitive = Some(b),
            Attribute::Extractable(b) => extractable = Some(b),
            Attribute::Encrypt(b) => encrypt = Some(b),
            Attribute::Decrypt(b) => decrypt = Some(b),
            Attribute::Derive(b) => derive = Some(b),
            _ => {}
        }
    }
    let refuse = |why: String| {
        Err(BackendError::misconfigured(
            NAME,
            format!("key '{label}' on token '{token}' is not usable as a root key: {why}"),
        ))
    };
    if key_type != Some(KeyType::AES) {
        return refuse(format!("CKA_KEY_TYPE is {key_type:?}, expected CKK_AES"));
    }
    if len != Some(ROOT_KEY_LEN) {
        return refuse(format!(
            "CKA_VALUE_LEN is {len:?}, expected {ROOT_KEY_LEN} (AES-256)"
        ));
    }
    if on_token != Some(true) {
        return refuse("it is a session object (CKA_TOKEN is not true)".to_owned());
    }
    if private != Some(true) {
        return refuse("CKA_PRIVATE is not true: it would be usable without logging in".to_owned());
    }
    if sensitive != Some(true) {
        return refuse(
            "CKA_SENSITIVE is not true: its value could be read off the token".to_owned(),
        );
    }
    if extractable != Some(false) {
        return refuse(
            "CKA_EXTRACTABLE is not false: it could be exported from the token".to_owned(),
        );
    }
    if encrypt != Some(true) || decrypt != Some(true) {
        return refuse(format!(
            "CKA_ENCRYPT is {encrypt:?} and CKA_DECRYPT is {decrypt:?}: both must be true"
        ));
    }
    if derive != Some(false) {
        return refuse(
            "CKA_DERIVE is not false (or not reported): keys derived from it (e.g. \
             CKM_XOR_BASE_AND_DATA) could carry its value off the token; set it to false \
             (C_SetAttributeValue, or the HSM vendor's tool)"
                .to_owned(),
        );
    }
    Ok(())
}

fn key_ref(token: &str, label: &str) -> String {
    format!("{REF_PREFIX}{token}/{label}")
}

/// The reference (`pkcs11:<token label>/<key label>`) that wrapped keys under the root key
/// `key_label` of the token `token_label` carry, as in audit records.
pub fn root_key_ref_of(token_label: &str, key_label: &str) -> String {
    key_ref(token_label, key_label)
}

fn validate_config(config: &Pkcs11Config) -> Result<(), BackendError> {
    validate_token_label(&config.token_label)?;
    validate_key_label(&config.key_label)?;
    for (i, label) in config.previous_key_labels.iter().enumerate() {
        validate_key_label(label)?;
        if *label == config.key_label
            || config
                .previous_key_labels
                .iter()
                .take(i)
                .any(|l| l == label)
        {
            return Err(BackendError::misconfigured(
                NAME,
                format!(
                    "key label '{label}' is configured twice (key_label and previous_key_labels \
                     must all differ)"
                ),
            ));
        }
    }
    Ok(())
}

fn validate_token_label(label: &str) -> Result<(), BackendError> {
    if label.is_empty() || label.len() > MAX_TOKEN_LABEL_LEN || label.contains('/') {
        return Err(BackendError::misconfigured(
            NAME,
            format!(
                "token label '{label}' is invalid: it must be 1 to {MAX_TOKEN_LABEL_LEN} bytes \
                 without '/' (it is part of the root-key reference pkcs11:<token>/<key>)"
            ),
        ));
    }
    if label.ends_with(' ') {
        return Err(BackendError::misconfigured(
            NAME,
            format!(
                "token label '{label}' ends with a space: PKCS#11 pads token labels with spaces, so \
                 it could never match"
            ),
        ));
    }
    Ok(())
}

fn validate_key_label(label: &str) -> Result<(), BackendError> {
    if label.is_empty() {
        return Err(BackendError::misconfigured(
            NAME,
            "a key label is empty: set key_label (and previous_key_labels) to CKA_LABEL values",
        ));
    }
    Ok(())
}

/// Runs blocking `f` on Tokio's blocking pool, bounded by `limit`.
async fn blocking<T, F>(limit: Duration, what: &str, f: F) -> Result<T, BackendError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, BackendError> + Send + 'static,
{
    let task = tokio::task::spawn_blocking(f);
    within(limit, what, async move {
        task.await.map_err(|e| thread_failed(what, e))?
    })
    .await
}

fn thread_failed(what: &str, e: tokio::task::JoinError) -> BackendError {
    BackendError::new(
        BackendErrorKind::Other,
        format!("{NAME}: {what} failed: its blocking thread panicked or was cancelled"),
    )
    .with_source(e)
}

/// `fut`, or `Unavailable` after `limit`.
async fn within<T>(
    limit: Duration,
    what: &str,
    fut: impl Future<Output = Result<T, BackendError>>,
) -> Result<T, BackendError> {
    tokio::time::timeout(limit, fut).await.unwrap_or_else(|_| {
        Err(BackendError::new(
            BackendErrorKind::Unavailable,
            format!(
                "{NAME}: {what} timed out after {limit:?}: the token does not answer (one \
                 blocking thread stays blocked until it does); check the HSM and retry later"
            ),
        ))
    })
}

/// Maps a cryptoki error to a [`BackendError`] naming the backend, the operation (`what`
/// names the token and key) and the PKCS#11 function and return code. cryptoki's error text
/// never contains PINs, key bytes or data.
fn ck_error(err: CkError, what: &str) -> BackendError {
    ck_error_as(err, what, None)
}

/// [`ck_error`], with the kind of a PKCS#11 return code decided by the caller when it knows
/// better (a token's known quirk).
fn ck_error_as(err: CkError, what: &str, kind: Option<BackendErrorKind>) -> BackendError {
    let (kind, cause) = match &err {
        CkError::Pkcs11(rv, function) => (
            kind.unwrap_or_else(|| classify(*rv, *function)),
            format!("C_{function:?} returned {}", rv_name(*rv)),
        ),
        CkError::LibraryLoading(_) => (
            BackendErrorKind::Misconfigured,
            "the module cannot be loaded".to_owned(),
        ),
        CkError::NullFunctionPointer | CkError::MissingSymbol(_) | CkError::NotSupported => (
            BackendErrorKind::Misconfigured,
            format!("the module does not support this: {err}"),
        ),
        _ => (BackendErrorKind::Other, err.to_string()),
    };
    let hint = match kind {
        BackendErrorKind::InvalidData => {
            "; the wrapped key does not belong to this tenant and version, was altered, or was \
             not made by this key"
        }
        BackendErrorKind::Denied => "; check the PIN, that it is not locked, and the key's usage",
        BackendErrorKind::Unavailable => "; the token is unreachable or busy, retry later",
        BackendErrorKind::Misconfigured => {
            "; check the module, token label, key labels and the key's attributes"
        }
        _ => "",
    };
    let error = BackendError::new(kind, format!("{NAME}: {what} failed: {cause}{hint}"));
    match err {
        // The token dropped the session or the login (or the module was finalized): the
        // backend reconnects once (`Pkcs11Kms::reconnect`).
        CkError::Pkcs11(rv, _) if drops_session(rv) => error.with_source(SessionLost),
        // The return code is in the message; cryptoki's long spec text for it (e.g. "Some
        // horrible, unrecoverable error …" for a GCM tag mismatch) would only mislead.
        CkError::Pkcs11(..) => error,
        other => error.with_source(other),
    }
}

/// Return codes after which the session, the login or the object handles may be gone, while
/// the token and its keys may be back: a reconnection decides.
fn drops_session(rv: RvError) -> bool {
    matches!(
        rv,
        RvError::SessionHandleInvalid
            | RvError::SessionClosed
            | RvError::UserNotLoggedIn
            | RvError::DeviceRemoved
            | RvError::TokenNotPresent
            | RvError::CryptokiNotInitialized
            | RvError::KeyHandleInvalid
            | RvError::ObjectHandleInvalid
            | RvError::SlotIdInvalid
            | RvError::TokenNotRecognized
    )
}

/// Marks an error after which [`Pkcs11Kms::reconnect`] is tried.
#[derive(Debug)]
struct SessionLost;

impl fmt::Display for SessionLost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the token dropped the session or the login")
    }
}

impl std::error::Error for SessionLost {}

/// Marks a login the token refused for the PIN (never retried by a reconnection).
#[derive(Debug)]
struct PinRefused;

impl fmt::Display for PinRefused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the token refused the PIN")
    }
}

impl std::error::Error for PinRefused {}

/// Whether `error` carries the marker `M` ([`SessionLost`]: a call on one connection that
/// calls for a reconnection; [`PinRefused`]).
fn marked<M: std::error::Error + 'static>(error: &BackendError) -> bool {
    std::error::Error::source(error).is_some_and(|s| s.is::<M>())
}

/// Marks a root key a reconnection's logged-in session no longer finds on the token.
#[derive(Debug)]
struct KeyGone;

impl fmt::Display for KeyGone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the root key is no longer on the token")
    }
}

impl std::error::Error for KeyGone {}

/// An error marked [`SessionLost`] where no reconnection follows (while reconnecting, or on
/// the retry after one): the token is not answering as it should, an outage — never a refusal
/// (which would drop the keyring's cached keys).
fn outage_if_session_lost(error: BackendError) -> BackendError {
    if marked::<SessionLost>(&error) {
        BackendError::new(BackendErrorKind::Unavailable, error.to_string())
    } else {
        error
    }
}

/// A call that found its connection being replaced by a reconnection.
fn retired_connection(token: &str) -> BackendError {
    BackendError::new(
        BackendErrorKind::Unavailable,
        format!("{NAME}: the connection to token '{token}' is being replaced: retry"),
    )
    .with_source(SessionLost)
}

/// A root key of the configuration that a reconnection no longer found on the token.
fn key_gone(label: &str, token: &str) -> BackendError {
    BackendError::new(
        BackendErrorKind::Denied,
        format!(
            "{NAME}: root key '{label}' is no longer on token '{token}' (destroyed, or no \
             longer visible to the user): a refusal"
        ),
    )
}

/// A caller that stopped waiting for a reconnection (or whose reconnection gave no answer).
fn reconnect_pending(token: &str) -> BackendError {
    BackendError::new(
        BackendErrorKind::Unavailable,
        format!(
            "{NAME}: the session with token '{token}' was lost and the reconnection did not \
             finish within {OPERATION_TIMEOUT:?}: the token is unreachable or busy, retry later"
        ),
    )
}

fn classify(rv: RvError, function: Function) -> BackendErrorKind {
    use BackendErrorKind as K;
    match rv {
        RvError::EncryptedDataInvalid | RvError::EncryptedDataLenRange => K::InvalidData,
        RvError::PinIncorrect
        | RvError::PinInvalid
        | RvError::PinLenRange
        | RvError::PinExpired
        | RvError::PinLocked
        | RvError::UserNotLoggedIn
        | RvError::UserPinNotInitialized
        | RvError::UserTypeInvalid
        | RvError::KeyFunctionNotPermitted
        // These four trigger a reconnection (`drops_session`); a root key that is really gone
        // is then found so by the reconnection (`KeyGone`), and the codes seen again while
        // reconnecting or on the retry are an outage (`outage_if_session_lost`).
        | RvError::KeyHandleInvalid
        | RvError::ObjectHandleInvalid => K::Denied,
        // Some HSMs answer a GCM tag mismatch (altered wrapped bytes) this way: not an outage.
        RvError::FunctionFailed | RvError::GeneralError if matches!(function, Function::Decrypt) => {
            K::Other
        }
        RvError::DeviceError
        | RvError::DeviceMemory
        | RvError::DeviceRemoved
        | RvError::TokenNotPresent
        | RvError::TokenNotRecognized
        | RvError::SessionClosed
        | RvError::SessionHandleInvalid
        | RvError::SessionCount
        | RvError::HostMemory
        | RvError::FunctionFailed
        | RvError::FunctionCanceled
        | RvError::CryptokiNotInitialized
        // A device failure, or a hot-plug slot that went away.
        | RvError::GeneralError
        | RvError::SlotIdInvalid => K::Unavailable,
        RvError::MechanismInvalid
        | RvError::MechanismParamInvalid
        | RvError::KeyTypeInconsistent
        | RvError::KeySizeRange
        | RvError::TemplateIncomplete
        | RvError::TemplateInconsistent
        | RvError::AttributeValueInvalid
        | RvError::TokenWriteProtected => K::Misconfigured,
        _ => K::Other,
    }
}

/// `CKR_…` for a return code: cryptoki's variant names are the PKCS#11 names in CamelCase.
fn rv_name(rv: RvError) -> String {
    let debug = format!("{rv:?}");
    if debug.contains('(') {
        // VendorDefined(code) / UnknownErrorCode(code).
        return debug;
    }
    let mut name = String::from("CKR");
    for c in debug.chars() {
        if c.is_ascii_uppercase() {
            name.push('_');
        }
        name.push(c.to_ascii_uppercase());
    }
    name
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_locked_pin_or_its_final_try_is_not_spent() {
        let state = |final_try, locked| PinState { final_try, locked };
        assert!(check_pin_state(state(false, false), "t").is_ok());
        for (s, words) in [
            (state(true, false), "one more wrong user PIN would lock it"),
            (state(false, true), "its user PIN is locked"),
            (state(true, true), "its user PIN is locked"),
        ] {
            let err = check_pin_state(s, "t").unwrap_err();
            assert_eq!(err.kind(), BackendErrorKind::Denied);
            assert!(err.to_string().contains(words), "{err}");
            // Not marked as a PIN the token refused: no try was spent, so a later
            // reconnection may check again (and succeed once the counter was reset).
            assert!(!marked::<PinRefused>(&err));
        }
    }

    #[test]
    fn return_code_names() {
        assert_eq!(rv_name(RvError::GeneralError), "CKR_GENERAL_ERROR");
        assert_eq!(
            rv_name(RvError::EncryptedDataLenRange),
            "CKR_ENCRYPTED_DATA_LEN_RANGE"
        );
        assert_eq!(rv_name(RvError::PinIncorrect), "CKR_PIN_INCORRECT");
    }

    #[test]
    fn classification() {
        use BackendErrorKind as K;
        // A device failure in general; only SoftHSM2's unwrap reads it as a tag mismatch
        // (`general_error_is_tag_mismatch`, tested in tests/softhsm.rs).
        assert_eq!(classify(RvError::GeneralError, Function::Decrypt), K::Other);
        // Elsewhere a device failure: an outage, as is a slot that went away.
        assert_eq!(
            classify(RvError::GeneralError, Function::Encrypt),
            K::Unavailable
        );
        assert_eq!(
            classify(RvError::SlotIdInvalid, Function::OpenSession),
            K::Unavailable
        );
        assert!(drops_session(RvError::UserNotLoggedIn));
        assert!(drops_session(RvError::KeyHandleInvalid));
        assert!(!drops_session(RvError::PinIncorrect));
        assert_eq!(
            classify(RvError::EncryptedDataInvalid, Function::Decrypt),
            K::InvalidData
        );
        assert_eq!(classify(RvError::PinIncorrect, Function::Login), K::Denied);
        assert_eq!(
            classify(RvError::KeyFunctionNotPermitted, Function::EncryptInit),
            K::Denied
        );
        assert_eq!(
            classify(RvError::DeviceRemoved, Function::Encrypt),
            K::Unavailable
        );
        assert_eq!(
            classify(RvError::MechanismInvalid, Function::EncryptInit),
            K::Misconfigured
        );
    }

    #[test]
    fn strict_parsing() {
        let mut good = vec![WRAP_FORMAT];
        good.extend_from_slice(&[7; IV_LEN]);
        good.extend_from_slice(&[9; TENANT_KEY_LEN + TAG_LEN]);
        let (iv, sealed) = parse_wrapped(&good).unwrap();
        assert_eq!(iv, [7; IV_LEN]);
        assert_eq!(sealed, &[9; TENANT_KEY_LEN + TAG_LEN][..]);
        let mut bad_format = good.clone();
        bad_format[0] = 0x02;
        assert!(parse_wrapped(&bad_format).is_none());
        assert!(parse_wrapped(&good[..WRAPPED_LEN - 1]).is_none());
        let mut long = good.clone();
        long.push(0);
        assert!(parse_wrapped(&long).is_none());
        assert!(parse_wrapped(&[]).is_none());
    }

    #[test]
    fn config_validation_and_debug() {
        let config = Pkcs11Config {
            module: "/nonexistent.so".into(),
            token_label: "tok".into(),
            pin: SecretString::from("s3cret-pin".to_owned()),
            key_label: "k1".into(),
            previous_key_labels: vec!["k0".into()],
        };
        assert!(validate_config(&config).is_ok());
        assert!(!format!("{config:?}").contains("s3cret"));
        for (token, key, previous) in [
            ("", "k1", vec![]),
            ("a/b", "k1", vec![]),
            ("tok ", "k1", vec![]),
            ("tok", "", vec![]),
            ("tok", "k1", vec!["k1".to_owned()]),
            ("tok", "k1", vec!["k0".to_owned(), "k0".to_owned()]),
            ("tok", "k1", vec![String::new()]),
        ] {
            let c = Pkcs11Config {
                token_label: token.into(),
                key_label: key.into(),
                previous_key_labels: previous,
                ..config.clone()
            };
            let err = validate_config(&c).unwrap_err();
            assert_eq!(err.kind(), BackendErrorKind::Misconfigured, "{c:?}");
        }
    }
}
