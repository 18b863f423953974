//! The embeddings engine: `POST /v1/embeddings` (and Azure's deployment path) served from the
//! cache, joined to identical inputs in flight, or batched with other callers' inputs into few
//! upstream calls, and answered to each caller exactly as the upstream would have answered it.
//!
//! The flow for one request: read and check it (`request`), key it (`keys`), look each input up
//! in the cache (`cache`), count the misses' tokens and refuse over-long inputs before they can
//! fail anyone else's call (`tokens`), hand the misses to the lane of their batch key
//! (`batch`), wait for them within the deadline, and render the reply in the caller's own format
//! and order (`render`).

pub(crate) mod batch;
pub(crate) mod cache;
pub(crate) mod float_text;
pub(crate) mod keys;
pub mod render;
pub mod request;
pub mod tokens;

use std::sync::Arc;

use http::{header, request::Parts, HeaderMap, HeaderName, HeaderValue, Request, Response};
use http_body_util::BodyExt;
use tokio::time::Instant;

use self::{
    batch::{BatchSettings, Batcher, Caller, InputKind, Miss, Template, Ticket},
    cache::{Embedded, VectorCache},
    keys::{input_hash, BatchKey, IgnoredHeaders, KeyInputs},
    request::{EmbeddingsRequest, Parsed},
    tokens::Tokenizer,
};
use crate::{
    config::Config,
    http::{
        body::{self, BodyBounds, ProxyBody},
        errors::ProxyError,
        route::Route,
    },
    metrics::{Metrics, TokenSource},
    passthrough::{strip_hop_by_hop, Proxy},
    resilience::limits::time_budget,
    upstream::{credential::CredentialId, outbound, Upstream},
};

/// Response header: how many of the caller's inputs were answered from the cache.
pub const CACHE_HITS_HEADER: HeaderName = HeaderName::from_static("x-embedcar-cache-hits");
/// Response header: how many of the caller's inputs joined an identical input already queued
/// or in flight (its own duplicates included).
pub const COALESCED_HEADER: HeaderName = HeaderName::from_static("x-embedcar-coalesced");
/// Response header: how many inputs the request had.
pub const INPUTS_HEADER: HeaderName = HeaderName::from_static("x-embedcar-inputs");

/// Which embeddings endpoint a request is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EmbeddingsPath {
    OpenAi,
    Azure { deployment: String },
}

impl EmbeddingsPath {
    /// `/v1/embeddings`, or `/openai/deployments/{deployment}/embeddings`.
    pub fn of(path: &str) -> Option<EmbeddingsPath> {
        if path == "/v1/embeddings" {
            return Some(EmbeddingsPath::OpenAi);
        }
        let deployment = path
            .strip_prefix("/openai/deployments/")?
            .strip_suffix("/embeddings")?;
        (!deployment.is_empty() && !deployment.contains('/')).then(|| EmbeddingsPath::Azure {
            deployment: deployment.to_string(),
        })
    }
}

pub struct Engine {
    batcher: Batcher,
    cache: Arc<VectorCache>,
    ignored: IgnoredHeaders,
    metrics: Arc<Metrics>,
    proxy: Arc<Proxy>,
    config: crate::config::EmbeddingsConfig,
    request_timeout: std::time::Duration,
    held_credential: Option<CredentialId>,
    share_cache: bool,
}

impl Engine {
    pub fn new(
        config: &Config,
        upstream: Arc<Upstream>,
        outbound: &outbound::Parts,
        metrics: Arc<Metrics>,
        proxy: Arc<Proxy>,
    ) -> Engine {
        let cache = Arc::new(VectorCache::new(&config.cache));
        let e = &config.embeddings;
        // With a held key every caller is the same upstream tenant, whatever dummy key it sends,
        // and stays that tenant across key rotations (see `HeldCredential::id`).
        let held_credential = upstream.credential.as_ref().map(|c| c.id());
        let batcher = Batcher::new(
            upstream,
            outbound,
            metrics.clone(),
            cache.clone(),
            BatchSettings {
                max_queued: config.limits.max_queued_inputs,
                should_retry_header: config.retry.should_retry_header,
                max_inputs: e.max_inputs_per_call,
                // A call larger than a minute's token budget could never pass the gate whole.
                max_tokens: match config.limits.tokens_per_minute {
                    0 => e.max_tokens_per_call,
                    tpm => e.max_tokens_per_call.min(u64::from(tpm)),
                },
                linger: e.linger,
                upstream_encoding: e.upstream_encoding,
                body_idle_timeout: config.upstream.body_idle_timeout,
            },
        );
        Engine {
            batcher,
            cache,
            ignored: IgnoredHeaders::new(&e.ignore_headers),
            metrics,
            proxy,
            config: e.clone(),
            request_timeout: config.limits.request_timeout,
            held_credential,
            share_cache: config.cache.share_across_credentials,
        }
    }

