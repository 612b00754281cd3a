//! # phiseal-kms-local — INSECURE, development-only KMS
//!
//! **Do not use this in production.** [`LocalKms`] keeps the root key (KEK) as 32 raw bytes in
//! a file on the local disk. Anyone who can read that file — or a backup, snapshot or image of
//! the disk — can unwrap every tenant key and so decrypt all PHI. There is no HSM, no access
//! policy, no audit trail of key use and no root-key rotation. [`phiseal::kms::Kms::is_dev_only`]
//! returns `true`, so the `Production` profile refuses this backend, and [`LocalKms::open`]
//! logs a warning every time it is called.
//!
//! ## What it does
//! - The root key file holds exactly 32 random bytes. If it does not exist, [`LocalKms::open`]
//!   creates it with mode `0600`; if it exists with any group/other permission bits, is not a
//!   regular file (symlinks included) or is not exactly 32 bytes long, it is refused.
//! - Wrapping is AES-256-GCM under the root key with a fresh random 96-bit nonce and the
//!   [`KeyBinding`] (tenant, version) as AAD, so a wrapped key moved to another tenant or
//!   version does not unwrap. Wrapped bytes are `nonce (12) ‖ ciphertext (32) ‖ tag (16)`.
//!   Random 96-bit nonces are safe for up to 2^32 wraps under one root key (NIST SP 800-38D),
//!   far more than a development setup performs.
//! - The root-key reference is `local:` followed by the hex of the first 8 bytes of
//!   `SHA-256("phiseal/local-kms/key-id" ‖ root key)`: it identifies the key without revealing
//!   it, so a wrap made under another root key file is refused with a clear message.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use phiseal::context::TenantId;
use phiseal::crypto::{AeadKey, default_provider};
use phiseal::kms::{KeyBinding, Kms, WrappedKey};
use phiseal::{BackendError, BackendErrorKind, TENANT_KEY_LEN, TenantKey};
use rand::TryRngCore;
use zeroize::Zeroizing;

/// Length of the root key in bytes (AES-256).
pub const ROOT_KEY_LEN: usize = 32;
/// AES-GCM nonce length used in wrapped keys.
const NONCE_LEN: usize = 12;
/// AES-GCM tag length used in wrapped keys.
const TAG_LEN: usize = phiseal::crypto::TAG_LEN;
/// Length of a wrapped tenant key: `nonce ‖ ciphertext ‖ tag`.
pub const WRAPPED_LEN: usize = NONCE_LEN + TENANT_KEY_LEN + TAG_LEN;
/// Domain separator for the root-key reference hash.
const KEY_ID_DOMAIN: &[u8] = b"phiseal/local-kms/key-id";
/// Prefix of every root-key reference made by this backend.
const REF_PREFIX: &str = "local:";

