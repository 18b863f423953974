//! Lanes and their dispatchers: how many callers' inputs become few upstream calls.
//!
//! A lane holds the inputs waiting under one batch key (and one input kind: text and token
//! arrays cannot share an `input` array). Identical inputs in a lane are one *flight*: the
//! second caller adds itself to the first one's waiters instead of queueing a twin
//! (singleflight). A dispatcher task per busy lane takes an upstream slot as soon as one is
//! free, then everything queued by that moment (up to the per-call input and token caps) goes
//! out in one call. While slots are busy, inputs pile up and leave together in the next call;
//! when traffic is idle, an input leaves at once. A flight whose callers have all gone (they
//! disconnected or ran out of time) is dropped before it is sent.
//!
//! If a merged call is refused as a bad request, the batch is split in halves and each half
//! resent, down to single inputs, so that only the offending input's callers get the error.

use std::{
    collections::{HashMap, VecDeque},
    future::Future,
    ops::Range,
    pin::Pin,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Request, Response, StatusCode, Uri};
use http_body_util::BodyExt;
use serde::Serialize;
use tokio::{sync::oneshot, time::Instant};

use super::{
    cache::{Embedded, VectorCache},
    keys::BatchKey,
    render,
    request::Input,
    tokens::{apportion, Tokenizer},
};
use crate::{
    config::UpstreamEncoding,
    http::{
        body::{self, IdleTimeout, Limited, ProxyBody},
        errors::ProxyError,
        route::Route,
    },
    metrics::{Metrics, TokenSource},
    passthrough::{error_chain, strip_hop_by_hop},
    resilience::{
        adaptive_limit::Signal,
        limits::{Capacity, Places},
        rate_gate::RateGates,
        retry::{mark_final, RetryReason, Tried, Verdict},
    },
    upstream::{
        credential::CredentialId,
        outbound::{self, Attempt, Call, HeadArrived, Kind, LiveDeadline, Outbound, Reply},
        Upstream,
    },
};

type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// Retry-After for a caller shed because the queue is full.
const QUEUE_FULL_RETRY_AFTER: Duration = Duration::from_secs(1);

/// Largest upstream reply read: 2048 float JSON vectors of 3072 dimensions, with room to spare.
const MAX_REPLY_BYTES: u64 = 512 * 1024 * 1024;

/// Whether an upstream refusal may be about one input rather than the whole request: a status
/// that blames the content (400, 413, 422), and no request-level field named as the culprit.
/// (401, 403, 404, 429 and 5xx blame the credential, the model or the moment; a `param` such as
/// `dimensions` or `encoding_format` blames the request: every part would fail alike, so those
/// go to every caller as they are.)
fn blames_input(failure: &Failure) -> bool {
    if !matches!(failure.status.as_u16(), 400 | 413 | 422) {
        return false;
    }
    let param = serde_json::from_slice::<serde_json::Value>(&failure.body)
        .ok()
        .and_then(|v| v["error"]["param"].as_str().map(str::to_string));
    match param {
        None => true,
        Some(p) => p == "input" || p.starts_with("input") || p.starts_with("$.input"),
    }
}

/// Extra upstream calls allowed to isolate refused inputs in a batch of `n`: enough to bisect
/// down to a couple of offenders (about 2·log2 n each), few enough that a refusal that was about
/// the whole request after all costs a handful of calls, not 2n.
fn isolation_budget(n: usize) -> usize {
    let depth = usize::BITS - n.max(1).leading_zeros();
    4 * depth as usize + 2
}

/// What a waiting caller receives for one input.
pub type Outcome = Result<Arc<Embedded>, Arc<Failure>>;

/// An error reply shared by every caller of the failed inputs: the upstream's own (status,
/// headers, body, rate-limit headers included) or one embedcar made.
#[derive(Debug)]
pub struct Failure {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// Upstream attempts the call made, for the failure log; `None` before the retry loop.
    pub attempts: Option<u32>,
}

impl Failure {
    pub fn from_error(e: ProxyError) -> Failure {
        let (status, headers, body) = e.into_parts();
        Failure {
            status,
            headers,
            body,
            attempts: None,
        }
    }

    pub fn to_response(&self) -> Response<ProxyBody> {
        let mut r = Response::new(body::full(self.body.clone()));
        *r.status_mut() = self.status;
        *r.headers_mut() = self.headers.clone();
        if let Some(n) = self.attempts {
            r.extensions_mut().insert(crate::http::errors::Attempts(n));
        }
        r
    }
}

/// Text inputs and token-array inputs go in separate calls: the API takes an array of one kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum InputKind {
    Text,
    Tokens,
}

impl InputKind {
    pub fn of(input: &Input) -> InputKind {
        match input {
            Input::Text(_) => InputKind::Text,
            Input::Tokens(_) => InputKind::Tokens,
        }
    }
}

/// What every call of a lane carries: where it goes and as whom.
pub struct Template {
    /// Path and query on the upstream, as the callers sent them.
    pub target: String,
    /// The end-to-end headers every caller of the lane shares (the batch key covers them), without
    /// the ignored ones (per request: ids, trace context, user agent, idempotency keys), which
    /// belong to one caller and ride only on a call that carries that caller alone.
    pub headers: HeaderMap,
    pub model: Option<String>,
    pub dimensions: Option<u32>,
    pub user: Option<String>,
    pub tokenizer: Tokenizer,
    pub cache_scope: u128,
    /// Whose rate gate the calls pass.
    pub credential: CredentialId,
}

