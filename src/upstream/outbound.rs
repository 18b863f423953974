//! The one outbound path. Every upstream call, pass-through or engine, goes down the same tower
//! stack, declared below outermost first; each layer says why it sits where it does.
//!
//! What differs between the two is the exchange at the bottom: pass-through returns at the
//! response head and streams the body to its caller (the slot goes with it), the engine reads
//! and decodes the reply inside the attempt (a reply cut short is a failed attempt, worth
//! another). Everything above it, the retry loop, the rate gate, the breaker, the places and
//! the attempt's timeout, is shared.
//!
//! Every layer is always ready: its waits depend on the call (its credential, its deadline, its
//! callers), so they happen in the future `call` returns, not in `poll_ready`, and `send` calls
//! the stack at once. A tower middleware that is not always ready (a `Buffer`, tower's own
//! concurrency limit) does not belong in it.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{ready, Poll},
    time::Duration,
};

use pin_project_lite::pin_project;

use tokio::time::Instant;
use tower::{Layer, Service, ServiceBuilder};

use crate::{
    config::Config,
    http::{errors::ProxyError, route::Route},
    metrics::Metrics,
    resilience::{
        adaptive_limit::AdaptiveLimit,
        breaker::{BreakerLayer, CircuitBreaker},
        limits::{Capacity, ConcurrencyLimit, PlaceLayer, Places, Slot},
        rate_gate::{GateLayer, RateGates},
        retry::{Finished, RetryLayer, RetryReason, RetryState, Tried, Verdict},
    },
    upstream::credential::CredentialId,
};

/// The stack an exchange `L` runs under.
pub type Outbound<L> = crate::resilience::retry::Retry<
    crate::resilience::rate_gate::Gate<
        crate::resilience::breaker::Breaker<crate::resilience::limits::Place<AttemptTimeout<L>>>,
    >,
>;

/// What the layers share, made once at start.
#[derive(Clone)]
pub struct Parts {
    pub retry: Arc<RetryState>,
    pub gates: Arc<RateGates>,
    pub breaker: Option<Arc<CircuitBreaker>>,
    pub capacity: Arc<Capacity>,
    pub timeouts: Timeouts,
    pub metrics: Arc<Metrics>,
}

/// The upstream's own time for one attempt.
#[derive(Clone)]
pub struct Timeouts {
    /// `upstream.first_byte_timeout`: the longest an attempt waits for the upstream.
    pub first_byte: Duration,
    /// The engine's learnt limit, whose baseline says how long a call of a given size takes
    /// when it is not queued (an attempt far past it is lost in a hung upstream).
    pub learnt: Option<AdaptiveLimit>,
}

impl Parts {
    pub fn new(config: &Config, metrics: Arc<Metrics>) -> Parts {
        let limits = &config.limits;
        let learnt = limits
            .adaptive_concurrency
            .then(|| AdaptiveLimit::new(limits.max_concurrency, metrics.clone()));
        Parts {
            retry: Arc::new(RetryState::new(&config.retry, metrics.clone())),
            gates: Arc::new(RateGates::new(
                limits.requests_per_minute,
                limits.tokens_per_minute,
                metrics.clone(),
            )),
            breaker: config
                .breaker
                .enabled
                .then(|| Arc::new(CircuitBreaker::new(&config.breaker, metrics.clone()))),
            capacity: Arc::new(Capacity {
                ceiling: ConcurrencyLimit::new(
                    limits.max_concurrency,
                    limits.max_wait,
                    limits.max_waiting_requests,
                    metrics.clone(),
                ),
                learnt: learnt.clone(),
            }),
            timeouts: Timeouts {
                first_byte: config.upstream.first_byte_timeout,
                learnt,
            },
            metrics,
        }
    }
}

pub fn build<L>(exchange: L, parts: &Parts) -> Outbound<L> {
    ServiceBuilder::new()
        // Outermost: each attempt passes everything below afresh (gate, breaker, a place), and
        // a retry's wait holds none of them, so a caller sitting out a backoff holds back no one.
        .layer(RetryLayer::new(parts.retry.clone()))
        // The credential's rate gate, before the breaker: a wait here must not hold the
        // breaker's half-open probe (everyone else would be refused meanwhile). On the way
        // back it hears the upstream's rate-limit headers, which shut it for every caller.
        .layer(GateLayer::new(
            parts.gates.clone(),
            parts.retry.max_server_delay(),
            parts.metrics.clone(),
        ))
        // The breaker admits an attempt or refuses it at once, before it takes a place, and
        // hears how each attempt went.
        .layer(BreakerLayer::new(parts.breaker.clone()))
        // The places an attempt holds toward the upstream: the engine's learnt limit (the
        // adaptive concurrency controller), then a slot under the ceiling shared with
        // pass-through. Taken only after the gate and the breaker let the attempt go, so a
        // caller held there holds no place; the learnt limit hears what the attempt showed.
        .layer(PlaceLayer::new(parts.capacity.clone()))
        // The attempt's own timeout, started when the place is held (what it bounds is the
        // upstream's time, not embedcar's waits), and ended early when every caller's deadline
        // has passed.
        .layer(AttemptTimeoutLayer::new(
            parts.timeouts.clone(),
            parts.metrics.clone(),
        ))
        .service(exchange)
}

