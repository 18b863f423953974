//! Pass-through: any method, any path, to the same path on the upstream.
//!
//! Headers, query and body go through as they came, except what RFC 9110 says a proxy must not
//! forward (hop-by-hop headers) and `Host`, which names the upstream. Bodies stream in both
//! directions frame by frame, so server-sent events reach the caller as the upstream writes them
//! and an upload never sits whole in memory. An upstream slot is held from before the request is
//! sent until the response body ends, so a long stream counts against the concurrency limit for
//! as long as it runs.

use std::{sync::Arc, task::Poll, time::Duration};

use http::{header, HeaderMap, HeaderName, Request, Response, Version};
use http_body::Body as _;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::time::Instant;

use crate::{
    http::{
        body::{
            find_cause, BodyBounds, BodyIdleTimeout, BodyTooLarge, BoxError, Guarded, IdleTimeout,
            ProxyBody, Reservation,
        },
        errors::{Attempts, ProxyError},
        route::Route,
    },
    metrics::Metrics,
    resilience::{
        limits::time_budget,
        retry::{mark_final, Finished, RetryReason, Tried},
    },
    upstream::{
        credential::credential_fingerprint,
        outbound::{self, Attempt, BoxFuture, Call, HeadArrived, Kind, Outbound, Placed, Reply},
        Upstream,
    },
};
use tower::Service;

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1), plus the
/// non-standard ones that mean the same. Never forwarded in either direction.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

pub struct Proxy {
    upstream: Arc<Upstream>,
    outbound: Outbound<Exchange>,
    max_attempts: u32,
    metrics: Arc<Metrics>,
    settings: ProxySettings,
}

/// The pass-through's timings and retry policy, from the config.
pub struct ProxySettings {
    pub body_idle_timeout: Duration,
    pub request_timeout: Duration,
    pub max_buffered_body: u64,
    pub should_retry_header: bool,
}

/// Passed to `time_budget` as the configured budget to learn whether the client gave a hint
/// of its own: no hint leaves it as it is.
const NO_HINT: Duration = Duration::MAX;

/// One attempt's outcome: the upstream's response, or the error to answer with.
type Sent = Result<Response<Incoming>, ProxyError>;

impl Reply for Sent {
    fn error(e: ProxyError) -> Self {
        Err(e)
    }
}

impl Proxy {
    pub fn new(
        upstream: Arc<Upstream>,
        outbound: &outbound::Parts,
        metrics: Arc<Metrics>,
        settings: ProxySettings,
    ) -> Self {
        let exchange = Exchange(Arc::new(ExchangeParts {
            upstream: upstream.clone(),
            metrics: metrics.clone(),
        }));
        Self {
            upstream,
            outbound: outbound::build(exchange, outbound),
            max_attempts: outbound.retry.max_attempts(),
            metrics,
            settings,
        }
    }

    /// Sends `req` to the upstream and returns its response as it arrives. A body small enough
    /// to keep (declared length up to `retry.max_buffered_body`) is kept, so that a connection
    /// error, a timeout or a retryable status before the response starts is retried; a larger
    /// or streamed body gets one attempt.
    pub async fn forward(
        &self,
        req: Request<ProxyBody>,
        route: Route,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let now = Instant::now();
        // Embedcar's own waits (the gate, a slot, a retry's delay) stop at the request
        // timeout; the upstream's answer is waited for as long as the first-byte timeout and
        // the client's own hint allow: a completion may take minutes, and the official clients
        // wait 600 s for it by default.
        let deadline = now + time_budget(req.headers(), self.settings.request_timeout);
        let answer_by = match time_budget(req.headers(), NO_HINT) {
            NO_HINT => None,
            hint => now.checked_add(hint),
        };
        let idempotent = req.method().is_idempotent();
        let (parts, body) = req.into_parts();
        let parts = self.upstream_head(parts)?;
        let (body, reservation) = self.keep_if_small(&parts, body).await?;
        let retryable = matches!(body, Outgoing::Kept(_));
        // A held key is one tenant whichever key is in use now (see `HeldCredential::id`).
        let credential = match &self.upstream.credential {
            Some(held) => held.id(),
            None => credential_fingerprint(&parts.headers),
        };
        let upstream = self.upstream.clone();
        let mut body = body;
        let attempts = move |_| {
            let mut head = clone_parts(&parts);
            // Per attempt: a retry after a key rotation goes with the new key.
            if let Some(held) = &upstream.credential {
                held.apply(&mut head.headers);
            }
            Some(Attempt {
                request: Request::from_parts(head, body.next()),
                kind: Kind::PassThrough { idempotent },
                route,
                credential,
                tokens: 0,
                deadline,
                answer_by,
                live: None,
                places: None,
                head: HeadArrived::default(),
            })
        };
        let call = Call {
            attempts: Box::new(attempts),
            deadline,
            retryable,
            max_attempts: Some(self.max_attempts),
            callers: 1,
            live: None,
        };
        let finished = outbound::send(&self.outbound, call).await?;
        drop(reservation);
        Ok(self.answer(finished))
    }