/// An input the caller could not find in the cache.
pub struct Miss {
    pub hash: u128,
    pub input: Input,
    /// Exact tokens, or an estimate when the tokenizer is unknown; sizes calls.
    pub size: u64,
}

/// The caller's claim on one input's outcome.
pub struct Ticket {
    pub rx: oneshot::Receiver<Outcome>,
    /// Whether this input joined a flight already under way (a coalesced twin).
    pub joined: bool,
}

/// One caller of the engine, as its upstream calls need to know it.
pub struct Caller {
    /// Its end-to-end headers that vary per request (`embeddings.ignore_headers`): sent on a
    /// call that carries this caller alone, never on a merged one.
    pub own_headers: HeaderMap,
}

impl Caller {
    fn request_id(&self) -> &str {
        self.own_headers
            .get(REQUEST_ID)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-")
    }
}

const REQUEST_ID: http::HeaderName = http::HeaderName::from_static("x-request-id");

struct Waiter {
    tx: oneshot::Sender<Outcome>,
    caller: Arc<Caller>,
}

struct Flight {
    input: Arc<Input>,
    size: u64,
    waiters: Vec<Waiter>,
    /// The farthest deadline among the callers who ever waited for it: the flight is hopeless
    /// once it cannot be met, and its call's retries go on until then.
    latest: Instant,
}

#[derive(Default)]
struct LaneState {
    queue: VecDeque<u128>,
    flights: FastMap<u128, Flight>,
    dispatching: bool,
    /// Removed from the lanes map: a submitter that finds this looks the lane up again, so two
    /// live lanes never serve one key.
    retired: bool,
}

pub struct Lane {
    template: Template,
    /// Every call's URI and headers, made once when the lane is created rather than per call.
    request: RequestParts,
    state: Mutex<LaneState>,
}

impl Lane {
    fn new(upstream: &Upstream, template: Template) -> Lane {
        Lane {
            request: RequestParts::new(upstream, &template),
            template,
            state: Mutex::new(LaneState::default()),
        }
    }
}

/// The head of a lane's upstream calls.
struct RequestParts {
    /// The upstream URI, or why the caller's path could not make one.
    uri: Result<Uri, String>,
    /// The template's headers plus the body's type. Not the held credential: that is applied
    /// per call, so a lane made before a key rotation sends the new key on its next call. Not
    /// `host`: the pooled client adds it on HTTP/1 connections, and on HTTP/2 it must not be
    /// there beside `:authority`.
    headers: HeaderMap,
}

impl RequestParts {
    fn new(upstream: &Upstream, template: &Template) -> RequestParts {
        let uri = upstream
            .base
            .join(template.target.parse().ok().as_ref())
            .map_err(|e| e.to_string());
        let mut headers = template.headers.clone();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        RequestParts { uri, headers }
    }
}

/// Settings the dispatchers and calls need.
pub struct BatchSettings {
    /// Inputs queued across all lanes at most; beyond, callers are shed with 503.
    pub max_queued: usize,
    pub should_retry_header: bool,
    pub max_inputs: usize,
    pub max_tokens: u64,
    pub linger: Duration,
    pub upstream_encoding: UpstreamEncoding,
    pub body_idle_timeout: Duration,
}

struct Ctx {
    upstream: Arc<Upstream>,
    /// Every upstream call goes down this stack (retries, gate, breaker, places, timeout).
    outbound: Outbound<SharedExchange>,
    /// The credentials' rate gates, also consulted before queueing: a gate the upstream shut
    /// holds a whole lane.
    gates: Arc<RateGates>,
    /// The learnt limit and the ceiling: a dispatcher takes its places before it takes a batch.
    capacity: Arc<Capacity>,
    /// Inputs queued across all lanes: reserved before they are queued and released when they
    /// leave the queue however they leave, so admission never reads a stale or leaked count.
    queued: AtomicUsize,
    metrics: Arc<Metrics>,
    cache: Arc<VectorCache>,
    settings: BatchSettings,
    lanes: Mutex<FastMap<(BatchKey, InputKind), Arc<Lane>>>,
}

pub struct Batcher {
    ctx: Arc<Ctx>,
}

/// One input of a batch on its way upstream.
#[derive(Clone)]
struct Item {
    hash: u128,
    input: Arc<Input>,
    size: u64,
    /// The farthest deadline among the input's callers.
    latest: Instant,
}

impl Batcher {
    pub fn new(
        upstream: Arc<Upstream>,
        outbound: &outbound::Parts,
        metrics: Arc<Metrics>,
        cache: Arc<VectorCache>,
        settings: BatchSettings,
    ) -> Self {
        let exchange = SharedExchange(Arc::new(Exchange {
            upstream: upstream.clone(),
            metrics: metrics.clone(),
            body_idle_timeout: settings.body_idle_timeout,
            upstream_encoding: settings.upstream_encoding,
        }));
        Batcher {
            ctx: Arc::new(Ctx {
                outbound: outbound::build(exchange, outbound),
                gates: outbound.gates.clone(),
                capacity: outbound.capacity.clone(),
                upstream,
                queued: AtomicUsize::new(0),
                metrics,
                cache,
                settings,
                lanes: Mutex::new(FastMap::default()),
            }),
        }
    }

