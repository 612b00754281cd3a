//! Per-identity rate limiting (governor's keyed GCRA limiter): each identity (`uid:N` or
//! `token:NAME`) may make `rate_per_second` calls per second sustained, with bursts of
//! `rate_burst`. A call over the limit is refused before it runs, with RESOURCE_EXHAUSTED.

use std::num::NonZeroU32;
use std::sync::Arc;

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::config::LimitsConfig;

/// The keyed limiter.
#[derive(Debug)]
pub struct CallLimiter {
    limiter: DefaultKeyedRateLimiter<Arc<str>>,
}

impl CallLimiter {
    /// From validated limits (rate and burst are at least 1).
    pub fn new(limits: &LimitsConfig) -> Self {
        let rate = NonZeroU32::new(limits.rate_per_second).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(limits.rate_burst).unwrap_or(NonZeroU32::MIN);
        Self {
            limiter: RateLimiter::keyed(Quota::per_second(rate).allow_burst(burst)),
        }
    }

    /// Takes one call from `identity`'s allowance; false if it is exhausted.
    pub fn admit(&self, identity: &Arc<str>) -> bool {
        self.limiter.check_key(identity).is_ok()
    }

    /// Forgets identities whose allowance is full again (bounded memory).
    pub fn forget_idle(&self) {
        self.limiter.retain_recent();
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
}
