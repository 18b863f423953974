//! Rate gates per upstream credential: requests per minute and tokens per minute (governor's
//! GCRA, tokens as cells), and the upstream's own word: a 429, or a rate-limit header at zero,
//! shuts the credential's gate until the reset for every caller at once, so one caller's 429
//! does not become a hundred.
//!
//! With the shared tier (`src/shared_tier.rs`) the gates are global: a call that the local
//! gates let through also asks Redis' gate, which all replicas share, and a closure seen here is
//! published to every replica. The local gates stay the first step, so Redis is asked only when
//! the local view allows; while Redis cannot be asked, a local gate with the budget divided by
//! the replicas last seen stands in for the global one.
//!
//! Waiting at a gate counts against the caller's deadline. A caller who could not get through
//! before its deadline is told so at once (429 with Retry-After), not after waiting for nothing.

use std::{
    collections::HashMap,
    future::Future,
    num::NonZeroU32,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
        Arc, Mutex, OnceLock,
    },
    task::{ready, Context, Poll},
    time::Duration,
};

use pin_project_lite::pin_project;

use governor::{
    clock::Clock, middleware::NoOpMiddleware, state::keyed::DashMapStateStore, Quota, RateLimiter,
};
use tokio::time::Instant;

use http::StatusCode;

use crate::{
    http::errors::ProxyError,
    metrics::Metrics,
    resilience::{
        adaptive_limit::Signal,
        retry::{RateLimitHeaders, Tried},
    },
    shared_tier::{GateAnswer, GateLimits, SharedTier},
    upstream::{
        credential::CredentialId,
        outbound::{Attempt, Below, BoxFuture, Layered},
    },
};

/// governor's clock on tokio's time, so that gates follow tokio's paused clock in tests and
/// share one notion of "now" with the deadlines they are weighed against.
#[derive(Clone)]
pub struct TokioClock {
    origin: Instant,
}

impl Clock for TokioClock {
    type Instant = Duration;
    fn now(&self) -> Duration {
        Instant::now().saturating_duration_since(self.origin)
    }
}

/// A credential's waiting line.
#[derive(Default)]
struct Line {
    turn: tokio::sync::Mutex<()>,
    waiting: AtomicU32,
}

/// Leaves the line however the wait ends.
struct InLine<'a>(&'a Line);

impl Drop for InLine<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Lines are swept of idle credentials once there are this many.
const LINES_BEFORE_SWEEP: usize = 1024;

/// How often the gates forget credentials they no longer need to remember (a full bucket
/// looks the same as none, a closure past its end is over). Every distinct `Authorization`
/// value leaves state behind, so without a sweep a proxy serving many short-lived keys would
/// grow for ever; a sweep walks every credential held, so not more often than this.
const SWEEP_INTERVAL: Duration = Duration::from_secs(10);

type Limiter = RateLimiter<
    CredentialId,
    DashMapStateStore<CredentialId>,
    TokioClock,
    NoOpMiddleware<Duration>,
>;

/// A budget of requests and tokens per minute (either may be absent: no limit of that kind).
struct Budget {
    requests: Option<Limiter>,
    tokens: Option<(Limiter, NonZeroU32)>,
}

impl Budget {
    fn new(requests_per_minute: u32, tokens_per_minute: u32, clock: &TokioClock) -> Budget {
        let limiter = |per_minute: u32| {
            NonZeroU32::new(per_minute).map(|n| {
                (
                    RateLimiter::dashmap_with_clock(Quota::per_minute(n), clock.clone()),
                    n,
                )
            })
        };
        Budget {
            requests: limiter(requests_per_minute).map(|(l, _)| l),
            tokens: limiter(tokens_per_minute),
        }
    }

    fn limiters(&self) -> impl Iterator<Item = &Limiter> {
        [self.requests.as_ref(), self.tokens.as_ref().map(|(l, _)| l)]
            .into_iter()
            .flatten()
    }