    /// Queues `misses` under `key` (joining flights already there) and returns a ticket per
    /// miss, in order. `template` is called when a lane is created: usually never, since the
    /// lane exists; possibly twice, if the lane this call created was used and retired by
    /// others before this call could queue in it.
    pub fn submit(
        &self,
        key: BatchKey,
        kind: InputKind,
        template: impl Fn() -> Template,
        caller: &Arc<Caller>,
        misses: Vec<Miss>,
        deadline: Instant,
    ) -> Result<Vec<Ticket>, ProxyError> {
        if let Some(until) = self.ctx.gates.shut_until(key.credential()) {
            if until > deadline {
                self.ctx.metrics.gate_rejections.inc();
                return Err(ProxyError::RateLimited {
                    retry_after: until.saturating_duration_since(Instant::now()),
                });
            }
        }
        let reserved = misses.len();
        if !self.ctx.reserve(reserved) {
            return Err(ProxyError::QueueFull {
                retry_after: QUEUE_FULL_RETRY_AFTER,
            });
        }
        let mut tickets = Vec::with_capacity(misses.len());
        let mut queued = 0;
        let (lane, start_dispatcher) = loop {
            let lane = {
                let mut lanes = lock(&self.ctx.lanes);
                lanes
                    .entry((key.clone(), kind))
                    .or_insert_with(|| Arc::new(Lane::new(&self.ctx.upstream, template())))
                    .clone()
            };
            let mut state = lock(&lane.state);
            if state.retired {
                continue;
            }
            let scope = lane.template.cache_scope;
            for miss in misses {
                let (tx, rx) = oneshot::channel();
                let waiter = Waiter {
                    tx,
                    caller: caller.clone(),
                };
                let joined = match state.flights.get_mut(&miss.hash) {
                    Some(flight) => {
                        flight.waiters.push(waiter);
                        flight.latest = flight.latest.max(deadline);
                        true
                    }
                    // A batch may have filled the cache and left the lane since the caller
                    // looked: the cache is filled before flights leave, so one of the two holds.
                    None => match self.ctx.cache.get(&(scope, miss.hash)) {
                        Some(hit) => {
                            let _ = waiter.tx.send(Ok(hit));
                            false
                        }
                        None => {
                            state.flights.insert(
                                miss.hash,
                                Flight {
                                    input: Arc::new(miss.input),
                                    size: miss.size,
                                    waiters: vec![waiter],
                                    latest: deadline,
                                },
                            );
                            state.queue.push_back(miss.hash);
                            queued += 1;
                            false
                        }
                    },
                };
                tickets.push(Ticket { rx, joined });
            }
            let start = !state.dispatching && !state.queue.is_empty();
            if start {
                state.dispatching = true;
            }
            drop(state);
            break (lane, start);
        };
        // Joined twins and late cache hits hold no place in the queue.
        self.ctx.release(reserved - queued);
        if start_dispatcher {
            tokio::spawn(dispatch(self.ctx.clone(), key, kind, lane));
        }
        Ok(tickets)
    }
}

impl Ctx {
    /// Reserves room for `n` queued inputs, or says there is none: one atomic step, so
    /// concurrent admissions cannot overshoot the bound together.
    fn reserve(&self, n: usize) -> bool {
        let max = self.settings.max_queued;
        let reserved = self
            .queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |q| {
                (q + n <= max).then_some(q + n)
            })
            .is_ok();
        if reserved {
            self.metrics.embeddings_queue_depth.add(n as i64);
        }
        reserved
    }

    /// Counts inputs put back in the queue: they were admitted once and must not be refused
    /// now, so the bound is not checked.
    fn readmit(&self, n: usize) {
        self.queued.fetch_add(n, Ordering::AcqRel);
        self.metrics.embeddings_queue_depth.add(n as i64);
    }

    fn release(&self, n: usize) {
        if n > 0 {
            self.queued.fetch_sub(n, Ordering::AcqRel);
            self.metrics.embeddings_queue_depth.sub(n as i64);
        }
    }
}

/// A poisoned lock means a panic elsewhere already failed some request; the state itself is
/// still consistent (every critical section here is panic-free), so carry on with it.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Starts a lane's dispatcher. A plain function, so that `run_batch` (which the dispatcher
/// awaits) can start one without the compiler having to prove its own future `Send` first.
fn start_dispatcher(ctx: Arc<Ctx>, key: BatchKey, kind: InputKind, lane: Arc<Lane>) {
    tokio::spawn(dispatch(ctx, key, kind, lane));
}