/// Everything the local KMS can fail with. Messages never contain key bytes.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LocalKmsError {
    /// A file-system operation on the root key file or its directory failed.
    #[error(
        "local KMS: could not {action} '{path}': check that the path and its directory exist \
         and are accessible to this user"
    )]
    Io {
        /// What was being done ("read the root key file", …).
        action: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The operating-system error.
        #[source]
        source: io::Error,
    },
    /// The root key file can be read or written by group or others.
    #[error(
        "local KMS: root key file '{path}' has mode {mode:04o}, which lets group or others \
         access it: refusing it; run `chmod 600 '{path}'` and treat the key as possibly exposed"
    )]
    InsecurePermissions {
        /// The root key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The root key path is a symlink, directory or other non-regular file.
    #[error(
        "local KMS: '{path}' is not a regular file (symlinks are refused): point the local KMS \
         at a regular file with mode 0600"
    )]
    NotRegularFile {
        /// The path.
        path: PathBuf,
    },
    /// The root key file belongs to another user than the process's.
    #[error(
        "local KMS: root key file '{path}' belongs to uid {owner}, not to this process (uid \
         {me}): refusing it (another user could have put a key of their choosing there); use \
         a root key file of the daemon's user"
    )]
    WrongOwner {
        /// The root key file.
        path: PathBuf,
        /// Its owner.
        owner: u32,
        /// This process's effective uid.
        me: u32,
    },
    /// The root key file changed between the permission check and opening it.
    #[error(
        "local KMS: root key file '{path}' was replaced while being opened: make sure no other \
         process is modifying it, then retry"
    )]
    FileChanged {
        /// The root key file.
        path: PathBuf,
    },
    /// The root key file does not hold exactly 32 bytes.
    #[error(
        "local KMS: root key file '{path}' is {len} bytes long, expected exactly 32: it is not a \
         phiseal root key or it is damaged; restore it from backup (replacing it makes every key \
         wrapped under it unrecoverable)"
    )]
    WrongLength {
        /// The root key file.
        path: PathBuf,
        /// Its length in bytes.
        len: u64,
    },
    /// The operating system's random number generator failed.
    #[error("local KMS: the OS random number generator failed; check the host's entropy source")]
    Rng(#[source] rand::rand_core::OsError),
    /// The AES-256-GCM implementation failed (not an authentication failure).
    #[error("local KMS: AES-256-GCM failed to {what}")]
    Crypto {
        /// Which operation.
        what: &'static str,
    },
    /// The wrapped key names another root key than the one this instance holds.
    #[error(
        "local KMS: wrapped key for tenant '{tenant}' version {version} was made by root key \
         '{found}', but this local KMS holds root key '{expected}': open the root key file that \
         made it"
    )]
    RootKeyMismatch {
        /// The tenant of the binding.
        tenant: TenantId,
        /// The version of the binding.
        version: u32,
        /// This instance's root-key reference.
        expected: String,
        /// The reference stored with the wrapped key.
        found: String,
    },
    /// The wrapped bytes have the wrong length.
    #[error(
        "local KMS: wrapped key for tenant '{tenant}' version {version} is {len} bytes long, \
         expected {WRAPPED_LEN}: the key store record is damaged"
    )]
    WrongWrappedLength {
        /// The tenant of the binding.
        tenant: TenantId,
        /// The version of the binding.
        version: u32,
        /// Length seen.
        len: usize,
    },
    /// Authentication of the wrapped key failed.
    #[error(
        "local KMS: wrapped key does not belong to tenant '{tenant}' version {version} or was \
         not made by this root key: refusing it"
    )]
    UnwrapFailed {
        /// The tenant of the binding.
        tenant: TenantId,
        /// The version of the binding.
        version: u32,
    },
}

impl From<LocalKmsError> for BackendError {
    fn from(err: LocalKmsError) -> Self {
        let kind = match &err {
            LocalKmsError::Io { .. }
            | LocalKmsError::InsecurePermissions { .. }
            | LocalKmsError::NotRegularFile { .. }
            | LocalKmsError::FileChanged { .. }
            | LocalKmsError::WrongOwner { .. }
            | LocalKmsError::WrongLength { .. } => BackendErrorKind::Misconfigured,
            LocalKmsError::RootKeyMismatch { .. }
            | LocalKmsError::WrongWrappedLength { .. }
            | LocalKmsError::UnwrapFailed { .. } => BackendErrorKind::InvalidData,
            LocalKmsError::Rng(_) | LocalKmsError::Crypto { .. } => BackendErrorKind::Other,
        };
        let message = err.to_string();
        // The message already describes the failure; keep the underlying cause as the source
        // (rather than `err` itself) so that `Display` of the result does not repeat it.
        match err {
            LocalKmsError::Io { source, .. } => {
                BackendError::new(kind, message).with_source(source)
            }
            LocalKmsError::Rng(source) => BackendError::new(kind, message).with_source(source),
            _ => BackendError::new(kind, message),
        }
    }
}

/// An **INSECURE, development-only** KMS whose root key is a 32-byte file on local disk.
///
/// See the crate documentation for what this means. [`Kms::is_dev_only`] returns `true`.
/// Its `Debug` output shows the file path and the root-key reference, never key bytes.
pub struct LocalKms {
    /// The root key, prepared once as an AES-256-GCM key (the raw bytes are zeroized after
    /// `open`; the key schedule lives in the crypto provider's key object).
    root_key: Box<dyn AeadKey>,
    /// `local:<16 hex digits>`.
    root_key_ref: String,
    /// Where the root key file lives (for `Debug` and messages).
    path: PathBuf,
}

