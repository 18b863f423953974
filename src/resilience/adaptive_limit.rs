//! How many embeddings calls may be in flight upstream at once, learnt from the upstream itself.
//!
//! The user does not know the upstream's capacity: OpenAI's moves, text-embeddings-inference
//! answers 429 past its `max-concurrent-requests`, Ollama serves one call at a time and queues
//! the rest. A fixed limit is either too high (calls queue inside the upstream and callers time
//! out) or too low (throughput is lost). So the limit adapts, as TCP's congestion window does
//! and as Envoy's adaptive concurrency and Netflix's concurrency-limits do:
//!
//! * **Latency is the signal.** A call that takes much longer than the upstream needs for a call
//!   of its size (the gradient `latency / baseline` of Envoy and Gradient2, over a tolerance)
//!   was queued behind others: the limit comes down to below the calls that were in flight when
//!   it started, at most once per round trip (only calls started after the last decrease can
//!   cause another, so one congested wave counts once). Cutting to what was in flight, rather
//!   than by a fixed factor, lands on the capacity at once instead of in a sawtooth around it.
//! * **Overload answers are the other signal.** A 429, a 503 or 504, or an attempt timeout means
//!   the upstream has too much now: the limit goes below the number of calls that were in flight
//!   when the refused call started. This is what finds text-embeddings-inference's capacity,
//!   which refuses instead of queueing.
//! * **Growth needs demand and calm.** The limit grows only when calls actually waited for it
//!   and latency held: by one per round trip until the first sign of congestion (start-up), then
//!   by one every [`PROBE_ROUNDS`] round trips, so an upstream that refuses past its capacity
//!   sees a refusal once in many calls, not every other call.
//! * **A bigger batch is not queueing.** The baseline is not one number: it is the lower
//!   envelope of latency against call size (tokens), per half-octave of size, each the minimum of
//!   a window re-measured every [`BASELINE_WINDOW`]. A call is judged against what a call of its
//!   size needs (interpolated, or extrapolated along the envelope's slope), so that bigger
//!   batches alone never shrink the limit.
//!
//! Why not Gradient2's running average as the baseline: with batching, the same upstream sees
//! calls of 1 input and of 2048, and an average of both is no one's baseline. Why not Vegas'
//! queue estimate alone: it needs the same size-aware baseline, and then it is this.
//!
//! The limit never goes above `limits.max_concurrency` (the ceiling) nor below one.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::{sync::Semaphore, time::Instant};

use crate::metrics::Metrics;

/// Where the limit starts: low, so a new embedcar does not open a burst of calls against an
/// upstream whose capacity it has not seen. Batching makes a low limit cheap (one call carries
/// up to 2048 inputs, and the call that takes the last free place gathers the tail of a burst),
/// and start-up growth finds a larger capacity within a few round trips.
pub const INITIAL_LIMIT: usize = 2;
/// The limit never goes below this.
pub const MIN_LIMIT: usize = 1;
/// Latency up to this multiple of the size-adjusted baseline is not queueing: room for the
/// noise of a healthy upstream (and for a call up to one size class larger than its class's
/// baseline when latency grows linearly with size).
pub const TOLERANCE: f64 = 1.5;
/// ...and by at least this much: at a few milliseconds per call, scheduling noise alone doubles
/// a latency now and then, and that is no queue.
pub const MIN_QUEUEING_DELAY: Duration = Duration::from_millis(5);
/// The longest a call taking the last free place waits to gather the tail of a burst, and how
/// long before any baseline is known.
pub const MAX_LAST_PLACE_GATHER: Duration = Duration::from_millis(100);
/// After the first sign of congestion the limit probes one higher only after this many round
/// trips at the limit with latency holding.
pub const PROBE_ROUNDS: u32 = 5;
/// Each size class keeps its minimum latency over this window and the previous one, so the
/// baseline follows an upstream that became slower for good within two windows.
pub const BASELINE_WINDOW: Duration = Duration::from_secs(30);
/// Size classes: half-octaves of tokens, up to 2^20 tokens (OpenAI's cap per call is 300,000).
const CLASSES: usize = 41;

/// What a finished call tells the limiter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// A 2xx: its latency is a sample of what the upstream needs.
    Answered,
    /// 429, 503, 504 or an attempt timeout: the upstream has too much now.
    Overloaded,
    /// Abandoned because every caller left (deadlines): the call took at least this long, so
    /// its elapsed time is a lower bound on its latency.
    Abandoned,
    /// Nothing learnt about load (a 4xx about the request, a failure inside embedcar, a
    /// connection that could not be made: the breaker's business, not the limiter's).
    Ignore,
}