/// The dispatcher of one lane: runs while the lane has queued inputs.
async fn dispatch(ctx: Arc<Ctx>, key: BatchKey, kind: InputKind, lane: Arc<Lane>) {
    loop {
        {
            let mut state = lock(&lane.state);
            if state.queue.is_empty() {
                state.dispatching = false;
                break;
            }
        }
        // A gate the upstream shut holds the whole lane before it takes a slot; callers who
        // cannot wait that long are told at once.
        if let Some(until) = ctx.gates.shut_until(&lane.template.credential) {
            refuse_hopeless(&ctx, &lane, until);
            tokio::time::sleep_until(until).await;
            continue;
        }
        let places = ctx.capacity.engine_places().await;
        let last_place = ctx
            .capacity
            .learnt
            .as_ref()
            .and_then(|a| a.last_place_gather());
        if let Some(gather) = last_place {
            // The last free place: a caller arriving after it leaves waits a whole upstream
            // round trip for the next one, so the tail of a burst is gathered into it first (a
            // twentieth of the round trip, at most 100 ms). Idle traffic never gets here: places
            // are free.
            tokio::time::sleep(gather).await;
        } else if ctx.settings.linger.is_zero() {
            // Let every task already runnable go first: when embedcar's own CPU is the
            // bottleneck, callers whose requests are already read join this call instead of
            // each paying for an upstream call of its own. When nothing else is runnable (idle
            // traffic) the dispatcher is polled again at once: no timer, no added delay. Under
            // load the wait is bounded by one pass of this worker's run queue (tokio wakes
            // yielded tasks when the worker runs dry, or at its periodic maintenance).
            tokio::task::yield_now().await;
        } else {
            tokio::time::sleep(ctx.settings.linger).await;
        }
        let items = take_batch(&ctx, &lane);
        if items.is_empty() {
            places.finish(Signal::Ignore, 0);
            continue;
        }
        // Nothing queued behind this batch: this task sends it itself instead of spawning a
        // task for it and ending (one task fewer per call whenever the upstream keeps up).
        // `dispatching` is cleared first, so inputs arriving meanwhile start a dispatcher of
        // their own and wait for no one; `run_batch` retires the lane when it is done.
        let last = {
            let mut state = lock(&lane.state);
            let last = state.queue.is_empty();
            if last {
                state.dispatching = false;
            }
            last
        };
        if last {
            run_batch(ctx, key, kind, lane, items, places).await;
            return;
        }
        tokio::spawn(run_batch(
            ctx.clone(),
            key.clone(),
            kind,
            lane.clone(),
            items,
            places,
        ));
    }
    retire_if_idle(&ctx, &key, kind, &lane);
}

/// Answers with 429 the queued flights whose every caller's deadline comes before `until`.
fn refuse_hopeless(ctx: &Ctx, lane: &Lane, until: Instant) {
    let failure = Arc::new(Failure::from_error(ProxyError::RateLimited {
        retry_after: until.saturating_duration_since(Instant::now()),
    }));
    let mut refused = Vec::new();
    let mut left_queue = 0;
    {
        let mut state = lock(&lane.state);
        let LaneState { queue, flights, .. } = &mut *state;
        queue.retain(|hash| match flights.get(hash) {
            Some(f) if f.latest < until => {
                if let Some(f) = flights.remove(hash) {
                    refused.extend(f.waiters);
                }
                left_queue += 1;
                false
            }
            _ => true,
        });
    }
    ctx.release(left_queue);
    if refused.is_empty() {
        return;
    }
    ctx.metrics.gate_rejections.inc_by(refused.len() as u64);
    for w in refused {
        let _ = w.tx.send(Err(failure.clone()));
    }
}

/// Takes queued inputs up to the caps, dropping those nobody waits for any more.
fn take_batch(ctx: &Ctx, lane: &Lane) -> Vec<Item> {
    let max_inputs = ctx.settings.max_inputs;
    let max_tokens = ctx.settings.max_tokens;
    let mut items = Vec::new();
    let mut tokens = 0u64;
    let mut taken = 0usize;
    let mut abandoned = 0u64;
    let mut state = lock(&lane.state);
    while items.len() < max_inputs {
        let Some(hash) = state.queue.pop_front() else {
            break;
        };
        let Some(flight) = state.flights.get_mut(&hash) else {
            // Cannot happen (a flight leaves the queue before it leaves the map), but the
            // queue place is given back all the same.
            taken += 1;
            continue;
        };
        flight.waiters.retain(|w| !w.tx.is_closed());
        if flight.waiters.is_empty() {
            state.flights.remove(&hash);
            taken += 1;
            abandoned += 1;
            continue;
        }
        if !items.is_empty() && tokens + flight.size > max_tokens {
            state.queue.push_front(hash);
            break;
        }
        tokens += flight.size;
        taken += 1;
        items.push(Item {
            hash,
            input: flight.input.clone(),
            size: flight.size,
            latest: flight.latest,
        });
    }
    drop(state);
    ctx.release(taken);
    if abandoned > 0 {
        ctx.metrics.embeddings_abandoned.inc_by(abandoned);
    }
    items
}

/// Removes the lane from the map when it has nothing queued, in flight or dispatching.
fn retire_if_idle(ctx: &Ctx, key: &BatchKey, kind: InputKind, lane: &Arc<Lane>) {
    let mut lanes = lock(&ctx.lanes);
    let mut state = lock(&lane.state);
    let idle = !state.dispatching && state.queue.is_empty() && state.flights.is_empty();
    if idle {
        let k = (key.clone(), kind);
        if lanes.get(&k).is_some_and(|l| Arc::ptr_eq(l, lane)) {
            lanes.remove(&k);
            state.retired = true;
        }
    }
}

