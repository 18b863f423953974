//! The dispatchers: one task per busy lane takes an upstream place, gathers what is queued into
//! one call, delivers each input's outcome to its callers, and, when a merged call is refused as
//! a bad request, splits it to find the offending input.

use super::*;

/// Starts a lane's dispatcher. A plain function, so that `run_batch` (which the dispatcher
/// awaits) can start one without the compiler having to prove its own future `Send` first.
pub(super) fn start_dispatcher(ctx: Arc<Ctx>, key: BatchKey, kind: InputKind, lane: Arc<Lane>) {
    tokio::spawn(dispatch(ctx, key, kind, lane));
}

/// The dispatcher of one lane: runs while the lane has queued inputs.
pub(super) async fn dispatch(ctx: Arc<Ctx>, key: BatchKey, kind: InputKind, lane: Arc<Lane>) {
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
pub(super) fn refuse_hopeless(ctx: &Ctx, lane: &Lane, until: Instant) {
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
    ctx.metrics
        .resilience
        .gate_rejections
        .inc_by(refused.len() as u64);
    for w in refused {
        let _ = w.tx.send(Err(failure.clone()));
    }
}

/// Takes queued inputs up to the caps, dropping those nobody waits for any more.
pub(super) fn take_batch(ctx: &Ctx, lane: &Lane) -> Vec<Item> {
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
        ctx.metrics.embeddings.abandoned.inc_by(abandoned);
    }
    items
}

/// Removes the lane from the map when it has nothing queued, in flight or dispatching.
pub(super) fn retire_if_idle(ctx: &Ctx, key: &BatchKey, kind: InputKind, lane: &Arc<Lane>) {
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
pub(super) struct Delivery {
    pub(super) lane: Arc<Lane>,
    pub(super) hashes: Vec<u128>,
    pub(super) done: bool,
}

impl Delivery {
    pub(super) fn deliver(mut self, outcomes: Vec<Outcome>) {
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

pub(super) async fn run_batch(
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

pub(super) type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Sends `items` in one call; if the upstream blames an input, halves and resends each half
/// until the offending inputs stand alone, within `budget` extra calls. Parts left when the
/// budget runs out get the refusal.
pub(super) fn call_isolating<'a>(
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
                ctx.metrics.embeddings.isolation_splits.inc();
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
