//! The KMS backend trait: wraps and unwraps tenant keys under a root key (KEK).
//!
//! Backends are values (`Arc<dyn Kms>`) handed to the keyring builder; there is no registry.

use std::sync::Arc;

use async_trait::async_trait;

use crate::context::TenantId;
use crate::error::{BackendError, BackendErrorKind};
use crate::secret::TenantKey;

/// What a wrapped tenant key is bound to. Backends that support AAD or an encryption context
/// must authenticate it; the core additionally checks a key-check MAC over it after unwrapping,
/// so backends without AAD (Azure Key Vault) are bound too.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyBinding {
    /// The tenant the key belongs to.
    pub tenant: TenantId,
    /// The tenant key version.
    pub version: u32,
}

impl KeyBinding {
    /// The canonical byte encoding used as AAD by backends that take bytes:
    /// `"phiseal/v1/key-binding" ‖ u8 len ‖ tenant ‖ u32be version`.
    pub fn to_aad(&self) -> Vec<u8> {
        let tenant = self.tenant.as_str().as_bytes();
        let mut out = Vec::with_capacity(22 + 1 + tenant.len() + 4);
        out.extend_from_slice(b"phiseal/v1/key-binding");
        // Tenant ids are at most 128 bytes (validated by `TenantId`).
        out.push(tenant.len() as u8);
        out.extend_from_slice(tenant);
        out.extend_from_slice(&self.version.to_be_bytes());
        out
    }
}

/// A tenant key wrapped by a root key: opaque bytes plus the reference to the exact root-key
/// version that made them, so wraps made before a root-key rotation still unwrap. Its `Debug`
/// shows the reference and the length of the wrapped bytes, not the bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct WrappedKey {
    /// Backend-specific reference to the root key version, e.g. `local:3f2a…` or a full Key
    /// Vault key id. Not secret.
    pub root_key_ref: String,
    /// The wrapped bytes. Not secret (useless without the root key), but never logged.
    pub ciphertext: Vec<u8>,
}

impl std::fmt::Debug for WrappedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WrappedKey")
            .field("root_key_ref", &self.root_key_ref)
            .field(
                "ciphertext",
                &format_args!("[{} bytes]", self.ciphertext.len()),
            )
            .finish()
    }
}

/// Whether `err`'s chain of causes holds an I/O error of reading a local file — missing or
/// forbidden, such as a workload-identity token file or a credentials file —, for backends
/// classifying a failure to obtain credentials: that is a configuration problem
/// ([`crate::BackendErrorKind::Misconfigured`]), never an outage that stale keys may bridge.
pub fn caused_by_local_file_error(err: &(dyn std::error::Error + 'static)) -> bool {
    std::iter::successors(Some(err), |e| e.source()).any(|e| {
        e.downcast_ref::<std::io::Error>().is_some_and(|io| {
            matches!(
                io.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied
            )
        })
    })
}

/// Whether `err`'s causes hold an I/O error "permission denied" (looking also inside I/O
/// errors that wrap another error): on a connection to a KMS, this host refused it — a
/// firewall rule that answers `EPERM`, a security policy —, which is a configuration
/// decision ([`crate::BackendErrorKind::Misconfigured`]), never an outage that stale keys may
/// bridge (a host cut off on purpose must stop serving keys).
pub fn caused_by_permission_denied(err: &(dyn std::error::Error + 'static)) -> bool {
    std::iter::successors(Some(err), |e| e.source()).any(|mut e| {
        while let Some(io) = e.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::PermissionDenied {
                return true;
            }
            match io.get_ref() {
                Some(inner) => e = inner,
                None => return false,
            }
        }
        false
    })
}

/// The first error of type `T` in `err`'s chain of causes, looking also inside I/O errors
/// that wrap another error, however deep (an I/O error's `source` skips the error it wraps):
/// for backends classifying what their SDK reports, e.g. a TLS library's certificate error
/// under two layers of connection errors.
pub fn find_cause<'a, T: std::error::Error + 'static>(
    err: &'a (dyn std::error::Error + 'static),
) -> Option<&'a T> {
    std::iter::successors(Some(err), |e| e.source()).find_map(|mut e| {
        loop {
            if let Some(found) = e.downcast_ref::<T>() {
                return Some(found);
            }
            e = e.downcast_ref::<std::io::Error>()?.get_ref()?;
        }
    })
}

/// `text` from outside (a cause from an SDK, a reference read from a store) made safe for an
/// error message or a log line: at most `max_chars` characters (`…` marks a cut), line breaks
/// and tabs as spaces, other control characters as `?` (no forged log lines, no terminal
/// escapes).
pub fn printable(text: &str, max_chars: usize) -> String {
    let mut out: String = text
        .chars()
        .take(max_chars)
        .map(|c| match c {
            '\n' | '\r' | '\t' => ' ',
            c if c.is_control() => '?',
            c => c,
        })
        .collect();
    if text.chars().nth(max_chars).is_some() {
        out.push('…');
    }
    out
}