/// Delivers outcomes to a batch's waiters; if the batch task dies first (a panic), its Drop
/// answers them with an internal error instead of leaving them, and the lane, hanging.
struct Delivery {
    lane: Arc<Lane>,
    hashes: Vec<u128>,
    done: bool,
}

impl Delivery {
    fn deliver(mut self, outcomes: Vec<Outcome>) {
        let waiters: Vec<Vec<Waiter>> = {
            let mut state = lock(&self.lane.state);
            self.hashes
                .iter()
                .map(|h| {
                    state
                        .flights
                        .remove(h)
                        .map(|f| f.waiters)
                        .unwrap_or_default()
                })
                .collect()
        };
        self.done = true;
        for (ws, outcome) in waiters.into_iter().zip(outcomes) {
            for w in ws {
                let _ = w.tx.send(outcome.clone());
            }
        }
    }
}

impl Drop for Delivery {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let failure = Arc::new(Failure::from_error(ProxyError::Internal(
            "the upstream call for this input failed inside embedcar".into(),
        )));
        let mut state = lock(&self.lane.state);
        for h in &self.hashes {
            if let Some(f) = state.flights.remove(h) {
                for w in f.waiters {
                    let _ = w.tx.send(Err(failure.clone()));
                }
            }
        }
    }
}

async fn run_batch(
    ctx: Arc<Ctx>,
    key: BatchKey,
    kind: InputKind,
    lane: Arc<Lane>,
    items: Vec<Item>,
    places: Places,
) {
    let delivery = Delivery {
        lane: lane.clone(),
        hashes: items.iter().map(|i| i.hash).collect(),
        done: false,
    };
    let mut budget = isolation_budget(items.len());
    let mut held = Some(places);
    let items: Arc<[Item]> = items.into();
    let all = 0..items.len();
    let mut outcomes = call_isolating(&ctx, &lane, &items, all, &mut budget, &mut held).await;
    if let Some(unused) = held {
        unused.finish(Signal::Ignore, 0);
    }
    // Inputs not sent (or abandoned) for want of callers may have been joined since by a caller
    // with time left: they go back to the head of the queue instead of failing it.
    let mut delivery = delivery;
    if outcomes.iter().any(is_gone) {
        let (again, start) = {
            let mut state = lock(&lane.state);
            let mut again = Vec::new();
            for (item, outcome) in items.iter().zip(&outcomes) {
                let wanted = is_gone(outcome)
                    && state
                        .flights
                        .get(&item.hash)
                        .is_some_and(|f| f.waiters.iter().any(|w| !w.tx.is_closed()));
                if wanted {
                    state.queue.push_front(item.hash);
                    again.push(item.hash);
                }
            }
            let start = !again.is_empty() && !state.dispatching;
            if start {
                state.dispatching = true;
            }
            (again, start)
        };
        if !again.is_empty() {
            ctx.readmit(again.len());
            let keep: Vec<bool> = delivery.hashes.iter().map(|h| !again.contains(h)).collect();
            let mut k = keep.iter();
            outcomes.retain(|_| *k.next().unwrap_or(&true));
            let mut k = keep.iter();
            delivery.hashes.retain(|_| *k.next().unwrap_or(&true));
        }
        if start {
            start_dispatcher(ctx.clone(), key.clone(), kind, lane.clone());
        }
    }
    // Fill the cache before the flights leave the lane, so a caller arriving in between finds
    // one or the other, never neither.
    let scope = lane.template.cache_scope;
    for (hash, outcome) in delivery.hashes.iter().zip(&outcomes) {
        if let Ok(embedded) = outcome {
            ctx.cache.insert((scope, *hash), embedded.clone());
        }
    }
    let answered = delivery.hashes.iter().zip(&outcomes);
    ctx.cache.share(
        scope,
        answered.filter_map(|(h, o)| Some((*h, o.as_ref().ok()?))),
    );
    delivery.deliver(outcomes);
    retire_if_idle(&ctx, &key, kind, &lane);
}

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Sends `items` in one call; if the upstream blames an input, halves and resends each half
/// until the offending inputs stand alone, within `budget` extra calls. Parts left when the
/// budget runs out get the refusal.
fn call_isolating<'a>(
    ctx: &'a Arc<Ctx>,
    lane: &'a Arc<Lane>,
    items: &'a Arc<[Item]>,
    range: Range<usize>,
    budget: &'a mut usize,
    held: &'a mut Option<Places>,
) -> BoxFuture<'a, Vec<Outcome>> {
    Box::pin(async move {
        let n = range.len();
        match call_once(ctx, lane, items, range.clone(), held).await {
            Ok(done) => done,
            Err(failure) if n > 1 && *budget >= 2 && blames_input(&failure) => {
                *budget -= 2;
                ctx.metrics.embeddings_isolation_splits.inc();
                let middle = range.start + n / 2;
                let mut out =
                    call_isolating(ctx, lane, items, range.start..middle, budget, held).await;
                out.extend(call_isolating(ctx, lane, items, middle..range.end, budget, held).await);
                out
            }
            Err(failure) => vec![Err(failure); n],
        }
    })
}

