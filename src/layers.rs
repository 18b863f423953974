//! embedcar's own tower layers: recording request metrics, and bounding request bodies. Their
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
    errors::ProxyError,
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
    metrics: Arc<Metrics>,
}

impl RequestBodyLayer {
    /// `max_buffered`: request bytes held in memory at once, over all requests.
    pub fn new(max_bytes: u64, max_buffered: u64, idle: Duration, metrics: Arc<Metrics>) -> Self {
        let budget = BufferBudget::new(max_buffered, metrics.request_buffer_bytes.clone());
        Self {
            max_bytes,
            idle,
            bounds: BodyBounds { max_bytes, budget },
            metrics,
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
            self.layer
                .metrics
                .shed
                .with_label_values(&[err.code()])
                .inc();
            return Box::pin(async move { Ok(err.into_response()) });
        }
        let idle = self.layer.idle;
        req.extensions_mut().insert(self.layer.bounds.clone());
        let req = req.map(|b| Limited::new(IdleTimeout::new(b, idle), limit).boxed_unsync());
        Box::pin(self.inner.call(req))
    }
}
