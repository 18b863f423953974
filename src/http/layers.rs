//! embedcar's own tower layers: catching panics, the request's context (sensitive headers, id,
//! span), recording request metrics, counting and logging failures, and bounding request
//! bodies. Their order is set in `stack.rs`, not here.

use std::{
    any::Any,
    convert::Infallible,
    future::Future,
    panic::AssertUnwindSafe,
    pin::Pin,
    sync::Arc,
    task::{ready, Context, Poll},
    time::Duration,
};

use futures_util::future::{ready, Either, Ready};
use http::{header, HeaderName, HeaderValue, Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use pin_project_lite::pin_project;
use tokio::time::Instant;
use tower::{Layer, Service};
use tracing::Instrument as _;

use crate::{
    http::{
        body::{BodyBounds, BufferBudget, Guarded, IdleTimeout, Limited, ProxyBody},
        errors::{self, Attempts, Blame, Detail, ProxyError},
        route::Route,
    },
    metrics::{MethodLabel, Metrics},
};

/// Status for a request whose caller went away before it was answered (nginx's 499).
const CLIENT_CLOSED: u16 = 499;

// ---------------------------------------------------------------------------------------------
// Panics

/// Turns a panic anywhere below (in `call` or while the response future is polled) into one
/// caller's 500 ([`errors::panic_response`]), so that a handler bug costs a request, not the
/// connection. tower-http's CatchPanicLayer does the same but boxes every response body once
/// more (and a body-type adapter above it boxed it again); this one hands the body through.
/// Like tower-http's, it does not reach into the body once the response is out.
#[derive(Clone)]
pub struct CatchPanic<S> {
    inner: S,
}

impl<S> CatchPanic<S> {
    /// Wraps `inner` (as a layer: `tower::layer::layer_fn(CatchPanic::new)`).
    pub fn new(inner: S) -> Self {
        CatchPanic { inner }
    }
}

impl<S, B> Service<Request<B>> for CatchPanic<S>
where
    S: Service<Request<B>, Response = Response<ProxyBody>, Error = Infallible>,
{
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = CatchPanicFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        match std::panic::catch_unwind(AssertUnwindSafe(|| self.inner.call(req))) {
            Ok(inner) => CatchPanicFuture {
                inner: Some(inner),
                panicked: None,
            },
            Err(panic) => CatchPanicFuture {
                inner: None,
                panicked: Some(panic),
            },
        }
    }
}

pin_project! {
    pub struct CatchPanicFuture<F> {
        #[pin]
        inner: Option<F>,
        panicked: Option<Box<dyn Any + Send + 'static>>,
    }
}