/// A decision, for the metric and the tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    IncreaseStartup,
    IncreaseProbe,
    DecreaseLatency,
    DecreaseOverload,
}

impl Decision {
    pub const ALL: [Decision; 4] = [
        Decision::IncreaseStartup,
        Decision::IncreaseProbe,
        Decision::DecreaseLatency,
        Decision::DecreaseOverload,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Decision::IncreaseStartup => "increase_startup",
            Decision::IncreaseProbe => "increase_probe",
            Decision::DecreaseLatency => "decrease_latency",
            Decision::DecreaseOverload => "decrease_overload",
        }
    }
}

#[derive(Clone)]
pub struct AdaptiveLimit {
    inner: Arc<Inner>,
}

struct Inner {
    /// Free places under the current limit. Places are taken and given back by hand (the
    /// permits are forgotten at once), because the limit moves while calls are in flight.
    places: Semaphore,
    state: Mutex<State>,
    max: usize,
    metrics: Arc<Metrics>,
}

#[derive(Clone, Copy, Default)]
struct ClassBaseline {
    current: Option<Duration>,
    previous: Option<Duration>,
}

impl ClassBaseline {
    fn min(&self) -> Option<Duration> {
        match (self.current, self.previous) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

struct State {
    limit: usize,
    in_flight: usize,
    /// Callers waiting for a place now: demand beyond the limit.
    waiting: usize,
    /// Places to withhold as calls finish, after a decrease below the calls in flight.
    debt: usize,
    /// Bumped at each decrease; a call started before the last decrease does not decrease again.
    decrease_epoch: u64,
    /// Bumped at each increase; growth is at most one per round trip.
    increase_epoch: u64,
    /// Whether the upstream has shown congestion yet (start-up growth until then).
    congested: bool,
    /// Round trips at the limit with latency holding, since the last change.
    calm_rounds: u32,
    classes: [ClassBaseline; CLASSES],
    window_started: Instant,
    /// The baseline the last judged call was compared with (for the metric).
    last_expected: Option<Duration>,
}

/// A place for one upstream call. Report how the call went with [`Place::finish`]; a place
/// dropped without a report (a cancelled call) is given back without a judgement.
pub struct Place {
    limit: Arc<Inner>,
    started: Instant,
    decrease_epoch: u64,
    increase_epoch: u64,
    in_flight_at_start: usize,
    /// Whether demand reached the limit when this call took its place.
    limited: bool,
    finished: bool,
}

impl AdaptiveLimit {
    /// `max` is the ceiling (`limits.max_concurrency`).
    pub fn new(max: usize, metrics: Arc<Metrics>) -> AdaptiveLimit {
        let max = max.max(MIN_LIMIT);
        let limit = INITIAL_LIMIT.clamp(MIN_LIMIT, max);
        metrics.resilience.adaptive_limit.set(limit as i64);
        AdaptiveLimit {
            inner: Arc::new(Inner {
                places: Semaphore::new(limit),
                state: Mutex::new(State {
                    limit,
                    in_flight: 0,
                    waiting: 0,
                    debt: 0,
                    decrease_epoch: 0,
                    increase_epoch: 0,
                    congested: false,
                    calm_rounds: 0,
                    classes: [ClassBaseline::default(); CLASSES],
                    window_started: Instant::now(),
                    last_expected: None,
                }),
                max,
                metrics,
            }),
        }
    }

    /// The current limit.
    pub fn limit(&self) -> usize {
        self.inner.lock().limit
    }

    /// What an unqueued call of `tokens` takes, as far as the limiter has seen.
    pub fn expected(&self, tokens: u64) -> Option<Duration> {
        self.inner.lock().expected(tokens)
    }

    /// The same, but only when a call of this size or larger has been seen: an estimate
    /// extrapolated upwards is good enough to judge queueing once, not to cut a call short (a
    /// first batch of 2048 inputs would be cut for taking longer than single inputs do).
    pub fn expected_within_seen(&self, tokens: u64) -> Option<Duration> {
        let s = self.inner.lock();
        let class = class_of(tokens);
        if s.classes[class..].iter().all(|c| c.min().is_none()) {
            return None;
        }
        s.expected(tokens)
    }

    /// When the place just taken was the last free one: how long its call may gather more
    /// inputs before it leaves (a twentieth of the last judged baseline, at most
    /// [`MAX_LAST_PLACE_GATHER`], which is also the gather while no baseline is known yet).
    /// `None` while places are left.
    pub fn last_place_gather(&self) -> Option<Duration> {
        if self.inner.places.available_permits() > 0 {
            return None;
        }
        let s = self.inner.lock();
        Some(s.last_expected.map_or(MAX_LAST_PLACE_GATHER, |e| {
            (e / 20).min(MAX_LAST_PLACE_GATHER)
        }))
    }

    /// Takes a place, waiting as long as that takes: the engine's callers each carry their own
    /// deadline and leave when it passes, and inputs nobody waits for are not sent.
    pub async fn acquire(&self) -> Place {
        let inner = &self.inner;
        let permit = match inner.places.try_acquire() {
            Ok(p) => p,
            Err(_) => {
                inner.lock().waiting += 1;
                let waiting = Waiting(inner);
                let p = inner
                    .places
                    .acquire()
                    .await
                    .expect("the places semaphore is never closed");
                drop(waiting);
                p
            }
        };
        permit.forget();
        let mut s = inner.lock();
        s.in_flight += 1;
        let limited = s.in_flight >= s.limit || s.waiting > 0;
        Place {
            limit: inner.clone(),
            started: Instant::now(),
            decrease_epoch: s.decrease_epoch,
            increase_epoch: s.increase_epoch,
            in_flight_at_start: s.in_flight,
            limited,
            finished: false,
        }
    }
}

/// Leaves the waiting count however the wait ends.
struct Waiting<'a>(&'a Inner);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.lock().waiting -= 1;
    }
}

