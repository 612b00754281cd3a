//! Authentication: who is calling. The peer credentials (uid, gid, pid) come from the Unix
//! socket (the kernel vouches for them); a service token, if the caller sends one as
//! `authorization: Bearer <token>`, is checked against the configured SHA-256 hashes in
//! constant time. A token that matches no hash is refused — never silently ignored.

use std::sync::Arc;

use phiseal::Actor;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tonic::transport::server::UdsConnectInfo;

use crate::config::TokenConfig;

/// The daemon itself, doing `task` on its own (`phiseald:{task}`, e.g. the scheduled
/// rotation): its own uid and pid, for the audit records of what it does.
pub fn daemon_actor(task: &str) -> Actor {
    Actor {
        identity: format!("phiseald:{task}").into(),
        uid: Some(rustix::process::getuid().as_raw()),
        pid: Some(std::process::id()),
    }
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Identity {
    /// Peer uid.
    pub uid: u32,
    /// Peer primary gid.
    pub gid: u32,
    /// Peer pid (informational: pids are reused).
    pub pid: Option<u32>,
    /// The name of the token the caller presented, if any.
    pub token: Option<Arc<str>>,
    /// `token:NAME` or `uid:UID`: the audit identity.
    pub name: Arc<str>,
    /// `uid:UID` or `uid:UID/token:NAME`: the rate-limit key. Always the peer's uid, so that
    /// one uid's calls cannot spread over the allowances of every token in sight, nor a
    /// token shared by several uids make them share one allowance.
    pub rate_key: Arc<str>,
}

impl Identity {
    fn new(uid: u32, gid: u32, pid: Option<u32>, token: Option<Arc<str>>) -> Self {
        let (name, rate_key) = match &token {
            Some(t) => (format!("token:{t}"), format!("uid:{uid}/token:{t}")),
            None => (format!("uid:{uid}"), format!("uid:{uid}")),
        };
        Self {
            uid,
            gid,
            pid,
            token,
            name: name.into(),
            rate_key: rate_key.into(),
        }
    }

    /// The actor written to audit records.
    pub fn actor(&self) -> Actor {
        Actor {
            identity: Arc::clone(&self.name),
            uid: Some(self.uid),
            pid: self.pid,
        }
    }

    /// An identity for unit tests.
    #[cfg(test)]
    pub fn for_tests(uid: u32, gid: u32, token: Option<&str>) -> Self {
        Self::new(uid, gid, None, token.map(Arc::from))
    }
}

/// Why a caller could not be identified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    /// The connection has no peer credentials (not a Unix socket peer).
    NoPeerCredentials,
    /// The `authorization` metadata is not `Bearer <token>` in ASCII.
    MalformedToken,
    /// The token matches no configured token.
    UnknownToken,
}

impl AuthFailure {
    /// A message safe to return (never echoes the token).
    pub fn message(self) -> &'static str {
        match self {
            AuthFailure::NoPeerCredentials => "peer credentials unavailable on this connection",
            AuthFailure::MalformedToken => {
                "malformed authorization metadata: expected 'Bearer <token>'"
            }
            AuthFailure::UnknownToken => "the bearer token is not valid",
        }
    }
}

/// The configured tokens, by hash.
pub struct Authenticator {
    tokens: Vec<([u8; 32], Arc<str>)>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("tokens", &self.tokens.len())
            .finish()
    }
}

impl Authenticator {
    /// From validated `[[tokens]]` entries (hex already checked by the config).
    pub fn new(tokens: &[TokenConfig]) -> Self {
        let tokens = tokens
            .iter()
            .filter_map(|t| {
                let mut hash = [0u8; 32];
                hex::decode_to_slice(&t.sha256, &mut hash).ok()?;
                Some((hash, Arc::from(t.name.as_str())))
            })
            .collect();
        Self { tokens }
    }

    /// Identifies the caller of `request`.
    pub fn identify<T>(&self, request: &tonic::Request<T>) -> Result<Identity, AuthFailure> {
        let cred = request
            .extensions()
            .get::<UdsConnectInfo>()
            .and_then(|info| info.peer_cred)
            .ok_or(AuthFailure::NoPeerCredentials)?;
        let pid = cred.pid().and_then(|p| u32::try_from(p).ok());
        let token = match request.metadata().get("authorization") {
            None => None,
            Some(value) => Some(self.check_token(value.as_bytes())?),
        };
        Ok(Identity::new(cred.uid(), cred.gid(), pid, token))
    }

    fn check_token(&self, header: &[u8]) -> Result<Arc<str>, AuthFailure> {
        let token = header
            .strip_prefix(b"Bearer ")
            .filter(|t| !t.is_empty())
            .ok_or(AuthFailure::MalformedToken)?;
        let hash: [u8; 32] = Sha256::digest(token).into();
        // Compare against every configured hash, without stopping at a match.
        let mut found = None;
        for (candidate, name) in &self.tokens {
            if bool::from(candidate.ct_eq(&hash)) {
                found = Some(Arc::clone(name));
            }
        }
        found.ok_or(AuthFailure::UnknownToken)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth() -> Authenticator {
        let sha = hex::encode(Sha256::digest(b"phst_secret"));
        Authenticator::new(&[TokenConfig {
            name: "billing".into(),
            sha256: sha,
        }])
    }

    #[test]
    fn tokens() {
        let a = auth();
        assert_eq!(
            a.check_token(b"Bearer phst_secret").as_deref(),
            Ok("billing")
        );
        assert_eq!(
            a.check_token(b"Bearer phst_other"),
            Err(AuthFailure::UnknownToken)
        );
        assert_eq!(
            a.check_token(b"phst_secret"),
            Err(AuthFailure::MalformedToken)
        );
        assert_eq!(a.check_token(b"Bearer "), Err(AuthFailure::MalformedToken));
    }

    #[test]
    fn identity_names() {
        assert_eq!(&*Identity::for_tests(5, 5, None).name, "uid:5");
        assert_eq!(&*Identity::for_tests(5, 5, Some("b")).name, "token:b");
        assert_eq!(&*Identity::for_tests(5, 5, None).rate_key, "uid:5");
        assert_eq!(
            &*Identity::for_tests(5, 5, Some("b")).rate_key,
            "uid:5/token:b"
        );
    }
}