impl<F> Future for CatchPanicFuture<F>
where
    F: Future<Output = Result<Response<ProxyBody>, Infallible>>,
{
    type Output = Result<Response<ProxyBody>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        if let Some(panic) = this.panicked.take() {
            return Poll::Ready(Ok(errors::panic_response(panic)));
        }
        let Some(inner) = this.inner.as_mut().as_pin_mut() else {
            // Polled again after a panic was answered: nothing left to answer with.
            return Poll::Pending;
        };
        match std::panic::catch_unwind(AssertUnwindSafe(|| inner.poll(cx))) {
            Ok(polled) => polled,
            Err(panic) => {
                // The panicked future is dropped at once, as it would be by an unwinding task.
                this.inner.set(None);
                Poll::Ready(Ok(errors::panic_response(panic)))
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Request context: sensitive headers, request ids, the request span

/// The request headers whose values are credentials: marked sensitive before anything may log
/// or debug-print headers, so that `Debug` output shows them as "Sensitive".
const SENSITIVE: [HeaderName; 3] = [
    header::AUTHORIZATION,
    HeaderName::from_static("api-key"),
    header::COOKIE,
];

const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Everything a request needs before it is handled, in one layer and one pass over its headers
/// (tower-http's three layers for the same made a hashed lookup per name, an extension map per
/// request and a UUID string per id):
///
/// * credentials (`authorization`, `api-key`, `cookie`) are marked sensitive;
/// * the request gets an id: the caller's `x-request-id`, or a new UUID (v4), which goes
///   upstream too, as Envoy does, so both sides' logs can be joined;
/// * one span per request, named by its id, around the handler, so that every line the request
///   logs carries the id. Only the handler is instrumented, not the response body: nothing logs
///   while a body streams;
/// * on the way back, the upstream's own `x-request-id` wins (OpenAI's `req_...` is what its
///   support asks for); ours fills in when the reply has none (embedcar's own errors).
#[derive(Clone)]
pub struct RequestContext<S> {
    inner: S,
}

impl<S> RequestContext<S> {
    /// Wraps `inner` (as a layer: `tower::layer::layer_fn(RequestContext::new)`).
    pub fn new(inner: S) -> Self {
        RequestContext { inner }
    }
}

/// A new request id: a random (v4) UUID, written straight into the header value.
fn new_request_id() -> HeaderValue {
    let mut text = [0u8; uuid::fmt::Hyphenated::LENGTH];
    let text = uuid::Uuid::new_v4().hyphenated().encode_lower(&mut text);
    HeaderValue::from_str(text).expect("a UUID is a valid header value")
}

impl<S, B> Service<Request<B>> for RequestContext<S>
where
    S: Service<Request<B>, Response = Response<ProxyBody>, Error = Infallible>,
{
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = RequestContextFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let mut id = None;
        for (name, value) in req.headers_mut().iter_mut() {
            if SENSITIVE.contains(name) {
                value.set_sensitive(true);
            } else if id.is_none() && name == X_REQUEST_ID {
                id = Some(value.clone());
            }
        }
        let id = match id {
            Some(id) => id,
            None => {
                let id = new_request_id();
                req.headers_mut().insert(X_REQUEST_ID, id.clone());
                id
            }
        };
        let span = tracing::info_span!(
            "request",
            id = %id.to_str().unwrap_or("-"),
            method = %req.method(),
            path = %req.uri().path(),
        );
        let inner = span.in_scope(|| self.inner.call(req));
        RequestContextFuture {
            inner: inner.instrument(span),
            id: Some(id),
        }
    }
}

pin_project! {
    pub struct RequestContextFuture<F> {
        #[pin]
        inner: tracing::instrument::Instrumented<F>,
        id: Option<HeaderValue>,
    }
}

impl<F> Future for RequestContextFuture<F>
where
    F: Future<Output = Result<Response<ProxyBody>, Infallible>>,
{
    type Output = Result<Response<ProxyBody>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let Ok(mut response) = ready!(this.inner.poll(cx));
        if let Some(id) = this.id.take() {
            if let header::Entry::Vacant(slot) = response.headers_mut().entry(X_REQUEST_ID) {
                slot.insert(id);
            }
        }
        Poll::Ready(Ok(response))
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
pub struct RequestRecord {
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
        self.metrics.requests.in_flight.dec();
    }
}

impl<S, B> Service<Request<B>> for RecordMetrics<S>
where
    S: Service<Request<B>, Response = Response<ProxyBody>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = RecordMetricsFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let route = Route::of(req.uri().path());
        req.extensions_mut().insert(route);
        self.metrics.requests.in_flight.inc();
        let record = RequestRecord {
            metrics: self.metrics.clone(),
            route,
            method: MethodLabel::of(req.method()),
            status: None,
            started: Instant::now(),
        };
        RecordMetricsFuture {
            inner: self.inner.call(req),
            record: Some(record),
        }
    }
}

pin_project! {
    /// The handler's future; its response body carries the record to the body's end. Dropped
    /// before the response (the caller left), the record goes with it, as a 499.
    pub struct RecordMetricsFuture<F> {
        #[pin]
        inner: F,
        record: Option<RequestRecord>,
    }
}

