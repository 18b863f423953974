//! How many retries the upstream may be asked for: a budget shared by every call, so a failing
//! upstream is not hammered.

use std::time::Duration;

use tower::retry::budget::{Budget, TpsBudget};

/// A retry budget shared by every upstream call: retries may add at most `ratio` of the recent
/// request rate, plus `min_per_sec` so that a quiet proxy can still retry. When the upstream
/// fails as a whole, the budget runs out and failures go back to the callers instead of
/// multiplying. (tower's token-bucket budget, as in Linkerd and Finagle.)
pub struct RetryBudget {
    inner: TpsBudget,
}

impl RetryBudget {
    pub fn new(ttl: Duration, min_per_sec: u32, ratio: f32) -> RetryBudget {
        RetryBudget {
            inner: TpsBudget::new(ttl, min_per_sec, ratio),
        }
    }

    /// Record a first attempt (it earns retry credit).
    pub fn deposit(&self) {
        self.inner.deposit();
    }

    /// Take credit for one retry, if there is any.
    pub fn withdraw(&self) -> bool {
        self.inner.withdraw()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_budget_allows_a_share_of_recent_requests_plus_a_floor() {
        let budget = RetryBudget::new(Duration::from_secs(10), 1, 0.2);
        // No traffic: only the floor (min_per_sec over the ttl).
        let floor = (0..100).take_while(|_| budget.withdraw()).count();
        assert!((5..=10).contains(&floor), "floor {floor}");
        // 100 requests earn about 20 more retries.
        for _ in 0..100 {
            budget.deposit();
        }
        let earned = (0..100).take_while(|_| budget.withdraw()).count();
        assert!((15..=25).contains(&earned), "earned {earned}");
        assert!(!budget.withdraw(), "spent");
        // Credit returns with time.
        tokio::time::sleep(Duration::from_secs(11)).await;
        assert!(budget.withdraw());
    }
}