    pub fn cache(&self) -> &VectorCache {
        &self.cache
    }

    /// Serves one embeddings request.
    pub async fn handle(
        &self,
        req: Request<ProxyBody>,
        path: EmbeddingsPath,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        // The deadline runs from the request's arrival, as the client's timer does from its
        // sending, not from when its body is read and parsed.
        let arrived = Instant::now();
        let codings = match body::content_codings(req.headers()) {
            // Bytes in a coding embedcar cannot read go to the upstream as they came, label and
            // all, streamed: the upstream is the judge of what it accepts.
            body::ContentCodings::Unknown => {
                return self.proxy.forward(req, Route::Embeddings).await
            }
            body::ContentCodings::Identity => Vec::new(),
            body::ContentCodings::Known(codings) => codings,
        };
        let (mut parts, body) = req.into_parts();
        // Held (with what is parsed from it) until the reply: the budget bounds the request
        // bytes in memory across all callers, not just while one is being read.
        let bounds = parts.extensions.get::<BodyBounds>().cloned();
        let (mut bytes, mut reservation) = match &bounds {
            Some(bounds) => {
                let (bytes, reservation) = body::collect_reserved(body, &bounds.budget)
                    .await
                    .map_err(|e| match e {
                        body::CollectError::Refused(r) => ProxyError::from(r),
                        body::CollectError::Body(e) => crate::passthrough::read_error(&*e),
                    })?;
                (bytes, Some(reservation))
            }
            None => (
                body.collect()
                    .await
                    .map_err(|e| crate::passthrough::read_error(&*e))?
                    .to_bytes(),
                None,
            ),
        };
        if !codings.is_empty() {
            let limit = bounds
                .as_ref()
                .map_or(crate::config::DEFAULT_MAX_BODY_BYTES, |b| b.max_bytes);
            bytes = decode_body(bytes, codings, limit).await?;
            if let Some(reservation) = &mut reservation {
                reservation.grow(bytes.len() as u64)?;
            }
            // What goes upstream from here is the decoded JSON (re-serialised on merged calls,
            // or these bytes on the pass-through): its old label and length no longer fit.
            parts.headers.remove(header::CONTENT_ENCODING);
            parts.headers.remove(header::CONTENT_LENGTH);
        }
        let model_required = path == EmbeddingsPath::OpenAi;
        let request = match request::parse(&bytes, model_required)? {
            Parsed::Engine(r) => r,
            Parsed::PassThrough => return self.pass_through(parts, bytes).await,
        };
        let request = if self.config.split_oversized {
            request
        } else {
            let (request, over) = self.over_a_calls_caps(request, &path).await?;
            if over {
                return self.pass_through(parts, bytes).await;
            }
            request
        };
        self.embed(parts, path, request, arrived).await
    }

    /// Whether `request` is more than one upstream call may carry, in inputs or in tokens
    /// (with `split_oversized` off such a request goes to the upstream whole, to be judged
    /// there). A token is at least a byte, so a request with fewer bytes of text than the cap
    /// is under it without being counted; a larger one is counted off the async workers.
    async fn over_a_calls_caps(
        &self,
        request: EmbeddingsRequest,
        path: &EmbeddingsPath,
    ) -> Result<(EmbeddingsRequest, bool), ProxyError> {
        if request.inputs.len() > self.config.max_inputs_per_call {
            return Ok((request, true));
        }
        let cap = self.config.max_tokens_per_call;
        let most: u64 = request
            .inputs
            .iter()
            .map(|i| match i {
                request::Input::Text(s) => s.len() as u64,
                request::Input::Tokens(ids) => ids.len() as u64,
            })
            .sum();
        if most <= cap {
            return Ok((request, false));
        }
        let model_key = model_key(path, &request.model);
        tokens::load_for(model_key.as_deref()).await;
        let tokenizer = Tokenizer::for_model(model_key.as_deref());
        tokio::task::spawn_blocking(move || {
            let mut total = 0u64;
            let over = request.inputs.iter().any(|input| {
                total += tokenizer
                    .count(input)
                    .unwrap_or_else(|| tokens::estimate(input));
                total > cap
            });
            (request, over)
        })
        .await
        .map_err(|e| ProxyError::Internal(format!("tokenizing failed: {e}")))
    }