impl std::fmt::Debug for LocalKms {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalKms")
            .field("path", &self.path)
            .field("root_key_ref", &self.root_key_ref)
            .field("root_key", &"[REDACTED]")
            .finish()
    }
}

impl LocalKms {
    /// Opens the root key file at `path`, creating it (mode `0600`, 32 bytes from the OS RNG,
    /// fsynced together with its directory) if it does not exist.
    ///
    /// Refuses a file that is not a regular file (symlinks included), belongs to another user,
    /// has any group/other permission bit set, or is not exactly 32 bytes long. A file another
    /// process created a moment before is used once its directory entry is fsynced.
    ///
    /// **INSECURE, development only**: logs a warning on every call.
    pub fn open(path: impl AsRef<Path>) -> Result<LocalKms, LocalKmsError> {
        let path = path.as_ref();
        tracing::warn!(
            path = %path.display(),
            "phiseal local KMS in use: the root key is a plain file on disk; \
             INSECURE, for development only, never for real PHI"
        );
        let root_key = match fs::symlink_metadata(path) {
            Ok(_) => read_root_key(path)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => match create_root_key(path)? {
                Some(key) => key,
                // Another process created the file first: use theirs — once its name is
                // durable (its creator may not have synced the directory yet), or a crash could
                // lose the key this process is about to wrap tenant keys under.
                None => {
                    let key = read_root_key(path)?;
                    sync_dir(&parent_dir(path))?;
                    key
                }
            },
            Err(source) => {
                return Err(LocalKmsError::Io {
                    action: "inspect the root key file",
                    path: path.to_owned(),
                    source,
                });
            }
        };
        remove_stale_staging_links(path);
        let root_key_ref = key_ref(&root_key);
        let root_key = default_provider()
            .aes_256_gcm
            .key(root_key.expose())
            .map_err(|_| LocalKmsError::Crypto {
                what: "prepare the root key",
            })?;
        Ok(LocalKms {
            root_key,
            root_key_ref,
            path: path.to_owned(),
        })
    }

    /// The reference this instance writes into [`WrappedKey::root_key_ref`]:
    /// `local:<hex of the first 8 bytes of SHA-256("phiseal/local-kms/key-id" ‖ root key)>`.
    pub fn root_key_ref(&self) -> &str {
        &self.root_key_ref
    }

    /// The root key file this instance was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn wrap_sync(
        &self,
        key: &TenantKey,
        binding: &KeyBinding,
    ) -> Result<WrappedKey, LocalKmsError> {
        let mut nonce = [0u8; NONCE_LEN];
        rand::rngs::OsRng
            .try_fill_bytes(&mut nonce)
            .map_err(LocalKmsError::Rng)?;
        // Holds the plaintext key until `seal` encrypts it in place; zeroized on drop either way.
        let mut body = Zeroizing::new(*key.expose());
        let tag = self
            .root_key
            .seal(&nonce, &binding.to_aad(), body.as_mut_slice())
            .map_err(|_| LocalKmsError::Crypto {
                what: "wrap a tenant key",
            })?;
        let mut ciphertext = Vec::with_capacity(WRAPPED_LEN);
        ciphertext.extend_from_slice(&nonce);
        ciphertext.extend_from_slice(body.as_slice());
        ciphertext.extend_from_slice(&tag);
        Ok(WrappedKey {
            root_key_ref: self.root_key_ref.clone(),
            ciphertext,
        })
    }

    fn unwrap_sync(
        &self,
        wrapped: &WrappedKey,
        binding: &KeyBinding,
    ) -> Result<TenantKey, LocalKmsError> {
        if wrapped.root_key_ref != self.root_key_ref {
            return Err(LocalKmsError::RootKeyMismatch {
                tenant: binding.tenant.clone(),
                version: binding.version,
                expected: self.root_key_ref.clone(),
                // From the key store, so untrusted: bounded and with control characters escaped.
                found: wrapped
                    .root_key_ref
                    .chars()
                    .take(80)
                    .flat_map(char::escape_default)
                    .collect(),
            });
        }
        let wrong_length = || LocalKmsError::WrongWrappedLength {
            tenant: binding.tenant.clone(),
            version: binding.version,
            len: wrapped.ciphertext.len(),
        };
        if wrapped.ciphertext.len() != WRAPPED_LEN {
            return Err(wrong_length());
        }
        let (nonce, rest) = wrapped
            .ciphertext
            .split_first_chunk::<NONCE_LEN>()
            .ok_or_else(wrong_length)?;
        let (body, tag) = rest
            .split_last_chunk::<TAG_LEN>()
            .ok_or_else(wrong_length)?;
        if body.len() != TENANT_KEY_LEN {
            return Err(wrong_length());
        }
        let mut plain = Zeroizing::new([0u8; TENANT_KEY_LEN]);
        self.root_key
            .open(nonce, &binding.to_aad(), body, tag, plain.as_mut_slice())
            .map_err(|_| LocalKmsError::UnwrapFailed {
                tenant: binding.tenant.clone(),
                version: binding.version,
            })?;
        TenantKey::from_slice(plain.as_slice()).ok_or(LocalKmsError::Crypto {
            what: "produce a 32-byte key",
        })
    }
}

