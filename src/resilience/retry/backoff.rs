//! How long to wait before another attempt: the server's own word first, else exponential
//! backoff with jitter.

use std::time::{Duration, SystemTime};

/// Backoff settings.
#[derive(Debug, Clone)]
pub struct Backoff {
    pub base: Duration,
    pub max: Duration,
    /// Cap on a server-requested delay: a `retry-after: 3600` is not waited out inside one request.
    pub max_server_delay: Duration,
}

impl Backoff {
    /// The wait before retry number `retry` (1 for the first retry): the server's requested
    /// delay when it gave one (capped), else `base · 2^(retry-1)` capped at `max`, with "equal
    /// jitter" (half fixed, half random) so that synchronized callers spread out without any of
    /// them retrying immediately.
    pub fn delay(&self, retry: u32, server: Option<Duration>) -> Duration {
        if let Some(d) = server {
            return d.min(self.max_server_delay);
        }
        let exp = self
            .base
            .saturating_mul(
                1u32.checked_shl(retry.saturating_sub(1))
                    .unwrap_or(u32::MAX),
            )
            .min(self.max);
        let half = exp / 2;
        half + half.mul_f64(jitter_fraction())
    }
}

/// A pseudo-random fraction in [0, 1), from a per-thread xorshift seeded by the clock: jitter
/// needs spread, not cryptographic quality.
fn jitter_fraction() -> f64 {
    use std::cell::Cell;
    thread_local! {
        static STATE: Cell<u64> = Cell::new(
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0x9E37_79B9_7F4A_7C15)
                | 1,
        );
    }
    STATE.with(|s| {
        let mut x = s.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.set(x);
        (x >> 11) as f64 / (1u64 << 53) as f64
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_is_jittered_capped_and_defers_to_the_server() {
        let b = Backoff {
            base: Duration::from_millis(100),
            max: Duration::from_secs(2),
            max_server_delay: Duration::from_secs(10),
        };
        for retry in 1..=10u32 {
            let exp =
                (Duration::from_millis(100) * 2u32.pow(retry - 1)).min(Duration::from_secs(2));
            let d = b.delay(retry, None);
            assert!(d >= exp / 2 && d <= exp, "retry {retry}: {d:?} vs {exp:?}");
        }
        let spread: std::collections::HashSet<_> = (0..20).map(|_| b.delay(3, None)).collect();
        assert!(spread.len() > 1, "jitter spreads retries");
        assert_eq!(
            b.delay(1, Some(Duration::from_secs(3))),
            Duration::from_secs(3)
        );
        assert_eq!(
            b.delay(1, Some(Duration::from_secs(600))),
            Duration::from_secs(10)
        );
    }
}