#[derive(Serialize)]
struct UpstreamBody<'a> {
    input: Vec<&'a Input>,
    #[serde(skip_serializing_if = "Option::is_none")]
    model: Option<&'a str>,
    encoding_format: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    dimensions: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    user: Option<&'a str>,
}

/// What one upstream call gives its items' callers: an outcome per item, in order (items nobody
/// waited for any more were not sent, and their outcome reaches no one).
type CallResult = Result<Vec<Outcome>, Arc<Failure>>;

impl Reply for CallResult {
    fn error(e: ProxyError) -> Self {
        Err(Arc::new(Failure::from_error(e)))
    }

    fn abandoned(_: ProxyError) -> Self {
        Err(gone())
    }
}

/// One upstream call for `items`, retried for every caller it carries: while any of them still
/// has time for another attempt (the farthest deadline, not the nearest) and the retry budget,
/// weighed by those callers, allows. Callers who run out of time leave on their own, and an
/// attempt sends only the inputs someone still waits for. A failure embedcar retried at least
/// as often as the client would have carries `x-should-retry: false`.
///
/// The first attempt uses `held` (the dispatcher's places); an attempt lets its places go
/// before a retry's wait and the next one takes fresh ones, so a backoff holds back no one.
async fn call_once(
    ctx: &Arc<Ctx>,
    lane: &Arc<Lane>,
    items: &Arc<[Item]>,
    range: Range<usize>,
    held: &mut Option<Places>,
) -> CallResult {
    let part = &items[range.clone()];
    let latest = part
        .iter()
        .map(|i| i.latest)
        .max()
        .unwrap_or_else(Instant::now);
    let callers = live(lane, part).callers.len();
    let call = EngineCall {
        lane: lane.clone(),
        items: items.clone(),
        range,
    };
    let live_deadline: LiveDeadline = {
        let call = call.clone();
        Arc::new(move || live(&call.lane, call.part()).latest)
    };
    let mut first = held.take();
    let attempts = {
        let live_deadline = live_deadline.clone();
        move |_| {
            // Who waits is read here for the gate's cost and deadline; the exchange reads it
            // again when it holds its places, and sends only what is still wanted then.
            let live = live(&call.lane, call.part());
            let latest = live.latest?;
            let tokens = live.items.iter().map(|&i| call.part()[i].size).sum();
            Some(Attempt {
                request: call.clone(),
                kind: Kind::Engine,
                route: Route::Embeddings,
                credential: call.lane.template.credential,
                tokens,
                deadline: latest,
                answer_by: Some(latest),
                live: Some(live_deadline.clone()),
                places: first.take(),
                head: HeadArrived::default(),
            })
        }
    };
    let finished = outbound::send(
        &ctx.outbound,
        Call {
            attempts: Box::new(attempts),
            deadline: latest,
            retryable: true,
            max_attempts: None,
            callers: u32::try_from(callers).unwrap_or(u32::MAX),
            live: Some(live_deadline),
        },
    )
    .await;
    match finished {
        Err(refused) => Err(Arc::new(Failure::from_error(refused))),
        Ok(f) => match f.value.value {
            Err(failure) => {
                let mut headers = failure.headers.clone();
                if f.gave_up && ctx.settings.should_retry_header {
                    mark_final(&mut headers);
                }
                Err(Arc::new(Failure {
                    status: failure.status,
                    headers,
                    body: failure.body.clone(),
                    attempts: Some(f.attempts),
                }))
            }
            other => other,
        },
    }
}

/// One upstream call's inputs: a range of a batch (the whole batch, or a part being isolated).
#[derive(Clone)]
struct EngineCall {
    lane: Arc<Lane>,
    items: Arc<[Item]>,
    range: Range<usize>,
}

impl EngineCall {
    fn part(&self) -> &[Item] {
        &self.items[self.range.clone()]
    }
}

/// Who still waits for a call's items.
struct Live {
    /// Positions (in the call's items) of the inputs someone still waits for.
    items: Vec<usize>,
    /// Their callers, each once.
    callers: Vec<Arc<Caller>>,
    /// The farthest deadline among them.
    latest: Option<Instant>,
}

fn live(lane: &Lane, items: &[Item]) -> Live {
    let mut out = Live {
        items: Vec::with_capacity(items.len()),
        callers: Vec::new(),
        latest: None,
    };
    let mut seen = foldhash::HashSet::default();
    let state = lock(&lane.state);
    for (position, item) in items.iter().enumerate() {
        let Some(flight) = state.flights.get(&item.hash) else {
            continue;
        };
        let mut wanted = false;
        for w in flight.waiters.iter().filter(|w| !w.tx.is_closed()) {
            wanted = true;
            if seen.insert(Arc::as_ptr(&w.caller) as usize) {
                out.callers.push(w.caller.clone());
            }
        }
        if wanted {
            out.items.push(position);
            out.latest = Some(out.latest.map_or(flight.latest, |l| l.max(flight.latest)));
        }
    }
    out
}

