//! The upstream circuit breaker: fail fast when the upstream is down, and only then.
//!
//! There is one upstream, so opening the breaker refuses everyone. nginx and Envoy keep their
//! last host in service for that reason (Envoy's panic threshold), and so does embedcar: a slow
//! upstream, or one that fails some of its calls, is still the best there is, and the retries
//! (with their budget) and the adaptive concurrency limit deal with it. The breaker opens only
//! on what says "down":
//!
//! * **Cannot connect.** `connect_failures` connection failures in a row, with no exchange in
//!   between that reached the upstream, open it for everyone: nothing is listening, and every
//!   caller would wait out a connect timeout for the same answer.
//! * **Almost every call fails.** Per credential, when at least `failure_rate` of the calls in
//!   the last `window` failed (5xx, broken exchanges, the upstream's own timeouts), with at
//!   least `min_calls` of them. Per credential, because a tenant whose requests make the
//!   upstream answer 500 must not take the upstream away from the others.
//!
//! What is not a failure: latency (the adaptive limit's business), a call abandoned because its
//! callers' deadlines passed, 429 (the rate gates'), and any other 4xx (an answer about the
//! request). After `cooldown` one probe per circuit goes through; its success closes the
//! circuit, its failure opens it again.

use std::{
    collections::HashMap,
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{ready, Context, Poll},
    time::Duration,
};

use pin_project_lite::pin_project;

use tokio::time::Instant;

use crate::{
    config::BreakerConfig,
    http::errors::ProxyError,
    metrics::Metrics,
    resilience::retry::{Health, Tried},
    upstream::{
        credential::CredentialId,
        outbound::{Attempt, Layered},
    },
};

/// Buckets of the failure-rate window: the window slides in steps of a tenth.
const BUCKETS: usize = 10;
/// Credential circuits kept before closed, quiet ones are swept.
const CIRCUITS_BEFORE_SWEEP: usize = 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Closed,
    Open {
        until: Instant,
    },
    /// Cool-down over: one probe is (or may be) in flight; everyone else is still refused.
    HalfOpen {
        probing: bool,
    },
}

/// Every state's label (see [`State::label`]), for the transition counter's series at 0.
pub const STATE_LABELS: [&str; 3] = ["closed", "open", "half_open"];

impl State {
    fn label(self) -> (&'static str, i64) {
        match self {
            State::Closed => ("closed", 0),
            State::Open { .. } => ("open", 1),
            State::HalfOpen { .. } => ("half_open", 2),
        }
    }
}

/// Outcomes of the last `window`, in buckets.
#[derive(Clone, Copy, Default)]
struct Bucket {
    /// Which step of the window this bucket counts (its start, in steps since the breaker's
    /// origin); a bucket of an older step is stale.
    step: u64,
    calls: u32,
    failures: u32,
}

struct Circuit {
    state: State,
    buckets: [Bucket; BUCKETS],
    last_seen: Instant,
}

impl Circuit {
    fn new(now: Instant) -> Circuit {
        Circuit {
            state: State::Closed,
            buckets: [Bucket::default(); BUCKETS],
            last_seen: now,
        }
    }
}

pub struct CircuitBreaker {
    circuits: Mutex<Circuits>,
    settings: BreakerConfig,
    origin: Instant,
    metrics: Arc<Metrics>,
}

struct Circuits {
    /// Connection failures in a row, for everyone, and the circuit they open for everyone.
    connect_failures: u32,
    unreachable: State,
    by_credential: HashMap<CredentialId, Circuit>,
    open: usize,
    /// When the credential circuits were last swept.
    swept: Instant,
}

/// How a failed attempt failed, as far as the breaker cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// No connection could be made.
    Connect,
    /// A 5xx, a broken exchange, the upstream's own timeout.
    Upstream,
}

/// Leave to make one upstream attempt. Report how it went; a pass dropped without a report (the
/// callers left) frees a probe without judging the upstream.
pub struct Pass {
    breaker: Arc<CircuitBreaker>,
    credential: CredentialId,
    /// This attempt probes the credential's circuit, or the circuit for everyone.
    probe: bool,
    global_probe: bool,
    reported: bool,
}

impl Pass {
    pub fn succeeded(mut self) {
        self.reported = true;
        self.breaker
            .on_result(&self.credential, self.probe, self.global_probe, None);
    }