impl Place {
    /// Reports how the call went; `tokens` is its size (what its baseline depends on).
    pub fn finish(mut self, signal: Signal, tokens: u64) -> Option<Decision> {
        let elapsed = self.started.elapsed();
        let inner = self.limit.clone();
        let mut s = inner.lock();
        let decision = s.judge(&self, signal, tokens, elapsed, inner.max, &inner.places);
        if let Some(d) = decision {
            inner
                .metrics
                .resilience
                .adaptive_decisions
                .with_label_values(&[d.label()])
                .inc();
            inner.metrics.resilience.adaptive_limit.set(s.limit as i64);
        }
        if let Some(e) = s.last_expected {
            inner
                .metrics
                .resilience
                .adaptive_baseline
                .set(e.as_secs_f64());
        }
        s.release(&inner.places);
        self.finished = true;
        decision
    }

    /// Starts the call's clock now, when its request is sent: what the limiter judges is the
    /// upstream's time, not embedcar's own waits (a slot shared with pass-through, a rate gate,
    /// the batching yield) before it.
    pub fn sent(&mut self) {
        self.started = Instant::now();
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        if !self.finished {
            let inner = self.limit.clone();
            inner.lock().release(&inner.places);
        }
    }
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Whether a call that took `elapsed` where an unqueued one takes `expected` waited in a queue.
fn queued(expected: Duration, elapsed: Duration) -> bool {
    elapsed.as_secs_f64() > expected.as_secs_f64() * TOLERANCE
        && elapsed > expected + MIN_QUEUEING_DELAY
}

/// A call's size class: half-octaves of its tokens.
fn class_of(tokens: u64) -> usize {
    let t = tokens.max(1) as f64;
    ((2.0 * t.log2()) as usize).min(CLASSES - 1)
}

/// The smallest size a class stands for, for interpolating between classes.
fn class_size(class: usize) -> f64 {
    2f64.powf(class as f64 / 2.0)
}

impl State {
    fn judge(
        &mut self,
        place: &Place,
        signal: Signal,
        tokens: u64,
        elapsed: Duration,
        max: usize,
        places: &Semaphore,
    ) -> Option<Decision> {
        self.rotate_windows();
        let fresh = place.decrease_epoch == self.decrease_epoch;
        match signal {
            Signal::Ignore => None,
            Signal::Overloaded => {
                // Below the calls in flight when this one was refused.
                if fresh {
                    let target = self.queued_target(place);
                    self.decrease(places, target, Decision::DecreaseOverload)
                } else {
                    None
                }
            }
            Signal::Abandoned => {
                let expected = self.expected(tokens)?;
                self.last_expected = Some(expected);
                if fresh && queued(expected, elapsed) && place.in_flight_at_start >= 2 {
                    let target = self.queued_target(place);
                    self.decrease(places, target, Decision::DecreaseLatency)
                } else {
                    None
                }
            }
            Signal::Answered => self.on_answered(place, fresh, tokens, elapsed, max, places),
        }
    }

