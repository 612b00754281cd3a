//! `phiseald`, the phiseal sidecar: field encryption and tenant key administration over gRPC
//! on a Unix socket, for services in any language.
//!
//! Layers, one job each (after Parsec): `main.rs` (signals, hardening, config, start) →
//! [`config`] (TOML + environment, validated) → [`daemon`] (assembles and runs) →
//! [`transport`] (the socket) → [`auth`] (peer credentials, tokens → identity) → [`policy`]
//! (identity × operation × tenant × field) → [`service`] (the gRPC methods, calling the
//! keyring). Around them: [`connections`] and [`inflight`] (caps before any call's code runs),
//! [`kms`] (the configured KMS backend), [`limits`], [`metrics`]
//! (+ [`instrument`]), [`rotation`], [`status`] (error → gRPC status), [`hardening`], and
//! [`offline`] (a config's backends for the CLI's root-key commands).
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod auth;
mod changes;
pub mod config;
pub mod connections;
pub mod daemon;
mod error;
pub mod hardening;
pub mod inflight;
pub mod instrument;
pub mod kms;
pub mod limits;
pub mod metrics;
pub mod offline;
pub mod policy;
pub mod rotation;
pub mod search;
pub mod service;
pub mod slots;
pub mod status;
pub mod streaming;
pub mod transport;

pub use error::DaemonError;