    pub fn failed(mut self, how: Failure) {
        self.reported = true;
        self.breaker
            .on_result(&self.credential, self.probe, self.global_probe, Some(how));
    }

    /// The upstream answered, with an answer about the request rather than its own health (a
    /// 4xx, 429 included): it can be reached, so the run of connect failures ends and the
    /// circuit for everyone closes; the credential's circuit hears nothing.
    pub fn answered(mut self) {
        self.reported = true;
        self.breaker.on_reached(self.global_probe);
        self.breaker
            .release_probe(&self.credential, self.probe, false);
    }

    /// An outcome that says nothing about the upstream's health (a caller that left).
    pub fn neutral(mut self) {
        self.reported = true;
        self.breaker
            .release_probe(&self.credential, self.probe, self.global_probe);
    }
}

impl Drop for Pass {
    fn drop(&mut self) {
        if !self.reported {
            self.breaker
                .release_probe(&self.credential, self.probe, self.global_probe);
        }
    }
}

impl CircuitBreaker {
    pub fn new(settings: &BreakerConfig, metrics: Arc<Metrics>) -> Self {
        metrics.resilience.breaker_state.set(0);
        CircuitBreaker {
            circuits: Mutex::new(Circuits {
                connect_failures: 0,
                unreachable: State::Closed,
                by_credential: HashMap::new(),
                open: 0,
                swept: Instant::now(),
            }),
            settings: settings.clone(),
            origin: Instant::now(),
            metrics,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Circuits> {
        self.circuits.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn step(&self, now: Instant) -> u64 {
        let step = (self.settings.window / BUCKETS as u32).max(Duration::from_millis(1));
        (now.duration_since(self.origin).as_nanos() / step.as_nanos()) as u64
    }

    /// Lets an attempt for `credential` through, or refuses it with 503 + Retry-After.
    pub fn admit(self: &Arc<Self>, credential: &CredentialId) -> Result<Pass, ProxyError> {
        let now = Instant::now();
        let mut c = self.lock();
        let global_probe = self.advance(&mut c.unreachable, now)?;
        if c.by_credential.len() > CIRCUITS_BEFORE_SWEEP
            && now.duration_since(c.swept) >= self.settings.window
        {
            // At most once a window: circuits quiet for a window go, open ones too once their
            // cool-down and a window have passed (the tenant left), so the map stays bounded.
            c.swept = now;
            let quiet = self.settings.window;
            let cooldown = self.settings.cooldown;
            let mut dropped_open = 0;
            c.by_credential.retain(|_, k| {
                let keep = now.duration_since(k.last_seen) < quiet + cooldown;
                if !keep && k.state != State::Closed {
                    dropped_open += 1;
                }
                keep
            });
            c.open -= dropped_open;
            self.publish(&c);
        }
        let circuit = c
            .by_credential
            .entry(*credential)
            .or_insert_with(|| Circuit::new(now));
        circuit.last_seen = now;
        let probe = match self.advance(&mut circuit.state, now) {
            Ok(p) => p,
            Err(e) => {
                // The everyone-probe was not made after all: let another caller make it.
                if global_probe {
                    c.unreachable = State::HalfOpen { probing: false };
                }
                return Err(e);
            }
        };
        Ok(Pass {
            breaker: self.clone(),
            credential: *credential,
            probe,
            global_probe,
            reported: false,
        })
    }

    /// Moves a circuit on in time: an attempt may go (`Ok(whether it is the probe)`), or is
    /// refused.
    fn advance(&self, state: &mut State, now: Instant) -> Result<bool, ProxyError> {
        match *state {
            State::Closed => Ok(false),
            State::Open { until } if now >= until => {
                self.transition_state(state, State::HalfOpen { probing: true });
                Ok(true)
            }
            State::Open { until } => Err(ProxyError::CircuitOpen {
                retry_after: until - now,
            }),
            State::HalfOpen { probing: false } => {
                *state = State::HalfOpen { probing: true };
                Ok(true)
            }
            State::HalfOpen { probing: true } => Err(ProxyError::CircuitOpen {
                retry_after: self.settings.cooldown,
            }),
        }
    }

    fn on_result(
        &self,
        credential: &CredentialId,
        probe: bool,
        global_probe: bool,
        failure: Option<Failure>,
    ) {
        let now = Instant::now();
        let step = self.step(now);
        let mut guard = self.lock();
        let c = &mut *guard;
        let cannot_connect = failure == Some(Failure::Connect);
        self.judge_connect(c, now, global_probe, cannot_connect);
        // A connection that could not be made says nothing about this credential's calls; a
        // credential's probe that could not connect leaves the probe to the next caller.
        if cannot_connect {
            if probe {
                if let Some(circuit) = c.by_credential.get_mut(credential) {
                    if let State::HalfOpen { probing: true } = circuit.state {
                        circuit.state = State::HalfOpen { probing: false };
                    }
                }
            }
            self.publish(c);
            return;
        }
        let Some(circuit) = c.by_credential.get_mut(credential) else {
            self.publish(c);
            return;
        };
        let failed = failure.is_some();
        let before = circuit.state;

        self.judge_credential(circuit, now, step, probe, failed);
        let was_open = before != State::Closed;
        let is_open = circuit.state != State::Closed;
        match (was_open, is_open) {
            (false, true) => c.open += 1,
            (true, false) => c.open -= 1,
            _ => {}
        }
        self.publish(c);
    }

    /// The upstream-wide connect circuit: only connection failures count here (a probe for
    /// everyone closes or reopens it; a run of them in a row opens it).
    fn judge_connect(
        &self,
        c: &mut Circuits,
        now: Instant,
        global_probe: bool,
        cannot_connect: bool,
    ) {
        match (c.unreachable, cannot_connect) {
            (State::HalfOpen { .. }, true) if global_probe => {
                let until = now + self.settings.cooldown;
                self.transition_state(&mut c.unreachable, State::Open { until });
            }
            (State::HalfOpen { .. }, false) if global_probe => {
                c.connect_failures = 0;
                self.transition_state(&mut c.unreachable, State::Closed);
            }
            (State::Closed, true) => {
                c.connect_failures += 1;
                if c.connect_failures >= self.settings.connect_failures.max(1) {
                    c.connect_failures = 0;
                    let until = now + self.settings.cooldown;
                    tracing::warn!(
                        cooldown = ?self.settings.cooldown,
                        "upstream circuit breaker: cannot connect to the upstream; failing fast"
                    );
                    self.transition_state(&mut c.unreachable, State::Open { until });
                }
            }
            // Any exchange that reached the upstream ends the run of connect failures.
            (State::Closed, false) => c.connect_failures = 0,
            _ => {}
        }
    }

    /// A credential's own circuit: its probe closes or reopens it; while closed, the result is
    /// counted in the sliding window, which opens it when the share of recent calls that failed
    /// reaches `failure_rate` (over at least `min_calls`).
    fn judge_credential(
        &self,
        circuit: &mut Circuit,
        now: Instant,
        step: u64,
        probe: bool,
        failed: bool,
    ) {
        match (circuit.state, failed) {
            (State::HalfOpen { .. }, false) if probe => {
                circuit.buckets = [Bucket::default(); BUCKETS];
                self.transition(circuit, State::Closed);
            }
            (State::HalfOpen { .. }, true) if probe => {
                let until = now + self.settings.cooldown;
                self.transition(circuit, State::Open { until });
            }
            (State::Closed, _) => {
                let i = (step % BUCKETS as u64) as usize;
                if circuit.buckets[i].step != step {
                    circuit.buckets[i] = Bucket {
                        step,
                        calls: 0,
                        failures: 0,
                    };
                }
                circuit.buckets[i].calls += 1;
                circuit.buckets[i].failures += u32::from(failed);
                let live = circuit
                    .buckets
                    .iter()
                    .filter(|b| step.saturating_sub(b.step) < BUCKETS as u64);
                let (calls, failures) =
                    live.fold((0u32, 0u32), |(c, f), b| (c + b.calls, f + b.failures));
                if failed
                    && calls >= self.settings.min_calls.max(1)
                    && f64::from(failures) >= self.settings.failure_rate * f64::from(calls)
                {
                    let until = now + self.settings.cooldown;
                    self.transition(circuit, State::Open { until });
                }
            }
            // A late result of an attempt admitted before the circuit opened: it neither
            // reopens nor closes what has moved on.
            _ => {}
        }
    }

    /// The gauges: open for anyone (1) or closed (0), and how many credentials are refused.
    fn publish(&self, c: &Circuits) {
        let unreachable = c.unreachable != State::Closed;
        self.metrics
            .resilience
            .breaker_state
            .set(i64::from(unreachable || c.open > 0));
        self.metrics
            .resilience
            .breaker_open_credentials
            .set(c.open as i64);
    }

    /// The upstream was reached: no run of connect failures, and a probe for everyone succeeded.
    fn on_reached(&self, global_probe: bool) {
        let mut c = self.lock();
        c.connect_failures = 0;
        if global_probe && matches!(c.unreachable, State::HalfOpen { .. }) {
            self.transition_state(&mut c.unreachable, State::Closed);
            self.publish(&c);
        }
    }

    fn release_probe(&self, credential: &CredentialId, probe: bool, global_probe: bool) {
        if !probe && !global_probe {
            return;
        }
        let mut c = self.lock();
        if global_probe {
            if let State::HalfOpen { probing: true } = c.unreachable {
                c.unreachable = State::HalfOpen { probing: false };
            }
        }
        if probe {
            if let Some(circuit) = c.by_credential.get_mut(credential) {
                if let State::HalfOpen { probing: true } = circuit.state {
                    circuit.state = State::HalfOpen { probing: false };
                }
            }
        }
    }

    fn transition(&self, circuit: &mut Circuit, to: State) {
        self.transition_state(&mut circuit.state, to);
    }

    fn transition_state(&self, state: &mut State, to: State) {
        let (label, _) = to.label();
        tracing::warn!(to = label, "upstream circuit breaker");
        self.metrics
            .resilience
            .breaker_transitions
            .with_label_values(&[label])
            .inc();
        *state = to;
    }

    /// Whether calls for `credential` are refused now.
    pub fn is_open(&self, credential: &CredentialId) -> bool {
        let c = self.lock();
        c.unreachable != State::Closed
            || c.by_credential
                .get(credential)
                .is_some_and(|k| k.state != State::Closed)
    }
}

/// The breaker as a layer of the outbound stack: admits an attempt or refuses it at once, and
/// hears how each admitted attempt went. Without a breaker (`breaker.enabled = false`) it lets
/// everything through.
#[derive(Clone)]
pub struct BreakerLayer {
    breaker: Option<Arc<CircuitBreaker>>,
}

impl BreakerLayer {
    pub fn new(breaker: Option<Arc<CircuitBreaker>>) -> Self {
        BreakerLayer { breaker }
    }
}

impl<S> tower::Layer<S> for BreakerLayer {
    type Service = Breaker<S>;
    fn layer(&self, inner: S) -> Breaker<S> {
        Layered::new(self.clone(), inner)
    }
}

/// The breaker layer's service.
pub type Breaker<S> = Layered<BreakerLayer, S>;

impl<S, R, T> tower::Service<Attempt<R>> for Layered<BreakerLayer, S>
where
    S: tower::Service<Attempt<R>, Response = Tried<T>, Error = ProxyError> + Clone,
{
    type Response = Tried<T>;
    type Error = ProxyError;
    type Future = Judged<S::Future>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), ProxyError>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, attempt: Attempt<R>) -> Self::Future {
        let (layer, inner) = self.parts();
        // No breaker: the attempt goes straight on, and nobody hears how it went.
        let pass = match &layer.breaker {
            Some(breaker) => match breaker.admit(&attempt.credential) {
                Ok(pass) => Some(pass),
                Err(refused) => {
                    return Judged::Refused {
                        error: Some(refused),
                    }
                }
            },
            None => None,
        };
        Judged::Going {
            attempt: inner.clone().call(attempt),
            pass,
        }
    }
}

pin_project! {
    /// The breaker's future: refused at once, or the attempt below, whose outcome the breaker
    /// hears as it ends. A named type rather than a box: every upstream call passes here.
    #[project = JudgedProj]
    pub enum Judged<F> {
        Refused { error: Option<ProxyError> },
        Going {
            #[pin]
            attempt: F,
            // Dropped unreported if the attempt fails inside embedcar or its caller leaves:
            // that frees a probe without judging the upstream.
            pass: Option<Pass>,
        },
    }
}

impl<F, T> Future for Judged<F>
where
    F: Future<Output = Result<Tried<T>, ProxyError>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            JudgedProj::Refused { error } => {
                Poll::Ready(Err(error.take().expect("a refused attempt is polled once")))
            }
            JudgedProj::Going { attempt, pass } => {
                let result = ready!(attempt.poll(cx));
                if let (Ok(tried), Some(pass)) = (&result, pass.take()) {
                    match tried.health {
                        Health::Good => pass.succeeded(),
                        Health::Bad(how) => pass.failed(how),
                        Health::Neutral if tried.rate_limit.is_some() => pass.answered(),
                        Health::Neutral => pass.neutral(),
                    }
                }
                Poll::Ready(result)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: CredentialId = [1; 32];
    const B: CredentialId = [2; 32];

    fn breaker() -> Arc<CircuitBreaker> {
        let settings = BreakerConfig {
            enabled: true,
            failure_rate: 0.9,
            min_calls: 10,
            window: Duration::from_secs(10),
            connect_failures: 3,
            cooldown: Duration::from_secs(5),
        };
        Arc::new(CircuitBreaker::new(&settings, Arc::new(Metrics::new())))
    }

    #[tokio::test(start_paused = true)]
    async fn a_partly_failing_upstream_is_kept_in_service() {
        let b = breaker();
        // 70% failures, over and over: below the rate, the circuit stays closed.
        for i in 0..200 {
            let pass = b.admit(&A).expect("never shed");
            if i % 10 < 7 {
                pass.failed(Failure::Upstream);
            } else {
                pass.succeeded();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(!b.is_open(&A));
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_upstream_opens_after_min_calls_probes_after_the_cooldown_and_closes() {
        let b = breaker();
        for _ in 0..9 {
            b.admit(&A).unwrap().failed(Failure::Upstream);
        }
        assert!(!b.is_open(&A), "too few calls to judge");
        b.admit(&A).unwrap().failed(Failure::Upstream);
        let refused = b.admit(&A).err().expect("open");
        assert_eq!(refused.status(), http::StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(refused.retry_after(), Some(Duration::from_secs(5)));

        tokio::time::sleep(Duration::from_secs(5)).await;
        let probe = b.admit(&A).expect("a probe after the cool-down");
        assert!(b.admit(&A).is_err(), "only one probe at a time");
        probe.succeeded();
        assert!(!b.is_open(&A));
        // A fresh window: one more failure does not reopen it.
        b.admit(&A).unwrap().failed(Failure::Upstream);
        assert!(!b.is_open(&A));
    }

    #[tokio::test(start_paused = true)]
    async fn one_credentials_failures_do_not_shed_another() {
        let b = breaker();
        for _ in 0..10 {
            b.admit(&B).unwrap().failed(Failure::Upstream);
        }
        assert!(b.is_open(&B));
        assert!(b.admit(&A).is_ok(), "A is not shed for B's failures");
    }

    #[tokio::test(start_paused = true)]
    async fn old_failures_leave_the_window() {
        let b = breaker();
        for _ in 0..9 {
            b.admit(&A).unwrap().failed(Failure::Upstream);
        }
        tokio::time::sleep(Duration::from_secs(11)).await;
        b.admit(&A).unwrap().failed(Failure::Upstream);
        assert!(!b.is_open(&A));
    }

    #[tokio::test(start_paused = true)]
    async fn cannot_connect_fails_fast_for_everyone_until_the_cooldown() {
        let b = breaker();
        b.admit(&A).unwrap().failed(Failure::Connect);
        b.admit(&B).unwrap().failed(Failure::Connect);
        // An exchange that reached the upstream ends the run.
        b.admit(&A).unwrap().failed(Failure::Upstream);
        b.admit(&A).unwrap().failed(Failure::Connect);
        b.admit(&A).unwrap().failed(Failure::Connect);
        assert!(b.admit(&A).is_ok(), "two in a row, not three");
        b.admit(&B).unwrap().failed(Failure::Connect);
        assert!(
            b.admit(&A).is_err() && b.admit(&B).is_err(),
            "three in a row"
        );
        tokio::time::sleep(Duration::from_secs(5)).await;
        b.admit(&A).unwrap().succeeded();
        assert!(!b.is_open(&A) && !b.is_open(&B));
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_probe_reopens_and_an_abandoned_probe_frees_its_slot() {
        let b = breaker();
        for _ in 0..10 {
            b.admit(&A).unwrap().failed(Failure::Upstream);
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
        b.admit(&A).unwrap().failed(Failure::Upstream);
        assert!(b.admit(&A).is_err(), "open again");
        tokio::time::sleep(Duration::from_secs(5)).await;
        drop(b.admit(&A).unwrap());
        let again = b.admit(&A).expect("the abandoned probe's slot is free");
        again.neutral();
        assert!(b.is_open(&A), "a neutral probe decides nothing");
    }
}
