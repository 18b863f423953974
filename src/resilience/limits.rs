//! Concurrency toward the upstream: a fixed number of slots and a bounded wait for one.
//!
//! The slot count is what keeps a burst of callers from opening hundreds of upstream requests at
//! once. The bounded wait is what keeps a caller from hanging behind them: a request that cannot
//! get a slot within its wait budget is answered at once with 503 and Retry-After, which the
//! official clients treat as retryable.

use std::{
    future::Future,
    pin::Pin,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    task::{ready, Context, Poll},
    time::Duration,
};

use pin_project_lite::pin_project;

use http::{HeaderMap, HeaderName};

use tokio::{
    sync::{OwnedSemaphorePermit, Semaphore},
    time::Instant,
};

use crate::{
    http::errors::ProxyError,
    metrics::Metrics,
    resilience::{
        adaptive_limit::{AdaptiveLimit, Place as LearntPlace, Signal},
        retry::Tried,
    },
    upstream::outbound::{Attempt, Below, BoxFuture, Kind, Layered, Placed},
};

/// Retry-After suggested to a caller shed for lack of a slot: soon, since slots turn over fast.
pub const OVERLOADED_RETRY_AFTER: Duration = Duration::from_secs(1);

#[derive(Clone)]
pub struct ConcurrencyLimit {
    slots: Arc<Semaphore>,
    max: usize,
    max_wait: Duration,
    /// Requests waiting for a slot now, and how many may.
    waiting: Arc<AtomicUsize>,
    max_waiting: usize,
    metrics: Arc<Metrics>,
}

/// Decrements the waiting count however the wait ends (a slot, a timeout, the caller leaving).
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Headers in which the official clients say how long they will wait, in seconds: the Python
/// client's read timeout and the Node client's overall timeout.
const CLIENT_TIMEOUT_HINTS: [HeaderName; 2] = [
    HeaderName::from_static("x-stainless-read-timeout"),
    HeaderName::from_static("x-stainless-timeout"),
];

/// A request's time budget: the configured timeout, shortened by the client's own hint when it
/// gave one (work past the point where the client has given up is wasted).
pub fn time_budget(headers: &HeaderMap, configured: Duration) -> Duration {
    CLIENT_TIMEOUT_HINTS
        .iter()
        .filter_map(|name| headers.get(name)?.to_str().ok()?.trim().parse::<f64>().ok())
        .filter(|secs| secs.is_finite() && *secs > 0.0)
        .map(|secs| Duration::from_secs_f64(secs.min(1e9)))
        .fold(configured, Duration::min)
}

/// A held upstream slot; the slot frees when this drops (at the end of the response body).
pub struct Slot {
    _permit: OwnedSemaphorePermit,
    metrics: Arc<Metrics>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.metrics.upstream.in_flight.dec();
    }
}

impl ConcurrencyLimit {
    pub fn new(max: usize, max_wait: Duration, max_waiting: usize, metrics: Arc<Metrics>) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(max)),
            max,
            max_wait,
            waiting: Arc::new(AtomicUsize::new(0)),
            max_waiting,
            metrics,
        }
    }

    /// A slot if one is free now.
    fn try_acquire(&self) -> Option<Slot> {
        let permit = self.slots.clone().try_acquire_owned().ok()?;
        self.metrics.resilience.concurrency_wait.observe(0.0);
        Some(self.held(permit))
    }

    fn held(&self, permit: OwnedSemaphorePermit) -> Slot {
        self.metrics.upstream.in_flight.inc();
        Slot {
            _permit: permit,
            metrics: self.metrics.clone(),
        }
    }

    /// Takes a slot, waiting at most the wait budget (and never past `deadline`, when given).
    pub async fn acquire(&self, deadline: Option<Instant>) -> Result<Slot, ProxyError> {
        let started = Instant::now();
        let permit = match self.slots.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                if self.waiting.fetch_add(1, Ordering::Relaxed) >= self.max_waiting {
                    self.waiting.fetch_sub(1, Ordering::Relaxed);
                    return Err(ProxyError::QueueFull {
                        retry_after: OVERLOADED_RETRY_AFTER,
                    });
                }
                let _waiting = Waiting(&self.waiting);
                let mut until = started + self.max_wait;
                if let Some(d) = deadline {
                    until = until.min(d);
                }
                match tokio::time::timeout_at(until, self.slots.clone().acquire_owned()).await {
                    Ok(Ok(p)) => p,
                    // The semaphore is never closed; treat it like a timeout all the same.
                    Ok(Err(_)) | Err(_) => {
                        self.metrics
                            .resilience
                            .concurrency_wait
                            .observe(started.elapsed().as_secs_f64());
                        return Err(ProxyError::Overloaded {
                            max_concurrency: self.max,
                            waited: started.elapsed(),
                            retry_after: OVERLOADED_RETRY_AFTER,
                        });
                    }
                }
            }
        };
        self.metrics
            .resilience
            .concurrency_wait
            .observe(started.elapsed().as_secs_f64());
        Ok(self.held(permit))
    }

    /// Takes a slot, however long that takes: for the embeddings dispatchers, whose callers
    /// each carry their own deadline and leave (so that their inputs are dropped) when it
    /// passes.
    pub async fn acquire_unbounded(&self) -> Slot {
        let started = Instant::now();
        let permit = self
            .slots
            .clone()
            .acquire_owned()
            .await
            .expect("the slot semaphore is never closed");
        self.metrics
            .resilience
            .concurrency_wait
            .observe(started.elapsed().as_secs_f64());
        self.held(permit)
    }

    pub fn available(&self) -> usize {
        self.slots.available_permits()
    }
}

