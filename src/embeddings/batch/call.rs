//! The upstream call of one batch: the request body written for the inputs someone still waits
//! for, sent down the one outbound stack (retries, gate, breaker, places, timeout) to the
//! exchange at its bottom.

use super::*;

#[derive(Serialize)]
pub(super) struct UpstreamBody<'a> {
    pub(super) input: Vec<&'a Input>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) model: Option<&'a str>,
    pub(super) encoding_format: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) dimensions: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) user: Option<&'a str>,
}

/// What one upstream call gives its items' callers: an outcome per item, in order (items nobody
/// waited for any more were not sent, and their outcome reaches no one).
pub(super) type CallResult = Result<Vec<Outcome>, Arc<Failure>>;

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
pub(super) async fn call_once(
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
pub(super) struct EngineCall {
    pub(super) lane: Arc<Lane>,
    pub(super) items: Arc<[Item]>,
    pub(super) range: Range<usize>,
}

impl EngineCall {
    pub(super) fn part(&self) -> &[Item] {
        &self.items[self.range.clone()]
    }
}

/// Who still waits for a call's items.
pub(super) struct Live {
    /// Positions (in the call's items) of the inputs someone still waits for.
    pub(super) items: Vec<usize>,
    /// Their callers, each once.
    pub(super) callers: Vec<Arc<Caller>>,
    /// The farthest deadline among them.
    pub(super) latest: Option<Instant>,
}

pub(super) fn live(lane: &Lane, items: &[Item]) -> Live {
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
pub(super) struct Sending {
    pub(super) request: Request<ProxyBody>,
    /// Positions, in the call's items, of the inputs sent.
    pub(super) positions: Vec<usize>,
    /// Their sizes (exact token counts, or estimates the upstream's usage is apportioned by).
    pub(super) sizes: Vec<u64>,
}

impl Exchange {
    /// Writes the request for the inputs someone still waits for now; `None` when nobody does.
    pub(super) fn request(&self, call: &EngineCall) -> Option<Result<Sending, ProxyError>> {
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
            .embeddings
            .batch_inputs
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
pub(super) fn gone() -> Arc<Failure> {
    pub(super) static GONE: std::sync::OnceLock<Arc<Failure>> = std::sync::OnceLock::new();
    GONE.get_or_init(|| {
        Arc::new(Failure::from_error(ProxyError::Internal(
            "every caller of this input left".into(),
        )))
    })
    .clone()
}

pub(super) fn is_gone(outcome: &Outcome) -> bool {
    matches!(outcome, Err(f) if Arc::ptr_eq(f, &gone()))
}

/// The bottom of the engine's outbound stack: one exchange with the pooled client, the reply
/// read whole and decoded. A reply cut short or garbled is a failed attempt, worth another.
pub(super) struct Exchange {
    pub(super) upstream: Arc<Upstream>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) body_idle_timeout: Duration,
    pub(super) upstream_encoding: UpstreamEncoding,
}

/// The exchange as the bottom of the engine's stack (one pointer to clone per attempt).
#[derive(Clone)]
pub(super) struct SharedExchange(pub(super) Arc<Exchange>);

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
    pub(super) async fn exchange(
        &self,
        call: &EngineCall,
        head: &HeadArrived,
    ) -> Tried<CallResult> {
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
}
