//! # phiseal — per-tenant envelope encryption of PHI fields
//!
//! Placeholder crate docs; replaced below.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod audit;
pub mod context;
pub mod crypto;
mod error;
pub mod kms;
mod secret;
pub mod store;

pub use error::{BackendError, BackendErrorKind, BoxError, Error, FormatError};
pub use secret::{TENANT_KEY_LEN, TenantKey};
