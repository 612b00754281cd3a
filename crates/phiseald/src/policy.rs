//! Authorization: which identity may run which operation on which tenants and fields.
//!
//! A policy is a list of rules; a request is allowed if any rule allows it, and denied
//! otherwise (default deny). A rule names its subject by uid, gid and/or token name — every
//! criterion it sets must match (a rule with `uids = [1000]` and `tokens = ["billing"]` needs
//! both) — and grants operations on tenants and fields given as exact names or prefixes
//! ending in `*` (`"*"` alone matches everything).

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::auth::Identity;
use crate::error::DaemonError;

/// Operations a rule can grant, as written in the config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Operation {
    /// `Encrypt`, `EncryptBatch`.
    Encrypt,
    /// `Decrypt`, `DecryptBatch`.
    Decrypt,
    /// `Rewrap`.
    Rewrap,
    /// `BlindIndex`, `SearchTerms` (values that reveal equality). `EncryptDeterministic`, and
    /// deterministic `SearchTerms`, need `encrypt` as well.
    Search,
    /// `CreateTenant` (admin).
    CreateTenant,
    /// `RotateTenantKey` (admin).
    Rotate,
    /// `SetMinDecryptionVersion` (admin).
    SetMinVersion,
    /// `KeyStatus` (admin).
    KeyStatus,
    /// `ShredTenant` (admin).
    Shred,
    /// `encrypt`, `decrypt`, `rewrap` and `search`.
    Data,
    /// Every admin operation.
    Admin,
    /// Everything.
    #[serde(rename = "*")]
    All,
}

impl Operation {
    /// True for the admin plane (no field; needs an admin grant).
    pub fn is_admin(self) -> bool {
        matches!(
            self,
            Operation::CreateTenant
                | Operation::Rotate
                | Operation::SetMinVersion
                | Operation::KeyStatus
                | Operation::Shred
        )
    }

    /// Whether a grant of `self` covers `requested`.
    fn covers(self, requested: Operation) -> bool {
        match self {
            Operation::All => true,
            Operation::Data => matches!(
                requested,
                Operation::Encrypt | Operation::Decrypt | Operation::Rewrap | Operation::Search
            ),
            Operation::Admin => requested.is_admin(),
            granted => granted == requested,
        }
    }
}

/// One `[[policy]]` entry.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Peer uids this rule applies to (empty: any uid).
    #[serde(default)]
    pub uids: Vec<u32>,
    /// Peer primary gids this rule applies to (empty: any gid).
    #[serde(default)]
    pub gids: Vec<u32>,
    /// Token names this rule applies to (empty: with or without a token).
    #[serde(default)]
    pub tokens: Vec<String>,
    /// Granted operations.
    pub operations: Vec<Operation>,
    /// Tenants: exact ids, prefixes ending in `*`, or `"*"`.
    pub tenants: Vec<String>,
    /// Fields (data operations only): exact names, prefixes ending in `*`, or `"*"`.
    #[serde(default = "all_names")]
    pub fields: Vec<String>,
}

fn all_names() -> Vec<String> {
    vec!["*".to_owned()]
}

fn name_matches(patterns: &[String], name: &str) -> bool {
    patterns.iter().any(|p| match p.strip_suffix('*') {
        Some(prefix) => name.starts_with(prefix),
        None => p == name,
    })
}

impl Rule {
    /// The embedded default's rule: `uid` may do everything.
    pub fn everything_for_uid(uid: u32) -> Self {
        Self {
            uids: vec![uid],
            gids: Vec::new(),
            tokens: Vec::new(),
            operations: vec![Operation::All],
            tenants: all_names(),
            fields: all_names(),
        }
    }

    /// Checks the rule; `key` names it in errors, `tokens` are the configured token names.
    pub fn validate(&self, key: &str, tokens: &BTreeSet<&str>) -> Result<(), DaemonError> {
        let bad = |what: &str, problem: &str| {
            Err(DaemonError::Config(format!("{key}.{what}: {problem}")))
        };
        if self.uids.is_empty() && self.gids.is_empty() && self.tokens.is_empty() {
            return bad(
                "uids/gids/tokens",
                "a rule must name its subject (at least one uid, gid or token)",
            );
        }
        if let Some(t) = self.tokens.iter().find(|t| !tokens.contains(t.as_str())) {
            return bad(
                "tokens",
                &format!("token '{t}' is not defined in [[tokens]]"),
            );
        }
        if self.operations.is_empty() {
            return bad("operations", "must grant at least one operation");
        }
        if self.tenants.is_empty() {
            return bad("tenants", "must list at least one tenant pattern");
        }
        if self.fields.is_empty() {
            return bad("fields", "must list at least one field pattern");
        }
        for pattern in self.tenants.iter().chain(&self.fields) {
            let body = pattern.strip_suffix('*').unwrap_or(pattern);
            if body.contains('*') {
                return bad(
                    "tenants/fields",
                    &format!("'{pattern}': '*' is only allowed at the end"),
                );
            }
            // A pattern no id could match (a typo, a space) would silently grant nothing.
            let valid = body.len() <= 128
                && (body.len() < pattern.len() || !body.is_empty())
                && body
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'));
            if !valid {
                return bad(
                    "tenants/fields",
                    &format!(
                        "'{pattern}' can match no tenant or field id (1 to 128 ASCII letters, \
                         digits, '-', '_', '.', ':'; optionally ending in '*')"
                    ),
                );
            }
        }
        // `fields` limits data operations only: a rule that also grants admin operations
        // (which have no field) would grant them on the whole tenant unnoticed.
        let grants_admin = self
            .operations
            .iter()
            .any(|g| matches!(g, Operation::All | Operation::Admin) || g.is_admin());
        if grants_admin && self.fields.iter().any(|f| f != "*") {
            return bad(
                "fields",
                "limits data operations only, but this rule also grants admin operations \
                 (which concern the whole tenant): put the admin grants in a rule of their own \
                 (fields absent or [\"*\"])",
            );
        }
        Ok(())
    }