    /// The request head as the upstream gets it: its URI, HTTP/1.1, no hop-by-hop headers and
    /// no `Host` (the client sets it from the upstream URI).
    fn upstream_head(
        &self,
        mut parts: http::request::Parts,
    ) -> Result<http::request::Parts, ProxyError> {
        parts.uri = self
            .upstream
            .base
            .join(parts.uri.path_and_query())
            .map_err(|e| ProxyError::InvalidRequest {
                message: format!("cannot map the request path onto the upstream: {e}"),
                param: None,
            })?;
        // HTTP/2 requests arrive with the version set; the client picks the upstream's own.
        parts.version = Version::HTTP_11;
        strip_hop_by_hop(&mut parts.headers);
        strip_upgrade(&mut parts.headers);
        parts.headers.remove(header::HOST);
        Ok(parts)
    }

    /// Keeps a body of known, small length (for retries) while the budget of buffered request
    /// bytes has room for it, held until the response head, as the bytes are; any other body
    /// streams, with one attempt.
    async fn keep_if_small(
        &self,
        parts: &http::request::Parts,
        body: ProxyBody,
    ) -> Result<(Outgoing, Option<Reservation>), ProxyError> {
        let kept = body
            .size_hint()
            .exact()
            .filter(|n| *n <= self.settings.max_buffered_body);
        let reservation = kept.and_then(|n| match parts.extensions.get::<BodyBounds>() {
            Some(bounds) => bounds.budget.reserve(n).ok().map(Some),
            None => Some(None),
        });
        if reservation.is_none() {
            return Ok((Outgoing::Streamed(Some(body)), None));
        }
        let bytes = body
            .collect()
            .await
            .map_err(|e| read_error(&*e))?
            .to_bytes();
        Ok((Outgoing::Kept(bytes), reservation.flatten()))
    }

    /// The caller's response: the upstream's, streaming on with its slot and the body's idle
    /// timeout, or embedcar's error; with the attempts made, and `x-should-retry: false` when
    /// embedcar gave up on a retryable failure.
    fn answer(&self, finished: Finished<Placed<Sent>>) -> Response<ProxyBody> {
        let Placed { value, slot } = finished.value;
        let attempts = Attempts(finished.attempts);
        let gave_up = finished.gave_up && self.settings.should_retry_header;
        let mut response = match value {
            Ok(r) => r,
            // Answered here, not by the router, to carry the attempts (and the header).
            Err(e) => {
                let mut r = e.into_response();
                if gave_up {
                    mark_final(r.headers_mut());
                }
                r.extensions_mut().insert(attempts);
                return r;
            }
        };
        response.extensions_mut().insert(attempts);
        strip_hop_by_hop(response.headers_mut());
        if gave_up {
            mark_final(response.headers_mut());
        }
        *response.version_mut() = Version::HTTP_11;
        let metrics = self.metrics.clone();
        response.map(|incoming| {
            let watched = IdleTimeout::new(incoming, self.settings.body_idle_timeout).map_err(
                move |e: BoxError| {
                    if e.is::<BodyIdleTimeout>() {
                        metrics
                            .requests
                            .deadline_expired
                            .with_label_values(&["body_idle"])
                            .inc();
                    }
                    e
                },
            );
            Guarded::new(watched, slot).boxed_unsync()
        })
    }
}

/// The request body as attempts send it.
enum Outgoing {
    /// Kept whole: each attempt sends a copy (a reference count, not the bytes).
    Kept(bytes::Bytes),
    /// Streamed: the first attempt takes it, and there is no other.
    Streamed(Option<ProxyBody>),
}

impl Outgoing {
    fn next(&mut self) -> ProxyBody {
        match self {
            Outgoing::Kept(bytes) => crate::http::body::full(bytes.clone()),
            Outgoing::Streamed(body) => body.take().unwrap_or_else(crate::http::body::empty),
        }
    }
}

