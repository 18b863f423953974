//! Retries that respect the upstream: which failures are worth another attempt, how long to
//! wait (the server's own word first, else exponential backoff with jitter), and a budget so a
//! failing upstream is not hammered.
//!
//! The loop and its tower layer are here; beside them, what the loop reads: the upstream's word
//! on when to come back (`headers`, which the rate gates also read to close for every caller at
//! once when the upstream says a credential is out of budget), the wait between attempts
//! (`backoff`) and the budget shared by every call (`budget`).

mod backoff;
mod budget;
mod headers;

use std::{sync::Arc, task::Poll, time::Duration};

use http::{HeaderMap, StatusCode};
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt};

use crate::{
    http::errors::ProxyError,
    metrics::Metrics,
    resilience::adaptive_limit::Signal,
    upstream::outbound::{Attempt, Below, BoxFuture, Call, Layered, Placed, Reply},
};

pub use self::headers::RateLimitHeaders;
use self::{backoff::Backoff, budget::RetryBudget, headers::RETRY_AFTER_MS};

/// Why an attempt failed, as far as retrying is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryReason {
    Connect,
    Timeout,
    /// The connection broke mid-exchange, or the reply was unusable.
    Io,
    Status(u16),
}

impl RetryReason {
    /// Retryable: connection failures, timeouts, and 408, 409, 429, 500, 502, 503, 504.
    pub fn of_status(status: StatusCode) -> Option<RetryReason> {
        matches!(status.as_u16(), 408 | 409 | 429 | 500 | 502 | 503 | 504)
            .then_some(RetryReason::Status(status.as_u16()))
    }

    /// Why an exchange with the upstream failed before any reply: the connection could not be
    /// made, or it broke afterwards.
    pub fn of_send_error(e: &hyper_util::client::legacy::Error) -> RetryReason {
        if e.is_connect() {
            RetryReason::Connect
        } else {
            RetryReason::Io
        }
    }

    /// Every label [`RetryReason::label`] gives, for the retry counter's series at 0.
    pub const LABELS: [&'static str; 11] = [
        "connect_error",
        "timeout",
        "io_error",
        "408",
        "409",
        "429",
        "500",
        "502",
        "503",
        "504",
        "other",
    ];

