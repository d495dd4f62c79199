//! Inference rate limits per account: requests and tokens per minute, the limits of the
//! `requests-per-minute` and `tokens-per-minute` quotas. Every model of an account (a base
//! and each of its LoRAs) draws on the same two limits, as the second provider's API
//! documents for a base model's LoRAs.
//!
//! Each limit is a token bucket holding up to a minute's worth that refills continuously at
//! limit/60 per second: a burst of a whole minute's allowance is served at once, and after
//! that the rate holds. A request is admitted while the request bucket has one to give and the
//! token bucket is not in debt; its tokens (prompt and completion) are charged when its
//! response ends, since only then are they known, so one long generation may take the token
//! bucket below zero and the requests after it wait until it refills. A refusal says how
//! long to wait, which the official clients honour (`retry-after`).
//!
//! The buckets live in the gateway's memory: several gateways on one store each enforce the
//! limits on what they route.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A request refused for its account's rate: which limit, and how long until it would pass.
#[derive(Debug, Clone, PartialEq)]
pub struct Limited {
    pub quota: &'static str,
    pub limit: i64,
    pub retry_after: Duration,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    /// What may still be drawn; negative is debt.
    level: f64,
    /// The capacity `level` was last refilled under (the limit per minute).
    limit: i64,
    at: Instant,
}

impl Bucket {
    fn new(limit: i64, now: Instant) -> Bucket {
        Bucket { level: limit as f64, limit, at: now }
    }

    /// Refills for the time since the last look, under the current limit.
    fn refill(&mut self, limit: i64, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.limit = limit;
        self.level = (self.level + elapsed * limit as f64 / 60.0).min(limit as f64);
        self.at = now;
    }

    /// How long until the level reaches `want`.
    fn wait_for(&self, want: f64) -> Duration {
        if self.limit <= 0 {
            return Duration::from_secs(60);
        }
        let per_sec = self.limit as f64 / 60.0;
        Duration::from_secs_f64(((want - self.level) / per_sec).max(0.0))
    }

    /// What was drawn within the last minute's worth.
    fn used(&self) -> f64 {
        (self.limit as f64 - self.level).max(0.0)
    }
}

#[derive(Debug, Default)]
pub struct Rates {
    accounts: Mutex<HashMap<String, (Bucket, Bucket)>>,
}

impl Rates {
    /// Admits one request of `account` under its limits (per minute), or says which limit
    /// refuses it and for how long.
    pub fn admit(&self, account: &str, rpm: i64, tpm: i64, now: Instant) -> Result<(), Limited> {
        let mut accounts = self.accounts.lock().unwrap_or_else(|p| p.into_inner());
        let (requests, tokens) =
            accounts.entry(account.to_string()).or_insert_with(|| (Bucket::new(rpm, now), Bucket::new(tpm, now)));
        requests.refill(rpm, now);
        tokens.refill(tpm, now);
        if requests.level < 1.0 {
            return Err(Limited { quota: "requests-per-minute", limit: rpm, retry_after: requests.wait_for(1.0) });
        }
        if tokens.level <= 0.0 || tpm <= 0 {
            // Waiting until it is no longer in debt, plus a token's worth so it is positive.
            return Err(Limited { quota: "tokens-per-minute", limit: tpm, retry_after: tokens.wait_for(1.0) });
        }
        requests.level -= 1.0;
        Ok(())
    }

    /// Charges the tokens a request used, once its response has ended.
    pub fn charge(&self, account: &str, n: u64) {
        let mut accounts = self.accounts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, tokens)) = accounts.get_mut(account) {
            tokens.level -= n as f64;
        }
    }

    /// Requests and tokens used within the last minute's worth, for the quotas' `usage`.
    pub fn used(&self, account: &str) -> (f64, f64) {
        let mut accounts = self.accounts.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        match accounts.get_mut(account) {
            Some((r, t)) => {
                let (rl, tl) = (r.limit, t.limit);
                r.refill(rl, now);
                t.refill(tl, now);
                (r.used(), t.used())
            }
            None => (0.0, 0.0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_minute_of_requests_passes_at_once_then_the_rate_holds() {
        let rates = Rates::default();
        let t0 = Instant::now();
        for _ in 0..120 {
            rates.admit("a", 120, 1_000_000, t0).expect("within the burst");
        }
        let refused = rates.admit("a", 120, 1_000_000, t0).unwrap_err();
        assert_eq!(refused.quota, "requests-per-minute");
        assert!((refused.retry_after.as_secs_f64() - 0.5).abs() < 1e-6, "{refused:?}");
        // Another account is untouched.
        rates.admit("b", 120, 1_000_000, t0).expect("own bucket");
        // Two a second refill.
        rates.admit("a", 120, 1_000_000, t0 + Duration::from_millis(500)).expect("refilled one");
        assert!(rates.admit("a", 120, 1_000_000, t0 + Duration::from_millis(500)).is_err());
    }

    #[test]
    fn tokens_are_charged_after_and_a_debt_is_waited_out() {
        let rates = Rates::default();
        let t0 = Instant::now();
        rates.admit("a", 1000, 600, t0).expect("first");
        rates.charge("a", 900);
        let refused = rates.admit("a", 1000, 600, t0).unwrap_err();
        assert_eq!(refused.quota, "tokens-per-minute");
        // 300 in debt, then one more, at 10 a second.
        assert!((refused.retry_after.as_secs_f64() - 30.1).abs() < 1e-6, "{refused:?}");
        rates.admit("a", 1000, 600, t0 + Duration::from_secs(31)).expect("paid off");
    }

    #[test]
    fn a_zero_limit_refuses_everything_and_a_lowered_limit_caps_the_bucket() {
        let rates = Rates::default();
        let t0 = Instant::now();
        assert!(rates.admit("a", 0, 100, t0).is_err());
        assert!(rates.admit("b", 100, 0, t0).is_err());
        rates.admit("c", 1000, 1000, t0).expect("big");
        for _ in 0..2 {
            rates.admit("c", 2, 1000, t0).expect("capped to 2");
        }
        assert!(rates.admit("c", 2, 1000, t0).is_err());
    }
}