    /// How long until `credential` may send `tokens` more tokens; `None` when it may go now
    /// (and then the request and its tokens are counted).
    ///
    /// The request cell is taken first and only once per caller (`request_spent` remembers
    /// it): governor cannot look without taking, and a cell taken while the tokens then say
    /// wait stays this caller's, rather than being spent again on every look while it waits.
    fn wait(
        &self,
        clock: &TokioClock,
        credential: &CredentialId,
        tokens: u64,
        request_spent: &mut bool,
    ) -> Option<Duration> {
        let now = clock.now();
        if let (Some(limiter), false) = (&self.requests, *request_spent) {
            if let Err(not_until) = limiter.check_key(credential) {
                return Some(not_until.wait_time_from(now));
            }
            *request_spent = true;
        }
        if let Some((limiter, burst)) = &self.tokens {
            // A call larger than a whole minute's budget could never pass; let it go as a
            // full minute's worth.
            let cells = u32::try_from(tokens)
                .unwrap_or(u32::MAX)
                .clamp(1, burst.get());
            let cells = NonZeroU32::new(cells).unwrap_or(NonZeroU32::MIN);
            match limiter.check_key_n(credential, cells) {
                Ok(Ok(())) => {}
                Ok(Err(not_until)) => return Some(not_until.wait_time_from(now)),
                Err(_) => return Some(Duration::from_secs(60)),
            }
        }
        None
    }
}

pub struct RateGates {
    clock: TokioClock,
    /// This replica's view: the whole budget (the global gate, if any, comes after it).
    local: Budget,
    requests_per_minute: u32,
    tokens_per_minute: u32,
    /// The global gate, once attached (`attach_shared`).
    shared: OnceLock<Arc<SharedTier>>,
    /// The stand-in for the global gate while Redis cannot be asked: the budget divided by
    /// the replicas last seen (their count, and the budget made for it).
    fallback: Mutex<Option<(u32, Arc<Budget>)>>,
    /// Gates the upstream shut, until when.
    shut: Mutex<HashMap<CredentialId, Instant>>,
    /// Callers waiting at each credential's gate, served in arrival order: the tokio mutex is
    /// fair, and the count lets a newcomer see at once how long its turn will take.
    lines: Mutex<HashMap<CredentialId, Arc<Line>>>,
    /// One cell's interval of each kind: 60 s / per-minute limit.
    request_interval: Option<Duration>,
    token_interval: Option<Duration>,
    /// Whether any gate was ever shut: until then, with no limits configured, every request
    /// passes without a look at its credential (a fingerprint and a lock saved per request).
    ever_shut: AtomicBool,
    /// When the next sweep is due, in nanoseconds on `clock`: one atomic read per request
    /// tells whether it is.
    next_sweep: AtomicU64,
    metrics: Arc<Metrics>,
}

impl RateGates {
    /// `requests_per_minute` / `tokens_per_minute` of 0 mean no limit of that kind.
    pub fn new(requests_per_minute: u32, tokens_per_minute: u32, metrics: Arc<Metrics>) -> Self {
        let clock = TokioClock {
            origin: Instant::now(),
        };
        RateGates {
            local: Budget::new(requests_per_minute, tokens_per_minute, &clock),
            requests_per_minute,
            tokens_per_minute,
            shared: OnceLock::new(),
            fallback: Mutex::new(None),
            clock,
            shut: Mutex::new(HashMap::new()),
            lines: Mutex::new(HashMap::new()),
            request_interval: NonZeroU32::new(requests_per_minute)
                .map(|n| Duration::from_secs(60) / n.get()),
            token_interval: NonZeroU32::new(tokens_per_minute)
                .map(|n| Duration::from_secs(60) / n.get()),
            ever_shut: AtomicBool::new(false),
            next_sweep: AtomicU64::new(nanos(SWEEP_INTERVAL)),
            metrics,
        }
    }

