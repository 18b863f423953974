//! embedcar's own tower layers: recording request metrics, counting and logging failures, and
//! bounding request bodies. Their
//! order relative to tower-http's layers is set in `stack.rs`, not here.

use std::{
    convert::Infallible,
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use http::{header, Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::time::Instant;
use tower::{Layer, Service};
use tower_http::request_id::RequestId;
use tracing::Instrument as _;

use crate::{
    body::{BodyBounds, BufferBudget, Guarded, IdleTimeout, Limited, ProxyBody},
    errors::{self, Attempts, Blame, Detail, ProxyError},
    metrics::{MethodLabel, Metrics, Route},
};

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// Status for a request whose caller went away before it was answered (nginx's 499).
const CLIENT_CLOSED: u16 = 499;

// ---------------------------------------------------------------------------------------------
// Request spans

/// One span per request, named by its request id, around the handler, so that every line the
/// request logs carries the id. Only the handler is instrumented, not the response body: nothing
/// logs while a body streams. (tower-http's TraceLayer did the same and more: entering the span
/// for every body frame, classifying failures, timing callbacks for events that are off at the
/// default level; together about a microsecond per request.)
#[derive(Clone, Copy, Default)]
pub struct RequestSpanLayer;

impl<S> Layer<S> for RequestSpanLayer {
    type Service = RequestSpan<S>;
    fn layer(&self, inner: S) -> RequestSpan<S> {
        RequestSpan { inner }
    }
}

#[derive(Clone)]
pub struct RequestSpan<S> {
    inner: S,
}

impl<S, B> Service<Request<B>> for RequestSpan<S>
where
    S: Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = tracing::instrument::Instrumented<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let id = req
            .extensions()
            .get::<RequestId>()
            .and_then(|id| id.header_value().to_str().ok())
            .unwrap_or("-");
        let span = tracing::info_span!(
            "request",
            id = %id,
            method = %req.method(),
            path = %req.uri().path(),
        );
        let future = span.in_scope(|| self.inner.call(req));
        future.instrument(span)
    }
}

// ---------------------------------------------------------------------------------------------
// Metrics

/// Counts every request by route, method and status, times it from head to the end of the
/// response body (a stream is timed to its last chunk), and tracks requests in flight.
#[derive(Clone)]
pub struct RecordMetricsLayer {
    metrics: Arc<Metrics>,
}

impl RecordMetricsLayer {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self { metrics }
    }
}