/// A KMS backend holding the root key.
#[async_trait]
pub trait Kms: Send + Sync + std::fmt::Debug {
    /// A short name for errors, audit records and metrics (`local`, `aws-kms`, …).
    fn name(&self) -> &str;

    /// True for development-only backends (the local file KMS). The `Production` profile
    /// refuses them.
    fn is_dev_only(&self) -> bool {
        false
    }

    /// The root-key reference that [`Kms::wrap`] records now: the current root key version.
    /// `phiseal root rotate` re-wraps every stored tenant key whose reference differs.
    /// May call the KMS (Azure Key Vault reads the key's latest version).
    async fn current_root_key_ref(&self) -> Result<String, BackendError>;

    /// Whether this instance unwraps keys wrapped under `root_key_ref` (its root key, or an
    /// earlier version or key it is configured to accept). Decided locally, without calling
    /// the KMS; [`KmsChain`] routes unwraps by it.
    fn can_unwrap(&self, root_key_ref: &str) -> bool;

    /// How many backends answer for this one: 1, or a [`KmsChain`]'s members. The keyring
    /// keeps each one's outage state apart: one backend down does not hold the others off,
    /// nor do the others' answers end its outage.
    fn backend_count(&self) -> usize {
        1
    }

    /// Which of them ([`Kms::backend_count`]) unwraps keys wrapped under `root_key_ref`: 0
    /// for a single backend; `None` if none does.
    fn backend_for(&self, root_key_ref: &str) -> Option<usize> {
        self.can_unwrap(root_key_ref).then_some(0)
    }

    /// The name of backend `index` ([`Kms::backend_for`]), for errors and metrics.
    fn backend_name(&self, index: usize) -> &str {
        let _ = index;
        self.name()
    }

    /// Wraps `key` under the current root key version, bound to `binding`.
    async fn wrap(&self, key: &TenantKey, binding: &KeyBinding)
    -> Result<WrappedKey, BackendError>;

    /// Unwraps `wrapped` with the root key version it names. Must fail with
    /// [`crate::BackendErrorKind::InvalidData`] if the binding does not match (where the backend
    /// can check it) or the bytes were not made by this root key.
    async fn unwrap(
        &self,
        wrapped: &WrappedKey,
        binding: &KeyBinding,
    ) -> Result<TenantKey, BackendError>;
}

/// Several root keys at once, for root-key rotation and provider migration: wraps with the
/// `current` backend and unwraps with the first backend (current, then the previous ones in
/// order) whose [`Kms::can_unwrap`] accepts the wrapped key's reference. A daemon configured
/// with the new backend as current and the old one as previous serves every tenant while
/// `phiseal root rotate` moves the stored keys, after which the previous one can be removed.
///
/// The members must not claim one another's root-key references unless they hold the same
/// key: a reference goes to the first member that claims it. (References name keys uniquely
/// for the local, AWS and Azure backends; PKCS#11 ones only by token and key label, which
/// another HSM may repeat: `phiseald`'s config check refuses that.)
#[derive(Debug)]
pub struct KmsChain {
    current: Arc<dyn Kms>,
    previous: Vec<Arc<dyn Kms>>,
    /// The names of its backends ([`Kms::backend_name`]), members' own backends flattened
    /// (a member may be a chain itself): a previous member's marked `(previous)`, so that two
    /// of one kind (an AWS-to-AWS migration) are told apart in errors and metrics.
    names: Vec<String>,
}

impl KmsChain {
    /// `current` wraps; `previous` only unwrap.
    pub fn new(current: Arc<dyn Kms>, previous: Vec<Arc<dyn Kms>>) -> Self {
        let mut names = Vec::new();
        for (i, member) in std::iter::once(&current).chain(&previous).enumerate() {
            for j in 0..member.backend_count() {
                let name = member.backend_name(j);
                names.push(if i == 0 || name.ends_with("(previous)") {
                    name.to_owned()
                } else {
                    format!("{name} (previous)")
                });
            }
        }
        Self {
            current,
            previous,
            names,
        }
    }

    fn backends(&self) -> impl Iterator<Item = &Arc<dyn Kms>> {
        std::iter::once(&self.current).chain(&self.previous)
    }
}

#[async_trait]
impl Kms for KmsChain {
    fn name(&self) -> &str {
        self.current.name()
    }

    /// Development-only if any member is: the production profile refuses a chain that still
    /// reaches the local development KMS (migrate away from it before switching profiles).
    fn is_dev_only(&self) -> bool {
        self.backends().any(|k| k.is_dev_only())
    }

    async fn current_root_key_ref(&self) -> Result<String, BackendError> {
        self.current.current_root_key_ref().await
    }

    fn can_unwrap(&self, root_key_ref: &str) -> bool {
        self.backends().any(|k| k.can_unwrap(root_key_ref))
    }

    fn backend_count(&self) -> usize {
        self.backends().map(|k| k.backend_count()).sum()
    }