    async fn pass_through(
        &self,
        parts: Parts,
        bytes: bytes::Bytes,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        self.proxy
            .forward(
                Request::from_parts(parts, body::full(bytes)),
                Route::Embeddings,
            )
            .await
    }

    async fn embed(
        &self,
        parts: Parts,
        path: EmbeddingsPath,
        request: EmbeddingsRequest,
        arrived: Instant,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let model_key = model_key(&path, &request.model);
        // The tokenizer's one-off load (if a request comes before the load at start is done)
        // is not charged to the request's own deadline.
        let loading = Instant::now();
        tokens::load_for(model_key.as_deref()).await;
        let arrived = arrived + loading.elapsed();
        let budget = time_budget(&parts.headers, self.request_timeout);
        // embedcar's own answer (a 504, or its last retry's error) reaches the client a moment
        // before the client gives up, so it learns why instead of timing out itself.
        let deadline = arrived + budget.saturating_sub(answer_margin(budget));
        let target = parts
            .uri
            .path_and_query()
            .map_or("/v1/embeddings", |pq| pq.as_str());
        let key = BatchKey::new(
            KeyInputs {
                headers: &parts.headers,
                target,
                model: model_key.as_deref(),
                dimensions: request.dimensions,
                user: request.user.as_deref(),
                credential: self.held_credential,
            },
            &self.ignored,
        );
        let scope = key.cache_scope(self.share_cache);
        let tokenizer = Tokenizer::for_model(model_key.as_deref());
        let count = request.inputs.len();
        self.metrics.embeddings.inputs.inc_by(count as u64);

        // Cache first; every miss is counted and checked before anything is queued, so a
        // refused request leaves nothing behind.
        let (mut answers, unsized_misses) = self.look_up(scope, request.inputs).await;
        let misses = self.size_and_check(tokenizer, unsized_misses).await?;
        let hits = self.count_hits(&answers);

        let template = || Template {
            target: target.to_string(),
            headers: shared_headers(&parts.headers, &self.ignored),
            model: request.model.clone(),
            dimensions: request.dimensions,
            user: request.user.clone(),
            tokenizer,
            cache_scope: scope,
            credential: *key.credential(),
        };
        let waiting = self.queue(&key, &template, &parts.headers, misses, deadline)?;
        let coalesced = waiting.iter().filter(|(_, t)| t.joined).count();
        if coalesced > 0 {
            self.metrics.embeddings.coalesced.inc_by(coalesced as u64);
        }

        if let Some(failure) = self
            .wait_for(waiting, &mut answers, deadline, budget)
            .await?
        {
            return Ok(failure);
        }
        let answers: Vec<Arc<Embedded>> = answers.into_iter().flatten().collect();
        Ok(reply(&answers, request.encoding, [count, hits, coalesced]))
    }

    /// Looks every input up in the cache, in process then (one round trip for all of L1's
    /// misses) in the shared tier: the answers found by position, and the misses to send.
    async fn look_up(
        &self,
        scope: u128,
        inputs: Vec<request::Input>,
    ) -> (
        Vec<Option<Arc<Embedded>>>,
        Vec<(usize, u128, request::Input)>,
    ) {
        let mut answers: Vec<Option<Arc<Embedded>>> = Vec::with_capacity(inputs.len());
        let mut unsized_misses: Vec<(usize, u128, request::Input)> = Vec::new();
        for (position, input) in inputs.into_iter().enumerate() {
            let hash = input_hash(&input);
            if let Some(hit) = self.cache.get(&(scope, hash)) {
                answers.push(Some(hit));
            } else {
                answers.push(None);
                unsized_misses.push((position, hash, input));
            }
        }
        // L1's misses go to the shared cache (if any) in one round trip.
        if !unsized_misses.is_empty() {
            let hashes: Vec<u128> = unsized_misses.iter().map(|(_, h, _)| *h).collect();
            let found = self.cache.fetch_shared(scope, &hashes).await;
            if found.iter().any(Option::is_some) {
                let mut found = found.into_iter();
                unsized_misses.retain(|(position, _, _)| match found.next().flatten() {
                    Some(hit) => {
                        answers[*position] = Some(hit);
                        false
                    }
                    None => true,
                });
            }
        }
        (answers, unsized_misses)
    }

