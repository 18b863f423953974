//! The one place that orders the tower layers. Outermost first; each layer says why it sits
//! where it does.

use std::sync::Arc;

use tower::{layer::layer_fn, ServiceBuilder};

use crate::{
    http::{
        layers::{
            CatchPanic, LogThrottle, RecordMetrics, RecordMetricsLayer, ReportFailures,
            ReportFailuresLayer, RequestBody, RequestBodyLayer, RequestContext,
            FAILURE_LOG_INTERVAL,
        },
        router::Router,
    },
    AppState,
};

/// The service each connection runs, spelled out: every layer's future is a named type, so a
/// request's way down the stack costs no allocation of its own (the router's future is the one
/// boxed, for the handler's async fns).
pub type HttpService =
    CatchPanic<RequestContext<RecordMetrics<ReportFailures<RequestBody<Router>>>>>;

pub fn build(state: &AppState) -> HttpService {
    let router = Router::new(state.proxy.clone(), state.engine.clone());
    let throttle = Arc::new(LogThrottle::new(FAILURE_LOG_INTERVAL));
    ServiceBuilder::new()
        // Outermost, so that a panic anywhere below (a handler bug, a bad input we did not
        // foresee) becomes one caller's 500 in OpenAI's shape, not a dropped connection.
        .layer(layer_fn(CatchPanic::new))
        // Before anything that may log or debug-print headers: marks the credentials sensitive;
        // gives every request an id (the caller's x-request-id, or a new UUID, sent upstream
        // too) and a span named by it, so every log line of the request carries it; puts the
        // id on replies that have none of their own.
        .layer(layer_fn(RequestContext::new))
        // Metrics see every request that got this far, including those the body limit refuses,
        // and time each to the end of its response body.
        .layer(RecordMetricsLayer::new(state.metrics.clone()))
        // Inside the span (its lines carry the request id) and the route RecordMetrics sets;
        // outside everything that answers with an error, the body limit's 413 included, so
        // every error reply is counted and logged here and nowhere else.
        .layer(ReportFailuresLayer::new(state.metrics.clone(), throttle))
        // Innermost before routing: size and idle bounds on what the caller uploads.
        .layer(RequestBodyLayer::new(
            state.config.server.max_body_bytes,
            state.config.server.max_buffered_request_bytes,
            state.config.upstream.body_idle_timeout,
            state.metrics.clone(),
        ))
        .service(router)
}