/// Every layer's service: the layer's own state and the service below it, shared behind one
/// `Arc`, so a call clones one pointer, not the stack below it.
pub struct Layered<L, S>(Arc<(L, S)>);

impl<L, S> Layered<L, S> {
    pub fn new(layer: L, inner: S) -> Self {
        Layered(Arc::new((layer, inner)))
    }

    /// The layer and the service below, for a future that outlives the call.
    pub fn shared(&self) -> Arc<(L, S)> {
        self.0.clone()
    }

    /// The layer and the service below, borrowed.
    pub fn parts(&self) -> &(L, S) {
        &self.0
    }
}

impl<L, S> Clone for Layered<L, S> {
    fn clone(&self) -> Self {
        Layered(self.0.clone())
    }
}

/// The stack below a layer, as the layers that wait need it: it takes an attempt and can be
/// held (with its future) across a wait in a task of its own. (Its response, `Tried<T>`, is
/// named where it is used: a trait parameter would leave `T` unconstrained in the impls.)
pub trait Below<R>:
    Service<Attempt<R>, Error = ProxyError, Future: Send> + Clone + Send + Sync + 'static
{
}

impl<S, R> Below<R> for S where
    S: Service<Attempt<R>, Error = ProxyError, Future: Send> + Clone + Send + Sync + 'static
{
}

/// A boxed, sendable future: what a layer's `call` returns when it must wait.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// The farthest deadline of the callers an engine call still serves, read again whenever a
/// wait for them ends (a caller may have joined with more time), `None` when none is left.
pub type LiveDeadline = Arc<dyn Fn() -> Option<Instant> + Send + Sync>;

/// One upstream call as its caller hands it to the stack.
pub struct Call<R> {
    /// Makes attempt `n` (from 1), or says there is nobody left to make it for.
    pub attempts: Box<dyn FnMut(u32) -> Option<Attempt<R>> + Send>,
    /// No retry starts unless it can before this (when `live` is given, it is read instead).
    pub deadline: Instant,
    /// False for a body that was streamed and is gone: one attempt.
    pub retryable: bool,
    /// Attempts at most; `None`: as many as the deadline and the budget allow.
    pub max_attempts: Option<u32>,
    /// The callers the call carries: each earns retry credit, as it would have directly.
    pub callers: u32,
    /// The deadline as it stands now, when callers may join while the call is under way.
    pub live: Option<LiveDeadline>,
}

/// Which side of embedcar an attempt comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A request passed through. One that is not idempotent and timed out waiting for its
    /// answer is not sent again: the upstream may still be carrying it out.
    PassThrough { idempotent: bool },
    /// An engine call: takes a place of the learnt limit and teaches it.
    Engine,
}

/// One attempt, as it travels down the stack.
pub struct Attempt<R> {
    pub request: R,
    pub kind: Kind,
    pub route: Route,
    pub credential: CredentialId,
    /// What the attempt costs at the credential's token gate.
    pub tokens: u64,
    /// embedcar's own waits for it (the gate, a pass-through slot) end here.
    pub deadline: Instant,
    /// The callers stop waiting for the upstream's answer then (the client's timeout hint, the
    /// engine's callers' deadlines); `None`: only the upstream's own time bounds the wait.
    pub answer_by: Option<Instant>,
    /// Read again when `answer_by` comes, for an engine call whose callers may have joined.
    pub live: Option<LiveDeadline>,
    /// Places already held (the engine dispatcher's, for a first attempt).
    pub places: Option<Places>,
    /// Where the exchange says its response head has come (set by the timeout layer).
    pub head: HeadArrived,
}

/// A value as the attempt that made it left it: with the pass-through's upstream slot, which
/// must be held until the response body ends.
pub struct Placed<T> {
    pub value: T,
    pub slot: Option<Slot>,
}

/// The answers embedcar makes itself for an attempt, in the caller's value type.
pub trait Reply: Sized + Send + 'static {
    /// The attempt failed inside embedcar's bounds (a timeout, say).
    fn error(e: ProxyError) -> Self;
    /// The callers' time ran out before the attempt ended (the engine's callers have left;
    /// a pass-through caller is told its timeout hint passed).
    fn abandoned(e: ProxyError) -> Self {
        Self::error(e)
    }
}

