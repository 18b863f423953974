//! The circuit breaker for the upstream: after consecutive failures (connection errors, 5xx,
//! timeouts) it opens and embedcar answers at once with 503 + Retry-After instead of queueing
//! callers behind an upstream that is down; after a cool-down it lets one probe through, and a
//! successful probe closes it again.
//!
//! 4xx replies (429 included) are answers, not failures: the rate gates handle 429.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::time::Instant;

use crate::{errors::ProxyError, metrics::Metrics};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Closed {
        failures: u32,
    },
    Open {
        until: Instant,
    },
    /// Cool-down over: one probe is (or may be) in flight; everyone else is still refused.
    HalfOpen {
        probing: bool,
    },
}

pub struct CircuitBreaker {
    state: Mutex<State>,
    threshold: u32,
    cooldown: Duration,
    metrics: Arc<Metrics>,
}

/// Leave to make one upstream attempt. Report how it went with [`Pass::succeeded`] or
/// [`Pass::failed`]; a pass dropped without a report (the caller left) frees a probe slot
/// without judging the upstream.
pub struct Pass<'a> {
    breaker: &'a CircuitBreaker,
    probe: bool,
    reported: bool,
}

impl Pass<'_> {
    pub fn succeeded(mut self) {
        self.reported = true;
        self.breaker.on_result(self.probe, true);
    }

    pub fn failed(mut self) {
        self.reported = true;
        self.breaker.on_result(self.probe, false);
    }

    /// An outcome that says nothing about the upstream's health (a 4xx, a caller that left).
    pub fn neutral(mut self) {
        self.reported = true;
        if self.probe {
            self.breaker.release_probe();
        }
    }
}

impl Drop for Pass<'_> {
    fn drop(&mut self) {
        if !self.reported && self.probe {
            self.breaker.release_probe();
        }
    }
}

impl CircuitBreaker {
    pub fn new(threshold: u32, cooldown: Duration, metrics: Arc<Metrics>) -> Self {
        let b = CircuitBreaker {
            state: Mutex::new(State::Closed { failures: 0 }),
            threshold: threshold.max(1),
            cooldown,
            metrics,
        };
        b.metrics.breaker_state.set(0);
        b
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Lets an attempt through, or refuses it with 503 + Retry-After while open.
    pub fn admit(&self) -> Result<Pass<'_>, ProxyError> {
        let mut state = self.lock();
        let now = Instant::now();
        let probe = match *state {
            State::Closed { .. } => false,
            State::Open { until } if now >= until => {
                self.transition(&mut state, State::HalfOpen { probing: true });
                true
            }
            State::Open { until } => {
                return Err(ProxyError::CircuitOpen {
                    retry_after: until - now,
                })
            }
            State::HalfOpen { probing: false } => {
                *state = State::HalfOpen { probing: true };
                true
            }
            State::HalfOpen { probing: true } => {
                return Err(ProxyError::CircuitOpen {
                    retry_after: self.cooldown,
                })
            }
        };
        Ok(Pass {
            breaker: self,
            probe,
            reported: false,
        })
    }

    fn on_result(&self, probe: bool, ok: bool) {
        let mut state = self.lock();
        match (*state, ok) {
            (State::Closed { .. }, true) => *state = State::Closed { failures: 0 },
            (State::Closed { failures }, false) => {
                let failures = failures + 1;
                if failures >= self.threshold {
                    let until = Instant::now() + self.cooldown;
                    self.transition(&mut state, State::Open { until });
                } else {
                    *state = State::Closed { failures };
                }
            }
            (State::HalfOpen { .. }, true) if probe => {
                self.transition(&mut state, State::Closed { failures: 0 })
            }
            (State::HalfOpen { .. }, false) if probe => {
                let until = Instant::now() + self.cooldown;
                self.transition(&mut state, State::Open { until });
            }
            // A late result of an attempt admitted before the breaker opened: it neither
            // reopens nor closes what has moved on.
            _ => {}
        }
    }

    fn release_probe(&self) {
        let mut state = self.lock();
        if let State::HalfOpen { probing: true } = *state {
            *state = State::HalfOpen { probing: false };
        }
    }

    fn transition(&self, state: &mut State, to: State) {
        let (label, gauge) = match to {
            State::Closed { .. } => ("closed", 0),
            State::Open { .. } => ("open", 1),
            State::HalfOpen { .. } => ("half_open", 2),
        };
        tracing::warn!(to = label, "upstream circuit breaker");
        self.metrics.breaker_state.set(gauge);
        self.metrics
            .breaker_transitions
            .with_label_values(&[label])
            .inc();
        *state = to;
    }

    /// Whether the breaker refuses attempts now (for tests and metrics).
    pub fn is_open(&self) -> bool {
        !matches!(*self.lock(), State::Closed { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker() -> CircuitBreaker {
        CircuitBreaker::new(3, Duration::from_secs(5), Arc::new(Metrics::new()))
    }

    #[tokio::test(start_paused = true)]
    async fn opens_after_consecutive_failures_probes_after_the_cooldown_and_closes_on_success() {
        let b = breaker();
        b.admit().unwrap().failed();
        b.admit().unwrap().failed();
        b.admit().unwrap().succeeded(); // a success resets the count
        for _ in 0..3 {
            b.admit().unwrap().failed();
        }
        let refused = b.admit().err().expect("open");
        assert_eq!(refused.status(), http::StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(refused.retry_after(), Some(Duration::from_secs(5)));

        tokio::time::sleep(Duration::from_secs(5)).await;
        let probe = b.admit().expect("a probe after the cool-down");
        assert!(b.admit().is_err(), "only one probe at a time");
        probe.succeeded();
        assert!(!b.is_open());
        b.admit().unwrap().succeeded();
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_probe_reopens_and_an_abandoned_probe_frees_its_slot() {
        let b = breaker();
        for _ in 0..3 {
            b.admit().unwrap().failed();
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
        b.admit().unwrap().failed();
        assert!(b.admit().is_err(), "open again");
        tokio::time::sleep(Duration::from_secs(5)).await;
        drop(b.admit().unwrap());
        let again = b.admit().expect("the abandoned probe's slot is free");
        again.neutral();
        assert!(b.is_open(), "a neutral probe decides nothing");
    }
}