impl<F> Future for RecordMetricsFuture<F>
where
    F: Future<Output = Result<Response<ProxyBody>, Infallible>>,
{
    type Output = Result<Response<ProxyBody>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let Ok(response) = ready!(this.inner.poll(cx));
        let Some(mut record) = this.record.take() else {
            return Poll::Ready(Ok(response));
        };
        record.status = Some(response.status().as_u16());
        Poll::Ready(Ok(response.map(|b| Guarded::new(b, record).boxed_unsync())))
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
    type Future = Pin<Box<dyn Future<Output = Result<Response<ProxyBody>, Infallible>> + Send>>;

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
        let budget = BufferBudget::new(max_buffered, metrics.requests.buffer_bytes.clone());
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
    type Future = Either<Ready<Result<Response<ProxyBody>, Infallible>>, S::Future>;

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
            return Either::Left(ready(Ok(err.into_response())));
        }
        let idle = self.layer.idle;
        req.extensions_mut().insert(self.layer.bounds.clone());
        let req = req.map(|b| Limited::new(IdleTimeout::new(b, idle), limit).boxed_unsync());
        Either::Right(self.inner.call(req))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::{service_fn, ServiceExt as _};

    fn ok_with(headers: &[(&'static str, &'static str)]) -> Response<ProxyBody> {
        let mut r = Response::new(crate::http::body::full("ok"));
        for (k, v) in headers {
            r.headers_mut().insert(*k, HeaderValue::from_static(v));
        }
        r
    }

    async fn status_of<S>(svc: S) -> u16
    where
        S: Service<Request<()>, Response = Response<ProxyBody>, Error = Infallible>,
    {
        let r = svc.oneshot(Request::new(())).await.unwrap();
        r.status().as_u16()
    }

    #[tokio::test]
    async fn a_panic_in_call_or_in_the_future_becomes_a_500() {
        let in_call = CatchPanic::new(service_fn(
            |_: Request<()>| -> Ready<Result<Response<ProxyBody>, Infallible>> {
                panic!("in call")
            },
        ));
        assert_eq!(status_of(in_call).await, 500);
        let in_future = CatchPanic::new(service_fn(|_: Request<()>| async {
            if true {
                panic!("in the future");
            }
            Ok::<_, Infallible>(ok_with(&[]))
        }));
        assert_eq!(status_of(in_future).await, 500);
        let fine = CatchPanic::new(service_fn(|_: Request<()>| async {
            Ok::<_, Infallible>(ok_with(&[]))
        }));
        assert_eq!(status_of(fine).await, 200);
    }

    #[tokio::test]
    async fn a_request_gets_an_id_upstream_and_back_and_its_credentials_are_sensitive() {
        let svc = RequestContext::new(service_fn(|req: Request<()>| async move {
            for name in ["authorization", "api-key", "cookie"] {
                assert!(req.headers()[name].is_sensitive(), "{name}");
            }
            assert!(!req.headers()["content-type"].is_sensitive());
            let id = req.headers()["x-request-id"].to_str().unwrap();
            assert!(uuid::Uuid::parse_str(id).is_ok(), "{id}");
            // The reply carries no id of its own: ours fills in.
            let mut r = ok_with(&[]);
            r.headers_mut()
                .insert("x-seen-id", req.headers()["x-request-id"].clone());
            Ok::<_, Infallible>(r)
        }));
        let req = Request::builder()
            .header("authorization", "Bearer k")
            .header("api-key", "k")
            .header("cookie", "c=1")
            .header("content-type", "application/json")
            .body(())
            .unwrap();
        let r = svc.oneshot(req).await.unwrap();
        assert_eq!(r.headers()["x-request-id"], r.headers()["x-seen-id"]);
    }

    #[tokio::test]
    async fn the_callers_id_goes_upstream_and_the_upstreams_own_id_wins_on_the_way_back() {
        let svc = RequestContext::new(service_fn(|req: Request<()>| async move {
            assert_eq!(req.headers()["x-request-id"], "caller-1");
            Ok::<_, Infallible>(ok_with(&[("x-request-id", "req_upstream")]))
        }));
        let req = Request::builder()
            .header("x-request-id", "caller-1")
            .body(())
            .unwrap();
        let r = svc.oneshot(req).await.unwrap();
        assert_eq!(r.headers()["x-request-id"], "req_upstream");

        let svc = RequestContext::new(service_fn(|_: Request<()>| async move {
            Ok::<_, Infallible>(ok_with(&[]))
        }));
        let req = Request::builder()
            .header("x-request-id", "caller-2")
            .body(())
            .unwrap();
        let r = svc.oneshot(req).await.unwrap();
        assert_eq!(r.headers()["x-request-id"], "caller-2");
    }
}

#[cfg(test)]
mod failure_log_tests {
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