    /// A bounded metric label (also the upstream-outcome label for failed exchanges).
    pub fn label(self) -> &'static str {
        match self {
            RetryReason::Connect => "connect_error",
            RetryReason::Timeout => "timeout",
            RetryReason::Io => "io_error",
            RetryReason::Status(408) => "408",
            RetryReason::Status(409) => "409",
            RetryReason::Status(429) => "429",
            RetryReason::Status(500) => "500",
            RetryReason::Status(502) => "502",
            RetryReason::Status(503) => "503",
            RetryReason::Status(504) => "504",
            RetryReason::Status(_) => "other",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_transient_statuses_are_retried() {
        for s in [408, 409, 429, 500, 502, 503, 504] {
            assert!(RetryReason::of_status(StatusCode::from_u16(s).unwrap()).is_some());
        }
        for s in [200, 400, 401, 403, 404, 413, 422, 501] {
            assert!(RetryReason::of_status(StatusCode::from_u16(s).unwrap()).is_none());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The attempt loop

/// Whether another attempt could change the answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// 2xx: done.
    Success,
    /// An answer another attempt would not change (most 4xx).
    Final,
    /// Worth another attempt, after the server's delay if it named one.
    Retryable {
        reason: RetryReason,
        server_delay: Option<Duration>,
    },
}

/// What an attempt says about the upstream's health, for the circuit breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    Good,
    /// Connection errors, the upstream's own timeouts, broken exchanges, 5xx.
    Bad(crate::resilience::breaker::Failure),
    /// Answers about the request, not the upstream (4xx, 429 included), and attempts abandoned
    /// because their callers' deadlines passed.
    Neutral,
}

/// One attempt's result and how each layer judges it: the retry loop by its verdict, the
/// breaker by its health, the rate gate by its rate-limit headers, the learnt limit by its
/// signal.
pub struct Tried<T> {
    pub value: T,
    pub verdict: Verdict,
    pub health: Health,
    /// The reply's status and rate-limit headers, when there was a reply.
    pub rate_limit: Option<(StatusCode, RateLimitHeaders)>,
    /// What the attempt says about the upstream's load.
    pub signal: Signal,
    /// The size the attempt sent, when its exchange decided it (the engine sends only the
    /// inputs someone still waits for); else the attempt's own estimate stands.
    pub size: Option<u64>,
}

impl<T> Tried<T> {
    /// Judges a reply by its status and headers.
    pub fn reply(value: T, status: StatusCode, headers: &HeaderMap) -> Tried<T> {
        let rate_limit = RateLimitHeaders::parse(headers);
        let verdict = if status.is_success() {
            Verdict::Success
        } else if let Some(reason) = RetryReason::of_status(status) {
            Verdict::Retryable {
                reason,
                server_delay: rate_limit.closed_for(status).or(rate_limit.retry_after),
            }
        } else {
            Verdict::Final
        };
        let health = if status.is_server_error() {
            Health::Bad(crate::resilience::breaker::Failure::Upstream)
        } else if status.is_success() {
            Health::Good
        } else {
            Health::Neutral
        };
        Tried {
            value,
            verdict,
            health,
            signal: load_signal(status, &rate_limit),
            rate_limit: Some((status, rate_limit)),
            size: None,
        }
    }

    /// The same judgement of a value carrying more (say, the slot it held).
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Tried<U> {
        Tried {
            value: f(self.value),
            verdict: self.verdict,
            health: self.health,
            rate_limit: self.rate_limit,
            signal: self.signal,
            size: self.size,
        }
    }

    /// An answer embedcar makes without the upstream: final, and no news about the upstream.
    pub fn refused(value: T) -> Tried<T> {
        Tried {
            value,
            verdict: Verdict::Final,
            health: Health::Neutral,
            rate_limit: None,
            signal: Signal::Ignore,
            size: None,
        }
    }

    /// An exchange that produced no usable reply (connection error, the upstream's own
    /// timeout, broken body). A timeout says the upstream has too much; the rest are the
    /// breaker's business, not the learnt limit's.
    pub fn broken(value: T, reason: RetryReason) -> Tried<T> {
        let failure = match reason {
            RetryReason::Connect => crate::resilience::breaker::Failure::Connect,
            _ => crate::resilience::breaker::Failure::Upstream,
        };
        Tried {
            value,
            verdict: Verdict::Retryable {
                reason,
                server_delay: None,
            },
            health: Health::Bad(failure),
            rate_limit: None,
            signal: match reason {
                RetryReason::Timeout => Signal::Overloaded,
                _ => Signal::Ignore,
            },
            size: None,
        }
    }

    /// An attempt given up because every caller's deadline passed: nothing to retry, and no
    /// news about the upstream's health (slow is not broken); the learnt limit hears that it
    /// took at least this long.
    pub fn abandoned(value: T) -> Tried<T> {
        Tried {
            signal: Signal::Abandoned,
            ..Tried::refused(value)
        }
    }

    /// An attempt not sent, for want of callers with time to wait for it.
    pub fn not_sent(value: T) -> Tried<T> {
        Tried::refused(value)
    }
}

/// The learnt limit's view of a reply. A 429 that reports a credential's budget
/// (`x-ratelimit-remaining-*`) is about that tenant's quota, which its rate gate deals with, not
/// about the upstream's capacity: it must not shrink the limit every tenant shares. A 429
/// without one (text-embeddings-inference's "Model is overloaded") is about capacity.
fn load_signal(status: StatusCode, rate_limit: &RateLimitHeaders) -> Signal {
    match status.as_u16() {
        200..=299 => Signal::Answered,
        429 if rate_limit.remaining_requests.is_some() || rate_limit.remaining_tokens.is_some() => {
            Signal::Ignore
        }
        429 | 503 | 504 => Signal::Overloaded,
        _ => Signal::Ignore,
    }
}

/// The attempts the official clients make of a request on their own (one, then two retries):
/// embedcar tells a client not to retry (`x-should-retry: false`) only after making at least as
/// many itself, so that going through embedcar never leaves a caller with fewer attempts.
pub const CLIENT_ATTEMPTS: u32 = 3;

/// The loop's result: the last attempt's value, how many attempts were made, and whether it is
/// a retryable failure that embedcar retried at least as often as the client would have (then
/// the client should not retry it again).
pub struct Finished<T> {
    pub value: T,
    pub attempts: u32,
    pub gave_up: bool,
}

/// What the retry loop answers to besides each call's own deadline: the budget shared by every
/// upstream call, and the backoff.
pub struct RetryState {
    budget: RetryBudget,
    backoff: Backoff,
    max_attempts: u32,
    metrics: Arc<Metrics>,
}

/// The span of time the retry budget looks back over.
const BUDGET_WINDOW: Duration = Duration::from_secs(10);

/// Retry credit a single call may earn for its callers: a merged call of 2048 callers earns as
/// much as 64 direct calls would, so one huge call cannot buy unbounded retries.
const MAX_DEPOSIT_PER_CALL: u32 = 64;

impl RetryState {
    pub fn new(config: &crate::config::RetryConfig, metrics: Arc<Metrics>) -> RetryState {
        RetryState {
            budget: RetryBudget::new(
                BUDGET_WINDOW,
                config.budget_min_per_second,
                config.budget_ratio,
            ),
            backoff: Backoff {
                base: config.base_backoff,
                max: config.max_backoff,
                max_server_delay: config.max_server_delay,
            },
            max_attempts: config.max_attempts,
            metrics,
        }
    }

    /// `retry.max_attempts`: the pass-through's attempts per request.
    pub fn max_attempts(&self) -> u32 {
        self.max_attempts
    }

    /// The longest a server-requested delay is honoured (and a gate is shut for).
    pub fn max_server_delay(&self) -> Duration {
        self.backoff.max_server_delay
    }

    /// Makes attempts until one succeeds, fails for good, or may not be repeated (attempts,
    /// budget, deadline: a retry starts only if its delay and as long again as the last
    /// attempt took fit before the deadline). A refusal below (the gate, the breaker, no place) before a retry ends
    /// the loop with the last attempt's own answer.
    async fn run<S, R, T>(
        &self,
        inner: &S,
        mut call: Call<R>,
    ) -> Result<Finished<Placed<T>>, ProxyError>
    where
        S: Service<Attempt<R>, Response = Tried<Placed<T>>, Error = ProxyError> + Clone,
        T: Reply,
    {
        for _ in 0..call.callers.clamp(1, MAX_DEPOSIT_PER_CALL) {
            self.budget.deposit();
        }
        let deadline = |call: &Call<R>| match &call.live {
            Some(live) => live().unwrap_or_else(Instant::now),
            None => call.deadline,
        };
        let finished = |value, attempts: u32, retryable_failure: bool| Finished {
            value,
            attempts,
            gave_up: retryable_failure && attempts >= CLIENT_ATTEMPTS,
        };
        let mut previous: Option<Placed<T>> = None;
        let mut made = 0;
        loop {
            let Some(attempt) = (call.attempts)(made + 1) else {
                let nobody = ProxyError::Internal("every caller of this call left".into());
                let value = Placed {
                    value: T::abandoned(nobody),
                    slot: None,
                };
                return Ok(finished(value, made, false));
            };
            let sent = Instant::now();
            let tried = match inner.clone().oneshot(attempt).await {
                Ok(tried) => tried,
                Err(refused) => {
                    return previous.map_or(Err(refused), |v| Ok(finished(v, made, true)))
                }
            };
            // What the next attempt is likely to take: as long as this one did.
            let took = sent.elapsed();
            made += 1;
            let (reason, server_delay) = match tried.verdict {
                Verdict::Success | Verdict::Final => return Ok(finished(tried.value, made, false)),
                Verdict::Retryable {
                    reason,
                    server_delay,
                } => (reason, server_delay),
            };
            if !call.retryable {
                return Ok(finished(tried.value, made, false));
            }
            let delay = self.backoff.delay(made, server_delay);
            // A retry that would still be under way when its callers leave is not started:
            // it would cost the upstream a call, and turn the answer the callers could have
            // had (the upstream's own, marked final) into a timeout.
            let in_time = Instant::now() + delay + took < deadline(&call);
            let attempts_left = call.max_attempts.is_none_or(|max| made < max);
            if !attempts_left || !in_time {
                return Ok(finished(tried.value, made, true));
            }
            if !self.budget.withdraw() {
                self.metrics.resilience.retry_budget_exhausted.inc();
                return Ok(finished(tried.value, made, true));
            }
            self.metrics
                .resilience
                .retries
                .with_label_values(&[reason.label()])
                .inc();
            // Kept in case a refusal ends the loop, without the upstream slot it held: that
            // goes now, before the wait.
            let Placed { value, slot } = tried.value;
            drop(slot);
            previous = Some(Placed { value, slot: None });
            tokio::time::sleep(delay).await;
        }
    }
}

/// The retry loop as the stack's outermost layer.
#[derive(Clone)]
pub struct RetryLayer {
    state: Arc<RetryState>,
}

impl RetryLayer {
    pub fn new(state: Arc<RetryState>) -> Self {
        RetryLayer { state }
    }
}

impl<S> Layer<S> for RetryLayer {
    type Service = Retry<S>;
    fn layer(&self, inner: S) -> Retry<S> {
        Layered::new(self.clone(), inner)
    }
}

/// The retry layer's service.
pub type Retry<S> = Layered<RetryLayer, S>;

impl<S, R, T> Service<Call<R>> for Layered<RetryLayer, S>
where
    S: Below<R> + Service<Attempt<R>, Response = Tried<Placed<T>>>,
    R: Send + 'static,
    T: Reply,
{
    type Response = Finished<Placed<T>>;
    type Error = ProxyError;
    type Future = BoxFuture<Result<Finished<Placed<T>>, ProxyError>>;

    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> Poll<Result<(), ProxyError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, call: Call<R>) -> Self::Future {
        let shared = self.shared();
        Box::pin(async move {
            let (layer, inner) = &*shared;
            layer.state.run(inner, call).await
        })
    }
}

/// Marks a failure embedcar has already retried as far as it will: the official clients honour
/// `x-should-retry: false` and do not multiply the attempts.
///
/// embedcar's own error replies carry a Retry-After for clients that do retry them; beside
/// `x-should-retry: false` it would contradict it, so it goes. The upstream's own reply keeps
/// its headers as the upstream sent them.
pub fn mark_final(headers: &mut HeaderMap) {
    headers.insert("x-should-retry", http::HeaderValue::from_static("false"));
    if headers.contains_key(crate::http::errors::ERROR_HEADER) {
        headers.remove(http::header::RETRY_AFTER);
        headers.remove(RETRY_AFTER_MS);
    }
}

#[cfg(test)]
mod loop_tests {
    //! The retry loop inside the whole outbound stack, over an exchange that answers what each
    //! test says: the gate, the breaker and the places are the real ones.
    use super::*;
    use crate::upstream::outbound::{self, Kind, Parts};
    use std::sync::atomic::{AtomicU32, Ordering};

