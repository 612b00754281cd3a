//! Identifiers and the encryption context (tenant, field, optional record).
//!
//! The context is authenticated as AAD on every encryption and never stored in the ciphertext:
//! a ciphertext decrypts only under exactly the context it was made with.

use std::fmt;
use std::sync::Arc;

use crate::error::Error;

/// Longest tenant id or field name, in bytes.
pub const MAX_NAME_LEN: usize = 128;
/// Longest record id, in bytes.
pub const MAX_RECORD_LEN: usize = 512;

fn check_name(kind: &'static str, value: &str) -> Result<(), Error> {
    let ok_len = !value.is_empty() && value.len() <= MAX_NAME_LEN;
    let ok_chars = value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'));
    if ok_len && ok_chars {
        Ok(())
    } else {
        Err(Error::InvalidInput {
            what: kind,
            reason: "must be 1..=128 bytes of ASCII letters, digits, '-', '_', '.', ':'",
        })
    }
}

/// A tenant id: 1..=128 bytes of `[A-Za-z0-9._:-]`. Cheap to clone.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TenantId(Arc<str>);

impl TenantId {
    /// Validates and wraps a tenant id.
    pub fn new(value: impl AsRef<str>) -> Result<Self, Error> {
        let value = value.as_ref();
        check_name("tenant id", value)?;
        Ok(Self(Arc::from(value)))
    }

    /// The id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TenantId({:?})", &*self.0)
    }
}

/// The context a field is encrypted under. Field and record names are metadata, not PHI
/// payload: they are written to the audit log (see `docs/FORMAT.md`).
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct EncryptionContext {
    tenant: TenantId,
    field: Arc<str>,
    record: Option<Arc<str>>,
}

impl EncryptionContext {
    /// A context for `field` of `tenant`, with no record id.
    pub fn new(tenant: TenantId, field: impl AsRef<str>) -> Result<Self, Error> {
        let field = field.as_ref();
        check_name("field name", field)?;
        Ok(Self {
            tenant,
            field: Arc::from(field),
            record: None,
        })
    }

    /// Binds the ciphertext to one record as well (1..=512 bytes of UTF-8, no control characters).
    pub fn with_record(mut self, record: impl AsRef<str>) -> Result<Self, Error> {
        let record = record.as_ref();
        if record.is_empty()
            || record.len() > MAX_RECORD_LEN
            || record.chars().any(char::is_control)
        {
            return Err(Error::InvalidInput {
                what: "record id",
                reason: "must be 1..=512 bytes of UTF-8 without control characters",
            });
        }
        self.record = Some(Arc::from(record));
        Ok(self)
    }

    /// The same tenant and field without a record id: cheap (shares the names), for the
    /// many fields of a batch that differ only by record.
    pub fn without_record(&self) -> Self {
        Self {
            tenant: self.tenant.clone(),
            field: Arc::clone(&self.field),
            record: None,
        }
    }

    /// The tenant.
    pub fn tenant(&self) -> &TenantId {
        &self.tenant
    }

    /// The field name.
    pub fn field(&self) -> &str {
        &self.field
    }

    /// The record id, if any.
    pub fn record(&self) -> Option<&str> {
        self.record.as_deref()
    }

    /// The field name, shared (no copy for audit events).
    pub(crate) fn field_shared(&self) -> &Arc<str> {
        &self.field
    }

    /// The record id, shared (no copy for audit events).
    pub(crate) fn record_shared(&self) -> Option<&Arc<str>> {
        self.record.as_ref()
    }

    /// Feeds the canonical context encoding of `docs/FORMAT.md` §4 to `push`, in pieces:
    /// `u8 len ‖ tenant ‖ u8 len ‖ field ‖ (0x00 | 0x01 ‖ u16be len ‖ record)`.
    /// At most [`MAX_ENCODED_LEN`] bytes in total.
    pub(crate) fn encode_with(&self, mut push: impl FnMut(&[u8])) {
        // Lengths are bounded by construction (128 and 512), so the casts cannot truncate.
        let tenant = self.tenant.as_str().as_bytes();
        let field = self.field.as_bytes();
        push(&[tenant.len() as u8]);
        push(tenant);
        push(&[field.len() as u8]);
        push(field);
        match &self.record {
            None => push(&[0]),
            Some(record) => {
                let len = (record.len() as u16).to_be_bytes();
                push(&[1, len[0], len[1]]);
                push(record.as_bytes());
            }
        }
    }

    /// Length of the canonical context encoding.
    pub(crate) fn encoded_len(&self) -> usize {
        let record = self.record.as_ref().map_or(1, |r| 3 + r.len());
        2 + self.tenant.as_str().len() + self.field.len() + record
    }

    /// The canonical context encoding as a vector.
    #[cfg(test)]
    fn encoded(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode_with(|b| out.extend_from_slice(b));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_validated() {
        assert!(TenantId::new("acme-health").is_ok());
        assert!(TenantId::new("").is_err());
        assert!(TenantId::new("a b").is_err());
        assert!(TenantId::new("x".repeat(129)).is_err());
        let t = TenantId::new("t").unwrap();
        assert!(EncryptionContext::new(t.clone(), "ssn").is_ok());
        assert!(EncryptionContext::new(t.clone(), "ss\nn").is_err());
        let c = EncryptionContext::new(t, "ssn").unwrap();
        assert!(c.clone().with_record("").is_err());
        assert!(c.clone().with_record("r\u{0}").is_err());
        assert!(c.with_record("patient/42").is_ok());
    }

    #[test]
    fn encoding_is_unambiguous() {
        let t = TenantId::new("ab").unwrap();
        let a = EncryptionContext::new(t.clone(), "c").unwrap().encoded();
        let t2 = TenantId::new("a").unwrap();
        let b = EncryptionContext::new(t2, "bc").unwrap().encoded();
        assert_ne!(a, b);
        assert_eq!(a, [2, b'a', b'b', 1, b'c', 0]);
        let with_record = EncryptionContext::new(t, "c")
            .unwrap()
            .with_record("rec")
            .unwrap();
        assert_eq!(with_record.encoded().len(), with_record.encoded_len());
        assert_eq!(b.len(), 6);
    }
}