    /// The backend of the member that unwraps it (the first that claims the reference, as
    /// [`KmsChain::unwrap`] routes), counted across the members' own backends.
    fn backend_for(&self, root_key_ref: &str) -> Option<usize> {
        let mut offset = 0;
        for member in self.backends() {
            if member.can_unwrap(root_key_ref) {
                return member.backend_for(root_key_ref).map(|i| offset + i);
            }
            offset += member.backend_count();
        }
        None
    }

    fn backend_name(&self, index: usize) -> &str {
        self.names
            .get(index)
            .map_or_else(|| self.current.name(), String::as_str)
    }

    async fn wrap(
        &self,
        key: &TenantKey,
        binding: &KeyBinding,
    ) -> Result<WrappedKey, BackendError> {
        self.current.wrap(key, binding).await
    }

    async fn unwrap(
        &self,
        wrapped: &WrappedKey,
        binding: &KeyBinding,
    ) -> Result<TenantKey, BackendError> {
        match self
            .backends()
            .find(|k| k.can_unwrap(&wrapped.root_key_ref))
        {
            Some(kms) => kms.unwrap(wrapped, binding).await,
            None => {
                let names: Vec<&str> = self.backends().map(|k| k.name()).collect();
                Err(BackendError::new(
                    BackendErrorKind::Misconfigured,
                    format!(
                        "no configured KMS backend ({}) holds the root key '{}'",
                        names.join(", "),
                        wrapped.root_key_ref
                    ),
                ))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A backend that only names itself and claims the references `<its name>:…`
    /// (no key operations: the chain's bookkeeping is under test).
    #[derive(Debug)]
    struct Named(&'static str);

    #[async_trait]
    impl Kms for Named {
        fn name(&self) -> &str {
            self.0
        }
        async fn current_root_key_ref(&self) -> Result<String, BackendError> {
            Ok(format!("{}:root", self.0))
        }
        fn can_unwrap(&self, root_key_ref: &str) -> bool {
            root_key_ref.split(':').next() == Some(self.0)
        }
        async fn wrap(&self, _: &TenantKey, _: &KeyBinding) -> Result<WrappedKey, BackendError> {
            Err(BackendError::new(
                BackendErrorKind::Other,
                "not in this test",
            ))
        }
        async fn unwrap(&self, _: &WrappedKey, _: &KeyBinding) -> Result<TenantKey, BackendError> {
            Err(BackendError::new(
                BackendErrorKind::Other,
                "not in this test",
            ))
        }
    }

    #[test]
    fn a_nested_chain_counts_and_names_every_backend() {
        // As `root migrate --to` builds it: the target's chain, then the source's chain.
        let target = KmsChain::new(Arc::new(Named("aws")), vec![Arc::new(Named("azure"))]);
        let source = KmsChain::new(Arc::new(Named("pkcs11")), vec![Arc::new(Named("aws2"))]);
        let chain = KmsChain::new(Arc::new(target), vec![Arc::new(source)]);
        assert_eq!(chain.backend_count(), 4);
        let names: Vec<&str> = (0..4).map(|i| chain.backend_name(i)).collect();
        assert_eq!(
            names,
            [
                "aws",
                "azure (previous)",
                "pkcs11 (previous)",
                "aws2 (previous)"
            ]
        );
        for (reference, index) in [("aws:k", 0), ("azure:k", 1), ("pkcs11:k", 2), ("aws2:k", 3)] {
            assert_eq!(chain.backend_for(reference), Some(index), "{reference}");
        }
        assert_eq!(chain.backend_for("local:k"), None);
    }

    #[test]
    fn printable_caps_and_neutralizes_control_characters() {
        assert_eq!(printable("ok", 5), "ok");
        assert_eq!(printable("abcdef", 3), "abc…");
        assert_eq!(printable("abc", 3), "abc");
        assert_eq!(
            printable("line\nforged: ok\r\t\u{1b}[31m", 100),
            "line forged: ok  ?[31m"
        );
    }

    #[test]
    fn a_connection_this_host_refused_is_found_however_deep() {
        let refused = std::io::Error::from_raw_os_error(1); // EPERM, as a firewall answers
        assert_eq!(refused.kind(), std::io::ErrorKind::PermissionDenied);
        let wrapped = std::io::Error::other(std::io::Error::other(refused));
        assert!(caused_by_permission_denied(&wrapped));
        let down = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert!(!caused_by_permission_denied(&std::io::Error::other(down)));
    }

    #[test]
    fn find_cause_looks_inside_nested_io_errors() {
        #[derive(Debug, thiserror::Error)]
        #[error("the real cause")]
        struct Real;
        let nested =
            std::io::Error::other(std::io::Error::new(std::io::ErrorKind::InvalidData, Real));
        assert!(find_cause::<Real>(&nested).is_some());
        let plain = std::io::Error::other("no such cause");
        assert!(find_cause::<Real>(&plain).is_none());
    }
}