/// The request for the inputs someone still waits for, and what its reply is read against.
struct Sending {
    request: Request<ProxyBody>,
    /// Positions, in the call's items, of the inputs sent.
    positions: Vec<usize>,
    /// Their sizes (exact token counts, or estimates the upstream's usage is apportioned by).
    sizes: Vec<u64>,
}

impl Exchange {
    /// Writes the request for the inputs someone still waits for now; `None` when nobody does.
    fn request(&self, call: &EngineCall) -> Option<Result<Sending, ProxyError>> {
        let lane = &call.lane;
        let items = call.part();
        let live = live(lane, items);
        live.latest?;
        let body = UpstreamBody {
            input: live.items.iter().map(|&i| &*items[i].input).collect(),
            model: lane.template.model.as_deref(),
            encoding_format: match self.upstream_encoding {
                UpstreamEncoding::Base64 => "base64",
                UpstreamEncoding::Float => "float",
            },
            dimensions: lane.template.dimensions,
            user: lane.template.user.as_deref(),
        };
        let body = match serde_json::to_vec(&body) {
            Ok(b) => b,
            Err(e) => {
                let e = ProxyError::Internal(format!("cannot write the request: {e}"));
                return Some(Err(e));
            }
        };
        let uri = match &lane.request.uri {
            Ok(u) => u.clone(),
            Err(e) => return Some(Err(ProxyError::Internal(format!("bad upstream URI: {e}")))),
        };
        let mut request = Request::new(body::full(body));
        *request.method_mut() = http::Method::POST;
        *request.uri_mut() = uri;
        let headers = request.headers_mut();
        *headers = lane.request.headers.clone();
        if let Some(credential) = &self.upstream.credential {
            credential.apply(headers);
        }
        match live.callers.as_slice() {
            // One caller's call is that caller's request: its own ids and trace context go along.
            [one] => {
                for (name, value) in &one.own_headers {
                    headers.append(name, value.clone());
                }
            }
            // A merged call belongs to no single caller: it gets an id of its own, logged with
            // the ids of the callers it serves, and no caller's per-request headers.
            several => {
                let id = format!("embedcar-{}", uuid::Uuid::new_v4().simple());
                if tracing::enabled!(tracing::Level::DEBUG) {
                    let callers: Vec<&str> = several.iter().map(|c| c.request_id()).collect();
                    tracing::debug!(
                        upstream_request_id = %id,
                        callers = ?callers,
                        inputs = live.items.len(),
                        "merged upstream call"
                    );
                }
                if let Ok(v) = HeaderValue::from_str(&id) {
                    headers.insert(REQUEST_ID, v);
                }
            }
        }
        self.metrics
            .embeddings_batch_inputs
            .observe(live.items.len() as f64);
        Some(Ok(Sending {
            request,
            sizes: live.items.iter().map(|&i| items[i].size).collect(),
            positions: live.items,
        }))
    }
}

/// The failure for inputs whose every caller left before the upstream answered: nobody receives
/// it.
/// One shared value, so that `run_batch` can tell "not sent for want of callers" from a real
/// failure and send the input again if a caller has joined it since.
fn gone() -> Arc<Failure> {
    static GONE: std::sync::OnceLock<Arc<Failure>> = std::sync::OnceLock::new();
    GONE.get_or_init(|| {
        Arc::new(Failure::from_error(ProxyError::Internal(
            "every caller of this input left".into(),
        )))
    })
    .clone()
}

fn is_gone(outcome: &Outcome) -> bool {
    matches!(outcome, Err(f) if Arc::ptr_eq(f, &gone()))
}

/// The bottom of the engine's outbound stack: one exchange with the pooled client, the reply
/// read whole and decoded. A reply cut short or garbled is a failed attempt, worth another.
struct Exchange {
    upstream: Arc<Upstream>,
    metrics: Arc<Metrics>,
    body_idle_timeout: Duration,
    upstream_encoding: UpstreamEncoding,
}

/// The exchange as the bottom of the engine's stack (one pointer to clone per attempt).
#[derive(Clone)]
struct SharedExchange(Arc<Exchange>);

impl tower::Service<Attempt<EngineCall>> for SharedExchange {
    type Response = Tried<CallResult>;
    type Error = ProxyError;
    type Future = outbound::BoxFuture<Result<Tried<CallResult>, ProxyError>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), ProxyError>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, attempt: Attempt<EngineCall>) -> Self::Future {
        let this = self.0.clone();
        Box::pin(async move { Ok(this.exchange(&attempt.request, &attempt.head).await) })
    }
}

impl Exchange {
    async fn exchange(&self, call: &EngineCall, head: &HeadArrived) -> Tried<CallResult> {
        let fail = |e: ProxyError| Arc::new(Failure::from_error(e));
        let sending = match self.request(call) {
            None => return Tried::not_sent(Err(gone())),
            Some(Err(e)) => return Tried::refused(Err(fail(e))),
            Some(Ok(sending)) => sending,
        };
        let size = sending.sizes.iter().sum();
        let exact = matches!(call.lane.template.tokenizer, Tokenizer::Exact(_));
        let mut tried = self
            .exchange_sending(sending, call.range.len(), exact, head)
            .await;
        tried.size = Some(size);
        tried
    }

