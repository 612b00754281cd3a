//! Per-caller rate limiting (governor's keyed GCRA limiter): each caller (`uid:N`, or
//! `uid:N/token:NAME` with a token; `auth::Identity::rate_key`) may make `rate_per_second` calls per second sustained, with bursts of
//! `rate_burst`. A call over the limit is refused before it runs, with RESOURCE_EXHAUSTED.
//! Batch items the policy refuses count separately, one by one, at the same rate: each is an
//! audit record.

use std::num::NonZeroU32;
use std::sync::Arc;

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::config::LimitsConfig;

/// The keyed limiters.
#[derive(Debug)]
pub struct CallLimiter {
    limiter: DefaultKeyedRateLimiter<Arc<str>>,
    /// Batch items refused by the policy, per identity, at the same rate: each is one audit
    /// record, and a caller without any grant must not turn one call into thousands of them.
    refusals: DefaultKeyedRateLimiter<Arc<str>>,
}

/// Whether an identity's refused batch items may be audited now.
#[derive(Debug, PartialEq, Eq)]
pub enum RefusalBudget {
    /// Yes (taken from its allowance).
    Admitted,
    /// Not now: its allowance is used up.
    Exhausted,
    /// Never in one call: more than `limits.rate_burst`.
    TooManyAtOnce,
}

impl CallLimiter {
    /// From validated limits (rate and burst are at least 1).
    pub fn new(limits: &LimitsConfig) -> Self {
        let rate = NonZeroU32::new(limits.rate_per_second).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(limits.rate_burst).unwrap_or(NonZeroU32::MIN);
        let quota = Quota::per_second(rate).allow_burst(burst);
        Self {
            limiter: RateLimiter::keyed(quota),
            refusals: RateLimiter::keyed(quota),
        }
    }

    /// Takes one call from `identity`'s allowance; false if it is exhausted.
    pub fn admit(&self, identity: &Arc<str>) -> bool {
        self.limiter.check_key(identity).is_ok()
    }

    /// Takes `items` refused batch items from `identity`'s refusal allowance.
    pub fn admit_refusals(&self, identity: &Arc<str>, items: usize) -> RefusalBudget {
        let Some(n) = u32::try_from(items).ok().and_then(NonZeroU32::new) else {
            return match items {
                0 => RefusalBudget::Admitted,
                _ => RefusalBudget::TooManyAtOnce,
            };
        };
        match self.refusals.check_key_n(identity, n) {
            Ok(Ok(())) => RefusalBudget::Admitted,
            Ok(Err(_)) => RefusalBudget::Exhausted,
            Err(_) => RefusalBudget::TooManyAtOnce,
        }
    }

    /// Forgets identities whose allowance is full again (bounded memory).
    pub fn forget_idle(&self) {
        self.limiter.retain_recent();
        self.refusals.retain_recent();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_refuse_per_identity() {
        let limits = LimitsConfig {
            rate_per_second: 1,
            rate_burst: 3,
            ..LimitsConfig::default()
        };
        let l = CallLimiter::new(&limits);
        let a: Arc<str> = "uid:1".into();
        let b: Arc<str> = "uid:2".into();
        assert!((0..3).all(|_| l.admit(&a)));
        assert!(!l.admit(&a));
        assert!(l.admit(&b), "another identity has its own allowance");
    }

    #[test]
    fn refused_items_are_counted_one_by_one_on_their_own_allowance() {
        let limits = LimitsConfig {
            rate_per_second: 1,
            rate_burst: 5,
            ..LimitsConfig::default()
        };
        let l = CallLimiter::new(&limits);
        let a: Arc<str> = "uid:1".into();
        assert_eq!(l.admit_refusals(&a, 6), RefusalBudget::TooManyAtOnce);
        assert_eq!(l.admit_refusals(&a, 0), RefusalBudget::Admitted);
        assert_eq!(l.admit_refusals(&a, 4), RefusalBudget::Admitted);
        assert_eq!(l.admit_refusals(&a, 2), RefusalBudget::Exhausted);
        assert_eq!(l.admit_refusals(&a, 1), RefusalBudget::Admitted);
        assert!(l.admit(&a), "calls have their own allowance");
    }
}