    /// Forgets what no longer holds anyone back, once per `SWEEP_INTERVAL`: the one caller that
    /// finds a sweep due does it, the others go on.
    fn sweep_if_due(&self) {
        let now = nanos(self.clock.now());
        let due = self.next_sweep.load(Ordering::Relaxed);
        if now < due
            || self
                .next_sweep
                .compare_exchange(
                    due,
                    now.saturating_add(nanos(SWEEP_INTERVAL)),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_err()
        {
            return;
        }
        let fallback = self
            .fallback
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|(_, b)| b.clone());
        for limiter in self
            .local
            .limiters()
            .chain(fallback.iter().flat_map(|b| b.limiters()))
        {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
        let instant = Instant::now();
        let mut shut = self.shut.lock().unwrap_or_else(|p| p.into_inner());
        shut.retain(|_, t| *t > instant);
        shut.shrink_to_fit();
        drop(shut);
        let mut lines = self.lines.lock().unwrap_or_else(|p| p.into_inner());
        lines.retain(|_, l| Arc::strong_count(l) > 1);
        lines.shrink_to_fit();
    }

    /// Makes the gates global: from now on a call asks the shared tier's gate too (after the
    /// local one), and closures are published to every replica. Once only.
    pub fn attach_shared(&self, tier: Arc<SharedTier>) {
        if tier.shares_gates {
            let _ = self.shared.set(tier);
        }
    }

    /// Shuts `credential`'s gate for `for_` (from a 429 or a budget at zero), here and (with the
    /// shared tier) on every replica. A later, shorter closure does not reopen a longer one.
    pub fn shut(&self, credential: &CredentialId, for_: Duration) {
        if let Some(tier) = self.shared.get() {
            tier.publish_shut(credential, for_);
        }
        self.metrics.resilience.gate_closures.inc();
        self.shut_here(credential, for_);
    }

    /// Shuts `credential`'s gate on this replica only.
    fn shut_here(&self, credential: &CredentialId, for_: Duration) {
        let until = Instant::now() + for_;
        self.ever_shut.store(true, Ordering::Relaxed);
        let mut shut = self.shut.lock().unwrap_or_else(|p| p.into_inner());
        let entry = shut.entry(*credential).or_insert(until);
        if *entry < until {
            *entry = until;
        }
        // Forget closures long past, so the map holds only live ones.
        let now = Instant::now();
        shut.retain(|_, t| *t > now);
    }

    /// When `credential`'s gate opens again, if the upstream shut it.
    pub fn shut_until(&self, credential: &CredentialId) -> Option<Instant> {
        if !self.ever_shut.load(Ordering::Relaxed) {
            return None;
        }
        let shut = self.shut.lock().unwrap_or_else(|p| p.into_inner());
        shut.get(credential)
            .copied()
            .filter(|t| *t > Instant::now())
    }

    /// Whether every request passes: no limits configured, no gate ever shut, and no global
    /// gate (another replica's closure could hold this one's calls).
    pub fn wide_open(&self) -> bool {
        self.local.requests.is_none()
            && self.local.tokens.is_none()
            && !self.ever_shut.load(Ordering::Relaxed)
            && self.shared.get().is_none()
    }

    /// Passes one request of `tokens` tokens for `credential`, waiting as needed, but never
    /// past `deadline`: the local gates first, then (with the shared tier) the global gate, or
    /// while Redis cannot be asked, the local stand-in with a divided budget.
    pub async fn pass(
        &self,
        credential: &CredentialId,
        tokens: u64,
        deadline: Instant,
    ) -> Result<(), ProxyError> {
        self.pass_local(credential, tokens, deadline).await?;
        let Some(tier) = self.shared.get() else {
            return Ok(());
        };
        let started = Instant::now();
        let limits = GateLimits::per_minute(self.requests_per_minute, self.tokens_per_minute);
        loop {
            match tier.gate(credential, limits, tokens).await {
                Some(GateAnswer::Go) => {
                    let waited = started.elapsed();
                    if !waited.is_zero() {
                        self.metrics
                            .resilience
                            .gate_wait
                            .observe(waited.as_secs_f64());
                    }
                    return Ok(());
                }
                Some(GateAnswer::Wait { wait, closed }) => {
                    if closed {
                        // Another replica saw the 429: the lanes here hold their calls too.
                        self.ever_shut.store(true, Ordering::Relaxed);
                        self.shut_here(credential, wait);
                    }
                    if Instant::now() + wait > deadline {
                        return Err(self.refuse(wait));
                    }
                    tokio::time::sleep(wait).await;
                }
                None => return self.pass_fallback(credential, tokens, deadline).await,
            }
        }
    }

    /// The global gate's stand-in: this replica's share of the budget.
    async fn pass_fallback(
        &self,
        credential: &CredentialId,
        tokens: u64,
        deadline: Instant,
    ) -> Result<(), ProxyError> {
        let Some(budget) = self.fallback_budget() else {
            return Ok(());
        };
        let mut request_spent = false;
        loop {
            match budget.wait(&self.clock, credential, tokens, &mut request_spent) {
                None => return Ok(()),
                Some(wait) if Instant::now() + wait > deadline => return Err(self.refuse(wait)),
                Some(wait) => tokio::time::sleep(wait).await,
            }
        }
    }

    /// The budget divided by the replicas last seen, made anew when their count changes;
    /// `None` without limits.
    fn fallback_budget(&self) -> Option<Arc<Budget>> {
        if self.requests_per_minute == 0 && self.tokens_per_minute == 0 {
            return None;
        }
        let replicas = self.shared.get().map_or(1, |t| t.replicas());
        let mut fallback = self.fallback.lock().unwrap_or_else(|p| p.into_inner());
        match &*fallback {
            Some((n, budget)) if *n == replicas => Some(budget.clone()),
            _ => {
                let share = |per_minute: u32| match per_minute {
                    0 => 0,
                    n => (n / replicas).max(1),
                };
                let budget = Arc::new(Budget::new(
                    share(self.requests_per_minute),
                    share(self.tokens_per_minute),
                    &self.clock,
                ));
                *fallback = Some((replicas, budget.clone()));
                Some(budget)
            }
        }
    }

    /// The local gates: waiting callers line up in arrival order; a newcomer whose turn would
    /// come after its deadline (the wait at the head of the line, plus one interval per caller
    /// ahead) is refused at once with 429, not after waiting for nothing.
    async fn pass_local(
        &self,
        credential: &CredentialId,
        tokens: u64,
        deadline: Instant,
    ) -> Result<(), ProxyError> {
        let started = Instant::now();
        self.sweep_if_due();
        let line = self.line(credential);
        let ahead = line.waiting.fetch_add(1, Ordering::AcqRel);
        let _in_line = InLine(&line);
        // Whether this caller's request cell is spent already: a wait for tokens must not
        // spend another one on every look.
        let mut request_spent = false;
        if ahead == 0 {
            if let Some(wait) = self.wait(credential, tokens, &mut request_spent) {
                if started + wait > deadline {
                    return Err(self.refuse(wait));
                }
            } else {
                return Ok(());
            }
        } else {
            // Others are in line, but if none of them is waiting for its turn (a burst passing
            // through at once) and the gate has room now, go: the estimate below assumes an
            // empty bucket, and would turn callers away while the burst's quota sits unused.
            // Holding the turn while checking keeps arrival order: a caller already waiting
            // for room holds it, and then nobody passes it.
            if let Ok(_turn) = line.turn.try_lock() {
                if self.wait(credential, tokens, &mut request_spent).is_none() {
                    return Ok(());
                }
            }
            let estimate = self.head_wait(credential) + self.interval(tokens) * ahead;
            if started + estimate > deadline {
                return Err(self.refuse(estimate));
            }
        }
        let _turn = line.turn.lock().await;
        loop {
            let now = Instant::now();
            match self.wait(credential, tokens, &mut request_spent) {
                None => {
                    self.metrics
                        .resilience
                        .gate_wait
                        .observe(now.duration_since(started).as_secs_f64());
                    return Ok(());
                }
                Some(wait) if now + wait > deadline => return Err(self.refuse(wait)),
                Some(wait) => tokio::time::sleep(wait).await,
            }
        }
    }

    /// Credentials held now: by the request limiter, the token limiter, the closures and the
    /// lines.
    #[cfg(test)]
    fn held(&self) -> (usize, usize, usize, usize) {
        (
            self.local.requests.as_ref().map_or(0, |l| l.len()),
            self.local.tokens.as_ref().map_or(0, |(l, _)| l.len()),
            self.shut.lock().unwrap_or_else(|p| p.into_inner()).len(),
            self.lines.lock().unwrap_or_else(|p| p.into_inner()).len(),
        )
    }

    fn refuse(&self, retry_after: Duration) -> ProxyError {
        self.metrics.resilience.gate_rejections.inc();
        ProxyError::RateLimited { retry_after }
    }

    fn line(&self, credential: &CredentialId) -> Arc<Line> {
        let mut lines = self.lines.lock().unwrap_or_else(|p| p.into_inner());
        if lines.len() > LINES_BEFORE_SWEEP {
            lines.retain(|_, l| Arc::strong_count(l) > 1);
        }
        lines.entry(*credential).or_default().clone()
    }

    /// One caller's share of the gate: a request interval, or its tokens' worth, whichever is
    /// longer.
    fn interval(&self, tokens: u64) -> Duration {
        let requests = self.request_interval.unwrap_or(Duration::ZERO);
        let tokens = self.token_interval.map_or(Duration::ZERO, |t| {
            t.saturating_mul(tokens.min(u32::MAX as u64) as u32)
        });
        requests.max(tokens)
    }

    /// How long the head of the line still has to wait, at most: the upstream's closure, or one
    /// interval.
    fn head_wait(&self, credential: &CredentialId) -> Duration {
        let shut = self.shut_until(credential).map_or(Duration::ZERO, |t| {
            t.saturating_duration_since(Instant::now())
        });
        shut.max(self.request_interval.unwrap_or(Duration::ZERO))
    }

    /// How long until `credential` may send `tokens` more tokens now (the upstream's closure,
    /// then the local budget); `None` when it may go now.
    fn wait(
        &self,
        credential: &CredentialId,
        tokens: u64,
        request_spent: &mut bool,
    ) -> Option<Duration> {
        if let Some(until) = self.shut_until(credential) {
            return Some(until - Instant::now());
        }
        self.local
            .wait(&self.clock, credential, tokens, request_spent)
    }
}

/// A span of governor's clock as a count of nanoseconds (for an atomic).
fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// The gate as a layer of the outbound stack: an attempt passes its credential's gate (for its
/// tokens, by its deadline) before anything below, and the reply's rate-limit headers shut the
/// gate for every caller when the upstream says the credential is out of budget.
#[derive(Clone)]
pub struct GateLayer {
    gates: Arc<RateGates>,
    max_closure: Duration,
    metrics: Arc<Metrics>,
}

impl GateLayer {
    /// `max_closure`: the longest the upstream's word shuts a gate (`retry.max_server_delay`).
    pub fn new(gates: Arc<RateGates>, max_closure: Duration, metrics: Arc<Metrics>) -> Self {
        GateLayer {
            gates,
            max_closure,
            metrics,
        }
    }
}

impl<S> tower::Layer<S> for GateLayer {
    type Service = Gate<S>;
    fn layer(&self, inner: S) -> Gate<S> {
        Layered::new(self.clone(), inner)
    }
}

/// The gate layer's service.
pub type Gate<S> = Layered<GateLayer, S>;

impl<S, R, T> tower::Service<Attempt<R>> for Layered<GateLayer, S>
where
    S: Below<R> + tower::Service<Attempt<R>, Response = Tried<T>>,
    R: Send + 'static,
    T: Send + 'static,
{
    type Response = Tried<T>;
    type Error = ProxyError;
    type Future = Gated<S, S::Future, T>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), ProxyError>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut attempt: Attempt<R>) -> Self::Future {
        let shared = self.shared();
        let credential = attempt.credential;
        if shared.0.gates.wide_open() {
            // No gate to pass (the default: no limits configured, never shut by the
            // upstream): the attempt goes on at once, and its answer is heard on the way back.
            let attempt = shared.1.clone().call(attempt);
            return Gated::Open {
                attempt,
                layer: shared,
                credential,
            };
        }
        Gated::Waiting {
            attempt: Box::pin(async move {
                let (layer, inner) = &*shared;
                // Places already held are not carried through a wait here: other tenants
                // would wait behind one tenant's quota. The places layer takes fresh ones
                // after.
                if let Some(held) = attempt.places.take() {
                    held.finish(Signal::Ignore, 0);
                }
                layer
                    .gates
                    .pass(&credential, attempt.tokens, attempt.deadline)
                    .await?;
                let tried = inner.clone().call(attempt).await?;
                layer.heard(&credential, &tried);
                Ok(tried)
            }),
        }
    }
}