/// Runs one call down `stack`. Every layer is always ready (see the module's notes), so the
/// call is made at once.
pub fn send<S, R, T>(stack: &S, call: Call<R>) -> S::Future
where
    S: Service<Call<R>, Response = Finished<Placed<T>>, Error = ProxyError> + Clone,
{
    stack.clone().call(call)
}

// ---------------------------------------------------------------------------------------------
// The attempt's timeout

#[derive(Clone)]
pub struct AttemptTimeoutLayer {
    timeouts: Timeouts,
    metrics: Arc<Metrics>,
}

impl AttemptTimeoutLayer {
    pub fn new(timeouts: Timeouts, metrics: Arc<Metrics>) -> Self {
        AttemptTimeoutLayer { timeouts, metrics }
    }
}

impl<S> Layer<S> for AttemptTimeoutLayer {
    type Service = AttemptTimeout<S>;
    fn layer(&self, inner: S) -> AttemptTimeout<S> {
        Layered::new(self.clone(), inner)
    }
}

/// The attempt timeout's service.
pub type AttemptTimeout<S> = Layered<AttemptTimeoutLayer, S>;

/// An engine attempt ends without waiting for the upstream any longer than this many times
/// what an unqueued call of its size takes (the learnt baseline), so that a call lost in a hung
/// upstream is retried while its callers still have time, instead of holding them to their
/// deadline.
const ATTEMPT_TIMEOUT_FACTOR: u32 = 10;
/// ...and never sooner than this: a healthy upstream's slow moment is not a hang.
const MIN_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);

impl Timeouts {
    /// How long the upstream gets for this attempt.
    fn upstream_wait(&self, kind: Kind, tokens: u64) -> Duration {
        let learnt = match kind {
            Kind::Engine => self
                .learnt
                .as_ref()
                .and_then(|l| l.expected_within_seen(tokens)),
            Kind::PassThrough { .. } => None,
        };
        match learnt {
            Some(expected) => (expected * ATTEMPT_TIMEOUT_FACTOR)
                .max(MIN_ATTEMPT_TIMEOUT)
                .min(self.first_byte),
            None => self.first_byte,
        }
    }
}

/// Set by an exchange that reads its reply inside the attempt (the engine's) when the response
/// head has come: the timeouts bound the wait for the upstream's answer, not the reading of a
/// reply already under way (a body that stalls is `upstream.body_idle_timeout`'s business), and
/// a reply being read fills the cache even if its callers have just left.
#[derive(Clone, Default)]
pub struct HeadArrived(Option<Arc<std::sync::atomic::AtomicBool>>);

impl HeadArrived {
    fn watched() -> HeadArrived {
        HeadArrived(Some(Arc::default()))
    }

    /// Called by the exchange when the response head is in.
    pub fn arrived(&self) {
        if let Some(flag) = &self.0 {
            flag.store(true, std::sync::atomic::Ordering::Release);
        }
    }

    fn has_arrived(&self) -> bool {
        self.0
            .as_ref()
            .is_some_and(|f| f.load(std::sync::atomic::Ordering::Acquire))
    }
}

impl<S, R, T> Service<Attempt<R>> for Layered<AttemptTimeoutLayer, S>
where
    S: Below<R> + Service<Attempt<R>, Response = Tried<T>>,
    R: Send + 'static,
    T: Reply,
{
    type Response = Tried<T>;
    type Error = ProxyError;
    type Future = Timed<S::Future, T>;

    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> Poll<Result<(), ProxyError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, attempt: Attempt<R>) -> Self::Future {
        let (layer, inner) = self.parts();
        match attempt.kind {
            // Its callers' deadline is fixed, and its exchange returns at the response head:
            // one timer for both bounds, in a named future (every pass-through request takes
            // this path).
            Kind::PassThrough { .. } if attempt.live.is_none() => {
                let started = Instant::now();
                let wait = layer.timeouts.upstream_wait(attempt.kind, attempt.tokens);
                let upstream_deadline = started + wait;
                let until = attempt
                    .answer_by
                    .map_or(upstream_deadline, |by| by.min(upstream_deadline));
                Timed::PassThrough {
                    timer: tokio::time::sleep_until(until),
                    upstream_bound: until == upstream_deadline,
                    started,
                    wait,
                    kind: attempt.kind,
                    route: attempt.route,
                    metrics: layer.metrics.clone(),
                    exchange: inner.clone().call(attempt),
                }
            }
            _ => Timed::Engine {
                attempt: Box::pin(engine_attempt(self.shared(), attempt)),
            },
        }
    }
}