    impl Reply for u16 {
        fn error(_: ProxyError) -> u16 {
            0
        }
    }

    fn stack(tweak: impl FnOnce(&mut crate::config::Config)) -> Parts {
        let mut c = crate::config::Config::default();
        c.retry.base_backoff = Duration::from_millis(100);
        tweak(&mut c);
        Parts::new(&c, Arc::new(Metrics::new()))
    }

    /// What the tests vary of a call.
    struct Policy {
        deadline: Instant,
        retryable: bool,
        max_attempts: Option<u32>,
        callers: u32,
    }

    fn policy(p: &Parts, deadline: Instant, retryable: bool) -> Policy {
        Policy {
            deadline,
            retryable,
            max_attempts: Some(p.retry.max_attempts()),
            callers: 1,
        }
    }

    const KEY: crate::upstream::credential::CredentialId = [7; 32];

    /// One call down the stack; attempt `n` is answered `answer(n)`.
    async fn run(
        parts: &Parts,
        policy: Policy,
        answer: impl Fn(u32) -> Tried<u16> + Send + Sync + 'static,
    ) -> Result<Finished<u16>, ProxyError> {
        let answer = Arc::new(answer);
        let exchange = tower::service_fn(move |a: Attempt<u32>| {
            let tried = answer(a.request);
            async move { Ok::<_, ProxyError>(tried) }
        });
        let stack = outbound::build(exchange, parts);
        let call = Call {
            retryable: policy.retryable,
            max_attempts: policy.max_attempts,
            callers: policy.callers,
            ..one_call(
                policy.deadline,
                Kind::PassThrough { idempotent: true },
                None,
            )
        };
        let f = outbound::send(&stack, call).await?;
        Ok(Finished {
            value: f.value.value,
            attempts: f.attempts,
            gave_up: f.gave_up,
        })
    }

