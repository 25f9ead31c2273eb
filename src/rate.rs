//! `--publish-rate`: a token bucket per publisher (its token's subject, or its address
//! without a token), refilled at the rate and holding up to twice it.
//!
//! The table of buckets is bounded: once it holds [`MAX_BUCKETS`] publishers, buckets that
//! have refilled completely (publishers idle for two seconds or more) are dropped, which
//! loses nothing since a new bucket starts full; if every bucket is still in use, a new
//! publisher is refused until some refill. So a flood of addresses or subjects costs a
//! bounded table, never unbounded memory.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

/// Most publishers tracked at once.
const MAX_BUCKETS: usize = 100_000;

/// A publisher's tokens and when they were last counted.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Per-publisher rate limits.
#[derive(Debug)]
pub(crate) struct PublishRate {
    per_second: f64,
    burst: f64,
    buckets: Mutex<HashMap<Box<str>, Bucket>>,
}

impl PublishRate {
    /// A limit of `per_second` events (bursts of twice that); `None` when 0 (off).
    pub fn new(per_second: u32) -> Option<Self> {
        (per_second > 0).then(|| Self {
            per_second: f64::from(per_second),
            burst: 2.0 * f64::from(per_second),
            buckets: Mutex::default(),
        })
    }

    /// Takes one event from `publisher`'s bucket, or says in how many whole seconds one
    /// will be there.
    pub fn take(&self, publisher: &str) -> Result<(), u32> {
        self.take_at(publisher, Instant::now())
    }

    fn take_at(&self, publisher: &str, now: Instant) -> Result<(), u32> {
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if !buckets.contains_key(publisher) && buckets.len() >= MAX_BUCKETS {
            let (per_second, burst) = (self.per_second, self.burst);
            buckets.retain(|_, b| refilled(b, now, per_second, burst) < burst);
            if buckets.len() >= MAX_BUCKETS {
                return Err(1);
            }
        }
        let bucket = buckets.entry(publisher.into()).or_insert(Bucket {
            tokens: self.burst,
            at: now,
        });
        bucket.tokens = refilled(bucket, now, self.per_second, self.burst);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            let wait = (1.0 - bucket.tokens) / self.per_second;
            Err(wait.ceil().max(1.0) as u32)
        }
    }
}

fn refilled(bucket: &Bucket, now: Instant, per_second: f64, burst: f64) -> f64 {
    let elapsed = now.saturating_duration_since(bucket.at).as_secs_f64();
    (bucket.tokens + elapsed * per_second).min(burst)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_burst_of_twice_the_rate_then_the_rate() {
        let limit = PublishRate::new(5).unwrap();
        let start = Instant::now();
        for _ in 0..10 {
            assert_eq!(limit.take_at("a", start), Ok(()));
        }
        assert_eq!(limit.take_at("a", start), Err(1));
        // Others have their own bucket.
        assert_eq!(limit.take_at("b", start), Ok(()));
        // A second later, five more.
        let later = start + Duration::from_secs(1);
        for _ in 0..5 {
            assert_eq!(limit.take_at("a", later), Ok(()));
        }
        assert!(limit.take_at("a", later).is_err());
        assert!(PublishRate::new(0).is_none());
    }

    #[test]
    fn the_table_stays_bounded() {
        let limit = PublishRate::new(1).unwrap();
        let start = Instant::now();
        for i in 0..MAX_BUCKETS {
            assert!(limit.take_at(&i.to_string(), start).is_ok());
        }
        // Every bucket is in use: a newcomer waits.
        assert_eq!(limit.take_at("new", start), Err(1));
        // Once they have refilled, they make room.
        let later = start + Duration::from_secs(3);
        assert!(limit.take_at("new", later).is_ok());
        assert!(limit.buckets.lock().unwrap().len() <= 2);
    }
}