#[async_trait]
impl Kms for LocalKms {
    fn name(&self) -> &str {
        "local"
    }

    fn is_dev_only(&self) -> bool {
        true
    }

    async fn current_root_key_ref(&self) -> Result<String, BackendError> {
        Ok(self.root_key_ref.clone())
    }

    fn can_unwrap(&self, root_key_ref: &str) -> bool {
        root_key_ref == self.root_key_ref
    }

    async fn wrap(
        &self,
        key: &TenantKey,
        binding: &KeyBinding,
    ) -> Result<WrappedKey, BackendError> {
        Ok(self.wrap_sync(key, binding)?)
    }

    async fn unwrap(
        &self,
        wrapped: &WrappedKey,
        binding: &KeyBinding,
    ) -> Result<TenantKey, BackendError> {
        Ok(self.unwrap_sync(wrapped, binding)?)
    }
}

/// `local:` + hex of the first 8 bytes of `SHA-256(domain ‖ root key)`.
fn key_ref(root_key: &TenantKey) -> String {
    let digest = default_provider()
        .sha256
        .digest(&[KEY_ID_DOMAIN, root_key.expose().as_slice()]);
    let [b0, b1, b2, b3, b4, b5, b6, b7, ..] = digest;
    format!(
        "{REF_PREFIX}{}",
        hex::encode([b0, b1, b2, b3, b4, b5, b6, b7])
    )
}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> LocalKmsError {
    let path = path.to_owned();
    move |source| LocalKmsError::Io {
        action,
        path,
        source,
    }
}

/// Checks type and mode of an existing root key file and reads it.
///
/// The checks are made with `lstat` (so a symlink is refused, not followed) and repeated on
/// the opened descriptor, which must be the same inode: swapping the file in between is caught.
fn read_root_key(path: &Path) -> Result<TenantKey, LocalKmsError> {
    let before = fs::symlink_metadata(path).map_err(io_err("inspect the root key file", path))?;
    check_metadata(path, &before)?;
    // Never through a symlink, and without blocking on a FIFO swapped in after the check.
    let flags = rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::NONBLOCK;
    let mut file = OpenOptions::new()
        .read(true)
        .custom_flags(i32::try_from(flags.bits()).unwrap_or(0))
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(code) if code == rustix::io::Errno::LOOP.raw_os_error() => {
                LocalKmsError::NotRegularFile {
                    path: path.to_owned(),
                }
            }
            _ => io_err("open the root key file", path)(e),
        })?;
    let after = file
        .metadata()
        .map_err(io_err("inspect the root key file", path))?;
    if after.dev() != before.dev() || after.ino() != before.ino() {
        return Err(LocalKmsError::FileChanged {
            path: path.to_owned(),
        });
    }
    check_metadata(path, &after)?;
    if after.len() != ROOT_KEY_LEN as u64 {
        return Err(LocalKmsError::WrongLength {
            path: path.to_owned(),
            len: after.len(),
        });
    }
    let mut bytes = Zeroizing::new([0u8; ROOT_KEY_LEN]);
    file.read_exact(bytes.as_mut_slice())
        .map_err(io_err("read the root key file", path))?;
    TenantKey::from_slice(bytes.as_slice()).ok_or(LocalKmsError::WrongLength {
        path: path.to_owned(),
        len: after.len(),
    })
}