    /// Counts the misses' tokens and refuses the request if one input is over the model's
    /// limit, before anything is queued; the misses come back grouped by [`InputKind`], as
    /// text and token ids never share a call.
    async fn size_and_check(
        &self,
        tokenizer: Tokenizer,
        unsized_misses: Vec<(usize, u128, request::Input)>,
    ) -> Result<[Vec<(usize, Miss)>; 2], ProxyError> {
        let sized = size_misses(tokenizer, unsized_misses).await?;
        let mut misses: [Vec<(usize, Miss)>; 2] = [Vec::new(), Vec::new()];
        for (position, miss, exact) in sized {
            if exact && miss.size > self.config.max_input_tokens {
                return Err(too_long(self.config.max_input_tokens, miss.size));
            }
            misses[InputKind::of(&miss.input) as usize].push((position, miss));
        }
        Ok(misses)
    }

    /// Counts the cache's answers and the tokens they saved; returns how many there were.
    fn count_hits(&self, answers: &[Option<Arc<Embedded>>]) -> usize {
        let hits = answers.iter().filter(|a| a.is_some()).count();
        if hits > 0 {
            self.metrics.embeddings.cache_hits.inc_by(hits as u64);
            let cached_tokens = answers.iter().flatten().map(|e| e.tokens).sum();
            self.metrics.count_tokens(TokenSource::Cache, cached_tokens);
        }
        hits
    }

    /// Hands each kind's misses to the batcher, which merges them into upstream calls (or
    /// joins identical inputs already in flight): a ticket per miss, by position.
    fn queue(
        &self,
        key: &BatchKey,
        template: &impl Fn() -> Template,
        headers: &HeaderMap,
        misses: [Vec<(usize, Miss)>; 2],
        deadline: Instant,
    ) -> Result<Vec<(usize, Ticket)>, ProxyError> {
        // The caller's own headers are picked out only when something goes upstream; the
        // shared ones only when a lane has to be made (`template`).
        let caller = Arc::new(Caller {
            own_headers: if misses.iter().any(|g| !g.is_empty()) {
                own_headers(headers, &self.ignored)
            } else {
                HeaderMap::new()
            },
        });
        let mut waiting: Vec<(usize, Ticket)> = Vec::new();
        for (kind, group) in [InputKind::Text, InputKind::Tokens].into_iter().zip(misses) {
            if group.is_empty() {
                continue;
            }
            let (positions, group): (Vec<usize>, Vec<Miss>) = group.into_iter().unzip();
            let tickets =
                self.batcher
                    .submit(key.clone(), kind, template, &caller, group, deadline)?;
            waiting.extend(positions.into_iter().zip(tickets));
        }
        Ok(waiting)
    }

    /// Waits for every queued input's answer until the deadline, filling `answers`; `Some`
    /// is an upstream failure to answer the caller with instead.
    async fn wait_for(
        &self,
        waiting: Vec<(usize, Ticket)>,
        answers: &mut [Option<Arc<Embedded>>],
        deadline: Instant,
        budget: std::time::Duration,
    ) -> Result<Option<Response<ProxyBody>>, ProxyError> {
        for (position, ticket) in waiting {
            match tokio::time::timeout_at(deadline, ticket.rx).await {
                Err(_) => {
                    self.metrics
                        .requests
                        .deadline_expired
                        .with_label_values(&["embeddings"])
                        .inc();
                    return Err(ProxyError::DeadlineExceeded(budget));
                }
                Ok(Err(_)) => {
                    return Err(ProxyError::Internal(
                        "an input's upstream call ended without an answer".into(),
                    ))
                }
                // The call was abandoned because this caller's deadline came: say so, as the
                // caller's own timer would have a moment later.
                Ok(Ok(Err(_))) if Instant::now() >= deadline => {
                    self.metrics
                        .requests
                        .deadline_expired
                        .with_label_values(&["embeddings"])
                        .inc();
                    return Err(ProxyError::DeadlineExceeded(budget));
                }
                // Counted and logged by `ReportFailures` (`src/http/stack.rs`), by its x-embedcar-error.
                Ok(Ok(Err(failure))) => return Ok(Some(failure.to_response())),
                Ok(Ok(Ok(embedded))) => answers[position] = Some(embedded),
            }
        }
        Ok(None)
    }
}