/// The bottom of the pass-through's outbound stack: one exchange with the pooled client, up to
/// the response head (the body streams to the caller afterwards).
#[derive(Clone)]
pub struct Exchange(Arc<ExchangeParts>);

pub struct ExchangeParts {
    upstream: Arc<Upstream>,
    metrics: Arc<Metrics>,
}

impl Service<Attempt<Request<ProxyBody>>> for Exchange {
    type Response = Tried<Sent>;
    type Error = ProxyError;
    type Future = BoxFuture<Result<Tried<Sent>, ProxyError>>;

    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> Poll<Result<(), ProxyError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, attempt: Attempt<Request<ProxyBody>>) -> Self::Future {
        let this = self.0.clone();
        Box::pin(async move {
            let route = attempt.route;
            let started = Instant::now();
            let sent = this.upstream.client.request(attempt.request).await;
            let elapsed = started.elapsed();
            Ok(match sent {
                Err(e) => {
                    let reason = RetryReason::of_send_error(&e);
                    match this.classify_send_error(route, elapsed, &e) {
                        // The caller's own body failed: nothing the upstream did, nothing to
                        // retry.
                        err @ (ProxyError::BodyTooLarge { .. }
                        | ProxyError::ClientBodyTimeout(_)) => Tried::refused(Err(err)),
                        err => Tried::broken(Err(err), reason),
                    }
                }
                Ok(response) => {
                    let status = response.status();
                    this.metrics.observe_upstream_status(route, status, elapsed);
                    // Judged on a borrow of the headers, then the response moves in: no copy.
                    Tried::reply((), status, response.headers()).map(|()| Ok(response))
                }
            })
        })
    }
}

impl ExchangeParts {
    /// Turns a failed exchange into the caller's error: our own body limits first (the request
    /// body failed while being streamed), then connection failures.
    fn classify_send_error(
        &self,
        route: Route,
        elapsed: Duration,
        e: &hyper_util::client::legacy::Error,
    ) -> ProxyError {
        if let Some(too_large) = find_cause::<BodyTooLarge>(e) {
            return ProxyError::BodyTooLarge {
                limit: too_large.limit,
            };
        }
        if let Some(idle) = find_cause::<BodyIdleTimeout>(e) {
            return ProxyError::ClientBodyTimeout(idle.0);
        }
        let outcome = RetryReason::of_send_error(e).label();
        self.metrics.observe_upstream(route, outcome, elapsed);
        ProxyError::UpstreamUnreachable(error_chain(e))
    }
}

/// A copy of a request head for another attempt (extensions are not carried: nothing below
/// reads them).
fn clone_parts(parts: &http::request::Parts) -> http::request::Parts {
    let mut request = Request::new(());
    *request.method_mut() = parts.method.clone();
    *request.uri_mut() = parts.uri.clone();
    *request.version_mut() = parts.version;
    *request.headers_mut() = parts.headers.clone();
    request.into_parts().0
}

/// The caller's error for a request body that could not be read.
pub fn read_error(e: &(dyn std::error::Error + 'static)) -> ProxyError {
    if let Some(t) = find_cause::<BodyTooLarge>(e) {
        return ProxyError::BodyTooLarge { limit: t.limit };
    }
    if let Some(idle) = find_cause::<BodyIdleTimeout>(e) {
        return ProxyError::ClientBodyTimeout(idle.0);
    }
    ProxyError::InvalidRequest {
        message: "the request body could not be read".into(),
        param: None,
    }
}

/// Removes hop-by-hop headers, including any the `Connection` header names. One pass over the
/// names finds them (most messages carry none, or only `connection`), rather than a hashed
/// removal for each of the eight on every request and response.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    if !headers.keys().any(|k| HOP_BY_HOP.contains(k)) {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
}

/// Upgrade is hop-by-hop too, but only on the request side do we drop it unconditionally:
/// embedcar does not tunnel protocol switches (WebSocket), so it asks for none.
fn strip_upgrade(headers: &mut HeaderMap) {
    headers.remove(header::UPGRADE);
}

/// An error and its causes on one line: hyper's own Display says only "client error (Connect)".
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn hop_by_hop_headers_and_those_named_by_connection_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-private"),
        );
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer k"));
        h.insert("openai-organization", HeaderValue::from_static("org"));
        strip_hop_by_hop(&mut h);
        let left: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, vec!["authorization", "openai-organization"]);
    }
}