/// Everything that bounds concurrency toward the upstream: the ceiling every call shares
/// (`limits.max_concurrency`) and the engine's learnt limit (`limits.adaptive_concurrency`).
/// Pass-through does not take places of the learnt limit: a stream's length says nothing of
/// the upstream's capacity.
pub struct Capacity {
    pub ceiling: ConcurrencyLimit,
    pub learnt: Option<AdaptiveLimit>,
}

impl Capacity {
    /// Places for one engine call: the learnt limit's, then a slot under the ceiling, however
    /// long that takes (the engine's callers leave on their own deadlines, and inputs nobody
    /// waits for are not sent).
    pub async fn engine_places(&self) -> Places {
        let place = match &self.learnt {
            Some(l) => Some(l.acquire().await),
            None => None,
        };
        Places {
            slot: self.ceiling.acquire_unbounded().await,
            place,
        }
    }

    /// A pass-through slot if one is free now.
    fn free_pass_through_slot(&self) -> Option<Places> {
        Some(Places {
            slot: self.ceiling.try_acquire()?,
            place: None,
        })
    }

    /// A pass-through slot, within the wait budget and by `deadline`.
    async fn pass_through_slot(&self, deadline: Instant) -> Result<Places, ProxyError> {
        Ok(Places {
            slot: self.ceiling.acquire(Some(deadline)).await?,
            place: None,
        })
    }
}

/// What an upstream call holds while it is in flight.
pub struct Places {
    slot: Slot,
    place: Option<LearntPlace>,
}

impl Places {
    /// Starts the learnt limit's clock: what it judges is the upstream's time, not embedcar's
    /// own waits before it.
    fn sent(&mut self) {
        if let Some(p) = &mut self.place {
            p.sent();
        }
    }

    /// Frees both, telling the learnt limit what the call showed (`tokens`: its size, which
    /// its baseline depends on).
    pub fn finish(self, signal: Signal, tokens: u64) {
        if let Some(p) = self.place {
            p.finish(signal, tokens);
        }
    }
}

/// The places as a layer of the outbound stack.
#[derive(Clone)]
pub struct PlaceLayer {
    capacity: Arc<Capacity>,
}

impl PlaceLayer {
    pub fn new(capacity: Arc<Capacity>) -> Self {
        PlaceLayer { capacity }
    }
}

impl<S> tower::Layer<S> for PlaceLayer {
    type Service = Place<S>;
    fn layer(&self, inner: S) -> Place<S> {
        Layered::new(self.clone(), inner)
    }
}

/// The places layer's service.
pub type Place<S> = Layered<PlaceLayer, S>;

impl<S, R, T> tower::Service<Attempt<R>> for Layered<PlaceLayer, S>
where
    S: Below<R> + tower::Service<Attempt<R>, Response = Tried<T>>,
    R: Send + 'static,
    T: Send + 'static,
{
    type Response = Tried<Placed<T>>;
    type Error = ProxyError;
    type Future = Placing<S::Future, T>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), ProxyError>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut attempt: Attempt<R>) -> Self::Future {
        let (layer, inner) = self.parts();
        let capacity = &layer.capacity;
        // Places held already or free now: the attempt goes on at once.
        let at_once = match (attempt.places.take(), attempt.kind) {
            (Some(held), _) => Some(held),
            (None, Kind::PassThrough { .. }) => capacity.free_pass_through_slot(),
            (None, Kind::Engine) => None,
        };
        match at_once {
            Some(places) => placed(inner, places, attempt),
            None => {
                let shared = self.shared();
                Placing::Waiting {
                    attempt: Box::pin(async move {
                        let (layer, inner) = &*shared;
                        let capacity = &layer.capacity;
                        let places = match attempt.kind {
                            Kind::Engine => capacity.engine_places().await,
                            Kind::PassThrough { .. } => {
                                capacity.pass_through_slot(attempt.deadline).await?
                            }
                        };
                        placed(inner, places, attempt).await
                    }),
                }
            }
        }
    }
}
/// Sends the attempt on with its places held, which start the learnt limit's clock.
fn placed<S, R, T>(inner: &S, mut places: Places, attempt: Attempt<R>) -> Placing<S::Future, T>
where
    S: tower::Service<Attempt<R>, Response = Tried<T>, Error = ProxyError> + Clone,
{
    let (kind, tokens) = (attempt.kind, attempt.tokens);
    places.sent();
    Placing::Held {
        attempt: inner.clone().call(attempt),
        places: Some(places),
        kind,
        tokens,
    }
}