    /// An answered call: its latency teaches the baseline unless it queued; a queued one lowers
    /// the limit, a calm one may raise it.
    fn on_answered(
        &mut self,
        place: &Place,
        fresh: bool,
        tokens: u64,
        elapsed: Duration,
        max: usize,
        places: &Semaphore,
    ) -> Option<Decision> {
        let expected = self.expected(tokens);
        self.last_expected = expected.or(Some(elapsed));
        let was_queued = expected.is_some_and(|e| queued(e, elapsed));
        // A queued call's latency is no baseline: recorded, it would make its size
        // look slow for good. A call that ran alone was queued behind none of ours, so
        // it counts whatever it took (this also heals a size misjudged from too few
        // others: the limit falls until calls run alone, and they teach the baseline).
        if !was_queued || place.in_flight_at_start <= 1 {
            self.record(tokens, elapsed);
        }
        // A call that ran alone queued behind none of ours: whatever slowed it (the
        // upstream's other clients), fewer calls of ours would not help.
        if was_queued {
            return if fresh && place.in_flight_at_start >= 2 {
                let target = self.queued_target(place);
                self.decrease(places, target, Decision::DecreaseLatency)
            } else {
                None
            };
        }
        self.maybe_increase(place, max, places)
    }

    /// A calm call that ran at the limit: raises it, at once while starting up, else after
    /// `PROBE_ROUNDS` calm round trips (each increase starts a new round).
    fn maybe_increase(
        &mut self,
        place: &Place,
        max: usize,
        places: &Semaphore,
    ) -> Option<Decision> {
        if !place.limited || place.increase_epoch != self.increase_epoch || self.limit >= max {
            return None;
        }
        // One calm round trip at the limit (each increase starts a new round).
        self.calm_rounds += 1;
        let decision = if !self.congested {
            Decision::IncreaseStartup
        } else if self.calm_rounds >= PROBE_ROUNDS {
            Decision::IncreaseProbe
        } else {
            // Counted once per round: the next call of this round must not count again.
            self.increase_epoch += 1;
            return None;
        };
        self.limit += 1;
        if self.debt > 0 {
            self.debt -= 1;
        } else {
            places.add_permits(1);
        }
        self.calm_rounds = 0;
        self.increase_epoch += 1;
        Some(decision)
    }

    /// The limit a queued or refused call asks for: below the calls in flight when it started
    /// (it queued behind them, so that many were too many); a call refused while it ran alone
    /// says less (the upstream's other clients), and takes one off.
    fn queued_target(&self, place: &Place) -> usize {
        let target = if place.in_flight_at_start >= 2 {
            place.in_flight_at_start - 1
        } else {
            self.limit.saturating_sub(1)
        };
        target.min(self.limit.saturating_sub(1))
    }

    fn decrease(
        &mut self,
        places: &Semaphore,
        target: usize,
        decision: Decision,
    ) -> Option<Decision> {
        let target = target.max(MIN_LIMIT);
        self.congested = true;
        self.calm_rounds = 0;
        self.decrease_epoch += 1;
        self.increase_epoch += 1;
        if target >= self.limit {
            return None;
        }
        self.debt += self.limit - target;
        self.limit = target;
        while self.debt > 0 {
            match places.try_acquire() {
                Ok(p) => {
                    p.forget();
                    self.debt -= 1;
                }
                Err(_) => break,
            }
        }
        Some(decision)
    }

    /// Gives a finished call's place back, or withholds it against a decrease.
    /// The books: calls in flight + free places = limit + places owed.
    fn release(&mut self, places: &Semaphore) {
        self.in_flight -= 1;
        if self.debt > 0 {
            self.debt -= 1;
        } else {
            places.add_permits(1);
        }
    }

    fn rotate_windows(&mut self) {
        let now = Instant::now();
        let since = now.duration_since(self.window_started);
        if since >= BASELINE_WINDOW * 2 {
            // Quiet for two windows or more: what was seen then is no baseline now.
            self.classes = [ClassBaseline::default(); CLASSES];
            self.window_started = now;
        } else if since >= BASELINE_WINDOW {
            for c in &mut self.classes {
                c.previous = c.current.take();
            }
            self.window_started = now;
        }
    }