pin_project! {
    /// The attempt timeout's future.
    #[project = TimedProj]
    pub enum Timed<F, T> {
        PassThrough {
            #[pin]
            exchange: F,
            #[pin]
            timer: tokio::time::Sleep,
            // The timer is the upstream's own bound (else the callers' deadline came first).
            upstream_bound: bool,
            started: Instant,
            wait: Duration,
            kind: Kind,
            route: Route,
            metrics: Arc<Metrics>,
        },
        Engine { attempt: BoxFuture<Result<Tried<T>, ProxyError>> },
    }
}

impl<F, T> Future for Timed<F, T>
where
    F: Future<Output = Result<Tried<T>, ProxyError>>,
    T: Reply,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            TimedProj::Engine { attempt } => attempt.as_mut().poll(cx),
            TimedProj::PassThrough {
                exchange,
                timer,
                upstream_bound,
                started,
                wait,
                kind,
                route,
                metrics,
            } => {
                if let Poll::Ready(result) = exchange.poll(cx) {
                    return Poll::Ready(result);
                }
                ready!(timer.poll(cx));
                Poll::Ready(Ok(timed_out(
                    metrics,
                    *kind,
                    *route,
                    *started,
                    *wait,
                    *upstream_bound,
                )))
            }
        }
    }
}

/// An engine attempt under its timeout: its callers' deadline moves as callers join and leave,
/// and the timeout bounds the wait for the reply's head, not the reading of it.
async fn engine_attempt<S, R, T>(
    shared: Arc<(AttemptTimeoutLayer, S)>,
    attempt: Attempt<R>,
) -> Result<Tried<T>, ProxyError>
where
    S: Service<Attempt<R>, Response = Tried<T>, Error = ProxyError> + Clone,
    T: Reply,
{
    let (layer, inner) = &*shared;
    let mut attempt = attempt;
    let started = Instant::now();
    let wait = layer.timeouts.upstream_wait(attempt.kind, attempt.tokens);
    let upstream_deadline = started + wait;
    let (kind, route) = (attempt.kind, attempt.route);
    let live = attempt.live.clone();
    // The callers' deadline as it stands now: an engine call's callers may have come and gone
    // while it waited for its place.
    let answer_by = match &live {
        Some(live) => live(),
        None => attempt.answer_by,
    };
    if kind == Kind::Engine {
        // Nobody left with time: nothing is sent. (A timer already due would still let the
        // request go out on its first poll.)
        if answer_by.is_none_or(|by| by <= started) {
            return Ok(Tried::not_sent(T::abandoned(ProxyError::UpstreamTimeout(
                Duration::ZERO,
            ))));
        }
        attempt.head = HeadArrived::watched();
    }
    let head = attempt.head.clone();
    let exchange = inner.clone().call(attempt);
    tokio::pin!(exchange);
    // Waits until the upstream's own time is up, or no caller is left with time: when the
    // callers' deadline comes, a caller who joined meanwhile may have more.
    let mut callers = answer_by.unwrap_or(upstream_deadline);
    let upstream_timed_out = loop {
        let until = upstream_deadline.min(callers);
        match tokio::time::timeout_at(until, &mut exchange).await {
            Ok(result) => return result,
            Err(_) if head.has_arrived() => return exchange.await,
            Err(_) if until == upstream_deadline => break true,
            Err(_) => match live.as_ref().and_then(|l| l()) {
                Some(later) if later > callers => callers = later.min(upstream_deadline),
                _ => break false,
            },
        }
    };
    Ok(timed_out(
        &layer.metrics,
        kind,
        route,
        started,
        wait,
        upstream_timed_out,
    ))
}

/// The attempt's answer when its time ran out: the upstream's own (a broken attempt, worth a
/// retry unless it may have been carried out), or its callers' (abandoned).
fn timed_out<T: Reply>(
    metrics: &Metrics,
    kind: Kind,
    route: Route,
    started: Instant,
    wait: Duration,
    upstream_timed_out: bool,
) -> Tried<T> {
    let elapsed = started.elapsed();
    if let Kind::PassThrough { .. } = kind {
        metrics
            .requests
            .deadline_expired
            .with_label_values(&["first_byte"])
            .inc();
    }
    let timed_out = ProxyError::UpstreamTimeout(elapsed.min(wait));
    if !upstream_timed_out {
        // Every caller's deadline came first: slow is not broken. Nothing to retry, and the
        // breaker hears nothing; the learnt limit hears the call took at least this long.
        let label = match kind {
            Kind::Engine => "abandoned",
            Kind::PassThrough { .. } => "timeout",
        };
        metrics.observe_upstream(route, label, elapsed);
        return Tried::abandoned(T::abandoned(timed_out));
    }
    metrics.observe_upstream(route, "timeout", elapsed);
    match kind {
        Kind::PassThrough { idempotent: false } => Tried {
            verdict: Verdict::Final,
            ..Tried::broken(T::error(timed_out), RetryReason::Timeout)
        },
        _ => Tried::broken(T::error(timed_out), RetryReason::Timeout),
    }
}