    fn applies_to(&self, who: &Identity) -> bool {
        (self.uids.is_empty() || self.uids.contains(&who.uid))
            && (self.gids.is_empty() || self.gids.contains(&who.gid))
            && (self.tokens.is_empty()
                || who
                    .token
                    .as_deref()
                    .is_some_and(|t| self.tokens.iter().any(|n| n == t)))
    }

    fn allows(&self, who: &Identity, op: Operation, tenant: &str, field: Option<&str>) -> bool {
        self.applies_to(who)
            && self.operations.iter().any(|g| g.covers(op))
            && name_matches(&self.tenants, tenant)
            && field.is_none_or(|f| name_matches(&self.fields, f))
    }
}

/// The policy: default deny.
#[derive(Debug, Clone)]
pub struct Policy {
    rules: Vec<Rule>,
}

impl Policy {
    /// A policy of these (validated) rules.
    pub fn new(rules: Vec<Rule>) -> Self {
        Self { rules }
    }

    /// Whether `who` may run `op` on `tenant` (and `field`, for data operations).
    pub fn allows(&self, who: &Identity, op: Operation, tenant: &str, field: Option<&str>) -> bool {
        self.rules.iter().any(|r| r.allows(who, op, tenant, field))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn who(uid: u32, gid: u32, token: Option<&str>) -> Identity {
        Identity::for_tests(uid, gid, token)
    }

    fn rule(toml_text: &str) -> Rule {
        // safe: test input
        #[allow(clippy::unwrap_used)]
        toml::from_str(toml_text).unwrap()
    }

    #[test]
    fn default_deny() {
        let p = Policy::new(Vec::new());
        assert!(!p.allows(&who(0, 0, None), Operation::Encrypt, "t", Some("f")));
    }

    #[test]
    fn every_criterion_must_match() {
        let p = Policy::new(vec![rule(
            r#"uids = [1000]
               tokens = ["billing"]
               operations = ["encrypt"]
               tenants = ["acme-*"]
               fields = ["ssn", "dob"]"#,
        )]);
        let ok = who(1000, 5, Some("billing"));
        assert!(p.allows(&ok, Operation::Encrypt, "acme-1", Some("ssn")));
        assert!(!p.allows(
            &who(1000, 5, None),
            Operation::Encrypt,
            "acme-1",
            Some("ssn")
        ));
        assert!(!p.allows(
            &who(1001, 5, Some("billing")),
            Operation::Encrypt,
            "acme-1",
            Some("ssn")
        ));
        assert!(!p.allows(&ok, Operation::Decrypt, "acme-1", Some("ssn")));
        assert!(!p.allows(&ok, Operation::Encrypt, "other", Some("ssn")));
        assert!(!p.allows(&ok, Operation::Encrypt, "acme-1", Some("notes")));
        assert!(!p.allows(&ok, Operation::Encrypt, "acme", Some("ssn")));
    }

    #[test]
    fn groups_of_operations() {
        let p = Policy::new(vec![
            rule(
                r#"gids = [7]
                    operations = ["data"]
                    tenants = ["*"]"#,
            ),
            rule(
                r#"uids = [0]
                    operations = ["admin"]
                    tenants = ["*"]"#,
            ),
        ]);
        let app = who(1000, 7, None);
        assert!(p.allows(&app, Operation::Rewrap, "t", Some("f")));
        assert!(!p.allows(&app, Operation::Shred, "t", None));
        let admin = who(0, 0, None);
        assert!(p.allows(&admin, Operation::Shred, "t", None));
        assert!(!p.allows(&admin, Operation::Decrypt, "t", Some("f")));
    }

    #[test]
    fn validation_names_the_problem() {
        let tokens: BTreeSet<&str> = ["billing"].into_iter().collect();
        let no_subject = rule(
            r#"operations = ["encrypt"]
                                 tenants = ["*"]"#,
        );
        let e = no_subject
            .validate("policy[0]", &tokens)
            .unwrap_err()
            .to_string();
        assert!(e.contains("policy[0].uids/gids/tokens"), "{e}");
        let unknown = rule(
            r#"tokens = ["nope"]
                              operations = ["encrypt"]
                              tenants = ["*"]"#,
        );
        let e = unknown
            .validate("policy[1]", &tokens)
            .unwrap_err()
            .to_string();
        assert!(e.contains("token 'nope'"), "{e}");
        let star = rule(
            r#"uids = [1]
                           operations = ["encrypt"]
                           tenants = ["a*b"]"#,
        );
        assert!(star.validate("policy[2]", &tokens).is_err());
    }
}
