//! Token buckets that cap a device's I/O: one for bytes, one for operations.
//!
//! A request takes tokens from both buckets or from neither; when either is short the
//! device parks the request and asks its worker to retry at [`RateLimiter::consume`]'s
//! returned instant. A request larger than a bucket is let through once the bucket is
//! full, so an oversized request is slowed, never stuck.

use std::time::{Duration, Instant};

use tartarus_vmm_api::config::RateLimit;

/// A token bucket refilled continuously at `rate` tokens per second.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    capacity: u64,
    rate: u64,
    tokens: u64,
    /// Refill progress below one token, in token-nanoseconds, so slow rates still refill.
    remainder: u128,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket holding `rate + burst` tokens. `rate` must be > 0.
    pub fn new(rate: u64, burst: u64, now: Instant) -> Self {
        let capacity = rate.saturating_add(burst).max(1);
        TokenBucket {
            capacity,
            rate: rate.max(1),
            tokens: capacity,
            remainder: 0,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_nanos();
        self.last = now;
        let scaled = elapsed * u128::from(self.rate) + self.remainder;
        let whole = scaled / 1_000_000_000;
        self.remainder = scaled % 1_000_000_000;
        self.tokens = self.capacity.min(
            self.tokens
                .saturating_add(u64::try_from(whole).unwrap_or(u64::MAX)),
        );
        if self.tokens == self.capacity {
            self.remainder = 0;
        }
    }

    /// Tokens a request of size `n` costs: at most a full bucket.
    fn cost(&self, n: u64) -> u64 {
        n.min(self.capacity)
    }

    fn has(&self, n: u64) -> bool {
        self.tokens >= self.cost(n)
    }

    fn take(&mut self, n: u64) {
        self.tokens -= self.cost(n);
    }

    /// How long until `n` tokens are available.
    fn wait_for(&self, n: u64) -> Duration {
        let missing = self.cost(n).saturating_sub(self.tokens);
        let nanos = (u128::from(missing) * 1_000_000_000)
            .saturating_sub(self.remainder)
            .div_ceil(u128::from(self.rate));
        Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
    }

    pub fn tokens(&self) -> u64 {
        self.tokens
    }
}

/// The pair of buckets a device consults before each request.
#[derive(Debug, Clone, Default)]
pub struct RateLimiter {
    bytes: Option<TokenBucket>,
    ops: Option<TokenBucket>,
}

impl RateLimiter {
    pub fn new(limit: RateLimit, now: Instant) -> Self {
        RateLimiter {
            bytes: limit
                .bytes_per_sec
                .filter(|&r| r > 0)
                .map(|r| TokenBucket::new(r, limit.burst_bytes, now)),
            ops: limit
                .ops_per_sec
                .filter(|&r| r > 0)
                .map(|r| TokenBucket::new(r, limit.burst_ops, now)),
        }
    }

    pub fn unlimited() -> Self {
        RateLimiter::default()
    }

    pub fn is_unlimited(&self) -> bool {
        self.bytes.is_none() && self.ops.is_none()
    }

    /// Takes `ops` and `bytes` tokens, or none and returns when to try again.
    pub fn consume(&mut self, ops: u64, bytes: u64, now: Instant) -> Result<(), Instant> {
        for bucket in [&mut self.bytes, &mut self.ops].into_iter().flatten() {
            bucket.refill(now);
        }
        let byte_wait = self
            .bytes
            .as_ref()
            .filter(|b| !b.has(bytes))
            .map(|b| b.wait_for(bytes));
        let op_wait = self
            .ops
            .as_ref()
            .filter(|b| !b.has(ops))
            .map(|b| b.wait_for(ops));
        if let Some(wait) = byte_wait.max(op_wait) {
            return Err(now + wait.max(Duration::from_micros(100)));
        }
        if let Some(b) = &mut self.bytes {
            b.take(bytes);
        }
        if let Some(b) = &mut self.ops {
            b.take(ops);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn unlimited_always_passes() {
        let now = Instant::now();
        let mut rl = RateLimiter::unlimited();
        assert!(rl.consume(1_000_000, u64::MAX, now).is_ok());
    }

    #[test]
    fn bytes_bucket_throttles_and_refills() {
        let t0 = Instant::now();
        let limit = RateLimit {
            bytes_per_sec: Some(1000),
            ..RateLimit::default()
        };
        let mut rl = RateLimiter::new(limit, t0);
        assert!(rl.consume(1, 600, t0).is_ok());
        let retry = rl.consume(1, 600, t0).unwrap_err();
        assert_eq!(retry - t0, Duration::from_millis(200));
        assert!(rl.consume(1, 600, t0 + Duration::from_millis(200)).is_ok());
    }

    #[test]
    fn ops_and_bytes_are_taken_together_or_not_at_all() {
        let t0 = Instant::now();
        let limit = RateLimit {
            bytes_per_sec: Some(1000),
            ops_per_sec: Some(1),
            ..RateLimit::default()
        };
        let mut rl = RateLimiter::new(limit, t0);
        assert!(rl.consume(1, 10, t0).is_ok());
        assert!(rl.consume(1, 10, t0).is_err());
        // The refused request took no bytes.
        assert_eq!(rl.bytes.as_ref().unwrap().tokens(), 990);
    }

    #[test]
    fn oversized_request_passes_once_bucket_is_full() {
        let t0 = Instant::now();
        let limit = RateLimit {
            bytes_per_sec: Some(100),
            ..RateLimit::default()
        };
        let mut rl = RateLimiter::new(limit, t0);
        assert!(rl.consume(1, 10_000, t0).is_ok());
        assert!(rl.consume(1, 10_000, t0).is_err());
        assert!(rl.consume(1, 10_000, t0 + Duration::from_secs(1)).is_ok());
    }

    proptest! {
        /// Over any schedule, granted bytes never exceed the burst plus rate × elapsed.
        #[test]
        fn never_grants_more_than_rate(
            rate in 1u64..10_000,
            steps in proptest::collection::vec((0u64..50_000_000, 1u64..20_000), 1..200),
        ) {
            let t0 = Instant::now();
            let limit = RateLimit { bytes_per_sec: Some(rate), ..RateLimit::default() };
            let mut rl = RateLimiter::new(limit, t0);
            let mut now = t0;
            let mut granted: u128 = 0;
            for (advance_ns, size) in steps {
                now += Duration::from_nanos(advance_ns);
                if rl.consume(1, size, now).is_ok() {
                    granted += u128::from(size.min(rate));
                }
            }
            let elapsed = (now - t0).as_nanos();
            let allowed = u128::from(rate) + elapsed * u128::from(rate) / 1_000_000_000 + 1;
            prop_assert!(granted <= allowed, "granted {granted} > allowed {allowed}");
        }
    }
}