impl<S> Layer<S> for RecordMetricsLayer {
    type Service = RecordMetrics<S>;
    fn layer(&self, inner: S) -> RecordMetrics<S> {
        RecordMetrics {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

#[derive(Clone)]
pub struct RecordMetrics<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

/// Records one request when dropped: with the response's status once the body is done, or as
/// 499 if the caller left before there was a response.
struct RequestRecord {
    metrics: Arc<Metrics>,
    route: Route,
    method: MethodLabel,
    status: Option<u16>,
    started: Instant,
}

impl Drop for RequestRecord {
    fn drop(&mut self) {
        let status = self.status.unwrap_or(CLIENT_CLOSED);
        self.metrics
            .record_request(self.route, self.method, status, self.started.elapsed());
        self.metrics.requests_in_flight.dec();
    }
}

impl<S, B> Service<Request<B>> for RecordMetrics<S>
where
    S: Service<Request<B>, Response = Response<ProxyBody>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Response<ProxyBody>, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let route = Route::of(req.uri().path());
        req.extensions_mut().insert(route);
        self.metrics.requests_in_flight.inc();
        let mut record = RequestRecord {
            metrics: self.metrics.clone(),
            route,
            method: MethodLabel::of(req.method()),
            status: None,
            started: Instant::now(),
        };
        let fut = self.inner.call(req);
        Box::pin(async move {
            let response = fut.await?;
            record.status = Some(response.status().as_u16());
            Ok(response.map(|b| Guarded::new(b, record).boxed_unsync()))
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Failures: counted and logged

/// How often the same failure is logged: the first at once, then one line per interval that
/// says how many more like it there were, so an outage (a breaker refusing thousands of calls a
/// second) costs a line per reason every few seconds, not a line per request.
pub const FAILURE_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// What makes two failures "like" each other for the log: route, reason and status.
type FailureKey = (Route, &'static str, u16);

/// Per kind of failure: when it was last logged and how many have been left out since.
#[derive(Default)]
pub struct LogThrottle {
    interval: Duration,
    seen: std::sync::Mutex<std::collections::HashMap<FailureKey, (Instant, u64)>>,
}

impl LogThrottle {
    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            seen: Default::default(),
        }
    }

    /// `Some(k)`: log this one, saying it stands for `k` more left out since the last line;
    /// `None`: leave it out (and count it). The keys are bounded (routes, codes, statuses).
    fn admit(&self, key: FailureKey, now: Instant) -> Option<u64> {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        match seen.get_mut(&key) {
            Some((last, left_out)) if now.duration_since(*last) < self.interval => {
                *left_out += 1;
                None
            }
            Some((last, left_out)) => {
                *last = now;
                Some(std::mem::take(left_out))
            }
            None => {
                seen.insert(key, (now, 0));
                Some(0)
            }
        }
    }
}

/// Counts and logs every error reply, in one place whichever handler made it: embedcar's own
/// (the `x-embedcar-error` header names the code: shed or error counters) and the upstream's
/// 5xx and 429 that reach the caller (after retries). Upstream-caused and shed failures are
/// logged at WARN, rate-limited per kind by [`LogThrottle`]; the caller's own 4xx at DEBUG, as
/// they are the caller's to read in the reply, and a client sending bad requests in a loop must
/// not fill the operator's log.
#[derive(Clone)]
pub struct ReportFailuresLayer {
    metrics: Arc<Metrics>,
    throttle: Arc<LogThrottle>,
}

impl ReportFailuresLayer {
    pub fn new(metrics: Arc<Metrics>, throttle: Arc<LogThrottle>) -> Self {
        Self { metrics, throttle }
    }
}

impl<S> Layer<S> for ReportFailuresLayer {
    type Service = ReportFailures<S>;
    fn layer(&self, inner: S) -> ReportFailures<S> {
        ReportFailures {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct ReportFailures<S> {
    inner: S,
    layer: ReportFailuresLayer,
}

impl<S, B> Service<Request<B>> for ReportFailures<S>
where
    S: Service<Request<B>, Response = Response<ProxyBody>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Response<ProxyBody>, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let route = req
            .extensions()
            .get::<Route>()
            .copied()
            .unwrap_or_else(|| Route::of(req.uri().path()));
        let fut = self.inner.call(req);
        let layer = self.layer.clone();
        Box::pin(async move {
            let response = fut.await?;
            let status = response.status();
            if status.is_client_error() || status.is_server_error() {
                report_failure(&layer, route, &response);
            }
            Ok(response)
        })
    }
}

fn report_failure(layer: &ReportFailuresLayer, route: Route, response: &Response<ProxyBody>) {
    let status = response.status();
    let own = response
        .headers()
        .get(errors::ERROR_HEADER)
        .and_then(|v| v.to_str().ok());
    if let Some(code) = own {
        layer.metrics.count_own_error(code);
    }
    let (reason, blame) =
        match own.map(|c| errors::known_code(c).unwrap_or(("other", Blame::Internal))) {
            Some(known) => known,
            // The upstream's own reply, passed on: a 5xx or 429 is its failure (retries, if any,
            // are spent); any other 4xx answers the request.
            None if status.is_server_error() || status == http::StatusCode::TOO_MANY_REQUESTS => {
                ("upstream_error_status", Blame::Upstream)
            }
            None => ("upstream_client_error_status", Blame::Client),
        };
    let attempts = response.extensions().get::<Attempts>().map(|a| a.0);
    // Recorded only when there is one (embedcar's own errors): `None` leaves the field out.
    let detail = response.extensions().get::<Detail>().map(|d| d.0.as_str());
    let (route_label, code) = (route.as_str(), status.as_u16());
    if blame == Blame::Client {
        tracing::debug!(
            route = route_label,
            status = code,
            reason,
            attempts,
            detail,
            "request refused"
        );
        return;
    }
    let Some(more) = layer.throttle.admit((route, reason, code), Instant::now()) else {
        return;
    };
    if more == 0 {
        tracing::warn!(
            route = route_label,
            status = code,
            reason,
            attempts,
            detail,
            "request failed"
        );
    } else {
        tracing::warn!(
            route = route_label,
            status = code,
            reason,
            attempts,
            detail,
            more_like_it = more,
            "request failed, and {more} more like it since the last such line"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Request bodies

/// Bounds the request body: a declared Content-Length over the limit is refused at once with
/// 413; an undeclared (chunked) body is cut off with 413 as soon as it passes the limit; and a
/// body that stops moving for the idle timeout is abandoned (408). The handlers that read a
/// body whole find the limit and the shared budget of buffered bytes in its extensions
/// ([`BodyBounds`]).
#[derive(Clone)]
pub struct RequestBodyLayer {
    max_bytes: u64,
    idle: Duration,
    bounds: BodyBounds,
}

impl RequestBodyLayer {
    /// `max_buffered`: request bytes held in memory at once, over all requests.
    pub fn new(max_bytes: u64, max_buffered: u64, idle: Duration, metrics: Arc<Metrics>) -> Self {
        let budget = BufferBudget::new(max_buffered, metrics.request_buffer_bytes.clone());
        Self {
            max_bytes,
            idle,
            bounds: BodyBounds { max_bytes, budget },
        }
    }
}

impl<S> Layer<S> for RequestBodyLayer {
    type Service = RequestBody<S>;
    fn layer(&self, inner: S) -> RequestBody<S> {
        RequestBody {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct RequestBody<S> {
    inner: S,
    layer: RequestBodyLayer,
}

impl<S> Service<Request<Incoming>> for RequestBody<S>
where
    S: Service<Request<ProxyBody>, Response = Response<ProxyBody>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Response<ProxyBody>, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<Incoming>) -> Self::Future {
        let limit = self.layer.max_bytes;
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > limit) {
            let err = ProxyError::BodyTooLarge { limit };
            return Box::pin(async move { Ok(err.into_response()) });
        }
        let idle = self.layer.idle;
        req.extensions_mut().insert(self.layer.bounds.clone());
        let req = req.map(|b| Limited::new(IdleTimeout::new(b, idle), limit).boxed_unsync());
        Box::pin(self.inner.call(req))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_storm_of_one_failure_is_one_line_per_interval_with_a_count() {
        let throttle = LogThrottle::new(Duration::from_secs(10));
        let key = (Route::Embeddings, "upstream_circuit_open", 503);
        let other = (Route::Embeddings, "queue_full", 503);
        let start = Instant::now();
        assert_eq!(throttle.admit(key, start), Some(0), "the first is logged");
        for _ in 0..1000 {
            assert_eq!(throttle.admit(key, Instant::now()), None);
        }
        assert_eq!(
            throttle.admit(other, Instant::now()),
            Some(0),
            "another reason is not held back"
        );
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(
            throttle.admit(key, Instant::now()),
            Some(1000),
            "the next line says how many were left out"
        );
        assert_eq!(throttle.admit(key, Instant::now()), None);
    }
}