    async fn exchange_sending(
        &self,
        sending: Sending,
        items: usize,
        exact: bool,
        head: &HeadArrived,
    ) -> Tried<CallResult> {
        let fail = |e: ProxyError| Arc::new(Failure::from_error(e));
        let Sending {
            request,
            positions,
            sizes,
        } = sending;
        let started = Instant::now();
        let response = match self.upstream.client.request(request).await {
            Ok(r) => r,
            Err(e) => {
                let reason = RetryReason::of_send_error(&e);
                self.metrics
                    .observe_upstream(Route::Embeddings, reason.label(), started.elapsed());
                let error = ProxyError::UpstreamUnreachable(error_chain(&e));
                return Tried::broken(Err(fail(error)), reason);
            }
        };
        head.arrived();
        self.metrics.observe_upstream_status(
            Route::Embeddings,
            response.status(),
            started.elapsed(),
        );
        let (mut parts, incoming) = response.into_parts();
        let bytes = match Limited::new(
            IdleTimeout::new(incoming, self.body_idle_timeout),
            MAX_REPLY_BYTES,
        )
        .collect()
        .await
        {
            Ok(b) => b.to_bytes(),
            Err(e) => {
                let cause = format!("the reply body failed: {}", error_chain(&*e));
                // A 200 cut short is an unusable reply; an error reply cut short, a broken link.
                let error = if parts.status.is_success() {
                    ProxyError::UpstreamInvalidReply(cause)
                } else {
                    ProxyError::UpstreamUnreachable(cause)
                };
                return Tried::broken(Err(fail(error)), RetryReason::Io);
            }
        };

        if !parts.status.is_success() {
            strip_hop_by_hop(&mut parts.headers);
            parts.headers.remove(header::CONTENT_LENGTH);
            let status = parts.status;
            let headers = parts.headers.clone();
            // OpenAI answers a spent quota (billing) with 429 too; no wait makes it pass, and it
            // says nothing of the upstream's load.
            let quota_spent = status == StatusCode::TOO_MANY_REQUESTS
                && bytes.windows(18).any(|w| w == b"insufficient_quota");
            let mut tried = Tried::reply(
                Err(Arc::new(Failure {
                    status,
                    headers: parts.headers,
                    body: bytes,
                    attempts: None,
                })),
                status,
                &headers,
            );
            if quota_spent {
                tried.verdict = Verdict::Final;
                tried.signal = Signal::Ignore;
            }
            return tried;
        }
        let reply = match render::parse_reply(&bytes, positions.len()) {
            Ok(r) => r,
            // A 200 whose body is cut or garbled: the exchange broke, another attempt may not.
            Err(e) => {
                return Tried::broken(
                    Err(fail(ProxyError::UpstreamInvalidReply(e))),
                    RetryReason::Io,
                )
            }
        };
        let render::ParsedReply {
            vectors,
            model,
            prompt_tokens: reported,
        } = reply;
        let tokens: Vec<u64> = if exact {
            sizes
        } else {
            let total = reported.unwrap_or_else(|| sizes.iter().sum());
            apportion(total, &sizes)
        };
        self.metrics
            .count_tokens(TokenSource::Upstream, tokens.iter().sum());
        let model: Arc<str> = model.into();
        let mut outcomes: Vec<Outcome> = vec![Err(gone()); items];
        for ((&position, vector), t) in positions.iter().zip(vectors).zip(tokens) {
            outcomes[position] = Ok(Arc::new(Embedded {
                vector: vector.into_boxed_slice(),
                tokens: t,
                model: model.clone(),
            }));
        }
        Tried::reply(Ok(outcomes), parts.status, &parts.headers)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failure(status: u16, body: &str) -> Failure {
        Failure {
            status: StatusCode::from_u16(status).unwrap(),
            headers: HeaderMap::new(),
            body: Bytes::from(body.to_string()),
            attempts: None,
        }
    }

    #[test]
    fn only_refusals_that_may_be_about_an_input_are_split() {
        let input_error = r#"{"error":{"message":"bad","type":"invalid_request_error","param":"input","code":null}}"#;
        let no_param = r#"{"error":{"message":"too long","param":null}}"#;
        let request_error = r#"{"error":{"message":"bad","param":"dimensions"}}"#;
        assert!(blames_input(&failure(400, input_error)));
        assert!(blames_input(&failure(400, no_param)));
        assert!(blames_input(&failure(422, "not json")));
        assert!(!blames_input(&failure(400, request_error)));
        assert!(!blames_input(&failure(401, input_error)));
        assert!(!blames_input(&failure(429, no_param)));
        assert!(!blames_input(&failure(500, no_param)));
    }

    #[test]
    fn the_isolation_budget_grows_with_the_log_of_the_batch() {
        assert_eq!(isolation_budget(1), 6);
        assert_eq!(isolation_budget(2), 10);
        assert_eq!(isolation_budget(2048), 50);
        // One offender in 2048 needs 2 calls per level over 11 levels.
        assert!(isolation_budget(2048) >= 2 * 11);
    }
}
