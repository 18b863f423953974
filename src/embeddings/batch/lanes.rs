//! Lanes: where callers' inputs wait, one lane per batch key and input kind, identical inputs
//! merged into one flight; and the batcher's admission, which puts them there within the queue
//! bound and starts a lane's dispatcher.

use super::*;

pub(super) const REQUEST_ID: http::HeaderName = http::HeaderName::from_static("x-request-id");

pub(super) struct Waiter {
    pub(super) tx: oneshot::Sender<Outcome>,
    pub(super) caller: Arc<Caller>,
}

pub(super) struct Flight {
    pub(super) input: Arc<Input>,
    pub(super) size: u64,
    pub(super) waiters: Vec<Waiter>,
    /// The farthest deadline among the callers who ever waited for it: the flight is hopeless
    /// once it cannot be met, and its call's retries go on until then.
    pub(super) latest: Instant,
}

#[derive(Default)]
pub(super) struct LaneState {
    pub(super) queue: VecDeque<u128>,
    pub(super) flights: FastMap<u128, Flight>,
    pub(super) dispatching: bool,
    /// Removed from the lanes map: a submitter that finds this looks the lane up again, so two
    /// live lanes never serve one key.
    pub(super) retired: bool,
}

pub struct Lane {
    pub(super) template: Template,
    /// Every call's URI and headers, made once when the lane is created rather than per call.
    pub(super) request: RequestParts,
    pub(super) state: Mutex<LaneState>,
}

impl Lane {
    pub(super) fn new(upstream: &Upstream, template: Template) -> Lane {
        Lane {
            request: RequestParts::new(upstream, &template),
            template,
            state: Mutex::new(LaneState::default()),
        }
    }
}

/// The head of a lane's upstream calls.
pub(super) struct RequestParts {
    /// The upstream URI, or why the caller's path could not make one.
    pub(super) uri: Result<Uri, String>,
    /// The template's headers plus the body's type. Not the held credential: that is applied
    /// per call, so a lane made before a key rotation sends the new key on its next call. Not
    /// `host`: the pooled client adds it on HTTP/1 connections, and on HTTP/2 it must not be
    /// there beside `:authority`.
    pub(super) headers: HeaderMap,
}

impl RequestParts {
    pub(super) fn new(upstream: &Upstream, template: &Template) -> RequestParts {
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

pub(super) struct Ctx {
    pub(super) upstream: Arc<Upstream>,
    /// Every upstream call goes down this stack (retries, gate, breaker, places, timeout).
    pub(super) outbound: Outbound<SharedExchange>,
    /// The credentials' rate gates, also consulted before queueing: a gate the upstream shut
    /// holds a whole lane.
    pub(super) gates: Arc<RateGates>,
    /// The learnt limit and the ceiling: a dispatcher takes its places before it takes a batch.
    pub(super) capacity: Arc<Capacity>,
    /// Inputs queued across all lanes: reserved before they are queued and released when they
    /// leave the queue however they leave, so admission never reads a stale or leaked count.
    pub(super) queued: AtomicUsize,
    pub(super) metrics: Arc<Metrics>,
    pub(super) cache: Arc<VectorCache>,
    pub(super) settings: BatchSettings,
    pub(super) lanes: Mutex<FastMap<(BatchKey, InputKind), Arc<Lane>>>,
}

pub struct Batcher {
    pub(super) ctx: Arc<Ctx>,
}

/// One input of a batch on its way upstream.
#[derive(Clone)]
pub(super) struct Item {
    pub(super) hash: u128,
    pub(super) input: Arc<Input>,
    pub(super) size: u64,
    /// The farthest deadline among the input's callers.
    pub(super) latest: Instant,
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
        self.refuse_if_gate_shut(&key, deadline)?;
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
                let (ticket, took_place) = self.enqueue(&mut state, scope, miss, caller, deadline);
                queued += usize::from(took_place);
                tickets.push(ticket);
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

    /// A credential whose gate stays shut past the caller's deadline: refused at once with
    /// 429, rather than queued to wait for nothing.
    fn refuse_if_gate_shut(&self, key: &BatchKey, deadline: Instant) -> Result<(), ProxyError> {
        if let Some(until) = self.ctx.gates.shut_until(key.credential()) {
            if until > deadline {
                self.ctx.metrics.resilience.gate_rejections.inc();
                return Err(ProxyError::RateLimited {
                    retry_after: until.saturating_duration_since(Instant::now()),
                });
            }
        }
        Ok(())
    }

    /// Puts one miss in the lane: joined to its flight if one is queued or in the air,
    /// answered from the cache if a batch filled it since the caller looked, else a new
    /// flight at the back of the queue. Its ticket, and whether it took a place in the queue.
    fn enqueue(
        &self,
        state: &mut LaneState,
        scope: u128,
        miss: Miss,
        caller: &Arc<Caller>,
        deadline: Instant,
    ) -> (Ticket, bool) {
        let (tx, rx) = oneshot::channel();
        let waiter = Waiter {
            tx,
            caller: caller.clone(),
        };
        let (joined, took_place) = match state.flights.get_mut(&miss.hash) {
            Some(flight) => {
                flight.waiters.push(waiter);
                flight.latest = flight.latest.max(deadline);
                (true, false)
            }
            // A batch may have filled the cache and left the lane since the caller
            // looked: the cache is filled before flights leave, so one of the two holds.
            None => match self.ctx.cache.get(&(scope, miss.hash)) {
                Some(hit) => {
                    let _ = waiter.tx.send(Ok(hit));
                    (false, false)
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
                    (false, true)
                }
            },
        };
        (Ticket { rx, joined }, took_place)
    }
}

impl Ctx {
    /// Reserves room for `n` queued inputs, or says there is none: one atomic step, so
    /// concurrent admissions cannot overshoot the bound together.
    pub(super) fn reserve(&self, n: usize) -> bool {
        let max = self.settings.max_queued;
        let reserved = self
            .queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |q| {
                (q + n <= max).then_some(q + n)
            })
            .is_ok();
        if reserved {
            self.metrics.embeddings.queue_depth.add(n as i64);
        }
        reserved
    }

    /// Counts inputs put back in the queue: they were admitted once and must not be refused
    /// now, so the bound is not checked.
    pub(super) fn readmit(&self, n: usize) {
        self.queued.fetch_add(n, Ordering::AcqRel);
        self.metrics.embeddings.queue_depth.add(n as i64);
    }

    pub(super) fn release(&self, n: usize) {
        if n > 0 {
            self.queued.fetch_sub(n, Ordering::AcqRel);
            self.metrics.embeddings.queue_depth.sub(n as i64);
        }
    }
}

/// A poisoned lock means a panic elsewhere already failed some request; the state itself is
/// still consistent (every critical section here is panic-free), so carry on with it.
pub(super) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