/// The caller's reply, rendered from every input's vector in order, with the counts of
/// `[inputs, cache hits, coalesced]` in embedcar's headers.
fn reply(
    answers: &[Arc<Embedded>],
    encoding: request::Encoding,
    [count, hits, coalesced]: [usize; 3],
) -> Response<ProxyBody> {
    let model = answers
        .first()
        .map(|e| e.model.clone())
        .unwrap_or_else(|| "".into());
    let prompt_tokens = answers.iter().map(|e| e.tokens).sum();
    let body = render::render_reply(
        answers.iter().map(|e| &*e.vector),
        encoding,
        &model,
        prompt_tokens,
    );
    let mut response = Response::new(body::full(body));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(INPUTS_HEADER, count_value(count));
    headers.insert(CACHE_HITS_HEADER, count_value(hits));
    headers.insert(COALESCED_HEADER, count_value(coalesced));
    response
}

/// The model that decides the tokenizer and the batch key. On Azure the deployment is the
/// model; a model in the body is forwarded as given.
fn model_key(path: &EmbeddingsPath, model: &Option<String>) -> Option<String> {
    match path {
        EmbeddingsPath::OpenAi => model.clone(),
        EmbeddingsPath::Azure { deployment } => {
            Some(model.clone().unwrap_or_else(|| deployment.clone()))
        }
    }
}

/// Compressed bodies beyond which decoding moves off the async workers: inflating runs at a few
/// hundred MB/s, so a large body would otherwise stall every connection on its worker.
const INLINE_DECODE_BYTES: usize = 64 * 1024;

/// Undoes the body's content codings, within the body limit.
async fn decode_body(
    bytes: bytes::Bytes,
    codings: Vec<body::Coding>,
    limit: u64,
) -> Result<bytes::Bytes, ProxyError> {
    if bytes.len() <= INLINE_DECODE_BYTES {
        return Ok(body::decode(bytes, &codings, limit)?);
    }
    tokio::task::spawn_blocking(move || body::decode(bytes, &codings, limit))
        .await
        .map_err(|e| ProxyError::Internal(format!("decoding the body failed: {e}")))?
        .map_err(ProxyError::from)
}

/// A count header's value; 0 and 1, by far the most common, without formatting or allocating.
fn count_value(n: usize) -> HeaderValue {
    match n {
        0 => HeaderValue::from_static("0"),
        1 => HeaderValue::from_static("1"),
        n => HeaderValue::from(n),
    }
}

/// Text beyond which tokenizing moves off the async workers: cl100k runs at roughly 10–50 MB/s,
/// so a few thousand long inputs would otherwise stall every connection on that worker.
const INLINE_TOKENIZE_BYTES: usize = 64 * 1024;

/// Counts (or estimates) each miss's tokens; `bool` says whether the count is exact.
async fn size_misses(
    tokenizer: Tokenizer,
    misses: Vec<(usize, u128, request::Input)>,
) -> Result<Vec<(usize, Miss, bool)>, ProxyError> {
    let count = move |misses: Vec<(usize, u128, request::Input)>| {
        misses
            .into_iter()
            .map(|(position, hash, input)| {
                let exact = tokenizer.count(&input);
                let size = exact.unwrap_or_else(|| tokens::estimate(&input));
                (position, Miss { hash, input, size }, exact.is_some())
            })
            .collect::<Vec<_>>()
    };
    let text_bytes: usize = misses
        .iter()
        .map(|(_, _, i)| match i {
            request::Input::Text(s) => s.len(),
            request::Input::Tokens(_) => 0,
        })
        .sum();
    if text_bytes <= INLINE_TOKENIZE_BYTES || matches!(tokenizer, Tokenizer::Unknown) {
        return Ok(count(misses));
    }
    tokio::task::spawn_blocking(move || count(misses))
        .await
        .map_err(|e| ProxyError::Internal(format!("tokenizing failed: {e}")))
}