    fn reply(status: u16, headers: &[(&'static str, &'static str)]) -> Tried<u16> {
        let mut h = HeaderMap::new();
        for (k, v) in headers {
            h.insert(*k, http::HeaderValue::from_static(v));
        }
        Tried::reply(status, StatusCode::from_u16(status).unwrap(), &h)
    }

    fn counted(
        calls: &Arc<AtomicU32>,
        answer: impl Fn(u32) -> Tried<u16> + Send + Sync + 'static,
    ) -> impl Fn(u32) -> Tried<u16> + Send + Sync + 'static {
        let calls = calls.clone();
        move |n| {
            calls.fetch_add(1, Ordering::SeqCst);
            answer(n)
        }
    }

    #[tokio::test(start_paused = true)]
    async fn transient_failures_are_retried_until_success() {
        let p = stack(|_| {});
        let far = Instant::now() + Duration::from_secs(60);
        let calls = Arc::new(AtomicU32::new(0));
        let answer = |n| {
            if n < 3 {
                reply(503, &[])
            } else {
                reply(200, &[])
            }
        };
        let done = run(&p, policy(&p, far, true), counted(&calls, answer))
            .await
            .unwrap();
        assert_eq!(done.value, 200);
        assert!(!done.gave_up);
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn attempts_are_capped_and_the_last_failure_is_final() {
        let p = stack(|c| c.breaker.enabled = false);
        let far = Instant::now() + Duration::from_secs(60);
        let done = run(&p, policy(&p, far, true), |_| reply(502, &[]))
            .await
            .unwrap();
        assert_eq!(done.value, 502);
        assert!(done.gave_up);
        let done = run(&p, policy(&p, far, true), |_| reply(400, &[]))
            .await
            .unwrap();
        assert!(!done.gave_up, "a 400 is an answer, not a failure to retry");
    }

    #[tokio::test(start_paused = true)]
    async fn the_servers_delay_is_honoured_and_shuts_the_gate() {
        let p = stack(|_| {});
        let far = Instant::now() + Duration::from_secs(60);
        let start = Instant::now();
        let answer = |n| {
            if n == 1 {
                reply(429, &[("retry-after", "2")])
            } else {
                reply(200, &[])
            }
        };
        let done = run(&p, policy(&p, far, true), answer).await.unwrap();
        assert_eq!(done.value, 200);
        assert_eq!(Instant::now() - start, Duration::from_secs(2));
        assert!(p.gates.shut_until(&KEY).is_none(), "open again by now");
        assert!(
            !p.gates.wide_open(),
            "the upstream's word shut it meanwhile"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn no_retry_is_started_that_would_end_past_the_deadline() {
        let p = stack(|_| {});
        let soon = Instant::now() + Duration::from_secs(1);
        let done = run(&p, policy(&p, soon, true), |_| {
            reply(503, &[("retry-after", "5")])
        })
        .await
        .unwrap();
        assert!(
            !done.gave_up,
            "nothing was retried: the client keeps its own retry"
        );
        assert!(Instant::now() < soon);
    }

    #[tokio::test(start_paused = true)]
    async fn no_retry_is_started_that_would_still_be_under_way_at_the_deadline() {
        let p = stack(|c| c.breaker.enabled = false);
        // Each attempt takes 700 ms: after the first (at 0.7 s) and its backoff (about 0.1 s)
        // a second would end near 1.5 s, past the 1.2 s deadline.
        let deadline = Instant::now() + Duration::from_millis(1200);
        let calls = Arc::new(AtomicU32::new(0));
        let seen = calls.clone();
        let exchange = tower::service_fn(move |_: Attempt<u32>| {
            seen.fetch_add(1, Ordering::SeqCst);
            async {
                tokio::time::sleep(Duration::from_millis(700)).await;
                Ok::<_, ProxyError>(reply(503, &[]))
            }
        });
        let stack = outbound::build(exchange, &p);
        let call = Call {
            max_attempts: None,
            ..one_call(deadline, Kind::PassThrough { idempotent: true }, None)
        };
        let done = outbound::send(&stack, call).await.unwrap();
        assert_eq!(done.value.value, 503, "the upstream's own answer");
        assert_eq!(calls.load(Ordering::SeqCst), 1, "no second attempt");
        assert!(Instant::now() < deadline);
    }

    /// Up to 5 attempts against an upstream that answers 503 every time, with a breaker that
    /// opens once `min_calls` calls have all failed.
    async fn always_503_with_breaker_after(min_calls: u32) -> Finished<u16> {
        let p = stack(|c| {
            c.breaker.min_calls = min_calls;
            c.breaker.failure_rate = 1.0;
            c.retry.max_attempts = 5;
        });
        let far = Instant::now() + Duration::from_secs(60);
        run(&p, policy(&p, far, true), |_| reply(503, &[]))
            .await
            .expect("the upstream's own answer, not the breaker's")
    }

    #[tokio::test(start_paused = true)]
    async fn a_breaker_opening_mid_retries_ends_with_the_last_answer_marked_final() {
        let done = always_503_with_breaker_after(3).await;
        assert_eq!(done.value, 503);
        assert_eq!(done.attempts, 3);
        assert!(
            done.gave_up,
            "three attempts made: as many as the client's own"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_failure_after_fewer_attempts_than_the_clients_is_left_to_the_client() {
        let done = always_503_with_breaker_after(2).await;
        assert_eq!(done.attempts, 2);
        assert!(!done.gave_up, "the client's own retry is still due");
    }

    #[tokio::test(start_paused = true)]
    async fn without_an_attempt_cap_a_call_is_retried_until_its_deadline() {
        let p = stack(|c| c.breaker.enabled = false);
        let deadline = Instant::now() + Duration::from_secs(30);
        let calls = Arc::new(AtomicU32::new(0));
        let call = Policy {
            max_attempts: None,
            callers: 50,
            ..policy(&p, deadline, true)
        };
        let done = run(&p, call, counted(&calls, |_| reply(503, &[])))
            .await
            .unwrap();
        assert!(done.gave_up);
        assert!(Instant::now() < deadline);
        let n = calls.load(Ordering::SeqCst);
        assert!(n >= 6, "only {n} attempts in 30 s");
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_cannot_be_resent_gets_one_attempt() {
        let p = stack(|_| {});
        let far = Instant::now() + Duration::from_secs(60);
        let calls = Arc::new(AtomicU32::new(0));
        let done = run(
            &p,
            policy(&p, far, false),
            counted(&calls, |_| reply(503, &[])),
        )
        .await
        .unwrap();
        assert!(!done.gave_up, "the caller may still retry it");
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_upstream_exhausts_the_budget_and_opens_the_breaker() {
        let p = stack(|c| {
            c.retry.budget_min_per_second = 1;
            c.retry.budget_ratio = 0.0;
            c.retry.max_attempts = 10;
            c.retry.base_backoff = Duration::from_millis(1);
            c.retry.max_backoff = Duration::from_millis(1);
            c.breaker.enabled = false;
        });
        let far = Instant::now() + Duration::from_secs(600);
        let calls = Arc::new(AtomicU32::new(0));
        for _ in 0..5 {
            run(
                &p,
                policy(&p, far, true),
                counted(&calls, |_| reply(500, &[])),
            )
            .await
            .unwrap();
        }
        // 5 first attempts plus at most the floor's worth of retries (1/s over the 10 s window),
        // not the 50 that 10 attempts each would make.
        let n = calls.load(Ordering::SeqCst);
        assert!((6..=16).contains(&n), "{n} attempts");

        let p = stack(|c| {
            c.breaker.min_calls = 3;
            c.breaker.failure_rate = 1.0;
            c.retry.max_attempts = 1;
        });
        for _ in 0..3 {
            run(&p, policy(&p, far, true), |_| reply(500, &[]))
                .await
                .unwrap();
        }
        let refused = run(&p, policy(&p, far, true), |_| reply(200, &[]))
            .await
            .err()
            .expect("the breaker is open");
        assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
    }

    #[tokio::test(start_paused = true)]
    async fn an_attempt_past_the_upstreams_own_time_is_cut_and_retried() {
        let p = stack(|c| c.upstream.first_byte_timeout = Duration::from_secs(5));
        let far = Instant::now() + Duration::from_secs(60);
        let started = Instant::now();
        let answer = |n: u32| async move {
            if n == 1 {
                std::future::pending::<()>().await;
            }
            reply(200, &[])
        };
        let exchange = tower::service_fn(move |a: Attempt<u32>| async move {
            Ok::<_, ProxyError>(answer(a.request).await)
        });
        let stack = outbound::build(exchange, &p);
        let call = one_call(far, Kind::PassThrough { idempotent: true }, None);
        let done = outbound::send(&stack, call).await.unwrap();
        assert_eq!(done.value.value, 200);
        assert_eq!(done.attempts, 2);
        assert!(started.elapsed() >= Duration::from_secs(5));
        assert!(started.elapsed() < Duration::from_secs(7));
    }

    /// A call of `kind` whose attempts carry their number to the exchange.
    fn one_call(deadline: Instant, kind: Kind, live: Option<outbound::LiveDeadline>) -> Call<u32> {
        let answer_by = live.as_ref().and_then(|l| l());
        let attempt_live = live.clone();
        let attempts = move |n| {
            Some(Attempt {
                request: n,
                kind,
                route: crate::http::route::Route::Other,
                credential: KEY,
                tokens: 1,
                deadline,
                answer_by,
                live: attempt_live.clone(),
                places: None,
                head: Default::default(),
            })
        };
        Call {
            attempts: Box::new(attempts),
            deadline,
            retryable: true,
            max_attempts: Some(3),
            callers: 1,
            live,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_sitting_out_a_backoff_holds_no_slot() {
        let p = stack(|c| c.limits.max_concurrency = 1);
        let far = Instant::now() + Duration::from_secs(60);
        // The upstream asks the first exchange ever to come back in 2 s, and answers the rest.
        let exchanges = Arc::new(AtomicU32::new(0));
        let exchange = tower::service_fn(move |_: Attempt<u32>| {
            let n = exchanges.fetch_add(1, Ordering::SeqCst);
            async move {
                Ok::<_, ProxyError>(match n {
                    0 => reply(503, &[("retry-after", "2")]),
                    _ => reply(200, &[]),
                })
            }
        });
        let stack = outbound::build(exchange, &p);
        let started = Instant::now();
        let pass_through = Kind::PassThrough { idempotent: true };
        let first = tokio::spawn(outbound::send(&stack, one_call(far, pass_through, None)));
        tokio::time::sleep(Duration::from_millis(100)).await;
        // The first call waits out its 2 s; the only slot is free for this one meanwhile.
        let second = outbound::send(&stack, one_call(far, pass_through, None))
            .await
            .unwrap();
        assert_eq!(second.value.value, 200);
        assert!(started.elapsed() < Duration::from_secs(1));
        // A passed-through answer holds its slot until its body is read: this one is, now.
        drop(second);
        let first = first.await.unwrap().unwrap();
        assert_eq!(first.value.value, 200);
        assert_eq!(first.attempts, 2);
        assert_eq!(started.elapsed(), Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn no_slot_for_a_retry_ends_the_call_with_its_last_answer() {
        let p = stack(|c| {
            c.limits.max_concurrency = 1;
            c.limits.max_waiting_requests = 0;
        });
        let far = Instant::now() + Duration::from_secs(60);
        let exchange = tower::service_fn(|_: Attempt<u32>| async move {
            Ok::<_, ProxyError>(reply(503, &[("retry-after", "1")]))
        });
        let stack = outbound::build(exchange, &p);
        let call = tokio::spawn(outbound::send(
            &stack,
            one_call(far, Kind::PassThrough { idempotent: true }, None),
        ));
        tokio::time::sleep(Duration::from_millis(100)).await;
        // Someone else holds the only slot when the retry comes, and nobody may wait for it.
        let _held = p.capacity.ceiling.acquire(None).await.unwrap();
        let done = call.await.unwrap().expect("the upstream's own answer");
        assert_eq!(done.value.value, 503);
        assert_eq!(done.attempts, 1);
        assert!(
            !done.gave_up,
            "fewer attempts than the client's own: its retry is due"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_engine_attempt_waits_on_for_a_caller_who_joined_with_more_time() {
        let p = stack(|_| {});
        let start = Instant::now();
        let exchange = tower::service_fn(|_: Attempt<u32>| async move {
            tokio::time::sleep(Duration::from_secs(3)).await;
            Ok::<_, ProxyError>(reply(200, &[]))
        });
        let stack = outbound::build(exchange, &p);
        // The first caller has 1 s; a second one with 5 s joins at 0.5 s.
        let joined = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let live: outbound::LiveDeadline = {
            let joined = joined.clone();
            Arc::new(move || {
                let far = joined.load(Ordering::SeqCst);
                Some(start + Duration::from_secs(if far { 5 } else { 1 }))
            })
        };
        let call = tokio::spawn(outbound::send(
            &stack,
            one_call(start + Duration::from_secs(1), Kind::Engine, Some(live)),
        ));
        tokio::time::sleep(Duration::from_millis(500)).await;
        joined.store(true, Ordering::SeqCst);
        let done = call.await.unwrap().unwrap();
        assert_eq!(
            done.value.value, 200,
            "not abandoned at the first caller's deadline"
        );
        assert_eq!(done.attempts, 1);
        assert_eq!(start.elapsed(), Duration::from_secs(3));
    }

    #[tokio::test(start_paused = true)]
    async fn an_engine_attempt_nobody_waits_for_is_not_sent() {
        let p = stack(|_| {});
        let sent = Arc::new(AtomicU32::new(0));
        let exchange = {
            let sent = sent.clone();
            tower::service_fn(move |_: Attempt<u32>| {
                sent.fetch_add(1, Ordering::SeqCst);
                async { Ok::<_, ProxyError>(reply(200, &[])) }
            })
        };
        let stack = outbound::build(exchange, &p);
        let far = Instant::now() + Duration::from_secs(60);
        let nobody: outbound::LiveDeadline = Arc::new(|| None);
        // Whoever the call was made for has left.
        let call = one_call(far, Kind::Engine, Some(nobody));
        let done = outbound::send(&stack, call).await.unwrap();
        assert_eq!(done.value.value, 0);
        assert_eq!(sent.load(Ordering::SeqCst), 0);
    }
}