pin_project! {
    /// The places layer's future: the attempt with its places held (a named type, no box,
    /// when they were free or held already), or a wait for them first.
    #[project = PlacingProj]
    pub enum Placing<F, T> {
        Held {
            #[pin]
            attempt: F,
            places: Option<Places>,
            kind: Kind,
            tokens: u64,
        },
        Waiting { attempt: BoxFuture<Result<Tried<Placed<T>>, ProxyError>> },
    }
}

impl<F, T> Future for Placing<F, T>
where
    F: Future<Output = Result<Tried<T>, ProxyError>>,
{
    type Output = Result<Tried<Placed<T>>, ProxyError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let (attempt, places, kind, tokens) = match self.project() {
            PlacingProj::Waiting { attempt } => return attempt.as_mut().poll(cx),
            PlacingProj::Held {
                attempt,
                places,
                kind,
                tokens,
            } => (attempt, places, *kind, *tokens),
        };
        let result = ready!(attempt.poll(cx));
        // Taken before a failure returns, so the places go before the breaker above hears it.
        let places = places.take().expect("polled after it ended");
        let tried = result?;
        Poll::Ready(Ok(match kind {
            // The engine's attempt has read its reply: its places are done with. Its size is
            // what it sent (only the inputs someone still waited for).
            Kind::Engine => {
                places.finish(tried.signal, tried.size.unwrap_or(tokens));
                tried.map(|value| Placed { value, slot: None })
            }
            // A passed-through response streams on: its slot goes with it.
            Kind::PassThrough { .. } => tried.map(|value| Placed {
                value,
                slot: Some(places.slot),
            }),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_caller_waits_for_a_slot_within_its_budget_then_is_shed() {
        let limit = ConcurrencyLimit::new(1, Duration::from_secs(2), 100, Arc::new(Metrics::new()));
        let held = limit.acquire(None).await.unwrap();
        assert_eq!(limit.available(), 0);

        // A slot freed within the budget is taken.
        let l2 = limit.clone();
        let waiter = tokio::spawn(async move { l2.acquire(None).await.map(|_| ()) });
        tokio::time::sleep(Duration::from_secs(1)).await;
        drop(held);
        assert!(waiter.await.unwrap().is_ok());

        // A slot that stays busy sheds the waiter exactly at the budget, with a Retry-After.
        let _held = limit.acquire(None).await.unwrap();
        let started = Instant::now();
        let err = limit.acquire(None).await.err().expect("shed");
        assert_eq!(started.elapsed(), Duration::from_secs(2));
        assert_eq!(err.status(), http::StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(err.retry_after(), Some(OVERLOADED_RETRY_AFTER));
    }

    #[tokio::test(start_paused = true)]
    async fn beyond_the_waiting_bound_callers_are_shed_at_once() {
        let limit = ConcurrencyLimit::new(1, Duration::from_secs(10), 2, Arc::new(Metrics::new()));
        let _held = limit.acquire(None).await.unwrap();
        let waiters: Vec<_> = (0..2)
            .map(|_| {
                let l = limit.clone();
                tokio::spawn(async move { l.acquire(None).await.map(|_| ()) })
            })
            .collect();
        tokio::task::yield_now().await;
        let started = Instant::now();
        let err = limit.acquire(None).await.err().expect("shed");
        assert_eq!(started.elapsed(), Duration::ZERO);
        assert_eq!(err.code(), "queue_full");
        for w in waiters {
            w.abort();
        }
    }

    #[test]
    fn the_clients_timeout_hint_shortens_the_budget() {
        let mut h = HeaderMap::new();
        let configured = Duration::from_secs(60);
        assert_eq!(time_budget(&h, configured), configured);
        h.insert("x-stainless-read-timeout", "1.5".parse().unwrap());
        assert_eq!(time_budget(&h, configured), Duration::from_millis(1500));
        h.insert("x-stainless-timeout", "600".parse().unwrap());
        assert_eq!(time_budget(&h, configured), Duration::from_millis(1500));
        h.insert("x-stainless-read-timeout", "nonsense".parse().unwrap());
        assert_eq!(time_budget(&h, configured), configured);
        h.insert("x-stainless-timeout", "0".parse().unwrap());
        assert_eq!(time_budget(&h, configured), configured, "0 is no hint");
    }

    #[tokio::test(start_paused = true)]
    async fn a_nearer_deadline_shortens_the_wait() {
        let limit =
            ConcurrencyLimit::new(1, Duration::from_secs(10), 100, Arc::new(Metrics::new()));
        let _held = limit.acquire(None).await.unwrap();
        let started = Instant::now();
        let deadline = started + Duration::from_millis(300);
        assert!(limit.acquire(Some(deadline)).await.is_err());
        assert_eq!(started.elapsed(), Duration::from_millis(300));
    }
}