pin_project! {
    /// The gate's future: straight on when no gate is set (a named type, no box: every upstream
    /// call passes here), or a wait at the gate first.
    #[project = GatedProj]
    pub enum Gated<S, F, T> {
        Open {
            #[pin]
            attempt: F,
            layer: Arc<(GateLayer, S)>,
            credential: CredentialId,
        },
        Waiting { attempt: BoxFuture<Result<Tried<T>, ProxyError>> },
    }
}

impl<S, F, T> Future for Gated<S, F, T>
where
    F: Future<Output = Result<Tried<T>, ProxyError>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            GatedProj::Open {
                attempt,
                layer,
                credential,
            } => {
                let result = ready!(attempt.poll(cx));
                if let Ok(tried) = &result {
                    layer.0.heard(credential, tried);
                }
                Poll::Ready(result)
            }
            GatedProj::Waiting { attempt } => attempt.as_mut().poll(cx),
        }
    }
}
impl GateLayer {
    /// What an attempt's answer says about the credential's budget.
    fn heard<T>(&self, credential: &CredentialId, tried: &Tried<T>) {
        if let Some((status, headers)) = &tried.rate_limit {
            self.observe(credential, *status, headers);
        }
    }

    /// Shuts the credential's gate when the upstream says it is out of budget. (No gauge of
    /// the remaining budget: it would mix credentials, the last writer winning.)
    fn observe(&self, credential: &CredentialId, status: StatusCode, headers: &RateLimitHeaders) {
        for (kind, remaining) in [
            ("requests", headers.remaining_requests),
            ("tokens", headers.remaining_tokens),
        ] {
            if remaining == Some(0) {
                self.metrics
                    .upstream
                    .ratelimit_exhausted
                    .with_label_values(&[kind])
                    .inc();
            }
        }
        if let Some(closed) = headers.closed_for(status) {
            self.gates.shut(credential, closed.min(self.max_closure));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gates(rpm: u32, tpm: u32) -> RateGates {
        RateGates::new(rpm, tpm, Arc::new(Metrics::new()))
    }

    const A: CredentialId = [1; 32];
    const B: CredentialId = [2; 32];

    #[tokio::test(start_paused = true)]
    async fn requests_per_minute_are_spread_and_never_exceeded() {
        let g = gates(60, 0);
        let start = Instant::now();
        let far = start + Duration::from_secs(3600);
        let mut passed = 0;
        while Instant::now() < start + Duration::from_secs(60) {
            g.pass(&A, 1, far).await.unwrap();
            passed += 1;
        }
        // A full burst at once, then one per second: at most 60 + 60 in the first minute.
        assert!((100..=121).contains(&passed), "{passed}");
        // Another credential has its own budget.
        let t = Instant::now();
        g.pass(&B, 1, far).await.unwrap();
        assert_eq!(Instant::now(), t);
    }

    #[tokio::test(start_paused = true)]
    async fn a_wait_for_tokens_spends_one_request_of_the_budget_not_one_per_look() {
        // 4 requests a minute (one per 15 s after the burst) and 10 tokens a second.
        let g = gates(4, 600);
        let far = Instant::now() + Duration::from_secs(3600);
        g.pass(&A, 600, far).await.unwrap(); // the whole token budget
        let t = Instant::now();
        g.pass(&A, 300, far).await.unwrap(); // waits about 30 s for its tokens
        let waited = Instant::now() - t;
        assert!(
            waited >= Duration::from_secs(29) && waited <= Duration::from_secs(31),
            "{waited:?}"
        );
        // Two requests spent and 30 s of refill: the request budget has room for more, and
        // small calls (each waiting a tenth of a second for its token) go through at once.
        let t = Instant::now();
        for _ in 0..2 {
            g.pass(&A, 1, far).await.unwrap();
        }
        let waited = Instant::now() - t;
        assert!(waited <= Duration::from_secs(1), "{waited:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn what_the_gates_keep_per_credential_is_bounded() {
        let g = gates(60, 6000);
        let far = Instant::now() + Duration::from_secs(3600);
        // 20,000 callers with credentials of their own, 100 a second for 200 s; the upstream
        // shuts a few of their gates briefly.
        for i in 0..20_000u32 {
            let mut credential = [0u8; 32];
            credential[..4].copy_from_slice(&i.to_le_bytes());
            if i % 100 == 0 {
                g.shut(&credential, Duration::from_millis(5));
            }
            tokio::time::advance(Duration::from_millis(10)).await;
            g.pass(&credential, 10, far).await.unwrap();
        }
        let (requests, tokens, shut, lines) = g.held();
        for (what, held) in [("requests", requests), ("tokens", tokens), ("shut", shut)] {
            assert!(held <= 2_000, "{what}: {held} credentials held");
        }
        assert!(lines <= 2_000, "lines: {lines}");
    }

    #[tokio::test(start_paused = true)]
    async fn tokens_per_minute_count_tokens_as_cells() {
        let g = gates(0, 1000);
        let far = Instant::now() + Duration::from_secs(3600);
        g.pass(&A, 1000, far).await.unwrap();
        let t = Instant::now();
        g.pass(&A, 500, far).await.unwrap();
        let waited = Instant::now() - t;
        assert!(
            waited >= Duration::from_secs(29) && waited <= Duration::from_secs(31),
            "{waited:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_caller_that_cannot_pass_before_its_deadline_is_refused_at_once() {
        let g = gates(1, 0);
        let soon = Instant::now() + Duration::from_secs(5);
        g.pass(&A, 1, soon).await.unwrap();
        let t = Instant::now();
        let err = g.pass(&A, 1, soon).await.expect_err("refused");
        assert_eq!(Instant::now(), t, "refused without waiting");
        assert_eq!(err.status(), http::StatusCode::TOO_MANY_REQUESTS);
        assert!(err.retry_after().unwrap() > Duration::from_secs(50));
    }

    #[tokio::test(start_paused = true)]
    async fn callers_queued_behind_others_are_refused_at_once_when_their_turn_is_too_late() {
        let g = Arc::new(gates(60, 0)); // one per second after the burst
        let far = Instant::now() + Duration::from_secs(3600);
        for _ in 0..60 {
            g.pass(&A, 1, far).await.unwrap(); // spend the burst
        }
        // Five patient callers line up (about 1 s apart)...
        let patient: Vec<_> = (0..5)
            .map(|_| {
                let g = g.clone();
                tokio::spawn(async move { g.pass(&A, 1, far).await.is_ok() })
            })
            .collect();
        tokio::task::yield_now().await;
        // ...so one who must be through within 2 s has no chance, and hears so at once.
        let t = Instant::now();
        let err = g
            .pass(&A, 1, t + Duration::from_secs(2))
            .await
            .expect_err("refused");
        assert_eq!(Instant::now(), t);
        assert!(err.retry_after().unwrap() >= Duration::from_secs(5));
        for p in patient {
            assert!(p.await.unwrap(), "the patient ones all pass, in order");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_upstream_closure_holds_every_caller_of_that_credential_until_the_reset() {
        let g = gates(0, 0);
        let far = Instant::now() + Duration::from_secs(3600);
        g.shut(&A, Duration::from_secs(2));
        g.shut(&A, Duration::from_millis(500)); // shorter: does not reopen early
        let t = Instant::now();
        g.pass(&A, 1, far).await.unwrap();
        assert_eq!(Instant::now() - t, Duration::from_secs(2));
        let t = Instant::now();
        g.pass(&B, 1, far).await.unwrap();
        assert_eq!(Instant::now(), t, "other credentials are not held");
    }
}