    fn record(&mut self, tokens: u64, latency: Duration) {
        let c = &mut self.classes[class_of(tokens)];
        c.current = Some(c.current.map_or(latency, |m| m.min(latency)));
    }

    /// What an unqueued call of `tokens` takes: its class's baseline, else the lower envelope
    /// interpolated between the nearest known classes, or extrapolated along the slope of the
    /// two nearest (never steeper than proportional to size, never falling with size).
    fn expected(&self, tokens: u64) -> Option<Duration> {
        let class = class_of(tokens);
        if let Some(b) = self.classes[class].min() {
            return Some(b);
        }
        let size = tokens.max(1) as f64;
        // The nearest class with a baseline in a direction: (its class, its size, its latency).
        let known = |mut range: Box<dyn Iterator<Item = usize>>| {
            range.find_map(|c| {
                self.classes[c]
                    .min()
                    .map(|b| (c, class_size(c), b.as_secs_f64()))
            })
        };
        let below = known(Box::new((0..class).rev()));
        let above = known(Box::new(class + 1..CLASSES));
        let secs = match (below, above) {
            (Some((_, s0, b0)), Some((_, s1, b1))) => {
                let slope = ((b1 - b0) / (s1 - s0)).max(0.0);
                b0 + slope * (size - s0)
            }
            (Some((c0, s0, b0)), None) => {
                let slope = match known(Box::new((0..c0).rev())) {
                    Some((_, sl, bl)) => ((b0 - bl) / (s0 - sl)).clamp(0.0, b0 / s0),
                    // One size seen so far: latency is assumed flat until a second size says
                    // otherwise (a bigger first call may then be judged queued once).
                    None => 0.0,
                };
                b0 + slope * (size - s0)
            }
            (None, Some((_, _, b1))) => b1,
            (None, None) => return None,
        };
        Some(Duration::from_secs_f64(secs.max(0.0)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A simulated upstream: `capacity` calls served at once in `service(tokens)` each, the rest
    /// queued in arrival order (Ollama, vLLM) or refused at once (text-embeddings-inference).
    struct Upstream {
        capacity: usize,
        refuse_beyond: bool,
    }

    fn limiter(max: usize) -> AdaptiveLimit {
        AdaptiveLimit::new(max, Arc::new(Metrics::new()))
    }

    /// Runs `callers` closed-loop callers, each sending calls of `tokens(i)` for `rounds`,
    /// through the limiter to a simulated upstream; returns the limit at the end and how many
    /// calls were refused.
    async fn drive(
        limit: &AdaptiveLimit,
        upstream: Arc<Mutex<Upstream>>,
        callers: usize,
        calls_each: usize,
        service: impl Fn(u64) -> Duration + Send + Sync + 'static,
        tokens: impl Fn(usize) -> u64 + Send + Sync + 'static,
    ) -> (usize, usize) {
        let busy = Arc::new(Semaphore::new(0));
        {
            let cap = upstream.lock().unwrap().capacity;
            busy.add_permits(cap);
        }
        let refused = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let service = Arc::new(service);
        let tokens = Arc::new(tokens);
        let mut tasks = Vec::new();
        for _ in 0..callers {
            let (limit, upstream, busy, refused, service, tokens) = (
                limit.clone(),
                upstream.clone(),
                busy.clone(),
                refused.clone(),
                service.clone(),
                tokens.clone(),
            );
            tasks.push(tokio::spawn(async move {
                for i in 0..calls_each {
                    let size = tokens(i);
                    let place = limit.acquire().await;
                    let refuse = upstream.lock().unwrap().refuse_beyond;
                    let slot = if refuse {
                        match busy.clone().try_acquire_owned() {
                            Ok(s) => s,
                            Err(_) => {
                                refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                tokio::time::sleep(Duration::from_millis(1)).await;
                                place.finish(Signal::Overloaded, size);
                                continue;
                            }
                        }
                    } else {
                        busy.clone().acquire_owned().await.unwrap()
                    };
                    tokio::time::sleep(service(size)).await;
                    drop(slot);
                    place.finish(Signal::Answered, size);
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        (
            limit.limit(),
            refused.load(std::sync::atomic::Ordering::Relaxed),
        )
    }

    fn queueing(capacity: usize) -> Arc<Mutex<Upstream>> {
        Arc::new(Mutex::new(Upstream {
            capacity,
            refuse_beyond: false,
        }))
    }

    #[tokio::test(start_paused = true)]
    async fn the_limit_settles_at_a_queueing_upstreams_capacity() {
        for capacity in [1, 3, 8] {
            let limit = limiter(256);
            let (settled, _) = drive(
                &limit,
                queueing(capacity),
                40,
                30,
                |_| Duration::from_millis(100),
                |_| 10,
            )
            .await;
            assert!(
                settled.abs_diff(capacity) <= 1,
                "capacity {capacity}: settled at {settled}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_refusing_upstream_is_found_and_rarely_refuses() {
        let limit = limiter(256);
        let upstream = Arc::new(Mutex::new(Upstream {
            capacity: 3,
            refuse_beyond: true,
        }));
        let callers = 20;
        let calls = 50;
        let (settled, refused) = drive(
            &limit,
            upstream,
            callers,
            calls,
            |_| Duration::from_millis(300),
            |_| 10,
        )
        .await;
        assert!(settled.abs_diff(3) <= 1, "settled at {settled}");
        let total = callers * calls;
        assert!(
            refused * 10 <= total,
            "{refused} of {total} calls refused (> 10%)"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_limit_rises_again_when_capacity_grows() {
        let limit = limiter(256);
        let (first, _) = drive(
            &limit,
            queueing(3),
            30,
            20,
            |_| Duration::from_millis(100),
            |_| 10,
        )
        .await;
        assert!(first <= 4, "{first}");
        let (later, _) = drive(
            &limit,
            queueing(12),
            30,
            60,
            |_| Duration::from_millis(100),
            |_| 10,
        )
        .await;
        let m = &limit.inner.metrics.resilience.adaptive_decisions;
        let counts: Vec<_> = Decision::ALL
            .iter()
            .map(|d| (d.label(), m.with_label_values(&[d.label()]).get()))
            .collect();
        assert!(
            later >= 10,
            "capacity 12: the limit only reached {later} {counts:?}"
        );
        // And down again when capacity shrinks mid-run.
        let (shrunk, _) = drive(
            &limit,
            queueing(2),
            30,
            20,
            |_| Duration::from_millis(100),
            |_| 10,
        )
        .await;
        assert!(shrunk <= 3, "capacity 2: the limit stayed at {shrunk}");
    }

    #[tokio::test(start_paused = true)]
    async fn bigger_batches_alone_do_not_lower_the_limit() {
        // Plenty of capacity; latency grows with the call's size (a fixed part plus a part per
        // token), and every caller's calls grow from 10 to 300,000 tokens.
        let limit = limiter(16);
        let (settled, _) = drive(
            &limit,
            queueing(64),
            16,
            40,
            |tokens| Duration::from_millis(50) + Duration::from_micros(tokens * 10),
            |i| (10.0 * 1.35f64.powi(i as i32)).min(300_000.0) as u64,
        )
        .await;
        assert_eq!(settled, 16, "the limit should have grown to the ceiling");
        let decreases = limit
            .inner
            .metrics
            .resilience
            .adaptive_decisions
            .with_label_values(&[Decision::DecreaseLatency.label()])
            .get();
        assert_eq!(decreases, 0, "size growth was taken for queueing");
    }

    #[tokio::test(start_paused = true)]
    async fn the_limit_never_passes_the_ceiling_nor_goes_below_one() {
        let limit = limiter(3);
        let (settled, _) = drive(
            &limit,
            queueing(100),
            10,
            20,
            |_| Duration::from_millis(10),
            |_| 10,
        )
        .await;
        assert_eq!(settled, 3);
        let limit = limiter(256);
        for _ in 0..20 {
            limit.acquire().await.finish(Signal::Overloaded, 10);
        }
        assert_eq!(limit.limit(), MIN_LIMIT);
        // Places still work at the floor.
        let p = limit.acquire().await;
        p.finish(Signal::Answered, 10);
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_place_is_given_back() {
        let limit = limiter(256);
        for _ in 0..10 {
            let a = limit.acquire().await;
            let b = limit.acquire().await;
            drop(a);
            drop(b);
        }
        assert_eq!(limit.inner.places.available_permits(), INITIAL_LIMIT);
    }
}