fn check_metadata(path: &Path, meta: &fs::Metadata) -> Result<(), LocalKmsError> {
    if !meta.file_type().is_file() {
        return Err(LocalKmsError::NotRegularFile {
            path: path.to_owned(),
        });
    }
    let me = rustix::process::geteuid().as_raw();
    if meta.uid() != me {
        return Err(LocalKmsError::WrongOwner {
            path: path.to_owned(),
            owner: meta.uid(),
            me,
        });
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(LocalKmsError::InsecurePermissions {
            path: path.to_owned(),
            mode,
        });
    }
    Ok(())
}

/// Creates a new root key file atomically: the key is written and fsynced to a temporary file
/// (`create_new`, mode `0600`) in the same directory, which is then hard-linked to `path`. The
/// link fails if `path` exists, so a concurrent creator never has its key replaced, and no
/// reader ever sees a partially written key file. Returns `None` if another process won.
fn create_root_key(path: &Path) -> Result<Option<TenantKey>, LocalKmsError> {
    let dir = parent_dir(path);
    let file_name = path
        .file_name()
        .ok_or_else(|| LocalKmsError::NotRegularFile {
            path: path.to_owned(),
        })?;

    let mut key = Zeroizing::new([0u8; ROOT_KEY_LEN]);
    rand::rngs::OsRng
        .try_fill_bytes(key.as_mut_slice())
        .map_err(LocalKmsError::Rng)?;

    let mut suffix = [0u8; 8];
    rand::rngs::OsRng
        .try_fill_bytes(&mut suffix)
        .map_err(LocalKmsError::Rng)?;
    let mut tmp_name = file_name.to_owned();
    tmp_name.push(format!(".tmp-{}", hex::encode(suffix)));
    let tmp = dir.join(tmp_name);

    let result = write_and_link(&tmp, path, &dir, key.as_slice());
    // The temporary name is only a staging link; the key lives on under `path` (if linked).
    let _ = fs::remove_file(&tmp);
    if result? {
        sync_dir(&dir)?;
        Ok(TenantKey::from_slice(key.as_slice()))
    } else {
        Ok(None)
    }
}

/// Writes `key` to a new file `tmp`, fsyncs it, links it to `path`. `Ok(false)` if `path`
/// already exists.
fn write_and_link(tmp: &Path, path: &Path, dir: &Path, key: &[u8]) -> Result<bool, LocalKmsError> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(tmp)
        .map_err(io_err("create a new root key file in", dir))?;
    file.write_all(key)
        .map_err(io_err("write the new root key file", tmp))?;
    file.sync_all()
        .map_err(io_err("fsync the new root key file", tmp))?;
    drop(file);
    match fs::hard_link(tmp, path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
        Err(source) => Err(LocalKmsError::Io {
            action: "link the new root key file to",
            path: path.to_owned(),
            source,
        }),
    }
}

/// Removes `<file>.tmp-*` names that are second links to the root key file: a creation that
/// crashed between linking the key into place and removing its staging name leaves one, and
/// deleting `root.key` later would not destroy the key. (A staging file that is *not* the root
/// key — another process creating one right now — is left alone.) Best effort.
fn remove_stale_staging_links(path: &Path) {
    let (Some(name), Ok(key)) = (path.file_name(), fs::symlink_metadata(path)) else {
        return;
    };
    let mut prefix = name.to_owned();
    prefix.push(".tmp-");
    let Ok(entries) = fs::read_dir(parent_dir(path)) else {
        return;
    };
    for entry in entries.flatten() {
        let staging = entry
            .file_name()
            .as_encoded_bytes()
            .starts_with(prefix.as_encoded_bytes());
        let same_file = fs::symlink_metadata(entry.path())
            .is_ok_and(|m| m.is_file() && m.dev() == key.dev() && m.ino() == key.ino());
        if staging && same_file {
            let _ = fs::remove_file(entry.path());
        }
    }
}

/// The directory holding `path` (`.` for a bare file name).
fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    }
}

fn sync_dir(dir: &Path) -> Result<(), LocalKmsError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsync the directory", dir))
}