/// How much sooner than the client's deadline embedcar answers: enough for the reply to cross
/// loopback and the client to read it (a hundredth of the budget, 10 ms to 100 ms), little
/// enough not to cut into the time the work itself may take (a slow upstream's second round can
/// end a few tens of milliseconds before the client's timeout, and that answer must still count).
fn answer_margin(budget: std::time::Duration) -> std::time::Duration {
    (budget / 100).clamp(
        std::time::Duration::from_millis(10),
        std::time::Duration::from_millis(100),
    )
}

/// The end-to-end headers every caller of a batch key shares (the key covers them): what a
/// lane's calls carry.
fn shared_headers(headers: &HeaderMap, ignored: &IgnoredHeaders) -> HeaderMap {
    let mut shared = forwarded_headers(headers);
    let names: Vec<HeaderName> = shared
        .keys()
        .filter(|n| ignored.ignores(n.as_str()))
        .cloned()
        .collect();
    for name in names {
        shared.remove(&name);
    }
    shared
}

/// A caller's own per-request headers (`embeddings.ignore_headers`: ids, trace context,
/// idempotency keys, user agent), which go only on a call that carries this caller alone.
fn own_headers(headers: &HeaderMap, ignored: &IgnoredHeaders) -> HeaderMap {
    let mut own = HeaderMap::new();
    for (name, value) in headers {
        if ignored.ignores(name.as_str()) && !NOT_FORWARDED.contains(name) {
            own.append(name.clone(), value.clone());
        }
    }
    own
}

/// Headers embedcar sets itself on an upstream call (length and type of the body it writes) or
/// cannot honour (a compressed reply it would have to undo), besides the hop-by-hop ones.
const NOT_FORWARDED: [HeaderName; 5] = [
    header::HOST,
    header::CONTENT_LENGTH,
    header::CONTENT_TYPE,
    header::ACCEPT_ENCODING,
    header::UPGRADE,
];

/// The caller's end-to-end headers as they may go upstream: not those embedcar sets (length
/// and type of the body it writes) or cannot honour (a compressed reply it would have to undo).
fn forwarded_headers(headers: &HeaderMap) -> HeaderMap {
    let mut h = headers.clone();
    strip_hop_by_hop(&mut h);
    for name in NOT_FORWARDED {
        h.remove(name);
    }
    h
}

/// The 400 OpenAI gives for an input over the model's context length.
fn too_long(limit: u64, tokens: u64) -> ProxyError {
    ProxyError::InvalidRequest {
        message: format!(
            "This model's maximum context length is {limit} tokens, however you requested {tokens} tokens ({tokens} in your prompt; 0 for the completion). Please reduce your prompt; or completion length."
        ),
        param: Some("input".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// embedcar's own answer comes a margin before the client's timeout: a hundredth of it,
    /// 10 ms to 100 ms. (End to end, `tests/self_tuning.rs` checks the caller gets embedcar's
    /// 504 rather than timing out; the margin itself is checked here, free of the machine's
    /// load.)
    #[test]
    fn the_answer_comes_a_margin_before_the_clients_timeout() {
        use std::time::Duration;
        assert_eq!(
            answer_margin(Duration::from_secs(1)),
            Duration::from_millis(10)
        );
        assert_eq!(
            answer_margin(Duration::from_secs(5)),
            Duration::from_millis(50)
        );
        assert_eq!(
            answer_margin(Duration::from_secs(60)),
            Duration::from_millis(100)
        );
        assert_eq!(
            answer_margin(Duration::from_millis(200)),
            Duration::from_millis(10)
        );
    }

    #[test]
    fn embeddings_paths_are_recognised() {
        assert_eq!(
            EmbeddingsPath::of("/v1/embeddings"),
            Some(EmbeddingsPath::OpenAi)
        );
        assert_eq!(
            EmbeddingsPath::of("/openai/deployments/emb/embeddings"),
            Some(EmbeddingsPath::Azure {
                deployment: "emb".into()
            })
        );
        assert_eq!(EmbeddingsPath::of("/v1/embeddings/x"), None);
        assert_eq!(EmbeddingsPath::of("/openai/deployments//embeddings"), None);
        assert_eq!(
            EmbeddingsPath::of("/openai/deployments/a/b/embeddings"),
            None
        );
    }
}
